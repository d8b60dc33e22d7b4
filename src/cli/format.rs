//! Formatting shared by the commands' reports: numbers, sizes, durations, tensor lists,
//! aligned tables and shell words. Pure functions of their arguments.

/// `1.2345e-03`: `decimals` decimals and a signed two-digit exponent, so that columns line
/// up (Rust's `{:e}` writes `1.2345e-3` and `1.2345e0`); `∞`, `−∞`, `NaN` otherwise.
pub fn sci_with(v: f64, decimals: usize) -> String {
    if !v.is_finite() {
        return match v {
            f64::INFINITY => "∞".into(),
            f64::NEG_INFINITY => "−∞".into(),
            _ => "NaN".into(),
        };
    }
    let text = format!("{v:.decimals$e}");
    match text.split_once('e').map(|(m, e)| (m, e.parse::<i32>())) {
        Some((mantissa, Ok(exp))) => format!("{mantissa}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs()),
        _ => text,
    }
}

/// [`sci_with`] four decimals, for tables.
pub fn sci(v: f64) -> String {
    sci_with(v, 4)
}

/// `1.23e-5` (two decimals, Rust's exponent), `0` for zero: for short inline values.
pub fn sci_short(x: f64) -> String {
    if x == 0.0 {
        "0".into()
    } else if !x.is_finite() {
        format!("{x}")
    } else {
        format!("{x:.2e}")
    }
}

/// Seconds with three decimals under 10 s, two above.
pub fn seconds(s: f64) -> String {
    if s < 10.0 {
        format!("{s:.3}")
    } else {
        format!("{s:.2}")
    }
}

/// A duration with its unit: `1.234 s`, `12.34 ms`, `5.6 µs`.
pub fn duration(t: f64) -> String {
    if t >= 1.0 {
        format!("{t:.3} s")
    } else if t >= 1e-3 {
        format!("{:.2} ms", t * 1e3)
    } else {
        format!("{:.1} µs", t * 1e6)
    }
}

/// A byte count in binary units: `512 B`, `1.5 KiB`, … `2.0 TiB`.
pub fn bytes(n: u64) -> String {
    let mut value = n as f64;
    for unit in ["B", "KiB", "MiB", "GiB"] {
        if value < 1024.0 {
            return if unit == "B" { format!("{n} B") } else { format!("{value:.1} {unit}") };
        }
        value /= 1024.0;
    }
    format!("{value:.1} TiB")
}

/// Bytes in GiB with `decimals` decimals.
pub fn gib(bytes: u128, decimals: usize) -> String {
    format!("{:.decimals$} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Bytes in MiB with one decimal.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// `fisher [512, 512]`, or the first few tensors and a count.
pub fn tensor_list(tensors: &[(String, Vec<usize>)]) -> String {
    const SHOWN: usize = 4;
    let mut text =
        tensors.iter().take(SHOWN).map(|(name, shape)| format!("{name} {shape:?}")).collect::<Vec<_>>().join(", ");
    if tensors.len() > SHOWN {
        text.push_str(&format!(", … ({} tensors)", tensors.len()));
    }
    text
}

/// Lays out rows of cells: the first column left-aligned, the others right-aligned, each
/// as wide as its widest cell, two spaces apart, indented by two.
pub fn table(rows: &[Vec<String>]) -> Vec<String> {
    let count = rows.iter().map(Vec::len).max().unwrap_or(0);
    let numeric: Vec<bool> = (0..count).map(|c| c > 0).collect();
    columns(rows, &numeric).into_iter().map(|line| format!("  {line}")).collect()
}

/// Lays out rows of cells, each column as wide as its widest cell, two spaces apart:
/// right-aligned where `numeric[c]` is set, else left-aligned; trailing spaces trimmed.
pub fn columns(rows: &[Vec<String>], numeric: &[bool]) -> Vec<String> {
    let count = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..count).map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0)).collect();
    rows.iter()
        .map(|row| {
            let cells: Vec<String> = row
                .iter()
                .enumerate()
                .map(|(c, cell)| {
                    let pad = " ".repeat(widths[c] - cell.chars().count());
                    if numeric.get(c).copied().unwrap_or(false) {
                        format!("{pad}{cell}")
                    } else {
                        format!("{cell}{pad}")
                    }
                })
                .collect();
            cells.join("  ").trim_end().to_string()
        })
        .collect()
}

/// A shell word: as is when it is plain, else in single quotes.
pub fn shell_word(text: &str) -> String {
    if !text.is_empty() && text.chars().all(|c| c.is_ascii_alphanumeric() || "-_./,=:+".contains(c)) {
        text.to_string()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_line_up() {
        assert_eq!(sci(4.2278), "4.2278e+00");
        assert_eq!(sci_with(1.5e-12, 2), "1.50e-12");
        assert_eq!(sci(f64::INFINITY), "∞");
        assert_eq!(sci_short(0.0), "0");
        assert_eq!(duration(0.0123), "12.30 ms");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 << 19), "1.5 MiB");
        assert_eq!(gib(3 << 29, 2), "1.50 GiB");
    }

    #[test]
    fn tables_align_by_characters() {
        let rows = vec![vec!["a".to_string(), "1.0".into()], vec!["‖Δ‖".into(), "10.25".into()]];
        assert_eq!(table(&rows), ["  a      1.0", "  ‖Δ‖  10.25"]);
    }

    #[test]
    fn shell_words() {
        assert_eq!(shell_word("run/X.npy"), "run/X.npy");
        assert_eq!(shell_word(r#"["tanh","relu"]"#), r#"'["tanh","relu"]'"#);
        assert_eq!(shell_word("it's"), r"'it'\''s'");
    }
}
