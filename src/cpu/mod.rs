//! The CPU path: fast multi-threaded f32 ([`CpuBackend`]) and the f64 oracle ([`reference`]).

pub mod reference;

use ndarray::{Array2, ArrayView2};

use crate::backend::{Accumulator, FisherBackend};
use crate::error::Result;
use crate::form::Form;

/// Multi-threaded f32 CPU backend.
#[derive(Debug, Default)]
pub struct CpuBackend {}

impl CpuBackend {
    /// A backend using rayon's global thread pool.
    pub fn new() -> Self {
        CpuBackend {}
    }
}

impl FisherBackend for CpuBackend {
    fn label(&self) -> String {
        format!("cpu: {} threads", rayon::current_num_threads())
    }
    fn accumulator<'a>(&'a self, _form: &Form, _params: usize) -> Result<Box<dyn Accumulator + 'a>> {
        todo!("helper")
    }
    fn gram(&self, _grads: ArrayView2<'_, f32>) -> Result<Array2<f32>> {
        todo!("helper")
    }
}
