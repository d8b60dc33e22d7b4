//! Unit tests of the importer on ONNX files built in memory (prost encodes what the
//! exporter would write), including hostile ones.

use std::path::{Path, PathBuf};

use prost::Message;

use super::proto::*;
use super::*;
use crate::graph::ir::{BinaryOp, Op, TensorKind, UnaryOp};

fn raw_f32(name: &str, dims: &[i64], v: &[f32]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: data_type::FLOAT,
        raw_data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ..Default::default()
    }
}

fn seq(name: &str, dims: &[i64]) -> TensorProto {
    let n: i64 = dims.iter().product();
    raw_f32(name, dims, &(0..n).map(|i| (i as f32 * 0.37).sin()).collect::<Vec<_>>())
}

fn ints(name: &str, v: &[i64]) -> TensorProto {
    TensorProto { name: name.into(), dims: vec![v.len() as i64], data_type: data_type::INT64, int64_data: v.to_vec(), ..Default::default() }
}

enum A<'a> {
    I(&'a str, i64),
    F(&'a str, f32),
    Is(&'a str, &'a [i64]),
    S(&'a str, &'a str),
    T(&'a str, TensorProto),
}

fn node(op: &str, inputs: &[&str], outputs: &[&str], attrs: Vec<A>) -> NodeProto {
    let attribute = attrs
        .into_iter()
        .map(|a| match a {
            A::I(n, i) => AttributeProto { name: n.into(), r#type: attribute_type::INT, i, ..Default::default() },
            A::F(n, f) => AttributeProto { name: n.into(), r#type: attribute_type::FLOAT, f, ..Default::default() },
            A::Is(n, v) => AttributeProto { name: n.into(), r#type: attribute_type::INTS, ints: v.to_vec(), ..Default::default() },
            A::S(n, s) => AttributeProto { name: n.into(), r#type: attribute_type::STRING, s: s.as_bytes().to_vec(), ..Default::default() },
            A::T(n, t) => AttributeProto { name: n.into(), r#type: attribute_type::TENSOR, t: Some(t), ..Default::default() },
        })
        .collect();
    NodeProto {
        name: format!("node_{}", outputs[0]),
        op_type: op.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        attribute,
        ..Default::default()
    }
}

/// A dimension: a number, or a name when negative (−1 → "batch", −2 → "T").
fn value_info(name: &str, elem: i32, dims: &[i64]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|&d| Dimension {
            value: Some(match d {
                -1 => DimensionValue::DimParam("batch".into()),
                d if d < 0 => DimensionValue::DimParam("T".into()),
                d => DimensionValue::DimValue(d),
            }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            tensor_type: Some(TypeProtoTensor { elem_type: elem, shape: Some(TensorShapeProto { dim }) }),
        }),
    }
}

fn model(nodes: Vec<NodeProto>, inits: Vec<TensorProto>, input: ValueInfoProto, output: &str) -> ModelProto {
    ModelProto {
        ir_version: 10,
        producer_name: "pytorch".into(),
        producer_version: "2.9.0".into(),
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: 20 }],
        graph: Some(GraphProto {
            node: nodes,
            name: "main_graph".into(),
            initializer: inits,
            input: vec![input],
            output: vec![ValueInfoProto { name: output.into(), r#type: None }],
            value_info: Vec::new(),
        }),
        ..Default::default()
    }
}

fn write(dir: &Path, m: &ModelProto) -> PathBuf {
    let path = dir.join("model.onnx");
    std::fs::write(&path, m.encode_to_vec()).unwrap();
    path
}

/// The dynamo exporter's flatten: x.view(x.size(0), -1) as Shape → Gather → Unsqueeze →
/// Concat → Reshape.
fn flatten_nodes(x: &str, out: &str) -> Vec<NodeProto> {
    vec![
        node("Shape", &[x], &["sh"], vec![]),
        node("Constant", &[], &["zero"], vec![A::T("value", TensorProto { data_type: data_type::INT64, int64_data: vec![0], ..Default::default() })]),
        node("Gather", &["sh", "zero"], &["n"], vec![A::I("axis", 0)]),
        node("Constant", &[], &["ax0"], vec![A::Is("value_ints", &[0])]),
        node("Unsqueeze", &["n", "ax0"], &["n1"], vec![]),
        node("Constant", &[], &["m1"], vec![A::Is("value_ints", &[-1])]),
        node("Concat", &["n1", "m1"], &["target"], vec![A::I("axis", 0)]),
        node("Reshape", &[x, "target"], &[out], vec![]),
    ]
}

/// Conv → BatchNorm → Relu → MaxPool → flatten → Gemm, with the fc initializers first.
fn cnn() -> ModelProto {
    let mut nodes = vec![
        node("Conv", &["x", "conv.weight", "conv.bias"], &["c"], vec![A::Is("pads", &[1, 1, 1, 1])]),
        node("BatchNormalization", &["c", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"], &["b"], vec![A::F("epsilon", 1e-5)]),
        node("Relu", &["b"], &["r"], vec![]),
        node("MaxPool", &["r"], &["p"], vec![A::Is("kernel_shape", &[2, 2]), A::Is("strides", &[2, 2])]),
    ];
    nodes.extend(flatten_nodes("p", "f"));
    nodes.push(node("Gemm", &["f", "fc.weight", "fc.bias"], &["logits"], vec![A::I("transB", 1)]));
    let inits = vec![
        seq("fc.weight", &[5, 8]),
        seq("fc.bias", &[5]),
        seq("conv.weight", &[2, 3, 3, 3]),
        seq("conv.bias", &[2]),
        seq("bn.weight", &[2]),
        seq("bn.bias", &[2]),
        raw_f32("bn.running_mean", &[2], &[0.1, -0.2]),
        raw_f32("bn.running_var", &[2], &[1.5, 0.5]),
        ints("bn.num_batches_tracked", &[3]),
    ];
    model(nodes, inits, value_info("x", data_type::FLOAT, &[-1, 3, 4, 4]), "logits")
}

#[test]
fn cnn_imports_with_parameters_in_initializer_order() {
    let dir = tempfile::tempdir().unwrap();
    let m = load(&write(dir.path(), &cnn()), None).unwrap();
    let g = &m.graph;
    assert_eq!(g.input_shape(), [3, 4, 4]);
    assert_eq!(g.outputs(), 5);
    let names: Vec<&str> = g.params.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["fc.weight", "fc.bias", "conv.weight", "conv.bias", "bn.weight", "bn.bias"]);
    assert_eq!(g.param_count(), 40 + 5 + 54 + 2 + 2 + 2);
    assert_eq!(g.params[2].data[1], (0.37f32).sin());
    let ops: Vec<&str> = g.nodes.iter().map(|n| crate::graph::ir::op_name(&n.op)).collect();
    assert_eq!(ops, ["Conv", "BatchNormalization", "Relu", "MaxPool", "Reshape", "Gemm"]);
    assert_eq!(g.tensors[g.nodes[4].output].shape, [8]);
    // Running statistics are constants.
    let bn = &g.nodes[1];
    assert!(matches!(&g.tensors[bn.inputs[3]].kind, TensorKind::Const(v) if v == &[0.1, -0.2]));
    assert_eq!(m.info.opset, 20);
    assert_eq!(m.info.producer, "pytorch 2.9.0");
    assert_eq!(m.info.declared_input, [Dim::Symbolic("batch".into()), Dim::Fixed(3), Dim::Fixed(4), Dim::Fixed(4)]);
}

#[test]
fn a_fixed_batch_in_the_file_is_folded_as_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = cnn();
    let g = m.graph.as_mut().unwrap();
    g.input = vec![value_info("x", data_type::FLOAT, &[2, 3, 4, 4])];
    // Reshape to the literal [2, 8] (a static export bakes the batch in).
    g.node.retain(|n| !matches!(n.op_type.as_str(), "Shape" | "Gather" | "Unsqueeze" | "Concat" | "Constant"));
    g.initializer.push(ints("target", &[2, 8]));
    let graph = load(&write(dir.path(), &m), None).unwrap().graph;
    assert_eq!(graph.input_shape(), [3, 4, 4]);
    assert_eq!(graph.outputs(), 5);
    // A reshape that moves samples into another axis is refused.
    let g = m.graph.as_mut().unwrap();
    g.initializer.last_mut().unwrap().int64_data = vec![1, 16];
    let err = load(&write(dir.path(), &m), None).unwrap_err().to_string();
    assert!(err.contains("mixes the batch axis") && err.contains("node_f"), "{err}");
}

#[test]
fn linear_on_tokens_fuses_transpose_and_bias() {
    // LayerNorm → x @ W.T + b (MatMul of a Transpose, then Add) → Gelu → mean over T.
    let nodes = vec![
        node("LayerNormalization", &["x", "ln.weight", "ln.bias"], &["ln"], vec![A::I("axis", -1)]),
        node("Transpose", &["lin.weight"], &["wt"], vec![A::Is("perm", &[1, 0])]),
        node("MatMul", &["ln", "wt"], &["mm"], vec![]),
        node("Add", &["mm", "lin.bias"], &["lin"], vec![]),
        node("Gelu", &["lin"], &["act"], vec![A::S("approximate", "tanh")]),
        node("Constant", &[], &["axes"], vec![A::Is("value_ints", &[1])]),
        node("ReduceMean", &["act", "axes"], &["pooled"], vec![A::I("keepdims", 0)]),
    ];
    let inits = vec![seq("ln.weight", &[4]), seq("ln.bias", &[4]), seq("lin.weight", &[6, 4]), seq("lin.bias", &[6])];
    let m = model(nodes, inits, value_info("x", data_type::FLOAT, &[-1, -2, 4]), "pooled");
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), &m);
    let err = load(&path, None).unwrap_err().to_string();
    assert!(err.contains("dimension 1 of input x is symbolic"), "{err}");
    let g = load(&path, Some(&[3, 4])).unwrap().graph;
    assert_eq!(g.input_shape(), [3, 4]);
    assert_eq!(g.outputs(), 6);
    let ops: Vec<&Op> = g.nodes.iter().map(|n| &n.op).collect();
    assert_eq!(ops[0], &Op::LayerNorm { axis: 1, epsilon: 1e-5 });
    assert_eq!(ops[1], &Op::MatMul { trans_b: true });
    assert_eq!(g.nodes[1].inputs.len(), 3, "the bias is fused");
    assert_eq!(ops[2], &Op::Unary(UnaryOp::GeluTanh));
    assert_eq!(ops[3], &Op::ReduceMean { axes: vec![0], keepdims: false });
    assert_eq!(g.params.iter().map(|p| p.shape.clone()).collect::<Vec<_>>(), [vec![4], vec![4], vec![6, 4], vec![6]]);
    // The data's fixed dimensions must agree with the file's.
    let err = load(&path, Some(&[3, 5])).unwrap_err().to_string();
    assert!(err.contains("the data has per-sample shape [3, 5]"), "{err}");
}

#[test]
fn embedding_takes_the_integer_input() {
    let nodes = vec![
        node("Gather", &["emb.weight", "tokens"], &["e"], vec![]),
        node("ReduceMean", &["e"], &["m"], vec![A::Is("axes", &[1]), A::I("keepdims", 0)]),
        node("Gemm", &["m", "head.weight", "head.bias"], &["y"], vec![A::I("transB", 1)]),
    ];
    let inits = vec![seq("emb.weight", &[10, 4]), seq("head.weight", &[3, 4]), seq("head.bias", &[3])];
    let mut m = model(nodes, inits, value_info("tokens", data_type::INT64, &[-1, 5]), "y");
    m.opset_import[0].version = 17;
    let dir = tempfile::tempdir().unwrap();
    let g = load(&write(dir.path(), &m), None).unwrap().graph;
    assert_eq!(g.nodes[0].op, Op::Gather);
    assert_eq!(g.input_shape(), [5]);
    assert_eq!(g.param_count(), 40 + 12 + 3);
    // The integer input anywhere else is refused.
    let g = m.graph.as_mut().unwrap();
    g.node.insert(0, node("Relu", &["tokens"], &["bad"], vec![]));
    g.node.push(node("Add", &["y", "bad2"], &["z"], vec![]));
    let err = load(&write(dir.path(), &m), None).unwrap_err().to_string();
    assert!(err.contains("integer input may only feed a Gather"), "{err}");
}

#[test]
fn constant_float_subgraphs_fold() {
    // x / sqrt(4) − mean, then Pow 2, as PyTorch decompositions write them.
    let nodes = vec![
        node("Constant", &[], &["four"], vec![A::F("value_float", 4.0)]),
        node("Sqrt", &["four"], &["two"], vec![]),
        node("Div", &["x", "two"], &["d"], vec![]),
        node("Sub", &["d", "mean"], &["s"], vec![]),
        node("Pow", &["s", "p2"], &["y"], vec![]),
    ];
    let inits = vec![raw_f32("mean", &[1, 3], &[1.0, 2.0, 3.0]), raw_f32("p2", &[], &[2.0])];
    let m = model(nodes, inits, value_info("x", data_type::FLOAT, &[-1, 3]), "y");
    let dir = tempfile::tempdir().unwrap();
    let g = load(&write(dir.path(), &m), None).unwrap().graph;
    assert!(g.params.is_empty());
    assert_eq!(g.nodes[0].op, Op::Binary(BinaryOp::Div));
    assert_eq!(g.shared_data(g.nodes[0].inputs[1]), Some(&[2.0f32][..]));
    // The [1, 3] constant lost its batch axis.
    assert_eq!(g.tensors[g.nodes[1].inputs[1]].shape, [3]);
    assert_eq!(g.nodes[2].op, Op::Binary(BinaryOp::Mul));
}

#[test]
fn external_data_is_read_within_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let w: Vec<f32> = (0..8).map(|i| i as f32).collect();
    let mut bytes = vec![0u8; 16];
    bytes.extend(w.iter().flat_map(|x| x.to_le_bytes()));
    std::fs::write(dir.path().join("model.onnx.data"), &bytes).unwrap();
    let external = |location: &str, offset: &str| TensorProto {
        name: "fc.weight".into(),
        dims: vec![2, 4],
        data_type: data_type::FLOAT,
        data_location: 1,
        external_data: vec![
            StringStringEntryProto { key: "location".into(), value: location.into() },
            StringStringEntryProto { key: "offset".into(), value: offset.into() },
            StringStringEntryProto { key: "length".into(), value: "32".into() },
        ],
        ..Default::default()
    };
    let with = |t: TensorProto| {
        model(vec![node("Gemm", &["x", "fc.weight"], &["y"], vec![A::I("transB", 1)])], vec![t], value_info("x", data_type::FLOAT, &[-1, 4]), "y")
    };
    let g = load(&write(dir.path(), &with(external("model.onnx.data", "16"))), None).unwrap().graph;
    assert_eq!(g.params[0].data, w);
    for (location, offset, needle) in [
        ("../model.onnx.data", "16", "leaves the model's directory"),
        ("sub/../../x", "16", "leaves the model's directory"),
        ("/etc/passwd", "0", "absolute path"),
        ("model.onnx.data", "24", "beyond the end"),
        ("model.onnx.data", "18446744073709551615", "overflows"),
        ("model.onnx.data", "-1", "not a number"),
        ("missing.data", "0", "cannot open external data"),
    ] {
        let err = load(&write(dir.path(), &with(external(location, offset))), None).unwrap_err().to_string();
        assert!(err.contains(needle) && err.contains("initializer fc.weight") && err.contains("model.onnx"), "{location}: {err}");
    }
}

#[test]
fn hostile_files_are_refused_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), &cnn());
    // Truncated.
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.path().join("cut.onnx");
    std::fs::write(&cut, &bytes[..bytes.len() - 7]).unwrap();
    let err = load(&cut, None).unwrap_err().to_string();
    assert!(err.contains("cut.onnx") && err.contains("not an ONNX model"), "{err}");
    // Garbage.
    std::fs::write(&cut, b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff").unwrap();
    assert!(load(&cut, None).is_err());
    // Too large (a sparse file: nothing is written).
    let big = dir.path().join("big.onnx");
    std::fs::File::create(&big).unwrap().set_len(MAX_MODEL_BYTES + 1).unwrap();
    let err = load(&big, None).unwrap_err().to_string();
    assert!(err.contains("2 GiB"), "{err}");
    // Dimensions whose product overflows, or that the bytes do not hold.
    for dims in [vec![1i64 << 40, 1 << 40], vec![1 << 20, 1 << 20], vec![-3, 2]] {
        let mut m = cnn();
        m.graph.as_mut().unwrap().initializer[0].dims = dims.clone();
        let err = load(&write(dir.path(), &m), None).unwrap_err().to_string();
        assert!(err.contains("initializer fc.weight"), "{dims:?}: {err}");
    }
    // A folded constant beyond the import limit.
    let mut m = cnn();
    let g = m.graph.as_mut().unwrap();
    g.initializer.push(ints("huge", &[1 << 20, 1 << 20]));
    g.node.insert(0, node("ConstantOfShape", &["huge"], &["boom"], vec![]));
    let err = load(&write(dir.path(), &m), None).unwrap_err().to_string();
    assert!(err.contains("node_boom") && err.contains("import limit"), "{err}");
    // Two graph inputs; a directory.
    let mut m = cnn();
    m.graph.as_mut().unwrap().input.push(value_info("x2", data_type::FLOAT, &[-1, 3]));
    let err = load(&write(dir.path(), &m), None).unwrap_err().to_string();
    assert!(err.contains("2 inputs (x, x2)"), "{err}");
    assert!(load(dir.path(), None).unwrap_err().to_string().contains("not a regular file"));
    // An undefined input.
    let mut m = cnn();
    m.graph.as_mut().unwrap().node[2].input[0] = "nowhere".into();
    let err = load(&write(dir.path(), &m), None).unwrap_err().to_string();
    assert!(err.contains("nowhere is not defined"), "{err}");
}

#[test]
fn unsupported_nodes_are_named_and_inspect_lists_them_all() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = cnn();
    let g = m.graph.as_mut().unwrap();
    g.node.insert(3, node("Softmax", &["r"], &["sm"], vec![]));
    g.node[4].input[0] = "sm".into();
    let mut custom = node("FancyPool", &["p"], &["p2"], vec![]);
    custom.domain = "com.example".into();
    g.node.insert(5, custom);
    g.node[6].input[0] = "p2".into();
    let path = write(dir.path(), &m);
    let err = load(&path, None).unwrap_err().to_string();
    assert!(err.contains("node node_sm (Softmax): operator Softmax is not supported (supported: Add,"), "{err}");
    assert_eq!(err.lines().count(), 1);
    let report = inspect(&path, None).unwrap();
    let ops: Vec<&str> = report.unsupported.iter().map(|u| u.op.as_str()).collect();
    assert_eq!(ops, ["Softmax", "FancyPool"]);
    assert!(report.unsupported[1].reason.contains("com.example::FancyPool"));
    assert!(report.graph.is_none());
    assert_eq!(report.layers.len(), 3, "Conv, BatchNorm, Relu before the Softmax");
    assert_eq!(report.params.len(), 4);
    // The supported model: no unsupported nodes, the graph, every layer.
    let report = inspect(&write(dir.path(), &cnn()), None).unwrap();
    assert!(report.unsupported.is_empty() && report.graph.is_some());
    assert_eq!(report.param_count(), 105);
    assert_eq!(report.params[0].module, "fc");
}

#[test]
fn refusals_name_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(Box<dyn Fn(&mut GraphProto)>, &str)> = vec![
        (Box::new(|g| g.node[0].attribute.push(AttributeProto { name: "group".into(), r#type: attribute_type::INT, i: 2, ..Default::default() })), "group 2"),
        (Box::new(|g| g.node[1].attribute.push(AttributeProto { name: "training_mode".into(), r#type: attribute_type::INT, i: 1, ..Default::default() })), "training_mode=1"),
        (Box::new(|g| g.node[3].attribute.push(AttributeProto { name: "storage_order".into(), r#type: attribute_type::INT, i: 1, ..Default::default() })), "storage_order"),
        (Box::new(|g| g.node.last_mut().unwrap().attribute.push(AttributeProto { name: "transA".into(), r#type: attribute_type::INT, i: 1, ..Default::default() })), "transA"),
        (Box::new(|g| g.output.push(ValueInfoProto { name: "b".into(), r#type: None })), "2 outputs"),
        (Box::new(|g| g.output[0].name = "p".into()), "must be a per-sample vector"),
        // The fc bias also used through a function of it (folded to a constant).
        (Box::new(|g| {
            g.node.push(node("Sigmoid", &["fc.bias"], &["gate"], vec![]));
            g.node.push(node("Mul", &["logits", "gate"], &["scaled"], vec![]));
            g.output[0].name = "scaled".into();
        }), "is a trainable parameter but node node_scaled uses its values as a constant"),
    ];
    for (edit, needle) in cases {
        let mut m = cnn();
        edit(m.graph.as_mut().unwrap());
        let err = match load(&write(dir.path(), &m), None) {
            Ok(_) => panic!("{needle}: imported"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(needle), "{needle}: {err}");
    }
    // MaxPool's Indices output, when read, is refused.
    let mut m = cnn();
    let g = m.graph.as_mut().unwrap();
    g.node[3].output.push("idx".into());
    g.node.push(node("Cast", &["idx"], &["idxf"], vec![A::I("to", 1)]));
    let err = load(&write(dir.path(), &m), None).unwrap_err().to_string();
    assert!(err.contains("output 1 (idx) is used"), "{err}");
}

#[test]
fn pytorch_softplus_threshold_becomes_softplus() {
    // F.softplus(x) exports as Where(x·β > threshold, x, Softplus(x·β)/β), here β = 1.
    let softplus = |threshold: f32, then: &str, otherwise: &str| {
        let nodes = vec![
            node("Constant", &[], &["beta"], vec![A::F("value_float", 1.0)]),
            node("Mul", &["x", "beta"], &["bx"], vec![]),
            node("Softplus", &["bx"], &["sp"], vec![]),
            node("Div", &["sp", "beta"], &["spd"], vec![]),
            node("Constant", &[], &["thr"], vec![A::F("value_float", threshold)]),
            node("Greater", &["bx", "thr"], &["gt"], vec![]),
            node("Where", &["gt", then, otherwise], &["y"], vec![]),
        ];
        model(nodes, Vec::new(), value_info("x", data_type::FLOAT, &[-1, 3]), "y")
    };
    let dir = tempfile::tempdir().unwrap();
    let g = load(&write(dir.path(), &softplus(20.0, "x", "spd")), None).unwrap().graph;
    let ops: Vec<&Op> = g.nodes.iter().map(|n| &n.op).collect();
    assert_eq!(ops, [&Op::Unary(UnaryOp::Softplus)], "x·1 and y/1 vanish, the linear branch is dropped");
    let err = load(&write(dir.path(), &softplus(5.0, "x", "spd")), None).unwrap_err().to_string();
    assert!(err.contains("too low"), "{err}");
    let err = load(&write(dir.path(), &softplus(20.0, "spd", "x")), None).unwrap_err().to_string();
    assert!(err.contains("node_y (Where)") && err.contains("softplus threshold"), "{err}");
}
