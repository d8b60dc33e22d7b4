//! The constant evaluator: ONNX operators applied to tensors known at import (shape
//! arithmetic around the batch dimension, `Constant` subgraphs, transposed weights).
//! Every function checks its arguments and the size of its result; errors are messages
//! that the caller prefixes with the file and the node.

use super::tensor::{DType, Data, Known, Origin, MAX_FOLDED_ELEMENTS};
use crate::graph::ir::broadcast_shapes;

type R<T> = std::result::Result<T, String>;

/// Row-major strides of `shape`.
fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for k in (0..shape.len().saturating_sub(1)).rev() {
        s[k] = s[k + 1] * shape[k + 1];
    }
    s
}

/// The element count of `shape`, refused beyond [`MAX_FOLDED_ELEMENTS`].
pub fn checked_len(shape: &[usize]) -> R<usize> {
    let n = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).ok_or_else(|| format!("shape {shape:?} overflows"))?;
    if n > MAX_FOLDED_ELEMENTS {
        return Err(format!("a constant of shape {shape:?} ({n} elements) exceeds the import limit of {MAX_FOLDED_ELEMENTS}"));
    }
    Ok(n)
}

/// For each element of `out` (row-major), the index of the element of `input` that numpy
/// broadcasting reads (`input` aligned at the trailing axes).
fn broadcast_map(input: &[usize], out: &[usize]) -> R<Vec<usize>> {
    let n = checked_len(out)?;
    let pad = out.len() - input.len();
    let in_strides = strides(input);
    let out_strides = strides(out);
    Ok((0..n)
        .map(|lin| {
            let mut idx = 0;
            for k in 0..input.len() {
                let coord = (lin / out_strides[k + pad]) % out[k + pad];
                if input[k] != 1 {
                    idx += coord * in_strides[k];
                }
            }
            idx
        })
        .collect())
}

/// Picks elements `map` of `data`.
fn pick(data: &Data, map: &[usize]) -> Data {
    match data {
        Data::F(v) => Data::F(map.iter().map(|&i| v[i]).collect()),
        Data::I(v) => Data::I(map.iter().map(|&i| v[i]).collect()),
    }
}

/// Element-wise binary operators the evaluator knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bin {
    /// a + b.
    Add,
    /// a − b.
    Sub,
    /// a · b.
    Mul,
    /// a / b (integers: truncated; division by zero refused).
    Div,
    /// aᵇ.
    Pow,
    /// max(a, b).
    Max,
    /// min(a, b).
    Min,
    /// a == b (bool).
    Equal,
    /// a < b (bool).
    Less,
    /// a > b (bool).
    Greater,
}

impl Bin {
    /// The evaluator's operator for an ONNX op type.
    pub fn from_onnx(op: &str) -> Option<Bin> {
        Some(match op {
            "Add" => Bin::Add,
            "Sub" => Bin::Sub,
            "Mul" => Bin::Mul,
            "Div" => Bin::Div,
            "Pow" => Bin::Pow,
            "Max" => Bin::Max,
            "Min" => Bin::Min,
            "Equal" => Bin::Equal,
            "Less" => Bin::Less,
            "Greater" => Bin::Greater,
            _ => return None,
        })
    }
}

/// `a op b` with numpy broadcasting.
pub fn binary(op: Bin, a: &Known, b: &Known) -> R<Known> {
    let shape = broadcast_shapes(&a.shape, &b.shape).ok_or_else(|| format!("shapes {:?} and {:?} do not broadcast", a.shape, b.shape))?;
    let (ma, mb) = (broadcast_map(&a.shape, &shape)?, broadcast_map(&b.shape, &shape)?);
    let origin = Origin::derived([&a.origin, &b.origin]);
    let compare = matches!(op, Bin::Equal | Bin::Less | Bin::Greater);
    let ints = a.dtype != DType::Float && b.dtype != DType::Float;
    let data = if ints {
        let (va, vb) = (a.ints(), b.ints());
        let mut out = Vec::with_capacity(ma.len());
        for (&i, &j) in ma.iter().zip(&mb) {
            let (x, y) = (va[i], vb[j]);
            out.push(match op {
                Bin::Add => x.wrapping_add(y),
                Bin::Sub => x.wrapping_sub(y),
                Bin::Mul => x.wrapping_mul(y),
                Bin::Div => x.checked_div(y).ok_or("integer division by zero")?,
                Bin::Pow => u32::try_from(y).ok().and_then(|e| x.checked_pow(e)).ok_or("integer power out of range")?,
                Bin::Max => x.max(y),
                Bin::Min => x.min(y),
                Bin::Equal => i64::from(x == y),
                Bin::Less => i64::from(x < y),
                Bin::Greater => i64::from(x > y),
            });
        }
        Data::I(out)
    } else {
        let (va, vb) = (a.floats(), b.floats());
        let it = ma.iter().zip(&mb).map(|(&i, &j)| (va[i], vb[j]));
        if compare {
            Data::I(
                it.map(|(x, y)| {
                    i64::from(match op {
                        Bin::Equal => x == y,
                        Bin::Less => x < y,
                        _ => x > y,
                    })
                })
                .collect(),
            )
        } else {
            Data::F(
                it.map(|(x, y)| match op {
                    Bin::Add => x + y,
                    Bin::Sub => x - y,
                    Bin::Mul => x * y,
                    Bin::Div => x / y,
                    Bin::Pow => x.powf(y),
                    Bin::Max => x.max(y),
                    _ => x.min(y),
                })
                .collect(),
            )
        }
    };
    let dtype = if compare {
        DType::Bool
    } else if ints {
        DType::Int
    } else {
        DType::Float
    };
    Ok(Known { dtype, shape, data, origin })
}

/// An element-wise float function (the evaluator applies it in f64 and rounds once).
pub fn unary(a: &Known, f: impl Fn(f64) -> f64) -> Known {
    let data = Data::F(a.floats().iter().map(|&x| f(f64::from(x)) as f32).collect());
    Known { dtype: DType::Float, shape: a.shape.clone(), data, origin: Origin::derived([&a.origin]) }
}

/// `Neg` / `Abs` that keep integers integral.
pub fn unary_keep(a: &Known, fi: impl Fn(i64) -> i64, ff: impl Fn(f32) -> f32) -> Known {
    let data = match &a.data {
        Data::I(v) => Data::I(v.iter().map(|&x| fi(x)).collect()),
        Data::F(v) => Data::F(v.iter().map(|&x| ff(x)).collect()),
    };
    Known { dtype: a.dtype, shape: a.shape.clone(), data, origin: Origin::derived([&a.origin]) }
}

/// `Transpose` by `perm` (output axis k is input axis perm[k]).
pub fn transpose(a: &Known, perm: &[usize]) -> R<Known> {
    let rank = a.shape.len();
    let mut seen = vec![false; rank];
    if perm.len() != rank || perm.iter().any(|&p| p >= rank || std::mem::replace(&mut seen[p], true)) {
        return Err(format!("perm {perm:?} is not a permutation of {rank} axes"));
    }
    let shape: Vec<usize> = perm.iter().map(|&p| a.shape[p]).collect();
    let n = checked_len(&shape)?;
    let (in_s, out_s) = (strides(&a.shape), strides(&shape));
    let map: Vec<usize> =
        (0..n).map(|lin| (0..rank).map(|k| ((lin / out_s[k]) % shape[k]) * in_s[perm[k]]).sum()).collect();
    let origin = match (&a.origin, perm) {
        (Origin::Init(i), [1, 0]) => Origin::InitT(*i),
        (Origin::InitT(i), [1, 0]) => Origin::Init(*i),
        (o, _) => Origin::derived([o]),
    };
    Ok(Known { dtype: a.dtype, shape, data: pick(&a.data, &map), origin })
}

/// A negative axis counted from the end, checked against `rank`.
pub fn norm_axis(axis: i64, rank: usize) -> R<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if (0..r).contains(&a) {
        Ok(a as usize)
    } else {
        Err(format!("axis {axis} is out of range for rank {rank}"))
    }
}

/// `Gather` along `axis` with integer `indices` (negative ones count from the end).
pub fn gather(a: &Known, indices: &Known, axis: i64) -> R<Known> {
    let axis = norm_axis(axis, a.shape.len())?;
    let extent = a.shape[axis];
    let idx: Vec<usize> = indices
        .ints()
        .iter()
        .map(|&i| {
            let j = if i < 0 { i + extent as i64 } else { i };
            usize::try_from(j).ok().filter(|&j| j < extent).ok_or_else(|| format!("index {i} out of range for extent {extent}"))
        })
        .collect::<R<_>>()?;
    let outer: usize = a.shape[..axis].iter().product();
    let inner: usize = a.shape[axis + 1..].iter().product();
    let shape: Vec<usize> = a.shape[..axis].iter().chain(&indices.shape).chain(&a.shape[axis + 1..]).copied().collect();
    checked_len(&shape)?;
    let mut map = Vec::with_capacity(outer * idx.len() * inner);
    for o in 0..outer {
        for &j in &idx {
            map.extend((0..inner).map(|i| (o * extent + j) * inner + i));
        }
    }
    Ok(Known { dtype: a.dtype, shape, data: pick(&a.data, &map), origin: Origin::derived([&a.origin]) })
}

/// `Slice` (opset 10+ semantics: clamped starts/ends, negative steps).
pub fn slice(a: &Known, starts: &[i64], ends: &[i64], axes: Option<&[i64]>, steps: Option<&[i64]>) -> R<Known> {
    let rank = a.shape.len();
    if starts.len() != ends.len() {
        return Err("starts and ends differ in length".into());
    }
    let axes: Vec<usize> = match axes {
        Some(ax) if ax.len() == starts.len() => ax.iter().map(|&x| norm_axis(x, rank)).collect::<R<_>>()?,
        Some(_) => return Err("axes and starts differ in length".into()),
        None => (0..starts.len()).collect(),
    };
    if axes.iter().any(|&x| x >= rank) {
        return Err(format!("slice axes {axes:?} out of range for rank {rank}"));
    }
    let steps: Vec<i64> = match steps {
        Some(s) if s.len() == starts.len() => s.to_vec(),
        Some(_) => return Err("steps and starts differ in length".into()),
        None => vec![1; starts.len()],
    };
    // Per axis: the selected input coordinates.
    let mut picks: Vec<Vec<usize>> = a.shape.iter().map(|&d| (0..d).collect()).collect();
    for (k, &axis) in axes.iter().enumerate() {
        let d = a.shape[axis] as i64;
        let step = steps[k];
        if step == 0 {
            return Err("slice step 0".into());
        }
        let fix = |v: i64| if v < 0 { v.saturating_add(d) } else { v };
        let (s, e) = (fix(starts[k]), fix(ends[k]));
        let mut sel = Vec::new();
        if step > 0 {
            let (mut i, e) = (s.clamp(0, d), e.clamp(0, d));
            while i < e {
                sel.push(i as usize);
                i = i.saturating_add(step);
            }
        } else if d > 0 {
            // ONNX clamps starts to [0, d−1] and ends to [−1, d−1] for negative steps.
            let (mut i, e) = (s.clamp(0, d - 1), e.clamp(-1, d - 1));
            while i > e {
                sel.push(i as usize);
                i = i.saturating_add(step);
            }
        }
        picks[axis] = sel;
    }
    let shape: Vec<usize> = picks.iter().map(Vec::len).collect();
    let n = checked_len(&shape)?;
    let (in_s, out_s) = (strides(&a.shape), strides(&shape));
    let map: Vec<usize> = (0..n).map(|lin| (0..rank).map(|k| picks[k][(lin / out_s[k]) % shape[k]] * in_s[k]).sum()).collect();
    Ok(Known { dtype: a.dtype, shape, data: pick(&a.data, &map), origin: Origin::derived([&a.origin]) })
}

/// `Concat` along `axis`.
pub fn concat(parts: &[&Known], axis: i64) -> R<Known> {
    let first = parts.first().ok_or("Concat of nothing")?;
    let rank = first.shape.len();
    let axis = norm_axis(axis, rank)?;
    let mut shape = first.shape.clone();
    shape[axis] = 0;
    for p in parts {
        if p.shape.len() != rank || p.shape.iter().zip(&first.shape).enumerate().any(|(k, (x, y))| k != axis && x != y) {
            return Err(format!("parts {:?} and {:?} differ off axis {axis}", first.shape, p.shape));
        }
        shape[axis] += p.shape[axis];
    }
    checked_len(&shape)?;
    let outer: usize = shape[..axis].iter().product();
    let float = parts.iter().any(|p| p.dtype == DType::Float);
    let origin = Origin::derived(parts.iter().map(|p| &p.origin));
    macro_rules! cat {
        ($get:ident) => {{
            let vals: Vec<_> = parts.iter().map(|p| p.$get()).collect();
            let mut out = Vec::new();
            for o in 0..outer {
                for (p, v) in parts.iter().zip(&vals) {
                    let chunk = p.shape[axis..].iter().product::<usize>();
                    out.extend_from_slice(&v[o * chunk..(o + 1) * chunk]);
                }
            }
            out
        }};
    }
    let (dtype, data) = if float { (DType::Float, Data::F(cat!(floats))) } else { (first.dtype, Data::I(cat!(ints))) };
    Ok(Known { dtype, shape, data, origin })
}

/// `Expand`: broadcast `a` to `shape` (ONNX: the result is the broadcast of both shapes).
pub fn expand(a: &Known, shape: &[usize]) -> R<Known> {
    let out = broadcast_shapes(&a.shape, shape).ok_or_else(|| format!("cannot expand {:?} to {shape:?}", a.shape))?;
    let map = broadcast_map(&a.shape, &out)?;
    Ok(Known { dtype: a.dtype, shape: out, data: pick(&a.data, &map), origin: Origin::derived([&a.origin]) })
}

/// `Where(cond, a, b)` with broadcasting.
pub fn where_(c: &Known, a: &Known, b: &Known) -> R<Known> {
    let ab = broadcast_shapes(&a.shape, &b.shape).ok_or("operands do not broadcast")?;
    let shape = broadcast_shapes(&c.shape, &ab).ok_or("condition does not broadcast")?;
    let (mc, ma, mb) = (broadcast_map(&c.shape, &shape)?, broadcast_map(&a.shape, &shape)?, broadcast_map(&b.shape, &shape)?);
    let cv = c.ints();
    let origin = Origin::derived([&c.origin, &a.origin, &b.origin]);
    let (dtype, data) = if a.dtype == DType::Float || b.dtype == DType::Float {
        let (va, vb) = (a.floats(), b.floats());
        (DType::Float, Data::F((0..ma.len()).map(|k| if cv[mc[k]] != 0 { va[ma[k]] } else { vb[mb[k]] }).collect()))
    } else {
        let (va, vb) = (a.ints(), b.ints());
        (a.dtype, Data::I((0..ma.len()).map(|k| if cv[mc[k]] != 0 { va[ma[k]] } else { vb[mb[k]] }).collect()))
    };
    Ok(Known { dtype, shape, data, origin })
}

/// `Range(start, limit, delta)`.
pub fn range(start: &Known, limit: &Known, delta: &Known) -> R<Known> {
    let scalar = |k: &Known| k.scalar().ok_or_else(|| format!("Range needs scalars, got shape {:?}", k.shape));
    let (s, l, d) = (scalar(start)?, scalar(limit)?, scalar(delta)?);
    if d == 0.0 || !(s.is_finite() && l.is_finite() && d.is_finite()) {
        return Err("Range with a zero or non-finite argument".into());
    }
    let n = ((l - s) / d).ceil().max(0.0);
    if n > MAX_FOLDED_ELEMENTS as f64 {
        return Err(format!("Range of {n} elements exceeds the import limit"));
    }
    let n = n as usize;
    let origin = Origin::derived([&start.origin, &limit.origin, &delta.origin]);
    if start.dtype == DType::Float {
        Ok(Known { dtype: DType::Float, shape: vec![n], data: Data::F((0..n).map(|i| (s + i as f64 * d) as f32).collect()), origin })
    } else {
        let (s, d) = (s as i64, d as i64);
        Ok(Known { dtype: DType::Int, shape: vec![n], data: Data::I((0..n as i64).map(|i| s + i * d).collect()), origin })
    }
}

/// `Cast` to the ONNX data type `to`.
pub fn cast(a: &Known, to: i32) -> R<Known> {
    use super::proto::data_type as dt;
    let (dtype, data) = match to {
        dt::FLOAT | dt::DOUBLE => (DType::Float, Data::F(a.floats())),
        dt::BOOL => (DType::Bool, Data::I(a.ints().iter().map(|&x| i64::from(x != 0)).collect())),
        dt::INT64 | dt::INT32 | dt::INT16 | dt::INT8 | dt::UINT8 | dt::UINT16 | dt::UINT32 | dt::UINT64 => {
            (DType::Int, Data::I(a.ints()))
        }
        other => return Err(format!("Cast to {} is not supported", dt::name(other))),
    };
    // A float-to-float cast keeps a weight a weight (the exporter may insert one).
    let origin = if dtype == DType::Float && a.dtype == DType::Float { a.origin.clone() } else { Origin::derived([&a.origin]) };
    Ok(Known { dtype, shape: a.shape.clone(), data, origin })
}

/// ONNX `Reshape`'s target: 0 copies the input extent (unless `allowzero`), one −1 is
/// inferred from the element count.
pub fn reshape_target(input: &[usize], target: &[i64], allowzero: bool) -> R<Vec<usize>> {
    let total: usize = input.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or("shape overflows")?;
    let mut out = Vec::with_capacity(target.len());
    let mut infer = None;
    for (k, &t) in target.iter().enumerate() {
        match t {
            -1 if infer.is_none() => {
                infer = Some(k);
                out.push(1);
            }
            0 if !allowzero => out.push(*input.get(k).ok_or_else(|| format!("target {target:?}: 0 at axis {k} beyond the input's rank"))?),
            t if t >= 0 => out.push(usize::try_from(t).map_err(|_| "target too large")?),
            _ => return Err(format!("invalid reshape target {target:?}")),
        }
    }
    let known: usize = out.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or("target overflows")?;
    if let Some(k) = infer {
        if known == 0 || total % known != 0 {
            return Err(format!("cannot reshape {input:?} to {target:?}"));
        }
        out[k] = total / known;
    } else if known != total {
        return Err(format!("cannot reshape {input:?} to {target:?}"));
    }
    Ok(out)
}

/// The same tensor with another shape (same element count).
pub fn with_shape(a: &Known, shape: Vec<usize>) -> Known {
    // A change of shape keeps the values, and keeps a weight's identity only if the shape
    // is the same (a reshaped weight is not the PyTorch parameter any more).
    let origin = if shape == a.shape { a.origin.clone() } else { Origin::derived([&a.origin]) };
    Known { dtype: a.dtype, shape, data: a.data.clone(), origin }
}
