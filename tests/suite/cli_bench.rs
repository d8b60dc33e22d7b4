//! `fisher bench` end to end: a tiny run on the CPU and (under the GPU harness policy) on
//! GPU and CPU together, its JSON (one result per stage, shape and backend; positive times
//! and rates; the GPU speedup on GPU rows), the table, and bad flags (exit 2, one clear line).

use std::collections::HashSet;

use serde_json::Value;

use crate::common::cli::{assert_fails, fisher, json, Run};
use crate::common::gpu_context;

/// The tiny run, on the backends given.
const TINY: &[&str] =
    &["bench", "--shapes", "64x32", "--forms", "full,diag", "--network", "8,6,3", "--samples", "32", "--repeat", "1", "--warmup", "0"];

fn tiny(extra: &[&str]) -> Run {
    let args: Vec<&str> = TINY.iter().chain(extra).copied().collect();
    fisher(&args)
}

/// Checks the results of the tiny run on `backends`.
#[track_caller]
fn check_results(v: &Value, backends: &[&str]) {
    let results = v["results"].as_array().expect("results array");
    // 2 reductions of one shape + 2 network forms (diag, kfac by default), per backend.
    let stages = [("reduce", "full", "64x32"), ("reduce", "diag", "64x32"), ("network", "diag", "8-6-3"), ("network", "kfac", "8-6-3")];
    assert_eq!(results.len(), stages.len() * backends.len(), "{results:#?}");
    let mut seen = HashSet::new();
    for r in results {
        let key = (
            r["kind"].as_str().unwrap().to_string(),
            r["form"].as_str().unwrap().to_string(),
            r["shape"].as_str().unwrap().to_string(),
            r["backend"].as_str().unwrap().to_string(),
        );
        assert_eq!(r["stage"].as_str().unwrap(), format!("{} {}", key.0, key.1));
        assert!(seen.insert(key.clone()), "duplicate result {key:?}");
        assert_eq!(r["times_s"].as_array().unwrap().len(), 1, "--repeat 1");
        for field in ["best_s", "median_s", "flop", "gflops_best", "gflops_median"] {
            let x = r[field].as_f64().unwrap_or_else(|| panic!("{field} in {r}"));
            assert!(x.is_finite() && x > 0.0, "{field} = {x} in {r}");
        }
        assert!(r["best_s"].as_f64() <= r["median_s"].as_f64());
        match key.0.as_str() {
            "reduce" => {
                assert_eq!((r["samples"].as_u64(), r["params"].as_u64()), (Some(64), Some(32)));
                assert!(r["rows_per_sample"].is_null());
            }
            _ => {
                // 8-6-3 with biases: 9·6 + 7·3 = 75 parameters; true categorical: R = 3.
                assert_eq!((r["samples"].as_u64(), r["params"].as_u64()), (Some(32), Some(75)));
                assert_eq!(r["rows_per_sample"].as_u64(), Some(3));
            }
        }
        let speedup = &r["gpu_speedup"];
        if key.3 == "gpu" && backends.contains(&"cpu") {
            let s = speedup.as_f64().expect("gpu_speedup on GPU rows");
            assert!(s.is_finite() && s > 0.0);
        } else {
            assert!(speedup.is_null(), "{r}");
        }
    }
    for (kind, form, shape) in stages {
        for backend in backends {
            let key = (kind.to_string(), form.to_string(), shape.to_string(), backend.to_string());
            assert!(seen.contains(&key), "missing {key:?}");
        }
    }
    assert!(v["machine"]["cores"].as_u64().unwrap() >= 1);
    assert!(v["machine"]["cpu_threads"].as_u64().unwrap() >= 1);
    assert_eq!(v["repeat"].as_u64(), Some(1));
    assert_eq!(v["warmup"].as_u64(), Some(0));
    assert_eq!(v["network"]["variant"].as_str(), Some("true"));
    assert!(v["flops"].as_str().unwrap().contains("2·N·P²"));
    if cfg!(target_os = "linux") {
        assert!(v["peak_rss_bytes"].as_u64().unwrap() > 0);
    }
}

#[test]
fn tiny_run_on_the_cpu() {
    let v = json(&tiny(&["--backend", "cpu", "--json"]));
    check_results(&v, &["cpu"]);
    assert!(v["adapter"].is_null());
    assert_eq!(v["setup_s"].as_object().unwrap().keys().collect::<Vec<_>>(), ["cpu"]);
}

#[test]
fn tiny_run_on_gpu_and_cpu() {
    let Some(ctx) = gpu_context("cli_bench::tiny_run_on_gpu_and_cpu") else { return };
    let name = ctx.info.name.clone();
    drop(ctx);
    let v = json(&tiny(&["--backend", "gpu,cpu", "--json"]));
    check_results(&v, &["gpu", "cpu"]);
    assert_eq!(v["adapter"]["name"].as_str(), Some(name.as_str()));
    assert!(v["gpu_note"].is_null());
}

#[test]
fn table_and_quiet() {
    let run = tiny(&["--backend", "cpu", "--variant", "mc", "--mc-samples", "2", "--net-forms", "norms"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let out = &run.stdout;
    for needle in ["machine:", "stage", "GFLOP/s", "reduce full", "network norms", "8-6-3", "mc, K=2", "GPU speedup", "2·N·P²"] {
        assert!(out.contains(needle), "table lacks {needle:?}:\n{out}");
    }
    if cfg!(target_os = "linux") {
        assert!(out.contains("peak memory:"), "{out}");
    }
    // Aligned: every table row is as long as its header (cells are padded, trailing blanks trimmed).
    let header = out.lines().find(|l| l.starts_with("stage")).unwrap();
    let rows: Vec<&str> = out.lines().filter(|l| l.starts_with("reduce ") || l.starts_with("network ")).collect();
    assert_eq!(rows.len(), 3, "{out}");
    let column = header.find("backend").unwrap();
    for row in rows {
        assert_eq!(&row[column..column + 3], "cpu", "backend column misaligned:\n{out}");
    }

    let quiet = tiny(&["--backend", "cpu", "--quiet"]);
    assert_eq!(quiet.code, 0, "{}", quiet.stderr);
    assert!(quiet.stdout.is_empty(), "{}", quiet.stdout);
}

/// `--top K`: the top-K eigenvalues workload, named `network/topK/<variant>/<widths>x<N>`,
/// timed once per backend after the forms (P = 45 here, N·R = 96 > P: the implicit side).
#[test]
fn top_eigenvalues_workload() {
    let v = json(&tiny(&["--backend", "cpu", "--net-forms", "diag", "--top", "3", "--top-tol", "1e-6", "--json"]));
    let results = v["results"].as_array().expect("results array");
    let top: Vec<&Value> = results.iter().filter(|r| r["form"] == "top3").collect();
    assert_eq!(top.len(), 1, "{results:#?}");
    assert_eq!(top[0]["workload"], "network/top3/true/8-6-3x32");
    assert!(top[0]["best_s"].as_f64().unwrap() > 0.0 && top[0]["flop"].as_f64().unwrap() > 0.0, "{:#?}", top[0]);
    // With fewer gradient rows than parameters the Gram side runs (N·R = 4·3 = 12 < 45).
    let small = json(&fisher(&["bench", "--shapes", "none", "--network", "8,6,3", "--samples", "4", "--net-forms", "diag", "--top", "2", "--backend", "cpu", "--repeat", "1", "--warmup", "0", "--json"]));
    assert!(small["results"].as_array().unwrap().iter().any(|r| r["workload"] == "network/top2/true/8-6-3x4"), "{small}");
}

#[test]
fn bad_flags_are_usage_errors() {
    let cases: &[(&[&str], &[&str])] = &[
        (&["--forms", "full,bogus"], &["bogus", "--forms", "full, diag, gram, norms"]),
        (&["--net-forms", "eigen"], &["eigen", "--net-forms"]),
        (&["--shapes", "64y32"], &["--shapes", "64y32", "NxP"]),
        (&["--shapes", "0x32"], &["--shapes", "0x32"]),
        (&["--shapes", "64x32,"], &["--shapes"]),
        (&["--repeat", "0"], &["--repeat", "at least 1"]),
        (&["--network", "8"], &["--network", "widths"]),
        (&["--network", "8,6,1"], &["--network", "classes"]),
        (&["--shapes", "none", "--network", "none"], &["nothing to measure"]),
        (&["--backend", "tpu"], &["tpu", "--backend"]),
        (&["--backend", "cpu", "--adapter", "x"], &["--adapter", "--backend cpu"]),
        (&["--mc-samples", "2"], &["--mc-samples", "--variant mc"]),
        (&["--activation", "swish"], &["--activation", "swish"]),
        (&["--shapes", "100000x20000", "--forms", "gram"], &["gram", "--max-result-gib"]),
        (&["--shapes", "100000x30000", "--forms", "diag"], &["--shapes", "values in memory"]),
        (&["--network", "784,100000,10", "--net-forms", "full"], &["full", "--max-result-gib"]),
        (&["--top", "0"], &["--top", "at least 1"]),
        (&["--network", "4,3,2", "--top", "24"], &["--top 24", "parameters"]),
        (&["--top", "3", "--top-tol", "1.5"], &["--top-tol", "(0, 1)"]),
        (&["--top", "3", "--top-tol", "nan"], &["--top-tol"]),
        (&["--top-tol", "1e-3"], &["--top"]),
        (&["--top", "-1"], &["-1"]),
    ];
    for (extra, needles) in cases {
        let args: Vec<&str> = ["bench"].iter().chain(extra.iter()).copied().collect();
        assert_fails(&fisher(&args), 2, needles);
    }
}

#[test]
fn named_gpu_without_adapter_is_exit_3() {
    // Only meaningful where the name matches nothing: a made-up adapter name.
    let run = fisher(&["bench", "--backend", "gpu", "--adapter", "no-such-adapter-xyz", "--shapes", "8x4", "--network", "none"]);
    assert_eq!(run.code, 3, "{}", run.stderr);
}
