use std::path::PathBuf;
use tandem_core::CoreError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum EvalError {
    // The cause is in the message and not chained as a source: a chain printer (anyhow's
    // `{:#}`) would repeat it.
    #[error("{path}: cannot read: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    BadLine {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    BadFile { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Core(#[from] CoreError),
    #[error("cannot write {path}: {message}")]
    Write { path: PathBuf, message: String },
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
            let e = EvalError::Io {
                path: "d/x.jsonl".into(),
                error,
            };
            let text = chain(&e);
            assert_eq!(text.matches(&cause).count(), 1, "{text}");
            assert!(text.starts_with("d/x.jsonl: cannot read: "), "{text}");
        }
    }
}
