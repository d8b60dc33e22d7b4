//! Verification: the one pass/fail policy of `--verify` and of every built-in comparison
//! ([`Contract`], [`Verdict`]), the tolerance model it rests on ([`Tolerance::for_sum`]),
//! and the test assertions built on the same model.
//!
//! # The policy
//!
//! An f32 result passes against the f64 reference when its error is no larger than what
//! f32 arithmetic explains, by one of two contracts ([`Contract`]):
//!
//! * **A reduction of given gradients** (`fisher reduce`, [`crate::Engine::fisher_from_grads`]):
//!   each entry is a sum of `terms` products (N for the forms of F, P for Gram and norms),
//!   so the rounding error is modelled from that length: max|Δ| ≤ abs + rel·max|ref| with
//!   [`Tolerance::for_sum`]`(terms)`. The worst entry is judged against the largest reference
//!   entry, because the error of a sum scales with the sum of its terms' magnitudes.
//! * **A network Fisher** (`fisher compute`, [`crate::Engine::fisher`]): the gradients are
//!   themselves f32 forward and backward passes, whose error no sum length bounds, so the
//!   contract is the documented ‖Δ‖_F ≤ [`NETWORK_FROBENIUS_REL`]·‖ref‖_F (10⁻⁵).
//!
//! A NaN or ±Inf never passes. Two f32 results (GPU against CPU) are each within the bound
//! of the reference, so they must agree within twice the bound ([`Verdict::judge_pair`]).
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

use crate::fisher::{Agreement, FisherMatrix};

/// The bound on ‖Δ‖_F/‖ref‖_F of a network Fisher against its f64 reference: the issue's
/// contract for every variant × form on every backend (`fisher compute --verify`).
pub const NETWORK_FROBENIUS_REL: f64 = 1e-5;

/// Products summed per entry of `form` over N = `samples` rows of P = `params`: N for the
/// forms of F (full, diag, blocks), P for its dual K and the norms.
pub fn reduction_length(form: &crate::Form, samples: usize, params: usize) -> usize {
    use crate::Form;
    match form {
        Form::Gram | Form::SampleNorms => params,
        Form::Full | Form::Diagonal | Form::BlockDiagonal(_) => samples,
    }
}

/// What an f32 result promises about its distance to the f64 reference (see the
/// [module's policy](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contract {
    /// A reduction of given f32 gradients whose entries are sums of `terms` products:
    /// max|Δ| ≤ [`Tolerance::for_sum`]`(terms)`.
    Reduction {
        /// Products summed per entry (N for full, diag and blocks; P for gram and norms).
        terms: usize,
    },
    /// A network Fisher: ‖Δ‖_F ≤ [`NETWORK_FROBENIUS_REL`]·‖ref‖_F.
    Network,
}

impl Contract {
    /// The contract of a reduction of `form` over N = `samples` rows of P = `params`.
    pub fn reduction(form: &crate::Form, samples: usize, params: usize) -> Self {
        Contract::Reduction { terms: reduction_length(form, samples, params) }
    }

    /// The measure judged: `max|Δ|/max|ref|` or `‖Δ‖/‖ref‖`.
    pub fn metric(self) -> &'static str {
        match self {
            Contract::Reduction { .. } => "max|Δ|/max|ref|",
            Contract::Network => "‖Δ‖/‖ref‖",
        }
    }

    /// The relative bound on [`Contract::metric`].
    pub fn bound(self) -> f64 {
        match self {
            Contract::Reduction { terms } => Tolerance::for_sum(terms).rel,
            Contract::Network => NETWORK_FROBENIUS_REL,
        }
    }

    /// The bound between two f32 results that each keep the contract: twice [`Contract::bound`].
    pub fn pair_bound(self) -> f64 {
        2.0 * self.bound()
    }

    /// The measure of `agreement` this contract judges.
    pub fn measure(self, agreement: &Agreement) -> f64 {
        match self {
            Contract::Reduction { .. } => agreement.max_rel,
            Contract::Network => agreement.frobenius_rel,
        }
    }

    /// Whether `agreement` keeps the contract with `scale` times the bound.
    fn holds(self, agreement: &Agreement, scale: f64) -> bool {
        // Written so that a NaN anywhere fails.
        let finite = !agreement.max_abs.is_nan() && agreement.max_abs.is_finite();
        finite
            && match self {
                Contract::Reduction { terms } => {
                    let tol = Tolerance::for_sum(terms);
                    agreement.max_abs <= scale * (tol.abs + tol.rel * agreement.max_ref)
                }
                Contract::Network => agreement.frobenius_rel <= scale * NETWORK_FROBENIUS_REL,
            }
    }
}

/// A judged comparison: the agreement, the contract's bound, and the verdict.
///
/// Serializes as the agreement's keys (`max_abs`, `max_rel`, `frobenius_rel`), the bound
/// (`tolerance_rel` for a reduction, `tolerance_frobenius_rel` for a network) and `passed`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verdict {
    /// The measured disagreement.
    pub agreement: Agreement,
    /// The contract judged by.
    pub contract: Contract,
    /// The bound on [`Contract::metric`] (twice the contract's for [`Verdict::judge_pair`]).
    pub bound: f64,
    /// Whether the contract holds (a NaN fails).
    pub passed: bool,
}

impl Verdict {
    /// Judges a result's agreement with the f64 reference under `contract`.
    ///
    /// ```
    /// use fisher_engine::verify::{Contract, Verdict};
    /// use fisher_engine::{reference::grads as reference, Engine, Form};
    /// let g = fisher_engine::synthetic::gradient_like(200, 9, 4);
    /// let result = Engine::cpu().fisher_from_grads(g.view(), &Form::Full)?;
    /// let agreement = result.agreement(&reference::reduce(g.view(), &Form::Full)?)?;
    /// assert!(Verdict::judge(agreement, Contract::reduction(&Form::Full, 200, 9)).passed);
    /// # Ok::<(), fisher_engine::FisherError>(())
    /// ```
    pub fn judge(agreement: Agreement, contract: Contract) -> Self {
        Verdict { agreement, contract, bound: contract.bound(), passed: contract.holds(&agreement, 1.0) }
    }

    /// Judges two f32 results against each other (`agreement` of one with the other as the
    /// reference): each keeps the contract with the f64 reference, so together they may
    /// differ by twice the bound.
    pub fn judge_pair(agreement: Agreement, contract: Contract) -> Self {
        Verdict { agreement, contract, bound: contract.pair_bound(), passed: contract.holds(&agreement, 2.0) }
    }

    /// The judged measure ([`Contract::measure`]).
    pub fn measure(&self) -> f64 {
        self.contract.measure(&self.agreement)
    }
}

impl serde::Serialize for Verdict {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(5))?;
        map.serialize_entry("max_abs", &self.agreement.max_abs)?;
        map.serialize_entry("max_rel", &self.agreement.max_rel)?;
        map.serialize_entry("frobenius_rel", &self.agreement.frobenius_rel)?;
        let key = match self.contract {
            Contract::Reduction { .. } => "tolerance_rel",
            Contract::Network => "tolerance_frobenius_rel",
        };
        map.serialize_entry(key, &self.bound)?;
        map.serialize_entry("passed", &self.passed)?;
        map.end()
    }
}

/// `--verify` found a result outside its contract: a wrong result is not written.
#[derive(Debug, Clone, thiserror::Error)]
#[error("verification failed on {backend}: {}; nothing was written", failure_text(.verdict))]
pub struct VerificationFailed {
    /// The backend's label.
    pub backend: String,
    /// The failed verdict.
    pub verdict: Verdict,
}

fn failure_text(v: &Verdict) -> String {
    let a = &v.agreement;
    match v.contract {
        Contract::Reduction { terms } => format!(
            "max|Δ| = {:e} is {:.2e}·max|ref|, beyond the f32 tolerance {:.2e}·max|ref| for sums of {terms} terms",
            a.max_abs, a.max_rel, v.bound
        ),
        Contract::Network => format!(
            "‖Δ‖/‖ref‖ = {:.2e} exceeds {:.0e} (max|Δ|/max|ref| = {:.2e}) against the f64 reference",
            a.frobenius_rel, v.bound, a.max_rel
        ),
    }
}

impl Verdict {
    /// `Ok(self)` when passed, else [`VerificationFailed`] naming `backend`.
    pub fn require(self, backend: &str) -> std::result::Result<Self, VerificationFailed> {
        if self.passed {
            Ok(self)
        } else {
            Err(VerificationFailed { backend: backend.to_string(), verdict: self })
        }
    }
}

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

#[cfg(test)]
mod policy_tests {
    use super::*;
    use crate::fisher::{NetFisher, NetForm, Variant};
    use crate::model::{Activation, Likelihood};
    use crate::{reference, Engine, Form};

    #[test]
    fn a_reduction_passes_and_a_perturbed_one_fails() {
        let g = crate::synthetic::gradient_like(200, 9, 4);
        let oracle = reference::grads::reduce(g.view(), &Form::Full).unwrap();
        let result = Engine::cpu().fisher_from_grads(g.view(), &Form::Full).unwrap();
        let contract = Contract::reduction(&Form::Full, 200, 9);
        assert_eq!(contract, Contract::Reduction { terms: 200 });
        assert!(Verdict::judge(result.agreement(&oracle).unwrap(), contract).passed);

        let FisherMatrix::Full(mut f) = result else { unreachable!() };
        f[[0, 0]] *= 1.0 + 1e-4; // the largest entry, 100× the tolerance
        assert!(!Verdict::judge(FisherMatrix::Full(f.clone()).agreement(&oracle).unwrap(), contract).passed);
        f[[3, 5]] = f32::NAN;
        let nan = Verdict::judge(FisherMatrix::Full(f).agreement(&oracle).unwrap(), contract);
        assert!(!nan.passed);
        assert!(nan.require("cpu").unwrap_err().to_string().contains("sums of 200 terms"));
    }

    #[test]
    fn the_reduction_length_is_n_for_f_and_p_for_its_dual() {
        assert_eq!(Contract::reduction(&Form::Diagonal, 10, 3), Contract::Reduction { terms: 10 });
        assert_eq!(Contract::reduction(&Form::Gram, 10, 3), Contract::Reduction { terms: 3 });
        assert_eq!(Contract::reduction(&Form::SampleNorms, 10, 3), Contract::Reduction { terms: 3 });
        assert!(Contract::Reduction { terms: 65_536 }.bound() > Contract::Reduction { terms: 16 }.bound());
    }

    #[test]
    fn a_network_fisher_is_judged_by_the_frobenius_contract() {
        let mlp = crate::model::train::init_mlp(&[4, 5, 3], Activation::Tanh, true, 1).unwrap();
        let data = crate::model::train::classification_task(30, 4, 3, 1).unwrap();
        let oracle = reference::network::fisher(&mlp, &data, Likelihood::Categorical, Variant::True, NetForm::Diagonal).unwrap();
        let result = Engine::cpu().fisher(&mlp, &data, Variant::True, NetForm::Diagonal).unwrap();
        let verdict = Verdict::judge(result.agreement(&oracle).unwrap(), Contract::Network);
        assert!(verdict.passed && verdict.bound == NETWORK_FROBENIUS_REL);
        let json = serde_json::to_value(verdict).unwrap();
        assert!(json["tolerance_frobenius_rel"].is_number() && json.get("tolerance_rel").is_none(), "{json}");

        let NetFisher::Diagonal(mut d) = result else { unreachable!() };
        d.mapv_inplace(|v| v * (1.0 + 1e-4));
        let off = NetFisher::Diagonal(d.clone()).agreement(&oracle).unwrap();
        assert!(!Verdict::judge(off, Contract::Network).passed);
        assert!(Verdict::judge_pair(NetFisher::Diagonal(d.clone()).agreement(&oracle).unwrap(), Contract::Network).bound == 2e-5);
        d[0] = f32::NAN;
        assert!(!Verdict::judge(NetFisher::Diagonal(d).agreement(&oracle).unwrap(), Contract::Network).passed);
    }
}
