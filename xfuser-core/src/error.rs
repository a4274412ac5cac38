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

    /// A tensor operation failed; the message is candle's, on one line and without the
    /// backtrace candle attaches when RUST_BACKTRACE is set.
    #[error("{}", candle_message(.0))]
    Candle(candle_core::Error),
}

impl From<candle_core::Error> for Error {
    fn from(err: candle_core::Error) -> Self {
        Error::Candle(err)
    }
}

/// candle's error message without backtraces, its context and path wrappers joined on one
/// line (they display across several lines).
pub fn candle_message(err: &candle_core::Error) -> String {
    use candle_core::Error as C;
    match err {
        C::WithBacktrace { inner, .. } => candle_message(inner),
        C::Context { inner, context } => format!("{context}: {}", candle_message(inner)),
        C::WithPath { inner, path } => format!("{}: {}", path.display(), candle_message(inner)),
        other => other
            .to_string()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(": "),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candle_errors_read_on_one_line_without_backtrace() {
        let inner = candle_core::Error::Msg("cannot find tensor x.weight".into());
        let wrapped = candle_core::Error::WithBacktrace {
            inner: Box::new(inner),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        }
        .context("loading the transformer");
        let message = Error::from(wrapped).to_string();
        assert_eq!(
            message,
            "loading the transformer: cannot find tensor x.weight"
        );
    }
}
