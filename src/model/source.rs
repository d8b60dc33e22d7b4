//! What the network paths read: a network's data, whole in memory or on disk, a micro-batch
//! at a time.
//!
//! Every path that walks the samples in micro-batches (the CPU and GPU Fisher, F·v, the
//! operators behind `report` and `action`) asks a [`DataSource`] for the inputs and targets
//! of samples s0 .. s0 + m and nothing else, so the same code runs on a [`Dataset`] in
//! memory (tests, synthetic problems, the demo, graph models), where the rows are views, and
//! on an [`NpyDataset`] of `.npy` files, where they are read from disk per micro-batch and
//! host memory does not grow with N.
//!
//! Paths that need every sample at once — the f64 reference of `--verify`, training — take
//! a [`Dataset`], which [`DataSource::to_dataset`] gives (borrowed when the data is already
//! in memory, read whole when it is on disk).

use std::borrow::Cow;

use ndarray::{CowArray, Ix2};

use super::{Dataset, Likelihood, Mlp};
#[cfg(doc)]
use super::NpyDataset;
use crate::error::{FisherError, Result};

/// The targets of one micro-batch (samples s0 .. s0 + m, indexed from 0): borrowed from
/// data in memory, read from disk otherwise.
#[derive(Debug)]
pub enum TargetRows<'a> {
    /// Class indices (categorical likelihood), m of them.
    Classes(Cow<'a, [u32]>),
    /// Real targets (Gaussian likelihood), m × k.
    Values(CowArray<'a, f32, Ix2>),
}

/// A network's data as the micro-batched paths read it (see the [module](self) docs).
///
/// Implementations have checked their data when made (finite inputs and targets, as many
/// targets as inputs, valid labels); [`DataSource::validate`] checks it against a model.
pub trait DataSource: Sync + std::fmt::Debug {
    /// Number of samples, N.
    fn len(&self) -> usize;

    /// Whether there are no samples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Values per sample, d.
    fn input_dim(&self) -> usize;

    /// The likelihood the targets imply: class labels → categorical, values → Gaussian.
    fn likelihood(&self) -> Likelihood;

    /// The inputs of samples s0 .. s0 + m, m × d. Errors when the range is past N or the
    /// data cannot be read (a file changed or vanished under the run).
    fn inputs(&self, s0: usize, m: usize) -> Result<CowArray<'_, f32, Ix2>>;

    /// The targets of samples s0 .. s0 + m. Errors as [`DataSource::inputs`].
    fn targets(&self, s0: usize, m: usize) -> Result<TargetRows<'_>>;

    /// Checks the data against `mlp` and `likelihood`: input width = the model's input
    /// width, targets of the likelihood's kind, class labels below the number of outputs,
    /// Gaussian target width = the number of outputs (see [`Dataset::validate`]).
    fn validate(&self, mlp: &Mlp, likelihood: Likelihood) -> Result<()>;

    /// The whole data in memory, for the paths that need every sample at once (the f64
    /// reference): borrowed from a [`Dataset`], read whole from an [`NpyDataset`].
    fn to_dataset(&self) -> Result<Cow<'_, Dataset>>;
}

/// Refuses samples s0 .. s0 + m of data holding `n`.
pub(crate) fn check_rows(s0: usize, m: usize, n: usize) -> Result<()> {
    if s0.checked_add(m).is_none_or(|end| end > n) {
        return Err(FisherError::InvalidInput(format!(
            "samples {s0}..{} asked of data holding {n}",
            s0.saturating_add(m)
        )));
    }
    Ok(())
}
