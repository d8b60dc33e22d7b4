//! The examples in `examples/` build and run as a user would run them: each exits 0 on its
//! defaults (the committed fixtures) and prints what its doc comment promises; the argument
//! paths work (a user's gradients `.npy`, an output directory) and a bad file is an error
//! message and a non-zero exit, never a panic.
//!
//! The examples are built once per test run by Cargo itself (`cargo build --example …`),
//! with the profile and target directory of this test binary (read from the path of the
//! `fisher` binary Cargo built beside it), so `cargo test --release` checks release builds
//! and nothing is rebuilt twice.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use fisher_engine::io::write_npy_matrix;

use crate::common::cli::{read_safetensors, s, temp};

/// The examples this module runs.
const EXAMPLES: [&str; 4] = ["fisher_of_gradients", "onnx_model_fisher", "report", "action"];

/// `target/<profile>` of this test run: the directory of the `fisher` binary.
fn profile_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_fisher")).parent().expect("fisher binary in a profile directory").to_path_buf()
}

/// Builds every example once (the first test to get here builds, the others wait) and
/// returns the directory the example binaries are in.
fn examples_dir() -> &'static Path {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let profile_dir = profile_dir();
        let target_dir = profile_dir.parent().expect("a target directory above the profile directory");
        let profile = profile_dir.file_name().and_then(|n| n.to_str()).expect("utf-8 profile name");
        let mut cargo = Command::new(env!("CARGO"));
        cargo.args(["build", "--quiet", "--manifest-path", concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")]);
        cargo.arg("--target-dir").arg(target_dir);
        // Cargo's `dev` profile builds into `debug/`; every other profile into its name.
        match profile {
            "debug" => {}
            "release" => {
                cargo.arg("--release");
            }
            other => {
                cargo.args(["--profile", other]);
            }
        }
        for example in EXAMPLES {
            cargo.args(["--example", example]);
        }
        let out = cargo.output().map_err(|e| format!("cannot run cargo: {e}"))?;
        if !out.status.success() {
            return Err(format!("cargo build of the examples failed:\n{}", String::from_utf8_lossy(&out.stderr)));
        }
        Ok(profile_dir.join("examples"))
    });
    match built {
        Ok(dir) => dir,
        Err(why) => panic!("{why}"),
    }
}

/// The outcome of one example run.
struct ExampleRun {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs example `name` with `args` (`FISHER_ADAPTER` removed, as for the CLI tests).
fn run_example(name: &str, args: &[&str]) -> ExampleRun {
    let exe = examples_dir().join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    let out = Command::new(&exe).args(args).env_remove("FISHER_ADAPTER").output().unwrap_or_else(|e| panic!("{}: {e}", exe.display()));
    ExampleRun {
        code: out.status.code().expect("example ended by a signal"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Asserts exit 0 and that stdout holds every one of `needles`; returns stdout.
#[track_caller]
fn succeeds_with(run: &ExampleRun, needles: &[&str]) -> String {
    assert_eq!(run.code, 0, "stderr:\n{}\nstdout:\n{}", run.stderr, run.stdout);
    for needle in needles {
        assert!(run.stdout.contains(needle), "{needle:?} missing from:\n{}", run.stdout);
    }
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    run.stdout.clone()
}

/// Asserts a non-zero exit with an `Error:` message on stderr containing `needle`, and no panic.
#[track_caller]
fn fails_with(run: &ExampleRun, needle: &str) {
    assert_ne!(run.code, 0, "stdout:\n{}", run.stdout);
    assert!(!run.stderr.contains("panicked"), "the example panicked:\n{}", run.stderr);
    assert!(run.stderr.starts_with("Error: ") && run.stderr.contains(needle), "{needle:?} missing from:\n{}", run.stderr);
}

/// The number after `prefix` on the line that starts with it.
#[track_caller]
fn number_after(stdout: &str, prefix: &str) -> f64 {
    let line = stdout.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no line {prefix:?} in:\n{stdout}"));
    line[prefix.len()..].split_whitespace().next().and_then(|t| t.parse().ok()).unwrap_or_else(|| panic!("no number in {line:?}"))
}

#[test]
fn fisher_of_gradients_verifies_generated_and_given_gradients() {
    let out = succeeds_with(
        &run_example("fisher_of_gradients", &[]),
        &["gradients: generated (512 samples × 96 parameters", "full: 96×96", "fisher max|Δ|/max|ref|", "diag  max|Δ|/max|ref|"],
    );
    assert_eq!(out.matches(": PASS").count(), 2, "{out}");

    // A user's gradients: tr F is the mean squared row norm.
    let dir = temp();
    let g = fisher_engine::synthetic::normal_matrix(37, 11, 5);
    let path = dir.path().join("G.npy");
    write_npy_matrix(&path, g.view()).unwrap();
    let out = succeeds_with(&run_example("fisher_of_gradients", &[s(&path)]), &["(37 samples × 11 parameters)", "full: 11×11"]);
    assert_eq!(out.matches(": PASS").count(), 2, "{out}");
    let trace = number_after(&out, "full: 11×11, tr F = ");
    let want = g.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / 37.0;
    crate::common::close(trace, want, 1e-5, "tr F printed by the example");

    // Not a gradient matrix: an error naming the file, exit 1, no panic.
    let bad = dir.path().join("bad.npy");
    std::fs::write(&bad, b"not numpy").unwrap();
    fails_with(&run_example("fisher_of_gradients", &[s(&bad)]), "bad.npy");
    fails_with(&run_example("fisher_of_gradients", &[s(&dir.path().join("missing.npy"))]), "missing.npy");
}

#[test]
fn onnx_model_fisher_writes_per_parameter_diagonals_and_kfac() {
    let out = succeeds_with(
        &run_example("onnx_model_fisher", &[]),
        &["P = 726 parameters", "N = 6 samples", "1.weight", "10.bias", "KFAC factors:", "A (55, 55)  G (8, 8)", "wrote "],
    );
    // The per-parameter sums add up to the fixture's tr F (torch.func, f64).
    let r = super::graph_fixtures::reference("cnn_bn");
    let names: Vec<String> = serde_json::from_str(&r.metadata["parameter_names"]).unwrap();
    for name in &names {
        let printed = out
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name.as_str()))
            .unwrap_or_else(|| panic!("no line for {name} in:\n{out}"));
        let sum: f64 = printed.split_whitespace().last().unwrap().parse().unwrap();
        let want: f64 = r.tensors[&format!("diag.true.{name}")].1.iter().sum();
        crate::common::close(sum, want, 2e-5, &format!("diag sum of {name}"));
    }

    // With OUT_DIR the files stay, and hold what `fisher compute --model` writes.
    let dir = temp();
    succeeds_with(&run_example("onnx_model_fisher", &[s(dir.path())]), &["diag.safetensors", "kfac.safetensors"]);
    let diag = read_safetensors(&dir.path().join("diag.safetensors"));
    assert_eq!(diag.metadata["variant"], "true");
    assert_eq!(serde_json::from_str::<Vec<String>>(&diag.metadata["parameter_names"]).unwrap(), names);
    assert_eq!(diag.tensors["diag.4.weight"].0, [8, 6, 3, 3]);
    let kfac = read_safetensors(&dir.path().join("kfac.safetensors"));
    assert_eq!(kfac.names(), ["kfac.0.A", "kfac.0.G", "kfac.10.A", "kfac.10.G", "kfac.4.A", "kfac.4.G"]);

    // A model that is not there: an error naming it, no panic, nothing written.
    let fixture = super::graph_fixtures::case_dir("cnn_bn");
    let empty = temp();
    let missing = empty.path().join("missing.onnx");
    let run = run_example("onnx_model_fisher", &[s(&missing), s(&fixture.join("x.npy")), s(&fixture.join("y.npy")), s(empty.path())]);
    fails_with(&run, "missing.onnx");
    crate::common::cli::assert_dir_holds(empty.path(), &[]);
}

#[test]
fn report_prints_the_implicit_measures() {
    let out = succeeds_with(
        &run_example("report", &[]),
        &["form: implicit", "parameters: 726", "top eigenvalues: [", "log det(F + 0.001·I): ", "d_eff(0.001)", "Fisher–Rao norm", "inter-layer coupling"],
    );
    // The implicit trace is exact (per-sample norms): the fixture's Σ diag(F).
    let want: f64 = super::graph_fixtures::reference("cnn_bn").tensors["diag.true"].1.iter().sum();
    crate::common::close(number_after(&out, "trace: "), want, 2e-5, "tr F printed by the report example");
}

#[test]
fn action_measures_a_path_of_perturbed_checkpoints() {
    let out = succeeds_with(&run_example("action", &[]), &["3 checkpoints", "step 0:", "step 1:", "efficiency L/chord = "]);
    let (action, length, chord) = (number_after(&out, "action S = "), number_after(&out, "length L = "), number_after(&out, "chord = "));
    assert!(action > 0.0 && length > 0.0 && chord > 0.0, "{out}");
    // L² ≤ T·S (Cauchy–Schwarz over T = 2 steps) and L ≥ √S.
    assert!(length * length <= 2.0 * action * (1.0 + 1e-5) && length >= action.sqrt() * (1.0 - 1e-5), "{out}");
}
