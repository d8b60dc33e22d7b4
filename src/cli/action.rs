//! `fisher action`: the action, Fisher–Rao length, chord and efficiency of a training run
//! given as checkpoints (see [`fisher_engine::analysis::action`] for the definitions).
//!
//! Flow: flags → [`ActionConfig`] (the plot location and the checkpoint list checked: files,
//! or every `*.safetensors` of one directory in natural order) → the library's
//! [`action::run`] (the first checkpoint, data, device, then the quadratic forms with a
//! progress bar, each later checkpoint read and checked when the path reaches it; the plot
//! written atomically) → the report.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use fisher_engine::analysis::action::{self, ActionRequest, ActionRun};
use fisher_engine::fisher::Variant;
use fisher_engine::model::ActivationSpec;
use fisher_engine::output::plot;
use fisher_engine::output::progress::Progress;
use fisher_engine::FisherError;
use serde_json::json;

use super::args::{BackendArgs, OutputArgs, Report, VariantArgs};
use super::exit::usage;
use super::format::{sci, sci_with};

/// Steps shown in the human table before the middle is elided (`--json` lists all).
const TABLE_ROWS: usize = 60;

/// Raw flags of `fisher action`.
#[derive(Debug, Args)]
pub struct ActionArgs {
    /// The checkpoints θ₀ … θ_T in order: two or more safetensors files (PyTorch state dicts
    /// of one architecture), or one directory whose *.safetensors files are taken in natural
    /// name order (ckpt_2 before ckpt_10). With --model, or given as .onnx files: ONNX
    /// exports of one network, or its state dicts (keyed by its parameter names).
    #[arg(long, value_name = "FILES|DIR", num_args = 1.., required = true)]
    pub checkpoints: Vec<PathBuf>,

    /// The activation after every Linear layer but the last: relu, tanh, sigmoid, gelu
    /// (exact, erf) or identity; or a JSON list with one per gap, e.g. '["tanh","relu"]',
    /// inline or in a .json file.
    /// Required for MLP checkpoints; not with --model or .onnx checkpoints.
    #[arg(long, value_name = "NAME|JSON|FILE")]
    pub activation: Option<String>,

    /// The network as exported from PyTorch to ONNX (see `fisher compute --help`); the
    /// checkpoints are its state dicts (safetensors) or ONNX exports.
    #[arg(long, value_name = "M.onnx")]
    pub model: Option<PathBuf>,

    /// Inputs: an N×d float32/float64 .npy file (with a graph model: N × its input shape).
    #[arg(long, value_name = "X.npy")]
    pub inputs: PathBuf,

    /// Labels: int32/int64 class indices of shape (N,) (categorical), or N×k float targets
    /// (gaussian).
    #[arg(long, value_name = "y.npy")]
    pub labels: PathBuf,

    /// Likelihood and variant (the Fisher F(θ) that measures each step).
    #[command(flatten)]
    pub variant: VariantArgs,

    /// Segments of the midpoint rule for the chord θ₀ → θ_T.
    #[arg(long, value_name = "M", default_value_t = 8)]
    pub segments: usize,

    /// Backend and adapter.
    #[command(flatten)]
    pub backend: BackendArgs,

    /// Also plot the per-step action and the cumulative length (PNG, or SVG for a .svg path);
    /// written atomically, only when the run succeeds.
    #[arg(long, value_name = "action.png")]
    pub plot: Option<PathBuf>,

    /// Replace an existing --plot file (its permissions are kept).
    #[arg(long)]
    pub force: bool,

    /// Output style.
    #[command(flatten)]
    pub output: OutputArgs,
}

/// A validated `fisher action` invocation: the library's request and the output style.
#[derive(Debug, Clone)]
pub struct ActionConfig {
    /// What to measure (the checkpoint files resolved).
    pub request: ActionRequest,
    /// Output style.
    pub report: Report,
}

impl ActionConfig {
    /// Validates raw flags; resolves the checkpoint list and checks the plot location.
    pub fn from_args(args: ActionArgs) -> anyhow::Result<Self> {
        let variant = args.variant.variant("")?;
        let likelihood = args.variant.likelihood();
        let graph = args.model.is_some()
            || args.checkpoints.first().is_some_and(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("onnx")));
        let activation = match (&args.activation, graph) {
            (Some(_), true) => return Err(usage("--activation does not apply to --model or .onnx checkpoints (the graph holds the architecture)")),
            (None, true) => ActivationSpec::parse("identity")?,
            (Some(text), false) => ActivationSpec::parse(text).map_err(|e| anyhow::Error::new(e).context("bad --activation"))?,
            (None, false) => return Err(usage("--activation is required with safetensors checkpoints of an MLP")),
        };
        if args.segments == 0 {
            return Err(usage("--segments must be at least 1"));
        }
        if args.segments > fisher_engine::analysis::action::MAX_SEGMENTS {
            return Err(usage(format!(
                "--segments must be at most {}, not {}",
                fisher_engine::analysis::action::MAX_SEGMENTS,
                args.segments
            )));
        }
        let (backend, gpu) = args.backend.resolve()?;
        // Too few checkpoints, or a directory among files, is a usage error.
        let exts: &[&str] = if graph { &["safetensors", "onnx"] } else { &["safetensors"] };
        let checkpoints = fisher_engine::model::run::checkpoint_files_of(&args.checkpoints, exts).map_err(|e| match e {
            FisherError::InvalidInput(message) => usage(message),
            other => other.into(),
        })?;
        if let Some(path) = &args.plot {
            let mut inputs: Vec<(&str, &std::path::Path)> =
                vec![("--inputs", args.inputs.as_path()), ("--labels", args.labels.as_path())];
            inputs.extend(checkpoints.iter().map(|c| ("--checkpoints", c.as_path())));
            inputs.extend(args.model.as_deref().map(|m| ("--model", m)));
            plot::check_plot_output(path, args.force, &inputs).context("bad --plot")?;
        }
        let report = args.output.report();
        let request = ActionRequest {
            checkpoints,
            activation,
            inputs: args.inputs,
            labels: args.labels,
            likelihood,
            variant,
            segments: args.segments,
            backend,
            gpu,
            plot: args.plot,
            show_progress: Progress::wanted(report == Report::Quiet, report == Report::Json),
            model: args.model,
        };
        Ok(ActionConfig { request, report })
    }
}

/// Runs `fisher action`.
pub fn run(cfg: &ActionConfig) -> anyhow::Result<ActionRun> {
    Ok(action::run(&cfg.request)?)
}

fn variant_text(variant: Variant) -> String {
    match variant {
        Variant::Empirical => "empirical Fisher (observed labels)".to_string(),
        Variant::True => "true Fisher (closed-form expectation over the predictive distribution)".to_string(),
        Variant::MonteCarlo { samples, seed } => format!("Monte Carlo Fisher ({samples} label(s) per input, seed {seed})"),
    }
}

/// The readable report of an `action` run: the per-step table, then S, L, chord and
/// efficiency.
pub fn human(o: &ActionRun) -> String {
    let r = &o.report;
    let mut lines = vec![
        format!(
            "action along training: {} checkpoints ({} steps) of a {} MLP, P = {} parameters, N = {} samples",
            r.checkpoints,
            r.steps.len(),
            o.architecture,
            r.parameters,
            o.samples
        ),
        format!("  first     {}", o.files[0].display()),
        format!("  last      {}", o.files[o.files.len() - 1].display()),
        format!("  metric    {}, {} likelihood", variant_text(o.variant), o.likelihood.name()),
        format!("  backend   {}", o.backend),
    ];
    if let Some(why) = &o.fallback {
        lines.push(format!("            ({why})"));
    }
    lines.push(String::new());
    lines.push(format!("{:>6}  {:>12}  {:>12}  {:>12}  {:>14}", "t", "‖Δθ‖", "ΔθᵀFΔθ", "√ΔθᵀFΔθ", "cumulative L"));
    let row = |s: &action::ActionStep| {
        let (euclidean, action, length) = (sci(s.euclidean), sci(s.action), sci(s.length));
        format!("{:>6}  {euclidean:>12}  {action:>12}  {length:>12}  {:>14.6}", s.step, s.cumulative_length)
    };
    if r.steps.len() <= TABLE_ROWS {
        lines.extend(r.steps.iter().map(row));
    } else {
        let half = TABLE_ROWS / 2;
        lines.extend(r.steps[..half].iter().map(row));
        lines.push(format!("{:>6}  ({} more steps; --json lists every step)", "…", r.steps.len() - 2 * half));
        lines.extend(r.steps[r.steps.len() - half..].iter().map(row));
    }
    lines.push(String::new());
    let efficiency = |num: f64, den: f64| if den > 0.0 { format!("{:.4}", num / den) } else { "∞".into() };
    lines.push(format!("  S  action                Σ ΔθᵀFΔθ                = {}", sci_with(r.action, 6)));
    lines.push(format!("  L  Fisher–Rao length     Σ √ΔθᵀFΔθ               = {:.6}", r.length));
    lines.push(format!("     chord                 θ₀ → θ_T, {:>3} segments  = {:.6}", r.segments, r.chord));
    lines.push(format!("     efficiency            L / chord               = {}", efficiency(r.length, r.chord)));
    lines.push(format!(
        "     Euclidean (context)   Σ‖Δθ‖ = {:.6} · ‖θ_T − θ₀‖ = {:.6} · ratio {}",
        r.euclidean_length,
        r.euclidean_chord,
        efficiency(r.euclidean_length, r.euclidean_chord)
    ));
    if let Some(path) = &o.plot {
        lines.push(format!("  wrote     {}", path.display()));
    }
    let s = &o.seconds;
    lines.push(format!(
        "  seconds   load {:.3} · setup {:.3} · compute {:.3} · plot {:.3}",
        s.load, s.setup, s.compute, s.plot
    ));
    lines.join("\n")
}

/// The one-line JSON report of an `action` run.
pub fn json_line(o: &ActionRun) -> String {
    let r = &o.report;
    let mut value = json!({
        "checkpoints": r.checkpoints,
        "checkpoint_files": o.files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "architecture": o.architecture,
        "parameters": r.parameters,
        "samples": o.samples,
        "likelihood": o.likelihood.name(),
        "variant": o.variant.name(),
        "backend": o.backend,
        "adapter": o.adapter,
        "action": r.action,
        "length": r.length,
        "chord": r.chord,
        "segments": r.segments,
        // serde_json writes a non-finite number (a zero chord) as null.
        "efficiency": r.efficiency,
        "euclidean_length": r.euclidean_length,
        "euclidean_chord": r.euclidean_chord,
        "steps": r.steps,
        "plot": o.plot.as_ref().map(|p| p.display().to_string()),
        "seconds": o.seconds,
    });
    if let Variant::MonteCarlo { samples, seed } = o.variant {
        value["mc_samples"] = json!(samples);
        value["seed"] = json!(seed);
    }
    value.to_string()
}
