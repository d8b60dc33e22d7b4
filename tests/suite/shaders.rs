//! The shaders against the host's registry, without a GPU: every `shaders/*.wgsl` parses and
//! validates with naga; every [`Entry`] exists in its [`Shader`] with the workgroup size the
//! host divides its dispatches by; every WGSL entry point is dispatched by some [`Entry`] (no
//! dead kernels); and every constant a shader shares with the host has the host's value.

use std::collections::BTreeSet;

use fisher_engine::backend::gpu::consts::{self, SHARED, WG_DEFAULT};
use fisher_engine::backend::gpu::kernels::{Entry, Shader};
use fisher_engine::model::Activation;
use naga::{Expression, Literal, Module};

fn validate(shader: Shader) -> Module {
    let (file, source) = (shader.file(), shader.source());
    let module = naga::front::wgsl::parse_str(source)
        .unwrap_or_else(|e| panic!("{file}: parse error:\n{}", e.emit_to_string_with_path(source, file)));
    naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::empty())
        .validate(&module)
        .unwrap_or_else(|e| panic!("{file}: validation error:\n{}", e.emit_to_string_with_path(source, file)));
    module
}

/// Evaluates a module-scope u32 expression, with the override `WG` set to `wg`.
fn eval(module: &Module, h: naga::Handle<Expression>, wg: u32) -> u32 {
    match &module.global_expressions[h] {
        Expression::Literal(Literal::U32(v)) => *v,
        Expression::Literal(Literal::I32(v)) => *v as u32,
        Expression::Literal(Literal::AbstractInt(v)) => *v as u32,
        Expression::Constant(c) => eval(module, module.constants[*c].init, wg),
        Expression::Override(o) => {
            let o = &module.overrides[*o];
            match (o.name.as_deref(), o.init) {
                (Some("WG"), _) => wg,
                (_, Some(init)) => eval(module, init, wg),
                (name, None) => panic!("override {name:?} has no default"),
            }
        }
        Expression::Binary { op, left, right } => {
            let (a, b) = (eval(module, *left, wg), eval(module, *right, wg));
            match op {
                naga::BinaryOperator::Add => a + b,
                naga::BinaryOperator::Subtract => a - b,
                naga::BinaryOperator::Multiply => a * b,
                naga::BinaryOperator::Divide => a / b,
                other => panic!("unsupported operator {other:?}"),
            }
        }
        other => panic!("unsupported constant expression {other:?}"),
    }
}

/// Module-scope `const`s and `override`s by name, with their values (WG at its default).
fn named_values(module: &Module) -> Vec<(String, u32)> {
    let consts = module.constants.iter().filter_map(|(_, c)| Some((c.name.clone()?, eval(module, c.init, WG_DEFAULT))));
    let overrides = module
        .overrides
        .iter()
        .filter_map(|(_, o)| Some((o.name.clone()?, eval(module, o.init.expect("override default"), WG_DEFAULT))));
    consts.chain(overrides).collect()
}

#[test]
fn every_shader_file_is_registered_and_validates() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    let on_disk: BTreeSet<String> = std::fs::read_dir(&dir)
        .expect("shaders/ exists")
        .map(|e| e.expect("dir entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".wgsl"))
        .map(|n| format!("shaders/{n}"))
        .collect();
    let registered: BTreeSet<String> = Shader::ALL.iter().map(|s| s.file().to_string()).collect();
    assert_eq!(on_disk, registered, "every shaders/*.wgsl must be a Shader variant, and nothing else");
    for shader in Shader::ALL {
        validate(shader);
    }
}

#[test]
fn registry_indices_match_their_order() {
    for (i, s) in Shader::ALL.iter().enumerate() {
        assert_eq!(s.index(), i, "{s:?}");
    }
    for (i, e) in Entry::ALL.iter().enumerate() {
        assert_eq!(e.index(), i, "{e:?}");
    }
}

#[test]
fn every_entry_exists_with_the_host_workgroup_size() {
    for entry in Entry::ALL {
        let shader = entry.shader();
        let module = validate(shader);
        let ep = module
            .entry_points
            .iter()
            .find(|ep| ep.name == entry.name())
            .unwrap_or_else(|| panic!("{}: entry point {} missing", shader.file(), entry.name()));
        assert_eq!(ep.stage, naga::ShaderStage::Compute, "{}: {} is not a compute entry point", shader.file(), entry.name());
        // Two values of WG: the default, and another, so that a hard-coded size is caught too.
        for wg in [WG_DEFAULT, 64] {
            let size: Vec<u32> = (0..3)
                .map(|i| match ep.workgroup_size_overrides.and_then(|o| o[i]) {
                    Some(h) => eval(&module, h, wg),
                    None => ep.workgroup_size[i],
                })
                .collect();
            assert_eq!(size, entry.workgroup_size(wg), "{}: workgroup size of {} with WG = {wg}", shader.file(), entry.name());
        }
        assert_eq!(
            named_values(&module).iter().any(|(n, _)| n == "WG"),
            shader.has_wg_override(),
            "{}: override WG declared iff the host passes it",
            shader.file()
        );
    }
}

#[test]
fn every_wgsl_entry_point_is_dispatched() {
    for shader in Shader::ALL {
        for ep in &validate(shader).entry_points {
            assert!(
                Entry::ALL.iter().any(|e| e.shader() == shader && e.name() == ep.name),
                "{}: entry point {} is not an Entry (dead kernel?)",
                shader.file(),
                ep.name
            );
        }
    }
}

#[test]
fn shared_constants_match_the_host() {
    for shader in Shader::ALL {
        let values = named_values(&validate(shader));
        for &(s, name, want) in SHARED.iter().filter(|(s, _, _)| *s == shader) {
            let got = values.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("{}: {name} not declared", s.file()));
            assert_eq!(got.1, want, "{}: {name} = {} in WGSL but {want} on the host", s.file(), got.1);
        }
        // Every named module-scope constant is one the host mirrors: a new one must be added
        // to consts::SHARED (and so checked) rather than copied by hand.
        for (name, _) in &values {
            assert!(
                SHARED.iter().any(|(s, n, _)| *s == shader && n == name),
                "{}: constant {name} is not in consts::SHARED",
                shader.file()
            );
        }
    }
}

#[test]
fn activation_codes_are_the_shared_constants() {
    for (act, code) in [
        (Activation::Identity, consts::ACT_IDENTITY),
        (Activation::Relu, consts::ACT_RELU),
        (Activation::Tanh, consts::ACT_TANH),
        (Activation::Sigmoid, consts::ACT_SIGMOID),
        (Activation::Gelu, consts::ACT_GELU),
    ] {
        assert_eq!(act.code(), code, "{act:?}");
    }
}

#[test]
fn a_mismatched_constant_is_caught() {
    // Guards the guard: the same evaluation on a shader whose constant differs from the host.
    let module = naga::front::wgsl::parse_str("const FLAG_BIAS: u32 = 8u; override WG: u32 = 128u;").unwrap();
    let values = named_values(&module);
    assert!(values.contains(&("FLAG_BIAS".into(), 8)) && values.contains(&("WG".into(), 128)));
    assert_ne!(8, consts::FLAG_BIAS);
    assert_ne!(128, WG_DEFAULT);
}

#[test]
fn a_broken_shader_is_rejected() {
    // Guards the guard: the validator must reject an undefined identifier.
    let bad = "@compute @workgroup_size(1) fn main() { let x = undefined_thing; }";
    assert!(naga::front::wgsl::parse_str(bad).is_err());
}

#[test]
fn graph_unary_codes_are_the_shared_constants() {
    use fisher_engine::graph::prim::UnaryFn;
    let all = [
        (UnaryFn::Relu, "UN_RELU"),
        (UnaryFn::LeakyRelu(0.1), "UN_LEAKY_RELU"),
        (UnaryFn::Tanh, "UN_TANH"),
        (UnaryFn::Sigmoid, "UN_SIGMOID"),
        (UnaryFn::Gelu, "UN_GELU"),
        (UnaryFn::GeluTanh, "UN_GELU_TANH"),
        (UnaryFn::Erf, "UN_ERF"),
        (UnaryFn::Softplus, "UN_SOFTPLUS"),
        (UnaryFn::Sqrt, "UN_SQRT"),
        (UnaryFn::Rsqrt, "UN_RSQRT"),
        (UnaryFn::Reciprocal, "UN_RECIPROCAL"),
        (UnaryFn::Exp, "UN_EXP"),
        (UnaryFn::Square, "UN_SQUARE"),
        (UnaryFn::Affine(2.0, 1.0), "UN_AFFINE"),
        (UnaryFn::Step, "UN_STEP"),
        (UnaryFn::LeakyStep(0.1), "UN_LEAKY_STEP"),
        (UnaryFn::TanhDeriv, "UN_TANH_DERIV"),
        (UnaryFn::SigmoidDeriv, "UN_SIGMOID_DERIV"),
        (UnaryFn::GeluDeriv, "UN_GELU_DERIV"),
        (UnaryFn::GeluTanhDeriv, "UN_GELU_TANH_DERIV"),
        (UnaryFn::ErfDeriv, "UN_ERF_DERIV"),
        (UnaryFn::SqrtDeriv, "UN_SQRT_DERIV"),
        (UnaryFn::RsqrtDeriv, "UN_RSQRT_DERIV"),
        (UnaryFn::ReciprocalDeriv, "UN_RECIPROCAL_DERIV"),
    ];
    assert_eq!(all.len(), consts::GRAPH_UNARY.len(), "every UnaryFn has a WGSL code");
    let values = named_values(&validate(Shader::Graph));
    for (f, name) in all {
        let host = consts::GRAPH_UNARY.iter().find(|(n, _)| *n == name).unwrap_or_else(|| panic!("{name} not in GRAPH_UNARY"));
        assert_eq!(f.code().0, host.1, "{f:?}: UnaryFn::code vs consts::GRAPH_UNARY {name}");
        assert!(values.iter().any(|(n, v)| n == name && *v == host.1), "graph.wgsl: {name} missing or different");
    }
}
