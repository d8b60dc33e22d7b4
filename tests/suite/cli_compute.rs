//! `fisher compute` end to end: tiny PyTorch-style models (keys `0.weight`, `0.bias`,
//! `2.weight`, `2.bias`) and `.npy` data written here, every form on the CPU and (under the
//! GPU harness policy) the GPU against the f64 network reference, tensor names and shapes,
//! metadata and JSON keys, the synthetic model and its saved files, and every bad input
//! (message, exit status, and no output left behind).

use std::path::Path;

use fisher_engine::io::{write_npy_labels, write_npy_matrix};
use fisher_engine::model::{Activation, Dataset, Likelihood, Linear, Mlp, Targets};
use fisher_engine::fisher::{KfacFactors, NetFisher, NetForm, Variant};
use fisher_engine::reference::network as reference;
use fisher_engine::synthetic::{normal_matrix, SplitMix64};
use ndarray::{Array1, Array2};

use crate::common::backend_test;
use crate::common::cli::{
    assert_dir_holds, assert_fails, f32_bytes, fisher, names_in, read_safetensors, s, temp, write_raw_npy,
    write_raw_safetensors, Saved,
};

/// The issue's contract for every variant × form on every backend.
const FROBENIUS_REL: f64 = 1e-5;

// ---------------------------------------------------------------------------------------
// Problems and files

/// A seeded `nn.Sequential(Linear(4, 6), Tanh(), Linear(6, 3))` (keys 0.* and 2.*),
/// optionally without the last bias.
fn model(last_bias: bool) -> Mlp {
    let mut rng = SplitMix64::new(11);
    let mut normal = |rows: usize, cols: usize, scale: f64| {
        Array2::from_shape_simple_fn((rows, cols), || (rng.normal() * scale) as f32)
    };
    let w0 = normal(6, 4, 0.7);
    let b0 = normal(1, 6, 0.3).row(0).to_owned();
    let w2 = normal(3, 6, 0.6);
    let b2 = normal(1, 3, 0.3).row(0).to_owned();
    Mlp::new(
        vec![
            Linear { index: 0, weight: w0, bias: Some(b0) },
            Linear { index: 2, weight: w2, bias: last_bias.then_some(b2) },
        ],
        vec![Activation::Tanh],
    )
    .unwrap()
}

const N: usize = 23;

fn inputs(n: usize, d: usize) -> Array2<f32> {
    normal_matrix(n, d, 3)
}

fn labels(n: usize) -> Vec<u32> {
    (0..n).map(|i| (i * 7 % 3) as u32).collect()
}

/// Model and categorical data files in `dir`: `m.safetensors`, `x.npy`, `y.npy`.
struct Files {
    weights: std::path::PathBuf,
    inputs: std::path::PathBuf,
    labels: std::path::PathBuf,
}

fn write_problem(dir: &Path, mlp: &Mlp) -> Files {
    let files = Files { weights: dir.join("m.safetensors"), inputs: dir.join("x.npy"), labels: dir.join("y.npy") };
    mlp.to_safetensors(&files.weights).unwrap();
    write_npy_matrix(&files.inputs, inputs(N, 4).view()).unwrap();
    write_npy_labels(&files.labels, &labels(N)).unwrap();
    files
}

fn dataset() -> Dataset {
    Dataset { inputs: inputs(N, 4), targets: Targets::Classes(labels(N)) }
}

/// The state dict of `mlp` as (key, shape, values).
fn state_dict(mlp: &Mlp) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut out = Vec::new();
    for l in &mlp.layers {
        out.push((format!("{}.weight", l.index), vec![l.fan_out(), l.fan_in()], l.weight.iter().copied().collect()));
        if let Some(b) = &l.bias {
            out.push((format!("{}.bias", l.index), vec![b.len()], b.to_vec()));
        }
    }
    out
}

/// Writes a state dict (F32, in the given key order) with the safetensors crate directly,
/// so that malformed models (NaN, extra and missing keys) can be made.
fn write_dict(path: &Path, dict: &[(String, Vec<usize>, Vec<f32>)]) {
    let raw: Vec<_> =
        dict.iter().map(|(k, shape, v)| (k.as_str(), safetensors::Dtype::F32, shape.clone(), f32_bytes(v))).collect();
    write_raw_safetensors(path, &raw);
}

/// The saved tensors of `form` as the library's result type, checking that nothing else is there.
#[track_caller]
fn saved_fisher(saved: &Saved, mlp: &Mlp, form: NetForm) -> NetFisher {
    let indices: Vec<usize> = mlp.layers.iter().map(|l| l.index).collect();
    let (result, expected): (NetFisher, Vec<String>) = match form {
        NetForm::Full => (NetFisher::Full(saved.matrix("fisher")), vec!["fisher".into()]),
        NetForm::Diagonal => (NetFisher::Diagonal(saved.vector("diag")), vec!["diag".into()]),
        NetForm::Grads => (NetFisher::Grads(saved.matrix("grads")), vec!["grads".into()]),
        NetForm::Norms => (NetFisher::Norms(saved.vector("norms")), vec!["norms".into()]),
        NetForm::Layer => {
            let names: Vec<String> = indices.iter().map(|i| format!("block.{i}")).collect();
            (NetFisher::Layer(names.iter().map(|n| saved.matrix(n)).collect()), names)
        }
        NetForm::Kfac => {
            let factors = indices
                .iter()
                .map(|i| KfacFactors { a: saved.matrix(&format!("kfac.{i}.A")), g: saved.matrix(&format!("kfac.{i}.G")) })
                .collect();
            let names = indices.iter().flat_map(|i| [format!("kfac.{i}.A"), format!("kfac.{i}.G")]).collect();
            (NetFisher::Kfac(factors), names)
        }
    };
    let mut expected = expected;
    expected.sort();
    assert_eq!(saved.names(), expected, "tensors of {form:?}");
    result
}

/// Compares a written result with the f64 reference: ‖Δ‖/‖ref‖ ≤ 1e-5.
#[track_caller]
fn assert_matches_reference(saved: &Saved, mlp: &Mlp, data: &Dataset, likelihood: Likelihood, variant: Variant, form: NetForm) {
    let want = reference::fisher(mlp, data, likelihood, variant, form).expect("reference");
    let got = saved_fisher(saved, mlp, form);
    let agreement = got.agreement(&want).expect("same form");
    assert!(
        agreement.frobenius_rel <= FROBENIUS_REL,
        "{form:?} {variant:?}: ‖Δ‖/‖ref‖ = {:e} (max|Δ| {:e})",
        agreement.frobenius_rel,
        agreement.max_abs
    );
}

const FORMS: [(&str, NetForm); 6] = [
    ("full", NetForm::Full),
    ("diag", NetForm::Diagonal),
    ("layer", NetForm::Layer),
    ("kfac", NetForm::Kfac),
    ("grads", NetForm::Grads),
    ("norms", NetForm::Norms),
];

/// Expected tensor names and shapes of each form for [`model`] (P = 30 + 21 = 51 with the
/// last bias, 48 without; R = 3 for `true`).
fn expected_shapes(form: &str, last_bias: bool) -> Vec<(&'static str, Vec<usize>)> {
    let p = if last_bias { 51 } else { 48 };
    let (p2, a2) = if last_bias { (21, 7) } else { (18, 6) };
    match form {
        "full" => vec![("fisher", vec![p, p])],
        "diag" => vec![("diag", vec![p])],
        "layer" => vec![("block.0", vec![30, 30]), ("block.2", vec![p2, p2])],
        "kfac" => vec![
            ("kfac.0.A", vec![5, 5]),
            ("kfac.0.G", vec![6, 6]),
            ("kfac.2.A", vec![a2, a2]),
            ("kfac.2.G", vec![3, 3]),
        ],
        "grads" => vec![("grads", vec![N * 3, p])],
        "norms" => vec![("norms", vec![N])],
        _ => unreachable!(),
    }
}

// ---------------------------------------------------------------------------------------
// Round trips

// Every form on each backend for `true`, names, shapes and metadata checked, values against
// the reference.
backend_test!(every_form_round_trips, |backend: &str| {
    let dir = temp();
    for last_bias in [true, false] {
        let mlp = model(last_bias);
        let files = write_problem(dir.path(), &mlp);
        for (spelling, form) in FORMS {
            let out = dir.path().join(format!("{spelling}.safetensors"));
            let run = fisher(&[
                "compute", "--weights", s(&files.weights), "--activation", "tanh", "--inputs", s(&files.inputs),
                "--labels", s(&files.labels), "--form", spelling, "--backend", backend, "--out", s(&out),
            ]);
            assert_eq!(run.code, 0, "{spelling}: {}", run.stderr);
            let saved = read_safetensors(&out);
            for (name, shape) in expected_shapes(spelling, last_bias) {
                assert_eq!(saved.tensors.get(name).map(|t| &t.0), Some(&shape), "{spelling}: {name} in {:?}", saved.names());
            }
            assert_matches_reference(&saved, &mlp, &dataset(), Likelihood::Categorical, Variant::True, form);
            let m = &saved.metadata;
            assert_eq!(m["form"], spelling);
            assert_eq!(m["variant"], "true");
            assert_eq!(m["likelihood"], "categorical");
            assert_eq!(m["samples"], N.to_string());
            assert_eq!(m["parameters"], mlp.num_params().to_string());
            assert_eq!(m["rows_per_sample"], "3");
            assert!(m["backend"].starts_with(backend), "{m:?}");
            assert_eq!(m["activations"], r#"["tanh"]"#);
            assert_eq!(m["param_order"], "pytorch named_parameters; weight row-major then bias");
            assert_eq!(m["fisher_engine_version"], env!("CARGO_PKG_VERSION"));
            assert!(!m.contains_key("mc_samples") && !m.contains_key("seed"), "{m:?}");
            assert_eq!(m.contains_key("kfac_layout"), spelling == "kfac", "{m:?}");
            if spelling == "kfac" {
                assert!(m["kfac_layout"].contains("G ⊗ A") && m["kfac_layout"].contains("kfac_expand"), "{m:?}");
            }
            std::fs::remove_file(&out).unwrap();
        }
    }
});

#[test]
fn variants_and_likelihoods_match_the_reference() {
    let dir = temp();
    let mlp = model(true);
    let files = write_problem(dir.path(), &mlp);
    let data = dataset();
    // Gaussian targets, N×3.
    let targets = normal_matrix(N, 3, 9);
    let gauss_labels = dir.path().join("t.npy");
    write_npy_matrix(&gauss_labels, targets.view()).unwrap();
    let gauss = Dataset { inputs: data.inputs.clone(), targets: Targets::Values(targets) };

    let mc = Variant::MonteCarlo { samples: 3, seed: 5 };
    type Case<'a> = (&'a [&'a str], &'a Path, &'a Dataset, Likelihood, Variant, usize);
    let cases: [Case; 5] = [
        (&["--variant", "empirical"], &files.labels, &data, Likelihood::Categorical, Variant::Empirical, 1),
        (&["--variant", "mc", "--mc-samples", "3", "--seed", "5"], &files.labels, &data, Likelihood::Categorical, mc, 3),
        (&["--variant", "mc"], &files.labels, &data, Likelihood::Categorical, Variant::MonteCarlo { samples: 1, seed: 0 }, 1),
        (&["--likelihood", "gaussian"], &gauss_labels, &gauss, Likelihood::Gaussian, Variant::True, 3),
        (&["--likelihood", "gaussian", "--variant", "mc", "--mc-samples", "3", "--seed", "5"], &gauss_labels, &gauss, Likelihood::Gaussian, mc, 3),
    ];
    for (extra, labels, data, likelihood, variant, rows) in cases {
        for (spelling, form) in [("full", NetForm::Full), ("grads", NetForm::Grads), ("kfac", NetForm::Kfac)] {
            let out = dir.path().join("F.safetensors");
            let mut args = vec![
                "compute", "--weights", s(&files.weights), "--activation", "tanh", "--inputs", s(&files.inputs),
                "--labels", s(labels), "--form", spelling, "--backend", "cpu", "--out", s(&out), "--verify", "--force",
            ];
            args.extend_from_slice(extra);
            let run = fisher(&args);
            assert_eq!(run.code, 0, "{extra:?} {spelling}: {}", run.stderr);
            assert!(run.stdout.contains("PASS"), "{}", run.stdout);
            let saved = read_safetensors(&out);
            assert_matches_reference(&saved, &mlp, data, likelihood, variant, form);
            assert_eq!(saved.metadata["rows_per_sample"], rows.to_string(), "{extra:?}");
            if let Variant::MonteCarlo { samples, seed } = variant {
                assert_eq!(saved.metadata["mc_samples"], samples.to_string());
                assert_eq!(saved.metadata["seed"], seed.to_string());
            }
            if form == NetForm::Grads {
                assert_eq!(saved.tensors["grads"].0, [N * rows, 51]);
            }
        }
    }
}

#[test]
fn activation_specs_json_inline_and_file_and_int32_labels() {
    let dir = temp();
    // Three layers at indices 0, 2, 4 with two different activations.
    let mut rng = SplitMix64::new(4);
    let mut layer = |index: usize, out: usize, fan_in: usize| Linear {
        index,
        weight: Array2::from_shape_simple_fn((out, fan_in), || (rng.normal() * 0.6) as f32),
        bias: Some(Array1::from_shape_simple_fn(out, || (rng.normal() * 0.2) as f32)),
    };
    let layers = vec![layer(0, 5, 4), layer(2, 4, 5), layer(4, 3, 4)];
    let mlp = Mlp::new(layers, vec![Activation::Gelu, Activation::Relu]).unwrap();
    let files = write_problem(dir.path(), &mlp);
    let int32 = dir.path().join("y32.npy");
    let data32: Vec<u8> = labels(N).iter().flat_map(|&c| (c as i32).to_le_bytes()).collect();
    write_raw_npy(&int32, "<i4", false, &format!("({N},)"), &data32);
    let spec_file = dir.path().join("act.json");
    std::fs::write(&spec_file, r#"{"activations": ["gelu", "relu"]}"#).unwrap();
    for (spec, labels) in [(r#"["gelu","relu"]"#, &files.labels), (s(&spec_file), &int32)] {
        let out = dir.path().join("F.safetensors");
        let run = fisher(&[
            "compute", "--weights", s(&files.weights), "--activation", spec, "--inputs", s(&files.inputs), "--labels",
            s(labels), "--form", "layer", "--backend", "cpu", "--out", s(&out), "--json", "--force",
        ]);
        assert_eq!(run.code, 0, "{spec}: {}", run.stderr);
        let saved = read_safetensors(&out);
        assert_eq!(saved.names(), ["block.0", "block.2", "block.4"]);
        assert_eq!(saved.metadata["activations"], r#"["gelu","relu"]"#);
        assert_eq!(saved.metadata["layer_indices"], "[0,2,4]");
        assert_matches_reference(&saved, &mlp, &dataset(), Likelihood::Categorical, Variant::True, NetForm::Layer);
        let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
        assert_eq!(v["activations"], serde_json::json!(["gelu", "relu"]));
        assert_eq!(v["layers"], serde_json::json!([4, 5, 4, 3]));
    }
}

#[test]
fn json_line_has_every_key_and_human_summary_reads_well() {
    let dir = temp();
    let mlp = model(true);
    let files = write_problem(dir.path(), &mlp);
    let out = dir.path().join("F.safetensors");
    let args = [
        "compute", "--weights", s(&files.weights), "--activation", "tanh", "--inputs", s(&files.inputs), "--labels",
        s(&files.labels), "--form", "diag", "--backend", "cpu", "--out", s(&out), "--verify", "--force",
    ];
    let run = fisher(&[&args[..], &["--json"]].concat());
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.stdout.lines().count(), 1, "one JSON line: {}", run.stdout);
    let v: serde_json::Value = serde_json::from_str(&run.stdout).expect("valid JSON");
    assert_eq!(v["parameters"], 51);
    assert_eq!(v["samples"], N);
    assert_eq!(v["layers"], serde_json::json!([4, 6, 3]));
    assert_eq!(v["variant"], "true");
    assert_eq!(v["likelihood"], "categorical");
    assert_eq!(v["form"], "diag");
    assert!(v["backend"].as_str().unwrap().starts_with("cpu"), "{v}");
    assert_eq!(v["out"], s(&out));
    assert_eq!(v["tensors"], serde_json::json!([{"name": "diag", "shape": [51]}]));
    for stage in ["load", "compute", "verify", "write"] {
        assert!(v["seconds"][stage].as_f64().is_some_and(|t| t >= 0.0), "seconds.{stage} in {v}");
    }
    for key in ["max_abs", "max_rel", "frobenius_rel"] {
        let x = v["verification"][key].as_f64().unwrap_or_else(|| panic!("verification.{key} in {v}"));
        assert!((0.0..=FROBENIUS_REL).contains(&x), "verification.{key} = {x}");
    }
    assert_eq!(v["verification"]["passed"], true);
    // tr F agrees with the reference.
    let NetFisher::Diagonal(d) =
        reference::fisher(&mlp, &dataset(), Likelihood::Categorical, Variant::True, NetForm::Diagonal).unwrap()
    else {
        unreachable!()
    };
    let trace: f64 = d.sum();
    assert!((v["trace"].as_f64().unwrap() - trace).abs() <= 1e-5 * trace, "{v} vs {trace}");

    let human = fisher(&args);
    assert_eq!(human.code, 0, "{}", human.stderr);
    for needle in ["4-6-3 tanh MLP", "P = 51", "N = 23", "true", "tr F", "PASS", "wrote", "seconds"] {
        assert!(human.stdout.contains(needle), "{needle:?} missing from:\n{}", human.stdout);
    }
    let quiet = fisher(&[&args[..], &["--quiet"]].concat());
    assert_eq!(quiet.code, 0, "{}", quiet.stderr);
    assert!(quiet.stdout.is_empty(), "{}", quiet.stdout);
}

#[test]
fn synthetic_model_saved_files_give_the_same_result() {
    let dir = temp();
    let data_dir = dir.path().join("data");
    let model_path = dir.path().join("m.safetensors");
    let direct = dir.path().join("direct.safetensors");
    let synthetic = [
        "compute", "--synthetic-model", "6,5,4", "--synthetic-samples", "37", "--synthetic-seed", "3", "--activation",
        "relu",
    ];
    // Only saving (no --form, no --out).
    let run = fisher(&[&synthetic[..], &["--save-model", s(&model_path), "--save-data", s(&data_dir)]].concat());
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains("fisher compute --weights"), "{}", run.stdout);
    assert_dir_holds(&data_dir, &["inputs.npy", "labels.npy"]);
    // Computing from the synthetic problem directly and from its files.
    let run = fisher(&[&synthetic[..], &["--form", "kfac", "--backend", "cpu", "--out", s(&direct), "--json"]].concat());
    assert_eq!(run.code, 0, "{}", run.stderr);
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(v["layers"], serde_json::json!([6, 5, 4]));
    assert_eq!(v["layer_indices"], serde_json::json!([0, 2]));
    let from_files = dir.path().join("files.safetensors");
    let run = fisher(&[
        "compute", "--weights", s(&model_path), "--activation", "relu", "--inputs", s(&data_dir.join("inputs.npy")),
        "--labels", s(&data_dir.join("labels.npy")), "--form", "kfac", "--backend", "cpu", "--out", s(&from_files),
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let (a, b) = (read_safetensors(&direct), read_safetensors(&from_files));
    assert_eq!(a.names(), ["kfac.0.A", "kfac.0.G", "kfac.2.A", "kfac.2.G"]);
    assert_eq!(a.tensors, b.tensors, "the saved files are the synthetic problem");
    // The saved files load as a model and data that fit each other.
    let mlp = Mlp::from_safetensors(&model_path, &Activation::Relu.into()).unwrap();
    let data =
        Dataset::from_npy(&data_dir.join("inputs.npy"), &data_dir.join("labels.npy"), Likelihood::Categorical).unwrap();
    data.validate(&mlp, Likelihood::Categorical).unwrap();
    assert_eq!((mlp.input_dim(), mlp.output_dim(), data.len()), (6, 4, 37));
    assert_matches_reference(&b, &mlp, &data, Likelihood::Categorical, Variant::True, NetForm::Kfac);
}

// ---------------------------------------------------------------------------------------
// Bad input: one line naming the culprit, exit 2, nothing written.

/// Runs `compute` on the given files with `extra` flags, expecting exit `code`, the
/// `needles` in the message, and `dir` unchanged.
#[track_caller]
fn assert_refused(dir: &Path, files: [&Path; 3], activation: &str, extra: &[&str], code: i32, needles: &[&str]) {
    let before = names_in(dir);
    let out = dir.join("F.safetensors");
    let mut args = vec![
        "compute", "--weights", s(files[0]), "--activation", activation, "--inputs", s(files[1]), "--labels",
        s(files[2]), "--backend", "cpu",
    ];
    if !extra.contains(&"--out") {
        args.extend_from_slice(&["--out", s(&out)]);
    }
    if !extra.contains(&"--form") {
        args.extend_from_slice(&["--form", "diag"]);
    }
    args.extend_from_slice(extra);
    let run = fisher(&args);
    assert_fails(&run, code, needles);
    let names: Vec<&str> = before.iter().map(String::as_str).collect();
    assert_dir_holds(dir, &names);
}

#[test]
fn bad_data_is_refused_naming_the_row_or_file() {
    let dir = temp();
    let d = dir.path();
    let mlp = model(true);
    let files = write_problem(d, &mlp);
    let (w, x, y) = (files.weights.as_path(), files.inputs.as_path(), files.labels.as_path());

    // Label out of range (3 classes), at row 5.
    let mut bad = labels(N);
    bad[5] = 3;
    let y_range = d.join("y_range.npy");
    write_npy_labels(&y_range, &bad).unwrap();
    assert_refused(d, [w, x, &y_range], "tanh", &[], 2, &["label 3 at row 5", "out of range", "y_range.npy"]);

    // N mismatch.
    let y_short = d.join("y_short.npy");
    write_npy_labels(&y_short, &labels(N - 1)).unwrap();
    assert_refused(d, [w, x, &y_short], "tanh", &[], 2, &["23 rows", "22", "y_short.npy"]);

    // Wrong input width.
    let x_wide = d.join("x_wide.npy");
    write_npy_matrix(&x_wide, inputs(N, 5).view()).unwrap();
    assert_refused(d, [w, &x_wide, y], "tanh", &[], 2, &["5 columns", "0.weight", "expects 4"]);

    // Inf in the inputs (row 7, column 2).
    let mut values = inputs(N, 4);
    values[[7, 2]] = f32::INFINITY;
    let x_inf = d.join("x_inf.npy");
    write_npy_matrix(&x_inf, values.view()).unwrap();
    assert_refused(d, [w, &x_inf, y], "tanh", &[], 2, &["inf", "row 7, column 2", "x_inf.npy"]);

    // Float labels for the categorical likelihood.
    let y_float = d.join("y_float.npy");
    write_npy_matrix(&y_float, Array2::<f32>::zeros((N, 1)).view()).unwrap();
    assert_refused(d, [w, x, &y_float], "tanh", &[], 2, &["y_float.npy", "integer class"]);

    // Missing files.
    let nowhere = d.join("nowhere.npy");
    assert_refused(d, [w, &nowhere, y], "tanh", &[], 2, &["nowhere.npy"]);
    assert_refused(d, [w, x, &nowhere], "tanh", &[], 2, &["nowhere.npy"]);
    let no_model = d.join("no_model.safetensors");
    assert_refused(d, [&no_model, x, y], "tanh", &[], 2, &["no_model.safetensors"]);
}

#[test]
fn bad_models_and_activations_are_refused_naming_the_key() {
    let dir = temp();
    let d = dir.path();
    let mlp = model(true);
    let files = write_problem(d, &mlp);
    let (x, y) = (files.inputs.as_path(), files.labels.as_path());
    let dict = state_dict(&mlp);

    // NaN in a weight: named with its key and flat index.
    let mut nan = dict.clone();
    nan[2].2[7] = f32::NAN; // 2.weight, row 1 column 1
    let w_nan = d.join("w_nan.safetensors");
    write_dict(&w_nan, &nan);
    assert_refused(d, [&w_nan, x, y], "tanh", &[], 2, &["NaN", "'2.weight'", "flat index 7", "w_nan.safetensors"]);

    // An extra key (a BatchNorm buffer).
    let mut extra = dict.clone();
    extra.push(("0.running_mean".into(), vec![6], vec![0.0; 6]));
    let w_extra = d.join("w_extra.safetensors");
    write_dict(&w_extra, &extra);
    assert_refused(d, [&w_extra, x, y], "tanh", &[], 2, &["'0.running_mean'", "unrecognized key"]);

    // A missing weight (its bias left alone).
    let missing_weight: Vec<_> = dict.iter().filter(|(k, _, _)| k != "2.weight").cloned().collect();
    let w_missing = d.join("w_missing.safetensors");
    write_dict(&w_missing, &missing_weight);
    assert_refused(d, [&w_missing, x, y], "tanh", &[], 2, &["'2.bias'", "2.weight", "missing"]);

    // A missing middle layer: the chain breaks (4 → 6, then 6 → ... missing).
    let mut three = dict.clone();
    three.push(("4.weight".into(), vec![3, 3], vec![0.1; 9]));
    let middle_missing: Vec<_> = three.iter().filter(|(k, _, _)| !k.starts_with("2.")).cloned().collect();
    let w_gap = d.join("w_gap.safetensors");
    write_dict(&w_gap, &middle_missing);
    assert_refused(d, [&w_gap, x, y], "tanh", &[], 2, &["4.weight", "expects 3 inputs", "produces 6"]);

    // Unknown activation; wrong number of activations in a JSON spec (inline and in a file).
    let w = files.weights.as_path();
    assert_refused(d, [w, x, y], "swish", &[], 2, &["--activation", "unknown activation 'swish'"]);
    assert_refused(d, [w, x, y], r#"["tanh","relu"]"#, &[], 2, &["2 activation(s)", "needs exactly 1"]);
    assert_refused(d, [w, x, y], r#"["tanh","swish"]"#, &[], 2, &["swish"]);
    let spec = d.join("spec.json");
    std::fs::write(&spec, r#"["tanh", "tanh", "tanh"]"#).unwrap();
    assert_refused(d, [w, x, y], s(&spec), &[], 2, &["3 activation(s)", "needs exactly 1"]);
}

#[test]
fn bad_flags_are_refused() {
    let dir = temp();
    let d = dir.path();
    let files = write_problem(d, &model(true));
    let f = [files.weights.as_path(), files.inputs.as_path(), files.labels.as_path()];

    assert_refused(d, f, "tanh", &["--variant", "mc", "--mc-samples", "0"], 2, &["--mc-samples must be at least 1"]);
    assert_refused(d, f, "tanh", &["--mc-samples", "4"], 2, &["--mc-samples only applies to --variant mc"]);
    assert_refused(d, f, "tanh", &["--variant", "true", "--seed", "4"], 2, &["--seed only applies to --variant mc"]);
    assert_refused(d, f, "tanh", &["--variant", "empirical", "--seed", "4"], 2, &["--seed only applies"]);
    assert_refused(d, f, "tanh", &["--form", "hessian"], 2, &["hessian"]);
    assert_refused(d, f, "tanh", &["--variant", "exact"], 2, &["exact"]);
    assert_refused(d, f, "tanh", &["--adapter", "llvm"], 2, &["--adapter", "--backend cpu"]);
    assert_refused(d, f, "tanh", &["--save-model", "m2.safetensors"], 2, &["--save-model only applies to --synthetic-model"]);
    // Output directory missing.
    let deep = d.join("no/such/dir/F.safetensors");
    assert_refused(d, f, "tanh", &["--out", s(&deep)], 2, &["no/such/dir", "does not exist"]);
    assert!(!d.join("no").exists());
    // Missing --out / --form.
    let run = fisher(&[
        "compute", "--weights", s(f[0]), "--activation", "tanh", "--inputs", s(f[1]), "--labels", s(f[2]), "--form",
        "diag",
    ]);
    assert_fails(&run, 2, &["--out"]);
    let run = fisher(&["compute", "--weights", s(f[0]), "--activation", "tanh", "--inputs", s(f[1]), "--form", "diag"]);
    assert_fails(&run, 2, &["--labels"]);
    // Synthetic flags mixed with files.
    let run = fisher(&[
        "compute", "--weights", s(f[0]), "--synthetic-model", "4,3", "--synthetic-samples", "5", "--activation",
        "tanh", "--form", "diag", "--out", "F.safetensors",
    ]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    let run = fisher(&["compute", "--synthetic-model", "4,0", "--synthetic-samples", "5", "--activation", "tanh"]);
    assert_fails(&run, 2, &["--synthetic-model '4,0'"]);
    assert_dir_holds(d, &["m.safetensors", "x.npy", "y.npy"]);
}

#[test]
fn results_too_large_for_host_memory_are_refused_before_computing() {
    let dir = temp();
    let d = dir.path();
    let files = write_problem(d, &model(true));
    let f = [files.weights.as_path(), files.inputs.as_path(), files.labels.as_path()];
    // grads of this problem are 69×51 floats (14 KiB): over a 1 KiB limit.
    assert_refused(
        d,
        f,
        "tanh",
        &["--form", "grads", "--max-result-gib", "0.000001"],
        2,
        &["--form grads", "N·R×P = 23·3×51", "--max-result-gib", "--form norms"],
    );
    // The same for full with --verify (the f64 reference counts too).
    assert_refused(d, f, "tanh", &["--form", "full", "--max-result-gib", "0.00002", "--verify"], 2, &["P×P = 51×51", "f64 reference"]);
    // Under the default 2 GiB: grads of a 784-512-512-10 model for 100 samples of `true`
    // (100·10 rows × 669,706 parameters, 2.5 GiB) — refused at once, without computing.
    let out = d.join("G.safetensors");
    let started = std::time::Instant::now();
    let run = fisher(&[
        "compute", "--synthetic-model", "784,512,512,10", "--synthetic-samples", "100", "--activation", "relu", "--form",
        "grads", "--backend", "cpu", "--out", s(&out),
    ]);
    assert_fails(&run, 2, &["N·R×P = 100·10×669706", "2.5 GiB", "beyond the --max-result-gib limit of 2.0 GiB"]);
    assert!(started.elapsed().as_secs_f64() < 10.0, "refused only after {:?}", started.elapsed());
    assert!(!out.exists());
    // Diag of the same model is small and allowed (a quick run on 8 samples).
    let diag = d.join("D.safetensors");
    let run = fisher(&[
        "compute", "--synthetic-model", "784,512,512,10", "--synthetic-samples", "8", "--activation", "relu", "--form",
        "diag", "--backend", "cpu", "--out", s(&diag), "--json",
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(read_safetensors(&diag).tensors["diag"].0, [669_706]);
}
