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
use fisher_engine::verify::{reduction_length, Contract, Verdict};
use fisher_engine::validate::check_matrix;
use fisher_engine::{Agreement, Backend, Engine, FisherMatrix, Form};
use ndarray::Array2;

use super::args::{Input, ReduceConfig};

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

/// One compute path in the demonstration.
#[derive(Debug)]
pub struct DemoRun {
    /// Backend label.
    pub label: String,
    /// Seconds to set the backend up (device, kernels).
    pub setup: f64,
    /// Seconds of the reduction.
    pub compute: f64,
    /// tr F from this path.
    pub trace: f64,
    /// Disagreement with the f64 reference, judged.
    pub verification: Verdict,
    /// Whether this is a GPU path.
    pub gpu: bool,
    /// The result's values (for the GPU-vs-CPU comparison).
    values: Vec<f64>,
}

/// What the demonstration measured.
#[derive(Debug)]
pub struct Demo {
    /// N.
    pub samples: usize,
    /// P.
    pub params: usize,
    /// Seed of the synthetic data.
    pub seed: u64,
    /// The form.
    pub form: Form,
    /// Names and shapes of the result's tensors.
    pub tensors: Vec<(String, Vec<usize>)>,
    /// Seconds to generate G.
    pub generate: f64,
    /// The compute paths, the requested one first.
    pub runs: Vec<DemoRun>,
    /// Seconds of the f64 reference.
    pub reference_seconds: f64,
    /// tr F from the reference.
    pub reference_trace: f64,
    /// GPU result vs CPU result, when both ran.
    pub gpu_vs_cpu: Option<Agreement>,
    /// Why a path is missing from the comparison.
    pub note: Option<String>,
    /// Products summed per entry (what the tolerance depends on).
    pub terms: usize,
}

/// The built-in demonstration: reduce synthetic G on the requested path and on the other
/// one when available (GPU and CPU), and compare both with the f64 reference.
pub fn run_demo(
    cfg: &ReduceConfig,
    samples: usize,
    params: usize,
    seed: u64,
    progress: impl FnMut(&str),
) -> anyhow::Result<Demo> {
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
    compare_paths(&g, seed, generate, &cfg.form, &engines, note, progress)
}

/// Reduces `g` to `form` on each of `engines` (with the seconds each took to set up), and
/// compares every result with one f64 reference: the body of the built-in demonstration,
/// shared with `fisher demo`. `seed` and `generate` (seconds) describe how `g` was made.
pub fn compare_paths(
    g: &Array2<f32>,
    seed: u64,
    generate: f64,
    form: &Form,
    engines: &[(f64, &Engine)],
    note: Option<String>,
    mut progress: impl FnMut(&str),
) -> anyhow::Result<Demo> {
    let (samples, params) = g.dim();
    let mut runs = Vec::new();
    let mut tensors = Vec::new();
    let mut results = Vec::new();
    for &(setup, engine) in engines {
        progress(&format!("reducing on {}", engine.device_info()));
        let start = Instant::now();
        let result = engine.fisher_from_grads(g.view(), form)?;
        let compute = start.elapsed().as_secs_f64();
        if tensors.is_empty() {
            let file = FisherFile::of_reduction(result.clone(), form, samples, params, "");
            tensors = file.tensor_shapes();
        }
        results.push((setup, compute, engine.device_info(), engine.is_gpu(), result));
    }

    progress("computing the f64 reference (plain compensated loops: slow by design)");
    let start = Instant::now();
    let reference = reference::reduce(g.view(), form).context("computing the f64 reference")?;
    let reference_seconds = start.elapsed().as_secs_f64();
    for (setup, compute, label, gpu, result) in results {
        let verification = Verdict::judge(result.agreement(&reference)?, Contract::reduction(form, samples, params));
        runs.push(DemoRun { label, setup, compute, trace: result.trace(), verification, gpu, values: result.values() });
    }

    let gpu_vs_cpu = match (runs.iter().find(|r| r.gpu), runs.iter().find(|r| !r.gpu)) {
        (Some(gpu), Some(cpu)) => Some(fisher_engine::fisher::agreement_of(&gpu.values, &cpu.values)),
        _ => None,
    };
    Ok(Demo {
        samples,
        params,
        seed,
        form: form.clone(),
        tensors,
        generate,
        runs,
        reference_seconds,
        reference_trace: reference.trace(),
        gpu_vs_cpu,
        note,
        terms: reduction_length(form, samples, params),
    })
}
