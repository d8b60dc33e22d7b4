//! Fisher forms (what to reduce the per-sample gradients to) and their results.
//!
//! All forms are defined on a per-sample gradient matrix `G` (N samples × P parameters,
//! row-major, row `i` = gᵢ):
//!
//! | form | result | definition |
//! |---|---|---|
//! | [`Form::Full`] | `fisher` (P×P) | F = GᵀG / N = (1/N) Σᵢ gᵢ gᵢᵀ |
//! | [`Form::Diagonal`] | `diag` (P) | diag(F)ⱼ = (1/N) Σᵢ Gᵢⱼ² |
//! | [`Form::BlockDiagonal`] | `block.<b>` (P_b×P_b) | the diagonal block of F over columns [s_b, s_b+P_b) |
//! | [`Form::Gram`] | `gram` (N×N) | K = G Gᵀ / N, the dual of F: same non-zero spectrum |
//! | [`Form::SampleNorms`] | `norms` (N) | ‖gᵢ‖², so that tr F = mean ‖gᵢ‖² |

use ndarray::{Array1, Array2};

use crate::error::{FisherError, Result};
use crate::validate::quote;

/// What to reduce the per-sample gradients to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Form {
    /// The full P×P Fisher matrix F = GᵀG / N.
    Full,
    /// Its diagonal.
    Diagonal,
    /// Dense diagonal blocks of consecutive parameter ranges; the sizes must sum to P.
    BlockDiagonal(Vec<usize>),
    /// The N×N Gram matrix G Gᵀ / N.
    Gram,
    /// Per-sample squared gradient norms ‖gᵢ‖² (not divided by N).
    SampleNorms,
}

impl Form {
    /// Parses the CLI spelling: `full`, `diag`, `gram`, `norms`, `blocks:<s1>,<s2>,...`.
    pub fn parse(text: &str) -> Result<Form> {
        match text {
            "full" => Ok(Form::Full),
            "diag" | "diagonal" => Ok(Form::Diagonal),
            "gram" => Ok(Form::Gram),
            "norms" => Ok(Form::SampleNorms),
            _ => {
                let Some(sizes) = text.strip_prefix("blocks:") else {
                    return Err(FisherError::InvalidInput(format!(
                        "unknown form '{}' (expected full, diag, gram, norms or blocks:<sizes>)",
                        quote(text)
                    )));
                };
                let sizes = sizes
                    .split(',')
                    .map(|s| {
                        s.trim().parse::<usize>().ok().filter(|&v| v > 0).ok_or_else(|| {
                            FisherError::InvalidInput(format!(
                                "block size '{}' in '{}' is not a positive integer",
                                quote(s),
                                quote(text)
                            ))
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(Form::BlockDiagonal(sizes))
            }
        }
    }

    /// Checks the form against the number of parameters `p`: the block sizes of a
    /// [`Form::BlockDiagonal`] must be positive and sum to `p`. The sum is checked
    /// arithmetic, so sizes whose sum wraps around (`blocks:18446744073709551615,11` on
    /// P = 10) are refused, with the spec named.
    pub fn validate(&self, p: usize) -> Result<()> {
        if let Form::BlockDiagonal(sizes) = self {
            if sizes.is_empty() || sizes.contains(&0) {
                return Err(FisherError::InvalidInput("block sizes must be positive".into()));
            }
            let Some(total) = sizes.iter().try_fold(0usize, |acc, &s| acc.checked_add(s)) else {
                return Err(FisherError::InvalidInput(format!(
                    "block sizes of '{}' sum to more than {} but the gradients have {p} parameters",
                    quote(&self.to_string()),
                    usize::MAX
                )));
            };
            if total != p {
                return Err(FisherError::InvalidInput(format!(
                    "block sizes sum to {total} but the gradients have {p} parameters"
                )));
            }
        }
        Ok(())
    }

    /// The number of values of the result of this form on N = `n` samples of P = `p`
    /// parameters (P² for full, P for diag, Σ P_b² for blocks, N² for gram, N for norms),
    /// checked: an error naming the numbers when it overflows, or when the result could not
    /// be one allocation of f32 (more than `isize::MAX` bytes). Call [`Form::validate`]
    /// first for the block sizes' sum.
    ///
    /// ```
    /// use fisher_engine::Form;
    /// assert_eq!(Form::Full.result_len(10, 3)?, 9);
    /// assert_eq!(Form::BlockDiagonal(vec![1, 2]).result_len(10, 3)?, 5);
    /// assert!(Form::Gram.result_len(1 << 40, 3).is_err());
    /// # Ok::<(), fisher_engine::FisherError>(())
    /// ```
    pub fn result_len(&self, n: usize, p: usize) -> Result<usize> {
        let square = |side: usize| side.checked_mul(side);
        let len = match self {
            Form::Full => square(p),
            Form::Diagonal => Some(p),
            Form::Gram => square(n),
            Form::SampleNorms => Some(n),
            Form::BlockDiagonal(sizes) => {
                sizes.iter().try_fold(0usize, |acc, &s| acc.checked_add(square(s)?))
            }
        };
        len.filter(|&len| len <= isize::MAX as usize / std::mem::size_of::<f32>()).ok_or_else(|| {
            FisherError::InvalidInput(format!(
                "the {} form of {n} samples × {p} parameters has more values than fit in memory",
                quote(&self.to_string())
            ))
        })
    }

    /// Start offsets of the blocks of a [`Form::BlockDiagonal`] (empty for other forms).
    /// Saturates rather than wrapping for sizes that [`Form::validate`] refuses.
    pub fn block_starts(&self) -> Vec<usize> {
        match self {
            Form::BlockDiagonal(sizes) => sizes
                .iter()
                .scan(0usize, |acc, &s| {
                    let start = *acc;
                    *acc = acc.saturating_add(s);
                    Some(start)
                })
                .collect(),
            _ => Vec::new(),
        }
    }
}

impl Form {
    /// What the form is, in words (for reports).
    pub fn description(&self) -> String {
        match self {
            Form::Full => "full Fisher matrix F = GᵀG/N".into(),
            Form::Diagonal => "diagonal of the Fisher matrix, diag(GᵀG/N)".into(),
            Form::BlockDiagonal(sizes) => format!("{} diagonal blocks of the Fisher matrix GᵀG/N", sizes.len()),
            Form::Gram => "Gram matrix K = GGᵀ/N (the dual of F: same non-zero spectrum)".into(),
            Form::SampleNorms => "per-sample squared gradient norms ‖gᵢ‖²".into(),
        }
    }
}

/// The command-line spelling, which [`Form::parse`] reads back: `full`, `diag`, `gram`,
/// `norms`, `blocks:3,5`.
impl std::fmt::Display for Form {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Form::Full => f.write_str("full"),
            Form::Diagonal => f.write_str("diag"),
            Form::Gram => f.write_str("gram"),
            Form::SampleNorms => f.write_str("norms"),
            Form::BlockDiagonal(sizes) => {
                write!(f, "blocks:{}", sizes.iter().map(usize::to_string).collect::<Vec<_>>().join(","))
            }
        }
    }
}

impl std::str::FromStr for Form {
    type Err = FisherError;
    fn from_str(text: &str) -> Result<Form> {
        Form::parse(text)
    }
}

/// A reduced Fisher form. `T` is `f32` for the compute paths and `f64` for the reference.
#[derive(Debug, Clone, PartialEq)]
pub enum FisherMatrix<T = f32> {
    /// F (P×P), symmetric.
    Full(Array2<T>),
    /// diag(F) (P).
    Diagonal(Array1<T>),
    /// Diagonal blocks of F, in parameter order.
    BlockDiagonal(Vec<Array2<T>>),
    /// G Gᵀ / N (N×N).
    Gram(Array2<T>),
    /// ‖gᵢ‖² (N).
    SampleNorms(Array1<T>),
}

/// Worst-case disagreement between a result and the f64 reference.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Agreement {
    /// max |x − ref|.
    pub max_abs: f64,
    /// max |x − ref| / max |ref| (the scale-free measure used by the tolerances).
    pub max_rel: f64,
    /// ‖x − ref‖_F / ‖ref‖_F.
    pub frobenius_rel: f64,
    /// max |ref|, the scale of the absolute tolerance (not reported: max_abs/max_rel).
    #[serde(skip)]
    pub max_ref: f64,
}

impl<T: Copy + Into<f64>> FisherMatrix<T> {
    /// The kind of form as its CLI/tensor name.
    pub fn name(&self) -> &'static str {
        match self {
            FisherMatrix::Full(_) => "fisher",
            FisherMatrix::Diagonal(_) => "diag",
            FisherMatrix::BlockDiagonal(_) => "block",
            FisherMatrix::Gram(_) => "gram",
            FisherMatrix::SampleNorms(_) => "norms",
        }
    }

    /// Trace of the form (for norms: their mean, which equals tr F).
    pub fn trace(&self) -> f64 {
        match self {
            FisherMatrix::Full(m) | FisherMatrix::Gram(m) => m.diag().iter().map(|&v| v.into()).sum(),
            FisherMatrix::Diagonal(d) => d.iter().map(|&v| v.into()).sum(),
            FisherMatrix::BlockDiagonal(blocks) => blocks
                .iter()
                .map(|b| b.diag().iter().map(|&v| v.into()).sum::<f64>())
                .sum(),
            FisherMatrix::SampleNorms(n) => {
                n.iter().map(|&v| v.into()).sum::<f64>() / n.len().max(1) as f64
            }
        }
    }

    /// Every stored value, in the order of the file's tensors ([`crate::io::fisher_file`]).
    pub fn values(&self) -> Vec<f64> {
        match self {
            FisherMatrix::Full(m) | FisherMatrix::Gram(m) => m.iter().map(|&v| v.into()).collect(),
            FisherMatrix::Diagonal(d) | FisherMatrix::SampleNorms(d) => d.iter().map(|&v| v.into()).collect(),
            FisherMatrix::BlockDiagonal(blocks) => {
                blocks.iter().flat_map(|b| b.iter().map(|&v| v.into())).collect()
            }
        }
    }

    /// Compares against a reference of the same form. Errors if the shapes differ.
    pub fn agreement<U: Copy + Into<f64>>(&self, reference: &FisherMatrix<U>) -> Result<Agreement> {
        if self.name() != reference.name() {
            return Err(FisherError::InvalidInput("cannot compare different forms".into()));
        }
        let (a, b) = (self.values(), reference.values());
        if a.len() != b.len() {
            return Err(FisherError::InvalidInput(format!(
                "cannot compare forms with {} and {} values",
                a.len(),
                b.len()
            )));
        }
        Ok(agreement_of(&a, &b))
    }
}

/// Scale-free comparison of two equally long value lists (`b` is the reference).
pub fn agreement_of(a: &[f64], b: &[f64]) -> Agreement {
    let mut max_abs = 0.0f64;
    let mut max_ref = 0.0f64;
    let (mut diff2, mut ref2) = (0.0f64, 0.0f64);
    for (&x, &r) in a.iter().zip(b) {
        let d = (x - r).abs();
        // NaN must never compare as "agreeing": propagate it.
        max_abs = if d.is_nan() || d > max_abs { d } else { max_abs };
        max_ref = max_ref.max(r.abs());
        diff2 += d * d;
        ref2 += r * r;
    }
    let safe = |num: f64, den: f64| if den > 0.0 { num / den } else { num };
    Agreement {
        max_abs,
        max_rel: safe(max_abs, max_ref),
        frobenius_rel: safe(diff2.sqrt(), ref2.sqrt()),
        max_ref,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spelling_round_trips() {
        for form in [Form::Full, Form::Diagonal, Form::Gram, Form::SampleNorms, Form::BlockDiagonal(vec![3, 5])] {
            assert_eq!(form.to_string().parse::<Form>().unwrap(), form);
        }
        assert_eq!(Form::BlockDiagonal(vec![3, 5]).to_string(), "blocks:3,5");
    }

    #[test]
    fn block_sizes_that_wrap_around_are_refused_naming_the_spec() {
        let form = Form::parse("blocks:18446744073709551615,11").unwrap();
        let message = form.validate(10).unwrap_err().to_string();
        assert_eq!(
            message,
            "invalid input: block sizes of 'blocks:18446744073709551615,11' sum to more than \
             18446744073709551615 but the gradients have 10 parameters"
        );
        assert_eq!(form.block_starts(), [0, usize::MAX]);
        assert!(form.result_len(4, 10).is_err());
    }

    #[test]
    fn result_sizes_are_checked() {
        assert_eq!(Form::Diagonal.result_len(usize::MAX, 7).unwrap(), 7);
        assert_eq!(Form::SampleNorms.result_len(7, usize::MAX).unwrap(), 7);
        let message = Form::Full.result_len(3, 1 << 32).unwrap_err().to_string();
        assert!(message.contains("full form of 3 samples × 4294967296 parameters"), "{message}");
    }

    #[test]
    fn quoted_specs_are_bounded() {
        let long = format!("blocks:{}", "9".repeat(10_000));
        let message = Form::parse(&long).unwrap_err().to_string();
        assert!(message.len() < 300 && message.contains('…'), "{message}");
        let message = Form::parse(&"x\n".repeat(5_000)).unwrap_err().to_string();
        assert!(message.len() < 300 && !message.contains('\n'), "{message}");
    }
}
