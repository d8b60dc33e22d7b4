//! The action along training: a training run θ₀ … θ_T as a path in the Fisher metric.
//!
//! With Δθ_t = θ_{t+1} − θ_t and F(θ) the Fisher at θ (any variant), the discrete
//!
//! ```text
//! action           S = Σ_t Δθ_tᵀ F(θ_t) Δθ_t
//! Fisher–Rao length L = Σ_t √(Δθ_tᵀ F(θ_t) Δθ_t)
//! chord length     C = Σ_{j<m} √(δᵀ F(θ₀ + (j + ½)·δ) δ),   δ = (θ_T − θ₀)/m   (midpoint rule)
//! efficiency       L / C
//! ```
//!
//! Each term is one implicit quadratic form vᵀFv (a forward-mode pass, no F is formed), so
//! this works for models of any size. S is the discrete counterpart of ∫ θ̇ᵀFθ̇ dt (the
//! "complexity = action" view: the work a training run does in the metric); L is the path's
//! length in the Fisher–Rao metric; C is the length of the straight line between its ends
//! (an upper bound on the geodesic distance); L / C ≥ 1 measures how much longer training's
//! path was than that straight chord (1 = as short as the chord).
//!
//! [`measure`] works on models in memory; [`run`] is the whole of `fisher action`: an
//! [`ActionRequest`] (checkpoint files, data, variant, device, plot) → the checkpoints
//! loaded and checked ([`crate::model::run::load_checkpoints`]) → the data checked against
//! them → the device opened ([`crate::device::open`]) → [`measure`] → the plot, written
//! atomically (the only file written, and only on success) → an [`ActionRun`].

use std::path::{Path, PathBuf};
use std::time::Instant;

use ndarray::Array1;

use crate::backend::gpu::GpuOptions;
use crate::device::{self, DeviceRequest};
use crate::engine::{Backend, Engine};
use crate::error::{FisherError, Result};
use crate::fisher::Variant;
use crate::model::{architecture_text, run as run_dir, ActivationSpec, DataSource, Dataset, Likelihood, Mlp, NpyDataset};
use crate::output::plot;
use crate::output::progress::Progress;

/// One step of the path.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ActionStep {
    /// Index t of the step θ_t → θ_{t+1}.
    pub step: usize,
    /// Euclidean ‖Δθ_t‖.
    pub euclidean: f64,
    /// Δθ_tᵀ F(θ_t) Δθ_t, this step's contribution to S.
    pub action: f64,
    /// √(Δθ_tᵀ F(θ_t) Δθ_t), its contribution to L.
    pub length: f64,
    /// L up to and including this step.
    pub cumulative_length: f64,
}

/// The action, length, chord and efficiency of a path.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ActionReport {
    /// Number of checkpoints (T + 1).
    pub checkpoints: usize,
    /// Number of parameters.
    pub parameters: usize,
    /// Per-step table.
    pub steps: Vec<ActionStep>,
    /// S.
    pub action: f64,
    /// L.
    pub length: f64,
    /// Fisher length of the straight chord θ₀ → θ_T (midpoint rule).
    pub chord: f64,
    /// Segments of the chord's midpoint rule.
    pub segments: usize,
    /// L / chord.
    pub efficiency: f64,
    /// Euclidean path length Σ‖Δθ_t‖.
    pub euclidean_length: f64,
    /// Euclidean ‖θ_T − θ₀‖.
    pub euclidean_chord: f64,
}

/// Checks that every checkpoint has the architecture of the first (shapes, biases,
/// activations), naming the first that differs.
pub fn check_same_architecture(checkpoints: &[Mlp]) -> Result<()> {
    let Some(first) = checkpoints.first() else {
        return Err(FisherError::InvalidInput("no checkpoints".into()));
    };
    for (t, c) in checkpoints.iter().enumerate().skip(1) {
        let same = c.layers.len() == first.layers.len()
            && c.activations == first.activations
            && c.layers.iter().zip(&first.layers).all(|(a, b)| {
                a.weight.dim() == b.weight.dim() && a.bias.as_ref().map(|x| x.len()) == b.bias.as_ref().map(|x| x.len())
            });
        if !same {
            return Err(FisherError::InvalidInput(format!(
                "checkpoint {t} does not have the architecture of checkpoint 0 (layer shapes, biases or activations differ)"
            )));
        }
    }
    Ok(())
}

/// Measures the path θ₀ … θ_T (`checkpoints`, all the same architecture) on `data`.
///
/// `progress(done, total)` is called after each quadratic form (T + `segments` of them).
pub fn measure(
    engine: &Engine,
    checkpoints: &[Mlp],
    data: &dyn DataSource,
    variant: Variant,
    segments: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ActionReport> {
    check_same_architecture(checkpoints)?;
    let thetas: Vec<Array1<f64>> = checkpoints.iter().map(|c| c.parameters().mapv(f64::from)).collect();
    measure_path(&thetas, segments, progress, &mut |t, theta, delta| match t {
        Some(t) => engine.fisher_quadratic(&checkpoints[t], data, variant, ndarray::ArrayView1::from(delta)),
        None => {
            let at = checkpoints[0].with_parameters(ndarray::ArrayView1::from(theta))?;
            engine.fisher_quadratic(&at, data, variant, ndarray::ArrayView1::from(delta))
        }
    })
}

/// The quadratic form Δᵀ F(θ) Δ of a path's model: `(Some(t), θ_t, Δ)` at checkpoint t, or
/// `(None, θ, Δ)` at a point between checkpoints.
pub type Quadratic<'a> = dyn FnMut(Option<usize>, &[f32], &[f32]) -> Result<f64> + 'a;

/// The action, length and chord of the path θ₀ … θ_T given its quadratic form, whatever the
/// model (an MLP: [`measure`]; a graph read from ONNX: [`measure_graph`]).
pub fn measure_path(
    thetas: &[Array1<f64>],
    segments: usize,
    progress: &mut dyn FnMut(usize, usize),
    quadratic: &mut Quadratic<'_>,
) -> Result<ActionReport> {
    if thetas.len() < 2 {
        return Err(FisherError::InvalidInput(format!("the action needs at least 2 checkpoints, got {}", thetas.len())));
    }
    if segments == 0 {
        return Err(FisherError::InvalidInput("--segments must be at least 1".into()));
    }
    if segments > MAX_SEGMENTS {
        return Err(FisherError::InvalidInput(format!("--segments must be at most {MAX_SEGMENTS}, not {segments}")));
    }
    let total = thetas.len() - 1 + segments;
    let mut done = 0;
    let mut steps = Vec::with_capacity(thetas.len() - 1);
    let (mut action, mut length, mut euclidean_length) = (0.0, 0.0, 0.0);
    for t in 0..thetas.len() - 1 {
        // Differences in f64 of f32 values are exact; the direction is then rounded once.
        let delta = &thetas[t + 1] - &thetas[t];
        let theta: Vec<f32> = thetas[t].iter().map(|&x| x as f32).collect();
        let d: Vec<f32> = delta.iter().map(|&x| x as f32).collect();
        let q = quadratic(Some(t), &theta, &d)?.max(0.0);
        let euclidean = delta.dot(&delta).sqrt();
        action += q;
        length += q.sqrt();
        euclidean_length += euclidean;
        steps.push(ActionStep { step: t, euclidean, action: q, length: q.sqrt(), cumulative_length: length });
        done += 1;
        progress(done, total);
    }
    let whole = &thetas[thetas.len() - 1] - &thetas[0];
    let delta: Vec<f32> = whole.iter().map(|&x| (x / segments as f64) as f32).collect();
    let mut chord = 0.0;
    for j in 0..segments {
        let mid = &thetas[0] + &(&whole * ((j as f64 + 0.5) / segments as f64));
        let mid: Vec<f32> = mid.iter().map(|&x| x as f32).collect();
        chord += quadratic(None, &mid, &delta)?.max(0.0).sqrt();
        done += 1;
        progress(done, total);
    }
    Ok(ActionReport {
        checkpoints: thetas.len(),
        parameters: thetas[0].len(),
        steps,
        action,
        length,
        chord,
        segments,
        efficiency: if chord > 0.0 { length / chord } else { f64::INFINITY },
        euclidean_length,
        euclidean_chord: whole.dot(&whole).sqrt(),
    })
}

/// [`measure`] for a graph network read from ONNX: `model` at θ₀, the checkpoints as θ
/// vectors in its parameter order.
#[allow(clippy::too_many_arguments)]
pub fn measure_graph(
    engine: &Engine,
    model: &crate::graph::fisher::GraphModel,
    thetas: &[Array1<f64>],
    data: &Dataset,
    likelihood: Likelihood,
    variant: Variant,
    segments: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ActionReport> {
    measure_path(thetas, segments, progress, &mut |_, theta, delta| {
        let at = model.with_theta(theta)?;
        Ok(engine.graph_fvp(&at, data, likelihood, variant, delta, false)?.quadratic)
    })
}

/// The most chord segments (10⁵): each is one pass over the data.
pub const MAX_SEGMENTS: usize = 100_000;

/// What [`run`] measures: a training run given as checkpoint files, on data from files.
#[derive(Debug, Clone)]
pub struct ActionRequest {
    /// Two or more checkpoint files, or one directory of them
    /// ([`crate::model::run::checkpoint_files`]).
    pub checkpoints: Vec<PathBuf>,
    /// Activations between the layers.
    pub activation: ActivationSpec,
    /// Inputs (.npy).
    pub inputs: PathBuf,
    /// Labels or targets (.npy).
    pub labels: PathBuf,
    /// The likelihood.
    pub likelihood: Likelihood,
    /// The variant of F(θ) that measures each step.
    pub variant: Variant,
    /// Segments of the chord's midpoint rule.
    pub segments: usize,
    /// Requested compute path.
    pub backend: Backend,
    /// Adapter choice.
    pub gpu: GpuOptions,
    /// Also plot the per-step action and the cumulative length here (.png or .svg).
    pub plot: Option<PathBuf>,
    /// Draw a progress bar on stderr (only ever on a terminal).
    pub show_progress: bool,
    /// A graph network read from ONNX (`--model`): the checkpoints are then its state dicts
    /// (safetensors keyed by its parameter names) or ONNX files of the same graph. Also
    /// implied when the checkpoints are `.onnx` files.
    pub model: Option<PathBuf>,
}

/// Wall-clock seconds per stage of [`run`].
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Seconds {
    /// Reading and checking the checkpoints and the data.
    pub load: f64,
    /// Choosing an adapter, creating the device and building the kernels.
    pub setup: f64,
    /// The T + segments quadratic forms.
    pub compute: f64,
    /// Rendering and writing the plot (0 without one).
    pub plot: f64,
}

/// What [`run`] measured.
#[derive(Debug)]
pub struct ActionRun {
    /// The measures.
    pub report: ActionReport,
    /// The checkpoint files, in order.
    pub files: Vec<PathBuf>,
    /// e.g. `6-12-3 tanh`.
    pub architecture: String,
    /// N.
    pub samples: usize,
    /// The likelihood.
    pub likelihood: Likelihood,
    /// The variant.
    pub variant: Variant,
    /// The backend's label.
    pub backend: String,
    /// GPU adapter name, when on a GPU.
    pub adapter: Option<String>,
    /// Why Auto fell back to the CPU.
    pub fallback: Option<String>,
    /// The plot written.
    pub plot: Option<PathBuf>,
    /// Seconds per stage.
    pub seconds: Seconds,
}

/// `6-12-3 tanh`: the layer shapes ([`Mlp::shape_text`], layers without a bias named) and
/// the activations as [`architecture_text`] names them (its text for no widths is ` tanh MLP`).
fn architecture(mlp: &Mlp) -> String {
    let names: Vec<&str> = mlp.activations.iter().map(|a| a.name()).collect();
    format!("{}{}", mlp.shape_text(), architecture_text(&[], Some(&names)).trim_end_matches(" MLP"))
}

/// Measures the training run `request` names (the whole of `fisher action`). The plot path
/// is checked before any work.
pub fn run(request: &ActionRequest) -> Result<ActionRun> {
    let mut seconds = Seconds::default();
    if let Some(path) = &request.plot {
        plot::check_plot_path(path)?;
    }
    let graph_mode = request.model.is_some()
        || request.checkpoints.first().is_some_and(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("onnx")));
    if graph_mode {
        return run_graph(request, seconds);
    }
    let start = Instant::now();
    let files = run_dir::checkpoint_files(&request.checkpoints)?;
    let models = run_dir::load_checkpoints(&files, &request.activation)?;
    // Read a micro-batch at a time by every quadratic form: memory does not grow with N.
    let data = NpyDataset::open(&request.inputs, &request.labels, request.likelihood)?;
    data.validate(&models[0], request.likelihood).map_err(|e| match e {
        FisherError::InvalidInput(why) => FisherError::InvalidInput(format!(
            "{} and {} do not fit the model {}: {why}",
            request.inputs.display(),
            request.labels.display(),
            files[0].display()
        )),
        other => other,
    })?;
    seconds.load = start.elapsed().as_secs_f64();

    let start = Instant::now();
    let device = device::open(&DeviceRequest::from_env(request.backend, request.gpu.clone())?)?;
    seconds.setup = start.elapsed().as_secs_f64();
    let engine = &device.engine;

    let start = Instant::now();
    let total = files.len() - 1 + request.segments;
    let progress = Progress::new("action: quadratic forms", total, request.show_progress);
    let report = measure(engine, &models, &data, request.variant, request.segments, &mut progress.callback())?;
    progress.finish();
    seconds.compute = start.elapsed().as_secs_f64();

    let architecture = architecture(&models[0]);
    if let Some(path) = &request.plot {
        let start = Instant::now();
        let title =
            format!("Action along training: {architecture} MLP, {} Fisher, N = {}", request.variant.name(), data.len());
        plot::action_plot(path, &report, &title)?;
        seconds.plot = start.elapsed().as_secs_f64();
    }
    Ok(ActionRun {
        report,
        files,
        architecture,
        samples: data.len(),
        likelihood: request.likelihood,
        variant: request.variant,
        backend: engine.device_info(),
        adapter: device.adapter.map(|a| a.name),
        fallback: device.fallback,
        plot: request.plot.clone(),
        seconds,
    })
}

/// θ of checkpoint `path` for `model`: an ONNX file of the same graph (same parameter names
/// and shapes), or a safetensors state dict holding every parameter by name (other keys,
/// such as BatchNorm running statistics, update the constants of the same name).
fn graph_checkpoint(model: &crate::graph::fisher::GraphModel, path: &Path, shape: &[usize]) -> Result<crate::graph::fisher::GraphModel> {
    let graph = &model.graph;
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("onnx")) {
        let other = crate::graph::onnx::load(path, Some(shape))?.graph;
        let names = |g: &crate::graph::Graph| g.params.iter().map(|p| (p.name.clone(), p.shape.clone())).collect::<Vec<_>>();
        if names(&other) != names(graph) || other.nodes != graph.nodes {
            return Err(FisherError::InvalidInput(format!("{}: a different network than the first checkpoint", path.display())));
        }
        return crate::graph::fisher::GraphModel::new(other);
    }
    let (tensors, _) = crate::io::safetensors::read_safetensors(path)?;
    let mut updated = graph.clone();
    let mut theta = Vec::with_capacity(graph.param_count());
    for p in &graph.params {
        let Some((_, shape, values)) = tensors.iter().find(|t| t.0 == p.name) else {
            return Err(FisherError::InvalidInput(format!("{}: no tensor '{}' (a parameter of the model)", path.display(), p.name)));
        };
        if *shape != p.shape {
            return Err(FisherError::InvalidInput(format!(
                "{}: tensor '{}' has shape {shape:?}; the model's parameter has {:?}",
                path.display(),
                p.name,
                p.shape
            )));
        }
        theta.extend_from_slice(values);
    }
    updated.set_theta(&theta)?;
    for t in &mut updated.tensors {
        if let crate::graph::TensorKind::Const(values) = &mut t.kind {
            if let Some((_, _, new)) = tensors.iter().find(|x| x.0 == t.name && x.2.len() == values.len()) {
                values.copy_from_slice(new);
            }
        }
    }
    crate::graph::fisher::GraphModel::new(updated)
}

fn run_graph(request: &ActionRequest, mut seconds: Seconds) -> Result<ActionRun> {
    let start = Instant::now();
    let files: Vec<PathBuf> = run_dir::checkpoint_files_of(&request.checkpoints, &["safetensors", "onnx"])?
        .into_iter()
        .filter(|f| request.model.as_deref() != Some(f.as_path()))
        .collect();
    if files.len() < 2 {
        return Err(FisherError::InvalidInput(format!("the action needs at least 2 checkpoints, got {}", files.len())));
    }
    let model_path = request.model.clone().unwrap_or_else(|| files[0].clone());
    let (model, data) = crate::pipeline::graph::load_graph_problem(&model_path, &request.inputs, &request.labels, request.likelihood)?;
    let shape = model.graph.input_shape().to_vec();
    let mut models = Vec::with_capacity(files.len());
    for f in &files {
        models.push(graph_checkpoint(&model, f, &shape)?);
    }
    seconds.load = start.elapsed().as_secs_f64();

    let start = Instant::now();
    let device = device::open(&DeviceRequest::from_env(request.backend, request.gpu.clone())?)?;
    seconds.setup = start.elapsed().as_secs_f64();
    let engine = &device.engine;

    let start = Instant::now();
    let thetas: Vec<Array1<f64>> = models.iter().map(|m| m.graph.theta().iter().map(|&v| f64::from(v)).collect()).collect();
    let total = files.len() - 1 + request.segments;
    let progress = Progress::new("action: quadratic forms", total, request.show_progress);
    let (likelihood, variant) = (request.likelihood, request.variant);
    let report = measure_path(&thetas, request.segments, &mut progress.callback(), &mut |t, theta, delta| {
        let at = match t {
            Some(t) => models[t].clone(),
            // Between checkpoints: the first checkpoint's constants (running statistics) with θ.
            None => models[0].with_theta(theta)?,
        };
        Ok(engine.graph_fvp(&at, &data, likelihood, variant, delta, false)?.quadratic)
    })?;
    progress.finish();
    seconds.compute = start.elapsed().as_secs_f64();
    let architecture = format!("{} ({} operators, P = {})", model_path.display(), model.graph.nodes.len(), model.graph.param_count());
    if let Some(path) = &request.plot {
        let start = Instant::now();
        let title = format!("Action along training: {architecture}, {} Fisher, N = {}", request.variant.name(), data.len());
        plot::action_plot(path, &report, &title)?;
        seconds.plot = start.elapsed().as_secs_f64();
    }
    Ok(ActionRun {
        report,
        files,
        architecture,
        samples: data.len(),
        likelihood: request.likelihood,
        variant: request.variant,
        backend: engine.device_info(),
        adapter: device.adapter.map(|a| a.name),
        fallback: device.fallback,
        plot: request.plot.clone(),
        seconds,
    })
}
