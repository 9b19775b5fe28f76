//! The one error type of the configuration boundary, shared by every crate that reads a
//! configuration file (the coordinator's three files, the client's, the agent's): an operator
//! always reads `file: key: reason`.

/// A configuration file could not be used. Every variant names the file; `Invalid` and `Syntax`
/// also name the key (a dotted path such as `hosts[2].transport.agent.address`) and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read from disk.
    #[error("{file}: cannot read: {reason}")]
    Read {
        /// The file, as given to the loader.
        file: String,
        /// What the operating system said.
        reason: String,
    },
    /// The file is not valid TOML. `key` is the position (`line L, column C`) because a broken
    /// document has no reliable key path.
    #[error("{file}: {key}: invalid TOML: {reason}")]
    Syntax {
        /// The file label.
        file: String,
        /// Where the parser stopped.
        key: String,
        /// What the parser expected.
        reason: String,
    },
    /// A key is missing, unknown, of the wrong type, or holds a value that is not allowed.
    #[error("{file}: {key}: {reason}")]
    Invalid {
        /// The file label.
        file: String,
        /// Dotted path of the offending key.
        key: String,
        /// Why it is wrong, in words an operator can act on.
        reason: String,
    },
}

impl ConfigError {
    /// Builds an [`ConfigError::Invalid`].
    pub fn invalid(file: &str, key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            file: file.to_owned(),
            key: key.into(),
            reason: reason.into(),
        }
    }

    /// The file the error is about.
    pub fn file(&self) -> &str {
        match self {
            ConfigError::Read { file, .. }
            | ConfigError::Syntax { file, .. }
            | ConfigError::Invalid { file, .. } => file,
        }
    }

    /// The offending key (empty for [`ConfigError::Read`]).
    pub fn key(&self) -> &str {
        match self {
            ConfigError::Read { .. } => "",
            ConfigError::Syntax { key, .. } | ConfigError::Invalid { key, .. } => key,
        }
    }

    /// Why the file was refused.
    pub fn reason(&self) -> &str {
        match self {
            ConfigError::Read { reason, .. }
            | ConfigError::Syntax { reason, .. }
            | ConfigError::Invalid { reason, .. } => reason,
        }
    }
}
