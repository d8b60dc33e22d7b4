//! Networks exported from PyTorch exactly as the README says (`scripts/make_onnx_fixtures.py`
//! wrote `tests/fixtures/onnx/<case>/`: the ONNX file with its external data, the inputs,
//! the labels, and f64 references computed with `torch.func` and cross-checked there against
//! BackPACK, nngeometry and an autograd loop).
//!
//! * Every fixture's Fisher diagonal (true and empirical) equals the one `torch.func` gives
//!   for the PyTorch model, BatchNorm parameters included, within 1e-5 relative.
//! * Every variant × form of every fixture agrees with the independent f64 reference
//!   ([`fisher_engine::graph::reference`]), on the CPU and on the GPU.
//! * The f64 reference itself reproduces `torch.func`'s logits and per-sample Jacobians.
//! * KFAC factors relate to curvlinops' `KFACLinearOperator` as documented.

use std::collections::HashMap;
use std::path::PathBuf;

use fisher_engine::fisher::{NetFisher, NetForm, Variant};
use fisher_engine::graph::fisher::{GraphModel, Selection};
use fisher_engine::model::{Dataset, Likelihood};
use fisher_engine::pipeline::graph::load_graph_problem;
use fisher_engine::{Engine, FisherError};

use super::common::backend_test;

/// Every fixture case.
pub const CASES: [&str; 10] =
    ["mlp", "cnn_bn", "convs", "resmlp", "embed", "erf_gelu", "resnet_small", "gaussian", "mlp_noops", "torchscript_cnn"];

/// The directory of a case.
pub fn case_dir(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx").join(case)
}

/// A fixture's references: f64 tensors by name, and the metadata.
pub struct Reference {
    pub tensors: HashMap<String, (Vec<usize>, Vec<f64>)>,
    pub metadata: HashMap<String, String>,
}

pub fn reference(case: &str) -> Reference {
    let bytes = std::fs::read(case_dir(case).join("ref.safetensors")).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let metadata = header.metadata().clone().unwrap_or_default();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tensors = file
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F64, "{case}: {name}");
            let values = view.data().chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect();
            (name, (view.shape().to_vec(), values))
        })
        .collect();
    Reference { tensors, metadata }
}

/// Loads a case as `fisher compute --model` does.
pub fn load(case: &str) -> (GraphModel, Dataset, Likelihood, Reference) {
    let r = reference(case);
    let likelihood = match r.metadata["likelihood"].as_str() {
        "gaussian" => Likelihood::Gaussian,
        _ => Likelihood::Categorical,
    };
    let dir = case_dir(case);
    let (model, data) = load_graph_problem(&dir.join("model.onnx"), &dir.join("x.npy"), &dir.join("y.npy"), likelihood)
        .unwrap_or_else(|e| panic!("{case}: {e}"));
    (model, data, likelihood, r)
}

/// max|a − b| / max|b|.
fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale.max(f64::MIN_POSITIVE)
}

/// The contract of a network result against its f64 reference: ‖Δ‖_F/‖ref‖_F ≤ 1e-5 (twice
/// that on a GPU, as everywhere in this project).
fn bound(engine: &Engine) -> f64 {
    fisher_engine::verify::NETWORK_FROBENIUS_REL * if engine.is_gpu() { 2.0 } else { 1.0 }
}

backend_test!(diagonals_equal_torch_func, |engine| {
    for case in CASES {
        let (model, data, likelihood, r) = load(case);
        let all = Selection::all(&model.graph);
        for (variant, key) in [(Variant::True, "diag.true"), (Variant::Empirical, "diag.empirical")] {
            let NetFisher::Diagonal(d) = engine.graph_fisher(&model, &data, likelihood, variant, NetForm::Diagonal, &all).unwrap() else {
                unreachable!()
            };
            let got: Vec<f64> = d.iter().map(|&v| f64::from(v)).collect();
            let rel = max_rel(&got, &r.tensors[key].1);
            assert!(rel <= 1e-5, "{case} {key}: max|Δ|/max|ref| = {rel:e}");
        }
    }
});

backend_test!(every_variant_and_form_matches_the_f64_reference, |engine| {
    for case in CASES {
        let (model, data, likelihood, _) = load(case);
        let all = Selection::all(&model.graph);
        for variant in [Variant::Empirical, Variant::True, Variant::MonteCarlo { samples: 3, seed: 7 }] {
            for form in NetForm::ALL {
                let got = engine.graph_fisher(&model, &data, likelihood, variant, form, &all);
                if form == NetForm::Kfac && !model.kfac_refused.is_empty() {
                    // Grouped convolutions have no Kronecker factors: a clear refusal.
                    let err = got.unwrap_err();
                    assert!(matches!(err, FisherError::Request(_)) && err.to_string().contains("grouped"), "{case}: {err}");
                    continue;
                }
                let got = got.unwrap_or_else(|e| panic!("{case} {variant:?} {form:?}: {e}"));
                let want = fisher_engine::graph::reference::fisher(&model.graph, &data, likelihood, variant, form).unwrap();
                let a = got.agreement(&want).unwrap();
                assert!(a.frobenius_rel <= bound(&engine), "{case} {variant:?} {form:?}: {a:?}");
            }
        }
    }
});

backend_test!(implicit_product_matches_the_f64_reference, |engine| {
    for case in CASES {
        let (model, data, likelihood, _) = load(case);
        let p = model.graph.param_count();
        let v: Vec<f32> = (0..p).map(|i| ((i * 7919 % 211) as f32 / 105.0) - 1.0).collect();
        let v64: Vec<f64> = v.iter().map(|&x| f64::from(x)).collect();
        for variant in [Variant::Empirical, Variant::True] {
            let got = engine.graph_fvp(&model, &data, likelihood, variant, &v, true).unwrap();
            let want = fisher_engine::graph::reference::fvp(&model.graph, &data, likelihood, variant, &v64).unwrap();
            let got: Vec<f64> = got.product.unwrap().iter().map(|&x| f64::from(x)).collect();
            let rel = max_rel(&got, &want);
            assert!(rel <= 1e-5, "{case} {variant:?}: F·v max|Δ|/max|ref| = {rel:e}");
        }
    }
});

#[test]
fn the_f64_reference_reproduces_torch_func() {
    for case in CASES {
        let (model, data, _, r) = load(case);
        let (n, d) = data.inputs.dim();
        let (jshape, jac) = &r.tensors["jacobian"];
        let (c, p) = (jshape[1], jshape[2]);
        assert_eq!((jshape[0], p), (n, model.graph.param_count()), "{case}");
        for i in 0..n {
            let x: Vec<f64> = data.inputs.row(i).iter().map(|&v| f64::from(v)).collect();
            let j = fisher_engine::graph::reference::jacobian(&model.graph, &x).unwrap();
            assert_eq!(j.dim(), (c, p));
            let want = &jac[i * c * p..(i + 1) * c * p];
            let rel = max_rel(j.as_slice().unwrap(), want);
            // 1e-8, not 1e-14: ONNX stores float attributes (LeakyReLU's α = 0.01, ε) in f32,
            // so the graph's α is 0.01 rounded to f32 while torch's f64 model uses 0.01.
            assert!(rel <= 1e-8, "{case} sample {i}: Jacobian max|Δ|/max|ref| = {rel:e}");
        }
        let _ = d;
    }
}

#[test]
fn kfac_factors_relate_to_curvlinops_as_documented() {
    // curvlinops (type-2, expand, reduction sum): A_c = Σ_{n,s} ããᵀ/(N·S), G_c = Σ_{n,s} Σ_c δδᵀ;
    // ours: A = Σ_{n,s} ããᵀ/N and G = Σ_n Σ_c (1/S) Σ_s δδᵀ / N, so A = S·A_c, G = G_c/(N·S),
    // and G ⊗ A = (G_c ⊗ A_c)/N: the same Kronecker approximation, of the mean instead of the sum.
    let mut checked = 0;
    for case in CASES {
        let (model, data, likelihood, r) = load(case);
        let Some(meta) = r.metadata.get("kfac") else { continue };
        if !model.kfac_refused.is_empty() {
            continue;
        }
        let meta: serde_json::Value = serde_json::from_str(meta).unwrap();
        let gaussian = likelihood == Likelihood::Gaussian;
        let all = Selection::all(&model.graph);
        let NetFisher::Kfac(factors) = fisher_engine::graph::reference::fisher(&model.graph, &data, likelihood, Variant::True, NetForm::Kfac).unwrap() else {
            unreachable!()
        };
        let sites = fisher_engine::graph::fisher::kfac_sites(&model, &all);
        let n = data.len() as f64;
        for module in meta["modules"].as_array().unwrap() {
            let module = module.as_str().unwrap();
            let (k, (_, site)) = sites.iter().enumerate().find(|(_, (m, _))| m == module).unwrap_or_else(|| panic!("{case}: no site {module}"));
            let s = model.program.kfac[*site].positions as f64;
            let (_, a_c) = &r.tensors[&format!("kfac.{module}.A")];
            let (_, g_c) = &r.tensors[&format!("kfac.{module}.G")];
            let a: Vec<f64> = factors[k].a.iter().map(|v| v / s).collect();
            // MSELoss(sum) is ½‖y − μ‖²·2 = ‖y − μ‖²: its Hessian is 2I, twice the Gaussian Fisher's.
            let g: Vec<f64> = factors[k].g.iter().map(|v| v * n * s * if gaussian { 2.0 } else { 1.0 }).collect();
            let (ra, rg) = (max_rel(&a, a_c), max_rel(&g, g_c));
            assert!(ra <= 1e-8, "{case} {module}: A max|Δ|/max|ref| = {ra:e}");
            assert!(rg <= 1e-8, "{case} {module}: G max|Δ|/max|ref| = {rg:e} (ours·N·S {:?} vs {:?})", &g[..4.min(g.len())], &g_c[..4.min(g_c.len())]);
            checked += 1;
        }
    }
    assert!(checked >= 5, "only {checked} KFAC modules checked");
}
