//! Damped solves (F + λI) x = b — the natural-gradient step x = (F + λI)⁻¹ ∇L.
//!
//! | form | method |
//! |---|---|
//! | full | Cholesky of F + λI (faer) |
//! | diag | x = b / (d + λ) |
//! | blocks | per-block Cholesky |
//! | KFAC | per layer, in the factors' eigenbases: (G ⊗ A + λI)⁻¹ = (U_G ⊗ U_A)(Λ_G ⊗ Λ_A + λI)⁻¹(U_G ⊗ U_A)ᵀ, i.e. X ↦ U_G [(U_Gᵀ X U_A) ⊘ (λᵢ μⱼ + λ)] U_Aᵀ |
//! | Gram | Cholesky of K + λI (a solve in sample space ℝᴺ) |
//! | any operator | [`conjugate_gradient`] on F + λI |
//!
//! Every [`Solution`] reports the true residual ‖(F + λI)x − b‖ for the direct methods
//! (one extra F·v) and CG's recursively updated residual for CG (no extra F·v; it tracks
//! the true one to rounding, Greenbaum, *Iterative Methods for Solving Linear Systems* §7.3).

use ndarray::Array2;
use serde::Serialize;

use super::dense::{cholesky_solve, symmetric_eigen};
use super::lanczos::check_finite_product;
use super::operator::ExplicitFisher;
use super::spectrum::check_damping;
use super::{check_len, dot, norm, FisherOperator};
use crate::error::{FisherError, Result};

/// A solution of (F + λI) x = b and how good it is.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Solution {
    /// x.
    pub x: Vec<f64>,
    /// ‖(F + λI)x − b‖₂ (for CG: the recursively updated residual).
    pub residual: f64,
    /// residual / ‖b‖ (0 for b = 0).
    pub relative_residual: f64,
    /// CG iterations (F·v products); `None` for direct methods.
    pub iterations: Option<usize>,
    /// Direct methods: always true. CG: whether the tolerance was met before the cap.
    pub converged: bool,
}

/// Options of [`conjugate_gradient`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CgOptions {
    /// Stop when ‖r‖ ≤ tol·‖b‖.
    pub tol: f64,
    /// Cap on iterations (F·v products).
    pub max_iterations: usize,
}

impl Default for CgOptions {
    /// tol 10⁻⁸, at most 1,000 iterations.
    fn default() -> Self {
        CgOptions { tol: 1e-8, max_iterations: 1000 }
    }
}

fn finish(op: &(impl FisherOperator + ?Sized), b: &[f64], damping: f64, x: Vec<f64>) -> Result<Solution> {
    let fx = op.apply(&x)?;
    let r: Vec<f64> = fx.iter().zip(&x).zip(b).map(|((f, xi), bi)| f + damping * xi - bi).collect();
    let residual = norm(&r);
    let bn = norm(b);
    Ok(Solution {
        x,
        residual,
        relative_residual: if bn > 0.0 { residual / bn } else { residual },
        iterations: None,
        converged: true,
    })
}

/// Conjugate gradient (Hestenes & Stiefel 1952) on (F + λI) x = b from x₀ = 0, for any
/// operator: one F·v per iteration, three P-vectors of memory. Converges in at most
/// rank(F) + 1 steps in exact arithmetic; the rate depends on √cond(F + λI), so λ > 0
/// matters for a singular F (with λ = 0, b must lie in the range of F). Not converging
/// within the cap is reported (`converged: false`), not an error.
pub fn conjugate_gradient(
    op: &(impl FisherOperator + ?Sized),
    b: &[f64],
    damping: f64,
    options: &CgOptions,
) -> Result<Solution> {
    check_damping(damping)?;
    check_len("b", b, op.dim())?;
    if options.tol.is_nan() || options.tol <= 0.0 {
        return Err(FisherError::InvalidInput(format!("CG tolerance must be > 0, got {}", options.tol)));
    }
    let bn = norm(b);
    let mut x = vec![0.0; b.len()];
    let mut r = b.to_vec();
    let mut p = r.clone();
    let mut rr = dot(&r, &r);
    let target = options.tol * bn;
    let mut iterations = 0;
    while rr.sqrt() > target && iterations < options.max_iterations {
        let mut ap = op.apply(&p)?;
        check_finite_product(&ap)?;
        iterations += 1;
        ap.iter_mut().zip(&p).for_each(|(a, pi)| *a += damping * pi);
        let pap = dot(&p, &ap);
        if pap.is_nan() || pap <= 0.0 {
            return Err(FisherError::InvalidInput(format!(
                "CG met a direction of non-positive curvature pᵀ(F + λI)p = {pap:e} at iteration {iterations}: \
                 F + λI is singular (use damping > 0) or the operator is not PSD"
            )));
        }
        let step = rr / pap;
        x.iter_mut().zip(&p).for_each(|(xi, pi)| *xi += step * pi);
        r.iter_mut().zip(&ap).for_each(|(ri, a)| *ri -= step * a);
        let rr_new = dot(&r, &r);
        let ratio = rr_new / rr;
        p.iter_mut().zip(&r).for_each(|(pi, ri)| *pi = ri + ratio * *pi);
        rr = rr_new;
    }
    let residual = rr.sqrt();
    Ok(Solution {
        x,
        residual,
        relative_residual: if bn > 0.0 { residual / bn } else { residual },
        iterations: Some(iterations),
        converged: residual <= target,
    })
}

impl ExplicitFisher {
    /// Solves (F + λI) x = b directly (see the module table); for Gram, (K + λI) x = b in
    /// ℝᴺ. Errors when F + λI is not positive definite (a singular F with λ = 0).
    pub fn solve_damped(&self, b: &[f64], damping: f64) -> Result<Solution> {
        check_damping(damping)?;
        check_len("b", b, self.dim())?;
        let x = match self {
            ExplicitFisher::Full(f) => cholesky_solve("F", f.matrix(), damping, b)?,
            ExplicitFisher::Gram(g) => cholesky_solve("K", g.matrix(), damping, b)?,
            ExplicitFisher::Diagonal(d) => d
                .diagonal()
                .iter()
                .zip(b)
                .enumerate()
                .map(|(i, (&di, &bi))| {
                    let den = di + damping;
                    if den > 0.0 {
                        Ok(bi / den)
                    } else {
                        Err(FisherError::InvalidInput(format!(
                            "diag(F)[{i}] + λ = {den:e} is not positive; a singular F needs damping > 0"
                        )))
                    }
                })
                .collect::<Result<Vec<_>>>()?,
            ExplicitFisher::Blocks(blocks) => {
                let mut x = Vec::with_capacity(b.len());
                for (i, ((s, len), block)) in blocks.ranges().into_iter().zip(blocks.blocks()).enumerate() {
                    x.extend(cholesky_solve(&format!("block {i}"), block, damping, &b[s..s + len])?);
                }
                x
            }
            ExplicitFisher::Kfac(k) => {
                let mut x = vec![0.0; b.len()];
                for (l, ((s, len), layer)) in k.ranges().into_iter().zip(k.layers()).enumerate() {
                    let (lg, ug) = symmetric_eigen(&format!("G of layer {l}"), &layer.g)?;
                    let (la, ua) = symmetric_eigen(&format!("A of layer {l}"), &layer.a)?;
                    let rhs = layer.gather_augmented(&b[s..s + len]);
                    let mut z: Array2<f64> = ug.t().dot(&rhs).dot(&ua);
                    for ((i, j), v) in z.indexed_iter_mut() {
                        let den = lg[i] * la[j] + damping;
                        if den.is_nan() || den <= 0.0 {
                            return Err(FisherError::InvalidInput(format!(
                                "KFAC layer {l}: λ(G)·μ(A) + λ = {den:e} is not positive; use damping > 0"
                            )));
                        }
                        *v /= den;
                    }
                    let solved = ug.dot(&z).dot(&ua.t());
                    layer.scatter_augmented(solved.view(), &mut x[s..s + len]);
                }
                x
            }
        };
        finish(self, b, damping, x)
    }
}
