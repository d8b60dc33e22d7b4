//! `fisher bench`: the user-facing speed and memory check, without cargo or criterion.
//!
//! Every timed call goes through the library exactly as a user's program would
//! ([`Engine::fisher_from_grads`] on [`synthetic::gradient_like`] data, [`Engine::fisher`] on
//! a [`train::init_mlp`] model and a [`train::classification_task`] data set). Setting up
//! (adapter, device, kernels) and generating the data happen outside the timer; each timed
//! call includes the transfers to and from the device and waits for the result. Every
//! (stage, shape) runs on every backend back to back, so the GPU/CPU ratio compares runs
//! made under the same conditions.

use std::io::{IsTerminal, Write};
use std::time::Instant;

use anyhow::Context;
use clap::{Args, ValueEnum};
use fisher_engine::backend::gpu::GpuOptions;
use fisher_engine::device::{self, AdapterInfo, DeviceRequest};
use fisher_engine::model::{Activation, Mlp};
use fisher_engine::fisher::{rows_per_sample, NetForm, Variant};
use fisher_engine::model::train;
use fisher_engine::{synthetic, Backend, Engine, Form, MAX_GENERATED_VALUES};
use serde_json::{json, Value};

use super::args::{FormArg, VariantArg};
use super::exit::usage;
use super::format::{duration, gib, mib};

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
    fn form(self) -> Form {
        match self {
            ReduceFormArg::Full => Form::Full,
            ReduceFormArg::Diag => Form::Diagonal,
            ReduceFormArg::Gram => Form::Gram,
            ReduceFormArg::Norms => Form::SampleNorms,
        }
    }

    fn name(self) -> &'static str {
        match self {
            ReduceFormArg::Full => "full",
            ReduceFormArg::Diag => "diag",
            ReduceFormArg::Gram => "gram",
            ReduceFormArg::Norms => "norms",
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
    /// network stage.
    #[arg(long, value_name = "WIDTHS|none", default_value = DEFAULT_NETWORK)]
    pub network: String,

    /// Samples of the network stage's classification task.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_SAMPLES)]
    pub samples: usize,

    /// Network Fisher forms timed.
    #[arg(long, value_enum, value_name = "FORM,...", value_delimiter = ',', default_values = ["diag", "kfac"])]
    pub net_forms: Vec<FormArg>,

    /// The network Fisher's variant.
    #[arg(long, value_enum, default_value_t = VariantArg::True)]
    pub variant: VariantArg,

    /// Labels drawn per input for --variant mc [default: 1].
    #[arg(long, value_name = "K")]
    pub mc_samples: Option<usize>,

    /// The network's hidden activation: relu, tanh, sigmoid, gelu or identity.
    #[arg(long, value_name = "NAME", default_value = "tanh")]
    pub activation: String,

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

    /// Seed of the gradients, the model, the task and MC label draws.
    #[arg(long, value_name = "S", default_value_t = 0)]
    pub seed: u64,

    /// Refuse, before running anything, a result (full, gram; network full, layer, grads)
    /// larger than this many GiB of host memory.
    #[arg(long, value_name = "GIB", default_value_t = 2.0)]
    pub max_result_gib: f64,

    /// Print one JSON line instead of the table.
    #[arg(long)]
    pub json: bool,

    /// Print nothing on success (errors are still reported).
    #[arg(long, conflicts_with = "json")]
    pub quiet: bool,
}

/// One reduction shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// N.
    pub samples: usize,
    /// P.
    pub params: usize,
}

/// The network stage's set-up.
#[derive(Debug, Clone)]
pub struct NetworkStage {
    /// Layer widths.
    pub widths: Vec<usize>,
    /// Samples.
    pub samples: usize,
    /// Forms to time.
    pub forms: Vec<NetForm>,
    /// Variant.
    pub variant: Variant,
    /// Hidden activation.
    pub activation: Activation,
}

/// Which backends to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backends {
    /// GPU where an adapter exists (skipped with a note otherwise), and the CPU.
    Available,
    /// The listed ones; a missing GPU adapter is an error (exit 3).
    Listed {
        /// Run the GPU.
        gpu: bool,
        /// Run the CPU.
        cpu: bool,
    },
}

/// What to print on success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// The table.
    Human,
    /// One JSON line.
    Json,
    /// Nothing.
    Quiet,
}

/// A validated `fisher bench` invocation.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Reduction shapes.
    pub shapes: Vec<Shape>,
    /// Reductions.
    pub forms: Vec<ReduceFormArg>,
    /// The network stage, unless `--network none`.
    pub network: Option<NetworkStage>,
    /// Backends.
    pub backends: Backends,
    /// Adapter choice.
    pub gpu: GpuOptions,
    /// Timed calls.
    pub repeat: usize,
    /// Untimed calls.
    pub warmup: usize,
    /// Seed.
    pub seed: u64,
    /// Output.
    pub output: Output,
}

fn dedup<T: PartialEq + Copy>(items: &[T]) -> Vec<T> {
    let mut out = Vec::new();
    for &item in items {
        if !out.contains(&item) {
            out.push(item);
        }
    }
    out
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
        if samples as u128 * params as u128 > MAX_GENERATED_VALUES {
            return Err(usage(format!(
                "--shapes {samples}x{params} would generate {} values in memory (limit {MAX_GENERATED_VALUES})",
                samples as u128 * params as u128
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
        let max_result_bytes = (args.max_result_gib * (1u64 << 30) as f64) as u128;
        let shapes = parse_shapes(&args.shapes)?;
        let forms = dedup(&args.forms);
        if !shapes.is_empty() && forms.is_empty() {
            return Err(usage("--forms needs at least one of full, diag, gram, norms"));
        }
        for shape in &shapes {
            for form in &forms {
                let (values, what) = match form {
                    ReduceFormArg::Full => (shape.params as u128 * shape.params as u128, "P×P"),
                    ReduceFormArg::Gram => (shape.samples as u128 * shape.samples as u128, "N×N"),
                    ReduceFormArg::Diag | ReduceFormArg::Norms => continue,
                };
                if values * 4 > max_result_bytes {
                    return Err(usage(format!(
                        "--forms {} on {}x{} holds {what} = {values} values ({}), beyond the --max-result-gib limit of {}",
                        form.name(),
                        shape.samples,
                        shape.params,
                        gib(values * 4, 2),
                        gib(max_result_bytes, 2)
                    )));
                }
            }
        }

        if args.mc_samples == Some(0) {
            return Err(usage("--mc-samples must be at least 1"));
        }
        if args.mc_samples.is_some() && args.variant != VariantArg::Mc {
            return Err(usage("--mc-samples only applies to --variant mc"));
        }
        let variant = match args.variant {
            VariantArg::Empirical => Variant::Empirical,
            VariantArg::True => Variant::True,
            VariantArg::Mc => Variant::MonteCarlo { samples: args.mc_samples.unwrap_or(1), seed: args.seed },
        };
        let activation =
            Activation::parse(&args.activation).map_err(|e| anyhow::Error::new(e).context("bad --activation"))?;
        let network = match parse_widths(&args.network)? {
            None => None,
            Some(widths) => {
                if args.samples == 0 {
                    return Err(usage("--samples must be at least 1"));
                }
                if args.samples as u128 * widths[0] as u128 > MAX_GENERATED_VALUES {
                    return Err(usage(format!(
                        "--samples {} × input width {} would generate {} values in memory (limit {MAX_GENERATED_VALUES})",
                        args.samples,
                        widths[0],
                        args.samples as u128 * widths[0] as u128
                    )));
                }
                let net_forms: Vec<NetForm> = dedup(&args.net_forms).into_iter().map(NetForm::from).collect();
                if net_forms.is_empty() {
                    return Err(usage("--net-forms needs at least one of full, diag, layer, kfac, grads, norms"));
                }
                // Sized from the widths alone, before any model is built.
                let layers: Vec<(u128, u128)> = widths.windows(2).map(|w| (w[0] as u128, w[1] as u128)).collect();
                let params: u128 = layers.iter().map(|&(i, o)| (i + 1) * o).sum();
                if params > MAX_GENERATED_VALUES {
                    return Err(usage(format!(
                        "--network {} has {params} parameters (limit {MAX_GENERATED_VALUES})",
                        args.network
                    )));
                }
                let rows = rows_per_sample(variant, *widths.last().expect("≥ 2 widths")) as u128;
                for &form in &net_forms {
                    let (values, what) = match form {
                        NetForm::Full => (params * params, "P×P"),
                        NetForm::Layer => (layers.iter().map(|&(i, o)| ((i + 1) * o).pow(2)).sum(), "Σ_l P_l²"),
                        NetForm::Grads => (args.samples as u128 * rows * params, "N·R×P"),
                        NetForm::Diagonal | NetForm::Kfac | NetForm::Norms => continue,
                    };
                    if values * 4 > max_result_bytes {
                        return Err(usage(format!(
                            "--net-forms {} holds {what} = {values} values ({}) for --network {}, beyond the \
                             --max-result-gib limit of {}; diag, kfac and norms stay small for any model",
                            form.name(),
                            gib(values * 4, 2),
                            args.network,
                            gib(max_result_bytes, 2)
                        )));
                    }
                }
                Some(NetworkStage { widths, samples: args.samples, forms: net_forms, variant, activation })
            }
        };
        if shapes.is_empty() && network.is_none() {
            return Err(usage("nothing to measure: --shapes none and --network none"));
        }

        let backends = if args.backend.is_empty() {
            if args.adapter.is_some() {
                // A named adapter is a request for it, as in the other subcommands.
                Backends::Listed { gpu: true, cpu: true }
            } else {
                Backends::Available
            }
        } else {
            let listed = dedup(&args.backend);
            Backends::Listed {
                gpu: listed.contains(&BenchBackendArg::Gpu),
                cpu: listed.contains(&BenchBackendArg::Cpu),
            }
        };
        if args.adapter.is_some() && backends == (Backends::Listed { gpu: false, cpu: true }) {
            return Err(usage("--adapter chooses a GPU adapter; it cannot be combined with --backend cpu"));
        }
        if args.adapter.as_deref() == Some("") {
            return Err(usage("--adapter needs a non-empty part of an adapter name (see `fisher devices`)"));
        }
        let output = if args.json {
            Output::Json
        } else if args.quiet {
            Output::Quiet
        } else {
            Output::Human
        };
        Ok(BenchConfig {
            shapes,
            forms,
            network,
            backends,
            gpu: GpuOptions { adapter: args.adapter, ..Default::default() },
            repeat: args.repeat,
            warmup: args.warmup,
            seed: args.seed,
            output,
        })
    }
}

// ---------------------------------------------------------------------------------------
// Flop counts

/// GEMM-equivalent flops of a reduction of an N×P gradient matrix.
pub fn reduce_flops(form: ReduceFormArg, n: usize, p: usize) -> f64 {
    let (n, p) = (n as f64, p as f64);
    match form {
        ReduceFormArg::Full => 2.0 * n * p * p,
        ReduceFormArg::Diag | ReduceFormArg::Norms => 2.0 * n * p,
        ReduceFormArg::Gram => 2.0 * n * n * p,
    }
}

/// Nominal flops of a network Fisher: the forward pass (2·N·P), forming the N·R gradient
/// rows by backpropagation (2·N·R·P), and reducing those rows to the form as a GEMM would
/// (full 2·N·R·P², layer 2·N·R·Σ P_l², diag and norms 2·N·R·P, grads nothing, kfac
/// Σ_l 2·N·ã_l² + 2·N·R·out_l² with ã_l the augmented input width).
pub fn network_flops(mlp: &Mlp, samples: usize, rows: usize, form: NetForm) -> f64 {
    let (n, r, p) = (samples as f64, rows as f64, mlp.num_params() as f64);
    let reduction = match form {
        NetForm::Full => 2.0 * n * r * p * p,
        NetForm::Layer => mlp.layers.iter().map(|l| 2.0 * n * r * (l.num_params() as f64).powi(2)).sum(),
        NetForm::Diagonal | NetForm::Norms => 2.0 * n * r * p,
        NetForm::Grads => 0.0,
        NetForm::Kfac => mlp
            .layers
            .iter()
            .map(|l| 2.0 * n * (l.augmented_in() as f64).powi(2) + 2.0 * n * r * (l.fan_out() as f64).powi(2))
            .sum(),
    };
    2.0 * n * p + 2.0 * n * r * p + reduction
}

// ---------------------------------------------------------------------------------------
// Running

/// The machine the run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Machine {
    /// CPU model (`model name` in /proc/cpuinfo), when known.
    pub cpu: Option<String>,
    /// Logical CPUs available to the process.
    pub cores: usize,
    /// Threads of the CPU path's pool.
    pub cpu_threads: usize,
    /// Operating system.
    pub os: &'static str,
    /// Architecture.
    pub arch: &'static str,
}

fn machine() -> Machine {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|text| {
        text.lines()
            .find(|l| l.starts_with("model name") || l.starts_with("Model") || l.starts_with("Hardware"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .filter(|v| !v.is_empty())
    });
    Machine {
        cpu,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu_threads: rayon::current_num_threads(),
        os: std::env::consts::OS,
        arch: std::env::consts::ARCH,
    }
}

/// Peak resident set size of this process in bytes (Linux: VmHWM), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let mut words = line.split_whitespace().skip(1);
    let value: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") | None => Some(value * 1024),
        _ => None,
    }
}

/// One measured (stage, shape, backend).
#[derive(Debug, Clone)]
pub struct Measurement {
    /// `reduce` or `network`.
    pub kind: &'static str,
    /// The form's name.
    pub form: &'static str,
    /// `NxP` for reductions, `a-b-c` widths for networks.
    pub shape: String,
    /// N.
    pub samples: usize,
    /// P.
    pub params: usize,
    /// Gradient rows per sample (networks only).
    pub rows_per_sample: Option<usize>,
    /// `gpu` or `cpu`.
    pub backend: &'static str,
    /// Seconds of each timed call.
    pub times: Vec<f64>,
    /// GEMM-equivalent (reductions) or nominal (networks) flops of one call.
    pub flops: f64,
    /// CPU best / GPU best for the same stage and shape (on the GPU row).
    pub gpu_speedup: Option<f64>,
}

impl Measurement {
    /// The fastest call.
    pub fn best(&self) -> f64 {
        self.times.iter().copied().fold(f64::INFINITY, f64::min)
    }

    /// The median call (the mean of the middle two for an even count).
    pub fn median(&self) -> f64 {
        let mut t = self.times.clone();
        t.sort_by(f64::total_cmp);
        let m = t.len() / 2;
        if t.len() % 2 == 1 {
            t[m]
        } else {
            (t[m - 1] + t[m]) / 2.0
        }
    }

    fn stage(&self) -> String {
        format!("{} {}", self.kind, self.form)
    }

    fn gflops(&self, seconds: f64) -> f64 {
        self.flops / seconds / 1e9
    }

    fn to_json(&self) -> Value {
        json!({
            "stage": self.stage(),
            "kind": self.kind,
            "form": self.form,
            "shape": self.shape,
            "samples": self.samples,
            "params": self.params,
            "rows_per_sample": self.rows_per_sample,
            "backend": self.backend,
            "times_s": self.times,
            "best_s": self.best(),
            "median_s": self.median(),
            "flop": self.flops,
            "gflops_best": self.gflops(self.best()),
            "gflops_median": self.gflops(self.median()),
            "gpu_speedup": self.gpu_speedup,
        })
    }
}

/// What a `bench` run measured.
#[derive(Debug)]
pub struct Outcome {
    /// The machine.
    pub machine: Machine,
    /// The GPU adapter, when one ran.
    pub adapter: Option<AdapterInfo>,
    /// Why the GPU did not run although it was not excluded.
    pub gpu_note: Option<String>,
    /// Seconds to set up each backend (adapter, device, kernels), untimed in the results.
    pub setup: Vec<(&'static str, f64)>,
    /// Seconds spent generating data (untimed in the results).
    pub generate: f64,
    /// Timed calls and untimed warm-up calls per measurement.
    pub repeat: usize,
    /// Untimed warm-up calls.
    pub warmup: usize,
    /// The network stage's variant and activation, when it ran.
    pub network: Option<(Variant, Activation)>,
    /// The measurements, in run order.
    pub results: Vec<Measurement>,
    /// Peak RSS at the end (bytes), where the OS reports it.
    pub peak_rss: Option<u64>,
}

struct Runner {
    name: &'static str,
    engine: Engine,
}

/// The engines to measure, with what the report says about them.
struct Opened {
    runners: Vec<Runner>,
    adapter: Option<AdapterInfo>,
    gpu_note: Option<String>,
    setup: Vec<(&'static str, f64)>,
}

fn open_backends(cfg: &BenchConfig) -> anyhow::Result<Opened> {
    // Both listed: the GPU is required (Backend::Gpu, software accepted); by default it runs
    // where Auto would run it (a hardware GPU), and the CPU path always runs.
    let (gpu_request, want_cpu) = match cfg.backends {
        Backends::Available => (Some(Backend::Auto), true),
        Backends::Listed { gpu, cpu } => (gpu.then_some(Backend::Gpu), cpu),
    };
    let mut runners = Vec::new();
    let mut setup = Vec::new();
    let mut adapter = None;
    let mut note = None;
    if let Some(backend) = gpu_request {
        let start = Instant::now();
        let opened = device::open(&DeviceRequest::from_env(backend, cfg.gpu.clone())?)?;
        if opened.engine.is_gpu() {
            adapter = opened.adapter;
            setup.push(("gpu", start.elapsed().as_secs_f64()));
            runners.push(Runner { name: "gpu", engine: opened.engine });
        } else {
            let why = opened.fallback.unwrap_or(opened.reason);
            log::warn!("{why}; benchmarking the CPU path only");
            note = Some(format!("{why}: only the CPU path ran"));
        }
    }
    if want_cpu {
        let start = Instant::now();
        let engine = Engine::cpu();
        setup.push(("cpu", start.elapsed().as_secs_f64()));
        runners.push(Runner { name: "cpu", engine });
    }
    Ok(Opened { runners, adapter, gpu_note: note, setup })
}

/// Runs `call` `warmup` times untimed, then `repeat` times timed.
fn measure<T>(warmup: usize, repeat: usize, mut call: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<Vec<f64>> {
    for _ in 0..warmup {
        drop(call()?);
    }
    let mut times = Vec::with_capacity(repeat);
    for _ in 0..repeat {
        let start = Instant::now();
        let result = call()?;
        times.push(start.elapsed().as_secs_f64());
        drop(result);
    }
    Ok(times)
}

/// Runs the benchmark. `progress` receives a short status before each measurement.
pub fn run(cfg: &BenchConfig, mut progress: impl FnMut(&str)) -> anyhow::Result<Outcome> {
    let machine = machine();
    progress("setting up the backends");
    let Opened { runners, adapter, gpu_note, setup } = open_backends(cfg)?;
    let total = runners.len()
        * (cfg.shapes.len() * cfg.forms.len() + cfg.network.as_ref().map_or(0, |n| n.forms.len()));
    let mut done = 0;
    let mut generate = 0.0;
    let mut results = Vec::new();

    for (s, shape) in cfg.shapes.iter().enumerate() {
        let Shape { samples: n, params: p } = *shape;
        progress(&format!("generating {n}x{p} gradients"));
        let start = Instant::now();
        let g = synthetic::gradient_like(n, p, cfg.seed.wrapping_add(s as u64));
        generate += start.elapsed().as_secs_f64();
        for &form_arg in &cfg.forms {
            let form = form_arg.form();
            for runner in &runners {
                done += 1;
                progress(&format!("[{done}/{total}] reduce {} {n}x{p} on {}", form_arg.name(), runner.name));
                let times = measure(cfg.warmup, cfg.repeat, || {
                    runner.engine.fisher_from_grads(g.view(), &form).with_context(|| {
                        format!("reduce {} {n}x{p} on {}", form_arg.name(), runner.engine.device_info())
                    })
                })?;
                results.push(Measurement {
                    kind: "reduce",
                    form: form_arg.name(),
                    shape: format!("{n}x{p}"),
                    samples: n,
                    params: p,
                    rows_per_sample: None,
                    backend: runner.name,
                    times,
                    flops: reduce_flops(form_arg, n, p),
                    gpu_speedup: None,
                });
            }
        }
    }

    if let Some(net) = &cfg.network {
        let classes = *net.widths.last().expect("≥ 2 widths");
        let shape = net.widths.iter().map(usize::to_string).collect::<Vec<_>>().join("-");
        progress(&format!("building the {shape} model and {} samples", net.samples));
        let start = Instant::now();
        let mlp = train::init_mlp(&net.widths, net.activation, true, cfg.seed).context("building the model")?;
        let data = train::classification_task(net.samples, net.widths[0], classes, cfg.seed ^ 0x7A5C)
            .context("building the classification task")?;
        generate += start.elapsed().as_secs_f64();
        let rows = rows_per_sample(net.variant, classes);
        for &form in &net.forms {
            for runner in &runners {
                done += 1;
                progress(&format!("[{done}/{total}] network {} {shape} on {}", form.name(), runner.name));
                let times = measure(cfg.warmup, cfg.repeat, || {
                    runner.engine.fisher(&mlp, &data, net.variant, form).with_context(|| {
                        format!("network {} {shape} on {}", form.name(), runner.engine.device_info())
                    })
                })?;
                results.push(Measurement {
                    kind: "network",
                    form: form.name(),
                    shape: shape.clone(),
                    samples: net.samples,
                    params: mlp.num_params(),
                    rows_per_sample: Some(rows),
                    backend: runner.name,
                    times,
                    flops: network_flops(&mlp, net.samples, rows, form),
                    gpu_speedup: None,
                });
            }
        }
    }

    // The ratio of runs made back to back in this process.
    let pairs: Vec<(usize, f64)> = results
        .iter()
        .enumerate()
        .filter(|(_, m)| m.backend == "gpu")
        .filter_map(|(i, gpu)| {
            results
                .iter()
                .find(|c| c.backend == "cpu" && c.kind == gpu.kind && c.form == gpu.form && c.shape == gpu.shape)
                .map(|cpu| (i, cpu.best() / gpu.best()))
        })
        .collect();
    for (i, ratio) in pairs {
        results[i].gpu_speedup = Some(ratio);
    }

    Ok(Outcome {
        machine,
        adapter,
        gpu_note,
        setup,
        generate,
        repeat: cfg.repeat,
        warmup: cfg.warmup,
        network: cfg.network.as_ref().map(|n| (n.variant, n.activation)),
        results,
        peak_rss: peak_rss_bytes(),
    })
}

// ---------------------------------------------------------------------------------------
// Reports

/// How the flop counts are defined (in the JSON; the table prints [`FLOPS_LINES`]).
pub const FLOPS_NOTE: &str = "GFLOP/s = flops of one call / time. reduce: GEMM-equivalent flops (full 2·N·P², diag \
     and norms 2·N·P, gram 2·N²·P). network: effective flops of the explicit algorithm, 2·N·P forward + 2·N·R·P \
     backward + reducing the N·R gradient rows (full 2·N·R·P², layer 2·N·R·Σ P_l², diag and norms 2·N·R·P, grads 0, \
     kfac Σ_l 2·N·ã_l² + 2·N·R·out_l²); diag, norms and kfac never form those rows, so their rate can exceed \
     the machine's GEMM rate";

/// [`FLOPS_NOTE`] as lines for the table.
const FLOPS_LINES: [&str; 5] = [
    "GFLOP/s = flops of one call / best time:",
    "  reduce   GEMM-equivalent: full 2·N·P², diag and norms 2·N·P, gram 2·N²·P",
    "  network  effective, of the explicit algorithm: 2·N·P forward + 2·N·R·P backward + reducing the N·R",
    "           gradient rows (full 2·N·R·P², layer 2·N·R·Σ P_l², diag and norms 2·N·R·P, grads 0, kfac Σ_l 2·N·ã_l² +",
    "           2·N·R·out_l²); diag, norms and kfac never form those rows, so their rate can exceed the GEMM rate",
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

fn variant_text(variant: Variant) -> String {
    match variant {
        Variant::MonteCarlo { samples, .. } => format!("mc, K={samples}"),
        v => v.name().to_string(),
    }
}

/// The readable report: machine, adapter, an aligned table, set-up and peak memory.
pub fn human(o: &Outcome) -> String {
    let mut lines = Vec::new();
    let cpu = o.machine.cpu.as_deref().unwrap_or("unknown CPU");
    lines.push(format!(
        "machine: {cpu}, {} logical cores ({} CPU-path threads), {}/{}",
        o.machine.cores, o.machine.cpu_threads, o.machine.os, o.machine.arch
    ));
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
        o.repeat,
        if o.repeat == 1 { "" } else { "s" },
        o.warmup,
        if o.warmup == 1 { "" } else { "s" },
    ));
    lines.push(String::new());

    let header = ["stage", "shape", "N", "P", "R", "backend", "best", "median", "GFLOP/s", "GPU speedup"];
    let rows: Vec<[String; 10]> = o
        .results
        .iter()
        .map(|m| {
            [
                m.stage(),
                m.shape.clone(),
                m.samples.to_string(),
                m.params.to_string(),
                m.rows_per_sample.map_or(String::new(), |r| r.to_string()),
                m.backend.to_string(),
                duration(m.best()),
                duration(m.median()),
                gflops(m.gflops(m.best())),
                m.gpu_speedup.map_or(String::new(), |r| format!("{r:.2}x")),
            ]
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    // Text columns left-aligned, numbers right-aligned.
    let numeric = [false, false, true, true, true, false, true, true, true, true];
    let format_row = |cells: &[String]| {
        cells
            .iter()
            .zip(&widths)
            .zip(numeric)
            .map(|((cell, &w), num)| {
                let pad = " ".repeat(w - cell.chars().count());
                if num {
                    format!("{pad}{cell}")
                } else {
                    format!("{cell}{pad}")
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    lines.push(format_row(&header.map(String::from)));
    for row in &rows {
        lines.push(format_row(row));
    }
    lines.push(String::new());

    if let Some((variant, activation)) = o.network {
        lines.push(format!(
            "network: PyTorch-initialized {} MLP, seeded classification task, variant {} (R gradient rows per sample)",
            activation.name(),
            variant_text(variant)
        ));
    }
    lines.extend(FLOPS_LINES.iter().map(|l| l.to_string()));
    lines.push("GPU speedup = CPU best time / GPU best time, measured back to back in this run (> 1: the GPU is faster)".into());
    let setup = o.setup.iter().map(|(b, t)| format!("{b} {}", duration(*t))).collect::<Vec<_>>().join(", ");
    lines.push(format!(
        "untimed: backend set-up {setup}; data generation {}",
        duration(o.generate)
    ));
    match o.peak_rss {
        Some(b) => lines.push(format!("peak memory: {} resident (VmHWM of this process, all stages)", mib(b))),
        None => lines.push("peak memory: not reported on this OS".into()),
    }
    lines.join("\n")
}

/// One JSON line: machine, adapter, the results and peak memory.
pub fn json_line(o: &Outcome) -> String {
    let network = o.network.map(|(variant, activation)| {
        json!({
            "variant": variant.name(),
            "mc_samples": match variant { Variant::MonteCarlo { samples, .. } => Some(samples), _ => None },
            "activation": activation.name(),
        })
    });
    json!({
        "machine": o.machine,
        "adapter": o.adapter,
        "gpu_note": o.gpu_note,
        "repeat": o.repeat,
        "warmup": o.warmup,
        "network": network,
        "flops": FLOPS_NOTE,
        "setup_s": o.setup.iter().map(|(b, t)| (b.to_string(), json!(t))).collect::<serde_json::Map<_, _>>(),
        "generate_s": o.generate,
        "results": o.results.iter().map(Measurement::to_json).collect::<Vec<_>>(),
        "peak_rss_bytes": o.peak_rss,
    })
    .to_string()
}

/// Runs `fisher bench` and prints its report; a status line on a terminal while it runs.
pub fn main(cfg: &BenchConfig) -> anyhow::Result<()> {
    let terminal = cfg.output == Output::Human && std::io::stderr().is_terminal();
    let progress = |what: &str| {
        if terminal {
            eprint!("\r\x1b[2K{what} …");
            let _ = std::io::stderr().flush();
        }
    };
    let outcome = run(cfg, progress);
    if terminal {
        eprint!("\r\x1b[2K");
    }
    let outcome = outcome?;
    match cfg.output {
        Output::Human => println!("{}", human(&outcome)),
        Output::Json => println!("{}", json_line(&outcome)),
        Output::Quiet => {}
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
    }

    #[test]
    fn widths() {
        assert_eq!(parse_widths("784,256,10").unwrap(), Some(vec![784, 256, 10]));
        assert_eq!(parse_widths("none").unwrap(), None);
        for bad in ["784", "784,0,10", "784,256,1", "a,b", ""] {
            assert!(parse_widths(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn median_and_best() {
        let m = |times: Vec<f64>| Measurement {
            kind: "reduce",
            form: "full",
            shape: "1x1".into(),
            samples: 1,
            params: 1,
            rows_per_sample: None,
            backend: "cpu",
            times,
            flops: 2.0,
            gpu_speedup: None,
        };
        assert_eq!(m(vec![3.0, 1.0, 2.0]).median(), 2.0);
        assert_eq!(m(vec![4.0, 1.0, 2.0, 3.0]).median(), 2.5);
        assert_eq!(m(vec![4.0, 1.0, 2.0, 3.0]).best(), 1.0);
    }

    #[test]
    fn flop_counts() {
        assert_eq!(reduce_flops(ReduceFormArg::Full, 10, 3), 180.0);
        assert_eq!(reduce_flops(ReduceFormArg::Gram, 10, 3), 600.0);
        assert_eq!(reduce_flops(ReduceFormArg::Diag, 10, 3), 60.0);
        // 2-3 with bias: P = 9; N = 5, R = 3: 2·5·9 + 2·5·3·9 + 2·5·3·9 = 90 + 270 + 270.
        let mlp = train::init_mlp(&[2, 3], Activation::Tanh, true, 0).unwrap();
        assert_eq!(network_flops(&mlp, 5, 3, NetForm::Diagonal), 630.0);
        // kfac: 2·5·3² + 2·5·3·3² = 90 + 270 on top of 360.
        assert_eq!(network_flops(&mlp, 5, 3, NetForm::Kfac), 720.0);
    }
}
