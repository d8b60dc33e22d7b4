//! `fisher compute`: flags → [`ComputeConfig`] (every flag and flag combination checked) →
//! [`fisher_engine::pipeline::compute::run`] → the report.

use std::path::PathBuf;

use clap::Args;
use fisher_engine::fisher::{NetForm, Variant};
use fisher_engine::model::{architecture_text, ActivationSpec};
use fisher_engine::pipeline::compute::{self, ComputeOutcome, ComputeRequest};
use fisher_engine::pipeline::graph::{GraphOutcome, GraphRequest};
use fisher_engine::pipeline::{ResultTooLarge, RunError};
use serde_json::json;

use super::args::{FormArg, ModelArgs, OutputArgs, Report, Source};
use super::exit::{run_error, usage};
use super::format::{bytes, tensor_list};

/// Raw flags of `fisher compute`.
#[derive(Debug, Args)]
pub struct ComputeArgs {
    /// The activation after every Linear layer but the last: relu, tanh, sigmoid, gelu
    /// (exact, erf) or identity; or a JSON list with one per gap, e.g. '["tanh","relu"]',
    /// inline or in a .json file.
    /// Required with --weights and --synthetic-model; not with --model (the graph has them).
    #[arg(long, value_name = "NAME|JSON|FILE")]
    pub activation: Option<String>,

    /// With --model: only the parameters whose name matches this regular expression, e.g.
    /// '^fc\.' for the last layer (last-layer Laplace); the Fisher over that subset.
    #[arg(long, value_name = "REGEX")]
    pub params: Option<String>,

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

    /// Refuse, before computing, a result (full, layer, kfac, grads; with --verify also its
    /// f64 reference) larger than this many GiB of host memory.
    #[arg(long, value_name = "GIB", default_value_t = 2.0)]
    pub max_result_gib: f64,

    /// Output style.
    #[command(flatten)]
    pub output: OutputArgs,

    /// Write the synthetic model as a PyTorch state-dict safetensors file.
    #[arg(long, value_name = "M.safetensors")]
    pub save_model: Option<PathBuf>,

    /// Write the synthetic data to DIR/inputs.npy and DIR/labels.npy (DIR is created).
    #[arg(long, value_name = "DIR")]
    pub save_data: Option<PathBuf>,

    /// Replace existing output files (--out, --partial, --save-model, the files of
    /// --save-data); their permissions are kept.
    #[arg(long)]
    pub force: bool,

    /// Sum only shard i of n (0 ≤ i < n): a contiguous slice of whole blocks of samples;
    /// writes --partial instead of --out (see below).
    #[arg(long, value_name = "i/n", value_parser = parse_shard)]
    pub shard: Option<(usize, usize)>,

    /// The partial file of a --shard run: its exact sums, for `fisher merge`.
    #[arg(long, value_name = "PART.safetensors")]
    pub partial: Option<PathBuf>,

    /// Samples per block of the exact accumulation order (default 65536): shards are whole
    /// blocks, and a run over several blocks adds their sums exactly. Shards and the single
    /// run agree bit for bit (CPU) when they use the same value.
    #[arg(long, value_name = "B", value_parser = clap::value_parser!(u64).range(1..=u32::MAX as u64))]
    pub block_samples: Option<u64>,

    /// Under `mpirun -np K` (a fisher built with `--features mpi`): rank r sums shard r of
    /// K, rank 0 merges the parts exactly and writes --out (the single run's result).
    #[arg(long)]
    pub mpi: bool,
}

fn parse_shard(text: &str) -> Result<(usize, usize), String> {
    fisher_engine::io::partial::parse_shard(text)
}

/// A validated `fisher compute` invocation.
#[derive(Debug, Clone)]
pub struct ComputeConfig {
    /// What to compute and where to write it.
    pub request: ComputeRequest,
    /// The spelling of --activation, for the reproduction hint.
    pub activation_text: String,
    /// Output style.
    pub report: Report,
    /// With `--model`: the graph request, which replaces `request`.
    pub graph: Option<GraphRequest>,
    /// `--mpi`: one shard per MPI rank, merged on rank 0.
    pub mpi: bool,
}

impl ComputeConfig {
    /// Validates raw flags. Cross-flag rules are checked here, not (only) by clap, so that
    /// each refusal names the flag at fault.
    pub fn from_args(args: ComputeArgs) -> anyhow::Result<Self> {
        if let Some((model, inputs, labels)) = args.model.graph_source()? {
            return Self::graph(args, model, inputs, labels);
        }
        if args.params.is_some() {
            return Err(usage("--params applies to --model (ONNX) networks"));
        }
        let Some(activation_text) = args.activation.clone() else {
            return Err(usage("--activation is required with --weights and --synthetic-model"));
        };
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
        let activation = ActivationSpec::parse(&activation_text)
            .map_err(|e| anyhow::Error::new(e).context("bad --activation"))?;

        let saves = args.save_model.is_some() || args.save_data.is_some();
        let form = args.form.map(NetForm::from);
        if args.mpi {
            match form {
                None => return Err(usage("--mpi needs --form diag|kfac|layer|full and --out")),
                Some(f @ (NetForm::Grads | NetForm::Norms)) => {
                    return Err(usage(format!("--mpi sums over samples; --form {} is per sample", f.name())))
                }
                Some(_) => {}
            }
            for (given, flag) in [
                (args.shard.is_some(), "--shard"),
                (args.partial.is_some(), "--partial"),
                (args.verify, "--verify"),
                (saves, "--save-model/--save-data"),
            ] {
                if given {
                    return Err(usage(format!("{flag} does not apply to --mpi (every rank takes its own shard; rank 0 writes --out)")));
                }
            }
        }
        if args.partial.is_some() && args.shard.is_none() {
            return Err(usage("--partial needs --shard i/n"));
        }
        if args.shard.is_some() {
            match form {
                None => return Err(usage("--shard needs --form diag|kfac|layer|full")),
                Some(f @ (NetForm::Grads | NetForm::Norms)) => {
                    return Err(usage(format!("--shard sums over samples; --form {} is per sample", f.name())))
                }
                Some(_) => {}
            }
            if args.out.is_some() {
                return Err(usage("--shard writes --partial, not --out (`fisher merge PART... --out F.safetensors` writes the result)"));
            }
            if args.partial.is_none() {
                return Err(usage("--shard needs --partial PART.safetensors"));
            }
            if args.verify {
                return Err(usage("--verify needs every sample: it does not apply to --shard"));
            }
        }
        match (form, &args.out) {
            (Some(_), None) if args.shard.is_some() => {}
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
        let request = ComputeRequest {
            source,
            activation,
            likelihood,
            variant,
            form,
            backend,
            gpu,
            out: args.out,
            verify: args.verify,
            max_result_bytes: super::args::gib_to_bytes(args.max_result_gib),
            save_model: args.save_model,
            save_data: args.save_data,
            force: args.force,
            block_samples: args.block_samples.map(|b| b as usize),
            shard: args.shard,
            partial: args.partial,
        };
        Ok(ComputeConfig { request, activation_text, report: args.output.report(), graph: None, mpi: args.mpi })
    }

    fn graph(args: ComputeArgs, model: PathBuf, inputs: PathBuf, labels: PathBuf) -> anyhow::Result<Self> {
        for (given, flag) in [(args.shard.is_some(), "--shard"), (args.partial.is_some(), "--partial"), (args.block_samples.is_some(), "--block-samples"), (args.mpi, "--mpi")] {
            if given {
                return Err(usage(format!("{flag} applies to MLP networks (--weights or --synthetic-model); shards of --model graphs are not supported yet")));
            }
        }
        for (given, flag) in [
            (args.activation.is_some(), "--activation"),
            (args.save_model.is_some(), "--save-model"),
            (args.save_data.is_some(), "--save-data"),
        ] {
            if given {
                return Err(usage(format!("{flag} does not apply to --model (the ONNX graph holds the architecture)")));
            }
        }
        let Some(form) = args.form.map(NetForm::from) else {
            return Err(usage("--form full|diag|layer|kfac|grads|norms is required"));
        };
        let Some(out) = args.out.clone() else { return Err(usage("--out F.safetensors is required")) };
        let (backend, gpu) = args.model.backend()?;
        if !(args.max_result_gib.is_finite() && args.max_result_gib > 0.0) {
            return Err(usage(format!("--max-result-gib must be a positive number, not {}", args.max_result_gib)));
        }
        let graph = GraphRequest {
            model,
            inputs,
            labels,
            likelihood: args.model.likelihood(),
            variant: args.model.variant()?,
            form,
            params: args.params.clone(),
            backend,
            gpu: gpu.clone(),
            out,
            verify: args.verify,
            max_result_bytes: super::args::gib_to_bytes(args.max_result_gib),
            force: args.force,
        };
        // The MLP request is unused on this path; it keeps one config type for the command.
        let mut request = ComputeRequest::new(Source::Synthetic { widths: vec![1, 1], samples: 1, seed: 0 }, ActivationSpec::parse("identity")?, backend);
        request.gpu = gpu;
        Ok(ComputeConfig { request, activation_text: String::new(), report: args.output.report(), graph: Some(graph), mpi: false })
    }
}

/// Runs `fisher compute --model`.
pub fn run_graph(graph: &GraphRequest) -> anyhow::Result<GraphOutcome> {
    fisher_engine::pipeline::graph::run(graph).map_err(|e| match e {
        RunError::ResultTooLarge(e) => too_large(&e),
        e => run_error(e),
    })
}

/// The readable summary of a `compute --model` run.
pub fn human_graph(g: &GraphRequest, o: &GraphOutcome) -> String {
    let mut lines = vec![format!(
        "{}: {} operators, P = {} parameters ({} selected), N = {} samples, {} likelihood",
        g.model.display(),
        o.nodes,
        o.model_params,
        o.params,
        o.samples,
        g.likelihood.name()
    )];
    lines.push(format!("  data      {} · {}", g.inputs.display(), g.labels.display()));
    if g.params.is_some() {
        lines.push(format!("  params    {}", o.param_names.join(", ")));
    }
    lines.push(format!("  variant   {}", g.variant.description(o.rows_per_sample)));
    lines.push(format!("  form      {}", g.form.description()));
    lines.push(format!("  backend   {}", o.backend));
    lines.push(format!(
        "  batches   {} samples per micro-batch, {} of activations; model {}",
        o.stats.micro_batch,
        bytes(o.stats.activation_bytes),
        bytes(o.stats.shared_bytes)
    ));
    if let Some(why) = &o.fallback {
        lines.push(format!("            ({why})"));
    }
    let trace_label = if g.form == NetForm::Kfac { "Σ tr(G)·tr(A)" } else { "tr F" };
    lines.push(format!("  result    {}   {trace_label} = {:.6e}", tensor_list(&o.tensors), o.trace));
    if let Some(v) = &o.verification {
        let a = &v.agreement;
        lines.push(format!(
            "  verified  ‖Δ‖/‖ref‖ {:.2e} · max|Δ|/max|ref| {:.2e} against the f64 reference: {} (‖Δ‖/‖ref‖ ≤ {:.0e})",
            a.frobenius_rel,
            a.max_rel,
            if v.passed { "PASS" } else { "FAIL" },
            v.bound
        ));
    }
    lines.push(format!("  wrote     {} ({})", o.out.0.display(), bytes(o.out.1)));
    let s = &o.seconds;
    lines.push(format!("  seconds   load {:.3} · setup {:.3} · compute {:.3} · verify {:.3} · write {:.3}", s.load, s.setup, s.compute, s.verify, s.write));
    lines.join("\n")
}

/// The one-line JSON summary of a `compute --model` run.
pub fn json_graph(g: &GraphRequest, o: &GraphOutcome) -> String {
    let mut value = json!({
        "model": g.model.display().to_string(),
        "inputs": g.inputs.display().to_string(),
        "labels": g.labels.display().to_string(),
        "operators": o.nodes,
        "model_parameters": o.model_params,
        "parameters": o.params,
        "parameter_names": o.param_names,
        "samples": o.samples,
        "variant": g.variant.name(),
        "likelihood": g.likelihood.name(),
        "rows_per_sample": o.rows_per_sample,
        "form": g.form.name(),
        "backend": o.backend,
        "adapter": o.adapter,
        "trace": o.trace,
        "seconds": o.seconds,
        "micro_batch": o.stats.micro_batch,
        "activation_bytes": o.stats.activation_bytes,
        "model_bytes": o.stats.shared_bytes,
        "out": o.out.0.display().to_string(),
        "tensors": o.tensors.iter().map(|(name, shape)| json!({"name": name, "shape": shape})).collect::<Vec<_>>(),
    });
    if let Variant::MonteCarlo { samples, seed } = g.variant {
        value["mc_samples"] = json!(samples);
        value["seed"] = json!(seed);
    }
    if let Some(v) = &o.verification {
        value["verification"] = json!(v);
    }
    value.to_string()
}

/// The refusal of a result beyond `--max-result-gib` (exit 2), with what to do instead.
fn too_large(e: &ResultTooLarge) -> anyhow::Error {
    let hint = match e.form {
        NetForm::Grads if e.rows_per_sample > 1 => {
            "; --form norms gives the per-sample squared norms without materializing gradients, and \
             --variant empirical has R = 1 row per sample"
        }
        NetForm::Grads => "; --form norms gives the per-sample squared norms without materializing gradients",
        NetForm::Kfac => "; --form diag stays small for any model",
        _ => "; --form diag and --form kfac stay small for any model",
    };
    let size = |b: u128| bytes(u64::try_from(b).unwrap_or(u64::MAX));
    usage(format!(
        "--form {} holds {} values ({}{}) in host memory, beyond the --max-result-gib limit of {}{hint}",
        e.form.name(),
        e.what,
        size(e.needed),
        if e.with_reference { " with its f64 reference for --verify" } else { "" },
        size(e.limit),
    ))
}

/// Runs `fisher compute`.
pub fn run(cfg: &ComputeConfig) -> anyhow::Result<ComputeOutcome> {
    compute::run(&cfg.request).map_err(|e| match e {
        RunError::ResultTooLarge(e) => too_large(&e),
        e => run_error(e),
    })
}

// ---------------------------------------------------------------------------------------
// Reports

/// The readable summary of a `compute` run.
pub fn human(cfg: &ComputeConfig, o: &ComputeOutcome) -> String {
    let r = &cfg.request;
    let mut lines = vec![format!(
        "{}: P = {} parameters, N = {} samples, {} likelihood",
        architecture_text(&o.widths, Some(&o.activations)),
        o.params,
        o.samples,
        r.likelihood.name()
    )];
    match &r.source {
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
    let Some(form) = r.form else {
        lines.push(format!("  seconds   generate {:.3} · save {:.3}", s.load, s.save.unwrap_or(0.0)));
        let weights = o.saved.model.as_ref().map_or("M.safetensors".to_string(), |p| p.display().to_string());
        let (inputs, labels) = o.saved.data.as_ref().map_or(("X.npy".to_string(), "y.npy".to_string()), |(x, y)| {
            (x.display().to_string(), y.display().to_string())
        });
        lines.push(format!(
            "Compute from the files with:\n  fisher compute --weights {weights} --activation '{}' --inputs {inputs} --labels {labels} \
             --likelihood {} --form diag --out F.safetensors",
            cfg.activation_text,
            r.likelihood.name()
        ));
        return lines.join("\n");
    };
    lines.push(format!("  variant   {}", r.variant.description(o.rows_per_sample)));
    lines.push(format!("  form      {}", form.description()));
    lines.push(format!("  backend   {}", o.backend.as_deref().unwrap_or("?")));
    if let Some(why) = &o.fallback {
        lines.push(format!("            ({why})"));
    }
    if let Some(((i, n), range)) = &o.shard {
        lines.push(format!(
            "  shard     {i}/{n}: samples {}..{} ({} of {}), exact partial sums for `fisher merge`",
            range.start,
            range.end,
            range.len(),
            o.samples
        ));
    } else {
        let trace_label = if form == NetForm::Kfac { "tr(G⊗A)" } else { "tr F" };
        lines.push(format!(
            "  result    {}   {trace_label} = {:.6e}",
            tensor_list(&o.tensors),
            o.trace.unwrap_or(f64::NAN)
        ));
    }
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
pub fn json_line(cfg: &ComputeConfig, o: &ComputeOutcome) -> String {
    let r = &cfg.request;
    let mut value = json!({
        "parameters": o.params,
        "samples": o.samples,
        "layers": o.widths,
        "layer_indices": o.layer_indices,
        "activations": o.activations,
        "variant": r.variant.name(),
        "likelihood": r.likelihood.name(),
        "rows_per_sample": o.rows_per_sample,
        "form": r.form.map(NetForm::name),
        "backend": o.backend,
        "adapter": o.adapter,
        "trace": o.trace,
        "seconds": o.seconds,
        "out": o.out.as_ref().map(|(path, _)| path.display().to_string()),
        "tensors": o.tensors.iter().map(|(name, shape)| json!({"name": name, "shape": shape})).collect::<Vec<_>>(),
    });
    if let Variant::MonteCarlo { samples, seed } = r.variant {
        value["mc_samples"] = json!(samples);
        value["seed"] = json!(seed);
    }
    match &r.source {
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
    if let Some(((i, n), range)) = &o.shard {
        value["shard"] = json!({"index": i, "count": n, "start": range.start, "end": range.end});
        value["partial"] = value["out"].take();
    }
    if let Some(b) = r.block_samples {
        value["block_samples"] = json!(b);
    }
    value.to_string()
}
