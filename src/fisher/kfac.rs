//! Expanding KFAC factors to the dense layer block they approximate, in PyTorch order.
//!
//! ## Kronecker order
//! For a layer z = W a + b (W out×in), write the augmented weight [W | b] (out × (in+1)) and
//! ã = [a; 1]. Its gradient is δ ãᵀ, and flattening it row-major puts parameter (o, i) at
//! index o·(in+1) + i, with i = in the bias of output o. In that order,
//!
//! ```text
//! vec(δ ãᵀ) vec(δ ãᵀ)ᵀ = (δ δᵀ) ⊗ (ã ãᵀ),   so   F_block ≈ G ⊗ A
//! (G ⊗ A)[o·(in+1) + i, o'·(in+1) + i'] = G[o, o'] · A[i, i']
//! ```
//!
//! with A = (1/N) Σ ã ãᵀ and G = (1/N) Σ E[δ δᵀ] (the expectation of a product replaced by
//! the product of expectations: that is the KFAC approximation). For N = 1 and one output
//! row it is exact.
//!
//! PyTorch's `named_parameters()` order is not the augmented order: it lists the whole weight
//! row-major (o·in + i) and *then* the bias (in·out + o). [`augmented_to_pytorch`] gives the
//! permutation and [`kfac_expand`] applies it, so that its result is directly comparable with
//! the `layer` block. Without a bias, A is in×in, ã = a, and G ⊗ A is already in PyTorch
//! order (the permutation is the identity).

use ndarray::{Array2, LinalgScalar};

use super::network::KfacFactors;
use crate::error::{FisherError, Result};

/// `perm[o·in_aug + i]` = the PyTorch-order index of augmented parameter (o, i), where
/// in_aug = in + 1 with a bias (i = in is the bias of output o, at in·out + o) and in
/// without; weight (o, i) is at o·in + i.
///
/// ```
/// // 2 outputs, 1 input, with bias: augmented order (w00, b0, w10, b1); PyTorch (w00, w10, b0, b1).
/// assert_eq!(fisher_engine::fisher::augmented_to_pytorch(1, 2, true), [0, 2, 1, 3]);
/// ```
pub fn augmented_to_pytorch(fan_in: usize, fan_out: usize, has_bias: bool) -> Vec<usize> {
    let augmented_in = fan_in + has_bias as usize;
    let mut perm = Vec::with_capacity(fan_out * augmented_in);
    for o in 0..fan_out {
        for i in 0..augmented_in {
            perm.push(if i < fan_in { o * fan_in + i } else { fan_in * fan_out + o });
        }
    }
    perm
}

/// The dense P_l×P_l approximation G ⊗ A of a layer's Fisher block, in PyTorch parameter
/// order (weight row-major, then bias): entry (θ, θ') for θ = (o, i), θ' = (o', i') is
/// G[o, o'] · A[i, i'], with i = in standing for the bias (the trailing 1 of ã).
///
/// `has_bias` says whether A is (in+1)×(in+1) (its last row/column from the trailing 1) or
/// in×in. Errors when a factor is not square.
///
/// ```
/// use fisher_engine::fisher::{kfac_expand, KfacFactors};
/// use ndarray::array;
/// // in = 1 with bias (A is 2×2), out = 1: P_l = 2 (weight, bias), the block is g·A.
/// let factors = KfacFactors { a: array![[4.0, 2.0], [2.0, 1.0]], g: array![[3.0]] };
/// assert_eq!(kfac_expand(&factors, true)?, array![[12.0, 6.0], [6.0, 3.0]]);
/// # Ok::<(), fisher_engine::FisherError>(())
/// ```
pub fn kfac_expand<T: LinalgScalar>(factors: &KfacFactors<T>, has_bias: bool) -> Result<Array2<T>> {
    let (a, g) = (&factors.a, &factors.g);
    if !a.is_square() || !g.is_square() {
        return Err(FisherError::InvalidInput(format!(
            "KFAC factors must be square, got A {:?} and G {:?}",
            a.dim(),
            g.dim()
        )));
    }
    let augmented_in = a.nrows();
    if has_bias && augmented_in == 0 {
        return Err(FisherError::InvalidInput(
            "a layer with a bias has an (in+1)×(in+1) A factor, but A is empty".into(),
        ));
    }
    let fan_in = augmented_in - has_bias as usize;
    let fan_out = g.nrows();
    let perm = augmented_to_pytorch(fan_in, fan_out, has_bias);
    let size = perm.len();
    let mut block = Array2::<T>::zeros((size, size));
    for o in 0..fan_out {
        for i in 0..augmented_in {
            let row = perm[o * augmented_in + i];
            for o2 in 0..fan_out {
                let g_value = g[[o, o2]];
                for i2 in 0..augmented_in {
                    block[[row, perm[o2 * augmented_in + i2]]] = g_value * a[[i, i2]];
                }
            }
        }
    }
    Ok(block)
}
