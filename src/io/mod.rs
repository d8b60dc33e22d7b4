//! File formats: numpy `.npy` in, safetensors out (written atomically), and the Fisher
//! result file on top of safetensors.
//!
//! * [`npy`]: [`read_npy_matrix`] loads a whole N×P gradient matrix; [`NpyRows`] streams it
//!   in chunks of rows, so that reductions whose result does not grow with N also use memory
//!   that does not grow with N. Both accept `float32` and `float64` in either byte order, C
//!   order only, and convert to `f32`. [`write_npy_matrix`] / [`write_npy_matrix_f64`] /
//!   [`write_npy_labels`] write C-order `.npy` files (tests, examples, exported data).
//! * [`safetensors`]: [`write_safetensors_atomic`] writes what `safetensors.torch.load_file`
//!   reads; [`read_safetensors`] reads tensors and metadata back.
//! * [`output`]: every output goes through a temporary file in the destination directory
//!   that is renamed into place only when complete ([`output_temp_file`]), after
//!   [`check_output_path`] refused a bad location before any work.
//! * [`fisher_file`]: the Fisher result file that `fisher compute`, `fisher reduce` and
//!   `fisher demo` write and `fisher report --fisher` reads: one writer, one reader.
//!
//! Every error names the file it is about.

use std::path::Path;

use crate::error::FisherError;

pub mod fisher_file;
pub mod partial;
pub mod npy;
pub(crate) mod npy_file;
pub mod output;
pub mod safetensors;

pub use npy::{read_npy_matrix, write_npy_labels, write_npy_matrix, write_npy_matrix_f64, NpyRows};
pub use output::{check_output_path, output_dir, output_temp_file};
pub use safetensors::{read_safetensors, write_safetensors_atomic, NamedTensor};

/// The error for `path` (the crate's one constructor of [`FisherError::Io`]).
pub(crate) fn io_error(path: &Path, message: impl Into<String>) -> FisherError {
    FisherError::io(path, message)
}
