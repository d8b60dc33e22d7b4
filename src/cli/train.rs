//! `fisher train`: trains a seeded demo MLP and writes a run directory that `fisher action`
//! (and `fisher compute`) read. Flow: flags → [`TrainConfig`] (a [`RunSpec`], validated) →
//! the library's [`fisher_engine::model::run`] → the report.

use std::path::PathBuf;

use clap::Args;
use fisher_engine::model::architecture_text;
use fisher_engine::model::run::{self, RunSpec, Written};
use fisher_engine::FisherError;
use serde_json::json;

use super::args::{parse_widths, Report};
use super::exit::usage;
use super::format::shell_word;

/// Raw flags of `fisher train` (the defaults are [`RunSpec::default`]).
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Layer widths: input, hidden..., classes (at least 2 classes).
    #[arg(long, value_name = "WIDTHS", default_value = "16,32,32,4")]
    pub widths: String,
    /// The activation after every Linear layer but the last (relu, tanh, sigmoid, gelu,
    /// identity), or a JSON list with one per gap, e.g. '["tanh","relu"]'.
    #[arg(long, value_name = "NAME|JSON", default_value_t = RunSpec::default().activation)]
    pub activation: String,
    /// Samples of the seeded classification task (Gaussian clusters warped by a fixed random
    /// tanh layer, one cluster per class).
    #[arg(long, value_name = "N", default_value_t = RunSpec::default().samples)]
    pub samples: usize,
    /// SGD steps.
    #[arg(long, value_name = "STEPS", default_value_t = RunSpec::default().steps)]
    pub steps: usize,
    /// Learning rate.
    #[arg(long, value_name = "LR", default_value_t = RunSpec::default().learning_rate)]
    pub lr: f32,
    /// Heavy-ball momentum in [0, 1) (0: plain SGD).
    #[arg(long, value_name = "M", default_value_t = RunSpec::default().momentum)]
    pub momentum: f32,
    /// Samples per minibatch.
    #[arg(long, value_name = "B", default_value_t = RunSpec::default().batch_size)]
    pub batch: usize,
    /// Checkpoints to write, evenly spaced in steps, the initial and final models included
    /// (at most STEPS + 1).
    #[arg(long, value_name = "C", default_value_t = RunSpec::default().checkpoints)]
    pub checkpoints: usize,
    /// Seed of the data, the initial weights and the minibatch order.
    #[arg(long, value_name = "S", default_value_t = RunSpec::default().seed)]
    pub seed: u64,
    /// The run directory to create (its parent must exist).
    #[arg(long, value_name = "RUN")]
    pub out_dir: PathBuf,
    /// Replace RUN if it exists and is not empty (only once the new run is complete).
    #[arg(long)]
    pub force: bool,
    /// Print one JSON line instead of the human summary.
    #[arg(long)]
    pub json: bool,
    /// Print nothing on success (errors are still reported).
    #[arg(long, conflicts_with = "json")]
    pub quiet: bool,
}

/// A validated `fisher train` invocation.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// The run.
    pub spec: RunSpec,
    /// The run directory.
    pub out_dir: PathBuf,
    /// Replace a non-empty RUN.
    pub force: bool,
    /// Output style.
    pub report: Report,
}

/// A setting or location the library refuses is a usage error, in the library's words.
fn refused(e: FisherError) -> anyhow::Error {
    match e {
        FisherError::InvalidInput(message) => usage(message),
        other => other.into(),
    }
}

impl TrainConfig {
    /// Validates raw flags.
    pub fn from_args(args: TrainArgs) -> anyhow::Result<Self> {
        let what = "expected at least two positive layer widths (input,...,classes), e.g. 16,32,32,4";
        let widths = parse_widths(&args.widths).ok_or_else(|| usage(format!("bad --widths '{}': {what}", args.widths)))?;
        let spec = RunSpec {
            widths,
            activation: args.activation,
            samples: args.samples,
            steps: args.steps,
            learning_rate: args.lr,
            momentum: args.momentum,
            batch_size: args.batch,
            checkpoints: args.checkpoints,
            seed: args.seed,
        };
        spec.validate().map_err(refused)?;
        let report = Report::from_flags(args.json, args.quiet);
        Ok(TrainConfig { spec, out_dir: args.out_dir, force: args.force, report })
    }
}

/// Runs `fisher train`: the output location checked before any work, then trained, written.
pub fn run(cfg: &TrainConfig) -> anyhow::Result<Written> {
    let replace = run::check_out_dir(&cfg.out_dir, cfg.force).map_err(refused)?;
    Ok(run::write(&cfg.out_dir, &cfg.spec.train()?, replace)?)
}

/// The readable summary of a `train` run.
pub fn human(o: &Written) -> String {
    let (first, last) = (o.losses[0], o.losses[o.losses.len() - 1]);
    let dir = o.dir.display().to_string();
    let join = |file: &str| shell_word(&o.dir.join(file).display().to_string());
    [
        format!(
            "trained a {} (P = {} parameters) on {} samples of the seeded classification task (seed {})",
            architecture_text(&o.spec.widths, Some(&o.activations)),
            o.parameters,
            o.spec.samples,
            o.spec.seed
        ),
        format!("  loss      {first:.4} → {last:.4} (mean negative log-likelihood over all samples, first → last checkpoint)"),
        format!(
            "  wrote     {dir}{}: X.npy, y.npy, {} checkpoints {} … {} (steps {} … {}), run.json",
            if o.replaced { " (replaced)" } else { "" },
            o.files.len(),
            o.files[0],
            o.files[o.files.len() - 1],
            o.checkpoint_steps[0],
            o.checkpoint_steps[o.checkpoint_steps.len() - 1],
        ),
        format!("  seconds   train {:.3} · write {:.3}", o.seconds.0, o.seconds.1),
        format!(
            "Measure the path with:\n  fisher action --checkpoints {} --activation {} --inputs {} --labels {} --plot action.png",
            shell_word(&dir),
            shell_word(&o.spec.activation),
            join("X.npy"),
            join("y.npy"),
        ),
    ]
    .join("\n")
}

/// The one-line JSON summary of a `train` run.
pub fn json_line(o: &Written) -> String {
    json!({
        "out_dir": o.dir.display().to_string(),
        "widths": o.spec.widths,
        "activations": o.activations,
        "parameters": o.parameters,
        "samples": o.spec.samples,
        "steps": o.spec.steps,
        "checkpoints": o.files.len(),
        "files": o.files,
        "checkpoint_steps": o.checkpoint_steps,
        "losses": o.losses,
        "loss_first": o.losses[0],
        "loss_last": o.losses[o.losses.len() - 1],
        "seed": o.spec.seed,
        "replaced": o.replaced,
        "seconds": {"train": o.seconds.0, "write": o.seconds.1},
    })
    .to_string()
}
