//! The library's error type: structured fields (what, the numbers, the limit) so that the
//! CLI can print one readable line and tests can match on the variant.

use thiserror::Error;

/// Everything that can go wrong in the library. Never a panic on bad input or on the device path.
#[derive(Debug, Error)]
pub enum FisherError {
    /// The caller asked for something malformed (shape, form, option).
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// A request that names its own setting (a `fisher` flag, e.g. "--damping must be
    /// positive for the implicit form"): shown as is, without a prefix; a usage error.
    #[error("{0}")]
    Request(String),

    /// A gradient/input matrix contained NaN or ±Inf.
    #[error("non-finite value {value} in {what} at row {row}, column {col}")]
    NonFinite {
        /// Which matrix (e.g. "gradients").
        what: String,
        /// Zero-based row (sample) of the first offending value.
        row: usize,
        /// Zero-based column of the first offending value.
        col: usize,
        /// The value itself (NaN, inf or -inf).
        value: f32,
    },

    /// A matrix with zero rows or columns.
    #[error("{what} is empty ({rows}x{cols})")]
    Empty {
        /// Which matrix.
        what: String,
        /// Its rows.
        rows: usize,
        /// Its columns.
        cols: usize,
    },

    /// A request that cannot fit the adapter's limits or the memory budget.
    #[error("{what} needs {needed} bytes but the limit is {limit} bytes ({which})")]
    DoesNotFit {
        /// What we tried to place.
        what: String,
        /// Bytes needed.
        needed: u64,
        /// Bytes allowed.
        limit: u64,
        /// Which limit (e.g. "max_storage_buffer_binding_size of llvmpipe").
        which: String,
    },

    /// No adapter matched the request (or none exists) and the CPU fallback was not allowed.
    #[error("no GPU adapter: {0}")]
    NoAdapter(String),

    /// The device could not be created.
    #[error("device request failed on {adapter}: {message}")]
    DeviceRequest {
        /// Adapter name.
        adapter: String,
        /// wgpu's message.
        message: String,
    },

    /// A wgpu validation / out-of-memory / internal error caught by an error scope.
    #[error("GPU error during {stage}: {message}")]
    Gpu {
        /// What the host was doing (kernel or transfer name).
        stage: String,
        /// wgpu's message.
        message: String,
    },

    /// Reading or writing a file failed.
    #[error("{path}: {message}")]
    Io {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
}

impl FisherError {
    /// A failure reading or writing `path` ([`FisherError::Io`]), e.g. "cannot write: …".
    pub fn io(path: &std::path::Path, message: impl Into<String>) -> Self {
        FisherError::Io { path: path.display().to_string(), message: message.into() }
    }
}

/// Result alias used throughout the crate.
pub type Result<T, E = FisherError> = std::result::Result<T, E>;
