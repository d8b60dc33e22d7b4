//! GPU reductions against the f64 reference, on seeded inputs with awkward shapes, on the
//! adapter's own limits and with the binding limit lowered so that the chunked and
//! panel-tiled paths run even on small problems. Under `FISHER_REQUIRE_GPU=1` a missing
//! adapter fails every test here; otherwise each prints `SKIPPED <name>: no GPU adapter`.


use fisher_engine::reference::grads as reference;
use fisher_engine::backend::gpu::{GpuBackend, GpuOptions};
use fisher_engine::synthetic::gradient_like;
use crate::common;
use crate::common::verify::{assert_agrees, assert_psd, assert_symmetric, assert_trace_matches_mean_norm, Tolerance};
use fisher_engine::{Backend, Engine, FisherError, FisherMatrix, Form};
use ndarray::{s, Array2};

/// Number of summed products per entry, which sets the tolerance.
fn terms(form: &Form, n: usize, p: usize) -> usize {
    match form {
        Form::Gram | Form::SampleNorms => p,
        _ => n,
    }
}

/// Reduces `g` to `form` with `engine` and checks it against the f64 reference.
#[track_caller]
fn check(engine: &Engine, g: &Array2<f32>, form: &Form) -> FisherMatrix {
    let (n, p) = g.dim();
    let got = engine.fisher_from_grads(g.view(), form).unwrap_or_else(|e| panic!("{form:?} on {n}x{p}: {e}"));
    let want = reference::reduce(g.view(), form).expect("reference");
    assert_agrees(&got, &want, Tolerance::for_sum(terms(form, n, p)));
    got
}

fn all_forms(p: usize) -> Vec<Form> {
    let mut forms = vec![Form::Full, Form::Diagonal, Form::Gram, Form::SampleNorms];
    if p >= 3 {
        // Blocks of awkward sizes: 1, a prime, the rest.
        let b = (p / 3).max(1);
        forms.push(Form::BlockDiagonal(vec![1, b, p - 1 - b]));
    } else {
        forms.push(Form::BlockDiagonal(vec![p]));
    }
    forms
}

#[test]
fn awkward_shapes_match_reference() {
    let Some(engine) = common::gpu_engine("awkward_shapes_match_reference") else { return };
    // N=1, P=1, primes, one past a tile (65), not a multiple of anything.
    for (i, &(n, p)) in [(1, 1), (1, 7), (5, 1), (33, 65), (130, 129), (257, 300)].iter().enumerate() {
        let g = gradient_like(n, p, 100 + i as u64);
        for form in all_forms(p) {
            check(&engine, &g, &form);
        }
    }
}

#[test]
fn p_4097_full_and_diag_match_reference() {
    let Some(engine) = common::gpu_engine("p_4097_full_and_diag_match_reference") else { return };
    let g = gradient_like(24, 4097, 7);
    let full = check(&engine, &g, &Form::Full);
    let FisherMatrix::Full(f) = &full else { unreachable!() };
    assert_symmetric(f);
    check(&engine, &g, &Form::Diagonal);
    check(&engine, &g, &Form::SampleNorms);
}

/// Lowers the binding limit to 64 KiB: output panels of 128 columns, chunks of ≤ 54 samples.
fn tiny_binding_options(variant: Option<&str>) -> GpuOptions {
    GpuOptions { max_binding_bytes: Some(64 << 10), syrk_variant: variant.map(String::from), ..Default::default() }
}

#[test]
fn forced_chunking_and_panel_tiling_match_reference() {
    for variant in ["tiled", "direct"] {
        let name = format!("forced_chunking_and_panel_tiling_match_reference[{variant}]");
        let options = tiny_binding_options(Some(variant));
        let Some(ctx) = common::gpu_context_with(&name, &options) else { return };
        let backend = GpuBackend::new(ctx, &options).expect("backend");
        let (n, p) = (1000, 300);
        // The plan really tiles: 3 panels per side and 19 chunks of ≤ 54 samples.
        assert_eq!(backend.panel_max(), 128);
        let rows = backend.chunk_rows(p, 0).expect("chunk rows");
        assert!(rows * 4 * p <= 64 << 10 && rows < n, "chunk of {rows} rows does not force streaming");
        let engine = Engine::from_gpu_backend(backend);
        let g = gradient_like(n, p, 11);
        for form in [Form::Full, Form::Diagonal, Form::SampleNorms, Form::BlockDiagonal(vec![100, 157, 43])] {
            check(&engine, &g, &form);
        }
        // Gram over 200 samples: row chunks of 128 and a 2×2 grid of output blocks.
        check(&engine, &g.slice(s![..200, ..]).to_owned(), &Form::Gram);
    }
}

#[test]
fn precision_at_65536_samples() {
    let Some(engine) = common::gpu_engine("precision_at_65536_samples") else { return };
    let g = gradient_like(65_536, 48, 3);
    let got = engine.fisher_from_grads(g.view(), &Form::Full).expect("full");
    let want = reference::reduce(g.view(), &Form::Full).expect("reference");
    let agreement = got.agreement(&want).expect("comparable");
    // The contract, stated independently of the tolerance model.
    println!("N = 65536: max|ΔF|/max|F| = {:.3e}", agreement.max_rel);
    assert!(agreement.max_rel <= 2e-6, "max|ΔF|/max|F| = {:.3e} > 2e-6", agreement.max_rel);
    assert_agrees(&got, &want, Tolerance::for_sum(65_536));
    // The design's own bound, much tighter than the contract: f32 sums over blocks of 64
    // samples, Kahan above them. Measured ≈ 2u on lavapipe; accumulating whole 8192-sample
    // chunks in one f32 register instead (no block folding) measures ≈ 15u and fails here.
    let u = f64::from(f32::EPSILON) / 2.0;
    assert!(agreement.max_rel <= 5.0 * u, "blocked + compensated accumulation lost: {:.3e} > 5u", agreement.max_rel);
    let diag = engine.fisher_from_grads(g.view(), &Form::Diagonal).expect("diag");
    assert!(diag.agreement(&reference::reduce(g.view(), &Form::Diagonal).unwrap()).unwrap().max_rel <= 2e-6);
}

#[test]
fn invariants_hold_on_gpu() {
    let Some(engine) = common::gpu_engine("invariants_hold_on_gpu") else { return };
    // N < P: F is singular but PSD; its smallest eigenvalues are 0 up to rounding.
    let g = gradient_like(7, 20, 5);
    let full = engine.fisher_from_grads(g.view(), &Form::Full).unwrap();
    let FisherMatrix::Full(f) = &full else { unreachable!() };
    assert_symmetric(f);
    assert_psd(f, 1e-5);
    let norms = engine.fisher_from_grads(g.view(), &Form::SampleNorms).unwrap();
    let tol = Tolerance::for_sum(20);
    assert_trace_matches_mean_norm(&full, &norms, tol);
    for form in [Form::Diagonal, Form::Gram, Form::BlockDiagonal(vec![5, 15])] {
        let r = engine.fisher_from_grads(g.view(), &form).unwrap();
        assert_trace_matches_mean_norm(&r, &norms, tol);
    }
    // Gram is symmetric too and shares F's non-zero spectrum: ‖K‖_F = ‖F‖_F.
    let FisherMatrix::Gram(k) = engine.fisher_from_grads(g.view(), &Form::Gram).unwrap() else { unreachable!() };
    assert_symmetric(&k);
    let fro = |m: &Array2<f32>| m.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
    assert!((fro(f) - fro(&k)).abs() <= 1e-5 * fro(f), "‖F‖ = {} vs ‖K‖ = {}", fro(f), fro(&k));
}

#[test]
fn streamed_pushes_equal_one_push() {
    let Some(engine) = common::gpu_engine("streamed_pushes_equal_one_push") else { return };
    let g = gradient_like(509, 70, 9);
    for form in [Form::Full, Form::Diagonal, Form::SampleNorms, Form::BlockDiagonal(vec![35, 35])] {
        let mut acc = engine.backend().accumulator(&form, 70).unwrap();
        for (a, b) in [(0, 1), (1, 8), (8, 300), (300, 509)] {
            acc.push(g.slice(s![a..b, ..])).unwrap();
        }
        assert_eq!(acc.samples(), 509);
        let streamed = acc.finish().unwrap();
        let want = reference::reduce(g.view(), &form).unwrap();
        assert_agrees(&streamed, &want, Tolerance::for_sum(terms(&form, 509, 70)));
    }
}

#[test]
fn non_standard_layout_input_is_handled() {
    let Some(engine) = common::gpu_engine("non_standard_layout_input_is_handled") else { return };
    // A transposed (column-major) view must give the same F as its contiguous copy.
    let gt = gradient_like(40, 90, 4);
    let g = gt.t();
    let got = engine.fisher_from_grads(g, &Form::Full).unwrap();
    let want = reference::reduce(g.as_standard_layout().view(), &Form::Full).unwrap();
    assert_agrees(&got, &want, Tolerance::for_sum(90));
}

#[test]
fn over_budget_requests_are_clear_errors() {
    let options = GpuOptions { memory_budget_bytes: Some(1 << 20), ..Default::default() };
    let Some(engine) = common::gpu_engine_with("over_budget_requests_are_clear_errors", &options) else { return };
    let g = gradient_like(4, 1000, 1);
    // Full F of 1000 parameters needs 8 MB of accumulators (sum + compensation).
    match engine.fisher_from_grads(g.view(), &Form::Full) {
        Err(FisherError::DoesNotFit { needed, limit, .. }) => {
            assert_eq!(limit, 1 << 20);
            assert!(needed >= 8_000_000, "needed {needed}");
        }
        other => panic!("expected DoesNotFit, got {other:?}"),
    }
    // One sample wider than the binding limit.
    let options = GpuOptions { max_binding_bytes: Some(16 << 10), ..Default::default() };
    let Some(engine) = common::gpu_engine_with("over_budget_requests_are_clear_errors", &options) else { return };
    let g = gradient_like(2, 5000, 1);
    let err = engine.fisher_from_grads(g.view(), &Form::Diagonal).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, FisherError::DoesNotFit { needed: 20000, limit: 16384, .. }), "{text}");
    assert!(text.contains("5000 parameters") && text.contains("16384"), "{text}");
}

#[test]
fn non_finite_gradients_are_reported_with_row_and_column() {
    let Some(engine) = common::gpu_engine("non_finite_gradients_are_reported_with_row_and_column") else { return };
    let mut g = gradient_like(20, 6, 2);
    g[[13, 4]] = f32::NAN;
    g[[17, 1]] = f32::INFINITY;
    match engine.fisher_from_grads(g.view(), &Form::Full) {
        Err(FisherError::NonFinite { row: 13, col: 4, .. }) => {}
        other => panic!("expected NonFinite at (13, 4), got {other:?}"),
    }
    // Streaming reports the row in the whole input, not in the chunk.
    let mut acc = engine.backend().accumulator(&Form::Diagonal, 6).unwrap();
    acc.push(g.slice(s![..10, ..])).unwrap();
    match acc.push(g.slice(s![10.., ..])) {
        Err(FisherError::NonFinite { row: 13, col: 4, .. }) => {}
        other => panic!("expected NonFinite at (13, 4), got {other:?}"),
    }
    // Wrong width mid-stream.
    let mut acc = engine.backend().accumulator(&Form::Full, 6).unwrap();
    assert!(matches!(acc.push(gradient_like(3, 5, 1).view()), Err(FisherError::InvalidInput(_))));
    // Gram is not streamable.
    assert!(engine.backend().accumulator(&Form::Gram, 6).is_err());
}

#[test]
fn auto_backend_prefers_a_hardware_gpu_then_the_cpu() {
    let Some(ctx) = common::gpu_context("auto_backend_prefers_a_hardware_gpu_then_the_cpu") else { return };
    let engine = Engine::new(Backend::Auto).unwrap();
    // A software adapter (lavapipe, llvmpipe) is slower than the CPU path: Auto takes it only
    // when asked (--backend gpu, --adapter, FISHER_ADAPTER).
    assert_eq!(engine.is_gpu(), !ctx.is_software(), "Auto picked {} beside {}", engine.device_info(), ctx.label());
    let adapters = fisher_engine::backend::gpu::list_adapters();
    assert!(!adapters.is_empty());
    // `auto_pick` marks the best-ranked adapter (what --backend gpu takes); the Auto policy
    // on top of the ranking (`device::auto_choice`, what `fisher devices` reports) takes it
    // only when it is hardware.
    assert_eq!(adapters.iter().filter(|a| a.auto_pick).count(), 1, "{adapters:?}");
    let (choice, reason) = fisher_engine::device::auto_choice(&adapters);
    assert_eq!(choice.is_some(), engine.is_gpu(), "{reason}");
    // Asked for, the software adapter runs.
    assert!(Engine::new(Backend::Gpu).unwrap().is_gpu());
}

#[test]
fn unknown_adapter_filter_is_a_clear_error() {
    let options = GpuOptions { adapter: Some("no-such-adapter-xyz".into()), ..Default::default() };
    match fisher_engine::backend::gpu::GpuContext::new(&options) {
        Err(FisherError::NoAdapter(msg)) => assert!(msg.contains("no-such-adapter-xyz"), "{msg}"),
        other => panic!("expected NoAdapter, got {other:?}"),
    }
}

#[test]
fn dispatch_grid_covers_more_than_65535_groups() {
    use fisher_engine::backend::gpu::kernels::grid;
    assert_eq!(grid(1, 65_535).unwrap(), (1, 1));
    assert_eq!(grid(65_535, 65_535).unwrap(), (65_535, 1));
    let (x, y) = grid(200_000, 65_535).unwrap();
    assert!(x as u64 * y as u64 >= 200_000 && x <= 65_535 && y <= 65_535);
    assert!(grid(65_536u64 * 65_536, 65_535).is_err());
}
