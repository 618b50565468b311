use std::path::PathBuf;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum RunError {
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{source_name}:{line}: {message}")]
    Input {
        source_name: String,
        line: usize,
        message: String,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Model(#[from] tandem_models::classifier::ModelError),
    #[error(transparent)]
    Asset(#[from] tandem_models::assets::AssetError),
    #[error(transparent)]
    Core(#[from] tandem_core::CoreError),
}

pub fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> RunError + '_ {
    move |source| RunError::Io {
        path: path.to_path_buf(),
        source,
    }
}
