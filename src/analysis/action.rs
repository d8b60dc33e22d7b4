//! The action along training: a training run θ₀ … θ_T as a path in the Fisher metric.
//!
//! With Δθ_t = θ_{t+1} − θ_t and F(θ) the Fisher at θ (any variant), the discrete
//!
//! ```text
//! action           S = Σ_t Δθ_tᵀ F(θ_t) Δθ_t
//! Fisher–Rao length L = Σ_t √(Δθ_tᵀ F(θ_t) Δθ_t)
//! chord length     C = Σ_{j<m} √(δᵀ F(θ₀ + (j + ½)·δ) δ),   δ = (θ_T − θ₀)/m   (midpoint rule)
//! efficiency       L / C
//! ```
//!
//! Each term is one implicit quadratic form vᵀFv (a forward-mode pass, no F is formed), so
//! this works for models of any size. S is the discrete counterpart of ∫ θ̇ᵀFθ̇ dt (the
//! "complexity = action" view: the work a training run does in the metric); L is the path's
//! length in the Fisher–Rao metric; C is the length of the straight line between its ends
//! (an upper bound on the geodesic distance); L / C ≥ 1 measures how much longer training's
//! path was than that straight chord (1 = as short as the chord).
//!
//! The checkpoints are streamed: [`measure_stream`] reads them through a loader
//! ([`Checkpoints`]) in order and keeps at most two at once (θ_t and θ_{t+1} while it takes
//! their difference; θ₀ and θ_T while it builds a point of the chord), so hundreds of
//! checkpoints of a large model never sit in memory together. Each quadratic form runs beside
//! one model and one direction only: θ_{t+1} is dropped once Δθ_t is taken and read again for
//! the next step, and θ_T once the chord's point is built (in θ₀'s place), so that `fisher
//! action` holds at most three model-sized vectors at any time.
//! [`measure`] works on models in memory, [`measure_loaded`] on models read one at a time;
//! both give the same numbers, bit for bit.
//!
//! [`run`] is the whole of `fisher action`: an [`ActionRequest`] (checkpoint files, data,
//! variant, device, plot) → the first checkpoint read ([`CheckpointLoader`]) → the data
//! checked against it → the device opened ([`crate::device::open`]) → [`measure_loaded`],
//! reading and checking each later checkpoint when the path reaches it (a file of another
//! architecture is refused then, by name) → the plot, written atomically (the only file
//! written, and only on success) → an [`ActionRun`].

use std::borrow::{Borrow, Cow};
use std::path::{Path, PathBuf};
use std::time::Instant;

use ndarray::{Array1, ArrayView1, Zip};

use crate::backend::gpu::GpuOptions;
use crate::device::{self, DeviceRequest};
use crate::engine::{Backend, Engine};
use crate::error::{FisherError, Result};
use crate::fisher::Variant;
use crate::graph::fisher::GraphModel;
use crate::model::run::{self as run_dir, CheckpointLoader};
use crate::model::{architecture_text, ActivationSpec, DataSource, Dataset, Likelihood, Mlp, NpyDataset};
use crate::output::plot;
use crate::output::progress::Progress;

/// One step of the path.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ActionStep {
    /// Index t of the step θ_t → θ_{t+1}.
    pub step: usize,
    /// Euclidean ‖Δθ_t‖.
    pub euclidean: f64,
    /// Δθ_tᵀ F(θ_t) Δθ_t, this step's contribution to S.
    pub action: f64,
    /// √(Δθ_tᵀ F(θ_t) Δθ_t), its contribution to L.
    pub length: f64,
    /// L up to and including this step.
    pub cumulative_length: f64,
}

/// The action, length, chord and efficiency of a path.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ActionReport {
    /// Number of checkpoints (T + 1).
    pub checkpoints: usize,
    /// Number of parameters.
    pub parameters: usize,
    /// Per-step table.
    pub steps: Vec<ActionStep>,
    /// S.
    pub action: f64,
    /// L.
    pub length: f64,
    /// Fisher length of the straight chord θ₀ → θ_T (midpoint rule).
    pub chord: f64,
    /// Segments of the chord's midpoint rule.
    pub segments: usize,
    /// L / chord.
    pub efficiency: f64,
    /// Euclidean path length Σ‖Δθ_t‖.
    pub euclidean_length: f64,
    /// Euclidean ‖θ_T − θ₀‖.
    pub euclidean_chord: f64,
}

/// What [`check_same_architecture`] compares: each layer's weight shape and bias length, and
/// the activations (none of the values).
type Shape = (Vec<((usize, usize), Option<usize>)>, Vec<crate::model::Activation>);

fn shape_of(mlp: &Mlp) -> Shape {
    (mlp.layers.iter().map(|l| (l.weight.dim(), l.bias.as_ref().map(|b| b.len()))).collect(), mlp.activations.clone())
}

fn different_architecture(t: usize) -> FisherError {
    FisherError::InvalidInput(format!(
        "checkpoint {t} does not have the architecture of checkpoint 0 (layer shapes, biases or activations differ)"
    ))
}

/// Checks that every checkpoint has the architecture of the first (shapes, biases,
/// activations), naming the first that differs.
pub fn check_same_architecture(checkpoints: &[Mlp]) -> Result<()> {
    let Some(first) = checkpoints.first() else {
        return Err(FisherError::InvalidInput("no checkpoints".into()));
    };
    let first = shape_of(first);
    match checkpoints.iter().skip(1).position(|c| shape_of(c) != first) {
        Some(i) => Err(different_architecture(i + 1)),
        None => Ok(()),
    }
}

/// Measures the path θ₀ … θ_T (`checkpoints`, all the same architecture) on `data`: the
/// checkpoints in memory, through [`measure_loaded`] (the same numbers, bit for bit).
///
/// `progress(done, total)` is called after each quadratic form (T + `segments` of them).
pub fn measure(
    engine: &Engine,
    checkpoints: &[Mlp],
    data: &dyn DataSource,
    variant: Variant,
    segments: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ActionReport> {
    check_same_architecture(checkpoints)?;
    measure_loaded(engine, checkpoints.len(), |t| Ok(&checkpoints[t]), data, variant, segments, progress)
}

/// [`measure`] of `count` checkpoints read through `load(t)`, which [`measure_stream`] calls
/// in order (see [`Checkpoints`] for which twice), holding at most two of them at once and
/// only one beside each quadratic form: a run of hundreds of checkpoints needs the memory of
/// about three, not of all. `load` returns a model ([`LoadedModel`]: an `Mlp` read for the
/// run, or a `&Mlp` in memory). Each checkpoint is checked to have the architecture of the
/// first.
pub fn measure_loaded<M: LoadedModel>(
    engine: &Engine,
    count: usize,
    load: impl FnMut(usize) -> Result<M>,
    data: &dyn DataSource,
    variant: Variant,
    segments: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ActionReport> {
    let mut run = MlpRun { engine, data, variant, count, load, first: None };
    measure_stream(&mut run, segments, progress)
}

/// A checkpoint as [`measure_loaded`] receives it: a model read for the run (`Mlp`) or one
/// borrowed from memory (`&Mlp`). A point of the chord is built in θ₀'s place
/// ([`Checkpoints::between`]): in its storage when it is owned, in a copy when borrowed.
pub trait LoadedModel: Borrow<Mlp> {
    /// The model, owned: moved where it is owned, copied where it is borrowed.
    fn into_model(self) -> Mlp;
}

impl LoadedModel for Mlp {
    fn into_model(self) -> Mlp {
        self
    }
}

impl LoadedModel for &Mlp {
    fn into_model(self) -> Mlp {
        self.clone()
    }
}

/// An MLP's checkpoints through a loader, measured by `engine` on `data`.
struct MlpRun<'a, L> {
    engine: &'a Engine,
    data: &'a dyn DataSource,
    variant: Variant,
    count: usize,
    load: L,
    /// The first checkpoint's shape, once read, that every other must have.
    first: Option<Shape>,
}

impl<M: LoadedModel, L: FnMut(usize) -> Result<M>> Checkpoints for MlpRun<'_, L> {
    type Checkpoint = M;
    type Point = Mlp;
    type Value = f32;

    fn count(&self) -> usize {
        self.count
    }

    fn load(&mut self, t: usize) -> Result<M> {
        let model = (self.load)(t)?;
        let shape = shape_of(model.borrow());
        match &self.first {
            Some(first) if *first != shape => return Err(different_architecture(t)),
            Some(_) => {}
            None => self.first = Some(shape),
        }
        Ok(model)
    }

    fn theta<'c>(&self, checkpoint: &'c M) -> Vec<Cow<'c, [f32]>> {
        let mlp: &'c Mlp = checkpoint.borrow();
        let mut pieces = Vec::with_capacity(2 * mlp.layers.len());
        for layer in &mlp.layers {
            // Mlp::parameters' order: the weight row-major, then the bias.
            pieces.push(match layer.weight.as_slice() {
                Some(values) => Cow::Borrowed(values),
                None => Cow::Owned(layer.weight.iter().copied().collect()),
            });
            if let Some(bias) = &layer.bias {
                pieces.push(match bias.as_slice() {
                    Some(values) => Cow::Borrowed(values),
                    None => Cow::Owned(bias.to_vec()),
                });
            }
        }
        pieces
    }

    fn between(&mut self, from: M, to: &M, s: f64) -> Result<Mlp> {
        let (mut point, to) = (from.into_model(), to.borrow());
        // In place, tensor by tensor (`load` checked that the shapes agree).
        let towards = |a: &mut f32, &b: &f32| *a = between(f64::from(*a), f64::from(b), s);
        for (a, b) in point.layers.iter_mut().zip(&to.layers) {
            Zip::from(&mut a.weight).and(&b.weight).for_each(towards);
            if let (Some(a), Some(b)) = (&mut a.bias, &b.bias) {
                Zip::from(a).and(b).for_each(towards);
            }
        }
        point.validate()?;
        Ok(point)
    }

    fn quadratic(&mut self, checkpoint: &M, delta: &[f32]) -> Result<f64> {
        self.engine.fisher_quadratic(checkpoint.borrow(), self.data, self.variant, ArrayView1::from(delta))
    }

    fn quadratic_between(&mut self, point: &Mlp, delta: &[f32]) -> Result<f64> {
        self.engine.fisher_quadratic(point, self.data, self.variant, ArrayView1::from(delta))
    }
}

/// A training run as [`measure_stream`] reads it: T + 1 checkpoints, each loaded when it is
/// needed, and the quadratic form of the Fisher at each.
///
/// [`measure_stream`] reads the checkpoints in order, and each but θ₀ twice: for the step
/// θ_t → θ_{t+1} it calls `load(t + 1)`, takes Δθ_t, drops θ_{t+1}, measures the form at θ_t
/// beside Δθ_t alone, drops both and calls `load(t + 1)` again. For each segment of the
/// chord it then calls `load(0)` beside θ_T (read again with `load(T)` first after the first
/// segment), takes δ, builds the segment's point in θ₀'s place ([`Checkpoints::between`])
/// and drops θ_T. So at most two checkpoints are alive at once, and each form runs beside one
/// model and one direction. With checkpoints read from files into owned models (as `fisher
/// action` reads them), at most three model-sized vectors are alive at any time (θ_t with
/// θ_{t+1} and its file or with Δθ_t; θ_T with θ₀ and its file or with δ): a run of any
/// length needs the memory of about three checkpoints and one micro-batch, not of T + 1.
pub trait Checkpoints {
    /// One checkpoint in memory.
    type Checkpoint;
    /// A point between two checkpoints: a model of their architecture with θ of its own.
    type Point;
    /// The type of θ's entries: `f32` for models; `f64` for θ vectors given in f64.
    type Value: Copy + Into<f64>;
    /// T + 1.
    fn count(&self) -> usize;
    /// Reads checkpoint `t`.
    fn load(&mut self, t: usize) -> Result<Self::Checkpoint>;
    /// θ of `checkpoint` in parameter order, as consecutive pieces (e.g. a model's tensors),
    /// borrowed where it can be.
    fn theta<'c>(&self, checkpoint: &'c Self::Checkpoint) -> Vec<Cow<'c, [Self::Value]>>;
    /// The model of `from` (its architecture and constants) at θ = θ_from + s·(θ_to − θ_from),
    /// each entry [`between`] the entries of θ_from and θ_to; built in `from`'s storage where
    /// it can be.
    fn between(&mut self, from: Self::Checkpoint, to: &Self::Checkpoint, s: f64) -> Result<Self::Point>;
    /// Δᵀ F(θ) Δ at `checkpoint`.
    fn quadratic(&mut self, checkpoint: &Self::Checkpoint, delta: &[f32]) -> Result<f64>;
    /// Δᵀ F(θ) Δ at a point between checkpoints.
    fn quadratic_between(&mut self, point: &Self::Point, delta: &[f32]) -> Result<f64>;
}

/// a + s·(b − a) in f64 (a and b are f32 values, so b − a is exact), rounded once to f32:
/// one entry of a point between checkpoints.
fn between(a: f64, b: f64, s: f64) -> f32 {
    (a + (b - a) * s) as f32
}

/// The quadratic form Δᵀ F(θ) Δ of a path's model: `(Some(t), θ_t, Δ)` at checkpoint t, or
/// `(None, θ, Δ)` at a point between checkpoints.
pub type Quadratic<'a> = dyn FnMut(Option<usize>, &[f32], &[f32]) -> Result<f64> + 'a;

/// The action, length and chord of the path θ₀ … θ_T given in memory and its quadratic form,
/// whatever the model (a graph read from ONNX: [`measure_graph`]); [`measure_stream`] over
/// `thetas`.
pub fn measure_path(
    thetas: &[Array1<f64>],
    segments: usize,
    progress: &mut dyn FnMut(usize, usize),
    quadratic: &mut Quadratic<'_>,
) -> Result<ActionReport> {
    measure_stream(&mut InMemory { thetas, quadratic }, segments, progress)
}

/// θ vectors in memory, for [`measure_path`]; a checkpoint is its index and θ.
struct InMemory<'a, 'q> {
    thetas: &'a [Array1<f64>],
    quadratic: &'a mut Quadratic<'q>,
}

impl<'a> Checkpoints for InMemory<'a, '_> {
    type Checkpoint = (usize, &'a Array1<f64>);
    type Point = Vec<f32>;
    type Value = f64;

    fn count(&self) -> usize {
        self.thetas.len()
    }

    fn load(&mut self, t: usize) -> Result<(usize, &'a Array1<f64>)> {
        Ok((t, &self.thetas[t]))
    }

    fn theta<'c>(&self, (_, theta): &'c (usize, &'a Array1<f64>)) -> Vec<Cow<'c, [f64]>> {
        vec![match theta.as_slice() {
            Some(values) => Cow::Borrowed(values),
            None => Cow::Owned(theta.to_vec()),
        }]
    }

    fn between(&mut self, (_, from): (usize, &'a Array1<f64>), &(_, to): &(usize, &'a Array1<f64>), s: f64) -> Result<Vec<f32>> {
        Ok(from.iter().zip(to).map(|(&a, &b)| between(a, b, s)).collect())
    }

    fn quadratic(&mut self, &(t, theta): &(usize, &'a Array1<f64>), delta: &[f32]) -> Result<f64> {
        let theta: Vec<f32> = theta.iter().map(|&x| x as f32).collect();
        (self.quadratic)(Some(t), &theta, delta)
    }

    fn quadratic_between(&mut self, point: &Vec<f32>, delta: &[f32]) -> Result<f64> {
        (self.quadratic)(None, point, delta)
    }
}

/// The action, length and chord of the path `run` reads, one checkpoint at a time (see
/// [`Checkpoints`] for the order of the reads).
///
/// Differences θ_{t+1} − θ_t are taken in f64 (exact for f32 values) and rounded once to the
/// f32 direction; the Euclidean norms sum their squares in f64 in the order of ndarray's
/// `dot` of the whole difference, so the numbers are those of θ vectors held in memory.
pub fn measure_stream<C: Checkpoints + ?Sized>(
    run: &mut C,
    segments: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ActionReport> {
    let count = run.count();
    if count < 2 {
        return Err(FisherError::InvalidInput(format!("the action needs at least 2 checkpoints, got {count}")));
    }
    if segments == 0 {
        return Err(FisherError::InvalidInput("--segments must be at least 1".into()));
    }
    if segments > MAX_SEGMENTS {
        return Err(FisherError::InvalidInput(format!("--segments must be at most {MAX_SEGMENTS}, not {segments}")));
    }
    let total = count - 1 + segments;
    let mut done = 0;
    let mut steps = Vec::with_capacity(count - 1);
    let (mut action, mut length, mut euclidean_length) = (0.0, 0.0, 0.0);
    let mut current = run.load(0)?;
    let parameters = run.theta(&current).iter().map(|piece| piece.len()).sum();
    for t in 0..count - 1 {
        // θ_{t+1} only for Δθ_t: dropped before the form, read again below. Δθ_t is made
        // afresh each step rather than kept, so that it is not alive while a checkpoint is
        // read (θ_t, the file and θ_{t+1} are three model-sized vectors already).
        let (delta, squares) = {
            let next = run.load(t + 1)?;
            differences(&run.theta(&current), &run.theta(&next), t + 1, |x| x as f32)?
        };
        let q = run.quadratic(&current, &delta)?.max(0.0);
        let euclidean = squares.sqrt();
        action += q;
        length += q.sqrt();
        euclidean_length += euclidean;
        steps.push(ActionStep { step: t, euclidean, action: q, length: q.sqrt(), cumulative_length: length });
        done += 1;
        progress(done, total);
        drop((delta, current)); // before θ_{t+1} is read again
        current = run.load(t + 1)?;
    }
    let m = segments as f64;
    let (mut last, mut whole_squares, mut chord) = (Some(current), 0.0, 0.0);
    for j in 0..segments {
        let s = (j as f64 + 0.5) / m;
        // θ₀ beside θ_T (read again after the first segment), only to take δ and build the
        // point in θ₀'s place; θ_T is dropped before the form.
        let (point, delta) = {
            let last = match last.take() {
                Some(last) => last,
                None => run.load(count - 1)?,
            };
            let first = run.load(0)?;
            // whole = θ_T − θ₀ (exact in f64); the chord's direction δ = whole / m, rounded once
            // (the same each segment).
            let (delta, squares) = differences(&run.theta(&first), &run.theta(&last), count - 1, |w| (w / m) as f32)?;
            whole_squares = squares;
            (run.between(first, &last, s)?, delta)
        };
        chord += run.quadratic_between(&point, &delta)?.max(0.0).sqrt();
        done += 1;
        progress(done, total);
    }
    Ok(ActionReport {
        checkpoints: count,
        parameters,
        steps,
        action,
        length,
        chord,
        segments,
        efficiency: if chord > 0.0 { length / chord } else { f64::INFINITY },
        euclidean_length,
        euclidean_chord: whole_squares.sqrt(),
    })
}

/// The entries of θ given in pieces, in f64.
fn values<'a, V: Copy + Into<f64> + 'a>(pieces: &'a [Cow<'_, [V]>]) -> impl Iterator<Item = f64> + 'a {
    pieces.iter().flat_map(|piece| piece.iter().map(|&x| x.into()))
}

/// `direction(b − a)` entry by entry, and Σ (b − a)² ([`SquareSum`]), for θ `a` and θ `b` of
/// checkpoint `t` (named when its length differs).
fn differences<V: Copy + Into<f64>>(
    a: &[Cow<'_, [V]>],
    b: &[Cow<'_, [V]>],
    t: usize,
    direction: impl Fn(f64) -> f32,
) -> Result<(Vec<f32>, f64)> {
    let (p, q): (usize, usize) = (a.iter().map(|x| x.len()).sum(), b.iter().map(|x| x.len()).sum());
    if p != q {
        return Err(FisherError::InvalidInput(format!("checkpoint {t} has {q} parameters but checkpoint 0 has {p}")));
    }
    let mut squares = SquareSum::default();
    // Exactly P: the pieces' iterator does not know its length, and collecting it would grow
    // the vector by doubling (copying it, and leaving it up to twice its size).
    let mut d = Vec::with_capacity(p);
    d.extend(values(a).zip(values(b)).map(|(x, y)| {
        let w = y - x;
        squares.push(w);
        direction(w)
    }));
    Ok((d, squares.total()))
}

/// Σ x² over a stream, summed in exactly the order of ndarray's `dot` of a contiguous f64
/// vector with itself (`numeric_util::unrolled_dot`, ndarray 0.17 without BLAS: eight running
/// sums over whole blocks of eight, folded as (p0 + p4), (p1 + p5), (p2 + p6), (p3 + p7), then
/// the remainder), so that norms of streamed differences equal, bit for bit, those the
/// action took of whole vectors in memory before it streamed its checkpoints.
#[derive(Default)]
struct SquareSum {
    lanes: [f64; 8],
    block: [f64; 8],
    filled: usize,
}

impl SquareSum {
    fn push(&mut self, x: f64) {
        self.block[self.filled] = x;
        self.filled += 1;
        if self.filled == 8 {
            for (lane, &x) in self.lanes.iter_mut().zip(&self.block) {
                *lane += x * x;
            }
            self.filled = 0;
        }
    }

    fn total(&self) -> f64 {
        let p = &self.lanes;
        let mut sum = 0.0;
        sum += p[0] + p[4];
        sum += p[1] + p[5];
        sum += p[2] + p[6];
        sum += p[3] + p[7];
        for &x in &self.block[..self.filled] {
            sum += x * x;
        }
        sum
    }
}

/// [`measure`] for a graph network read from ONNX: `model` at θ₀, the checkpoints as θ
/// vectors in its parameter order.
#[allow(clippy::too_many_arguments)]
pub fn measure_graph(
    engine: &Engine,
    model: &crate::graph::fisher::GraphModel,
    thetas: &[Array1<f64>],
    data: &Dataset,
    likelihood: Likelihood,
    variant: Variant,
    segments: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ActionReport> {
    measure_path(thetas, segments, progress, &mut |_, theta, delta| {
        let at = model.with_theta(theta)?;
        Ok(engine.graph_fvp(&at, data, likelihood, variant, delta, false)?.quadratic)
    })
}

/// A graph network's checkpoints through a loader (`fisher action --model`).
struct GraphRun<'a, L> {
    engine: &'a Engine,
    data: &'a Dataset,
    likelihood: Likelihood,
    variant: Variant,
    count: usize,
    load: L,
}

impl<L: FnMut(usize) -> Result<GraphModel>> Checkpoints for GraphRun<'_, L> {
    type Checkpoint = GraphModel;
    type Point = GraphModel;
    type Value = f32;

    fn count(&self) -> usize {
        self.count
    }

    fn load(&mut self, t: usize) -> Result<GraphModel> {
        (self.load)(t)
    }

    fn theta<'c>(&self, checkpoint: &'c GraphModel) -> Vec<Cow<'c, [f32]>> {
        // Graph::theta's order: the parameters in order, each row-major.
        checkpoint.graph.params.iter().map(|p| Cow::Borrowed(p.data.as_slice())).collect()
    }

    fn between(&mut self, from: GraphModel, to: &GraphModel, s: f64) -> Result<GraphModel> {
        // `from`'s constants (running statistics) with θ between.
        let theta: Vec<f32> = values(&self.theta(&from)).zip(values(&self.theta(to))).map(|(a, b)| between(a, b, s)).collect();
        from.with_theta(&theta)
    }

    fn quadratic(&mut self, checkpoint: &GraphModel, delta: &[f32]) -> Result<f64> {
        Ok(self.engine.graph_fvp(checkpoint, self.data, self.likelihood, self.variant, delta, false)?.quadratic)
    }

    fn quadratic_between(&mut self, point: &GraphModel, delta: &[f32]) -> Result<f64> {
        self.quadratic(point, delta)
    }
}

/// The most chord segments (10⁵): each is one pass over the data.
pub const MAX_SEGMENTS: usize = 100_000;

/// What [`run`] measures: a training run given as checkpoint files, on data from files.
#[derive(Debug, Clone)]
pub struct ActionRequest {
    /// Two or more checkpoint files, or one directory of them
    /// ([`crate::model::run::checkpoint_files`]).
    pub checkpoints: Vec<PathBuf>,
    /// Activations between the layers.
    pub activation: ActivationSpec,
    /// Inputs (.npy).
    pub inputs: PathBuf,
    /// Labels or targets (.npy).
    pub labels: PathBuf,
    /// The likelihood.
    pub likelihood: Likelihood,
    /// The variant of F(θ) that measures each step.
    pub variant: Variant,
    /// Segments of the chord's midpoint rule.
    pub segments: usize,
    /// Requested compute path.
    pub backend: Backend,
    /// Adapter choice.
    pub gpu: GpuOptions,
    /// Also plot the per-step action and the cumulative length here (.png or .svg).
    pub plot: Option<PathBuf>,
    /// Draw a progress bar on stderr (only ever on a terminal).
    pub show_progress: bool,
    /// A graph network read from ONNX (`--model`): the checkpoints are then its state dicts
    /// (safetensors keyed by its parameter names) or ONNX files of the same graph. Also
    /// implied when the checkpoints are `.onnx` files.
    pub model: Option<PathBuf>,
}

/// Wall-clock seconds per stage of [`run`].
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Seconds {
    /// Reading and checking the first checkpoint and the data.
    pub load: f64,
    /// Choosing an adapter, creating the device and building the kernels.
    pub setup: f64,
    /// The T + segments quadratic forms, with the reading of the other checkpoints (each
    /// read when the path reaches it).
    pub compute: f64,
    /// Rendering and writing the plot (0 without one).
    pub plot: f64,
}

/// What [`run`] measured.
#[derive(Debug)]
pub struct ActionRun {
    /// The measures.
    pub report: ActionReport,
    /// The checkpoint files, in order.
    pub files: Vec<PathBuf>,
    /// e.g. `6-12-3 tanh`.
    pub architecture: String,
    /// N.
    pub samples: usize,
    /// The likelihood.
    pub likelihood: Likelihood,
    /// The variant.
    pub variant: Variant,
    /// The backend's label.
    pub backend: String,
    /// GPU adapter name, when on a GPU.
    pub adapter: Option<String>,
    /// Why Auto fell back to the CPU.
    pub fallback: Option<String>,
    /// The plot written.
    pub plot: Option<PathBuf>,
    /// Seconds per stage.
    pub seconds: Seconds,
}

/// `6-12-3 tanh`: the layer shapes ([`Mlp::shape_text`], layers without a bias named) and
/// the activations as [`architecture_text`] names them (its text for no widths is ` tanh MLP`).
fn architecture(mlp: &Mlp) -> String {
    let names: Vec<&str> = mlp.activations.iter().map(|a| a.name()).collect();
    format!("{}{}", mlp.shape_text(), architecture_text(&[], Some(&names)).trim_end_matches(" MLP"))
}

/// Measures the training run `request` names (the whole of `fisher action`). The plot path
/// is checked before any work.
pub fn run(request: &ActionRequest) -> Result<ActionRun> {
    let mut seconds = Seconds::default();
    if let Some(path) = &request.plot {
        plot::check_plot_path(path)?;
    }
    let graph_mode = request.model.is_some()
        || request.checkpoints.first().is_some_and(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("onnx")));
    if graph_mode {
        return run_graph(request, seconds);
    }
    let start = Instant::now();
    let files = run_dir::checkpoint_files(&request.checkpoints)?;
    // The first checkpoint now (the data are checked against it); the others one at a time
    // as the path is measured.
    let (loader, first) = CheckpointLoader::open(files.clone(), &request.activation)?;
    // Read a micro-batch at a time by every quadratic form: memory does not grow with N.
    let data = NpyDataset::open(&request.inputs, &request.labels, request.likelihood)?;
    data.validate(&first, request.likelihood).map_err(|e| match e {
        FisherError::InvalidInput(why) => FisherError::InvalidInput(format!(
            "{} and {} do not fit the model {}: {why}",
            request.inputs.display(),
            request.labels.display(),
            files[0].display()
        )),
        other => other,
    })?;
    seconds.load = start.elapsed().as_secs_f64();

    let start = Instant::now();
    let device = device::open(&DeviceRequest::from_env(request.backend, request.gpu.clone())?)?;
    seconds.setup = start.elapsed().as_secs_f64();
    let engine = &device.engine;

    let start = Instant::now();
    let total = files.len() - 1 + request.segments;
    let progress = Progress::new("action: quadratic forms", total, request.show_progress);
    let architecture = architecture(&first);
    // The stream's first read is the model already read; every later one reads its file.
    let mut first = Some(first);
    let load = |t: usize| match first.take() {
        Some(model) if t == 0 => Ok(model),
        _ => loader.load(t),
    };
    let report = measure_loaded(engine, files.len(), load, &data, request.variant, request.segments, &mut progress.callback())?;
    progress.finish();
    seconds.compute = start.elapsed().as_secs_f64();

    if let Some(path) = &request.plot {
        let start = Instant::now();
        let title =
            format!("Action along training: {architecture} MLP, {} Fisher, N = {}", request.variant.name(), data.len());
        plot::action_plot(path, &report, &title)?;
        seconds.plot = start.elapsed().as_secs_f64();
    }
    Ok(ActionRun {
        report,
        files,
        architecture,
        samples: data.len(),
        likelihood: request.likelihood,
        variant: request.variant,
        backend: engine.device_info(),
        adapter: device.adapter.map(|a| a.name),
        fallback: device.fallback,
        plot: request.plot.clone(),
        seconds,
    })
}

/// θ of checkpoint `path` for `model`: an ONNX file of the same graph (same parameter names
/// and shapes), or a safetensors state dict holding every parameter by name (other keys,
/// such as BatchNorm running statistics, update the constants of the same name).
fn graph_checkpoint(model: &crate::graph::fisher::GraphModel, path: &Path, shape: &[usize]) -> Result<crate::graph::fisher::GraphModel> {
    let graph = &model.graph;
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("onnx")) {
        let other = crate::graph::onnx::load(path, Some(shape))?.graph;
        let names = |g: &crate::graph::Graph| g.params.iter().map(|p| (p.name.clone(), p.shape.clone())).collect::<Vec<_>>();
        if names(&other) != names(graph) || other.nodes != graph.nodes {
            return Err(FisherError::InvalidInput(format!("{}: a different network than the first checkpoint", path.display())));
        }
        return crate::graph::fisher::GraphModel::new(other);
    }
    let (tensors, _) = crate::io::safetensors::read_safetensors(path)?;
    let mut updated = graph.clone();
    let mut theta = Vec::with_capacity(graph.param_count());
    for p in &graph.params {
        let Some((_, shape, values)) = tensors.iter().find(|t| t.0 == p.name) else {
            return Err(FisherError::InvalidInput(format!("{}: no tensor '{}' (a parameter of the model)", path.display(), p.name)));
        };
        if *shape != p.shape {
            return Err(FisherError::InvalidInput(format!(
                "{}: tensor '{}' has shape {shape:?}; the model's parameter has {:?}",
                path.display(),
                p.name,
                p.shape
            )));
        }
        theta.extend_from_slice(values);
    }
    updated.set_theta(&theta)?;
    for t in &mut updated.tensors {
        if let crate::graph::TensorKind::Const(values) = &mut t.kind {
            if let Some((_, _, new)) = tensors.iter().find(|x| x.0 == t.name && x.2.len() == values.len()) {
                values.copy_from_slice(new);
            }
        }
    }
    crate::graph::fisher::GraphModel::new(updated)
}

fn run_graph(request: &ActionRequest, mut seconds: Seconds) -> Result<ActionRun> {
    let start = Instant::now();
    let files: Vec<PathBuf> = run_dir::checkpoint_files_of(&request.checkpoints, &["safetensors", "onnx"])?
        .into_iter()
        .filter(|f| request.model.as_deref() != Some(f.as_path()))
        .collect();
    if files.len() < 2 {
        return Err(FisherError::InvalidInput(format!("the action needs at least 2 checkpoints, got {}", files.len())));
    }
    let model_path = request.model.clone().unwrap_or_else(|| files[0].clone());
    let (model, data) = crate::pipeline::graph::load_graph_problem(&model_path, &request.inputs, &request.labels, request.likelihood)?;
    let shape = model.graph.input_shape().to_vec();
    // The first checkpoint is read (and checked) now, the others one at a time as the path
    // is measured.
    let mut first = Some(graph_checkpoint(&model, &files[0], &shape)?);
    seconds.load = start.elapsed().as_secs_f64();

    let start = Instant::now();
    let device = device::open(&DeviceRequest::from_env(request.backend, request.gpu.clone())?)?;
    seconds.setup = start.elapsed().as_secs_f64();
    let engine = &device.engine;

    let start = Instant::now();
    let total = files.len() - 1 + request.segments;
    let progress = Progress::new("action: quadratic forms", total, request.show_progress);
    let load = |t: usize| match first.take() {
        Some(checkpoint) if t == 0 => Ok(checkpoint),
        _ => graph_checkpoint(&model, &files[t], &shape),
    };
    let (likelihood, variant) = (request.likelihood, request.variant);
    let mut run = GraphRun { engine, data: &data, likelihood, variant, count: files.len(), load };
    let report = measure_stream(&mut run, request.segments, &mut progress.callback())?;
    progress.finish();
    seconds.compute = start.elapsed().as_secs_f64();
    let architecture = format!("{} ({} operators, P = {})", model_path.display(), model.graph.nodes.len(), model.graph.param_count());
    if let Some(path) = &request.plot {
        let start = Instant::now();
        let title = format!("Action along training: {architecture}, {} Fisher, N = {}", request.variant.name(), data.len());
        plot::action_plot(path, &report, &title)?;
        seconds.plot = start.elapsed().as_secs_f64();
    }
    Ok(ActionRun {
        report,
        files,
        architecture,
        samples: data.len(),
        likelihood: request.likelihood,
        variant: request.variant,
        backend: engine.device_info(),
        adapter: device.adapter.map(|a| a.name),
        fallback: device.fallback,
        plot: request.plot.clone(),
        seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The streamed sum of squares is ndarray's `dot` of the vector with itself, bit for bit,
    /// at every length around the block of eight and at a long one.
    #[test]
    fn square_sum_is_ndarrays_dot() {
        let mut rng = crate::synthetic::SplitMix64::new(7);
        for n in (0..=33).chain([1000, 1003, 4097]) {
            let x: Array1<f64> = (0..n).map(|_| rng.normal() * 10f64.powi((rng.normal() * 3.0) as i32)).collect();
            let mut sum = SquareSum::default();
            x.iter().for_each(|&v| sum.push(v));
            assert_eq!(sum.total().to_bits(), x.dot(&x).to_bits(), "n = {n}");
        }
    }
}
