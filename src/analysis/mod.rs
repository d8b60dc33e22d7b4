//! Analysis: spectra, complexity measures and solves on Fisher matrices, in f64 on the CPU.
//!
//! Data flows one way: forms (dense, diagonal, layer blocks, KFAC factors, Gram) or the
//! implicit F·v of a network ([`ImplicitFisher`]) come in as a [`FisherOperator`]; this
//! module reads them and returns numbers. Everything here is f64 (inputs stored as f32 are widened once), because spectra
//! of Fisher matrices span many decades and their small end is what log-determinants and
//! effective dimensions are made of.
//!
//! ## What is computed, and how
//!
//! | quantity | exact (stored forms) | implicit (F·v only) |
//! |---|---|---|
//! | eigenvalues | [`ExplicitFisher::eigenvalues`]: dense symmetric eigensolver (faer) per block; KFAC from the factors' eigenvalues | top-k by [`lanczos_top_k`] |
//! | log det(F + λI) | Σᵢ log(λᵢ + λ) | [`slq`] with f(x) = log(x + λ) |
//! | (F + λI)x = b | Cholesky / per-block Cholesky / KFAC eigenbasis ([`ExplicitFisher::solve_damped`]) | [`conjugate_gradient`] |
//! | measures ([`Measures`]) | [`measures_exact`] | [`measures_implicit`] |
//!
//! [`report`] puts these together for a network (a model and data, or a stored form): it
//! chooses the form, opens the device, computes and measures, and plots; `fisher report` is
//! that module behind flags.
//!
//! ## Conventions
//!
//! * F is P×P, symmetric positive semi-definite, normalized by 1/N (a mean over samples),
//!   in PyTorch `named_parameters()` order (per layer: weight row-major, index o·in + i, then
//!   bias, index out·in + o), as everywhere in this crate.
//! * The Gram matrix K = G Gᵀ/N (N×N) is the dual of F = GᵀG/N: the non-zero eigenvalues
//!   agree; F has P − rank zero eigenvalues more. Measures of F computed from K pad K's
//!   spectrum with zeros to P (or drop its N − P smallest when N > P).
//! * Eigenvalues are returned in descending order. Computed eigenvalues of a PSD matrix can
//!   come out slightly negative (rounding, of order P·ε·λ_max); the measures clamp them to 0.
//! * A form stored in f32 is exact as stored, but it is F rounded once (relative 6·10⁻⁸ per
//!   entry): eigenvalues below ~10⁻⁷·λ_max of an f32 F, and so log-determinants with a
//!   damping that small, describe the rounding rather than the model.
//! * A measure that is undefined (the condition number of a singular F at λ = 0) is
//!   `f64::INFINITY`, which `serde_json` writes as `null`; a measure that a form cannot
//!   show (coupling of a diagonal form) is `None`, also `null` in JSON.
//! * Stochastic estimates ([`Estimate`]) carry a *statistical* error bar: the standard error
//!   of the mean over independent probes, σ/√n (≈ 68% coverage for a Gaussian sampling
//!   distribution; n ≥ 2). The quadrature bias of SLQ is not in it; SLQ measures carry a
//!   separate bound on it from the Gauss/Gauss–Radau bracket ([`QuadratureBounds`]), which
//!   matters when F has a large null space (rank N·R ≪ P).
//!
//! ## Example
//!
//! ```
//! use fisher_engine::analysis::{self, ExplicitFisher, FisherOperator, LanczosOptions};
//! use fisher_engine::{reference::grads as reference, Form};
//! let grads = fisher_engine::synthetic::gradient_like(64, 12, 1);
//! let full = reference::reduce(grads.view(), &Form::Full)?;
//! let fisher = ExplicitFisher::from_matrix(&full)?;
//! let exact = fisher.eigenvalues()?; // descending
//! let top = analysis::lanczos_top_k(&fisher, &LanczosOptions::top(3))?;
//! assert!((top.values[0] - exact[0]).abs() <= 1e-9 * exact[0]);
//! let logdet = fisher.logdet(1e-3)?; // log det(F + 10⁻³ I)
//! assert!(logdet.is_finite());
//! # Ok::<(), fisher_engine::FisherError>(())
//! ```

pub mod action;
mod coupling;
mod dense;
mod implicit;
mod lanczos;
mod measures;
mod operator;
pub mod report;
mod slq;
mod solve;
mod spectrum;

pub use coupling::{coupling_implicit, Coupling};
pub use implicit::{top_eigenvalues, ImplicitFisher, TopEigenvalues, GRAM_OPERATOR_BYTES};
pub use lanczos::{lanczos_top_k, LanczosOptions, LanczosResult};
pub use measures::{
    abbas_effective_dimension, measures_exact, measures_from_quadrature, measures_from_spectrum, measures_implicit,
    ErrorBars, MeasureOptions, Measures, QuadratureBounds,
};
pub use operator::{
    BlockDiagonalOperator, DenseOperator, DiagonalOperator, ExplicitFisher, FactorOperator, FisherOperator, FnOperator,
    GramOperator, KfacLayer, KfacOperator,
};
pub use slq::{slq, slq_deflated, SlqOptions, SlqQuadrature};
pub use solve::{conjugate_gradient, CgOptions, Solution};
pub use spectrum::{eigenvalues, net_eigenvalues, SpectralDensity, Spectrum};

use serde::Serialize;

use crate::error::{FisherError, Result};
use crate::model::{Linear, Mlp};

/// Shape of one `nn.Linear` layer, for the unit structure of its parameter block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LayerShape {
    /// Input width (columns of W).
    pub fan_in: usize,
    /// Output width (rows of W): the number of units.
    pub fan_out: usize,
    /// Whether the layer has a bias (one more parameter per unit).
    pub has_bias: bool,
}

impl LayerShape {
    /// Number of parameters: out·in weights plus out biases if any.
    pub fn num_params(&self) -> usize {
        self.fan_out * self.fan_in + if self.has_bias { self.fan_out } else { 0 }
    }

    /// Width of the augmented input ã = [a; 1]: in + 1 with a bias, in without (the size
    /// of the KFAC factor A).
    pub fn augmented_in(&self) -> usize {
        self.fan_in + self.has_bias as usize
    }

    /// Indices (relative to the layer's first parameter, PyTorch order) owned by unit `o`:
    /// its weight row o·in … o·in + in − 1 and, with a bias, out·in + o.
    pub fn unit_indices(&self, o: usize) -> impl Iterator<Item = usize> + '_ {
        let row = o * self.fan_in..(o + 1) * self.fan_in;
        row.chain(self.has_bias.then_some(self.fan_out * self.fan_in + o))
    }
}

impl From<&Linear> for LayerShape {
    fn from(layer: &Linear) -> Self {
        LayerShape { fan_in: layer.fan_in(), fan_out: layer.fan_out(), has_bias: layer.bias.is_some() }
    }
}

/// Where each layer's parameters sit in θ: disjoint ranges (start, len) within [0, P), and
/// optionally each layer's [`LayerShape`] (needed for inter-unit coupling and for KFAC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParameterLayout {
    dim: usize,
    ranges: Vec<(usize, usize)>,
    shapes: Option<Vec<LayerShape>>,
}

impl ParameterLayout {
    /// Consecutive layers with these shapes, starting at parameter 0 (P = Σ num_params).
    pub fn from_shapes(shapes: &[LayerShape]) -> Result<Self> {
        if shapes.is_empty() {
            return Err(FisherError::InvalidInput("a parameter layout needs at least one layer".into()));
        }
        let mut ranges = Vec::with_capacity(shapes.len());
        let mut start = 0usize;
        for (l, shape) in shapes.iter().enumerate() {
            let len = shape.num_params();
            if len == 0 {
                return Err(FisherError::InvalidInput(format!("layer {l} has no parameters ({shape:?})")));
            }
            ranges.push((start, len));
            start += len;
        }
        Ok(ParameterLayout { dim: start, ranges, shapes: Some(shapes.to_vec()) })
    }

    /// The layout of an [`Mlp`] (PyTorch `named_parameters()` order).
    pub fn from_mlp(mlp: &Mlp) -> Result<Self> {
        let shapes: Vec<LayerShape> = mlp.layers.iter().map(LayerShape::from).collect();
        Self::from_shapes(&shapes)
    }

    /// Arbitrary parameter groups: non-empty, non-overlapping ranges (start, len) inside
    /// [0, dim), in increasing order; they need not cover every parameter. No unit structure.
    pub fn from_ranges(ranges: Vec<(usize, usize)>, dim: usize) -> Result<Self> {
        if ranges.is_empty() {
            return Err(FisherError::InvalidInput("a parameter layout needs at least one range".into()));
        }
        let mut end = 0usize;
        for (l, &(start, len)) in ranges.iter().enumerate() {
            let stop = start.checked_add(len).filter(|&s| s <= dim);
            match stop {
                Some(stop) if len > 0 && start >= end => end = stop,
                _ => {
                    return Err(FisherError::InvalidInput(format!(
                        "parameter range {l} = ({start}, {len}) is empty, overlaps the previous one or \
                         leaves [0, {dim})"
                    )))
                }
            }
        }
        Ok(ParameterLayout { dim, ranges, shapes: None })
    }

    /// P, the number of parameters the layout lives in.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The per-layer ranges (start, len).
    pub fn ranges(&self) -> &[(usize, usize)] {
        &self.ranges
    }

    /// The per-layer shapes, when known.
    pub fn shapes(&self) -> Option<&[LayerShape]> {
        self.shapes.as_deref()
    }

    pub(crate) fn check_dim(&self, dim: usize) -> Result<()> {
        if dim != self.dim {
            return Err(FisherError::InvalidInput(format!(
                "the parameter layout has {} parameters but the Fisher matrix has {dim}",
                self.dim
            )));
        }
        Ok(())
    }
}

/// A stochastic estimate: mean over independent probes and its standard error σ/√n
/// (a statistical error bar, ≈ 68% for a Gaussian sampling distribution; with few probes σ
/// is itself estimated and ±1 error bar covers a little less, as Student's t says — e.g.
/// ±3 error bars cover 99.4% at n = 24 instead of 99.7%).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Estimate {
    /// The estimate (mean over probes).
    pub value: f64,
    /// Standard error of the mean: sample standard deviation (n − 1 in the denominator) / √n.
    pub std_error: f64,
    /// Number of probes n.
    pub probes: usize,
}

impl Estimate {
    /// Mean and standard error of per-probe values (n ≥ 1; the error bar of one probe is ∞).
    pub fn from_samples(samples: &[f64]) -> Estimate {
        let n = samples.len();
        let mean = samples.iter().sum::<f64>() / n.max(1) as f64;
        let std_error = if n < 2 {
            f64::INFINITY
        } else {
            let var = samples.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
            (var / n as f64).sqrt()
        };
        Estimate { value: mean, std_error, probes: n }
    }
}

/// f64 dot product of two f64 slices (4 independent accumulators: faster, and no less
/// accurate than a single running sum).
pub(crate) fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0.0f64; 4];
    let chunks = a.len() / 4;
    for c in 0..chunks {
        for k in 0..4 {
            acc[k] += a[4 * c + k] * b[4 * c + k];
        }
    }
    let mut tail = 0.0;
    for i in 4 * chunks..a.len() {
        tail += a[i] * b[i];
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

/// Euclidean norm.
pub(crate) fn norm(a: &[f64]) -> f64 {
    dot(a, a).sqrt()
}

/// Errors unless `v` has length `dim`.
pub(crate) fn check_len(what: &str, v: &[f64], dim: usize) -> Result<()> {
    if v.len() != dim {
        return Err(FisherError::InvalidInput(format!(
            "{what} has length {} but the operator has dimension {dim}",
            v.len()
        )));
    }
    Ok(())
}
