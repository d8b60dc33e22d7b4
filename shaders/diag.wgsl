// diag.wgsl — compensated column sums of squares: diag(F)ⱼ·N = Σᵢ Gᵢⱼ².
//
// Bindings (group 0):
//   0 uniform  Params { rows, cols, ld, col_off }
//   1 storage  read        g      (f32, rows × ld, row-major chunk of samples)
//   2 storage  read_write  d_sum  (f32, cols)  running sum S
//   3 storage  read_write  d_comp (f32, cols)  Kahan compensation (true value ≈ S − c)
//
// One invocation per column (adjacent invocations read adjacent columns of a row: coalesced).
// Workgroup size: the override WG (default 256, set by the host per adapter); the column
// index is linear over a 2-D dispatch so > 65,535 groups fit. KB mirrors
// src/backend/gpu/consts.rs (checked by tests/shaders.rs).
// Precision contract: f32 sums over blocks of 64 rows, Kahan across blocks and across chunks.

struct Params {
    rows: u32,
    cols: u32,
    ld: u32,
    col_off: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> g: array<f32>;
@group(0) @binding(2) var<storage, read_write> d_sum: array<f32>;
@group(0) @binding(3) var<storage, read_write> d_comp: array<f32>;

// Rows summed in f32 before a Kahan fold (consts::KAHAN_BLOCK on the host).
const KB: u32 = 64u;
override WG: u32 = 256u;

@compute @workgroup_size(WG, 1, 1)
fn diag_accumulate(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lidx: u32,
) {
    let j = (wg.y * nwg.x + wg.x) * WG + lidx;
    if (j >= params.cols) { return; }
    var ksum = 0.0;
    var kcomp = 0.0;
    var r = 0u;
    loop {
        if (r >= params.rows) { break; }
        let end = min(r + KB, params.rows);
        var acc = 0.0;
        for (var i = r; i < end; i++) {
            let v = g[i * params.ld + params.col_off + j];
            acc = fma(v, v, acc);
        }
        let y = acc - kcomp;
        let s = ksum + y;
        kcomp = (s - ksum) - y;
        ksum = s;
        r = end;
    }
    let x = ksum - kcomp;
    let y = x - d_comp[j];
    let s = d_sum[j];
    let t = s + y;
    d_comp[j] = (t - s) - y;
    d_sum[j] = t;
}
