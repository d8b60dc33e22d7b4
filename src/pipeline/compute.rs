//! The Fisher information of an MLP on data, in any variant and form.
//!
//! Flow: the model and the data, loaded from files or built in memory, and checked against
//! each other → the size of the result checked against [`ComputeRequest::max_result_bytes`]
//! → the synthetic files saved ([`ComputeRequest::save_model`], [`ComputeRequest::save_data`])
//! → device → compute → the f64 reference ([`ComputeRequest::verify`]) → atomic write.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::{with_limit, file_size, load_problem, since, ResultTooLarge, RunError, Seconds, Source, TracedStream};
use crate::io::output::{output_dir, Target};
use crate::backend::gpu::GpuOptions;
use crate::device::{self, DeviceRequest};
use crate::error::FisherError;
use crate::fisher::{rows_per_sample, NetForm, TraceOf, Variant};
use crate::fisher::DEFAULT_BLOCK_SAMPLES;
use crate::io::fisher_file::{self, FisherFile};
use crate::io::partial::{self, PartialFile};
use super::merge;
use crate::io;
use crate::model::{ActivationSpec, DataSource, Likelihood, Mlp, Targets};
use crate::verify::{Contract, Verdict};
use crate::Backend;

/// What to compute, and where the results go.
#[derive(Debug, Clone)]
pub struct ComputeRequest {
    /// Model and data.
    pub source: Source,
    /// Activations between the layers.
    pub activation: ActivationSpec,
    /// The likelihood.
    pub likelihood: Likelihood,
    /// The variant.
    pub variant: Variant,
    /// The form; `None`: only save the synthetic files.
    pub form: Option<NetForm>,
    /// Requested compute path.
    pub backend: Backend,
    /// Adapter choice.
    pub gpu: GpuOptions,
    /// The output file; required with a form.
    pub out: Option<PathBuf>,
    /// Compare with the f64 reference; a result outside [`Contract::Network`] fails the run.
    pub verify: bool,
    /// Largest result (with `verify`, plus its f64 reference) held in host memory, in bytes.
    pub max_result_bytes: u128,
    /// Where to save the synthetic model (safetensors).
    pub save_model: Option<PathBuf>,
    /// A directory for the synthetic data (`inputs.npy`, `labels.npy`).
    pub save_data: Option<PathBuf>,
    /// Replace existing output files (the output policy of [`crate::io::output`]).
    pub force: bool,
    /// Samples per block of the exact accumulation order ([`crate::fisher::sums`]);
    /// `None`: [`crate::fisher::DEFAULT_BLOCK_SAMPLES`]. Shards of a run and the single run
    /// agree bit for bit (CPU) when they use the same block.
    pub block_samples: Option<usize>,
    /// Compute only shard i of n ([`crate::fisher::shard_range`]) and write its exact sums
    /// to [`ComputeRequest::partial`] instead of a result to `out`; `fisher merge` combines
    /// the parts.
    pub shard: Option<(usize, usize)>,
    /// The partial file of a shard.
    pub partial: Option<PathBuf>,
}

impl ComputeRequest {
    /// A request with the defaults of `fisher compute`: categorical likelihood, the true
    /// Fisher, no form, no output, no verification, a 2 GiB result limit.
    pub fn new(source: Source, activation: ActivationSpec, backend: Backend) -> Self {
        ComputeRequest {
            source,
            activation,
            likelihood: Likelihood::Categorical,
            variant: Variant::True,
            form: None,
            backend,
            gpu: GpuOptions::default(),
            out: None,
            verify: false,
            max_result_bytes: 2 << 30,
            save_model: None,
            save_data: None,
            force: false,
            block_samples: None,
            shard: None,
            partial: None,
        }
    }
}

/// What a compute run did.
#[derive(Debug)]
pub struct ComputeOutcome {
    /// Layer widths: input, then every layer's output.
    pub widths: Vec<usize>,
    /// The layers' Sequential indices.
    pub layer_indices: Vec<usize>,
    /// Activation names, one per gap.
    pub activations: Vec<&'static str>,
    /// P.
    pub params: usize,
    /// N.
    pub samples: usize,
    /// R, gradient rows per sample.
    pub rows_per_sample: usize,
    /// The backend's label (`None` when only the synthetic files were saved).
    pub backend: Option<String>,
    /// GPU adapter name, when on a GPU.
    pub adapter: Option<String>,
    /// Why Auto fell back to the CPU.
    pub fallback: Option<String>,
    /// Names and shapes of the written tensors.
    pub tensors: Vec<(String, Vec<usize>)>,
    /// tr F (kfac: tr(G ⊗ A) summed over layers).
    pub trace: Option<f64>,
    /// Agreement with the f64 reference (`verify`); always a pass here.
    pub verification: Option<Verdict>,
    /// The file written and its size in bytes.
    pub out: Option<(PathBuf, u64)>,
    /// Synthetic files written.
    pub saved: Saved,
    /// Seconds per stage (`save` always present).
    pub seconds: Seconds,
    /// For a shard: (i, n) and the samples it summed.
    pub shard: Option<((usize, usize), std::ops::Range<usize>)>,
}

impl ComputeOutcome {
    /// The outcome of a run on `mlp` and `samples` samples before anything is computed.
    fn of_model(mlp: &Mlp, samples: usize, rows: usize, saved: Saved, seconds: Seconds) -> Self {
        ComputeOutcome {
            widths: mlp.widths(),
            layer_indices: mlp.layers.iter().map(|l| l.index).collect(),
            activations: mlp.activations.iter().map(|a| a.name()).collect(),
            params: mlp.num_params(),
            samples,
            rows_per_sample: rows,
            backend: None,
            adapter: None,
            fallback: None,
            tensors: Vec::new(),
            trace: None,
            verification: None,
            out: None,
            saved,
            seconds,
            shard: None,
        }
    }
}

/// The synthetic files a run wrote.
#[derive(Debug, Default, Clone)]
pub struct Saved {
    /// The model file.
    pub model: Option<PathBuf>,
    /// Inputs and labels.
    pub data: Option<(PathBuf, PathBuf)>,
}

/// Values of the host-memory result of `form` (f32) with the count in words, or `None` for
/// forms no larger than the model or the data themselves (diag: P, norms: N values).
/// Sizes beyond u128 saturate (they are beyond any limit).
pub fn result_values(mlp: &Mlp, samples: usize, rows: usize, form: NetForm) -> Option<(u128, String)> {
    let p = mlp.num_params() as u128;
    let square = |x: u128| x.saturating_mul(x);
    match form {
        NetForm::Full => Some((square(p), format!("P×P = {p}×{p}"))),
        NetForm::Layer => Some((
            mlp.layers.iter().fold(0u128, |sum, l| sum.saturating_add(square(l.num_params() as u128))),
            "Σ_l P_l²".into(),
        )),
        NetForm::Kfac => Some((
            mlp.layers.iter().fold(0u128, |sum, l| {
                let a = l.fan_in() as u128 + u128::from(l.bias.is_some());
                sum.saturating_add(square(a)).saturating_add(square(l.fan_out() as u128))
            }),
            "Σ_l (in+1)² + out²".into(),
        )),
        NetForm::Grads => Some((
            (samples as u128).saturating_mul(rows as u128).saturating_mul(p),
            format!("N·R×P = {samples}·{rows}×{p}"),
        )),
        NetForm::Diagonal | NetForm::Norms => None,
    }
}

/// Refuses, before anything is computed, a result larger than the request's limit.
pub fn check_result_size(
    mlp: &Mlp,
    samples: usize,
    rows: usize,
    form: NetForm,
    verify: bool,
    limit: u128,
) -> Result<(), ResultTooLarge> {
    let Some((values, what)) = result_values(mlp, samples, rows, form) else { return Ok(()) };
    // f32 result, plus the f64 reference when verifying.
    let needed = values.saturating_mul(if verify { 4 + 8 } else { 4 });
    if needed <= limit {
        return Ok(());
    }
    Err(ResultTooLarge { form, what, needed, with_reference: verify, limit, rows_per_sample: rows })
}

/// Applies the output policy ([`crate::io::output`]) to every file the run will write,
/// before anything is built or written: none may be an input or another output, and an
/// existing one is replaced only with `force`.
fn check_output_locations(request: &ComputeRequest) -> Result<(), FisherError> {
    let inputs: Vec<(&str, &Path)> = match &request.source {
        Source::Files { weights, inputs, labels } => {
            vec![("--weights", weights.as_path()), ("--inputs", inputs.as_path()), ("--labels", labels.as_path())]
        }
        Source::Synthetic { .. } => Vec::new(),
    };
    let mut outputs: Vec<(&str, PathBuf)> = Vec::new();
    if let Some(out) = &request.out {
        outputs.push(("--out", out.clone()));
    }
    if let Some(partial) = &request.partial {
        outputs.push(("--partial", partial.clone()));
    }
    if let Some(model) = &request.save_model {
        outputs.push(("--save-model", model.clone()));
    }
    if let Some(dir) = &request.save_data {
        if dir.exists() && !dir.is_dir() {
            return Err(FisherError::io(dir, "--save-data needs a directory, but this is a file"));
        }
        outputs.push(("--save-data", dir.join("inputs.npy")));
        outputs.push(("--save-data", dir.join("labels.npy")));
    }
    let mut resolved: Vec<(&str, PathBuf)> = Vec::new();
    for (flag, path) in &outputs {
        // The data directory is created later; its files are checked once it exists.
        let target = if flag == &"--save-data" && !output_dir(path).is_dir() {
            path.clone()
        } else {
            Target::check(path, flag, request.force, &inputs)?.path().to_path_buf()
        };
        let absolute = std::path::absolute(&target).unwrap_or(target);
        if let Some((other, _)) = resolved.iter().find(|(_, p)| *p == absolute) {
            return Err(FisherError::io(path, format!("{flag} and {other} name the same file")));
        }
        resolved.push((flag, absolute));
    }
    Ok(())
}

/// Writes the synthetic model and data where asked.
fn save_synthetic(request: &ComputeRequest, mlp: &Mlp, data: &dyn DataSource) -> Result<Saved, FisherError> {
    let mut saved = Saved::default();
    if let Some(path) = &request.save_model {
        mlp.to_safetensors(path)?;
        saved.model = Some(path.clone());
    }
    if let Some(dir) = &request.save_data {
        std::fs::create_dir_all(dir)
            .map_err(|e| FisherError::io(dir, format!("cannot create the data directory: {e}")))?;
        let (inputs, labels) = (dir.join("inputs.npy"), dir.join("labels.npy"));
        // A synthetic problem's data is in memory already (borrowed, not copied).
        let data = data.to_dataset()?;
        io::write_npy_matrix(&inputs, data.inputs.view())?;
        match &data.targets {
            Targets::Classes(classes) => io::write_npy_labels(&labels, classes)?,
            Targets::Values(values) => io::write_npy_matrix(&labels, values.view())?,
        }
        saved.data = Some((inputs, labels));
    }
    Ok(saved)
}

/// Runs a compute request. A form without an output file is refused
/// ([`FisherError::InvalidInput`]).
pub fn run(request: &ComputeRequest) -> Result<ComputeOutcome, RunError> {
    if request.shard.is_some() {
        check_shard_request(request)?;
    } else if request.form.is_some() && request.out.is_none() {
        return Err(FisherError::InvalidInput("a form needs an output file".into()).into());
    }
    if request.block_samples == Some(0) {
        return Err(FisherError::Request("--block-samples must be at least 1".into()).into());
    }
    let mut seconds = Seconds { save: Some(0.0), ..Seconds::default() };
    check_output_locations(request)?;

    let start = Instant::now();
    let (mlp, data) = load_problem(&request.source, &request.activation, request.likelihood)?;
    seconds.load = since(start);
    let samples = data.len();
    let rows = rows_per_sample(request.variant, mlp.output_dim());
    if let Some(form) = request.form {
        check_result_size(&mlp, samples, rows, form, request.verify, request.max_result_bytes)?;
    }

    let start = Instant::now();
    let saved = save_synthetic(request, &mlp, &*data)?;
    seconds.save = Some(since(start));

    let mut outcome = ComputeOutcome::of_model(&mlp, samples, rows, saved, seconds);
    if let (Some((index, count)), Some(form), Some(partial)) = (request.shard, request.form, &request.partial) {
        return run_shard(request, (index, count), form, partial, &mlp, &*data, outcome);
    }
    let (Some(form), Some(out)) = (request.form, &request.out) else {
        return Ok(outcome); // only saving the synthetic files
    };

    let start = Instant::now();
    let device = device::open(&DeviceRequest::from_env(request.backend, with_limit(&request.gpu, request.max_result_bytes))?)?;
    outcome.seconds.setup = since(start);
    let engine = &device.engine;
    let backend = engine.device_info();

    // The forms that sum over samples go to the output file piece by piece: a result
    // computed in passes (sums beyond the accumulator budget) is then never whole in memory.
    // Not under --verify (which compares the whole result) or another --block-samples, and
    // not for a device or FIFO (which takes the file in order).
    let default_blocks = request.block_samples.is_none_or(|b| b == DEFAULT_BLOCK_SAMPLES);
    if !request.verify && default_blocks {
        if let Some(tensors) = fisher_file::network_tensors(form, &mlp) {
            let metadata = fisher_file::network_metadata(form, &mlp, samples, request.likelihood, request.variant, &backend);
            if let Some(stream) = io::safetensors::SafetensorsStream::create(out, &tensors, Some(metadata))? {
                let shapes: Vec<Vec<usize>> = tensors.iter().map(|(_, s)| s.clone()).collect();
                let mut sink = TracedStream { stream, trace: TraceOf::new(form, &shapes) };
                let start = Instant::now();
                engine.fisher_into(&mlp, &*data, request.variant, form, &mut sink)?;
                outcome.seconds.compute = since(start);
                let start = Instant::now();
                outcome.trace = Some(sink.trace.trace());
                sink.stream.commit()?;
                outcome.seconds.write = since(start);
                outcome.tensors = tensors;
                outcome.out = Some((out.clone(), file_size(out)));
                outcome.backend = Some(backend);
                outcome.adapter = device.adapter.map(|a| a.name);
                outcome.fallback = device.fallback;
                return Ok(outcome);
            }
        }
    }

    let start = Instant::now();
    let result = match request.block_samples {
        // Another block than the default: the exact sums over that block, finished.
        Some(block) if block != DEFAULT_BLOCK_SAMPLES && !matches!(form, NetForm::Grads | NetForm::Norms) => {
            engine.fisher_sums(&mlp, &*data, request.variant, form, 0..samples, block)?.finish(samples)?
        }
        _ => engine.fisher(&mlp, &*data, request.variant, form)?,
    };
    outcome.seconds.compute = since(start);

    if request.verify {
        let start = Instant::now();
        // The reference needs every sample at once: data on disk is read whole here.
        let reference = data
            .to_dataset()
            .and_then(|whole| crate::reference::network::fisher(&mlp, &whole, request.likelihood, request.variant, form))
            .map_err(RunError::context("computing the f64 reference"))?;
        let verdict = Verdict::judge(result.agreement(&reference)?, Contract::Network);
        drop(reference);
        outcome.seconds.verify = since(start);
        outcome.verification = Some(verdict.require(&backend)?);
    }

    let file = FisherFile::of_network(result, &mlp, samples, request.likelihood, request.variant, &backend);
    outcome.trace = Some(file.trace());
    outcome.tensors = file.tensor_shapes();

    let start = Instant::now();
    fisher_file::write(out, &file)?;
    outcome.seconds.write = since(start);
    outcome.out = Some((out.clone(), file_size(out)));
    outcome.backend = Some(backend);
    outcome.adapter = device.adapter.map(|a| a.name);
    outcome.fallback = device.fallback;
    Ok(outcome)
}

/// The flag rules of a shard run: a form that sums over samples, a partial file and no
/// result file (the merge writes it), no verification (the reference needs every sample).
fn check_shard_request(request: &ComputeRequest) -> Result<(), FisherError> {
    let refuse = |why: &str| Err(FisherError::Request(why.to_string()));
    match request.form {
        None => return refuse("--shard needs --form diag|kfac|layer|full"),
        Some(form @ (NetForm::Grads | NetForm::Norms)) => {
            return Err(FisherError::Request(format!(
                "--shard sums over samples; --form {} is per sample (compute it per slice of the data instead)",
                form.name()
            )))
        }
        Some(_) => {}
    }
    if request.partial.is_none() {
        return refuse("--shard needs --partial PART.safetensors (fisher merge writes the result)");
    }
    if request.out.is_some() {
        return refuse("--shard writes --partial, not --out (fisher merge PART... --out F.safetensors writes the result)");
    }
    if request.verify {
        return refuse("--verify needs every sample; verify the merged result's run instead (without --shard)");
    }
    if let Some((i, n)) = request.shard {
        if n == 0 || i >= n {
            return Err(FisherError::Request(format!("--shard {i}/{n}: the index must be below the count")));
        }
    }
    Ok(())
}

/// The shard (i, n) of a compute run: its exact sums written to `partial`.
fn run_shard(
    request: &ComputeRequest,
    shard: (usize, usize),
    form: NetForm,
    partial: &Path,
    mlp: &Mlp,
    data: &dyn DataSource,
    outcome: ComputeOutcome,
) -> Result<ComputeOutcome, RunError> {
    let (file, mut outcome) = shard_file(request, shard, form, mlp, data, outcome)?;
    let start = Instant::now();
    partial::write(partial, &file)?;
    outcome.seconds.write = since(start);
    outcome.out = Some((partial.to_path_buf(), file_size(partial)));
    Ok(outcome)
}

/// The partial sums of shard (i, n), in memory.
fn shard_file(
    request: &ComputeRequest,
    (index, count): (usize, usize),
    form: NetForm,
    mlp: &Mlp,
    data: &dyn DataSource,
    mut outcome: ComputeOutcome,
) -> Result<(PartialFile, ComputeOutcome), RunError> {
    let samples = data.len();
    let block = request.block_samples.unwrap_or(DEFAULT_BLOCK_SAMPLES);
    let range = crate::fisher::shard_range(samples, block, index, count);
    let start = Instant::now();
    let device = device::open(&DeviceRequest::from_env(request.backend, with_limit(&request.gpu, request.max_result_bytes))?)?;
    outcome.seconds.setup = since(start);
    let engine = &device.engine;
    let backend = engine.device_info();

    let start = Instant::now();
    let sums = engine.fisher_sums(mlp, data, request.variant, form, range.clone(), block)?;
    outcome.seconds.compute = since(start);
    let file = PartialFile {
        sums,
        shard: (index, count),
        range: range.clone(),
        total: samples,
        block,
        fingerprint: merge::fingerprint(mlp, data, request.likelihood, request.variant, form, block)?,
        backend: backend.clone(),
        result_metadata: fisher_file::network_metadata(form, mlp, samples, request.likelihood, request.variant, &backend),
    };
    outcome.backend = Some(backend);
    outcome.adapter = device.adapter.map(|a| a.name);
    outcome.fallback = device.fallback;
    outcome.shard = Some(((index, count), range));
    Ok((file, outcome))
}

/// One process's part of a distributed run (MPI rank `index` of `count`): the request's
/// checks (its `out`, when given, against the output policy, without writing it), the
/// model and data loaded, and the exact sums of shard `index` of `count`, in memory. The
/// caller gathers the parts and writes their merge ([`merge::write_merged`]).
pub fn shard_part(request: &ComputeRequest, (index, count): (usize, usize)) -> Result<(PartialFile, ComputeOutcome), RunError> {
    let form = match request.form {
        Some(form @ (NetForm::Diagonal | NetForm::Kfac | NetForm::Layer | NetForm::Full)) => form,
        Some(form) => {
            return Err(FisherError::Request(format!("a distributed run sums over samples; --form {} is per sample", form.name())).into())
        }
        None => return Err(FisherError::Request("a distributed run needs --form diag|kfac|layer|full".into()).into()),
    };
    if count == 0 || index >= count {
        return Err(FisherError::Request(format!("shard {index}/{count}: the index must be below the count")).into());
    }
    if request.block_samples == Some(0) {
        return Err(FisherError::Request("--block-samples must be at least 1".into()).into());
    }
    if request.verify {
        return Err(FisherError::Request("--verify needs every sample in one process: it does not apply to a distributed run".into()).into());
    }
    check_output_locations(request)?;
    let start = Instant::now();
    let (mlp, data) = load_problem(&request.source, &request.activation, request.likelihood)?;
    let samples = data.len();
    let rows = rows_per_sample(request.variant, mlp.output_dim());
    check_result_size(&mlp, samples, rows, form, false, request.max_result_bytes)?;
    let outcome = ComputeOutcome::of_model(&mlp, samples, rows, Saved::default(), Seconds { load: since(start), ..Seconds::default() });
    shard_file(request, (index, count), form, &mlp, &*data, outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::fisher_file;

    fn request(dir: &std::path::Path, form: Option<NetForm>) -> ComputeRequest {
        let source = Source::Synthetic { widths: vec![5, 4, 3], samples: 20, seed: 1 };
        let mut request = ComputeRequest::new(source, ActivationSpec::parse("tanh").unwrap(), Backend::Cpu);
        request.form = form;
        request.out = form.map(|_| dir.join("F.safetensors"));
        request
    }

    #[test]
    fn round_trip_on_cpu_verified() {
        let dir = tempfile::tempdir().unwrap();
        let mut req = request(dir.path(), Some(NetForm::Full));
        req.verify = true;
        let outcome = run(&req).unwrap();
        let p = 4 * 6 + 3 * 5;
        assert_eq!((outcome.params, outcome.samples, outcome.rows_per_sample), (p, 20, 3));
        assert_eq!(outcome.tensors, [("fisher".to_string(), vec![p, p])]);
        assert!(outcome.verification.as_ref().unwrap().passed);
        let (path, size) = outcome.out.clone().unwrap();
        assert!(size > 0);
        let file = fisher_file::read(&path).unwrap();
        assert_eq!(file.tensor_shapes(), outcome.tensors);
        let trace = outcome.trace.unwrap();
        assert!((file.trace() - trace).abs() <= 1e-6 * trace.abs());
    }

    #[test]
    fn result_size_is_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut req = request(dir.path(), Some(NetForm::Full));
        req.max_result_bytes = 100;
        req.verify = true;
        match run(&req) {
            Err(RunError::ResultTooLarge(e)) => {
                assert_eq!((e.needed, e.limit, e.with_reference), (39 * 39 * 12, 100, true));
                assert_eq!(e.what, "P×P = 39×39");
            }
            other => panic!("{other:?}"),
        }
        assert!(!dir.path().join("F.safetensors").exists());
        // Forms that grow only with P or N are left to the backend's own check of the same
        // limit, which refuses even a diagonal beyond it (39 values · 4 bytes > 100) ...
        req.form = Some(NetForm::Diagonal);
        assert!(matches!(run(&req), Err(RunError::Fisher(FisherError::DoesNotFit { .. }))));
        // ... and passes it within.
        req.max_result_bytes = 1 << 20;
        run(&req).unwrap();
    }

    #[test]
    fn saves_synthetic_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut req = request(dir.path(), None);
        req.save_model = Some(dir.path().join("M.safetensors"));
        req.save_data = Some(dir.path().join("data"));
        let outcome = run(&req).unwrap();
        assert!(outcome.backend.is_none() && outcome.out.is_none());
        let (inputs, labels) = outcome.saved.data.unwrap();
        let files = Source::Files { weights: outcome.saved.model.unwrap(), inputs, labels };
        let (mlp, data) = load_problem(&files, &req.activation, req.likelihood).unwrap();
        assert_eq!(mlp.widths(), [5, 4, 3]);
        assert_eq!(data.len(), 20);
    }
}
