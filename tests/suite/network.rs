//! Every variant × form of the network Fisher, on the GPU and on the CPU, against the f64
//! reference (an independent per-sample backprop, itself checked by finite differences in
//! tests/nn_reference.rs), on seeded MLPs with tanh, relu and gelu, with and without bias,
//! categorical and Gaussian. The same test body runs on each backend.

use fisher_engine::model::{Activation, Dataset, Mlp, Targets};
use fisher_engine::fisher::{kfac_expand, NetFisher, NetForm, Variant};
use fisher_engine::reference::network as reference;
use fisher_engine::synthetic::SplitMix64;
use fisher_engine::FisherError;

use crate::common::backend_test;
use crate::common::problems::{likelihood, seeded_dataset, seeded_mlp};
use crate::common::verify::{assert_psd, assert_symmetric};

/// The contract: relative Frobenius error ≤ 1e-5 against the f64 reference.
const FROBENIUS_REL: f64 = 1e-5;

/// A seeded MLP with the given widths (weights N(0, 1.5²/fan_in), biases N(0, 0.3²));
/// `bias[l]` says whether layer l has a bias.
fn mlp(widths: &[usize], act: Activation, bias: &[bool], seed: u64) -> Mlp {
    seeded_mlp(widths, &vec![act; widths.len() - 2], bias, 1.5, 0.3, &mut SplitMix64::new(seed))
}

fn dataset(n: usize, d: usize, outputs: usize, gaussian: bool, seed: u64) -> Dataset {
    seeded_dataset(n, d, outputs, likelihood(gaussian), &mut SplitMix64::new(seed))
}

const FORMS: [NetForm; 6] = [NetForm::Full, NetForm::Diagonal, NetForm::Layer, NetForm::Kfac, NetForm::Grads, NetForm::Norms];

fn variants() -> [Variant; 3] {
    [Variant::Empirical, Variant::True, Variant::MonteCarlo { samples: 3, seed: 0x5eed_0000_0001 }]
}

backend_test!(every_variant_and_form_matches_reference, |engine| {
    let widths = [6, 9, 5, 4];
    let cases = [
        (Activation::Tanh, [true, true, true], false),
        (Activation::Relu, [false, true, false], false),
        (Activation::Gelu, [true, false, true], true),
        (Activation::Tanh, [false, false, false], true),
        (Activation::Sigmoid, [true, true, false], false),
        (Activation::Relu, [true, true, true], true),
    ];
    for (c, (act, bias, gaussian)) in cases.into_iter().enumerate() {
        let net = mlp(&widths, act, &bias, 10 + c as u64);
        // 37 samples: not a multiple of anything, and several micro-batches would not help here.
        let data = dataset(37, widths[0], widths[3], gaussian, 20 + c as u64);
        for variant in variants() {
            for form in FORMS {
                let want = reference::fisher(&net, &data, data.likelihood(), variant, form).expect("reference");
                let got = engine.fisher(&net, &data, variant, form).unwrap_or_else(|e| panic!("{act:?} {variant:?} {form:?}: {e}"));
                let a = got.agreement(&want).expect("same form");
                assert!(
                    a.frobenius_rel <= FROBENIUS_REL && a.max_rel <= 4.0 * FROBENIUS_REL,
                    "{act:?} bias={bias:?} gaussian={gaussian} {variant:?} {form:?}: {a:?}"
                );
            }
        }
    }
});

backend_test!(many_micro_batches_match_reference, |engine| {
    // 784-wide inputs would be slow for the reference; a 40-64-10 net over 2,500 samples spans
    // several GPU micro-batches (≤ 1024) and CPU batches, with the MC keys per global sample.
    let net = mlp(&[40, 64, 10], Activation::Relu, &[true, true], 3);
    let data = dataset(2500, 40, 10, false, 4);
    for (variant, form) in [
        (Variant::True, NetForm::Diagonal),
        (Variant::MonteCarlo { samples: 2, seed: 77 }, NetForm::Kfac),
        (Variant::Empirical, NetForm::Norms),
        (Variant::Empirical, NetForm::Layer),
    ] {
        let want = reference::fisher(&net, &data, data.likelihood(), variant, form).expect("reference");
        let a = engine.fisher(&net, &data, variant, form).expect("fisher").agreement(&want).unwrap();
        assert!(a.frobenius_rel <= FROBENIUS_REL, "{variant:?} {form:?}: {a:?}");
    }
});

/// Full F and the layer blocks over R ≥ 2 rows per sample are reduced without forming the
/// gradient rows (the CPU's Kronecker reduction, one rank-R sum per sample): over ~80
/// micro-batches, past the f32 → f64 flush at 4,096 samples, with a layer without bias,
/// against the f64 reference.
#[test]
fn cpu_full_and_layer_over_r_rows_and_many_micro_batches_match_reference() {
    use fisher_engine::backend::cpu::CpuBackend;
    use fisher_engine::Engine;
    let net = mlp(&[12, 16, 5], Activation::Tanh, &[false, true], 31);
    let data = dataset(5000, 12, 5, false, 32);
    let engine = Engine::from_cpu_backend(CpuBackend::new().with_batch_bytes(64 << 10));
    for variant in [Variant::True, Variant::MonteCarlo { samples: 3, seed: 5 }] {
        for form in [NetForm::Full, NetForm::Layer] {
            let want = reference::fisher(&net, &data, data.likelihood(), variant, form).expect("reference");
            let a = engine.fisher(&net, &data, variant, form).expect("fisher").agreement(&want).unwrap();
            assert!(a.frobenius_rel <= FROBENIUS_REL && a.max_rel <= 4.0 * FROBENIUS_REL, "{variant:?} {form:?}: {a:?}");
        }
    }
}

/// The diag's sums over micro-batches (an f32 sum added into in place by each micro-batch's
/// GEMM, flushed to f64 every 4,096 samples, two lanes added in f64): 9,000 samples in
/// micro-batches of a few dozen, so that each lane's sum flushes, with one and three rows
/// per sample and a layer without bias, against the f64 reference.
#[test]
fn cpu_diag_over_many_micro_batches_past_the_flush_matches_reference() {
    use fisher_engine::backend::cpu::CpuBackend;
    use fisher_engine::Engine;
    let net = mlp(&[12, 16, 5], Activation::Relu, &[false, true], 41);
    let data = dataset(9000, 12, 5, false, 42);
    let engine = Engine::from_cpu_backend(CpuBackend::new().with_batch_bytes(64 << 10));
    for variant in [Variant::Empirical, Variant::True, Variant::MonteCarlo { samples: 3, seed: 6 }] {
        let want = reference::fisher(&net, &data, data.likelihood(), variant, NetForm::Diagonal).expect("reference");
        let a = engine.fisher(&net, &data, variant, NetForm::Diagonal).expect("fisher").agreement(&want).unwrap();
        assert!(a.frobenius_rel <= FROBENIUS_REL && a.max_rel <= 4.0 * FROBENIUS_REL, "{variant:?}: {a:?}");
    }
}

/// Two classes: the CPU's true Fisher of class labels then backpropagates one row per sample
/// (C − 1 = 1, a factor of diag(p) − ppᵀ), every form against the f64 reference.
#[test]
fn cpu_true_fisher_of_two_classes_matches_reference() {
    use fisher_engine::Engine;
    let net = mlp(&[5, 7, 2], Activation::Tanh, &[true, true], 41);
    let data = dataset(53, 5, 2, false, 42);
    let engine = Engine::cpu();
    for form in FORMS {
        let want = reference::fisher(&net, &data, data.likelihood(), Variant::True, form).expect("reference");
        let a = engine.fisher(&net, &data, Variant::True, form).expect("fisher").agreement(&want).unwrap();
        assert!(a.frobenius_rel <= FROBENIUS_REL && a.max_rel <= 4.0 * FROBENIUS_REL, "{form:?}: {a:?}");
    }
}

backend_test!(forms_are_consistent_with_each_other, |engine| {
    let net = mlp(&[5, 7, 3], Activation::Tanh, &[true, true], 8);
    let data = dataset(23, 5, 3, false, 9);
    for variant in variants() {
        let NetFisher::Full(f) = engine.fisher(&net, &data, variant, NetForm::Full).unwrap() else { unreachable!() };
        assert_symmetric(&f);
        assert_psd(&f, 1e-5);
        let NetFisher::Diagonal(d) = engine.fisher(&net, &data, variant, NetForm::Diagonal).unwrap() else { unreachable!() };
        let scale = f.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (i, &v) in d.iter().enumerate() {
            assert!((v - f[[i, i]]).abs() <= 1e-5 * scale, "{variant:?}: diag[{i}] {v} vs F_ii {}", f[[i, i]]);
        }
        let NetFisher::Norms(norms) = engine.fisher(&net, &data, variant, NetForm::Norms).unwrap() else { unreachable!() };
        let mean = norms.iter().map(|&v| v as f64).sum::<f64>() / 23.0;
        let trace: f64 = f.diag().iter().map(|&v| v as f64).sum();
        assert!((mean - trace).abs() <= 1e-5 * trace, "{variant:?}: tr F {trace} vs mean norm {mean}");
        let NetFisher::Layer(blocks) = engine.fisher(&net, &data, variant, NetForm::Layer).unwrap() else { unreachable!() };
        let mut off = 0;
        for b in &blocks {
            let k = b.nrows();
            let sub = f.slice(ndarray::s![off..off + k, off..off + k]);
            let err = b.iter().zip(sub.iter()).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(err <= 1e-5 * scale, "{variant:?}: layer block at {off} differs by {err}");
            off += k;
        }
        assert_eq!(off, f.nrows());
        // F = GᵀG / N over the square-root factor rows.
        let NetFisher::Grads(g) = engine.fisher(&net, &data, variant, NetForm::Grads).unwrap() else { unreachable!() };
        let gtg = g.t().dot(&g) / 23.0;
        let err = gtg.iter().zip(f.iter()).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(err <= 1e-5 * scale, "{variant:?}: GᵀG/N differs from F by {err}");
    }
});

backend_test!(kfac_is_exact_for_one_sample_and_one_row, |engine| {
    // With N = 1 and R = 1 (empirical), the layer block is exactly (δδᵀ) ⊗ (ããᵀ) in the
    // documented order, so the expanded KFAC equals the exact block.
    for bias in [[true, true], [false, true]] {
        let net = mlp(&[4, 6, 3], Activation::Gelu, &bias, 12);
        let data = dataset(1, 4, 3, false, 13);
        let NetFisher::Kfac(factors) = engine.fisher(&net, &data, Variant::Empirical, NetForm::Kfac).unwrap() else { unreachable!() };
        let NetFisher::Layer(blocks) = engine.fisher(&net, &data, Variant::Empirical, NetForm::Layer).unwrap() else { unreachable!() };
        for (l, (kf, block)) in factors.iter().zip(&blocks).enumerate() {
            let dense = kfac_expand(kf, net.layers[l].bias.is_some()).expect("expand");
            assert_eq!(dense.dim(), block.dim());
            let scale = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let err = dense.iter().zip(block.iter()).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(err <= 1e-5 * scale, "layer {l} bias={bias:?}: KFAC expansion differs by {err}");
        }
    }
});

backend_test!(mc_draws_are_the_same_on_every_backend_and_independent_of_batching, |engine| {
    let net = mlp(&[6, 8, 5], Activation::Tanh, &[true, true], 30);
    let data = dataset(50, 6, 5, false, 31);
    let variant = Variant::MonteCarlo { samples: 4, seed: 1234 };
    let want = reference::fisher(&net, &data, data.likelihood(), variant, NetForm::Grads).unwrap();
    let got = engine.fisher(&net, &data, variant, NetForm::Grads).unwrap();
    let a = got.agreement(&want).unwrap();
    // Equal draws give rows equal to rounding; one different label would be O(1).
    assert!(a.max_rel <= 1e-5, "MC rows differ from the reference's draws: {a:?}");
    // A different seed gives a different estimate.
    let other = reference::fisher(&net, &data, data.likelihood(), Variant::MonteCarlo { samples: 4, seed: 1235 }, NetForm::Grads).unwrap();
    assert!(other.agreement(&want).unwrap().max_rel > 1e-2);
});

backend_test!(bad_network_inputs_are_clear_errors, |engine| {
    let net = mlp(&[3, 4, 2], Activation::Relu, &[true, true], 1);
    let mut data = dataset(5, 3, 2, false, 2);
    if let Targets::Classes(labels) = &mut data.targets {
        labels[3] = 7;
    }
    let err = engine.fisher(&net, &data, Variant::Empirical, NetForm::Diagonal).unwrap_err().to_string();
    assert!(err.contains('3') && err.contains('7'), "{err}");
    let wide = dataset(5, 4, 2, false, 2);
    let err = engine.fisher(&net, &wide, Variant::Empirical, NetForm::Diagonal).unwrap_err().to_string();
    assert!(err.contains('4') && err.contains('3'), "{err}");
    let mut nan = dataset(5, 3, 2, false, 2);
    nan.inputs[[2, 1]] = f32::NAN;
    match engine.fisher(&net, &nan, Variant::True, NetForm::Full) {
        Err(e) => assert!(e.to_string().contains('2'), "{e}"),
        Ok(_) => panic!("NaN input accepted"),
    }
    let mut bad_net = net.clone();
    bad_net.layers[1].weight[[0, 0]] = f32::INFINITY;
    assert!(engine.fisher(&bad_net, &dataset(5, 3, 2, false, 2), Variant::True, NetForm::Diagonal).is_err());
    let zero_mc = engine.fisher(&net, &dataset(5, 3, 2, false, 2), Variant::MonteCarlo { samples: 0, seed: 1 }, NetForm::Diagonal);
    assert!(matches!(zero_mc, Err(FisherError::InvalidInput(_))));
});
