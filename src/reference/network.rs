//! The f64 network reference: simple, slow, correct. The oracle for every network Fisher
//! computed by the fast paths, and itself checked against finite differences.
//!
//! It shares nothing with the fast paths but [`Activation::apply_f64`] /
//! [`Activation::derivative_f64`] and [`mc_uniform`]: its own forward pass, its own
//! backpropagation, its own output rows, all in f64, one sample at a time.
//!
//! ## Per sample i
//! Forward: a₀ = xᵢ, z_l = W_l a_{l−1} + b_l, a_l = φ_l(z_l), the last z_L being the output.
//! The variant gives R *output rows* s_r (the table in [`crate::model`]); for each,
//! backpropagation gives δ_L = s_r and δ_{l−1} = (W_lᵀ δ_l) ∘ φ'_{l−1}(z_{l−1}), so that
//! δ_l = ∂(s_rᵀ z_L)/∂z_l (for `empirical`, ∂ log p(yᵢ|xᵢ)/∂z_l). The gradient row is then
//! g_ir = J_θᵢᵀ s_r, per layer ∂/∂W_l = δ_l a_{l−1}ᵀ (flattened row-major) and ∂/∂b_l = δ_l, in
//! θ's PyTorch order. With these rows, F = (1/N) Σᵢ Σ_r g_ir g_irᵀ.
//!
//! ## Forms
//! Every [`NetForm`] is computed from the explicit gradient entries `g_ir[(o, i)] = δ_ir[o]·a_i[i]`
//! (KFAC from the explicit ãᵢ and δ_ir): `full`, `layer` and `grads` from the stacked rows,
//! `diag` and `norms` by forming each product and squaring it. No identity that the fast
//! paths use (such as (δ∘δ)ᵀ(ã∘ã) for the diagonal or ‖δ‖²‖ã‖² for the norms) is used here,
//! so that the tests check those identities too.
//!
//! ## Accuracy
//! Products and sums are in f64. Sums over samples of outer products are formed batch by
//! batch with f64 GEMM (`ndarray`'s `dot`, which `matrixmultiply` blocks but does not
//! reorder beyond a plain sum); their rounding error is at most about N·R·2⁻⁵³ relative to
//! Σ|terms| — below 10⁻¹⁰ for any N·R this reference will see, five orders below the 10⁻⁵
//! the f32 paths are held to. The division by N is done once, at the end.
//!
//! Memory is bounded by the output plus one batch of samples (at most [`BATCH_BYTES`] of
//! gradient rows or per-sample aᵢ, δ_ir), so `diag`, `kfac` and `norms` also work on models
//! whose N×P gradients would not fit; only `full`, `layer` and `grads` allocate what their
//! output needs. Samples
//! of a batch are processed in parallel (rayon), and every reduction is in a fixed order, so
//! results are bitwise reproducible across runs and thread counts.

use ndarray::{s, Array1, Array2, ArrayView1, ArrayView2, Axis};
use rayon::prelude::*;

use crate::fisher::{mc_uniform, rows_per_sample, KfacFactors, NetFisher, NetForm, Variant};
use crate::model::{Activation, Dataset, Likelihood, Mlp, Targets};
use crate::error::{FisherError, Result};

/// Bytes of gradient rows held at once: large enough that per-batch overheads vanish, small
/// enough to be negligible next to a P×P result.
pub const BATCH_BYTES: usize = 32 << 20;

/// Columns per parallel task when summing outer products.
const STRIPE: usize = 64;

/// Most samples per batch, so that small models still run several batches' worth of work in
/// parallel without holding all their per-sample data.
const MAX_BATCH: usize = 1024;

/// A Linear layer in f64.
struct LayerF64 {
    weight: Array2<f64>,
    bias: Option<Array1<f64>>,
}

/// The network in f64 (parameters converted exactly from f32, or given in f64).
struct NetF64<'m> {
    layers: Vec<LayerF64>,
    activations: &'m [Activation],
}

/// What the forward pass keeps for backpropagation.
struct Forward {
    /// a_{l−1}: the input of each layer (not augmented).
    inputs: Vec<Array1<f64>>,
    /// z_l: the pre-activation output of each layer; the last is the network output.
    pre: Vec<Array1<f64>>,
}

impl<'m> NetF64<'m> {
    fn from_mlp(mlp: &'m Mlp) -> Self {
        NetF64 {
            layers: mlp
                .layers
                .iter()
                .map(|l| LayerF64 {
                    weight: l.weight.mapv(f64::from),
                    bias: l.bias.as_ref().map(|b| b.mapv(f64::from)),
                })
                .collect(),
            activations: &mlp.activations,
        }
    }

    /// The architecture of `mlp` with parameters θ (PyTorch order) in f64.
    fn from_theta(mlp: &'m Mlp, theta: ArrayView1<'_, f64>) -> Result<Self> {
        mlp.validate()?;
        if theta.len() != mlp.num_params() {
            return Err(FisherError::InvalidInput(format!(
                "θ has {} values but the model has {} parameters",
                theta.len(),
                mlp.num_params()
            )));
        }
        let mut layers = Vec::with_capacity(mlp.layers.len());
        let mut at = 0;
        for layer in &mlp.layers {
            let (out, fan_in) = layer.weight.dim();
            let weight =
                theta.slice(s![at..at + out * fan_in]).to_owned().into_shape_with_order((out, fan_in));
            let weight =
                weight.map_err(|e| FisherError::InvalidInput(format!("layer {}: {e}", layer.index)))?;
            at += out * fan_in;
            let bias = layer.bias.as_ref().map(|_| {
                let b = theta.slice(s![at..at + out]).to_owned();
                at += out;
                b
            });
            layers.push(LayerF64 { weight, bias });
        }
        Ok(NetF64 { layers, activations: &mlp.activations })
    }

    fn forward(&self, x: ArrayView1<'_, f32>) -> Forward {
        let mut inputs = Vec::with_capacity(self.layers.len());
        let mut pre = Vec::with_capacity(self.layers.len());
        let mut a: Array1<f64> = x.mapv(f64::from);
        for (l, layer) in self.layers.iter().enumerate() {
            let (out, fan_in) = layer.weight.dim();
            let mut z = Array1::<f64>::zeros(out);
            for o in 0..out {
                let mut sum = layer.bias.as_ref().map_or(0.0, |b| b[o]);
                for i in 0..fan_in {
                    sum += layer.weight[[o, i]] * a[i];
                }
                z[o] = sum;
            }
            let next = match self.activations.get(l) {
                Some(act) => z.mapv(|v| act.apply_f64(v)),
                None => z.clone(), // the output layer has no activation
            };
            inputs.push(a);
            pre.push(z);
            a = next;
        }
        Forward { inputs, pre }
    }

    /// δ_l for every layer given δ_L = `s`.
    fn backward(&self, forward: &Forward, s: ArrayView1<'_, f64>) -> Vec<Array1<f64>> {
        let depth = self.layers.len();
        let mut deltas = vec![Array1::<f64>::zeros(0); depth];
        let mut delta = s.to_owned();
        for l in (0..depth).rev() {
            if l > 0 {
                // δ_{l−1} = (W_lᵀ δ_l) ∘ φ'_{l−1}(z_{l−1})
                let weight = &self.layers[l].weight;
                let (out, fan_in) = weight.dim();
                let act = self.activations[l - 1];
                let below = &forward.pre[l - 1];
                let mut previous = Array1::<f64>::zeros(fan_in);
                for i in 0..fan_in {
                    let mut sum = 0.0;
                    for o in 0..out {
                        sum += weight[[o, i]] * delta[o];
                    }
                    previous[i] = sum * act.derivative_f64(below[i]);
                }
                deltas[l] = std::mem::replace(&mut delta, previous);
            } else {
                deltas[0] = std::mem::take(&mut delta);
            }
        }
        deltas
    }
}

/// Softmax in f64 (max subtracted first, so that large logits do not overflow).
fn softmax(z: ArrayView1<'_, f64>) -> Array1<f64> {
    let max = z.fold(f64::NEG_INFINITY, |m, &v| m.max(v));
    let e = z.mapv(|v| (v - max).exp());
    let sum: f64 = e.sum();
    e / sum
}

/// ln Σ exp(z), stably.
fn log_sum_exp(z: ArrayView1<'_, f64>) -> f64 {
    let max = z.fold(f64::NEG_INFINITY, |m, &v| m.max(v));
    max + z.iter().map(|&v| (v - max).exp()).sum::<f64>().ln()
}

/// The R×k output rows s_r of sample `sample` of `data`, given its network output `logits`
/// (z_L, in f64), following the variant table in [`crate::model`] exactly:
///
/// * `empirical`: e(yᵢ) (categorical: onehot(yᵢ) − p; Gaussian: yᵢ − z);
/// * `true`, categorical: √p_c (onehot(c) − p) for c = 0..C, so Σ_c s_c s_cᵀ = diag(p) − ppᵀ;
/// * `true`, Gaussian: the k unit vectors (E\[eeᵀ\] = I);
/// * `mc` with K draws: e(ỹ_k)/√K for k = 0..K. Categorical: u = `mc_uniform(seed, i, k, 0)`
///   and ỹ_k = the first class c with u < p₀ + … + p_c (p and its running sum in f64; if
///   rounding leaves u above the total, the last class). Gaussian: ỹ_k = z + ε with
///   ε_j = √(−2 ln(1 − u₁)) · cos(2π u₂), u₁ = `mc_uniform(seed, i, k, 2j)`,
///   u₂ = `mc_uniform(seed, i, k, 2j+1)` (evaluated in f64), so e(ỹ_k) = ε.
///
/// p = softmax(z) is computed in f64.
pub fn output_rows(
    logits: ArrayView1<'_, f64>,
    data: &Dataset,
    sample: usize,
    likelihood: Likelihood,
    variant: Variant,
) -> Result<Array2<f64>> {
    let k = logits.len();
    if sample >= data.len() {
        return Err(FisherError::InvalidInput(format!(
            "sample {sample} is out of range for a dataset of {} samples",
            data.len()
        )));
    }
    let sample_u32 = u32::try_from(sample).map_err(|_| {
        FisherError::InvalidInput(format!("sample index {sample} does not fit the 32-bit MC generator key"))
    })?;
    match likelihood {
        Likelihood::Categorical => {
            let p = softmax(logits);
            let onehot_minus_p = |c: usize| {
                let mut row = -&p;
                row[c] += 1.0;
                row
            };
            match variant {
                Variant::Empirical => {
                    let Targets::Classes(classes) = &data.targets else {
                        return Err(FisherError::InvalidInput(
                            "the categorical likelihood needs class labels, but the dataset has real-valued targets".into(),
                        ));
                    };
                    let label = classes.get(sample).map_or(k, |&c| c as usize);
                    if label >= k {
                        return Err(FisherError::InvalidInput(format!(
                            "label {label} at row {sample} is out of range: the model has {k} classes"
                        )));
                    }
                    Ok(onehot_minus_p(label).insert_axis(Axis(0)))
                }
                Variant::True => {
                    let mut rows = Array2::zeros((k, k));
                    for c in 0..k {
                        rows.row_mut(c).assign(&(onehot_minus_p(c) * p[c].sqrt()));
                    }
                    Ok(rows)
                }
                Variant::MonteCarlo { samples, seed } => {
                    check_mc(samples)?;
                    let weight = 1.0 / (samples as f64).sqrt();
                    let mut rows = Array2::zeros((samples, k));
                    for draw in 0..samples {
                        let u = f64::from(mc_uniform(seed, sample_u32, draw as u32, 0));
                        let mut cumulative = 0.0;
                        let mut class = k - 1;
                        for (c, &pc) in p.iter().enumerate() {
                            cumulative += pc;
                            if u < cumulative {
                                class = c;
                                break;
                            }
                        }
                        rows.row_mut(draw).assign(&(onehot_minus_p(class) * weight));
                    }
                    Ok(rows)
                }
            }
        }
        Likelihood::Gaussian => match variant {
            Variant::Empirical => {
                let Targets::Values(values) = &data.targets else {
                    return Err(FisherError::InvalidInput(
                        "the Gaussian likelihood needs real-valued N×k targets, but the dataset has class labels".into(),
                    ));
                };
                if values.ncols() != k || sample >= values.nrows() {
                    return Err(FisherError::InvalidInput(format!(
                        "targets are {}×{} but sample {sample} of a model with {k} outputs was asked for",
                        values.nrows(),
                        values.ncols()
                    )));
                }
                let residual = values.row(sample).mapv(f64::from) - logits;
                Ok(residual.insert_axis(Axis(0)))
            }
            Variant::True => Ok(Array2::eye(k)),
            Variant::MonteCarlo { samples, seed } => {
                check_mc(samples)?;
                let weight = 1.0 / (samples as f64).sqrt();
                let mut rows = Array2::zeros((samples, k));
                for draw in 0..samples {
                    for j in 0..k {
                        let u1 = f64::from(mc_uniform(seed, sample_u32, draw as u32, 2 * j as u32));
                        let u2 = f64::from(mc_uniform(seed, sample_u32, draw as u32, 2 * j as u32 + 1));
                        let epsilon =
                            (-2.0 * (1.0 - u1).ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                        rows[[draw, j]] = epsilon * weight;
                    }
                }
                Ok(rows)
            }
        },
    }
}

fn check_mc(samples: usize) -> Result<()> {
    if samples == 0 || u32::try_from(samples).is_err() {
        return Err(FisherError::InvalidInput(format!(
            "--mc-samples must be between 1 and {}, got {samples}",
            u32::MAX
        )));
    }
    Ok(())
}

/// Everything one sample contributes: the layer inputs aᵢ and the R backpropagated δ's.
struct SampleParts {
    /// a_{l−1} per layer (not augmented).
    inputs: Vec<Array1<f64>>,
    /// R × out_l per layer: row r is δ_ir for output row s_r.
    deltas: Vec<Array2<f64>>,
}

fn sample_parts(
    net: &NetF64<'_>,
    data: &Dataset,
    sample: usize,
    likelihood: Likelihood,
    variant: Variant,
) -> Result<SampleParts> {
    let forward = net.forward(data.inputs.row(sample));
    let Some(output) = forward.pre.last() else {
        return Err(FisherError::InvalidInput("the model has no Linear layers".into()));
    };
    let rows = output_rows(output.view(), data, sample, likelihood, variant)?;
    let mut deltas: Vec<Array2<f64>> =
        net.layers.iter().map(|l| Array2::zeros((rows.nrows(), l.weight.nrows()))).collect();
    for (r, s) in rows.outer_iter().enumerate() {
        for (l, delta) in net.backward(&forward, s).into_iter().enumerate() {
            deltas[l].row_mut(r).assign(&delta);
        }
    }
    Ok(SampleParts { inputs: forward.inputs, deltas })
}

/// The R×P gradient rows of one sample, in θ's PyTorch order: per layer δ aᵀ row-major, then δ.
fn gradient_rows(net: &NetF64<'_>, parts: &SampleParts) -> Array2<f64> {
    let r_count = parts.deltas.first().map_or(0, |d| d.nrows());
    let p: usize = net.layers.iter().map(|l| l.weight.len() + l.bias.as_ref().map_or(0, |b| b.len())).sum();
    let mut rows = Array2::zeros((r_count, p));
    for (r, mut row) in rows.outer_iter_mut().enumerate() {
        let mut at = 0;
        for (l, layer) in net.layers.iter().enumerate() {
            let (out, fan_in) = layer.weight.dim();
            let delta = parts.deltas[l].row(r);
            let a = &parts.inputs[l];
            for o in 0..out {
                let mut target = row.slice_mut(s![at + o * fan_in..at + (o + 1) * fan_in]);
                target.zip_mut_with(a, |g, &x| *g = delta[o] * x);
            }
            at += out * fan_in;
            if layer.bias.is_some() {
                row.slice_mut(s![at..at + out]).assign(&delta);
                at += out;
            }
        }
    }
    rows
}

/// Σᵢ Σ_r g_ir[θ]² for the parameters of output unit `o` of layer `l` over the samples in
/// `parts`: the weight row (o, 0..in) then, with a bias, the bias o. Each g is formed as the
/// product δ_ro · a_i and then squared, as in the definition.
fn unit_squares(parts: &[SampleParts], l: usize, o: usize, fan_in: usize, has_bias: bool) -> Vec<f64> {
    let mut sums = vec![0.0f64; fan_in + has_bias as usize];
    for part in parts {
        let a = &part.inputs[l];
        for delta in part.deltas[l].column(o) {
            for (sum, &x) in sums.iter_mut().zip(a) {
                let g = delta * x;
                *sum += g * g;
            }
            if has_bias {
                sums[fan_in] += delta * delta;
            }
        }
    }
    sums
}

/// Σ_r ‖g_ir‖² of one sample, from the explicit products δ_ro · a_i.
fn squared_norm(net: &NetF64<'_>, part: &SampleParts) -> f64 {
    let mut total = 0.0;
    for (l, layer) in net.layers.iter().enumerate() {
        let a = &part.inputs[l];
        for delta in part.deltas[l].iter() {
            for &x in a {
                let g = delta * x;
                total += g * g;
            }
            if layer.bias.is_some() {
                total += delta * delta;
            }
        }
    }
    total
}

/// acc += the upper triangle (and diagonal blocks) of rowsᵀ rows; the caller mirrors it once
/// at the end. Column stripes are independent and run in parallel; each is one f64 GEMM.
fn add_upper_gram(acc: &mut Array2<f64>, rows: ArrayView2<'_, f64>) {
    let p = rows.ncols();
    let stripes: Vec<(usize, usize)> = (0..p).step_by(STRIPE).map(|c0| (c0, (c0 + STRIPE).min(p))).collect();
    let products: Vec<Array2<f64>> = stripes
        .par_iter()
        .map(|&(c0, c1)| rows.slice(s![.., ..c1]).t().dot(&rows.slice(s![.., c0..c1])))
        .collect();
    for (&(c0, c1), product) in stripes.iter().zip(products) {
        let mut target = acc.slice_mut(s![..c1, c0..c1]);
        target += &product;
    }
}

/// Copies the upper triangle onto the lower one, so the result is exactly symmetric.
fn mirror_upper(m: &mut Array2<f64>) {
    for i in 0..m.nrows() {
        for j in 0..i {
            m[[i, j]] = m[[j, i]];
        }
    }
}

/// Checks the model, the data against it, and the variant.
fn check_inputs(mlp: &Mlp, data: &Dataset, likelihood: Likelihood, variant: Variant) -> Result<()> {
    mlp.validate()?;
    data.validate(mlp, likelihood)?;
    if let Variant::MonteCarlo { samples, .. } = variant {
        check_mc(samples)?;
    }
    if u32::try_from(data.len().saturating_sub(1)).is_err() {
        return Err(FisherError::InvalidInput(format!(
            "{} samples exceed the 2³² that the MC generator can key",
            data.len()
        )));
    }
    Ok(())
}

/// A zero f64 matrix, or [`FisherError::DoesNotFit`] when its size overflows or the
/// allocation fails (instead of aborting the process).
fn zeros_checked(rows: usize, cols: usize, what: &str) -> Result<Array2<f64>> {
    let elements = rows.checked_mul(cols);
    let bytes = elements.and_then(|e| e.checked_mul(8));
    let does_not_fit = || FisherError::DoesNotFit {
        what: format!("{what} ({rows}×{cols} f64)"),
        needed: bytes.map_or(u64::MAX, |b| b as u64),
        limit: isize::MAX as u64,
        which: "host memory for the f64 reference".into(),
    };
    let elements =
        elements.filter(|_| bytes.is_some_and(|b| b <= isize::MAX as usize)).ok_or_else(does_not_fit)?;
    let mut values: Vec<f64> = Vec::new();
    values.try_reserve_exact(elements).map_err(|_| does_not_fit())?;
    values.resize(elements, 0.0);
    Array2::from_shape_vec((rows, cols), values).map_err(|_| does_not_fit())
}

/// Samples per batch when each sample holds `bytes_per_sample` bytes.
fn batch_size(bytes_per_sample: usize) -> usize {
    (BATCH_BYTES / bytes_per_sample.max(1)).clamp(1, MAX_BATCH)
}

/// The per-sample square-root rows: G is (N·R)×P, sample-major (row i·R + r is g_ir), with
/// F = GᵀG / N; R is returned alongside (1 for `empirical`, so G is then the N×P per-sample
/// gradient matrix ∇θ log p(yᵢ|xᵢ)).
///
/// ```
/// use fisher_engine::fisher::Variant;
/// use fisher_engine::model::{Activation, Dataset, Likelihood, Linear, Mlp, Targets};
/// use fisher_engine::reference::network as reference;
/// use ndarray::array;
/// // One layer, z = W x with W = 0 (so p is uniform) and x = (1, 2): g = (e(y) xᵀ) row-major.
/// let mlp = Mlp::new(vec![Linear { index: 0, weight: ndarray::Array2::zeros((2, 2)), bias: None }], vec![])?;
/// let data = Dataset { inputs: array![[1.0f32, 2.0]], targets: Targets::Classes(vec![0]) };
/// let (g, r) = reference::per_sample_rows(&mlp, &data, Likelihood::Categorical, Variant::Empirical)?;
/// assert_eq!(r, 1);
/// assert_eq!(g, array![[0.5, 1.0, -0.5, -1.0]]);
/// # Ok::<(), fisher_engine::FisherError>(())
/// ```
pub fn per_sample_rows(
    mlp: &Mlp,
    data: &Dataset,
    likelihood: Likelihood,
    variant: Variant,
) -> Result<(Array2<f64>, usize)> {
    check_inputs(mlp, data, likelihood, variant)?;
    let net = NetF64::from_mlp(mlp);
    let r = rows_per_sample(variant, mlp.output_dim());
    let p = mlp.num_params();
    let mut grads = zeros_checked(data.len().saturating_mul(r), p, "the per-sample gradient rows")?;
    let batch = batch_size(r * p * 8);
    for start in (0..data.len()).step_by(batch) {
        let end = (start + batch).min(data.len());
        let rows = (start..end)
            .into_par_iter()
            .map(|i| {
                sample_parts(&net, data, i, likelihood, variant).map(|parts| gradient_rows(&net, &parts))
            })
            .collect::<Result<Vec<_>>>()?;
        for (offset, sample_rows) in rows.iter().enumerate() {
            let at = (start + offset) * r;
            grads.slice_mut(s![at..at + r, ..]).assign(sample_rows);
        }
    }
    Ok((grads, r))
}

/// The network Fisher F = (1/N) Σᵢ Σ_r g_ir g_irᵀ reduced to `form`, in f64:
///
/// * `Full`: F (P×P), exactly symmetric.
/// * `Diagonal`: diag(F).
/// * `Layer`: for each Linear layer, the block of F over that layer's range in θ (weight
///   row-major, then bias; see [`Mlp::param_ranges`]).
/// * `Kfac`: per layer A = (1/N) Σᵢ ãᵢãᵢᵀ with ã = [a; 1] when the layer has a bias (a
///   without), and G = (1/N) Σᵢ Σ_r δ_ir δ_irᵀ; see [`crate::fisher::kfac_expand`].
/// * `Grads`: the rows of [`per_sample_rows`].
/// * `Norms`: per sample Σ_r ‖g_ir‖² (N values, not divided by N; their mean is tr F).
///
/// Errors when the model is malformed, the data do not fit it (see [`Dataset::validate`]),
/// or `mc` asks for no samples.
pub fn fisher(
    mlp: &Mlp,
    data: &Dataset,
    likelihood: Likelihood,
    variant: Variant,
    form: NetForm,
) -> Result<NetFisher<f64>> {
    check_inputs(mlp, data, likelihood, variant)?;
    let n = data.len();
    let net = NetF64::from_mlp(mlp);
    let r = rows_per_sample(variant, mlp.output_dim());
    let p = mlp.num_params();
    let ranges = mlp.param_ranges();
    let scale = 1.0 / n as f64;
    let compute_parts = |start: usize, end: usize| {
        (start..end)
            .into_par_iter()
            .map(|i| sample_parts(&net, data, i, likelihood, variant))
            .collect::<Result<Vec<_>>>()
    };
    let stack_rows = |parts: &[SampleParts]| -> Result<Array2<f64>> {
        let rows: Vec<Array2<f64>> = parts.par_iter().map(|part| gradient_rows(&net, part)).collect();
        let views: Vec<ArrayView2<'_, f64>> = rows.iter().map(|m| m.view()).collect();
        ndarray::concatenate(Axis(0), &views)
            .map_err(|e| FisherError::InvalidInput(format!("cannot stack gradient rows: {e}")))
    };
    let row_batch = batch_size(r * p * 8);
    // Samples per batch for the forms that need only the per-sample parts (aᵢ and δ_ir).
    let parts_bytes: usize = mlp.layers.iter().map(|l| l.fan_in() + r * l.fan_out()).sum::<usize>() * 8;
    let parts_batch = batch_size(parts_bytes);

    match form {
        NetForm::Grads => Ok(NetFisher::Grads(per_sample_rows(mlp, data, likelihood, variant)?.0)),
        NetForm::Full => {
            let mut full = zeros_checked(p, p, "the full Fisher matrix")?;
            for start in (0..n).step_by(row_batch) {
                let parts = compute_parts(start, (start + row_batch).min(n))?;
                add_upper_gram(&mut full, stack_rows(&parts)?.view());
            }
            mirror_upper(&mut full);
            Ok(NetFisher::Full(full * scale))
        }
        NetForm::Layer => {
            let mut blocks = ranges
                .iter()
                .map(|&(_, len)| zeros_checked(len, len, "a layer block"))
                .collect::<Result<Vec<Array2<f64>>>>()?;
            for start in (0..n).step_by(row_batch) {
                let parts = compute_parts(start, (start + row_batch).min(n))?;
                let rows = stack_rows(&parts)?;
                for (block, &(at, len)) in blocks.iter_mut().zip(&ranges) {
                    add_upper_gram(block, rows.slice(s![.., at..at + len]));
                }
            }
            Ok(NetFisher::Layer(
                blocks
                    .into_iter()
                    .map(|mut block| {
                        mirror_upper(&mut block);
                        block * scale
                    })
                    .collect(),
            ))
        }
        NetForm::Diagonal => {
            // No gradient rows: every output unit (layer l, row o of W_l) owns its weight row
            // and its bias in θ, so units are independent tasks, and within one the samples
            // are summed in order.
            let units: Vec<(usize, usize)> = mlp
                .layers
                .iter()
                .enumerate()
                .flat_map(|(l, layer)| (0..layer.fan_out()).map(move |o| (l, o)))
                .collect();
            let mut diag = Array1::<f64>::zeros(p);
            for start in (0..n).step_by(parts_batch) {
                let parts = compute_parts(start, (start + parts_batch).min(n))?;
                let sums: Vec<Vec<f64>> = units
                    .par_iter()
                    .map(|&(l, o)| {
                        let layer = &mlp.layers[l];
                        unit_squares(&parts, l, o, layer.fan_in(), layer.bias.is_some())
                    })
                    .collect();
                for (&(l, o), unit) in units.iter().zip(sums) {
                    let layer = &mlp.layers[l];
                    let (at, fan_in) = (ranges[l].0, layer.fan_in());
                    let mut weights = diag.slice_mut(s![at + o * fan_in..at + (o + 1) * fan_in]);
                    weights += &ArrayView1::from(&unit[..fan_in]);
                    if layer.bias.is_some() {
                        diag[at + fan_in * layer.fan_out() + o] += unit[fan_in];
                    }
                }
            }
            Ok(NetFisher::Diagonal(diag * scale))
        }
        NetForm::Norms => {
            let mut norms = Vec::with_capacity(n);
            for start in (0..n).step_by(parts_batch) {
                let parts = compute_parts(start, (start + parts_batch).min(n))?;
                norms.extend(parts.par_iter().map(|part| squared_norm(&net, part)).collect::<Vec<f64>>());
            }
            Ok(NetFisher::Norms(Array1::from(norms)))
        }
        NetForm::Kfac => {
            let batch = parts_batch;
            let mut a_factors: Vec<Array2<f64>> =
                mlp.layers.iter().map(|l| Array2::zeros((l.augmented_in(), l.augmented_in()))).collect();
            let mut g_factors: Vec<Array2<f64>> =
                mlp.layers.iter().map(|l| Array2::zeros((l.fan_out(), l.fan_out()))).collect();
            for start in (0..n).step_by(batch) {
                let parts = compute_parts(start, (start + batch).min(n))?;
                for (l, layer) in mlp.layers.iter().enumerate() {
                    let mut augmented = Array2::<f64>::ones((parts.len(), layer.augmented_in()));
                    for (row, part) in parts.iter().enumerate() {
                        augmented.slice_mut(s![row, ..layer.fan_in()]).assign(&part.inputs[l]);
                    }
                    add_upper_gram(&mut a_factors[l], augmented.view());
                    let deltas: Vec<ArrayView2<'_, f64>> =
                        parts.iter().map(|part| part.deltas[l].view()).collect();
                    let deltas = ndarray::concatenate(Axis(0), &deltas)
                        .map_err(|e| FisherError::InvalidInput(format!("cannot stack δ rows: {e}")))?;
                    add_upper_gram(&mut g_factors[l], deltas.view());
                }
            }
            Ok(NetFisher::Kfac(
                a_factors
                    .into_iter()
                    .zip(g_factors)
                    .map(|(mut a, mut g)| {
                        mirror_upper(&mut a);
                        mirror_upper(&mut g);
                        KfacFactors { a: a * scale, g: g * scale }
                    })
                    .collect(),
            ))
        }
    }
}

/// z_l, the pre-activation output of every layer (the last is the network output), in f64
/// at parameters θ (PyTorch order, f64) for the input `x`. With θ = `mlp.parameters()` (as
/// f64) this is the model itself; the finite-difference tests perturb θ in f64.
pub fn pre_activations_at(
    mlp: &Mlp,
    theta: ArrayView1<'_, f64>,
    x: ArrayView1<'_, f32>,
) -> Result<Vec<Array1<f64>>> {
    let net = NetF64::from_theta(mlp, theta)?;
    if x.len() != mlp.input_dim() {
        return Err(FisherError::InvalidInput(format!(
            "the input has {} values but the model expects {}",
            x.len(),
            mlp.input_dim()
        )));
    }
    Ok(net.forward(x).pre)
}

/// log p(yᵢ | xᵢ, θ) for sample `sample` of `data`, in f64 at parameters θ (PyTorch order):
/// categorical, the log-softmax of the output at the label, z_y − ln Σ_c exp z_c; Gaussian,
/// −½‖y − z‖² − (k/2) ln 2π.
pub fn log_likelihood_at(
    mlp: &Mlp,
    theta: ArrayView1<'_, f64>,
    data: &Dataset,
    sample: usize,
    likelihood: Likelihood,
) -> Result<f64> {
    if sample >= data.len() {
        return Err(FisherError::InvalidInput(format!(
            "sample {sample} is out of range for a dataset of {} samples",
            data.len()
        )));
    }
    let pre = pre_activations_at(mlp, theta, data.inputs.row(sample))?;
    let Some(z) = pre.last() else {
        return Err(FisherError::InvalidInput("the model has no Linear layers".into()));
    };
    match (likelihood, &data.targets) {
        (Likelihood::Categorical, Targets::Classes(classes)) => {
            let label = classes.get(sample).copied().unwrap_or(u32::MAX) as usize;
            if label >= z.len() {
                return Err(FisherError::InvalidInput(format!(
                    "label {label} at row {sample} is out of range: the model has {} classes",
                    z.len()
                )));
            }
            Ok(z[label] - log_sum_exp(z.view()))
        }
        (Likelihood::Gaussian, Targets::Values(values))
            if values.ncols() == z.len() && sample < values.nrows() =>
        {
            let squared: f64 =
                values.row(sample).iter().zip(z).map(|(&y, &m)| (f64::from(y) - m).powi(2)).sum();
            Ok(-0.5 * squared - 0.5 * z.len() as f64 * (2.0 * std::f64::consts::PI).ln())
        }
        _ => Err(FisherError::InvalidInput(
            "the targets do not match the likelihood (class labels for categorical, N×k values for Gaussian)"
                .into(),
        )),
    }
}

/// log p(yᵢ | xᵢ) at the model's own parameters; see [`log_likelihood_at`].
pub fn log_likelihood(mlp: &Mlp, data: &Dataset, sample: usize, likelihood: Likelihood) -> Result<f64> {
    let theta = mlp.parameters().mapv(f64::from);
    log_likelihood_at(mlp, theta.view(), data, sample, likelihood)
}
