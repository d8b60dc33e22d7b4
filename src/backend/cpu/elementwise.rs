//! The element-wise passes of the CPU network path, on contiguous row-major f32 slices.
//!
//! Each pass resolves the activation once, outside its loop, so that the loop body is one
//! monomorphic closure the compiler vectorizes, and runs in parallel over blocks of whole
//! rows. The ndarray `Zip` loops they replace matched on the activation per element and
//! indexed rows through views: in `perf` they took 33% of W3's true diag, 25% of its KFAC
//! and 50% of its empirical diag (784-512-512-10, N = 4096), more than the GEMMs did.

use ndarray::{Array2, ArrayView2, ArrayViewMut2};
use rayon::prelude::*;

use crate::model::Activation;

/// Elements per parallel task: big enough that a task costs more than rayon's hand-off
/// (~1 µs), small enough to split a 4096 × 512 pass over every core.
const GRAIN: usize = 1 << 14;

/// Rows per task for rows of `width` elements (at least one row).
fn rows_per_task(width: usize) -> usize {
    (GRAIN / width.max(1)).max(1)
}

/// Runs `body` with the activation's f32 function (`derivative = false`) or its derivative
/// as a concrete closure type, so that each arm compiles to its own vectorized loop.
macro_rules! with_fn {
    ($phi:expr, |$f:ident| $body:expr) => {
        match $phi {
            Activation::Relu => {
                let $f = |x: f32| x.max(0.0);
                $body
            }
            Activation::Tanh => {
                let $f = |x: f32| x.tanh();
                $body
            }
            Activation::Sigmoid => {
                let $f = |x: f32| Activation::Sigmoid.apply(x);
                $body
            }
            Activation::Gelu => {
                let $f = |x: f32| Activation::Gelu.apply(x);
                $body
            }
            Activation::Identity => {
                let $f = |x: f32| x;
                $body
            }
        }
    };
}

/// `dst[r, ..w] = φ(z[r, ..])` for z m × w and dst m × ld (ld ≥ w; the columns past w, the
/// bias column of ones, are left alone). Both standard layout.
pub(crate) fn activate(phi: Activation, z: ArrayView2<'_, f32>, mut dst: ArrayViewMut2<'_, f32>) {
    let (m, w) = z.dim();
    let ld = dst.ncols();
    assert!(dst.nrows() == m && ld >= w, "activate shapes");
    let z = z.as_slice().expect("standard layout");
    let dst = dst.as_slice_mut().expect("standard layout");
    let rows = rows_per_task(w);
    with_fn!(phi, |f| {
        dst.par_chunks_mut(rows * ld).zip(z.par_chunks(rows * w)).for_each(|(d, z)| {
            for (drow, zrow) in d.chunks_mut(ld).zip(z.chunks(w)) {
                for (o, &x) in drow[..w].iter_mut().zip(zrow) {
                    *o = f(x);
                }
            }
        });
    });
}

/// φ'(z) (m × w), from the pre-activations z and, where cheaper, the activations a
/// (m × ld, ld ≥ w, the first w columns φ(z)): tanh' = 1 − a², σ' = a(1 − a), so that no
/// transcendental function is evaluated twice.
pub(crate) fn derivative(phi: Activation, z: ArrayView2<'_, f32>, a: ArrayView2<'_, f32>) -> Array2<f32> {
    let (m, w) = z.dim();
    let ld = a.ncols();
    assert!(a.nrows() == m && ld >= w, "derivative shapes");
    let mut out = Array2::<f32>::zeros((m, w));
    let zs = z.as_slice().expect("standard layout");
    let as_ = a.as_slice().expect("standard layout");
    let rows = rows_per_task(w);
    let outs = out.as_slice_mut().expect("fresh array");
    macro_rules! from_z {
        ($f:expr) => {
            outs.par_chunks_mut(rows * w).zip(zs.par_chunks(rows * w)).for_each(|(o, z)| {
                for (o, &x) in o.iter_mut().zip(z) {
                    *o = $f(x);
                }
            })
        };
    }
    macro_rules! from_a {
        ($f:expr) => {
            outs.par_chunks_mut(rows * w).zip(as_.par_chunks(rows * ld)).for_each(|(o, a)| {
                for (orow, arow) in o.chunks_mut(w).zip(a.chunks(ld)) {
                    for (o, &y) in orow.iter_mut().zip(&arow[..w]) {
                        *o = $f(y);
                    }
                }
            })
        };
    }
    match phi {
        Activation::Relu => from_z!(|x: f32| if x > 0.0 { 1.0f32 } else { 0.0 }),
        Activation::Tanh => from_a!(|y: f32| 1.0 - y * y),
        Activation::Sigmoid => from_a!(|y: f32| y * (1.0 - y)),
        Activation::Gelu => from_z!(|x: f32| Activation::Gelu.derivative(x)),
        Activation::Identity => outs.fill(1.0),
    }
    out
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

/// Σ_q δ_{s·d+q}² per sample s (m × w) for δ (m·d) × w standard layout: f32 sums of at most
/// [`F32_TERMS`] squares, added in f64 when d is longer, rounded once to f32.
pub(crate) fn row_square_sums(delta: ArrayView2<'_, f32>, d: usize) -> Array2<f32> {
    let w = delta.ncols();
    assert!(d > 0 && delta.nrows() % d == 0, "row_square_sums shapes");
    let m = delta.nrows() / d;
    let mut out = Array2::<f32>::zeros((m, w));
    let src = delta.as_slice().expect("standard layout");
    let dst = out.as_slice_mut().expect("fresh array");
    let per_task = rows_per_task(w * d).max(1);
    dst.par_chunks_mut(per_task * w).zip(src.par_chunks(per_task * d * w)).for_each(|(o, s)| {
        let mut part = vec![0f32; w];
        let mut long = if d > F32_TERMS { vec![0f64; w] } else { Vec::new() };
        for (orow, sample) in o.chunks_mut(w).zip(s.chunks(d * w)) {
            if d <= F32_TERMS {
                orow.fill(0.0);
                for row in sample.chunks(w) {
                    for (acc, &x) in orow.iter_mut().zip(row) {
                        *acc += x * x;
                    }
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
                *o = l as f32;
            }
        }
    });
    out
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

/// x ∘ x element-wise (standard layout in and out).
pub(crate) fn squares(x: ArrayView2<'_, f32>) -> Array2<f32> {
    let mut out = Array2::<f32>::zeros(x.dim());
    let src = x.as_slice().expect("standard layout");
    out.as_slice_mut().expect("fresh array").par_chunks_mut(GRAIN).zip(src.par_chunks(GRAIN)).for_each(|(o, s)| {
        for (o, &v) in o.iter_mut().zip(s) {
            *o = v * v;
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid(m: usize, w: usize, k: f32) -> Array2<f32> {
        Array2::from_shape_fn((m, w), |(i, j)| ((i * 7 + j * 3) % 13) as f32 * k - 2.0)
    }

    /// Every pass equals its element-by-element definition through the scalar `Activation`
    /// methods, on shapes that split over several tasks with ragged last blocks.
    #[test]
    fn passes_equal_their_definitions() {
        let (m, w, ld) = (37, 600, 601);
        let z = grid(m, w, 0.37);
        for phi in Activation::ALL {
            let mut a = Array2::<f32>::ones((m, ld));
            activate(phi, z.view(), a.view_mut());
            let d = derivative(phi, z.view(), a.view());
            for i in 0..m {
                assert_eq!(a[[i, w]], 1.0, "bias column kept");
                for j in 0..w {
                    assert_eq!(a[[i, j]], phi.apply(z[[i, j]]), "{phi} φ");
                    let want = phi.derivative(z[[i, j]]);
                    assert!((d[[i, j]] - want).abs() <= 2e-7 * want.abs().max(1.0), "{phi} φ' {} vs {want}", d[[i, j]]);
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
        }
        let x = grid(m, w, 0.2);
        let mut acc = Array2::<f64>::from_elem((m, w), 0.5);
        add_into_f64(acc.view_mut(), x.view());
        let sq = squares(x.view());
        for i in 0..m {
            for j in 0..w {
                assert_eq!(acc[[i, j]], 0.5 + f64::from(x[[i, j]]));
                assert_eq!(sq[[i, j]], x[[i, j]] * x[[i, j]]);
            }
        }
    }
}
