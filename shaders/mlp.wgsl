// mlp.wgsl — the element-wise stages of an MLP's per-sample backward pass.
//
// The matrix products (forward z = ã Wᵀ, backward δ W, and every reduction) run through the
// compensated GEMM in syrk.wgsl; this file holds what sits between them. One bind-group
// layout serves every entry point (unused bindings are bound to a dummy buffer):
//
//   0 uniform  Params
//   1 storage  read        in0   (f32)
//   2 storage  read        in1   (f32)
//   3 storage  read        in2   (f32)
//   4 storage  read_write  out0  (f32)
//
// Shapes (row-major; "rows" are samples, "R-rows" are the R output rows of each sample,
// sample-major: R-row q belongs to sample q / R):
//   bias_act      in0 S, in1 C (rows × cols; the GEMM's Kahan pair, value S − C), in2 bias (cols)
//                 → out0 z (rows × cols); the activation goes to the next layer's input via
//                 act_next (a second entry point, same math) so each entry writes one buffer.
//   act_next      in0 z (rows × cols) → out0 ã (rows × ld_out): φ(z), and 1 in column `cols`
//                 when the next layer has a bias (flag 2).
//   head          in0 logits/means z (rows × cols), in1 targets (labels as bitcast u32, or
//                 rows × cols values) → out0 δ_L (rows·R × cols), per variant (see nn docs),
//                 one invocation per R-row. R here is the rows of one chunk: R-row q of a
//                 sample is its output row draw_off + q (the MC draw, or the class for
//                 `true`), so the host can walk K draws in chunks of any size.
//   backprop_act  in0 S, in1 C (rows·R × cols), in2 z_prev (rows × cols) → out0 δ = (S − C)·φ'(z).
//   sample_sq     in0 δ (rows·R × cols) → out0 Σ_q δ² per sample (rows × cols), compensated.
//   square        in0 x (rows × cols) → out0 x² (elementwise).
//   tangent_act   in0 ż (rows × cols), in1 z (rows × cols) → out0 ȧ_next = φ'(z)·ż (rows × cols):
//                 forward-mode (JVP) propagation of a parameter direction v.
//   head_fvp      in0 z_L, in1 targets, in2 ż_L (rows × cols) → out0 w = Λ ż per sample, with
//                 Λ = E_y[e eᵀ] of the variant (true categorical: diag(p) − ppᵀ; true Gaussian:
//                 I; empirical: e eᵀ; MC: (1/K) Σ_k e_k e_kᵀ), so that F·v = (1/N) Σ Jᵀ Λ J v.
//                 MC adds draws draw_off .. draw_off + r to out0 (cleared when draw_off = 0),
//                 so the host splits K into dispatches of bounded length.
//   outer_grads   in0 δ (rows·R × ld_a=out), in1 ã (rows × ld_b) → out0 grads (rows·R × ld_out) at
//                 column offset out_off: weight (o, i) → o·fan_in + i, then bias o → out·fan_in + o.
//
// Workgroup size: the override WG (default 256; the host passes the value it chose for the
// adapter and divides its dispatches by the same value); the element index is linear over a
// 2-D dispatch. Precision: f32; the activations match src/model/activation.rs (erf by
// Abramowitz & Stegun 7.1.26, |ε| ≤ 1.5e-7).
//
// The FLAG_*, VARIANT_* and ACT_* constants mirror src/backend/gpu/consts.rs (checked by
// tests/shaders.rs).

struct Params {
    rows: u32,
    cols: u32,
    ld_a: u32,
    ld_out: u32,
    act: u32,
    flags: u32,
    r: u32,
    fan_in: u32,
    out_off: u32,
    sample_off: u32,
    variant: u32,
    seed_lo: u32,
    seed_hi: u32,
    scale: f32,
    ld_b: u32,
    draw_off: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> in0: array<f32>;
@group(0) @binding(2) var<storage, read> in1: array<f32>;
@group(0) @binding(3) var<storage, read> in2: array<f32>;
@group(0) @binding(4) var<storage, read_write> out0: array<f32>;

const FLAG_BIAS: u32 = 1u;      // bias_act: add in2
const FLAG_ONE: u32 = 2u;       // act_next: write the trailing 1 of ã
const FLAG_GAUSSIAN: u32 = 4u;  // head: Gaussian likelihood (else categorical)

const VARIANT_EMPIRICAL: u32 = 0u;
const VARIANT_TRUE: u32 = 1u;
const VARIANT_MC: u32 = 2u;

// Activation codes (crate::model::Activation::code).
const ACT_IDENTITY: u32 = 0u;
const ACT_RELU: u32 = 1u;
const ACT_TANH: u32 = 2u;
const ACT_SIGMOID: u32 = 3u;
const ACT_GELU: u32 = 4u;

override WG: u32 = 256u;

fn linear_id(wg: vec3<u32>, nwg: vec3<u32>, lidx: u32) -> u32 {
    return (wg.y * nwg.x + wg.x) * WG + lidx;
}

fn erf_approx(x: f32) -> f32 {
    let ax = abs(x);
    let t = 1.0 / (1.0 + 0.3275911 * ax);
    let poly = t * (0.2548296 + t * (-0.28449674 + t * (1.4214137 + t * (-1.4531521 + t * 1.0614054))));
    return sign(x) * (1.0 - poly * exp(-ax * ax));
}

fn tanh_safe(x: f32) -> f32 {
    // Some drivers evaluate tanh as (e²ˣ − 1)/(e²ˣ + 1), which is inf/inf = NaN for large x;
    // tanh(±15) already rounds to ±1 in f32.
    return tanh(clamp(x, -15.0, 15.0));
}

fn activate(code: u32, x: f32) -> f32 {
    switch code {
        case ACT_RELU: { return max(x, 0.0); }
        case ACT_TANH: { return tanh_safe(x); }
        case ACT_SIGMOID: { return 1.0 / (1.0 + exp(-x)); }
        case ACT_GELU: { return 0.5 * x * (1.0 + erf_approx(x * 0.70710678)); }
        case ACT_IDENTITY, default: { return x; }
    }
}

fn derivative(code: u32, x: f32) -> f32 {
    switch code {
        case ACT_RELU: { return select(0.0, 1.0, x > 0.0); }
        case ACT_TANH: { let t = tanh_safe(x); return 1.0 - t * t; }
        case ACT_SIGMOID: { let s = 1.0 / (1.0 + exp(-x)); return s * (1.0 - s); }
        case ACT_GELU: {
            let cdf = 0.5 * (1.0 + erf_approx(x * 0.70710678));
            return cdf + x * exp(-0.5 * x * x) * 0.39894228;
        }
        case ACT_IDENTITY, default: { return 1.0; }
    }
}

@compute @workgroup_size(WG, 1, 1)
fn bias_act(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lidx: u32) {
    let e = linear_id(wg, nwg, lidx);
    if (e >= params.rows * params.cols) { return; }
    var z = in0[e] - in1[e];
    if ((params.flags & FLAG_BIAS) != 0u) {
        z = z + in2[e % params.cols];
    }
    out0[e] = z;
}

@compute @workgroup_size(WG, 1, 1)
fn act_next(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lidx: u32) {
    let e = linear_id(wg, nwg, lidx);
    if (e >= params.rows * params.cols) { return; }
    let r = e / params.cols;
    let j = e % params.cols;
    out0[r * params.ld_out + j] = activate(params.act, in0[e]);
    if (j == 0u && (params.flags & FLAG_ONE) != 0u) {
        out0[r * params.ld_out + params.cols] = 1.0;
    }
}

// PCG-RXS-M-XS 32 (same as nn::pcg_hash).
fn pcg_hash(x: u32) -> u32 {
    let state = x * 747796405u + 2891336453u;
    let word = ((state >> ((state >> 28u) + 4u)) ^ state) * 277803737u;
    return (word >> 22u) ^ word;
}

// Same as nn::mc_uniform.
fn mc_uniform(sample: u32, draw: u32, stream: u32) -> f32 {
    let h = pcg_hash(params.seed_lo ^ pcg_hash(params.seed_hi ^ pcg_hash(sample ^ pcg_hash(draw ^ pcg_hash(stream)))));
    return f32(h >> 8u) * (1.0 / 16777216.0);
}

// Standard normal draw j of draw q (Box–Muller on two keyed uniforms; same as nn::mc_normal).
fn mc_normal(sample: u32, q: u32, j: u32) -> f32 {
    let u1 = mc_uniform(sample, q, 2u * j);
    let u2 = mc_uniform(sample, q, 2u * j + 1u);
    return sqrt(-2.0 * log(1.0 - u1)) * cos(6.2831853 * u2);
}

// Softmax of the logits in0[zb .. zb + c], stabilized by the maximum logit: returns
// (max, 1 / Σ exp(z − max)), so that p_j = softmax_p(zb, j, sm).
fn softmax_shift(zb: u32, c: u32) -> vec2<f32> {
    var zmax = in0[zb];
    for (var j = 1u; j < c; j++) { zmax = max(zmax, in0[zb + j]); }
    var denom = 0.0;
    for (var j = 0u; j < c; j++) { denom = denom + exp(in0[zb + j] - zmax); }
    return vec2<f32>(zmax, 1.0 / denom);
}

fn softmax_p(zb: u32, j: u32, sm: vec2<f32>) -> f32 {
    return exp(in0[zb + j] - sm.x) * sm.y;
}

// Class of MC draw q by inverse CDF: the first class whose cumulative probability exceeds u
// (same as nn::mc_class).
fn mc_class(sample: u32, q: u32, zb: u32, c: u32, sm: vec2<f32>) -> u32 {
    let u = mc_uniform(sample, q, 0u);
    var cum = 0.0;
    var y = c - 1u;
    for (var j = 0u; j < c; j++) {
        cum = cum + softmax_p(zb, j, sm);
        if (u < cum) { y = j; break; }
    }
    return y;
}

// One invocation per R-row e = s·R + q of the chunk: sample s, output row draw_off + q.
@compute @workgroup_size(WG, 1, 1)
fn head(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lidx: u32) {
    let e = linear_id(wg, nwg, lidx);
    let rr = params.r;
    if (e >= params.rows * rr) { return; }
    let s = e / rr;
    let q = params.draw_off + e % rr;
    let c = params.cols;
    let zb = s * c;
    let ob = e * c;

    if ((params.flags & FLAG_GAUSSIAN) != 0u) {
        if (params.variant == VARIANT_EMPIRICAL) {
            for (var j = 0u; j < c; j++) { out0[ob + j] = in1[zb + j] - in0[zb + j]; }
        } else if (params.variant == VARIANT_TRUE) {
            for (var j = 0u; j < c; j++) { out0[ob + j] = select(0.0, 1.0, q == j); }
        } else {
            for (var j = 0u; j < c; j++) {
                out0[ob + j] = mc_normal(params.sample_off + s, q, j) * params.scale;
            }
        }
        return;
    }

    // Categorical: p = softmax(z).
    let sm = softmax_shift(zb, c);

    if (params.variant == VARIANT_EMPIRICAL) {
        let y = bitcast<u32>(in1[s]);
        for (var j = 0u; j < c; j++) {
            let p = softmax_p(zb, j, sm);
            out0[ob + j] = select(0.0, 1.0, j == y) - p;
        }
    } else if (params.variant == VARIANT_TRUE) {
        // Row q = √p_q (onehot(q) − p): Σ_q rows rowsᵀ = diag(p) − ppᵀ.
        let sq = sqrt(softmax_p(zb, q, sm));
        for (var j = 0u; j < c; j++) {
            let p = softmax_p(zb, j, sm);
            out0[ob + j] = sq * (select(0.0, 1.0, j == q) - p);
        }
    } else {
        let y = mc_class(params.sample_off + s, q, zb, c, sm);
        for (var j = 0u; j < c; j++) {
            let p = softmax_p(zb, j, sm);
            out0[ob + j] = (select(0.0, 1.0, j == y) - p) * params.scale;
        }
    }
}

@compute @workgroup_size(WG, 1, 1)
fn tangent_act(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lidx: u32) {
    let e = linear_id(wg, nwg, lidx);
    if (e >= params.rows * params.cols) { return; }
    out0[e] = in0[e] * derivative(params.act, in1[e]);
}

// w = Λ ż for one sample per invocation; `scale` = 1/K for MC (the mean over K draws, drawn
// with the same keys as head(), so F·v matches the materialized MC Fisher exactly). MC adds
// the draws draw_off .. draw_off + r of this dispatch, starting from 0 when draw_off = 0.
@compute @workgroup_size(WG, 1, 1)
fn head_fvp(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lidx: u32) {
    let s = linear_id(wg, nwg, lidx);
    if (s >= params.rows) { return; }
    let c = params.cols;
    let zb = s * c;
    let kk = params.r; // MC draws of this dispatch (1 otherwise)
    let q0 = params.draw_off;

    if ((params.flags & FLAG_GAUSSIAN) != 0u) {
        if (params.variant == VARIANT_TRUE) {
            for (var j = 0u; j < c; j++) { out0[zb + j] = in2[zb + j]; }
        } else if (params.variant == VARIANT_EMPIRICAL) {
            var dot = 0.0;
            for (var j = 0u; j < c; j++) { dot = dot + (in1[zb + j] - in0[zb + j]) * in2[zb + j]; }
            for (var j = 0u; j < c; j++) { out0[zb + j] = (in1[zb + j] - in0[zb + j]) * dot; }
        } else {
            if (q0 == 0u) {
                for (var j = 0u; j < c; j++) { out0[zb + j] = 0.0; }
            }
            for (var q = q0; q < q0 + kk; q++) {
                var dot = 0.0;
                for (var j = 0u; j < c; j++) {
                    dot = dot + mc_normal(params.sample_off + s, q, j) * in2[zb + j];
                }
                for (var j = 0u; j < c; j++) {
                    let eps = mc_normal(params.sample_off + s, q, j);
                    out0[zb + j] = out0[zb + j] + eps * dot * params.scale;
                }
            }
        }
        return;
    }

    let sm = softmax_shift(zb, c);
    // pᵀż, shared by every variant.
    var pdot = 0.0;
    for (var j = 0u; j < c; j++) { pdot = pdot + softmax_p(zb, j, sm) * in2[zb + j]; }

    if (params.variant == VARIANT_TRUE) {
        for (var j = 0u; j < c; j++) {
            let p = softmax_p(zb, j, sm);
            out0[zb + j] = p * (in2[zb + j] - pdot);
        }
    } else if (params.variant == VARIANT_EMPIRICAL) {
        // e = onehot(y) − p, eᵀż = ż_y − pᵀż.
        let y = bitcast<u32>(in1[s]);
        let dot = in2[zb + y] - pdot;
        for (var j = 0u; j < c; j++) {
            let p = softmax_p(zb, j, sm);
            out0[zb + j] = (select(0.0, 1.0, j == y) - p) * dot;
        }
    } else {
        if (q0 == 0u) {
            for (var j = 0u; j < c; j++) { out0[zb + j] = 0.0; }
        }
        for (var q = q0; q < q0 + kk; q++) {
            let y = mc_class(params.sample_off + s, q, zb, c, sm);
            let dot = in2[zb + y] - pdot;
            for (var j = 0u; j < c; j++) {
                let p = softmax_p(zb, j, sm);
                out0[zb + j] = out0[zb + j] + (select(0.0, 1.0, j == y) - p) * dot * params.scale;
            }
        }
    }
}

@compute @workgroup_size(WG, 1, 1)
fn backprop_act(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lidx: u32) {
    let e = linear_id(wg, nwg, lidx);
    if (e >= params.rows * params.r * params.cols) { return; }
    let q = e / params.cols;
    let j = e % params.cols;
    let z = in2[(q / params.r) * params.cols + j];
    out0[e] = (in0[e] - in1[e]) * derivative(params.act, z);
}

@compute @workgroup_size(WG, 1, 1)
fn sample_sq(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lidx: u32) {
    let e = linear_id(wg, nwg, lidx);
    if (e >= params.rows * params.cols) { return; }
    let s = e / params.cols;
    let j = e % params.cols;
    // Kahan-compensated: r is up to a whole chunk of MC draws (10⁵–10⁶ rows), where a plain
    // f32 sum would lose ~3 digits.
    var acc = 0.0;
    var comp = 0.0;
    for (var q = 0u; q < params.r; q++) {
        let d = in0[(s * params.r + q) * params.cols + j];
        let y = d * d - comp;
        let t = acc + y;
        comp = (t - acc) - y;
        acc = t;
    }
    out0[e] = acc;
}

@compute @workgroup_size(WG, 1, 1)
fn square(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lidx: u32) {
    let e = linear_id(wg, nwg, lidx);
    if (e >= params.rows * params.cols) { return; }
    let x = in0[e];
    out0[e] = x * x;
}

@compute @workgroup_size(WG, 1, 1)
fn outer_grads(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lidx: u32) {
    // rows = R-rows of the micro-batch, cols = parameters of this layer.
    let e = linear_id(wg, nwg, lidx);
    if (e >= params.rows * params.cols) { return; }
    let q = e / params.cols;
    let j = e % params.cols;
    let n_out = params.ld_a;          // δ row length (= out)
    let n_w = n_out * params.fan_in;  // weight count
    var v: f32;
    if (j < n_w) {
        let o = j / params.fan_in;
        let i = j % params.fan_in;
        // ã rows are per sample (row length ld_b); δ rows per R-row.
        v = in0[q * n_out + o] * in1[(q / params.r) * params.ld_b + i];
    } else {
        v = in0[q * n_out + (j - n_w)];
    }
    out0[q * params.ld_out + params.out_off + j] = v;
}
