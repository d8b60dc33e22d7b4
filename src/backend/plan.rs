//! Planning shared by the CPU and GPU network paths: layer geometry in θ order, rows per
//! sample, result sizes, and the micro-batch size from binding limits and a memory budget.
//!
//! Both paths stream a dataset in micro-batches of m samples, and the R output rows of each
//! micro-batch in chunks of d draws ([`Batching`]): R is K for the Monte Carlo Fisher, so it
//! may exceed any budget, and the rows of one micro-batch are generated for a draw range at a
//! time (the MC generator is counter-based, so any range can be drawn without state). Peak
//! memory is therefore independent of K. What differs between the paths is only how many
//! bytes a sample and an output row cost on each (their scratch layouts, [`BatchCost`]) and
//! which limits apply, so the arithmetic lives here once and each backend passes its own
//! [`MicroBatchLimits`].
//!
//! Every size derived from user input (parameter counts, N·R, N·R·P, P², block sums) is
//! computed with checked arithmetic; an overflow is an error naming the numbers, never a
//! panic or a wrapped value.

use crate::error::{FisherError, Result};
use crate::fisher::{rows_per_sample, NetForm, Variant};
use crate::model::Mlp;

/// Most Monte Carlo draws per sample: the generator's draw counter is a `u32`
/// ([`crate::fisher::mc_uniform`]), so larger K would silently repeat draws.
pub(crate) const MAX_DRAWS: usize = u32::MAX as usize;

/// Names the result limit in [`FisherError::DoesNotFit`].
pub(crate) const RESULT_LIMIT_NAME: &str = "host result limit; --max-result-gib raises it";

/// Refuses a result of `values` f32 values (`None`: the count overflowed) beyond `limit`
/// bytes of host memory, before anything is allocated.
pub(crate) fn check_result(values: Option<usize>, limit: u64, what: impl FnOnce() -> String) -> Result<()> {
    let needed = values.and_then(|v| u64::try_from(v).ok()).and_then(|v| v.checked_mul(4));
    match needed {
        Some(bytes) if bytes <= limit && bytes <= isize::MAX as u64 => Ok(()),
        _ => Err(FisherError::DoesNotFit { what: what(), needed: needed.unwrap_or(u64::MAX), limit, which: RESULT_LIMIT_NAME.into() }),
    }
}

/// Σ sizeᵢ², checked (the values of a set of square blocks).
pub(crate) fn squares_total(sizes: impl IntoIterator<Item = usize>) -> Option<usize> {
    sizes.into_iter().try_fold(0usize, |acc, s| s.checked_mul(s).and_then(|sq| acc.checked_add(sq)))
}

/// The (start, len) column ranges of diagonal blocks of `sizes` over `p` columns, with the
/// checks of [`crate::Form::validate`] done in checked arithmetic (a sum past `usize` is an
/// error, not a wrapped total).
pub(crate) fn block_layout(sizes: &[usize], p: usize) -> Result<Vec<(usize, usize)>> {
    if sizes.is_empty() || sizes.contains(&0) {
        return Err(FisherError::InvalidInput("block sizes must be positive".into()));
    }
    let mut blocks = Vec::with_capacity(sizes.len());
    let mut start = 0usize;
    for &size in sizes {
        blocks.push((start, size));
        start = start.checked_add(size).ok_or_else(|| {
            FisherError::InvalidInput(format!(
                "block sizes sum past {} (the gradients have {p} parameters)",
                usize::MAX
            ))
        })?;
    }
    if start != p {
        return Err(FisherError::InvalidInput(format!("block sizes sum to {start} but the gradients have {p} parameters")));
    }
    Ok(blocks)
}

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
    /// The plan of `mlp` under `variant`; an error when the parameter count overflows or K
    /// exceeds the generator's [`MAX_DRAWS`].
    pub fn new(mlp: &Mlp, variant: Variant) -> Result<Self> {
        if let Variant::MonteCarlo { samples, .. } = variant {
            if samples == 0 || samples > MAX_DRAWS {
                return Err(FisherError::InvalidInput(format!(
                    "--mc-samples must be between 1 and {MAX_DRAWS}, got {samples}"
                )));
            }
        }
        let too_many = || FisherError::InvalidInput("the model's parameter count overflows usize".into());
        let mut offset = 0usize;
        let mut shapes = Vec::with_capacity(mlp.layers.len());
        for l in &mlp.layers {
            let has_bias = l.bias.is_some();
            let (fan_in, fan_out) = (l.fan_in(), l.fan_out());
            let params = fan_in
                .checked_mul(fan_out)
                .and_then(|w| w.checked_add(if has_bias { fan_out } else { 0 }))
                .ok_or_else(too_many)?;
            let ld = fan_in.checked_add(has_bias as usize).ok_or_else(too_many)?;
            shapes.push(LayerShape { fan_in, fan_out, ld, has_bias, offset, params });
            offset = offset.checked_add(params).ok_or_else(too_many)?;
        }
        let classes = shapes.last().map_or(0, |s| s.fan_out);
        Ok(NetPlan { r: rows_per_sample(variant, classes), classes, params: offset, shapes })
    }

    /// f32 values of the result of `form` on `n` samples (`None` when the count overflows):
    /// P² (full), Σ P_l² (layer), Σ (in+1)² + out² (kfac), N·R·P (grads), P (diag), N (norms).
    pub fn result_values(&self, form: NetForm, n: usize) -> Option<usize> {
        match form {
            NetForm::Full => self.params.checked_mul(self.params),
            NetForm::Layer => squares_total(self.shapes.iter().map(|s| s.params)),
            NetForm::Kfac => squares_total(self.shapes.iter().flat_map(|s| [s.ld, s.fan_out])),
            NetForm::Grads => n.checked_mul(self.r).and_then(|x| x.checked_mul(self.params)),
            NetForm::Diagonal => Some(self.params),
            NetForm::Norms => Some(n),
        }
    }

    /// Refuses the result of `form` on `n` samples when it exceeds `limit` bytes of host memory.
    pub fn check_result(&self, form: NetForm, n: usize, limit: u64) -> Result<()> {
        check_result(self.result_values(form, n), limit, || {
            let (p, r) = (self.params, self.r);
            match form {
                NetForm::Full => format!("the full Fisher matrix ({p}×{p} f32)"),
                NetForm::Layer => format!("the per-layer Fisher blocks ({} layers, {p} parameters, f32)", self.depth()),
                NetForm::Kfac => format!("the KFAC factors ({} layers, f32)", self.depth()),
                NetForm::Grads => format!("the gradient rows (N·R×P = {n}·{r}×{p} f32)"),
                NetForm::Diagonal => format!("the Fisher diagonal ({p} f32)"),
                NetForm::Norms => format!("the per-sample norms ({n} f32)"),
            }
        })
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

    /// How to walk `n` samples with `r` output rows each, costing `cost`: whole samples
    /// (every draw at once, [`Batching::draws`] = R) while one sample's rows fit the target
    /// and the binding limit, and otherwise one sample per micro-batch with its R rows in
    /// chunks of as many draws as fit. Memory is then bounded whatever R (= K for MC) is.
    pub fn batching(&self, n: usize, r: usize, cost: &BatchCost, what: impl FnOnce() -> String) -> Result<Batching> {
        let r = r.max(1);
        let r64 = r as u64;
        let left = self.budget.saturating_sub(cost.fixed);
        let cap = left.min(self.target);
        let max_samples = (self.max_samples.max(1) as u64).min(n.max(1) as u64);
        // Whole samples: all R rows of m samples at once.
        let sample_bytes = r64.checked_mul(cost.per_row).and_then(|x| x.checked_add(cost.per_sample));
        let sample_binding = r64.checked_mul(cost.row_binding).map(|x| x.max(cost.sample_binding));
        if let (Some(bytes), Some(binding)) = (sample_bytes, sample_binding) {
            let m = (self.binding_limit / binding.max(1)).min(cap / bytes.max(1)).min(max_samples);
            if m >= 1 {
                return Ok(Batching { samples: m as usize, draws: r });
            }
        }
        // One sample, its draws in chunks.
        let fits_binding = cost.sample_binding <= self.binding_limit && cost.row_binding <= self.binding_limit;
        let by_binding = self.binding_limit / cost.row_binding.max(1);
        let by_target = cap.saturating_sub(cost.per_sample) / cost.per_row.max(1);
        let mut d = by_binding.min(by_target).min(r64);
        let one_row = cost.per_sample.saturating_add(cost.per_row).saturating_add(cost.fixed);
        if d == 0 && fits_binding && one_row <= self.budget {
            d = 1;
        }
        if d == 0 {
            let (needed, limit, which) = if !fits_binding {
                (cost.sample_binding.max(cost.row_binding), self.binding_limit, self.binding_name.clone())
            } else {
                (one_row, self.budget, self.budget_name.clone())
            };
            return Err(FisherError::DoesNotFit { what: what(), needed, limit, which });
        }
        Ok(Batching { samples: 1, draws: d as usize })
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

/// What one micro-batch costs on a backend, in bytes (each figure computed by the caller
/// with checked or saturating arithmetic).
#[derive(Debug, Clone, Default)]
pub(crate) struct BatchCost {
    /// Per sample, independent of R (forward activations, targets, per-sample scratch).
    pub per_sample: u64,
    /// Per output row (δ, backward scratch, gradient rows δ ⊗ ã).
    pub per_row: u64,
    /// Widest single binding per sample.
    pub sample_binding: u64,
    /// Widest single binding per output row.
    pub row_binding: u64,
    /// Independent of the batch (model, accumulators).
    pub fixed: u64,
}

/// How a network reduction walks the data ([`MicroBatchLimits::batching`]): micro-batches of
/// `samples` samples, each with its R output rows in chunks of `draws`. Either `draws` = R
/// (whole samples) or `samples` = 1, so the rows of a micro-batch come out sample-major in
/// dataset order either way (which `grads` relies on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Batching {
    /// Samples per micro-batch.
    pub samples: usize,
    /// Output rows (draws, or classes for `true`) per chunk.
    pub draws: usize,
}

impl Batching {
    /// Rows of the largest chunk, `samples · draws` (fits: both were bounded by a byte count).
    pub fn rows(&self) -> usize {
        self.samples.saturating_mul(self.draws)
    }

    /// The sample ranges (s0, m) of `n` samples.
    pub fn sample_ranges(&self, n: usize) -> impl Iterator<Item = (usize, usize)> {
        let step = self.samples.max(1);
        (0..n).step_by(step).map(move |s0| (s0, step.min(n - s0)))
    }

    /// The draw ranges (q0, d) of `r` rows per sample.
    pub fn draw_ranges(&self, r: usize) -> impl Iterator<Item = (usize, usize)> {
        let step = self.draws.max(1);
        (0..r).step_by(step).map(move |q0| (q0, step.min(r - q0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cost(per_sample: u64, per_row: u64) -> BatchCost {
        BatchCost { per_sample, per_row, sample_binding: 4, row_binding: 4, fixed: 0 }
    }

    #[test]
    fn whole_samples_while_their_rows_fit() {
        // 100 + 3·10 bytes per sample: 1 MiB holds 8065 samples, capped at 4096.
        let b = MicroBatchLimits::host(1 << 20, 4096).batching(10_000, 3, &cost(100, 10), String::new).unwrap();
        assert_eq!(b, Batching { samples: 4096, draws: 3 });
        // Never more samples than there are.
        let b = MicroBatchLimits::host(1 << 20, 4096).batching(7, 3, &cost(100, 10), String::new).unwrap();
        assert_eq!(b, Batching { samples: 7, draws: 3 });
    }

    #[test]
    fn draws_are_split_when_one_sample_does_not_fit() {
        // K = 10⁹ rows of 40 bytes: one sample, (4096 − 96) / 40 = 100 draws per chunk.
        let limits = MicroBatchLimits::host(4096, 4096);
        let b = limits.batching(10, 1_000_000_000, &cost(96, 40), String::new).unwrap();
        assert_eq!(b, Batching { samples: 1, draws: 100 });
        let ranges: Vec<_> = Batching { samples: 1, draws: 4 }.draw_ranges(10).collect();
        assert_eq!(ranges, [(0, 4), (4, 4), (8, 2)]);
        // R · per_row overflowing u64 is just "does not fit whole" (host memory has no
        // budget, so the one row left is the caller's to bound).
        let b = limits.batching(10, usize::MAX, &cost(96, u64::MAX / 2), String::new).unwrap();
        assert_eq!(b, Batching { samples: 1, draws: 1 });
        // A row beyond the target but within the budget still runs, one row at a time.
        let b = limits.batching(10, 5, &cost(96, 10_000), String::new).unwrap();
        assert_eq!(b, Batching { samples: 1, draws: 1 });
    }

    #[test]
    fn a_row_beyond_the_budget_or_binding_is_refused() {
        let gpu = MicroBatchLimits {
            binding_limit: 1 << 16,
            budget: 1 << 20,
            target: 1 << 18,
            max_samples: 1024,
            binding_name: "binding".into(),
            budget_name: "budget".into(),
        };
        let wide = BatchCost { per_sample: 8, per_row: 1 << 17, sample_binding: 8, row_binding: 1 << 17, fixed: 0 };
        match gpu.batching(4, 2, &wide, || "row".into()) {
            Err(FisherError::DoesNotFit { which, needed, .. }) => assert_eq!((which.as_str(), needed), ("binding", 1 << 17)),
            other => panic!("{other:?}"),
        }
        let heavy = BatchCost { per_sample: 8, per_row: 1 << 10, sample_binding: 8, row_binding: 1 << 10, fixed: 1 << 20 };
        match gpu.batching(4, 2, &heavy, || "row".into()) {
            Err(FisherError::DoesNotFit { which, .. }) => assert_eq!(which, "budget"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn block_layouts_and_result_sizes_are_checked() {
        assert_eq!(block_layout(&[2, 3], 5).unwrap(), [(0, 2), (2, 3)]);
        assert!(block_layout(&[usize::MAX, 2], 1).is_err());
        assert!(block_layout(&[2, 0], 2).is_err());
        assert!(block_layout(&[2, 2], 5).is_err());
        assert_eq!(squares_total([3, 4]), Some(25));
        assert_eq!(squares_total([1 << 33]), None);
        assert!(check_result(Some(256), 1024, String::new).is_ok());
        assert!(matches!(check_result(Some(257), 1024, String::new), Err(FisherError::DoesNotFit { needed: 1028, .. })));
        assert!(matches!(check_result(None, 1024, String::new), Err(FisherError::DoesNotFit { needed: u64::MAX, .. })));
    }
}
