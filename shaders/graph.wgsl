// graph.wgsl — the primitive instructions of a lowered graph (src/graph/prim.rs) and the
// reductions the graph Fisher driver reads back (src/graph/gpu.rs).
//
// One bind-group layout serves every entry point (unused bindings are bound to a dummy buffer):
//
//   0 uniform  Params
//   1 storage  read        in0      (f32)  first operand
//   2 storage  read        in1      (f32)  second operand (sparse: the CSR weights)
//   3 storage  read        map_off  (u32)  CSR row starts (sparse, argmax, scatter_dyn)
//   4 storage  read        map_col  (u32)  CSR column indices
//   5 storage  read_write  out0     (f32)  destination
//
// Rows (prim.rs module docs): an instruction runs once per row of its destination (`rows`
// of them, `len` values each). An operand is read at the destination's row (MODE_SAME), at
// row 0 (MODE_SHARED) or at row ⌊row / R⌋ (MODE_DRAW: a Sample operand of a Draw
// destination); the modes of in0 and in1 sit in `flags` at A_MODE_SHIFT and B_MODE_SHIFT.
// `a_len` and `b_len` are the row lengths of in0 and in1. FLAG_ACC adds into out0.
//
// Entry points (one invocation per destination value unless stated):
//   g_sparse       out0 = M · in0 for the CSR M (map_off, map_col, in1 = weights when
//                  FLAG_WEIGHTS), one CSR row per invocation.
//   g_matmul       per group q < groups: Y_q (m×n) = op(A_q)·op(B_q), A in in0 (m×k, or k×m
//                  with FLAG_TA), B in in1 (k×n, or n×k with FLAG_TB); one invocation per 4×4
//                  block of Y (4 rows; 4 columns `code` apart, `code` invocations interleaved),
//                  barrier-free with register blocking (the fastest shape on CPU adapters,
//                  shared/NOTES.md). FLAG_FLAT_M (groups = 1, B shared) stacks the
//                  rows' Y along m, FLAG_FLAT_N (groups = 1, A shared) along n, so that
//                  y = W·x per sample (n = 1) still fills 4×4 blocks.
//   g_unary        out0 = f(in0), f by `code` (UnaryFn::code; parameters p0, p1).
//   g_binary       out0 (+)= in0 ∘ in1, ∘ by `code` (BIN_*).
//   g_argmax       out0_j = index of the largest in0 over CSR row j (first on ties), as f32.
//   g_gather       out0_j (+)= in0[in1_j].
//   g_scatter      out0_i (+)= Σ in0_j over the j of CSR row i with in1_j = i.
//   g_embed        out0[t·dim + d] = in0[tok_t·dim + d], tok_t = in1_t (vocab `code`); the host
//                  checks tokens before the run; an invalid one still yields NaN here, never
//                  an out-of-range read.
//   g_embed_back   one invocation per (row, d < dim): out0[tok_t·dim + d] += in0[t·dim + d]
//                  for t in order (the host clears out0 first unless accumulating); invalid
//                  tokens are skipped.
//   g_colsum       reduction: out0[off + b·len + j] = Σ g_rj (g² with FLAG_SQUARE) over the
//                  rows of block b (`dim` rows per block, `groups` blocks), one invocation
//                  per (j, b).
//   g_gram         reduction: out0[b·count·n + (i − off)·n + j] = Σ_{rows r of block b} Σ_s
//                  x_{r,s,i} x_{r,s,j} for the output rows off ≤ i < off + count (a panel) and
//                  every j < n, with x_{r,s,·} the `m` features at position s of the r-th row of
//                  in0 (k positions; stored m×k with FLAG_POS_LAST, else k×m), and x_{·,m} = 1
//                  (FLAG_BIAS, n = m + 1). One invocation per 4×4 block of a panel and block b.
//
// Workgroup size: the override WG (default 256; the host passes the value it chose for the
// adapter and divides its dispatches by the same value); the invocation index is linear over a
// 2-D dispatch, so more than 65,535 workgroups fit. Indices are u32: the host keeps every
// binding below 2³² bytes.
//
// Precision contract: f32 throughout, the same formulas as UnaryFn::eval (erf as in
// libm's erff, within 2e-7 of it); g_colsum and g_gram sum KB terms in f32 before folding them
// into a Kahan-compensated sum per block; the host adds the blocks in f64.
//
// The constants below mirror src/backend/gpu/consts.rs and prim.rs's UnaryFn::code (checked by
// tests/suite/shaders.rs).

struct Params {
    rows: u32,
    len: u32,
    r: u32,
    flags: u32,
    a_len: u32,
    b_len: u32,
    groups: u32,
    m: u32,
    k: u32,
    n: u32,
    code: u32,
    dim: u32,
    p0: f32,
    p1: f32,
    off: u32,
    count: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> in0: array<f32>;
@group(0) @binding(2) var<storage, read> in1: array<f32>;
@group(0) @binding(3) var<storage, read> map_off: array<u32>;
@group(0) @binding(4) var<storage, read> map_col: array<u32>;
@group(0) @binding(5) var<storage, read_write> out0: array<f32>;

override WG: u32 = 256u;

// Terms summed in plain f32 before a Kahan fold (g_colsum, g_gram).
const KB: u32 = 64u;

const FLAG_ACC: u32 = 1u;
const FLAG_TA: u32 = 2u;
const FLAG_TB: u32 = 4u;
const FLAG_WEIGHTS: u32 = 8u;
const FLAG_SQUARE: u32 = 16u;
const FLAG_BIAS: u32 = 32u;
const FLAG_POS_LAST: u32 = 64u;
const FLAG_FLAT_M: u32 = 128u;
const FLAG_FLAT_N: u32 = 256u;
const A_MODE_SHIFT: u32 = 10u;
const B_MODE_SHIFT: u32 = 12u;

const MODE_SAME: u32 = 0u;
const MODE_SHARED: u32 = 1u;
const MODE_DRAW: u32 = 2u;

const BIN_ADD: u32 = 0u;
const BIN_SUB: u32 = 1u;
const BIN_MUL: u32 = 2u;
const BIN_DIV: u32 = 3u;

// UnaryFn::code.
const UN_RELU: u32 = 0u;
const UN_LEAKY_RELU: u32 = 1u;
const UN_TANH: u32 = 2u;
const UN_SIGMOID: u32 = 3u;
const UN_GELU: u32 = 4u;
const UN_GELU_TANH: u32 = 5u;
const UN_ERF: u32 = 6u;
const UN_SOFTPLUS: u32 = 7u;
const UN_SQRT: u32 = 8u;
const UN_RSQRT: u32 = 9u;
const UN_RECIPROCAL: u32 = 10u;
const UN_EXP: u32 = 11u;
const UN_SQUARE: u32 = 12u;
const UN_AFFINE: u32 = 13u;
const UN_STEP: u32 = 14u;
const UN_LEAKY_STEP: u32 = 15u;
const UN_TANH_DERIV: u32 = 16u;
const UN_SIGMOID_DERIV: u32 = 17u;
const UN_GELU_DERIV: u32 = 18u;
const UN_GELU_TANH_DERIV: u32 = 19u;
const UN_ERF_DERIV: u32 = 20u;
const UN_SQRT_DERIV: u32 = 21u;
const UN_RSQRT_DERIV: u32 = 22u;
const UN_RECIPROCAL_DERIV: u32 = 23u;

fn linear_id(wg: vec3<u32>, nwg: vec3<u32>, lidx: u32) -> u32 {
    return (wg.y * nwg.x + wg.x) * WG + lidx;
}

fn has(flag: u32) -> bool {
    return (params.flags & flag) != 0u;
}

// The operand row read by destination row `row` under `mode`.
fn row_of(mode: u32, row: u32) -> u32 {
    switch mode {
        case MODE_SHARED: { return 0u; }
        case MODE_DRAW: { return row / params.r; }
        default: { return row; }
    }
}

fn a_row(row: u32) -> u32 {
    return row_of((params.flags >> A_MODE_SHIFT) & 3u, row) * params.a_len;
}

fn b_row(row: u32) -> u32 {
    return row_of((params.flags >> B_MODE_SHIFT) & 3u, row) * params.b_len;
}

fn put(e: u32, v: f32) {
    if (has(FLAG_ACC)) {
        out0[e] = out0[e] + v;
    } else {
        out0[e] = v;
    }
}

fn nan() -> f32 {
    // From a runtime value: a constant NaN is a shader-creation error in WGSL.
    return bitcast<f32>(0x7fc00000u | (params.flags & 0u));
}

// ---------------------------------------------------------------------------------------------
// Element-wise functions (UnaryFn::eval).

// erf as libm's erff (FreeBSD s_erff.c): rational approximations on [0, 0.84375),
// [0.84375, 1.25), [1.25, 1/0.35), [1/0.35, 6), and 1 beyond. The coefficients are the
// published ones, inline so that they are not module constants the host would have to mirror.
fn erfc_tail(ax: f32) -> f32 {
    // 1 − erf(|x|) for 1.25 ≤ |x| < 6.
    let s = 1.0 / (ax * ax);
    var r: f32;
    var big_s: f32;
    if (bitcast<u32>(ax) < 0x4036db6du) {  // |x| < 1/0.35, libm's bit threshold
        r = -9.8649440333e-03 + s * (-6.9385856390e-01 + s * (-1.0558626175e+01 + s * (-6.2375331879e+01
            + s * (-1.6239666748e+02 + s * (-1.8460508728e+02 + s * (-8.1287437439e+01 + s * -9.8143291473e+00))))));
        big_s = 1.0 + s * (1.9651271820e+01 + s * (1.3765776062e+02 + s * (4.3456588745e+02 + s * (6.4538726807e+02
            + s * (4.2900814819e+02 + s * (1.0863500214e+02 + s * (6.5702495575e+00 + s * -6.0424413532e-02)))))));
    } else {
        r = -9.8649431020e-03 + s * (-7.9928326607e-01 + s * (-1.7757955551e+01 + s * (-1.6063638306e+02
            + s * (-6.3756646729e+02 + s * (-1.0250950928e+03 + s * -4.8351919556e+02)))));
        big_s = 1.0 + s * (3.0338060379e+01 + s * (3.2579251099e+02 + s * (1.5367296143e+03 + s * (3.1998581543e+03
            + s * (2.5530502930e+03 + s * (4.7452853394e+02 + s * -2.2440952301e+01))))));
    }
    // z = |x| with its low 13 mantissa bits cleared, so that z² is exact and exp(−x²) is
    // formed as exp(−z²)·exp((z − x)(z + x)) without cancellation.
    let z = bitcast<f32>(bitcast<u32>(ax) & 0xffffe000u);
    return exp(-z * z - 0.5625) * exp((z - ax) * (z + ax) + r / big_s) / ax;
}

fn erf_libm(x: f32) -> f32 {
    let ax = abs(x);
    if (ax < 0.84375) {
        if (ax < 3.7252903e-09) {
            return 0.125 * (8.0 * x + 1.0270333290e+00 * x);
        }
        let z = x * x;
        let r = 1.2837916613e-01 + z * (-3.2504209876e-01 + z * (-2.8481749818e-02 + z * (-5.7702702470e-03
            + z * -2.3763017452e-05)));
        let s = 1.0 + z * (3.9791721106e-01 + z * (6.5022252500e-02 + z * (5.0813062117e-03 + z * (1.3249473704e-04
            + z * -3.9602282413e-06))));
        return x + x * (r / s);
    }
    var y: f32;
    if (ax < 1.25) {
        let s = ax - 1.0;
        let p = -2.3621185683e-03 + s * (4.1485610604e-01 + s * (-3.7220788002e-01 + s * (3.1834661961e-01
            + s * (-1.1089469492e-01 + s * (3.5478305072e-02 + s * -2.1663755178e-03)))));
        let q = 1.0 + s * (1.0642088205e-01 + s * (5.4039794207e-01 + s * (7.1828655899e-02 + s * (1.2617121637e-01
            + s * (1.3637083583e-02 + s * 1.1984500103e-02)))));
        // libm's 1 − erfc1(x), rounding for rounding.
        y = 1.0 - ((1.0 - 8.4506291151e-01) - p / q);
    } else if (ax < 6.0) {
        y = 1.0 - erfc_tail(ax);
    } else {
        y = 1.0;
    }
    return select(y, -y, x < 0.0);
}

fn tanh_safe(x: f32) -> f32 {
    // Some drivers evaluate tanh as (e²ˣ − 1)/(e²ˣ + 1), which is inf/inf = NaN for large x;
    // tanh(±15) already rounds to ±1 in f32.
    return tanh(clamp(x, -15.0, 15.0));
}

fn sigmoid(x: f32) -> f32 {
    // The two-sided form of prim.rs: no overflow of exp for either sign.
    if (x >= 0.0) {
        return 1.0 / (1.0 + exp(-x));
    }
    let e = exp(x);
    return e / (1.0 + e);
}

fn log1p(t: f32) -> f32 {
    // Goldberg's log1p: log(u)·t/(u − 1) with u = 1 + t rounded corrects the rounding of u.
    let u = 1.0 + t;
    if (u == 1.0) {
        return t;
    }
    return log(u) * t / (u - 1.0);
}

fn unary(code: u32, x: f32, a: f32, b: f32) -> f32 {
    switch code {
        case UN_RELU: { return max(x, 0.0); }
        case UN_LEAKY_RELU: { return select(a * x, x, x >= 0.0); }
        case UN_TANH: { return tanh_safe(x); }
        case UN_SIGMOID: { return sigmoid(x); }
        case UN_GELU: { return 0.5 * x * (1.0 + erf_libm(x * 0.70710678)); }
        case UN_GELU_TANH: {
            // √(2/π) and the cubic coefficient of prim.rs (inline: module constants are u32).
            return 0.5 * x * (1.0 + tanh_safe(0.7978846 * (x + 0.044715 * x * x * x)));
        }
        case UN_ERF: { return erf_libm(x); }
        case UN_SOFTPLUS: { return max(x, 0.0) + log1p(exp(-abs(x))); }
        case UN_SQRT: { return sqrt(x); }
        // 1/sqrt rather than inverseSqrt, whose precision is looser (and differs from the CPU).
        case UN_RSQRT: { return 1.0 / sqrt(x); }
        case UN_RECIPROCAL: { return 1.0 / x; }
        case UN_EXP: { return exp(x); }
        case UN_SQUARE: { return x * x; }
        case UN_AFFINE: { return a * x + b; }
        case UN_STEP: { return select(0.0, 1.0, x > 0.0); }
        case UN_LEAKY_STEP: { return select(a, 1.0, x > 0.0); }
        case UN_TANH_DERIV: { let t = tanh_safe(x); return 1.0 - t * t; }
        case UN_SIGMOID_DERIV: { let s = sigmoid(x); return s * (1.0 - s); }
        case UN_GELU_DERIV: {
            let cdf = 0.5 * (1.0 + erf_libm(x * 0.70710678));
            let pdf = exp(-0.5 * x * x) * 0.3989423;
            return cdf + x * pdf;
        }
        case UN_GELU_TANH_DERIV: {
            let u = 0.7978846 * (x + 0.044715 * x * x * x);
            let t = tanh_safe(u);
            let du = 0.7978846 * (1.0 + 3.0 * 0.044715 * x * x);
            return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du;
        }
        case UN_ERF_DERIV: { return 1.1283791670955126 * exp(-x * x); }
        case UN_SQRT_DERIV: { return 0.5 / sqrt(x); }
        case UN_RSQRT_DERIV: { return -0.5 / (x * sqrt(x)); }
        case UN_RECIPROCAL_DERIV: { return -1.0 / (x * x); }
        default: { return nan(); }
    }
}

// ---------------------------------------------------------------------------------------------
// Instructions.

@compute @workgroup_size(WG, 1, 1)
fn g_sparse(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lidx: u32) {
    let e = linear_id(wg, nwg, lidx);
    if (e >= params.rows * params.len) { return; }
    let row = e / params.len;
    let j = e - row * params.len;
    let src = a_row(row);
    var s = 0.0;
    if (has(FLAG_WEIGHTS)) {
        for (var t = map_off[j]; t < map_off[j + 1u]; t++) {
            s += in1[t] * in0[src + map_col[t]];
        }
    } else {
        for (var t = map_off[j]; t < map_off[j + 1u]; t++) {
            s += in0[src + map_col[t]];
        }
    }
    put(e, s);
}

@compute @workgroup_size(WG, 1, 1)
fn g_unary(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lidx: u32) {
    let e = linear_id(wg, nwg, lidx);
    if (e >= params.rows * params.len) { return; }
    let row = e / params.len;
    let j = e - row * params.len;
    out0[e] = unary(params.code, in0[a_row(row) + j], params.p0, params.p1);
}

@compute @workgroup_size(WG, 1, 1)
fn g_binary(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lidx: u32) {
    let e = linear_id(wg, nwg, lidx);
    if (e >= params.rows * params.len) { return; }
    let row = e / params.len;
    let j = e - row * params.len;
    let a = in0[a_row(row) + j];
    let b = in1[b_row(row) + j];
    var v: f32;
    switch params.code {
        case BIN_ADD: { v = a + b; }
        case BIN_SUB: { v = a - b; }
        case BIN_MUL: { v = a * b; }
        case BIN_DIV: { v = a / b; }
        default: { v = nan(); }
    }
    put(e, v);
}

@compute @workgroup_size(WG, 1, 1)
fn g_argmax(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lidx: u32) {
    let e = linear_id(wg, nwg, lidx);
    if (e >= params.rows * params.len) { return; }
    let row = e / params.len;
    let j = e - row * params.len;
    let src = a_row(row);
    let t0 = map_off[j];
    var best = map_col[t0];
    var best_v = in0[src + best];
    for (var t = t0 + 1u; t < map_off[j + 1u]; t++) {
        let c = map_col[t];
        let v = in0[src + c];
        // Strictly greater: the first index wins ties, as on the CPU.
        if (v > best_v) {
            best = c;
            best_v = v;
        }
    }
    out0[e] = f32(best);
}

@compute @workgroup_size(WG, 1, 1)
fn g_gather(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lidx: u32) {
    let e = linear_id(wg, nwg, lidx);
    if (e >= params.rows * params.len) { return; }
    let row = e / params.len;
    let j = e - row * params.len;
    let i = u32(in1[b_row(row) + j]);
    put(e, select(nan(), in0[a_row(row) + i], i < params.a_len));
}

@compute @workgroup_size(WG, 1, 1)
fn g_scatter(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lidx: u32) {
    let e = linear_id(wg, nwg, lidx);
    if (e >= params.rows * params.len) { return; }
    let row = e / params.len;
    let i = e - row * params.len;
    let src = a_row(row);
    let idx = b_row(row);
    var s = 0.0;
    for (var t = map_off[i]; t < map_off[i + 1u]; t++) {
        let j = map_col[t];
        if (u32(in1[idx + j]) == i) {
            s += in0[src + j];
        }
    }
    put(e, s);
}

// The table row of token value `v`, or `vocab` when it is not an integer in 0..vocab.
fn token(v: f32, vocab: u32) -> u32 {
    if (v >= 0.0 && v < f32(vocab) && fract(v) == 0.0) {
        return u32(v);
    }
    return vocab;
}

@compute @workgroup_size(WG, 1, 1)
fn g_embed(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lidx: u32) {
    let e = linear_id(wg, nwg, lidx);
    if (e >= params.rows * params.len) { return; }
    let row = e / params.len;
    let j = e - row * params.len;
    let t = j / params.dim;
    let d = j - t * params.dim;
    let v = token(in1[b_row(row) + t], params.code);
    out0[e] = select(nan(), in0[a_row(row) + v * params.dim + d], v < params.code);
}

@compute @workgroup_size(WG, 1, 1)
fn g_embed_back(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lidx: u32) {
    // One invocation owns column d of a destination row, so repeated tokens add in order
    // without atomics.
    let e = linear_id(wg, nwg, lidx);
    if (e >= params.rows * params.dim) { return; }
    let row = e / params.dim;
    let d = e - row * params.dim;
    let src = a_row(row);
    let tok = b_row(row);
    let dst = row * params.len + d;
    for (var t = 0u; t < params.b_len; t++) {
        let v = token(in1[tok + t], params.code);
        if (v < params.code) {
            out0[dst + v * params.dim] += in0[src + t * params.dim + d];
        }
    }
}

@compute @workgroup_size(WG, 1, 1)
fn g_matmul(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lidx: u32) {
    let m = params.m;
    let k = params.k;
    let n = params.n;
    let flat_m = has(FLAG_FLAT_M);
    let flat_n = has(FLAG_FLAT_N);
    // Extents of the two output axes (stacked over rows when flattened) and of the rest.
    let mm = select(m, params.rows * m, flat_m);
    let nn = select(n, params.rows * n, flat_n);
    let outer = select(params.rows * params.groups, 1u, flat_m || flat_n);
    // `lanes` (the `code` field) consecutive invocations share the 4 rows of a block and
    // interleave their columns (column j0 + lane + lanes·s): CPU adapters run consecutive
    // invocations as SIMD lanes, so A loads become broadcasts and row-major B loads
    // contiguous vector loads rather than gathers (the layout of syrk_direct).
    let lanes = max(params.code, 1u);
    let bm = (mm + 3u) / 4u;
    let bn = (nn + 4u * lanes - 1u) / (4u * lanes);
    let e = linear_id(wg, nwg, lidx);
    if (e >= outer * bm * bn * lanes) { return; }
    let lane = e % lanes;
    let blk = e / lanes;
    let bj = blk % bn;
    let rest = blk / bn;
    let bi = rest % bm;
    let o = rest / bm;
    let row0 = o / params.groups;
    let q = o - row0 * params.groups;
    let j0 = bj * 4u * lanes + lane;

    // The 4 positions along m: their destination rows, m-indices, and where A(i, 0) sits.
    // Positions past the edge are clamped to the last one (loaded, never stored).
    let gi = min(vec4<u32>(bi * 4u) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(mm - 1u));
    let gj = min(vec4<u32>(j0) + vec4<u32>(0u, 1u, 2u, 3u) * lanes, vec4<u32>(nn - 1u));
    var ri = vec4<u32>(row0);
    var ii = gi;
    if (flat_m) {
        ri = gi / m;
        ii = gi - ri * m;
    }
    var rj = vec4<u32>(row0);
    var jj = gj;
    if (flat_n) {
        rj = gj / n;
        jj = gj - rj * n;
    }
    let ta = has(FLAG_TA);
    let tb = has(FLAG_TB);
    let a_step = select(1u, m, ta);
    let b_step = select(n, 1u, tb);
    var ab = vec4<u32>(a_row(ri.x), a_row(ri.y), a_row(ri.z), a_row(ri.w)) + vec4<u32>(q * m * k)
        + select(ii * k, ii, ta);
    var bb = vec4<u32>(b_row(rj.x), b_row(rj.y), b_row(rj.z), b_row(rj.w)) + vec4<u32>(q * k * n)
        + select(jj, jj * k, tb);
    var c0 = vec4<f32>(0.0);
    var c1 = vec4<f32>(0.0);
    var c2 = vec4<f32>(0.0);
    var c3 = vec4<f32>(0.0);
    for (var kk = 0u; kk < k; kk++) {
        let a = vec4<f32>(in0[ab.x], in0[ab.y], in0[ab.z], in0[ab.w]);
        let b = vec4<f32>(in1[bb.x], in1[bb.y], in1[bb.z], in1[bb.w]);
        c0 = fma(vec4<f32>(a.x), b, c0);
        c1 = fma(vec4<f32>(a.y), b, c1);
        c2 = fma(vec4<f32>(a.z), b, c2);
        c3 = fma(vec4<f32>(a.w), b, c3);
        ab += vec4<u32>(a_step);
        bb += vec4<u32>(b_step);
    }
    var cs = array<vec4<f32>, 4>(c0, c1, c2, c3);
    for (var p = 0u; p < 4u; p++) {
        if (bi * 4u + p >= mm) { break; }
        for (var s = 0u; s < 4u; s++) {
            if (j0 + s * lanes >= nn) { break; }
            // The destination row is that of whichever axis carries the rows.
            let drow = select(select(row0, rj[s], flat_n), ri[p], flat_m);
            put(drow * params.len + q * m * n + ii[p] * n + jj[s], cs[p][s]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reductions.

@compute @workgroup_size(WG, 1, 1)
fn g_colsum(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lidx: u32) {
    // Adjacent invocations read adjacent columns of a row.
    let e = linear_id(wg, nwg, lidx);
    if (e >= params.len * params.groups) { return; }
    let b = e / params.len;
    let j = e - b * params.len;
    let square = has(FLAG_SQUARE);
    let first = b * params.dim;
    let last = min(first + params.dim, params.rows);
    var ksum = 0.0;
    var kcomp = 0.0;
    var r = first;
    loop {
        if (r >= last) { break; }
        let end = min(r + KB, last);
        var acc = 0.0;
        for (var i = r; i < end; i++) {
            let v = in0[i * params.len + j];
            acc += select(v, v * v, square);
        }
        let y = acc - kcomp;
        let s = ksum + y;
        kcomp = (s - ksum) - y;
        ksum = s;
        r = end;
    }
    out0[params.off + e] = ksum - kcomp;
}

// x_{row, s, i} of g_gram at the clamped feature index: 1 for the bias feature i = m.
fn gram_load(base: u32, i: vec4<u32>, s: u32) -> vec4<f32> {
    let m = params.m;
    let fi = min(i, vec4<u32>(max(m, 1u) - 1u));
    var at: vec4<u32>;
    if (has(FLAG_POS_LAST)) {
        at = vec4<u32>(base + s) + fi * params.k;
    } else {
        at = vec4<u32>(base + s * m) + fi;
    }
    let x = vec4<f32>(in0[at.x], in0[at.y], in0[at.z], in0[at.w]);
    return select(x, vec4<f32>(1.0), i >= vec4<u32>(m));
}

@compute @workgroup_size(WG, 1, 1)
fn g_gram(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lidx: u32) {
    let n = params.n;
    let bm = (params.count + 3u) / 4u;
    let bn = (n + 3u) / 4u;
    let e = linear_id(wg, nwg, lidx);
    if (e >= bm * bn * params.groups) { return; }
    let bj = e % bn;
    let rest = e / bn;
    let bi = rest % bm;
    let b = rest / bm;
    let lanes = vec4<u32>(0u, 1u, 2u, 3u);
    // Output rows (absolute feature indices) and columns, clamped to the last valid one.
    let gi = min(vec4<u32>(params.off + bi * 4u) + lanes, vec4<u32>(params.off + params.count - 1u));
    let gj = min(vec4<u32>(bj * 4u) + lanes, vec4<u32>(n - 1u));
    let row_len = params.m * params.k;
    let first = b * params.dim;
    let last = min(first + params.dim, params.rows);
    // f32 sums over at least KB terms (`code` rows at a time), folded into Kahan pairs.
    var s0 = vec4<f32>(0.0);
    var s1 = vec4<f32>(0.0);
    var s2 = vec4<f32>(0.0);
    var s3 = vec4<f32>(0.0);
    var k0 = vec4<f32>(0.0);
    var k1 = vec4<f32>(0.0);
    var k2 = vec4<f32>(0.0);
    var k3 = vec4<f32>(0.0);
    var r = first;
    loop {
        if (r >= last) { break; }
        let end = min(r + max(params.code, 1u), last);
        var c0 = vec4<f32>(0.0);
        var c1 = vec4<f32>(0.0);
        var c2 = vec4<f32>(0.0);
        var c3 = vec4<f32>(0.0);
        for (var row = r; row < end; row++) {
            let base = row * row_len;
            for (var s = 0u; s < params.k; s++) {
                let a = gram_load(base, gi, s);
                let x = gram_load(base, gj, s);
                c0 = fma(vec4<f32>(a.x), x, c0);
                c1 = fma(vec4<f32>(a.y), x, c1);
                c2 = fma(vec4<f32>(a.z), x, c2);
                c3 = fma(vec4<f32>(a.w), x, c3);
            }
        }
        var y = c0 - k0;
        var t = s0 + y;
        k0 = (t - s0) - y;
        s0 = t;
        y = c1 - k1;
        t = s1 + y;
        k1 = (t - s1) - y;
        s1 = t;
        y = c2 - k2;
        t = s2 + y;
        k2 = (t - s2) - y;
        s2 = t;
        y = c3 - k3;
        t = s3 + y;
        k3 = (t - s3) - y;
        s3 = t;
        r = end;
    }
    var cs = array<vec4<f32>, 4>(s0 - k0, s1 - k1, s2 - k2, s3 - k3);
    let out_base = b * params.count * n;
    for (var p = 0u; p < 4u; p++) {
        if (bi * 4u + p >= params.count) { break; }
        for (var q = 0u; q < 4u; q++) {
            if (bj * 4u + q >= n) { break; }
            out0[out_base + (bi * 4u + p) * n + gj[q]] = cs[p][q];
        }
    }
}
