//! The error type of the QMP client.

/// Everything that can go wrong talking QMP.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// A socket-level failure (connect, read, write). The message names the
    /// socket path where it is known.
    #[error("QMP I/O error: {0}")]
    Io(#[from] std::io::Error),

    /// The peer did not speak QMP as expected: bad JSON, an unexpected
    /// greeting, or a reply that does not decode into the expected type.
    #[error("QMP protocol error: {0}")]
    Protocol(String),

    /// QEMU answered the command with an error reply.
    #[error("QMP command '{command}' failed: {class}: {desc}")]
    Command {
        /// The command that failed, e.g. `migrate`.
        command: String,
        /// QMP's error class, e.g. `GenericError`, `CommandNotFound`.
        class: String,
        /// QEMU's human-readable description.
        desc: String,
    },

    /// The connection closed (QEMU exited, or the socket broke) before a
    /// reply or event arrived.
    #[error("QMP connection closed")]
    Disconnected,

    /// A deadline passed; the string says what was being waited for.
    #[error("timed out waiting for {0}")]
    Timeout(String),
}

impl QmpError {
    /// The QMP error class if this is a command error reply.
    pub fn command_class(&self) -> Option<&str> {
        match self {
            QmpError::Command { class, .. } => Some(class),
            _ => None,
        }
    }
}

/// Wraps an I/O error with a sentence of context, keeping its kind.
pub(crate) fn io_context(err: std::io::Error, context: impl std::fmt::Display) -> QmpError {
    QmpError::Io(std::io::Error::new(err.kind(), format!("{context}: {err}")))
}
