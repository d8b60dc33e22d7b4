//! `fisher bench --model`: an ONNX network's diag, kfac and F·v timed on the CPU and (under
//! the GPU harness policy) on GPU and CPU together; its JSON (one result per form and
//! backend, positive times and rates, the run's split); kfac skipped on grouped
//! convolutions; bad models, data and flag combinations (exit 2, one line).

use std::path::PathBuf;

use serde_json::Value;

use crate::common::cli::{assert_fails, fisher, json};
use crate::common::gpu_available;

fn fixture(case: &str) -> [String; 3] {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx").join(case);
    ["model.onnx", "x.npy", "y.npy"].map(|f| dir.join(f).to_str().expect("utf-8 path").to_string())
}

/// `fisher bench --model <case> --shapes none --repeat 1 --warmup 0 extra…`.
fn bench(case: &str, extra: &[&str]) -> crate::common::cli::Run {
    let [model, x, y] = fixture(case);
    let mut args = vec!["bench", "--model", &model, "--inputs", &x, "--labels", &y, "--shapes", "none", "--repeat", "1", "--warmup", "0"];
    args.extend_from_slice(extra);
    fisher(&args)
}

/// Checks the graph results of a run on `backends` with `forms`.
#[track_caller]
fn check(v: &Value, forms: &[&str], backends: &[&str]) {
    let results = v["results"].as_array().expect("results");
    assert_eq!(results.len(), forms.len() * backends.len(), "{results:#?}");
    let g = &v["graph"];
    let (n, p) = (g["samples"].as_u64().unwrap(), g["params"].as_u64().unwrap());
    assert!(n > 0 && p > 0, "{g}");
    assert_eq!(g["forms"].as_array().unwrap().iter().map(|f| f.as_str().unwrap()).collect::<Vec<_>>(), forms);
    assert!(v["network"].is_null(), "--network none is implied");
    for form in forms {
        for backend in backends {
            let r = results
                .iter()
                .find(|r| r["form"] == *form && r["backend"] == *backend)
                .unwrap_or_else(|| panic!("no {form} on {backend}: {results:#?}"));
            assert_eq!(r["kind"], "graph");
            assert_eq!(r["stage"].as_str(), Some(format!("graph {form}").as_str()));
            assert_eq!((r["samples"].as_u64(), r["params"].as_u64()), (Some(n), Some(p)));
            for field in ["best_s", "median_s", "flop", "gflops_best", "gflops_median", "samples_per_s"] {
                let x = r[field].as_f64().unwrap_or_else(|| panic!("{field} in {r}"));
                assert!(x.is_finite() && x > 0.0, "{field} = {x} in {r}");
            }
            assert!(r["workload"].as_str().unwrap().starts_with(&format!("graph/{form}/")), "{r}");
            if *form == "fvp" {
                assert_eq!(r["rows_per_sample"].as_u64(), Some(1));
                assert!(r["micro_batch"].is_null() && r["activation_bytes"].is_null(), "{r}");
            } else {
                assert_eq!(r["rows_per_sample"], g["rows_per_sample"]);
                let batch = r["micro_batch"].as_u64().expect("micro_batch");
                assert!(batch >= 1 && batch <= n, "{r}");
                assert!(r["activation_bytes"].as_u64().expect("activation_bytes") > 0, "{r}");
            }
            let speedup = &r["gpu_speedup"];
            if *backend == "gpu" && backends.contains(&"cpu") {
                assert!(speedup.as_f64().is_some_and(|s| s.is_finite() && s > 0.0), "{r}");
            } else {
                assert!(speedup.is_null(), "{r}");
            }
        }
    }
}

#[test]
fn cnn_bn_on_the_cpu() {
    let v = json(&bench("cnn_bn", &["--backend", "cpu", "--json"]));
    check(&v, &["diag", "kfac", "fvp"], &["cpu"]);
    let g = &v["graph"];
    // cnn_bn: 10 classes, true categorical Fisher: R = 10.
    assert_eq!((g["outputs"].as_u64(), g["rows_per_sample"].as_u64()), (Some(10), Some(10)));
    assert_eq!((g["variant"].as_str(), g["likelihood"].as_str()), (Some("true"), Some("categorical")));
    assert!(g["flops"].as_str().unwrap().contains("primitive program"));
    assert!(g["skipped"].as_array().unwrap().is_empty());
}

#[test]
fn gpu_and_cpu_with_a_ratio() {
    if !gpu_available("cli_bench_graph::gpu_and_cpu_with_a_ratio") {
        return;
    }
    let v = json(&bench("cnn_bn", &["--backend", "gpu,cpu", "--json"]));
    check(&v, &["diag", "kfac", "fvp"], &["gpu", "cpu"]);
    assert!(v["adapter"]["name"].is_string());
}

#[test]
fn grouped_convolutions_skip_kfac_with_a_note() {
    let v = json(&bench("convs", &["--backend", "cpu", "--variant", "empirical", "--json"]));
    check(&v, &["diag", "fvp"], &["cpu"]);
    let skipped = v["graph"]["skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert_eq!(skipped[0]["form"], "kfac");
    assert!(skipped[0]["why"].as_str().unwrap().contains("grouped convolution"), "{skipped:?}");
    // R = 1 for the empirical Fisher.
    assert_eq!(v["graph"]["rows_per_sample"].as_u64(), Some(1));

    let run = bench("convs", &["--backend", "cpu"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    for needle in ["graph diag", "graph fvp", "kfac skipped:", "samples/s", "micro-batch", "primitive program"] {
        assert!(run.stdout.contains(needle), "table lacks {needle:?}:\n{}", run.stdout);
    }
    assert!(!run.stdout.contains("graph kfac"), "{}", run.stdout);
}

#[test]
fn bad_models_data_and_flags_are_usage_errors() {
    let [model, x, y] = fixture("cnn_bn");
    let [_, other_x, _] = fixture("mlp");
    let missing = format!("{model}.missing");
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (vec!["--model", &missing, "--inputs", &x, "--labels", &y], vec!["missing"]),
        (vec!["--model", &y, "--inputs", &x, "--labels", &y], vec!["y.npy"]),
        (vec!["--model", &model, "--inputs", &other_x, "--labels", &y], vec!["rows"]),
        (vec!["--model", &model, "--inputs", &x], vec!["--labels"]),
        (vec!["--inputs", &x, "--labels", &y], vec!["--model"]),
        (vec!["--likelihood", "gaussian"], vec!["--model"]),
        (vec!["--model", &model, "--inputs", &x, "--labels", &y, "--activation", "relu"], vec!["--activation", "--model"]),
        (vec!["--model", &model, "--inputs", &x, "--labels", &y, "--network", "8,6,3"], vec!["--network", "--model"]),
        (vec!["--model", &model, "--inputs", &x, "--labels", &y, "--samples", "8"], vec!["--samples", "--model"]),
        (vec!["--model", &model, "--inputs", &x, "--labels", &y, "--net-forms", "full"], vec!["--net-forms", "--model"]),
        (vec!["--model", &model, "--inputs", &x, "--labels", &y, "--top", "5"], vec!["--top", "--model"]),
    ];
    for (extra, needles) in &cases {
        let args: Vec<&str> = ["bench", "--backend", "cpu", "--shapes", "none", "--repeat", "1", "--warmup", "0"]
            .iter()
            .chain(extra.iter())
            .copied()
            .collect();
        assert_fails(&fisher(&args), 2, needles);
    }
}
