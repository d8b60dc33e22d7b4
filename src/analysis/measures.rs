//! Fisher complexity measures, exact for stored forms and stochastic (with error bars) for
//! implicit operators.
//!
//! | measure | definition | source |
//! |---|---|---|
//! | trace | tr F = Σλᵢ | |
//! | Frobenius norm | ‖F‖_F = √(Σλᵢ²) | |
//! | top eigenvalues | λ₁ ≥ λ₂ ≥ … | |
//! | log det | log det(F + λI) = Σ log(λᵢ + λ); the log-volume is half of it | |
//! | effective dimension | d_eff(α) = Σ λᵢ/(λᵢ + α) | MacKay 1992; Maddox, Benton & Wilson 2020 |
//! | Abbas effective dimension | d_n = log det(I + κ_n F̂) / log κ_n, κ_n = n/(2π log n), F̂ = P·F/tr F | Abbas et al. 2021 |
//! | Fisher–Rao norm | ‖θ‖_FR = √(θᵀFθ) (and its square) | Liang, Poggio, Rakhlin & Stokes 2019 |
//! | condition number | (λ_max + λ)/(λ_min + λ) of the damped F + λI | |
//! | stable rank | ‖F‖²_F/‖F‖²₂ | Rudelson & Vershynin 2007 |
//! | spectral entropy | −Σ pᵢ log pᵢ, pᵢ = λᵢ/Σλⱼ (natural log) | Roy & Vetterli 2007 |
//! | coupling | see [`super::Coupling`] | |
//!
//! ## The Abbas et al. normalization, exactly
//!
//! Abbas, Sutter, Zoufal, Lucchi, Figalli & Woerner, *The power of quantum neural networks*,
//! Nat. Comput. Sci. 1, 2021, define for a model with d parameters
//!
//! ```text
//! d_{γ,n} = 2 log( (1/V_Θ) ∫_Θ √det(I + κ F̂(θ)) dθ ) / log κ,    κ = γn / (2π log n),
//! F̂(θ) = d · V_Θ / (∫_Θ tr F(θ) dθ) · F(θ)
//! ```
//!
//! i.e. F̂ is normalized so that its trace *averaged over the parameter region* is d. The
//! local version computed here takes the region to be the single point θ (the ε → 0 limit
//! of the local effective dimension of Abbas et al., *Effective dimension of machine
//! learning models*, arXiv:2112.04807), with γ = 1: then ∫ tr F = V_Θ tr F(θ), so
//! F̂ = P·F/tr F (tr F̂ = P exactly) and d_n = log det(I + κ_n F̂)/log κ_n. F is this
//! crate's per-sample mean (1/N normalization), as in the paper (their F is the expected
//! per-sample Fisher). κ_n must exceed 1 (n ≥ 19); d_n ∈ [0, P].
//!
//! ## Stochastic estimates
//!
//! For an implicit operator ([`measures_implicit`]) the trace (unless the operator knows
//! it), Frobenius norm, log det, d_eff, Abbas, stable rank and spectral entropy come from
//! one SLQ run ([`super::slq`]) and carry standard errors in [`ErrorBars`] (log det, d_eff,
//! Abbas and entropy are the midpoints of the Gauss and Gauss–Radau rules, with a bound on
//! their quadrature error in [`ErrorBars::quadrature`]); the top
//! eigenvalues come from Lanczos; θᵀFθ is exact (one F·v); the condition number is known
//! only when the operator reports a rank bound below P (then λ_min = 0); the inter-layer
//! coupling is a Hutchinson estimate. Where a function needs tr F and the operator does not
//! know it, the SLQ estimate of tr F is plugged in and its uncertainty is not propagated.

use serde::Serialize;

use super::coupling::coupling_implicit;
use super::lanczos::{lanczos_top_k, LanczosOptions, LanczosResult};
use super::operator::ExplicitFisher;
use super::slq::{slq, SlqOptions, SlqQuadrature};
use super::spectrum::{check_alpha, check_damping, Spectrum};
use super::{check_len, FisherOperator, ParameterLayout};
use crate::error::{FisherError, Result};

/// κ_n = n / (2π ln n) of Abbas et al.; errors unless κ_n > 1 (n ≥ 19).
pub(crate) fn abbas_kappa(samples: usize) -> Result<f64> {
    let n = samples as f64;
    let kappa = if samples >= 2 { n / (2.0 * std::f64::consts::PI * n.ln()) } else { 0.0 };
    if kappa.is_nan() || kappa <= 1.0 {
        return Err(FisherError::InvalidInput(format!(
            "the Abbas effective dimension needs κ_n = n/(2π log n) > 1, i.e. n ≥ 19 samples (n = {samples})"
        )));
    }
    Ok(kappa)
}

/// The local effective dimension of Abbas et al. (2021) at sample size n from a spectrum:
/// d_n = Σᵢ log(1 + κ_n·P·λᵢ/tr F) / log κ_n, κ_n = n/(2π log n) (see the module docs for
/// the normalization F̂ = P·F/tr F and the choice γ = 1). Errors unless κ_n > 1.
///
/// ```
/// use fisher_engine::analysis::{abbas_effective_dimension, Spectrum};
/// // F = I₂: F̂ = I₂, so d_n = 2·log(1 + κ)/log κ, which tends to 2 as n grows.
/// let s = Spectrum::new(vec![1.0, 1.0], 2, 0.0)?;
/// let d = abbas_effective_dimension(&s, 1_000_000)?;
/// assert!(d > 2.0 && d < 2.2);
/// # Ok::<(), fisher_engine::FisherError>(())
/// ```
pub fn abbas_effective_dimension(spectrum: &Spectrum, samples: usize) -> Result<f64> {
    spectrum.abbas_effective_dimension(samples)
}

/// What to compute and with which parameters.
#[derive(Debug, Clone)]
pub struct MeasureOptions<'a> {
    /// Scale α of d_eff(α) (> 0).
    pub alpha: f64,
    /// Damping λ of log det(F + λI) and the condition number (≥ 0).
    pub damping: f64,
    /// How many top eigenvalues.
    pub top: usize,
    /// Sample size n of the Abbas effective dimension (`None`: not computed).
    pub samples: Option<usize>,
    /// Parameters θ for the Fisher–Rao norm (`None`: not computed).
    pub theta: Option<&'a [f64]>,
    /// Layer structure for the coupling measures (`None`: not computed).
    pub layout: Option<&'a ParameterLayout>,
    /// SLQ settings (implicit operators).
    pub slq: SlqOptions,
    /// Lanczos settings for the top eigenvalues of implicit operators (`k` is `top`).
    pub lanczos: LanczosOptions,
    /// Hutchinson probe rounds for the implicit inter-layer coupling.
    pub coupling_probes: usize,
}

impl Default for MeasureOptions<'_> {
    /// α = 10⁻³, λ = 10⁻³, top 20, no n/θ/layout, default SLQ and Lanczos, 8 coupling
    /// probes. The α and λ defaults are generic scales: choose them relative to the spectrum
    /// (e.g. a fraction of λ_max or of tr F / P), as `fisher demo` does.
    fn default() -> Self {
        MeasureOptions {
            alpha: 1e-3,
            damping: 1e-3,
            top: 20,
            samples: None,
            theta: None,
            layout: None,
            slq: SlqOptions::default(),
            lanczos: LanczosOptions::top(20),
            coupling_probes: 8,
        }
    }
}

/// Standard errors of the stochastic measures (statistical, ≈ 68%; `None` when exact or
/// not computed).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ErrorBars {
    /// Of `trace`.
    pub trace: Option<f64>,
    /// Of `frobenius` (delta method: se(‖F‖²_F) / (2‖F‖_F)).
    pub frobenius: Option<f64>,
    /// Of `logdet`.
    pub logdet: Option<f64>,
    /// Of `effective_dimension`.
    pub effective_dimension: Option<f64>,
    /// Of `abbas_effective_dimension`.
    pub abbas_effective_dimension: Option<f64>,
    /// Of `stable_rank` (λ_max taken as exact).
    pub stable_rank: Option<f64>,
    /// Of `spectral_entropy`.
    pub spectral_entropy: Option<f64>,
    /// Of `inter_layer_coupling`.
    pub inter_layer_coupling: Option<f64>,
    /// Bounds on the quadrature error of the SLQ measures (not statistical: see
    /// [`QuadratureBounds`]).
    pub quadrature: QuadratureBounds,
}

/// Bounds on the quadrature (bias) error of the SLQ estimates: half the mean gap between the
/// Gauss and the Gauss–Radau rules ([`SlqQuadrature::bracketed`]), within which each probe's
/// exact value lies for these functions. The total error of such an estimate is at most this
/// plus its statistical error. `None` when exact or not computed; ‖F‖_F and tr F need none
/// (both rules integrate λ and λ² exactly).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct QuadratureBounds {
    /// Of `logdet`.
    pub logdet: Option<f64>,
    /// Of `effective_dimension`.
    pub effective_dimension: Option<f64>,
    /// Of `abbas_effective_dimension`.
    pub abbas_effective_dimension: Option<f64>,
    /// Of `spectral_entropy`.
    pub spectral_entropy: Option<f64>,
}

/// The measures of one Fisher matrix (see the module table). Infinite or undefined values
/// serialize as JSON `null`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Measures {
    /// `exact` (from a stored form's spectrum) or `stochastic` (SLQ/Lanczos/Hutchinson).
    pub method: &'static str,
    /// P.
    pub parameters: usize,
    /// tr F.
    pub trace: f64,
    /// ‖F‖_F.
    pub frobenius: f64,
    /// The largest eigenvalues, descending.
    pub top_eigenvalues: Vec<f64>,
    /// log det(F + λI) (−∞ → `null` for a singular F at λ = 0).
    pub logdet: f64,
    /// The log-volume ½ log det(F + λI).
    pub log_volume: f64,
    /// λ.
    pub damping: f64,
    /// d_eff(α).
    pub effective_dimension: f64,
    /// α.
    pub alpha: f64,
    /// Abbas et al.'s d_n, when n was given.
    pub abbas_effective_dimension: Option<f64>,
    /// n.
    pub abbas_samples: Option<usize>,
    /// √(θᵀFθ), when θ was given.
    pub fisher_rao_norm: Option<f64>,
    /// θᵀFθ, when θ was given.
    pub fisher_rao_norm_squared: Option<f64>,
    /// (λ_max + λ)/(λ_min + λ); ∞ (`null`) for singular F at λ = 0; `None` when λ_min is
    /// unknown (implicit operator without a rank bound below P).
    pub condition_number: Option<f64>,
    /// ‖F‖²_F/‖F‖²₂.
    pub stable_rank: f64,
    /// −Σ pᵢ log pᵢ.
    pub spectral_entropy: f64,
    /// Share of ‖F‖²_F outside the per-layer blocks (when a layout was given and the form
    /// shows it).
    pub inter_layer_coupling: Option<f64>,
    /// Per layer, the share of ‖F_ll‖²_F outside the per-unit blocks.
    pub inter_unit_coupling: Vec<Option<f64>>,
    /// Standard errors of the stochastic measures.
    pub error_bars: ErrorBars,
    /// Whether every top eigenvalue met Lanczos' tolerance (`None` when exact).
    pub lanczos_converged: Option<bool>,
    /// F·v products used (0 for exact measures, which use the stored form directly).
    pub fv_products: usize,
}

fn check_options(options: &MeasureOptions<'_>, dim: usize) -> Result<()> {
    check_alpha(options.alpha)?;
    check_damping(options.damping)?;
    if let Some(theta) = options.theta {
        check_len("θ", theta, dim)?;
    }
    if let Some(layout) = options.layout {
        layout.check_dim(dim)?;
    }
    Ok(())
}

/// Every measure of a stored form, exactly from its spectrum (θᵀFθ through the form's own
/// product, coupling from its entries or factors). For a Gram form, P must be set.
pub fn measures_exact(fisher: &ExplicitFisher, options: &MeasureOptions<'_>) -> Result<Measures> {
    measures_from_spectrum(fisher, &fisher.spectrum()?, options)
}

/// [`measures_exact`] with the form's spectrum already computed ([`ExplicitFisher::spectrum`]),
/// for callers that also use the spectrum (a plot, more spectral functions) and would
/// otherwise pay for the eigendecomposition twice. `spectrum` must be `fisher`'s.
pub fn measures_from_spectrum(fisher: &ExplicitFisher, spectrum: &Spectrum, options: &MeasureOptions<'_>) -> Result<Measures> {
    let p = spectrum.dim;
    if p != fisher.parameters() {
        return Err(FisherError::InvalidInput(format!(
            "the spectrum has dimension {p} but the form has {} parameters",
            fisher.parameters()
        )));
    }
    if !matches!(fisher, ExplicitFisher::Gram(_)) {
        check_options(options, p)?;
    } else {
        check_options(&MeasureOptions { theta: None, layout: None, ..options.clone() }, p)?;
        if options.theta.is_some() || options.layout.is_some() {
            return Err(FisherError::InvalidInput(
                "a Gram matrix lives in sample space: θᵀFθ and coupling need a parameter-space form".into(),
            ));
        }
    }
    let trace = fisher.trace().unwrap_or_else(|| spectrum.trace());
    let frob2 = fisher.frobenius_squared();
    let top_len = options.top.min(p);
    let mut top_eigenvalues: Vec<f64> = spectrum.eigenvalues.iter().copied().take(top_len).collect();
    top_eigenvalues.resize(top_len, 0.0);
    let logdet = spectrum.logdet(options.damping)?;
    let quadratic = options.theta.map(|t| fisher.quadratic(t)).transpose()?;
    let coupling = options.layout.map(|l| fisher.coupling(l)).transpose()?;
    let lambda_max = spectrum.max();
    Ok(Measures {
        method: "exact",
        parameters: p,
        trace,
        frobenius: frob2.sqrt(),
        top_eigenvalues,
        logdet,
        log_volume: 0.5 * logdet,
        damping: options.damping,
        effective_dimension: spectrum.effective_dimension(options.alpha)?,
        alpha: options.alpha,
        abbas_effective_dimension: options.samples.map(|n| spectrum.abbas_effective_dimension(n)).transpose()?,
        abbas_samples: options.samples,
        fisher_rao_norm: quadratic.map(|q| q.max(0.0).sqrt()),
        fisher_rao_norm_squared: quadratic,
        condition_number: Some(spectrum.condition_number(options.damping)?),
        stable_rank: frob2 / (lambda_max * lambda_max),
        spectral_entropy: spectrum.spectral_entropy(),
        inter_layer_coupling: coupling.as_ref().and_then(|c| c.inter_layer),
        inter_unit_coupling: coupling.map(|c| c.inter_unit).unwrap_or_default(),
        error_bars: ErrorBars::default(),
        lanczos_converged: None,
        fv_products: 0,
    })
}

/// Every measure of an operator known only through F·v (see the module docs: SLQ,
/// Lanczos, Hutchinson; error bars in [`Measures::error_bars`]). Costs
/// probes·steps (SLQ) + ≤ `lanczos.max_iterations` + 1 (θ) + coupling_probes·layers F·v.
pub fn measures_implicit(op: &(impl FisherOperator + ?Sized), options: &MeasureOptions<'_>) -> Result<Measures> {
    check_options(options, op.dim())?;
    let quadrature = slq(op, &options.slq)?;
    measures_from_quadrature(op, &quadrature, None, options)
}

/// [`measures_implicit`] with the SLQ run (`quadrature`, from [`slq`] or
/// [`super::slq_deflated`]) and optionally the top-k Lanczos run (`top`, e.g. the one whose
/// Ritz pairs were deflated) already done, for callers that also use them (the spectral
/// density, d_eff at more scales α, deflation) or time the stages apart. Runs the rest:
/// Lanczos top-k when `top` is `None`, θᵀFθ, the coupling estimate. `options.slq` is not
/// used again (its seed still seeds the coupling probes); the F·v products of `quadrature`
/// and `top` are counted in [`Measures::fv_products`].
pub fn measures_from_quadrature(
    op: &(impl FisherOperator + ?Sized),
    quadrature: &SlqQuadrature,
    top: Option<&LanczosResult>,
    options: &MeasureOptions<'_>,
) -> Result<Measures> {
    let p = op.dim();
    check_options(options, p)?;
    if quadrature.dim != p {
        return Err(FisherError::InvalidInput(format!(
            "the quadrature has dimension {} but the operator has {p}",
            quadrature.dim
        )));
    }
    let pf = p as f64;
    let mut fv_products = quadrature.iterations;
    let mut bars = ErrorBars::default();

    let trace = match op.trace() {
        Some(t) => t,
        None => {
            let e = quadrature.estimate(|x| x);
            bars.trace = Some(e.std_error);
            e.value
        }
    };
    let frob2 = quadrature.estimate(|x| x * x);
    let frobenius = frob2.value.max(0.0).sqrt();
    bars.frobenius = Some(if frobenius > 0.0 { frob2.std_error / (2.0 * frobenius) } else { frob2.std_error.sqrt() });

    let damping = options.damping;
    let (logdet, bound) = quadrature.bracketed(|x| (x + damping).ln());
    bars.logdet = Some(logdet.std_error);
    bars.quadrature.logdet = Some(bound);
    let alpha = options.alpha;
    let (d_eff, bound) = quadrature.bracketed(|x| x / (x + alpha));
    bars.effective_dimension = Some(d_eff.std_error);
    bars.quadrature.effective_dimension = Some(bound);

    let abbas = match options.samples {
        Some(n) => {
            let kappa = abbas_kappa(n)?;
            let (e, bound) = quadrature
                .bracketed(|x| if trace > 0.0 { (kappa * pf * x / trace).ln_1p() / kappa.ln() } else { 0.0 });
            bars.abbas_effective_dimension = Some(e.std_error);
            bars.quadrature.abbas_effective_dimension = Some(bound);
            Some(e.value)
        }
        None => None,
    };
    let (entropy, bound) = quadrature.bracketed(|x| {
        let q = x / trace;
        if q > 0.0 {
            -q * q.ln()
        } else {
            0.0
        }
    });
    bars.quadrature.spectral_entropy = Some(bound);
    bars.spectral_entropy = Some(entropy.std_error);

    let computed;
    let top = match top {
        Some(given) => {
            fv_products += given.iterations;
            Some(given)
        }
        None if options.top > 0 => {
            computed = lanczos_top_k(op, &LanczosOptions { k: options.top, ..options.lanczos.clone() })?;
            fv_products += computed.iterations;
            Some(&computed)
        }
        None => None,
    };
    let lambda_max = top.as_ref().and_then(|t| t.values.first().copied()).unwrap_or(f64::NAN);
    let stable_rank = frob2.value / (lambda_max * lambda_max);
    bars.stable_rank = Some(frob2.std_error / (lambda_max * lambda_max));

    let quadratic = match options.theta {
        Some(t) => {
            fv_products += 1;
            Some(op.quadratic(t)?)
        }
        None => None,
    };
    let condition_number = match op.rank_bound() {
        Some(r) if r < p && top.is_some() => {
            Some(if damping > 0.0 { (lambda_max + damping) / damping } else { f64::INFINITY })
        }
        _ => None,
    };
    let coupling = match options.layout {
        Some(layout) => {
            let c = coupling_implicit(op, layout, options.coupling_probes, options.slq.seed.wrapping_add(0xC0FFEE))?;
            fv_products += options.coupling_probes
                * (layout.ranges().len() + usize::from(layout.ranges().iter().map(|r| r.1).sum::<usize>() < p));
            bars.inter_layer_coupling = c.inter_layer_std_error;
            Some(c)
        }
        None => None,
    };

    Ok(Measures {
        method: "stochastic",
        parameters: p,
        trace,
        frobenius,
        top_eigenvalues: top.as_ref().map(|t| t.values.clone()).unwrap_or_default(),
        logdet: logdet.value,
        log_volume: 0.5 * logdet.value,
        damping,
        effective_dimension: d_eff.value,
        alpha,
        abbas_effective_dimension: abbas,
        abbas_samples: options.samples,
        fisher_rao_norm: quadratic.map(|q| q.max(0.0).sqrt()),
        fisher_rao_norm_squared: quadratic,
        condition_number,
        stable_rank,
        spectral_entropy: entropy.value,
        inter_layer_coupling: coupling.as_ref().and_then(|c| c.inter_layer),
        inter_unit_coupling: Vec::new(),
        error_bars: bars,
        lanczos_converged: top.map(|t| t.converged),
        fv_products,
    })
}
