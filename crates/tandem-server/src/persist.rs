//! Learned state and counters on disk, one file per route. Written atomically (new file, fsync,
//! rename, fsync of the directory), so a crash leaves the old state or the new one, never half of
//! each; a crash loses what was learned since the last write (at most `persist_interval_s`). Budget
//! spend of a capped route lives in its spend journal ([`crate::journal`]), which is written before
//! every large call; the state file's `budget` only seeds a journal that does not exist yet.
//!
//! Version 2 (written): magic `TNDMSTAT`, version (u32, 2), the JSON header's length (u32), the
//! learners' weights' length (u64), the xxh3-64 of everything after it (u64), the JSON header
//! (gate, budget spend, counters, ...), the weights. All little-endian. Lengths must add up to the
//! file's size exactly, and are checked before anything is read into memory past the prefix.
//! Version 1 (read, so upgrades keep their state): magic `TNDMSRV1`, the header's length (u32),
//! the header, the weights; no checksum.

use crate::budget::Spent;
use crate::error::GatewayError;
use crate::route::{cascade_config, router_config, Counters, Learned, RouteState};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use tandem_core::calibrate::ShareController;
use tandem_core::londi::SwitchSnapshot;
use tandem_core::policy::cascade::ResponseCascade;
use tandem_core::policy::router::GainRouter;
use xxhash_rust::xxh3::xxh3_64;

const MAGIC_V1: &[u8; 8] = b"TNDMSRV1";
const MAGIC: &[u8; 8] = b"TNDMSTAT";
const VERSION: u32 = 2;
/// Magic, version, header length, weights length, checksum.
const PREFIX: usize = 8 + 4 + 4 + 8 + 8;
/// No state tandem writes comes near this (a route's learners are a few MiB): a larger file is
/// refused before it is read.
pub const MAX_STATE_BYTES: u64 = 1 << 30;

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
    /// The route's spend is kept in its journal, which must then exist (`budget` above is only a
    /// copy): a missing journal is refused rather than the spend reset to this older copy.
    #[serde(default)]
    spend_journal: bool,
    /// An engine cascade's deferral policy: its name and the length of its saved state, which
    /// follows the learner's weights (absent in files written before engine cascades).
    #[serde(default)]
    policy: Option<PolicyHeader>,
}

#[derive(Serialize, Deserialize)]
struct PolicyHeader {
    /// The route's gate, as configured.
    gate: String,
    /// Each tier's upstreams (names joined by `|`), cheapest first: what the policy learned about.
    tiers: Vec<String>,
    bytes: u64,
}

/// A route's tiers as a policy header names them.
fn tier_names(route: &RouteState, upstreams: &[String]) -> Vec<String> {
    route
        .cfg
        .tiers
        .iter()
        .map(|g| {
            g.members
                .iter()
                .map(|&i| upstreams.get(i).map_or("?", String::as_str))
                .collect::<Vec<_>>()
                .join("|")
        })
        .collect()
}

/// A route's state as loaded.
pub struct Restored {
    /// The learner's master copy.
    pub learned: Learned,
    /// The state file says the route's spend is in its journal (see [`Header`]).
    pub spend_journal: bool,
}

pub fn state_path(dir: &Path, route: &str) -> PathBuf {
    dir.join(format!("{}.state", file_stem(route)))
}

/// A route's name as a file name inside `state_dir`: letters, digits, `-`, `_` and (not first)
/// `.` stay; every other byte is `%XX`. `openai/gpt-4o` → `openai%2Fgpt-4o`, `../x` → `%2E.%2Fx`:
/// no route name can reach outside the directory, and two names never share a file.
pub fn file_stem(route: &str) -> String {
    let mut out = String::with_capacity(route.len());
    for (i, b) in route.bytes().enumerate() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || (b == b'.' && i > 0) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn io_err(path: &Path, what: &str, e: impl std::fmt::Display) -> GatewayError {
    GatewayError::State(format!("{}: {what}: {e}", path.display()))
}

/// Writes one route's state; `learned` is the learner's master copy.
pub fn save(
    dir: &Path,
    route: &RouteState,
    learned: &Learned,
    upstreams: &[String],
) -> Result<(), GatewayError> {
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, "cannot create", e))?;
    let path = state_path(dir, route.name());
    let c = &route.counters;
    let load = |a: &AtomicU64| AtomicU64::new(a.load(Ordering::Relaxed));
    let header = Header {
        route: route.name().to_string(),
        learned: learned.name().to_string(),
        gate: route.share_controller()?,
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
        spend_journal: route.budget.journal().is_some(),
        policy: None,
    };
    let mut header = header;
    // Every engine route names its gate and tiers' upstreams, so a restart on other models is
    // refused rather than starting them from what was learned about these; a policy without
    // state of its own (a two-model gate, whose model is the learner's) writes no bytes.
    let policy = match route.engine() {
        Some(e) => {
            let bytes = match e.policy().state_file() {
                Some(_) => e
                    .policy()
                    .save()
                    .map_err(|err| io_err(&path, "cannot encode the cascade policy", err))?,
                None => Vec::new(),
            };
            header.policy = Some(PolicyHeader {
                gate: route.cfg.cfg.gate.name().to_string(),
                tiers: tier_names(route, upstreams),
                bytes: bytes.len() as u64,
            });
            bytes
        }
        None => Vec::new(),
    };
    let buf = encode(&header, learned, &policy).map_err(|e| io_err(&path, "cannot encode", e))?;
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

/// A version 2 file's bytes.
fn encode(header: &Header, learned: &Learned, policy: &[u8]) -> Result<Vec<u8>, String> {
    let json = serde_json::to_vec(header).map_err(|e| e.to_string())?;
    let mut weights = Vec::new();
    match learned {
        Learned::Nothing => Ok(()),
        Learned::Router(r) => r.save(&mut weights),
        Learned::Cascade(c) => c.save(&mut weights),
    }
    .map_err(|e| e.to_string())?;
    weights.extend_from_slice(policy);
    let json_len = u32::try_from(json.len()).map_err(|_| "header over 4 GiB".to_string())?;
    let mut buf = Vec::with_capacity(PREFIX + json.len() + weights.len());
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&VERSION.to_le_bytes());
    buf.extend_from_slice(&json_len.to_le_bytes());
    buf.extend_from_slice(&(weights.len() as u64).to_le_bytes());
    let sum = {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(&json);
        h.update(&weights);
        h.digest()
    };
    buf.extend_from_slice(&sum.to_le_bytes());
    buf.extend_from_slice(&json);
    buf.extend_from_slice(&weights);
    Ok(buf)
}

fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Splits a state file's bytes into its JSON header and its weights, checking the version,
/// the lengths and (version 2) the checksum. Errors are the fault, without the file's name.
fn split(bytes: &[u8]) -> Result<(&[u8], &[u8], bool), String> {
    let magic = bytes.get(..8).ok_or("truncated header")?;
    if magic == MAGIC_V1 {
        let len = le_u32(bytes, 8).ok_or("truncated header")? as usize;
        let rest = &bytes[12..];
        if rest.len() < len {
            return Err(format!(
                "truncated header: it claims {len} bytes but {} follow",
                rest.len()
            ));
        }
        let (json, weights) = rest.split_at(len);
        return Ok((json, weights, false));
    }
    if magic != MAGIC {
        return Err("not a tandem route state file".into());
    }
    let version = le_u32(bytes, 8).ok_or("truncated header")?;
    if version != VERSION {
        return Err(format!(
            "unknown version {version} (this tandem reads versions 1 and {VERSION}; was it written by a newer one?)"
        ));
    }
    let (json_len, weights_len, sum) =
        match (le_u32(bytes, 12), le_u64(bytes, 16), le_u64(bytes, 24)) {
            (Some(j), Some(w), Some(s)) => (j, w, s),
            _ => return Err("truncated header".into()),
        };
    // Checked in u64 (a lying length cannot overflow) before anything is sliced or allocated.
    let claimed = (PREFIX as u64)
        .checked_add(u64::from(json_len))
        .and_then(|n| n.checked_add(weights_len));
    if claimed != Some(bytes.len() as u64) {
        return Err(format!(
            "its lengths (header {json_len} bytes, weights {weights_len} bytes) do not match its size of {} bytes: truncated or damaged",
            bytes.len()
        ));
    }
    let body = &bytes[PREFIX..];
    if xxh3_64(body) != sum {
        return Err("checksum mismatch: the file is damaged".into());
    }
    let (json, weights) = body.split_at(json_len as usize);
    Ok((json, weights, true))
}

/// Loads a route's state if a file exists, into the route; returns the learner's master copy.
/// Errors name the file and the fault (unreadable, too large, unknown version, bad lengths or
/// checksum, a header or weights that do not parse, a model of another kind).
pub fn load(
    dir: &Path,
    route: &RouteState,
    now: u64,
    upstreams: &[String],
) -> Result<Option<Restored>, GatewayError> {
    let path = state_path(dir, route.name());
    let bad = |why: &str| {
        GatewayError::State(format!(
            "{}: {why}; move the file away to start this route afresh",
            path.display()
        ))
    };
    let bytes = match std::fs::File::open(&path) {
        Ok(f) => {
            let size = f
                .metadata()
                .map_err(|e| io_err(&path, "cannot read", e))?
                .len();
            if size > MAX_STATE_BYTES {
                return Err(bad(&format!(
                    "it is {size} bytes, more than the {MAX_STATE_BYTES} any route state can be"
                )));
            }
            let mut b = Vec::new();
            // Read no more than the limit even if the file grows meanwhile.
            f.take(MAX_STATE_BYTES + 1)
                .read_to_end(&mut b)
                .map_err(|e| io_err(&path, "cannot read", e))?;
            b
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&path, "cannot read", e)),
    };
    let (json, mut rest, v2) = split(&bytes).map_err(|e| bad(&e))?;
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
    // The engine policy's state is the end of the weights.
    let policy_bytes = match (&header.policy, route.engine()) {
        (None, _) => None,
        (Some(p), Some(_)) => {
            let gate = route.cfg.cfg.gate.name();
            if p.gate != gate {
                return Err(bad(&format!(
                    "its cascade policy was learned with gate = \"{}\" but route `{}` now has gate = \"{gate}\"",
                    p.gate,
                    route.name(),
                )));
            }
            let now_tiers = tier_names(route, upstreams);
            if p.tiers != now_tiers {
                return Err(bad(&format!(
                    "it learned about tiers [{}] but route `{}` now has tiers [{}]",
                    p.tiers.join(", "),
                    route.name(),
                    now_tiers.join(", ")
                )));
            }
            let n = usize::try_from(p.bytes)
                .ok()
                .filter(|&n| n <= rest.len())
                .ok_or_else(|| {
                    bad(&format!(
                        "its cascade policy claims {} bytes, more than the file holds",
                        p.bytes
                    ))
                })?;
            let (w, pol) = rest.split_at(rest.len() - n);
            rest = w;
            Some(pol)
        }
        (Some(p), None) => {
            return Err(bad(&format!(
                "it holds a cascade policy (gate = \"{}\") but route `{}` is no longer a cascade of tiers",
                p.gate,
                route.name()
            )))
        }
    };
    let learned = match fresh {
        Learned::Nothing => Learned::Nothing,
        Learned::Router(_) => Learned::Router(Box::new(crate::route::attach_encoder(
            GainRouter::load(router_config(route.cfg.embedder.as_deref()), &mut rest)
                .map_err(|e| bad(&e.to_string()))?,
            &route.cfg,
        )?)),
        Learned::Cascade(_) => Learned::Cascade(Box::new(
            ResponseCascade::load(cascade_config(), &mut rest).map_err(|e| bad(&e.to_string()))?,
        )),
    };
    if v2 && !rest.is_empty() {
        return Err(bad(&format!(
            "{} bytes follow the learner's weights",
            rest.len()
        )));
    }
    if let (Some(snap), Some(c)) = (header.switch, route.switch()) {
        // The weights are kept; the settings (cost, budget, ...) are the config's.
        let saved_bits = snap.config.hash_bits;
        c.restore(snap).map_err(|e| {
            bad(&format!(
                "its controller (hash_bits {saved_bits}) does not load into route `{}`: {e}",
                route.name()
            ))
        })?;
    }
    if let (Some(bytes), Some(mut e)) = (policy_bytes, route.engine()) {
        e.policy_mut()
            .restore(Some(bytes), 0)
            .map_err(|err| bad(&format!("its cascade policy does not load: {err}")))?;
    }
    route.restore_share_controller(header.gate);
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
    route
        .shared
        .model
        .store(std::sync::Arc::new(learned.clone()));
    Ok(Some(Restored {
        learned,
        spend_journal: header.spend_journal,
    }))
}

#[cfg(test)]
mod file_name_tests {
    use super::*;

    #[test]
    fn route_names_stay_inside_the_state_dir_and_apart() {
        for (name, stem) in [
            ("tandem", "tandem"),
            ("gpt-4o_mini.v2", "gpt-4o_mini.v2"),
            ("openai/gpt-4o", "openai%2Fgpt-4o"),
            ("../escaped", "%2E.%2Fescaped"),
            (".hidden", "%2Ehidden"),
            ("a b%", "a%20b%25"),
            ("ü", "%C3%BC"),
        ] {
            assert_eq!(file_stem(name), stem, "{name}");
            let p = state_path(Path::new("/s"), name);
            assert_eq!(p.parent(), Some(Path::new("/s")), "{name}");
        }
        assert_ne!(file_stem("a/b"), file_stem("a%2Fb"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ServerConfig;

    /// A route_before route (it learns a router: the file has weights) with a call cap.
    fn route() -> RouteState {
        let cfg: ServerConfig = toml::from_str(
            r#"
[[upstream]]
name = "s"
kind = "openai"
base_url = "http://127.0.0.1:1/v1"
model = "m"
[[upstream]]
name = "l"
kind = "openai"
base_url = "http://127.0.0.1:1/v1"
model = "m"
price = "token:10:30"
[[route]]
name = "rb"
kind = "route_before"
small = "s"
large = "l"
target_share = 0.5
[route.budget]
max_calls = 10
"#,
        )
        .unwrap();
        let v = cfg.validate(Path::new("t.toml"), PathBuf::new()).unwrap();
        RouteState::new(0, v.routes[0].clone(), 1000).unwrap()
    }

    /// A saved state (two calls spent, 7 requests counted) and its file's bytes.
    fn saved(dir: &Path) -> Vec<u8> {
        let r = route();
        let h1 = r.budget.try_reserve(5, 1000).unwrap();
        let h2 = r.budget.try_reserve(5, 1000).unwrap();
        h1.settle(3);
        h2.settle(4);
        r.counters.requests.store(7, Ordering::Relaxed);
        let learned = Learned::for_route(&r.cfg).unwrap();
        save(dir, &r, &learned, &[]).unwrap();
        std::fs::read(state_path(dir, "rb")).unwrap()
    }

    fn load_bytes(dir: &Path, bytes: &[u8]) -> Result<RouteState, String> {
        std::fs::write(state_path(dir, "rb"), bytes).unwrap();
        let r = route();
        load(dir, &r, 1000, &[])
            .map_err(|e| e.to_string())?
            .unwrap();
        Ok(r)
    }

    #[test]
    fn version_2_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = saved(dir.path());
        assert_eq!(&bytes[..8], MAGIC);
        assert_eq!(le_u32(&bytes, 8), Some(2));
        let r = load_bytes(dir.path(), &bytes).unwrap();
        assert_eq!(r.budget.spent().calls, 2);
        assert_eq!(r.budget.spent().micros, 7);
        assert_eq!(Counters::get(&r.counters.requests), 7);
        assert!(matches!(**r.shared.model.load(), Learned::Router(_)));
    }

    #[test]
    fn any_flipped_byte_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = saved(dir.path());
        let json_len = le_u32(&bytes, 12).unwrap() as usize;
        // The magic, the version, each length, the checksum, the header, and weights at
        // several places (the router's weights start after the header).
        let weights = PREFIX + json_len;
        let mut at = vec![0, 9, 13, 17, 25, PREFIX + 3, weights, weights + 40];
        at.extend((1..6).map(|k| weights + (bytes.len() - weights) * k / 6));
        for i in at {
            let mut b = bytes.clone();
            b[i] ^= 0x04;
            let e = load_bytes(dir.path(), &b).err().unwrap();
            assert!(e.contains("rb.state"), "byte {i}: {e}");
            assert!(
                [
                    "checksum mismatch",
                    "unknown version",
                    "do not match its size",
                    "not a tandem route state file"
                ]
                .iter()
                .any(|n| e.contains(n)),
                "byte {i}: {e}"
            );
        }
    }

    #[test]
    fn truncated_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = saved(dir.path());
        for cut in [
            0,
            5,
            8,
            12,
            PREFIX - 1,
            PREFIX,
            PREFIX + 10,
            bytes.len() - 1,
        ] {
            let e = load_bytes(dir.path(), &bytes[..cut]).err().unwrap();
            assert!(
                e.contains("rb.state") && (e.contains("truncated") || e.contains("do not match")),
                "cut at {cut}: {e}"
            );
        }
        let mut longer = bytes.clone();
        longer.extend_from_slice(b"extra");
        let e = load_bytes(dir.path(), &longer).err().unwrap();
        assert!(e.contains("do not match its size"), "{e}");
    }

    #[test]
    fn huge_length_claims_are_refused_before_allocating() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = saved(dir.path());
        for (what, json_len, weights_len) in [
            ("header", u32::MAX, 0u64),
            ("weights", 10, u64::MAX),
            ("weights near the top", 10, u64::MAX - 40),
            ("both", u32::MAX, 1 << 40),
        ] {
            let mut b = bytes.clone();
            b[12..16].copy_from_slice(&json_len.to_le_bytes());
            b[16..24].copy_from_slice(&weights_len.to_le_bytes());
            let e = load_bytes(dir.path(), &b).err().unwrap();
            assert!(
                e.contains("rb.state") && e.contains("do not match its size"),
                "{what}: {e}"
            );
        }
        // Version 1 has no total: its header length is checked against what follows.
        let mut v1 = MAGIC_V1.to_vec();
        v1.extend_from_slice(&u32::MAX.to_le_bytes());
        v1.extend_from_slice(b"{}");
        let e = load_bytes(dir.path(), &v1).err().unwrap();
        assert!(e.contains("truncated header"), "{e}");
    }

    #[test]
    fn unknown_versions_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = saved(dir.path());
        b[8..12].copy_from_slice(&3u32.to_le_bytes());
        let e = load_bytes(dir.path(), &b).err().unwrap();
        assert!(
            e.contains("rb.state") && e.contains("unknown version 3"),
            "{e}"
        );
    }

    #[test]
    fn version_1_files_are_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let v2 = saved(dir.path());
        let json_len = le_u32(&v2, 12).unwrap() as usize;
        let json = &v2[PREFIX..PREFIX + json_len];
        // A v1 header had no `spend_journal` field.
        let mut header: serde_json::Value = serde_json::from_slice(json).unwrap();
        header.as_object_mut().unwrap().remove("spend_journal");
        let json = serde_json::to_vec(&header).unwrap();
        let mut v1 = MAGIC_V1.to_vec();
        v1.extend_from_slice(&(json.len() as u32).to_le_bytes());
        v1.extend_from_slice(&json);
        v1.extend_from_slice(&v2[PREFIX + json_len..]);
        let r = load_bytes(dir.path(), &v1).unwrap();
        assert_eq!(r.budget.spent().calls, 2);
        assert_eq!(Counters::get(&r.counters.requests), 7);
        // Saving writes version 2.
        let learned = Learned::for_route(&r.cfg).unwrap();
        save(dir.path(), &r, &learned, &[]).unwrap();
        let again = std::fs::read(state_path(dir.path(), "rb")).unwrap();
        assert_eq!(&again[..8], MAGIC);
    }

    #[test]
    fn a_file_over_the_size_limit_is_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        let path = state_path(dir.path(), "rb");
        let f = std::fs::File::create(&path).unwrap();
        // Sparse: no disk space used.
        f.set_len(MAX_STATE_BYTES + 1).unwrap();
        let e = load(dir.path(), &route(), 1000, &[])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("rb.state") && e.contains("more than"), "{e}");
    }
}
