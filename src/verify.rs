//! Verification: the one pass/fail policy of `--verify` and of every built-in comparison
//! ([`Contract`], [`Verdict`]), the tolerance model it rests on ([`Tolerance::for_sum`]),
//! and the agreement measures it reads. The assertions built on the same model (entry by
//! entry agreement, symmetry, PSD, trace identities) are test code, in the tests' shared
//! harness (`tests/common/verify.rs`).
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
//!
//! ```
//! use fisher_engine::verify::{Contract, Verdict};
//! use fisher_engine::{reference, Engine, Form};
//! let grads = fisher_engine::synthetic::gradient_like(300, 12, 5);
//! let result = Engine::cpu().fisher_from_grads(grads.view(), &Form::Full)?;
//! let oracle = reference::grads::reduce(grads.view(), &Form::Full)?;
//! let verdict = Verdict::judge(result.agreement(&oracle)?, Contract::reduction(&Form::Full, 300, 12));
//! assert!(verdict.passed);
//! # Ok::<(), fisher_engine::FisherError>(())
//! ```

use crate::fisher::Agreement;

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

#[cfg(test)]
mod policy_tests {
    use super::*;
    use crate::fisher::{FisherMatrix, NetFisher, NetForm, Variant};
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
