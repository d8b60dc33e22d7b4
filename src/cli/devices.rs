//! `fisher devices`: every adapter wgpu sees, its key limits, and Auto's pick.

use fisher_engine::backend::gpu::{list_adapters, AdapterSummary, GpuOptions};
use fisher_engine::device::{self, DeviceRequest, Target};
use fisher_engine::Backend;
use serde_json::json;

use super::args::DevicesArgs;

/// Binary size with its unit, the exact byte count alongside (limits are compared in bytes).
fn size(bytes: u64) -> String {
    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;
    const KIB: u64 = 1 << 10;
    let short = if bytes >= GIB {
        format!("{:.1} GiB", bytes as f64 / GIB as f64)
    } else if bytes >= MIB {
        format!("{:.1} MiB", bytes as f64 / MIB as f64)
    } else {
        format!("{:.1} KiB", bytes as f64 / KIB as f64)
    };
    format!("{short} ({bytes} B)")
}

/// What `--backend auto` does on this machine (with the current `FISHER_ADAPTER`).
#[derive(Debug, Clone, serde::Serialize)]
struct AutoPick {
    /// `gpu` or `cpu`; `null` when `FISHER_ADAPTER` names no usable adapter (commands then
    /// exit 3).
    backend: Option<&'static str>,
    /// The adapter's name, on a GPU.
    adapter: Option<String>,
    /// Why, in words.
    reason: String,
}

/// Auto's choice ([`device::plan`], [`device::auto_choice`]), and `adapters` with
/// `auto_pick` set to agree with it (`list_adapters` marks the best adapter by rank,
/// software ones included, which Auto runs on only when named).
fn auto_pick(mut adapters: Vec<AdapterSummary>) -> (Vec<AdapterSummary>, AutoPick) {
    let request = match DeviceRequest::from_env(Backend::Auto, GpuOptions::default()) {
        Ok(request) => request,
        Err(e) => {
            adapters.iter_mut().for_each(|a| a.auto_pick = false);
            return (adapters, AutoPick { backend: None, adapter: None, reason: e.to_string() });
        }
    };
    let plan = device::plan(&request);
    let (pick, reason) = match plan.target {
        // list_adapters applied FISHER_ADAPTER when marking its pick.
        Target::Named(_) => (adapters.iter().position(|a| a.auto_pick), plan.reason),
        _ => {
            let (pick, why) = device::auto_choice(&adapters);
            (pick, format!("auto: {why}"))
        }
    };
    adapters.iter_mut().enumerate().for_each(|(i, a)| a.auto_pick = Some(i) == pick);
    let auto = match (pick, &plan.target) {
        (Some(i), _) => AutoPick { backend: Some("gpu"), adapter: Some(adapters[i].name.clone()), reason },
        (None, Target::Named(_)) => AutoPick {
            backend: None,
            adapter: None,
            reason: format!("{reason}, but no compute-capable adapter matches: commands exit 3"),
        },
        (None, _) => AutoPick { backend: Some("cpu"), adapter: None, reason },
    };
    (adapters, auto)
}

fn table(adapters: &[AdapterSummary], auto: &AutoPick) -> String {
    let auto_line = match (auto.backend, &auto.adapter) {
        (Some("gpu"), Some(name)) => format!("--backend auto runs on {name} ({}).", auto.reason),
        (Some(_), _) => format!("--backend auto runs on the CPU path ({}).", auto.reason),
        _ => format!("--backend auto cannot run: {}.", auto.reason),
    };
    if adapters.is_empty() {
        return format!("No GPU adapter found; `fisher reduce --backend auto` will use the CPU path.\n{auto_line}");
    }
    let mut lines = vec![format!(
        "{} adapter{} (* = the one --backend auto picks; FISHER_ADAPTER or --adapter choose another):",
        adapters.len(),
        if adapters.len() == 1 { "" } else { "s" }
    )];
    for (i, a) in adapters.iter().enumerate() {
        let mark = if a.auto_pick { "*" } else { " " };
        let driver = if a.driver.is_empty() { "unknown driver" } else { a.driver.as_str() };
        lines.push(format!("{mark} #{i} {}  [{}, {}]  {driver}", a.name, a.backend, a.device_type));
        lines.push(format!(
            "      max_storage_buffer_binding_size {}, max_buffer_size {}",
            size(a.max_storage_buffer_binding_size),
            size(a.max_buffer_size)
        ));
        lines.push(format!(
            "      max_compute_workgroup_storage_size {}, max_compute_invocations_per_workgroup {}",
            size(a.max_compute_workgroup_storage_size.into()),
            a.max_compute_invocations_per_workgroup
        ));
    }
    lines.push(auto_line);
    lines.join("\n")
}

/// Runs `fisher devices`. Finding no adapter is a result, not an error.
pub fn run(args: &DevicesArgs) -> anyhow::Result<()> {
    let (adapters, auto) = auto_pick(list_adapters());
    if args.json {
        println!("{}", json!({ "adapters": adapters, "auto": auto }));
    } else {
        println!("{}", table(&adapters, &auto));
    }
    Ok(())
}
