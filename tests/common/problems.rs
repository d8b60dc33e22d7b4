//! Seeded problems: MLPs, data sets and the CPU reduction of gradients, built one way for
//! every test.

use fisher_engine::backend::cpu::CpuBackend;
use fisher_engine::model::{Activation, Dataset, Likelihood, Linear, Mlp, Targets};
use fisher_engine::synthetic::SplitMix64;
use fisher_engine::{FisherBackend, FisherMatrix, Form};
use ndarray::{s, Array1, Array2, ArrayView2};

/// A seeded MLP with layer widths `widths`, its layers at indices 0, 2, 4, … (an
/// `nn.Sequential` with activation modules between) and `activations` between them. Layer l
/// has weights N(0, gain²/fan_in) and, where `bias[l]`, biases N(0, bias_std²), drawn from
/// `rng` in layer order (weights, then bias).
pub fn seeded_mlp(
    widths: &[usize],
    activations: &[Activation],
    bias: &[bool],
    gain: f64,
    bias_std: f64,
    rng: &mut SplitMix64,
) -> Mlp {
    assert_eq!(bias.len(), widths.len() - 1, "one bias flag per layer");
    let layers = widths
        .windows(2)
        .enumerate()
        .map(|(l, pair)| {
            let (fan_in, fan_out) = (pair[0], pair[1]);
            let scale = gain / (fan_in as f64).sqrt();
            Linear {
                index: 2 * l,
                weight: Array2::from_shape_simple_fn((fan_out, fan_in), || (rng.normal() * scale) as f32),
                bias: bias[l].then(|| Array1::from_shape_simple_fn(fan_out, || (rng.normal() * bias_std) as f32)),
            }
        })
        .collect();
    Mlp::new(layers, activations.to_vec()).expect("valid seeded MLP")
}

/// `n` seeded samples: N(0, 1) inputs of width `inputs`, then targets for `likelihood` with
/// `outputs` outputs (uniform classes, or N(0, 1) values), drawn from `rng` in that order.
pub fn seeded_dataset(n: usize, inputs: usize, outputs: usize, likelihood: Likelihood, rng: &mut SplitMix64) -> Dataset {
    let inputs = Array2::from_shape_simple_fn((n, inputs), || rng.normal() as f32);
    let targets = match likelihood {
        Likelihood::Categorical => Targets::Classes((0..n).map(|_| rng.below(outputs as u64) as u32).collect()),
        Likelihood::Gaussian => Targets::Values(Array2::from_shape_simple_fn((n, outputs), || rng.normal() as f32)),
    };
    Dataset { inputs, targets }
}

/// The likelihood named by a test case's `gaussian` flag.
pub fn likelihood(gaussian: bool) -> Likelihood {
    if gaussian {
        Likelihood::Gaussian
    } else {
        Likelihood::Categorical
    }
}

/// The CPU backend's `form` of `grads`, pushing the rows in pieces of `pieces` rows (cycled)
/// when given, in one push otherwise.
pub fn cpu_reduce(grads: ArrayView2<'_, f32>, form: &Form, pieces: &[usize]) -> FisherMatrix {
    let backend = CpuBackend::new();
    if *form == Form::Gram {
        return FisherMatrix::Gram(backend.gram(grads).expect("gram"));
    }
    let mut acc = backend.accumulator(form, grads.ncols()).expect("accumulator");
    if pieces.is_empty() {
        acc.push(grads).expect("push");
    } else {
        let mut start = 0;
        for &len in pieces.iter().cycle() {
            if start == grads.nrows() {
                break;
            }
            let end = (start + len).min(grads.nrows());
            acc.push(grads.slice(s![start..end, ..])).expect("push");
            start = end;
            assert_eq!(acc.samples(), start);
        }
    }
    acc.finish().expect("finish")
}
