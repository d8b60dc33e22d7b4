//! Stochastic Lanczos quadrature (SLQ): tr f(F) for any spectral function f from F·v
//! products alone (Ubaru, Chen & Saad, *Fast estimation of tr(f(A)) via stochastic Lanczos
//! quadrature*, SIAM J. Matrix Anal. Appl. 38, 2017).
//!
//! ## Estimator
//!
//! For a Rademacher probe z (entries ±1, so E[zzᵀ] = I and ‖z‖² = P), zᵀ f(F) z is the
//! integral of f against the spectral measure of F seen from z, whose m-point Gauss
//! quadrature is given by m Lanczos steps started at q₀ = z/√P: with T = Z Θ Zᵀ the m×m
//! tridiagonal matrix and τⱼ = Z₀ⱼ the first components of its eigenvectors,
//!
//! ```text
//! zᵀ f(F) z ≈ P · Σⱼ τⱼ² f(θⱼ),        tr f(F) ≈ (1/n_v) Σ_probes P · Σⱼ τⱼ² f(θⱼ)
//! ```
//!
//! (exact for polynomials of degree ≤ 2m − 1, so f(λ) = λ gives Hutchinson's zᵀFz and
//! f(λ) = λ² gives ‖Fz‖² exactly). The nodes (θⱼ, τⱼ²) of every probe are kept
//! ([`SlqQuadrature`]), so one Lanczos run per probe serves every function: log(λ + λ_d)
//! for log det(F + λ_d I), λ/(λ + α) for d_eff(α), λ² for ‖F‖²_F, the spectral density.
//!
//! ## Error bar
//!
//! [`SlqQuadrature::estimate`] returns the mean over probes and its standard error σ/√n_v
//! (σ the sample standard deviation of the per-probe values): a *statistical* error bar,
//! ≈ 68% coverage when the mean is near-Gaussian, shrinking as 1/√n_v. The quadrature error
//! (bias) is not in it; for smooth f it decays geometrically in m (Ubaru et al., Thm 4.1),
//! and m = 30–50 makes it negligible next to σ/√n_v for the functions above.
//!
//! Steps use full reorthogonalization against an f32 basis (as in [`super::lanczos`];
//! memory m·4·P bytes) unless `reorthogonalize` is false, in which case only three vectors
//! are held; without it the quadrature is still accurate (ghost copies of converged Ritz
//! values share the weight of the original), as Ubaru et al. observe.

use serde::Serialize;

use super::dense::symmetric_eigen;
use super::lanczos::{check_finite_product, Basis};
use super::spectrum::SpectralDensity;
use super::{dot, norm, Estimate, FisherOperator};
use crate::error::{FisherError, Result};
use crate::synthetic::SplitMix64;
use ndarray::Array2;

/// Options of [`slq`].
#[derive(Debug, Clone, PartialEq)]
pub struct SlqOptions {
    /// Number of Rademacher probes n_v (≥ 2, for an error bar).
    pub probes: usize,
    /// Lanczos steps m per probe (F·v products per probe). The quadrature bias decays
    /// geometrically in m at a rate set by √cond(F + λI) for log det (Ubaru et al., Thm 4.1):
    /// measured on a P = 260 Fisher with cond(F + λI) ≈ 10³, the log-det bias was 11 at
    /// m = 20, 1.2 at m = 32 and within ±0.8 at m ≥ 40, against a statistical σ/√n_v of ≈ 6
    /// with 24 probes. Raise m for a smaller damping.
    pub steps: usize,
    /// Seed of the probes: a SplitMix64 stream seeded with it gives each probe its own seed,
    /// so different seeds give independent probe sets.
    pub seed: u64,
    /// Full reorthogonalization (an f32 basis of `steps` vectors); false: three vectors.
    pub reorthogonalize: bool,
}

impl Default for SlqOptions {
    /// 16 probes × 32 steps, seed 0, with reorthogonalization.
    fn default() -> Self {
        SlqOptions { probes: 16, steps: 32, seed: 0, reorthogonalize: true }
    }
}

/// The Gauss quadrature nodes of every probe: enough to evaluate tr f(F) for any f.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SlqQuadrature {
    /// Dimension P of the operator.
    pub dim: usize,
    /// Per probe, the nodes (θⱼ, τⱼ²): Ritz values (clamped at 0, F being PSD) and weights
    /// summing to 1.
    pub nodes: Vec<Vec<(f64, f64)>>,
    /// F·v products used.
    pub iterations: usize,
}

impl SlqQuadrature {
    /// tr f(F) ≈ (P/n_v) Σ_probes Σⱼ τⱼ² f(θⱼ), with its standard error over probes.
    pub fn estimate(&self, f: impl Fn(f64) -> f64) -> Estimate {
        let p = self.dim as f64;
        let per_probe: Vec<f64> =
            self.nodes.iter().map(|nodes| p * nodes.iter().map(|&(t, w)| w * f(t)).sum::<f64>()).collect();
        Estimate::from_samples(&per_probe)
    }

    /// Like [`SlqQuadrature::estimate`] for any per-probe quantity computed from the probe's
    /// nodes (e.g. a combination of several quadratures on the same probe): the mean and
    /// standard error of `per_probe` over the probes.
    pub fn estimate_with(&self, per_probe: impl Fn(&[(f64, f64)]) -> f64) -> Estimate {
        let values: Vec<f64> = self.nodes.iter().map(|n| per_probe(n)).collect();
        Estimate::from_samples(&values)
    }

    /// The spectral density: every node of every probe carries P·τⱼ²/n_v eigenvalues
    /// (see [`SpectralDensity::from_nodes`] for `bins`, `range` and `smoothing`, in decades).
    pub fn density(&self, bins: usize, range: Option<(f64, f64)>, smoothing: f64) -> Result<SpectralDensity> {
        let scale = self.dim as f64 / self.nodes.len().max(1) as f64;
        let nodes: Vec<(f64, f64)> = self.nodes.iter().flatten().map(|&(t, w)| (t, w * scale)).collect();
        SpectralDensity::from_nodes(&nodes, bins, range, smoothing)
    }
}

/// A seeded Rademacher vector (±1 entries, one random bit each).
pub(crate) fn rademacher(n: usize, seed: u64) -> Vec<f64> {
    let mut rng = SplitMix64::new(seed);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let bits = rng.next_u64();
        for b in 0..64.min(n - out.len()) {
            out.push(if (bits >> b) & 1 == 1 { 1.0 } else { -1.0 });
        }
    }
    out
}

/// Runs `steps` Lanczos steps from each of `probes` Rademacher vectors and returns the
/// quadrature nodes. A probe whose Krylov space closes early (β ≈ 0) stops there: its
/// quadrature is then exact.
pub fn slq(op: &(impl FisherOperator + ?Sized), options: &SlqOptions) -> Result<SlqQuadrature> {
    let n = op.dim();
    if n == 0 || options.probes < 2 || options.steps == 0 {
        return Err(FisherError::InvalidInput(format!(
            "SLQ needs a non-empty operator, ≥ 2 probes (for an error bar) and ≥ 1 step \
             (dimension {n}, {} probes, {} steps)",
            options.probes, options.steps
        )));
    }
    let steps = options.steps.min(n);
    let mut nodes = Vec::with_capacity(options.probes);
    let mut iterations = 0;
    let mut seeds = SplitMix64::new(options.seed);
    for _ in 0..options.probes {
        let z = rademacher(n, seeds.next_u64());
        let (alpha, beta, used) = lanczos_tridiagonal(op, &z, steps, options.reorthogonalize)?;
        iterations += used;
        nodes.push(gauss_nodes(&alpha, &beta)?);
    }
    Ok(SlqQuadrature { dim: n, nodes, iterations })
}

/// m steps of Lanczos from `start`: the diagonal α and off-diagonal β of T, and the F·v count.
fn lanczos_tridiagonal(
    op: &(impl FisherOperator + ?Sized),
    start: &[f64],
    steps: usize,
    reorthogonalize: bool,
) -> Result<(Vec<f64>, Vec<f64>, usize)> {
    let n = start.len();
    let len = norm(start);
    let mut q: Vec<f64> = start.iter().map(|x| x / len).collect();
    let mut q_prev = vec![0.0; n];
    let mut basis = Basis::default();
    let (mut alpha, mut beta) = (Vec::with_capacity(steps), Vec::with_capacity(steps));
    let mut scale = 0.0f64;
    for j in 0..steps {
        if reorthogonalize {
            basis.push(&q);
            // Use the stored (rounded) vector so that the recurrence and the basis agree.
            q = basis.get(j);
        }
        let mut w = op.apply(&q)?;
        check_finite_product(&w)?;
        let a = dot(&q, &w);
        let b_prev = beta.last().copied().unwrap_or(0.0);
        for ((x, &qi), &qp) in w.iter_mut().zip(&q).zip(&q_prev) {
            *x -= a * qi + b_prev * qp;
        }
        if reorthogonalize {
            basis.orthogonalize(&mut w);
        }
        alpha.push(a);
        let b = norm(&w);
        scale = scale.max(a.abs() + b + b_prev);
        if j + 1 == steps || b <= n as f64 * f64::EPSILON * scale {
            return Ok((alpha, beta, j + 1));
        }
        beta.push(b);
        q_prev = std::mem::replace(&mut q, w.into_iter().map(|x| x / b).collect());
    }
    Ok((alpha, beta, steps))
}

/// Nodes (θⱼ, τⱼ²) of the Gauss quadrature of T = tridiag(β, α, β).
fn gauss_nodes(alpha: &[f64], beta: &[f64]) -> Result<Vec<(f64, f64)>> {
    let m = alpha.len();
    let t = Array2::from_shape_fn((m, m), |(i, j)| {
        if i == j {
            alpha[i]
        } else if i == j + 1 {
            beta[j]
        } else if j == i + 1 {
            beta[i]
        } else {
            0.0
        }
    });
    let (values, vectors) = symmetric_eigen("the Lanczos tridiagonal matrix", &t)?;
    // Ritz values of a PSD operator are ≥ 0 in exact arithmetic; clamp the rounding.
    Ok(values.iter().enumerate().map(|(j, &v)| (v.max(0.0), vectors[[0, j]].powi(2))).collect())
}
