//! Kernels as structs that own their pipelines and explicit bind-group layouts, built once
//! per device and reused for every dispatch.

use wgpu::util::DeviceExt;

use super::context::GpuContext;
use crate::error::{FisherError, Result};

/// WGSL sources, labelled with their file names so that compiler errors name the file.
pub const SHADERS: &[(&str, &str)] = &[
    ("shaders/syrk.wgsl", include_str!("../../../shaders/syrk.wgsl")),
    ("shaders/diag.wgsl", include_str!("../../../shaders/diag.wgsl")),
    ("shaders/norms.wgsl", include_str!("../../../shaders/norms.wgsl")),
    ("shaders/mlp.wgsl", include_str!("../../../shaders/mlp.wgsl")),
];

/// Entry points the host uses, per shader file (checked by the naga test).
pub const ENTRY_POINTS: &[(&str, &[&str])] = &[
    ("shaders/syrk.wgsl", &["syrk_tiled", "syrk_direct"]),
    ("shaders/diag.wgsl", &["diag_accumulate"]),
    ("shaders/norms.wgsl", &["row_norms"]),
    ("shaders/mlp.wgsl", MLP_ENTRY_POINTS),
];

/// Entry points of `shaders/mlp.wgsl`.
pub const MLP_ENTRY_POINTS: &[&str] =
    &["bias_act", "act_next", "head", "backprop_act", "sample_sq", "square", "outer_grads", "tangent_act", "head_fvp"];

fn source(file: &str) -> &'static str {
    SHADERS.iter().find(|(f, _)| *f == file).map(|(_, s)| *s).expect("shader listed in SHADERS")
}

fn storage_entry(binding: u32, read_only: bool) -> wgpu::BindGroupLayoutEntry {
    wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Storage { read_only },
            has_dynamic_offset: false,
            min_binding_size: None,
        },
        count: None,
    }
}

fn uniform_entry(binding: u32) -> wgpu::BindGroupLayoutEntry {
    wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Uniform,
            has_dynamic_offset: false,
            min_binding_size: None,
        },
        count: None,
    }
}

/// A compute pipeline family: one shader module, one layout, one or more entry points.
struct PipelineSet {
    layout: wgpu::BindGroupLayout,
    pipelines: Vec<(&'static str, wgpu::ComputePipeline)>,
}

impl PipelineSet {
    fn new(
        ctx: &GpuContext,
        file: &'static str,
        entries: &[wgpu::BindGroupLayoutEntry],
        entry_points: &[&'static str],
    ) -> Result<Self> {
        ctx.scoped(&format!("building {file}"), || {
            let module = ctx.device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(file),
                source: wgpu::ShaderSource::Wgsl(source(file).into()),
            });
            let layout = ctx.device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some(file),
                entries,
            });
            let pipeline_layout = ctx.device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some(file),
                bind_group_layouts: &[Some(&layout)],
                immediate_size: 0,
            });
            let pipelines = entry_points
                .iter()
                .map(|&ep| {
                    let p = ctx.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                        label: Some(ep),
                        layout: Some(&pipeline_layout),
                        module: &module,
                        entry_point: Some(ep),
                        compilation_options: Default::default(),
                        cache: None,
                    });
                    (ep, p)
                })
                .collect();
            PipelineSet { layout, pipelines }
        })
    }

    fn pipeline(&self, entry_point: &str) -> &wgpu::ComputePipeline {
        &self.pipelines.iter().find(|(ep, _)| *ep == entry_point).expect("entry point built").1
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

fn uniform<T: bytemuck::Pod>(ctx: &GpuContext, label: &str, value: &T) -> wgpu::Buffer {
    ctx.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some(label),
        contents: bytemuck::bytes_of(value),
        usage: wgpu::BufferUsages::UNIFORM,
    })
}

fn bind(
    ctx: &GpuContext,
    layout: &wgpu::BindGroupLayout,
    label: &str,
    buffers: &[&wgpu::Buffer],
) -> wgpu::BindGroup {
    let entries: Vec<wgpu::BindGroupEntry> = buffers
        .iter()
        .enumerate()
        .map(|(i, b)| wgpu::BindGroupEntry { binding: i as u32, resource: b.as_entire_binding() })
        .collect();
    ctx.device.create_bind_group(&wgpu::BindGroupDescriptor { label: Some(label), layout, entries: &entries })
}

fn dispatch(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    pipeline: &wgpu::ComputePipeline,
    bind_group: &wgpu::BindGroup,
    groups: u64,
) -> Result<()> {
    let (x, y) = grid(groups, ctx.limits.max_compute_workgroups_per_dimension)?;
    let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None });
    pass.set_pipeline(pipeline);
    pass.set_bind_group(0, bind_group, &[]);
    pass.dispatch_workgroups(x, y, 1);
    Ok(())
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
    /// Tiles along m (set by the kernel struct).
    pub tiles_m: u32,
    /// Tiles along n (set by the kernel struct).
    pub tiles_n: u32,
    /// 1 for a diagonal block of a symmetric result: only tiles on/above the diagonal.
    pub upper_only: u32,
    /// Number of tiles dispatched (set by the kernel struct).
    pub num_tiles: u32,
    /// Padding to 64 bytes.
    pub pad: [u32; 3],
}

/// SYRK variant: workgroup-memory tiles (GPUs) or barrier-free direct loads (CPU adapters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyrkVariant {
    /// `syrk_tiled`.
    Tiled,
    /// `syrk_direct`.
    Direct,
}

/// Blocked, compensated C += AᵀB over strided operands (`shaders/syrk.wgsl`).
pub struct SyrkKernel {
    set: PipelineSet,
    variant: SyrkVariant,
}

/// Output tile edge of both SYRK variants.
pub const SYRK_TILE: u32 = 64;

impl SyrkKernel {
    /// Builds both variants; `variant` selects the one dispatched.
    pub fn new(ctx: &GpuContext, variant: SyrkVariant) -> Result<Self> {
        let entries = [
            uniform_entry(0),
            storage_entry(1, true),
            storage_entry(2, true),
            storage_entry(3, false),
            storage_entry(4, false),
        ];
        let set = PipelineSet::new(ctx, "shaders/syrk.wgsl", &entries, &["syrk_tiled", "syrk_direct"])?;
        Ok(SyrkKernel { set, variant })
    }

    /// The variant in use.
    pub fn variant(&self) -> SyrkVariant {
        self.variant
    }

    /// Records `c_sum/c_comp (m×n) += AᵀB` into `encoder`.
    #[allow(clippy::too_many_arguments)]
    pub fn encode(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
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
        let (entry, groups) = match self.variant {
            SyrkVariant::Tiled => ("syrk_tiled", p.num_tiles as u64),
            SyrkVariant::Direct => ("syrk_direct", 4 * p.num_tiles as u64),
        };
        let params = uniform(ctx, "syrk params", &p);
        let bg = bind(ctx, &self.set.layout, "syrk", &[&params, a, b, c_sum, c_comp]);
        dispatch(ctx, encoder, self.set.pipeline(entry), &bg, groups)
    }
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

/// Compensated column sums of squares (`shaders/diag.wgsl`).
pub struct DiagKernel {
    set: PipelineSet,
}

impl DiagKernel {
    /// Builds the pipeline.
    pub fn new(ctx: &GpuContext) -> Result<Self> {
        let entries = [uniform_entry(0), storage_entry(1, true), storage_entry(2, false), storage_entry(3, false)];
        Ok(DiagKernel { set: PipelineSet::new(ctx, "shaders/diag.wgsl", &entries, &["diag_accumulate"])? })
    }

    /// Records `d_sum/d_comp += Σ_rows g²` (per column) into `encoder`.
    pub fn encode(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        p: RowParams,
        g: &wgpu::Buffer,
        d_sum: &wgpu::Buffer,
        d_comp: &wgpu::Buffer,
    ) -> Result<()> {
        let params = uniform(ctx, "diag params", &p);
        let bg = bind(ctx, &self.set.layout, "diag", &[&params, g, d_sum, d_comp]);
        dispatch(ctx, encoder, self.set.pipeline("diag_accumulate"), &bg, (p.cols as u64).div_ceil(256))
    }
}

/// Per-row squared norms (`shaders/norms.wgsl`).
pub struct NormsKernel {
    set: PipelineSet,
}

impl NormsKernel {
    /// Builds the pipeline.
    pub fn new(ctx: &GpuContext) -> Result<Self> {
        let entries = [uniform_entry(0), storage_entry(1, true), storage_entry(2, false)];
        Ok(NormsKernel { set: PipelineSet::new(ctx, "shaders/norms.wgsl", &entries, &["row_norms"])? })
    }

    /// Records `norms[offset + r] = ‖g_r‖²` into `encoder`.
    pub fn encode(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        p: RowParams,
        g: &wgpu::Buffer,
        norms: &wgpu::Buffer,
    ) -> Result<()> {
        let params = uniform(ctx, "norms params", &p);
        let bg = bind(ctx, &self.set.layout, "norms", &[&params, g, norms]);
        dispatch(ctx, encoder, self.set.pipeline("row_norms"), &bg, p.rows as u64)
    }
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
    /// Activation code ([`crate::model::Activation::code`]).
    pub act: u32,
    /// FLAG_BIAS = 1, FLAG_ONE = 2, FLAG_GAUSSIAN = 4.
    pub flags: u32,
    /// Output rows per sample R.
    pub r: u32,
    /// Layer input width (outer_grads).
    pub fan_in: u32,
    /// Column offset in the output (outer_grads: the layer's θ offset).
    pub out_off: u32,
    /// Index of the micro-batch's first sample in the dataset (MC keys).
    pub sample_off: u32,
    /// 0 empirical, 1 true, 2 MC.
    pub variant: u32,
    /// Low word of the MC seed.
    pub seed_lo: u32,
    /// High word of the MC seed.
    pub seed_hi: u32,
    /// MC weight 1/√K.
    pub scale: f32,
    /// Row length of the second strided operand (outer_grads: ã).
    pub ld_b: u32,
    /// Padding to 64 bytes.
    pub pad: u32,
}

/// The element-wise MLP stages (`shaders/mlp.wgsl`): one layout, several entry points.
pub struct MlpKernel {
    set: PipelineSet,
    dummy: wgpu::Buffer,
}

impl MlpKernel {
    /// Builds every entry point.
    pub fn new(ctx: &GpuContext) -> Result<Self> {
        let entries = [
            uniform_entry(0),
            storage_entry(1, true),
            storage_entry(2, true),
            storage_entry(3, true),
            storage_entry(4, false),
        ];
        let set = PipelineSet::new(ctx, "shaders/mlp.wgsl", &entries, MLP_ENTRY_POINTS)?;
        let dummy = super::buffers::storage_f32(ctx, "unused binding", 1);
        Ok(MlpKernel { set, dummy })
    }

    /// Records `entry` over `elements` invocations (256 per workgroup).
    #[allow(clippy::too_many_arguments)]
    pub fn encode(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        entry: &str,
        p: MlpParams,
        inputs: [Option<&wgpu::Buffer>; 3],
        out: &wgpu::Buffer,
        elements: u64,
    ) -> Result<()> {
        let params = uniform(ctx, entry, &p);
        let [a, b, c] = inputs.map(|x| x.unwrap_or(&self.dummy));
        let bg = bind(ctx, &self.set.layout, entry, &[&params, a, b, c, out]);
        dispatch(ctx, encoder, self.set.pipeline(entry), &bg, elements.div_ceil(256))
    }
}
