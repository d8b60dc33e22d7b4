//! `fisher demo --quick` end to end: the report, summary.json (and that --json prints it),
//! every check passed, the files (PNG signatures, the Fisher matrix and its metadata, the run
//! directory), the printed `fisher action` command run as printed, a rerun into the same
//! directory, and the directories it must refuse. On the CPU always, on the GPU when an
//! adapter exists (tests/common: SKIPPED otherwise, a failure under FISHER_REQUIRE_GPU=1).

use std::path::Path;

use serde_json::Value;

use crate::common::cli::{fisher, names_in, s, succeeds, PNG_SIGNATURE};
use crate::common::gpu_available;

fn summary(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).expect("summary.json")).expect("valid JSON")
}

/// Checks everything a finished quick demo left in `dir` and said in `summary`.
#[track_caller]
fn check_outputs(dir: &Path, summary: &Value, gpu: bool) {
    for key in [
        "format", "passed", "checks", "device", "reduction", "training", "network_fisher", "geometry", "action", "files",
        "commands", "seconds",
    ] {
        assert!(summary.get(key).is_some(), "summary.json lacks {key}: {summary}");
    }
    assert_eq!(summary["format"], "fisher-engine demo");
    assert_eq!(summary["quick"], true);
    assert_eq!(summary["passed"], true, "{}", summary["checks"]);
    let checks = summary["checks"].as_array().unwrap();
    for check in checks {
        assert_eq!(check["passed"], true, "{check}");
        assert!(check["value"].as_f64().unwrap() <= check["tolerance"].as_f64().unwrap(), "{check}");
    }
    let names: Vec<&str> = checks.iter().map(|c| c["name"].as_str().unwrap()).collect();
    // Reduction, three network forms and Lanczos on each path; GPU-vs-CPU comparisons.
    assert_eq!(checks.len(), if gpu { 13 } else { 5 }, "{names:?}");
    assert_eq!(names.iter().any(|n| n.contains("gpu vs cpu")), gpu, "{names:?}");
    assert_eq!(summary["device"]["gpu"], gpu);

    // The numbers the report is about.
    let fisher = &summary["network_fisher"];
    let forms: Vec<&str> = fisher["forms"].as_array().unwrap().iter().map(|f| f["form"].as_str().unwrap()).collect();
    assert_eq!(forms, ["diag", "kfac", "full"]);
    assert_eq!(fisher["variant"], "true");
    let p = fisher["parameters"].as_u64().unwrap() as usize;
    let measures = &summary["geometry"]["measures"];
    for key in [
        "trace",
        "top_eigenvalues",
        "logdet",
        "effective_dimension",
        "abbas_effective_dimension",
        "fisher_rao_norm",
        "condition_number",
        "stable_rank",
        "spectral_entropy",
        "inter_layer_coupling",
        "inter_unit_coupling",
    ] {
        assert!(!measures[key].is_null(), "{key} missing: {measures}");
    }
    let implicit = &summary["geometry"]["implicit"];
    assert_eq!(implicit["lanczos"]["values"].as_array().unwrap().len(), 5);
    assert_eq!(implicit["lanczos"]["converged"], true);
    let training = &summary["training"];
    assert!(training["loss_last"].as_f64().unwrap() < training["loss_first"].as_f64().unwrap(), "{training}");
    let action = &summary["action"];
    assert_eq!(action["checkpoints"], training["checkpoints"]);
    assert!(action["efficiency"].as_f64().unwrap() >= 1.0 - 1e-9, "{action}");

    // Files.
    assert_eq!(names_in(dir), ["action.png", "fisher.safetensors", "run", "spectrum.png", "summary.json"]);
    for png in ["spectrum.png", "action.png"] {
        let bytes = std::fs::read(dir.join(png)).unwrap();
        assert!(bytes.starts_with(PNG_SIGNATURE) && bytes.len() > 10_000, "{png} is not a PNG image");
    }
    let bytes = std::fs::read(dir.join("fisher.safetensors")).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).expect("fisher.safetensors");
    let metadata = header.metadata().clone().unwrap_or_default();
    assert_eq!(metadata.get("form").map(String::as_str), Some("full"));
    assert_eq!(metadata.get("variant").map(String::as_str), Some("true"));
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(tensors.tensor("fisher").unwrap().shape(), [p, p]);
    let run = names_in(&dir.join("run"));
    let checkpoints = training["checkpoints"].as_u64().unwrap() as usize;
    assert_eq!(run.len(), checkpoints + 3, "{run:?}");
    assert!(["X.npy", "y.npy", "run.json", "ckpt_000.safetensors"].iter().all(|f| run.contains(&f.to_string())), "{run:?}");
}

/// Runs the printed `fisher action` command (with --json) and compares it with the summary.
#[track_caller]
fn printed_action_command_works(stdout: &str, summary: &Value) {
    let line = stdout.lines().map(str::trim).find(|l| l.starts_with("fisher action ")).expect("a fisher action command");
    assert!(!line.contains('\''), "temporary paths need no quoting: {line}");
    let mut words: Vec<&str> = line.split_whitespace().skip(1).collect();
    words.extend(["--backend", "cpu", "--json"]);
    let run = fisher(&words);
    succeeds(&run);
    let got: Value = serde_json::from_str(run.stdout.trim()).expect("one JSON line");
    for key in ["action", "length", "chord"] {
        let (a, b) = (got[key].as_f64().unwrap(), summary["action"][key].as_f64().unwrap());
        assert!((a - b).abs() <= 1e-4 * b.abs(), "{key}: printed command {a} vs demo {b}");
    }
    assert_eq!(summary["commands"].as_array().unwrap().iter().filter(|c| c.as_str() == Some(line)).count(), 1);
}

#[test]
fn quick_demo_on_the_cpu() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("demo");
    let run = fisher(&["demo", "--quick", "--backend", "cpu", "--out-dir", s(&dir)]);
    succeeds(&run);
    for section in ["Device", "Reduction", "Training", "Fisher", "Geometry", "Action", "Files", "Next"] {
        assert!(run.stdout.lines().any(|l| l.starts_with(section)), "no {section} section:\n{}", run.stdout);
    }
    assert!(run.stdout.contains("CPU: ") && !run.stdout.contains('✗'), "{}", run.stdout);
    assert!(run.stdout.trim_end().lines().last().unwrap().starts_with("✓ all 5 checks passed"), "{}", run.stdout);
    let summary = summary(&dir);
    check_outputs(&dir, &summary, false);
    printed_action_command_works(&run.stdout, &summary);

    // A rerun replaces the earlier demo (and only it); --quiet prints the verdict alone.
    let again = fisher(&["demo", "--quick", "--backend", "cpu", "--out-dir", s(&dir), "--quiet"]);
    succeeds(&again);
    assert_eq!(again.stdout.lines().count(), 1, "{}", again.stdout);
    assert!(again.stdout.starts_with("✓ all 5 checks passed"), "{}", again.stdout);
    check_outputs(&dir, &self::summary(&dir), false);
}

#[test]
fn quick_demo_on_the_gpu() {
    if !gpu_available("cli_demo::quick_demo_on_the_gpu") {
        return;
    }
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("demo");
    let run = fisher(&["demo", "--quick", "--backend", "gpu", "--out-dir", s(&dir), "--json"]);
    succeeds(&run);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "--json prints one line: {}", run.stdout);
    let printed: Value = serde_json::from_str(lines[0]).unwrap();
    let summary = summary(&dir);
    assert_eq!(printed, summary, "--json prints summary.json's content");
    check_outputs(&dir, &summary, true);
    assert!(summary["device"]["backend"].as_str().unwrap().starts_with("gpu"), "{}", summary["device"]);
    let commands = summary["commands"].as_array().unwrap();
    let action = commands.iter().filter_map(Value::as_str).find(|c| c.starts_with("fisher action")).unwrap();
    printed_action_command_works(&format!("  {action}\n"), &summary);
}

#[test]
fn refuses_directories_it_did_not_write() {
    let temp = tempfile::tempdir().unwrap();
    // A directory holding someone's file: refused before anything is computed or written.
    let dir = temp.path().join("mine");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("notes.txt"), "keep me").unwrap();
    let run = fisher(&["demo", "--quick", "--backend", "cpu", "--out-dir", s(&dir)]);
    assert_eq!(run.code, 2, "stderr:\n{}", run.stderr);
    assert!(run.stderr.contains("notes.txt") && run.stderr.contains("--out-dir"), "{}", run.stderr);
    assert!(run.stdout.is_empty());
    assert_eq!(names_in(&dir), ["notes.txt"]);
    assert_eq!(std::fs::read_to_string(dir.join("notes.txt")).unwrap(), "keep me");

    // Files named like the demo's but without its summary.json are not an earlier demo.
    let lookalike = temp.path().join("lookalike");
    std::fs::create_dir(&lookalike).unwrap();
    std::fs::write(lookalike.join("spectrum.png"), "not mine to replace").unwrap();
    let run = fisher(&["demo", "--quick", "--backend", "cpu", "--out-dir", s(&lookalike)]);
    assert_eq!(run.code, 2, "stderr:\n{}", run.stderr);
    assert_eq!(names_in(&lookalike), ["spectrum.png"]);

    // A file where the directory should be, or above it.
    let file = temp.path().join("file");
    std::fs::write(&file, "x").unwrap();
    for out in [file.clone(), file.join("demo")] {
        let run = fisher(&["demo", "--quick", "--backend", "cpu", "--out-dir", s(&out)]);
        assert_eq!(run.code, 2, "{}: stderr:\n{}", out.display(), run.stderr);
        assert!(run.stderr.contains("not a directory"), "{}", run.stderr);
    }
    assert_eq!(names_in(temp.path()), ["file", "lookalike", "mine"]);

    // Flags.
    let run = fisher(&["demo", "--backend", "cpu", "--adapter", "x"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
}
