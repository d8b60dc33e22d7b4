//! A full Fisher beyond the accumulator budget (issue 11, "full F beyond one buffer"): the
//! CPU computes it in bands of rows of the upper triangle, one pass over the samples each,
//! and the result is bitwise the single pass's (same `gemm` calls per panel, same block
//! sums), for the streamed gradients, the network path (one and several blocks of samples)
//! and the CLI; misuse of the pass protocol is a clear error.

use std::process::Command;

use fisher_engine::backend::cpu::CpuBackend;
use fisher_engine::fisher::{NetFisher, NetForm, Variant, DEFAULT_BLOCK_SAMPLES};
use fisher_engine::io::write_npy_matrix;
use fisher_engine::model::{Activation, Likelihood};
use fisher_engine::reference::network as reference;
use fisher_engine::synthetic::{gradient_like, SplitMix64};
use fisher_engine::{Engine, FisherBackend, FisherError, FisherMatrix, Form};

use crate::common::cli::{read_safetensors, s, temp, FISHER};
use crate::common::problems::{seeded_dataset, seeded_mlp};

fn bits(m: &ndarray::Array2<f32>) -> Vec<u32> {
    m.iter().map(|v| v.to_bits()).collect()
}

/// Pushes `g` in pieces of `piece` rows once per pass and finishes.
fn streamed(backend: &CpuBackend, g: ndarray::ArrayView2<'_, f32>, piece: usize) -> (usize, ndarray::Array2<f32>) {
    let mut acc = backend.accumulator(&Form::Full, g.ncols()).unwrap();
    let passes = acc.passes();
    for pass in 0..passes {
        if pass > 0 {
            acc.next_pass().unwrap();
        }
        for chunk in g.axis_chunks_iter(ndarray::Axis(0), piece) {
            acc.push(chunk).unwrap();
        }
    }
    let FisherMatrix::Full(f) = acc.finish().unwrap() else { unreachable!() };
    (passes, f)
}

#[test]
fn streamed_bands_equal_the_single_pass_bit_for_bit() {
    // 700 columns: bands of 256, 256 and 188 rows; 5,000 rows cross the 4,096-row f64
    // flush, and pieces of 300 rows go through the staging buffer.
    let g = gradient_like(5000, 700, 31);
    let (one, whole) = streamed(&CpuBackend::new(), g.view(), 300);
    assert_eq!(one, 1);
    for budget in [1u64, 3 << 20, 4 << 20] {
        let (passes, banded) = streamed(&CpuBackend::new().with_accumulator_bytes(budget), g.view(), 300);
        assert!(passes >= 2, "budget {budget}: {passes} passes");
        assert_eq!(bits(&banded), bits(&whole), "budget {budget}, {passes} passes");
    }
    // And through Engine::fisher_from_grads, which pushes the whole matrix per pass (one
    // push of 5,000 rows: other gemm depths than pieces of 300, so compared with its own
    // single pass).
    let full = |engine: Engine| {
        let FisherMatrix::Full(f) = engine.fisher_from_grads(g.view(), &Form::Full).unwrap() else { unreachable!() };
        f
    };
    let (banded, single) = (full(Engine::from_cpu_backend(CpuBackend::new().with_accumulator_bytes(1))), full(Engine::cpu()));
    assert_eq!(bits(&banded), bits(&single));
    let want = fisher_engine::reference::grads::reduce(g.view(), &Form::Full).unwrap();
    let agreement = FisherMatrix::Full(banded).agreement(&want).unwrap();
    assert!(agreement.max_abs <= 2e-6 * agreement.max_ref, "{agreement:?}");
}

#[test]
fn misuse_of_passes_is_a_clear_error() {
    let g = gradient_like(40, 600, 2);
    let backend = CpuBackend::new().with_accumulator_bytes(1);
    // finish after the first of three passes.
    let mut acc = backend.accumulator(&Form::Full, 600).unwrap();
    assert_eq!(acc.passes(), 3);
    acc.push(g.view()).unwrap();
    let err = acc.finish().unwrap_err().to_string();
    assert!(err.contains("3 passes") && err.contains("next_pass"), "{err}");
    // A second pass with fewer samples than the first.
    let mut acc = backend.accumulator(&Form::Full, 600).unwrap();
    acc.push(g.view()).unwrap();
    acc.next_pass().unwrap();
    acc.push(g.slice(ndarray::s![..39, ..])).unwrap();
    let err = acc.next_pass().unwrap_err().to_string();
    assert!(err.contains("39 samples") && err.contains("first saw 40"), "{err}");
    // next_pass after the last pass, and on a single-pass form.
    let mut acc = backend.accumulator(&Form::Full, 600).unwrap();
    for _ in 0..2 {
        acc.push(g.view()).unwrap();
        acc.next_pass().unwrap();
    }
    acc.push(g.view()).unwrap();
    assert!(acc.next_pass().unwrap_err().to_string().contains("last of 3"));
    let mut diag = backend.accumulator(&Form::Diagonal, 600).unwrap();
    assert_eq!(diag.passes(), 1);
    assert!(matches!(diag.next_pass(), Err(FisherError::InvalidInput(_))));
    // An empty pass.
    let mut acc = backend.accumulator(&Form::Full, 600).unwrap();
    assert!(matches!(acc.next_pass(), Err(FisherError::Empty { .. })));
}

fn values(f: &NetFisher) -> Vec<u64> {
    f.values().into_iter().map(f64::to_bits).collect()
}

#[test]
fn network_full_and_layer_in_bands_equal_the_single_pass_and_the_reference() {
    let mut rng = SplitMix64::new(41);
    // P = 12·40 + 40 + 40·30 + 30·5 + 5 = 1,875 parameters: 8 bands of 256 rows at 1 byte.
    let widths = [12, 40, 30, 5];
    let net = seeded_mlp(&widths, &[Activation::Tanh, Activation::Relu], &[true, false, true], 1.0, 0.3, &mut rng);
    let data = seeded_dataset(300, 12, 5, Likelihood::Categorical, &mut rng);
    // Layer blocks of 520, 1,200 and 155 parameters: several bands of the first two, grouped
    // into passes with the third.
    let whole = Engine::cpu();
    for form in [NetForm::Full, NetForm::Layer] {
        for (variant, budget) in [(Variant::Empirical, 1), (Variant::True, 20 << 20), (Variant::MonteCarlo { samples: 2, seed: 9 }, 1)] {
            let banded = Engine::from_cpu_backend(CpuBackend::new().with_accumulator_bytes(budget));
            let a = whole.fisher(&net, &data, variant, form).unwrap();
            let b = banded.fisher(&net, &data, variant, form).unwrap();
            assert_eq!(values(&b), values(&a), "{form:?} {variant:?} at {budget} bytes");
            let want = reference::fisher(&net, &data, data.likelihood(), variant, form).unwrap();
            let agreement = b.agreement(&want).unwrap();
            assert!(agreement.frobenius_rel <= 1e-5, "{form:?} {variant:?}: {agreement:?}");
        }
    }
}

#[test]
fn network_full_in_bands_over_several_blocks_equals_the_single_pass() {
    // More samples than one block: the bands' block sums are combined exactly, as the
    // single pass combines them.
    let mut rng = SplitMix64::new(43);
    // P = 3·40 + 40 + 40·5 + 5 = 365: bands of 256 and 109 rows; layers of 160 and 205.
    let widths = [3, 40, 5];
    let net = seeded_mlp(&widths, &[Activation::Tanh], &[true, true], 1.0, 0.3, &mut rng);
    let n = DEFAULT_BLOCK_SAMPLES + 700;
    let data = seeded_dataset(n, 3, 5, Likelihood::Categorical, &mut rng);
    let p = net.num_params();
    assert!(p > 256, "two bands need more than one panel of rows, P = {p}");
    let banded = Engine::from_cpu_backend(CpuBackend::new().with_accumulator_bytes(1));
    for form in [NetForm::Full, NetForm::Layer] {
        let a = Engine::cpu().fisher(&net, &data, Variant::Empirical, form).unwrap();
        let b = banded.fisher(&net, &data, Variant::Empirical, form).unwrap();
        assert_eq!(values(&b), values(&a), "{form:?}");
    }
}

#[test]
fn cli_reduce_in_bands_writes_the_same_values() {
    let dir = temp();
    let g = gradient_like(600, 530, 5);
    let input = dir.path().join("g.npy");
    write_npy_matrix(&input, g.view()).unwrap();
    let run = |env: Option<&str>, out: &std::path::Path| {
        let mut cmd = Command::new(FISHER);
        cmd.args(["reduce", "--grads", s(&input), "--backend", "cpu", "--form", "full", "--chunk-rows", "70", "--out", s(out)]);
        cmd.env_remove("FISHER_ADAPTER").env_remove("FISHER_CPU_MEMORY_MB");
        if let Some(mib) = env {
            cmd.env("FISHER_CPU_MEMORY_MB", mib);
        }
        cmd.output().unwrap()
    };
    let (one, banded) = (dir.path().join("one.safetensors"), dir.path().join("banded.safetensors"));
    assert!(run(None, &one).status.success());
    // 1 MiB: bands of 256 rows, three passes over the file.
    let out = run(Some("1"), &banded);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(read_safetensors(&banded).matrix("fisher"), read_safetensors(&one).matrix("fisher"));
    // Byte for byte, header included (its keys are sorted, so equal results write equal files):
    // the bands went straight into the file as their passes ended.
    assert!(std::fs::read(&banded).unwrap() == std::fs::read(&one).unwrap(), "the files differ");
    // The trace taken as the bands went by is the whole result's (which a device, taking
    // the result in order, gets).
    let trace = |file: &std::path::Path, env: Option<&str>| {
        let mut cmd = Command::new(FISHER);
        cmd.args(["reduce", "--grads", s(&input), "--backend", "cpu", "--form", "full", "--json", "--force", "--out", s(file)]);
        cmd.env_remove("FISHER_ADAPTER").env_remove("FISHER_CPU_MEMORY_MB");
        if let Some(mib) = env {
            cmd.env("FISHER_CPU_MEMORY_MB", mib);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["trace"].as_f64().unwrap()
    };
    let (streamed, whole) = (trace(&banded, Some("1")), trace(std::path::Path::new("/dev/null"), Some("1")));
    assert!((streamed - whole).abs() <= 1e-12 * whole.abs(), "trace {streamed} vs {whole}");
    // A bad budget is one line naming the variable, exit 2, and nothing written.
    let bad = dir.path().join("bad.safetensors");
    let out = run(Some("lots"), &bad);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("FISHER_CPU_MEMORY_MB") && stderr.trim().lines().count() == 1, "{stderr}");
    assert!(!bad.exists());
}

#[test]
fn gpu_reduce_beyond_its_budget_rereads_the_file_per_pass() {
    if !crate::common::gpu_available("gpu_reduce_beyond_its_budget_rereads_the_file_per_pass") {
        return;
    }
    let dir = temp();
    let g = gradient_like(300, 700, 6);
    let input = dir.path().join("g.npy");
    write_npy_matrix(&input, g.view()).unwrap();
    let out = dir.path().join("F.safetensors");
    // 1 MiB of accumulators for 700² values (3.9 MB at 8 bytes each): several passes.
    let run = Command::new(FISHER)
        .args(["reduce", "--grads", s(&input), "--backend", "gpu", "--form", "full", "--chunk-rows", "64", "--out", s(&out)])
        .env("FISHER_GPU_MEMORY_MB", "1")
        .env_remove("FISHER_ADAPTER")
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let want = fisher_engine::reference::grads::reduce(g.view(), &Form::Full).unwrap();
    let agreement = FisherMatrix::Full(read_safetensors(&out).matrix("fisher")).agreement(&want).unwrap();
    assert!(agreement.max_abs <= 2e-6 * agreement.max_ref, "{agreement:?}");
}

#[test]
fn onnx_full_and_layer_in_bands_equal_the_single_pass() {
    use fisher_engine::graph::fisher::Selection;
    let (model, data, likelihood, _) = crate::graph_fixtures::load("resmlp");
    let all = Selection::all(&model.graph);
    let p = all.count(&model.graph);
    assert!(p > 256, "bands need more than one panel of rows, P = {p}");
    let banded = Engine::from_cpu_backend(CpuBackend::new().with_accumulator_bytes(1));
    for form in [NetForm::Full, NetForm::Layer] {
        for variant in [Variant::Empirical, Variant::True] {
            let a = Engine::cpu().graph_fisher(&model, &data, likelihood, variant, form, &all).unwrap();
            let b = banded.graph_fisher(&model, &data, likelihood, variant, form, &all).unwrap();
            assert_eq!(values(&b), values(&a), "{form:?} {variant:?}");
        }
    }
}

#[test]
fn gpu_budgets_buy_passes_for_networks_and_onnx_host_sums() {
    if !crate::common::gpu_available("gpu_budgets_buy_passes_for_networks_and_onnx_host_sums") {
        return;
    }
    let dir = temp();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = Command::new(FISHER);
        cmd.args(args).env_remove("FISHER_ADAPTER").env_remove("FISHER_CPU_MEMORY_MB").env_remove("FISHER_GPU_MEMORY_MB");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{args:?} {env:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    // An MLP's full F (P = 3,904, 122 MB of accumulators) in an 8 MiB GPU budget: the
    // micro-batch leaves the panel pairs room, and the passes agree with the CPU.
    let out = |name: &str| dir.path().join(name);
    let mlp = ["compute", "--synthetic-model", "8,300,4", "--activation", "tanh", "--synthetic-samples", "100", "--form", "full", "--force", "--quiet"];
    let with = |backend: &str, file: &std::path::Path| {
        let mut a: Vec<String> = mlp.iter().map(|s| s.to_string()).collect();
        a.extend(["--backend".into(), backend.into(), "--out".into(), s(file).into()]);
        a
    };
    let (gpu, cpu) = (out("gpu.safetensors"), out("cpu.safetensors"));
    let args = with("gpu", &gpu);
    run(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[("FISHER_GPU_MEMORY_MB", "8")]);
    let args = with("cpu", &cpu);
    run(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    let (a, b) = (read_safetensors(&gpu).matrix("fisher"), read_safetensors(&cpu).matrix("fisher"));
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(worst <= 2e-6 * scale, "max |Δ| {worst} of {scale}");
    // An ONNX model's full F is summed on the host under the GPU backend too, within
    // FISHER_CPU_MEMORY_MB: the same bytes in four passes as in one.
    let case = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx/resmlp");
    let (one, banded) = (out("one.safetensors"), out("banded.safetensors"));
    for (file, env) in [(&one, vec![]), (&banded, vec![("FISHER_CPU_MEMORY_MB", "1")])] {
        let model = case.join("model.onnx");
        let (x, y) = (case.join("x.npy"), case.join("y.npy"));
        let args = ["compute", "--model", s(&model), "--inputs", s(&x), "--labels", s(&y), "--form", "full", "--backend", "gpu", "--quiet", "--out", s(file)];
        run(&args, &env);
    }
    assert!(std::fs::read(&one).unwrap() == std::fs::read(&banded).unwrap(), "the ONNX results differ");
}
