//! `fisher train` and `fisher action` end to end: a seeded run directory, the action along
//! it from the directory and from an explicit file list, the JSON line, the table, the plots
//! (PNG and SVG), GPU against CPU, and every bad input (message, exit status, and no plot or
//! run directory left behind).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use fisher_engine::model::{Activation, Mlp};
use fisher_engine::model::train::init_mlp;

use crate::common::cli::{assert_fails, fisher, json, names_in, s, succeeds, Run, PNG_SIGNATURE};
use crate::common::gpu_available;

/// The small run every test measures.
const WIDTHS: &str = "6,12,3";
const CHECKPOINTS: usize = 21;

/// One training run shared by the tests (training is deterministic, so sharing changes no
/// result): a temporary directory holding `run/`.
fn trained() -> &'static (tempfile::TempDir, PathBuf) {
    static RUN: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    RUN.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let run_dir = dir.path().join("run");
        let checkpoints = CHECKPOINTS.to_string();
        let out = fisher(&[
            "train", "--widths", WIDTHS, "--samples", "128", "--steps", "60", "--checkpoints", &checkpoints,
            "--batch", "16", "--seed", "3", "--out-dir", s(&run_dir), "--json",
        ]);
        let v = json(&out);
        assert_eq!(v["checkpoints"], CHECKPOINTS);
        (dir, run_dir)
    })
}

/// `fisher action` on the shared run with `extra` flags.
fn action(checkpoints: &[&str], extra: &[&str]) -> Run {
    let run_dir = &trained().1;
    let (x, y) = (run_dir.join("X.npy"), run_dir.join("y.npy"));
    let mut args = vec!["action", "--checkpoints"];
    args.extend_from_slice(checkpoints);
    args.extend_from_slice(&["--activation", "tanh", "--inputs", s(&x), "--labels", s(&y)]);
    args.extend_from_slice(extra);
    fisher(&args)
}

fn checkpoint_files() -> Vec<PathBuf> {
    let run_dir = &trained().1;
    (0..CHECKPOINTS).map(|i| run_dir.join(format!("ckpt_{i:03}.safetensors"))).collect()
}

#[test]
fn train_writes_a_complete_run_directory() {
    let run_dir = &trained().1;
    let mut expected: Vec<String> = (0..CHECKPOINTS).map(|i| format!("ckpt_{i:03}.safetensors")).collect();
    expected.extend(["X.npy".into(), "run.json".into(), "y.npy".into()]);
    expected.sort();
    assert_eq!(names_in(run_dir), expected);
    // Nothing but `run/` beside it (the staging directory was renamed, not copied).
    assert_eq!(names_in(trained().0.path()), ["run"]);

    let record: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run_dir.join("run.json")).unwrap()).unwrap();
    assert_eq!(record["widths"], serde_json::json!([6, 12, 3]));
    assert_eq!(record["activations"], serde_json::json!(["tanh"]));
    assert_eq!(record["checkpoint_steps"].as_array().unwrap().len(), CHECKPOINTS);
    assert_eq!(record["checkpoint_steps"][0], 0);
    assert_eq!(record["checkpoint_steps"][CHECKPOINTS - 1], 60);
    let losses: Vec<f64> = record["losses"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert!(losses[CHECKPOINTS - 1] < losses[0], "training lowers the loss: {losses:?}");

    // Checkpoints load with PyTorch keys and have the requested architecture.
    let model = Mlp::from_safetensors(&run_dir.join("ckpt_020.safetensors"), &Activation::Tanh.into()).unwrap();
    assert_eq!((model.input_dim(), model.output_dim(), model.num_params()), (6, 3, 6 * 12 + 12 + 12 * 3 + 3));
    assert_eq!(model.layers.iter().map(|l| l.index).collect::<Vec<_>>(), [0, 2]);
}

#[test]
fn train_is_seeded_and_refuses_to_overwrite_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let small = ["--widths", "4,5,2", "--samples", "32", "--steps", "5", "--checkpoints", "3"];
    let train = |out: &Path, extra: &[&str]| {
        let mut args = vec!["train", "--out-dir", s(out)];
        args.extend_from_slice(&small);
        args.extend_from_slice(extra);
        fisher(&args)
    };
    let first = json(&train(&a, &["--json"]));
    let second = json(&train(&b, &["--json"]));
    assert_eq!(first["losses"], second["losses"], "same seed, same run");
    for name in ["ckpt_002.safetensors", "X.npy", "y.npy"] {
        assert_eq!(std::fs::read(a.join(name)).unwrap(), std::fs::read(b.join(name)).unwrap(), "{name}");
    }
    let human = train(&dir.path().join("c"), &["--seed", "9"]);
    succeeds(&human);
    assert!(human.stdout.contains("loss") && human.stdout.contains("fisher action --checkpoints"), "{}", human.stdout);

    // An existing, non-empty directory is refused and left as it was.
    let before = std::fs::read(a.join("ckpt_001.safetensors")).unwrap();
    let refused = train(&a, &["--seed", "5"]);
    assert_fails(&refused, 2, &["exists and is not empty", "--force"]);
    assert_eq!(std::fs::read(a.join("ckpt_001.safetensors")).unwrap(), before);
    // --force replaces it, and leaves nothing else behind.
    std::fs::write(a.join("stale.txt"), "old").unwrap();
    let replaced = json(&train(&a, &["--seed", "5", "--force", "--json"]));
    assert_eq!(replaced["replaced"], true);
    assert!(!a.join("stale.txt").exists());
    assert_ne!(std::fs::read(a.join("ckpt_001.safetensors")).unwrap(), before);
    assert_eq!(names_in(dir.path()), ["a", "b", "c"]);

    // Bad flags and locations: exit 2, and no directory appears.
    assert_fails(&train(&dir.path().join("missing/run"), &[]), 2, &["does not exist"]);
    assert_fails(&train(&dir.path().join("d"), &["--checkpoints", "7"]), 2, &["--checkpoints"]);
    let d = dir.path().join("d");
    assert_fails(&fisher(&["train", "--out-dir", s(&d), "--widths", "4,1"]), 2, &["classes"]);
    assert_fails(&train(&dir.path().join("d"), &["--momentum", "1"]), 2, &["--momentum"]);
    assert_fails(&train(&dir.path().join("d"), &["--activation", "swish"]), 2, &["swish"]);
    std::fs::write(dir.path().join("file"), "x").unwrap();
    assert_fails(&train(&dir.path().join("file"), &[]), 2, &["not a directory"]);
    assert_eq!(names_in(dir.path()), ["a", "b", "c", "file"]);
}

#[test]
fn action_from_a_run_directory_with_plots() {
    let out = tempfile::tempdir().unwrap();
    let (png, svg) = (out.path().join("a.png"), out.path().join("a.svg"));
    let run_dir = trained().1.to_str().unwrap();
    let v = json(&action(&[run_dir], &["--backend", "cpu", "--json", "--plot", s(&png)]));
    for key in [
        "checkpoints", "parameters", "samples", "variant", "backend", "action", "length", "chord", "segments",
        "efficiency", "euclidean_length", "euclidean_chord", "steps", "seconds",
    ] {
        assert!(v.get(key).is_some(), "JSON lacks '{key}': {v}");
    }
    assert_eq!(v["checkpoints"], CHECKPOINTS);
    assert_eq!(v["steps"].as_array().unwrap().len(), CHECKPOINTS - 1);
    assert_eq!(v["parameters"], 6 * 12 + 12 + 12 * 3 + 3);
    assert_eq!(v["samples"], 128);
    assert_eq!(v["variant"], "true");
    assert_eq!(v["segments"], 8);
    assert!(v["backend"].as_str().unwrap().starts_with("cpu"), "{v}");
    let f = |key: &str| v[key].as_f64().unwrap_or_else(|| panic!("{key} is not a number: {v}"));
    assert!(f("action") > 0.0 && f("length") > 0.0 && f("chord") > 0.0, "{v}");
    let efficiency = f("efficiency");
    assert!(efficiency.is_finite() && efficiency >= 0.9, "efficiency {efficiency}");
    assert!((efficiency - f("length") / f("chord")).abs() <= 1e-12 * efficiency);
    // The steps add up to the totals.
    let steps = v["steps"].as_array().unwrap();
    let sum = |key: &str| steps.iter().map(|s| s[key].as_f64().unwrap()).sum::<f64>();
    assert!((sum("action") - f("action")).abs() <= 1e-9 * f("action"));
    assert!((sum("length") - f("length")).abs() <= 1e-9 * f("length"));
    assert!((sum("euclidean") - f("euclidean_length")).abs() <= 1e-9 * f("euclidean_length"));
    assert_eq!(steps.last().unwrap()["cumulative_length"].as_f64().unwrap(), f("length"));

    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.starts_with(PNG_SIGNATURE), "not a PNG");
    assert!(bytes.len() > 20_000, "a {}-byte PNG is suspiciously small", bytes.len());

    let again = json(&action(&[run_dir], &["--backend", "cpu", "--json", "--plot", s(&svg)]));
    assert_eq!(again["action"], v["action"], "deterministic");
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg") && text.contains("cumulative Fisher–Rao length"), "{}", &text[..200]);
    assert_eq!(names_in(out.path()), ["a.png", "a.svg"]);
}

#[test]
fn an_explicit_file_list_equals_the_directory() {
    let run_dir = trained().1.to_str().unwrap();
    let from_dir = json(&action(&[run_dir], &["--backend", "cpu", "--json", "--segments", "3"]));
    let files = checkpoint_files();
    let names: Vec<&str> = files.iter().map(|p| s(p)).collect();
    let from_files = json(&action(&names, &["--backend", "cpu", "--json", "--segments", "3"]));
    for key in ["action", "length", "chord", "efficiency", "euclidean_length", "euclidean_chord", "steps"] {
        assert_eq!(from_dir[key], from_files[key], "{key}");
    }
    assert_eq!(from_dir["checkpoint_files"], from_files["checkpoint_files"]);
    assert_eq!(from_dir["segments"], 3);
    // A sub-path: the first five checkpoints are a shorter path with the same first steps.
    let prefix = json(&action(&names[..5], &["--backend", "cpu", "--json"]));
    assert_eq!(prefix["checkpoints"], 5);
    assert_eq!(prefix["steps"][3], from_dir["steps"][3]);
}

#[test]
fn human_report_has_the_table_and_the_totals() {
    let run_dir = trained().1.to_str().unwrap();
    let out = action(&[run_dir], &["--backend", "cpu", "--variant", "mc", "--mc-samples", "2", "--seed", "4"]);
    succeeds(&out);
    let text = &out.stdout;
    assert!(text.contains(&format!("{CHECKPOINTS} checkpoints ({} steps)", CHECKPOINTS - 1)), "{text}");
    for needle in ["S  action", "L  Fisher–Rao length", "chord", "efficiency", "Euclidean", "cumulative L", "Monte Carlo"] {
        assert!(text.contains(needle), "the report lacks {needle:?}:\n{text}");
    }
    // One table row per step.
    let rows = text.lines().filter(|l| l.split_whitespace().count() == 5 && l.trim_start().starts_with(char::is_numeric));
    assert_eq!(rows.count(), CHECKPOINTS - 1, "{text}");
    // --quiet prints nothing; stderr stays free of progress bars off a terminal.
    let quiet = action(&[run_dir], &["--backend", "cpu", "--quiet"]);
    succeeds(&quiet);
    assert!(quiet.stdout.is_empty());
    assert!(!quiet.stderr.contains('\u{1b}') && !out.stderr.contains('\u{1b}'), "control codes on a redirected stderr");
}

#[test]
fn bad_inputs_fail_cleanly_and_write_no_plot() {
    let dir = tempfile::tempdir().unwrap();
    let plot = dir.path().join("a.png");
    let files = checkpoint_files();
    let plot_flag = ["--backend", "cpu", "--plot", s(&plot)];

    // One checkpoint (a file, or a directory holding one).
    assert_fails(&action(&[s(&files[0])], &plot_flag), 2, &["at least 2 checkpoints"]);
    let lonely = dir.path().join("lonely");
    std::fs::create_dir(&lonely).unwrap();
    std::fs::copy(&files[0], lonely.join("ckpt_000.safetensors")).unwrap();
    assert_fails(&action(&[s(&lonely)], &plot_flag), 2, &["at least 2 checkpoints", "holds 1"]);

    // A checkpoint of another architecture, named in the message.
    let other = dir.path().join("other.safetensors");
    init_mlp(&[6, 10, 3], Activation::Tanh, true, 1).unwrap().to_safetensors(&other).unwrap();
    assert_fails(&action(&[s(&files[0]), s(&files[1]), s(&other)], &plot_flag), 2, &["other.safetensors", "6-10-3", "6-12-3"]);
    // Missing files, and a directory among files.
    let missing = dir.path().join("nope.safetensors");
    assert_fails(&action(&[s(&files[0]), s(&missing)], &plot_flag), 2, &["nope.safetensors"]);
    assert_fails(&action(&[s(&files[0]), s(&lonely)], &plot_flag), 2, &["is a directory"]);
    // Data that do not fit (labels of another length).
    {
        let run_dir = &trained().1;
        let x = run_dir.join("X.npy");
        let y_short = dir.path().join("y_short.npy");
        fisher_engine::io::write_npy_labels(&y_short, &[0, 1, 2]).unwrap();
        let out = fisher(&[
            "action", "--checkpoints", s(run_dir), "--activation", "tanh", "--inputs", s(&x), "--labels", s(&y_short),
            "--backend", "cpu", "--plot", s(&plot),
        ]);
        assert_fails(&out, 2, &["y_short.npy"]);
    }
    // Flags.
    assert_fails(&action(&[s(&files[0]), s(&files[1])], &["--segments", "0"]), 2, &["--segments"]);
    assert_fails(&action(&[s(&files[0]), s(&files[1])], &["--mc-samples", "3"]), 2, &["--variant mc"]);
    assert_fails(&action(&[s(&files[0]), s(&files[1])], &["--backend", "cpu", "--adapter", "x"]), 2, &["--adapter"]);

    // Plot paths: a bad extension and a missing directory, refused before computing.
    let jpg = dir.path().join("a.jpg");
    assert_fails(&action(&[s(&files[0]), s(&files[1])], &["--backend", "cpu", "--plot", s(&jpg)]), 2, &["--plot", ".png or .svg"]);
    let nowhere = dir.path().join("missing/a.png");
    assert_fails(
        &action(&[s(&files[0]), s(&files[1])], &["--backend", "cpu", "--plot", s(&nowhere)]),
        2,
        &["--plot", "does not exist"],
    );
    assert_eq!(names_in(dir.path()), ["lonely", "other.safetensors", "y_short.npy"], "no plot or temporary file left");
}

#[test]
fn gpu_agrees_with_cpu() {
    if !gpu_available("cli_action::gpu_agrees_with_cpu") {
        return;
    }
    let run_dir = trained().1.to_str().unwrap();
    let cpu = json(&action(&[run_dir], &["--backend", "cpu", "--json"]));
    let gpu = json(&action(&[run_dir], &["--backend", "gpu", "--json"]));
    assert!(gpu["backend"].as_str().unwrap().starts_with("gpu"), "{gpu}");
    for key in ["action", "length", "chord"] {
        let (c, g) = (cpu[key].as_f64().unwrap(), gpu[key].as_f64().unwrap());
        assert!((c - g).abs() <= 1e-4 * c.abs(), "{key}: cpu {c} vs gpu {g}");
    }
    assert_eq!(cpu["euclidean_length"], gpu["euclidean_length"], "Δθ does not depend on the backend");
}
