//! Quick throughput and precision check of the CPU backend against the numpy baseline
//! (`benches/numpy_baseline.py`), same convention: 2·N·P² flops for F = GᵀG.
//!
//! ```text
//! cargo run --release --example cpu_throughput [N] [P] [repeats]
//! ```
use std::time::Instant;

use fisher_engine::backend::cpu::CpuBackend;
use fisher_engine::reference::grads as reference;
use fisher_engine::{FisherBackend, Form};

fn main() -> fisher_engine::Result<()> {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let (n, p, repeats) = (
        args.first().copied().unwrap_or(4096),
        args.get(1).copied().unwrap_or(2048),
        args.get(2).copied().unwrap_or(10),
    );
    let grads = fisher_engine::synthetic::normal_matrix(n, p, 7);
    let backend = CpuBackend::new();
    let flops = 2.0 * n as f64 * p as f64 * p as f64;
    let mut best = f64::INFINITY;
    let mut result = None;
    for _ in 0..repeats + 1 {
        let start = Instant::now();
        let mut acc = backend.accumulator(&Form::Full, p)?;
        acc.push(grads.view())?;
        result = Some(acc.finish()?);
        best = best.min(start.elapsed().as_secs_f64());
    }
    println!("{}  Full  N={n} P={p}", backend.label());
    println!("best of {repeats}: {:.1} ms  {:.1} GFLOP/s (2*N*P^2 flops)", best * 1e3, flops / best / 1e9);
    if std::env::var("VERIFY").is_ok() {
        let start = Instant::now();
        let oracle = reference::reduce(grads.view(), &Form::Full)?;
        let t = start.elapsed().as_secs_f64();
        if let Some(result) = result {
            let agreement = result.agreement(&oracle)?;
            println!("reference {:.2} s; max|dF|/max|F| = {:.3e} ({:.1} u)", t, agreement.max_rel, agreement.max_rel * 2f64.powi(24));
        }
    }
    Ok(())
}
