//! `fisher report`: the spectrum and the complexity measures of a network's Fisher
//! information (see [`fisher_engine::analysis`] for every definition and its source).
//!
//! Three ways in:
//!
//! * **implicit** (a model and data, `--form implicit`): F is never formed. The operator is
//!   the engine's F·v ([`fisher_engine::Engine::fisher_vector_product`], f32 on the backend, widened to f64)
//!   with vᵀFv by a forward pass alone ([`fisher_engine::Engine::fisher_quadratic`]), the exact tr F (the
//!   mean of the per-sample squared gradient norms, [`NetForm::Norms`], no gradient formed)
//!   and the rank bound N·R (so λ_min = 0 whenever N·R < P). Then Lanczos top-k, whose
//!   converged eigenpairs are deflated from SLQ ([`analysis::slq_deflated`]: log det, d_eff,
//!   Abbas, ‖F‖_F, entropy, density, with standard errors and quadrature bounds), θᵀFθ and
//!   the Hutchinson inter-layer coupling ([`analysis::measures_from_quadrature`]). Memory:
//!   the model, the data, one micro-batch, and one Lanczos basis at a time (4·P bytes per
//!   vector).
//! * **explicit** (a model and data, `--form full|diag|layer|kfac`): the form is computed
//!   with [`fisher_engine::Engine::fisher`] and everything is exact ([`fisher_engine::analysis::measures_from_spectrum`]).
//! * **stored** (`--fisher F.safetensors`, a result of `fisher compute` or `fisher reduce`):
//!   the form is rebuilt from its tensors and metadata and analysed exactly; `--weights`
//!   adds θ (the Fisher–Rao norm) and the layer shapes where the metadata lacks them.
//!
//! Flow: flags → [`ReportConfig`] → the plot location checked → inputs loaded and checked →
//! the form resolved and its size checked → device → measures (progress bar over F·v
//! products) → plot, written atomically. The plot is the only file written, and only on
//! success.

use std::cell::Cell;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, ValueEnum};
use fisher_engine::analysis::{
    self, ExplicitFisher, FnOperator, LanczosOptions, LayerShape, MeasureOptions, Measures,
    ParameterLayout, SlqOptions, SpectralDensity, Spectrum,
};
use fisher_engine::backend::gpu::GpuOptions;
use fisher_engine::device::{self, DeviceRequest};
use fisher_engine::io::fisher_file::{self, FisherFile, Tensors};
use fisher_engine::model::{ActivationSpec, Dataset, Likelihood, Linear, Mlp};
use fisher_engine::fisher::{rows_per_sample, KfacFactors, NetFisher, NetForm, Variant};
use fisher_engine::output::plot::{self, Histogram};
use fisher_engine::output::progress::Progress;
use fisher_engine::{Backend, FisherError};
use ndarray::{Array1, Array2};
use serde_json::json;

use super::args::Report;
use super::args::{load_model_and_data, ModelArgs, Source};
use super::exit::usage;
use super::format::{gib, sci, sci_with};

/// `--form auto` computes the full F and analyses it exactly up to this many parameters
/// (a dense f64 eigendecomposition: ~1.4 s at P = 2,410 on two cores, growing as P³), and
/// goes implicit above.
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

/// Bins of the spectral density drawn under `--plot`.
const DENSITY_BINS: usize = 60;

/// Smoothing (standard deviation in decades) of the SLQ density: its nodes are a few hundred
/// points, which a plain histogram shows as spikes.
const SLQ_DENSITY_SMOOTHING: f64 = 0.1;

/// Defaults of the implicit form, chosen for a 784-1024-1024-1024-10 MLP (2.9 M parameters)
/// over 4,096 samples on two CPU cores: at most 4·40 + 80 + 1 + 4·4 = 257 F·v products at
/// 0.8–2.4 s each (by load) is 3–10 minutes, and 40 reorthogonalized SLQ steps (444 MiB of
/// basis) keep the peak under 1 GiB. Measured there: 223 products, 3 min 25 s, 888 MiB.
const DEFAULT_TOP: usize = 10;
const DEFAULT_PROBES: usize = 4;
const DEFAULT_STEPS: usize = 40;
const DEFAULT_COUPLING_PROBES: usize = 4;
const DEFAULT_TOP_TOL: f64 = 1e-5;
const DEFAULT_TOP_ITERATIONS: usize = 80;

/// The form, as spelled on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReportFormArg {
    /// full when P ≤ 4,096, implicit above.
    Auto,
    /// F·v products only: F is never formed (any model size).
    Implicit,
    /// The full F (P×P), exact everything.
    Full,
    /// diag(F), exact (no coupling).
    Diag,
    /// One block of F per Linear layer, exact (inter-unit coupling).
    Layer,
    /// KFAC factors per layer, exact for G ⊗ A (inter-unit coupling).
    Kfac,
}

/// Raw flags of `fisher report`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The activation after every Linear layer but the last: relu, tanh, sigmoid, gelu
    /// (exact, erf) or identity; or a JSON list with one per gap, e.g. '["tanh","relu"]',
    /// inline or in a .json file. Required with a model and data; not needed with --fisher.
    #[arg(long, value_name = "NAME|JSON|FILE")]
    pub activation: Option<String>,

    /// Model, data, variant and backend (as for `fisher compute`).
    #[command(flatten)]
    pub model: ModelArgs,

    /// Analyse a stored result of `fisher compute` or `fisher reduce` (full, diag, layer or
    /// blocks, kfac, gram) instead of computing one; with --weights for θ (the Fisher–Rao
    /// norm) and the layer shapes.
    #[arg(long, value_name = "F.safetensors")]
    pub fisher: Option<PathBuf>,

    /// Which form of F to analyse [default: auto].
    #[arg(long, value_enum)]
    pub form: Option<ReportFormArg>,

    /// How many of the largest eigenvalues.
    #[arg(long, value_name = "K", default_value_t = DEFAULT_TOP)]
    pub top: usize,

    /// Scale(s) α of the effective dimension d_eff(α) = Σ λᵢ/(λᵢ + α), comma-separated.
    #[arg(long, value_name = "α", value_delimiter = ',', num_args = 1.., default_values_t = [1e-3])]
    pub alpha: Vec<f64>,

    /// Damping λ of log det(F + λI) and of the condition number.
    #[arg(long, value_name = "λ", default_value_t = 1e-3)]
    pub damping: f64,

    /// Sample size n of the Abbas et al. effective dimension (≥ 19) [default: N, the samples
    /// the Fisher is averaged over].
    #[arg(long, value_name = "n")]
    pub samples_n: Option<usize>,

    /// Implicit form: SLQ probes (Rademacher vectors; ≥ 2, for an error bar) [default: 4].
    #[arg(long, value_name = "NV")]
    pub probes: Option<usize>,

    /// Implicit form: Lanczos steps per SLQ probe (F·v products each) [default: 40].
    #[arg(long, value_name = "M")]
    pub lanczos_steps: Option<usize>,

    /// Implicit form: Hutchinson rounds of the inter-layer coupling (one F·v per layer each;
    /// ≥ 2) [default: 4].
    #[arg(long, value_name = "R")]
    pub coupling_probes: Option<usize>,

    /// Implicit form: relative residual at which a top eigenvalue is accepted (its error is
    /// about the square of it) [default: 1e-5].
    #[arg(long, value_name = "TOL")]
    pub top_tol: Option<f64>,

    /// Implicit form: at most this many F·v products for the top eigenvalues [default: 80].
    #[arg(long, value_name = "N")]
    pub top_iterations: Option<usize>,

    /// Implicit form: seed of the SLQ, Lanczos and coupling probes [default: 0].
    #[arg(long, value_name = "S")]
    pub probe_seed: Option<u64>,

    /// Also plot the eigenvalues (exact spectrum, or the top Ritz values) and the spectral
    /// density (exact histogram, or the SLQ density) as PNG, or SVG for a .svg path; written
    /// atomically, only when the run succeeds.
    #[arg(long, value_name = "spectrum.png")]
    pub plot: Option<PathBuf>,

    /// Print one JSON object on one line instead of the table.
    #[arg(long)]
    pub json: bool,

    /// Print nothing on success (errors are still reported).
    #[arg(long, conflicts_with = "json")]
    pub quiet: bool,
}

/// The form to analyse a model's Fisher in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormChoice {
    /// Decided once P is known: full up to [`AUTO_FULL_MAX_PARAMS`], implicit above.
    Auto,
    /// F·v products.
    Implicit,
    /// A stored form computed by the engine (full, diag, layer, kfac).
    Explicit(NetForm),
}

/// The settings of the implicit form.
#[derive(Debug, Clone, PartialEq)]
pub struct ImplicitSettings {
    /// SLQ probes.
    pub probes: usize,
    /// Lanczos steps per SLQ probe.
    pub steps: usize,
    /// Hutchinson rounds for the inter-layer coupling.
    pub coupling_probes: usize,
    /// Top-k Lanczos tolerance.
    pub top_tol: f64,
    /// Top-k Lanczos F·v cap.
    pub top_iterations: usize,
    /// Probe seed.
    pub seed: u64,
    /// Whether any of them was given on the command line (refused for explicit forms).
    pub given: Option<&'static str>,
}

/// What to analyse.
#[derive(Debug, Clone)]
pub enum ReportInput {
    /// A model and data.
    Model {
        /// Files or a synthetic problem.
        source: Source,
        /// Activations.
        activation: ActivationSpec,
        /// The likelihood.
        likelihood: Likelihood,
        /// The variant.
        variant: Variant,
        /// The form.
        form: FormChoice,
        /// Requested compute path.
        backend: Backend,
        /// Adapter choice.
        gpu: GpuOptions,
    },
    /// A stored result.
    Stored {
        /// The safetensors file.
        path: PathBuf,
        /// The model, for θ and the layer shapes.
        weights: Option<PathBuf>,
        /// Activations to read the model with (any will do for θ).
        activation: ActivationSpec,
    },
}

/// A validated `fisher report` invocation.
#[derive(Debug, Clone)]
pub struct ReportConfig {
    /// What to analyse.
    pub input: ReportInput,
    /// Top eigenvalues.
    pub top: usize,
    /// Scales α (at least one; the first is the headline d_eff).
    pub alphas: Vec<f64>,
    /// Damping λ.
    pub damping: f64,
    /// Abbas sample size (`None`: N).
    pub samples_n: Option<usize>,
    /// Implicit-form settings.
    pub implicit: ImplicitSettings,
    /// The plot file.
    pub plot: Option<PathBuf>,
    /// Output style.
    pub report: Report,
}

impl ReportConfig {
    /// Validates raw flags.
    pub fn from_args(args: ReportArgs) -> anyhow::Result<Self> {
        let m = &args.model;
        let input = if let Some(path) = args.fisher.clone() {
            let ignored = [
                (m.inputs.is_some(), "--inputs"),
                (m.labels.is_some(), "--labels"),
                (m.synthetic_model.is_some(), "--synthetic-model"),
                (m.synthetic_samples.is_some(), "--synthetic-samples"),
                (m.synthetic_seed.is_some(), "--synthetic-seed"),
                (m.variant.likelihood.is_some(), "--likelihood"),
                (m.variant.variant.is_some(), "--variant"),
                (m.variant.mc_samples.is_some(), "--mc-samples"),
                (m.variant.seed.is_some(), "--seed"),
                (m.backend.backend.is_some(), "--backend"),
                (m.backend.adapter.is_some(), "--adapter"),
                (args.form.is_some(), "--form"),
            ];
            if let Some((_, flag)) = ignored.iter().find(|(given, _)| *given) {
                return Err(usage(format!(
                    "{flag} does not apply to --fisher (the stored result is analysed as it is; only --weights, \
                     --activation and the measure options go with it)"
                )));
            }
            let activation = match &args.activation {
                Some(text) => ActivationSpec::parse(text).map_err(|e| anyhow::Error::new(e).context("bad --activation"))?,
                // Activations do not change θ or the layer shapes, which is all --fisher reads
                // from the model.
                None => ActivationSpec::parse("identity").expect("a valid activation name"),
            };
            ReportInput::Stored { path, weights: m.weights.clone(), activation }
        } else {
            let source = m.source()?;
            let variant = m.variant()?;
            let likelihood = m.likelihood();
            let (backend, gpu) = m.backend()?;
            let Some(text) = &args.activation else {
                return Err(usage("--activation is required with a model (e.g. --activation relu)"));
            };
            let activation =
                ActivationSpec::parse(text).map_err(|e| anyhow::Error::new(e).context("bad --activation"))?;
            let form = match args.form.unwrap_or(ReportFormArg::Auto) {
                ReportFormArg::Auto => FormChoice::Auto,
                ReportFormArg::Implicit => FormChoice::Implicit,
                ReportFormArg::Full => FormChoice::Explicit(NetForm::Full),
                ReportFormArg::Diag => FormChoice::Explicit(NetForm::Diagonal),
                ReportFormArg::Layer => FormChoice::Explicit(NetForm::Layer),
                ReportFormArg::Kfac => FormChoice::Explicit(NetForm::Kfac),
            };
            ReportInput::Model { source, activation, likelihood, variant, form, backend, gpu }
        };

        if args.top == 0 {
            return Err(usage("--top must be at least 1"));
        }
        if let Some(a) = args.alpha.iter().find(|a| !(a.is_finite() && **a > 0.0)) {
            return Err(usage(format!("--alpha must be positive and finite, not {a}")));
        }
        if !(args.damping.is_finite() && args.damping >= 0.0) {
            return Err(usage(format!("--damping must be finite and ≥ 0, not {}", args.damping)));
        }
        if let Some(n) = args.samples_n {
            if n < 19 {
                return Err(usage(format!(
                    "--samples-n must be at least 19 (the Abbas effective dimension needs κ_n = n/(2π log n) > 1), not {n}"
                )));
            }
        }
        let given = [
            (args.probes.is_some(), "--probes"),
            (args.lanczos_steps.is_some(), "--lanczos-steps"),
            (args.coupling_probes.is_some(), "--coupling-probes"),
            (args.top_tol.is_some(), "--top-tol"),
            (args.top_iterations.is_some(), "--top-iterations"),
            (args.probe_seed.is_some(), "--probe-seed"),
        ]
        .into_iter()
        .find_map(|(given, flag)| given.then_some(flag));
        let implicit = ImplicitSettings {
            probes: args.probes.unwrap_or(DEFAULT_PROBES),
            steps: args.lanczos_steps.unwrap_or(DEFAULT_STEPS),
            coupling_probes: args.coupling_probes.unwrap_or(DEFAULT_COUPLING_PROBES),
            top_tol: args.top_tol.unwrap_or(DEFAULT_TOP_TOL),
            top_iterations: args.top_iterations.unwrap_or(DEFAULT_TOP_ITERATIONS),
            seed: args.probe_seed.unwrap_or(0),
            given,
        };
        if implicit.probes < 2 {
            return Err(usage(format!("--probes must be at least 2 (for an error bar), not {}", implicit.probes)));
        }
        if implicit.steps == 0 {
            return Err(usage("--lanczos-steps must be at least 1"));
        }
        if implicit.coupling_probes < 2 {
            return Err(usage(format!(
                "--coupling-probes must be at least 2 (for an error bar), not {}",
                implicit.coupling_probes
            )));
        }
        if !(implicit.top_tol.is_finite() && implicit.top_tol > 0.0 && implicit.top_tol < 1.0) {
            return Err(usage(format!("--top-tol must be in (0, 1), not {}", implicit.top_tol)));
        }
        if implicit.top_iterations == 0 {
            return Err(usage("--top-iterations must be at least 1"));
        }
        if let (Some(flag), ReportInput::Stored { .. }) = (implicit.given, &input) {
            return Err(usage(format!("{flag} only applies to the implicit form, not to a stored --fisher result")));
        }
        if let (Some(flag), ReportInput::Model { form: FormChoice::Explicit(form), .. }) = (implicit.given, &input) {
            return Err(usage(format!(
                "{flag} only applies to --form implicit (--form {} is analysed exactly)",
                form.name()
            )));
        }
        if let Some(path) = &args.plot {
            plot::plot_format(path).map_err(|e| anyhow::Error::new(e).context("bad --plot"))?;
        }
        let report = Report::from_flags(args.json, args.quiet);
        Ok(ReportConfig {
            input,
            top: args.top,
            alphas: args.alpha,
            damping: args.damping,
            samples_n: args.samples_n,
            implicit,
            plot: args.plot,
            report,
        })
    }
}

/// Wall-clock seconds per stage.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Seconds {
    /// Reading and checking the inputs (or building the synthetic problem).
    pub load: f64,
    /// Choosing an adapter, creating the device and building the kernels.
    pub setup: f64,
    /// Computing the form (explicit), or tr F from the per-sample norms (implicit).
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

/// The implicit form's settings and work, for the report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImplicitWork {
    /// SLQ probes.
    pub probes: usize,
    /// Lanczos steps per probe.
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
    /// Whether SLQ reorthogonalized (see `SLQ_REORTHOGONALIZE_BYTES`).
    pub reorthogonalized: bool,
    /// Converged top eigenpairs deflated from the SLQ probes.
    pub deflated: usize,
}

/// What an analysis found, before it is put in an [`Outcome`].
struct Analysis {
    measures: Measures,
    effective_dimensions: Vec<EffectiveDimension>,
    implicit: Option<ImplicitWork>,
    notes: Vec<String>,
    plot: Option<PathBuf>,
    /// Seconds: spectrum, top, measures, plot.
    seconds: (f64, f64, f64, f64),
}

/// What a `report` run did, for the report.
#[derive(Debug)]
pub struct Outcome {
    /// The measures (`None` only while the run assembles them).
    measures: Option<Measures>,
    /// d_eff at every requested α (the first is `measures.effective_dimension`).
    pub effective_dimensions: Vec<EffectiveDimension>,
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
    /// Variant and likelihood names, when known.
    pub variant: Option<String>,
    /// The likelihood's name, when known.
    pub likelihood: Option<String>,
    /// Model and data, or the stored file.
    pub input: String,
    /// Where F (or F·v) was computed.
    pub backend: Option<String>,
    /// GPU adapter name, when on a GPU.
    pub adapter: Option<String>,
    /// Why Auto fell back to the CPU.
    pub fallback: Option<String>,
    /// Whether a stored result was analysed (then `backend` is where it was computed).
    pub stored: bool,
    /// Why `--form auto` chose what it chose.
    pub form_reason: Option<String>,
    /// Implicit-form settings.
    pub implicit: Option<ImplicitWork>,
    /// Notes on measures left out.
    pub notes: Vec<String>,
    /// The plot written.
    pub plot: Option<PathBuf>,
    /// Seconds per stage.
    pub seconds: Seconds,
}

impl Outcome {
    /// Takes in what an analysis found.
    fn absorb(&mut self, analysis: Analysis) {
        self.measures = Some(analysis.measures);
        self.effective_dimensions = analysis.effective_dimensions;
        self.implicit = analysis.implicit;
        self.notes.extend(analysis.notes);
        self.plot = analysis.plot;
        (self.seconds.spectrum, self.seconds.top, self.seconds.measures, self.seconds.plot) = analysis.seconds;
    }

    /// The measures (present once the run succeeded).
    pub fn measures(&self) -> &Measures {
        self.measures.as_ref().expect("a finished run has measures")
    }
}

/// Runs `fisher report`.
pub fn run(cfg: &ReportConfig) -> anyhow::Result<Outcome> {
    if let Some(path) = &cfg.plot {
        plot::check_plot_path(path).context("bad --plot")?;
    }
    match &cfg.input {
        ReportInput::Model { .. } => run_model(cfg),
        ReportInput::Stored { .. } => run_stored(cfg),
    }
}

/// `64-32-10 tanh MLP`.
/// The options shared by every form.
fn measure_options<'a>(
    cfg: &ReportConfig,
    dim: usize,
    theta: Option<&'a [f64]>,
    layout: Option<&'a ParameterLayout>,
    samples: Option<usize>,
) -> MeasureOptions<'a> {
    let s = &cfg.implicit;
    MeasureOptions {
        alpha: cfg.alphas[0],
        damping: cfg.damping,
        top: cfg.top,
        samples,
        theta,
        layout,
        slq: SlqOptions { probes: s.probes, steps: s.steps, seed: s.seed, reorthogonalize: reorthogonalize(s.steps, dim) },
        lanczos: LanczosOptions {
            k: cfg.top,
            tol: s.top_tol,
            max_iterations: s.top_iterations,
            max_basis: None,
            seed: s.seed ^ 0x7097_0000_0000_0001,
            vectors: false,
        },
        coupling_probes: s.coupling_probes,
    }
}

/// Whether SLQ keeps a basis for full reorthogonalization (see [`SLQ_REORTHOGONALIZE_BYTES`]).
fn reorthogonalize(steps: usize, dim: usize) -> bool {
    steps.min(dim) as u128 * dim as u128 * 4 <= SLQ_REORTHOGONALIZE_BYTES
}

/// The Abbas sample size: `--samples-n`, else N when N ≥ 19, else none (with a note).
fn abbas_samples(cfg: &ReportConfig, samples: Option<usize>, notes: &mut Vec<String>) -> Option<usize> {
    match (cfg.samples_n, samples) {
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
        NetForm::Full => Some((p * p * 20, format!("P×P = {p}×{p}"))),
        NetForm::Layer => {
            let values: u128 = mlp.layers.iter().map(|l| (l.num_params() as u128).pow(2)).sum();
            Some((values * 20, "Σ_l P_l²".into()))
        }
        _ => None,
    }
}

fn run_model(cfg: &ReportConfig) -> anyhow::Result<Outcome> {
    let ReportInput::Model { source, activation, likelihood, variant, form, backend, gpu } = &cfg.input else {
        unreachable!("run_model on a model input")
    };
    let mut seconds = Seconds::default();
    let start = Instant::now();
    let (mlp, data) = load_model_and_data(source, activation, *likelihood)?;
    seconds.load = start.elapsed().as_secs_f64();
    let p = mlp.num_params();
    let n = data.len();

    let (form, form_reason) = match form {
        FormChoice::Auto if p <= AUTO_FULL_MAX_PARAMS && cfg.implicit.given.is_none() => (
            FormChoice::Explicit(NetForm::Full),
            Some(format!("--form auto: full, since P = {p} ≤ {AUTO_FULL_MAX_PARAMS}")),
        ),
        FormChoice::Auto if p <= AUTO_FULL_MAX_PARAMS => (
            FormChoice::Implicit,
            Some(format!("--form auto: implicit, since {} was given", cfg.implicit.given.unwrap_or(""))),
        ),
        FormChoice::Auto => {
            (FormChoice::Implicit, Some(format!("--form auto: implicit, since P = {p} > {AUTO_FULL_MAX_PARAMS}")))
        }
        other => (*other, None),
    };
    if form == FormChoice::Implicit && cfg.damping == 0.0 {
        return Err(usage(
            "--damping must be positive for the implicit form (SLQ cannot tell a singular F, whose log det is −∞, \
             from a nearly singular one)",
        ));
    }
    if let FormChoice::Explicit(net_form) = form {
        if let Some((bytes, what)) = dense_bytes(&mlp, net_form) {
            if bytes > MAX_DENSE_BYTES {
                return Err(usage(format!(
                    "--form {} analyses {what} values in f64 (about {} with the eigensolver's copy), beyond the \
                     {} this command allows; --form implicit works for any model size",
                    net_form.name(),
                    gib(bytes, 1),
                    gib(MAX_DENSE_BYTES, 1)
                )));
            }
        }
    }

    let start = Instant::now();
    let device = device::open(&DeviceRequest::from_env(*backend, gpu.clone())?)?;
    seconds.setup = start.elapsed().as_secs_f64();
    let engine = &device.engine;

    let layout = ParameterLayout::from_mlp(&mlp)?;
    let theta: Vec<f64> = mlp.parameters().iter().map(|&v| f64::from(v)).collect();
    let mut notes = Vec::new();
    let abbas_n = abbas_samples(cfg, Some(n), &mut notes);
    let options = measure_options(cfg, p, Some(&theta), Some(&layout), abbas_n);

    let mut outcome = Outcome {
        measures: None,
        effective_dimensions: Vec::new(),
        form: String::new(),
        samples: Some(n),
        architecture: Some(mlp.architecture()),
        layers: Some(mlp.widths()),
        layer_indices: Some(mlp.layers.iter().map(|l| l.index).collect()),
        variant: Some(variant.name().to_string()),
        likelihood: Some(likelihood.name().to_string()),
        input: match source {
            Source::Files { weights, inputs, labels } => {
                format!("{} · {} · {}", weights.display(), inputs.display(), labels.display())
            }
            Source::Synthetic { seed, .. } => format!("synthetic model and data (seed {seed})"),
        },
        backend: Some(engine.device_info()),
        adapter: device.adapter.as_ref().map(|a| a.name.clone()),
        fallback: device.fallback.clone(),
        stored: false,
        form_reason,
        implicit: None,
        notes,
        plot: None,
        seconds,
    };

    match form {
        FormChoice::Explicit(net_form) => {
            let start = Instant::now();
            let result = engine.fisher(&mlp, &data, *variant, net_form)?;
            let fisher = ExplicitFisher::from_net(&result, Some(&layout))?;
            drop(result);
            outcome.seconds.fisher = start.elapsed().as_secs_f64();
            outcome.form = net_form.name().to_string();
            let title = format!(
                "Fisher spectrum ({} form): {}, {} Fisher, N = {n}",
                outcome.form,
                mlp.architecture(),
                variant.name()
            );
            let analysis = analyse_exact(cfg, &fisher, &options, &title)?;
            outcome.absorb(analysis);
        }
        FormChoice::Implicit => {
            let start = Instant::now();
            let NetFisher::Norms(norms) = engine.fisher(&mlp, &data, *variant, NetForm::Norms)? else {
                unreachable!("the norms form returns norms")
            };
            let trace = norms.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
            outcome.seconds.fisher = start.elapsed().as_secs_f64();
            outcome.form = "implicit".into();
            let rank_bound = n.saturating_mul(rows_per_sample(*variant, mlp.output_dim()));
            let title =
                format!("Fisher spectrum (implicit): {}, {} Fisher, N = {n}", mlp.architecture(), variant.name());
            let analysis = analyse_implicit(cfg, engine, &mlp, &data, *variant, trace, rank_bound, &options, &title)?;
            outcome.absorb(analysis);
        }
        FormChoice::Auto => unreachable!("auto is resolved above"),
    }
    Ok(outcome)
}

/// Every measure of a stored form, exactly; the plot from its spectrum.
fn analyse_exact(
    cfg: &ReportConfig,
    fisher: &ExplicitFisher,
    options: &MeasureOptions<'_>,
    title: &str,
) -> anyhow::Result<Analysis> {
    let start = Instant::now();
    let spectrum: Spectrum = fisher.spectrum()?;
    let spectrum_s = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let measures = analysis::measures_from_spectrum(fisher, &spectrum, options)?;
    let effective_dimensions = cfg
        .alphas
        .iter()
        .map(|&alpha| {
            let value = spectrum.effective_dimension(alpha)?;
            Ok(EffectiveDimension { alpha, value, std_error: None, quadrature_bound: None })
        })
        .collect::<fisher_engine::Result<_>>()?;
    let measures_s = start.elapsed().as_secs_f64();
    let (mut plot_s, mut plot) = (0.0, None);
    if let Some(path) = &cfg.plot {
        let start = Instant::now();
        let density = SpectralDensity::from_spectrum(&spectrum, DENSITY_BINS, None, 0.0)?;
        let histogram = Histogram { edges: density.edges, mass: density.mass };
        plot::spectrum_plot(path, &spectrum.eigenvalues, Some(&histogram), title).context("writing the plot")?;
        plot_s = start.elapsed().as_secs_f64();
        plot = Some(path.clone());
    }
    Ok(Analysis {
        measures,
        effective_dimensions,
        implicit: None,
        notes: Vec::new(),
        plot,
        seconds: (spectrum_s, 0.0, measures_s, plot_s),
    })
}

/// The measures of the implicit form (SLQ, Lanczos, Hutchinson) with a progress bar over the
/// F·v products; the plot from the top Ritz values and the SLQ density.
#[allow(clippy::too_many_arguments)]
fn analyse_implicit(
    cfg: &ReportConfig,
    engine: &fisher_engine::Engine,
    mlp: &Mlp,
    data: &Dataset,
    variant: Variant,
    trace: f64,
    rank_bound: usize,
    options: &MeasureOptions<'_>,
    title: &str,
) -> anyhow::Result<Analysis> {
    let p = mlp.num_params();
    let s = &cfg.implicit;
    let layers = options.layout.map_or(0, |l| l.ranges().len());
    // The most F·v products the run can take (SLQ probes may stop early on an exhausted
    // Krylov space, and Lanczos when converged): the bar's length.
    let total = s.probes * s.steps.min(p) + s.top_iterations + 1 + s.coupling_probes * layers;
    let progress = Progress::new(
        "report: F·v products",
        total,
        Progress::wanted(cfg.report == Report::Quiet, cfg.report == Report::Json),
    );
    let done = Cell::new(0usize);
    let tick = || {
        done.set(done.get() + 1);
        progress.set(done.get(), total.max(done.get()));
    };
    let to_f32 = |v: &[f64]| Array1::from_iter(v.iter().map(|&x| x as f32));
    let op = FnOperator::new(p, |v: &[f64]| {
        let fvp = engine.fisher_vector_product(mlp, data, variant, to_f32(v).view())?;
        tick();
        let product = fvp.product.ok_or_else(|| FisherError::InvalidInput("F·v returned no product".into()))?;
        Ok(product.iter().map(|&x| f64::from(x)).collect())
    })
    .with_quadratic(|v: &[f64]| {
        let q = engine.fisher_quadratic(mlp, data, variant, to_f32(v).view())?;
        tick();
        Ok(q)
    })
    .with_trace(trace)
    .with_rank_bound(rank_bound);

    // The top eigenpairs first: their vectors are deflated from the SLQ probes, which then
    // resolve the small end of the spectrum (log det, d_eff, Abbas) with far fewer steps.
    let start = Instant::now();
    let mut top = analysis::lanczos_top_k(&op, &LanczosOptions { vectors: true, ..options.lanczos.clone() })?;
    let top_s = start.elapsed().as_secs_f64();
    let lambda_max = top.values.first().copied().unwrap_or(0.0);
    let pairs: Vec<(f64, Vec<f64>)> = top
        .values
        .iter()
        .zip(&top.residuals)
        .zip(top.vectors.take().unwrap_or_default())
        .filter(|((&value, &residual), _)| residual <= s.top_tol * value.abs() + 1e-12 * lambda_max)
        .map(|((&value, _), vector)| (value, vector))
        .take(p.saturating_sub(1))
        .collect();
    let deflated = pairs.len();
    let start = Instant::now();
    let quadrature = analysis::slq_deflated(&op, pairs, &options.slq)?;
    let spectrum_s = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let measures = analysis::measures_from_quadrature(&op, &quadrature, Some(&top), options)?;
    let measures_s = start.elapsed().as_secs_f64();
    progress.finish();
    debug_assert_eq!(done.get(), measures.fv_products, "every F·v product is counted");
    let effective_dimensions = cfg
        .alphas
        .iter()
        .map(|&alpha| {
            let (e, bound) = quadrature.bracketed(|x| x / (x + alpha));
            EffectiveDimension { alpha, value: e.value, std_error: Some(e.std_error), quadrature_bound: Some(bound) }
        })
        .collect();
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
    let (mut plot_s, mut plot) = (0.0, None);
    if let Some(path) = &cfg.plot {
        let start = Instant::now();
        let density = quadrature.density(DENSITY_BINS, None, SLQ_DENSITY_SMOOTHING)?;
        let histogram = Histogram { edges: density.edges, mass: density.mass };
        plot::spectrum_plot(path, &measures.top_eigenvalues, Some(&histogram), title).context("writing the plot")?;
        plot_s = start.elapsed().as_secs_f64();
        plot = Some(path.clone());
    }
    Ok(Analysis {
        measures,
        effective_dimensions,
        implicit: Some(ImplicitWork {
            probes: s.probes,
            lanczos_steps: s.steps.min(p),
            coupling_probes: s.coupling_probes,
            top_tol: s.top_tol,
            top_iterations: s.top_iterations,
            seed: s.seed,
            rank_bound,
            reorthogonalized: options.slq.reorthogonalize,
            deflated,
        }),
        notes,
        plot,
        seconds: (spectrum_s, top_s, measures_s, plot_s),
    })
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
fn rebuild(path: &std::path::Path, file: FisherFile, model_shapes: Option<&[LayerShape]>) -> anyhow::Result<Stored> {
    let bad = |message: &str| usage(format!("{}: {message}", path.display()));
    let form = file.form().to_string();
    let widths = file.widths();
    let parameters = file.parameters();
    let model = || model_shapes.map(<[LayerShape]>::to_vec);
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
            (ExplicitFisher::from_matrix(&fisher_engine::FisherMatrix::Gram(k))?.with_parameters(p), None)
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
            let blocks: Vec<Array2<f32>> = blocks.into_iter().map(|b| b.1).collect();
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

fn run_stored(cfg: &ReportConfig) -> anyhow::Result<Outcome> {
    let ReportInput::Stored { path, weights, activation } = &cfg.input else {
        unreachable!("run_stored on a stored input")
    };
    let mut seconds = Seconds::default();
    let start = Instant::now();
    let mlp = weights.as_ref().map(|w| Mlp::from_safetensors(w, activation)).transpose()?;
    let model_shapes: Option<Vec<LayerShape>> = mlp.as_ref().map(|m| m.layers.iter().map(LayerShape::from).collect());
    let file = fisher_file::read(path).map_err(|e| match e {
        // A file that is not the Fisher form it claims is bad input (exit 2), like the rest.
        FisherError::Io { path, message } => usage(format!("{path}: {message}")),
        other => other.into(),
    })?;
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
    if let Some(m) = &mlp {
        if m.num_params() != p {
            return Err(usage(format!(
                "{} has {} parameters but {} is the Fisher of {p}",
                weights.as_ref().expect("a model was read").display(),
                m.num_params(),
                path.display()
            )));
        }
        if matches!(stored.fisher, ExplicitFisher::Gram(_)) {
            return Err(usage(
                "--weights gives θ for the Fisher–Rao norm, which a Gram matrix (sample space) cannot measure",
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
    if theta.is_none() && !matches!(stored.fisher, ExplicitFisher::Gram(_)) {
        notes.push("Fisher–Rao norm: needs θ; give the model with --weights".into());
    }
    if layout.is_none() && matches!(stored.fisher, ExplicitFisher::Full(_) | ExplicitFisher::Blocks(_)) {
        notes.push("coupling: needs the layer shapes; give the model with --weights".into());
    }
    let abbas_n = abbas_samples(cfg, samples, &mut notes);
    let options = measure_options(cfg, p, theta.as_deref(), layout.as_ref(), abbas_n);
    let mut outcome = Outcome {
        measures: None,
        effective_dimensions: Vec::new(),
        form: stored.form.clone(),
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
        implicit: None,
        notes,
        plot: None,
        seconds,
    };
    let title = format!("Fisher spectrum ({} form): {}", stored.form, path.file_name().unwrap_or_default().to_string_lossy());
    let analysis = analyse_exact(cfg, &stored.fisher, &options, &title)?;
    outcome.absorb(analysis);
    Ok(outcome)
}

// ---------------------------------------------------------------------------------------
// Reports

/// `value ± error` (the error with two significant digits).
fn with_error(value: String, error: Option<f64>) -> String {
    match error {
        Some(e) => format!("{value} ± {}", sci_with(e, 1)),
        None => value,
    }
}

/// `value ± error (quadrature ≤ bound)`.
fn with_bounds(value: String, error: Option<f64>, bound: Option<f64>) -> String {
    let text = with_error(value, error);
    match bound {
        Some(b) => format!("{text} (quadrature ≤ {})", sci_with(b, 1)),
        None => text,
    }
}

/// `12,345`.
fn grouped(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn share(v: f64) -> String {
    format!("{:.4}", v)
}

/// The readable report: a table of every measure, what is exact and what estimated, timing.
pub fn human(o: &Outcome) -> String {
    let m = o.measures();
    let bars = &m.error_bars;
    let implicit = o.implicit.is_some();
    let mut lines = vec![format!(
        "Fisher report: {}P = {} parameters{}",
        o.architecture.as_ref().map_or(String::new(), |a| format!("{a}, ")),
        grouped(m.parameters),
        o.samples.map_or(String::new(), |n| format!(", N = {} samples", grouped(n)))
    )];
    lines.push(format!("  input     {}", o.input));
    if let (Some(v), Some(l)) = (&o.variant, &o.likelihood) {
        lines.push(format!("  metric    {v} Fisher, {l} likelihood"));
    }
    lines.push(format!(
        "  form      {}{}",
        o.form,
        if implicit { " (F·v products only; F is never formed)" } else { " (analysed exactly in f64)" }
    ));
    if let Some(why) = &o.form_reason {
        lines.push(format!("            ({why})"));
    }
    if let Some(b) = &o.backend {
        if o.stored {
            lines.push(format!("  computed  on {b} (the stored result's metadata)"));
        } else {
            lines.push(format!("  backend   {b}"));
        }
    }
    if let Some(why) = &o.fallback {
        lines.push(format!("            ({why})"));
    }
    lines.push(String::new());

    let mut rows: Vec<(String, String)> = Vec::new();
    rows.push(("trace  tr F".into(), sci_with(m.trace, 6)));
    rows.push(("Frobenius  ‖F‖_F".into(), with_error(sci(m.frobenius), bars.frobenius)));
    let shown = m.top_eigenvalues.iter().take(5).map(|&v| sci(v)).collect::<Vec<_>>().join(", ");
    let more = m.top_eigenvalues.len().saturating_sub(5);
    rows.push((
        format!("top eigenvalues ({})", m.top_eigenvalues.len()),
        if more > 0 { format!("{shown}, … ({more} more; --json lists all)") } else { shown },
    ));
    let q = &bars.quadrature;
    rows.push((
        format!("log det(F + λI), λ = {}", sci_with(m.damping, 1)),
        with_bounds(sci_with(m.logdet, 6), bars.logdet, q.logdet),
    ));
    rows.push((
        "log-volume  ½ log det".into(),
        with_bounds(sci_with(m.log_volume, 6), bars.logdet.map(|e| e / 2.0), q.logdet.map(|b| b / 2.0)),
    ));
    for d in &o.effective_dimensions {
        rows.push((
            format!("d_eff(α = {})", sci_with(d.alpha, 1)),
            with_bounds(format!("{:.4}", d.value), d.std_error, d.quadrature_bound),
        ));
    }
    rows.push((
        format!("Abbas d_n{}", m.abbas_samples.map_or(String::new(), |n| format!(" (n = {})", grouped(n)))),
        m.abbas_effective_dimension.map_or("—".into(), |v| {
            with_bounds(format!("{v:.4}"), bars.abbas_effective_dimension, q.abbas_effective_dimension)
        }),
    ));
    rows.push((
        "Fisher–Rao norm  √(θᵀFθ)".into(),
        m.fisher_rao_norm.map_or("—".into(), |v| format!("{} (θᵀFθ = {})", sci(v), sci(m.fisher_rao_norm_squared.unwrap_or(f64::NAN)))),
    ));
    rows.push(("condition number of F + λI".into(), m.condition_number.map_or("—".into(), sci)));
    rows.push(("stable rank  ‖F‖²_F/‖F‖²₂".into(), with_error(format!("{:.4}", m.stable_rank), bars.stable_rank)));
    rows.push((
        "spectral entropy".into(),
        with_bounds(format!("{:.4}", m.spectral_entropy), bars.spectral_entropy, q.spectral_entropy),
    ));
    rows.push((
        "inter-layer coupling".into(),
        m.inter_layer_coupling.map_or("— (not visible in this form)".into(), |v| with_error(share(v), bars.inter_layer_coupling)),
    ));
    let units: Vec<String> = m
        .inter_unit_coupling
        .iter()
        .enumerate()
        .map(|(l, v)| {
            let index = o.layer_indices.as_ref().and_then(|ix| ix.get(l)).map_or(l.to_string(), usize::to_string);
            format!("{index}: {}", v.map_or("—".into(), share))
        })
        .collect();
    rows.push((
        "inter-unit coupling per layer".into(),
        if units.is_empty() {
            if implicit { "— (not estimated for the implicit form)".into() } else { "— (not visible in this form)".into() }
        } else {
            units.join(" · ")
        },
    ));
    let width = rows.iter().map(|r| r.0.chars().count()).max().unwrap_or(0);
    for (label, value) in rows {
        let pad = width - label.chars().count();
        lines.push(format!("  {label}{}  {value}", " ".repeat(pad)));
    }
    lines.push(String::new());
    match &o.implicit {
        Some(w) => {
            lines.push(format!(
                "Exact: trace (mean of per-sample squared norms), Fisher–Rao norm (one quadratic form){}.",
                if m.condition_number.is_some() {
                    format!(", condition number (rank F ≤ N·R = {} < P, so λ_min = 0)", grouped(w.rank_bound))
                } else {
                    String::new()
                }
            ));
            lines.push(format!(
                "Estimated (± one standard error over probes, ≈68%): Frobenius, log det, d_eff, Abbas, stable rank and \
                 entropy by SLQ ({} probes × {} Lanczos steps{}, the top {} eigenpairs deflated; log det, d_eff, \
                 Abbas and entropy are the midpoints of the Gauss and Gauss–Radau rules, whose quadrature error is \
                 at most the bound shown); top eigenvalues by Lanczos ({}, tol {:.0e}); inter-layer coupling by \
                 Hutchinson ({} rounds).",
                w.probes,
                w.lanczos_steps,
                if w.reorthogonalized { "" } else { ", without reorthogonalization" },
                w.deflated,
                match m.lanczos_converged {
                    Some(true) => "converged",
                    _ => "not all converged",
                },
                w.top_tol,
                w.coupling_probes
            ));
            lines.push(format!("F·v products: {} (seed {}).", grouped(m.fv_products), w.seed));
        }
        None => lines.push("Every measure is exact (from the form's full spectrum); no F·v products.".into()),
    }
    for note in &o.notes {
        lines.push(format!("Note: {note}."));
    }
    if let Some(path) = &o.plot {
        lines.push(format!("  wrote     {}", path.display()));
    }
    let s = &o.seconds;
    let stages = if implicit {
        format!(
            "trace {:.3} · top-k {:.3} · SLQ {:.3} · θ/coupling {:.3}",
            s.fisher, s.top, s.spectrum, s.measures
        )
    } else {
        format!("form {:.3} · eigen {:.3} · measures {:.3}", s.fisher, s.spectrum, s.measures)
    };
    lines.push(format!("  seconds   load {:.3} · setup {:.3} · {stages} · plot {:.3}", s.load, s.setup, s.plot));
    lines.join("\n")
}

/// The one-line JSON report.
pub fn json_line(o: &Outcome) -> String {
    let mut value = serde_json::to_value(o.measures()).unwrap_or_else(|_| json!({}));
    let extra = json!({
        "samples": o.samples,
        "form": o.form,
        "backend": o.backend,
        "stored": o.stored,
        "adapter": o.adapter,
        "variant": o.variant,
        "likelihood": o.likelihood,
        "layers": o.layers,
        "layer_indices": o.layer_indices,
        "input": o.input,
        "effective_dimensions": o.effective_dimensions,
        "implicit": o.implicit,
        "notes": o.notes,
        "plot": o.plot.as_ref().map(|p| p.display().to_string()),
        "seconds": o.seconds,
    });
    if let (Some(map), serde_json::Value::Object(more)) = (value.as_object_mut(), extra) {
        map.extend(more);
    }
    value.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_line_up() {
        assert_eq!(sci(4.2278), "4.2278e+00");
        assert_eq!(sci(f64::INFINITY), "∞");
        assert_eq!(with_error(sci(1.0), Some(0.012)), "1.0000e+00 ± 1.2e-02");
        assert_eq!(grouped(2_913_290), "2,913,290");
        assert_eq!(grouped(12), "12");
    }
}
