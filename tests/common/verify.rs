//! The assertions every test judges results with, moved here from the library (they are
//! test-only code):
//!
//! * [`assert_agrees`] compares an f32 result with the f64 reference entry by entry under
//!   a [`Tolerance`] derived from the reduction length ([`Tolerance::for_sum`], which the
//!   library keeps: `fisher reduce --verify` uses it); it names the worst entry, and a NaN or
//!   ±Inf never passes.
//! * [`assert_symmetric`], [`assert_psd`] and [`assert_trace_matches_mean_norm`] check
//!   properties that hold whatever the values: exact symmetry, positive semi-definiteness,
//!   and tr F = (1/N) Σᵢ ‖gᵢ‖².
//! * [`symmetric_eigenvalues`]: a plain cyclic Jacobi eigensolver, the oracle for spectra
//!   (independent of the faer solver the analysis module uses).
//!
//! The functions panic (with `#[track_caller]`, so the failure points at the test) rather
//! than return errors: they are assertions. `tests/suite/invariants.rs` checks that they
//! reject what they must.

use fisher_engine::fisher::FisherMatrix;
pub use fisher_engine::verify::Tolerance;
use fisher_engine::Form;
use ndarray::{Array2, ArrayView2};

/// How many products are summed into each entry of `form` computed from `grads` (N×P): N for
/// Full, Diagonal and BlockDiagonal, P for Gram and SampleNorms. The tolerance depends on it.
pub fn sum_length(form: &Form, grads: ArrayView2<'_, f32>) -> usize {
    match form {
        Form::Gram | Form::SampleNorms => grads.ncols(),
        _ => grads.nrows(),
    }
}

/// [`Tolerance::for_sum`] for `form` computed from `grads`.
pub fn tolerance_for(form: &Form, grads: ArrayView2<'_, f32>) -> Tolerance {
    Tolerance::for_sum(sum_length(form, grads))
}

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
