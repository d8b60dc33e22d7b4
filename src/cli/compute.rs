//! `fisher compute`: the Fisher information of a PyTorch MLP on data, for every variant and
//! form.
//!
//! Flow: flags → [`ComputeConfig`] (every flag and flag combination checked) → the model and
//! the data, loaded from files or built in memory (`--synthetic-model`), and checked
//! against each other → the size of the result checked against `--max-result-gib` → the
//! synthetic files saved (`--save-model`, `--save-data`) → device → compute → the f64
//! reference (`--verify`) → atomic write.
//!
//! Every check of the user's input runs before the output file is created, and the output
//! is written to a temporary file renamed into place: a failed run leaves no output behind.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, ValueEnum};
use fisher_engine::backend::gpu::GpuOptions;
use fisher_engine::device::{self, DeviceRequest};
use fisher_engine::io::{self, NamedTensor};
use fisher_engine::model::{ActivationSpec, Dataset, Likelihood, Linear, Mlp, Targets};
use fisher_engine::fisher::{rows_per_sample, NetFisher, NetForm, Variant};
use fisher_engine::synthetic::{normal_matrix, SplitMix64};
use fisher_engine::verify::{Contract, Verdict};
use fisher_engine::Backend;
use ndarray::{Array, Array1, Dimension};
use serde_json::json;

use super::args::{BackendArgs, Report};
use super::exit::usage;

/// Synthetic models and data are generated in memory; past this many values (8 GiB of f32)
/// a typo would rather exhaust memory than demonstrate anything.
const MAX_SYNTHETIC_VALUES: u128 = 1 << 31;

/// Metadata note on θ's order.
pub const PARAM_ORDER_NOTE: &str = "pytorch named_parameters; weight row-major then bias";

/// Metadata note on the KFAC factors' layout.
pub const KFAC_LAYOUT_NOTE: &str = "block ≈ G ⊗ A in [W|b] row-major order; see kfac_expand";

/// The likelihood, as spelled on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LikelihoodArg {
    /// Softmax over the outputs (logits); labels are class indices of any integer dtype.
    Categorical,
    /// Unit-variance Gaussian with the outputs as mean; labels are N×k float targets.
    Gaussian,
}

/// The Fisher variant, as spelled on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VariantArg {
    /// Gradients at the observed labels.
    Empirical,
    /// The exact expectation over the model's predictive distribution (closed form).
    True,
    /// Labels sampled from the predictive distribution (--mc-samples K, --seed S).
    Mc,
}

/// The form, as spelled on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FormArg {
    /// F (P×P).
    Full,
    /// diag(F) (P).
    Diag,
    /// One block per Linear layer.
    Layer,
    /// KFAC factors A and G per Linear layer.
    Kfac,
    /// The per-sample gradient rows G (N·R × P) with F = GᵀG/N.
    Grads,
    /// Per-sample squared gradient norms (N).
    Norms,
}

impl From<FormArg> for NetForm {
    fn from(form: FormArg) -> NetForm {
        match form {
            FormArg::Full => NetForm::Full,
            FormArg::Diag => NetForm::Diagonal,
            FormArg::Layer => NetForm::Layer,
            FormArg::Kfac => NetForm::Kfac,
            FormArg::Grads => NetForm::Grads,
            FormArg::Norms => NetForm::Norms,
        }
    }
}

/// The CLI spelling of a network form.
pub fn form_name(form: NetForm) -> &'static str {
    match form {
        NetForm::Full => "full",
        NetForm::Diagonal => "diag",
        NetForm::Layer => "layer",
        NetForm::Kfac => "kfac",
        NetForm::Grads => "grads",
        NetForm::Norms => "norms",
    }
}

/// The CLI spelling of a variant.
pub fn variant_name(variant: Variant) -> &'static str {
    match variant {
        Variant::Empirical => "empirical",
        Variant::True => "true",
        Variant::MonteCarlo { .. } => "mc",
    }
}

/// The CLI spelling of a likelihood.
pub fn likelihood_name(likelihood: Likelihood) -> &'static str {
    match likelihood {
        Likelihood::Categorical => "categorical",
        Likelihood::Gaussian => "gaussian",
    }
}

/// `--likelihood`, `--variant`, `--mc-samples` and `--seed`, shared by `fisher compute`,
/// `fisher report` (through [`ModelArgs`]) and `fisher action` (flattened; validated by
/// [`VariantArgs::variant`] and [`VariantArgs::likelihood`]).
#[derive(Debug, Args)]
pub struct VariantArgs {
    /// The likelihood the outputs define [default: categorical].
    #[arg(long, value_enum)]
    pub likelihood: Option<LikelihoodArg>,

    /// Which expectation over the labels [default: true].
    #[arg(long, value_enum)]
    pub variant: Option<VariantArg>,

    /// Labels drawn per input for --variant mc [default: 1].
    #[arg(long, value_name = "K")]
    pub mc_samples: Option<usize>,

    /// Seed of the label draws for --variant mc [default: 0].
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,
}

impl VariantArgs {
    /// The variant (true unless given); `--mc-samples` and `--seed` only with `--variant mc`.
    /// `seed_hint` is appended to the refusal of a `--seed` without it.
    pub fn variant(&self, seed_hint: &str) -> anyhow::Result<Variant> {
        if self.mc_samples == Some(0) {
            return Err(usage("--mc-samples must be at least 1"));
        }
        let variant = self.variant.unwrap_or(VariantArg::True);
        if variant != VariantArg::Mc {
            if self.mc_samples.is_some() {
                return Err(usage("--mc-samples only applies to --variant mc"));
            }
            if self.seed.is_some() {
                return Err(usage(format!("--seed only applies to --variant mc (the label draws){seed_hint}")));
            }
        }
        Ok(match variant {
            VariantArg::Empirical => Variant::Empirical,
            VariantArg::True => Variant::True,
            VariantArg::Mc => Variant::MonteCarlo { samples: self.mc_samples.unwrap_or(1), seed: self.seed.unwrap_or(0) },
        })
    }

    /// The likelihood (categorical unless `--likelihood gaussian`).
    pub fn likelihood(&self) -> Likelihood {
        match self.likelihood.unwrap_or(LikelihoodArg::Categorical) {
            LikelihoodArg::Categorical => Likelihood::Categorical,
            LikelihoodArg::Gaussian => Likelihood::Gaussian,
        }
    }
}

/// The model, data, variant and backend flags that `fisher compute` and `fisher report`
/// share (flattened into each command's flags; validated by [`ModelArgs::source`],
/// [`ModelArgs::variant`], [`ModelArgs::likelihood`] and [`ModelArgs::backend`]).
/// `--activation` is not here: `compute` requires it, `report` only with a model.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// The model: an nn.Sequential of Linear layers (and activations) saved with
    /// safetensors.torch.save_file(model.state_dict(), path).
    #[arg(long, value_name = "M.safetensors", conflicts_with = "synthetic_model")]
    pub weights: Option<PathBuf>,

    /// Inputs: an N×d float32/float64 .npy file.
    #[arg(long, value_name = "X.npy", conflicts_with = "synthetic_model")]
    pub inputs: Option<PathBuf>,

    /// Labels: class indices of shape (N,) in any integer dtype, e.g. int64, int32, uint8
    /// (categorical), or N×k float targets (gaussian).
    #[arg(long, value_name = "y.npy", conflicts_with = "synthetic_model")]
    pub labels: Option<PathBuf>,

    /// Likelihood and variant.
    #[command(flatten)]
    pub variant: VariantArgs,

    /// Backend and adapter.
    #[command(flatten)]
    pub backend: BackendArgs,

    /// Instead of --weights: a seeded He-initialized MLP with these layer widths (input,
    /// hidden..., output), e.g. 784,512,512,10; Linear layers at indices 0, 2, 4, ...
    #[arg(long, value_name = "WIDTHS")]
    pub synthetic_model: Option<String>,

    /// Instead of --inputs/--labels: N seeded standard-normal inputs with uniformly drawn
    /// class labels (categorical) or standard-normal targets (gaussian).
    #[arg(long, value_name = "N")]
    pub synthetic_samples: Option<usize>,

    /// Seed of the synthetic model and data [default: 0].
    #[arg(long, value_name = "S")]
    pub synthetic_seed: Option<u64>,
}

impl ModelArgs {
    /// Whether the model and data are to be built in memory (`--synthetic-model` or
    /// `--synthetic-samples` given).
    pub fn is_synthetic(&self) -> bool {
        self.synthetic_model.is_some() || self.synthetic_samples.is_some()
    }

    /// Files or a synthetic problem: exactly one of the two, complete. Each refusal names the
    /// flag at fault.
    pub fn source(&self) -> anyhow::Result<Source> {
        if self.is_synthetic() {
            for (given, flag) in
                [(self.weights.is_some(), "--weights"), (self.inputs.is_some(), "--inputs"), (self.labels.is_some(), "--labels")]
            {
                if given {
                    return Err(usage(format!(
                        "{flag} cannot be combined with --synthetic-model/--synthetic-samples (which build the model and the data in memory)"
                    )));
                }
            }
            let (Some(widths), Some(samples)) = (&self.synthetic_model, self.synthetic_samples) else {
                return Err(usage("--synthetic-model WIDTHS and --synthetic-samples N go together"));
            };
            return parse_synthetic(widths, samples, self.synthetic_seed.unwrap_or(0));
        }
        if self.synthetic_seed.is_some() {
            return Err(usage("--synthetic-seed only applies to --synthetic-model runs"));
        }
        let missing: Vec<&str> = [
            (self.weights.is_none(), "--weights M.safetensors"),
            (self.inputs.is_none(), "--inputs X.npy"),
            (self.labels.is_none(), "--labels y.npy"),
        ]
        .into_iter()
        .filter_map(|(missing, flag)| missing.then_some(flag))
        .collect();
        if !missing.is_empty() {
            return Err(usage(format!(
                "missing {} (or build a model and data in memory with --synthetic-model WIDTHS --synthetic-samples N)",
                missing.join(", ")
            )));
        }
        Ok(Source::Files {
            weights: self.weights.clone().expect("checked"),
            inputs: self.inputs.clone().expect("checked"),
            labels: self.labels.clone().expect("checked"),
        })
    }

    /// The variant; `--mc-samples` and `--seed` only with `--variant mc`.
    pub fn variant(&self) -> anyhow::Result<Variant> {
        self.variant.variant("; the synthetic model's seed is --synthetic-seed")
    }

    /// The likelihood (categorical unless `--likelihood gaussian`).
    pub fn likelihood(&self) -> Likelihood {
        self.variant.likelihood()
    }

    /// The backend and the adapter choice; `--adapter` needs a GPU and a non-empty name.
    pub fn backend(&self) -> anyhow::Result<(Backend, GpuOptions)> {
        self.backend.resolve()
    }
}

/// Raw flags of `fisher compute`.
#[derive(Debug, Args)]
pub struct ComputeArgs {
    /// The activation after every Linear layer but the last: relu, tanh, sigmoid, gelu
    /// (exact, erf) or identity; or a JSON list with one per gap, e.g. '["tanh","relu"]',
    /// inline or in a .json file.
    #[arg(long, value_name = "NAME|JSON|FILE")]
    pub activation: String,

    /// Model, data, variant and backend.
    #[command(flatten)]
    pub model: ModelArgs,

    /// What to compute (see below).
    #[arg(long, value_enum)]
    pub form: Option<FormArg>,

    /// Output safetensors file. Written atomically: complete or absent.
    #[arg(long, value_name = "F.safetensors")]
    pub out: Option<PathBuf>,

    /// Also compute the f64 reference (an independent per-sample backprop) and report the
    /// disagreement; beyond ‖Δ‖/‖ref‖ = 1e-5 the run fails (exit 1) and writes nothing.
    #[arg(long)]
    pub verify: bool,

    /// Refuse, before computing, a result (full, layer, grads; with --verify also its f64
    /// reference) larger than this many GiB of host memory.
    #[arg(long, value_name = "GIB", default_value_t = 2.0)]
    pub max_result_gib: f64,

    /// Print one JSON line instead of the human summary.
    #[arg(long)]
    pub json: bool,

    /// Print nothing on success (errors are still reported).
    #[arg(long, conflicts_with = "json")]
    pub quiet: bool,

    /// Write the synthetic model as a PyTorch state-dict safetensors file.
    #[arg(long, value_name = "M.safetensors")]
    pub save_model: Option<PathBuf>,

    /// Write the synthetic data to DIR/inputs.npy and DIR/labels.npy (DIR is created).
    #[arg(long, value_name = "DIR")]
    pub save_data: Option<PathBuf>,
}

/// Where the model and the data come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Files.
    Files {
        /// The state-dict safetensors file.
        weights: PathBuf,
        /// Inputs (.npy).
        inputs: PathBuf,
        /// Labels or targets (.npy).
        labels: PathBuf,
    },
    /// Built in memory.
    Synthetic {
        /// Layer widths: input, hidden..., output.
        widths: Vec<usize>,
        /// N.
        samples: usize,
        /// Seed of the weights and the data.
        seed: u64,
    },
}

/// A validated `fisher compute` invocation.
#[derive(Debug, Clone)]
pub struct ComputeConfig {
    /// Model and data.
    pub source: Source,
    /// Activations between the layers.
    pub activation: ActivationSpec,
    /// The spelling of --activation, for the reproduction hint.
    pub activation_text: String,
    /// The likelihood.
    pub likelihood: Likelihood,
    /// The variant.
    pub variant: Variant,
    /// The form (`None`: only save the synthetic files).
    pub form: Option<NetForm>,
    /// Requested compute path.
    pub backend: Backend,
    /// Adapter choice.
    pub gpu: GpuOptions,
    /// Output file (present exactly when `form` is).
    pub out: Option<PathBuf>,
    /// Compare with the f64 reference.
    pub verify: bool,
    /// Largest result (and reference) held in host memory.
    pub max_result_bytes: u128,
    /// Where to save the synthetic model.
    pub save_model: Option<PathBuf>,
    /// Where to save the synthetic data.
    pub save_data: Option<PathBuf>,
    /// Output style.
    pub report: Report,
}

impl ComputeConfig {
    /// Validates raw flags. Cross-flag rules are checked here, not (only) by clap, so that
    /// each refusal names the flag at fault.
    pub fn from_args(args: ComputeArgs) -> anyhow::Result<Self> {
        if !args.model.is_synthetic() {
            for (given, flag) in [(args.save_model.is_some(), "--save-model"), (args.save_data.is_some(), "--save-data")] {
                if given {
                    return Err(usage(format!("{flag} only applies to --synthetic-model runs")));
                }
            }
        }
        let source = args.model.source()?;
        let variant = args.model.variant()?;
        let likelihood = args.model.likelihood();
        let activation = ActivationSpec::parse(&args.activation)
            .map_err(|e| anyhow::Error::new(e).context("bad --activation"))?;

        let saves = args.save_model.is_some() || args.save_data.is_some();
        let form = args.form.map(NetForm::from);
        match (form, &args.out) {
            (Some(_), Some(_)) => {}
            (Some(_), None) => return Err(usage("--out F.safetensors is required")),
            (None, Some(_)) => return Err(usage("--out needs --form full|diag|layer|kfac|grads|norms")),
            (None, None) if saves => {
                if args.verify {
                    return Err(usage("--verify needs --form and --out (without them the run only saves the synthetic files)"));
                }
            }
            (None, None) => return Err(usage("--form full|diag|layer|kfac|grads|norms and --out F.safetensors are required")),
        }

        let (backend, gpu) = args.model.backend()?;
        if !(args.max_result_gib.is_finite() && args.max_result_gib > 0.0) {
            return Err(usage(format!("--max-result-gib must be a positive number, not {}", args.max_result_gib)));
        }
        let report = Report::from_flags(args.json, args.quiet);
        Ok(ComputeConfig {
            source,
            activation,
            activation_text: args.activation,
            likelihood,
            variant,
            form,
            backend,
            gpu,
            out: args.out,
            verify: args.verify,
            max_result_bytes: (args.max_result_gib * (1u64 << 30) as f64) as u128,
            save_model: args.save_model,
            save_data: args.save_data,
            report,
        })
    }
}

/// Parses `--synthetic-model` widths and checks the sizes.
fn parse_synthetic(spec: &str, samples: usize, seed: u64) -> anyhow::Result<Source> {
    let bad = || {
        usage(format!(
            "bad --synthetic-model '{spec}': expected at least two positive layer widths (input,...,output), e.g. 784,512,512,10"
        ))
    };
    let widths = spec
        .split(',')
        .map(|w| w.trim().parse::<usize>().ok().filter(|&w| w > 0))
        .collect::<Option<Vec<usize>>>()
        .ok_or_else(bad)?;
    if widths.len() < 2 {
        return Err(bad());
    }
    if samples == 0 {
        return Err(usage("--synthetic-samples must be at least 1"));
    }
    let params: u128 = widths.windows(2).map(|w| w[1] as u128 * (w[0] as u128 + 1)).sum();
    let inputs = samples as u128 * widths[0] as u128;
    if params > MAX_SYNTHETIC_VALUES || inputs > MAX_SYNTHETIC_VALUES {
        return Err(usage(format!(
            "--synthetic-model {spec} --synthetic-samples {samples} would generate {params} parameters and {inputs} \
             input values in memory (limit {MAX_SYNTHETIC_VALUES} each)"
        )));
    }
    Ok(Source::Synthetic { widths, samples, seed })
}

/// The seeded synthetic problem: He-initialized Linear layers (weights N(0, 2/in), biases
/// N(0, 10⁻⁴)) at Sequential indices 0, 2, 4, … (an activation module between each pair),
/// standard-normal inputs, and uniformly drawn class labels (categorical) or standard-normal
/// targets (Gaussian). Same seed, same problem, on every platform.
pub fn synthetic_problem(
    widths: &[usize],
    samples: usize,
    seed: u64,
    activation: &ActivationSpec,
    likelihood: Likelihood,
) -> fisher_engine::Result<(Mlp, Dataset)> {
    let mut rng = SplitMix64::new(seed);
    let layers: Vec<Linear> = widths
        .windows(2)
        .enumerate()
        .map(|(l, w)| {
            let scale = (2.0 / w[0] as f64).sqrt();
            Linear {
                index: 2 * l,
                weight: ndarray::Array2::from_shape_simple_fn((w[1], w[0]), || (rng.normal() * scale) as f32),
                bias: Some(Array1::from_shape_simple_fn(w[1], || (rng.normal() * 0.01) as f32)),
            }
        })
        .collect();
    let activations = activation.for_gaps(layers.len() - 1)?;
    let mlp = Mlp::new(layers, activations)?;
    // Independent streams for the inputs and the targets (SplitMix64 streams from distinct
    // seeds do not overlap in any practical length).
    let inputs = normal_matrix(samples, widths[0], seed ^ 0x1A7E_5EED_0000_0001);
    let outputs = mlp.output_dim();
    let targets = match likelihood {
        Likelihood::Categorical => {
            let mut labels = SplitMix64::new(seed ^ 0x1A7E_5EED_0000_0002);
            Targets::Classes((0..samples).map(|_| labels.below(outputs as u64) as u32).collect())
        }
        Likelihood::Gaussian => Targets::Values(normal_matrix(samples, outputs, seed ^ 0x1A7E_5EED_0000_0003)),
    };
    Ok((mlp, Dataset { inputs, targets }))
}

/// Wall-clock seconds per stage.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Seconds {
    /// Reading and checking (or generating) the model and the data.
    pub load: f64,
    /// Writing the synthetic files (--save-model, --save-data).
    pub save: f64,
    /// Choosing an adapter, creating the device and building the kernels.
    pub setup: f64,
    /// The Fisher computation, including transfers.
    pub compute: f64,
    /// The f64 reference and the comparison (0 without --verify).
    pub verify: f64,
    /// Writing the output file.
    pub write: f64,
}

/// What a `compute` run did, for the report.
#[derive(Debug)]
pub struct Outcome {
    /// Model and data source.
    pub source: Source,
    /// Layer widths: input, then every layer's output.
    pub widths: Vec<usize>,
    /// The layers' Sequential indices.
    pub layer_indices: Vec<usize>,
    /// Activation names, one per gap.
    pub activations: Vec<&'static str>,
    /// P.
    pub params: usize,
    /// N.
    pub samples: usize,
    /// The likelihood.
    pub likelihood: Likelihood,
    /// The variant.
    pub variant: Variant,
    /// R.
    pub rows_per_sample: usize,
    /// The form, `None` when the run only saved synthetic files.
    pub form: Option<NetForm>,
    /// The backend's label.
    pub backend: Option<String>,
    /// GPU adapter name, when on a GPU.
    pub adapter: Option<String>,
    /// Why Auto fell back to the CPU.
    pub fallback: Option<String>,
    /// Names and shapes of the written tensors.
    pub tensors: Vec<(String, Vec<usize>)>,
    /// tr F (kfac: tr(G ⊗ A) summed over layers).
    pub trace: Option<f64>,
    /// Agreement with the f64 reference (`--verify`); always a pass here.
    pub verification: Option<Verdict>,
    /// The file written and its size.
    pub out: Option<(PathBuf, u64)>,
    /// Synthetic files written.
    pub saved: Saved,
    /// Seconds per stage.
    pub seconds: Seconds,
    /// The --activation spelling (for the reproduction hint).
    pub activation_text: String,
}

/// The synthetic files a run wrote.
#[derive(Debug, Default, Clone)]
pub struct Saved {
    /// The model file.
    pub model: Option<PathBuf>,
    /// Inputs and labels.
    pub data: Option<(PathBuf, PathBuf)>,
}

/// Bytes of host memory the result of `form` holds (f32), or `None` for forms that are
/// small by construction (diag, kfac, norms: P, Σ (in+1)² + out², N values).
fn result_values(mlp: &Mlp, samples: usize, rows: usize, form: NetForm) -> Option<(u128, String)> {
    let p = mlp.num_params() as u128;
    match form {
        NetForm::Full => Some((p * p, format!("P×P = {p}×{p}"))),
        NetForm::Layer => {
            let values = mlp.layers.iter().map(|l| (l.num_params() as u128).pow(2)).sum();
            Some((values, "Σ_l P_l²".to_string()))
        }
        NetForm::Grads => Some((
            samples as u128 * rows as u128 * p,
            format!("N·R×P = {samples}·{rows}×{p}"),
        )),
        NetForm::Diagonal | NetForm::Kfac | NetForm::Norms => None,
    }
}

/// Refuses (exit 2), before anything is computed, a result larger than the limit.
fn check_result_size(cfg: &ComputeConfig, mlp: &Mlp, samples: usize, rows: usize, form: NetForm) -> anyhow::Result<()> {
    let Some((values, what)) = result_values(mlp, samples, rows, form) else { return Ok(()) };
    // f32 result, plus the f64 reference under --verify.
    let bytes_needed = values * if cfg.verify { 4 + 8 } else { 4 };
    if bytes_needed <= cfg.max_result_bytes {
        return Ok(());
    }
    let hint = match form {
        NetForm::Grads if rows > 1 => {
            "; --form norms gives the per-sample squared norms without materializing gradients, and \
             --variant empirical has R = 1 row per sample"
        }
        NetForm::Grads => "; --form norms gives the per-sample squared norms without materializing gradients",
        _ => "; --form diag and --form kfac stay small for any model",
    };
    let size = |b: u128| bytes(u64::try_from(b).unwrap_or(u64::MAX));
    Err(usage(format!(
        "--form {} holds {what} values ({}{}) in host memory, beyond the --max-result-gib limit of {}{hint}",
        form_name(form),
        size(bytes_needed),
        if cfg.verify { " with its f64 reference for --verify" } else { "" },
        size(cfg.max_result_bytes),
    )))
}

/// Loads (or builds) the model and the data, and checks them against each other.
fn load(cfg: &ComputeConfig) -> anyhow::Result<(Mlp, Dataset)> {
    load_model_and_data(&cfg.source, &cfg.activation, cfg.likelihood)
}

/// Loads the model and the data from files, or builds the synthetic problem, and checks them
/// against each other (the files at fault are named).
pub fn load_model_and_data(
    source: &Source,
    activation: &ActivationSpec,
    likelihood: Likelihood,
) -> anyhow::Result<(Mlp, Dataset)> {
    match source {
        Source::Files { weights, inputs, labels } => {
            let mlp = Mlp::from_safetensors(weights, activation)?;
            let data = Dataset::from_npy(inputs, labels, likelihood)?;
            data.validate(&mlp, likelihood).with_context(|| {
                format!(
                    "{} and {} do not fit the model {}",
                    inputs.display(),
                    labels.display(),
                    weights.display()
                )
            })?;
            Ok((mlp, data))
        }
        Source::Synthetic { widths, samples, seed } => {
            let (mlp, data) = synthetic_problem(widths, *samples, *seed, activation, likelihood)
                .context("building the synthetic model")?;
            Ok((mlp, data))
        }
    }
}

/// Writes the synthetic model and data where asked.
fn save_synthetic(cfg: &ComputeConfig, mlp: &Mlp, data: &Dataset) -> anyhow::Result<Saved> {
    let mut saved = Saved::default();
    if let Some(path) = &cfg.save_model {
        mlp.to_safetensors(path)?;
        saved.model = Some(path.clone());
    }
    if let Some(dir) = &cfg.save_data {
        std::fs::create_dir_all(dir).map_err(|e| fisher_engine::FisherError::Io {
            path: dir.display().to_string(),
            message: format!("cannot create the data directory: {e}"),
        })?;
        let inputs = dir.join("inputs.npy");
        let labels = dir.join("labels.npy");
        io::write_npy_matrix(&inputs, data.inputs.view())?;
        match &data.targets {
            Targets::Classes(classes) => io::write_npy_labels(&labels, classes)?,
            Targets::Values(values) => io::write_npy_matrix(&labels, values.view())?,
        }
        saved.data = Some((inputs, labels));
    }
    Ok(saved)
}

/// Checks, before anything is built or written, that every output location can be written.
fn check_output_locations(cfg: &ComputeConfig) -> anyhow::Result<()> {
    if let Some(out) = &cfg.out {
        io::check_output_path(out)?;
    }
    if let Some(model) = &cfg.save_model {
        io::check_output_path(model)?;
    }
    if let Some(dir) = &cfg.save_data {
        if dir.exists() && !dir.is_dir() {
            return Err(fisher_engine::FisherError::Io {
                path: dir.display().to_string(),
                message: "--save-data needs a directory, but this is a file".into(),
            }
            .into());
        }
    }
    Ok(())
}

/// An array's values in row-major order, without a copy when it already is one contiguous
/// row-major buffer.
fn row_major<D: Dimension>(a: Array<f32, D>) -> Vec<f32> {
    let len = a.len();
    if a.is_standard_layout() {
        let (values, offset) = a.into_raw_vec_and_offset();
        if offset.unwrap_or(0) == 0 && values.len() == len {
            return values;
        }
        // A standard-layout view into a larger buffer: the values start at `offset`.
        let start = offset.unwrap_or(0);
        return values[start..start + len].to_vec();
    }
    a.iter().copied().collect()
}

/// The result's tensors, named as `fisher compute --help` documents them, consuming the
/// result (so that its values are not held twice while writing).
pub fn named_tensors(result: NetFisher, mlp: &Mlp) -> Vec<NamedTensor> {
    let shape2 = |a: &ndarray::Array2<f32>| vec![a.nrows(), a.ncols()];
    match result {
        NetFisher::Full(m) => vec![("fisher".into(), shape2(&m), row_major(m))],
        NetFisher::Diagonal(d) => vec![("diag".into(), vec![d.len()], row_major(d))],
        NetFisher::Grads(g) => vec![("grads".into(), shape2(&g), row_major(g))],
        NetFisher::Norms(n) => vec![("norms".into(), vec![n.len()], row_major(n))],
        NetFisher::Layer(blocks) => blocks
            .into_iter()
            .zip(&mlp.layers)
            .map(|(b, layer)| (format!("block.{}", layer.index), shape2(&b), row_major(b)))
            .collect(),
        NetFisher::Kfac(factors) => factors
            .into_iter()
            .zip(&mlp.layers)
            .flat_map(|(f, layer)| {
                [
                    (format!("kfac.{}.A", layer.index), shape2(&f.a), row_major(f.a)),
                    (format!("kfac.{}.G", layer.index), shape2(&f.g), row_major(f.g)),
                ]
            })
            .collect(),
    }
}

/// tr F from a result: the trace of full/layer, the sum of diag, the mean of the norms,
/// Σ‖row‖²/N for the grads (whatever R is), and Σ_l tr(G_l)·tr(A_l) = tr(G ⊗ A) for kfac.
fn trace_of(result: &NetFisher, samples: usize) -> f64 {
    match result {
        NetFisher::Grads(g) => g.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / samples.max(1) as f64,
        other => other.trace(),
    }
}

/// The safetensors metadata of a result (also of `fisher demo`'s fisher.safetensors).
pub fn metadata(
    mlp: &Mlp,
    samples: usize,
    likelihood: Likelihood,
    variant: Variant,
    form: NetForm,
    backend: &str,
) -> std::collections::HashMap<String, String> {
    let rows = rows_per_sample(variant, mlp.output_dim());
    let normalization = match form {
        NetForm::Grads => format!(
            "rows scaled so that F = GᵀG/N; row i·{rows} + r is output row r of sample i ({rows} per sample)"
        ),
        NetForm::Norms => "none: per-sample Σ_r ‖g_ir‖² (their mean is tr F)".to_string(),
        _ => "1/N (mean over samples)".to_string(),
    };
    let mut m = std::collections::HashMap::from([
        ("form".to_string(), form_name(form).to_string()),
        ("variant".to_string(), variant_name(variant).to_string()),
        ("likelihood".to_string(), likelihood_name(likelihood).to_string()),
        ("samples".to_string(), samples.to_string()),
        ("parameters".to_string(), mlp.num_params().to_string()),
        ("rows_per_sample".to_string(), rows.to_string()),
        ("backend".to_string(), backend.to_string()),
        ("activations".to_string(), json!(mlp.activations.iter().map(|a| a.name()).collect::<Vec<_>>()).to_string()),
        ("layers".to_string(), json!(widths_of(mlp)).to_string()),
        ("layer_indices".to_string(), json!(mlp.layers.iter().map(|l| l.index).collect::<Vec<_>>()).to_string()),
        ("param_order".to_string(), PARAM_ORDER_NOTE.to_string()),
        ("normalization".to_string(), normalization),
        ("fisher_engine_version".to_string(), env!("CARGO_PKG_VERSION").to_string()),
    ]);
    if let Variant::MonteCarlo { samples: k, seed } = variant {
        m.insert("mc_samples".into(), k.to_string());
        m.insert("seed".into(), seed.to_string());
    }
    if form == NetForm::Kfac {
        m.insert("kfac_layout".into(), KFAC_LAYOUT_NOTE.to_string());
    }
    m
}

/// Input width, then every layer's output width.
pub fn widths_of(mlp: &Mlp) -> Vec<usize> {
    std::iter::once(mlp.input_dim()).chain(mlp.layers.iter().map(Linear::fan_out)).collect()
}

/// Runs `fisher compute`.
pub fn run(cfg: &ComputeConfig) -> anyhow::Result<Outcome> {
    let mut seconds = Seconds::default();
    check_output_locations(cfg)?;

    let start = Instant::now();
    let (mlp, data) = load(cfg)?;
    seconds.load = start.elapsed().as_secs_f64();
    let samples = data.len();
    let rows = rows_per_sample(cfg.variant, mlp.output_dim());
    if let Some(form) = cfg.form {
        check_result_size(cfg, &mlp, samples, rows, form)?;
    }

    let start = Instant::now();
    let saved = save_synthetic(cfg, &mlp, &data)?;
    seconds.save = start.elapsed().as_secs_f64();

    let mut outcome = Outcome {
        source: cfg.source.clone(),
        widths: widths_of(&mlp),
        layer_indices: mlp.layers.iter().map(|l| l.index).collect(),
        activations: mlp.activations.iter().map(|a| a.name()).collect(),
        params: mlp.num_params(),
        samples,
        likelihood: cfg.likelihood,
        variant: cfg.variant,
        rows_per_sample: rows,
        form: cfg.form,
        backend: None,
        adapter: None,
        fallback: None,
        tensors: Vec::new(),
        trace: None,
        verification: None,
        out: None,
        saved,
        seconds,
        activation_text: cfg.activation_text.clone(),
    };
    let (Some(form), Some(out)) = (cfg.form, &cfg.out) else {
        return Ok(outcome); // only saving the synthetic files
    };

    let start = Instant::now();
    let device = device::open(&DeviceRequest::from_env(cfg.backend, cfg.gpu.clone())?)?;
    outcome.seconds.setup = start.elapsed().as_secs_f64();
    let engine = &device.engine;
    let backend = engine.device_info();

    let start = Instant::now();
    let result = engine.fisher(&mlp, &data, cfg.variant, form)?;
    outcome.seconds.compute = start.elapsed().as_secs_f64();

    if cfg.verify {
        let start = Instant::now();
        let reference = fisher_engine::reference::network::fisher(&mlp, &data, cfg.likelihood, cfg.variant, form)
            .context("computing the f64 reference")?;
        let verdict = Verdict::judge(result.agreement(&reference)?, Contract::Network);
        drop(reference);
        outcome.seconds.verify = start.elapsed().as_secs_f64();
        outcome.verification = Some(verdict.require(&backend)?);
    }

    outcome.trace = Some(trace_of(&result, samples));
    let named = named_tensors(result, &mlp);
    outcome.tensors = named.iter().map(|(name, shape, _)| (name.clone(), shape.clone())).collect();

    let start = Instant::now();
    let meta = metadata(&mlp, samples, cfg.likelihood, cfg.variant, form, &backend);
    io::write_safetensors_atomic(out, &named, Some(meta))?;
    outcome.seconds.write = start.elapsed().as_secs_f64();
    let size = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    outcome.out = Some((out.clone(), size));
    outcome.backend = Some(backend);
    outcome.adapter = device.adapter.map(|a| a.name);
    outcome.fallback = device.fallback;
    Ok(outcome)
}

// ---------------------------------------------------------------------------------------
// Reports

fn bytes(n: u64) -> String {
    let mut value = n as f64;
    for unit in ["B", "KiB", "MiB", "GiB"] {
        if value < 1024.0 {
            return if unit == "B" { format!("{n} B") } else { format!("{value:.1} {unit}") };
        }
        value /= 1024.0;
    }
    format!("{value:.1} TiB")
}

/// `a-b-c` widths and the activation(s), e.g. `64-32-10 tanh MLP`.
fn architecture(o: &Outcome) -> String {
    let widths = o.widths.iter().map(usize::to_string).collect::<Vec<_>>().join("-");
    let mut names: Vec<&str> = o.activations.clone();
    names.dedup();
    let act = match names.as_slice() {
        [] => "linear".to_string(),
        [one] => one.to_string(),
        _ => o.activations.join("/"),
    };
    format!("{widths} {act} MLP")
}

fn variant_text(o: &Outcome) -> String {
    match o.variant {
        Variant::Empirical => "empirical (observed labels, 1 row per sample)".to_string(),
        Variant::True => format!("true (closed-form expectation, {} rows per sample)", o.rows_per_sample),
        Variant::MonteCarlo { samples, seed } => {
            format!("mc ({samples} sampled label(s) per input, seed {seed})")
        }
    }
}

fn form_text(form: NetForm) -> &'static str {
    match form {
        NetForm::Full => "full: the Fisher matrix F (P×P)",
        NetForm::Diagonal => "diag: the diagonal of F",
        NetForm::Layer => "layer: one diagonal block of F per Linear layer",
        NetForm::Kfac => "kfac: per-layer KFAC factors A and G (block ≈ G ⊗ A in [W|b] order)",
        NetForm::Grads => "grads: per-sample gradient rows G with F = GᵀG/N",
        NetForm::Norms => "norms: per-sample squared gradient norms (their mean is tr F)",
    }
}

fn tensor_list(tensors: &[(String, Vec<usize>)]) -> String {
    const SHOWN: usize = 4;
    let mut text =
        tensors.iter().take(SHOWN).map(|(name, shape)| format!("{name} {shape:?}")).collect::<Vec<_>>().join(", ");
    if tensors.len() > SHOWN {
        text.push_str(&format!(", … ({} tensors)", tensors.len()));
    }
    text
}

/// The readable summary of a `compute` run.
pub fn human(o: &Outcome) -> String {
    let mut lines = vec![format!(
        "{}: P = {} parameters, N = {} samples, {} likelihood",
        architecture(o),
        o.params,
        o.samples,
        likelihood_name(o.likelihood)
    )];
    match &o.source {
        Source::Files { weights, inputs, labels } => {
            lines.push(format!("  model     {}", weights.display()));
            lines.push(format!("  data      {} · {}", inputs.display(), labels.display()));
        }
        Source::Synthetic { seed, .. } => {
            lines.push(format!("  model     synthetic, He-initialized (seed {seed}), layers at indices {:?}", o.layer_indices));
        }
    }
    if let Some(model) = &o.saved.model {
        lines.push(format!("  saved     model {}", model.display()));
    }
    if let Some((inputs, labels)) = &o.saved.data {
        lines.push(format!("  saved     data {} · {}", inputs.display(), labels.display()));
    }
    let s = &o.seconds;
    let Some(form) = o.form else {
        lines.push(format!("  seconds   generate {:.3} · save {:.3}", s.load, s.save));
        let weights = o.saved.model.as_ref().map_or("M.safetensors".to_string(), |p| p.display().to_string());
        let (inputs, labels) = o.saved.data.as_ref().map_or(("X.npy".to_string(), "y.npy".to_string()), |(x, y)| {
            (x.display().to_string(), y.display().to_string())
        });
        lines.push(format!(
            "Compute from the files with:\n  fisher compute --weights {weights} --activation '{}' --inputs {inputs} --labels {labels} \
             --likelihood {} --form diag --out F.safetensors",
            o.activation_text,
            likelihood_name(o.likelihood)
        ));
        return lines.join("\n");
    };
    lines.push(format!("  variant   {}", variant_text(o)));
    lines.push(format!("  form      {}", form_text(form)));
    lines.push(format!("  backend   {}", o.backend.as_deref().unwrap_or("?")));
    if let Some(why) = &o.fallback {
        lines.push(format!("            ({why})"));
    }
    let trace_label = if form == NetForm::Kfac { "tr(G⊗A)" } else { "tr F" };
    lines.push(format!(
        "  result    {}   {trace_label} = {:.6e}",
        tensor_list(&o.tensors),
        o.trace.unwrap_or(f64::NAN)
    ));
    if let Some(v) = &o.verification {
        let a = &v.agreement;
        lines.push(format!(
            "  verified  ‖Δ‖/‖ref‖ {:.2e} · max|Δ|/max|ref| {:.2e} · max|Δ| {:.2e} against the f64 reference: {} (‖Δ‖/‖ref‖ ≤ {:.0e})",
            a.frobenius_rel,
            a.max_rel,
            a.max_abs,
            if v.passed { "PASS" } else { "FAIL" },
            v.bound
        ));
    }
    if let Some((path, size)) = &o.out {
        lines.push(format!("  wrote     {} ({})", path.display(), bytes(*size)));
    }
    lines.push(format!(
        "  seconds   load {:.3} · setup {:.3} · compute {:.3} · verify {:.3} · write {:.3}",
        s.load, s.setup, s.compute, s.verify, s.write
    ));
    lines.join("\n")
}

/// The one-line JSON summary of a `compute` run.
pub fn json_line(o: &Outcome) -> String {
    let mut value = json!({
        "parameters": o.params,
        "samples": o.samples,
        "layers": o.widths,
        "layer_indices": o.layer_indices,
        "activations": o.activations,
        "variant": variant_name(o.variant),
        "likelihood": likelihood_name(o.likelihood),
        "rows_per_sample": o.rows_per_sample,
        "form": o.form.map(form_name),
        "backend": o.backend,
        "adapter": o.adapter,
        "trace": o.trace,
        "seconds": o.seconds,
        "out": o.out.as_ref().map(|(path, _)| path.display().to_string()),
        "tensors": o.tensors.iter().map(|(name, shape)| json!({"name": name, "shape": shape})).collect::<Vec<_>>(),
    });
    if let Variant::MonteCarlo { samples, seed } = o.variant {
        value["mc_samples"] = json!(samples);
        value["seed"] = json!(seed);
    }
    match &o.source {
        Source::Files { weights, inputs, labels } => {
            value["weights"] = json!(weights.display().to_string());
            value["inputs"] = json!(inputs.display().to_string());
            value["labels"] = json!(labels.display().to_string());
        }
        Source::Synthetic { seed, .. } => value["synthetic_seed"] = json!(seed),
    }
    if o.saved.model.is_some() || o.saved.data.is_some() {
        value["saved"] = json!({
            "model": o.saved.model.as_ref().map(|p| p.display().to_string()),
            "inputs": o.saved.data.as_ref().map(|(x, _)| x.display().to_string()),
            "labels": o.saved.data.as_ref().map(|(_, y)| y.display().to_string()),
        });
    }
    if let Some(v) = &o.verification {
        value["verification"] = json!(v);
    }
    value.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use fisher_engine::Engine;

    #[test]
    fn synthetic_widths() {
        assert_eq!(
            parse_synthetic("784,512,512,10", 4096, 3).unwrap(),
            Source::Synthetic { widths: vec![784, 512, 512, 10], samples: 4096, seed: 3 }
        );
        for bad in ["784", "0,5", "5,0", "a,b", "5,-1", "", "3,,2"] {
            assert!(parse_synthetic(bad, 10, 0).is_err(), "{bad}");
        }
        assert!(parse_synthetic("4,2", 0, 0).is_err());
        assert!(parse_synthetic("100000,100000", 1, 0).is_err());
    }

    #[test]
    fn synthetic_problem_is_seeded_and_valid() {
        let spec = ActivationSpec::parse("tanh").unwrap();
        let (mlp, data) = synthetic_problem(&[5, 4, 3], 20, 7, &spec, Likelihood::Categorical).unwrap();
        assert_eq!(widths_of(&mlp), [5, 4, 3]);
        assert_eq!(mlp.layers.iter().map(|l| l.index).collect::<Vec<_>>(), [0, 2]);
        data.validate(&mlp, Likelihood::Categorical).unwrap();
        let again = synthetic_problem(&[5, 4, 3], 20, 7, &spec, Likelihood::Categorical).unwrap();
        assert_eq!((mlp.clone(), data.clone()), again);
        let other = synthetic_problem(&[5, 4, 3], 20, 8, &spec, Likelihood::Categorical).unwrap();
        assert_ne!(mlp, other.0);
        let (_, gauss) = synthetic_problem(&[5, 4, 3], 20, 7, &spec, Likelihood::Gaussian).unwrap();
        assert_eq!(gauss.likelihood(), Likelihood::Gaussian);
    }

    #[test]
    fn tensors_are_named_by_sequential_index_without_copies() {
        let spec = ActivationSpec::parse("relu").unwrap();
        let (mlp, data) = synthetic_problem(&[3, 4, 2], 5, 1, &spec, Likelihood::Categorical).unwrap();
        let kfac = Engine::cpu().fisher(&mlp, &data, Variant::True, NetForm::Kfac).unwrap();
        let names: Vec<(String, Vec<usize>)> =
            named_tensors(kfac, &mlp).into_iter().map(|(n, s, v)| {
                assert_eq!(v.len(), s.iter().product::<usize>());
                (n, s)
            }).collect();
        assert_eq!(
            names,
            [
                ("kfac.0.A".to_string(), vec![4, 4]),
                ("kfac.0.G".to_string(), vec![4, 4]),
                ("kfac.2.A".to_string(), vec![5, 5]),
                ("kfac.2.G".to_string(), vec![2, 2]),
            ]
        );
        // A transposed (non-standard) array is written in logical row-major order.
        let m = ndarray::array![[1.0f32, 2.0], [3.0, 4.0]];
        assert_eq!(row_major(m.t().to_owned()), [1.0, 3.0, 2.0, 4.0]);
        assert_eq!(row_major(m.clone().reversed_axes()), [1.0, 3.0, 2.0, 4.0]);
    }
}
