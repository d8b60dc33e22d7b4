//! `fisher inspect`: what the importer makes of an ONNX model: its layers, its parameters
//! (the θ order every other command uses), and every node it cannot convert.

use std::path::PathBuf;

use clap::Args;
use fisher_engine::graph::onnx::{self, Inspection};
use serde_json::json;

use super::exit::usage;

/// Flags of `fisher inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The ONNX model (its external data, e.g. model.onnx.data, beside it).
    #[arg(long, value_name = "M.onnx")]
    pub model: PathBuf,
    /// The per-sample input shape, without the batch (e.g. 3,32,32): needed only when the
    /// file leaves a non-batch input dimension symbolic.
    #[arg(long, value_name = "D1,D2,...")]
    pub input_shape: Option<String>,
    /// Print one JSON line instead of tables.
    #[arg(long)]
    pub json: bool,
}

fn parse_shape(text: &str) -> anyhow::Result<Vec<usize>> {
    text.split(',')
        .map(|d| d.trim().parse::<usize>().map_err(|_| usage(format!("--input-shape {text:?}: {d:?} is not a dimension"))))
        .collect()
}

fn dims(shape: &[usize]) -> String {
    format!("[{}]", shape.iter().map(usize::to_string).collect::<Vec<_>>().join(", "))
}

/// The readable report.
pub fn human(r: &Inspection) -> String {
    let i = &r.info;
    let declared = i.declared_input.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
    let mut out = vec![
        format!("model: {} nodes, opset {}, IR version {}, produced by {}", i.nodes, i.opset, i.ir_version, if i.producer.is_empty() { "?" } else { &i.producer }),
        format!(
            "input: {} {:?} declared [{declared}], per sample {}; output: {}",
            i.input_name,
            i.input_type,
            dims(&i.input_shape),
            i.output_name
        ),
        String::new(),
        format!("layers ({}):", r.layers.len()),
    ];
    let w = r.layers.iter().map(|l| l.name.len()).max().unwrap_or(0);
    for l in &r.layers {
        out.push(format!("  {:<w$}  {:<20} {}", l.name, l.op, dims(&l.output_shape)));
    }
    out.push(String::new());
    out.push(format!("parameters ({}, P = {}):", r.params.len(), r.param_count()));
    let w = r.params.iter().map(|p| p.name.len()).max().unwrap_or(0);
    for p in &r.params {
        out.push(format!("  {:<w$}  {:<18} {:>10}  {}", p.name, dims(&p.shape), p.count, p.module));
    }
    if !r.unsupported.is_empty() {
        out.push(String::new());
        out.push(format!("unsupported nodes ({}):", r.unsupported.len()));
        for u in &r.unsupported {
            out.push(format!("  {} ({}): {}", u.node, u.op, u.reason));
        }
    }
    out.join("\n")
}

/// The `--json` line.
pub fn json_line(r: &Inspection) -> String {
    let i = &r.info;
    json!({
        "model": {
            "ir_version": i.ir_version,
            "opset": i.opset,
            "producer": i.producer,
            "nodes": i.nodes,
            "input": i.input_name,
            "input_type": format!("{:?}", i.input_type).to_lowercase(),
            "declared_input": i.declared_input.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "input_shape": i.input_shape,
            "output": i.output_name,
        },
        "layers": r.layers.iter().map(|l| json!({"name": l.name, "op": l.op, "output_shape": l.output_shape})).collect::<Vec<_>>(),
        "parameters": r.params.iter().map(|p| json!({"name": p.name, "shape": p.shape, "count": p.count, "module": p.module})).collect::<Vec<_>>(),
        "total_parameters": r.param_count(),
        "outputs": r.graph.as_ref().map(|g| g.outputs()),
        "unsupported": r.unsupported.iter().map(|u| json!({"node": u.node, "op": u.op, "reason": u.reason})).collect::<Vec<_>>(),
    })
    .to_string()
}

/// Runs `fisher inspect`: prints the report, then fails (exit 2) if any node is unsupported.
pub fn run(args: &InspectArgs) -> anyhow::Result<()> {
    let shape = args.input_shape.as_deref().map(parse_shape).transpose()?;
    let report = onnx::inspect(&args.model, shape.as_deref())?;
    println!("{}", if args.json { json_line(&report) } else { human(&report) });
    match report.unsupported.first() {
        None => Ok(()),
        Some(first) => Err(usage(format!(
            "{}: {} unsupported node{} (first: {} ({}))",
            args.model.display(),
            report.unsupported.len(),
            if report.unsupported.len() == 1 { "" } else { "s" },
            first.node,
            first.op
        ))),
    }
}
