//! `fisher bench`: the user-facing speed and memory check, without cargo or criterion.
//! Flags → [`BenchConfig`] (a [`BenchPlan`], every size checked before anything runs) →
//! [`fisher_engine::bench::run`] (workloads, flop model, measurement, shared with
//! `benches/kernels.rs`) → the table or one JSON line.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use clap::{Args, ValueEnum};
use fisher_engine::bench::{
    self, BenchOutcome, BenchPlan, Backends, GraphStage, Measurement, NetworkStage, Shape, FLOPS_NOTE, GRAPH_FLOPS_NOTE,
};
use fisher_engine::backend::gpu::GpuOptions;
use fisher_engine::fisher::{rows_per_sample, NetForm, Variant};
use fisher_engine::model::Activation;
use fisher_engine::{Form, MAX_GENERATED_VALUES};
use serde_json::{json, Value};

use super::args::{FormArg, LikelihoodArg, OutputArgs, Report, VariantArg, VariantArgs};
use super::exit::{run_error, usage};
use super::format::{columns, duration, gib, mib};

/// Default reductions: one shape that shows per-call overheads, one that shows throughput.
pub const DEFAULT_SHAPES: &str = "2048x512,4096x1024";
/// Default network: MNIST-sized input, one hidden layer.
pub const DEFAULT_NETWORK: &str = "784,256,10";
/// Default samples of the network stage.
pub const DEFAULT_SAMPLES: usize = 1024;

/// A reduction of per-sample gradients, as spelled in `--forms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReduceFormArg {
    /// F = GᵀG/N (P×P), 2·N·P² flops.
    Full,
    /// diag(F) (P), 2·N·P flops.
    Diag,
    /// K = GGᵀ/N (N×N), 2·N²·P flops.
    Gram,
    /// ‖gᵢ‖² (N), 2·N·P flops.
    Norms,
}

impl ReduceFormArg {
    /// The form.
    pub fn form(self) -> Form {
        match self {
            ReduceFormArg::Full => Form::Full,
            ReduceFormArg::Diag => Form::Diagonal,
            ReduceFormArg::Gram => Form::Gram,
            ReduceFormArg::Norms => Form::SampleNorms,
        }
    }

}

/// A backend to measure, as spelled in `--backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchBackendArg {
    /// A GPU adapter (exit 3 when there is none).
    Gpu,
    /// The multi-threaded f32 CPU path.
    Cpu,
}

/// Raw flags of `fisher bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Gradient matrices to reduce, N×P each, comma-separated (e.g. 4096x512,4096x2048);
    /// `none` skips the reductions.
    #[arg(long, value_name = "NxP,...|none", default_value = DEFAULT_SHAPES)]
    pub shapes: String,

    /// Reductions timed on every shape.
    #[arg(long, value_enum, value_name = "FORM,...", value_delimiter = ',', default_values = ["full", "diag", "gram", "norms"])]
    pub forms: Vec<ReduceFormArg>,

    /// Network widths (input, hidden..., classes ≥ 2), e.g. 784,512,512,10; `none` skips the
    /// network stage [default: 784,256,10; none with --model].
    #[arg(long, value_name = "WIDTHS|none")]
    pub network: Option<String>,

    /// Samples of the network stage's classification task [default: 1024; refused with
    /// --model, whose data sets N].
    #[arg(long, value_name = "N")]
    pub samples: Option<usize>,

    /// Network Fisher forms timed [default: diag,kfac; refused with --model, which times
    /// diag, kfac and fvp].
    #[arg(long, value_enum, value_name = "FORM,...", value_delimiter = ',')]
    pub net_forms: Vec<FormArg>,

    /// Also time the K largest eigenvalues of the network's implicit Fisher (Lanczos on F·v
    /// products, as `fisher report --form implicit --top K --only top`), workload
    /// `network/topK/<variant>/<widths>x<N>` [default: not timed].
    #[arg(long, value_name = "K")]
    pub top: Option<usize>,

    /// Relative residual at which --top accepts an eigenvalue (as scipy's `eigsh(tol=…)`).
    #[arg(long, value_name = "TOL", default_value_t = 1e-4, requires = "top")]
    pub top_tol: f64,

    /// Measure this ONNX network on --inputs and --labels instead of the synthetic MLP
    /// (implies --network none): diag, kfac (skipped with a note on grouped convolutions)
    /// and one implicit F·v product.
    #[arg(long, value_name = "M.onnx", requires_all = ["inputs", "labels"])]
    pub model: Option<PathBuf>,

    /// The --model network's inputs (.npy, any rank).
    #[arg(long, value_name = "X.npy", requires = "model")]
    pub inputs: Option<PathBuf>,

    /// The --model network's labels (.npy).
    #[arg(long, value_name = "y.npy", requires = "model")]
    pub labels: Option<PathBuf>,

    /// The likelihood the --model network's outputs define [default: categorical].
    #[arg(long, value_enum, requires = "model")]
    pub likelihood: Option<LikelihoodArg>,

    /// The network Fisher's variant.
    #[arg(long, value_enum, default_value_t = VariantArg::True)]
    pub variant: VariantArg,

    /// Labels drawn per input for --variant mc [default: 1].
    #[arg(long, value_name = "K")]
    pub mc_samples: Option<usize>,

    /// The synthetic network's hidden activation: relu, tanh, sigmoid, gelu or identity
    /// [default: tanh; refused with --model, whose activations are in the file].
    #[arg(long, value_name = "NAME")]
    pub activation: Option<String>,

    /// Backends to measure, comma-separated [default: gpu,cpu where a hardware GPU adapter exists, else cpu].
    #[arg(long, value_enum, value_name = "gpu,cpu", value_delimiter = ',')]
    pub backend: Vec<BenchBackendArg>,

    /// Use the GPU adapter whose name contains SUBSTR (case-insensitive; default: $FISHER_ADAPTER).
    #[arg(long, value_name = "SUBSTR")]
    pub adapter: Option<String>,

    /// Timed calls per (stage, shape, backend).
    #[arg(long, value_name = "K", default_value_t = 3)]
    pub repeat: usize,

    /// Untimed calls before them (kernel compilation, caches, clocks).
    #[arg(long, value_name = "K", default_value_t = 1)]
    pub warmup: usize,

    /// Seed of the gradients, the model, the task, MC label draws and the --model F·v direction.
    #[arg(long, value_name = "S", default_value_t = 0)]
    pub seed: u64,

    /// Refuse, before running anything, a result (full, gram; network full, layer, grads)
    /// larger than this many GiB of host memory.
    #[arg(long, value_name = "GIB", default_value_t = 2.0)]
    pub max_result_gib: f64,

    /// Output style.
    #[command(flatten)]
    pub output: OutputArgs,
}


/// A validated `fisher bench` invocation.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// What to measure.
    pub plan: BenchPlan,
    /// Output style.
    pub output: Report,
}

/// The items in their first order, without repeats.
fn dedup<T: PartialEq + Copy>(items: &[T]) -> Vec<T> {
    items.iter().enumerate().filter(|&(i, item)| !items[..i].contains(item)).map(|(_, &item)| item).collect()
}

/// Parses `NxP[,NxP...]` or `none`.
fn parse_shapes(text: &str) -> anyhow::Result<Vec<Shape>> {
    if text.trim().eq_ignore_ascii_case("none") {
        return Ok(Vec::new());
    }
    let mut shapes = Vec::new();
    for entry in text.split(',') {
        let bad = || {
            usage(format!(
                "bad --shapes entry '{entry}': expected NxP with positive integers (N samples, P parameters), \
                 e.g. 4096x512, or `none`"
            ))
        };
        let (n, p) = entry.trim().split_once(['x', 'X', '×']).ok_or_else(bad)?;
        let parse = |s: &str| s.trim().parse::<usize>().ok().filter(|&v| v > 0);
        let (Some(samples), Some(params)) = (parse(n), parse(p)) else { return Err(bad()) };
        let values = samples as u128 * params as u128;
        if values > MAX_GENERATED_VALUES {
            return Err(usage(format!(
                "--shapes {samples}x{params} would generate {values} values in memory (limit {MAX_GENERATED_VALUES})"
            )));
        }
        shapes.push(Shape { samples, params });
    }
    Ok(dedup(&shapes))
}

/// Parses `--network` widths or `none`.
fn parse_widths(text: &str) -> anyhow::Result<Option<Vec<usize>>> {
    if text.trim().eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    match super::args::parse_widths(text) {
        Some(w) if *w.last().expect("non-empty") >= 2 => Ok(Some(w)),
        _ => Err(usage(format!(
            "bad --network '{text}': expected comma-separated positive layer widths (input, hidden..., classes ≥ 2), \
             e.g. 784,256,10, or `none`"
        ))),
    }
}

impl BenchConfig {
    /// Validates raw flags; every size check happens here, before anything runs.
    pub fn from_args(args: BenchArgs) -> anyhow::Result<Self> {
        if args.repeat == 0 {
            return Err(usage("--repeat must be at least 1 (the number of timed calls)"));
        }
        if !(args.max_result_gib.is_finite() && args.max_result_gib > 0.0) {
            return Err(usage(format!("--max-result-gib must be a positive number, not {}", args.max_result_gib)));
        }
        let limit = (args.max_result_gib * (1u64 << 30) as f64) as u128;
        let shapes = parse_shapes(&args.shapes)?;
        let forms: Vec<Form> = dedup(&args.forms).into_iter().map(ReduceFormArg::form).collect();
        if !shapes.is_empty() && forms.is_empty() {
            return Err(usage("--forms needs at least one of full, diag, gram, norms"));
        }
        for (&shape, form) in shapes.iter().flat_map(|s| forms.iter().map(move |f| (s, f))) {
            match bench::reduce_result_values(form, shape) {
                Some((values, what)) if values.saturating_mul(4) > limit => {
                    return Err(usage(format!(
                        "--forms {form} on {}x{} holds {what} = {values} values ({}), beyond the --max-result-gib limit of {}",
                        shape.samples,
                        shape.params,
                        gib(values.saturating_mul(4), 2),
                        gib(limit, 2)
                    )))
                }
                _ => {}
            }
        }

        // --seed seeds everything here, the MC label draws included.
        let variant_args =
            VariantArgs { variant: Some(args.variant), mc_samples: args.mc_samples, likelihood: args.likelihood, ..Default::default() };
        let variant = match variant_args.variant("")? {
            Variant::MonteCarlo { samples, .. } => Variant::MonteCarlo { samples, seed: args.seed },
            v => v,
        };
        // --model replaces the synthetic MLP: its flags are refused rather than ignored.
        let graph = match (args.model, args.inputs, args.labels) {
            (Some(model), Some(inputs), Some(labels)) => {
                let synthetic = [
                    ("--network", args.network.as_deref().is_some_and(|w| !w.trim().eq_ignore_ascii_case("none"))),
                    ("--activation", args.activation.is_some()),
                    ("--samples", args.samples.is_some()),
                    ("--net-forms", !args.net_forms.is_empty()),
                    ("--top", args.top.is_some()),
                ];
                if let Some((flag, _)) = synthetic.iter().find(|(_, given)| *given) {
                    return Err(usage(format!(
                        "{flag} sets up the synthetic MLP network; with --model the network, its data and its forms \
                         (diag, kfac, fvp) come from --model, --inputs and --labels (--network none is implied)"
                    )));
                }
                Some(GraphStage { model, inputs, labels, likelihood: variant_args.likelihood(), variant })
            }
            // clap requires all three together.
            _ => None,
        };
        let activation = Activation::parse(args.activation.as_deref().unwrap_or("tanh"))
            .map_err(|e| anyhow::Error::new(e).context("bad --activation"))?;
        let network_text = match (&args.network, &graph) {
            (Some(text), _) => text.clone(),
            (None, Some(_)) => "none".to_string(),
            (None, None) => DEFAULT_NETWORK.to_string(),
        };
        let network = match parse_widths(&network_text)? {
            None => None,
            Some(widths) => {
                let samples = args.samples.unwrap_or(DEFAULT_SAMPLES);
                let inputs = samples as u128 * widths[0] as u128;
                if samples == 0 {
                    return Err(usage("--samples must be at least 1"));
                }
                if inputs > MAX_GENERATED_VALUES {
                    return Err(usage(format!(
                        "--samples {samples} × input width {} would generate {inputs} values in memory (limit {MAX_GENERATED_VALUES})",
                        widths[0]
                    )));
                }
                let net_forms = if args.net_forms.is_empty() { vec![FormArg::Diag, FormArg::Kfac] } else { args.net_forms };
                let forms: Vec<NetForm> = dedup(&net_forms).into_iter().map(NetForm::from).collect();
                // Sized from the widths alone, before any model is built.
                let params = bench::network_params(&widths);
                if params > MAX_GENERATED_VALUES {
                    return Err(usage(format!("--network {network_text} has {params} parameters (limit {MAX_GENERATED_VALUES})")));
                }
                let rows = rows_per_sample(variant, *widths.last().expect("≥ 2 widths"));
                for &form in &forms {
                    match bench::network_result_values(&widths, samples, rows, form) {
                        Some((values, what)) if values.saturating_mul(4) > limit => {
                            let hint = if form == NetForm::Kfac {
                                "diag and norms stay small for any model"
                            } else {
                                "diag, kfac and norms stay small for any model"
                            };
                            return Err(usage(format!(
                                "--net-forms {} holds {what} = {values} values ({}) for --network {}, beyond the \
                                 --max-result-gib limit of {}; {hint}",
                                form.name(),
                                gib(values.saturating_mul(4), 2),
                                network_text,
                                gib(limit, 2)
                            )))
                        }
                        _ => {}
                    }
                }
                let top = match args.top {
                    None => None,
                    Some(0) => return Err(usage("--top must be at least 1")),
                    Some(k) if k > bench::network_params(&widths) as usize => {
                        return Err(usage(format!("--top {k} is more eigenvalues than the network's parameters")))
                    }
                    Some(k) if !(args.top_tol.is_finite() && args.top_tol > 0.0 && args.top_tol < 1.0) => {
                        return Err(usage(format!("--top-tol must be in (0, 1), not {} (--top {k})", args.top_tol)))
                    }
                    Some(k) => Some(bench::TopStage { k, tol: args.top_tol }),
                };
                Some(NetworkStage { widths, samples, forms, variant, activation, top })
            }
        };
        if shapes.is_empty() && network.is_none() && graph.is_none() {
            return Err(usage("nothing to measure: --shapes none and --network none"));
        }

        let listed = dedup(&args.backend);
        let backends = match (listed.is_empty(), args.adapter.is_some()) {
            // A named adapter is a request for it, as in the other subcommands.
            (true, true) => Backends::Listed { gpu: true, cpu: true },
            (true, false) => Backends::Available,
            (false, _) => Backends::Listed {
                gpu: listed.contains(&BenchBackendArg::Gpu),
                cpu: listed.contains(&BenchBackendArg::Cpu),
            },
        };
        if args.adapter.is_some() && backends == (Backends::Listed { gpu: false, cpu: true }) {
            return Err(usage("--adapter chooses a GPU adapter; it cannot be combined with --backend cpu"));
        }
        if args.adapter.as_deref() == Some("") {
            return Err(usage("--adapter needs a non-empty part of an adapter name (see `fisher devices`)"));
        }
        let gpu = GpuOptions { adapter: args.adapter, ..Default::default() };
        let plan =
            BenchPlan { shapes, forms, network, graph, backends, gpu, repeat: args.repeat, warmup: args.warmup, seed: args.seed };
        Ok(BenchConfig { plan, output: args.output.report() })
    }
}

// ---------------------------------------------------------------------------------------
// Reports

/// [`FLOPS_NOTE`] as lines for the table.
const FLOPS_LINES: [&str; 5] = [
    "GFLOP/s = flops of one call / best time:",
    "  reduce   GEMM-equivalent: full 2·N·P², diag and norms 2·N·P, gram 2·N²·P",
    "  network  effective, of the explicit algorithm: 2·N·P forward + 2·N·R·P backward + reducing the N·R",
    "           gradient rows (full 2·N·R·P², layer 2·N·R·Σ P_l², diag and norms 2·N·R·P, grads 0, kfac Σ_l 2·N·ã_l² +",
    "           2·N·R·out_l²); diag, norms and kfac never form those rows, so their rate can exceed the GEMM rate",
];

/// [`GRAPH_FLOPS_NOTE`] as lines for the table.
const GRAPH_FLOPS_LINES: [&str; 4] = [
    "  graph    executed work of the lowered primitive program, 2 per multiply–add (per-row work × rows: shared 1,",
    "           per-sample N, per-draw N·R), plus the reduction: diag full reverse program + 2·N·R·P, kfac pruned",
    "           reverse program + Σ_sites 2·N·S·(ã² + R·out²), fvp forward mode + reverse with R = 1 + N·P;",
    "           transfers and host work are in the time, not in the flops",
];

fn gflops(g: f64) -> String {
    if g >= 100.0 {
        format!("{g:.0}")
    } else if g >= 1.0 {
        format!("{g:.1}")
    } else {
        format!("{g:.3}")
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// `reduce full`, `network diag`, `graph fvp`.
fn stage_name(m: &Measurement) -> String {
    format!("{} {}", m.kind, m.form)
}

/// `true`, `mc, K=2`.
fn variant_name(variant: Variant) -> String {
    match variant {
        Variant::MonteCarlo { samples, .. } => format!("mc, K={samples}"),
        v => v.name().to_string(),
    }
}

/// The readable report: machine, adapter, an aligned table, set-up and peak memory.
pub fn human(plan: &BenchPlan, o: &BenchOutcome) -> String {
    let mut lines = Vec::new();
    let m = &o.machine;
    let cpu = m.cpu.as_deref().unwrap_or("unknown CPU");
    lines.push(format!("machine: {cpu}, {} logical cores ({} CPU-path threads), {}/{}", m.cores, m.cpu_threads, m.os, m.arch));
    match (&o.adapter, &o.gpu_note) {
        (Some(a), _) => {
            let driver = if a.driver.is_empty() { String::new() } else { format!(", {}", a.driver) };
            lines.push(format!("adapter: {} [{}, {}{driver}]", a.name, a.api, a.device_type));
        }
        (None, Some(note)) => lines.push(format!("adapter: none; {note}")),
        (None, None) => lines.push("adapter: not run (--backend cpu)".into()),
    }
    lines.push(format!(
        "{} timed call{} after {} warm-up call{} each; times include transfers to and from the device",
        plan.repeat,
        plural(plan.repeat),
        plan.warmup,
        plural(plan.warmup),
    ));
    lines.push(String::new());

    let speedup = |m: &Measurement| m.gpu_speedup.map_or(String::new(), |r| format!("{r:.2}x"));
    let header = ["stage", "shape", "N", "P", "R", "backend", "best", "median", "GFLOP/s", "GPU speedup"];
    let mut rows = vec![header.map(String::from).to_vec()];
    rows.extend(o.results.iter().filter(|m| m.kind != "graph").map(|m| {
        vec![
            stage_name(m),
            m.shape.clone(),
            m.samples.to_string(),
            m.params.to_string(),
            m.rows_per_sample.map_or(String::new(), |r| r.to_string()),
            m.backend.to_string(),
            duration(m.timing.best()),
            duration(m.timing.median()),
            gflops(bench::gflops(m.flops, m.timing.best())),
            speedup(m),
        ]
    }));
    if rows.len() > 1 {
        // Text columns left-aligned, numbers right-aligned.
        lines.extend(columns(&rows, &[false, false, true, true, true, false, true, true, true, true]));
        lines.push(String::new());
    }
    if let (Some(stage), Some(g)) = (&plan.graph, &o.graph) {
        let header = ["stage", "N", "P", "R", "backend", "best", "median", "samples/s", "GFLOP/s", "micro-batch", "activations", "GPU speedup"];
        let mut rows = vec![header.map(String::from).to_vec()];
        rows.extend(o.results.iter().filter(|m| m.kind == "graph").map(|m| {
            vec![
                stage_name(m),
                m.samples.to_string(),
                m.params.to_string(),
                m.rows_per_sample.map_or(String::new(), |r| r.to_string()),
                m.backend.to_string(),
                duration(m.timing.best()),
                duration(m.timing.median()),
                m.samples_per_s().map_or(String::new(), |r| format!("{r:.0}")),
                gflops(bench::gflops(m.flops, m.timing.best())),
                m.micro_batch.map_or("-".into(), |b| b.to_string()),
                m.activation_bytes.map_or("-".into(), mib),
                speedup(m),
            ]
        }));
        lines.push(format!(
            "graph: {} on {} ({} samples, {} outputs), P = {} parameters, {} likelihood, variant {} (R = {} rows per sample; fvp R = 1)",
            stage.model.display(),
            stage.inputs.display(),
            g.samples,
            g.outputs,
            g.params,
            stage.likelihood.name(),
            variant_name(stage.variant),
            g.rows_per_sample,
        ));
        lines.extend(columns(&rows, &[false, true, true, true, false, true, true, true, true, true, true, true]));
        for (form, why) in &g.skipped {
            lines.push(format!("{} skipped: {why}", form.name()));
        }
        lines.push("micro-batch and activations: how diag and kfac split the samples (fvp does not report its split)".into());
        lines.push(String::new());
    }

    if let Some(net) = &plan.network {
        let variant = variant_name(net.variant);
        lines.push(format!(
            "network: PyTorch-initialized {} MLP, seeded classification task, variant {variant} (R gradient rows per sample)",
            net.activation.name(),
        ));
    }
    lines.extend(FLOPS_LINES.iter().map(|l| l.to_string()));
    if plan.graph.is_some() {
        lines.extend(GRAPH_FLOPS_LINES.iter().map(|l| l.to_string()));
    }
    lines.push("GPU speedup = CPU best time / GPU best time, measured back to back in this run (> 1: the GPU is faster)".into());
    let setup = o.setup.iter().map(|(b, t)| format!("{b} {}", duration(*t))).collect::<Vec<_>>().join(", ");
    let load = o.graph.as_ref().map_or(String::new(), |g| format!("; reading the model and data {}", duration(g.load)));
    lines.push(format!("untimed: backend set-up {setup}; data generation {}{load}", duration(o.generate)));
    match o.peak_rss {
        Some(b) => lines.push(format!("peak memory: {} resident (VmHWM of this process, all stages)", mib(b))),
        None => lines.push("peak memory: not reported on this OS".into()),
    }
    lines.join("\n")
}

fn measurement_json(m: &Measurement) -> Value {
    let (best, median) = (m.timing.best(), m.timing.median());
    json!({
        "workload": m.workload,
        "stage": stage_name(m),
        "kind": m.kind,
        "form": m.form,
        "shape": m.shape,
        "samples": m.samples,
        "params": m.params,
        "rows_per_sample": m.rows_per_sample,
        "backend": m.backend,
        "times_s": m.timing.0,
        "best_s": best,
        "median_s": median,
        "flop": m.flops,
        "gflops_best": bench::gflops(m.flops, best),
        "gflops_median": bench::gflops(m.flops, median),
        "gpu_speedup": m.gpu_speedup,
        "samples_per_s": m.samples_per_s(),
        "micro_batch": m.micro_batch,
        "activation_bytes": m.activation_bytes,
    })
}

/// One JSON line: machine, adapter, the results and peak memory.
pub fn json_line(plan: &BenchPlan, o: &BenchOutcome) -> String {
    let network = plan.network.as_ref().map(|net| {
        json!({
            "variant": net.variant.name(),
            "mc_samples": match net.variant { Variant::MonteCarlo { samples, .. } => Some(samples), _ => None },
            "activation": net.activation.name(),
        })
    });
    let graph = plan.graph.as_ref().zip(o.graph.as_ref()).map(|(stage, g)| {
        json!({
            "model": stage.model.display().to_string(),
            "inputs": stage.inputs.display().to_string(),
            "labels": stage.labels.display().to_string(),
            "likelihood": stage.likelihood.name(),
            "variant": stage.variant.name(),
            "mc_samples": match stage.variant { Variant::MonteCarlo { samples, .. } => Some(samples), _ => None },
            "samples": g.samples,
            "params": g.params,
            "outputs": g.outputs,
            "rows_per_sample": g.rows_per_sample,
            "shared_bytes": g.shared_bytes,
            "forms": bench::GraphForm::ALL
                .iter()
                .filter(|f| !g.skipped.iter().any(|(s, _)| s == *f))
                .map(|f| f.name())
                .collect::<Vec<_>>(),
            "skipped": g.skipped.iter().map(|(f, why)| json!({"form": f.name(), "why": why})).collect::<Vec<_>>(),
            "load_s": g.load,
            "flops": GRAPH_FLOPS_NOTE,
        })
    });
    json!({
        "machine": o.machine,
        "adapter": o.adapter,
        "gpu_note": o.gpu_note,
        "repeat": plan.repeat,
        "warmup": plan.warmup,
        "network": network,
        "graph": graph,
        "flops": FLOPS_NOTE,
        "setup_s": o.setup.iter().map(|(b, t)| (b.to_string(), json!(t))).collect::<serde_json::Map<_, _>>(),
        "generate_s": o.generate,
        "results": o.results.iter().map(measurement_json).collect::<Vec<_>>(),
        "peak_rss_bytes": o.peak_rss,
    })
    .to_string()
}

/// Runs `fisher bench` and prints its report; a status line on a terminal while it runs.
pub fn main(cfg: &BenchConfig) -> anyhow::Result<()> {
    let terminal = cfg.output == Report::Human && std::io::stderr().is_terminal();
    let progress = |what: &str| {
        if terminal {
            eprint!("\r\x1b[2K{what} …");
            let _ = std::io::stderr().flush();
        }
    };
    let outcome = bench::run(&cfg.plan, progress);
    if terminal {
        eprint!("\r\x1b[2K");
    }
    let outcome = outcome.map_err(run_error)?;
    match cfg.output {
        Report::Human => println!("{}", human(&cfg.plan, &outcome)),
        Report::Json => println!("{}", json_line(&cfg.plan, &outcome)),
        Report::Quiet => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        assert_eq!(parse_shapes("64x32, 8X4").unwrap(), vec![Shape { samples: 64, params: 32 }, Shape { samples: 8, params: 4 }]);
        assert!(parse_shapes("none").unwrap().is_empty());
        for bad in ["64y32", "64x", "x32", "0x4", "4x0", "64x32x2", "", "64x32,", "-1x4", "100000x100000"] {
            assert!(parse_shapes(bad).is_err(), "{bad}");
        }
        assert_eq!(dedup(&[3, 1, 3, 2, 1]), [3, 1, 2]);
    }

    #[test]
    fn widths() {
        assert_eq!(parse_widths("784,256,10").unwrap(), Some(vec![784, 256, 10]));
        assert_eq!(parse_widths("none").unwrap(), None);
        for bad in ["784", "784,0,10", "784,256,1", "a,b", ""] {
            assert!(parse_widths(bad).is_err(), "{bad}");
        }
    }
}
