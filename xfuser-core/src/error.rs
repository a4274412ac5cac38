//! The library error type. Every variant that comes from user input names the file and the
//! field or tensor involved, so a message alone tells the user what to fix.

use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A JSON configuration file that is not what the model expects.
    #[error("{}: field `{field}`: {message}", file.display())]
    Config {
        file: PathBuf,
        field: String,
        message: String,
    },

    /// A weights file that cannot be read, or lacks a tensor, or holds one of the wrong shape.
    #[error("{}: {message}", file.display())]
    Weights { file: PathBuf, message: String },

    /// A `_class_name` that nothing registered.
    #[error("unknown {kind} class `{name}`; registered {kind} classes: {registered}")]
    UnknownClass {
        kind: &'static str,
        name: String,
        registered: String,
    },

    /// A value given by the caller that is out of range or inconsistent.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// A feature that a configuration asks for and this build does not have.
    #[error("not supported: {0}")]
    Unsupported(String),

    /// A communication op that cannot complete: a peer failed or left the run, the ranks
    /// disagree on the op or its tensors, or the group is broken by an earlier failure.
    #[error("{op} on process group {group}: {message}")]
    Comm {
        group: String,
        op: &'static str,
        message: String,
    },

    /// A communication op whose peers did not all join within the timeout.
    #[error("{op} on process group {group} timed out after {timeout:?}: {message}")]
    CommTimeout {
        group: String,
        op: &'static str,
        timeout: Duration,
        message: String,
    },

    /// A rank's closure panicked; the message is the panic's.
    #[error("rank {rank} panicked: {message}")]
    RankPanicked { rank: usize, message: String },

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Error::InvalidArgument(message.into())
    }
}
