//! The Fisher information of a graph network read from ONNX ([`crate::graph`]), in any
//! variant and form: `fisher compute --model M.onnx`.
//!
//! Flow: the output policy checked → the data read (any rank; integer tokens allowed) → the
//! ONNX file imported for the data's per-sample shape → the parameters selected
//! (`--params`) → the result size checked → device → compute → the f64 reference
//! ([`crate::graph::reference`], when `verify`) → atomic write with per-parameter tensors.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::{file_size, since, with_limit, RunError, Seconds};
use crate::backend::gpu::GpuOptions;
use crate::device::{self, DeviceRequest};
use crate::error::FisherError;
use crate::fisher::{rows_per_sample, KfacFactors, NetFisher, NetForm, Variant};
use crate::graph::fisher::{kfac_sites, selected_modules, GraphModel, Selection};
use crate::graph::ir::{Graph, InputType, TensorKind};
use crate::io::fisher_file::{self, FisherFile};
use crate::io::output::Target;
use crate::model::{Dataset, Likelihood};
use crate::verify::{Contract, Verdict};
use crate::Backend;

/// Reads the data (any rank) and the ONNX model for the data's per-sample shape, and checks
/// them against each other: the input's shape and kind (float features or integer tokens).
pub fn load_graph_problem(model: &Path, inputs: &Path, labels: &Path, likelihood: Likelihood) -> Result<(GraphModel, Dataset), FisherError> {
    let (model, data, _) = load_graph_files(model, inputs, labels, likelihood)?;
    Ok((model, data))
}

/// [`load_graph_problem`], also returning the model's external data files (inputs of the
/// run that no output may replace).
pub fn load_graph_files(model: &Path, inputs: &Path, labels: &Path, likelihood: Likelihood) -> Result<(GraphModel, Dataset, Vec<PathBuf>), FisherError> {
    let (data, shape, integer) = Dataset::from_npy_any_rank(inputs, labels, likelihood)?;
    // A file that declares its input shape is read as it is, so that data of another shape
    // is blamed on the data file; one with symbolic extents takes the data's shape.
    let onnx = match crate::graph::onnx::load(model, None) {
        Ok(onnx) => onnx,
        Err(_) => crate::graph::onnx::load(model, Some(&shape))?,
    };
    check_input(&onnx.graph, model, inputs, &shape, integer)?;
    Ok((GraphModel::new(onnx.graph)?, data, onnx.info.external_files))
}

fn check_input(graph: &Graph, model: &Path, inputs: &Path, shape: &[usize], integer: bool) -> Result<(), FisherError> {
    let input = &graph.tensors[graph.input];
    if input.shape != shape {
        return Err(FisherError::InvalidInput(format!(
            "{}: per-sample shape {:?} does not match the input {} of {} ({:?})",
            inputs.display(),
            shape,
            input.name,
            model.display(),
            input.shape
        )));
    }
    match (&input.kind, integer) {
        (TensorKind::Input(InputType::Integer), false) => Err(FisherError::InvalidInput(format!(
            "{}: the model's input {} takes integer token indices, but the inputs are floats",
            inputs.display(),
            input.name
        ))),
        (TensorKind::Input(InputType::Float), true) => Err(FisherError::InvalidInput(format!(
            "{}: the model's input {} takes floats, but the inputs are integers (save them as float32)",
            inputs.display(),
            input.name
        ))),
        _ => Ok(()),
    }
}

/// The parameters `pattern` (a regular expression, searched in each name) selects, or all.
pub fn select(graph: &Graph, pattern: Option<&str>) -> Result<Selection, FisherError> {
    match pattern {
        None => Ok(Selection::all(graph)),
        Some(p) => {
            let re = regex::Regex::new(p).map_err(|e| FisherError::Request(format!("--params: {}", e.to_string().lines().last().unwrap_or("invalid regular expression"))))?;
            Selection::matching(graph, p, |name| re.is_match(name))
        }
    }
}

/// What to compute from an ONNX model, and where the result goes.
#[derive(Debug, Clone)]
pub struct GraphRequest {
    /// The ONNX file.
    pub model: PathBuf,
    /// Inputs (.npy, N × the model's input shape).
    pub inputs: PathBuf,
    /// Labels or targets (.npy).
    pub labels: PathBuf,
    /// The likelihood.
    pub likelihood: Likelihood,
    /// The variant.
    pub variant: Variant,
    /// The form.
    pub form: NetForm,
    /// A regular expression selecting parameters by name (`None`: all).
    pub params: Option<String>,
    /// Requested compute path.
    pub backend: Backend,
    /// Adapter choice.
    pub gpu: GpuOptions,
    /// The output file.
    pub out: PathBuf,
    /// Compare with the f64 reference.
    pub verify: bool,
    /// Largest result held in host memory, bytes.
    pub max_result_bytes: u128,
    /// Replace an existing output file.
    pub force: bool,
}

/// What a graph compute run did.
#[derive(Debug)]
pub struct GraphOutcome {
    /// Operators in the graph.
    pub nodes: usize,
    /// All the model's parameters (scalars).
    pub model_params: usize,
    /// The parameters the result covers (scalars).
    pub params: usize,
    /// Names of the selected parameters.
    pub param_names: Vec<String>,
    /// N.
    pub samples: usize,
    /// R.
    pub rows_per_sample: usize,
    /// The backend's label.
    pub backend: String,
    /// Adapter, when on a GPU.
    pub adapter: Option<String>,
    /// Why Auto fell back to the CPU.
    pub fallback: Option<String>,
    /// Names and shapes of the written tensors.
    pub tensors: Vec<(String, Vec<usize>)>,
    /// tr F (kfac: Σ tr(G)·tr(A)).
    pub trace: f64,
    /// Agreement with the f64 reference.
    pub verification: Option<Verdict>,
    /// The file written and its size.
    pub out: (PathBuf, u64),
    /// Seconds per stage.
    pub seconds: Seconds,
    /// How the run was split into micro-batches, and their memory.
    pub stats: crate::graph::fisher::RunStats,
}

/// Runs a graph compute request.
pub fn run(request: &GraphRequest) -> Result<GraphOutcome, RunError> {
    let inputs: Vec<(&str, &Path)> =
        vec![("--model", request.model.as_path()), ("--inputs", request.inputs.as_path()), ("--labels", request.labels.as_path())];
    Target::check(&request.out, "--out", request.force, &inputs)?;
    let mut seconds = Seconds::default();
    let start = Instant::now();
    let (model, data, external) = load_graph_files(&request.model, &request.inputs, &request.labels, request.likelihood)?;
    // The model's external data is an input too.
    let mut inputs = inputs;
    inputs.extend(external.iter().map(|f| ("--model (its external data)", f.as_path())));
    let target = Target::check(&request.out, "--out", request.force, &inputs)?;
    model.check_data(&data, request.likelihood)?;
    seconds.load = since(start);
    let graph = &model.graph;
    let selection = select(graph, request.params.as_deref())?;
    let samples = data.len();
    let rows = rows_per_sample(request.variant, graph.outputs());
    let p = selection.count(graph) as u128;
    let needed: u128 = match request.form {
        NetForm::Full => p * p,
        NetForm::Layer => selected_modules(graph, &selection).iter().map(|m| (m.1 as u128).pow(2)).sum(),
        NetForm::Grads => (samples as u128).saturating_mul(rows as u128).saturating_mul(p),
        _ => 0,
    };
    let factor = if request.verify { 12 } else { 4 };
    if needed.saturating_mul(factor) > request.max_result_bytes {
        return Err(RunError::ResultTooLarge(super::ResultTooLarge {
            form: request.form,
            what: match request.form {
                NetForm::Full => format!("P×P = {p}×{p}"),
                NetForm::Layer => "Σ_module P_m²".into(),
                _ => format!("N·R×P = {samples}·{rows}×{p}"),
            },
            needed: needed.saturating_mul(factor),
            with_reference: request.verify,
            limit: request.max_result_bytes,
            rows_per_sample: rows,
        }));
    }

    let start = Instant::now();
    let device = device::open(&DeviceRequest::from_env(request.backend, with_limit(&request.gpu, request.max_result_bytes))?)?;
    seconds.setup = since(start);
    let engine = &device.engine;
    let backend = engine.device_info();

    let start = Instant::now();
    let (result, stats) = engine.graph_fisher_with_stats(&model, &data, request.likelihood, request.variant, request.form, &selection)?;
    seconds.compute = since(start);

    let mut verification = None;
    if request.verify {
        let start = Instant::now();
        let reference = reference_fisher(&model, &data, request.likelihood, request.variant, request.form, &selection)
            .map_err(RunError::context("computing the f64 reference"))?;
        let verdict = Verdict::judge(result.agreement(&reference)?, Contract::Network);
        seconds.verify = since(start);
        verification = Some(verdict.require(&backend)?);
    }

    let file = FisherFile::of_graph(result, &model, &selection, samples, request.likelihood, request.variant, &backend);
    let trace = file.trace();
    let tensors = file.tensor_shapes();
    let start = Instant::now();
    fisher_file::write(target.path(), &file)?;
    seconds.write = since(start);
    Ok(GraphOutcome {
        nodes: graph.nodes.len(),
        model_params: graph.param_count(),
        params: selection.count(graph),
        param_names: selection.0.iter().map(|&i| graph.params[i].name.clone()).collect(),
        samples,
        rows_per_sample: rows,
        backend,
        adapter: device.adapter.map(|a| a.name),
        fallback: device.fallback,
        tensors,
        trace,
        verification,
        out: (request.out.clone(), file_size(&request.out)),
        seconds,
        stats,
    })
}

/// The f64 reference of a graph Fisher over a selection of parameters: the reference's own
/// result when everything is selected; otherwise its per-sample rows restricted to the
/// selected columns and reduced here (KFAC: the selected sites' factors).
pub fn reference_fisher(
    model: &GraphModel,
    data: &Dataset,
    likelihood: Likelihood,
    variant: Variant,
    form: NetForm,
    selection: &Selection,
) -> Result<NetFisher<f64>, FisherError> {
    let graph = &model.graph;
    if selection.0.len() == graph.params.len() || form == NetForm::Kfac {
        let full = crate::graph::reference::fisher(graph, data, likelihood, variant, form)?;
        if let NetFisher::Kfac(factors) = full {
            // The reference lists every Gemm/MatMul/Conv site in graph order, like the program.
            let keep: Vec<usize> = kfac_sites(model, selection).into_iter().map(|(_, k)| k).collect();
            return Ok(NetFisher::Kfac(
                factors.into_iter().enumerate().filter(|(k, _)| keep.contains(k)).map(|(_, f)| f).collect::<Vec<KfacFactors<f64>>>(),
            ));
        }
        return Ok(full);
    }
    let (rows, r) = crate::graph::reference::per_sample_rows(graph, data, likelihood, variant)?;
    let cols: Vec<usize> = selection.ranges(graph).into_iter().flat_map(|(off, len)| off..off + len).collect();
    let g = rows.select(ndarray::Axis(1), &cols);
    let n = data.len() as f64;
    Ok(match form {
        NetForm::Full => NetFisher::Full(g.t().dot(&g) / n),
        NetForm::Diagonal => NetFisher::Diagonal(g.map_axis(ndarray::Axis(0), |c| c.iter().map(|v| v * v).sum::<f64>() / n)),
        NetForm::Grads => NetFisher::Grads(g),
        NetForm::Norms => NetFisher::Norms(
            (0..data.len()).map(|i| (0..r).map(|q| g.row(i * r + q).iter().map(|v| v * v).sum::<f64>()).sum()).collect(),
        ),
        NetForm::Layer => NetFisher::Layer(
            selected_modules(graph, selection)
                .into_iter()
                .map(|(_, len, start)| {
                    let b = g.slice(ndarray::s![.., start..start + len]);
                    b.t().dot(&b) / n
                })
                .collect(),
        ),
        NetForm::Kfac => unreachable!("handled above"),
    })
}
