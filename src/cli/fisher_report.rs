//! `fisher report`: the spectrum and the complexity measures of a network's Fisher
//! information. The work is [`fisher_engine::analysis::report`] (which says what each form
//! computes, exactly or by F·v products, and how); this module parses the flags, validates
//! them into a [`ReportConfig`], loads the model and data, calls [`report::run`], and
//! formats the [`report::Report`] as a table ([`human`]) or one JSON line ([`json_line`]).
//!
//! Flow: flags → [`ReportConfig`] → the plot location checked → inputs loaded and checked →
//! [`report::run`] (form resolved and its size checked → device → measures, with a progress
//! bar over F·v products → plot, written atomically) → report.

use std::cell::OnceCell;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, ValueEnum};
use fisher_engine::analysis::report::{
    self, ComputeOptions, FormChoice, ImplicitSettings, ModelInput, ReportOptions, ReportRequest, StoredInput,
    DEFAULT_TOP,
};
use fisher_engine::fisher::NetForm;
use fisher_engine::model::{ActivationSpec, Likelihood};
use fisher_engine::output::plot;
use fisher_engine::output::progress::Progress;
use fisher_engine::FisherError;
use serde_json::json;

use super::args::Report;
use super::args::{load_model_and_data, ModelArgs, OutputArgs, Source};
use super::exit::usage;
use super::format::{sci, sci_with};

/// What `--only` restricts the report to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnlyArg {
    /// Every measure (the default).
    All,
    /// The --top largest eigenvalues alone (--form implicit): one Lanczos run, no trace,
    /// SLQ or coupling pass.
    Top,
}

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

    /// Compute only this: `top` gives the --top largest eigenvalues of --form implicit and
    /// nothing else (JSON key `top_eigenvalues`, with `top_residuals`) [default: all].
    #[arg(long, value_enum, value_name = "WHAT")]
    pub only: Option<OnlyArg>,

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

    /// Replace an existing --plot file (its permissions are kept).
    #[arg(long)]
    pub force: bool,

    /// Output style.
    #[command(flatten)]
    pub output: OutputArgs,
}

/// What to analyse, as the flags name it.
#[derive(Debug, Clone)]
pub enum ReportInput {
    /// A model and data, loaded by [`run`].
    Model {
        /// Files or a synthetic problem.
        source: Source,
        /// Activations.
        activation: ActivationSpec,
        /// The likelihood.
        likelihood: Likelihood,
        /// Variant, form and device.
        compute: ComputeOptions,
    },
    /// A graph network read from ONNX (`--model`), and its data.
    Graph {
        /// The ONNX file, the inputs and the labels.
        files: (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf),
        /// The likelihood.
        likelihood: Likelihood,
        /// Variant, form and device.
        compute: ComputeOptions,
    },
    /// A stored result.
    Stored(StoredInput),
}

/// A validated `fisher report` invocation.
#[derive(Debug, Clone)]
pub struct ReportConfig {
    /// What to analyse.
    pub input: ReportInput,
    /// What to measure (validated).
    pub options: ReportOptions,
    /// Output style.
    pub report: Report,
    /// Replace an existing plot.
    pub force: bool,
    /// `--only top`: the top eigenvalues alone.
    pub only_top: bool,
}

/// What `fisher report` made: the whole report, or the top eigenvalues alone (`--only top`).
#[derive(Debug, Clone)]
pub enum ReportOutcome {
    /// Every measure.
    Full(report::Report),
    /// The top eigenvalues.
    Top(report::TopReport),
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
            ReportInput::Stored(StoredInput { path, weights: m.weights.clone(), activation })
        } else if let Some(files) = m.graph_source()? {
            if args.activation.is_some() {
                return Err(usage("--activation does not apply to --model (the ONNX graph holds the architecture)"));
            }
            let variant = m.variant()?;
            let (backend, gpu) = m.backend()?;
            let form = match args.form.unwrap_or(ReportFormArg::Auto) {
                ReportFormArg::Auto => FormChoice::Auto,
                ReportFormArg::Implicit => FormChoice::Implicit,
                ReportFormArg::Full => FormChoice::Explicit(NetForm::Full),
                ReportFormArg::Diag => FormChoice::Explicit(NetForm::Diagonal),
                ReportFormArg::Layer => FormChoice::Explicit(NetForm::Layer),
                ReportFormArg::Kfac => return Err(usage("--form kfac is not analysed for --model networks; use full, diag, layer or implicit")),
            };
            ReportInput::Graph { files, likelihood: m.likelihood(), compute: ComputeOptions { variant, form, backend, gpu } }
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
            ReportInput::Model { source, activation, likelihood, compute: ComputeOptions { variant, form, backend, gpu } }
        };

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
        let defaults = ImplicitSettings::default();
        let implicit = ImplicitSettings {
            probes: args.probes.unwrap_or(defaults.probes),
            steps: args.lanczos_steps.unwrap_or(defaults.steps),
            coupling_probes: args.coupling_probes.unwrap_or(defaults.coupling_probes),
            top_tol: args.top_tol.unwrap_or(defaults.top_tol),
            top_iterations: args.top_iterations.unwrap_or(defaults.top_iterations),
            seed: args.probe_seed.unwrap_or(defaults.seed),
            given,
        };
        let options = ReportOptions {
            top: args.top,
            alphas: args.alpha,
            damping: args.damping,
            samples_n: args.samples_n,
            implicit,
            plot: args.plot,
        };
        // Every refusal of the options is a mistake in the flags (exit 2), worded as such.
        options.validate().map_err(|e| match e {
            FisherError::InvalidInput(message) => usage(message),
            other => other.into(),
        })?;
        if let (Some(flag), ReportInput::Stored { .. }) = (given, &input) {
            return Err(usage(format!("{flag} only applies to the implicit form, not to a stored --fisher result")));
        }
        let explicit = match &input {
            ReportInput::Model { compute: ComputeOptions { form: FormChoice::Explicit(form), .. }, .. }
            | ReportInput::Graph { compute: ComputeOptions { form: FormChoice::Explicit(form), .. }, .. } => Some(*form),
            _ => None,
        };
        if let (Some(flag), Some(form)) = (given, explicit) {
            return Err(usage(format!(
                "{flag} only applies to --form implicit (--form {} is analysed exactly)",
                form.name()
            )));
        }
        if let Some(path) = &options.plot {
            plot::plot_format(path).map_err(|e| anyhow::Error::new(e).context("bad --plot"))?;
        }
        let only_top = args.only == Some(OnlyArg::Top);
        if only_top {
            let implicit = matches!(
                &input,
                ReportInput::Model { compute: ComputeOptions { form: FormChoice::Implicit, .. }, .. }
                    | ReportInput::Graph { compute: ComputeOptions { form: FormChoice::Implicit, .. }, .. }
            );
            if !implicit {
                return Err(usage(
                    "--only top needs --form implicit with a model and data (the other forms compute the whole spectrum; drop --only)",
                ));
            }
            let unused = [
                (args.probes.is_some(), "--probes"),
                (args.lanczos_steps.is_some(), "--lanczos-steps"),
                (args.coupling_probes.is_some(), "--coupling-probes"),
                (args.samples_n.is_some(), "--samples-n"),
                (options.plot.is_some(), "--plot"),
            ];
            if let Some((_, flag)) = unused.iter().find(|(given, _)| *given) {
                return Err(usage(format!("{flag} does not apply to --only top (it computes the top eigenvalues alone)")));
            }
        }
        Ok(ReportConfig { input, options, report: args.output.report(), force: args.force, only_top })
    }
}

/// Runs `fisher report`: checks the plot location, loads the model and data (or leaves the
/// stored result to the library), and makes the report, with a progress bar over the F·v
/// products on a terminal.
pub fn run(cfg: &ReportConfig) -> anyhow::Result<ReportOutcome> {
    if let Some(path) = &cfg.options.plot {
        let inputs: Vec<(&str, &std::path::Path)> = match &cfg.input {
            ReportInput::Model { source: Source::Files { weights, inputs, labels }, .. } => {
                vec![("--weights", weights.as_path()), ("--inputs", inputs.as_path()), ("--labels", labels.as_path())]
            }
            ReportInput::Model { .. } => Vec::new(),
            ReportInput::Graph { files: (model, inputs, labels), .. } => {
                vec![("--model", model.as_path()), ("--inputs", inputs.as_path()), ("--labels", labels.as_path())]
            }
            ReportInput::Stored(stored) => {
                let mut inputs = vec![("--fisher", stored.path.as_path())];
                inputs.extend(stored.weights.as_deref().map(|w| ("--weights", w)));
                inputs
            }
        };
        plot::check_plot_output(path, cfg.force, &inputs).context("bad --plot")?;
    }
    let show = Progress::wanted(cfg.report == Report::Quiet, cfg.report == Report::Json);
    // The bar appears with the first F·v product (the explicit forms have none); dropped on
    // an error path too, before the error line.
    let bar = OnceCell::new();
    let progress = |done: usize, total: usize| {
        bar.get_or_init(|| Progress::new("report: F·v products", total, show)).set(done, total);
    };
    let outcome = match &cfg.input {
        ReportInput::Model { source, activation, likelihood, compute } => {
            let start = Instant::now();
            let (mlp, data) = load_model_and_data(source, activation, *likelihood)?;
            let load = start.elapsed().as_secs_f64();
            let description = match source {
                Source::Files { weights, inputs, labels } => {
                    format!("{} · {} · {}", weights.display(), inputs.display(), labels.display())
                }
                Source::Synthetic { seed, .. } => format!("synthetic model and data (seed {seed})"),
            };
            let input = ModelInput { mlp: &mlp, data: &*data, description, compute: compute.clone() };
            let request = ReportRequest { input: report::ReportInput::Model(input), options: cfg.options.clone() };
            finish(cfg, &request, &progress, load)?
        }
        ReportInput::Graph { files: (model_path, inputs, labels), likelihood, compute } => {
            let start = Instant::now();
            let (model, data) = fisher_engine::pipeline::graph::load_graph_problem(model_path, inputs, labels, *likelihood)?;
            let load = start.elapsed().as_secs_f64();
            let description = format!("{} · {} · {}", model_path.display(), inputs.display(), labels.display());
            let input = report::GraphInput { model: &model, data: &data, likelihood: *likelihood, description, compute: compute.clone() };
            let request = ReportRequest { input: report::ReportInput::Graph(input), options: cfg.options.clone() };
            finish(cfg, &request, &progress, load)?
        }
        ReportInput::Stored(stored) => {
            let request = ReportRequest { input: report::ReportInput::Stored(stored.clone()), options: cfg.options.clone() };
            ReportOutcome::Full(report::run(&request, &progress)?)
        }
    };
    if let Some(bar) = bar.get() {
        bar.finish();
    }
    Ok(outcome)
}

/// The whole report or the top eigenvalues alone, with the load time the caller measured.
fn finish(cfg: &ReportConfig, request: &ReportRequest<'_>, progress: &dyn Fn(usize, usize), load: f64) -> anyhow::Result<ReportOutcome> {
    Ok(if cfg.only_top {
        let mut top = report::run_top(request, progress)?;
        top.seconds.load = load;
        ReportOutcome::Top(top)
    } else {
        let mut outcome = report::run(request, progress)?;
        outcome.seconds.load = load;
        ReportOutcome::Full(outcome)
    })
}

// ---------------------------------------------------------------------------------------
// Reports

/// The table or the JSON line of either outcome.
pub fn render(o: &ReportOutcome, json: bool) -> String {
    match (o, json) {
        (ReportOutcome::Full(r), false) => human(r),
        (ReportOutcome::Full(r), true) => json_line(r),
        (ReportOutcome::Top(t), false) => human_top(t),
        (ReportOutcome::Top(t), true) => {
            let mut value = serde_json::to_value(t).unwrap_or_else(|_| json!({}));
            if let Some(map) = value.as_object_mut() {
                for key in ["architecture", "fallback", "form_reason"] {
                    map.remove(key);
                }
                map.insert("only".into(), json!("top"));
            }
            value.to_string()
        }
    }
}

/// The table of `--only top`.
fn human_top(t: &report::TopReport) -> String {
    let s = &t.subject;
    let mut lines = vec![format!(
        "fisher report: top {} eigenvalues of the implicit {} Fisher · {} · N = {} · P = {}",
        t.top_eigenvalues.len(),
        s.variant.as_deref().unwrap_or("?"),
        s.architecture.as_deref().unwrap_or("network"),
        s.samples.map_or("?".into(), grouped),
        grouped(t.parameters)
    )];
    if let Some(b) = &s.backend {
        lines.push(format!("  backend   {b}"));
    }
    for (i, (v, r)) in t.top_eigenvalues.iter().zip(&t.top_residuals).enumerate() {
        lines.push(format!("  λ{:<3}      {}  (residual ≤ {})", i + 1, sci(*v), sci_with(*r, 1)));
    }
    lines.push(format!(
        "  lanczos   {} {} products, {} restarts, {} (--top-tol {:.0e})",
        t.fv_products,
        if t.top_method == "gram" { "K·u (output-space K = BBᵀ/N)" } else { "F·v" },
        t.restarts,
        if t.lanczos_converged { "converged" } else { "NOT converged" },
        t.top_tol
    ));
    for note in &t.notes {
        lines.push(format!("  note: {note}"));
    }
    let sec = &t.seconds;
    lines.push(format!("  seconds   load {:.3} · setup {:.3} · top {:.3}", sec.load, sec.setup, sec.top));
    lines.join("\n")
}

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
pub fn human(o: &report::Report) -> String {
    let m = &o.measures;
    let bars = &m.error_bars;
    let implicit = o.implicit.is_some();
    let mut lines = vec![format!(
        "Fisher report: {}P = {} parameters{}",
        o.subject.architecture.as_ref().map_or(String::new(), |a| format!("{a}, ")),
        grouped(m.parameters),
        o.subject.samples.map_or(String::new(), |n| format!(", N = {} samples", grouped(n)))
    )];
    lines.push(format!("  input     {}", o.subject.input));
    if let (Some(v), Some(l)) = (&o.subject.variant, &o.subject.likelihood) {
        lines.push(format!("  metric    {v} Fisher, {l} likelihood"));
    }
    lines.push(format!(
        "  form      {}{}",
        o.subject.form,
        if implicit { " (F·v products only; F is never formed)" } else { " (analysed exactly in f64)" }
    ));
    if let Some(why) = &o.subject.form_reason {
        lines.push(format!("            ({why})"));
    }
    if let Some(b) = &o.subject.backend {
        if o.subject.stored {
            lines.push(format!("  computed  on {b} (the stored result's metadata)"));
        } else {
            lines.push(format!("  backend   {b}"));
        }
    }
    if let Some(why) = &o.subject.fallback {
        lines.push(format!("            ({why})"));
    }
    lines.push(String::new());

    let q = &bars.quadrature;
    let shown = m.top_eigenvalues.iter().take(5).map(|&v| sci(v)).collect::<Vec<_>>().join(", ");
    let more = m.top_eigenvalues.len().saturating_sub(5);
    let units: Vec<String> = m
        .inter_unit_coupling
        .iter()
        .enumerate()
        .map(|(l, v)| {
            let index = o.subject.layer_indices.as_ref().and_then(|ix| ix.get(l)).map_or(l.to_string(), usize::to_string);
            format!("{index}: {}", v.map_or("—".into(), share))
        })
        .collect();
    let mut rows: Vec<(String, String)> = vec![
        ("trace  tr F".into(), sci_with(m.trace, 6)),
        ("Frobenius  ‖F‖_F".into(), with_error(sci(m.frobenius), bars.frobenius)),
        (
            format!("top eigenvalues ({})", m.top_eigenvalues.len()),
            if more > 0 { format!("{shown}, … ({more} more; --json lists all)") } else { shown },
        ),
        (
            format!("log det(F + λI), λ = {}", sci_with(m.damping, 1)),
            with_bounds(sci_with(m.logdet, 6), bars.logdet, q.logdet),
        ),
        (
            "log-volume  ½ log det".into(),
            with_bounds(sci_with(m.log_volume, 6), bars.logdet.map(|e| e / 2.0), q.logdet.map(|b| b / 2.0)),
        ),
    ];
    rows.extend(o.effective_dimensions.iter().map(|d| {
        (format!("d_eff(α = {})", sci_with(d.alpha, 1)), with_bounds(format!("{:.4}", d.value), d.std_error, d.quadrature_bound))
    }));
    rows.extend([
        (
            format!("Abbas d_n{}", m.abbas_samples.map_or(String::new(), |n| format!(" (n = {})", grouped(n)))),
            m.abbas_effective_dimension.map_or("—".into(), |v| {
                with_bounds(format!("{v:.4}"), bars.abbas_effective_dimension, q.abbas_effective_dimension)
            }),
        ),
        (
            "Fisher–Rao norm  √(θᵀFθ)".into(),
            m.fisher_rao_norm.map_or("—".into(), |v| {
                format!("{} (θᵀFθ = {})", sci(v), sci(m.fisher_rao_norm_squared.unwrap_or(f64::NAN)))
            }),
        ),
        ("condition number of F + λI".into(), m.condition_number.map_or("—".into(), sci)),
        ("stable rank  ‖F‖²_F/‖F‖²₂".into(), with_error(format!("{:.4}", m.stable_rank), bars.stable_rank)),
        ("spectral entropy".into(), with_bounds(format!("{:.4}", m.spectral_entropy), bars.spectral_entropy, q.spectral_entropy)),
        (
            "inter-layer coupling".into(),
            m.inter_layer_coupling
                .map_or("— (not visible in this form)".into(), |v| with_error(share(v), bars.inter_layer_coupling)),
        ),
        (
            "inter-unit coupling per layer".into(),
            match (units.is_empty(), implicit) {
                (false, _) => units.join(" · "),
                (true, true) => "— (not estimated for the implicit form)".into(),
                (true, false) => "— (not visible in this form)".into(),
            },
        ),
    ]);
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

/// The one-line JSON report: the measures and the subject's fields, keys in order (README).
pub fn json_line(o: &report::Report) -> String {
    let mut value = serde_json::to_value(o).unwrap_or_else(|_| json!({}));
    if let Some(map) = value.as_object_mut() {
        // What only the table shows.
        for key in ["architecture", "fallback", "form_reason"] {
            map.remove(key);
        }
    }
    value.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_line_up() {
        assert_eq!(with_error(sci(1.0), Some(0.012)), "1.0000e+00 ± 1.2e-02");
        assert_eq!(with_bounds(sci(1.0), None, Some(0.5)), "1.0000e+00 (quadrature ≤ 5.0e-01)");
        assert_eq!(grouped(2_913_290), "2,913,290");
        assert_eq!(grouped(12), "12");
    }
}
