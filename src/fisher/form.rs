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
                        "unknown form '{text}' (expected full, diag, gram, norms or blocks:<sizes>)"
                    )));
                };
                let sizes = sizes
                    .split(',')
                    .map(|s| {
                        s.trim().parse::<usize>().ok().filter(|&v| v > 0).ok_or_else(|| {
                            FisherError::InvalidInput(format!(
                                "block size '{s}' in '{text}' is not a positive integer"
                            ))
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(Form::BlockDiagonal(sizes))
            }
        }
    }

    /// Checks the form against the number of parameters `p`.
    pub fn validate(&self, p: usize) -> Result<()> {
        if let Form::BlockDiagonal(sizes) = self {
            if sizes.is_empty() || sizes.contains(&0) {
                return Err(FisherError::InvalidInput("block sizes must be positive".into()));
            }
            let total: usize = sizes.iter().sum();
            if total != p {
                return Err(FisherError::InvalidInput(format!(
                    "block sizes sum to {total} but the gradients have {p} parameters"
                )));
            }
        }
        Ok(())
    }

    /// Start offsets of the blocks of a [`Form::BlockDiagonal`] (empty for other forms).
    pub fn block_starts(&self) -> Vec<usize> {
        match self {
            Form::BlockDiagonal(sizes) => sizes
                .iter()
                .scan(0usize, |acc, &s| {
                    let start = *acc;
                    *acc += s;
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
}
