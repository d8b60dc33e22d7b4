//! Host-side input checks shared by every backend: shapes, emptiness, finiteness; and
//! [`quote`], the bound on input quoted in error messages.

use ndarray::{ArrayView1, ArrayView2, Axis};
use rayon::prelude::*;

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
    // Every entry finite? In parallel over rows, branch-free within a row (so that it
    // vectorizes); the first bad entry is looked for only when there is one.
    let finite = |row: ArrayView1<'_, f32>| match row.as_slice() {
        Some(values) => all_finite(values),
        None => row.iter().all(|v| v.is_finite()),
    };
    if m.axis_iter(Axis(0)).into_par_iter().all(finite) {
        return Ok(());
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

/// Whether every value is finite: an f32 is NaN or ±Inf exactly when its exponent bits are
/// all ones, so the maximum of the masked exponents decides it without branches (one
/// integer max per value, which vectorizes; `is_finite` per value did not as well: 2 % of
/// W3's empirical diag checked its inputs).
pub(crate) fn all_finite(values: &[f32]) -> bool {
    const EXPONENT: u32 = 0x7f80_0000;
    values.iter().fold(0, |m, &x| m.max(x.to_bits() & EXPONENT)) < EXPONENT
}

/// Input quoted in an error message: at most [`QUOTE_CHARS`] characters (then `…`), with
/// control characters (newlines, tabs, …) escaped, so that every message stays one line of
/// bounded length whatever a file or a flag holds.
pub fn quote(text: &str) -> String {
    let mut out = String::new();
    for (count, c) in text.chars().enumerate() {
        if count == QUOTE_CHARS {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// How many characters of an input [`quote`] keeps: enough to recognize a key, a dtype or a
/// spec, short enough that a message fits a terminal line or two.
pub const QUOTE_CHARS: usize = 80;
