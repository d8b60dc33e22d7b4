//! Training run directories: what `fisher train` writes, and the checkpoint lists `fisher
//! action` reads.
//!
//! ```text
//! RUN/X.npy                  inputs, N×d float32
//! RUN/y.npy                  class labels, int64 (N,)
//! RUN/ckpt_000.safetensors   θ at each checkpoint, PyTorch nn.Sequential keys (0.weight, 0.bias, 2.weight, …)
//! …
//! RUN/run.json               widths, activations, optimizer, seeds, the step and loss of each checkpoint
//! ```
//!
//! A [`RunSpec`] (its [`Default`] is `fisher train`'s default run) is trained in memory by
//! [`RunSpec::train`] and written by [`write()`]: every file goes into a temporary directory
//! beside RUN, which is then renamed to RUN. A failed write leaves no directory behind, and
//! a replaced one is only removed once the new one is complete. [`check_out_dir`] decides,
//! before any work, whether RUN may be written.
//!
//! ```
//! use fisher_engine::model::run::{self, RunSpec};
//! let dir = tempfile::tempdir()?;
//! let spec = RunSpec { widths: vec![4, 6, 3], samples: 32, steps: 4, checkpoints: 3, ..RunSpec::default() };
//! let trained = spec.train()?;
//! let written = run::write(&dir.path().join("run"), &trained, false)?;
//! assert_eq!(written.files, ["ckpt_000.safetensors", "ckpt_001.safetensors", "ckpt_002.safetensors"]);
//! let files = run::checkpoint_files(&[written.dir.clone()])?;
//! assert_eq!(files.len(), 3);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::cmp::Ordering;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::json;

use super::train::{classification_task, init_mlp, sgd, SgdOptions, TrainRun};
use super::{Activation, ActivationSpec, Dataset, Mlp, Targets};
use crate::error::{FisherError, Result};
use crate::MAX_GENERATED_VALUES;

/// The initial weights and the minibatch order get their own streams, derived from the seed
/// (the data use the seed itself), so that changing one never shifts another.
const INIT_STREAM: u64 = 0x7EA1_0000_0000_0001;
const SHUFFLE_STREAM: u64 = 0x7EA1_0000_0000_0002;

/// The settings of a seeded training run (SGD with momentum on a seeded classification
/// task). The messages of [`RunSpec::validate`] name `fisher train`'s flags.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSpec {
    /// Layer widths: input, hidden..., classes (`--widths`).
    pub widths: Vec<usize>,
    /// The activations as spelled (a name, or a JSON list with one per gap; `--activation`).
    pub activation: String,
    /// N, samples of the task (`--samples`).
    pub samples: usize,
    /// SGD steps (`--steps`).
    pub steps: usize,
    /// Learning rate (`--lr`).
    pub learning_rate: f32,
    /// Heavy-ball momentum in [0, 1) (`--momentum`).
    pub momentum: f32,
    /// Samples per minibatch (`--batch`).
    pub batch_size: usize,
    /// Checkpoints kept, evenly spaced, the initial and final models included (`--checkpoints`).
    pub checkpoints: usize,
    /// Seed of the data, the initial weights and the minibatch order (`--seed`).
    pub seed: u64,
}

impl Default for RunSpec {
    /// `fisher train`'s default run: a 16-32-32-4 tanh MLP on 2048 samples, 400 steps of SGD
    /// (lr 0.1, momentum 0.9, batch 64), 25 checkpoints, seed 0.
    fn default() -> Self {
        RunSpec {
            widths: vec![16, 32, 32, 4],
            activation: "tanh".into(),
            samples: 2048,
            steps: 400,
            learning_rate: 0.1,
            momentum: 0.9,
            batch_size: 64,
            checkpoints: 25,
            seed: 0,
        }
    }
}

impl RunSpec {
    /// Checks every setting and returns the activations, one per gap.
    pub fn validate(&self) -> Result<Vec<Activation>> {
        let bad = |message: String| Err(FisherError::InvalidInput(message));
        let widths = self.widths.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
        if self.widths.len() < 2 || self.widths.contains(&0) {
            return bad(format!(
                "bad --widths '{widths}': expected at least two positive layer widths (input,...,classes), e.g. 16,32,32,4"
            ));
        }
        if self.widths[self.widths.len() - 1] < 2 {
            return bad(format!("--widths {widths}: the last width is the number of classes and must be at least 2"));
        }
        let params: u128 = self.widths.windows(2).map(|w| w[1] as u128 * (w[0] as u128 + 1)).sum();
        let inputs = self.samples as u128 * self.widths[0] as u128;
        if params > MAX_GENERATED_VALUES || inputs > MAX_GENERATED_VALUES {
            return bad(format!(
                "--widths {widths} --samples {} would build {params} parameters and {inputs} input values in memory (limit {MAX_GENERATED_VALUES} each)",
                self.samples
            ));
        }
        let activations = ActivationSpec::parse(&self.activation)
            .and_then(|spec| spec.for_gaps(self.widths.len() - 2))
            .map_err(|e| FisherError::InvalidInput(format!("bad --activation: {e}")))?;
        for (value, flag) in [(self.samples, "--samples"), (self.steps, "--steps"), (self.batch_size, "--batch")] {
            if value == 0 {
                return bad(format!("{flag} must be at least 1"));
            }
        }
        if self.steps > MAX_STEPS {
            return bad(format!("--steps must be at most {MAX_STEPS}, not {}", self.steps));
        }
        if self.checkpoints < 2 || self.checkpoints > self.steps + 1 {
            return bad(format!(
                "--checkpoints must be between 2 (the initial and the final model) and --steps + 1 = {}, not {}",
                self.steps + 1,
                self.checkpoints
            ));
        }
        if self.checkpoints > MAX_CHECKPOINTS {
            return bad(format!("--checkpoints must be at most {MAX_CHECKPOINTS}, not {}", self.checkpoints));
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return bad(format!("--lr must be a positive number, not {}", self.learning_rate));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return bad(format!("--momentum must be in [0, 1), not {}", self.momentum));
        }
        Ok(activations)
    }

    /// The SGD options (the shuffle seed derived from [`RunSpec::seed`]).
    pub fn sgd(&self) -> SgdOptions {
        SgdOptions {
            learning_rate: self.learning_rate,
            momentum: self.momentum,
            batch_size: self.batch_size,
            steps: self.steps,
            checkpoints: self.checkpoints,
            seed: self.seed ^ SHUFFLE_STREAM,
        }
    }

    /// Trains the run in memory: the task's data, then SGD from the seeded initial model.
    pub fn train(&self) -> Result<Trained> {
        let activations = self.validate()?;
        let start = Instant::now();
        let (d, classes) = (self.widths[0], self.widths[self.widths.len() - 1]);
        let data = classification_task(self.samples, d, classes, self.seed)?;
        let init = init_mlp(&self.widths, Activation::Identity, true, self.seed ^ INIT_STREAM)?;
        let init = Mlp::new(init.layers, activations)?;
        let run = sgd(&init, &data, &self.sgd())?;
        Ok(Trained { spec: self.clone(), data, run, seconds: start.elapsed().as_secs_f64() })
    }

    /// The checkpoint file names of this run, in order.
    pub fn checkpoint_names(&self) -> Vec<String> {
        (0..self.checkpoints).map(|i| checkpoint_name(i, self.checkpoints)).collect()
    }
}

/// A run trained in memory by [`RunSpec::train`].
#[derive(Debug, Clone)]
pub struct Trained {
    /// What was trained.
    pub spec: RunSpec,
    /// The task's data.
    pub data: Dataset,
    /// The checkpoints, their steps and losses.
    pub run: TrainRun,
    /// Seconds of training.
    pub seconds: f64,
}

/// A run directory [`write()`] made: what `fisher train` reports.
#[derive(Debug, Clone)]
pub struct Written {
    /// The run directory.
    pub dir: PathBuf,
    /// The settings.
    pub spec: RunSpec,
    /// Activation names, one per gap.
    pub activations: Vec<&'static str>,
    /// P.
    pub parameters: usize,
    /// Checkpoint file names, in order.
    pub files: Vec<String>,
    /// The step of each checkpoint.
    pub checkpoint_steps: Vec<usize>,
    /// Mean NLL on the whole dataset at each checkpoint.
    pub losses: Vec<f64>,
    /// Whether an existing directory was replaced.
    pub replaced: bool,
    /// Seconds: training, writing.
    pub seconds: (f64, f64),
}

/// The directory RUN will be created in.
fn parent_of(dir: &Path) -> &Path {
    crate::io::output_dir(dir)
}

/// Refuses a run directory that cannot (or, without `force`, must not) be written: its
/// parent must exist, and an existing RUN must be an empty directory unless `force`.
/// Returns whether RUN exists (and will be replaced).
pub fn check_out_dir(dir: &Path, force: bool) -> Result<bool> {
    let parent = parent_of(dir);
    if !parent.is_dir() {
        return Err(FisherError::io(parent, format!("directory does not exist (cannot create {})", dir.display())));
    }
    if !dir.exists() {
        return Ok(false);
    }
    if !dir.is_dir() {
        return Err(FisherError::io(dir, "exists and is not a directory; --out-dir names the run directory to create"));
    }
    let empty = std::fs::read_dir(dir).map_err(|e| FisherError::io(dir, format!("cannot read: {e}")))?.next().is_none();
    if !empty && !force {
        return Err(FisherError::InvalidInput(format!(
            "{} exists and is not empty; choose another --out-dir, or pass --force to replace it",
            dir.display()
        )));
    }
    Ok(true)
}

/// `ckpt_007.safetensors`: zero-padded to at least three digits, so that names sort in order.
pub fn checkpoint_name(index: usize, count: usize) -> String {
    let digits = (count.saturating_sub(1)).to_string().len().max(3);
    format!("ckpt_{index:0digits$}.safetensors")
}

/// Writes every file of the run into `dir`.
fn write_files(dir: &Path, trained: &Trained, files: &[String]) -> Result<()> {
    let (spec, data, run) = (&trained.spec, &trained.data, &trained.run);
    crate::io::write_npy_matrix(&dir.join("X.npy"), data.inputs.view())?;
    let Targets::Classes(labels) = &data.targets else {
        return Err(FisherError::InvalidInput("a training run has class labels".into()));
    };
    crate::io::write_npy_labels(&dir.join("y.npy"), labels)?;
    for (model, name) in run.checkpoints.iter().zip(files) {
        model.to_safetensors(&dir.join(name))?;
    }
    let first = &run.checkpoints[0];
    let sgd = spec.sgd();
    let record = json!({
        "format": "fisher-engine training run",
        "version": 1,
        "widths": first.widths(),
        "layer_indices": first.layers.iter().map(|l| l.index).collect::<Vec<_>>(),
        "activation": spec.activation,
        "activations": first.activations.iter().map(|a| a.name()).collect::<Vec<_>>(),
        "likelihood": "categorical",
        "parameters": first.num_params(),
        "inputs": "X.npy",
        "labels": "y.npy",
        "samples": spec.samples,
        "task": "fisher_engine::model::train::classification_task(samples, widths[0], widths[-1], seed)",
        "seed": spec.seed,
        "init": format!("fisher_engine::model::train::init_mlp (PyTorch nn.Linear default), seed {} ^ {INIT_STREAM:#x}", spec.seed),
        "optimizer": {
            "name": "sgd",
            "learning_rate": sgd.learning_rate,
            "momentum": sgd.momentum,
            "batch_size": sgd.batch_size,
            "shuffle_seed": sgd.seed,
        },
        "steps": sgd.steps,
        "checkpoints": files,
        "checkpoint_steps": run.steps,
        "losses": run.losses,
        "loss": "mean negative log-likelihood (softmax cross-entropy) on the whole dataset",
        "fisher_engine_version": env!("CARGO_PKG_VERSION"),
    });
    let path = dir.join("run.json");
    let text = serde_json::to_string_pretty(&record)
        .map_err(|e| FisherError::io(&path, format!("cannot encode: {e}")))?;
    std::fs::write(&path, text + "\n").map_err(|e| FisherError::io(&path, format!("cannot write: {e}")))
}

/// The most SGD steps a demo run takes (10⁹: hours on any machine; bounds the step
/// arithmetic far from overflow).
pub const MAX_STEPS: usize = 1_000_000_000;

/// The most checkpoints (files) a run writes.
pub const MAX_CHECKPOINTS: usize = 100_000;

/// Moves the complete staging directory onto RUN (replacing it when `replace`).
fn publish(staged: tempfile::TempDir, out: &Path, replace: bool) -> Result<()> {
    if !replace {
        let staged = staged.keep();
        return std::fs::rename(&staged, out).map_err(|e| {
            let _ = std::fs::remove_dir_all(&staged);
            FisherError::io(out, format!("cannot create: {e}"))
        });
    }
    // A directory cannot be renamed onto a non-empty one: move the old run aside first, and
    // remove it only once the new one is in place (putting it back if that fails).
    let cannot_replace = |e: std::io::Error| FisherError::io(out, format!("cannot replace: {e}"));
    let aside = tempfile::Builder::new().prefix(".fisher-train-old-").tempdir_in(parent_of(out)).map_err(cannot_replace)?;
    let old = aside.path().join("run");
    std::fs::rename(out, &old).map_err(cannot_replace)?;
    let staged = staged.keep();
    if let Err(e) = std::fs::rename(&staged, out) {
        let _ = std::fs::rename(&old, out);
        let _ = std::fs::remove_dir_all(&staged);
        return Err(cannot_replace(e));
    }
    drop(aside); // removes the old run
    Ok(())
}

/// Writes `trained` as the run directory `dir` (staged beside it and renamed into place); an
/// existing directory is replaced only when `replace`, which [`check_out_dir`] decides.
pub fn write(dir: &Path, trained: &Trained, replace: bool) -> Result<Written> {
    let start = Instant::now();
    let run = &trained.run;
    let first = run.checkpoints.first().ok_or_else(|| FisherError::InvalidInput("the run kept no checkpoint".into()))?;
    let files: Vec<String> = (0..run.checkpoints.len()).map(|i| checkpoint_name(i, run.checkpoints.len())).collect();
    // Beside RUN, so that the final rename stays on one file system; removed on any error
    // and on SIGINT/SIGTERM (registered). The name does not repeat RUN's, which may already
    // be as long as a file name can be.
    let staged = crate::io::output::output_temp_dir(parent_of(dir), ".fisher-train-")
        .map_err(|e| FisherError::io(parent_of(dir), format!("cannot create a directory: {e}")))?;
    let staged_path = staged.path().to_path_buf();
    let written = write_files(staged.path(), trained, &files).and_then(|()| publish(staged, dir, replace));
    crate::io::output::forget(&staged_path);
    written?;
    Ok(Written {
        dir: dir.to_path_buf(),
        spec: trained.spec.clone(),
        activations: first.activations.iter().map(|a| a.name()).collect(),
        parameters: first.num_params(),
        files,
        checkpoint_steps: run.steps.clone(),
        losses: run.losses.clone(),
        replaced: replace,
        seconds: (trained.seconds, start.elapsed().as_secs_f64()),
    })
}

/// Trains `spec` and writes it as `dir`: [`check_out_dir`] (before any work), then
/// [`RunSpec::train`] and [`write()`]. The whole of `fisher train`.
pub fn train_into(spec: &RunSpec, dir: &Path, force: bool) -> Result<Written> {
    spec.validate()?;
    let replace = check_out_dir(dir, force)?;
    write(dir, &spec.train()?, replace)
}

// ---------------------------------------------------------------------------------------
// Reading

/// Compares names the way people count: runs of digits by their value (`ckpt_2` before
/// `ckpt_10`), everything else character by character.
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a, b);
    loop {
        match (a.chars().next(), b.chars().next()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let split = |s: &str| s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
                let (da, ra) = a.split_at(split(a));
                let (db, rb) = b.split_at(split(b));
                let (va, vb) = (da.trim_start_matches('0'), db.trim_start_matches('0'));
                // Longer (without leading zeros) is larger; equal lengths compare digit by
                // digit; equal values fall back to the zero-padded spelling.
                let order = va.len().cmp(&vb.len()).then_with(|| va.cmp(vb)).then_with(|| da.cmp(db));
                if order != Ordering::Equal {
                    return order;
                }
                (a, b) = (ra, rb);
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(&y);
                }
                (a, b) = (&a[x.len_utf8()..], &b[y.len_utf8()..]);
            }
        }
    }
}

/// The checkpoint files: the paths as given, or one directory's `*.safetensors` files in
/// natural order ([`natural_cmp`]). At least two are required.
pub fn checkpoint_files(given: &[PathBuf]) -> Result<Vec<PathBuf>> {
    checkpoint_files_of(given, &["safetensors"])
}

/// [`checkpoint_files`] for checkpoints with any of the extensions `exts` (a directory's
/// files with them; given files as they are).
pub fn checkpoint_files_of(given: &[PathBuf], exts: &[&str]) -> Result<Vec<PathBuf>> {
    let too_few = |message: String| Err(FisherError::InvalidInput(message));
    match given {
        [dir] if dir.is_dir() => {
            let cannot_list = |e: std::io::Error| FisherError::io(dir, format!("cannot list the checkpoint directory: {e}"));
            let mut files: Vec<PathBuf> = Vec::new();
            for entry in std::fs::read_dir(dir).map_err(cannot_list)? {
                let path = entry.map_err(cannot_list)?.path();
                let is_checkpoint = path.extension().is_some_and(|e| exts.iter().any(|x| e.eq_ignore_ascii_case(x)));
                if is_checkpoint && path.is_file() {
                    files.push(path);
                }
            }
            let name = |p: &PathBuf| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            files.sort_by(|a, b| natural_cmp(&name(a), &name(b)));
            if files.len() < 2 {
                return too_few(format!(
                    "the action needs at least 2 checkpoints, but {} holds {} *.{} file{}",
                    dir.display(),
                    files.len(),
                    exts.join("/*."),
                    if files.len() == 1 { "" } else { "s" }
                ));
            }
            Ok(files)
        }
        [one] => too_few(format!(
            "the action needs at least 2 checkpoints, got only {} (give two or more files, or a directory of them)",
            one.display()
        )),
        many => match many.iter().find(|p| p.is_dir()) {
            Some(dir) => Err(FisherError::InvalidInput(format!(
                "{} is a directory; give either one directory or two or more checkpoint files",
                dir.display()
            ))),
            None => Ok(many.to_vec()),
        },
    }
}

/// Whether two models have the same layer shapes, Sequential indices and biases.
pub fn same_architecture(a: &Mlp, b: &Mlp) -> bool {
    layout(a) == layout(b)
}

/// What [`same_architecture`] compares: each layer's Sequential index, weight shape and bias
/// length (none of its values).
type Layout = Vec<(usize, (usize, usize), Option<usize>)>;

fn layout(mlp: &Mlp) -> Layout {
    mlp.layers.iter().map(|l| (l.index, l.weight.dim(), l.bias.as_ref().map(|b| b.len()))).collect()
}

/// Reads a run's checkpoints one at a time, each checked to have the first one's
/// architecture ([`same_architecture`]; the file at fault is named).
///
/// Only the first checkpoint's layout (its shapes, no values) is kept between reads, so a
/// caller that drops each model when done with it (as `fisher action` does: θ_t and θ_{t+1}
/// at a time) never holds the whole run, however many checkpoints it has.
///
/// ```
/// use fisher_engine::model::run::{self, CheckpointLoader, RunSpec};
/// use fisher_engine::model::ActivationSpec;
/// let dir = tempfile::tempdir()?;
/// let spec = RunSpec { widths: vec![4, 6, 3], samples: 32, steps: 4, checkpoints: 3, ..RunSpec::default() };
/// let written = run::write(&dir.path().join("run"), &spec.train()?, false)?;
/// let files = run::checkpoint_files(&[written.dir])?;
/// let (loader, first) = CheckpointLoader::open(files, &ActivationSpec::parse("tanh")?)?;
/// assert_eq!(first.num_params(), 4 * 6 + 6 + 6 * 3 + 3);
/// let last = loader.load(loader.files().len() - 1)?;
/// assert!(run::same_architecture(&first, &last));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct CheckpointLoader {
    files: Vec<PathBuf>,
    activation: ActivationSpec,
    /// The first checkpoint's layout and [`Mlp::shape_text`], which every other must match.
    first: (Layout, String),
}

impl CheckpointLoader {
    /// Reads the first of `files` (returned, e.g. to check data against it) and keeps its
    /// architecture for [`CheckpointLoader::load`].
    pub fn open(files: Vec<PathBuf>, activation: &ActivationSpec) -> Result<(CheckpointLoader, Mlp)> {
        let Some(path) = files.first() else {
            return Err(FisherError::InvalidInput("no checkpoints".into()));
        };
        let first = Mlp::from_safetensors(path, activation)?;
        let loader =
            CheckpointLoader { activation: activation.clone(), first: (layout(&first), first.shape_text()), files };
        Ok((loader, first))
    }

    /// The checkpoint files, in order.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Reads checkpoint `t` (any order, any number of times), checked against the first.
    pub fn load(&self, t: usize) -> Result<Mlp> {
        let Some(file) = self.files.get(t) else {
            return Err(FisherError::InvalidInput(format!("no checkpoint {t}: the run has {}", self.files.len())));
        };
        let model = Mlp::from_safetensors(file, &self.activation)?;
        if layout(&model) != self.first.0 {
            return Err(FisherError::io(
                file,
                format!(
                    "architecture {} differs from {} ({}); every checkpoint must have the same layers",
                    model.shape_text(),
                    self.first.1,
                    self.files[0].display()
                ),
            ));
        }
        Ok(model)
    }
}

/// Loads every checkpoint with `activation` ([`CheckpointLoader`]: each checked to have the
/// first one's architecture, the file at fault named). All of them sit in memory at once;
/// `fisher action` reads them one at a time instead.
pub fn load_checkpoints(files: &[PathBuf], activation: &ActivationSpec) -> Result<Vec<Mlp>> {
    if files.is_empty() {
        return Ok(Vec::new());
    }
    let (loader, first) = CheckpointLoader::open(files.to_vec(), activation)?;
    let mut models = Vec::with_capacity(files.len());
    models.push(first);
    for t in 1..files.len() {
        models.push(loader.load(t)?);
    }
    Ok(models)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> RunSpec {
        RunSpec { widths: vec![3, 5, 2], samples: 24, steps: 6, checkpoints: 4, batch_size: 8, seed: 3, ..RunSpec::default() }
    }

    #[test]
    fn checkpoint_names_sort_in_order() {
        assert_eq!(checkpoint_name(7, 25), "ckpt_007.safetensors");
        assert_eq!(checkpoint_name(1234, 2000), "ckpt_1234.safetensors");
        let names: Vec<String> = (0..1001).map(|i| checkpoint_name(i, 1001)).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
    }

    #[test]
    fn natural_order() {
        let mut names = vec!["ckpt_10", "ckpt_2", "ckpt_1", "ckpt_002", "a", "ckpt_", "ckpt_100", "b1", "b01x"];
        names.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(names, ["a", "b01x", "b1", "ckpt_", "ckpt_1", "ckpt_002", "ckpt_2", "ckpt_10", "ckpt_100"]);
        assert_eq!(natural_cmp("ckpt_000.safetensors", "ckpt_000.safetensors"), Ordering::Equal);
        assert_eq!(natural_cmp("θ9", "θ10"), Ordering::Less);
    }

    #[test]
    fn default_is_fisher_trains_default_run() {
        let spec = RunSpec::default();
        assert_eq!((spec.widths.as_slice(), spec.samples, spec.steps, spec.checkpoints), (&[16, 32, 32, 4][..], 2048, 400, 25));
        assert_eq!(spec.validate().unwrap(), [Activation::Tanh, Activation::Tanh]);
        for bad in [
            RunSpec { widths: vec![4, 1], ..tiny() },
            RunSpec { checkpoints: 8, ..tiny() },
            RunSpec { momentum: 1.0, ..tiny() },
            RunSpec { activation: "nope".into(), ..tiny() },
        ] {
            assert!(matches!(bad.validate(), Err(FisherError::InvalidInput(_))), "{bad:?}");
        }
    }

    /// A written run reads back: the files in natural order, the same models, the data.
    #[test]
    fn write_read_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run");
        let written = train_into(&tiny(), &out, false).unwrap();
        assert_eq!(written.files, tiny().checkpoint_names());
        assert!(!written.replaced);
        let files = checkpoint_files(std::slice::from_ref(&out)).unwrap();
        assert_eq!(files, written.files.iter().map(|f| out.join(f)).collect::<Vec<_>>());
        let trained = tiny().train().unwrap();
        let models = load_checkpoints(&files, &ActivationSpec::parse("tanh").unwrap()).unwrap();
        assert_eq!(models, trained.run.checkpoints);
        let data = Dataset::from_npy(&out.join("X.npy"), &out.join("y.npy"), crate::model::Likelihood::Categorical).unwrap();
        assert_eq!(data.inputs, trained.data.inputs);
        let record: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
        assert_eq!(record["checkpoints"], json!(written.files));
        // Only RUN is left in its parent: no staging directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_non_empty_directory_needs_force() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run");
        std::fs::create_dir(&out).unwrap();
        assert!(check_out_dir(&out, false).unwrap(), "an empty directory is replaced");
        std::fs::write(out.join("stale.txt"), "x").unwrap();
        let err = train_into(&tiny(), &out, false).unwrap_err();
        assert!(err.to_string().contains("exists and is not empty"), "{err}");
        assert!(out.join("stale.txt").exists());
        let written = train_into(&tiny(), &out, true).unwrap();
        assert!(written.replaced && !out.join("stale.txt").exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "the old run is gone");
        assert!(check_out_dir(&dir.path().join("missing/run"), true).is_err());
    }

    #[test]
    fn too_few_checkpoints_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = checkpoint_files(&[dir.path().to_path_buf()]).unwrap_err();
        assert!(err.to_string().contains("holds 0 *.safetensors files"), "{err}");
        assert!(checkpoint_files(&[dir.path().join("a.safetensors")]).is_err());
        let mixed = [dir.path().join("a.safetensors"), dir.path().to_path_buf()];
        assert!(checkpoint_files(&mixed).unwrap_err().to_string().contains("is a directory"));
    }
}
