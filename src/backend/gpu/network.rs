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
//! Every GEMM is the compensated kernel of `syrk.wgsl`, so accumulations over samples carry
//! Kahan compensation exactly like the gradient-matrix reductions.

use ndarray::{Array1, Array2};

use super::kernels::{MlpParams, SyrkParams};
use super::{does_not_fit, read_f32, storage_f32, GpuAccumulator, GpuBackend};
use crate::backend::Accumulator;
use crate::error::{FisherError, Result};
use crate::fisher::FisherMatrix;
use crate::model::{Dataset, Likelihood, Mlp, Targets};
use crate::fisher::{rows_per_sample, KfacFactors, NetFisher, NetForm, Variant};

/// Largest micro-batch: beyond this the dispatch overhead is already amortized.
const MAX_MICRO_BATCH: usize = 1024;
/// Target size of one micro-batch's scratch buffers. Larger batches do not run faster once a
/// dispatch covers thousands of invocations, and on integrated or software adapters device
/// memory is host memory, so this keeps the process footprint small.
const MICRO_BATCH_BYTES: u64 = 64 << 20;

const FLAG_BIAS: u32 = 1;
const FLAG_ONE: u32 = 2;
const FLAG_GAUSSIAN: u32 = 4;

/// Per-layer geometry.
struct LayerShape {
    fan_in: usize,
    fan_out: usize,
    /// Row length of ã (fan_in + 1 with a bias).
    ld: usize,
    has_bias: bool,
    /// Offset of the layer's parameters in θ.
    offset: usize,
    /// Number of parameters (weight then bias).
    params: usize,
}

enum Reduction<'a> {
    Syrk(Box<GpuAccumulator<'a>>),
    Diag(Vec<(wgpu::Buffer, wgpu::Buffer)>),
    Kfac(Vec<[wgpu::Buffer; 4]>),
    Grads(Vec<f32>),
    Norms(Vec<f64>),
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

/// Reads a (sum, comp) pair and forms (S − c)/n in f64.
fn finalize(be: &GpuBackend, pair: (&wgpu::Buffer, &wgpu::Buffer), len: usize, n: usize) -> Result<Vec<f32>> {
    let s = read_f32(&be.ctx, pair.0, len)?;
    let c = read_f32(&be.ctx, pair.1, len)?;
    Ok(s.iter().zip(&c).map(|(&s, &c)| ((s as f64 - c as f64) / n as f64) as f32).collect())
}

/// A symmetric matrix from the upper triangle of a row-major `n × n` vector.
fn mirror_upper(v: &[f32], n: usize) -> Array2<f32> {
    Array2::from_shape_fn((n, n), |(r, c)| if c >= r { v[r * n + c] } else { v[c * n + r] })
}

fn layer_shapes(mlp: &Mlp) -> (Vec<LayerShape>, usize) {
    let mut offset = 0;
    let shapes = mlp
        .layers
        .iter()
        .map(|l| {
            let s = LayerShape {
                fan_in: l.fan_in(),
                fan_out: l.fan_out(),
                ld: l.augmented_in(),
                has_bias: l.bias.is_some(),
                offset,
                params: l.num_params(),
            };
            offset += s.params;
            s
        })
        .collect();
    (shapes, offset)
}

/// Samples per micro-batch: every binding within the adapter limit, the whole within the
/// budget, the scratch near [`MICRO_BATCH_BYTES`].
fn plan_micro_batch(
    be: &GpuBackend,
    n: usize,
    per_sample: u64,
    widest_binding: u64,
    fixed: u64,
    what: impl FnOnce() -> String,
) -> Result<usize> {
    let by_binding = be.binding_limit / widest_binding.max(1);
    let left = be.budget.saturating_sub(fixed);
    let by_budget = left.min(MICRO_BATCH_BYTES) / per_sample.max(1);
    // At least one sample whenever one fits the budget at all, even if it exceeds the target.
    let by_budget = if by_budget == 0 && left >= per_sample { 1 } else { by_budget };
    let mb = (by_binding.min(by_budget) as usize).min(MAX_MICRO_BATCH).min(n);
    if mb == 0 {
        let (needed, limit, which) = if by_binding == 0 {
            (widest_binding, be.binding_limit, format!("max_storage_buffer_binding_size of {}", be.ctx.info.name))
        } else {
            (fixed + per_sample, be.budget, "GPU memory budget (FISHER_GPU_MEMORY_MB)".into())
        };
        return Err(does_not_fit(what(), needed, limit, which));
    }
    Ok(mb)
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
    gemm_sum: wgpu::Buffer,
    gemm_comp: wgpu::Buffer,
    targets: wgpu::Buffer,
    host_input: Vec<f32>,
    host_targets: Vec<f32>,
}

impl<'a> Net<'a> {
    fn new(be: &'a GpuBackend, mlp: &'a Mlp, mb: usize, gemm_rows: usize) -> Result<Self> {
        let ctx = &be.ctx;
        let (shapes, _) = layer_shapes(mlp);
        let classes = shapes.last().map(|s| s.fan_out).unwrap_or(0);
        let max_w = shapes.iter().map(|s| s.fan_in.max(s.fan_out)).max().unwrap_or(1);
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
                    let w = upload("weight", w.as_slice().expect("standard layout"));
                    let b = l.bias.as_ref().map(|b| upload("bias", &b.to_vec()));
                    (w, b)
                })
                .unzip();
            Net {
                be,
                mlp,
                acts: shapes.iter().map(|s| storage_f32(ctx, "ã", mb * s.ld)).collect(),
                zs: shapes.iter().map(|s| storage_f32(ctx, "z", mb * s.fan_out)).collect(),
                gemm_sum: storage_f32(ctx, "gemm sum", gemm_rows * max_w),
                gemm_comp: storage_f32(ctx, "gemm comp", gemm_rows * max_w),
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
    fn upload(&mut self, data: &Dataset, s0: usize, m: usize) {
        let first = &self.shapes[0];
        let ld0 = first.ld;
        for s in 0..m {
            let row = &mut self.host_input[s * ld0..(s + 1) * ld0];
            for (dst, &x) in row.iter_mut().zip(data.inputs.row(s0 + s).iter()) {
                *dst = x;
            }
            if first.has_bias {
                row[first.fan_in] = 1.0;
            }
        }
        let tlen = match &data.targets {
            Targets::Classes(labels) => {
                for s in 0..m {
                    self.host_targets[s] = f32::from_bits(labels[s0 + s]);
                }
                m
            }
            Targets::Values(values) => {
                for s in 0..m {
                    for (j, &v) in values.row(s0 + s).iter().enumerate() {
                        self.host_targets[s * self.classes + j] = v;
                    }
                }
                m * self.classes
            }
        };
        let q = &self.be.ctx.queue;
        q.write_buffer(&self.acts[0], 0, bytemuck::cast_slice(&self.host_input[..m * ld0]));
        q.write_buffer(&self.targets, 0, bytemuck::cast_slice(&self.host_targets[..tlen]));
    }

    /// Clears the GEMM pair for `elems` outputs.
    fn clear_gemm(&self, enc: &mut wgpu::CommandEncoder, elems: usize) {
        enc.clear_buffer(&self.gemm_sum, 0, Some(4 * elems as u64));
        enc.clear_buffer(&self.gemm_comp, 0, Some(4 * elems as u64));
    }

    /// Records `out = (S − C) [+ bias]` for an m × cols GEMM result.
    fn encode_collect(&self, enc: &mut wgpu::CommandEncoder, m: usize, cols: usize, bias: Option<&wgpu::Buffer>, out: &wgpu::Buffer) -> Result<()> {
        let p = MlpParams { rows: m as u32, cols: cols as u32, flags: if bias.is_some() { FLAG_BIAS } else { 0 }, ..Default::default() };
        self.be.mlp.encode(&self.be.ctx, enc, "bias_act", p, [Some(&self.gemm_sum), Some(&self.gemm_comp), bias], out, (m * cols) as u64)
    }

    /// Records the forward pass of m samples: z_l and ã_{l+1} for every layer.
    fn encode_forward(&self, enc: &mut wgpu::CommandEncoder, m: usize) -> Result<()> {
        let (be, ctx) = (self.be, &self.be.ctx);
        let depth = self.shapes.len();
        for (l, s) in self.shapes.iter().enumerate() {
            self.clear_gemm(enc, m * s.fan_out);
            let params = gemm(s.fan_in, m, s.fan_out, (1, s.ld), (1, s.fan_in), false);
            be.syrk.encode(ctx, enc, params, &self.acts[l], &self.weights[l], &self.gemm_sum, &self.gemm_comp)?;
            self.encode_collect(enc, m, s.fan_out, self.biases[l].as_ref(), &self.zs[l])?;
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
                let elems = (m * s.fan_out) as u64;
                be.mlp.encode(ctx, enc, "act_next", p_act, [Some(&self.zs[l]), None, None], &self.acts[l + 1], elems)?;
            }
        }
        Ok(())
    }

    /// Records δ_{l−1} = (δ_l W_l) ∘ φ'(z_{l−1}) for `rows` = m·R output rows.
    fn encode_backprop(&self, enc: &mut wgpu::CommandEncoder, l: usize, m: usize, r: usize, delta: &wgpu::Buffer, out: &wgpu::Buffer) -> Result<()> {
        let (be, ctx) = (self.be, &self.be.ctx);
        let s = &self.shapes[l];
        let rows = m * r;
        self.clear_gemm(enc, rows * s.fan_in);
        let params = gemm(s.fan_out, rows, s.fan_in, (1, s.fan_out), (s.fan_in, 1), false);
        be.syrk.encode(ctx, enc, params, delta, &self.weights[l], &self.gemm_sum, &self.gemm_comp)?;
        let prev = &self.shapes[l - 1];
        let p_back = MlpParams {
            rows: m as u32,
            cols: prev.fan_out as u32,
            r: r as u32,
            act: self.mlp.activations[l - 1].code(),
            ..Default::default()
        };
        be.mlp.encode(
            ctx,
            enc,
            "backprop_act",
            p_back,
            [Some(&self.gemm_sum), Some(&self.gemm_comp), Some(&self.zs[l - 1])],
            out,
            (rows * prev.fan_out) as u64,
        )
    }
}

fn variant_params(variant: Variant) -> (u32, u64, u32) {
    match variant {
        Variant::Empirical => (0, 0, 1),
        Variant::True => (1, 0, 1),
        Variant::MonteCarlo { samples, seed } => (2, seed, samples as u32),
    }
}

pub(crate) fn network_fisher(
    be: &GpuBackend,
    mlp: &Mlp,
    data: &Dataset,
    variant: Variant,
    form: NetForm,
) -> Result<NetFisher> {
    let ctx = &be.ctx;
    let n = data.len();
    let gaussian = data.likelihood() == Likelihood::Gaussian;
    let (shapes, p) = layer_shapes(mlp);
    let classes = shapes.last().map(|s| s.fan_out).unwrap_or(0);
    let r = rows_per_sample(variant, classes);
    let depth = shapes.len();
    let max_w = shapes.iter().map(|s| s.fan_in.max(s.fan_out)).max().unwrap_or(1);
    let max_out = shapes.iter().map(|s| s.fan_out).max().unwrap_or(1);
    let max_ld = shapes.iter().map(|s| s.ld).max().unwrap_or(1);
    let materialize = matches!(form, NetForm::Full | NetForm::Layer | NetForm::Grads);

    // ---- memory plan -------------------------------------------------------------------
    let weights_bytes: u64 = shapes.iter().map(|s| 4 * (s.fan_in * s.fan_out + s.fan_out) as u64).sum();
    let accum_bytes: u64 = match form {
        NetForm::Diagonal => shapes.iter().map(|s| 8 * (s.fan_out * s.ld) as u64).sum(),
        NetForm::Kfac => shapes.iter().map(|s| 8 * (s.ld * s.ld + s.fan_out * s.fan_out) as u64).sum(),
        _ => 0, // the SYRK planner checks its own accumulators against the budget
    };
    let per_sample_floats = shapes.iter().map(|s| s.ld + s.fan_out).sum::<usize>()
        + 4 * r * max_w
        + classes
        + if form == NetForm::Diagonal { max_out + max_ld } else { 0 }
        + if materialize { r * p } else { 0 }
        + if form == NetForm::Norms { depth * (r + 1) } else { 0 };
    let widest_binding = 4 * (r * max_w.max(if materialize { p } else { 0 })).max(max_ld).max(classes) as u64;
    let mb = plan_micro_batch(be, n, 4 * per_sample_floats as u64, widest_binding, weights_bytes + accum_bytes, || {
        format!("one sample of the {form:?} reduction ({p} parameters, R = {r})")
    })?;
    let mr = mb * r;

    // ---- buffers -----------------------------------------------------------------------
    let mut net = Net::new(be, mlp, mb, mr)?;
    let mut delta_cur = storage_f32(ctx, "δ", mr * max_w);
    let mut delta_next = storage_f32(ctx, "δ next", mr * max_w);
    let (dsq, asq) = if form == NetForm::Diagonal {
        (Some(storage_f32(ctx, "Σδ²", mb * max_out)), Some(storage_f32(ctx, "ã²", mb * max_ld)))
    } else {
        (None, None)
    };
    let grads_buf = materialize.then(|| storage_f32(ctx, "gradient rows", mr * p));
    let norm_bufs: Vec<(wgpu::Buffer, wgpu::Buffer)> = if form == NetForm::Norms {
        shapes.iter().map(|_| (storage_f32(ctx, "‖δ‖²", mr), storage_f32(ctx, "‖ã‖²", mb))).collect()
    } else {
        Vec::new()
    };
    let pair = |label: &str, len: usize| (storage_f32(ctx, label, len), storage_f32(ctx, label, len));
    let mut reduction = match form {
        NetForm::Full => Reduction::Syrk(Box::new(GpuAccumulator::syrk(be, vec![(0, p)], true, p)?)),
        NetForm::Layer => Reduction::Syrk(Box::new(GpuAccumulator::syrk(
            be,
            shapes.iter().map(|s| (s.offset, s.params)).collect(),
            false,
            p,
        )?)),
        NetForm::Diagonal => Reduction::Diag(shapes.iter().map(|s| pair("diag", s.fan_out * s.ld)).collect()),
        NetForm::Kfac => Reduction::Kfac(
            shapes
                .iter()
                .map(|s| {
                    let (a0, a1) = pair("kfac A", s.ld * s.ld);
                    let (g0, g1) = pair("kfac G", s.fan_out * s.fan_out);
                    [a0, a1, g0, g1]
                })
                .collect(),
        ),
        NetForm::Grads => {
            let total = n.checked_mul(r).and_then(|x| x.checked_mul(p)).filter(|&x| x <= isize::MAX as usize / 4);
            let Some(total) = total else {
                return Err(FisherError::InvalidInput(format!("{n}·{r} gradient rows of {p} parameters do not fit in memory")));
            };
            Reduction::Grads(Vec::with_capacity(total))
        }
        NetForm::Norms => Reduction::Norms(vec![0.0; n]),
    };

    let (variant_code, seed, draws) = variant_params(variant);
    let scale = 1.0 / (draws as f32).sqrt();
    let mut in_flight: Option<wgpu::SubmissionIndex> = None;

    // ---- micro-batches -----------------------------------------------------------------
    for s0 in (0..n).step_by(mb) {
        let m = mb.min(n - s0);
        let rows = m * r;
        net.upload(data, s0, m);
        let mut enc = be.encoder("network micro-batch");
        let encoded: Result<()> = ctx.scoped("network micro-batch", || -> Result<()> {
            net.encode_forward(&mut enc, m)?;
            // Output rows δ_{L−1}.
            let p_head = MlpParams {
                rows: m as u32,
                cols: classes as u32,
                r: r as u32,
                flags: if gaussian { FLAG_GAUSSIAN } else { 0 },
                variant: variant_code,
                sample_off: s0 as u32,
                seed_lo: seed as u32,
                seed_hi: (seed >> 32) as u32,
                scale,
                ..Default::default()
            };
            be.mlp.encode(ctx, &mut enc, "head", p_head, [Some(&net.zs[depth - 1]), Some(&net.targets), None], &delta_cur, m as u64)?;

            // Backward with the reductions of each layer.
            for l in (0..depth).rev() {
                let s = &shapes[l];
                let act = &net.acts[l];
                match &mut reduction {
                    Reduction::Diag(acc) => {
                        let (dsq, asq) = (dsq.as_ref().expect("diag scratch"), asq.as_ref().expect("diag scratch"));
                        let p_sq = MlpParams { rows: m as u32, cols: s.fan_out as u32, r: r as u32, ..Default::default() };
                        be.mlp.encode(ctx, &mut enc, "sample_sq", p_sq, [Some(&delta_cur), None, None], dsq, (m * s.fan_out) as u64)?;
                        let p_a2 = MlpParams { rows: m as u32, cols: s.ld as u32, ..Default::default() };
                        be.mlp.encode(ctx, &mut enc, "square", p_a2, [Some(act), None, None], asq, (m * s.ld) as u64)?;
                        let params = gemm(m, s.fan_out, s.ld, (s.fan_out, 1), (s.ld, 1), false);
                        be.syrk.encode(ctx, &mut enc, params, dsq, asq, &acc[l].0, &acc[l].1)?;
                    }
                    Reduction::Kfac(acc) => {
                        let [a0, a1, g0, g1] = &acc[l];
                        let pa = gemm(m, s.ld, s.ld, (s.ld, 1), (s.ld, 1), true);
                        be.syrk.encode(ctx, &mut enc, pa, act, act, a0, a1)?;
                        let pg = gemm(rows, s.fan_out, s.fan_out, (s.fan_out, 1), (s.fan_out, 1), true);
                        be.syrk.encode(ctx, &mut enc, pg, &delta_cur, &delta_cur, g0, g1)?;
                    }
                    Reduction::Syrk(_) | Reduction::Grads(_) => {
                        let p_outer = MlpParams {
                            rows: rows as u32,
                            cols: s.params as u32,
                            ld_a: s.fan_out as u32,
                            ld_b: s.ld as u32,
                            fan_in: s.fan_in as u32,
                            r: r as u32,
                            ld_out: p as u32,
                            out_off: s.offset as u32,
                            ..Default::default()
                        };
                        let g = grads_buf.as_ref().expect("gradient rows");
                        be.mlp.encode(ctx, &mut enc, "outer_grads", p_outer, [Some(&delta_cur), Some(act), None], g, (rows * s.params) as u64)?;
                    }
                    Reduction::Norms(_) => {
                        use super::kernels::RowParams;
                        let (dn, an) = &norm_bufs[l];
                        let pd = RowParams { rows: rows as u32, cols: s.fan_out as u32, ld: s.fan_out as u32, offset: 0 };
                        be.norms.encode(ctx, &mut enc, pd, &delta_cur, dn)?;
                        let pa = RowParams { rows: m as u32, cols: s.ld as u32, ld: s.ld as u32, offset: 0 };
                        be.norms.encode(ctx, &mut enc, pa, act, an)?;
                    }
                }
                if l > 0 {
                    net.encode_backprop(&mut enc, l, m, r, &delta_cur, &delta_next)?;
                    std::mem::swap(&mut delta_cur, &mut delta_next);
                }
            }
            if let Reduction::Syrk(acc) = &mut reduction {
                acc.encode_device(&mut enc, grads_buf.as_ref().expect("gradient rows"), rows, m)?;
            }
            Ok(())
        })?;
        encoded?;
        let index = be.submit("network micro-batch", enc)?;
        if let Some(previous) = in_flight.replace(index) {
            be.wait_for("network micro-batch", previous)?;
        }
        match &mut reduction {
            Reduction::Grads(out) => out.extend(read_f32(ctx, grads_buf.as_ref().expect("gradient rows"), rows * p)?),
            Reduction::Norms(out) => {
                for (dn, an) in &norm_bufs {
                    let dn = read_f32(ctx, dn, rows)?;
                    let an = read_f32(ctx, an, m)?;
                    for s in 0..m {
                        let d: f64 = dn[s * r..(s + 1) * r].iter().map(|&v| v as f64).sum();
                        out[s0 + s] += d * an[s] as f64;
                    }
                }
            }
            _ => {}
        }
    }
    ctx.wait("network finish")?;

    // ---- finalize ----------------------------------------------------------------------
    Ok(match reduction {
        Reduction::Syrk(acc) => match acc.finish()? {
            FisherMatrix::Full(f) => NetFisher::Full(f),
            FisherMatrix::BlockDiagonal(blocks) => NetFisher::Layer(blocks),
            _ => unreachable!("SYRK accumulators return full or block results"),
        },
        Reduction::Diag(acc) => {
            let mut diag = vec![0f32; p];
            for (s, pair) in shapes.iter().zip(&acc) {
                let d = finalize(be, (&pair.0, &pair.1), s.fan_out * s.ld, n)?;
                for o in 0..s.fan_out {
                    for i in 0..s.fan_in {
                        diag[s.offset + o * s.fan_in + i] = d[o * s.ld + i];
                    }
                    if s.has_bias {
                        diag[s.offset + s.fan_out * s.fan_in + o] = d[o * s.ld + s.fan_in];
                    }
                }
            }
            NetFisher::Diagonal(Array1::from(diag))
        }
        Reduction::Kfac(acc) => {
            let mut factors = Vec::with_capacity(depth);
            for (s, [a0, a1, g0, g1]) in shapes.iter().zip(&acc) {
                let a = finalize(be, (a0, a1), s.ld * s.ld, n)?;
                let g = finalize(be, (g0, g1), s.fan_out * s.fan_out, n)?;
                factors.push(KfacFactors { a: mirror_upper(&a, s.ld), g: mirror_upper(&g, s.fan_out) });
            }
            NetFisher::Kfac(factors)
        }
        Reduction::Grads(rows) => {
            let total_rows = rows.len() / p.max(1);
            NetFisher::Grads(Array2::from_shape_vec((total_rows, p), rows).map_err(|e| FisherError::InvalidInput(e.to_string()))?)
        }
        Reduction::Norms(norms) => NetFisher::Norms(norms.into_iter().map(|v| v as f32).collect()),
    })
}

/// Rearranges the layer's slice of θ-ordered `v` (weight row-major, then bias) into the
/// augmented [V | v_b] layout (out × ld) that multiplies ã.
fn augmented_direction(v: &[f32], s: &LayerShape) -> Vec<f32> {
    let mut out = vec![0f32; s.fan_out * s.ld];
    for o in 0..s.fan_out {
        out[o * s.ld..o * s.ld + s.fan_in].copy_from_slice(&v[s.offset + o * s.fan_in..s.offset + (o + 1) * s.fan_in]);
        if s.has_bias {
            out[o * s.ld + s.fan_in] = v[s.offset + s.fan_out * s.fan_in + o];
        }
    }
    out
}

/// Implicit Fisher–vector product F·v = (1/N) Σᵢ Jᵢᵀ Λᵢ Jᵢ v and the quadratic form vᵀFv,
/// without forming F: a forward-mode pass carries the tangent ż = J v beside z, the output
/// stage forms w = Λ ż (Λ = E_y[e eᵀ] of the variant), and one backward pass of w gives
/// Jᵀ w, accumulated as (1/N) Σ δ_l ã_lᵀ per layer. vᵀFv = (1/N) Σᵢ żᵢᵀ wᵢ needs only the
/// forward part (`product = false`). Memory: the model, two direction-sized accumulators and
/// one micro-batch.
pub(crate) fn network_fvp(
    be: &GpuBackend,
    mlp: &Mlp,
    data: &Dataset,
    variant: Variant,
    v: &[f32],
    product: bool,
) -> Result<(Option<Vec<f32>>, f64)> {
    let ctx = &be.ctx;
    let n = data.len();
    let gaussian = data.likelihood() == Likelihood::Gaussian;
    let (shapes, p) = layer_shapes(mlp);
    if v.len() != p {
        return Err(FisherError::InvalidInput(format!("direction has {} entries but the model has {p} parameters", v.len())));
    }
    let classes = shapes.last().map(|s| s.fan_out).unwrap_or(0);
    let depth = shapes.len();
    let max_w = shapes.iter().map(|s| s.fan_in.max(s.fan_out)).max().unwrap_or(1);
    let weights_bytes: u64 = shapes.iter().map(|s| 4 * (s.fan_in * s.fan_out + s.fan_out) as u64).sum();
    // Direction in augmented layout, and the (sum, comp) pair of the product.
    let fixed = weights_bytes * if product { 3 } else { 2 };
    let per_sample_floats = shapes.iter().map(|s| s.ld + 2 * s.fan_out + s.fan_in).sum::<usize>() + 5 * max_w + 3 * classes;
    let widest_binding = 4 * max_w.max(classes).max(shapes.iter().map(|s| s.ld).max().unwrap_or(1)) as u64;
    let mb = plan_micro_batch(be, n, 4 * per_sample_floats as u64, widest_binding, fixed, || {
        format!("one sample of the implicit F·v ({p} parameters)")
    })?;

    let mut net = Net::new(be, mlp, mb, mb)?;
    let directions: Vec<wgpu::Buffer> = ctx.scoped("uploading direction", || {
        shapes
            .iter()
            .map(|s| {
                let d = augmented_direction(v, s);
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
    let accum: Vec<(wgpu::Buffer, wgpu::Buffer)> = if product {
        shapes.iter().map(|s| (storage_f32(ctx, "F·v sum", s.fan_out * s.ld), storage_f32(ctx, "F·v comp", s.fan_out * s.ld))).collect()
    } else {
        Vec::new()
    };
    let (variant_code, seed, draws) = variant_params(variant);
    let mut quadratic = 0f64;

    for s0 in (0..n).step_by(mb) {
        let m = mb.min(n - s0);
        net.upload(data, s0, m);
        let mut enc = be.encoder("F·v micro-batch");
        let encoded: Result<()> = ctx.scoped("F·v micro-batch", || -> Result<()> {
            net.encode_forward(&mut enc, m)?;
            // Tangents: ż_l = ã_l [V_l | v_b]ᵀ + ȧ_l W_lᵀ, ȧ_{l+1} = φ'(z_l) ∘ ż_l.
            for (l, s) in shapes.iter().enumerate() {
                net.clear_gemm(&mut enc, m * s.fan_out);
                let pv = gemm(s.ld, m, s.fan_out, (1, s.ld), (1, s.ld), false);
                be.syrk.encode(ctx, &mut enc, pv, &net.acts[l], &directions[l], &net.gemm_sum, &net.gemm_comp)?;
                if l > 0 {
                    let pw = gemm(s.fan_in, m, s.fan_out, (1, s.fan_in), (1, s.fan_in), false);
                    be.syrk.encode(ctx, &mut enc, pw, &tangents[l], &net.weights[l], &net.gemm_sum, &net.gemm_comp)?;
                }
                net.encode_collect(&mut enc, m, s.fan_out, None, &zdot)?;
                if l + 1 < depth {
                    let pt = MlpParams { rows: m as u32, cols: s.fan_out as u32, act: mlp.activations[l].code(), ..Default::default() };
                    let elems = (m * s.fan_out) as u64;
                    be.mlp.encode(ctx, &mut enc, "tangent_act", pt, [Some(&zdot), Some(&net.zs[l]), None], &tangents[l + 1], elems)?;
                }
            }
            let p_head = MlpParams {
                rows: m as u32,
                cols: classes as u32,
                r: draws,
                flags: if gaussian { FLAG_GAUSSIAN } else { 0 },
                variant: variant_code,
                sample_off: s0 as u32,
                seed_lo: seed as u32,
                seed_hi: (seed >> 32) as u32,
                scale: 1.0 / draws as f32,
                ..Default::default()
            };
            let inputs = [Some(&net.zs[depth - 1]), Some(&net.targets), Some(&zdot)];
            be.mlp.encode(ctx, &mut enc, "head_fvp", p_head, inputs, &w_out, m as u64)?;
            if product {
                // Backward of w (one row per sample), accumulating (1/N) Σ δ_l ã_lᵀ.
                for l in (0..depth).rev() {
                    let s = &shapes[l];
                    let delta = if l + 1 == depth { &w_out } else { &delta_cur };
                    let pg = gemm(m, s.fan_out, s.ld, (s.fan_out, 1), (s.ld, 1), false);
                    be.syrk.encode(ctx, &mut enc, pg, delta, &net.acts[l], &accum[l].0, &accum[l].1)?;
                    if l > 0 {
                        net.encode_backprop(&mut enc, l, m, 1, delta, &delta_next)?;
                        std::mem::swap(&mut delta_cur, &mut delta_next);
                    }
                }
            }
            Ok(())
        })?;
        encoded?;
        be.submit("F·v micro-batch", enc)?;
        // ż_L and w are read back every micro-batch (m × C each) for vᵀFv = (1/N) Σ żᵀ w.
        let zd = read_f32(ctx, &zdot, m * classes)?;
        let w = read_f32(ctx, &w_out, m * classes)?;
        quadratic += zd.iter().zip(&w).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>();
    }
    ctx.wait("F·v finish")?;
    let quadratic = quadratic / n as f64;
    if !product {
        return Ok((None, quadratic));
    }
    let mut out = vec![0f32; p];
    for (s, pair) in shapes.iter().zip(&accum) {
        let d = finalize(be, (&pair.0, &pair.1), s.fan_out * s.ld, n)?;
        for o in 0..s.fan_out {
            out[s.offset + o * s.fan_in..s.offset + (o + 1) * s.fan_in].copy_from_slice(&d[o * s.ld..o * s.ld + s.fan_in]);
            if s.has_bias {
                out[s.offset + s.fan_out * s.fan_in + o] = d[o * s.ld + s.fan_in];
            }
        }
    }
    Ok((Some(out), quadratic))
}
