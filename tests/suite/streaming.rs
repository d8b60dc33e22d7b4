//! Issue 8, "nothing lost, nothing crashes": the Monte Carlo draws of a network Fisher are
//! streamed in chunks (memory independent of K), every size from user input is checked, and
//! results beyond the host result limit are refused before they are allocated.
//!
//! The chunked runs use a backend whose micro-batch scratch is a few KiB
//! ([`CpuBackend::with_batch_bytes`], [`GpuOptions::micro_batch_bytes`]), so that one sample's
//! K rows span many draw chunks, and are compared with the default (unchunked) run and with
//! the f64 reference. Each body runs on the CPU and on the GPU.

use fisher_engine::backend::cpu::CpuBackend;
use fisher_engine::backend::gpu::{GpuBackend, GpuOptions};
use fisher_engine::fisher::{NetFisher, NetForm, Variant};
use fisher_engine::model::{Activation, Dataset, Mlp};
use fisher_engine::reference::network as reference;
use fisher_engine::synthetic::{normal_matrix, SplitMix64};
use fisher_engine::{Engine, FisherBackend, FisherError, Form};
use ndarray::Array1;

use crate::common::problems::{likelihood, seeded_dataset, seeded_mlp};
use crate::common::{backend_test, gpu_context_with};

/// The contract of tests/suite/network.rs: relative Frobenius error against the f64 reference.
const FROBENIUS_REL: f64 = 1e-5;

/// Scratch per micro-batch of the chunked backends: a handful of output rows of the nets
/// below, so that K = 150 draws take dozens of chunks per sample.
const TINY_BATCH_BYTES: u64 = 2048;

fn mlp(widths: &[usize], act: Activation, seed: u64) -> Mlp {
    let bias = vec![true; widths.len() - 1];
    seeded_mlp(widths, &vec![act; widths.len() - 2], &bias, 1.5, 0.3, &mut SplitMix64::new(seed))
}

fn dataset(n: usize, d: usize, outputs: usize, gaussian: bool, seed: u64) -> Dataset {
    seeded_dataset(n, d, outputs, likelihood(gaussian), &mut SplitMix64::new(seed))
}

/// A backend of the same kind as `engine` with a tiny micro-batch (forces draw chunks).
fn chunked_backend(engine: &Engine) -> Box<dyn FisherBackend> {
    if engine.is_gpu() {
        let options = GpuOptions { micro_batch_bytes: Some(TINY_BATCH_BYTES), ..Default::default() };
        let ctx = gpu_context_with("streaming::chunked_backend", &options).expect("a GPU (the engine has one)");
        Box::new(GpuBackend::new(ctx, &options).expect("GPU backend"))
    } else {
        Box::new(CpuBackend::new().with_batch_bytes(TINY_BATCH_BYTES))
    }
}

/// A backend of the same kind as `engine` refusing results above `bytes`.
fn limited_backend(engine: &Engine, bytes: u64) -> Box<dyn FisherBackend> {
    if engine.is_gpu() {
        let options = GpuOptions { max_result_bytes: Some(bytes), ..Default::default() };
        let ctx = gpu_context_with("streaming::limited_backend", &options).expect("a GPU (the engine has one)");
        Box::new(GpuBackend::new(ctx, &options).expect("GPU backend"))
    } else {
        Box::new(CpuBackend::new().with_result_limit(bytes))
    }
}

/// Asserts `got` agrees with `want` within `rel` (relative Frobenius) and 4·`rel` entrywise.
#[track_caller]
fn assert_close<T: Copy + Into<f64>, U: Copy + Into<f64>>(got: &NetFisher<T>, want: &NetFisher<U>, rel: f64, what: &str) {
    let a = got.agreement(want).expect("same form");
    assert!(a.frobenius_rel <= rel && a.max_rel <= 4.0 * rel, "{what}: {a:?}");
}

/// Asserts that `result` is a [`FisherError::DoesNotFit`] or [`FisherError::InvalidInput`]
/// (an error, not a panic or an allocation) and returns its message.
#[track_caller]
fn refused<T: std::fmt::Debug>(result: Result<T, FisherError>, what: &str) -> String {
    match result {
        Err(e @ (FisherError::DoesNotFit { .. } | FisherError::InvalidInput(_))) => e.to_string(),
        other => panic!("{what}: expected a size error, got {other:?}"),
    }
}

const STREAMED_FORMS: [NetForm; 6] =
    [NetForm::Diagonal, NetForm::Kfac, NetForm::Full, NetForm::Norms, NetForm::Layer, NetForm::Grads];

backend_test!(mc_draw_chunks_match_unchunked_and_reference, |engine| {
    let chunked = chunked_backend(&engine);
    // Categorical with tanh and Gaussian with gelu: both MC draw kinds (inverse CDF, Box–Muller).
    for (gaussian, act, seed) in [(false, Activation::Tanh, 1u64), (true, Activation::Gelu, 2)] {
        let net = mlp(&[5, 7, 3], act, seed);
        let data = dataset(11, 5, 3, gaussian, 10 + seed);
        let variant = Variant::MonteCarlo { samples: 150, seed: 0xdead_beef_0000_0007 };
        for form in STREAMED_FORMS {
            let what = format!("gaussian={gaussian} {form:?}");
            let whole = engine.fisher(&net, &data, variant, form).unwrap_or_else(|e| panic!("{what}: {e}"));
            let parts = chunked.network_fisher(&net, &data, variant, form).unwrap_or_else(|e| panic!("{what} chunked: {e}"));
            let want = reference::fisher(&net, &data, data.likelihood(), variant, form).expect("reference");
            assert_close(&parts, &whole, FROBENIUS_REL, &format!("{what}: chunked vs unchunked"));
            assert_close(&parts, &want, FROBENIUS_REL, &format!("{what}: chunked vs reference"));
            assert_close(&whole, &want, FROBENIUS_REL, &format!("{what}: unchunked vs reference"));
        }
    }
});

backend_test!(true_fisher_class_chunks_match_reference, |engine| {
    // `true` has R = C rows per sample; with 9 classes and a tiny batch they are split too.
    let chunked = chunked_backend(&engine);
    let net = mlp(&[4, 6, 9], Activation::Relu, 5);
    let data = dataset(7, 4, 9, false, 6);
    for form in [NetForm::Full, NetForm::Kfac, NetForm::Diagonal, NetForm::Grads] {
        let got = chunked.network_fisher(&net, &data, Variant::True, form).expect("chunked");
        let want = reference::fisher(&net, &data, data.likelihood(), Variant::True, form).expect("reference");
        assert_close(&got, &want, FROBENIUS_REL, &format!("true {form:?}"));
    }
});

backend_test!(mc_fvp_in_draw_chunks_matches_dense_reference, |engine| {
    let chunked = chunked_backend(&engine);
    for gaussian in [false, true] {
        let net = mlp(&[5, 7, 3], Activation::Tanh, 3);
        let data = dataset(13, 5, 3, gaussian, 30);
        let variant = Variant::MonteCarlo { samples: 150, seed: 99 };
        let p = net.num_params();
        let v: Array1<f32> = normal_matrix(1, p, 4).row(0).to_owned();
        let NetFisher::Full(f) = reference::fisher(&net, &data, data.likelihood(), variant, NetForm::Full).expect("reference")
        else {
            unreachable!()
        };
        let v64 = v.mapv(f64::from);
        let fv_want = f.dot(&v64);
        let q_want = v64.dot(&fv_want);
        for (label, backend) in [("engine", engine.backend()), ("chunked", chunked.as_ref())] {
            let fvp = backend.network_fvp(&net, &data, variant, v.view(), true).expect("F·v");
            let fv = fvp.product.expect("product");
            let err = fv.iter().zip(&fv_want).map(|(&a, &b)| (a as f64 - b).powi(2)).sum::<f64>().sqrt();
            let norm = fv_want.iter().map(|b| b * b).sum::<f64>().sqrt();
            assert!(err <= FROBENIUS_REL * norm, "gaussian={gaussian} {label}: |F·v − ref| = {err:e}, |ref| = {norm:e}");
            let q = fvp.quadratic;
            assert!((q - q_want).abs() <= FROBENIUS_REL * q_want.abs(), "gaussian={gaussian} {label}: vᵀFv {q} vs {q_want}");
        }
    }
});

backend_test!(absurd_draw_counts_are_errors, |engine| {
    let net = mlp(&[5, 7, 3], Activation::Tanh, 1);
    let data = dataset(10, 5, 3, false, 2);
    let v = Array1::<f32>::ones(net.num_params());
    for k in [usize::MAX, 1_000_000_000_000, u32::MAX as usize + 1] {
        let variant = Variant::MonteCarlo { samples: k, seed: 0 };
        for form in [NetForm::Diagonal, NetForm::Grads, NetForm::Full, NetForm::Kfac, NetForm::Norms] {
            refused(engine.fisher(&net, &data, variant, form), &format!("K = {k} {form:?}"));
        }
        refused(engine.fisher_vector_product(&net, &data, variant, v.view()), &format!("K = {k} F·v"));
    }
    // A valid K whose gradient rows (10·10⁹ × 66 f32) could never be held.
    let message = refused(
        engine.fisher(&net, &data, Variant::MonteCarlo { samples: 1_000_000_000, seed: 0 }, NetForm::Grads),
        "grads at K = 10⁹",
    );
    assert!(message.contains("--max-result-gib"), "{message}");
});

backend_test!(block_sizes_past_usize_are_errors, |engine| {
    // Checked at the backend, whatever the form parser let through: these sums wrap.
    for sizes in [vec![usize::MAX, 3], vec![usize::MAX / 2 + 1, usize::MAX / 2 + 1, 2], vec![1 << 62; 4]] {
        refused(engine.backend().accumulator(&Form::BlockDiagonal(sizes.clone()), 2).map(|_| ()), &format!("{sizes:?}"));
    }
});

backend_test!(results_beyond_the_limit_are_refused, |engine| {
    let limit = 1u64 << 20;
    let backend = limited_backend(&engine, limit);
    let check = |message: String, what: &str| {
        assert!(message.contains("--max-result-gib") && message.contains(&limit.to_string()), "{what}: {message}");
    };
    // Full and blocks of 1000 parameters: 4 MB of f32 against 1 MiB.
    check(refused(backend.accumulator(&Form::Full, 1000).map(|_| ()), "full"), "full");
    check(refused(backend.accumulator(&Form::BlockDiagonal(vec![600, 400]), 1000).map(|_| ()), "blocks"), "blocks");
    // Gram of 1000 samples.
    let grads = normal_matrix(1000, 2, 1);
    check(refused(backend.gram(grads.view()), "gram"), "gram");
    // A 600-input network: KFAC's A is 601² f32, full is P² ≥ 1201².
    let net = mlp(&[600, 2, 2], Activation::Tanh, 7);
    let data = dataset(3, 600, 2, false, 8);
    for form in [NetForm::Kfac, NetForm::Full, NetForm::Layer] {
        check(refused(backend.network_fisher(&net, &data, Variant::Empirical, form), &format!("{form:?}")), &format!("{form:?}"));
    }
    // What fits still runs: the diagonal, and 3 empirical gradient rows (3 × 1208 f32).
    backend.network_fisher(&net, &data, Variant::Empirical, NetForm::Diagonal).expect("diag is small");
    backend.network_fisher(&net, &data, Variant::Empirical, NetForm::Grads).expect("3 gradient rows are small");
});

backend_test!(default_limit_refuses_a_40_gb_fisher, |engine| {
    // The example: a 2-row G with 100,000 columns asks for a 40 GB full Fisher.
    let message = refused(engine.backend().accumulator(&Form::Full, 100_000).map(|_| ()), "P = 100000");
    assert!(message.contains("100000×100000") && message.contains("--max-result-gib"), "{message}");
});
