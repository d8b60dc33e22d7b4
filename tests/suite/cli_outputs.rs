//! Nothing lost, nothing crashes (issue 8): every command that writes, tried as a hostile
//! user would. Each test asserts the exit status, the one-line message, and that every file
//! in the directory is what it was (bytes, kind, link target) — never the machine's own
//! `/dev/null`: device nodes are made inside the test's directory.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::cli::{assert_fails, fisher, s, succeeds, temp, FISHER};

/// What a directory holds: for each name, its kind and its content (bytes of a regular file,
/// the target of a link, the kind of a node).
fn snapshot(dir: &Path) -> BTreeMap<String, String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let path = e.path();
            let kind = fs::symlink_metadata(&path).unwrap().file_type();
            let content = if kind.is_symlink() {
                format!("link -> {}", fs::read_link(&path).unwrap().display())
            } else if kind.is_file() {
                let bytes = fs::read(&path).unwrap();
                format!("file {} bytes, hash {:x}", bytes.len(), fnv(&bytes))
            } else if kind.is_dir() {
                format!("dir {:?}", snapshot(&path))
            } else if kind.is_fifo() {
                "fifo".into()
            } else if kind.is_char_device() {
                "char device".into()
            } else {
                "other".into()
            };
            (e.file_name().to_string_lossy().into_owned(), content)
        })
        .collect()
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100000001b3))
}

/// A small seeded G (N×P f32) written by the CLI itself.
fn grads(dir: &Path, name: &str, n: usize, p: usize) -> PathBuf {
    let path = dir.join(name);
    let g = fisher_engine::synthetic::gradient_like(n, p, 3);
    fisher_engine::io::write_npy_matrix(&path, g.view()).unwrap();
    path
}

/// Model and data saved by `compute --synthetic-model … --save-model --save-data`.
fn model_and_data(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let model = dir.join("M.safetensors");
    let data = dir.join("data");
    let out = dir.join("first.safetensors");
    succeeds(&fisher(&[
        "compute",
        "--synthetic-model",
        "6,5,3",
        "--synthetic-samples",
        "20",
        "--activation",
        "tanh",
        "--form",
        "diag",
        "--backend",
        "cpu",
        "--save-model",
        s(&model),
        "--save-data",
        s(&data),
        "--out",
        s(&out),
        "--quiet",
    ]));
    fs::remove_file(&out).unwrap();
    (model, data.join("inputs.npy"), data.join("labels.npy"))
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn mknod_char(path: &Path, major: u32, minor: u32) -> bool {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path, a mode and a device number.
    unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(major, minor)) == 0 }
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path and a mode.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
}

#[test]
fn reduce_refuses_an_output_that_is_its_input_by_any_spelling() {
    let dir = temp();
    let g = grads(dir.path(), "G.npy", 40, 6);
    fs::hard_link(&g, dir.path().join("hard.npy")).unwrap();
    std::os::unix::fs::symlink("G.npy", dir.path().join("soft.npy")).unwrap();
    let before = snapshot(dir.path());
    let spellings = [g.clone(), dir.path().join(".").join("G.npy"), dir.path().join("hard.npy"), dir.path().join("soft.npy")];
    for out in &spellings {
        for force in [false, true] {
            let mut args = vec!["reduce", "--grads", s(&g), "--form", "diag", "--backend", "cpu", "--out", s(out)];
            if force {
                args.push("--force");
            }
            assert_fails(&fisher(&args), 2, &["same file as --grads"]);
            assert_eq!(snapshot(dir.path()), before, "{}", out.display());
        }
    }
}

#[test]
fn compute_refuses_outputs_that_are_inputs_or_each_other() {
    let dir = temp();
    let (model, inputs, labels) = model_and_data(dir.path());
    let before = snapshot(dir.path());
    for (out, flag) in [(&model, "--weights"), (&inputs, "--inputs"), (&labels, "--labels")] {
        let run = fisher(&[
            "compute", "--weights", s(&model), "--inputs", s(&inputs), "--labels", s(&labels), "--activation", "tanh",
            "--form", "diag", "--backend", "cpu", "--out", s(out), "--force",
        ]);
        assert_fails(&run, 2, &[&format!("same file as {flag}")]);
        assert_eq!(snapshot(dir.path()), before);
    }
    let same = dir.path().join("same.safetensors");
    let run = fisher(&[
        "compute", "--synthetic-model", "6,5,3", "--synthetic-samples", "20", "--activation", "tanh", "--form", "diag",
        "--backend", "cpu", "--save-model", s(&same), "--out", s(&same),
    ]);
    assert_fails(&run, 2, &["--out", "--save-model"]);
    assert_eq!(snapshot(dir.path()), before);
}

#[test]
fn an_existing_output_is_replaced_only_with_force_and_keeps_its_mode() {
    let dir = temp();
    let g = grads(dir.path(), "G.npy", 30, 5);
    let out = dir.path().join("F.safetensors");
    let args = ["reduce", "--grads", s(&g), "--form", "full", "--backend", "cpu", "--out", s(&out), "--quiet"];
    succeeds(&fisher(&args));
    fs::set_permissions(&out, fs::Permissions::from_mode(0o600)).unwrap();
    let before = snapshot(dir.path());
    assert_fails(&fisher(&args), 2, &["exists", "--force"]);
    assert_eq!(snapshot(dir.path()), before);
    let mut forced = args.to_vec();
    forced.push("--force");
    succeeds(&fisher(&forced));
    assert_eq!(fs::metadata(&out).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(crate::common::cli::read_safetensors(&out).matrix("fisher").dim(), (5, 5));
}

#[test]
fn a_device_node_is_written_through_not_replaced() {
    if !is_root() {
        eprintln!("SKIPPED a_device_node_is_written_through_not_replaced: mknod needs root");
        return;
    }
    let dir = temp();
    let g = grads(dir.path(), "G.npy", 30, 5);
    let null = dir.path().join("null");
    assert!(mknod_char(&null, 1, 3), "mknod");
    for args in [
        vec!["reduce", "--grads", s(&g), "--form", "full", "--backend", "cpu", "--out", s(&null)],
        vec![
            "compute", "--synthetic-model", "6,5,3", "--synthetic-samples", "20", "--activation", "tanh", "--form",
            "diag", "--backend", "cpu", "--out", s(&null),
        ],
    ] {
        succeeds(&fisher(&args));
        assert!(fs::symlink_metadata(&null).unwrap().file_type().is_char_device(), "still a device after {args:?}");
    }
}

#[test]
fn a_fifo_with_a_reader_receives_the_result() {
    let dir = temp();
    let g = grads(dir.path(), "G.npy", 30, 5);
    let fifo = dir.path().join("pipe");
    mkfifo(&fifo);
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || fs::read(fifo).unwrap())
    };
    succeeds(&fisher(&["reduce", "--grads", s(&g), "--form", "full", "--backend", "cpu", "--out", s(&fifo), "--quiet"]));
    let bytes = reader.join().unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).expect("a safetensors stream");
    assert_eq!(file.tensor("fisher").unwrap().shape(), &[5, 5]);
    assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
}

#[test]
fn a_symbolic_link_is_followed_and_stays_a_link() {
    let dir = temp();
    let g = grads(dir.path(), "G.npy", 30, 5);
    let link = dir.path().join("F.safetensors");
    std::os::unix::fs::symlink("real.safetensors", &link).unwrap();
    succeeds(&fisher(&["reduce", "--grads", s(&g), "--form", "diag", "--backend", "cpu", "--out", s(&link), "--quiet"]));
    assert!(fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    let saved = crate::common::cli::read_safetensors(&dir.path().join("real.safetensors"));
    assert_eq!(saved.vector("diag").len(), 5);
}

#[test]
fn plots_refuse_to_replace_inputs() {
    let dir = temp();
    let g = grads(dir.path(), "G.npy", 30, 5);
    let f = dir.path().join("F.safetensors");
    succeeds(&fisher(&["reduce", "--grads", s(&g), "--form", "full", "--backend", "cpu", "--out", s(&f), "--quiet"]));
    // A plot path that is a hard link to the input, with the extension a plot needs.
    let png = dir.path().join("F.png");
    fs::hard_link(&f, &png).unwrap();
    let before = snapshot(dir.path());
    for force in [false, true] {
        let mut args = vec!["report", "--fisher", s(&f), "--plot", s(&png)];
        if force {
            args.push("--force");
        }
        assert_fails(&fisher(&args), 2, &["same file as --fisher"]);
        assert_eq!(snapshot(dir.path()), before);
    }
    // An existing plot is replaced only with --force.
    let plot = dir.path().join("s.svg");
    succeeds(&fisher(&["report", "--fisher", s(&f), "--plot", s(&plot), "--quiet"]));
    assert_fails(&fisher(&["report", "--fisher", s(&f), "--plot", s(&plot)]), 2, &["exists", "--force"]);
    succeeds(&fisher(&["report", "--fisher", s(&f), "--plot", s(&plot), "--quiet", "--force"]));
}

#[test]
fn sigterm_during_a_run_leaves_no_temporary_file() {
    let dir = temp();
    let g = grads(dir.path(), "G.npy", 3000, 1200);
    let out = dir.path().join("F.safetensors");
    // Signals at spread delays land in reading, computing and writing (a 5.8 MB result).
    let args = ["reduce", "--grads", s(&g), "--form", "full", "--backend", "cpu", "--out", s(&out), "--quiet"];
    // Before each run: what the previous one left is the whole result or nothing.
    let check_and_reset = || {
        if out.exists() {
            crate::common::cli::read_safetensors(&out);
            fs::remove_file(&out).unwrap();
        }
    };
    sigterm_at(dir.path(), &args, &[5, 40, 80, 120, 160, 200, 260, 320], check_and_reset);
    check_and_reset();
}

/// Runs `fisher args` once per delay, sends SIGTERM after it, and asserts that `dir` holds
/// no temporary file or directory afterwards (`reset` runs before each run).
fn sigterm_at(dir: &Path, args: &[&str], delays_ms: &[u64], reset: impl Fn()) {
    for &delay_ms in delays_ms {
        reset();
        let mut child = Command::new(FISHER).args(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        // SAFETY: sending a signal to our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let _ = child.wait().unwrap();
        let leftovers: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "after SIGTERM at {delay_ms} ms: {leftovers:?}");
    }
}

#[test]
fn result_sizes_are_bounded_before_allocating() {
    let dir = temp();
    let tall = grads(dir.path(), "tall.npy", 200_000, 2);
    let wide = grads(dir.path(), "wide.npy", 2, 100_000);
    for backend in ["cpu", "auto"] {
        for (g, form) in [(&tall, "gram"), (&wide, "full"), (&wide, "blocks:100000")] {
            let out = dir.path().join("F.safetensors");
            let run = fisher(&["reduce", "--grads", s(g), "--form", form, "--backend", backend, "--out", s(&out)]);
            assert_fails(&run, 2, &["--max-result-gib"]);
            assert!(!out.exists());
        }
    }
    let run = fisher(&[
        "compute", "--synthetic-model", "100000,2", "--synthetic-samples", "4", "--activation", "tanh", "--form", "kfac",
        "--backend", "cpu", "--out", s(&dir.path().join("K.safetensors")),
    ]);
    assert_fails(&run, 2, &["--max-result-gib"]);
    assert!(!dir.path().join("K.safetensors").exists());
}

#[test]
fn sizes_from_flags_never_overflow() {
    let dir = temp();
    let g = grads(dir.path(), "G.npy", 10, 10);
    let run = fisher(&["reduce", "--grads", s(&g), "--form", "blocks:18446744073709551615,11", "--backend", "cpu"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    for k in ["18446744073709551615", "1000000000000"] {
        let run = fisher(&[
            "compute", "--synthetic-model", "6,5,3", "--synthetic-samples", "10", "--activation", "tanh", "--variant",
            "mc", "--mc-samples", k, "--form", "grads", "--backend", "cpu", "--out", s(&dir.path().join("G2.safetensors")),
        ]);
        assert_eq!(run.code, 2, "--mc-samples {k}: {}", run.stderr);
        assert!(!run.stderr.contains("panicked") && !run.stderr.contains("internal error"), "{}", run.stderr);
    }
    let run = fisher(&["train", "--steps", "18446744073709551615", "--out-dir", s(&dir.path().join("run"))]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(!dir.path().join("run").exists());
}

#[test]
fn impossible_fisher_files_are_refused_by_report() {
    let dir = temp();
    let bad = dir.path().join("neg.safetensors");
    let diag: Vec<f32> = (0..75).map(|i| if i == 3 { -1.0 } else { 1.0 }).collect();
    let bytes: Vec<u8> = diag.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![75], &bytes).unwrap();
    let meta = std::collections::HashMap::from([("form".to_string(), "diag".to_string()), ("parameters".to_string(), "75".to_string())]);
    fs::write(&bad, safetensors::serialize([("diag", view)], Some(meta)).unwrap()).unwrap();
    assert_fails(&fisher(&["report", "--fisher", s(&bad)]), 2, &["diag"]);

    let mismatch = dir.path().join("shape.safetensors");
    let eye: Vec<u8> = (0..100).flat_map(|i| if i % 11 == 0 { 1.0f32 } else { 0.0 }.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![10, 10], &eye).unwrap();
    let meta = std::collections::HashMap::from([("form".to_string(), "full".to_string()), ("parameters".to_string(), "75".to_string())]);
    fs::write(&mismatch, safetensors::serialize([("fisher", view)], Some(meta)).unwrap()).unwrap();
    assert_fails(&fisher(&["report", "--fisher", s(&mismatch)]), 2, &["fisher"]);
}

#[test]
fn a_long_out_dir_name_is_usable() {
    let dir = temp();
    let name: String = std::iter::repeat('r').take(250).collect();
    let run_dir = dir.path().join(&name);
    succeeds(&fisher(&["train", "--out-dir", s(&run_dir), "--steps", "4", "--checkpoints", "2", "--quiet"]));
    assert!(run_dir.join("run.json").exists());
}

#[test]
fn count_flags_are_bounded_and_never_panic() {
    let dir = temp();
    let run_dir = dir.path().join("run");
    succeeds(&fisher(&["train", "--out-dir", s(&run_dir), "--steps", "4", "--checkpoints", "2", "--samples", "64", "--quiet"]));
    let (x, y) = (run_dir.join("X.npy"), run_dir.join("y.npy"));
    let model = run_dir.join("ckpt_001.safetensors");
    let huge = "18446744073709551615";
    let model_args = ["--weights", s(&model), "--activation", "tanh", "--inputs", s(&x), "--labels", s(&y), "--backend", "cpu"];
    for flag in ["--probes", "--lanczos-steps", "--coupling-probes", "--top-iterations"] {
        let mut args = vec!["report", "--form", "implicit", flag, huge];
        args.extend_from_slice(&model_args);
        assert_fails(&fisher(&args), 2, &[flag, "at most"]);
    }
    let run = fisher(&[
        "action", "--checkpoints", s(&run_dir), "--activation", "tanh", "--inputs", s(&x), "--labels", s(&y), "--segments", huge,
    ]);
    assert_fails(&run, 2, &["--segments", "at most"]);
    // A batch larger than the data is the whole data (as before), never an allocation of its size.
    let run = fisher(&[
        "train", "--out-dir", s(&dir.path().join("t")), "--batch", huge, "--steps", "2", "--checkpoints", "2", "--samples",
        "16", "--quiet",
    ]);
    succeeds(&run);
}

#[test]
fn action_plot_refuses_to_replace_inputs() {
    let dir = temp();
    let run_dir = dir.path().join("run");
    succeeds(&fisher(&["train", "--out-dir", s(&run_dir), "--steps", "4", "--checkpoints", "2", "--samples", "64", "--quiet"]));
    let (x, y) = (run_dir.join("X.npy"), run_dir.join("y.npy"));
    // A .png name that is a symbolic link to a checkpoint.
    let png = dir.path().join("action.png");
    std::os::unix::fs::symlink(run_dir.join("ckpt_001.safetensors"), &png).unwrap();
    let before = snapshot(dir.path());
    let run = fisher(&[
        "action", "--checkpoints", s(&run_dir), "--activation", "tanh", "--inputs", s(&x), "--labels", s(&y), "--plot", s(&png),
        "--force",
    ]);
    assert_fails(&run, 2, &["same file as --checkpoints"]);
    assert_eq!(snapshot(dir.path()), before);
}

#[test]
fn environment_settings_are_checked_not_ignored() {
    let dir = temp();
    let g = grads(dir.path(), "G.npy", 20, 4);
    let out = dir.path().join("F.safetensors");
    let run = |env: (&str, &str)| {
        let output = Command::new(FISHER)
            .args(["reduce", "--grads", s(&g), "--form", "diag", "--out", s(&out)])
            .env(env.0, env.1)
            .output()
            .unwrap();
        (output.status.code().unwrap(), String::from_utf8_lossy(&output.stderr).into_owned())
    };
    // A named adapter that does not exist is an error (as --adapter is), not a silent CPU run.
    let (code, stderr) = run(("FISHER_ADAPTER", "nosuchgpu"));
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("nosuchgpu"), "{stderr}");
    let (code, stderr) = run(("FISHER_GPU_MEMORY_MB", "abc"));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("FISHER_GPU_MEMORY_MB"), "{stderr}");
    assert!(!out.exists());
}

#[test]
fn an_unwritable_output_directory_fails_before_any_work() {
    // /proc takes no new files, not even from root: the probe finds out before G is read.
    let dir = temp();
    let g = grads(dir.path(), "G.npy", 20, 4);
    let run = fisher(&["reduce", "--grads", s(&g), "--form", "full", "--backend", "cpu", "--out", "/proc/F.safetensors"]);
    assert_fails(&run, 2, &["/proc"]);
    assert!(!run.stderr.contains("seconds"));
}

#[test]
fn sigterm_during_train_leaves_no_staged_directory() {
    let dir = temp();
    let run_dir = dir.path().join("run");
    let args = ["train", "--out-dir", s(&run_dir), "--steps", "2000", "--checkpoints", "200", "--quiet"];
    let check_and_reset = || {
        if run_dir.exists() {
            assert!(run_dir.join("run.json").exists(), "a run directory is complete or absent");
            fs::remove_dir_all(&run_dir).unwrap();
        }
    };
    sigterm_at(dir.path(), &args, &[20, 60, 120, 200, 300], check_and_reset);
    check_and_reset();
}

#[test]
fn out_to_dev_stdout_through_a_pipe_writes_the_file_to_the_pipe() {
    // /dev/stdout → /proc/self/fd/1 → pipe:[…]: the last link names no path; the output is
    // written through the pipe (here the test's capture), whole, and nothing is created.
    let dir = temp();
    let g = grads(dir.path(), "g.npy", 40, 300);
    let before = snapshot(dir.path());
    for env in [None, Some("1")] {
        let mut cmd = Command::new(FISHER);
        cmd.args(["reduce", "--grads", s(&g), "--backend", "cpu", "--form", "full", "--out", "/dev/stdout", "--quiet"]);
        cmd.env_remove("FISHER_ADAPTER").env_remove("FISHER_CPU_MEMORY_MB").current_dir(dir.path());
        if let Some(mib) = env {
            cmd.env("FISHER_CPU_MEMORY_MB", mib);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{:?}: {}", env, String::from_utf8_lossy(&out.stderr));
        let header = u64::from_le_bytes(out.stdout[..8].try_into().unwrap()) as usize;
        assert_eq!(out.stdout.len(), 8 + header + 300 * 300 * 4, "{env:?}: a whole safetensors file on stdout");
    }
    assert_eq!(snapshot(dir.path()), before);
}
