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
    // The cause is in the message and not chained as a source: a chain printer (anyhow's
    // `{:#}`) would repeat it.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(transparent)]
    Model(#[from] tandem_models::classifier::ModelError),
    #[error(transparent)]
    Asset(#[from] tandem_models::assets::AssetError),
    #[error(transparent)]
    Core(#[from] tandem_core::CoreError),
}

pub fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> RunError + '_ {
    move |error| RunError::Io {
        path: path.to_path_buf(),
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The message as anyhow's `{:#}` prints it: the error and each source after it.
    fn chain(e: &dyn std::error::Error) -> String {
        let mut s = e.to_string();
        let mut next = e.source();
        while let Some(c) = next {
            s = format!("{s}: {c}");
            next = c.source();
        }
        s
    }

    fn os_errors() -> Vec<std::io::Error> {
        vec![
            std::io::Error::from_raw_os_error(2),
            std::io::Error::from_raw_os_error(13),
            std::io::Error::from_raw_os_error(21),
            std::io::Error::other("disk on fire"),
        ]
    }

    /// An I/O error's cause shows once, with the path, however the error is printed.
    #[test]
    fn io_cause_is_printed_once() {
        for error in os_errors() {
            let cause = error.to_string();
            let text = chain(&io(std::path::Path::new("nowhere/state.json"))(error));
            assert_eq!(text.matches(&cause).count(), 1, "{text}");
            assert!(text.starts_with("nowhere/state.json: "), "{text}");
        }
    }
}
