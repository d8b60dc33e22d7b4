//! The `fisher` command line: raw flags → validated configuration → run → report.

pub mod action;
pub mod args;
pub mod bench;
pub mod compute;
pub mod demo;
pub mod devices;
pub mod exit;
pub mod format;
pub mod inspect;
pub mod merge;
pub mod mpi;
pub mod fisher_report;
pub mod reduce;
pub mod train;
