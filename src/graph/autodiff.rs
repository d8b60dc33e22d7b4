//! Reverse and forward mode over primitive programs.
//!
//! **Reverse mode** walks the forward instructions backwards. Every slot that depends on a
//! parameter gets a cotangent slot with `Draw` rows (R rows per sample: one per output row
//! s_r of the variant, so one pass gives every per-row gradient J_iᵀ s_ir). Each primitive
//! adds its vector–Jacobian product into its operands' cotangents (the first contribution
//! overwrites, later ones accumulate), so the cotangent of a parameter ends up as its
//! per-row gradient. **Forward mode** walks them forwards with a tangent per slot that
//! depends on a parameter, seeded by the direction v of each parameter, and gives J·v.
//!
//! The derivatives (f'(x) of element-wise functions, the transposes of sparse maps, the
//! scatter of a max-pool's gather) are themselves primitives, so both programs run on every
//! executor.

use std::collections::HashMap;
use std::sync::Arc;

use super::lower::Lowered;
use super::prim::{BinFn, Csr, Inst, MatDims, Program, Rows, Slot, SlotId};
use crate::error::{FisherError, Result};

struct Builder {
    slots: Vec<Slot>,
    shared: Vec<(SlotId, Arc<Vec<f32>>)>,
    zeros: HashMap<usize, SlotId>,
    transposes: HashMap<*const Csr, Arc<Csr>>,
}

impl Builder {
    fn slot(&mut self, name: String, len: usize, rows: Rows) -> SlotId {
        self.slots.push(Slot { name, len, rows });
        self.slots.len() - 1
    }

    /// A shared slot of `len` zeros (copies and negations are Add/Sub against it).
    fn zeros(&mut self, len: usize) -> SlotId {
        if let Some(&s) = self.zeros.get(&len) {
            return s;
        }
        let s = self.slot(format!("zeros.{len}"), len, Rows::Shared);
        self.shared.push((s, Arc::new(vec![0.0; len])));
        self.zeros.insert(len, s);
        s
    }

    fn transpose(&mut self, map: &Arc<Csr>) -> Arc<Csr> {
        Arc::clone(self.transposes.entry(Arc::as_ptr(map)).or_insert_with(|| Arc::new(map.transpose())))
    }
}

/// Cotangents (or tangents) being built: the slot of each forward slot, and whether it has
/// been written yet.
struct Duals {
    of: HashMap<SlotId, SlotId>,
    rows: Rows,
    suffix: &'static str,
}

impl Duals {
    /// The dual slot of forward slot `s`, and whether this is its first write.
    fn target(&mut self, b: &mut Builder, s: SlotId) -> (SlotId, bool) {
        if let Some(&d) = self.of.get(&s) {
            return (d, true);
        }
        let rows = if self.rows == Rows::Draw { Rows::Draw } else { b.slots[s].rows };
        let d = b.slot(format!("{}{}", b.slots[s].name, self.suffix), b.slots[s].len, rows);
        self.of.insert(s, d);
        (d, false)
    }
}

/// Derives the reverse and forward programs of a lowered forward pass.
pub fn differentiate(l: Lowered) -> Result<(Program, Vec<(String, String)>)> {
    let mut b = Builder { slots: l.slots, shared: l.shared, zeros: HashMap::new(), transposes: HashMap::new() };
    // Which slots depend on a parameter (only they carry derivatives); ArgMax indices never do.
    let mut depends = vec![false; b.slots.len()];
    for &p in &l.params {
        depends[p] = true;
    }
    for inst in &l.forward {
        if !matches!(inst, Inst::ArgMax { .. }) && inst.sources().iter().any(|&s| depends[s]) && !matches!(inst, Inst::ArgMax { .. }) {
            let d = inst.dst();
            let data_dep = match inst {
                Inst::GatherDyn { src, .. } => depends[*src],
                Inst::Embed { table, .. } => depends[*table],
                _ => true,
            };
            depends[d] = depends[d] || data_dep;
        }
    }
    if !depends[l.output] {
        return Err(FisherError::InvalidInput("the graph output does not depend on any parameter".into()));
    }

    // ---------------- reverse mode ----------------
    let output_cot = b.slot(format!("{}.cot", b.slots[l.output].name), b.slots[l.output].len, Rows::Draw);
    let mut cot = Duals { of: HashMap::from([(l.output, output_cot)]), rows: Rows::Draw, suffix: ".cot" };
    let mut backward = Vec::new();
    for inst in l.forward.iter().rev() {
        let y = inst.dst();
        let Some(&dy) = cot.of.get(&y) else { continue };
        if !depends[y] {
            continue;
        }
        vjp(&mut b, &mut cot, &depends, &l.windows, inst, dy, &mut backward);
    }
    let mut param_grads = Vec::new();
    for &p in &l.params {
        match cot.of.get(&p) {
            Some(&g) => param_grads.push(g),
            None => {
                // A parameter the output does not depend on: its gradient is zero.
                let g = b.slot(format!("{}.cot", b.slots[p].name), b.slots[p].len, Rows::Draw);
                backward.push(Inst::Zero { dst: g });
                param_grads.push(g);
            }
        }
    }
    let mut kfac = l.kfac;
    for site in &mut kfac {
        site.output_cot = match cot.of.get(&site.output_cot) {
            Some(&c) => c,
            None => {
                let len = b.slots[site.output_cot].len;
                let g = b.slot(format!("{}.cot", b.slots[site.output_cot].name), len, Rows::Draw);
                backward.push(Inst::Zero { dst: g });
                g
            }
        };
    }

    // ---------------- forward mode ----------------
    let mut tan = Duals { of: HashMap::new(), rows: Rows::Shared, suffix: ".tan" };
    let mut param_tangents = Vec::new();
    for &p in &l.params {
        let t = b.slot(format!("{}.tan", b.slots[p].name), b.slots[p].len, Rows::Shared);
        tan.of.insert(p, t);
        param_tangents.push(t);
    }
    let mut tangent = Vec::new();
    for inst in &l.forward {
        if depends[inst.dst()] {
            jvp(&mut b, &mut tan, inst, &mut tangent);
        }
    }
    let output_tangent = tan.of[&l.output];

    let kfac_cots: Vec<SlotId> = kfac.iter().map(|s| s.output_cot).collect();
    let backward_kfac = super::prim::prune(&backward, &kfac_cots);
    let program = Program {
        slots: b.slots,
        shared: b.shared,
        input: l.input,
        output: l.output,
        params: l.params,
        forward: l.forward,
        output_cot,
        backward,
        param_grads,
        backward_kfac,
        param_tangents,
        tangent,
        output_tangent,
        kfac,
    };
    Ok((program, l.kfac_refused))
}

/// Adds the VJP of `inst` (with output cotangent `dy`) into its operands' cotangents.
fn vjp(b: &mut Builder, cot: &mut Duals, depends: &[bool], windows: &HashMap<SlotId, Arc<Csr>>, inst: &Inst, dy: SlotId, out: &mut Vec<Inst>) {
    let y = inst.dst();
    match inst {
        Inst::Zero { .. } | Inst::ArgMax { .. } => {}
        Inst::Sparse { src, map, .. } => {
            if depends[*src] {
                let t = b.transpose(map);
                let (dx, acc) = cot.target(b, *src);
                out.push(Inst::Sparse { dst: dx, src: dy, map: t, acc });
            }
        }
        Inst::MatMul { a, b: bb, dims, .. } => {
            let MatDims { groups, m, k, n, ta, tb } = *dims;
            if depends[*a] {
                let (da, acc) = cot.target(b, *a);
                let inst = if !ta {
                    // dA (m×k) = dY · op(B)ᵀ.
                    Inst::MatMul { dst: da, a: dy, b: *bb, dims: MatDims { groups, m, k: n, n: k, ta: false, tb: !tb }, acc }
                } else {
                    // A stored k×m: dAᵀ... dA (k×m) = op(B) · dYᵀ.
                    Inst::MatMul { dst: da, a: *bb, b: dy, dims: MatDims { groups, m: k, k: n, n: m, ta: tb, tb: true }, acc }
                };
                out.push(inst);
            }
            if depends[*bb] {
                let (db, acc) = cot.target(b, *bb);
                let inst = if !tb {
                    // dB (k×n) = op(A)ᵀ · dY.
                    Inst::MatMul { dst: db, a: *a, b: dy, dims: MatDims { groups, m: k, k: m, n, ta: !ta, tb: false }, acc }
                } else {
                    // B stored n×k: dB (n×k) = dYᵀ · op(A).
                    Inst::MatMul { dst: db, a: dy, b: *a, dims: MatDims { groups, m: n, k: m, n: k, ta: true, tb: ta }, acc }
                };
                out.push(inst);
            }
        }
        Inst::Unary { src, f, .. } => {
            if depends[*src] {
                let fprime = f.derivative().expect("forward programs only use differentiable functions");
                let d = b.slot(format!("{}.deriv", b.slots[*src].name), b.slots[*src].len, b.slots[*src].rows);
                out.push(Inst::Unary { dst: d, src: *src, f: fprime });
                let (dx, acc) = cot.target(b, *src);
                out.push(Inst::Binary { dst: dx, a: dy, b: d, f: BinFn::Mul, acc });
            }
        }
        Inst::Binary { a, b: bb, f, .. } => {
            let len = b.slots[y].len;
            let (a, bb) = (*a, *bb);
            match f {
                BinFn::Add | BinFn::Sub => {
                    let z = b.zeros(len);
                    if depends[a] {
                        let (da, acc) = cot.target(b, a);
                        out.push(Inst::Binary { dst: da, a: dy, b: z, f: BinFn::Add, acc });
                    }
                    if depends[bb] {
                        let (db, acc) = cot.target(b, bb);
                        let sign = if *f == BinFn::Add { BinFn::Add } else { BinFn::Sub };
                        out.push(match sign {
                            BinFn::Add => Inst::Binary { dst: db, a: dy, b: z, f: BinFn::Add, acc },
                            _ => Inst::Binary { dst: db, a: z, b: dy, f: BinFn::Sub, acc },
                        });
                    }
                }
                BinFn::Mul => {
                    if depends[a] {
                        let (da, acc) = cot.target(b, a);
                        out.push(Inst::Binary { dst: da, a: dy, b: bb, f: BinFn::Mul, acc });
                    }
                    if depends[bb] {
                        let (db, acc) = cot.target(b, bb);
                        out.push(Inst::Binary { dst: db, a: dy, b: a, f: BinFn::Mul, acc });
                    }
                }
                BinFn::Div => {
                    if depends[a] {
                        let (da, acc) = cot.target(b, a);
                        out.push(Inst::Binary { dst: da, a: dy, b: bb, f: BinFn::Div, acc });
                    }
                    if depends[bb] {
                        // d(a/b)/db = −(a/b)/b = −y/b.
                        let q = b.slot(format!("{}.dy_over_b", b.slots[y].name), len, Rows::Draw);
                        out.push(Inst::Binary { dst: q, a: dy, b: bb, f: BinFn::Div, acc: false });
                        let t = b.slot(format!("{}.dy_y_over_b", b.slots[y].name), len, Rows::Draw);
                        out.push(Inst::Binary { dst: t, a: q, b: y, f: BinFn::Mul, acc: false });
                        let z = b.zeros(len);
                        let (db, acc) = cot.target(b, bb);
                        out.push(Inst::Binary { dst: db, a: z, b: t, f: BinFn::Sub, acc });
                    }
                }
            }
        }
        Inst::GatherDyn { src, idx, .. } => {
            if depends[*src] {
                let candidates = b.transpose(&windows[idx]);
                let (dx, acc) = cot.target(b, *src);
                out.push(Inst::ScatterDyn { dst: dx, src: dy, idx: *idx, candidates, acc });
            }
        }
        Inst::Embed { table, tokens, dim, .. } => {
            if depends[*table] {
                let (dt, acc) = cot.target(b, *table);
                out.push(Inst::EmbedBack { dst: dt, src: dy, tokens: *tokens, dim: *dim, acc });
            }
        }
        Inst::ScatterDyn { .. } | Inst::EmbedBack { .. } => unreachable!("not emitted by the lowering"),
    }
}

/// Emits the JVP of `inst`: the tangent of its destination from its operands' tangents.
fn jvp(b: &mut Builder, tan: &mut Duals, inst: &Inst, out: &mut Vec<Inst>) {
    let y = inst.dst();
    let t_of = |tan: &Duals, s: SlotId| tan.of.get(&s).copied();
    match inst {
        Inst::Zero { .. } | Inst::ArgMax { .. } => {}
        Inst::Sparse { src, map, acc, .. } => {
            if let Some(tx) = t_of(tan, *src) {
                let (ty, written) = tan.target(b, y);
                out.push(Inst::Sparse { dst: ty, src: tx, map: Arc::clone(map), acc: *acc && written });
            } else if *acc {
                // A concat part without a tangent adds nothing.
            } else {
                let (ty, _) = tan.target(b, y);
                out.push(Inst::Zero { dst: ty });
            }
        }
        Inst::MatMul { a, b: bb, dims, .. } => {
            let (ta, tb) = (t_of(tan, *a), t_of(tan, *bb));
            let (ty, _) = tan.target(b, y);
            let mut acc = false;
            if let Some(ta) = ta {
                out.push(Inst::MatMul { dst: ty, a: ta, b: *bb, dims: *dims, acc });
                acc = true;
            }
            if let Some(tb) = tb {
                out.push(Inst::MatMul { dst: ty, a: *a, b: tb, dims: *dims, acc });
            }
        }
        Inst::Unary { src, f, .. } => {
            let tx = t_of(tan, *src).expect("a dependent unary has a dependent source");
            let fprime = f.derivative().expect("forward programs only use differentiable functions");
            let d = b.slot(format!("{}.deriv", b.slots[*src].name), b.slots[*src].len, b.slots[*src].rows);
            out.push(Inst::Unary { dst: d, src: *src, f: fprime });
            let (ty, _) = tan.target(b, y);
            out.push(Inst::Binary { dst: ty, a: tx, b: d, f: BinFn::Mul, acc: false });
        }
        Inst::Binary { a, b: bb, f, .. } => {
            let (ta, tb) = (t_of(tan, *a), t_of(tan, *bb));
            let len = b.slots[y].len;
            let z = b.zeros(len);
            let (ty, _) = tan.target(b, y);
            match f {
                BinFn::Add | BinFn::Sub => {
                    out.push(Inst::Binary { dst: ty, a: ta.unwrap_or(z), b: tb.unwrap_or(z), f: *f, acc: false });
                }
                BinFn::Mul => {
                    let mut acc = false;
                    if let Some(ta) = ta {
                        out.push(Inst::Binary { dst: ty, a: ta, b: *bb, f: BinFn::Mul, acc });
                        acc = true;
                    }
                    if let Some(tb) = tb {
                        out.push(Inst::Binary { dst: ty, a: *a, b: tb, f: BinFn::Mul, acc });
                    }
                }
                BinFn::Div => {
                    // (ta − y·tb)/b.
                    let rows = b.slots[y].rows;
                    let num = match tb {
                        Some(tb) => {
                            let yt = b.slot(format!("{}.y_tb", b.slots[y].name), len, rows);
                            out.push(Inst::Binary { dst: yt, a: y, b: tb, f: BinFn::Mul, acc: false });
                            let num = b.slot(format!("{}.num", b.slots[y].name), len, rows);
                            out.push(Inst::Binary { dst: num, a: ta.unwrap_or(z), b: yt, f: BinFn::Sub, acc: false });
                            num
                        }
                        None => ta.expect("a dependent division has a dependent operand"),
                    };
                    out.push(Inst::Binary { dst: ty, a: num, b: *bb, f: BinFn::Div, acc: false });
                }
            }
        }
        Inst::GatherDyn { src, idx, .. } => {
            let tx = t_of(tan, *src).expect("a dependent gather has a dependent source");
            let (ty, _) = tan.target(b, y);
            out.push(Inst::GatherDyn { dst: ty, src: tx, idx: *idx, acc: false });
        }
        Inst::Embed { table, tokens, dim, .. } => {
            let tt = t_of(tan, *table).expect("a dependent embedding has a dependent table");
            let (ty, _) = tan.target(b, y);
            out.push(Inst::Embed { dst: ty, table: tt, tokens: *tokens, dim: *dim });
        }
        Inst::ScatterDyn { .. } | Inst::EmbedBack { .. } => unreachable!("not emitted by the lowering"),
    }
}
