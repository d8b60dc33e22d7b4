//! Buffer helpers: typed allocation within limits, and the one map–poll–read–unmap routine.

use super::context::GpuContext;
use crate::error::{FisherError, Result};

/// A zero-initialised f32 storage buffer of `len` elements (wgpu guarantees new buffers read
/// as zero, which is what the accumulators start from).
pub fn storage_f32(ctx: &GpuContext, label: &str, len: usize) -> wgpu::Buffer {
    ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        // A zero-sized binding is invalid; keep at least one element.
        size: (len.max(1) * 4) as u64,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    })
}

/// Copies the first `len` f32 values of `src` back to the host.
///
/// Storage buffers cannot be mapped on most adapters, so the data goes through a MAP_READ
/// staging buffer: copy, submit, request the map, poll the device until the callback fires
/// (wgpu only runs map callbacks from `poll`), copy out, unmap. The staging buffer is dropped
/// at the end, so host-visible memory is held only for the duration of one read.
pub fn read_f32(ctx: &GpuContext, src: &wgpu::Buffer, len: usize) -> Result<Vec<f32>> {
    if len == 0 {
        return Ok(Vec::new());
    }
    let bytes = (len * 4) as u64;
    let staging = ctx.scoped("read-back", || {
        let staging = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("read-back staging"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut encoder = ctx.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("read-back") });
        encoder.copy_buffer_to_buffer(src, 0, &staging, 0, bytes);
        ctx.queue.submit([encoder.finish()]);
        staging
    })?;
    let (tx, rx) = std::sync::mpsc::channel();
    staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
        // The receiver outlives the poll below; a send error cannot happen.
        let _ = tx.send(r);
    });
    ctx.wait("read-back")?;
    let mapped = rx.recv().map_err(|e| FisherError::Gpu { stage: "read-back".into(), message: e.to_string() })?;
    mapped.map_err(|e| FisherError::Gpu { stage: "read-back map".into(), message: e.to_string() })?;
    let out = {
        let view = staging
            .slice(..)
            .get_mapped_range()
            .map_err(|e| FisherError::Gpu { stage: "read-back view".into(), message: e.to_string() })?;
        // pod_collect_to_vec copies without assuming the mapping is 4-byte aligned.
        bytemuck::pod_collect_to_vec::<u8, f32>(&view)
    };
    staging.unmap();
    Ok(out)
}
