// syrk.wgsl — blocked, compensated Cᵀ-products: the heart of F = GᵀG/N and K = GGᵀ/N.
//
// Computes, for one output block C (m × n, row-major, leading dimension n),
//
//     C[r, c] += Σ_{k < params.k} A(k, r) · B(k, c)
//     A(k, r) = a[a_off + k·a_ks + r·a_ms]        B(k, c) = b[b_off + k·b_ks + c·b_ns]
//
// With G a row-major chunk of samples (stride P): F-block = A = G[:, I], B = G[:, J]
// (a_ks = b_ks = P, a_ms = b_ns = 1); Gram block = A = G_I, B = G_J (a_ks = 1, a_ms = P).
//
// Bindings (group 0):
//   0 uniform  Params
//   1 storage  read        a      (f32)
//   2 storage  read        b      (f32; may be the same buffer as a)
//   3 storage  read_write  c_sum  (f32, m·n)  running sum S
//   4 storage  read_write  c_comp (f32, m·n)  Kahan compensation c (true value ≈ S − c)
//
// Tiling: each workgroup owns one TILE×TILE (64×64) output tile. `upper_only` (diagonal blocks
// of a symmetric result) enumerates only tiles with tile_col ≥ tile_row; the host mirrors.
// The tile index is linear over a 2-D dispatch (x fastest) so that > 65,535 tiles fit.
//
// Precision contract: products are accumulated in f32 registers over KB = 64 values of k,
// each KB-block sum is added to a per-register Kahan accumulator, and the tile's total is
// Kahan-added to (c_sum, c_comp) in global memory. The error therefore grows like
// u·(KB + O(1)) per entry instead of u·k, for any number of chunks (u = 2⁻²⁴).
//
// TILE, KT and KB mirror src/backend/gpu/consts.rs (checked by tests/shaders.rs); the
// workgroup sizes below are fixed by the register blocking, not by an override.
//
// Two entry points with the same bindings:
//   syrk_tiled  — 16×16 invocations, 4×4 register block each (vec4 rows), KT×64
//                 workgroup-memory tiles stored as vec4 (8 KiB), barriers: the default.
//   syrk_direct — 8×8 invocations, 4×4 register block each (a 32×32 output tile per
//                 workgroup, 4 workgroup ids per 64×64 tile), loads straight from global
//                 memory, no barriers. Kept as an alternative for adapters where barriers
//                 cost more than they save; on lavapipe with these strided scalar loads it
//                 measured slower than syrk_tiled (benches/README.md), so tiled is the default.

struct Params {
    k: u32,
    m: u32,
    n: u32,
    a_off: u32,
    a_ks: u32,
    a_ms: u32,
    b_off: u32,
    b_ks: u32,
    b_ns: u32,
    tiles_m: u32,
    tiles_n: u32,
    upper_only: u32,
    num_tiles: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> c_sum: array<f32>;
@group(0) @binding(4) var<storage, read_write> c_comp: array<f32>;

const TILE: u32 = 64u;
const KT: u32 = 16u;
const KB: u32 = 64u;

// Maps a linear tile index to (tile_row, tile_col); for upper_only, walks the rows of the
// upper triangle of a tiles_m × tiles_m grid (tiles_m ≤ a few hundred: the loop is short).
fn tile_coords(t: u32) -> vec2<u32> {
    if (params.upper_only == 0u) {
        return vec2<u32>(t / params.tiles_n, t % params.tiles_n);
    }
    var row = 0u;
    var rem = t;
    loop {
        let len = params.tiles_m - row;
        if (rem < len) { break; }
        rem = rem - len;
        row = row + 1u;
    }
    return vec2<u32>(row, row + rem);
}

fn load_a(kk: u32, r: u32) -> f32 {
    if (kk < params.k && r < params.m) {
        return a[params.a_off + kk * params.a_ks + r * params.a_ms];
    }
    return 0.0;
}

fn load_b(kk: u32, c: u32) -> f32 {
    if (kk < params.k && c < params.n) {
        return b[params.b_off + kk * params.b_ks + c * params.b_ns];
    }
    return 0.0;
}

// Kahan-adds `x` to the global accumulator at `idx`.
fn merge_global(idx: u32, x: f32) {
    let y = x - c_comp[idx];
    let s = c_sum[idx];
    let t = s + y;
    c_comp[idx] = (t - s) - y;
    c_sum[idx] = t;
}

// Tiles in workgroup memory as vec4 along the output dimension: [kk][r/4] and [kk][c/4].
// Each invocation then reads its 4 rows and 4 columns with two 16-byte loads per k (LDS.128 on
// GPUs; one access instead of four on CPU adapters, where each workgroup-memory access is
// serialized per invocation).
var<workgroup> a_tile: array<vec4<f32>, KT * TILE / 4u>;
var<workgroup> b_tile: array<vec4<f32>, KT * TILE / 4u>;

@compute @workgroup_size(16, 16, 1)
fn syrk_tiled(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) lidx: u32,
) {
    let t = wg.y * nwg.x + wg.x;
    // Uniform across the workgroup: the early return keeps barriers in uniform control flow.
    if (t >= params.num_tiles) { return; }
    let tc = tile_coords(t);
    let r0 = tc.x * TILE;
    let c0 = tc.y * TILE;

    // Invocation (x, y) owns rows r0 + 4y + i and columns c0 + 4x + j (i, j < 4): row i of
    // its block is acc[i] (a vec4 over j).
    var acc: array<vec4<f32>, 4>;
    var ksum: array<vec4<f32>, 4>;
    var kcomp: array<vec4<f32>, 4>;
    for (var i = 0u; i < 4u; i++) { acc[i] = vec4<f32>(0.0); ksum[i] = vec4<f32>(0.0); kcomp[i] = vec4<f32>(0.0); }

    var k0 = 0u;
    loop {
        if (k0 >= params.k) { break; }
        // Cooperative load: 1024 values per operand, 4 per invocation. Adjacent invocations
        // walk the operand's contiguous dimension (rows/columns for G chunks, k for
        // row-major activations), so that global reads coalesce either way.
        for (var q = 0u; q < 4u; q++) {
            let e = lidx + 256u * q;
            var kk = e / TILE;
            var rr = e % TILE;
            if (params.a_ks == 1u) { kk = e % KT; rr = e / KT; }
            a_tile[kk * 16u + rr / 4u][rr % 4u] = load_a(k0 + kk, r0 + rr);
            kk = e / TILE;
            rr = e % TILE;
            if (params.b_ks == 1u) { kk = e % KT; rr = e / KT; }
            b_tile[kk * 16u + rr / 4u][rr % 4u] = load_b(k0 + kk, c0 + rr);
        }
        workgroupBarrier();
        for (var kk = 0u; kk < KT; kk++) {
            let av = a_tile[kk * 16u + lid.y];
            let bv = b_tile[kk * 16u + lid.x];
            acc[0] = fma(vec4<f32>(av.x), bv, acc[0]);
            acc[1] = fma(vec4<f32>(av.y), bv, acc[1]);
            acc[2] = fma(vec4<f32>(av.z), bv, acc[2]);
            acc[3] = fma(vec4<f32>(av.w), bv, acc[3]);
        }
        workgroupBarrier();
        k0 = k0 + KT;
        // Fold the f32 block sum into the Kahan accumulator every KB values of k.
        if (k0 % KB == 0u || k0 >= params.k) {
            for (var i = 0u; i < 4u; i++) {
                let y = acc[i] - kcomp[i];
                let s = ksum[i] + y;
                kcomp[i] = (s - ksum[i]) - y;
                ksum[i] = s;
                acc[i] = vec4<f32>(0.0);
            }
        }
    }

    for (var i = 0u; i < 4u; i++) {
        let r = r0 + 4u * lid.y + i;
        if (r >= params.m) { continue; }
        let total = ksum[i] - kcomp[i];
        for (var j = 0u; j < 4u; j++) {
            let c = c0 + 4u * lid.x + j;
            if (c >= params.n) { continue; }
            merge_global(r * params.n + c, total[j]);
        }
    }
}

@compute @workgroup_size(8, 8, 1)
fn syrk_direct(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    // Four consecutive workgroup ids share one 64×64 tile (2×2 quadrants of 32×32), so the
    // tile enumeration (and upper_only) is identical to syrk_tiled. Within a quadrant an
    // invocation owns rows r0 + i (i < 4) and columns c0 + 8j (j < 4): CPU adapters run the
    // 8 invocations of a row as SIMD lanes, and this layout makes their B loads contiguous
    // across lanes (a vector load) instead of a stride-4 gather.
    let id = wg.y * nwg.x + wg.x;
    let t = id / 4u;
    if (t >= params.num_tiles) { return; }
    let quad = id % 4u;
    let tc = tile_coords(t);
    let r0 = tc.x * TILE + (quad / 2u) * 32u + lid.y * 4u;
    let c0 = tc.y * TILE + (quad % 2u) * 32u + lid.x;
    if (r0 >= params.m || c0 >= params.n) { return; }

    var acc: array<f32, 16>;
    var ksum: array<f32, 16>;
    var kcomp: array<f32, 16>;
    for (var i = 0u; i < 16u; i++) { acc[i] = 0.0; ksum[i] = 0.0; kcomp[i] = 0.0; }

    var kk = 0u;
    loop {
        if (kk >= params.k) { break; }
        var av: array<f32, 4>;
        var bv: array<f32, 4>;
        for (var i = 0u; i < 4u; i++) {
            av[i] = load_a(kk, r0 + i);
            bv[i] = load_b(kk, c0 + 8u * i);
        }
        for (var i = 0u; i < 4u; i++) {
            for (var j = 0u; j < 4u; j++) {
                acc[i * 4u + j] = fma(av[i], bv[j], acc[i * 4u + j]);
            }
        }
        kk = kk + 1u;
        if (kk % KB == 0u || kk >= params.k) {
            for (var i = 0u; i < 16u; i++) {
                let y = acc[i] - kcomp[i];
                let s = ksum[i] + y;
                kcomp[i] = (s - ksum[i]) - y;
                ksum[i] = s;
                acc[i] = 0.0;
            }
        }
    }

    for (var i = 0u; i < 4u; i++) {
        let r = r0 + i;
        if (r >= params.m) { continue; }
        for (var j = 0u; j < 4u; j++) {
            let c = c0 + 8u * j;
            if (c >= params.n) { continue; }
            merge_global(r * params.n + c, ksum[i * 4u + j] - kcomp[i * 4u + j]);
        }
    }
}
