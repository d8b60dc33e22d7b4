//! Networks: PyTorch `nn.Sequential` MLPs, their data, and every Fisher variant and form.
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
//! | `true`, Gaussian | k | the unit vectors (E[eeᵀ] = I, so F = JᵀJ / N) |
//! | `mc` (K samples) | K | e(ỹ_k)/√K with ỹ_k drawn from the predictive distribution |
//!
//! MC draws come from a counter-based generator ([`mc_uniform`]) keyed by (seed, sample, k),
//! implemented identically in Rust and WGSL, so every backend draws the same labels.

pub mod activation;
pub mod data;
pub mod kfac;
pub mod model;
pub mod reference;

pub use activation::Activation;
pub use kfac::{augmented_to_pytorch, kfac_expand};
pub use model::ActivationSpec;

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

/// Targets of a dataset.
#[derive(Debug, Clone, PartialEq)]
pub enum Targets {
    /// Class indices (categorical likelihood).
    Classes(Vec<u32>),
    /// Real targets, N×k (Gaussian likelihood).
    Values(Array2<f32>),
}

/// Inputs and targets.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// N × d inputs.
    pub inputs: Array2<f32>,
    /// Labels or regression targets.
    pub targets: Targets,
}

/// Which expectation over y.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// At the observed labels.
    Empirical,
    /// Exact expectation over the model's predictive distribution (closed form).
    True,
    /// `samples` labels per input drawn from the predictive distribution with `seed`.
    MonteCarlo {
        /// K.
        samples: usize,
        /// Seed of the counter-based generator.
        seed: u64,
    },
}

/// What to reduce a network's per-sample gradients to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetForm {
    /// F (P×P).
    Full,
    /// diag(F) (P).
    Diagonal,
    /// Per-layer diagonal blocks (P_l×P_l, weight then bias).
    Layer,
    /// KFAC factors per layer.
    Kfac,
    /// The square-root factor rows (N·R × P) with F = GᵀG/N; N×P for `empirical`.
    Grads,
    /// Per-sample E_y‖gᵢ‖² (N), computed without forming gradients.
    Norms,
}

/// KFAC factors of one layer.
///
/// `a` = (1/N) Σᵢ ãᵢ ãᵢᵀ over the augmented inputs ã = [a; 1] ((in+1)², or in² without bias);
/// `g` = (1/N) Σᵢ Σ_r δ_ir δ_irᵀ over the output rows' pre-activation gradients (out²).
/// The layer's Fisher block is approximated by `g ⊗ a` in the row-major order of the
/// augmented matrix [W | b] (index o·(in+1) + i); see [`kfac_expand`] for the permutation to
/// PyTorch order (weight row-major, then bias).
#[derive(Debug, Clone, PartialEq)]
pub struct KfacFactors<T = f32> {
    /// Input factor.
    pub a: Array2<T>,
    /// Output-gradient factor.
    pub g: Array2<T>,
}

/// A network Fisher result.
#[derive(Debug, Clone, PartialEq)]
pub enum NetFisher<T = f32> {
    /// F.
    Full(Array2<T>),
    /// diag(F).
    Diagonal(Array1<T>),
    /// Per-layer blocks.
    Layer(Vec<Array2<T>>),
    /// Per-layer KFAC factors.
    Kfac(Vec<KfacFactors<T>>),
    /// Square-root factor rows.
    Grads(Array2<T>),
    /// Per-sample squared norms.
    Norms(Array1<T>),
}

impl<T: Copy + Into<f64>> NetFisher<T> {
    /// The form's name as used on the command line.
    pub fn form_name(&self) -> &'static str {
        match self {
            NetFisher::Full(_) => "full",
            NetFisher::Diagonal(_) => "diag",
            NetFisher::Layer(_) => "layer",
            NetFisher::Kfac(_) => "kfac",
            NetFisher::Grads(_) => "grads",
            NetFisher::Norms(_) => "norms",
        }
    }

    /// Every stored value in a fixed order (for comparisons).
    pub fn values(&self) -> Vec<f64> {
        match self {
            NetFisher::Full(m) | NetFisher::Grads(m) => m.iter().map(|&v| v.into()).collect(),
            NetFisher::Diagonal(d) | NetFisher::Norms(d) => d.iter().map(|&v| v.into()).collect(),
            NetFisher::Layer(blocks) => blocks.iter().flat_map(|b| b.iter().map(|&v| v.into())).collect(),
            NetFisher::Kfac(factors) => factors
                .iter()
                .flat_map(|f| f.a.iter().chain(f.g.iter()).map(|&v| v.into()))
                .collect(),
        }
    }

    /// tr F for full, diag and layer; the mean of the norms (which equals tr F) for norms;
    /// Σ_l tr(G_l)·tr(A_l), the trace of the KFAC approximation, for kfac; and for grads
    /// Σ‖row‖² / rows, which is tr F only when there is one row per sample (`empirical`).
    pub fn trace(&self) -> f64 {
        let tr = |m: &Array2<T>| m.diag().iter().map(|&v| v.into()).sum::<f64>();
        match self {
            NetFisher::Full(m) => tr(m),
            NetFisher::Diagonal(d) => d.iter().map(|&v| v.into()).sum(),
            NetFisher::Layer(blocks) => blocks.iter().map(tr).sum(),
            NetFisher::Kfac(factors) => factors.iter().map(|f| tr(&f.a) * tr(&f.g)).sum(),
            NetFisher::Grads(g) => g.iter().map(|&v| v.into().powi(2)).sum::<f64>() / g.nrows().max(1) as f64,
            NetFisher::Norms(n) => n.iter().map(|&v| v.into()).sum::<f64>() / n.len().max(1) as f64,
        }
    }

    /// Compares against a reference of the same form (scale-free measures, see
    /// [`crate::form::Agreement`]).
    pub fn agreement<U: Copy + Into<f64>>(&self, reference: &NetFisher<U>) -> crate::Result<crate::form::Agreement> {
        let (a, b) = (self.values(), reference.values());
        if self.form_name() != reference.form_name() || a.len() != b.len() {
            return Err(crate::FisherError::InvalidInput(format!(
                "cannot compare {} ({} values) with {} ({} values)",
                self.form_name(),
                a.len(),
                reference.form_name(),
                b.len()
            )));
        }
        Ok(crate::form::agreement_of(&a, &b))
    }
}

/// Result of an implicit Fisher–vector product.
#[derive(Debug, Clone, PartialEq)]
pub struct Fvp {
    /// F·v in θ order (`None` when only the quadratic form was asked for).
    pub product: Option<Array1<f32>>,
    /// vᵀ F v, accumulated in f64.
    pub quadratic: f64,
}

/// PCG-RXS-M-XS 32-bit hash (O'Neill 2014), the building block of [`mc_uniform`]; the same
/// function is in `shaders/mlp.wgsl` (WGSL has no 64-bit integers, hence 32-bit words).
pub fn pcg_hash(x: u32) -> u32 {
    let state = x.wrapping_mul(747_796_405).wrapping_add(2_891_336_453);
    let word = ((state >> ((state >> 28) + 4)) ^ state).wrapping_mul(277_803_737);
    (word >> 22) ^ word
}

/// Uniform in [0, 1) with 24 random bits (exact in f32), keyed by (seed, sample, draw, stream):
/// `h = pcg(seed_lo ^ pcg(seed_hi ^ pcg(sample ^ pcg(draw ^ pcg(stream)))))`, u = (h >> 8)·2⁻²⁴.
/// `sample` is the index of the input in the whole dataset, so results do not depend on how
/// samples are batched. Categorical draws use stream 0 and the inverse CDF (the first class c
/// with u < p₀ + … + p_c); Gaussian draws use streams 2j and 2j+1 for output j and Box–Muller,
/// ε_j = √(−2 ln(1 − u₁)) · cos(2π u₂).
pub fn mc_uniform(seed: u64, sample: u32, draw: u32, stream: u32) -> f32 {
    let h = pcg_hash(
        (seed as u32) ^ pcg_hash(((seed >> 32) as u32) ^ pcg_hash(sample ^ pcg_hash(draw ^ pcg_hash(stream)))),
    );
    (h >> 8) as f32 * (1.0 / 16_777_216.0)
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

/// Output rows R per sample for `variant` with `outputs` network outputs (see the table above).
pub fn rows_per_sample(variant: Variant, outputs: usize) -> usize {
    match variant {
        Variant::Empirical => 1,
        Variant::True => outputs,
        Variant::MonteCarlo { samples, .. } => samples,
    }
}

/// The categorical MC draw: the first class c with u < p₀ + … + p_c (the last class when
/// rounding leaves u above the running sum), u = `mc_uniform(seed, sample, draw, 0)`.
pub fn mc_class(seed: u64, sample: u32, draw: u32, p: &[f32]) -> usize {
    let u = mc_uniform(seed, sample, draw, 0);
    let mut cum = 0.0f32;
    for (j, &pj) in p.iter().enumerate() {
        cum += pj;
        if u < cum {
            return j;
        }
    }
    p.len().saturating_sub(1)
}

/// The Gaussian MC draw ε_j for output j: Box–Muller on streams 2j and 2j + 1.
pub fn mc_normal(seed: u64, sample: u32, draw: u32, j: usize) -> f32 {
    let u1 = mc_uniform(seed, sample, draw, 2 * j as u32);
    let u2 = mc_uniform(seed, sample, draw, 2 * j as u32 + 1);
    (-2.0 * (1.0 - u1).ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}
