//! The primitive program: what a graph is lowered to, and what the CPU and GPU executors run.
//!
//! A handful of differentiable primitives cover every operator of the IR:
//!
//! | primitive | per row r | covers |
//! |---|---|---|
//! | [`Inst::Sparse`] | y_j (+)= Σ_k w_k x_{col_k} over row j of a CSR matrix | im2col / col2im, padding, transpose, concat, reshape-free broadcast, average pools, means, sums |
//! | [`Inst::MatMul`] | per group q: Y_q (+)= op(A_q)·op(B_q) | Gemm, MatMul, Conv (on im2col columns), per-sample weight gradients |
//! | [`Inst::Unary`] | y = f(x) | activations, their derivatives, rsqrt, affine maps |
//! | [`Inst::Binary`] | y (+)= a ∘ b, same length | residual adds, scaling, norm layers |
//! | [`Inst::ArgMax`] / [`Inst::GatherDyn`] / [`Inst::ScatterDyn`] | window argmax, gather / scatter at it | max pooling |
//! | [`Inst::Embed`] / [`Inst::EmbedBack`] | table rows at integer tokens, and the transpose | embeddings |
//!
//! ## Slots and rows
//! A [`Slot`] is a tensor of `len` f32 per row, flattened row-major, with a row class
//! ([`Rows`]): `Shared` (one row: parameters, constants and what is computed from them
//! alone), `Sample` (one row per sample of the micro-batch: forward values, forward-mode
//! tangents) or `Draw` (R rows per sample, sample-major: reverse-mode cotangents of the R
//! output rows of a variant, and the per-row parameter gradients).
//!
//! An instruction runs once per row of its destination. An operand of the same class is
//! read at the same row; a `Shared` operand at row 0; a `Sample` operand of a `Draw`
//! destination at row ⌊r / R⌋. No other combination occurs.
//!
//! ## Accumulation
//! `acc: true` adds into the destination (reverse mode sums the contributions of every
//! consumer of a tensor); `false` overwrites it.

use std::sync::Arc;

/// Index of a slot in [`Program::slots`].
pub type SlotId = usize;

/// Row class of a slot (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rows {
    /// One row for every sample.
    Shared,
    /// One row per sample.
    Sample,
    /// R rows per sample, sample-major.
    Draw,
}

/// A tensor of the program.
#[derive(Debug, Clone, PartialEq)]
pub struct Slot {
    /// For messages and debugging: the IR tensor it comes from, with a suffix
    /// (`.cot` cotangent, `.tan` tangent, `.col` im2col columns, …).
    pub name: String,
    /// Values per row.
    pub len: usize,
    /// Row class.
    pub rows: Rows,
}

/// A sparse matrix in compressed-row form, y = M x: row j of the output is
/// Σ_{k ∈ offsets[j]..offsets[j+1]} weights[k] · x[cols[k]] (weight 1 when `weights` is
/// `None`). `rows = offsets.len() − 1` outputs, `src_len` inputs.
#[derive(Debug, Clone, PartialEq)]
pub struct Csr {
    /// Row starts, `rows + 1` entries, non-decreasing, last = `cols.len()`.
    pub offsets: Vec<u32>,
    /// Input index of each entry (< `src_len`).
    pub cols: Vec<u32>,
    /// Entry weights (same length as `cols`), or all ones.
    pub weights: Option<Vec<f32>>,
    /// Input length.
    pub src_len: usize,
}

impl Csr {
    /// Builds from the entries of each output row: `rows[j]` lists (input index, weight).
    pub fn from_rows(rows: &[Vec<(usize, f32)>], src_len: usize) -> Csr {
        let mut offsets = Vec::with_capacity(rows.len() + 1);
        offsets.push(0u32);
        let mut cols = Vec::new();
        let mut weights = Vec::new();
        for row in rows {
            for &(c, w) in row {
                debug_assert!(c < src_len);
                cols.push(c as u32);
                weights.push(w);
            }
            offsets.push(cols.len() as u32);
        }
        let weights = if weights.iter().all(|&w| w == 1.0) { None } else { Some(weights) };
        Csr { offsets, cols, weights, src_len }
    }

    /// A gather y_j = x[map[j]] (`None`: y_j = 0, e.g. padding).
    pub fn gather(map: &[Option<usize>], src_len: usize) -> Csr {
        let rows: Vec<Vec<(usize, f32)>> = map.iter().map(|m| m.map(|i| vec![(i, 1.0)]).unwrap_or_default()).collect();
        Csr::from_rows(&rows, src_len)
    }

    /// Output length.
    pub fn rows(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Entries.
    pub fn nnz(&self) -> usize {
        self.cols.len()
    }

    /// The transpose (the reverse-mode map of this linear map): `src_len` rows over
    /// `rows()` inputs, entries of each row in increasing input order.
    pub fn transpose(&self) -> Csr {
        let mut counts = vec![0u32; self.src_len + 1];
        for &c in &self.cols {
            counts[c as usize + 1] += 1;
        }
        for i in 0..self.src_len {
            counts[i + 1] += counts[i];
        }
        let offsets = counts.clone();
        let mut next = counts;
        let mut cols = vec![0u32; self.nnz()];
        let mut weights = self.weights.as_ref().map(|_| vec![0f32; self.nnz()]);
        for j in 0..self.rows() {
            for k in self.offsets[j] as usize..self.offsets[j + 1] as usize {
                let i = self.cols[k] as usize;
                let at = next[i] as usize;
                next[i] += 1;
                cols[at] = j as u32;
                if let (Some(w), Some(src)) = (weights.as_mut(), self.weights.as_ref()) {
                    w[at] = src[k];
                }
            }
        }
        Csr { offsets, cols, weights, src_len: self.rows() }
    }

    /// The entry weight of entry `k`.
    pub fn weight(&self, k: usize) -> f32 {
        self.weights.as_ref().map_or(1.0, |w| w[k])
    }
}

/// Element-wise functions, and the derivatives that reverse and forward mode need
/// ([`UnaryFn::derivative`] gives f' as another function of the same input x).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum UnaryFn {
    /// max(x, 0).
    Relu,
    /// x ≥ 0 ? x : αx.
    LeakyRelu(f32),
    /// tanh.
    Tanh,
    /// Logistic σ.
    Sigmoid,
    /// x Φ(x).
    Gelu,
    /// The tanh approximation of GELU.
    GeluTanh,
    /// erf.
    Erf,
    /// ln(1 + eˣ).
    Softplus,
    /// √x.
    Sqrt,
    /// 1/√x.
    Rsqrt,
    /// 1/x.
    Reciprocal,
    /// eˣ.
    Exp,
    /// x².
    Square,
    /// a·x + b.
    Affine(f32, f32),
    /// f'(x) of [`UnaryFn::Relu`]: 1 for x > 0, else 0.
    Step,
    /// f' of LeakyRelu(α): 1 for x ≥ 0 … as PyTorch: x > 0 ? 1 : α.
    LeakyStep(f32),
    /// 1 − tanh²x.
    TanhDeriv,
    /// σ(x)(1 − σ(x)).
    SigmoidDeriv,
    /// Φ(x) + x φ(x).
    GeluDeriv,
    /// d/dx of the tanh GELU.
    GeluTanhDeriv,
    /// 2/√π · e^{−x²}.
    ErfDeriv,
    /// ½ x^{−1/2}.
    SqrtDeriv,
    /// −½ x^{−3/2}.
    RsqrtDeriv,
    /// −1/x².
    ReciprocalDeriv,
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_TANH_C: f32 = 0.044_715;

impl UnaryFn {
    /// f(x) in f32.
    pub fn eval(self, x: f32) -> f32 {
        match self {
            UnaryFn::Relu => x.max(0.0),
            UnaryFn::LeakyRelu(a) => {
                if x >= 0.0 {
                    x
                } else {
                    a * x
                }
            }
            UnaryFn::Tanh => x.tanh(),
            UnaryFn::Sigmoid => sigmoid(x),
            UnaryFn::Gelu => 0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2)),
            UnaryFn::GeluTanh => 0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + GELU_TANH_C * x * x * x)).tanh()),
            UnaryFn::Erf => libm::erff(x),
            // ln(1 + eˣ) = max(x, 0) + ln(1 + e^{−|x|}), without overflow.
            UnaryFn::Softplus => x.max(0.0) + (-x.abs()).exp().ln_1p(),
            UnaryFn::Sqrt => x.sqrt(),
            UnaryFn::Rsqrt => 1.0 / x.sqrt(),
            UnaryFn::Reciprocal => 1.0 / x,
            UnaryFn::Exp => x.exp(),
            UnaryFn::Square => x * x,
            UnaryFn::Affine(a, b) => a * x + b,
            UnaryFn::Step => (x > 0.0) as u8 as f32,
            UnaryFn::LeakyStep(a) => {
                if x > 0.0 {
                    1.0
                } else {
                    a
                }
            }
            UnaryFn::TanhDeriv => {
                let t = x.tanh();
                1.0 - t * t
            }
            UnaryFn::SigmoidDeriv => {
                let s = sigmoid(x);
                s * (1.0 - s)
            }
            UnaryFn::GeluDeriv => {
                let cdf = 0.5 * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2));
                let pdf = (-0.5 * x * x).exp() * 0.398_942_3;
                cdf + x * pdf
            }
            UnaryFn::GeluTanhDeriv => {
                let u = SQRT_2_OVER_PI * (x + GELU_TANH_C * x * x * x);
                let t = u.tanh();
                let du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_TANH_C * x * x);
                0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du
            }
            UnaryFn::ErfDeriv => std::f32::consts::FRAC_2_SQRT_PI * (-x * x).exp(),
            UnaryFn::SqrtDeriv => 0.5 / x.sqrt(),
            UnaryFn::RsqrtDeriv => -0.5 / (x * x.sqrt()),
            UnaryFn::ReciprocalDeriv => -1.0 / (x * x),
        }
    }

    /// f' as a function of the same input, `None` for the derivative functions themselves
    /// (only first derivatives are needed).
    pub fn derivative(self) -> Option<UnaryFn> {
        Some(match self {
            UnaryFn::Relu => UnaryFn::Step,
            UnaryFn::LeakyRelu(a) => UnaryFn::LeakyStep(a),
            UnaryFn::Tanh => UnaryFn::TanhDeriv,
            UnaryFn::Sigmoid => UnaryFn::SigmoidDeriv,
            UnaryFn::Softplus => UnaryFn::Sigmoid,
            UnaryFn::Gelu => UnaryFn::GeluDeriv,
            UnaryFn::GeluTanh => UnaryFn::GeluTanhDeriv,
            UnaryFn::Erf => UnaryFn::ErfDeriv,
            UnaryFn::Sqrt => UnaryFn::SqrtDeriv,
            UnaryFn::Rsqrt => UnaryFn::RsqrtDeriv,
            UnaryFn::Reciprocal => UnaryFn::ReciprocalDeriv,
            UnaryFn::Exp => UnaryFn::Exp,
            UnaryFn::Square => UnaryFn::Affine(2.0, 0.0),
            UnaryFn::Affine(a, _) => UnaryFn::Affine(0.0, a),
            _ => return None,
        })
    }

    /// A small integer code for the GPU kernels (see `shaders/graph.wgsl`), and its
    /// parameter (α of LeakyRelu, a and b of Affine; 0 otherwise).
    pub fn code(self) -> (u32, f32, f32) {
        match self {
            UnaryFn::Relu => (0, 0.0, 0.0),
            UnaryFn::LeakyRelu(a) => (1, a, 0.0),
            UnaryFn::Tanh => (2, 0.0, 0.0),
            UnaryFn::Sigmoid => (3, 0.0, 0.0),
            UnaryFn::Gelu => (4, 0.0, 0.0),
            UnaryFn::GeluTanh => (5, 0.0, 0.0),
            UnaryFn::Erf => (6, 0.0, 0.0),
            UnaryFn::Softplus => (7, 0.0, 0.0),
            UnaryFn::Sqrt => (8, 0.0, 0.0),
            UnaryFn::Rsqrt => (9, 0.0, 0.0),
            UnaryFn::Reciprocal => (10, 0.0, 0.0),
            UnaryFn::Exp => (11, 0.0, 0.0),
            UnaryFn::Square => (12, 0.0, 0.0),
            UnaryFn::Affine(a, b) => (13, a, b),
            UnaryFn::Step => (14, 0.0, 0.0),
            UnaryFn::LeakyStep(a) => (15, a, 0.0),
            UnaryFn::TanhDeriv => (16, 0.0, 0.0),
            UnaryFn::SigmoidDeriv => (17, 0.0, 0.0),
            UnaryFn::GeluDeriv => (18, 0.0, 0.0),
            UnaryFn::GeluTanhDeriv => (19, 0.0, 0.0),
            UnaryFn::ErfDeriv => (20, 0.0, 0.0),
            UnaryFn::SqrtDeriv => (21, 0.0, 0.0),
            UnaryFn::RsqrtDeriv => (22, 0.0, 0.0),
            UnaryFn::ReciprocalDeriv => (23, 0.0, 0.0),
        }
    }
}

fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// Element-wise operations of two same-length operands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinFn {
    /// a + b.
    Add,
    /// a − b.
    Sub,
    /// a · b.
    Mul,
    /// a / b.
    Div,
}

impl BinFn {
    /// a ∘ b.
    pub fn eval(self, a: f32, b: f32) -> f32 {
        match self {
            BinFn::Add => a + b,
            BinFn::Sub => a - b,
            BinFn::Mul => a * b,
            BinFn::Div => a / b,
        }
    }
}

/// Shape of a grouped matrix product: for each group q < `groups`, the destination block
/// Y_q (m×n, row-major, at offset q·m·n of the row) is op(A_q)·op(B_q), where A_q is the
/// q-th block of m·k values (stored m×k, or k×m when `ta`) and B_q the q-th block of k·n
/// values (stored k×n, or n×k when `tb`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatDims {
    /// Groups (1 but for grouped convolutions).
    pub groups: usize,
    /// Rows of Y.
    pub m: usize,
    /// Inner extent.
    pub k: usize,
    /// Columns of Y.
    pub n: usize,
    /// A stored transposed (k×m).
    pub ta: bool,
    /// B stored transposed (n×k).
    pub tb: bool,
}

/// One primitive instruction (see the module docs for rows and accumulation).
#[derive(Debug, Clone, PartialEq)]
pub enum Inst {
    /// dst = M · src for a sparse M (`map.rows()` = dst len, `map.src_len` = src len).
    Sparse {
        /// Destination.
        dst: SlotId,
        /// Source.
        src: SlotId,
        /// The matrix.
        map: Arc<Csr>,
        /// Add into dst.
        acc: bool,
    },
    /// Grouped matrix product ([`MatDims`]).
    MatMul {
        /// Destination (groups·m·n per row).
        dst: SlotId,
        /// Left operand (groups·m·k per row).
        a: SlotId,
        /// Right operand (groups·k·n per row).
        b: SlotId,
        /// Shape.
        dims: MatDims,
        /// Add into dst.
        acc: bool,
    },
    /// dst = f(src).
    Unary {
        /// Destination.
        dst: SlotId,
        /// Source.
        src: SlotId,
        /// The function.
        f: UnaryFn,
    },
    /// dst = a ∘ b (same lengths).
    Binary {
        /// Destination.
        dst: SlotId,
        /// Left operand.
        a: SlotId,
        /// Right operand.
        b: SlotId,
        /// The operation.
        f: BinFn,
        /// Add into dst.
        acc: bool,
    },
    /// dst_j = the index i (as f32, exact: lengths are below 2²⁴) of the largest src_i over
    /// the entries of row j of `windows` (the first one on ties; weights unused). Rows:
    /// `Sample`.
    ArgMax {
        /// Destination: indices.
        dst: SlotId,
        /// Source.
        src: SlotId,
        /// The windows (every row non-empty).
        windows: Arc<Csr>,
    },
    /// dst_j (+)= src[idx_j].
    GatherDyn {
        /// Destination.
        dst: SlotId,
        /// Source.
        src: SlotId,
        /// Indices (an [`Inst::ArgMax`] result).
        idx: SlotId,
        /// Add into dst.
        acc: bool,
    },
    /// The transpose of [`Inst::GatherDyn`]: dst_i (+)= Σ_{j ∈ row i of `candidates`,
    /// idx_j = i} src_j, where `candidates` lists every j that may point at i (the
    /// transpose of the windows).
    ScatterDyn {
        /// Destination.
        dst: SlotId,
        /// Source.
        src: SlotId,
        /// Indices.
        idx: SlotId,
        /// For each i, the j that may select it.
        candidates: Arc<Csr>,
        /// Add into dst.
        acc: bool,
    },
    /// Embedding rows: dst[t·dim + d] = table[tokens_t · dim + d] (tokens are integer
    /// values held as f32, checked in range by the executor before the run).
    Embed {
        /// Destination (T·dim).
        dst: SlotId,
        /// Table (V·dim).
        table: SlotId,
        /// Tokens (T), `Sample` rows.
        tokens: SlotId,
        /// Embedding width.
        dim: usize,
    },
    /// The table gradient of [`Inst::Embed`]: dst[v·dim + d] (+)= Σ_{t: tokens_t = v} src[t·dim + d].
    EmbedBack {
        /// Destination (V·dim).
        dst: SlotId,
        /// Source (T·dim).
        src: SlotId,
        /// Tokens (T).
        tokens: SlotId,
        /// Embedding width.
        dim: usize,
        /// Add into dst.
        acc: bool,
    },
    /// dst = 0.
    Zero {
        /// Destination.
        dst: SlotId,
    },
}

impl Inst {
    /// The destination slot.
    pub fn dst(&self) -> SlotId {
        match self {
            Inst::Sparse { dst, .. }
            | Inst::MatMul { dst, .. }
            | Inst::Unary { dst, .. }
            | Inst::Binary { dst, .. }
            | Inst::ArgMax { dst, .. }
            | Inst::GatherDyn { dst, .. }
            | Inst::ScatterDyn { dst, .. }
            | Inst::Embed { dst, .. }
            | Inst::EmbedBack { dst, .. }
            | Inst::Zero { dst } => *dst,
        }
    }

    /// The slots it reads.
    pub fn sources(&self) -> Vec<SlotId> {
        match self {
            Inst::Sparse { src, .. } | Inst::Unary { src, .. } | Inst::ArgMax { src, .. } => vec![*src],
            Inst::MatMul { a, b, .. } | Inst::Binary { a, b, .. } => vec![*a, *b],
            Inst::GatherDyn { src, idx, .. } | Inst::ScatterDyn { src, idx, .. } => vec![*src, *idx],
            Inst::Embed { table, tokens, .. } => vec![*table, *tokens],
            Inst::EmbedBack { src, tokens, .. } => vec![*src, *tokens],
            Inst::Zero { .. } => vec![],
        }
    }

    /// Multiply–adds per destination row (for cost estimates and GFLOP/s).
    pub fn work(&self, slots: &[Slot]) -> u64 {
        match self {
            Inst::Sparse { map, .. } => map.nnz() as u64,
            Inst::MatMul { dims, .. } => (dims.groups * dims.m * dims.k * dims.n) as u64,
            Inst::ScatterDyn { candidates, .. } => candidates.nnz() as u64,
            Inst::ArgMax { windows, .. } => windows.nnz() as u64,
            Inst::EmbedBack { dst, src, .. } => (slots[*dst].len as u64).max(slots[*src].len as u64),
            other => slots[other.dst()].len as u64,
        }
    }
}

/// Where a Gemm/MatMul/Conv keeps what KFAC needs: its input patches ã and the cotangent δ
/// of its pre-activation output, both per position s of the S positions of a sample.
#[derive(Debug, Clone, PartialEq)]
pub struct KfacSite {
    /// The module (the weight's name up to its last `.`).
    pub module: String,
    /// Index of the weight in the graph's parameters.
    pub weight: usize,
    /// Index of the bias, if any.
    pub bias: Option<usize>,
    /// The input patches (`Sample` rows): K·S values, stored K×S (`positions_last`) or S×K.
    pub input: SlotId,
    /// The output cotangent (`Draw` rows): Cout·S values, stored Cout×S (`positions_last`)
    /// or S×Cout.
    pub output_cot: SlotId,
    /// K (fan-in, without the bias).
    pub fan_in: usize,
    /// Cout.
    pub fan_out: usize,
    /// S.
    pub positions: usize,
    /// Layout: feature-major (Conv im2col columns, K×S and Cout×S) or position-major (MatMul
    /// rows, S×K and S×Cout; Gemm has S = 1 and either reading).
    pub positions_last: bool,
}

/// A lowered graph: the forward program, its reverse-mode program (per-row parameter
/// gradients of the output rows) and its forward-mode program (J·v).
#[derive(Debug, Clone, PartialEq)]
pub struct Program {
    /// Every slot.
    pub slots: Vec<Slot>,
    /// Values of the shared slots known at lowering (parameters, constants and what the
    /// lowering derived from them); the executors upload them once.
    pub shared: Vec<(SlotId, Arc<Vec<f32>>)>,
    /// The input (`Sample`).
    pub input: SlotId,
    /// The output z (`Sample`, C).
    pub output: SlotId,
    /// The parameter slots (`Shared`), in θ order.
    pub params: Vec<SlotId>,
    /// Forward: input and parameters → every value and the output.
    pub forward: Vec<Inst>,
    /// The seed of reverse mode: the output rows s (`Draw`, C).
    pub output_cot: SlotId,
    /// Reverse mode (after `forward`): s → the per-row gradient of sᵀz for each parameter.
    pub backward: Vec<Inst>,
    /// The per-row parameter gradients (`Draw`, one per parameter, in θ order).
    pub param_grads: Vec<SlotId>,
    /// The reverse program pruned to what KFAC reads (the output cotangents of the sites):
    /// no per-row parameter gradients, about half the work of `backward` on conv nets.
    pub backward_kfac: Vec<Inst>,
    /// The direction v per parameter (`Shared`), in θ order.
    pub param_tangents: Vec<SlotId>,
    /// Forward mode (after `forward`): v → J·v.
    pub tangent: Vec<Inst>,
    /// J·v (`Sample`, C).
    pub output_tangent: SlotId,
    /// KFAC sites, in module order.
    pub kfac: Vec<KfacSite>,
}

/// Which reverse program to run ([`Program::backward`] or [`Program::backward_kfac`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backward {
    /// Everything: the per-row gradient of every parameter.
    Full,
    /// Only the cotangents the KFAC sites read.
    Kfac,
}

impl Program {
    /// The instructions of `which` reverse program.
    pub fn backward_of(&self, which: Backward) -> &[Inst] {
        match which {
            Backward::Full => &self.backward,
            Backward::Kfac => &self.backward_kfac,
        }
    }

    /// Floats per sample that a micro-batch keeps for one sample with R output rows, given
    /// which programs run: the forward values, plus R× the cotangents (`backward`) or the
    /// tangents (`tangent`).
    pub fn floats_per_sample(&self, r: usize) -> u64 {
        self.slots
            .iter()
            .map(|s| match s.rows {
                Rows::Shared => 0,
                Rows::Sample => s.len as u64,
                Rows::Draw => (s.len as u64).saturating_mul(r as u64),
            })
            .sum()
    }

    /// [`Program::floats_per_sample`] for a run of the reverse program `which` only: the
    /// forward values, plus R× the cotangents that program writes or reads (a KFAC run holds
    /// no per-row parameter gradients, so its micro-batches can be larger).
    pub fn floats_per_sample_for(&self, r: usize, which: Backward) -> u64 {
        let used = self.draw_slots_used(which);
        self.slots
            .iter()
            .enumerate()
            .map(|(k, s)| match s.rows {
                Rows::Shared => 0,
                Rows::Sample => s.len as u64,
                Rows::Draw if used[k] => (s.len as u64).saturating_mul(r as u64),
                Rows::Draw => 0,
            })
            .sum()
    }

    /// Which slots a run of the reverse program `which` touches (its destinations and
    /// sources, and the output cotangent); executors allocate only these `Draw` slots.
    pub fn draw_slots_used(&self, which: Backward) -> Vec<bool> {
        let mut used = vec![false; self.slots.len()];
        used[self.output_cot] = true;
        for inst in self.backward_of(which).iter().chain(&self.forward).chain(&self.tangent) {
            used[inst.dst()] = true;
            for s in inst.sources() {
                used[s] = true;
            }
        }
        if which == Backward::Full {
            for &g in &self.param_grads {
                used[g] = true;
            }
        }
        used
    }

    /// Floats of the shared slots.
    pub fn shared_floats(&self) -> u64 {
        self.slots.iter().filter(|s| s.rows == Rows::Shared).map(|s| s.len as u64).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_transpose_is_the_adjoint() {
        // y = M x with a weighted M; ⟨y', M x⟩ = ⟨Mᵀ y', x⟩ for all x, y'.
        let m = Csr::from_rows(&[vec![(0, 2.0), (2, 1.0)], vec![], vec![(1, -1.0), (2, 0.5)]], 3);
        let t = m.transpose();
        assert_eq!(t.rows(), 3);
        assert_eq!(t.src_len, 3);
        let x = [1.0f32, 2.0, 3.0];
        let y2 = [0.5f32, -1.0, 2.0];
        let apply = |c: &Csr, v: &[f32]| -> Vec<f32> {
            (0..c.rows())
                .map(|j| (c.offsets[j] as usize..c.offsets[j + 1] as usize).map(|k| c.weight(k) * v[c.cols[k] as usize]).sum())
                .collect()
        };
        let lhs: f32 = apply(&m, &x).iter().zip(&y2).map(|(a, b)| a * b).sum();
        let rhs: f32 = apply(&t, &y2).iter().zip(&x).map(|(a, b)| a * b).sum();
        assert!((lhs - rhs).abs() < 1e-6, "{lhs} vs {rhs}");
    }

    #[test]
    fn derivatives_match_finite_differences() {
        let fs = [
            UnaryFn::Relu,
            UnaryFn::LeakyRelu(0.1),
            UnaryFn::Tanh,
            UnaryFn::Sigmoid,
            UnaryFn::Gelu,
            UnaryFn::GeluTanh,
            UnaryFn::Erf,
            UnaryFn::Softplus,
            UnaryFn::Sqrt,
            UnaryFn::Rsqrt,
            UnaryFn::Reciprocal,
            UnaryFn::Exp,
            UnaryFn::Square,
            UnaryFn::Affine(1.5, -2.0),
        ];
        for f in fs {
            let d = f.derivative().unwrap();
            for &x in &[0.3f32, 0.9, 1.7, -0.6, -1.3] {
                if matches!(f, UnaryFn::Sqrt | UnaryFn::Rsqrt) && x < 0.0 {
                    continue;
                }
                let h = 1e-3f32;
                let fd = (f.eval(x + h) - f.eval(x - h)) / (2.0 * h);
                assert!((fd - d.eval(x)).abs() < 2e-3 * (1.0 + fd.abs()), "{f:?} at {x}: {fd} vs {}", d.eval(x));
            }
        }
    }
}

/// The instructions of `insts` that contribute to `wanted` slots (dead-code elimination over
/// a straight-line program): walking backwards, an instruction is kept when it writes a
/// needed slot, and then its sources (and, when it accumulates or is a later write, the
/// earlier writes of its destination) are needed too.
pub fn prune(insts: &[Inst], wanted: &[SlotId]) -> Vec<Inst> {
    let mut needed: std::collections::HashSet<SlotId> = wanted.iter().copied().collect();
    let mut keep = vec![false; insts.len()];
    for (k, inst) in insts.iter().enumerate().rev() {
        if needed.contains(&inst.dst()) {
            keep[k] = true;
            needed.extend(inst.sources());
        }
    }
    insts.iter().zip(keep).filter(|(_, k)| *k).map(|(i, _)| i.clone()).collect()
}
