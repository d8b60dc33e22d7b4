//! Raw flags (clap) and their validation: the command tree, the flag groups that several
//! commands share ([`BackendArgs`], [`VariantArgs`], [`ModelArgs`], [`Report`]) with the
//! configuration they validate into ([`Source`]), and `fisher reduce`'s [`ReduceConfig`].
//!
//! clap checks what it can express (which flags exist, which conflict); everything that
//! needs parsing or cross-checking happens in the `from_args`/validation methods, so that
//! `run` code only ever sees a consistent configuration.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use fisher_engine::backend::gpu::GpuOptions;
use fisher_engine::fisher::{NetForm, Variant};
use fisher_engine::model::{ActivationSpec, DataSource, Likelihood, Mlp};
use fisher_engine::pipeline::reduce::ReduceRequest;
use fisher_engine::{Backend, Form, MAX_GENERATED_VALUES};

use super::exit::{run_error, usage};


/// The exit-code table, shared by every `--help` (a macro, so that `concat!` can extend it).
macro_rules! exit_codes_help {
    () => {
        "Exit codes:
  0  success
  1  runtime failure (GPU/device error, request beyond the adapter's limits, a result
     outside the f32 tolerance under --verify or in the built-in comparison)
  2  usage or bad input (flags; a file that cannot be read, written or parsed; wrong dtype,
     rank, order or shape; NaN/Inf in the inputs or weights; a label out of range; model
     keys or widths that do not fit; a result beyond compute's --max-result-gib)
  3  no GPU adapter, when --backend gpu (or --adapter) asked for one"
    };
}

const REDUCE_HELP: &str = concat!(
    "Forms (G is N×P, row i = per-sample gradient gᵢ; tensor names in the output file):
  full            F = GᵀG/N                     fisher   [P, P]
  diag            diag(F)                       diag     [P]
  blocks:a,b,...  diagonal blocks of F          block.0  [a, a], block.1 [b, b], ...
                  (sizes sum to P)
  gram            K = GGᵀ/N (same spectrum)     gram     [N, N]
  norms           ‖gᵢ‖² (tr F = their mean)     norms    [N]

G is read from a C-order float32/float64 .npy file and streamed in chunks (memory does not
grow with N), except for gram and --verify, which need all of G in memory.
Without --out, a --synthetic run compares the GPU, the CPU and the f64 reference.

",
    exit_codes_help!()
);

const COMPUTE_HELP: &str = concat!(
    "Forms (P parameters in PyTorch named_parameters() order: per layer the weight row-major,
then the bias; N samples; R output rows per sample; tensor names in the output file):
  full    F (P×P)                                   fisher            [P, P]
  diag    diag(F)                                   diag              [P]
  layer   one block of F per Linear layer           block.<index>     [P_l, P_l]
  kfac    KFAC factors per Linear layer             kfac.<index>.A    [in+1, in+1] (in without bias)
                                                    kfac.<index>.G    [out, out]
          the block ≈ G ⊗ A in [W|b] row-major order (fisher_engine::fisher::kfac_expand
          permutes it to PyTorch order)
  grads   per-sample gradient rows, F = GᵀG/N       grads             [N·R, P]
          (row i·R + r is output row r of sample i; N×P for --variant empirical)
  norms   per-sample squared norms Σ_r ‖g_ir‖²      norms             [N]
          (never forms the gradients; their mean is tr F)
<index> is the layer's index in the nn.Sequential (0, 2, 4, ... with activations between).
F = (1/N) Σᵢ E_y[∇θ log p(y|xᵢ) ∇θ log p(y|xᵢ)ᵀ]; the file's metadata records form, variant,
likelihood, samples, parameters, rows_per_sample, backend, activations and the layouts.

Variants (R rows per sample):
  empirical  at the observed labels                              R = 1
  true       exact expectation over the predictive distribution  R = outputs (closed form)
  mc         --mc-samples K labels drawn with --seed S            R = K

Only full, layer and grads hold a result that grows with the model (P², Σ P_l², N·R·P);
one larger than --max-result-gib (default 2) is refused before computing (exit 2).

Without files, --synthetic-model 784,512,512,10 --synthetic-samples 4096 builds a seeded
model and data in memory; --save-model M.safetensors --save-data DIR writes them out (give
neither --form nor --out to only write them).

Shards (diag, kfac, layer, full): --shard i/n --partial PART_i.safetensors sums shard i of n
(a contiguous slice of whole blocks of --block-samples samples, default 65536) and writes
its exact partial sums; `fisher merge PART_0 ... PART_n-1 --out F.safetensors` checks that
the parts belong together and cover every shard once, and writes the result. On the CPU
the merge equals the single run (with the same --block-samples) bit for bit.

",
    exit_codes_help!()
);

const TRAIN_HELP: &str = concat!(
    "Writes RUN/X.npy (float32 inputs), RUN/y.npy (int64 labels), RUN/ckpt_000.safetensors …
(PyTorch nn.Sequential state dicts: 0.weight, 0.bias, 2.weight, …) and RUN/run.json (widths,
activations, optimizer, seeds, the step and the training loss of each checkpoint).
The task is fisher_engine::model::train::classification_task: one Gaussian cluster per class in
WIDTHS[0] dimensions, warped by a fixed random tanh layer. Minibatch SGD with momentum on
the softmax cross-entropy; weights initialized like PyTorch's nn.Linear.
RUN is built in a temporary directory beside it and renamed into place when complete; an
existing non-empty RUN is refused unless --force.

Then: fisher action --checkpoints RUN --activation tanh --inputs RUN/X.npy --labels RUN/y.npy

",
    exit_codes_help!()
);

const ACTION_HELP: &str = concat!(
    "With Δθ_t = θ_{t+1} − θ_t and F(θ) the Fisher at θ (--variant), each term one implicit
quadratic form vᵀFv (no F is formed, so any model size works):
  S  action              Σ_t Δθ_tᵀ F(θ_t) Δθ_t
  L  Fisher–Rao length   Σ_t √(Δθ_tᵀ F(θ_t) Δθ_t)
     chord               Σ_j √(δᵀ F(θ₀ + (j+½)δ) δ), δ = (θ_T − θ₀)/M   (midpoint rule, --segments M)
     efficiency          L / chord (1: as short as the straight chord)
The Euclidean path length Σ‖Δθ_t‖ and ‖θ_T − θ₀‖ are reported for context.
Every checkpoint must have the first one's architecture. They are read one at a time (at
most two in memory), so a run of any length needs the memory of about three checkpoints.
--plot writes the per-step action (log scale) and the cumulative length with the chord.

",
    exit_codes_help!()
);

const DEMO_HELP: &str = concat!(
    "Sections (everything computed now; each verification marked ✓ or ✗ with its tolerance):
  Device     the GPU adapter in use, or the CPU (said plainly); beside a GPU the CPU path
             runs too, and the two are compared
  Reduction  F = GᵀG/N of synthetic per-sample gradients (4096×512) on every path,
             max|Δ|/max|F| against the f64 reference (tolerance from the sum length)
  Training   `fisher train`'s default run: a 16-32-32-4 tanh MLP on 2048 samples,
             400 SGD steps, 25 checkpoints
  Fisher     the true Fisher of the trained model as diag, kfac and full on every path,
             ‖Δ‖/‖ref‖ ≤ 1e-5 against the f64 reference (`fisher compute --verify`'s contract)
  Geometry   of the full F, exactly: trace, top eigenvalues, log det(F + λI), effective
             dimension, Abbas effective dimension, Fisher–Rao norm, condition number,
             stable rank, spectral entropy, inter-layer and inter-unit coupling; and the top 5
             eigenvalues again by Lanczos on the implicit F·v (F never formed), compared
  Action     S, Fisher–Rao length, chord and efficiency along the 25 checkpoints

Writes into --out-dir (each file atomically; an existing directory may hold only an earlier
demo's output): spectrum.png, action.png, fisher.safetensors (F with `fisher compute`'s
metadata), summary.json (every number, the checks, the follow-up commands; also what
--json prints) and run/ (X.npy, y.npy, ckpt_000 … ckpt_024.safetensors, run.json), which the
printed `fisher report`, `fisher action` and `fisher compute` commands continue from.
Files are written even when a check fails, so that the failure can be inspected; the run
then exits 1. Measured on two CPU cores: 9 s with --backend gpu on a software GPU (lavapipe),
2.5 s on the CPU path (what auto picks there). --quick shrinks every size (a 6-12-12-3 MLP on 256 samples, 512×64
gradients) for tests: under a second.

",
    exit_codes_help!()
);

const REPORT_HELP: &str = concat!(
    "Forms (--form; auto: full when P ≤ 4,096 and no implicit-only option is given, else implicit):
  implicit   F is never formed: F·v products on the backend (any model size; memory is the
             model, the data, one micro-batch and Lanczos bases of 4·P bytes per vector).
             Exact: tr F (mean of the per-sample squared gradient norms), θᵀFθ, and the
             condition number (λ_min = 0 when N·R < P). Top eigenvalues by Lanczos (at most
             --top-iterations F·v); their converged eigenpairs are deflated from stochastic
             Lanczos quadrature (--probes × --lanczos-steps F·v), which gives ‖F‖_F, log det,
             d_eff, Abbas d_n, stable rank and entropy ± one standard error over probes (≈68%)
             and, for log det, d_eff, Abbas and entropy, a bound on the quadrature error
             (Gauss and Gauss–Radau rules bracket the exact value); inter-layer coupling by
             Hutchinson (--coupling-probes × layers F·v). Inter-unit coupling is not estimated.
  full, diag, layer, kfac   the form is computed (as by `fisher compute`) and everything
             is exact in f64; coupling as far as the form shows it (full: inter-layer and
             inter-unit; layer, kfac: inter-unit; diag: none).
--fisher F.safetensors analyses a stored result of `fisher compute` (full, diag, layer, kfac)
or `fisher reduce` (full, diag, blocks, gram) exactly; --weights adds θ (Fisher–Rao norm) and
the layer shapes where the file's metadata lacks them (kfac needs them).

Measures (fisher_engine::analysis documents each formula and its source):
  d_eff(α) = Σ λᵢ/(λᵢ + α)                 --alpha, one or more
  Abbas d_n = log det(I + κ_n F̂)/log κ_n  F̂ = P·F/tr F, κ_n = n/(2π log n), --samples-n
  ‖θ‖_FR = √(θᵀFθ); condition number (λ_max + λ)/(λ_min + λ); stable rank ‖F‖²_F/‖F‖²₂;
  spectral entropy −Σ pᵢ log pᵢ (pᵢ = λᵢ/tr F); inter-layer coupling: share of ‖F‖²_F outside
  the per-layer blocks; inter-unit: within a layer, outside the per-output-unit blocks.

Cost of the implicit defaults (--top 10 --probes 4 --lanczos-steps 40 --coupling-probes 4
--top-iterations 80): at most 80 + 160 + 1 + 4·layers F·v products, each one pass over the
data. A 784-1024-1024-1024-10 MLP on 4,096 samples took 223 products, 3 min 25 s and 888 MiB
on two CPU cores. SLQ reorthogonalizes while its basis (steps × 4·P bytes) fits 512 MiB.
--plot draws the eigenvalues (the exact spectrum, or the top Ritz values) and the spectral
density (exact, or the SLQ estimate).

",
    exit_codes_help!()
);

const BENCH_HELP: &str = concat!(
    "Stages (each timed on every backend, back to back; set-up and data generation untimed):
  reduce FORM  on NxP      Engine::fisher_from_grads on synthetic::gradient_like(N, P)
  network FORM on WIDTHS   Engine::fisher on train::init_mlp(WIDTHS) and
                           train::classification_task(--samples) (categorical likelihood)
Each timed call includes the transfers to and from the device. Reported: the best and the
median of --repeat calls after --warmup untimed ones, GFLOP/s of the best call, and the
GPU speedup (CPU best / GPU best, > 1: the GPU is faster) of the same run.

Flop counts (R = gradient rows per sample: 1 empirical, classes true, K mc):
  reduce   GEMM-equivalent: full 2·N·P², diag and norms 2·N·P, gram 2·N²·P
  network  effective, of the explicit algorithm: 2·N·P forward + 2·N·R·P backward + the
           reduction of the N·R gradient rows (full 2·N·R·P², layer 2·N·R·Σ P_l², diag and
           norms 2·N·R·P, grads 0, kfac Σ_l 2·N·ã_l² + 2·N·R·out_l², ã_l = in_l + 1);
           diag, norms and kfac never form those rows, so their rate can exceed the GEMM rate
Peak memory is the process's peak resident set size (VmHWM, Linux only), over all stages.

The default run takes under a minute on two CPU cores with --backend gpu,cpu on a software GPU
(lavapipe; by default only a hardware GPU runs beside the CPU); try
--shapes 4096x512,4096x2048 --network 784,512,512,10 --samples 4096 on a real GPU.

",
    exit_codes_help!()
);

/// `fisher`: Fisher information matrices of neural networks, on any GPU (wgpu) or the CPU.
#[derive(Debug, Parser)]
#[command(
    name = "fisher",
    version,
    about = "Fisher information matrices of neural networks, on any GPU (wgpu) or the CPU",
    long_about = "Fisher information matrices of neural networks, on any GPU (wgpu) or the CPU.\n\n\
        `fisher compute` takes a PyTorch MLP (safetensors) and data (.npy) and computes its Fisher \
        information in any variant and form; try `fisher compute --synthetic-model 64,32,10 \
        --synthetic-samples 1797 --activation tanh --form full --out F.safetensors --verify`.\n\
        `fisher reduce` reduces per-sample gradients you already have; start with \
        `fisher reduce --synthetic 4096,512 --form full`, which compares the GPU and the CPU with an \
        f64 reference.\n\
        `fisher bench` times every form on the GPU and the CPU of this machine (seconds, GFLOP/s, \
        GPU speedup, peak memory).",
    after_help = exit_codes_help!(),
    arg_required_else_help = true
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// The tour, on built-in data: a trained MLP's Fisher on GPU and CPU (verified), its
    /// geometry, the action of its training; plots and files to continue from.
    #[command(after_help = DEMO_HELP)]
    Demo(super::demo::DemoArgs),
    /// List every GPU adapter wgpu can see, with its key limits, and which one Auto picks.
    #[command(after_help = exit_codes_help!())]
    Devices(DevicesArgs),
    /// The Fisher information of a PyTorch MLP on data: every variant and form.
    #[command(after_help = COMPUTE_HELP)]
    Compute(super::compute::ComputeArgs),
    /// Reduce per-sample gradients G (N samples × P parameters) to a Fisher form.
    #[command(after_help = REDUCE_HELP)]
    Reduce(ReduceArgs),
    /// Time every Fisher form on GPU and CPU: seconds, GFLOP/s, GPU speedup, peak memory.
    #[command(after_help = BENCH_HELP)]
    Bench(super::bench::BenchArgs),
    /// Train a seeded demo MLP and write a run directory of checkpoints and data.
    #[command(after_help = TRAIN_HELP)]
    Train(super::train::TrainArgs),
    /// The action, Fisher–Rao length, chord and efficiency of a training run.
    #[command(after_help = ACTION_HELP)]
    Action(super::action::ActionArgs),
    /// The spectrum and complexity measures of a network's Fisher: trace, top eigenvalues,
    /// log det, effective dimensions, Fisher–Rao norm, coupling, exact or with error bars.
    #[command(after_help = REPORT_HELP)]
    Report(super::fisher_report::ReportArgs),
    /// What the ONNX importer makes of a model: layers with per-sample output shapes, the
    /// parameters in θ order with P, and every node it cannot convert (then exit 2).
    #[command(after_help = exit_codes_help!())]
    Inspect(super::inspect::InspectArgs),
    /// Combine the partial files of `fisher compute --shard i/n` into the result file of
    /// the whole run (bit for bit the single run's on the CPU).
    #[command(after_help = exit_codes_help!())]
    Merge(super::merge::MergeArgs),
}


/// Flags of `fisher devices`.
#[derive(Debug, Args)]
pub struct DevicesArgs {
    /// Print one JSON line instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Where the compute runs, as spelled on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendArg {
    /// A hardware GPU adapter if one exists, else the CPU (software adapters only when named).
    Auto,
    /// A GPU adapter, or exit code 3.
    Gpu,
    /// The multi-threaded f32 CPU path.
    Cpu,
}

/// `--backend` and `--adapter`, shared by the commands that compute on a model (flattened;
/// validated by [`BackendArgs::resolve`]).
#[derive(Debug, Args)]
pub struct BackendArgs {
    /// Where to compute [default: auto].
    #[arg(long, value_enum)]
    pub backend: Option<BackendArg>,

    /// Use the GPU adapter whose name contains SUBSTR (case-insensitive; default: $FISHER_ADAPTER).
    #[arg(long, value_name = "SUBSTR")]
    pub adapter: Option<String>,
}

impl BackendArgs {
    /// The backend (auto unless given) and the adapter choice; see [`backend_choice`].
    pub fn resolve(&self) -> anyhow::Result<(Backend, GpuOptions)> {
        backend_choice(self.backend.unwrap_or(BackendArg::Auto), self.adapter.clone())
    }
}

/// The backend and the adapter choice; `--adapter` needs a GPU and a non-empty name.
pub fn backend_choice(backend: BackendArg, adapter: Option<String>) -> anyhow::Result<(Backend, GpuOptions)> {
    let backend = match backend {
        BackendArg::Auto => Backend::Auto,
        BackendArg::Gpu => Backend::Gpu,
        BackendArg::Cpu => Backend::Cpu,
    };
    if backend == Backend::Cpu && adapter.is_some() {
        return Err(usage("--adapter chooses a GPU adapter; it cannot be combined with --backend cpu"));
    }
    if adapter.as_deref() == Some("") {
        return Err(usage("--adapter needs a non-empty part of an adapter name (see `fisher devices`)"));
    }
    Ok((backend, GpuOptions { adapter, ..Default::default() }))
}

/// Raw flags of `fisher reduce`.
#[derive(Debug, Args)]
pub struct ReduceArgs {
    /// Per-sample gradients: a 2-D float32/float64 C-order .npy file (N×P).
    #[arg(long, value_name = "G.npy", conflicts_with = "synthetic", required_unless_present = "synthetic")]
    pub grads: Option<PathBuf>,

    /// Built-in gradient-like data with N samples and P parameters instead of a file.
    #[arg(long, value_name = "N,P", allow_hyphen_values = true)]
    pub synthetic: Option<String>,

    /// Seed of the synthetic data.
    #[arg(long, value_name = "S", requires = "synthetic")]
    pub seed: Option<u64>,

    /// full, diag, gram, norms or blocks:S1,S2,... (see below).
    #[arg(long, value_name = "FORM", default_value = "full")]
    pub form: String,

    /// Where to compute.
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    pub backend: BackendArg,

    /// Use the GPU adapter whose name contains SUBSTR (case-insensitive; default: $FISHER_ADAPTER).
    #[arg(long, value_name = "SUBSTR")]
    pub adapter: Option<String>,

    /// Output safetensors file (required with --grads). Written atomically: complete or absent.
    #[arg(long, value_name = "F.safetensors")]
    pub out: Option<PathBuf>,

    /// Also compute the f64 reference and report the disagreement; beyond the f32 tolerance
    /// the run fails (exit 1) and writes nothing. Loads all of G.
    #[arg(long)]
    pub verify: bool,

    /// Samples per streamed chunk of G (default: as many as fill 64 MiB).
    #[arg(long, value_name = "ROWS")]
    pub chunk_rows: Option<usize>,

    /// Replace an existing --out file (its permissions are kept).
    #[arg(long)]
    pub force: bool,

    /// Refuse, before reading G, a result (with --verify also G and the f64 reference)
    /// larger than this many GiB of host memory.
    #[arg(long, value_name = "GIB", default_value_t = 2.0)]
    pub max_result_gib: f64,

    /// Output style.
    #[command(flatten)]
    pub output: OutputArgs,
}

/// Where the gradients come from (the library's type).
pub use fisher_engine::pipeline::reduce::Input;

/// What to print on success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    /// The readable summary (for a --synthetic run without --out: the agreement table).
    Human,
    /// One JSON line.
    Json,
    /// Nothing.
    Quiet,
}

impl Report {
    /// From `--json` and `--quiet` (clap keeps them apart).
    pub fn from_flags(json: bool, quiet: bool) -> Report {
        if json {
            Report::Json
        } else if quiet {
            Report::Quiet
        } else {
            Report::Human
        }
    }
}

/// `--json` and `--quiet`, shared by the commands that print a report (flattened; read
/// with [`OutputArgs::report`]).
#[derive(Debug, Clone, Copy, Args)]
pub struct OutputArgs {
    /// Print one JSON line instead of the human summary.
    #[arg(long)]
    pub json: bool,

    /// Print nothing on success (errors are still reported).
    #[arg(long, conflicts_with = "json")]
    pub quiet: bool,
}

impl OutputArgs {
    /// What to print on success.
    pub fn report(self) -> Report {
        Report::from_flags(self.json, self.quiet)
    }
}

/// A validated `fisher reduce` invocation.
#[derive(Debug, Clone)]
pub struct ReduceConfig {
    /// The reduction (its form not yet checked against P, which only the input knows).
    pub request: ReduceRequest,
    /// Output style.
    pub report: Report,
}

impl ReduceConfig {
    /// Whether this is the built-in demonstration: synthetic data, nothing to write, a human
    /// reading the output. It then compares every available backend with the f64 reference.
    pub fn is_demo(&self) -> bool {
        matches!(self.request.input, Input::Synthetic { .. }) && self.request.out.is_none() && self.report == Report::Human
    }

    /// Validates raw flags.
    pub fn from_args(args: ReduceArgs) -> anyhow::Result<Self> {
        // Checked here too: clap does not enforce `requires` on this pair in every case.
        if args.seed.is_some() && args.synthetic.is_none() {
            return Err(usage("--seed only applies to --synthetic data"));
        }
        let input = match (args.grads, args.synthetic) {
            (Some(path), None) => Input::File(path),
            (None, Some(spec)) => parse_synthetic(&spec, args.seed.unwrap_or(0))?,
            // clap enforces exactly one of the two; keep a message rather than a panic anyway.
            _ => return Err(usage("give exactly one of --grads G.npy and --synthetic N,P")),
        };
        if matches!(input, Input::File(_)) && args.out.is_none() {
            return Err(usage(
                "--grads needs --out F.safetensors (only --synthetic runs may skip writing)",
            ));
        }
        let form = Form::parse(&args.form).map_err(|e| anyhow::Error::new(e).context("bad --form"))?;
        let (backend, gpu) = backend_choice(args.backend, args.adapter)?;
        if args.chunk_rows == Some(0) {
            return Err(usage("--chunk-rows must be at least 1"));
        }
        if !(args.max_result_gib.is_finite() && args.max_result_gib > 0.0) {
            return Err(usage(format!("--max-result-gib must be a positive number, not {}", args.max_result_gib)));
        }
        let request = ReduceRequest {
            input,
            form,
            backend,
            gpu,
            out: args.out,
            verify: args.verify,
            chunk_rows: args.chunk_rows,
            force: args.force,
            max_result_bytes: gib_to_bytes(args.max_result_gib),
        };
        Ok(ReduceConfig { request, report: args.output.report() })
    }
}

/// Parses `N,P` (positive integers, N×P within [`MAX_GENERATED_VALUES`]).
fn parse_synthetic(spec: &str, seed: u64) -> anyhow::Result<Input> {
    let bad = || usage(format!("bad --synthetic '{spec}': expected N,P with positive integers, e.g. 4096,512"));
    let (n, p) = spec.split_once(',').ok_or_else(bad)?;
    let parse = |s: &str| s.trim().parse::<usize>().ok().filter(|&v| v > 0);
    let (Some(samples), Some(params)) = (parse(n), parse(p)) else {
        return Err(bad());
    };
    if samples as u128 * params as u128 > MAX_GENERATED_VALUES {
        return Err(usage(format!(
            "--synthetic {samples},{params} would generate {} values in memory (limit {MAX_GENERATED_VALUES}); \
             write larger inputs to a .npy file and stream them with --grads",
            samples as u128 * params as u128
        )));
    }
    Ok(Input::Synthetic { samples, params, seed })
}

/// The likelihood, as spelled on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LikelihoodArg {
    /// Softmax over the outputs (logits); labels are class indices of any integer dtype.
    Categorical,
    /// Unit-variance Gaussian with the outputs as mean; labels are N×k float targets.
    Gaussian,
}

/// The Fisher variant, as spelled on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VariantArg {
    /// Gradients at the observed labels.
    Empirical,
    /// The exact expectation over the model's predictive distribution (closed form).
    True,
    /// Labels sampled from the predictive distribution (--mc-samples K, --seed S).
    Mc,
}

/// The form, as spelled on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FormArg {
    /// F (P×P).
    Full,
    /// diag(F) (P).
    Diag,
    /// One block per Linear layer.
    Layer,
    /// KFAC factors A and G per Linear layer.
    Kfac,
    /// The per-sample gradient rows G (N·R × P) with F = GᵀG/N.
    Grads,
    /// Per-sample squared gradient norms (N).
    Norms,
}

impl From<FormArg> for NetForm {
    fn from(form: FormArg) -> NetForm {
        match form {
            FormArg::Full => NetForm::Full,
            FormArg::Diag => NetForm::Diagonal,
            FormArg::Layer => NetForm::Layer,
            FormArg::Kfac => NetForm::Kfac,
            FormArg::Grads => NetForm::Grads,
            FormArg::Norms => NetForm::Norms,
        }
    }
}

/// `--likelihood`, `--variant`, `--mc-samples` and `--seed`, shared by `fisher compute`,
/// `fisher report` (through [`ModelArgs`]) and `fisher action` (flattened; validated by
/// [`VariantArgs::variant`] and [`VariantArgs::likelihood`]).
#[derive(Debug, Default, Args)]
pub struct VariantArgs {
    /// The likelihood the outputs define [default: categorical].
    #[arg(long, value_enum)]
    pub likelihood: Option<LikelihoodArg>,

    /// Which expectation over the labels [default: true].
    #[arg(long, value_enum)]
    pub variant: Option<VariantArg>,

    /// Labels drawn per input for --variant mc [default: 1].
    #[arg(long, value_name = "K")]
    pub mc_samples: Option<usize>,

    /// Seed of the label draws for --variant mc [default: 0].
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,
}

impl VariantArgs {
    /// The variant (true unless given); `--mc-samples` and `--seed` only with `--variant mc`.
    /// `seed_hint` is appended to the refusal of a `--seed` without it.
    pub fn variant(&self, seed_hint: &str) -> anyhow::Result<Variant> {
        if self.mc_samples == Some(0) {
            return Err(usage("--mc-samples must be at least 1"));
        }
        if let Some(k) = self.mc_samples.filter(|&k| k > fisher_engine::fisher::MAX_MC_SAMPLES) {
            return Err(usage(format!(
                "--mc-samples must be at most {} (the generator numbers draws with 32 bits), not {k}",
                fisher_engine::fisher::MAX_MC_SAMPLES
            )));
        }
        let variant = self.variant.unwrap_or(VariantArg::True);
        if variant != VariantArg::Mc {
            if self.mc_samples.is_some() {
                return Err(usage("--mc-samples only applies to --variant mc"));
            }
            if self.seed.is_some() {
                return Err(usage(format!("--seed only applies to --variant mc (the label draws){seed_hint}")));
            }
        }
        Ok(match variant {
            VariantArg::Empirical => Variant::Empirical,
            VariantArg::True => Variant::True,
            VariantArg::Mc => Variant::MonteCarlo { samples: self.mc_samples.unwrap_or(1), seed: self.seed.unwrap_or(0) },
        })
    }

    /// The likelihood (categorical unless `--likelihood gaussian`).
    pub fn likelihood(&self) -> Likelihood {
        match self.likelihood.unwrap_or(LikelihoodArg::Categorical) {
            LikelihoodArg::Categorical => Likelihood::Categorical,
            LikelihoodArg::Gaussian => Likelihood::Gaussian,
        }
    }
}

/// The model, data, variant and backend flags that `fisher compute` and `fisher report`
/// share (flattened into each command's flags; validated by [`ModelArgs::source`],
/// [`ModelArgs::variant`], [`ModelArgs::likelihood`] and [`ModelArgs::backend`]).
/// `--activation` is not here: `compute` requires it, `report` only with a model.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// The model: an nn.Sequential of Linear layers (and activations) saved with
    /// safetensors.torch.save_file(model.state_dict(), path).
    #[arg(long, value_name = "M.safetensors", conflicts_with = "synthetic_model")]
    pub weights: Option<PathBuf>,

    /// Instead of --weights: a network exported from PyTorch to ONNX with
    /// `torch.onnx.export(model.eval(), (x,), "M.onnx", dynamo=True, optimize=False)`
    /// (convolutions, norms, residual connections, embeddings; see the README). Its weights
    /// may sit beside it in `M.onnx.data`.
    #[arg(long, value_name = "M.onnx", conflicts_with_all = ["weights", "synthetic_model"])]
    pub model: Option<PathBuf>,

    /// Inputs: an N×d float32/float64 .npy file (with --model: N × the model's input
    /// shape, e.g. N×3×32×32, or integer token indices N×T).
    #[arg(long, value_name = "X.npy", conflicts_with = "synthetic_model")]
    pub inputs: Option<PathBuf>,

    /// Labels: class indices of shape (N,) in any integer dtype, e.g. int64, int32, uint8
    /// (categorical), or N×k float targets (gaussian).
    #[arg(long, value_name = "y.npy", conflicts_with = "synthetic_model")]
    pub labels: Option<PathBuf>,

    /// Likelihood and variant.
    #[command(flatten)]
    pub variant: VariantArgs,

    /// Backend and adapter.
    #[command(flatten)]
    pub backend: BackendArgs,

    /// Instead of --weights: a seeded He-initialized MLP with these layer widths (input,
    /// hidden..., output), e.g. 784,512,512,10; Linear layers at indices 0, 2, 4, ...
    #[arg(long, value_name = "WIDTHS")]
    pub synthetic_model: Option<String>,

    /// Instead of --inputs/--labels: N seeded standard-normal inputs with uniformly drawn
    /// class labels (categorical) or standard-normal targets (gaussian).
    #[arg(long, value_name = "N")]
    pub synthetic_samples: Option<usize>,

    /// Seed of the synthetic model and data [default: 0].
    #[arg(long, value_name = "S")]
    pub synthetic_seed: Option<u64>,
}

impl ModelArgs {
    /// Whether the model and data are to be built in memory (`--synthetic-model` or
    /// `--synthetic-samples` given).
    pub fn is_synthetic(&self) -> bool {
        self.synthetic_model.is_some() || self.synthetic_samples.is_some()
    }

    /// With `--model`: the ONNX file, the inputs and the labels (all three required).
    pub fn graph_source(&self) -> anyhow::Result<Option<(PathBuf, PathBuf, PathBuf)>> {
        let Some(model) = &self.model else { return Ok(None) };
        if self.synthetic_samples.is_some() || self.synthetic_seed.is_some() {
            return Err(usage("--model reads its data from --inputs and --labels; --synthetic-* do not apply"));
        }
        match (&self.inputs, &self.labels) {
            (Some(x), Some(y)) => Ok(Some((model.clone(), x.clone(), y.clone()))),
            _ => Err(usage("--model needs --inputs X.npy and --labels y.npy")),
        }
    }

    /// Files or a synthetic problem: exactly one of the two, complete. Each refusal names the
    /// flag at fault.
    pub fn source(&self) -> anyhow::Result<Source> {
        if self.model.is_some() {
            return Err(usage("--model (ONNX) is read by compute, report and action; this command takes --weights or --synthetic-model"));
        }
        if self.is_synthetic() {
            for (given, flag) in
                [(self.weights.is_some(), "--weights"), (self.inputs.is_some(), "--inputs"), (self.labels.is_some(), "--labels")]
            {
                if given {
                    return Err(usage(format!(
                        "{flag} cannot be combined with --synthetic-model/--synthetic-samples (which build the model and the data in memory)"
                    )));
                }
            }
            let (Some(widths), Some(samples)) = (&self.synthetic_model, self.synthetic_samples) else {
                return Err(usage("--synthetic-model WIDTHS and --synthetic-samples N go together"));
            };
            return parse_synthetic_model(widths, samples, self.synthetic_seed.unwrap_or(0));
        }
        if self.synthetic_seed.is_some() {
            return Err(usage("--synthetic-seed only applies to --synthetic-model runs"));
        }
        let missing: Vec<&str> = [
            (self.weights.is_none(), "--weights M.safetensors"),
            (self.inputs.is_none(), "--inputs X.npy"),
            (self.labels.is_none(), "--labels y.npy"),
        ]
        .into_iter()
        .filter_map(|(missing, flag)| missing.then_some(flag))
        .collect();
        if !missing.is_empty() {
            return Err(usage(format!(
                "missing {} (or build a model and data in memory with --synthetic-model WIDTHS --synthetic-samples N)",
                missing.join(", ")
            )));
        }
        Ok(Source::Files {
            weights: self.weights.clone().expect("checked"),
            inputs: self.inputs.clone().expect("checked"),
            labels: self.labels.clone().expect("checked"),
        })
    }

    /// The variant; `--mc-samples` and `--seed` only with `--variant mc`.
    pub fn variant(&self) -> anyhow::Result<Variant> {
        self.variant.variant("; the synthetic model's seed is --synthetic-seed")
    }

    /// The likelihood (categorical unless `--likelihood gaussian`).
    pub fn likelihood(&self) -> Likelihood {
        self.variant.likelihood()
    }

    /// The backend and the adapter choice; `--adapter` needs a GPU and a non-empty name.
    pub fn backend(&self) -> anyhow::Result<(Backend, GpuOptions)> {
        self.backend.resolve()
    }
}

/// Where the model and the data come from (the library's type).
pub use fisher_engine::pipeline::Source;

/// Comma-separated layer widths (input, hidden..., output), at least two and all positive,
/// as `--synthetic-model`, `--widths` and `--network` take them; `None` otherwise.
pub fn parse_widths(text: &str) -> Option<Vec<usize>> {
    let widths: Vec<usize> =
        text.split(',').map(|w| w.trim().parse::<usize>().ok().filter(|&w| w > 0)).collect::<Option<_>>()?;
    (widths.len() >= 2).then_some(widths)
}

/// Parses `--synthetic-model` widths and checks the sizes.
fn parse_synthetic_model(spec: &str, samples: usize, seed: u64) -> anyhow::Result<Source> {
    let bad = || {
        usage(format!(
            "bad --synthetic-model '{spec}': expected at least two positive layer widths (input,...,output), e.g. 784,512,512,10"
        ))
    };
    let widths = parse_widths(spec).ok_or_else(bad)?;
    if samples == 0 {
        return Err(usage("--synthetic-samples must be at least 1"));
    }
    let params: u128 = widths.windows(2).map(|w| w[1] as u128 * (w[0] as u128 + 1)).sum();
    let inputs = samples as u128 * widths[0] as u128;
    if params > MAX_GENERATED_VALUES || inputs > MAX_GENERATED_VALUES {
        return Err(usage(format!(
            "--synthetic-model {spec} --synthetic-samples {samples} would generate {params} parameters and {inputs} \
             input values in memory (limit {MAX_GENERATED_VALUES} each)"
        )));
    }
    Ok(Source::Synthetic { widths, samples, seed })
}

/// Loads the model and the data from files, or builds the synthetic problem, and checks them
/// against each other (the files at fault are named).
pub fn load_model_and_data(
    source: &Source,
    activation: &ActivationSpec,
    likelihood: Likelihood,
) -> anyhow::Result<(Mlp, Box<dyn DataSource>)> {
    fisher_engine::pipeline::load_problem(source, activation, likelihood).map_err(run_error)
}


/// `--max-result-gib` in bytes (validated positive and finite by the caller; saturates).
pub fn gib_to_bytes(gib: f64) -> u128 {
    (gib * (1u64 << 30) as f64) as u128
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_spec() {
        assert_eq!(parse_synthetic("4096,512", 3).unwrap(), Input::Synthetic { samples: 4096, params: 512, seed: 3 });
        for bad in ["4096", "0,5", "5,0", "a,b", "5,-1", "1,2,3", "100000,100000"] {
            assert!(parse_synthetic(bad, 0).is_err(), "{bad}");
        }
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn synthetic_widths() {
        assert_eq!(
            parse_synthetic_model("784,512,512,10", 4096, 3).unwrap(),
            Source::Synthetic { widths: vec![784, 512, 512, 10], samples: 4096, seed: 3 }
        );
        for bad in ["784", "0,5", "5,0", "a,b", "5,-1", "", "3,,2"] {
            assert!(parse_synthetic_model(bad, 10, 0).is_err(), "{bad}");
        }
        assert!(parse_synthetic_model("4,2", 0, 0).is_err());
        assert!(parse_synthetic_model("100000,100000", 1, 0).is_err());
    }
}
