//! The public entry point: choose a backend once, then reduce gradients to Fisher forms.

use ndarray::{ArrayView1, ArrayView2};

use crate::backend::FisherBackend;
use crate::backend::cpu::CpuBackend;
use crate::reference::grads as reference;
use crate::error::{FisherError, Result};
use crate::fisher::{Agreement, FisherMatrix, Form};
use crate::backend::gpu::{GpuBackend, GpuContext, GpuOptions};
use crate::model::{DataSource, Dataset, Mlp};
use crate::fisher::{NetFisher, NetForm, Variant};
use crate::validate::check_matrix;

/// Which compute path to use (the policy is [`crate::device`]'s).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// A hardware GPU adapter when one exists, otherwise the CPU path; a software adapter
    /// (lavapipe, llvmpipe) only when named (`--adapter`, `FISHER_ADAPTER`).
    #[default]
    Auto,
    /// A GPU adapter (software ones accepted) or [`FisherError::NoAdapter`].
    Gpu,
    /// The multi-threaded f32 CPU path.
    Cpu,
}

impl Backend {
    /// Every backend, in the order `--help` lists them.
    pub const ALL: [Backend; 3] = [Backend::Auto, Backend::Gpu, Backend::Cpu];

    /// The command-line spelling: `auto`, `gpu`, `cpu`.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::Gpu => "gpu",
            Backend::Cpu => "cpu",
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Backend {
    type Err = FisherError;
    fn from_str(s: &str) -> Result<Self> {
        Backend::ALL.into_iter().find(|b| b.name() == s).ok_or_else(|| {
            FisherError::InvalidInput(format!("unknown backend '{s}' (expected auto, gpu or cpu)"))
        })
    }
}

/// Engine construction options. `Default` = `Backend::Auto`, adapter from `FISHER_ADAPTER`,
/// the adapter's own limits (see [`crate::device`] for the policy).
#[derive(Debug, Clone, Default)]
pub struct EngineOptions {
    /// Which compute path.
    pub backend: Backend,
    /// GPU options (adapter choice, limit overrides).
    pub gpu: GpuOptions,
}

/// A Fisher engine bound to one backend.
pub struct Engine {
    backend: Box<dyn FisherBackend>,
    is_gpu: bool,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("backend", &self.backend.label()).finish()
    }
}

/// Result of a verified reduction: the compute result and its agreement with the f64 reference.
#[derive(Debug, Clone)]
pub struct Verified {
    /// The backend's result.
    pub result: FisherMatrix,
    /// Its disagreement with the f64 reference.
    pub agreement: Agreement,
}

impl Engine {
    /// An engine on `backend` with default options.
    pub fn new(backend: Backend) -> Result<Self> {
        Self::with_options(EngineOptions { backend, ..Default::default() })
    }

    /// An engine with explicit options, opened by [`crate::device::open`] (the one device
    /// policy; use that function directly to also learn which adapter was chosen and why).
    pub fn with_options(options: EngineOptions) -> Result<Self> {
        Ok(crate::device::open(&crate::device::DeviceRequest::from_options(&options)?)?.engine)
    }

    /// An engine on the CPU path.
    pub fn cpu() -> Self {
        Engine { backend: Box::new(CpuBackend::new()), is_gpu: false }
    }

    /// An engine on a CPU backend the caller configured (e.g. its result limit).
    pub fn from_cpu_backend(backend: CpuBackend) -> Self {
        Engine { backend: Box::new(backend), is_gpu: false }
    }

    /// An engine on a GPU context the caller made (tests hand in their own).
    pub fn from_context(ctx: GpuContext, options: &GpuOptions) -> Result<Self> {
        Ok(Engine { backend: Box::new(GpuBackend::new(ctx, options)?), is_gpu: true })
    }

    /// An engine on an already built GPU backend (e.g. one whose plan a test inspected).
    pub fn from_gpu_backend(backend: GpuBackend) -> Self {
        Engine { backend: Box::new(backend), is_gpu: true }
    }

    /// Description of the backend in use (adapter name, API, device type, or CPU threads).
    pub fn device_info(&self) -> String {
        self.backend.label()
    }

    /// Whether this engine runs on a GPU adapter.
    pub fn is_gpu(&self) -> bool {
        self.is_gpu
    }

    /// The backend, for streaming use ([`FisherBackend::accumulator`]).
    pub fn backend(&self) -> &dyn FisherBackend {
        self.backend.as_ref()
    }

    /// Reduces per-sample gradients `grads` (N×P, row i = gᵢ) to `form`.
    ///
    /// ```
    /// use fisher_engine::{Engine, Backend, Form, FisherMatrix};
    /// let g = fisher_engine::synthetic::normal_matrix(100, 8, 1);
    /// let engine = Engine::new(Backend::Cpu).unwrap();
    /// let FisherMatrix::Full(f) = engine.fisher_from_grads(g.view(), &Form::Full).unwrap() else { panic!() };
    /// assert_eq!(f.dim(), (8, 8));
    /// ```
    pub fn fisher_from_grads(&self, grads: ArrayView2<'_, f32>, form: &Form) -> Result<FisherMatrix> {
        // An empty matrix is refused here, before the form is checked against its width;
        // NaN/±Inf are refused, with their row and column, by the backend, which checks every
        // chunk pushed and the Gram's input (scanning 32 MB twice cost 3 % of W1).
        if grads.is_empty() {
            check_matrix("gradients", grads, 0)?;
        }
        form.validate(grads.ncols())?;
        if *form == Form::Gram {
            return Ok(FisherMatrix::Gram(self.backend.gram(grads)?));
        }
        let mut acc = self.backend.accumulator(form, grads.ncols())?;
        // Output panels beyond the backend's memory take several passes over the rows.
        for pass in 0..acc.passes() {
            if pass > 0 {
                acc.next_pass()?;
            }
            acc.push(grads)?;
        }
        acc.finish()
    }

    /// Like [`Engine::fisher_from_grads`], and also computes the f64 reference and reports
    /// the disagreement.
    pub fn fisher_from_grads_verified(&self, grads: ArrayView2<'_, f32>, form: &Form) -> Result<Verified> {
        let result = self.fisher_from_grads(grads, form)?;
        let reference = reference::reduce(grads, form)?;
        let agreement = result.agreement(&reference)?;
        Ok(Verified { result, agreement })
    }

    /// The Fisher information of `mlp` on `data` (likelihood implied by the targets: class
    /// labels → categorical, values → Gaussian) for `variant`, reduced to `form`.
    ///
    /// Normalization: F = (1/N) Σᵢ E_y[∇θ log p(y|xᵢ) ∇θ log p(y|xᵢ)ᵀ]; parameter order is
    /// PyTorch's `named_parameters()` (see [`crate::model`]).
    pub fn fisher(&self, mlp: &Mlp, data: &dyn DataSource, variant: Variant, form: NetForm) -> Result<NetFisher> {
        check_network(mlp, data, variant)?;
        if u32::try_from(data.len()).is_err() {
            return Err(FisherError::InvalidInput(format!("{} samples exceed the 2³²−1 supported", data.len())));
        }
        self.backend.network_fisher(mlp, data, variant, form)
    }

    /// [`Engine::fisher`] put into `sink` piece by piece (tensors in the order of
    /// [`crate::fisher::sink`]) rather than returned, for the forms that sum over samples
    /// (full, diag, layer, kfac). On the CPU, sums larger than the accumulator budget are
    /// computed in passes over the samples and each band is put as its pass ends, so that
    /// with a sink that writes to a file (what `fisher compute` does) the result is never
    /// whole in memory; the values are bitwise those of [`Engine::fisher`].
    ///
    /// ```
    /// use fisher_engine::backend::cpu::CpuBackend;
    /// use fisher_engine::fisher::{MemorySink, NetForm, SumLayer, Variant};
    /// use fisher_engine::model::{problem::synthetic_problem, ActivationSpec, Likelihood};
    /// let (mlp, data) = synthetic_problem(&[20, 600, 4], 64, 1, &ActivationSpec::parse("tanh")?, Likelihood::Categorical)?;
    /// let whole = fisher_engine::Engine::cpu().fisher(&mlp, &data, Variant::True, NetForm::Diagonal)?;
    /// // 64 KiB of running sums: the 600 rows of the first layer take two passes.
    /// let small = fisher_engine::Engine::from_cpu_backend(CpuBackend::new().with_accumulator_bytes(64 << 10));
    /// let mut sink = MemorySink::new(NetForm::Diagonal, &SumLayer::of(&mlp))?;
    /// small.fisher_into(&mlp, &data, Variant::True, NetForm::Diagonal, &mut sink)?;
    /// assert_eq!(sink.into_fisher(), whole);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn fisher_into(&self, mlp: &Mlp, data: &dyn DataSource, variant: Variant, form: NetForm, sink: &mut dyn crate::fisher::ResultSink) -> Result<()> {
        check_network(mlp, data, variant)?;
        if u32::try_from(data.len()).is_err() {
            return Err(FisherError::InvalidInput(format!("{} samples exceed the 2³²−1 supported", data.len())));
        }
        self.backend.network_fisher_into(mlp, data, variant, form, sink)
    }

    /// The sums of a network's Fisher over the samples `range` of `data`, in blocks of
    /// `block` samples counted from sample 0: one shard of a run (see
    /// [`crate::fisher::sums`]). [`crate::fisher::NetSums::merge`] combines shards and
    /// [`crate::fisher::NetSums::finish`] divides by N; on the CPU, the shards of a run merged
    /// give [`Engine::fisher`]'s result bit for bit (with `block` =
    /// [`crate::fisher::DEFAULT_BLOCK_SAMPLES`]).
    ///
    /// ```
    /// use fisher_engine::fisher::{shard_range, NetForm, NetSums, Variant};
    /// use fisher_engine::model::{problem::synthetic_problem, ActivationSpec, Likelihood};
    /// let (mlp, data) = synthetic_problem(&[6, 5, 3], 300, 1, &ActivationSpec::parse("tanh")?, Likelihood::Categorical)?;
    /// let engine = fisher_engine::Engine::cpu();
    /// let block = 32;
    /// let mut merged: Option<NetSums> = None;
    /// for shard in 0..4 {
    ///     let range = shard_range(data.len(), block, shard, 4);
    ///     let part = engine.fisher_sums(&mlp, &data, Variant::True, NetForm::Diagonal, range, block)?;
    ///     match &mut merged {
    ///         None => merged = Some(part),
    ///         Some(m) => m.merge(&part)?,
    ///     }
    /// }
    /// let one = engine.fisher_sums(&mlp, &data, Variant::True, NetForm::Diagonal, 0..data.len(), block)?;
    /// assert_eq!(merged.unwrap().finish(data.len())?, one.finish(data.len())?);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn fisher_sums(
        &self,
        mlp: &Mlp,
        data: &dyn DataSource,
        variant: Variant,
        form: NetForm,
        range: std::ops::Range<usize>,
        block: usize,
    ) -> Result<crate::fisher::NetSums> {
        check_network(mlp, data, variant)?;
        if u32::try_from(data.len()).is_err() {
            return Err(FisherError::InvalidInput(format!("{} samples exceed the 2³²−1 supported", data.len())));
        }
        if block == 0 || range.start > range.end || range.end > data.len() {
            return Err(FisherError::InvalidInput(format!(
                "samples {}..{} in blocks of {block} are not a part of the {} samples of the data",
                range.start,
                range.end,
                data.len()
            )));
        }
        self.backend.network_sums(mlp, data, variant, form, range, block)
    }

    /// Like [`Engine::fisher`], and also computes the f64 reference (an independent
    /// per-sample backprop) and reports the disagreement.
    pub fn fisher_verified(
        &self,
        mlp: &Mlp,
        data: &dyn DataSource,
        variant: Variant,
        form: NetForm,
    ) -> Result<(NetFisher, crate::fisher::Agreement)> {
        let result = self.fisher(mlp, data, variant, form)?;
        // The reference needs every sample at once: data on disk is read whole here.
        let whole = data.to_dataset()?;
        let reference = crate::reference::network::fisher(mlp, &whole, data.likelihood(), variant, form)?;
        let agreement = result.agreement(&reference)?;
        Ok((result, agreement))
    }

    /// The Fisher of a graph network (read from ONNX, [`crate::graph`]) on `data`, for
    /// `variant`, reduced to `form` over the `selection`'s parameters (θ order: the graph's
    /// parameters, PyTorch's `named_parameters()` for a model exported as the README says).
    #[allow(clippy::too_many_arguments)]
    pub fn graph_fisher(
        &self,
        model: &crate::graph::fisher::GraphModel,
        data: &Dataset,
        likelihood: crate::model::Likelihood,
        variant: Variant,
        form: NetForm,
        selection: &crate::graph::fisher::Selection,
    ) -> Result<NetFisher> {
        check_variant(variant)?;
        let mut exec = self.backend.program_exec(std::sync::Arc::clone(&model.program))?;
        let limits = crate::graph::fisher::RunLimits {
            result_bytes: self.backend.result_limit(),
            accumulator_bytes: self.backend.accumulator_bytes(),
            ..Default::default()
        };
        crate::graph::fisher::fisher(exec.as_mut(), model, data, likelihood, variant, form, selection, &limits)
    }

    /// [`Engine::graph_fisher`], also telling how the run was split into micro-batches and
    /// the bytes of one micro-batch's activations.
    #[allow(clippy::too_many_arguments)]
    pub fn graph_fisher_with_stats(
        &self,
        model: &crate::graph::fisher::GraphModel,
        data: &Dataset,
        likelihood: crate::model::Likelihood,
        variant: Variant,
        form: NetForm,
        selection: &crate::graph::fisher::Selection,
    ) -> Result<(NetFisher, crate::graph::fisher::RunStats)> {
        check_variant(variant)?;
        let mut exec = self.backend.program_exec(std::sync::Arc::clone(&model.program))?;
        let limits = crate::graph::fisher::RunLimits {
            result_bytes: self.backend.result_limit(),
            accumulator_bytes: self.backend.accumulator_bytes(),
            ..Default::default()
        };
        let mut stats = crate::graph::fisher::RunStats::default();
        let result = crate::graph::fisher::fisher_with_stats(exec.as_mut(), model, data, likelihood, variant, form, selection, &limits, &mut stats)?;
        Ok((result, stats))
    }

    /// The implicit F·v (when `product`) and vᵀFv of a graph network, without forming F.
    pub fn graph_fvp(
        &self,
        model: &crate::graph::fisher::GraphModel,
        data: &Dataset,
        likelihood: crate::model::Likelihood,
        variant: Variant,
        v: &[f32],
        product: bool,
    ) -> Result<crate::fisher::Fvp> {
        check_variant(variant)?;
        let mut exec = self.backend.program_exec(std::sync::Arc::clone(&model.program))?;
        crate::graph::fisher::fvp(exec.as_mut(), model, data, likelihood, variant, v, product, &Default::default())
    }

    /// The implicit Fisher–vector product F·v of a network (θ order), without forming F:
    /// memory is the model plus one micro-batch, so it works for models whose F would never
    /// fit (P ≥ 10⁶). Also returns vᵀFv.
    pub fn fisher_vector_product(&self, mlp: &Mlp, data: &dyn DataSource, variant: Variant, v: ArrayView1<'_, f32>) -> Result<crate::fisher::Fvp> {
        self.check_direction(mlp, data, variant, v)?;
        self.backend.network_fvp(mlp, data, variant, v, true)
    }

    /// The implicit Fisher of a network bound to its data, for repeated products over blocks
    /// of directions ([`crate::backend::NetworkOperator`]): what Lanczos, SLQ and the action
    /// use. Model, data and variant are checked here, once.
    pub fn network_operator<'a>(&'a self, mlp: &'a Mlp, data: &'a dyn DataSource, variant: Variant) -> Result<Box<dyn crate::backend::NetworkOperator + 'a>> {
        check_network(mlp, data, variant)?;
        self.backend.network_operator(mlp, data, variant)
    }

    /// The output-space twin K = BBᵀ/N of a network's Fisher F = BᵀB/N (same non-zero
    /// eigenvalues; see [`crate::backend::FisherBackend::network_gram_operator`]), or `None`
    /// where the backend has none or it would hold more than `budget` bytes.
    pub fn network_gram_operator<'a>(&'a self, mlp: &'a Mlp, data: &'a dyn DataSource, variant: Variant, budget: u64) -> Result<Option<Box<dyn crate::backend::NetworkOperator + 'a>>> {
        check_network(mlp, data, variant)?;
        self.backend.network_gram_operator(mlp, data, variant, budget)
    }

    /// vᵀFv alone (a forward-mode pass, no backward): the squared Fisher length of v.
    pub fn fisher_quadratic(&self, mlp: &Mlp, data: &dyn DataSource, variant: Variant, v: ArrayView1<'_, f32>) -> Result<f64> {
        self.check_direction(mlp, data, variant, v)?;
        Ok(self.backend.network_fvp(mlp, data, variant, v, false)?.quadratic)
    }

    fn check_direction(&self, mlp: &Mlp, data: &dyn DataSource, variant: Variant, v: ArrayView1<'_, f32>) -> Result<()> {
        check_network(mlp, data, variant)?;
        let p = mlp.num_params();
        if v.len() != p {
            return Err(FisherError::InvalidInput(format!("direction has {} entries but the model has {p} parameters", v.len())));
        }
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(FisherError::InvalidInput(format!("direction entry {i} is {}", v[i])));
        }
        Ok(())
    }
}

/// Refuses a Monte Carlo variant with no draws, or with more than the generator can number.
fn check_variant(variant: Variant) -> Result<()> {
    match variant {
        Variant::MonteCarlo { samples: 0, .. } => Err(FisherError::InvalidInput("--mc-samples must be at least 1".into())),
        Variant::MonteCarlo { samples, .. } if samples > crate::fisher::MAX_MC_SAMPLES => Err(FisherError::InvalidInput(format!(
            "--mc-samples must be at most {} (the generator numbers draws with 32 bits), not {samples}",
            crate::fisher::MAX_MC_SAMPLES
        ))),
        _ => Ok(()),
    }
}

/// The checks every network entry point makes once: the model, its data against it, the
/// variant.
fn check_network(mlp: &Mlp, data: &dyn DataSource, variant: Variant) -> Result<()> {
    mlp.validate()?;
    data.validate(mlp, data.likelihood())?;
    check_variant(variant)
}
