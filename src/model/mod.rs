//! Models and data: PyTorch `nn.Sequential` MLPs (Linear layers and activations), their
//! inputs and targets, initialization and a seeded trainer.
//!
//! ## Model
//! A chain of `Linear` layers (PyTorch `nn.Linear`: z = W a + b, W is out×in, row-major)
//! with an element-wise activation after every layer but the last. The output z_L is the
//! logits of a softmax (categorical likelihood) or the mean of a unit-variance Gaussian.
//!
//! ## Parameter order (binding)
//! θ is PyTorch's `named_parameters()` order: layer by layer, the weight flattened
//! row-major (index o·in + i) then the bias (if any).
//!
//! ## Variants
//! With e(y) = ∂ log p(y|x) / ∂ z_L (categorical: onehot(y) − softmax(z_L); Gaussian: y − z_L),
//! every variant is a set of R weighted *output rows* s_r per sample, with
//! F = (1/N) Σᵢ Σ_r J_θᵢᵀ s_r s_rᵀ J_θᵢ:
//!
//! | variant | rows per sample | s_r |
//! |---|---|---|
//! | `empirical` | 1 | e(yᵢ) at the observed label |
//! | `true`, categorical | C | √p_c (onehot(c) − p), a square root of diag(p) − ppᵀ |
//! | `true`, Gaussian | k | the unit vectors (E\[eeᵀ\] = I, so F = JᵀJ / N) |
//! | `mc` (K samples) | K | e(ỹ_k)/√K with ỹ_k drawn from the predictive distribution |
//!
//! MC draws come from a counter-based generator ([`crate::fisher::mc_uniform`]) keyed by
//! (seed, sample, k), implemented identically in Rust and WGSL, so every backend draws the
//! same labels.

pub mod activation;
pub mod data;
pub mod mlp;
pub mod problem;
pub mod run;
pub mod source;
pub mod train;

pub use activation::Activation;
pub use data::NpyDataset;
pub use mlp::{architecture_text, ActivationSpec};
pub use source::{DataSource, TargetRows};

use ndarray::{Array1, Array2};

/// One `nn.Linear` layer.
#[derive(Debug, Clone, PartialEq)]
pub struct Linear {
    /// Its index in the `nn.Sequential` (the `<index>` of `<index>.weight`).
    pub index: usize,
    /// Weight, out × in (PyTorch layout).
    pub weight: Array2<f32>,
    /// Bias (out), if the layer has one.
    pub bias: Option<Array1<f32>>,
}

impl Linear {
    /// Input width.
    pub fn fan_in(&self) -> usize {
        self.weight.ncols()
    }
    /// Output width.
    pub fn fan_out(&self) -> usize {
        self.weight.nrows()
    }
    /// Number of parameters (weight, then bias).
    pub fn num_params(&self) -> usize {
        self.weight.len() + self.bias.as_ref().map_or(0, |b| b.len())
    }
    /// Width of the augmented input ã = [a; 1] (in + 1 with a bias, in without).
    pub fn augmented_in(&self) -> usize {
        self.fan_in() + self.bias.is_some() as usize
    }
}

/// A multilayer perceptron: Linear layers with an activation in every gap.
#[derive(Debug, Clone, PartialEq)]
pub struct Mlp {
    /// The layers, in order.
    pub layers: Vec<Linear>,
    /// `activations[l]` follows `layers[l]`; one fewer than layers.
    pub activations: Vec<Activation>,
}

/// The likelihood p(y | x) defined by the network output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Likelihood {
    /// Softmax over the outputs (logits); labels are class indices.
    #[default]
    Categorical,
    /// Unit-variance Gaussian with the outputs as mean; targets are N×k floats.
    Gaussian,
}

impl Likelihood {
    /// The command-line spelling: `categorical`, `gaussian`.
    pub fn name(self) -> &'static str {
        match self {
            Likelihood::Categorical => "categorical",
            Likelihood::Gaussian => "gaussian",
        }
    }
}

impl std::fmt::Display for Likelihood {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Likelihood {
    type Err = crate::FisherError;
    fn from_str(text: &str) -> crate::Result<Likelihood> {
        [Likelihood::Categorical, Likelihood::Gaussian].into_iter().find(|l| l.name() == text).ok_or_else(|| {
            crate::FisherError::InvalidInput(format!("unknown likelihood '{text}' (expected categorical or gaussian)"))
        })
    }
}

/// Targets of a dataset.
#[derive(Debug, Clone, PartialEq)]
pub enum Targets {
    /// Class indices (categorical likelihood).
    Classes(Vec<u32>),
    /// Real targets, N×k (Gaussian likelihood).
    Values(Array2<f32>),
}

/// Inputs and targets, in memory (a [`DataSource`]; [`NpyDataset`] is the same data read
/// from disk per micro-batch).
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// N × d inputs.
    pub inputs: Array2<f32>,
    /// Labels or regression targets.
    pub targets: Targets,
}

impl Dataset {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.inputs.nrows()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.inputs.nrows() == 0
    }

    /// The likelihood implied by the targets: class indices → categorical, values → Gaussian.
    pub fn likelihood(&self) -> Likelihood {
        match self.targets {
            Targets::Classes(_) => Likelihood::Categorical,
            Targets::Values(_) => Likelihood::Gaussian,
        }
    }
}
