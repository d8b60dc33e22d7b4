//! The backend abstraction, at the level of stages rather than tensor ops.
//!
//! A Fisher reduction is *accumulate* (stream chunks of per-sample gradients into partial
//! sums) then *finalize* (divide by N, mirror, read back). Both the GPU and the fast CPU path
//! implement exactly these stages, which keeps the trait small enough to implement twice and
//! to test the two against each other and against the f64 reference.

pub mod cpu;
pub mod gpu;
pub(crate) mod plan;

use ndarray::{Array2, ArrayView1, ArrayView2};

use crate::error::Result;
use crate::fisher::{FisherMatrix, Form};
use crate::model::{DataSource, Mlp};
use crate::fisher::{Fvp, NetFisher, NetForm, NetSums, ResultSink, Variant};

/// Default limit of a result held in host memory, bytes: 2 GiB, the default of the CLI's
/// `--max-result-gib`. Backends refuse ([`crate::FisherError::DoesNotFit`]) a result above
/// their limit before allocating it ([`cpu::CpuBackend::with_result_limit`],
/// [`gpu::GpuOptions::max_result_bytes`]).
pub const DEFAULT_RESULT_LIMIT: u64 = 2 << 30;

/// A compute path able to reduce per-sample gradients to every Fisher form.
pub trait FisherBackend {
    /// Human-readable description, e.g. `gpu: llvmpipe (LLVM 15.0.6, 256 bits) [Vulkan, Cpu]`.
    fn label(&self) -> String;

    /// Starts a streaming reduction of `params`-column gradients to `form`.
    ///
    /// Memory does not grow with the number of samples pushed (except for
    /// [`Form::SampleNorms`], whose result has one value per sample).
    /// [`Form::Gram`] is not streamable (it pairs every sample with every other) and is
    /// refused here; use [`FisherBackend::gram`].
    fn accumulator<'a>(&'a self, form: &Form, params: usize) -> Result<Box<dyn Accumulator + 'a>>;

    /// K = G Gᵀ / N for the whole matrix `grads` (N×P).
    fn gram(&self, grads: ArrayView2<'_, f32>) -> Result<Array2<f32>>;

    /// The Fisher of a network on a dataset: per-sample quantities (forward, output rows,
    /// backward) and their reduction to `form`, streamed in micro-batches. Inputs have been
    /// validated by the caller ([`crate::Engine::fisher`]).
    fn network_fisher(&self, mlp: &Mlp, data: &dyn DataSource, variant: Variant, form: NetForm) -> Result<NetFisher>;

    /// [`FisherBackend::network_fisher`] put into `sink` (tensors in the order of
    /// [`crate::fisher::sink`]) instead of returned, for the forms that sum over samples
    /// (full, diag, layer, kfac; the per-sample forms are refused). A backend that computes
    /// the sums in passes puts each band as its pass ends, so that with a sink that writes
    /// to a file the result is never whole in memory: the CPU backend does, beyond its
    /// accumulator budget ([`cpu::CpuBackend::with_accumulator_bytes`]). This default
    /// computes the result whole and puts it.
    fn network_fisher_into(&self, mlp: &Mlp, data: &dyn DataSource, variant: Variant, form: NetForm, sink: &mut dyn ResultSink) -> Result<()> {
        if matches!(form, NetForm::Grads | NetForm::Norms) {
            return Err(crate::FisherError::InvalidInput(format!("--form {form} is per sample, not a sum to write in pieces")));
        }
        self.network_fisher(mlp, data, variant, form)?.put_into(sink)
    }

    /// The sums of a network's Fisher of `form` over the samples `range` of `data`, with
    /// blocks of `block` samples counted from sample 0: what one shard of a run computes
    /// (see [`crate::fisher::sums`] for the order that makes the CPU's shards exact). This
    /// default finishes the range with [`FisherBackend::network_fisher_over`] and multiplies
    /// back by its count, so its shards merge within the backend's tolerance, not bit for bit.
    fn network_sums(
        &self,
        mlp: &Mlp,
        data: &dyn DataSource,
        variant: Variant,
        form: NetForm,
        range: std::ops::Range<usize>,
        block: usize,
    ) -> Result<NetSums> {
        let _ = block;
        let layers = crate::fisher::SumLayer::of(mlp);
        crate::fisher::sums::part_layout(form, &layers)?;
        if range.is_empty() {
            return NetSums::zero(form, layers);
        }
        let samples = range.len();
        let result = self.network_fisher_over(mlp, data, variant, form, range)?;
        NetSums::from_fisher(&result, layers, samples)
    }

    /// The network Fisher of `form` over the samples `range` of `data` only (divided by
    /// their count); Monte Carlo draws keep the samples' indices in the whole data.
    fn network_fisher_over(
        &self,
        mlp: &Mlp,
        data: &dyn DataSource,
        variant: Variant,
        form: NetForm,
        range: std::ops::Range<usize>,
    ) -> Result<NetFisher>;

    /// The implicit Fisher–vector product F·v (when `product`) and vᵀFv of a network,
    /// without forming F: forward-mode J v, Λ J v at the output, and one backward pass,
    /// streamed in micro-batches. `v` is in θ order (PyTorch `named_parameters()`).
    fn network_fvp(&self, mlp: &Mlp, data: &dyn DataSource, variant: Variant, v: ArrayView1<'_, f32>, product: bool) -> Result<Fvp>;

    /// The implicit Fisher of a network bound to its data, for many products F·V over blocks
    /// of directions (see [`NetworkOperator`]); the CPU keeps the forward pass between
    /// products where it fits its cache budget.
    fn network_operator<'a>(&'a self, mlp: &'a Mlp, data: &'a dyn DataSource, variant: Variant) -> Result<Box<dyn NetworkOperator + 'a>>;

    /// The output-space twin K = BBᵀ/N of a network's Fisher F = BᵀB/N (B: the N·R gradient
    /// rows), which has the same non-zero eigenvalues, for top-k eigenvalues when N·R < P;
    /// `None` where the backend has no such path or it would hold more than `budget` bytes.
    fn network_gram_operator<'a>(&'a self, mlp: &'a Mlp, data: &'a dyn DataSource, variant: Variant, budget: u64) -> Result<Option<Box<dyn NetworkOperator + 'a>>> {
        let _ = (mlp, data, variant, budget);
        Ok(None)
    }

    /// An executor of a graph network's primitive program on this backend (see
    /// [`crate::graph::exec::ProgramExec`]), with its shared values (parameters, constants,
    /// sparse maps) in place.
    fn program_exec(&self, program: std::sync::Arc<crate::graph::prim::Program>) -> Result<Box<dyn crate::graph::exec::ProgramExec + '_>>;

    /// The largest result this backend holds in host memory, bytes.
    fn result_limit(&self) -> u64;

    /// Host memory for the running sums of a full Fisher or of layer blocks summed on the
    /// host (the graph path on any backend), bytes; beyond it they are computed in passes
    /// ([`cpu::CpuBackend::with_accumulator_bytes`]).
    fn accumulator_bytes(&self) -> u64 {
        cpu::DEFAULT_ACCUMULATOR_BYTES
    }
}

/// F·V and the quadratic forms of a block of k directions ([`NetworkOperator::apply`]).
#[derive(Debug, Clone)]
pub struct BlockFvp {
    /// F·vⱼ as row j (k × P, θ order); `None` when only the quadratic forms were asked for.
    pub products: Option<Array2<f32>>,
    /// vⱼᵀ F vⱼ, accumulated in f64.
    pub quadratics: Vec<f64>,
}

/// A network's implicit Fisher on its data, bound to a backend for repeated products
/// ([`FisherBackend::network_operator`]): Lanczos, SLQ probes and the action apply F to
/// blocks of directions, and a backend may keep state (the forward pass) between calls.
pub trait NetworkOperator {
    /// The dimension of the vectors: P for F, N·R for the output-space Gram operator
    /// ([`FisherBackend::network_gram_operator`]).
    fn dim(&self) -> usize;

    /// F·V (when `product`) and vⱼᵀFvⱼ for the k rows vⱼ of `v` (k × P, θ order, finite).
    fn apply(&mut self, v: ArrayView2<'_, f32>, product: bool) -> Result<BlockFvp>;
}

/// A [`NetworkOperator`] that runs [`FisherBackend::network_fvp`] once per direction: for
/// backends without a blocked path (the GPU path recomputes its forward pass per product).
pub(crate) struct PerDirection<'a, B: FisherBackend + ?Sized> {
    pub backend: &'a B,
    pub mlp: &'a Mlp,
    pub data: &'a dyn DataSource,
    pub variant: Variant,
}

impl<B: FisherBackend + ?Sized> NetworkOperator for PerDirection<'_, B> {
    fn dim(&self) -> usize {
        self.mlp.num_params()
    }

    fn apply(&mut self, v: ArrayView2<'_, f32>, product: bool) -> Result<BlockFvp> {
        let (k, p) = v.dim();
        let mut products = product.then(|| Array2::<f32>::zeros((k, p)));
        let mut quadratics = Vec::with_capacity(k);
        for (j, row) in v.outer_iter().enumerate() {
            let fvp = self.backend.network_fvp(self.mlp, self.data, self.variant, row, product)?;
            if let (Some(out), Some(fv)) = (products.as_mut(), fvp.product) {
                out.row_mut(j).assign(&fv);
            }
            quadratics.push(fvp.quadratic);
        }
        Ok(BlockFvp { products, quadratics })
    }
}

/// A streaming reduction in progress.
pub trait Accumulator {
    /// Adds the per-sample gradients of `chunk.nrows()` more samples (rows of `chunk`).
    /// The chunk may have any number of rows; the backend splits it as its limits require.
    fn push(&mut self, chunk: ArrayView2<'_, f32>) -> Result<()>;

    /// Number of samples pushed so far.
    fn samples(&self) -> usize;

    /// Divides by the number of samples and returns the finished form.
    fn finish(self: Box<Self>) -> Result<FisherMatrix>;

    /// Passes over the samples this reduction needs. It is 1 unless the accumulators of a
    /// full or block-diagonal result do not fit the backend's memory budget at once; the
    /// output is then cut into panels, and each pass sums the samples into one group of
    /// panels ("full F beyond one buffer"). A caller that cannot stream its samples again
    /// must check this before pushing.
    fn passes(&self) -> usize {
        1
    }

    /// Ends the current pass and starts the next: the caller pushes every sample again, in
    /// the same order. An error after the last pass, or when this pass did not see as many
    /// samples as the first.
    fn next_pass(&mut self) -> Result<()> {
        Err(crate::FisherError::InvalidInput("this reduction has a single pass over the samples".into()))
    }

    /// [`Accumulator::next_pass`] for a result written to a sink: the band of rows of a full
    /// F that the ending pass summed is put into tensor 0 of `sink` (F, P×P row-major)
    /// instead of being kept, so that with [`Accumulator::finish_into`] the result is never
    /// whole in memory (the CPU backend does this; `fisher reduce --form full` writes the
    /// bands into its output file). This default keeps the band, which `finish_into` puts.
    fn next_pass_into(&mut self, sink: &mut dyn ResultSink) -> Result<()> {
        let _ = sink;
        self.next_pass()
    }

    /// [`Accumulator::finish`] put into `sink` (see [`FisherMatrix::put_into`] for the
    /// tensors): after [`Accumulator::next_pass_into`], only the last band is left to put.
    fn finish_into(self: Box<Self>, sink: &mut dyn ResultSink) -> Result<()> {
        self.finish()?.put_into(sink)
    }
}

/// Groups consecutive items of `sizes` (bytes each) into passes of at most `budget` bytes,
/// one item at least per pass: the greedy plan of a reduction whose output panels do not
/// fit in memory at once. Returns index ranges into `sizes`.
pub(crate) fn plan_passes(sizes: &[u64], budget: u64) -> Vec<std::ops::Range<usize>> {
    let mut passes = Vec::new();
    let (mut start, mut used) = (0usize, 0u64);
    for (i, &size) in sizes.iter().enumerate() {
        if i > start && used.saturating_add(size) > budget {
            passes.push(start..i);
            (start, used) = (i, 0);
        }
        used = used.saturating_add(size);
    }
    if start < sizes.len() {
        passes.push(start..sizes.len());
    }
    passes
}

#[cfg(test)]
mod tests {
    use super::plan_passes;

    #[test]
    fn passes_are_greedy_contiguous_and_never_empty() {
        assert_eq!(plan_passes(&[4, 4, 4, 4], 8), vec![0..2, 2..4]);
        assert_eq!(plan_passes(&[4, 4, 4, 4], 100), vec![0..4]);
        // An item above the budget still gets a pass of its own.
        assert_eq!(plan_passes(&[3, 10, 3, 3], 6), vec![0..1, 1..2, 2..4]);
        assert_eq!(plan_passes(&[u64::MAX, u64::MAX], 1), vec![0..1, 1..2]);
        assert!(plan_passes(&[], 1).is_empty());
    }
}
