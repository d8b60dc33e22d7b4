//! The CPU path: fast multi-threaded f32 ([`CpuBackend`]) and the f64 oracle ([`mod@crate::reference`]).
//!
//! [`CpuBackend`] is the fallback when no GPU adapter exists and the baseline every GPU
//! timing is compared against, so it is meant to be as fast as a tuned BLAS on the same
//! reduction, with the precision contract of the crate (max|ΔF| ≤ 2·10⁻⁶·max|F| at
//! N = 65,536):
//!
//! | form | how | precision |
//! |---|---|---|
//! | Full, BlockDiagonal | the upper triangle of GᵀG (half the flops of a GEMM): the engine's AVX-512 kernel where the CPU has it (`syrk_avx512`), else panels with the `gemm` crate's f32 micro-kernels; partial sums of ≤ 4096 rows moved to f64 | blocked-GEMM level, independent of N |
//! | Gram | the same on Gᵀ: upper-triangle panels of G Gᵀ, ≤ 4096 parameters per f32 partial | same |
//! | Diagonal | Σ G² per column, products and sums in f64 | ≈ f64 then one rounding |
//! | SampleNorms | ‖gᵢ‖² per row, f64 | ≈ f64 then one rounding |
//!
//! Every division by N is done in f64 and rounded once to f32. Work runs on rayon's global
//! thread pool.

pub mod allocator;
pub(crate) mod elementwise;
pub(crate) mod network;
pub(crate) mod syrk;
#[cfg(target_arch = "x86_64")]
pub(crate) mod syrk_avx512;
#[cfg(target_arch = "x86_64")]
pub(crate) mod backward_avx512;

use ndarray::{s, Array1, Array2, ArrayView1, ArrayView2, ArrayViewMut1, Zip};
use rayon::prelude::*;

use crate::backend::plan::{block_layout, check_result, squares_total};
use crate::backend::{Accumulator, FisherBackend, DEFAULT_RESULT_LIMIT};
use crate::error::{FisherError, Result};
use crate::fisher::{FisherMatrix, Form, Fvp, NetFisher, NetForm, Variant};
use crate::model::{DataSource, Mlp};
use crate::validate::check_matrix;
use syrk::{band_values, plan_bands, SymmetricSum};

/// An f32 buffer shared by rayon tasks that each write a part of it no other task touches
/// (disjoint rows in `network::kron_add`, disjoint column ranges in `syrk_avx512`): raw
/// pointers are neither `Send` nor `Sync`, and the disjointness is the callers' to keep.
#[derive(Clone, Copy)]
pub(crate) struct DisjointWrites(pub(crate) *mut f32);

// SAFETY: only handed to tasks that write disjoint parts of the buffer (see above), while the
// buffer is borrowed mutably by the caller that spawned them.
unsafe impl Send for DisjointWrites {}
// SAFETY: as above.
unsafe impl Sync for DisjointWrites {}

impl DisjointWrites {
    /// The pointer (a method, so that closures capture the wrapper, not its field).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Multi-threaded f32 CPU backend (see the [module docs](self) for the algorithms).
///
/// ```
/// use fisher_engine::{backend::cpu::CpuBackend, FisherBackend, FisherMatrix, Form};
/// let grads = fisher_engine::synthetic::normal_matrix(1000, 32, 3);
/// let backend = CpuBackend::new();
/// // Stream the samples in two chunks; memory stays O(P²) however many are pushed.
/// let mut acc = backend.accumulator(&Form::Full, 32)?;
/// acc.push(grads.slice(ndarray::s![..600, ..]))?;
/// acc.push(grads.slice(ndarray::s![600.., ..]))?;
/// let FisherMatrix::Full(f) = acc.finish()? else { unreachable!() };
/// assert_eq!(f.dim(), (32, 32));
/// # Ok::<(), fisher_engine::FisherError>(())
/// ```
///
/// Every result is checked against a host-memory limit before it is allocated
/// ([`CpuBackend::with_result_limit`], default [`DEFAULT_RESULT_LIMIT`]).
#[derive(Debug, Clone)]
pub struct CpuBackend {
    /// Largest result, bytes of f32 values.
    result_limit: u64,
    /// Scratch of one network micro-batch, bytes.
    batch_bytes: u64,
    /// Forward pass an implicit operator keeps between products, bytes.
    forward_cache_bytes: u64,
    /// Running sums of a full Fisher (or of a network's layer blocks) held at once, bytes;
    /// beyond it the output is computed in bands of rows, in several passes over the samples.
    accumulator_bytes: u64,
    /// Whether a network diag's products run on the AVX-512 kernel that squares while it
    /// packs (where the CPU has it), rather than `gemm` over the squares: off only in tests,
    /// to check the `gemm` path on CPUs that have the kernel.
    diag_kernel: bool,
    /// Whether a network's backward products run on the AVX-512 kernel that skips each
    /// sample's zero columns (where the CPU has it), rather than `gemm` and a scaling pass:
    /// off only in tests, as `diag_kernel`.
    backward_kernel: bool,
}

/// Default of [`CpuBackend::with_accumulator_bytes`]: 2 GiB, the GPU's default budget.
pub const DEFAULT_ACCUMULATOR_BYTES: u64 = 2 << 30;

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl CpuBackend {
    /// A backend using rayon's global thread pool, with the default result limit.
    pub fn new() -> Self {
        CpuBackend {
            result_limit: DEFAULT_RESULT_LIMIT,
            batch_bytes: network::MICRO_BATCH_BYTES,
            forward_cache_bytes: network::FORWARD_CACHE_BYTES,
            accumulator_bytes: DEFAULT_ACCUMULATOR_BYTES,
            diag_kernel: true,
            backward_kernel: true,
        }
    }

    /// The same backend computing a network diag's products with `gemm` over the squares
    /// even where the AVX-512 kernel runs (tests of that path).
    #[cfg(test)]
    pub(crate) fn with_gemm_diag(mut self) -> Self {
        self.diag_kernel = false;
        self
    }

    /// The same backend computing a network's backward products with `gemm` and a scaling
    /// pass even where the AVX-512 kernel runs (tests of that path).
    #[cfg(test)]
    pub(crate) fn with_gemm_backward(mut self) -> Self {
        self.backward_kernel = false;
        self
    }

    /// The same backend refusing any result above `bytes` of f32 values
    /// ([`FisherError::DoesNotFit`], naming what was asked, its bytes and the limit):
    /// full and block Fishers (P², Σ Pᵦ²), Gram (N²), KFAC factors (Σ (in+1)² + out²), the
    /// layer blocks and the gradient rows (N·R·P) of a network. The limit counts the result
    /// itself; the symmetric sums behind full, blocks, layer, Gram and KFAC hold an f32 and an
    /// f64 copy besides it while they run (4× the result's bytes at peak).
    ///
    /// ```
    /// use fisher_engine::{backend::cpu::CpuBackend, FisherBackend, FisherError, Form};
    /// let backend = CpuBackend::new().with_result_limit(1 << 20);
    /// // A 1000×1000 f32 Fisher is 4 MB, above the 1 MiB limit.
    /// assert!(matches!(backend.accumulator(&Form::Full, 1000), Err(FisherError::DoesNotFit { .. })));
    /// ```
    pub fn with_result_limit(mut self, bytes: u64) -> Self {
        self.result_limit = bytes;
        self
    }

    /// The result limit in bytes ([`CpuBackend::with_result_limit`]).
    pub fn result_limit(&self) -> u64 {
        self.result_limit
    }

    /// The same backend with `bytes` of scratch per network micro-batch (default 32 MiB). The
    /// samples of a micro-batch, and the Monte Carlo draws of a sample when one sample's rows
    /// do not fit, are split to stay near it; tests lower it to force many chunks.
    pub fn with_batch_bytes(mut self, bytes: u64) -> Self {
        self.batch_bytes = bytes.max(1);
        self
    }

    /// The same backend holding at most `bytes` of running sums for a full Fisher or a
    /// network's layer blocks (default [`DEFAULT_ACCUMULATOR_BYTES`]; the CLI reads
    /// `FISHER_CPU_MEMORY_MB`). The sums of a full F take 12 bytes per value (an f32 partial and an f64 total), 45 when the samples
    /// span several blocks and are combined exactly, against the result's 4. When they do not
    /// fit, F is computed in bands of rows of the upper triangle, one pass over the samples
    /// per band, each written into the f32 result as it finishes: peak memory is then the
    /// result plus this budget, at the cost of recomputing the forward and backward passes
    /// (or rereading the gradients) once per band. A band holds at least 256 rows, so a
    /// budget below that is exceeded rather than refused. The bands' values are bitwise
    /// those of a single pass.
    ///
    /// ```
    /// use fisher_engine::{backend::cpu::CpuBackend, FisherBackend, FisherMatrix, Form};
    /// let g = fisher_engine::synthetic::normal_matrix(300, 600, 3);
    /// let banded = CpuBackend::new().with_accumulator_bytes(1 << 20);
    /// let mut acc = banded.accumulator(&Form::Full, 600)?;
    /// assert_eq!(acc.passes(), 3); // bands of 256, 256 and 88 rows
    /// for pass in 0..acc.passes() {
    ///     if pass > 0 { acc.next_pass()?; }
    ///     acc.push(g.view())?;
    /// }
    /// let FisherMatrix::Full(f) = acc.finish()? else { unreachable!() };
    /// let FisherMatrix::Full(whole) = fisher_engine::Engine::cpu().fisher_from_grads(g.view(), &Form::Full)? else { unreachable!() };
    /// assert_eq!(f, whole);
    /// # Ok::<(), fisher_engine::FisherError>(())
    /// ```
    pub fn with_accumulator_bytes(mut self, bytes: u64) -> Self {
        self.accumulator_bytes = bytes;
        self
    }

    /// The accumulator budget in bytes ([`CpuBackend::with_accumulator_bytes`]).
    pub fn accumulator_bytes(&self) -> u64 {
        self.accumulator_bytes
    }

    /// The same backend keeping at most `bytes` of a network's forward pass (activations,
    /// pre-activations and φ' of every sample) between the products of one implicit operator
    /// ([`FisherBackend::network_operator`]; default 256 MiB). A larger forward pass, or 0,
    /// makes every product recompute it.
    pub fn with_forward_cache_bytes(mut self, bytes: u64) -> Self {
        self.forward_cache_bytes = bytes;
        self
    }
}

impl FisherBackend for CpuBackend {
    fn program_exec(&self, program: std::sync::Arc<crate::graph::prim::Program>) -> Result<Box<dyn crate::graph::exec::ProgramExec + '_>> {
        Ok(Box::new(crate::graph::exec::CpuExec::new(program)))
    }

    fn result_limit(&self) -> u64 {
        self.result_limit
    }

    fn accumulator_bytes(&self) -> u64 {
        self.accumulator_bytes
    }

    fn label(&self) -> String {
        format!("cpu: {} threads", rayon::current_num_threads())
    }

    fn accumulator<'a>(&'a self, form: &Form, params: usize) -> Result<Box<dyn Accumulator + 'a>> {
        if params == 0 {
            return Err(FisherError::InvalidInput("an accumulator needs at least one parameter".into()));
        }
        let mut bands = Vec::new();
        let sums = match form {
            Form::Full => {
                check_result(params.checked_mul(params), self.result_limit, || {
                    format!("the full Fisher matrix ({params}×{params} f32)")
                })?;
                // 12 bytes per value of a band: the f32 partial and the f64 total.
                bands = plan_bands(params, self.accumulator_bytes, |r0, r1| band_values(params, r0, r1).saturating_mul(12));
                if bands.len() > 1 {
                    log::info!("full F of {params} parameters: {} passes over the gradients (accumulator budget {} bytes)", bands.len(), self.accumulator_bytes);
                }
                Sums::Full(SymmetricSum::band(params, bands[0].clone()))
            }
            Form::BlockDiagonal(sizes) => {
                // Checked here rather than by `Form::validate`, whose sum may overflow.
                let blocks = block_layout(sizes, params)?;
                check_result(squares_total(sizes.iter().copied()), self.result_limit, || {
                    format!("{} diagonal blocks of {params} parameters (f32)", sizes.len())
                })?;
                Sums::Blocks(blocks.into_iter().map(|(start, size)| (start, SymmetricSum::new(size))).collect())
            }
            Form::Diagonal => Sums::Diagonal(vec![0.0; params]),
            // Grows with the samples pushed; checked per push.
            Form::SampleNorms => Sums::Norms(Vec::new()),
            Form::Gram => {
                return Err(FisherError::InvalidInput(
                    "the Gram form pairs every sample with every other and cannot be streamed; \
                     use FisherBackend::gram"
                        .into(),
                ))
            }
        };
        let staged_rows = match sums {
            Sums::Full(_) | Sums::Blocks(_) => (STAGE_BYTES / params.saturating_mul(4)).clamp(1, STAGE_ROWS),
            Sums::Diagonal(_) | Sums::Norms(_) => 0,
        };
        Ok(Box::new(CpuAccumulator {
            result_limit: self.result_limit,
            params,
            samples: 0,
            sums,
            stage: Array2::zeros((0, params)),
            stage_rows: staged_rows,
            staged: 0,
            bands,
            pass: 0,
            first_pass_samples: 0,
            banded: None,
            streamed: false,
        }))
    }

    fn network_fisher(&self, mlp: &Mlp, data: &dyn DataSource, variant: Variant, form: NetForm) -> Result<NetFisher> {
        network::network_fisher(self, mlp, data, variant, form)
    }

    fn network_fisher_into(&self, mlp: &Mlp, data: &dyn DataSource, variant: Variant, form: NetForm, sink: &mut dyn crate::fisher::ResultSink) -> Result<()> {
        if matches!(form, NetForm::Grads | NetForm::Norms) {
            return Err(crate::FisherError::InvalidInput(format!("--form {form} is per sample, not a sum to write in pieces")));
        }
        network::network_fisher_into(self, mlp, data, variant, form, sink)
    }

    fn network_fisher_over(&self, mlp: &Mlp, data: &dyn DataSource, variant: Variant, form: NetForm, range: std::ops::Range<usize>) -> Result<NetFisher> {
        let sums = network::network_sums(self, mlp, data, variant, form, range.clone(), crate::fisher::DEFAULT_BLOCK_SAMPLES)?;
        sums.finish(range.len())
    }

    fn network_sums(
        &self,
        mlp: &Mlp,
        data: &dyn DataSource,
        variant: Variant,
        form: NetForm,
        range: std::ops::Range<usize>,
        block: usize,
    ) -> Result<crate::fisher::NetSums> {
        network::network_sums(self, mlp, data, variant, form, range, block)
    }

    fn network_fvp(&self, mlp: &Mlp, data: &dyn DataSource, variant: Variant, v: ArrayView1<'_, f32>, product: bool) -> Result<Fvp> {
        network::network_fvp(self, mlp, data, variant, v, product)
    }

    fn network_operator<'a>(&'a self, mlp: &'a Mlp, data: &'a dyn DataSource, variant: Variant) -> Result<Box<dyn crate::backend::NetworkOperator + 'a>> {
        Ok(Box::new(network::CpuNetOperator::new(self, mlp, data, variant, self.forward_cache_bytes)?))
    }

    fn network_gram_operator<'a>(&'a self, mlp: &'a Mlp, data: &'a dyn DataSource, variant: Variant, budget: u64) -> Result<Option<Box<dyn crate::backend::NetworkOperator + 'a>>> {
        Ok(network::CpuGramOperator::new(self, mlp, data, variant, budget)?.map(|op| Box::new(op) as Box<dyn crate::backend::NetworkOperator>))
    }

    fn gram(&self, grads: ArrayView2<'_, f32>) -> Result<Array2<f32>> {
        check_matrix("gradients", grads, 0)?;
        let n = grads.nrows();
        check_result(n.checked_mul(n), self.result_limit, || format!("the Gram matrix ({n}×{n} f32)"))?;
        // K = G Gᵀ = (Gᵀ)ᵀ(Gᵀ): the symmetric sum over the rows of Gᵀ, i.e. over parameters.
        let mut sum = SymmetricSum::new(grads.nrows());
        sum.add(grads.t());
        Ok(sum.finish(grads.nrows() as f64))
    }
}

/// Pushes of fewer rows than this are copied into a staging buffer and reduced together:
/// `gemm` with a depth of a few rows is a memory-bound rank-k update, ~10× slower per flop.
/// 512 is gemm's smallest depth block on this machine (`gemm-common` `kernel_params`).
const STAGE_ROWS: usize = 512;

/// Upper bound of the staging buffer (rows × P f32), which caps the staged rows for very
/// wide gradients (P > 8192) so that the accumulator's memory stays O(P²)-dominated.
const STAGE_BYTES: usize = 16 << 20;

/// Minimum columns per rayon task of the diagonal: below this a task is shorter than the
/// cost of scheduling it.
const DIAG_COLS_PER_TASK: usize = 512;

/// The running sums of one form.
enum Sums {
    Full(SymmetricSum),
    /// (first column, its sum) per block.
    Blocks(Vec<(usize, SymmetricSum)>),
    /// Σₖ `G[k,j]`² in f64.
    Diagonal(Vec<f64>),
    /// ‖gₖ‖² per sample so far.
    Norms(Vec<f32>),
}

impl Sums {
    /// Adds the rows of `chunk` (already checked).
    fn add(&mut self, chunk: ArrayView2<'_, f32>) {
        match self {
            Sums::Full(sum) => sum.add(chunk),
            Sums::Blocks(blocks) => blocks.par_iter_mut().for_each(|(start, sum)| {
                let width = sum.size();
                sum.add(chunk.slice(s![.., *start..*start + width]));
            }),
            Sums::Diagonal(acc) => add_column_squares(acc, chunk),
            Sums::Norms(norms) => {
                let start = norms.len();
                norms.resize(start + chunk.nrows(), 0.0);
                norms[start..].par_iter_mut().enumerate().for_each(|(r, norm)| {
                    let row = chunk.row(r);
                    *norm = sum_of_squares(row.as_slice(), || row.iter().copied()) as f32;
                });
            }
        }
    }
}

/// The streaming accumulator of [`CpuBackend`].
struct CpuAccumulator {
    /// The backend's result limit (the norms grow with every push).
    result_limit: u64,
    params: usize,
    samples: usize,
    sums: Sums,
    /// Rows waiting for a batch large enough for `gemm` (Full and BlockDiagonal only);
    /// allocated with the first chunk smaller than `stage_rows` (chunks at least that long
    /// go straight to the sums, and W1's one push paid a 4 MB memset for nothing).
    stage: Array2<f32>,
    /// Rows `stage` holds once allocated (0 for the other forms).
    stage_rows: usize,
    /// Rows of `stage` in use.
    staged: usize,
    /// Bands of rows of a full F, one pass each (see [`CpuBackend::with_accumulator_bytes`]);
    /// empty for the other forms.
    bands: Vec<std::ops::Range<usize>>,
    /// The pass under way.
    pass: usize,
    /// Samples of the first pass, which every later pass must repeat.
    first_pass_samples: usize,
    /// The f32 result the finished bands are written into (P×P, row-major), after the first.
    banded: Option<Vec<f32>>,
    /// Whether the finished bands went to a sink ([`Accumulator::next_pass_into`]) instead.
    streamed: bool,
}

impl CpuAccumulator {
    fn flush_stage(&mut self) {
        if self.staged > 0 {
            self.sums.add(self.stage.slice(s![..self.staged, ..]));
            self.staged = 0;
        }
    }

    /// Checks that the pass under way saw samples, as many as the first.
    fn check_pass(&self) -> Result<()> {
        if self.samples == 0 {
            return Err(FisherError::Empty { what: "gradients".into(), rows: 0, cols: self.params });
        }
        if self.pass > 0 && self.samples != self.first_pass_samples {
            return Err(FisherError::InvalidInput(format!(
                "pass {} of {} over the gradients saw {} samples, the first saw {}: every pass must push the same samples",
                self.pass + 1,
                self.bands.len(),
                self.samples,
                self.first_pass_samples
            )));
        }
        Ok(())
    }

    /// An error unless the pass under way is the last.
    fn check_last_pass(&self) -> Result<()> {
        if self.pass + 1 < self.passes() {
            return Err(FisherError::InvalidInput(format!(
                "the full Fisher of {} parameters takes {} passes over the gradients within the accumulator budget, \
                 and finish came after pass {} (call next_pass and push the samples again)",
                self.params,
                self.passes(),
                self.pass + 1
            )));
        }
        Ok(())
    }

    /// Ends the pass under way: its band goes into `sink` when given (tensor 0), into the
    /// banded result otherwise (the two cannot be mixed); then the next band starts.
    fn end_pass(&mut self, sink: Option<&mut dyn crate::fisher::ResultSink>) -> Result<()> {
        if self.pass + 1 >= self.passes() {
            return Err(FisherError::InvalidInput(format!(
                "next_pass after the last of {} passes over the gradients",
                self.passes()
            )));
        }
        if self.streamed != sink.is_some() && self.pass > 0 {
            return Err(FisherError::InvalidInput("next_pass and next_pass_into cannot be mixed in one reduction".into()));
        }
        self.flush_stage();
        self.check_pass()?;
        match sink {
            Some(sink) => {
                let Sums::Full(sum) = &self.sums else { unreachable!("bands belong to a full Fisher") };
                sum.put_band_into(self.samples as f64, sink, 0)?;
                self.streamed = true;
            }
            None => self.finish_band(),
        }
        if self.pass == 0 {
            self.first_pass_samples = self.samples;
        }
        self.pass += 1;
        self.samples = 0;
        self.sums = Sums::Full(SymmetricSum::band(self.params, self.bands[self.pass].clone()));
        Ok(())
    }

    /// Writes the finished band of this pass into the banded result.
    fn finish_band(&mut self) {
        let p = self.params;
        let band = self.bands[self.pass].clone();
        let out = self.banded.get_or_insert_with(|| vec![0f32; p * p]);
        let Sums::Full(sum) = &self.sums else { unreachable!("bands belong to a full Fisher") };
        let (head, below) = out.split_at_mut(band.end * p);
        sum.finish_band_into(self.samples as f64, &mut head[band.start * p..], below);
    }
}

impl Accumulator for CpuAccumulator {
    fn push(&mut self, chunk: ArrayView2<'_, f32>) -> Result<()> {
        if chunk.ncols() != self.params {
            return Err(FisherError::InvalidInput(format!(
                "gradient chunk has {} columns but the accumulator was started for {} parameters",
                chunk.ncols(),
                self.params
            )));
        }
        check_chunk(chunk, self.samples)?;
        let samples = self.samples.checked_add(chunk.nrows());
        if let Sums::Norms(_) = self.sums {
            check_result(samples, self.result_limit, || format!("the per-sample norms ({} f32)", samples.unwrap_or(usize::MAX)))?;
        }
        let capacity = self.stage_rows;
        if chunk.nrows() >= capacity {
            self.sums.add(chunk);
        } else {
            if self.stage.nrows() < capacity {
                self.stage = Array2::zeros((capacity, self.params));
            }
            let mut rest = chunk;
            while rest.nrows() > 0 {
                let take = rest.nrows().min(capacity - self.staged);
                self.stage
                    .slice_mut(s![self.staged..self.staged + take, ..])
                    .assign(&rest.slice(s![..take, ..]));
                self.staged += take;
                rest = rest.slice_move(s![take.., ..]);
                if self.staged == capacity {
                    self.flush_stage();
                }
            }
        }
        self.samples += chunk.nrows();
        Ok(())
    }

    fn samples(&self) -> usize {
        self.samples
    }

    fn passes(&self) -> usize {
        self.bands.len().max(1)
    }

    fn next_pass(&mut self) -> Result<()> {
        self.end_pass(None)
    }

    fn next_pass_into(&mut self, sink: &mut dyn crate::fisher::ResultSink) -> Result<()> {
        self.end_pass(Some(sink))
    }

    fn finish_into(mut self: Box<Self>, sink: &mut dyn crate::fisher::ResultSink) -> Result<()> {
        if !self.streamed {
            return self.finish()?.put_into(sink);
        }
        self.check_last_pass()?;
        self.flush_stage();
        self.check_pass()?;
        let Sums::Full(sum) = &self.sums else { unreachable!("bands belong to a full Fisher") };
        sum.put_band_into(self.samples as f64, sink, 0)
    }

    fn finish(mut self: Box<Self>) -> Result<FisherMatrix> {
        if self.streamed {
            return Err(FisherError::InvalidInput(
                "the earlier bands of this full Fisher went to a sink (next_pass_into): finish it with finish_into".into(),
            ));
        }
        self.check_last_pass()?;
        self.flush_stage();
        self.check_pass()?;
        if self.bands.len() > 1 {
            self.finish_band();
            let p = self.params;
            let out = self.banded.take().expect("written by finish_band");
            return Ok(FisherMatrix::Full(Array2::from_shape_vec((p, p), out).expect("p·p values")));
        }
        let n = self.samples as f64;
        Ok(match self.sums {
            Sums::Full(sum) => FisherMatrix::Full(sum.finish(n)),
            Sums::Blocks(blocks) => {
                FisherMatrix::BlockDiagonal(blocks.iter().map(|(_, sum)| sum.finish(n)).collect())
            }
            Sums::Diagonal(acc) => {
                FisherMatrix::Diagonal(acc.iter().map(|&v| (v / n) as f32).collect())
            }
            Sums::Norms(norms) => FisherMatrix::SampleNorms(Array1::from(norms)),
        })
    }
}

/// [`check_matrix`] for a pushed chunk, fast on the common (valid) path.
///
/// `check_matrix` tests element by element with an early exit, which does not vectorize:
/// ~7 ms for 4096×2048 on the development machine, a tenth of the whole reduction. Here a
/// branch-free exponent scan runs over all threads first, and `check_matrix` runs only to
/// report what is wrong (no rows or columns, or the first NaN/±Inf with its row in the
/// whole stream).
fn check_chunk(chunk: ArrayView2<'_, f32>, row_offset: usize) -> Result<()> {
    if chunk.is_empty() || !all_finite(chunk) {
        check_matrix("gradients", chunk, row_offset)?;
    }
    Ok(())
}

/// Whether every entry is finite ([`crate::validate::all_finite`] per row, rows in parallel).
fn all_finite(chunk: ArrayView2<'_, f32>) -> bool {
    let rows_per_task = (16_384 / chunk.ncols().max(1)).max(1);
    (0..chunk.nrows()).into_par_iter().with_min_len(rows_per_task).all(|r| {
        let row = chunk.row(r);
        match row.as_slice() {
            Some(values) => crate::validate::all_finite(values),
            None => row.iter().all(|x| x.is_finite()),
        }
    })
}

/// `acc[j]` += Σₖ chunk[k,j]², in f64 (the products of f32 values are exact there), over
/// column ranges in parallel; each column is summed in row order, so the result does not
/// depend on the thread count.
fn add_column_squares(acc: &mut [f64], chunk: ArrayView2<'_, f32>) {
    let per_task = DIAG_COLS_PER_TASK.max(acc.len().div_ceil(rayon::current_num_threads()));
    acc.par_chunks_mut(per_task).enumerate().for_each(|(t, acc)| {
        let c0 = t * per_task;
        let width = acc.len();
        let mut acc = ArrayViewMut1::from(acc);
        for row in chunk.rows() {
            Zip::from(&mut acc).and(row.slice(s![c0..c0 + width])).for_each(|a, &g| {
                *a += f64::from(g) * f64::from(g);
            });
        }
    });
}

/// Σ x² in f64: eight independent lanes over a contiguous row (so that it vectorizes),
/// otherwise a plain fold over `strided`.
fn sum_of_squares<I: Iterator<Item = f32>>(row: Option<&[f32]>, strided: impl FnOnce() -> I) -> f64 {
    let Some(row) = row else {
        return strided().map(|x| f64::from(x) * f64::from(x)).sum();
    };
    let mut lanes = [0.0f64; 8];
    let mut blocks = row.chunks_exact(8);
    for block in &mut blocks {
        for (lane, &x) in lanes.iter_mut().zip(block) {
            *lane += f64::from(x) * f64::from(x);
        }
    }
    let tail: f64 = blocks.remainder().iter().map(|&x| f64::from(x) * f64::from(x)).sum();
    lanes.iter().sum::<f64>() + tail
}
