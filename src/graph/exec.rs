//! Executing a [`Program`] on a micro-batch: the stage-level interface that the CPU
//! ([`CpuExec`]) and the GPU executor implement, and that the graph Fisher driver
//! ([`crate::graph::fisher`]) calls.

use std::sync::Arc;

use rayon::prelude::*;

use super::prim::{Backward, BinFn, Csr, Inst, KfacSite, MatDims, Program, Rows, SlotId};
use crate::error::{FisherError, Result};

/// The stages of a graph Fisher on one micro-batch. Call order: [`ProgramExec::begin`], then
/// per micro-batch [`ProgramExec::forward`], then either [`ProgramExec::backward`] followed
/// by any of the reductions, or [`ProgramExec::tangent`].
pub trait ProgramExec {
    /// Human-readable description of where it runs.
    fn label(&self) -> String;

    /// The largest slot a micro-batch may hold, bytes (the GPU's storage binding limit).
    fn max_slot_bytes(&self) -> u64;

    /// Sizes the per-sample slots for micro-batches of up to `samples` samples with `r`
    /// output rows each, for runs of the reverse program `which` (only the `Draw` slots it
    /// touches are allocated).
    fn begin(&mut self, samples: usize, r: usize, which: Backward) -> Result<()>;

    /// Runs the forward program on `samples` inputs (row-major, `samples` × input length)
    /// and returns the outputs z (`samples` × C).
    fn forward(&mut self, x: &[f32], samples: usize) -> Result<Vec<f32>>;

    /// Runs the reverse program `which` seeded with the output rows (`samples`·R × C).
    fn backward(&mut self, rows: &[f32], which: Backward) -> Result<()>;

    /// Adds Σ_rows g² of every parameter's per-row gradient to `sums` (θ order, P values).
    fn add_diag(&mut self, sums: &mut [f64]) -> Result<()>;

    /// Adds Σ_rows g to `sums` (θ order): the Jᵀu of [`ProgramExec::backward`] summed over
    /// the micro-batch.
    fn add_grad_sum(&mut self, sums: &mut [f64]) -> Result<()>;

    /// Writes the per-row gradients (`samples`·R × P, row-major, θ order) into `out`.
    fn param_grads(&mut self, out: &mut [f32]) -> Result<()>;

    /// Adds to the KFAC sums of site `site`: `a` += Σ_samples Σ_s ã ãᵀ ((K+1)² with a bias,
    /// K² without) and `g` += Σ_rows (1/S) Σ_s δ δᵀ (Cout²), both row-major.
    fn add_kfac(&mut self, site: usize, a: &mut [f64], g: &mut [f64]) -> Result<()>;

    /// After [`ProgramExec::forward`]: J·v per sample (`samples` × C) for the direction `v`
    /// (θ order).
    fn tangent(&mut self, v: &[f32]) -> Result<Vec<f32>>;
}

/// The multi-threaded f32 CPU executor.
pub struct CpuExec {
    prog: Arc<Program>,
    data: Vec<Vec<f32>>,
    samples: usize,
    r: usize,
}

impl CpuExec {
    /// An executor for `prog`, with its shared slots filled.
    pub fn new(prog: Arc<Program>) -> CpuExec {
        let mut data: Vec<Vec<f32>> = prog.slots.iter().map(|s| if s.rows == Rows::Shared { vec![0.0; s.len] } else { Vec::new() }).collect();
        for (slot, values) in &prog.shared {
            data[*slot].copy_from_slice(values);
        }
        CpuExec { prog, data, samples: 0, r: 1 }
    }

    fn rows_of(&self, rows: Rows) -> usize {
        match rows {
            Rows::Shared => 1,
            Rows::Sample => self.samples,
            Rows::Draw => self.samples * self.r,
        }
    }

    /// Runs a list of instructions.
    fn run(&mut self, insts: &[Inst]) -> Result<()> {
        let prog = Arc::clone(&self.prog);
        for inst in insts {
            let d = inst.dst();
            let mut dst = std::mem::take(&mut self.data[d]);
            let result = self.run_one(&prog, inst, &mut dst);
            self.data[d] = dst;
            result?;
        }
        Ok(())
    }

    fn run_one(&self, prog: &Program, inst: &Inst, dst: &mut [f32]) -> Result<()> {
        let slots = &prog.slots;
        let d = inst.dst();
        let (dlen, drows) = (slots[d].len, slots[d].rows);
        let n = self.rows_of(drows);
        let r = self.r;
        // The row of operand `s` read by destination row `row`.
        let src = |s: SlotId| -> (&[f32], usize, Rows) { (&self.data[s][..], slots[s].len, slots[s].rows) };
        let at = move |rows: Rows, row: usize| -> usize {
            match (rows, drows) {
                (Rows::Shared, _) => 0,
                (Rows::Sample, Rows::Draw) => row / r,
                _ => row,
            }
        };
        let dst = &mut dst[..n * dlen];
        if dlen == 0 {
            // Nothing to write (and `par_chunks_mut(0)` would panic).
            return Ok(());
        }
        match inst {
            Inst::Zero { .. } => dst.fill(0.0),
            Inst::Sparse { src: s, map, acc, .. } => {
                let (x, xlen, xrows) = src(*s);
                let map: &Csr = map;
                dst.par_chunks_mut(dlen).enumerate().for_each(|(row, y)| {
                    let xr = &x[at(xrows, row) * xlen..][..xlen];
                    for (j, yj) in y.iter_mut().enumerate() {
                        let (k0, k1) = (map.offsets[j] as usize, map.offsets[j + 1] as usize);
                        let v: f32 = match &map.weights {
                            None => map.cols[k0..k1].iter().map(|&c| xr[c as usize]).sum(),
                            Some(w) => (k0..k1).map(|k| w[k] * xr[map.cols[k] as usize]).sum(),
                        };
                        if *acc {
                            *yj += v
                        } else {
                            *yj = v
                        }
                    }
                });
            }
            Inst::Unary { src: s, f, .. } => {
                let (x, xlen, xrows) = src(*s);
                dst.par_chunks_mut(dlen).enumerate().for_each(|(row, y)| {
                    let xr = &x[at(xrows, row) * xlen..][..xlen];
                    for (yj, &xj) in y.iter_mut().zip(xr) {
                        *yj = f.eval(xj);
                    }
                });
            }
            Inst::Binary { a, b, f, acc, .. } => {
                let (av, alen, arows) = src(*a);
                let (bv, blen, brows) = src(*b);
                dst.par_chunks_mut(dlen).enumerate().for_each(|(row, y)| {
                    let ar = &av[at(arows, row) * alen..][..alen];
                    let br = &bv[at(brows, row) * blen..][..blen];
                    match (f, acc) {
                        (BinFn::Add, false) => y.iter_mut().zip(ar).zip(br).for_each(|((y, a), b)| *y = a + b),
                        (BinFn::Mul, false) => y.iter_mut().zip(ar).zip(br).for_each(|((y, a), b)| *y = a * b),
                        (BinFn::Mul, true) => y.iter_mut().zip(ar).zip(br).for_each(|((y, a), b)| *y += a * b),
                        _ => y.iter_mut().zip(ar).zip(br).for_each(|((y, &a), &b)| {
                            let v = f.eval(a, b);
                            if *acc {
                                *y += v
                            } else {
                                *y = v
                            }
                        }),
                    }
                });
            }
            Inst::MatMul { a, b, dims, acc, .. } => {
                let (av, alen, arows) = src(*a);
                let (bv, blen, brows) = src(*b);
                matmul_rows(dst, dlen, n, (av, alen, arows), (bv, blen, brows), dims, *acc, &at);
            }
            Inst::ArgMax { src: s, windows, .. } => {
                let (x, xlen, xrows) = src(*s);
                dst.par_chunks_mut(dlen).enumerate().for_each(|(row, y)| {
                    let xr = &x[at(xrows, row) * xlen..][..xlen];
                    for (j, yj) in y.iter_mut().enumerate() {
                        let mut best = windows.cols[windows.offsets[j] as usize] as usize;
                        for &c in &windows.cols[windows.offsets[j] as usize..windows.offsets[j + 1] as usize] {
                            if xr[c as usize] > xr[best] {
                                best = c as usize;
                            }
                        }
                        *yj = best as f32;
                    }
                });
            }
            Inst::GatherDyn { src: s, idx, acc, .. } => {
                let (x, xlen, xrows) = src(*s);
                let (iv, ilen, irows) = src(*idx);
                dst.par_chunks_mut(dlen).enumerate().for_each(|(row, y)| {
                    let xr = &x[at(xrows, row) * xlen..][..xlen];
                    let ir = &iv[at(irows, row) * ilen..][..ilen];
                    for (yj, &i) in y.iter_mut().zip(ir) {
                        let v = xr[i as usize];
                        if *acc {
                            *yj += v
                        } else {
                            *yj = v
                        }
                    }
                });
            }
            Inst::ScatterDyn { src: s, idx, candidates, acc, .. } => {
                let (x, xlen, xrows) = src(*s);
                let (iv, ilen, irows) = src(*idx);
                dst.par_chunks_mut(dlen).enumerate().for_each(|(row, y)| {
                    let xr = &x[at(xrows, row) * xlen..][..xlen];
                    let ir = &iv[at(irows, row) * ilen..][..ilen];
                    for (i, yi) in y.iter_mut().enumerate() {
                        let range = candidates.offsets[i] as usize..candidates.offsets[i + 1] as usize;
                        let v: f32 = candidates.cols[range].iter().filter(|&&j| ir[j as usize] as usize == i).map(|&j| xr[j as usize]).sum();
                        if *acc {
                            *yi += v
                        } else {
                            *yi = v
                        }
                    }
                });
            }
            Inst::Embed { table, tokens, dim, .. } => {
                let (tv, _, _) = src(*table);
                let (kv, klen, krows) = src(*tokens);
                let vocab = slots[*table].len / dim;
                dst.par_chunks_mut(dlen).enumerate().try_for_each(|(row, y)| {
                    let kr = &kv[at(krows, row) * klen..][..klen];
                    for (t, &tok) in kr.iter().enumerate() {
                        let v = token_index(tok, vocab)?;
                        y[t * dim..][..*dim].copy_from_slice(&tv[v * dim..][..*dim]);
                    }
                    Ok::<(), FisherError>(())
                })?;
            }
            Inst::EmbedBack { src: s, tokens, dim, acc, .. } => {
                let (x, xlen, xrows) = src(*s);
                let (kv, klen, krows) = src(*tokens);
                let vocab = dlen / dim;
                dst.par_chunks_mut(dlen).enumerate().try_for_each(|(row, y)| {
                    if !*acc {
                        y.fill(0.0);
                    }
                    let xr = &x[at(xrows, row) * xlen..][..xlen];
                    let kr = &kv[at(krows, row) * klen..][..klen];
                    for (t, &tok) in kr.iter().enumerate() {
                        let v = token_index(tok, vocab)?;
                        for (yd, xd) in y[v * dim..][..*dim].iter_mut().zip(&xr[t * dim..][..*dim]) {
                            *yd += xd;
                        }
                    }
                    Ok::<(), FisherError>(())
                })?;
            }
        }
        Ok(())
    }

    /// `sums` (θ order) += Σ_rows f(g) of every parameter's per-row gradient, in f64.
    fn column_sums(&self, sums: &mut [f64], f: impl Fn(f64) -> f64 + Sync) {
        let mut at = 0;
        for &g in &self.prog.param_grads {
            let len = self.prog.slots[g].len;
            let data = self.slot(g);
            sums[at..at + len].par_iter_mut().enumerate().for_each(|(j, s)| {
                *s += data.chunks_exact(len).map(|row| f(f64::from(row[j]))).sum::<f64>();
            });
            at += len;
        }
    }

    /// The values of slot `s` for the current micro-batch (every row of its class), for
    /// tests and debugging.
    pub fn slot(&self, s: SlotId) -> &[f32] {
        let rows = self.rows_of(self.prog.slots[s].rows);
        &self.data[s][..rows * self.prog.slots[s].len]
    }
}

/// A token value as a table row, or an error naming it.
pub(crate) fn token_index(tok: f32, vocab: usize) -> Result<usize> {
    if tok >= 0.0 && tok.fract() == 0.0 && (tok as usize) < vocab {
        Ok(tok as usize)
    } else {
        Err(FisherError::InvalidInput(format!("token {tok} is outside the embedding table's 0..{vocab}")))
    }
}

/// Strides of a stored matrix as (row stride, column stride) of its op(·) view.
fn op_strides(rows: usize, cols: usize, transposed: bool) -> (isize, isize) {
    // Stored rows×cols row-major: (cols, 1); stored transposed (cols×rows): (1, rows).
    if transposed {
        (1, rows as isize)
    } else {
        (cols as isize, 1)
    }
}

/// C (m×n at `c`, row stride `c_rs`) (+)= A·B with A and B given by pointers and strides.
///
/// # Safety
/// Every index (i < m, kk < k), (kk < k, j < n), (i < m, j < n) formed with the strides must
/// be inside the respective allocations, and C must not alias A or B.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_raw(
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    (c_rs, c_cs): (isize, isize),
    a: *const f32,
    (a_rs, a_cs): (isize, isize),
    b: *const f32,
    (b_rs, b_cs): (isize, isize),
    acc: bool,
    par: gemm::Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    gemm::gemm(m, n, k, c, c_cs, c_rs, acc, a, a_cs, a_rs, b, b_cs, b_rs, if acc { 1.0 } else { 0.0 }, 1.0, false, false, false, par);
}

type Operand<'a> = (&'a [f32], usize, Rows);

#[allow(clippy::too_many_arguments)]
fn matmul_rows(
    dst: &mut [f32],
    dlen: usize,
    n_rows: usize,
    (av, alen, arows): Operand<'_>,
    (bv, blen, brows): Operand<'_>,
    dims: &MatDims,
    acc: bool,
    at: &(dyn Fn(Rows, usize) -> usize + Sync),
) {
    let MatDims { groups, m, k, n, ta, tb } = *dims;
    if k == 0 {
        if !acc {
            dst.fill(0.0);
        }
        return;
    }
    let (a_rs, a_cs) = op_strides(m, k, ta);
    let (b_rs, b_cs) = op_strides(k, n, tb);
    // Fast path: A per row and B shared, one group, and A stored m×k: the rows stack into
    // one (rows·m)×k matrix times B (Gemm / MatMul layers), one large multi-threaded GEMM.
    if groups == 1 && brows == Rows::Shared && arows != Rows::Shared && !ta && alen == m * k && dlen == m * n && at(arows, n_rows.saturating_sub(1)) == n_rows.saturating_sub(1) {
        // SAFETY: A is n_rows·m × k at stride k inside `av`; B is k×n inside `bv`; C is
        // n_rows·m × n inside `dst`, which is a distinct buffer.
        unsafe {
            gemm_raw(n_rows * m, n, k, dst.as_mut_ptr(), (n as isize, 1), av.as_ptr(), (k as isize, 1), bv.as_ptr(), (b_rs, b_cs), acc, gemm::Parallelism::Rayon(0));
        }
        return;
    }
    // Fast path: A shared, B per row with n = 1 (y = W x per sample): Yᵀ = X · op(A)ᵀ.
    if groups == 1 && arows == Rows::Shared && brows != Rows::Shared && n == 1 && blen == k && dlen == m && at(brows, n_rows.saturating_sub(1)) == n_rows.saturating_sub(1) {
        // SAFETY: X is n_rows × k at stride k; op(A)ᵀ is k×m with swapped strides; C is
        // n_rows × m at stride m.
        unsafe {
            gemm_raw(n_rows, m, k, dst.as_mut_ptr(), (m as isize, 1), bv.as_ptr(), (k as isize, 1), av.as_ptr(), (a_cs, a_rs), acc, gemm::Parallelism::Rayon(0));
        }
        return;
    }
    let par = if n_rows == 1 { gemm::Parallelism::Rayon(0) } else { gemm::Parallelism::None };
    dst.par_chunks_mut(dlen).enumerate().for_each(|(row, y)| {
        let ar = &av[at(arows, row) * alen..][..alen];
        let br = &bv[at(brows, row) * blen..][..blen];
        for q in 0..groups {
            let yq = &mut y[q * m * n..][..m * n];
            let aq = &ar[q * m * k..][..m * k];
            let bq = &br[q * k * n..][..k * n];
            // SAFETY: each block holds exactly the m×k, k×n and m×n matrices the strides
            // address; y is a distinct buffer.
            unsafe {
                gemm_raw(m, n, k, yq.as_mut_ptr(), (n as isize, 1), aq.as_ptr(), (a_rs, a_cs), bq.as_ptr(), (b_rs, b_cs), acc, par);
            }
        }
    });
}

impl ProgramExec for CpuExec {
    fn label(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn max_slot_bytes(&self) -> u64 {
        u64::MAX
    }

    fn begin(&mut self, samples: usize, r: usize, which: Backward) -> Result<()> {
        self.r = r.max(1);
        let used = self.prog.draw_slots_used(which);
        for (s, slot) in self.prog.slots.iter().enumerate() {
            let rows = match slot.rows {
                Rows::Shared => continue,
                Rows::Draw if !used[s] => {
                    self.data[s] = Vec::new();
                    continue;
                }
                Rows::Sample => samples,
                Rows::Draw => samples.checked_mul(self.r).ok_or_else(|| FisherError::InvalidInput("micro-batch too large".into()))?,
            };
            let len = rows.checked_mul(slot.len).ok_or_else(|| FisherError::InvalidInput("micro-batch too large".into()))?;
            self.data[s] = vec![0.0; len];
        }
        self.samples = samples;
        Ok(())
    }

    fn forward(&mut self, x: &[f32], samples: usize) -> Result<Vec<f32>> {
        let prog = Arc::clone(&self.prog);
        let len = prog.slots[prog.input].len;
        if samples > self.data[prog.input].len() / len.max(1) || x.len() != samples * len {
            return Err(FisherError::InvalidInput(format!("a micro-batch of {samples} samples does not fit the executor")));
        }
        let full = self.samples;
        self.samples = samples;
        self.data[prog.input][..x.len()].copy_from_slice(x);
        let out = self.run(&prog.forward).map(|_| self.slot(prog.output).to_vec());
        if out.is_err() {
            self.samples = full;
        }
        out
    }

    fn backward(&mut self, rows: &[f32], which: Backward) -> Result<()> {
        let prog = Arc::clone(&self.prog);
        let need = self.samples * self.r * prog.slots[prog.output_cot].len;
        if rows.len() != need {
            return Err(FisherError::InvalidInput(format!("{} output-row values for {need}", rows.len())));
        }
        self.data[prog.output_cot][..need].copy_from_slice(rows);
        self.run(prog.backward_of(which))
    }

    fn add_diag(&mut self, sums: &mut [f64]) -> Result<()> {
        self.column_sums(sums, |v| v * v);
        Ok(())
    }

    fn add_grad_sum(&mut self, sums: &mut [f64]) -> Result<()> {
        self.column_sums(sums, |v| v);
        Ok(())
    }

    fn param_grads(&mut self, out: &mut [f32]) -> Result<()> {
        let rows = self.samples * self.r;
        let p: usize = self.prog.param_grads.iter().map(|&g| self.prog.slots[g].len).sum();
        if out.len() != rows * p {
            return Err(FisherError::InvalidInput(format!("{} values for {rows}×{p} gradient rows", out.len())));
        }
        let mut at = 0;
        for &g in &self.prog.param_grads {
            let len = self.prog.slots[g].len;
            let data = self.slot(g);
            out.par_chunks_mut(p).zip(data.par_chunks(len)).for_each(|(o, row)| o[at..at + len].copy_from_slice(row));
            at += len;
        }
        Ok(())
    }

    fn add_kfac(&mut self, site: usize, a: &mut [f64], g: &mut [f64]) -> Result<()> {
        let s: KfacSite = self.prog.kfac.get(site).cloned().ok_or_else(|| FisherError::InvalidInput(format!("no KFAC site {site}")))?;
        let bias = s.bias.is_some();
        let ka = s.fan_in + bias as usize;
        let x = self.slot(s.input);
        let d = self.slot(s.output_cot);
        a_sums(x, s.fan_in, s.positions, s.positions_last, bias, ka, a);
        let scale = 1.0 / s.positions as f64;
        let mut gg = vec![0f64; s.fan_out * s.fan_out];
        a_sums(d, s.fan_out, s.positions, s.positions_last, false, s.fan_out, &mut gg);
        for (t, v) in g.iter_mut().zip(gg) {
            *t += v * scale;
        }
        Ok(())
    }

    fn tangent(&mut self, v: &[f32]) -> Result<Vec<f32>> {
        let prog = Arc::clone(&self.prog);
        let mut at = 0;
        for &t in &prog.param_tangents {
            let len = prog.slots[t].len;
            let part = v.get(at..at + len).ok_or_else(|| FisherError::InvalidInput("direction shorter than θ".into()))?;
            self.data[t].copy_from_slice(part);
            at += len;
        }
        if at != v.len() {
            return Err(FisherError::InvalidInput(format!("direction has {} values; θ has {at}", v.len())));
        }
        self.run(&prog.tangent)?;
        Ok(self.slot(prog.output_tangent).to_vec())
    }
}

/// `out` ((ka)², row-major) += Σ_rows Σ_s x_s x_sᵀ, with x_s = [row's features at s; 1 if
/// `bias`], for rows of `features`·`positions` values stored features×positions
/// (`positions_last`) or positions×features. The rows' products accumulate in f32 by GEMM
/// (each call multi-threaded) for up to [`KFAC_F32_ROWS`] rows, then are added in f64: f32
/// sums stay short, f64 work is once per block of rows instead of once per row.
fn a_sums(x: &[f32], features: usize, positions: usize, positions_last: bool, bias: bool, ka: usize, out: &mut [f64]) {
    let len = features * positions;
    if len == 0 {
        return;
    }
    let (rs, cs) = if positions_last { (positions as isize, 1) } else { (1, features as isize) };
    let mut prod = vec![0f32; features * features];
    let mut bias_sums = vec![0f64; if bias { features } else { 0 }];
    for block in x.chunks(len * KFAC_F32_ROWS) {
        for (k, row) in block.chunks_exact(len).enumerate() {
            // SAFETY: X (features × positions) is addressed inside `row`, Xᵀ likewise;
            // `prod` is features² and distinct.
            unsafe {
                gemm_raw(features, features, positions, prod.as_mut_ptr(), (features as isize, 1), row.as_ptr(), (rs, cs), row.as_ptr(), (cs, rs), k > 0, gemm::Parallelism::Rayon(0));
            }
            if bias {
                for (i, sum) in bias_sums.iter_mut().enumerate() {
                    *sum += (0..positions)
                        .map(|s| f64::from(if positions_last { row[i * positions + s] } else { row[s * features + i] }))
                        .sum::<f64>();
                }
            }
        }
        out.par_chunks_mut(ka).take(features).enumerate().for_each(|(i, o)| {
            for (j, v) in o[..features].iter_mut().enumerate() {
                *v += f64::from(prod[i * features + j]);
            }
        });
    }
    if bias {
        let rows = (x.len() / len) as f64;
        for (i, &sum) in bias_sums.iter().enumerate() {
            out[i * ka + features] += sum;
            out[features * ka + i] += sum;
        }
        out[features * ka + features] += rows * positions as f64;
    }
}

/// Rows whose KFAC products are summed in f32 before they are added in f64.
const KFAC_F32_ROWS: usize = 64;
