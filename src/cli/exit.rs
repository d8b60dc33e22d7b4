//! Exit codes and the one-line error report.

use fisher_engine::pipeline::RunError;
use fisher_engine::FisherError;

/// The process exit codes `fisher` documents (also printed by `--help`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 0: success.
    Success = 0,
    /// 1: a runtime failure: GPU/device error, a request beyond the adapter's limits, a
    /// result outside the f32 tolerance, a bug.
    Failure = 1,
    /// 2: usage or bad input: flags, unreadable or malformed files, NaN/Inf, dtype, shapes.
    Usage = 2,
    /// 3: `--backend gpu` (or `--adapter`) was asked for and no matching GPU adapter exists.
    NoGpu = 3,
}

/// A mistake in the flags themselves, found while turning them into a configuration.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Builds a usage error (exit code 2) from a message.
pub fn usage(message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UsageError(message.into()))
}

/// A library pipeline's error as the CLI reports it: the library error with what the
/// pipeline was doing as context, a form that does not fit as `--form ... does not fit ...`,
/// a result beyond the host-memory limit as a usage error (exit 2; `compute` words it with
/// its flags before this).
pub fn run_error(err: RunError) -> anyhow::Error {
    match err {
        RunError::Fisher(e) => e.into(),
        RunError::Context { context, source } => anyhow::Error::new(source).context(context),
        RunError::FormDoesNotFit { form, what, source } => {
            anyhow::Error::new(source).context(format!("--form {form} does not fit {what}"))
        }
        RunError::ResultTooLarge(e) => usage(e.to_string()),
        RunError::Verification(e) => e.into(),
    }
}

/// The exit code for an error: decided by the first library error or usage error in its
/// cause chain (the context the CLI adds on top never changes the class).
pub fn classify(err: &anyhow::Error) -> Exit {
    for cause in err.chain() {
        if cause.is::<UsageError>() {
            return Exit::Usage;
        }
        if let Some(e) = cause.downcast_ref::<super::mpi::RankError>() {
            return match e.code {
                0 | 1 => Exit::Failure,
                2 => Exit::Usage,
                _ => Exit::NoGpu,
            };
        }
        if let Some(e) = cause.downcast_ref::<FisherError>() {
            return match e {
                FisherError::InvalidInput(_)
                | FisherError::Request(_)
                | FisherError::NonFinite { .. }
                | FisherError::Empty { .. }
                | FisherError::Io { .. } => Exit::Usage,
                FisherError::NoAdapter(_) => Exit::NoGpu,
                FisherError::DoesNotFit { .. }
                | FisherError::DeviceRequest { .. }
                | FisherError::Gpu { .. } => Exit::Failure,
            };
        }
    }
    Exit::Failure
}

/// `<cause>: <cause>: ...` on one line. Driver and wgpu messages can span several lines
/// (validation errors are indented reports); they are folded so that the report stays one
/// line that scripts can grep.
pub fn one_line(err: &anyhow::Error) -> String {
    format!("{err:#}").split_whitespace().collect::<Vec<_>>().join(" ")
}
