//! The shader registry and the dispatch recorder.
//!
//! * [`Shader`] names each `shaders/*.wgsl` file (its source is embedded with `include_str!`)
//!   and its bind-group layout; [`Entry`] names each compute entry point and the shader it
//!   lives in. The host dispatches [`Entry`] values, never strings, and `tests/shaders.rs`
//!   enumerates [`Entry::ALL`] against the parsed shaders (candle's `Source`/kernel registry).
//! * [`Kernels`] builds every pipeline once per device, indexed by [`Entry`], with the
//!   workgroup size chosen for the adapter passed as the `WG` pipeline constant.
//! * [`Recorder`] collects the dispatches of one command encoder; [`Bindings`] (one per
//!   reduction) turns them into a command buffer, writing every uniform block of the encoder
//!   into one dynamic-offset uniform buffer and reusing bind groups across micro-batches.

use std::collections::HashMap;

use super::consts::{SYRK_TILE, WG_DEFAULT};
use super::context::GpuContext;
use crate::error::{FisherError, Result};

/// A WGSL source file, one per kernel family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Shader {
    /// `shaders/syrk.wgsl`: the compensated C += AᵀB behind every matrix product.
    Syrk,
    /// `shaders/diag.wgsl`: compensated column sums of squares.
    Diag,
    /// `shaders/norms.wgsl`: per-row squared norms.
    Norms,
    /// `shaders/mlp.wgsl`: the element-wise stages of a network's forward and backward pass.
    Mlp,
    /// `shaders/graph.wgsl`: the primitive instructions of a lowered graph and the reductions
    /// of its per-row gradients ([`crate::graph::gpu`]).
    Graph,
}

impl Shader {
    /// Every shader, in [`Shader::index`] order.
    pub const ALL: [Shader; 5] = [Shader::Syrk, Shader::Diag, Shader::Norms, Shader::Mlp, Shader::Graph];

    /// Path relative to the crate root; also the label of the module, so that compiler
    /// errors name the file.
    pub fn file(self) -> &'static str {
        match self {
            Shader::Syrk => "shaders/syrk.wgsl",
            Shader::Diag => "shaders/diag.wgsl",
            Shader::Norms => "shaders/norms.wgsl",
            Shader::Mlp => "shaders/mlp.wgsl",
            Shader::Graph => "shaders/graph.wgsl",
        }
    }

    /// The WGSL source.
    pub fn source(self) -> &'static str {
        match self {
            Shader::Syrk => include_str!("../../../shaders/syrk.wgsl"),
            Shader::Diag => include_str!("../../../shaders/diag.wgsl"),
            Shader::Norms => include_str!("../../../shaders/norms.wgsl"),
            Shader::Mlp => include_str!("../../../shaders/mlp.wgsl"),
            Shader::Graph => include_str!("../../../shaders/graph.wgsl"),
        }
    }

    /// Position in [`Shader::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// Whether the shader declares `override WG` (the one-dimensional kernels); SYRK's
    /// workgroup shape is fixed by its register blocking.
    pub fn has_wg_override(self) -> bool {
        self != Shader::Syrk
    }

    /// The storage bindings after the uniform block at binding 0, as `read_only` flags
    /// (bindings 1, 2, …), matching the shader header.
    fn storage_bindings(self) -> &'static [bool] {
        match self {
            Shader::Syrk => &[true, true, false, false],
            Shader::Diag => &[true, false, false],
            Shader::Norms => &[true, false],
            Shader::Mlp => &[true, true, true, false],
            // in0, in1 (f32), the CSR offsets and columns (u32), out0.
            Shader::Graph => &[true, true, true, true, false],
        }
    }
}

/// A compute entry point the host dispatches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Entry {
    /// `syrk_tiled`: workgroup-memory tiles, 16×16 invocations.
    SyrkTiled,
    /// `syrk_direct`: barrier-free direct loads, 8×8 invocations.
    SyrkDirect,
    /// `diag_accumulate`: one invocation per column.
    DiagAccumulate,
    /// `row_norms`: one workgroup per row.
    RowNorms,
    /// `bias_act`: z = (S − C) [+ b] from a GEMM's Kahan pair.
    BiasAct,
    /// `act_next`: ã_{l+1} = [φ(z) | 1].
    ActNext,
    /// `head`: the output rows δ_{L−1} of the variant.
    Head,
    /// `backprop_act`: δ = (S − C) ∘ φ'(z).
    BackpropAct,
    /// `sample_sq`: Σ_R δ² per sample.
    SampleSq,
    /// `square`: x².
    Square,
    /// `outer_grads`: the per-row gradients δ ⊗ ã of one layer.
    OuterGrads,
    /// `tangent_act`: ȧ = φ'(z) ∘ ż (forward mode).
    TangentAct,
    /// `head_fvp`: w = Λ ż at the output.
    HeadFvp,
    /// `g_sparse`: y = M x for a CSR M, one row of M per invocation.
    GraphSparse,
    /// `g_matmul`: grouped, transposable matrix product, a 4×4 block per invocation.
    GraphMatMul,
    /// `g_unary`: y = f(x).
    GraphUnary,
    /// `g_binary`: y = a ∘ b.
    GraphBinary,
    /// `g_argmax`: window argmax.
    GraphArgMax,
    /// `g_gather`: y_j = x[idx_j].
    GraphGather,
    /// `g_scatter`: the transpose of `g_gather` over candidate lists.
    GraphScatter,
    /// `g_embed`: table rows at tokens.
    GraphEmbed,
    /// `g_embed_back`: the table gradient, one invocation per (row, embedding column).
    GraphEmbedBack,
    /// `g_colsum`: per-block column sums (of squares) of per-row gradients.
    GraphColSum,
    /// `g_gram`: per-block Σ x xᵀ over rows and positions (KFAC factors).
    GraphGram,
}

impl Entry {
    /// Every entry point, in [`Entry::index`] order.
    pub const ALL: [Entry; 24] = [
        Entry::SyrkTiled,
        Entry::SyrkDirect,
        Entry::DiagAccumulate,
        Entry::RowNorms,
        Entry::BiasAct,
        Entry::ActNext,
        Entry::Head,
        Entry::BackpropAct,
        Entry::SampleSq,
        Entry::Square,
        Entry::OuterGrads,
        Entry::TangentAct,
        Entry::HeadFvp,
        Entry::GraphSparse,
        Entry::GraphMatMul,
        Entry::GraphUnary,
        Entry::GraphBinary,
        Entry::GraphArgMax,
        Entry::GraphGather,
        Entry::GraphScatter,
        Entry::GraphEmbed,
        Entry::GraphEmbedBack,
        Entry::GraphColSum,
        Entry::GraphGram,
    ];

    /// The WGSL function name.
    pub fn name(self) -> &'static str {
        match self {
            Entry::SyrkTiled => "syrk_tiled",
            Entry::SyrkDirect => "syrk_direct",
            Entry::DiagAccumulate => "diag_accumulate",
            Entry::RowNorms => "row_norms",
            Entry::BiasAct => "bias_act",
            Entry::ActNext => "act_next",
            Entry::Head => "head",
            Entry::BackpropAct => "backprop_act",
            Entry::SampleSq => "sample_sq",
            Entry::Square => "square",
            Entry::OuterGrads => "outer_grads",
            Entry::TangentAct => "tangent_act",
            Entry::HeadFvp => "head_fvp",
            Entry::GraphSparse => "g_sparse",
            Entry::GraphMatMul => "g_matmul",
            Entry::GraphUnary => "g_unary",
            Entry::GraphBinary => "g_binary",
            Entry::GraphArgMax => "g_argmax",
            Entry::GraphGather => "g_gather",
            Entry::GraphScatter => "g_scatter",
            Entry::GraphEmbed => "g_embed",
            Entry::GraphEmbedBack => "g_embed_back",
            Entry::GraphColSum => "g_colsum",
            Entry::GraphGram => "g_gram",
        }
    }

    /// The shader that defines it.
    pub fn shader(self) -> Shader {
        match self {
            Entry::SyrkTiled | Entry::SyrkDirect => Shader::Syrk,
            Entry::DiagAccumulate => Shader::Diag,
            Entry::RowNorms => Shader::Norms,
            Entry::GraphSparse
            | Entry::GraphMatMul
            | Entry::GraphUnary
            | Entry::GraphBinary
            | Entry::GraphArgMax
            | Entry::GraphGather
            | Entry::GraphScatter
            | Entry::GraphEmbed
            | Entry::GraphEmbedBack
            | Entry::GraphColSum
            | Entry::GraphGram => Shader::Graph,
            _ => Shader::Mlp,
        }
    }

    /// Position in [`Entry::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The workgroup size the host assumes when it sizes dispatches, given the `WG` value
    /// of the one-dimensional kernels ([`workgroup_size`]). SYRK: a 4×4 register block per
    /// invocation over a 64×64 tile (tiled) or a 32×32 quadrant (direct).
    pub fn workgroup_size(self, wg: u32) -> [u32; 3] {
        match self {
            Entry::SyrkTiled => [SYRK_TILE / 4, SYRK_TILE / 4, 1],
            Entry::SyrkDirect => [SYRK_TILE / 8, SYRK_TILE / 8, 1],
            _ => [wg, 1, 1],
        }
    }
}

/// The `WG` of the one-dimensional kernels on an adapter: [`WG_DEFAULT`] clamped to the
/// invocation, x-size and workgroup-memory limits (`row_norms` keeps WG f32 partials), and
/// rounded down to a power of two (`row_norms` reduces by halving).
pub fn workgroup_size(limits: &wgpu::Limits) -> u32 {
    let wg = WG_DEFAULT
        .min(limits.max_compute_invocations_per_workgroup)
        .min(limits.max_compute_workgroup_size_x)
        .min(limits.max_compute_workgroup_storage_size / 4)
        .max(1);
    1 << (31 - wg.leading_zeros())
}

/// SYRK variant: workgroup-memory tiles (GPUs) or barrier-free direct loads (CPU adapters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyrkVariant {
    /// [`Entry::SyrkTiled`].
    Tiled,
    /// [`Entry::SyrkDirect`].
    Direct,
}

impl SyrkVariant {
    /// The entry point and the number of workgroups per 64×64 output tile.
    fn entry(self) -> (Entry, u64) {
        match self {
            SyrkVariant::Tiled => (Entry::SyrkTiled, 1),
            SyrkVariant::Direct => (Entry::SyrkDirect, 4),
        }
    }

    /// `tiled` or `direct`.
    pub fn name(self) -> &'static str {
        match self {
            SyrkVariant::Tiled => "tiled",
            SyrkVariant::Direct => "direct",
        }
    }
}

/// Splits `groups` workgroups into a 2-D grid within `max_dim` per dimension; the kernels
/// linearize `wg.y · nwg.x + wg.x` and discard the overhang.
pub fn grid(groups: u64, max_dim: u32) -> Result<(u32, u32)> {
    let max = max_dim as u64;
    let x = groups.clamp(1, max);
    let y = groups.div_ceil(x).max(1);
    if y > max {
        return Err(FisherError::DoesNotFit {
            what: format!("a dispatch of {groups} workgroups"),
            needed: groups,
            limit: max * max,
            which: "max_compute_workgroups_per_dimension²".into(),
        });
    }
    Ok((x as u32, y as u32))
}

/// Uniform block of `syrk.wgsl` (layout must match `struct Params` there).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct SyrkParams {
    /// Inner (reduction) length.
    pub k: u32,
    /// Output rows.
    pub m: u32,
    /// Output columns.
    pub n: u32,
    /// A(k, r) = a[a_off + k·a_ks + r·a_ms].
    pub a_off: u32,
    /// Stride of A along k.
    pub a_ks: u32,
    /// Stride of A along r.
    pub a_ms: u32,
    /// B(k, c) = b[b_off + k·b_ks + c·b_ns].
    pub b_off: u32,
    /// Stride of B along k.
    pub b_ks: u32,
    /// Stride of B along c.
    pub b_ns: u32,
    /// Tiles along m (set by [`Recorder::syrk`]).
    pub tiles_m: u32,
    /// Tiles along n (set by [`Recorder::syrk`]).
    pub tiles_n: u32,
    /// 1 for a diagonal block of a symmetric result: only tiles on/above the diagonal.
    pub upper_only: u32,
    /// Number of tiles dispatched (set by [`Recorder::syrk`]).
    pub num_tiles: u32,
    /// Padding to 64 bytes.
    pub pad: [u32; 3],
}

/// Uniform block of `diag.wgsl` and `norms.wgsl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct RowParams {
    /// Rows (samples) in the chunk.
    pub rows: u32,
    /// Columns processed.
    pub cols: u32,
    /// Row stride of the chunk (P).
    pub ld: u32,
    /// diag: first column; norms: first output index.
    pub offset: u32,
}

/// Uniform block of `mlp.wgsl` (layout must match `struct Params` there).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct MlpParams {
    /// Samples (or R-rows for outer_grads) in the micro-batch.
    pub rows: u32,
    /// Columns of the element-wise operation.
    pub cols: u32,
    /// Row length of the first strided operand (outer_grads: δ).
    pub ld_a: u32,
    /// Row length of the output.
    pub ld_out: u32,
    /// Activation code ([`crate::model::Activation::code`], `consts::ACT_*`).
    pub act: u32,
    /// `consts::FLAG_BIAS | FLAG_ONE | FLAG_GAUSSIAN`.
    pub flags: u32,
    /// Output rows per sample R.
    pub r: u32,
    /// Layer input width (outer_grads).
    pub fan_in: u32,
    /// Column offset in the output (outer_grads: the layer's θ offset).
    pub out_off: u32,
    /// Index of the micro-batch's first sample in the dataset (MC keys).
    pub sample_off: u32,
    /// `consts::VARIANT_EMPIRICAL | VARIANT_TRUE | VARIANT_MC`.
    pub variant: u32,
    /// Low word of the MC seed.
    pub seed_lo: u32,
    /// High word of the MC seed.
    pub seed_hi: u32,
    /// MC weight 1/√K.
    pub scale: f32,
    /// Row length of the second strided operand (outer_grads: ã).
    pub ld_b: u32,
    /// First output row (MC draw, or class for `true`) of the chunk that `head` and
    /// `head_fvp` compute; `r` is then the chunk's row count.
    pub draw_off: u32,
}

/// Uniform block of `graph.wgsl` (layout must match `struct Params` there; the meaning of
/// each field per entry point is in the shader header and in [`crate::graph::gpu`]).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct GraphParams {
    /// Destination rows dispatched (reductions: rows of the reduced slot).
    pub rows: u32,
    /// Destination values per row (reductions: columns).
    pub len: u32,
    /// Output rows per sample R (row mapping of Sample operands of Draw destinations).
    pub r: u32,
    /// `consts::GRAPH_FLAG_*`, and the row modes of the operands at
    /// `GRAPH_A_MODE_SHIFT` / `GRAPH_B_MODE_SHIFT`.
    pub flags: u32,
    /// Row length of operand in0.
    pub a_len: u32,
    /// Row length of operand in1.
    pub b_len: u32,
    /// Groups of a matrix product; blocks of a reduction.
    pub groups: u32,
    /// Rows of Y; features of a gram.
    pub m: u32,
    /// Inner extent; positions of a gram.
    pub k: u32,
    /// Columns of Y; output columns of a gram.
    pub n: u32,
    /// Unary or binary function code; vocabulary of an embedding; rows per f32 partial sum
    /// of a gram.
    pub code: u32,
    /// Embedding width; rows per block of a reduction.
    pub dim: u32,
    /// First unary parameter.
    pub p0: f32,
    /// Second unary parameter.
    pub p1: f32,
    /// Output offset of a column sum; first output row of a gram panel.
    pub off: u32,
    /// Output rows of a gram panel.
    pub count: u32,
}

/// Bytes of one uniform slot: the largest params block ([`SyrkParams`], [`MlpParams`]).
const PARAMS_BYTES: usize = 64;
const _: () = assert!(
    std::mem::size_of::<SyrkParams>() == PARAMS_BYTES
        && std::mem::size_of::<MlpParams>() == PARAMS_BYTES
        && std::mem::size_of::<GraphParams>() == PARAMS_BYTES
        && std::mem::size_of::<RowParams>() <= PARAMS_BYTES
);

/// Every pipeline of every shader, built once per device and indexed by [`Entry`].
pub struct Kernels {
    /// Bind-group layout per [`Shader`] (binding 0 a dynamic-offset uniform).
    layouts: Vec<wgpu::BindGroupLayout>,
    /// Pipeline per [`Entry`], in [`Entry::ALL`] order.
    pipelines: Vec<wgpu::ComputePipeline>,
    syrk_variant: SyrkVariant,
    wg: u32,
    max_dim: u32,
    /// Bound to the unused inputs of `mlp.wgsl` entry points.
    dummy: wgpu::Buffer,
    /// Stride of uniform slots: [`PARAMS_BYTES`] rounded up to the offset alignment.
    slot: u64,
}

impl Kernels {
    /// Builds every pipeline on `ctx`; `syrk_variant` selects the SYRK entry dispatched.
    pub fn new(ctx: &GpuContext, syrk_variant: SyrkVariant) -> Result<Self> {
        let wg = workgroup_size(&ctx.limits);
        let constants = [("WG", wg as f64)];
        ctx.scoped("building pipelines", || {
            let mut modules = Vec::with_capacity(Shader::ALL.len());
            let mut layouts = Vec::with_capacity(Shader::ALL.len());
            for shader in Shader::ALL {
                modules.push(ctx.device.create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(shader.file()),
                    source: wgpu::ShaderSource::Wgsl(shader.source().into()),
                }));
                let mut entries = vec![wgpu::BindGroupLayoutEntry {
                    binding: 0,
                    visibility: wgpu::ShaderStages::COMPUTE,
                    ty: wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Uniform,
                        has_dynamic_offset: true,
                        min_binding_size: None,
                    },
                    count: None,
                }];
                entries.extend(shader.storage_bindings().iter().enumerate().map(|(i, &read_only)| {
                    wgpu::BindGroupLayoutEntry {
                        binding: i as u32 + 1,
                        visibility: wgpu::ShaderStages::COMPUTE,
                        ty: wgpu::BindingType::Buffer {
                            ty: wgpu::BufferBindingType::Storage { read_only },
                            has_dynamic_offset: false,
                            min_binding_size: None,
                        },
                        count: None,
                    }
                }));
                layouts.push(ctx.device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                    label: Some(shader.file()),
                    entries: &entries,
                }));
            }
            let pipeline_layouts: Vec<wgpu::PipelineLayout> = Shader::ALL
                .iter()
                .map(|s| {
                    ctx.device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                        label: Some(s.file()),
                        bind_group_layouts: &[Some(&layouts[s.index()])],
                        immediate_size: 0,
                    })
                })
                .collect();
            let pipelines = Entry::ALL
                .iter()
                .map(|&entry| {
                    let shader = entry.shader();
                    ctx.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                        label: Some(entry.name()),
                        layout: Some(&pipeline_layouts[shader.index()]),
                        module: &modules[shader.index()],
                        entry_point: Some(entry.name()),
                        compilation_options: wgpu::PipelineCompilationOptions {
                            constants: if shader.has_wg_override() { &constants } else { &[] },
                            ..Default::default()
                        },
                        cache: None,
                    })
                })
                .collect();
            let align = ctx.limits.min_uniform_buffer_offset_alignment.max(1) as u64;
            Kernels {
                layouts,
                pipelines,
                syrk_variant,
                wg,
                max_dim: ctx.limits.max_compute_workgroups_per_dimension,
                dummy: super::buffers::storage_f32(ctx, "unused binding", 1),
                slot: (PARAMS_BYTES as u64).div_ceil(align) * align,
            }
        })
    }

    /// The SYRK variant dispatched.
    pub fn syrk_variant(&self) -> SyrkVariant {
        self.syrk_variant
    }

    /// The `WG` the one-dimensional kernels were built with.
    pub fn wg(&self) -> u32 {
        self.wg
    }

    fn pipeline(&self, entry: Entry) -> &wgpu::ComputePipeline {
        &self.pipelines[entry.index()]
    }

    /// An empty recorder for one command encoder.
    pub fn recorder(&self) -> Recorder<'_> {
        Recorder { kernels: self, params: Vec::new(), slots: HashMap::new(), commands: Vec::new() }
    }
}

/// One recorded command of a [`Recorder`].
enum Command {
    Clear { buffer: wgpu::Buffer, bytes: u64 },
    Dispatch { entry: Entry, offset: u32, buffers: Vec<wgpu::Buffer>, grid: (u32, u32) },
}

/// The dispatches (and buffer clears) of one command encoder, in order. Uniform blocks are
/// packed into slots of one host vector (identical blocks share a slot); [`Bindings::submit`]
/// uploads them with one `write_buffer` and encodes everything.
pub struct Recorder<'k> {
    kernels: &'k Kernels,
    params: Vec<u8>,
    slots: HashMap<[u8; PARAMS_BYTES], u32>,
    commands: Vec<Command>,
}

impl Recorder<'_> {
    /// Records zeroing the first `bytes` of `buffer`.
    pub fn clear(&mut self, buffer: &wgpu::Buffer, bytes: u64) {
        self.commands.push(Command::Clear { buffer: buffer.clone(), bytes });
    }

    fn dispatch<P: bytemuck::Pod>(&mut self, entry: Entry, params: &P, buffers: &[&wgpu::Buffer], groups: u64) -> Result<()> {
        let grid = grid(groups, self.kernels.max_dim)?;
        let mut block = [0u8; PARAMS_BYTES];
        let bytes = bytemuck::bytes_of(params);
        block[..bytes.len()].copy_from_slice(bytes);
        let slot = self.kernels.slot as usize;
        let next = self.params.len();
        let offset = *self.slots.entry(block).or_insert_with(|| next as u32);
        if offset as usize == next {
            self.params.resize(next + slot, 0);
            self.params[next..next + PARAMS_BYTES].copy_from_slice(&block);
        }
        let buffers = buffers.iter().map(|&b| b.clone()).collect();
        self.commands.push(Command::Dispatch { entry, offset, buffers, grid });
        Ok(())
    }

    /// Records `c_sum/c_comp (m×n) += AᵀB` (`syrk.wgsl`, the adapter's variant).
    pub fn syrk(
        &mut self,
        mut p: SyrkParams,
        a: &wgpu::Buffer,
        b: &wgpu::Buffer,
        c_sum: &wgpu::Buffer,
        c_comp: &wgpu::Buffer,
    ) -> Result<()> {
        p.tiles_m = p.m.div_ceil(SYRK_TILE);
        p.tiles_n = p.n.div_ceil(SYRK_TILE);
        p.num_tiles = if p.upper_only == 1 {
            debug_assert_eq!(p.m, p.n);
            p.tiles_m * (p.tiles_m + 1) / 2
        } else {
            p.tiles_m * p.tiles_n
        };
        let (entry, per_tile) = self.kernels.syrk_variant.entry();
        self.dispatch(entry, &p, &[a, b, c_sum, c_comp], per_tile * p.num_tiles as u64)
    }

    /// Records `d_sum/d_comp += Σ_rows g²` per column (`diag.wgsl`).
    pub fn diag(&mut self, p: RowParams, g: &wgpu::Buffer, d_sum: &wgpu::Buffer, d_comp: &wgpu::Buffer) -> Result<()> {
        let groups = (p.cols as u64).div_ceil(self.kernels.wg as u64);
        self.dispatch(Entry::DiagAccumulate, &p, &[g, d_sum, d_comp], groups)
    }

    /// Records `norms[offset + r] = ‖g_r‖²` (`norms.wgsl`, one workgroup per row).
    pub fn norms(&mut self, p: RowParams, g: &wgpu::Buffer, norms: &wgpu::Buffer) -> Result<()> {
        self.dispatch(Entry::RowNorms, &p, &[g, norms], p.rows as u64)
    }

    /// Records the `mlp.wgsl` entry `entry` over `elements` invocations (WG per workgroup);
    /// `None` inputs are bound to a dummy buffer.
    pub fn mlp(
        &mut self,
        entry: Entry,
        p: MlpParams,
        inputs: [Option<&wgpu::Buffer>; 3],
        out: &wgpu::Buffer,
        elements: u64,
    ) -> Result<()> {
        if entry.shader() != Shader::Mlp {
            return Err(FisherError::InvalidInput(format!("{} is not an mlp.wgsl entry point", entry.name())));
        }
        let dummy = &self.kernels.dummy.clone();
        let [a, b, c] = inputs.map(|x| x.unwrap_or(dummy));
        let groups = elements.div_ceil(self.kernels.wg as u64);
        self.dispatch(entry, &p, &[a, b, c, out], groups)
    }

    /// Records the `graph.wgsl` entry `entry` over `invocations` invocations (WG per
    /// workgroup, a 2-D grid past 65,535 workgroups); the inputs are in0, in1 (f32) and the
    /// CSR offsets and columns (u32), `None` bound to a dummy buffer. Nothing is recorded for
    /// zero invocations.
    pub fn graph(
        &mut self,
        entry: Entry,
        p: &GraphParams,
        inputs: [Option<&wgpu::Buffer>; 4],
        out: &wgpu::Buffer,
        invocations: u64,
    ) -> Result<()> {
        if entry.shader() != Shader::Graph {
            return Err(FisherError::InvalidInput(format!("{} is not a graph.wgsl entry point", entry.name())));
        }
        if invocations == 0 {
            return Ok(());
        }
        let dummy = &self.kernels.dummy.clone();
        let [a, b, c, d] = inputs.map(|x| x.unwrap_or(dummy));
        let groups = invocations.div_ceil(self.kernels.wg as u64);
        self.dispatch(entry, p, &[a, b, c, d, out], groups)
    }
}

/// The uniform buffer and bind groups of one reduction, reused by every submission of it.
///
/// All uniform blocks of a submission live in one buffer at distinct dynamic offsets (a
/// `write_buffer` before a submit applies to the whole submission, so blocks that differ
/// within one encoder need distinct slots). Bind groups are keyed by the storage buffers they
/// bind, so the micro-batches of a reduction, which bind the same buffers, create them once.
/// Dropping the `Bindings` releases the buffers the bind groups hold, which is why it lives
/// per reduction and not per device, and why a reduction should reuse its buffers rather
/// than allocate per submission (each new buffer set adds a cached bind group).
#[derive(Default)]
pub struct Bindings {
    uniforms: Option<wgpu::Buffer>,
    groups: HashMap<(Shader, Vec<wgpu::Buffer>), wgpu::BindGroup>,
}

impl Bindings {
    /// Encodes `rec` into a command buffer, uploads its uniform blocks and submits it.
    pub fn submit(&mut self, ctx: &GpuContext, stage: &str, rec: Recorder<'_>) -> Result<wgpu::SubmissionIndex> {
        let kernels = rec.kernels;
        ctx.scoped(stage, || {
            let needed = (rec.params.len() as u64).max(kernels.slot);
            let uniforms = match &self.uniforms {
                Some(u) if u.size() >= needed => u.clone(),
                _ => {
                    // Growing replaces the buffer every cached bind group refers to.
                    self.groups.clear();
                    let u = ctx.device.create_buffer(&wgpu::BufferDescriptor {
                        label: Some("kernel params"),
                        size: needed.next_power_of_two(),
                        usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                        mapped_at_creation: false,
                    });
                    self.uniforms = Some(u.clone());
                    u
                }
            };
            if !rec.params.is_empty() {
                ctx.queue.write_buffer(&uniforms, 0, &rec.params);
            }
            let mut encoder = ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(stage) });
            for command in rec.commands {
                match command {
                    Command::Clear { buffer, bytes } => encoder.clear_buffer(&buffer, 0, Some(bytes)),
                    Command::Dispatch { entry, offset, buffers, grid } => {
                        let group = self.groups.entry((entry.shader(), buffers)).or_insert_with_key(|(shader, buffers)| {
                            let mut entries = vec![wgpu::BindGroupEntry {
                                binding: 0,
                                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                                    buffer: &uniforms,
                                    offset: 0,
                                    size: wgpu::BufferSize::new(PARAMS_BYTES as u64),
                                }),
                            }];
                            entries.extend(buffers.iter().enumerate().map(|(i, b)| wgpu::BindGroupEntry {
                                binding: i as u32 + 1,
                                resource: b.as_entire_binding(),
                            }));
                            ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
                                label: Some(shader.file()),
                                layout: &kernels.layouts[shader.index()],
                                entries: &entries,
                            })
                        });
                        let mut pass =
                            encoder.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some(entry.name()), timestamp_writes: None });
                        pass.set_pipeline(kernels.pipeline(entry));
                        pass.set_bind_group(0, &*group, &[offset]);
                        pass.dispatch_workgroups(grid.0, grid.1, 1);
                    }
                }
            }
            ctx.queue.submit([encoder.finish()])
        })
    }
}
