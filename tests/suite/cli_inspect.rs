//! `fisher inspect` on ONNX files encoded here with the crate's own protobuf messages (no
//! Python at test time): the layer and parameter listing, `--json`, and the exit status when
//! nodes are unsupported or the file is not a model.

use std::path::{Path, PathBuf};

use fisher_engine::graph::onnx::proto::*;
use prost::Message;

use crate::common::cli::{assert_fails, fisher, json, s, succeeds, temp};

fn weight(name: &str, dims: &[i64]) -> TensorProto {
    let n: i64 = dims.iter().product();
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: data_type::FLOAT,
        float_data: (0..n).map(|i| i as f32 / 10.0).collect(),
        ..Default::default()
    }
}

fn node(op: &str, inputs: &[&str], output: &str) -> NodeProto {
    NodeProto {
        name: format!("/{output}/{op}"),
        op_type: op.into(),
        input: inputs.iter().map(|i| i.to_string()).collect(),
        output: vec![output.into()],
        ..Default::default()
    }
}

/// x [batch, 4] → fc1 (Gemm, transB) → Relu → fc2 → `last` (an extra node for the
/// unsupported cases) → output.
fn mlp(dir: &Path, extra: Vec<NodeProto>) -> PathBuf {
    let mut gemm1 = node("Gemm", &["x", "fc1.weight", "fc1.bias"], "h");
    let mut gemm2 = node("Gemm", &["r", "fc2.weight", "fc2.bias"], "logits");
    for g in [&mut gemm1, &mut gemm2] {
        g.attribute.push(AttributeProto { name: "transB".into(), r#type: attribute_type::INT, i: 1, ..Default::default() });
    }
    let mut nodes = vec![gemm1, node("Relu", &["h"], "r"), gemm2];
    let output = extra.last().map_or("logits".to_string(), |n| n.output[0].clone());
    nodes.extend(extra);
    let dims = [DimensionValue::DimParam("batch".into()), DimensionValue::DimValue(4)];
    let model = ModelProto {
        ir_version: 10,
        producer_name: "pytorch".into(),
        producer_version: "2.9.0".into(),
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: 20 }],
        graph: Some(GraphProto {
            node: nodes,
            name: "main_graph".into(),
            initializer: vec![weight("fc1.weight", &[6, 4]), weight("fc1.bias", &[6]), weight("fc2.weight", &[3, 6]), weight("fc2.bias", &[3])],
            input: vec![ValueInfoProto {
                name: "x".into(),
                r#type: Some(TypeProto {
                    tensor_type: Some(TypeProtoTensor {
                        elem_type: data_type::FLOAT,
                        shape: Some(TensorShapeProto {
                            dim: dims.into_iter().map(|d| Dimension { value: Some(d), ..Default::default() }).collect(),
                        }),
                    }),
                }),
            }],
            output: vec![ValueInfoProto { name: output, r#type: None }],
            value_info: Vec::new(),
        }),
        ..Default::default()
    };
    let path = dir.join("model.onnx");
    std::fs::write(&path, model.encode_to_vec()).unwrap();
    path
}

#[test]
fn inspect_lists_layers_and_parameters() {
    let dir = temp();
    let model = mlp(dir.path(), Vec::new());
    let run = fisher(&["inspect", "--model", s(&model)]);
    succeeds(&run);
    for needle in ["opset 20", "produced by pytorch 2.9.0", "declared [batch, 4], per sample [4]", "layers (3):", "/h/Gemm", "Relu", "parameters (4, P = 51):", "fc2.weight", "[3, 6]"] {
        assert!(run.stdout.contains(needle), "{needle:?} missing from:\n{}", run.stdout);
    }
    assert!(!run.stdout.contains("unsupported"), "{}", run.stdout);

    let v = json(&fisher(&["inspect", "--model", s(&model), "--json"]));
    assert_eq!(v["total_parameters"], 51);
    assert_eq!(v["outputs"], 3);
    assert_eq!(v["model"]["input_shape"], serde_json::json!([4]));
    assert_eq!(v["layers"].as_array().unwrap().len(), 3);
    let names: Vec<&str> = v["parameters"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]);
    assert_eq!(v["parameters"][0]["module"], "fc1");
    assert_eq!(v["unsupported"], serde_json::json!([]));
}

#[test]
fn inspect_reports_every_unsupported_node_then_exits_2() {
    let dir = temp();
    let mut custom = node("Swish", &["sm"], "out");
    custom.domain = "com.example".into();
    let model = mlp(dir.path(), vec![node("Softmax", &["logits"], "sm"), custom]);
    let run = fisher(&["inspect", "--model", s(&model)]);
    assert_eq!(run.code, 2, "{}\n{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("unsupported nodes (2):"), "{}", run.stdout);
    assert!(run.stdout.contains("/sm/Softmax (Softmax): operator Softmax is not supported"), "{}", run.stdout);
    assert!(run.stdout.contains("com.example::Swish"), "{}", run.stdout);
    assert!(run.stderr.contains("fisher: error:") && run.stderr.contains("2 unsupported nodes"), "{}", run.stderr);

    let run = fisher(&["inspect", "--model", s(&model), "--json"]);
    assert_eq!(run.code, 2);
    let v: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap();
    assert_eq!(v["unsupported"].as_array().unwrap().len(), 2);
    assert_eq!(v["outputs"], serde_json::Value::Null);
}

#[test]
fn inspect_refuses_what_is_not_a_model() {
    let dir = temp();
    let bad = dir.path().join("bad.onnx");
    std::fs::write(&bad, b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff").unwrap();
    assert_fails(&fisher(&["inspect", "--model", s(&bad)]), 2, &["bad.onnx", "not an ONNX model"]);
    let missing = dir.path().join("missing.onnx");
    assert_fails(&fisher(&["inspect", "--model", s(&missing)]), 2, &["missing.onnx", "cannot read"]);
    let model = mlp(dir.path(), Vec::new());
    assert_fails(&fisher(&["inspect", "--model", s(&model), "--input-shape", "x"]), 2, &["--input-shape"]);
    assert_fails(&fisher(&["inspect", "--model", s(&model), "--input-shape", "5"]), 2, &["the data has per-sample shape [5]"]);
}
