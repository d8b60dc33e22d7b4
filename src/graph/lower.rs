//! Lowering a [`Graph`] to a primitive [`Program`]: each IR operator becomes a few
//! primitives ([`crate::graph::prim`]); reverse and forward mode are then derived from the
//! primitives alone ([`crate::graph::autodiff`]), so an operator only needs its forward
//! lowering here.
//!
//! Layouts: a per-sample tensor is its row-major per-sample shape. Conv lowers to im2col
//! columns `col` of shape [group·K', Ho·Wo] (K' = C/group·kh·kw, rows in (c, i, j) order,
//! zeros at padding) and a grouped GEMM W·col, W viewed as group blocks of (Cout/group)×K'.

use std::collections::HashMap;
use std::sync::Arc;

use super::ir::{BinaryOp, Graph, Op, TensorId, TensorKind, UnaryOp, Window};
use super::prim::{BinFn, Csr, Inst, KfacSite, MatDims, Program, Rows, Slot, SlotId, UnaryFn};
use crate::error::{FisherError, Result};

/// The largest per-sample tensor (values): indices are held as f32 by [`Inst::ArgMax`],
/// exact below 2²⁴.
pub const MAX_TENSOR_LEN: usize = 1 << 24;

/// The forward program and what autodiff needs to know about it.
#[derive(Debug, Clone)]
pub struct Lowered {
    /// Slots so far.
    pub slots: Vec<Slot>,
    /// Shared values known at lowering.
    pub shared: Vec<(SlotId, Arc<Vec<f32>>)>,
    /// Forward instructions.
    pub forward: Vec<Inst>,
    /// The input slot.
    pub input: SlotId,
    /// The output slot.
    pub output: SlotId,
    /// Parameter slots in θ order.
    pub params: Vec<SlotId>,
    /// For each [`Inst::ArgMax`] destination, the windows it searched (the scatter of its
    /// gather needs their transpose).
    pub windows: HashMap<SlotId, Arc<Csr>>,
    /// KFAC sites; `output_cot` holds the *forward* slot of the pre-activation output until
    /// autodiff replaces it with its cotangent.
    pub kfac: Vec<KfacSite>,
    /// Modules without KFAC factors, with the reason (grouped convolutions).
    pub kfac_refused: Vec<(String, String)>,
}

struct Lowerer<'g> {
    graph: &'g Graph,
    out: Lowered,
    slot_of: Vec<Option<SlotId>>,
    zeros: HashMap<usize, SlotId>,
}

fn strides_of(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for k in (0..shape.len().saturating_sub(1)).rev() {
        s[k] = s[k + 1] * shape[k + 1];
    }
    s
}

impl<'g> Lowerer<'g> {
    fn slot(&mut self, name: String, len: usize, rows: Rows) -> SlotId {
        self.out.slots.push(Slot { name, len, rows });
        self.out.slots.len() - 1
    }

    fn shared_const(&mut self, name: String, values: Vec<f32>) -> SlotId {
        let s = self.slot(name, values.len(), Rows::Shared);
        self.out.shared.push((s, Arc::new(values)));
        s
    }

    fn emit(&mut self, inst: Inst) {
        self.out.forward.push(inst);
    }

    fn rows(&self, s: SlotId) -> Rows {
        self.out.slots[s].rows
    }

    /// The slot of IR tensor `t`.
    fn get(&self, t: TensorId) -> Result<SlotId> {
        self.slot_of[t].ok_or_else(|| FisherError::InvalidInput(format!("tensor {} is used before it is computed", self.graph.tensors[t].name)))
    }

    fn new_value(&mut self, t: TensorId, rows: Rows) -> SlotId {
        let tensor = &self.graph.tensors[t];
        let s = self.slot(tensor.name.clone(), tensor.len(), rows);
        self.slot_of[t] = Some(s);
        s
    }

    /// Row class of a result computed from `inputs`: `Sample` if any varies per sample.
    fn class_of(&self, inputs: &[SlotId]) -> Rows {
        if inputs.iter().any(|&s| self.rows(s) != Rows::Shared) {
            Rows::Sample
        } else {
            Rows::Shared
        }
    }

    /// `src` (len = prod(from)) broadcast to `to` (numpy alignment), as a new slot of the
    /// same row class; `src` itself when the shapes already agree.
    fn expand(&mut self, src: SlotId, from: &[usize], to: &[usize], name: &str) -> SlotId {
        let from_n: usize = from.iter().product();
        let to_n: usize = to.iter().product();
        if from_n == to_n {
            return src;
        }
        let rank = to.len();
        let fs = strides_of(from);
        let ts = strides_of(to);
        let map: Vec<Option<usize>> = (0..to_n)
            .map(|j| {
                let mut i = 0;
                for ax in 0..rank {
                    let coord = (j / ts[ax]) % to[ax];
                    if let Some(fa) = (ax + from.len()).checked_sub(rank) {
                        if from[fa] != 1 {
                            i += coord * fs[fa];
                        }
                    }
                }
                Some(i)
            })
            .collect();
        let rows = self.rows(src);
        let dst = self.slot(format!("{name}.expand"), to_n, rows);
        self.emit(Inst::Sparse { dst, src, map: Arc::new(Csr::gather(&map, from_n)), acc: false });
        dst
    }

    fn binary(&mut self, dst: SlotId, a: SlotId, b: SlotId, f: BinFn) {
        self.emit(Inst::Binary { dst, a, b, f, acc: false });
    }

    fn unary(&mut self, dst: SlotId, src: SlotId, f: UnaryFn) {
        self.emit(Inst::Unary { dst, src, f });
    }

    fn lower_node(&mut self, k: usize) -> Result<()> {
        let node = &self.graph.nodes[k];
        let g = self.graph;
        let shape = |t: TensorId| g.tensors[t].shape.clone();
        let ins: Vec<SlotId> = node.inputs.iter().map(|&t| self.get(t)).collect::<Result<_>>()?;
        let out_t = node.output;
        let out_shape = shape(out_t);
        let out_len: usize = out_shape.iter().product();
        if out_len > MAX_TENSOR_LEN {
            return Err(FisherError::InvalidInput(format!(
                "node {}: its output has {out_len} values per sample; at most {MAX_TENSOR_LEN} are supported",
                node.name
            )));
        }
        let name = node.name.clone();
        match &node.op {
            Op::Reshape | Op::Identity => {
                self.slot_of[out_t] = Some(ins[0]);
            }
            Op::Gemm { alpha, beta, trans_b } => {
                let w = &g.tensors[node.inputs[1]];
                let (m, kk) = if *trans_b { (w.shape[0], w.shape[1]) } else { (w.shape[1], w.shape[0]) };
                let has_c = node.inputs.len() > 2;
                let plain = *alpha == 1.0 && (*beta == 1.0 || !has_c);
                let y0 = if plain && !has_c { self.new_value(out_t, Rows::Sample) } else { self.slot(format!("{name}.matmul"), m, Rows::Sample) };
                self.emit(Inst::MatMul { dst: y0, a: ins[1], b: ins[0], dims: MatDims { groups: 1, m, k: kk, n: 1, ta: !trans_b, tb: false }, acc: false });
                let mut y = y0;
                if *alpha != 1.0 {
                    let scaled = self.slot(format!("{name}.alpha"), m, Rows::Sample);
                    self.unary(scaled, y, UnaryFn::Affine(*alpha, 0.0));
                    y = scaled;
                }
                let mut bias = None;
                if has_c {
                    let c_shape = shape(node.inputs[2]);
                    let mut c = self.expand(ins[2], &c_shape, &[m], &name);
                    if *beta != 1.0 {
                        let scaled = self.slot(format!("{name}.beta"), m, self.rows(c));
                        self.unary(scaled, c, UnaryFn::Affine(*beta, 0.0));
                        c = scaled;
                    }
                    let out = self.new_value(out_t, Rows::Sample);
                    self.binary(out, y, c, BinFn::Add);
                    if plain && c_shape.iter().product::<usize>() == m {
                        bias = self.param_index(node.inputs[2]);
                    }
                } else if y != y0 || self.slot_of[out_t] != Some(y) {
                    self.slot_of[out_t] = Some(y);
                }
                if let (Some(weight), true) = (self.param_index(node.inputs[1]), *alpha == 1.0) {
                    self.out.kfac.push(KfacSite { module: g.params[weight].module().to_string(), weight, bias, input: ins[0], output_cot: y0, fan_in: kk, fan_out: m, positions: 1, positions_last: false });
                }
            }
            Op::MatMul { trans_b } => {
                let a_shape = shape(node.inputs[0]);
                let w = &g.tensors[node.inputs[1]];
                let (kk, m) = if *trans_b { (w.shape[1], w.shape[0]) } else { (w.shape[0], w.shape[1]) };
                let t: usize = a_shape[..a_shape.len() - 1].iter().product();
                let has_bias = node.inputs.len() > 2;
                let y0 = if has_bias { self.slot(format!("{name}.matmul"), t * m, Rows::Sample) } else { self.new_value(out_t, Rows::Sample) };
                self.emit(Inst::MatMul { dst: y0, a: ins[0], b: ins[1], dims: MatDims { groups: 1, m: t, k: kk, n: m, ta: false, tb: *trans_b }, acc: false });
                let mut bias = None;
                if has_bias {
                    let b = self.expand(ins[2], &[m], &[t, m], &name);
                    let out = self.new_value(out_t, Rows::Sample);
                    self.binary(out, y0, b, BinFn::Add);
                    bias = self.param_index(node.inputs[2]);
                }
                if let Some(weight) = self.param_index(node.inputs[1]) {
                    self.out.kfac.push(KfacSite { module: g.params[weight].module().to_string(), weight, bias, input: ins[0], output_cot: y0, fan_in: kk, fan_out: m, positions: t, positions_last: false });
                }
            }
            Op::Conv { window, group } => {
                let [c, h, wd] = shape(node.inputs[0])[..] else { unreachable!("checked by infer_shape") };
                let [co, ci, kh, kw] = shape(node.inputs[1])[..] else { unreachable!("checked by infer_shape") };
                let [_, ho, wo] = out_shape[..] else { unreachable!("checked by infer_shape") };
                let kprime = ci * kh * kw;
                let s = ho * wo;
                let rows_n = group * kprime;
                let col_len = rows_n.checked_mul(s).filter(|&v| v <= MAX_TENSOR_LEN).ok_or_else(|| {
                    FisherError::InvalidInput(format!("node {name}: its im2col matrix would exceed {MAX_TENSOR_LEN} values per sample"))
                })?;
                let mut map = Vec::with_capacity(col_len);
                for q in 0..*group {
                    for cl in 0..ci {
                        let ch = q * ci + cl;
                        for i in 0..kh {
                            for j in 0..kw {
                                for oh in 0..ho {
                                    for ow in 0..wo {
                                        let y = (oh * window.strides[0] + i * window.dilations[0]) as isize - window.pads[0] as isize;
                                        let x = (ow * window.strides[1] + j * window.dilations[1]) as isize - window.pads[1] as isize;
                                        map.push(if y >= 0 && (y as usize) < h && x >= 0 && (x as usize) < wd {
                                            Some((ch * h + y as usize) * wd + x as usize)
                                        } else {
                                            None
                                        });
                                    }
                                }
                            }
                        }
                    }
                }
                debug_assert_eq!(c, group * ci);
                let col = self.slot(format!("{name}.col"), col_len, Rows::Sample);
                self.emit(Inst::Sparse { dst: col, src: ins[0], map: Arc::new(Csr::gather(&map, c * h * wd)), acc: false });
                let has_bias = node.inputs.len() > 2;
                let y0 = if has_bias { self.slot(format!("{name}.conv"), co * s, Rows::Sample) } else { self.new_value(out_t, Rows::Sample) };
                self.emit(Inst::MatMul { dst: y0, a: ins[1], b: col, dims: MatDims { groups: *group, m: co / group, k: kprime, n: s, ta: false, tb: false }, acc: false });
                let mut bias = None;
                if has_bias {
                    let b = self.expand(ins[2], &[co, 1], &[co, s], &name);
                    let out = self.new_value(out_t, Rows::Sample);
                    self.binary(out, y0, b, BinFn::Add);
                    bias = self.param_index(node.inputs[2]);
                }
                if let Some(weight) = self.param_index(node.inputs[1]) {
                    let module = g.params[weight].module().to_string();
                    if *group == 1 {
                        self.out.kfac.push(KfacSite { module, weight, bias, input: col, output_cot: y0, fan_in: kprime, fan_out: co, positions: s, positions_last: true });
                    } else {
                        self.out.kfac_refused.push((module, format!("a grouped convolution (group = {group}) has no Kronecker-factored block here")));
                    }
                }
            }
            Op::MaxPool { window, ceil_mode } => {
                let windows = Arc::new(pool_windows(&shape(node.inputs[0]), &out_shape, window, *ceil_mode, false).0);
                let idx = self.slot(format!("{name}.argmax"), out_len, Rows::Sample);
                self.emit(Inst::ArgMax { dst: idx, src: ins[0], windows: Arc::clone(&windows) });
                self.out.windows.insert(idx, windows);
                let out = self.new_value(out_t, Rows::Sample);
                self.emit(Inst::GatherDyn { dst: out, src: ins[0], idx, acc: false });
            }
            Op::AveragePool { window, ceil_mode, count_include_pad } => {
                let (windows, divisors) = pool_windows(&shape(node.inputs[0]), &out_shape, window, *ceil_mode, true);
                let rows: Vec<Vec<(usize, f32)>> = (0..windows.rows())
                    .map(|j| {
                        let entries = &windows.cols[windows.offsets[j] as usize..windows.offsets[j + 1] as usize];
                        let d = if *count_include_pad { divisors[j] } else { entries.len() };
                        entries.iter().map(|&c| (c as usize, 1.0 / d as f32)).collect()
                    })
                    .collect();
                let out = self.new_value(out_t, Rows::Sample);
                self.emit(Inst::Sparse { dst: out, src: ins[0], map: Arc::new(Csr::from_rows(&rows, windows.src_len)), acc: false });
            }
            Op::GlobalAveragePool | Op::ReduceMean { .. } => {
                let in_shape = shape(node.inputs[0]);
                let axes: Vec<usize> = match &node.op {
                    Op::ReduceMean { axes, .. } => axes.clone(),
                    _ => vec![1, 2],
                };
                let kept: Vec<usize> = (0..in_shape.len()).filter(|a| !axes.contains(a)).collect();
                let kept_shape: Vec<usize> = kept.iter().map(|&a| in_shape[a]).collect();
                let ks = strides_of(&kept_shape);
                let count: usize = axes.iter().map(|&a| in_shape[a]).product();
                let n_out: usize = kept_shape.iter().product();
                let mut rows = vec![Vec::new(); n_out];
                let is = strides_of(&in_shape);
                for i in 0..in_shape.iter().product::<usize>() {
                    let j: usize = kept.iter().zip(&ks).map(|(&a, &st)| ((i / is[a]) % in_shape[a]) * st).sum();
                    rows[j].push((i, 1.0 / count as f32));
                }
                let out = self.new_value(out_t, Rows::Sample);
                self.emit(Inst::Sparse { dst: out, src: ins[0], map: Arc::new(Csr::from_rows(&rows, is.first().map_or(1, |s| s * in_shape[0]))), acc: false });
            }
            Op::Transpose { perm } => {
                let in_shape = shape(node.inputs[0]);
                let is = strides_of(&in_shape);
                let os = strides_of(&out_shape);
                let map: Vec<Option<usize>> = (0..out_len)
                    .map(|j| Some(perm.iter().enumerate().map(|(k, &p)| ((j / os[k]) % out_shape[k]) * is[p]).sum()))
                    .collect();
                let out = self.new_value(out_t, Rows::Sample);
                self.emit(Inst::Sparse { dst: out, src: ins[0], map: Arc::new(Csr::gather(&map, out_len)), acc: false });
            }
            Op::Concat { axis } => {
                let out = self.new_value(out_t, Rows::Sample);
                let outer: usize = out_shape[..*axis].iter().product();
                let inner: usize = out_shape[axis + 1..].iter().product();
                let total = out_shape[*axis];
                let mut offset = 0;
                for (part, (&t, &src)) in node.inputs.iter().zip(&ins).enumerate() {
                    let extent = g.tensors[t].shape[*axis];
                    let mut map = vec![None; out_len];
                    for o in 0..outer {
                        for e in 0..extent {
                            for i in 0..inner {
                                map[(o * total + offset + e) * inner + i] = Some((o * extent + e) * inner + i);
                            }
                        }
                    }
                    self.emit(Inst::Sparse { dst: out, src, map: Arc::new(Csr::gather(&map, outer * extent * inner)), acc: part > 0 });
                    offset += extent;
                }
            }
            Op::Unary(u) => {
                let f = match *u {
                    UnaryOp::Relu => UnaryFn::Relu,
                    UnaryOp::LeakyRelu(a) => UnaryFn::LeakyRelu(a),
                    UnaryOp::Tanh => UnaryFn::Tanh,
                    UnaryOp::Sigmoid => UnaryFn::Sigmoid,
                    UnaryOp::Gelu => UnaryFn::Gelu,
                    UnaryOp::GeluTanh => UnaryFn::GeluTanh,
                    UnaryOp::Erf => UnaryFn::Erf,
                    UnaryOp::Softplus => UnaryFn::Softplus,
                    UnaryOp::Sqrt => UnaryFn::Sqrt,
                    UnaryOp::Reciprocal => UnaryFn::Reciprocal,
                    UnaryOp::Exp => UnaryFn::Exp,
                    UnaryOp::Neg => UnaryFn::Affine(-1.0, 0.0),
                };
                let rows = self.rows(ins[0]);
                let out = self.new_value(out_t, rows);
                self.unary(out, ins[0], f);
            }
            Op::Binary(b) => {
                let a_shape = shape(node.inputs[0]);
                let b_shape = shape(node.inputs[1]);
                let a = self.expand(ins[0], &a_shape, &out_shape, &format!("{name}.a"));
                let bb = self.expand(ins[1], &b_shape, &out_shape, &format!("{name}.b"));
                let rows = self.class_of(&[a, bb]);
                let out = self.new_value(out_t, rows);
                let f = match b {
                    BinaryOp::Add => BinFn::Add,
                    BinaryOp::Sub => BinFn::Sub,
                    BinaryOp::Mul => BinFn::Mul,
                    BinaryOp::Div => BinFn::Div,
                };
                self.binary(out, a, bb, f);
            }
            Op::BatchNorm { epsilon } => {
                let x_shape = shape(node.inputs[0]);
                let c = x_shape[0];
                let var = g.shared_data(node.inputs[4]).ok_or_else(|| FisherError::InvalidInput(format!("node {name}: the running variance must be a constant")))?;
                let inv: Vec<f32> = var.iter().map(|&v| (1.0 / (f64::from(v) + f64::from(*epsilon)).sqrt()) as f32).collect();
                let inv = self.shared_const(format!("{name}.inv_std"), inv);
                let scale = self.slot(format!("{name}.scale"), c, Rows::Shared);
                self.binary(scale, ins[1], inv, BinFn::Mul);
                let mean_scale = self.slot(format!("{name}.mean_scale"), c, Rows::Shared);
                self.binary(mean_scale, ins[3], scale, BinFn::Mul);
                let shift = self.slot(format!("{name}.shift"), c, Rows::Shared);
                self.binary(shift, ins[2], mean_scale, BinFn::Sub);
                let rest: usize = x_shape[1..].iter().product();
                let scale_full = self.expand(scale, &[c, 1], &[c, rest], &format!("{name}.scale"));
                let shift_full = self.expand(shift, &[c, 1], &[c, rest], &format!("{name}.shift"));
                let len = c * rest;
                let xs = self.slot(format!("{name}.xs"), len, Rows::Sample);
                self.binary(xs, ins[0], scale_full, BinFn::Mul);
                let out = self.new_value(out_t, Rows::Sample);
                self.binary(out, xs, shift_full, BinFn::Add);
            }
            Op::LayerNorm { axis, epsilon } => {
                let x_shape = shape(node.inputs[0]);
                let groups: usize = x_shape[..*axis].iter().product();
                let size: usize = x_shape[*axis..].iter().product();
                let len = groups * size;
                let mean_map: Vec<Vec<(usize, f32)>> = (0..groups).map(|q| (0..size).map(|i| (q * size + i, 1.0 / size as f32)).collect()).collect();
                let mean_map = Arc::new(Csr::from_rows(&mean_map, len));
                let mean = self.slot(format!("{name}.mean"), groups, Rows::Sample);
                self.emit(Inst::Sparse { dst: mean, src: ins[0], map: Arc::clone(&mean_map), acc: false });
                let mean_full = self.expand(mean, &[groups, 1], &[groups, size], &format!("{name}.mean"));
                let xc = self.slot(format!("{name}.centered"), len, Rows::Sample);
                self.binary(xc, ins[0], mean_full, BinFn::Sub);
                let sq = self.slot(format!("{name}.squared"), len, Rows::Sample);
                self.unary(sq, xc, UnaryFn::Square);
                let var = self.slot(format!("{name}.var"), groups, Rows::Sample);
                self.emit(Inst::Sparse { dst: var, src: sq, map: mean_map, acc: false });
                let var_eps = self.slot(format!("{name}.var_eps"), groups, Rows::Sample);
                self.unary(var_eps, var, UnaryFn::Affine(1.0, *epsilon));
                let inv = self.slot(format!("{name}.inv_std"), groups, Rows::Sample);
                self.unary(inv, var_eps, UnaryFn::Rsqrt);
                let inv_full = self.expand(inv, &[groups, 1], &[groups, size], &format!("{name}.inv_std"));
                let xn = self.slot(format!("{name}.normalized"), len, Rows::Sample);
                self.binary(xn, xc, inv_full, BinFn::Mul);
                let gamma = self.expand(ins[1], &[1, size], &[groups, size], &format!("{name}.gamma"));
                let has_beta = node.inputs.len() > 2;
                let scaled = if has_beta { self.slot(format!("{name}.scaled"), len, Rows::Sample) } else { self.new_value(out_t, Rows::Sample) };
                self.binary(scaled, xn, gamma, BinFn::Mul);
                if has_beta {
                    let beta = self.expand(ins[2], &[1, size], &[groups, size], &format!("{name}.beta"));
                    let out = self.new_value(out_t, Rows::Sample);
                    self.binary(out, scaled, beta, BinFn::Add);
                }
            }
            Op::Gather => {
                let d = g.tensors[node.inputs[0]].shape[1];
                let out = self.new_value(out_t, Rows::Sample);
                self.emit(Inst::Embed { dst: out, table: ins[0], tokens: ins[1], dim: d });
            }
        }
        Ok(())
    }

    fn param_index(&self, t: TensorId) -> Option<usize> {
        match self.graph.tensors[t].kind {
            TensorKind::Param(p) => Some(p),
            _ => None,
        }
    }
}

/// The windows of a 2-D pool over [C, H, W] → [C, Ho, Wo]: for each output, the input
/// positions inside the input (padding excluded), and the ONNX count-include-pad divisor
/// (the window clipped to the padded input).
fn pool_windows(in_shape: &[usize], out_shape: &[usize], w: &Window, _ceil_mode: bool, _avg: bool) -> (Csr, Vec<usize>) {
    let (c, h, wd) = (in_shape[0], in_shape[1], in_shape[2]);
    let (ho, wo) = (out_shape[1], out_shape[2]);
    let mut rows = Vec::with_capacity(c * ho * wo);
    let mut divisors = Vec::with_capacity(c * ho * wo);
    for ch in 0..c {
        for oh in 0..ho {
            for ow in 0..wo {
                let mut entries = Vec::new();
                let (mut hs, mut ws) = (0usize, 0usize);
                for i in 0..w.kernel[0] {
                    let y = (oh * w.strides[0] + i * w.dilations[0]) as isize - w.pads[0] as isize;
                    if y < (h + w.pads[2]) as isize {
                        hs += 1;
                    }
                    for j in 0..w.kernel[1] {
                        let x = (ow * w.strides[1] + j * w.dilations[1]) as isize - w.pads[1] as isize;
                        if i == 0 && x < (wd + w.pads[3]) as isize {
                            ws += 1;
                        }
                        if y >= 0 && (y as usize) < h && x >= 0 && (x as usize) < wd {
                            entries.push(((ch * h + y as usize) * wd + x as usize, 1.0));
                        }
                    }
                }
                divisors.push(hs * ws);
                rows.push(entries);
            }
        }
    }
    (Csr::from_rows(&rows, c * h * wd), divisors)
}

/// Lowers the forward pass of `graph` (validated first).
pub fn lower(graph: &Graph) -> Result<Lowered> {
    graph.validate()?;
    let mut l = Lowerer {
        graph,
        out: Lowered {
            slots: Vec::new(),
            shared: Vec::new(),
            forward: Vec::new(),
            input: 0,
            output: 0,
            params: Vec::new(),
            windows: HashMap::new(),
            kfac: Vec::new(),
            kfac_refused: Vec::new(),
        },
        slot_of: vec![None; graph.tensors.len()],
        zeros: HashMap::new(),
    };
    let input_len = graph.tensors[graph.input].len();
    if input_len > MAX_TENSOR_LEN {
        return Err(FisherError::InvalidInput(format!("the input has {input_len} values per sample; at most {MAX_TENSOR_LEN} are supported")));
    }
    l.out.input = l.new_value(graph.input, Rows::Sample);
    for p in &graph.params {
        let s = l.slot(p.name.clone(), p.len(), Rows::Shared);
        l.out.shared.push((s, Arc::new(p.data.clone())));
        l.slot_of[p.tensor] = Some(s);
        l.out.params.push(s);
    }
    for (t, tensor) in graph.tensors.iter().enumerate() {
        if let TensorKind::Const(values) = &tensor.kind {
            let s = l.shared_const(tensor.name.clone(), values.clone());
            l.slot_of[t] = Some(s);
        }
    }
    for k in 0..graph.nodes.len() {
        l.lower_node(k)?;
    }
    l.out.output = l.get(graph.output)?;
    let _ = &l.zeros;
    Ok(l.out)
}

/// Lowers `graph` and derives its reverse- and forward-mode programs.
pub fn program(graph: &Graph) -> Result<(Program, Vec<(String, String)>)> {
    let lowered = lower(graph)?;
    super::autodiff::differentiate(lowered)
}
