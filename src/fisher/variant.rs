//! Fisher variants (which expectation over y) and the Monte Carlo draws they use.
//!
//! MC draws come from a counter-based generator ([`mc_uniform`]) keyed by (seed, sample, k),
//! implemented identically in Rust and WGSL, so every backend draws the same labels.

/// Which expectation over y.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// At the observed labels.
    Empirical,
    /// Exact expectation over the model's predictive distribution (closed form).
    True,
    /// `samples` labels per input drawn from the predictive distribution with `seed`.
    MonteCarlo {
        /// K.
        samples: usize,
        /// Seed of the counter-based generator.
        seed: u64,
    },
}

impl Variant {
    /// The command-line spelling: `empirical`, `true`, `mc` (also the `variant` metadata).
    pub fn name(self) -> &'static str {
        match self {
            Variant::Empirical => "empirical",
            Variant::True => "true",
            Variant::MonteCarlo { .. } => "mc",
        }
    }

    /// What the variant is, in words, with R = `rows_per_sample` gradient rows per sample.
    pub fn description(self, rows_per_sample: usize) -> String {
        match self {
            Variant::Empirical => "empirical (observed labels, 1 row per sample)".to_string(),
            Variant::True => format!("true (closed-form expectation, {rows_per_sample} rows per sample)"),
            Variant::MonteCarlo { samples, seed } => format!("mc ({samples} sampled label(s) per input, seed {seed})"),
        }
    }
}

/// The name only: `mc` without its K and seed.
impl std::fmt::Display for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Parses the name; `mc` gives one draw per input with seed 0 (`--mc-samples`, `--seed`
/// set the others).
impl std::str::FromStr for Variant {
    type Err = crate::FisherError;
    fn from_str(text: &str) -> crate::Result<Variant> {
        [Variant::Empirical, Variant::True, Variant::MonteCarlo { samples: 1, seed: 0 }]
            .into_iter()
            .find(|v| v.name() == text)
            .ok_or_else(|| crate::FisherError::InvalidInput(format!("unknown variant '{text}' (expected empirical, true or mc)")))
    }
}

/// The most Monte Carlo draws per sample: the generator keys draws by a 32-bit index
/// ([`mc_uniform`]), so more would repeat labels.
pub const MAX_MC_SAMPLES: usize = u32::MAX as usize;

/// PCG-RXS-M-XS 32-bit hash (O'Neill 2014), the building block of [`mc_uniform`]; the same
/// function is in `shaders/mlp.wgsl` (WGSL has no 64-bit integers, hence 32-bit words).
pub fn pcg_hash(x: u32) -> u32 {
    let state = x.wrapping_mul(747_796_405).wrapping_add(2_891_336_453);
    let word = ((state >> ((state >> 28) + 4)) ^ state).wrapping_mul(277_803_737);
    (word >> 22) ^ word
}

/// Uniform in [0, 1) with 24 random bits (exact in f32), keyed by (seed, sample, draw, stream):
/// `h = pcg(seed_lo ^ pcg(seed_hi ^ pcg(sample ^ pcg(draw ^ pcg(stream)))))`, u = (h >> 8)·2⁻²⁴.
/// `sample` is the index of the input in the whole dataset, so results do not depend on how
/// samples are batched. Categorical draws use stream 0 and the inverse CDF (the first class c
/// with u < p₀ + … + p_c); Gaussian draws use streams 2j and 2j+1 for output j and Box–Muller,
/// ε_j = √(−2 ln(1 − u₁)) · cos(2π u₂).
pub fn mc_uniform(seed: u64, sample: u32, draw: u32, stream: u32) -> f32 {
    let h = pcg_hash(
        (seed as u32) ^ pcg_hash(((seed >> 32) as u32) ^ pcg_hash(sample ^ pcg_hash(draw ^ pcg_hash(stream)))),
    );
    (h >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// Output rows R per sample for `variant` with `outputs` network outputs (see the table above).
pub fn rows_per_sample(variant: Variant, outputs: usize) -> usize {
    match variant {
        Variant::Empirical => 1,
        Variant::True => outputs,
        Variant::MonteCarlo { samples, .. } => samples,
    }
}

/// The categorical MC draw: the first class c with u < p₀ + … + p_c (the last class when
/// rounding leaves u above the running sum), u = `mc_uniform(seed, sample, draw, 0)`.
pub fn mc_class(seed: u64, sample: u32, draw: u32, p: &[f32]) -> usize {
    let u = mc_uniform(seed, sample, draw, 0);
    let mut cum = 0.0f32;
    for (j, &pj) in p.iter().enumerate() {
        cum += pj;
        if u < cum {
            return j;
        }
    }
    p.len().saturating_sub(1)
}

/// The Gaussian MC draw ε_j for output j: Box–Muller on streams 2j and 2j + 1.
pub fn mc_normal(seed: u64, sample: u32, draw: u32, j: usize) -> f32 {
    let u1 = mc_uniform(seed, sample, draw, 2 * j as u32);
    let u2 = mc_uniform(seed, sample, draw, 2 * j as u32 + 1);
    (-2.0 * (1.0 - u1).ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}
