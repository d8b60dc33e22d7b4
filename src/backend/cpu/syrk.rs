//! The symmetric rank-k update behind [`Form::Full`](crate::Form::Full),
//! [`Form::BlockDiagonal`](crate::Form::BlockDiagonal) and [`Form::Gram`](crate::Form::Gram):
//! S = AᵀA = Σₖ aₖ aₖᵀ over the rows aₖ of a K×M matrix A, streamed in row chunks.
//!
//! # Work
//!
//! Only the upper triangle is computed, by one of two kernels ([`Kernel::best`]): on CPUs with
//! AVX-512F the engine's own ([`super::syrk_avx512`]: A packed once per depth block, only the
//! tiles that touch the triangle; 1.0–1.05× OpenBLAS's `ssyrk` at M = 2048, against 1.4× for
//! the panels below), elsewhere `gemm` in panels. For `gemm`, the M columns are cut into row
//! panels of
//! [`PANEL`] rows; panel I = [i₀, i₁) multiplies A[:, i₀..i₁]ᵀ by A[:, i₀..M] with one
//! `gemm` call (the diagonal block in full, everything right of it), so the whole update
//! costs K·M²/2·(1 + PANEL/M) multiply-adds instead of K·M². Below M = [`SPLIT_FROM`], where
//! that waste is large (1.5× at M = 512, KFAC's factors), a panel is one call for the
//! rectangle right of its diagonal block and one per [`SUB_PANEL`] rows of the block: K·M²/2·
//! (1 + SUB_PANEL/M). (At M = 2048 the extra calls cost more than the multiply-adds they save:
//! 88 → 113 ms.) The lower triangle is a copy made at the end, which makes the result exactly
//! symmetric.
//!
//! # Precision
//!
//! `gemm` accumulates in f32 registers over its own depth blocks (≥ 512 rows) and adds
//! those into the f32 `pending` matrix. After at most [`FLUSH_ROWS`] rows `pending` is
//! added into an f64 matrix, so f32 partial sums never run longer than [`FLUSH_ROWS`] terms
//! and the error does not grow with the total number of rows as a plain f32 sum's does.
//! The division by the sample count happens in f64 in [`SymmetricSum::finish`].
//!
//! # Layout
//!
//! `pending` and `flushed` are row-major M×M; only entries (i, j ≥ i) are meaningful.
//!
//! # Bands
//!
//! A sum may hold only the rows [r₀, r₁) of the upper triangle ([`SymmetricSum::band`]),
//! r₀ a multiple of [`PANEL`]: its buffers are then (r₁ − r₀) × (M − r₀), row t holding
//! columns r₀ .. M of row r₀ + t. The `gemm` calls of a band are exactly those the whole
//! sum makes for its panels, so a band's values are bitwise those of the whole sum; a full
//! Fisher too large for memory is computed band by band, one pass over the samples each
//! ([`plan_bands`]), and written into one f32 matrix ([`SymmetricSum::finish_band_into`]).

use ndarray::{s, Array2, ArrayView2};
use rayon::prelude::*;

use crate::error::Result;
use crate::fisher::ResultSink;

/// Rows per panel (one `gemm` call per panel and chunk). On the 2-core AVX-512 development
/// machine at M = 2048, K = 4096 (best of 12, interleaved, machine shared): 256 → 101 ms,
/// 192 → 108 ms, 128 → 128 ms; thinner panels repack the wide right-hand side more often,
/// wider ones waste more of the lower half of each diagonal block (PANEL/(2M) of the work).
pub(crate) const PANEL: usize = 256;

/// Rows per `gemm` call inside a panel's diagonal block, for sums of side below
/// [`SPLIT_FROM`] (see [`SymmetricSum::add`]).
const SUB_PANEL: usize = 64;

/// Side from which a panel is one `gemm` call.
const SPLIT_FROM: usize = 1536;

/// Most rows summed in f32 before the partial sum moves to f64. Long enough that the
/// O(M²) flush costs < 3% of the O(K·M²) products, short enough that the f32 error stays
/// at the level of a blocked GEMM (see the module docs).
pub(crate) const FLUSH_ROWS: usize = 4096;

/// Rows per row block of [`SymmetricSum::finish`], and the side of its tiles: a 64×64 f32
/// tile (16 KiB) stays in L1 while it is written to its rows and to their mirror.
const FINISH_ROWS: usize = 64;

/// The output of [`SymmetricSum::finish`], shared by its tasks, which write disjoint entries
/// and read none.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);

// SAFETY: see `SymmetricSum::finish_rows`: the tasks' writes are disjoint.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The pointer (a method, so that closures capture the `Sync` wrapper, not the field).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Threads inside each `gemm` call; the panels run one after another. Measured against
/// running the panels in parallel with single-threaded `gemm` calls: as fast on an idle
/// machine, 25–40% faster when other processes compete for the cores (the panels differ in
/// width, and gemm balances its own work), and it does not run out of tasks when there are
/// more threads than panels.
const PARALLELISM: gemm::Parallelism = gemm::Parallelism::Rayon(0);

/// A running AᵀA over the rows of A pushed so far (see the module docs).
#[derive(Debug)]
pub(crate) struct SymmetricSum {
    m: usize,
    /// First row of the band held (0 for the whole matrix; a multiple of [`PANEL`]).
    r0: usize,
    /// One past its last row (m for the whole matrix).
    r1: usize,
    /// f32 sum of the rows added since the last flush (upper triangle).
    pending: Vec<f32>,
    /// Rows summed in `pending` since the last flush.
    pending_rows: usize,
    /// f64 sum of every flushed `pending`; allocated on the first flush only, so that a
    /// reduction of ≤ FLUSH_ROWS rows never pays for it.
    flushed: Option<Vec<f64>>,
    /// Who computes the products.
    kernel: Kernel,
}

/// The code behind [`SymmetricSum::add`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// `gemm` calls per panel (any CPU).
    Gemm,
    /// The AVX-512 micro-kernel of [`super::syrk_avx512`] (CPUs with AVX-512F).
    Avx512,
}

impl Kernel {
    /// The fastest kernel this CPU runs for sums of side `m`.
    pub(crate) fn best(m: usize) -> Self {
        #[cfg(target_arch = "x86_64")]
        if m >= AVX512_FROM && super::syrk_avx512::available() {
            return Kernel::Avx512;
        }
        let _ = m;
        Kernel::Gemm
    }
}

/// Side from which the AVX-512 kernel computes a sum (where the CPU has it).
const AVX512_FROM: usize = 1;

/// Scratch that [`SymmetricSum::add`] allocates while it runs, for a band `rows` of a sum of
/// side `m`, bytes: the AVX-512 kernel's packed columns and row strips (≤ 16 MiB), none for `gemm` (whose own
/// packing buffers are part of every GEMM's cost). Memory plans count it beside a
/// micro-batch's scratch.
pub(crate) fn add_scratch_bytes(m: usize, rows: std::ops::Range<usize>) -> u64 {
    match Kernel::best(m) {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => super::syrk_avx512::scratch_bytes(m, rows),
        _ => {
            let _ = rows;
            0
        }
    }
}

/// A new buffer of `len` f64, rows of `stride`, whose entries on and right of row t's
/// diagonal (column offset c ≥ t) are `value(t, c)` and the rest zero: written without
/// being read first. A zeroed buffer (`vec![0.0; len]`) comes from `calloc`, whose fresh
/// pages map the shared zero page on the first read; the write after it faults again and
/// flushes the TLB of every core running the process (2–3 % of W3's MC KFAC in `perf`, in
/// the f64 sums' first flush and the lanes' absorb).
fn fresh_upper(len: usize, stride: usize, value: impl Fn(usize, usize) -> f64 + Sync) -> Vec<f64> {
    let mut out = Vec::with_capacity(len);
    out.spare_capacity_mut()[..len].par_chunks_mut(stride.max(1)).enumerate().for_each(|(t, row)| {
        for (c, x) in row.iter_mut().enumerate() {
            x.write(if c >= t { value(t, c) } else { 0.0 });
        }
    });
    // SAFETY: every one of the len values was written just above.
    unsafe { out.set_len(len) };
    out
}

impl SymmetricSum {
    /// An empty sum of M×M outer products.
    pub(crate) fn new(m: usize) -> Self {
        Self::band(m, 0..m)
    }

    /// An empty sum of the rows `rows` of the upper triangle of M×M outer products (see
    /// [Bands](self#bands)); `rows.start` must be a multiple of [`PANEL`].
    pub(crate) fn band(m: usize, rows: std::ops::Range<usize>) -> Self {
        Self::band_with(m, rows, Kernel::best(m))
    }

    /// [`SymmetricSum::band`] computed by `kernel` (which the CPU must run).
    pub(crate) fn band_with(m: usize, rows: std::ops::Range<usize>, kernel: Kernel) -> Self {
        assert!(rows.start % PANEL == 0 && rows.start <= rows.end && rows.end <= m, "band {rows:?} of {m}");
        let len = (rows.end - rows.start) * (m - rows.start);
        SymmetricSum { m, r0: rows.start, r1: rows.end, pending: vec![0.0; len], pending_rows: 0, flushed: None, kernel }
    }

    /// Row length of the buffers: the columns r₀ .. M.
    fn stride(&self) -> usize {
        self.m - self.r0
    }

    /// Values of the packed upper triangle in the rows held (see [`SymmetricSum::packed_upper`]).
    pub(crate) fn packed_count(&self) -> usize {
        (self.r0..self.r1).map(|i| self.m - i).sum()
    }

    /// The first row of the band held (0 for the whole matrix).
    pub(crate) fn first_row(&self) -> usize {
        self.r0
    }

    /// Whether this sum holds the whole upper triangle.
    pub(crate) fn is_whole(&self) -> bool {
        self.r0 == 0 && self.r1 == self.m
    }

    /// M, the side of the matrix.
    pub(crate) fn size(&self) -> usize {
        self.m
    }

    /// Adds aₖ aₖᵀ for every row aₖ of `a` (K×M, any strides).
    pub(crate) fn add(&mut self, a: ArrayView2<'_, f32>) {
        debug_assert_eq!(a.ncols(), self.m);
        let mut start = 0;
        while start < a.nrows() {
            if self.pending_rows == FLUSH_ROWS {
                self.flush();
            }
            let take = (a.nrows() - start).min(FLUSH_ROWS - self.pending_rows);
            self.gemm_upper(a.slice(s![start..start + take, ..]));
            self.pending_rows += take;
            start += take;
        }
    }

    /// Starts a micro-batch of `samples` samples whose contribution the caller adds into the
    /// band itself ([`SymmetricSum::direct_rows`]) instead of handing rows to
    /// [`SymmetricSum::add`]: flushes `pending` to f64 first when those samples would take
    /// it past [`FLUSH_ROWS`] summands, and zeroes it when it starts afresh. (The network
    /// path's Kronecker reduction counts one summand per sample, each a rank-R sum.)
    pub(crate) fn begin_direct(&mut self, samples: usize) {
        if self.pending_rows > 0 && self.pending_rows + samples > FLUSH_ROWS {
            self.flush();
        }
        if self.pending_rows == 0 {
            self.pending.fill(0.0);
        }
        self.pending_rows += samples;
    }

    /// The rows held, the row length (columns r₀ .. M) and the f32 `pending` buffer, for
    /// adding into after [`SymmetricSum::begin_direct`]: row i ∈ [r₀, r₁), column j ≥ r₀ is
    /// `pending[(i − r₀)·stride + j − r₀]`; only entries j ≥ i are read back.
    pub(crate) fn direct_rows(&mut self) -> (std::ops::Range<usize>, usize, &mut [f32]) {
        let stride = self.stride();
        (self.r0..self.r1, stride, &mut self.pending)
    }

    /// `pending` (+)= upper triangle of AᵀA, one `gemm` call per row panel.
    fn gemm_upper(&mut self, a: ArrayView2<'_, f32>) {
        // gemm takes arbitrary element strides, so row- and column-major input are used in
        // place; a view with a negative or zero stride (reversed or broadcast) is copied
        // first, so that every address gemm forms lies inside one forward allocation.
        let copy: Array2<f32>;
        let a = if a.strides().iter().all(|&st| st > 0) {
            a
        } else {
            copy = a.as_standard_layout().into_owned();
            copy.view()
        };
        let (k, m) = a.dim();
        if k == 0 || m == 0 {
            return;
        }
        let accumulate = self.pending_rows > 0;
        #[cfg(target_arch = "x86_64")]
        if self.kernel == Kernel::Avx512 {
            let stride = self.stride();
            super::syrk_avx512::syrk_upper(a, self.r0..self.r1, stride, &mut self.pending, accumulate);
            return;
        }
        let (row_stride, col_stride) = (a.strides()[0], a.strides()[1]);
        let (r0, stride) = (self.r0, self.stride());
        let lhs_base = a.as_ptr();
        // One `gemm` call: dst(t, c) (+)= Σ_kk A[kk, row0 + t] · A[kk, col0 + c] for t < rows,
        // c < cols, dst(t, c) at `dst` + t·stride + c. Called only below, with `dst` a row of
        // this panel at the column of its first value, and rows × cols inside the band.
        let call = |dst: *mut f32, row0: usize, col0: usize, rows: usize, cols: usize| {
            // SAFETY: the caller's dst covers rows × cols values at row stride `stride` inside
            // `pending`; lhs(r, kk) = A[kk, row0 + r] and rhs(kk, c) = A[kk, col0 + c] with
            // r < rows, c < cols, row0 + rows ≤ m and col0 + cols ≤ m, kk < k: elements of the
            // view `a`, which is valid for reads and has positive strides; dst does not
            // overlap `a`.
            unsafe {
                gemm::gemm(
                    rows,
                    cols,
                    k,
                    dst,
                    1,
                    stride as isize,
                    accumulate,
                    lhs_base.offset(row0 as isize * col_stride),
                    row_stride,
                    col_stride,
                    lhs_base.offset(col0 as isize * col_stride),
                    col_stride,
                    row_stride,
                    if accumulate { 1.0 } else { 0.0 },
                    1.0,
                    false,
                    false,
                    false,
                    PARALLELISM,
                );
            }
        };
        for (p, rows) in self.pending.chunks_mut(PANEL * stride).enumerate() {
            let i0 = r0 + p * PANEL;
            let panel_rows = rows.len() / stride;
            let i1 = i0 + panel_rows;
            // Row t of the panel (row i0 + t) holds column c at t·stride + c − r₀.
            let base = rows.as_mut_ptr();
            if m >= SPLIT_FROM {
                // One call for the panel: its diagonal block in full, and everything right of it.
                // SAFETY (offset): column i0 of row 0 of the panel, inside `rows`.
                call(unsafe { base.add(i0 - r0) }, i0, i0, panel_rows, m - i0);
                continue;
            }
            // The rectangle right of the panel's diagonal block: rows i0..i1, columns i1..m.
            if i1 < m {
                // SAFETY (offset): column i1 of row 0 of the panel, inside `rows`.
                call(unsafe { base.add(i1 - r0) }, i0, i1, panel_rows, m - i1);
            }
            // The diagonal block, in sub-panels of SUB_PANEL rows from their diagonal on:
            // the block's lower half costs SUB_PANEL/PANEL of what one call for the whole
            // block would waste there.
            for s0 in (0..panel_rows).step_by(SUB_PANEL) {
                let sub = SUB_PANEL.min(panel_rows - s0);
                // SAFETY (offset): row s0 of the panel, column i0 + s0, inside `rows`.
                call(unsafe { base.add(s0 * stride + i0 + s0 - r0) }, i0 + s0, i0 + s0, sub, panel_rows - s0);
            }
        }
    }

    /// The upper triangle of the sum in f64, packed row by row ((i, j ≥ i) at
    /// i·m − i(i−1)/2 + j − i): `pending + flushed`, the value [`SymmetricSum::finish`] scales.
    ///
    /// For a band, only its rows: a contiguous part of the whole packed triangle, from
    /// `packed_row(r₀)`.
    pub(crate) fn packed_upper(&self) -> Vec<f64> {
        let (m, r0, stride) = (self.m, self.r0, self.stride());
        let len: usize = (self.r0..self.r1).map(|i| m - i).sum();
        let mut out = vec![0.0f64; len];
        let mut runs: Vec<(usize, &mut [f64])> = Vec::with_capacity(self.r1 - r0);
        let mut rest = out.as_mut_slice();
        for i in self.r0..self.r1 {
            let (run, tail) = rest.split_at_mut(m - i);
            runs.push((i - r0, run));
            rest = tail;
        }
        runs.into_par_iter().for_each(|(t, run)| {
            let range = t * stride + t..(t + 1) * stride;
            let pending = &self.pending[range.clone()];
            match &self.flushed {
                None => run.iter_mut().zip(pending).for_each(|(o, &p)| *o = f64::from(p)),
                Some(flushed) => {
                    run.iter_mut().zip(pending).zip(&flushed[range]).for_each(|((o, &p), &f)| *o = f64::from(p) + f)
                }
            }
        });
        out
    }

    /// Adds `other` (the same band, summed over other rows) into this sum: every upper entry
    /// becomes (pending + flushed) + (other's pending + flushed) in f64, held in `flushed`,
    /// and `pending` starts again from zero. `other` is left as it was.
    pub(crate) fn absorb(&mut self, other: &SymmetricSum) {
        assert!((self.m, self.r0, self.r1) == (other.m, other.r0, other.r1), "absorb of another band");
        let (len, stride) = (self.pending.len(), self.stride());
        if len == 0 {
            return;
        }
        let theirs = |t: usize, c: usize| f64::from(other.pending[t * stride + c]) + other.flushed.as_ref().map_or(0.0, |f| f[t * stride + c]);
        match self.flushed.as_mut() {
            Some(flushed) => {
                flushed.par_chunks_mut(stride).zip(self.pending.par_chunks(stride)).enumerate().for_each(|(t, (acc, part))| {
                    // Row r₀ + t starts at its diagonal, column offset t.
                    for c in t..stride {
                        acc[c] = (f64::from(part[c]) + acc[c]) + theirs(t, c);
                    }
                });
            }
            // The same values as from zeros, written without reading the new buffer first.
            None => {
                let pending = &self.pending;
                self.flushed = Some(fresh_upper(len, stride, |t, c| (f64::from(pending[t * stride + c]) + 0.0) + theirs(t, c)));
            }
        }
        self.pending.par_chunks_mut(stride).for_each(|part| part.fill(0.0));
        self.pending_rows = 0;
    }

    /// Empties the sum, keeping its buffers (a new block of samples starts).
    pub(crate) fn clear(&mut self) {
        self.pending.fill(0.0);
        self.pending_rows = 0;
        self.flushed = None;
    }

    /// `flushed` += `pending` (upper triangle), in f64.
    fn flush(&mut self) {
        let (len, stride) = (self.pending.len(), self.stride());
        match self.flushed.as_mut() {
            Some(flushed) => flushed.par_chunks_mut(stride).zip(self.pending.par_chunks(stride)).enumerate().for_each(|(t, (acc, part))| {
                // Row r₀ + t starts at its diagonal, column offset t.
                for (a, &p) in acc[t..].iter_mut().zip(&part[t..]) {
                    *a += f64::from(p);
                }
            }),
            None => {
                let pending = &self.pending;
                self.flushed = Some(fresh_upper(len, stride, |t, c| 0.0 + f64::from(pending[t * stride + c])));
            }
        }
        self.pending_rows = 0;
    }

    /// The full symmetric matrix S / `divisor` in f32: the upper triangle computed (sum of
    /// the f32 and f64 parts, scaled in f64, rounded once to f32) and mirrored bit for bit.
    ///
    /// One pass, [`FINISH_ROWS`] rows at a time, a square tile of them at a time: each
    /// tile's upper values are computed once, written to their rows and, from the tile in
    /// L1, to their mirror below the diagonal. (Mirroring by reading the written upper
    /// triangle back, 8 KiB-strided at M = 2048, took twice as long as computing it.)
    ///
    /// The scaling multiplies by the f64 reciprocal of `divisor` rather than dividing
    /// (vdivpd would make this pass several times slower): the two differ by at most one
    /// f64 ulp, 10⁻¹⁶ relative, before the rounding to f32.
    pub(crate) fn finish(&self, divisor: f64) -> Array2<f32> {
        self.finish_with(None, divisor)
    }

    /// What `self.absorb(other)` and then [`SymmetricSum::finish`] give, bit for bit,
    /// without forming the absorbed sum: each entry is (0 + ((pending + flushed) + (other's
    /// pending + flushed))) · (1/divisor) in f64, rounded to f32. The last of a reduction's
    /// lanes is finished so: the absorb wrote a new f64 buffer and cleared both `pending`s,
    /// which the finish then read again (4 % of W3's MC KFAC).
    pub(crate) fn finish_absorbing(&self, other: &SymmetricSum, divisor: f64) -> Array2<f32> {
        assert!((self.m, self.r0, self.r1) == (other.m, other.r0, other.r1), "absorb of another band");
        self.finish_with(Some(other), divisor)
    }

    /// [`SymmetricSum::finish`], or [`SymmetricSum::finish_absorbing`] `other`.
    fn finish_with(&self, other: Option<&SymmetricSum>, divisor: f64) -> Array2<f32> {
        assert!(self.is_whole(), "finish of a band; use finish_band_into");
        let m = self.m;
        let scale = 1.0 / divisor;
        // Not zeroed: every value is written below, and a 16 MB memset was 1 % of W1.
        let mut out: Vec<std::mem::MaybeUninit<f32>> = Vec::with_capacity(m * m);
        // SAFETY: MaybeUninit values need no initialisation.
        unsafe { out.set_len(m * m) };
        let shared = SharedOut(out.as_mut_ptr().cast::<f32>());
        let blocks = m.div_ceil(FINISH_ROWS);
        // A task takes blocks t and blocks − 1 − t: the first has the most columns right of
        // its diagonal, the second the fewest.
        (0..blocks.div_ceil(2)).into_par_iter().for_each(|t| {
            let mut tile = [[0.0f32; FINISH_ROWS]; FINISH_ROWS];
            // SAFETY: see `finish_rows`; the tasks' row blocks are distinct.
            unsafe { self.finish_rows(other, t, scale, shared, &mut tile) };
            if blocks - 1 - t != t {
                unsafe { self.finish_rows(other, blocks - 1 - t, scale, shared, &mut tile) };
            }
        });
        // SAFETY: every one of the m·m values was written above; MaybeUninit<f32> has f32's
        // layout, so the allocation is reused as it is.
        let out: Vec<f32> = unsafe {
            let mut out = std::mem::ManuallyDrop::new(out);
            Vec::from_raw_parts(out.as_mut_ptr().cast::<f32>(), out.len(), out.capacity())
        };
        Array2::from_shape_vec((m, m), out).expect("m·m values form an m×m array")
    }

    /// [`SymmetricSum::finish`]'s work for row block `b` (rows R = b·FINISH_ROWS ..): the
    /// upper entries (i ∈ R, j ≥ i) and their mirror (j, i), into the m×m output at `out`.
    ///
    /// # Safety
    /// `out` holds m·m f32, and no other thread touches what this call writes: the entries
    /// (i, j ≥ i) and (j > i, i) for i ∈ R, which are those of no other row block.
    unsafe fn finish_rows(&self, other: Option<&SymmetricSum>, b: usize, scale: f64, out: SharedOut, tile: &mut [[f32; FINISH_ROWS]; FINISH_ROWS]) {
        let m = self.m;
        let base = out.get();
        let rows = b * FINISH_ROWS..m.min((b + 1) * FINISH_ROWS);
        for c0 in (rows.start..m).step_by(FINISH_ROWS) {
            let width = FINISH_ROWS.min(m - c0);
            // Rows R, columns c0 .. c0 + width, from the diagonal on.
            for (t, i) in rows.clone().enumerate() {
                let from = i.max(c0);
                if from >= c0 + width {
                    continue;
                }
                let at = i * m + from..i * m + c0 + width;
                // SAFETY: (i, j ≥ i) for i ∈ R, inside the output (the caller's contract).
                let dst = unsafe { std::slice::from_raw_parts_mut(base.add(at.start), at.len()) };
                let kept = &mut tile[t][from - c0..width];
                let pending = &self.pending[at.clone()];
                // A loop per case, so that the common ones vectorize.
                let flushed = self.flushed.as_deref().map(|f| &f[at.clone()]);
                match other {
                    None => match flushed {
                        None => {
                            for ((o, k), &p) in dst.iter_mut().zip(kept).zip(pending) {
                                let v = (f64::from(p) * scale) as f32;
                                (*o, *k) = (v, v);
                            }
                        }
                        Some(flushed) => {
                            for (((o, k), &p), &f) in dst.iter_mut().zip(kept).zip(pending).zip(flushed) {
                                let v = ((f64::from(p) + f) * scale) as f32;
                                (*o, *k) = (v, v);
                            }
                        }
                    },
                    // absorb's (p + f) + (p' + f'), with 0 for a sum not flushed, then
                    // finish's 0 + that (its `pending` was cleared).
                    Some(other) => {
                        let theirs = &other.pending[at.clone()];
                        match (flushed, other.flushed.as_deref().map(|f| &f[at.clone()])) {
                            (None, None) => {
                                for (((o, k), &p), &q) in dst.iter_mut().zip(kept).zip(pending).zip(theirs) {
                                    let v = ((0.0 + ((f64::from(p) + 0.0) + (f64::from(q) + 0.0))) * scale) as f32;
                                    (*o, *k) = (v, v);
                                }
                            }
                            (f1, f2) => {
                                for (c, ((o, k), (&p, &q))) in dst.iter_mut().zip(kept).zip(pending.iter().zip(theirs)).enumerate() {
                                    let (f, g) = (f1.map_or(0.0, |f| f[c]), f2.map_or(0.0, |f| f[c]));
                                    let v = ((0.0 + ((f64::from(p) + f) + (f64::from(q) + g))) * scale) as f32;
                                    (*o, *k) = (v, v);
                                }
                            }
                        }
                    }
                }
            }
            // Their mirror: (j, i) for j in the tile's columns and i ∈ R, i < j (column c of
            // the tile, read down its rows).
            #[allow(clippy::needless_range_loop)]
            for c in 0..width {
                let j = c0 + c;
                let count = j.min(rows.end).saturating_sub(rows.start);
                // SAFETY: (j, i < j) for i ∈ R, inside the output (the caller's contract).
                let dst = unsafe { std::slice::from_raw_parts_mut(base.add(j * m + rows.start), count) };
                for (t, o) in dst.iter_mut().enumerate() {
                    *o = tile[t][c];
                }
            }
        }
    }

    /// Writes this band's rows of S / `divisor` (f32, the values [`SymmetricSum::finish`]
    /// gives, bit for bit) into the m×m result: `band` is the result's rows r₀ .. r₁ (full
    /// width) and `below` its rows r₁ .. m, whose columns r₀ .. r₁ are the band's mirror.
    /// The columns left of r₀ in the band's rows are the mirror of earlier bands, written by
    /// them.
    pub(crate) fn finish_band_into(&self, divisor: f64, band: &mut [f32], below: &mut [f32]) {
        let (r0, stride, scale) = (self.r0, self.stride(), 1.0 / divisor);
        let pending = &self.pending;
        match &self.flushed {
            None => write_band(self.m, self.r0..self.r1, band, below, |i, j| {
                (f64::from(pending[(i - r0) * stride + j - r0]) * scale) as f32
            }),
            Some(flushed) => write_band(self.m, self.r0..self.r1, band, below, |i, j| {
                let at = (i - r0) * stride + j - r0;
                ((f64::from(pending[at]) + flushed[at]) * scale) as f32
            }),
        }
    }

    /// Puts this band's rows of S / `divisor` (the values of [`SymmetricSum::finish`], bit
    /// for bit) into tensor `tensor` of `sink` (see [`put_band`]).
    pub(crate) fn put_band_into(&self, divisor: f64, sink: &mut dyn ResultSink, tensor: usize) -> Result<()> {
        let (r0, stride, scale) = (self.r0, self.stride(), 1.0 / divisor);
        let pending = &self.pending;
        match &self.flushed {
            None => put_band(sink, tensor, self.m, self.r0..self.r1, |i, j| (f64::from(pending[(i - r0) * stride + j - r0]) * scale) as f32),
            Some(flushed) => put_band(sink, tensor, self.m, self.r0..self.r1, |i, j| {
                let at = (i - r0) * stride + j - r0;
                ((f64::from(pending[at]) + flushed[at]) * scale) as f32
            }),
        }
    }
}

/// Writes rows `rows` = [r₀, r₁) of a symmetric m×m f32 matrix whose upper entries (i, j ≥ i)
/// are `value(i, j)`: into `band` (those rows, full width, from column r₀ on) and into
/// `below` (rows r₁ .. m, columns r₀ .. r₁, the mirror). Both are row-major with row length m.
pub(crate) fn write_band(
    m: usize,
    rows: std::ops::Range<usize>,
    band: &mut [f32],
    below: &mut [f32],
    value: impl Fn(usize, usize) -> f32 + Sync,
) {
    let (r0, r1) = (rows.start, rows.end);
    debug_assert_eq!((band.len(), below.len()), ((r1 - r0) * m, (m - r1) * m));
    if m == 0 {
        return;
    }
    band.par_chunks_mut(m).enumerate().for_each(|(t, row)| {
        let i = r0 + t;
        for (j, o) in row.iter_mut().enumerate().take(i).skip(r0) {
            *o = value(j, i);
        }
        for (j, o) in row.iter_mut().enumerate().skip(i) {
            *o = value(i, j);
        }
    });
    // FINISH_ROWS rows of `below` per task, walked band row by band row: the reads run
    // along row i of the band and the writes touch FINISH_ROWS output rows at a time.
    below.par_chunks_mut(FINISH_ROWS * m).enumerate().for_each(|(b, block)| {
        let j0 = r1 + b * FINISH_ROWS;
        let count = block.len() / m;
        for i in r0..r1 {
            for t in 0..count {
                block[t * m + i] = value(i, j0 + t);
            }
        }
    });
}

/// Values per run handed to a sink by [`put_band`] (4 MiB of f32).
const PUT_VALUES: usize = 1 << 20;

/// Puts rows `rows` = [r₀, r₁) of a symmetric m×m f32 matrix whose upper entries (i, j ≥ i)
/// are `value(i, j)` into tensor `tensor` of `sink`: each of those rows from column r₀ on,
/// and the mirror, columns r₀ .. r₁ of the rows r₁ .. m. Columns left of r₀ are the mirror
/// of earlier bands, which put them; so the bands 0..m of a plan put every value once.
/// A sink that keeps the matrix in memory is filled in place ([`write_band`], in
/// parallel); any other gets runs of at most [`PUT_VALUES`] values, computed in parallel.
pub(crate) fn put_band(
    sink: &mut dyn ResultSink,
    tensor: usize,
    m: usize,
    rows: std::ops::Range<usize>,
    value: impl Fn(usize, usize) -> f32 + Sync,
) -> Result<()> {
    let (r0, r1) = (rows.start, rows.end);
    if r0 >= r1 {
        return Ok(());
    }
    if let Some(buffers) = sink.buffers() {
        let out = buffers.get_mut(tensor).filter(|b| b.len() == m * m).ok_or_else(|| {
            crate::error::FisherError::InvalidInput(format!("tensor {tensor} is not an m×m matrix of side {m}"))
        })?;
        let (head, below) = out.split_at_mut(r1 * m);
        write_band(m, rows, &mut head[r0 * m..], below, value);
        return Ok(());
    }
    // The band's rows, columns r₀ .. m, a group of whole rows per run.
    let width = m - r0;
    let group = (PUT_VALUES / width.max(1)).max(1);
    let mut buf = Vec::new();
    for g0 in (r0..r1).step_by(group) {
        let g1 = (g0 + group).min(r1);
        buf.resize((g1 - g0) * width, 0f32);
        buf.par_chunks_mut(width).enumerate().for_each(|(t, row)| {
            let i = g0 + t;
            for (c, o) in row.iter_mut().enumerate() {
                let j = r0 + c;
                *o = if j < i { value(j, i) } else { value(i, j) };
            }
        });
        for (t, row) in buf.chunks(width).enumerate() {
            sink.put(tensor, (g0 + t) * m + r0, row)?;
        }
    }
    // The mirror: rows r₁ .. m, columns r₀ .. r₁.
    let width = r1 - r0;
    let group = (PUT_VALUES / width.max(1)).max(1);
    for g0 in (r1..m).step_by(group) {
        let g1 = (g0 + group).min(m);
        buf.resize((g1 - g0) * width, 0f32);
        buf.par_chunks_mut(width).enumerate().for_each(|(t, row)| {
            for (c, o) in row.iter_mut().enumerate() {
                *o = value(r0 + c, g0 + t);
            }
        });
        for (t, row) in buf.chunks(width).enumerate() {
            sink.put(tensor, (g0 + t) * m + r0, row)?;
        }
    }
    Ok(())
}

/// The bands of rows of an m×m symmetric sum for passes within `budget` bytes, where
/// `cost(r₀, r₁)` is what a band's sums hold: bands start at multiples of [`PANEL`] and hold
/// at least [`PANEL`] rows (or the rest), so a budget below one panel gives panel-wide bands
/// rather than an error. One band 0..m when the whole triangle fits.
pub(crate) fn plan_bands(m: usize, budget: u64, cost: impl Fn(usize, usize) -> u64) -> Vec<std::ops::Range<usize>> {
    let mut bands = Vec::new();
    let mut r0 = 0;
    while r0 < m {
        let mut r1 = (r0 + PANEL).min(m);
        while r1 < m && cost(r0, (r1 + PANEL).min(m)) <= budget {
            r1 = (r1 + PANEL).min(m);
        }
        bands.push(r0..r1);
        r0 = r1;
    }
    bands
}

/// Values a band [r₀, r₁) of an m×m sum stores: (r₁ − r₀) × (m − r₀).
pub(crate) fn band_values(m: usize, r0: usize, r1: usize) -> u64 {
    (r1 - r0) as u64 * (m - r0) as u64
}

/// Values of the packed upper triangle in the rows [r₀, r₁) of an m×m matrix.
pub(crate) fn band_packed(m: usize, r0: usize, r1: usize) -> u64 {
    (r0..r1).map(|i| (m - i) as u64).sum()
}

/// One band of rows of one symmetric sum among several: the sum of `layer` (an index the
/// caller gives meaning to: 0 for a whole F, a layer or module for blocks), of side `size`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Unit {
    pub layer: usize,
    pub size: usize,
    pub rows: std::ops::Range<usize>,
}

/// The passes over the samples in which symmetric sums of sides `sides` are computed within
/// `budget` bytes: each cut into bands of rows ([`plan_bands`]), the bands grouped in order
/// into passes that fit. A band costs 12 bytes per value (the f32 partial and the f64 total)
/// and `per_packed` more per packed value (the exact sums across blocks of the network path).
/// One pass of whole sums when everything fits.
pub(crate) fn plan_units(sides: &[usize], budget: u64, per_packed: u64) -> Vec<Vec<Unit>> {
    let cost = |m: usize, r0: usize, r1: usize| {
        band_values(m, r0, r1).saturating_mul(12).saturating_add(band_packed(m, r0, r1).saturating_mul(per_packed))
    };
    let units: Vec<Unit> = sides
        .iter()
        .enumerate()
        .flat_map(|(layer, &m)| plan_bands(m, budget, |r0, r1| cost(m, r0, r1)).into_iter().map(move |rows| Unit { layer, size: m, rows }))
        .collect();
    let sizes: Vec<u64> = units.iter().map(|u| cost(u.size, u.rows.start, u.rows.end)).collect();
    crate::backend::plan_passes(&sizes, budget).into_iter().map(|r| units[r].to_vec()).collect()
}

/// Whether `passes` is the single pass of whole sums (the unbanded path).
pub(crate) fn is_single_whole_pass(passes: &[Vec<Unit>]) -> bool {
    passes.len() == 1 && passes[0].iter().all(|u| u.rows.start == 0 && u.rows.end == u.size)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Σ aₖaₖᵀ over the rows of `parts`, in f64.
    fn reference(parts: &[&Array2<f32>], m: usize) -> Array2<f64> {
        let mut out = Array2::<f64>::zeros((m, m));
        for a in parts {
            let a = a.mapv(f64::from);
            out += &a.t().dot(&a);
        }
        out
    }

    #[test]
    fn split_panels_match_the_reference_and_a_band_matches_the_whole() {
        // M = 700 < SPLIT_FROM: three panels (256, 256, 188 rows), each a rectangle and
        // diagonal sub-panels (the last of 60 rows); a band of the middle panel.
        let (k, m) = (300, 700);
        let a = crate::synthetic::normal_matrix(k, m, 7);
        let mut whole = SymmetricSum::new(m);
        whole.add(a.view());
        let got = whole.finish(1.0);
        let want = reference(&[&a], m);
        let scale = want.iter().fold(0f64, |s, v| s.max(v.abs()));
        let err = got.iter().zip(want.iter()).fold(0f64, |e, (&g, &w)| e.max((f64::from(g) - w).abs()));
        assert!(err <= 1e-6 * scale, "max error {err} of {scale}");
        let mut band = SymmetricSum::band(m, PANEL..2 * PANEL);
        band.add(a.view());
        let whole_rows = whole.packed_upper();
        let from = (0..PANEL).map(|i| m - i).sum::<usize>();
        let band_rows = band.packed_upper();
        assert!(band_rows.iter().zip(&whole_rows[from..]).all(|(x, y)| x.to_bits() == y.to_bits()));
    }

    /// The kernels this CPU runs.
    fn kernels() -> Vec<Kernel> {
        let mut all = vec![Kernel::Gemm];
        #[cfg(target_arch = "x86_64")]
        if crate::backend::cpu::syrk_avx512::available() {
            all.push(Kernel::Avx512);
        }
        all
    }

    #[test]
    fn every_kernel_matches_the_reference_in_bands_over_strided_input_and_flushes() {
        // Sides around the tile sizes (8 × 48) and the panel (256): ragged tiles, a band
        // whose rows end inside a tile, column-major and strided input, and more rows than
        // FLUSH_ROWS (f32 partials moved to f64) in chunks of different lengths.
        if kernels().len() == 1 {
            eprintln!("only the gemm kernel on this CPU: its own tests cover it");
        }
        for kernel in kernels() {
            for m in [1usize, 7, 47, 48, 49, 300, 531] {
                let k = FLUSH_ROWS + 613;
                let a = crate::synthetic::normal_matrix(k, m, m as u64);
                let want = reference(&[&a], m);
                let scale = want.iter().fold(0f64, |s, v| s.max(v.abs()));
                let check = |sum: &SymmetricSum, what: &str| {
                    let got = sum.packed_upper();
                    let r0 = sum.first_row();
                    let mut at = 0;
                    for i in r0..sum.r1 {
                        for j in i..m {
                            let err = (got[at] - want[[i, j]]).abs();
                            assert!(err <= 2e-6 * scale, "{kernel:?} m {m} {what}: ({i}, {j}) off by {err} of {scale}");
                            at += 1;
                        }
                    }
                };
                // Row-major, in three uneven chunks.
                let mut whole = SymmetricSum::band_with(m, 0..m, kernel);
                for (s0, s1) in [(0, 1000), (1000, 1003), (1003, k)] {
                    whole.add(a.slice(s![s0..s1, ..]));
                }
                check(&whole, "whole");
                // Column-major (a transposed copy viewed back), and every other row (strided).
                let t = a.t().as_standard_layout().into_owned();
                let mut cm = SymmetricSum::band_with(m, 0..m, kernel);
                cm.add(t.t());
                check(&cm, "column-major");
                let mut strided = SymmetricSum::band_with(m, 0..m, kernel);
                strided.add(a.slice(s![..;2, ..]));
                let half = reference(&[&a.slice(s![..;2, ..]).to_owned()], m);
                let got = strided.finish(1.0);
                let err = got.iter().zip(half.iter()).fold(0f64, |e, (&g, &w)| e.max((f64::from(g) - w).abs()));
                assert!(err <= 2e-6 * scale, "{kernel:?} m {m} strided: {err}");
                // A band of the second panel: bitwise the whole. Bands end at a panel's end
                // (`plan_bands`), which `gemm`'s calls need; the AVX-512 kernel's sums do not
                // depend on the tiling at all, so for it the band also ends inside a tile.
                let ends: &[usize] = if kernel == Kernel::Gemm { &[2 * PANEL] } else { &[2 * PANEL, PANEL + 13] };
                for rows in ends.iter().filter(|_| m > PANEL).map(|&end| PANEL..end.min(m)) {
                    let mut band = SymmetricSum::band_with(m, rows.clone(), kernel);
                    for (s0, s1) in [(0, 1000), (1000, 1003), (1003, k)] {
                        band.add(a.slice(s![s0..s1, ..]));
                    }
                    check(&band, "band");
                    let from = (0..PANEL).map(|i| m - i).sum::<usize>();
                    let whole_rows = whole.packed_upper();
                    let band_rows = band.packed_upper();
                    assert!(band_rows.iter().zip(&whole_rows[from..]).all(|(x, y)| x.to_bits() == y.to_bits()), "{kernel:?} m {m}: band ≠ whole");
                }
            }
        }
    }

    /// Finishing a sum with a second lane ([`SymmetricSum::finish_absorbing`]) is absorbing
    /// it and then finishing, bit for bit: neither, either or both lanes past a flush, sides
    /// of one to several of the finish's 64-row blocks (odd and even counts), both kernels.
    #[test]
    fn finishing_with_a_lane_is_absorbing_it_first_bit_for_bit() {
        for kernel in kernels() {
            for m in [1usize, 7, 64, 65, 200] {
                for (ka, kb) in [(300, 200), (FLUSH_ROWS + 50, 100), (100, FLUSH_ROWS + 70), (FLUSH_ROWS + 1, FLUSH_ROWS + 9)] {
                    let sum_of = |k: usize, seed: u64| {
                        let a = crate::synthetic::normal_matrix(k, m, seed);
                        let mut sum = SymmetricSum::band_with(m, 0..m, kernel);
                        sum.add(a.slice(s![..k / 2, ..]));
                        sum.add(a.slice(s![k / 2.., ..]));
                        sum
                    };
                    let (mut x, y) = (sum_of(ka, 1 + m as u64), sum_of(kb, 2 + m as u64));
                    assert_eq!((x.flushed.is_some(), y.flushed.is_some()), (ka > FLUSH_ROWS, kb > FLUSH_ROWS));
                    let fused = x.finish_absorbing(&y, 3.0);
                    x.absorb(&y);
                    let plain = x.finish(3.0);
                    let same = fused.iter().zip(plain.iter()).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{kernel:?} m {m}, {ka} + {kb} rows: finish_absorbing ≠ absorb + finish");
                }
            }
        }
    }

    #[test]
    fn absorb_adds_two_sums_past_their_flushes_and_the_sum_goes_on() {
        // Both sums past FLUSH_ROWS (f32 pending and f64 flushed parts on both sides), then
        // more rows into the absorbing sum.
        let m = 37;
        let (a, b, c) = (
            crate::synthetic::normal_matrix(FLUSH_ROWS + 900, m, 1),
            crate::synthetic::normal_matrix(FLUSH_ROWS + 77, m, 2),
            crate::synthetic::normal_matrix(300, m, 3),
        );
        let (mut x, mut y) = (SymmetricSum::new(m), SymmetricSum::new(m));
        x.add(a.view());
        y.add(b.view());
        x.absorb(&y);
        let check = |got: &Array2<f32>, want: &Array2<f64>| {
            let scale = want.iter().fold(0f64, |s, v| s.max(v.abs()));
            let err = got.iter().zip(want.iter()).fold(0f64, |e, (&g, &w)| e.max((f64::from(g) - w).abs()));
            assert!(err <= 1e-6 * scale, "max error {err} of {scale}");
        };
        check(&x.finish(1.0), &reference(&[&a, &b], m));
        x.add(c.view());
        check(&x.finish(1.0), &reference(&[&a, &b, &c], m));
        // The absorbed sum is left as it was.
        check(&y.finish(1.0), &reference(&[&b], m));
    }
}
