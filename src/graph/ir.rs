//! The graph IR: a network as a list of typed operators over tensors with static per-sample
//! shapes, the contract between the ONNX importer ([`crate::graph::onnx`]), the f64 reference
//! ([`crate::graph::reference`]) and the lowering to primitives ([`crate::graph::prim`]).
//!
//! ## Shapes
//! Every tensor is one of
//! * the **input** (one per graph): per-sample shape `shape`, the batch axis implicit;
//! * a **value** computed per sample: per-sample shape, the batch axis implicit;
//! * a **parameter** or a **constant** (an initializer, or a folded `Constant`): its full
//!   shape, shared by every sample.
//!
//! ONNX axes count the batch axis; the importer subtracts one, so `axis` fields below are
//! per-sample axes (0 = the first axis after the batch). An operator that would mix samples
//! (an axis 0 reduction, a transpose moving the batch axis) is refused at import.
//!
//! ## Broadcasting
//! [`Op::Binary`] follows numpy: shapes are aligned at their trailing axes. A per-sample
//! operand of per-sample shape `s` broadcasts as the full shape `[N, s…]`; a shared operand
//! as its own shape (which may carry a leading 1 for the batch axis; the importer drops it).
//! The result is per-sample (at least one operand is) with shape [`broadcast_shapes`].

use crate::error::{FisherError, Result};

/// Index of a tensor in [`Graph::tensors`].
pub type TensorId = usize;

/// Element type of a graph input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputType {
    /// Floating-point features (f32 in memory).
    Float,
    /// Integer token indices (for [`Op::Gather`] embeddings); held as f32, exact below 2²⁴.
    Integer,
}

/// What a tensor is.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorKind {
    /// The graph input (per sample).
    Input(InputType),
    /// Computed per sample by a node.
    Value,
    /// A trainable parameter: index into [`Graph::params`].
    Param(usize),
    /// A non-trainable float tensor (running statistics, scaling constants), row-major.
    Const(Vec<f32>),
}

/// One tensor of the graph.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// The ONNX name (initializer names are PyTorch's parameter names).
    pub name: String,
    /// Per-sample shape for the input and values; the full shape for params and constants.
    pub shape: Vec<usize>,
    /// What it is.
    pub kind: TensorKind,
}

impl Tensor {
    /// Number of elements (per sample for the input and values).
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Whether it varies per sample (the input or a value).
    pub fn per_sample(&self) -> bool {
        matches!(self.kind, TensorKind::Input(_) | TensorKind::Value)
    }
}

/// A trainable parameter: an initializer feeding a trainable slot.
#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    /// The initializer's name, e.g. `conv1.weight` (PyTorch's `named_parameters()` name).
    pub name: String,
    /// Its shape (PyTorch's `param.shape`).
    pub shape: Vec<usize>,
    /// Its values, row-major.
    pub data: Vec<f32>,
    /// The tensor holding it.
    pub tensor: TensorId,
}

impl Param {
    /// Number of scalars.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    /// Whether it has no scalars.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The module it belongs to: the name up to its last `.` (`layer1.0.conv1.weight` →
    /// `layer1.0.conv1`), or the whole name when it has no `.`; `layer` blocks group by it.
    pub fn module(&self) -> &str {
        self.name.rsplit_once('.').map_or(self.name.as_str(), |(m, _)| m)
    }
}

/// Element-wise functions of one argument.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum UnaryOp {
    /// max(x, 0).
    Relu,
    /// x for x ≥ 0, αx otherwise.
    LeakyRelu(f32),
    /// tanh x.
    Tanh,
    /// 1 / (1 + e⁻ˣ).
    Sigmoid,
    /// x Φ(x) = x (1 + erf(x/√2)) / 2 (`approximate="none"`).
    Gelu,
    /// 0.5 x (1 + tanh(√(2/π)(x + 0.044715 x³))) (`approximate="tanh"`).
    GeluTanh,
    /// erf x (PyTorch's GELU decomposition exports `Erf`).
    Erf,
    /// ln(1 + eˣ).
    Softplus,
    /// √x.
    Sqrt,
    /// 1/x.
    Reciprocal,
    /// eˣ.
    Exp,
    /// −x.
    Neg,
}

/// Element-wise functions of two arguments (numpy broadcasting).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryOp {
    /// a + b.
    Add,
    /// a − b.
    Sub,
    /// a · b.
    Mul,
    /// a / b.
    Div,
}

/// 2-D window geometry shared by `Conv` and the pools (ONNX attributes, batch axis removed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Kernel height and width.
    pub kernel: [usize; 2],
    /// Strides (h, w).
    pub strides: [usize; 2],
    /// Padding: top, left, bottom, right (ONNX `pads` order).
    pub pads: [usize; 4],
    /// Dilations (h, w).
    pub dilations: [usize; 2],
}

impl Window {
    /// The output extent along axis `a` (0 = h, 1 = w) for an input extent `input`:
    /// ⌊(in + pad_begin + pad_end − dilation·(k − 1) − 1) / stride⌋ + 1 (or ⌈·⌉ with
    /// `ceil_mode`, where the last window must start inside the input or its leading pad).
    /// `None` when the kernel does not fit.
    pub fn output_extent(&self, a: usize, input: usize, ceil_mode: bool) -> Option<usize> {
        let span = self.dilations[a].checked_mul(self.kernel[a].checked_sub(1)?)?.checked_add(1)?;
        let padded = input.checked_add(self.pads[a])?.checked_add(self.pads[a + 2])?;
        let room = padded.checked_sub(span)?;
        let s = self.strides[a];
        if s == 0 {
            return None;
        }
        let mut out = if ceil_mode { room.div_ceil(s) + 1 } else { room / s + 1 };
        // PyTorch/ONNX: with ceil_mode, a window starting in the trailing padding is dropped.
        if ceil_mode && (out - 1) * s >= input + self.pads[a] {
            out -= 1;
        }
        Some(out)
    }
}

/// The operators of the IR. Inputs are listed in [`Node::inputs`] in ONNX order.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// `Gemm`: Y = α·A·B' + β·C with A per sample ([K]), B shared (K×M, or M×K with
    /// `trans_b`), C optional shared, broadcast to [M]. Inputs: A, B, [C].
    Gemm {
        /// α.
        alpha: f32,
        /// β.
        beta: f32,
        /// Whether B is stored M×K (PyTorch `nn.Linear`: `weight` is out×in).
        trans_b: bool,
    },
    /// `MatMul` with a shared right operand: per-sample A [..., K] times B [K, M] (or B
    /// stored [M, K] with `trans_b`, PyTorch's `nn.Linear` on a 3-D input, exported as
    /// `MatMul(x, Transpose(weight))`), plus an optional bias [M] (the `Add` that follows it,
    /// fused by the importer) → [..., M]. Inputs: A, B, [bias].
    MatMul {
        /// Whether B is stored M×K.
        trans_b: bool,
    },
    /// `Conv` (2-D): x [C, H, W], w [Cout, C/group, kh, kw], optional b [Cout] →
    /// [Cout, Ho, Wo]. Inputs: x, w, [b].
    Conv {
        /// Kernel, strides, pads, dilations.
        window: Window,
        /// Groups (C and Cout divisible by it; depthwise: group = C).
        group: usize,
    },
    /// `MaxPool` over [C, H, W] (padding never wins: it is −∞). Input: x.
    MaxPool {
        /// Geometry.
        window: Window,
        /// ONNX `ceil_mode`.
        ceil_mode: bool,
    },
    /// `AveragePool` over [C, H, W]. Input: x.
    AveragePool {
        /// Geometry (dilations are 1).
        window: Window,
        /// ONNX `ceil_mode`.
        ceil_mode: bool,
        /// Whether padded positions count in the divisor.
        count_include_pad: bool,
    },
    /// `GlobalAveragePool`: [C, H, W] → [C, 1, 1]. Input: x.
    GlobalAveragePool,
    /// `ReduceMean` over per-sample `axes` (sorted, distinct). Input: x.
    ReduceMean {
        /// Per-sample axes.
        axes: Vec<usize>,
        /// Whether reduced axes stay as extent 1.
        keepdims: bool,
    },
    /// A change of shape that keeps the row-major order (`Flatten`, `Reshape`, `Squeeze`,
    /// `Unsqueeze`); the target is the output tensor's shape. Input: x.
    Reshape,
    /// `Transpose` with a per-sample permutation. Input: x.
    Transpose {
        /// Output axis k is input axis `perm[k]`.
        perm: Vec<usize>,
    },
    /// `Concat` of per-sample tensors along a per-sample axis. Inputs: the parts.
    Concat {
        /// Per-sample axis.
        axis: usize,
    },
    /// `Identity`, `Dropout` (inference). Input: x.
    Identity,
    /// An element-wise function. Input: x.
    Unary(UnaryOp),
    /// An element-wise function of two tensors with broadcasting. Inputs: a, b.
    Binary(BinaryOp),
    /// `BatchNormalization` in inference mode: y = γ (x − μ)/√(σ² + ε) + β per channel
    /// (axis 0 of the per-sample shape). Inputs: x, γ (param), β (param), μ (const),
    /// σ² (const).
    BatchNorm {
        /// ε.
        epsilon: f32,
    },
    /// `LayerNormalization` over the per-sample axes from `axis` on:
    /// y = γ (x − mean)/√(var + ε) + β (biased variance). Inputs: x, γ, [β].
    LayerNorm {
        /// First normalized per-sample axis.
        axis: usize,
        /// ε.
        epsilon: f32,
    },
    /// `Gather` on axis 0 of a shared table [V, D] with per-sample integer indices [T]
    /// (an `nn.Embedding`) → [T, D]. Inputs: table, indices.
    Gather,
}

/// One operator application.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// The ONNX node name (for messages).
    pub name: String,
    /// The operator.
    pub op: Op,
    /// Input tensors, in ONNX order.
    pub inputs: Vec<TensorId>,
    /// The output tensor (a per-sample value).
    pub output: TensorId,
}

/// A network: tensors, parameters in `named_parameters()` order, nodes in execution order.
#[derive(Debug, Clone, PartialEq)]
pub struct Graph {
    /// Every tensor.
    pub tensors: Vec<Tensor>,
    /// The trainable parameters, in the order of the flat θ (initializer order, which is
    /// PyTorch's `named_parameters()` order for a model exported as the README says).
    pub params: Vec<Param>,
    /// Nodes, topologically sorted.
    pub nodes: Vec<Node>,
    /// The input tensor.
    pub input: TensorId,
    /// The output tensor (per-sample shape [C]: logits or Gaussian means).
    pub output: TensorId,
}

/// numpy broadcasting of two shapes (aligned at the trailing axes), or `None` when an axis
/// pair is neither equal nor 1.
pub fn broadcast_shapes(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let rank = a.len().max(b.len());
    let at = |s: &[usize], k: usize| if k + s.len() >= rank { s[k + s.len() - rank] } else { 1 };
    (0..rank)
        .map(|k| match (at(a, k), at(b, k)) {
            (x, y) if x == y => Some(x),
            (1, y) => Some(y),
            (x, 1) => Some(x),
            _ => None,
        })
        .collect()
}

impl Graph {
    /// The number of trainable scalars P.
    pub fn param_count(&self) -> usize {
        self.params.iter().map(Param::len).sum()
    }

    /// Offsets of each parameter in the flat θ (length `params.len() + 1`).
    pub fn param_offsets(&self) -> Vec<usize> {
        let mut offsets = vec![0];
        for p in &self.params {
            offsets.push(offsets.last().unwrap() + p.len());
        }
        offsets
    }

    /// The flat θ, in parameter order.
    pub fn theta(&self) -> Vec<f32> {
        self.params.iter().flat_map(|p| p.data.iter().copied()).collect()
    }

    /// Replaces θ (same length and order as [`Graph::theta`]).
    pub fn set_theta(&mut self, theta: &[f32]) -> Result<()> {
        if theta.len() != self.param_count() {
            return Err(FisherError::InvalidInput(format!(
                "θ has {} values; the model has {} parameters",
                theta.len(),
                self.param_count()
            )));
        }
        let mut at = 0;
        for p in &mut self.params {
            let n = p.data.len();
            p.data.copy_from_slice(&theta[at..at + n]);
            at += n;
        }
        Ok(())
    }

    /// Per-sample input shape.
    pub fn input_shape(&self) -> &[usize] {
        &self.tensors[self.input].shape
    }

    /// Output width C.
    pub fn outputs(&self) -> usize {
        self.tensors[self.output].len()
    }

    /// Modules in parameter order: (module name, indices into `params`), grouping
    /// consecutive parameters that share [`Param::module`].
    pub fn modules(&self) -> Vec<(String, Vec<usize>)> {
        let mut out: Vec<(String, Vec<usize>)> = Vec::new();
        for (i, p) in self.params.iter().enumerate() {
            match out.last_mut() {
                Some((m, idx)) if m == p.module() => idx.push(i),
                _ => out.push((p.module().to_string(), vec![i])),
            }
        }
        out
    }

    /// The values of a shared tensor (parameter or constant), `None` for per-sample tensors.
    pub fn shared_data(&self, t: TensorId) -> Option<&[f32]> {
        match &self.tensors[t].kind {
            TensorKind::Param(p) => Some(&self.params[*p].data),
            TensorKind::Const(v) => Some(v),
            _ => None,
        }
    }

    /// Checks the structural invariants every consumer relies on: ids in range, nodes in
    /// topological order writing each value once, shapes consistent with each operator
    /// ([`infer_shape`]), parameter tensors and data agreeing, output per-sample and 1-D.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(FisherError::InvalidInput(m));
        let n = self.tensors.len();
        if self.input >= n || self.output >= n {
            return bad("graph input/output out of range".into());
        }
        for (i, p) in self.params.iter().enumerate() {
            if p.tensor >= n || self.tensors[p.tensor].kind != TensorKind::Param(i) {
                return bad(format!("parameter {} is not tensor {}", p.name, p.tensor));
            }
            if p.data.len() != p.len() || self.tensors[p.tensor].shape != p.shape {
                return bad(format!("parameter {} has {} values for shape {:?}", p.name, p.data.len(), p.shape));
            }
        }
        let mut ready: Vec<bool> = self.tensors.iter().map(|t| !matches!(t.kind, TensorKind::Value)).collect();
        for node in &self.nodes {
            if node.inputs.iter().any(|&t| t >= n) || node.output >= n {
                return bad(format!("node {}: tensor id out of range", node.name));
            }
            if let Some(&t) = node.inputs.iter().find(|&&t| !ready[t]) {
                return bad(format!("node {}: input {} is used before it is computed", node.name, self.tensors[t].name));
            }
            if ready[node.output] {
                return bad(format!("node {}: output {} is written twice", node.name, self.tensors[node.output].name));
            }
            let shape = infer_shape(self, node)?;
            if shape != self.tensors[node.output].shape {
                return bad(format!(
                    "node {}: output shape {:?} disagrees with the operator's {:?}",
                    node.name, self.tensors[node.output].shape, shape
                ));
            }
            ready[node.output] = true;
        }
        if !ready[self.output] || !self.tensors[self.output].per_sample() || self.tensors[self.output].shape.len() != 1 {
            return bad(format!(
                "the graph output {} must be a per-sample vector (logits or means), not shape {:?}",
                self.tensors[self.output].name, self.tensors[self.output].shape
            ));
        }
        Ok(())
    }
}

/// The per-sample output shape of `node` in `graph` (its inputs' shapes are known), or an
/// error naming the node when the operator does not apply to them.
pub fn infer_shape(graph: &Graph, node: &Node) -> Result<Vec<usize>> {
    let err = |m: String| FisherError::InvalidInput(format!("node {} ({}): {m}", node.name, op_name(&node.op)));
    let t = |k: usize| -> Result<&Tensor> {
        node.inputs.get(k).map(|&i| &graph.tensors[i]).ok_or_else(|| err(format!("missing input {k}")))
    };
    let per_sample = |k: usize| -> Result<&Tensor> {
        let x = t(k)?;
        if x.per_sample() {
            Ok(x)
        } else {
            Err(err(format!("input {} must vary per sample", x.name)))
        }
    };
    let shared = |k: usize| -> Result<&Tensor> {
        let x = t(k)?;
        if x.per_sample() {
            Err(err(format!("input {} must be an initializer (a weight), not computed per sample", x.name)))
        } else {
            Ok(x)
        }
    };
    match &node.op {
        Op::Gemm { trans_b, .. } => {
            let a = per_sample(0)?;
            let b = shared(1)?;
            let [k1, m1] = b.shape[..] else { return Err(err(format!("B has shape {:?}; expected 2-D", b.shape))) };
            let (k, m) = if *trans_b { (m1, k1) } else { (k1, m1) };
            if a.shape != [k] {
                return Err(err(format!("A has per-sample shape {:?}; B expects [{k}]", a.shape)));
            }
            if let Ok(c) = t(2) {
                if c.per_sample() || broadcast_shapes(&c.shape, &[m]) != Some(vec![m]) || c.shape.len() > 2 {
                    return Err(err(format!("C has shape {:?}; expected a shared [{m}]", c.shape)));
                }
            }
            Ok(vec![m])
        }
        Op::MatMul { trans_b } => {
            let a = per_sample(0)?;
            let b = shared(1)?;
            let [k1, m1] = b.shape[..] else { return Err(err(format!("B has shape {:?}; expected 2-D", b.shape))) };
            let (k, m) = if *trans_b { (m1, k1) } else { (k1, m1) };
            if let Ok(c) = t(2) {
                if c.per_sample() || c.shape != [m] {
                    return Err(err(format!("bias has shape {:?}; expected a shared [{m}]", c.shape)));
                }
            }
            match a.shape.split_last() {
                Some((&ka, rest)) if ka == k => Ok(rest.iter().copied().chain([m]).collect()),
                _ => Err(err(format!("A has per-sample shape {:?}; B expects a last axis of {k}", a.shape))),
            }
        }
        Op::Conv { window, group } => {
            let x = per_sample(0)?;
            let w = shared(1)?;
            let [c, h, wd] = x.shape[..] else { return Err(err(format!("x has per-sample shape {:?}; expected [C, H, W]", x.shape))) };
            let [co, ci, kh, kw] = w.shape[..] else { return Err(err(format!("W has shape {:?}; expected 4-D", w.shape))) };
            if *group == 0 || c % group != 0 || co % group != 0 || ci * group != c || [kh, kw] != window.kernel {
                return Err(err(format!("W {:?} does not fit x {:?} with group {group} and kernel {:?}", w.shape, x.shape, window.kernel)));
            }
            if let Ok(b) = t(2) {
                if b.per_sample() || b.shape != [co] {
                    return Err(err(format!("bias has shape {:?}; expected [{co}]", b.shape)));
                }
            }
            let ho = window.output_extent(0, h, false).ok_or_else(|| err("the kernel is larger than the padded input".into()))?;
            let wo = window.output_extent(1, wd, false).ok_or_else(|| err("the kernel is larger than the padded input".into()))?;
            Ok(vec![co, ho, wo])
        }
        Op::MaxPool { window, ceil_mode } | Op::AveragePool { window, ceil_mode, .. } => {
            let x = per_sample(0)?;
            let [c, h, w] = x.shape[..] else { return Err(err(format!("x has per-sample shape {:?}; expected [C, H, W]", x.shape))) };
            if window.pads[0] >= window.kernel[0] || window.pads[1] >= window.kernel[1] {
                return Err(err("padding must be smaller than the kernel".into()));
            }
            let ho = window.output_extent(0, h, *ceil_mode).ok_or_else(|| err("the kernel is larger than the padded input".into()))?;
            let wo = window.output_extent(1, w, *ceil_mode).ok_or_else(|| err("the kernel is larger than the padded input".into()))?;
            Ok(vec![c, ho, wo])
        }
        Op::GlobalAveragePool => {
            let x = per_sample(0)?;
            let [c, _, _] = x.shape[..] else { return Err(err(format!("x has per-sample shape {:?}; expected [C, H, W]", x.shape))) };
            Ok(vec![c, 1, 1])
        }
        Op::ReduceMean { axes, keepdims } => {
            let x = per_sample(0)?;
            if axes.is_empty() || axes.windows(2).any(|w| w[0] >= w[1]) || axes.iter().any(|&a| a >= x.shape.len()) {
                return Err(err(format!("axes {axes:?} invalid for per-sample shape {:?}", x.shape)));
            }
            Ok(x.shape
                .iter()
                .enumerate()
                .filter_map(|(k, &e)| if axes.contains(&k) { keepdims.then_some(1) } else { Some(e) })
                .collect())
        }
        Op::Reshape => {
            let x = per_sample(0)?;
            let out = &graph.tensors[node.output].shape;
            if out.iter().product::<usize>() != x.len() {
                return Err(err(format!("cannot reshape {:?} to {:?}", x.shape, out)));
            }
            Ok(out.clone())
        }
        Op::Transpose { perm } => {
            let x = per_sample(0)?;
            let mut seen = vec![false; x.shape.len()];
            if perm.len() != x.shape.len() || perm.iter().any(|&p| p >= seen.len() || std::mem::replace(&mut seen[p], true)) {
                return Err(err(format!("perm {perm:?} is not a permutation of {} axes", x.shape.len())));
            }
            Ok(perm.iter().map(|&p| x.shape[p]).collect())
        }
        Op::Concat { axis } => {
            let first = per_sample(0)?;
            let mut out = first.shape.clone();
            if *axis >= out.len() {
                return Err(err(format!("axis {axis} out of range for {:?}", out)));
            }
            out[*axis] = 0;
            for k in 0..node.inputs.len() {
                let x = per_sample(k)?;
                if x.shape.len() != first.shape.len()
                    || x.shape.iter().zip(&first.shape).enumerate().any(|(a, (p, q))| a != *axis && p != q)
                {
                    return Err(err(format!("parts {:?} and {:?} differ off axis {axis}", first.shape, x.shape)));
                }
                out[*axis] += x.shape[*axis];
            }
            Ok(out)
        }
        Op::Identity | Op::Unary(_) => Ok(per_sample(0)?.shape.clone()),
        Op::Binary(_) => {
            let (a, b) = (t(0)?, t(1)?);
            if !a.per_sample() && !b.per_sample() {
                return Err(err("both operands are constants (fold them before import)".into()));
            }
            let out = broadcast_shapes(&a.shape, &b.shape)
                .ok_or_else(|| err(format!("shapes {:?} and {:?} do not broadcast", a.shape, b.shape)))?;
            // The per-sample operand's rank must cover the result: a shared operand of higher
            // rank would broadcast along the batch axis.
            let rank = a.shape.len().max(b.shape.len());
            let ps_rank = if a.per_sample() && b.per_sample() { rank } else if a.per_sample() { a.shape.len() } else { b.shape.len() };
            if ps_rank < rank {
                return Err(err(format!("a constant of shape {:?} would broadcast over the batch", if a.per_sample() { &b.shape } else { &a.shape })));
            }
            Ok(out)
        }
        Op::BatchNorm { .. } => {
            let x = per_sample(0)?;
            let c = *x.shape.first().ok_or_else(|| err("x is a scalar".into()))?;
            for k in 1..5 {
                let s = shared(k)?;
                if s.shape != [c] {
                    return Err(err(format!("{} has shape {:?}; expected [{c}]", s.name, s.shape)));
                }
            }
            Ok(x.shape.clone())
        }
        Op::LayerNorm { axis, .. } => {
            let x = per_sample(0)?;
            if *axis >= x.shape.len() {
                return Err(err(format!("axis {axis} out of range for {:?}", x.shape)));
            }
            let normalized = &x.shape[*axis..];
            for k in 1..node.inputs.len() {
                let s = shared(k)?;
                if s.shape != normalized {
                    return Err(err(format!("{} has shape {:?}; expected {:?}", s.name, s.shape, normalized)));
                }
            }
            Ok(x.shape.clone())
        }
        Op::Gather => {
            let table = shared(0)?;
            let idx = per_sample(1)?;
            let [_, d] = table.shape[..] else { return Err(err(format!("table has shape {:?}; expected [V, D]", table.shape))) };
            if !matches!(idx.kind, TensorKind::Input(InputType::Integer)) {
                return Err(err("indices must be the integer graph input".into()));
            }
            Ok(idx.shape.iter().copied().chain([d]).collect())
        }
    }
}

/// The ONNX spelling of an operator (for messages and `fisher inspect`).
pub fn op_name(op: &Op) -> &'static str {
    match op {
        Op::Gemm { .. } => "Gemm",
        Op::MatMul { .. } => "MatMul",
        Op::Conv { .. } => "Conv",
        Op::MaxPool { .. } => "MaxPool",
        Op::AveragePool { .. } => "AveragePool",
        Op::GlobalAveragePool => "GlobalAveragePool",
        Op::ReduceMean { .. } => "ReduceMean",
        Op::Reshape => "Reshape",
        Op::Transpose { .. } => "Transpose",
        Op::Concat { .. } => "Concat",
        Op::Identity => "Identity",
        Op::Unary(u) => match u {
            UnaryOp::Relu => "Relu",
            UnaryOp::LeakyRelu(_) => "LeakyRelu",
            UnaryOp::Tanh => "Tanh",
            UnaryOp::Sigmoid => "Sigmoid",
            UnaryOp::Gelu | UnaryOp::GeluTanh => "Gelu",
            UnaryOp::Erf => "Erf",
            UnaryOp::Softplus => "Softplus",
            UnaryOp::Sqrt => "Sqrt",
            UnaryOp::Reciprocal => "Reciprocal",
            UnaryOp::Exp => "Exp",
            UnaryOp::Neg => "Neg",
        },
        Op::Binary(b) => match b {
            BinaryOp::Add => "Add",
            BinaryOp::Sub => "Sub",
            BinaryOp::Mul => "Mul",
            BinaryOp::Div => "Div",
        },
        Op::BatchNorm { .. } => "BatchNormalization",
        Op::LayerNorm { .. } => "LayerNormalization",
        Op::Gather => "Gather",
    }
}

/// Builds a [`Graph`] node by node, inferring every output shape ([`infer_shape`]); used by
/// the ONNX importer and by tests that construct networks directly.
#[derive(Debug, Clone)]
pub struct GraphBuilder {
    graph: Graph,
}

impl GraphBuilder {
    /// A graph whose input `name` has per-sample shape `shape`.
    pub fn new(name: &str, shape: &[usize], kind: InputType) -> GraphBuilder {
        let input = Tensor { name: name.to_string(), shape: shape.to_vec(), kind: TensorKind::Input(kind) };
        GraphBuilder { graph: Graph { tensors: vec![input], params: Vec::new(), nodes: Vec::new(), input: 0, output: 0 } }
    }

    /// The graph input.
    pub fn input(&self) -> TensorId {
        self.graph.input
    }

    /// The tensors so far.
    pub fn tensor(&self, t: TensorId) -> &Tensor {
        &self.graph.tensors[t]
    }

    /// Adds a trainable parameter (appended to the flat θ).
    pub fn param(&mut self, name: &str, shape: &[usize], data: Vec<f32>) -> Result<TensorId> {
        if data.len() != shape.iter().product::<usize>() {
            return Err(FisherError::InvalidInput(format!("parameter {name}: {} values for shape {shape:?}", data.len())));
        }
        let id = self.graph.tensors.len();
        let index = self.graph.params.len();
        self.graph.tensors.push(Tensor { name: name.to_string(), shape: shape.to_vec(), kind: TensorKind::Param(index) });
        self.graph.params.push(Param { name: name.to_string(), shape: shape.to_vec(), data, tensor: id });
        Ok(id)
    }

    /// Adds a constant (non-trainable) tensor.
    pub fn constant(&mut self, name: &str, shape: &[usize], data: Vec<f32>) -> Result<TensorId> {
        if data.len() != shape.iter().product::<usize>() {
            return Err(FisherError::InvalidInput(format!("constant {name}: {} values for shape {shape:?}", data.len())));
        }
        self.graph.tensors.push(Tensor { name: name.to_string(), shape: shape.to_vec(), kind: TensorKind::Const(data) });
        Ok(self.graph.tensors.len() - 1)
    }

    /// Appends `op` applied to `inputs`; its output is named `name` and shaped by [`infer_shape`].
    /// For [`Op::Reshape`] use [`GraphBuilder::reshape`].
    pub fn node(&mut self, name: &str, op: Op, inputs: &[TensorId]) -> Result<TensorId> {
        self.push(name, op, inputs, Vec::new())
    }

    /// Appends a reshape of `x` to the per-sample shape `shape`.
    pub fn reshape(&mut self, name: &str, x: TensorId, shape: &[usize]) -> Result<TensorId> {
        self.push(name, Op::Reshape, &[x], shape.to_vec())
    }

    fn push(&mut self, name: &str, op: Op, inputs: &[TensorId], shape: Vec<usize>) -> Result<TensorId> {
        if let Some(&bad) = inputs.iter().find(|&&t| t >= self.graph.tensors.len()) {
            return Err(FisherError::InvalidInput(format!("node {name}: no tensor {bad}")));
        }
        let output = self.graph.tensors.len();
        self.graph.tensors.push(Tensor { name: name.to_string(), shape, kind: TensorKind::Value });
        let node = Node { name: name.to_string(), op, inputs: inputs.to_vec(), output };
        match infer_shape(&self.graph, &node) {
            Ok(shape) => {
                self.graph.tensors[output].shape = shape;
                self.graph.nodes.push(node);
                Ok(output)
            }
            Err(e) => {
                self.graph.tensors.pop();
                Err(e)
            }
        }
    }

    /// Finishes with `output` as the graph output, validated ([`Graph::validate`]).
    pub fn finish(mut self, output: TensorId) -> Result<Graph> {
        self.graph.output = output;
        self.graph.validate()?;
        Ok(self.graph)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_extents_match_pytorch() {
        // nn.Conv2d(3, 8, 3, stride=2, padding=1) on 32×32 → 16×16; MaxPool2d(3, 2, 1) on 16 → 8.
        let w = Window { kernel: [3, 3], strides: [2, 2], pads: [1, 1, 1, 1], dilations: [1, 1] };
        assert_eq!(w.output_extent(0, 32, false), Some(16));
        assert_eq!(w.output_extent(0, 16, false), Some(8));
        // MaxPool2d(2, 2, ceil_mode=True) on 5 → 3; floor → 2.
        let p = Window { kernel: [2, 2], strides: [2, 2], pads: [0; 4], dilations: [1, 1] };
        assert_eq!(p.output_extent(0, 5, true), Some(3));
        assert_eq!(p.output_extent(0, 5, false), Some(2));
        // dilation 2, kernel 3 on 5 without padding → 1; kernel larger than the input → None.
        let d = Window { kernel: [3, 3], strides: [1, 1], pads: [0; 4], dilations: [2, 2] };
        assert_eq!(d.output_extent(0, 5, false), Some(1));
        assert_eq!(d.output_extent(0, 4, false), None);
    }

    #[test]
    fn broadcasting_follows_numpy() {
        assert_eq!(broadcast_shapes(&[8, 4, 4], &[8, 1, 1]), Some(vec![8, 4, 4]));
        assert_eq!(broadcast_shapes(&[3, 5], &[5]), Some(vec![3, 5]));
        assert_eq!(broadcast_shapes(&[3, 5], &[3]), None);
    }

    #[test]
    fn builder_infers_shapes_and_validates() {
        let mut b = GraphBuilder::new("x", &[3, 8, 8], InputType::Float);
        let w = b.param("conv.weight", &[4, 3, 3, 3], vec![0.1; 108]).unwrap();
        let bias = b.param("conv.bias", &[4], vec![0.0; 4]).unwrap();
        let window = Window { kernel: [3, 3], strides: [1, 1], pads: [1; 4], dilations: [1, 1] };
        let y = b.node("conv", Op::Conv { window, group: 1 }, &[0, w, bias]).unwrap();
        assert_eq!(b.tensor(y).shape, vec![4, 8, 8]);
        let g = b.node("gap", Op::GlobalAveragePool, &[y]).unwrap();
        let f = b.reshape("flat", g, &[4]).unwrap();
        let fc = b.param("fc.weight", &[2, 4], vec![0.5; 8]).unwrap();
        let out = b.node("fc", Op::Gemm { alpha: 1.0, beta: 1.0, trans_b: true }, &[f, fc]).unwrap();
        // A mismatched Gemm is refused with the node's name, and nothing is added.
        let err = b.node("bad", Op::Gemm { alpha: 1.0, beta: 1.0, trans_b: false }, &[f, fc]).unwrap_err();
        assert!(err.to_string().contains("node bad (Gemm)"), "{err}");
        let g = b.finish(out).unwrap();
        assert_eq!(g.param_count(), 108 + 4 + 8);
        assert_eq!(g.modules(), vec![("conv".to_string(), vec![0, 1]), ("fc".to_string(), vec![2])]);
        assert_eq!(g.outputs(), 2);
    }
}
