//! The implicit Fisher–vector product (forward-mode J v, Λ at the output, one backward pass)
//! against the dense f64 reference F·v, on GPU and CPU, for every variant and likelihood.

use fisher_engine::model::{Activation, Dataset, Mlp};
use fisher_engine::fisher::{NetFisher, NetForm, Variant};
use fisher_engine::reference::network as reference;
use fisher_engine::synthetic::SplitMix64;
use ndarray::Array1;

use crate::common::backend_test;
use crate::common::problems::{likelihood, seeded_dataset, seeded_mlp};

/// A seeded MLP (weights N(0, 1.2²/fan_in), biases N(0, 0.2²) where `bias[l]`) and `n`
/// samples for it, all from one seed.
fn problem(widths: &[usize], act: Activation, bias: &[bool], gaussian: bool, n: usize, seed: u64) -> (Mlp, Dataset) {
    let mut rng = SplitMix64::new(seed);
    let mlp = seeded_mlp(widths, &vec![act; widths.len() - 2], bias, 1.2, 0.2, &mut rng);
    let data = seeded_dataset(n, widths[0], *widths.last().unwrap(), likelihood(gaussian), &mut rng);
    (mlp, data)
}

backend_test!(fvp_matches_dense_reference, |engine| {
    let cases = [
        (Activation::Tanh, [true, true, true], false),
        (Activation::Gelu, [false, true, true], true),
        (Activation::Relu, [true, false, true], false),
        (Activation::Sigmoid, [true, true, false], true),
    ];
    for (c, (act, bias, gaussian)) in cases.into_iter().enumerate() {
        let (mlp, data) = problem(&[5, 8, 6, 4], act, &bias, gaussian, 41, 50 + c as u64);
        let p = mlp.num_params();
        let mut rng = SplitMix64::new(60 + c as u64);
        let v = Array1::from_shape_simple_fn(p, || rng.normal() as f32);
        for variant in [Variant::Empirical, Variant::True, Variant::MonteCarlo { samples: 3, seed: 99 }] {
            let NetFisher::Full(f) = reference::fisher(&mlp, &data, data.likelihood(), variant, NetForm::Full).unwrap() else {
                unreachable!()
            };
            let v64 = v.mapv(f64::from);
            let want = f.dot(&v64);
            let want_q = v64.dot(&want);
            let norm = want.iter().map(|x| x * x).sum::<f64>().sqrt();
            let got = engine.fisher_vector_product(&mlp, &data, variant, v.view()).unwrap();
            let fv = got.product.expect("product");
            let err = fv.iter().zip(want.iter()).map(|(&a, &b)| (a as f64 - b).powi(2)).sum::<f64>().sqrt();
            assert!(err <= 1e-5 * norm, "{act:?} gaussian={gaussian} {variant:?}: ‖ΔFv‖/‖Fv‖ = {:.2e}", err / norm);
            assert!((got.quadratic - want_q).abs() <= 1e-5 * want_q.abs(), "{variant:?}: vᵀFv {} vs {want_q}", got.quadratic);
            let q = engine.fisher_quadratic(&mlp, &data, variant, v.view()).unwrap();
            assert!((q - want_q).abs() <= 1e-5 * want_q.abs(), "{variant:?}: quadratic-only {q} vs {want_q}");
        }
    }
});

backend_test!(fvp_over_many_micro_batches, |engine| {
    let (mlp, data) = problem(&[30, 40, 10], Activation::Relu, &[true, true], false, 2300, 7);
    let p = mlp.num_params();
    let mut rng = SplitMix64::new(8);
    let v = Array1::from_shape_simple_fn(p, || rng.normal() as f32);
    let NetFisher::Full(f) = reference::fisher(&mlp, &data, data.likelihood(), Variant::True, NetForm::Full).unwrap() else { unreachable!() };
    let want = f.dot(&v.mapv(f64::from));
    let norm = want.iter().map(|x| x * x).sum::<f64>().sqrt();
    let fv = engine.fisher_vector_product(&mlp, &data, Variant::True, v.view()).unwrap().product.unwrap();
    let err = fv.iter().zip(want.iter()).map(|(&a, &b)| (a as f64 - b).powi(2)).sum::<f64>().sqrt();
    assert!(err <= 1e-5 * norm, "‖ΔFv‖/‖Fv‖ = {:.2e}", err / norm);
});

backend_test!(bad_directions_are_errors, |engine| {
    let (mlp, data) = problem(&[3, 4, 2], Activation::Tanh, &[true, true], false, 5, 1);
    let short = Array1::<f32>::zeros(mlp.num_params() - 1);
    let err = engine.fisher_vector_product(&mlp, &data, Variant::True, short.view()).unwrap_err().to_string();
    assert!(err.contains(&mlp.num_params().to_string()), "{err}");
    let mut nan = Array1::<f32>::zeros(mlp.num_params());
    nan[3] = f32::NAN;
    assert!(engine.fisher_quadratic(&mlp, &data, Variant::True, nan.view()).is_err());
});
