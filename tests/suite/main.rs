//! The integration tests, in one binary (one link of wgpu instead of one per file).
//!
//! Library tests (the f64 references, the CPU and network paths, the analysis) and CLI tests
//! (which run the `fisher` binary through `common::cli`) are modules of this crate; the
//! shared harness — GPU policy, the per-backend test macro, the assertions, seeded problems —
//! lives in `tests/common`.

#[path = "../common/mod.rs"]
mod common;

mod action;
mod analysis;
mod cli;
mod cli_action;
mod cli_bench;
mod cli_bench_graph;
mod cli_compute;
mod cli_demo;
mod cli_graph;
mod cli_inspect;
mod cli_outputs;
mod cli_report;
mod cpu;
mod data_stream;
mod examples;
mod fuzz;
mod fvp;
mod gpu;
mod graph_fixtures;
mod invariants;
mod network;
mod nn_load;
mod nn_reference;
mod shaders;
mod panels;
mod shards;
mod mpi;
mod streaming;
mod streamed;
