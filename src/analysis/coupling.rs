//! Disentanglement: how much of the Fisher geometry couples different layers, and within a
//! layer different units.
//!
//! ## Definitions (shares of ‖F‖²_F, in [0, 1])
//!
//! * **Inter-layer coupling** = 1 − Σ_l ‖F_ll‖²_F / ‖F‖²_F: the share of ‖F‖²_F outside the
//!   per-layer diagonal blocks F_ll. 0 for a block-diagonal F.
//! * **Inter-unit coupling** of layer l = 1 − Σ_o ‖F_l[o, o]‖²_F / ‖F_ll‖²_F, where unit o
//!   (output o of the layer) owns its weight row and its bias: relative indices o·in + i
//!   (i < in) and out·in + o, in PyTorch order. 0 when the layer's block is
//!   block-diagonal over units.
//!
//! ## By form
//!
//! * full: exactly, from the entries.
//! * layer blocks: inter-unit exactly; inter-layer is not visible (`None`: the form has
//!   dropped the off-diagonal blocks, so 0 would be a statement about the form, not F).
//! * KFAC: inter-unit = 1 − Σ_o G_oo² / ‖G‖²_F, exactly for G ⊗ A: unit o's block is
//!   G_oo·A (units are the rows of [W | b], i.e. the first Kronecker factor), so
//!   ‖F[o, o]‖²_F = G_oo² ‖A‖²_F while ‖G ⊗ A‖²_F = ‖G‖²_F ‖A‖²_F, and ‖A‖²_F cancels.
//!   Inter-layer: `None`, as for blocks.
//! * diag, Gram: `None` (a diagonal shows no coupling; a Gram matrix has no parameter axes).
//! * implicit ([`coupling_implicit`]): inter-layer by Hutchinson's estimator (below);
//!   inter-unit is not estimated (it would need one probe per unit and layer).
//!
//! ## Hutchinson estimator for an implicit F
//!
//! For a Rademacher probe z_l supported on layer l's range (E[z_l z_lᵀ] = I on that block),
//! y = F z_l gives E‖y_l‖² = ‖F_ll‖²_F (y_l the rows of layer l) and E‖y‖² = Σ_k ‖F_kl‖²_F.
//! Summing over layers (and one more probe on parameters outside every layer, if any),
//! per probe round p: A_p = Σ_l ‖y_l‖², B_p = Σ ‖y‖², with E[A] = Σ_l ‖F_ll‖²_F and
//! E[B] = ‖F‖²_F. The estimate is 1 − Ā/B̄ (a ratio estimator: numerator and denominator
//! share their probes, which cancels much of their noise) and its standard error is the
//! delta-method one, √(Σ_p (A_p − R B_p)² / (n(n − 1))) / B̄ with R = Ā/B̄ (Cochran,
//! *Sampling Techniques*, §6.4): statistical, ≈ 68%. Cost: (layers [+1]) F·v per probe.

use serde::Serialize;

use super::operator::ExplicitFisher;
use super::slq::rademacher;
use super::{FisherOperator, ParameterLayout};
use crate::error::{FisherError, Result};
use crate::synthetic::SplitMix64;

/// Coupling shares (see the module docs for definitions and what each form can show).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Coupling {
    /// 1 − Σ_l ‖F_ll‖²_F / ‖F‖²_F, or `None` when the form cannot show it or F = 0.
    pub inter_layer: Option<f64>,
    /// Standard error of `inter_layer` for the stochastic estimate (`None` when exact).
    pub inter_layer_std_error: Option<f64>,
    /// Per layer, 1 − Σ_o ‖F_l(o, o)‖²_F / ‖F_ll‖²_F; `None` for a layer when unknown (no unit
    /// structure, a form that cannot show it, or a zero block). Empty when no layer is known.
    pub inter_unit: Vec<Option<f64>>,
}

/// outside / total, `None` for a zero total. Both are sums of squares taken directly (not
/// 1 − inside/total), so an exactly block-diagonal F gives exactly 0 and a weak coupling
/// keeps its relative accuracy.
fn share(outside: f64, total: f64) -> Option<f64> {
    (total > 0.0).then(|| outside / total)
}

/// Σ F_ij² over pairs with different owners (`None` owns nothing: always "different").
fn outside_squares(f: ndarray::ArrayView2<'_, f64>, owner: &[Option<usize>]) -> (f64, f64) {
    let (mut outside, mut total) = (0.0, 0.0);
    for (i, row) in f.outer_iter().enumerate() {
        for (j, &v) in row.iter().enumerate() {
            let sq = v * v;
            total += sq;
            if owner[i].is_none() || owner[i] != owner[j] {
                outside += sq;
            }
        }
    }
    (outside, total)
}

/// Inter-unit share of a dense layer block (indices relative to the layer).
fn inter_unit_dense(block: ndarray::ArrayView2<'_, f64>, shape: &super::LayerShape) -> Option<f64> {
    let mut owner = vec![None; block.nrows()];
    for o in 0..shape.fan_out {
        for i in shape.unit_indices(o) {
            owner[i] = Some(o);
        }
    }
    let (outside, total) = outside_squares(block, &owner);
    share(outside, total)
}

impl ExplicitFisher {
    /// The coupling shares of this form over `layout` (see the module docs).
    pub fn coupling(&self, layout: &ParameterLayout) -> Result<Coupling> {
        let unknown = || Coupling { inter_layer: None, inter_layer_std_error: None, inter_unit: Vec::new() };
        match self {
            ExplicitFisher::Full(f) => {
                layout.check_dim(self.dim())?;
                let f = f.matrix();
                let mut owner = vec![None; f.nrows()];
                for (l, &(s, len)) in layout.ranges().iter().enumerate() {
                    owner[s..s + len].iter_mut().for_each(|o| *o = Some(l));
                }
                let (outside, total) = outside_squares(f.view(), &owner);
                let inter_unit = match layout.shapes() {
                    Some(shapes) => layout
                        .ranges()
                        .iter()
                        .zip(shapes)
                        .map(|(&(s, len), sh)| inter_unit_dense(f.slice(ndarray::s![s..s + len, s..s + len]), sh))
                        .collect(),
                    None => Vec::new(),
                };
                Ok(Coupling { inter_layer: share(outside, total), inter_layer_std_error: None, inter_unit })
            }
            ExplicitFisher::Blocks(b) => {
                layout.check_dim(self.dim())?;
                let inter_unit = match layout.shapes() {
                    Some(shapes) if b.ranges() == layout.ranges() => {
                        b.blocks().iter().zip(shapes).map(|(blk, sh)| inter_unit_dense(blk.view(), sh)).collect()
                    }
                    _ => Vec::new(),
                };
                Ok(Coupling { inter_unit, ..unknown() })
            }
            ExplicitFisher::Kfac(k) => {
                layout.check_dim(self.dim())?;
                let inter_unit = k
                    .layers()
                    .iter()
                    .map(|l| {
                        let owner: Vec<Option<usize>> = (0..l.g.nrows()).map(Some).collect();
                        let (outside, total) = outside_squares(l.g.view(), &owner);
                        share(outside, total)
                    })
                    .collect();
                Ok(Coupling { inter_unit, ..unknown() })
            }
            ExplicitFisher::Diagonal(_) | ExplicitFisher::Gram(_) => Ok(unknown()),
        }
    }
}

/// The inter-layer coupling of any operator by the Hutchinson ratio estimator of the
/// module docs, with `probes` rounds (≥ 2) of one F·v per layer (plus one for parameters
/// outside every layer, if any), seeded by `seed`. `inter_unit` is left empty.
pub fn coupling_implicit(
    op: &(impl FisherOperator + ?Sized),
    layout: &ParameterLayout,
    probes: usize,
    seed: u64,
) -> Result<Coupling> {
    layout.check_dim(op.dim())?;
    if probes < 2 {
        return Err(FisherError::InvalidInput(format!("coupling estimation needs ≥ 2 probes, got {probes}")));
    }
    let n = op.dim();
    // Groups: each layer's indices, then the uncovered rest (if any).
    let mut covered = vec![false; n];
    let mut groups: Vec<(Vec<usize>, bool)> = layout
        .ranges()
        .iter()
        .map(|&(s, len)| {
            covered[s..s + len].iter_mut().for_each(|c| *c = true);
            ((s..s + len).collect(), true)
        })
        .collect();
    let rest: Vec<usize> = (0..n).filter(|&i| !covered[i]).collect();
    if !rest.is_empty() {
        groups.push((rest, false));
    }
    let (mut a, mut b) = (Vec::with_capacity(probes), Vec::with_capacity(probes));
    // One seed per probe vector from a SplitMix64 stream: different seeds, independent probes.
    let mut seeds = SplitMix64::new(seed);
    for _ in 0..probes {
        let (mut a_p, mut b_p) = (0.0, 0.0);
        for (indices, is_layer) in &groups {
            let signs = rademacher(indices.len(), seeds.next_u64());
            let mut z = vec![0.0; n];
            for (&i, &s) in indices.iter().zip(&signs) {
                z[i] = s;
            }
            let y = op.apply(&z)?;
            super::lanczos::check_finite_product(&y)?;
            b_p += y.iter().map(|v| v * v).sum::<f64>();
            if *is_layer {
                a_p += indices.iter().map(|&i| y[i] * y[i]).sum::<f64>();
            }
        }
        a.push(a_p);
        b.push(b_p);
    }
    let nf = probes as f64;
    let (mean_a, mean_b) = (a.iter().sum::<f64>() / nf, b.iter().sum::<f64>() / nf);
    if mean_b <= 0.0 {
        return Ok(Coupling { inter_layer: None, inter_layer_std_error: None, inter_unit: Vec::new() });
    }
    let ratio = mean_a / mean_b;
    let spread: f64 = a.iter().zip(&b).map(|(x, y)| (x - ratio * y).powi(2)).sum();
    let std_error = (spread / (nf * (nf - 1.0))).sqrt() / mean_b;
    Ok(Coupling {
        inter_layer: Some((1.0 - ratio).max(0.0)),
        inter_layer_std_error: Some(std_error),
        inter_unit: Vec::new(),
    })
}
