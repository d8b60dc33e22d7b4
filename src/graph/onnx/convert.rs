//! ONNX nodes → IR nodes: every value is either known at import (folded by [`super::fold`])
//! or computed per sample (an IR tensor whose ONNX shape is `[N, per-sample…]`).

use std::collections::{HashMap, HashSet};
use std::rc::Rc;

use super::fold::{self, Bin};
use super::proto::{attribute_type as at, data_type as dt, AttributeProto, GraphProto, NodeProto};
use super::tensor::{decode, DType, Data, Known, Origin};
use super::{Layer, ParamSummary, Unsupported};
use crate::graph::ir::{
    op_name, BinaryOp, Graph, GraphBuilder, InputType, Op, TensorId, TensorKind, UnaryOp, Window,
};

/// The ONNX operators the importer reads (standard domain), for messages and `inspect`.
pub const SUPPORTED_OPS: &[&str] = &[
    "Add", "AveragePool", "BatchNormalization", "Cast", "CastLike", "Concat", "Constant", "ConstantOfShape", "Conv",
    "Div", "Dropout", "Equal", "Erf", "Exp", "Expand", "Flatten", "Gather", "Gelu", "Gemm", "GlobalAveragePool",
    "Greater", "Identity", "LayerNormalization", "LeakyRelu", "Less", "MatMul", "Max", "MaxPool", "Min", "Mul",
    "Neg", "Pow", "Range", "Reciprocal", "ReduceMean", "Relu", "Reshape", "Shape", "Sigmoid", "Size", "Slice",
    "Softplus", "Sqrt", "Squeeze", "Sub", "Tanh", "Transpose", "Unsqueeze", "Where",
];

/// Whether `node` is a standard operator the importer knows.
pub fn is_supported(node: &NodeProto) -> bool {
    matches!(node.domain.as_str(), "" | "ai.onnx") && SUPPORTED_OPS.contains(&node.op_type.as_str())
}

/// What an ONNX value is at import.
#[derive(Debug, Clone)]
enum Value {
    /// Known now (a constant, an initializer, a shape).
    Known(Rc<Known>),
    /// Computed per sample: this IR tensor.
    Sample(TensorId),
    /// Downstream of an unsupported node (`inspect` only).
    Poisoned,
    /// `x > threshold` per sample: only the `Where` of PyTorch's softplus reads it.
    Above { x: TensorId, threshold: f64 },
}

/// A node's failure: a message about the node (prefixed with its name and operator), or
/// one that already names it (the IR builder's).
enum Fail {
    Node(String),
    Named(String),
}

impl From<String> for Fail {
    fn from(m: String) -> Fail {
        Fail::Node(m)
    }
}
impl From<&str> for Fail {
    fn from(m: &str) -> Fail {
        Fail::Node(m.to_string())
    }
}

type R<T> = std::result::Result<T, Fail>;

/// Nodes downstream of an unsupported one are skipped, and a comparison is read only by
/// `Where`, before an operator is converted; this message would only show if that invariant
/// broke (no panic on any input).
const POISONED: &str = "an input comes from an unsupported node or is a comparison";

/// The result of converting a graph.
pub struct Converted {
    /// The finished graph (`None` when a node was unsupported in lenient mode).
    pub graph: Option<Graph>,
    /// IR nodes made, in order.
    pub layers: Vec<Layer>,
    /// Parameters made, in θ order.
    pub params: Vec<ParamSummary>,
    /// Unsupported nodes (lenient mode).
    pub unsupported: Vec<Unsupported>,
}

/// The converter's state.
pub struct Converter<'a> {
    file: String,
    model_dir: &'a std::path::Path,
    g: &'a GraphProto,
    opset: i64,
    lenient: bool,
    batch: usize,
    b: GraphBuilder,
    values: HashMap<String, Value>,
    uses: HashMap<&'a str, usize>,
    /// Initializer index → its parameter tensor.
    params: HashMap<usize, TensorId>,
    /// Parameters in the order they were made: (initializer index, summary).
    param_list: Vec<(usize, ParamSummary)>,
    consts: HashMap<(String, Vec<usize>), TensorId>,
    /// (initializer, node) pairs where an initializer's values became a constant.
    const_uses: Vec<(usize, String)>,
    /// Nodes folded into an earlier one (the `Add` of a `MatMul` bias).
    fused: HashSet<usize>,
    layers: Vec<Layer>,
    unsupported: Vec<Unsupported>,
    /// The IR node that computes each per-sample tensor (operator and inputs), for patterns.
    producers: HashMap<TensorId, (Op, Vec<TensorId>)>,
}

/// A node's name for messages: its own, or its first output's.
pub fn node_label(node: &NodeProto, index: usize) -> String {
    if !node.name.is_empty() {
        node.name.clone()
    } else if let Some(o) = node.output.first().filter(|o| !o.is_empty()) {
        o.clone()
    } else {
        format!("#{index}")
    }
}

fn attr<'n>(node: &'n NodeProto, name: &str) -> Option<&'n AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

fn attr_i(node: &NodeProto, name: &str) -> R<Option<i64>> {
    match attr(node, name) {
        None => Ok(None),
        Some(a) if a.r#type == at::INT || a.r#type == 0 => Ok(Some(a.i)),
        Some(_) => Err(format!("attribute {name} is not an integer").into()),
    }
}

fn attr_f(node: &NodeProto, name: &str) -> R<Option<f32>> {
    match attr(node, name) {
        None => Ok(None),
        Some(a) if a.r#type == at::FLOAT || a.r#type == 0 => Ok(Some(a.f)),
        Some(_) => Err(format!("attribute {name} is not a float").into()),
    }
}

fn attr_ints(node: &NodeProto, name: &str) -> R<Option<Vec<i64>>> {
    match attr(node, name) {
        None => Ok(None),
        Some(a) if a.r#type == at::INTS || a.r#type == 0 => Ok(Some(a.ints.clone())),
        Some(_) => Err(format!("attribute {name} is not a list of integers").into()),
    }
}

fn attr_s(node: &NodeProto, name: &str) -> R<Option<String>> {
    match attr(node, name) {
        None => Ok(None),
        Some(a) if a.r#type == at::STRING || a.r#type == 0 => Ok(Some(String::from_utf8_lossy(&a.s).into_owned())),
        Some(_) => Err(format!("attribute {name} is not a string").into()),
    }
}

/// A non-negative integer attribute value.
fn to_usize(v: i64, what: &str) -> R<usize> {
    usize::try_from(v).map_err(|_| Fail::Node(format!("{what} {v} is negative")))
}

impl<'a> Converter<'a> {
    /// A converter for `g`, whose input `input_name` has per-sample shape `shape`; `batch` is
    /// the batch extent used when folding shapes.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        file: String,
        model_dir: &'a std::path::Path,
        g: &'a GraphProto,
        opset: i64,
        lenient: bool,
        batch: usize,
        input_name: &str,
        shape: &[usize],
        kind: InputType,
    ) -> crate::error::Result<Converter<'a>> {
        let b = GraphBuilder::new(input_name, shape, kind);
        let mut values = HashMap::new();
        for (i, t) in g.initializer.iter().enumerate() {
            let mut k = decode(t, model_dir)
                .map_err(|m| crate::error::FisherError::InvalidInput(format!("{file}: initializer {}: {m}", t.name)))?;
            k.origin = Origin::Init(i);
            values.insert(t.name.clone(), Value::Known(Rc::new(k)));
        }
        values.insert(input_name.to_string(), Value::Sample(b.input()));
        let mut uses: HashMap<&str, usize> = HashMap::new();
        for n in &g.node {
            for i in n.input.iter().filter(|i| !i.is_empty()) {
                *uses.entry(i.as_str()).or_default() += 1;
            }
        }
        for o in &g.output {
            *uses.entry(o.name.as_str()).or_default() += 1;
        }
        Ok(Converter {
            file,
            model_dir,
            g,
            opset,
            lenient,
            batch,
            b,
            values,
            uses,
            params: HashMap::new(),
            param_list: Vec::new(),
            consts: HashMap::new(),
            const_uses: Vec::new(),
            fused: HashSet::new(),
            layers: Vec::new(),
            unsupported: Vec::new(),
            producers: HashMap::new(),
        })
    }

    /// Converts every node, then finishes the graph at `output`.
    pub fn run(mut self, output: &str) -> crate::error::Result<Converted> {
        let g = self.g;
        for (index, node) in g.node.iter().enumerate() {
            if self.fused.contains(&index) {
                continue;
            }
            let label = node_label(node, index);
            let poisoned = node.input.iter().any(|i| matches!(self.values.get(i), Some(Value::Poisoned)));
            let outcome = if poisoned {
                // Downstream of an unsupported node: only its own operator is judged.
                if is_supported(node) {
                    self.poison(node);
                    continue;
                }
                Err(Fail::Node(self.unsupported_message(node)))
            } else if !is_supported(node) {
                Err(Fail::Node(self.unsupported_message(node)))
            } else {
                self.node(index, node, &label)
            };
            if let Err(fail) = outcome {
                let reason = match &fail {
                    Fail::Node(m) | Fail::Named(m) => m.clone(),
                };
                if !self.lenient {
                    return Err(crate::error::FisherError::InvalidInput(match fail {
                        Fail::Node(m) => format!("{}: node {label} ({}): {m}", self.file, node.op_type),
                        Fail::Named(m) => format!("{}: {m}", self.file),
                    }));
                }
                self.unsupported.push(Unsupported { node: label, op: node.op_type.clone(), reason });
                self.poison(node);
            }
        }
        self.finish(output)
    }

    fn unsupported_message(&self, node: &NodeProto) -> String {
        let op = if matches!(node.domain.as_str(), "" | "ai.onnx") {
            node.op_type.clone()
        } else {
            format!("{}::{}", node.domain, node.op_type)
        };
        format!("operator {op} is not supported (supported: {})", SUPPORTED_OPS.join(", "))
    }

    fn poison(&mut self, node: &NodeProto) {
        for o in node.output.iter().filter(|o| !o.is_empty()) {
            self.values.insert(o.clone(), Value::Poisoned);
        }
    }

    fn finish(mut self, output: &str) -> crate::error::Result<Converted> {
        let fail = |m: String| crate::error::FisherError::InvalidInput(m);
        // An initializer both trained and used as a constant would make the gradient wrong.
        for (init, node) in &self.const_uses {
            if self.params.contains_key(init) {
                return Err(fail(format!(
                    "{}: initializer {} is a trainable parameter but node {node} uses its values as a constant (a function of a parameter before it meets the data, e.g. torch.sigmoid(p) * x, is not supported; use p directly)",
                    self.file, self.g.initializer[*init].name
                )));
            }
        }
        let mut order: Vec<usize> = (0..self.param_list.len()).collect();
        order.sort_by_key(|&k| self.param_list[k].0);
        let params: Vec<ParamSummary> = order.iter().map(|&k| self.param_list[k].1.clone()).collect();
        let graph = match self.values.get(output).cloned() {
            _ if !self.unsupported.is_empty() => None,
            Some(Value::Sample(id)) => match self.b.finish(id) {
                Ok(mut graph) => {
                    reorder_params(&mut graph, &order);
                    graph.validate().map_err(|e| fail(format!("{}: {e}", self.file)))?;
                    Some(graph)
                }
                Err(e) if self.lenient => {
                    self.unsupported.push(Unsupported { node: output.to_string(), op: "output".into(), reason: e.to_string() });
                    None
                }
                Err(e) => return Err(fail(format!("{}: {}", self.file, strip(&e.to_string())))),
            },
            Some(Value::Known(_)) => return Err(fail(format!("{}: the graph output {output} does not depend on the input", self.file))),
            Some(Value::Poisoned) => None,
            Some(Value::Above { .. }) => return Err(fail(format!("{}: the graph output {output} is a comparison", self.file))),
            None => return Err(fail(format!("{}: the graph output {output} is not computed by any node", self.file))),
        };
        Ok(Converted { graph, layers: self.layers, params, unsupported: self.unsupported })
    }

    // ---- values -------------------------------------------------------------------------

    fn value(&self, node: &NodeProto, k: usize) -> R<Option<Value>> {
        match node.input.get(k).filter(|n| !n.is_empty()) {
            None => Ok(None),
            Some(name) => match self.values.get(name) {
                Some(v) => Ok(Some(v.clone())),
                None => Err(format!("input {name} is not defined before this node (nodes must be in topological order)").into()),
            },
        }
    }

    fn required(&self, node: &NodeProto, k: usize) -> R<Value> {
        self.value(node, k)?.ok_or_else(|| Fail::Node(format!("missing input {k}")))
    }

    fn known(&self, node: &NodeProto, k: usize) -> R<Rc<Known>> {
        match self.required(node, k)? {
            Value::Known(c) => Ok(c),
            _ => Err(format!("input {} must be known at import (a constant or a shape), not computed per sample", node.input[k]).into()),
        }
    }

    fn opt_known(&self, node: &NodeProto, k: usize) -> R<Option<Rc<Known>>> {
        match self.value(node, k)? {
            None => Ok(None),
            Some(_) => self.known(node, k).map(Some),
        }
    }

    fn sample(&self, node: &NodeProto, k: usize) -> R<TensorId> {
        match self.required(node, k)? {
            Value::Sample(t) => Ok(t),
            _ => Err(format!("input {} must be computed per sample", node.input[k]).into()),
        }
    }

    fn set(&mut self, node: &NodeProto, v: Value) {
        if let Some(o) = node.output.first().filter(|o| !o.is_empty()) {
            self.values.insert(o.clone(), v);
        }
    }

    fn set_known(&mut self, node: &NodeProto, k: Known) {
        self.set(node, Value::Known(Rc::new(k)));
    }

    /// The ONNX (full) shape of a per-sample tensor: the batch, then its per-sample shape.
    fn full(&self, t: TensorId) -> Vec<usize> {
        std::iter::once(self.batch).chain(self.b.tensor(t).shape.iter().copied()).collect()
    }

    fn is_int_input(&self, t: TensorId) -> bool {
        matches!(self.b.tensor(t).kind, TensorKind::Input(InputType::Integer))
    }

    // ---- IR tensors ---------------------------------------------------------------------

    /// Appends an IR node (its name is the ONNX node's).
    fn emit(&mut self, label: &str, op: Op, inputs: &[TensorId]) -> R<TensorId> {
        if !matches!(op, Op::Gather) && inputs.iter().any(|&t| self.is_int_input(t)) {
            return Err("the integer input may only feed a Gather (an embedding)".into());
        }
        let name = op_name(&op);
        let out = self.b.node(label, op.clone(), inputs).map_err(|e| Fail::Named(strip(&e.to_string())))?;
        self.producers.insert(out, (op, inputs.to_vec()));
        self.layers.push(Layer { name: label.to_string(), op: name.to_string(), output_shape: self.b.tensor(out).shape.clone() });
        Ok(out)
    }

    fn emit_reshape(&mut self, label: &str, x: TensorId, shape: &[usize]) -> R<TensorId> {
        if self.is_int_input(x) {
            return Err("the integer input may only feed a Gather (an embedding)".into());
        }
        let out = self.b.reshape(label, x, shape).map_err(|e| Fail::Named(strip(&e.to_string())))?;
        self.layers.push(Layer { name: label.to_string(), op: "Reshape".into(), output_shape: shape.to_vec() });
        Ok(out)
    }

    /// The parameter made of initializer `i` (once; shared by every use).
    fn param(&mut self, i: usize) -> R<TensorId> {
        if let Some(&t) = self.params.get(&i) {
            return Ok(t);
        }
        let init = &self.g.initializer[i];
        let Some(Value::Known(k)) = self.values.get(&init.name).cloned() else {
            return Err(format!("initializer {} is shadowed by a node output", init.name).into());
        };
        if k.dtype != DType::Float {
            return Err(format!("initializer {} is not a float tensor", init.name).into());
        }
        let t = self.b.param(&init.name, &k.shape, k.floats()).map_err(|e| Fail::Named(strip(&e.to_string())))?;
        self.params.insert(i, t);
        let summary = ParamSummary {
            name: init.name.clone(),
            shape: k.shape.clone(),
            count: k.len(),
            module: init.name.rsplit_once('.').map_or(init.name.as_str(), |(m, _)| m).to_string(),
        };
        self.param_list.push((i, summary));
        Ok(t)
    }

    /// A constant IR tensor holding `k` (reshaped to `shape`), named after the ONNX value.
    fn constant(&mut self, label: &str, name: &str, k: &Known, shape: &[usize]) -> R<TensorId> {
        for i in k.origin.inits() {
            self.const_uses.push((i, label.to_string()));
        }
        let key = (name.to_string(), shape.to_vec());
        if let Some(&t) = self.consts.get(&key) {
            return Ok(t);
        }
        let t = self.b.constant(name, shape, k.floats()).map_err(|e| Fail::Named(strip(&e.to_string())))?;
        self.consts.insert(key, t);
        Ok(t)
    }

    /// The tensor for a trainable slot (`what`, e.g. "W"): an initializer becomes a
    /// parameter, a value made of constants only a constant; one computed from initializers
    /// is refused (it is not a PyTorch parameter any more).
    fn trainable(&mut self, label: &str, node: &NodeProto, k: usize, what: &str) -> R<Option<TensorId>> {
        let Some(c) = self.opt_known_slot(node, k, what)? else { return Ok(None) };
        match &c.origin {
            Origin::Init(i) => self.param(*i).map(Some),
            Origin::Pure => self.constant(label, &node.input[k], &c, &c.shape.clone()).map(Some),
            Origin::InitT(i) => Err(format!(
                "{what} is the transpose of initializer {}; only MatMul and Gemm take a transposed weight",
                self.g.initializer[*i].name
            )
            .into()),
            o => Err(format!(
                "{what} ({}) is computed from initializers {}; a trainable slot must be an initializer",
                node.input[k],
                o.inits().iter().map(|&i| self.g.initializer[i].name.as_str()).collect::<Vec<_>>().join(", ")
            )
            .into()),
        }
    }

    /// A bias slot (Conv B, Gemm C): like [`Converter::trainable`], except that a bias made
    /// of constants that are all zero is left out (the exporter writes `Expand(0, [C])` for
    /// `bias=False`, as in torchvision's ResNet).
    fn bias(&mut self, label: &str, node: &NodeProto, k: usize, what: &str) -> R<Option<TensorId>> {
        if let Some(c) = self.opt_known_slot(node, k, what)? {
            if c.origin == Origin::Pure && c.floats().iter().all(|&x| x == 0.0) {
                return Ok(None);
            }
        }
        self.trainable(label, node, k, what)
    }

    fn opt_known_slot(&self, node: &NodeProto, k: usize, what: &str) -> R<Option<Rc<Known>>> {
        match self.value(node, k)? {
            None => Ok(None),
            Some(Value::Known(c)) => Ok(Some(c)),
            Some(_) => Err(format!("{what} ({}) must be an initializer, not computed per sample", node.input[k]).into()),
        }
    }

    /// A right-hand weight of MatMul/Gemm: (tensor, whether it is the transpose of the stored one).
    fn weight(&mut self, label: &str, node: &NodeProto, k: usize) -> R<(TensorId, bool)> {
        let c = self.opt_known_slot(node, k, "B")?.ok_or("missing B")?;
        if c.shape.len() != 2 {
            return Err(format!("B has shape {:?}; only a 2-D weight is supported", c.shape).into());
        }
        match c.origin {
            Origin::InitT(i) => Ok((self.param(i)?, true)),
            _ => Ok((self.trainable(label, node, k, "B")?.ok_or("missing B")?, false)),
        }
    }

    // ---- nodes --------------------------------------------------------------------------

    fn node(&mut self, index: usize, node: &'a NodeProto, label: &str) -> R<()> {
        // Only the first output is produced; a later one that something reads is refused.
        for (k, o) in node.output.iter().enumerate().skip(1) {
            if !o.is_empty() && self.uses.get(o.as_str()).copied().unwrap_or(0) > 0 {
                return Err(format!("output {k} ({o}) is used; only the first output of {} is supported", node.op_type).into());
            }
        }
        for a in &node.attribute {
            if !a.ref_attr_name.is_empty() {
                return Err(format!("attribute {} refers to a function attribute", a.name).into());
            }
        }
        let op = node.op_type.as_str();
        let inputs: Vec<Option<Value>> = (0..node.input.len()).map(|k| self.value(node, k)).collect::<R<_>>()?;
        if op != "Where" && inputs.iter().any(|v| matches!(v, Some(Value::Above { .. }))) {
            return Err("a per-sample comparison may only select PyTorch's softplus threshold (a Where)".into());
        }
        let all_known = inputs.iter().all(|v| matches!(v, None | Some(Value::Known(_))));
        match op {
            "Constant" => self.constant_node(node),
            "Identity" => {
                let v = self.required(node, 0)?;
                self.set(node, v);
                Ok(())
            }
            "Dropout" => {
                if let Some(t) = self.value(node, 2)? {
                    let Value::Known(t) = t else { return Err("training_mode must be known at import".into()) };
                    if t.ints().iter().any(|&x| x != 0) {
                        return Err("training_mode is true; export the model in eval mode".into());
                    }
                }
                let v = self.required(node, 0)?;
                self.set(node, v);
                Ok(())
            }
            "Shape" => {
                let shape = match self.required(node, 0)? {
                    Value::Known(k) => k.shape.clone(),
                    Value::Sample(t) => self.full(t),
                    Value::Poisoned | Value::Above { .. } => return Err(POISONED.into()),
                };
                let r = shape.len() as i64;
                let clampi = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
                let start = clampi(attr_i(node, "start")?.unwrap_or(0));
                let end = clampi(attr_i(node, "end")?.unwrap_or(r)).max(start);
                let v: Vec<i64> = shape[start..end].iter().map(|&d| d as i64).collect();
                self.set_known(node, Known::int(vec![v.len()], v));
                Ok(())
            }
            "Size" => {
                let n = match self.required(node, 0)? {
                    Value::Known(k) => k.len(),
                    Value::Sample(t) => self.full(t).iter().product(),
                    Value::Poisoned | Value::Above { .. } => return Err(POISONED.into()),
                };
                self.set_known(node, Known::int(vec![], vec![n as i64]));
                Ok(())
            }
            "Cast" | "CastLike" => self.cast(node),
            "Reshape" => self.reshape(node, label),
            "Flatten" => self.flatten(node, label),
            "Squeeze" | "Unsqueeze" => self.squeeze(node, label, op == "Unsqueeze"),
            "Transpose" => self.transpose(node, label),
            "Concat" => self.concat(node, label),
            "Gather" => self.gather(node, label),
            "Slice" => self.slice(node),
            "ConstantOfShape" => {
                let shape = self.known(node, 0)?;
                let shape: Vec<usize> = shape.ints().iter().map(|&d| to_usize(d, "dimension")).collect::<R<_>>()?;
                let n = fold::checked_len(&shape)?;
                let value = match attr(node, "value").and_then(|a| a.t.as_ref()) {
                    Some(t) => decode(t, self.model_dir)?,
                    None => Known::float(vec![1], vec![0.0]),
                };
                if value.len() != 1 {
                    return Err("value must hold one element".into());
                }
                let data = match &value.data {
                    Data::F(v) => Data::F(vec![v[0]; n]),
                    Data::I(v) => Data::I(vec![v[0]; n]),
                };
                self.set_known(node, Known { dtype: value.dtype, shape, data, origin: Origin::Pure });
                Ok(())
            }
            "Expand" => {
                let shape = self.known(node, 1)?;
                let shape: Vec<usize> = shape.ints().iter().map(|&d| to_usize(d, "dimension")).collect::<R<_>>()?;
                match self.required(node, 0)? {
                    Value::Known(k) => {
                        let out = fold::expand(&k, &shape)?;
                        self.set_known(node, out);
                    }
                    Value::Sample(t) => {
                        // Only an expand that changes nothing per sample (e.g. to x's own shape).
                        let full = self.full(t);
                        if crate::graph::ir::broadcast_shapes(&full, &shape).as_deref() != Some(&full[..]) {
                            return Err(format!("expanding a per-sample {full:?} to {shape:?} is not supported").into());
                        }
                        self.set(node, Value::Sample(t));
                    }
                    Value::Poisoned | Value::Above { .. } => return Err(POISONED.into()),
                }
                Ok(())
            }
            "Range" if all_known => {
                let out = fold::range(&*self.known(node, 0)?, &*self.known(node, 1)?, &*self.known(node, 2)?)?;
                self.set_known(node, out);
                Ok(())
            }
            "Where" if all_known => {
                let out = fold::where_(&*self.known(node, 0)?, &*self.known(node, 1)?, &*self.known(node, 2)?)?;
                self.set_known(node, out);
                Ok(())
            }
            "Equal" | "Less" | "Greater" | "Max" | "Min" if all_known => self.fold_binary(node),
            "Greater" => {
                let x = self.sample(node, 0)?;
                let threshold = self.known(node, 1)?.scalar().ok_or("the threshold must be a scalar")?;
                self.set(node, Value::Above { x, threshold });
                Ok(())
            }
            "Where" => self.softplus_threshold(node),
            "Range" | "Equal" | "Less" | "Max" | "Min" => {
                Err(format!("{op} on values computed per sample is not supported (only at import, on constants)").into())
            }
            "Add" | "Sub" | "Mul" | "Div" => self.binary(node, label),
            "Pow" => self.pow(node, label),
            "Relu" | "Tanh" | "Sigmoid" | "Erf" | "Softplus" | "Sqrt" | "Reciprocal" | "Exp" | "Neg" | "LeakyRelu"
            | "Gelu" => self.unary(node, label),
            _ if all_known => Err(format!("{op} with only constant inputs cannot be evaluated at import").into()),
            "Gemm" => self.gemm(node, label),
            "MatMul" => self.matmul(index, node, label),
            "Conv" => self.conv(node, label),
            "MaxPool" | "AveragePool" => self.pool(node, label, op == "MaxPool"),
            "GlobalAveragePool" => {
                let x = self.sample(node, 0)?;
                let y = self.emit(label, Op::GlobalAveragePool, &[x])?;
                self.set(node, Value::Sample(y));
                Ok(())
            }
            "ReduceMean" => self.reduce_mean(node, label),
            "BatchNormalization" => self.batch_norm(node, label),
            "LayerNormalization" => self.layer_norm(node, label),
            _ => Err(self.unsupported_message(node).into()),
        }
    }

    fn constant_node(&mut self, node: &NodeProto) -> R<()> {
        let a = node.attribute.first().ok_or("a Constant without a value")?;
        let k = match a.name.as_str() {
            "value" => decode(a.t.as_ref().ok_or("value is not a tensor")?, self.model_dir)?,
            "value_float" => Known::float(vec![], vec![a.f]),
            "value_floats" => Known::float(vec![a.floats.len()], a.floats.clone()),
            "value_int" => Known::int(vec![], vec![a.i]),
            "value_ints" => Known::int(vec![a.ints.len()], a.ints.clone()),
            other => return Err(format!("attribute {other} is not supported").into()),
        };
        self.set_known(node, k);
        Ok(())
    }

    fn cast(&mut self, node: &NodeProto) -> R<()> {
        let to = if node.op_type == "CastLike" {
            match self.required(node, 1)? {
                Value::Known(k) => match k.dtype {
                    DType::Float => dt::FLOAT,
                    DType::Int => dt::INT64,
                    DType::Bool => dt::BOOL,
                },
                Value::Sample(t) if self.is_int_input(t) => dt::INT64,
                _ => dt::FLOAT,
            }
        } else {
            attr_i(node, "to")?.ok_or("Cast without `to`")? as i32
        };
        match self.required(node, 0)? {
            Value::Known(k) => {
                let out = fold::cast(&k, to)?;
                self.set_known(node, out);
            }
            Value::Sample(t) => {
                // Per-sample values are f32 and the integer input's indices stay integers: only
                // a cast that changes nothing is accepted (and vanishes).
                let no_op = if self.is_int_input(t) { matches!(to, dt::INT64 | dt::INT32) } else { to == dt::FLOAT };
                if !no_op {
                    return Err(format!("a per-sample Cast to {} is not supported (only no-op casts)", dt::name(to)).into());
                }
                self.set(node, Value::Sample(t));
            }
            Value::Poisoned | Value::Above { .. } => return Err(POISONED.into()),
        }
        Ok(())
    }

    /// Turns a full (ONNX) output shape of a per-sample reshape into a per-sample one: the
    /// first extent must be the batch and the rest must hold one sample's elements.
    fn per_sample_target(&self, x: TensorId, out: &[usize]) -> R<Vec<usize>> {
        let full = self.full(x);
        match out.split_first() {
            Some((&n, rest)) if n == self.batch && rest.iter().product::<usize>() == self.b.tensor(x).len() => Ok(rest.to_vec()),
            _ => Err(format!("reshaping {full:?} to {out:?} mixes the batch axis with the others (the batch must stay axis 0)").into()),
        }
    }

    fn reshape_sample(&mut self, node: &NodeProto, label: &str, x: TensorId, shape: Vec<usize>) -> R<()> {
        let y = if shape == self.b.tensor(x).shape { x } else { self.emit_reshape(label, x, &shape)? };
        self.set(node, Value::Sample(y));
        Ok(())
    }

    fn reshape(&mut self, node: &NodeProto, label: &str) -> R<()> {
        let target = self.known(node, 1)?.ints();
        let allowzero = attr_i(node, "allowzero")?.unwrap_or(0) != 0;
        match self.required(node, 0)? {
            Value::Known(k) => {
                let shape = fold::reshape_target(&k.shape, &target, allowzero)?;
                self.set_known(node, fold::with_shape(&k, shape));
                Ok(())
            }
            Value::Sample(x) => {
                let out = fold::reshape_target(&self.full(x), &target, allowzero)?;
                let shape = self.per_sample_target(x, &out)?;
                self.reshape_sample(node, label, x, shape)
            }
            Value::Poisoned | Value::Above { .. } => return Err(POISONED.into()),
        }
    }

    fn flatten(&mut self, node: &NodeProto, label: &str) -> R<()> {
        let axis = attr_i(node, "axis")?.unwrap_or(1);
        let split = |shape: &[usize]| -> R<Vec<usize>> {
            let r = shape.len() as i64;
            let a = if axis < 0 { axis + r } else { axis };
            if !(0..=r).contains(&a) {
                return Err(format!("axis {axis} out of range for rank {r}").into());
            }
            let a = a as usize;
            Ok(vec![shape[..a].iter().product(), shape[a..].iter().product()])
        };
        match self.required(node, 0)? {
            Value::Known(k) => {
                let shape = split(&k.shape)?;
                self.set_known(node, fold::with_shape(&k, shape));
                Ok(())
            }
            Value::Sample(x) => {
                let out = split(&self.full(x))?;
                let shape = self.per_sample_target(x, &out)?;
                self.reshape_sample(node, label, x, shape)
            }
            Value::Poisoned | Value::Above { .. } => return Err(POISONED.into()),
        }
    }

    /// `axes` of Squeeze/Unsqueeze/ReduceMean: an attribute before opset 13 (18 for
    /// ReduceMean), the second input after.
    fn axes(&self, node: &NodeProto) -> R<Option<Vec<i64>>> {
        match self.opt_known(node, 1)? {
            Some(k) => Ok(Some(k.ints())),
            None => attr_ints(node, "axes"),
        }
    }

    fn squeeze(&mut self, node: &NodeProto, label: &str, unsqueeze: bool) -> R<()> {
        let axes = self.axes(node)?;
        let (full, x) = match self.required(node, 0)? {
            Value::Known(k) => (k.shape.clone(), Err(k)),
            Value::Sample(t) => (self.full(t), Ok(t)),
            Value::Poisoned | Value::Above { .. } => return Err(POISONED.into()),
        };
        let out: Vec<usize> = if unsqueeze {
            let axes = axes.ok_or("Unsqueeze without axes")?;
            let rank = full.len() + axes.len();
            let mut ax: Vec<usize> = axes.iter().map(|&a| fold::norm_axis(a, rank)).collect::<Result<_, _>>()?;
            ax.sort_unstable();
            if ax.windows(2).any(|w| w[0] == w[1]) {
                return Err(format!("repeated axes {axes:?}").into());
            }
            let mut rest = full.iter();
            (0..rank).map(|k| if ax.contains(&k) { 1 } else { rest.next().copied().unwrap_or(1) }).collect()
        } else {
            let ax: Vec<usize> = match &axes {
                Some(a) if !a.is_empty() => a.iter().map(|&a| fold::norm_axis(a, full.len())).collect::<Result<_, _>>()?,
                _ => {
                    if x.is_ok() && self.batch == 1 {
                        return Err("Squeeze without axes on a model exported with a batch of 1 would squeeze the batch axis; give axes".into());
                    }
                    (0..full.len()).filter(|&k| full[k] == 1).collect()
                }
            };
            if let Some(&k) = ax.iter().find(|&&k| full[k] != 1) {
                return Err(format!("axis {k} of {full:?} is not 1").into());
            }
            full.iter().enumerate().filter(|(k, _)| !ax.contains(k)).map(|(_, &d)| d).collect()
        };
        match x {
            Err(k) => {
                self.set_known(node, fold::with_shape(&k, out));
                Ok(())
            }
            Ok(t) => {
                let shape = self.per_sample_target(t, &out)?;
                self.reshape_sample(node, label, t, shape)
            }
        }
    }

    fn transpose(&mut self, node: &NodeProto, label: &str) -> R<()> {
        let perm = attr_ints(node, "perm")?;
        match self.required(node, 0)? {
            Value::Known(k) => {
                let perm: Vec<usize> = match perm {
                    Some(p) => p.iter().map(|&a| fold::norm_axis(a, k.shape.len())).collect::<Result<_, _>>()?,
                    None => (0..k.shape.len()).rev().collect(),
                };
                let out = fold::transpose(&k, &perm)?;
                self.set_known(node, out);
                Ok(())
            }
            Value::Sample(x) => {
                let rank = self.full(x).len();
                let perm: Vec<usize> = match perm {
                    Some(p) => p.iter().map(|&a| fold::norm_axis(a, rank)).collect::<Result<_, _>>()?,
                    None => (0..rank).rev().collect(),
                };
                if perm.first() != Some(&0) {
                    return Err(format!("perm {perm:?} moves the batch axis").into());
                }
                let per: Vec<usize> = perm[1..].iter().map(|&p| p.saturating_sub(1)).collect();
                if per.iter().enumerate().all(|(k, &p)| k == p) {
                    self.set(node, Value::Sample(x));
                    return Ok(());
                }
                let y = self.emit(label, Op::Transpose { perm: per }, &[x])?;
                self.set(node, Value::Sample(y));
                Ok(())
            }
            Value::Poisoned | Value::Above { .. } => return Err(POISONED.into()),
        }
    }

    fn concat(&mut self, node: &NodeProto, label: &str) -> R<()> {
        let axis = attr_i(node, "axis")?.ok_or("Concat without axis")?;
        let parts: Vec<Value> = (0..node.input.len()).filter_map(|k| self.value(node, k).transpose()).collect::<R<_>>()?;
        if parts.iter().all(|v| matches!(v, Value::Known(_))) {
            let ks: Vec<&Known> = parts.iter().filter_map(|v| if let Value::Known(k) = v { Some(&**k) } else { None }).collect();
            let out = fold::concat(&ks, axis)?;
            self.set_known(node, out);
            return Ok(());
        }
        let ids: Vec<TensorId> = parts
            .iter()
            .map(|v| match v {
                Value::Sample(t) => Ok(*t),
                _ => Err(Fail::Node("concatenating a constant with per-sample values is not supported".into())),
            })
            .collect::<R<_>>()?;
        let rank = self.full(ids[0]).len();
        let a = fold::norm_axis(axis, rank)?;
        if a == 0 {
            return Err("Concat along the batch axis".into());
        }
        let y = self.emit(label, Op::Concat { axis: a - 1 }, &ids)?;
        self.set(node, Value::Sample(y));
        Ok(())
    }

    fn gather(&mut self, node: &NodeProto, label: &str) -> R<()> {
        let axis = attr_i(node, "axis")?.unwrap_or(0);
        match (self.required(node, 0)?, self.required(node, 1)?) {
            (Value::Known(data), Value::Known(idx)) => {
                let out = fold::gather(&data, &idx, axis)?;
                self.set_known(node, out);
                Ok(())
            }
            (Value::Known(data), Value::Sample(idx)) => {
                if axis != 0 || data.shape.len() != 2 {
                    return Err(format!("only an embedding (axis 0 of a 2-D table) is supported; table {:?}, axis {axis}", data.shape).into());
                }
                if !self.is_int_input(idx) {
                    return Err("the indices must be the graph's integer input".into());
                }
                let table = self.trainable(label, node, 0, "the table")?.ok_or("missing table")?;
                let y = self.emit(label, Op::Gather, &[table, idx])?;
                self.set(node, Value::Sample(y));
                Ok(())
            }
            _ => Err("gathering from a per-sample tensor is not supported".into()),
        }
    }

    fn slice(&mut self, node: &NodeProto) -> R<()> {
        let (starts, ends, axes, steps) = if self.opset >= 10 {
            let get = |k: usize| -> R<Option<Vec<i64>>> { Ok(self.opt_known(node, k)?.map(|c| c.ints())) };
            (get(1)?.ok_or("missing starts")?, get(2)?.ok_or("missing ends")?, get(3)?, get(4)?)
        } else {
            (
                attr_ints(node, "starts")?.ok_or("missing starts")?,
                attr_ints(node, "ends")?.ok_or("missing ends")?,
                attr_ints(node, "axes")?,
                None,
            )
        };
        match self.required(node, 0)? {
            Value::Known(k) => {
                let out = fold::slice(&k, &starts, &ends, axes.as_deref(), steps.as_deref())?;
                self.set_known(node, out);
                Ok(())
            }
            _ => Err("slicing a per-sample tensor is not supported".into()),
        }
    }

    /// PyTorch's `softplus(x, beta, threshold)` exports as
    /// `Where(Greater(βx, threshold), x, Softplus(βx)/β)`: the IR's Softplus path alone, which
    /// differs from x above the threshold by log(1 + e^(−βx))/β < e^(−threshold)/β, i.e. below
    /// f32 resolution for PyTorch's default threshold 20. Any other per-sample `Where` is refused.
    fn softplus_threshold(&mut self, node: &NodeProto) -> R<()> {
        let refuse = || Fail::Node("a per-sample Where is supported only as PyTorch's softplus threshold".into());
        let Some(Value::Above { x: scaled, threshold }) = self.value(node, 0)? else { return Err(refuse()) };
        let (Value::Sample(x), Value::Sample(y)) = (self.required(node, 1)?, self.required(node, 2)?) else {
            return Err(refuse());
        };
        // scaled = x or x·β (β a constant); y = Softplus(scaled) or Softplus(scaled) / β.
        let scale_of = |t: TensorId| -> Option<(TensorId, Option<TensorId>)> {
            match self.producers.get(&t) {
                Some((Op::Binary(BinaryOp::Mul | BinaryOp::Div), ins)) if !self.b.tensor(ins[1]).per_sample() => Some((ins[0], Some(ins[1]))),
                _ => Some((t, None)),
            }
        };
        let (base, beta) = scale_of(scaled).ok_or_else(refuse)?;
        let (soft, beta_out) = scale_of(y).ok_or_else(refuse)?;
        let is_softplus = matches!(self.producers.get(&soft), Some((Op::Unary(UnaryOp::Softplus), ins)) if ins[0] == scaled);
        let beta_value = |b: Option<TensorId>| b.and_then(|t| self.b.tensor(t).kind.clone().into_const());
        if base != x || !is_softplus || beta_value(beta) != beta_value(beta_out) {
            return Err(refuse());
        }
        let beta = beta_value(beta).map_or(1.0, |v| f64::from(v));
        if beta <= 0.0 || (-threshold).exp() / beta > 1e-7 {
            return Err(format!("softplus threshold {threshold} with beta {beta} is too low to drop the linear branch").into());
        }
        self.set(node, Value::Sample(y));
        Ok(())
    }

    fn fold_binary(&mut self, node: &NodeProto) -> R<()> {
        let op = Bin::from_onnx(&node.op_type).ok_or("not a binary operator")?;
        let out = fold::binary(op, &*self.known(node, 0)?, &*self.known(node, 1)?)?;
        if out.dtype == DType::Float {
            fold::checked_len(&out.shape)?;
        }
        self.set_known(node, out);
        Ok(())
    }

    /// The IR operand for a known operand of a per-sample binary operator: the leading
    /// batch axis of extent 1 (PyTorch broadcasting against `[N, …]`) is dropped.
    fn operand(&mut self, label: &str, name: &str, k: &Known, per_sample_rank: usize) -> R<TensorId> {
        let mut shape = k.shape.clone();
        if shape.len() == per_sample_rank + 1 && shape[0] == 1 {
            shape.remove(0);
        }
        if shape.len() > per_sample_rank {
            return Err(format!("a constant of shape {:?} would broadcast over the batch", k.shape).into());
        }
        if k.dtype != DType::Float {
            return Err(format!("constant {name} is not a float tensor").into());
        }
        self.constant(label, name, k, &shape)
    }

    /// Whether multiplying per-sample `x` by `k` changes nothing: `k` is all ones, made of
    /// constants only, and does not widen x's shape (PyTorch's softplus writes x·1 and y/1).
    fn is_one(&self, x: TensorId, k: &Known) -> bool {
        let per_sample = &self.b.tensor(x).shape;
        k.origin == Origin::Pure
            && k.dtype == DType::Float
            && k.floats().iter().all(|&v| v == 1.0)
            && k.shape.len() <= per_sample.len()
            && crate::graph::ir::broadcast_shapes(per_sample, &k.shape).as_ref() == Some(per_sample)
    }

    /// An initializer operand of an element-wise operation: a PyTorch parameter used
    /// directly (`x * self.scale`, an `nn.Parameter` of the module) becomes a trainable
    /// parameter; BatchNorm's running statistics (and anything made of constants) stay
    /// constants. A registered buffer used element-wise is indistinguishable from a parameter
    /// in the file: it is counted as one (leave it out with `--params`).
    fn elementwise_operand(&mut self, label: &str, name: &str, k: &Known, per_sample_rank: usize) -> R<TensorId> {
        let buffer = ["running_mean", "running_var", "num_batches_tracked"].iter().any(|b| name.ends_with(b));
        match k.origin {
            Origin::Init(i) if !buffer && k.dtype == DType::Float && k.shape.len() <= per_sample_rank => self.param(i),
            _ => self.operand(label, name, k, per_sample_rank),
        }
    }

    fn binary(&mut self, node: &NodeProto, label: &str) -> R<()> {
        let a = self.required(node, 0)?;
        let b = self.required(node, 1)?;
        let op = match node.op_type.as_str() {
            "Add" => BinaryOp::Add,
            "Sub" => BinaryOp::Sub,
            "Mul" => BinaryOp::Mul,
            _ => BinaryOp::Div,
        };
        let ids = match (a, b) {
            (Value::Known(_), Value::Known(_)) => return self.fold_binary(node),
            (Value::Sample(x), Value::Sample(y)) => {
                if self.b.tensor(x).shape.len() != self.b.tensor(y).shape.len() {
                    return Err(format!(
                        "per-sample operands of ranks {} and {} would broadcast across the batch axis",
                        self.full(x).len(),
                        self.full(y).len()
                    )
                    .into());
                }
                [x, y]
            }
            (Value::Sample(x), Value::Known(k)) => {
                if matches!(op, BinaryOp::Mul | BinaryOp::Div) && self.is_one(x, &k) {
                    self.set(node, Value::Sample(x));
                    return Ok(());
                }
                let r = self.b.tensor(x).shape.len();
                [x, self.elementwise_operand(label, &node.input[1], &k, r)?]
            }
            (Value::Known(k), Value::Sample(y)) => {
                if op == BinaryOp::Mul && self.is_one(y, &k) {
                    self.set(node, Value::Sample(y));
                    return Ok(());
                }
                let r = self.b.tensor(y).shape.len();
                [self.elementwise_operand(label, &node.input[0], &k, r)?, y]
            }
            _ => return Err(POISONED.into()),
        };
        let y = self.emit(label, Op::Binary(op), &ids)?;
        self.set(node, Value::Sample(y));
        Ok(())
    }

    fn pow(&mut self, node: &NodeProto, label: &str) -> R<()> {
        let e = self.known(node, 1)?;
        match self.required(node, 0)? {
            Value::Known(_) => self.fold_binary(node),
            Value::Sample(x) => {
                let y = match e.scalar() {
                    Some(v) if v == 1.0 => x,
                    Some(v) if v == 2.0 => self.emit(label, Op::Binary(BinaryOp::Mul), &[x, x])?,
                    Some(v) if v == 0.5 => self.emit(label, Op::Unary(UnaryOp::Sqrt), &[x])?,
                    Some(v) if v == -1.0 => self.emit(label, Op::Unary(UnaryOp::Reciprocal), &[x])?,
                    _ => return Err(format!("only the exponents 1, 2, 0.5 and -1 are supported, not {:?}", e.floats()).into()),
                };
                self.set(node, Value::Sample(y));
                Ok(())
            }
            Value::Poisoned | Value::Above { .. } => return Err(POISONED.into()),
        }
    }

    fn unary(&mut self, node: &NodeProto, label: &str) -> R<()> {
        let u = match node.op_type.as_str() {
            "Relu" => UnaryOp::Relu,
            "Tanh" => UnaryOp::Tanh,
            "Sigmoid" => UnaryOp::Sigmoid,
            "Erf" => UnaryOp::Erf,
            "Softplus" => UnaryOp::Softplus,
            "Sqrt" => UnaryOp::Sqrt,
            "Reciprocal" => UnaryOp::Reciprocal,
            "Exp" => UnaryOp::Exp,
            "Neg" => UnaryOp::Neg,
            "LeakyRelu" => UnaryOp::LeakyRelu(attr_f(node, "alpha")?.unwrap_or(0.01)),
            _ => match attr_s(node, "approximate")?.as_deref().unwrap_or("none") {
                "none" => UnaryOp::Gelu,
                "tanh" => UnaryOp::GeluTanh,
                other => return Err(format!("approximate={other:?} is not supported").into()),
            },
        };
        match self.required(node, 0)? {
            Value::Known(k) => {
                let out = if u == UnaryOp::Neg { fold::unary_keep(&k, |x| x.wrapping_neg(), |x| -x) } else { fold::unary(&k, |x| eval_unary(u, x)) };
                self.set_known(node, out);
            }
            Value::Sample(x) => {
                let y = self.emit(label, Op::Unary(u), &[x])?;
                self.set(node, Value::Sample(y));
            }
            Value::Poisoned | Value::Above { .. } => return Err(POISONED.into()),
        }
        Ok(())
    }

    fn gemm(&mut self, node: &NodeProto, label: &str) -> R<()> {
        if attr_i(node, "transA")?.unwrap_or(0) != 0 {
            return Err("transA=1 is not supported".into());
        }
        let alpha = attr_f(node, "alpha")?.unwrap_or(1.0);
        let beta = attr_f(node, "beta")?.unwrap_or(1.0);
        let trans_b = attr_i(node, "transB")?.unwrap_or(0) != 0;
        let a = self.sample(node, 0)?;
        let (w, transposed) = self.weight(label, node, 1)?;
        let mut inputs = vec![a, w];
        if let Some(c) = self.bias(label, node, 2, "C")? {
            inputs.push(c);
        }
        let y = self.emit(label, Op::Gemm { alpha, beta, trans_b: trans_b != transposed }, &inputs)?;
        self.set(node, Value::Sample(y));
        Ok(())
    }

    fn matmul(&mut self, index: usize, node: &'a NodeProto, label: &str) -> R<()> {
        let a = self.sample(node, 0)?;
        let (w, trans_b) = self.weight(label, node, 1)?;
        let mut inputs = vec![a, w];
        // PyTorch's nn.Linear on [N, T, K] exports MatMul then Add(bias): fuse the Add when
        // it is the product's only reader and its other operand is a 1-D initializer.
        let out_name = node.output.first().map(String::as_str).unwrap_or("");
        let mut fused_add = None;
        if self.uses.get(out_name).copied() == Some(1) {
            let g = self.g;
            if let Some((j, add)) = g.node.iter().enumerate().skip(index + 1).find(|(_, n)| n.input.iter().any(|i| i == out_name)) {
                let m = self.b.tensor(w).shape[if trans_b { 0 } else { 1 }];
                if add.op_type == "Add" && add.domain.is_empty() && add.input.len() == 2 {
                    let other = if add.input[0] == out_name { 1 } else { 0 };
                    if let Some(Value::Known(k)) = self.values.get(&add.input[other]).cloned() {
                        if let (Origin::Init(i), true) = (&k.origin, k.shape == [m] && k.dtype == DType::Float) {
                            inputs.push(self.param(*i)?);
                            fused_add = Some((j, add));
                        }
                    }
                }
            }
        }
        let y = self.emit(label, Op::MatMul { trans_b }, &inputs)?;
        match fused_add {
            Some((j, add)) => {
                self.fused.insert(j);
                self.set(add, Value::Sample(y));
            }
            None => self.set(node, Value::Sample(y)),
        }
        Ok(())
    }

    /// Kernel, strides, pads (after `auto_pad`) and dilations of a 2-D Conv or pool.
    fn window(&self, node: &NodeProto, x: TensorId, kernel: Option<[usize; 2]>) -> R<Window> {
        let ps = &self.b.tensor(x).shape;
        let [_, h, w] = ps[..] else {
            return Err(format!("input has shape {:?}; only 2-D (N, C, H, W) is supported", self.full(x)).into());
        };
        let pair = |name: &str, default: usize| -> R<[usize; 2]> {
            match attr_ints(node, name)? {
                None => Ok([default; 2]),
                Some(v) if v.len() == 2 => Ok([to_usize(v[0], name)?, to_usize(v[1], name)?]),
                Some(v) => Err(format!("{name} {v:?} is not 2-D").into()),
            }
        };
        let kernel = match (attr_ints(node, "kernel_shape")?, kernel) {
            (Some(v), _) if v.len() == 2 => [to_usize(v[0], "kernel")?, to_usize(v[1], "kernel")?],
            (Some(v), _) => return Err(format!("kernel_shape {v:?} is not 2-D").into()),
            (None, Some(k)) => k,
            (None, None) => return Err("kernel_shape is missing".into()),
        };
        let strides = pair("strides", 1)?;
        let dilations = pair("dilations", 1)?;
        if strides.contains(&0) || dilations.contains(&0) || kernel.contains(&0) {
            return Err("zero kernel, stride or dilation".into());
        }
        let auto_pad = attr_s(node, "auto_pad")?.unwrap_or_else(|| "NOTSET".into());
        let pads = match auto_pad.as_str() {
            "NOTSET" => match attr_ints(node, "pads")? {
                None => [0; 4],
                Some(v) if v.len() == 4 => {
                    [to_usize(v[0], "pad")?, to_usize(v[1], "pad")?, to_usize(v[2], "pad")?, to_usize(v[3], "pad")?]
                }
                Some(v) => return Err(format!("pads {v:?} is not 2-D").into()),
            },
            "VALID" => [0; 4],
            "SAME_UPPER" | "SAME_LOWER" => {
                // ONNX: output = ⌈in / stride⌉, total padding split evenly, the odd one at the
                // end (SAME_UPPER) or at the beginning (SAME_LOWER).
                let mut p = [0; 4];
                for (a, &extent) in [h, w].iter().enumerate() {
                    let out = extent.div_ceil(strides[a]);
                    let span = dilations[a] * (kernel[a] - 1) + 1;
                    let total = ((out.saturating_sub(1)) * strides[a] + span).saturating_sub(extent);
                    let (small, large) = (total / 2, total - total / 2);
                    let (begin, end) = if auto_pad == "SAME_UPPER" { (small, large) } else { (large, small) };
                    p[a] = begin;
                    p[a + 2] = end;
                }
                p
            }
            other => return Err(format!("auto_pad {other:?} is not supported").into()),
        };
        Ok(Window { kernel, strides, pads, dilations })
    }

    fn conv(&mut self, node: &NodeProto, label: &str) -> R<()> {
        let x = self.sample(node, 0)?;
        let wk = self.opt_known_slot(node, 1, "W")?.ok_or("missing W")?;
        let kernel = match wk.shape[..] {
            [_, _, kh, kw] => [kh, kw],
            _ => return Err(format!("W has shape {:?}; only 2-D convolutions are supported", wk.shape).into()),
        };
        let window = self.window(node, x, Some(kernel))?;
        let group = to_usize(attr_i(node, "group")?.unwrap_or(1), "group")?;
        let w = self.trainable(label, node, 1, "W")?.ok_or("missing W")?;
        let mut inputs = vec![x, w];
        if let Some(b) = self.bias(label, node, 2, "B")? {
            inputs.push(b);
        }
        let y = self.emit(label, Op::Conv { window, group }, &inputs)?;
        self.set(node, Value::Sample(y));
        Ok(())
    }

    fn pool(&mut self, node: &NodeProto, label: &str, max: bool) -> R<()> {
        let x = self.sample(node, 0)?;
        let window = self.window(node, x, None)?;
        let ceil_mode = attr_i(node, "ceil_mode")?.unwrap_or(0) != 0;
        let op = if max {
            if attr_i(node, "storage_order")?.unwrap_or(0) != 0 {
                return Err("storage_order=1 is not supported".into());
            }
            Op::MaxPool { window, ceil_mode }
        } else {
            if window.dilations != [1, 1] {
                return Err("dilated AveragePool is not supported".into());
            }
            Op::AveragePool { window, ceil_mode, count_include_pad: attr_i(node, "count_include_pad")?.unwrap_or(0) != 0 }
        };
        let y = self.emit(label, op, &[x])?;
        self.set(node, Value::Sample(y));
        Ok(())
    }

    fn reduce_mean(&mut self, node: &NodeProto, label: &str) -> R<()> {
        let x = self.sample(node, 0)?;
        let rank = self.full(x).len();
        let keepdims = attr_i(node, "keepdims")?.unwrap_or(1) != 0;
        let axes = self.axes(node)?.unwrap_or_default();
        if axes.is_empty() {
            if attr_i(node, "noop_with_empty_axes")?.unwrap_or(0) != 0 {
                self.set(node, Value::Sample(x));
                return Ok(());
            }
            return Err("reducing over every axis includes the batch axis".into());
        }
        let mut ax: Vec<usize> = axes.iter().map(|&a| fold::norm_axis(a, rank)).collect::<Result<_, _>>()?;
        ax.sort_unstable();
        ax.dedup();
        if ax.first() == Some(&0) {
            return Err("reducing over the batch axis (axis 0) is not supported".into());
        }
        let per: Vec<usize> = ax.iter().map(|a| a - 1).collect();
        let y = self.emit(label, Op::ReduceMean { axes: per, keepdims }, &[x])?;
        self.set(node, Value::Sample(y));
        Ok(())
    }

    fn batch_norm(&mut self, node: &NodeProto, label: &str) -> R<()> {
        if attr_i(node, "training_mode")?.unwrap_or(0) != 0 {
            return Err("training_mode=1; export the model in eval mode".into());
        }
        let epsilon = attr_f(node, "epsilon")?.unwrap_or(1e-5);
        let x = self.sample(node, 0)?;
        let scale = self.trainable(label, node, 1, "scale")?.ok_or("missing scale")?;
        let bias = self.trainable(label, node, 2, "B")?.ok_or("missing B")?;
        let mut inputs = vec![x, scale, bias];
        for (k, what) in [(3, "mean"), (4, "var")] {
            let c = self.opt_known_slot(node, k, what)?.ok_or_else(|| Fail::Node(format!("missing {what}")))?;
            let name = node.input[k].clone();
            inputs.push(self.constant(label, &name, &c, &c.shape.clone())?);
        }
        let y = self.emit(label, Op::BatchNorm { epsilon }, &inputs)?;
        self.set(node, Value::Sample(y));
        Ok(())
    }

    fn layer_norm(&mut self, node: &NodeProto, label: &str) -> R<()> {
        let x = self.sample(node, 0)?;
        let rank = self.full(x).len();
        let axis = fold::norm_axis(attr_i(node, "axis")?.unwrap_or(-1), rank)?;
        if axis == 0 {
            return Err("normalizing over the batch axis is not supported".into());
        }
        let epsilon = attr_f(node, "epsilon")?.unwrap_or(1e-5);
        let mut inputs = vec![x, self.trainable(label, node, 1, "scale")?.ok_or("missing scale")?];
        if let Some(b) = self.trainable(label, node, 2, "B")? {
            inputs.push(b);
        }
        let y = self.emit(label, Op::LayerNorm { axis: axis - 1, epsilon }, &inputs)?;
        self.set(node, Value::Sample(y));
        Ok(())
    }
}

/// `f(x)` of an IR unary operator in f64 (folding constants).
fn eval_unary(u: UnaryOp, x: f64) -> f64 {
    match u {
        UnaryOp::Relu => x.max(0.0),
        UnaryOp::LeakyRelu(a) => {
            if x >= 0.0 {
                x
            } else {
                f64::from(a) * x
            }
        }
        UnaryOp::Tanh => x.tanh(),
        UnaryOp::Sigmoid => 1.0 / (1.0 + (-x).exp()),
        UnaryOp::Gelu => 0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2)),
        UnaryOp::GeluTanh => {
            0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
        }
        UnaryOp::Erf => libm::erf(x),
        UnaryOp::Softplus => x.exp().ln_1p(),
        UnaryOp::Sqrt => x.sqrt(),
        UnaryOp::Reciprocal => 1.0 / x,
        UnaryOp::Exp => x.exp(),
        UnaryOp::Neg => -x,
    }
}

/// The builder's `InvalidInput` message without its "invalid input: " prefix (the importer
/// adds the file name in front).
fn strip(m: &str) -> String {
    m.strip_prefix("invalid input: ").unwrap_or(m).to_string()
}

/// Reorders `graph.params` so that parameter k of the new order is old parameter
/// `order[k]`, and renumbers the tensors that hold them.
fn reorder_params(graph: &mut Graph, order: &[usize]) {
    let mut new_index = vec![0; order.len()];
    for (new, &old) in order.iter().enumerate() {
        new_index[old] = new;
    }
    let old = std::mem::take(&mut graph.params);
    let mut slots: Vec<Option<crate::graph::ir::Param>> = old.into_iter().map(Some).collect();
    graph.params = order.iter().filter_map(|&o| slots[o].take()).collect();
    for t in &mut graph.tensors {
        if let TensorKind::Param(p) = &mut t.kind {
            *p = new_index[*p];
        }
    }
}

/// The scalar value of a one-element constant.
trait IntoConst {
    fn into_const(self) -> Option<f32>;
}

impl IntoConst for TensorKind {
    fn into_const(self) -> Option<f32> {
        match self {
            TensorKind::Const(v) if v.len() == 1 => Some(v[0]),
            _ => None,
        }
    }
}
