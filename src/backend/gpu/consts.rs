//! Constants shared between the host and the WGSL kernels, defined once here.
//!
//! The shaders declare the same names as WGSL `const`s (or, for the workgroup size, an
//! `override` with this default); `tests/shaders.rs` parses every shader with naga and fails
//! when a value differs from [`SHARED`], so the two sides cannot drift apart silently.

use super::kernels::Shader;

/// Default workgroup size of the one-dimensional kernels (`override WG` in the shaders). The
/// value actually used is chosen per adapter by [`super::kernels::workgroup_size`].
pub const WG_DEFAULT: u32 = 256;

/// Output tile edge of both SYRK variants (`TILE` in `syrk.wgsl`).
pub const SYRK_TILE: u32 = 64;
/// Depth of one workgroup-memory stage of `syrk_tiled` (`KT`).
pub const SYRK_KT: u32 = 16;
/// Values of the reduction dimension summed in f32 before a Kahan fold (`KB` in `syrk.wgsl`
/// and `diag.wgsl`).
pub const KAHAN_BLOCK: u32 = 64;

/// `MlpParams::flags`: `bias_act` adds the bias.
pub const FLAG_BIAS: u32 = 1;
/// `MlpParams::flags`: `act_next` writes the trailing 1 of ã.
pub const FLAG_ONE: u32 = 2;
/// `MlpParams::flags`: `head`/`head_fvp` use the Gaussian likelihood (else categorical).
pub const FLAG_GAUSSIAN: u32 = 4;

/// `MlpParams::variant` of the empirical Fisher.
pub const VARIANT_EMPIRICAL: u32 = 0;
/// `MlpParams::variant` of the true Fisher.
pub const VARIANT_TRUE: u32 = 1;
/// `MlpParams::variant` of the Monte Carlo Fisher.
pub const VARIANT_MC: u32 = 2;

/// Activation code of the identity ([`crate::model::Activation::code`]).
pub const ACT_IDENTITY: u32 = 0;
/// Activation code of ReLU.
pub const ACT_RELU: u32 = 1;
/// Activation code of tanh.
pub const ACT_TANH: u32 = 2;
/// Activation code of the logistic sigmoid.
pub const ACT_SIGMOID: u32 = 3;
/// Activation code of GELU (erf form).
pub const ACT_GELU: u32 = 4;

/// Every constant a shader mirrors: (shader, WGSL name, value). `WG` is an `override` whose
/// default must equal [`WG_DEFAULT`]; the rest are `const`s.
pub const SHARED: &[(Shader, &str, u32)] = &[
    (Shader::Syrk, "TILE", SYRK_TILE),
    (Shader::Syrk, "KT", SYRK_KT),
    (Shader::Syrk, "KB", KAHAN_BLOCK),
    (Shader::Diag, "KB", KAHAN_BLOCK),
    (Shader::Diag, "WG", WG_DEFAULT),
    (Shader::Norms, "WG", WG_DEFAULT),
    (Shader::Mlp, "WG", WG_DEFAULT),
    (Shader::Mlp, "FLAG_BIAS", FLAG_BIAS),
    (Shader::Mlp, "FLAG_ONE", FLAG_ONE),
    (Shader::Mlp, "FLAG_GAUSSIAN", FLAG_GAUSSIAN),
    (Shader::Mlp, "VARIANT_EMPIRICAL", VARIANT_EMPIRICAL),
    (Shader::Mlp, "VARIANT_TRUE", VARIANT_TRUE),
    (Shader::Mlp, "VARIANT_MC", VARIANT_MC),
    (Shader::Mlp, "ACT_IDENTITY", ACT_IDENTITY),
    (Shader::Mlp, "ACT_RELU", ACT_RELU),
    (Shader::Mlp, "ACT_TANH", ACT_TANH),
    (Shader::Mlp, "ACT_SIGMOID", ACT_SIGMOID),
    (Shader::Mlp, "ACT_GELU", ACT_GELU),
];
