//! The geometry of a network's Fisher information without ever forming F: top eigenvalues,
//! log-determinant, effective dimension, Fisher–Rao norm and inter-layer coupling, from
//! Fisher–vector products alone (the implicit form) — what `fisher report --model … --form
//! implicit` prints, through the library.
//!
//! ```text
//! cargo run --release --example report [MODEL.onnx X.npy Y.npy]
//! ```
//!
//! Without arguments it analyses the committed fixture `tests/fixtures/onnx/cnn_bn`. The
//! settings are small so that it runs in seconds; the defaults
//! (`ImplicitSettings::default()`) are sized for models of millions of parameters.
//!
//! The implicit form: the exact tr F (from per-sample gradient norms), the largest
//! eigenvalues by Lanczos on F·v, and every spectral sum (log det(F + λI), d_eff) by
//! stochastic Lanczos quadrature with the converged top eigenpairs deflated. Each estimate
//! comes with its standard error over probes and a bound on its quadrature error.

use std::error::Error;
use std::path::{Path, PathBuf};

use fisher_engine::analysis::report::{
    self, ComputeOptions, FormChoice, GraphInput, ImplicitSettings, ReportInput, ReportOptions, ReportRequest,
};
use fisher_engine::backend::gpu::GpuOptions;
use fisher_engine::fisher::Variant;
use fisher_engine::model::Likelihood;
use fisher_engine::pipeline::graph::load_graph_problem;
use fisher_engine::Backend;

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx/cnn_bn");
    let (model_path, inputs, labels) = match args.as_slice() {
        [] => (fixture.join("model.onnx"), fixture.join("x.npy"), fixture.join("y.npy")),
        [m, x, y] => (m.clone(), x.clone(), y.clone()),
        _ => return Err("usage: report [MODEL.onnx X.npy Y.npy]".into()),
    };

    // The network and its data, checked against each other (see examples/onnx_model_fisher.rs).
    let likelihood = Likelihood::Categorical;
    let (model, data) = load_graph_problem(&model_path, &inputs, &labels, likelihood)?;

    let input = GraphInput {
        model: &model,
        data: &data,
        likelihood,
        description: model_path.display().to_string(),
        compute: ComputeOptions {
            // The true Fisher (expectation over the model's predictive distribution).
            variant: Variant::True,
            // F·v only: memory is the model, one micro-batch and the Lanczos bases, so this
            // works for any model size. FormChoice::Explicit(NetForm::Full) would form F
            // and make every measure exact (fine up to a few thousand parameters).
            form: FormChoice::Implicit,
            // A hardware GPU when there is one, else the CPU path.
            backend: Backend::Auto,
            gpu: GpuOptions::default(),
        },
    };
    let options = ReportOptions {
        top: 3,
        // d_eff(α) = Σ λᵢ/(λᵢ + α) at two scales; the first is the headline value.
        alphas: vec![1e-3, 1e-1],
        // λ of log det(F + λI): must be > 0 for the implicit form (F is singular when N·R < P).
        damping: 1e-3,
        // N = 6 is too few for the Abbas effective dimension (it needs n ≥ 19): say which n.
        samples_n: Some(1000),
        implicit: ImplicitSettings {
            probes: 2,
            steps: 16,
            coupling_probes: 2,
            top_iterations: 60,
            ..ImplicitSettings::default()
        },
        // Some(path) would also plot the spectrum and its density (PNG, or SVG for .svg).
        plot: None,
    };
    let request = ReportRequest { input: ReportInput::Graph(input), options };
    // The callback sees the F·v products as they are computed (a progress bar in the CLI).
    let report = report::run(&request, &|_done, _total| {})?;

    let m = &report.measures;
    let bars = &m.error_bars;
    let pm = |bar: Option<f64>| bar.map_or(String::new(), |b| format!(" ± {b:.2e}"));
    println!("{} ({})", report.subject.input, report.subject.architecture.as_deref().unwrap_or("graph"));
    println!("form: {} on {}", report.subject.form, report.subject.backend.as_deref().unwrap_or("?"));
    println!("parameters: {}", m.parameters);
    println!("trace: {:.6e}", m.trace);
    println!("top eigenvalues: {:?}", m.top_eigenvalues.iter().map(|v| format!("{v:.4e}")).collect::<Vec<_>>());
    println!("log det(F + {}·I): {:.4e}{}", m.damping, m.logdet, pm(bars.logdet));
    for d in &report.effective_dimensions {
        println!("effective dimension d_eff({}): {:.3}{}", d.alpha, d.value, pm(d.std_error));
    }
    if let (Some(d), Some(n)) = (m.abbas_effective_dimension, m.abbas_samples) {
        println!("Abbas effective dimension (n = {n}): {d:.3}{}", pm(bars.abbas_effective_dimension));
    }
    if let Some(norm) = m.fisher_rao_norm {
        println!("Fisher–Rao norm √(θᵀFθ): {norm:.4e}");
    }
    if let Some(c) = m.inter_layer_coupling {
        println!("inter-layer coupling: {c:.3}{}", pm(bars.inter_layer_coupling));
    }
    println!("F·v products: {}", m.fv_products);
    for note in &report.notes {
        println!("note: {note}");
    }
    Ok(())
}
