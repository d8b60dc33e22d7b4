//! The Fisher result file: one writer ([`write()`]) and one reader ([`read()`]) for what
//! `fisher compute`, `fisher reduce` and `fisher demo` write and `fisher report --fisher`
//! reads.
//!
//! A safetensors file (little-endian f32, row-major) whose tensors are named by form:
//!
//! | form | tensors |
//! |---|---|
//! | full | `fisher` \[P, P\] |
//! | diag | `diag` \[P\] |
//! | gram (reduce) | `gram` \[N, N\] |
//! | blocks:a,b,… (reduce) | `block.0`, `block.1`, … \[P_b, P_b\] in parameter order |
//! | layer (compute) | `block.<index>` \[P_l, P_l\], index = the layer's index in the nn.Sequential |
//! | kfac (compute) | `kfac.<index>.A` \[in+1, in+1\] (in without bias), `kfac.<index>.G` \[out, out\] |
//! | grads (compute) | `grads` \[N·R, P\], F = GᵀG/N |
//! | norms | `norms` \[N\] (their mean is tr F) |
//!
//! A graph model's result (`fisher compute --model M.onnx`) names its parts by the PyTorch
//! names instead: `diag` is followed by `diag.<parameter>` shaped like the parameter (so
//! `safetensors.torch.load_file` gives a dict ready for an EWC penalty), blocks are
//! `block.<module>` (the parameters sharing a name prefix, e.g. `conv1.weight` and
//! `conv1.bias` form `conv1`), KFAC factors `kfac.<module>.A` / `.G`; the metadata adds
//! `parameter_names` and `parameter_shapes` (JSON lists, in the order of the flat `diag`,
//! `fisher` and `grads`), and `modules` (layer) or `kfac_modules` (kfac), the names in
//! block order.
//!
//! and whose string metadata records, for every file: `form` (the command-line spelling),
//! `samples`, `parameters`, `backend` (the backend's label), `normalization` and
//! `fisher_engine_version`; for a network's Fisher also `variant`, `likelihood`,
//! `rows_per_sample`, `activations` (a JSON list), `layers` (the widths, a JSON list),
//! `layer_indices` (a JSON list), `param_order`, with `mc_samples` and `seed` for
//! `--variant mc` and `kfac_layout` for kfac.
//!
//! The reader accepts any file with these tensors: without a `form` key the form is told by
//! the tensor names; other metadata keys are optional (see the accessors of [`FisherFile`]).
//!
//! ```
//! use fisher_engine::io::fisher_file::{self, FisherFile};
//! use fisher_engine::{Engine, Form};
//! # let dir = tempfile::tempdir()?;
//! # let path = dir.path().join("F.safetensors");
//! let g = fisher_engine::synthetic::gradient_like(64, 5, 1);
//! let result = Engine::cpu().fisher_from_grads(g.view(), &Form::Diagonal)?;
//! fisher_file::write(&path, &FisherFile::of_reduction(result, &Form::Diagonal, 64, 5, "cpu"))?;
//! let back = fisher_file::read(&path)?;
//! assert_eq!((back.form(), back.samples(), back.parameters()), ("diag", Some(64), Some(5)));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use ndarray::{Array1, Array2, Dimension};
use serde_json::json;

use crate::error::{FisherError, Result};
use crate::fisher::{rows_per_sample, FisherMatrix, Form, KfacFactors, NetFisher, NetForm, Variant};
use crate::model::{architecture_text, Likelihood, Mlp};

use super::safetensors::{read_safetensors, write_tensor_refs, TensorRef};
use crate::validate::quote;

/// Metadata note on θ's order (`param_order`).
pub const PARAM_ORDER_NOTE: &str = "pytorch named_parameters; weight row-major then bias";

/// Metadata note on the KFAC factors' layout (`kfac_layout`).
pub const KFAC_LAYOUT_NOTE: &str = "block ≈ G ⊗ A in [W|b] row-major order; see kfac_expand";

/// The tensors of a result, typed by form.
#[derive(Debug, Clone, PartialEq)]
pub enum Tensors {
    /// `fisher`: F (P×P).
    Full(Array2<f32>),
    /// `diag`: diag(F) (P).
    Diagonal(Array1<f32>),
    /// `gram`: K = GGᵀ/N (N×N).
    Gram(Array2<f32>),
    /// `block.<index>`: diagonal blocks of F by index (0, 1, … for reduce's blocks; the
    /// layers' Sequential indices for compute's layer form), in index order.
    Blocks(Vec<(usize, Array2<f32>)>),
    /// `kfac.<index>.A` and `kfac.<index>.G` by layer index, in index order.
    Kfac(Vec<(usize, KfacFactors)>),
    /// `grads`: the per-sample gradient rows (N·R×P) with F = GᵀG/N.
    Grads(Array2<f32>),
    /// `norms`: per-sample squared gradient norms (N).
    Norms(Array1<f32>),
}

/// A Fisher result file in memory: its tensors and its metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct FisherFile {
    /// The tensors.
    pub tensors: Tensors,
    /// The metadata, as stored (keys in the [module docs](self)).
    pub metadata: HashMap<String, String>,
    /// The form: `metadata["form"]`, or told by the tensor names when that key is missing.
    form: String,
}

/// The metadata of a network's Fisher file ([`FisherFile::of_network`]) of `form` for `mlp`
/// on `samples` inputs: also what a shard's partial file carries for its merged result.
pub fn network_metadata(form: NetForm, mlp: &Mlp, samples: usize, likelihood: Likelihood, variant: Variant, backend: &str) -> HashMap<String, String> {
    let rows = rows_per_sample(variant, mlp.output_dim());
    let normalization = match form {
        NetForm::Grads => format!(
            "rows scaled so that F = GᵀG/N; row i·{rows} + r is output row r of sample i ({rows} per sample)"
        ),
        NetForm::Norms => "none: per-sample Σ_r ‖g_ir‖² (their mean is tr F)".to_string(),
        _ => "1/N (mean over samples)".to_string(),
    };
    let indices: Vec<usize> = mlp.layers.iter().map(|l| l.index).collect();
    let mut metadata = HashMap::from([
        ("form".to_string(), form.name().to_string()),
        ("variant".to_string(), variant.name().to_string()),
        ("likelihood".to_string(), likelihood.name().to_string()),
        ("samples".to_string(), samples.to_string()),
        ("parameters".to_string(), mlp.num_params().to_string()),
        ("rows_per_sample".to_string(), rows.to_string()),
        ("backend".to_string(), backend.to_string()),
        ("activations".to_string(), json!(mlp.activations.iter().map(|a| a.name()).collect::<Vec<_>>()).to_string()),
        ("layers".to_string(), json!(mlp.widths()).to_string()),
        ("layer_indices".to_string(), json!(indices).to_string()),
        ("param_order".to_string(), PARAM_ORDER_NOTE.to_string()),
        ("normalization".to_string(), normalization),
        ("fisher_engine_version".to_string(), env!("CARGO_PKG_VERSION").to_string()),
    ]);
    if let Variant::MonteCarlo { samples: k, seed } = variant {
        metadata.insert("mc_samples".into(), k.to_string());
        metadata.insert("seed".into(), seed.to_string());
    }
    if form == NetForm::Kfac {
        metadata.insert("kfac_layout".into(), KFAC_LAYOUT_NOTE.to_string());
    }
    metadata
}

/// The metadata of the file of a reduction ([`FisherFile::of_reduction`]) of `form` over
/// N = `samples` rows of P = `parameters` on `backend`: known before the result, so that a
/// full F can be written band by band.
pub fn reduction_metadata(form: &Form, samples: usize, parameters: usize, backend: &str) -> HashMap<String, String> {
    let normalization = match form {
        Form::SampleNorms => "none: squared norms of the per-sample gradients",
        _ => "1/N (mean over samples)",
    };
    HashMap::from([
        ("form".to_string(), form.to_string()),
        ("samples".to_string(), samples.to_string()),
        ("parameters".to_string(), parameters.to_string()),
        ("normalization".to_string(), normalization.to_string()),
        ("backend".to_string(), backend.to_string()),
        ("fisher_engine_version".to_string(), env!("CARGO_PKG_VERSION").to_string()),
    ])
}

/// The tensors (name, shape) of the file [`FisherFile::of_network`] writes for a result of
/// `form` of `mlp`, in the order of [`crate::fisher::sink`] (so that a result put piece by
/// piece lands in the same file); `None` for the per-sample forms.
pub fn network_tensors(form: NetForm, mlp: &Mlp) -> Option<Vec<(String, Vec<usize>)>> {
    let shapes = crate::fisher::sink::tensor_shapes(form, &crate::fisher::SumLayer::of(mlp))?;
    let indices: Vec<usize> = mlp.layers.iter().map(|l| l.index).collect();
    let names: Vec<String> = match form {
        NetForm::Full => vec!["fisher".into()],
        NetForm::Diagonal => vec!["diag".into()],
        NetForm::Layer => indices.iter().map(|i| format!("block.{i}")).collect(),
        NetForm::Kfac => indices.iter().flat_map(|i| [format!("kfac.{i}.A"), format!("kfac.{i}.G")]).collect(),
        NetForm::Grads | NetForm::Norms => return None,
    };
    Some(names.into_iter().zip(shapes).collect())
}

impl FisherFile {
    /// The file of a reduction of per-sample gradients (`fisher reduce`) of `form` over
    /// N = `samples` rows of P = `parameters`, computed on `backend` (its label).
    pub fn of_reduction(result: FisherMatrix, form: &Form, samples: usize, parameters: usize, backend: &str) -> Self {
        let tensors = match result {
            FisherMatrix::Full(m) => Tensors::Full(m),
            FisherMatrix::Diagonal(d) => Tensors::Diagonal(d),
            FisherMatrix::Gram(k) => Tensors::Gram(k),
            FisherMatrix::SampleNorms(n) => Tensors::Norms(n),
            FisherMatrix::BlockDiagonal(blocks) => Tensors::Blocks(blocks.into_iter().enumerate().collect()),
        };
        let metadata = reduction_metadata(form, samples, parameters, backend);
        FisherFile { tensors, metadata, form: form.to_string() }
    }

    /// The file of a network's Fisher (`fisher compute`, `fisher demo`): `result` of `mlp` on
    /// `samples` inputs, for `likelihood` and `variant`, computed on `backend` (its label).
    pub fn of_network(
        result: NetFisher,
        mlp: &Mlp,
        samples: usize,
        likelihood: Likelihood,
        variant: Variant,
        backend: &str,
    ) -> Self {
        let form = result.form();
        let metadata = network_metadata(form, mlp, samples, likelihood, variant, backend);
        let indices: Vec<usize> = mlp.layers.iter().map(|l| l.index).collect();
        let tensors = match result {
            NetFisher::Full(m) => Tensors::Full(m),
            NetFisher::Diagonal(d) => Tensors::Diagonal(d),
            NetFisher::Grads(g) => Tensors::Grads(g),
            NetFisher::Norms(n) => Tensors::Norms(n),
            NetFisher::Layer(blocks) => Tensors::Blocks(indices.iter().copied().zip(blocks).collect()),
            NetFisher::Kfac(factors) => Tensors::Kfac(indices.iter().copied().zip(factors).collect()),
        };
        FisherFile { tensors, metadata, form: form.name().to_string() }
    }

    /// The file of a network's Fisher `result` with the given `metadata` (from
    /// [`network_metadata`]): how `fisher merge` writes what the single run would have.
    pub fn of_network_with(result: NetFisher, layer_indices: &[usize], metadata: HashMap<String, String>) -> Self {
        let form = result.form();
        let tensors = match result {
            NetFisher::Full(m) => Tensors::Full(m),
            NetFisher::Diagonal(d) => Tensors::Diagonal(d),
            NetFisher::Grads(g) => Tensors::Grads(g),
            NetFisher::Norms(n) => Tensors::Norms(n),
            NetFisher::Layer(blocks) => Tensors::Blocks(layer_indices.iter().copied().zip(blocks).collect()),
            NetFisher::Kfac(factors) => Tensors::Kfac(layer_indices.iter().copied().zip(factors).collect()),
        };
        FisherFile { tensors, metadata, form: form.name().to_string() }
    }

    /// The file of a graph network's Fisher (`fisher compute --model`): `result` over the
    /// `selection`'s parameters of `model`, on `samples` inputs.
    pub fn of_graph(
        result: NetFisher,
        model: &crate::graph::fisher::GraphModel,
        selection: &crate::graph::fisher::Selection,
        samples: usize,
        likelihood: Likelihood,
        variant: Variant,
        backend: &str,
    ) -> Self {
        let graph = &model.graph;
        let form = result.form();
        let rows = rows_per_sample(variant, graph.outputs());
        let normalization = match form {
            NetForm::Grads => format!(
                "rows scaled so that F = GᵀG/N; row i·{rows} + r is output row r of sample i ({rows} per sample)"
            ),
            NetForm::Norms => "none: per-sample Σ_r ‖g_ir‖² (their mean is tr F)".to_string(),
            _ => "1/N (mean over samples)".to_string(),
        };
        let names: Vec<&str> = selection.0.iter().map(|&i| graph.params[i].name.as_str()).collect();
        let shapes: Vec<&Vec<usize>> = selection.0.iter().map(|&i| &graph.params[i].shape).collect();
        let mut metadata = HashMap::from([
            ("form".to_string(), form.name().to_string()),
            ("variant".to_string(), variant.name().to_string()),
            ("likelihood".to_string(), likelihood.name().to_string()),
            ("samples".to_string(), samples.to_string()),
            ("parameters".to_string(), selection.count(graph).to_string()),
            ("rows_per_sample".to_string(), rows.to_string()),
            ("backend".to_string(), backend.to_string()),
            ("parameter_names".to_string(), json!(names).to_string()),
            ("parameter_shapes".to_string(), json!(shapes).to_string()),
            ("param_order".to_string(), "the ONNX initializers' order (PyTorch named_parameters); each row-major".to_string()),
            ("normalization".to_string(), normalization),
            ("fisher_engine_version".to_string(), env!("CARGO_PKG_VERSION").to_string()),
        ]);
        if let Variant::MonteCarlo { samples: k, seed } = variant {
            metadata.insert("mc_samples".into(), k.to_string());
            metadata.insert("seed".into(), seed.to_string());
        }
        let tensors = match result {
            NetFisher::Full(m) => Tensors::Full(m),
            NetFisher::Diagonal(d) => Tensors::Diagonal(d),
            NetFisher::Grads(g) => Tensors::Grads(g),
            NetFisher::Norms(n) => Tensors::Norms(n),
            NetFisher::Layer(blocks) => {
                let modules: Vec<String> = crate::graph::fisher::selected_modules(graph, selection).into_iter().map(|m| m.0).collect();
                metadata.insert("modules".into(), json!(modules).to_string());
                Tensors::Blocks(blocks.into_iter().enumerate().collect())
            }
            NetFisher::Kfac(factors) => {
                // The factors cover the Linear/Conv layers' weights and biases only.
                let covered: usize = factors.iter().map(|f| f.a.nrows() * f.g.nrows()).sum();
                metadata.insert("parameters".into(), covered.to_string());
                metadata.insert("model_parameters".into(), selection.count(graph).to_string());
                let modules: Vec<String> = crate::graph::fisher::kfac_sites(model, selection).into_iter().map(|m| m.0).collect();
                metadata.insert("kfac_modules".into(), json!(modules).to_string());
                metadata.insert(
                    "kfac_layout".into(),
                    "block ≈ G ⊗ A in [W|b] row-major order, W as out × (in, or Cin·kh·kw); A sums over positions, G averages over them (KFC expand)".to_string(),
                );
                Tensors::Kfac(factors.into_iter().enumerate().collect())
            }
        };
        FisherFile { tensors, metadata, form: form.name().to_string() }
    }

    /// A JSON list of names in the metadata (`modules`, `kfac_modules`, `parameter_names`).
    fn name_list(&self, key: &str) -> Option<Vec<String>> {
        serde_json::from_str(self.metadata.get(key)?).ok()
    }

    /// The name of block or KFAC layer `i` in tensor names: the module name of a graph
    /// model's file, else the index.
    fn part_name(&self, key: &str, i: usize) -> String {
        self.name_list(key).and_then(|names| names.get(i).cloned()).unwrap_or_else(|| i.to_string())
    }

    /// The form as spelled in the metadata (`full`, `kfac`, `blocks:3,5`, …), or told by the
    /// tensor names when the file has no `form` key.
    pub fn form(&self) -> &str {
        &self.form
    }

    fn parsed<T: serde::de::DeserializeOwned>(&self, key: &str) -> Option<T> {
        serde_json::from_str(self.metadata.get(key)?).ok()
    }

    /// N (`samples`).
    pub fn samples(&self) -> Option<usize> {
        self.metadata.get("samples")?.parse().ok()
    }

    /// P (`parameters`).
    pub fn parameters(&self) -> Option<usize> {
        self.metadata.get("parameters")?.parse().ok()
    }

    /// The label of the backend that computed it (`backend`).
    pub fn backend(&self) -> Option<&str> {
        self.metadata.get("backend").map(String::as_str)
    }

    /// The variant (`variant`, with `mc_samples` and `seed` for mc).
    pub fn variant(&self) -> Option<Variant> {
        match self.metadata.get("variant")?.parse::<Variant>().ok()? {
            Variant::MonteCarlo { .. } => Some(Variant::MonteCarlo {
                samples: self.metadata.get("mc_samples")?.parse().ok()?,
                seed: self.metadata.get("seed")?.parse().ok()?,
            }),
            other => Some(other),
        }
    }

    /// The likelihood (`likelihood`).
    pub fn likelihood(&self) -> Option<Likelihood> {
        self.metadata.get("likelihood")?.parse().ok()
    }

    /// Layer widths: input, then each layer's output (`layers`).
    pub fn widths(&self) -> Option<Vec<usize>> {
        self.parsed("layers")
    }

    /// The layers' Sequential indices (`layer_indices`).
    pub fn layer_indices(&self) -> Option<Vec<usize>> {
        self.parsed("layer_indices")
    }

    /// Activation names, one per gap (`activations`).
    pub fn activations(&self) -> Option<Vec<String>> {
        self.parsed("activations")
    }

    /// `6-12-3 tanh MLP` from `widths` (the file's own, else these) and the activations in
    /// the metadata; `None` without widths.
    pub fn architecture(&self, widths: Option<&[usize]>) -> Option<String> {
        let own = self.widths();
        let widths = own.as_deref().or(widths)?;
        let names = self.activations().filter(|n| !n.is_empty());
        let names: Option<Vec<&str>> = names.as_ref().map(|n| n.iter().map(String::as_str).collect());
        Some(architecture_text(widths, names.as_deref()))
    }

    /// The tensors' names and shapes, in the order of [`Tensors`] (blocks and layers by
    /// index, A before G).
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.tensor_refs().into_iter().map(|(name, shape, _)| (name, shape)).collect()
    }

    /// tr F: the trace of F, of its blocks, or of K (= tr F); the sum of diag(F); the mean of
    /// the norms; Σ‖row‖²/N for the gradient rows (whatever R is); Σ_l tr(G_l)·tr(A_l) =
    /// tr(G ⊗ A) for kfac.
    pub fn trace(&self) -> f64 {
        let tr = |m: &Array2<f32>| m.diag().iter().map(|&v| f64::from(v)).sum::<f64>();
        match &self.tensors {
            Tensors::Full(m) | Tensors::Gram(m) => tr(m),
            Tensors::Diagonal(d) => d.iter().map(|&v| f64::from(v)).sum(),
            Tensors::Blocks(blocks) => blocks.iter().map(|(_, b)| tr(b)).sum(),
            Tensors::Kfac(factors) => factors.iter().map(|(_, f)| tr(&f.a) * tr(&f.g)).sum(),
            Tensors::Norms(n) => n.iter().map(|&v| f64::from(v)).sum::<f64>() / n.len().max(1) as f64,
            Tensors::Grads(g) => {
                let samples = self.samples().unwrap_or(g.nrows()).max(1);
                g.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / samples as f64
            }
        }
    }

    /// The tensors as written: names, shapes and borrowed row-major values.
    fn tensor_refs(&self) -> Vec<TensorRef<'_>> {
        fn matrix<'a>(name: String, m: &'a Array2<f32>) -> TensorRef<'a> {
            (name, vec![m.nrows(), m.ncols()], row_major(m))
        }
        fn vector<'a>(name: &str, v: &'a Array1<f32>) -> TensorRef<'a> {
            (name.to_string(), vec![v.len()], row_major(v))
        }
        match &self.tensors {
            Tensors::Full(m) => vec![matrix("fisher".into(), m)],
            Tensors::Gram(m) => vec![matrix("gram".into(), m)],
            Tensors::Grads(m) => vec![matrix("grads".into(), m)],
            Tensors::Diagonal(d) => {
                let mut out = vec![vector("diag", d)];
                // A graph model's file: also each parameter's slice, shaped like it.
                let shapes: Option<Vec<Vec<usize>>> = self.metadata.get("parameter_shapes").and_then(|t| serde_json::from_str(t).ok());
                if let (Some(names), Some(shapes), Some(values)) = (self.name_list("parameter_names"), shapes, d.as_slice()) {
                    let mut at = 0;
                    for (name, shape) in names.into_iter().zip(shapes) {
                        let len: usize = shape.iter().product();
                        if let Some(part) = values.get(at..at + len) {
                            out.push((format!("diag.{name}"), shape, Cow::Borrowed(part)));
                        }
                        at += len;
                    }
                }
                out
            }
            Tensors::Norms(n) => vec![vector("norms", n)],
            Tensors::Blocks(blocks) => blocks.iter().map(|(i, b)| matrix(format!("block.{}", self.part_name("modules", *i)), b)).collect(),
            Tensors::Kfac(factors) => factors
                .iter()
                .flat_map(|(i, f)| {
                    let name = self.part_name("kfac_modules", *i);
                    [matrix(format!("kfac.{name}.A"), &f.a), matrix(format!("kfac.{name}.G"), &f.g)]
                })
                .collect(),
        }
    }
}

/// An array's values in logical row-major order: borrowed when the array is one contiguous
/// row-major buffer (every result this crate computes), copied otherwise.
fn row_major<D: Dimension>(a: &ndarray::Array<f32, D>) -> Cow<'_, [f32]> {
    match a.as_slice() {
        Some(values) => Cow::Borrowed(values),
        None => Cow::Owned(a.iter().copied().collect()),
    }
}

/// Writes `file` to `path` atomically (a temporary file renamed into place; see
/// [`super::output`]); the values are not copied.
pub fn write(path: &Path, file: &FisherFile) -> Result<()> {
    write_tensor_refs(path, &file.tensor_refs(), Some(file.metadata.clone()))
}

/// `block.<i>` / `kfac.<i>.A`: the integer after the prefix.
fn index_of(name: &str, prefix: &str) -> Option<usize> {
    name.strip_prefix(prefix)?.split('.').next()?.parse().ok()
}

/// Reads a Fisher result file.
///
/// Errors ([`FisherError::Io`], naming the file): not a safetensors file; a form the file
/// does not hold (missing, unexpected, misnamed or misshapen tensors: every matrix must be
/// square except `grads`, `diag` and `norms` must be vectors, and none may be empty); an
/// unknown form; and, through [`read_safetensors`], a dtype other than F32/F64 or a non-finite
/// value ([`FisherError::InvalidInput`]). Then [`check_consistent`] refuses what no Fisher
/// computation can produce, naming the tensor: shapes that disagree with the metadata, a
/// negative diagonal entry, a matrix that is not symmetric.
pub fn read(path: &Path) -> Result<FisherFile> {
    let (named, metadata) = read_safetensors(path)?;
    let bad = |message: String| FisherError::io(path, message);
    let names: Vec<&str> = named.iter().map(|t| t.0.as_str()).collect();
    let form = match metadata.get("form") {
        Some(f) => f.clone(),
        None => match names.as_slice() {
            ["fisher"] => "full".into(),
            ["diag"] => "diag".into(),
            ["gram"] => "gram".into(),
            ["grads"] => "grads".into(),
            ["norms"] => "norms".into(),
            _ if !names.is_empty() && names.iter().all(|n| n.starts_with("block.")) => "layer".into(),
            _ if !names.is_empty() && names.iter().all(|n| n.starts_with("kfac.")) => "kfac".into(),
            _ => {
                return Err(bad(format!(
                    "no 'form' in the metadata and the tensors ({}) are not a Fisher form",
                    quote(&names.join(", "))
                )))
            }
        },
    };
    // The form as messages show it: the metadata can hold any text.
    let shown_form = quote(&form);
    let mut by_name: BTreeMap<String, (Vec<usize>, Vec<f32>)> =
        named.into_iter().map(|(name, shape, values)| (name, (shape, values))).collect();
    // A graph model's file names blocks and KFAC layers by module (`modules`,
    // `kfac_modules`): back to their indices; and its per-parameter `diag.<name>` tensors
    // repeat slices of `diag` (checked below, then dropped).
    let list = |key: &str| -> Result<Option<Vec<String>>> {
        match metadata.get(key) {
            None => Ok(None),
            Some(text) => serde_json::from_str(text).map(Some).map_err(|_| bad(format!("metadata '{key}' is not a JSON list of names"))),
        }
    };
    for (key, prefix) in [("modules", "block."), ("kfac_modules", "kfac.")] {
        if let Some(modules) = list(key)? {
            // A fresh map: renaming in place could collide (module `10` → index 4 while a
            // module `4` is still to be renamed).
            let renamed = |name: &str| -> Option<String> {
                let rest = name.strip_prefix(prefix)?;
                let (module, suffix) = if prefix == "kfac." {
                    let (m, s) = rest.rsplit_once('.')?;
                    (m, format!(".{s}"))
                } else {
                    (rest, String::new())
                };
                let i = modules.iter().position(|m| m == module)?;
                Some(format!("{prefix}{i}{suffix}"))
            };
            by_name = std::mem::take(&mut by_name)
                .into_iter()
                .map(|(name, v)| (renamed(&name).unwrap_or(name), v))
                .collect();
        }
    }
    let per_parameter: Vec<(String, (Vec<usize>, Vec<f32>))> = match list("parameter_names")? {
        Some(names) if form == "diag" => names
            .iter()
            .filter_map(|n| by_name.remove(&format!("diag.{n}")).map(|v| (n.clone(), v)))
            .collect(),
        _ => Vec::new(),
    };
    let mut take = |name: &str| {
        by_name.remove(name).ok_or_else(|| bad(format!("the {shown_form} form needs a tensor '{name}', which is missing")))
    };
    let shape_text = |shape: &[usize]| quote(&format!("{shape:?}"));
    let nonempty = |name: &str, shape: &[usize]| {
        if shape.contains(&0) {
            Err(bad(format!("tensor '{}' is empty (shape {})", quote(name), shape_text(shape))))
        } else {
            Ok(())
        }
    };
    let matrix = |name: &str, shape: &[usize], values: Vec<f32>, square: bool| match shape {
        [r, c] if !square || r == c => {
            nonempty(name, shape)?;
            // safetensors checked ∏ shape = values.len(); ndarray's own bound (isize) is
            // checked here rather than trusted.
            Array2::from_shape_vec((*r, *c), values)
                .map_err(|e| bad(format!("tensor '{}' has shape {}: {e}", quote(name), shape_text(shape))))
        }
        _ => Err(bad(format!(
            "tensor '{}' has shape {}, expected {}",
            quote(name),
            shape_text(shape),
            if square { "a square matrix" } else { "a matrix" }
        ))),
    };
    let square = |name: &str, shape: &[usize], values: Vec<f32>| matrix(name, shape, values, true);
    let vector = |name: &str, shape: &[usize], values: Vec<f32>| match shape {
        [_] => nonempty(name, shape).map(|()| Array1::from(values)),
        _ => Err(bad(format!("tensor '{}' has shape {}, expected a vector", quote(name), shape_text(shape)))),
    };
    let unexpected = |name: &str| bad(format!("unexpected tensor '{}' in a {shown_form} form", quote(name)));
    let kind = if form.starts_with("blocks:") { "layer" } else { form.as_str() };
    let tensors = match kind {
        "full" => {
            let (shape, values) = take("fisher")?;
            Tensors::Full(square("fisher", &shape, values)?)
        }
        "gram" => {
            let (shape, values) = take("gram")?;
            Tensors::Gram(square("gram", &shape, values)?)
        }
        "diag" => {
            let (shape, values) = take("diag")?;
            let diag = vector("diag", &shape, values)?;
            let mut at = 0;
            for (name, (shape, values)) in &per_parameter {
                let part = diag.as_slice().and_then(|d| d.get(at..at + values.len()));
                if part != Some(values.as_slice()) || shape.iter().product::<usize>() != values.len() {
                    return Err(bad(format!("tensor 'diag.{}' disagrees with its slice of 'diag'", quote(name))));
                }
                at += values.len();
            }
            Tensors::Diagonal(diag)
        }
        "norms" => {
            let (shape, values) = take("norms")?;
            Tensors::Norms(vector("norms", &shape, values)?)
        }
        "grads" => {
            let (shape, values) = take("grads")?;
            Tensors::Grads(matrix("grads", &shape, values, false)?)
        }
        "layer" => {
            let mut blocks = Vec::new();
            for (name, (shape, values)) in std::mem::take(&mut by_name) {
                // Only the spelling the writer uses: `block.04` would be a second block 4.
                let Some(i) = index_of(&name, "block.").filter(|i| name == format!("block.{i}")) else {
                    return Err(unexpected(&name));
                };
                blocks.push((i, square(&name, &shape, values)?));
            }
            if blocks.is_empty() {
                return Err(bad("the layer form holds no 'block.<i>' tensors".into()));
            }
            blocks.sort_by_key(|b| b.0);
            Tensors::Blocks(blocks)
        }
        "kfac" => {
            // Per layer index: (A, G) as they are found.
            type Slots = (Option<Array2<f32>>, Option<Array2<f32>>);
            let mut pairs: BTreeMap<usize, Slots> = BTreeMap::new();
            for (name, (shape, values)) in std::mem::take(&mut by_name) {
                let Some(i) = index_of(&name, "kfac.") else { return Err(unexpected(&name)) };
                let m = square(&name, &shape, values)?;
                let slot = pairs.entry(i).or_default();
                if name == format!("kfac.{i}.A") {
                    slot.0 = Some(m);
                } else if name == format!("kfac.{i}.G") {
                    slot.1 = Some(m);
                } else {
                    return Err(unexpected(&name));
                }
            }
            let mut factors = Vec::with_capacity(pairs.len());
            for (i, (a, g)) in pairs {
                let (Some(a), Some(g)) = (a, g) else {
                    return Err(bad(format!("layer {i} needs both kfac.{i}.A and kfac.{i}.G")));
                };
                factors.push((i, KfacFactors { a, g }));
            }
            if factors.is_empty() {
                return Err(bad("the kfac form holds no 'kfac.<i>.A/G' tensors".into()));
            }
            Tensors::Kfac(factors)
        }
        _ => return Err(bad(format!("unknown form '{shown_form}' in the metadata"))),
    };
    if let Some(name) = by_name.keys().next() {
        return Err(unexpected(name));
    }
    let file = FisherFile { tensors, metadata, form };
    check_consistent(&file).map_err(bad)?;
    Ok(file)
}

/// How far a stored Fisher matrix may be from symmetric, and its diagonal below zero, as a
/// fraction of its largest |entry|: 1e-5 is ~84 f32 ulps (ε = 1.19e-7) of that entry. The
/// writers mirror one triangle (exactly symmetric) and sum squares on the diagonal
/// (non-negative), so this only leaves room for files written by other tools in another
/// summation order, and is far below a real asymmetry or a negative variance.
pub const ROUNDING_TOLERANCE: f32 = 1e-5;

/// Checks that `file` is something a Fisher computation can produce; the message names the
/// tensor (the caller adds the file):
///
/// * the shapes agree with the metadata that is present: `parameters` (P×P for full, P for
///   diag, blocks whose sides sum to P, Σ side(A)·side(G) = P for kfac, P columns of grads),
///   `samples` (N×N for gram, N norms, N·`rows_per_sample` rows of grads), and the sizes of
///   a `blocks:a,b,…` form; a count in the metadata that is not a number is refused too;
/// * every diagonal entry (diag, norms, the diagonals of full, gram, the blocks and the KFAC
///   factors) is ≥ −[`ROUNDING_TOLERANCE`]·max|T|;
/// * every matrix but grads is symmetric to within [`ROUNDING_TOLERANCE`]·max|T|.
pub fn check_consistent(file: &FisherFile) -> std::result::Result<(), String> {
    let count = |key: &str| -> std::result::Result<Option<usize>, String> {
        match file.metadata.get(key) {
            None => Ok(None),
            Some(text) => text
                .parse()
                .map(Some)
                .map_err(|_| format!("metadata '{key}' is '{}', not a count", quote(text))),
        }
    };
    let (parameters, samples, rows_per_sample) = (count("parameters")?, count("samples")?, count("rows_per_sample")?);
    let disagree = |name: &str, shape: String, key: &str, value: usize| {
        Err(format!("tensor '{name}' has shape {shape} but the metadata says {key} = {value}"))
    };
    match &file.tensors {
        Tensors::Full(m) => {
            if let Some(p) = parameters.filter(|&p| m.dim() != (p, p)) {
                return disagree("fisher", format!("{:?}", m.shape()), "parameters", p);
            }
        }
        Tensors::Diagonal(d) => {
            if let Some(p) = parameters.filter(|&p| d.len() != p) {
                return disagree("diag", format!("[{}]", d.len()), "parameters", p);
            }
        }
        Tensors::Gram(k) => {
            if let Some(n) = samples.filter(|&n| k.dim() != (n, n)) {
                return disagree("gram", format!("{:?}", k.shape()), "samples", n);
            }
        }
        Tensors::Norms(v) => {
            if let Some(n) = samples.filter(|&n| v.len() != n) {
                return disagree("norms", format!("[{}]", v.len()), "samples", n);
            }
        }
        Tensors::Grads(g) => {
            if let Some(p) = parameters.filter(|&p| g.ncols() != p) {
                return disagree("grads", format!("{:?}", g.shape()), "parameters", p);
            }
            if let (Some(n), Some(r)) = (samples, rows_per_sample) {
                if n.checked_mul(r) != Some(g.nrows()) {
                    return Err(format!(
                        "tensor 'grads' has shape {:?} but the metadata says samples = {n} with rows_per_sample = {r}",
                        g.shape()
                    ));
                }
            }
        }
        Tensors::Blocks(blocks) => {
            if let Some(Ok(Form::BlockDiagonal(sizes))) = file.form.starts_with("blocks:").then(|| Form::parse(&file.form)) {
                if sizes.len() != blocks.len() {
                    return Err(format!(
                        "the form {} has {} blocks but the file holds {}",
                        quote(&file.form),
                        sizes.len(),
                        blocks.len()
                    ));
                }
                for ((i, block), size) in blocks.iter().zip(&sizes) {
                    if block.nrows() != *size {
                        return Err(format!(
                            "tensor 'block.{i}' has shape {:?} but the form {} gives it size {size}",
                            block.shape(),
                            quote(&file.form)
                        ));
                    }
                }
            }
            if let Some(p) = parameters {
                let total = blocks.iter().try_fold(0usize, |acc, (_, b)| acc.checked_add(b.nrows()));
                if total != Some(p) {
                    return Err(format!(
                        "the blocks' sides sum to {} but the metadata says parameters = {p}",
                        total.map_or("more than usize::MAX".to_string(), |t| t.to_string())
                    ));
                }
            }
        }
        Tensors::Kfac(factors) => {
            if let Some(p) = parameters {
                let total = factors
                    .iter()
                    .try_fold(0usize, |acc, (_, f)| acc.checked_add(f.a.nrows().checked_mul(f.g.nrows())?));
                if total != Some(p) {
                    return Err(format!(
                        "the KFAC factors cover {} parameters (Σ side(A)·side(G)) but the metadata says parameters = {p}",
                        total.map_or("more than usize::MAX".to_string(), |t| t.to_string())
                    ));
                }
            }
        }
    }
    let vector_nonnegative = |name: &str, v: &Array1<f32>| {
        let tolerance = ROUNDING_TOLERANCE * v.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        match v.iter().position(|&x| x < -tolerance) {
            Some(i) => Err(format!(
                "tensor '{name}' has a negative entry {} at index {i}, impossible for a Fisher \
                 matrix (positive semi-definite; tolerance {tolerance:e})",
                v[i]
            )),
            None => Ok(()),
        }
    };
    let symmetric_psd_diagonal = |name: &str, m: &Array2<f32>| {
        let tolerance = ROUNDING_TOLERANCE * m.iter().fold(0.0f32, |acc, x| acc.max(x.abs()));
        if let Some(i) = (0..m.nrows()).find(|&i| m[[i, i]] < -tolerance) {
            return Err(format!(
                "tensor '{name}' has a negative diagonal entry {} at [{i}, {i}], impossible for a \
                 Fisher matrix (positive semi-definite; tolerance {tolerance:e})",
                m[[i, i]]
            ));
        }
        for i in 0..m.nrows() {
            for j in 0..i {
                if (m[[i, j]] - m[[j, i]]).abs() > tolerance {
                    return Err(format!(
                        "tensor '{name}' is not symmetric: [{i}, {j}] = {} but [{j}, {i}] = {} \
                         (tolerance {tolerance:e} = {ROUNDING_TOLERANCE:e}·max|entry|)",
                        m[[i, j]],
                        m[[j, i]]
                    ));
                }
            }
        }
        Ok(())
    };
    match &file.tensors {
        Tensors::Full(m) => symmetric_psd_diagonal("fisher", m),
        Tensors::Gram(k) => symmetric_psd_diagonal("gram", k),
        Tensors::Diagonal(d) => vector_nonnegative("diag", d),
        Tensors::Norms(v) => vector_nonnegative("norms", v),
        Tensors::Grads(_) => Ok(()),
        Tensors::Blocks(blocks) => blocks.iter().try_for_each(|(i, b)| symmetric_psd_diagonal(&format!("block.{i}"), b)),
        Tensors::Kfac(factors) => factors.iter().try_for_each(|(i, f)| {
            symmetric_psd_diagonal(&format!("kfac.{i}.A"), &f.a)?;
            symmetric_psd_diagonal(&format!("kfac.{i}.G"), &f.g)
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::train::{classification_task, init_mlp};
    use crate::model::Activation;
    use crate::Engine;

    /// A small conv + linear graph model and data for it.
    fn graph_problem() -> (crate::graph::fisher::GraphModel, crate::model::Dataset) {
        use crate::graph::ir::{GraphBuilder, InputType, Op, Window};
        let mut b = GraphBuilder::new("x", &[2, 4, 4], InputType::Float);
        let w = b.param("conv.weight", &[3, 2, 3, 3], (0..54).map(|i| ((i * 37 % 19) as f32 - 9.0) / 20.0).collect()).unwrap();
        let bias = b.param("conv.bias", &[3], vec![0.1, -0.2, 0.05]).unwrap();
        let window = Window { kernel: [3, 3], strides: [1, 1], pads: [1; 4], dilations: [1, 1] };
        let y = b.node("conv", Op::Conv { window, group: 1 }, &[0, w, bias]).unwrap();
        let g = b.node("gap", Op::GlobalAveragePool, &[y]).unwrap();
        let f = b.reshape("flat", g, &[3]).unwrap();
        let fc = b.param("fc.weight", &[4, 3], (0..12).map(|i| (i as f32 - 6.0) / 7.0).collect()).unwrap();
        let out = b.node("fc", Op::Gemm { alpha: 1.0, beta: 1.0, trans_b: true }, &[f, fc]).unwrap();
        let model = crate::graph::fisher::GraphModel::new(b.finish(out).unwrap()).unwrap();
        let inputs = ndarray::Array2::from_shape_fn((5, 32), |(i, j)| ((i * 31 + j * 7) % 13) as f32 / 6.0 - 1.0);
        (model, crate::model::Dataset { inputs, targets: crate::model::Targets::Classes(vec![0, 1, 2, 3, 1]) })
    }

    #[test]
    fn graph_results_round_trip_with_names() {
        let (model, data) = graph_problem();
        let all = crate::graph::fisher::Selection::all(&model.graph);
        let engine = Engine::cpu();
        for form in [NetForm::Diagonal, NetForm::Layer, NetForm::Kfac, NetForm::Full] {
            let result = engine.graph_fisher(&model, &data, Likelihood::Categorical, Variant::True, form, &all).unwrap();
            let file = FisherFile::of_graph(result, &model, &all, data.len(), Likelihood::Categorical, Variant::True, "cpu");
            let names: Vec<String> = file.tensor_shapes().into_iter().map(|(n, _)| n).collect();
            match form {
                NetForm::Diagonal => assert_eq!(names, ["diag", "diag.conv.weight", "diag.conv.bias", "diag.fc.weight"]),
                NetForm::Layer => assert_eq!(names, ["block.conv", "block.fc"]),
                NetForm::Kfac => assert_eq!(names, ["kfac.conv.A", "kfac.conv.G", "kfac.fc.A", "kfac.fc.G"]),
                _ => assert_eq!(names, ["fisher"]),
            }
            let shapes = file.tensor_shapes();
            if form == NetForm::Diagonal {
                assert_eq!(shapes[1].1, vec![3, 2, 3, 3]);
            }
            let back = round_trip(&file);
            assert_eq!(back.tensor_shapes(), shapes);
        }
        // A per-parameter tensor that disagrees with the flat diag is refused.
        let result = engine.graph_fisher(&model, &data, Likelihood::Categorical, Variant::True, NetForm::Diagonal, &all).unwrap();
        let file = FisherFile::of_graph(result, &model, &all, data.len(), Likelihood::Categorical, Variant::True, "cpu");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("F.safetensors");
        let mut refs = file.tensor_refs();
        let mut bad = refs[1].2.to_vec();
        bad[0] += 1.0;
        refs[1].2 = std::borrow::Cow::Owned(bad);
        write_tensor_refs(&path, &refs, Some(file.metadata.clone())).unwrap();
        assert!(read(&path).unwrap_err().to_string().contains("diag.conv.weight"));
    }

    fn round_trip(file: &FisherFile) -> FisherFile {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("F.safetensors");
        write(&path, file).unwrap();
        let back = read(&path).unwrap();
        assert_eq!(&back, file, "form {}", file.form());
        // The metadata says what the tensors are: reading without it finds the same form.
        assert_eq!(back.tensor_shapes(), file.tensor_shapes());
        back
    }

    #[test]
    fn every_network_form_round_trips() {
        let mlp = init_mlp(&[4, 5, 3], Activation::Tanh, true, 1).unwrap();
        let data = classification_task(7, 4, 3, 2).unwrap();
        let variant = Variant::MonteCarlo { samples: 2, seed: 9 };
        let full_trace = Engine::cpu().fisher(&mlp, &data, variant, NetForm::Full).unwrap().trace();
        for form in NetForm::ALL {
            let result = Engine::cpu().fisher(&mlp, &data, variant, form).unwrap();
            // The gradient rows are scaled so that F = GᵀG/N: Σ‖row‖²/N is tr F whatever R is.
            let trace = if form == NetForm::Grads { full_trace } else { result.trace() };
            let file = FisherFile::of_network(result, &mlp, 7, Likelihood::Categorical, variant, "cpu");
            let back = round_trip(&file);
            assert_eq!(back.form(), form.name());
            assert_eq!(back.variant(), Some(variant));
            assert_eq!(back.likelihood(), Some(Likelihood::Categorical));
            assert_eq!((back.samples(), back.parameters()), (Some(7), Some(mlp.num_params())));
            assert_eq!(back.widths(), Some(vec![4, 5, 3]));
            assert_eq!(back.layer_indices(), Some(vec![0, 2]));
            assert_eq!(back.architecture(None).as_deref(), Some("4-5-3 tanh MLP"));
            assert!((back.trace() - trace).abs() <= 1e-6 * trace.abs().max(1.0), "{form}: {} vs {trace}", back.trace());
        }
    }

    #[test]
    fn network_tensors_are_named_by_sequential_index() {
        let mlp = init_mlp(&[3, 4, 2], Activation::Relu, true, 1).unwrap();
        let data = classification_task(5, 3, 2, 1).unwrap();
        let kfac = Engine::cpu().fisher(&mlp, &data, Variant::True, NetForm::Kfac).unwrap();
        let file = FisherFile::of_network(kfac, &mlp, 5, Likelihood::Categorical, Variant::True, "cpu");
        let expected: Vec<(String, Vec<usize>)> = [("kfac.0.A", [4, 4]), ("kfac.0.G", [4, 4]), ("kfac.2.A", [5, 5]), ("kfac.2.G", [2, 2])]
            .into_iter()
            .map(|(n, s)| (n.to_string(), s.to_vec()))
            .collect();
        assert_eq!(file.tensor_shapes(), expected);
        assert_eq!(file.metadata["kfac_layout"], KFAC_LAYOUT_NOTE);
    }

    #[test]
    fn every_reduction_form_round_trips() {
        let g = crate::synthetic::gradient_like(11, 6, 3);
        for form in [Form::Full, Form::Diagonal, Form::Gram, Form::SampleNorms, Form::BlockDiagonal(vec![2, 4])] {
            let result = Engine::cpu().fisher_from_grads(g.view(), &form).unwrap();
            let trace = result.trace();
            let file = FisherFile::of_reduction(result, &form, 11, 6, "cpu");
            let back = round_trip(&file);
            assert_eq!(back.form(), form.to_string());
            assert_eq!((back.samples(), back.parameters(), back.backend()), (Some(11), Some(6), Some("cpu")));
            assert!((back.trace() - trace).abs() <= 1e-9 * trace.abs().max(1.0), "{form}");
        }
    }

    #[test]
    fn stored_names_parse() {
        assert_eq!(index_of("block.4", "block."), Some(4));
        assert_eq!(index_of("kfac.12.A", "kfac."), Some(12));
        assert_eq!(index_of("fisher", "block."), None);
    }

    #[test]
    fn a_transposed_result_is_written_in_logical_order() {
        let m = ndarray::array![[1.0f32, 2.0], [3.0, 4.0]];
        assert_eq!(&*row_major(&m.t().to_owned()), [1.0, 3.0, 2.0, 4.0]);
        assert_eq!(&*row_major(&m.clone().reversed_axes()), [1.0, 3.0, 2.0, 4.0]);
    }

    #[test]
    fn a_file_without_metadata_is_told_by_its_tensor_names_and_bad_ones_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("F.safetensors");
        let block = (String::from("block.3"), vec![2, 2], vec![1.0f32, 0.0, 0.0, 1.0]);
        super::super::write_safetensors_atomic(&path, &[block.clone()], None).unwrap();
        let file = read(&path).unwrap();
        assert_eq!(file.form(), "layer");
        assert!(matches!(&file.tensors, Tensors::Blocks(b) if b[0].0 == 3));

        let oblong = (String::from("fisher"), vec![2, 3], vec![0.0f32; 6]);
        super::super::write_safetensors_atomic(&path, &[oblong], None).unwrap();
        let err = read(&path).unwrap_err().to_string();
        assert!(err.contains("expected a square matrix") && err.contains("F.safetensors"), "{err}");

        let meta = HashMap::from([("form".to_string(), "full".to_string())]);
        super::super::write_safetensors_atomic(&path, &[block], Some(meta)).unwrap();
        let err = read(&path).unwrap_err().to_string();
        assert!(err.contains("needs a tensor 'fisher'"), "{err}");
    }
}
