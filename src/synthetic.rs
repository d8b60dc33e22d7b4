//! Seeded synthetic data: reproducible across platforms and crate versions.
//!
//! A SplitMix64 stream (Steele, Lea & Flood 2014) feeding a Box–Muller transform. We do not
//! use `rand`'s `StdRng` because its output stream is not promised to stay the same across
//! versions, and seeded test inputs and `--synthetic` demo data must.

use ndarray::Array2;

/// SplitMix64: tiny, fast, passes BigCrush; good enough for test data (not for crypto).
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A stream starting from `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        // Multiply-shift; the bias is < n / 2⁶⁴, irrelevant for test data.
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Standard normal (Box–Muller; one of the pair is discarded for simplicity).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]: avoids ln(0)
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// An `rows × cols` matrix of independent standard normal f32 values.
pub fn normal_matrix(rows: usize, cols: usize, seed: u64) -> Array2<f32> {
    let mut rng = SplitMix64::new(seed);
    Array2::from_shape_simple_fn((rows, cols), || rng.normal() as f32)
}

/// Per-sample-gradient-like data: normal entries with column scales spread over three
/// decades, as real per-parameter gradient magnitudes are, so that the Fisher matrix has a
/// non-trivial spectrum rather than ≈ I.
pub fn gradient_like(rows: usize, cols: usize, seed: u64) -> Array2<f32> {
    let mut m = normal_matrix(rows, cols, seed);
    let denom = (cols.max(2) - 1) as f64;
    for (j, mut col) in m.columns_mut().into_iter().enumerate() {
        let scale = 10f64.powf(-3.0 * j as f64 / denom * 0.5) as f32;
        col.mapv_inplace(|v| v * scale);
    }
    m
}
