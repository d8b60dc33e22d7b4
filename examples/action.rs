//! A training run as a path in the Fisher metric: the action S = Σ_t Δθ_tᵀF(θ_t)Δθ_t, the
//! Fisher–Rao length L = Σ_t √(Δθ_tᵀF(θ_t)Δθ_t), the chord θ₀→θ_T and the efficiency
//! L / chord — what `fisher action --model` prints, through the library.
//!
//! ```text
//! cargo run --release --example action [MODEL.onnx X.npy Y.npy]
//! ```
//!
//! Without arguments it uses the committed fixture `tests/fixtures/onnx/cnn_bn`. A real run
//! has checkpoints saved during training; here three are made from the fixture's θ by two
//! seeded random steps, so the example runs as is. Each quadratic form is one forward-mode
//! pass over the data (J·v): F is never formed.

use std::error::Error;
use std::path::{Path, PathBuf};

use fisher_engine::analysis::action::measure_graph;
use fisher_engine::fisher::Variant;
use fisher_engine::graph::fisher::GraphModel;
use fisher_engine::model::Likelihood;
use fisher_engine::pipeline::graph::load_graph_problem;
use fisher_engine::synthetic::SplitMix64;
use fisher_engine::{Backend, Engine};
use ndarray::Array1;

/// Relative size of each step: ‖Δθ‖ ≈ STEP·‖θ‖.
const STEP: f64 = 0.05;

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx/cnn_bn");
    let (model_path, inputs, labels) = match args.as_slice() {
        [] => (fixture.join("model.onnx"), fixture.join("x.npy"), fixture.join("y.npy")),
        [m, x, y] => (m.clone(), x.clone(), y.clone()),
        _ => return Err("usage: action [MODEL.onnx X.npy Y.npy]".into()),
    };
    let likelihood = Likelihood::Categorical;
    let (model, data) = load_graph_problem(&model_path, &inputs, &labels, likelihood)?;
    model.check_data(&data, likelihood)?;

    // Three checkpoints θ₀, θ₁, θ₂: the model, then two seeded random steps. Each is a
    // GraphModel with θ replaced (same graph, same constants such as BatchNorm's running
    // statistics); θ is in the graph's parameter order (PyTorch's named_parameters()).
    let theta0 = model.graph.theta();
    let scale = STEP * (theta0.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / theta0.len() as f64).sqrt();
    let mut rng = SplitMix64::new(42);
    let mut checkpoints: Vec<GraphModel> = vec![model.clone()];
    for _ in 0..2 {
        let last = checkpoints[checkpoints.len() - 1].graph.theta();
        let next: Vec<f32> = last.iter().map(|&v| v + (rng.normal() * scale) as f32).collect();
        checkpoints.push(model.with_theta(&next)?);
    }
    let thetas: Vec<Array1<f64>> =
        checkpoints.iter().map(|c| c.graph.theta().iter().map(|&v| f64::from(v)).collect()).collect();

    let engine = Engine::new(Backend::Auto)?;
    println!(
        "model: {} (P = {}), N = {}, {} checkpoints, backend: {}",
        model_path.display(),
        model.graph.param_count(),
        data.len(),
        thetas.len(),
        engine.device_info()
    );

    // The path measured in the true Fisher; the chord θ₀→θ₂ by the midpoint rule over
    // 4 segments (each a quadratic form at a point between θ₀ and θ₂).
    let segments = 4;
    let report = measure_graph(&engine, &model, &thetas, &data, likelihood, Variant::True, segments, &mut |_, _| {})?;
    for s in &report.steps {
        println!("step {}: ‖Δθ‖ = {:.4e}, ΔθᵀFΔθ = {:.4e}, cumulative L = {:.4e}", s.step, s.euclidean, s.action, s.cumulative_length);
    }
    println!("action S = {:.6e}", report.action);
    println!("length L = {:.6e}", report.length);
    println!("chord = {:.6e} ({} segments)", report.chord, report.segments);
    println!("efficiency L/chord = {:.4}", report.efficiency);
    if !(report.action > 0.0 && report.efficiency.is_finite()) {
        return Err("expected a positive action and a finite efficiency".into());
    }
    Ok(())
}
