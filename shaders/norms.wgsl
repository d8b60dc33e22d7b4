// norms.wgsl — per-sample squared gradient norms ‖gᵢ‖² = Σⱼ Gᵢⱼ².
//
// Bindings (group 0):
//   0 uniform  Params { rows, cols, ld, out_off }
//   1 storage  read        g      (f32, rows × ld, row-major chunk of samples)
//   2 storage  read_write  norms  (f32, ≥ out_off + rows)
//
// One workgroup of WG invocations per row (override WG, default 256, set by the host per
// adapter; a power of two), the row index linear over a 2-D dispatch. Each invocation sums a
// strided slice of the row in f32; the WG partials are combined by a pairwise tree in
// workgroup memory, so the error grows like u·(P/WG + log₂ WG).

struct Params {
    rows: u32,
    cols: u32,
    ld: u32,
    out_off: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> g: array<f32>;
@group(0) @binding(2) var<storage, read_write> norms: array<f32>;

override WG: u32 = 256u;
var<workgroup> partial: array<f32, WG>;

@compute @workgroup_size(WG, 1, 1)
fn row_norms(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lidx: u32,
) {
    let row = wg.y * nwg.x + wg.x;
    // Uniform per workgroup, so returning keeps the barriers below in uniform control flow.
    if (row >= params.rows) { return; }
    var acc = 0.0;
    for (var j = lidx; j < params.cols; j += WG) {
        let v = g[row * params.ld + j];
        acc = fma(v, v, acc);
    }
    partial[lidx] = acc;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (lidx < stride) {
            partial[lidx] = partial[lidx] + partial[lidx + stride];
        }
        workgroupBarrier();
    }
    if (lidx == 0u) {
        norms[params.out_off + row] = partial[0];
    }
}
