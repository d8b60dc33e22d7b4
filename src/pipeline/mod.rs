//! The commands' work as library calls: a request in, a typed outcome out.
//!
//! * [`compute`]: the Fisher information of an MLP on data ([`compute::ComputeRequest`]):
//!   load or build the model and the data, refuse a result beyond the host-memory limit
//!   before computing, save the synthetic files, open the device ([`crate::device::open`]),
//!   compute, verify against the f64 reference ([`crate::verify`]), write
//!   ([`crate::io::fisher_file`]).
//! * [`reduce`]: per-sample gradients to a Fisher form ([`reduce::ReduceRequest`]), streamed
//!   from a `.npy` file in chunks, and the built-in comparison of the compute paths
//!   ([`reduce::compare`], through [`crate::compare`]).
//!
//! Every check of the caller's input runs before the output file is created, and outputs are
//! written atomically: a failed run leaves no output behind. The `fisher` binary only parses
//! flags into a request and formats the outcome.
//!
//! ```no_run
//! use fisher_engine::pipeline::compute::{self, ComputeRequest};
//! use fisher_engine::pipeline::Source;
//! use fisher_engine::fisher::{NetForm, Variant};
//! use fisher_engine::model::{ActivationSpec, Likelihood};
//! use fisher_engine::Backend;
//! let source = Source::Synthetic { widths: vec![8, 6, 3], samples: 50, seed: 0 };
//! let mut request = ComputeRequest::new(source, ActivationSpec::parse("tanh")?, Backend::Cpu);
//! request.form = Some(NetForm::Diagonal);
//! request.out = Some("F.safetensors".into());
//! request.verify = true;
//! let outcome = compute::run(&request)?;
//! println!("tr F = {:?}", outcome.trace);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::path::PathBuf;

use crate::error::FisherError;
use crate::fisher::NetForm;
use crate::model::{problem, ActivationSpec, DataSource, Likelihood, Mlp, NpyDataset};
use crate::verify::VerificationFailed;

pub mod compute;
pub mod graph;
pub mod merge;
pub mod reduce;

/// Why a pipeline stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A library error, as it came.
    #[error(transparent)]
    Fisher(#[from] FisherError),
    /// A library error while doing `context` (e.g. "computing the f64 reference").
    #[error("{context}")]
    Context {
        /// What the pipeline was doing.
        context: String,
        /// The error.
        #[source]
        source: FisherError,
    },
    /// The requested form does not fit the gradients (a block partition that does not sum
    /// to P, …).
    #[error("form {form} does not fit {what}")]
    FormDoesNotFit {
        /// The form, as it is spelled.
        form: String,
        /// The gradients (a file name, or "synthetic gradients").
        what: String,
        /// Why.
        #[source]
        source: FisherError,
    },
    /// The result would exceed the host-memory limit; refused before computing.
    #[error(transparent)]
    ResultTooLarge(#[from] ResultTooLarge),
    /// `verify` found a result outside its tolerance; nothing was written.
    #[error(transparent)]
    Verification(#[from] VerificationFailed),
}

impl RunError {
    /// Wraps a library error with what was being done.
    pub(crate) fn context(context: impl Into<String>) -> impl FnOnce(FisherError) -> RunError {
        let context = context.into();
        move |source| RunError::Context { context, source }
    }
}

/// A network result larger than the host-memory limit ([`compute::ComputeRequest::max_result_bytes`]).
#[derive(Debug, Clone, thiserror::Error)]
#[error("the {} result holds {what} values ({needed} bytes{}) in host memory, beyond the limit of {limit} bytes",
    .form.name(), if *.with_reference { " with its f64 reference" } else { "" })]
pub struct ResultTooLarge {
    /// The form.
    pub form: NetForm,
    /// The count, in words: `P×P = 75×75`, `Σ_l P_l²`, `N·R×P = 50·3×75`.
    pub what: String,
    /// Bytes needed (the f32 result, plus the f64 reference when verifying).
    pub needed: u128,
    /// Whether `needed` includes the f64 reference.
    pub with_reference: bool,
    /// The limit in bytes.
    pub limit: u128,
    /// Gradient rows per sample.
    pub rows_per_sample: usize,
}

/// Where a network and its data come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Files.
    Files {
        /// The state-dict safetensors file.
        weights: PathBuf,
        /// Inputs (.npy).
        inputs: PathBuf,
        /// Labels or targets (.npy).
        labels: PathBuf,
    },
    /// Built in memory by [`problem::synthetic_problem`].
    Synthetic {
        /// Layer widths: input, hidden..., output.
        widths: Vec<usize>,
        /// N.
        samples: usize,
        /// Seed of the weights and the data.
        seed: u64,
    },
}

/// Loads the model and the data from files, or builds the synthetic problem, and checks them
/// against each other (the files at fault are named).
///
/// Data from files stays on disk ([`NpyDataset`]: checked here in one streamed pass, then
/// read a micro-batch at a time), so host memory does not grow with N; a synthetic
/// problem's data is in memory.
pub fn load_problem(source: &Source, activation: &ActivationSpec, likelihood: Likelihood) -> Result<(Mlp, Box<dyn DataSource>), RunError> {
    match source {
        Source::Files { weights, inputs, labels } => {
            let mlp = Mlp::from_safetensors(weights, activation)?;
            let data = NpyDataset::open(inputs, labels, likelihood)?;
            data.validate(&mlp, likelihood).map_err(RunError::context(format!(
                "{} and {} do not fit the model {}",
                inputs.display(),
                labels.display(),
                weights.display()
            )))?;
            Ok((mlp, Box::new(data)))
        }
        Source::Synthetic { widths, samples, seed } => {
            let (mlp, data) = problem::synthetic_problem(widths, *samples, *seed, activation, likelihood)
                .map_err(RunError::context("building the synthetic model"))?;
            Ok((mlp, Box::new(data)))
        }
    }
}

/// Wall-clock seconds per stage of a run.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Seconds {
    /// Reading and checking (or generating) the inputs. While a reduction streams, reading
    /// overlaps computing and this counts only the time spent waiting for input.
    pub load: f64,
    /// Writing the synthetic files (`compute` only; absent from a reduction's JSON).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub save: Option<f64>,
    /// Choosing an adapter, creating the device and building the kernels.
    pub setup: f64,
    /// The Fisher computation, including transfers.
    pub compute: f64,
    /// The f64 reference and the comparison (0 without verification).
    pub verify: f64,
    /// Writing the output file (0 without one).
    pub write: f64,
}

/// Seconds since `start`.
fn since(start: std::time::Instant) -> f64 {
    start.elapsed().as_secs_f64()
}

/// The size of `path` in bytes, 0 when it cannot be read.
fn file_size(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// The GPU options with the host result limit (`--max-result-gib`) that the backends enforce
/// on every form as they allocate (the pipelines check their own sizes first, with the
/// flag's wording; this is the backstop for what they do not foresee).
pub(crate) fn with_limit(gpu: &crate::backend::gpu::GpuOptions, max_result_bytes: u128) -> crate::backend::gpu::GpuOptions {
    crate::backend::gpu::GpuOptions {
        max_result_bytes: Some(u64::try_from(max_result_bytes).unwrap_or(u64::MAX)),
        ..gpu.clone()
    }
}


/// The output file of a result put piece by piece
/// ([`crate::io::safetensors::SafetensorsStream`]), with the trace taken on the way.
pub(crate) struct TracedStream {
    pub stream: crate::io::safetensors::SafetensorsStream,
    pub trace: crate::fisher::TraceOf,
}

impl crate::fisher::ResultSink for TracedStream {
    fn put(&mut self, tensor: usize, at: usize, values: &[f32]) -> crate::Result<()> {
        self.stream.put(tensor, at, values)?;
        self.trace.observe(tensor, at, values);
        Ok(())
    }
}
