//! Fisher matrices as linear operators: what every analysis needs is F·v.
//!
//! [`FisherOperator`] is the one abstraction; each stored form implements it without
//! expanding anything (KFAC applies G ⊗ A as G X Aᵀ), and [`FnOperator`] wraps any closure —
//! the implicit network F·v of the engine, on the GPU or the CPU. [`ExplicitFisher`] gathers
//! the stored forms, for which spectra, log-determinants and solves are exact.

use ndarray::{Array1, Array2, ArrayView2};
use rayon::prelude::*;

use super::{check_len, dot, LayerShape, ParameterLayout};
use crate::error::{FisherError, Result};
use crate::fisher::FisherMatrix;
use crate::fisher::{augmented_to_pytorch, KfacFactors, NetFisher};

/// A symmetric positive semi-definite operator v ↦ F v on ℝ^dim.
///
/// Implementations validate the length of `v` and return [`FisherError::InvalidInput`] on a
/// mismatch; errors of an implicit F·v (device errors) pass through.
pub trait FisherOperator {
    /// The dimension: P for F, N for the Gram matrix.
    fn dim(&self) -> usize;

    /// F v.
    fn apply(&self, v: &[f64]) -> Result<Vec<f64>>;

    /// F vⱼ for a block of vectors. An implicit operator computes the block in one pass over
    /// the data (one GEMM where a single product has a GEMV, the forward pass shared); the
    /// default applies the vectors one at a time.
    fn apply_block(&self, vs: &[Vec<f64>]) -> Result<Vec<Vec<f64>>> {
        vs.iter().map(|v| self.apply(v)).collect()
    }

    /// vᵀ F v (by default through [`FisherOperator::apply`]; an implementation may have a
    /// cheaper way, e.g. (1/N) Σᵢ (gᵢᵀ v)² without forming F v).
    fn quadratic(&self, v: &[f64]) -> Result<f64> {
        let fv = self.apply(v)?;
        Ok(dot(v, &fv))
    }

    /// tr F when it is known exactly (stored forms always; an implicit operator when the
    /// caller supplies it, e.g. the mean of the per-sample norms). `None`: estimate it.
    fn trace(&self) -> Option<f64> {
        None
    }

    /// An upper bound on rank F when one is known (e.g. N·R rows of a square-root factor):
    /// when it is below [`FisherOperator::dim`], λ_min(F) = 0 exactly.
    fn rank_bound(&self) -> Option<usize> {
        None
    }
}

impl<T: FisherOperator + ?Sized> FisherOperator for &T {
    fn dim(&self) -> usize {
        (**self).dim()
    }
    fn apply(&self, v: &[f64]) -> Result<Vec<f64>> {
        (**self).apply(v)
    }
    fn apply_block(&self, vs: &[Vec<f64>]) -> Result<Vec<Vec<f64>>> {
        (**self).apply_block(vs)
    }
    fn quadratic(&self, v: &[f64]) -> Result<f64> {
        (**self).quadratic(v)
    }
    fn trace(&self) -> Option<f64> {
        (**self).trace()
    }
    fn rank_bound(&self) -> Option<usize> {
        (**self).rank_bound()
    }
}

/// Widens a matrix to f64, checking that it is square and finite.
fn widen_square<T: Copy + Into<f64>>(what: &str, m: &Array2<T>) -> Result<Array2<f64>> {
    if !m.is_square() {
        return Err(FisherError::InvalidInput(format!("{what} must be square, got {:?}", m.dim())));
    }
    let wide = m.mapv(Into::into);
    if let Some(((i, j), v)) = wide.indexed_iter().find(|(_, v)| !v.is_finite()) {
        return Err(FisherError::InvalidInput(format!("{what} has a non-finite entry {v} at [{i}, {j}]")));
    }
    Ok(wide)
}

/// Widens a square matrix that should be symmetric, checks it is (to 10⁻⁶ of max|m|, the
/// level of f32 rounding; stored forms of this crate are exactly symmetric) and makes it
/// exactly symmetric by averaging m and mᵀ.
fn widen_symmetric<T: Copy + Into<f64>>(what: &str, m: &Array2<T>) -> Result<Array2<f64>> {
    let mut a = widen_square(what, m)?;
    let scale = a.iter().fold(0.0f64, |acc, v| acc.max(v.abs()));
    let n = a.nrows();
    for i in 0..n {
        for j in 0..i {
            let (x, y) = (a[[i, j]], a[[j, i]]);
            if (x - y).abs() > 1e-6 * scale {
                return Err(FisherError::InvalidInput(format!(
                    "{what} is not symmetric: [{i}, {j}] = {x:e} but [{j}, {i}] = {y:e}"
                )));
            }
            let mean = 0.5 * (x + y);
            a[[i, j]] = mean;
            a[[j, i]] = mean;
        }
    }
    Ok(a)
}

/// y = M v for a dense f64 matrix (rows in parallel for large matrices).
fn dense_apply(m: &Array2<f64>, v: &[f64]) -> Vec<f64> {
    let rows = m.nrows();
    let work =
        |i: usize| m.row(i).as_slice().map_or_else(|| m.row(i).iter().zip(v).map(|(a, b)| a * b).sum(), |r| dot(r, v));
    // Below ~64k entries a thread hand-off costs more than the row dots.
    if m.len() < 1 << 16 {
        (0..rows).map(work).collect()
    } else {
        (0..rows).into_par_iter().map(work).collect()
    }
}

/// Dense F (P×P), stored in f64.
#[derive(Debug, Clone, PartialEq)]
pub struct DenseOperator {
    f: Array2<f64>,
}

impl DenseOperator {
    /// From a symmetric matrix (f32 or f64), widened to f64 and made exactly symmetric.
    /// Errors when it is not square, not finite, or not symmetric to 10⁻⁶·max|F|.
    pub fn new<T: Copy + Into<f64>>(f: &Array2<T>) -> Result<Self> {
        Ok(DenseOperator { f: widen_symmetric("the Fisher matrix", f)? })
    }

    /// The stored matrix.
    pub fn matrix(&self) -> &Array2<f64> {
        &self.f
    }
}

impl FisherOperator for DenseOperator {
    fn dim(&self) -> usize {
        self.f.nrows()
    }
    fn apply(&self, v: &[f64]) -> Result<Vec<f64>> {
        check_len("v", v, self.dim())?;
        Ok(dense_apply(&self.f, v))
    }
    fn trace(&self) -> Option<f64> {
        Some(self.f.diag().sum())
    }
}

/// diag(F) as an operator (F treated as diagonal).
#[derive(Debug, Clone, PartialEq)]
pub struct DiagonalOperator {
    d: Vec<f64>,
}

impl DiagonalOperator {
    /// From the diagonal entries. Errors on a non-finite entry.
    pub fn new<T: Copy + Into<f64>>(d: &Array1<T>) -> Result<Self> {
        let d: Vec<f64> = d.iter().map(|&v| v.into()).collect();
        if let Some((i, v)) = d.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(FisherError::InvalidInput(format!("diag(F) has a non-finite entry {v} at [{i}]")));
        }
        Ok(DiagonalOperator { d })
    }

    /// The diagonal.
    pub fn diagonal(&self) -> &[f64] {
        &self.d
    }
}

impl FisherOperator for DiagonalOperator {
    fn dim(&self) -> usize {
        self.d.len()
    }
    fn apply(&self, v: &[f64]) -> Result<Vec<f64>> {
        check_len("v", v, self.dim())?;
        Ok(self.d.iter().zip(v).map(|(d, x)| d * x).collect())
    }
    fn trace(&self) -> Option<f64> {
        Some(self.d.iter().sum())
    }
}

/// Block-diagonal F: dense symmetric blocks on consecutive parameter ranges.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockDiagonalOperator {
    blocks: Vec<Array2<f64>>,
    offsets: Vec<usize>,
    dim: usize,
}

impl BlockDiagonalOperator {
    /// From the blocks in parameter order (each symmetric, see [`DenseOperator::new`]).
    pub fn new<T: Copy + Into<f64>>(blocks: &[Array2<T>]) -> Result<Self> {
        let mut offsets = Vec::with_capacity(blocks.len());
        let mut dim = 0;
        let wide = blocks
            .iter()
            .enumerate()
            .map(|(b, m)| {
                offsets.push(dim);
                dim += m.nrows();
                widen_symmetric(&format!("block {b}"), m)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(BlockDiagonalOperator { blocks: wide, offsets, dim })
    }

    /// The blocks.
    pub fn blocks(&self) -> &[Array2<f64>] {
        &self.blocks
    }

    /// The parameter ranges (start, len) of the blocks.
    pub fn ranges(&self) -> Vec<(usize, usize)> {
        self.offsets.iter().zip(&self.blocks).map(|(&s, b)| (s, b.nrows())).collect()
    }
}

impl FisherOperator for BlockDiagonalOperator {
    fn dim(&self) -> usize {
        self.dim
    }
    fn apply(&self, v: &[f64]) -> Result<Vec<f64>> {
        check_len("v", v, self.dim)?;
        let mut y = Vec::with_capacity(self.dim);
        for (b, &s) in self.blocks.iter().zip(&self.offsets) {
            y.extend(dense_apply(b, &v[s..s + b.nrows()]));
        }
        Ok(y)
    }
    fn trace(&self) -> Option<f64> {
        Some(self.blocks.iter().map(|b| b.diag().sum()).sum())
    }
}

/// One layer of a KFAC operator: factors in f64 and the layer's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct KfacLayer {
    /// Output-gradient factor G (out × out).
    pub g: Array2<f64>,
    /// Input factor A ((in+1)² with a bias, in² without).
    pub a: Array2<f64>,
    /// The layer's shape.
    pub shape: LayerShape,
    /// `perm[o·a + i]`: PyTorch index of augmented parameter (o, i) (see
    /// [`crate::fisher::augmented_to_pytorch`]).
    perm: Vec<usize>,
}

impl KfacLayer {
    /// Checks the factors against the shape (G out×out, A augmented_in²; square, finite,
    /// symmetric) and widens them to f64.
    pub fn new<T: Copy + Into<f64>>(factors: &KfacFactors<T>, shape: LayerShape) -> Result<Self> {
        let g = widen_symmetric("KFAC factor G", &factors.g)?;
        let a = widen_symmetric("KFAC factor A", &factors.a)?;
        if g.nrows() != shape.fan_out || a.nrows() != shape.augmented_in() {
            return Err(FisherError::InvalidInput(format!(
                "KFAC factors G {:?} and A {:?} do not fit a layer {} → {}{} (expected G {o}×{o}, A {a}×{a})",
                g.dim(),
                a.dim(),
                shape.fan_in,
                shape.fan_out,
                if shape.has_bias { " with bias" } else { "" },
                o = shape.fan_out,
                a = shape.augmented_in(),
            )));
        }
        let perm = augmented_to_pytorch(shape.fan_in, shape.fan_out, shape.has_bias);
        Ok(KfacLayer { g, a, shape, perm })
    }

    /// Gathers a PyTorch-order layer vector into the augmented matrix X (out × a),
    /// X[o, i] = v[perm[o·a + i]].
    pub(crate) fn gather_augmented(&self, v: &[f64]) -> Array2<f64> {
        let (out, a) = (self.shape.fan_out, self.shape.augmented_in());
        Array2::from_shape_fn((out, a), |(o, i)| v[self.perm[o * a + i]])
    }

    /// Scatters X (out × a) back to PyTorch order.
    pub(crate) fn scatter_augmented(&self, x: ArrayView2<'_, f64>, y: &mut [f64]) {
        let a = self.shape.augmented_in();
        for ((o, i), &value) in x.indexed_iter() {
            y[self.perm[o * a + i]] = value;
        }
    }
}

/// KFAC: per layer F_l ≈ G_l ⊗ A_l in the augmented order of [W | b], applied without
/// forming the Kronecker product.
///
/// With X the layer's slice of v reshaped to out × (in+1) in augmented order (row-major,
/// X[o, i] = v at augmented index o·(in+1) + i), (G ⊗ A) vec(X) = vec(G X Aᵀ): O(out·a·(out+a))
/// instead of O(out²·a²). The permutation to and from PyTorch order is that of
/// [`crate::fisher::kfac_expand`], so `apply` equals `kfac_expand(factors)·v` block by block.
#[derive(Debug, Clone, PartialEq)]
pub struct KfacOperator {
    layers: Vec<KfacLayer>,
    offsets: Vec<usize>,
    dim: usize,
}

impl KfacOperator {
    /// From per-layer factors and the layer shapes (same count, same order).
    pub fn new<T: Copy + Into<f64>>(factors: &[KfacFactors<T>], shapes: &[LayerShape]) -> Result<Self> {
        if factors.len() != shapes.len() || factors.is_empty() {
            return Err(FisherError::InvalidInput(format!(
                "KFAC needs one factor pair per layer: got {} pairs for {} layers",
                factors.len(),
                shapes.len()
            )));
        }
        let layers = factors.iter().zip(shapes).map(|(f, &s)| KfacLayer::new(f, s)).collect::<Result<Vec<_>>>()?;
        Ok(Self::from_layers(layers))
    }

    /// From already checked layers.
    pub fn from_layers(layers: Vec<KfacLayer>) -> Self {
        let mut offsets = Vec::with_capacity(layers.len());
        let mut dim = 0;
        for l in &layers {
            offsets.push(dim);
            dim += l.shape.num_params();
        }
        KfacOperator { layers, offsets, dim }
    }

    /// The layers.
    pub fn layers(&self) -> &[KfacLayer] {
        &self.layers
    }

    /// The parameter ranges (start, len) of the layers.
    pub fn ranges(&self) -> Vec<(usize, usize)> {
        self.offsets.iter().zip(&self.layers).map(|(&s, l)| (s, l.shape.num_params())).collect()
    }
}

impl FisherOperator for KfacOperator {
    fn dim(&self) -> usize {
        self.dim
    }
    fn apply(&self, v: &[f64]) -> Result<Vec<f64>> {
        check_len("v", v, self.dim)?;
        let mut y = vec![0.0; self.dim];
        for (layer, &s) in self.layers.iter().zip(&self.offsets) {
            let len = layer.shape.num_params();
            let x = layer.gather_augmented(&v[s..s + len]);
            // (G ⊗ A) vec(X) = vec(G X Aᵀ) for row-major vec.
            let gxa = layer.g.dot(&x).dot(&layer.a.t());
            layer.scatter_augmented(gxa.view(), &mut y[s..s + len]);
        }
        Ok(y)
    }
    fn trace(&self) -> Option<f64> {
        // tr(G ⊗ A) = tr G · tr A.
        Some(self.layers.iter().map(|l| l.g.diag().sum() * l.a.diag().sum()).sum())
    }
}

/// The Gram matrix K = G Gᵀ/N (N×N), the dual of F = GᵀG/N: it acts on ℝ^N (sample space),
/// and its non-zero eigenvalues are F's. `parameters` (P) lets measures of F be computed
/// from it (F has P − N more zero eigenvalues when P > N).
#[derive(Debug, Clone, PartialEq)]
pub struct GramOperator {
    k: Array2<f64>,
    parameters: Option<usize>,
}

impl GramOperator {
    /// From K (symmetric) and, when known, the number of parameters P of the primal F.
    pub fn new<T: Copy + Into<f64>>(k: &Array2<T>, parameters: Option<usize>) -> Result<Self> {
        Ok(GramOperator { k: widen_symmetric("the Gram matrix", k)?, parameters })
    }

    /// The stored matrix.
    pub fn matrix(&self) -> &Array2<f64> {
        &self.k
    }

    /// P of the primal F, when known.
    pub fn parameters(&self) -> Option<usize> {
        self.parameters
    }
}

impl FisherOperator for GramOperator {
    fn dim(&self) -> usize {
        self.k.nrows()
    }
    fn apply(&self, v: &[f64]) -> Result<Vec<f64>> {
        check_len("v", v, self.dim())?;
        Ok(dense_apply(&self.k, v))
    }
    fn trace(&self) -> Option<f64> {
        // tr K = tr F.
        Some(self.k.diag().sum())
    }
}

/// F = RᵀR / N from square-root rows R (rows × P, f32, e.g. [`NetFisher::Grads`] with R
/// rows per sample, or the per-sample gradient matrix), applied as Rᵀ(R v)/N in f64 without
/// forming F. rank F ≤ rows.
#[derive(Debug, Clone, PartialEq)]
pub struct FactorOperator {
    rows: Array2<f32>,
    samples: usize,
}

impl FactorOperator {
    /// From the rows and the number of samples N they are averaged over (rows = N·R).
    pub fn new(rows: Array2<f32>, samples: usize) -> Result<Self> {
        if samples == 0 {
            return Err(FisherError::InvalidInput("a factor operator needs N ≥ 1 samples".into()));
        }
        if let Some(((i, j), v)) = rows.indexed_iter().find(|(_, v)| !v.is_finite()) {
            return Err(FisherError::NonFinite { what: "factor rows".into(), row: i, col: j, value: *v });
        }
        Ok(FactorOperator { rows: rows.as_standard_layout().into_owned(), samples })
    }
}

impl FisherOperator for FactorOperator {
    fn dim(&self) -> usize {
        self.rows.ncols()
    }
    fn apply(&self, v: &[f64]) -> Result<Vec<f64>> {
        check_len("v", v, self.dim())?;
        let rv: Vec<f64> = self
            .rows
            .outer_iter()
            .into_par_iter()
            .map(|r| r.iter().zip(v).map(|(&a, &b)| f64::from(a) * b).sum::<f64>())
            .collect();
        let p = self.dim();
        let scale = 1.0 / self.samples as f64;
        // Rᵀ u column by column is strided; accumulate row-scaled rows per thread instead.
        let y = self
            .rows
            .outer_iter()
            .into_par_iter()
            .zip(rv.par_iter())
            .fold(
                || vec![0.0f64; p],
                |mut acc, (r, &u)| {
                    for (a, &x) in acc.iter_mut().zip(r.iter()) {
                        *a += f64::from(x) * u;
                    }
                    acc
                },
            )
            .reduce(
                || vec![0.0f64; p],
                |mut a, b| {
                    for (x, y) in a.iter_mut().zip(&b) {
                        *x += y;
                    }
                    a
                },
            );
        Ok(y.into_iter().map(|x| x * scale).collect())
    }
    fn quadratic(&self, v: &[f64]) -> Result<f64> {
        check_len("v", v, self.dim())?;
        // vᵀFv = ‖R v‖² / N: one pass, no P-vector.
        let s: f64 = self
            .rows
            .outer_iter()
            .into_par_iter()
            .map(|r| r.iter().zip(v).map(|(&a, &b)| f64::from(a) * b).sum::<f64>().powi(2))
            .sum();
        Ok(s / self.samples as f64)
    }
    fn trace(&self) -> Option<f64> {
        Some(self.rows.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / self.samples as f64)
    }
    fn rank_bound(&self) -> Option<usize> {
        Some(self.rows.nrows())
    }
}

type ApplyFn<'a> = Box<dyn Fn(&[f64]) -> Result<Vec<f64>> + 'a>;
type QuadraticFn<'a> = Box<dyn Fn(&[f64]) -> Result<f64> + 'a>;

/// An operator given by a closure v ↦ F v: the way to analyse an implicit Fisher (e.g. the
/// engine's network F·v on the GPU) that is never formed.
///
/// ```
/// use fisher_engine::analysis::{FisherOperator, FnOperator};
/// let op = FnOperator::new(3, |v: &[f64]| Ok(v.iter().map(|x| 2.0 * x).collect())).with_trace(6.0);
/// assert_eq!(op.apply(&[1.0, 2.0, 3.0])?, vec![2.0, 4.0, 6.0]);
/// assert_eq!(op.quadratic(&[1.0, 0.0, 0.0])?, 2.0);
/// # Ok::<(), fisher_engine::FisherError>(())
/// ```
pub struct FnOperator<'a> {
    dim: usize,
    apply: ApplyFn<'a>,
    quadratic: Option<QuadraticFn<'a>>,
    trace: Option<f64>,
    rank_bound: Option<usize>,
}

impl std::fmt::Debug for FnOperator<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FnOperator")
            .field("dim", &self.dim)
            .field("quadratic", &self.quadratic.is_some())
            .field("trace", &self.trace)
            .field("rank_bound", &self.rank_bound)
            .finish()
    }
}

impl<'a> FnOperator<'a> {
    /// An operator of dimension `dim` computing F v with `apply`. The closure receives a
    /// slice of length `dim` and must return a vector of the same length (checked).
    pub fn new(dim: usize, apply: impl Fn(&[f64]) -> Result<Vec<f64>> + 'a) -> Self {
        FnOperator { dim, apply: Box::new(apply), quadratic: None, trace: None, rank_bound: None }
    }

    /// A cheaper vᵀFv than vᵀ(F v), e.g. (1/N) Σᵢ ‖Jᵢ v‖²_Λ from forward-mode products alone.
    pub fn with_quadratic(mut self, quadratic: impl Fn(&[f64]) -> Result<f64> + 'a) -> Self {
        self.quadratic = Some(Box::new(quadratic));
        self
    }

    /// The exact tr F (e.g. the mean of the per-sample squared norms).
    pub fn with_trace(mut self, trace: f64) -> Self {
        self.trace = Some(trace);
        self
    }

    /// An upper bound on rank F (e.g. N·R output rows).
    pub fn with_rank_bound(mut self, rank: usize) -> Self {
        self.rank_bound = Some(rank);
        self
    }
}

impl FisherOperator for FnOperator<'_> {
    fn dim(&self) -> usize {
        self.dim
    }
    fn apply(&self, v: &[f64]) -> Result<Vec<f64>> {
        check_len("v", v, self.dim)?;
        let y = (self.apply)(v)?;
        if y.len() != self.dim {
            return Err(FisherError::InvalidInput(format!(
                "the F·v closure returned {} values for an operator of dimension {}",
                y.len(),
                self.dim
            )));
        }
        Ok(y)
    }
    fn quadratic(&self, v: &[f64]) -> Result<f64> {
        check_len("v", v, self.dim)?;
        match &self.quadratic {
            Some(q) => q(v),
            None => Ok(dot(v, &self.apply(v)?)),
        }
    }
    fn trace(&self) -> Option<f64> {
        self.trace
    }
    fn rank_bound(&self) -> Option<usize> {
        self.rank_bound
    }
}

/// A stored Fisher form in f64: everything about it can be computed exactly (eigenvalues,
/// log-determinants, damped solves, Frobenius norms, coupling).
#[derive(Debug, Clone, PartialEq)]
pub enum ExplicitFisher {
    /// Dense F.
    Full(DenseOperator),
    /// diag(F).
    Diagonal(DiagonalOperator),
    /// Per-layer (or per-group) diagonal blocks.
    Blocks(BlockDiagonalOperator),
    /// Per-layer KFAC factors.
    Kfac(KfacOperator),
    /// The Gram matrix (dual).
    Gram(GramOperator),
}

impl ExplicitFisher {
    /// From a [`FisherMatrix`] (of per-sample gradients). `SampleNorms` carries only tr F and
    /// is refused. A Gram result does not know P: set it with
    /// [`ExplicitFisher::with_parameters`] before computing measures of F from it.
    pub fn from_matrix<T: Copy + Into<f64>>(m: &FisherMatrix<T>) -> Result<Self> {
        Ok(match m {
            FisherMatrix::Full(f) => ExplicitFisher::Full(DenseOperator::new(f)?),
            FisherMatrix::Diagonal(d) => ExplicitFisher::Diagonal(DiagonalOperator::new(d)?),
            FisherMatrix::BlockDiagonal(b) => ExplicitFisher::Blocks(BlockDiagonalOperator::new(b)?),
            FisherMatrix::Gram(k) => ExplicitFisher::Gram(GramOperator::new(k, None)?),
            FisherMatrix::SampleNorms(_) => {
                return Err(FisherError::InvalidInput(
                    "per-sample norms give only tr F; compute a full, diag, block or gram form to analyse".into(),
                ))
            }
        })
    }

    /// From a network's [`NetFisher`]. KFAC needs `layout` with layer shapes (to tell the
    /// bias column of A); the layout, when given, must match the form's size. `Grads` rows
    /// go through [`FactorOperator`] instead (they need N); `Norms` carry only tr F.
    pub fn from_net<T: Copy + Into<f64>>(f: &NetFisher<T>, layout: Option<&ParameterLayout>) -> Result<Self> {
        let fisher = match f {
            NetFisher::Full(m) => ExplicitFisher::Full(DenseOperator::new(m)?),
            NetFisher::Diagonal(d) => ExplicitFisher::Diagonal(DiagonalOperator::new(d)?),
            NetFisher::Layer(blocks) => ExplicitFisher::Blocks(BlockDiagonalOperator::new(blocks)?),
            NetFisher::Kfac(factors) => {
                let shapes = layout.and_then(ParameterLayout::shapes).ok_or_else(|| {
                    FisherError::InvalidInput("KFAC analysis needs the layer shapes (a layout from the model)".into())
                })?;
                ExplicitFisher::Kfac(KfacOperator::new(factors, shapes)?)
            }
            NetFisher::Grads(_) => {
                return Err(FisherError::InvalidInput(
                    "grads rows are a square-root factor: wrap them in FactorOperator::new(rows, samples)".into(),
                ))
            }
            NetFisher::Norms(_) => {
                return Err(FisherError::InvalidInput(
                    "per-sample norms give only tr F; compute a full, diag, layer or kfac form to analyse".into(),
                ))
            }
        };
        if let Some(layout) = layout {
            layout.check_dim(fisher.dim())?;
        }
        Ok(fisher)
    }

    /// Sets P for a Gram form (ignored by the other forms, whose dimension is P).
    pub fn with_parameters(self, parameters: usize) -> Self {
        match self {
            ExplicitFisher::Gram(g) => ExplicitFisher::Gram(GramOperator { parameters: Some(parameters), ..g }),
            other => other,
        }
    }

    /// The form's name (`full`, `diag`, `blocks`, `kfac`, `gram`).
    pub fn name(&self) -> &'static str {
        match self {
            ExplicitFisher::Full(_) => "full",
            ExplicitFisher::Diagonal(_) => "diag",
            ExplicitFisher::Blocks(_) => "blocks",
            ExplicitFisher::Kfac(_) => "kfac",
            ExplicitFisher::Gram(_) => "gram",
        }
    }

    /// P, the dimension of F (for Gram: P when set, else N).
    pub fn parameters(&self) -> usize {
        match self {
            ExplicitFisher::Gram(g) => g.parameters.unwrap_or(g.dim()),
            other => other.dim(),
        }
    }

    /// ‖F‖²_F, exactly: Σ F_ij² (full, blocks, diag), Σ_l ‖G_l‖²_F ‖A_l‖²_F (KFAC, since
    /// ‖G ⊗ A‖²_F = ‖G‖²_F ‖A‖²_F), and Σ K_ij² = tr(K²) = tr(F²) for Gram.
    pub fn frobenius_squared(&self) -> f64 {
        let sq = |m: &Array2<f64>| m.iter().map(|v| v * v).sum::<f64>();
        match self {
            ExplicitFisher::Full(f) => sq(&f.f),
            ExplicitFisher::Diagonal(d) => d.d.iter().map(|v| v * v).sum(),
            ExplicitFisher::Blocks(b) => b.blocks.iter().map(sq).sum(),
            ExplicitFisher::Kfac(k) => k.layers.iter().map(|l| sq(&l.g) * sq(&l.a)).sum(),
            ExplicitFisher::Gram(g) => sq(&g.k),
        }
    }

    /// The operator behind the form.
    fn operator(&self) -> &dyn FisherOperator {
        match self {
            ExplicitFisher::Full(o) => o,
            ExplicitFisher::Diagonal(o) => o,
            ExplicitFisher::Blocks(o) => o,
            ExplicitFisher::Kfac(o) => o,
            ExplicitFisher::Gram(o) => o,
        }
    }
}

impl FisherOperator for ExplicitFisher {
    fn dim(&self) -> usize {
        self.operator().dim()
    }
    fn apply(&self, v: &[f64]) -> Result<Vec<f64>> {
        self.operator().apply(v)
    }
    fn quadratic(&self, v: &[f64]) -> Result<f64> {
        self.operator().quadratic(v)
    }
    fn trace(&self) -> Option<f64> {
        self.operator().trace()
    }
    fn rank_bound(&self) -> Option<usize> {
        self.operator().rank_bound()
    }
}
