use std::path::PathBuf;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum AgentError {
    /// The bridge process crashed, hung or spoke garbage; it has been killed.
    #[error("the {bridge} bridge failed: {message}")]
    Bridge { bridge: String, message: String },
    /// The environment refused a request (the bridge is still usable).
    #[error("environment error: {0}")]
    Env(String),
    #[error("{0}")]
    Missing(String),
    /// A bench setting that selects or means nothing (which flag, which value, what there is).
    #[error("{0}")]
    Config(String),
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("{path}:{line}: {message}")]
    Recording {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error(transparent)]
    Model(#[from] tandem_models::gguf::GgufError),
    #[error(transparent)]
    Core(#[from] tandem_core::CoreError),
}
