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
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
