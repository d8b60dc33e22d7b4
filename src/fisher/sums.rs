//! Partial sums of a network Fisher over a range of samples, exact across blocks: what a
//! shard computes, what a partial file holds, and what `fisher merge` and MPI combine.
//!
//! # The accumulation order (binding: it is what makes shards exact)
//!
//! The samples 0..N are cut into *blocks* of B samples (block b = [bB, (b+1)B) ∩ [0, N);
//! B = [`DEFAULT_BLOCK_SAMPLES`] unless asked otherwise). Within a block, the CPU path
//! walks micro-batches from the block's first sample, in order, and sums their f32
//! products in f64 as for any run. Across blocks, the f64 block sums are added with
//! [`ExactSum`], whose result does not depend on order or grouping. A shard is a
//! contiguous range of whole blocks ([`shard_range`]), so n shards compute exactly the
//! block sums that one process computes, and their merge is bit for bit the single run's
//! sum, whatever n is. The result is that sum divided by N in f64 and rounded once to f32
//! ([`NetSums::finish`]). A run of a single block never builds an [`ExactSum`] (one value
//! reads back unchanged), so it costs nothing over a plain sum.
//!
//! # Layout of the parts (in this order)
//!
//! * `diag`: per layer, the out × (in+1) sums of g² in the augmented layout [W | b]
//!   (row-major), scattered to θ order at the end;
//! * `kfac`: per layer, A then G, each its upper triangle packed row by row
//!   ((i, j ≥ i) at i·m − i(i−1)/2 + (j − i));
//! * `layer`: per layer, the upper triangle of its P_l × P_l block, packed;
//! * `full`: the upper triangle of F (P × P), packed.
//!
//! The other forms (`grads`, `norms`) are per sample, not sums; a shard of them is just the
//! rows of its samples.

use ndarray::{Array1, Array2};

use super::exact::ExactSum;
use super::network::{KfacFactors, NetFisher, NetForm};
use crate::error::{FisherError, Result};
use crate::model::Mlp;

/// Samples per block when not asked otherwise: 65,536. Runs of up to this many samples sum
/// exactly as before shards existed; longer runs add their block sums exactly.
pub const DEFAULT_BLOCK_SAMPLES: usize = 1 << 16;

/// The geometry of one Linear layer as the sums see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SumLayer {
    /// Output width.
    pub fan_out: usize,
    /// Input width.
    pub fan_in: usize,
    /// Whether the layer has a bias (then the augmented input has fan_in + 1 entries).
    pub bias: bool,
}

impl SumLayer {
    /// The layers of `mlp`.
    pub fn of(mlp: &Mlp) -> Vec<SumLayer> {
        mlp.layers.iter().map(|l| SumLayer { fan_out: l.fan_out(), fan_in: l.fan_in(), bias: l.bias.is_some() }).collect()
    }

    /// Width of the augmented input.
    pub fn augmented_in(&self) -> usize {
        self.fan_in + self.bias as usize
    }

    /// Parameters of the layer.
    pub fn params(&self) -> usize {
        self.fan_out * self.augmented_in()
    }
}

/// The values of the upper triangle of an m × m matrix.
pub fn packed_len(m: usize) -> usize {
    m * (m + 1) / 2
}

/// Offset of (i, i) in the packed upper triangle of side m.
pub fn packed_row(i: usize, m: usize) -> usize {
    i * m - i * i.saturating_sub(1) / 2
}

/// The parts of `form` for `layers`: (name, values), in the order of the module docs; an
/// error for a form that is not a sum, or a size that overflows.
pub fn part_layout(form: NetForm, layers: &[SumLayer]) -> Result<Vec<(String, usize)>> {
    let overflow = || FisherError::InvalidInput("the partial sums' size overflows usize".into());
    let packed = |m: usize| m.checked_add(1).and_then(|m1| m.checked_mul(m1)).map(|x| x / 2).ok_or_else(overflow);
    Ok(match form {
        NetForm::Diagonal => layers.iter().enumerate().map(|(l, s)| (format!("diag.{l}"), s.params())).collect(),
        NetForm::Kfac => {
            let mut parts = Vec::new();
            for (l, s) in layers.iter().enumerate() {
                parts.push((format!("kfac.{l}.A"), packed(s.augmented_in())?));
                parts.push((format!("kfac.{l}.G"), packed(s.fan_out)?));
            }
            parts
        }
        NetForm::Layer => {
            layers.iter().enumerate().map(|(l, s)| Ok((format!("layer.{l}"), packed(s.params())?))).collect::<Result<_>>()?
        }
        NetForm::Full => {
            let p = layers.iter().try_fold(0usize, |acc, s| acc.checked_add(s.params())).ok_or_else(overflow)?;
            vec![("full".into(), packed(p)?)]
        }
        NetForm::Grads | NetForm::Norms => {
            return Err(FisherError::InvalidInput(format!(
                "the {} form is per sample, not a sum over samples: it has no partial sums",
                form.name()
            )))
        }
    })
}

/// A network Fisher's sums over a range of samples (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct NetSums {
    /// The form.
    pub form: NetForm,
    /// The network's layers.
    pub layers: Vec<SumLayer>,
    /// Samples summed.
    pub samples: usize,
    /// The parts, in [`part_layout`]'s order.
    pub parts: Vec<ExactSum>,
}

impl NetSums {
    /// Empty sums of `form` (zero samples).
    pub fn zero(form: NetForm, layers: Vec<SumLayer>) -> Result<Self> {
        let parts = part_layout(form, &layers)?.into_iter().map(|(_, len)| ExactSum::new(len)).collect();
        Ok(NetSums { form, layers, samples: 0, parts })
    }

    /// The sums behind a finished Fisher over `samples` samples (its values times the count,
    /// in f64): for a backend without exact block sums (the GPU), whose shards then merge
    /// within its own tolerance rather than bit for bit.
    pub fn from_fisher(result: &NetFisher, layers: Vec<SumLayer>, samples: usize) -> Result<Self> {
        let mut sums = NetSums::zero(result.form(), layers.clone())?;
        sums.samples = samples;
        let nf = samples as f64;
        let scaled = |values: &mut dyn Iterator<Item = f32>| values.map(|v| v as f64 * nf).collect::<Vec<f64>>();
        let upper = |m: &Array2<f32>| {
            let k = m.nrows();
            scaled(&mut (0..k).flat_map(move |i| (i..k).map(move |j| m[[i, j]])))
        };
        let mismatch = || FisherError::InvalidInput("the result does not have the network's shape".into());
        let mut deposit = |part: usize, values: Vec<f64>| -> Result<()> {
            let target = sums.parts.get_mut(part).ok_or_else(mismatch)?;
            if target.len() != values.len() {
                return Err(mismatch());
            }
            target.deposit(0, &values)
        };
        match result {
            NetFisher::Diagonal(d) => {
                let mut offset = 0;
                for (l, s) in layers.iter().enumerate() {
                    let aug = s.augmented_in();
                    let mut block = vec![0f32; s.params()];
                    if offset + s.params() > d.len() {
                        return Err(mismatch());
                    }
                    for o in 0..s.fan_out {
                        for i in 0..s.fan_in {
                            block[o * aug + i] = d[offset + o * s.fan_in + i];
                        }
                        if s.bias {
                            block[o * aug + s.fan_in] = d[offset + s.fan_out * s.fan_in + o];
                        }
                    }
                    offset += s.params();
                    deposit(l, scaled(&mut block.into_iter()))?;
                }
            }
            NetFisher::Kfac(factors) => {
                for (l, f) in factors.iter().enumerate() {
                    deposit(2 * l, upper(&f.a))?;
                    deposit(2 * l + 1, upper(&f.g))?;
                }
            }
            NetFisher::Layer(blocks) => {
                for (l, b) in blocks.iter().enumerate() {
                    deposit(l, upper(b))?;
                }
            }
            NetFisher::Full(f) => deposit(0, upper(f))?,
            NetFisher::Grads(_) | NetFisher::Norms(_) => unreachable!("NetSums::zero refuses per-sample forms"),
        }
        Ok(sums)
    }

    /// Checks that the parts have the layout of the form and layers.
    pub fn check(&self) -> Result<()> {
        let layout = part_layout(self.form, &self.layers)?;
        if layout.len() != self.parts.len() {
            return Err(FisherError::InvalidInput(format!(
                "{} sums need {} parts, found {}",
                self.form.name(),
                layout.len(),
                self.parts.len()
            )));
        }
        for ((name, len), part) in layout.iter().zip(&self.parts) {
            if part.len() != *len {
                return Err(FisherError::InvalidInput(format!("part {name} has {} values, expected {len}", part.len())));
            }
        }
        Ok(())
    }

    /// Adds the sums of `other` (the same form and layers) to these, exactly.
    pub fn merge(&mut self, other: &NetSums) -> Result<()> {
        if other.form != self.form || other.layers != self.layers || other.parts.len() != self.parts.len() {
            return Err(FisherError::InvalidInput("cannot merge sums of different forms or networks".into()));
        }
        for (a, b) in self.parts.iter_mut().zip(&other.parts) {
            a.merge(b)?;
        }
        self.samples = self.samples.checked_add(other.samples).ok_or_else(|| FisherError::InvalidInput("sample count overflows".into()))?;
        Ok(())
    }

    /// The Fisher: every sum divided by `total` (the samples of the whole run) in f64 and
    /// rounded once to f32, exactly as a single run finishes its blocks.
    pub fn finish(&self, total: usize) -> Result<NetFisher> {
        self.check()?;
        if total == 0 {
            return Err(FisherError::InvalidInput("a Fisher over zero samples".into()));
        }
        let nf = total as f64;
        let values: Vec<Vec<f64>> = self.parts.iter().map(|p| p.values()).collect();
        Ok(match self.form {
            NetForm::Diagonal => {
                let blocks: Vec<Array2<f64>> = values
                    .into_iter()
                    .zip(&self.layers)
                    .map(|(v, s)| Array2::from_shape_vec((s.fan_out, s.augmented_in()), v).expect("checked layout"))
                    .collect();
                NetFisher::Diagonal(diag_of(blocks, &self.layers, nf))
            }
            NetForm::Kfac => NetFisher::Kfac(
                self.layers
                    .iter()
                    .enumerate()
                    .map(|(l, s)| KfacFactors {
                        a: symmetric_of(&values[2 * l], s.augmented_in(), nf),
                        g: symmetric_of(&values[2 * l + 1], s.fan_out, nf),
                    })
                    .collect(),
            ),
            NetForm::Layer => NetFisher::Layer(
                self.layers.iter().zip(&values).map(|(s, v)| symmetric_of(v, s.params(), nf)).collect(),
            ),
            NetForm::Full => {
                let p = self.layers.iter().map(|s| s.params()).sum();
                NetFisher::Full(symmetric_of(&values[0], p, nf))
            }
            NetForm::Grads | NetForm::Norms => unreachable!("part_layout refuses per-sample forms"),
        })
    }
}

/// diag(F) in θ order from the per-layer augmented sums: `(sum / nf) as f32` (the single
/// run's formula, so that both give the same bits).
///
/// Each layer's f64 sums are freed once written, and the zeroed result is only touched as it
/// is written, so the peak is the f64 sums (2× the parameters' bytes) rather than the f64
/// sums plus the f32 result.
///
/// The weights' rows in parallel, each a loop over contiguous values (the element-indexed
/// single-threaded loop, dividing one value at a time, was 1 % of W3's empirical diag).
pub(crate) fn diag_of(blocks: Vec<Array2<f64>>, layers: &[SumLayer], nf: f64) -> Array1<f32> {
    use rayon::prelude::*;
    let p: usize = layers.iter().map(|s| s.params()).sum();
    let mut diag = vec![0f32; p];
    let mut offset = 0;
    for (s, d) in layers.iter().zip(blocks) {
        assert_eq!(d.dim(), (s.fan_out, s.augmented_in()), "a layer's diag sums");
        let (weights, biases) = diag[offset..offset + s.params()].split_at_mut(s.fan_out * s.fan_in);
        weights.par_chunks_mut(s.fan_in.max(1)).zip(d.axis_iter(ndarray::Axis(0))).for_each(|(out, row)| {
            for (o, &v) in out.iter_mut().zip(row.iter()) {
                *o = (v / nf) as f32;
            }
        });
        if s.bias {
            for (o, b) in biases.iter_mut().enumerate() {
                *b = (d[[o, s.fan_in]] / nf) as f32;
            }
        }
        offset += s.params();
    }
    Array1::from(diag)
}

/// The symmetric m × m matrix `(v · (1/nf)) as f32` from its packed upper triangle, mirrored
/// bit for bit (the formula of the CPU symmetric sums' `finish`).
pub(crate) fn symmetric_of(packed: &[f64], m: usize, nf: f64) -> Array2<f32> {
    use rayon::prelude::*;
    let scale = 1.0 / nf;
    let mut out = Array2::<f32>::zeros((m, m));
    if let Some(rows) = out.as_slice_mut() {
        rows.par_chunks_mut(m.max(1)).enumerate().for_each(|(i, row)| {
            // Row i: (i, j) for j ≥ i from row i's packed run; (i, j < i) from row j's.
            let start = packed_row(i, m);
            for (j, o) in row.iter_mut().enumerate().skip(i) {
                *o = (packed[start + j - i] * scale) as f32;
            }
            for (j, o) in row.iter_mut().enumerate().take(i) {
                *o = (packed[packed_row(j, m) + i - j] * scale) as f32;
            }
        });
    }
    out
}

/// The sample range of shard `index` of `count` over `n` samples cut in blocks of `block`:
/// blocks ⌊index·nb/count⌋ .. ⌊(index+1)·nb/count⌋ of the nb = ⌈n/block⌉ blocks, so every
/// shard is whole blocks, the shards cover 0..n once in order, and their sizes differ by at
/// most one block (a shard is empty when there are fewer blocks than shards).
pub fn shard_range(n: usize, block: usize, index: usize, count: usize) -> std::ops::Range<usize> {
    assert!(block > 0 && count > 0 && index < count, "shard {index}/{count} of blocks of {block}");
    let blocks = n.div_ceil(block) as u128;
    let cut = |i: usize| ((blocks * i as u128 / count as u128) as usize).saturating_mul(block).min(n);
    cut(index)..cut(index + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_rows_index_the_upper_triangle() {
        for m in [1, 2, 5, 17] {
            let mut k = 0;
            for i in 0..m {
                assert_eq!(packed_row(i, m), k);
                k += m - i;
            }
            assert_eq!(k, packed_len(m));
        }
    }

    #[test]
    fn shards_are_whole_blocks_covering_every_sample_once() {
        for (n, block, count) in [(1000, 100, 4), (1000, 64, 3), (10, 100, 4), (1, 1, 1), (257, 16, 7), (100, 1, 100)] {
            let ranges: Vec<_> = (0..count).map(|i| shard_range(n, block, i, count)).collect();
            assert_eq!(ranges[0].start, 0);
            assert_eq!(ranges.last().unwrap().end, n);
            for w in ranges.windows(2) {
                assert_eq!(w[0].end, w[1].start);
            }
            for r in &ranges {
                assert!(r.start % block == 0 && (r.end % block == 0 || r.end == n), "{r:?}");
            }
            let sizes: Vec<usize> = ranges.iter().map(|r| r.len().div_ceil(block)).collect();
            assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1, "{sizes:?}");
        }
    }

    #[test]
    fn symmetric_matrices_mirror_their_packed_triangle() {
        let m = 4;
        let packed: Vec<f64> = (0..packed_len(m)).map(|k| k as f64 + 0.5).collect();
        let s = symmetric_of(&packed, m, 2.0);
        assert_eq!(s, s.t());
        assert_eq!(s[[0, 0]], 0.25);
        assert_eq!(s[[1, 3]], (packed[packed_row(1, m) + 2] / 2.0) as f32);
    }
}
