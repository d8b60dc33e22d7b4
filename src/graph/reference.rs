//! The f64 graph reference: simple, slow, correct. The oracle for every graph Fisher computed
//! by the fast paths (which lower a [`Graph`] to gathers, GEMMs and element-wise primitives
//! and differentiate those automatically); this module shares none of that.
//!
//! Every [`Op`] has its own forward and its own vector–Jacobian product here, written
//! directly from the operator's documented semantics with plain loops in f64, one sample at a
//! time: direct convolution with explicit index arithmetic (no im2col), pools that walk their
//! windows, numpy broadcasting by explicit index maps. The tests check every operator's VJP
//! against central differences (w.r.t. θ and w.r.t. the input).
//!
//! ## Per sample i
//! The forward pass keeps every tensor's value. Reverse mode from a cotangent c of the
//! output gives the adjoint of every tensor (per-sample tensors for this sample, shared ones
//! summed over their uses), so that the parameter adjoints, concatenated in θ order (each
//! parameter row-major), are J_θᵢᵀ c. The variant gives R output rows s_r
//! ([`crate::reference::network::output_rows`], the table in [`crate::model`]); the gradient
//! rows are g_ir = J_θᵢᵀ s_r and F = (1/N) Σᵢ Σ_r g_ir g_irᵀ.
//!
//! ## Forms
//! Like the MLP reference ([`crate::reference::network::fisher`]), with the shapes it returns:
//!
//! * `Full`: F (P×P), exactly symmetric; refused above [`MAX_DENSE_BYTES`].
//! * `Diagonal`: diag F.
//! * `Layer`: one block of F per module ([`Graph::modules`]: consecutive parameters sharing
//!   the name before their last `.`, e.g. `conv1.weight` + `conv1.bias`), in θ order.
//! * `Grads`: the (N·R)×P rows, sample-major ([`per_sample_rows`]).
//! * `Norms`: per sample Σ_r ‖g_ir‖² (not divided by N; their mean is tr F).
//! * `Kfac`: see below.
//!
//! ## KFAC (Grosse & Martens 2016, "expand")
//! Only `Gemm`, `MatMul` and `Conv` nodes whose weight is a parameter get factors
//! ([`kfac_layers`]); parameters of anything else (norm scales and shifts, embeddings) have
//! none, and the factors are returned for the eligible layers in the θ order of their
//! weights. A layer computes, at each of S positions s per sample, z_s = W ã_s with W viewed
//! as Cout × K plus a bias column when the bias is a parameter:
//!
//! | node | W (Cout × K) | S | ã_s |
//! |---|---|---|---|
//! | `Gemm` | B (`trans_b`, PyTorch's out×in) or Bᵀ | 1 | [α a; β] (α = β = 1 for `nn.Linear`) |
//! | `MatMul` on [.., K] | B (`trans_b`) or Bᵀ | rows of A | [row s of A; 1] |
//! | `Conv` (group 1) | w as Cout × (Cin·kh·kw), row-major | Ho·Wo | [receptive field in (c, i, j) row-major, 0 at padding; 1] |
//!
//! (the trailing entry only with a trainable bias). With δ_{i,r,s} = ∂(s_irᵀ z_i)/∂(the node's
//! output at position s) (Cout values),
//!
//! ```text
//! A = (1/N) Σᵢ Σ_s ã_{i,s} ã_{i,s}ᵀ          G = (1/N) Σᵢ Σ_r (1/S) Σ_s δ_{i,r,s} δ_{i,r,s}ᵀ
//! ```
//!
//! (Ω sums over positions, Γ averages; for S = 1 this is the MLP convention of
//! [`crate::fisher::KfacFactors`]). The layer's block is ≈ G ⊗ A in the row-major order of
//! [W | b] (index o·(K+1) + k, the bias at k = K), as [`crate::fisher::kfac_expand`] expands
//! it. For `Gemm`/`MatMul` without `trans_b`, W = Bᵀ, so that order is a permutation of the
//! parameter's θ order. Grouped convolutions are refused (KFAC of a block-diagonal W is not
//! defined here), as are weights or biases used by several nodes (tied weights).
//!
//! ### Compared with curvlinops
//! curvlinops' `KFACLinearOperator` (f-dangel/curvlinops at 63fd690, `kfac_approx="expand"`,
//! hooks backend, `CrossEntropyLoss` on [batch, C] outputs so `num_per_example_loss_terms` =
//! 1, `separate_weight_and_bias=False`) computes, with N_data the dataset size and
//! S = `x.shape[1]` the number of positions after `input_to_weight_sharing_format`:
//!
//! ```text
//! curvlinops/computers/kfac_hooks.py, _hook_accumulate_input_covariance:
//!     scale = x.shape[1]
//!     covariance = einsum(x, x, "batch shared i, batch shared j -> i j").div_(
//!         self._N_data * scale
//!     )
//! curvlinops/computers/kfac_hooks.py, _compute_loss_and_backward:
//!     num_loss_terms = output.shape[0]
//!     reduction = self._loss_func.reduction
//!     scale = {"sum": 1.0, "mean": 1.0 / num_loss_terms}[reduction]
//!     grad_outputs.mul_(scale)
//! curvlinops/computers/kfac_hooks.py, _accumulate_gradient_covariance:
//!     correction = compute_loss_correction(batch_size, self._num_per_example_loss_terms,
//!                                          self._loss_func.reduction, self._N_data)
//!     covariance = einsum(g, g, "batch shared i, batch shared j -> i j").mul_(correction)
//! curvlinops/computers/kfac_math.py, compute_loss_correction:
//!     num_loss_terms = batch_size * num_per_example_loss_terms
//!     denominator = num_per_example_loss_terms
//!     if n_data is not None:
//!         denominator *= n_data
//!     return {"sum": 1.0, "mean": num_loss_terms**2 / denominator}[loss_reduction]
//! ```
//!
//! So A_cl = (1/(N·S)) Σᵢ Σ_s ã ãᵀ = **A / S** in both reductions. For `"mean"` the
//! backpropagated vectors are scaled by 1/B (B = batch size) and the covariance by B²/N, so
//! G_cl = (1/N) Σᵢ Σ_r Σ_s δ δᵀ = **S · G**, and G_cl ⊗ A_cl = G ⊗ A (our F is the mean
//! Fisher). For `"sum"`, neither scaling applies: G_cl = Σᵢ Σ_r Σ_s δ δᵀ = **N·S · G** and
//! G_cl ⊗ A_cl = **N · (G ⊗ A)**, the Fisher of the summed loss. (For S = 1 the factors
//! themselves agree under `"mean"`.) Two further differences when comparing: curvlinops
//! orders a layer's parameters column-stacked (vec W, then b) so its block is A ⊗ G, and
//! its default `separate_weight_and_bias=True` gives W and b separate factor pairs; and its
//! `MSELoss` is ‖y − f‖² (Hessian 2I, and `"mean"` also divides by C), not our unit-variance
//! Gaussian ½‖y − f‖².
//!
//! ## Accuracy and memory
//! Everything is f64; sums of outer products over samples use ndarray's f64 `dot`, and the
//! division by N is done once at the end. Samples of a batch run in parallel (rayon) and are
//! reduced in sample order, so results are reproducible across runs and thread counts. Each
//! dense result (F, the layer blocks, the gradient rows) is allocated fallibly and refused
//! above [`MAX_DENSE_BYTES`].

use ndarray::linalg::general_mat_mul;
use ndarray::{s, Array1, Array2, ArrayView1};
use rayon::prelude::*;

use super::ir::{BinaryOp, Graph, Node, Op, TensorId, TensorKind, UnaryOp, Window};
use crate::error::{FisherError, Result};
use crate::fisher::{rows_per_sample, KfacFactors, NetFisher, NetForm, Variant};
use crate::model::{Dataset, Likelihood, Targets};
use crate::reference::network::output_rows;

/// The largest dense f64 result (F, the layer blocks together, the gradient rows) this
/// reference allocates: 8 GiB, a full F for P ≈ 32,000. Beyond that a fast path is being
/// checked on a model too large for a dense oracle anyway.
pub const MAX_DENSE_BYTES: u64 = 8 << 30;

/// Bytes of per-sample gradient rows held at once (one batch of samples).
const BATCH_BYTES: usize = 32 << 20;

/// Most samples per batch.
const MAX_BATCH: usize = 256;

fn invalid(message: String) -> FisherError {
    FisherError::InvalidInput(message)
}

/// Prefixes an input error with the sample it happened in.
fn in_sample(sample: usize) -> impl Fn(FisherError) -> FisherError {
    move |e| match e {
        FisherError::InvalidInput(m) => FisherError::InvalidInput(format!("sample {sample}: {m}")),
        other => other,
    }
}

/// A graph with its shared tensors (parameters, constants) in f64.
struct Net<'g> {
    graph: &'g Graph,
    /// Indexed by tensor; the f64 values of shared tensors, empty for per-sample ones.
    shared: Vec<Vec<f64>>,
}

impl<'g> Net<'g> {
    /// The graph at its own parameters (converted exactly from f32).
    fn new(graph: &'g Graph) -> Result<Self> {
        graph.validate()?;
        let shared = graph
            .tensors
            .iter()
            .map(|t| match &t.kind {
                TensorKind::Param(p) => graph.params[*p].data.iter().map(|&v| f64::from(v)).collect(),
                TensorKind::Const(v) => v.iter().map(|&v| f64::from(v)).collect(),
                _ => Vec::new(),
            })
            .collect();
        Ok(Net { graph, shared })
    }

    /// The graph at parameters θ given in f64 (θ order).
    fn at(graph: &'g Graph, theta: &[f64]) -> Result<Self> {
        let mut net = Net::new(graph)?;
        if theta.len() != graph.param_count() {
            return Err(invalid(format!("θ has {} values; the graph has {} parameters", theta.len(), graph.param_count())));
        }
        let offsets = graph.param_offsets();
        for (k, p) in graph.params.iter().enumerate() {
            net.shared[p.tensor] = theta[offsets[k]..offsets[k + 1]].to_vec();
        }
        Ok(net)
    }

    fn shape(&self, t: TensorId) -> &[usize] {
        &self.graph.tensors[t].shape
    }

    /// The value of tensor `t`: per-sample from `values`, shared from the net.
    fn value<'a>(&'a self, values: &'a [Vec<f64>], t: TensorId) -> &'a [f64] {
        if self.graph.tensors[t].per_sample() {
            &values[t]
        } else {
            &self.shared[t]
        }
    }

    /// The value of every per-sample tensor (indexed by tensor; shared ones left empty) for
    /// the flattened input `x`.
    fn forward(&self, x: &[f64]) -> Result<Vec<Vec<f64>>> {
        let graph = self.graph;
        let expected = graph.tensors[graph.input].len();
        if x.len() != expected {
            return Err(invalid(format!("the input has {} values; the graph expects {expected} (shape {:?})", x.len(), graph.input_shape())));
        }
        let mut values = vec![Vec::new(); graph.tensors.len()];
        values[graph.input] = x.to_vec();
        for node in &graph.nodes {
            values[node.output] = self.forward_node(node, &values)?;
        }
        Ok(values)
    }

    /// The adjoint of every tensor given the cotangent of the output (per-sample tensors for
    /// this sample; shared tensors summed over their uses).
    fn backward(&self, values: &[Vec<f64>], cotangent: &[f64]) -> Result<Vec<Vec<f64>>> {
        let graph = self.graph;
        if cotangent.len() != graph.outputs() {
            return Err(invalid(format!("the cotangent has {} values; the graph has {} outputs", cotangent.len(), graph.outputs())));
        }
        let mut adjoints: Vec<Vec<f64>> = graph.tensors.iter().map(|t| vec![0.0; t.len()]).collect();
        adjoints[graph.output].copy_from_slice(cotangent);
        for node in graph.nodes.iter().rev() {
            let contributions = self.backward_node(node, values, &adjoints[node.output])?;
            // Added input by input (not through simultaneous borrows) so that a node reading
            // one tensor twice, e.g. Mul(x, x), gets both contributions.
            for (&input, contribution) in node.inputs.iter().zip(contributions) {
                for (a, c) in adjoints[input].iter_mut().zip(contribution) {
                    *a += c;
                }
            }
        }
        Ok(adjoints)
    }

    /// θ-order parameter gradient from the adjoints.
    fn param_gradient(&self, adjoints: &[Vec<f64>]) -> Vec<f64> {
        self.graph.params.iter().flat_map(|p| adjoints[p.tensor].iter().copied()).collect()
    }

    fn forward_node(&self, node: &Node, values: &[Vec<f64>]) -> Result<Vec<f64>> {
        let v = |k: usize| self.value(values, node.inputs[k]);
        let shape = |k: usize| self.shape(node.inputs[k]);
        let out_shape = self.shape(node.output);
        let err = |m: String| invalid(format!("node {} ({}): {m}", node.name, super::ir::op_name(&node.op)));
        Ok(match &node.op {
            Op::Gemm { alpha, beta, trans_b } => {
                let (a, b) = (v(0), v(1));
                let (k, m) = gemm_dims(shape(1), *trans_b);
                let c = node.inputs.get(2).map(|_| v(2));
                let (alpha, beta) = (f64::from(*alpha), f64::from(*beta));
                (0..m)
                    .map(|o| {
                        let product: f64 = (0..k).map(|i| a[i] * b[b_index(*trans_b, k, m, i, o)]).sum();
                        // C broadcasts to [M]: one value for all outputs, or one each.
                        let bias = c.map_or(0.0, |c| if c.len() == 1 { c[0] } else { c[o] });
                        alpha * product + beta * bias
                    })
                    .collect()
            }
            Op::MatMul { trans_b } => {
                let (a, b) = (v(0), v(1));
                let (k, m) = gemm_dims(shape(1), *trans_b);
                let bias = node.inputs.get(2).map(|_| v(2));
                let rows = a.len() / k.max(1);
                let mut y = vec![0.0; rows * m];
                for r in 0..rows {
                    for o in 0..m {
                        let product: f64 = (0..k).map(|i| a[r * k + i] * b[b_index(*trans_b, k, m, i, o)]).sum();
                        y[r * m + o] = product + bias.map_or(0.0, |b| b[o]);
                    }
                }
                y
            }
            Op::Conv { window, group } => {
                let conv = Conv::new(shape(0), shape(1), out_shape, *window, *group);
                conv.forward(v(0), v(1), node.inputs.get(2).map(|_| v(2)))
            }
            Op::MaxPool { window, .. } => {
                let pool = Pool::new(shape(0), out_shape, *window);
                let x = v(0);
                let mut y = vec![0.0; pool.out_len()];
                for (o, slot) in y.iter_mut().enumerate() {
                    let winner = pool.max_tap(x, o).ok_or_else(|| err(format!("window {o} covers only padding")))?;
                    *slot = x[winner];
                }
                y
            }
            Op::AveragePool { window, count_include_pad, .. } => {
                if window.dilations != [1, 1] {
                    return Err(err(format!("dilations {:?} are not supported (AveragePool has dilations 1)", window.dilations)));
                }
                let pool = Pool::new(shape(0), out_shape, *window);
                let x = v(0);
                let mut y = vec![0.0; pool.out_len()];
                for (o, slot) in y.iter_mut().enumerate() {
                    let (taps, divisor) = pool.average_taps(o, *count_include_pad);
                    if divisor == 0 {
                        return Err(err(format!("window {o} covers only padding")));
                    }
                    *slot = taps.iter().map(|&t| x[t]).sum::<f64>() / divisor as f64;
                }
                y
            }
            Op::GlobalAveragePool => {
                let x = v(0);
                let (c, area) = (shape(0)[0], shape(0)[1] * shape(0)[2]);
                (0..c).map(|ch| x[ch * area..(ch + 1) * area].iter().sum::<f64>() / area as f64).collect()
            }
            Op::ReduceMean { axes, .. } => {
                let (map, count) = reduce_map(shape(0), axes);
                let mut y = vec![0.0; out_shape.iter().product()];
                for (i, &o) in map.iter().enumerate() {
                    y[o] += v(0)[i];
                }
                y.iter_mut().for_each(|s| *s /= count as f64);
                y
            }
            Op::Reshape | Op::Identity => v(0).to_vec(),
            Op::Transpose { perm } => {
                let map = transpose_map(shape(0), perm);
                map.iter().map(|&i| v(0)[i]).collect()
            }
            Op::Concat { axis } => {
                let mut y = vec![0.0; out_shape.iter().product()];
                for (part, map) in concat_maps(node, self, *axis).iter().enumerate() {
                    for (i, &o) in map.iter().enumerate() {
                        y[o] = v(part)[i];
                    }
                }
                y
            }
            Op::Unary(u) => v(0).iter().map(|&x| unary(*u, x)).collect(),
            Op::Binary(b) => {
                let (ma, mb) = (broadcast_map(shape(0), out_shape), broadcast_map(shape(1), out_shape));
                let (a, bv) = (v(0), v(1));
                ma.iter()
                    .zip(&mb)
                    .map(|(&i, &j)| match b {
                        BinaryOp::Add => a[i] + bv[j],
                        BinaryOp::Sub => a[i] - bv[j],
                        BinaryOp::Mul => a[i] * bv[j],
                        BinaryOp::Div => a[i] / bv[j],
                    })
                    .collect()
            }
            Op::BatchNorm { epsilon } => {
                let (x, gamma, beta, mean, var) = (v(0), v(1), v(2), v(3), v(4));
                let inner = x.len() / shape(0)[0];
                let eps = f64::from(*epsilon);
                x.iter()
                    .enumerate()
                    .map(|(i, &xi)| {
                        let c = i / inner;
                        gamma[c] * (xi - mean[c]) / (var[c] + eps).sqrt() + beta[c]
                    })
                    .collect()
            }
            Op::LayerNorm { axis, epsilon } => {
                let x = v(0);
                let d: usize = shape(0)[*axis..].iter().product();
                let (gamma, beta) = (v(1), node.inputs.get(2).map(|_| v(2)));
                let mut y = vec![0.0; x.len()];
                for (group, out) in x.chunks(d.max(1)).zip(y.chunks_mut(d.max(1))) {
                    let (normalized, _) = layer_norm(group, f64::from(*epsilon));
                    for (j, o) in out.iter_mut().enumerate() {
                        *o = gamma[j] * normalized[j] + beta.map_or(0.0, |b| b[j]);
                    }
                }
                y
            }
            Op::Gather => {
                let (table, indices) = (v(0), v(1));
                let (rows, d) = (shape(0)[0], shape(0)[1]);
                let mut y = Vec::with_capacity(indices.len() * d);
                for (position, &index) in indices.iter().enumerate() {
                    let row = token(index, rows).ok_or_else(|| {
                        err(format!("index {index} at position {position} is not a row of the {rows}-row table"))
                    })?;
                    y.extend_from_slice(&table[row * d..(row + 1) * d]);
                }
                y
            }
        })
    }

    /// The contribution of `node` to the adjoint of each of its inputs (in input order; empty
    /// for an input that gets no gradient: the indices of a `Gather`) given `dy`, the
    /// adjoint of its output.
    fn backward_node(&self, node: &Node, values: &[Vec<f64>], dy: &[f64]) -> Result<Vec<Vec<f64>>> {
        let v = |k: usize| self.value(values, node.inputs[k]);
        let shape = |k: usize| self.shape(node.inputs[k]);
        let zeros = |k: usize| vec![0.0; v(k).len()];
        let out_shape = self.shape(node.output);
        Ok(match &node.op {
            Op::Gemm { alpha, beta, trans_b } => {
                let (a, b) = (v(0), v(1));
                let (k, m) = gemm_dims(shape(1), *trans_b);
                let (alpha, beta) = (f64::from(*alpha), f64::from(*beta));
                let (mut da, mut db) = (zeros(0), zeros(1));
                for (o, &g) in dy.iter().enumerate() {
                    for i in 0..k {
                        let at = b_index(*trans_b, k, m, i, o);
                        da[i] += alpha * b[at] * g;
                        db[at] += alpha * a[i] * g;
                    }
                }
                let mut out = vec![da, db];
                if node.inputs.len() > 2 {
                    let mut dc = zeros(2);
                    let shared_c = dc.len() == 1;
                    for (o, &g) in dy.iter().enumerate() {
                        dc[if shared_c { 0 } else { o }] += beta * g;
                    }
                    out.push(dc);
                }
                out
            }
            Op::MatMul { trans_b } => {
                let (a, b) = (v(0), v(1));
                let (k, m) = gemm_dims(shape(1), *trans_b);
                let rows = a.len() / k.max(1);
                let (mut da, mut db) = (zeros(0), zeros(1));
                let mut dbias = vec![0.0; m];
                for r in 0..rows {
                    for o in 0..m {
                        let g = dy[r * m + o];
                        dbias[o] += g;
                        for i in 0..k {
                            let at = b_index(*trans_b, k, m, i, o);
                            da[r * k + i] += b[at] * g;
                            db[at] += a[r * k + i] * g;
                        }
                    }
                }
                let mut out = vec![da, db];
                if node.inputs.len() > 2 {
                    out.push(dbias);
                }
                out
            }
            Op::Conv { window, group } => {
                let conv = Conv::new(shape(0), shape(1), out_shape, *window, *group);
                let (dx, dw, db) = conv.backward(v(0), v(1), dy);
                let mut out = vec![dx, dw];
                if node.inputs.len() > 2 {
                    out.push(db);
                }
                out
            }
            Op::MaxPool { window, .. } => {
                let pool = Pool::new(shape(0), out_shape, *window);
                let x = v(0);
                let mut dx = zeros(0);
                for (o, &g) in dy.iter().enumerate() {
                    // The forward refused windows of padding only, so there is a winner.
                    if let Some(winner) = pool.max_tap(x, o) {
                        dx[winner] += g;
                    }
                }
                vec![dx]
            }
            Op::AveragePool { window, count_include_pad, .. } => {
                let pool = Pool::new(shape(0), out_shape, *window);
                let mut dx = zeros(0);
                for (o, &g) in dy.iter().enumerate() {
                    let (taps, divisor) = pool.average_taps(o, *count_include_pad);
                    for t in taps {
                        dx[t] += g / divisor.max(1) as f64;
                    }
                }
                vec![dx]
            }
            Op::GlobalAveragePool => {
                let area = shape(0)[1] * shape(0)[2];
                vec![(0..v(0).len()).map(|i| dy[i / area] / area as f64).collect()]
            }
            Op::ReduceMean { axes, .. } => {
                let (map, count) = reduce_map(shape(0), axes);
                vec![map.iter().map(|&o| dy[o] / count as f64).collect()]
            }
            Op::Reshape | Op::Identity => vec![dy.to_vec()],
            Op::Transpose { perm } => {
                let mut dx = zeros(0);
                for (o, &i) in transpose_map(shape(0), perm).iter().enumerate() {
                    dx[i] += dy[o];
                }
                vec![dx]
            }
            Op::Concat { axis } => concat_maps(node, self, *axis)
                .iter()
                .map(|map| map.iter().map(|&o| dy[o]).collect())
                .collect(),
            Op::Unary(u) => vec![v(0).iter().zip(dy).map(|(&x, &g)| g * unary_derivative(*u, x)).collect()],
            Op::Binary(b) => {
                let (ma, mb) = (broadcast_map(shape(0), out_shape), broadcast_map(shape(1), out_shape));
                let (a, bv) = (v(0), v(1));
                let (mut da, mut db) = (zeros(0), zeros(1));
                for (o, (&i, &j)) in ma.iter().zip(&mb).enumerate() {
                    let g = dy[o];
                    let (ga, gb) = match b {
                        BinaryOp::Add => (g, g),
                        BinaryOp::Sub => (g, -g),
                        BinaryOp::Mul => (g * bv[j], g * a[i]),
                        BinaryOp::Div => (g / bv[j], -g * a[i] / (bv[j] * bv[j])),
                    };
                    da[i] += ga;
                    db[j] += gb;
                }
                vec![da, db]
            }
            Op::BatchNorm { epsilon } => {
                let (x, gamma, mean, var) = (v(0), v(1), v(3), v(4));
                let inner = x.len() / shape(0)[0];
                let eps = f64::from(*epsilon);
                let (mut dx, mut dgamma, mut dbeta, mut dmean, mut dvar) = (zeros(0), zeros(1), zeros(2), zeros(3), zeros(4));
                for (i, (&xi, &g)) in x.iter().zip(dy).enumerate() {
                    let c = i / inner;
                    let sd = (var[c] + eps).sqrt();
                    dx[i] = g * gamma[c] / sd;
                    dgamma[c] += g * (xi - mean[c]) / sd;
                    dbeta[c] += g;
                    // The running statistics are constants in an exported model, but a graph
                    // may make them parameters; their gradients cost nothing here.
                    dmean[c] -= g * gamma[c] / sd;
                    dvar[c] -= 0.5 * g * gamma[c] * (xi - mean[c]) / (sd * sd * sd);
                }
                vec![dx, dgamma, dbeta, dmean, dvar]
            }
            Op::LayerNorm { axis, epsilon } => {
                let x = v(0);
                let d: usize = shape(0)[*axis..].iter().product::<usize>().max(1);
                let gamma = v(1);
                let (mut dx, mut dgamma, mut dbeta) = (zeros(0), zeros(1), zeros(1));
                for (start, group) in (0..x.len()).step_by(d).zip(x.chunks(d)) {
                    let (normalized, inv_sd) = layer_norm(group, f64::from(*epsilon));
                    let g = &dy[start..start + d];
                    // y = γ x̂ + β with x̂ = (x − mean)·r: dx = r (ĝ − mean ĝ − x̂ mean(ĝ x̂)), ĝ = γ g.
                    let g_hat: Vec<f64> = (0..d).map(|j| g[j] * gamma[j]).collect();
                    let mean_g = g_hat.iter().sum::<f64>() / d as f64;
                    let mean_gx = g_hat.iter().zip(&normalized).map(|(a, b)| a * b).sum::<f64>() / d as f64;
                    for j in 0..d {
                        dx[start + j] = inv_sd * (g_hat[j] - mean_g - normalized[j] * mean_gx);
                        dgamma[j] += g[j] * normalized[j];
                        dbeta[j] += g[j];
                    }
                }
                let mut out = vec![dx, dgamma];
                if node.inputs.len() > 2 {
                    out.push(dbeta);
                }
                out
            }
            Op::Gather => {
                let indices = v(1);
                let (rows, d) = (shape(0)[0], shape(0)[1]);
                let mut dtable = zeros(0);
                for (position, &index) in indices.iter().enumerate() {
                    // The forward checked every index.
                    if let Some(row) = token(index, rows) {
                        for j in 0..d {
                            dtable[row * d + j] += dy[position * d + j];
                        }
                    }
                }
                vec![dtable, Vec::new()]
            }
        })
    }
}

/// (K, M) of a `Gemm`/`MatMul` right operand of shape `b`.
fn gemm_dims(b: &[usize], trans_b: bool) -> (usize, usize) {
    if trans_b {
        (b[1], b[0])
    } else {
        (b[0], b[1])
    }
}

/// Where B'[k, m] is stored in B (K×M, or M×K with `trans_b`).
fn b_index(trans_b: bool, k_len: usize, m_len: usize, k: usize, m: usize) -> usize {
    if trans_b {
        m * k_len + k
    } else {
        k * m_len + m
    }
}

/// The table row named by a token stored as a float: an exact integer in 0..rows. Negative
/// indices (which ONNX `Gather` would count from the end) are refused like PyTorch's
/// `nn.Embedding` refuses them: a negative token is a data error.
fn token(index: f64, rows: usize) -> Option<usize> {
    (index.fract() == 0.0 && index >= 0.0 && index < rows as f64).then_some(index as usize)
}

/// x̂ = (x − mean)/√(var + ε) with the biased variance, and 1/√(var + ε).
fn layer_norm(x: &[f64], epsilon: f64) -> (Vec<f64>, f64) {
    let d = x.len() as f64;
    let mean = x.iter().sum::<f64>() / d;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / d;
    let inv_sd = 1.0 / (var + epsilon).sqrt();
    (x.iter().map(|v| (v - mean) * inv_sd).collect(), inv_sd)
}

fn unary(op: UnaryOp, x: f64) -> f64 {
    match op {
        UnaryOp::Relu => x.max(0.0),
        UnaryOp::LeakyRelu(alpha) => {
            if x >= 0.0 {
                x
            } else {
                f64::from(alpha) * x
            }
        }
        UnaryOp::Tanh => x.tanh(),
        UnaryOp::Sigmoid => sigmoid(x),
        UnaryOp::Gelu => 0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2)),
        UnaryOp::GeluTanh => 0.5 * x * (1.0 + gelu_tanh_inner(x).tanh()),
        UnaryOp::Erf => libm::erf(x),
        // ln(1 + eˣ) = max(x, 0) + ln(1 + e^−|x|): no overflow for large x, no lost digits
        // for very negative x.
        UnaryOp::Softplus => x.max(0.0) + (-x.abs()).exp().ln_1p(),
        UnaryOp::Sqrt => x.sqrt(),
        UnaryOp::Reciprocal => 1.0 / x,
        UnaryOp::Exp => x.exp(),
        UnaryOp::Neg => -x,
    }
}

/// Derivatives; at the kinks of Relu and LeakyRelu PyTorch's convention (the x ≤ 0 branch at 0).
fn unary_derivative(op: UnaryOp, x: f64) -> f64 {
    const SQRT_2PI: f64 = 2.506_628_274_631_000_5;
    match op {
        UnaryOp::Relu => f64::from(u8::from(x > 0.0)),
        UnaryOp::LeakyRelu(alpha) => {
            if x > 0.0 {
                1.0
            } else {
                f64::from(alpha)
            }
        }
        UnaryOp::Tanh => 1.0 - x.tanh() * x.tanh(),
        UnaryOp::Sigmoid => sigmoid(x) * (1.0 - sigmoid(x)),
        // d/dx x Φ(x) = Φ(x) + x φ(x)
        UnaryOp::Gelu => {
            0.5 * (1.0 + libm::erf(x / std::f64::consts::SQRT_2)) + x * (-0.5 * x * x).exp() / SQRT_2PI
        }
        UnaryOp::GeluTanh => {
            let t = gelu_tanh_inner(x).tanh();
            let du = (2.0 / std::f64::consts::PI).sqrt() * (1.0 + 3.0 * 0.044715 * x * x);
            0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du
        }
        UnaryOp::Erf => 2.0 / std::f64::consts::PI.sqrt() * (-x * x).exp(),
        UnaryOp::Softplus => sigmoid(x),
        UnaryOp::Sqrt => 0.5 / x.sqrt(),
        UnaryOp::Reciprocal => -1.0 / (x * x),
        UnaryOp::Exp => x.exp(),
        UnaryOp::Neg => -1.0,
    }
}

/// √(2/π)(x + 0.044715 x³), the argument of tanh in the tanh GELU.
fn gelu_tanh_inner(x: f64) -> f64 {
    (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)
}

/// 1/(1 + e⁻ˣ) without overflow for very negative x.
fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

fn row_major_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for k in (0..shape.len().saturating_sub(1)).rev() {
        strides[k] = strides[k + 1] * shape[k + 1];
    }
    strides
}

fn unravel(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut index = vec![0; shape.len()];
    for k in (0..shape.len()).rev() {
        index[k] = flat % shape[k];
        flat /= shape[k];
    }
    index
}

/// For every element of a tensor of shape `out`, the element of an operand of shape
/// `operand` that numpy broadcasting reads: axes aligned at the trailing end, extent-1 axes
/// repeated. (Per-sample operands are aligned by their per-sample shapes, as
/// [`super::ir::infer_shape`] does.)
fn broadcast_map(operand: &[usize], out: &[usize]) -> Vec<usize> {
    let strides = row_major_strides(operand);
    let offset = out.len().saturating_sub(operand.len());
    (0..out.iter().product())
        .map(|flat| {
            let index = unravel(flat, out);
            operand
                .iter()
                .enumerate()
                .map(|(k, &extent)| if extent == 1 { 0 } else { index[offset + k] * strides[k] })
                .sum()
        })
        .collect()
}

/// For every input element of a `ReduceMean` over `axes`, its output element (the same
/// whether reduced axes are kept as 1 or dropped), and the count averaged over.
fn reduce_map(shape: &[usize], axes: &[usize]) -> (Vec<usize>, usize) {
    let kept: Vec<usize> = shape.iter().enumerate().map(|(k, &e)| if axes.contains(&k) { 1 } else { e }).collect();
    let strides = row_major_strides(&kept);
    let count = axes.iter().map(|&a| shape[a]).product();
    let map = (0..shape.iter().product())
        .map(|flat| {
            let index = unravel(flat, shape);
            (0..shape.len()).filter(|k| !axes.contains(k)).map(|k| index[k] * strides[k]).sum()
        })
        .collect();
    (map, count)
}

/// For every output element of a transpose of `shape` by `perm`, its input element.
fn transpose_map(shape: &[usize], perm: &[usize]) -> Vec<usize> {
    let out: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let strides = row_major_strides(shape);
    (0..shape.iter().product())
        .map(|flat| unravel(flat, &out).iter().zip(perm).map(|(&i, &p)| i * strides[p]).sum())
        .collect()
}

/// For each part of a `Concat`, the output element of each of its elements.
fn concat_maps(node: &Node, net: &Net<'_>, axis: usize) -> Vec<Vec<usize>> {
    let out = net.shape(node.output);
    let out_strides = row_major_strides(out);
    let mut offset = 0;
    node.inputs
        .iter()
        .map(|&t| {
            let shape = net.shape(t);
            let map = (0..shape.iter().product())
                .map(|flat| {
                    let mut index = unravel(flat, shape);
                    index[axis] += offset;
                    index.iter().zip(&out_strides).map(|(i, s)| i * s).sum()
                })
                .collect();
            offset += shape[axis];
            map
        })
        .collect()
}

/// The input index of tap `k` of the window at output `o` along axis `a` (0 = h, 1 = w) of
/// an input of extent `extent`, or `None` in the padding (or past it, for `ceil_mode`).
fn tap(window: &Window, a: usize, o: usize, k: usize, extent: usize) -> Option<usize> {
    let position = (o * window.strides[a] + k * window.dilations[a]) as isize - window.pads[a] as isize;
    (0..extent as isize).contains(&position).then_some(position as usize)
}

/// Direct 2-D convolution geometry: x [C, H, W], w [Cout, C/group, kh, kw] → [Cout, Ho, Wo].
struct Conv {
    window: Window,
    c_in: usize,
    h: usize,
    w: usize,
    c_out: usize,
    ho: usize,
    wo: usize,
    group: usize,
}

impl Conv {
    fn new(x: &[usize], _w: &[usize], y: &[usize], window: Window, group: usize) -> Conv {
        Conv { window, c_in: x[0], h: x[1], w: x[2], c_out: y[0], ho: y[1], wo: y[2], group }
    }

    /// Calls `visit(output index, weight index, input index)` for every product of the
    /// convolution: y[o, oh, ow] += w[o, ci, i, j] · x[g·(C/group) + ci, ih, iw] over the taps
    /// inside the input (padding is zero, so its taps contribute nothing).
    fn for_each_product(&self, mut visit: impl FnMut(usize, usize, usize)) {
        let (cig, cog) = (self.c_in / self.group, self.c_out / self.group);
        let [kh, kw] = self.window.kernel;
        for o in 0..self.c_out {
            let g = o / cog;
            for oh in 0..self.ho {
                for ow in 0..self.wo {
                    let out = (o * self.ho + oh) * self.wo + ow;
                    for ci in 0..cig {
                        let channel = g * cig + ci;
                        for i in 0..kh {
                            let Some(ih) = tap(&self.window, 0, oh, i, self.h) else { continue };
                            for j in 0..kw {
                                let Some(iw) = tap(&self.window, 1, ow, j, self.w) else { continue };
                                visit(out, ((o * cig + ci) * kh + i) * kw + j, (channel * self.h + ih) * self.w + iw);
                            }
                        }
                    }
                }
            }
        }
    }

    fn forward(&self, x: &[f64], w: &[f64], bias: Option<&[f64]>) -> Vec<f64> {
        let area = self.ho * self.wo;
        let mut y: Vec<f64> = (0..self.c_out * area).map(|i| bias.map_or(0.0, |b| b[i / area])).collect();
        self.for_each_product(|o, wi, xi| y[o] += w[wi] * x[xi]);
        y
    }

    /// (dx, dw, dbias).
    fn backward(&self, x: &[f64], w: &[f64], dy: &[f64]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (mut dx, mut dw) = (vec![0.0; x.len()], vec![0.0; w.len()]);
        self.for_each_product(|o, wi, xi| {
            dx[xi] += w[wi] * dy[o];
            dw[wi] += x[xi] * dy[o];
        });
        let area = self.ho * self.wo;
        let dbias = (0..self.c_out).map(|o| dy[o * area..(o + 1) * area].iter().sum()).collect();
        (dx, dw, dbias)
    }

    /// The receptive field of output position `s` = oh·Wo + ow (group 1): x[c, ih, iw] in
    /// (c, i, j) row-major order, 0 at padding.
    fn patch(&self, x: &[f64], s: usize) -> Vec<f64> {
        let (oh, ow) = (s / self.wo, s % self.wo);
        let [kh, kw] = self.window.kernel;
        let mut patch = Vec::with_capacity(self.c_in * kh * kw);
        for c in 0..self.c_in {
            for i in 0..kh {
                for j in 0..kw {
                    let value = match (tap(&self.window, 0, oh, i, self.h), tap(&self.window, 1, ow, j, self.w)) {
                        (Some(ih), Some(iw)) => x[(c * self.h + ih) * self.w + iw],
                        _ => 0.0,
                    };
                    patch.push(value);
                }
            }
        }
        patch
    }
}

/// Pool geometry: x [C, H, W] → [C, Ho, Wo].
struct Pool {
    window: Window,
    h: usize,
    w: usize,
    ho: usize,
    wo: usize,
    c: usize,
}

impl Pool {
    fn new(x: &[usize], y: &[usize], window: Window) -> Pool {
        Pool { window, c: x[0], h: x[1], w: x[2], ho: y[1], wo: y[2] }
    }

    fn out_len(&self) -> usize {
        self.c * self.ho * self.wo
    }

    /// (channel, oh, ow) of output `o`.
    fn position(&self, o: usize) -> (usize, usize, usize) {
        (o / (self.ho * self.wo), (o / self.wo) % self.ho, o % self.wo)
    }

    /// The input index of the largest value in the window of output `o` (the first one on
    /// ties); padding is −∞ and never wins. `None` when the window holds no input.
    fn max_tap(&self, x: &[f64], o: usize) -> Option<usize> {
        let (c, oh, ow) = self.position(o);
        let mut best: Option<usize> = None;
        for i in 0..self.window.kernel[0] {
            let Some(ih) = tap(&self.window, 0, oh, i, self.h) else { continue };
            for j in 0..self.window.kernel[1] {
                let Some(iw) = tap(&self.window, 1, ow, j, self.w) else { continue };
                let at = (c * self.h + ih) * self.w + iw;
                if best.is_none_or(|b| x[at] > x[b]) {
                    best = Some(at);
                }
            }
        }
        best
    }

    /// The input indices averaged by output `o` and the divisor. The window is clipped to
    /// the padded input [−pad_begin, extent + pad_end) (a `ceil_mode` window may run past
    /// it); with `count_include_pad` the divisor is the clipped window's size, otherwise the
    /// number of input elements in it (ONNX and PyTorch agree on this).
    fn average_taps(&self, o: usize, count_include_pad: bool) -> (Vec<usize>, usize) {
        let (c, oh, ow) = self.position(o);
        let span = |a: usize, out: usize, extent: usize| {
            let start = (out * self.window.strides[a]) as isize - self.window.pads[a] as isize;
            let end = (start + self.window.kernel[a] as isize).min((extent + self.window.pads[a + 2]) as isize);
            let padded = (end - start).max(0) as usize;
            (start.max(0) as usize, end.clamp(0, extent as isize) as usize, padded)
        };
        let (h0, h1, ph) = span(0, oh, self.h);
        let (w0, w1, pw) = span(1, ow, self.w);
        let taps: Vec<usize> =
            (h0..h1).flat_map(|ih| (w0..w1).map(move |iw| (c * self.h + ih) * self.w + iw)).collect();
        let divisor = if count_include_pad { ph * pw } else { taps.len() };
        (taps, divisor)
    }
}

/// Checks the data against the graph: finite inputs of the graph's input width, one target
/// per sample matching the likelihood, labels in range.
fn check_data(graph: &Graph, data: &Dataset, likelihood: Likelihood) -> Result<()> {
    crate::validate::check_matrix("inputs", data.inputs.view(), 0)?;
    let (n, d) = data.inputs.dim();
    let width = graph.tensors[graph.input].len();
    if d != width {
        return Err(invalid(format!("inputs have {d} columns; the graph input {:?} has {width} values per sample", graph.input_shape())));
    }
    let outputs = graph.outputs();
    match (&data.targets, likelihood) {
        (Targets::Classes(classes), Likelihood::Categorical) => {
            if classes.len() != n {
                return Err(invalid(format!("the dataset has {n} inputs but {} labels", classes.len())));
            }
            if let Some((row, &label)) = classes.iter().enumerate().find(|(_, &c)| c as usize >= outputs) {
                return Err(invalid(format!("label {label} at row {row} is out of range: the graph has {outputs} outputs")));
            }
        }
        (Targets::Values(values), Likelihood::Gaussian) => {
            crate::validate::check_matrix("targets", values.view(), 0)?;
            if values.dim() != (n, outputs) {
                return Err(invalid(format!("targets are {}×{}; expected {n}×{outputs}", values.nrows(), values.ncols())));
            }
        }
        _ => {
            return Err(invalid(format!(
                "the {likelihood} likelihood needs {} targets",
                if likelihood == Likelihood::Categorical { "class-label" } else { "real-valued N×k" }
            )))
        }
    }
    Ok(())
}

/// A zero f64 matrix, or [`FisherError::DoesNotFit`] above [`MAX_DENSE_BYTES`] or when the
/// allocation fails (instead of aborting the process).
fn zeros_bounded(rows: usize, cols: usize, what: &str) -> Result<Array2<f64>> {
    let needed = rows as u128 * cols as u128 * 8;
    let refuse = |limit: u64, which: &str| FisherError::DoesNotFit {
        what: format!("{what} ({rows}×{cols} f64)"),
        needed: u64::try_from(needed).unwrap_or(u64::MAX),
        limit,
        which: which.into(),
    };
    if needed > u128::from(MAX_DENSE_BYTES) {
        return Err(refuse(MAX_DENSE_BYTES, "the f64 graph reference's bound on one dense result"));
    }
    let mut values: Vec<f64> = Vec::new();
    values.try_reserve_exact(rows * cols).map_err(|_| refuse(MAX_DENSE_BYTES, "host memory (the allocation failed)"))?;
    values.resize(rows * cols, 0.0);
    Array2::from_shape_vec((rows, cols), values).map_err(|e| invalid(format!("{what}: {e}")))
}

/// Copies the upper triangle onto the lower one, so the result is exactly symmetric.
fn mirror_upper(m: &mut Array2<f64>) {
    for i in 0..m.nrows() {
        for j in 0..i {
            m[[i, j]] = m[[j, i]];
        }
    }
}

/// A layer that gets KFAC factors: a `Gemm`, `MatMul` or `Conv` node whose weight is a
/// parameter (see the module docs for W, S and ã of each).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KfacLayer {
    /// The module of its weight ([`super::ir::Param::module`]).
    pub module: String,
    /// Index of the node in [`Graph::nodes`].
    pub node: usize,
    /// Index of the weight in [`Graph::params`].
    pub weight: usize,
    /// Index of the bias in [`Graph::params`] when the node has a trainable bias (then ã
    /// has a trailing entry and A is (K+1)×(K+1)).
    pub bias: Option<usize>,
    /// Cout: the rows of W, the size of G.
    pub outputs: usize,
    /// K: the columns of W (without the bias column).
    pub inputs: usize,
    /// S: positions per sample.
    pub positions: usize,
}

impl KfacLayer {
    /// Width of ã: K + 1 with a trainable bias, K without.
    pub fn augmented_inputs(&self) -> usize {
        self.inputs + usize::from(self.bias.is_some())
    }

    /// Ã (S × width of ã): row s is ã_s for this sample.
    fn patches(&self, net: &Net<'_>, values: &[Vec<f64>]) -> Array2<f64> {
        let node = &net.graph.nodes[self.node];
        let x = net.value(values, node.inputs[0]);
        // Gemm scales A by α and C by β, so ∂z/∂W = α a and ∂z/∂b = β.
        let (alpha, trailing) = match node.op {
            Op::Gemm { alpha, beta, .. } => (f64::from(alpha), f64::from(beta)),
            _ => (1.0, 1.0),
        };
        let conv = match &node.op {
            Op::Conv { window, group } => Some(Conv::new(
                net.shape(node.inputs[0]),
                net.shape(node.inputs[1]),
                net.shape(node.output),
                *window,
                *group,
            )),
            _ => None,
        };
        let k = self.inputs;
        let mut patches = Array2::<f64>::zeros((self.positions, self.augmented_inputs()));
        for s in 0..self.positions {
            let row: Vec<f64> = match &conv {
                Some(conv) => conv.patch(x, s),
                None => x[s * k..(s + 1) * k].iter().map(|&v| alpha * v).collect(),
            };
            patches.slice_mut(s![s, ..k]).assign(&ArrayView1::from(&row));
            if self.bias.is_some() {
                patches[[s, k]] = trailing;
            }
        }
        patches
    }

    /// δ at position `s`, output `o`, from the adjoint of the node's output.
    fn delta(&self, net: &Net<'_>, output_adjoint: &[f64], s: usize, o: usize) -> f64 {
        match net.graph.nodes[self.node].op {
            Op::Conv { .. } => output_adjoint[o * self.positions + s],
            _ => output_adjoint[s * self.outputs + o],
        }
    }
}

/// The layers that get KFAC factors, in the θ order of their weights: every `Gemm`,
/// `MatMul` and `Conv` node whose weight (input 1) is a parameter. Its bias (input 2) adds
/// the trailing entry of ã when it is a parameter (a constant bias does not).
///
/// Errors for a grouped convolution, a weight or bias used by several nodes (tied weights),
/// and a `Gemm` bias that broadcasts one value to every output.
pub fn kfac_layers(graph: &Graph) -> Result<Vec<KfacLayer>> {
    graph.validate()?;
    let mut uses = vec![0usize; graph.tensors.len()];
    for node in &graph.nodes {
        for &t in &node.inputs {
            uses[t] += 1;
        }
    }
    let param_of = |t: TensorId| match graph.tensors[t].kind {
        TensorKind::Param(p) => Some(p),
        _ => None,
    };
    let mut layers = Vec::new();
    for (index, node) in graph.nodes.iter().enumerate() {
        if !matches!(node.op, Op::Gemm { .. } | Op::MatMul { .. } | Op::Conv { .. }) {
            continue;
        }
        let Some(weight) = param_of(node.inputs[1]) else { continue };
        let err = |m: String| invalid(format!("node {} ({}): {m}", node.name, super::ir::op_name(&node.op)));
        let bias = node.inputs.get(2).and_then(|&t| param_of(t));
        for p in std::iter::once(weight).chain(bias) {
            if uses[graph.params[p].tensor] > 1 {
                return Err(err(format!("parameter {} is used by several nodes; KFAC is not defined for tied weights here", graph.params[p].name)));
            }
        }
        let w_shape = &graph.params[weight].shape;
        let x_len = graph.tensors[node.inputs[0]].len();
        let (outputs, inputs, positions) = match &node.op {
            Op::Gemm { trans_b, .. } | Op::MatMul { trans_b } => {
                let (k, m) = gemm_dims(w_shape, *trans_b);
                (m, k, x_len / k.max(1))
            }
            Op::Conv { group, .. } => {
                if *group > 1 {
                    return Err(err(format!("KFAC is not defined for grouped convolutions here (group {group})")));
                }
                let out = &graph.tensors[node.output].shape;
                (w_shape[0], w_shape[1..].iter().product(), out[1] * out[2])
            }
            _ => continue,
        };
        if let Some(b) = bias {
            if graph.params[b].len() != outputs {
                return Err(err(format!("the bias {} has shape {:?}; KFAC needs one bias per output ({outputs})", graph.params[b].name, graph.params[b].shape)));
            }
        }
        layers.push(KfacLayer {
            module: graph.params[weight].module().to_string(),
            node: index,
            weight,
            bias,
            outputs,
            inputs,
            positions,
        });
    }
    layers.sort_by_key(|l| l.weight);
    Ok(layers)
}

/// The value of every tensor of `graph` for one sample with flattened input `x` (row-major,
/// integer tokens as floats), in f64, indexed by [`TensorId`]: the input and every node's
/// output per sample, and the f64 data of parameters and constants.
///
/// Errors for a malformed graph, an input of the wrong length, or a `Gather` index that is
/// not a row of its table (naming the position).
pub fn forward(graph: &Graph, x: &[f64]) -> Result<Vec<Vec<f64>>> {
    let net = Net::new(graph)?;
    let mut values = net.forward(x)?;
    for (t, shared) in net.shared.into_iter().enumerate() {
        if !graph.tensors[t].per_sample() {
            values[t] = shared;
        }
    }
    Ok(values)
}

/// The graph output (C values) for input `x` at parameters θ (f64, θ order): for finite
/// differences in θ.
pub fn output_at(graph: &Graph, theta: &[f64], x: &[f64]) -> Result<Vec<f64>> {
    let net = Net::at(graph, theta)?;
    let mut values = net.forward(x)?;
    Ok(std::mem::take(&mut values[graph.output]))
}

/// The vector–Jacobian product J_θ(x)ᵀ c (length P, θ order) for one sample with input `x`
/// and a cotangent `c` of the output (length C), by reverse mode.
pub fn vjp(graph: &Graph, x: &[f64], cotangent: &[f64]) -> Result<Vec<f64>> {
    let net = Net::new(graph)?;
    let values = net.forward(x)?;
    Ok(net.param_gradient(&net.backward(&values, cotangent)?))
}

/// The Jacobian of the output w.r.t. θ for one sample (C × P, columns in θ order), one
/// reverse pass per output.
pub fn jacobian(graph: &Graph, x: &[f64]) -> Result<Array2<f64>> {
    let net = Net::new(graph)?;
    jacobian_of(&net, x)
}

fn jacobian_of(net: &Net<'_>, x: &[f64]) -> Result<Array2<f64>> {
    let values = net.forward(x)?;
    let (c, p) = (net.graph.outputs(), net.graph.param_count());
    let mut jac = zeros_bounded(c, p, "the Jacobian")?;
    for row in 0..c {
        let mut cotangent = vec![0.0; c];
        cotangent[row] = 1.0;
        let gradient = net.param_gradient(&net.backward(&values, &cotangent)?);
        jac.row_mut(row).assign(&Array1::from(gradient));
    }
    Ok(jac)
}

/// What one sample contributes.
struct SamplePass {
    /// R × P: row r is g_ir.
    rows: Array2<f64>,
    /// Per KFAC layer: Ã (S × width of ã) and Δ ((R·S) × Cout, row r·S + s is δ_{r,s}).
    kfac: Vec<(Array2<f64>, Array2<f64>)>,
}

fn sample_pass(
    net: &Net<'_>,
    data: &Dataset,
    sample: usize,
    likelihood: Likelihood,
    variant: Variant,
    layers: &[KfacLayer],
) -> Result<SamplePass> {
    let x: Vec<f64> = data.inputs.row(sample).iter().map(|&v| f64::from(v)).collect();
    let values = net.forward(&x).map_err(in_sample(sample))?;
    let logits = &values[net.graph.output];
    let output = output_rows(ArrayView1::from(logits.as_slice()), data, sample, likelihood, variant)?;
    let r_count = output.nrows();
    let mut rows = zeros_bounded(r_count, net.graph.param_count(), "one sample's gradient rows")?;
    let mut kfac: Vec<(Array2<f64>, Array2<f64>)> = layers
        .iter()
        .map(|l| (l.patches(net, &values), Array2::zeros((r_count * l.positions, l.outputs))))
        .collect();
    for (r, s_r) in output.outer_iter().enumerate() {
        let adjoints = net.backward(&values, &s_r.to_vec())?;
        rows.row_mut(r).assign(&Array1::from(net.param_gradient(&adjoints)));
        for (layer, (_, deltas)) in layers.iter().zip(&mut kfac) {
            let adjoint = &adjoints[net.graph.nodes[layer.node].output];
            for s in 0..layer.positions {
                for o in 0..layer.outputs {
                    deltas[[r * layer.positions + s, o]] = layer.delta(net, adjoint, s, o);
                }
            }
        }
    }
    Ok(SamplePass { rows, kfac })
}

/// Runs every sample (a batch at a time, in parallel) and hands the passes to `visit` in
/// sample order.
fn for_each_sample(
    net: &Net<'_>,
    data: &Dataset,
    likelihood: Likelihood,
    variant: Variant,
    layers: &[KfacLayer],
    mut visit: impl FnMut(usize, SamplePass) -> Result<()>,
) -> Result<()> {
    let r = rows_per_sample(variant, net.graph.outputs());
    let bytes = r.saturating_mul(net.graph.param_count()).saturating_mul(8);
    let batch = (BATCH_BYTES / bytes.max(1)).clamp(1, MAX_BATCH);
    let n = data.len();
    for start in (0..n).step_by(batch) {
        let end = (start + batch).min(n);
        let passes = (start..end)
            .into_par_iter()
            .map(|i| sample_pass(net, data, i, likelihood, variant, layers))
            .collect::<Result<Vec<_>>>()?;
        for (offset, pass) in passes.into_iter().enumerate() {
            visit(start + offset, pass)?;
        }
    }
    Ok(())
}

/// Checks the graph, the data and the variant; the net at the graph's parameters.
fn prepare<'g>(graph: &'g Graph, data: &Dataset, likelihood: Likelihood, variant: Variant) -> Result<Net<'g>> {
    let net = Net::new(graph)?;
    check_data(graph, data, likelihood)?;
    if let Variant::MonteCarlo { samples, .. } = variant {
        if samples == 0 || u32::try_from(samples).is_err() {
            return Err(invalid(format!("--mc-samples must be between 1 and {}, got {samples}", u32::MAX)));
        }
    }
    Ok(net)
}

/// The per-sample gradient rows: (N·R)×P, sample-major (row i·R + r is g_ir), with
/// F = GᵀG/N; R is returned alongside (1 for `empirical`, where G is the N×P matrix of
/// ∇θ log p(yᵢ|xᵢ)).
pub fn per_sample_rows(graph: &Graph, data: &Dataset, likelihood: Likelihood, variant: Variant) -> Result<(Array2<f64>, usize)> {
    let net = prepare(graph, data, likelihood, variant)?;
    let r = rows_per_sample(variant, graph.outputs());
    let mut grads = zeros_bounded(data.len().saturating_mul(r), graph.param_count(), "the per-sample gradient rows")?;
    for_each_sample(&net, data, likelihood, variant, &[], |i, pass| {
        grads.slice_mut(s![i * r..(i + 1) * r, ..]).assign(&pass.rows);
        Ok(())
    })?;
    Ok((grads, r))
}

/// The graph Fisher F = (1/N) Σᵢ Σ_r g_ir g_irᵀ reduced to `form`, in f64, with the shapes
/// of [`crate::reference::network::fisher`] (see the module docs for each form and for
/// KFAC's layers, layout and scaling).
///
/// Errors when the graph is malformed, the data do not fit it, an index of an embedding is
/// not a row of its table (naming the sample and position), `mc` asks for no samples, a
/// dense result exceeds [`MAX_DENSE_BYTES`], or KFAC meets a grouped convolution or tied
/// weights.
///
/// ```
/// use fisher_engine::fisher::{NetFisher, NetForm, Variant};
/// use fisher_engine::graph::{reference, GraphBuilder, InputType, Op};
/// use fisher_engine::model::{Dataset, Likelihood, Targets};
/// use ndarray::array;
/// // z = W x with W = 0 (1×2, nn.Linear layout) and a unit-variance Gaussian: g = (y − z) x.
/// let mut b = GraphBuilder::new("x", &[2], InputType::Float);
/// let w = b.param("fc.weight", &[1, 2], vec![0.0, 0.0])?;
/// let z = b.node("fc", Op::Gemm { alpha: 1.0, beta: 1.0, trans_b: true }, &[b.input(), w])?;
/// let graph = b.finish(z)?;
/// let data = Dataset { inputs: array![[1.0f32, 2.0]], targets: Targets::Values(array![[3.0f32]]) };
/// let f = reference::fisher(&graph, &data, Likelihood::Gaussian, Variant::Empirical, NetForm::Full)?;
/// assert_eq!(f, NetFisher::Full(array![[9.0, 18.0], [18.0, 36.0]]));
/// # Ok::<(), fisher_engine::FisherError>(())
/// ```
pub fn fisher(graph: &Graph, data: &Dataset, likelihood: Likelihood, variant: Variant, form: NetForm) -> Result<NetFisher<f64>> {
    let net = prepare(graph, data, likelihood, variant)?;
    let p = graph.param_count();
    let scale = 1.0 / data.len() as f64;
    match form {
        NetForm::Grads => Ok(NetFisher::Grads(per_sample_rows(graph, data, likelihood, variant)?.0)),
        NetForm::Full => {
            let mut full = zeros_bounded(p, p, "the full Fisher matrix")?;
            for_each_sample(&net, data, likelihood, variant, &[], |_, pass| {
                general_mat_mul(1.0, &pass.rows.t(), &pass.rows, 1.0, &mut full);
                Ok(())
            })?;
            mirror_upper(&mut full);
            Ok(NetFisher::Full(full * scale))
        }
        NetForm::Diagonal => {
            let mut diag = Array1::<f64>::zeros(p);
            for_each_sample(&net, data, likelihood, variant, &[], |_, pass| {
                for row in pass.rows.outer_iter() {
                    diag.zip_mut_with(&row, |d, &g| *d += g * g);
                }
                Ok(())
            })?;
            Ok(NetFisher::Diagonal(diag * scale))
        }
        NetForm::Layer => {
            let offsets = graph.param_offsets();
            let ranges: Vec<(usize, usize)> = graph
                .modules()
                .iter()
                .map(|(_, idx)| (offsets[idx[0]], offsets[idx[idx.len() - 1] + 1]))
                .collect();
            let total: usize = ranges.iter().map(|(a, b)| (b - a) * (b - a)).sum();
            if total as u128 * 8 > u128::from(MAX_DENSE_BYTES) {
                return Err(FisherError::DoesNotFit {
                    what: format!("the layer blocks ({total} f64 together)"),
                    needed: (total as u64).saturating_mul(8),
                    limit: MAX_DENSE_BYTES,
                    which: "the f64 graph reference's bound on one dense result".into(),
                });
            }
            let mut blocks =
                ranges.iter().map(|(a, b)| zeros_bounded(b - a, b - a, "a layer block")).collect::<Result<Vec<_>>>()?;
            for_each_sample(&net, data, likelihood, variant, &[], |_, pass| {
                for (block, &(a, b)) in blocks.iter_mut().zip(&ranges) {
                    let rows = pass.rows.slice(s![.., a..b]);
                    general_mat_mul(1.0, &rows.t(), &rows, 1.0, block);
                }
                Ok(())
            })?;
            Ok(NetFisher::Layer(
                blocks
                    .into_iter()
                    .map(|mut block| {
                        mirror_upper(&mut block);
                        block * scale
                    })
                    .collect(),
            ))
        }
        NetForm::Norms => {
            let mut norms = Vec::with_capacity(data.len());
            for_each_sample(&net, data, likelihood, variant, &[], |_, pass| {
                norms.push(pass.rows.iter().map(|g| g * g).sum());
                Ok(())
            })?;
            Ok(NetFisher::Norms(Array1::from(norms)))
        }
        NetForm::Kfac => {
            let layers = kfac_layers(graph)?;
            let mut a_factors: Vec<Array2<f64>> =
                layers.iter().map(|l| Array2::zeros((l.augmented_inputs(), l.augmented_inputs()))).collect();
            let mut g_factors: Vec<Array2<f64>> = layers.iter().map(|l| Array2::zeros((l.outputs, l.outputs))).collect();
            for_each_sample(&net, data, likelihood, variant, &layers, |_, pass| {
                for (l, (patches, deltas)) in pass.kfac.iter().enumerate() {
                    // Σ_s ã_s ã_sᵀ and (1/S) Σ_r Σ_s δ_{r,s} δ_{r,s}ᵀ
                    general_mat_mul(1.0, &patches.t(), patches, 1.0, &mut a_factors[l]);
                    let average = 1.0 / layers[l].positions as f64;
                    general_mat_mul(average, &deltas.t(), deltas, 1.0, &mut g_factors[l]);
                }
                Ok(())
            })?;
            Ok(NetFisher::Kfac(
                a_factors
                    .into_iter()
                    .zip(g_factors)
                    .map(|(mut a, mut g)| {
                        mirror_upper(&mut a);
                        mirror_upper(&mut g);
                        KfacFactors { a: a * scale, g: g * scale }
                    })
                    .collect(),
            ))
        }
    }
}

/// F·v = (1/N) Σᵢ Σ_r g_ir (g_irᵀ v) in θ order, from the explicit gradient rows, for
/// checking implicit products.
pub fn fvp(graph: &Graph, data: &Dataset, likelihood: Likelihood, variant: Variant, v: &[f64]) -> Result<Vec<f64>> {
    let net = prepare(graph, data, likelihood, variant)?;
    let p = graph.param_count();
    if v.len() != p {
        return Err(invalid(format!("v has {} values; the graph has {p} parameters", v.len())));
    }
    let v = ArrayView1::from(v);
    let mut product = Array1::<f64>::zeros(p);
    for_each_sample(&net, data, likelihood, variant, &[], |_, pass| {
        for row in pass.rows.outer_iter() {
            let projection = row.dot(&v);
            product.scaled_add(projection, &row);
        }
        Ok(())
    })?;
    Ok((product / data.len() as f64).to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::ir::{GraphBuilder, InputType};
    use crate::synthetic::SplitMix64;

    /// A graph under construction with seeded random parameters.
    struct Build {
        b: GraphBuilder,
        rng: SplitMix64,
    }

    impl Build {
        fn new(shape: &[usize], seed: u64) -> Build {
            Build { b: GraphBuilder::new("x", shape, InputType::Float), rng: SplitMix64::new(seed) }
        }
        fn tokens(shape: &[usize], seed: u64) -> Build {
            Build { b: GraphBuilder::new("tokens", shape, InputType::Integer), rng: SplitMix64::new(seed) }
        }
        fn x(&self) -> TensorId {
            self.b.input()
        }
        fn len(&self, t: TensorId) -> usize {
            self.b.tensor(t).len()
        }
        fn shape(&self, t: TensorId) -> Vec<usize> {
            self.b.tensor(t).shape.clone()
        }
        fn values(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| (0.5 * self.rng.normal()) as f32).collect()
        }
        fn positive(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| (0.5 + self.rng.uniform()) as f32).collect()
        }
        fn param(&mut self, name: &str, shape: &[usize]) -> TensorId {
            let data = self.values(shape.iter().product());
            self.b.param(name, shape, data).unwrap()
        }
        fn positive_param(&mut self, name: &str, shape: &[usize]) -> TensorId {
            let data = self.positive(shape.iter().product());
            self.b.param(name, shape, data).unwrap()
        }
        fn constant(&mut self, name: &str, shape: &[usize], positive: bool) -> TensorId {
            let n = shape.iter().product();
            let data = if positive { self.positive(n) } else { self.values(n) };
            self.b.constant(name, shape, data).unwrap()
        }
        fn op(&mut self, name: &str, op: Op, inputs: &[TensorId]) -> TensorId {
            self.b.node(name, op, inputs).unwrap()
        }
        fn unary(&mut self, name: &str, u: UnaryOp, x: TensorId) -> TensorId {
            self.op(name, Op::Unary(u), &[x])
        }
        fn reshape(&mut self, name: &str, x: TensorId, shape: &[usize]) -> TensorId {
            self.b.reshape(name, x, shape).unwrap()
        }
        fn flatten(&mut self, name: &str, x: TensorId) -> TensorId {
            let n = self.len(x);
            self.reshape(name, x, &[n])
        }
        /// nn.Linear: Gemm with an out×in weight (`trans_b`).
        fn linear(&mut self, name: &str, x: TensorId, out: usize, bias: bool) -> TensorId {
            let w = self.param(&format!("{name}.weight"), &[out, self.len(x)]);
            let mut inputs = vec![x, w];
            if bias {
                inputs.push(self.param(&format!("{name}.bias"), &[out]));
            }
            self.op(name, Op::Gemm { alpha: 1.0, beta: 1.0, trans_b: true }, &inputs)
        }
        #[allow(clippy::too_many_arguments)]
        fn conv(&mut self, name: &str, x: TensorId, out: usize, window: Window, group: usize, bias: bool) -> TensorId {
            let c = self.shape(x)[0];
            let w = self.param(&format!("{name}.weight"), &[out, c / group, window.kernel[0], window.kernel[1]]);
            let mut inputs = vec![x, w];
            if bias {
                inputs.push(self.param(&format!("{name}.bias"), &[out]));
            }
            self.op(name, Op::Conv { window, group }, &inputs)
        }
        fn batch_norm(&mut self, name: &str, x: TensorId) -> TensorId {
            let c = self.shape(x)[0];
            let gamma = self.positive_param(&format!("{name}.weight"), &[c]);
            let beta = self.param(&format!("{name}.bias"), &[c]);
            let mean = self.constant(&format!("{name}.running_mean"), &[c], false);
            let var = self.constant(&format!("{name}.running_var"), &[c], true);
            self.op(name, Op::BatchNorm { epsilon: 1e-5 }, &[x, gamma, beta, mean, var])
        }
        fn finish(self, out: TensorId) -> Graph {
            self.b.finish(out).unwrap()
        }
    }

    fn window(kernel: [usize; 2], strides: [usize; 2], pads: [usize; 4], dilations: [usize; 2]) -> Window {
        Window { kernel, strides, pads, dilations }
    }

    fn gemm() -> Op {
        Op::Gemm { alpha: 1.0, beta: 1.0, trans_b: true }
    }

    /// A seeded input for `graph`: normal features, or tokens below `vocab` for an integer input.
    fn input(graph: &Graph, seed: u64, vocab: usize) -> Vec<f64> {
        let mut rng = SplitMix64::new(seed);
        let n = graph.tensors[graph.input].len();
        match graph.tensors[graph.input].kind {
            TensorKind::Input(InputType::Integer) => (0..n).map(|_| rng.below(vocab as u64) as f64).collect(),
            _ => (0..n).map(|_| f64::from(rng.normal() as f32)).collect(),
        }
    }

    /// Central differences of the output w.r.t. `point` (θ or the input), through `eval`.
    fn central_differences(point: &[f64], outputs: usize, eval: impl Fn(&[f64]) -> Vec<f64>) -> Array2<f64> {
        let mut fd = Array2::zeros((outputs, point.len()));
        for j in 0..point.len() {
            let h = 1e-6 * point[j].abs().max(1.0);
            let (mut plus, mut minus) = (point.to_vec(), point.to_vec());
            plus[j] += h;
            minus[j] -= h;
            let (up, down) = (eval(&plus), eval(&minus));
            for c in 0..outputs {
                fd[[c, j]] = (up[c] - down[c]) / (plus[j] - minus[j]);
            }
        }
        fd
    }

    #[track_caller]
    fn assert_close(what: &str, got: &Array2<f64>, want: &Array2<f64>, rel: f64) {
        assert_eq!(got.dim(), want.dim(), "{what}: shapes");
        let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
        let (mut worst, mut at) = (0.0f64, (0, 0));
        for ((index, &g), &w) in got.indexed_iter().zip(want.iter()) {
            let err = (g - w).abs();
            assert!(err.is_finite(), "{what}: non-finite at {index:?}: {g} vs {w}");
            if err > worst {
                (worst, at) = (err, index);
            }
        }
        assert!(
            worst <= rel * scale,
            "{what}: worst |Δ| = {worst:e} at {at:?} ({} vs {}), tolerance {:e}",
            got[at],
            want[at],
            rel * scale
        );
    }

    /// The reverse-mode Jacobians w.r.t. θ and (for a float input) w.r.t. the input agree
    /// with central differences (relative step 1e-6, tolerance 1e-6 of the largest entry).
    #[track_caller]
    fn check_derivatives(graph: &Graph, x: &[f64]) {
        let c = graph.outputs();
        let jac = jacobian(graph, x).unwrap();
        assert!(jac.iter().any(|&v| v != 0.0), "the Jacobian is zero");
        let theta: Vec<f64> = graph.theta().iter().map(|&v| f64::from(v)).collect();
        let fd = central_differences(&theta, c, |t| output_at(graph, t, x).unwrap());
        assert_close("∂output/∂θ", &jac, &fd, 1e-6);
        // Every parameter reaches the output (a VJP that dropped one would pass the FD
        // check only if the forward dropped it too).
        let offsets = graph.param_offsets();
        for (k, p) in graph.params.iter().enumerate() {
            let block = jac.slice(s![.., offsets[k]..offsets[k + 1]]);
            assert!(block.iter().any(|&v| v != 0.0), "parameter {} has a zero Jacobian", p.name);
        }
        if graph.tensors[graph.input].kind == TensorKind::Input(InputType::Float) {
            let net = Net::new(graph).unwrap();
            let values = net.forward(x).unwrap();
            let mut input_jac = Array2::zeros((c, x.len()));
            for row in 0..c {
                let mut cotangent = vec![0.0; c];
                cotangent[row] = 1.0;
                let adjoints = net.backward(&values, &cotangent).unwrap();
                input_jac.row_mut(row).assign(&ArrayView1::from(&adjoints[graph.input]));
            }
            let fd = central_differences(x, c, |x| output_at(graph, &theta, x).unwrap());
            assert_close("∂output/∂x", &input_jac, &fd, 1e-6);
        }
    }

    fn check(graph: &Graph) {
        check_derivatives(graph, &input(graph, 99, 0));
    }

    #[test]
    fn gemm_derivatives() {
        let mut b = Build::new(&[5], 1);
        let h = b.linear("fc1", b.x(), 4, true);
        let t = b.unary("tanh", UnaryOp::Tanh, h);
        // B stored K×M, α, β ≠ 1 and a C of one value broadcast to every output.
        let w = b.param("fc2.weight", &[4, 3]);
        let c = b.param("fc2.bias", &[1]);
        let y = b.op("fc2", Op::Gemm { alpha: 0.7, beta: 1.3, trans_b: false }, &[t, w, c]);
        check(&b.finish(y));
    }

    #[test]
    fn matmul_derivatives() {
        let mut b = Build::new(&[4, 5], 2);
        let w1 = b.param("l1.weight", &[6, 5]);
        let b1 = b.param("l1.bias", &[6]);
        let h = b.op("l1", Op::MatMul { trans_b: true }, &[b.x(), w1, b1]);
        let t = b.unary("tanh", UnaryOp::Tanh, h);
        let w2 = b.param("l2.weight", &[6, 3]);
        let y = b.op("l2", Op::MatMul { trans_b: false }, &[t, w2]);
        let y = b.flatten("flat", y);
        check(&b.finish(y));
    }

    #[test]
    fn conv_derivatives_with_stride_pad_dilation_groups_and_depthwise() {
        let mut b = Build::new(&[4, 7, 6], 3);
        let h = b.conv("c1", b.x(), 6, window([3, 2], [2, 1], [1, 0, 2, 1], [1, 2]), 2, true);
        let t = b.unary("tanh", UnaryOp::Tanh, h);
        let d = b.conv("dw", t, 6, window([2, 2], [1, 1], [0, 1, 1, 0], [1, 1]), 6, false);
        let f = b.flatten("flat", d);
        let y = b.linear("fc", f, 3, true);
        check(&b.finish(y));
    }

    #[test]
    fn max_pool_derivatives_with_padding_dilation_and_ceil_mode() {
        for (pool, ceil_mode) in [
            (window([3, 3], [2, 2], [1, 1, 1, 1], [1, 1]), true),
            (window([2, 3], [2, 2], [0, 1, 1, 0], [2, 1]), false),
        ] {
            let mut b = Build::new(&[2, 8, 6], 4);
            let c = b.conv("c", b.x(), 3, window([1, 1], [1, 1], [0; 4], [1, 1]), 1, true);
            let p = b.op("pool", Op::MaxPool { window: pool, ceil_mode }, &[c]);
            let f = b.flatten("flat", p);
            let y = b.linear("fc", f, 3, true);
            check(&b.finish(y));
        }
    }

    #[test]
    fn average_pool_derivatives_both_count_include_pad() {
        for count_include_pad in [true, false] {
            for ceil_mode in [true, false] {
                let mut b = Build::new(&[2, 8, 7], 5);
                let c = b.conv("c", b.x(), 3, window([1, 1], [1, 1], [0; 4], [1, 1]), 1, true);
                let pool = window([3, 2], [2, 2], [1, 1, 1, 0], [1, 1]);
                let p = b.op("pool", Op::AveragePool { window: pool, ceil_mode, count_include_pad }, &[c]);
                let f = b.flatten("flat", p);
                let y = b.linear("fc", f, 3, true);
                check(&b.finish(y));
            }
        }
    }

    #[test]
    fn global_average_pool_derivatives() {
        let mut b = Build::new(&[3, 5, 4], 6);
        let c = b.conv("c", b.x(), 4, window([3, 3], [1, 1], [1; 4], [1, 1]), 1, true);
        let t = b.unary("tanh", UnaryOp::Tanh, c);
        let g = b.op("gap", Op::GlobalAveragePool, &[t]);
        let f = b.flatten("flat", g);
        let y = b.linear("fc", f, 3, true);
        check(&b.finish(y));
    }

    #[test]
    fn reduce_mean_derivatives() {
        let mut b = Build::new(&[3, 4, 5], 7);
        let scale = b.param("scale", &[4, 5]);
        let m = b.op("mul", Op::Binary(BinaryOp::Mul), &[b.x(), scale]);
        let r = b.op("mean1", Op::ReduceMean { axes: vec![1], keepdims: false }, &[m]);
        let t = b.unary("tanh", UnaryOp::Tanh, r);
        let r = b.op("mean0", Op::ReduceMean { axes: vec![0], keepdims: true }, &[t]);
        assert_eq!(b.shape(r), [1, 5]);
        let f = b.flatten("flat", r);
        let y = b.linear("fc", f, 3, true);
        check(&b.finish(y));
    }

    #[test]
    fn reshape_and_transpose_derivatives() {
        let mut b = Build::new(&[2, 3, 4], 8);
        let t = b.op("t1", Op::Transpose { perm: vec![2, 0, 1] }, &[b.x()]);
        assert_eq!(b.shape(t), [4, 2, 3]);
        let r = b.reshape("r", t, &[4, 6]);
        let w = b.param("mm.weight", &[6, 3]);
        let m = b.op("mm", Op::MatMul { trans_b: false }, &[r, w]);
        let t = b.op("t2", Op::Transpose { perm: vec![1, 0] }, &[m]);
        let f = b.flatten("flat", t);
        let y = b.linear("fc", f, 2, true);
        check(&b.finish(y));
    }

    #[test]
    fn concat_derivatives_including_a_repeated_part() {
        let mut b = Build::new(&[2, 3], 9);
        let w = b.param("mm.weight", &[4, 3]);
        let u = b.op("mm", Op::MatMul { trans_b: true }, &[b.x(), w]);
        let t = b.unary("tanh", UnaryOp::Tanh, b.x());
        let c = b.op("cat1", Op::Concat { axis: 1 }, &[u, t]);
        assert_eq!(b.shape(c), [2, 7]);
        let c = b.op("cat0", Op::Concat { axis: 0 }, &[c, c]);
        let f = b.flatten("flat", c);
        let y = b.linear("fc", f, 3, true);
        check(&b.finish(y));
    }

    #[test]
    fn every_unary_derivative() {
        let ops = [
            UnaryOp::Relu,
            UnaryOp::LeakyRelu(0.1),
            UnaryOp::Tanh,
            UnaryOp::Sigmoid,
            UnaryOp::Gelu,
            UnaryOp::GeluTanh,
            UnaryOp::Erf,
            UnaryOp::Softplus,
            UnaryOp::Sqrt,
            UnaryOp::Reciprocal,
            UnaryOp::Exp,
            UnaryOp::Neg,
        ];
        for u in ops {
            let mut b = Build::new(&[4], 10);
            let mut h = b.linear("fc1", b.x(), 6, true);
            if matches!(u, UnaryOp::Sqrt | UnaryOp::Reciprocal) {
                // Keep the argument positive (and away from 0).
                h = b.unary("softplus", UnaryOp::Softplus, h);
            }
            let a = b.unary("act", u, h);
            let y = b.linear("fc2", a, 3, true);
            check(&b.finish(y));
        }
    }

    #[test]
    fn every_binary_derivative_with_broadcasting() {
        for op in [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div] {
            let mut b = Build::new(&[2, 3], 11);
            let wa = b.param("a.weight", &[3, 3]);
            let a = b.op("a", Op::MatMul { trans_b: true }, &[b.x(), wa]);
            let wb = b.param("b.weight", &[3, 3]);
            let bb = b.op("b", Op::MatMul { trans_b: true }, &[b.x(), wb]);
            // Denominators are kept positive.
            let bb = b.unary("exp", UnaryOp::Exp, bb);
            let binary = Op::Binary(op);
            // per-sample × per-sample, same shape
            let r1 = b.op("same", binary.clone(), &[a, bb]);
            // per-sample × per-sample broadcast along axis 1
            let mean = b.op("mean", Op::ReduceMean { axes: vec![1], keepdims: true }, &[bb]);
            let r2 = b.op("bcast", binary.clone(), &[a, mean]);
            // per-sample × shared parameter [3]
            let p = b.positive_param("p", &[3]);
            let r3 = b.op("param", binary.clone(), &[a, p]);
            // shared constant [2, 1] (left) × per-sample
            let c = b.constant("c", &[2, 1], false);
            let r4 = b.op("const", binary.clone(), &[c, bb]);
            // shared parameter (left) of rank 0 × per-sample
            let q = b.param("q", &[]);
            let r5 = b.op("scalar", binary, &[q, bb]);
            let cat = b.op("cat", Op::Concat { axis: 0 }, &[r1, r2, r3, r4, r5]);
            let f = b.flatten("flat", cat);
            let y = b.linear("fc", f, 3, true);
            check(&b.finish(y));
        }
    }

    #[test]
    fn batch_norm_derivatives() {
        let mut b = Build::new(&[3, 5, 4], 12);
        let c = b.conv("conv", b.x(), 4, window([3, 3], [1, 1], [1; 4], [1, 1]), 1, true);
        let n = b.batch_norm("bn", c);
        let t = b.unary("tanh", UnaryOp::Tanh, n);
        let g = b.op("gap", Op::GlobalAveragePool, &[t]);
        let f = b.flatten("flat", g);
        let h = b.linear("fc1", f, 5, true);
        let n = b.batch_norm("bn1d", h);
        let y = b.linear("fc2", n, 3, true);
        check(&b.finish(y));
    }

    #[test]
    fn layer_norm_derivatives_with_and_without_bias() {
        let mut b = Build::new(&[3, 5], 13);
        let g1 = b.positive_param("ln1.weight", &[5]);
        let b1 = b.param("ln1.bias", &[5]);
        let n = b.op("ln1", Op::LayerNorm { axis: 1, epsilon: 1e-5 }, &[b.x(), g1, b1]);
        let w = b.param("mm.weight", &[4, 5]);
        let m = b.op("mm", Op::MatMul { trans_b: true }, &[n, w]);
        let a = b.unary("gelu", UnaryOp::Gelu, m);
        let g2 = b.positive_param("ln2.weight", &[3, 4]);
        let n = b.op("ln2", Op::LayerNorm { axis: 0, epsilon: 1e-3 }, &[a, g2]);
        let f = b.flatten("flat", n);
        let y = b.linear("fc", f, 3, true);
        check(&b.finish(y));
    }

    fn embedding_graph(seed: u64) -> Graph {
        let mut b = Build::tokens(&[6], seed);
        let table = b.param("emb.weight", &[7, 4]);
        let e = b.op("emb", Op::Gather, &[table, b.x()]);
        let w = b.param("proj.weight", &[5, 4]);
        let bias = b.param("proj.bias", &[5]);
        let h = b.op("proj", Op::MatMul { trans_b: true }, &[e, w, bias]);
        let t = b.unary("tanh", UnaryOp::Tanh, h);
        let m = b.op("pool", Op::ReduceMean { axes: vec![0], keepdims: false }, &[t]);
        let y = b.linear("head", m, 3, true);
        b.finish(y)
    }

    #[test]
    fn gather_derivatives_with_a_repeated_token() {
        let graph = embedding_graph(14);
        // Token 2 twice (its row's gradient accumulates), token 6 (the last row) once.
        check_derivatives(&graph, &[2.0, 0.0, 2.0, 5.0, 6.0, 1.0]);
    }

    #[test]
    fn gather_refuses_bad_indices_naming_sample_and_position() {
        let graph = embedding_graph(15);
        for bad in [7.0f32, -1.0, 2.5] {
            let mut inputs = Array2::from_elem((3, 6), 1.0f32);
            inputs[[2, 4]] = bad;
            let data = Dataset { inputs, targets: Targets::Classes(vec![0, 1, 2]) };
            let err = fisher(&graph, &data, Likelihood::Categorical, Variant::Empirical, NetForm::Diagonal).unwrap_err();
            let text = err.to_string();
            assert!(text.contains("sample 2") && text.contains("position 4") && text.contains("emb"), "{text}");
        }
        assert!(forward(&graph, &[0.0; 5]).is_err(), "an input of the wrong length is refused");
    }

    #[test]
    fn forward_values_follow_onnx_semantics() {
        let value = |graph: &Graph, x: &[f64]| forward(graph, x).unwrap()[graph.output].clone();
        let one_node = |shape: &[usize], op: Op, weight: Option<(&[usize], Vec<f32>)>| {
            let mut b = GraphBuilder::new("x", shape, InputType::Float);
            let mut inputs = vec![b.input()];
            if let Some((s, data)) = weight {
                inputs.push(b.param("w", s, data).unwrap());
            }
            let y = b.node("op", op, &inputs).unwrap();
            let n = b.tensor(y).len();
            let f = b.reshape("flat", y, &[n]).unwrap();
            b.finish(f).unwrap()
        };
        let nine: Vec<f64> = (1..=9).map(f64::from).collect();
        // Conv, stride 2, pads top/left 1: taps at −1 are padding.
        let conv = Op::Conv { window: window([2, 2], [2, 2], [1, 1, 0, 0], [1, 1]), group: 1 };
        let g = one_node(&[1, 3, 3], conv, Some((&[1, 1, 2, 2], vec![1.0, 0.0, 0.0, -1.0])));
        assert_eq!(value(&g, &nine), [-1.0, -3.0, -7.0, -4.0]);
        // Dilation 2: the four corners.
        let conv = Op::Conv { window: window([2, 2], [1, 1], [0; 4], [2, 2]), group: 1 };
        let g = one_node(&[1, 3, 3], conv, Some((&[1, 1, 2, 2], vec![1.0, 2.0, 3.0, 4.0])));
        assert_eq!(value(&g, &nine), [64.0]);
        // Groups: each output channel sees its own input channel.
        let conv = Op::Conv { window: window([1, 1], [1, 1], [0; 4], [1, 1]), group: 2 };
        let g = one_node(&[2, 1, 1], conv, Some((&[2, 1, 1, 1], vec![2.0, 3.0])));
        assert_eq!(value(&g, &[5.0, 7.0]), [10.0, 21.0]);
        // MaxPool: ceil_mode adds a window clipped at the end; padding never wins.
        let pool = |pads, ceil_mode| Op::MaxPool { window: window([1, 2], [1, 2], pads, [1, 1]), ceil_mode };
        let x = [1.0, 5.0, 2.0, 4.0, 3.0];
        assert_eq!(value(&one_node(&[1, 1, 5], pool([0; 4], true), None), &x), [5.0, 4.0, 3.0]);
        assert_eq!(value(&one_node(&[1, 1, 5], pool([0; 4], false), None), &x), [5.0, 4.0]);
        let negative = x.map(|v| -v);
        assert_eq!(value(&one_node(&[1, 1, 5], pool([0, 1, 0, 0], false), None), &negative), [-1.0, -2.0, -3.0]);
        // AveragePool over [1, 2, 3, 4], kernel 3, stride 2, pad 1, ceil_mode: windows
        // [pad 1 2], [2 3 4], [4 pad | past the padding]. PyTorch's AvgPool1d gives
        // [1, 3, 2] with count_include_pad and [1.5, 3, 4] without.
        let pool = |count_include_pad| Op::AveragePool {
            window: window([1, 3], [1, 2], [0, 1, 0, 1], [1, 1]),
            ceil_mode: true,
            count_include_pad,
        };
        let x = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(value(&one_node(&[1, 1, 4], pool(true), None), &x), [1.0, 3.0, 2.0]);
        assert_eq!(value(&one_node(&[1, 1, 4], pool(false), None), &x), [1.5, 3.0, 4.0]);
        // Transpose and ReduceMean.
        let t = one_node(&[2, 3], Op::Transpose { perm: vec![1, 0] }, None);
        assert_eq!(value(&t, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), [1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
        let r = one_node(&[2, 3], Op::ReduceMean { axes: vec![1], keepdims: true }, None);
        assert_eq!(value(&r, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), [2.0, 5.0]);
        // Gemm with trans_b: W is out×in.
        let gemm_node = Op::Gemm { alpha: 1.0, beta: 1.0, trans_b: true };
        let g = one_node(&[2], gemm_node, Some((&[3, 2], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0])));
        assert_eq!(value(&g, &[1.0, -1.0]), [-1.0, -1.0, -1.0]);
        // Broadcasting a [2, 1] constant against a per-sample [2, 3].
        let mut b = GraphBuilder::new("x", &[2, 3], InputType::Float);
        let c = b.constant("c", &[2, 1], vec![10.0, 20.0]).unwrap();
        let y = b.node("add", Op::Binary(BinaryOp::Sub), &[c, b.input()]).unwrap();
        let f = b.reshape("flat", y, &[6]).unwrap();
        let g = b.finish(f).unwrap();
        assert_eq!(value(&g, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), [9.0, 8.0, 7.0, 16.0, 15.0, 14.0]);
        // GELU (exact and tanh) at 1, softplus without overflow, layer norm's biased variance.
        assert!((unary(UnaryOp::Gelu, 1.0) - 0.841_344_746_068_542_9).abs() < 1e-15);
        assert!((unary(UnaryOp::GeluTanh, 1.0) - 0.841_191_990_608_276_8).abs() < 1e-12);
        assert_eq!(unary(UnaryOp::Softplus, 1000.0), 1000.0);
        assert!((unary(UnaryOp::Softplus, -50.0) - (-50.0f64).exp()).abs() < 1e-35);
        let (normalized, _) = layer_norm(&[1.0, 3.0], 0.0);
        assert_eq!(normalized, [-1.0, 1.0]);
    }

    /// A small CNN: conv + BN + ReLU + max pool, a strided conv, average pool, GAP, linear.
    fn cnn(seed: u64) -> Graph {
        let mut b = Build::new(&[3, 9, 8], seed);
        let c1 = b.conv("conv1", b.x(), 4, window([3, 3], [1, 1], [1; 4], [1, 1]), 1, true);
        let n1 = b.batch_norm("bn1", c1);
        let r1 = b.unary("relu1", UnaryOp::Relu, n1);
        let p1 = b.op("pool1", Op::MaxPool { window: window([2, 2], [2, 2], [0; 4], [1, 1]), ceil_mode: true }, &[r1]);
        let c2 = b.conv("conv2", p1, 5, window([3, 3], [2, 2], [1; 4], [1, 1]), 1, true);
        let r2 = b.unary("relu2", UnaryOp::Relu, c2);
        let avg = Op::AveragePool { window: window([2, 2], [1, 1], [1, 1, 0, 0], [1, 1]), ceil_mode: false, count_include_pad: false };
        let p2 = b.op("pool2", avg, &[r2]);
        let g = b.op("gap", Op::GlobalAveragePool, &[p2]);
        let f = b.flatten("flat", g);
        let y = b.linear("fc", f, 4, true);
        b.finish(y)
    }

    /// A residual MLP: linear, LayerNorm, GELU, linear, skip connection, tanh GELU, linear.
    fn residual_mlp(seed: u64) -> Graph {
        let mut b = Build::new(&[6], seed);
        let h = b.linear("fc1", b.x(), 8, true);
        let g = b.positive_param("ln.weight", &[8]);
        let beta = b.param("ln.bias", &[8]);
        let n = b.op("ln", Op::LayerNorm { axis: 0, epsilon: 1e-5 }, &[h, g, beta]);
        let a = b.unary("gelu", UnaryOp::Gelu, n);
        let h2 = b.linear("fc2", a, 8, true);
        let s = b.op("skip", Op::Binary(BinaryOp::Add), &[h, h2]);
        let a2 = b.unary("gelu2", UnaryOp::GeluTanh, s);
        let y = b.linear("fc3", a2, 4, true);
        b.finish(y)
    }

    /// A ResNet basic block with a downsampling branch (convs without bias, each with BN).
    fn resnet_block(seed: u64) -> Graph {
        let mut b = Build::new(&[4, 6, 6], seed);
        let c1 = b.conv("conv1", b.x(), 6, window([3, 3], [2, 2], [1; 4], [1, 1]), 1, false);
        let n1 = b.batch_norm("bn1", c1);
        let r1 = b.unary("relu1", UnaryOp::Relu, n1);
        let c2 = b.conv("conv2", r1, 6, window([3, 3], [1, 1], [1; 4], [1, 1]), 1, false);
        let n2 = b.batch_norm("bn2", c2);
        let d = b.conv("downsample.0", b.x(), 6, window([1, 1], [2, 2], [0; 4], [1, 1]), 1, false);
        let dn = b.batch_norm("downsample.1", d);
        let s = b.op("add", Op::Binary(BinaryOp::Add), &[n2, dn]);
        let r = b.unary("relu", UnaryOp::Relu, s);
        let g = b.op("gap", Op::GlobalAveragePool, &[r]);
        let f = b.flatten("flat", g);
        let y = b.linear("fc", f, 3, true);
        b.finish(y)
    }

    #[test]
    fn whole_network_derivatives() {
        check(&cnn(20));
        check(&residual_mlp(21));
        check(&resnet_block(22));
        let graph = embedding_graph(23);
        check_derivatives(&graph, &input(&graph, 5, 7));
    }

    /// N samples for `graph`: normal features (or tokens below `vocab`) and targets.
    fn dataset(graph: &Graph, n: usize, likelihood: Likelihood, vocab: usize, seed: u64) -> Dataset {
        let d = graph.tensors[graph.input].len();
        let mut inputs = Array2::zeros((n, d));
        for i in 0..n {
            let x = input(graph, seed + i as u64, vocab);
            inputs.row_mut(i).assign(&Array1::from(x).mapv(|v| v as f32));
        }
        let mut rng = SplitMix64::new(seed ^ 0xABCD);
        let c = graph.outputs();
        let targets = match likelihood {
            Likelihood::Categorical => Targets::Classes((0..n).map(|_| rng.below(c as u64) as u32).collect()),
            Likelihood::Gaussian => Targets::Values(Array2::from_shape_simple_fn((n, c), || rng.normal() as f32)),
        };
        Dataset { inputs, targets }
    }

    const VARIANTS: [Variant; 3] = [Variant::Empirical, Variant::True, Variant::MonteCarlo { samples: 3, seed: 7 }];

    #[test]
    fn linear_graph_equals_the_mlp_reference_in_every_variant_and_form() {
        use crate::model::{Activation, Linear, Mlp};
        let mut rng = SplitMix64::new(30);
        let mut matrix = |rows: usize, cols: usize| Array2::from_shape_simple_fn((rows, cols), || (0.5 * rng.normal()) as f32);
        let widths = [5, 7, 4, 3];
        let layers: Vec<Linear> = (0..3)
            .map(|l| Linear {
                index: 2 * l,
                weight: matrix(widths[l + 1], widths[l]),
                bias: (l != 1).then(|| matrix(1, widths[l + 1]).row(0).to_owned()),
            })
            .collect();
        let activations = vec![Activation::Tanh, Activation::Gelu];
        let mlp = Mlp::new(layers.clone(), activations).unwrap();
        let mut b = GraphBuilder::new("x", &[5], InputType::Float);
        let mut h = b.input();
        for (l, layer) in layers.iter().enumerate() {
            let (out, fan_in) = layer.weight.dim();
            let w = b.param(&format!("{}.weight", layer.index), &[out, fan_in], layer.weight.iter().copied().collect()).unwrap();
            let mut inputs = vec![h, w];
            if let Some(bias) = &layer.bias {
                inputs.push(b.param(&format!("{}.bias", layer.index), &[out], bias.to_vec()).unwrap());
            }
            h = b.node(&format!("linear{l}"), gemm(), &inputs).unwrap();
            let act = [UnaryOp::Tanh, UnaryOp::Gelu];
            if l < 2 {
                h = b.node(&format!("act{l}"), Op::Unary(act[l]), &[h]).unwrap();
            }
        }
        let graph = b.finish(h).unwrap();
        for likelihood in [Likelihood::Categorical, Likelihood::Gaussian] {
            let data = dataset(&graph, 9, likelihood, 0, 31);
            for variant in VARIANTS {
                for form in NetForm::ALL {
                    let ours = fisher(&graph, &data, likelihood, variant, form).unwrap();
                    let theirs = crate::reference::network::fisher(&mlp, &data, likelihood, variant, form).unwrap();
                    let agreement = ours.agreement(&theirs).unwrap();
                    assert!(agreement.max_rel < 1e-12, "{likelihood} {variant} {form}: {agreement:?}");
                }
            }
        }
    }

    fn softmax(z: &[f64]) -> Vec<f64> {
        let max = z.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v));
        let e: Vec<f64> = z.iter().map(|v| (v - max).exp()).collect();
        let sum: f64 = e.iter().sum();
        e.iter().map(|v| v / sum).collect()
    }

    #[test]
    fn full_equals_jt_lambda_j() {
        // True categorical: Λ = diag(p) − ppᵀ; true Gaussian: Λ = I.
        let graph = cnn(40);
        let p = graph.param_count();
        for likelihood in [Likelihood::Categorical, Likelihood::Gaussian] {
            let data = dataset(&graph, 5, likelihood, 0, 41);
            let NetFisher::Full(full) = fisher(&graph, &data, likelihood, Variant::True, NetForm::Full).unwrap() else {
                panic!("not full")
            };
            let mut want = Array2::<f64>::zeros((p, p));
            for i in 0..data.len() {
                let x: Vec<f64> = data.inputs.row(i).iter().map(|&v| f64::from(v)).collect();
                let jac = jacobian(&graph, &x).unwrap();
                let c = jac.nrows();
                let lambda = match likelihood {
                    Likelihood::Categorical => {
                        let probabilities = softmax(&forward(&graph, &x).unwrap()[graph.output]);
                        Array2::from_shape_fn((c, c), |(a, b)| {
                            f64::from(u8::from(a == b)) * probabilities[a] - probabilities[a] * probabilities[b]
                        })
                    }
                    Likelihood::Gaussian => Array2::eye(c),
                };
                want += &jac.t().dot(&lambda).dot(&jac);
            }
            want /= data.len() as f64;
            assert_close("full vs JᵀΛJ", &full, &want, 1e-12);
            assert!(full.iter().zip(full.t().iter()).all(|(a, b)| a == b), "exactly symmetric");
        }
    }

    #[test]
    fn every_form_is_consistent_with_full_and_fvp() {
        let graph = resnet_block(50);
        let data = dataset(&graph, 6, Likelihood::Categorical, 0, 51);
        let likelihood = Likelihood::Categorical;
        for variant in VARIANTS {
            let get = |form| fisher(&graph, &data, likelihood, variant, form).unwrap();
            let NetFisher::Full(full) = get(NetForm::Full) else { panic!() };
            let NetFisher::Diagonal(diag) = get(NetForm::Diagonal) else { panic!() };
            let NetFisher::Layer(blocks) = get(NetForm::Layer) else { panic!() };
            let NetFisher::Grads(grads) = get(NetForm::Grads) else { panic!() };
            let NetFisher::Norms(norms) = get(NetForm::Norms) else { panic!() };
            let diag_full = full.diag().to_owned().insert_axis(ndarray::Axis(0));
            assert_close("diag", &diag.clone().insert_axis(ndarray::Axis(0)), &diag_full, 1e-12);
            let offsets = graph.param_offsets();
            let modules = graph.modules();
            assert_eq!(blocks.len(), modules.len());
            for ((name, idx), block) in modules.iter().zip(&blocks) {
                let (a, b) = (offsets[idx[0]], offsets[idx[idx.len() - 1] + 1]);
                assert_close(name, block, &full.slice(s![a..b, a..b]).to_owned(), 1e-12);
            }
            let r = rows_per_sample(variant, graph.outputs());
            assert_eq!(grads.nrows(), data.len() * r);
            assert_close("GᵀG/N", &(grads.t().dot(&grads) / data.len() as f64), &full, 1e-12);
            let trace = full.diag().sum();
            assert!((norms.mean().unwrap() - trace).abs() <= 1e-12 * trace, "mean norms vs tr F");
            let mut rng = SplitMix64::new(52);
            let v: Vec<f64> = (0..graph.param_count()).map(|_| rng.normal()).collect();
            let product = fvp(&graph, &data, likelihood, variant, &v).unwrap();
            let want = full.dot(&Array1::from(v.clone())).insert_axis(ndarray::Axis(0));
            assert_close("F·v", &Array1::from(product).insert_axis(ndarray::Axis(0)), &want, 1e-12);
        }
    }

    #[test]
    fn kfac_conv_factors_by_hand_for_one_sample() {
        // One conv (C=1 → Cout=2, kernel 1×2, right pad 1) on a 2×3 input, the output itself:
        // S = 6 positions, each patch [x(h, w), x(h, w+1) or 0 past the edge, 1].
        let mut b = Build::new(&[1, 2, 3], 60);
        let c = b.conv("conv", b.x(), 2, window([1, 2], [1, 1], [0, 0, 0, 1], [1, 1]), 1, true);
        let y = b.flatten("flat", c);
        let graph = b.finish(y);
        let x = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let patches = [[1.0, 2.0, 1.0], [2.0, 3.0, 1.0], [3.0, 0.0, 1.0], [4.0, 5.0, 1.0], [5.0, 6.0, 1.0], [6.0, 0.0, 1.0]];
        let mut a_want = Array2::<f64>::zeros((3, 3));
        for patch in &patches {
            for i in 0..3 {
                for j in 0..3 {
                    a_want[[i, j]] += patch[i] * patch[j];
                }
            }
        }
        // True Gaussian: the rows are the 12 unit vectors; at each position s the rows that
        // hit it give δ = e_o, so Σ_r Σ_s δδᵀ = S·I and G = I.
        let data = Dataset {
            inputs: Array2::from_shape_vec((1, 6), x.to_vec()).unwrap(),
            targets: Targets::Values(Array2::zeros((1, 12))),
        };
        let NetFisher::Kfac(factors) = fisher(&graph, &data, Likelihood::Gaussian, Variant::True, NetForm::Kfac).unwrap() else {
            panic!()
        };
        assert_eq!(factors.len(), 1);
        assert_eq!(factors[0].a, a_want);
        assert_close("G", &factors[0].g, &Array2::eye(2), 1e-15);
        // Empirical Gaussian: δ_s = (y − z) at position s, G = (1/S) Σ_s δ_s δ_sᵀ.
        let targets = Array2::from_shape_fn((1, 12), |(_, j)| j as f32 * 0.25);
        let data = Dataset { targets: Targets::Values(targets.clone()), ..data };
        let NetFisher::Kfac(factors) = fisher(&graph, &data, Likelihood::Gaussian, Variant::Empirical, NetForm::Kfac).unwrap() else {
            panic!()
        };
        let z = forward(&graph, &x.map(f64::from)).unwrap()[graph.output].clone();
        let residual: Vec<f64> = (0..12).map(|j| f64::from(targets[[0, j]]) - z[j]).collect();
        let mut g_want = Array2::<f64>::zeros((2, 2));
        for s in 0..6 {
            for o in 0..2 {
                for o2 in 0..2 {
                    g_want[[o, o2]] += residual[o * 6 + s] * residual[o2 * 6 + s] / 6.0;
                }
            }
        }
        assert_eq!(factors[0].a, a_want);
        assert_close("G", &factors[0].g, &g_want, 1e-14);
    }

    #[test]
    fn kfac_matmul_factors_from_their_definition() {
        // MatMul first (A from the inputs directly) and last (G = I for the true Gaussian).
        let mut b = Build::new(&[3, 4], 70);
        let w1 = b.param("l1.weight", &[5, 4]);
        let b1 = b.param("l1.bias", &[5]);
        let h = b.op("l1", Op::MatMul { trans_b: true }, &[b.x(), w1, b1]);
        let t = b.unary("tanh", UnaryOp::Tanh, h);
        let w2 = b.param("l2.weight", &[5, 2]);
        let y = b.op("l2", Op::MatMul { trans_b: false }, &[t, w2]);
        let y = b.flatten("flat", y);
        let graph = b.finish(y);
        let data = dataset(&graph, 4, Likelihood::Gaussian, 0, 71);
        let NetFisher::Kfac(factors) = fisher(&graph, &data, Likelihood::Gaussian, Variant::True, NetForm::Kfac).unwrap() else {
            panic!()
        };
        let mut a_want = Array2::<f64>::zeros((5, 5));
        for i in 0..data.len() {
            for s in 0..3 {
                let mut row: Vec<f64> = (0..4).map(|k| f64::from(data.inputs[[i, s * 4 + k]])).collect();
                row.push(1.0);
                for p in 0..5 {
                    for q in 0..5 {
                        a_want[[p, q]] += row[p] * row[q] / data.len() as f64;
                    }
                }
            }
        }
        assert_close("A of l1", &factors[0].a, &a_want, 1e-14);
        assert_close("G of l2", &factors[1].g, &Array2::eye(2), 1e-14);
        assert_eq!(factors[1].a.dim(), (5, 5), "l2 has no bias: A is K×K");
    }

    #[test]
    fn kfac_is_exact_for_one_sample_one_row_and_one_position() {
        // N = 1, empirical (R = 1), Gemm layers (S = 1): g = δ ⊗ ã, so G ⊗ A is the block.
        let graph = residual_mlp(80);
        let data = dataset(&graph, 1, Likelihood::Categorical, 0, 81);
        let get = |form| fisher(&graph, &data, Likelihood::Categorical, Variant::Empirical, form).unwrap();
        let NetFisher::Kfac(factors) = get(NetForm::Kfac) else { panic!() };
        let NetFisher::Layer(blocks) = get(NetForm::Layer) else { panic!() };
        let layers = kfac_layers(&graph).unwrap();
        let modules: Vec<String> = graph.modules().into_iter().map(|(m, _)| m).collect();
        assert_eq!(layers.iter().map(|l| l.module.as_str()).collect::<Vec<_>>(), ["fc1", "fc2", "fc3"]);
        for (layer, f) in layers.iter().zip(&factors) {
            let block = &blocks[modules.iter().position(|m| *m == layer.module).unwrap()];
            let expanded = crate::fisher::kfac_expand(f, layer.bias.is_some()).unwrap();
            assert_close(&layer.module, &expanded, block, 1e-12);
        }
    }

    #[test]
    fn kfac_layers_of_networks() {
        let layers = kfac_layers(&resnet_block(90)).unwrap();
        let summary: Vec<(&str, usize, usize, usize, bool)> =
            layers.iter().map(|l| (l.module.as_str(), l.outputs, l.inputs, l.positions, l.bias.is_some())).collect();
        assert_eq!(
            summary,
            [("conv1", 6, 36, 9, false), ("conv2", 6, 54, 9, false), ("downsample.0", 6, 4, 9, false), ("fc", 3, 6, 1, true)]
        );
        // The embedding and the norms have no factors.
        let layers = kfac_layers(&embedding_graph(91)).unwrap();
        assert_eq!(layers.iter().map(|l| (l.module.as_str(), l.positions)).collect::<Vec<_>>(), [("proj", 6), ("head", 1)]);
        let graph = cnn(92);
        let data = dataset(&graph, 3, Likelihood::Categorical, 0, 93);
        let NetFisher::Kfac(factors) = fisher(&graph, &data, Likelihood::Categorical, Variant::True, NetForm::Kfac).unwrap() else {
            panic!()
        };
        assert_eq!(factors.iter().map(|f| (f.a.nrows(), f.g.nrows())).collect::<Vec<_>>(), [(28, 4), (37, 5), (6, 4)]);
        for f in &factors {
            assert!(f.a.iter().zip(f.a.t().iter()).all(|(x, y)| x == y) && f.g.iter().zip(f.g.t().iter()).all(|(x, y)| x == y));
        }
    }

    #[test]
    fn kfac_refuses_grouped_convolutions_and_tied_weights() {
        let mut b = Build::new(&[4, 5, 5], 100);
        let c = b.conv("conv", b.x(), 4, window([3, 3], [1, 1], [1; 4], [1, 1]), 2, true);
        let f = b.flatten("flat", c);
        let y = b.linear("fc", f, 3, true);
        let graph = b.finish(y);
        let err = kfac_layers(&graph).unwrap_err().to_string();
        assert!(err.contains("grouped convolutions") && err.contains("conv"), "{err}");
        // Other forms still work on it.
        let data = dataset(&graph, 2, Likelihood::Categorical, 0, 101);
        assert!(fisher(&graph, &data, Likelihood::Categorical, Variant::Empirical, NetForm::Diagonal).is_ok());

        let mut b = Build::new(&[4], 102);
        let w = b.param("fc.weight", &[4, 4]);
        let h = b.op("fc_a", gemm(), &[b.x(), w]);
        let y = b.op("fc_b", gemm(), &[h, w]);
        let err = kfac_layers(&b.finish(y)).unwrap_err().to_string();
        assert!(err.contains("tied"), "{err}");
    }

    #[test]
    fn full_beyond_the_bound_is_refused_before_any_work() {
        let mut b = GraphBuilder::new("x", &[40_000], InputType::Float);
        let w = b.param("fc.weight", &[1, 40_000], vec![0.0; 40_000]).unwrap();
        let y = b.node("fc", gemm(), &[b.input(), w]).unwrap();
        let graph = b.finish(y).unwrap();
        let data = Dataset { inputs: Array2::zeros((1, 40_000)), targets: Targets::Values(Array2::zeros((1, 1))) };
        let err = fisher(&graph, &data, Likelihood::Gaussian, Variant::True, NetForm::Full).unwrap_err();
        assert!(matches!(err, FisherError::DoesNotFit { .. }), "{err}");
        // Bad data are refused with one-line messages.
        let wrong = Dataset { inputs: Array2::zeros((1, 3)), targets: Targets::Values(Array2::zeros((1, 1))) };
        assert!(fisher(&graph, &wrong, Likelihood::Gaussian, Variant::True, NetForm::Diagonal).is_err());
        assert!(fisher(&graph, &data, Likelihood::Categorical, Variant::True, NetForm::Diagonal).is_err());
        assert!(fvp(&graph, &data, Likelihood::Gaussian, Variant::True, &[0.0; 3]).is_err());
    }
}
