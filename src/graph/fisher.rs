//! The Fisher of a graph network in every variant and form, on any [`ProgramExec`].
//!
//! Per micro-batch: the forward program gives z; the variant's output rows s_ir (the table
//! in [`crate::model`]) seed the reverse program, whose per-row parameter gradients
//! g_ir = J_iᵀ s_ir are reduced to the form: F = (1/N) Σᵢ Σ_r g_ir g_irᵀ. KFAC uses the
//! input patches and output cotangents that the program keeps per site; F·v uses the
//! forward-mode program (J·v), Λ at the output, and one reverse pass.

use std::sync::Arc;

use ndarray::{Array1, Array2};

use super::exec::ProgramExec;
use super::ir::Graph;
use super::prim::{Backward, Program, Rows};
use crate::backend::cpu::network::{lambda_times, output_rows};
use crate::backend::cpu::syrk::{is_single_whole_pass, plan_units, SymmetricSum, Unit};
use crate::error::{FisherError, Result};
use crate::fisher::{rows_per_sample, Fvp, KfacFactors, NetFisher, NetForm, Variant};
use crate::model::{Dataset, Likelihood, Targets};

/// Default scratch of one micro-batch, bytes.
pub const DEFAULT_BATCH_BYTES: u64 = 512 << 20;
/// Largest micro-batch, samples.
const MAX_MICRO_BATCH: usize = 4096;

/// A graph network ready to run: the IR and its lowered, differentiated program.
#[derive(Debug, Clone)]
pub struct GraphModel {
    /// The network.
    pub graph: Graph,
    /// Its primitive program (forward, reverse, forward-mode).
    pub program: Arc<Program>,
    /// Modules that have no KFAC factors, and why.
    pub kfac_refused: Vec<(String, String)>,
}

impl GraphModel {
    /// Lowers and differentiates `graph`.
    pub fn new(graph: Graph) -> Result<GraphModel> {
        let (program, kfac_refused) = super::lower::program(&graph)?;
        Ok(GraphModel { graph, program: Arc::new(program), kfac_refused })
    }

    /// A model with θ replaced (same order and length as [`Graph::theta`]); used for the
    /// checkpoints of a training run.
    pub fn with_theta(&self, theta: &[f32]) -> Result<GraphModel> {
        let mut graph = self.graph.clone();
        graph.set_theta(theta)?;
        GraphModel::new(graph)
    }

    /// Checks `data` against the model: N ≥ 1, the input width, the targets' kind, count and
    /// range, finite values.
    pub fn check_data(&self, data: &Dataset, likelihood: Likelihood) -> Result<()> {
        let (n, d) = data.inputs.dim();
        let want = self.graph.tensors[self.graph.input].len();
        if n == 0 {
            return Err(FisherError::Empty { what: "inputs".into(), rows: n, cols: d });
        }
        if d != want {
            return Err(FisherError::InvalidInput(format!(
                "inputs have {d} values per sample but the model's input {} has shape {:?} ({want} values)",
                self.graph.tensors[self.graph.input].name,
                self.graph.input_shape()
            )));
        }
        crate::validate::check_matrix("inputs", data.inputs.view(), 0)?;
        let c = self.graph.outputs();
        match (&data.targets, likelihood) {
            (Targets::Classes(labels), Likelihood::Categorical) => {
                if labels.len() != n {
                    return Err(FisherError::InvalidInput(format!("the dataset has {n} inputs but {} labels", labels.len())));
                }
                if let Some((row, &y)) = labels.iter().enumerate().find(|(_, &y)| y as usize >= c) {
                    return Err(FisherError::InvalidInput(format!(
                        "label {y} at row {row} is out of range: the model has {c} outputs (classes)"
                    )));
                }
            }
            (Targets::Values(v), Likelihood::Gaussian) => {
                if v.dim() != (n, c) {
                    return Err(FisherError::InvalidInput(format!(
                        "targets have shape {:?}; the Gaussian likelihood needs {n}×{c} (one per output)",
                        v.dim()
                    )));
                }
                crate::validate::check_matrix("targets", v.view(), 0)?;
            }
            (Targets::Classes(_), Likelihood::Gaussian) => {
                return Err(FisherError::InvalidInput("the Gaussian likelihood needs real-valued targets, not class labels".into()))
            }
            (Targets::Values(_), Likelihood::Categorical) => {
                return Err(FisherError::InvalidInput("the categorical likelihood needs integer class labels".into()))
            }
        }
        Ok(())
    }
}

/// Which parameters a result covers (`--params REGEX`): indices into the graph's parameters,
/// increasing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection(pub Vec<usize>);

impl Selection {
    /// Every parameter of `graph`.
    pub fn all(graph: &Graph) -> Selection {
        Selection((0..graph.params.len()).collect())
    }

    /// The parameters whose name matches `pattern` (a predicate; the CLI passes a regex), or
    /// an error listing the names when none does.
    pub fn matching(graph: &Graph, pattern: &str, matches: impl Fn(&str) -> bool) -> Result<Selection> {
        let picked: Vec<usize> = (0..graph.params.len()).filter(|&i| matches(&graph.params[i].name)).collect();
        if picked.is_empty() {
            let names: Vec<&str> = graph.params.iter().map(|p| p.name.as_str()).collect();
            return Err(FisherError::Request(format!(
                "--params {pattern} matches no parameter (the model has: {})",
                names.join(", ")
            )));
        }
        Ok(Selection(picked))
    }

    /// Selected scalars.
    pub fn count(&self, graph: &Graph) -> usize {
        self.0.iter().map(|&i| graph.params[i].len()).sum()
    }

    /// For each selected parameter, (offset in θ, length).
    pub fn ranges(&self, graph: &Graph) -> Vec<(usize, usize)> {
        let offsets = graph.param_offsets();
        self.0.iter().map(|&i| (offsets[i], graph.params[i].len())).collect()
    }
}

/// Limits of a run.
#[derive(Debug, Clone, Copy)]
pub struct RunLimits {
    /// Scratch of one micro-batch, bytes.
    pub batch_bytes: u64,
    /// Largest result held in host memory, bytes.
    pub result_bytes: u64,
    /// Host memory for the running sums of a full F or the layer blocks, bytes; beyond it
    /// they are computed in bands of rows, in several passes over the samples (as on the
    /// MLP path: [`crate::backend::cpu::CpuBackend::with_accumulator_bytes`]).
    pub accumulator_bytes: u64,
}

impl Default for RunLimits {
    fn default() -> Self {
        RunLimits {
            batch_bytes: DEFAULT_BATCH_BYTES,
            result_bytes: crate::backend::DEFAULT_RESULT_LIMIT,
            accumulator_bytes: crate::backend::cpu::DEFAULT_ACCUMULATOR_BYTES,
        }
    }
}

/// Samples per micro-batch for `r` rows per sample and `extra` host floats per row.
fn micro_batch(exec: &dyn ProgramExec, prog: &Program, n: usize, r: usize, extra_per_row: u64, which: Backward, limits: &RunLimits) -> Result<usize> {
    micro_batch_plan(prog, n, r, extra_per_row, which, exec.max_slot_bytes(), &exec.label(), limits)
}

/// The micro-batch a run uses: samples per micro-batch for `n` samples with `r` output rows
/// each and `extra_per_row` host floats per row, within `limits.batch_bytes` (at least one
/// sample, refused beyond 8× the budget) and with every slot within `max_slot` bytes (the
/// executor's binding limit, named by `label` in errors). Its activations take
/// `samples · prog.floats_per_sample(r) · 4` bytes.
#[allow(clippy::too_many_arguments)]
pub fn micro_batch_plan(prog: &Program, n: usize, r: usize, extra_per_row: u64, which: Backward, max_slot: u64, label: &str, limits: &RunLimits) -> Result<usize> {
    let per_sample = prog.floats_per_sample_for(r, which).saturating_add(extra_per_row.saturating_mul(r as u64)).saturating_mul(4).max(1);
    let mut samples = (limits.batch_bytes / per_sample).max(1).min(n as u64).min(MAX_MICRO_BATCH as u64) as usize;
    // Every slot of the micro-batch must fit one binding of the executor.
    for s in &prog.slots {
        let per = match s.rows {
            Rows::Shared => continue,
            Rows::Sample => s.len as u64 * 4,
            Rows::Draw => (s.len as u64 * 4).saturating_mul(r as u64),
        };
        if per > max_slot {
            return Err(FisherError::DoesNotFit {
                what: format!("tensor {} for one sample ({} rows)", s.name, if s.rows == Rows::Draw { r } else { 1 }),
                needed: per,
                limit: max_slot,
                which: format!("the largest buffer binding of {label}"),
            });
        }
        samples = samples.min((max_slot / per.max(1)) as usize).max(1);
    }
    if per_sample > limits.batch_bytes.saturating_mul(8) {
        return Err(FisherError::DoesNotFit {
            what: format!("one sample with {r} output rows"),
            needed: per_sample,
            limit: limits.batch_bytes.saturating_mul(8),
            which: "8× the micro-batch budget".into(),
        });
    }
    Ok(samples.max(1))
}

fn check_result(values: Option<u128>, limits: &RunLimits, what: impl FnOnce() -> String) -> Result<()> {
    let bytes = values.map(|v| v.saturating_mul(4)).unwrap_or(u128::MAX);
    if bytes > u128::from(limits.result_bytes) {
        return Err(FisherError::DoesNotFit {
            what: what(),
            needed: u64::try_from(bytes).unwrap_or(u64::MAX),
            limit: limits.result_bytes,
            which: "the result limit (--max-result-gib)".into(),
        });
    }
    Ok(())
}

/// How a run was split (for reports and the memory accounting of benchmarks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RunStats {
    /// Samples per micro-batch.
    pub micro_batch: usize,
    /// Output rows per sample.
    pub rows_per_sample: usize,
    /// Bytes of one micro-batch's activations (forward values, cotangents or tangents).
    pub activation_bytes: u64,
    /// Bytes of the shared slots (parameters, constants, sparse maps' values not counted).
    pub shared_bytes: u64,
}

/// The network Fisher of `model` on `data`, reduced to `form` over the `selection`'s
/// parameters. Layer blocks are per module (consecutive selected parameters sharing a
/// module name); KFAC factors are per Gemm/MatMul/Conv site whose weight is selected.
#[allow(clippy::too_many_arguments)]
pub fn fisher(
    exec: &mut dyn ProgramExec,
    model: &GraphModel,
    data: &Dataset,
    likelihood: Likelihood,
    variant: Variant,
    form: NetForm,
    selection: &Selection,
    limits: &RunLimits,
) -> Result<NetFisher> {
    fisher_with_stats(exec, model, data, likelihood, variant, form, selection, limits, &mut RunStats::default())
}

/// [`fisher`], also telling how the run was split.
#[allow(clippy::too_many_arguments)]
pub fn fisher_with_stats(
    exec: &mut dyn ProgramExec,
    model: &GraphModel,
    data: &Dataset,
    likelihood: Likelihood,
    variant: Variant,
    form: NetForm,
    selection: &Selection,
    limits: &RunLimits,
    stats: &mut RunStats,
) -> Result<NetFisher> {
    model.check_data(data, likelihood)?;
    let graph = &model.graph;
    let prog = &model.program;
    let n = data.len();
    let c = graph.outputs();
    if let Variant::MonteCarlo { samples: 0, .. } = variant {
        return Err(FisherError::Request("--mc-samples must be at least 1".into()));
    }
    let r = rows_per_sample(variant, c);
    let p_all = graph.param_count();
    let ranges = selection.ranges(graph);
    let p = selection.count(graph);
    let modules = selected_modules(graph, selection);
    let sites: Vec<usize> = (0..prog.kfac.len()).filter(|&k| selection.0.contains(&prog.kfac[k].weight)).collect();
    match form {
        NetForm::Full => check_result((p as u128).checked_mul(p as u128), limits, || format!("the full Fisher of {p} parameters"))?,
        NetForm::Layer => check_result(
            Some(modules.iter().map(|(_, len, _)| (*len as u128) * (*len as u128)).sum()),
            limits,
            || "the layer blocks".into(),
        )?,
        NetForm::Grads => check_result(
            (n as u128).checked_mul(r as u128).and_then(|v| v.checked_mul(p as u128)),
            limits,
            || format!("{n}×{r} gradient rows of {p} parameters"),
        )?,
        NetForm::Kfac => {
            if let Some((module, why)) = model.kfac_refused.iter().find(|(m, _)| modules.iter().any(|(name, _, _)| name == m)) {
                return Err(FisherError::Request(format!("kfac: module {module} is {why}; use --params to leave it out, or another form")));
            }
            // A layer's factors cover its weight and bias together.
            for site in &prog.kfac {
                let (w, b) = (selection.0.contains(&site.weight), site.bias.map(|b| selection.0.contains(&b)));
                if b.is_some_and(|b| b != w) {
                    let name = |i: usize| graph.params[i].name.as_str();
                    let (picked, missing) = if w { (site.weight, site.bias.unwrap()) } else { (site.bias.unwrap(), site.weight) };
                    return Err(FisherError::Request(format!(
                        "kfac: {} is selected without {}; a layer's Kronecker factors cover its weight and bias together (select both, e.g. --params '^{}\\.')",
                        name(picked),
                        name(missing),
                        regex_escape(&site.module)
                    )));
                }
            }
            if sites.is_empty() {
                return Err(FisherError::Request("kfac: no selected parameter belongs to a Linear (Gemm/MatMul) or Conv layer".into()));
            }
        }
        _ => {}
    }
    let host_rows = matches!(form, NetForm::Full | NetForm::Layer | NetForm::Grads | NetForm::Norms);
    let which = if form == NetForm::Kfac { Backward::Kfac } else { Backward::Full };
    let batch = micro_batch(exec, prog, n, r, if host_rows { p_all as u64 + p as u64 } else { 0 }, which, limits)?;
    log::info!(
        "graph fisher on {}: micro-batches of {batch} samples × {r} rows, {} bytes of activations",
        exec.label(),
        (batch as u64).saturating_mul(prog.floats_per_sample_for(r, which)).saturating_mul(4)
    );
    *stats = RunStats {
        micro_batch: batch,
        rows_per_sample: r,
        activation_bytes: (batch as u64).saturating_mul(prog.floats_per_sample_for(r, which)).saturating_mul(4),
        shared_bytes: prog.shared_floats().saturating_mul(4),
    };
    exec.begin(batch, r, which)?;

    let mut diag = vec![0f64; if form == NetForm::Diagonal { p_all } else { 0 }];
    // A full F or layer blocks whose sums exceed the accumulator budget: bands of rows, one
    // group per pass over the samples, each written into the f32 result when its pass ends
    // (bitwise the values of one pass). Every other form takes one pass.
    let sides: Vec<usize> = match form {
        NetForm::Full => vec![p],
        NetForm::Layer => modules.iter().map(|(_, len, _)| *len).collect(),
        _ => Vec::new(),
    };
    let passes = if sides.is_empty() { vec![Vec::new()] } else { plan_units(&sides, limits.accumulator_bytes, 0) };
    let whole = is_single_whole_pass(&passes);
    if !whole {
        log::info!("{form:?}: {} passes over the samples (accumulator budget {} bytes)", passes.len(), limits.accumulator_bytes);
    }
    let mut banded: Vec<Vec<f32>> = if whole { Vec::new() } else { sides.iter().map(|&m| vec![0f32; m * m]).collect() };
    let mut whole_sums: Vec<SymmetricSum> = Vec::new();
    let mut grads: Vec<f32> = Vec::new();
    let mut norms: Vec<f64> = Vec::new();
    let mut kfac: Vec<(Vec<f64>, Vec<f64>)> = sites
        .iter()
        .map(|&k| {
            let s = &prog.kfac[k];
            let ka = s.fan_in + s.bias.is_some() as usize;
            (vec![0f64; ka * ka], vec![0f64; s.fan_out * s.fan_out])
        })
        .collect();
    let d = graph.tensors[graph.input].len();
    let mut rows_buf: Vec<f32> = Vec::new();
    let nf = n as f64;
    for units in &passes {
        let mut sums: Vec<(&Unit, SymmetricSum)> = units.iter().map(|u| (u, SymmetricSum::band(u.size, u.rows.clone()))).collect();
        let mut s0 = 0;
        while s0 < n {
            let m = batch.min(n - s0);
            let x = data.inputs.slice(ndarray::s![s0..s0 + m, ..]);
            let x: Vec<f32> = x.iter().copied().collect();
            debug_assert_eq!(x.len(), m * d);
            let z = exec.forward(&x, m)?;
            let z = Array2::from_shape_vec((m, c), z).map_err(|e| FisherError::InvalidInput(e.to_string()))?;
            if !z.iter().all(|v| v.is_finite()) {
                return Err(FisherError::InvalidInput(format!("the model's output is not finite for a sample in rows {s0}..{}", s0 + m)));
            }
            let rows = output_rows(z.view(), data, s0, variant, (0, r), false)?;
            exec.backward(rows.as_slice().expect("standard layout"), which)?;
            match form {
                NetForm::Diagonal => exec.add_diag(&mut diag)?,
                NetForm::Kfac => {
                    for (slot, &k) in kfac.iter_mut().zip(&sites) {
                        exec.add_kfac(k, &mut slot.0, &mut slot.1)?;
                    }
                }
                _ => {
                    rows_buf.resize(m * r * p_all, 0.0);
                    exec.param_grads(&mut rows_buf)?;
                    // The selected columns, row by row.
                    let mut sel = Array2::<f32>::zeros((m * r, p));
                    for (q, mut row) in sel.rows_mut().into_iter().enumerate() {
                        let src = &rows_buf[q * p_all..][..p_all];
                        let mut at = 0;
                        for &(off, len) in &ranges {
                            row.as_slice_mut().expect("row")[at..at + len].copy_from_slice(&src[off..off + len]);
                            at += len;
                        }
                    }
                    match form {
                        NetForm::Full => {
                            for (_, sum) in &mut sums {
                                sum.add(sel.view());
                            }
                        }
                        NetForm::Layer => {
                            for (unit, sum) in &mut sums {
                                let (_, len, start) = &modules[unit.layer];
                                sum.add(sel.slice(ndarray::s![.., *start..*start + *len]));
                            }
                        }
                        NetForm::Grads => grads.extend(sel.iter().copied()),
                        NetForm::Norms => {
                            for i in 0..m {
                                norms.push((0..r).map(|q| sel.row(i * r + q).iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>()).sum());
                            }
                        }
                        _ => unreachable!(),
                    }
                }
            }
            s0 += m;
        }
        if whole {
            whole_sums = sums.into_iter().map(|(_, sum)| sum).collect();
        } else {
            for (unit, sum) in &sums {
                let m = unit.size;
                let (head, below) = banded[unit.layer].split_at_mut(unit.rows.end * m);
                sum.finish_band_into(nf, &mut head[unit.rows.start * m..], below);
            }
        }
    }
    let square = |v: Vec<f32>, m: usize| Array2::from_shape_vec((m, m), v).expect("m·m values");
    Ok(match form {
        NetForm::Diagonal => {
            let mut out = Vec::with_capacity(p);
            for &(off, len) in &ranges {
                out.extend(diag[off..off + len].iter().map(|&v| (v / nf) as f32));
            }
            NetFisher::Diagonal(Array1::from(out))
        }
        NetForm::Full if whole => NetFisher::Full(whole_sums[0].finish(nf)),
        NetForm::Full => NetFisher::Full(square(banded.pop().expect("one side"), p)),
        NetForm::Layer if whole => NetFisher::Layer(whole_sums.iter().map(|s| s.finish(nf)).collect()),
        NetForm::Layer => NetFisher::Layer(banded.into_iter().zip(&sides).map(|(v, &m)| square(v, m)).collect()),
        NetForm::Grads => NetFisher::Grads(Array2::from_shape_vec((n * r, p), grads).map_err(|e| FisherError::InvalidInput(e.to_string()))?),
        NetForm::Norms => NetFisher::Norms(norms.into_iter().map(|v| v as f32).collect()),
        NetForm::Kfac => NetFisher::Kfac(
            kfac.into_iter()
                .zip(&sites)
                .map(|((a, g), &k)| {
                    let s = &prog.kfac[k];
                    let ka = s.fan_in + s.bias.is_some() as usize;
                    KfacFactors {
                        a: Array2::from_shape_fn((ka, ka), |(i, j)| (a[i * ka + j] / nf) as f32),
                        g: Array2::from_shape_fn((s.fan_out, s.fan_out), |(i, j)| (g[i * s.fan_out + j] / nf) as f32),
                    }
                })
                .collect(),
        ),
    })
}

/// `text` with the regular-expression metacharacters escaped (for the hints of messages).
fn regex_escape(text: &str) -> String {
    text.chars().flat_map(|c| if "\\.+*?()|[]{}^$".contains(c) { vec!['\\', c] } else { vec![c] }).collect()
}

/// The layer blocks of a selection: (module, selected scalars in it, start in the selected
/// vector), consecutive selected parameters of one module forming one block.
pub fn selected_modules(graph: &Graph, selection: &Selection) -> Vec<(String, usize, usize)> {
    let mut out: Vec<(String, usize, usize)> = Vec::new();
    let mut at = 0;
    let mut prev: Option<usize> = None;
    for &i in &selection.0 {
        let p = &graph.params[i];
        match out.last_mut() {
            Some((m, len, _)) if m == p.module() && prev == Some(i.wrapping_sub(1)) => *len += p.len(),
            _ => out.push((p.module().to_string(), p.len(), at)),
        }
        at += p.len();
        prev = Some(i);
    }
    out
}

/// The KFAC sites a `kfac` result covers, in result order: (module, site index).
pub fn kfac_sites(model: &GraphModel, selection: &Selection) -> Vec<(String, usize)> {
    (0..model.program.kfac.len())
        .filter(|&k| selection.0.contains(&model.program.kfac[k].weight))
        .map(|k| (model.program.kfac[k].module.clone(), k))
        .collect()
}

/// F·v (when `product`) and vᵀFv without forming F: per micro-batch J·v by forward mode,
/// w = Λ J·v at the output, and Jᵀw by one reverse pass (R = 1). `v` is the whole θ.
pub fn fvp(exec: &mut dyn ProgramExec, model: &GraphModel, data: &Dataset, likelihood: Likelihood, variant: Variant, v: &[f32], product: bool, limits: &RunLimits) -> Result<Fvp> {
    model.check_data(data, likelihood)?;
    let graph = &model.graph;
    let p = graph.param_count();
    if v.len() != p {
        return Err(FisherError::InvalidInput(format!("the direction has {} values; the model has {p} parameters", v.len())));
    }
    let n = data.len();
    let c = graph.outputs();
    let prog = &model.program;
    let batch = micro_batch(exec, prog, n, 1, 0, Backward::Full, limits)?;
    exec.begin(batch, 1, Backward::Full)?;
    let mut sums = vec![0f64; if product { p } else { 0 }];
    let mut quadratic = 0f64;
    let mut s0 = 0;
    while s0 < n {
        let m = batch.min(n - s0);
        let x: Vec<f32> = data.inputs.slice(ndarray::s![s0..s0 + m, ..]).iter().copied().collect();
        let z = Array2::from_shape_vec((m, c), exec.forward(&x, m)?).map_err(|e| FisherError::InvalidInput(e.to_string()))?;
        let jv = Array2::from_shape_vec((m, c), exec.tangent(v)?).map_err(|e| FisherError::InvalidInput(e.to_string()))?;
        let w = lambda_times(z.view(), jv.view(), data, s0, variant)?;
        quadratic += jv.iter().zip(w.iter()).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum::<f64>();
        if product {
            exec.backward(w.as_slice().expect("standard layout"), Backward::Full)?;
            exec.add_grad_sum(&mut sums)?;
        }
        s0 += m;
    }
    let nf = n as f64;
    Ok(Fvp { product: product.then(|| sums.iter().map(|&s| (s / nf) as f32).collect()), quadratic: quadratic / nf })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::exec::CpuExec;
    use crate::graph::ir::{GraphBuilder, InputType, Op, UnaryOp};
    use crate::model::{Activation, Linear, Mlp};

    fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32 * scale
            })
            .collect()
    }

    /// A Linear–Tanh–Linear network as a graph and as an `Mlp`, and data for it.
    fn twin(likelihood: Likelihood) -> (GraphModel, Mlp, Dataset) {
        let (d, h, c, n) = (6, 5, 3, 7);
        let w1 = values(h * d, 1, 0.8);
        let b1 = values(h, 2, 0.3);
        let w2 = values(c * h, 3, 0.9);
        let b2 = values(c, 4, 0.2);
        let mut g = GraphBuilder::new("x", &[d], InputType::Float);
        let pw1 = g.param("0.weight", &[h, d], w1.clone()).unwrap();
        let pb1 = g.param("0.bias", &[h], b1.clone()).unwrap();
        let z1 = g.node("fc1", Op::Gemm { alpha: 1.0, beta: 1.0, trans_b: true }, &[0, pw1, pb1]).unwrap();
        let a1 = g.node("tanh", Op::Unary(UnaryOp::Tanh), &[z1]).unwrap();
        let pw2 = g.param("2.weight", &[c, h], w2.clone()).unwrap();
        let pb2 = g.param("2.bias", &[c], b2.clone()).unwrap();
        let out = g.node("fc2", Op::Gemm { alpha: 1.0, beta: 1.0, trans_b: true }, &[a1, pw2, pb2]).unwrap();
        let model = GraphModel::new(g.finish(out).unwrap()).unwrap();
        let mlp = Mlp::new(
            vec![
                Linear { index: 0, weight: Array2::from_shape_vec((h, d), w1).unwrap(), bias: Some(Array1::from(b1)) },
                Linear { index: 2, weight: Array2::from_shape_vec((c, h), w2).unwrap(), bias: Some(Array1::from(b2)) },
            ],
            vec![Activation::Tanh],
        )
        .unwrap();
        let inputs = Array2::from_shape_vec((n, d), values(n * d, 5, 1.5)).unwrap();
        let targets = match likelihood {
            Likelihood::Categorical => Targets::Classes((0..n as u32).map(|i| i % c as u32).collect()),
            Likelihood::Gaussian => Targets::Values(Array2::from_shape_vec((n, c), values(n * c, 6, 1.0)).unwrap()),
        };
        (model, mlp, Dataset { inputs, targets })
    }

    #[test]
    fn linear_graph_matches_the_mlp_reference_in_every_variant_and_form() {
        for likelihood in [Likelihood::Categorical, Likelihood::Gaussian] {
            let (model, mlp, data) = twin(likelihood);
            for variant in [Variant::Empirical, Variant::True, Variant::MonteCarlo { samples: 3, seed: 9 }] {
                for form in NetForm::ALL {
                    let mut exec = CpuExec::new(Arc::clone(&model.program));
                    // A small budget forces several micro-batches.
                    let limits = RunLimits { batch_bytes: 2048, ..RunLimits::default() };
                    let got = fisher(&mut exec, &model, &data, likelihood, variant, form, &Selection::all(&model.graph), &limits).unwrap();
                    let want = crate::reference::network::fisher(&mlp, &data, likelihood, variant, form).unwrap();
                    let agreement = got.agreement(&want).unwrap();
                    assert!(agreement.frobenius_rel < 1e-5, "{likelihood:?} {variant:?} {form:?}: {agreement:?}");
                }
            }
        }
    }

    #[test]
    fn implicit_product_matches_the_full_matrix() {
        let (model, mlp, data) = twin(Likelihood::Categorical);
        let p = model.graph.param_count();
        let v = values(p, 11, 1.0);
        for variant in [Variant::Empirical, Variant::True, Variant::MonteCarlo { samples: 4, seed: 3 }] {
            let mut exec = CpuExec::new(Arc::clone(&model.program));
            let got = fvp(&mut exec, &model, &data, Likelihood::Categorical, variant, &v, true, &RunLimits::default()).unwrap();
            let NetFisher::Full(f) = crate::reference::network::fisher(&mlp, &data, Likelihood::Categorical, variant, NetForm::Full).unwrap() else { unreachable!() };
            let want: Vec<f64> = (0..p).map(|i| (0..p).map(|j| f[[i, j]] * f64::from(v[j])).sum()).collect();
            let quad: f64 = want.iter().zip(&v).map(|(a, &b)| a * f64::from(b)).sum();
            let got_v: Vec<f64> = got.product.unwrap().iter().map(|&x| f64::from(x)).collect();
            let a = crate::fisher::agreement_of(&got_v, &want);
            assert!(a.max_rel < 1e-5, "{variant:?}: {a:?}");
            assert!((got.quadratic - quad).abs() <= 1e-5 * quad.abs(), "{variant:?}: {} vs {quad}", got.quadratic);
        }
    }

    #[test]
    fn the_kfac_backward_skips_the_parameter_gradients() {
        let (model, _, _) = twin(Likelihood::Categorical);
        let p = &model.program;
        assert!(p.backward_kfac.len() < p.backward.len(), "{} vs {}", p.backward_kfac.len(), p.backward.len());
        // The per-row weight gradients (MatMuls writing parameter gradients) are gone.
        let grads: Vec<usize> = p.param_grads.clone();
        assert!(p.backward_kfac.iter().all(|i| !grads.contains(&i.dst())));
        assert!(p.backward.iter().any(|i| grads.contains(&i.dst())));
    }

    #[test]
    fn params_selection_restricts_every_form() {
        let (model, _, data) = twin(Likelihood::Categorical);
        let sel = Selection::matching(&model.graph, "^2\\.", |n| n.starts_with("2.")).unwrap();
        assert_eq!(sel.0, vec![2, 3]);
        let mut exec = CpuExec::new(Arc::clone(&model.program));
        let limits = RunLimits::default();
        let all = fisher(&mut exec, &model, &data, Likelihood::Categorical, Variant::True, NetForm::Diagonal, &Selection::all(&model.graph), &limits).unwrap();
        let last = fisher(&mut exec, &model, &data, Likelihood::Categorical, Variant::True, NetForm::Diagonal, &sel, &limits).unwrap();
        let (NetFisher::Diagonal(all), NetFisher::Diagonal(last)) = (all, last) else { unreachable!() };
        assert_eq!(last.len(), 18);
        assert_eq!(last.as_slice().unwrap(), &all.as_slice().unwrap()[35..]);
        let kfac = fisher(&mut exec, &model, &data, Likelihood::Categorical, Variant::True, NetForm::Kfac, &sel, &limits).unwrap();
        let NetFisher::Kfac(f) = kfac else { unreachable!() };
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].a.dim(), (6, 6));
        assert!(Selection::matching(&model.graph, "nope", |_| false).unwrap_err().to_string().contains("0.weight, 0.bias"));
    }
}
