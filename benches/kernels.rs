//! Criterion benches: every reduction stage and the network Fisher on the GPU and on the
//! CPU, on the same seeded inputs, reporting FLOP throughput (`Throughput::Elements(flops)`).
//!
//! Groups are named `<stage>/<backend>`; shapes come from the tables below. The workloads
//! and the flop counts are the library's ([`fisher_engine::bench`]), shared with `fisher
//! bench`: reductions count GEMM-equivalent flops (2·N·P² for F even though only the upper
//! triangle is computed) so that numbers compare directly with `numpy G.T @ G`
//! (benches/numpy_baseline.py); networks count the work actually executed
//! ([`bench::network_flops_executed`]). Run with `cargo bench --bench kernels`; `cargo test`
//! runs every bench once at the smoke size (criterion's test mode: no `--bench` argument),
//! so CI checks that they still run.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fisher_engine::bench;
use fisher_engine::fisher::{rows_per_sample, NetForm, Variant};
use fisher_engine::model::Activation;
use fisher_engine::synthetic::gradient_like;
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
    for form in [Form::Full, Form::Diagonal, Form::SampleNorms, Form::Gram] {
        for (name, engine) in &engines {
            let mut group = c.benchmark_group(format!("{form}/{name}"));
            group.sample_size(10);
            for &(n, p) in shapes {
                let g = gradient_like(n, p, 1);
                group.throughput(Throughput::Elements(bench::reduce_flops(&form, n, p) as u64));
                group.bench_with_input(BenchmarkId::from_parameter(format!("{n}x{p}")), &g, |b, g| {
                    // fisher_from_grads returns host arrays: the device is waited for.
                    b.iter(|| engine.fisher_from_grads(g.view(), &form).expect("reduction"))
                });
            }
            group.finish();
        }
    }
}

fn networks(c: &mut Criterion) {
    let (widths, n): (&[usize], usize) = if smoke() { (&[32, 16, 4], 64) } else { (&[784, 512, 512, 10], 1024) };
    let (mlp, data) = bench::network_problem(widths, n, Activation::Relu, 42).expect("network problem");
    let engines = engines();
    for (stage, form, variant) in [
        ("net-diag-empirical", NetForm::Diagonal, Variant::Empirical),
        ("net-diag-true", NetForm::Diagonal, Variant::True),
        ("net-kfac-true", NetForm::Kfac, Variant::True),
    ] {
        let rows = rows_per_sample(variant, mlp.output_dim());
        for (name, engine) in &engines {
            let mut group = c.benchmark_group(format!("{stage}/{name}"));
            group.sample_size(10);
            group.throughput(Throughput::Elements(bench::network_flops_executed(&mlp, n, rows, form) as u64));
            group.bench_function(BenchmarkId::from_parameter(format!("{widths:?}x{n}")), |b| {
                b.iter(|| engine.fisher(&mlp, &data, variant, form).expect("network fisher"))
            });
            group.finish();
        }
    }
}

criterion_group!(benches, reductions, networks);
criterion_main!(benches);
