//! `fisher reduce`: input → engine → reduction → (verification) → atomic write.
//!
//! Every check that can fail on the user's input runs before the output file is created:
//! the output directory, the `.npy` header (dtype, rank, order, emptiness, length) and the
//! form against P are checked before any compute; non-finite values are found while
//! streaming, before anything is written; the write itself goes through a temporary file.

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Instant;

use anyhow::Context;
use fisher_engine::reference::grads as reference;
use fisher_engine::device::{self, DeviceRequest};
use fisher_engine::io::fisher_file::{self, FisherFile};
use fisher_engine::io::{self, NpyRows};
use fisher_engine::verify::{Contract, Verdict};
use fisher_engine::validate::check_matrix;
use fisher_engine::compare::{compare_paths, Comparison};
use fisher_engine::{Backend, Engine, FisherMatrix, Form};
use serde_json::json;
use ndarray::Array2;

use super::args::{Input, ReduceConfig};
use super::format::{bytes, tensor_list};

/// Bytes of G per streamed chunk. Large enough that per-chunk overheads (a GPU submission,
/// a thread hand-off) vanish; small enough that the at most three chunks alive at once
/// (one reading, one queued, one computing) are a small fixed amount of memory.
const CHUNK_BYTES: usize = 64 << 20;

/// Wall-clock seconds per stage.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Seconds {
    /// Reading (or generating) and checking G. While streaming, reading overlaps computing
    /// and this counts only the time spent waiting for input.
    pub load: f64,
    /// Choosing an adapter, creating the device and building the kernels.
    pub setup: f64,
    /// The reduction itself, including transfers.
    pub compute: f64,
    /// The f64 reference and the comparison (0 without `--verify`).
    pub verify: f64,
    /// Writing the output file (0 without `--out`).
    pub write: f64,
}

/// What a `reduce` run did, for the report.
#[derive(Debug)]
pub struct Outcome {
    /// Where G came from.
    pub input: InputInfo,
    /// N.
    pub samples: usize,
    /// P.
    pub params: usize,
    /// The form.
    pub form: Form,
    /// The backend's label.
    pub backend: String,
    /// GPU adapter name, when on a GPU.
    pub adapter: Option<String>,
    /// Why Auto fell back to the CPU.
    pub fallback: Option<String>,
    /// Names and shapes of the result's tensors.
    pub tensors: Vec<(String, Vec<usize>)>,
    /// tr F (every form determines it).
    pub trace: f64,
    /// Disagreement with the f64 reference (`--verify`); always a pass here, since a failed
    /// verification is an error.
    pub verification: Option<Verdict>,
    /// The file written and its size in bytes.
    pub out: Option<(PathBuf, u64)>,
    /// Seconds per stage.
    pub seconds: Seconds,
}

/// Where G came from, for the report.
#[derive(Debug, Clone)]
pub enum InputInfo {
    /// A `.npy` file and its element type (`float32`, `float64`, ...).
    File {
        /// The file.
        path: PathBuf,
        /// numpy's name of its dtype.
        dtype: &'static str,
    },
    /// `synthetic::gradient_like` with this seed.
    Synthetic {
        /// The seed.
        seed: u64,
    },
}

/// G, before it is read: a streamable file or a matrix already in memory.
enum Source {
    File { path: PathBuf, rows: NpyRows },
    Memory(Array2<f32>),
}

/// Opens the input (the header only, for a file) and checks the form against P.
fn open_source(input: &Input, form: &Form, seconds: &mut Seconds) -> anyhow::Result<(Source, String, InputInfo)> {
    let start = Instant::now();
    let (source, what, info) = match input {
        Input::File(path) => {
            let rows = NpyRows::open(path, 1)?;
            let info = InputInfo::File { path: path.clone(), dtype: rows.dtype() };
            let what = path.display().to_string();
            (Source::File { path: path.clone(), rows }, what, info)
        }
        Input::Synthetic { samples, params, seed } => {
            let g = fisher_engine::synthetic::gradient_like(*samples, *params, *seed);
            (Source::Memory(g), "synthetic gradients".to_string(), InputInfo::Synthetic { seed: *seed })
        }
    };
    let params = match &source {
        Source::File { rows, .. } => rows.cols(),
        Source::Memory(g) => g.ncols(),
    };
    form.validate(params)
        .with_context(|| format!("--form {} does not fit {what}", form))?;
    seconds.load += start.elapsed().as_secs_f64();
    Ok((source, what, info))
}

/// Streams a file through the backend's accumulator: a reader thread reads and checks the
/// next chunk while the current one is being reduced, and memory stays at a few chunks
/// whatever N is.
fn reduce_streaming(
    engine: &Engine,
    mut rows: NpyRows,
    what: &str,
    form: &Form,
    chunk_rows: Option<usize>,
    seconds: &mut Seconds,
) -> anyhow::Result<FisherMatrix> {
    let params = rows.cols();
    rows.set_chunk_rows(chunk_rows.unwrap_or(CHUNK_BYTES / (4 * params)));
    let start = Instant::now();
    let mut acc = engine.backend().accumulator(form, params)?;
    seconds.compute += start.elapsed().as_secs_f64();

    std::thread::scope(|scope| -> anyhow::Result<()> {
        // Capacity 1: one chunk may wait while the next is read; more would only cost memory.
        let (sender, receiver) = mpsc::sync_channel::<fisher_engine::Result<Array2<f32>>>(1);
        scope.spawn(move || {
            let mut first_row = 0;
            for chunk in rows {
                let chunk = chunk.and_then(|c| {
                    check_matrix(what, c.view(), first_row)?;
                    first_row += c.nrows();
                    Ok(c)
                });
                let failed = chunk.is_err();
                // A failed send means the consumer stopped (it hit an error): stop reading.
                if sender.send(chunk).is_err() || failed {
                    break;
                }
            }
        });
        loop {
            let waited = Instant::now();
            let Ok(chunk) = receiver.recv() else { break }; // reader finished
            seconds.load += waited.elapsed().as_secs_f64();
            let chunk = chunk?;
            let start = Instant::now();
            acc.push(chunk.view())?;
            seconds.compute += start.elapsed().as_secs_f64();
        }
        Ok(())
    })?;

    let start = Instant::now();
    let result = acc.finish()?;
    seconds.compute += start.elapsed().as_secs_f64();
    Ok(result)
}

/// Runs a (non-demo) `reduce`.
pub fn run(cfg: &ReduceConfig) -> anyhow::Result<Outcome> {
    let mut seconds = Seconds::default();
    if let Some(out) = &cfg.out {
        io::check_output_path(out)?;
    }
    let (source, what, input) = open_source(&cfg.input, &cfg.form, &mut seconds)?;

    let start = Instant::now();
    let device = device::open(&DeviceRequest::from_env(cfg.backend, cfg.gpu.clone())?)?;
    seconds.setup = start.elapsed().as_secs_f64();
    let engine = &device.engine;

    // Gram pairs every sample with every other, and the reference needs all of G: both
    // read the whole matrix. Everything else streams.
    let needs_whole = cfg.form == Form::Gram || cfg.verify;
    let (samples, params, result, verification) = match source {
        Source::File { rows, .. } if !needs_whole => {
            let (samples, params) = (rows.rows(), rows.cols());
            let result = reduce_streaming(engine, rows, &what, &cfg.form, cfg.chunk_rows, &mut seconds)?;
            (samples, params, result, None)
        }
        source => {
            let start = Instant::now();
            let g = match source {
                Source::Memory(g) => g,
                Source::File { path, .. } => io::read_npy_matrix(&path)?,
            };
            check_matrix(&what, g.view(), 0)?;
            seconds.load += start.elapsed().as_secs_f64();

            let start = Instant::now();
            let result = engine.fisher_from_grads(g.view(), &cfg.form)?;
            seconds.compute += start.elapsed().as_secs_f64();

            let verification = if cfg.verify {
                let start = Instant::now();
                let reference =
                    reference::reduce(g.view(), &cfg.form).context("computing the f64 reference")?;
                let contract = Contract::reduction(&cfg.form, g.nrows(), g.ncols());
                let verdict = Verdict::judge(result.agreement(&reference)?, contract);
                seconds.verify = start.elapsed().as_secs_f64();
                Some(verdict.require(&engine.device_info())?)
            } else {
                None
            };
            (g.nrows(), g.ncols(), result, verification)
        }
    };

    let trace = result.trace();
    let file = FisherFile::of_reduction(result, &cfg.form, samples, params, &engine.device_info());
    let tensors = file.tensor_shapes();

    let out = match &cfg.out {
        Some(path) => {
            let start = Instant::now();
            fisher_file::write(path, &file)?;
            seconds.write = start.elapsed().as_secs_f64();
            let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            Some((path.clone(), size))
        }
        None => None,
    };

    Ok(Outcome {
        input,
        samples,
        params,
        form: cfg.form.clone(),
        backend: engine.device_info(),
        adapter: device.adapter.map(|a| a.name),
        fallback: device.fallback,
        tensors,
        trace,
        verification,
        out,
        seconds,
    })
}

/// The built-in demonstration: reduce synthetic G on the requested path and on the other
/// one when available (GPU and CPU), and compare both with the f64 reference.
pub fn run_demo(
    cfg: &ReduceConfig,
    samples: usize,
    params: usize,
    seed: u64,
    progress: impl FnMut(&str),
) -> anyhow::Result<Comparison> {
    let start = Instant::now();
    let g = fisher_engine::synthetic::gradient_like(samples, params, seed);
    let generate = start.elapsed().as_secs_f64();
    cfg.form
        .validate(params)
        .with_context(|| format!("--form {} does not fit synthetic gradients", cfg.form))?;

    let start = Instant::now();
    let primary = device::open(&DeviceRequest::from_env(cfg.backend, cfg.gpu.clone())?)?;
    let primary_setup = start.elapsed().as_secs_f64();
    let mut devices = vec![(primary_setup, primary.engine)];
    let note = match (&primary.fallback, cfg.backend) {
        (Some(why), _) => Some(format!("{why}, so only the CPU path ran")),
        (None, Backend::Cpu) => Some("--backend cpu: the GPU path was not run".to_string()),
        (None, _) => {
            devices.push((0.0, Engine::cpu()));
            None
        }
    };
    let engines: Vec<(f64, &Engine)> = devices.iter().map(|(setup, engine)| (*setup, engine)).collect();
    Ok(compare_paths(&g, seed, generate, &cfg.form, &engines, note, progress)?)
}

// ---------------------------------------------------------------------------------------
// Reports: readable summaries and one-line JSON

fn verification_text(v: &Verdict) -> String {
    let a = &v.agreement;
    format!(
        "max|Δ| {:.2e} · max|Δ|/max|ref| {:.2e} (tolerance {:.2e}) · ‖Δ‖/‖ref‖ {:.2e}",
        a.max_abs, a.max_rel, v.bound, a.frobenius_rel
    )
}

/// The readable summary of a `reduce` run.
pub fn human(o: &Outcome) -> String {
    let mut lines = vec![format!("{} of {} samples × {} parameters", o.form.description(), o.samples, o.params)];
    lines.push(match &o.input {
        InputInfo::File { path, dtype } => format!("  input     {} ({dtype})", path.display()),
        InputInfo::Synthetic { seed } => format!("  input     built-in gradient-like data (seed {seed})"),
    });
    lines.push(format!("  backend   {}", o.backend));
    if let Some(why) = &o.fallback {
        lines.push(format!("            ({why})"));
    }
    lines.push(format!("  result    {}   tr F = {:.6e}", tensor_list(&o.tensors), o.trace));
    if let Some(v) = &o.verification {
        lines.push(format!("  verified  {} against the f64 reference", verification_text(v)));
    }
    match &o.out {
        Some((path, size)) => lines.push(format!("  wrote     {} ({})", path.display(), bytes(*size))),
        None => lines.push("  wrote     nothing (no --out)".into()),
    }
    let s = &o.seconds;
    lines.push(format!(
        "  seconds   load {:.3} · setup {:.3} · compute {:.3} · verify {:.3} · write {:.3}",
        s.load, s.setup, s.compute, s.verify, s.write
    ));
    lines.join("\n")
}

/// The one-line JSON summary of a `reduce` run.
pub fn json_line(o: &Outcome) -> String {
    let mut value = json!({
        "samples": o.samples,
        "parameters": o.params,
        "form": o.form.to_string(),
        "backend": o.backend,
        "adapter": o.adapter,
        "tensors": o.tensors.iter().map(|(name, shape)| json!({"name": name, "shape": shape})).collect::<Vec<_>>(),
        "trace": o.trace,
        "seconds": o.seconds,
        "out": o.out.as_ref().map(|(path, _)| path.display().to_string()),
    });
    match &o.input {
        InputInfo::File { path, dtype } => {
            value["input"] = json!(path.display().to_string());
            value["dtype"] = json!(dtype);
        }
        InputInfo::Synthetic { seed } => {
            value["input"] = json!("synthetic");
            value["seed"] = json!(seed);
        }
    }
    if let Some(v) = &o.verification {
        value["verification"] = json!(v);
    }
    value.to_string()
}

/// The table of the built-in demonstration.
pub fn demo_text(d: &Comparison) -> String {
    let rel = match d.form {
        Form::Full | Form::BlockDiagonal(_) => "max|F|",
        Form::Gram => "max|K|",
        _ => "max|ref|",
    };
    let mut lines = vec![
        format!(
            "Built-in gradient-like data G: N = {} samples × P = {} parameters (seed {}; generated in {:.3} s)",
            d.samples, d.params, d.seed, d.generate
        ),
        format!("Form: {} → {}", d.form.description(), tensor_list(&d.tensors)),
        String::new(),
    ];
    let width = d.runs.iter().map(|r| r.label.chars().count()).max().unwrap_or(0).max(13);
    lines.push(format!(
        "  {:<width$}  {:>8}  {:>9}  {:>12}  {:>14}  {:>10}",
        "path",
        "setup s",
        "compute s",
        "tr F",
        format!("max|Δ|/{rel}"),
        "‖Δ‖/‖ref‖"
    ));
    for r in &d.runs {
        lines.push(format!(
            "  {:<width$}  {:>8.3}  {:>9.4}  {:>12.6e}  {:>14.2e}  {:>10.2e}",
            r.label,
            r.setup,
            r.compute,
            r.trace,
            r.verification.agreement.max_rel,
            r.verification.agreement.frobenius_rel
        ));
    }
    lines.push(format!(
        "  {:<width$}  {:>8}  {:>9.4}  {:>12.6e}  {:>14}  {:>10}",
        "f64 reference", "", d.reference_seconds, d.reference_trace, "(oracle)", ""
    ));
    lines.push(String::new());

    if let Some(a) = &d.gpu_vs_cpu {
        lines.push(format!("GPU vs CPU: max|Δ|/{rel} = {:.2e}, ‖Δ‖/‖CPU‖ = {:.2e}.", a.max_rel, a.frobenius_rel));
    }
    if let Some(note) = &d.note {
        lines.push(format!("Note: {note}."));
    }
    let tolerance = d.runs.first().map_or(0.0, |r| r.verification.bound);
    let failed: Vec<&str> = d.runs.iter().filter(|r| !r.verification.passed).map(|r| r.label.as_str()).collect();
    if failed.is_empty() {
        lines.push(format!(
            "Every path matches the f64 reference within the f32 tolerance for sums of {} terms \
             (max|Δ| ≤ {tolerance:.2e}·{rel}).",
            d.terms
        ));
    } else {
        lines.push(format!(
            "MISMATCH: {} disagree(s) with the f64 reference beyond the f32 tolerance {tolerance:.2e}·{rel}.",
            failed.join(" and ")
        ));
    }
    lines.push(String::new());
    lines.push("Nothing was written. On your own per-sample gradients (an N×P .npy file):".into());
    lines.push(format!(
        "  fisher reduce --grads G.npy --form {} --out F.safetensors [--verify]",
        d.form
    ));
    lines.join("\n")
}
