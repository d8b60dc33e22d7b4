//! The GPU executor of a [`Program`]: [`GpuExec`], the [`ProgramExec`] stages on the device,
//! with the semantics of [`super::exec::CpuExec`].
//!
//! ## Memory
//! One storage buffer per slot: the `Shared` slots (parameters, constants, parameter
//! tangents) are allocated and uploaded once in [`GpuExec::new`], with the CSR maps of the
//! instructions (row starts, columns, weights); the `Sample` and `Draw` slots are sized in
//! [`ProgramExec::begin`] for the micro-batch. Every buffer must fit the adapter's
//! `max_storage_buffer_binding_size` ([`ProgramExec::max_slot_bytes`]); a shared slot or map
//! that does not is refused with [`FisherError::DoesNotFit`], and the driver sizes micro-batches
//! so that the per-sample slots do.
//!
//! ## Kernels
//! Each instruction is one dispatch of an entry point of `shaders/graph.wgsl` (see its header
//! for the exact contracts), recorded into one command encoder per program run: one invocation
//! per destination value for the element-wise, sparse, argmax, gather/scatter and embedding
//! instructions, one per 4×4 output block for matrix products (rows stacked along m or n when
//! one operand is shared, so that per-sample matrix–vector products fill the blocks too), one
//! per (row, embedding column) for the embedding gradient, whose repeated tokens then add in
//! order without atomics. [`Inst::Zero`] is a buffer clear.
//!
//! ## Reductions
//! Σ_rows g² and Σ_rows g (`g_colsum`) and the KFAC factors (`g_gram`) are formed per block
//! of rows on the device — f32 runs of at most [`KAHAN_BLOCK`] terms folded into a Kahan sum
//! per block — and the blocks are read back and added in f64 on the host. Blocks are only as
//! many as keep the device busy, so the read-back stays near one result per block.

use std::collections::HashMap;
use std::sync::Arc;

use super::exec::{token_index, ProgramExec};
use super::prim::{BinFn, Csr, Inst, Program, Rows, SlotId};
use crate::backend::gpu::consts::{
    GRAPH_A_MODE_SHIFT, GRAPH_BIN_ADD, GRAPH_BIN_DIV, GRAPH_BIN_MUL, GRAPH_BIN_SUB, GRAPH_B_MODE_SHIFT, GRAPH_FLAG_ACC,
    GRAPH_FLAG_BIAS, GRAPH_FLAG_FLAT_M, GRAPH_FLAG_FLAT_N, GRAPH_FLAG_POS_LAST, GRAPH_FLAG_SQUARE, GRAPH_FLAG_TA,
    GRAPH_FLAG_TB, GRAPH_FLAG_WEIGHTS, GRAPH_MODE_DRAW, GRAPH_MODE_SAME, GRAPH_MODE_SHARED, KAHAN_BLOCK,
};
use crate::backend::gpu::kernels::{Bindings, Entry, GraphParams, Recorder};
use crate::backend::gpu::{read_f32, storage_f32, GpuBackend, GpuContext};
use crate::error::{FisherError, Result};

/// Invocations a reduction aims for: enough to occupy a GPU (and every core of a CPU
/// adapter); beyond it more row blocks only add read-back.
const REDUCTION_PARALLELISM: u64 = 16_384;

/// Invocations of `g_matmul` whose columns interleave (see graph.wgsl).
const MATMUL_LANES: usize = 8;

/// The CSR matrix of an instruction on the device.
struct MapBuffers {
    offsets: wgpu::Buffer,
    cols: wgpu::Buffer,
    weights: Option<wgpu::Buffer>,
}

/// Executes a [`Program`] on the GPU of a [`GpuBackend`].
pub struct GpuExec<'a> {
    be: &'a GpuBackend,
    prog: Arc<Program>,
    /// One buffer per slot (per-sample slots: one element until [`ProgramExec::begin`]).
    slots: Vec<wgpu::Buffer>,
    /// The CSR maps, keyed by the address of their `Arc<Csr>`.
    maps: HashMap<usize, MapBuffers>,
    /// Uniforms and cached bind groups of every submission (reset when buffers change).
    bindings: Bindings,
    /// Reduction partial sums, grown on demand.
    scratch: Option<wgpu::Buffer>,
    /// Token slots of the embeddings and the vocabulary each indexes.
    tokens: Vec<(SlotId, usize)>,
    /// Samples of the current micro-batch, and the most [`ProgramExec::begin`] sized for.
    samples: usize,
    capacity: usize,
    r: usize,
}

fn u32_of(x: usize, what: &str) -> Result<u32> {
    u32::try_from(x).map_err(|_| FisherError::InvalidInput(format!("{what} = {x} exceeds the 2³²−1 a kernel can index")))
}

fn map_key(map: &Arc<Csr>) -> usize {
    Arc::as_ptr(map) as usize
}

/// The CSR maps an instruction reads.
fn inst_map(inst: &Inst) -> Option<&Arc<Csr>> {
    match inst {
        Inst::Sparse { map, .. } => Some(map),
        Inst::ArgMax { windows, .. } => Some(windows),
        Inst::ScatterDyn { candidates, .. } => Some(candidates),
        _ => None,
    }
}

/// Checks what the kernels rely on and the CPU executor assumes: the row-class combinations of
/// the module docs, lengths that agree with the dimensions, maps in range, and a destination
/// that is not also an operand (a read-write binding cannot alias a read-only one).
fn check_inst(prog: &Program, inst: &Inst) -> Result<()> {
    let slots = &prog.slots;
    let bad = |why: String| FisherError::InvalidInput(format!("GPU executor: {inst:?}: {why}"));
    let d = inst.dst();
    let slot = |s: SlotId| slots.get(s).ok_or_else(|| bad(format!("slot {s} does not exist")));
    let dst = slot(d)?;
    for s in inst.sources() {
        let src = slot(s)?;
        if s == d {
            return Err(bad("the destination is also an operand".into()));
        }
        let ok = src.rows == dst.rows || src.rows == Rows::Shared || (src.rows == Rows::Sample && dst.rows == Rows::Draw);
        if !ok {
            return Err(bad(format!("{:?} operand {} of a {:?} destination", src.rows, src.name, dst.rows)));
        }
    }
    let len = |s: SlotId| slots[s].len;
    let need = |what: &str, got: usize, want: usize| if got == want { Ok(()) } else { Err(bad(format!("{what} has {got} values per row, expected {want}"))) };
    let check_map = |map: &Csr, rows: usize, src_len: usize, nonempty: bool| -> Result<()> {
        if map.offsets.len() != rows + 1 || map.src_len != src_len {
            return Err(bad(format!("map is {}×{}, expected {rows}×{src_len}", map.rows(), map.src_len)));
        }
        if map.offsets[0] != 0 || *map.offsets.last().unwrap_or(&0) as usize != map.cols.len() || map.offsets.windows(2).any(|w| w[0] > w[1] || (nonempty && w[0] == w[1])) {
            return Err(bad("map row starts are not a non-decreasing 0..nnz sequence (or a window is empty)".into()));
        }
        if map.cols.iter().any(|&c| c as usize >= src_len) || map.weights.as_ref().is_some_and(|w| w.len() != map.cols.len()) {
            return Err(bad("map entries out of range".into()));
        }
        Ok(())
    };
    match inst {
        Inst::Zero { .. } => Ok(()),
        Inst::Sparse { src, map, .. } => check_map(map, dst.len, len(*src), false),
        Inst::MatMul { a, b, dims, .. } => {
            need("A", len(*a), dims.groups * dims.m * dims.k)?;
            need("B", len(*b), dims.groups * dims.k * dims.n)?;
            need("Y", dst.len, dims.groups * dims.m * dims.n)
        }
        Inst::Unary { src, .. } => need("the source", len(*src), dst.len),
        Inst::Binary { a, b, .. } => {
            need("a", len(*a), dst.len)?;
            need("b", len(*b), dst.len)
        }
        Inst::ArgMax { src, windows, .. } => check_map(windows, dst.len, len(*src), true),
        Inst::GatherDyn { idx, .. } => need("the indices", len(*idx), dst.len),
        Inst::ScatterDyn { src, idx, candidates, .. } => {
            need("the indices", len(*idx), len(*src))?;
            check_map(candidates, dst.len, len(*src), false)
        }
        Inst::Embed { table, tokens, dim, .. } => {
            if *dim == 0 || len(*table) % dim != 0 {
                return Err(bad(format!("table of {} values is not rows of {dim}", len(*table))));
            }
            need("the destination", dst.len, len(*tokens) * dim)
        }
        Inst::EmbedBack { src, tokens, dim, .. } => {
            if *dim == 0 || dst.len % dim != 0 {
                return Err(bad(format!("table gradient of {} values is not rows of {dim}", dst.len)));
            }
            need("the source", len(*src), len(*tokens) * dim)
        }
    }
}

impl<'a> GpuExec<'a> {
    /// An executor for `prog` on the device of `be`: checks the program, allocates and
    /// uploads the shared slots and the CSR maps.
    pub fn new(be: &'a GpuBackend, prog: Arc<Program>) -> Result<GpuExec<'a>> {
        let ctx = be.context();
        let limit = be.binding_limit();
        let named = [prog.input, prog.output, prog.output_cot, prog.output_tangent].into_iter();
        let lists = prog.params.iter().chain(&prog.param_grads).chain(&prog.param_tangents).copied();
        let sites = prog.kfac.iter().flat_map(|s| [s.input, s.output_cot]);
        if let Some(s) = named.chain(lists).chain(sites).find(|&s| s >= prog.slots.len()) {
            return Err(FisherError::InvalidInput(format!("GPU executor: the program names slot {s} of {}", prog.slots.len())));
        }
        for inst in prog.forward.iter().chain(&prog.backward).chain(&prog.tangent) {
            check_inst(&prog, inst)?;
        }
        let fits = |what: String, bytes: u64| {
            if bytes > limit {
                Err(crate::backend::gpu::does_not_fit(what, bytes, limit, format!("max_storage_buffer_binding_size of {}", ctx.info.name)))
            } else {
                Ok(())
            }
        };
        for s in prog.slots.iter().filter(|s| s.rows == Rows::Shared) {
            fits(format!("shared slot {} ({} values)", s.name, s.len), s.len as u64 * 4)?;
        }
        let mut shared_values = vec![None; prog.slots.len()];
        for (s, values) in &prog.shared {
            let slot = prog.slots.get(*s).ok_or_else(|| FisherError::InvalidInput(format!("shared values for slot {s}, which does not exist")))?;
            if slot.rows != Rows::Shared || values.len() != slot.len {
                return Err(FisherError::InvalidInput(format!("{} values for the {:?} slot {} of {}", values.len(), slot.rows, slot.name, slot.len)));
            }
            shared_values[*s] = Some(values);
        }
        let mut tokens = Vec::new();
        for inst in prog.forward.iter().chain(&prog.backward).chain(&prog.tangent) {
            match inst {
                Inst::Embed { table, tokens: t, dim, .. } => tokens.push((*t, prog.slots[*table].len / dim)),
                Inst::EmbedBack { dst, tokens: t, dim, .. } => tokens.push((*t, prog.slots[*dst].len / dim)),
                _ => {}
            }
        }
        tokens.sort_unstable();
        tokens.dedup();
        let mut maps = HashMap::new();
        let maps_of = prog.forward.iter().chain(&prog.backward).chain(&prog.tangent).filter_map(inst_map);
        for map in maps_of {
            if maps.contains_key(&map_key(map)) {
                continue;
            }
            fits(format!("a sparse map of {} entries", map.nnz()), map.nnz().max(map.offsets.len()) as u64 * 4)?;
            u32_of(map.nnz(), "map entries")?;
            let buffers = ctx.scoped("uploading sparse maps", || MapBuffers {
                offsets: upload_u32(ctx, "csr offsets", &map.offsets),
                cols: upload_u32(ctx, "csr cols", &map.cols),
                weights: map.weights.as_ref().map(|w| upload_f32(ctx, "csr weights", w)),
            })?;
            maps.insert(map_key(map), buffers);
        }
        let slots = ctx.scoped("allocating shared slots", || {
            prog.slots
                .iter()
                .zip(&shared_values)
                .map(|(s, values)| match (s.rows, values) {
                    (Rows::Shared, Some(v)) => upload_f32(ctx, &s.name, v),
                    (Rows::Shared, None) => storage_f32(ctx, &s.name, s.len),
                    _ => storage_f32(ctx, &s.name, 0),
                })
                .collect()
        })?;
        Ok(GpuExec { be, prog, slots, maps, bindings: Bindings::default(), scratch: None, tokens, samples: 0, capacity: 0, r: 1 })
    }

    fn ctx(&self) -> &'a GpuContext {
        self.be.context()
    }

    fn rows_of(&self, rows: Rows) -> usize {
        match rows {
            Rows::Shared => 1,
            Rows::Sample => self.samples,
            Rows::Draw => self.samples * self.r,
        }
    }

    /// The values of slot `s` for the current micro-batch (every row of its class), read
    /// back from the device; for tests and debugging.
    pub fn read_slot(&self, s: SlotId) -> Result<Vec<f32>> {
        let slot = self.prog.slots.get(s).ok_or_else(|| FisherError::InvalidInput(format!("slot {s} does not exist")))?;
        read_f32(self.ctx(), &self.slots[s], self.rows_of(slot.rows) * slot.len)
    }

    /// The row mode of operand `s` for destination `d` (checked in [`GpuExec::new`]).
    fn mode(&self, s: SlotId, d: SlotId) -> u32 {
        match (self.prog.slots[s].rows, self.prog.slots[d].rows) {
            (a, b) if a == b => GRAPH_MODE_SAME,
            (Rows::Shared, _) => GRAPH_MODE_SHARED,
            _ => GRAPH_MODE_DRAW,
        }
    }

    /// Records one instruction for the current micro-batch.
    fn record(&self, rec: &mut Recorder<'_>, inst: &Inst) -> Result<()> {
        let slots = &self.prog.slots;
        let d = inst.dst();
        let rows = self.rows_of(slots[d].rows);
        let len = slots[d].len;
        let values = (rows * len) as u64;
        let mut p = GraphParams { rows: u32_of(rows, "rows")?, len: u32_of(len, "slot length")?, r: u32_of(self.r, "R")?, ..Default::default() };
        let acc_flag = |acc: bool| if acc { GRAPH_FLAG_ACC } else { 0 };
        // Operand a in in0, b in in1, with their row lengths and modes.
        let operands = |p: &mut GraphParams, a: Option<SlotId>, b: Option<SlotId>| -> Result<()> {
            if let Some(a) = a {
                p.a_len = u32_of(slots[a].len, "slot length")?;
                p.flags |= self.mode(a, d) << GRAPH_A_MODE_SHIFT;
            }
            if let Some(b) = b {
                p.b_len = u32_of(slots[b].len, "slot length")?;
                p.flags |= self.mode(b, d) << GRAPH_B_MODE_SHIFT;
            }
            Ok(())
        };
        let buf = |s: SlotId| Some(&self.slots[s]);
        let map = |m: &Arc<Csr>| -> Result<&MapBuffers> {
            self.maps.get(&map_key(m)).ok_or_else(|| FisherError::InvalidInput("a sparse map that was not in the program at construction".into()))
        };
        let out = &self.slots[d];
        match inst {
            Inst::Zero { .. } => {
                if values > 0 {
                    rec.clear(out, values * 4);
                }
                Ok(())
            }
            Inst::Sparse { src, map: m, acc, .. } => {
                operands(&mut p, Some(*src), None)?;
                let mb = map(m)?;
                p.flags |= acc_flag(*acc) | if mb.weights.is_some() { GRAPH_FLAG_WEIGHTS } else { 0 };
                rec.graph(Entry::GraphSparse, &p, [buf(*src), mb.weights.as_ref(), Some(&mb.offsets), Some(&mb.cols)], out, values)
            }
            Inst::MatMul { a, b, dims, acc, .. } => {
                operands(&mut p, Some(*a), Some(*b))?;
                p.groups = u32_of(dims.groups, "groups")?;
                p.m = u32_of(dims.m, "m")?;
                p.k = u32_of(dims.k, "k")?;
                p.n = u32_of(dims.n, "n")?;
                p.flags |= acc_flag(*acc) | if dims.ta { GRAPH_FLAG_TA } else { 0 } | if dims.tb { GRAPH_FLAG_TB } else { 0 };
                let (a_shared, b_shared) = (slots[*a].rows == Rows::Shared, slots[*b].rows == Rows::Shared);
                // Stack the rows along the axis whose operand varies per row when the other is
                // shared: one tall product instead of `rows` thin ones.
                let (mm, nn, outer) = if dims.groups == 1 && b_shared && !a_shared {
                    p.flags |= GRAPH_FLAG_FLAT_M;
                    (rows * dims.m, dims.n, 1)
                } else if dims.groups == 1 && a_shared && !b_shared {
                    p.flags |= GRAPH_FLAG_FLAT_N;
                    (dims.m, rows * dims.n, 1)
                } else {
                    (dims.m, dims.n, rows * dims.groups)
                };
                // Interleave the columns of 8 invocations (one 256-bit SIMD register of f32 on a
                // CPU adapter; harmless on GPUs) when there are enough of them.
                let lanes = if nn >= 4 * MATMUL_LANES { MATMUL_LANES } else { 1 };
                p.code = lanes as u32;
                let blocks = (outer * mm.div_ceil(4) * nn.div_ceil(4 * lanes) * lanes) as u64;
                rec.graph(Entry::GraphMatMul, &p, [buf(*a), buf(*b), None, None], out, blocks)
            }
            Inst::Unary { src, f, .. } => {
                operands(&mut p, Some(*src), None)?;
                let (code, p0, p1) = f.code();
                p.code = code;
                p.p0 = p0;
                p.p1 = p1;
                rec.graph(Entry::GraphUnary, &p, [buf(*src), None, None, None], out, values)
            }
            Inst::Binary { a, b, f, acc, .. } => {
                operands(&mut p, Some(*a), Some(*b))?;
                p.flags |= acc_flag(*acc);
                p.code = match f {
                    BinFn::Add => GRAPH_BIN_ADD,
                    BinFn::Sub => GRAPH_BIN_SUB,
                    BinFn::Mul => GRAPH_BIN_MUL,
                    BinFn::Div => GRAPH_BIN_DIV,
                };
                rec.graph(Entry::GraphBinary, &p, [buf(*a), buf(*b), None, None], out, values)
            }
            Inst::ArgMax { src, windows, .. } => {
                operands(&mut p, Some(*src), None)?;
                let mb = map(windows)?;
                rec.graph(Entry::GraphArgMax, &p, [buf(*src), None, Some(&mb.offsets), Some(&mb.cols)], out, values)
            }
            Inst::GatherDyn { src, idx, acc, .. } => {
                operands(&mut p, Some(*src), Some(*idx))?;
                p.flags |= acc_flag(*acc);
                rec.graph(Entry::GraphGather, &p, [buf(*src), buf(*idx), None, None], out, values)
            }
            Inst::ScatterDyn { src, idx, candidates, acc, .. } => {
                operands(&mut p, Some(*src), Some(*idx))?;
                p.flags |= acc_flag(*acc);
                let mb = map(candidates)?;
                rec.graph(Entry::GraphScatter, &p, [buf(*src), buf(*idx), Some(&mb.offsets), Some(&mb.cols)], out, values)
            }
            Inst::Embed { table, tokens, dim, .. } => {
                operands(&mut p, Some(*table), Some(*tokens))?;
                p.dim = u32_of(*dim, "embedding width")?;
                p.code = u32_of(slots[*table].len / dim, "vocabulary")?;
                rec.graph(Entry::GraphEmbed, &p, [buf(*table), buf(*tokens), None, None], out, values)
            }
            Inst::EmbedBack { src, tokens, dim, acc, .. } => {
                operands(&mut p, Some(*src), Some(*tokens))?;
                p.dim = u32_of(*dim, "embedding width")?;
                p.code = u32_of(len / dim, "vocabulary")?;
                if !acc && values > 0 {
                    rec.clear(out, values * 4);
                }
                rec.graph(Entry::GraphEmbedBack, &p, [buf(*src), buf(*tokens), None, None], out, (rows * dim) as u64)
            }
        }
    }

    /// Runs a list of instructions as one submission.
    fn run(&mut self, stage: &str, insts: &[Inst]) -> Result<()> {
        let mut rec = self.be.kernels().recorder();
        for inst in insts {
            self.record(&mut rec, inst)?;
        }
        self.bindings.submit(self.ctx(), stage, rec)?;
        Ok(())
    }

    /// A scratch buffer of at least `len` f32 (partial sums of a reduction).
    fn scratch(&mut self, len: usize) -> Result<wgpu::Buffer> {
        match &self.scratch {
            Some(b) if b.size() >= len as u64 * 4 => Ok(b.clone()),
            _ => {
                let limit = self.be.binding_limit() / 4;
                let want = (len.next_power_of_two() as u64).min(limit).max(len as u64) as usize;
                let b = self.ctx().scoped("allocating reduction scratch", || storage_f32(self.ctx(), "reduction partials", want))?;
                self.scratch = Some(b.clone());
                Ok(b)
            }
        }
    }

    /// Σ over rows of g (or g²) per column of every parameter-gradient slot, added to `sums`.
    fn column_sums(&mut self, sums: &mut [f64], square: bool) -> Result<()> {
        let prog = Arc::clone(&self.prog);
        let p_total: usize = prog.param_grads.iter().map(|&g| prog.slots[g].len).sum();
        if sums.len() != p_total {
            return Err(FisherError::InvalidInput(format!("{} sums for {p_total} parameters", sums.len())));
        }
        let limit = (self.be.binding_limit() / 4) as usize;
        // (slot, θ offset, blocks, rows per block) of each parameter, in θ order.
        let mut plan = Vec::with_capacity(prog.param_grads.len());
        let mut at = 0;
        for &g in &prog.param_grads {
            let (len, rows) = (prog.slots[g].len, self.rows_of(prog.slots[g].rows));
            if len > 0 && rows > 0 {
                let most = rows.div_ceil(KAHAN_BLOCK as usize).min((limit / len).max(1));
                let blocks = ((REDUCTION_PARALLELISM as usize).div_ceil(len)).clamp(1, most);
                let per_block = rows.div_ceil(blocks);
                plan.push((g, at, rows.div_ceil(per_block), per_block));
            }
            at += len;
        }
        // Batches of parameters whose partials share one scratch buffer and one read-back.
        let mut i = 0;
        while i < plan.len() {
            let mut used = 0;
            let mut j = i;
            while j < plan.len() {
                let (g, _, blocks, _) = plan[j];
                let need = blocks * prog.slots[g].len;
                if j > i && used + need > limit {
                    break;
                }
                used += need;
                j += 1;
            }
            let scratch = self.scratch(used)?;
            let mut rec = self.be.kernels().recorder();
            let mut off = 0;
            for &(g, _, blocks, per_block) in &plan[i..j] {
                let slot = &prog.slots[g];
                let p = GraphParams {
                    rows: u32_of(self.rows_of(slot.rows), "rows")?,
                    len: u32_of(slot.len, "slot length")?,
                    flags: if square { GRAPH_FLAG_SQUARE } else { 0 },
                    groups: u32_of(blocks, "blocks")?,
                    dim: u32_of(per_block, "rows per block")?,
                    off: u32_of(off, "partials offset")?,
                    ..Default::default()
                };
                rec.graph(Entry::GraphColSum, &p, [Some(&self.slots[g]), None, None, None], &scratch, (blocks * slot.len) as u64)?;
                off += blocks * slot.len;
            }
            self.bindings.submit(self.ctx(), "gradient column sums", rec)?;
            let partials = read_f32(self.ctx(), &scratch, used)?;
            let mut off = 0;
            for &(g, at, blocks, _) in &plan[i..j] {
                let len = prog.slots[g].len;
                for (c, sum) in sums[at..at + len].iter_mut().enumerate() {
                    *sum += (0..blocks).map(|b| f64::from(partials[off + b * len + c])).sum::<f64>();
                }
                off += blocks * len;
            }
            i = j;
        }
        Ok(())
    }

    /// Σ_rows Σ_s x_s x_sᵀ ((features + bias)², row-major, f64) over every row of `slot`,
    /// whose rows hold `features` × `positions` values (x_s gets a trailing 1 with `bias`).
    fn gram(&mut self, slot: SlotId, features: usize, positions: usize, positions_last: bool, bias: bool) -> Result<Vec<f64>> {
        let ka = features + bias as usize;
        let mut out = vec![0f64; ka * ka];
        let rows = self.rows_of(self.prog.slots[slot].rows);
        if rows == 0 || ka == 0 {
            return Ok(out);
        }
        let limit = (self.be.binding_limit() / 4) as usize;
        let tiles = ka.div_ceil(4) * ka.div_ceil(4);
        let most = rows.min((limit / (ka * ka)).max(1));
        let blocks = (REDUCTION_PARALLELISM as usize).div_ceil(tiles).clamp(1, most);
        let per_block = rows.div_ceil(blocks);
        let blocks = rows.div_ceil(per_block);
        // Output rows per panel: the whole factor unless the partials would not fit a binding.
        let panel = (limit / (blocks * ka)).clamp(1, ka);
        let scratch = self.scratch(blocks * panel * ka)?;
        let mut flags = if positions_last { GRAPH_FLAG_POS_LAST } else { 0 };
        if bias {
            flags |= GRAPH_FLAG_BIAS;
        }
        let mut first = 0;
        while first < ka {
            let count = panel.min(ka - first);
            let p = GraphParams {
                rows: u32_of(rows, "rows")?,
                flags,
                groups: u32_of(blocks, "blocks")?,
                m: u32_of(features, "features")?,
                k: u32_of(positions, "positions")?,
                n: u32_of(ka, "factor size")?,
                // Rows per f32 run: about KB terms (positions per row) before a Kahan fold.
                code: u32_of((KAHAN_BLOCK as usize).div_ceil(positions.max(1)), "rows per run")?,
                dim: u32_of(per_block, "rows per block")?,
                off: u32_of(first, "panel start")?,
                count: u32_of(count, "panel rows")?,
                ..Default::default()
            };
            let mut rec = self.be.kernels().recorder();
            rec.graph(Entry::GraphGram, &p, [Some(&self.slots[slot]), None, None, None], &scratch, (blocks * count.div_ceil(4) * ka.div_ceil(4)) as u64)?;
            self.bindings.submit(self.ctx(), "KFAC factor", rec)?;
            let partials = read_f32(self.ctx(), &scratch, blocks * count * ka)?;
            for i in 0..count {
                for j in 0..ka {
                    out[(first + i) * ka + j] = (0..blocks).map(|b| f64::from(partials[b * count * ka + i * ka + j])).sum();
                }
            }
            first += count;
        }
        Ok(out)
    }
}

/// Checks token values against a vocabulary as [`super::exec::CpuExec`] does (same error).
fn check_tokens(values: &[f32], vocab: usize) -> Result<()> {
    values.iter().try_for_each(|&t| token_index(t, vocab).map(|_| ()))
}

fn upload_f32(ctx: &GpuContext, label: &str, data: &[f32]) -> wgpu::Buffer {
    let b = storage_f32(ctx, label, data.len());
    if !data.is_empty() {
        ctx.queue.write_buffer(&b, 0, bytemuck::cast_slice(data));
    }
    b
}

fn upload_u32(ctx: &GpuContext, label: &str, data: &[u32]) -> wgpu::Buffer {
    // Same size and usage as an f32 buffer; the shader reads it as array<u32>.
    let b = storage_f32(ctx, label, data.len());
    if !data.is_empty() {
        ctx.queue.write_buffer(&b, 0, bytemuck::cast_slice(data));
    }
    b
}

impl ProgramExec for GpuExec<'_> {
    fn label(&self) -> String {
        format!("gpu ({})", self.ctx().label())
    }

    fn max_slot_bytes(&self) -> u64 {
        self.be.binding_limit()
    }

    fn begin(&mut self, samples: usize, r: usize, which: crate::graph::prim::Backward) -> Result<()> {
        let r = r.max(1);
        let used = self.prog.draw_slots_used(which);
        let limit = self.be.binding_limit();
        let ctx = self.ctx();
        let too_large = || FisherError::InvalidInput("micro-batch too large".into());
        let mut sizes = Vec::with_capacity(self.prog.slots.len());
        for (k, slot) in self.prog.slots.iter().enumerate() {
            let rows = match slot.rows {
                Rows::Shared => {
                    sizes.push(None);
                    continue;
                }
                // Not touched by this reverse program: a minimal buffer keeps bindings valid.
                Rows::Draw if !used[k] => 0,
                Rows::Sample => samples,
                Rows::Draw => samples.checked_mul(r).ok_or_else(too_large)?,
            };
            let values = rows.checked_mul(slot.len).ok_or_else(too_large)?;
            let bytes = values as u64 * 4;
            if bytes > limit {
                return Err(crate::backend::gpu::does_not_fit(
                    format!("slot {} of a micro-batch of {samples} samples (R = {r})", slot.name),
                    bytes,
                    limit,
                    format!("max_storage_buffer_binding_size of {}", ctx.info.name),
                ));
            }
            sizes.push(Some(values));
        }
        let prog = Arc::clone(&self.prog);
        let fresh: Vec<Option<wgpu::Buffer>> = ctx.scoped("allocating micro-batch slots", || {
            sizes.iter().zip(&prog.slots).map(|(size, s)| size.map(|v| storage_f32(ctx, &s.name, v))).collect()
        })?;
        for (s, b) in fresh.into_iter().enumerate() {
            if let Some(b) = b {
                self.slots[s] = b;
            }
        }
        // The cached bind groups hold the old buffers.
        self.bindings = Bindings::default();
        self.samples = samples;
        self.capacity = samples;
        self.r = r;
        Ok(())
    }

    fn forward(&mut self, x: &[f32], samples: usize) -> Result<Vec<f32>> {
        let prog = Arc::clone(&self.prog);
        let len = prog.slots[prog.input].len;
        if samples > self.capacity || x.len() != samples * len {
            return Err(FisherError::InvalidInput(format!("a micro-batch of {samples} samples does not fit the executor")));
        }
        // Tokens read straight from the input are checked before anything runs.
        for &(_, vocab) in self.tokens.iter().filter(|(t, _)| *t == prog.input) {
            check_tokens(x, vocab)?;
        }
        self.samples = samples;
        if !x.is_empty() {
            self.ctx().queue.write_buffer(&self.slots[prog.input], 0, bytemuck::cast_slice(x));
        }
        self.run("graph forward", &prog.forward)?;
        // Tokens computed by the program are checked once they exist; the kernels never read
        // out of range meanwhile (an invalid token yields NaN, see graph.wgsl).
        for &(t, vocab) in self.tokens.iter().filter(|(t, _)| *t != prog.input) {
            check_tokens(&self.read_slot(t)?, vocab)?;
        }
        self.read_slot(prog.output)
    }

    fn backward(&mut self, rows: &[f32], which: crate::graph::prim::Backward) -> Result<()> {
        let prog = Arc::clone(&self.prog);
        let need = self.samples * self.r * prog.slots[prog.output_cot].len;
        if rows.len() != need {
            return Err(FisherError::InvalidInput(format!("{} output-row values for {need}", rows.len())));
        }
        if !rows.is_empty() {
            self.ctx().queue.write_buffer(&self.slots[prog.output_cot], 0, bytemuck::cast_slice(rows));
        }
        self.run("graph backward", prog.backward_of(which))
    }

    fn add_diag(&mut self, sums: &mut [f64]) -> Result<()> {
        self.column_sums(sums, true)
    }

    fn add_grad_sum(&mut self, sums: &mut [f64]) -> Result<()> {
        self.column_sums(sums, false)
    }

    fn param_grads(&mut self, out: &mut [f32]) -> Result<()> {
        let prog = Arc::clone(&self.prog);
        let rows = self.samples * self.r;
        let p: usize = prog.param_grads.iter().map(|&g| prog.slots[g].len).sum();
        if out.len() != rows * p {
            return Err(FisherError::InvalidInput(format!("{} values for {rows}×{p} gradient rows", out.len())));
        }
        let mut at = 0;
        for &g in &prog.param_grads {
            let len = prog.slots[g].len;
            if len > 0 {
                let data = self.read_slot(g)?;
                for (o, row) in out.chunks_mut(p).zip(data.chunks(len)) {
                    o[at..at + len].copy_from_slice(row);
                }
            }
            at += len;
        }
        Ok(())
    }

    fn add_kfac(&mut self, site: usize, a: &mut [f64], g: &mut [f64]) -> Result<()> {
        let s = self.prog.kfac.get(site).cloned().ok_or_else(|| FisherError::InvalidInput(format!("no KFAC site {site}")))?;
        let ka = s.fan_in + s.bias.is_some() as usize;
        if a.len() != ka * ka || g.len() != s.fan_out * s.fan_out {
            return Err(FisherError::InvalidInput(format!("KFAC site {}: factor buffers of {} and {} values for {ka}² and {}²", s.module, a.len(), g.len(), s.fan_out)));
        }
        let slots = &self.prog.slots;
        if slots[s.input].len != s.fan_in * s.positions || slots[s.output_cot].len != s.fan_out * s.positions {
            return Err(FisherError::InvalidInput(format!("KFAC site {}: slot lengths do not match its K, Cout and S", s.module)));
        }
        let aa = self.gram(s.input, s.fan_in, s.positions, s.positions_last, s.bias.is_some())?;
        let gg = self.gram(s.output_cot, s.fan_out, s.positions, s.positions_last, false)?;
        a.iter_mut().zip(aa).for_each(|(t, v)| *t += v);
        let scale = 1.0 / s.positions as f64;
        g.iter_mut().zip(gg).for_each(|(t, v)| *t += v * scale);
        Ok(())
    }

    fn tangent(&mut self, v: &[f32]) -> Result<Vec<f32>> {
        let prog = Arc::clone(&self.prog);
        let total: usize = prog.param_tangents.iter().map(|&t| prog.slots[t].len).sum();
        if v.len() != total {
            return Err(FisherError::InvalidInput(format!("direction has {} values; θ has {total}", v.len())));
        }
        let mut at = 0;
        for &t in &prog.param_tangents {
            let len = prog.slots[t].len;
            if len > 0 {
                self.ctx().queue.write_buffer(&self.slots[t], 0, bytemuck::cast_slice(&v[at..at + len]));
            }
            at += len;
        }
        self.run("graph tangent", &prog.tangent)?;
        self.read_slot(prog.output_tangent)
    }
}

#[cfg(test)]
mod tests {
    //! Every instruction and stage against [`CpuExec`] on seeded data, on small hand-written
    //! programs (awkward sizes, R = 3 for the row mapping, acc on and off). GPU policy as in
    //! `tests/common`: without an adapter a test prints `SKIPPED <name>: no GPU adapter` and
    //! passes, except under `FISHER_REQUIRE_GPU=1`.

    use std::sync::{Mutex, MutexGuard, OnceLock};

    use super::*;
    use crate::backend::gpu::GpuOptions;
    use crate::graph::exec::CpuExec;
    use crate::graph::prim::{KfacSite, MatDims, Slot, UnaryFn};
    use crate::synthetic::SplitMix64;
    use crate::verify::Tolerance;

    /// One backend for the whole test binary (pipelines are built once), one test at a time
    /// on it (the device is shared and a CPU adapter has no cores to spare).
    fn gpu(test: &str) -> Option<MutexGuard<'static, GpuBackend>> {
        static GPU: OnceLock<Option<Mutex<GpuBackend>>> = OnceLock::new();
        let be = GPU.get_or_init(|| {
            let required = std::env::var("FISHER_REQUIRE_GPU").is_ok_and(|v| v == "1");
            match GpuContext::new(&GpuOptions::default()) {
                Ok(ctx) => {
                    println!("graph::gpu tests on {}", ctx.label());
                    Some(Mutex::new(GpuBackend::new(ctx, &GpuOptions::default()).expect("GPU backend")))
                }
                Err(FisherError::NoAdapter(why)) if !required => {
                    println!("no GPU adapter: {why}");
                    None
                }
                Err(e) => panic!("GPU required (FISHER_REQUIRE_GPU=1) but unavailable: {e}"),
            }
        });
        match be {
            Some(m) => Some(m.lock().unwrap_or_else(|e| e.into_inner())),
            None => {
                println!("SKIPPED {test}: no GPU adapter");
                None
            }
        }
    }

    /// A hand-written program under construction.
    struct Builder {
        slots: Vec<Slot>,
        shared: Vec<(SlotId, Arc<Vec<f32>>)>,
        rng: SplitMix64,
    }

    impl Builder {
        fn new(seed: u64) -> Self {
            Builder { slots: Vec::new(), shared: Vec::new(), rng: SplitMix64::new(seed) }
        }

        fn slot(&mut self, name: &str, len: usize, rows: Rows) -> SlotId {
            self.slots.push(Slot { name: name.into(), len, rows });
            self.slots.len() - 1
        }

        /// A shared slot of random normal values.
        fn shared(&mut self, name: &str, len: usize) -> SlotId {
            let s = self.slot(name, len, Rows::Shared);
            let values = (0..len).map(|_| self.rng.normal() as f32).collect();
            self.shared.push((s, Arc::new(values)));
            s
        }

        /// A program with no parameters: forward from `input` to `output`, backward from
        /// `cot` (Draw, the output's length).
        fn program(self, input: SlotId, output: SlotId, cot: SlotId, forward: Vec<Inst>, backward: Vec<Inst>) -> Program {
            Program {
                slots: self.slots,
                shared: self.shared,
                input,
                output,
                params: vec![],
                forward,
                output_cot: cot,
                backward,
                param_grads: vec![],
                backward_kfac: vec![],
                param_tangents: vec![],
                tangent: vec![],
                output_tangent: output,
                kfac: vec![],
            }
        }
    }

    fn normal(rng: &mut SplitMix64, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.normal() as f32).collect()
    }

    /// Asserts |gpu − cpu| ≤ 2·(abs + rel·max|cpu|) (both sides carry an f32 error of `tol`)
    /// and returns max|Δ| / max|cpu|.
    #[track_caller]
    fn compare(what: &str, gpu: &[f32], cpu: &[f32], tol: Tolerance) -> f64 {
        assert_eq!(gpu.len(), cpu.len(), "{what}: lengths");
        let scale = cpu.iter().fold(0f64, |m, &v| m.max(f64::from(v).abs()));
        let bound = 2.0 * (tol.abs + tol.rel * scale);
        let mut worst = (0, 0f64);
        for (i, (&g, &c)) in gpu.iter().zip(cpu).enumerate() {
            let err = if c.is_nan() && g.is_nan() { 0.0 } else { (f64::from(g) - f64::from(c)).abs() };
            let err = if err.is_nan() { f64::INFINITY } else { err };
            if err > worst.1 {
                worst = (i, err);
            }
        }
        let (i, err) = worst;
        assert!(err <= bound, "{what}: |Δ| = {err:e} at {i} (gpu {}, cpu {}) exceeds {bound:e} (max|cpu| {scale:e})", gpu[i], cpu[i]);
        let rel = err / scale.max(f64::MIN_POSITIVE);
        println!("{what}: max|Δ|/max|cpu| = {rel:.2e} ({} values, max|cpu| {scale:.2e}, bound {:.2e})", cpu.len(), bound / scale.max(f64::MIN_POSITIVE));
        rel
    }

    /// Both executors on `prog`, after begin, forward on `x` (random when `None`) and, when the
    /// program has a backward part, backward on random output rows.
    fn run_both<'a>(be: &'a GpuBackend, prog: Program, samples: usize, r: usize, x: Option<Vec<f32>>, seed: u64) -> (CpuExec, GpuExec<'a>) {
        let prog = Arc::new(prog);
        let mut rng = SplitMix64::new(seed);
        let mut cpu = CpuExec::new(Arc::clone(&prog));
        let mut gpu = GpuExec::new(be, Arc::clone(&prog)).expect("GpuExec::new");
        cpu.begin(samples, r, crate::graph::prim::Backward::Full).unwrap();
        gpu.begin(samples, r, crate::graph::prim::Backward::Full).unwrap();
        let x = x.unwrap_or_else(|| normal(&mut rng, samples * prog.slots[prog.input].len));
        let zc = cpu.forward(&x, samples).unwrap();
        let zg = gpu.forward(&x, samples).unwrap();
        assert_eq!(zc.len(), zg.len());
        if !prog.backward.is_empty() {
            let rows = normal(&mut rng, samples * r * prog.slots[prog.output_cot].len);
            cpu.backward(&rows, crate::graph::prim::Backward::Full).unwrap();
            gpu.backward(&rows, crate::graph::prim::Backward::Full).unwrap();
        }
        (cpu, gpu)
    }

    #[track_caller]
    fn compare_slot(cpu: &CpuExec, gpu: &GpuExec<'_>, s: SlotId, terms: usize) -> f64 {
        let name = gpu.prog.slots[s].name.clone();
        compare(&name, &gpu.read_slot(s).unwrap(), cpu.slot(s), Tolerance::for_sum(terms))
    }

    /// A CSR of `rows` rows over `src` inputs with 0–3 random entries each (weighted or not).
    fn random_csr(rng: &mut SplitMix64, rows: usize, src: usize, weighted: bool) -> Csr {
        let rows: Vec<Vec<(usize, f32)>> = (0..rows)
            .map(|_| (0..rng.below(4)).map(|_| (rng.below(src as u64) as usize, if weighted { rng.normal() as f32 } else { 1.0 })).collect())
            .collect();
        Csr::from_rows(&rows, src)
    }

    #[test]
    fn sparse_matches_cpu() {
        let Some(be) = gpu("graph::gpu::sparse_matches_cpu") else { return };
        let mut b = Builder::new(1);
        let mut rng = SplitMix64::new(11);
        let (nin, c) = (13, 7);
        let x = b.slot("x", nin, Rows::Sample);
        let w = b.shared("w", nin);
        let y = b.slot("y", c, Rows::Sample);
        let cot = b.slot("y.cot", c, Rows::Draw);
        let dx = b.slot("x.cot", nin, Rows::Draw);
        let fwd_map = Arc::new(random_csr(&mut rng, c, nin, true));
        let forward = vec![
            Inst::Sparse { dst: y, src: x, map: Arc::clone(&fwd_map), acc: false },
            // A shared operand, unweighted, accumulated.
            Inst::Sparse { dst: y, src: w, map: Arc::new(random_csr(&mut rng, c, nin, false)), acc: true },
        ];
        let backward = vec![
            Inst::Sparse { dst: dx, src: cot, map: Arc::new(fwd_map.transpose()), acc: false },
            // A Sample operand of a Draw destination: row ⌊r/R⌋.
            Inst::Sparse { dst: dx, src: x, map: Arc::new(random_csr(&mut rng, nin, nin, true)), acc: true },
        ];
        let prog = b.program(x, y, cot, forward, backward);
        let (cpu, gpu) = run_both(&be, prog, 5, 3, None, 2);
        compare_slot(&cpu, &gpu, y, 6);
        compare_slot(&cpu, &gpu, dx, 6);
    }

    /// Matrix products over every operand class combination, transposes and groups.
    #[test]
    fn matmul_matches_cpu() {
        let Some(be) = gpu("graph::gpu::matmul_matches_cpu") else { return };
        for (case, &(groups, m, k, n)) in [(1, 5, 7, 3), (3, 2, 9, 5), (1, 1, 4, 1), (2, 6, 1, 4), (1, 4, 0, 3)].iter().enumerate() {
            for t in 0..4 {
                let (ta, tb) = (t & 1 == 1, t & 2 == 2);
                let dims = MatDims { groups, m, k, n, ta, tb };
                let mut b = Builder::new(100 + case as u64);
                let (alen, blen, ylen) = (groups * m * k, groups * k * n, groups * m * n);
                // One spare value: CpuExec refuses an empty input row.
                let x = b.slot("x", alen + blen + 1, Rows::Sample);
                let a_sample = b.slot("a", alen, Rows::Sample);
                let b_sample = b.slot("b", blen, Rows::Sample);
                let a_shared = b.shared("A", alen);
                let b_shared = b.shared("B", blen);
                let y1 = b.slot("y1 (sample·shared)", ylen, Rows::Sample);
                let y2 = b.slot("y2 (shared·sample)", ylen, Rows::Sample);
                let y3 = b.slot("y3 (sample·sample)", ylen, Rows::Sample);
                let out = b.slot("out", 1, Rows::Sample);
                let cot = b.slot("out.cot", 1, Rows::Draw);
                let a_draw = b.slot("a.draw", alen, Rows::Draw);
                let y4 = b.slot("y4 (draw·sample)", ylen, Rows::Draw);
                let y5 = b.slot("y5 (sample·shared → draw)", ylen, Rows::Draw);
                let split = |len, at| Arc::new(Csr::gather(&(0..len).map(|i| Some(at + i)).collect::<Vec<_>>(), alen + blen + 1));
                let forward = vec![
                    Inst::Sparse { dst: a_sample, src: x, map: split(alen, 0), acc: false },
                    Inst::Sparse { dst: b_sample, src: x, map: split(blen, alen), acc: false },
                    Inst::MatMul { dst: y1, a: a_sample, b: b_shared, dims, acc: false },
                    Inst::MatMul { dst: y2, a: a_shared, b: b_sample, dims, acc: false },
                    Inst::MatMul { dst: y3, a: a_sample, b: b_sample, dims, acc: false },
                    Inst::MatMul { dst: y3, a: a_shared, b: b_shared, dims, acc: true },
                ];
                // a per draw row: the cotangent broadcast over A's values, times a.
                let backward = vec![
                    Inst::Sparse { dst: a_draw, src: cot, map: Arc::new(Csr::gather(&vec![Some(0); alen], 1)), acc: false },
                    Inst::Binary { dst: a_draw, a: a_sample, b: a_shared, f: BinFn::Mul, acc: true },
                    Inst::MatMul { dst: y4, a: a_draw, b: b_sample, dims, acc: false },
                    Inst::MatMul { dst: y5, a: a_sample, b: b_shared, dims, acc: false },
                    Inst::MatMul { dst: y5, a: a_draw, b: b_shared, dims, acc: true },
                ];
                let prog = b.program(x, out, cot, forward, backward);
                let (cpu, gpu) = run_both(&be, prog, 5, 3, None, 7 + t as u64);
                for y in [y1, y2, y3, y4, y5] {
                    compare_slot(&cpu, &gpu, y, k.max(1) * 2);
                }
            }
        }
    }

    /// A product large enough for many workgroups, rows stacked along m and along n.
    #[test]
    fn large_matmul_matches_cpu() {
        let Some(be) = gpu("graph::gpu::large_matmul_matches_cpu") else { return };
        let (m, k, n) = (37, 129, 70);
        let mut b = Builder::new(3);
        let x = b.slot("x", m * k, Rows::Sample);
        let w = b.shared("w", k * n);
        let v = b.shared("v", n * k);
        let y = b.slot("y = x·w", m * n, Rows::Sample);
        let z = b.slot("z = vᵀ·xᵀ… per sample", n * m, Rows::Sample);
        let g = b.slot("xᵀx per sample", k * k, Rows::Sample);
        let out = b.slot("out", 1, Rows::Sample);
        let cot = b.slot("cot", 1, Rows::Draw);
        let forward = vec![
            Inst::MatMul { dst: y, a: x, b: w, dims: MatDims { groups: 1, m, k, n, ta: false, tb: false }, acc: false },
            // Shared A (v stored n×k), per-sample B = xᵀ (x stored m×k, read transposed).
            Inst::MatMul { dst: z, a: v, b: x, dims: MatDims { groups: 1, m: n, k, n: m, ta: false, tb: true }, acc: false },
            // Both operands per sample (no stacking): the Gram xᵀx, k×k over m.
            Inst::MatMul { dst: g, a: x, b: x, dims: MatDims { groups: 1, m: k, k: m, n: k, ta: true, tb: false }, acc: false },
        ];
        let prog = b.program(x, out, cot, forward, vec![]);
        let (cpu, gpu) = run_both(&be, prog, 9, 1, None, 4);
        compare_slot(&cpu, &gpu, y, k);
        compare_slot(&cpu, &gpu, z, k);
        compare_slot(&cpu, &gpu, g, m);
    }

    fn all_unary() -> Vec<UnaryFn> {
        use UnaryFn::*;
        vec![
            Relu, LeakyRelu(0.1), Tanh, Sigmoid, Gelu, GeluTanh, Erf, Softplus, Sqrt, Rsqrt, Reciprocal, Exp, Square, Affine(1.5, -2.0),
            Step, LeakyStep(0.2), TanhDeriv, SigmoidDeriv, GeluDeriv, GeluTanhDeriv, ErfDeriv, SqrtDeriv, RsqrtDeriv, ReciprocalDeriv,
        ]
    }

    #[test]
    fn every_unary_matches_cpu() {
        let Some(be) = gpu("graph::gpu::every_unary_matches_cpu") else { return };
        let len = 211;
        let mut b = Builder::new(5);
        let x = b.slot("x", len, Rows::Sample);
        let x2 = b.slot("x²", len, Rows::Sample);
        let pos = b.slot("x² + 0.1", len, Rows::Sample);
        let out = b.slot("out", len, Rows::Sample);
        let cot = b.slot("cot", len, Rows::Draw);
        let mut forward = vec![
            Inst::Unary { dst: x2, src: x, f: UnaryFn::Square },
            Inst::Unary { dst: pos, src: x2, f: UnaryFn::Affine(1.0, 0.1) },
            Inst::Unary { dst: out, src: x, f: UnaryFn::Relu },
        ];
        let mut outs = Vec::new();
        for f in all_unary() {
            let positive = matches!(f, UnaryFn::Sqrt | UnaryFn::Rsqrt | UnaryFn::SqrtDeriv | UnaryFn::RsqrtDeriv);
            let y = b.slot(&format!("{f:?}"), len, Rows::Sample);
            forward.push(Inst::Unary { dst: y, src: if positive { pos } else { x }, f });
            outs.push((f, y));
        }
        // A Draw destination of a Sample source (row ⌊r/R⌋) and a Shared one.
        let yd = b.slot("tanh → draw", len, Rows::Draw);
        let w = b.shared("w", len);
        let ys = b.slot("tanh(shared) → draw", len, Rows::Draw);
        let backward = vec![Inst::Unary { dst: yd, src: x, f: UnaryFn::Tanh }, Inst::Unary { dst: ys, src: w, f: UnaryFn::Tanh }];
        let prog = b.program(x, out, cot, forward, backward);
        // Inputs spread over ±4 so that the tails of erf, tanh and the sigmoid are exercised.
        let mut rng = SplitMix64::new(6);
        let samples = 4;
        let xs: Vec<f32> = (0..samples * len).map(|_| (rng.normal() * 2.0) as f32).collect();
        let (cpu, gpu) = run_both(&be, prog, samples, 3, Some(xs), 7);
        for (f, y) in outs {
            let (g, c) = (gpu.read_slot(y).unwrap(), cpu.slot(y).to_vec());
            // Element-wise: a few ulp of the value (transcendentals differ by an ulp or two
            // between libm and the driver), plus 2e-7·(1 + x²) absolute where f cancels:
            // x·(1 + tanh u) and x·(1 − tanh²u)·u' for u near −∞ turn an ulp of tanh into
            // up to |x|·|u'| ulps of the result.
            let src = cpu.slot(if matches!(f, UnaryFn::Sqrt | UnaryFn::Rsqrt | UnaryFn::SqrtDeriv | UnaryFn::RsqrtDeriv) { pos } else { x });
            let mut worst = 0f64;
            for (i, (&gv, &cv)) in g.iter().zip(&c).enumerate() {
                let err = (f64::from(gv) - f64::from(cv)).abs();
                let bound = 2e-7 * (1.0 + f64::from(src[i]).powi(2)) + 8.0 * crate::verify::F32_UNIT_ROUNDOFF * f64::from(cv).abs();
                assert!(err <= bound, "{f:?}({}): gpu {gv} cpu {cv}", src[i]);
                worst = worst.max(err / (1.0 + f64::from(cv).abs()));
            }
            println!("{f:?}: max|Δ|/(1+|cpu|) = {worst:.2e}");
        }
        compare_slot(&cpu, &gpu, yd, 1);
        compare_slot(&cpu, &gpu, ys, 1);
    }

    /// erf against libm's erff on a dense grid over [−6, 6] (the GPU has no erf of its own).
    #[test]
    fn erf_is_within_2e7_of_libm() {
        let Some(be) = gpu("graph::gpu::erf_is_within_2e7_of_libm") else { return };
        let n = 24_001;
        let xs: Vec<f32> = (0..n).map(|i| -6.0 + 12.0 * i as f32 / (n - 1) as f32).collect();
        let mut b = Builder::new(8);
        let x = b.slot("x", n, Rows::Sample);
        let y = b.slot("erf", n, Rows::Sample);
        let cot = b.slot("cot", n, Rows::Draw);
        let prog = b.program(x, y, cot, vec![Inst::Unary { dst: y, src: x, f: UnaryFn::Erf }], vec![]);
        let (_, gpu) = run_both(&be, prog, 1, 1, Some(xs.clone()), 9);
        let g = gpu.read_slot(y).unwrap();
        let worst = xs.iter().zip(&g).map(|(&x, &g)| (f64::from(g) - f64::from(libm::erff(x))).abs()).fold(0f64, f64::max);
        println!("erf: max |gpu − libm| = {worst:.2e}");
        assert!(worst < 2e-7, "erf: max |gpu − libm erff| = {worst:e}");
    }

    #[test]
    fn binary_and_zero_match_cpu() {
        let Some(be) = gpu("graph::gpu::binary_and_zero_match_cpu") else { return };
        let len = 17;
        let mut b = Builder::new(9);
        let x = b.slot("x", len, Rows::Sample);
        let w = b.shared("w", len);
        let out = b.slot("out", len, Rows::Sample);
        let cot = b.slot("cot", len, Rows::Draw);
        let mut forward = vec![Inst::Unary { dst: out, src: x, f: UnaryFn::Exp }];
        let mut backward = vec![];
        let mut checks = vec![];
        for (i, f) in [BinFn::Add, BinFn::Sub, BinFn::Mul, BinFn::Div].into_iter().enumerate() {
            for acc in [false, true] {
                let ys = b.slot(&format!("{f:?} acc={acc} sample∘shared"), len, Rows::Sample);
                forward.push(Inst::Unary { dst: ys, src: x, f: UnaryFn::Affine(1.0, i as f32) });
                forward.push(Inst::Binary { dst: ys, a: x, b: w, f, acc });
                let yd = b.slot(&format!("{f:?} acc={acc} draw∘sample"), len, Rows::Draw);
                backward.push(Inst::Zero { dst: yd });
                backward.push(Inst::Binary { dst: yd, a: cot, b: out, f, acc: true });
                backward.push(Inst::Binary { dst: yd, a: x, b: cot, f, acc });
                checks.extend([ys, yd]);
            }
        }
        let prog = b.program(x, out, cot, forward, backward);
        let (cpu, gpu) = run_both(&be, prog, 6, 3, None, 10);
        for s in checks {
            // Division by values near 0 makes single entries large; the relative scale holds.
            compare_slot(&cpu, &gpu, s, 2);
        }
    }

    #[test]
    fn argmax_gather_scatter_match_cpu() {
        let Some(be) = gpu("graph::gpu::argmax_gather_scatter_match_cpu") else { return };
        // Overlapping windows of 3 with stride 2 over 13 values (6 windows), as a max pool.
        let (len, windows) = (13, 6);
        let win = Arc::new(Csr::from_rows(&(0..windows).map(|j| (2 * j..2 * j + 3).map(|i| (i, 1.0)).collect()).collect::<Vec<_>>(), len));
        let cand = Arc::new(win.transpose());
        let mut b = Builder::new(12);
        let x = b.slot("x", len, Rows::Sample);
        let idx = b.slot("argmax", windows, Rows::Sample);
        let y = b.slot("y", windows, Rows::Sample);
        let cot = b.slot("y.cot", windows, Rows::Draw);
        let dx = b.slot("x.cot", len, Rows::Draw);
        let g2 = b.slot("gather → draw", windows, Rows::Draw);
        let forward = vec![Inst::ArgMax { dst: idx, src: x, windows: Arc::clone(&win) }, Inst::GatherDyn { dst: y, src: x, idx, acc: false }];
        let backward = vec![
            Inst::ScatterDyn { dst: dx, src: cot, idx, candidates: Arc::clone(&cand), acc: false },
            Inst::ScatterDyn { dst: dx, src: cot, idx, candidates: Arc::clone(&cand), acc: true },
            Inst::GatherDyn { dst: g2, src: dx, idx, acc: false },
            Inst::GatherDyn { dst: g2, src: x, idx, acc: true },
        ];
        let prog = b.program(x, y, cot, forward, backward);
        // Values on a coarse grid, so that windows hold ties (the first index must win).
        let mut rng = SplitMix64::new(13);
        let samples = 7;
        let xs: Vec<f32> = (0..samples * len).map(|_| (rng.below(4) as f32) * 0.5).collect();
        let (cpu, gpu) = run_both(&be, prog, samples, 3, Some(xs), 14);
        assert_eq!(gpu.read_slot(idx).unwrap(), cpu.slot(idx), "argmax indices");
        compare_slot(&cpu, &gpu, y, 1);
        compare_slot(&cpu, &gpu, dx, 4);
        compare_slot(&cpu, &gpu, g2, 2);
    }

    #[test]
    fn embeddings_match_cpu() {
        let Some(be) = gpu("graph::gpu::embeddings_match_cpu") else { return };
        let (tokens, vocab, dim) = (9, 5, 6);
        let mut b = Builder::new(15);
        let tok = b.slot("tokens", tokens, Rows::Sample);
        let table = b.shared("table", vocab * dim);
        let e = b.slot("e", tokens * dim, Rows::Sample);
        let cot = b.slot("e.cot", tokens * dim, Rows::Draw);
        let gt = b.slot("table.grad", vocab * dim, Rows::Draw);
        let gs = b.slot("table.grad (sample)", vocab * dim, Rows::Sample);
        let forward = vec![
            Inst::Embed { dst: e, table, tokens: tok, dim },
            Inst::EmbedBack { dst: gs, src: e, tokens: tok, dim, acc: false },
            Inst::EmbedBack { dst: gs, src: e, tokens: tok, dim, acc: true },
        ];
        let backward = vec![
            Inst::EmbedBack { dst: gt, src: cot, tokens: tok, dim, acc: false },
            // A Sample source of a Draw destination, accumulated.
            Inst::EmbedBack { dst: gt, src: e, tokens: tok, dim, acc: true },
        ];
        let prog = b.program(tok, e, cot, forward, backward);
        let mut rng = SplitMix64::new(16);
        let samples = 5;
        // Repeated tokens within a sample, so that the gradient sums collide.
        let xs: Vec<f32> = (0..samples * tokens).map(|_| rng.below(vocab as u64) as f32).collect();
        let (cpu, gpu) = run_both(&be, prog.clone(), samples, 3, Some(xs), 17);
        compare_slot(&cpu, &gpu, e, 1);
        compare_slot(&cpu, &gpu, gs, tokens);
        compare_slot(&cpu, &gpu, gt, tokens);
        // A token outside the table is refused before the run.
        let mut gpu = GpuExec::new(&be, Arc::new(prog)).unwrap();
        gpu.begin(1, 1, crate::graph::prim::Backward::Full).unwrap();
        let mut bad = vec![0f32; tokens];
        bad[3] = vocab as f32;
        assert!(matches!(gpu.forward(&bad, 1), Err(FisherError::InvalidInput(_))));
        bad[3] = 1.5;
        assert!(matches!(gpu.forward(&bad, 1), Err(FisherError::InvalidInput(_))));
    }

    /// More than 65,535 workgroups (the 2-D grid) and more than 65,536 rows in one dispatch.
    #[test]
    fn dispatch_beyond_65535_workgroups() {
        let Some(be) = gpu("graph::gpu::dispatch_beyond_65535_workgroups") else { return };
        let wg = be.kernels().wg() as usize;
        let len = 4;
        let samples = (65_536 * wg).div_ceil(len) + 17;
        let mut b = Builder::new(18);
        let x = b.slot("x", len, Rows::Sample);
        let y = b.slot("y", len, Rows::Sample);
        let cot = b.slot("cot", len, Rows::Draw);
        let w = b.shared("w", len);
        let forward = vec![Inst::Binary { dst: y, a: x, b: w, f: BinFn::Mul, acc: false }];
        let prog = b.program(x, y, cot, forward, vec![]);
        let xs: Vec<f32> = (0..samples * len).map(|i| (i % 1013) as f32).collect();
        let (cpu, gpu) = run_both(&be, prog, samples, 1, Some(xs), 19);
        let (g, c) = (gpu.read_slot(y).unwrap(), cpu.slot(y));
        assert!(g == c, "element-wise product differs beyond 65,535 workgroups");
    }

    /// A linear layer on S positions with a bias, a tanh and a mean over positions, written
    /// the two ways the lowering stores positions (S×K rows: MatMul; K×S: convolution
    /// columns), with its reverse- and forward-mode programs and one KFAC site.
    fn layer_program(s: usize, k: usize, cout: usize, positions_last: bool, bias: bool, seed: u64) -> Program {
        let mut b = Builder::new(seed);
        let x = b.slot("x", s * k, Rows::Sample);
        let w = b.shared("w", cout * k);
        let bb = b.shared("b", cout);
        let z = b.slot("z", s * cout, Rows::Sample);
        let h = b.slot("h", s * cout, Rows::Sample);
        let dh_dz = b.slot("tanh'(z)", s * cout, Rows::Sample);
        let out = b.slot("out", cout, Rows::Sample);
        let cot = b.slot("out.cot", cout, Rows::Draw);
        let dh = b.slot("h.cot", s * cout, Rows::Draw);
        let dz = b.slot("z.cot", s * cout, Rows::Draw);
        let gw = b.slot("w.grad", cout * k, Rows::Draw);
        let gb = b.slot("b.grad", cout, Rows::Draw);
        let vw = b.slot("w.tan", cout * k, Rows::Shared);
        let vb = b.slot("b.tan", cout, Rows::Shared);
        let zt = b.slot("z.tan", s * cout, Rows::Sample);
        let ot = b.slot("out.tan", cout, Rows::Sample);
        // Position-major (s, c) or feature-major (c, s) index of z.
        let zi = |si: usize, c: usize| if positions_last { c * s + si } else { si * cout + c };
        let broadcast = Arc::new(Csr::from_rows(&(0..s * cout).map(|i| {
            let c = if positions_last { i / s } else { i % cout };
            vec![(c, 1.0)]
        }).collect::<Vec<_>>(), cout));
        let mean = Arc::new(Csr::from_rows(&(0..cout).map(|c| (0..s).map(|si| (zi(si, c), 1.0 / s as f32)).collect()).collect::<Vec<_>>(), s * cout));
        let bsum = Arc::new(broadcast.transpose());
        // z = x·wᵀ (x: S×K, w: Cout×K) or w·x (x: K×S), and the weight gradient dz ⊗ x.
        let (tw, gwd) = if positions_last {
            (MatDims { groups: 1, m: cout, k, n: s, ta: false, tb: false }, MatDims { groups: 1, m: cout, k: s, n: k, ta: false, tb: true })
        } else {
            (MatDims { groups: 1, m: s, k, n: cout, ta: false, tb: true }, MatDims { groups: 1, m: cout, k: s, n: k, ta: true, tb: false })
        };
        let product = |dst, weight, acc| {
            if positions_last {
                Inst::MatMul { dst, a: weight, b: x, dims: tw, acc }
            } else {
                Inst::MatMul { dst, a: x, b: weight, dims: tw, acc }
            }
        };
        let ht = b.slot("h.tan", s * cout, Rows::Sample);
        let mut forward = vec![product(z, w, false)];
        let mut tangent = vec![product(zt, vw, false)];
        if bias {
            forward.push(Inst::Sparse { dst: z, src: bb, map: Arc::clone(&broadcast), acc: true });
            tangent.push(Inst::Sparse { dst: zt, src: vb, map: Arc::clone(&broadcast), acc: true });
        }
        forward.extend([
            Inst::Unary { dst: h, src: z, f: UnaryFn::Tanh },
            Inst::Unary { dst: dh_dz, src: z, f: UnaryFn::TanhDeriv },
            Inst::Sparse { dst: out, src: h, map: Arc::clone(&mean), acc: false },
        ]);
        tangent.extend([
            Inst::Binary { dst: ht, a: zt, b: dh_dz, f: BinFn::Mul, acc: false },
            Inst::Sparse { dst: ot, src: ht, map: Arc::clone(&mean), acc: false },
        ]);
        let mut backward = vec![
            Inst::Sparse { dst: dh, src: cot, map: Arc::new(mean.transpose()), acc: false },
            Inst::Binary { dst: dz, a: dh, b: dh_dz, f: BinFn::Mul, acc: false },
            Inst::MatMul { dst: gw, a: dz, b: x, dims: gwd, acc: false },
        ];
        let mut params = vec![w];
        let mut grads = vec![gw];
        let mut tangents = vec![vw];
        if bias {
            backward.push(Inst::Sparse { dst: gb, src: dz, map: bsum, acc: false });
            params.push(bb);
            grads.push(gb);
            tangents.push(vb);
        }
        let kfac = vec![KfacSite {
            module: "layer".into(),
            weight: 0,
            bias: bias.then_some(1),
            input: x,
            output_cot: dz,
            fan_in: k,
            fan_out: cout,
            positions: s,
            positions_last,
        }];
        let mut prog = b.program(x, out, cot, forward, backward);
        prog.params = params;
        prog.param_grads = grads;
        prog.param_tangents = tangents;
        prog.tangent = tangent;
        prog.output_tangent = ot;
        prog.kfac = kfac;
        prog
    }

    #[test]
    fn reductions_and_tangent_match_cpu() {
        let Some(be) = gpu("graph::gpu::reductions_and_tangent_match_cpu") else { return };
        for (case, &(positions_last, bias)) in [(false, true), (true, true), (false, false), (true, false)].iter().enumerate() {
            let (s, k, cout, samples, r) = (5, 11, 6, 9, 3);
            let prog = layer_program(s, k, cout, positions_last, bias, 20 + case as u64);
            let (mut cpu, mut gpu) = run_both(&be, prog.clone(), samples, r, None, 30 + case as u64);
            let tag = format!("positions_last={positions_last} bias={bias}");
            let p: usize = prog.param_grads.iter().map(|&g| prog.slots[g].len).sum();
            let rows = samples * r;
            let (mut gc, mut gg) = (vec![0f32; rows * p], vec![0f32; rows * p]);
            cpu.param_grads(&mut gc).unwrap();
            gpu.param_grads(&mut gg).unwrap();
            compare(&format!("param_grads {tag}"), &gg, &gc, Tolerance::for_sum(s));
            for (what, square) in [("add_diag", true), ("add_grad_sum", false)] {
                // Start from non-zero sums: the stages add.
                let (mut dc, mut dg) = (vec![1.0f64; p], vec![1.0f64; p]);
                if square {
                    cpu.add_diag(&mut dc).unwrap();
                    gpu.add_diag(&mut dg).unwrap();
                } else {
                    cpu.add_grad_sum(&mut dc).unwrap();
                    gpu.add_grad_sum(&mut dg).unwrap();
                }
                let (dc, dg): (Vec<f32>, Vec<f32>) = (dc.iter().map(|&v| v as f32).collect(), dg.iter().map(|&v| v as f32).collect());
                compare(&format!("{what} {tag}"), &dg, &dc, Tolerance::for_sum(rows * s));
            }
            let ka = k + bias as usize;
            let (mut ac, mut ag) = (vec![0.5f64; ka * ka], vec![0.5f64; ka * ka]);
            let (mut gcf, mut ggf) = (vec![0.25f64; cout * cout], vec![0.25f64; cout * cout]);
            cpu.add_kfac(0, &mut ac, &mut gcf).unwrap();
            gpu.add_kfac(0, &mut ag, &mut ggf).unwrap();
            let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<_>>();
            compare(&format!("kfac A {tag}"), &f32s(&ag), &f32s(&ac), Tolerance::for_sum(samples * s));
            compare(&format!("kfac G {tag}"), &f32s(&ggf), &f32s(&gcf), Tolerance::for_sum(rows * s));
            let mut rng = SplitMix64::new(40 + case as u64);
            let v = normal(&mut rng, p);
            let (tc, tg) = (cpu.tangent(&v).unwrap(), gpu.tangent(&v).unwrap());
            compare(&format!("tangent {tag}"), &tg, &tc, Tolerance::for_sum(k));
        }
    }

    /// Reductions over many rows: several row blocks, and KFAC factors with several 4×4 tiles.
    #[test]
    fn reductions_over_many_rows_match_cpu() {
        let Some(be) = gpu("graph::gpu::reductions_over_many_rows_match_cpu") else { return };
        let (s, k, cout, samples, r) = (3, 23, 9, 700, 4);
        let prog = layer_program(s, k, cout, false, true, 50);
        let (mut cpu, mut gpu) = run_both(&be, prog.clone(), samples, r, None, 51);
        let p: usize = prog.param_grads.iter().map(|&g| prog.slots[g].len).sum();
        let (mut dc, mut dg) = (vec![0f64; p], vec![0f64; p]);
        cpu.add_diag(&mut dc).unwrap();
        gpu.add_diag(&mut dg).unwrap();
        let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<_>>();
        compare("add_diag, 2800 rows", &f32s(&dg), &f32s(&dc), Tolerance::for_sum(samples * r));
        let (mut ac, mut ag) = (vec![0f64; (k + 1) * (k + 1)], vec![0f64; (k + 1) * (k + 1)]);
        let (mut gc, mut gg) = (vec![0f64; cout * cout], vec![0f64; cout * cout]);
        cpu.add_kfac(0, &mut ac, &mut gc).unwrap();
        gpu.add_kfac(0, &mut ag, &mut gg).unwrap();
        compare("kfac A, 700 samples", &f32s(&ag), &f32s(&ac), Tolerance::for_sum(samples * s));
        compare("kfac G, 2800 rows", &f32s(&gg), &f32s(&gc), Tolerance::for_sum(samples * r * s));
    }

    #[test]
    fn oversized_slots_do_not_fit() {
        let Some(be) = gpu("graph::gpu::oversized_slots_do_not_fit") else { return };
        let too_many = (be.binding_limit() / 4 + 1) as usize;
        // A shared slot beyond the binding limit is refused at construction, before any
        // allocation.
        let mut b = Builder::new(60);
        let x = b.slot("x", 1, Rows::Sample);
        let big = b.slot("huge table", too_many, Rows::Shared);
        let y = b.slot("y", 1, Rows::Sample);
        let cot = b.slot("cot", 1, Rows::Draw);
        let _ = big;
        let prog = b.program(x, y, cot, vec![Inst::Unary { dst: y, src: x, f: UnaryFn::Relu }], vec![]);
        assert!(matches!(GpuExec::new(&be, Arc::new(prog)), Err(FisherError::DoesNotFit { .. })));
        // A micro-batch whose per-sample slot exceeds it is refused by begin.
        let mut b = Builder::new(61);
        let x = b.slot("x", 4, Rows::Sample);
        let y = b.slot("y", 4, Rows::Sample);
        let cot = b.slot("cot", 4, Rows::Draw);
        let prog = b.program(x, y, cot, vec![Inst::Unary { dst: y, src: x, f: UnaryFn::Relu }], vec![]);
        let mut gpu = GpuExec::new(&be, Arc::new(prog)).unwrap();
        assert!(matches!(gpu.begin(too_many / 4 + 1, 1, crate::graph::prim::Backward::Full), Err(FisherError::DoesNotFit { .. })));
        assert!(matches!(gpu.begin(too_many / 16, 5, crate::graph::prim::Backward::Full), Err(FisherError::DoesNotFit { .. })));
        gpu.begin(3, 5, crate::graph::prim::Backward::Full).unwrap();
        assert!(matches!(gpu.forward(&[0.0; 16], 4), Err(FisherError::InvalidInput(_))));
    }

    /// Throughput of `g_matmul` in its three modes (`cargo test --lib graph::gpu::tests::
    /// matmul_throughput -- --ignored --nocapture`); not an assertion.
    #[test]
    #[ignore]
    fn matmul_throughput() {
        let Some(be) = gpu("graph::gpu::matmul_throughput") else { return };
        // (label, samples, dims, A per sample, B per sample)
        let cases = [
            ("x·Wᵀ, rows stacked along m (Linear)", 256, MatDims { groups: 1, m: 1, k: 512, n: 512, ta: false, tb: true }, true, false),
            ("W·X, rows stacked along n (conv)", 16, MatDims { groups: 1, m: 64, k: 288, n: 256, ta: false, tb: false }, false, true),
            ("δᵀ·X per row (weight gradient)", 64, MatDims { groups: 1, m: 64, k: 64, n: 128, ta: true, tb: false }, true, true),
            ("the same with k = 4 (fixed costs)", 64, MatDims { groups: 1, m: 64, k: 4, n: 128, ta: true, tb: false }, true, true),
        ];
        for (label, samples, dims, a_per, b_per) in cases {
            let mut b = Builder::new(70);
            let (alen, blen) = (dims.m * dims.k, dims.k * dims.n);
            let x = b.slot("x", 1, Rows::Sample);
            let a = if a_per { b.slot("a", alen, Rows::Sample) } else { b.shared("a", alen) };
            let bb = if b_per { b.slot("b", blen, Rows::Sample) } else { b.shared("b", blen) };
            let y = b.slot("y", dims.m * dims.n, Rows::Sample);
            let cot = b.slot("cot", 1, Rows::Draw);
            let prog = Arc::new(b.program(x, x, cot, vec![Inst::MatMul { dst: y, a, b: bb, dims, acc: false }], vec![]));
            let mut gpu = GpuExec::new(&be, prog).unwrap();
            gpu.begin(samples, 1, crate::graph::prim::Backward::Full).unwrap();
            let xs = vec![0f32; samples];
            gpu.forward(&xs, samples).unwrap();
            let reps = 5;
            let t = std::time::Instant::now();
            for _ in 0..reps {
                gpu.forward(&xs, samples).unwrap();
            }
            let secs = t.elapsed().as_secs_f64() / reps as f64;
            let flops = 2.0 * (samples * dims.m * dims.k * dims.n) as f64;
            println!("{label}: {samples} × {}×{}×{}: {:.1} ms, {:.2} GFLOP/s", dims.m, dims.k, dims.n, secs * 1e3, flops / secs / 1e9);
        }
    }
}
