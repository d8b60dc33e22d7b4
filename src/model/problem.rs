//! Seeded synthetic problems: a model and data built in memory from a few numbers, the
//! same on every platform (`fisher compute --synthetic-model`, `fisher report`, benches).

use ndarray::Array1;

use super::{ActivationSpec, Dataset, Likelihood, Linear, Mlp, Targets};
use crate::error::Result;
use crate::synthetic::{normal_matrix, SplitMix64};

/// The seeded synthetic problem: He-initialized Linear layers (weights N(0, 2/in), biases
/// N(0, 10⁻⁴)) at Sequential indices 0, 2, 4, … (an activation module between each pair),
/// standard-normal inputs, and uniformly drawn class labels (categorical) or standard-normal
/// targets (Gaussian). Same seed, same problem, on every platform.
pub fn synthetic_problem(
    widths: &[usize],
    samples: usize,
    seed: u64,
    activation: &ActivationSpec,
    likelihood: Likelihood,
) -> Result<(Mlp, Dataset)> {
    let mut rng = SplitMix64::new(seed);
    let layers: Vec<Linear> = widths
        .windows(2)
        .enumerate()
        .map(|(l, w)| {
            let scale = (2.0 / w[0] as f64).sqrt();
            Linear {
                index: 2 * l,
                weight: ndarray::Array2::from_shape_simple_fn((w[1], w[0]), || (rng.normal() * scale) as f32),
                bias: Some(Array1::from_shape_simple_fn(w[1], || (rng.normal() * 0.01) as f32)),
            }
        })
        .collect();
    let activations = activation.for_gaps(layers.len() - 1)?;
    let mlp = Mlp::new(layers, activations)?;
    // Independent streams for the inputs and the targets (SplitMix64 streams from distinct
    // seeds do not overlap in any practical length).
    let inputs = normal_matrix(samples, widths[0], seed ^ 0x1A7E_5EED_0000_0001);
    let outputs = mlp.output_dim();
    let targets = match likelihood {
        Likelihood::Categorical => {
            let mut labels = SplitMix64::new(seed ^ 0x1A7E_5EED_0000_0002);
            Targets::Classes((0..samples).map(|_| labels.below(outputs as u64) as u32).collect())
        }
        Likelihood::Gaussian => Targets::Values(normal_matrix(samples, outputs, seed ^ 0x1A7E_5EED_0000_0003)),
    };
    Ok((mlp, Dataset { inputs, targets }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_problem_is_seeded_and_valid() {
        let spec = ActivationSpec::parse("tanh").unwrap();
        let (mlp, data) = synthetic_problem(&[5, 4, 3], 20, 7, &spec, Likelihood::Categorical).unwrap();
        assert_eq!(mlp.widths(), [5, 4, 3]);
        assert_eq!(mlp.layers.iter().map(|l| l.index).collect::<Vec<_>>(), [0, 2]);
        data.validate(&mlp, Likelihood::Categorical).unwrap();
        let again = synthetic_problem(&[5, 4, 3], 20, 7, &spec, Likelihood::Categorical).unwrap();
        assert_eq!((mlp.clone(), data.clone()), again);
        let other = synthetic_problem(&[5, 4, 3], 20, 8, &spec, Likelihood::Categorical).unwrap();
        assert_ne!(mlp, other.0);
        let (_, gauss) = synthetic_problem(&[5, 4, 3], 20, 7, &spec, Likelihood::Gaussian).unwrap();
        assert_eq!(gauss.likelihood(), Likelihood::Gaussian);
    }
}
