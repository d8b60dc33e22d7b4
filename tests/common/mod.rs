//! Shared test harness, one definition of each helper for every integration test:
//!
//! * the GPU availability policy ([`gpu_context`], [`gpu_engine`]): without an adapter a GPU
//!   test prints `SKIPPED <name>: no GPU adapter` and returns, except under
//!   `FISHER_REQUIRE_GPU=1` (which CI sets), where a missing adapter fails the test;
//! * [`backend_test!`], which writes one test body once and runs it on every backend;
//! * [`verify`]: the assertions results are judged with (one tolerance helper, symmetry,
//!   PSD, trace identities) and the Jacobi eigensolver they use;
//! * [`problems`]: seeded models, data and gradient reductions;
//! * [`cli`]: running the `fisher` binary and reading what it wrote.
#![allow(dead_code, unused_imports, unused_macros)]

pub mod cli;
pub mod problems;
pub mod verify;

use fisher_engine::backend::gpu::{GpuContext, GpuOptions};
use fisher_engine::{Backend, Engine, FisherError};

/// True when the environment demands a GPU adapter.
pub fn gpu_required() -> bool {
    std::env::var("FISHER_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

/// A fresh GPU context with `options`, or `None` (after printing SKIPPED) when no adapter exists.
#[track_caller]
pub fn gpu_context_with(test: &str, options: &GpuOptions) -> Option<GpuContext> {
    match GpuContext::new(options) {
        Ok(ctx) => Some(ctx),
        Err(FisherError::NoAdapter(why)) if !gpu_required() => {
            println!("SKIPPED {test}: no GPU adapter ({why})");
            None
        }
        Err(e) => panic!("{test}: GPU required (FISHER_REQUIRE_GPU=1) but unavailable: {e}"),
    }
}

/// A fresh GPU context with default options, or `None` after printing SKIPPED.
#[track_caller]
pub fn gpu_context(test: &str) -> Option<GpuContext> {
    gpu_context_with(test, &GpuOptions::default())
}

/// A GPU engine with `options`, or `None` after printing SKIPPED.
#[track_caller]
pub fn gpu_engine_with(test: &str, options: &GpuOptions) -> Option<Engine> {
    let ctx = gpu_context_with(test, options)?;
    Some(Engine::from_context(ctx, options).expect("GPU backend creation"))
}

/// A GPU engine with default options, or `None` after printing SKIPPED.
#[track_caller]
pub fn gpu_engine(test: &str) -> Option<Engine> {
    gpu_engine_with(test, &GpuOptions::default())
}

/// True when a GPU adapter exists (for CLI tests, which run `fisher --backend gpu` in a child
/// process); prints SKIPPED and returns false otherwise, or fails under FISHER_REQUIRE_GPU=1.
#[track_caller]
pub fn gpu_available(test: &str) -> bool {
    gpu_context(test).is_some()
}

/// The CPU engine.
pub fn cpu_engine() -> Engine {
    Engine::new(Backend::Cpu).expect("cpu engine")
}

/// One test body, run on every backend: the CPU always, the GPU under the policy above.
///
/// ```ignore
/// backend_test!(fvp_matches_dense_reference, |engine| {
///     let fv = engine.fisher_vector_product(…)?;
///     …
/// });
/// ```
///
/// makes `mod fvp_matches_dense_reference { #[test] fn cpu() … #[test] fn gpu() … }`, each
/// calling the body with its [`Engine`]. For CLI tests, `|backend: &str|` hands the body the
/// `--backend` value instead (`"cpu"` or `"gpu"`); the GPU case runs only when an adapter
/// exists. The body sees the items of the module the macro is used in.
macro_rules! backend_test {
    ($name:ident, |$engine:ident| $body:block) => {
        mod $name {
            use super::*;

            fn body($engine: fisher_engine::Engine) $body

            #[test]
            fn cpu() {
                body($crate::common::cpu_engine());
            }

            #[test]
            fn gpu() {
                if let Some(engine) = $crate::common::gpu_engine(concat!(module_path!(), "::gpu")) {
                    body(engine);
                }
            }
        }
    };
    ($name:ident, |$backend:ident: &str| $body:block) => {
        mod $name {
            use super::*;

            fn body($backend: &str) $body

            #[test]
            fn cpu() {
                body("cpu");
            }

            #[test]
            fn gpu() {
                if $crate::common::gpu_available(concat!(module_path!(), "::gpu")) {
                    body("gpu");
                }
            }
        }
    };
}
pub(crate) use backend_test;

/// Asserts |actual − expected| ≤ rel · |expected| (a scalar measure against its reference),
/// naming `what` and both values otherwise.
#[track_caller]
pub fn close(actual: f64, expected: f64, rel: f64, what: &str) {
    let err = (actual - expected).abs();
    assert!(
        err <= rel * expected.abs().max(1e-300),
        "{what}: got {actual:e}, expected {expected:e} (|diff| {err:e} > {rel:e}·|expected|)"
    );
}

/// The keys of the measures in `fisher report --json` and in `measures_exact`'s JSON.
pub const MEASURE_KEYS: [&str; 12] = [
    "parameters",
    "trace",
    "frobenius",
    "top_eigenvalues",
    "logdet",
    "damping",
    "effective_dimension",
    "abbas_effective_dimension",
    "fisher_rao_norm",
    "condition_number",
    "stable_rank",
    "inter_layer_coupling",
];
