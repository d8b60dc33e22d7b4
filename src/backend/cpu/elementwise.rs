//! The element-wise passes of the CPU network path, on contiguous row-major f32 slices.
//!
//! Each pass resolves the activation once, outside its loop, so that the loop body is one
//! monomorphic closure the compiler vectorizes, and runs in parallel over blocks of whole
//! rows. The ndarray `Zip` loops they replace matched on the activation per element and
//! indexed rows through views: in `perf` they took 33% of W3's true diag, 25% of its KFAC
//! and 50% of its empirical diag (784-512-512-10, N = 4096), more than the GEMMs did.

use std::mem::MaybeUninit;

use ndarray::{Array2, ArrayView2, ArrayViewMut2};
use rayon::prelude::*;

use crate::model::Activation;

/// Elements per parallel task: big enough that a task costs more than rayon's hand-off
/// (~1 µs), small enough to split a 4096 × 512 pass over every core.
pub(crate) const GRAIN: usize = 1 << 14;

/// Rows per task for rows of `width` elements (at least one row).
fn rows_per_task(width: usize) -> usize {
    (GRAIN / width.max(1)).max(1)
}

/// A fresh m × n array (standard layout) filled by `write`, which is handed its m·n
/// uninitialised values row-major and writes every one of them: scratch without the memset
/// of `Array2::zeros`. The memsets are real work here: the allocator keeps freed scratch
/// (`allocator::keep_freed_scratch`), so `calloc` cannot hand out fresh zero pages; they
/// were 3–6 % of W3's diag and KFAC in `perf`.
///
/// # Safety
/// `write` must initialise every element of the slice it is given.
pub(crate) unsafe fn fresh(m: usize, n: usize, write: impl FnOnce(&mut [MaybeUninit<f32>])) -> Array2<f32> {
    let mut out = Array2::<f32>::uninit((m, n));
    write(out.as_slice_mut().expect("fresh arrays are standard layout"));
    // SAFETY: the caller's `write` initialised every element.
    unsafe { out.assume_init() }
}

/// What [`activate_parts`] computes from z (m × w) in one pass.
pub(crate) struct Activated {
    /// [φ(z) | 1] (m × ld): φ(z) in the first w columns, 1 in the rest (the bias column
    /// of an augmented activation).
    pub a: Array2<f32>,
    /// φ'(z) (m × w), when asked for: from z, or where cheaper from φ(z) (tanh' = 1 − a²,
    /// σ' = a(1 − a)), so that no transcendental function is evaluated twice.
    pub derivative: Option<Array2<f32>>,
    /// [φ(z) | 1] ∘ [φ(z) | 1] (m × ld), when asked for.
    pub squares: Option<Array2<f32>>,
}

/// φ(z), φ'(z) and φ(z)² ([`Activated`]) in one pass over z, row block by row block, in
/// parallel: each row of z is read once, and the row of φ(z) that φ' and the squares read is
/// still in L1 (three passes over the micro-batch cost W3's empirical diag 2 % more).
/// Each activation's φ and φ' are concrete closures, so that every arm compiles to its own
/// vectorized loop.
///
/// With `bias`, z is the product without the layer's bias b, and every row is first taken
/// as z + b (in L1, as it is read): the forward pass then needs no pass to preset z to b
/// before its GEMM, and the GEMM no read of it (2 % of W3's MC KFAC).
pub(crate) fn activate_parts(
    phi: Activation,
    z: ArrayView2<'_, f32>,
    bias: Option<&[f32]>,
    ld: usize,
    want_derivative: bool,
    want_squares: bool,
) -> Activated {
    let (m, w) = z.dim();
    assert!(ld >= w, "activate shapes");
    let z = z.as_standard_layout();
    let mut a = Array2::<f32>::uninit((m, ld));
    let (derivative, squares) = activate_into(phi, a.as_slice_mut().expect("fresh"), Some(z.as_slice().expect("standard layout")), w, ld, bias, want_derivative, want_squares);
    // SAFETY: `activate_into` wrote every value of a.
    Activated { a: unsafe { a.assume_init() }, derivative, squares }
}

/// [`activate_parts`] in place: `za` (m × ld) holds z in its first w columns (each value
/// written, the rest not) and becomes [φ(z + b) | 1]. The forward pass's GEMM writes z
/// there, so that the activation is not a second m × ld array to fill (its cache lines
/// fetched for writing; 2 % of W3's MC KFAC).
pub(crate) fn activate_in_place(
    phi: Activation,
    mut za: Array2<MaybeUninit<f32>>,
    w: usize,
    bias: Option<&[f32]>,
    want_derivative: bool,
    want_squares: bool,
) -> Activated {
    let ld = za.ncols();
    assert!(ld >= w, "activate shapes");
    let (derivative, squares) = activate_into(phi, za.as_slice_mut().expect("standard layout"), None, w, ld, bias, want_derivative, want_squares);
    // SAFETY: `activate_into` wrote every value of za.
    Activated { a: unsafe { za.assume_init() }, derivative, squares }
}

/// The work of [`activate_parts`] and [`activate_in_place`]: writes every value of `a`
/// (m × ld) from z, which is `z` (m × w), or with `None` the first w columns of each row of
/// `a` itself (written; copied to a row buffer before the row is overwritten), and returns
/// φ' and the squares where asked for.
#[allow(clippy::too_many_arguments)]
fn activate_into(
    phi: Activation,
    a: &mut [MaybeUninit<f32>],
    z: Option<&[f32]>,
    w: usize,
    ld: usize,
    bias: Option<&[f32]>,
    want_derivative: bool,
    want_squares: bool,
) -> (Option<Array2<f32>>, Option<Array2<f32>>) {
    assert!(ld >= w && ld > 0 && a.len() % ld == 0 && bias.is_none_or(|b| b.len() == w), "activate shapes");
    let m = a.len() / ld;
    assert!(z.is_none_or(|z| z.len() == m * w), "activate shapes");
    let rows = rows_per_task(ld);
    let mut d = Array2::<f32>::uninit((if want_derivative { m } else { 0 }, w));
    let mut sq = Array2::<f32>::uninit((if want_squares { m } else { 0 }, ld));
    {
        let a_blocks: Vec<&mut [MaybeUninit<f32>]> = a.chunks_mut(rows * ld).collect();
        let blocks = a_blocks.len();
        let mut d_blocks: Vec<&mut [MaybeUninit<f32>]> = d.as_slice_mut().expect("fresh").chunks_mut(rows * w.max(1)).collect();
        let mut sq_blocks: Vec<&mut [MaybeUninit<f32>]> = sq.as_slice_mut().expect("fresh").chunks_mut(rows * ld).collect();
        let mut z_blocks: Vec<&[f32]> = z.map_or_else(Vec::new, |z| z.chunks(rows * w.max(1)).collect());
        d_blocks.resize_with(blocks, Default::default);
        sq_blocks.resize_with(blocks, Default::default);
        z_blocks.resize_with(blocks, Default::default);
        let tasks: Vec<_> = a_blocks.into_iter().zip(d_blocks).zip(sq_blocks).zip(z_blocks).collect();
        let in_place = z.is_none();
        macro_rules! run {
            ($f:expr, $g:expr) => {
                tasks.into_par_iter().for_each(|(((ab, db), sb), zb)| {
                    let mut shifted = vec![0.0f32; if bias.is_some() || in_place { w } else { 0 }];
                    for (t, arow) in ab.chunks_mut(ld).enumerate() {
                        let zrow: &[f32] = match in_place {
                            // SAFETY: the caller wrote the first w values of every row.
                            true => unsafe { std::slice::from_raw_parts(arow.as_ptr().cast::<f32>(), w) },
                            false => &zb[t * w..(t + 1) * w],
                        };
                        let zrow: &[f32] = match (bias, in_place) {
                            (Some(b), _) => {
                                for ((s, &x), &c) in shifted.iter_mut().zip(zrow).zip(b) {
                                    *s = x + c;
                                }
                                &shifted
                            }
                            (None, true) => {
                                shifted.copy_from_slice(zrow);
                                &shifted
                            }
                            (None, false) => zrow,
                        };
                        for (o, &x) in arow[..w].iter_mut().zip(zrow) {
                            o.write($f(x));
                        }
                        for o in &mut arow[w..] {
                            o.write(1.0);
                        }
                        // SAFETY: the row was written just above.
                        let arow: &[f32] = unsafe { std::slice::from_raw_parts(arow.as_ptr().cast::<f32>(), ld) };
                        if want_derivative {
                            for ((o, &x), &y) in db[t * w..(t + 1) * w].iter_mut().zip(zrow).zip(&arow[..w]) {
                                o.write($g(x, y));
                            }
                        }
                        if want_squares {
                            for (o, &y) in sb[t * ld..(t + 1) * ld].iter_mut().zip(arow) {
                                o.write(y * y);
                            }
                        }
                    }
                })
            };
        }
        match phi {
            Activation::Relu => run!(|x: f32| x.max(0.0), |x: f32, _y: f32| if x > 0.0 { 1.0f32 } else { 0.0 }),
            Activation::Tanh => run!(|x: f32| x.tanh(), |_x: f32, y: f32| 1.0 - y * y),
            Activation::Sigmoid => run!(|x: f32| Activation::Sigmoid.apply(x), |_x: f32, y: f32| y * (1.0 - y)),
            Activation::Gelu => run!(|x: f32| Activation::Gelu.apply(x), |x: f32, _y: f32| Activation::Gelu.derivative(x)),
            Activation::Identity => run!(|x: f32| x, |_x: f32, _y: f32| 1.0f32),
        }
    }
    // SAFETY: every task wrote all values of its rows of d and sq where asked for (the arrays
    // have no rows otherwise).
    unsafe { (want_derivative.then(|| d.assume_init()), want_squares.then(|| sq.assume_init())) }
}

/// `rows[q, ..] *= scale[q / d, ..]` for rows (m·d) × w and scale m × w, both standard
/// layout: the backward pass's δ ∘ φ'(z) with d output rows per sample.
pub(crate) fn scale_rows(mut rows: ArrayViewMut2<'_, f32>, scale: ArrayView2<'_, f32>, d: usize) {
    let w = rows.ncols();
    assert!(scale.ncols() == w && rows.nrows() == scale.nrows() * d, "scale_rows shapes");
    let rows = rows.as_slice_mut().expect("standard layout");
    let scale = scale.as_slice().expect("standard layout");
    let per_task = rows_per_task(w * d).max(1);
    rows.par_chunks_mut(per_task * d * w).zip(scale.par_chunks(per_task * w)).for_each(|(r, s)| {
        for (sample, srow) in r.chunks_mut(d * w).zip(s.chunks(w)) {
            for row in sample.chunks_mut(w) {
                for (x, &k) in row.iter_mut().zip(srow) {
                    *x *= k;
                }
            }
        }
    });
}

/// [`scale_rows`] and then [`row_square_sums`] of the scaled rows, in one pass (the same
/// values bit for bit): for d ≤ [`F32_TERMS`], each sample's d rows are scaled and their
/// squares summed while they are in L1; longer d runs the two passes.
pub(crate) fn scale_rows_and_square_sums(mut rows: ArrayViewMut2<'_, f32>, scale: ArrayView2<'_, f32>, d: usize) -> Array2<f32> {
    if d > F32_TERMS {
        scale_rows(rows.view_mut(), scale, d);
        return row_square_sums(rows.view(), d);
    }
    let w = rows.ncols();
    assert!(d > 0 && scale.ncols() == w && rows.nrows() == scale.nrows() * d, "scale_rows shapes");
    let m = scale.nrows();
    let rows = rows.as_slice_mut().expect("standard layout");
    let scale = scale.as_slice().expect("standard layout");
    let per_task = rows_per_task(w * d).max(1);
    // SAFETY: each task writes every value of its samples' rows of w.
    unsafe {
        fresh(m, w, |dst| {
            dst.par_chunks_mut(per_task * w).zip(rows.par_chunks_mut(per_task * d * w)).zip(scale.par_chunks(per_task * w)).for_each(
                |((o, r), s)| {
                    let mut part = vec![0f32; w];
                    for ((orow, sample), srow) in o.chunks_mut(w).zip(r.chunks_mut(d * w)).zip(s.chunks(w)) {
                        part.fill(0.0);
                        for row in sample.chunks_mut(w) {
                            for ((x, &k), acc) in row.iter_mut().zip(srow).zip(part.iter_mut()) {
                                *x *= k;
                                *acc += *x * *x;
                            }
                        }
                        for (o, &p) in orow.iter_mut().zip(&part) {
                            o.write(p);
                        }
                    }
                },
            )
        })
    }
}

/// Σ_q δ_{s·d+q}² per sample s (m × w) for δ (m·d) × w standard layout: f32 sums of at most
/// [`F32_TERMS`] squares, added in f64 when d is longer, rounded once to f32.
pub(crate) fn row_square_sums(delta: ArrayView2<'_, f32>, d: usize) -> Array2<f32> {
    let w = delta.ncols();
    assert!(d > 0 && delta.nrows() % d == 0, "row_square_sums shapes");
    let m = delta.nrows() / d;
    let src = delta.as_slice().expect("standard layout");
    let per_task = rows_per_task(w * d).max(1);
    // SAFETY: each task writes every value of its m' rows of w (one per sample).
    unsafe {
        fresh(m, w, |dst| {
            dst.par_chunks_mut(per_task * w).zip(src.par_chunks(per_task * d * w)).for_each(|(o, s)| {
                let mut part = vec![0f32; w];
                let mut long = if d > F32_TERMS { vec![0f64; w] } else { Vec::new() };
                for (orow, sample) in o.chunks_mut(w).zip(s.chunks(d * w)) {
                    if d <= F32_TERMS {
                        part.fill(0.0);
                        for row in sample.chunks(w) {
                            for (acc, &x) in part.iter_mut().zip(row) {
                                *acc += x * x;
                            }
                        }
                        for (o, &p) in orow.iter_mut().zip(&part) {
                            o.write(p);
                        }
                        continue;
                    }
                    long.fill(0.0);
                    for block in sample.chunks(F32_TERMS * w) {
                        part.fill(0.0);
                        for row in block.chunks(w) {
                            for (acc, &x) in part.iter_mut().zip(row) {
                                *acc += x * x;
                            }
                        }
                        for (l, &p) in long.iter_mut().zip(&part) {
                            *l += f64::from(p);
                        }
                    }
                    for (o, &l) in orow.iter_mut().zip(&long) {
                        o.write(l as f32);
                    }
                }
            });
        })
    }
}

/// Longest f32 sum of squares in [`row_square_sums`] (relative error ≤ 64·2⁻²⁴ ≈ 4·10⁻⁶
/// worst case, ~10⁻⁷ typical); longer sums of draws go through f64.
pub(crate) const F32_TERMS: usize = 64;

/// `acc += part` element-wise, f32 into f64, both standard layout and the same shape.
pub(crate) fn add_into_f64(mut acc: ArrayViewMut2<'_, f64>, part: ArrayView2<'_, f32>) {
    assert_eq!(acc.dim(), part.dim(), "add_into_f64 shapes");
    let acc = acc.as_slice_mut().expect("standard layout");
    let part = part.as_slice().expect("standard layout");
    acc.par_chunks_mut(GRAIN).zip(part.par_chunks(GRAIN)).for_each(|(a, p)| {
        for (a, &p) in a.iter_mut().zip(p) {
            *a += f64::from(p);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid(m: usize, w: usize, k: f32) -> Array2<f32> {
        Array2::from_shape_fn((m, w), |(i, j)| ((i * 7 + j * 3) % 13) as f32 * k - 2.0)
    }

    /// Every pass equals its element-by-element definition through the scalar `Activation`
    /// methods, on shapes that split over several tasks with ragged last blocks; the
    /// activation in place gives the same bits as from a separate z.
    #[test]
    fn passes_equal_their_definitions() {
        let (m, w, ld) = (37, 600, 601);
        let z = grid(m, w, 0.37);
        let b: Vec<f32> = (0..w).map(|j| (j % 7) as f32 * 0.3 - 1.0).collect();
        for (phi, bias) in Activation::ALL.into_iter().flat_map(|phi| [(phi, None), (phi, Some(&b[..]))]) {
            // With a bias, φ is taken at z + b.
            let at = |i: usize, j: usize| z[[i, j]] + bias.map_or(0.0, |b| b[j]);
            for (want_d, want_sq) in [(true, true), (false, true), (true, false), (false, false)] {
                let parts = activate_parts(phi, z.view(), bias, ld, want_d, want_sq);
                // In place, from z in the first w columns of the m × ld output: the same bits.
                let mut za = Array2::<f32>::uninit((m, ld));
                for ((i, j), o) in za.indexed_iter_mut().filter(|((_, j), _)| *j < w) {
                    o.write(z[[i, j]]);
                }
                let inplace = activate_in_place(phi, za, w, bias, want_d, want_sq);
                let bits = |x: Option<&Array2<f32>>| x.map(|x| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
                assert_eq!(bits(Some(&inplace.a)), bits(Some(&parts.a)), "{phi} in place: φ");
                assert_eq!(bits(inplace.derivative.as_ref()), bits(parts.derivative.as_ref()), "{phi} in place: φ'");
                assert_eq!(bits(inplace.squares.as_ref()), bits(parts.squares.as_ref()), "{phi} in place: φ²");
                let a = &parts.a;
                assert_eq!((parts.derivative.is_some(), parts.squares.is_some()), (want_d, want_sq));
                for i in 0..m {
                    assert_eq!(a[[i, w]], 1.0, "bias column kept");
                    for j in 0..w {
                        assert_eq!(a[[i, j]], phi.apply(at(i, j)), "{phi} φ");
                        if let Some(d) = &parts.derivative {
                            let want = phi.derivative(at(i, j));
                            assert!((d[[i, j]] - want).abs() <= 2e-7 * want.abs().max(1.0), "{phi} φ' {} vs {want}", d[[i, j]]);
                        }
                    }
                    if let Some(sq) = &parts.squares {
                        for j in 0..ld {
                            assert_eq!(sq[[i, j]], a[[i, j]] * a[[i, j]], "{phi} φ²");
                        }
                    }
                }
            }
        }
        for d in [1, 3, F32_TERMS + 5] {
            let delta = grid(m * d, w, 0.11);
            let sums = row_square_sums(delta.view(), d);
            let scale = grid(m, w, 0.05);
            let mut scaled = delta.clone();
            scale_rows(scaled.view_mut(), scale.view(), d);
            for s in 0..m {
                for j in 0..w {
                    let exact: f64 = (0..d).map(|q| f64::from(delta[[s * d + q, j]]).powi(2)).sum();
                    assert!((f64::from(sums[[s, j]]) - exact).abs() <= 1e-6 * exact.max(1e-30), "Σδ² d = {d}");
                    for q in 0..d {
                        assert_eq!(scaled[[s * d + q, j]], delta[[s * d + q, j]] * scale[[s, j]]);
                    }
                }
            }
            // Scaling and summing in one pass: the same values, bit for bit.
            let mut fused = delta.clone();
            let fused_sums = scale_rows_and_square_sums(fused.view_mut(), scale.view(), d);
            assert_eq!(fused, scaled, "scaled rows, d = {d}");
            assert_eq!(fused_sums, row_square_sums(scaled.view(), d), "Σ of the scaled rows' squares, d = {d}");
        }
        let x = grid(m, w, 0.2);
        let mut acc = Array2::<f64>::from_elem((m, w), 0.5);
        add_into_f64(acc.view_mut(), x.view());
        for i in 0..m {
            for j in 0..w {
                assert_eq!(acc[[i, j]], 0.5 + f64::from(x[[i, j]]));
            }
        }
    }
}
