//! A run's checkpoints: the answers written so far, every learner, the policy's learned state and
//! the counters (written last, atomically, so a state file never points past what is on disk).
//! A resume with another configuration or stream is refused.

use crate::error::{io, RunError};
use crate::live::RunState;
use crate::stream::Stream;
use crate::tiers::{TierModel, TierSetup};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use tandem_core::policy::Deferral;

/// The answers file: created, or (resuming) cut back to what the checkpoint counted.
pub fn open_output(
    path: &Path,
    resume_at: Option<u64>,
) -> Result<BufWriter<std::fs::File>, RunError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let f = match resume_at {
        Some(bytes) => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(io(path))?;
            // Lines written after the last checkpoint are dropped: those items run again.
            f.set_len(bytes).map_err(io(path))?;
            let mut f = f;
            use std::io::Seek;
            f.seek(std::io::SeekFrom::End(0)).map_err(io(path))?;
            f
        }
        None => std::fs::File::create(path).map_err(io(path))?,
    };
    Ok(BufWriter::new(f))
}

fn tier_file(dir: &Path, name: &str) -> PathBuf {
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    dir.join(format!("tier-{safe}.bin"))
}

/// Flushes the answers, saves every learner and the policy, then the state (atomically, last).
pub fn save(
    state: &RunState,
    tiers: &mut [TierSetup],
    policy: &dyn Deferral,
    out: &mut Option<(PathBuf, BufWriter<std::fs::File>)>,
    state_dir: Option<&Path>,
) -> Result<(), RunError> {
    if let Some((path, w)) = out {
        w.flush().map_err(io(path))?;
        w.get_ref().sync_data().map_err(io(path))?;
    }
    for t in tiers.iter_mut() {
        if let TierModel::Llm(l) = &mut t.model {
            l.flush()?;
        }
    }
    let Some(dir) = state_dir else {
        return Ok(());
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    for t in tiers.iter() {
        if let TierModel::Learner(c) = &t.model {
            c.save(&tier_file(dir, &t.name))?;
        }
    }
    if let Some(name) = policy.state_file() {
        let p = dir.join(name);
        let tmp = dir.join(format!("{name}.tmp"));
        std::fs::write(&tmp, policy.save()?).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &p).map_err(io(&p))?;
    }
    let path = dir.join("state.json");
    let tmp = dir.join("state.json.tmp");
    let text = serde_json::to_vec(state).map_err(|e| RunError::Invalid(e.to_string()))?;
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(&text).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))
}

/// Loads a checkpoint: the counters (refused if written by another configuration or on another
/// stream), every learner, and the policy's state.
pub fn load(
    dir: &Path,
    tiers: &mut [TierSetup],
    policy: &mut dyn Deferral,
    digest: &str,
    stream: &Stream,
) -> Result<RunState, RunError> {
    let path = dir.join("state.json");
    let text = std::fs::read(&path).map_err(io(&path))?;
    let state: RunState = serde_json::from_slice(&text).map_err(|e| {
        RunError::Invalid(format!("{}: not a tandem run state: {e}", path.display()))
    })?;
    if state.config_digest != digest {
        return Err(RunError::Invalid(format!(
            "{}: was written by a run with another configuration (the config file, --input, --seed, --pretrain and --pretrain-limit, and with --pretrain rest --limit, must be the same); start a new run (without --resume) or use the same settings",
            path.display()
        )));
    }
    let done = state.items_done as usize;
    if done > stream.items.len() {
        return Err(RunError::Invalid(format!(
            "{}: {} items done, but the stream has only {}",
            path.display(),
            done,
            stream.items.len()
        )));
    }
    if done > 0 && stream.items.get(done - 1).map(|i| &i.id) != state.last_id.as_ref() {
        return Err(RunError::Invalid(format!(
            "{}: the stream differs from the one this run was started on (item {} is not {:?}); resume with the same input and --seed",
            path.display(),
            done,
            state.last_id
        )));
    }
    for t in tiers.iter_mut() {
        if let TierModel::Learner(c) = &mut t.model {
            c.load(&tier_file(dir, &t.name))?;
        }
    }
    match policy.state_file() {
        Some(name) => {
            let p = dir.join(name);
            let bytes = std::fs::read(&p).map_err(io(&p))?;
            policy
                .restore(Some(&bytes), state.items_done)
                .map_err(|e| RunError::Invalid(format!("{}: {e}", p.display())))?;
        }
        None => policy.restore(None, state.items_done)?,
    }
    Ok(state)
}
