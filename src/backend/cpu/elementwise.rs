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

/// [φ(z) | 1]: an m × ld array whose first w columns are φ(z) (z m × w, ld ≥ w) and whose
/// columns past w (the bias column of an augmented activation) are 1.
pub(crate) fn activate(phi: Activation, z: ArrayView2<'_, f32>, ld: usize) -> Array2<f32> {
    let (m, w) = z.dim();
    assert!(ld >= w, "activate shapes");
    let z = z.as_standard_layout();
    let z = z.as_slice().expect("standard layout");
    let rows = rows_per_task(w);
    // SAFETY: every row's first w values are φ(z), the rest 1.
    unsafe {
        fresh(m, ld, |dst| {
            with_fn!(phi, |f| {
                dst.par_chunks_mut(rows * ld).zip(z.par_chunks(rows * w)).for_each(|(d, z)| {
                    for (drow, zrow) in d.chunks_mut(ld).zip(z.chunks(w)) {
                        for (o, &x) in drow[..w].iter_mut().zip(zrow) {
                            o.write(f(x));
                        }
                        for o in &mut drow[w..] {
                            o.write(1.0);
                        }
                    }
                });
            })
        })
    }
}

/// φ'(z) (m × w), from the pre-activations z and, where cheaper, the activations a
/// (m × ld, ld ≥ w, the first w columns φ(z)): tanh' = 1 − a², σ' = a(1 − a), so that no
/// transcendental function is evaluated twice.
pub(crate) fn derivative(phi: Activation, z: ArrayView2<'_, f32>, a: ArrayView2<'_, f32>) -> Array2<f32> {
    let (m, w) = z.dim();
    let ld = a.ncols();
    assert!(a.nrows() == m && ld >= w, "derivative shapes");
    let zs = z.as_slice().expect("standard layout");
    let as_ = a.as_slice().expect("standard layout");
    let rows = rows_per_task(w);
    macro_rules! from_z {
        ($outs:expr, $f:expr) => {
            $outs.par_chunks_mut(rows * w).zip(zs.par_chunks(rows * w)).for_each(|(o, z)| {
                for (o, &x) in o.iter_mut().zip(z) {
                    o.write($f(x));
                }
            })
        };
    }
    macro_rules! from_a {
        ($outs:expr, $f:expr) => {
            $outs.par_chunks_mut(rows * w).zip(as_.par_chunks(rows * ld)).for_each(|(o, a)| {
                for (orow, arow) in o.chunks_mut(w).zip(a.chunks(ld)) {
                    for (o, &y) in orow.iter_mut().zip(&arow[..w]) {
                        o.write($f(y));
                    }
                }
            })
        };
    }
    // SAFETY: each arm writes all m·w values (m rows of w from z, or of ld ≥ w from a).
    unsafe {
        fresh(m, w, |outs| match phi {
            Activation::Relu => from_z!(outs, |x: f32| if x > 0.0 { 1.0f32 } else { 0.0 }),
            Activation::Tanh => from_a!(outs, |y: f32| 1.0 - y * y),
            Activation::Sigmoid => from_a!(outs, |y: f32| y * (1.0 - y)),
            Activation::Gelu => from_z!(outs, |x: f32| Activation::Gelu.derivative(x)),
            Activation::Identity => from_z!(outs, |_: f32| 1.0f32),
        })
    }
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

/// x ∘ x element-wise (standard layout in and out).
pub(crate) fn squares(x: ArrayView2<'_, f32>) -> Array2<f32> {
    let (m, w) = x.dim();
    let src = x.as_slice().expect("standard layout");
    // SAFETY: the chunks of the output and of x pair up one to one and cover both.
    unsafe {
        fresh(m, w, |out| {
            out.par_chunks_mut(GRAIN).zip(src.par_chunks(GRAIN)).for_each(|(o, s)| {
                for (o, &v) in o.iter_mut().zip(s) {
                    o.write(v * v);
                }
            })
        })
    }
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
            let a = activate(phi, z.view(), ld);
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
