//! `fisher report` end to end: the exact forms against `analysis::measures_exact` on the f64
//! reference Fisher, the implicit form against the exact one (Lanczos top eigenvalues, SLQ
//! within its error bars), stored results (`--fisher`) against computing directly, the plot,
//! the table, a GPU run, and every bad input (message, exit status, no plot left behind).

use std::path::PathBuf;
use std::sync::OnceLock;

use fisher_engine::analysis::{measures_exact, ExplicitFisher, MeasureOptions, ParameterLayout};
use fisher_engine::model::{ActivationSpec, Dataset, Likelihood, Mlp};
use fisher_engine::fisher::{NetForm, Variant};
use serde_json::Value;

use crate::common::cli::{assert_dir_holds, assert_fails, fisher, json, names_in, s, succeeds, temp, Run, PNG_SIGNATURE};
use crate::common::{close, gpu_available, MEASURE_KEYS};

/// The model every test analyses: P = 12·9 + 4·13 = 160 parameters, N = 30 samples, true
/// Fisher with R = 4 rows per sample, so rank F ≤ N·R = 120 < P (a null space, as in large
/// networks).
const WIDTHS: &str = "8,12,4";
const SAMPLES: &str = "30";
const P: usize = 160;
/// α and λ on the scale of this spectrum (λ_max ≈ 1), so that the f32 rounding of F (≈10⁻⁷
/// of λ_max) moves the small-eigenvalue measures by well under 10⁻⁵ of themselves.
const ALPHA: f64 = 1e-2;
const DAMPING: f64 = 1e-2;

/// The keys the issue asks `--json` for: the measures, and N.
fn keys() -> impl Iterator<Item = &'static str> {
    MEASURE_KEYS.into_iter().chain(["samples"])
}

/// The model and data files, and stored results of `fisher compute`, shared by the tests.
struct Files {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    weights: PathBuf,
    inputs: PathBuf,
    labels: PathBuf,
}

impl Files {
    fn stored(&self, form: &str) -> PathBuf {
        self.dir.join(format!("F_{form}.safetensors"))
    }
}

fn files() -> &'static Files {
    static FILES: OnceLock<Files> = OnceLock::new();
    FILES.get_or_init(|| {
        let dir = temp();
        let path = dir.path().to_path_buf();
        let weights = path.join("M.safetensors");
        let data = path.join("data");
        succeeds(&fisher(&[
            "compute", "--synthetic-model", WIDTHS, "--synthetic-samples", SAMPLES, "--synthetic-seed", "5",
            "--activation", "tanh", "--save-model", s(&weights), "--save-data", s(&data), "--quiet",
        ]));
        let files =
            Files { _dir: dir, dir: path, weights, inputs: data.join("inputs.npy"), labels: data.join("labels.npy") };
        for form in ["full", "diag", "layer", "kfac", "norms"] {
            succeeds(&fisher(&[
                "compute", "--weights", s(&files.weights), "--activation", "tanh", "--inputs", s(&files.inputs),
                "--labels", s(&files.labels), "--backend", "cpu", "--form", form, "--out", s(&files.stored(form)),
                "--quiet",
            ]));
        }
        files
    })
}

/// `fisher report` on the shared model and data with `extra` flags.
fn report(extra: &[&str]) -> Run {
    let f = files();
    let mut args = vec![
        "report", "--weights", s(&f.weights), "--activation", "tanh", "--inputs", s(&f.inputs), "--labels",
        s(&f.labels),
    ];
    args.extend_from_slice(extra);
    fisher(&args)
}

fn num(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("{key} is not a number: {}", v[key]))
}

fn nums(v: &Value, key: &str) -> Vec<f64> {
    v[key].as_array().unwrap_or_else(|| panic!("{key} is not an array")).iter().map(|x| x.as_f64().unwrap()).collect()
}

#[test]
fn full_form_matches_the_exact_measures_of_the_f64_reference() {
    let f = files();
    let (alpha, damping) = (ALPHA.to_string(), DAMPING.to_string());
    let v = json(&report(&[
        "--form", "full", "--backend", "cpu", "--top", "6", "--alpha", &format!("{alpha},0.1"), "--damping", &damping,
        "--json",
    ]));
    for key in keys() {
        assert!(v.get(key).is_some_and(|x| !x.is_null()), "--json lacks {key}: {v}");
    }
    assert_eq!(v["parameters"], P);
    assert_eq!(v["samples"], 30);
    assert_eq!(v["form"], "full");
    assert_eq!(v["method"], "exact");
    assert_eq!(v["fv_products"], 0);
    assert!(v["backend"].as_str().unwrap().starts_with("cpu"), "{}", v["backend"]);
    assert_eq!(v["effective_dimensions"].as_array().unwrap().len(), 2);

    // The f64 reference Fisher, analysed with the same options by the library.
    let spec = ActivationSpec::parse("tanh").unwrap();
    let mlp = Mlp::from_safetensors(&f.weights, &spec).unwrap();
    let data = Dataset::from_npy(&f.inputs, &f.labels, Likelihood::Categorical).unwrap();
    let reference = fisher_engine::reference::network::fisher(&mlp, &data, Likelihood::Categorical, Variant::True, NetForm::Full).unwrap();
    let layout = ParameterLayout::from_mlp(&mlp).unwrap();
    let exact = ExplicitFisher::from_net(&reference, Some(&layout)).unwrap();
    let theta: Vec<f64> = mlp.parameters().iter().map(|&x| f64::from(x)).collect();
    let options = MeasureOptions {
        alpha: ALPHA,
        damping: DAMPING,
        top: 6,
        samples: Some(30),
        theta: Some(&theta),
        layout: Some(&layout),
        ..Default::default()
    };
    let m = measures_exact(&exact, &options).unwrap();
    let tol = 1e-5;
    close(num(&v, "trace"), m.trace, tol, "trace");
    close(num(&v, "frobenius"), m.frobenius, tol, "frobenius");
    for (got, want) in nums(&v, "top_eigenvalues").iter().zip(&m.top_eigenvalues) {
        close(*got, *want, tol, "top eigenvalue");
    }
    assert_eq!(nums(&v, "top_eigenvalues").len(), 6);
    close(num(&v, "logdet"), m.logdet, tol, "logdet");
    close(num(&v, "effective_dimension"), m.effective_dimension, tol, "d_eff");
    close(v["effective_dimensions"][0]["value"].as_f64().unwrap(), m.effective_dimension, tol, "d_eff[0]");
    let other = measures_exact(&exact, &MeasureOptions { alpha: 0.1, ..options.clone() }).unwrap();
    close(v["effective_dimensions"][1]["value"].as_f64().unwrap(), other.effective_dimension, tol, "d_eff(0.1)");
    close(num(&v, "abbas_effective_dimension"), m.abbas_effective_dimension.unwrap(), tol, "Abbas");
    close(num(&v, "fisher_rao_norm"), m.fisher_rao_norm.unwrap(), tol, "Fisher–Rao norm");
    close(num(&v, "condition_number"), m.condition_number.unwrap(), tol, "condition number");
    close(num(&v, "stable_rank"), m.stable_rank, tol, "stable rank");
    close(num(&v, "spectral_entropy"), m.spectral_entropy, tol, "spectral entropy");
    close(num(&v, "inter_layer_coupling"), m.inter_layer_coupling.unwrap(), tol, "inter-layer coupling");
    let units = nums(&v, "inter_unit_coupling");
    assert_eq!(units.len(), 2);
    for (got, want) in units.iter().zip(&m.inter_unit_coupling) {
        close(*got, want.unwrap(), tol, "inter-unit coupling");
    }
}

#[test]
fn implicit_form_agrees_with_the_exact_spectrum() {
    let damping = DAMPING.to_string();
    let alpha = ALPHA.to_string();
    let full = json(&report(&["--form", "full", "--backend", "cpu", "--top", "5", "--damping", &damping, "--alpha", &alpha, "--json"]));
    let implicit = json(&report(&[
        "--form", "implicit", "--backend", "cpu", "--top", "5", "--damping", &damping, "--alpha", &alpha, "--probes",
        "24", "--lanczos-steps", "40", "--top-tol", "1e-8", "--top-iterations", "200", "--json",
    ]));
    assert_eq!(implicit["form"], "implicit");
    assert_eq!(implicit["method"], "stochastic");
    assert_eq!(implicit["lanczos_converged"], true);
    for key in keys() {
        assert!(implicit.get(key).is_some_and(|x| !x.is_null()), "--json lacks {key}: {implicit}");
    }
    // Lanczos on the implicit F·v against the dense eigensolver on the computed F.
    for (got, want) in nums(&implicit, "top_eigenvalues").iter().zip(nums(&full, "top_eigenvalues")) {
        close(*got, want, 1e-5, "top eigenvalue");
    }
    // Exact in both: tr F (mean of the per-sample norms), θᵀFθ, and the condition number
    // (rank ≤ N·R = 120 < P, so λ_min = 0 and the damped condition is (λ_max + λ)/λ).
    close(num(&implicit, "trace"), num(&full, "trace"), 1e-5, "trace");
    close(num(&implicit, "fisher_rao_norm"), num(&full, "fisher_rao_norm"), 1e-5, "Fisher–Rao norm");
    close(num(&implicit, "condition_number"), num(&full, "condition_number"), 1e-5, "condition number");
    // SLQ within 4 error bars (statistical plus the quadrature bound) of the exact values.
    let bars = &implicit["error_bars"];
    for (key, quadrature) in [
        ("logdet", true),
        ("effective_dimension", true),
        ("abbas_effective_dimension", true),
        ("spectral_entropy", true),
        ("frobenius", false),
        ("inter_layer_coupling", false),
    ] {
        let (got, want) = (num(&implicit, key), num(&full, key));
        let mut bar = bars[key].as_f64().unwrap();
        if quadrature {
            bar += bars["quadrature"][key].as_f64().unwrap();
        }
        assert!(bar > 0.0 && bar.is_finite(), "{key}: error bar {bar}");
        assert!((got - want).abs() <= 4.0 * bar, "{key}: SLQ {got} ± {bar} vs exact {want}");
    }
    // The F·v accounting: SLQ probes × steps + Lanczos + θ + coupling rounds × layers.
    let lanczos_steps = 40;
    let fv = implicit["fv_products"].as_u64().unwrap() as usize;
    assert!(fv > 24 * lanczos_steps + 1 + 4 * 2 && fv <= 24 * lanczos_steps + 200 + 1 + 4 * 2, "F·v count {fv}");
    assert_eq!(implicit["implicit"]["rank_bound"], 120);
}

/// `--only top`: the top eigenvalues alone (no trace, SLQ or coupling keys), equal to the
/// dense eigensolver's on the computed F, in fewer F·v products than the whole report; and
/// every combination it cannot honour is refused with exit 2.
#[test]
fn only_top_gives_the_top_eigenvalues_alone() {
    let full = json(&report(&["--form", "full", "--backend", "cpu", "--top", "5", "--json"]));
    let top = json(&report(&[
        "--form", "implicit", "--backend", "cpu", "--top", "5", "--only", "top", "--top-tol", "1e-8", "--top-iterations", "200",
        "--json",
    ]));
    assert_eq!(top["only"], "top");
    assert_eq!(top["form"], "implicit");
    assert_eq!(top["lanczos_converged"], true);
    assert_eq!(top["parameters"], P);
    let (got, want) = (nums(&top, "top_eigenvalues"), nums(&full, "top_eigenvalues"));
    assert_eq!(got.len(), 5);
    for (g, w) in got.iter().zip(&want) {
        close(*g, *w, 1e-5, "top eigenvalue");
    }
    let residuals = nums(&top, "top_residuals");
    assert!(residuals.iter().zip(&got).all(|(r, g)| *r <= 1e-8 * g.abs() + 1e-12), "{residuals:?}");
    for key in ["trace", "logdet", "effective_dimension", "inter_layer_coupling"] {
        assert!(top.get(key).is_none(), "--only top computed {key}");
    }
    let run = report(&["--form", "implicit", "--backend", "cpu", "--top", "3", "--only", "top"]);
    succeeds(&run);
    assert!(run.stdout.contains("top 3 eigenvalues") && run.stdout.contains("λ3"), "{}", run.stdout);

    let f = files();
    for (extra, words) in [
        (&["--form", "full", "--only", "top"][..], &["--only top", "--form implicit"][..]),
        (&["--only", "top"][..], &["--only top", "--form implicit"][..]),
        (&["--form", "implicit", "--only", "top", "--probes", "4"][..], &["--probes", "--only top"][..]),
        (&["--form", "implicit", "--only", "top", "--plot", "x.png"][..], &["--plot", "--only top"][..]),
        (&["--form", "implicit", "--only", "nothing"][..], &["--only"][..]),
    ] {
        assert_fails(&report(extra), 2, words);
    }
    assert_fails(&fisher(&["report", "--fisher", s(&f.stored("full")), "--only", "top"]), 2, &["--only top"]);
}

#[test]
fn stored_results_give_the_measures_of_computing_directly() {
    let f = files();
    let ignored = ["seconds", "input", "plot", "notes", "stored"];
    let same = |a: &Value, b: &Value, form: &str| {
        let (a, b) = (a.as_object().unwrap(), b.as_object().unwrap());
        for (key, value) in a {
            if ignored.contains(&key.as_str()) {
                continue;
            }
            assert_eq!(Some(value), b.get(key), "{form}: {key} differs");
        }
    };
    for form in ["full", "diag", "layer", "kfac"] {
        let direct = json(&report(&["--form", form, "--backend", "cpu", "--json"]));
        let stored = json(&fisher(&[
            "report", "--fisher", s(&f.stored(form)), "--weights", s(&f.weights), "--json",
        ]));
        same(&direct, &stored, form);
        assert_eq!(stored["form"], form);
        assert_eq!((direct["stored"].as_bool(), stored["stored"].as_bool()), (Some(false), Some(true)));
        assert_eq!(stored["samples"], 30, "N comes from the metadata");
        // Without the model: no θ, so no Fisher–Rao norm; KFAC and the layer blocks take the
        // layer shapes from the metadata.
        let bare = json(&fisher(&["report", "--fisher", s(&f.stored(form)), "--json"]));
        assert!(bare["fisher_rao_norm"].is_null(), "{form}: {}", bare["fisher_rao_norm"]);
        for key in ["trace", "logdet", "effective_dimension", "abbas_effective_dimension", "top_eigenvalues"] {
            assert_eq!(bare[key], direct[key], "{form}: {key}");
        }
        assert_eq!(bare["inter_unit_coupling"], direct["inter_unit_coupling"], "{form}: shapes from the metadata");
    }
}

#[test]
fn reduce_results_full_gram_and_blocks() {
    // Per-sample gradients with N = 40 < P = 60: F has 20 zero eigenvalues; its Gram dual
    // K = GGᵀ/N holds the 40 others.
    let dir = temp();
    let out = |form: &str| dir.path().join(format!("{}.safetensors", form.replace([':', ','], "_")));
    for form in ["full", "gram", "blocks:20,40"] {
        succeeds(&fisher(&[
            "reduce", "--synthetic", "40,60", "--seed", "3", "--form", form, "--backend", "cpu", "--out",
            s(&out(form)), "--quiet",
        ]));
    }
    let report = |form: &str| json(&fisher(&["report", "--fisher", s(&out(form)), "--top", "5", "--json"]));
    let (full, gram, blocks) = (report("full"), report("gram"), report("blocks:20,40"));
    assert_eq!(gram["parameters"], 60, "P from the metadata");
    assert_eq!(gram["form"], "gram");
    assert_eq!(blocks["form"], "blocks:20,40");
    assert_eq!(full["samples"], 40);
    for key in ["trace", "frobenius", "logdet", "effective_dimension", "abbas_effective_dimension", "stable_rank"] {
        close(num(&gram, key), num(&full, key), 1e-5, &format!("gram vs full {key}"));
    }
    for (g, f) in nums(&gram, "top_eigenvalues").iter().zip(nums(&full, "top_eigenvalues")) {
        close(*g, f, 1e-5, "gram vs full top eigenvalue");
    }
    // The blocks hold the diagonal blocks of the same F: the same trace, a smaller ‖F‖_F.
    close(num(&blocks, "trace"), num(&full, "trace"), 1e-5, "blocks trace");
    assert!(num(&blocks, "frobenius") < num(&full, "frobenius"));
    assert!(gram["fisher_rao_norm"].is_null() && gram["inter_layer_coupling"].is_null());
}

#[test]
fn plots_are_written_for_exact_and_implicit_forms() {
    let dir = temp();
    let png = dir.path().join("spectrum.png");
    let v = json(&report(&["--form", "full", "--backend", "cpu", "--plot", s(&png), "--json"]));
    assert_eq!(v["plot"], s(&png));
    assert!(std::fs::read(&png).unwrap().starts_with(PNG_SIGNATURE));
    let png2 = dir.path().join("implicit.png");
    succeeds(&report(&["--form", "implicit", "--backend", "cpu", "--plot", s(&png2), "--quiet"]));
    assert!(std::fs::read(&png2).unwrap().starts_with(PNG_SIGNATURE));
    let svg = dir.path().join("stored.SVG");
    succeeds(&fisher(&["report", "--fisher", s(&files().stored("kfac")), "--plot", s(&svg), "--quiet"]));
    assert!(std::fs::read_to_string(&svg).unwrap().contains("<svg"));
    assert_dir_holds(dir.path(), &["implicit.png", "spectrum.png", "stored.SVG"]);
}

#[test]
fn table_says_what_is_exact_and_what_is_estimated() {
    let run = report(&["--form", "implicit", "--backend", "cpu", "--alpha", "1e-3,1e-2"]);
    succeeds(&run);
    let out = &run.stdout;
    for needle in [
        "P = 160 parameters, N = 30 samples",
        "tr F",
        "top eigenvalues (10)",
        "log det(F + λI)",
        "d_eff(α = 1.0e-03)",
        "d_eff(α = 1.0e-02)",
        "Abbas d_n (n = 30)",
        "Fisher–Rao norm",
        "condition number",
        "stable rank",
        "spectral entropy",
        "inter-layer coupling",
        "Exact: trace",
        "Estimated (± one standard error",
        "F·v products:",
        "seconds",
        "quadrature",
    ] {
        assert!(out.contains(needle), "table lacks {needle:?}:\n{out}");
    }
    assert!(run.stderr.is_empty(), "no progress bar off a terminal: {}", run.stderr);
    let exact = report(&["--backend", "cpu"]);
    succeeds(&exact);
    assert!(exact.stdout.contains("--form auto: full, since P = 160"), "{}", exact.stdout);
    assert!(exact.stdout.contains("Every measure is exact"), "{}", exact.stdout);
    let quiet = report(&["--backend", "cpu", "--quiet"]);
    succeeds(&quiet);
    assert!(quiet.stdout.is_empty() && quiet.stderr.is_empty());
}

#[test]
fn synthetic_models_need_no_files() {
    let v = json(&fisher(&[
        "report", "--synthetic-model", "6,9,3", "--synthetic-samples", "25", "--activation", "relu", "--backend", "cpu",
        "--form", "kfac", "--json",
    ]));
    assert_eq!(v["parameters"], 9 * 7 + 3 * 10);
    assert_eq!(v["form"], "kfac");
    assert_eq!(v["layers"], serde_json::json!([6, 9, 3]));
}

#[test]
fn gpu_agrees_with_cpu() {
    if !gpu_available("cli_report::gpu_agrees_with_cpu") {
        return;
    }
    for form in ["full", "implicit"] {
        let cpu = json(&report(&["--form", form, "--backend", "cpu", "--top", "5", "--json"]));
        let gpu = json(&report(&["--form", form, "--backend", "gpu", "--top", "5", "--json"]));
        assert!(!gpu["backend"].as_str().unwrap().starts_with("cpu"), "{}", gpu["backend"]);
        for key in ["trace", "logdet", "effective_dimension", "fisher_rao_norm", "stable_rank", "spectral_entropy"] {
            close(num(&gpu, key), num(&cpu, key), 1e-4, &format!("{form} {key}"));
        }
        for (g, c) in nums(&gpu, "top_eigenvalues").iter().zip(nums(&cpu, "top_eigenvalues")) {
            close(*g, c, 1e-4, &format!("{form} top eigenvalue"));
        }
    }
}

#[test]
fn bad_inputs_are_refused_and_write_nothing() {
    let f = files();
    let dir = temp();
    let png = dir.path().join("s.png");
    let plot = ["--plot", s(&png)];
    let with_plot = |extra: &[&str]| {
        let mut args = extra.to_vec();
        args.extend_from_slice(&plot);
        report(&args)
    };
    assert_fails(&with_plot(&["--form", "full", "--probes", "4"]), 2, &["--probes", "only applies to --form implicit"]);
    assert_fails(&with_plot(&["--samples-n", "5"]), 2, &["--samples-n", "19"]);
    assert_fails(&with_plot(&["--alpha", "0"]), 2, &["--alpha", "positive"]);
    assert_fails(&with_plot(&["--top", "0"]), 2, &["--top"]);
    assert_fails(&with_plot(&["--form", "implicit", "--damping", "0"]), 2, &["--damping", "implicit"]);
    assert_fails(&with_plot(&["--form", "implicit", "--probes", "1"]), 2, &["--probes", "at least 2"]);
    assert_fails(&with_plot(&["--inputs", s(&f.labels)]), 2, &["--inputs"]);
    assert_fails(&report(&["--plot", s(&dir.path().join("s.jpg"))]), 2, &["--plot", ".png or .svg"]);
    assert_fails(&report(&["--plot", s(&dir.path().join("missing/s.png"))]), 2, &["--plot", "does not exist"]);
    let no_activation = fisher(&[
        "report", "--weights", s(&f.weights), "--inputs", s(&f.inputs), "--labels", s(&f.labels), "--plot", s(&png),
    ]);
    assert_fails(&no_activation, 2, &["--activation"]);
    // Too large to analyse densely: refused before anything is computed.
    let dense = fisher(&[
        "report", "--synthetic-model", "100,150,10", "--synthetic-samples", "20", "--activation", "tanh", "--form",
        "full", "--plot", s(&png),
    ]);
    assert_fails(&dense, 2, &["--form full", "--form implicit"]);

    // Stored results.
    let stored = |extra: &[&str]| {
        let mut args = vec!["report", "--plot", s(&png)];
        args.extend_from_slice(extra);
        fisher(&args)
    };
    let full = f.stored("full");
    assert_fails(&stored(&["--fisher", s(&full), "--inputs", s(&f.inputs)]), 2, &["--inputs", "--fisher"]);
    assert_fails(&stored(&["--fisher", s(&full), "--form", "full"]), 2, &["--form", "--fisher"]);
    assert_fails(&stored(&["--fisher", s(&full), "--variant", "empirical"]), 2, &["--variant", "--fisher"]);
    assert_fails(&stored(&["--fisher", s(&full), "--probes", "4"]), 2, &["--probes", "implicit"]);
    assert_fails(&stored(&["--fisher", s(&f.stored("norms"))]), 2, &["norms", "only tr F"]);
    assert_fails(&stored(&["--fisher", s(&f.inputs)]), 2, &["inputs.npy", "safetensors"]);
    assert_fails(&stored(&["--fisher", s(&dir.path().join("none.safetensors"))]), 2, &["none.safetensors"]);
    // A model of another size.
    let other = dir.path().join("other.safetensors");
    succeeds(&fisher(&[
        "compute", "--synthetic-model", "3,2", "--synthetic-samples", "4", "--activation", "tanh", "--save-model",
        s(&other), "--quiet",
    ]));
    assert_fails(&stored(&["--fisher", s(&full), "--weights", s(&other)]), 2, &["8 parameters", "160"]);
    // KFAC factors without metadata and without the model: the bias column is unknown.
    let bare = dir.path().join("bare_kfac.safetensors");
    let (tensors, _) = fisher_engine::io::read_safetensors(&f.stored("kfac")).unwrap();
    fisher_engine::io::write_safetensors_atomic(&bare, &tensors, None).unwrap();
    assert_fails(&stored(&["--fisher", s(&bare)]), 2, &["layer shapes", "--weights"]);
    // With the model it works.
    succeeds(&fisher(&["report", "--fisher", s(&bare), "--weights", s(&f.weights), "--quiet"]));

    let mut left = names_in(dir.path());
    left.retain(|n| n != "other.safetensors" && n != "bare_kfac.safetensors");
    assert!(left.is_empty(), "a failed run left {left:?}");
}
