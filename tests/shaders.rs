//! Every `shaders/*.wgsl` parses and validates with naga, without a GPU, and every entry point
//! the host dispatches exists as a compute entry point.

use std::collections::BTreeSet;

use fisher_engine::backend::gpu::kernels::{ENTRY_POINTS, SHADERS};

fn validate(file: &str, source: &str) -> naga::Module {
    let module = naga::front::wgsl::parse_str(source)
        .unwrap_or_else(|e| panic!("{file}: parse error:\n{}", e.emit_to_string_with_path(source, file)));
    naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::empty())
        .validate(&module)
        .unwrap_or_else(|e| panic!("{file}: validation error:\n{}", e.emit_to_string_with_path(source, file)));
    module
}

#[test]
fn every_shader_file_validates_and_is_used() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    let on_disk: BTreeSet<String> = std::fs::read_dir(&dir)
        .expect("shaders/ exists")
        .map(|e| e.expect("dir entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".wgsl"))
        .map(|n| format!("shaders/{n}"))
        .collect();
    let embedded: BTreeSet<String> = SHADERS.iter().map(|(f, _)| f.to_string()).collect();
    assert_eq!(on_disk, embedded, "every shaders/*.wgsl must be embedded by the host, and nothing else");
    for file in &on_disk {
        let source = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file)).unwrap();
        let embedded_src = SHADERS.iter().find(|(f, _)| f == file).unwrap().1;
        assert_eq!(source, embedded_src, "{file}: embedded copy differs from disk (rebuild)");
        validate(file, &source);
    }
}

#[test]
fn host_entry_points_exist() {
    for (file, entries) in ENTRY_POINTS {
        let source = SHADERS.iter().find(|(f, _)| f == file).unwrap_or_else(|| panic!("{file} not embedded")).1;
        let module = validate(file, source);
        for entry in *entries {
            let ep = module
                .entry_points
                .iter()
                .find(|ep| ep.name == *entry)
                .unwrap_or_else(|| panic!("{file}: entry point {entry} missing"));
            assert_eq!(ep.stage, naga::ShaderStage::Compute, "{file}: {entry} is not a compute entry point");
        }
    }
}

#[test]
fn a_broken_shader_is_rejected() {
    // Guards the guard: the validator must reject an undefined identifier.
    let bad = "@compute @workgroup_size(1) fn main() { let x = undefined_thing; }";
    assert!(naga::front::wgsl::parse_str(bad).is_err());
}
