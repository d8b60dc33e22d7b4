//! Shared test harness: GPU availability policy.
//!
//! GPU tests call [`gpu_context`] once; when no adapter exists they print
//! `SKIPPED <name>: no GPU adapter` and return early, except under `FISHER_REQUIRE_GPU=1`
//! (which CI sets), where a missing adapter fails the test.
#![allow(dead_code)]

pub mod cli;

use fisher_engine::backend::gpu::{GpuContext, GpuOptions};
use fisher_engine::{Engine, FisherError};

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
