//! `fisher action`: the action, Fisher–Rao length, chord and efficiency of a training run
//! given as checkpoints (see [`fisher_engine::analysis::action`] for the definitions).
//!
//! Flow: flags → [`ActionConfig`] → the plot location checked → the checkpoint list (files,
//! or every `*.safetensors` of one directory in natural order) → every checkpoint loaded and
//! checked to share the first one's architecture (the file at fault is named) → the data
//! loaded and checked against the model → device → T + segments implicit quadratic forms
//! (progress bar) → the plot, written atomically. The plot is the only file written, and
//! only on success.

use std::cmp::Ordering;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use fisher_engine::analysis::action::{self, ActionReport};
use fisher_engine::backend::gpu::GpuOptions;
use fisher_engine::device::{self, DeviceRequest};
use fisher_engine::model::{ActivationSpec, Dataset, Likelihood, Mlp};
use fisher_engine::fisher::Variant;
use fisher_engine::output::plot;
use fisher_engine::output::progress::Progress;
use fisher_engine::{Backend, FisherError};
use serde_json::json;

use super::args::{BackendArgs, Report};
use super::args::VariantArgs;
use super::exit::usage;
use super::format::{sci, sci_with};

/// Steps shown in the human table before the middle is elided (`--json` lists all).
const TABLE_ROWS: usize = 60;

/// Raw flags of `fisher action`.
#[derive(Debug, Args)]
pub struct ActionArgs {
    /// The checkpoints θ₀ … θ_T in order: two or more safetensors files (PyTorch state dicts
    /// of one architecture), or one directory whose *.safetensors files are taken in natural
    /// name order (ckpt_2 before ckpt_10).
    #[arg(long, value_name = "FILES|DIR", num_args = 1.., required = true)]
    pub checkpoints: Vec<PathBuf>,

    /// The activation after every Linear layer but the last: relu, tanh, sigmoid, gelu
    /// (exact, erf) or identity; or a JSON list with one per gap, e.g. '["tanh","relu"]',
    /// inline or in a .json file.
    #[arg(long, value_name = "NAME|JSON|FILE")]
    pub activation: String,

    /// Inputs: an N×d float32/float64 .npy file.
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

    /// Print one JSON line instead of the table.
    #[arg(long)]
    pub json: bool,

    /// Print nothing on success (errors are still reported).
    #[arg(long, conflicts_with = "json")]
    pub quiet: bool,
}

/// A validated `fisher action` invocation.
#[derive(Debug, Clone)]
pub struct ActionConfig {
    /// As given (resolved against the file system by [`checkpoint_files`]).
    pub checkpoints: Vec<PathBuf>,
    /// Activations between the layers.
    pub activation: ActivationSpec,
    /// Inputs (.npy).
    pub inputs: PathBuf,
    /// Labels or targets (.npy).
    pub labels: PathBuf,
    /// The likelihood.
    pub likelihood: Likelihood,
    /// The variant.
    pub variant: Variant,
    /// Segments of the chord's midpoint rule.
    pub segments: usize,
    /// Requested compute path.
    pub backend: Backend,
    /// Adapter choice.
    pub gpu: GpuOptions,
    /// The plot file.
    pub plot: Option<PathBuf>,
    /// Output style.
    pub report: Report,
}

impl ActionConfig {
    /// Validates raw flags.
    pub fn from_args(args: ActionArgs) -> anyhow::Result<Self> {
        let variant = args.variant.variant("")?;
        let likelihood = args.variant.likelihood();
        let activation =
            ActivationSpec::parse(&args.activation).map_err(|e| anyhow::Error::new(e).context("bad --activation"))?;
        if args.segments == 0 {
            return Err(usage("--segments must be at least 1"));
        }
        let (backend, gpu) = args.backend.resolve()?;
        if let Some(path) = &args.plot {
            plot::plot_format(path).map_err(|e| anyhow::Error::new(e).context("bad --plot"))?;
        }
        let report = Report::from_flags(args.json, args.quiet);
        Ok(ActionConfig {
            checkpoints: args.checkpoints,
            activation,
            inputs: args.inputs,
            labels: args.labels,
            likelihood,
            variant,
            segments: args.segments,
            backend,
            gpu,
            plot: args.plot,
            report,
        })
    }
}

/// Compares names the way people count: runs of digits by their value (`ckpt_2` before
/// `ckpt_10`), everything else character by character.
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a, b);
    loop {
        match (a.chars().next(), b.chars().next()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let split = |s: &str| s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
                let (da, ra) = a.split_at(split(a));
                let (db, rb) = b.split_at(split(b));
                let (va, vb) = (da.trim_start_matches('0'), db.trim_start_matches('0'));
                // Longer (without leading zeros) is larger; equal lengths compare digit by
                // digit; equal values fall back to the zero-padded spelling.
                let order = va.len().cmp(&vb.len()).then_with(|| va.cmp(vb)).then_with(|| da.cmp(db));
                if order != Ordering::Equal {
                    return order;
                }
                (a, b) = (ra, rb);
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(&y);
                }
                (a, b) = (&a[x.len_utf8()..], &b[y.len_utf8()..]);
            }
        }
    }
}

/// The checkpoint files: the paths as given, or one directory's `*.safetensors` files in
/// natural order. At least two are required.
pub fn checkpoint_files(given: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let files = match given {
        [dir] if dir.is_dir() => {
            let entries = std::fs::read_dir(dir).map_err(|e| FisherError::Io {
                path: dir.display().to_string(),
                message: format!("cannot list the checkpoint directory: {e}"),
            })?;
            let mut files: Vec<PathBuf> = Vec::new();
            for entry in entries {
                let entry = entry.map_err(|e| FisherError::Io {
                    path: dir.display().to_string(),
                    message: format!("cannot list the checkpoint directory: {e}"),
                })?;
                let path = entry.path();
                let is_checkpoint = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
                if is_checkpoint && path.is_file() {
                    files.push(path);
                }
            }
            files.sort_by(|a, b| {
                let name = |p: &PathBuf| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                natural_cmp(&name(a), &name(b))
            });
            if files.len() < 2 {
                return Err(usage(format!(
                    "the action needs at least 2 checkpoints, but {} holds {} *.safetensors file{}",
                    dir.display(),
                    files.len(),
                    if files.len() == 1 { "" } else { "s" }
                )));
            }
            files
        }
        [one] => {
            return Err(usage(format!(
                "the action needs at least 2 checkpoints, got only {} (give two or more files, or a directory of them)",
                one.display()
            )))
        }
        many => {
            if let Some(dir) = many.iter().find(|p| p.is_dir()) {
                return Err(usage(format!(
                    "{} is a directory; give either one directory or two or more checkpoint files",
                    dir.display()
                )));
            }
            many.to_vec()
        }
    };
    Ok(files)
}

/// `6-12-3`, with "(no bias in layer k)" where a layer has none.
/// Whether two models have the same layer shapes, Sequential indices and biases.
fn same_architecture(a: &Mlp, b: &Mlp) -> bool {
    a.layers.len() == b.layers.len()
        && a.layers.iter().zip(&b.layers).all(|(x, y)| {
            x.index == y.index
                && x.weight.dim() == y.weight.dim()
                && x.bias.as_ref().map(|v| v.len()) == y.bias.as_ref().map(|v| v.len())
        })
}

/// Wall-clock seconds per stage.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Seconds {
    /// Reading and checking the checkpoints and the data.
    pub load: f64,
    /// Choosing an adapter, creating the device and building the kernels.
    pub setup: f64,
    /// The T + segments quadratic forms.
    pub compute: f64,
    /// Rendering and writing the plot (0 without --plot).
    pub plot: f64,
}

/// What an `action` run did, for the report.
#[derive(Debug)]
pub struct Outcome {
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

/// Runs `fisher action`.
pub fn run(cfg: &ActionConfig) -> anyhow::Result<Outcome> {
    let mut seconds = Seconds::default();
    if let Some(path) = &cfg.plot {
        plot::check_plot_path(path).context("bad --plot")?;
    }
    let start = Instant::now();
    let files = checkpoint_files(&cfg.checkpoints)?;
    let mut models: Vec<Mlp> = Vec::with_capacity(files.len());
    for file in &files {
        let model = Mlp::from_safetensors(file, &cfg.activation)?;
        if let Some(first) = models.first() {
            if !same_architecture(first, &model) {
                return Err(usage(format!(
                    "{}: architecture {} differs from {} ({}); every checkpoint must have the same layers",
                    file.display(),
                    model.shape_text(),
                    first.shape_text(),
                    files[0].display()
                )));
            }
        }
        models.push(model);
    }
    let data = Dataset::from_npy(&cfg.inputs, &cfg.labels, cfg.likelihood)?;
    data.validate(&models[0], cfg.likelihood).with_context(|| {
        format!("{} and {} do not fit the model {}", cfg.inputs.display(), cfg.labels.display(), files[0].display())
    })?;
    seconds.load = start.elapsed().as_secs_f64();

    let start = Instant::now();
    let device = device::open(&DeviceRequest::from_env(cfg.backend, cfg.gpu.clone())?)?;
    seconds.setup = start.elapsed().as_secs_f64();
    let engine = &device.engine;

    let start = Instant::now();
    let total = files.len() - 1 + cfg.segments;
    let progress =
        Progress::new("action: quadratic forms", total, Progress::wanted(cfg.report == Report::Quiet, cfg.report == Report::Json));
    let report = action::measure(engine, &models, &data, cfg.variant, cfg.segments, &mut progress.callback())?;
    progress.finish();
    seconds.compute = start.elapsed().as_secs_f64();

    let mut names: Vec<&str> = models[0].activations.iter().map(|a| a.name()).collect();
    names.dedup();
    let architecture = format!(
        "{} {}",
        models[0].shape_text(),
        match names.as_slice() {
            [] => "linear".to_string(),
            [one] => one.to_string(),
            _ => models[0].activations.iter().map(|a| a.name()).collect::<Vec<_>>().join("/"),
        }
    );
    let backend = engine.device_info();
    if let Some(path) = &cfg.plot {
        let start = Instant::now();
        let title = format!(
            "Action along training: {architecture} MLP, {} Fisher, N = {}",
            cfg.variant.name(),
            data.len()
        );
        plot::action_plot(path, &report, &title).context("writing the plot")?;
        seconds.plot = start.elapsed().as_secs_f64();
    }
    Ok(Outcome {
        report,
        files,
        architecture,
        samples: data.len(),
        likelihood: cfg.likelihood,
        variant: cfg.variant,
        backend,
        adapter: device.adapter.map(|a| a.name),
        fallback: device.fallback,
        plot: cfg.plot.clone(),
        seconds,
    })
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
pub fn human(o: &Outcome) -> String {
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
        format!(
            "{:>6}  {:>12}  {:>12}  {:>12}  {:>14.6}",
            s.step,
            sci(s.euclidean),
            sci(s.action),
            sci(s.length),
            s.cumulative_length
        )
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
pub fn json_line(o: &Outcome) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scientific_numbers_line_up() {
        assert_eq!(sci(4.2278), "4.2278e+00");
        assert_eq!(sci(0.00012345), "1.2345e-04");
        assert_eq!(sci(0.0), "0.0000e+00");
        assert_eq!(sci(f64::NAN), "NaN");
    }

    #[test]
    fn natural_order() {
        let mut names = vec!["ckpt_10", "ckpt_2", "ckpt_1", "ckpt_002", "a", "ckpt_", "ckpt_100", "b1", "b01x"];
        names.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(names, ["a", "b01x", "b1", "ckpt_", "ckpt_1", "ckpt_002", "ckpt_2", "ckpt_10", "ckpt_100"]);
        assert_eq!(natural_cmp("ckpt_000.safetensors", "ckpt_000.safetensors"), Ordering::Equal);
        assert_eq!(natural_cmp("θ9", "θ10"), Ordering::Less);
    }
}
