//! Element-wise activations and their derivatives, in f32 (compute paths, mirrored in WGSL)
//! and f64 (reference).

use crate::error::{FisherError, Result};

impl std::fmt::Display for Activation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Activation {
    type Err = FisherError;
    fn from_str(text: &str) -> Result<Self> {
        Activation::parse(text)
    }
}

/// An element-wise activation between Linear layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// max(x, 0); derivative 1 for x > 0, else 0 (PyTorch's convention at 0).
    Relu,
    /// tanh(x); derivative 1 − tanh².
    Tanh,
    /// 1 / (1 + e⁻ˣ); derivative σ(1 − σ).
    Sigmoid,
    /// PyTorch's default exact GELU, x·Φ(x) = x·½(1 + erf(x/√2)); derivative Φ(x) + x·φ(x).
    Gelu,
    /// x; derivative 1.
    Identity,
}

impl Activation {
    /// Parses `relu|tanh|sigmoid|gelu|identity` (also accepts `linear`/`none` for identity).
    pub fn parse(name: &str) -> Result<Self> {
        match name.trim().to_ascii_lowercase().as_str() {
            "relu" => Ok(Activation::Relu),
            "tanh" => Ok(Activation::Tanh),
            "sigmoid" => Ok(Activation::Sigmoid),
            "gelu" => Ok(Activation::Gelu),
            "identity" | "linear" | "none" => Ok(Activation::Identity),
            other => Err(FisherError::InvalidInput(format!(
                "unknown activation '{}' (expected relu, tanh, sigmoid, gelu or identity)",
                crate::validate::quote(other)
            ))),
        }
    }

    /// The name as parsed.
    pub fn name(self) -> &'static str {
        match self {
            Activation::Relu => "relu",
            Activation::Tanh => "tanh",
            Activation::Sigmoid => "sigmoid",
            Activation::Gelu => "gelu",
            Activation::Identity => "identity",
        }
    }

    /// Every activation, in the order `--help` lists them.
    pub const ALL: [Activation; 5] =
        [Activation::Relu, Activation::Tanh, Activation::Sigmoid, Activation::Gelu, Activation::Identity];

    /// Code used by the WGSL kernels (`shaders/mlp.wgsl`).
    pub fn code(self) -> u32 {
        match self {
            Activation::Identity => 0,
            Activation::Relu => 1,
            Activation::Tanh => 2,
            Activation::Sigmoid => 3,
            Activation::Gelu => 4,
        }
    }

    /// φ(x) in f32.
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Activation::Relu => x.max(0.0),
            Activation::Tanh => x.tanh(),
            Activation::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            Activation::Gelu => 0.5 * x * (1.0 + erf_f32(x * std::f32::consts::FRAC_1_SQRT_2)),
            Activation::Identity => x,
        }
    }

    /// φ'(x) in f32.
    pub fn derivative(self, x: f32) -> f32 {
        match self {
            Activation::Relu => (x > 0.0) as u8 as f32,
            Activation::Tanh => {
                let t = x.tanh();
                1.0 - t * t
            }
            Activation::Sigmoid => {
                let s = 1.0 / (1.0 + (-x).exp());
                s * (1.0 - s)
            }
            Activation::Gelu => {
                let cdf = 0.5 * (1.0 + erf_f32(x * std::f32::consts::FRAC_1_SQRT_2));
                let pdf = (-0.5 * x * x).exp() * 0.398_942_28; // 1/√(2π)
                cdf + x * pdf
            }
            Activation::Identity => 1.0,
        }
    }

    /// φ(x) in f64 (reference).
    pub fn apply_f64(self, x: f64) -> f64 {
        match self {
            Activation::Relu => x.max(0.0),
            Activation::Tanh => x.tanh(),
            Activation::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            Activation::Gelu => 0.5 * x * (1.0 + erf_f64(x * std::f64::consts::FRAC_1_SQRT_2)),
            Activation::Identity => x,
        }
    }

    /// φ'(x) in f64 (reference).
    pub fn derivative_f64(self, x: f64) -> f64 {
        match self {
            Activation::Relu => (x > 0.0) as u8 as f64,
            Activation::Tanh => 1.0 - x.tanh().powi(2),
            Activation::Sigmoid => {
                let s = 1.0 / (1.0 + (-x).exp());
                s * (1.0 - s)
            }
            Activation::Gelu => {
                let cdf = 0.5 * (1.0 + erf_f64(x * std::f64::consts::FRAC_1_SQRT_2));
                let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
                cdf + x * pdf
            }
            Activation::Identity => 1.0,
        }
    }
}

/// erf in f32 arithmetic: Abramowitz & Stegun 7.1.26, |error| ≤ 1.5·10⁻⁷ (plus f32 rounding),
/// the same formula as `erf_approx` in `shaders/mlp.wgsl`.
pub fn erf_f32(x: f32) -> f32 {
    let sign = if x < 0.0 { -1.0 } else { 1.0 };
    let ax = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * ax);
    let poly = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    sign * (1.0 - poly * (-ax * ax).exp())
}

/// erf in f64 for the reference: W. J. Cody's rational Chebyshev approximations as
/// implemented by `libm` (≈ 1 ulp), independent of the f32 formula above.
pub fn erf_f64(x: f64) -> f64 {
    libm::erf(x)
}
