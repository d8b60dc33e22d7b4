//! What a person sees besides numbers: plots (PNG/SVG) and progress bars.

pub mod plot;
pub mod progress;
