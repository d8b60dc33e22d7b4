//! The `fisher` binary end to end: round trips against the f64 reference, the JSON line,
//! and every bad input (message, exit status, and no output file left behind).
//!
//! Inputs are written with the crate's own `.npy` writer (f32/f64) or, for the malformed
//! cases, with the independent raw writer of `common::cli`, so no Python is needed at test
//! time.

use std::path::Path;

use fisher_engine::reference::grads as reference;
use fisher_engine::io::{write_npy_matrix, write_npy_matrix_f64};
use fisher_engine::{FisherMatrix, Form};
use ndarray::Array2;

use crate::common::cli::{assert_dir_holds, assert_fails, fisher, read_safetensors, s, temp, write_raw_npy, Saved};
use crate::common::gpu_available;
use crate::common::verify::{assert_agrees, tolerance_for, Tolerance};

/// Relative slack for comparing scalars the CLI prints (tr F, verification numbers).
const SCALAR_REL: f64 = 1e-5;

/// The saved tensors of `form` as the library's result type, checking that nothing else is there.
#[track_caller]
fn saved_form(saved: &Saved, form: &Form) -> FisherMatrix {
    let blocks = match form {
        Form::BlockDiagonal(sizes) => sizes.len(),
        _ => 0,
    };
    let expected_tensors = blocks.max(1);
    assert_eq!(saved.tensors.len(), expected_tensors, "tensors: {:?}", saved.names());
    match form {
        Form::Full => FisherMatrix::Full(saved.matrix("fisher")),
        Form::Gram => FisherMatrix::Gram(saved.matrix("gram")),
        Form::Diagonal => FisherMatrix::Diagonal(saved.vector("diag")),
        Form::SampleNorms => FisherMatrix::SampleNorms(saved.vector("norms")),
        Form::BlockDiagonal(_) => {
            FisherMatrix::BlockDiagonal((0..blocks).map(|b| saved.matrix(&format!("block.{b}"))).collect())
        }
    }
}

/// Compares a written file with the f64 reference under the crate's one tolerance model
/// (names, shapes, every value; the worst entry is named on failure).
#[track_caller]
fn assert_matches_reference(saved: &Saved, g: &Array2<f32>, form: &Form) {
    let want = reference::reduce(g.view(), form).expect("reference");
    assert_agrees(&saved_form(saved, form), &want, tolerance_for(form, g.view()));
}

/// Seeded gradient-like input with an awkward shape (prime N, P not a multiple of any tile).
fn grads(n: usize, p: usize) -> Array2<f32> {
    fisher_engine::synthetic::gradient_like(n, p, 0x5EED)
}

// ---------------------------------------------------------------------------------------
// Round trips

#[test]
fn full_round_trip_f32_and_f64_inputs() {
    let dir = temp();
    let g = grads(97, 13);
    let g32 = dir.path().join("g32.npy");
    let g64 = dir.path().join("g64.npy");
    write_npy_matrix(&g32, g.view()).unwrap();
    // f64 input holding exactly the f32 values: the result must be the same.
    write_npy_matrix_f64(&g64, g.mapv(f64::from).view()).unwrap();
    for input in [&g32, &g64] {
        let out = dir.path().join("F.safetensors");
        let run =
            fisher(&["reduce", "--grads", s(input), "--backend", "cpu", "--form", "full", "--out", s(&out), "--force"]);
        assert_eq!(run.code, 0, "{}", run.stderr);
        let saved = read_safetensors(&out);
        assert_matches_reference(&saved, &g, &Form::Full);
        assert_eq!(saved.metadata["form"], "full");
        assert_eq!(saved.metadata["samples"], "97");
        assert_eq!(saved.metadata["parameters"], "13");
        assert!(saved.metadata["backend"].starts_with("cpu"), "{:?}", saved.metadata);
        assert_eq!(saved.metadata["fisher_engine_version"], env!("CARGO_PKG_VERSION"));
        assert!(run.stdout.contains("tr F"), "{}", run.stdout);
    }
}

#[test]
fn big_endian_float64_is_read() {
    let dir = temp();
    let g = grads(11, 4);
    let data: Vec<u8> = g.iter().flat_map(|&v| f64::from(v).to_be_bytes()).collect();
    let input = dir.path().join("be.npy");
    write_raw_npy(&input, ">f8", false, "(11, 4)", &data);
    let out = dir.path().join("F.safetensors");
    let run = fisher(&["reduce", "--grads", s(&input), "--backend", "cpu", "--out", s(&out)]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_matches_reference(&read_safetensors(&out), &g, &Form::Full);
}

#[test]
fn every_form_has_its_names_and_shapes() {
    let dir = temp();
    let g = grads(31, 10);
    let input = dir.path().join("g.npy");
    write_npy_matrix(&input, g.view()).unwrap();
    type Tensors<'a> = &'a [(&'a str, &'a [usize])];
    let cases: [(&str, Form, Tensors); 5] = [
        ("full", Form::Full, &[("fisher", &[10, 10])]),
        ("diag", Form::Diagonal, &[("diag", &[10])]),
        ("gram", Form::Gram, &[("gram", &[31, 31])]),
        ("norms", Form::SampleNorms, &[("norms", &[31])]),
        (
            "blocks:3,1,6",
            Form::BlockDiagonal(vec![3, 1, 6]),
            &[("block.0", &[3, 3]), ("block.1", &[1, 1]), ("block.2", &[6, 6])],
        ),
    ];
    for (spelling, form, tensors) in cases {
        let out = dir.path().join(format!("{}.safetensors", spelling.replace([':', ','], "_")));
        let run = fisher(&["reduce", "--grads", s(&input), "--backend", "cpu", "--form", spelling, "--out", s(&out)]);
        assert_eq!(run.code, 0, "{spelling}: {}", run.stderr);
        let saved = read_safetensors(&out);
        for (name, shape) in tensors {
            assert_eq!(saved.tensors[*name].0, *shape, "{spelling}: {name}");
        }
        assert_eq!(saved.tensors.len(), tensors.len(), "{spelling}");
        assert_eq!(saved.metadata["form"], spelling);
        assert_matches_reference(&saved, &g, &form);
    }
}

#[test]
fn streaming_in_many_chunks_equals_the_reference() {
    // 3 rows per chunk over 100 rows: 34 pushes, the last one short.
    let dir = temp();
    let g = grads(100, 7);
    let input = dir.path().join("g.npy");
    write_npy_matrix(&input, g.view()).unwrap();
    for (spelling, form) in [("full", Form::Full), ("diag", Form::Diagonal), ("norms", Form::SampleNorms)] {
        let out = dir.path().join("F.safetensors");
        let run = fisher(&[
            "reduce", "--grads", s(&input), "--backend", "cpu", "--form", spelling, "--chunk-rows", "3", "--out", s(&out),
            "--force",
        ]);
        assert_eq!(run.code, 0, "{spelling}: {}", run.stderr);
        assert_matches_reference(&read_safetensors(&out), &g, &form);
    }
}

#[test]
fn json_line_has_every_key() {
    let dir = temp();
    let g = grads(40, 6);
    let input = dir.path().join("g.npy");
    write_npy_matrix(&input, g.view()).unwrap();
    let out = dir.path().join("F.safetensors");
    let run = fisher(&["reduce", "--grads", s(&input), "--backend", "cpu", "--form", "diag", "--out", s(&out), "--json"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.stdout.lines().count(), 1, "one JSON line: {}", run.stdout);
    let v: serde_json::Value = serde_json::from_str(&run.stdout).expect("valid JSON");
    assert_eq!(v["parameters"], 6);
    assert_eq!(v["samples"], 40);
    assert_eq!(v["form"], "diag");
    assert!(v["backend"].as_str().unwrap().starts_with("cpu"), "{v}");
    assert!(v["adapter"].is_null(), "{v}");
    assert_eq!(v["out"], s(&out));
    assert_eq!(v["input"], s(&input));
    assert_eq!(v["dtype"], "float32");
    assert_eq!(v["tensors"][0]["name"], "diag");
    assert_eq!(v["tensors"][0]["shape"], serde_json::json!([6]));
    for stage in ["load", "setup", "compute", "verify", "write"] {
        assert!(v["seconds"][stage].as_f64().is_some_and(|t| t >= 0.0), "seconds.{stage} in {v}");
    }
    assert!(v.get("verification").is_none(), "verification only with --verify: {v}");
    // tr F from the JSON agrees with the reference.
    let FisherMatrix::Diagonal(d) = reference::reduce(g.view(), &Form::Diagonal).unwrap() else { unreachable!() };
    let trace: f64 = d.sum();
    assert!((v["trace"].as_f64().unwrap() - trace).abs() <= SCALAR_REL * trace, "{v}");
}

#[test]
fn verify_reports_the_disagreement() {
    let dir = temp();
    let g = grads(53, 9);
    let input = dir.path().join("g.npy");
    write_npy_matrix(&input, g.view()).unwrap();
    let out = dir.path().join("F.safetensors");
    let args = ["reduce", "--grads", s(&input), "--backend", "cpu", "--out", s(&out), "--verify", "--force"];
    let run = fisher(&[&args[..], &["--json"]].concat());
    assert_eq!(run.code, 0, "{}", run.stderr);
    let v: serde_json::Value = serde_json::from_str(&run.stdout).expect("valid JSON");
    let tolerance = v["verification"]["tolerance_rel"].as_f64().expect("tolerance_rel");
    assert_eq!(tolerance, Tolerance::for_sum(53).rel);
    for key in ["max_abs", "max_rel", "frobenius_rel"] {
        let x = v["verification"][key].as_f64().unwrap_or_else(|| panic!("verification.{key} in {v}"));
        assert!((0.0..=tolerance).contains(&x), "verification.{key} = {x}");
    }
    assert_eq!(v["verification"]["passed"], true, "{v}");
    assert!(v["seconds"]["verify"].as_f64().unwrap() > 0.0, "{v}");

    let human = fisher(&args);
    assert_eq!(human.code, 0, "{}", human.stderr);
    assert!(human.stdout.contains("verified") && human.stdout.contains("max|Δ|"), "{}", human.stdout);
}

#[test]
fn quiet_prints_nothing_and_still_writes() {
    let dir = temp();
    let input = dir.path().join("g.npy");
    write_npy_matrix(&input, grads(5, 3).view()).unwrap();
    let out = dir.path().join("F.safetensors");
    let run = fisher(&["reduce", "--grads", s(&input), "--backend", "cpu", "--out", s(&out), "--quiet"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.is_empty(), "{}", run.stdout);
    assert!(out.exists());
}

#[test]
fn synthetic_with_out_equals_the_reference_on_the_same_data() {
    let dir = temp();
    let out = dir.path().join("F.safetensors");
    let run = fisher(&["reduce", "--synthetic", "64,9", "--seed", "3", "--backend", "cpu", "--out", s(&out)]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let g = fisher_engine::synthetic::gradient_like(64, 9, 3);
    assert_matches_reference(&read_safetensors(&out), &g, &Form::Full);
}

#[test]
fn synthetic_demo_compares_paths_with_the_reference() {
    let run = fisher(&["reduce", "--synthetic", "128,17", "--form", "full", "--backend", "cpu"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    for needle in ["128 samples", "17 parameters", "cpu:", "f64 reference", "Nothing was written"] {
        assert!(run.stdout.contains(needle), "{needle:?} missing from:\n{}", run.stdout);
    }
    assert!(run.stdout.contains("matches the f64 reference"), "{}", run.stdout);
}

#[test]
fn devices_json_lists_adapters() {
    let run = fisher(&["devices", "--json"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let v: serde_json::Value = serde_json::from_str(run.stdout.trim()).expect("valid JSON");
    let adapters = v["adapters"].as_array().expect("adapters array");
    for a in adapters {
        for key in [
            "name",
            "backend",
            "device_type",
            "driver",
            "max_storage_buffer_binding_size",
            "max_buffer_size",
            "max_compute_workgroup_storage_size",
            "max_compute_invocations_per_workgroup",
            "auto_pick",
        ] {
            assert!(a.get(key).is_some(), "{key} missing from {a}");
        }
    }
    assert!(adapters.iter().filter(|a| a["auto_pick"] == true).count() <= 1, "{v}");
}

// ---------------------------------------------------------------------------------------
// GPU

#[test]
fn gpu_round_trip_matches_the_reference() {
    if !gpu_available("cli::gpu_round_trip_matches_the_reference") {
        return;
    }
    let dir = temp();
    let g = grads(257, 67);
    let input = dir.path().join("g.npy");
    write_npy_matrix(&input, g.view()).unwrap();
    for (spelling, form) in [
        ("full", Form::Full),
        ("diag", Form::Diagonal),
        ("gram", Form::Gram),
        ("norms", Form::SampleNorms),
        ("blocks:64,3", Form::BlockDiagonal(vec![64, 3])),
    ] {
        let out = dir.path().join("F.safetensors");
        let run = fisher(&[
            "reduce", "--grads", s(&input), "--backend", "gpu", "--form", spelling, "--chunk-rows", "100", "--out",
            s(&out), "--json", "--force",
        ]);
        assert_eq!(run.code, 0, "{spelling}: {}", run.stderr);
        let v: serde_json::Value = serde_json::from_str(&run.stdout).expect("valid JSON");
        assert!(v["adapter"].is_string(), "{v}");
        assert!(v["backend"].as_str().unwrap().starts_with("gpu"), "{v}");
        let saved = read_safetensors(&out);
        assert!(saved.metadata["backend"].starts_with("gpu"), "{:?}", saved.metadata);
        assert_matches_reference(&saved, &g, &form);
    }
}

#[test]
fn missing_named_adapter_exits_3() {
    let dir = temp();
    let input = dir.path().join("g.npy");
    write_npy_matrix(&input, grads(5, 3).view()).unwrap();
    let out = dir.path().join("F.safetensors");
    for backend in ["gpu", "auto"] {
        let run = fisher(&[
            "reduce", "--grads", s(&input), "--backend", backend, "--adapter", "no-such-adapter-7f3a", "--out", s(&out),
        ]);
        assert_fails(&run, 3, &["no GPU adapter"]);
        assert!(!out.exists());
    }
}

// ---------------------------------------------------------------------------------------
// Bad inputs: message, exit status 2, and nothing written

/// Runs `reduce --grads <input> --out <dir>/F.safetensors` (CPU) and checks the failure.
#[track_caller]
fn assert_bad_input(dir: &Path, input: &Path, extra: &[&str], needles: &[&str]) {
    let out = dir.join("F.safetensors");
    let run = fisher(&[&["reduce", "--grads", s(input), "--backend", "cpu", "--out", s(&out)], extra].concat());
    assert_fails(&run, 2, needles);
    assert!(!out.exists(), "{} was written by a failed run", out.display());
}

fn only_input(dir: &Path, input: &Path) {
    let name = input.file_name().unwrap().to_str().unwrap();
    assert_dir_holds(dir, &[name]);
}

#[test]
fn missing_input_file() {
    let dir = temp();
    let input = dir.path().join("nope.npy");
    assert_bad_input(dir.path(), &input, &[], &[s(&input), "cannot open"]);
    assert_dir_holds(dir.path(), &[]);
}

#[test]
fn not_an_npy_file() {
    let dir = temp();
    let input = dir.path().join("g.npy");
    std::fs::write(&input, "0.1,0.2\n0.3,0.4\n").unwrap();
    assert_bad_input(dir.path(), &input, &[], &[s(&input), "not a numpy .npy file"]);
    only_input(dir.path(), &input);
}

#[test]
fn wrong_dtypes_are_named() {
    let dir = temp();
    let input = dir.path().join("g.npy");
    for (descr, size, name) in [("<i8", 8, "int64"), ("<f2", 2, "float16"), ("|b1", 1, "bool"), ("<c8", 8, "complex64")] {
        write_raw_npy(&input, descr, false, "(2, 3)", &vec![0u8; 6 * size]);
        assert_bad_input(dir.path(), &input, &[], &[s(&input), name, "float32 or float64"]);
        only_input(dir.path(), &input);
    }
}

#[test]
fn wrong_rank_names_the_shape() {
    let dir = temp();
    let input = dir.path().join("g.npy");
    write_raw_npy(&input, "<f4", false, "(5,)", &[0u8; 20]);
    assert_bad_input(dir.path(), &input, &[], &[s(&input), "(5,)", "2-D"]);
    write_raw_npy(&input, "<f4", false, "(2, 3, 4)", &[0u8; 96]);
    assert_bad_input(dir.path(), &input, &[], &[s(&input), "(2, 3, 4)", "2-D"]);
    only_input(dir.path(), &input);
}

#[test]
fn fortran_order_is_refused() {
    let dir = temp();
    let input = dir.path().join("g.npy");
    write_raw_npy(&input, "<f4", true, "(3, 2)", &[0u8; 24]);
    assert_bad_input(dir.path(), &input, &[], &[s(&input), "Fortran-ordered", "np.ascontiguousarray"]);
    only_input(dir.path(), &input);
}

#[test]
fn empty_matrices_are_refused() {
    let dir = temp();
    let input = dir.path().join("g.npy");
    write_raw_npy(&input, "<f4", false, "(0, 4)", &[]);
    assert_bad_input(dir.path(), &input, &[], &[s(&input), "empty", "0x4"]);
    write_raw_npy(&input, "<f4", false, "(3, 0)", &[]);
    assert_bad_input(dir.path(), &input, &[], &[s(&input), "empty", "3x0"]);
    only_input(dir.path(), &input);
}

#[test]
fn truncated_data_is_refused() {
    let dir = temp();
    let input = dir.path().join("g.npy");
    write_raw_npy(&input, "<f4", false, "(4, 4)", &[0u8; 60]);
    assert_bad_input(dir.path(), &input, &[], &[s(&input), "truncated"]);
    only_input(dir.path(), &input);
}

#[test]
fn nan_and_inf_name_the_first_offending_row_and_column() {
    let dir = temp();
    let input = dir.path().join("g.npy");
    for (value, spelled) in [(f32::NAN, "NaN"), (f32::INFINITY, "inf"), (f32::NEG_INFINITY, "-inf")] {
        let mut g = grads(20, 5);
        g[[13, 2]] = value;
        g[[17, 0]] = f32::NAN; // a later one must not be the one reported
        write_npy_matrix(&input, g.view()).unwrap();
        // Whole-matrix path (--verify, gram), streamed in one chunk, and streamed in many
        // chunks: row 13 is in the fifth 3-row chunk, so the chunk's row offset matters.
        for extra in [&["--verify"][..], &[], &["--chunk-rows", "3"], &["--form", "gram"]] {
            assert_bad_input(dir.path(), &input, extra, &[s(&input), spelled, "row 13, column 2"]);
        }
        only_input(dir.path(), &input);
    }
}

#[test]
fn missing_output_directory_is_named() {
    let dir = temp();
    let input = dir.path().join("g.npy");
    write_npy_matrix(&input, grads(5, 3).view()).unwrap();
    let missing = dir.path().join("no").join("such");
    let out = missing.join("F.safetensors");
    let run = fisher(&["reduce", "--grads", s(&input), "--backend", "cpu", "--out", s(&out)]);
    assert_fails(&run, 2, &[s(&missing), "output directory does not exist"]);
    assert!(!missing.exists());
}

#[test]
fn a_failed_run_leaves_an_existing_output_untouched() {
    let dir = temp();
    let input = dir.path().join("g.npy");
    let mut g = grads(9, 3);
    g[[8, 2]] = f32::NAN;
    write_npy_matrix(&input, g.view()).unwrap();
    let out = dir.path().join("F.safetensors");
    std::fs::write(&out, b"previous result").unwrap();
    // --force: replacing is allowed, so the run reaches the bad row, and still must not.
    let run = fisher(&["reduce", "--grads", s(&input), "--backend", "cpu", "--out", s(&out), "--force"]);
    assert_fails(&run, 2, &["row 8, column 2"]);
    assert_eq!(std::fs::read(&out).unwrap(), b"previous result");
    assert_dir_holds(dir.path(), &["g.npy", "F.safetensors"]);
}

#[test]
fn bad_forms_are_refused() {
    let dir = temp();
    let input = dir.path().join("g.npy");
    write_npy_matrix(&input, grads(6, 10).view()).unwrap();
    assert_bad_input(dir.path(), &input, &["--form", "kfac"], &["--form", "unknown form 'kfac'"]);
    assert_bad_input(dir.path(), &input, &["--form", "blocks:3,4"], &["blocks:3,4", "sum to 7", "10 parameters"]);
    assert_bad_input(dir.path(), &input, &["--form", "blocks:3,x"], &["--form", "'x'"]);
    assert_bad_input(dir.path(), &input, &["--form", "blocks:0,10"], &["--form"]);
    only_input(dir.path(), &input);
}

#[test]
fn bad_synthetic_specs_are_refused() {
    for spec in ["4096", "0,5", "7,0", "a,b", "1,2,3", "-3,4", "100000,100000"] {
        let run = fisher(&["reduce", "--synthetic", spec, "--backend", "cpu"]);
        assert_fails(&run, 2, &["--synthetic"]);
    }
    let run = fisher(&["reduce", "--synthetic", "10,7", "--form", "blocks:3,3", "--backend", "cpu"]);
    assert_fails(&run, 2, &["sum to 6", "7 parameters"]);
}

#[test]
fn usage_errors_are_one_line_with_code_2() {
    let dir = temp();
    let input = dir.path().join("g.npy");
    write_npy_matrix(&input, grads(4, 2).view()).unwrap();
    // --grads without --out
    assert_fails(&fisher(&["reduce", "--grads", s(&input)]), 2, &["--out"]);
    // neither input
    assert_fails(&fisher(&["reduce", "--form", "full"]), 2, &["--grads"]);
    // both inputs
    assert_fails(&fisher(&["reduce", "--grads", s(&input), "--synthetic", "4,2"]), 2, &["--synthetic"]);
    // --seed without --synthetic
    let out = dir.path().join("F.safetensors");
    assert_fails(&fisher(&["reduce", "--grads", s(&input), "--seed", "3", "--out", s(&out)]), 2, &["--seed"]);
    // unknown flag and unknown backend (clap's own errors, folded to one line)
    assert_fails(&fisher(&["reduce", "--synthetic", "4,2", "--frobnicate"]), 2, &["--frobnicate"]);
    assert_fails(&fisher(&["reduce", "--synthetic", "4,2", "--backend", "tpu"]), 2, &["tpu"]);
    // --adapter makes no sense on the CPU
    assert_fails(&fisher(&["reduce", "--synthetic", "4,2", "--backend", "cpu", "--adapter", "x"]), 2, &["--adapter"]);
    assert_dir_holds(dir.path(), &["g.npy"]);
}

#[test]
fn help_documents_the_exit_codes() {
    for args in [&["--help"][..], &["reduce", "--help"]] {
        let run = fisher(args);
        assert_eq!(run.code, 0, "{}", run.stderr);
        for needle in ["Exit codes", "0  success", "1  runtime failure", "2  usage or bad input", "3  no GPU adapter"] {
            assert!(run.stdout.contains(needle), "{args:?}: {needle:?} missing");
        }
    }
}
