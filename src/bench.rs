//! Benchmark workloads, their flop model and their measurement, shared by `fisher bench`
//! and the criterion benches (`benches/kernels.rs`).
//!
//! Every timed call goes through the library exactly as a user's program would
//! ([`Engine::fisher_from_grads`] on [`synthetic::gradient_like`] data, [`Engine::fisher`] on
//! a [`train::init_mlp`] model and a [`train::classification_task`] data set). Setting up
//! (adapter, device, kernels) and generating the data happen outside the timer; each timed
//! call includes the transfers to and from the device and waits for the result. Every
//! workload runs on every backend back to back, so the GPU/CPU ratio compares runs made
//! under the same conditions.
//!
//! A [`GraphStage`] (`fisher bench --model`) times an ONNX network's diag and kfac
//! ([`Engine::graph_fisher_with_stats`], which also reports the micro-batch split) and one
//! F·v ([`Engine::graph_fvp`]); its rate counts the executed work of the lowered primitive
//! program ([`graph_flops`]).
//!
//! Each measurement names its workload stably ([`reduce_workload`], [`network_workload`],
//! [`graph_workload`]: `reduce/full/4096x2048`, `network/diag/true/784-512-512-10x1024`,
//! `graph/fvp/true/m.onnx@512`), so that a script can pair the measurements of two runs.
//!
//! ```
//! use fisher_engine::bench::{measure, Timing};
//! let times = measure(1, 3, || Ok::<_, ()>(std::hint::black_box(2 + 2))).unwrap();
//! assert_eq!(times.len(), 3);
//! assert!(Timing(times).best() >= 0.0);
//! ```

use std::path::PathBuf;
use std::time::Instant;

use crate::backend::gpu::GpuOptions;
use crate::device::{self, AdapterInfo, DeviceRequest};
use crate::fisher::{rows_per_sample, NetForm, Variant};
use crate::graph::fisher::{GraphModel, Selection};
use crate::graph::prim::{Inst, Program, Rows};
use crate::model::{train, Activation, Dataset, Likelihood, Mlp};
use crate::pipeline::RunError;
use crate::{synthetic, Backend, Engine, Form};

/// One reduction shape: N×P.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// N.
    pub samples: usize,
    /// P.
    pub params: usize,
}

/// The network workloads: one model and task, several forms.
#[derive(Debug, Clone)]
pub struct NetworkStage {
    /// Layer widths (input, hidden..., classes ≥ 2).
    pub widths: Vec<usize>,
    /// Samples of the classification task.
    pub samples: usize,
    /// Forms to time.
    pub forms: Vec<NetForm>,
    /// Variant.
    pub variant: Variant,
    /// Hidden activation.
    pub activation: Activation,
    /// Also time the top-k eigenvalues of the implicit Fisher ([`TopStage`]).
    pub top: Option<TopStage>,
}

/// The top-k workload: the k largest eigenvalues of the network's implicit Fisher by
/// Lanczos on F·v products (`fisher report --form implicit --top K --only top`), timed
/// whole: the operator is made inside each timed call, so its cached forward pass counts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TopStage {
    /// k.
    pub k: usize,
    /// Lanczos' relative residual tolerance.
    pub tol: f64,
}

/// `network/top10/true/784-512-10x64`: the name of the top-k workload.
pub fn top_workload(k: usize, variant: Variant, widths: &[usize], samples: usize) -> String {
    network_workload(NetForm::Diagonal, variant, widths, samples).replacen("/diag/", &format!("/top{k}/"), 1)
}

/// A graph (ONNX) network's Fisher forms, as `fisher bench --model` measures them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GraphForm {
    /// diag(F), through the full reverse program.
    Diagonal,
    /// The KFAC factors, through the reverse program pruned to the KFAC sites.
    Kfac,
    /// One implicit F·v product (forward, forward-mode J·v, one reverse pass with R = 1).
    Fvp,
}

impl GraphForm {
    /// Every graph form, in the order `fisher bench` runs them.
    pub const ALL: [GraphForm; 3] = [GraphForm::Diagonal, GraphForm::Kfac, GraphForm::Fvp];

    /// `diag`, `kfac`, `fvp`.
    pub fn name(self) -> &'static str {
        match self {
            GraphForm::Diagonal => "diag",
            GraphForm::Kfac => "kfac",
            GraphForm::Fvp => "fvp",
        }
    }
}

/// The graph workloads: an ONNX network on its data, read when the run starts.
#[derive(Debug, Clone)]
pub struct GraphStage {
    /// The ONNX file.
    pub model: PathBuf,
    /// The inputs (`.npy`, any rank).
    pub inputs: PathBuf,
    /// The labels (`.npy`).
    pub labels: PathBuf,
    /// The likelihood the outputs define.
    pub likelihood: Likelihood,
    /// Variant of diag and kfac (fvp uses it too: Λ of the variant).
    pub variant: Variant,
}

/// What a run found out about its graph network (for the report).
#[derive(Debug, Clone)]
pub struct GraphSummary {
    /// Parameters.
    pub params: usize,
    /// Samples of the data.
    pub samples: usize,
    /// Outputs C.
    pub outputs: usize,
    /// Output rows per sample of diag and kfac.
    pub rows_per_sample: usize,
    /// Bytes of the program's shared slots (parameters, constants).
    pub shared_bytes: u64,
    /// The forms not measured, and why (kfac on grouped convolutions, or without a
    /// Linear/Conv layer).
    pub skipped: Vec<(GraphForm, String)>,
    /// Seconds reading and lowering the model and reading the data (untimed).
    pub load: f64,
}

/// Which backends to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backends {
    /// The GPU where Auto would run it (a hardware adapter; skipped with a note otherwise),
    /// and the CPU.
    Available,
    /// The listed ones; a missing GPU adapter is an error.
    Listed {
        /// Run the GPU (any adapter, software included).
        gpu: bool,
        /// Run the CPU.
        cpu: bool,
    },
}

/// What to measure, and how.
#[derive(Debug, Clone)]
pub struct BenchPlan {
    /// Reduction shapes.
    pub shapes: Vec<Shape>,
    /// Reductions timed on every shape.
    pub forms: Vec<Form>,
    /// The network stage, if any.
    pub network: Option<NetworkStage>,
    /// The graph (ONNX) stage, if any.
    pub graph: Option<GraphStage>,
    /// Backends.
    pub backends: Backends,
    /// Adapter choice.
    pub gpu: GpuOptions,
    /// Timed calls per measurement.
    pub repeat: usize,
    /// Untimed calls before them.
    pub warmup: usize,
    /// Seed of the gradients, the model, the task (and MC label draws, in the variant).
    pub seed: u64,
}

// ---------------------------------------------------------------------------------------
// Workloads and their flops

/// The stable name of a reduction workload: `reduce/<form>/<N>x<P>`.
pub fn reduce_workload(form: &Form, shape: Shape) -> String {
    format!("reduce/{form}/{}x{}", shape.samples, shape.params)
}

/// The stable name of a network workload: `network/<form>/<variant>/<widths>x<N>`, the
/// variant `mc<K>` for Monte Carlo with K draws.
pub fn network_workload(form: NetForm, variant: Variant, widths: &[usize], samples: usize) -> String {
    let variant = match variant {
        Variant::MonteCarlo { samples, .. } => format!("mc{samples}"),
        v => v.name().to_string(),
    };
    format!("network/{}/{variant}/{}x{samples}", form.name(), widths_text(widths))
}

/// `784-512-10`.
pub fn widths_text(widths: &[usize]) -> String {
    widths.iter().map(usize::to_string).collect::<Vec<_>>().join("-")
}

/// The network workload's model and data: [`train::init_mlp`] (PyTorch's nn.Linear
/// initialization) with `activation` and [`train::classification_task`] with one class per
/// output, both from `seed`.
pub fn network_problem(widths: &[usize], samples: usize, activation: Activation, seed: u64) -> crate::Result<(Mlp, Dataset)> {
    let classes = *widths.last().unwrap_or(&0);
    let mlp = train::init_mlp(widths, activation, true, seed)?;
    let data = train::classification_task(samples, widths.first().copied().unwrap_or(0), classes, seed ^ 0x7A5C)?;
    Ok((mlp, data))
}

/// How the flop counts of `fisher bench` are defined ([`reduce_flops`], [`network_flops`]),
/// in one paragraph (its JSON carries it).
pub const FLOPS_NOTE: &str = "GFLOP/s = flops of one call / time. reduce: GEMM-equivalent flops (full 2·N·P², diag \
     and norms 2·N·P, gram 2·N²·P). network: effective flops of the explicit algorithm, 2·N·P forward + 2·N·R·P \
     backward + reducing the N·R gradient rows (full 2·N·R·P², layer 2·N·R·Σ P_l², diag and norms 2·N·R·P, grads 0, \
     kfac Σ_l 2·N·ã_l² + 2·N·R·out_l²); diag, norms and kfac never form those rows, so their rate can exceed \
     the machine's GEMM rate";

/// Values (f32) of a reduction's result that grow with the shape, with their count in
/// words (full `P×P`, gram `N×N`); `None` for the forms that stay small (diag, norms: P, N).
pub fn reduce_result_values(form: &Form, shape: Shape) -> Option<(u128, &'static str)> {
    let (n, p) = (shape.samples as u128, shape.params as u128);
    match form {
        Form::Full => Some((p.saturating_mul(p), "P×P")),
        Form::Gram => Some((n.saturating_mul(n), "N×N")),
        Form::BlockDiagonal(sizes) => {
            Some((sizes.iter().fold(0u128, |sum, &b| sum.saturating_add((b as u128).saturating_pow(2))), "Σ b²"))
        }
        Form::Diagonal | Form::SampleNorms => None,
    }
}

/// Parameters of an MLP with biases and these widths, from the widths alone.
pub fn network_params(widths: &[usize]) -> u128 {
    widths.windows(2).fold(0u128, |sum, w| sum.saturating_add((w[0] as u128 + 1).saturating_mul(w[1] as u128)))
}

/// Values (f32) of a network result that grow faster than the model (full `P×P`, layer
/// `Σ_l P_l²`, kfac `Σ_l (in+1)² + out²`, grads `N·R×P`), from the widths alone; `None` for
/// diag and norms. Saturating: a size beyond u128 is beyond any limit.
pub fn network_result_values(widths: &[usize], samples: usize, rows: usize, form: NetForm) -> Option<(u128, &'static str)> {
    let params = network_params(widths);
    match form {
        NetForm::Full => Some((params.saturating_mul(params), "P×P")),
        NetForm::Layer => Some((
            widths.windows(2).fold(0u128, |sum, w| sum.saturating_add(((w[0] as u128 + 1) * w[1] as u128).saturating_pow(2))),
            "Σ_l P_l²",
        )),
        NetForm::Kfac => Some((
            widths.windows(2).fold(0u128, |sum, w| {
                sum.saturating_add((w[0] as u128 + 1).saturating_pow(2)).saturating_add((w[1] as u128).saturating_pow(2))
            }),
            "Σ_l (in+1)² + out²",
        )),
        NetForm::Grads => Some(((samples as u128).saturating_mul(rows as u128).saturating_mul(params), "N·R×P")),
        NetForm::Diagonal | NetForm::Norms => None,
    }
}

/// GEMM-equivalent flops of reducing an N×P gradient matrix to `form` (F = GᵀG/N counts
/// 2·N·P² although only its upper triangle is computed, so that rates compare with
/// `numpy G.T @ G`): full 2·N·P², blocks 2·N·Σ b², diag and norms 2·N·P, gram 2·N²·P.
pub fn reduce_flops(form: &Form, samples: usize, params: usize) -> f64 {
    let (n, p) = (samples as f64, params as f64);
    match form {
        Form::Full => 2.0 * n * p * p,
        Form::BlockDiagonal(sizes) => sizes.iter().map(|&b| 2.0 * n * (b as f64).powi(2)).sum(),
        Form::Diagonal | Form::SampleNorms => 2.0 * n * p,
        Form::Gram => 2.0 * n * n * p,
    }
}

/// Effective flops of a network Fisher, as `fisher bench` reports them: the forward pass
/// (2·N·P), forming the N·R gradient rows by backpropagation (2·N·R·P), and reducing those
/// rows to the form as a GEMM would (full 2·N·R·P², layer 2·N·R·Σ P_l², diag and norms
/// 2·N·R·P, grads nothing, kfac Σ_l 2·N·ã_l² + 2·N·R·out_l² with ã_l the augmented input
/// width). diag, norms and kfac never form those rows, so their rate can exceed the
/// machine's GEMM rate; [`network_flops_executed`] counts what they do.
pub fn network_flops(mlp: &Mlp, samples: usize, rows: usize, form: NetForm) -> f64 {
    let (n, r, p) = (samples as f64, rows as f64, mlp.num_params() as f64);
    let reduction = match form {
        NetForm::Full => 2.0 * n * r * p * p,
        NetForm::Layer => mlp.layers.iter().map(|l| 2.0 * n * r * (l.num_params() as f64).powi(2)).sum(),
        NetForm::Diagonal | NetForm::Norms => 2.0 * n * r * p,
        NetForm::Grads => 0.0,
        NetForm::Kfac => kfac_factor_flops(mlp, n, r),
    };
    2.0 * n * p + 2.0 * n * r * p + reduction
}

/// The KFAC factor GEMMs: Σ_l 2·N·ã_l² + 2·N·R·out_l².
fn kfac_factor_flops(mlp: &Mlp, n: f64, r: f64) -> f64 {
    mlp.layers.iter().map(|l| 2.0 * n * (l.augmented_in() as f64).powi(2) + 2.0 * n * r * (l.fan_out() as f64).powi(2)).sum()
}

/// Flops of the work a network Fisher actually executes (the criterion benches' throughput):
/// the forward pass (2·N·P), the backward GEMMs of the R output rows through every layer
/// but the first (Σ_{l>0} 2·N·R·out·in), and the reduction: diag squares and sums in one
/// GEMM per layer (Σ 2·N·out·ã), kfac forms its factors (Σ 2·N·(ã² + R·out²)), norms
/// multiplies per-row norms of δ and ã (Σ 2·N·(R·out + ã)), grads forms the N·R rows
/// (N·R·P products), full and layer form the rows and reduce them (+ 2·N·R·P², 2·N·R·Σ P_l²).
pub fn network_flops_executed(mlp: &Mlp, samples: usize, rows: usize, form: NetForm) -> f64 {
    let (n, r, p) = (samples as f64, rows as f64, mlp.num_params() as f64);
    let forward = 2.0 * n * p;
    let backward: f64 = mlp.layers.iter().skip(1).map(|l| 2.0 * n * r * (l.fan_out() * l.fan_in()) as f64).sum();
    let per_layer = |f: &dyn Fn(f64, f64) -> f64| -> f64 {
        mlp.layers.iter().map(|l| f(l.augmented_in() as f64, l.fan_out() as f64)).sum()
    };
    let reduction = match form {
        NetForm::Diagonal => per_layer(&|a, o| 2.0 * n * o * a),
        NetForm::Kfac => kfac_factor_flops(mlp, n, r),
        NetForm::Norms => per_layer(&|a, o| 2.0 * n * (r * o + a)),
        NetForm::Grads => n * r * p,
        NetForm::Full => n * r * p + 2.0 * n * r * p * p,
        NetForm::Layer => n * r * p + mlp.layers.iter().map(|l| 2.0 * n * r * (l.num_params() as f64).powi(2)).sum::<f64>(),
    };
    forward + backward + reduction
}

/// How the flops of `fisher bench --model` are counted ([`graph_flops`]), in one paragraph.
pub const GRAPH_FLOPS_NOTE: &str = "graph: executed flops of the lowered primitive program, 2 per multiply–add of \
     every instruction that runs (per-row work × rows: shared 1, per-sample N, per-draw N·R), plus the reduction: \
     diag forward + full reverse program + 2·N·R·P (squared gradients), kfac forward + the reverse program pruned to \
     the KFAC sites + Σ_sites 2·N·S·(ã² + R·out²), fvp forward + forward mode (J·v) + reverse program with R = 1 + \
     N·P (the gradient sum); transfers and host work are in the time but not in the flops";

/// Flops (2 per multiply–add) of running `insts` of `prog` on `samples` samples with
/// `rows` output rows each: [`Inst::work`] per destination row times the rows of its
/// destination (shared 1, per-sample N, per-draw N·R).
pub fn program_flops(prog: &Program, insts: &[Inst], samples: usize, rows: usize) -> f64 {
    let (n, r) = (samples as f64, rows as f64);
    insts
        .iter()
        .map(|inst| {
            let count = match prog.slots[inst.dst()].rows {
                Rows::Shared => 1.0,
                Rows::Sample => n,
                Rows::Draw => n * r,
            };
            2.0 * inst.work(&prog.slots) as f64 * count
        })
        .sum()
}

/// Executed flops of one graph Fisher call ([`GRAPH_FLOPS_NOTE`]); `rows` is R of diag
/// and kfac (fvp runs with R = 1), `params` P.
pub fn graph_flops(prog: &Program, samples: usize, rows: usize, params: usize, form: GraphForm) -> f64 {
    let (n, r, p) = (samples as f64, rows as f64, params as f64);
    let forward = program_flops(prog, &prog.forward, samples, rows);
    match form {
        GraphForm::Diagonal => forward + program_flops(prog, &prog.backward, samples, rows) + 2.0 * n * r * p,
        GraphForm::Kfac => {
            let factors: f64 = prog
                .kfac
                .iter()
                .map(|k| {
                    let (a, o, s) = ((k.fan_in + k.bias.is_some() as usize) as f64, k.fan_out as f64, k.positions as f64);
                    2.0 * n * s * (a * a + r * o * o)
                })
                .sum();
            forward + program_flops(prog, &prog.backward_kfac, samples, rows) + factors
        }
        GraphForm::Fvp => {
            program_flops(prog, &prog.forward, samples, 1)
                + program_flops(prog, &prog.tangent, samples, 1)
                + program_flops(prog, &prog.backward, samples, 1)
                + n * p
        }
    }
}

/// The stable name of a graph workload: `graph/<form>/<variant>/<model path as given>@<N>`.
pub fn graph_workload(form: GraphForm, variant: Variant, model: &str, samples: usize) -> String {
    format!("graph/{}/{}/{model}@{samples}", form.name(), variant_text(variant))
}

fn variant_text(variant: Variant) -> String {
    match variant {
        Variant::MonteCarlo { samples, .. } => format!("mc{samples}"),
        v => v.name().to_string(),
    }
}

/// A seeded direction of `len` values in [−1, 1) (the F·v workload's v).
fn direction(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Measuring

/// Runs `call` `warmup` times untimed, then `repeat` times timed; the seconds of each timed
/// call. Results are dropped outside the timer.
pub fn measure<T, E>(warmup: usize, repeat: usize, mut call: impl FnMut() -> Result<T, E>) -> Result<Vec<f64>, E> {
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

/// Seconds of the timed calls of one measurement.
#[derive(Debug, Clone, PartialEq)]
pub struct Timing(pub Vec<f64>);

impl Timing {
    /// The fastest call.
    pub fn best(&self) -> f64 {
        self.0.iter().copied().fold(f64::INFINITY, f64::min)
    }

    /// The median call (the mean of the middle two for an even count).
    pub fn median(&self) -> f64 {
        let mut t = self.0.clone();
        t.sort_by(f64::total_cmp);
        let m = t.len() / 2;
        if t.len() % 2 == 1 {
            t[m]
        } else {
            (t[m - 1] + t[m]) / 2.0
        }
    }
}

/// GFLOP/s of `flops` done in `seconds`.
pub fn gflops(flops: f64, seconds: f64) -> f64 {
    flops / seconds / 1e9
}

/// The machine a run measured.
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

impl Machine {
    /// This machine.
    pub fn this() -> Machine {
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

/// One measured (workload, backend).
#[derive(Debug, Clone)]
pub struct Measurement {
    /// The stable workload name ([`reduce_workload`], [`network_workload`]).
    pub workload: String,
    /// `reduce` or `network`.
    pub kind: &'static str,
    /// The form's name.
    pub form: String,
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
    pub timing: Timing,
    /// Flops of one call ([`reduce_flops`], [`network_flops`]).
    pub flops: f64,
    /// CPU best / GPU best for the same workload (on the GPU row).
    pub gpu_speedup: Option<f64>,
    /// Samples per micro-batch (graph diag and kfac, from the run's statistics).
    pub micro_batch: Option<usize>,
    /// Bytes of one micro-batch's activations (graph diag and kfac).
    pub activation_bytes: Option<u64>,
}

impl Measurement {
    /// Samples per second at the best time (networks and graphs; `None` for reductions).
    pub fn samples_per_s(&self) -> Option<f64> {
        (self.kind != "reduce").then(|| self.samples as f64 / self.timing.best())
    }
}

/// What a benchmark run measured.
#[derive(Debug)]
pub struct BenchOutcome {
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
    /// The measurements, in run order.
    pub results: Vec<Measurement>,
    /// The graph network, when `--model` ran.
    pub graph: Option<GraphSummary>,
    /// Peak RSS at the end (bytes), where the OS reports it.
    pub peak_rss: Option<u64>,
}

/// The engines to measure, named `gpu` and `cpu`, with what the report says about them.
struct Opened {
    runners: Vec<(&'static str, Engine)>,
    adapter: Option<AdapterInfo>,
    gpu_note: Option<String>,
    setup: Vec<(&'static str, f64)>,
}

fn open_backends(plan: &BenchPlan) -> crate::Result<Opened> {
    // Both listed: the GPU is required (Backend::Gpu, software accepted); by default it runs
    // where Auto would run it (a hardware GPU), and the CPU path always runs.
    let (gpu_request, want_cpu) = match plan.backends {
        Backends::Available => (Some(Backend::Auto), true),
        Backends::Listed { gpu, cpu } => (gpu.then_some(Backend::Gpu), cpu),
    };
    let mut opened = Opened { runners: Vec::new(), adapter: None, gpu_note: None, setup: Vec::new() };
    if let Some(backend) = gpu_request {
        let start = Instant::now();
        let device = device::open(&DeviceRequest::from_env(backend, plan.gpu.clone())?)?;
        if device.engine.is_gpu() {
            opened.adapter = device.adapter;
            opened.setup.push(("gpu", start.elapsed().as_secs_f64()));
            opened.runners.push(("gpu", device.engine));
        } else {
            let why = device.fallback.unwrap_or(device.reason);
            log::warn!("{why}; benchmarking the CPU path only");
            opened.gpu_note = Some(format!("{why}: only the CPU path ran"));
        }
    }
    if want_cpu {
        let start = Instant::now();
        let engine = Engine::cpu();
        opened.setup.push(("cpu", start.elapsed().as_secs_f64()));
        opened.runners.push(("cpu", engine));
    }
    Ok(opened)
}

/// Runs the plan. `progress` receives a short status before each measurement.
pub fn run(plan: &BenchPlan, mut progress: impl FnMut(&str)) -> Result<BenchOutcome, RunError> {
    let machine = Machine::this();
    // The graph is read first: a bad model or data is reported before any device opens.
    let graph = match &plan.graph {
        None => None,
        Some(stage) => {
            progress(&format!("reading {}", stage.model.display()));
            Some(load_graph(stage)?)
        }
    };
    progress("setting up the backends");
    let Opened { runners, adapter, gpu_note, setup } = open_backends(plan)?;
    let graph_forms = graph.as_ref().map_or(0, |(_, _, g)| GraphForm::ALL.len() - g.skipped.len());
    let total = runners.len()
        * (plan.shapes.len() * plan.forms.len() + plan.network.as_ref().map_or(0, |n| n.forms.len() + n.top.is_some() as usize) + graph_forms);
    let mut done = 0;
    let mut generate = 0.0;
    let mut results = Vec::new();

    for (s, &shape) in plan.shapes.iter().enumerate() {
        let Shape { samples: n, params: p } = shape;
        progress(&format!("generating {n}x{p} gradients"));
        let start = Instant::now();
        let g = synthetic::gradient_like(n, p, plan.seed.wrapping_add(s as u64));
        generate += start.elapsed().as_secs_f64();
        for form in &plan.forms {
            for (name, engine) in &runners {
                done += 1;
                progress(&format!("[{done}/{total}] reduce {form} {n}x{p} on {name}"));
                let times = measure(plan.warmup, plan.repeat, || {
                    engine
                        .fisher_from_grads(g.view(), form)
                        .map_err(RunError::context(format!("reduce {form} {n}x{p} on {}", engine.device_info())))
                })?;
                results.push(Measurement {
                    workload: reduce_workload(form, shape),
                    kind: "reduce",
                    form: form.to_string(),
                    shape: format!("{n}x{p}"),
                    samples: n,
                    params: p,
                    rows_per_sample: None,
                    backend: name,
                    timing: Timing(times),
                    flops: reduce_flops(form, n, p),
                    gpu_speedup: None,
                    micro_batch: None,
                    activation_bytes: None,
                });
            }
        }
    }

    if let Some(net) = &plan.network {
        let shape = widths_text(&net.widths);
        progress(&format!("building the {shape} model and {} samples", net.samples));
        let start = Instant::now();
        let (mlp, data) = network_problem(&net.widths, net.samples, net.activation, plan.seed)
            .map_err(RunError::context("building the model and the classification task"))?;
        generate += start.elapsed().as_secs_f64();
        let rows = rows_per_sample(net.variant, mlp.output_dim());
        for &form in &net.forms {
            for (name, engine) in &runners {
                done += 1;
                progress(&format!("[{done}/{total}] network {} {shape} on {name}", form.name()));
                let times = measure(plan.warmup, plan.repeat, || {
                    engine.fisher(&mlp, &data, net.variant, form).map_err(RunError::context(format!(
                        "network {} {shape} on {}",
                        form.name(),
                        engine.device_info()
                    )))
                })?;
                results.push(Measurement {
                    workload: network_workload(form, net.variant, &net.widths, net.samples),
                    kind: "network",
                    form: form.name().to_string(),
                    shape: shape.clone(),
                    samples: net.samples,
                    params: mlp.num_params(),
                    rows_per_sample: Some(rows),
                    backend: name,
                    timing: Timing(times),
                    flops: network_flops(&mlp, net.samples, rows, form),
                    gpu_speedup: None,
                    micro_batch: None,
                    activation_bytes: None,
                });
            }
        }

        if let Some(top) = net.top {
            for (name, engine) in &runners {
                done += 1;
                progress(&format!("[{done}/{total}] network top-{} eigenvalues {shape} on {name}", top.k));
                let (mut products, mut gram) = (0, false);
                let times = measure(plan.warmup, plan.repeat, || {
                    let options = crate::analysis::LanczosOptions { tol: top.tol, max_iterations: 1000, ..crate::analysis::LanczosOptions::top(top.k) };
                    let found = crate::analysis::top_eigenvalues(engine, &mlp, &data, net.variant, &options, &|_| {})?;
                    products = found.result.iterations;
                    gram = found.method == "gram";
                    Ok::<_, crate::FisherError>(found)
                })
                .map_err(RunError::context(format!("network top-{} eigenvalues {shape} on {}", top.k, engine.device_info())))?;
                // One F·v product: forward-mode and reverse-mode passes, 4 GEMM-equivalents
                // of 2·N·P each (the forward pass is cached across products); one K·u
                // product on the Gram side: 2 of them.
                let per_product = if gram { 2.0 } else { 4.0 };
                let flops = products as f64 * per_product * 2.0 * net.samples as f64 * mlp.num_params() as f64;
                results.push(Measurement {
                    workload: top_workload(top.k, net.variant, &net.widths, net.samples),
                    kind: "network",
                    form: format!("top{}", top.k),
                    shape: shape.clone(),
                    samples: net.samples,
                    params: mlp.num_params(),
                    rows_per_sample: Some(rows),
                    backend: name,
                    timing: Timing(times),
                    flops,
                    gpu_speedup: None,
                    micro_batch: None,
                    activation_bytes: None,
                });
            }
        }
    }

    if let (Some(stage), Some((model, data, summary))) = (&plan.graph, &graph) {
        let name = stage.model.display().to_string();
        let selection = Selection::all(&model.graph);
        let (n, r, p) = (summary.samples, summary.rows_per_sample, summary.params);
        let v = direction(p, plan.seed);
        for form in GraphForm::ALL {
            if summary.skipped.iter().any(|(f, _)| *f == form) {
                continue;
            }
            for (backend, engine) in &runners {
                done += 1;
                progress(&format!("[{done}/{total}] graph {} {name} on {backend}", form.name()));
                let context = || format!("graph {} {name} on {}", form.name(), engine.device_info());
                let mut stats = None;
                let times = match form {
                    GraphForm::Diagonal | GraphForm::Kfac => {
                        let net_form = if form == GraphForm::Kfac { NetForm::Kfac } else { NetForm::Diagonal };
                        measure(plan.warmup, plan.repeat, || {
                            let (f, s) = engine
                                .graph_fisher_with_stats(model, data, stage.likelihood, stage.variant, net_form, &selection)
                                .map_err(RunError::context(context()))?;
                            stats = Some(s);
                            Ok::<_, RunError>(f)
                        })?
                    }
                    GraphForm::Fvp => measure(plan.warmup, plan.repeat, || {
                        engine.graph_fvp(model, data, stage.likelihood, stage.variant, &v, true).map_err(RunError::context(context()))
                    })?,
                };
                results.push(Measurement {
                    workload: graph_workload(form, stage.variant, &name, n),
                    kind: "graph",
                    form: form.name().to_string(),
                    shape: name.clone(),
                    samples: n,
                    params: p,
                    rows_per_sample: Some(if form == GraphForm::Fvp { 1 } else { r }),
                    backend,
                    timing: Timing(times),
                    flops: graph_flops(&model.program, n, r, p, form),
                    gpu_speedup: None,
                    micro_batch: stats.map(|s| s.micro_batch),
                    activation_bytes: stats.map(|s| s.activation_bytes),
                });
            }
        }
    }

    // The ratio of runs made back to back in this process.
    let ratios: Vec<(usize, f64)> = results
        .iter()
        .enumerate()
        .filter(|(_, m)| m.backend == "gpu")
        .filter_map(|(i, gpu)| {
            let cpu = results.iter().find(|c| c.backend == "cpu" && c.workload == gpu.workload)?;
            Some((i, cpu.timing.best() / gpu.timing.best()))
        })
        .collect();
    for (i, ratio) in ratios {
        results[i].gpu_speedup = Some(ratio);
    }
    let graph = graph.map(|(_, _, summary)| summary);
    Ok(BenchOutcome { machine, adapter, gpu_note, setup, generate, results, graph, peak_rss: peak_rss_bytes() })
}

/// Reads the graph stage's model and data, and decides which forms it can run.
fn load_graph(stage: &GraphStage) -> Result<(GraphModel, Dataset, GraphSummary), RunError> {
    let start = Instant::now();
    let (model, data) = crate::pipeline::graph::load_graph_problem(&stage.model, &stage.inputs, &stage.labels, stage.likelihood)?;
    model.check_data(&data, stage.likelihood)?;
    let outputs = model.graph.outputs();
    let mut skipped = Vec::new();
    if let Some((module, why)) = model.kfac_refused.first() {
        skipped.push((GraphForm::Kfac, format!("module {module}: {why}")));
    } else if model.program.kfac.is_empty() {
        skipped.push((GraphForm::Kfac, "the model has no Linear (Gemm/MatMul) or Conv layer".to_string()));
    }
    let summary = GraphSummary {
        params: model.graph.param_count(),
        samples: data.len(),
        outputs,
        rows_per_sample: rows_per_sample(stage.variant, outputs),
        shared_bytes: model.program.shared_floats().saturating_mul(4),
        skipped,
        load: start.elapsed().as_secs_f64(),
    };
    Ok((model, data, summary))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reduce_flops_by_hand() {
        assert_eq!(reduce_flops(&Form::Full, 10, 3), 180.0);
        assert_eq!(reduce_flops(&Form::Gram, 10, 3), 600.0);
        assert_eq!(reduce_flops(&Form::Diagonal, 10, 3), 60.0);
        assert_eq!(reduce_flops(&Form::SampleNorms, 10, 3), 60.0);
        assert_eq!(reduce_flops(&Form::BlockDiagonal(vec![1, 2]), 10, 3), 20.0 + 80.0);
    }

    #[test]
    fn network_flops_by_hand() {
        // 2-3 with bias: P = 9; N = 5, R = 3: 2·5·9 + 2·5·3·9 + 2·5·3·9 = 90 + 270 + 270.
        let mlp = train::init_mlp(&[2, 3], Activation::Tanh, true, 0).unwrap();
        assert_eq!(network_flops(&mlp, 5, 3, NetForm::Diagonal), 630.0);
        // kfac: 2·5·3² + 2·5·3·3² = 90 + 270 on top of 360.
        assert_eq!(network_flops(&mlp, 5, 3, NetForm::Kfac), 720.0);
        assert_eq!(network_flops(&mlp, 5, 3, NetForm::Grads), 360.0);
        assert_eq!(network_flops(&mlp, 5, 3, NetForm::Full), 360.0 + 2.0 * 15.0 * 81.0);
        // Executed, 2-3-2 (P = 9 + 8 = 17), N = 4, R = 2: forward 2·4·17 = 136, backward
        // through layer 1 only 2·4·2·(2·3) = 96; diag: 2·4·(3·3 + 2·4) = 136.
        let mlp = train::init_mlp(&[2, 3, 2], Activation::Tanh, true, 0).unwrap();
        assert_eq!(network_flops_executed(&mlp, 4, 2, NetForm::Diagonal), 136.0 + 96.0 + 136.0);
        // kfac: 2·4·(3² + 2·3²) + 2·4·(4² + 2·2²) = 216 + 192.
        assert_eq!(network_flops_executed(&mlp, 4, 2, NetForm::Kfac), 136.0 + 96.0 + 408.0);
    }

    #[test]
    fn timing_statistics() {
        assert_eq!(Timing(vec![3.0, 1.0, 2.0]).median(), 2.0);
        assert_eq!(Timing(vec![4.0, 1.0, 2.0, 3.0]).median(), 2.5);
        assert_eq!(Timing(vec![4.0, 1.0, 2.0, 3.0]).best(), 1.0);
        assert_eq!(gflops(2e9, 0.5), 4.0);
    }

    #[test]
    fn workload_names() {
        let shape = Shape { samples: 4096, params: 2048 };
        assert_eq!(reduce_workload(&Form::Full, shape), "reduce/full/4096x2048");
        assert_eq!(network_workload(NetForm::Diagonal, Variant::True, &[784, 512, 10], 64), "network/diag/true/784-512-10x64");
        let mc = Variant::MonteCarlo { samples: 2, seed: 0 };
        assert_eq!(network_workload(NetForm::Kfac, mc, &[4, 2], 8), "network/kfac/mc2/4-2x8");
    }

    #[test]
    fn a_graph_plan_runs_on_the_cpu() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx/cnn_bn");
        let stage = GraphStage {
            model: dir.join("model.onnx"),
            inputs: dir.join("x.npy"),
            labels: dir.join("y.npy"),
            likelihood: Likelihood::Categorical,
            variant: Variant::True,
        };
        let plan = BenchPlan {
            shapes: vec![],
            forms: vec![],
            network: None,
            graph: Some(stage.clone()),
            backends: Backends::Listed { gpu: false, cpu: true },
            gpu: GpuOptions::default(),
            repeat: 1,
            warmup: 0,
            seed: 0,
        };
        let o = run(&plan, |_| {}).unwrap();
        let forms: Vec<&str> = o.results.iter().map(|m| m.form.as_str()).collect();
        assert_eq!(forms, ["diag", "kfac", "fvp"]);
        let g = o.graph.as_ref().unwrap();
        assert_eq!((g.rows_per_sample, g.outputs), (10, 10));
        assert!(o.results.iter().all(|m| m.flops > 0.0 && m.kind == "graph" && m.samples_per_s().unwrap() > 0.0));
        assert!(o.results[0].micro_batch.is_some() && o.results[2].micro_batch.is_none());

        // The flop model: the forward pass is per sample, the reverse program per draw.
        let (model, _, _) = load_graph(&stage).unwrap();
        let prog = &model.program;
        let (n, p) = (g.samples, g.params);
        let forward = program_flops(prog, &prog.forward, n, 10);
        assert!(forward > 0.0);
        assert_eq!(program_flops(prog, &prog.forward, 2 * n, 10), 2.0 * forward - shared_flops(prog, &prog.forward));
        let backward = |r| program_flops(prog, &prog.backward, n, r);
        assert!(backward(10) > 9.0 * backward(1));
        assert_eq!(graph_flops(prog, n, 10, p, GraphForm::Diagonal), forward + backward(10) + 2.0 * (n * 10 * p) as f64);
        assert_eq!(
            graph_flops(prog, n, 10, p, GraphForm::Fvp),
            program_flops(prog, &prog.forward, n, 1) + program_flops(prog, &prog.tangent, n, 1) + backward(1) + (n * p) as f64
        );
        assert!(graph_flops(prog, n, 10, p, GraphForm::Kfac) > forward + program_flops(prog, &prog.backward_kfac, n, 10));
    }

    /// Flops of the shared instructions of `insts` (counted once, whatever N).
    fn shared_flops(prog: &Program, insts: &[Inst]) -> f64 {
        insts.iter().filter(|i| prog.slots[i.dst()].rows == Rows::Shared).map(|i| 2.0 * i.work(&prog.slots) as f64).sum()
    }

    #[test]
    fn a_tiny_plan_runs_on_the_cpu() {
        let plan = BenchPlan {
            shapes: vec![Shape { samples: 16, params: 4 }],
            forms: vec![Form::Full, Form::Diagonal],
            network: Some(NetworkStage {
                widths: vec![4, 3, 2],
                samples: 8,
                forms: vec![NetForm::Kfac],
                variant: Variant::True,
                activation: Activation::Tanh,
                top: Some(TopStage { k: 2, tol: 1e-6 }),
            }),
            graph: None,
            backends: Backends::Listed { gpu: false, cpu: true },
            gpu: GpuOptions::default(),
            repeat: 2,
            warmup: 0,
            seed: 1,
        };
        let mut heard = 0;
        let o = run(&plan, |_| heard += 1).unwrap();
        let names: Vec<&str> = o.results.iter().map(|m| m.workload.as_str()).collect();
        assert_eq!(names, ["reduce/full/16x4", "reduce/diag/16x4", "network/kfac/true/4-3-2x8", "network/top2/true/4-3-2x8"]);
        assert!(o.results.iter().all(|m| m.timing.0.len() == 2 && m.flops > 0.0 && m.backend == "cpu"));
        assert_eq!(o.results[2].rows_per_sample, Some(2));
        assert_eq!(o.results[3].form, "top2");
        assert!(heard >= 5 && o.adapter.is_none() && o.gpu_note.is_none());
    }
}
