//! Learned state and counters on disk, one file per route: a magic, a JSON header (gate, budget
//! spend, counters) and the learners' weights. Written atomically (new file, fsync, rename, fsync
//! of the directory), so a crash leaves the old state or the new one, never half of each.

use crate::budget::Spent;
use crate::error::GatewayError;
use crate::route::{cascade_config, router_config, Counters, Learned, RouteState};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use tandem_core::calibrate::ShareController;
use tandem_core::londi::{SwitchController, SwitchSnapshot};
use tandem_core::policy::cascade::ResponseCascade;
use tandem_core::policy::router::GainRouter;

const MAGIC: &[u8; 8] = b"TNDMSRV1";

#[derive(Serialize, Deserialize)]
struct Header {
    route: String,
    learned: String,
    gate: ShareController,
    budget: Spent,
    counters: Counters,
    /// A switching route's controller (weights and counters; open episodes are not kept).
    #[serde(default)]
    switch: Option<SwitchSnapshot>,
}

pub fn state_path(dir: &Path, route: &str) -> PathBuf {
    dir.join(format!("{route}.state"))
}

fn io_err(path: &Path, what: &str, e: impl std::fmt::Display) -> GatewayError {
    GatewayError::Internal(format!("{}: {what}: {e}", path.display()))
}

/// Writes one route's state; `learned` is the learner's master copy.
pub fn save(dir: &Path, route: &RouteState, learned: &Learned) -> Result<(), GatewayError> {
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, "cannot create", e))?;
    let path = state_path(dir, route.name());
    let c = &route.counters;
    let load = |a: &AtomicU64| AtomicU64::new(a.load(Ordering::Relaxed));
    let header = Header {
        route: route.name().to_string(),
        learned: learned.name().to_string(),
        gate: route.gate().share_controller().clone(),
        budget: route.budget.spent(),
        counters: Counters {
            requests: load(&c.requests),
            small: load(&c.small),
            large: load(&c.large),
            both: load(&c.both),
            capped: load(&c.capped),
            feedback: load(&c.feedback),
            learned: load(&c.learned),
        },
        switch: route.switch().map(|c| c.snapshot()),
    };
    let json = serde_json::to_vec(&header).map_err(|e| io_err(&path, "cannot encode", e))?;
    let mut buf = Vec::with_capacity(json.len() + 16);
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&(json.len() as u32).to_le_bytes());
    buf.extend_from_slice(&json);
    let w = match learned {
        Learned::Nothing => Ok(()),
        Learned::Router(r) => r.save(&mut buf),
        Learned::Cascade(c) => c.save(&mut buf),
    };
    w.map_err(|e| io_err(&path, "cannot encode", e))?;
    let tmp = path.with_extension("state.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|e| io_err(&tmp, "cannot create", e))?;
    f.write_all(&buf)
        .and_then(|_| f.sync_all())
        .map_err(|e| io_err(&tmp, "cannot write", e))?;
    drop(f);
    std::fs::rename(&tmp, &path).map_err(|e| io_err(&path, "cannot replace", e))?;
    if let Ok(d) = std::fs::File::open(dir) {
        // Makes the rename itself durable; not all platforms allow syncing a directory.
        let _ = d.sync_all();
    }
    Ok(())
}

/// Loads a route's state if a file exists, into the route; returns the learner's master copy.
pub fn load(dir: &Path, route: &RouteState, now: u64) -> Result<Option<Learned>, GatewayError> {
    let path = state_path(dir, route.name());
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&path, "cannot read", e)),
    };
    let bad = |why: &str| {
        GatewayError::Internal(format!(
            "{}: {why}; move the file away to start this route afresh",
            path.display()
        ))
    };
    let mut r = bytes.as_slice();
    let mut magic = [0u8; 8];
    let mut len = [0u8; 4];
    r.read_exact(&mut magic)
        .and_then(|_| r.read_exact(&mut len))
        .map_err(|_| bad("truncated header"))?;
    if &magic != MAGIC {
        return Err(bad("not a tandem route state file"));
    }
    let len = u32::from_le_bytes(len) as usize;
    if r.len() < len {
        return Err(bad("truncated header"));
    }
    let (json, mut rest) = r.split_at(len);
    let header: Header =
        serde_json::from_slice(json).map_err(|e| bad(&format!("bad header: {e}")))?;
    let fresh = Learned::for_route(&route.cfg)?;
    if header.learned != fresh.name() {
        return Err(bad(&format!(
            "it holds a `{}` model but route `{}` now learns a `{}` model (its kind or gate changed)",
            header.learned,
            route.name(),
            fresh.name()
        )));
    }
    let learned = match fresh {
        Learned::Nothing => Learned::Nothing,
        Learned::Router(_) => Learned::Router(Box::new(
            GainRouter::load(router_config(), &mut rest).map_err(|e| bad(&e.to_string()))?,
        )),
        Learned::Cascade(_) => Learned::Cascade(Box::new(
            ResponseCascade::load(cascade_config(), &mut rest).map_err(|e| bad(&e.to_string()))?,
        )),
    };
    if let (Some(snap), Some(mut c)) = (header.switch, route.switch()) {
        let cfg = c.config().clone();
        if snap.config.hash_bits != cfg.hash_bits {
            return Err(bad(&format!(
                "its controller has hash_bits {} but the route now asks for {}",
                snap.config.hash_bits, cfg.hash_bits
            )));
        }
        // The weights are kept; the settings (cost, budget, ...) are the config's.
        *c = SwitchController::from_snapshot(SwitchSnapshot {
            config: cfg,
            ..snap
        })
        .map_err(|e| bad(&e.to_string()))?;
    }
    route.gate().restore_share_controller(header.gate);
    route
        .budget
        .restore(header.budget, now)
        .map_err(|e| bad(&e.to_string()))?;
    let (c, h) = (&route.counters, &header.counters);
    for (dst, src) in [
        (&c.requests, &h.requests),
        (&c.small, &h.small),
        (&c.large, &h.large),
        (&c.both, &h.both),
        (&c.capped, &h.capped),
        (&c.feedback, &h.feedback),
        (&c.learned, &h.learned),
    ] {
        dst.store(src.load(Ordering::Relaxed), Ordering::Relaxed);
    }
    route.model.store(std::sync::Arc::new(learned.clone()));
    Ok(Some(learned))
}
