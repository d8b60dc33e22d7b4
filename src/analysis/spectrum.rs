//! Exact spectra of the stored forms, the spectral functions built on them, and spectral
//! densities (histograms of eigenvalue mass on a log scale).
//!
//! | form | eigenvalues |
//! |---|---|
//! | full | dense symmetric eigensolver (faer, f64) |
//! | diag | the entries |
//! | blocks | the union of the blocks' spectra |
//! | KFAC | per layer all products λᵢ(G_l)·μⱼ(A_l): the eigenvalues of a Kronecker product are the products of the factors' eigenvalues (Horn & Johnson, *Topics in Matrix Analysis*, Thm 4.2.12) |
//! | Gram | K's eigenvalues; the non-zero ones are F's (F = GᵀG/N and K = GGᵀ/N share them, by the SVD of G) |

use serde::Serialize;

use super::dense::symmetric_eigenvalues;
use super::operator::ExplicitFisher;
use super::{FisherOperator, ParameterLayout};
use crate::error::{FisherError, Result};
use crate::fisher::FisherMatrix;
use crate::fisher::NetFisher;

/// The spectrum of a PSD F of dimension `dim`: `eigenvalues` in descending order, possibly
/// fewer than `dim` of them, the remaining `dim − len` being exactly zero (as for a Gram
/// spectrum padded to P). Eigenvalues are clamped at 0 and those within the eigensolver's
/// error bound of zero (|λ| ≤ `noise`, see [`Spectrum::new`]) are set to exactly 0, so
/// that a singular F is recognised as singular.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Spectrum {
    /// Eigenvalues, descending, each ≥ 0.
    pub eigenvalues: Vec<f64>,
    /// Dimension of F (P); eigenvalues beyond `eigenvalues.len()` are 0.
    pub dim: usize,
}

impl Spectrum {
    /// From computed eigenvalues (any order), the dimension, and the absolute error bound of
    /// the eigensolver (`noise`; for a backward-stable dense solver c·n·ε·λ_max, see
    /// [`ExplicitFisher::spectrum`]). Values with λ ≤ noise become 0. Errors when there are
    /// more eigenvalues than `dim` or one is not finite.
    pub fn new(mut eigenvalues: Vec<f64>, dim: usize, noise: f64) -> Result<Self> {
        if eigenvalues.len() > dim {
            return Err(FisherError::InvalidInput(format!(
                "{} eigenvalues for a matrix of dimension {dim}",
                eigenvalues.len()
            )));
        }
        if let Some(v) = eigenvalues.iter().find(|v| !v.is_finite()) {
            return Err(FisherError::InvalidInput(format!("non-finite eigenvalue {v}")));
        }
        for v in eigenvalues.iter_mut() {
            if *v <= noise {
                *v = 0.0;
            }
        }
        eigenvalues.sort_by(|a, b| b.total_cmp(a));
        Ok(Spectrum { eigenvalues, dim })
    }

    /// Number of zero eigenvalues not listed.
    fn implicit_zeros(&self) -> usize {
        self.dim - self.eigenvalues.len()
    }

    /// λ_max (0 for an empty or zero F).
    pub fn max(&self) -> f64 {
        self.eigenvalues.first().copied().unwrap_or(0.0)
    }

    /// λ_min over all `dim` eigenvalues.
    pub fn min(&self) -> f64 {
        if self.implicit_zeros() > 0 {
            0.0
        } else {
            self.eigenvalues.last().copied().unwrap_or(0.0)
        }
    }

    /// tr F = Σ λᵢ.
    pub fn trace(&self) -> f64 {
        self.eigenvalues.iter().sum()
    }

    /// ‖F‖²_F = Σ λᵢ².
    pub fn frobenius_squared(&self) -> f64 {
        self.eigenvalues.iter().map(|v| v * v).sum()
    }

    /// log det(F + λI) = Σᵢ log(λᵢ + λ) over all `dim` eigenvalues (zeros contribute
    /// log λ). −∞ for λ = 0 and a singular F. Errors when λ < 0 or is not finite.
    pub fn logdet(&self, damping: f64) -> Result<f64> {
        check_damping(damping)?;
        let zeros = self.implicit_zeros() as f64;
        let listed: f64 = self.eigenvalues.iter().map(|&v| (v + damping).ln()).sum();
        Ok(if zeros > 0.0 { listed + zeros * damping.ln() } else { listed })
    }

    /// Effective dimension d_eff(α) = Σᵢ λᵢ / (λᵢ + α) (MacKay 1992; Maddox, Benton &
    /// Wilson 2020, *Rethinking parameter counting*), α > 0: the number of directions whose
    /// curvature exceeds the scale α.
    pub fn effective_dimension(&self, alpha: f64) -> Result<f64> {
        check_alpha(alpha)?;
        Ok(self.eigenvalues.iter().map(|&v| v / (v + alpha)).sum())
    }

    /// Condition number of F + λI: (λ_max + λ)/(λ_min + λ). The damping is included: that is
    /// the matrix a damped solve inverts. ∞ when λ = 0 and F is singular (JSON `null`).
    pub fn condition_number(&self, damping: f64) -> Result<f64> {
        check_damping(damping)?;
        let (hi, lo) = (self.max() + damping, self.min() + damping);
        Ok(if lo > 0.0 { hi / lo } else { f64::INFINITY })
    }

    /// Stable rank ‖F‖²_F / ‖F‖²₂ = Σλᵢ² / λ_max² (Rudelson & Vershynin 2007), in [1, rank];
    /// `NaN` for F = 0.
    pub fn stable_rank(&self) -> f64 {
        let top = self.max();
        self.frobenius_squared() / (top * top)
    }

    /// Spectral entropy −Σᵢ pᵢ log pᵢ with pᵢ = λᵢ / Σⱼλⱼ (natural log; zeros contribute 0;
    /// Roy & Vetterli 2007 take exp of it as the "effective rank"). `NaN` for F = 0.
    pub fn spectral_entropy(&self) -> f64 {
        let total = self.trace();
        -self
            .eigenvalues
            .iter()
            .filter(|&&v| v > 0.0)
            .map(|&v| {
                let p = v / total;
                p * p.ln()
            })
            .sum::<f64>()
    }

    /// The local effective dimension of Abbas et al. (2021) at sample size n; see
    /// [`super::abbas_effective_dimension`].
    pub fn abbas_effective_dimension(&self, samples: usize) -> Result<f64> {
        let kappa = super::measures::abbas_kappa(samples)?;
        let (p, tr) = (self.dim as f64, self.trace());
        if tr <= 0.0 {
            return Ok(0.0);
        }
        // log det(I + κ F̂) with F̂ = P·F / tr F: zeros contribute log 1 = 0.
        let logdet: f64 = self.eigenvalues.iter().map(|&v| (kappa * p * v / tr).ln_1p()).sum();
        Ok(logdet / kappa.ln())
    }
}

pub(crate) fn check_damping(damping: f64) -> Result<()> {
    if !(damping >= 0.0 && damping.is_finite()) {
        return Err(FisherError::InvalidInput(format!("damping must be finite and ≥ 0, got {damping}")));
    }
    Ok(())
}

pub(crate) fn check_alpha(alpha: f64) -> Result<()> {
    if !(alpha > 0.0 && alpha.is_finite()) {
        return Err(FisherError::InvalidInput(format!(
            "the effective-dimension scale α must be finite and > 0, got {alpha}"
        )));
    }
    Ok(())
}

/// Absolute eigenvalue error bound of a backward-stable dense symmetric eigensolver on an
/// n×n matrix with largest |eigenvalue| `scale`: 4·n·ε·scale (the c·n·ε·‖A‖₂ of Golub & Van
/// Loan §8.4, with a small c).
fn dense_noise(n: usize, scale: f64) -> f64 {
    4.0 * n as f64 * f64::EPSILON * scale
}

fn descending(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| b.total_cmp(a));
    v
}

impl ExplicitFisher {
    /// All eigenvalues of the stored form, descending (see the module table). For Gram, the
    /// N eigenvalues of K (the non-zero ones equal F's). Raw solver output: tiny negative
    /// values from rounding are kept (see [`ExplicitFisher::spectrum`] for the cleaned one).
    pub fn eigenvalues(&self) -> Result<Vec<f64>> {
        Ok(self.eigenvalues_with_noise()?.0)
    }

    /// Eigenvalues (descending) and their absolute error bound.
    fn eigenvalues_with_noise(&self) -> Result<(Vec<f64>, f64)> {
        let max_abs = |v: &[f64]| v.iter().fold(0.0f64, |a, x| a.max(x.abs()));
        Ok(match self {
            ExplicitFisher::Full(f) => {
                let v = symmetric_eigenvalues("F", f.matrix())?;
                let noise = dense_noise(v.len(), max_abs(&v));
                (descending(v), noise)
            }
            ExplicitFisher::Diagonal(d) => (descending(d.diagonal().to_vec()), 0.0),
            ExplicitFisher::Blocks(b) => {
                let mut all = Vec::with_capacity(b.dim());
                let mut noise = 0.0f64;
                for (i, block) in b.blocks().iter().enumerate() {
                    let v = symmetric_eigenvalues(&format!("block {i}"), block)?;
                    noise = noise.max(dense_noise(v.len(), max_abs(&v)));
                    all.extend(v);
                }
                (descending(all), noise)
            }
            ExplicitFisher::Kfac(k) => {
                let mut all = Vec::with_capacity(k.dim());
                let mut noise = 0.0f64;
                for (l, layer) in k.layers().iter().enumerate() {
                    let g = symmetric_eigenvalues(&format!("G of layer {l}"), &layer.g)?;
                    let a = symmetric_eigenvalues(&format!("A of layer {l}"), &layer.a)?;
                    let (gm, am) = (max_abs(&g), max_abs(&a));
                    // Each factor eigenvalue is off by ≤ its own bound; the product by ≤ the
                    // sum of the bounds times the other factor's scale.
                    noise = noise.max(dense_noise(g.len(), gm) * am + dense_noise(a.len(), am) * gm);
                    for &lg in &g {
                        all.extend(a.iter().map(|&la| lg * la));
                    }
                }
                (descending(all), noise)
            }
            ExplicitFisher::Gram(g) => {
                let v = symmetric_eigenvalues("K", g.matrix())?;
                let noise = dense_noise(v.len(), max_abs(&v));
                (descending(v), noise)
            }
        })
    }

    /// The spectrum of F (dimension P), cleaned (see [`Spectrum`]). For a Gram form P must
    /// be set ([`ExplicitFisher::with_parameters`]): K's spectrum is padded with zeros to P,
    /// or its N − P smallest (zero) eigenvalues are dropped when N > P.
    pub fn spectrum(&self) -> Result<Spectrum> {
        let (mut values, noise) = self.eigenvalues_with_noise()?;
        let dim = match self {
            ExplicitFisher::Gram(g) => {
                let p = g.parameters().ok_or_else(|| {
                    FisherError::InvalidInput(
                        "measures of F from its Gram matrix need P: call ExplicitFisher::with_parameters".into(),
                    )
                })?;
                values.truncate(p);
                p
            }
            other => other.dim(),
        };
        Spectrum::new(values, dim, noise)
    }

    /// log det(F + λI), exactly from the spectrum (for KFAC Σ_l Σ_ij log(λᵢ(G_l)μⱼ(A_l) + λ)).
    /// −∞ for λ = 0 and a singular F.
    pub fn logdet(&self, damping: f64) -> Result<f64> {
        self.spectrum()?.logdet(damping)
    }
}

/// All eigenvalues of a [`FisherMatrix`] form, descending (full, diag, block, Gram; see
/// [`ExplicitFisher::eigenvalues`]). Per-sample norms carry no spectrum and are refused.
pub fn eigenvalues<T: Copy + Into<f64>>(form: &FisherMatrix<T>) -> Result<Vec<f64>> {
    ExplicitFisher::from_matrix(form)?.eigenvalues()
}

/// All eigenvalues of a network's [`NetFisher`] form, descending (full, diag, layer, KFAC;
/// KFAC needs `layout` with the layer shapes).
pub fn net_eigenvalues<T: Copy + Into<f64>>(form: &NetFisher<T>, layout: Option<&ParameterLayout>) -> Result<Vec<f64>> {
    ExplicitFisher::from_net(form, layout)?.eigenvalues()
}

/// A histogram of eigenvalue mass over log-spaced bins: `mass[b]` ≈ the number of
/// eigenvalues in `[edges[b], edges[b + 1])`. Eigenvalues below `edges[0]` (zeros included) are
/// counted in `below`, above the last edge in `above`; the total is `dim`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SpectralDensity {
    /// bins + 1 log-spaced edges, increasing.
    pub edges: Vec<f64>,
    /// Eigenvalue count per bin (fractional for stochastic or smoothed densities).
    pub mass: Vec<f64>,
    /// Count below the first edge (including exact zeros).
    pub below: f64,
    /// Count above the last edge.
    pub above: f64,
}

impl SpectralDensity {
    /// From weighted nodes (λ, w): each node adds w eigenvalues at λ (exact spectra: w = 1;
    /// SLQ: w = P·τ²/n_probes). `range` = (lo, hi), both > 0, or `None` for
    /// [λ_max·10⁻¹², λ_max] clipped to the smallest positive node. `smoothing` is the
    /// standard deviation, in decades (log₁₀ units), of a Gaussian kernel each node's mass is
    /// spread with (0 = a plain histogram); mass spread past the range goes to
    /// `below`/`above`, so the total is kept.
    pub fn from_nodes(nodes: &[(f64, f64)], bins: usize, range: Option<(f64, f64)>, smoothing: f64) -> Result<Self> {
        if bins == 0 {
            return Err(FisherError::InvalidInput("a spectral density needs at least one bin".into()));
        }
        if !(smoothing >= 0.0 && smoothing.is_finite()) {
            return Err(FisherError::InvalidInput(format!("smoothing must be finite and ≥ 0, got {smoothing}")));
        }
        let (lo, hi) = match range {
            Some((lo, hi)) if lo > 0.0 && hi > lo && hi.is_finite() => (lo, hi),
            Some((lo, hi)) => {
                return Err(FisherError::InvalidInput(format!("density range ({lo}, {hi}) must satisfy 0 < lo < hi")))
            }
            None => {
                let top = nodes.iter().map(|n| n.0).fold(0.0f64, f64::max);
                if top <= 0.0 {
                    (1e-12, 1.0)
                } else {
                    let smallest = nodes.iter().map(|n| n.0).filter(|&v| v > 0.0).fold(top, f64::min);
                    let lo = smallest.max(top * 1e-12);
                    // Widen a little so that the extreme nodes fall inside.
                    (lo * 0.999, top * 1.001)
                }
            }
        };
        let (l0, l1) = (lo.log10(), hi.log10());
        let width = (l1 - l0) / bins as f64;
        let edges: Vec<f64> = (0..=bins).map(|b| 10f64.powf(l0 + width * b as f64)).collect();
        let mut mass = vec![0.0; bins];
        let (mut below, mut above) = (0.0, 0.0);
        for &(value, weight) in nodes {
            if value.is_nan() || value <= 0.0 {
                below += weight;
                continue;
            }
            let x = value.log10();
            if smoothing == 0.0 {
                if x < l0 {
                    below += weight;
                } else if x > l1 {
                    above += weight;
                } else {
                    let b = (((x - l0) / width) as usize).min(bins - 1);
                    mass[b] += weight;
                }
            } else {
                let cdf = |t: f64| 0.5 * (1.0 + libm::erf((t - x) / (smoothing * std::f64::consts::SQRT_2)));
                below += weight * cdf(l0);
                above += weight * (1.0 - cdf(l1));
                for (b, m) in mass.iter_mut().enumerate() {
                    *m += weight * (cdf(l0 + width * (b + 1) as f64) - cdf(l0 + width * b as f64));
                }
            }
        }
        Ok(SpectralDensity { edges, mass, below, above })
    }

    /// The exact density of a spectrum (each eigenvalue weight 1, the implicit zeros in
    /// `below`).
    pub fn from_spectrum(spectrum: &Spectrum, bins: usize, range: Option<(f64, f64)>, smoothing: f64) -> Result<Self> {
        let mut nodes: Vec<(f64, f64)> = spectrum.eigenvalues.iter().map(|&v| (v, 1.0)).collect();
        nodes.push((0.0, (spectrum.dim - spectrum.eigenvalues.len()) as f64));
        Self::from_nodes(&nodes, bins, range, smoothing)
    }

    /// Total mass (≈ P).
    pub fn total(&self) -> f64 {
        self.below + self.above + self.mass.iter().sum::<f64>()
    }
}
