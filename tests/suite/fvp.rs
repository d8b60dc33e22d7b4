//! The implicit Fisher–vector product (forward-mode J v, Λ at the output, one backward pass)
//! against the dense f64 reference F·v, on GPU and CPU, for every variant and likelihood.


use fisher_engine::model::{Activation, Dataset, Linear, Mlp, Targets};
use fisher_engine::fisher::{NetFisher, NetForm, Variant};
use fisher_engine::reference::network as reference;
use fisher_engine::synthetic::SplitMix64;
use fisher_engine::{Backend, Engine};
use ndarray::{Array1, Array2};

fn engines(test: &str) -> Vec<(&'static str, Engine)> {
    let mut out = vec![("cpu", Engine::new(Backend::Cpu).expect("cpu"))];
    if let Some(gpu) = crate::common::gpu_engine(test) {
        out.push(("gpu", gpu));
    }
    out
}

fn problem(widths: &[usize], act: Activation, bias: &[bool], gaussian: bool, n: usize, seed: u64) -> (Mlp, Dataset) {
    let mut rng = SplitMix64::new(seed);
    let layers = widths
        .windows(2)
        .enumerate()
        .map(|(l, w)| Linear {
            index: 2 * l,
            weight: Array2::from_shape_simple_fn((w[1], w[0]), || (rng.normal() * 1.2 / (w[0] as f64).sqrt()) as f32),
            bias: bias[l].then(|| Array1::from_shape_simple_fn(w[1], || (rng.normal() * 0.2) as f32)),
        })
        .collect::<Vec<_>>();
    let mlp = Mlp { activations: vec![act; layers.len() - 1], layers };
    let out = *widths.last().unwrap();
    let inputs = Array2::from_shape_simple_fn((n, widths[0]), || rng.normal() as f32);
    let targets = if gaussian {
        Targets::Values(Array2::from_shape_simple_fn((n, out), || rng.normal() as f32))
    } else {
        Targets::Classes((0..n).map(|_| rng.below(out as u64) as u32).collect())
    };
    (mlp, Dataset { inputs, targets })
}

#[test]
fn fvp_matches_dense_reference() {
    let engines = engines("fvp_matches_dense_reference");
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
            for (name, engine) in &engines {
                let got = engine.fisher_vector_product(&mlp, &data, variant, v.view()).unwrap();
                let fv = got.product.expect("product");
                let err = fv.iter().zip(want.iter()).map(|(&a, &b)| (a as f64 - b).powi(2)).sum::<f64>().sqrt();
                assert!(err <= 1e-5 * norm, "{name} {act:?} gaussian={gaussian} {variant:?}: ‖ΔFv‖/‖Fv‖ = {:.2e}", err / norm);
                assert!((got.quadratic - want_q).abs() <= 1e-5 * want_q.abs(), "{name} {variant:?}: vᵀFv {} vs {want_q}", got.quadratic);
                let q = engine.fisher_quadratic(&mlp, &data, variant, v.view()).unwrap();
                assert!((q - want_q).abs() <= 1e-5 * want_q.abs(), "{name} {variant:?}: quadratic-only {q} vs {want_q}");
            }
        }
    }
}

#[test]
fn fvp_over_many_micro_batches() {
    let engines = engines("fvp_over_many_micro_batches");
    let (mlp, data) = problem(&[30, 40, 10], Activation::Relu, &[true, true], false, 2300, 7);
    let p = mlp.num_params();
    let mut rng = SplitMix64::new(8);
    let v = Array1::from_shape_simple_fn(p, || rng.normal() as f32);
    let NetFisher::Full(f) = reference::fisher(&mlp, &data, data.likelihood(), Variant::True, NetForm::Full).unwrap() else { unreachable!() };
    let want = f.dot(&v.mapv(f64::from));
    let norm = want.iter().map(|x| x * x).sum::<f64>().sqrt();
    for (name, engine) in &engines {
        let fv = engine.fisher_vector_product(&mlp, &data, Variant::True, v.view()).unwrap().product.unwrap();
        let err = fv.iter().zip(want.iter()).map(|(&a, &b)| (a as f64 - b).powi(2)).sum::<f64>().sqrt();
        assert!(err <= 1e-5 * norm, "{name}: ‖ΔFv‖/‖Fv‖ = {:.2e}", err / norm);
    }
}

#[test]
fn bad_directions_are_errors() {
    let engines = engines("bad_directions_are_errors");
    let (mlp, data) = problem(&[3, 4, 2], Activation::Tanh, &[true, true], false, 5, 1);
    for (name, engine) in &engines {
        let short = Array1::<f32>::zeros(mlp.num_params() - 1);
        let err = engine.fisher_vector_product(&mlp, &data, Variant::True, short.view()).unwrap_err().to_string();
        assert!(err.contains(&mlp.num_params().to_string()), "{name}: {err}");
        let mut nan = Array1::<f32>::zeros(mlp.num_params());
        nan[3] = f32::NAN;
        assert!(engine.fisher_quadratic(&mlp, &data, Variant::True, nan.view()).is_err(), "{name}");
    }
}
