//! A network layer's backward product with its activation's derivative applied, on an
//! AVX-512 micro-kernel that skips the zero columns of each sample's rows:
//!
//! δ_{l−1}[s·d + q, j] = φ'(z_{l−1})[s, j] · Σ_{k ∈ A_s} δ_l[s·d + q, k] · W_l[k, j],
//!
//! where A_s is the set of columns k at which some of sample s's d rows of δ_l is nonzero.
//!
//! The rows of one sample share their zeros: δ_l is itself scaled by φ'(z_l) of the sample,
//! and a ReLU's derivative is zero for about half the units. `gemm` multiplies those zeros
//! like any other value. Here each sample's d rows are compacted to their active columns,
//! and the product reads only the matching rows of W. That skips half the multiply-adds of
//! the backward pass at ReLU layers. It is a third of W3's true KFAC (784-512-512-10, 9 rows
//! per sample). Smooth activations have no zero derivatives, and the kernel then does the
//! dense product.
//!
//! * **Compaction.** Sample s's d × K rows are read 16 columns at a time. A column is active
//!   when one of its d values is nonzero or NaN (a NaN must reach the result as it would
//!   through `gemm`; W is finite, checked when the model is read). Each row's active values
//!   are packed into a strip of their own (`_mm512_maskz_compress_ps`), row q at
//!   `strip[q·(K + 16) + t]`, and their column indices into `idx[t]`.
//! * **W in panels.** W (K × N) is copied once per call into panels of 48 columns, K rows
//!   of 48 values each, 64-byte aligned: read in place, W's rows started anywhere in a cache
//!   line (the allocator aligns to 16 bytes), and every vector load touched two lines
//!   (W3's true KFAC 3 % slower). At 512 × 512 the panels (1 MiB) stay in L2 while the
//!   samples stream past them.
//! * **Micro-kernel.** A tile is up to [`MAX_MR`] = 9 rows of one sample by 48 columns
//!   (three zmm vectors): 27 accumulators. Each step t loads the three vectors of row
//!   idx[t] of the panel and broadcasts the tile's rows' values, 27 FMAs.
//! * **Rows.** A sample's d rows are split into ⌈d / 9⌉ pieces of near-equal size (d = 10:
//!   5 + 5, not 9 + 1).
//! * **Epilogue.** Each result vector is multiplied by φ'(z_{l−1}) of the sample before it
//!   is stored. So the scaling is not a pass of its own. Where asked, Σ_q of the squared
//!   scaled rows per sample (the diag's Σ_R δ²) is summed too, in f32 FMAs over the rows.
//! * **Sums.** Each entry is one FMA chain over the sample's active columns in order, so the
//!   result depends on δ, W and d alone, never on the threads.
//! * **Where it runs** ([`applies`], [`sparse_enough`]). Where at least an eighth of δ's
//!   columns are zero ([`MIN_ZERO_SHARE`]), and from [`MIN_ROWS`] = 2 rows per sample:
//!   with one, each value of W read is used once, and `gemm`, which reuses it across
//!   samples, is faster (W3's MC KFAC, best of 5, two runs: with one draw the kernel was
//!   3–6 % slower; with 2, 3, 4 draws 2–8 %, 2 %, 3–7 % faster). Its panels are at most
//!   [`MAX_PACKED_BYTES`] and counted in a micro-batch's
//!   scratch; a sample's strip (d · (K + 16) values) at most [`MAX_STRIP_BYTES`], one per
//!   thread like `gemm`'s own packing buffers. Wider layers take `gemm`.
//!
//! Measured on the 2-core Xeon (one thread, m = 240 samples, d = 9, K = N = 512, best of 7):
//! the kernel does 167–177 GFLOP/s of useful work at 45 % active columns, and 187–195 with
//! every column active, where `gemm` does 207–218 (without its scaling pass). In W3's true
//! KFAC (best of 5 in interleaved rounds) it took 0.152 s to 0.135 s, and the true diag from
//! 0.091 s to 0.071 s.

use std::arch::x86_64::{
    __m512, __m512i, __mmask16, _mm512_add_epi32, _mm512_add_ps, _mm512_cmp_ps_mask, _mm512_fmadd_ps, _mm512_loadu_ps,
    _mm512_mask_storeu_ps, _mm512_maskz_compress_epi32, _mm512_maskz_compress_ps, _mm512_maskz_loadu_ps, _mm512_mul_ps,
    _mm512_set1_epi32, _mm512_set1_ps, _mm512_setr_epi32, _mm512_setzero_ps, _mm512_storeu_ps, _mm512_storeu_si512, _CMP_NEQ_UQ,
};

use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;

use super::syrk_avx512::{assume_written, Packed};

/// f32 values per zmm vector.
const LANES: usize = 16;
/// Most rows of one sample in a tile: 9 × 3 accumulators, 3 vectors of W, 1 broadcast.
pub(super) const MAX_MR: usize = 9;
/// Columns of a tile and of W's panels (three vectors).
const NR: usize = 3 * LANES;
/// Samples per parallel task.
const TASK_SAMPLES: usize = 4;
/// Fewest rows per sample the kernel takes (see the module docs).
const MIN_ROWS: usize = 2;
/// Most bytes of W's panels: 4 MiB (W3's 512 × 512 take 1 MiB).
const MAX_PACKED_BYTES: u64 = 4 << 20;
/// Most bytes of one sample's strip and indices: 256 KiB (d = 9 at K = 512: 19 KiB).
const MAX_STRIP_BYTES: u64 = 256 << 10;

/// Whether this CPU runs the kernel (checked once by std, then cached).
pub(super) fn available() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

/// Bytes of W's panels for W of K × N.
pub(super) fn packed_bytes(k: usize, n: usize) -> u64 {
    (n.div_ceil(NR) * NR) as u64 * k as u64 * 4
}

/// Whether the backward product of d rows per sample by W of K × N runs on the kernel
/// (this CPU has it, and the shapes are within its bounds: see the module docs).
pub(super) fn applies(d: usize, k: usize, n: usize) -> bool {
    let strip = (d as u64 + 1).saturating_mul(k as u64 + LANES as u64).saturating_mul(4);
    d >= MIN_ROWS && packed_bytes(k, n) <= MAX_PACKED_BYTES && strip <= MAX_STRIP_BYTES && available()
}

/// Least share of zero columns in δ for which the kernel beats `gemm` and its scaling pass
/// with margin: 1/8. With every column active (tanh) the kernel is up to 5 % slower than
/// `gemm` (W3's true diag); at ReLU's ~50 % it is 25 % faster.
const MIN_ZERO_SHARE: f64 = 0.125;

/// Whether enough of δ's columns are zero, judged from each sample's first row of d: an
/// m × K read, against the kernel's m·d·K·N multiply-adds.
pub(super) fn sparse_enough(delta: ArrayView2<'_, f32>, d: usize) -> bool {
    let (rows, k) = delta.dim();
    if d == 0 || rows == 0 || k == 0 {
        return false;
    }
    let zeros: usize = delta.outer_iter().step_by(d).map(|row| row.iter().filter(|&&x| x == 0.0).count()).sum();
    zeros as f64 >= MIN_ZERO_SHARE * (rows / d * k) as f64
}

/// (δ_{l−1}, Σ_q δ_{l−1}² per sample when `square_sums`): see the module docs. `delta` is
/// (m·d) × K, `weight` K × N, `scale` m × N (φ'(z_{l−1})); the result m·d × N and the sums
/// m × N, both standard layout. The sums are f32 over the d rows: callers ask for them only
/// when d ≤ `elementwise::F32_TERMS`. Callers check [`applies`] first.
pub(super) fn backward(delta: ArrayView2<'_, f32>, d: usize, weight: ArrayView2<'_, f32>, scale: ArrayView2<'_, f32>, square_sums: bool) -> (Array2<f32>, Option<Array2<f32>>) {
    assert!(available(), "backward needs AVX-512F");
    let (rows, k) = delta.dim();
    let (k2, n) = weight.dim();
    assert!(d > 0 && k == k2 && rows % d == 0 && scale.dim() == (rows / d, n) && k < u32::MAX as usize - LANES, "backward shapes");
    let m = rows / d;
    let (delta, weight, scale) = (delta.as_standard_layout(), weight.as_standard_layout(), scale.as_standard_layout());
    let (delta, weight, scale) = (delta.as_slice().expect("standard"), weight.as_slice().expect("standard"), scale.as_slice().expect("standard"));
    let mut out = Array2::<f32>::uninit((rows, n));
    let mut sums = Array2::<f32>::uninit((if square_sums { m } else { 0 }, n));
    if rows == 0 || n == 0 {
        // SAFETY: there is no value to initialise.
        return unsafe { (out.assume_init(), square_sums.then(|| sums.assume_init())) };
    }
    // W's panels: panel p, row t, column c at p·K·NR + t·NR + c (zero past N).
    let panels = n.div_ceil(NR);
    let mut packed = Packed::new(panels * k * NR);
    let buf = packed.as_uninit(panels * k * NR);
    if k > 0 {
        buf.par_chunks_mut(k * NR).enumerate().for_each(|(p, panel)| {
            let j0 = p * NR;
            let cols = NR.min(n - j0);
            for (t, row) in panel.chunks_exact_mut(NR).enumerate() {
                let (values, pad) = row.split_at_mut(cols);
                values.iter_mut().zip(&weight[t * n + j0..t * n + j0 + cols]).for_each(|(o, &v)| {
                    o.write(v);
                });
                pad.iter_mut().for_each(|o| {
                    o.write(0.0);
                });
            }
        });
    }
    // SAFETY: every panel's K rows of NR values were written just above.
    let panels_of: &[f32] = unsafe { assume_written(buf) };
    let sums_at = super::DisjointWrites(sums.as_mut_ptr().cast::<f32>());
    let pieces = d.div_ceil(MAX_MR);
    let piece = d.div_ceil(pieces);
    let ldk = k + LANES;
    out.as_slice_mut().expect("fresh arrays are standard layout").par_chunks_mut(TASK_SAMPLES * d * n).enumerate().for_each(|(task, out)| {
        let mut strip = vec![0f32; d * ldk];
        let mut idx = vec![0u32; ldk];
        for (ds, out) in out.chunks_mut(d * n).enumerate() {
            let s = task * TASK_SAMPLES + ds;
            // SAFETY: AVX-512F checked above; the strip holds d rows of K + 16, idx K + 16.
            let active = unsafe { compact(&delta[s * d * k..(s + 1) * d * k], d, k, &mut strip, &mut idx) };
            let scale_row = &scale[s * n..(s + 1) * n];
            for (p, j0) in (0..n).step_by(NR).enumerate() {
                let cols = NR.min(n - j0);
                for q0 in (0..d).step_by(piece) {
                    // SAFETY: AVX-512F; the strip's rows q0 .. q0 + mr hold `active` values,
                    // idx `active` indices < K; panel p holds K rows of NR values; the tile
                    // writes `out`'s rows q0 .. q0 + mr (this sample's, in this task's
                    // chunk) at columns j0 .. j0 + cols ≤ N, and the sums' row s, which
                    // only this task writes.
                    unsafe {
                        let tile = Tile {
                            active,
                            idx: idx.as_ptr(),
                            strip: strip.as_ptr().add(q0 * ldk),
                            ldk,
                            w: panels_of.as_ptr().add(p * k * NR),
                            cols,
                            scale: scale_row.as_ptr().add(j0),
                            out: out.as_mut_ptr().add(q0 * n + j0).cast::<f32>(),
                            ldo: n,
                            sums: if square_sums { Some(sums_at.get().add(s * n + j0)) } else { None },
                            add_sums: q0 > 0,
                        };
                        run_tile(&tile, piece.min(d - q0));
                    }
                }
            }
        }
    });
    // SAFETY: every tile wrote its rows × cols values of `out` and (every piece, the first
    // overwriting) its cols values of the sums: together every value of both.
    unsafe { (out.assume_init(), square_sums.then(|| sums.assume_init())) }
}

/// Packs the active columns of one sample's d rows (`rows`, d × K row-major) into `strip`
/// (row q at q·ldk, ldk = K + 16) and their indices into `idx`; returns how many there are.
///
/// # Safety
/// AVX-512F; `strip` holds d·ldk values and `idx` ldk.
#[target_feature(enable = "avx512f")]
unsafe fn compact(rows: &[f32], d: usize, k: usize, strip: &mut [f32], idx: &mut [u32]) -> usize {
    let ldk = k + LANES;
    assert!(rows.len() == d * k && strip.len() >= d * ldk && idx.len() >= ldk, "compact shapes");
    let iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let zero = _mm512_setzero_ps();
    let mut active = 0usize;
    for k0 in (0..k).step_by(LANES) {
        let valid: __mmask16 = if k - k0 >= LANES { 0xFFFF } else { ((1u32 << (k - k0)) - 1) as __mmask16 };
        // NaN compares unequal (unordered): its column stays, and the NaN reaches the result.
        let mut nonzero: __mmask16 = 0;
        for q in 0..d {
            let v = _mm512_maskz_loadu_ps(valid, rows.as_ptr().add(q * k + k0));
            nonzero |= _mm512_cmp_ps_mask::<_CMP_NEQ_UQ>(v, zero);
        }
        if nonzero == 0 {
            continue;
        }
        for q in 0..d {
            let v = _mm512_maskz_loadu_ps(valid, rows.as_ptr().add(q * k + k0));
            // A whole vector is stored from `active` ≤ k0 < K, inside the row's K + 16.
            _mm512_storeu_ps(strip.as_mut_ptr().add(q * ldk + active), _mm512_maskz_compress_ps(nonzero, v));
        }
        let at: __m512i = _mm512_add_epi32(iota, _mm512_set1_epi32(k0 as i32));
        _mm512_storeu_si512(idx.as_mut_ptr().add(active).cast(), _mm512_maskz_compress_epi32(nonzero, at));
        active += nonzero.count_ones() as usize;
    }
    active
}

/// One tile's operands (see [`tile`]).
struct Tile {
    /// Active columns of the sample.
    active: usize,
    /// Their indices (rows of W).
    idx: *const u32,
    /// The tile's first row in the strip (rows `ldk` apart).
    strip: *const f32,
    ldk: usize,
    /// The panel of W holding the tile's columns (rows NR apart).
    w: *const f32,
    /// Columns of the tile, ≤ NR.
    cols: usize,
    /// φ'(z_{l−1}) of the sample at the tile's first column.
    scale: *const f32,
    /// The tile's first output value (rows `ldo` apart).
    out: *mut f32,
    ldo: usize,
    /// The sample's square sums at the tile's first column, when asked for.
    sums: Option<*mut f32>,
    /// Whether the sums already hold an earlier piece's rows.
    add_sums: bool,
}

/// [`tile`] for `mr` ≤ [`MAX_MR`] rows and as many vectors as the tile's columns need.
///
/// # Safety
/// As [`tile`].
unsafe fn run_tile(t: &Tile, mr: usize) {
    macro_rules! by_rows {
        ($v:literal) => {
            match mr {
                1 => tile::<1, $v>(t),
                2 => tile::<2, $v>(t),
                3 => tile::<3, $v>(t),
                4 => tile::<4, $v>(t),
                5 => tile::<5, $v>(t),
                6 => tile::<6, $v>(t),
                7 => tile::<7, $v>(t),
                8 => tile::<8, $v>(t),
                9 => tile::<9, $v>(t),
                _ => unreachable!("pieces of at most {MAX_MR} rows"),
            }
        };
    }
    match t.cols.div_ceil(LANES) {
        3 => by_rows!(3),
        2 => by_rows!(2),
        _ => by_rows!(1),
    }
}

/// An MR × 16·V tile: out[q, c] = scale[c] · Σ_t strip[q·ldk + t] · W[idx[t], c] for
/// q < MR, c < cols, and Σ_q out[q, c]² added to the sums (or written, for the first piece).
///
/// # Safety
/// AVX-512F; the strip readable at q·ldk + t and idx at t for q < MR, t < active; the panel
/// at idx[t]·NR + c for c < 16·V; scale at c, out at q·ldo + c and the sums at c, for
/// c < cols ≤ 16·V.
#[target_feature(enable = "avx512f")]
unsafe fn tile<const MR: usize, const V: usize>(t: &Tile) {
    let mut c: [[__m512; V]; MR] = [[_mm512_setzero_ps(); V]; MR];
    for step in 0..t.active {
        let b = t.w.add(*t.idx.add(step) as usize * NR);
        let bv: [__m512; V] = std::array::from_fn(|v| _mm512_loadu_ps(b.add(LANES * v)));
        for (q, acc) in c.iter_mut().enumerate() {
            let x = _mm512_set1_ps(*t.strip.add(q * t.ldk + step));
            for v in 0..V {
                acc[v] = _mm512_fmadd_ps(x, bv[v], acc[v]);
            }
        }
    }
    let masks: [__mmask16; V] = std::array::from_fn(|v| {
        let n = t.cols.saturating_sub(LANES * v).min(LANES);
        if n == LANES { 0xFFFF } else { ((1u32 << n) - 1) as __mmask16 }
    });
    let s: [__m512; V] = std::array::from_fn(|v| _mm512_maskz_loadu_ps(masks[v], t.scale.add(LANES * v)));
    let mut sq: [__m512; V] = [_mm512_setzero_ps(); V];
    for (q, acc) in c.iter().enumerate() {
        for v in 0..V {
            let y = _mm512_mul_ps(acc[v], s[v]);
            _mm512_mask_storeu_ps(t.out.add(q * t.ldo + LANES * v), masks[v], y);
            sq[v] = _mm512_fmadd_ps(y, y, sq[v]);
        }
    }
    if let Some(sums) = t.sums {
        for v in 0..V {
            let at = sums.add(LANES * v);
            let value = if t.add_sums { _mm512_add_ps(_mm512_maskz_loadu_ps(masks[v], at), sq[v]) } else { sq[v] };
            _mm512_mask_storeu_ps(at, masks[v], value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::s;

    /// (δ W) ∘ scale and Σ_q of its squares per sample, in f64, with bounds on an f32 FMA
    /// chain's error: 4·√K·u·Σₖ |δ·w|·|scale| per entry (u = 2⁻²⁴), and for the sums
    /// 2·Σ_q |x|·err(x) + 4·√d·u·Σ_q x².
    #[allow(clippy::type_complexity)]
    fn reference(delta: ArrayView2<'_, f32>, d: usize, w: ArrayView2<'_, f32>, scale: ArrayView2<'_, f32>) -> (Array2<f64>, Array2<f64>, Array2<f64>, Array2<f64>) {
        let (rows, k) = delta.dim();
        let n = w.ncols();
        let u = f64::from(f32::EPSILON) / 2.0;
        let bound = 4.0 * (k.max(1) as f64).sqrt() * u;
        let mut want = Array2::<f64>::zeros((rows, n));
        let mut tol = Array2::<f64>::zeros((rows, n));
        for r in 0..rows {
            for j in 0..n {
                let sc = f64::from(scale[[r / d, j]]);
                let (mut sum, mut abs) = (0.0, 0.0);
                for t in 0..k {
                    let term = f64::from(delta[[r, t]]) * f64::from(w[[t, j]]);
                    sum += term;
                    abs += term.abs();
                }
                want[[r, j]] = sum * sc;
                tol[[r, j]] = (bound * abs + u) * sc.abs();
            }
        }
        let m = rows / d;
        let mut sums = Array2::<f64>::zeros((m, n));
        let mut sums_tol = Array2::<f64>::zeros((m, n));
        for s in 0..m {
            for j in 0..n {
                for q in 0..d {
                    let x = want[[s * d + q, j]];
                    sums[[s, j]] += x * x;
                    sums_tol[[s, j]] += 2.0 * x.abs() * tol[[s * d + q, j]] + tol[[s * d + q, j]].powi(2);
                }
                sums_tol[[s, j]] += 4.0 * (d as f64).sqrt() * u * sums[[s, j]];
            }
        }
        (want, tol, sums, sums_tol)
    }

    /// The kernel against the f64 product: rows per sample around the pieces (1, 9, 10, 23),
    /// depths and widths around the vectors and tiles, samples around the tasks, columns
    /// that are zero in every row of a sample, in some rows only, or NaN, strided input.
    #[test]
    fn backward_matches_the_reference_and_skips_only_zero_columns() {
        if !available() {
            eprintln!("no AVX-512F on this CPU: the backward kernel is not used here");
            return;
        }
        for (m, d, k, n) in [(1usize, 1usize, 1usize, 1usize), (2, 4, 0, 5), (3, 9, 17, 49), (6, 10, 40, 100), (5, 23, 33, 16), (9, 2, 130, 47), (4, 1, 64, 145)] {
            let mut delta = crate::synthetic::normal_matrix(m * d, k, (m * d + k) as u64);
            let w = crate::synthetic::normal_matrix(k, n, (k * n) as u64);
            let scale = crate::synthetic::normal_matrix(m, n, 7 + n as u64);
            // Zero columns per sample (every third from the sample's offset), and a column
            // that is zero in the sample's first row only.
            for s in 0..m {
                for t in (s % 3..k).step_by(3) {
                    delta.slice_mut(s![s * d..(s + 1) * d, t]).fill(0.0);
                }
                if k > 1 {
                    delta[[s * d, 1]] = 0.0;
                }
            }
            let (want, tol, sums, sums_tol) = reference(delta.view(), d, w.view(), scale.view());
            for strided in [false, true] {
                // Strided: the first K columns of [δ | δ], rows 2K apart.
                let wide = ndarray::concatenate![ndarray::Axis(1), delta.view(), delta.view()];
                let view = if strided { wide.slice(s![.., ..k]) } else { delta.view() };
                let (got, got_sums) = backward(view, d, w.view(), scale.view(), true);
                let got_sums = got_sums.expect("asked for");
                for ((r, j), &x) in got.indexed_iter() {
                    let err = (f64::from(x) - want[[r, j]]).abs();
                    assert!(err <= tol[[r, j]], "{m}×{d}×{k}×{n}: ({r}, {j}) off by {err} (bound {})", tol[[r, j]]);
                }
                for ((s, j), &x) in got_sums.indexed_iter() {
                    let err = (f64::from(x) - sums[[s, j]]).abs();
                    assert!(err <= sums_tol[[s, j]], "{m}×{d}×{k}×{n} sums: ({s}, {j}) off by {err} (bound {})", sums_tol[[s, j]]);
                }
                let (again, none) = backward(view, d, w.view(), scale.view(), false);
                assert!(none.is_none());
                assert_eq!(again, got, "the sums do not change the rows");
            }
            // A NaN in a column of one sample reaches every entry of its rows, as through a
            // dense product.
            if k > 2 {
                let mut poisoned = delta.clone();
                poisoned[[0, 2]] = f32::NAN;
                let (got, _) = backward(poisoned.view(), d, w.view(), scale.view(), false);
                assert!(got.row(0).iter().all(|x| x.is_nan()), "NaN dropped");
                assert!(got.rows().into_iter().skip(d).all(|r| r.iter().all(|x| x.is_finite())), "NaN beyond its sample");
            }
        }
    }
}
