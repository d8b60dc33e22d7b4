//! The Fisher forms and results: what a reduction produces (full, diagonal, blocks, Gram,
//! norms; per-layer blocks and KFAC factors for networks), the variants (which expectation
//! over y), and the KFAC layout.

pub mod exact;
pub mod form;
pub mod kfac;
pub mod network;
pub mod sink;
pub mod sums;
pub mod variant;

pub use exact::ExactSum;
pub use form::{agreement_of, Agreement, FisherMatrix, Form};
pub use kfac::{augmented_to_pytorch, kfac_expand};
pub use network::{Fvp, KfacFactors, NetFisher, NetForm};
pub use sink::{MemorySink, ResultSink, TraceOf};
pub use sums::{shard_range, NetSums, SumLayer, DEFAULT_BLOCK_SAMPLES};
pub use variant::{MAX_MC_SAMPLES, mc_class, mc_normal, mc_uniform, pcg_hash, rows_per_sample, Variant};
