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
//! ## Gauss–Radau: a bracket, and the null space of a Fisher
//!
//! Each probe also gets the (m+1)-point Gauss–Radau rule with one node fixed at 0, the lower
//! end of a PSD spectrum (Golub & Meurant, *Matrices, Moments and Quadrature with
//! Applications*, 2010, §6.2): T is extended by β_m (the residual norm the m-th step
//! computes anyway, so no F·v more) and a last diagonal entry φ = β_m² (T⁻¹)_mm chosen so
//! that 0 is an eigenvalue. For f whose derivatives alternate in sign — log(λ + λ_d),
//! λ/(λ + α), log(1 + cλ), −λ log λ, every function the measures use — the exact zᵀf(F)z
//! lies between the Gauss value (an upper bound for these f) and the Gauss–Radau one (a
//! lower bound), so half the gap bounds the quadrature error of their midpoint
//! ([`SlqQuadrature::bracketed`]).
//!
//! That matters for network Fishers: rank F ≤ N·R is often far below P, and the Gauss rule
//! has no node at exactly 0, so the null space's weight (98.6% of a probe for P = 2.9·10⁶,
//! N·R = 40,960) sits on the smallest Ritz value, which approaches 0 slowly; log(θ + λ_d)
//! and θ/(θ + α) there are far from their values at 0. Measured on a P = 4,650 network
//! Fisher of rank ≤ 1,500 (λ_d = α = 10⁻³, 16 probes): at m = 16 Gauss gave d_eff = 1,908
//! and Gauss–Radau 1,021 around the exact 1,161; at m = 24, 1,295 and 1,135; at m = 48 the
//! two agree to 1. The spectral density ([`SlqQuadrature::density`]) uses the Gauss–Radau
//! nodes, so the null space shows as mass at 0 rather than a spurious peak near it.
//!
//! ## Error bar
//!
//! [`SlqQuadrature::estimate`] returns the mean over probes and its standard error σ/√n_v
//! (σ the sample standard deviation of the per-probe values): a *statistical* error bar,
//! ≈ 68% coverage when the mean is near-Gaussian, shrinking as 1/√n_v. The quadrature error
//! (bias) is not in it; for smooth f it decays geometrically in m (Ubaru et al., Thm 4.1),
//! and m = 30–50 makes it negligible next to σ/√n_v for the functions above when F has no
//! large null space. [`SlqQuadrature::bracketed`] gives both: the statistical error of the
//! Gauss/Gauss–Radau midpoint and the bound on its quadrature error.
//!
//! Steps use full reorthogonalization against an f32 basis (as in [`super::lanczos`];
//! memory m·4·P bytes) unless `reorthogonalize` is false, in which case only three vectors
//! are held; without it the quadrature is still accurate (ghost copies of converged Ritz
//! values share the weight of the original), as Ubaru et al. observe.

use serde::Serialize;

use super::dense::symmetric_eigen;
use super::lanczos::{check_finite_product, Basis};
use super::spectrum::SpectralDensity;
use super::{check_len, dot, norm, Estimate, FisherOperator};
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
    /// summing to 1 (to ≈ 1 with deflated pairs, see [`slq_deflated`]).
    pub nodes: Vec<Vec<(f64, f64)>>,
    /// Per probe, the m + 1 Gauss–Radau nodes with one node fixed at 0 (see the module docs);
    /// the Gauss nodes again where the rule cannot be built or is not needed (a Krylov space
    /// that closed early, where Gauss is exact, or a Ritz value already at 0).
    pub radau: Vec<Vec<(f64, f64)>>,
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

    /// The Gauss–Radau counterpart of [`SlqQuadrature::estimate`] (a lower bound per probe for
    /// the functions of the module docs, where Gauss gives an upper one).
    pub fn estimate_radau(&self, f: impl Fn(f64) -> f64) -> Estimate {
        let p = self.dim as f64;
        let per_probe: Vec<f64> =
            self.radau.iter().map(|nodes| p * nodes.iter().map(|&(t, w)| w * f(t)).sum::<f64>()).collect();
        Estimate::from_samples(&per_probe)
    }

    /// tr f(F) from the midpoint of each probe's Gauss and Gauss–Radau values, with its
    /// statistical standard error over probes, and the quadrature bound: the mean over probes
    /// of half the gap between the two rules. For f whose derivatives alternate in sign (see
    /// the module docs) the exact zᵀf(F)z of every probe lies within that half-gap of the
    /// midpoint, so |estimate − E_z[zᵀf(F)z]| ≤ bound + the statistical error.
    pub fn bracketed(&self, f: impl Fn(f64) -> f64) -> (Estimate, f64) {
        let p = self.dim as f64;
        let value = |nodes: &[(f64, f64)]| p * nodes.iter().map(|&(t, w)| w * f(t)).sum::<f64>();
        let (mut mid, mut half) = (Vec::with_capacity(self.nodes.len()), 0.0);
        for (gauss, radau) in self.nodes.iter().zip(&self.radau) {
            let (g, r) = (value(gauss), value(radau));
            mid.push(0.5 * (g + r));
            half += 0.5 * (g - r).abs();
        }
        (Estimate::from_samples(&mid), half / self.nodes.len().max(1) as f64)
    }

    /// Like [`SlqQuadrature::estimate`] for any per-probe quantity computed from the probe's
    /// nodes (e.g. a combination of several quadratures on the same probe): the mean and
    /// standard error of `per_probe` over the probes.
    pub fn estimate_with(&self, per_probe: impl Fn(&[(f64, f64)]) -> f64) -> Estimate {
        let values: Vec<f64> = self.nodes.iter().map(|n| per_probe(n)).collect();
        Estimate::from_samples(&values)
    }

    /// The spectral density: every Gauss–Radau node of every probe carries P·τⱼ²/n_v
    /// eigenvalues (the fixed node at 0 holds the null space's share, counted in `below`;
    /// see [`SpectralDensity::from_nodes`] for `bins`, `range` and `smoothing`, in decades).
    pub fn density(&self, bins: usize, range: Option<(f64, f64)>, smoothing: f64) -> Result<SpectralDensity> {
        let scale = self.dim as f64 / self.radau.len().max(1) as f64;
        let nodes: Vec<(f64, f64)> = self.radau.iter().flatten().map(|&(t, w)| (t, w * scale)).collect();
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
    run_slq(op, &Deflation::none(), options)
}

/// SLQ with known eigenpairs deflated: tr f(F) = Σᵢ f(λᵢ) + tr f on the complement of the
/// pairs' span, the latter by SLQ on D F D with D = I − VVᵀ and probes D z (so E[(Dz)ᵀ g (Dz)]
/// = tr(D g D)). Each probe's nodes are the pairs (λᵢ, 1/P) and the complement's nodes with
/// weights τⱼ²·‖Dz‖²/P, so every [`SlqQuadrature`] method applies unchanged.
///
/// Why: Gauss quadrature converges at a rate set by the spread of the spectrum it sees, and
/// a network Fisher's few large eigenvalues (λ₁/λ₁₁ ≈ 100 on a 2.9 M-parameter MLP) stretch
/// it; with them removed the same steps resolve the small end (where log det, d_eff and
/// Abbas are decided) far better. The pairs must be accurate eigenpairs (e.g. converged
/// Lanczos Ritz pairs): a pair with residual r couples to the complement and moves the
/// result by O(r²/gap). The vectors (unit norm, orthogonal) are stored as f32 (4·P bytes
/// each); D is applied twice per product, in f64, so that their rounding does not leak the
/// deflated directions back.
pub fn slq_deflated(
    op: &(impl FisherOperator + ?Sized),
    pairs: Vec<(f64, Vec<f64>)>,
    options: &SlqOptions,
) -> Result<SlqQuadrature> {
    let n = op.dim();
    let mut values = Vec::with_capacity(pairs.len());
    let mut vectors = Vec::with_capacity(pairs.len());
    for (i, (value, vector)) in pairs.into_iter().enumerate() {
        check_len(&format!("deflation vector {i}"), &vector, n)?;
        if !value.is_finite() || vector.iter().any(|x| !x.is_finite()) {
            return Err(FisherError::InvalidInput(format!("deflation pair {i} is not finite")));
        }
        values.push(value.max(0.0));
        vectors.push(vector.into_iter().map(|x| x as f32).collect());
    }
    if values.len() >= n {
        return Err(FisherError::InvalidInput(format!(
            "cannot deflate {} pairs from an operator of dimension {n}",
            values.len()
        )));
    }
    run_slq(op, &Deflation { values, vectors }, options)
}

/// Eigenpairs removed from the probes (none for plain SLQ).
struct Deflation {
    values: Vec<f64>,
    vectors: Vec<Vec<f32>>,
}

impl Deflation {
    fn none() -> Self {
        Deflation { values: Vec::new(), vectors: Vec::new() }
    }

    /// v ← (I − VVᵀ)² v, in f64.
    fn project(&self, v: &mut [f64]) {
        for _ in 0..2 {
            for q in &self.vectors {
                let c: f64 = q.iter().zip(v.iter()).map(|(&a, &b)| f64::from(a) * b).sum();
                v.iter_mut().zip(q).for_each(|(x, &a)| *x -= c * f64::from(a));
            }
        }
    }
}

/// D F D for a deflation D (F itself when there is nothing to deflate).
struct Deflated<'a, O: ?Sized> {
    op: &'a O,
    deflation: &'a Deflation,
}

impl<O: FisherOperator + ?Sized> FisherOperator for Deflated<'_, O> {
    fn dim(&self) -> usize {
        self.op.dim()
    }
    fn apply(&self, v: &[f64]) -> Result<Vec<f64>> {
        if self.deflation.vectors.is_empty() {
            return self.op.apply(v);
        }
        let mut x = v.to_vec();
        self.deflation.project(&mut x);
        let mut y = self.op.apply(&x)?;
        self.deflation.project(&mut y);
        Ok(y)
    }
}

fn run_slq(op: &(impl FisherOperator + ?Sized), deflation: &Deflation, options: &SlqOptions) -> Result<SlqQuadrature> {
    let n = op.dim();
    if n == 0 || options.probes < 2 || options.steps == 0 {
        return Err(FisherError::InvalidInput(format!(
            "SLQ needs a non-empty operator, ≥ 2 probes (for an error bar) and ≥ 1 step \
             (dimension {n}, {} probes, {} steps)",
            options.probes, options.steps
        )));
    }
    let steps = options.steps.min(n - deflation.values.len());
    let pf = n as f64;
    let exact: Vec<(f64, f64)> = deflation.values.iter().map(|&v| (v, 1.0 / pf)).collect();
    let deflated = Deflated { op, deflation };
    let mut nodes = Vec::with_capacity(options.probes);
    let mut radau = Vec::with_capacity(options.probes);
    let mut iterations = 0;
    let mut seeds = SplitMix64::new(options.seed);
    for _ in 0..options.probes {
        let mut z = rademacher(n, seeds.next_u64());
        deflation.project(&mut z);
        // ‖Dz‖²/P: the share of the probe the complement's quadrature stands for (1 without
        // deflation).
        let share = norm(&z).powi(2) / pf;
        let (alpha, beta, last, used) = lanczos_tridiagonal(&deflated, &z, steps, options.reorthogonalize)?;
        iterations += used;
        let gauss = gauss_nodes(&alpha, &beta)?;
        let fixed = match last {
            Some(b) => radau_nodes(&alpha, &beta, b, &gauss)?.unwrap_or_else(|| gauss.clone()),
            None => gauss.clone(),
        };
        let scaled = |rule: Vec<(f64, f64)>| -> Vec<(f64, f64)> {
            exact.iter().copied().chain(rule.into_iter().map(|(t, w)| (t, w * share))).collect()
        };
        radau.push(scaled(fixed));
        nodes.push(scaled(gauss));
    }
    Ok(SlqQuadrature { dim: n, nodes, radau, iterations })
}

/// m steps of Lanczos from `start`: the diagonal α and off-diagonal β of T, the residual
/// norm β_m after the last step (`None` when the Krylov space closed: the quadrature is then
/// exact), and the F·v count.
#[allow(clippy::type_complexity)]
fn lanczos_tridiagonal(
    op: &(impl FisherOperator + ?Sized),
    start: &[f64],
    steps: usize,
    reorthogonalize: bool,
) -> Result<(Vec<f64>, Vec<f64>, Option<f64>, usize)> {
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
        if b <= n as f64 * f64::EPSILON * scale {
            return Ok((alpha, beta, None, j + 1));
        }
        if j + 1 == steps {
            return Ok((alpha, beta, Some(b), j + 1));
        }
        beta.push(b);
        q_prev = std::mem::replace(&mut q, w.into_iter().map(|x| x / b).collect());
    }
    Ok((alpha, beta, None, steps))
}

/// Nodes of the (m+1)-point Gauss–Radau rule with a node fixed at 0: T extended by the
/// residual norm `last` (β_m) and φ = β_m² (T⁻¹)_mm, so that 0 is an eigenvalue of the
/// extended matrix (Golub & Meurant 2010, §6.2). `None` when T is numerically singular (a
/// Ritz value already at 0: the Gauss rule has a node there and needs no fixing) or φ is
/// not finite.
fn radau_nodes(alpha: &[f64], beta: &[f64], last: f64, gauss: &[(f64, f64)]) -> Result<Option<Vec<(f64, f64)>>> {
    let m = alpha.len();
    let top = gauss.iter().map(|n| n.0).fold(0.0f64, f64::max);
    let bottom = gauss.iter().map(|n| n.0).fold(f64::INFINITY, f64::min);
    if top <= 0.0 || bottom <= 1e-12 * top {
        return Ok(None);
    }
    // (T⁻¹)_mm by the Thomas algorithm on T δ = e_m (T is positive definite here: its
    // eigenvalues, the Ritz values, are all ≥ 10⁻¹²·θ_max; no pivoting needed).
    let mut c = vec![0.0; m];
    let mut d = vec![0.0; m];
    for i in 0..m {
        let sub = if i > 0 { beta[i - 1] } else { 0.0 };
        let denom = alpha[i] - sub * if i > 0 { c[i - 1] } else { 0.0 };
        if i + 1 < m {
            c[i] = beta[i] / denom;
        }
        let rhs = if i + 1 == m { 1.0 } else { 0.0 };
        d[i] = (rhs - sub * if i > 0 { d[i - 1] } else { 0.0 }) / denom;
    }
    // Back substitution ends at the last component, which is d[m − 1] itself.
    let phi = last * last * d[m - 1];
    if !phi.is_finite() || phi < 0.0 {
        return Ok(None);
    }
    let mut a = alpha.to_vec();
    a.push(phi);
    let mut b = beta.to_vec();
    b.push(last);
    let mut nodes = gauss_nodes(&a, &b)?;
    // The fixed node is 0 in exact arithmetic; snap its rounding (the smallest node).
    if let Some(smallest) = nodes.iter_mut().min_by(|x, y| x.0.total_cmp(&y.0)) {
        if smallest.0 <= 1e-9 * top {
            smallest.0 = 0.0;
        }
    }
    Ok(Some(nodes))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::DenseOperator;

    /// Gauss and Gauss–Radau bracket every probe's exact zᵀf(F)z for the functions the
    /// measures use, on a Fisher with a null space (rank 30 of 80), at several step counts.
    #[test]
    fn gauss_and_radau_bracket_each_probe() {
        let (n, p) = (30, 80);
        let g = crate::synthetic::gradient_like(n, p, 7).mapv(f64::from);
        let f = g.t().dot(&g) / n as f64;
        let (values, vectors) = symmetric_eigen("test F", &f).unwrap();
        let op = DenseOperator::new(&f).unwrap();
        let lambda_max = values.iter().copied().fold(0.0, f64::max);
        let c = 1e4 / lambda_max;
        type Function<'a> = Box<dyn Fn(f64) -> f64 + 'a>;
        let functions: [(&str, Function<'_>); 4] = [
            ("log(x + λ)", Box::new(|x: f64| (x + 1e-3 * lambda_max).ln())),
            ("x/(x + α)", Box::new(|x: f64| x / (x + 1e-2 * lambda_max))),
            ("log(1 + cx)", Box::new(move |x: f64| (c * x).ln_1p())),
            ("−x log x", Box::new(|x: f64| if x > 0.0 { -x * x.ln() } else { 0.0 })),
        ];
        for steps in [3, 6, 12] {
            let options = SlqOptions { probes: 3, steps, seed: 11, reorthogonalize: true };
            let q = slq(&op, &options).unwrap();
            let mut seeds = SplitMix64::new(options.seed);
            for probe in 0..options.probes {
                let z = rademacher(p, seeds.next_u64());
                // zᵀ f(F) z = Σᵢ (vᵢᵀz)² f(λᵢ), eigenvalues clamped at 0 as the nodes are.
                let proj: Vec<f64> = (0..p).map(|i| vectors.column(i).dot(&ndarray::Array1::from(z.clone()))).collect();
                for (name, fun) in &functions {
                    let exact: f64 = (0..p).map(|i| proj[i].powi(2) * fun(values[i].max(0.0))).sum();
                    let rule = |nodes: &[(f64, f64)]| p as f64 * nodes.iter().map(|&(t, w)| w * fun(t)).sum::<f64>();
                    let (gauss, radau) = (rule(&q.nodes[probe]), rule(&q.radau[probe]));
                    let slack = 1e-9 * exact.abs().max(1.0);
                    assert!(
                        radau - slack <= exact && exact <= gauss + slack,
                        "{name}, {steps} steps, probe {probe}: Radau {radau} ≤ exact {exact} ≤ Gauss {gauss} fails"
                    );
                }
            }
            // The Radau rule has its fixed node at 0 and weights summing to 1.
            for nodes in &q.radau {
                assert_eq!(nodes.len(), steps + 1);
                assert!(nodes.iter().any(|n| n.0 == 0.0));
                assert!((nodes.iter().map(|n| n.1).sum::<f64>() - 1.0).abs() < 1e-12);
            }
        }
    }
}
