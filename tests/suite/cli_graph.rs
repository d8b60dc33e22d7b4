//! `fisher compute|report|action --model M.onnx` end to end, through the binary, on the
//! PyTorch-exported fixtures (`tests/fixtures/onnx/<case>/`, see `graph_fixtures`):
//!
//! * `compute --form diag` writes `diag.<name>` shaped like each parameter, equal to the
//!   fixture's `torch.func` diagonals (BatchNorm included), true and empirical, CPU and GPU;
//! * `--params REGEX` restricts the result to the matching parameters; a regex matching
//!   nothing, or an invalid one, is a usage error;
//! * `--form layer` and `--form kfac` write per-module tensors, checked against the fixture,
//!   and pass `--verify`; KFAC of a grouped convolution is refused;
//! * `report --model` (implicit and diag) and `action --model` with state-dict checkpoints;
//! * refusals as a hostile user would provoke them: data that does not fit the graph, bad
//!   tokens and labels, flags that do not apply, damaged or unsupported ONNX files, a
//!   missing external-data file, an output that is an input. Each: the exit status, one
//!   `fisher: error:` line with the essential words, and no output file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use fisher_engine::graph::fisher::GraphModel;
use fisher_engine::graph::onnx::proto::ModelProto;
use fisher_engine::model::Dataset;
use prost::Message;
use safetensors::Dtype;

use super::graph_fixtures::{case_dir, reference};
use crate::common::backend_test;
use crate::common::cli::{
    assert_dir_holds, assert_fails, f32_bytes, fisher, json, read_safetensors, s, succeeds, temp,
    write_raw_npy, write_raw_safetensors, Run, Saved,
};

// ---------------------------------------------------------------------------------------
// Fixtures and helpers

/// The model, inputs and labels of a fixture case.
struct Case {
    model: PathBuf,
    x: PathBuf,
    y: PathBuf,
}

fn case(name: &str) -> Case {
    let dir = case_dir(name);
    Case { model: dir.join("model.onnx"), x: dir.join("x.npy"), y: dir.join("y.npy") }
}

/// `fisher <command> --model … --inputs … --labels …` followed by `extra`.
fn with_model(command: &str, c: &Case, extra: &[&str]) -> Run {
    let mut args = vec![command, "--model", s(&c.model), "--inputs", s(&c.x), "--labels", s(&c.y)];
    args.extend_from_slice(extra);
    fisher(&args)
}

/// The case as `fisher compute --model` loads it (the graph, θ, the data).
fn load(name: &str) -> (GraphModel, Dataset) {
    let (model, data, _, _) = super::graph_fixtures::load(name);
    (model, data)
}

/// A JSON list in the metadata.
fn names(saved: &Saved, key: &str) -> Vec<String> {
    serde_json::from_str(&saved.metadata[key]).unwrap_or_else(|e| panic!("metadata {key}: {e}"))
}

/// max|a − b| / max|b| of an f32 result against an f64 reference.
fn max_rel(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
    got.iter().zip(want).fold(0f64, |m, (&g, w)| m.max((f64::from(g) - w).abs())) / scale.max(f64::MIN_POSITIVE)
}

/// Asserts that `got` (f32) equals `want` (f64) within `rel` of max|want|.
#[track_caller]
fn assert_close(got: &[f32], want: &[f64], rel: f64, what: &str) {
    let r = max_rel(got, want);
    assert!(r <= rel, "{what}: max|Δ|/max|ref| = {r:e} > {rel:e}");
}

/// The fixture's parameter names and shapes (from its metadata, written by PyTorch).
fn fixture_params(name: &str) -> Vec<(String, Vec<usize>)> {
    let r = reference(name);
    let names: Vec<String> = serde_json::from_str(&r.metadata["parameter_names"]).unwrap();
    let shapes: Vec<Vec<usize>> = serde_json::from_str(&r.metadata["parameter_shapes"]).unwrap();
    names.into_iter().zip(shapes).collect()
}

/// Copies the files of a case into `dir` (model.onnx, model.onnx.data, x.npy, y.npy).
fn copy_case(name: &str, dir: &Path) -> Case {
    for f in ["model.onnx", "model.onnx.data", "x.npy", "y.npy"] {
        std::fs::copy(case_dir(name).join(f), dir.join(f)).unwrap();
    }
    Case { model: dir.join("model.onnx"), x: dir.join("x.npy"), y: dir.join("y.npy") }
}

/// A numpy shape tuple of `(n, rest…)`.
fn shape_tuple(shape: &[usize]) -> String {
    crate::common::cli::npy_shape(shape)
}

/// int64 bytes.
fn i64_bytes(values: &[i64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Asserts a refusal: exit `code`, one error line with every needle, nothing on stdout,
/// and `dir` holding exactly `files` afterwards (no output, no temporary file).
#[track_caller]
fn refused(run: &Run, code: i32, needles: &[&str], dir: &Path, files: &[&str]) {
    assert_fails(run, code, needles);
    assert_dir_holds(dir, files);
}

// ---------------------------------------------------------------------------------------
// compute --model: values against the fixtures

backend_test!(diag_per_parameter_equals_torch_func, |backend: &str| {
    for name in ["cnn_bn", "embed", "convs"] {
        let c = case(name);
        let r = reference(name);
        let params = fixture_params(name);
        for variant in ["true", "empirical"] {
            let dir = temp();
            let out = dir.path().join("F.safetensors");
            let run = with_model("compute", &c, &["--variant", variant, "--form", "diag", "--backend", backend, "--out", s(&out)]);
            succeeds(&run);
            let saved = read_safetensors(&out);
            // Names and shapes as PyTorch's named_parameters() lists them.
            let expected_names: Vec<String> = params.iter().map(|p| p.0.clone()).collect();
            assert_eq!(names(&saved, "parameter_names"), expected_names, "{name}");
            let shapes: Vec<Vec<usize>> = serde_json::from_str(&saved.metadata["parameter_shapes"]).unwrap();
            assert_eq!(shapes, params.iter().map(|p| p.1.clone()).collect::<Vec<_>>(), "{name}");
            assert_eq!(saved.metadata["form"], "diag");
            assert_eq!(saved.metadata["variant"], variant);
            assert_eq!(saved.metadata["samples"], "6");
            let mut expected_tensors: Vec<String> = params.iter().map(|p| format!("diag.{}", p.0)).collect();
            expected_tensors.push("diag".into());
            expected_tensors.sort();
            assert_eq!(saved.names(), expected_tensors, "{name}");
            // Each parameter's diagonal, shaped like it, equals torch.func's (1e-5 relative
            // to that tensor's largest entry: BatchNorm's few values are judged on their own).
            for (pname, shape) in &params {
                let (got_shape, got) = &saved.tensors[&format!("diag.{pname}")];
                assert_eq!(got_shape, shape, "{name} diag.{pname}");
                let (_, want) = &r.tensors[&format!("diag.{variant}.{pname}")];
                assert_close(got, want, 1e-5, &format!("{name} {backend} {variant} diag.{pname}"));
            }
            assert_close(&saved.vector("diag").to_vec(), &r.tensors[&format!("diag.{variant}")].1, 1e-5, name);
            assert!(saved.metadata["backend"].starts_with(backend), "{}", saved.metadata["backend"]);
        }
    }
});

backend_test!(params_restricts_the_result_to_matching_parameters, |backend: &str| {
    let c = case("cnn_bn");
    let r = reference("cnn_bn");
    let dir = temp();

    // The last layer only (last-layer Laplace): diag.
    let out = dir.path().join("last.safetensors");
    succeeds(&with_model("compute", &c, &["--params", r"^10\.", "--form", "diag", "--backend", backend, "--out", s(&out)]));
    let saved = read_safetensors(&out);
    assert_eq!(names(&saved, "parameter_names"), ["10.weight", "10.bias"]);
    assert_eq!(saved.metadata["parameters"], "90");
    assert_eq!(saved.names(), ["diag", "diag.10.bias", "diag.10.weight"]);
    assert_eq!(saved.tensors["diag.10.weight"].0, [10, 8]);
    assert_close(&saved.tensors["diag.10.weight"].1, &r.tensors["diag.true.10.weight"].1, 1e-5, "diag.10.weight");
    assert_close(&saved.tensors["diag.10.bias"].1, &r.tensors["diag.true.10.bias"].1, 1e-5, "diag.10.bias");
    // The whole-model diag's slice: the last 90 of the 726 entries.
    assert_close(&saved.vector("diag").to_vec(), &r.tensors["diag.true"].1[726 - 90..], 1e-5, "diag slice");

    // Full F over the selection (verified): its diagonal is the same slice.
    let out = dir.path().join("full.safetensors");
    let run = with_model("compute", &c, &["--params", r"^10\.", "--form", "full", "--verify", "--backend", backend, "--out", s(&out), "--json"]);
    let v = json(&run);
    assert_eq!(v["parameters"], 90);
    assert_eq!(v["parameter_names"], serde_json::json!(["10.weight", "10.bias"]));
    let f = read_safetensors(&out).matrix("fisher");
    assert_eq!(f.dim(), (90, 90));
    assert_close(&f.diag().to_vec(), &r.tensors["diag.true"].1[726 - 90..], 1e-5, "diag of the selected F");

    // A pattern in the middle of the model picks non-adjacent tensors: BatchNorm scales only.
    let out = dir.path().join("bn.safetensors");
    succeeds(&with_model("compute", &c, &["--params", r"^[15]\.weight$", "--form", "diag", "--variant", "empirical", "--backend", backend, "--out", s(&out)]));
    let saved = read_safetensors(&out);
    assert_eq!(names(&saved, "parameter_names"), ["1.weight", "5.weight"]);
    assert_close(&saved.tensors["diag.1.weight"].1, &r.tensors["diag.empirical.1.weight"].1, 1e-5, "diag.1.weight");
    assert_close(&saved.tensors["diag.5.weight"].1, &r.tensors["diag.empirical.5.weight"].1, 1e-5, "diag.5.weight");
});

#[test]
fn the_batch_size_of_the_export_does_not_bind_the_data() {
    // The fixture was exported with a fixed batch of 6; the graph is per sample, so any N
    // works. The data twice over (N = 12) has the same F (a mean over samples); the first
    // 5 samples alone give another.
    let (_, data) = load("cnn_bn");
    let fisher_engine::model::Targets::Classes(labels) = &data.targets else { unreachable!() };
    let r = reference("cnn_bn");
    let dir = temp();
    let x = data.inputs.as_slice().unwrap();
    let y: Vec<i64> = labels.iter().map(|&l| i64::from(l)).collect();
    let twice = Case { model: case("cnn_bn").model, x: dir.path().join("x12.npy"), y: dir.path().join("y12.npy") };
    write_raw_npy(&twice.x, "<f4", false, &shape_tuple(&[12, 3, 12, 12]), &f32_bytes(&[x, x].concat()));
    write_raw_npy(&twice.y, "<i8", false, &shape_tuple(&[12]), &i64_bytes(&[&y[..], &y[..]].concat()));
    let out = dir.path().join("F12.safetensors");
    succeeds(&with_model("compute", &twice, &["--form", "diag", "--variant", "empirical", "--backend", "cpu", "--out", s(&out)]));
    let saved = read_safetensors(&out);
    assert_eq!(saved.metadata["samples"], "12");
    assert_close(&saved.vector("diag").to_vec(), &r.tensors["diag.empirical"].1, 1e-5, "diag of the data twice over");

    let five = Case { model: case("cnn_bn").model, x: dir.path().join("x5.npy"), y: dir.path().join("y5.npy") };
    write_raw_npy(&five.x, "<f4", false, &shape_tuple(&[5, 3, 12, 12]), &f32_bytes(&x[..5 * 432]));
    write_raw_npy(&five.y, "<i8", false, &shape_tuple(&[5]), &i64_bytes(&y[..5]));
    let out = dir.path().join("F5.safetensors");
    succeeds(&with_model("compute", &five, &["--form", "diag", "--verify", "--backend", "cpu", "--out", s(&out)]));
    assert_eq!(read_safetensors(&out).metadata["samples"], "5");
}

#[test]
fn params_matching_nothing_or_invalid_is_a_usage_error() {
    let c = case("cnn_bn");
    let dir = temp();
    let out = dir.path().join("F.safetensors");
    let run = with_model("compute", &c, &["--params", "^fc\\.", "--form", "diag", "--backend", "cpu", "--out", s(&out)]);
    // The message lists every name, so the user can write the pattern.
    refused(&run, 2, &["--params", "^fc\\.", "matches no parameter", "0.weight", "1.bias", "10.weight", "10.bias"], dir.path(), &[]);
    let run = with_model("compute", &c, &["--params", "(unclosed", "--form", "diag", "--backend", "cpu", "--out", s(&out)]);
    refused(&run, 2, &["--params", "unclosed group"], dir.path(), &[]);
    // --params without --model.
    let run = fisher(&["compute", "--synthetic-model", "4,3", "--synthetic-samples", "5", "--activation", "tanh", "--params", "x", "--form", "diag", "--out", s(&out)]);
    refused(&run, 2, &["--params applies to --model"], dir.path(), &[]);
}

backend_test!(layer_and_kfac_forms_name_modules_and_verify, |backend: &str| {
    let c = case("cnn_bn");
    let r = reference("cnn_bn");
    let dir = temp();

    // Layer blocks: one per module (Conv, BatchNorm, Conv, BatchNorm, Linear), each the
    // dense block of its parameters; its diagonal is that module's slice of diag(F).
    let out = dir.path().join("layer.safetensors");
    succeeds(&with_model("compute", &c, &["--form", "layer", "--verify", "--backend", backend, "--out", s(&out)]));
    let saved = read_safetensors(&out);
    assert_eq!(names(&saved, "modules"), ["0", "1", "4", "5", "10"]);
    assert_eq!(saved.names(), ["block.0", "block.1", "block.10", "block.4", "block.5"]);
    let diag = &r.tensors["diag.true"].1;
    let mut at = 0;
    for (module, width) in [("0", 168), ("1", 12), ("4", 440), ("5", 16), ("10", 90)] {
        let block = saved.matrix(&format!("block.{module}"));
        assert_eq!(block.dim(), (width, width), "block.{module}");
        assert!(block == block.t(), "block.{module} is not exactly symmetric");
        assert_close(&block.diag().to_vec(), &diag[at..at + width], 1e-5, &format!("diag of block.{module}"));
        at += width;
    }
    assert_eq!(at, 726);

    // KFAC: one A, G pair per Conv/Linear; against curvlinops' KFACLinearOperator (type-2,
    // expand, reduction sum): A = S·A_c and G = G_c/(N·S), with S the weight-sharing positions.
    let out = dir.path().join("kfac.safetensors");
    succeeds(&with_model("compute", &c, &["--form", "kfac", "--verify", "--backend", backend, "--out", s(&out)]));
    let saved = read_safetensors(&out);
    assert_eq!(names(&saved, "kfac_modules"), ["0", "4", "10"]);
    assert_eq!(saved.names(), ["kfac.0.A", "kfac.0.G", "kfac.10.A", "kfac.10.G", "kfac.4.A", "kfac.4.G"]);
    let (model, data) = load("cnn_bn");
    let all = fisher_engine::graph::fisher::Selection::all(&model.graph);
    let sites = fisher_engine::graph::fisher::kfac_sites(&model, &all);
    let n = data.len() as f64;
    for (module, site) in &sites {
        let positions = model.program.kfac[*site].positions as f64;
        let a: Vec<f32> = saved.matrix(&format!("kfac.{module}.A")).iter().map(|&v| (f64::from(v) / positions) as f32).collect();
        let g: Vec<f32> = saved.matrix(&format!("kfac.{module}.G")).iter().map(|&v| (f64::from(v) * n * positions) as f32).collect();
        assert_close(&a, &r.tensors[&format!("kfac.{module}.A")].1, 1e-5, &format!("kfac.{module}.A"));
        assert_close(&g, &r.tensors[&format!("kfac.{module}.G")].1, 1e-5, &format!("kfac.{module}.G"));
    }
});

#[test]
fn kfac_of_a_grouped_convolution_is_refused() {
    let c = case("convs");
    let dir = temp();
    let out = dir.path().join("kfac.safetensors");
    for backend in ["cpu", "auto"] {
        let run = with_model("compute", &c, &["--form", "kfac", "--backend", backend, "--out", s(&out)]);
        refused(&run, 2, &["grouped"], dir.path(), &[]);
    }
    // The other forms of the same model work (here: layer, verified).
    succeeds(&with_model("compute", &c, &["--form", "layer", "--verify", "--backend", "cpu", "--out", s(&out)]));
}

// ---------------------------------------------------------------------------------------
// report --model and action --model

backend_test!(report_implicit_trace_matches_the_diagonal, |backend: &str| {
    let c = case("cnn_bn");
    let want: f64 = reference("cnn_bn").tensors["diag.true"].1.iter().sum();
    let small = ["--probes", "2", "--lanczos-steps", "16", "--coupling-probes", "2"];
    let mut args = vec!["--form", "implicit", "--top", "3", "--json", "--backend", backend];
    args.extend(small);
    let v = json(&with_model("report", &c, &args));
    assert_eq!(v["form"], "implicit");
    assert_eq!(v["parameters"], 726);
    assert_eq!(v["samples"], 6);
    assert_eq!(v["variant"], "true");
    let top: Vec<f64> = v["top_eigenvalues"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    assert_eq!(top.len(), 3);
    assert!(top.windows(2).all(|w| w[0] >= w[1]) && top[2] > 0.0, "{top:?}");
    // tr F of the implicit form is exact (the mean per-sample squared norm).
    crate::common::close(v["trace"].as_f64().unwrap(), want, 1e-5, "implicit tr F vs Σ diag (torch.func)");
    assert!(top[0] <= want, "λ_max {} > tr F {want}", top[0]);

    let v = json(&with_model("report", &c, &["--form", "diag", "--json", "--backend", backend]));
    assert_eq!(v["form"], "diag");
    crate::common::close(v["trace"].as_f64().unwrap(), want, 1e-5, "diag tr F vs Σ diag (torch.func)");

    // --only top: the same top eigenvalues (Lanczos on the graph's implicit F), nothing else.
    let only = json(&with_model("report", &c, &["--form", "implicit", "--top", "3", "--only", "top", "--json", "--backend", backend]));
    assert_eq!((only["only"].as_str(), only["top_method"].as_str(), only["parameters"].as_u64()), (Some("top"), Some("implicit"), Some(726)));
    assert!(only.get("trace").is_none(), "{only}");
    for (a, b) in only["top_eigenvalues"].as_array().unwrap().iter().zip(&top) {
        crate::common::close(a.as_f64().unwrap(), *b, 1e-6, "--only top vs the whole report's top eigenvalues");
    }
});

#[test]
fn report_refuses_what_does_not_apply_to_a_graph() {
    let c = case("cnn_bn");
    let dir = temp();
    let plot = dir.path().join("spectrum.png");
    let run = with_model("report", &c, &["--form", "kfac", "--backend", "cpu", "--plot", s(&plot)]);
    refused(&run, 2, &["--form kfac", "--model"], dir.path(), &[]);
    let run = with_model("report", &c, &["--activation", "relu", "--backend", "cpu", "--plot", s(&plot)]);
    refused(&run, 2, &["--activation", "--model"], dir.path(), &[]);
}

/// Writes the state dict `theta` (in the model's parameter order) to `path`, every key a
/// parameter name, skipping `leave_out`.
fn write_state_dict(path: &Path, model: &GraphModel, theta: &[f32], leave_out: Option<&str>) {
    let mut at = 0;
    let mut tensors = Vec::new();
    for p in &model.graph.params {
        let values = &theta[at..at + p.len()];
        at += p.len();
        if Some(p.name.as_str()) != leave_out {
            tensors.push((p.name.as_str(), Dtype::F32, p.shape.clone(), f32_bytes(values)));
        }
    }
    write_raw_safetensors(path, &tensors);
}

/// Three checkpoints along a seeded random walk from the fixture's θ.
fn walk(model: &GraphModel) -> Vec<Vec<f32>> {
    let mut rng = fisher_engine::synthetic::SplitMix64::new(9);
    let mut thetas = vec![model.graph.theta()];
    for _ in 0..2 {
        let last = thetas.last().unwrap();
        thetas.push(last.iter().map(|&v| v + (rng.normal() * 0.02) as f32).collect());
    }
    thetas
}

backend_test!(action_of_state_dict_checkpoints, |backend: &str| {
    let c = case("cnn_bn");
    let (model, data) = load("cnn_bn");
    let dir = temp();
    let thetas = walk(&model);
    let files: Vec<PathBuf> = ["a", "b", "c"].iter().map(|n| dir.path().join(format!("{n}.safetensors"))).collect();
    for (f, t) in files.iter().zip(&thetas) {
        write_state_dict(f, &model, t, None);
    }
    let plot = dir.path().join("action.png");
    let mut args = vec!["action", "--model", s(&c.model), "--checkpoints"];
    args.extend(files.iter().map(|f| s(f)));
    args.extend(["--inputs", s(&c.x), "--labels", s(&c.y), "--segments", "3", "--backend", backend, "--json", "--plot", s(&plot)]);
    let v = json(&fisher(&args));
    assert_eq!(v["checkpoints"], 3);
    assert_eq!(v["parameters"], 726);
    let action = v["action"].as_f64().unwrap();
    assert!(action > 0.0, "{v}");
    assert!(std::fs::read(&plot).unwrap().starts_with(crate::common::cli::PNG_SIGNATURE));

    // The same path measured in this process with the library (CPU): the same action.
    let paths: Vec<ndarray::Array1<f64>> = thetas.iter().map(|t| t.iter().map(|&x| f64::from(x)).collect()).collect();
    let want = fisher_engine::analysis::action::measure_graph(
        &crate::common::cpu_engine(),
        &model,
        &paths,
        &data,
        fisher_engine::model::Likelihood::Categorical,
        fisher_engine::fisher::Variant::True,
        3,
        &mut |_, _| {},
    )
    .unwrap();
    crate::common::close(action, want.action, 1e-4, "action (CLI vs library)");
    crate::common::close(v["length"].as_f64().unwrap(), want.length, 1e-4, "length (CLI vs library)");
    crate::common::close(v["chord"].as_f64().unwrap(), want.chord, 1e-4, "chord (CLI vs library)");
});

#[test]
fn action_refuses_a_checkpoint_missing_a_parameter() {
    let c = case("cnn_bn");
    let (model, _) = load("cnn_bn");
    let dir = temp();
    let thetas = walk(&model);
    write_state_dict(&dir.path().join("a.safetensors"), &model, &thetas[0], None);
    write_state_dict(&dir.path().join("b.safetensors"), &model, &thetas[1], Some("1.bias"));
    write_state_dict(&dir.path().join("c.safetensors"), &model, &thetas[2], None);
    let plot = dir.path().join("action.png");
    let files: Vec<String> = ["a", "b", "c"].iter().map(|n| dir.path().join(format!("{n}.safetensors")).display().to_string()).collect();
    let mut args = vec!["action", "--model", s(&c.model), "--checkpoints"];
    args.extend(files.iter().map(String::as_str));
    args.extend(["--inputs", s(&c.x), "--labels", s(&c.y), "--backend", "cpu", "--plot", s(&plot)]);
    let run = fisher(&args);
    // InvalidInput: exit 2 (src/cli/exit.rs), naming the file and the key.
    refused(&run, 2, &["b.safetensors", "'1.bias'"], dir.path(), &["a.safetensors", "b.safetensors", "c.safetensors"]);

    // A checkpoint whose tensor has the wrong shape.
    let mut tensors = Vec::new();
    for p in &model.graph.params {
        let shape = if p.name == "10.weight" { vec![8, 10] } else { p.shape.clone() };
        tensors.push((p.name.as_str(), Dtype::F32, shape, f32_bytes(&vec![0.1; p.len()])));
    }
    write_raw_safetensors(&dir.path().join("b.safetensors"), &tensors);
    let run = fisher(&args);
    refused(&run, 2, &["b.safetensors", "'10.weight'", "[8, 10]", "[10, 8]"], dir.path(), &["a.safetensors", "b.safetensors", "c.safetensors"]);

    // --activation does not apply to a graph.
    let mut with_activation = args.clone();
    with_activation.extend(["--activation", "relu"]);
    refused(&fisher(&with_activation), 2, &["--activation", "--model"], dir.path(), &["a.safetensors", "b.safetensors", "c.safetensors"]);
}

// ---------------------------------------------------------------------------------------
// Refusals of compute --model

#[test]
fn inputs_that_do_not_fit_the_graph_are_refused() {
    let dir = temp();
    let out = dir.path().join("F.safetensors");
    let (_, data) = load("cnn_bn");
    let compute = |c: &Case| with_model("compute", c, &["--form", "diag", "--backend", "cpu", "--out", s(&out)]);

    // Integer inputs to a float model.
    let x = dir.path().join("ints.npy");
    write_raw_npy(&x, "<i8", false, &shape_tuple(&[6, 3, 12, 12]), &i64_bytes(&vec![1; 6 * 432]));
    let run = compute(&Case { x: x.clone(), ..case("cnn_bn") });
    refused(&run, 2, &["ints.npy", "takes floats"], dir.path(), &["ints.npy"]);
    std::fs::remove_file(&x).unwrap();

    // NaN in the inputs.
    let x = dir.path().join("nan.npy");
    let mut values = data.inputs.as_slice().unwrap().to_vec();
    values[100] = f32::NAN;
    write_raw_npy(&x, "<f4", false, &shape_tuple(&[6, 3, 12, 12]), &f32_bytes(&values));
    let run = compute(&Case { x: x.clone(), ..case("cnn_bn") });
    refused(&run, 2, &["nan.npy", "NaN"], dir.path(), &["nan.npy"]);
    std::fs::remove_file(&x).unwrap();

    // Labels: out of range (10 classes), negative, too few, floats for a classifier.
    for (file, descr, shape, bytes, needles) in [
        ("y10.npy", "<i8", vec![6], i64_bytes(&[0, 1, 2, 10, 4, 5]), vec!["label 10", "out of range", "10 outputs"]),
        ("yneg.npy", "<i8", vec![6], i64_bytes(&[0, 1, 2, -1, 4, 5]), vec!["yneg.npy", "-1"]),
        ("y5.npy", "<i8", vec![5], i64_bytes(&[0, 1, 2, 3, 4]), vec!["5"]),
        ("yf.npy", "<f4", vec![6], f32_bytes(&[0.0; 6]), vec!["yf.npy"]),
    ] {
        let y = dir.path().join(file);
        write_raw_npy(&y, descr, false, &shape_tuple(&shape), &bytes);
        let run = compute(&Case { y: y.clone(), ..case("cnn_bn") });
        refused(&run, 2, &needles, dir.path(), &[file]);
        std::fs::remove_file(&y).unwrap();
    }
}

#[test]
fn inputs_of_another_per_sample_shape_are_refused_naming_the_file() {
    let dir = temp();
    let out = dir.path().join("F.safetensors");
    let (_, data) = load("cnn_bn");
    let compute = |c: &Case| with_model("compute", c, &["--form", "diag", "--backend", "cpu", "--out", s(&out)]);

    // Images of the wrong size: the per-sample shape disagrees with the graph's input.
    let x = dir.path().join("x11.npy");
    let values: Vec<f32> = data.inputs.iter().copied().take(6 * 3 * 11 * 11).collect();
    write_raw_npy(&x, "<f4", false, &shape_tuple(&[6, 3, 11, 11]), &f32_bytes(&values));
    let run = compute(&Case { x: x.clone(), ..case("cnn_bn") });
    refused(&run, 2, &["x11.npy", "[3, 11, 11]"], dir.path(), &["x11.npy"]);
    std::fs::remove_file(&x).unwrap();

    // The same values flattened (N × 432): right count, wrong rank.
    let x = dir.path().join("flat.npy");
    write_raw_npy(&x, "<f4", false, &shape_tuple(&[6, 432]), &f32_bytes(data.inputs.as_slice().unwrap()));
    let run = compute(&Case { x: x.clone(), ..case("cnn_bn") });
    refused(&run, 2, &["flat.npy", "[432]"], dir.path(), &["flat.npy"]);
    std::fs::remove_file(&x).unwrap();
}

#[test]
fn tokens_that_do_not_fit_the_embedding_are_refused() {
    let dir = temp();
    let out = dir.path().join("F.safetensors");
    let compute = |c: &Case| with_model("compute", c, &["--form", "diag", "--backend", "cpu", "--out", s(&out)]);

    // Float inputs to the embedding model (it takes int64 token indices).
    let x = dir.path().join("xf.npy");
    write_raw_npy(&x, "<f4", false, &shape_tuple(&[6, 7]), &f32_bytes(&[1.0; 42]));
    refused(&compute(&Case { x: x.clone(), ..case("embed") }), 2, &["xf.npy", "integer token"], dir.path(), &["xf.npy"]);
    std::fs::remove_file(&x).unwrap();

    // Tokens beyond the vocabulary (11 rows) and negative tokens: a data error, never a panic
    // or an out-of-bounds read.
    for (file, bad) in [("big.npy", 11i64), ("neg.npy", -1)] {
        let x = dir.path().join(file);
        let mut tokens = vec![3i64; 42];
        tokens[9] = bad;
        write_raw_npy(&x, "<i8", false, &shape_tuple(&[6, 7]), &i64_bytes(&tokens));
        let run = compute(&Case { x: x.clone(), ..case("embed") });
        refused(&run, 2, &[&bad.to_string()], dir.path(), &[file]);
        std::fs::remove_file(&x).unwrap();
    }
}

#[test]
fn flags_that_do_not_apply_to_a_graph_are_usage_errors() {
    let c = case("cnn_bn");
    let dir = temp();
    let out = dir.path().join("F.safetensors");
    let o = s(&out);
    for (extra, needles) in [
        (vec!["--activation", "relu", "--form", "diag", "--out", o], vec!["--activation", "--model"]),
        (vec!["--save-model", o, "--form", "diag", "--out", o], vec!["--save-model", "--model"]),
        (vec!["--out", o], vec!["--form"]),
        (vec!["--form", "diag"], vec!["--out"]),
    ] {
        refused(&with_model("compute", &c, &extra), 2, &needles, dir.path(), &[]);
    }
    // --model with --weights: clap refuses the combination (exit 2).
    let run = fisher(&["compute", "--model", s(&c.model), "--weights", s(&c.model), "--inputs", s(&c.x), "--labels", s(&c.y), "--form", "diag", "--out", o]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    // --model without labels.
    let run = fisher(&["compute", "--model", s(&c.model), "--inputs", s(&c.x), "--form", "diag", "--out", o]);
    refused(&run, 2, &["--labels"], dir.path(), &[]);
}

#[test]
fn a_truncated_model_is_refused_in_one_line() {
    let dir = temp();
    let c = copy_case("cnn_bn", dir.path());
    let bytes = std::fs::read(&c.model).unwrap();
    let out = dir.path().join("F.safetensors");
    let files = ["model.onnx", "model.onnx.data", "x.npy", "y.npy"];
    for cut in [bytes.len() / 2, bytes.len() - 1, 7] {
        std::fs::write(&c.model, &bytes[..cut]).unwrap();
        let run = with_model("compute", &c, &["--form", "diag", "--backend", "cpu", "--out", s(&out)]);
        refused(&run, 2, &["model.onnx"], dir.path(), &files);
    }
    // An empty file.
    std::fs::write(&c.model, b"").unwrap();
    refused(&with_model("compute", &c, &["--form", "diag", "--backend", "cpu", "--out", s(&out)]), 2, &["model.onnx"], dir.path(), &files);
}

#[test]
fn a_truncated_external_data_file_is_refused() {
    let dir = temp();
    let c = copy_case("cnn_bn", dir.path());
    let data = dir.path().join("model.onnx.data");
    let bytes = std::fs::read(&data).unwrap();
    std::fs::write(&data, &bytes[..bytes.len() - 4]).unwrap();
    let out = dir.path().join("F.safetensors");
    let run = with_model("compute", &c, &["--form", "diag", "--backend", "cpu", "--out", s(&out)]);
    refused(&run, 2, &["model.onnx.data"], dir.path(), &["model.onnx", "model.onnx.data", "x.npy", "y.npy"]);
}

#[test]
fn a_missing_external_data_file_is_refused() {
    let dir = temp();
    let c = copy_case("cnn_bn", dir.path());
    std::fs::remove_file(dir.path().join("model.onnx.data")).unwrap();
    let out = dir.path().join("F.safetensors");
    let run = with_model("compute", &c, &["--form", "diag", "--backend", "cpu", "--out", s(&out)]);
    refused(&run, 2, &["model.onnx.data"], dir.path(), &["model.onnx", "x.npy", "y.npy"]);
    // report and action read the same model the same way.
    let run = with_model("report", &c, &["--form", "diag", "--backend", "cpu"]);
    assert_fails(&run, 2, &["model.onnx.data"]);
}

/// The fixture's ONNX model, decoded, changed by `edit`, and written into `dir` (with its
/// external data) as `model.onnx`.
fn edited_model(dir: &Path, edit: impl FnOnce(&mut ModelProto)) -> Case {
    let c = copy_case("cnn_bn", dir);
    let mut proto = ModelProto::decode(std::fs::read(&c.model).unwrap().as_slice()).unwrap();
    edit(&mut proto);
    std::fs::write(&c.model, proto.encode_to_vec()).unwrap();
    c
}

#[test]
fn an_unsupported_operator_is_named_with_the_supported_list() {
    let dir = temp();
    let mut node_name = String::new();
    let c = edited_model(dir.path(), |m| {
        let node = m.graph.as_mut().unwrap().node.iter_mut().find(|n| n.op_type == "Relu").unwrap();
        node.op_type = "Celu".into();
        node_name = node.name.clone();
    });
    assert!(!node_name.is_empty());
    let out = dir.path().join("F.safetensors");
    let run = with_model("compute", &c, &["--form", "diag", "--backend", "cpu", "--out", s(&out)]);
    let files = ["model.onnx", "model.onnx.data", "x.npy", "y.npy"];
    refused(&run, 2, &["model.onnx", &node_name, "Celu", "supported", "BatchNormalization", "Relu", "Tanh"], dir.path(), &files);

    // An operator of another domain, with a supported name, is not the standard one.
    let c = edited_model(dir.path(), |m| {
        let node = m.graph.as_mut().unwrap().node.iter_mut().find(|n| n.op_type == "Relu").unwrap();
        node.domain = "com.example".into();
    });
    let run = with_model("compute", &c, &["--form", "diag", "--backend", "cpu", "--out", s(&out)]);
    refused(&run, 2, &["model.onnx", "com.example"], dir.path(), &files);
}

#[test]
fn an_output_that_is_an_input_is_refused() {
    let dir = temp();
    let c = copy_case("cnn_bn", dir.path());
    let files = ["model.onnx", "model.onnx.data", "x.npy", "y.npy"];
    let before: HashMap<&str, Vec<u8>> = files.iter().map(|f| (*f, std::fs::read(dir.path().join(f)).unwrap())).collect();
    for (target, flag) in [(&c.x, "--inputs"), (&c.y, "--labels"), (&c.model, "--model")] {
        // --force replaces outputs, never inputs.
        let run = with_model("compute", &c, &["--form", "diag", "--backend", "cpu", "--force", "--out", s(target)]);
        refused(&run, 2, &[flag], dir.path(), &files);
        // Another spelling of the same file.
        let other = dir.path().join(".").join(target.file_name().unwrap());
        let run = with_model("compute", &c, &["--form", "diag", "--backend", "cpu", "--force", "--out", s(&other)]);
        refused(&run, 2, &[flag], dir.path(), &files);
    }
    for f in files {
        assert_eq!(std::fs::read(dir.path().join(f)).unwrap(), before[f], "{f} changed");
    }
}

#[test]
fn an_output_that_is_the_external_data_file_is_refused() {
    // The model's external data file is an input too: `--out model.onnx.data --force` must
    // not replace the weights the run reads.
    let dir = temp();
    let c = copy_case("cnn_bn", dir.path());
    let data = dir.path().join("model.onnx.data");
    let before = std::fs::read(&data).unwrap();
    let run = with_model("compute", &c, &["--form", "diag", "--backend", "cpu", "--force", "--out", s(&data)]);
    let after = std::fs::read(&data).unwrap();
    assert!(
        run.code == 2 && after == before,
        "--out model.onnx.data --force: exit {}, the data file {} (stderr: {})",
        run.code,
        if after == before { "kept" } else { "was overwritten" },
        run.stderr
    );
    assert_fails(&run, 2, &["model.onnx.data"]);
}

/// Reads a result back with the library's reader (which checks it for consistency: shapes
/// against the metadata, symmetry, a non-negative diagonal).
fn read_back(path: &Path) -> Result<fisher_engine::io::fisher_file::FisherFile, String> {
    fisher_engine::io::fisher_file::read(path).map_err(|e| e.to_string())
}

#[test]
fn graph_results_read_back() {
    // What `compute --model` writes, the crate reads: the same tensors and tr F.
    let dir = temp();
    // Layer and KFAC files of models with integer module names or with parameters outside
    // every KFAC layer have their own tests below.
    for (name, forms) in [
        ("cnn_bn", &["diag", "full", "grads", "norms"][..]),
        ("embed", &["diag", "full", "layer", "grads", "norms"][..]),
        ("mlp", &["diag", "full", "layer", "kfac", "grads", "norms"][..]),
    ] {
        let c = case(name);
        for &form in forms {
            let out = dir.path().join(format!("{name}-{form}.safetensors"));
            let run = with_model("compute", &c, &["--form", form, "--backend", "cpu", "--out", s(&out), "--json"]);
            let written = json(&run)["trace"].as_f64().unwrap();
            let file = read_back(&out).unwrap_or_else(|e| panic!("{name} --form {form}: {e}"));
            crate::common::close(file.trace(), written, 1e-6, &format!("{name} {form}: tr F read back"));
        }
    }
    // The stored forms that `report --fisher` analyses.
    for form in ["diag", "full"] {
        let v = json(&fisher(&["report", "--fisher", s(&dir.path().join(format!("cnn_bn-{form}.safetensors"))), "--json"]));
        crate::common::close(v["trace"].as_f64().unwrap(), reference("cnn_bn").tensors["diag.true"].1.iter().sum(), 1e-5, form);
    }
}

#[test]
fn layer_blocks_named_by_integer_modules_read_back() {
    let c = case("cnn_bn");
    let dir = temp();
    let out = dir.path().join("layer.safetensors");
    let v = json(&with_model("compute", &c, &["--form", "layer", "--backend", "cpu", "--out", s(&out), "--json"]));
    let file = read_back(&out).unwrap_or_else(|e| panic!("{e}"));
    crate::common::close(file.trace(), v["trace"].as_f64().unwrap(), 1e-6, "tr F read back");
    let shapes: Vec<Vec<usize>> = file.tensor_shapes().into_iter().map(|(_, shape)| shape).collect();
    assert_eq!(shapes, [vec![168, 168], vec![12, 12], vec![440, 440], vec![16, 16], vec![90, 90]]);
    // And `report --fisher` analyses it (exactly: the same trace).
    let r = json(&fisher(&["report", "--fisher", s(&out), "--json"]));
    crate::common::close(r["trace"].as_f64().unwrap(), v["trace"].as_f64().unwrap(), 1e-5, "report of the stored blocks");
}

#[test]
fn kfac_of_a_model_with_batchnorm_reads_back() {
    let c = case("cnn_bn");
    let dir = temp();
    let out = dir.path().join("kfac.safetensors");
    succeeds(&with_model("compute", &c, &["--form", "kfac", "--backend", "cpu", "--out", s(&out)]));
    read_back(&out).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn kfac_over_a_selection_reads_back() {
    // Whole layers selected: the file `compute` writes, the crate reads.
    let c = case("cnn_bn");
    let dir = temp();
    let out = dir.path().join("k.safetensors");
    succeeds(&with_model("compute", &c, &["--form", "kfac", "--params", r"^(4|10)\.", "--backend", "cpu", "--out", s(&out)]));
    let saved = read_safetensors(&out);
    assert_eq!(saved.names(), ["kfac.10.A", "kfac.10.G", "kfac.4.A", "kfac.4.G"]);
    assert_eq!(saved.metadata["parameters"], "530");
    read_back(&out).unwrap();
}

#[test]
fn kfac_of_a_weight_without_its_bias_is_refused_or_reads_back() {
    let c = case("cnn_bn");
    let dir = temp();
    let out = dir.path().join("k.safetensors");
    let run = with_model("compute", &c, &["--form", "kfac", "--params", r"^10\.weight$", "--backend", "cpu", "--out", s(&out)]);
    if run.code == 2 {
        // Refusing the selection is one consistent answer: nothing written.
        refused(&run, 2, &["--params", "kfac"], dir.path(), &[]);
        return;
    }
    succeeds(&run);
    // Otherwise the file must be one that the crate itself reads back.
    read_back(&out).unwrap_or_else(|e| panic!("{e}"));
}
