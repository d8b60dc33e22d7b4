//! `fisher demo`: the whole pipeline on an embedded default, computed now and verified.
//!
//! Flow: flags → [`DemoConfig`] → the output directory checked (it may hold only an earlier
//! demo's files) → device (the requested one, and the CPU beside a GPU) → the sections, in
//! order, each feeding the next:
//!
//! 1. reduction: synthetic per-sample gradients reduced to F = GᵀG/N on every path and
//!    compared with one f64 reference ([`fisher_engine::compare::compare_paths`], the body of
//!    `fisher reduce --synthetic`);
//! 2. training: `fisher train`'s default run, in memory ([`super::train::train`]);
//! 3. network Fisher: the true Fisher of the trained model as diag, kfac and full on every
//!    path, each compared with the f64 reference (‖Δ‖/‖ref‖ ≤ 10⁻⁵, `fisher compute
//!    --verify`'s contract), and the GPU with the CPU;
//! 4. geometry: every exact measure of the full F ([`analysis::measures_exact`]), and the
//!    top eigenvalues again from the implicit F·v alone ([`analysis::lanczos_top_k`] on an
//!    [`FnOperator`] around [`Engine::fisher_vector_product`]), compared with the exact ones;
//! 5. the action along the training run ([`action::measure`]);
//! 6. the files: the run directory, fisher.safetensors, the two plots and summary.json, each
//!    written atomically (summary.json last).
//!
//! Every verification becomes a [`Check`] with its tolerance; the run exits 1 when one fails
//! (after printing and writing everything, so that the failure can be inspected).

use std::cell::Cell;
use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::{Args, FromArgMatches};
use fisher_engine::analysis::action::{self, ActionReport};
use fisher_engine::analysis::{
    self, ExplicitFisher, FnOperator, LanczosOptions, LanczosResult, MeasureOptions, Measures, ParameterLayout,
    SpectralDensity, Spectrum,
};
use fisher_engine::backend::gpu::GpuOptions;
use fisher_engine::device::{self, AdapterInfo, DeviceRequest};
use fisher_engine::io::{self, fisher_file::{self, FisherFile}};
use fisher_engine::model::{Dataset, Mlp};
use fisher_engine::fisher::{rows_per_sample, NetFisher, NetForm, Variant};
use fisher_engine::output::plot::{self, Histogram};
use fisher_engine::output::progress::Progress;
use fisher_engine::model::train::TrainRun;
use fisher_engine::{Agreement, Backend, Engine, FisherError, Form};
use ndarray::Array1;
use serde_json::{json, Value};

use super::args::{backend_choice, BackendArg, Report};
use fisher_engine::verify::{Contract, Verdict, NETWORK_FROBENIUS_REL};
use super::exit::usage;
use fisher_engine::compare::{compare_paths, Comparison as ReduceDemo};
use super::format::{sci_short, seconds, shell_word, table};
use super::train::{self as train_cmd, TrainConfig};

/// What `summary.json` says it is; an output directory is an earlier demo's only when its
/// summary.json says this.
const FORMAT: &str = "fisher-engine demo";
/// The files the demo writes into its directory, besides the run directory [`RUN_DIR`].
const FILES: [&str; 4] = ["spectrum.png", "action.png", "fisher.safetensors", "summary.json"];
/// The training run's directory inside the output directory (a directory of its own, so
/// that `fisher action --checkpoints DIR/run` finds only the checkpoints).
const RUN_DIR: &str = "run";
/// The seed of the synthetic gradients of the reduction.
const REDUCE_SEED: u64 = 0;
/// The variant of every network Fisher: the true Fisher (the exact expectation over the
/// model's predictive distribution).
const VARIANT: Variant = Variant::True;
/// How many of the largest eigenvalues Lanczos finds from F·v alone.
const LANCZOS_K: usize = 5;
/// How many of the largest eigenvalues the measures list.
const TOP: usize = 10;
/// Segments of the chord's midpoint rule in the action.
const SEGMENTS: usize = 8;
/// Bins (log-spaced) and Gaussian smoothing (decades) of the spectral density plotted.
const DENSITY_BINS: usize = 60;
const DENSITY_SMOOTHING: f64 = 0.08;
/// The scale α of d_eff(α) and the damping λ of log det(F + λI) and the condition number,
/// relative to λ_max: eigenvalues more than four decades below the largest count as flat
/// directions.
const SCALE_REL: f64 = 1e-4;
/// Lanczos' tolerance on the relative residual (the eigenvalue error is far smaller:
/// quadratic in the residual).
const LANCZOS_TOL: f64 = 1e-8;

/// Raw flags of `fisher demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Where to compute: auto (a hardware GPU adapter if one exists, else the CPU), gpu (any
    /// adapter, software ones included) or cpu. Beside a
    /// GPU, the CPU path runs too, for comparison.
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    pub backend: BackendArg,

    /// Use the GPU adapter whose name contains SUBSTR (case-insensitive; default: $FISHER_ADAPTER).
    #[arg(long, value_name = "SUBSTR")]
    pub adapter: Option<String>,

    /// The directory to write (created; it may already hold an earlier demo's files, which
    /// are replaced, but nothing else).
    #[arg(long, value_name = "DIR", default_value = "fisher-demo")]
    pub out_dir: PathBuf,

    /// Shrink every size (a 6-12-12-3 MLP on 256 samples, 512×64 gradients): the same steps
    /// and checks in a few seconds, for tests and a first try on a slow machine.
    #[arg(long)]
    pub quick: bool,

    /// Print one JSON line (the content of summary.json) instead of the report.
    #[arg(long)]
    pub json: bool,

    /// Print only the final verdict (errors are still reported).
    #[arg(long, conflicts_with = "json")]
    pub quiet: bool,
}

/// The sizes of one demo.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// N × P of the synthetic gradients.
    pub reduce: (usize, usize),
    /// `fisher train` flags on top of its defaults (none: the default run).
    pub train: &'static [&'static str],
}

/// The default demo: the reduction at the size `fisher reduce --help` suggests, and `fisher
/// train`'s default run (a 16-32-32-4 tanh MLP on 2048 samples, 400 steps, 25 checkpoints).
const DEFAULT_SIZES: Sizes = Sizes { reduce: (4096, 512), train: &[] };
/// `--quick`.
const QUICK_SIZES: Sizes = Sizes {
    reduce: (512, 64),
    train: &["--widths", "6,12,12,3", "--samples", "256", "--steps", "60", "--checkpoints", "7"],
};

/// A validated `fisher demo` invocation.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// Requested compute path.
    pub backend: Backend,
    /// Adapter choice.
    pub gpu: GpuOptions,
    /// The output directory.
    pub out_dir: PathBuf,
    /// `--quick`.
    pub quick: bool,
    /// The sizes.
    pub sizes: Sizes,
    /// The training run (its `out_dir` is `out_dir/run`).
    pub train: TrainConfig,
    /// Output style.
    pub report: Report,
}

impl DemoConfig {
    /// Validates raw flags.
    pub fn from_args(args: DemoArgs) -> anyhow::Result<Self> {
        let (backend, gpu) = backend_choice(args.backend, args.adapter)?;
        if args.out_dir.as_os_str().is_empty() {
            return Err(usage("--out-dir needs a directory name"));
        }
        let sizes = if args.quick { QUICK_SIZES } else { DEFAULT_SIZES };
        let report = Report::from_flags(args.json, args.quiet);
        Ok(DemoConfig {
            backend,
            gpu,
            train: train_config(&args.out_dir.join(RUN_DIR), sizes.train)?,
            out_dir: args.out_dir,
            quick: args.quick,
            sizes,
            report,
        })
    }
}

/// `fisher train`'s configuration for `flags` on top of its defaults: parsed by its own flag
/// definitions, so that the demo's run is exactly the one `fisher train` makes.
fn train_config(run_dir: &Path, flags: &[&str]) -> anyhow::Result<TrainConfig> {
    use clap::Args as _;
    let mut argv: Vec<OsString> = vec!["train".into(), "--out-dir".into(), run_dir.as_os_str().to_owned(), "--force".into()];
    argv.extend(flags.iter().map(OsString::from));
    let matches = train_cmd::TrainArgs::augment_args(clap::Command::new("train"))
        .try_get_matches_from(argv)
        .context("the demo's training flags")?;
    let args = train_cmd::TrainArgs::from_arg_matches(&matches).context("the demo's training flags")?;
    TrainConfig::from_args(args)
}

// ---------------------------------------------------------------------------------------
// The output directory

fn io_error(path: &Path, message: impl Into<String>) -> FisherError {
    FisherError::Io { path: path.display().to_string(), message: message.into() }
}

/// A temporary file an interrupted run may leave (atomic writes, the run's staging).
fn is_leftover(name: &str) -> bool {
    name.starts_with(".fisher-") || name.starts_with(&format!(".{RUN_DIR}.fisher-train-"))
}

/// A file `fisher train` writes into a run directory.
fn is_run_file(name: &str) -> bool {
    matches!(name, "X.npy" | "y.npy" | "run.json")
        || (name.starts_with("ckpt_") && name.ends_with(".safetensors"))
        || name.starts_with(".fisher-")
}

fn names_in(dir: &Path) -> anyhow::Result<Vec<String>> {
    let entries = std::fs::read_dir(dir).map_err(|e| io_error(dir, format!("cannot read: {e}")))?;
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| io_error(dir, format!("cannot read: {e}")))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// Refuses, before anything is computed, an output directory the demo must not write: one
/// that is a file, lies under a file, or holds anything but an earlier demo's output (its
/// summary.json says [`FORMAT`], and every entry is a demo file).
fn check_out_dir(dir: &Path) -> anyhow::Result<()> {
    if !dir.exists() {
        if let Some(blocker) = dir.ancestors().skip(1).find(|a| !a.as_os_str().is_empty() && a.exists()) {
            if !blocker.is_dir() {
                return Err(io_error(blocker, format!("is not a directory (cannot create {})", dir.display())).into());
            }
        }
        return Ok(());
    }
    if !dir.is_dir() {
        return Err(io_error(dir, "exists and is not a directory; --out-dir names the directory the demo writes").into());
    }
    let names = names_in(dir)?;
    if names.is_empty() {
        return Ok(());
    }
    let mut foreign: Vec<String> =
        names.iter().filter(|n| !FILES.contains(&n.as_str()) && *n != RUN_DIR && !is_leftover(n)).cloned().collect();
    let run = dir.join(RUN_DIR);
    if run.exists() {
        if run.is_dir() {
            foreign.extend(names_in(&run)?.into_iter().filter(|n| !is_run_file(n)).map(|n| format!("{RUN_DIR}/{n}")));
        } else {
            foreign.push(RUN_DIR.to_string());
        }
    }
    let summary = dir.join("summary.json");
    let marked = std::fs::read_to_string(&summary)
        .ok()
        .and_then(|text| serde_json::from_str::<Value>(&text).ok())
        .is_some_and(|v| v["format"] == FORMAT);
    if !foreign.is_empty() || !marked {
        let what = if foreign.is_empty() {
            "files that are not an earlier demo's (no demo summary.json)".to_string()
        } else {
            let shown: Vec<&str> = foreign.iter().take(3).map(String::as_str).collect();
            format!("files the demo did not write ({}{})", shown.join(", "), if foreign.len() > 3 { ", …" } else { "" })
        };
        return Err(usage(format!(
            "{} holds {what}; choose another --out-dir (the demo replaces only its own output)",
            dir.display()
        )));
    }
    Ok(())
}

/// Writes `text` to `path` atomically (a temporary file beside it, renamed into place).
fn write_text_atomic(path: &Path, text: &str) -> anyhow::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let fail = |e: std::io::Error| io_error(path, format!("cannot write: {e}"));
    let mut temp = io::output_temp_file(dir, ".json").map_err(fail)?;
    temp.write_all(text.as_bytes()).map_err(fail)?;
    temp.as_file().sync_all().map_err(fail)?;
    temp.persist(path).map_err(|e| fail(e.error))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Checks

/// One verification: a measured disagreement against its documented bound.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    /// What was compared.
    pub name: String,
    /// The measure of disagreement (`metric`).
    pub value: f64,
    /// The bound it must not exceed.
    pub tolerance: f64,
    /// How `value` is measured.
    pub metric: &'static str,
    /// value ≤ tolerance (a NaN fails).
    pub passed: bool,
}

impl Check {
    /// The check of a verdict: its measure against its bound, passed as judged.
    fn of(name: impl Into<String>, verdict: &Verdict) -> Self {
        Check {
            name: name.into(),
            value: verdict.measure(),
            tolerance: verdict.bound,
            metric: verdict.contract.metric(),
            passed: verdict.passed,
        }
    }

    fn new(name: impl Into<String>, metric: &'static str, value: f64, tolerance: f64) -> Self {
        Check { name: name.into(), value, tolerance, metric, passed: value <= tolerance }
    }
}

fn mark(passed: bool) -> &'static str {
    if passed {
        "✓"
    } else {
        "✗"
    }
}

/// `gpu` or `cpu`: the short name of an engine's path.
fn path_name(engine: &Engine) -> &'static str {
    if engine.is_gpu() {
        "gpu"
    } else {
        "cpu"
    }
}

// ---------------------------------------------------------------------------------------
// Sections

/// The devices: the requested engine first, then the CPU beside a GPU.
struct Devices {
    engines: Vec<(f64, Engine)>,
    adapter: Option<AdapterInfo>,
    /// Why a path is missing.
    note: Option<String>,
}

fn open_devices(cfg: &DemoConfig) -> anyhow::Result<Devices> {
    let start = Instant::now();
    let device = device::open(&DeviceRequest::from_env(cfg.backend, cfg.gpu.clone())?)?;
    let setup = start.elapsed().as_secs_f64();
    let note = match (&device.fallback, cfg.backend) {
        (Some(why), _) => Some(format!("{why}: the CPU path only")),
        (None, Backend::Cpu) => Some("--backend cpu: the GPU path was not run".into()),
        (None, _) => None,
    };
    let mut engines = vec![(setup, device.engine)];
    if engines[0].1.is_gpu() {
        engines.push((0.0, Engine::cpu()));
    }
    Ok(Devices { engines, adapter: device.adapter, note })
}

/// One network form on one path.
#[derive(Debug, Clone, serde::Serialize)]
struct FormRun {
    path: &'static str,
    backend: String,
    seconds: f64,
    trace: f64,
    #[serde(flatten)]
    agreement: Agreement,
    tolerance_frobenius_rel: f64,
    passed: bool,
}

/// One network form on every path, against one reference.
#[derive(Debug, Clone, serde::Serialize)]
struct FormReport {
    form: &'static str,
    runs: Vec<FormRun>,
    reference_seconds: f64,
    reference_trace: f64,
    /// GPU result against the CPU result, when both ran.
    gpu_vs_cpu: Option<Agreement>,
}

/// The network Fisher section: every form on every path, checked; returns the primary
/// path's full F.
fn network_fisher(
    engines: &[(f64, Engine)],
    mlp: &Mlp,
    data: &Dataset,
    show: bool,
    checks: &mut Vec<Check>,
) -> anyhow::Result<(Vec<FormReport>, NetFisher)> {
    let forms = [NetForm::Diagonal, NetForm::Kfac, NetForm::Full];
    let progress = Progress::new("network Fisher (diag, kfac, full; f64 reference)", forms.len() * (engines.len() + 1), show);
    let mut done = 0;
    let mut reports = Vec::new();
    let mut primary_full = None;
    for form in forms {
        let mut results = Vec::new();
        for (_, engine) in engines {
            let start = Instant::now();
            let result = engine
                .fisher(mlp, data, VARIANT, form)
                .with_context(|| format!("the {} Fisher on {}", form.name(), engine.device_info()))?;
            results.push((engine, start.elapsed().as_secs_f64(), result));
            done += 1;
            progress.set(done, forms.len() * (engines.len() + 1));
        }
        let start = Instant::now();
        let reference = fisher_engine::reference::network::fisher(mlp, data, data.likelihood(), VARIANT, form)
            .with_context(|| format!("the f64 reference of the {} Fisher", form.name()))?;
        let reference_seconds = start.elapsed().as_secs_f64();
        done += 1;
        progress.set(done, forms.len() * (engines.len() + 1));

        let mut runs = Vec::new();
        for (engine, seconds, result) in &results {
            let verification = Verdict::judge(result.agreement(&reference)?, Contract::Network);
            checks.push(Check::of(format!("{} Fisher on {} vs f64", form.name(), path_name(engine)), &verification));
            runs.push(FormRun {
                path: path_name(engine),
                backend: engine.device_info(),
                seconds: *seconds,
                trace: result.trace(),
                agreement: verification.agreement,
                tolerance_frobenius_rel: verification.bound,
                passed: verification.passed,
            });
        }
        let gpu_vs_cpu = match (results.iter().find(|r| r.0.is_gpu()), results.iter().find(|r| !r.0.is_gpu())) {
            (Some(gpu), Some(cpu)) if results.len() > 1 => {
                let a = gpu.2.agreement(&cpu.2)?;
                let verdict = Verdict::judge_pair(a, Contract::Network);
                checks.push(Check { metric: "‖Δ‖/‖cpu‖", ..Check::of(format!("{} Fisher gpu vs cpu", form.name()), &verdict) });
                Some(a)
            }
            _ => None,
        };
        reports.push(FormReport {
            form: form.name(),
            runs,
            reference_seconds,
            reference_trace: reference.trace(),
            gpu_vs_cpu,
        });
        if form == NetForm::Full {
            primary_full = results.into_iter().next().map(|r| r.2);
        }
    }
    progress.finish();
    let full = primary_full.ok_or_else(|| anyhow::anyhow!("no full Fisher was computed"))?;
    Ok((reports, full))
}

/// The geometry section's results.
#[derive(Debug, Clone, serde::Serialize)]
struct Geometry {
    measures: Measures,
    /// All eigenvalues, descending (for the plot; not in the summary).
    #[serde(skip)]
    spectrum: Spectrum,
    /// Seconds of the eigendecomposition and the measures.
    seconds: f64,
    /// Zero eigenvalues (within the eigensolver's error of 0).
    zero_eigenvalues: usize,
    /// ‖F − F_ref‖_F, measured: by Weyl's inequality every eigenvalue of the computed F is
    /// within this of the f64 reference's.
    eigenvalue_error_bound: f64,
    /// Eigenvalues above that bound (the rest are within F's f32 error of 0).
    resolved_eigenvalues: usize,
    implicit: Implicit,
}

/// The top eigenvalues from F·v alone.
#[derive(Debug, Clone, serde::Serialize)]
struct Implicit {
    backend: String,
    lanczos: LanczosResult,
    /// The exact eigenvalues they are compared with.
    exact: Vec<f64>,
    /// max_i |λᵢ(Lanczos) − λᵢ(exact)| / λ₁.
    max_rel_diff: f64,
    tolerance: f64,
    seconds: f64,
}

fn geometry(
    engine: &Engine,
    mlp: &Mlp,
    data: &Dataset,
    full: &NetFisher,
    frobenius_rel: f64,
    show: bool,
    checks: &mut Vec<Check>,
) -> anyhow::Result<Geometry> {
    let start = Instant::now();
    let layout = ParameterLayout::from_mlp(mlp)?;
    let fisher = ExplicitFisher::from_net(full, Some(&layout))?;
    let spectrum = fisher.spectrum().context("the spectrum of F")?;
    let lambda_max = spectrum.max();
    let scale = if lambda_max > 0.0 { SCALE_REL * lambda_max } else { SCALE_REL };
    let theta: Vec<f64> = mlp.parameters().iter().map(|&x| f64::from(x)).collect();
    let options = MeasureOptions {
        alpha: scale,
        damping: scale,
        top: TOP,
        samples: Some(data.len()),
        theta: Some(&theta),
        layout: Some(&layout),
        ..Default::default()
    };
    let measures = analysis::measures_exact(&fisher, &options).context("the measures of F")?;
    let seconds = start.elapsed().as_secs_f64();
    let zero_eigenvalues =
        spectrum.dim - spectrum.eigenvalues.len() + spectrum.eigenvalues.iter().filter(|&&v| v == 0.0).count();
    let eigenvalue_error_bound = frobenius_rel * measures.frobenius;
    let resolved_eigenvalues = spectrum.eigenvalues.iter().filter(|&&v| v > eigenvalue_error_bound).count();

    // The same top eigenvalues from the implicit F·v: no F is formed, only products.
    let start = Instant::now();
    let options = LanczosOptions { tol: LANCZOS_TOL, ..LanczosOptions::top(LANCZOS_K) };
    // How many products Lanczos needs is known only when it converges: the bar runs over its
    // first basis (max(2k + 10, 30) products, usually enough) and grows past it if not.
    let first_basis = (2 * LANCZOS_K + 10).max(30);
    let progress = Progress::new("Lanczos on the implicit F·v (products until converged)", first_basis, show);
    let products = Cell::new(0usize);
    let p = mlp.num_params();
    let operator = FnOperator::new(p, |v: &[f64]| {
        let direction: Array1<f32> = v.iter().map(|&x| x as f32).collect();
        let fvp = engine.fisher_vector_product(mlp, data, VARIANT, direction.view())?;
        products.set(products.get() + 1);
        progress.set(products.get(), first_basis.max(products.get() + 1));
        let product = fvp.product.ok_or_else(|| FisherError::InvalidInput("F·v returned no product".into()))?;
        Ok(product.iter().map(|&x| f64::from(x)).collect())
    })
    .with_trace(measures.trace);
    let lanczos = analysis::lanczos_top_k(&operator, &options).context("Lanczos on the implicit F·v")?;
    progress.finish();
    let exact: Vec<f64> = (0..lanczos.values.len()).map(|i| spectrum.eigenvalues.get(i).copied().unwrap_or(0.0)).collect();
    let max_diff = lanczos.values.iter().zip(&exact).map(|(a, b)| (a - b).abs()).fold(0.0f64, |m, d| if d.is_nan() { d } else { m.max(d) });
    let max_rel_diff = if lambda_max > 0.0 { max_diff / lambda_max } else { max_diff };
    // Both sides are f32 computations of one F: the F·v products are within 10⁻⁵·‖F v‖ of
    // the exact ones (so λᵢ within 10⁻⁵·λ₁), the stored F within 10⁻⁵·‖F‖_F; Lanczos adds
    // at most its tolerance times λᵢ.
    let frobenius_over_max = if lambda_max > 0.0 { measures.frobenius / lambda_max } else { 1.0 };
    let tolerance = NETWORK_FROBENIUS_REL * (1.0 + frobenius_over_max) + LANCZOS_TOL;
    let mut check = Check::new(
        format!("top-{} eigenvalues, implicit F·v ({}) vs exact", lanczos.values.len(), path_name(engine)),
        "max|Δλ|/λ₁",
        max_rel_diff,
        tolerance,
    );
    check.passed &= lanczos.converged;
    checks.push(check);
    Ok(Geometry {
        measures,
        spectrum,
        seconds,
        zero_eigenvalues,
        eigenvalue_error_bound,
        resolved_eigenvalues,
        implicit: Implicit {
            backend: engine.device_info(),
            lanczos,
            exact,
            max_rel_diff,
            tolerance,
            seconds: start.elapsed().as_secs_f64(),
        },
    })
}

// ---------------------------------------------------------------------------------------
// The run

/// Everything the demo measured.
#[derive(Debug)]
pub struct Outcome {
    summary: Value,
    checks: Vec<Check>,
    human: String,
}

impl Outcome {
    /// Whether every check passed.
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.passed)
    }

    /// The failed checks' names.
    pub fn failed(&self) -> Vec<&str> {
        self.checks.iter().filter(|c| !c.passed).map(|c| c.name.as_str()).collect()
    }

    /// The final verdict line.
    pub fn verdict(&self) -> String {
        let seconds = self.summary["seconds"]["total"].as_f64().unwrap_or(0.0);
        if self.passed() {
            format!("✓ all {} checks passed ({seconds:.1} s)", self.checks.len())
        } else {
            let failed = self.failed();
            format!("✗ {} of {} checks failed: {} ({seconds:.1} s)", failed.len(), self.checks.len(), failed.join("; "))
        }
    }

    /// The readable report (ending with the verdict).
    pub fn human(&self) -> String {
        format!("{}\n\n{}", self.human, self.verdict())
    }

    /// One JSON line: summary.json's content.
    pub fn json_line(&self) -> String {
        self.summary.to_string()
    }
}

/// Runs `fisher demo` and prints its report; errors (exit 1) when a check failed.
pub fn main(cfg: &DemoConfig) -> anyhow::Result<()> {
    let outcome = run(cfg)?;
    match cfg.report {
        Report::Human => println!("{}", outcome.human()),
        Report::Json => println!("{}", outcome.json_line()),
        Report::Quiet => println!("{}", outcome.verdict()),
    }
    if !outcome.passed() {
        let failed = outcome.failed();
        anyhow::bail!(
            "{} of {} verifications failed ({}); the results are in {}",
            failed.len(),
            outcome.checks.len(),
            failed.join("; "),
            cfg.out_dir.display()
        );
    }
    Ok(())
}

/// Runs every section and writes the files.
pub fn run(cfg: &DemoConfig) -> anyhow::Result<Outcome> {
    let total = Instant::now();
    check_out_dir(&cfg.out_dir)?;
    let show = cfg.report == Report::Human;
    let mut checks = Vec::new();

    // Device.
    let devices = open_devices(cfg)?;
    let primary = &devices.engines[0].1;

    // 1. Reduction.
    let (n, p) = cfg.sizes.reduce;
    let start = Instant::now();
    let g = fisher_engine::synthetic::gradient_like(n, p, REDUCE_SEED);
    let generate = start.elapsed().as_secs_f64();
    let engines: Vec<(f64, &Engine)> = devices.engines.iter().map(|(s, e)| (*s, e)).collect();
    let steps = engines.len() + 1;
    let progress = Progress::new("reduction F = GᵀG/N (every path; f64 reference)", steps, show);
    let mut step = 0;
    let reduction = compare_paths(&g, REDUCE_SEED, generate, &Form::Full, &engines, devices.note.clone(), |_| {
        progress.set(step, steps);
        step += 1;
    })
    .context("the reduction")?;
    progress.finish();
    drop(g);
    for r in &reduction.runs {
        let name = format!("reduction on {} vs f64", if r.gpu { "gpu" } else { "cpu" });
        checks.push(Check { metric: "max|Δ|/max|F|", ..Check::of(name, &r.verification) });
    }
    if let Some(a) = &reduction.gpu_vs_cpu {
        let verdict = Verdict::judge_pair(*a, reduction.runs[0].verification.contract);
        checks.push(Check { metric: "max|Δ|/max|F|", ..Check::of("reduction gpu vs cpu", &verdict) });
    }

    // 2. Training.
    let (data, trained, train_seconds) = train_cmd::train(&cfg.train).context("training")?;
    let mlp = trained.checkpoints.last().cloned().ok_or_else(|| anyhow::anyhow!("training kept no checkpoint"))?;

    // 3. Network Fisher.
    let (forms, full) = network_fisher(&devices.engines, &mlp, &data, show, &mut checks)?;

    // 4. Geometry.
    // The primary path's ‖Δ‖/‖ref‖ of the full F bounds the error of its eigenvalues.
    let full_error = forms.iter().find(|f| f.form == "full").map_or(f64::NAN, |f| f.runs[0].agreement.frobenius_rel);
    let geometry = geometry(primary, &mlp, &data, &full, full_error, show, &mut checks)?;

    // 5. Action.
    let start = Instant::now();
    let progress = Progress::new("action along training (quadratic forms)", trained.checkpoints.len() - 1 + SEGMENTS, show);
    let action = action::measure(primary, &trained.checkpoints, &data, VARIANT, SEGMENTS, &mut progress.callback())
        .context("the action along training")?;
    progress.finish();
    let action_seconds = start.elapsed().as_secs_f64();

    // 6. Files.
    let start = Instant::now();
    let files = write_files(cfg, primary, &mlp, &data, trained, train_seconds, full, &geometry, &action)?;
    let write_seconds = start.elapsed().as_secs_f64();

    let commands = follow_up_commands(cfg, &files);
    let total_seconds = total.elapsed().as_secs_f64();
    let seconds = json!({
        "setup": devices.engines[0].0,
        "train": train_seconds,
        "geometry": geometry.seconds,
        "lanczos": geometry.implicit.seconds,
        "action": action_seconds,
        "write": write_seconds,
        "total": total_seconds,
    });
    let summary = summary_json(
        cfg, &devices, &reduction, &files, &forms, &geometry, &action, &checks, &commands, seconds, &mlp, &data,
    );
    // Written last: a directory with a summary.json holds a complete demo.
    let text = serde_json::to_string_pretty(&summary).context("encoding summary.json")? + "\n";
    write_text_atomic(&cfg.out_dir.join("summary.json"), &text)?;

    let human = human(cfg, &devices, &reduction, &files, &forms, &geometry, &action, &commands, &mlp);
    Ok(Outcome { summary, checks, human })
}

/// What was written.
struct Files {
    dir: PathBuf,
    run: train_cmd::Outcome,
    fisher: PathBuf,
    spectrum_plot: PathBuf,
    action_plot: PathBuf,
    summary: PathBuf,
}

#[allow(clippy::too_many_arguments)]
fn write_files(
    cfg: &DemoConfig,
    engine: &Engine,
    mlp: &Mlp,
    data: &Dataset,
    trained: TrainRun,
    train_seconds: f64,
    full: NetFisher,
    geometry: &Geometry,
    action: &ActionReport,
) -> anyhow::Result<Files> {
    let dir = &cfg.out_dir;
    // Checked again: the directory may have changed while the demo computed.
    check_out_dir(dir)?;
    std::fs::create_dir_all(dir).map_err(|e| io_error(dir, format!("cannot create: {e}")))?;

    let replace = train_cmd::check_out_dir(&cfg.train)?;
    let run = train_cmd::write(&cfg.train, data, trained, replace, train_seconds).context("writing the training run")?;

    let fisher = dir.join("fisher.safetensors");
    let file = FisherFile::of_network(full, mlp, data.len(), data.likelihood(), VARIANT, &engine.device_info());
    fisher_file::write(&fisher, &file)?;

    let spectrum_plot = dir.join("spectrum.png");
    let spectrum = &geometry.spectrum;
    let density = SpectralDensity::from_spectrum(spectrum, DENSITY_BINS, None, DENSITY_SMOOTHING)?;
    let histogram = Histogram { edges: density.edges, mass: density.mass };
    let mut eigenvalues = spectrum.eigenvalues.clone();
    eigenvalues.resize(spectrum.dim, 0.0);
    let title = format!("Fisher spectrum of the trained {} (true Fisher, P = {})", mlp.architecture(), mlp.num_params());
    plot::spectrum_plot(&spectrum_plot, &eigenvalues, Some(&histogram), &title)?;

    let action_plot = dir.join("action.png");
    let title = format!("Action along training: {} checkpoints of the {}", action.checkpoints, mlp.architecture());
    plot::action_plot(&action_plot, action, &title)?;

    Ok(Files { dir: dir.clone(), run, fisher, spectrum_plot, action_plot, summary: dir.join("summary.json") })
}

/// `16-32-32-4 tanh`.
fn path_text(path: &Path) -> String {
    shell_word(&path.display().to_string())
}

/// The commands that continue from the demo's files.
fn follow_up_commands(cfg: &DemoConfig, files: &Files) -> Vec<String> {
    let run = &files.run.out_dir;
    let last = run.join(files.run.files.last().map(String::as_str).unwrap_or("ckpt_000.safetensors"));
    let activation = shell_word(&cfg.train.activation_text);
    let data = format!("--inputs {} --labels {}", path_text(&run.join("X.npy")), path_text(&run.join("y.npy")));
    vec![
        format!(
            "fisher report --fisher {} --weights {} --activation {activation}",
            path_text(&files.fisher),
            path_text(&last)
        ),
        format!("fisher action --checkpoints {} --activation {activation} {data}", path_text(run)),
        format!(
            "fisher compute --weights {} --activation {activation} {data} --form kfac --out kfac.safetensors --verify",
            path_text(&last)
        ),
    ]
}

#[allow(clippy::too_many_arguments)]
fn summary_json(
    cfg: &DemoConfig,
    devices: &Devices,
    reduction: &ReduceDemo,
    files: &Files,
    forms: &[FormReport],
    geometry: &Geometry,
    action: &ActionReport,
    checks: &[Check],
    commands: &[String],
    seconds: Value,
    mlp: &Mlp,
    data: &Dataset,
) -> Value {
    let primary = &devices.engines[0].1;
    let run = &files.run;
    json!({
        "format": FORMAT,
        "version": 1,
        "fisher_engine_version": env!("CARGO_PKG_VERSION"),
        "quick": cfg.quick,
        "passed": checks.iter().all(|c| c.passed),
        "checks": checks,
        "device": {
            "backend": primary.device_info(),
            "gpu": primary.is_gpu(),
            "adapter": devices.adapter.as_ref().map(|a| &a.name),
            "software_adapter": devices.adapter.as_ref().is_some_and(AdapterInfo::is_software),
            "paths": devices.engines.iter().map(|(_, e)| e.device_info()).collect::<Vec<_>>(),
            "note": devices.note,
        },
        "reduction": {
            "form": "full",
            "samples": reduction.samples,
            "parameters": reduction.params,
            "seed": reduction.seed,
            "generate_seconds": reduction.generate,
            "terms": reduction.terms,
            "paths": reduction.runs.iter().map(|r| json!({
                "path": if r.gpu { "gpu" } else { "cpu" },
                "backend": r.label,
                "setup_seconds": r.setup,
                "seconds": r.compute,
                "trace": r.trace,
                "max_abs": r.verification.agreement.max_abs,
                "max_rel": r.verification.agreement.max_rel,
                "frobenius_rel": r.verification.agreement.frobenius_rel,
                "tolerance_max_rel": r.verification.bound,
                "passed": r.verification.passed,
            })).collect::<Vec<_>>(),
            "reference_seconds": reduction.reference_seconds,
            "reference_trace": reduction.reference_trace,
            "gpu_vs_cpu": reduction.gpu_vs_cpu,
        },
        "training": {
            "architecture": mlp.architecture(),
            "widths": run.widths,
            "activations": run.activations,
            "parameters": run.parameters,
            "samples": run.samples,
            "steps": run.steps,
            "optimizer": {
                "name": "sgd",
                "learning_rate": cfg.train.sgd.learning_rate,
                "momentum": cfg.train.sgd.momentum,
                "batch_size": cfg.train.sgd.batch_size,
            },
            "seed": run.seed,
            "checkpoints": run.files.len(),
            "checkpoint_steps": run.checkpoint_steps,
            "losses": run.losses,
            "loss_first": run.losses.first(),
            "loss_last": run.losses.last(),
            "seconds": run.seconds.0,
        },
        "network_fisher": {
            "variant": VARIANT.name(),
            "likelihood": data.likelihood().name(),
            "samples": data.len(),
            "parameters": mlp.num_params(),
            "rows_per_sample": rows_per_sample(VARIANT, mlp.output_dim()),
            "tolerance_frobenius_rel": NETWORK_FROBENIUS_REL,
            "tolerance_gpu_vs_cpu_frobenius_rel": Contract::Network.pair_bound(),
            "forms": forms,
        },
        "geometry": geometry,
        "action": action,
        "files": {
            "dir": files.dir.display().to_string(),
            "run": run.out_dir.display().to_string(),
            "inputs": run.out_dir.join("X.npy").display().to_string(),
            "labels": run.out_dir.join("y.npy").display().to_string(),
            "checkpoints": run.files.iter().map(|f| run.out_dir.join(f).display().to_string()).collect::<Vec<_>>(),
            "fisher": files.fisher.display().to_string(),
            "spectrum_plot": files.spectrum_plot.display().to_string(),
            "action_plot": files.action_plot.display().to_string(),
            "summary": files.summary.display().to_string(),
        },
        "commands": commands,
        "seconds": seconds,
    })
}

// ---------------------------------------------------------------------------------------
// The report

/// `value ≤ tolerance ✓`.
fn verdict(value: f64, tolerance: f64) -> String {
    format!("{} {}", sci_short(value), mark(value <= tolerance))
}

/// Lays out rows of label–value pairs: every column left-aligned, as wide as its widest
/// cell, two spaces apart, indented by two.
fn pairs(rows: &[Vec<String>]) -> Vec<String> {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..columns).map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0)).collect();
    rows.iter()
        .map(|row| {
            let cells: Vec<String> =
                row.iter().enumerate().map(|(c, cell)| format!("{cell:<width$}", width = widths[c])).collect();
            format!("  {}", cells.join("  ").trim_end())
        })
        .collect()
}

/// `Header      text` with the section names aligned.
fn header(name: &str, text: impl AsRef<str>) -> String {
    format!("{name:<10}  {}", text.as_ref())
}

/// The section headers and their rows.
#[allow(clippy::too_many_arguments)]
fn human(
    cfg: &DemoConfig,
    devices: &Devices,
    reduction: &ReduceDemo,
    files: &Files,
    forms: &[FormReport],
    geometry: &Geometry,
    action: &ActionReport,
    commands: &[String],
    mlp: &Mlp,
) -> String {
    let primary = &devices.engines[0].1;
    let mut out: Vec<String> = Vec::new();
    let device = if primary.is_gpu() {
        let software = devices.adapter.as_ref().is_some_and(AdapterInfo::is_software);
        let kind = if software { "a software GPU: the CPU standing in for one" } else { "a GPU" };
        format!(
            "GPU: {} ({kind}); the CPU path runs beside it for comparison",
            devices.adapter.as_ref().map_or("?", |a| a.name.as_str()),
        )
    } else {
        let label = primary.device_info();
        let threads = label.strip_prefix("cpu: ").unwrap_or(&label).to_string();
        format!("CPU: {threads}{}", devices.note.as_ref().map(|n| format!(" ({n})")).unwrap_or_default())
    };
    out.push(header("Device", device));
    if cfg.quick {
        out.push(header("", "--quick: every size shrunk, for tests (drop --quick for the real demo)"));
    }

    // Reduction.
    out.push(String::new());
    out.push(header(
        "Reduction",
        format!(
            "F = GᵀG/N of synthetic per-sample gradients, N = {} × P = {}; against the f64 reference",
            reduction.samples, reduction.params
        ),
    ));
    let tolerance = reduction.runs.first().map_or(0.0, |r| r.verification.bound);
    let mut rows = vec![vec!["path".to_string(), "seconds".into(), "tr F".into(), "max|Δ|/max|F|".into(), "tolerance".into()]];
    for r in &reduction.runs {
        rows.push(vec![
            if r.gpu { "gpu".into() } else { "cpu".into() },
            seconds(r.compute),
            format!("{:.6e}", r.trace),
            verdict(r.verification.agreement.max_rel, r.verification.bound),
            sci_short(r.verification.bound),
        ]);
    }
    if let Some(a) = &reduction.gpu_vs_cpu {
        rows.push(vec![
            "gpu vs cpu".into(),
            String::new(),
            String::new(),
            verdict(a.max_rel, 2.0 * tolerance),
            sci_short(2.0 * tolerance),
        ]);
    }
    rows.push(vec![
        "f64 reference".into(),
        seconds(reduction.reference_seconds),
        format!("{:.6e}", reduction.reference_trace),
    ]);
    out.extend(table(&rows));

    // Training.
    let run = &files.run;
    out.push(String::new());
    out.push(header(
        "Training",
        format!(
            "{}, P = {}, on {} samples of a seeded classification task: {} SGD steps, {} checkpoints ({:.2} s)",
            mlp.architecture(),
            run.parameters,
            run.samples,
            run.steps,
            run.files.len(),
            run.seconds.0
        ),
    ));
    out.push(format!(
        "  loss {:.4} → {:.4} (mean negative log-likelihood over all samples, first → last checkpoint)",
        run.losses.first().copied().unwrap_or(f64::NAN),
        run.losses.last().copied().unwrap_or(f64::NAN)
    ));

    // Network Fisher.
    out.push(String::new());
    out.push(header(
        "Fisher",
        format!(
            "true Fisher of the trained model ({} outputs, {} rows per sample); ‖Δ‖/‖ref‖ against the f64 reference, tolerance {}",
            mlp.output_dim(),
            rows_per_sample(VARIANT, mlp.output_dim()),
            sci_short(NETWORK_FROBENIUS_REL)
        ),
    ));
    let mut head = vec!["form".to_string()];
    for r in forms.first().map(|f| f.runs.as_slice()).unwrap_or_default() {
        head.push(format!("{} s", r.path));
        head.push(format!("{} ‖Δ‖/‖ref‖", r.path));
    }
    let both = forms.iter().any(|f| f.gpu_vs_cpu.is_some());
    if both {
        head.push("gpu vs cpu".into());
    }
    head.push("reference s".into());
    let mut rows = vec![head];
    for f in forms {
        let mut row = vec![f.form.to_string()];
        for r in &f.runs {
            row.push(seconds(r.seconds));
            row.push(verdict(r.agreement.frobenius_rel, r.tolerance_frobenius_rel));
        }
        if both {
            row.push(f.gpu_vs_cpu.map(|a| verdict(a.frobenius_rel, Contract::Network.pair_bound())).unwrap_or_default());
        }
        row.push(seconds(f.reference_seconds));
        rows.push(row);
    }
    out.extend(table(&rows));

    // Geometry.
    let m = &geometry.measures;
    let i = &geometry.implicit;
    out.push(String::new());
    out.push(header(
        "Geometry",
        format!(
            "of the full F ({}), exactly from its {} eigenvalues ({:.2} s); α = λ = {} (10⁻⁴·λ_max)",
            path_name(primary),
            m.parameters,
            geometry.seconds,
            sci_short(m.alpha),
        ),
    ));
    let top: Vec<String> = m.top_eigenvalues.iter().take(LANCZOS_K).map(|&v| sci_short(v)).collect();
    let fixed = |v: Option<f64>, digits: usize| v.map(|x| format!("{x:.digits$}")).unwrap_or_else(|| "–".into());
    let units: Vec<String> = m.inter_unit_coupling.iter().map(|c| fixed(*c, 4)).collect();
    let singular = match geometry.zero_eigenvalues {
        0 => String::new(),
        z => format!(" (F alone: {z} zero eigenvalues)"),
    };
    let rows = vec![
        vec!["tr F".to_string(), sci_short(m.trace), "top eigenvalues".into(), top.join("  ")],
        vec![
            "log det(F + λI)".into(),
            format!("{:.2}", m.logdet),
            "condition number of F + λI".into(),
            format!("{}{singular}", sci_short(m.condition_number.unwrap_or(f64::NAN))),
        ],
        vec![
            "effective dimension".into(),
            format!("{:.2}", m.effective_dimension),
            format!("Abbas eff. dim. (n = {})", m.abbas_samples.unwrap_or(0)),
            fixed(m.abbas_effective_dimension, 2),
        ],
        vec!["Fisher–Rao norm √θᵀFθ".into(), fixed(m.fisher_rao_norm, 4), "stable rank".into(), format!("{:.3}", m.stable_rank)],
        vec![
            "spectral entropy".into(),
            format!("{:.3}", m.spectral_entropy),
            "resolved eigenvalues".into(),
            format!(
                "{} above ‖F − F_ref‖_F = {} (Weyl)",
                geometry.resolved_eigenvalues,
                sci_short(geometry.eigenvalue_error_bound)
            ),
        ],
        vec![
            "inter-layer coupling".into(),
            fixed(m.inter_layer_coupling, 4),
            "inter-unit coupling per layer".into(),
            units.join("  "),
        ],
    ];
    out.extend(pairs(&rows));
    out.push(format!(
        "  implicit: top {} by Lanczos from {} F·v products on {} (F never formed), {:.2} s: max|Δλ|/λ₁ vs exact {} (tolerance {}){}",
        i.lanczos.values.len(),
        i.lanczos.iterations,
        path_name(primary),
        i.seconds,
        verdict(i.max_rel_diff, i.tolerance),
        sci_short(i.tolerance),
        if i.lanczos.converged { "" } else { ", NOT converged" }
    ));

    // Action.
    out.push(String::new());
    out.push(header(
        "Action",
        format!(
            "along the {} checkpoints (true Fisher at each; chord by the midpoint rule, {} segments)",
            action.checkpoints, action.segments
        ),
    ));
    let rows = vec![
        vec!["action S".to_string(), sci_short(action.action), "Fisher–Rao length L".into(), sci_short(action.length)],
        vec!["chord".into(), sci_short(action.chord), "efficiency L/chord".into(), format!("{:.3}", action.efficiency)],
        vec![
            "Euclidean path length".into(),
            sci_short(action.euclidean_length),
            "Euclidean ‖θ_T − θ₀‖".into(),
            sci_short(action.euclidean_chord),
        ],
    ];
    out.extend(pairs(&rows));

    // Files.
    out.push(String::new());
    let run_files = &files.run.files;
    out.push(header("Files", format!("{}/", files.dir.display())));
    out.push(format!(
        "  spectrum.png  action.png  fisher.safetensors (F, {p}×{p})  summary.json (every number above)",
        p = mlp.num_params()
    ));
    out.push(format!(
        "  {RUN_DIR}/: X.npy  y.npy  {} … {} ({} checkpoints)  run.json",
        run_files.first().map(String::as_str).unwrap_or(""),
        run_files.last().map(String::as_str).unwrap_or(""),
        run_files.len()
    ));
    out.push(String::new());
    out.push(header("Next", "continue from these files:"));
    out.extend(commands.iter().map(|c| format!("  {c}")));
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_trains_fisher_trains_default_run() {
        let cfg = train_config(Path::new("d/run"), DEFAULT_SIZES.train).unwrap();
        assert_eq!(cfg.widths, [16, 32, 32, 4]);
        assert_eq!((cfg.samples, cfg.sgd.steps, cfg.sgd.checkpoints), (2048, 400, 25));
        assert_eq!(cfg.out_dir, Path::new("d/run"));
        let quick = train_config(Path::new("d/run"), QUICK_SIZES.train).unwrap();
        assert_eq!(quick.widths, [6, 12, 12, 3]);
        assert_eq!((quick.samples, quick.sgd.steps, quick.sgd.checkpoints), (256, 60, 7));
    }

    #[test]
    fn demo_files_are_recognised() {
        for name in ["X.npy", "y.npy", "run.json", "ckpt_000.safetensors", "ckpt_1234.safetensors", ".fisher-abc"] {
            assert!(is_run_file(name), "{name}");
        }
        for name in ["notes.txt", "model.safetensors", "X.npy.bak"] {
            assert!(!is_run_file(name), "{name}");
        }
        assert!(is_leftover(".fisher-x1y2.json") && is_leftover(".run.fisher-train-abc"));
        assert!(!is_leftover(".bashrc"));
    }

    #[test]
    fn tables_align_by_characters() {
        let rows = vec![vec!["a".to_string(), "1.0".into()], vec!["‖Δ‖".into(), "10.25".into()]];
        assert_eq!(pairs(&rows), ["  a    1.0", "  ‖Δ‖  10.25"]);
    }

    #[test]
    fn verdict_names_the_failed_checks() {
        let checks = vec![
            Check::new("reduction on cpu vs f64", "max|Δ|/max|F|", 1e-7, 1e-6),
            Check::new("full Fisher on cpu vs f64", "‖Δ‖/‖ref‖", 2e-5, 1e-5),
            Check::new("nan", "‖Δ‖/‖ref‖", f64::NAN, 1e-5),
        ];
        let outcome = Outcome { summary: json!({"seconds": {"total": 1.5}}), checks, human: String::new() };
        assert!(!outcome.passed());
        assert_eq!(outcome.failed(), ["full Fisher on cpu vs f64", "nan"]);
        assert!(outcome.verdict().starts_with("✗ 2 of 3 checks failed: full Fisher on cpu vs f64; nan"), "{}", outcome.verdict());
    }
}
