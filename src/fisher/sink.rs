//! Results written piece by piece: where a network's Fisher goes when it is computed in
//! passes and must not be whole in memory.
//!
//! A [`ResultSink`] receives the tensors of a [`NetFisher`] of one form as runs of values
//! at flat row-major offsets, in any order, each value exactly once. The tensors are
//! numbered as [`tensor_shapes`] lists them:
//!
//! | form | tensors |
//! |---|---|
//! | `full` | F (P×P) |
//! | `diag` | diag(F) (P, θ order) |
//! | `layer` | the block of each layer (P_l×P_l), in layer order |
//! | `kfac` | A₀ ((in+1)²), G₀ (out²), A₁, G₁, … |
//!
//! [`MemorySink`] collects them into a [`NetFisher`]; the command line's result writer
//! (`crate::io::safetensors::SafetensorsStream`) puts them straight into the output file, so
//! that a result computed in passes ([`crate::FisherBackend::network_fisher_into`]) is never
//! whole in host memory.

use ndarray::{Array1, Array2};

use super::{KfacFactors, NetFisher, NetForm, SumLayer};
use crate::error::{FisherError, Result};

/// Where a result's values go (see the [module docs](self)).
pub trait ResultSink {
    /// Stores `values` in tensor `tensor` from the flat (row-major) index `at` on.
    fn put(&mut self, tensor: usize, at: usize, values: &[f32]) -> Result<()>;

    /// The tensors as whole row-major buffers in memory, when the sink keeps them there: the
    /// writers of symmetric bands then fill them in parallel rather than run by run.
    fn buffers(&mut self) -> Option<&mut [Vec<f32>]> {
        None
    }
}

/// The shapes of the tensors of `form` for `layers`, in the sink's order (see the
/// [module docs](self)); `None` for the per-sample forms (`grads`, `norms`), which are not
/// written through a sink.
pub fn tensor_shapes(form: NetForm, layers: &[SumLayer]) -> Option<Vec<Vec<usize>>> {
    let p: usize = layers.iter().map(SumLayer::params).sum();
    Some(match form {
        NetForm::Full => vec![vec![p, p]],
        NetForm::Diagonal => vec![vec![p]],
        NetForm::Layer => layers.iter().map(|l| vec![l.params(), l.params()]).collect(),
        NetForm::Kfac => layers.iter().flat_map(|l| [vec![l.augmented_in(); 2], vec![l.fan_out; 2]]).collect(),
        NetForm::Grads | NetForm::Norms => return None,
    })
}

/// Number of values of a tensor of `shape`, checked.
fn count(shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| FisherError::InvalidInput(format!("a tensor of shape {shape:?} overflows usize")))
}

/// A sink that keeps every tensor in memory and becomes the [`NetFisher`] it describes.
pub struct MemorySink {
    form: NetForm,
    shapes: Vec<Vec<usize>>,
    tensors: Vec<Vec<f32>>,
}

impl MemorySink {
    /// Zeroed tensors of `form` for `layers` (sizes checked; the caller has bounded the
    /// result against its limit).
    pub fn new(form: NetForm, layers: &[SumLayer]) -> Result<Self> {
        let shapes = tensor_shapes(form, layers)
            .ok_or_else(|| FisherError::InvalidInput(format!("--form {form} is per sample, not a sum to write in pieces")))?;
        let tensors = shapes.iter().map(|s| count(s).map(|n| vec![0f32; n])).collect::<Result<_>>()?;
        Ok(MemorySink { form, shapes, tensors })
    }

    /// The result.
    pub fn into_fisher(self) -> NetFisher {
        let matrix = |v: Vec<f32>, s: &[usize]| Array2::from_shape_vec((s[0], s[1]), v).expect("shape checked in new");
        let mut tensors = self.tensors.into_iter().zip(self.shapes);
        match self.form {
            NetForm::Full => {
                let (v, s) = tensors.next().expect("one tensor");
                NetFisher::Full(matrix(v, &s))
            }
            NetForm::Diagonal => NetFisher::Diagonal(Array1::from(tensors.next().expect("one tensor").0)),
            NetForm::Layer => NetFisher::Layer(tensors.map(|(v, s)| matrix(v, &s)).collect()),
            NetForm::Kfac => {
                let all: Vec<Array2<f32>> = tensors.map(|(v, s)| matrix(v, &s)).collect();
                let mut it = all.into_iter();
                let mut factors = Vec::new();
                while let (Some(a), Some(g)) = (it.next(), it.next()) {
                    factors.push(KfacFactors { a, g });
                }
                NetFisher::Kfac(factors)
            }
            NetForm::Grads | NetForm::Norms => unreachable!("refused in new"),
        }
    }
}

impl ResultSink for MemorySink {
    fn put(&mut self, tensor: usize, at: usize, values: &[f32]) -> Result<()> {
        let out = self
            .tensors
            .get_mut(tensor)
            .and_then(|t| t.get_mut(at..at.checked_add(values.len())?))
            .ok_or_else(|| FisherError::InvalidInput(format!("values {at}+{} outside tensor {tensor}", values.len())))?;
        out.copy_from_slice(values);
        Ok(())
    }

    fn buffers(&mut self) -> Option<&mut [Vec<f32>]> {
        Some(&mut self.tensors)
    }
}

/// Puts the whole array `a` as tensor `t`: borrowed when it is one contiguous row-major
/// buffer (every result this crate computes), copied otherwise.
fn put<D: ndarray::Dimension>(sink: &mut dyn ResultSink, t: usize, a: &ndarray::Array<f32, D>) -> Result<()> {
    match a.as_slice() {
        Some(values) => sink.put(t, 0, values),
        None => sink.put(t, 0, &a.iter().copied().collect::<Vec<_>>()),
    }
}

impl NetFisher {
    /// Writes every tensor of this result whole into `sink` (in the sink's order; see the
    /// [module docs](self)). The per-sample forms are refused.
    pub fn put_into(&self, sink: &mut dyn ResultSink) -> Result<()> {
        match self {
            NetFisher::Full(m) => put(sink, 0, m),
            NetFisher::Diagonal(d) => put(sink, 0, d),
            NetFisher::Layer(blocks) => blocks.iter().enumerate().try_for_each(|(t, b)| put(sink, t, b)),
            NetFisher::Kfac(factors) => factors.iter().enumerate().try_for_each(|(l, f)| {
                put(sink, 2 * l, &f.a)?;
                put(sink, 2 * l + 1, &f.g)
            }),
            NetFisher::Grads(_) | NetFisher::Norms(_) => Err(FisherError::InvalidInput(format!(
                "--form {} is per sample, not a sum to write in pieces",
                self.form_name()
            ))),
        }
    }
}

impl crate::fisher::FisherMatrix {
    /// Writes this reduction's tensors whole into `sink`: F, diag(F), K or the norms as
    /// tensor 0, the blocks as tensors 0, 1, … in parameter order.
    pub fn put_into(&self, sink: &mut dyn ResultSink) -> Result<()> {
        use crate::fisher::FisherMatrix;
        match self {
            FisherMatrix::Full(m) | FisherMatrix::Gram(m) => put(sink, 0, m),
            FisherMatrix::Diagonal(d) | FisherMatrix::SampleNorms(d) => put(sink, 0, d),
            FisherMatrix::BlockDiagonal(blocks) => blocks.iter().enumerate().try_for_each(|(t, b)| put(sink, t, b)),
        }
    }
}

/// The trace of a result as its pieces pass through (what [`NetFisher::trace`] gives for
/// the whole result): the diagonal entries of the square tensors and every value of `diag`,
/// combined per form (Σ_l tr(A_l)·tr(G_l) for kfac). Each value must be put once.
#[derive(Debug, Clone)]
pub struct TraceOf {
    form: NetForm,
    sides: Vec<Option<usize>>,
    traces: Vec<f64>,
}

impl TraceOf {
    /// For the tensors `shapes` of `form` (from [`tensor_shapes`]).
    pub fn new(form: NetForm, shapes: &[Vec<usize>]) -> Self {
        let sides = shapes.iter().map(|s| (s.len() == 2).then(|| s[1])).collect();
        TraceOf { form, sides, traces: vec![0.0; shapes.len()] }
    }

    /// Takes note of `values` put in `tensor` from `at`.
    pub fn observe(&mut self, tensor: usize, at: usize, values: &[f32]) {
        let Some(side) = self.sides.get(tensor) else { return };
        match side {
            None => self.traces[tensor] += values.iter().map(|&v| f64::from(v)).sum::<f64>(),
            Some(m) => {
                // The diagonal entries k·(m+1) within [at, at + len).
                let stride = m + 1;
                let mut k = at.div_ceil(stride) * stride;
                while k < at + values.len() {
                    self.traces[tensor] += f64::from(values[k - at]);
                    k += stride;
                }
            }
        }
    }

    /// The trace of everything observed.
    pub fn trace(&self) -> f64 {
        match self.form {
            NetForm::Kfac => self.traces.chunks(2).map(|ag| ag[0] * ag.get(1).copied().unwrap_or(0.0)).sum(),
            _ => self.traces.iter().sum(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layers() -> Vec<SumLayer> {
        vec![SumLayer { fan_out: 3, fan_in: 2, bias: true }, SumLayer { fan_out: 2, fan_in: 3, bias: false }]
    }

    #[test]
    fn a_memory_sink_rebuilds_every_summed_form_and_traces_agree() {
        let layers = layers();
        let p = 9 + 6;
        let sym = |m: usize, seed: f32| Array2::from_shape_fn((m, m), |(i, j)| seed + (i.min(j) * 7 + i.max(j)) as f32);
        let results = [
            NetFisher::Full(sym(p, 0.5)),
            NetFisher::Diagonal(Array1::from_shape_fn(p, |i| i as f32 * 0.25)),
            NetFisher::Layer(vec![sym(9, 1.0), sym(6, 2.0)]),
            NetFisher::Kfac(vec![KfacFactors { a: sym(3, 1.0), g: sym(3, 2.0) }, KfacFactors { a: sym(3, 3.0), g: sym(2, 4.0) }]),
        ];
        for result in results {
            let form = result.form();
            let shapes = tensor_shapes(form, &layers).unwrap();
            let mut sink = MemorySink::new(form, &layers).unwrap();
            // Piece by piece, in odd-sized runs, as a pass would put them.
            let whole = {
                let mut s = MemorySink::new(form, &layers).unwrap();
                result.put_into(&mut s).unwrap();
                s.tensors
            };
            let mut trace = TraceOf::new(form, &shapes);
            for (t, values) in whole.iter().enumerate() {
                for (c, run) in values.chunks(5).enumerate() {
                    sink.put(t, c * 5, run).unwrap();
                    trace.observe(t, c * 5, run);
                }
            }
            assert!((trace.trace() - result.trace()).abs() <= 1e-9 * result.trace().abs(), "{form}");
            assert_eq!(sink.into_fisher(), result, "{form}");
        }
    }

    #[test]
    fn a_put_outside_its_tensor_is_an_error() {
        let mut sink = MemorySink::new(NetForm::Diagonal, &layers()).unwrap();
        assert!(sink.put(0, 14, &[1.0, 2.0]).is_err());
        assert!(sink.put(1, 0, &[1.0]).is_err());
        assert!(sink.put(0, usize::MAX, &[1.0]).is_err());
        assert!(MemorySink::new(NetForm::Grads, &layers()).is_err());
    }
}
