//! Test support: the one tolerance helper and the invariant checkers that every test
//! (CPU, GPU, CLI) judges results with.
//!
//! * [`assert_agrees`] compares an f32 result with the f64 reference entry by entry under
//!   a [`Tolerance`] derived from the reduction length ([`Tolerance::for_sum`]); it names
//!   the worst entry, and a NaN or ±Inf never passes.
//! * [`assert_symmetric`], [`assert_psd`] and [`assert_trace_matches_mean_norm`] check
//!   properties that hold whatever the values: exact symmetry, positive semi-definiteness,
//!   and tr F = (1/N) Σᵢ ‖gᵢ‖².
//!
//! The functions panic (with `#[track_caller]`, so the failure points at the test) rather
//! than return errors: they are assertions.
//!
//! ```
//! use fisher_engine::verify::{assert_agrees, Tolerance};
//! use fisher_engine::{cpu::reference, Backend, Engine, Form};
//! let grads = fisher_engine::synthetic::gradient_like(300, 12, 5);
//! let result = Engine::new(Backend::Cpu)?.fisher_from_grads(grads.view(), &Form::Full)?;
//! let oracle = reference::reduce(grads.view(), &Form::Full)?;
//! assert_agrees(&result, &oracle, Tolerance::for_sum(300));
//! # Ok::<(), fisher_engine::FisherError>(())
//! ```

use ndarray::Array2;

use crate::fisher::FisherMatrix;

/// Unit roundoff of f32, u = 2⁻²⁴ ≈ 5.96·10⁻⁸: the largest relative error of one rounding.
pub const F32_UNIT_ROUNDOFF: f64 = 1.0 / (1u64 << 24) as f64;

/// Half the smallest f32 subnormal, 2⁻¹⁵⁰: the largest absolute error of one rounding in
/// the underflow range (the η of the standard model fl(x∘y) = (x∘y)(1+δ) + η).
pub const F32_UNDERFLOW_ERROR: f64 = 1.0 / (1u64 << 50) as f64 / (1u64 << 50) as f64 / (1u64 << 50) as f64;

/// An entry passes when |actual − reference| ≤ `abs` + `rel` · max|reference|, the maximum
/// taken over all entries of the form (errors of a sum scale with the sum of the magnitudes
/// of its terms, which for F is bounded by max|F|, not by the entry itself, so a tolerance
/// relative to each entry would be wrong for the small off-diagonal entries).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    /// Absolute part (covers underflow; tiny for normal data).
    pub abs: f64,
    /// Part relative to max|reference|.
    pub rel: f64,
}

impl Tolerance {
    /// An explicit tolerance.
    pub fn new(abs: f64, rel: f64) -> Self {
        Tolerance { abs, rel }
    }

    /// The tolerance for an f32 result whose entries are sums of `n_terms` products of f32
    /// values (n_terms = N for Full, Diagonal and BlockDiagonal; P for Gram and
    /// SampleNorms), accumulated the way every correct path of this crate does it: f32 runs
    /// of at most [`LONGEST_F32_RUN`] terms, whose partial sums are then combined in f64,
    /// with Kahan compensation, or in a tree.
    ///
    /// ```text
    /// rel = u · (2 + λ·√(b/9 + d/3))    u = 2⁻²⁴, λ = 4,
    ///                                   b = min(n, 512), d = log₂⌈n/b⌉
    /// abs = n · 2⁻¹⁵⁰
    /// ```
    ///
    /// Derivation (standard model fl(x∘y) = (x∘y)(1+δ) + η, |δ| ≤ u, |η| ≤ 2⁻¹⁵⁰):
    ///
    /// * `2`: one rounding of each product and one of the final f32 result, each ≤ u·max|F|.
    /// * The largest errors sit on the diagonal (for F: Σₖ `G[k,j]`², whose value is the
    ///   scale max|F|; off-diagonal sums of random-sign terms have smaller partial sums and
    ///   errors). In a sequential run of b positive terms the partial sums grow like
    ///   S·k/b, and with rounding errors modelled as independent, mean zero and of standard
    ///   deviation u/√3 (Higham & Mary, *A New Approach to Probabilistic Rounding Error
    ///   Analysis*, SIAM J. Sci. Comput. 2019) the run's error has standard deviation
    ///   (u/√3)·S·√(Σₖ(k/b)²) ≈ u·S·√(b/9): the `b/9`.
    /// * Combining the runs' partial sums in a tree of depth d adds one rounding of
    ///   standard deviation (u/√3)·S per level: the `d/3` (f64 or Kahan combining adds
    ///   less). Independent terms add in quadrature.
    /// * λ = 4 standard deviations: the largest of 10⁴–10⁵ diagonal entries stays below.
    /// * `abs`: underflow adds at most η per term.
    ///
    /// The rigorous worst-case bound, n·u, would be 4·10⁻³ at n = 65,536 and judge
    /// nothing. This model gives 32.8u ≈ 1.96·10⁻⁶ there, within the crate's 2·10⁻⁶
    /// contract. Measured on random normal G (max|ΔF|/max|F|): this crate's CPU path 2.8u
    /// at N = 65,536, P = 256 (numpy's SGEMM 8.9u) and 12.8u at N = 4096, P = 2048; a plain
    /// sequential f32 sum over 65,536 samples (b = n: standard deviation 85u, worst entry
    /// ≈ 180u, 1.06·10⁻⁵) fails it by 5×, and so does a wrong normalization such as
    /// 1/(N − 1) (1.5·10⁻⁵). See `tests/invariants.rs`.
    pub fn for_sum(n_terms: usize) -> Self {
        let n = n_terms.max(1);
        let b = n.min(LONGEST_F32_RUN);
        let depth = (n.div_ceil(b) as f64).log2();
        let spread = (b as f64 / 9.0 + depth / 3.0).sqrt();
        Tolerance {
            abs: n as f64 * F32_UNDERFLOW_ERROR,
            rel: F32_UNIT_ROUNDOFF * (2.0 + STANDARD_DEVIATIONS * spread),
        }
    }
}

/// The longest sequential f32 accumulation [`Tolerance::for_sum`] allows: the depth block
/// of the `gemm` crate's micro-kernels on the CPU path (512 on the development machine:
/// `gemm-common`'s `kernel_params` picks max(512, an L1-derived size) capped at the depth),
/// longer than any run of the GPU kernels.
pub const LONGEST_F32_RUN: usize = 512;

/// λ of [`Tolerance::for_sum`]: how many standard deviations of the modelled rounding
/// error the worst entry may reach.
pub const STANDARD_DEVIATIONS: f64 = 4.0;

/// Asserts that `actual` agrees with `reference` under `tol`: same form and shapes, every
/// entry finite, and max |actual − reference| ≤ tol.abs + tol.rel · max|reference|.
///
/// # Panics
///
/// On a different form or shape; on any NaN/±Inf in either matrix (naming the entry); and
/// when the worst entry exceeds the bound, naming that entry, both values, the difference,
/// the bound and the relative error.
#[track_caller]
pub fn assert_agrees(actual: &FisherMatrix<f32>, reference: &FisherMatrix<f64>, tol: Tolerance) {
    let mut max_ref = 0.0f64;
    for_each_pair(actual, reference, |index, _, expected| {
        if !expected.is_finite() {
            panic!("reference is not finite at {index}: {expected}");
        }
        max_ref = max_ref.max(expected.abs());
    });
    let bound = tol.abs + tol.rel * max_ref;
    let mut worst: Option<(Index, f32, f64, f64)> = None;
    for_each_pair(actual, reference, |index, got, expected| {
        if !got.is_finite() {
            panic!("{} is not finite at {index}: {got} (reference {expected:e})", actual.name());
        }
        let diff = (f64::from(got) - expected).abs();
        if worst.is_none_or(|(.., w)| diff > w) {
            worst = Some((index, got, expected, diff));
        }
    });
    if let Some((index, got, expected, diff)) = worst {
        if diff > bound {
            let rel = if max_ref > 0.0 { diff / max_ref } else { f64::INFINITY };
            panic!(
                "{} disagrees with the f64 reference at {index}: got {got:e}, expected {expected:e}, \
                 |diff| {diff:e} > bound {bound:e} (|diff|/max|ref| = {rel:.3e}; tolerance abs {:e} \
                 + rel {:.3e} × max|ref| {max_ref:e})",
                actual.name(),
                tol.abs,
                tol.rel,
            );
        }
    }
}

/// Where an entry lives, for messages: `fisher[i, j]`, `block.b[i, j]`, `diag[i]`.
#[derive(Debug, Clone, Copy)]
struct Index {
    name: &'static str,
    block: Option<usize>,
    row: usize,
    col: Option<usize>,
}

impl std::fmt::Display for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.name)?;
        if let Some(b) = self.block {
            write!(f, ".{b}")?;
        }
        match self.col {
            Some(c) => write!(f, "[{}, {c}]", self.row),
            None => write!(f, "[{}]", self.row),
        }
    }
}

/// Calls `visit(index, actual, expected)` for every entry, panicking on a mismatch of form
/// or shape.
#[track_caller]
fn for_each_pair(
    actual: &FisherMatrix<f32>,
    reference: &FisherMatrix<f64>,
    mut visit: impl FnMut(Index, f32, f64),
) {
    let name = actual.name();
    let mut matrix = |block: Option<usize>, a: &Array2<f32>, r: &Array2<f64>| {
        assert_eq!(a.dim(), r.dim(), "{name}: result shape differs from the reference's");
        for (((row, col), &x), &y) in a.indexed_iter().zip(r.iter()) {
            visit(Index { name, block, row, col: Some(col) }, x, y);
        }
    };
    match (actual, reference) {
        (FisherMatrix::Full(a), FisherMatrix::Full(r)) | (FisherMatrix::Gram(a), FisherMatrix::Gram(r)) => {
            matrix(None, a, r)
        }
        (FisherMatrix::BlockDiagonal(a), FisherMatrix::BlockDiagonal(r)) => {
            assert_eq!(a.len(), r.len(), "number of blocks differs from the reference's");
            for (b, (a, r)) in a.iter().zip(r).enumerate() {
                matrix(Some(b), a, r);
            }
        }
        (FisherMatrix::Diagonal(a), FisherMatrix::Diagonal(r))
        | (FisherMatrix::SampleNorms(a), FisherMatrix::SampleNorms(r)) => {
            assert_eq!(a.len(), r.len(), "{name}: result length differs from the reference's");
            for (row, (&x, &y)) in a.iter().zip(r).enumerate() {
                visit(Index { name, block: None, row, col: None }, x, y);
            }
        }
        _ => panic!("cannot compare a {name} result with a {} reference", reference.name()),
    }
}

/// Asserts that `m` is square and exactly (bitwise) symmetric.
///
/// # Panics
///
/// Naming the first (row-major) pair (i, j), i < j, whose entries differ.
#[track_caller]
pub fn assert_symmetric(m: &Array2<f32>) {
    assert_eq!(m.nrows(), m.ncols(), "matrix is not square: {:?}", m.dim());
    for i in 0..m.nrows() {
        for j in i + 1..m.ncols() {
            let (a, b) = (m[[i, j]], m[[j, i]]);
            assert!(
                a.to_bits() == b.to_bits(),
                "matrix is not exactly symmetric: [{i}, {j}] = {a:e} but [{j}, {i}] = {b:e}"
            );
        }
    }
}

/// Asserts that the symmetric matrix `m` is positive semi-definite up to rounding: its
/// smallest eigenvalue is ≥ −`tol` · max|m|. Eigenvalues come from [`symmetric_eigenvalues`]
/// (cyclic Jacobi, O(P³) per sweep): meant for P up to a few hundred.
///
/// A Fisher matrix with N < P is singular, so its computed eigenvalues scatter around 0 by
/// the rounding error of its entries; `tol` should be about P times the entry tolerance.
///
/// # Panics
///
/// With the smallest eigenvalue and the threshold when `m` is not PSD, or if `m` is not
/// square or not finite.
#[track_caller]
pub fn assert_psd(m: &Array2<f32>, tol: f64) {
    assert!(m.iter().all(|v| v.is_finite()), "matrix has non-finite entries");
    let m64 = m.mapv(f64::from);
    let scale = m64.iter().fold(0.0f64, |acc, v| acc.max(v.abs()));
    let eigenvalues = symmetric_eigenvalues(&m64);
    let smallest = eigenvalues.first().copied().unwrap_or(0.0);
    assert!(
        smallest >= -tol * scale,
        "matrix is not positive semi-definite: smallest eigenvalue {smallest:e} < −{tol:e}·max|m| = {:e}",
        -tol * scale
    );
}

/// Eigenvalues of the symmetric matrix `m` (upper triangle used), in ascending order, by
/// the cyclic Jacobi method: plane rotations zero one off-diagonal pair at a time until
/// the off-diagonal mass is below 10⁻³⁰ of the total (about f64 precision). Plain O(P³)
/// per sweep, usually < 10 sweeps: for test-sized matrices.
///
/// # Panics
///
/// If `m` is not square.
#[track_caller]
pub fn symmetric_eigenvalues(m: &Array2<f64>) -> Vec<f64> {
    assert_eq!(m.nrows(), m.ncols(), "matrix is not square: {:?}", m.dim());
    let p = m.nrows();
    let mut a = m.clone();
    for i in 0..p {
        for j in 0..i {
            a[[i, j]] = a[[j, i]];
        }
    }
    let total: f64 = a.iter().map(|v| v * v).sum();
    for _sweep in 0..100 {
        let off: f64 = (0..p).flat_map(|i| (i + 1..p).map(move |j| (i, j))).map(|(i, j)| a[[i, j]].powi(2)).sum();
        if off <= 1e-30 * total || off == 0.0 {
            break;
        }
        for i in 0..p {
            for j in i + 1..p {
                let aij = a[[i, j]];
                if aij == 0.0 {
                    continue;
                }
                // Rotation angle that zeroes a[i, j] (Golub & Van Loan, Alg. 8.5.1).
                let theta = (a[[j, j]] - a[[i, i]]) / (2.0 * aij);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..p {
                    let (aki, akj) = (a[[k, i]], a[[k, j]]);
                    a[[k, i]] = c * aki - s * akj;
                    a[[k, j]] = s * aki + c * akj;
                }
                for k in 0..p {
                    let (aik, ajk) = (a[[i, k]], a[[j, k]]);
                    a[[i, k]] = c * aik - s * ajk;
                    a[[j, k]] = s * aik + c * ajk;
                }
            }
        }
    }
    let mut eigenvalues: Vec<f64> = a.diag().to_vec();
    eigenvalues.sort_by(f64::total_cmp);
    eigenvalues
}

/// |tr(form) − mean‖gᵢ‖²| / mean‖gᵢ‖², the relative mismatch of the identity
/// tr F = tr K = (1/N) Σᵢ ‖gᵢ‖² (for [`FisherMatrix::Diagonal`] and
/// [`FisherMatrix::BlockDiagonal`] the trace of what is stored, which equals tr F).
/// `norms` must be a [`FisherMatrix::SampleNorms`]; `NaN` otherwise.
pub fn trace_mismatch<T: Copy + Into<f64>, U: Copy + Into<f64>>(
    form: &FisherMatrix<T>,
    norms: &FisherMatrix<U>,
) -> f64 {
    let FisherMatrix::SampleNorms(_) = norms else { return f64::NAN };
    let mean = norms.trace();
    let diff = (form.trace() - mean).abs();
    if mean > 0.0 {
        diff / mean
    } else {
        diff
    }
}

/// Asserts tr(form) = mean ‖gᵢ‖² to within `tol.rel` (relative to the mean norm; both
/// sides are sums of positive terms, so their errors are relative to themselves).
///
/// # Panics
///
/// When `norms` is not [`FisherMatrix::SampleNorms`] or the identity is off by more than
/// `tol.rel` (or either side is not finite).
#[track_caller]
pub fn assert_trace_matches_mean_norm<T: Copy + Into<f64>, U: Copy + Into<f64>>(
    form: &FisherMatrix<T>,
    norms: &FisherMatrix<U>,
    tol: Tolerance,
) {
    assert!(matches!(norms, FisherMatrix::SampleNorms(_)), "expected sample norms, got {}", norms.name());
    let mismatch = trace_mismatch(form, norms);
    assert!(
        mismatch <= tol.rel,
        "trace of {} is {:e} but the mean squared sample norm is {:e} (relative mismatch {mismatch:.3e} > {:.3e})",
        form.name(),
        form.trace(),
        norms.trace(),
        tol.rel
    );
}
