//! Host-side input checks shared by every backend: shapes, emptiness, finiteness.

use ndarray::ArrayView2;

use crate::error::{FisherError, Result};

/// Fails with [`FisherError::Empty`] for a matrix with no rows or columns, and with
/// [`FisherError::NonFinite`] naming the first (row-major) NaN/±Inf entry.
///
/// `row_offset` is added to the reported row, so that a streamed chunk reports the row
/// in the whole input.
pub fn check_matrix(what: &str, m: ArrayView2<'_, f32>, row_offset: usize) -> Result<()> {
    if m.nrows() == 0 || m.ncols() == 0 {
        return Err(FisherError::Empty { what: what.into(), rows: m.nrows(), cols: m.ncols() });
    }
    for (r, row) in m.outer_iter().enumerate() {
        if let Some((c, &v)) = row.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(FisherError::NonFinite {
                what: what.into(),
                row: r + row_offset,
                col: c,
                value: v,
            });
        }
    }
    Ok(())
}
