//! Reproducible sums: f64 values summed so that the result does not depend on their order
//! or on how they were grouped. This is what makes shards exact: the merge of n partial
//! sums equals the single run's sum bit for bit, whatever n is.
//!
//! # Method (binned summation, after Demmel & Nguyen's ReproBLAS)
//!
//! The exponent range is cut into bins of [`BIN_BITS`] = 40 bits: bin j has the grid
//! 2^L_j with L_j = 40·j − 1100 and holds values |x| < 2^(L_j + 39). A value x belongs to
//! the smallest bin j(x) that holds it. Every element keeps the [`FOLDS`] = 3 bins
//! t, t−1, t−2 below its *top* t (the largest j(x) deposited so far), as exact integer
//! counts of their grids (i64).
//!
//! Depositing x: for b = t, t−1, t−2, the count of bin b grows by c_b(x) = round(r / 2^L_b)
//! (to nearest, ties to even), and r ← r − c_b(x)·2^L_b (exact), starting from r = x; what
//! is left below bin t−2 is dropped. Two facts make the result order-independent:
//!
//! * c_b(x) depends only on x and b: for b > j(x), |x| < 2^(L_b − 1) rounds to 0 and r
//!   stays x, so the chain starts at j(x) whatever t is;
//! * when the top rises from t to t', bins below t' − 2 are dropped whole, and the kept
//!   bins hold exactly Σ c_b(x) over every x deposited.
//!
//! So after any sequence of deposits and merges the state is the same function of the
//! multiset of values: the top t = max j(x), and for each kept bin the exact integer
//! Σ_x c_b(x). Integer addition is associative, hence the bit-for-bit merge. The value is
//! read back as the correctly rounded f64 of Σ_b count_b·2^L_b ([`ExactSum::values`]).
//!
//! # Accuracy and limits
//!
//! * One deposit is kept exactly: 2^(L_j − 1) ≤ |x| < 2^(L_j + 39) for j = j(x), so the 53
//!   bits of x lie within the 120 bits of bins j, j−1, j−2, and a lone value reads back
//!   unchanged. (A run of one block therefore gets the same bits with or without it.)
//! * Each deposit loses at most 2^(L_(t−2) − 1), i.e. 2⁻⁸⁰ relative to the largest value
//!   deposited; n deposits lose at most n·2⁻⁸⁰ of it — far below f32 and f64 rounding.
//! * A count grows by less than 2³⁹ per deposit: 2²⁴ (16 million) deposits into one
//!   element are always safe, and an overflow beyond that is an error, never a wrap.
//! * NaN or ±Inf make the element NaN (sticky), whatever the order.
//!
//! Memory: 3 × i64 + 1 byte per element (25 bytes).

use rayon::prelude::*;

use crate::error::{FisherError, Result};

/// Bits per bin.
pub const BIN_BITS: i32 = 40;
/// Bins kept per element (the top and the two below it).
pub const FOLDS: usize = 3;
/// Grid exponent of bin 0 (below the smallest subnormal's 2⁻¹⁰⁷⁴).
const LOWEST_GRID: i32 = -1100;
/// The top of an element that received NaN or ±Inf.
const NONFINITE: u8 = u8::MAX;
/// Elements per parallel task.
const CHUNK: usize = 4096;

/// Grid exponent L_b of bin b.
fn grid(b: i32) -> i32 {
    BIN_BITS * b + LOWEST_GRID
}

/// |x| = m·2^e with m < 2⁵³, for finite non-zero x; and the sign.
fn decode(x: f64) -> (bool, u64, i32) {
    let bits = x.to_bits();
    let negative = bits >> 63 == 1;
    let exponent = ((bits >> 52) & 0x7ff) as i32;
    let fraction = bits & ((1u64 << 52) - 1);
    if exponent == 0 {
        (negative, fraction, -1074)
    } else {
        (negative, fraction | (1u64 << 52), exponent - 1075)
    }
}

/// The bin j(x) of a finite non-zero x = ±m·2^e: the smallest j with |x| < 2^(L_j + 39),
/// i.e. with E ≤ L_j + 38 for the leading exponent E.
fn bin_of(m: u64, e: i32) -> i32 {
    let leading = e + 63 - m.leading_zeros() as i32;
    let t = leading - LOWEST_GRID - BIN_BITS + 2;
    if t <= 0 {
        0
    } else {
        (t + BIN_BITS - 1) / BIN_BITS
    }
}

/// round(r·2^e / 2^l) to nearest, ties to even, and the remainder r − that·2^(l − e), for an
/// integer r (|r| < 2¹⁰⁰) at exponent e.
fn round_to_grid(r: i128, e: i32, l: i32) -> (i128, i128) {
    let s = l - e;
    if s <= 0 {
        // r·2^e is a multiple of the grid: all of it goes to this bin (|count| < 2³⁹, so
        // the shift cannot overflow).
        (r << (-s).min(100), 0)
    } else if s >= 120 {
        (0, r)
    } else {
        let q = r >> s; // floor
        let rem = r - (q << s);
        let half = 1i128 << (s - 1);
        let q = if rem > half || (rem == half && q & 1 == 1) { q + 1 } else { q };
        (q, r - (q << s))
    }
}

/// Moves the folds of an element from top `from` to the higher top `to`: the bins that fall
/// below the window are dropped whole.
fn raise(folds: &mut [i64; FOLDS], from: u8, to: u8) {
    let shift = (to - from) as usize;
    if shift >= FOLDS {
        *folds = [0; FOLDS];
    } else if shift > 0 {
        for k in (shift..FOLDS).rev() {
            folds[k] = folds[k - shift];
        }
        folds[..shift].fill(0);
    }
}

/// Deposits x into one element; `false` on a count overflow.
fn deposit_one(top: &mut u8, folds: &mut [i64; FOLDS], x: f64) -> bool {
    if x == 0.0 || *top == NONFINITE {
        return true;
    }
    if !x.is_finite() {
        *top = NONFINITE;
        *folds = [0; FOLDS];
        return true;
    }
    let (negative, m, e) = decode(x);
    let j = bin_of(m, e);
    debug_assert!((0..NONFINITE as i32).contains(&j));
    if j > *top as i32 {
        raise(folds, *top, j as u8);
        *top = j as u8;
    }
    let mut r = if negative { -(m as i128) } else { m as i128 };
    let t = *top as i32;
    for (k, fold) in folds.iter_mut().enumerate() {
        let b = t - k as i32;
        if b < 0 || r == 0 {
            break;
        }
        if b > j {
            continue; // c_b(x) = 0
        }
        let (c, rest) = round_to_grid(r, e, grid(b));
        r = rest;
        match fold.checked_add(c as i64) {
            Some(sum) => *fold = sum,
            None => return false,
        }
    }
    true
}

/// The correctly rounded f64 of Σ_k folds[k]·2^(L_(top−k)).
fn value_of(top: u8, folds: &[i64; FOLDS]) -> f64 {
    if top == NONFINITE {
        return f64::NAN;
    }
    let low_grid = grid(top as i32 - (FOLDS as i32 - 1));
    let w = BIN_BITS as u32;
    // V = f0·2⁸⁰ + f1·2⁴⁰ + f2 in units of the lowest grid, as H·2⁸⁰ + r with 0 ≤ r < 2⁸⁰.
    let low = (folds[1] as i128) * (1i128 << w) + folds[2] as i128;
    let q = low >> (2 * w);
    let r = low - (q << (2 * w));
    let h = folds[0] as i128 + q;
    if h.unsigned_abs() < 1 << 14 {
        // |V| < 2⁹⁵: exact in i128, rounded once.
        let v = (h << (2 * w)) + r;
        return libm::scalbn(v as f64, low_grid);
    }
    // |V| ≥ 2⁹⁴: V/2⁴⁰ = T + f with 0 ≤ f < 1 and |T| ≥ 2⁵⁴; 2T + [f > 0] lies in the same
    // open interval between f64 rounding boundaries as 2V/2⁴⁰ (whose spacing is ≥ 4 here),
    // so it rounds the same way.
    let t = (h << w) + (r >> w);
    let sticky = (r & ((1i128 << w) - 1) != 0) as i128;
    libm::scalbn((2 * t + sticky) as f64, low_grid + BIN_BITS - 1)
}

/// Merges element `b` into element `a`; `false` on a count overflow.
fn merge_one(a_top: &mut u8, a: &mut [i64; FOLDS], b_top: u8, b: &[i64; FOLDS]) -> bool {
    if *a_top == NONFINITE || b_top == NONFINITE {
        *a_top = NONFINITE;
        *a = [0; FOLDS];
        return true;
    }
    let top = (*a_top).max(b_top);
    raise(a, *a_top, top);
    *a_top = top;
    let mut b = *b;
    raise(&mut b, b_top, top);
    for (x, y) in a.iter_mut().zip(b) {
        match x.checked_add(y) {
            Some(sum) => *x = sum,
            None => return false,
        }
    }
    true
}

/// A vector of reproducible sums (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExactSum {
    tops: Vec<u8>,
    folds: Vec<[i64; FOLDS]>,
}

fn overflow() -> FisherError {
    FisherError::InvalidInput(
        "an exact sum overflowed its 63-bit counts (more than 16 million deposits of the largest value into one element)"
            .into(),
    )
}

impl ExactSum {
    /// `len` sums of nothing (zero).
    pub fn new(len: usize) -> Self {
        ExactSum { tops: vec![0; len], folds: vec![[0; FOLDS]; len] }
    }

    /// Rebuilds a sum from its parts ([`ExactSum::tops`], [`ExactSum::folds`]), as read
    /// from a partial file; refuses parts of different lengths or a top beyond the f64
    /// range.
    pub fn from_parts(tops: Vec<u8>, folds: Vec<[i64; FOLDS]>) -> Result<Self> {
        if tops.len() != folds.len() {
            return Err(FisherError::InvalidInput(format!(
                "an exact sum has {} tops but {} folds",
                tops.len(),
                folds.len()
            )));
        }
        let highest = bin_of(1 << 52, 971); // the bin of f64::MAX
        if let Some(at) = tops.iter().position(|&t| t != NONFINITE && t as i32 > highest) {
            return Err(FisherError::InvalidInput(format!("an exact sum has an invalid top {} at element {at}", tops[at])));
        }
        Ok(ExactSum { tops, folds })
    }

    /// The number of sums.
    pub fn len(&self) -> usize {
        self.tops.len()
    }

    /// Whether there are no sums.
    pub fn is_empty(&self) -> bool {
        self.tops.is_empty()
    }

    /// The top bin of every element (255: NaN or ±Inf was deposited).
    pub fn tops(&self) -> &[u8] {
        &self.tops
    }

    /// The bin counts of every element, top bin first.
    pub fn folds(&self) -> &[[i64; FOLDS]] {
        &self.folds
    }

    /// Adds `values[i]` to sum `offset + i`.
    pub fn deposit(&mut self, offset: usize, values: &[f64]) -> Result<()> {
        let end = offset.checked_add(values.len()).filter(|&e| e <= self.len()).ok_or_else(|| {
            FisherError::InvalidInput(format!("{} values at {offset} do not fit {} sums", values.len(), self.len()))
        })?;
        let ok = self.tops[offset..end]
            .par_chunks_mut(CHUNK)
            .zip(self.folds[offset..end].par_chunks_mut(CHUNK))
            .zip(values.par_chunks(CHUNK))
            .all(|((tops, folds), xs)| {
                tops.iter_mut().zip(folds.iter_mut()).zip(xs).all(|((t, f), &x)| deposit_one(t, f, x))
            });
        if ok {
            Ok(())
        } else {
            Err(overflow())
        }
    }

    /// Adds every sum of `other` (the same length) to this one.
    pub fn merge(&mut self, other: &ExactSum) -> Result<()> {
        if other.len() != self.len() {
            return Err(FisherError::InvalidInput(format!(
                "cannot merge an exact sum of {} values into one of {}",
                other.len(),
                self.len()
            )));
        }
        let ok = self
            .tops
            .par_chunks_mut(CHUNK)
            .zip(self.folds.par_chunks_mut(CHUNK))
            .zip(other.tops.par_chunks(CHUNK).zip(other.folds.par_chunks(CHUNK)))
            .all(|((tops, folds), (btops, bfolds))| {
                tops.iter_mut()
                    .zip(folds.iter_mut())
                    .zip(btops.iter().zip(bfolds))
                    .all(|((t, f), (&bt, bf))| merge_one(t, f, bt, bf))
            });
        if ok {
            Ok(())
        } else {
            Err(overflow())
        }
    }

    /// Every sum, correctly rounded to f64 (NaN where NaN or ±Inf was deposited).
    pub fn values(&self) -> Vec<f64> {
        let mut out = vec![0.0; self.len()];
        out.par_chunks_mut(CHUNK)
            .zip(self.tops.par_chunks(CHUNK).zip(self.folds.par_chunks(CHUNK)))
            .for_each(|(out, (tops, folds))| {
                for ((o, &t), f) in out.iter_mut().zip(tops).zip(folds) {
                    *o = value_of(t, f);
                }
            });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seeded values of every magnitude.
    struct Rng(crate::synthetic::SplitMix64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0.next_u64()
        }
        /// Signed values with exponents spread over ±`spread` binades.
        fn value(&mut self, spread: i32) -> f64 {
            let mantissa = (self.next() >> 11) as f64 / (1u64 << 53) as f64 + 0.5;
            let exponent = (self.next() % (2 * spread as u64 + 1)) as i32 - spread;
            let sign = if self.next() & 1 == 1 { -1.0 } else { 1.0 };
            sign * libm::scalbn(mantissa, exponent)
        }
    }

    /// The exact sum of f64 values, rounded once: values are scaled to integers at 2⁻⁹⁰
    /// (asserted), so the i128 sum is exact while every |x| < 2³⁰.
    fn exact_reference(values: &[f64]) -> f64 {
        let total: i128 = values
            .iter()
            .map(|&x| {
                let scaled = libm::scalbn(x, 90);
                assert!(scaled.fract() == 0.0 && scaled.abs() < 2f64.powi(120), "test value off the reference's grid");
                scaled as i128
            })
            .sum();
        libm::scalbn(total as f64, -90)
    }

    fn sum_of(values: &[f64]) -> f64 {
        let mut s = ExactSum::new(1);
        for &x in values {
            s.deposit(0, &[x]).unwrap();
        }
        s.values()[0]
    }

    #[test]
    fn a_single_value_reads_back_unchanged() {
        let mut rng = Rng(crate::synthetic::SplitMix64::new(1));
        let mut values: Vec<f64> = (0..2000).map(|_| rng.value(1000)).collect();
        values.extend([f64::MIN_POSITIVE, 5e-324, -5e-324, f64::MAX, -f64::MAX, 1.0, -0.0, 3.0e-310]);
        let mut s = ExactSum::new(values.len());
        s.deposit(0, &values).unwrap();
        for (got, want) in s.values().iter().zip(&values) {
            assert_eq!(got.to_bits(), (want + 0.0).to_bits(), "{want:e}");
        }
    }

    #[test]
    fn order_and_grouping_do_not_change_a_bit() {
        let mut rng = Rng(crate::synthetic::SplitMix64::new(7));
        for case in 0..50 {
            let spread = [4, 30, 60, 200][case % 4];
            let n = 1 + (rng.next() % 300) as usize;
            let values: Vec<f64> = (0..n).map(|_| rng.value(spread)).collect();
            let forward = sum_of(&values);
            let mut reversed = values.clone();
            reversed.reverse();
            assert_eq!(forward.to_bits(), sum_of(&reversed).to_bits());
            // Any split into parts, merged in any order.
            let cut1 = (rng.next() % (n as u64 + 1)) as usize;
            let cut2 = cut1 + (rng.next() % ((n - cut1) as u64 + 1)) as usize;
            let part = |xs: &[f64]| {
                let mut s = ExactSum::new(1);
                for &x in xs {
                    s.deposit(0, &[x]).unwrap();
                }
                s
            };
            let (a, b, c) = (part(&values[..cut1]), part(&values[cut1..cut2]), part(&values[cut2..]));
            let mut m1 = c.clone();
            m1.merge(&a).unwrap();
            m1.merge(&b).unwrap();
            let mut m2 = a.clone();
            m2.merge(&b).unwrap();
            m2.merge(&c).unwrap();
            assert_eq!(m1, m2, "the state, not only the value, is order-independent");
            assert_eq!(m1.values()[0].to_bits(), forward.to_bits());
        }
    }

    #[test]
    fn the_sum_is_correctly_rounded_when_nothing_falls_below_the_bins() {
        let mut rng = Rng(crate::synthetic::SplitMix64::new(3));
        for _ in 0..200 {
            // Within 40 binades of each other: every bit stays inside the three bins.
            let values: Vec<f64> = (0..100).map(|_| rng.value(20)).collect();
            assert_eq!(sum_of(&values).to_bits(), exact_reference(&values).to_bits());
        }
        // Cancellation: the exact answer, where a naive f64 sum returns 0.
        assert_eq!(sum_of(&[1e16, 1.0, -1e16]), 1.0);
        assert_eq!(sum_of(&[1.0, 1e100, 1.0, -1e100]), 0.0, "values 2⁻³³² below the top are dropped");
    }

    #[test]
    fn large_counts_read_back_rounded_once() {
        // 2¹⁶ deposits of nearly the largest value of bin 28 (< 2⁵⁹) push its count past
        // 2⁵³; the small values only move the bits far below the f64 rounding point.
        let x = libm::scalbn(1.0, 59) - 64.0;
        assert_eq!(bin_of(decode(x).1, decode(x).2), 28);
        let n = 1 << 16;
        let mut s = ExactSum::new(1);
        for _ in 0..n {
            s.deposit(0, &[x]).unwrap();
            s.deposit(0, &[1e-9]).unwrap();
        }
        assert!(s.folds()[0][0] > 1 << 53);
        assert_eq!(s.values()[0], x * n as f64);
    }

    #[test]
    fn non_finite_values_are_sticky_in_any_order() {
        let mut a = ExactSum::new(2);
        a.deposit(0, &[1.0, f64::INFINITY]).unwrap();
        a.deposit(0, &[f64::NAN, 2.0]).unwrap();
        let v = a.values();
        assert!(v[0].is_nan() && v[1].is_nan());
        let mut b = ExactSum::new(2);
        b.deposit(0, &[3.0, 4.0]).unwrap();
        b.merge(&a).unwrap();
        assert!(b.values().iter().all(|x| x.is_nan()));
    }

    #[test]
    fn overflow_is_an_error_and_bad_parts_are_refused() {
        let mut s = ExactSum::from_parts(vec![30], vec![[i64::MAX - 5, 0, 0]]).unwrap();
        let x = libm::scalbn(1.0, grid(30) + 30);
        assert!(s.deposit(0, &[x]).is_err());
        assert!(ExactSum::from_parts(vec![1, 2], vec![[0; 3]]).is_err());
        assert!(ExactSum::from_parts(vec![200], vec![[0; 3]]).is_err());
        assert!(ExactSum::new(2).deposit(1, &[1.0, 2.0]).is_err());
        assert!(ExactSum::new(2).merge(&ExactSum::new(3)).is_err());
    }
}
