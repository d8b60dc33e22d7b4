//! The report: the spectrum and the complexity measures of a network's Fisher information,
//! from a model and data or from a stored form (see [the module above](super) for every
//! definition and its source). `fisher report` is this module behind flags.
//!
//! Three ways in:
//!
//! * **implicit** (a model and data, [`FormChoice::Implicit`]): F is never formed. The
//!   operator is [`ImplicitFisher`]: the engine's F·v ([`crate::Engine::fisher_vector_product`],
//!   f32 on the backend, widened to f64) with vᵀFv by a forward pass alone
//!   ([`crate::Engine::fisher_quadratic`]), the exact tr F (the mean of the per-sample squared
//!   gradient norms, [`NetForm::Norms`], no gradient formed) and the rank bound N·R (so
//!   λ_min = 0 whenever N·R < P). Then Lanczos top-k, whose converged eigenpairs are
//!   deflated from SLQ ([`slq_deflated`]: log det, d_eff, Abbas, ‖F‖_F, entropy, density,
//!   with standard errors and quadrature bounds), θᵀFθ and the Hutchinson inter-layer
//!   coupling ([`measures_from_quadrature`]). Memory: the model, the data, one micro-batch,
//!   and one Lanczos basis at a time (4·P bytes per vector).
//! * **explicit** (a model and data, [`FormChoice::Explicit`] full, diag, layer or kfac):
//!   the form is computed with [`crate::Engine::fisher`] and everything is exact
//!   ([`measures_from_spectrum`]).
//! * **stored** ([`StoredInput`], a result of `fisher compute` or `fisher reduce`): the
//!   form is rebuilt from its tensors and metadata ([`fisher_file::read`]) and analysed
//!   exactly; a model adds θ (the Fisher–Rao norm) and the layer shapes where the metadata
//!   lacks them.
//!
//! [`FormChoice::Auto`] computes the full F and analyses it exactly up to
//! [`AUTO_FULL_MAX_PARAMS`] parameters, and goes implicit above (or when an implicit
//! setting was given).
//!
//! Flow of [`run`]: the plot location checked → the form resolved and its size checked →
//! device ([`device::open`]) → measures (`progress` over F·v products) → plot, written
//! atomically. The plot is the only file written, and only on success.
//!
//! ```
//! use fisher_engine::analysis::report::{
//!     self, ComputeOptions, FormChoice, ModelInput, ReportInput, ReportOptions, ReportRequest,
//! };
//! use fisher_engine::backend::gpu::GpuOptions;
//! use fisher_engine::fisher::{NetForm, Variant};
//! use fisher_engine::model::{problem::synthetic_problem, ActivationSpec, Likelihood};
//! use fisher_engine::Backend;
//! let tanh = ActivationSpec::parse("tanh")?;
//! let (mlp, data) = synthetic_problem(&[6, 5, 3], 40, 1, &tanh, Likelihood::Categorical)?;
//! let input = ModelInput {
//!     mlp: &mlp,
//!     data: &data,
//!     description: "a small synthetic problem".into(),
//!     compute: ComputeOptions {
//!         variant: Variant::True,
//!         form: FormChoice::Explicit(NetForm::Full),
//!         backend: Backend::Cpu,
//!         gpu: GpuOptions::default(),
//!     },
//! };
//! let request = ReportRequest { input: ReportInput::Model(input), options: ReportOptions::default() };
//! let report = report::run(&request, &|_done, _total| {})?;
//! assert_eq!(report.subject.form, "full");
//! assert_eq!(report.measures.parameters, mlp.num_params());
//! # Ok::<(), fisher_engine::FisherError>(())
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::{
    lanczos_top_k, measures_from_quadrature, measures_from_spectrum, slq_deflated, ExplicitFisher, FisherOperator,
    ImplicitFisher, LanczosOptions, LayerShape, MeasureOptions, Measures, ParameterLayout, SlqOptions,
    SlqQuadrature, SpectralDensity, Spectrum,
};
use crate::backend::gpu::GpuOptions;
use crate::device::{self, DeviceRequest};
use crate::engine::Backend;
use crate::error::{FisherError, Result};
use crate::fisher::{rows_per_sample, KfacFactors, NetFisher, NetForm, Variant};
use crate::io::fisher_file::{self, FisherFile, Tensors};
use crate::model::{ActivationSpec, DataSource, Dataset, Linear, Mlp};
use crate::output::plot::{self, Histogram};

/// [`FormChoice::Auto`] computes the full F and analyses it exactly up to this many
/// parameters (a dense f64 eigendecomposition: ~1.4 s at P = 2,410 on two cores, growing as
/// P³), and goes implicit above.
pub const AUTO_FULL_MAX_PARAMS: usize = 4096;

/// Dense forms (full, layer) are analysed in f64 with an eigendecomposition; past this many
/// bytes of f64 matrices (the form, widened, and the eigensolver's copy) the run is refused
/// before computing, with the implicit form as the way out.
const MAX_DENSE_BYTES: u128 = 4 << 30;

/// SLQ reorthogonalizes each probe's Lanczos vectors against an f32 basis (steps × 4·P
/// bytes) up to this size, and runs the plain three-term recurrence beyond it (three
/// vectors), so that a long run cannot exhaust memory. Reorthogonalization is worth its
/// memory: on a 2.9 M-parameter MLP the plain recurrence at 64 steps left a quadrature bound
/// on d_eff of 6,583 where the reorthogonalized one at 40 steps left 1,671 (and ghost copies
/// of the large Ritz values waste steps). 512 MiB is 46 steps at that size; with the rest of
/// the run (≈ 280 MiB, plus 4·P bytes per deflated pair) it stays under 1 GiB.
const SLQ_REORTHOGONALIZE_BYTES: u128 = 512 << 20;

/// Bins of the spectral density drawn in the plot.
const DENSITY_BINS: usize = 60;

/// Smoothing (standard deviation in decades) of the SLQ density: its nodes are a few hundred
/// points, which a plain histogram shows as spikes.
const SLQ_DENSITY_SMOOTHING: f64 = 0.1;

/// How many of the largest eigenvalues a report lists by default.
pub const DEFAULT_TOP: usize = 10;

/// The form to analyse a model's Fisher in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormChoice {
    /// Decided once P is known: full up to [`AUTO_FULL_MAX_PARAMS`], implicit above.
    Auto,
    /// F·v products.
    Implicit,
    /// A form computed by the engine (full, diag, layer, kfac) and analysed exactly.
    Explicit(NetForm),
}

impl FormChoice {
    /// The form a model with `parameters` parameters is analysed in: `Auto` resolved (full
    /// up to [`AUTO_FULL_MAX_PARAMS`], unless an implicit setting was `given`; implicit
    /// above), with the reason for that choice; any other choice as it is, with none.
    pub fn resolve(self, parameters: usize, given: Option<&str>) -> (FormChoice, Option<String>) {
        let p = parameters;
        match (self, given) {
            (FormChoice::Auto, None) if p <= AUTO_FULL_MAX_PARAMS => (
                FormChoice::Explicit(NetForm::Full),
                Some(format!("--form auto: full, since P = {p} ≤ {AUTO_FULL_MAX_PARAMS}")),
            ),
            (FormChoice::Auto, Some(setting)) if p <= AUTO_FULL_MAX_PARAMS => {
                (FormChoice::Implicit, Some(format!("--form auto: implicit, since {setting} was given")))
            }
            (FormChoice::Auto, _) => {
                (FormChoice::Implicit, Some(format!("--form auto: implicit, since P = {p} > {AUTO_FULL_MAX_PARAMS}")))
            }
            (other, _) => (other, None),
        }
    }
}

/// The settings of the implicit form.
///
/// The defaults are chosen for a 784-1024-1024-1024-10 MLP (2.9 M parameters) over 4,096
/// samples on two CPU cores: at most 4·40 + 80 + 1 + 4·4 = 257 F·v products at 0.8–2.4 s
/// each (by load) is 3–10 minutes, and 40 reorthogonalized SLQ steps (444 MiB of basis)
/// keep the peak under 1 GiB. Measured there: 223 products, 3 min 25 s, 888 MiB.
#[derive(Debug, Clone, PartialEq)]
pub struct ImplicitSettings {
    /// SLQ probes (≥ 2, for an error bar) [default: 4].
    pub probes: usize,
    /// Lanczos steps per SLQ probe [default: 40].
    pub steps: usize,
    /// Hutchinson rounds for the inter-layer coupling (≥ 2) [default: 4].
    pub coupling_probes: usize,
    /// Relative residual at which a top eigenvalue is accepted [default: 10⁻⁵].
    pub top_tol: f64,
    /// At most this many F·v products for the top eigenvalues [default: 80].
    pub top_iterations: usize,
    /// Seed of the SLQ, Lanczos and coupling probes [default: 0].
    pub seed: u64,
    /// The name of a setting the caller gave explicitly (e.g. its flag), if any: it makes
    /// [`FormChoice::Auto`] choose the implicit form.
    pub given: Option<&'static str>,
}

impl Default for ImplicitSettings {
    fn default() -> Self {
        ImplicitSettings { probes: 4, steps: 40, coupling_probes: 4, top_tol: 1e-5, top_iterations: 80, seed: 0, given: None }
    }
}

/// How a model's Fisher is computed: the variant, the form and the device.
#[derive(Debug, Clone)]
pub struct ComputeOptions {
    /// The variant.
    pub variant: Variant,
    /// The form.
    pub form: FormChoice,
    /// Requested compute path.
    pub backend: Backend,
    /// Adapter choice (completed from the environment by [`DeviceRequest::from_env`]).
    pub gpu: GpuOptions,
}

/// A model and its data, to compute the Fisher of.
#[derive(Debug, Clone)]
pub struct ModelInput<'a> {
    /// The model.
    pub mlp: &'a Mlp,
    /// Its data (the likelihood is the data's), in memory or on disk.
    pub data: &'a dyn DataSource,
    /// How the report names the input (files, or a synthetic problem).
    pub description: String,
    /// How the Fisher is computed.
    pub compute: ComputeOptions,
}

/// A stored result of `fisher compute` or `fisher reduce`.
#[derive(Debug, Clone)]
pub struct StoredInput {
    /// The safetensors file.
    pub path: PathBuf,
    /// The model, for θ and the layer shapes.
    pub weights: Option<PathBuf>,
    /// Activations to read the model with (any will do: θ and the layer shapes do not
    /// depend on them).
    pub activation: ActivationSpec,
}

/// A graph network (read from ONNX) and its data.
#[derive(Debug, Clone)]
pub struct GraphInput<'a> {
    /// The network.
    pub model: &'a crate::graph::fisher::GraphModel,
    /// Its data.
    pub data: &'a Dataset,
    /// The likelihood.
    pub likelihood: crate::model::Likelihood,
    /// How the report names the input.
    pub description: String,
    /// How the Fisher is computed.
    pub compute: ComputeOptions,
}

/// What to analyse.
#[derive(Debug, Clone)]
pub enum ReportInput<'a> {
    /// A model and data.
    Model(ModelInput<'a>),
    /// A graph network and data.
    Graph(GraphInput<'a>),
    /// A stored result.
    Stored(StoredInput),
}

/// What to measure, whatever the input.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportOptions {
    /// How many of the largest eigenvalues.
    pub top: usize,
    /// Scales α of d_eff(α) (at least one; the first is the headline d_eff).
    pub alphas: Vec<f64>,
    /// Damping λ of log det(F + λI) and of the condition number (> 0 for the implicit form).
    pub damping: f64,
    /// Sample size n of the Abbas effective dimension (`None`: N, when N ≥ 19).
    pub samples_n: Option<usize>,
    /// Implicit-form settings.
    pub implicit: ImplicitSettings,
    /// Where to plot the spectrum and its density (PNG, or SVG for a `.svg` path).
    pub plot: Option<PathBuf>,
}

impl Default for ReportOptions {
    fn default() -> Self {
        ReportOptions {
            top: DEFAULT_TOP,
            alphas: vec![1e-3],
            damping: 1e-3,
            samples_n: None,
            implicit: ImplicitSettings::default(),
            plot: None,
        }
    }
}

impl ReportOptions {
    /// Checks the options on their own (what needs the input, such as the damping of the
    /// implicit form, is checked by [`run`]). [`run`] calls it first.
    ///
    /// Errors: [`FisherError::InvalidInput`], naming the setting by its `fisher report` flag.
    pub fn validate(&self) -> Result<()> {
        let s = &self.implicit;
        let refusal = [
            (self.top == 0).then(|| "--top must be at least 1".to_string()),
            self.alphas.is_empty().then(|| "--alpha needs at least one scale".to_string()),
            self.alphas.iter().find(|a| !(a.is_finite() && **a > 0.0)).map(|a| format!("--alpha must be positive and finite, not {a}")),
            (!(self.damping.is_finite() && self.damping >= 0.0))
                .then(|| format!("--damping must be finite and ≥ 0, not {}", self.damping)),
            self.samples_n.filter(|&n| n < 19).map(|n| {
                format!("--samples-n must be at least 19 (the Abbas effective dimension needs κ_n = n/(2π log n) > 1), not {n}")
            }),
            (s.probes < 2).then(|| format!("--probes must be at least 2 (for an error bar), not {}", s.probes)),
            (s.probes > MAX_COUNT).then(|| format!("--probes must be at most {MAX_COUNT}, not {}", s.probes)),
            (s.steps == 0).then(|| "--lanczos-steps must be at least 1".to_string()),
            (s.steps > MAX_COUNT).then(|| format!("--lanczos-steps must be at most {MAX_COUNT}, not {}", s.steps)),
            (s.coupling_probes < 2)
                .then(|| format!("--coupling-probes must be at least 2 (for an error bar), not {}", s.coupling_probes)),
            (s.coupling_probes > MAX_COUNT)
                .then(|| format!("--coupling-probes must be at most {MAX_COUNT}, not {}", s.coupling_probes)),
            (s.top_iterations > MAX_COUNT)
                .then(|| format!("--top-iterations must be at most {MAX_COUNT}, not {}", s.top_iterations)),
            (!(s.top_tol.is_finite() && s.top_tol > 0.0 && s.top_tol < 1.0))
                .then(|| format!("--top-tol must be in (0, 1), not {}", s.top_tol)),
            (s.top_iterations == 0).then(|| "--top-iterations must be at least 1".to_string()),
        ];
        match refusal.into_iter().flatten().next() {
            Some(message) => Err(FisherError::InvalidInput(message)),
            None => Ok(()),
        }
    }
}

/// The most probes, Lanczos steps or F·v products one setting may ask for (10⁵): each is at
/// least one pass over the data, and the work arrays grow with them, so larger counts are
/// mistakes (or overflows) rather than requests.
pub const MAX_COUNT: usize = 100_000;

/// A report to make: the input and the options.
#[derive(Debug, Clone)]
pub struct ReportRequest<'a> {
    /// What to analyse.
    pub input: ReportInput<'a>,
    /// What to measure.
    pub options: ReportOptions,
}

/// Wall-clock seconds per stage.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Seconds {
    /// Reading and checking the inputs, or building the synthetic problem (the caller's
    /// part: [`run`] leaves it 0).
    pub load: f64,
    /// Choosing an adapter, creating the device and building the kernels.
    pub setup: f64,
    /// Computing the form (explicit), tr F from the per-sample norms (implicit), or
    /// reading the stored result.
    pub fisher: f64,
    /// The eigendecomposition (explicit) or the SLQ probes (implicit).
    pub spectrum: f64,
    /// The top-k Lanczos run (implicit; 0 for explicit forms, whose spectrum holds them).
    pub top: f64,
    /// The rest of the measures: θᵀFθ and coupling (implicit), or θᵀFθ, coupling and the
    /// spectral functions (explicit).
    pub measures: f64,
    /// Rendering and writing the plot.
    pub plot: f64,
}

/// d_eff at one scale.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct EffectiveDimension {
    /// α.
    pub alpha: f64,
    /// d_eff(α).
    pub value: f64,
    /// Its standard error (implicit form), `None` when exact.
    pub std_error: Option<f64>,
    /// The bound on its quadrature error (implicit form), `None` when exact.
    pub quadrature_bound: Option<f64>,
}

/// The implicit form's settings and work.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImplicitWork {
    /// SLQ probes.
    pub probes: usize,
    /// Lanczos steps per probe (at most P).
    pub lanczos_steps: usize,
    /// Coupling rounds.
    pub coupling_probes: usize,
    /// Top-k tolerance.
    pub top_tol: f64,
    /// Top-k F·v cap.
    pub top_iterations: usize,
    /// Probe seed.
    pub seed: u64,
    /// The rank bound N·R.
    pub rank_bound: usize,
    /// Whether SLQ reorthogonalized (up to 512 MiB of basis; the plain recurrence beyond).
    pub reorthogonalized: bool,
    /// Converged top eigenpairs deflated from the SLQ probes.
    pub deflated: usize,
}

/// What was analysed, and where.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Subject {
    /// `implicit`, `full`, `diag`, `layer`, `kfac`, `blocks` or `gram`.
    pub form: String,
    /// N, when known.
    pub samples: Option<usize>,
    /// e.g. `784-1024-10 relu MLP`, when a model is known.
    pub architecture: Option<String>,
    /// Layer widths (input, outputs), when known.
    pub layers: Option<Vec<usize>>,
    /// Sequential indices of the layers, when known.
    pub layer_indices: Option<Vec<usize>>,
    /// The variant's name, when known.
    pub variant: Option<String>,
    /// The likelihood's name, when known.
    pub likelihood: Option<String>,
    /// The model and data ([`ModelInput::description`]), or the stored file.
    pub input: String,
    /// Where F (or F·v) was computed.
    pub backend: Option<String>,
    /// GPU adapter name, when on a GPU.
    pub adapter: Option<String>,
    /// Why [`Backend::Auto`] fell back to the CPU.
    pub fallback: Option<String>,
    /// Whether a stored result was analysed (then `backend` is where it was computed).
    pub stored: bool,
    /// Why [`FormChoice::Auto`] chose what it chose.
    pub form_reason: Option<String>,
}

/// What a report found. It serializes as one flat object: the [`Subject`]'s fields, the
/// [`Measures`]' fields, then the rest.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// What was analysed, and where.
    #[serde(flatten)]
    pub subject: Subject,
    /// The measures.
    #[serde(flatten)]
    pub measures: Measures,
    /// d_eff at every requested α (the first is `measures.effective_dimension`).
    pub effective_dimensions: Vec<EffectiveDimension>,
    /// Implicit-form settings and work (`None` for exact forms).
    pub implicit: Option<ImplicitWork>,
    /// Notes on measures left out or uncertain (without a final period).
    pub notes: Vec<String>,
    /// The plot written.
    #[serde(serialize_with = "path_text")]
    pub plot: Option<PathBuf>,
    /// Seconds per stage.
    pub seconds: Seconds,
}

/// A path as text (lossy where it is not UTF-8, as it is displayed).
fn path_text<S: serde::Serializer>(path: &Option<PathBuf>, serializer: S) -> std::result::Result<S::Ok, S::Error> {
    serde::Serialize::serialize(&path.as_ref().map(|p| p.display().to_string()), serializer)
}

/// What an analysis found, before it is put in a [`Report`].
struct Analysis {
    measures: Measures,
    effective_dimensions: Vec<EffectiveDimension>,
    implicit: Option<ImplicitWork>,
    notes: Vec<String>,
    plot: Option<PathBuf>,
    /// Seconds: spectrum, top, measures, plot.
    seconds: (f64, f64, f64, f64),
}

impl Report {
    /// The report of `subject`: what was known before the analysis (notes, seconds) and
    /// what the analysis found.
    fn new(subject: Subject, mut notes: Vec<String>, mut seconds: Seconds, analysis: Analysis) -> Report {
        notes.extend(analysis.notes);
        (seconds.spectrum, seconds.top, seconds.measures, seconds.plot) = analysis.seconds;
        Report {
            subject,
            measures: analysis.measures,
            effective_dimensions: analysis.effective_dimensions,
            implicit: analysis.implicit,
            notes,
            plot: analysis.plot,
            seconds,
        }
    }
}

/// Makes the report `request` asks for. `progress(done, total)` is called as F·v products
/// are computed (implicit form only; `total` is the most the run can take, and grows if it
/// is passed).
///
/// Errors: [`FisherError::InvalidInput`] for options that [`ReportOptions::validate`]
/// refuses, a request that does not fit its input (the
/// implicit form without damping, a dense form too large to analyse, a model of another
/// size than the stored Fisher) or a bad plot extension; [`FisherError::Io`] for a stored
/// file that cannot be read or analysed, or a plot that cannot be written; the engine's and
/// the device's errors as they come.
pub fn run(request: &ReportRequest<'_>, progress: &dyn Fn(usize, usize)) -> Result<Report> {
    request.options.validate()?;
    if let Some(path) = &request.options.plot {
        plot::check_plot_path(path)?;
    }
    match &request.input {
        ReportInput::Model(input) => run_model(input, &request.options, progress),
        ReportInput::Graph(input) => run_graph(input, &request.options, progress),
        ReportInput::Stored(input) => run_stored(input, &request.options),
    }
}

/// The result of [`run_top`]: the largest eigenvalues of the implicit Fisher and nothing
/// else (`fisher report --form implicit --only top`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct TopReport {
    /// What was analysed, and where.
    #[serde(flatten)]
    pub subject: Subject,
    /// P.
    pub parameters: usize,
    /// The k largest eigenvalues, descending.
    pub top_eigenvalues: Vec<f64>,
    /// Their residual bounds ‖F x − θ x‖ (each eigenvalue is within it of an eigenvalue of F,
    /// and in practice within residual²/gap).
    pub top_residuals: Vec<f64>,
    /// Whether every value met `top_tol` (relative residual).
    pub lanczos_converged: bool,
    /// The relative residual asked for (`--top-tol`).
    pub top_tol: f64,
    /// Where Lanczos ran: `gram` (on K = BBᵀ/N in ℝ^{N·R}, when the N·R gradient rows are
    /// fewer than P and fit in memory; same non-zero eigenvalues) or `implicit` (on F).
    pub top_method: &'static str,
    /// F·v products used.
    pub fv_products: usize,
    /// Thick restarts of the Lanczos basis.
    pub restarts: usize,
    /// Notes (without a final period).
    pub notes: Vec<String>,
    /// Seconds per stage: `load` (the caller's), `setup` and `top`.
    pub seconds: Seconds,
}

/// The `options.top` largest eigenvalues of the implicit Fisher of a model or graph and
/// nothing else: one thick-restart Lanczos run ([`lanczos_top_k`], `--top-tol`,
/// `--top-iterations`), on an MLP through [`super::top_eigenvalues`] (on the output-space
/// twin K = BBᵀ/N when N·R < P, else on F with the forward pass kept between products), on a
/// graph on its implicit F. No trace, SLQ or coupling pass runs. `progress(done, total)` follows the
/// F·v products.
///
/// Errors: [`FisherError::Request`] for a stored input (its spectrum is computed whole:
/// drop `--only top`) or an explicit form; otherwise those of [`run`].
pub fn run_top(request: &ReportRequest<'_>, progress: &dyn Fn(usize, usize)) -> Result<TopReport> {
    let options = &request.options;
    options.validate()?;
    if options.plot.is_some() {
        return Err(FisherError::Request("--plot draws the spectral density, which --only top does not compute".into()));
    }
    let compute = match &request.input {
        ReportInput::Model(input) => &input.compute,
        ReportInput::Graph(input) => &input.compute,
        ReportInput::Stored(_) => {
            return Err(FisherError::Request(
                "--only top applies to --form implicit on a model and data; a stored result's spectrum is computed whole \
                 (drop --only top)"
                    .into(),
            ))
        }
    };
    if compute.form != FormChoice::Implicit {
        return Err(FisherError::Request("--only top needs --form implicit".into()));
    }
    let mut seconds = Seconds::default();
    let start = Instant::now();
    let device = device::open(&DeviceRequest::from_env(compute.backend, compute.gpu.clone())?)?;
    seconds.setup = start.elapsed().as_secs_f64();
    let engine = &device.engine;
    let s = &options.implicit;
    let lanczos = top_lanczos(options);
    let hook = move |done: usize| progress(done, s.top_iterations.max(done));
    progress(0, s.top_iterations);
    let start = Instant::now();
    let mut method = "implicit";
    let (subject, p, top) = match &request.input {
        ReportInput::Model(input) => {
            let (mlp, data) = (input.mlp, input.data);
            let found = super::implicit::top_eigenvalues(engine, mlp, data, compute.variant, &lanczos, &hook)?;
            method = found.method;
            let top = found.result;
            let subject = model_subject("implicit", input, compute.variant, &device, None);
            (subject, mlp.num_params(), top)
        }
        ReportInput::Graph(input) => {
            let (model, data) = (input.model, input.data);
            let op = ImplicitFisher::for_graph(engine, model, data, input.likelihood, compute.variant)?.on_product(hook);
            let top = lanczos_top_k(&op, &lanczos)?;
            let p = model.graph.param_count();
            let described = format!("{} operators, P = {p}", model.graph.nodes.len());
            let subject = graph_subject("implicit", input, described, compute.variant, &device, None);
            (subject, p, top)
        }
        ReportInput::Stored(_) => unreachable!("refused above"),
    };
    seconds.top = start.elapsed().as_secs_f64();
    let mut notes = Vec::new();
    if !top.converged {
        notes.push(format!(
            "top eigenvalues: Lanczos stopped at --top-iterations {} before every value met --top-tol {:.0e}; \
             the smaller ones may be low",
            s.top_iterations, s.top_tol
        ));
    }
    Ok(TopReport {
        subject,
        parameters: p,
        top_eigenvalues: top.values,
        top_residuals: top.residuals,
        lanczos_converged: top.converged,
        top_tol: s.top_tol,
        top_method: method,
        fv_products: top.iterations,
        restarts: top.restarts,
        notes,
        seconds,
    })
}

/// The subject of a report on an MLP and its data, computed on `device`.
fn model_subject(form: &str, input: &ModelInput<'_>, variant: Variant, device: &device::Opened, form_reason: Option<String>) -> Subject {
    let mlp = input.mlp;
    Subject {
        form: form.to_string(),
        samples: Some(input.data.len()),
        architecture: Some(mlp.architecture()),
        layers: Some(mlp.widths()),
        layer_indices: Some(mlp.layers.iter().map(|l| l.index).collect()),
        variant: Some(variant.name().to_string()),
        likelihood: Some(input.data.likelihood().name().to_string()),
        input: input.description.clone(),
        backend: Some(device.engine.device_info()),
        adapter: device.adapter.as_ref().map(|a| a.name.clone()),
        fallback: device.fallback.clone(),
        stored: false,
        form_reason,
    }
}

/// The subject of a report on a graph network (`described`: its size) and its data.
fn graph_subject(
    form: &str,
    input: &GraphInput<'_>,
    described: String,
    variant: Variant,
    device: &device::Opened,
    form_reason: Option<String>,
) -> Subject {
    Subject {
        form: form.to_string(),
        samples: Some(input.data.len()),
        architecture: Some(described),
        layers: None,
        layer_indices: None,
        variant: Some(variant.name().to_string()),
        likelihood: Some(input.likelihood.name().to_string()),
        input: input.description.clone(),
        backend: Some(device.engine.device_info()),
        adapter: device.adapter.as_ref().map(|a| a.name.clone()),
        fallback: device.fallback.clone(),
        stored: false,
        form_reason,
    }
}

/// The options shared by every form.
fn measure_options<'a>(
    options: &ReportOptions,
    dim: usize,
    theta: Option<&'a [f64]>,
    layout: Option<&'a ParameterLayout>,
    samples: Option<usize>,
) -> MeasureOptions<'a> {
    let s = &options.implicit;
    MeasureOptions {
        alpha: options.alphas[0],
        damping: options.damping,
        top: options.top,
        samples,
        theta,
        layout,
        slq: SlqOptions { probes: s.probes, steps: s.steps, seed: s.seed, reorthogonalize: reorthogonalize(s.steps, dim) },
        lanczos: top_lanczos(options),
        coupling_probes: s.coupling_probes,
    }
}

/// The top-k Lanczos run of the implicit form (`--top`, `--top-tol`, `--top-iterations`, its
/// own stream of the probe seed), without vectors.
fn top_lanczos(options: &ReportOptions) -> LanczosOptions {
    let s = &options.implicit;
    LanczosOptions {
        k: options.top,
        tol: s.top_tol,
        max_iterations: s.top_iterations,
        max_basis: None,
        seed: s.seed ^ 0x7097_0000_0000_0001,
        vectors: false,
    }
}

/// Whether SLQ keeps a basis for full reorthogonalization (see [`SLQ_REORTHOGONALIZE_BYTES`]).
fn reorthogonalize(steps: usize, dim: usize) -> bool {
    steps.min(dim) as u128 * dim as u128 * 4 <= SLQ_REORTHOGONALIZE_BYTES
}

/// The Abbas sample size: `samples_n`, else N when N ≥ 19, else none (with a note).
fn abbas_samples(options: &ReportOptions, samples: Option<usize>, notes: &mut Vec<String>) -> Option<usize> {
    match (options.samples_n, samples) {
        (Some(n), _) => Some(n),
        (None, Some(n)) if n >= 19 => Some(n),
        (None, Some(n)) => {
            notes.push(format!(
                "Abbas d_n needs n ≥ 19 (κ_n = n/(2π log n) > 1); N = {n} is too few (set --samples-n)"
            ));
            None
        }
        (None, None) => {
            notes.push("Abbas d_n: the stored result does not record N (set --samples-n)".into());
            None
        }
    }
}

/// Bytes of f64 dense matrices a form is analysed with (form widened + eigensolver copy +
/// the f32 result), or `None` for forms that stay small.
fn dense_bytes(mlp: &Mlp, form: NetForm) -> Option<(u128, String)> {
    let p = mlp.num_params() as u128;
    match form {
        NetForm::Full => Some((p.saturating_mul(p).saturating_mul(20), format!("P×P = {p}×{p}"))),
        NetForm::Layer => {
            let values = mlp.layers.iter().fold(0u128, |sum, l| sum.saturating_add((l.num_params() as u128).saturating_pow(2)));
            Some((values.saturating_mul(20), "Σ_l P_l²".into()))
        }
        // The factors are small next to P² but not bounded by P: a 100000-wide input makes
        // a 10¹⁰-entry A (and the analysis expands G ⊗ A per layer for its spectrum).
        NetForm::Kfac => {
            let values = mlp.layers.iter().fold(0u128, |sum, l| {
                let a = l.fan_in() as u128 + u128::from(l.bias.is_some());
                sum.saturating_add(a.saturating_pow(2)).saturating_add((l.fan_out() as u128).saturating_pow(2))
            });
            Some((values.saturating_mul(20), "Σ_l (in+1)² + out²".into()))
        }
        _ => None,
    }
}

/// `4.0 GiB`.
fn gib(bytes: u128) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

fn run_model(input: &ModelInput<'_>, options: &ReportOptions, progress: &dyn Fn(usize, usize)) -> Result<Report> {
    let ModelInput { mlp, data, .. } = *input;
    let ComputeOptions { variant, form, backend, ref gpu } = input.compute;
    let mut seconds = Seconds::default();
    let p = mlp.num_params();
    let n = data.len();

    let (form, form_reason) = form.resolve(p, options.implicit.given);
    if form == FormChoice::Implicit && options.damping == 0.0 {
        return Err(FisherError::Request(
            "--damping must be positive for the implicit form (SLQ cannot tell a singular F, whose log det is −∞, \
             from a nearly singular one)"
                .into(),
        ));
    }
    if let FormChoice::Explicit(net_form) = form {
        if let Some((bytes, what)) = dense_bytes(mlp, net_form) {
            if bytes > MAX_DENSE_BYTES {
                return Err(FisherError::Request(format!(
                    "--form {} analyses {what} values in f64 (about {} with the eigensolver's copy), beyond the \
                     {} this command allows; --form implicit works for any model size",
                    net_form.name(),
                    gib(bytes),
                    gib(MAX_DENSE_BYTES)
                )));
            }
        }
    }

    let start = Instant::now();
    let device = device::open(&DeviceRequest::from_env(backend, gpu.clone())?)?;
    seconds.setup = start.elapsed().as_secs_f64();
    let engine = &device.engine;

    let layout = ParameterLayout::from_mlp(mlp)?;
    let theta: Vec<f64> = mlp.parameters().iter().map(|&v| f64::from(v)).collect();
    let mut notes = Vec::new();
    let abbas_n = abbas_samples(options, Some(n), &mut notes);
    let measure = measure_options(options, p, Some(&theta), Some(&layout), abbas_n);
    let described = format!("{}, {} Fisher, N = {n}", mlp.architecture(), variant.name());

    let start = Instant::now();
    let (form_name, analysis) = match form {
        FormChoice::Explicit(net_form) => {
            let result = engine.fisher(mlp, data, variant, net_form)?;
            let fisher = ExplicitFisher::from_net(&result, Some(&layout))?;
            drop(result);
            seconds.fisher = start.elapsed().as_secs_f64();
            let title = format!("Fisher spectrum ({} form): {described}", net_form.name());
            (net_form.name(), analyse_exact(options, &fisher, &measure, &title)?)
        }
        FormChoice::Implicit => {
            let NetFisher::Norms(norms) = engine.fisher(mlp, data, variant, NetForm::Norms)? else {
                unreachable!("the norms form returns norms")
            };
            let trace = norms.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
            seconds.fisher = start.elapsed().as_secs_f64();
            let rank_bound = n.saturating_mul(rows_per_sample(variant, mlp.output_dim()));
            let op = ImplicitFisher::new(engine, mlp, data, variant)?.with_known(Some(trace), Some(rank_bound));
            let title = format!("Fisher spectrum (implicit): {described}");
            ("implicit", analyse_implicit(options, op, &measure, &title, progress)?)
        }
        FormChoice::Auto => unreachable!("auto is resolved above"),
    };
    let subject = model_subject(form_name, input, variant, &device, form_reason);
    Ok(Report::new(subject, notes, seconds, analysis))
}

fn run_graph(input: &GraphInput<'_>, options: &ReportOptions, progress: &dyn Fn(usize, usize)) -> Result<Report> {
    let GraphInput { model, data, likelihood, .. } = *input;
    let ComputeOptions { variant, form, backend, ref gpu } = input.compute;
    let graph = &model.graph;
    let mut seconds = Seconds::default();
    let p = graph.param_count();
    let n = data.len();
    model.check_data(data, likelihood)?;
    let (form, form_reason) = form.resolve(p, options.implicit.given);
    if form == FormChoice::Implicit && options.damping == 0.0 {
        return Err(FisherError::Request(
            "--damping must be positive for the implicit form (SLQ cannot tell a singular F, whose log det is −∞, \
             from a nearly singular one)"
                .into(),
        ));
    }
    let modules = graph.modules();
    let offsets = graph.param_offsets();
    let ranges: Vec<(usize, usize)> =
        modules.iter().map(|(_, idx)| (offsets[idx[0]], idx.iter().map(|&i| graph.params[i].len()).sum())).collect();
    let layout = ParameterLayout::from_ranges(ranges, p)?;
    if let FormChoice::Explicit(net_form) = form {
        let bytes = match net_form {
            NetForm::Full => Some((p as u128).pow(2) * 20),
            NetForm::Layer => Some(layout.ranges().iter().map(|&(_, l)| (l as u128).pow(2) * 20).sum()),
            NetForm::Kfac | NetForm::Grads | NetForm::Norms => {
                return Err(FisherError::Request(format!(
                    "--form {} is not analysed for --model networks; use full, diag, layer or implicit",
                    net_form.name()
                )))
            }
            NetForm::Diagonal => None,
        };
        if let Some(bytes) = bytes.filter(|&b| b > MAX_DENSE_BYTES) {
            return Err(FisherError::Request(format!(
                "--form {} analyses about {} in f64, beyond the {} this command allows; --form implicit works for any model size",
                net_form.name(),
                gib(bytes),
                gib(MAX_DENSE_BYTES)
            )));
        }
    }
    let start = Instant::now();
    let device = device::open(&DeviceRequest::from_env(backend, gpu.clone())?)?;
    seconds.setup = start.elapsed().as_secs_f64();
    let engine = &device.engine;
    let theta: Vec<f64> = graph.theta().iter().map(|&v| f64::from(v)).collect();
    let mut notes = Vec::new();
    let abbas_n = abbas_samples(options, Some(n), &mut notes);
    let measure = measure_options(options, p, Some(&theta), Some(&layout), abbas_n);
    let described = format!("{} operators, P = {p}, {} Fisher, N = {n}", graph.nodes.len(), variant.name());
    let all = crate::graph::fisher::Selection::all(graph);
    let start = Instant::now();
    let (form_name, analysis) = match form {
        FormChoice::Explicit(net_form) => {
            let result = engine.graph_fisher(model, data, likelihood, variant, net_form, &all)?;
            let fisher = ExplicitFisher::from_net(&result, Some(&layout))?;
            drop(result);
            seconds.fisher = start.elapsed().as_secs_f64();
            let title = format!("Fisher spectrum ({} form): {described}", net_form.name());
            (net_form.name(), analyse_exact(options, &fisher, &measure, &title)?)
        }
        FormChoice::Implicit => {
            let NetFisher::Norms(norms) = engine.graph_fisher(model, data, likelihood, variant, NetForm::Norms, &all)? else {
                unreachable!("the norms form returns norms")
            };
            let trace = norms.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
            seconds.fisher = start.elapsed().as_secs_f64();
            let rank_bound = n.saturating_mul(rows_per_sample(variant, graph.outputs()));
            let op = ImplicitFisher::for_graph(engine, model, data, likelihood, variant)?.with_known(Some(trace), Some(rank_bound));
            let title = format!("Fisher spectrum (implicit): {described}");
            ("implicit", analyse_implicit(options, op, &measure, &title, progress)?)
        }
        FormChoice::Auto => unreachable!("auto is resolved above"),
    };
    let subject = graph_subject(form_name, input, described.clone(), variant, &device, form_reason);
    Ok(Report::new(subject, notes, seconds, analysis))
}

/// Writes the spectrum plot, when one is asked for: `eigenvalues` above `density`.
fn write_plot(
    options: &ReportOptions,
    eigenvalues: &[f64],
    density: impl FnOnce() -> Result<SpectralDensity>,
    title: &str,
) -> Result<(Option<PathBuf>, f64)> {
    let Some(path) = &options.plot else { return Ok((None, 0.0)) };
    let start = Instant::now();
    let density = density()?;
    let histogram = Histogram { edges: density.edges, mass: density.mass };
    plot::spectrum_plot(path, eigenvalues, Some(&histogram), title)?;
    Ok((Some(path.clone()), start.elapsed().as_secs_f64()))
}

/// Every measure of a form, exactly; the plot from its spectrum.
fn analyse_exact(
    options: &ReportOptions,
    fisher: &ExplicitFisher,
    measure: &MeasureOptions<'_>,
    title: &str,
) -> Result<Analysis> {
    let start = Instant::now();
    let spectrum: Spectrum = fisher.spectrum()?;
    let spectrum_s = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let measures = measures_from_spectrum(fisher, &spectrum, measure)?;
    let effective_dimensions = options
        .alphas
        .iter()
        .map(|&alpha| {
            let value = spectrum.effective_dimension(alpha)?;
            Ok(EffectiveDimension { alpha, value, std_error: None, quadrature_bound: None })
        })
        .collect::<Result<_>>()?;
    let measures_s = start.elapsed().as_secs_f64();
    let (plot, plot_s) =
        write_plot(options, &spectrum.eigenvalues, || SpectralDensity::from_spectrum(&spectrum, DENSITY_BINS, None, 0.0), title)?;
    Ok(Analysis { measures, effective_dimensions, implicit: None, notes: Vec::new(), plot, seconds: (spectrum_s, 0.0, measures_s, plot_s) })
}

/// The converged pairs of a top-k run (residual within `tol` of the value), to deflate
/// from SLQ: at most P − 1 of them, so that the probes keep a space to explore.
fn converged_pairs(top: &mut super::LanczosResult, tol: f64, dim: usize) -> Vec<(f64, Vec<f64>)> {
    let lambda_max = top.values.first().copied().unwrap_or(0.0);
    top.values
        .iter()
        .zip(&top.residuals)
        .zip(top.vectors.take().unwrap_or_default())
        .filter(|((&value, &residual), _)| residual <= tol * value.abs() + 1e-12 * lambda_max)
        .map(|((&value, _), vector)| (value, vector))
        .take(dim.saturating_sub(1))
        .collect()
}

/// The measures of the implicit form (SLQ, Lanczos, Hutchinson), reporting the F·v products
/// to `progress`; the plot from the top Ritz values and the SLQ density.
fn analyse_implicit(
    options: &ReportOptions,
    op: ImplicitFisher<'_>,
    measure: &MeasureOptions<'_>,
    title: &str,
    progress: &dyn Fn(usize, usize),
) -> Result<Analysis> {
    let p = op.dim();
    let rank_bound = op.rank_bound().unwrap_or(p);
    let s = &options.implicit;
    let layers = measure.layout.map_or(0, |l| l.ranges().len());
    // The most F·v products the run can take (SLQ probes may stop early on an exhausted
    // Krylov space, and Lanczos when converged).
    let total = s.probes * s.steps.min(p) + s.top_iterations + 1 + s.coupling_probes * layers;
    progress(0, total);
    let op = op.on_product(move |done| progress(done, total.max(done)));

    // The top eigenpairs first: their vectors are deflated from the SLQ probes, which then
    // resolve the small end of the spectrum (log det, d_eff, Abbas) with far fewer steps.
    let start = Instant::now();
    let mut top = lanczos_top_k(&op, &LanczosOptions { vectors: true, ..measure.lanczos.clone() })?;
    let top_s = start.elapsed().as_secs_f64();
    let pairs = converged_pairs(&mut top, s.top_tol, p);
    let deflated = pairs.len();
    let start = Instant::now();
    let quadrature = slq_deflated(&op, pairs, &measure.slq)?;
    let spectrum_s = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let measures = measures_from_quadrature(&op, &quadrature, Some(&top), measure)?;
    let measures_s = start.elapsed().as_secs_f64();
    debug_assert_eq!(op.products(), measures.fv_products, "every F·v product is counted");
    let effective_dimensions = effective_dimensions(&quadrature, &options.alphas);
    let mut notes = Vec::new();
    if rank_bound >= p {
        notes.push(format!(
            "condition number: unknown for the implicit form when N·R = {rank_bound} ≥ P (λ_min is not estimated)"
        ));
    }
    if measures.lanczos_converged == Some(false) {
        notes.push(format!(
            "top eigenvalues: Lanczos stopped at --top-iterations {} before every value met --top-tol {:.0e}; \
             the smaller ones may be low",
            s.top_iterations, s.top_tol
        ));
    }
    let (plot, plot_s) = write_plot(
        options,
        &measures.top_eigenvalues,
        || quadrature.density(DENSITY_BINS, None, SLQ_DENSITY_SMOOTHING),
        title,
    )?;
    let implicit = ImplicitWork {
        probes: s.probes,
        lanczos_steps: s.steps.min(p),
        coupling_probes: s.coupling_probes,
        top_tol: s.top_tol,
        top_iterations: s.top_iterations,
        seed: s.seed,
        rank_bound,
        reorthogonalized: measure.slq.reorthogonalize,
        deflated,
    };
    Ok(Analysis {
        measures,
        effective_dimensions,
        implicit: Some(implicit),
        notes,
        plot,
        seconds: (spectrum_s, top_s, measures_s, plot_s),
    })
}

/// d_eff(α) = Σ λᵢ/(λᵢ + α) at each α from the SLQ quadrature, with its error bar and
/// quadrature bound.
fn effective_dimensions(quadrature: &SlqQuadrature, alphas: &[f64]) -> Vec<EffectiveDimension> {
    alphas
        .iter()
        .map(|&alpha| {
            let (e, bound) = quadrature.bracketed(|x| x / (x + alpha));
            EffectiveDimension { alpha, value: e.value, std_error: Some(e.std_error), quadrature_bound: Some(bound) }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Stored results

/// A stored result rebuilt: the form, its name, and what the metadata says.
struct Stored {
    fisher: ExplicitFisher,
    form: String,
    /// Layer shapes from the metadata (`layers` widths) or the tensors, when known.
    shapes: Option<Vec<LayerShape>>,
}

/// Layer shapes from the file's `layers` widths (input, then each layer's output), with the
/// bias of each layer told by `has_bias(l, fan_in, fan_out)`.
fn shapes_from_widths(
    widths: Option<&[usize]>,
    mut has_bias: impl FnMut(usize, usize, usize) -> Option<bool>,
) -> Option<Vec<LayerShape>> {
    let widths = widths.filter(|w| w.len() >= 2)?;
    widths
        .windows(2)
        .enumerate()
        .map(|(l, w)| Some(LayerShape { fan_in: w[0], fan_out: w[1], has_bias: has_bias(l, w[0], w[1])? }))
        .collect()
}

/// The analysable form of a stored result (read by [`fisher_file::read`]), with the layer
/// shapes where the model or the file tells them.
fn rebuild(path: &Path, file: FisherFile, model_shapes: Option<&[LayerShape]>) -> Result<Stored> {
    let bad = |message: &str| FisherError::io(path, message);
    let form = file.form().to_string();
    let widths = file.widths();
    let parameters = file.parameters();
    let model = || model_shapes.map(<[LayerShape]>::to_vec);
    if matches!(file.tensors, Tensors::Kfac(_)) && file.metadata.contains_key("parameter_names") {
        return Err(bad(
            "the KFAC factors of a --model (ONNX) result cover only its Linear and Conv layers and are not analysed; \
             analyse a diag, layer or full result, or run fisher report --model … --form implicit",
        ));
    }
    let (fisher, shapes) = match file.tensors {
        Tensors::Full(f) => {
            let shapes = model().or_else(|| {
                // Every layer biased, or none: the only cases P alone can tell.
                let p = parameters?;
                let all = |bias: bool| shapes_from_widths(widths.as_deref(), |_, _, _| Some(bias));
                [all(true), all(false)].into_iter().flatten().find(|s| s.iter().map(LayerShape::num_params).sum::<usize>() == p)
            });
            (ExplicitFisher::from_net(&NetFisher::Full(f), None)?, shapes)
        }
        Tensors::Diagonal(d) => (ExplicitFisher::from_net(&NetFisher::Diagonal(d), None)?, model()),
        Tensors::Gram(k) => {
            let p = parameters
                .ok_or_else(|| bad("a Gram matrix needs the number of parameters P ('parameters' in the metadata)"))?;
            (ExplicitFisher::from_matrix(&crate::FisherMatrix::Gram(k))?.with_parameters(p), None)
        }
        Tensors::Blocks(blocks) => {
            let sizes: Vec<usize> = blocks.iter().map(|b| b.1.nrows()).collect();
            let shapes = model().or_else(|| {
                shapes_from_widths(widths.as_deref(), |l, i, o| match sizes.get(l) {
                    Some(&s) if s == o * (i + 1) => Some(true),
                    Some(&s) if s == o * i => Some(false),
                    _ => None,
                })
            });
            let blocks = blocks.into_iter().map(|b| b.1).collect();
            (ExplicitFisher::from_net(&NetFisher::Layer(blocks), None)?, shapes)
        }
        Tensors::Kfac(factors) => {
            let a_sizes: Vec<usize> = factors.iter().map(|f| f.1.a.nrows()).collect();
            let shapes = match model() {
                Some(s) => s,
                None => shapes_from_widths(widths.as_deref(), |l, i, _| match a_sizes.get(l) {
                    Some(&a) if a == i + 1 => Some(true),
                    Some(&a) if a == i => Some(false),
                    _ => None,
                })
                .ok_or_else(|| {
                    bad("KFAC analysis needs the layer shapes (which column of A is the bias): the metadata has no \
                         matching 'layers' widths; give the model with --weights")
                })?,
            };
            let layout = ParameterLayout::from_shapes(&shapes)?;
            let factors: Vec<KfacFactors> = factors.into_iter().map(|f| f.1).collect();
            (ExplicitFisher::from_net(&NetFisher::Kfac(factors), Some(&layout))?, Some(shapes))
        }
        Tensors::Grads(_) => {
            return Err(bad(
                "a grads result holds the square-root rows G; analyse the model with --form full or implicit instead",
            ))
        }
        Tensors::Norms(_) => return Err(bad("a norms result gives only tr F (the mean of the norms), not a spectrum")),
    };
    Ok(Stored { fisher, form, shapes })
}

fn run_stored(input: &StoredInput, options: &ReportOptions) -> Result<Report> {
    let StoredInput { path, weights, activation } = input;
    let mut seconds = Seconds::default();
    let start = Instant::now();
    let mlp = weights.as_ref().map(|w| Mlp::from_safetensors(w, activation)).transpose()?;
    let model_shapes: Option<Vec<LayerShape>> = mlp.as_ref().map(|m| m.layers.iter().map(LayerShape::from).collect());
    let file = fisher_file::read(path)?;
    let samples = file.samples();
    let widths = file.widths();
    let layer_indices = file.layer_indices();
    let variant = file.metadata.get("variant").cloned();
    let likelihood = file.metadata.get("likelihood").cloned();
    let backend = file.backend().map(str::to_string);
    let model_widths: Option<Vec<usize>> = mlp.as_ref().map(Mlp::widths);
    let architecture = file.architecture(model_widths.as_deref());
    let stored = rebuild(path, file, model_shapes.as_deref())?;
    seconds.fisher = start.elapsed().as_secs_f64();
    let p = stored.fisher.parameters();
    let gram = matches!(stored.fisher, ExplicitFisher::Gram(_));
    if let (Some(m), Some(weights)) = (&mlp, weights) {
        if m.num_params() != p {
            return Err(FisherError::Request(format!(
                "{} has {} parameters but {} is the Fisher of {p}",
                weights.display(),
                m.num_params(),
                path.display()
            )));
        }
        if gram {
            return Err(FisherError::Request(
                "--weights gives θ for the Fisher–Rao norm, which a Gram matrix (sample space) cannot measure".into(),
            ));
        }
    }
    let layout = match &stored.shapes {
        Some(shapes) if shapes.iter().map(LayerShape::num_params).sum::<usize>() == p => {
            Some(ParameterLayout::from_shapes(shapes)?)
        }
        _ => None,
    };
    let theta: Option<Vec<f64>> = mlp.as_ref().map(|m| m.parameters().iter().map(|&v| f64::from(v)).collect());
    let mut notes = Vec::new();
    if theta.is_none() && !gram {
        notes.push("Fisher–Rao norm: needs θ; give the model with --weights".into());
    }
    if layout.is_none() && matches!(stored.fisher, ExplicitFisher::Full(_) | ExplicitFisher::Blocks(_)) {
        notes.push("coupling: needs the layer shapes; give the model with --weights".into());
    }
    let abbas_n = abbas_samples(options, samples, &mut notes);
    let measure = measure_options(options, p, theta.as_deref(), layout.as_ref(), abbas_n);
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let title = format!("Fisher spectrum ({} form): {name}", stored.form);
    let analysis = analyse_exact(options, &stored.fisher, &measure, &title)?;
    let subject = Subject {
        form: stored.form,
        samples,
        architecture,
        layers: widths.or(model_widths),
        layer_indices: layer_indices
            .or_else(|| mlp.as_ref().map(|m| m.layers.iter().map(|l: &Linear| l.index).collect())),
        variant,
        likelihood,
        input: path.display().to_string(),
        backend,
        adapter: None,
        fallback: None,
        stored: true,
        form_reason: None,
    };
    Ok(Report::new(subject, notes, seconds, analysis))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Engine;
    use crate::model::{problem::synthetic_problem, Likelihood};

    /// P = 6·5 + 5 + 5·3 + 3 = 53 parameters, N = 40, true Fisher: rank F ≤ N·R = 120 ≥ P.
    fn problem() -> (Mlp, Dataset) {
        let tanh = ActivationSpec::parse("tanh").unwrap();
        synthetic_problem(&[6, 5, 3], 40, 3, &tanh, Likelihood::Categorical).unwrap()
    }

    fn model<'a>(mlp: &'a Mlp, data: &'a Dataset, form: FormChoice) -> ReportInput<'a> {
        let compute = ComputeOptions { variant: Variant::True, form, backend: Backend::Cpu, gpu: GpuOptions::default() };
        ReportInput::Model(ModelInput { mlp, data, description: "test problem".into(), compute })
    }

    fn options() -> ReportOptions {
        ReportOptions { top: 5, alphas: vec![1e-2, 1e-1], damping: 1e-2, ..ReportOptions::default() }
    }

    fn report(input: ReportInput<'_>, options: ReportOptions) -> Result<Report> {
        run(&ReportRequest { input, options }, &|_, _| {})
    }

    #[track_caller]
    fn close(a: f64, b: f64, rel: f64, what: &str) {
        assert!((a - b).abs() <= rel * b.abs().max(1e-12), "{what}: {a} vs {b}");
    }

    #[test]
    fn auto_is_full_up_to_the_limit_and_implicit_above_or_when_asked() {
        let (form, why) = FormChoice::Auto.resolve(AUTO_FULL_MAX_PARAMS, None);
        assert_eq!(form, FormChoice::Explicit(NetForm::Full));
        assert_eq!(why.unwrap(), "--form auto: full, since P = 4096 ≤ 4096");
        let (form, why) = FormChoice::Auto.resolve(AUTO_FULL_MAX_PARAMS + 1, None);
        assert_eq!(form, FormChoice::Implicit);
        assert!(why.unwrap().contains("P = 4097 > 4096"));
        let (form, why) = FormChoice::Auto.resolve(10, Some("--probes"));
        assert_eq!(form, FormChoice::Implicit);
        assert!(why.unwrap().contains("--probes was given"));
        let diag = FormChoice::Explicit(NetForm::Diagonal);
        assert_eq!(diag.resolve(10, Some("--probes")), (diag, None));
        assert_eq!(FormChoice::Implicit.resolve(1 << 20, None), (FormChoice::Implicit, None));
    }

    #[test]
    fn options_are_validated_with_the_flag_named() {
        assert!(ReportOptions::default().validate().is_ok());
        let refused = |options: ReportOptions, needle: &str| match options.validate() {
            Err(FisherError::InvalidInput(m)) => assert!(m.contains(needle), "{m}"),
            other => panic!("{needle}: {other:?}"),
        };
        refused(ReportOptions { top: 0, ..options() }, "--top");
        refused(ReportOptions { alphas: vec![1.0, -1.0], ..options() }, "--alpha");
        refused(ReportOptions { damping: f64::NAN, ..options() }, "--damping");
        refused(ReportOptions { samples_n: Some(18), ..options() }, "--samples-n");
        let implicit = |s: ImplicitSettings| ReportOptions { implicit: s, ..options() };
        refused(implicit(ImplicitSettings { probes: 1, ..Default::default() }), "--probes must be at least 2");
        refused(implicit(ImplicitSettings { top_tol: 1.0, ..Default::default() }), "--top-tol");
    }

    /// The exact full form and the implicit form of the same model agree: tr F and θᵀFθ to
    /// f32 rounding, the top eigenvalues to Lanczos' tolerance, the SLQ estimates within four
    /// standard errors plus their quadrature bound.
    #[test]
    fn implicit_agrees_with_the_exact_full_form() {
        let (mlp, data) = problem();
        let exact = report(model(&mlp, &data, FormChoice::Auto), options()).unwrap();
        assert_eq!(exact.subject.form, "full");
        assert!(exact.subject.form_reason.as_deref().unwrap().contains("full, since P = 53"));
        assert!(exact.implicit.is_none() && exact.measures.fv_products == 0);
        assert_eq!(exact.effective_dimensions.len(), 2);
        assert_eq!(exact.subject.samples, Some(40));
        assert_eq!(exact.subject.likelihood.as_deref(), Some("categorical"));

        let seen = std::cell::Cell::new((0, 0));
        // Steps past P exhaust the Krylov space (exact quadrature), and 32 probes make the
        // standard error itself reliable: what is left is the probes' sampling error.
        let settings = ImplicitSettings { probes: 32, steps: 60, ..ImplicitSettings::default() };
        let options = ReportOptions { implicit: settings, ..options() };
        let request = ReportRequest { input: model(&mlp, &data, FormChoice::Implicit), options };
        let implicit = run(&request, &|done, total| seen.set((done, total))).unwrap();
        assert_eq!(implicit.subject.form, "implicit");
        let work = implicit.implicit.as_ref().unwrap();
        assert_eq!(work.rank_bound, 120);
        assert_eq!(seen.get().0, implicit.measures.fv_products, "progress saw every product");
        assert!(seen.get().1 >= seen.get().0);
        assert!(implicit.notes.iter().any(|n| n.contains("condition number")), "{:?}", implicit.notes);
        assert_eq!(work.lanczos_steps, 53, "at most P steps");

        let (e, i) = (&exact.measures, &implicit.measures);
        close(i.trace, e.trace, 1e-5, "trace");
        close(i.fisher_rao_norm.unwrap(), e.fisher_rao_norm.unwrap(), 1e-5, "Fisher–Rao norm");
        for (a, b) in i.top_eigenvalues.iter().zip(&e.top_eigenvalues) {
            close(*a, *b, 1e-4, "top eigenvalue");
        }
        for (d_i, d_e) in implicit.effective_dimensions.iter().zip(&exact.effective_dimensions) {
            let slack = 4.0 * d_i.std_error.unwrap() + d_i.quadrature_bound.unwrap() + 1e-6;
            assert!((d_i.value - d_e.value).abs() <= slack, "d_eff({}) {} vs {}", d_e.alpha, d_i.value, d_e.value);
        }
        let slack = 4.0 * i.error_bars.logdet.unwrap() + i.error_bars.quadrature.logdet.unwrap() + 1e-6;
        assert!((i.logdet - e.logdet).abs() <= slack, "log det {} vs {}", i.logdet, e.logdet);
    }

    #[test]
    fn requests_that_do_not_fit_the_input_are_refused() {
        let (mlp, data) = problem();
        let no_damping = ReportOptions { damping: 0.0, ..options() };
        let err = report(model(&mlp, &data, FormChoice::Implicit), no_damping.clone()).unwrap_err();
        assert!(matches!(&err, FisherError::Request(m) if m.contains("--damping must be positive")), "{err}");
        // The exact forms take λ = 0.
        assert!(report(model(&mlp, &data, FormChoice::Explicit(NetForm::Diagonal)), no_damping).is_ok());
        let dir = tempfile::tempdir().unwrap();
        let jpg = ReportOptions { plot: Some(dir.path().join("s.jpg")), ..options() };
        assert!(matches!(report(model(&mlp, &data, FormChoice::Auto), jpg), Err(FisherError::InvalidInput(_))));
    }

    /// Stored full and diagonal files give the measures of computing directly; a full file
    /// with the model adds θ, and a plot is written.
    #[test]
    fn stored_results_match_computing_directly() {
        let (mlp, data) = problem();
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::cpu();
        let weights = dir.path().join("M.safetensors");
        mlp.to_safetensors(&weights).unwrap();
        let identity = ActivationSpec::parse("identity").unwrap();
        for form in [NetForm::Full, NetForm::Diagonal] {
            let path = dir.path().join(format!("F_{}.safetensors", form.name()));
            let result = engine.fisher(&mlp, &data, Variant::True, form).unwrap();
            let file = FisherFile::of_network(result, &mlp, data.len(), Likelihood::Categorical, Variant::True, "cpu");
            fisher_file::write(&path, &file).unwrap();
            let direct = report(model(&mlp, &data, FormChoice::Explicit(form)), options()).unwrap();
            let stored = StoredInput { path: path.clone(), weights: Some(weights.clone()), activation: identity.clone() };
            let svg = dir.path().join("s.svg");
            let stored = report(ReportInput::Stored(stored), ReportOptions { plot: Some(svg.clone()), ..options() }).unwrap();
            assert!(stored.subject.stored && stored.subject.form == form.name());
            assert_eq!(stored.subject.layers, Some(vec![6, 5, 3]));
            assert_eq!(stored.plot.as_deref(), Some(svg.as_path()));
            assert!(std::fs::read_to_string(&svg).unwrap().contains("<svg"));
            let (s, d) = (&stored.measures, &direct.measures);
            for (what, a, b) in [
                ("trace", s.trace, d.trace),
                ("log det", s.logdet, d.logdet),
                ("d_eff", s.effective_dimension, d.effective_dimension),
                ("Fisher–Rao", s.fisher_rao_norm.unwrap(), d.fisher_rao_norm.unwrap()),
            ] {
                close(a, b, 1e-12, what);
            }
            assert_eq!(s.inter_layer_coupling.is_some(), form == NetForm::Full);
            // Without the model: no θ, and a note says so.
            let bare = StoredInput { path, weights: None, activation: identity.clone() };
            let bare = report(ReportInput::Stored(bare), options()).unwrap();
            assert!(bare.measures.fisher_rao_norm.is_none());
            assert!(bare.notes.iter().any(|n| n.contains("needs θ")), "{:?}", bare.notes);
        }
        // A result that has no spectrum is refused as bad input, naming the file.
        let norms = dir.path().join("F_norms.safetensors");
        let result = engine.fisher(&mlp, &data, Variant::True, NetForm::Norms).unwrap();
        let file = FisherFile::of_network(result, &mlp, data.len(), Likelihood::Categorical, Variant::True, "cpu");
        fisher_file::write(&norms, &file).unwrap();
        let input = ReportInput::Stored(StoredInput { path: norms, weights: None, activation: identity });
        let err = report(input, options()).unwrap_err();
        assert!(matches!(&err, FisherError::Io { message, .. } if message.contains("only tr F")), "{err}");
    }
}
