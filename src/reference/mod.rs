//! The f64 references: simple, slow, correct oracles, independent of the f32 paths, used
//! by the tests and by `--verify`. [`grads`] reduces given per-sample gradients with
//! compensated (Neumaier) sums; [`network`] runs its own per-sample backprop (checked by
//! finite differences in the tests).

pub mod grads;
pub mod network;
