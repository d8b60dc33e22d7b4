//! The GPU path.
use ndarray::{Array2, ArrayView2};

use crate::backend::{Accumulator, FisherBackend};
use crate::error::Result;
use crate::form::Form;

/// Options for adapter choice and limits.
#[derive(Debug, Clone, Default)]
pub struct GpuOptions {
    /// Substring of the adapter name to pick (default: `FISHER_ADAPTER`).
    pub adapter: Option<String>,
    /// Lowers the adapter's `max_storage_buffer_binding_size` (tests use it to force tiling).
    pub max_binding_bytes: Option<u64>,
    /// Device memory budget in bytes.
    pub memory_budget_bytes: Option<u64>,
}

/// GPU context.
pub struct GpuContext {}
impl GpuContext {
    /// Makes a context.
    pub fn new(_o: &GpuOptions) -> Result<Self> {
        Err(crate::FisherError::NoAdapter("todo".into()))
    }
}
/// GPU backend.
pub struct GpuBackend {}
impl GpuBackend {
    /// new
    pub fn new(_c: GpuContext, _o: &GpuOptions) -> Result<Self> {
        todo!()
    }
}
impl FisherBackend for GpuBackend {
    fn label(&self) -> String {
        todo!()
    }
    fn accumulator<'a>(&'a self, _form: &Form, _params: usize) -> Result<Box<dyn Accumulator + 'a>> {
        todo!()
    }
    fn gram(&self, _grads: ArrayView2<'_, f32>) -> Result<Array2<f32>> {
        todo!()
    }
}
