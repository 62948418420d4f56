//! The library's error type: every failure a caller can cause (bad files, bad topology,
//! bad request) is a typed variant whose message names the file, tensor or value at fault.

use std::path::PathBuf;

/// Result alias used throughout remp.
pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("{file}: tensor `{tensor}`: {msg}")]
    Tensor {
        file: PathBuf,
        tensor: String,
        msg: String,
    },
    #[error("{file}: {msg}")]
    Checkpoint { file: PathBuf, msg: String },
    #[error("invalid topology: {0}")]
    Topology(String),
    #[error("invalid request: {0}")]
    Request(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("communication: {0}")]
    Comm(String),
    #[error("worker {worker}: {msg}")]
    Worker { worker: usize, msg: String },
    #[error("reconfiguration: {0}")]
    Reconfig(String),
    #[error("device: {0}")]
    Device(String),
    /// The model computed something unusable (a row of logits that is all NaN).
    #[error("numerics: {0}")]
    Numerics(String),
}

/// Runs `f`, turning a panic into the error `wrap` makes of its message: a worker or copy
/// thread that panics (a bug) then answers with an error instead of leaving the engine
/// waiting for a reply that never comes.
pub(crate) fn no_panic<T>(
    f: impl FnOnce() -> Result<T>,
    wrap: impl FnOnce(String) -> Error,
) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Err(wrap(format!("panicked: {msg}")))
    })
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_the_wrapped_error() {
        let wrap = |m: String| Error::Worker { worker: 3, msg: m };
        let e = no_panic::<()>(|| panic!("index out of range"), wrap).unwrap_err();
        assert_eq!(e.to_string(), "worker 3: panicked: index out of range");
        let n = 7;
        let e = no_panic::<()>(|| panic!("formatted {n}"), wrap).unwrap_err();
        assert_eq!(e.to_string(), "worker 3: panicked: formatted 7");
        assert_eq!(no_panic(|| Ok(5), wrap).unwrap(), 5);
        assert!(matches!(
            no_panic::<()>(|| Err(Error::Comm("x".into())), wrap),
            Err(Error::Comm(_))
        ));
    }
}
