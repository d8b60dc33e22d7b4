//! Networks as graphs of operators, read from ONNX: the IR ([`ir`]), the importer
//! ([`onnx`]), the f64 reference ([`reference`]), and the lowering to a small set of
//! differentiable primitives ([`prim`]) that the CPU and GPU backends execute.
//!
//! The data flow of a graph Fisher: ONNX file → [`ir::Graph`] (typed operators, static
//! per-sample shapes, parameters in `named_parameters()` order) → a primitive program
//! (forward; its reverse-mode program gives per-sample parameter gradients of the output
//! rows of each variant; its forward-mode program gives J·v for F·v) → the Fisher forms.

pub mod ir;
pub mod prim;
pub mod exec;
pub mod lower;
pub mod autodiff;
pub mod fisher;
pub mod reference;
pub mod onnx;
pub mod gpu;

pub use ir::{BinaryOp, Graph, GraphBuilder, InputType, Node, Op, Param, Tensor, TensorId, TensorKind, UnaryOp, Window};
