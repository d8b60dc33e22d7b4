//! `fisher compute`: the Fisher information of a PyTorch MLP on data, for every variant and
//! form.
//!
//! Flow: flags → [`ComputeConfig`] (every flag and flag combination checked) → the model and
//! the data, loaded from files or built in memory (`--synthetic-model`), and checked
//! against each other → the size of the result checked against `--max-result-gib` → the
//! synthetic files saved (`--save-model`, `--save-data`) → device → compute → the f64
//! reference (`--verify`) → atomic write.
//!
//! Every check of the user's input runs before the output file is created, and the output
//! is written to a temporary file renamed into place: a failed run leaves no output behind.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use fisher_engine::backend::gpu::GpuOptions;
use fisher_engine::device::{self, DeviceRequest};
use fisher_engine::io::fisher_file::{self, FisherFile};
use fisher_engine::io;
use fisher_engine::model::{architecture_text, ActivationSpec, Dataset, Likelihood, Mlp, Targets};
use fisher_engine::fisher::{rows_per_sample, NetForm, Variant};
use fisher_engine::verify::{Contract, Verdict};
use fisher_engine::Backend;
use serde_json::json;

use super::args::{load_model_and_data, FormArg, ModelArgs, Report, Source};
use super::exit::usage;
use super::format::{bytes, tensor_list};

/// Raw flags of `fisher compute`.
#[derive(Debug, Args)]
pub struct ComputeArgs {
    /// The activation after every Linear layer but the last: relu, tanh, sigmoid, gelu
    /// (exact, erf) or identity; or a JSON list with one per gap, e.g. '["tanh","relu"]',
    /// inline or in a .json file.
    #[arg(long, value_name = "NAME|JSON|FILE")]
    pub activation: String,

    /// Model, data, variant and backend.
    #[command(flatten)]
    pub model: ModelArgs,

    /// What to compute (see below).
    #[arg(long, value_enum)]
    pub form: Option<FormArg>,

    /// Output safetensors file. Written atomically: complete or absent.
    #[arg(long, value_name = "F.safetensors")]
    pub out: Option<PathBuf>,

    /// Also compute the f64 reference (an independent per-sample backprop) and report the
    /// disagreement; beyond ‖Δ‖/‖ref‖ = 1e-5 the run fails (exit 1) and writes nothing.
    #[arg(long)]
    pub verify: bool,

    /// Refuse, before computing, a result (full, layer, grads; with --verify also its f64
    /// reference) larger than this many GiB of host memory.
    #[arg(long, value_name = "GIB", default_value_t = 2.0)]
    pub max_result_gib: f64,

    /// Print one JSON line instead of the human summary.
    #[arg(long)]
    pub json: bool,

    /// Print nothing on success (errors are still reported).
    #[arg(long, conflicts_with = "json")]
    pub quiet: bool,

    /// Write the synthetic model as a PyTorch state-dict safetensors file.
    #[arg(long, value_name = "M.safetensors")]
    pub save_model: Option<PathBuf>,

    /// Write the synthetic data to DIR/inputs.npy and DIR/labels.npy (DIR is created).
    #[arg(long, value_name = "DIR")]
    pub save_data: Option<PathBuf>,
}

/// A validated `fisher compute` invocation.
#[derive(Debug, Clone)]
pub struct ComputeConfig {
    /// Model and data.
    pub source: Source,
    /// Activations between the layers.
    pub activation: ActivationSpec,
    /// The spelling of --activation, for the reproduction hint.
    pub activation_text: String,
    /// The likelihood.
    pub likelihood: Likelihood,
    /// The variant.
    pub variant: Variant,
    /// The form (`None`: only save the synthetic files).
    pub form: Option<NetForm>,
    /// Requested compute path.
    pub backend: Backend,
    /// Adapter choice.
    pub gpu: GpuOptions,
    /// Output file (present exactly when `form` is).
    pub out: Option<PathBuf>,
    /// Compare with the f64 reference.
    pub verify: bool,
    /// Largest result (and reference) held in host memory.
    pub max_result_bytes: u128,
    /// Where to save the synthetic model.
    pub save_model: Option<PathBuf>,
    /// Where to save the synthetic data.
    pub save_data: Option<PathBuf>,
    /// Output style.
    pub report: Report,
}

impl ComputeConfig {
    /// Validates raw flags. Cross-flag rules are checked here, not (only) by clap, so that
    /// each refusal names the flag at fault.
    pub fn from_args(args: ComputeArgs) -> anyhow::Result<Self> {
        if !args.model.is_synthetic() {
            for (given, flag) in [(args.save_model.is_some(), "--save-model"), (args.save_data.is_some(), "--save-data")] {
                if given {
                    return Err(usage(format!("{flag} only applies to --synthetic-model runs")));
                }
            }
        }
        let source = args.model.source()?;
        let variant = args.model.variant()?;
        let likelihood = args.model.likelihood();
        let activation = ActivationSpec::parse(&args.activation)
            .map_err(|e| anyhow::Error::new(e).context("bad --activation"))?;

        let saves = args.save_model.is_some() || args.save_data.is_some();
        let form = args.form.map(NetForm::from);
        match (form, &args.out) {
            (Some(_), Some(_)) => {}
            (Some(_), None) => return Err(usage("--out F.safetensors is required")),
            (None, Some(_)) => return Err(usage("--out needs --form full|diag|layer|kfac|grads|norms")),
            (None, None) if saves => {
                if args.verify {
                    return Err(usage("--verify needs --form and --out (without them the run only saves the synthetic files)"));
                }
            }
            (None, None) => return Err(usage("--form full|diag|layer|kfac|grads|norms and --out F.safetensors are required")),
        }

        let (backend, gpu) = args.model.backend()?;
        if !(args.max_result_gib.is_finite() && args.max_result_gib > 0.0) {
            return Err(usage(format!("--max-result-gib must be a positive number, not {}", args.max_result_gib)));
        }
        let report = Report::from_flags(args.json, args.quiet);
        Ok(ComputeConfig {
            source,
            activation,
            activation_text: args.activation,
            likelihood,
            variant,
            form,
            backend,
            gpu,
            out: args.out,
            verify: args.verify,
            max_result_bytes: (args.max_result_gib * (1u64 << 30) as f64) as u128,
            save_model: args.save_model,
            save_data: args.save_data,
            report,
        })
    }
}

/// Wall-clock seconds per stage.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Seconds {
    /// Reading and checking (or generating) the model and the data.
    pub load: f64,
    /// Writing the synthetic files (--save-model, --save-data).
    pub save: f64,
    /// Choosing an adapter, creating the device and building the kernels.
    pub setup: f64,
    /// The Fisher computation, including transfers.
    pub compute: f64,
    /// The f64 reference and the comparison (0 without --verify).
    pub verify: f64,
    /// Writing the output file.
    pub write: f64,
}

/// What a `compute` run did, for the report.
#[derive(Debug)]
pub struct Outcome {
    /// Model and data source.
    pub source: Source,
    /// Layer widths: input, then every layer's output.
    pub widths: Vec<usize>,
    /// The layers' Sequential indices.
    pub layer_indices: Vec<usize>,
    /// Activation names, one per gap.
    pub activations: Vec<&'static str>,
    /// P.
    pub params: usize,
    /// N.
    pub samples: usize,
    /// The likelihood.
    pub likelihood: Likelihood,
    /// The variant.
    pub variant: Variant,
    /// R.
    pub rows_per_sample: usize,
    /// The form, `None` when the run only saved synthetic files.
    pub form: Option<NetForm>,
    /// The backend's label.
    pub backend: Option<String>,
    /// GPU adapter name, when on a GPU.
    pub adapter: Option<String>,
    /// Why Auto fell back to the CPU.
    pub fallback: Option<String>,
    /// Names and shapes of the written tensors.
    pub tensors: Vec<(String, Vec<usize>)>,
    /// tr F (kfac: tr(G ⊗ A) summed over layers).
    pub trace: Option<f64>,
    /// Agreement with the f64 reference (`--verify`); always a pass here.
    pub verification: Option<Verdict>,
    /// The file written and its size.
    pub out: Option<(PathBuf, u64)>,
    /// Synthetic files written.
    pub saved: Saved,
    /// Seconds per stage.
    pub seconds: Seconds,
    /// The --activation spelling (for the reproduction hint).
    pub activation_text: String,
}

/// The synthetic files a run wrote.
#[derive(Debug, Default, Clone)]
pub struct Saved {
    /// The model file.
    pub model: Option<PathBuf>,
    /// Inputs and labels.
    pub data: Option<(PathBuf, PathBuf)>,
}

/// Bytes of host memory the result of `form` holds (f32), or `None` for forms that are
/// small by construction (diag, kfac, norms: P, Σ (in+1)² + out², N values).
fn result_values(mlp: &Mlp, samples: usize, rows: usize, form: NetForm) -> Option<(u128, String)> {
    let p = mlp.num_params() as u128;
    match form {
        NetForm::Full => Some((p * p, format!("P×P = {p}×{p}"))),
        NetForm::Layer => {
            let values = mlp.layers.iter().map(|l| (l.num_params() as u128).pow(2)).sum();
            Some((values, "Σ_l P_l²".to_string()))
        }
        NetForm::Grads => Some((
            samples as u128 * rows as u128 * p,
            format!("N·R×P = {samples}·{rows}×{p}"),
        )),
        NetForm::Diagonal | NetForm::Kfac | NetForm::Norms => None,
    }
}

/// Refuses (exit 2), before anything is computed, a result larger than the limit.
fn check_result_size(cfg: &ComputeConfig, mlp: &Mlp, samples: usize, rows: usize, form: NetForm) -> anyhow::Result<()> {
    let Some((values, what)) = result_values(mlp, samples, rows, form) else { return Ok(()) };
    // f32 result, plus the f64 reference under --verify.
    let bytes_needed = values * if cfg.verify { 4 + 8 } else { 4 };
    if bytes_needed <= cfg.max_result_bytes {
        return Ok(());
    }
    let hint = match form {
        NetForm::Grads if rows > 1 => {
            "; --form norms gives the per-sample squared norms without materializing gradients, and \
             --variant empirical has R = 1 row per sample"
        }
        NetForm::Grads => "; --form norms gives the per-sample squared norms without materializing gradients",
        _ => "; --form diag and --form kfac stay small for any model",
    };
    let size = |b: u128| bytes(u64::try_from(b).unwrap_or(u64::MAX));
    Err(usage(format!(
        "--form {} holds {what} values ({}{}) in host memory, beyond the --max-result-gib limit of {}{hint}",
        form.name(),
        size(bytes_needed),
        if cfg.verify { " with its f64 reference for --verify" } else { "" },
        size(cfg.max_result_bytes),
    )))
}

/// Loads (or builds) the model and the data, and checks them against each other.
fn load(cfg: &ComputeConfig) -> anyhow::Result<(Mlp, Dataset)> {
    load_model_and_data(&cfg.source, &cfg.activation, cfg.likelihood)
}

/// Writes the synthetic model and data where asked.
fn save_synthetic(cfg: &ComputeConfig, mlp: &Mlp, data: &Dataset) -> anyhow::Result<Saved> {
    let mut saved = Saved::default();
    if let Some(path) = &cfg.save_model {
        mlp.to_safetensors(path)?;
        saved.model = Some(path.clone());
    }
    if let Some(dir) = &cfg.save_data {
        std::fs::create_dir_all(dir).map_err(|e| fisher_engine::FisherError::Io {
            path: dir.display().to_string(),
            message: format!("cannot create the data directory: {e}"),
        })?;
        let inputs = dir.join("inputs.npy");
        let labels = dir.join("labels.npy");
        io::write_npy_matrix(&inputs, data.inputs.view())?;
        match &data.targets {
            Targets::Classes(classes) => io::write_npy_labels(&labels, classes)?,
            Targets::Values(values) => io::write_npy_matrix(&labels, values.view())?,
        }
        saved.data = Some((inputs, labels));
    }
    Ok(saved)
}

/// Checks, before anything is built or written, that every output location can be written.
fn check_output_locations(cfg: &ComputeConfig) -> anyhow::Result<()> {
    if let Some(out) = &cfg.out {
        io::check_output_path(out)?;
    }
    if let Some(model) = &cfg.save_model {
        io::check_output_path(model)?;
    }
    if let Some(dir) = &cfg.save_data {
        if dir.exists() && !dir.is_dir() {
            return Err(fisher_engine::FisherError::Io {
                path: dir.display().to_string(),
                message: "--save-data needs a directory, but this is a file".into(),
            }
            .into());
        }
    }
    Ok(())
}

/// Runs `fisher compute`.
pub fn run(cfg: &ComputeConfig) -> anyhow::Result<Outcome> {
    let mut seconds = Seconds::default();
    check_output_locations(cfg)?;

    let start = Instant::now();
    let (mlp, data) = load(cfg)?;
    seconds.load = start.elapsed().as_secs_f64();
    let samples = data.len();
    let rows = rows_per_sample(cfg.variant, mlp.output_dim());
    if let Some(form) = cfg.form {
        check_result_size(cfg, &mlp, samples, rows, form)?;
    }

    let start = Instant::now();
    let saved = save_synthetic(cfg, &mlp, &data)?;
    seconds.save = start.elapsed().as_secs_f64();

    let mut outcome = Outcome {
        source: cfg.source.clone(),
        widths: mlp.widths(),
        layer_indices: mlp.layers.iter().map(|l| l.index).collect(),
        activations: mlp.activations.iter().map(|a| a.name()).collect(),
        params: mlp.num_params(),
        samples,
        likelihood: cfg.likelihood,
        variant: cfg.variant,
        rows_per_sample: rows,
        form: cfg.form,
        backend: None,
        adapter: None,
        fallback: None,
        tensors: Vec::new(),
        trace: None,
        verification: None,
        out: None,
        saved,
        seconds,
        activation_text: cfg.activation_text.clone(),
    };
    let (Some(form), Some(out)) = (cfg.form, &cfg.out) else {
        return Ok(outcome); // only saving the synthetic files
    };

    let start = Instant::now();
    let device = device::open(&DeviceRequest::from_env(cfg.backend, cfg.gpu.clone())?)?;
    outcome.seconds.setup = start.elapsed().as_secs_f64();
    let engine = &device.engine;
    let backend = engine.device_info();

    let start = Instant::now();
    let result = engine.fisher(&mlp, &data, cfg.variant, form)?;
    outcome.seconds.compute = start.elapsed().as_secs_f64();

    if cfg.verify {
        let start = Instant::now();
        let reference = fisher_engine::reference::network::fisher(&mlp, &data, cfg.likelihood, cfg.variant, form)
            .context("computing the f64 reference")?;
        let verdict = Verdict::judge(result.agreement(&reference)?, Contract::Network);
        drop(reference);
        outcome.seconds.verify = start.elapsed().as_secs_f64();
        outcome.verification = Some(verdict.require(&backend)?);
    }

    let file = FisherFile::of_network(result, &mlp, samples, cfg.likelihood, cfg.variant, &backend);
    outcome.trace = Some(file.trace());
    outcome.tensors = file.tensor_shapes();

    let start = Instant::now();
    fisher_file::write(out, &file)?;
    outcome.seconds.write = start.elapsed().as_secs_f64();
    let size = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    outcome.out = Some((out.clone(), size));
    outcome.backend = Some(backend);
    outcome.adapter = device.adapter.map(|a| a.name);
    outcome.fallback = device.fallback;
    Ok(outcome)
}

// ---------------------------------------------------------------------------------------
// Reports

/// The readable summary of a `compute` run.
pub fn human(o: &Outcome) -> String {
    let mut lines = vec![format!(
        "{}: P = {} parameters, N = {} samples, {} likelihood",
        architecture_text(&o.widths, Some(&o.activations)),
        o.params,
        o.samples,
        o.likelihood.name()
    )];
    match &o.source {
        Source::Files { weights, inputs, labels } => {
            lines.push(format!("  model     {}", weights.display()));
            lines.push(format!("  data      {} · {}", inputs.display(), labels.display()));
        }
        Source::Synthetic { seed, .. } => {
            lines.push(format!("  model     synthetic, He-initialized (seed {seed}), layers at indices {:?}", o.layer_indices));
        }
    }
    if let Some(model) = &o.saved.model {
        lines.push(format!("  saved     model {}", model.display()));
    }
    if let Some((inputs, labels)) = &o.saved.data {
        lines.push(format!("  saved     data {} · {}", inputs.display(), labels.display()));
    }
    let s = &o.seconds;
    let Some(form) = o.form else {
        lines.push(format!("  seconds   generate {:.3} · save {:.3}", s.load, s.save));
        let weights = o.saved.model.as_ref().map_or("M.safetensors".to_string(), |p| p.display().to_string());
        let (inputs, labels) = o.saved.data.as_ref().map_or(("X.npy".to_string(), "y.npy".to_string()), |(x, y)| {
            (x.display().to_string(), y.display().to_string())
        });
        lines.push(format!(
            "Compute from the files with:\n  fisher compute --weights {weights} --activation '{}' --inputs {inputs} --labels {labels} \
             --likelihood {} --form diag --out F.safetensors",
            o.activation_text,
            o.likelihood.name()
        ));
        return lines.join("\n");
    };
    lines.push(format!("  variant   {}", o.variant.description(o.rows_per_sample)));
    lines.push(format!("  form      {}", form.description()));
    lines.push(format!("  backend   {}", o.backend.as_deref().unwrap_or("?")));
    if let Some(why) = &o.fallback {
        lines.push(format!("            ({why})"));
    }
    let trace_label = if form == NetForm::Kfac { "tr(G⊗A)" } else { "tr F" };
    lines.push(format!(
        "  result    {}   {trace_label} = {:.6e}",
        tensor_list(&o.tensors),
        o.trace.unwrap_or(f64::NAN)
    ));
    if let Some(v) = &o.verification {
        let a = &v.agreement;
        lines.push(format!(
            "  verified  ‖Δ‖/‖ref‖ {:.2e} · max|Δ|/max|ref| {:.2e} · max|Δ| {:.2e} against the f64 reference: {} (‖Δ‖/‖ref‖ ≤ {:.0e})",
            a.frobenius_rel,
            a.max_rel,
            a.max_abs,
            if v.passed { "PASS" } else { "FAIL" },
            v.bound
        ));
    }
    if let Some((path, size)) = &o.out {
        lines.push(format!("  wrote     {} ({})", path.display(), bytes(*size)));
    }
    lines.push(format!(
        "  seconds   load {:.3} · setup {:.3} · compute {:.3} · verify {:.3} · write {:.3}",
        s.load, s.setup, s.compute, s.verify, s.write
    ));
    lines.join("\n")
}

/// The one-line JSON summary of a `compute` run.
pub fn json_line(o: &Outcome) -> String {
    let mut value = json!({
        "parameters": o.params,
        "samples": o.samples,
        "layers": o.widths,
        "layer_indices": o.layer_indices,
        "activations": o.activations,
        "variant": o.variant.name(),
        "likelihood": o.likelihood.name(),
        "rows_per_sample": o.rows_per_sample,
        "form": o.form.map(NetForm::name),
        "backend": o.backend,
        "adapter": o.adapter,
        "trace": o.trace,
        "seconds": o.seconds,
        "out": o.out.as_ref().map(|(path, _)| path.display().to_string()),
        "tensors": o.tensors.iter().map(|(name, shape)| json!({"name": name, "shape": shape})).collect::<Vec<_>>(),
    });
    if let Variant::MonteCarlo { samples, seed } = o.variant {
        value["mc_samples"] = json!(samples);
        value["seed"] = json!(seed);
    }
    match &o.source {
        Source::Files { weights, inputs, labels } => {
            value["weights"] = json!(weights.display().to_string());
            value["inputs"] = json!(inputs.display().to_string());
            value["labels"] = json!(labels.display().to_string());
        }
        Source::Synthetic { seed, .. } => value["synthetic_seed"] = json!(seed),
    }
    if o.saved.model.is_some() || o.saved.data.is_some() {
        value["saved"] = json!({
            "model": o.saved.model.as_ref().map(|p| p.display().to_string()),
            "inputs": o.saved.data.as_ref().map(|(x, _)| x.display().to_string()),
            "labels": o.saved.data.as_ref().map(|(_, y)| y.display().to_string()),
        });
    }
    if let Some(v) = &o.verification {
        value["verification"] = json!(v);
    }
    value.to_string()
}
