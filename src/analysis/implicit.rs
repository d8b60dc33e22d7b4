//! The implicit Fisher of a network as an operator: F·v and vᵀFv through the engine's
//! per-sample passes, F never formed.
//!
//! [`ImplicitFisher`] binds an engine, a model, its data and a variant. Each
//! [`FisherOperator::apply`] is one [`Engine::fisher_vector_product`] (forward-mode J v, Λ at
//! the output, one backward pass, streamed in micro-batches on the engine's backend, f32
//! widened to f64); each [`FisherOperator::quadratic`] is one [`Engine::fisher_quadratic`]
//! (the forward-mode pass alone). Memory is the model plus one micro-batch, so Lanczos, SLQ,
//! the coupling estimates and the action work at sizes whose F would never fit (P ≥ 10⁶).
//!
//! ```
//! use fisher_engine::analysis::{lanczos_top_k, FisherOperator, ImplicitFisher, LanczosOptions};
//! use fisher_engine::fisher::Variant;
//! use fisher_engine::model::{problem::synthetic_problem, ActivationSpec, Likelihood};
//! use fisher_engine::Engine;
//! let tanh = ActivationSpec::parse("tanh")?;
//! let (mlp, data) = synthetic_problem(&[6, 5, 3], 40, 1, &tanh, Likelihood::Categorical)?;
//! let engine = Engine::cpu();
//! let op = ImplicitFisher::new(&engine, &mlp, &data, Variant::True)?;
//! let top = lanczos_top_k(&op, &LanczosOptions::top(2))?;
//! assert_eq!(top.values.len(), 2);
//! assert!(op.products() > 0);
//! # Ok::<(), fisher_engine::FisherError>(())
//! ```

use std::cell::{Cell, RefCell};

use ndarray::{Array1, Array2};

use super::operator::FisherOperator;
use crate::backend::NetworkOperator;
use crate::engine::Engine;
use crate::error::{FisherError, Result};
use crate::fisher::Variant;
use crate::graph::fisher::GraphModel;
use crate::model::{DataSource, Dataset, Likelihood, Mlp};

type ProductHook<'a> = Box<dyn Fn(usize) + 'a>;

/// The network behind the operator and its data: an MLP (data in memory or on disk), or a
/// graph read from ONNX with its likelihood (data in memory).
#[derive(Clone, Copy)]
enum Net<'a> {
    Mlp(&'a Mlp, &'a dyn DataSource),
    Graph(&'a GraphModel, &'a Dataset, Likelihood),
}

impl Net<'_> {
    fn params(&self) -> usize {
        match self {
            Net::Mlp(m, _) => m.num_params(),
            Net::Graph(g, ..) => g.graph.param_count(),
        }
    }

    fn samples(&self) -> usize {
        match self {
            Net::Mlp(_, data) => data.len(),
            Net::Graph(_, data, _) => data.len(),
        }
    }
}

/// The Fisher of `mlp` on `data` for `variant`, as an operator on θ (PyTorch
/// `named_parameters()` order) that only ever computes products.
pub struct ImplicitFisher<'a> {
    engine: &'a Engine,
    net: Net<'a>,
    variant: Variant,
    trace: Option<f64>,
    rank_bound: Option<usize>,
    products: Cell<usize>,
    on_product: Option<ProductHook<'a>>,
    /// The backend's operator of an MLP, made at the first product and kept (with its
    /// cached forward pass) for the next ones.
    bound: RefCell<Option<Box<dyn NetworkOperator + 'a>>>,
}

impl std::fmt::Debug for ImplicitFisher<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImplicitFisher")
            .field("engine", self.engine)
            .field("parameters", &self.net.params())
            .field("samples", &self.net.samples())
            .field("variant", &self.variant)
            .field("trace", &self.trace)
            .field("rank_bound", &self.rank_bound)
            .field("products", &self.products.get())
            .finish()
    }
}

impl<'a> ImplicitFisher<'a> {
    /// The operator of `mlp` on `data` for `variant`, on `engine`'s backend. Model and data
    /// are checked here (once), not on every product.
    pub fn new(engine: &'a Engine, mlp: &'a Mlp, data: &'a dyn DataSource, variant: Variant) -> Result<Self> {
        mlp.validate()?;
        data.validate(mlp, data.likelihood())?;
        if let Variant::MonteCarlo { samples: 0, .. } = variant {
            return Err(FisherError::InvalidInput("--mc-samples must be at least 1".into()));
        }
        Ok(ImplicitFisher { engine, net: Net::Mlp(mlp, data), variant, trace: None, rank_bound: None, products: Cell::new(0), on_product: None, bound: RefCell::new(None) })
    }

    /// The operator of a graph network (read from ONNX) with `likelihood`; the data are
    /// checked against the model.
    pub fn for_graph(engine: &'a Engine, model: &'a GraphModel, data: &'a Dataset, likelihood: Likelihood, variant: Variant) -> Result<Self> {
        model.check_data(data, likelihood)?;
        if let Variant::MonteCarlo { samples: 0, .. } = variant {
            return Err(FisherError::InvalidInput("--mc-samples must be at least 1".into()));
        }
        Ok(ImplicitFisher {
            engine,
            net: Net::Graph(model, data, likelihood),
            variant,
            trace: None,
            rank_bound: None,
            products: Cell::new(0),
            on_product: None,
            bound: RefCell::new(None),
        })
    }

    fn fvp(&self, v: &[f64], product: bool) -> Result<crate::fisher::Fvp> {
        match self.net {
            Net::Mlp(..) => {
                let mut out = self.mlp_block(std::slice::from_ref(&v.to_vec()), product)?;
                Ok(crate::fisher::Fvp {
                    product: out.products.take().map(|p| p.row(0).to_owned()),
                    quadratic: out.quadratics[0],
                })
            }
            Net::Graph(model, data, likelihood) => {
                let direction = Self::direction(v);
                self.engine.graph_fvp(model, data, likelihood, self.variant, direction.as_slice().expect("contiguous"), product)
            }
        }
    }

    /// F·V and the quadratic forms of an MLP through the bound backend operator.
    fn mlp_block(&self, vs: &[Vec<f64>], product: bool) -> Result<crate::backend::BlockFvp> {
        let Net::Mlp(mlp, data) = self.net else { unreachable!("mlp_block is only called for an MLP") };
        let mut bound = self.bound.borrow_mut();
        if bound.is_none() {
            *bound = Some(self.engine.network_operator(mlp, data, self.variant)?);
        }
        let p = self.dim();
        let mut block = Array2::<f32>::zeros((vs.len(), p));
        for (mut row, v) in block.outer_iter_mut().zip(vs) {
            row.iter_mut().zip(v).for_each(|(d, &x)| *d = x as f32);
        }
        bound.as_mut().expect("bound above").apply(block.view(), product)
    }

    /// What the caller knows exactly about F: tr F (e.g. the mean of the per-sample squared
    /// norms, [`crate::fisher::NetForm::Norms`]), used by the estimators instead of estimating
    /// it, and an upper bound on rank F (e.g. N·R output rows, or N·(C − 1) for the true
    /// categorical Fisher), which below P makes λ_min = 0 exact.
    pub fn with_known(mut self, trace: Option<f64>, rank_bound: Option<usize>) -> Self {
        self.trace = trace;
        self.rank_bound = rank_bound;
        self
    }

    /// Calls `hook(n)` after each product, n counting every F·v and vᵀFv so far (for a
    /// progress bar).
    pub fn on_product<'b>(self, hook: impl Fn(usize) + 'b) -> ImplicitFisher<'b>
    where
        'a: 'b,
    {
        // A new operator of the shorter lifetime: the bound backend operator (invariant in
        // its lifetime) is made again at the next product.
        ImplicitFisher {
            engine: self.engine,
            net: self.net,
            variant: self.variant,
            trace: self.trace,
            rank_bound: self.rank_bound,
            products: self.products,
            on_product: Some(Box::new(hook)),
            bound: RefCell::new(None),
        }
    }

    /// Products (F·v and vᵀFv) computed so far.
    pub fn products(&self) -> usize {
        self.products.get()
    }

    /// The variant.
    pub fn variant(&self) -> Variant {
        self.variant
    }

    fn counted(&self) {
        let n = self.products.get() + 1;
        self.products.set(n);
        if let Some(hook) = &self.on_product {
            hook(n);
        }
    }

    fn direction(v: &[f64]) -> Array1<f32> {
        v.iter().map(|&x| x as f32).collect()
    }

    fn check(&self, v: &[f64]) -> Result<()> {
        if v.len() != self.dim() {
            return Err(FisherError::InvalidInput(format!(
                "v has {} entries but the model has {} parameters",
                v.len(),
                self.dim()
            )));
        }
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(FisherError::InvalidInput(format!("direction entry {i} is {}", v[i])));
        }
        Ok(())
    }
}

impl FisherOperator for ImplicitFisher<'_> {
    fn dim(&self) -> usize {
        self.net.params()
    }

    fn apply(&self, v: &[f64]) -> Result<Vec<f64>> {
        self.check(v)?;
        let fvp = self.fvp(v, true)?;
        self.counted();
        let product = fvp.product.ok_or_else(|| FisherError::InvalidInput("F·v returned no product".into()))?;
        Ok(product.iter().map(|&x| f64::from(x)).collect())
    }

    fn apply_block(&self, vs: &[Vec<f64>]) -> Result<Vec<Vec<f64>>> {
        if !matches!(self.net, Net::Mlp(..)) || vs.len() <= 1 {
            return vs.iter().map(|v| self.apply(v)).collect();
        }
        vs.iter().try_for_each(|v| self.check(v))?;
        let out = self.mlp_block(vs, true)?;
        vs.iter().for_each(|_| self.counted());
        let products = out.products.ok_or_else(|| FisherError::InvalidInput("F·V returned no product".into()))?;
        Ok(products.outer_iter().map(|row| row.iter().map(|&x| f64::from(x)).collect()).collect())
    }

    fn quadratic(&self, v: &[f64]) -> Result<f64> {
        self.check(v)?;
        let q = self.fvp(v, false)?.quadratic;
        self.counted();
        Ok(q)
    }

    fn trace(&self) -> Option<f64> {
        self.trace
    }

    fn rank_bound(&self) -> Option<usize> {
        self.rank_bound
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fisher::{NetFisher, NetForm};
    use crate::model::{problem::synthetic_problem, ActivationSpec, Likelihood};

    /// F·v and vᵀFv of the operator equal the dense f64 reference F applied to v, and the
    /// hook sees every product.
    #[test]
    fn products_match_the_dense_reference() {
        let (mlp, data) = synthetic_problem(&[5, 4, 3], 30, 3, &ActivationSpec::parse("tanh").unwrap(), Likelihood::Categorical).unwrap();
        let engine = Engine::cpu();
        let seen = Cell::new(0);
        let op = ImplicitFisher::new(&engine, &mlp, &data, Variant::True).unwrap().on_product(|n| seen.set(n));
        let NetFisher::Full(f) =
            crate::reference::network::fisher(&mlp, &data, Likelihood::Categorical, Variant::True, NetForm::Full).unwrap()
        else {
            unreachable!()
        };
        let p = op.dim();
        let v: Vec<f64> = (0..p).map(|i| ((i * 7 % 11) as f64 - 5.0) / 5.0).collect();
        let fv = op.apply(&v).unwrap();
        let exact: Vec<f64> = (0..p).map(|i| (0..p).map(|j| f[[i, j]] * v[j]).sum()).collect();
        let scale = exact.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        for (a, b) in fv.iter().zip(&exact) {
            assert!((a - b).abs() <= 1e-5 * scale, "F·v {a} vs {b}");
        }
        let q = op.quadratic(&v).unwrap();
        let q_exact: f64 = v.iter().zip(&exact).map(|(a, b)| a * b).sum();
        assert!((q - q_exact).abs() <= 1e-5 * q_exact.abs(), "vᵀFv {q} vs {q_exact}");
        assert_eq!(op.products(), 2);
        assert_eq!(seen.get(), 2);
        assert!(op.apply(&v[1..]).is_err());
        let mut bad = v.clone();
        bad[3] = f64::NAN;
        assert!(op.apply(&bad).is_err());
    }

    /// The output-space operator K = BBᵀ/N has F's top eigenvalues: `top_eigenvalues` takes
    /// the Gram side when N·R < P and agrees with the dense f64 reference's spectrum, on every
    /// variant, with the default micro-batch and with micro-batches of one or two samples.
    #[test]
    fn gram_side_top_eigenvalues_match_the_dense_spectrum() {
        let tanh = ActivationSpec::parse("tanh").unwrap();
        // P = 9·6 + 7·4 = 82 parameters; N·R = 7·4 = 28 rows (true), 7 (empirical), 14 (MC 2).
        let (mlp, data) = synthetic_problem(&[8, 6, 4], 7, 2, &tanh, Likelihood::Categorical).unwrap();
        let engines = [Engine::cpu(), Engine::from_cpu_backend(crate::backend::cpu::CpuBackend::new().with_batch_bytes(1_500))];
        for (engine, variant) in engines.iter().flat_map(|e| {
            [Variant::True, Variant::Empirical, Variant::MonteCarlo { samples: 2, seed: 3 }].map(|v| (e, v))
        }) {
            let NetFisher::Full(f) = crate::reference::network::fisher(&mlp, &data, Likelihood::Categorical, variant, NetForm::Full).unwrap()
            else {
                unreachable!()
            };
            let mut exact = crate::analysis::dense::symmetric_eigenvalues("F", &f).unwrap();
            exact.sort_by(|a, b| b.partial_cmp(a).unwrap());
            let seen = Cell::new(0);
            let options = crate::analysis::LanczosOptions { tol: 1e-8, ..crate::analysis::LanczosOptions::top(4) };
            let top = top_eigenvalues(engine, &mlp, &data, variant, &options, &|n| seen.set(n)).unwrap();
            assert_eq!(top.method, "gram", "{variant:?}");
            assert!(top.result.converged);
            assert_eq!(seen.get(), top.result.iterations);
            for (got, want) in top.result.values.iter().zip(&exact) {
                assert!((got - want).abs() <= 1e-5 * exact[0], "{variant:?}: {got} vs {want}");
            }
            // Eigenvectors live in ℝ^P: asking for them takes the implicit side.
            let vectors = crate::analysis::LanczosOptions { vectors: true, ..options.clone() };
            let with_vectors = top_eigenvalues(engine, &mlp, &data, variant, &vectors, &|_| {}).unwrap();
            assert_eq!(with_vectors.method, "implicit");
            for (got, want) in with_vectors.result.values.iter().zip(&exact) {
                assert!((got - want).abs() <= 1e-5 * exact[0], "{variant:?}: {got} vs {want}");
            }
        }
    }

    /// F·V over a block of directions equals the dense f64 reference applied to each, on
    /// every variant, whether the forward pass is cached or recomputed, and with micro-batches
    /// and direction chunks forced small (ragged last micro-batch, one direction per pass).
    #[test]
    fn block_products_match_the_dense_reference() {
        let tanh = ActivationSpec::parse("tanh").unwrap();
        let (mlp, data) = synthetic_problem(&[5, 6, 4], 37, 5, &tanh, Likelihood::Categorical).unwrap();
        let p = mlp.num_params();
        let vs: Vec<Vec<f64>> = (0..3).map(|k| (0..p).map(|i| ((i * (7 + k) % 13) as f64 - 6.0) / 6.0).collect()).collect();
        for variant in [Variant::True, Variant::Empirical, Variant::MonteCarlo { samples: 3, seed: 9 }] {
            let NetFisher::Full(f) = crate::reference::network::fisher(&mlp, &data, Likelihood::Categorical, variant, NetForm::Full).unwrap()
            else {
                unreachable!()
            };
            for (batch_bytes, cache_bytes) in [(32 << 20, 256 << 20), (32 << 20, 0), (2_000, 256 << 20), (2_000, 0)] {
                let engine = Engine::from_cpu_backend(
                    crate::backend::cpu::CpuBackend::new().with_batch_bytes(batch_bytes).with_forward_cache_bytes(cache_bytes),
                );
                let op = ImplicitFisher::new(&engine, &mlp, &data, variant).unwrap();
                // Twice: the second block runs on the cached forward pass, where there is one.
                for _ in 0..2 {
                    let fv = op.apply_block(&vs).unwrap();
                    for (v, got) in vs.iter().zip(&fv) {
                        let exact: Vec<f64> = (0..p).map(|i| (0..p).map(|j| f[[i, j]] * v[j]).sum()).collect();
                        let scale = exact.iter().fold(0.0f64, |m, x| m.max(x.abs()));
                        for (a, b) in got.iter().zip(&exact) {
                            assert!((a - b).abs() <= 1e-5 * scale, "{variant:?} {batch_bytes}/{cache_bytes}: {a} vs {b}");
                        }
                    }
                }
                assert_eq!(op.products(), 6);
            }
        }
    }
}

/// Bytes the output-space operator may hold for [`top_eigenvalues`]: 1 GiB (W3, 784-512-512-10
/// on 4,096 samples with R = 10, needs 199 MiB).
pub const GRAM_OPERATOR_BYTES: u64 = 1 << 30;

/// The top-k eigenvalues of an MLP's Fisher and how they were found.
#[derive(Debug, Clone)]
pub struct TopEigenvalues {
    /// The Lanczos run (values, residuals, products).
    pub result: super::LanczosResult,
    /// `gram` (Lanczos on K = BBᵀ/N in ℝ^{N·R}) or `implicit` (on F in ℝ^P).
    pub method: &'static str,
}

/// The `options.k` largest eigenvalues of the Fisher of `mlp` on `data` by thick-restart
/// Lanczos, on whichever side is smaller: when the N·R gradient rows are fewer than the P
/// parameters and the backend has an output-space operator within
/// [`GRAM_OPERATOR_BYTES`] (the CPU), on K = BBᵀ/N, whose non-zero eigenvalues are F's and
/// whose products cost half an F·v; otherwise on the implicit F. Eigenvectors (which live
/// in ℝ^P) are only returned by the implicit side, so `options.vectors` selects it.
/// `hook(n)` is called after every product.
pub fn top_eigenvalues(
    engine: &Engine,
    mlp: &Mlp,
    data: &dyn DataSource,
    variant: Variant,
    options: &super::LanczosOptions,
    hook: &dyn Fn(usize),
) -> Result<TopEigenvalues> {
    let rows = data.len().saturating_mul(crate::fisher::rows_per_sample(variant, mlp.output_dim()));
    if !options.vectors && rows < mlp.num_params() {
        if let Some(op) = engine.network_gram_operator(mlp, data, variant, GRAM_OPERATOR_BYTES)? {
            let gram = GramFisher { op: RefCell::new(op), products: Cell::new(0), hook };
            let result = super::lanczos_top_k(&gram, options)?;
            return Ok(TopEigenvalues { result, method: "gram" });
        }
    }
    let op = ImplicitFisher::new(engine, mlp, data, variant)?.on_product(hook);
    Ok(TopEigenvalues { result: super::lanczos_top_k(&op, options)?, method: "implicit" })
}

/// K = BBᵀ/N as a [`FisherOperator`] (see [`top_eigenvalues`]).
struct GramFisher<'a> {
    op: RefCell<Box<dyn NetworkOperator + 'a>>,
    products: Cell<usize>,
    hook: &'a dyn Fn(usize),
}

impl FisherOperator for GramFisher<'_> {
    fn dim(&self) -> usize {
        self.op.borrow().dim()
    }

    fn apply(&self, v: &[f64]) -> Result<Vec<f64>> {
        if v.len() != self.dim() {
            return Err(FisherError::InvalidInput(format!("v has {} entries but the operator has dimension {}", v.len(), self.dim())));
        }
        let block = Array2::from_shape_vec((1, v.len()), v.iter().map(|&x| x as f32).collect())
            .map_err(|e| FisherError::InvalidInput(e.to_string()))?;
        let out = self.op.borrow_mut().apply(block.view(), true)?;
        let n = self.products.get() + 1;
        self.products.set(n);
        (self.hook)(n);
        let products = out.products.ok_or_else(|| FisherError::InvalidInput("K·u returned no product".into()))?;
        Ok(products.row(0).iter().map(|&x| f64::from(x)).collect())
    }
}
