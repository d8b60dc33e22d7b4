//! A small, seeded trainer that produces checkpoints for `fisher action` and the demo, so the
//! whole pipeline runs without PyTorch: minibatch SGD with momentum on the negative
//! log-likelihood of the model's own likelihood (softmax cross-entropy or squared error / 2).
//!
//! It is deliberately plain (f32 forward/backward with ndarray products): models trained
//! here are demo-sized. Real training runs come from PyTorch as safetensors checkpoints.

use ndarray::{Array1, Array2, Axis};

use crate::error::{FisherError, Result};
use crate::model::{Activation, Dataset, Linear, Mlp, Targets};
use crate::synthetic::SplitMix64;

/// Initializes an MLP like PyTorch's `nn.Linear` default: weights and biases uniform in
/// ±1/√fan_in (Kaiming-uniform with a = √5), seeded.
pub fn init_mlp(widths: &[usize], activation: Activation, bias: bool, seed: u64) -> Result<Mlp> {
    if widths.len() < 2 || widths.contains(&0) {
        return Err(FisherError::InvalidInput(format!("widths {widths:?}: need at least two positive widths")));
    }
    let mut rng = SplitMix64::new(seed);
    let layers = widths
        .windows(2)
        .enumerate()
        .map(|(l, w)| {
            let bound = 1.0 / (w[0] as f64).sqrt();
            let mut uniform = || ((2.0 * rng.uniform() - 1.0) * bound) as f32;
            Linear {
                index: 2 * l,
                weight: Array2::from_shape_simple_fn((w[1], w[0]), &mut uniform),
                bias: bias.then(|| Array1::from_shape_simple_fn(w[1], &mut uniform)),
            }
        })
        .collect::<Vec<_>>();
    Mlp::new(layers, vec![activation; widths.len() - 2])
}

/// A seeded classification task: `classes` Gaussian clusters in `dim` dimensions, warped by
/// a fixed random tanh layer so that the classes are not linearly separable.
pub fn classification_task(samples: usize, dim: usize, classes: usize, seed: u64) -> Result<Dataset> {
    if samples == 0 || dim == 0 || classes < 2 {
        return Err(FisherError::InvalidInput("a task needs samples, a dimension and ≥ 2 classes".into()));
    }
    let mut rng = SplitMix64::new(seed);
    let means = Array2::from_shape_simple_fn((classes, dim), || (1.5 * rng.normal()) as f32);
    let warp = Array2::from_shape_simple_fn((dim, dim), || (rng.normal() / (dim as f64).sqrt()) as f32);
    let mut inputs = Array2::<f32>::zeros((samples, dim));
    let mut labels = Vec::with_capacity(samples);
    for mut row in inputs.rows_mut() {
        let y = rng.below(classes as u64) as usize;
        labels.push(y as u32);
        let point: Array1<f32> = means.row(y).mapv(|m| m + rng.normal() as f32);
        row.assign(&(point.dot(&warp).mapv(|v| (2.0 * v).tanh()) + &point * 0.5));
    }
    Ok(Dataset { inputs, targets: Targets::Classes(labels) })
}

/// Minibatch SGD options.
#[derive(Debug, Clone)]
pub struct SgdOptions {
    /// Step size.
    pub learning_rate: f32,
    /// Heavy-ball momentum (0 = plain SGD).
    pub momentum: f32,
    /// Samples per step.
    pub batch_size: usize,
    /// Number of steps.
    pub steps: usize,
    /// Checkpoints to keep, evenly spaced in steps, the initial and final models included.
    pub checkpoints: usize,
    /// Shuffling seed.
    pub seed: u64,
}

/// A finished run: the checkpoints, the steps they were taken at, and the training loss there.
#[derive(Debug, Clone)]
pub struct TrainRun {
    /// θ at each checkpoint.
    pub checkpoints: Vec<Mlp>,
    /// The step of each checkpoint.
    pub steps: Vec<usize>,
    /// Mean negative log-likelihood on the whole dataset at each checkpoint.
    pub losses: Vec<f64>,
}

/// Mean negative log-likelihood (up to the Gaussian constant) and its gradient in θ order.
pub fn loss_and_gradient(mlp: &Mlp, data: &Dataset, rows: &[usize]) -> (f64, Array1<f32>) {
    let depth = mlp.layers.len();
    let mut x = Array2::<f32>::zeros((rows.len(), mlp.layers[0].fan_in()));
    for (k, &i) in rows.iter().enumerate() {
        x.row_mut(k).assign(&data.inputs.row(i));
    }
    let mut acts = vec![x];
    let mut zs = Vec::with_capacity(depth);
    for (l, layer) in mlp.layers.iter().enumerate() {
        let mut z = acts[l].dot(&layer.weight.t());
        if let Some(b) = &layer.bias {
            z += b;
        }
        if l + 1 < depth {
            let phi = mlp.activations[l];
            acts.push(z.mapv(|v| phi.apply(v)));
        }
        zs.push(z);
    }
    let m = rows.len() as f32;
    let out = &zs[depth - 1];
    let mut loss = 0f64;
    // δ = ∂(mean loss)/∂z_L.
    let mut delta = out.clone();
    match &data.targets {
        Targets::Classes(labels) => {
            for (k, mut row) in delta.rows_mut().into_iter().enumerate() {
                let zmax = row.fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                let denom: f32 = row.iter().map(|&v| (v - zmax).exp()).sum();
                let y = labels[rows[k]] as usize;
                loss += (denom.ln() + zmax - row[y]) as f64;
                row.mapv_inplace(|v| (v - zmax).exp() / denom / m);
                row[y] -= 1.0 / m;
            }
        }
        Targets::Values(values) => {
            for (k, mut row) in delta.rows_mut().into_iter().enumerate() {
                let target = values.row(rows[k]);
                loss += 0.5 * row.iter().zip(target.iter()).map(|(&a, &b)| ((a - b) as f64).powi(2)).sum::<f64>();
                row.zip_mut_with(&target, |d, &t| *d = (*d - t) / m);
            }
        }
    }
    let mut grads: Vec<(Array2<f32>, Option<Array1<f32>>)> = Vec::with_capacity(depth);
    for l in (0..depth).rev() {
        let layer = &mlp.layers[l];
        let gw = delta.t().dot(&acts[l]);
        let gb = layer.bias.as_ref().map(|_| delta.sum_axis(Axis(0)));
        grads.push((gw, gb));
        if l > 0 {
            let phi = mlp.activations[l - 1];
            let mut back = delta.dot(&layer.weight);
            back.zip_mut_with(&zs[l - 1], |d, &z| *d *= phi.derivative(z));
            delta = back;
        }
    }
    grads.reverse();
    let mut theta = Vec::with_capacity(mlp.num_params());
    for (gw, gb) in grads {
        theta.extend(gw.iter().copied());
        if let Some(gb) = gb {
            theta.extend(gb.iter().copied());
        }
    }
    (loss / rows.len() as f64, Array1::from(theta))
}

/// Trains `initial` on `data` and keeps `checkpoints` evenly spaced models.
pub fn sgd(initial: &Mlp, data: &Dataset, options: &SgdOptions) -> Result<TrainRun> {
    if options.checkpoints < 2 || options.steps == 0 || options.batch_size == 0 {
        return Err(FisherError::InvalidInput("training needs steps, a batch size and at least 2 checkpoints".into()));
    }
    data.validate(initial, data.likelihood())?;
    let n = data.len();
    let all: Vec<usize> = (0..n).collect();
    let save_at: Vec<usize> =
        (0..options.checkpoints).map(|c| (c * options.steps + (options.checkpoints - 1) / 2) / (options.checkpoints - 1)).collect();
    let mut rng = SplitMix64::new(options.seed);
    let mut order: Vec<usize> = all.clone();
    let mut cursor = n;
    let mut theta = initial.parameters();
    let mut velocity = Array1::<f32>::zeros(theta.len());
    let mut model = initial.clone();
    let mut run = TrainRun { checkpoints: Vec::new(), steps: Vec::new(), losses: Vec::new() };
    for step in 0..=options.steps {
        if save_at.contains(&step) && run.steps.last() != Some(&step) {
            run.losses.push(loss_and_gradient(&model, data, &all).0);
            run.checkpoints.push(model.clone());
            run.steps.push(step);
        }
        if step == options.steps {
            break;
        }
        let mut batch = Vec::with_capacity(options.batch_size.min(n));
        while batch.len() < options.batch_size.min(n) {
            if cursor == n {
                // Fisher–Yates reshuffle each epoch.
                for i in (1..n).rev() {
                    order.swap(i, rng.below(i as u64 + 1) as usize);
                }
                cursor = 0;
            }
            batch.push(order[cursor]);
            cursor += 1;
        }
        let (_, grad) = loss_and_gradient(&model, data, &batch);
        velocity = &velocity * options.momentum + &grad;
        theta = &theta - &(&velocity * options.learning_rate);
        model = model.with_parameters(theta.view())?;
    }
    Ok(run)
}
