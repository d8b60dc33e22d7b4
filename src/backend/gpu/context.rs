//! The one place a wgpu device is made.

use std::sync::Arc;

use crate::error::{FisherError, Result};

/// Options for adapter choice, limits and memory.
#[derive(Debug, Clone, Default)]
pub struct GpuOptions {
    /// Case-insensitive substring of the adapter name to use. `None` reads `FISHER_ADAPTER`;
    /// when that is unset too, the best adapter is chosen (see [`GpuContext::new`]).
    pub adapter: Option<String>,
    /// Lowers the adapter's `max_storage_buffer_binding_size` for planning. Tests use it to
    /// force the chunked/tiled paths on small problems; users can use it to leave headroom.
    pub max_binding_bytes: Option<u64>,
    /// Device memory budget for one reduction, in bytes (default 2 GiB, or
    /// `FISHER_GPU_MEMORY_MB`). wgpu cannot query free VRAM, so this is a promise we keep
    /// rather than a measurement.
    pub memory_budget_bytes: Option<u64>,
    /// Forces a SYRK kernel variant (`"tiled"` or `"direct"`) instead of choosing by
    /// adapter type. `None` reads `FISHER_SYRK_KERNEL`.
    pub syrk_variant: Option<String>,
    /// Largest result read back into host memory, bytes of f32 values (default
    /// [`crate::backend::DEFAULT_RESULT_LIMIT`], 2 GiB, as the CLI's `--max-result-gib`):
    /// full and block Fishers, Gram, KFAC factors, layer blocks and gradient rows above it
    /// are refused before anything is allocated.
    pub max_result_bytes: Option<u64>,
    /// Target scratch of one network micro-batch, bytes (default 64 MiB). The samples of a
    /// micro-batch, and the Monte Carlo draws of a sample when one sample's rows do not
    /// fit, are split to stay near it; tests lower it to force many chunks.
    pub micro_batch_bytes: Option<u64>,
    /// Without an adapter name: among the adapters that tie for the best choice (the same
    /// device type and API, e.g. the eight GPUs of a node), take the one at this index modulo
    /// their count, in wgpu's enumeration order. `fisher compute --mpi` sets it to the rank's
    /// index on its node, so that the ranks of one node spread over its GPUs. `None` is 0.
    pub local_index: Option<usize>,
    /// Host memory for the running sums of a graph (ONNX) network's full F or layer blocks,
    /// which are summed on the host on every backend (default
    /// [`crate::backend::cpu::DEFAULT_ACCUMULATOR_BYTES`]; the CLI sets it from
    /// `FISHER_CPU_MEMORY_MB`).
    pub host_accumulator_bytes: Option<u64>,
}

/// A summary of one adapter, as `fisher devices` prints it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AdapterSummary {
    /// Adapter name, e.g. `llvmpipe (LLVM 15.0.6, 256 bits)`.
    pub name: String,
    /// Graphics API: Vulkan, Metal, Dx12, Gl.
    pub backend: String,
    /// DiscreteGpu, IntegratedGpu, VirtualGpu, Cpu or Other.
    pub device_type: String,
    /// Driver name and version.
    pub driver: String,
    /// Largest storage-buffer binding, bytes.
    pub max_storage_buffer_binding_size: u64,
    /// Largest buffer, bytes.
    pub max_buffer_size: u64,
    /// Workgroup memory, bytes.
    pub max_compute_workgroup_storage_size: u32,
    /// Invocations per workgroup.
    pub max_compute_invocations_per_workgroup: u32,
    /// Whether `Backend::Auto` (with the current `FISHER_ADAPTER`) would pick this one.
    pub auto_pick: bool,
}

/// Owns instance, adapter, device, queue, adapter info and limits. Created once and passed
/// by reference; tests create their own and hand it to [`crate::Engine::from_context`].
pub struct GpuContext {
    /// The wgpu instance the adapter came from.
    pub instance: wgpu::Instance,
    /// The chosen adapter.
    pub adapter: wgpu::Adapter,
    /// The device, created with the adapter's own maximum limits.
    pub device: wgpu::Device,
    /// Its queue.
    pub queue: wgpu::Queue,
    /// Adapter name, API, device type, driver.
    pub info: wgpu::AdapterInfo,
    /// The limits the device was created with (= the adapter's).
    pub limits: wgpu::Limits,
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuContext").field("adapter", &self.label()).finish()
    }
}

/// Preference order of device types: hardware first, software adapters accepted last.
fn type_rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

/// Preference among APIs for the same device: native compute APIs before GL, whose headless
/// EGL path is the least reliable (shared/NOTES.md).
fn backend_rank(b: wgpu::Backend) -> u8 {
    match b {
        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 0,
        wgpu::Backend::Gl => 1,
        _ => 2,
    }
}

fn make_instance(backends: wgpu::Backends) -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = backends;
    wgpu::Instance::new(desc)
}

/// Every adapter wgpu sees, on every API, with the one Auto would pick marked.
pub fn list_adapters() -> Vec<AdapterSummary> {
    let instance = make_instance(wgpu::Backends::all());
    let adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
    let filter = std::env::var("FISHER_ADAPTER").ok();
    let pick = choose(&adapters, filter.as_deref(), None).ok();
    adapters
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let info = a.get_info();
            let limits = a.limits();
            AdapterSummary {
                name: info.name.clone(),
                backend: format!("{:?}", info.backend),
                device_type: format!("{:?}", info.device_type),
                driver: format!("{} {}", info.driver, info.driver_info).trim().to_string(),
                max_storage_buffer_binding_size: limits.max_storage_buffer_binding_size,
                max_buffer_size: limits.max_buffer_size,
                max_compute_workgroup_storage_size: limits.max_compute_workgroup_storage_size,
                max_compute_invocations_per_workgroup: limits.max_compute_invocations_per_workgroup,
                auto_pick: pick == Some(i),
            }
        })
        .collect()
}

/// Among adapters ranked by `keys` (`None`: not usable; lower is better), the index of the
/// `local`-th (modulo their count) of those tied for the best rank, in order.
fn pick_best<K: Ord + Copy>(keys: &[Option<K>], local: usize) -> Option<usize> {
    let best = keys.iter().flatten().min()?;
    let tied: Vec<usize> = keys.iter().enumerate().filter(|(_, k)| k.as_ref() == Some(best)).map(|(i, _)| i).collect();
    Some(tied[local % tied.len()])
}

/// Index of the adapter to use: the first whose name contains `filter` (case-insensitive),
/// else the best by device type then API (the `local`-th of equally good ones, see
/// [`GpuOptions::local_index`]).
fn choose(adapters: &[wgpu::Adapter], filter: Option<&str>, local: Option<usize>) -> Result<usize> {
    if adapters.is_empty() {
        return Err(FisherError::NoAdapter("wgpu found no adapter on any backend".into()));
    }
    let compute_capable = |a: &wgpu::Adapter| {
        // Our kernels need storage buffers in compute shaders; GL ES 3.0-only adapters lack them.
        a.limits().max_storage_buffers_per_shader_stage >= 5
            && a.limits().max_compute_invocations_per_workgroup >= 256
    };
    if let Some(f) = filter.filter(|f| !f.is_empty()) {
        let needle = f.to_lowercase();
        return adapters
            .iter()
            .position(|a| a.get_info().name.to_lowercase().contains(&needle) && compute_capable(a))
            .ok_or_else(|| {
                let names: Vec<String> = adapters
                    .iter()
                    .map(|a| format!("{} ({:?})", a.get_info().name, a.get_info().backend))
                    .collect();
                FisherError::NoAdapter(format!(
                    "no compute-capable adapter name contains '{f}' (adapters: {})",
                    names.join(", ")
                ))
            });
    }
    let keys: Vec<Option<(u8, u8)>> = adapters
        .iter()
        .map(|a| {
            let info = a.get_info();
            compute_capable(a).then(|| (type_rank(info.device_type), backend_rank(info.backend)))
        })
        .collect();
    pick_best(&keys, local.unwrap_or(0))
        .ok_or_else(|| FisherError::NoAdapter("no adapter supports compute storage buffers".into()))
}

impl GpuContext {
    /// Creates the context on the adapter chosen by `options`.
    ///
    /// Without a filter the order is: discrete, integrated, virtual, other, then software
    /// (CPU) adapters; within a type Vulkan/Metal/DX12 before GL. Native APIs are probed
    /// first and GL only when they have no adapter, which avoids GL/EGL start-up noise.
    /// The device is created with the adapter's own maximum limits, not wgpu's defaults.
    pub fn new(options: &GpuOptions) -> Result<Self> {
        let filter = options.adapter.clone().or_else(|| std::env::var("FISHER_ADAPTER").ok());
        let mut found = None;
        for backends in [wgpu::Backends::PRIMARY, wgpu::Backends::SECONDARY] {
            let instance = make_instance(backends);
            let adapters = pollster::block_on(instance.enumerate_adapters(backends));
            match choose(&adapters, filter.as_deref(), options.local_index) {
                Ok(i) => {
                    let adapter = adapters.into_iter().nth(i).expect("index from choose");
                    found = Some((instance, adapter));
                    break;
                }
                Err(e) => log::debug!("{backends:?}: {e}"),
            }
        }
        let Some((instance, adapter)) = found else {
            // Re-run the choice over everything for the most informative message.
            let instance = make_instance(wgpu::Backends::all());
            let adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
            let err = choose(&adapters, filter.as_deref(), options.local_index)
                .err()
                .unwrap_or_else(|| FisherError::NoAdapter("no usable adapter".into()));
            return Err(err);
        };
        let info = adapter.get_info();
        let limits = adapter.limits();
        let desc = wgpu::DeviceDescriptor {
            label: Some("fisher-engine"),
            required_features: wgpu::Features::empty(),
            required_limits: limits.clone(),
            ..Default::default()
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&desc)).map_err(|e| {
            FisherError::DeviceRequest { adapter: info.name.clone(), message: e.to_string() }
        })?;
        // Errors outside an error scope must not abort the process (wgpu's default handler
        // panics); every device operation of ours runs inside a scope, so this only logs.
        device.on_uncaptured_error(Arc::new(|e: wgpu::Error| log::error!("uncaptured wgpu error: {e}")));
        log::info!("using adapter {} ({:?}, {:?})", info.name, info.backend, info.device_type);
        Ok(GpuContext { instance, adapter, device, queue, info, limits })
    }

    /// `name [API, type]`.
    pub fn label(&self) -> String {
        format!("{} [{:?}, {:?}]", self.info.name, self.info.backend, self.info.device_type)
    }

    /// Whether this is a software adapter (lavapipe, llvmpipe, WARP, SwiftShader).
    pub fn is_software(&self) -> bool {
        self.info.device_type == wgpu::DeviceType::Cpu
    }

    /// Runs `f` inside validation and out-of-memory error scopes and turns any captured
    /// error into [`FisherError::Gpu`] naming `stage`.
    pub fn scoped<T>(&self, stage: &str, f: impl FnOnce() -> T) -> Result<T> {
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let value = f();
        let v = pollster::block_on(validation.pop());
        let o = pollster::block_on(oom.pop());
        match v.or(o) {
            None => Ok(value),
            Some(e) => Err(FisherError::Gpu { stage: stage.into(), message: one_line(&e) }),
        }
    }

    /// Blocks until all submitted work is done.
    pub fn wait(&self, stage: &str) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| FisherError::Gpu { stage: stage.into(), message: e.to_string() })
    }
}

/// wgpu's error Display spans several lines; the CLI promises one.
fn one_line(e: &wgpu::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::pick_best;

    #[test]
    fn ranks_of_a_node_spread_over_the_tied_best_adapters() {
        // Two discrete Vulkan GPUs (rank (0, 0)) at 1 and 3, a software adapter, an unusable one.
        let keys = [Some((4, 0)), Some((0, 0)), None, Some((0, 0)), Some((0, 1))];
        let picks: Vec<usize> = (0..5).map(|local| pick_best(&keys, local).unwrap()).collect();
        assert_eq!(picks, vec![1, 3, 1, 3, 1]);
        assert_eq!(pick_best(&[Some(2), Some(1)], 7), Some(1));
        assert_eq!(pick_best::<u8>(&[None, None], 0), None);
        assert_eq!(pick_best::<u8>(&[], 3), None);
    }
}
