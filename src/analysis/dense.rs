//! Dense f64 kernels, delegated to faer (symmetric eigendecomposition, Cholesky): the one
//! place this module touches faer's types, so the rest speaks ndarray and slices.
//!
//! faer's symmetric eigensolver reduces to tridiagonal form and runs divide and conquer /
//! implicit QR (LAPACK's `dsyevd` scheme): backward stable, eigenvalue errors ≤ c·P·ε·‖A‖₂.

use faer::linalg::solvers::Solve;
use faer::{Mat, Side};
use ndarray::Array2;

use crate::error::{FisherError, Result};

/// Checks that `a` is square and finite (faer asserts squareness, and a NaN would make its
/// iterations meaningless): input-dependent, so an error rather than a panic.
fn check_symmetric_input(what: &str, a: &Array2<f64>) -> Result<()> {
    if !a.is_square() {
        return Err(FisherError::InvalidInput(format!("{what} must be square, got {:?}", a.dim())));
    }
    if let Some(((i, j), v)) = a.indexed_iter().find(|(_, v)| !v.is_finite()) {
        return Err(FisherError::InvalidInput(format!("{what} has a non-finite entry {v} at [{i}, {j}]")));
    }
    Ok(())
}

/// The lower triangle of `a` (+ `shift` on the diagonal) as a faer matrix; faer reads only
/// the lower triangle with `Side::Lower`, so a symmetric input is taken as symmetric.
fn to_faer(a: &Array2<f64>, shift: f64) -> Mat<f64> {
    Mat::from_fn(a.nrows(), a.ncols(), |i, j| a[[i, j]] + if i == j { shift } else { 0.0 })
}

/// Eigenvalues of the symmetric matrix `a` (lower triangle read), ascending.
pub(crate) fn symmetric_eigenvalues(what: &str, a: &Array2<f64>) -> Result<Vec<f64>> {
    check_symmetric_input(what, a)?;
    if a.nrows() == 0 {
        return Ok(Vec::new());
    }
    to_faer(a, 0.0)
        .self_adjoint_eigenvalues(Side::Lower)
        .map_err(|e| FisherError::InvalidInput(format!("eigensolver failed on {what}: {e:?}")))
}

/// Eigenvalues (ascending) and orthonormal eigenvectors (as the columns of the returned
/// matrix) of the symmetric matrix `a` (lower triangle read).
pub(crate) fn symmetric_eigen(what: &str, a: &Array2<f64>) -> Result<(Vec<f64>, Array2<f64>)> {
    check_symmetric_input(what, a)?;
    let n = a.nrows();
    if n == 0 {
        return Ok((Vec::new(), Array2::zeros((0, 0))));
    }
    let evd = to_faer(a, 0.0)
        .self_adjoint_eigen(Side::Lower)
        .map_err(|e| FisherError::InvalidInput(format!("eigensolver failed on {what}: {e:?}")))?;
    let s = evd.S().column_vector();
    let values: Vec<f64> = (0..n).map(|i| s[i]).collect();
    let u = evd.U();
    let vectors = Array2::from_shape_fn((n, n), |(i, j)| u[(i, j)]);
    Ok((values, vectors))
}

/// Solves (A + shift·I) x = b by Cholesky (A symmetric, lower triangle read). Errors when
/// A + shift·I is not numerically positive definite (a singular F needs shift > 0).
pub(crate) fn cholesky_solve(what: &str, a: &Array2<f64>, shift: f64, b: &[f64]) -> Result<Vec<f64>> {
    check_symmetric_input(what, a)?;
    let n = a.nrows();
    if b.len() != n {
        return Err(FisherError::InvalidInput(format!(
            "{what}: right-hand side has length {} but the matrix is {n}×{n}",
            b.len()
        )));
    }
    if n == 0 {
        return Ok(Vec::new());
    }
    let llt = to_faer(a, shift).llt(Side::Lower).map_err(|e| {
        FisherError::InvalidInput(format!(
            "{what} + {shift:e}·I is not positive definite ({e:?}); a singular Fisher matrix needs damping > 0"
        ))
    })?;
    let rhs = Mat::from_fn(n, 1, |i, _| b[i]);
    let x = llt.solve(&rhs);
    Ok((0..n).map(|i| x[(i, 0)]).collect())
}

/// Cholesky factor L (lower, A = L Lᵀ) of a small symmetric positive definite matrix, by the
/// plain textbook loop (for the m×m Gram matrices of Lanczos bases, m ≤ a few hundred).
pub(crate) fn cholesky_lower(a: &Array2<f64>) -> Result<Array2<f64>> {
    let n = a.nrows();
    let mut l = Array2::<f64>::zeros((n, n));
    for j in 0..n {
        let mut d = a[[j, j]];
        for k in 0..j {
            d -= l[[j, k]] * l[[j, k]];
        }
        if d.is_nan() || d <= 0.0 {
            return Err(FisherError::InvalidInput(format!(
                "Lanczos basis lost linear independence at vector {j} (pivot {d:e})"
            )));
        }
        let d = d.sqrt();
        l[[j, j]] = d;
        for i in j + 1..n {
            let mut s = a[[i, j]];
            for k in 0..j {
                s -= l[[i, k]] * l[[j, k]];
            }
            l[[i, j]] = s / d;
        }
    }
    Ok(l)
}

/// Rayleigh–Ritz for the pencil (H, M) with M = L Lᵀ symmetric positive definite:
/// C = L⁻¹ H L⁻ᵀ = Z Θ Zᵀ, Y = L⁻ᵀ Z. Returns Θ descending and Y (columns M-orthonormal,
/// in the same order).
pub(crate) fn generalized_eigen(h: &Array2<f64>, m: &Array2<f64>) -> Result<(Vec<f64>, Array2<f64>)> {
    let n = h.nrows();
    let l = cholesky_lower(m)?;
    // X = L⁻¹ H (forward substitution on each column), then C = L⁻¹ Xᵀ (H symmetric).
    let forward = |b: &Array2<f64>| {
        let mut x = b.clone();
        for col in 0..n {
            for i in 0..n {
                let mut s = x[[i, col]];
                for k in 0..i {
                    s -= l[[i, k]] * x[[k, col]];
                }
                x[[i, col]] = s / l[[i, i]];
            }
        }
        x
    };
    let x = forward(h);
    let mut c = forward(&x.t().to_owned());
    // Symmetrize what rounding left unsymmetric.
    for i in 0..n {
        for j in 0..i {
            let v = 0.5 * (c[[i, j]] + c[[j, i]]);
            c[[i, j]] = v;
            c[[j, i]] = v;
        }
    }
    let (values, z) = symmetric_eigen("the Rayleigh–Ritz matrix", &c)?;
    // Y = L⁻ᵀ Z (back substitution), reordered descending.
    let mut y = Array2::<f64>::zeros((n, n));
    for (out, col) in (0..n).rev().enumerate() {
        for i in (0..n).rev() {
            let mut s = z[[i, col]];
            for k in i + 1..n {
                s -= l[[k, i]] * y[[k, out]];
            }
            y[[i, out]] = s / l[[i, i]];
        }
    }
    let values = values.into_iter().rev().collect();
    Ok((values, y))
}
