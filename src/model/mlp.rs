//! Building, loading, checking and saving [`Mlp`]s.
//!
//! ## The safetensors layout we read
//! `safetensors.torch.save_file(model.state_dict(), path)` for an `nn.Sequential` of `Linear`
//! layers and element-wise activation modules writes, per Linear layer at position `k` of the
//! Sequential, `k.weight` (out×in) and, unless `bias=False`, `k.bias` (out). The activation
//! modules have no parameters, so the indices skip (0, 2, 4, …); layers are ordered by the
//! numeric index, not by the key's spelling (`10` comes after `9`). A model wrapped in
//! another module saves its keys with a prefix (`model.0.weight`, `net.layers.0.weight`);
//! any prefix is accepted as long as every key has the same one. F32 and F64 tensors are read
//! (F64 is rounded to f32, the precision of every compute path).
//!
//! Activations are not stored in a state dict, so they come from an [`ActivationSpec`]: one
//! activation for every gap between layers, or a JSON list with one per gap.
//!
//! The indices also tell where the activation modules are: Linear layers at adjacent indices
//! (`0.weight`, `1.weight`, as in `nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))`) have no
//! module between them, so PyTorch applies nothing there and the loaded model has
//! [`Activation::Identity`] in that gap whatever the spec says; a gap of two or more indices
//! holds the activation (`Linear, Tanh, Linear` is 0, 2; `Linear, ReLU, Dropout, Linear` is
//! 0, 3). See [`ActivationSpec::for_layer_indices`].
//!
//! Every error is one line naming the file and the key (or layer) at fault.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use ndarray::{Array1, Array2, ArrayView1};
use safetensors::{Dtype, SafeTensors};

use super::{Activation, Linear, Mlp};
use crate::error::{FisherError, Result};
use crate::validate::quote;

/// `64-32-10 tanh MLP` from the widths (input, then each layer's output) and the activation
/// names, one per gap: one name when all gaps agree, else all of them joined by `/`
/// (`tanh/relu`); `linear` for a single layer. `None` (a stored result without the
/// activations in its metadata) leaves the activations out: `64-32-10 MLP`.
pub fn architecture_text(widths: &[usize], activations: Option<&[&str]>) -> String {
    let widths = widths.iter().map(usize::to_string).collect::<Vec<_>>().join("-");
    let Some(names) = activations else { return format!("{widths} MLP") };
    let mut distinct = names.to_vec();
    distinct.dedup();
    let act = match distinct.as_slice() {
        [] => "linear".to_string(),
        [one] => one.to_string(),
        _ => names.join("/"),
    };
    format!("{widths} {act} MLP")
}

/// Which activation follows each Linear layer but the last (in a model loaded from a state
/// dict, each Linear layer followed by an activation module; see
/// [`ActivationSpec::for_layer_indices`] for layers with none between them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActivationSpec {
    /// The same activation in every gap (`--activation tanh`).
    Uniform(Activation),
    /// One activation per gap, in layer order (from a JSON spec).
    PerGap(Vec<Activation>),
}

impl From<Activation> for ActivationSpec {
    fn from(activation: Activation) -> Self {
        ActivationSpec::Uniform(activation)
    }
}

impl std::str::FromStr for ActivationSpec {
    type Err = FisherError;
    fn from_str(text: &str) -> Result<Self> {
        ActivationSpec::parse(text)
    }
}

/// The message of an [`FisherError::InvalidInput`] without its "invalid input: " prefix, so
/// that it can be wrapped in a more specific message.
fn bare_message(error: FisherError) -> String {
    match error {
        FisherError::InvalidInput(message) => message,
        other => other.to_string(),
    }
}

impl ActivationSpec {
    /// Parses the CLI's `--activation` value, which is one of
    ///
    /// * a name, `relu|tanh|sigmoid|gelu|identity`, used in every gap;
    /// * an inline JSON spec, `["tanh","relu"]` or `{"activations": ["tanh","relu"]}` (one
    ///   name per gap, in layer order; see [`ActivationSpec::from_json`]);
    /// * the path of a file holding such a JSON spec.
    ///
    /// ```
    /// use fisher_engine::model::{Activation, ActivationSpec};
    /// assert_eq!(ActivationSpec::parse("tanh")?, ActivationSpec::Uniform(Activation::Tanh));
    /// assert_eq!(
    ///     ActivationSpec::parse(r#"["gelu", "relu"]"#)?,
    ///     ActivationSpec::PerGap(vec![Activation::Gelu, Activation::Relu])
    /// );
    /// assert!(ActivationSpec::parse("swish").is_err());
    /// # Ok::<(), fisher_engine::FisherError>(())
    /// ```
    pub fn parse(text: &str) -> Result<Self> {
        let trimmed = text.trim();
        if trimmed.starts_with('[') || trimmed.starts_with('{') || trimmed.starts_with('"') {
            return ActivationSpec::from_json(trimmed);
        }
        if let Ok(activation) = Activation::parse(trimmed) {
            return Ok(ActivationSpec::Uniform(activation));
        }
        let path = Path::new(trimmed);
        if path.is_file() || trimmed.ends_with(".json") {
            // The text may be a long spec that merely ends in .json: bound it as a name.
            let shown = quote(&path.display().to_string());
            let json = std::fs::read_to_string(path).map_err(|e| FisherError::Io {
                path: shown.clone(),
                message: format!("cannot read the activation spec: {e}"),
            })?;
            return ActivationSpec::from_json(&json)
                .map_err(|e| FisherError::InvalidInput(format!("{shown}: {}", bare_message(e))));
        }
        Err(FisherError::InvalidInput(format!(
            "unknown activation '{}' (expected relu, tanh, sigmoid, gelu or identity, a JSON \
             list with one per gap such as [\"tanh\",\"relu\"], or the path of a file holding one)",
            quote(trimmed)
        )))
    }

    /// Parses a JSON spec: a list of activation names, one per gap between Linear layers
    /// (`["tanh", "relu"]`), the same list under the key `activations`
    /// (`{"activations": ["tanh", "relu"]}`), or a single name as a JSON string (`"tanh"`,
    /// used in every gap).
    pub fn from_json(json: &str) -> Result<Self> {
        let value: serde_json::Value = serde_json::from_str(json)
            .map_err(|e| FisherError::InvalidInput(format!("the activation spec is not valid JSON: {e}")))?;
        let list = match &value {
            serde_json::Value::String(name) => {
                return Activation::parse(name).map(ActivationSpec::Uniform);
            }
            serde_json::Value::Array(list) => list,
            serde_json::Value::Object(map) => {
                if let Some(key) = map.keys().find(|k| k.as_str() != "activations") {
                    return Err(FisherError::InvalidInput(format!(
                        "unrecognized key '{}' in the activation spec (expected only \"activations\")",
                        quote(key)
                    )));
                }
                match map.get("activations") {
                    Some(serde_json::Value::Array(list)) => list,
                    _ => {
                        return Err(FisherError::InvalidInput(
                            "the activation spec needs \"activations\": a list of names".into(),
                        ))
                    }
                }
            }
            _ => {
                return Err(FisherError::InvalidInput(
                    "the activation spec must be a JSON list of names, e.g. [\"tanh\",\"relu\"]".into(),
                ))
            }
        };
        let activations = list
            .iter()
            .enumerate()
            .map(|(gap, entry)| {
                let name = entry.as_str().ok_or_else(|| {
                    FisherError::InvalidInput(format!(
                        "activation {gap} of the spec is {}, not a name such as \"tanh\"",
                        quote(&entry.to_string())
                    ))
                })?;
                Activation::parse(name).map_err(|e| {
                    FisherError::InvalidInput(format!("activation {gap} of the spec: {}", bare_message(e)))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ActivationSpec::PerGap(activations))
    }

    /// The activations for a model with `gaps` gaps (one fewer than its Linear layers);
    /// errors when a per-gap spec has another length. For a state dict, whose layer indices
    /// tell where the activation modules are, see [`ActivationSpec::for_layer_indices`].
    pub fn for_gaps(&self, gaps: usize) -> Result<Vec<Activation>> {
        match self {
            ActivationSpec::Uniform(activation) => Ok(vec![*activation; gaps]),
            ActivationSpec::PerGap(list) if list.len() == gaps => Ok(list.clone()),
            ActivationSpec::PerGap(list) => Err(FisherError::InvalidInput(format!(
                "the activation spec lists {} activation(s) but the model has {} Linear layer(s), \
                 so it needs exactly {gaps} (one between each pair of consecutive layers)",
                list.len(),
                gaps + 1
            ))),
        }
    }
}

/// Whether Linear layers at `nn.Sequential` indices `before` and `after` have a module (an
/// activation) between them: not when the indices are adjacent.
fn has_module_between(before: usize, after: usize) -> bool {
    after.saturating_sub(before) >= 2
}

impl ActivationSpec {
    /// The activations between Linear layers at the `nn.Sequential` indices `indices`
    /// (increasing), as PyTorch runs them: layers at adjacent indices (`0.weight`,
    /// `1.weight`) have no module between them, so that gap is [`Activation::Identity`];
    /// a gap of two or more indices holds the activation module.
    ///
    /// A uniform spec fills every gap that holds a module. A per-gap list names one
    /// activation per module (adjacent gaps are skipped), or one per gap with `identity` at
    /// the adjacent ones.
    ///
    /// ```
    /// use fisher_engine::model::{Activation::*, ActivationSpec};
    /// // nn.Sequential(Linear, Linear, Tanh, Linear): indices 0, 1, 3.
    /// assert_eq!(ActivationSpec::Uniform(Tanh).for_layer_indices(&[0, 1, 3])?, [Identity, Tanh]);
    /// assert_eq!(ActivationSpec::PerGap(vec![Relu]).for_layer_indices(&[0, 1, 3])?, [Identity, Relu]);
    /// assert!(ActivationSpec::PerGap(vec![Relu, Relu]).for_layer_indices(&[0, 1, 3]).is_err());
    /// # Ok::<(), fisher_engine::FisherError>(())
    /// ```
    pub fn for_layer_indices(&self, indices: &[usize]) -> Result<Vec<Activation>> {
        let modules: Vec<bool> = indices.windows(2).map(|w| has_module_between(w[0], w[1])).collect();
        let module_count = modules.iter().filter(|&&m| m).count();
        if module_count == modules.len() {
            return self.for_gaps(modules.len());
        }
        let adjacent: Vec<String> = indices
            .windows(2)
            .filter(|w| !has_module_between(w[0], w[1]))
            .map(|w| format!("{} and {}", w[0], w[1]))
            .collect();
        let per_module: Vec<Activation> = match self {
            ActivationSpec::Uniform(activation) => vec![*activation; module_count],
            ActivationSpec::PerGap(list) if list.len() == module_count => list.clone(),
            ActivationSpec::PerGap(list) if list.len() == modules.len() => {
                if let Some(gap) = (0..list.len()).find(|&g| !modules[g] && list[g] != Activation::Identity) {
                    return Err(FisherError::InvalidInput(format!(
                        "activation {gap} of the spec is {} but layers {} and {} are adjacent in the \
                         nn.Sequential, with no activation module between them (use identity there, or \
                         list only the {module_count} activation module(s))",
                        list[gap],
                        indices[gap],
                        indices[gap + 1]
                    )));
                }
                return Ok(list.clone());
            }
            ActivationSpec::PerGap(list) => {
                return Err(FisherError::InvalidInput(format!(
                    "the activation spec lists {} activation(s) but the model has {} Linear layer(s) with \
                     {module_count} activation module(s) between them (layers {} are adjacent, with none \
                     between them), so it needs exactly {module_count} (or {} with identity at the \
                     adjacent gaps)",
                    list.len(),
                    indices.len(),
                    quote(&adjacent.join(", ")),
                    modules.len()
                )))
            }
        };
        let mut per_module = per_module.into_iter();
        Ok(modules
            .iter()
            .map(|&module| if module { per_module.next().expect("one per module") } else { Activation::Identity })
            .collect())
    }
}

/// Which parameter of a layer a key names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ParamKind {
    Weight,
    Bias,
}

/// Splits `<prefix><index>.weight|bias` into (prefix, index, kind); `prefix` is empty or ends
/// with a dot. `None` for anything else (e.g. `0.running_mean`, `fc.weight`).
fn split_key(key: &str) -> Option<(&str, usize, ParamKind)> {
    let (rest, kind) = if let Some(rest) = key.strip_suffix(".weight") {
        (rest, ParamKind::Weight)
    } else {
        (key.strip_suffix(".bias")?, ParamKind::Bias)
    };
    let (prefix, digits) = match rest.rfind('.') {
        Some(dot) => (&rest[..=dot], &rest[dot + 1..]),
        None => ("", rest),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((prefix, digits.parse().ok()?, kind))
}

/// A tensor's values as f32, refusing other dtypes and values that are NaN/±Inf or beyond
/// the f32 range (an f64 1e300 would silently become inf).
fn tensor_values(key: &str, dtype: Dtype, bytes: &[u8]) -> std::result::Result<Vec<f32>, String> {
    let check = |index: usize, value: f64| -> std::result::Result<f32, String> {
        if !value.is_finite() {
            return Err(format!("non-finite value {value} in '{key}' at flat index {index}"));
        }
        let single = value as f32;
        if !single.is_finite() {
            return Err(format!(
                "value {value:e} in '{key}' at flat index {index} is beyond the float32 range"
            ));
        }
        Ok(single)
    };
    // Allocated at its final size: collecting into a Result grows the vector by doubling, so
    // that a large tensor would briefly need three times its size (and keep up to twice).
    fn convert<const W: usize>(
        bytes: &[u8],
        value: impl Fn([u8; W]) -> f64,
        check: impl Fn(usize, f64) -> std::result::Result<f32, String>,
    ) -> std::result::Result<Vec<f32>, String> {
        let mut values = Vec::with_capacity(bytes.len() / W);
        for (i, b) in bytes.chunks_exact(W).enumerate() {
            values.push(check(i, value(b.try_into().expect("chunks of W bytes")))?);
        }
        Ok(values)
    }
    match dtype {
        Dtype::F32 => convert(bytes, |b| f32::from_le_bytes(b) as f64, check),
        Dtype::F64 => convert(bytes, f64::from_le_bytes, check),
        other => Err(format!(
            "tensor '{key}' has dtype {other:?}; only F32 and F64 are supported \
             (save the model after model.float() or model.double())"
        )),
    }
}

/// Checks a model's structure; `prefix` is prepended to layer indices in messages so that
/// they name the keys of the file the model came from.
fn check_layers(
    layers: &[Linear],
    activations: &[Activation],
    prefix: &str,
) -> std::result::Result<(), String> {
    if layers.is_empty() {
        return Err("the model has no Linear layers".into());
    }
    if activations.len() + 1 != layers.len() {
        return Err(format!(
            "the model has {} Linear layer(s), so it needs {} activation(s) between them, but {} were given",
            layers.len(),
            layers.len() - 1,
            activations.len()
        ));
    }
    for pair in layers.windows(2) {
        if pair[1].index <= pair[0].index {
            return Err(format!(
                "layer indices must increase, but layer {prefix}{} follows layer {prefix}{}",
                pair[1].index, pair[0].index
            ));
        }
    }
    for (position, layer) in layers.iter().enumerate() {
        let name = format!("{prefix}{}", layer.index);
        let (out, fan_in) = layer.weight.dim();
        if out == 0 || fan_in == 0 {
            return Err(format!(
                "'{name}.weight' has shape [{out}, {fan_in}]: a Linear weight needs at least one row and one column"
            ));
        }
        if let Some(bias) = &layer.bias {
            if bias.len() != out {
                return Err(format!(
                    "'{name}.bias' has {} values but '{name}.weight' has {out} outputs (rows)",
                    bias.len()
                ));
            }
        }
        if position > 0 {
            let previous = &layers[position - 1];
            if previous.fan_out() != fan_in {
                return Err(format!(
                    "layer {name}.weight expects {fan_in} inputs but layer {prefix}{} produces {}",
                    previous.index,
                    previous.fan_out()
                ));
            }
        }
        // The branch-free scan first (an early-exit `find` does not vectorize: 0.8 % of
        // W3's MC KFAC); row-major iteration, so the flat index is PyTorch's (o·in + i).
        let finite = layer.weight.as_slice().is_some_and(crate::validate::all_finite);
        let bad = if finite { None } else { layer.weight.iter().enumerate().find(|(_, v)| !v.is_finite()) };
        if let Some((flat, value)) = bad {
            return Err(format!(
                "non-finite value {value} in '{name}.weight' at flat index {flat} (row {}, column {})",
                flat / fan_in,
                flat % fan_in
            ));
        }
        if let Some((flat, value)) = layer.bias.iter().flatten().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(format!("non-finite value {value} in '{name}.bias' at flat index {flat}"));
        }
    }
    Ok(())
}

impl Mlp {
    /// A checked model: at least one layer, `activations.len() == layers.len() − 1`, strictly
    /// increasing layer indices, non-empty weights, bias length = out, consecutive layers
    /// chaining (in of layer k+1 = out of layer k) and finite values.
    ///
    /// ```
    /// use fisher_engine::model::{Activation, Linear, Mlp};
    /// use ndarray::{array, Array2};
    /// let hidden = Linear { index: 0, weight: Array2::ones((4, 3)), bias: Some(array![0.0, 0.1, 0.2, 0.3]) };
    /// let output = Linear { index: 2, weight: Array2::ones((2, 4)), bias: None };
    /// let mlp = Mlp::new(vec![hidden, output], vec![Activation::Tanh])?;
    /// assert_eq!((mlp.input_dim(), mlp.output_dim(), mlp.num_params()), (3, 2, 3 * 4 + 4 + 4 * 2));
    /// assert_eq!(mlp.param_ranges(), [(0, 16), (16, 8)]);
    /// # Ok::<(), fisher_engine::FisherError>(())
    /// ```
    pub fn new(layers: Vec<Linear>, activations: Vec<Activation>) -> Result<Mlp> {
        let mlp = Mlp { layers, activations };
        mlp.validate()?;
        Ok(mlp)
    }

    /// Checks the invariants [`Mlp::new`] establishes (the fields are public, so a model can be
    /// built or edited without it). Every compute path calls this before using a model.
    pub fn validate(&self) -> Result<()> {
        check_layers(&self.layers, &self.activations, "").map_err(FisherError::InvalidInput)
    }

    /// Loads an `nn.Sequential` of Linear layers saved with
    /// `safetensors.torch.save_file(model.state_dict(), path)` (see the [module docs](self) for
    /// the accepted keys and dtypes), with activations from `activations`.
    ///
    /// Errors: [`FisherError::Io`] when the file cannot be read or is not safetensors;
    /// [`FisherError::InvalidInput`], starting with the path and naming the key, for an
    /// unsupported dtype, a key that is not `<prefix><index>.weight|bias`, keys with different
    /// prefixes, a bias without its weight, a weight that is not 2-D or a bias that is not 1-D
    /// of length out, layers that do not chain, NaN/±Inf values (with their flat index), and a
    /// per-gap activation spec of the wrong length.
    pub fn from_safetensors(path: &Path, activations: &ActivationSpec) -> Result<Mlp> {
        let io_error = |message: String| FisherError::Io { path: path.display().to_string(), message };
        let invalid = |message: String| FisherError::InvalidInput(format!("{}: {message}", path.display()));
        let bytes = std::fs::read(path).map_err(|e| io_error(format!("cannot read the model: {e}")))?;
        let file = SafeTensors::deserialize(&bytes).map_err(|e| {
            io_error(format!(
                "not a safetensors file ({}); save the model with safetensors.torch.save_file(model.state_dict(), path)",
                // The crate's message can quote a tensor's name, which can be anything.
                quote(&e.to_string())
            ))
        })?;

        // Sorted by key, so that the first problem reported does not depend on hash order.
        let mut tensors = file.tensors();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        if tensors.is_empty() {
            return Err(invalid("the file holds no tensors".into()));
        }

        struct Slot {
            weight: Option<(String, Array2<f32>)>,
            bias: Option<(String, Array1<f32>)>,
        }
        let mut slots: BTreeMap<usize, Slot> = BTreeMap::new();
        let mut common_prefix: Option<(String, String)> = None; // (prefix, the key it came from)
        for (key, view) in &tensors {
            // The key as messages show it (a file's keys can be any length and hold newlines).
            let shown = quote(key);
            let Some((prefix, index, kind)) = split_key(key) else {
                return Err(invalid(format!(
                    "unrecognized key '{shown}' (expected '<index>.weight' or '<index>.bias' of an \
                     nn.Sequential of Linear layers and activations)"
                )));
            };
            match &common_prefix {
                None => common_prefix = Some((prefix.to_string(), shown.clone())),
                Some((seen, first_key)) if seen != prefix => {
                    return Err(invalid(format!(
                        "key '{shown}' has prefix '{}' but '{first_key}' has prefix '{}'; \
                         all keys must share one prefix",
                        quote(prefix),
                        quote(seen)
                    )));
                }
                Some(_) => {}
            }
            let values = tensor_values(&shown, view.dtype(), view.data()).map_err(invalid)?;
            let shape = view.shape();
            let slot = slots.entry(index).or_insert(Slot { weight: None, bias: None });
            let duplicate = match kind {
                ParamKind::Weight => slot.weight.as_ref().map(|(k, _)| k.clone()),
                ParamKind::Bias => slot.bias.as_ref().map(|(k, _)| k.clone()),
            };
            if let Some(other) = duplicate {
                return Err(invalid(format!("keys '{other}' and '{shown}' name the same layer {index}")));
            }
            match kind {
                ParamKind::Weight => {
                    let [out, fan_in] = shape else {
                        return Err(invalid(format!(
                            "'{shown}' has shape {} but a Linear weight is 2-D (out×in)",
                            quote(&format!("{shape:?}"))
                        )));
                    };
                    let weight = Array2::from_shape_vec((*out, *fan_in), values)
                        .map_err(|e| invalid(format!("'{shown}': {e}")))?;
                    slot.weight = Some((shown.clone(), weight));
                }
                ParamKind::Bias => {
                    let [_] = shape else {
                        return Err(invalid(format!(
                            "'{shown}' has shape {} but a Linear bias is 1-D (out)",
                            quote(&format!("{shape:?}"))
                        )));
                    };
                    slot.bias = Some((shown.clone(), Array1::from(values)));
                }
            }
        }
        let prefix = common_prefix.map(|(p, _)| quote(&p)).unwrap_or_default();

        let mut layers = Vec::with_capacity(slots.len());
        for (index, slot) in slots {
            let Some((_, weight)) = slot.weight else {
                let bias_key = slot.bias.map(|(k, _)| k).unwrap_or_default();
                return Err(invalid(format!(
                    "'{bias_key}' has no matching '{prefix}{index}.weight' (missing weight)"
                )));
            };
            layers.push(Linear { index, weight, bias: slot.bias.map(|(_, b)| b) });
        }
        let indices: Vec<usize> = layers.iter().map(|l| l.index).collect();
        let activations = activations.for_layer_indices(&indices).map_err(|e| invalid(bare_message(e)))?;
        check_layers(&layers, &activations, &prefix).map_err(invalid)?;
        Ok(Mlp { layers, activations })
    }

    /// Writes the weights as `safetensors.torch.load_file` reads them: `<index>.weight`
    /// (out×in) and `<index>.bias` (out), F32, no prefix, so that
    /// `model.load_state_dict(load_file(path))` works for the matching `nn.Sequential`.
    /// Activations are not stored (PyTorch does not store them either).
    ///
    /// The file is written to a temporary file in the same directory and renamed into place,
    /// so `path` holds either the complete new file or what it held before.
    pub fn to_safetensors(&self, path: &Path) -> Result<()> {
        self.validate()?;
        let io_error = |message: String| FisherError::Io { path: path.display().to_string(), message };
        let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for layer in &self.layers {
            let weight_bytes = layer.weight.iter().flat_map(|v| v.to_le_bytes()).collect();
            owned.push((
                format!("{}.weight", layer.index),
                vec![layer.fan_out(), layer.fan_in()],
                weight_bytes,
            ));
            if let Some(bias) = &layer.bias {
                let bias_bytes = bias.iter().flat_map(|v| v.to_le_bytes()).collect();
                owned.push((format!("{}.bias", layer.index), vec![bias.len()], bias_bytes));
            }
        }
        let views = owned
            .iter()
            .map(|(name, shape, bytes)| {
                safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), bytes)
                    .map(|view| (name.as_str(), view))
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| io_error(format!("cannot build the safetensors data: {e}")))?;
        let bytes = safetensors::serialize(views, None)
            .map_err(|e| io_error(format!("cannot build the safetensors data: {e}")))?;

        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        // In the destination directory, so that the final rename stays on one file system.
        let mut temp = crate::io::output_temp_file(dir, "")
            .map_err(|e| io_error(format!("cannot write (directory {}): {e}", dir.display())))?;
        temp.write_all(&bytes).map_err(|e| io_error(format!("cannot write: {e}")))?;
        temp.as_file().sync_all().map_err(|e| io_error(format!("cannot write: {e}")))?;
        temp.persist(path).map_err(|e| io_error(format!("cannot write: {}", e.error)))?;
        Ok(())
    }

    /// P, the number of parameters (weights and biases of every layer).
    pub fn num_params(&self) -> usize {
        self.layers.iter().map(Linear::num_params).sum()
    }

    /// (start, length) of each layer's block in θ: its weight (row-major) then its bias.
    pub fn param_ranges(&self) -> Vec<(usize, usize)> {
        let mut start = 0;
        self.layers
            .iter()
            .map(|layer| {
                let range = (start, layer.num_params());
                start += layer.num_params();
                range
            })
            .collect()
    }

    /// d, the width of the input (in of the first layer; 0 for a model without layers).
    pub fn input_dim(&self) -> usize {
        self.layers.first().map_or(0, Linear::fan_in)
    }

    /// Layer widths: the input, then every layer's output (`[784, 512, 10]`).
    pub fn widths(&self) -> Vec<usize> {
        std::iter::once(self.input_dim()).chain(self.layers.iter().map(Linear::fan_out)).collect()
    }

    /// `64-32-10 tanh MLP` (see [`architecture_text`]).
    pub fn architecture(&self) -> String {
        let names: Vec<&str> = self.activations.iter().map(|a| a.name()).collect();
        architecture_text(&self.widths(), Some(&names))
    }

    /// The layer shapes alone, `16-32-4`, with the layers that have no bias named:
    /// `16-32-4 (no bias at layer 2)` (Sequential indices).
    pub fn shape_text(&self) -> String {
        let widths = self.widths().iter().map(usize::to_string).collect::<Vec<_>>().join("-");
        let unbiased: Vec<String> =
            self.layers.iter().filter(|l| l.bias.is_none()).map(|l| l.index.to_string()).collect();
        if unbiased.is_empty() {
            widths
        } else {
            format!("{widths} (no bias at layer {})", unbiased.join(", "))
        }
    }

    /// The width of the output (out of the last layer: classes, or the Gaussian's dimension).
    pub fn output_dim(&self) -> usize {
        self.layers.last().map_or(0, Linear::fan_out)
    }

    /// θ in PyTorch `named_parameters()` order: per layer the weight flattened row-major
    /// (index o·in + i), then the bias.
    pub fn parameters(&self) -> Array1<f32> {
        let mut theta = Vec::with_capacity(self.num_params());
        for layer in &self.layers {
            theta.extend(layer.weight.iter().copied());
            theta.extend(layer.bias.iter().flatten().copied());
        }
        Array1::from(theta)
    }

    /// The same architecture with parameters `theta` (in [`Mlp::parameters`] order); errors
    /// when the length is not P or a value is NaN/±Inf.
    pub fn with_parameters(&self, theta: ArrayView1<'_, f32>) -> Result<Mlp> {
        if theta.len() != self.num_params() {
            return Err(FisherError::InvalidInput(format!(
                "θ has {} values but the model has {} parameters",
                theta.len(),
                self.num_params()
            )));
        }
        let mut values = theta.iter().copied();
        let mut next = |n: usize| -> Vec<f32> { values.by_ref().take(n).collect() };
        let mut layers = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let weight = Array2::from_shape_vec(layer.weight.dim(), next(layer.weight.len()))
                .map_err(|e| FisherError::InvalidInput(format!("layer {}: {e}", layer.index)))?;
            let bias = layer.bias.as_ref().map(|b| Array1::from(next(b.len())));
            layers.push(Linear { index: layer.index, weight, bias });
        }
        Mlp::new(layers, self.activations.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_into_prefix_index_and_kind() {
        assert_eq!(split_key("0.weight"), Some(("", 0, ParamKind::Weight)));
        assert_eq!(split_key("12.bias"), Some(("", 12, ParamKind::Bias)));
        assert_eq!(split_key("model.2.weight"), Some(("model.", 2, ParamKind::Weight)));
        assert_eq!(split_key("net.layers.4.bias"), Some(("net.layers.", 4, ParamKind::Bias)));
        assert_eq!(split_key("fc.weight"), None);
        assert_eq!(split_key("0.running_mean"), None);
        assert_eq!(split_key(".weight"), None);
        assert_eq!(split_key("weight"), None);
        assert_eq!(split_key("1x.weight"), None);
    }
}
