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

use std::path::PathBuf;
use std::time::Instant;

use ndarray::Array1;

use crate::backend::gpu::GpuOptions;
use crate::device::{self, DeviceRequest};
use crate::engine::{Backend, Engine};
use crate::error::{FisherError, Result};
use crate::fisher::Variant;
use crate::model::{architecture_text, run as run_dir, ActivationSpec, Dataset, Likelihood, Mlp};
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
    data: &Dataset,
    variant: Variant,
    segments: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ActionReport> {
    if checkpoints.len() < 2 {
        return Err(FisherError::InvalidInput(format!(
            "the action needs at least 2 checkpoints, got {}",
            checkpoints.len()
        )));
    }
    if segments == 0 {
        return Err(FisherError::InvalidInput("--segments must be at least 1".into()));
    }
    if segments > MAX_SEGMENTS {
        return Err(FisherError::InvalidInput(format!("--segments must be at most {MAX_SEGMENTS}, not {segments}")));
    }
    check_same_architecture(checkpoints)?;
    let thetas: Vec<Array1<f64>> = checkpoints.iter().map(|c| c.parameters().mapv(f64::from)).collect();
    let total = checkpoints.len() - 1 + segments;
    let mut done = 0;
    let mut steps = Vec::with_capacity(checkpoints.len() - 1);
    let (mut action, mut length, mut euclidean_length) = (0.0, 0.0, 0.0);
    for t in 0..checkpoints.len() - 1 {
        // Differences in f64 of f32 values are exact; the direction is then rounded once.
        let delta = &thetas[t + 1] - &thetas[t];
        let q = engine.fisher_quadratic(&checkpoints[t], data, variant, delta.mapv(|x| x as f32).view())?.max(0.0);
        let euclidean = delta.dot(&delta).sqrt();
        action += q;
        length += q.sqrt();
        euclidean_length += euclidean;
        steps.push(ActionStep { step: t, euclidean, action: q, length: q.sqrt(), cumulative_length: length });
        done += 1;
        progress(done, total);
    }
    let whole = &thetas[thetas.len() - 1] - &thetas[0];
    let delta = whole.mapv(|x| (x / segments as f64) as f32);
    let mut chord = 0.0;
    for j in 0..segments {
        let mid = &thetas[0] + &(&whole * ((j as f64 + 0.5) / segments as f64));
        let at = checkpoints[0].with_parameters(mid.mapv(|x| x as f32).view())?;
        chord += engine.fisher_quadratic(&at, data, variant, delta.view())?.max(0.0).sqrt();
        done += 1;
        progress(done, total);
    }
    Ok(ActionReport {
        checkpoints: checkpoints.len(),
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
    let start = Instant::now();
    let files = run_dir::checkpoint_files(&request.checkpoints)?;
    let models = run_dir::load_checkpoints(&files, &request.activation)?;
    let data = Dataset::from_npy(&request.inputs, &request.labels, request.likelihood)?;
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
