//! # fisher-engine
//!
//! Fisher information geometry of neural networks on any GPU (wgpu + WGSL compute shaders),
//! with a multi-threaded f32 CPU path that is both the fallback and the baseline, and an f64
//! reference that verifies both.
//!
//! ## The math
//!
//! For a model p(y | x, θ) with P parameters and N inputs xᵢ, the Fisher information matrix is
//!
//! ```text
//! F = (1/N) Σᵢ E_y[ ∇θ log p(y|xᵢ) ∇θ log p(y|xᵢ)ᵀ ]
//! ```
//!
//! Given the per-sample gradient matrix `G` (N×P, row i = gᵢ = ∇θ log p(yᵢ|xᵢ)), the forms
//! computed here are (see [`fisher::form`]): F = GᵀG/N, diag(F), diagonal blocks of F, the Gram
//! matrix GGᵀ/N (its non-zero eigenvalues equal F's), and the per-sample norms ‖gᵢ‖² with
//! tr F = (1/N) Σᵢ ‖gᵢ‖².
//!
//! ## Layouts and conventions
//!
//! * `G` is row-major f32, N×P, one row per sample. Parameter order is the caller's; for
//!   PyTorch models it is `named_parameters()` order with each weight flattened row-major.
//! * Normalization is always 1/N (a mean over samples), never 1/(N−1).
//! * Full and Gram results are exactly symmetric (the upper triangle is computed and mirrored).
//! * Accumulation is compensated: f32 products are summed in short blocks, the block sums
//!   are combined with Kahan summation (GPU) or in f64 (CPU), and the division by N happens
//!   in f64. For N = 65,536 this keeps max|ΔF| ≤ 2·10⁻⁶·max|F| against the f64 reference.
//!
//! ## Example
//!
//! ```
//! use fisher_engine::{Backend, Engine, FisherMatrix, Form};
//! let grads = fisher_engine::synthetic::gradient_like(256, 16, 7);
//! let engine = Engine::new(Backend::Auto)?; // a hardware GPU if one exists, else the CPU
//! let verified = engine.fisher_from_grads_verified(grads.view(), &Form::Diagonal)?;
//! assert!(verified.agreement.max_rel < 1e-5);
//! # Ok::<(), fisher_engine::FisherError>(())
//! ```
#![warn(missing_docs)]

pub mod analysis;
pub mod backend;
pub mod bench;
pub mod compare;
pub mod demo;
pub mod device;
pub mod engine;
pub mod error;
pub mod fisher;
pub mod graph;
pub mod io;
pub mod model;
pub mod output;
pub mod pipeline;
pub mod reference;
pub mod synthetic;
pub mod validate;
pub mod verify;

/// The most values (8 GiB of f32) that a command generates in memory from a size it was
/// given (`--synthetic`, `--synthetic-model`, bench inputs, training data): past it, a typo
/// would rather exhaust memory than demonstrate anything.
pub const MAX_GENERATED_VALUES: u128 = 1 << 31;

pub use backend::{Accumulator, FisherBackend};
pub use engine::{Backend, Engine, EngineOptions, Verified};
pub use error::{FisherError, Result};
pub use fisher::{Agreement, FisherMatrix, Form};

/// The README's Rust examples, compiled and run as doc-tests so that they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
