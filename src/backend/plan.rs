//! Planning shared by the CPU and GPU network paths: layer geometry in θ order, rows per
//! sample, result sizes, and the micro-batch size from binding limits and a memory budget.
//!
//! Both paths stream a dataset in micro-batches of m samples; what differs is only how many
//! bytes one sample costs on each (their scratch layouts) and which limits apply, so the
//! arithmetic lives here once and each backend passes its own [`MicroBatchLimits`].

use crate::error::{FisherError, Result};
use crate::fisher::{rows_per_sample, Variant};
use crate::model::Mlp;

/// Geometry of one layer as the reductions see it: a per-sample input row ã (length `ld`)
/// and output-gradient rows δ (length `fan_out`), with the layer's parameters at
/// θ[offset .. offset + params] (weight row-major, then bias).
#[derive(Debug, Clone)]
pub(crate) struct LayerShape {
    /// Input width.
    pub fan_in: usize,
    /// Output width.
    pub fan_out: usize,
    /// Row length of ã (fan_in + 1 with a bias).
    pub ld: usize,
    /// Whether the layer has a bias.
    pub has_bias: bool,
    /// Offset of the layer's parameters in θ.
    pub offset: usize,
    /// Number of parameters (weight then bias).
    pub params: usize,
}

impl LayerShape {
    /// The layer's slice of θ-ordered `v` in the augmented out × ld layout [V | v_b] that
    /// multiplies ã (row-major).
    pub fn augment(&self, v: &[f32]) -> Vec<f32> {
        let mut out = vec![0f32; self.fan_out * self.ld];
        for o in 0..self.fan_out {
            let src = self.offset + o * self.fan_in;
            out[o * self.ld..o * self.ld + self.fan_in].copy_from_slice(&v[src..src + self.fan_in]);
            if self.has_bias {
                out[o * self.ld + self.fan_in] = v[self.offset + self.fan_out * self.fan_in + o];
            }
        }
        out
    }

    /// The inverse of [`LayerShape::augment`]: writes the augmented out × ld values
    /// `value(o, i)` (i = fan_in is the bias column) into the layer's slice of θ-ordered `out`.
    pub fn scatter(&self, out: &mut [f32], value: impl Fn(usize, usize) -> f32) {
        for o in 0..self.fan_out {
            for i in 0..self.fan_in {
                out[self.offset + o * self.fan_in + i] = value(o, i);
            }
            if self.has_bias {
                out[self.offset + self.fan_out * self.fan_in + o] = value(o, self.fan_in);
            }
        }
    }
}

/// The geometry of a network reduction: layers, parameter count, output width and rows per
/// sample of the variant.
#[derive(Debug, Clone)]
pub(crate) struct NetPlan {
    /// Per layer, input to output.
    pub shapes: Vec<LayerShape>,
    /// Parameters P.
    pub params: usize,
    /// Output width C.
    pub classes: usize,
    /// Output rows per sample R ([`rows_per_sample`]).
    pub r: usize,
}

impl NetPlan {
    /// The plan of `mlp` under `variant`.
    pub fn new(mlp: &Mlp, variant: Variant) -> Self {
        let mut offset = 0;
        let shapes: Vec<LayerShape> = mlp
            .layers
            .iter()
            .map(|l| {
                let s = LayerShape {
                    fan_in: l.fan_in(),
                    fan_out: l.fan_out(),
                    ld: l.augmented_in(),
                    has_bias: l.bias.is_some(),
                    offset,
                    params: l.num_params(),
                };
                offset += s.params;
                s
            })
            .collect();
        let classes = shapes.last().map_or(0, |s| s.fan_out);
        NetPlan { r: rows_per_sample(variant, classes), classes, params: offset, shapes }
    }

    /// Number of layers.
    pub fn depth(&self) -> usize {
        self.shapes.len()
    }

    /// Widest layer side, max(fan_in, fan_out): the row length of δ and GEMM scratch.
    pub fn max_width(&self) -> usize {
        self.shapes.iter().map(|s| s.fan_in.max(s.fan_out)).max().unwrap_or(1)
    }

    /// A direction of the implicit F·v must have P entries.
    pub fn check_direction(&self, v: &[f32]) -> Result<()> {
        if v.len() != self.params {
            return Err(FisherError::InvalidInput(format!(
                "direction has {} entries but the model has {} parameters",
                v.len(),
                self.params
            )));
        }
        Ok(())
    }

    /// Number of f32 values of the materialized gradient rows (N·R × P) of `n` samples, or
    /// an error when that cannot be allocated at all.
    pub fn grads_len(&self, n: usize) -> Result<usize> {
        let (r, p) = (self.r, self.params);
        n.checked_mul(r)
            .and_then(|x| x.checked_mul(p))
            .filter(|&x| x <= isize::MAX as usize / 4)
            .ok_or_else(|| FisherError::InvalidInput(format!("{n}·{r} gradient rows of {p} parameters do not fit in memory")))
    }
}

/// What bounds a micro-batch on one backend.
#[derive(Debug, Clone)]
pub(crate) struct MicroBatchLimits {
    /// Largest single buffer binding, bytes.
    pub binding_limit: u64,
    /// Total memory for one reduction, bytes.
    pub budget: u64,
    /// Target size of one micro-batch's scratch, bytes: beyond it batches run no faster.
    pub target: u64,
    /// Largest micro-batch, samples.
    pub max_samples: usize,
    /// Names the binding limit in errors.
    pub binding_name: String,
    /// Names the budget in errors.
    pub budget_name: String,
}

impl MicroBatchLimits {
    /// Host memory: no binding limit or budget, only the target and the sample cap.
    pub fn host(target: u64, max_samples: usize) -> Self {
        MicroBatchLimits {
            binding_limit: u64::MAX,
            budget: u64::MAX,
            target,
            max_samples,
            binding_name: "host memory".into(),
            budget_name: "host memory".into(),
        }
    }

    /// Samples per micro-batch of `n`: every binding (`widest_binding` bytes per sample)
    /// within the binding limit, `fixed` bytes plus `per_sample` bytes per sample within the
    /// budget, the scratch near the target, and at least one sample whenever one fits at all.
    pub fn micro_batch(&self, n: usize, per_sample: u64, widest_binding: u64, fixed: u64, what: impl FnOnce() -> String) -> Result<usize> {
        let by_binding = self.binding_limit / widest_binding.max(1);
        let left = self.budget.saturating_sub(fixed);
        let by_budget = left.min(self.target) / per_sample.max(1);
        let by_budget = if by_budget == 0 && left >= per_sample { 1 } else { by_budget };
        let mb = (by_binding.min(by_budget).min(self.max_samples as u64) as usize).min(n);
        if mb == 0 {
            let (needed, limit, which) = if by_binding == 0 {
                (widest_binding, self.binding_limit, self.binding_name.clone())
            } else {
                (fixed + per_sample, self.budget, self.budget_name.clone())
            };
            return Err(FisherError::DoesNotFit { what: what(), needed, limit, which });
        }
        Ok(mb)
    }
}
