//! `fisher compute --mpi` under `mpirun -np 2` (built with `--features mpi`, which needs
//! Open MPI): the ranks' shards merged on rank 0 equal the single process's result bit for
//! bit on the CPU, and an error on the ranks stops them all with one line.
#![cfg(feature = "mpi")]

use std::process::Command;

use crate::common::cli::{assert_dir_holds, fisher, read_safetensors, s, succeeds, temp, Run, FISHER};

/// Runs `mpirun -np <np> fisher <args>` quietly (as root in CI, more ranks than cores).
fn mpirun(np: usize, args: &[&str]) -> Run {
    let output = Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe", "-q", "--bind-to", "none", "-np", &np.to_string(), FISHER])
        .args(args)
        .env_remove("FISHER_ADAPTER")
        .output()
        .expect("mpirun (Open MPI: apt-get install openmpi-bin) must be installed for the mpi feature's tests");
    Run {
        code: output.status.code().expect("mpirun exited by a signal"),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn problem(dir: &std::path::Path) -> Vec<String> {
    succeeds(&fisher(&[
        "compute", "--synthetic-model", "5,12,7,3", "--synthetic-samples", "900", "--activation", "relu",
        "--save-model", s(&dir.join("m.safetensors")), "--save-data", s(&dir.join("data")), "--quiet",
    ]));
    vec![
        "compute".into(), "--weights".into(), dir.join("m.safetensors").display().to_string(),
        "--inputs".into(), dir.join("data/inputs.npy").display().to_string(),
        "--labels".into(), dir.join("data/labels.npy").display().to_string(),
        "--activation".into(), "relu".into(), "--backend".into(), "cpu".into(), "--block-samples".into(), "64".into(),
    ]
}

#[test]
fn two_ranks_equal_the_single_process_bit_for_bit() {
    let dir = temp();
    let base = problem(dir.path());
    for (form, variant) in [("diag", "true"), ("kfac", "mc"), ("layer", "empirical"), ("full", "true")] {
        let single = dir.path().join(format!("{form}-single.safetensors"));
        let ranks = dir.path().join(format!("{form}-mpi.safetensors"));
        let with = |extra: &[&str]| {
            let mut args: Vec<&str> = base.iter().map(String::as_str).collect();
            args.extend_from_slice(&["--form", form, "--variant", variant, "--quiet"]);
            args.extend_from_slice(extra);
            args.into_iter().map(str::to_string).collect::<Vec<_>>()
        };
        let args = with(&["--out", s(&single)]);
        succeeds(&fisher(&args.iter().map(String::as_str).collect::<Vec<_>>()));
        let args = with(&["--mpi", "--out", s(&ranks)]);
        let run = mpirun(2, &args.iter().map(String::as_str).collect::<Vec<_>>());
        succeeds(&run);
        assert!(run.stdout.is_empty() && run.stderr.is_empty(), "--quiet on every rank: {run:?}");
        let (a, b) = (read_safetensors(&single), read_safetensors(&ranks));
        assert_eq!(a.names(), b.names(), "{form}");
        for name in a.names() {
            let bits = |t: &Vec<f32>| t.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a.tensors[&name].1), bits(&b.tensors[&name].1), "{form} {name}");
        }
        assert_eq!(a.metadata, b.metadata, "{form}");
    }
}

#[test]
fn an_error_on_the_ranks_stops_them_all_with_one_line() {
    let dir = temp();
    let base = problem(dir.path());
    let out = dir.path().join("F.safetensors");
    let mut args: Vec<&str> = base.iter().map(String::as_str).collect();
    args[4] = "missing.npy"; // --inputs
    args.extend_from_slice(&["--form", "diag", "--mpi", "--out", s(&out)]);
    let run = mpirun(2, &args);
    assert_eq!(run.code, 2, "{run:?}");
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line for the whole job: {run:?}");
    assert!(lines[0].starts_with("fisher: error: rank 0: missing.npy"), "{}", lines[0]);
    // An existing output is refused on rank 0 before any rank computes; nothing is written.
    std::fs::write(&out, b"keep").unwrap();
    let mut args: Vec<&str> = base.iter().map(String::as_str).collect();
    args.extend_from_slice(&["--form", "kfac", "--mpi", "--out", s(&out)]);
    let run = mpirun(2, &args);
    assert_eq!(run.code, 2, "{run:?}");
    assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
    assert!(run.stderr.contains("--force"), "{run:?}");
    assert_eq!(std::fs::read(&out).unwrap(), b"keep");
    assert_dir_holds(dir.path(), &["F.safetensors", "data", "m.safetensors"]);
}

#[test]
fn two_ranks_on_the_gpu_agree_with_the_single_gpu_run() {
    if !crate::common::gpu_available("two_ranks_on_the_gpu_agree_with_the_single_gpu_run") {
        return;
    }
    // Each rank opens the GPU of its index on the node among the equally good adapters
    // (one here, so both share it); the merge is within the GPU's tolerance of one process.
    let dir = temp();
    let mut base = problem(dir.path());
    let backend = base.iter().position(|a| a == "cpu").expect("--backend cpu");
    base[backend] = "gpu".into();
    let (single, ranks) = (dir.path().join("single.safetensors"), dir.path().join("mpi.safetensors"));
    let mut args: Vec<&str> = base.iter().map(String::as_str).collect();
    args.extend_from_slice(&["--form", "kfac", "--variant", "true", "--quiet", "--out"]);
    let mut one = args.clone();
    one.push(s(&single));
    succeeds(&fisher(&one));
    args.extend_from_slice(&[s(&ranks), "--mpi"]);
    let run = mpirun(2, &args);
    succeeds(&run);
    let (a, b) = (read_safetensors(&single), read_safetensors(&ranks));
    assert_eq!(a.names(), b.names());
    for name in a.names() {
        let (x, y) = (&a.tensors[&name].1, &b.tensors[&name].1);
        let scale = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = x.iter().zip(y).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        assert!(worst <= 1e-5 * scale, "{name}: max |Δ| {worst} of max {scale}");
    }
}
