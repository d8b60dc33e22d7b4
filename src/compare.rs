//! Comparing compute paths: one reduction on several engines (GPU and CPU), each judged
//! against one f64 reference by the [`crate::verify`] policy, and the paths against each
//! other. The body of `fisher reduce --synthetic`'s demonstration and of `fisher demo`'s
//! reduction section.

use std::time::Instant;

use ndarray::Array2;

use crate::error::Result;
use crate::fisher::{Agreement, Form};
use crate::io::fisher_file::FisherFile;
use crate::reference::grads as reference;
use crate::verify::{reduction_length, Contract, Verdict};
use crate::Engine;

/// One compute path of a [`Comparison`].
#[derive(Debug)]
pub struct PathRun {
    /// Backend label.
    pub label: String,
    /// Seconds to set the backend up (device, kernels).
    pub setup: f64,
    /// Seconds of the reduction.
    pub compute: f64,
    /// tr F from this path.
    pub trace: f64,
    /// Disagreement with the f64 reference, judged.
    pub verification: Verdict,
    /// Whether this is a GPU path.
    pub gpu: bool,
    /// The result's values (for the GPU-vs-CPU comparison).
    values: Vec<f64>,
}

/// What a comparison of compute paths measured.
#[derive(Debug)]
pub struct Comparison {
    /// N.
    pub samples: usize,
    /// P.
    pub params: usize,
    /// Seed of the synthetic data.
    pub seed: u64,
    /// The form.
    pub form: Form,
    /// Names and shapes of the result's tensors.
    pub tensors: Vec<(String, Vec<usize>)>,
    /// Seconds to generate G.
    pub generate: f64,
    /// The compute paths, the requested one first.
    pub runs: Vec<PathRun>,
    /// Seconds of the f64 reference.
    pub reference_seconds: f64,
    /// tr F from the reference.
    pub reference_trace: f64,
    /// GPU result vs CPU result, when both ran.
    pub gpu_vs_cpu: Option<Agreement>,
    /// Why a path is missing from the comparison.
    pub note: Option<String>,
    /// Products summed per entry (what the tolerance depends on).
    pub terms: usize,
}

impl Comparison {
    /// The labels of the paths that disagree with the f64 reference beyond their tolerance.
    pub fn failed(&self) -> Vec<&str> {
        self.runs.iter().filter(|r| !r.verification.passed).map(|r| r.label.as_str()).collect()
    }
}

/// Reduces `g` to `form` on each of `engines` (with the seconds each took to set up), and
/// judges every result against one f64 reference by [`Contract::reduction`]
/// ([`Verdict::judge`]). `seed` and `generate` (seconds) describe how `g` was made; `note`
/// says why a path is missing; `progress` hears what runs next.
pub fn compare_paths(
    g: &Array2<f32>,
    seed: u64,
    generate: f64,
    form: &Form,
    engines: &[(f64, &Engine)],
    note: Option<String>,
    mut progress: impl FnMut(&str),
) -> Result<Comparison> {
    let (samples, params) = g.dim();
    let mut runs = Vec::new();
    let mut tensors = Vec::new();
    let mut results = Vec::new();
    for &(setup, engine) in engines {
        progress(&format!("reducing on {}", engine.device_info()));
        let start = Instant::now();
        let result = engine.fisher_from_grads(g.view(), form)?;
        let compute = start.elapsed().as_secs_f64();
        if tensors.is_empty() {
            tensors = FisherFile::of_reduction(result.clone(), form, samples, params, "").tensor_shapes();
        }
        results.push((setup, compute, engine.device_info(), engine.is_gpu(), result));
    }

    progress("computing the f64 reference (plain compensated loops: slow by design)");
    let start = Instant::now();
    let reference = reference::reduce(g.view(), form)?;
    let reference_seconds = start.elapsed().as_secs_f64();
    for (setup, compute, label, gpu, result) in results {
        let verification = Verdict::judge(result.agreement(&reference)?, Contract::reduction(form, samples, params));
        runs.push(PathRun { label, setup, compute, trace: result.trace(), verification, gpu, values: result.values() });
    }

    let gpu_vs_cpu = match (runs.iter().find(|r| r.gpu), runs.iter().find(|r| !r.gpu)) {
        (Some(gpu), Some(cpu)) => Some(crate::fisher::agreement_of(&gpu.values, &cpu.values)),
        _ => None,
    };
    Ok(Comparison {
        samples,
        params,
        seed,
        form: form.clone(),
        tensors,
        generate,
        runs,
        reference_seconds,
        reference_trace: reference.trace(),
        gpu_vs_cpu,
        note,
        terms: reduction_length(form, samples, params),
    })
}
