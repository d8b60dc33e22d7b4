//! The Fisher information of per-sample gradients you already have, checked against the f64
//! reference.
//!
//! ```text
//! cargo run --release --example fisher_of_gradients [G.npy]
//! ```
//!
//! `G.npy` is an N×P float32 or float64 array in C order, row i = gᵢ = ∇θ log p(yᵢ|xᵢ) (what
//! `torch.func.vmap(torch.func.grad(...))` gives, flattened per sample and saved with
//! `numpy.save`). Without an argument the example generates a seeded, gradient-like G of
//! 512 samples × 96 parameters, so it runs as is.
//!
//! It computes F = GᵀG / N (full) and its diagonal on the best available backend (a hardware
//! GPU when there is one, else the multi-threaded CPU path), then recomputes both with the
//! independent f64 reference and judges the difference with the crate's own contract (the
//! rounding error that f32 sums of N terms can explain). It exits non-zero when a check fails.

use std::error::Error;
use std::path::PathBuf;

use fisher_engine::verify::{Contract, Verdict};
use fisher_engine::{reference, Backend, Engine, FisherMatrix, Form};

fn main() -> Result<(), Box<dyn Error>> {
    // 1. The per-sample gradients: from the file given, or generated (seeded, so every run
    //    prints the same numbers).
    let grads = match std::env::args_os().nth(1).map(PathBuf::from) {
        Some(path) => {
            // Errors name the file and the problem (dtype, rank, Fortran order, NaN/Inf).
            let g = fisher_engine::io::read_npy_matrix(&path)?;
            println!("gradients: {} ({} samples × {} parameters)", path.display(), g.nrows(), g.ncols());
            g
        }
        None => {
            let g = fisher_engine::synthetic::gradient_like(512, 96, 7);
            println!("gradients: generated ({} samples × {} parameters, seed 7)", g.nrows(), g.ncols());
            g
        }
    };
    let (n, p) = grads.dim();

    // 2. An engine: Auto takes a hardware GPU adapter when one exists, else the CPU path
    //    (a software adapter such as lavapipe is slower than the CPU, so Auto skips it).
    let engine = Engine::new(Backend::Auto)?;
    println!("backend: {}", engine.device_info());

    // 3. The full Fisher F = GᵀG / N (P×P, exactly symmetric) and its diagonal (P).
    let FisherMatrix::Full(full) = engine.fisher_from_grads(grads.view(), &Form::Full)? else {
        return Err("the full form returns a full matrix".into());
    };
    let FisherMatrix::Diagonal(diag) = engine.fisher_from_grads(grads.view(), &Form::Diagonal)? else {
        return Err("the diagonal form returns a vector".into());
    };
    let trace: f64 = diag.iter().map(|&v| f64::from(v)).sum();
    println!("full: {}×{}, tr F = {trace:.6e}", full.nrows(), full.ncols());

    // 4. The same forms with the f64 reference (simple, slow, independent), judged by the
    //    contract of a reduction of N terms: max|Δ| within what f32 rounding explains.
    let mut failed = false;
    for (form, result) in [(Form::Full, FisherMatrix::Full(full)), (Form::Diagonal, FisherMatrix::Diagonal(diag))] {
        let oracle = reference::grads::reduce(grads.view(), &form)?;
        let verdict = Verdict::judge(result.agreement(&oracle)?, Contract::reduction(&form, n, p));
        println!(
            "{:<5} max|Δ|/max|ref| = {:.2e} (bound {:.1e}): {}",
            result.name(),
            verdict.agreement.max_rel,
            verdict.bound,
            if verdict.passed { "PASS" } else { "FAIL" }
        );
        failed |= !verdict.passed;
    }
    if failed {
        return Err("a result is outside its tolerance against the f64 reference".into());
    }
    Ok(())
}
