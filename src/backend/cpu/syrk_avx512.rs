//! The upper triangle of AᵀA with an AVX-512 micro-kernel of its own, for
//! [`SymmetricSum`](super::syrk::SymmetricSum) on CPUs that have AVX-512F; and, on the same
//! tiles, the network diag's (Σ_R δ²)ᵀ(ã∘ã) with the squares taken while packing
//! ([`gemm_tn`]: W3's empirical diag 5–7 % faster than `gemm` over squared copies).
//!
//! `gemm` computes a triangle as panels (see the [`syrk`](super::syrk) module docs): each
//! panel's diagonal block in full (12.5 % more multiply-adds than the triangle at M = 2048)
//! and its right-hand side packed again for every panel. Here A is packed once per depth
//! block and only the tiles that touch the upper triangle are computed:
//!
//! * **Packing.** For each depth block [k₀, k₀ + KC) the columns r₀ .. M of A are copied into
//!   panels of [`NR`] = 48 columns, KC rows of 48 contiguous values each (zero past M).
//!   The same panels feed both sides of the product: a tile's [`MR`] = 8 rows i₀ .. i₀ + 8
//!   are 8 consecutive values of a panel's rows (8 divides 48).
//! * **Micro-kernel.** An 8 × 48 tile of C, 24 zmm accumulators: for each depth step, three
//!   vector loads of the column panel and eight broadcasts of the row values, 24 FMAs. On
//!   the diagonal, and in a last panel narrower than 48, the tile keeps only the vectors of
//!   16 columns that reach the triangle (8 × 32 or 8 × 16): the full tiles cost 15 % more
//!   multiply-adds than the triangle at M = 512, 4 % at 2048 (W3's KFAC −3 %, W1 −2.5 %).
//! * **Order.** Blocks of [`BLOCK_PANELS`] column panels (288 columns, KC = 768: 864 KiB,
//!   kept in L2) run in parallel, the widest first; inside one, the row tiles i₀ < the
//!   block's end in order, each over the block's panels right of i₀ − 48. A row tile's 8
//!   values per depth step are copied into a strip of their own once per depth block (24
//!   KiB, kept in L1): read in place, every step touched a new cache line of its panel for
//!   32 useful bytes (W1 66–68 ms); copied per column block, 58–62 ms; once, 55–57 ms.
//! * **Memory.** The packed columns take (M − r₀) · KC · 4 bytes, at most [`PACKED_BYTES`]
//!   (KC shrinks for wider sums), and shared row strips (r₁ − r₀) · KC · 4 more.
//! * **Sums.** Each entry is Σ over depth blocks (in order) of an FMA chain over the block
//!   (in order), added to `pending`: the same for a band as for the whole sum, whatever the
//!   tiling, so a band is bitwise the whole sum's rows. Entries left of the diagonal inside
//!   a diagonal tile are written too (they lie in their row's buffer, and nothing reads them).

use std::arch::x86_64::{
    __m512, __mmask16, _mm512_add_ps, _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_mask_loadu_ps, _mm512_mask_storeu_ps,
    _mm512_set1_ps, _mm512_setzero_ps,
};

use std::mem::MaybeUninit;

use ndarray::ArrayView2;
use rayon::prelude::*;

/// Rows of a tile (broadcast values).
pub(super) const MR: usize = 8;
/// Columns of a tile (three vectors of 16).
pub(super) const NR: usize = 48;
/// f32 values per zmm vector.
const LANES: usize = 16;
/// Depth of a block: a column panel is 48 · 768 · 4 = 144 KiB, a row tile's strip 24 KiB (in
/// L1). At M = 2048, K = 4096 (W1, 2-core Xeon, best of 9, two runs each, with
/// [`BLOCK_PANELS`] = 6): KC 640 → 60–62 ms, 768 → 60–61, 1024 → 62–67; 512 and 2048 were
/// slower at every block width tried.
const KC: usize = 768;
/// Most bytes of packed columns: as many as the whole sum's f32 buffer (M² · 4), between
/// [`MIN_PACKED_BYTES`] and 8 MiB (the full KC for a 2048-wide sum, whose buffer is 16 MB);
/// the depth block shrinks to stay within it, to no less than [`MIN_KC`]. The network path
/// takes it out of a micro-batch's scratch (`network::batch_cost`), so that the memory
/// plans of `FISHER_CPU_MEMORY_MB` hold.
const PACKED_BYTES: usize = 8 << 20;
/// Least bytes of packed columns a sum may take: 2 MiB, which keeps KFAC's 513- and
/// 785-wide factors at one depth block per micro-batch of ≤ 755 samples.
const MIN_PACKED_BYTES: usize = 2 << 20;
/// Least depth of a block.
const MIN_KC: usize = 64;
/// Column panels per parallel task: 288 columns, 864 KiB of packed A at KC = 768, which stay
/// in L2 (2 MiB per core on the development Xeon) while the row tiles above the block's end
/// stream past them. With KC = 768 (W1, as above): 4 → 65 ms, 6 → 60–61 ms; with KC = 1024:
/// 2 → 67, 3 → 65–66, 4 → 63–68, 6 → 61–66, 8 → 72–73.
const BLOCK_PANELS: usize = 6;

/// Whether this CPU runs the kernel (checked once by std, then cached).
pub(super) fn available() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

/// The depth of a block for a sum of side `m`: a function of `m` alone, so that every band
/// of the sum sums its entries in the same depth blocks as the whole (and so bitwise alike).
fn depth_block(m: usize) -> usize {
    let packed_bytes = m.saturating_mul(m).saturating_mul(4).clamp(MIN_PACKED_BYTES, PACKED_BYTES);
    (packed_bytes / (4 * m.div_ceil(NR).max(1) * NR)).clamp(MIN_KC, KC)
}

/// The most scratch [`syrk_upper`] allocates for the band `rows` of a sum of side `m` (its
/// packed columns, and its row strips where they are shared), bytes: what the callers count
/// in their memory plan.
pub(super) fn scratch_bytes(m: usize, rows: std::ops::Range<usize>) -> u64 {
    let width = m - rows.start.min(m);
    let strips = if shared_strips(m, rows.start) { rows.len().div_ceil(MR) * MR } else { 0 };
    ((width.div_ceil(NR) * NR + strips) * depth_block(m) * 4) as u64
}

/// Column blocks from which the row strips are copied once per depth block for all of
/// them rather than by each block's task: a row tile is then copied once instead of once
/// per block right of it (W1: 58–62 → 55–57 ms); below it (KFAC's 513- and 785-wide
/// factors: 2–3 blocks) the shared copy cost more, through the memory it takes from the
/// micro-batch, than it saved.
const SHARED_STRIPS_FROM_BLOCKS: usize = 4;

/// Whether a band from row `r0` of a sum of side `m` shares its row strips.
fn shared_strips(m: usize, r0: usize) -> bool {
    (m - r0.min(m)).div_ceil(NR).div_ceil(BLOCK_PANELS) >= SHARED_STRIPS_FROM_BLOCKS
}

/// Packed columns, 64-byte aligned (a panel's rows start on cache lines), not zeroed: each
/// depth block writes every value it then reads ([`pack`], the strips), so that a memset of
/// up to 8 MiB per call is saved (1.5 % of W3's KFAC, which makes ~70 calls).
pub(super) struct Packed {
    buf: Vec<MaybeUninit<__m512>>,
}

impl Packed {
    pub(super) fn new(floats: usize) -> Self {
        let vectors = floats.div_ceil(16);
        let mut buf = Vec::with_capacity(vectors);
        // SAFETY: MaybeUninit values need no initialisation.
        unsafe { buf.set_len(vectors) };
        Packed { buf }
    }
    /// The first `floats` values, to be written.
    pub(super) fn as_uninit(&mut self, floats: usize) -> &mut [MaybeUninit<f32>] {
        assert!(floats <= self.buf.len() * 16, "packed buffer too small");
        // SAFETY: the buffer holds ≥ floats f32 slots (16 per __m512), properly aligned.
        unsafe { std::slice::from_raw_parts_mut(self.buf.as_mut_ptr().cast::<MaybeUninit<f32>>(), floats) }
    }
}

/// `values` once every one of them has been written.
///
/// # Safety
/// Every element of `values` is initialised.
pub(super) unsafe fn assume_written(values: &[MaybeUninit<f32>]) -> &[f32] {
    // SAFETY: MaybeUninit<f32> has f32's layout, and the caller vouches for the values.
    unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<f32>(), values.len()) }
}

/// `pending[(i − r₀)·stride + j − r₀]` (+)= Σₖ a[k, i]·a[k, j] for i ∈ `rows` (a band
/// [r₀, r₁) of the M = a.ncols() rows), j ∈ [i, M); it adds when `accumulate`, else it
/// overwrites. `a` has positive strides. Callers check [`available`] first.
pub(super) fn syrk_upper(a: ArrayView2<'_, f32>, rows: std::ops::Range<usize>, stride: usize, pending: &mut [f32], accumulate: bool) {
    assert!(available(), "syrk_upper needs AVX-512F");
    let (k, m) = a.dim();
    let (r0, r1) = (rows.start, rows.end);
    assert!(r0 <= r1 && r1 <= m && stride == m - r0 && pending.len() >= (r1 - r0) * stride, "syrk_upper shapes");
    if k == 0 || r0 == r1 {
        return;
    }
    let panels = (m - r0).div_ceil(NR);
    let tiles = (r1 - r0).div_ceil(MR);
    let kc_max = depth_block(m).min(k);
    let shared = shared_strips(m, r0);
    let mut packed = Packed::new(panels * NR * kc_max);
    let mut strips = Packed::new(if shared { tiles * MR * kc_max } else { 0 });
    // The tasks write disjoint column ranges of the rows.
    let dst = super::DisjointWrites(pending.as_mut_ptr());
    // Column blocks, the widest (rightmost: most row tiles above them) first.
    let blocks: Vec<usize> = (0..panels.div_ceil(BLOCK_PANELS)).rev().collect();
    for k0 in (0..k).step_by(kc_max) {
        let kc = kc_max.min(k - k0);
        let buf = packed.as_uninit(panels * NR * kc);
        pack(a, k0, kc, r0, buf);
        // SAFETY: `pack` wrote all panels · NR · kc values.
        let buf: &[f32] = unsafe { assume_written(buf) };
        // Each row tile's 8 values of every depth step, copied out of their panel into a
        // strip of their own (24 KiB at KC = 768), so that a strip stays in L1 while the
        // block's panels stream from L2 past it.
        // (Once per depth block for sums of many column blocks; otherwise each block's task
        // copies the strips it needs, which is cheaper than the shared copy's memory.)
        // It writes every value of a strip of MR · kc.
        let strip_of = |q: usize, strip: &mut [MaybeUninit<f32>]| {
            let (ip, ioff) = ((q * MR) / NR, (q * MR) % NR);
            let panel = &buf[ip * NR * kc..(ip + 1) * NR * kc];
            for (out, step) in strip.chunks_exact_mut(MR).zip(panel.chunks_exact(NR)) {
                for (o, &v) in out.iter_mut().zip(&step[ioff..ioff + MR]) {
                    o.write(v);
                }
            }
        };
        let strips = strips.as_uninit(if shared { tiles * MR * kc } else { 0 });
        if shared {
            strips.par_chunks_mut(MR * kc).enumerate().for_each(|(q, strip)| strip_of(q, strip));
        }
        // SAFETY: every strip was written just above (none when they are not shared).
        let strips: &[f32] = unsafe { assume_written(strips) };
        let add = accumulate || k0 > 0;
        blocks.par_iter().with_max_len(1).for_each(|&b| {
            let mut own = Packed::new(if shared { 0 } else { MR * kc });
            let p_lo = b * BLOCK_PANELS;
            let p_hi = (p_lo + BLOCK_PANELS).min(panels);
            let block_end = (r0 + p_hi * NR).min(m);
            // Row tiles from r₀ up to the block's end (and the band's).
            for i0 in (r0..r1.min(block_end)).step_by(MR) {
                let tile_rows = MR.min(r1 - i0);
                let q = (i0 - r0) / MR;
                let strip: &[f32] = match shared {
                    true => &strips[q * MR * kc..(q + 1) * MR * kc],
                    false => {
                        let own = own.as_uninit(MR * kc);
                        strip_of(q, own);
                        // SAFETY: `strip_of` wrote the whole strip.
                        unsafe { assume_written(own) }
                    }
                };
                // Panels of the block whose last column is ≥ i0.
                let first = ((i0 - r0) / NR).max(p_lo);
                for p in first..p_hi {
                    let j0 = r0 + p * NR;
                    let cols = NR.min(m - j0);
                    // The panel's vectors of 16 columns from the first that reaches column
                    // i0 (those wholly left of it lie below every row's diagonal) to the
                    // last that holds a column < M: at M = 512 (KFAC's factors) the full
                    // 48-wide tiles did 15 % more multiply-adds than the triangle needs.
                    let skip = i0.saturating_sub(j0) / LANES;
                    let (v0, v1) = (skip, cols.div_ceil(LANES));
                    let cols_at = &buf[p * NR * kc + v0 * LANES..(p + 1) * NR * kc];
                    // SAFETY: AVX-512F checked above; strip holds kc rows of MR values,
                    // cols_at kc rows of NR from vector v0 (the last row's 16·(3 − v0)
                    // values end the panel); the tile's rows i0 .. i0 + tile_rows < r₁ and
                    // columns j0 + 16·v0 .. j0 + cols ≤ M lie in `pending` at
                    // (i − r₀)·stride + j − r₀, and only this task writes columns
                    // j0 .. j0 + cols (its block's).
                    unsafe {
                        let out = dst.get().add((i0 - r0) * stride + (j0 + v0 * LANES - r0));
                        let ncols = cols - v0 * LANES;
                        match v1 - v0 {
                            3 => tile::<3>(kc, strip.as_ptr(), cols_at.as_ptr(), out, stride, tile_rows, ncols, add),
                            2 => tile::<2>(kc, strip.as_ptr(), cols_at.as_ptr(), out, stride, tile_rows, ncols, add),
                            _ => tile::<1>(kc, strip.as_ptr(), cols_at.as_ptr(), out, stride, tile_rows, ncols, add),
                        }
                    }
                }
            }
        });
    }
}

/// Copies a[k0 .. k0 + kc, r₀ .. M] into panels of NR columns: panel p, depth t, column c at
/// `buf[p·NR·kc + t·NR + c]`, zero past M. Panels in parallel.
fn pack(a: ArrayView2<'_, f32>, k0: usize, kc: usize, r0: usize, buf: &mut [MaybeUninit<f32>]) {
    pack_panels(a, k0, kc, r0, false, buf)
}

/// [`pack`], with each value squared where `square`.
fn pack_panels(a: ArrayView2<'_, f32>, k0: usize, kc: usize, r0: usize, square: bool, buf: &mut [MaybeUninit<f32>]) {
    let m = a.ncols();
    buf[..m.saturating_sub(r0).div_ceil(NR) * NR * kc].par_chunks_mut(NR * kc).enumerate().for_each(|(p, panel)| {
        let j0 = r0 + p * NR;
        let cols = NR.min(m - j0);
        for (t, out) in panel.chunks_exact_mut(NR).enumerate() {
            let row = a.row(k0 + t);
            let (values, pad) = out.split_at_mut(cols);
            match (row.as_slice(), square) {
                (Some(row), false) => values.iter_mut().zip(&row[j0..j0 + cols]).for_each(|(o, &v)| {
                    o.write(v);
                }),
                (Some(row), true) => values.iter_mut().zip(&row[j0..j0 + cols]).for_each(|(o, &v)| {
                    o.write(v * v);
                }),
                (None, _) => values.iter_mut().enumerate().for_each(|(c, o)| {
                    let v = row[j0 + c];
                    o.write(if square { v * v } else { v });
                }),
            }
            pad.iter_mut().for_each(|o| {
                o.write(0.0);
            });
        }
    });
}

/// `out[(i − r₀)·ld + j]` (+)= Σₖ f(l[k, i])·g(r[k, j]) for i ∈ `rows` = [r₀, r₁) (columns of
/// `left`, K × M₁) and j < M₂ (columns of `right`, K × M₂), where f squares when `square_left`
/// and g when `square_right` (else identity); it adds when `accumulate`, else overwrites.
/// Callers check [`available`] first.
///
/// The diag sums' (Σ_R δ²)ᵀ(ã∘ã) with the squares taken while packing, so that neither square
/// is a matrix of its own and `gemm` does not pack them again: the same 8 × 48 tiles as the
/// symmetric sums, over every tile. A depth block is the whole of K up to [`KC`], so each
/// entry is one FMA chain per block whatever `rows` is: bands equal the whole sum bitwise.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm_tn(left: ArrayView2<'_, f32>, square_left: bool, right: ArrayView2<'_, f32>, square_right: bool, rows: std::ops::Range<usize>, out: &mut [f32], ld: usize, accumulate: bool) {
    assert!(available(), "gemm_tn needs AVX-512F");
    let (k, m1) = left.dim();
    let (k2, m2) = right.dim();
    let (r0, r1) = (rows.start, rows.end);
    assert!(k == k2 && r0 <= r1 && r1 <= m1 && ld >= m2, "gemm_tn shapes");
    if r0 == r1 || m2 == 0 {
        return;
    }
    assert!(out.len() >= (r1 - r0 - 1) * ld + m2, "gemm_tn output");
    if k == 0 {
        if !accumulate {
            out.chunks_mut(ld).take(r1 - r0).for_each(|row| row[..m2].fill(0.0));
        }
        return;
    }
    let panels = m2.div_ceil(NR);
    let tiles = (r1 - r0).div_ceil(MR);
    let kc_max = KC.min(k);
    let mut packed = Packed::new(panels * NR * kc_max);
    let mut strips = Packed::new(tiles * MR * kc_max);
    let dst = super::DisjointWrites(out.as_mut_ptr());
    // Tasks: blocks of BLOCK_PANELS panels (in L2) × groups of GROUP_TILES row tiles, enough
    // for two lanes of two cores at the diag's 512 × 785 and 512 × 513.
    const GROUP_TILES: usize = 16;
    let (blocks, groups) = (panels.div_ceil(BLOCK_PANELS), tiles.div_ceil(GROUP_TILES));
    for k0 in (0..k).step_by(kc_max) {
        let kc = kc_max.min(k - k0);
        let buf = packed.as_uninit(panels * NR * kc);
        pack_panels(right, k0, kc, 0, square_right, buf);
        // SAFETY: `pack_panels` wrote all panels · NR · kc values.
        let buf: &[f32] = unsafe { assume_written(buf) };
        let strip_buf = strips.as_uninit(tiles * MR * kc);
        pack_strips(left, k0, kc, r0..r1, square_left, strip_buf);
        // SAFETY: `pack_strips` wrote all tiles · MR · kc values.
        let strip_buf: &[f32] = unsafe { assume_written(strip_buf) };
        let add = accumulate || k0 > 0;
        (0..blocks * groups).into_par_iter().with_max_len(1).for_each(|task| {
            let (b, g) = (task / groups, task % groups);
            let (p_lo, p_hi) = (b * BLOCK_PANELS, ((b + 1) * BLOCK_PANELS).min(panels));
            for q in g * GROUP_TILES..((g + 1) * GROUP_TILES).min(tiles) {
                let i0 = r0 + q * MR;
                let tile_rows = MR.min(r1 - i0);
                let strip = &strip_buf[q * MR * kc..(q + 1) * MR * kc];
                for p in p_lo..p_hi {
                    let j0 = p * NR;
                    let cols = NR.min(m2 - j0);
                    let cols_at = &buf[p * NR * kc..(p + 1) * NR * kc];
                    // SAFETY: AVX-512F checked above; strip holds kc rows of MR values,
                    // cols_at kc rows of NR; the tile's rows i0 .. i0 + tile_rows < r₁ and
                    // columns j0 .. j0 + cols ≤ M₂ lie in `out` at (i − r₀)·ld + j (checked
                    // above), and only this task writes them (its block's columns of its
                    // group's rows).
                    unsafe {
                        let at = dst.get().add((i0 - r0) * ld + j0);
                        match cols.div_ceil(LANES) {
                            3 => tile::<3>(kc, strip.as_ptr(), cols_at.as_ptr(), at, ld, tile_rows, cols, add),
                            2 => tile::<2>(kc, strip.as_ptr(), cols_at.as_ptr(), at, ld, tile_rows, cols, add),
                            _ => tile::<1>(kc, strip.as_ptr(), cols_at.as_ptr(), at, ld, tile_rows, cols, add),
                        }
                    }
                }
            }
        });
    }
}

/// The most scratch [`gemm_tn`] allocates for `rows` output rows of `cols` columns, bytes:
/// the packed panels of the right side and the strips of the left, at the deepest block.
pub(super) fn gemm_tn_scratch_bytes(rows: usize, cols: usize) -> u64 {
    ((cols.div_ceil(NR) * NR + rows.div_ceil(MR) * MR) * KC * 4) as u64
}

/// Copies the columns `rows` = [r₀, r₁) of a[k0 .. k0 + kc, ..] into strips of MR: strip q,
/// depth t, value i at `buf[q·MR·kc + t·MR + i]` (column r₀ + q·MR + i, squared where
/// `square`; zero past r₁). Strips in parallel.
fn pack_strips(a: ArrayView2<'_, f32>, k0: usize, kc: usize, rows: std::ops::Range<usize>, square: bool, buf: &mut [MaybeUninit<f32>]) {
    let (r0, r1) = (rows.start, rows.end);
    // Two strips per task: their 16 values of a row of `a` are one cache line (read once,
    // rather than once by each strip's task).
    buf[..(r1 - r0).div_ceil(MR) * MR * kc].par_chunks_mut(2 * MR * kc).enumerate().for_each(|(pair, strips)| {
        let i0 = r0 + pair * 2 * MR;
        let len = (2 * MR).min(r1 - i0);
        let (first, second) = strips.split_at_mut((MR * kc).min(strips.len()));
        for t in 0..kc {
            let row = a.row(k0 + t);
            let mut values = [0f32; 2 * MR];
            match row.as_slice() {
                Some(row) => values[..len].copy_from_slice(&row[i0..i0 + len]),
                None => values[..len].iter_mut().enumerate().for_each(|(i, v)| *v = row[i0 + i]),
            }
            if square {
                values.iter_mut().for_each(|v| *v *= *v);
            }
            for (o, &v) in first[t * MR..(t + 1) * MR].iter_mut().zip(&values[..MR]) {
                o.write(v);
            }
            if !second.is_empty() {
                for (o, &v) in second[t * MR..(t + 1) * MR].iter_mut().zip(&values[MR..]) {
                    o.write(v);
                }
            }
        }
    });
}

/// An 8 × 16·V tile (V ≤ 3 vectors of a 48-wide panel): C[r, c] (+)= Σ_t rows[t·MR + r] ·
/// cols[t·NR + c] for r < `nrows`, c < `ncols` ≤ 16·V, C[r, c] at `dst` + r·ld + c.
///
/// # Safety
/// AVX-512F; `rows` readable for kc·MR values, `cols` at t·NR + c for t < kc, c < 16·V;
/// `dst` writable at r·ld + c for r < nrows, c < ncols.
#[target_feature(enable = "avx512f")]
unsafe fn tile<const V: usize>(kc: usize, rows: *const f32, cols: *const f32, dst: *mut f32, ld: usize, nrows: usize, ncols: usize, add: bool) {
    let mut c: [[__m512; V]; MR] = [[_mm512_setzero_ps(); V]; MR];
    for t in 0..kc {
        let b = cols.add(t * NR);
        let bv: [__m512; V] = std::array::from_fn(|v| _mm512_loadu_ps(b.add(LANES * v)));
        let a = rows.add(t * MR);
        for (r, acc) in c.iter_mut().enumerate() {
            let x = _mm512_set1_ps(*a.add(r));
            for v in 0..V {
                acc[v] = _mm512_fmadd_ps(x, bv[v], acc[v]);
            }
        }
    }
    let masks: [__mmask16; V] = std::array::from_fn(|v| {
        let n = ncols.saturating_sub(LANES * v).min(LANES);
        if n == LANES { 0xFFFF } else { ((1u32 << n) - 1) as __mmask16 }
    });
    for (r, acc) in c.iter().enumerate().take(nrows) {
        let out = dst.add(r * ld);
        for v in 0..V {
            if masks[v] == 0 {
                continue;
            }
            let at = out.add(LANES * v);
            let value = if add { _mm512_add_ps(_mm512_mask_loadu_ps(_mm512_setzero_ps(), masks[v], at), acc[v]) } else { acc[v] };
            _mm512_mask_storeu_ps(at, masks[v], value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{s, Array2};

    /// Σₖ f(l[k, i])·g(r[k, j]) in f64, and the bound on an f32 FMA chain's error over it:
    /// 4·√K·u·Σₖ |f(l[k, i])·g(r[k, j])| (u = 2⁻²⁴; a random walk of K roundings, with room).
    fn reference(l: ArrayView2<'_, f32>, sl: bool, r: ArrayView2<'_, f32>, sr: bool) -> (Array2<f64>, Array2<f64>) {
        let f = |v: f32, sq: bool| if sq { f64::from(v) * f64::from(v) } else { f64::from(v) };
        let k = l.nrows();
        let sum = Array2::from_shape_fn((l.ncols(), r.ncols()), |(i, j)| (0..k).map(|t| f(l[[t, i]], sl) * f(r[[t, j]], sr)).sum());
        let bound = 4.0 * (k as f64).sqrt() * f64::from(f32::EPSILON) / 2.0;
        let tol = Array2::from_shape_fn((l.ncols(), r.ncols()), |(i, j)| {
            bound * (0..k).map(|t| (f(l[[t, i]], sl) * f(r[[t, j]], sr)).abs()).sum::<f64>()
        });
        (sum, tol)
    }

    /// `gemm_tn` against the f64 sum: widths around the tiles (8 rows, 16-column vectors,
    /// 48-column panels, 6-panel blocks, 16-tile groups), more depth than one block (KC),
    /// with and without squaring either side, row-major, strided and column-major input, a
    /// band of rows ending inside a tile (bitwise the whole's rows), accumulating.
    #[test]
    fn gemm_tn_matches_the_reference_in_bands_over_strided_input() {
        if !available() {
            eprintln!("no AVX-512F on this CPU: gemm_tn is not used here");
            return;
        }
        for (m1, m2) in [(1usize, 1usize), (9, 17), (130, 49), (200, 300), (64, 785)] {
            let k = KC + 131;
            let l = crate::synthetic::normal_matrix(k, m1, m1 as u64);
            let r = crate::synthetic::normal_matrix(k, m2, 1000 + m2 as u64);
            for (sl, sr) in [(false, false), (true, true), (false, true)] {
                let (want, tol) = reference(l.view(), sl, r.view(), sr);
                let check = |got: &[f32], rows: std::ops::Range<usize>, twice: bool, what: &str| {
                    let k = if twice { 2.0 } else { 1.0 };
                    for (t, i) in rows.enumerate() {
                        for j in 0..m2 {
                            let err = (f64::from(got[t * m2 + j]) - k * want[[i, j]]).abs();
                            assert!(err <= k * tol[[i, j]], "{m1}×{m2} {sl}/{sr} {what}: ({i}, {j}) off by {err} (bound {})", tol[[i, j]]);
                        }
                    }
                };
                let mut whole = vec![f32::NAN; m1 * m2];
                gemm_tn(l.view(), sl, r.view(), sr, 0..m1, &mut whole, m2, false);
                check(&whole, 0..m1, false, "whole");
                // A band from row 3 to a row inside a tile: the whole's rows, bit for bit.
                let band = 3.min(m1)..(m1 * 2 / 3 + 1).min(m1);
                let mut part = vec![f32::NAN; band.len() * m2];
                gemm_tn(l.view(), sl, r.view(), sr, band.clone(), &mut part, m2, false);
                assert_eq!(part, whole[band.start * m2..band.end * m2], "{m1}×{m2} band");
                // Accumulating into the whole: twice the sum.
                gemm_tn(l.view(), sl, r.view(), sr, 0..m1, &mut whole, m2, true);
                check(&whole, 0..m1, true, "accumulated");
                // Column-major left, every other row of the right (strided).
                let lt = l.t().as_standard_layout().into_owned();
                let mut cm = vec![f32::NAN; m1 * m2];
                gemm_tn(lt.t(), sl, r.view(), sr, 0..m1, &mut cm, m2, false);
                check(&cm, 0..m1, false, "column-major");
                let (half, half_tol) = reference(l.slice(s![..;2, ..]), sl, r.slice(s![..;2, ..]), sr);
                let mut strided = vec![f32::NAN; m1 * m2];
                gemm_tn(l.slice(s![..;2, ..]), sl, r.slice(s![..;2, ..]), sr, 0..m1, &mut strided, m2, false);
                for i in 0..m1 {
                    for j in 0..m2 {
                        let err = (f64::from(strided[i * m2 + j]) - half[[i, j]]).abs();
                        assert!(err <= half_tol[[i, j]], "{m1}×{m2} strided: ({i}, {j}) off by {err}");
                    }
                }
            }
        }
    }
}
