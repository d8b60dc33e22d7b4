//! `fisher train`: trains a seeded demo MLP and writes a run directory that `fisher action`
//! (and `fisher compute`) read, so the whole pipeline runs without PyTorch.
//!
//! ```text
//! RUN/X.npy                  inputs, N×d float32
//! RUN/y.npy                  class labels, int64 (N,)
//! RUN/ckpt_000.safetensors   θ at each checkpoint, PyTorch nn.Sequential keys (0.weight, 0.bias, 2.weight, …)
//! …
//! RUN/run.json               widths, activations, optimizer, seeds, the step and loss of each checkpoint
//! ```
//!
//! Flow: flags → [`TrainConfig`] → the output location checked (an existing non-empty
//! directory is refused without `--force`) → data and initial model → SGD → every file
//! written into a temporary directory beside RUN, which is then renamed to RUN. A failed run
//! leaves no directory behind, and a replaced one (`--force`) is only removed once the new
//! one is complete.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use fisher_engine::io;
use fisher_engine::model::{Activation, ActivationSpec, Dataset, Mlp, Targets};
use fisher_engine::model::train::{classification_task, init_mlp, sgd, SgdOptions, TrainRun};
use fisher_engine::{FisherError, MAX_GENERATED_VALUES};
use serde_json::json;

use super::args::{parse_widths, Report};
use super::exit::usage;
use super::format::shell_word;

/// The initial weights and the minibatch order get their own streams, derived from `--seed`
/// (the data use `--seed` itself), so that changing one never shifts another.
const INIT_STREAM: u64 = 0x7EA1_0000_0000_0001;
const SHUFFLE_STREAM: u64 = 0x7EA1_0000_0000_0002;

/// Raw flags of `fisher train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Layer widths: input, hidden..., classes (at least 2 classes).
    #[arg(long, value_name = "WIDTHS", default_value = "16,32,32,4")]
    pub widths: String,

    /// The activation after every Linear layer but the last (relu, tanh, sigmoid, gelu,
    /// identity), or a JSON list with one per gap, e.g. '["tanh","relu"]'.
    #[arg(long, value_name = "NAME|JSON", default_value = "tanh")]
    pub activation: String,

    /// Samples of the seeded classification task (Gaussian clusters warped by a fixed random
    /// tanh layer, one cluster per class).
    #[arg(long, value_name = "N", default_value_t = 2048)]
    pub samples: usize,

    /// SGD steps.
    #[arg(long, value_name = "STEPS", default_value_t = 400)]
    pub steps: usize,

    /// Learning rate.
    #[arg(long, value_name = "LR", default_value_t = 0.1)]
    pub lr: f32,

    /// Heavy-ball momentum in [0, 1) (0: plain SGD).
    #[arg(long, value_name = "M", default_value_t = 0.9)]
    pub momentum: f32,

    /// Samples per minibatch.
    #[arg(long, value_name = "B", default_value_t = 64)]
    pub batch: usize,

    /// Checkpoints to write, evenly spaced in steps, the initial and final models included
    /// (at most STEPS + 1).
    #[arg(long, value_name = "C", default_value_t = 25)]
    pub checkpoints: usize,

    /// Seed of the data, the initial weights and the minibatch order.
    #[arg(long, value_name = "S", default_value_t = 0)]
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
    /// Layer widths: input, hidden..., classes.
    pub widths: Vec<usize>,
    /// Activations, one per gap.
    pub activations: Vec<Activation>,
    /// The spelling of --activation (recorded, and used in the hint for `fisher action`).
    pub activation_text: String,
    /// N.
    pub samples: usize,
    /// SGD options (the shuffle seed already derived).
    pub sgd: SgdOptions,
    /// --seed.
    pub seed: u64,
    /// The run directory.
    pub out_dir: PathBuf,
    /// Replace a non-empty RUN.
    pub force: bool,
    /// Output style.
    pub report: Report,
}

impl TrainConfig {
    /// Validates raw flags.
    pub fn from_args(args: TrainArgs) -> anyhow::Result<Self> {
        let bad = || {
            usage(format!(
                "bad --widths '{}': expected at least two positive layer widths (input,...,classes), e.g. 16,32,32,4",
                args.widths
            ))
        };
        let widths = parse_widths(&args.widths).ok_or_else(bad)?;
        let classes = widths[widths.len() - 1];
        if classes < 2 {
            return Err(usage(format!("--widths {}: the last width is the number of classes and must be at least 2", args.widths)));
        }
        let params: u128 = widths.windows(2).map(|w| w[1] as u128 * (w[0] as u128 + 1)).sum();
        let inputs = args.samples as u128 * widths[0] as u128;
        if params > MAX_GENERATED_VALUES || inputs > MAX_GENERATED_VALUES {
            return Err(usage(format!(
                "--widths {} --samples {} would build {params} parameters and {inputs} input values in memory (limit {MAX_GENERATED_VALUES} each)",
                args.widths, args.samples
            )));
        }
        let spec = ActivationSpec::parse(&args.activation).map_err(|e| anyhow::Error::new(e).context("bad --activation"))?;
        let activations = spec.for_gaps(widths.len() - 2).map_err(|e| anyhow::Error::new(e).context("bad --activation"))?;
        if args.samples == 0 {
            return Err(usage("--samples must be at least 1"));
        }
        if args.steps == 0 {
            return Err(usage("--steps must be at least 1"));
        }
        if args.batch == 0 {
            return Err(usage("--batch must be at least 1"));
        }
        if args.checkpoints < 2 || args.checkpoints > args.steps + 1 {
            return Err(usage(format!(
                "--checkpoints must be between 2 (the initial and the final model) and --steps + 1 = {}, not {}",
                args.steps + 1,
                args.checkpoints
            )));
        }
        if !(args.lr.is_finite() && args.lr > 0.0) {
            return Err(usage(format!("--lr must be a positive number, not {}", args.lr)));
        }
        if !(0.0..1.0).contains(&args.momentum) {
            return Err(usage(format!("--momentum must be in [0, 1), not {}", args.momentum)));
        }
        let report = Report::from_flags(args.json, args.quiet);
        Ok(TrainConfig {
            widths,
            activations,
            activation_text: args.activation,
            samples: args.samples,
            sgd: SgdOptions {
                learning_rate: args.lr,
                momentum: args.momentum,
                batch_size: args.batch,
                steps: args.steps,
                checkpoints: args.checkpoints,
                seed: args.seed ^ SHUFFLE_STREAM,
            },
            seed: args.seed,
            out_dir: args.out_dir,
            force: args.force,
            report,
        })
    }
}

/// What a `train` run did, for the report.
#[derive(Debug)]
pub struct Outcome {
    /// The run directory.
    pub out_dir: PathBuf,
    /// Layer widths.
    pub widths: Vec<usize>,
    /// Activation names, one per gap.
    pub activations: Vec<&'static str>,
    /// --activation as given.
    pub activation_text: String,
    /// P.
    pub parameters: usize,
    /// N.
    pub samples: usize,
    /// SGD steps.
    pub steps: usize,
    /// Checkpoint file names, in order.
    pub files: Vec<String>,
    /// The step of each checkpoint.
    pub checkpoint_steps: Vec<usize>,
    /// Mean NLL on the whole dataset at each checkpoint.
    pub losses: Vec<f64>,
    /// --seed.
    pub seed: u64,
    /// Whether an existing directory was replaced.
    pub replaced: bool,
    /// Seconds: training, writing.
    pub seconds: (f64, f64),
}

/// The directory RUN will be created in.
fn parent_of(dir: &Path) -> &Path {
    match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn io_error(path: &Path, message: impl Into<String>) -> FisherError {
    FisherError::Io { path: path.display().to_string(), message: message.into() }
}

/// Refuses an output location that cannot (or, without --force, must not) be written.
/// Returns whether RUN exists (and will be replaced).
pub fn check_out_dir(cfg: &TrainConfig) -> anyhow::Result<bool> {
    let dir = &cfg.out_dir;
    let parent = parent_of(dir);
    if !parent.is_dir() {
        return Err(io_error(parent, format!("directory does not exist (cannot create {})", dir.display())).into());
    }
    if !dir.exists() {
        return Ok(false);
    }
    if !dir.is_dir() {
        return Err(io_error(dir, "exists and is not a directory; --out-dir names the run directory to create").into());
    }
    let empty = std::fs::read_dir(dir).map_err(|e| io_error(dir, format!("cannot read: {e}")))?.next().is_none();
    if !empty && !cfg.force {
        return Err(usage(format!(
            "{} exists and is not empty; choose another --out-dir, or pass --force to replace it",
            dir.display()
        )));
    }
    Ok(true)
}

/// `ckpt_007.safetensors`: zero-padded to at least three digits, so that names sort in order.
fn checkpoint_name(index: usize, count: usize) -> String {
    let digits = (count.saturating_sub(1)).to_string().len().max(3);
    format!("ckpt_{index:0digits$}.safetensors")
}

/// Writes every file of the run into `dir`.
fn write_run(dir: &Path, cfg: &TrainConfig, data: &Dataset, run: &TrainRun, files: &[String]) -> anyhow::Result<()> {
    io::write_npy_matrix(&dir.join("X.npy"), data.inputs.view())?;
    let Targets::Classes(labels) = &data.targets else {
        unreachable!("the classification task has class labels")
    };
    io::write_npy_labels(&dir.join("y.npy"), labels)?;
    for (model, name) in run.checkpoints.iter().zip(files) {
        model.to_safetensors(&dir.join(name))?;
    }
    let first = &run.checkpoints[0];
    let record = json!({
        "format": "fisher-engine training run",
        "version": 1,
        "widths": first.widths(),
        "layer_indices": first.layers.iter().map(|l| l.index).collect::<Vec<_>>(),
        "activation": cfg.activation_text,
        "activations": first.activations.iter().map(|a| a.name()).collect::<Vec<_>>(),
        "likelihood": "categorical",
        "parameters": first.num_params(),
        "inputs": "X.npy",
        "labels": "y.npy",
        "samples": cfg.samples,
        "task": "fisher_engine::model::train::classification_task(samples, widths[0], widths[-1], seed)",
        "seed": cfg.seed,
        "init": format!("fisher_engine::model::train::init_mlp (PyTorch nn.Linear default), seed {} ^ {INIT_STREAM:#x}", cfg.seed),
        "optimizer": {
            "name": "sgd",
            "learning_rate": cfg.sgd.learning_rate,
            "momentum": cfg.sgd.momentum,
            "batch_size": cfg.sgd.batch_size,
            "shuffle_seed": cfg.sgd.seed,
        },
        "steps": cfg.sgd.steps,
        "checkpoints": files,
        "checkpoint_steps": run.steps,
        "losses": run.losses,
        "loss": "mean negative log-likelihood (softmax cross-entropy) on the whole dataset",
        "fisher_engine_version": env!("CARGO_PKG_VERSION"),
    });
    let path = dir.join("run.json");
    let text = serde_json::to_string_pretty(&record).context("encoding run.json")?;
    std::fs::write(&path, text + "\n").map_err(|e| io_error(&path, format!("cannot write: {e}")))?;
    Ok(())
}

/// Moves the complete staging directory onto RUN (replacing it when `replace`).
fn publish(staged: tempfile::TempDir, out: &Path, replace: bool) -> anyhow::Result<()> {
    if !replace {
        let staged = staged.keep();
        return std::fs::rename(&staged, out).map_err(|e| {
            let _ = std::fs::remove_dir_all(&staged);
            io_error(out, format!("cannot create: {e}")).into()
        });
    }
    // A directory cannot be renamed onto a non-empty one: move the old run aside first, and
    // remove it only once the new one is in place (putting it back if that fails).
    let aside = tempfile::Builder::new()
        .prefix(".fisher-train-old-")
        .tempdir_in(parent_of(out))
        .map_err(|e| io_error(out, format!("cannot replace: {e}")))?;
    let old = aside.path().join("run");
    std::fs::rename(out, &old).map_err(|e| io_error(out, format!("cannot replace: {e}")))?;
    let staged = staged.keep();
    if let Err(e) = std::fs::rename(&staged, out) {
        let _ = std::fs::rename(&old, out);
        let _ = std::fs::remove_dir_all(&staged);
        return Err(io_error(out, format!("cannot replace: {e}")).into());
    }
    drop(aside); // removes the old run
    Ok(())
}

/// Runs `fisher train`.
pub fn run(cfg: &TrainConfig) -> anyhow::Result<Outcome> {
    let replaced = check_out_dir(cfg)?;
    let (data, run, train_seconds) = train(cfg)?;
    write(cfg, &data, run, replaced, train_seconds)
}

/// The data and the training run of `cfg`, in memory; also the seconds it took.
pub fn train(cfg: &TrainConfig) -> anyhow::Result<(Dataset, TrainRun, f64)> {
    let start = Instant::now();
    let (d, classes) = (cfg.widths[0], cfg.widths[cfg.widths.len() - 1]);
    let data = classification_task(cfg.samples, d, classes, cfg.seed).context("building the classification task")?;
    let init = init_mlp(&cfg.widths, Activation::Identity, true, cfg.seed ^ INIT_STREAM)?;
    let init = Mlp::new(init.layers, cfg.activations.clone())?;
    let run = sgd(&init, &data, &cfg.sgd).context("training")?;
    Ok((data, run, start.elapsed().as_secs_f64()))
}

/// Writes a run that [`train`] made as the directory `cfg.out_dir` (staged beside it and
/// renamed into place; an existing directory is replaced only when `replace`, which
/// [`check_out_dir`] decides).
pub fn write(cfg: &TrainConfig, data: &Dataset, run: TrainRun, replace: bool, train_seconds: f64) -> anyhow::Result<Outcome> {
    let replaced = replace;
    let start = Instant::now();
    let files: Vec<String> = (0..run.checkpoints.len()).map(|i| checkpoint_name(i, run.checkpoints.len())).collect();
    let name = cfg.out_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "run".into());
    // Beside RUN, so that the final rename stays on one file system; removed on any error.
    let staged = tempfile::Builder::new()
        .prefix(&format!(".{name}.fisher-train-"))
        .tempdir_in(parent_of(&cfg.out_dir))
        .map_err(|e| io_error(parent_of(&cfg.out_dir), format!("cannot create a directory: {e}")))?;
    write_run(staged.path(), cfg, data, &run, &files)?;
    publish(staged, &cfg.out_dir, replaced)?;
    let write_seconds = start.elapsed().as_secs_f64();

    Ok(Outcome {
        out_dir: cfg.out_dir.clone(),
        widths: cfg.widths.clone(),
        activations: cfg.activations.iter().map(|a| a.name()).collect(),
        activation_text: cfg.activation_text.clone(),
        parameters: run.checkpoints[0].num_params(),
        samples: cfg.samples,
        steps: cfg.sgd.steps,
        files,
        checkpoint_steps: run.steps,
        losses: run.losses,
        seed: cfg.seed,
        replaced,
        seconds: (train_seconds, write_seconds),
    })
}

/// The readable summary of a `train` run.
pub fn human(o: &Outcome) -> String {
    let widths = o.widths.iter().map(usize::to_string).collect::<Vec<_>>().join("-");
    let mut names = o.activations.clone();
    names.dedup();
    let act = match names.as_slice() {
        [] => "linear".to_string(),
        [one] => one.to_string(),
        _ => o.activations.join("/"),
    };
    let dir = o.out_dir.display().to_string();
    let (first, last) = (o.losses[0], o.losses[o.losses.len() - 1]);
    let mut lines = vec![
        format!(
            "trained a {widths} {act} MLP (P = {} parameters) on {} samples of the seeded classification task (seed {})",
            o.parameters, o.samples, o.seed
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
    ];
    let d = shell_word(&dir);
    let join = |file: &str| shell_word(&o.out_dir.join(file).display().to_string());
    lines.push(format!(
        "Measure the path with:\n  fisher action --checkpoints {d} --activation {} --inputs {} --labels {} --plot action.png",
        shell_word(&o.activation_text),
        join("X.npy"),
        join("y.npy"),
    ));
    lines.join("\n")
}

/// The one-line JSON summary of a `train` run.
pub fn json_line(o: &Outcome) -> String {
    json!({
        "out_dir": o.out_dir.display().to_string(),
        "widths": o.widths,
        "activations": o.activations,
        "parameters": o.parameters,
        "samples": o.samples,
        "steps": o.steps,
        "checkpoints": o.files.len(),
        "files": o.files,
        "checkpoint_steps": o.checkpoint_steps,
        "losses": o.losses,
        "loss_first": o.losses[0],
        "loss_last": o.losses[o.losses.len() - 1],
        "seed": o.seed,
        "replaced": o.replaced,
        "seconds": {"train": o.seconds.0, "write": o.seconds.1},
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_names_sort_in_order() {
        assert_eq!(checkpoint_name(7, 25), "ckpt_007.safetensors");
        assert_eq!(checkpoint_name(1234, 2000), "ckpt_1234.safetensors");
        let names: Vec<String> = (0..1001).map(|i| checkpoint_name(i, 1001)).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
    }
}
