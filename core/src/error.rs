//! The one error type of Sluice's storage boundary.

/// A boxed error from a lower layer (a file system, redb, an S3 client).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Result alias used throughout `sluice-core` and the backends.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong at the state-backend and checkpoint-storage
/// boundary. Each variant names the thing at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The named object (state file, checkpoint, metadata) does not exist.
    #[error("not found: {what}")]
    NotFound {
        /// What was looked for, e.g. `checkpoint 7` or `chk-7/sum-0.kst`.
        what: String,
    },
    /// A create-if-absent write found the object already there.
    #[error("already exists: {what}")]
    AlreadyExists {
        /// The object that already exists.
        what: String,
    },
    /// Data read back failed validation (checksum, magic, truncated, bad index).
    #[error("corrupt data in {path}: {reason}")]
    Corrupt {
        /// The file or object that is corrupt.
        path: String,
        /// What check failed.
        reason: String,
    },
    /// The data is well-formed but was written by an incompatible version or
    /// with a different layout (format version, max parallelism, state type).
    #[error("incompatible {what}: {reason}")]
    Incompatible {
        /// The thing that is incompatible.
        what: String,
        /// Why, and what to do about it.
        reason: String,
    },
    /// The caller passed an argument that cannot be honoured.
    #[error("invalid argument {what}: {reason}")]
    InvalidArgument {
        /// The argument at fault.
        what: String,
        /// Why it is invalid.
        reason: String,
    },
    /// The storage system failed; the operation certainly did not take effect.
    #[error("storage error on {what}: {source}")]
    Storage {
        /// The object or operation that failed.
        what: String,
        /// The underlying error.
        #[source]
        source: BoxError,
    },
    /// The storage system failed in a way that leaves it unknown whether the
    /// operation took effect (for example a timed-out commit). Read back
    /// before deciding.
    #[error("indeterminate outcome of {what}: {source}")]
    Indeterminate {
        /// The object or operation whose outcome is unknown.
        what: String,
        /// The underlying error.
        #[source]
        source: BoxError,
    },
    /// Encoding or decoding a value failed.
    #[error("serialization of {what} failed: {reason}")]
    Serialization {
        /// What was being encoded or decoded.
        what: String,
        /// The codec's message.
        reason: String,
    },
}

impl Error {
    /// Shorthand for [`Error::Corrupt`].
    pub fn corrupt(path: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Corrupt {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// Shorthand for [`Error::NotFound`].
    pub fn not_found(what: impl Into<String>) -> Self {
        Error::NotFound { what: what.into() }
    }

    /// Shorthand for [`Error::Storage`].
    pub fn storage(what: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Storage {
            what: what.into(),
            source: source.into(),
        }
    }

    /// True for [`Error::Corrupt`].
    pub fn is_corrupt(&self) -> bool {
        matches!(self, Error::Corrupt { .. })
    }

    /// True for [`Error::NotFound`].
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound { .. })
    }
}
