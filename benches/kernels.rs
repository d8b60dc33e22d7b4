//! Criterion benches: every reduction stage on the GPU and on the CPU, on the same seeded
//! inputs, reporting FLOP throughput (`Throughput::Elements(flops)`).
//!
//! Groups are named `<stage>/<backend>`; shapes come from the tables below. Run with
//! `cargo bench --bench kernels`; `cargo test` runs every bench once at the smoke size
//! (criterion's test mode: no `--bench` argument), so CI checks that they still run.
//! FLOP counts are GEMM-equivalent (2·N·P² for F even though only the upper triangle is
//! computed) so that numbers compare directly with `numpy G.T @ G` (benches/numpy_baseline.py).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fisher_engine::model::{Activation, Dataset, Linear, Mlp, Targets};
use fisher_engine::fisher::{NetForm, Variant};
use fisher_engine::synthetic::{gradient_like, normal_matrix, SplitMix64};
use fisher_engine::{Backend, Engine, Form};

/// `cargo bench` passes `--bench`; `cargo test` does not.
fn smoke() -> bool {
    !std::env::args().any(|a| a == "--bench") || std::env::var("FISHER_BENCH").is_ok_and(|v| v == "smoke")
}

fn engines() -> Vec<(&'static str, Engine)> {
    let mut out = Vec::new();
    match Engine::new(Backend::Gpu) {
        Ok(e) => {
            eprintln!("gpu: {}", e.device_info());
            out.push(("gpu", e));
        }
        Err(e) => eprintln!("SKIPPED gpu benches: {e}"),
    }
    let cpu = Engine::new(Backend::Cpu).expect("cpu engine");
    eprintln!("cpu: {}", cpu.device_info());
    out.push(("cpu", cpu));
    out
}

fn reductions(c: &mut Criterion) {
    let shapes: &[(usize, usize)] = if smoke() { &[(256, 64)] } else { &[(4096, 512), (4096, 2048)] };
    let engines = engines();
    let stages: [(&str, Form, fn(usize, usize) -> f64); 4] = [
        ("full", Form::Full, |n, p| 2.0 * n as f64 * (p * p) as f64),
        ("diag", Form::Diagonal, |n, p| 2.0 * (n * p) as f64),
        ("norms", Form::SampleNorms, |n, p| 2.0 * (n * p) as f64),
        ("gram", Form::Gram, |n, p| 2.0 * (n * n) as f64 * p as f64),
    ];
    for (stage, form, flops) in stages {
        for (name, engine) in &engines {
            let mut group = c.benchmark_group(format!("{stage}/{name}"));
            group.sample_size(10);
            for &(n, p) in shapes {
                let g = gradient_like(n, p, 1);
                group.throughput(Throughput::Elements(flops(n, p) as u64));
                group.bench_with_input(BenchmarkId::from_parameter(format!("{n}x{p}")), &g, |b, g| {
                    // fisher_from_grads returns host arrays: the device is waited for.
                    b.iter(|| engine.fisher_from_grads(g.view(), &form).expect("reduction"))
                });
            }
            group.finish();
        }
    }
}

/// A seeded ReLU MLP with the given widths and a categorical dataset for it.
fn mlp_problem(widths: &[usize], n: usize) -> (Mlp, Dataset) {
    let mut rng = SplitMix64::new(42);
    let layers = widths
        .windows(2)
        .enumerate()
        .map(|(l, w)| {
            let scale = (2.0 / w[0] as f64).sqrt();
            Linear {
                index: 2 * l,
                weight: ndarray::Array2::from_shape_simple_fn((w[1], w[0]), || (rng.normal() * scale) as f32),
                bias: Some(ndarray::Array1::from_shape_simple_fn(w[1], || (rng.normal() * 0.01) as f32)),
            }
        })
        .collect::<Vec<_>>();
    let activations = vec![Activation::Relu; layers.len() - 1];
    let classes = *widths.last().expect("widths");
    let inputs = normal_matrix(n, widths[0], 7);
    let labels = (0..n).map(|_| rng.below(classes as u64) as u32).collect();
    (Mlp { layers, activations }, Dataset { inputs, targets: Targets::Classes(labels) })
}

fn networks(c: &mut Criterion) {
    let (widths, n): (&[usize], usize) = if smoke() { (&[32, 16, 4], 64) } else { (&[784, 512, 512, 10], 1024) };
    let (mlp, data) = mlp_problem(widths, n);
    // Flops of the work actually done: the forward pass (2·N·P), the backward GEMMs of the R
    // output rows (2·N·R·out·in per layer but the first), and the reduction: the squared GEMM
    // (2·N·out·(in+1) per layer) for diag, the factor GEMMs (2·N·(in+1)² + 2·N·R·out²) for kfac.
    let forward: f64 = mlp.layers.iter().map(|l| 2.0 * (n * l.num_params()) as f64).sum();
    let backward = |r: usize| -> f64 {
        mlp.layers.iter().skip(1).map(|l| 2.0 * (n * r * l.fan_out() * l.fan_in()) as f64).sum()
    };
    let reduction = |form: NetForm, r: usize| -> f64 {
        mlp.layers
            .iter()
            .map(|l| {
                let (a, o) = (l.augmented_in() as f64, l.fan_out() as f64);
                match form {
                    NetForm::Kfac => 2.0 * n as f64 * (a * a + r as f64 * o * o),
                    _ => 2.0 * n as f64 * o * a,
                }
            })
            .sum()
    };
    let engines = engines();
    for (stage, form, variant, rows) in [
        ("net-diag-empirical", NetForm::Diagonal, Variant::Empirical, 1),
        ("net-diag-true", NetForm::Diagonal, Variant::True, *widths.last().unwrap()),
        ("net-kfac-true", NetForm::Kfac, Variant::True, *widths.last().unwrap()),
    ] {
        for (name, engine) in &engines {
            let mut group = c.benchmark_group(format!("{stage}/{name}"));
            group.sample_size(10);
            group.throughput(Throughput::Elements((forward + backward(rows) + reduction(form, rows)) as u64));
            group.bench_function(BenchmarkId::from_parameter(format!("{widths:?}x{n}")), |b| {
                b.iter(|| engine.fisher(&mlp, &data, variant, form).expect("network fisher"))
            });
            group.finish();
        }
    }
}

criterion_group!(benches, reductions, networks);
criterion_main!(benches);
