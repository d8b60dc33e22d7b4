//! The GPU path: one [`GpuContext`], kernels that own their pipelines, and a planner that
//! streams samples in chunks and tiles outputs so that no binding ever exceeds the adapter's
//! `max_storage_buffer_binding_size` and the total stays within a memory budget.
//!
//! ## Plan of a reduction
//!
//! * **Sample chunks.** Gradients are uploaded `rows` samples at a time into one reused
//!   buffer of `rows × P` f32, with `rows ≤ binding_limit / 4P`. After each submission the host
//!   waits for the previous one, so at most two chunks are in flight (bounded staging memory).
//! * **Output panels.** A symmetric result over a column range is split into panels of at most
//!   `panel` columns (`panel² · 4 ≤ binding_limit`, a multiple of the 64-wide SYRK tile); each
//!   panel pair I ≤ J owns a running-sum and a compensation buffer (8 B per value). Diagonal
//!   pairs dispatch only the tiles on or above the diagonal; the host mirrors on read-back.
//! * **Passes.** When the pairs plus one sample's chunk do not fit the memory budget, the
//!   output is summed in several passes over the samples ([`Accumulator::passes`]): the pairs
//!   are re-planned with a smaller panel edge (the largest multiple of 64 whose pair fits what
//!   a modest chunk leaves of the budget, at most `panel`) and grouped, in order, into passes
//!   that each fit; only the current pass's pairs exist on the device. Each pair still sees
//!   every row in the same order, so its values are those of a single pass with the same
//!   panels; what is repeated is the upload (network: the forward and backward pass) of the
//!   samples, never a pair's SYRK. Between passes the finished pairs are read into the host
//!   result and freed. Only a budget below one 64×64 pair plus one sample is refused. A
//!   network's full or layer reduction plans its pairs within what its weights and
//!   micro-batch leave of the budget, so the three together stay within it.
//! * **Finalize.** The host reads (S, c) and forms (S − c)/N in f64.

mod buffers;
pub mod consts;
mod context;
pub mod kernels;
mod network;

pub use buffers::{read_f32, storage_f32};
pub use context::{list_adapters, AdapterSummary, GpuContext, GpuOptions};

use std::ops::Range;

use ndarray::{Array1, Array2, ArrayView1, ArrayView2};

use crate::backend::plan::{block_layout, check_result, squares_total, MicroBatchLimits};
use crate::backend::{plan_passes, Accumulator, FisherBackend, DEFAULT_RESULT_LIMIT};
use crate::error::{FisherError, Result};
use crate::fisher::{FisherMatrix, Form, Fvp, NetFisher, NetForm, Variant};
use crate::model::{DataSource, Mlp};
use crate::validate::check_matrix;
use consts::SYRK_TILE;
use kernels::{Bindings, Kernels, Recorder, RowParams, SyrkParams, SyrkVariant};

/// Default device memory budget for one reduction.
const DEFAULT_BUDGET: u64 = 2 << 30;
/// Upper bound on samples per chunk: large enough to amortize dispatch overhead, small enough
/// to keep the staging copy of a chunk modest.
const MAX_CHUNK_ROWS: usize = 8192;
/// Largest network micro-batch: beyond this the dispatch overhead is already amortized.
const MAX_MICRO_BATCH: usize = 1024;
/// Target size of one network micro-batch's scratch buffers. Larger batches do not run faster
/// once a dispatch covers thousands of invocations, and on integrated or software adapters
/// device memory is host memory, so this keeps the process footprint small.
const MICRO_BATCH_BYTES: u64 = 64 << 20;
/// Samples per chunk a multi-pass reduction keeps room for beside its panel pairs (at most
/// half the budget): every pass uploads all samples again, but a chunk beyond about a
/// thousand rows no longer amortizes anything, while budget given to the pairs saves passes.
const PASS_CHUNK_ROWS: u64 = 1024;

/// The GPU implementation of [`FisherBackend`].
pub struct GpuBackend {
    ctx: GpuContext,
    kernels: Kernels,
    binding_limit: u64,
    budget: u64,
    /// Largest result read back to the host, bytes ([`GpuOptions::max_result_bytes`]).
    result_limit: u64,
    /// Target scratch of a network micro-batch ([`GpuOptions::micro_batch_bytes`]).
    micro_batch_bytes: u64,
    /// Host running sums of a graph network ([`GpuOptions::host_accumulator_bytes`]).
    host_accumulator_bytes: u64,
}

impl std::fmt::Debug for GpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.label())
    }
}

pub(crate) fn does_not_fit(what: String, needed: u64, limit: u64, which: String) -> FisherError {
    FisherError::DoesNotFit { what, needed, limit, which }
}

impl GpuBackend {
    /// Builds the kernels on `ctx` and fixes the limits used for planning.
    pub fn new(ctx: GpuContext, options: &GpuOptions) -> Result<Self> {
        let variant_name = options.syrk_variant.clone().or_else(|| std::env::var("FISHER_SYRK_KERNEL").ok());
        let variant = match variant_name.as_deref() {
            Some("tiled") => SyrkVariant::Tiled,
            Some("direct") => SyrkVariant::Direct,
            Some(other) => {
                return Err(FisherError::InvalidInput(format!(
                    "unknown SYRK kernel '{other}' (expected tiled or direct)"
                )))
            }
            // Measured on lavapipe (benches/README.md): tiled 2.3 GFLOP/s, direct 1.8 at
            // 2048×2048, so tiled is the default on software adapters too; on real GPUs
            // workgroup-memory tiling is the standard choice.
            None => SyrkVariant::Tiled,
        };
        // The kernels index bindings with u32 element offsets computed as row · ld + column;
        // bindings below 2³² bytes (2³⁰ f32) keep every such product below 2³², and every
        // count the host converts to u32 for a uniform below it too.
        let adapter_limit =
            ctx.limits.max_storage_buffer_binding_size.min(ctx.limits.max_buffer_size).min(u32::MAX as u64);
        let binding_limit = options.max_binding_bytes.map_or(adapter_limit, |b| b.min(adapter_limit)) / 4 * 4;
        let budget = options
            .memory_budget_bytes
            .or_else(|| {
                std::env::var("FISHER_GPU_MEMORY_MB").ok().and_then(|v| v.parse::<u64>().ok()).map(|mb| mb << 20)
            })
            .unwrap_or(DEFAULT_BUDGET);
        let min_binding = (SYRK_TILE * SYRK_TILE * 4) as u64;
        if binding_limit < min_binding {
            return Err(does_not_fit(
                "one 64×64 output tile".into(),
                min_binding,
                binding_limit,
                "storage binding limit".into(),
            ));
        }
        let kernels = Kernels::new(&ctx, variant)?;
        Ok(GpuBackend {
            ctx,
            kernels,
            binding_limit,
            budget,
            result_limit: options.max_result_bytes.unwrap_or(DEFAULT_RESULT_LIMIT),
            micro_batch_bytes: options.micro_batch_bytes.unwrap_or(MICRO_BATCH_BYTES).max(1),
            host_accumulator_bytes: options.host_accumulator_bytes.unwrap_or(crate::backend::cpu::DEFAULT_ACCUMULATOR_BYTES),
        })
    }

    /// The context (adapter, device, limits).
    pub fn context(&self) -> &GpuContext {
        &self.ctx
    }

    /// The kernels (pipelines per [`kernels::Entry`], the workgroup size in use).
    pub fn kernels(&self) -> &Kernels {
        &self.kernels
    }

    /// What bounds a network micro-batch on this device.
    pub(crate) fn micro_batch_limits(&self) -> MicroBatchLimits {
        MicroBatchLimits {
            binding_limit: self.binding_limit,
            budget: self.budget,
            target: self.micro_batch_bytes,
            max_samples: MAX_MICRO_BATCH,
            binding_name: format!("max_storage_buffer_binding_size of {}", self.ctx.info.name),
            budget_name: "GPU memory budget (FISHER_GPU_MEMORY_MB)".into(),
        }
    }

    /// The result limit in bytes ([`GpuOptions::max_result_bytes`]).
    pub fn result_limit(&self) -> u64 {
        self.result_limit
    }

    /// The storage-binding limit used for planning (adapter limit, possibly lowered).
    pub fn binding_limit(&self) -> u64 {
        self.binding_limit
    }

    /// Largest output panel edge: a multiple of the 64-wide SYRK tile with edge² f32 values
    /// within one binding. Symmetric results wider than this are split into panel pairs.
    pub fn panel_max(&self) -> usize {
        let edge = ((self.binding_limit / 4) as f64).sqrt() as usize;
        (edge / SYRK_TILE as usize).max(1) * SYRK_TILE as usize
    }


    /// Samples per uploaded chunk for `p` columns, given `reserved` bytes of accumulators.
    pub fn chunk_rows(&self, p: usize, reserved: u64) -> Result<usize> {
        let row_bytes = (p as u64).saturating_mul(4);
        if row_bytes > self.binding_limit {
            return Err(does_not_fit(
                format!("one sample's gradient ({p} parameters)"),
                row_bytes,
                self.binding_limit,
                format!("max_storage_buffer_binding_size of {}", self.ctx.info.name),
            ));
        }
        // The chunk buffer plus a staging copy of it must fit next to what is reserved.
        let left = self.budget.saturating_sub(reserved);
        // row_bytes ≤ binding_limit < 2³², so twice it does not overflow.
        if 2 * row_bytes > left {
            return Err(does_not_fit(
                format!("accumulators for {p} parameters plus one sample"),
                reserved + 2 * row_bytes,
                self.budget,
                "GPU memory budget (set FISHER_GPU_MEMORY_MB to change it)".into(),
            ));
        }
        let rows = (self.binding_limit / row_bytes).min(left / (2 * row_bytes)) as usize;
        Ok(rows.clamp(1, MAX_CHUNK_ROWS))
    }

    fn wait_for(&self, stage: &str, index: wgpu::SubmissionIndex) -> Result<()> {
        self.ctx
            .device
            .poll(wgpu::PollType::Wait { submission_index: Some(index), timeout: None })
            .map(|_| ())
            .map_err(|e| FisherError::Gpu { stage: stage.into(), message: e.to_string() })
    }
}

impl FisherBackend for GpuBackend {
    fn program_exec(&self, program: std::sync::Arc<crate::graph::prim::Program>) -> Result<Box<dyn crate::graph::exec::ProgramExec + '_>> {
        Ok(Box::new(crate::graph::gpu::GpuExec::new(self, program)?))
    }

    fn result_limit(&self) -> u64 {
        self.result_limit
    }

    fn accumulator_bytes(&self) -> u64 {
        self.host_accumulator_bytes
    }

    fn label(&self) -> String {
        format!("gpu: {} (syrk {})", self.ctx.label(), self.kernels.syrk_variant().name())
    }

    fn accumulator<'a>(&'a self, form: &Form, params: usize) -> Result<Box<dyn Accumulator + 'a>> {
        if params == 0 {
            return Err(FisherError::Empty { what: "gradients".into(), rows: 0, cols: 0 });
        }
        let kind = match form {
            Form::Full => {
                check_result(params.checked_mul(params), self.result_limit, || {
                    format!("the full Fisher matrix ({params}×{params} f32)")
                })?;
                Kind::Syrk { blocks: vec![(0, params)], full: true }
            }
            Form::BlockDiagonal(sizes) => {
                // Checked here rather than by `Form::validate`, whose sum may overflow.
                let blocks = block_layout(sizes, params)?;
                check_result(squares_total(sizes.iter().copied()), self.result_limit, || {
                    format!("{} diagonal blocks of {params} parameters (f32)", sizes.len())
                })?;
                Kind::Syrk { blocks, full: false }
            }
            Form::Diagonal => Kind::Diag,
            Form::SampleNorms => Kind::Norms,
            Form::Gram => {
                return Err(FisherError::InvalidInput(
                    "the Gram form pairs every sample with every other and cannot be streamed; use gram()".into(),
                ))
            }
        };
        Ok(Box::new(GpuAccumulator::new(self, kind, params)?))
    }

    fn network_fisher(&self, mlp: &Mlp, data: &dyn DataSource, variant: Variant, form: NetForm) -> Result<NetFisher> {
        network::network_fisher(self, mlp, data, variant, form)
    }

    fn network_fisher_over(&self, mlp: &Mlp, data: &dyn DataSource, variant: Variant, form: NetForm, range: std::ops::Range<usize>) -> Result<NetFisher> {
        network::network_fisher_over(self, mlp, data, variant, form, range)
    }

    fn network_fvp(&self, mlp: &Mlp, data: &dyn DataSource, variant: Variant, v: ArrayView1<'_, f32>, product: bool) -> Result<Fvp> {
        network::network_fvp(self, mlp, data, variant, v, product)
    }

    fn network_operator<'a>(&'a self, mlp: &'a Mlp, data: &'a dyn DataSource, variant: Variant) -> Result<Box<dyn crate::backend::NetworkOperator + 'a>> {
        Ok(Box::new(crate::backend::PerDirection { backend: self, mlp, data, variant }))
    }

    fn gram(&self, grads: ArrayView2<'_, f32>) -> Result<Array2<f32>> {
        check_matrix("gradients", grads, 0)?;
        let (n, p) = grads.dim();
        check_result(n.checked_mul(n), self.result_limit, || format!("the Gram matrix ({n}×{n} f32)"))?;
        let grads = grads.as_standard_layout();
        let row_bytes = (p as u64).saturating_mul(4);
        // Two row chunks (A and B) and one output block (sum + comp) must fit.
        let rows_fit = (self.binding_limit / row_bytes) as usize;
        let rows = rows_fit.min(self.panel_max()).min(n);
        if rows == 0 {
            return Err(does_not_fit(
                format!("one sample's gradient ({p} parameters)"),
                row_bytes,
                self.binding_limit,
                format!("max_storage_buffer_binding_size of {}", self.ctx.info.name),
            ));
        }
        // rows·P ≤ binding_limit / 4 and rows ≤ panel_max, so neither product overflows.
        let needed = 2 * rows as u64 * row_bytes + 3 * 4 * (rows * rows) as u64;
        if needed > self.budget {
            return Err(does_not_fit(
                format!("Gram tiles of {rows} samples × {p} parameters"),
                needed,
                self.budget,
                "GPU memory budget".into(),
            ));
        }
        let data = grads.as_slice().expect("standard layout");
        let chunks: Vec<(usize, usize)> = (0..n.div_ceil(rows)).map(|i| (i * rows, rows.min(n - i * rows))).collect();
        let buf_a = storage_f32(&self.ctx, "gram rows I", rows * p);
        let buf_b = storage_f32(&self.ctx, "gram rows J", rows * p);
        // One output block, cleared per pair: the bind groups of `bindings` then stay the same
        // for every pair (a fresh block per pair would also be kept alive by them).
        let sum = storage_f32(&self.ctx, "gram sum", rows * rows);
        let comp = storage_f32(&self.ctx, "gram comp", rows * rows);
        let mut out = Array2::<f32>::zeros((n, n));
        let mut bindings = Bindings::default();
        for (ii, &(i0, ni)) in chunks.iter().enumerate() {
            self.ctx.queue.write_buffer(&buf_a, 0, bytemuck::cast_slice(&data[i0 * p..(i0 + ni) * p]));
            for &(j0, nj) in &chunks[ii..] {
                let b = if j0 == i0 {
                    &buf_a
                } else {
                    self.ctx.queue.write_buffer(&buf_b, 0, bytemuck::cast_slice(&data[j0 * p..(j0 + nj) * p]));
                    &buf_b
                };
                let mut rec = self.kernels.recorder();
                rec.clear(&sum, 4 * (ni * nj) as u64);
                rec.clear(&comp, 4 * (ni * nj) as u64);
                let params = SyrkParams {
                    k: p as u32,
                    m: ni as u32,
                    n: nj as u32,
                    a_ks: 1,
                    a_ms: p as u32,
                    b_ks: 1,
                    b_ns: p as u32,
                    upper_only: (j0 == i0) as u32,
                    ..Default::default()
                };
                rec.syrk(params, &buf_a, b, &sum, &comp)?;
                bindings.submit(&self.ctx, "gram", rec)?;
                let s = read_f32(&self.ctx, &sum, ni * nj)?;
                let c = read_f32(&self.ctx, &comp, ni * nj)?;
                for r in 0..ni {
                    for col in 0..nj {
                        let (gr, gc) = (i0 + r, j0 + col);
                        if gc >= gr {
                            let v = ((s[r * nj + col] as f64 - c[r * nj + col] as f64) / n as f64) as f32;
                            out[[gr, gc]] = v;
                            out[[gc, gr]] = v;
                        }
                    }
                }
            }
        }
        Ok(out)
    }
}

/// One panel pair I ≤ J of a symmetric block and its accumulators.
pub(crate) struct PanelPair {
    block: usize,
    rows: (usize, usize),
    cols: (usize, usize),
    sum: wgpu::Buffer,
    comp: wgpu::Buffer,
}

/// A planned panel pair: (block, rows (start, len), cols (start, len)).
type PairPlan = (usize, (usize, usize), (usize, usize));

/// Bytes of a pair's accumulators (sum and compensation, f32 each).
fn pair_bytes(&(_, rows, cols): &PairPlan) -> u64 {
    8 * rows.1 as u64 * cols.1 as u64
}

/// Splits [start, start + len) into panels of at most `step` columns.
fn panels(start: usize, len: usize, step: usize) -> Vec<(usize, usize)> {
    (0..len.div_ceil(step)).map(|i| (start + i * step, step.min(len - i * step))).collect()
}

/// The panel pairs I ≤ J of every block, for panels of at most `edge` columns.
fn pair_plan(blocks: &[(usize, usize)], edge: usize) -> Vec<PairPlan> {
    let mut plan = Vec::new();
    for (b, &(start, len)) in blocks.iter().enumerate() {
        let panels = panels(start, len, edge);
        for (i, &pi) in panels.iter().enumerate() {
            for &pj in &panels[i..] {
                plan.push((b, pi, pj));
            }
        }
    }
    plan
}

/// Where a symmetric reduction's accumulators go.
#[derive(Debug, PartialEq)]
struct SyrkLayout {
    /// Every pair, in pass order.
    pairs: Vec<PairPlan>,
    /// The index ranges of `pairs` summed by each pass, consecutive.
    passes: Vec<Range<usize>>,
    /// Bytes of the largest pass's pairs (what the chunk must fit beside).
    reserved: u64,
}

/// Plans the panel pairs of `blocks` for rows of `row_bytes`, within `budget`: the pairs of
/// `panel_max`-column panels in one pass when they fit with one sample's chunk (and its
/// staging copy), else narrower panels grouped into passes; `what` names the result.
fn plan_syrk(blocks: &[(usize, usize)], panel_max: usize, budget: u64, row_bytes: u64, what: &str) -> Result<SyrkLayout> {
    let pairs = pair_plan(blocks, panel_max);
    let total = pairs.iter().map(pair_bytes).fold(0u64, u64::saturating_add);
    let one_sample = row_bytes.saturating_mul(2);
    if total.saturating_add(one_sample) <= budget {
        return Ok(SyrkLayout { passes: vec![0..pairs.len()], reserved: total, pairs });
    }
    // The pairs of a pass get what a chunk of PASS_CHUNK_ROWS samples leaves, and at least
    // half the budget; the chunk shrinks towards one sample before one 64×64 pair is refused.
    let tile = SYRK_TILE as u64;
    let smallest = 8 * tile * tile;
    let chunk = one_sample.saturating_mul(PASS_CHUNK_ROWS).min(budget / 2).max(one_sample);
    let pass_budget = budget.saturating_sub(chunk).max(smallest.min(budget.saturating_sub(one_sample)));
    if pass_budget < smallest {
        return Err(does_not_fit(
            format!("one 64×64 panel pair of the {what} accumulators plus one sample ({} bytes)", row_bytes),
            smallest.saturating_add(one_sample),
            budget,
            "GPU memory budget (set FISHER_GPU_MEMORY_MB to change it)".into(),
        ));
    }
    // The widest panel whose pair fits a pass: edge² · 8 ≤ pass_budget, a multiple of the tile.
    let mut edge = ((pass_budget / 8) as f64).sqrt() as u64 / tile * tile;
    while edge > tile && edge * edge * 8 > pass_budget {
        edge -= tile;
    }
    let edge = (edge.max(tile) as usize).min(panel_max);
    let pairs = pair_plan(blocks, edge);
    let sizes: Vec<u64> = pairs.iter().map(pair_bytes).collect();
    let passes = plan_passes(&sizes, pass_budget);
    let reserved = passes.iter().map(|r| sizes[r.clone()].iter().sum::<u64>()).max().unwrap_or(0);
    log::info!("{what}: {} panel pairs of ≤ {edge} columns in {} passes over the samples (budget {budget} bytes, FISHER_GPU_MEMORY_MB)", pairs.len(), passes.len());
    Ok(SyrkLayout { pairs, passes, reserved })
}

enum Kind {
    Syrk { blocks: Vec<(usize, usize)>, full: bool },
    Diag,
    Norms,
}

/// A full or block-diagonal reduction, summed into one group of panel pairs per pass.
pub(crate) struct Syrk {
    blocks: Vec<(usize, usize)>,
    full: bool,
    layout: SyrkLayout,
    /// The current pass (index into `layout.passes`).
    pass: usize,
    /// Accumulators of the current pass's pairs; the other passes' exist only on the host.
    pairs: Vec<PanelPair>,
    /// The host result, filled as passes finish (allocated at the first read-back).
    out: Option<Vec<Array2<f32>>>,
    /// Samples of the first pass, which every later pass must repeat.
    first: usize,
}

impl Syrk {
    fn allocate(be: &GpuBackend, plan: &[PairPlan]) -> Result<Vec<PanelPair>> {
        be.ctx.scoped("allocating accumulators", || {
            plan.iter()
                .map(|&(block, rows, cols)| PanelPair {
                    block,
                    rows,
                    cols,
                    sum: storage_f32(&be.ctx, "fisher sum", rows.1 * cols.1),
                    comp: storage_f32(&be.ctx, "fisher comp", rows.1 * cols.1),
                })
                .collect()
        })
    }

    /// Checks that the current pass saw `n` samples, as many as the first.
    fn check_count(&self, n: usize) -> Result<()> {
        let (k, passes) = (self.pass + 1, self.layout.passes.len());
        if n == 0 {
            return Err(FisherError::InvalidInput(format!("pass {k} of {passes} over the samples saw no samples")));
        }
        if self.pass > 0 && n != self.first {
            return Err(FisherError::InvalidInput(format!(
                "pass {k} of {passes} saw {n} samples but the first pass saw {}; every pass must push the same samples in the same order",
                self.first
            )));
        }
        Ok(())
    }

    /// Reads the current pass's pairs (the GPU has finished them) into the host result as
    /// (S − c)/n, mirrored.
    fn read_back(&mut self, be: &GpuBackend, n: usize) -> Result<()> {
        let finalize = |s: &[f32], c: &[f32]| -> Vec<f32> {
            s.iter().zip(c).map(|(&s, &c)| ((s as f64 - c as f64) / n as f64) as f32).collect()
        };
        let blocks = &self.blocks;
        // The host result limit was checked when the reduction started.
        let out = self.out.get_or_insert_with(|| blocks.iter().map(|&(_, len)| Array2::zeros((len, len))).collect());
        for pair in &self.pairs {
            let len = pair.rows.1 * pair.cols.1;
            let v = finalize(&read_f32(&be.ctx, &pair.sum, len)?, &read_f32(&be.ctx, &pair.comp, len)?);
            let start = blocks[pair.block].0;
            let m = &mut out[pair.block];
            for r in 0..pair.rows.1 {
                let gr = pair.rows.0 + r - start;
                for c in 0..pair.cols.1 {
                    let gc = pair.cols.0 + c - start;
                    // Only the upper triangle is trusted; mirroring makes F exactly symmetric.
                    if gc >= gr {
                        let x = v[r * pair.cols.1 + c];
                        m[[gr, gc]] = x;
                        m[[gc, gr]] = x;
                    }
                }
            }
        }
        Ok(())
    }
}

pub(crate) enum State {
    Syrk(Syrk),
    Diag { sum: wgpu::Buffer, comp: wgpu::Buffer },
    Norms { out: Option<wgpu::Buffer>, norms: Vec<f32> },
}

pub(crate) struct GpuAccumulator<'a> {
    be: &'a GpuBackend,
    p: usize,
    rows_per_chunk: usize,
    /// Upload buffer for host pushes, allocated on the first one (device-fed reductions never need it).
    chunk: Option<wgpu::Buffer>,
    state: State,
    samples: usize,
    in_flight: Option<wgpu::SubmissionIndex>,
    /// Uniforms and bind groups of this reduction's own pushes.
    bindings: Bindings,
}

impl<'a> GpuAccumulator<'a> {
    fn new(be: &'a GpuBackend, kind: Kind, p: usize) -> Result<Self> {
        Self::new_within(be, kind, p, be.budget)
    }

    /// [`GpuAccumulator::new`] within `budget` bytes of the backend's budget (the rest is
    /// taken by the caller's own buffers, e.g. a network's weights and micro-batch).
    fn new_within(be: &'a GpuBackend, kind: Kind, p: usize, budget: u64) -> Result<Self> {
        let budget = budget.min(be.budget);
        let (state, reserved) = match kind {
            Kind::Syrk { blocks, full } => {
                // A sample wider than a binding is refused as such, before any planning.
                be.chunk_rows(p, 0)?;
                let what = if full { "full Fisher" } else { "block" };
                let layout = plan_syrk(&blocks, be.panel_max(), budget, 4 * p as u64, what).map_err(|e| match e {
                    // Name the whole budget when the caller's buffers took part of it.
                    FisherError::DoesNotFit { what, needed, limit, .. } if budget < be.budget => FisherError::DoesNotFit {
                        what,
                        needed,
                        limit,
                        which: format!(
                            "what the network's weights and micro-batch leave of the GPU memory budget of {} bytes; set FISHER_GPU_MEMORY_MB to change it",
                            be.budget
                        ),
                    },
                    e => e,
                })?;
                let pairs = Syrk::allocate(be, &layout.pairs[layout.passes[0].clone()])?;
                let reserved = layout.reserved;
                (State::Syrk(Syrk { blocks, full, layout, pass: 0, pairs, out: None, first: 0 }), reserved)
            }
            Kind::Diag => {
                let state = be.ctx.scoped("allocating accumulators", || State::Diag {
                    sum: storage_f32(&be.ctx, "diag sum", p),
                    comp: storage_f32(&be.ctx, "diag comp", p),
                })?;
                (state, 8 * p as u64)
            }
            Kind::Norms => (State::Norms { out: None, norms: Vec::new() }, 0),
        };
        // The chunk fits beside the accumulators within the same budget.
        let rows_per_chunk = be.chunk_rows(p, reserved.saturating_add(be.budget - budget))?;
        Ok(GpuAccumulator {
            be,
            p,
            rows_per_chunk,
            chunk: None,
            state,
            samples: 0,
            in_flight: None,
            bindings: Bindings::default(),
        })
    }

    /// A SYRK accumulator over column `blocks` ((start, len) pairs) of `p`-column rows, for
    /// reductions fed from device buffers ([`GpuAccumulator::encode_device`]).
    /// `budget` bytes are what the caller leaves of the backend's budget for them.
    pub(crate) fn syrk(be: &'a GpuBackend, blocks: Vec<(usize, usize)>, full: bool, p: usize, budget: u64) -> Result<Self> {
        Self::new_within(be, Kind::Syrk { blocks, full }, p, budget)
    }

    /// Records the reduction of `rows` rows (of `p` columns) held in `src`.
    fn encode_reduce(&mut self, rec: &mut Recorder<'_>, src: &wgpu::Buffer, rows: usize) -> Result<()> {
        let be = self.be;
        let p = self.p;
        match &mut self.state {
            State::Syrk(syrk) => {
                for pair in syrk.pairs.iter() {
                    let params = SyrkParams {
                        k: rows as u32,
                        m: pair.rows.1 as u32,
                        n: pair.cols.1 as u32,
                        a_off: pair.rows.0 as u32,
                        a_ks: p as u32,
                        a_ms: 1,
                        b_off: pair.cols.0 as u32,
                        b_ks: p as u32,
                        b_ns: 1,
                        upper_only: (pair.rows == pair.cols) as u32,
                        ..Default::default()
                    };
                    rec.syrk(params, src, src, &pair.sum, &pair.comp)?;
                }
            }
            State::Diag { sum, comp } => {
                let params = RowParams { rows: rows as u32, cols: p as u32, ld: p as u32, offset: 0 };
                rec.diag(params, src, sum, comp)?;
            }
            State::Norms { out, .. } => {
                let out = out.get_or_insert_with(|| storage_f32(&be.ctx, "norms", self.rows_per_chunk));
                let params = RowParams { rows: rows as u32, cols: p as u32, ld: p as u32, offset: 0 };
                rec.norms(params, src, out)?;
            }
        }
        Ok(())
    }

    /// Records the reduction of `rows` gradient rows already on the device in `src`, which
    /// stand for `samples` samples (rows = samples · R for square-root-factor rows).
    pub(crate) fn encode_device(
        &mut self,
        rec: &mut Recorder<'_>,
        src: &wgpu::Buffer,
        rows: usize,
        samples: usize,
    ) -> Result<()> {
        self.encode_reduce(rec, src, rows)?;
        self.samples += samples;
        Ok(())
    }

    /// Uploads and reduces `rows` (≤ rows_per_chunk) samples.
    fn push_rows(&mut self, data: &[f32], rows: usize) -> Result<()> {
        let be = self.be;
        let chunk = match self.chunk.take() {
            Some(c) => c,
            None => be.ctx.scoped("allocating chunk", || {
                storage_f32(&be.ctx, "gradient chunk", self.rows_per_chunk * self.p)
            })?,
        };
        be.ctx.queue.write_buffer(&chunk, 0, bytemuck::cast_slice(data));
        let mut rec = be.kernels.recorder();
        let encoded = self.encode_reduce(&mut rec, &chunk, rows);
        self.chunk = Some(chunk);
        encoded?;
        let index = self.bindings.submit(&be.ctx, "accumulate", rec)?;
        // Bound in-flight work (and wgpu's staging copies) to two chunks.
        if let Some(previous) = self.in_flight.replace(index) {
            be.wait_for("accumulate", previous)?;
        }
        if let State::Norms { out: Some(out), norms } = &mut self.state {
            norms.extend(read_f32(&be.ctx, out, rows)?);
        }
        self.samples += rows;
        Ok(())
    }
}

impl Accumulator for GpuAccumulator<'_> {
    fn push(&mut self, chunk: ArrayView2<'_, f32>) -> Result<()> {
        if chunk.ncols() != self.p {
            return Err(FisherError::InvalidInput(format!(
                "gradient chunk has {} columns but the reduction was started for {} parameters",
                chunk.ncols(),
                self.p
            )));
        }
        check_matrix("gradients", chunk, self.samples)?;
        if let State::Norms { .. } = self.state {
            let samples = self.samples.checked_add(chunk.nrows());
            check_result(samples, self.be.result_limit, || {
                format!("the per-sample norms ({} f32)", samples.unwrap_or(usize::MAX))
            })?;
        }
        let chunk = chunk.as_standard_layout();
        let data = chunk.as_slice().ok_or_else(|| FisherError::InvalidInput("gradient chunk is not contiguous".into()))?;
        for part in data.chunks(self.rows_per_chunk * self.p) {
            self.push_rows(part, part.len() / self.p)?;
        }
        Ok(())
    }

    fn samples(&self) -> usize {
        self.samples
    }

    fn passes(&self) -> usize {
        match &self.state {
            State::Syrk(syrk) => syrk.layout.passes.len(),
            _ => 1,
        }
    }

    fn next_pass(&mut self) -> Result<()> {
        let be = self.be;
        let n = self.samples;
        let State::Syrk(syrk) = &mut self.state else {
            return Err(FisherError::InvalidInput("this reduction has a single pass over the samples".into()));
        };
        let passes = syrk.layout.passes.len();
        if syrk.pass + 1 >= passes {
            return Err(FisherError::InvalidInput(format!(
                "next_pass() after the last of {passes} passes over the samples; call finish()"
            )));
        }
        syrk.check_count(n)?;
        be.ctx.wait("next pass")?;
        syrk.read_back(be, n)?;
        // The cached bind groups of this reduction's pushes hold the finished pairs: dropping
        // both frees their device memory before the next group is allocated.
        self.bindings = Bindings::default();
        self.in_flight = None;
        syrk.pairs = Vec::new();
        if syrk.pass == 0 {
            syrk.first = n;
        }
        syrk.pass += 1;
        syrk.pairs = Syrk::allocate(be, &syrk.layout.pairs[syrk.layout.passes[syrk.pass].clone()])?;
        self.samples = 0;
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<FisherMatrix> {
        let n = self.samples;
        if let State::Syrk(syrk) = &self.state {
            let passes = syrk.layout.passes.len();
            if syrk.pass + 1 < passes {
                return Err(FisherError::InvalidInput(format!(
                    "finish() in pass {} of {passes}: the output is summed in {passes} passes over the samples; call next_pass() and push every sample again until the last",
                    syrk.pass + 1
                )));
            }
        }
        if n == 0 {
            return Err(FisherError::Empty { what: "gradients".into(), rows: 0, cols: self.p });
        }
        let be = self.be;
        be.ctx.wait("finish")?;
        let finalize = |s: &[f32], c: &[f32]| -> Vec<f32> {
            s.iter().zip(c).map(|(&s, &c)| ((s as f64 - c as f64) / n as f64) as f32).collect()
        };
        match self.state {
            State::Syrk(mut syrk) => {
                syrk.check_count(n)?;
                syrk.read_back(be, n)?;
                let mut out = syrk.out.take().expect("read back");
                if syrk.full {
                    Ok(FisherMatrix::Full(out.pop().expect("one block")))
                } else {
                    Ok(FisherMatrix::BlockDiagonal(out))
                }
            }
            State::Diag { sum, comp } => {
                let v = finalize(&read_f32(&be.ctx, &sum, self.p)?, &read_f32(&be.ctx, &comp, self.p)?);
                Ok(FisherMatrix::Diagonal(Array1::from(v)))
            }
            State::Norms { norms, .. } => Ok(FisherMatrix::SampleNorms(Array1::from(norms))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EDGE: usize = 1024;

    #[test]
    fn a_plan_that_fits_is_one_pass_of_the_widest_panels() {
        // 1000 columns in one panel: 8 MB of pairs and a 4 kB sample (twice) fit 9 MB.
        let layout = plan_syrk(&[(0, 1000)], EDGE, 9 << 20, 4000, "full").unwrap();
        assert_eq!(layout.passes, vec![0..1]);
        assert_eq!(layout.pairs, vec![(0, (0, 1000), (0, 1000))]);
        assert_eq!(layout.reserved, 8_000_000);
        // Blocks keep their own panels: 3 pairs for 1 + 2 panels.
        let layout = plan_syrk(&[(0, 10), (10, 1500)], EDGE, 1 << 30, 6040, "block").unwrap();
        assert_eq!(layout.passes, vec![0..4]);
        assert_eq!(layout.pairs[1..], [(1, (10, 1024), (10, 1024)), (1, (10, 1024), (1034, 476)), (1, (1034, 476), (1034, 476))]);
    }

    #[test]
    fn an_oversized_plan_takes_passes_of_narrower_panels_within_the_budget() {
        let budget = 1 << 20;
        let layout = plan_syrk(&[(0, 1000)], EDGE, budget, 4000, "full").unwrap();
        // A 1024-row chunk of 4 kB rows would take 8 MB: the chunk gets half the budget and
        // the pairs the other half, edge² · 8 ≤ 512 KiB → 256 columns, 4 panels, 10 pairs.
        assert_eq!(layout.pairs[0], (0, (0, 256), (0, 256)));
        assert_eq!(layout.pairs.len(), 10);
        assert!(layout.passes.len() >= 10, "{:?}", layout.passes);
        assert_eq!(layout.passes.first().unwrap().start, 0);
        assert_eq!(layout.passes.last().unwrap().end, layout.pairs.len());
        assert!(layout.passes.windows(2).all(|w| w[0].end == w[1].start && !w[1].is_empty()));
        assert!(layout.reserved <= budget / 2 && layout.reserved + 2 * 4000 <= budget);
        // Never wider than the binding allows.
        let narrow = plan_syrk(&[(0, 1000)], 128, budget, 4000, "full").unwrap();
        assert!(narrow.pairs.iter().all(|&(_, r, c)| r.1 <= 128 && c.1 <= 128));
    }

    #[test]
    fn only_a_budget_below_one_tile_pair_and_one_sample_is_refused() {
        let smallest = 8 * 64 * 64;
        // Just enough: one 64×64 pair per pass, the chunk one sample.
        let layout = plan_syrk(&[(0, 200)], EDGE, smallest + 2 * 800, 800, "full").unwrap();
        assert!(layout.pairs.iter().all(|&(_, r, c)| r.1 <= 64 && c.1 <= 64));
        // Panels 64, 64, 64, 8: ten pairs, the last two (64×8 and 8×8) share a pass.
        assert_eq!(layout.pairs.len(), 10);
        assert_eq!(layout.passes.len(), 9);
        assert_eq!(layout.reserved, smallest);
        match plan_syrk(&[(0, 200)], EDGE, smallest + 2 * 800 - 1, 800, "full") {
            Err(FisherError::DoesNotFit { needed, limit, which, .. }) => {
                assert_eq!((needed, limit), (smallest + 1600, smallest + 1599));
                assert!(which.contains("FISHER_GPU_MEMORY_MB"), "{which}");
            }
            other => panic!("expected DoesNotFit, got {other:?}"),
        }
    }
}
