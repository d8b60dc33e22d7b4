//! Per-sample gradients G (N×P) to a Fisher form, and the built-in comparison of the
//! compute paths.
//!
//! Every check that can fail on the caller's input runs before the output file is created:
//! the output directory, the `.npy` header (dtype, rank, order, emptiness, length) and the
//! form against P are checked before any compute; non-finite values are found while
//! streaming, before anything is written; the write itself goes through a temporary file.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

use ndarray::Array2;

use super::{with_limit, file_size, since, RunError, Seconds, TracedStream};
use crate::fisher::{NetForm, ResultSink, TraceOf};
use crate::io::output::Target;
use crate::backend::gpu::GpuOptions;
use crate::compare::{compare_paths, Comparison};
use crate::device::{self, DeviceRequest};
use crate::error::FisherError;
use crate::io::fisher_file::{self, FisherFile};
use crate::io::{self, NpyRows};
use crate::reference::grads as reference;
use crate::validate::check_matrix;
use crate::verify::{Contract, Verdict};
use crate::{Backend, Engine, FisherMatrix, Form};

/// Bytes of G per streamed chunk. Large enough that per-chunk overheads (a GPU submission,
/// a thread hand-off) vanish; small enough that the at most three chunks alive at once
/// (one reading, one queued, one computing) are a small fixed amount of memory.
pub const CHUNK_BYTES: usize = 64 << 20;

/// Where the gradients come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A 2-D float32/float64 C-order `.npy` file.
    File(PathBuf),
    /// [`crate::synthetic::gradient_like`]`(samples, params, seed)`.
    Synthetic {
        /// N.
        samples: usize,
        /// P.
        params: usize,
        /// Seed.
        seed: u64,
    },
}

/// A reduction to run.
#[derive(Debug, Clone)]
pub struct ReduceRequest {
    /// The gradients.
    pub input: Input,
    /// The form (checked against P once the input is open).
    pub form: Form,
    /// Requested compute path.
    pub backend: Backend,
    /// Adapter choice.
    pub gpu: GpuOptions,
    /// Output file; `None` computes and reports only.
    pub out: Option<PathBuf>,
    /// Compare with the f64 reference (loads all of G); outside the tolerance the run fails.
    pub verify: bool,
    /// Samples per streamed chunk (`None`: as many as fill [`CHUNK_BYTES`]).
    pub chunk_rows: Option<usize>,
    /// Replace an existing output file (the output policy of [`crate::io::output`]).
    pub force: bool,
    /// Largest result (with `verify`, plus its f64 reference) held in host memory, in bytes.
    pub max_result_bytes: u128,
}

/// What a reduction did.
#[derive(Debug)]
pub struct ReduceOutcome {
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
    /// Disagreement with the f64 reference (`verify`); always a pass here.
    pub verification: Option<Verdict>,
    /// The file written and its size in bytes.
    pub out: Option<(PathBuf, u64)>,
    /// Seconds per stage (no `save`).
    pub seconds: Seconds,
}

/// Where G came from, for the report.
#[derive(Debug, Clone)]
pub enum InputInfo {
    /// A `.npy` file and its element type.
    File {
        /// The file.
        path: PathBuf,
        /// numpy's name of its dtype (`float32`, `float64`).
        dtype: &'static str,
    },
    /// [`crate::synthetic::gradient_like`] with this seed.
    Synthetic {
        /// The seed.
        seed: u64,
    },
}

/// G, before it is read: a streamable file or a matrix already in memory.
enum Grads {
    File { path: PathBuf, rows: NpyRows },
    Memory(Array2<f32>),
}

/// Checks `form` against P, naming the gradients on refusal.
fn check_form(form: &Form, params: usize, what: &str) -> Result<(), RunError> {
    form.validate(params).map_err(|source| RunError::FormDoesNotFit { form: form.to_string(), what: what.into(), source })
}

/// Opens the input (the header only, for a file) and checks the form against P.
fn open_input(input: &Input, form: &Form, seconds: &mut Seconds) -> Result<(Grads, String, InputInfo), RunError> {
    let start = Instant::now();
    let (grads, what, info) = match input {
        Input::File(path) => {
            let rows = NpyRows::open(path, 1)?;
            let info = InputInfo::File { path: path.clone(), dtype: rows.dtype() };
            (Grads::File { path: path.clone(), rows }, path.display().to_string(), info)
        }
        Input::Synthetic { samples, params, seed } => {
            let g = crate::synthetic::gradient_like(*samples, *params, *seed);
            (Grads::Memory(g), "synthetic gradients".to_string(), InputInfo::Synthetic { seed: *seed })
        }
    };
    let params = match &grads {
        Grads::File { rows, .. } => rows.cols(),
        Grads::Memory(g) => g.ncols(),
    };
    check_form(form, params, &what)?;
    seconds.load += since(start);
    Ok((grads, what, info))
}

/// Streams a file through the backend's accumulator: a reader thread reads and checks the
/// next chunk while the current one is being reduced, and memory stays at a few chunks
/// whatever N is. A full F whose sums do not fit the backend's memory at once is summed in
/// several passes (output panels), each reading the file again from `path`. With a `sink`,
/// each pass's band goes into it as the pass ends ([`crate::Accumulator::next_pass_into`]),
/// then the rest ([`crate::Accumulator::finish_into`]), and nothing is returned.
#[allow(clippy::too_many_arguments)]
fn reduce_streaming(
    engine: &Engine,
    path: &Path,
    mut rows: NpyRows,
    what: &str,
    form: &Form,
    chunk_rows: Option<usize>,
    seconds: &mut Seconds,
    mut sink: Option<&mut dyn ResultSink>,
) -> Result<Option<FisherMatrix>, FisherError> {
    let (samples, params) = (rows.rows(), rows.cols());
    let chunk_rows = chunk_rows.unwrap_or(CHUNK_BYTES / (4 * params));
    rows.set_chunk_rows(chunk_rows);
    let start = Instant::now();
    let mut acc = engine.backend().accumulator(form, params)?;
    seconds.compute += since(start);
    let passes = acc.passes();
    let mut rows = Some(rows);
    for pass in 0..passes {
        if pass > 0 {
            match sink.as_deref_mut() {
                Some(sink) => acc.next_pass_into(sink)?,
                None => acc.next_pass()?,
            }
        }
        let this = match rows.take() {
            Some(rows) => rows,
            None => {
                let start = Instant::now();
                let mut again = NpyRows::open(path, 1)?;
                if (again.rows(), again.cols()) != (samples, params) {
                    return Err(FisherError::InvalidInput(format!(
                        "{}: changed while it was being read (now {}×{}, was {samples}×{params})",
                        path.display(),
                        again.rows(),
                        again.cols()
                    )));
                }
                again.set_chunk_rows(chunk_rows);
                seconds.load += since(start);
                again
            }
        };
        stream_pass(acc.as_mut(), this, what, seconds)?;
    }

    let start = Instant::now();
    let result = match sink {
        Some(sink) => {
            acc.finish_into(sink)?;
            None
        }
        None => Some(acc.finish()?),
    };
    seconds.compute += since(start);
    Ok(result)
}

/// One pass of [`reduce_streaming`]: every chunk of `rows`, read and checked on a reader
/// thread, pushed into `acc`.
fn stream_pass(acc: &mut dyn crate::backend::Accumulator, rows: NpyRows, what: &str, seconds: &mut Seconds) -> Result<(), FisherError> {
    std::thread::scope(|scope| -> Result<(), FisherError> {
        // Capacity 1: one chunk may wait while the next is read; more would only cost memory.
        let (sender, receiver) = mpsc::sync_channel::<crate::Result<Array2<f32>>>(1);
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
            seconds.load += since(waited);
            let chunk = chunk?;
            let start = Instant::now();
            acc.push(chunk.view())?;
            seconds.compute += since(start);
        }
        Ok(())
    })
}

/// Values of the result of `form` over N = `samples` rows of P = `params` (Gram N², full
/// P², blocks Σ b², diag P, norms N), with the count in words; `None` when it does not fit
/// in u128 (it is then beyond any limit).
pub fn result_values(form: &Form, samples: usize, params: usize) -> Option<(u128, String)> {
    let (n, p) = (samples as u128, params as u128);
    Some(match form {
        Form::Full => (p.checked_mul(p)?, format!("P×P = {p}×{p}")),
        Form::Gram => (n.checked_mul(n)?, format!("N×N = {n}×{n}")),
        Form::Diagonal => (p, format!("P = {p}")),
        Form::SampleNorms => (n, format!("N = {n}")),
        Form::BlockDiagonal(sizes) => {
            let mut total = 0u128;
            for &b in sizes {
                total = total.checked_add((b as u128).checked_mul(b as u128)?)?;
            }
            (total, "Σ b² over the blocks".to_string())
        }
    })
}

/// Refuses, before any work, a result (with `verify`, plus the f64 reference and the whole
/// G it loads) beyond `limit` bytes of host memory.
fn check_result_size(form: &Form, samples: usize, params: usize, verify: bool, limit: u128) -> Result<(), FisherError> {
    let (values, what) = result_values(form, samples, params).unwrap_or((u128::MAX, "more than 2¹²⁸".into()));
    let mut needed = values.saturating_mul(if verify { 4 + 8 } else { 4 });
    if verify {
        needed = needed.saturating_add((samples as u128).saturating_mul(params as u128).saturating_mul(4));
    }
    if needed <= limit {
        return Ok(());
    }
    let gib = |b: u128| format!("{:.3} GiB", b as f64 / (1u64 << 30) as f64);
    Err(FisherError::InvalidInput(format!(
        "--form {form} holds {what} values ({}{}) in host memory, beyond the --max-result-gib limit of {}",
        gib(needed),
        if verify { " with G and the f64 reference for --verify" } else { "" },
        gib(limit)
    )))
}

/// Runs a reduction: open the input, the device, reduce (streaming from a file unless the
/// form is `gram` or `verify` needs all of G), verify, write.
pub fn run(request: &ReduceRequest) -> Result<ReduceOutcome, RunError> {
    let mut seconds = Seconds::default();
    if let Some(out) = &request.out {
        let inputs: Vec<(&str, &std::path::Path)> = match &request.input {
            Input::File(path) => vec![("--grads", path.as_path())],
            Input::Synthetic { .. } => Vec::new(),
        };
        Target::check(out, "--out", request.force, &inputs)?;
    }
    let form = &request.form;
    let (grads, what, input) = open_input(&request.input, form, &mut seconds)?;
    let (samples, params) = match &grads {
        Grads::File { rows, .. } => (rows.rows(), rows.cols()),
        Grads::Memory(g) => (g.nrows(), g.ncols()),
    };
    check_result_size(form, samples, params, request.verify, request.max_result_bytes)?;

    let start = Instant::now();
    let device = device::open(&DeviceRequest::from_env(request.backend, with_limit(&request.gpu, request.max_result_bytes))?)?;
    seconds.setup = since(start);
    let engine = &device.engine;

    // Gram pairs every sample with every other, and the reference needs all of G: both
    // read the whole matrix. Everything else streams.
    let needs_whole = *form == Form::Gram || request.verify;
    let (samples, params, done, verification) = match grads {
        // A full F into a regular file: band by band into the file as the passes end (a full
        // F beyond host memory), never whole in memory.
        Grads::File { path, rows } if *form == Form::Full && !request.verify && request.out.is_some() => {
            let (samples, params) = (rows.rows(), rows.cols());
            let out = request.out.as_ref().expect("checked");
            let tensors = vec![("fisher".to_string(), vec![params, params])];
            let metadata = fisher_file::reduction_metadata(form, samples, params, &engine.device_info());
            match io::safetensors::SafetensorsStream::create(out, &tensors, Some(metadata))? {
                Some(stream) => {
                    let mut sink = TracedStream { stream, trace: TraceOf::new(NetForm::Full, &[vec![params, params]]) };
                    reduce_streaming(engine, &path, rows, &what, form, request.chunk_rows, &mut seconds, Some(&mut sink))?;
                    let start = Instant::now();
                    sink.stream.commit()?;
                    seconds.write = since(start);
                    (samples, params, Done::Written { trace: sink.trace.trace(), tensors }, None)
                }
                None => {
                    let result = reduce_streaming(engine, &path, rows, &what, form, request.chunk_rows, &mut seconds, None)?;
                    (samples, params, Done::Result(result.expect("no sink")), None)
                }
            }
        }
        Grads::File { path, rows } if !needs_whole => {
            let (samples, params) = (rows.rows(), rows.cols());
            let result = reduce_streaming(engine, &path, rows, &what, form, request.chunk_rows, &mut seconds, None)?;
            (samples, params, Done::Result(result.expect("no sink")), None)
        }
        grads => {
            let start = Instant::now();
            let g = match grads {
                Grads::Memory(g) => g,
                Grads::File { path, .. } => io::read_npy_matrix(&path)?,
            };
            check_matrix(&what, g.view(), 0)?;
            seconds.load += since(start);

            let start = Instant::now();
            let result = engine.fisher_from_grads(g.view(), form)?;
            seconds.compute += since(start);

            let verification = if request.verify {
                let start = Instant::now();
                let reference =
                    reference::reduce(g.view(), form).map_err(RunError::context("computing the f64 reference"))?;
                let contract = Contract::reduction(form, g.nrows(), g.ncols());
                let verdict = Verdict::judge(result.agreement(&reference)?, contract);
                seconds.verify = since(start);
                Some(verdict.require(&engine.device_info())?)
            } else {
                None
            };
            (g.nrows(), g.ncols(), Done::Result(result), verification)
        }
    };

    let (trace, tensors, out) = match done {
        Done::Written { trace, tensors } => {
            let path = request.out.as_ref().expect("a written result has an output file");
            (trace, tensors, Some((path.clone(), file_size(path))))
        }
        Done::Result(result) => {
            let trace = result.trace();
            let file = FisherFile::of_reduction(result, form, samples, params, &engine.device_info());
            let out = match &request.out {
                Some(path) => {
                    let start = Instant::now();
                    fisher_file::write(path, &file)?;
                    seconds.write = since(start);
                    Some((path.clone(), file_size(path)))
                }
                None => None,
            };
            (trace, file.tensor_shapes(), out)
        }
    };

    Ok(ReduceOutcome {
        input,
        samples,
        params,
        form: form.clone(),
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

/// What a reduction left: its result in memory, or already written band by band (with the
/// trace taken on the way and the tensors written).
enum Done {
    Result(FisherMatrix),
    Written { trace: f64, tensors: Vec<(String, Vec<usize>)> },
}

/// The built-in comparison: reduce `gradient_like(samples, params, seed)` to `form` on the
/// requested path and, beside a GPU, on the CPU path too, and judge both against one f64
/// reference ([`compare_paths`]). `progress` hears what runs next.
pub fn compare(
    form: &Form,
    backend: Backend,
    gpu: &GpuOptions,
    (samples, params, seed): (usize, usize, u64),
    progress: impl FnMut(&str),
) -> Result<Comparison, RunError> {
    let start = Instant::now();
    let g = crate::synthetic::gradient_like(samples, params, seed);
    let generate = since(start);
    check_form(form, params, "synthetic gradients")?;

    let start = Instant::now();
    let primary = device::open(&DeviceRequest::from_env(backend, gpu.clone())?)?;
    let mut devices = vec![(since(start), primary.engine)];
    let note = match (&primary.fallback, backend) {
        (Some(why), _) => Some(format!("{why}, so only the CPU path ran")),
        (None, Backend::Cpu) => Some("--backend cpu: the GPU path was not run".to_string()),
        (None, _) => {
            devices.push((0.0, Engine::cpu()));
            None
        }
    };
    let engines: Vec<(f64, &Engine)> = devices.iter().map(|(setup, engine)| (*setup, engine)).collect();
    Ok(compare_paths(&g, seed, generate, form, &engines, note, progress)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(input: Input, form: Form, out: Option<PathBuf>) -> ReduceRequest {
        ReduceRequest {
            input,
            form,
            backend: Backend::Cpu,
            gpu: GpuOptions::default(),
            out,
            verify: false,
            chunk_rows: None,
            force: false,
            max_result_bytes: 2 << 30,
        }
    }

    #[test]
    fn streamed_file_equals_in_memory_and_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let g = crate::synthetic::gradient_like(37, 6, 3);
        let path = dir.path().join("G.npy");
        io::write_npy_matrix(&path, g.view()).unwrap();
        let mut streamed = request(Input::File(path), Form::Full, Some(dir.path().join("F.safetensors")));
        streamed.chunk_rows = Some(5); // several chunks, the last one short
        let a = run(&streamed).unwrap();
        let mut memory = request(Input::Synthetic { samples: 37, params: 6, seed: 3 }, Form::Full, None);
        memory.verify = true;
        let b = run(&memory).unwrap();
        assert!((a.trace - b.trace).abs() <= 1e-6 * b.trace);
        assert_eq!((a.samples, a.params, &a.tensors), (37, 6, &b.tensors));
        assert!(a.out.unwrap().1 > 0 && b.out.is_none());
        assert!(b.verification.unwrap().passed);
    }

    #[test]
    fn form_that_does_not_fit_is_refused() {
        let req = request(Input::Synthetic { samples: 4, params: 5, seed: 0 }, Form::BlockDiagonal(vec![2, 2]), None);
        let err = run(&req).unwrap_err();
        assert!(matches!(&err, RunError::FormDoesNotFit { what, .. } if what == "synthetic gradients"), "{err:?}");
    }

    #[test]
    fn comparison_on_cpu() {
        let c = compare(&Form::Diagonal, Backend::Cpu, &GpuOptions::default(), (64, 8, 1), |_| {}).unwrap();
        assert_eq!(c.runs.len(), 1);
        assert!(c.failed().is_empty());
        assert!(c.note.is_some());
    }
}
