//! A network's summed forms beyond the accumulator budget, written piece by piece (issue 11,
//! models with 10⁷+ parameters): the CPU computes diag and the KFAC factors (like full F and
//! the layer blocks) in bands of rows, one pass over the samples each, puts each band into
//! a sink as its pass ends, and `fisher compute` writes the bands straight into the output
//! file, so the result is never whole in memory. The values are bitwise the single pass's;
//! the files are byte for byte those of the in-memory path.

use std::process::Command;

use fisher_engine::backend::cpu::CpuBackend;
use fisher_engine::fisher::{MemorySink, NetFisher, NetForm, SumLayer, Variant, DEFAULT_BLOCK_SAMPLES};
use fisher_engine::model::{Activation, Likelihood};
use fisher_engine::reference::network as reference;
use fisher_engine::synthetic::SplitMix64;
use fisher_engine::Engine;

use crate::common::cli::{s, temp, FISHER};
use crate::common::problems::{seeded_dataset, seeded_mlp};

fn values(f: &NetFisher) -> Vec<u64> {
    f.values().into_iter().map(f64::to_bits).collect()
}

#[test]
fn diag_and_kfac_in_passes_equal_the_single_pass_and_the_reference() {
    let mut rng = SplitMix64::new(51);
    // A first layer of 1,100 outputs: three bands of 512-row diag gemms; KFAC factors of
    // 13², 1,100², 1,101² and 5²: bands of 256 rows of the two large ones.
    let widths = [12, 1100, 5];
    let net = seeded_mlp(&widths, &[Activation::Tanh], &[true, true], 1.0, 0.3, &mut rng);
    let data = seeded_dataset(200, 12, 5, Likelihood::Categorical, &mut rng);
    let whole = Engine::cpu();
    for form in [NetForm::Diagonal, NetForm::Kfac] {
        for (variant, budget) in [(Variant::Empirical, 1), (Variant::True, 4 << 20), (Variant::MonteCarlo { samples: 2, seed: 9 }, 1)] {
            let banded = Engine::from_cpu_backend(CpuBackend::new().with_accumulator_bytes(budget));
            let a = whole.fisher(&net, &data, variant, form).unwrap();
            let b = banded.fisher(&net, &data, variant, form).unwrap();
            assert_eq!(values(&b), values(&a), "{form:?} {variant:?} at {budget} bytes");
            // The same through a sink, as the command line writes it.
            let mut sink = MemorySink::new(form, &SumLayer::of(&net)).unwrap();
            banded.fisher_into(&net, &data, variant, form, &mut sink).unwrap();
            assert_eq!(values(&sink.into_fisher()), values(&a), "{form:?} {variant:?} into a sink");
            let want = reference::fisher(&net, &data, data.likelihood(), variant, form).unwrap();
            let agreement = b.agreement(&want).unwrap();
            assert!(agreement.frobenius_rel <= 1e-5, "{form:?} {variant:?}: {agreement:?}");
        }
    }
}

#[test]
fn diag_and_kfac_in_passes_over_several_blocks_equal_the_single_pass() {
    // More samples than one block: each band's block sums are combined exactly, as the single
    // pass combines them.
    let mut rng = SplitMix64::new(53);
    let widths = [3, 40, 5];
    let net = seeded_mlp(&widths, &[Activation::Tanh], &[true, true], 1.0, 0.3, &mut rng);
    let data = seeded_dataset(DEFAULT_BLOCK_SAMPLES + 300, 3, 5, Likelihood::Categorical, &mut rng);
    let banded = Engine::from_cpu_backend(CpuBackend::new().with_accumulator_bytes(1));
    for form in [NetForm::Diagonal, NetForm::Kfac] {
        let a = Engine::cpu().fisher(&net, &data, Variant::Empirical, form).unwrap();
        let b = banded.fisher(&net, &data, Variant::Empirical, form).unwrap();
        assert_eq!(values(&b), values(&a), "{form:?}");
    }
}

#[test]
fn the_per_sample_forms_are_refused_by_a_sink() {
    let mut rng = SplitMix64::new(55);
    let net = seeded_mlp(&[4, 6, 3], &[Activation::Tanh], &[true, true], 1.0, 0.3, &mut rng);
    let data = seeded_dataset(10, 4, 3, Likelihood::Categorical, &mut rng);
    let mut sink = MemorySink::new(NetForm::Diagonal, &SumLayer::of(&net)).unwrap();
    for form in [NetForm::Grads, NetForm::Norms] {
        let err = Engine::cpu().fisher_into(&net, &data, Variant::True, form, &mut sink).unwrap_err().to_string();
        assert!(err.contains("per sample"), "{err}");
    }
}

/// `fisher compute` of `form` (empirical) on 300 synthetic samples on the CPU, with
/// `FISHER_CPU_MEMORY_MB` when given: diag and kfac of a 12-1100-200 MLP (P = 234,500, whose
/// diag sums take 1.9 MB and KFAC's 30 MB), layer and full of a 12-40-5 one (P = 725).
fn compute(form: &str, budget: Option<&str>, out: &std::path::Path) -> std::process::Output {
    let widths = if matches!(form, "diag" | "kfac") { "12,1100,200" } else { "12,40,5" };
    let mut cmd = Command::new(FISHER);
    cmd.args(["compute", "--synthetic-model", widths, "--activation", "tanh", "--synthetic-samples", "300"]);
    cmd.args(["--variant", "empirical", "--form", form, "--backend", "cpu", "--out", s(out), "--json", "--force"]);
    cmd.env_remove("FISHER_ADAPTER").env_remove("FISHER_CPU_MEMORY_MB").env("RUST_LOG", "info");
    if let Some(mib) = budget {
        cmd.env("FISHER_CPU_MEMORY_MB", mib);
    }
    cmd.output().unwrap()
}

fn trace_of(out: &std::process::Output) -> f64 {
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    v["trace"].as_f64().unwrap_or_else(|| panic!("no trace in {v}"))
}

#[test]
fn cli_compute_in_passes_writes_the_same_file_piece_by_piece() {
    let dir = temp();
    for form in ["diag", "kfac", "layer", "full"] {
        let (one, banded) = (dir.path().join(format!("{form}-one.safetensors")), dir.path().join(format!("{form}-banded.safetensors")));
        let a = compute(form, None, &one);
        assert!(a.status.success(), "{form}: {}", String::from_utf8_lossy(&a.stderr));
        // 1 MiB of running sums: several passes, each band written into the file.
        let b = compute(form, Some("1"), &banded);
        let log = String::from_utf8_lossy(&b.stderr);
        assert!(b.status.success(), "{form}: {log}");
        assert!(log.contains("passes over the samples"), "{form}: no passes logged: {log}");
        assert!(std::fs::read(&banded).unwrap() == std::fs::read(&one).unwrap(), "{form}: the files differ");
        // The trace taken on the way equals the one of the whole result (written to a device,
        // which takes the whole result in order).
        let whole = compute(form, Some("1"), std::path::Path::new("/dev/null"));
        assert!(whole.status.success(), "{form}: {}", String::from_utf8_lossy(&whole.stderr));
        let (t_stream, t_whole) = (trace_of(&b), trace_of(&whole));
        assert!((t_stream - t_whole).abs() <= 1e-12 * t_whole.abs(), "{form}: trace {t_stream} vs {t_whole}");
        let t_one = trace_of(&a);
        assert!((t_one - t_stream).abs() <= 1e-12 * t_one.abs(), "{form}: trace {t_one} in one pass, {t_stream} in several");
    }
    // No temporary file is left beside the outputs.
    let left: Vec<String> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(left.iter().all(|n| n.ends_with(".safetensors") && !n.starts_with('.')), "{left:?}");
}

/// A sink that keeps one P×P tensor and counts the values put (no `buffers`: the bands
/// arrive as runs, as they do in a file).
struct Runs {
    values: Vec<f32>,
    put: usize,
}

impl fisher_engine::fisher::ResultSink for Runs {
    fn put(&mut self, tensor: usize, at: usize, values: &[f32]) -> fisher_engine::Result<()> {
        assert_eq!(tensor, 0);
        self.values[at..at + values.len()].copy_from_slice(values);
        self.put += values.len();
        Ok(())
    }
}

#[test]
fn a_full_reduction_put_band_by_band_equals_finish_and_misuse_is_an_error() {
    use fisher_engine::{FisherBackend, FisherMatrix, Form};
    let g = fisher_engine::synthetic::gradient_like(300, 600, 4);
    let backend = CpuBackend::new().with_accumulator_bytes(1);
    let FisherMatrix::Full(want) = Engine::cpu().fisher_from_grads(g.view(), &Form::Full).unwrap() else { unreachable!() };
    let mut acc = backend.accumulator(&Form::Full, 600).unwrap();
    assert_eq!(acc.passes(), 3);
    let mut sink = Runs { values: vec![f32::NAN; 600 * 600], put: 0 };
    for pass in 0..3 {
        if pass > 0 {
            acc.next_pass_into(&mut sink).unwrap();
        }
        acc.push(g.view()).unwrap();
    }
    acc.finish_into(&mut sink).unwrap();
    assert_eq!(sink.put, 600 * 600, "every value put once");
    let got: Vec<u32> = sink.values.iter().map(|v| v.to_bits()).collect();
    assert!(got == want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "the bands differ from one pass");
    // finish after next_pass_into, and the two kinds of next_pass mixed: errors.
    let mut acc = backend.accumulator(&Form::Full, 600).unwrap();
    acc.push(g.view()).unwrap();
    acc.next_pass_into(&mut sink).unwrap();
    acc.push(g.view()).unwrap();
    assert!(acc.next_pass().unwrap_err().to_string().contains("mixed"));
    let err = acc.finish().unwrap_err().to_string();
    assert!(err.contains("finish_into"), "{err}");
    // A single-pass form into a sink: the whole result.
    let whole = CpuBackend::new();
    let mut acc = whole.accumulator(&Form::Full, 600).unwrap();
    acc.push(g.view()).unwrap();
    let mut sink = Runs { values: vec![f32::NAN; 600 * 600], put: 0 };
    acc.finish_into(&mut sink).unwrap();
    assert_eq!(sink.put, 600 * 600);
}
