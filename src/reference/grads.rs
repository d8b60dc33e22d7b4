//! The f64 reference: simple, slow, correct. It is the oracle of every test and of `--verify`.
//!
//! Every form is computed from its definition (see [`crate::fisher`]) with
//!
//! * products of two f32 values formed in f64, where they are **exact** (a 24-bit × 24-bit
//!   significand product needs at most 48 of f64's 53 bits), and
//! * sums over samples (or, for [`Form::Gram`] and [`Form::SampleNorms`], over parameters)
//!   taken in f64 with Neumaier's compensated summation, whose error is bounded by
//!   2·u₆₄·|sum| + O(n·u₆₄²)·Σ|terms| independently of the order and of n in practice
//!   (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., §4.3),
//! * the division by N done once, at the end, in f64. [`Form::SampleNorms`] is not divided.
//!
//! So the reference is accurate to about 1e-16 relative, some eight orders of magnitude
//! better than any f32 result it judges.
//!
//! The only concession to speed is the loop order: output row i of F = GᵀG is built by
//! streaming over the samples k and adding `G[k,i]·G[k,j]` into a row of accumulators for all
//! j ≥ i at once, so that the inner loop runs over contiguous memory and vectorizes; a few
//! rows share each pass over the samples, and groups of rows run in parallel with rayon.
//! The summation order of every entry is the same whatever the grouping (k = 0, 1, …). The lower triangle is a copy of the
//! upper one, so Full and Gram results are exactly symmetric.

use ndarray::{s, Array1, Array2, ArrayView2};
use rayon::prelude::*;

use crate::error::Result;
use crate::fisher::{FisherMatrix, Form};
use crate::validate::check_matrix;

/// Reduces `grads` (N×P, row i = gᵢ) to `form` in f64 with compensated summation.
///
/// Checks its input like the engine does: an empty matrix, a NaN/±Inf entry or block sizes
/// that do not sum to P are errors.
///
/// ```
/// use fisher_engine::{reference::grads as reference, FisherMatrix, Form};
/// use ndarray::array;
/// // g₁ = (1, 2), g₂ = (3, 4): F = (g₁g₁ᵀ + g₂g₂ᵀ)/2 = [[5, 7], [7, 10]].
/// let g = array![[1.0f32, 2.0], [3.0, 4.0]];
/// let FisherMatrix::Full(f) = reference::reduce(g.view(), &Form::Full)? else { unreachable!() };
/// assert_eq!(f, array![[5.0, 7.0], [7.0, 10.0]]);
/// # Ok::<(), fisher_engine::FisherError>(())
/// ```
pub fn reduce(grads: ArrayView2<'_, f32>, form: &Form) -> Result<FisherMatrix<f64>> {
    check_matrix("gradients", grads, 0)?;
    form.validate(grads.ncols())?;
    let n = grads.nrows() as f64;
    // Row-major, so that a sample's gradient (a row) is one contiguous slice.
    let g = grads.as_standard_layout();
    Ok(match form {
        Form::Full => FisherMatrix::Full(sum_of_outer_products(g.view()) / n),
        Form::Diagonal => FisherMatrix::Diagonal(column_sums_of_squares(g.view()) / n),
        Form::BlockDiagonal(sizes) => FisherMatrix::BlockDiagonal(
            form.block_starts()
                .iter()
                .zip(sizes)
                .map(|(&start, &size)| {
                    sum_of_outer_products(g.slice(s![.., start..start + size])) / n
                })
                .collect(),
        ),
        Form::Gram => {
            // K = G Gᵀ / N = (Gᵀ)ᵀ(Gᵀ) / N: the same sum of outer products, over parameters.
            let gt = g.t().as_standard_layout().to_owned();
            FisherMatrix::Gram(sum_of_outer_products(gt.view()) / n)
        }
        Form::SampleNorms => FisherMatrix::SampleNorms(
            g.outer_iter()
                .map(|row| {
                    let mut sum = Neumaier::default();
                    for &x in row {
                        sum.add(f64::from(x) * f64::from(x));
                    }
                    sum.total()
                })
                .collect(),
        ),
    })
}

/// AᵀA = Σₖ aₖ aₖᵀ over the rows aₖ of `a` (K×M), in f64 with one Neumaier accumulator per
/// entry; exactly symmetric. Not divided by anything.
fn sum_of_outer_products(a: ArrayView2<'_, f32>) -> Array2<f64> {
    let m = a.ncols();
    // Output rows are built ROWS_PER_PASS at a time, so that each pass over the K rows of
    // `a` (which do not fit in cache at the `--verify` sizes) feeds several of them.
    const ROWS_PER_PASS: usize = 4;
    // upper[i] holds entries (i, i..m).
    let upper: Vec<Vec<f64>> = (0..m.div_ceil(ROWS_PER_PASS))
        .into_par_iter()
        .flat_map_iter(|pass| {
            let rows = pass * ROWS_PER_PASS..((pass + 1) * ROWS_PER_PASS).min(m);
            let mut sums: Vec<Vec<Neumaier>> = rows.clone().map(|i| vec![Neumaier::default(); m - i]).collect();
            for a_k in a.outer_iter() {
                for (i, sums_i) in rows.clone().zip(&mut sums) {
                    let a_ki = f64::from(a_k[i]);
                    for (sum, &a_kj) in sums_i.iter_mut().zip(a_k.slice(s![i..])) {
                        sum.add(a_ki * f64::from(a_kj));
                    }
                }
            }
            sums.into_iter().map(|row| row.iter().map(Neumaier::total).collect::<Vec<f64>>())
        })
        .collect();
    let mut out = Array2::zeros((m, m));
    for (i, row) in upper.iter().enumerate() {
        for (offset, &value) in row.iter().enumerate() {
            out[[i, i + offset]] = value;
            out[[i + offset, i]] = value;
        }
    }
    out
}

/// Σₖ `A[k,j]`² for every column j, in f64 with Neumaier summation.
fn column_sums_of_squares(a: ArrayView2<'_, f32>) -> Array1<f64> {
    let mut sums = vec![Neumaier::default(); a.ncols()];
    for row in a.outer_iter() {
        for (sum, &x) in sums.iter_mut().zip(row) {
            sum.add(f64::from(x) * f64::from(x));
        }
    }
    sums.iter().map(Neumaier::total).collect()
}

/// Neumaier's variant of Kahan summation: a running sum plus a running compensation that
/// captures the low-order bits lost by each addition, whichever operand is larger.
#[derive(Debug, Clone, Copy, Default)]
struct Neumaier {
    sum: f64,
    compensation: f64,
}

impl Neumaier {
    #[inline]
    fn add(&mut self, x: f64) {
        let t = self.sum + x;
        // (a + b) − t recovers the rounding error of t exactly when |a| ≥ |b| (Fast2Sum).
        self.compensation += if self.sum.abs() >= x.abs() {
            (self.sum - t) + x
        } else {
            (x - t) + self.sum
        };
        self.sum = t;
    }

    #[inline]
    fn total(&self) -> f64 {
        self.sum + self.compensation
    }
}
