//! The demo: the whole pipeline on an embedded default, computed now and verified (the body
//! of `fisher demo`).
//!
//! [`run()`] opens the device (the requested one, and the CPU beside a GPU), then runs the
//! sections in order, each feeding the next:
//!
//! 1. reduction: synthetic per-sample gradients reduced to F = GᵀG/N on every path and
//!    compared with one f64 reference ([`compare_paths`], the body of `fisher reduce
//!    --synthetic`);
//! 2. training: `fisher train`'s default run ([`RunSpec::default`]), in memory;
//! 3. network Fisher: the true Fisher of the trained model as diag, kfac and full on every
//!    path, each compared with the f64 reference (‖Δ‖/‖ref‖ ≤ 10⁻⁵, `fisher compute
//!    --verify`'s contract), and the GPU with the CPU;
//! 4. geometry: every exact measure of the full F ([`analysis::measures_exact`]), and the
//!    top eigenvalues again from the implicit F·v alone ([`analysis::lanczos_top_k`] on an
//!    [`ImplicitFisher`]), compared with the exact ones;
//! 5. the action along the training run ([`action::measure`]);
//! 6. the files ([`DemoFiles`]): the run directory, fisher.safetensors, the two plots and
//!    summary.json, each written atomically (summary.json last: a directory with one holds
//!    a complete demo).
//!
//! Every verification becomes a [`Check`] with its tolerance (by the [`crate::verify`]
//! policy); a failed check does not stop the run, so that the failure can be inspected: the
//! caller decides from [`DemoOutcome::passed`].

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{json, Value};

use crate::analysis::action::{self, ActionReport};
use crate::analysis::{
    self, ExplicitFisher, ImplicitFisher, LanczosOptions, LanczosResult, MeasureOptions, Measures, ParameterLayout,
    SpectralDensity, Spectrum,
};
use crate::backend::gpu::GpuOptions;
use crate::compare::{compare_paths, Comparison};
use crate::device::{self, AdapterInfo, DeviceRequest};
use crate::error::{FisherError, Result};
use crate::fisher::{rows_per_sample, NetFisher, NetForm, Variant};
use crate::io::fisher_file::{self, FisherFile};
use crate::model::run::{self, RunSpec, Written};
use crate::model::{Dataset, Mlp};
use crate::output::plot::{self, Histogram};
use crate::output::progress::Progress;
use crate::verify::{Contract, Verdict, NETWORK_FROBENIUS_REL};
use crate::{Agreement, Backend, Engine, Form};

/// What `summary.json` says it is; an output directory is an earlier demo's only when its
/// summary.json says this.
pub const FORMAT: &str = "fisher-engine demo";
/// The files the demo writes into its directory, besides the run directory [`RUN_DIR`].
pub const FILES: [&str; 4] = ["spectrum.png", "action.png", "fisher.safetensors", "summary.json"];
/// The training run's directory inside the output directory (a directory of its own, so
/// that `fisher action --checkpoints DIR/run` finds only the checkpoints).
pub const RUN_DIR: &str = "run";
/// The variant of every network Fisher: the true Fisher (the exact expectation over the
/// model's predictive distribution).
pub const VARIANT: Variant = Variant::True;
/// How many of the largest eigenvalues Lanczos finds from F·v alone.
pub const LANCZOS_K: usize = 5;
/// The seed of the synthetic gradients of the reduction.
const REDUCE_SEED: u64 = 0;
/// How many of the largest eigenvalues the measures list.
const TOP: usize = 10;
/// Segments of the chord's midpoint rule in the action.
const SEGMENTS: usize = 8;
/// Bins (log-spaced) and Gaussian smoothing (decades) of the spectral density plotted.
const DENSITY: (usize, f64) = (60, 0.08);
/// The scale α of d_eff(α) and the damping λ of log det(F + λI) and the condition number,
/// relative to λ_max: eigenvalues more than four decades below the largest count as flat
/// directions.
const SCALE_REL: f64 = 1e-4;
/// Lanczos' tolerance on the relative residual (the eigenvalue error is far smaller:
/// quadratic in the residual).
const LANCZOS_TOL: f64 = 1e-8;

/// The sizes of one demo.
#[derive(Debug, Clone, PartialEq)]
pub struct Sizes {
    /// N × P of the synthetic gradients.
    pub reduce: (usize, usize),
    /// The training run.
    pub run: RunSpec,
}

impl Sizes {
    /// The default demo: the reduction at the size `fisher reduce --help` suggests, and
    /// `fisher train`'s default run (a 16-32-32-4 tanh MLP on 2048 samples, 400 steps, 25
    /// checkpoints).
    pub fn full() -> Self {
        Sizes { reduce: (4096, 512), run: RunSpec::default() }
    }

    /// Every size shrunk (a 6-12-12-3 MLP on 256 samples, 512×64 gradients): the same steps
    /// and checks in a few seconds.
    pub fn quick() -> Self {
        let run = RunSpec { widths: vec![6, 12, 12, 3], samples: 256, steps: 60, checkpoints: 7, ..RunSpec::default() };
        Sizes { reduce: (512, 64), run }
    }
}

/// A demo to run.
#[derive(Debug, Clone)]
pub struct DemoRequest {
    /// Requested compute path (beside a GPU, the CPU path runs too).
    pub backend: Backend,
    /// Adapter choice.
    pub gpu: GpuOptions,
    /// The output directory (created; it may hold only an earlier demo's files).
    pub out_dir: PathBuf,
    /// [`Sizes::quick`] instead of [`Sizes::full`].
    pub quick: bool,
    /// Draw progress bars on stderr (only ever on a terminal).
    pub show_progress: bool,
    /// Commands that continue from the files, recorded in summary.json (the caller's: the
    /// `fisher` binary names its own commands).
    pub commands: Vec<String>,
}

impl DemoRequest {
    /// The sizes this request runs at.
    pub fn sizes(&self) -> Sizes {
        if self.quick {
            Sizes::quick()
        } else {
            Sizes::full()
        }
    }

    /// The files it writes.
    pub fn files(&self) -> DemoFiles {
        DemoFiles::new(&self.out_dir, &self.sizes().run)
    }
}

/// The paths the demo writes.
#[derive(Debug, Clone, PartialEq)]
pub struct DemoFiles {
    /// The output directory.
    pub dir: PathBuf,
    /// The training run's directory, `dir/run`.
    pub run: PathBuf,
    /// `run/X.npy`.
    pub inputs: PathBuf,
    /// `run/y.npy`.
    pub labels: PathBuf,
    /// `run/ckpt_000.safetensors` …, in order.
    pub checkpoints: Vec<PathBuf>,
    /// The full Fisher of the trained model.
    pub fisher: PathBuf,
    /// Its spectrum.
    pub spectrum_plot: PathBuf,
    /// The action along training.
    pub action_plot: PathBuf,
    /// Every number, written last.
    pub summary: PathBuf,
}

impl DemoFiles {
    /// The files of a demo in `dir` whose training run is `spec`.
    pub fn new(dir: &Path, spec: &RunSpec) -> Self {
        let run = dir.join(RUN_DIR);
        DemoFiles {
            dir: dir.to_path_buf(),
            inputs: run.join("X.npy"),
            labels: run.join("y.npy"),
            checkpoints: spec.checkpoint_names().iter().map(|f| run.join(f)).collect(),
            run,
            fisher: dir.join(FILES[2]),
            spectrum_plot: dir.join(FILES[0]),
            action_plot: dir.join(FILES[1]),
            summary: dir.join(FILES[3]),
        }
    }

    fn json(&self) -> Value {
        let text = |p: &Path| p.display().to_string();
        json!({
            "dir": text(&self.dir),
            "run": text(&self.run),
            "inputs": text(&self.inputs),
            "labels": text(&self.labels),
            "checkpoints": self.checkpoints.iter().map(|p| text(p)).collect::<Vec<_>>(),
            "fisher": text(&self.fisher),
            "spectrum_plot": text(&self.spectrum_plot),
            "action_plot": text(&self.action_plot),
            "summary": text(&self.summary),
        })
    }
}

// ---------------------------------------------------------------------------------------
// The output directory

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

fn names_in(dir: &Path) -> Result<Vec<String>> {
    let cannot_read = |e: std::io::Error| FisherError::io(dir, format!("cannot read: {e}"));
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(cannot_read)? {
        names.push(entry.map_err(cannot_read)?.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// Refuses, before anything is computed, an output directory the demo must not write: one
/// that is a file, lies under a file, or holds anything but an earlier demo's output (its
/// summary.json says [`FORMAT`], and every entry is a demo file).
pub fn check_out_dir(dir: &Path) -> Result<()> {
    if !dir.exists() {
        if let Some(blocker) = dir.ancestors().skip(1).find(|a| !a.as_os_str().is_empty() && a.exists()) {
            if !blocker.is_dir() {
                return Err(FisherError::io(blocker, format!("is not a directory (cannot create {})", dir.display())));
            }
        }
        return Ok(());
    }
    if !dir.is_dir() {
        return Err(FisherError::io(dir, "exists and is not a directory; --out-dir names the directory the demo writes"));
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
    let marked = std::fs::read_to_string(dir.join("summary.json"))
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
        return Err(FisherError::InvalidInput(format!(
            "{} holds {what}; choose another --out-dir (the demo replaces only its own output)",
            dir.display()
        )));
    }
    Ok(())
}

/// Writes `text` to `path` atomically (a temporary file beside it, renamed into place).
fn write_text_atomic(path: &Path, text: &str) -> Result<()> {
    let fail = |e: std::io::Error| FisherError::io(path, format!("cannot write: {e}"));
    let mut temp = crate::io::output_temp_file(crate::io::output_dir(path), ".json").map_err(fail)?;
    temp.write_all(text.as_bytes()).map_err(fail)?;
    temp.as_file().sync_all().map_err(fail)?;
    temp.persist(path).map_err(|e| fail(e.error))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Checks

/// One verification: a measured disagreement against its documented bound.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
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
    /// The check of a verdict: its measure (as `metric`) against its bound, passed as judged.
    pub fn of(name: impl Into<String>, metric: &'static str, verdict: &Verdict) -> Self {
        Check { name: name.into(), value: verdict.measure(), tolerance: verdict.bound, metric, passed: verdict.passed }
    }

    /// `value` against `tolerance`: passed when value ≤ tolerance (a NaN fails).
    pub fn new(name: impl Into<String>, metric: &'static str, value: f64, tolerance: f64) -> Self {
        Check { name: name.into(), value, tolerance, metric, passed: value <= tolerance }
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

/// Where the demo ran: the requested path first, then the CPU beside a GPU.
#[derive(Debug, Clone)]
pub struct DeviceSummary {
    /// The requested path's label (`gpu: …` or `cpu: N threads`).
    pub backend: String,
    /// Whether it is a GPU.
    pub gpu: bool,
    /// The GPU adapter, when on a GPU.
    pub adapter: Option<AdapterInfo>,
    /// Every path's label, the requested one first.
    pub paths: Vec<String>,
    /// Why a path is missing.
    pub note: Option<String>,
    /// Seconds to open the requested path.
    pub setup_seconds: f64,
}

/// The engines: the requested one first, then the CPU beside a GPU.
fn open_devices(request: &DemoRequest) -> Result<(Vec<(f64, Engine)>, DeviceSummary)> {
    let start = Instant::now();
    // The demo is a tour of both paths, each checked against the other and the f64
    // reference: under Auto it takes any GPU adapter, a software one included (the GPU path
    // then runs beside the CPU path, not instead of it), and the CPU alone only when there
    // is no adapter at all.
    let wanted = if request.backend == Backend::Auto { Backend::Gpu } else { request.backend };
    let device = match device::open(&DeviceRequest::from_env(wanted, request.gpu.clone())?) {
        Err(FisherError::NoAdapter(_)) if request.backend == Backend::Auto => {
            device::open(&DeviceRequest::from_env(Backend::Auto, request.gpu.clone())?)?
        }
        opened => opened?,
    };
    let setup_seconds = start.elapsed().as_secs_f64();
    let note = match (&device.fallback, request.backend) {
        (Some(why), _) => Some(format!("{why}: the CPU path only")),
        (None, Backend::Cpu) => Some("--backend cpu: the GPU path was not run".into()),
        (None, _) => None,
    };
    let mut engines = vec![(setup_seconds, device.engine)];
    if engines[0].1.is_gpu() {
        engines.push((0.0, Engine::cpu()));
    }
    let summary = DeviceSummary {
        backend: engines[0].1.device_info(),
        gpu: engines[0].1.is_gpu(),
        adapter: device.adapter,
        paths: engines.iter().map(|(_, e)| e.device_info()).collect(),
        note,
        setup_seconds,
    };
    Ok((engines, summary))
}

/// One network form on one path.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FormRun {
    /// `gpu` or `cpu`.
    pub path: &'static str,
    /// The backend's label.
    pub backend: String,
    /// Seconds of the computation.
    pub seconds: f64,
    /// tr F.
    pub trace: f64,
    /// Against the f64 reference.
    #[serde(flatten)]
    pub agreement: Agreement,
    /// The bound on ‖Δ‖/‖ref‖.
    pub tolerance_frobenius_rel: f64,
    /// Within it.
    pub passed: bool,
}

/// One network form on every path, against one reference.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FormReport {
    /// The form's name.
    pub form: &'static str,
    /// Every path, the requested one first.
    pub runs: Vec<FormRun>,
    /// Seconds of the f64 reference.
    pub reference_seconds: f64,
    /// tr F of the reference.
    pub reference_trace: f64,
    /// GPU result against the CPU result, when both ran.
    pub gpu_vs_cpu: Option<Agreement>,
}

/// The network Fisher section: every form on every path, checked; returns the primary
/// path's full F.
fn network_fisher(
    engines: &[(f64, Engine)],
    mlp: &Mlp,
    data: &Dataset,
    show: bool,
    checks: &mut Vec<Check>,
) -> Result<(Vec<FormReport>, NetFisher)> {
    let forms = [NetForm::Diagonal, NetForm::Kfac, NetForm::Full];
    let total = forms.len() * (engines.len() + 1);
    let progress = Progress::new("network Fisher (diag, kfac, full; f64 reference)", total, show);
    let mut done = 0;
    let mut reports = Vec::new();
    let mut primary_full = None;
    for form in forms {
        let mut results = Vec::new();
        for (_, engine) in engines {
            let start = Instant::now();
            let result = engine.fisher(mlp, data, VARIANT, form)?;
            results.push((engine, start.elapsed().as_secs_f64(), result));
            done += 1;
            progress.set(done, total);
        }
        let start = Instant::now();
        let reference = crate::reference::network::fisher(mlp, data, data.likelihood(), VARIANT, form)?;
        let reference_seconds = start.elapsed().as_secs_f64();
        done += 1;
        progress.set(done, total);

        let mut runs = Vec::new();
        for (engine, seconds, result) in &results {
            let verdict = Verdict::judge(result.agreement(&reference)?, Contract::Network);
            let name = format!("{} Fisher on {} vs f64", form.name(), path_name(engine));
            checks.push(Check::of(name, Contract::Network.metric(), &verdict));
            runs.push(FormRun {
                path: path_name(engine),
                backend: engine.device_info(),
                seconds: *seconds,
                trace: result.trace(),
                agreement: verdict.agreement,
                tolerance_frobenius_rel: verdict.bound,
                passed: verdict.passed,
            });
        }
        let gpu_vs_cpu = match (results.iter().find(|r| r.0.is_gpu()), results.iter().find(|r| !r.0.is_gpu())) {
            (Some(gpu), Some(cpu)) => {
                let a = gpu.2.agreement(&cpu.2)?;
                let verdict = Verdict::judge_pair(a, Contract::Network);
                checks.push(Check::of(format!("{} Fisher gpu vs cpu", form.name()), "‖Δ‖/‖cpu‖", &verdict));
                Some(a)
            }
            _ => None,
        };
        let reference_trace = reference.trace();
        reports.push(FormReport { form: form.name(), runs, reference_seconds, reference_trace, gpu_vs_cpu });
        if form == NetForm::Full {
            primary_full = results.into_iter().next().map(|r| r.2);
        }
    }
    progress.finish();
    let full = primary_full.ok_or_else(|| FisherError::InvalidInput("no full Fisher was computed".into()))?;
    Ok((reports, full))
}

/// The geometry section's results.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Geometry {
    /// Every exact measure of the full F.
    pub measures: Measures,
    /// All eigenvalues, descending (for the plot; not in the summary).
    #[serde(skip)]
    pub spectrum: Spectrum,
    /// Seconds of the eigendecomposition and the measures.
    pub seconds: f64,
    /// Zero eigenvalues (within the eigensolver's error of 0).
    pub zero_eigenvalues: usize,
    /// ‖F − F_ref‖_F, measured: by Weyl's inequality every eigenvalue of the computed F is
    /// within this of the f64 reference's.
    pub eigenvalue_error_bound: f64,
    /// Eigenvalues above that bound (the rest are within F's f32 error of 0).
    pub resolved_eigenvalues: usize,
    /// The top eigenvalues from F·v alone.
    pub implicit: Implicit,
}

/// The top eigenvalues from F·v alone.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Implicit {
    /// The backend's label.
    pub backend: String,
    /// Lanczos' result.
    pub lanczos: LanczosResult,
    /// The exact eigenvalues they are compared with.
    pub exact: Vec<f64>,
    /// max_i |λᵢ(Lanczos) − λᵢ(exact)| / λ₁.
    pub max_rel_diff: f64,
    /// Its bound.
    pub tolerance: f64,
    /// Seconds of Lanczos.
    pub seconds: f64,
}

fn geometry(
    engine: &Engine,
    mlp: &Mlp,
    data: &Dataset,
    full: &NetFisher,
    frobenius_rel: f64,
    show: bool,
    checks: &mut Vec<Check>,
) -> Result<Geometry> {
    let start = Instant::now();
    let layout = ParameterLayout::from_mlp(mlp)?;
    let fisher = ExplicitFisher::from_net(full, Some(&layout))?;
    let spectrum = fisher.spectrum()?;
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
    let measures = analysis::measures_exact(&fisher, &options)?;
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
    let operator = ImplicitFisher::new(engine, mlp, data, VARIANT)?
        .with_known(Some(measures.trace), None)
        .on_product(|n| progress.set(n, first_basis.max(n + 1)));
    let lanczos = analysis::lanczos_top_k(&operator, &options)?;
    progress.finish();
    let exact: Vec<f64> = (0..lanczos.values.len()).map(|i| spectrum.eigenvalues.get(i).copied().unwrap_or(0.0)).collect();
    let max_diff =
        lanczos.values.iter().zip(&exact).map(|(a, b)| (a - b).abs()).fold(0.0f64, |m, d| if d.is_nan() { d } else { m.max(d) });
    let max_rel_diff = if lambda_max > 0.0 { max_diff / lambda_max } else { max_diff };
    // Both sides are f32 computations of one F: the F·v products are within 10⁻⁵·‖F v‖ of
    // the exact ones (so λᵢ within 10⁻⁵·λ₁), the stored F within 10⁻⁵·‖F‖_F; Lanczos adds
    // at most its tolerance times λᵢ.
    let frobenius_over_max = if lambda_max > 0.0 { measures.frobenius / lambda_max } else { 1.0 };
    let tolerance = NETWORK_FROBENIUS_REL * (1.0 + frobenius_over_max) + LANCZOS_TOL;
    let name = format!("top-{} eigenvalues, implicit F·v ({}) vs exact", lanczos.values.len(), path_name(engine));
    let mut check = Check::new(name, "max|Δλ|/λ₁", max_rel_diff, tolerance);
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

/// Wall-clock seconds per section.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Seconds {
    /// Opening the requested path.
    pub setup: f64,
    /// Training.
    pub train: f64,
    /// The exact geometry.
    pub geometry: f64,
    /// Lanczos on the implicit F·v.
    pub lanczos: f64,
    /// The action.
    pub action: f64,
    /// Writing the files (summary.json aside).
    pub write: f64,
    /// The whole demo.
    pub total: f64,
}

/// Everything the demo measured and wrote.
#[derive(Debug)]
pub struct DemoOutcome {
    /// Whether the sizes were [`Sizes::quick`].
    pub quick: bool,
    /// Where it ran.
    pub device: DeviceSummary,
    /// The reduction section.
    pub reduction: Comparison,
    /// The training run, as written.
    pub training: Written,
    /// The trained model: `16-32-32-4 tanh MLP`.
    pub architecture: String,
    /// Its outputs (classes).
    pub outputs: usize,
    /// Every network form on every path.
    pub forms: Vec<FormReport>,
    /// The geometry of the full F.
    pub geometry: Geometry,
    /// The action along training.
    pub action: ActionReport,
    /// The files written.
    pub files: DemoFiles,
    /// Every verification, in order.
    pub checks: Vec<Check>,
    /// The request's follow-up commands.
    pub commands: Vec<String>,
    /// Seconds per section.
    pub seconds: Seconds,
    /// summary.json's content.
    pub summary: Value,
}

impl DemoOutcome {
    /// Whether every check passed.
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.passed)
    }

    /// The failed checks' names.
    pub fn failed(&self) -> Vec<&str> {
        failed(&self.checks)
    }
}

fn failed(checks: &[Check]) -> Vec<&str> {
    checks.iter().filter(|c| !c.passed).map(|c| c.name.as_str()).collect()
}

/// Runs every section and writes the files. Errors stop the run; failed checks do not (see
/// [`DemoOutcome::passed`]).
pub fn run(request: &DemoRequest) -> Result<DemoOutcome> {
    let total = Instant::now();
    check_out_dir(&request.out_dir)?;
    let sizes = request.sizes();
    let show = request.show_progress;
    let mut checks = Vec::new();
    let mut seconds = Seconds::default();

    // Device.
    let (engines, device) = open_devices(request)?;
    seconds.setup = device.setup_seconds;
    let primary = &engines[0].1;

    // 1. Reduction.
    let reduction = reduction(&engines, sizes.reduce, device.note.clone(), show, &mut checks)?;

    // 2. Training.
    let trained = sizes.run.train()?;
    seconds.train = trained.seconds;
    let mlp = trained.run.checkpoints.last().cloned().ok_or_else(|| FisherError::InvalidInput("training kept no checkpoint".into()))?;
    let data = &trained.data;

    // 3. Network Fisher.
    let (forms, full) = network_fisher(&engines, &mlp, data, show, &mut checks)?;

    // 4. Geometry.
    // The primary path's ‖Δ‖/‖ref‖ of the full F bounds the error of its eigenvalues.
    let full_error = forms.iter().find(|f| f.form == "full").map_or(f64::NAN, |f| f.runs[0].agreement.frobenius_rel);
    let geometry = geometry(primary, &mlp, data, &full, full_error, show, &mut checks)?;
    seconds.geometry = geometry.seconds;
    seconds.lanczos = geometry.implicit.seconds;

    // 5. Action.
    let start = Instant::now();
    let progress = Progress::new("action along training (quadratic forms)", trained.run.checkpoints.len() - 1 + SEGMENTS, show);
    let action = action::measure(primary, &trained.run.checkpoints, data, VARIANT, SEGMENTS, &mut progress.callback())?;
    progress.finish();
    seconds.action = start.elapsed().as_secs_f64();

    // 6. Files.
    let start = Instant::now();
    let files = request.files();
    let training = write_files(&files, &sizes.run, primary, &mlp, &trained, full, &geometry, &action)?;
    seconds.write = start.elapsed().as_secs_f64();
    seconds.total = total.elapsed().as_secs_f64();

    let mut outcome = DemoOutcome {
        quick: request.quick,
        device,
        reduction,
        training,
        architecture: mlp.architecture(),
        outputs: mlp.output_dim(),
        forms,
        geometry,
        action,
        files,
        checks,
        commands: request.commands.clone(),
        seconds,
        summary: Value::Null,
    };
    outcome.summary = summary_json(&outcome, data);
    // Written last: a directory with a summary.json holds a complete demo.
    let text = serde_json::to_string_pretty(&outcome.summary)
        .map_err(|e| FisherError::io(&outcome.files.summary, format!("cannot encode: {e}")))?;
    write_text_atomic(&outcome.files.summary, &(text + "\n"))?;
    Ok(outcome)
}

/// The reduction section: synthetic gradients on every path against one f64 reference.
fn reduction(
    engines: &[(f64, Engine)],
    (n, p): (usize, usize),
    note: Option<String>,
    show: bool,
    checks: &mut Vec<Check>,
) -> Result<Comparison> {
    let start = Instant::now();
    let g = crate::synthetic::gradient_like(n, p, REDUCE_SEED);
    let generate = start.elapsed().as_secs_f64();
    let engines: Vec<(f64, &Engine)> = engines.iter().map(|(s, e)| (*s, e)).collect();
    let steps = engines.len() + 1;
    let progress = Progress::new("reduction F = GᵀG/N (every path; f64 reference)", steps, show);
    let mut step = 0;
    let reduction = compare_paths(&g, REDUCE_SEED, generate, &Form::Full, &engines, note, |_| {
        progress.set(step, steps);
        step += 1;
    })?;
    progress.finish();
    for r in &reduction.runs {
        let name = format!("reduction on {} vs f64", if r.gpu { "gpu" } else { "cpu" });
        checks.push(Check::of(name, "max|Δ|/max|F|", &r.verification));
    }
    if let Some(a) = &reduction.gpu_vs_cpu {
        let verdict = Verdict::judge_pair(*a, reduction.runs[0].verification.contract);
        checks.push(Check::of("reduction gpu vs cpu", "max|Δ|/max|F|", &verdict));
    }
    Ok(reduction)
}

/// Writes the run directory, fisher.safetensors and the two plots (summary.json comes last,
/// from [`run()`]).
#[allow(clippy::too_many_arguments)]
fn write_files(
    files: &DemoFiles,
    spec: &RunSpec,
    engine: &Engine,
    mlp: &Mlp,
    trained: &run::Trained,
    full: NetFisher,
    geometry: &Geometry,
    action: &ActionReport,
) -> Result<Written> {
    let dir = &files.dir;
    // Checked again: the directory may have changed while the demo computed.
    check_out_dir(dir)?;
    std::fs::create_dir_all(dir).map_err(|e| FisherError::io(dir, format!("cannot create: {e}")))?;
    // The demo replaces its own earlier run.
    let replace = run::check_out_dir(&files.run, true)?;
    debug_assert_eq!(&trained.spec, spec);
    let written = run::write(&files.run, trained, replace)?;

    let data = &trained.data;
    let file = FisherFile::of_network(full, mlp, data.len(), data.likelihood(), VARIANT, &engine.device_info());
    fisher_file::write(&files.fisher, &file)?;

    let spectrum = &geometry.spectrum;
    let density = SpectralDensity::from_spectrum(spectrum, DENSITY.0, None, DENSITY.1)?;
    let histogram = Histogram { edges: density.edges, mass: density.mass };
    let mut eigenvalues = spectrum.eigenvalues.clone();
    eigenvalues.resize(spectrum.dim, 0.0);
    let title = format!("Fisher spectrum of the trained {} (true Fisher, P = {})", mlp.architecture(), mlp.num_params());
    plot::spectrum_plot(&files.spectrum_plot, &eigenvalues, Some(&histogram), &title)?;

    let title = format!("Action along training: {} checkpoints of the {}", action.checkpoints, mlp.architecture());
    plot::action_plot(&files.action_plot, action, &title)?;
    Ok(written)
}

/// summary.json: every number of the demo.
fn summary_json(o: &DemoOutcome, data: &Dataset) -> Value {
    let (device, reduction, run) = (&o.device, &o.reduction, &o.training);
    json!({
        "format": FORMAT,
        "version": 1,
        "fisher_engine_version": env!("CARGO_PKG_VERSION"),
        "quick": o.quick,
        "passed": o.passed(),
        "checks": o.checks,
        "device": {
            "backend": device.backend,
            "gpu": device.gpu,
            "adapter": device.adapter.as_ref().map(|a| &a.name),
            "software_adapter": device.adapter.as_ref().is_some_and(AdapterInfo::is_software),
            "paths": device.paths,
            "note": device.note,
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
            "architecture": o.architecture,
            "widths": run.spec.widths,
            "activations": run.activations,
            "parameters": run.parameters,
            "samples": run.spec.samples,
            "steps": run.spec.steps,
            "optimizer": {
                "name": "sgd",
                "learning_rate": run.spec.learning_rate,
                "momentum": run.spec.momentum,
                "batch_size": run.spec.batch_size,
            },
            "seed": run.spec.seed,
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
            "parameters": run.parameters,
            "rows_per_sample": rows_per_sample(VARIANT, o.outputs),
            "tolerance_frobenius_rel": NETWORK_FROBENIUS_REL,
            "tolerance_gpu_vs_cpu_frobenius_rel": Contract::Network.pair_bound(),
            "forms": o.forms,
        },
        "geometry": o.geometry,
        "action": o.action,
        "files": o.files.json(),
        "commands": o.commands,
        "seconds": o.seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_trains_fisher_trains_default_run() {
        assert_eq!(Sizes::full().run, RunSpec::default());
        let quick = Sizes::quick().run;
        assert_eq!((quick.widths.as_slice(), quick.samples, quick.steps, quick.checkpoints), (&[6, 12, 12, 3][..], 256, 60, 7));
        quick.validate().unwrap();
        let files = DemoFiles::new(Path::new("d"), &quick);
        assert_eq!(files.run, Path::new("d/run"));
        assert_eq!(files.checkpoints.last().unwrap(), Path::new("d/run/ckpt_006.safetensors"));
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
    fn failed_checks_are_named() {
        let checks = vec![
            Check::new("reduction on cpu vs f64", "max|Δ|/max|F|", 1e-7, 1e-6),
            Check::new("full Fisher on cpu vs f64", "‖Δ‖/‖ref‖", 2e-5, 1e-5),
            Check::new("nan", "‖Δ‖/‖ref‖", f64::NAN, 1e-5),
        ];
        assert_eq!(failed(&checks), ["full Fisher on cpu vs f64", "nan"]);
    }

    /// The quick demo on the CPU: every check passes, every file is written, and a second
    /// run replaces the first while a foreign file is refused.
    #[test]
    fn quick_demo_on_the_cpu() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("demo");
        let request = DemoRequest {
            backend: Backend::Cpu,
            gpu: GpuOptions::default(),
            out_dir: out.clone(),
            quick: true,
            show_progress: false,
            commands: vec!["fisher action …".into()],
        };
        let outcome = run(&request).unwrap();
        assert!(outcome.passed(), "{:?}", outcome.failed());
        assert_eq!(outcome.checks.len(), 5, "{:?}", outcome.checks);
        let mut names = names_in(&out).unwrap();
        names.retain(|n| n != RUN_DIR);
        let mut expected = FILES.map(String::from).to_vec();
        expected.sort();
        assert_eq!(names, expected);
        let written: Value = serde_json::from_str(&std::fs::read_to_string(&outcome.files.summary).unwrap()).unwrap();
        // (Floats need not survive the text exactly: compare what does.)
        assert_eq!((&written["format"], &written["passed"]), (&json!(FORMAT), &json!(true)));
        assert_eq!(written["checks"].as_array().map(Vec::len), Some(outcome.checks.len()));
        assert_eq!(written["commands"][0], "fisher action …");
        assert_eq!(run::checkpoint_files(&[outcome.files.run.clone()]).unwrap(), outcome.files.checkpoints);
        check_out_dir(&out).unwrap();
        std::fs::write(out.join("notes.txt"), "mine").unwrap();
        assert!(check_out_dir(&out).unwrap_err().to_string().contains("notes.txt"));
    }
}
