//! `fisher devices`: every adapter wgpu sees, its key limits, and Auto's pick.

use fisher_engine::backend::gpu::{list_adapters, AdapterSummary};
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

fn table(adapters: &[AdapterSummary]) -> String {
    if adapters.is_empty() {
        return "No GPU adapter found; `fisher reduce --backend auto` will use the CPU path.".into();
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
    if !adapters.iter().any(|a| a.auto_pick) {
        lines.push("None is usable for compute (or none matches FISHER_ADAPTER); Auto will use the CPU path.".into());
    }
    lines.join("\n")
}

/// Runs `fisher devices`. Finding no adapter is a result, not an error.
pub fn run(args: &DevicesArgs) -> anyhow::Result<()> {
    let adapters = list_adapters();
    if args.json {
        println!("{}", json!({ "adapters": adapters }));
    } else {
        println!("{}", table(&adapters));
    }
    Ok(())
}
