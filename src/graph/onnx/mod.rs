//! The ONNX importer: an `.onnx` file (and its external data) → an [`ir::Graph`].
//!
//! Made for what `torch.onnx.export(model.eval(), (x,), path, dynamo=True, optimize=False)`
//! writes: parameters as initializers in `named_parameters()` order, standard operators,
//! and shape arithmetic (`Shape`, `Gather`, `Concat`, `Reshape`, …) around a dynamic batch
//! dimension.
//!
//! ## How a file becomes a graph
//! * **Decoding**: the file is a protobuf `ModelProto` (hand-written prost messages for the
//!   subset of onnx.proto3 read here). Its size is checked before it is read (protobuf
//!   caps a message at 2 GiB); tensors stored outside it (`model.onnx.data`) are read
//!   from beside the model, never outside its directory, within the data file's size.
//! * **Folding**: every value is either *known at import* (initializers, `Constant`s,
//!   `Shape` of a tensor, and everything computed from those) or *computed per sample*.
//!   Known values are evaluated on the spot. The batch extent N is the file's own when the
//!   input declares a number, otherwise a stand-in ([`SYMBOLIC_BATCH`]); a `Reshape` target
//!   whose first extent is N (or that −1 / 0 resolve to N) becomes a per-sample reshape,
//!   and one that mixes the batch with other axes is refused.
//! * **Operators**: per-sample nodes map one to one onto [`Op`] (batch axis removed from
//!   every axis attribute); `MatMul` followed by the `Add` of a bias initializer becomes one
//!   `MatMul` with a bias; `MatMul(x, Transpose(W))` is `MatMul { trans_b: true }` on `W`;
//!   `Identity`, inference `Dropout`, no-op `Cast`s and products with constant ones vanish;
//!   `Pow` by 2 / 0.5 / −1 is `x·x` / `√x` / `1/x`; PyTorch's softplus,
//!   `Where(βx > threshold, x, Softplus(βx)/β)`, keeps its Softplus branch (the two differ
//!   by less than e^(−threshold)/β). Any other per-sample `Where` or comparison is refused.
//! * **Parameters**: the float initializers that feed a trainable slot (Gemm B and C,
//!   MatMul B and its fused bias, Conv W and B, BatchNormalization scale and B,
//!   LayerNormalization scale and B, the Gather table of an embedding), in initializer
//!   order, named by their initializer names. Every other initializer (running statistics,
//!   scalars) is a constant. An initializer used both ways is refused.
//!
//! Errors are one line naming the file and the node or initializer.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use prost::Message;

use crate::error::{FisherError, Result};
use crate::graph::ir::{Graph, InputType};
#[cfg(doc)]
use crate::graph::ir::{self, Op};

mod convert;
mod fold;
pub mod proto;
mod tensor;

#[cfg(test)]
mod tests;

pub use convert::SUPPORTED_OPS;

/// The largest `.onnx` file read: protobuf cannot encode a message over 2 GiB; larger
/// models keep their tensors in external data.
pub const MAX_MODEL_BYTES: u64 = 2 << 30;

/// The batch extent used to fold shapes when the file's input leaves it symbolic: a prime
/// that no layer of a network is likely to have, so that a folded shape holding it is
/// recognizably the batch (and a product with it, a reshape mixing samples).
pub const SYMBOLIC_BATCH: usize = 7919;

/// One declared dimension of the graph input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    /// A number.
    Fixed(usize),
    /// A name (`"batch"`, `"s0"`).
    Symbolic(String),
    /// Neither.
    Unknown,
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Fixed(d) => write!(f, "{d}"),
            Dim::Symbolic(s) => write!(f, "{s}"),
            Dim::Unknown => write!(f, "?"),
        }
    }
}

/// What the file says about itself.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    /// ONNX IR version.
    pub ir_version: i64,
    /// The standard operator set version (`ai.onnx`).
    pub opset: i64,
    /// Producer name and version, e.g. `pytorch 2.9.0`.
    pub producer: String,
    /// The graph input's name.
    pub input_name: String,
    /// Float features or integer tokens.
    pub input_type: InputType,
    /// The input's declared shape, batch first (empty when the file declares none).
    pub declared_input: Vec<Dim>,
    /// The per-sample input shape used (declared, with symbolic extents from the caller).
    pub input_shape: Vec<usize>,
    /// The graph output's name.
    pub output_name: String,
    /// Number of ONNX nodes.
    pub nodes: usize,
    /// The external data files the initializers name (relative to the model's directory,
    /// joined to it): inputs of a run like the model itself, never to be overwritten.
    pub external_files: Vec<PathBuf>,
}

/// A model read from ONNX.
#[derive(Debug, Clone)]
pub struct OnnxModel {
    /// The network.
    pub graph: Graph,
    /// About the file.
    pub info: ModelInfo,
}

/// One IR node made by the importer (for `fisher inspect`).
#[derive(Debug, Clone, PartialEq)]
pub struct Layer {
    /// The ONNX node name.
    pub name: String,
    /// The IR operator's ONNX spelling.
    pub op: String,
    /// Per-sample output shape.
    pub output_shape: Vec<usize>,
}

/// One parameter (for `fisher inspect`).
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSummary {
    /// Initializer name.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Number of scalars.
    pub count: usize,
    /// The module: the name up to its last `.`.
    pub module: String,
}

/// A node the importer cannot convert.
#[derive(Debug, Clone, PartialEq)]
pub struct Unsupported {
    /// Node name (or its first output's).
    pub node: String,
    /// ONNX operator.
    pub op: String,
    /// Why.
    pub reason: String,
}

/// Everything `fisher inspect` shows: the file, the layers and parameters the importer
/// made, and every node it could not convert.
#[derive(Debug, Clone)]
pub struct Inspection {
    /// About the file.
    pub info: ModelInfo,
    /// IR nodes, in order (up to the unsupported ones).
    pub layers: Vec<Layer>,
    /// Parameters in θ order.
    pub params: Vec<ParamSummary>,
    /// Nodes that could not be converted (empty when the model imports).
    pub unsupported: Vec<Unsupported>,
    /// The graph, when every node converted.
    pub graph: Option<Graph>,
}

impl Inspection {
    /// The number of trainable scalars P of the parameters found.
    pub fn param_count(&self) -> usize {
        self.params.iter().map(|p| p.count).sum()
    }
}

/// Reads `path` as a network. `input_shape` is the per-sample shape of the data (`X.npy`'s
/// shape without its first axis); it is needed only when the file leaves a non-batch input
/// dimension symbolic or declares no shape, and must agree with the file's fixed dimensions.
/// The batch extent never matters: the graph is per sample.
pub fn load(path: &Path, input_shape: Option<&[usize]>) -> Result<OnnxModel> {
    let (info, converted) = import(path, input_shape, false)?;
    match converted.graph {
        Some(graph) => Ok(OnnxModel { graph, info }),
        // Strict mode returns on the first failing node; this is a guard.
        None => Err(FisherError::InvalidInput(format!("{}: the model could not be converted", path.display()))),
    }
}

/// Like [`load`], but every unsupported node is listed instead of failing at the first;
/// `Err` only for a file that cannot be read at all (or an input shape that cannot be
/// resolved).
pub fn inspect(path: &Path, input_shape: Option<&[usize]>) -> Result<Inspection> {
    let (info, c) = import(path, input_shape, true)?;
    Ok(Inspection { info, layers: c.layers, params: c.params, unsupported: c.unsupported, graph: c.graph })
}

/// Reads and decodes the file, within [`MAX_MODEL_BYTES`].
fn read_model(path: &Path) -> Result<proto::ModelProto> {
    let meta = std::fs::metadata(path).map_err(|e| FisherError::io(path, format!("cannot read: {e}")))?;
    if !meta.is_file() {
        return Err(FisherError::io(path, "not a regular file"));
    }
    if meta.len() > MAX_MODEL_BYTES {
        return Err(FisherError::io(
            path,
            format!("{} bytes is over the 2 GiB protobuf limit for an ONNX file (keep the tensors in external data)", meta.len()),
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| FisherError::io(path, format!("cannot read: {e}")))?;
    proto::ModelProto::decode(bytes.as_slice()).map_err(|e| {
        FisherError::io(path, format!("not an ONNX model (protobuf decoding failed: {})", e.to_string().replace('\n', " ")))
    })
}

fn import(path: &Path, input_shape: Option<&[usize]>, lenient: bool) -> Result<(ModelInfo, convert::Converted)> {
    let file = path.display().to_string();
    let bad = |m: String| FisherError::InvalidInput(format!("{file}: {m}"));
    let model = read_model(path)?;
    let opset = model
        .opset_import
        .iter()
        .filter(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .max()
        .ok_or_else(|| bad("declares no ai.onnx operator set".into()))?;
    let g = model.graph.as_ref().ok_or_else(|| bad("holds no graph".into()))?;
    let inits: HashSet<&str> = g.initializer.iter().map(|t| t.name.as_str()).collect();
    let inputs: Vec<&proto::ValueInfoProto> = g.input.iter().filter(|i| !inits.contains(i.name.as_str())).collect();
    let [input] = inputs[..] else {
        let names: Vec<&str> = inputs.iter().map(|i| i.name.as_str()).collect();
        return Err(bad(format!("the graph has {} inputs ({}); exactly one is supported", inputs.len(), names.join(", "))));
    };
    let [output] = &g.output[..] else {
        return Err(bad(format!("the graph has {} outputs; exactly one is supported", g.output.len())));
    };
    let tensor_type = input.r#type.as_ref().and_then(|t| t.tensor_type.as_ref());
    let input_type = match tensor_type.map(|t| t.elem_type) {
        Some(proto::data_type::FLOAT) => InputType::Float,
        Some(proto::data_type::INT64 | proto::data_type::INT32) => InputType::Integer,
        Some(t) => {
            return Err(bad(format!(
                "input {} is {}; only FLOAT (features) and INT64/INT32 (token indices) are supported",
                input.name,
                proto::data_type::name(t)
            )))
        }
        None => return Err(bad(format!("input {} is not a tensor", input.name))),
    };
    let declared: Vec<Dim> = tensor_type
        .and_then(|t| t.shape.as_ref())
        .map(|s| {
            s.dim
                .iter()
                .map(|d| match &d.value {
                    Some(proto::DimensionValue::DimValue(v)) if *v >= 0 => usize::try_from(*v).map_or(Dim::Unknown, Dim::Fixed),
                    Some(proto::DimensionValue::DimParam(p)) if !p.is_empty() => Dim::Symbolic(p.clone()),
                    _ => Dim::Unknown,
                })
                .collect()
        })
        .unwrap_or_default();
    let (batch, per_sample) = resolve_input(&input.name, &declared, input_shape).map_err(bad)?;
    let info = ModelInfo {
        ir_version: model.ir_version,
        opset,
        producer: format!("{} {}", model.producer_name, model.producer_version).trim().to_string(),
        input_name: input.name.clone(),
        input_type,
        declared_input: declared,
        input_shape: per_sample.clone(),
        output_name: output.name.clone(),
        nodes: g.node.len(),
        external_files: {
            let dir = path.parent().unwrap_or(Path::new("."));
            let mut files: Vec<PathBuf> = g
                .initializer
                .iter()
                .flat_map(|t| t.external_data.iter().filter(|kv| kv.key == "location" && !kv.value.is_empty()))
                .map(|kv| dir.join(&kv.value))
                .collect();
            files.sort();
            files.dedup();
            files
        },
    };
    let model_dir = path.parent().unwrap_or(Path::new("."));
    let converter =
        convert::Converter::new(file, model_dir, g, opset, lenient, batch, &input.name, &per_sample, input_type)?;
    let converted = converter.run(&output.name)?;
    Ok((info, converted))
}

/// The batch extent for folding and the per-sample input shape, from the declared shape and
/// the caller's per-sample shape.
fn resolve_input(name: &str, declared: &[Dim], given: Option<&[usize]>) -> std::result::Result<(usize, Vec<usize>), String> {
    let rank = match (declared.len(), given) {
        (0, Some(g)) => g.len() + 1,
        (0, None) => return Err(format!("input {name} declares no shape; pass the per-sample input shape")),
        (r, Some(g)) if g.len() + 1 != r => {
            return Err(format!("input {name} has shape {} but the data has per-sample shape {g:?}", show(declared)))
        }
        (r, _) => r,
    };
    let batch = match declared.first() {
        Some(Dim::Fixed(0)) => return Err(format!("input {name} declares a batch of 0")),
        Some(Dim::Fixed(b)) => *b,
        _ => SYMBOLIC_BATCH,
    };
    let mut per_sample = Vec::with_capacity(rank - 1);
    for k in 1..rank {
        let given_k = given.map(|g| g[k - 1]);
        let d = match (declared.get(k), given_k) {
            (Some(Dim::Fixed(d)), Some(g)) if *d != g => {
                return Err(format!(
                    "input {name} has shape {} but the data has per-sample shape {:?}",
                    show(declared),
                    given.unwrap_or(&[])
                ))
            }
            (Some(Dim::Fixed(d)), _) => *d,
            (_, Some(g)) => g,
            (dim, None) => {
                return Err(format!(
                    "dimension {k} of input {name} is {} ({}); pass the per-sample input shape",
                    if matches!(dim, Some(Dim::Symbolic(_))) { "symbolic" } else { "unknown" },
                    show(declared)
                ))
            }
        };
        per_sample.push(d);
    }
    Ok((batch, per_sample))
}

/// `[batch, 3, 32, 32]`.
fn show(dims: &[Dim]) -> String {
    format!("[{}]", dims.iter().map(Dim::to_string).collect::<Vec<_>>().join(", "))
}
