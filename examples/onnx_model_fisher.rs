//! The Fisher information of a PyTorch network exported to ONNX: its true-Fisher diagonal
//! per parameter and its KFAC factors per layer, written as safetensors files — what
//! `fisher compute --model` does, through the library.
//!
//! ```text
//! cargo run --release --example onnx_model_fisher [MODEL.onnx X.npy Y.npy] [OUT_DIR]
//! ```
//!
//! Export the model as the README says:
//! `torch.onnx.export(model.eval(), (x,), "model.onnx", dynamo=True, optimize=False)`, and
//! save its data with `numpy.save`: X of shape N × the model's input shape (float32, or
//! int64 token indices for an embedding), y the N class labels (int64). Without arguments the
//! example uses the committed fixture `tests/fixtures/onnx/cnn_bn` (Conv → BatchNorm → ReLU →
//! MaxPool → Conv → BatchNorm → ReLU → pool → Linear, 726 parameters, 6 images), and writes
//! into a temporary directory that is removed at exit; give OUT_DIR to keep the files.

use std::error::Error;
use std::path::{Path, PathBuf};

use fisher_engine::fisher::{NetFisher, NetForm, Variant};
use fisher_engine::graph::fisher::{kfac_sites, Selection};
use fisher_engine::io::fisher_file::{self, FisherFile};
use fisher_engine::model::Likelihood;
use fisher_engine::pipeline::graph::load_graph_problem;
use fisher_engine::{Backend, Engine};

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx/cnn_bn");
    let (model_path, inputs, labels, out_dir) = match args.as_slice() {
        [] => (fixture.join("model.onnx"), fixture.join("x.npy"), fixture.join("y.npy"), None),
        [out] => (fixture.join("model.onnx"), fixture.join("x.npy"), fixture.join("y.npy"), Some(out.clone())),
        [m, x, y] => (m.clone(), x.clone(), y.clone(), None),
        [m, x, y, out] => (m.clone(), x.clone(), y.clone(), Some(out.clone())),
        _ => return Err("usage: onnx_model_fisher [MODEL.onnx X.npy Y.npy] [OUT_DIR]".into()),
    };
    // Without OUT_DIR, a temporary directory (removed when `_temp` is dropped at the end).
    let _temp;
    let out_dir = match out_dir {
        Some(dir) => dir,
        None => {
            _temp = tempfile::tempdir()?;
            _temp.path().to_path_buf()
        }
    };

    // 1. The data (any rank: N × the model's input shape) and the graph, imported for the
    //    data's per-sample shape and checked against it (shape; floats or integer tokens).
    //    Class labels mean the categorical likelihood (softmax over the model's outputs);
    //    a regressor with N×k float targets would use Likelihood::Gaussian.
    let likelihood = Likelihood::Categorical;
    let (model, data) = load_graph_problem(&model_path, &inputs, &labels, likelihood)?;
    // Labels in range, finite inputs, one label per input.
    model.check_data(&data, likelihood)?;
    let graph = &model.graph;
    println!(
        "model: {} ({} operators, P = {} parameters, {} outputs), N = {} samples",
        model_path.display(),
        graph.nodes.len(),
        graph.param_count(),
        graph.outputs(),
        data.len()
    );

    let engine = Engine::new(Backend::Auto)?;
    println!("backend: {}", engine.device_info());

    // Every parameter (a regular expression over the names would pick a subset, as
    // `--params` does: Selection::matching(graph, "^10\\.", |name| re.is_match(name))).
    let all = Selection::all(graph);

    // 2. The true Fisher's diagonal: (1/N) Σᵢ E_{y~p(·|xᵢ)}[(∂ log p(y|xᵢ)/∂θ)²], in θ order
    //    (the ONNX initializers' order, which is PyTorch's named_parameters()).
    let diag = engine.graph_fisher(&model, &data, likelihood, Variant::True, NetForm::Diagonal, &all)?;
    let NetFisher::Diagonal(d) = &diag else { return Err("the diagonal form returns a vector".into()) };
    println!("true-Fisher diagonal, summed per parameter:");
    let offsets = graph.param_offsets();
    for (i, p) in graph.params.iter().enumerate() {
        let sum: f64 = d.iter().skip(offsets[i]).take(p.len()).map(|&v| f64::from(v)).sum();
        println!("  {:<12} {:<14} {sum:.6e}", p.name, format!("{:?}", p.shape));
    }

    // 3. KFAC: per Conv/Gemm/MatMul layer, A (input second moments, with a trailing 1 for the
    //    bias) and G (output-gradient second moments); the layer's block ≈ G ⊗ A. A grouped
    //    convolution has no Kronecker factors: the engine refuses the form for such a model.
    let kfac = if model.kfac_refused.is_empty() {
        let kfac = engine.graph_fisher(&model, &data, likelihood, Variant::True, NetForm::Kfac, &all)?;
        if let NetFisher::Kfac(factors) = &kfac {
            println!("KFAC factors:");
            for ((module, _), f) in kfac_sites(&model, &all).iter().zip(factors) {
                println!("  {module:<12} A {:?}  G {:?}", f.a.dim(), f.g.dim());
            }
        }
        Some(kfac)
    } else {
        println!("KFAC: not available for this model ({:?})", model.kfac_refused);
        None
    };

    // 4. The results as safetensors files, as `fisher compute --model` writes them:
    //    `diag` (P) and `diag.<parameter>` shaped like each parameter; `kfac.<module>.A/G`;
    //    metadata with the parameter names and shapes, variant, likelihood, N, backend.
    //    Each file is written to a temporary file and renamed into place (complete or absent).
    let backend = engine.device_info();
    let mut results = vec![("diag.safetensors", diag)];
    results.extend(kfac.map(|k| ("kfac.safetensors", k)));
    for (name, result) in results {
        let file = FisherFile::of_graph(result, &model, &all, data.len(), likelihood, Variant::True, &backend);
        let path = out_dir.join(name);
        fisher_file::write(&path, &file)?;
        let tensors: Vec<String> = file.tensor_shapes().into_iter().map(|(t, _)| t).collect();
        println!("wrote {} ({} tensors: {}, …)", path.display(), tensors.len(), tensors[..tensors.len().min(3)].join(", "));
    }
    Ok(())
}
