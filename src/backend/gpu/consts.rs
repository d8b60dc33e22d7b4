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

/// `GraphParams::flags` (`graph.wgsl`): add into the destination.
pub const GRAPH_FLAG_ACC: u32 = 1;
/// `GraphParams::flags`: A stored transposed (k×m).
pub const GRAPH_FLAG_TA: u32 = 2;
/// `GraphParams::flags`: B stored transposed (n×k).
pub const GRAPH_FLAG_TB: u32 = 4;
/// `GraphParams::flags`: the CSR map has weights (in1).
pub const GRAPH_FLAG_WEIGHTS: u32 = 8;
/// `GraphParams::flags`: `g_colsum` sums squares.
pub const GRAPH_FLAG_SQUARE: u32 = 16;
/// `GraphParams::flags`: `g_gram` appends the constant-1 feature.
pub const GRAPH_FLAG_BIAS: u32 = 32;
/// `GraphParams::flags`: `g_gram` rows are stored features × positions.
pub const GRAPH_FLAG_POS_LAST: u32 = 64;
/// `GraphParams::flags`: `g_matmul` stacks the destination rows along m (B shared).
pub const GRAPH_FLAG_FLAT_M: u32 = 128;
/// `GraphParams::flags`: `g_matmul` stacks the destination rows along n (A shared).
pub const GRAPH_FLAG_FLAT_N: u32 = 256;
/// Bit position of in0's row mode in `GraphParams::flags`.
pub const GRAPH_A_MODE_SHIFT: u32 = 10;
/// Bit position of in1's row mode in `GraphParams::flags`.
pub const GRAPH_B_MODE_SHIFT: u32 = 12;
/// Row mode: the operand has the destination's row class (same row).
pub const GRAPH_MODE_SAME: u32 = 0;
/// Row mode: a `Shared` operand (row 0).
pub const GRAPH_MODE_SHARED: u32 = 1;
/// Row mode: a `Sample` operand of a `Draw` destination (row ⌊r / R⌋).
pub const GRAPH_MODE_DRAW: u32 = 2;
/// `g_binary` code of a + b.
pub const GRAPH_BIN_ADD: u32 = 0;
/// `g_binary` code of a − b.
pub const GRAPH_BIN_SUB: u32 = 1;
/// `g_binary` code of a · b.
pub const GRAPH_BIN_MUL: u32 = 2;
/// `g_binary` code of a / b.
pub const GRAPH_BIN_DIV: u32 = 3;

/// The `g_unary` codes by WGSL name, as [`crate::graph::prim::UnaryFn::code`] assigns them
/// (`tests/suite/shaders.rs` checks both sides).
pub const GRAPH_UNARY: [(&str, u32); 24] = [
    ("UN_RELU", 0),
    ("UN_LEAKY_RELU", 1),
    ("UN_TANH", 2),
    ("UN_SIGMOID", 3),
    ("UN_GELU", 4),
    ("UN_GELU_TANH", 5),
    ("UN_ERF", 6),
    ("UN_SOFTPLUS", 7),
    ("UN_SQRT", 8),
    ("UN_RSQRT", 9),
    ("UN_RECIPROCAL", 10),
    ("UN_EXP", 11),
    ("UN_SQUARE", 12),
    ("UN_AFFINE", 13),
    ("UN_STEP", 14),
    ("UN_LEAKY_STEP", 15),
    ("UN_TANH_DERIV", 16),
    ("UN_SIGMOID_DERIV", 17),
    ("UN_GELU_DERIV", 18),
    ("UN_GELU_TANH_DERIV", 19),
    ("UN_ERF_DERIV", 20),
    ("UN_SQRT_DERIV", 21),
    ("UN_RSQRT_DERIV", 22),
    ("UN_RECIPROCAL_DERIV", 23),
];

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
    (Shader::Graph, "WG", WG_DEFAULT),
    (Shader::Graph, "KB", KAHAN_BLOCK),
    (Shader::Graph, "FLAG_ACC", GRAPH_FLAG_ACC),
    (Shader::Graph, "FLAG_TA", GRAPH_FLAG_TA),
    (Shader::Graph, "FLAG_TB", GRAPH_FLAG_TB),
    (Shader::Graph, "FLAG_WEIGHTS", GRAPH_FLAG_WEIGHTS),
    (Shader::Graph, "FLAG_SQUARE", GRAPH_FLAG_SQUARE),
    (Shader::Graph, "FLAG_BIAS", GRAPH_FLAG_BIAS),
    (Shader::Graph, "FLAG_POS_LAST", GRAPH_FLAG_POS_LAST),
    (Shader::Graph, "FLAG_FLAT_M", GRAPH_FLAG_FLAT_M),
    (Shader::Graph, "FLAG_FLAT_N", GRAPH_FLAG_FLAT_N),
    (Shader::Graph, "A_MODE_SHIFT", GRAPH_A_MODE_SHIFT),
    (Shader::Graph, "B_MODE_SHIFT", GRAPH_B_MODE_SHIFT),
    (Shader::Graph, "MODE_SAME", GRAPH_MODE_SAME),
    (Shader::Graph, "MODE_SHARED", GRAPH_MODE_SHARED),
    (Shader::Graph, "MODE_DRAW", GRAPH_MODE_DRAW),
    (Shader::Graph, "BIN_ADD", GRAPH_BIN_ADD),
    (Shader::Graph, "BIN_SUB", GRAPH_BIN_SUB),
    (Shader::Graph, "BIN_MUL", GRAPH_BIN_MUL),
    (Shader::Graph, "BIN_DIV", GRAPH_BIN_DIV),
    (Shader::Graph, GRAPH_UNARY[0].0, GRAPH_UNARY[0].1),
    (Shader::Graph, GRAPH_UNARY[1].0, GRAPH_UNARY[1].1),
    (Shader::Graph, GRAPH_UNARY[2].0, GRAPH_UNARY[2].1),
    (Shader::Graph, GRAPH_UNARY[3].0, GRAPH_UNARY[3].1),
    (Shader::Graph, GRAPH_UNARY[4].0, GRAPH_UNARY[4].1),
    (Shader::Graph, GRAPH_UNARY[5].0, GRAPH_UNARY[5].1),
    (Shader::Graph, GRAPH_UNARY[6].0, GRAPH_UNARY[6].1),
    (Shader::Graph, GRAPH_UNARY[7].0, GRAPH_UNARY[7].1),
    (Shader::Graph, GRAPH_UNARY[8].0, GRAPH_UNARY[8].1),
    (Shader::Graph, GRAPH_UNARY[9].0, GRAPH_UNARY[9].1),
    (Shader::Graph, GRAPH_UNARY[10].0, GRAPH_UNARY[10].1),
    (Shader::Graph, GRAPH_UNARY[11].0, GRAPH_UNARY[11].1),
    (Shader::Graph, GRAPH_UNARY[12].0, GRAPH_UNARY[12].1),
    (Shader::Graph, GRAPH_UNARY[13].0, GRAPH_UNARY[13].1),
    (Shader::Graph, GRAPH_UNARY[14].0, GRAPH_UNARY[14].1),
    (Shader::Graph, GRAPH_UNARY[15].0, GRAPH_UNARY[15].1),
    (Shader::Graph, GRAPH_UNARY[16].0, GRAPH_UNARY[16].1),
    (Shader::Graph, GRAPH_UNARY[17].0, GRAPH_UNARY[17].1),
    (Shader::Graph, GRAPH_UNARY[18].0, GRAPH_UNARY[18].1),
    (Shader::Graph, GRAPH_UNARY[19].0, GRAPH_UNARY[19].1),
    (Shader::Graph, GRAPH_UNARY[20].0, GRAPH_UNARY[20].1),
    (Shader::Graph, GRAPH_UNARY[21].0, GRAPH_UNARY[21].1),
    (Shader::Graph, GRAPH_UNARY[22].0, GRAPH_UNARY[22].1),
    (Shader::Graph, GRAPH_UNARY[23].0, GRAPH_UNARY[23].1),
];
