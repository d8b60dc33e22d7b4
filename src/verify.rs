//! The tolerance f32 results are judged with against the f64 reference:
//! [`Tolerance::for_sum`] derives the allowed error of an f32 result whose entries are sums
//! of `n` products from that reduction length (the derivation is on the function);
//! `fisher reduce --verify` compares with it. The assertions built on it (agreement entry by
//! entry, symmetry, PSD, trace identities) are test code, in the tests' shared harness
//! (`tests/common/verify.rs`).
//!
//! ```
//! use fisher_engine::verify::Tolerance;
//! use fisher_engine::{reference, Engine, Form};
//! let grads = fisher_engine::synthetic::gradient_like(300, 12, 5);
//! let result = Engine::cpu().fisher_from_grads(grads.view(), &Form::Full)?;
//! let oracle = reference::grads::reduce(grads.view(), &Form::Full)?;
//! assert!(result.agreement(&oracle)?.max_rel <= Tolerance::for_sum(300).rel);
//! # Ok::<(), fisher_engine::FisherError>(())
//! ```

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
    /// 1/(N − 1) (1.5·10⁻⁵). See `tests/suite/invariants.rs`.
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
