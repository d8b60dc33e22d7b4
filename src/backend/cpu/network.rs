//! Network Fisher on the CPU (fast f32): the same stages as `src/gpu/network.rs`, with the
//! matrix products on the `gemm` crate (the symmetric sums on [`SymmetricSum`]'s kernels),
//! every sum over micro-batches in f32 for at most [`FLUSH_ROWS`] samples and in f64 beyond.
//!
//! Per micro-batch of m samples and R output rows each:
//! forward Z_l = Ã_l W_lᵀ (+b), Ã_{l+1} = [φ(Z_l) | 1]; output rows δ_{L−1} (m·R × C);
//! backward δ_{l−1} = (δ_l W_l) ∘ φ'(Z_{l−1}) (on AVX-512 CPUs skipping each sample's zero
//! columns of δ_l: [`backward_avx512`](super::backward_avx512)); at each layer the reduction
//! of (δ_l, Ã_l):
//! diag (Σ_R δ²)ᵀ(Ã∘Ã), KFAC ÃᵀÃ and δᵀδ, full/layer via the rows δ ⊗ ã, norms ‖δ‖²‖ã‖².
//!
//! The R rows of a micro-batch are generated and reduced d at a time ([`Batching`]): the
//! forward pass runs once per micro-batch, then output rows, backward and reduction per chunk
//! of draws. Every form above is a sum over rows (KFAC's A a sum over samples, added with the
//! first chunk), so memory is bounded by the batch scratch ([`CpuBackend::with_batch_bytes`])
//! whatever K is.

use std::borrow::Cow;

use ndarray::{s, Array2, ArrayView1, ArrayView2, ArrayViewMut2, Axis};
use rayon::prelude::*;

use super::elementwise::{activate_in_place, activate_parts, add_into_f64, row_square_sums, scale_rows, scale_rows_and_square_sums};
use super::syrk::{is_single_whole_pass, plan_units, put_band, SymmetricSum, Unit, FLUSH_ROWS};
use super::CpuBackend;
use crate::backend::plan::{BatchCost, Batching, LayerShape, MicroBatchLimits, NetPlan};
use crate::error::{FisherError, Result};
use crate::fisher::exact::ExactSum;
use crate::fisher::sums::{diag_of, packed_row, symmetric_of, NetSums, SumLayer, DEFAULT_BLOCK_SAMPLES};
use crate::fisher::{mc_class, mc_normal, Fvp, KfacFactors, MemorySink, NetFisher, NetForm, ResultSink, Variant};
use crate::model::{Activation, DataSource, Mlp, TargetRows};

/// Default scratch of one micro-batch, bytes ([`CpuBackend::with_batch_bytes`]): large
/// enough for efficient GEMMs, small enough to keep the per-batch buffers (m·d rows of the
/// widest layer, or of P for full/layer) modest.
pub(crate) const MICRO_BATCH_BYTES: u64 = 32 << 20;
/// Largest micro-batch, samples.
const MAX_MICRO_BATCH: usize = 4096;

/// Samples per micro-batch of `n` when one sample needs `floats` f32 of scratch.
fn micro_batch(be: &CpuBackend, n: usize, floats: usize) -> Result<usize> {
    MicroBatchLimits::host(be.batch_bytes, MAX_MICRO_BATCH)
        .micro_batch(n.max(1), (floats as u64).saturating_mul(4), 1, 0, || format!("one sample of {floats} floats"))
}

/// C = A·B (overwriting C) for views with any positive strides.
fn matmul(a: ArrayView2<'_, f32>, b: ArrayView2<'_, f32>, c: ArrayViewMut2<'_, f32>) {
    gemm_into(a, b, c, false)
}

/// C += A·B for views with any positive strides.
fn matmul_add(a: ArrayView2<'_, f32>, b: ArrayView2<'_, f32>, c: ArrayViewMut2<'_, f32>) {
    gemm_into(a, b, c, true)
}

/// C = A·B, or C += A·B when `accumulate`, on every thread.
fn gemm_into(a: ArrayView2<'_, f32>, b: ArrayView2<'_, f32>, c: ArrayViewMut2<'_, f32>, accumulate: bool) {
    gemm_with(a, b, c, accumulate, gemm::Parallelism::Rayon(0))
}

/// C = A·B, or C += A·B when `accumulate`, with `gemm`'s `parallelism`.
fn gemm_with(a: ArrayView2<'_, f32>, b: ArrayView2<'_, f32>, mut c: ArrayViewMut2<'_, f32>, accumulate: bool, parallelism: gemm::Parallelism) {
    assert!(c.dim() == (a.nrows(), b.ncols()), "matmul shapes");
    let (c_rs, c_cs) = (c.strides()[0], c.strides()[1]);
    // SAFETY: C is a distinct mutable view of a.nrows() × b.ncols() values at its strides.
    unsafe { gemm_raw(a, b, c.as_mut_ptr(), (c_rs, c_cs), accumulate, parallelism) }
}

/// A·B in a fresh standard-layout array, without zeroing it first: `gemm` writes every
/// entry of C and reads none when it does not accumulate (for k = 0 too, where it writes
/// zeros).
fn matmul_new(a: ArrayView2<'_, f32>, b: ArrayView2<'_, f32>) -> Array2<f32> {
    let (m, n) = (a.nrows(), b.ncols());
    let mut c = Array2::<f32>::uninit((m, n));
    // SAFETY: C is m × n values, row-major, writable; gemm initialises each of them (see
    // above), so that the array is initialised afterwards.
    unsafe {
        gemm_raw(a, b, c.as_mut_ptr().cast::<f32>(), (n as isize, 1), false, gemm::Parallelism::Rayon(0));
        c.assume_init()
    }
}

/// C = A·B, or C += A·B when `accumulate`, for C at `c` with strides `(row, col)`.
///
/// # Safety
/// `c` must be valid for writes (and, when `accumulate`, reads of initialised values) at
/// r·row + j·col for r < a.nrows(), j < b.ncols(), and not overlap A or B.
unsafe fn gemm_raw(a: ArrayView2<'_, f32>, b: ArrayView2<'_, f32>, c: *mut f32, (c_rs, c_cs): (isize, isize), accumulate: bool, parallelism: gemm::Parallelism) {
    let (m, k) = a.dim();
    let (k2, n) = b.dim();
    assert!(k == k2, "matmul shapes");
    if m == 0 || n == 0 {
        return;
    }
    let (a_rs, a_cs) = (a.strides()[0], a.strides()[1]);
    let (b_rs, b_cs) = (b.strides()[0], b.strides()[1]);
    // SAFETY: every index gemm forms is (r < m, kk < k) in A, (kk < k, c < n) in B and
    // (r < m, c < n) in C, all inside the views and the caller's C. For k = 0 gemm sets C
    // to zero, or leaves it, when accumulating.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            c_cs,
            c_rs,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// A layer's augmented weight [W | b] (out × augmented_in), or a direction's [V | v_b], as
/// views: the out × in matrix and the bias apart. Nothing model-sized is copied to multiply
/// by it: z = ã [W | b]ᵀ is the GEMM of ã's first fan_in columns with Wᵀ, then b added to
/// every row ([`AugmentedWeight::product_into`]).
#[derive(Clone, Copy)]
struct AugmentedWeight<'a> {
    /// W (out × in).
    weight: ArrayView2<'a, f32>,
    /// b (out), where the layer has a bias.
    bias: Option<ArrayView1<'a, f32>>,
}

impl<'a> AugmentedWeight<'a> {
    /// A direction's [V | v_b] for the layer `shape`, viewed in place in the θ-ordered `row`
    /// (weight row-major, then bias: [`Mlp::parameters`]' order).
    fn of_direction(shape: &LayerShape, row: &'a [f32]) -> Result<Self> {
        let misfit = || FisherError::InvalidInput(format!("a direction of {} entries does not hold the layer at θ offset {}", row.len(), shape.offset));
        let weight_end = shape.offset + shape.fan_out * shape.fan_in;
        let weight = ArrayView2::from_shape((shape.fan_out, shape.fan_in), row.get(shape.offset..weight_end).ok_or_else(misfit)?)
            .map_err(|_| misfit())?;
        let bias = match shape.has_bias {
            true => Some(ArrayView1::from(row.get(weight_end..weight_end + shape.fan_out).ok_or_else(misfit)?)),
            false => None,
        };
        Ok(AugmentedWeight { weight, bias })
    }

    /// z = ã [W | b]ᵀ (m × out) for augmented activations ã (m × augmented_in, whose bias
    /// column is 1).
    ///
    /// The GEMM of ã's first fan_in columns with Wᵀ adds into z preset to b on every row:
    /// the same sum as with b as the GEMM's last term up to rounding, without a copy of
    /// [W | b] to multiply by, and without a pass over z to add b.
    fn product(&self, acts: ArrayView2<'_, f32>) -> Array2<f32> {
        let x = acts.slice(s![.., ..self.weight.ncols()]);
        let Some(bias) = self.bias else { return matmul_new(x, self.weight.t()) };
        let (m, out) = (acts.nrows(), self.weight.nrows());
        let bias = bias.as_standard_layout();
        let bias = bias.as_slice().expect("standard layout");
        let rows = (super::elementwise::GRAIN / out.max(1)).max(1);
        // SAFETY: every row is set to b (`out` values each).
        let mut z = unsafe {
            super::elementwise::fresh(m, out, |z| {
                z.par_chunks_mut(rows * out.max(1)).for_each(|block| {
                    for row in block.chunks_mut(out.max(1)) {
                        for (o, &b) in row.iter_mut().zip(bias) {
                            o.write(b);
                        }
                    }
                })
            })
        };
        matmul_add(x, self.weight.t(), z.view_mut());
        z
    }

    /// z = ã [W | b]ᵀ into a view (see [`AugmentedWeight::product`]): the GEMM, then b added
    /// to every row.
    fn product_into(&self, acts: ArrayView2<'_, f32>, mut z: ArrayViewMut2<'_, f32>) {
        matmul(acts.slice(s![.., ..self.weight.ncols()]), self.weight.t(), z.view_mut());
        if let Some(bias) = self.bias {
            z.axis_iter_mut(Axis(0)).into_par_iter().for_each(|mut row| row += &bias);
        }
    }
}

/// [W_l | b_l] of every layer, viewed in the model ([`AugmentedWeight`]).
fn augmented_weights(mlp: &Mlp) -> Vec<AugmentedWeight<'_>> {
    mlp.layers.iter().map(|layer| AugmentedWeight { weight: layer.weight.view(), bias: layer.bias.as_ref().map(|b| b.view()) }).collect()
}

/// One micro-batch's forward pass (see [`forward_pass`]).
struct Pass {
    /// ã_l (m × augmented_in, last column 1 where layer l has a bias), every layer.
    acts: Vec<Array2<f32>>,
    /// z_L (m × out) of the output layer.
    output: Array2<f32>,
    /// φ'(z_l) (m × out) of every hidden layer.
    derivs: Vec<Array2<f32>>,
    /// ã_l ∘ ã_l where asked for (diag), else empty.
    squares: Vec<Array2<f32>>,
}

/// The forward pass of samples s0 .. s0 + m, with φ' of every hidden layer and ã_l ∘ ã_l
/// for the layers l where `squares[l]` (each computed with the activation it derives from,
/// [`activate_parts`]). Errors only when the inputs cannot be read (data on disk).
fn forward_pass(mlp: &Mlp, waug: &[AugmentedWeight<'_>], data: &dyn DataSource, s0: usize, m: usize, squares: &[bool]) -> Result<Pass> {
    let depth = mlp.layers.len();
    let wants = |l: usize| squares.get(l).copied().unwrap_or(false);
    let (mut acts, mut derivs, mut act_squares) = (Vec::with_capacity(depth), Vec::with_capacity(depth), Vec::with_capacity(depth));
    let first = activate_parts(Activation::Identity, data.inputs(s0, m)?.view(), None, mlp.layers[0].augmented_in(), false, wants(0));
    acts.push(first.a);
    act_squares.push(first.squares.unwrap_or_default());
    for l in 0..depth - 1 {
        // z_l without b_l, written into the first columns of ã_{l+1}, which the activation
        // then fills in place, adding b_l as it reads z ([`activate_in_place`]).
        let w = &waug[l];
        let (out, ld) = (w.weight.nrows(), mlp.layers[l + 1].augmented_in());
        let mut za = Array2::<f32>::uninit((m, ld));
        // SAFETY: za is m × ld, row-major; the GEMM writes (overwrites, reading none) its
        // m × out values at row stride ld, the first out ≤ ld columns.
        unsafe { gemm_raw(acts[l].slice(s![.., ..w.weight.ncols()]), w.weight.t(), za.as_mut_ptr().cast::<f32>(), (ld as isize, 1), false, gemm::Parallelism::Rayon(0)) };
        let bias = w.bias.map(|b| b.to_vec());
        let next = activate_in_place(mlp.activations[l], za, out, bias.as_deref(), true, wants(l + 1));
        acts.push(next.a);
        derivs.push(next.derivative.expect("asked for"));
        act_squares.push(next.squares.unwrap_or_default());
    }
    let output = waug[depth - 1].product(acts[depth - 1].view());
    Ok(Pass { acts, output, derivs, squares: act_squares })
}

enum Reduction {
    /// Full (one sum over θ) or layer blocks (one per layer); `owners[k]` is the layer of
    /// `sums[k]` (for a pass over some bands of some layers, see [`Unit`]).
    Syrk { sums: Vec<BlockSum>, full: bool, owners: Vec<usize> },
    /// diag: `sums[k]` holds the rows `units[k].rows` of layer `units[k].layer`'s
    /// fan_out × (in+1) sums Σ (Σ_R δ²)(ã∘ã).
    Diag { sums: Vec<BlockSum>, units: Vec<Unit> },
    /// KFAC: `sums[k]` holds the band `units[k].rows` of A_l (`units[k].layer` = 2l) or G_l
    /// (2l + 1): the order of [`crate::fisher::sink`]'s tensors.
    Kfac { sums: Vec<BlockSum>, units: Vec<Unit> },
    Grads(Vec<f32>),
    Norms(Vec<f64>),
}

/// What one block of samples sums into: a dense sum per layer (diag), or a symmetric sum.
enum Live {
    Dense(DenseSum),
    Sym(SymmetricSum),
}

/// A rows × cols sum of f32 products, as [`SymmetricSum`] keeps one: the GEMMs of the
/// micro-batches add into an f32 `pending` in place, which moves into the f64 `flushed`
/// after at most [`FLUSH_ROWS`] samples, and the lanes and blocks combine in f64. (A GEMM
/// result per micro-batch added into f64 was a pass over the sums per micro-batch: 4 % of
/// W3's empirical diag.)
struct DenseSum {
    /// The f32 sum of the samples since the last flush; meaningless while
    /// `pending_samples` is 0 (the next GEMM overwrites it).
    pending: Array2<f32>,
    /// Samples summed in `pending`.
    pending_samples: usize,
    /// The f64 sum of every flushed `pending`, from the first flush on: made by writing the
    /// first values, not by adding them into zeros (see `syrk::fresh_upper`: a zeroed buffer
    /// read before it is written faults twice per page).
    flushed: Option<Array2<f64>>,
}

impl DenseSum {
    fn new(rows: usize, cols: usize) -> Self {
        DenseSum { pending: Array2::zeros((rows, cols)), pending_samples: 0, flushed: None }
    }

    /// Starts adding `samples` more samples: flushes first when they would take `pending`
    /// past [`FLUSH_ROWS`]. Returns whether their GEMMs add into `pending` (or overwrite it).
    fn begin(&mut self, samples: usize) -> bool {
        if self.pending_samples > 0 && self.pending_samples + samples > FLUSH_ROWS {
            self.flush();
        }
        let accumulate = self.pending_samples > 0;
        self.pending_samples += samples;
        accumulate
    }

    /// `flushed` += `pending`, in f64.
    fn flush(&mut self) {
        if self.pending_samples > 0 {
            match self.flushed.as_mut() {
                Some(flushed) => add_into_f64(flushed.view_mut(), self.pending.view()),
                None => self.flushed = Some(map_f64(self.pending.view(), |p| 0.0 + f64::from(p))),
            }
            self.pending_samples = 0;
        }
    }

    /// The sum, in f64.
    fn into_values(mut self) -> Array2<f64> {
        self.flush();
        let dim = self.pending.dim();
        self.flushed.unwrap_or_else(|| Array2::zeros(dim))
    }

    /// The sum in f64, row-major.
    fn values(&self) -> Vec<f64> {
        match (&self.flushed, self.pending_samples) {
            (None, 0) => vec![0.0; self.len()],
            (None, _) => self.pending.iter().map(|&p| 0.0 + f64::from(p)).collect(),
            (Some(flushed), 0) => flushed.iter().copied().collect(),
            (Some(flushed), _) => flushed.iter().zip(&self.pending).map(|(&f, &p)| f + f64::from(p)).collect(),
        }
    }

    /// Empties the sum.
    fn clear(&mut self) {
        self.flushed = None;
        self.pending_samples = 0;
    }

    fn len(&self) -> usize {
        self.pending.len()
    }

    /// This lane's flushed f64 sums and its pending f32 ones (when it holds samples) at the
    /// flat indices `at`.
    fn parts(&self, at: std::ops::Range<usize>) -> (Option<&[f64]>, Option<&[f32]>) {
        let flushed = self.flushed.as_ref().map(|f| &f.as_slice().expect("standard layout")[at.clone()]);
        let pending = (self.pending_samples > 0).then(|| &self.pending.as_slice().expect("standard layout")[at]);
        (flushed, pending)
    }

    /// What `self.absorb(other)` and then [`DenseSum::into_values`] give, bit for bit, in
    /// one parallel pass that writes a new f64 array: the absorb flushed both lanes into
    /// new buffers and added them in a third pass.
    fn values_absorbing(&self, other: &DenseSum) -> Array2<f64> {
        assert_eq!(self.pending.dim(), other.pending.dim(), "lanes of the same sum");
        // A lane's value as its flush leaves it (None: never flushed, nothing pending).
        fn flushed(f: Option<&[f64]>, p: Option<&[f32]>, k: usize) -> Option<f64> {
            match (f, p) {
                (Some(f), Some(p)) => Some(f[k] + f64::from(p[k])),
                (Some(f), None) => Some(f[k]),
                (None, Some(p)) => Some(0.0 + f64::from(p[k])),
                (None, None) => None,
            }
        }
        let len = self.len();
        let mut values: Vec<f64> = Vec::with_capacity(len);
        values.spare_capacity_mut()[..len].par_chunks_mut(super::elementwise::GRAIN).enumerate().for_each(|(c, out)| {
            let at = c * super::elementwise::GRAIN..c * super::elementwise::GRAIN + out.len();
            match (self.parts(at.clone()), other.parts(at)) {
                // Neither lane flushed (every sum of up to FLUSH_ROWS samples per lane).
                ((None, Some(p)), (None, Some(q))) => {
                    for ((o, &p), &q) in out.iter_mut().zip(p).zip(q) {
                        o.write((0.0 + f64::from(p)) + (0.0 + f64::from(q)));
                    }
                }
                ((f1, p1), (f2, p2)) => {
                    for (k, o) in out.iter_mut().enumerate() {
                        o.write(match (flushed(f1, p1, k), flushed(f2, p2, k)) {
                            (Some(x), Some(y)) => x + y,
                            (None, Some(y)) => 0.0 + y,
                            (Some(x), None) => x,
                            (None, None) => 0.0,
                        });
                    }
                }
            }
        });
        // SAFETY: every one of the len values was written just above.
        unsafe { values.set_len(len) };
        Array2::from_shape_vec(self.pending.dim(), values).expect("same shape")
    }

    /// Adds `other` (the same sum over other samples) into this one, in f64: this + other.
    fn absorb(&mut self, other: &mut DenseSum) {
        self.flush();
        other.flush();
        match (self.flushed.as_mut(), other.flushed.as_ref()) {
            (Some(x), Some(y)) => ndarray::Zip::from(x.view_mut()).and(y.view()).par_for_each(|x, &y| *x += y),
            (None, Some(y)) => self.flushed = Some(map_f64(y.view(), |v| 0.0 + v)),
            (_, None) => {}
        }
    }
}

/// f(x) for every x of a standard-layout array, into a new one, in parallel, written
/// without being read first.
fn map_f64<T: Copy + Send + Sync>(a: ArrayView2<'_, T>, f: impl Fn(T) -> f64 + Sync + Send) -> Array2<f64> {
    let values: Vec<f64> = a.as_slice().expect("standard layout").par_iter().map(|&x| f(x)).collect();
    Array2::from_shape_vec(a.dim(), values).expect("same shape")
}

/// A sum over samples that is exact across blocks (see [`crate::fisher::sums`]): the
/// current block's sum, and the [`ExactSum`] of the blocks before it, made only when a
/// second block starts.
struct BlockSum {
    live: Live,
    /// `live` holds samples that are not yet in `exact`.
    dirty: bool,
    exact: Option<ExactSum>,
}

impl BlockSum {
    fn dense(rows: usize, cols: usize) -> Self {
        BlockSum { live: Live::Dense(DenseSum::new(rows, cols)), dirty: false, exact: None }
    }

    /// The rows `rows` of the upper triangle of an m×m symmetric sum.
    fn sym_band(m: usize, rows: std::ops::Range<usize>) -> Self {
        BlockSum { live: Live::Sym(SymmetricSum::band(m, rows)), dirty: false, exact: None }
    }

    fn dense_mut(&mut self) -> &mut DenseSum {
        self.dirty = true;
        match &mut self.live {
            Live::Dense(a) => a,
            Live::Sym(_) => unreachable!("a dense block sum"),
        }
    }

    /// The first row of the band a symmetric sum holds.
    fn first_row(&self) -> usize {
        match &self.live {
            Live::Sym(s) => s.first_row(),
            Live::Dense(_) => 0,
        }
    }

    fn sym_mut(&mut self) -> &mut SymmetricSum {
        self.dirty = true;
        match &mut self.live {
            Live::Sym(s) => s,
            Live::Dense(_) => unreachable!("a symmetric block sum"),
        }
    }

    /// The block's sums in the layout of [`crate::fisher::sums`] (dense row-major, or the
    /// packed upper triangle).
    fn live_values(&self) -> Vec<f64> {
        match &self.live {
            Live::Dense(a) => a.values(),
            Live::Sym(s) => s.packed_upper(),
        }
    }

    /// Adds `other`'s block sums (the same sums over other samples) into this block's, in
    /// f64 (this + other, entry by entry), and empties `other`'s.
    fn absorb(&mut self, other: &mut BlockSum) {
        if !other.dirty {
            return;
        }
        match (&mut self.live, &mut other.live) {
            (Live::Dense(a), Live::Dense(b)) => {
                a.absorb(b);
                b.clear();
            }
            (Live::Sym(a), Live::Sym(b)) => {
                a.absorb(b);
                b.clear();
            }
            _ => unreachable!("lanes of the same sums"),
        }
        self.dirty = true;
        other.dirty = false;
    }

    /// Moves the block's sums into the exact sum and empties the block.
    fn end_block(&mut self) -> Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let values = self.live_values();
        self.exact.get_or_insert_with(|| ExactSum::new(values.len())).deposit(0, &values)?;
        match &mut self.live {
            Live::Dense(a) => a.clear(),
            Live::Sym(s) => s.clear(),
        }
        self.dirty = false;
        Ok(())
    }

    /// Every sample's sums, as an exact sum.
    fn into_exact(mut self) -> Result<ExactSum> {
        self.end_block()?;
        let len = match &self.live {
            Live::Dense(a) => a.len(),
            Live::Sym(s) => s.packed_count(),
        };
        Ok(self.exact.unwrap_or_else(|| ExactSum::new(len)))
    }

    /// The m×m symmetric sum divided by `nf`, in f32, with `lane` (the same sums over other
    /// samples, see [`LANES`]) absorbed first where given: bit for bit what
    /// [`BlockSum::absorb`] and then finishing give, in one pass after a single block
    /// ([`SymmetricSum::finish_absorbing`]). After one block, the block sums finish as they
    /// always did; after several, their exact sum finishes with the formulas of
    /// `NetSums::finish`, which are the same.
    fn finish_symmetric(mut self, lane: Option<BlockSum>, m: usize, nf: f64) -> Result<Array2<f32>> {
        if let Some(mut lane) = lane {
            match (&self.live, &lane.live) {
                (Live::Sym(s), Live::Sym(t)) if lane.dirty && self.exact.is_none() => return Ok(s.finish_absorbing(t, nf)),
                _ => self.absorb(&mut lane),
            }
        }
        Ok(match self.combined()? {
            Ok(values) => symmetric_of(&values, m, nf),
            Err(Live::Sym(s)) => s.finish(nf),
            Err(Live::Dense(_)) => unreachable!("a symmetric block sum"),
        })
    }

    /// The (rows × cols) dense sum in f64, with `lane` absorbed first where given: bit for
    /// bit what [`BlockSum::absorb`] and then [`DenseSum::into_values`] give, in one pass
    /// after a single block ([`DenseSum::values_absorbing`]).
    fn dense_values(mut self, lane: Option<BlockSum>, rows: usize, cols: usize) -> Result<Array2<f64>> {
        if let Some(mut lane) = lane {
            match (&self.live, &lane.live) {
                (Live::Dense(a), Live::Dense(b)) if lane.dirty && self.exact.is_none() => return Ok(a.values_absorbing(b)),
                _ => self.absorb(&mut lane),
            }
        }
        Ok(match self.combined()? {
            Ok(values) => Array2::from_shape_vec((rows, cols), values).expect("layer layout"),
            Err(Live::Dense(a)) => a.into_values(),
            Err(Live::Sym(_)) => unreachable!("a dense block sum"),
        })
    }

    /// The exact sum's values when blocks were combined, `None` after a single block.
    fn combined(mut self) -> Result<std::result::Result<Vec<f64>, Live>> {
        if self.exact.is_none() {
            return Ok(Err(self.live));
        }
        self.end_block()?;
        Ok(Ok(self.exact.expect("made above").values()))
    }
}

/// A reduction of [`reduce_lanes`] with its second lane absorbed.
fn absorbed((mut reduction, lane): (Reduction, Option<Reduction>)) -> Reduction {
    if let Some(mut lane) = lane {
        reduction.absorb(&mut lane);
    }
    reduction
}

impl Reduction {
    /// Adds the sums of `other` (a second lane of the same reduction, see [`LANES`]) into
    /// these, and empties `other`'s.
    fn absorb(&mut self, other: &mut Reduction) {
        match (self, other) {
            (Reduction::Diag { sums: a, .. }, Reduction::Diag { sums: b, .. })
            | (Reduction::Kfac { sums: a, .. }, Reduction::Kfac { sums: b, .. })
            | (Reduction::Syrk { sums: a, .. }, Reduction::Syrk { sums: b, .. }) => {
                a.iter_mut().zip(b.iter_mut()).for_each(|(x, y)| x.absorb(y))
            }
            _ => unreachable!("lanes of the diag and KFAC sums"),
        }
    }

    /// Ends the current block of every sum.
    fn end_block(&mut self) -> Result<()> {
        match self {
            Reduction::Syrk { sums, .. } | Reduction::Diag { sums, .. } | Reduction::Kfac { sums, .. } => {
                sums.iter_mut().try_for_each(BlockSum::end_block)
            }
            Reduction::Grads(_) | Reduction::Norms(_) => Ok(()),
        }
    }
}

/// Output rows δ_{L−1} for one micro-batch (see the variant table in [`crate::model`]): the
/// rows q0 .. q0 + d of each sample (draws for MC, classes for `true`), sample-major. The MC
/// weight is 1/√K of the whole K, so chunks of draws sum to the unchunked result. The
/// targets of the m = z.nrows() samples from s0 are read from `data` here.
///
/// With `compact` (only for the true Fisher of class labels, see [`compact_rows`]) the rows
/// are the C − 1 rows of [`softmax_factor`] instead of the C rows √p_q (e_q − p).
pub(crate) fn output_rows(z: ArrayView2<'_, f32>, data: &dyn DataSource, s0: usize, variant: Variant, (q0, r): (usize, usize), compact: bool) -> Result<Array2<f32>> {
    let (m, c) = z.dim();
    let targets = data.targets(s0, m)?;
    let mut out = Array2::<f32>::zeros((m * r, c));
    out.axis_chunks_iter_mut(Axis(0), r).into_par_iter().enumerate().for_each(|(s, mut rows)| {
        let zr = z.row(s);
        let sample = (s0 + s) as u32;
        match &targets {
            TargetRows::Values(values) => match variant {
                Variant::Empirical => {
                    for j in 0..c {
                        rows[[0, j]] = values[[s, j]] - zr[j];
                    }
                }
                Variant::True => {
                    for q in 0..r {
                        rows[[q, q0 + q]] = 1.0;
                    }
                }
                Variant::MonteCarlo { samples, seed } => {
                    let scale = 1.0 / (samples as f32).sqrt();
                    for q in 0..r {
                        for j in 0..c {
                            rows[[q, j]] = mc_normal(seed, sample, (q0 + q) as u32, j) * scale;
                        }
                    }
                }
            },
            TargetRows::Classes(labels) => {
                let zmax = zr.fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                let denom: f32 = zr.iter().map(|&v| (v - zmax).exp()).sum();
                let p: Vec<f32> = zr.iter().map(|&v| (v - zmax).exp() / denom).collect();
                match variant {
                    Variant::Empirical => {
                        let y = labels[s] as usize;
                        for j in 0..c {
                            rows[[0, j]] = (j == y) as u8 as f32 - p[j];
                        }
                    }
                    Variant::True if compact => {
                        let factor = softmax_factor(&p);
                        for q in 0..r {
                            for j in 0..c {
                                rows[[q, j]] = factor[(q0 + q) * c + j] as f32;
                            }
                        }
                    }
                    Variant::True => {
                        for q in 0..r {
                            let sq = p[q0 + q].sqrt();
                            for j in 0..c {
                                rows[[q, j]] = sq * ((j == q0 + q) as u8 as f32 - p[j]);
                            }
                        }
                    }
                    Variant::MonteCarlo { samples, seed } => {
                        let scale = 1.0 / (samples as f32).sqrt();
                        for q in 0..r {
                            let y = mc_class(seed, sample, (q0 + q) as u32, &p);
                            for j in 0..c {
                                rows[[q, j]] = ((j == y) as u8 as f32 - p[j]) * scale;
                            }
                        }
                    }
                }
            }
        }
    });
    Ok(out)
}

/// Most classes for which the CPU path uses the C − 1 rows of [`softmax_factor`]: its f64
/// Cholesky costs C³/6 per sample, small beside the backward pass up to here, and the saving
/// (1/C of the backward pass and of the sums) is small beyond.
const COMPACT_MAX_CLASSES: usize = 64;

/// The output rows per sample of the CPU reductions of `form`: C − 1 rather than C for the
/// true Fisher of class labels (C ≤ [`COMPACT_MAX_CLASSES`]), whose per-sample matrix
/// Λ = diag(p) − ppᵀ has rank C − 1 (its rows sum to zero), so that the backward pass and
/// the sums over rows do 1/C less work; `grads` keeps its documented C rows per sample. The
/// Fisher is the same: only the factor B with BᵀB = Λ changes.
fn compact_rows(plan: &NetPlan, data: &dyn DataSource, variant: Variant, form: NetForm) -> Option<usize> {
    let classes = matches!(data.likelihood(), crate::model::Likelihood::Categorical);
    (variant == Variant::True && classes && form != NetForm::Grads && (2..=COMPACT_MAX_CLASSES).contains(&plan.r)).then(|| plan.r - 1)
}

/// The C − 1 rows b_q (row-major, (C − 1) × C, f64) of a factor of the softmax's
/// Λ = diag(p) − ppᵀ: Σ_q b_q b_qᵀ = Λ.
///
/// With k = argmax p and the other classes a = 0 .. C − 2, Λ' = diag(p_a) − p_a p_aᵀ is
/// positive definite and Λ = Q Λ' Qᵀ with Q[a, a] = 1, Q[k, a] = −1 (every row of Λ sums to
/// zero); with Λ' = L Lᵀ (Cholesky, f64), B = Q L: b_q[a] = L[a, q], b_q[k] = −Σ_a L[a, q].
/// A zero pivot (a probability that underflowed) gives a zero column.
fn softmax_factor(p: &[f32]) -> Vec<f64> {
    let c = p.len();
    let k = (0..c).fold(0, |best, i| if p[i] > p[best] { i } else { best });
    let others: Vec<usize> = (0..c).filter(|&i| i != k).collect();
    let n = c - 1;
    let mut l = vec![0f64; n * n];
    for a in 0..n {
        let pa = f64::from(p[others[a]]);
        for b in 0..=a {
            let pb = f64::from(p[others[b]]);
            let mut v = if a == b { pa } else { 0.0 } - pa * pb;
            for t in 0..b {
                v -= l[a * n + t] * l[b * n + t];
            }
            l[a * n + b] = match a == b {
                true => v.max(0.0).sqrt(),
                false if l[b * n + b] > 0.0 => v / l[b * n + b],
                false => 0.0,
            };
        }
    }
    let mut rows = vec![0f64; n * c];
    for q in 0..n {
        let row = &mut rows[q * c..(q + 1) * c];
        for a in q..n {
            row[others[a]] = l[a * n + q];
            row[k] -= l[a * n + q];
        }
    }
    rows
}

/// Writes the rows δ ⊗ ã of one layer (weight row-major, then bias) into `dst` (rows × P_l).
fn outer_rows(delta: ArrayView2<'_, f32>, act: ArrayView2<'_, f32>, r: usize, fan_in: usize, bias: bool, mut dst: ArrayViewMut2<'_, f32>) {
    let out = delta.ncols();
    dst.axis_iter_mut(Axis(0)).into_par_iter().enumerate().for_each(|(q, mut row)| {
        let d = delta.row(q);
        let a = act.row(q / r);
        for o in 0..out {
            let dv = d[o];
            for i in 0..fan_in {
                row[o * fan_in + i] = dv * a[i];
            }
        }
        if bias {
            for o in 0..out {
                row[out * fan_in + o] = d[o];
            }
        }
    });
}

/// Bytes of one thread's slab of Xⱼ in the Kronecker reduction ([`kron_add`]): a chunk of
/// samples that stays in L2 between being written and being packed by `gemm`.
const KRON_X_BYTES: usize = 1 << 20;

/// Fewest samples per `gemm` of the Kronecker reduction (for very wide rows of F, where
/// [`KRON_X_BYTES`] would allow fewer).
const KRON_MIN_CHUNK: usize = 32;

/// Largest scratch of one thread of the Kronecker reduction, bytes: the ld × width partial
/// rows of F and the chunk of Xⱼ. Wider problems keep the gradient rows.
const KRON_SCRATCH_BYTES: u64 = 64 << 20;

/// Whether full F or the layer blocks over `r` ≥ 2 output rows per sample are reduced by
/// [`kron_add`] (the rank-R sum of each sample collapsed before the O(P²) work) rather than
/// as the SYRK of the N·R gradient rows: always when R ≥ 2, unless one thread's scratch
/// would pass [`KRON_SCRATCH_BYTES`]. With R = 1 (empirical, one draw) the two do the same
/// multiply-adds and the SYRK does them faster.
fn kron_applies(plan: &NetPlan, form: NetForm, r: usize) -> bool {
    let width = match form {
        NetForm::Full => plan.params,
        NetForm::Layer => plan.shapes.iter().map(|s| s.params).max().unwrap_or(0),
        _ => return false,
    };
    let ld = plan.shapes.iter().map(|s| s.ld).max().unwrap_or(0);
    let scratch = ((ld + KRON_MIN_CHUNK) as u64).saturating_mul(width as u64).saturating_mul(4);
    r >= 2 && scratch <= KRON_SCRATCH_BYTES
}

/// The micro-batch cost of the Kronecker reduction: [`batch_cost`] without the gradient row
/// of P per output row, with the δ of every layer kept per row instead.
fn kron_cost(plan: &NetPlan) -> BatchCost {
    let mut cost = batch_cost(plan, NetForm::Kfac);
    let kept: u64 = plan.shapes.iter().map(|s| s.fan_out as u64).sum();
    cost.per_row = cost.per_row.saturating_add(kept.saturating_mul(4));
    cost
}

/// Adds one micro-batch's Σᵢ Σ_q g_iq g_iqᵀ (upper triangle) to the bands `sums` of full F
/// (`full`) or of the layer blocks (`owners[k]` the layer of `sums[k]`), without forming the
/// gradient rows g_iq = δ_iq ⊗ ã_i.
///
/// Row (l, j, k) of F (layer l, output j, augmented input k, θ order: weight row-major, then
/// bias) is
///
///   F[(l,j,k), ·] = Σᵢ ã_li[k] · Xⱼ[i, ·],   Xⱼ[i, (l',j',k')] = C_i^{ll'}[j, j'] · ã_l'i[k'],
///
/// with C_i^{ll'} = Σ_q δ_l,iq δ_l',iqᵀ: the R output rows of a sample collapse into C before
/// the O(P²) work, so the micro-batch costs m·P²/2 multiply-adds instead of the SYRK's
/// m·R·P²/2. Per output j of layer l, `gemm`s of Ã_lᵀ (ld × chunk) by Xⱼ (chunk × width)
/// over chunks of samples sum the rows (j, 0..ld) of F from column (l, j, 0) on into an f32
/// slab, bias row (k = ld − 1, whose ã is 1) included; the slab's rows inside the band are
/// then added, from their diagonal on, into the band's f32 `pending`. The outputs j of a
/// layer run in parallel, one thread each, each writing only its own rows.
///
/// The calls do not depend on the band, so a band's values are bitwise those of the whole
/// sum, as for the SYRK. `deltas[l]` holds δ_l (m·R × fan_out_l, sample-major) for every layer
/// a band's rows or columns reach.
fn kron_add(sums: &mut [BlockSum], owners: &[usize], full: bool, shapes: &[LayerShape], acts: &[Array2<f32>], deltas: &[Option<Array2<f32>>], r: usize) {
    let m = acts[0].nrows();
    let depth = shapes.len();
    let all: Vec<usize> = (0..depth).collect();
    let total: usize = shapes.iter().map(|s| s.params).sum();
    for (sum, &owner) in sums.iter_mut().zip(owners) {
        let sym = sum.sym_mut();
        sym.begin_direct(m);
        let (rows, stride, pending) = sym.direct_rows();
        let target = super::DisjointWrites(pending.as_mut_ptr());
        let row_layers: &[usize] = if full { &all } else { std::slice::from_ref(&owner) };
        for &l in row_layers {
            let s = &shapes[l];
            // Where layer l's θ range sits in the sum's coordinates, and the sum's side.
            let (base, end) = if full { (s.offset, total) } else { (0, s.params) };
            if base + s.params <= rows.start || base >= rows.end {
                continue;
            }
            let cols: &[usize] = if full { &all[l..] } else { std::slice::from_ref(&all[l]) };
            let c_len: usize = cols.iter().map(|&c| shapes[c].fan_out).sum();
            let (fin, ld, fout) = (s.fan_in, s.ld, s.fan_out);
            let bias_row = |j: usize| base + fout * fin + j;
            let block_rows = |j: usize| {
                let w = base + j * fin;
                (w < rows.end && w + fin > rows.start) || (s.has_bias && rows.contains(&bias_row(j)))
            };
            let dl = deltas[l].as_ref().expect("δ of every layer a band reaches");
            let (rows, tasks): (std::ops::Range<usize>, Vec<usize>) = (rows.clone(), (0..fout).filter(|&j| block_rows(j)).collect());
            tasks.into_par_iter().for_each_init(
                || (Vec::<f32>::new(), Vec::<f32>::new(), Vec::<f32>::new()),
                |(x, slab, c), j| {
                    let c0 = base + j * fin;
                    let width = end - c0;
                    let chunk = (KRON_X_BYTES / (4 * width.max(1))).max(KRON_MIN_CHUNK).min(m.max(1));
                    x.resize(x.len().max(chunk * width), 0.0);
                    slab.resize(slab.len().max(ld * width), 0.0);
                    c.resize(c_len, 0.0);
                    for k0 in (0..m).step_by(chunk) {
                        let kn = chunk.min(m - k0);
                        for t in 0..kn {
                            let i = k0 + t;
                            // C_i[j, ·] over the column layers, then Xⱼ's row i.
                            c.fill(0.0);
                            for q in 0..r {
                                let a = dl[[i * r + q, j]];
                                let mut at = 0;
                                for &l2 in cols {
                                    let d2 = deltas[l2].as_ref().expect("δ of every column layer");
                                    for (cv, &dv) in c[at..at + shapes[l2].fan_out].iter_mut().zip(d2.row(i * r + q)) {
                                        *cv += a * dv;
                                    }
                                    at += shapes[l2].fan_out;
                                }
                            }
                            let row = &mut x[t * width..(t + 1) * width];
                            let (mut pos, mut at) = (0, 0);
                            for &l2 in cols {
                                let s2 = &shapes[l2];
                                let a2 = acts[l2].row(i);
                                let a2 = &a2.as_slice().expect("contiguous activations")[..s2.fan_in];
                                let first = if l2 == l { j } else { 0 };
                                for j2 in first..s2.fan_out {
                                    let cv = c[at + j2];
                                    for (o, &av) in row[pos..pos + s2.fan_in].iter_mut().zip(a2) {
                                        *o = cv * av;
                                    }
                                    pos += s2.fan_in;
                                }
                                if s2.has_bias {
                                    row[pos..pos + s2.fan_out].copy_from_slice(&c[at..at + s2.fan_out]);
                                    pos += s2.fan_out;
                                }
                                at += s2.fan_out;
                            }
                            debug_assert_eq!(pos, width);
                        }
                        let xs = ArrayView2::from_shape((kn, width), &x[..kn * width]).expect("chunk layout");
                        let out = ndarray::ArrayViewMut2::from_shape((ld, width), &mut slab[..ld * width]).expect("slab layout");
                        gemm_with(acts[l].slice(s![k0..k0 + kn, ..ld]).t(), xs, out, k0 > 0, gemm::Parallelism::None);
                    }
                    for k in 0..ld {
                        let i = if k < fin { c0 + k } else { bias_row(j) };
                        if !rows.contains(&i) {
                            continue;
                        }
                        let src = &slab[k * width + (i - c0)..(k + 1) * width];
                        // SAFETY: row i − r₀ of `pending` (stride values from column r₀)
                        // belongs to output j of layer l alone: the weight rows
                        // [base + j·fin, base + (j + 1)·fin) and the bias row base + fout·fin + j
                        // of different j are different rows, and every task has its own j.
                        // Columns i .. end lie in the row: i ≥ r₀ and end − r₀ = stride.
                        let dst = unsafe { std::slice::from_raw_parts_mut(target.get().add((i - rows.start) * stride + (i - rows.start)), end - i) };
                        for (d, &v) in dst.iter_mut().zip(src) {
                            *d += v;
                        }
                    }
                },
            );
        }
    }
}

/// The cost of one micro-batch of the CPU network path (see [`BatchCost`]), in bytes:
/// per sample ã_l and z_l of every layer (plus Σ_R δ² and ã² for diag), per output row δ and
/// its backward copy (plus the gradient row δ ⊗ ã of P, or of the widest layer, for
/// full/grads/layer). Saturating: a sum that overflows only makes the batch smaller.
fn batch_cost(plan: &NetPlan, form: NetForm) -> BatchCost {
    let max_w = plan.max_width() as u64;
    let max_layer = plan.shapes.iter().map(|s| s.params).max().unwrap_or(1) as u64;
    let forward: u64 = plan.shapes.iter().fold(0u64, |acc, s| acc.saturating_add(s.ld as u64).saturating_add(s.fan_out as u64));
    let per_sample = forward.saturating_add(if form == NetForm::Diagonal { 2 * max_w + 1 } else { 0 });
    let row_extra = match form {
        NetForm::Full | NetForm::Grads => plan.params as u64,
        NetForm::Layer => max_layer,
        _ => 0,
    };
    let per_row = (2 * max_w).saturating_add(row_extra);
    // The symmetric sums' own scratch while they add a micro-batch (the widest whole sum's;
    // a band's is no larger), so that it comes out of the micro-batch's bytes.
    let sides: Vec<usize> = match form {
        NetForm::Kfac => plan.shapes.iter().flat_map(|s| [s.ld, s.fan_out]).collect(),
        NetForm::Full => vec![plan.params],
        NetForm::Layer => plan.shapes.iter().map(|s| s.params).collect(),
        _ => Vec::new(),
    };
    let fixed = sides.into_iter().map(|m| super::syrk::add_scratch_bytes(m, 0..m)).max().unwrap_or(0);
    // The diag kernel's packed operands (`diag_product`), for DIAG_ROWS rows at a time.
    #[cfg(target_arch = "x86_64")]
    let fixed = match form == NetForm::Diagonal && diag_kernel_available() {
        true => plan.shapes.iter().map(|s| super::syrk_avx512::gemm_tn_scratch_bytes(s.fan_out.min(DIAG_ROWS), s.ld)).fold(fixed, u64::max),
        false => fixed,
    };
    // The backward kernel's panels of W (`backward_rows`), one layer's at a time.
    #[cfg(target_arch = "x86_64")]
    let fixed = plan
        .shapes
        .iter()
        .skip(1)
        .filter(|s| super::backward_avx512::applies(plan.r, s.fan_out, s.fan_in))
        .map(|s| super::backward_avx512::packed_bytes(s.fan_out, s.fan_in))
        .fold(fixed, u64::max);
    BatchCost { per_sample: per_sample.saturating_mul(4), per_row: per_row.saturating_mul(4), sample_binding: 1, row_binding: 1, fixed }
}

/// How the CPU path walks `n` samples of R rows (scratch bounded by `be.batch_bytes`).
fn batching(be: &CpuBackend, n: usize, r: usize, cost: &BatchCost) -> Result<Batching> {
    batching_within(be, 1, n, r, cost)
}

/// How each of `lanes` lanes walks `n` samples of R rows: the lanes share one micro-batch's
/// scratch (`be.batch_bytes`, of which each lane's sums' own scratch, `cost.fixed`, is a
/// part) and its [`MAX_MICRO_BATCH`] samples, so that memory does not grow with them.
fn batching_within(be: &CpuBackend, lanes: usize, n: usize, r: usize, cost: &BatchCost) -> Result<Batching> {
    let lanes = lanes.max(1);
    // Each lane's share of the scratch, less what its sums allocate while they add it.
    let target = (be.batch_bytes / lanes as u64).saturating_sub(cost.fixed).max(1);
    let batch = MicroBatchLimits::host(target, MAX_MICRO_BATCH / lanes)
        .batching(n, r, cost, || format!("one output row of {} bytes", cost.per_row))?;
    Ok(balanced(batch, n, r, lanes))
}

/// Rows of `gemm`'s f32 micro-kernel on AVX-512 (16 lanes): a micro-batch of a multiple of
/// it leaves no ragged tile of samples.
const GEMM_ROWS: usize = 16;

/// `batch` (whole samples, at most `batch.samples` each) with its `n` samples spread evenly:
/// as many micro-batches as the cap needs, rounded up to a multiple of the `lanes` so that
/// no lane waits for the other at the end, each of ⌈n / count⌉ samples rounded up to
/// [`GEMM_ROWS`] where that stays within the cap. The MC KFAC of 784-512-512-10 over 4096
/// samples (a cap of 950 per lane): six micro-batches of 688 (the last 656) rather than four
/// of 950 and one of 296, which ran alone; 61 → 54 ms on the 2-core Xeon. Chunks of draws
/// (one sample at a time) stay as they are.
fn balanced(batch: Batching, n: usize, r: usize, lanes: usize) -> Batching {
    let cap = batch.samples.max(1);
    if batch.draws != r || n <= 1 {
        return batch;
    }
    let count = n.div_ceil(cap).next_multiple_of(lanes.max(1));
    let even = n.div_ceil(count);
    let samples = match even.next_multiple_of(GEMM_ROWS) {
        rounded if rounded <= cap => rounded,
        _ => even,
    };
    Batching { samples, draws: batch.draws }
}

/// Lanes of the diag and KFAC sums of a model whose second copy of the sums is small
/// ([`LANE_SUMS_BYTES`]): micro-batches 2k and 2k + 1 of every block are summed into two
/// copies of the sums at the same time, and the copies are added in f64, lane 0 + lane 1, at
/// the end of the block ([`Reduction::absorb`]). Their `gemm` calls then keep the cores busy
/// rather than waiting for each other (one lane reached 1.5× of one core on two for KFAC).
/// Each lane gets half the micro-batch scratch, and the planner counts the sums twice
/// ([`sum_passes`]). Two, not the thread count, so that the values do not depend on the
/// machine.
const LANES: usize = 2;

/// Largest second copy of the sums that buys lanes, bytes: about one micro-batch. Beyond it
/// (a model of millions of parameters, whose micro-batches are large GEMMs anyway) memory
/// matters more than the lanes' speed.
const LANE_SUMS_BYTES: u64 = 32 << 20;

/// The lanes of `form`'s sums for `plan` ([`LANES`] or 1): a function of the model and the
/// form only, so that every pass plan and every shard of a model sums the same way.
fn lanes_of(plan: &NetPlan, form: NetForm) -> usize {
    let sums = match form {
        NetForm::Diagonal => plan.shapes.iter().map(|s| (s.fan_out as u64) * (s.ld as u64) * 12).sum::<u64>(),
        NetForm::Kfac => plan.shapes.iter().map(|s| ((s.ld as u64).pow(2) + (s.fan_out as u64).pow(2)) * 12).sum::<u64>(),
        _ => return 1,
    };
    if sums <= LANE_SUMS_BYTES { LANES } else { 1 }
}

pub(crate) fn network_fisher(be: &CpuBackend, mlp: &Mlp, data: &dyn DataSource, variant: Variant, form: NetForm) -> Result<NetFisher> {
    let n = data.len();
    let plan = NetPlan::new(mlp, variant)?;
    plan.check_result(form, n, be.result_limit)?;
    if let Some(passes) = sum_passes(be, &plan, form, n) {
        let mut sink = MemorySink::new(form, &SumLayer::of(mlp))?;
        sums_in_passes(be, mlp, data, variant, form, &passes, &mut sink)?;
        return Ok(sink.into_fisher());
    }
    let p = plan.params;
    let (mut reduction, lane) = reduce_lanes(be, mlp, data, variant, form, 0..n, DEFAULT_BLOCK_SAMPLES, None)?;
    let nf = n as f64;
    let layers = SumLayer::of(mlp);
    let symmetric = |sum: BlockSum, m: usize| sum.finish_symmetric(None, m, nf);
    // KFAC's and the diag's sums finish with their second lane; the others absorb it first.
    let mut lane_sums = match (lane, &mut reduction) {
        (Some(Reduction::Kfac { sums, .. }), Reduction::Kfac { .. }) | (Some(Reduction::Diag { sums, .. }), Reduction::Diag { .. }) => {
            sums.into_iter().map(Some).collect()
        }
        (Some(mut lane), _) => {
            reduction.absorb(&mut lane);
            Vec::new()
        }
        (None, _) => Vec::new(),
    }
    .into_iter();
    Ok(match reduction {
        Reduction::Syrk { sums, full: true, .. } => NetFisher::Full(symmetric(sums.into_iter().next().expect("one sum"), p)?),
        Reduction::Syrk { sums, .. } => NetFisher::Layer(
            sums.into_iter().zip(&layers).map(|(s, l)| symmetric(s, l.params())).collect::<Result<_>>()?,
        ),
        Reduction::Diag { sums, .. } => {
            let blocks = sums
                .into_iter()
                .zip(&layers)
                .map(|(sum, l)| sum.dense_values(lane_sums.next().flatten(), l.fan_out, l.augmented_in()))
                .collect::<Result<Vec<_>>>()?;
            NetFisher::Diagonal(diag_of(blocks, &layers, nf))
        }
        Reduction::Kfac { sums, .. } => {
            let mut sums = sums.into_iter();
            let mut factors = Vec::with_capacity(layers.len());
            for l in &layers {
                let (a, g) = (sums.next().expect("A of every layer"), sums.next().expect("G of every layer"));
                let (a_lane, g_lane) = (lane_sums.next().flatten(), lane_sums.next().flatten());
                factors.push(KfacFactors {
                    a: a.finish_symmetric(a_lane, l.augmented_in(), nf)?,
                    g: g.finish_symmetric(g_lane, l.fan_out, nf)?,
                });
            }
            NetFisher::Kfac(factors)
        }
        Reduction::Grads(rows) => {
            let total = rows.len() / p.max(1);
            NetFisher::Grads(Array2::from_shape_vec((total, p), rows).map_err(|e| FisherError::InvalidInput(e.to_string()))?)
        }
        Reduction::Norms(v) => NetFisher::Norms(v.into_iter().map(|x| x as f32).collect()),
    })
}

/// The exact sums of `form` over the samples `range` of `data`, with blocks of `block`
/// samples counted from sample 0 (see [`crate::fisher::sums`]).
pub(crate) fn network_sums(
    be: &CpuBackend,
    mlp: &Mlp,
    data: &dyn DataSource,
    variant: Variant,
    form: NetForm,
    range: std::ops::Range<usize>,
    block: usize,
) -> Result<NetSums> {
    let layers = SumLayer::of(mlp);
    // Refuses the per-sample forms.
    crate::fisher::sums::part_layout(form, &layers)?;
    let plan = NetPlan::new(mlp, variant)?;
    plan.check_result(form, 1, be.result_limit)?;
    let samples = range.len();
    let reduction = absorbed(reduce_lanes(be, mlp, data, variant, form, range, block, None)?);
    let parts = match reduction {
        // Whole sums (no units), in the parts' order: A₀, G₀, A₁, … for KFAC.
        Reduction::Syrk { sums, .. } | Reduction::Diag { sums, .. } | Reduction::Kfac { sums, .. } => {
            sums.into_iter().map(BlockSum::into_exact).collect::<Result<Vec<_>>>()?
        }
        Reduction::Grads(_) | Reduction::Norms(_) => unreachable!("refused above"),
    };
    Ok(NetSums { form, layers, samples, parts })
}

/// The passes in which [`network_fisher`] computes the sums of `form` over `n` samples within
/// the backend's accumulator budget, or `None` when one pass of whole sums fits (the
/// unbanded path) or the form is per sample. Full F, the layer blocks and the KFAC factors
/// are cut into bands of rows of their symmetric sums ([`plan_units`]); diag into bands of
/// [`DIAG_ROWS`] rows of each layer's fan_out × (in+1) sums ([`plan_diag`]). When the samples
/// span several blocks, every value also costs its exact sum (33 bytes: the block's copy
/// and the exact state).
fn sum_passes(be: &CpuBackend, plan: &NetPlan, form: NetForm, n: usize) -> Option<Vec<Vec<Unit>>> {
    let exact = if n > DEFAULT_BLOCK_SAMPLES { 33 } else { 0 };
    let budget = be.accumulator_bytes;
    let passes = match form {
        NetForm::Full => plan_units(&[plan.params], budget, exact),
        NetForm::Layer => plan_units(&plan.shapes.iter().map(|s| s.params).collect::<Vec<_>>(), budget, exact),
        NetForm::Kfac => {
            // The A factors first (their passes need no backward pass), then the G factors
            // from the top layer down (each pass's backward stops at its lowest layer); the
            // units keep their tensor's index (A_l = 2l, G_l = 2l + 1).
            let depth = plan.shapes.len();
            let order: Vec<usize> = (0..depth).map(|l| 2 * l).chain((0..depth).rev().map(|l| 2 * l + 1)).collect();
            let sides: Vec<usize> = order.iter().map(|&t| if t % 2 == 0 { plan.shapes[t / 2].ld } else { plan.shapes[t / 2].fan_out }).collect();
            // With lanes, two copies of each band (see `LANES`): the budget shared by them.
            let lanes = lanes_of(plan, form) as u64;
            let mut passes = plan_units(&sides, budget / lanes, exact.div_ceil(lanes));
            passes.iter_mut().flatten().for_each(|u| u.layer = order[u.layer]);
            passes
        }
        // 12 bytes per value and lane: the f32 pending and f64 flushed sums ([`DenseSum`]).
        NetForm::Diagonal => plan_diag(&plan.shapes.iter().map(|s| (s.fan_out, s.ld)).collect::<Vec<_>>(), budget, 12 * lanes_of(plan, form) as u64 + exact),
        NetForm::Grads | NetForm::Norms => return None,
    };
    (!is_single_whole_pass(&passes)).then_some(passes)
}

/// δ_{l−1} = (δ_l W_l) ∘ φ'(z_{l−1}) for δ_l's (m·d) × K rows, d per sample, and with it
/// Σ_d δ_{l−1}² per sample where `squares`: on the AVX-512 kernel that skips each sample's
/// zero columns ([`backward_avx512`](super::backward_avx512)) where the CPU has it, else
/// `gemm` and a scaling pass.
fn backward_rows(be: &CpuBackend, delta: ArrayView2<'_, f32>, d: usize, weight: ArrayView2<'_, f32>, scale: ArrayView2<'_, f32>, squares: bool) -> (Array2<f32>, Option<Array2<f32>>) {
    #[cfg(target_arch = "x86_64")]
    if be.backward_kernel && super::backward_avx512::applies(d, weight.nrows(), weight.ncols()) && super::backward_avx512::sparse_enough(delta, d) {
        let fused = squares && d <= crate::backend::cpu::elementwise::F32_TERMS;
        let (back, sums) = super::backward_avx512::backward(delta, d, weight, scale, fused);
        let sums = match (squares, sums) {
            (true, None) => Some(row_square_sums(back.view(), d)),
            (_, sums) => sums,
        };
        return (back, sums);
    }
    let _ = be;
    let mut back = matmul_new(delta, weight);
    match squares {
        true => {
            let sums = scale_rows_and_square_sums(back.view_mut(), scale, d);
            (back, Some(sums))
        }
        false => {
            scale_rows(back.view_mut(), scale, d);
            (back, None)
        }
    }
}

/// Whether the diag's products run on [`diag_product`] (CPUs with AVX-512F).
fn diag_kernel_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    if super::syrk_avx512::available() {
        return true;
    }
    false
}

/// `out` (+)= f(left[.., rows])ᵀ · (act ∘ act), f squaring where `square_left`: the diag's
/// product for the output rows `rows`, on the AVX-512 kernel ([`diag_kernel_available`]).
/// `out` is rows.len() × act.ncols(), standard layout.
fn diag_product(left: ArrayView2<'_, f32>, square_left: bool, act: ArrayView2<'_, f32>, rows: std::ops::Range<usize>, mut out: ArrayViewMut2<'_, f32>, accumulate: bool) {
    #[cfg(target_arch = "x86_64")]
    {
        let ld = out.ncols();
        let out = out.as_slice_mut().expect("a band of whole rows of the sum");
        super::syrk_avx512::gemm_tn(left, square_left, act, true, rows, out, ld, accumulate);
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("diag_product without its kernel ({left:?} {square_left} {act:?} {rows:?} {out:?} {accumulate})");
}

/// Rows of a layer's diag sums reduced by one product call (`gemm`, or [`diag_product`]'s
/// kernel): the micro-batch's (Σ_R δ²)ᵀ(ã∘ã)
/// is computed in row chunks of this many outputs, aligned to multiples of it, in every
/// plan; so a diag computed in passes ([`plan_diag`]) is bitwise the single pass's.
pub(crate) const DIAG_ROWS: usize = 512;

/// The passes of a diag within `budget` bytes for layers of (fan_out, in+1) = `shapes`, at
/// `per_value` bytes per value: each layer cut into bands of rows that start at multiples
/// of [`DIAG_ROWS`] (at least that many rows each, or the rest), grouped in order into
/// passes. One pass of whole layers when everything fits.
pub(crate) fn plan_diag(shapes: &[(usize, usize)], budget: u64, per_value: u64) -> Vec<Vec<Unit>> {
    let cost = |rows: usize, width: usize| (rows as u64).saturating_mul(width as u64).saturating_mul(per_value);
    let mut units = Vec::new();
    for (layer, &(out, width)) in shapes.iter().enumerate() {
        let mut r0 = 0;
        while r0 < out {
            let mut r1 = (r0 + DIAG_ROWS).min(out);
            while r1 < out && cost((r1 + DIAG_ROWS).min(out) - r0, width) <= budget {
                r1 = (r1 + DIAG_ROWS).min(out);
            }
            units.push(Unit { layer, size: out, rows: r0..r1 });
            r0 = r1;
        }
        if out == 0 {
            units.push(Unit { layer, size: 0, rows: 0..0 });
        }
    }
    let sizes: Vec<u64> = units.iter().map(|u| cost(u.rows.len(), shapes[u.layer].1)).collect();
    crate::backend::plan_passes(&sizes, budget).into_iter().map(|r| units[r].to_vec()).collect()
}

/// The sums of `form` computed in `passes` over the samples, each pass summing its units
/// (bands of rows, see [`Unit`]) and putting them into `sink` as it ends (tensors in the
/// order of [`crate::fisher::sink`]). Bitwise equal to the single pass: each band's `gemm`
/// calls and block sums are the single pass's.
pub(crate) fn sums_in_passes(
    be: &CpuBackend,
    mlp: &Mlp,
    data: &dyn DataSource,
    variant: Variant,
    form: NetForm,
    passes: &[Vec<Unit>],
    sink: &mut dyn ResultSink,
) -> Result<()> {
    let n = data.len();
    let nf = n as f64;
    log::info!(
        "{form:?}: {} bands of rows in {} passes over the samples (accumulator budget {} bytes, FISHER_CPU_MEMORY_MB)",
        passes.iter().map(Vec::len).sum::<usize>(),
        passes.len(),
        be.accumulator_bytes
    );
    let layers = SumLayer::of(mlp);
    let offsets: Vec<usize> = layers.iter().scan(0, |at, l| Some(std::mem::replace(at, *at + l.params()))).collect();
    for units in passes {
        let reduction = absorbed(reduce_lanes(be, mlp, data, variant, form, 0..n, DEFAULT_BLOCK_SAMPLES, Some(units))?);
        let sums = match reduction {
            Reduction::Syrk { sums, .. } | Reduction::Diag { sums, .. } | Reduction::Kfac { sums, .. } => sums,
            Reduction::Grads(_) | Reduction::Norms(_) => unreachable!("a form of sums"),
        };
        for (unit, sum) in units.iter().zip(sums) {
            if form == NetForm::Diagonal {
                let l = &layers[unit.layer];
                let values = match sum.combined()? {
                    Ok(values) => values,
                    Err(Live::Dense(a)) => a.into_values().into_raw_vec_and_offset().0,
                    Err(Live::Sym(_)) => unreachable!("a dense block sum"),
                };
                put_diag_rows(sink, l, offsets[unit.layer], unit.rows.clone(), &values, nf)?;
                continue;
            }
            let (m, band) = (unit.size, unit.rows.clone());
            match sum.combined()? {
                // Several blocks: the exact sum's values, scaled as `symmetric_of` scales them.
                Ok(values) => {
                    let (base, scale) = (packed_row(band.start, m), 1.0 / nf);
                    put_band(sink, unit.layer, m, band, |i, j| (values[packed_row(i, m) - base + j - i] * scale) as f32)?;
                }
                Err(Live::Sym(s)) => s.put_band_into(nf, sink, unit.layer)?,
                Err(Live::Dense(_)) => unreachable!("a symmetric block sum"),
            }
        }
    }
    Ok(())
}

/// Puts the diag of the rows `rows` of layer `l` (θ offset `offset`) from their sums
/// `values` ((rows × (in+1)), row-major, the bias last) into tensor 0 of `sink`: runs of the
/// weights' values (a group of whole rows, about 64 K values, at a time) and the biases' run,
/// each value (sum / N) as f32 as [`diag_of`] gives it.
fn put_diag_rows(sink: &mut dyn ResultSink, l: &SumLayer, offset: usize, rows: std::ops::Range<usize>, values: &[f64], nf: f64) -> Result<()> {
    let width = l.augmented_in().max(1);
    let group = ((1 << 16) / width).max(1);
    let mut run = Vec::new();
    for (g, chunk) in values.chunks(group * width).enumerate() {
        run.clear();
        run.extend(chunk.chunks(width).flat_map(|row| row[..l.fan_in].iter().map(|&v| (v / nf) as f32)));
        sink.put(0, offset + (rows.start + g * group) * l.fan_in, &run)?;
    }
    if l.bias {
        let biases: Vec<f32> = values.chunks(width).map(|row| (row[l.fan_in] / nf) as f32).collect();
        sink.put(0, offset + l.fan_out * l.fan_in + rows.start, &biases)?;
    }
    Ok(())
}

/// The network Fisher of `form` put into `sink` (see [`crate::FisherBackend::network_fisher_into`]):
/// in passes, band by band, when the sums exceed the accumulator budget; otherwise computed
/// whole and put.
pub(crate) fn network_fisher_into(
    be: &CpuBackend,
    mlp: &Mlp,
    data: &dyn DataSource,
    variant: Variant,
    form: NetForm,
    sink: &mut dyn ResultSink,
) -> Result<()> {
    let n = data.len();
    let plan = NetPlan::new(mlp, variant)?;
    plan.check_result(form, n, be.result_limit)?;
    match sum_passes(be, &plan, form, n) {
        Some(passes) => sums_in_passes(be, mlp, data, variant, form, &passes, sink),
        None => network_fisher(be, mlp, data, variant, form)?.put_into(sink),
    }
}

/// The reduction of `form` over the samples `range` of `data`: micro-batches walked from
/// the start of every block of `block` samples (counted from sample 0), the block sums
/// combined exactly when there are several. A full F or the layer blocks sum only the bands
/// of `units` when given (one pass of [`symmetric_in_passes`]), every row otherwise.
///
/// With the second lane's sums of the last block (see [`LANES`]) not yet absorbed: a caller
/// that finishes them can do both in one pass ([`BlockSum::finish_symmetric`]); the others
/// take [`absorbed`].
#[allow(clippy::too_many_arguments)]
fn reduce_lanes(
    be: &CpuBackend,
    mlp: &Mlp,
    data: &dyn DataSource,
    variant: Variant,
    form: NetForm,
    range: std::ops::Range<usize>,
    block: usize,
    units: Option<&[Unit]>,
) -> Result<(Reduction, Option<Reduction>)> {
    let n = data.len();
    if range.end > n || range.start > range.end || block == 0 {
        return Err(FisherError::InvalidInput(format!(
            "samples {}..{} in blocks of {block} do not fit the {n} samples of the data",
            range.start, range.end
        )));
    }
    let plan = NetPlan::new(mlp, variant)?;
    let compact_r = compact_rows(&plan, data, variant, form);
    let compact = compact_r.is_some();
    let (depth, r, p) = (plan.depth(), compact_r.unwrap_or(plan.r), plan.params);
    let ranges: Vec<(usize, usize)> = plan.shapes.iter().map(|s| (s.offset, s.params)).collect();
    // The micro-batch depends on the block and the whole data, not on the range, so that a
    // shard walks its blocks exactly as the single run does.
    // Full F and the layer blocks over R ≥ 2 rows per sample take the Kronecker reduction
    // (`kron_add`) when a micro-batch holds whole samples (all R rows at once).
    let kron_batch = match kron_applies(&plan, form, r) {
        true => batching(be, n.min(block), r, &kron_cost(&plan)).ok().filter(|b| b.draws == r),
        false => None,
    };
    let kron = kron_batch.is_some();
    // Diag and KFAC sum in LANES lanes (see `LANES`), each with its share of the scratch.
    let lanes = lanes_of(&plan, form);
    let batch = match kron_batch {
        Some(b) => b,
        None => batching_within(be, lanes, n.min(block), r, &batch_cost(&plan, form))?,
    };
    let waug = augmented_weights(mlp);

    let make = || -> Result<Reduction> { Ok(match form {
        NetForm::Full | NetForm::Layer => {
            let whole: Vec<Unit> = match form {
                NetForm::Full => vec![Unit { layer: 0, size: p, rows: 0..p }],
                _ => ranges.iter().enumerate().map(|(layer, x)| Unit { layer, size: x.1, rows: 0..x.1 }).collect(),
            };
            let units = units.unwrap_or(&whole);
            Reduction::Syrk {
                sums: units.iter().map(|u| BlockSum::sym_band(u.size, u.rows.clone())).collect(),
                full: form == NetForm::Full,
                owners: units.iter().map(|u| u.layer).collect(),
            }
        }
        NetForm::Diagonal => {
            let whole: Vec<Unit> =
                plan.shapes.iter().enumerate().map(|(layer, s)| Unit { layer, size: s.fan_out, rows: 0..s.fan_out }).collect();
            let units = units.map_or(whole, <[Unit]>::to_vec);
            let sums = units.iter().map(|u| BlockSum::dense(u.rows.len(), plan.shapes[u.layer].ld)).collect();
            Reduction::Diag { sums, units }
        }
        NetForm::Kfac => {
            let whole: Vec<Unit> = plan
                .shapes
                .iter()
                .enumerate()
                .flat_map(|(l, s)| [Unit { layer: 2 * l, size: s.ld, rows: 0..s.ld }, Unit { layer: 2 * l + 1, size: s.fan_out, rows: 0..s.fan_out }])
                .collect();
            let units = units.map_or(whole, <[Unit]>::to_vec);
            Reduction::Kfac { sums: units.iter().map(|u| BlockSum::sym_band(u.size, u.rows.clone())).collect(), units }
        }
        NetForm::Grads => Reduction::Grads(Vec::with_capacity(plan.grads_len(range.len())?)),
        NetForm::Norms => Reduction::Norms(vec![0.0; range.len()]),
    }) };
    let mut reduction = make()?;
    let mut second_lane = if lanes > 1 { Some(make()?) } else { None };
    // The lowest layer this reduction reads: the backward pass stops there (a pass over the
    // bands of the upper layers skips the layers below them).
    let lowest = match &reduction {
        Reduction::Syrk { sums, full: true, .. } => {
            let r0 = sums.iter().map(BlockSum::first_row).min().unwrap_or(0);
            ranges.iter().position(|&(off, len)| off + len > r0).unwrap_or(0)
        }
        Reduction::Syrk { owners, .. } => owners.iter().copied().min().unwrap_or(0),
        Reduction::Diag { units, .. } => units.iter().map(|u| u.layer).min().unwrap_or(0),
        Reduction::Kfac { units, .. } => units.iter().map(|u| u.layer / 2).min().unwrap_or(0),
        Reduction::Grads(_) | Reduction::Norms(_) => 0,
    };
    // The lowest layer whose δ this reduction reads: the backward products stop there. Only
    // a KFAC pass differs from `lowest`: its A factors read the forward pass alone, so a
    // pass of A bands only needs no backward pass at all (`depth`: none) and one chunk of
    // draws.
    let lowest_delta = match &reduction {
        Reduction::Kfac { units, .. } => units.iter().filter(|u| u.layer % 2 == 1).map(|u| u.layer / 2).min().unwrap_or(depth),
        _ => lowest,
    };
    let diag_layers: Vec<bool> = match &reduction {
        Reduction::Diag { units, .. } => (0..depth).map(|l| units.iter().any(|u| u.layer == l)).collect(),
        _ => vec![false; depth],
    };
    // Where the CPU has AVX-512F, the diag's products square their operands while packing
    // them (`syrk_avx512::gemm_tn`): neither ã∘ã nor (for one row per sample) δ∘δ is formed.
    let squares_in_kernel = be.diag_kernel && diag_kernel_available();
    let act_squares_wanted: &[bool] = if squares_in_kernel { &[] } else { &diag_layers };
    let first = range.start;
    let blocks = (range.start / block..range.end.div_ceil(block)).map(|b| (b * block).max(range.start)..((b + 1) * block).min(range.end));

    // One micro-batch of samples s0 .. s0 + m summed into `reduction`.
    let step = |reduction: &mut Reduction, s0: usize, m: usize| -> Result<()> {
        // Forward: ã_l (m × augmented_in) and z_l (m × out) for every layer, once for all
        // draws, with φ'(z_l) for the backward pass and ã∘ã for diag.
        let Pass { acts, output, derivs, squares: act_squares } = forward_pass(mlp, &waug, data, s0, m, act_squares_wanted)?;
        // Output rows and backward, d draws (rows per sample) at a time.
        for (q0, d) in batch.draw_ranges(r) {
            // A KFAC pass of A bands only reads the forward pass: the first chunk adds them.
            if q0 > 0 && lowest_delta == depth {
                break;
            }
            let mut delta = output_rows(output.view(), data, s0, variant, (q0, d), compact)?;
            let mut grad_rows = match &*reduction {
                Reduction::Syrk { .. } if kron => None,
                Reduction::Grads(_) | Reduction::Syrk { full: true, .. } => Some(Array2::<f32>::zeros((m * d, p))),
                _ => None,
            };
            // δ of every layer reached, for the Kronecker reduction.
            let mut kept: Vec<Option<Array2<f32>>> = vec![None; if kron { depth } else { 0 }];
            // Σ_d δ² per sample of the current layer, where the backward pass made it.
            let mut delta_squares: Option<Array2<f32>> = None;
            for l in (lowest..depth).rev() {
                let layer = &mlp.layers[l];
                let act = &acts[l];
                match &mut *reduction {
                    Reduction::Diag { sums, units } => {
                        if diag_layers[l] {
                            // Σ_d δ² per sample (f64 past 64 draws), then (Σ_d δ²)ᵀ (ã∘ã),
                            // DIAG_ROWS output rows per `gemm`, aligned the same in every plan.
                            // The products add into the sum's f32 `pending` in place. With
                            // one row per sample the kernel squares δ itself.
                            let dsq = match squares_in_kernel && d == 1 {
                                true => None,
                                false => Some(delta_squares.take().unwrap_or_else(|| row_square_sums(delta.view(), d))),
                            };
                            for (sum, unit) in sums.iter_mut().zip(units.iter()).filter(|(_, u)| u.layer == l) {
                                let acc = sum.dense_mut();
                                let accumulate = acc.begin(m);
                                for c0 in unit.rows.clone().step_by(DIAG_ROWS) {
                                    let c1 = (c0 + DIAG_ROWS).min(unit.rows.end);
                                    let at = c0 - unit.rows.start;
                                    let (left, square_left) = match &dsq {
                                        Some(x) => (x.view(), false),
                                        None => (delta.view(), true),
                                    };
                                    if squares_in_kernel {
                                        diag_product(left, square_left, act.view(), c0..c1, acc.pending.slice_mut(s![at..at + c1 - c0, ..]), accumulate);
                                    } else {
                                        let rows = acc.pending.slice_mut(s![at..at + c1 - c0, ..]);
                                        gemm_into(left.slice(s![.., c0..c1]).t(), act_squares[l].view(), rows, accumulate);
                                    }
                                }
                            }
                        }
                    }
                    Reduction::Kfac { sums, units } => {
                        for (sum, unit) in sums.iter_mut().zip(units.iter()) {
                            // A is a sum over samples, not rows: once per sample, with its
                            // first chunk.
                            if unit.layer == 2 * l && q0 == 0 {
                                sum.sym_mut().add(act.view());
                            } else if unit.layer == 2 * l + 1 {
                                sum.sym_mut().add(delta.view());
                            }
                        }
                    }
                    Reduction::Syrk { .. } if kron => kept[l] = Some(delta.clone()),
                    Reduction::Syrk { sums, full, owners } => {
                        if *full {
                            let rows = grad_rows.as_mut().expect("rows");
                            let (off, len) = ranges[l];
                            // A band from column r₀ on reads no column left of it.
                            if off + len > sums[0].first_row() {
                                outer_rows(delta.view(), act.view(), d, layer.fan_in(), layer.bias.is_some(), rows.slice_mut(s![.., off..off + len]));
                            }
                        } else if owners.contains(&l) {
                            let mut rows = Array2::<f32>::zeros((m * d, ranges[l].1));
                            outer_rows(delta.view(), act.view(), d, layer.fan_in(), layer.bias.is_some(), rows.view_mut());
                            for (sum, _) in sums.iter_mut().zip(owners.iter()).filter(|(_, &o)| o == l) {
                                sum.sym_mut().add(rows.view());
                            }
                        }
                    }
                    Reduction::Grads(_) => {
                        let rows = grad_rows.as_mut().expect("rows");
                        let (off, len) = ranges[l];
                        outer_rows(delta.view(), act.view(), d, layer.fan_in(), layer.bias.is_some(), rows.slice_mut(s![.., off..off + len]));
                    }
                    Reduction::Norms(out) => {
                        for s in 0..m {
                            let a2: f64 = act.row(s).iter().map(|&v| (v as f64).powi(2)).sum();
                            let d2: f64 = (0..d).map(|q| delta.row(s * d + q).iter().map(|&v| (v as f64).powi(2)).sum::<f64>()).sum();
                            out[s0 - first + s] += d2 * a2;
                        }
                    }
                }
                if l > lowest && l > lowest_delta {
                    // Diag takes Σ_d δ² of the layer below with its scaling (one pass),
                    // unless its kernel squares δ itself.
                    let squares = diag_layers[l - 1] && !(squares_in_kernel && d == 1);
                    let (back, sums) = backward_rows(be, delta.view(), d, layer.weight.view(), derivs[l - 1].view(), squares);
                    delta_squares = sums;
                    delta = back;
                }
            }
            match &mut *reduction {
                Reduction::Syrk { sums, full, owners } if kron => kron_add(sums, owners, *full, &plan.shapes, &acts, &kept, d),
                // Every band of F in this pass reads the same rows.
                Reduction::Syrk { sums, full: true, .. } => {
                    let rows = grad_rows.as_ref().expect("rows");
                    sums.iter_mut().for_each(|sum| sum.sym_mut().add(rows.view()));
                }
                // Either d = R or m = 1 (see `Batching`), so chunks append in sample-major order.
                Reduction::Grads(out) => out.extend(grad_rows.expect("rows").iter().copied()),
                _ => {}
            }
        }
        Ok(())
    };

    for blk in blocks {
        if blk.start > first {
            if let Some(lane) = second_lane.as_mut() {
                reduction.absorb(lane);
            }
            reduction.end_block()?;
        }
        let micro_batches: Vec<(usize, usize)> = batch.sample_ranges(blk.len()).map(|(s, m)| (blk.start + s, m)).collect();
        match second_lane.as_mut() {
            None => micro_batches.iter().try_for_each(|&(s0, m)| step(&mut reduction, s0, m))?,
            // Micro-batches 2k and 2k + 1 of the block, one per lane, at the same time.
            Some(lane) => {
                for pair in micro_batches.chunks(2) {
                    match *pair {
                        [(s0, m), (s1, m1)] => {
                            let (a, b) = rayon::join(|| step(&mut reduction, s0, m), || step(lane, s1, m1));
                            a?;
                            b?;
                        }
                        [(s0, m)] => step(&mut reduction, s0, m)?,
                        _ => unreachable!("chunks of two"),
                    }
                }
            }
        }
    }
    Ok((reduction, second_lane))
}


/// w = Λ ż per sample (see `head_fvp` in shaders/mlp.wgsl): Λ = E_y[e eᵀ] of the variant,
/// with the targets of the m = z.nrows() samples from s0 read from `data`.
pub(crate) fn lambda_times(z: ArrayView2<'_, f32>, zdot: ArrayView2<'_, f32>, data: &dyn DataSource, s0: usize, variant: Variant) -> Result<Array2<f32>> {
    let (m, c) = z.dim();
    let targets = data.targets(s0, m)?;
    let mut w = Array2::<f32>::zeros((m, c));
    w.axis_iter_mut(Axis(0)).into_par_iter().enumerate().for_each(|(s, mut out)| {
        let zr = z.row(s);
        let t = zdot.row(s);
        let sample = (s0 + s) as u32;
        match &targets {
            TargetRows::Values(values) => match variant {
                Variant::True => out.assign(&t),
                Variant::Empirical => {
                    let e: Vec<f32> = (0..c).map(|j| values[[s, j]] - zr[j]).collect();
                    let dot: f32 = e.iter().zip(t.iter()).map(|(a, b)| a * b).sum();
                    for j in 0..c {
                        out[j] = e[j] * dot;
                    }
                }
                Variant::MonteCarlo { samples, seed } => {
                    // The mean over K draws in f64: K may be 10⁹, far past an f32 running sum.
                    let mut sum = vec![0f64; c];
                    for q in 0..samples {
                        let eps: Vec<f32> = (0..c).map(|j| mc_normal(seed, sample, q as u32, j)).collect();
                        let dot: f32 = eps.iter().zip(t.iter()).map(|(a, b)| a * b).sum();
                        for j in 0..c {
                            sum[j] += f64::from(eps[j] * dot);
                        }
                    }
                    for j in 0..c {
                        out[j] = (sum[j] / samples as f64) as f32;
                    }
                }
            },
            TargetRows::Classes(labels) => {
                let zmax = zr.fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                let denom: f32 = zr.iter().map(|&v| (v - zmax).exp()).sum();
                let p: Vec<f32> = zr.iter().map(|&v| (v - zmax).exp() / denom).collect();
                let pdot: f32 = p.iter().zip(t.iter()).map(|(a, b)| a * b).sum();
                let mut add_row = |y: usize, weight: f32| {
                    let dot = t[y] - pdot;
                    for j in 0..c {
                        out[j] += ((j == y) as u8 as f32 - p[j]) * dot * weight;
                    }
                };
                match variant {
                    Variant::True => {
                        for j in 0..c {
                            out[j] = p[j] * (t[j] - pdot);
                        }
                    }
                    Variant::Empirical => add_row(labels[s] as usize, 1.0),
                    Variant::MonteCarlo { samples, seed } => {
                        // Σ_k (onehot(y_k) − p)(ż_{y_k} − pᵀż) = Σ_y count_y (onehot(y) − p)(ż_y − pᵀż):
                        // count the K draws per class (exact), then one weighted row per class.
                        let mut counts = vec![0u64; c];
                        for q in 0..samples {
                            counts[mc_class(seed, sample, q as u32, &p)] += 1;
                        }
                        for (y, &count) in counts.iter().enumerate() {
                            if count > 0 {
                                add_row(y, (count as f64 / samples as f64) as f32);
                            }
                        }
                    }
                }
            }
        }
    });
    Ok(w)
}

/// Implicit F·v and vᵀFv (see `src/backend/gpu/network.rs::network_fvp` for the method):
/// one direction through [`CpuNetOperator`].
pub(crate) fn network_fvp(be: &CpuBackend, mlp: &Mlp, data: &dyn DataSource, variant: Variant, v: ArrayView1<'_, f32>, product: bool) -> Result<Fvp> {
    let mut op = CpuNetOperator::new(be, mlp, data, variant, 0)?;
    let out = op.apply(v.insert_axis(Axis(0)), product)?;
    Ok(Fvp { product: out.products.map(|p| p.row(0).to_owned()), quadratic: out.quadratics[0] })
}

/// Bytes of forward pass a [`CpuNetOperator`] keeps between products by default
/// ([`CpuBackend::with_forward_cache_bytes`]): 256 MiB holds W3's (784-512-512-10,
/// N = 4096: 44 MiB) and MNIST-sized runs of 10⁴–10⁵ samples; beyond it every product
/// recomputes its forward pass, as the GPU path does.
pub(crate) const FORWARD_CACHE_BYTES: u64 = 256 << 20;

/// One micro-batch's forward pass: ã_l and φ'(z_l) of every layer, and the output z_{L−1}
/// (the hidden z_l are dropped once φ'(z_l) is taken: the products need no more of them).
struct Forward {
    acts: Vec<Array2<f32>>,
    output: Array2<f32>,
    derivs: Vec<Array2<f32>>,
}

/// The implicit Fisher of an MLP on its data, on the CPU, for many products: F·V for a
/// block of k directions at once (rows of V, θ order).
///
/// Per micro-batch of m samples, in the direction-major layout (k·m rows, direction j's
/// rows j·m .. (j+1)·m):
/// * forward-mode ż_l = ã_l [V_l | v_b]ᵀ + ȧ_l W_lᵀ and ȧ_{l+1} = ż_l ∘ φ'(z_l): one GEMM
///   per direction for the first term, one for all k directions for the second;
/// * at the output w = Λ ż per sample and direction (`lambda_times`); vᵀFv = Σ ż·w / N;
/// * reverse mode δ_{l−1} = (δ_l W_l) ∘ φ'(z_{l−1}) (one GEMM for all k) and the product's
///   layer block Σ δ_lᵀ ã_l (one GEMM per direction), summed over micro-batches in f64.
///
/// The forward pass (ã, z, φ'(z)) of every micro-batch is kept across products when it
/// fits in the cache budget, so a Lanczos or SLQ run pays for it once; otherwise each
/// product recomputes it. Memory: the cache, plus k·m rows of the widest layer ×3.
pub(crate) struct CpuNetOperator<'a> {
    be: &'a CpuBackend,
    mlp: &'a Mlp,
    data: &'a dyn DataSource,
    variant: Variant,
    plan: NetPlan,
    /// [W_l | b_l], viewed in `mlp`.
    waug: Vec<AugmentedWeight<'a>>,
    /// Samples per micro-batch of the forward pass.
    samples: usize,
    /// The forward pass of every micro-batch, once computed, when it fits `cache_bytes`.
    cache: Option<Vec<Forward>>,
    cache_bytes: u64,
}

impl<'a> CpuNetOperator<'a> {
    /// The operator; `cache_bytes` bounds the forward pass kept between products (0: none).
    pub(crate) fn new(be: &'a CpuBackend, mlp: &'a Mlp, data: &'a dyn DataSource, variant: Variant, cache_bytes: u64) -> Result<Self> {
        let plan = NetPlan::new(mlp, variant)?;
        let max_w = mlp.layers.iter().map(|l| l.augmented_in().max(l.fan_out())).max().unwrap_or(1);
        // The forward pass of one sample (ã, z, φ') plus one row per direction of the three
        // widest tangent/cotangent buffers, for one direction: the block is split to fit.
        let forward: usize = mlp.layers.iter().map(|l| l.augmented_in() + 2 * l.fan_out()).sum();
        let samples = micro_batch(be, data.len(), forward.saturating_add(max_w.saturating_mul(3)))?;
        Ok(CpuNetOperator { be, mlp, data, variant, plan, waug: augmented_weights(mlp), samples, cache: None, cache_bytes })
    }

    fn forward_of(&self, s0: usize, m: usize) -> Result<Forward> {
        let Pass { acts, output, derivs, .. } = forward_pass(self.mlp, &self.waug, self.data, s0, m, &[])?;
        Ok(Forward { acts, output, derivs })
    }

    /// Bytes of [`Forward`] for all N samples: ã_l of every layer, φ'(z_l) of the hidden ones and
    /// the output z.
    fn forward_bytes(&self) -> u64 {
        let per_sample: usize = self.mlp.layers.iter().map(|l| l.augmented_in() + l.fan_out()).sum();
        (per_sample as u64).saturating_mul(4).saturating_mul(self.data.len() as u64)
    }

    /// F·V (when `product`) and vⱼᵀFvⱼ for the k rows vⱼ of `v` (k × P).
    pub(crate) fn apply(&mut self, v: ArrayView2<'_, f32>, product: bool) -> Result<crate::backend::BlockFvp> {
        let (k, p) = v.dim();
        if p != self.plan.params {
            return Err(FisherError::InvalidInput(format!("direction has {p} entries but the model has {} parameters", self.plan.params)));
        }
        let n = self.data.len();
        let depth = self.plan.depth();
        // Per direction and layer: [V | v_b] viewed in the direction's row (copied only when
        // the row is not contiguous), so that no direction is copied per layer.
        let rows: Vec<Cow<'_, [f32]>> = v.outer_iter().map(|row| row.to_slice().map_or_else(|| Cow::Owned(row.to_vec()), Cow::Borrowed)).collect();
        let dirs: Vec<Vec<AugmentedWeight<'_>>> = rows
            .iter()
            .map(|row| self.plan.shapes.iter().map(|s| AugmentedWeight::of_direction(s, row)).collect::<Result<Vec<_>>>())
            .collect::<Result<_>>()?;
        let mut acc: Vec<Vec<Array2<f64>>> = if product {
            (0..k).map(|_| self.mlp.layers.iter().map(|l| Array2::zeros((l.fan_out(), l.augmented_in()))).collect()).collect()
        } else {
            Vec::new()
        };
        let mut quadratics = vec![0f64; k];
        if self.cache.is_none() && self.cache_bytes > 0 && self.forward_bytes() <= self.cache_bytes {
            let batches = (0..n).step_by(self.samples.max(1)).map(|s0| self.forward_of(s0, self.samples.min(n - s0))).collect::<Result<_>>()?;
            self.cache = Some(batches);
        }
        let max_w = self.mlp.layers.iter().map(|l| l.augmented_in().max(l.fan_out())).max().unwrap_or(1);
        for (b, s0) in (0..n).step_by(self.samples.max(1)).enumerate() {
            let m = self.samples.min(n - s0);
            let fresh;
            let fw = match &self.cache {
                Some(batches) => &batches[b],
                None => {
                    fresh = self.forward_of(s0, m)?;
                    &fresh
                }
            };
            // Directions per pass: k·m rows of the three widest buffers within the budget.
            let per_direction = (m * max_w * 3 * 4) as u64;
            let chunk = ((self.be.batch_bytes / per_direction.max(1)) as usize).clamp(1, k.max(1));
            for j0 in (0..k).step_by(chunk) {
                let kk = chunk.min(k - j0);
                self.block_pass(fw, s0, m, &dirs[j0..j0 + kk], product, &mut quadratics[j0..j0 + kk], if product { &mut acc[j0..j0 + kk] } else { &mut [] })?;
            }
            debug_assert_eq!(fw.derivs.len() + 1, depth);
        }
        let nf = n as f64;
        let quadratics = quadratics.into_iter().map(|q| q / nf).collect();
        if !product {
            return Ok(crate::backend::BlockFvp { products: None, quadratics });
        }
        let mut out = Array2::<f32>::zeros((k, p));
        for (mut row, acc) in out.outer_iter_mut().zip(&acc) {
            let row = row.as_slice_mut().expect("fresh array");
            for (s, a) in self.plan.shapes.iter().zip(acc) {
                s.scatter(row, |o, i| (a[[o, i]] / nf) as f32);
            }
        }
        Ok(crate::backend::BlockFvp { products: Some(out), quadratics })
    }

    /// The forward-mode and reverse-mode passes of one micro-batch for kk directions.
    #[allow(clippy::too_many_arguments)]
    fn block_pass(&self, fw: &Forward, s0: usize, m: usize, dirs: &[Vec<AugmentedWeight<'_>>], product: bool, quadratics: &mut [f64], acc: &mut [Vec<Array2<f64>>]) -> Result<()> {
        let kk = dirs.len();
        let depth = self.plan.depth();
        let mut tangent: Option<Array2<f32>> = None; // ȧ (kk·m × fan_in); None = 0 for the inputs
        let mut zdot = Array2::<f32>::zeros((0, 0));
        for (l, layer) in self.mlp.layers.iter().enumerate() {
            zdot = Array2::<f32>::zeros((kk * m, layer.fan_out()));
            for (j, dir) in dirs.iter().enumerate() {
                dir[l].product_into(fw.acts[l].view(), zdot.slice_mut(s![j * m..(j + 1) * m, ..]));
            }
            if let Some(t) = tangent.take() {
                matmul_add(t.view(), layer.weight.t(), zdot.view_mut());
            }
            if l + 1 < depth {
                // ȧ_{l+1} = ż_l ∘ φ'(z_l) in ż_l's place: a hidden ż_l is not needed past here.
                for j in 0..kk {
                    scale_rows(zdot.slice_mut(s![j * m..(j + 1) * m, ..]), fw.derivs[l].view(), 1);
                }
                tangent = Some(std::mem::take(&mut zdot));
            }
        }
        let z_out = fw.output.view();
        let mut w = Array2::<f32>::zeros(zdot.dim());
        for j in 0..kk {
            let rows = s![j * m..(j + 1) * m, ..];
            let wj = lambda_times(z_out, zdot.slice(rows), self.data, s0, self.variant)?;
            quadratics[j] += zdot.slice(rows).iter().zip(wj.iter()).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum::<f64>();
            w.slice_mut(rows).assign(&wj);
        }
        if !product {
            return Ok(());
        }
        let mut delta = w;
        for l in (0..depth).rev() {
            let layer = &self.mlp.layers[l];
            let mut part = Array2::<f32>::zeros((layer.fan_out(), layer.augmented_in()));
            for (j, acc) in acc.iter_mut().enumerate() {
                matmul(delta.slice(s![j * m..(j + 1) * m, ..]).t(), fw.acts[l].view(), part.view_mut());
                add_into_f64(acc[l].view_mut(), part.view());
            }
            if l > 0 {
                let mut back = matmul_new(delta.view(), layer.weight.view());
                for j in 0..kk {
                    scale_rows(back.slice_mut(s![j * m..(j + 1) * m, ..]), fw.derivs[l - 1].view(), 1);
                }
                delta = back;
            }
        }
        Ok(())
    }
}

impl crate::backend::NetworkOperator for CpuNetOperator<'_> {
    fn dim(&self) -> usize {
        self.plan.params
    }

    fn apply(&mut self, v: ArrayView2<'_, f32>, product: bool) -> Result<crate::backend::BlockFvp> {
        CpuNetOperator::apply(self, v, product)
    }
}

/// The Fisher's output-space twin K = B Bᵀ / N on the CPU, for top eigenvalues when the
/// N·R gradient rows are fewer than the P parameters.
///
/// B (N·R × P) has the per-row gradients b_{ir} = δ_{l,ir} ⊗ ã_{l,i} as rows, so F = BᵀB/N and
/// K = BBᵀ/N share their non-zero eigenvalues. K is applied without forming B: the output
/// rows δ_l of every layer (N·R × out_l) and the activations ã_l (N × ld) are computed once
/// (one forward and one R-row backward pass, as for diag); then per vector u ∈ ℝ^{N·R}
///
/// * Bᵀu, layer by layer: e_i = Σ_r u_{ir} δ_{l,ir} (N × out_l), then G_l = Eᵀ Ã_l;
/// * B(Bᵀu): H_l = Ã_l G_lᵀ (N × out_l), then (Bw)_{ir} = Σ_l δ_{l,ir} · H_{l,i}.
///
/// That is two GEMMs of 2·N·P_l flops per layer, against four (plus two propagation GEMMs
/// through every hidden layer) for an F·v product, and the Lanczos basis lives in ℝ^{N·R}
/// instead of ℝ^P. Memory: 4·N·(Σ ld + R·Σ out) bytes, refused past the caller's budget.
pub(crate) struct CpuGramOperator {
    n: usize,
    r: usize,
    /// ã_l of every sample (N × ld), per layer.
    acts: Vec<Array2<f32>>,
    /// δ_l of every output row (N·R × out_l, sample-major), per layer.
    deltas: Vec<Array2<f32>>,
}

impl CpuGramOperator {
    /// Bytes the operator holds for `mlp` on `n` samples of R rows.
    pub(crate) fn bytes(mlp: &Mlp, n: usize, r: usize) -> u128 {
        let ld: u128 = mlp.layers.iter().map(|l| l.augmented_in() as u128).sum();
        let out: u128 = mlp.layers.iter().map(|l| l.fan_out() as u128).sum();
        4 * n as u128 * (ld + r as u128 * out)
    }

    /// The operator, or `None` when it would hold more than `budget` bytes.
    pub(crate) fn new(be: &CpuBackend, mlp: &Mlp, data: &dyn DataSource, variant: Variant, budget: u64) -> Result<Option<Self>> {
        let n = data.len();
        let plan = NetPlan::new(mlp, variant)?;
        let (depth, r) = (plan.depth(), plan.r);
        if Self::bytes(mlp, n, r) > u128::from(budget) {
            return Ok(None);
        }
        let waug = augmented_weights(mlp);
        let mut acts: Vec<Array2<f32>> = mlp.layers.iter().map(|l| Array2::zeros((n, l.augmented_in()))).collect();
        let mut deltas: Vec<Array2<f32>> = mlp.layers.iter().map(|l| Array2::zeros((n * r, l.fan_out()))).collect();
        // Whole samples per micro-batch (the rows of one sample are never split here).
        let max_w = plan.max_width();
        let forward: usize = mlp.layers.iter().map(|l| l.augmented_in() + 2 * l.fan_out()).sum();
        let m_max = micro_batch(be, n, forward.saturating_add(r.saturating_mul(2 * max_w)))?;
        for s0 in (0..n).step_by(m_max.max(1)) {
            let m = m_max.min(n - s0);
            let Pass { acts: a, output, derivs, .. } = forward_pass(mlp, &waug, data, s0, m, &[])?;
            let mut delta = output_rows(output.view(), data, s0, variant, (0, r), false)?;
            for l in (0..depth).rev() {
                acts[l].slice_mut(s![s0..s0 + m, ..]).assign(&a[l]);
                deltas[l].slice_mut(s![s0 * r..(s0 + m) * r, ..]).assign(&delta);
                if l > 0 {
                    let layer = &mlp.layers[l];
                    let mut back = matmul_new(delta.view(), layer.weight.view());
                    scale_rows(back.view_mut(), derivs[l - 1].view(), r);
                    delta = back;
                }
            }
        }
        Ok(Some(CpuGramOperator { n, r, acts, deltas }))
    }

    /// K u for one u ∈ ℝ^{N·R}, f32 GEMMs, returned in f64.
    fn apply_one(&self, u: ArrayView1<'_, f32>) -> Vec<f64> {
        let (n, r) = (self.n, self.r);
        let u = u.as_slice().expect("a row of a standard-layout block");
        let mut out = vec![0f64; n * r];
        for (act, delta) in self.acts.iter().zip(&self.deltas) {
            let out_l = delta.ncols();
            let ds = delta.as_slice().expect("standard layout");
            // e_i = Σ_r u_ir δ_ir.
            let mut e = Array2::<f32>::zeros((n, out_l));
            e.as_slice_mut().expect("fresh array").par_chunks_mut(out_l).enumerate().for_each(|(i, row)| {
                for q in 0..r {
                    let w = u[i * r + q];
                    if w != 0.0 {
                        for (x, &d) in row.iter_mut().zip(&ds[(i * r + q) * out_l..(i * r + q + 1) * out_l]) {
                            *x += w * d;
                        }
                    }
                }
            });
            let g = matmul_new(e.t(), act.view());
            let h = matmul_new(act.view(), g.t());
            let hs = h.as_slice().expect("fresh array");
            out.par_chunks_mut(r).enumerate().for_each(|(i, o)| {
                let hrow = &hs[i * out_l..(i + 1) * out_l];
                for (q, o) in o.iter_mut().enumerate() {
                    let drow = &ds[(i * r + q) * out_l..(i * r + q + 1) * out_l];
                    *o += f64::from(drow.iter().zip(hrow).map(|(&a, &b)| a * b).sum::<f32>());
                }
            });
        }
        let nf = n as f64;
        out.iter_mut().for_each(|x| *x /= nf);
        out
    }
}

impl crate::backend::NetworkOperator for CpuGramOperator {
    fn dim(&self) -> usize {
        self.n * self.r
    }

    fn apply(&mut self, v: ArrayView2<'_, f32>, product: bool) -> Result<crate::backend::BlockFvp> {
        let (k, d) = v.dim();
        if d != self.n * self.r {
            return Err(FisherError::InvalidInput(format!("the Gram operator has dimension {} but the vector has {d}", self.n * self.r)));
        }
        let mut products = Array2::<f32>::zeros((k, d));
        let mut quadratics = Vec::with_capacity(k);
        for (j, row) in v.outer_iter().enumerate() {
            let row = row.as_standard_layout();
            let ku = self.apply_one(row.view());
            quadratics.push(ku.iter().zip(row.iter()).map(|(&a, &b)| a * f64::from(b)).sum());
            products.row_mut(j).iter_mut().zip(&ku).for_each(|(o, &x)| *o = x as f32);
        }
        Ok(crate::backend::BlockFvp { products: product.then_some(products), quadratics })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::problem::synthetic_problem;
    use crate::model::{ActivationSpec, Likelihood};

    fn bits(f: &NetFisher) -> Vec<u64> {
        f.values().into_iter().map(f64::to_bits).collect()
    }

    #[test]
    fn softmax_factor_rows_sum_to_the_softmax_covariance() {
        // Σ_q b_q b_qᵀ = diag(p) − ppᵀ, including two classes, a dominant class, an
        // underflowed probability and ties for the largest (dyadic p, so that Σ p = 1 exactly).
        let cases: [&[f32]; 5] = [&[0.25, 0.75], &[0.125, 0.25, 0.125, 0.5], &[0.0, 0.5, 0.5], &[1.0 - 1.0 / 1024.0, 1.0 / 2048.0, 1.0 / 2048.0], &[0.0625; 16]];
        for p in cases {
            let c = p.len();
            let b = softmax_factor(p);
            assert_eq!(b.len(), (c - 1) * c);
            for i in 0..c {
                for j in 0..c {
                    let got: f64 = (0..c - 1).map(|q| b[q * c + i] * b[q * c + j]).sum();
                    let want = if i == j { f64::from(p[i]) } else { 0.0 } - f64::from(p[i]) * f64::from(p[j]);
                    assert!((got - want).abs() <= 1e-12, "p = {p:?}: ({i}, {j}) {got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn balanced_micro_batches_cover_the_samples_within_the_cap_in_pairs_of_lanes() {
        // The example of the docs.
        assert_eq!(balanced(Batching { samples: 950, draws: 1 }, 4096, 1, 2), Batching { samples: 688, draws: 1 });
        for n in [1usize, 2, 3, 17, 100, 1000, 4096, 65_536] {
            for cap in [1usize, 7, 16, 100, 950, 4096] {
                for lanes in [1usize, 2] {
                    let b = balanced(Batching { samples: cap.min(n), draws: 3 }, n, 3, lanes);
                    let ranges: Vec<(usize, usize)> = b.sample_ranges(n).collect();
                    assert!(b.samples >= 1 && b.samples <= cap.min(n), "n {n} cap {cap}: {b:?}");
                    assert_eq!(ranges.iter().map(|r| r.1).sum::<usize>(), n, "n {n} cap {cap}");
                    assert!(ranges.windows(2).all(|w| w[0].0 + w[0].1 == w[1].0), "n {n} cap {cap}: contiguous");
                    // No more micro-batches than the cap needs, rounded up to the lanes.
                    assert!(ranges.len() <= n.div_ceil(cap.min(n)).next_multiple_of(lanes), "n {n} cap {cap} lanes {lanes}: {}", ranges.len());
                }
            }
        }
        // Chunks of draws are left alone.
        assert_eq!(balanced(Batching { samples: 1, draws: 5 }, 100, 9, 2), Batching { samples: 1, draws: 5 });
    }

    #[test]
    fn diag_bands_start_at_multiples_of_the_gemm_rows_and_cover_every_row() {
        // Layers of 1,300 × 21 and 4 × 1,301 values at 8 bytes each.
        let shapes = [(1300, 21), (4, 1301)];
        let whole = plan_diag(&shapes, 1 << 30, 8);
        assert_eq!(whole, vec![vec![Unit { layer: 0, size: 1300, rows: 0..1300 }, Unit { layer: 1, size: 4, rows: 0..4 }]]);
        for budget in [1u64, 100 << 10, 200 << 10] {
            let passes = plan_diag(&shapes, budget, 8);
            assert!(passes.len() >= 2, "{budget}: {passes:?}");
            let units: Vec<&Unit> = passes.iter().flatten().collect();
            for layer in 0..2 {
                let rows: Vec<_> = units.iter().filter(|u| u.layer == layer).map(|u| u.rows.clone()).collect();
                assert_eq!(rows.first().unwrap().start, 0);
                assert_eq!(rows.last().unwrap().end, shapes[layer].0);
                assert!(rows.windows(2).all(|w| w[0].end == w[1].start && w[1].start % DIAG_ROWS == 0), "{rows:?}");
            }
        }
    }

    #[test]
    fn a_pass_holding_two_bands_of_full_sums_both() {
        // Search a budget whose plan puts two bands of F into one pass (a maximal band and
        // the narrow rest), the case where only the first band used to get the rows.
        let (mlp, data) = synthetic_problem(&[9, 60, 4], 50, 3, &ActivationSpec::parse("tanh").unwrap(), Likelihood::Categorical).unwrap();
        let plan = NetPlan::new(&mlp, Variant::True).unwrap();
        let p = plan.params;
        let budget = (1..400u64)
            .map(|k| k * (16 << 10))
            .find(|&b| {
                let be = CpuBackend::new().with_accumulator_bytes(b);
                sum_passes(&be, &plan, NetForm::Full, 50).is_some_and(|passes| passes.iter().any(|units| units.len() >= 2))
            })
            .unwrap_or_else(|| panic!("no budget puts two bands of {p} rows into one pass"));
        let banded = network_fisher(&CpuBackend::new().with_accumulator_bytes(budget), &mlp, &data, Variant::True, NetForm::Full).unwrap();
        let whole = network_fisher(&CpuBackend::new(), &mlp, &data, Variant::True, NetForm::Full).unwrap();
        assert_eq!(bits(&banded), bits(&whole), "budget {budget}");
    }

    /// The diag's two paths, the AVX-512 kernel that squares while it packs (where the CPU
    /// has it) and `gemm` over the squares, against the f64 reference: one and several rows
    /// per sample, many micro-batches, a layer without bias.
    #[test]
    fn diag_on_either_kernel_matches_the_reference() {
        use crate::model::problem::synthetic_problem;
        use crate::model::{ActivationSpec, Likelihood};
        let (mut mlp, data) = synthetic_problem(&[11, 40, 6], 700, 9, &ActivationSpec::parse("relu").unwrap(), Likelihood::Categorical).unwrap();
        mlp.layers[0].bias = None;
        for variant in [Variant::Empirical, Variant::True, Variant::MonteCarlo { samples: 2, seed: 3 }] {
            let want = crate::reference::network::fisher(&mlp, &data, Likelihood::Categorical, variant, NetForm::Diagonal).unwrap();
            for be in [CpuBackend::new(), CpuBackend::new().with_gemm_diag(), CpuBackend::new().with_gemm_backward()] {
                let be = be.with_batch_bytes(32 << 10);
                let got = network_fisher(&be, &mlp, &data, variant, NetForm::Diagonal).unwrap();
                let a = got.agreement(&want).unwrap();
                assert!(a.frobenius_rel <= 1e-6 && a.max_rel <= 1e-5, "{variant:?} kernels {} {}: {a:?}", be.diag_kernel, be.backward_kernel);
            }
        }
    }

    /// A dense sum absorbed into an empty one, and the sums going on past flushes: the f64
    /// totals of every sample added, whichever side made its f64 buffer first.
    #[test]
    fn dense_sums_absorb_into_an_empty_sum_and_go_on() {
        let (mut a, mut b) = (DenseSum::new(2, 3), DenseSum::new(2, 3));
        assert!(!b.begin(1));
        b.pending.assign(&ndarray::array![[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]);
        b.flush();
        assert!(!b.begin(1));
        b.pending.fill(0.5);
        a.absorb(&mut b);
        assert_eq!(a.values(), [1.5, 2.5, 3.5, 4.5, 5.5, 6.5]);
        assert!(!a.begin(1));
        a.pending.fill(1.0);
        assert_eq!(a.values(), [2.5, 3.5, 4.5, 5.5, 6.5, 7.5]);
        a.absorb(&mut b);
        assert_eq!(a.values(), [4.0, 6.0, 8.0, 10.0, 12.0, 14.0]);
        a.clear();
        assert_eq!(a.values(), [0.0; 6]);
        assert_eq!(a.into_values().into_raw_vec_and_offset().0, [0.0; 6]);
    }

    /// A dense sum finished with its second lane ([`DenseSum::values_absorbing`]) is the
    /// lane absorbed and then the sum's values, bit for bit, for every state of either lane
    /// (never flushed, flushed, with and without samples pending) and over several of the
    /// pass's chunks; a pending −0 meets the absorb's 0 + x.
    #[test]
    fn dense_lanes_finish_as_absorbed_bit_for_bit() {
        let (rows, cols) = (130, 200);
        let lane = |flushed: bool, pending: bool, seed: u64| {
            let mut sum = DenseSum::new(rows, cols);
            let fill = |sum: &mut DenseSum, seed: u64| {
                sum.begin(1);
                sum.pending.assign(&crate::synthetic::normal_matrix(rows, cols, seed));
                sum.pending[[0, 0]] = -0.0;
            };
            if flushed {
                fill(&mut sum, seed);
                sum.flush();
            }
            if pending {
                fill(&mut sum, seed + 100);
            }
            sum
        };
        let states = [(false, false), (false, true), (true, false), (true, true)];
        for (s, &(f1, p1)) in states.iter().enumerate() {
            for (t, &(f2, p2)) in states.iter().enumerate() {
                let fused = lane(f1, p1, s as u64).values_absorbing(&lane(f2, p2, 10 + t as u64));
                let mut x = lane(f1, p1, s as u64);
                x.absorb(&mut lane(f2, p2, 10 + t as u64));
                let plain = x.into_values();
                let same = fused.iter().zip(plain.iter()).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "lanes {:?} and {:?}: values_absorbing ≠ absorb + into_values", states[s], states[t]);
            }
        }
    }

    /// The backward products on either path, the AVX-512 kernel that skips each sample's
    /// zero columns (where the CPU has it) and `gemm` with a scaling pass, against the f64
    /// reference: two ReLU layers (so that δ reaches a layer through a zero-rich derivative),
    /// one, two and five rows per sample, every form that runs the backward pass, and a
    /// tanh model (no zero columns: `gemm`).
    #[test]
    fn backward_on_either_path_matches_the_reference() {
        use crate::model::problem::synthetic_problem;
        use crate::model::{ActivationSpec, Likelihood};
        for act in ["relu", "tanh"] {
            let (mlp, data) = synthetic_problem(&[11, 40, 30, 6], 300, 5, &ActivationSpec::parse(act).unwrap(), Likelihood::Categorical).unwrap();
            for variant in [Variant::Empirical, Variant::True, Variant::MonteCarlo { samples: 2, seed: 3 }] {
                for form in [NetForm::Kfac, NetForm::Diagonal, NetForm::Full, NetForm::Layer, NetForm::Norms] {
                    let want = crate::reference::network::fisher(&mlp, &data, Likelihood::Categorical, variant, form).unwrap();
                    for be in [CpuBackend::new(), CpuBackend::new().with_gemm_backward()] {
                        let be = be.with_batch_bytes(64 << 10);
                        let got = network_fisher(&be, &mlp, &data, variant, form).unwrap();
                        let a = got.agreement(&want).unwrap();
                        assert!(a.frobenius_rel <= 1e-6 && a.max_rel <= 1e-5, "{act} {variant:?} {form:?} kernel {}: {a:?}", be.backward_kernel);
                    }
                }
            }
        }
    }

}
