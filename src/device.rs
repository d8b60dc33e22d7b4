//! Opening a compute device: the one policy every command, test, bench and
//! [`Engine::with_options`] goes through.
//!
//! # The policy
//!
//! | request | where it runs | no match |
//! |---|---|---|
//! | `--backend cpu` | the CPU path (`FISHER_ADAPTER` is ignored) | — |
//! | `--adapter SUBSTR`, or `FISHER_ADAPTER=SUBSTR` (any backend but cpu) | the first compute-capable adapter whose name contains SUBSTR (case-insensitive), software ones included | [`FisherError::NoAdapter`] (exit 3) |
//! | `--backend gpu` | the best compute-capable adapter: discrete, integrated, virtual, other, then software | [`FisherError::NoAdapter`] (exit 3) |
//! | `--backend auto` (default) | a **hardware** GPU when one exists, else the CPU path | the CPU path |
//!
//! Auto never picks a software adapter (lavapipe, llvmpipe, WARP, SwiftShader: wgpu's
//! `DeviceType::Cpu`): they run the same shaders on the same CPU cores, only slower than the
//! CPU path (measured on two cores: W3's diag took 7.2 s on lavapipe and 0.32 s on the CPU
//! path). They are used only when asked for, by `--backend gpu` or by name.
//!
//! `FISHER_GPU_MEMORY_MB` (the GPU memory budget of one reduction) is read here too, once,
//! and a value that is not a whole number of MiB is an error rather than silently ignored.
//!
//! ```
//! use fisher_engine::device::{self, DeviceRequest};
//! use fisher_engine::Backend;
//! let opened = device::open(&DeviceRequest::new(Backend::Cpu))?;
//! assert!(!opened.engine.is_gpu());
//! assert_eq!(opened.reason, "--backend cpu");
//! # Ok::<(), fisher_engine::FisherError>(())
//! ```

#[cfg(doc)]
use crate::backend::gpu::list_adapters;
use crate::backend::gpu::{AdapterSummary, GpuContext, GpuOptions};
use crate::engine::{Backend, Engine, EngineOptions};
use crate::error::{FisherError, Result};

/// The environment variable that names an adapter when `--adapter` is not given.
pub const ADAPTER_ENV: &str = "FISHER_ADAPTER";

/// The environment variable that sets the GPU memory budget, in MiB.
pub const MEMORY_ENV: &str = "FISHER_GPU_MEMORY_MB";

/// The environment variable that sets the CPU path's budget for the running sums of a full
/// Fisher, in MiB ([`crate::backend::cpu::CpuBackend::with_accumulator_bytes`]).
pub const CPU_MEMORY_ENV: &str = "FISHER_CPU_MEMORY_MB";

/// wgpu's `DeviceType::Cpu` as [`AdapterSummary::device_type`] spells it: a software adapter.
const SOFTWARE_DEVICE_TYPE: &str = "Cpu";

/// Where an adapter name came from, so that messages name what the user typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdapterName {
    /// `--adapter SUBSTR` (or [`GpuOptions::adapter`] in library use).
    Flag(String),
    /// `FISHER_ADAPTER=SUBSTR`.
    Env(String),
}

impl AdapterName {
    /// The substring itself.
    pub fn substring(&self) -> &str {
        match self {
            AdapterName::Flag(s) | AdapterName::Env(s) => s,
        }
    }
}

impl std::fmt::Display for AdapterName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdapterName::Flag(s) => write!(f, "--adapter '{s}'"),
            AdapterName::Env(s) => write!(f, "{ADAPTER_ENV}='{s}'"),
        }
    }
}

/// What the caller asked for, with the environment already read and checked.
#[derive(Debug, Clone)]
pub struct DeviceRequest {
    /// Which compute path.
    pub backend: Backend,
    /// The adapter named by `--adapter` or `FISHER_ADAPTER` (never for [`Backend::Cpu`]).
    pub adapter: Option<AdapterName>,
    /// Limit overrides and the memory budget handed to the GPU backend.
    pub gpu: GpuOptions,
    /// The CPU path's accumulator budget ([`CPU_MEMORY_ENV`]); `None` for the default.
    pub cpu_memory_bytes: Option<u64>,
}

impl DeviceRequest {
    /// A request for `backend` with default GPU options and the environment ignored (what a
    /// test wants). See [`DeviceRequest::from_env`] for what a program wants.
    pub fn new(backend: Backend) -> Self {
        DeviceRequest { backend, adapter: None, gpu: GpuOptions::default(), cpu_memory_bytes: None }
    }

    /// A request for `backend` with `gpu` options, completed from the environment:
    /// `FISHER_ADAPTER` when `gpu.adapter` is unset (and the backend is not the CPU), and
    /// `FISHER_GPU_MEMORY_MB` when `gpu.memory_budget_bytes` is unset.
    ///
    /// Errors: [`FisherError::InvalidInput`] for an adapter name with the CPU backend, an
    /// empty `--adapter`, or a `FISHER_GPU_MEMORY_MB` that is not a positive whole number.
    pub fn from_env(backend: Backend, gpu: GpuOptions) -> Result<Self> {
        Self::with_env(backend, gpu, |name| std::env::var(name).ok())
    }

    /// [`DeviceRequest::from_env`] with the environment given as a lookup (for tests).
    pub fn with_env(backend: Backend, mut gpu: GpuOptions, env: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let adapter = match gpu.adapter.take() {
            Some(name) if name.is_empty() => {
                return Err(FisherError::InvalidInput(
                    "--adapter needs a non-empty part of an adapter name (see `fisher devices`)".into(),
                ))
            }
            Some(_) if backend == Backend::Cpu => {
                return Err(FisherError::InvalidInput(
                    "--adapter chooses a GPU adapter; it cannot be combined with --backend cpu".into(),
                ))
            }
            Some(name) => Some(AdapterName::Flag(name)),
            // An empty FISHER_ADAPTER is the same as an unset one (`FISHER_ADAPTER= fisher …`).
            None if backend != Backend::Cpu => env(ADAPTER_ENV).filter(|s| !s.is_empty()).map(AdapterName::Env),
            None => None,
        };
        let mib = |name: &str, what: &str| -> Result<Option<u64>> {
            let Some(text) = env(name) else { return Ok(None) };
            let mib = text.trim().parse::<u64>().ok().filter(|&m| m > 0 && m < (1 << 44)).ok_or_else(|| {
                FisherError::InvalidInput(format!("{name}='{text}' is not a positive whole number of MiB ({what})"))
            })?;
            Ok(Some(mib << 20))
        };
        if gpu.memory_budget_bytes.is_none() {
            gpu.memory_budget_bytes = mib(MEMORY_ENV, "the GPU memory budget")?;
        }
        let cpu_memory_bytes = mib(CPU_MEMORY_ENV, "the CPU accumulator budget")?;
        Ok(DeviceRequest { backend, adapter, gpu, cpu_memory_bytes })
    }

    /// The request an [`EngineOptions`] makes (environment included).
    pub fn from_options(options: &EngineOptions) -> Result<Self> {
        Self::from_env(options.backend, options.gpu.clone())
    }
}

/// Where a request will run, decided before any device is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The CPU path.
    Cpu,
    /// The first compute-capable adapter whose name contains this (case-insensitive).
    Named(String),
    /// The best compute-capable adapter, software ones last but accepted.
    Best,
    /// The best compute-capable adapter if it is hardware, else the CPU path (Auto).
    BestHardware,
}

/// A decision and its reason, in words for the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Where to run.
    pub target: Target,
    /// Why.
    pub reason: String,
}

/// Decides where `request` runs (no adapter is looked at; see [`open`]).
pub fn plan(request: &DeviceRequest) -> Plan {
    match (&request.backend, &request.adapter) {
        (Backend::Cpu, _) => Plan { target: Target::Cpu, reason: "--backend cpu".into() },
        (_, Some(name)) => {
            Plan { target: Target::Named(name.substring().to_string()), reason: format!("{name} names it") }
        }
        (Backend::Gpu, None) => Plan {
            target: Target::Best,
            reason: "--backend gpu: the best adapter (hardware before software)".into(),
        },
        (Backend::Auto, None) => Plan { target: Target::BestHardware, reason: "auto: a hardware GPU".into() },
    }
}

/// Why Auto does not run on `best`, a software adapter.
fn software_fallback(name: &str, api: &str) -> String {
    format!("only a software GPU adapter, {name} [{api}], which is slower than the CPU path (--backend gpu or --adapter uses it)")
}

/// Auto's choice among `adapters` as [`list_adapters`] reports them without a name filter
/// (`auto_pick` marks the best compute-capable adapter by device type, then API): that
/// adapter when it is hardware, else the CPU path. Returns the index of the adapter, or
/// `None` for the CPU path, and the reason. [`open`] makes the same choice on the adapter
/// [`GpuContext::new`] picks, without enumerating GL adapters when a native API has one.
pub fn auto_choice(adapters: &[AdapterSummary]) -> (Option<usize>, String) {
    let Some((index, best)) = adapters.iter().enumerate().find(|(_, a)| a.auto_pick) else {
        let why = if adapters.is_empty() {
            "wgpu found no adapter on any backend"
        } else {
            "no adapter supports compute storage buffers"
        };
        return (None, format!("no GPU adapter: {why}"));
    };
    if best.device_type == SOFTWARE_DEVICE_TYPE {
        // The best adapter ranks after every hardware one, so none exists.
        return (None, software_fallback(&best.name, &best.backend));
    }
    (Some(index), format!("{} is a hardware GPU ({})", best.name, best.device_type))
}

/// The GPU adapter an engine runs on, for reports.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AdapterInfo {
    /// Name, e.g. `llvmpipe (LLVM 15.0.6, 256 bits)`.
    pub name: String,
    /// Graphics API (Vulkan, Metal, Dx12, Gl).
    pub api: String,
    /// DiscreteGpu, IntegratedGpu, VirtualGpu, Cpu (software) or Other.
    pub device_type: String,
    /// Driver and its version, when reported.
    pub driver: String,
}

impl AdapterInfo {
    fn of(ctx: &GpuContext) -> Self {
        let info = &ctx.info;
        AdapterInfo {
            name: info.name.clone(),
            api: format!("{:?}", info.backend),
            device_type: format!("{:?}", info.device_type),
            driver: [info.driver.as_str(), info.driver_info.as_str()]
                .iter()
                .filter(|s| !s.is_empty())
                .copied()
                .collect::<Vec<_>>()
                .join(" "),
        }
    }

    /// Whether this is a software adapter (lavapipe, llvmpipe, WARP, SwiftShader).
    pub fn is_software(&self) -> bool {
        self.device_type == SOFTWARE_DEVICE_TYPE
    }
}

/// An opened engine and what the report says about it.
#[derive(Debug)]
pub struct Opened {
    /// The engine.
    pub engine: Engine,
    /// The GPU adapter, when on a GPU.
    pub adapter: Option<AdapterInfo>,
    /// Which path was chosen and why (one line, for humans).
    pub reason: String,
    /// Set when Auto chose the CPU path: why no GPU runs.
    pub fallback: Option<String>,
}

/// Opens the engine `request` asks for, by the [module's policy](self).
///
/// Errors: [`FisherError::NoAdapter`] when a named adapter, or `--backend gpu`, finds no
/// compute-capable adapter (never for Auto without a name); device creation and kernel
/// build errors as they come.
pub fn open(request: &DeviceRequest) -> Result<Opened> {
    let plan = plan(request);
    // The host result limit travels with the GPU options and applies to either path.
    let mut cpu_backend = match request.gpu.max_result_bytes {
        Some(limit) => crate::backend::cpu::CpuBackend::new().with_result_limit(limit),
        None => crate::backend::cpu::CpuBackend::new(),
    };
    if let Some(bytes) = request.cpu_memory_bytes {
        cpu_backend = cpu_backend.with_accumulator_bytes(bytes);
    }
    let cpu = |reason: String, fallback: Option<String>| Opened {
        engine: Engine::from_cpu_backend(cpu_backend.clone()),
        adapter: None,
        reason,
        fallback,
    };
    let filter = match &plan.target {
        Target::Cpu => return Ok(cpu(plan.reason, None)),
        Target::Named(name) => name.clone(),
        // An explicit empty name: GpuContext then neither filters nor reads FISHER_ADAPTER
        // (already resolved into the request).
        Target::Best | Target::BestHardware => String::new(),
    };
    let options = GpuOptions {
        adapter: Some(filter),
        host_accumulator_bytes: request.gpu.host_accumulator_bytes.or(request.cpu_memory_bytes),
        ..request.gpu.clone()
    };
    let ctx = match GpuContext::new(&options) {
        Ok(ctx) => ctx,
        Err(FisherError::NoAdapter(why)) if plan.target == Target::BestHardware => {
            let why = format!("no GPU adapter: {why}");
            log::warn!("{why}; using the CPU path");
            return Ok(cpu(format!("auto: {why}"), Some(why)));
        }
        Err(e) => return Err(e),
    };
    let adapter = AdapterInfo::of(&ctx);
    if plan.target == Target::BestHardware && ctx.is_software() {
        // GpuContext ranks software adapters last, so no hardware one exists. Making the
        // device costs milliseconds; enumerating every API first (GL included) instead
        // would print EGL start-up errors on headless machines.
        let why = software_fallback(&adapter.name, &adapter.api);
        log::info!("{why}; using the CPU path");
        return Ok(cpu(format!("auto: {why}"), Some(why)));
    }
    let reason = match plan.target {
        Target::BestHardware => format!("auto: {} is a hardware GPU ({})", adapter.name, adapter.device_type),
        _ => format!("{} [{}, {}]: {}", adapter.name, adapter.api, adapter.device_type, plan.reason),
    };
    let engine = Engine::from_context(ctx, &options)?;
    Ok(Opened { engine, adapter: Some(adapter), reason, fallback: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(name: &str, device_type: &str, auto_pick: bool) -> AdapterSummary {
        AdapterSummary {
            name: name.into(),
            backend: "Vulkan".into(),
            device_type: device_type.into(),
            driver: String::new(),
            max_storage_buffer_binding_size: 1 << 27,
            max_buffer_size: 1 << 28,
            max_compute_workgroup_storage_size: 1 << 15,
            max_compute_invocations_per_workgroup: 256,
            auto_pick,
        }
    }

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
    }

    #[test]
    fn auto_prefers_hardware_then_the_cpu_never_software() {
        let hardware = [summary("llvmpipe", "Cpu", false), summary("RTX", "DiscreteGpu", true)];
        assert_eq!(auto_choice(&hardware).0, Some(1));
        let software = [summary("llvmpipe (LLVM 15)", "Cpu", true)];
        let (pick, why) = auto_choice(&software);
        assert_eq!(pick, None);
        assert!(why.contains("software") && why.contains("--backend gpu"), "{why}");
        assert_eq!(auto_choice(&[]).0, None);
        assert_eq!(auto_choice(&[summary("GLES2", "Other", false)]).0, None);

        assert_eq!(plan(&DeviceRequest::new(Backend::Auto)).target, Target::BestHardware);
    }

    #[test]
    fn asking_for_a_gpu_accepts_software() {
        assert_eq!(plan(&DeviceRequest::new(Backend::Gpu)).target, Target::Best);
        assert_eq!(plan(&DeviceRequest::new(Backend::Cpu)).target, Target::Cpu);
        for backend in [Backend::Auto, Backend::Gpu] {
            let request = DeviceRequest::with_env(backend, GpuOptions::default(), env(&[(ADAPTER_ENV, "pipe")])).unwrap();
            assert_eq!(request.adapter, Some(AdapterName::Env("pipe".into())));
            let p = plan(&request);
            assert_eq!(p.target, Target::Named("pipe".into()));
            assert!(p.reason.contains("FISHER_ADAPTER='pipe'"), "{}", p.reason);
        }
    }

    #[test]
    fn the_environment_is_read_once_and_checked() {
        let flag = GpuOptions { adapter: Some("rtx".into()), ..Default::default() };
        let r = DeviceRequest::with_env(Backend::Auto, flag.clone(), env(&[(ADAPTER_ENV, "pipe")])).unwrap();
        assert_eq!(r.adapter, Some(AdapterName::Flag("rtx".into())), "the flag wins over the variable");
        let r = DeviceRequest::with_env(Backend::Cpu, GpuOptions::default(), env(&[(ADAPTER_ENV, "pipe")])).unwrap();
        assert_eq!(r.adapter, None, "--backend cpu ignores FISHER_ADAPTER");
        let r = DeviceRequest::with_env(Backend::Auto, GpuOptions::default(), env(&[(ADAPTER_ENV, "")])).unwrap();
        assert_eq!(r.adapter, None, "an empty variable is an unset one");
        assert!(DeviceRequest::with_env(Backend::Cpu, flag, env(&[])).is_err());
        let empty = GpuOptions { adapter: Some(String::new()), ..Default::default() };
        assert!(DeviceRequest::with_env(Backend::Gpu, empty, env(&[])).is_err());

        let r = DeviceRequest::with_env(Backend::Auto, GpuOptions::default(), env(&[(MEMORY_ENV, "512")])).unwrap();
        assert_eq!(r.gpu.memory_budget_bytes, Some(512 << 20));
        for bad in ["abc", "", "-1", "0", "1.5"] {
            let err = DeviceRequest::with_env(Backend::Auto, GpuOptions::default(), env(&[(MEMORY_ENV, bad)]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(MEMORY_ENV), "{err}");
        }
        let r = DeviceRequest::with_env(Backend::Cpu, GpuOptions::default(), env(&[(CPU_MEMORY_ENV, "64")])).unwrap();
        assert_eq!(r.cpu_memory_bytes, Some(64 << 20));
        for bad in ["x", "0", "99999999999999999999"] {
            let err = DeviceRequest::with_env(Backend::Cpu, GpuOptions::default(), env(&[(CPU_MEMORY_ENV, bad)]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(CPU_MEMORY_ENV) && err.contains("accumulator"), "{err}");
        }
    }

    #[test]
    fn the_cpu_opens_without_looking_for_adapters() {
        let opened = open(&DeviceRequest::new(Backend::Cpu)).unwrap();
        assert!(!opened.engine.is_gpu() && opened.adapter.is_none() && opened.fallback.is_none());
    }
}
