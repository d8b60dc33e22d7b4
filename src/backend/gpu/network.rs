//! Network Fisher on the GPU: per-micro-batch forward, output rows, backward, and the fused
//! reductions, with device memory bounded by the model plus one micro-batch.
//!
//! Data flow for a micro-batch of m samples (R output rows each, see [`crate::model`]):
//!
//! ```text
//! x ─upload─▶ ã₀ ─GEMM(ã Wᵀ)+b─▶ z₀ ─φ─▶ ã₁ … ─▶ z_{L−1} ─head─▶ δ_{L−1} (m·R × C)
//! δ_l ─GEMM(δ W)─▶ ·φ'(z_{l−1}) ─▶ δ_{l−1}            (backward, layer by layer)
//! at each layer l, from (δ_l, ã_l):
//!   diag : D_l += (Σ_R δ²)ᵀ (ã∘ã)             (squared-GEMM identity, out × (in+1))
//!   kfac : A_l += ãᵀã,  G_l += δᵀδ             (two SYRKs)
//!   full/layer/grads : rows δ ⊗ ã written into a (m·R × P) buffer, then the SYRK planner
//!   norms: ‖δ_r‖² and ‖ã‖² per row, combined on the host
//! ```
//! The R output rows of a micro-batch (R = K for Monte Carlo) are generated d at a time
//! ([`Batching`]): the forward pass runs once per micro-batch, then head, backward and
//! reduction once per chunk of draws, each chunk its own submission. Every form is a sum over
//! rows (KFAC's A over samples, added with the first chunk), so device memory and the work
//! of one submission are bounded whatever K is.
//! Every GEMM is the compensated kernel of `syrk.wgsl`, so accumulations over samples carry
//! Kahan compensation exactly like the gradient-matrix reductions.
//!
//! The stages are split so that a new layer kind touches one place: [`Net`] owns the
//! per-layer forward and backward (the only code that knows a layer is dense), and
//! [`Reduction`] consumes each layer's (δ_l, ã_l) pair through [`LayerShape`] alone.
//! `network_fisher` is plan ([`NetPlan`], shared with the CPU path) → allocate
//! ([`Reduction::new`], [`Net::new`]) → encode per layer → finish ([`Reduction::finish`]).

use ndarray::{Array1, Array2, ArrayView1};

use super::consts::{FLAG_BIAS, FLAG_GAUSSIAN, FLAG_ONE, VARIANT_EMPIRICAL, VARIANT_MC, VARIANT_TRUE};
use super::kernels::{Bindings, Entry, MlpParams, Recorder, RowParams, SyrkParams};
use super::{read_f32, storage_f32, GpuAccumulator, GpuBackend};
use crate::backend::plan::{BatchCost, Batching, LayerShape, NetPlan};
use crate::backend::Accumulator;
use crate::error::{FisherError, Result};
use crate::fisher::{FisherMatrix, Fvp, KfacFactors, NetFisher, NetForm, Variant};
use crate::model::{DataSource, Likelihood, Mlp, TargetRows};

/// Bytes of micro-batch target per draw evaluation (sample × draw) of one `head_fvp`
/// dispatch: each invocation loops over its draws, so K = 10⁹ in one dispatch would run for
/// minutes (and trip driver watchdogs). The default 64 MiB target gives 2²² evaluations per
/// dispatch; tying it to the target lets tests force many dispatches with a tiny one.
const HEAD_FVP_BYTES_PER_DRAW: u64 = 16;
/// `head_fvp` dispatches recorded per submission before the next one waits for it.
const HEAD_FVP_PER_SUBMIT: usize = 16;

/// `x` as a u32 uniform field; the planner keeps every count below 2³² (bindings are below
/// 2³² bytes, samples and draws are checked by the engine and [`NetPlan::new`]), so this
/// only fails on a planning bug, and then as an error rather than a wrapped value.
fn u32_of(x: usize, what: &str) -> Result<u32> {
    u32::try_from(x).map_err(|_| FisherError::InvalidInput(format!("{what} = {x} exceeds the 2³²−1 a kernel can index")))
}

fn gemm(k: usize, m: usize, n: usize, a: (usize, usize), b: (usize, usize), upper: bool) -> SyrkParams {
    SyrkParams {
        k: k as u32,
        m: m as u32,
        n: n as u32,
        a_ks: a.0 as u32,
        a_ms: a.1 as u32,
        b_ks: b.0 as u32,
        b_ns: b.1 as u32,
        upper_only: upper as u32,
        ..Default::default()
    }
}

/// A running sum and its Kahan compensation (true value ≈ sum − comp), `len` f32 each.
struct KahanPair {
    sum: wgpu::Buffer,
    comp: wgpu::Buffer,
    len: usize,
}

impl KahanPair {
    fn new(be: &GpuBackend, label: &str, len: usize) -> Self {
        KahanPair { sum: storage_f32(&be.ctx, label, len), comp: storage_f32(&be.ctx, label, len), len }
    }

    /// Reads the pair and forms (S − c)/n in f64.
    fn mean(&self, be: &GpuBackend, n: usize) -> Result<Vec<f32>> {
        let s = read_f32(&be.ctx, &self.sum, self.len)?;
        let c = read_f32(&be.ctx, &self.comp, self.len)?;
        Ok(s.iter().zip(&c).map(|(&s, &c)| ((s as f64 - c as f64) / n as f64) as f32).collect())
    }

    /// Records `self += AᵀB`.
    fn add_product(&self, rec: &mut Recorder<'_>, p: SyrkParams, a: &wgpu::Buffer, b: &wgpu::Buffer) -> Result<()> {
        rec.syrk(p, a, b, &self.sum, &self.comp)
    }
}

/// A symmetric matrix from the upper triangle of a row-major `n × n` vector.
fn mirror_upper(v: &[f32], n: usize) -> Array2<f32> {
    Array2::from_shape_fn((n, n), |(r, c)| if c >= r { v[r * n + c] } else { v[c * n + r] })
}

/// The MLP uniform fields of a variant: (code, seed, draws K).
fn variant_params(variant: Variant) -> (u32, u64, usize) {
    match variant {
        Variant::Empirical => (VARIANT_EMPIRICAL, 0, 1),
        Variant::True => (VARIANT_TRUE, 0, 1),
        Variant::MonteCarlo { samples, seed } => (VARIANT_MC, seed, samples),
    }
}

/// The uniform block of `head`/`head_fvp` for samples s0..s0+m: output rows (draws)
/// `q0 .. q0 + d` of each sample and weight `scale` of the MC draws.
fn head_params(data: &dyn DataSource, variant: Variant, classes: usize, (s0, m): (usize, usize), (q0, d): (usize, usize), scale: f32) -> Result<MlpParams> {
    let (code, seed, _) = variant_params(variant);
    Ok(MlpParams {
        rows: u32_of(m, "samples per micro-batch")?,
        cols: u32_of(classes, "outputs")?,
        r: u32_of(d, "draws per chunk")?,
        flags: if data.likelihood() == Likelihood::Gaussian { FLAG_GAUSSIAN } else { 0 },
        variant: code,
        sample_off: u32_of(s0, "sample index")?,
        seed_lo: seed as u32,
        seed_hi: (seed >> 32) as u32,
        scale,
        draw_off: u32_of(q0, "draw index")?,
        ..Default::default()
    })
}

/// The model on the device and the buffers of one micro-batch's forward pass.
struct Net<'a> {
    be: &'a GpuBackend,
    mlp: &'a Mlp,
    shapes: Vec<LayerShape>,
    classes: usize,
    weights: Vec<wgpu::Buffer>,
    biases: Vec<Option<wgpu::Buffer>>,
    /// ã_l, m × ld_l (with the trailing 1 for layers with a bias).
    acts: Vec<wgpu::Buffer>,
    /// z_l, m × out_l (pre-activations).
    zs: Vec<wgpu::Buffer>,
    /// The Kahan pair every GEMM of the pass writes into (m·R × max width).
    gemm: KahanPair,
    targets: wgpu::Buffer,
    host_input: Vec<f32>,
    host_targets: Vec<f32>,
}

impl<'a> Net<'a> {
    fn new(be: &'a GpuBackend, mlp: &'a Mlp, plan: &NetPlan, mb: usize, gemm_rows: usize) -> Result<Self> {
        let ctx = &be.ctx;
        let shapes = plan.shapes.clone();
        let classes = plan.classes;
        let upload = |label: &str, data: &[f32]| {
            let b = storage_f32(ctx, label, data.len());
            ctx.queue.write_buffer(&b, 0, bytemuck::cast_slice(data));
            b
        };
        ctx.scoped("allocating network buffers", || {
            let (weights, biases) = mlp
                .layers
                .iter()
                .map(|l| {
                    let w = l.weight.as_standard_layout();
                    let w = match w.as_slice() {
                        Some(w) => upload("weight", w),
                        None => upload("weight", &w.iter().copied().collect::<Vec<_>>()),
                    };
                    let b = l.bias.as_ref().map(|b| upload("bias", &b.to_vec()));
                    (w, b)
                })
                .unzip();
            Net {
                be,
                mlp,
                acts: shapes.iter().map(|s| storage_f32(ctx, "ã", mb * s.ld)).collect(),
                zs: shapes.iter().map(|s| storage_f32(ctx, "z", mb * s.fan_out)).collect(),
                gemm: KahanPair::new(be, "gemm", gemm_rows * plan.max_width()),
                targets: storage_f32(ctx, "targets", mb * classes.max(1)),
                host_input: vec![0.0; mb * shapes[0].ld],
                host_targets: vec![0.0; mb * classes.max(1)],
                weights,
                biases,
                classes,
                shapes,
            }
        })
    }

    /// Writes the inputs (with the trailing 1) and targets of samples s0..s0+m.
    fn upload(&mut self, data: &dyn DataSource, s0: usize, m: usize) -> Result<()> {
        let first = &self.shapes[0];
        let ld0 = first.ld;
        let inputs = data.inputs(s0, m)?;
        for s in 0..m {
            let row = &mut self.host_input[s * ld0..(s + 1) * ld0];
            for (dst, &x) in row.iter_mut().zip(inputs.row(s).iter()) {
                *dst = x;
            }
            if first.has_bias {
                row[first.fan_in] = 1.0;
            }
        }
        let tlen = match &data.targets(s0, m)? {
            TargetRows::Classes(labels) => {
                for s in 0..m {
                    self.host_targets[s] = f32::from_bits(labels[s]);
                }
                m
            }
            TargetRows::Values(values) => {
                for s in 0..m {
                    for (j, &v) in values.row(s).iter().enumerate() {
                        self.host_targets[s * self.classes + j] = v;
                    }
                }
                m * self.classes
            }
        };
        let q = &self.be.ctx.queue;
        q.write_buffer(&self.acts[0], 0, bytemuck::cast_slice(&self.host_input[..m * ld0]));
        q.write_buffer(&self.targets, 0, bytemuck::cast_slice(&self.host_targets[..tlen]));
        Ok(())
    }

    /// Clears the GEMM pair for `elems` outputs.
    fn clear_gemm(&self, rec: &mut Recorder<'_>, elems: usize) {
        rec.clear(&self.gemm.sum, 4 * elems as u64);
        rec.clear(&self.gemm.comp, 4 * elems as u64);
    }

    /// Records `out = (S − C) [+ bias]` for an m × cols GEMM result.
    fn encode_collect(&self, rec: &mut Recorder<'_>, m: usize, cols: usize, bias: Option<&wgpu::Buffer>, out: &wgpu::Buffer) -> Result<()> {
        let p = MlpParams { rows: m as u32, cols: cols as u32, flags: if bias.is_some() { FLAG_BIAS } else { 0 }, ..Default::default() };
        rec.mlp(Entry::BiasAct, p, [Some(&self.gemm.sum), Some(&self.gemm.comp), bias], out, (m * cols) as u64)
    }

    /// Records the forward pass of m samples: z_l and ã_{l+1} for every layer.
    fn encode_forward(&self, rec: &mut Recorder<'_>, m: usize) -> Result<()> {
        let depth = self.shapes.len();
        for (l, s) in self.shapes.iter().enumerate() {
            self.clear_gemm(rec, m * s.fan_out);
            let params = gemm(s.fan_in, m, s.fan_out, (1, s.ld), (1, s.fan_in), false);
            self.gemm.add_product(rec, params, &self.acts[l], &self.weights[l])?;
            self.encode_collect(rec, m, s.fan_out, self.biases[l].as_ref(), &self.zs[l])?;
            if l + 1 < depth {
                let next = &self.shapes[l + 1];
                let p_act = MlpParams {
                    rows: m as u32,
                    cols: s.fan_out as u32,
                    ld_out: next.ld as u32,
                    act: self.mlp.activations[l].code(),
                    flags: if next.has_bias { FLAG_ONE } else { 0 },
                    ..Default::default()
                };
                rec.mlp(Entry::ActNext, p_act, [Some(&self.zs[l]), None, None], &self.acts[l + 1], (m * s.fan_out) as u64)?;
            }
        }
        Ok(())
    }

    /// Records δ_{l−1} = (δ_l W_l) ∘ φ'(z_{l−1}) for `rows` = m·R output rows.
    fn encode_backprop(&self, rec: &mut Recorder<'_>, l: usize, m: usize, r: usize, delta: &wgpu::Buffer, out: &wgpu::Buffer) -> Result<()> {
        let s = &self.shapes[l];
        let rows = m * r;
        self.clear_gemm(rec, rows * s.fan_in);
        let params = gemm(s.fan_out, rows, s.fan_in, (1, s.fan_out), (s.fan_in, 1), false);
        self.gemm.add_product(rec, params, delta, &self.weights[l])?;
        let prev = &self.shapes[l - 1];
        let p_back = MlpParams {
            rows: m as u32,
            cols: prev.fan_out as u32,
            r: r as u32,
            act: self.mlp.activations[l - 1].code(),
            ..Default::default()
        };
        let inputs = [Some(&self.gemm.sum), Some(&self.gemm.comp), Some(&self.zs[l - 1])];
        rec.mlp(Entry::BackpropAct, p_back, inputs, out, (rows * prev.fan_out) as u64)
    }
}

/// Gradient rows δ ⊗ ã of a micro-batch on the device: m·R rows of `width` (= P) f32.
struct GradRows {
    buffer: wgpu::Buffer,
    width: usize,
}

/// Diag and KFAC beyond the budget: groups of whole layers whose accumulators fit at once,
/// one pass over the samples each; the means of the layers of the passes done wait on the
/// host (diag: [D_l]; KFAC: [A_l, G_l]).
struct LayerPasses {
    groups: Vec<std::ops::Range<usize>>,
    pass: usize,
    done: Vec<Vec<Vec<f32>>>,
    samples: usize,
}

impl LayerPasses {
    fn current(&self) -> std::ops::Range<usize> {
        self.groups[self.pass].clone()
    }
}

/// Diag or KFAC accumulators of the layers `layers` (the others `None`).
fn diag_pairs(be: &GpuBackend, shapes: &[LayerShape], layers: std::ops::Range<usize>) -> Vec<Option<KahanPair>> {
    shapes.iter().enumerate().map(|(l, s)| layers.contains(&l).then(|| KahanPair::new(be, "diag", s.fan_out * s.ld))).collect()
}

fn kfac_pairs(be: &GpuBackend, shapes: &[LayerShape], layers: std::ops::Range<usize>) -> Vec<Option<(KahanPair, KahanPair)>> {
    shapes
        .iter()
        .enumerate()
        .map(|(l, s)| layers.contains(&l).then(|| (KahanPair::new(be, "kfac A", s.ld * s.ld), KahanPair::new(be, "kfac G", s.fan_out * s.fan_out))))
        .collect()
}

/// Device bytes of the diag or KFAC accumulators (Kahan pairs) of each layer.
fn layer_accumulator_bytes(shapes: &[LayerShape], form: NetForm) -> Vec<u64> {
    shapes
        .iter()
        .map(|s| match form {
            NetForm::Diagonal => 8u64.saturating_mul(s.fan_out as u64).saturating_mul(s.ld as u64),
            _ => 8u64.saturating_mul((s.ld as u64).saturating_pow(2).saturating_add((s.fan_out as u64).saturating_pow(2))),
        })
        .collect()
}

/// The reduction of one network form: its accumulators and the micro-batch scratch it
/// needs, which exist by construction (no optional buffers to unwrap).
enum Reduction<'a> {
    /// Full / Layer: gradient rows δ ⊗ ã (m·R × P) reduced by the SYRK planner.
    Syrk { acc: Box<GpuAccumulator<'a>>, rows: GradRows },
    /// Grads: the same rows, read back every micro-batch.
    Grads { rows: GradRows, out: Vec<f32> },
    /// Diagonal: D_l per layer of the pass under way (`None` for the others), with Σ_R δ²
    /// (m × max out) and ã² (m × max ld) scratch.
    Diag { acc: Vec<Option<KahanPair>>, dsq: wgpu::Buffer, asq: wgpu::Buffer, passes: LayerPasses },
    /// KFAC: (A_l, G_l) per layer of the pass under way.
    Kfac { acc: Vec<Option<(KahanPair, KahanPair)>>, passes: LayerPasses },
    /// Norms: ‖δ_r‖² (m·R) and ‖ã‖² (m) per layer, combined on the host in f64.
    Norms { rows: Vec<(wgpu::Buffer, wgpu::Buffer)>, out: Vec<f64> },
}

impl<'a> Reduction<'a> {
    /// Accumulators and scratch of `form` for micro-batches of `batch`.
    /// `syrk_budget`: the bytes of the backend's budget left for the accumulators (the panel
    /// pairs of a full or layer result, the layers' pairs of diag and KFAC) beside the
    /// weights and the micro-batch.
    fn new(be: &'a GpuBackend, plan: &NetPlan, form: NetForm, n: usize, batch: Batching, syrk_budget: u64) -> Result<Self> {
        let ctx = &be.ctx;
        let (shapes, p, mb, mr) = (&plan.shapes, plan.params, batch.samples, batch.rows());
        let max_out = shapes.iter().map(|s| s.fan_out).max().unwrap_or(1);
        let max_ld = shapes.iter().map(|s| s.ld).max().unwrap_or(1);
        let grad_rows = || {
            ctx.scoped("allocating gradient rows", || GradRows { buffer: storage_f32(ctx, "gradient rows", mr * p), width: p })
        };
        Ok(match form {
            NetForm::Full => {
                Reduction::Syrk { acc: Box::new(GpuAccumulator::syrk(be, vec![(0, p)], true, p, syrk_budget)?), rows: grad_rows()? }
            }
            NetForm::Layer => Reduction::Syrk {
                acc: Box::new(GpuAccumulator::syrk(be, shapes.iter().map(|s| (s.offset, s.params)).collect(), false, p, syrk_budget)?),
                rows: grad_rows()?,
            },
            NetForm::Grads => {
                let len = plan.grads_len(n)?;
                Reduction::Grads { rows: grad_rows()?, out: Vec::with_capacity(len) }
            }
            NetForm::Diagonal | NetForm::Kfac => {
                let sizes = layer_accumulator_bytes(shapes, form);
                let largest = sizes.iter().copied().max().unwrap_or(0);
                if largest > syrk_budget {
                    return Err(FisherError::DoesNotFit {
                        what: format!("the {form:?} accumulators of one layer"),
                        needed: largest,
                        limit: syrk_budget,
                        which: format!("what the GPU budget of {} bytes (FISHER_GPU_MEMORY_MB) leaves beside the weights and one micro-batch", be.budget),
                    });
                }
                let groups = crate::backend::plan_passes(&sizes, syrk_budget);
                if groups.len() > 1 {
                    log::info!("{form:?}: {} passes over the samples, a group of layers each (GPU budget {} bytes, FISHER_GPU_MEMORY_MB)", groups.len(), be.budget);
                }
                let passes = LayerPasses { pass: 0, done: vec![Vec::new(); shapes.len()], samples: n, groups };
                let first = passes.current();
                if form == NetForm::Diagonal {
                    ctx.scoped("allocating accumulators", || Reduction::Diag {
                        acc: diag_pairs(be, shapes, first),
                        dsq: storage_f32(ctx, "Σδ²", mb * max_out),
                        asq: storage_f32(ctx, "ã²", mb * max_ld),
                        passes,
                    })?
                } else {
                    ctx.scoped("allocating accumulators", || Reduction::Kfac { acc: kfac_pairs(be, shapes, first), passes })?
                }
            }
            NetForm::Norms => ctx.scoped("allocating norms", || Reduction::Norms {
                rows: shapes.iter().map(|_| (storage_f32(ctx, "‖δ‖²", mr), storage_f32(ctx, "‖ã‖²", mb))).collect(),
                out: vec![0.0; n],
            })?,
        })
    }

    /// Records the reduction of layer `l` (shape `s`) from its pair (δ: m·d × fan_out,
    /// ã: m × ld) for a micro-batch of m samples with the rows q0 .. q0 + d of each.
    fn encode_layer(&mut self, rec: &mut Recorder<'_>, (l, s): (usize, &LayerShape), (m, r, q0): (usize, usize, usize), (delta, act): (&wgpu::Buffer, &wgpu::Buffer)) -> Result<()> {
        let rows = m * r;
        match self {
            Reduction::Diag { acc, dsq, asq, .. } => {
                let Some(pair) = &acc[l] else { return Ok(()) };
                let p_sq = MlpParams { rows: m as u32, cols: s.fan_out as u32, r: r as u32, ..Default::default() };
                rec.mlp(Entry::SampleSq, p_sq, [Some(delta), None, None], dsq, (m * s.fan_out) as u64)?;
                let p_a2 = MlpParams { rows: m as u32, cols: s.ld as u32, ..Default::default() };
                rec.mlp(Entry::Square, p_a2, [Some(act), None, None], asq, (m * s.ld) as u64)?;
                pair.add_product(rec, gemm(m, s.fan_out, s.ld, (s.fan_out, 1), (s.ld, 1), false), dsq, asq)
            }
            Reduction::Kfac { acc, .. } => {
                let Some((a, g)) = &acc[l] else { return Ok(()) };
                // A is a sum over samples, not rows: once per sample, with its first chunk.
                if q0 == 0 {
                    a.add_product(rec, gemm(m, s.ld, s.ld, (s.ld, 1), (s.ld, 1), true), act, act)?;
                }
                g.add_product(rec, gemm(rows, s.fan_out, s.fan_out, (s.fan_out, 1), (s.fan_out, 1), true), delta, delta)
            }
            Reduction::Syrk { rows: grads, .. } | Reduction::Grads { rows: grads, .. } => {
                let p_outer = MlpParams {
                    rows: rows as u32,
                    cols: s.params as u32,
                    ld_a: s.fan_out as u32,
                    ld_b: s.ld as u32,
                    fan_in: s.fan_in as u32,
                    r: r as u32,
                    ld_out: grads.width as u32,
                    out_off: s.offset as u32,
                    ..Default::default()
                };
                rec.mlp(Entry::OuterGrads, p_outer, [Some(delta), Some(act), None], &grads.buffer, (rows * s.params) as u64)
            }
            Reduction::Norms { rows: bufs, .. } => {
                let (dn, an) = &bufs[l];
                rec.norms(RowParams { rows: rows as u32, cols: s.fan_out as u32, ld: s.fan_out as u32, offset: 0 }, delta, dn)?;
                rec.norms(RowParams { rows: m as u32, cols: s.ld as u32, ld: s.ld as u32, offset: 0 }, act, an)
            }
        }
    }

    /// Records what follows the last layer of a chunk (the SYRK of its m·d rows); the m
    /// samples are counted with their first chunk.
    fn encode_end(&mut self, rec: &mut Recorder<'_>, m: usize, r: usize, first: bool) -> Result<()> {
        if let Reduction::Syrk { acc, rows } = self {
            acc.encode_device(rec, &rows.buffer, m * r, if first { m } else { 0 })?;
        }
        Ok(())
    }

    /// Passes over the samples the reduction needs: more than one only for a SYRK whose
    /// panel pairs do not fit the memory budget at once.
    fn passes(&self) -> usize {
        match self {
            Reduction::Syrk { acc, .. } => acc.passes(),
            Reduction::Diag { passes, .. } | Reduction::Kfac { passes, .. } => passes.groups.len(),
            _ => 1,
        }
    }

    /// The lowest layer the pass under way reads: its backward pass stops there.
    fn lowest_layer(&self) -> usize {
        match self {
            Reduction::Diag { passes, .. } | Reduction::Kfac { passes, .. } => passes.current().start,
            _ => 0,
        }
    }

    /// Ends a pass of a multi-pass reduction (see [`GpuAccumulator`]'s `next_pass`): for diag
    /// and KFAC, the means of the pass's layers are read back and its pairs freed before the
    /// next group's are allocated.
    fn next_pass(&mut self, be: &GpuBackend, plan: &NetPlan) -> Result<()> {
        let more = |p: &LayerPasses| {
            if p.pass + 1 >= p.groups.len() {
                return Err(FisherError::InvalidInput("next_pass after the last pass of this network reduction".into()));
            }
            Ok(())
        };
        match self {
            Reduction::Syrk { acc, .. } => acc.next_pass(),
            Reduction::Diag { acc, passes, .. } => {
                more(passes)?;
                for l in passes.current() {
                    let pair = acc[l].take().expect("a pair of the pass");
                    passes.done[l] = vec![pair.mean(be, passes.samples)?];
                }
                passes.pass += 1;
                *acc = be.ctx.scoped("allocating accumulators", || diag_pairs(be, &plan.shapes, passes.current()))?;
                Ok(())
            }
            Reduction::Kfac { acc, passes } => {
                more(passes)?;
                for l in passes.current() {
                    let (a, g) = acc[l].take().expect("a pair of the pass");
                    passes.done[l] = vec![a.mean(be, passes.samples)?, g.mean(be, passes.samples)?];
                }
                passes.pass += 1;
                *acc = be.ctx.scoped("allocating accumulators", || kfac_pairs(be, &plan.shapes, passes.current()))?;
                Ok(())
            }
            _ => Err(FisherError::InvalidInput("this network reduction has a single pass over the samples".into())),
        }
    }

    /// Host side of a submitted micro-batch of samples s0..s0+m (read-backs).
    fn collect(&mut self, be: &GpuBackend, s0: usize, m: usize, r: usize) -> Result<()> {
        match self {
            Reduction::Grads { rows, out } => out.extend(read_f32(&be.ctx, &rows.buffer, m * r * rows.width)?),
            Reduction::Norms { rows, out } => {
                for (dn, an) in rows.iter() {
                    let dn = read_f32(&be.ctx, dn, m * r)?;
                    let an = read_f32(&be.ctx, an, m)?;
                    for s in 0..m {
                        let d: f64 = dn[s * r..(s + 1) * r].iter().map(|&v| v as f64).sum();
                        out[s0 + s] += d * an[s] as f64;
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Divides by `n` and assembles the result in θ order.
    fn finish(self, be: &GpuBackend, plan: &NetPlan, n: usize) -> Result<NetFisher> {
        let p = plan.params;
        Ok(match self {
            Reduction::Syrk { acc, .. } => match acc.finish()? {
                FisherMatrix::Full(f) => NetFisher::Full(f),
                FisherMatrix::BlockDiagonal(blocks) => NetFisher::Layer(blocks),
                other => {
                    return Err(FisherError::Gpu {
                        stage: "network finish".into(),
                        message: format!("SYRK accumulator returned {other:?} instead of a full or block result"),
                    })
                }
            },
            Reduction::Diag { acc, mut passes, .. } => {
                let mut diag = vec![0f32; p];
                for (l, s) in plan.shapes.iter().enumerate() {
                    let d = match &acc[l] {
                        Some(pair) => pair.mean(be, n)?,
                        None => passes.done[l].pop().ok_or_else(|| FisherError::InvalidInput("finish before the last pass".into()))?,
                    };
                    s.scatter(&mut diag, |o, i| d[o * s.ld + i]);
                }
                NetFisher::Diagonal(Array1::from(diag))
            }
            Reduction::Kfac { acc, mut passes } => {
                let mut factors = Vec::with_capacity(acc.len());
                for (l, s) in plan.shapes.iter().enumerate() {
                    let (a, g) = match &acc[l] {
                        Some((a, g)) => (a.mean(be, n)?, g.mean(be, n)?),
                        None => {
                            let mut done = std::mem::take(&mut passes.done[l]).into_iter();
                            match (done.next(), done.next()) {
                                (Some(a), Some(g)) => (a, g),
                                _ => return Err(FisherError::InvalidInput("finish before the last pass".into())),
                            }
                        }
                    };
                    factors.push(KfacFactors { a: mirror_upper(&a, s.ld), g: mirror_upper(&g, s.fan_out) });
                }
                NetFisher::Kfac(factors)
            }
            Reduction::Grads { out, .. } => {
                let total_rows = out.len() / p.max(1);
                NetFisher::Grads(Array2::from_shape_vec((total_rows, p), out).map_err(|e| FisherError::InvalidInput(e.to_string()))?)
            }
            Reduction::Norms { out, .. } => NetFisher::Norms(out.into_iter().map(|v| v as f32).collect()),
        })
    }
}

/// The network Fisher of `form`, streamed in micro-batches of samples and chunks of draws.
pub(crate) fn network_fisher(be: &GpuBackend, mlp: &Mlp, data: &dyn DataSource, variant: Variant, form: NetForm) -> Result<NetFisher> {
    network_fisher_over(be, mlp, data, variant, form, 0..data.len())
}

/// The network Fisher of `form` over the samples `range` of `data` (divided by their count):
/// a shard of a run; Monte Carlo draws are keyed by the sample's index in the whole data.
pub(crate) fn network_fisher_over(
    be: &GpuBackend,
    mlp: &Mlp,
    data: &dyn DataSource,
    variant: Variant,
    form: NetForm,
    range: std::ops::Range<usize>,
) -> Result<NetFisher> {
    if range.end > data.len() || range.is_empty() {
        return Err(FisherError::InvalidInput(format!(
            "samples {}..{} are not a non-empty part of the {} samples of the data",
            range.start,
            range.end,
            data.len()
        )));
    }
    let (first, n) = (range.start, range.len());
    let plan = NetPlan::new(mlp, variant)?;
    plan.check_result(form, n, be.result_limit())?;
    let (shapes, p, r, classes, depth) = (&plan.shapes, plan.params, plan.r, plan.classes, plan.depth());
    let max_w = plan.max_width() as u64;
    let max_out = shapes.iter().map(|s| s.fan_out).max().unwrap_or(1) as u64;
    let max_ld = shapes.iter().map(|s| s.ld).max().unwrap_or(1) as u64;
    let materialize = matches!(form, NetForm::Full | NetForm::Layer | NetForm::Grads);

    // ---- plan --------------------------------------------------------------------------
    // Sizes are saturating: the result check above bounds P², Σ(in+1)² and N·R·P, and a
    // saturated figure only makes the planner refuse or shrink the batch.
    let sum = |f: &dyn Fn(&LayerShape) -> u64| shapes.iter().fold(0u64, |acc, s| acc.saturating_add(f(s)));
    let weights_bytes = sum(&|s| (s.params as u64).saturating_mul(4));
    let accum_bytes = match form {
        // Diag and KFAC: all layers' pairs when they fit, else groups of layers in passes;
        // the micro-batch is planned leaving them up to half the budget, and at least the
        // largest layer's pairs.
        NetForm::Diagonal | NetForm::Kfac => {
            let sizes = layer_accumulator_bytes(shapes, form);
            let largest = sizes.iter().copied().max().unwrap_or(0);
            sizes.iter().fold(0u64, |a, &b| a.saturating_add(b)).min((be.budget / 2).max(largest))
        }
        // The panel pairs are planned after the micro-batch, within what it leaves (see
        // below); the micro-batch is planned leaving them all they need, up to half the
        // budget, so that a small budget buys passes rather than a refusal.
        NetForm::Full | NetForm::Layer => {
            let pairs = match form {
                NetForm::Full => 8u64.saturating_mul((p as u64).saturating_pow(2)),
                _ => sum(&|s| 8u64.saturating_mul((s.params as u64).saturating_pow(2))),
            };
            pairs.saturating_add(8u64.saturating_mul(p as u64)).min(be.budget / 2)
        }
        _ => 0,
    };
    let depth64 = depth as u64;
    // Per sample: ã_l and z_l of every layer, targets, Σ_R δ² and ã² (diag), ‖ã‖² (norms).
    let per_sample = sum(&|s| (s.ld + s.fan_out) as u64)
        .saturating_add(classes as u64)
        .saturating_add(if form == NetForm::Diagonal { max_out + max_ld } else { 0 })
        .saturating_add(if form == NetForm::Norms { depth64 } else { 0 });
    // Per output row: the GEMM Kahan pair, δ and δ next, the gradient row, ‖δ‖² (norms).
    let per_row = (4 * max_w)
        .saturating_add(if materialize { p as u64 } else { 0 })
        .saturating_add(if form == NetForm::Norms { depth64 } else { 0 });
    let cost = BatchCost {
        per_sample: per_sample.saturating_mul(4),
        per_row: per_row.saturating_mul(4),
        sample_binding: max_ld.max(max_out).max(classes as u64).saturating_mul(4),
        row_binding: max_w.max(if materialize { p as u64 } else { 0 }).saturating_mul(4),
        fixed: weights_bytes.saturating_add(accum_bytes),
    };
    let batch = be.micro_batch_limits().batching(n, r, &cost, || {
        format!("one output row of the {form:?} reduction ({p} parameters, R = {r})")
    })?;
    let rows = batch.rows();

    // ---- allocate ----------------------------------------------------------------------
    let mut net = Net::new(be, mlp, &plan, batch.samples, rows)?;
    let mut delta_cur = storage_f32(&be.ctx, "δ", rows * max_w as usize);
    let mut delta_next = storage_f32(&be.ctx, "δ next", rows * max_w as usize);
    // The panel pairs of a full or layer result get what the weights and the micro-batch
    // leave of the budget, so that the three together stay within it.
    let scratch = cost.per_sample.saturating_mul(batch.samples as u64).saturating_add(cost.per_row.saturating_mul(rows as u64));
    let syrk_budget = be.budget.saturating_sub(weights_bytes.saturating_add(scratch));
    let mut reduction = Reduction::new(be, &plan, form, n, batch, syrk_budget)?;
    let mut bindings = Bindings::default();
    let scale = (1.0 / (variant_params(variant).2 as f64).sqrt()) as f32;
    let mut in_flight: Option<wgpu::SubmissionIndex> = None;

    // ---- encode per layer, per chunk of draws, per micro-batch ---------------------------
    // A Full or Layer result whose panel pairs do not fit the budget at once is summed in
    // passes, each one group of pairs; every pass recomputes the same gradient rows (Monte
    // Carlo draws are keyed by sample and draw), so each pair sees the rows of a single pass.
    for pass in 0..reduction.passes() {
        if pass > 0 {
            // The cached bind groups hold the finished pass's accumulators: drop them before
            // next_pass frees those and allocates the next group, or both would be resident.
            bindings = Bindings::default();
            in_flight = None;
            be.ctx.wait("network pass")?;
            reduction.next_pass(be, &plan)?;
        }
        // The backward pass stops at the lowest layer this pass reads.
        let lowest = reduction.lowest_layer();
        for (s0, m) in batch.sample_ranges(n) {
            let s0 = first + s0;
            net.upload(data, s0, m)?;
            let mut forward = be.kernels.recorder();
            net.encode_forward(&mut forward, m)?;
            let mut pending = Some(forward);
            for (q0, d) in batch.draw_ranges(r) {
                let mut rec = pending.take().unwrap_or_else(|| be.kernels.recorder());
                let p_head = head_params(data, variant, classes, (s0, m), (q0, d), scale)?;
                rec.mlp(Entry::Head, p_head, [Some(&net.zs[depth - 1]), Some(&net.targets), None], &delta_cur, (m * d) as u64)?;
                for l in (lowest..depth).rev() {
                    reduction.encode_layer(&mut rec, (l, &shapes[l]), (m, d, q0), (&delta_cur, &net.acts[l]))?;
                    if l > lowest {
                        net.encode_backprop(&mut rec, l, m, d, &delta_cur, &delta_next)?;
                        std::mem::swap(&mut delta_cur, &mut delta_next);
                    }
                }
                reduction.encode_end(&mut rec, m, d, q0 == 0)?;
                let index = bindings.submit(&be.ctx, "network micro-batch", rec)?;
                if let Some(previous) = in_flight.replace(index) {
                    be.wait_for("network micro-batch", previous)?;
                }
                reduction.collect(be, s0 - first, m, d)?;
            }
        }
    }
    be.ctx.wait("network finish")?;

    // ---- finish ------------------------------------------------------------------------
    reduction.finish(be, &plan, n)
}

/// Implicit Fisher–vector product F·v = (1/N) Σᵢ Jᵢᵀ Λᵢ Jᵢ v and the quadratic form vᵀFv,
/// without forming F: a forward-mode pass carries the tangent ż = J v beside z, the output
/// stage forms w = Λ ż (Λ = E_y[e eᵀ] of the variant), and one backward pass of w gives
/// Jᵀ w, accumulated as (1/N) Σ δ_l ã_lᵀ per layer. vᵀFv = (1/N) Σᵢ żᵢᵀ wᵢ needs only the
/// forward part (`product = false`). Memory: the model, two direction-sized accumulators and
/// one micro-batch.
pub(crate) fn network_fvp(be: &GpuBackend, mlp: &Mlp, data: &dyn DataSource, variant: Variant, v: ArrayView1<'_, f32>, product: bool) -> Result<Fvp> {
    let ctx = &be.ctx;
    let n = data.len();
    let plan = NetPlan::new(mlp, variant)?;
    let v = v.to_vec();
    plan.check_direction(&v)?;
    let (shapes, p, classes, depth) = (&plan.shapes, plan.params, plan.classes, plan.depth());
    let max_w = plan.max_width();
    let weights_bytes: u64 = shapes.iter().fold(0u64, |acc, s| acc.saturating_add((s.params as u64).saturating_mul(4)));
    // Direction in augmented layout, and the (sum, comp) pair of the product.
    let fixed = weights_bytes.saturating_mul(if product { 3 } else { 2 });
    let per_sample_floats = shapes.iter().map(|s| s.ld + 2 * s.fan_out + s.fan_in).sum::<usize>() + 5 * max_w + 3 * classes;
    let widest_binding = 4 * max_w.max(classes).max(shapes.iter().map(|s| s.ld).max().unwrap_or(1)) as u64;
    let mb = be.micro_batch_limits().micro_batch(n, 4 * per_sample_floats as u64, widest_binding, fixed, || {
        format!("one sample of the implicit F·v ({p} parameters)")
    })?;

    let mut net = Net::new(be, mlp, &plan, mb, mb)?;
    let directions: Vec<wgpu::Buffer> = ctx.scoped("uploading direction", || {
        shapes
            .iter()
            .map(|s| {
                let d = s.augment(&v);
                let b = storage_f32(ctx, "direction", d.len());
                ctx.queue.write_buffer(&b, 0, bytemuck::cast_slice(&d));
                b
            })
            .collect()
    })?;
    // ȧ_l (m × fan_in) for l ≥ 1; the inputs do not depend on θ, so ȧ_0 = 0.
    let tangents: Vec<wgpu::Buffer> = shapes.iter().map(|s| storage_f32(ctx, "ȧ", mb * s.fan_in)).collect();
    let zdot = storage_f32(ctx, "ż", mb * max_w);
    let w_out = storage_f32(ctx, "Λ ż", mb * classes.max(1));
    let mut delta_cur = storage_f32(ctx, "δ", mb * max_w);
    let mut delta_next = storage_f32(ctx, "δ next", mb * max_w);
    let accum: Vec<KahanPair> =
        if product { shapes.iter().map(|s| KahanPair::new(be, "F·v", s.fan_out * s.ld)).collect() } else { Vec::new() };
    let draws = variant_params(variant).2;
    // Draws per head_fvp dispatch (see HEAD_FVP_BYTES_PER_DRAW); all in one for m·K small.
    let evaluations = usize::try_from(be.micro_batch_limits().target / HEAD_FVP_BYTES_PER_DRAW).unwrap_or(usize::MAX);
    let draws_per_dispatch = (evaluations / mb.max(1)).clamp(1, draws.max(1));
    let mut bindings = Bindings::default();
    let mut quadratic = 0f64;

    for s0 in (0..n).step_by(mb) {
        let m = mb.min(n - s0);
        net.upload(data, s0, m)?;
        let mut rec = be.kernels.recorder();
        net.encode_forward(&mut rec, m)?;
        // Tangents: ż_l = ã_l [V_l | v_b]ᵀ + ȧ_l W_lᵀ, ȧ_{l+1} = φ'(z_l) ∘ ż_l.
        for (l, s) in shapes.iter().enumerate() {
            net.clear_gemm(&mut rec, m * s.fan_out);
            net.gemm.add_product(&mut rec, gemm(s.ld, m, s.fan_out, (1, s.ld), (1, s.ld), false), &net.acts[l], &directions[l])?;
            if l > 0 {
                let pw = gemm(s.fan_in, m, s.fan_out, (1, s.fan_in), (1, s.fan_in), false);
                net.gemm.add_product(&mut rec, pw, &tangents[l], &net.weights[l])?;
            }
            net.encode_collect(&mut rec, m, s.fan_out, None, &zdot)?;
            if l + 1 < depth {
                let pt = MlpParams { rows: m as u32, cols: s.fan_out as u32, act: mlp.activations[l].code(), ..Default::default() };
                rec.mlp(Entry::TangentAct, pt, [Some(&zdot), Some(&net.zs[l]), None], &tangents[l + 1], (m * s.fan_out) as u64)?;
            }
        }
        // w = Λ ż, the K draws in dispatches of bounded length (each adds its draws to w), a
        // submission every HEAD_FVP_PER_SUBMIT of them so that no command buffer grows with K.
        let scale = (1.0 / draws as f64) as f32;
        let chunks = Batching { samples: mb, draws: draws_per_dispatch };
        let mut in_flight: Option<wgpu::SubmissionIndex> = None;
        for (i, (q0, d)) in chunks.draw_ranges(draws).enumerate() {
            if i > 0 && i % HEAD_FVP_PER_SUBMIT == 0 {
                let full = std::mem::replace(&mut rec, be.kernels.recorder());
                let index = bindings.submit(ctx, "F·v draws", full)?;
                if let Some(previous) = in_flight.replace(index) {
                    be.wait_for("F·v draws", previous)?;
                }
            }
            let p_head = head_params(data, variant, classes, (s0, m), (q0, d), scale)?;
            let inputs = [Some(&net.zs[depth - 1]), Some(&net.targets), Some(&zdot)];
            rec.mlp(Entry::HeadFvp, p_head, inputs, &w_out, m as u64)?;
        }
        if product {
            // Backward of w (one row per sample), accumulating (1/N) Σ δ_l ã_lᵀ.
            for l in (0..depth).rev() {
                let s = &shapes[l];
                let delta = if l + 1 == depth { &w_out } else { &delta_cur };
                accum[l].add_product(&mut rec, gemm(m, s.fan_out, s.ld, (s.fan_out, 1), (s.ld, 1), false), delta, &net.acts[l])?;
                if l > 0 {
                    net.encode_backprop(&mut rec, l, m, 1, delta, &delta_next)?;
                    std::mem::swap(&mut delta_cur, &mut delta_next);
                }
            }
        }
        bindings.submit(ctx, "F·v micro-batch", rec)?;
        // ż_L and w are read back every micro-batch (m × C each) for vᵀFv = (1/N) Σ żᵀ w.
        let zd = read_f32(ctx, &zdot, m * classes)?;
        let w = read_f32(ctx, &w_out, m * classes)?;
        quadratic += zd.iter().zip(&w).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>();
    }
    ctx.wait("F·v finish")?;
    let quadratic = quadratic / n as f64;
    if !product {
        return Ok(Fvp { product: None, quadratic });
    }
    let mut out = vec![0f32; p];
    for (s, pair) in shapes.iter().zip(&accum) {
        let d = pair.mean(be, n)?;
        s.scatter(&mut out, |o, i| d[o * s.ld + i]);
    }
    Ok(Fvp { product: Some(Array1::from(out)), quadratic })
}
