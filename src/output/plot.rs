//! Plots of the geometry: an eigenvalue spectrum (with, optionally, its density) and the
//! action along training. PNG when the path ends in `.png`, SVG when it ends in `.svg`.
//!
//! * [`spectrum_plot`]: the eigenvalues sorted in descending order against their rank
//!   (1, 2, …) on a log y-axis; given a [`Histogram`] of eigenvalue mass over log-spaced
//!   bins, a second panel shows it with log λ across and log mass up.
//! * [`action_plot`]: the per-step action Δθ_tᵀ F(θ_t) Δθ_t on a log y-axis, and the
//!   cumulative Fisher–Rao length L(t) with the chord length as a horizontal reference line
//!   (see [`crate::analysis::action`] for the definitions).
//!
//! ## What is not drawn
//! A log axis cannot show zero, negative or non-finite values: such values are skipped, and
//! the panel says how many were (a Fisher's numerically zero eigenvalues, a step that did
//! not move). On the density panel, bins whose mass is below 10⁻⁶ of the largest bin's are
//! also left out, so that the tails of a smoothed density do not stretch the axis over
//! dozens of decades. A panel with nothing to show says so instead of failing.
//!
//! ## Files
//! Writes are atomic: the image is rendered to a temporary file in the destination
//! directory and renamed onto `path`, so `path` holds either the complete new image or what
//! it held before. A missing directory or an unknown extension is an error before anything
//! is drawn ([`check_plot_path`] does the same checks for callers that want to fail before
//! a long computation).
//!
//! Text is drawn with DejaVu Sans, embedded in the binary (see `assets/fonts/`), so plots
//! look the same on every machine and no system font library is needed. SVG files name the
//! font family `sans-serif` and leave the glyphs to the viewer.
//!
//! ```no_run
//! use fisher_engine::output::plot::{spectrum_plot, Histogram};
//! let eigenvalues = [3.0, 1.0, 0.2, 0.01, 0.0];
//! let density = Histogram { edges: vec![1e-3, 1e-2, 1e-1, 1.0, 10.0], mass: vec![0.0, 1.0, 1.0, 2.0] };
//! spectrum_plot("spectrum.png".as_ref(), &eigenvalues, Some(&density), "Fisher spectrum")?;
//! # Ok::<(), fisher_engine::FisherError>(())
//! ```

use std::path::Path;

use crate::io::output::Target;
use std::sync::Once;

use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::analysis::action::ActionReport;
use crate::error::{FisherError, Result};

/// A histogram of eigenvalue mass: `mass[b]` over [`edges[b]`, `edges[b + 1]`). Edges are
/// increasing and, for the plot's log axis, positive (bins with a non-positive edge are
/// skipped). Mass is a count of eigenvalues (fractional for stochastic estimates).
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    /// `bins + 1` increasing bin edges.
    pub edges: Vec<f64>,
    /// Mass per bin (`bins` values).
    pub mass: Vec<f64>,
}

/// The image formats, chosen by the file's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlotFormat {
    /// `.png`: a raster image.
    Png,
    /// `.svg`: a vector image.
    Svg,
}

/// The format `path`'s extension (case-insensitive) asks for.
pub fn plot_format(path: &Path) -> Result<PlotFormat> {
    let extension = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    match extension.as_deref() {
        Some("png") => Ok(PlotFormat::Png),
        Some("svg") => Ok(PlotFormat::Svg),
        _ => Err(FisherError::InvalidInput(format!(
            "{}: a plot must end in .png or .svg (the extension chooses the format)",
            path.display()
        ))),
    }
}

/// Checks, before anything is computed, that a plot can be written to `path`: a `.png` or
/// `.svg` extension and an existing directory. Returns the format.
pub fn check_plot_path(path: &Path) -> Result<PlotFormat> {
    let format = plot_format(path)?;
    crate::io::check_output_path(path)?;
    Ok(format)
}

/// [`check_plot_path`] with the whole output policy ([`crate::io::output::Target::check`]):
/// not one of the command's `inputs` (by file identity), and an existing file replaced only
/// with `force`.
pub fn check_plot_output(path: &Path, force: bool, inputs: &[crate::io::output::Input<'_>]) -> Result<PlotFormat> {
    let format = plot_format(path)?;
    Target::check(path, "--plot", force, inputs)?;
    Ok(format)
}

// ---------------------------------------------------------------------------------------
// Style

/// Pixel size of a one-panel figure (the SVG's nominal size too).
const ONE_PANEL: (u32, u32) = (1100, 650);
/// Pixel size of a two-panel figure.
const TWO_PANELS: (u32, u32) = (1100, 1100);
/// Font sizes in pixels: figure title, panel caption, axis description, tick labels.
const TITLE_PX: f64 = 26.0;
const CAPTION_PX: f64 = 22.0;
const AXIS_PX: f64 = 20.0;
const TICK_PX: f64 = 16.0;
/// Matplotlib's first colours ("tab:blue", "tab:orange", "tab:green"), familiar from papers.
const BLUE: RGBColor = RGBColor(31, 119, 180);
const ORANGE: RGBColor = RGBColor(255, 127, 14);
const GREEN: RGBColor = RGBColor(44, 160, 44);
const GREY: RGBColor = RGBColor(110, 110, 110);
/// Mass below this share of the largest bin is not drawn (see the module docs).
const DENSITY_FLOOR: f64 = 1e-6;

/// The embedded font (DejaVu Sans 2.37, Bitstream Vera license: assets/fonts/).
static DEJAVU_SANS: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

/// Registers the embedded font as `sans-serif`, plotters' default family, once per process.
fn register_font() {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        // A failure here would be a corrupt embedded file: a bug caught by the unit tests.
        if plotters::style::register_font("sans-serif", FontStyle::Normal, DEJAVU_SANS).is_err() {
            log::error!("the embedded DejaVu Sans font could not be parsed; plots will have no text");
        }
    });
}

fn font(px: f64) -> TextStyle<'static> {
    ("sans-serif", px).into_font().into()
}

// ---------------------------------------------------------------------------------------
// Rendering

/// Something drawn on a drawing area, whatever the backend.
trait Figure {
    /// Pixel size.
    fn size(&self) -> (u32, u32);
    /// Draws on `root` (already filled white).
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> std::result::Result<(), String>;
}

/// Turns a plotters error into the message of a [`FisherError`].
fn drawing<T, E: std::fmt::Display>(result: std::result::Result<T, E>) -> std::result::Result<T, String> {
    result.map_err(|e| e.to_string())
}

/// Renders `figure` to `path` under the output policy ([`crate::io::output`]): drawn into a
/// temporary file (the bitmap backend writes files), which is renamed onto a regular file's
/// resolved path (its permissions kept) or copied through to a device or FIFO.
fn render(path: &Path, figure: &impl Figure) -> Result<()> {
    let format = check_plot_path(path)?;
    register_font();
    let fail = |message: String| FisherError::Io { path: path.display().to_string(), message };
    let target = Target::check(path, "--plot", true, &[])?;
    // The bitmap backend picks the encoder from the file name, so the temporary file keeps
    // the extension.
    let suffix = match format {
        PlotFormat::Png => ".png",
        PlotFormat::Svg => ".svg",
    };
    let dir = match &target {
        Target::File { path, .. } => crate::io::output_dir(path).to_path_buf(),
        Target::Stream { .. } => std::env::temp_dir(),
    };
    let temp = crate::io::output_temp_file(&dir, suffix).map_err(|e| fail(format!("cannot write: {e}")))?;
    match format {
        PlotFormat::Png => {
            let root = BitMapBackend::new(temp.path(), figure.size()).into_drawing_area();
            drawing(root.fill(&WHITE)).map_err(&fail)?;
            figure.draw(&root).map_err(|e| fail(format!("cannot draw the plot: {e}")))?;
            drawing(root.present()).map_err(|e| fail(format!("cannot write: {e}")))?;
        }
        PlotFormat::Svg => {
            let mut svg = String::new();
            {
                let root = SVGBackend::with_string(&mut svg, figure.size()).into_drawing_area();
                drawing(root.fill(&WHITE)).map_err(&fail)?;
                figure.draw(&root).map_err(|e| fail(format!("cannot draw the plot: {e}")))?;
                drawing(root.present()).map_err(&fail)?;
            }
            std::fs::write(temp.path(), svg).map_err(|e| fail(format!("cannot write: {e}")))?;
        }
    }
    match &target {
        Target::File { path: resolved, .. } => {
            temp.as_file().sync_all().map_err(|e| fail(format!("cannot write: {e}")))?;
            #[cfg(unix)]
            if let Target::File { mode: Some(mode), .. } = &target {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(temp.path(), std::fs::Permissions::from_mode(*mode))
                    .map_err(|e| fail(format!("cannot write: {e}")))?;
            }
            crate::io::output::persist(temp, resolved).map_err(|e| fail(format!("cannot write: {e}")))
        }
        Target::Stream { .. } => {
            let bytes = std::fs::read(temp.path()).map_err(|e| fail(format!("cannot write: {e}")))?;
            target.write(suffix, |w| w.write_all(&bytes))
        }
    }
}

/// The decade-aligned range [10^⌊log₁₀ lo⌋, 10^⌈log₁₀ hi⌉] that holds `lo..hi` (positive),
/// so that a log axis always has labelled powers of ten at both ends. (Draw on
/// [`widened`] of it: plotters computes the first tick as 10^⌈log₁₀ start⌉, which rounding
/// can push one decade past an exact power of ten.)
fn decades(lo: f64, hi: f64) -> (f64, f64) {
    let mut a = lo.log10().floor() as i32;
    let mut b = hi.log10().ceil() as i32;
    if b <= a {
        a -= 1;
        b += 1;
    }
    (10f64.powi(a), 10f64.powi(b))
}

/// A log range a hair wider than `(lo, hi)`, so that ticks at its ends survive rounding.
fn widened((lo, hi): (f64, f64)) -> std::ops::Range<f64> {
    lo * (1.0 - 1e-9)..hi * (1.0 + 1e-9)
}

/// `lo..hi` widened by 5% of its span on each side (a unit span around a single value).
fn padded(lo: f64, hi: f64) -> (f64, f64) {
    let span = hi - lo;
    if span > 0.0 {
        (lo - 0.05 * span, hi + 0.05 * span)
    } else {
        let w = if lo == 0.0 { 1.0 } else { 0.1 * lo.abs() };
        (lo - w, hi + w)
    }
}

const SUPERSCRIPTS: [char; 10] = ['⁰', '¹', '²', '³', '⁴', '⁵', '⁶', '⁷', '⁸', '⁹'];

/// A log-axis tick label: `10ⁿ` at powers of ten, nothing in between (the minor ticks).
fn log_tick(v: &f64) -> String {
    if v.is_nan() || *v <= 0.0 {
        return String::new();
    }
    let exponent = v.log10().round();
    if (v / 10f64.powf(exponent) - 1.0).abs() > 1e-6 {
        return String::new();
    }
    let e = exponent as i64;
    match e {
        0 => "1".into(),
        1 => "10".into(),
        _ => {
            let digits: String = e.unsigned_abs().to_string().chars().map(|c| SUPERSCRIPTS[c as usize - '0' as usize]).collect();
            format!("10{}{digits}", if e < 0 { "⁻" } else { "" })
        }
    }
}

/// A linear-axis tick label with as few digits as the value needs.
fn linear_tick(v: &f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-3..1e5).contains(&a) {
        format!("{v:.1e}")
    } else {
        let text = format!("{v:.4}");
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// Short scientific notation for captions.
fn number(v: f64) -> String {
    if v.is_finite() && v != 0.0 && (1e-2..1e4).contains(&v.abs()) {
        format!("{v:.4}")
    } else {
        format!("{v:.3e}")
    }
}

/// What a panel's axes say: descriptions, tick labels, and how many x labels (plotters'
/// default is 11).
struct Axes<'a> {
    x: &'a str,
    y: &'a str,
    x_ticks: &'a dyn Fn(&f64) -> String,
    y_ticks: &'a dyn Fn(&f64) -> String,
    x_labels: usize,
}

/// Whole-number tick labels on a rank, step or checkpoint axis (none between them or below
/// zero).
fn index_tick(v: &f64) -> String {
    if v.fract() == 0.0 && *v >= 0.0 {
        format!("{v:.0}")
    } else {
        String::new()
    }
}

/// A panel's chart in the house style, so that every panel of every figure looks alike:
/// `caption` above, margins and label areas, a light grid, and `axes`' descriptions and tick
/// labels.
fn styled_chart<'a, DB, X, Y>(
    area: &'a DrawingArea<DB, Shift>,
    caption: String,
    x: X,
    y: Y,
    axes: &Axes<'_>,
) -> std::result::Result<ChartContext<'a, DB, Cartesian2d<X::CoordDescType, Y::CoordDescType>>, String>
where
    DB: DrawingBackend,
    X: AsRangedCoord<Value = f64>,
    Y: AsRangedCoord<Value = f64>,
    X::CoordDescType: ValueFormatter<f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let mut chart = drawing(
        ChartBuilder::on(area)
            .caption(caption, font(CAPTION_PX))
            .margin(16)
            .x_label_area_size(56)
            .y_label_area_size(84)
            .build_cartesian_2d(x, y),
    )?;
    drawing(
        chart
            .configure_mesh()
            .x_desc(axes.x)
            .y_desc(axes.y)
            .axis_desc_style(font(AXIS_PX))
            .label_style(font(TICK_PX))
            .x_labels(axes.x_labels)
            .x_label_formatter(axes.x_ticks)
            .y_label_formatter(axes.y_ticks)
            .light_line_style(RGBColor(235, 235, 235))
            .bold_line_style(RGBColor(205, 205, 205))
            .draw(),
    )?;
    Ok(chart)
}

/// A panel with nothing to show on a log axis: its caption and a centred note.
fn empty_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    caption: &str,
    note: &str,
) -> std::result::Result<(), String> {
    let (w, h) = area.dim_in_pixel();
    drawing(area.draw(&Text::new(caption.to_string(), (60, 20), font(CAPTION_PX))))?;
    let style = font(AXIS_PX).color(&GREY).pos(plotters::style::text_anchor::Pos::new(
        plotters::style::text_anchor::HPos::Center,
        plotters::style::text_anchor::VPos::Center,
    ));
    drawing(area.draw(&Text::new(note.to_string(), (w as i32 / 2, h as i32 / 2), style)))?;
    Ok(())
}

/// "n values not shown" for a caption, or nothing.
fn skipped_note(skipped: usize, what: &str) -> String {
    match skipped {
        0 => String::new(),
        1 => format!(" · 1 {what} not shown"),
        n => format!(" · {n} {what}s not shown"),
    }
}

// ---------------------------------------------------------------------------------------
// The spectrum

struct SpectrumFigure<'a> {
    /// All finite eigenvalues, descending.
    sorted: Vec<f64>,
    /// How many were not finite.
    non_finite: usize,
    density: Option<&'a Histogram>,
    title: &'a str,
}

impl Figure for SpectrumFigure<'_> {
    fn size(&self) -> (u32, u32) {
        if self.density.is_some() {
            TWO_PANELS
        } else {
            ONE_PANEL
        }
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> std::result::Result<(), String> {
        let body = drawing(root.titled(self.title, font(TITLE_PX)))?;
        match self.density {
            None => self.draw_eigenvalues(&body),
            Some(density) => {
                let (top, bottom) = body.split_vertically(body.dim_in_pixel().1 / 2);
                self.draw_eigenvalues(&top)?;
                draw_density(&bottom, density)
            }
        }
    }
}

impl SpectrumFigure<'_> {
    fn draw_eigenvalues<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> std::result::Result<(), String> {
        // Rank i (1-based) among all finite eigenvalues, so that a skipped value keeps the
        // ranks of the others honest.
        let points: Vec<(f64, f64)> = self
            .sorted
            .iter()
            .enumerate()
            .filter(|(_, &v)| v > 0.0)
            .map(|(i, &v)| ((i + 1) as f64, v))
            .collect();
        let skipped = self.sorted.len() - points.len() + self.non_finite;
        let total = self.sorted.len() + self.non_finite;
        let caption = format!(
            "eigenvalues, largest first ({total} value{}{})",
            if total == 1 { "" } else { "s" },
            skipped_note(skipped, "zero, negative or non-finite value")
        );
        if points.is_empty() {
            return empty_panel(area, &caption, "no positive finite eigenvalue to show on a log axis");
        }
        let lo = points.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        let hi = points.iter().map(|p| p.1).fold(0.0, f64::max);
        let (y0, y1) = decades(lo, hi);
        let last = points.last().map_or(1.0, |p| p.0);
        let axes = Axes {
            x: "rank i (eigenvalues sorted in descending order)",
            y: "eigenvalue λᵢ",
            x_ticks: &index_tick,
            y_ticks: &log_tick,
            x_labels: 12,
        };
        let x = 0.5..(last + 0.5).max(1.5);
        let mut chart = styled_chart(area, caption, x, widened((y0, y1)).log_scale(), &axes)?;
        drawing(chart.draw_series(LineSeries::new(points.iter().copied(), BLUE.stroke_width(2))))?;
        if points.len() <= 200 {
            drawing(chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, BLUE.filled()))))?;
        }
        Ok(())
    }
}

fn draw_density<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, density: &Histogram) -> std::result::Result<(), String> {
    let bins = density.mass.len().min(density.edges.len().saturating_sub(1));
    let top = (0..bins)
        .map(|b| density.mass[b])
        .filter(|m| m.is_finite())
        .fold(0.0, f64::max);
    let bars: Vec<(f64, f64, f64)> = (0..bins)
        .map(|b| (density.edges[b], density.edges[b + 1], density.mass[b]))
        .filter(|&(a, b, m)| a > 0.0 && b > a && b.is_finite() && m.is_finite() && m > 0.0 && m >= top * DENSITY_FLOOR)
        .collect();
    let nonzero_bins = (0..bins).filter(|&b| density.mass[b] != 0.0).count();
    let caption = format!(
        "spectral density: eigenvalue mass per log-spaced bin ({bins} bins{})",
        skipped_note(nonzero_bins.saturating_sub(bars.len()), "non-empty bin")
    );
    if bars.is_empty() {
        return empty_panel(area, &caption, "no positive bin to show on log axes");
    }
    let x_lo = bars.iter().map(|b| b.0).fold(f64::INFINITY, f64::min);
    let x_hi = bars.iter().map(|b| b.1).fold(0.0, f64::max);
    let m_lo = bars.iter().map(|b| b.2).fold(f64::INFINITY, f64::min);
    let (x0, x1) = decades(x_lo, x_hi);
    // Half the smallest bar, so that a bar of exactly 10ᵏ (a single eigenvalue: 1) still
    // rises above the axis.
    let (y0, y1) = decades(0.5 * m_lo, top);
    let axes = Axes { x: "eigenvalue λ", y: "eigenvalues per bin", x_ticks: &log_tick, y_ticks: &log_tick, x_labels: 11 };
    let x = widened((x0, x1)).log_scale();
    let mut chart = styled_chart(area, caption, x, widened((y0, y1)).log_scale(), &axes)?;
    drawing(chart.draw_series(bars.iter().map(|&(a, b, m)| {
        Rectangle::new([(a, y0), (b, m)], ORANGE.mix(0.75).filled())
    })))?;
    drawing(chart.draw_series(bars.iter().map(|&(a, b, m)| Rectangle::new([(a, y0), (b, m)], ORANGE.stroke_width(1)))))?;
    Ok(())
}

/// Plots an eigenvalue spectrum: `eigenvalues` (any order; sorted here) against their rank
/// on a log y-axis, and, when `density` is given, a second panel with the histogram of
/// eigenvalue mass on log-log axes. Zero, negative and non-finite values are not drawn (the
/// caption counts them); see the [module docs](self) for formats and atomic writing.
///
/// Errors: [`FisherError::InvalidInput`] for an extension other than `.png`/`.svg` or a
/// histogram whose `edges` are not one longer than `mass`; [`FisherError::Io`] when the
/// directory does not exist or the file cannot be written.
pub fn spectrum_plot(path: &Path, eigenvalues: &[f64], density: Option<&Histogram>, title: &str) -> Result<()> {
    plot_format(path)?;
    if let Some(d) = density {
        if d.edges.len() != d.mass.len() + 1 {
            return Err(FisherError::InvalidInput(format!(
                "a histogram needs one more edge than bins, got {} edges for {} bins",
                d.edges.len(),
                d.mass.len()
            )));
        }
    }
    let mut sorted: Vec<f64> = eigenvalues.iter().copied().filter(|v| v.is_finite()).collect();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let non_finite = eigenvalues.len() - sorted.len();
    render(path, &SpectrumFigure { sorted, non_finite, density, title })
}

// ---------------------------------------------------------------------------------------
// The action

struct ActionFigure<'a> {
    report: &'a ActionReport,
    title: &'a str,
}

impl Figure for ActionFigure<'_> {
    fn size(&self) -> (u32, u32) {
        TWO_PANELS
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> std::result::Result<(), String> {
        let body = drawing(root.titled(self.title, font(TITLE_PX)))?;
        let (top, bottom) = body.split_vertically(body.dim_in_pixel().1 / 2);
        self.draw_steps(&top)?;
        self.draw_length(&bottom)
    }
}

impl ActionFigure<'_> {
    /// Steps run 0 … T−1 and checkpoints 0 … T; both panels share the x range [0, T].
    fn x_range(&self) -> std::ops::Range<f64> {
        let t = self.report.steps.len().max(1) as f64;
        -0.02 * t..t * 1.02
    }

    fn draw_steps<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> std::result::Result<(), String> {
        let r = self.report;
        let points: Vec<(f64, f64)> =
            r.steps.iter().filter(|s| s.action.is_finite() && s.action > 0.0).map(|s| (s.step as f64, s.action)).collect();
        let caption = format!(
            "per-step action Δθᵀ F Δθ · total S = {}{}",
            number(r.action),
            skipped_note(r.steps.len() - points.len(), "zero or non-finite step")
        );
        if points.is_empty() {
            return empty_panel(area, &caption, "no step with a positive action to show on a log axis");
        }
        let lo = points.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        let hi = points.iter().map(|p| p.1).fold(0.0, f64::max);
        let (y0, y1) = decades(lo, hi);
        let axes = Axes {
            x: "step t  (θₜ → θₜ₊₁)",
            y: "Δθₜᵀ F(θₜ) Δθₜ",
            x_ticks: &index_tick,
            y_ticks: &log_tick,
            x_labels: 11,
        };
        let mut chart = styled_chart(area, caption, self.x_range(), widened((y0, y1)).log_scale(), &axes)?;
        drawing(chart.draw_series(LineSeries::new(points.iter().copied(), BLUE.stroke_width(2))))?;
        if points.len() <= 200 {
            drawing(chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, BLUE.filled()))))?;
        }
        Ok(())
    }

    fn draw_length<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> std::result::Result<(), String> {
        let r = self.report;
        // L at checkpoint t: 0 at θ₀, then the running sum after each step.
        let points: Vec<(f64, f64)> = std::iter::once((0.0, 0.0))
            .chain(r.steps.iter().map(|s| ((s.step + 1) as f64, s.cumulative_length)))
            .filter(|p| p.1.is_finite())
            .collect();
        let caption = format!(
            "Fisher–Rao path length · L = {} · chord = {} · L / chord = {}",
            number(r.length),
            number(r.chord),
            if r.efficiency.is_finite() { format!("{:.3}", r.efficiency) } else { "∞".into() }
        );
        let mut hi = points.iter().map(|p| p.1).fold(0.0, f64::max);
        if r.chord.is_finite() {
            hi = hi.max(r.chord);
        }
        let (y0, y1) = padded(0.0, hi);
        let axes = Axes {
            x: "checkpoint t",
            y: "cumulative Fisher–Rao length L(t)",
            x_ticks: &index_tick,
            y_ticks: &linear_tick,
            x_labels: 11,
        };
        let mut chart = styled_chart(area, caption, self.x_range(), 0f64.max(y0)..y1, &axes)?;
        drawing(chart.draw_series(LineSeries::new(points.iter().copied(), GREEN.stroke_width(3))))?
            .label("L(t): sum of √(Δθₛᵀ F Δθₛ) over the steps s < t")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], GREEN.stroke_width(3)));
        if points.len() <= 201 {
            drawing(chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, GREEN.filled()))))?;
        }
        if r.chord.is_finite() {
            let t = r.steps.len() as f64;
            drawing(chart.draw_series(DashedLineSeries::new(
                [(0.0, r.chord), (t, r.chord)],
                10,
                6,
                ORANGE.stroke_width(2),
            )))?
            .label(format!("chord, first → last checkpoint: {} ({} segments)", number(r.chord), r.segments))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], ORANGE.stroke_width(2)));
        }
        drawing(
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .label_font(font(TICK_PX + 2.0))
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(190, 190, 190))
                .margin(12)
                .draw(),
        )?;
        Ok(())
    }
}

/// Plots an [`ActionReport`]: the per-step action Δθ_tᵀ F(θ_t) Δθ_t (log y-axis; steps
/// with a zero or non-finite action are not drawn, the caption counts them) above the
/// cumulative Fisher–Rao length L(t) over the checkpoints, with the chord length as a
/// dashed horizontal line (their ratio is the path's efficiency). See the
/// [module docs](self) for formats and atomic writing.
///
/// Errors: [`FisherError::InvalidInput`] for an extension other than `.png`/`.svg`;
/// [`FisherError::Io`] when the directory does not exist or the file cannot be written.
pub fn action_plot(path: &Path, report: &ActionReport, title: &str) -> Result<()> {
    render(path, &ActionFigure { report, title })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::action::ActionStep;

    const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

    fn report(actions: &[f64]) -> ActionReport {
        let mut cumulative = 0.0;
        let steps: Vec<ActionStep> = actions
            .iter()
            .enumerate()
            .map(|(t, &a)| {
                let length = a.max(0.0).sqrt();
                cumulative += length;
                ActionStep { step: t, euclidean: 0.1, action: a, length, cumulative_length: cumulative }
            })
            .collect();
        ActionReport {
            checkpoints: actions.len() + 1,
            parameters: 10,
            action: actions.iter().sum(),
            length: cumulative,
            chord: 0.8 * cumulative,
            segments: 8,
            efficiency: 1.25,
            euclidean_length: 0.1 * actions.len() as f64,
            euclidean_chord: 0.05,
            steps,
        }
    }

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    #[test]
    fn png_and_svg_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let png = dir.path().join("a.png");
        action_plot(&png, &report(&[1.0, 0.5, 0.1, 0.02]), "action").unwrap();
        let bytes = std::fs::read(&png).unwrap();
        assert!(bytes.starts_with(PNG_SIGNATURE));
        assert!(bytes.len() > 10_000, "{} bytes", bytes.len());

        let svg = dir.path().join("s.SVG");
        let density = Histogram { edges: vec![1e-3, 1e-2, 1e-1, 1.0], mass: vec![2.0, 0.0, 1.0] };
        spectrum_plot(&svg, &[2.0, 0.5, 1e-3], Some(&density), "spectrum").unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(text.contains("<svg") && text.contains("</svg>"), "{}", &text[..200.min(text.len())]);
        assert!(text.contains("eigenvalue"));
        // Nothing but the two images: no temporary file is left behind.
        assert_eq!(names_in(dir.path()), ["a.png", "s.SVG"]);
    }

    #[test]
    fn log_axes_skip_what_they_cannot_show() {
        let dir = tempfile::tempdir().unwrap();
        let svg = dir.path().join("s.svg");
        // Two non-positive and two non-finite values are skipped and counted; a histogram
        // bin with a zero edge is skipped.
        let density = Histogram { edges: vec![0.0, 1e-2, 1.0], mass: vec![5.0, 1.0] };
        spectrum_plot(&svg, &[3.0, 0.0, -1e-9, f64::NAN, f64::INFINITY, 0.1], Some(&density), "t").unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(text.contains("4 zero, negative or non-finite values not shown"), "{text}");
        assert!(text.contains("1 non-empty bin not shown"), "{text}");
        // Nothing positive at all: the panel says so instead of failing.
        spectrum_plot(&svg, &[0.0, -1.0, f64::NAN], None, "t").unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(text.contains("no positive finite eigenvalue"), "{text}");
        // A step that did not move (action 0) and a NaN step are skipped on the log panel.
        let mut r = report(&[1.0, 0.0, 0.3]);
        r.steps[2].action = f64::NAN;
        action_plot(&svg, &r, "t").unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(text.contains("2 zero or non-finite steps not shown"), "{text}");
        action_plot(&svg, &report(&[0.0, 0.0]), "t").unwrap();
        assert!(std::fs::read_to_string(&svg).unwrap().contains("no step with a positive action"));
    }

    #[test]
    fn bad_paths_are_refused_and_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let r = report(&[1.0, 0.5]);
        let err = action_plot(&dir.path().join("a.jpg"), &r, "t").unwrap_err();
        assert!(matches!(err, FisherError::InvalidInput(_)) && err.to_string().contains(".png or .svg"), "{err}");
        let err = action_plot(&dir.path().join("missing/a.png"), &r, "t").unwrap_err();
        assert!(matches!(err, FisherError::Io { .. }) && err.to_string().contains("does not exist"), "{err}");
        let err = spectrum_plot(&dir.path().join("noext"), &[1.0], None, "t").unwrap_err();
        assert!(matches!(err, FisherError::InvalidInput(_)), "{err}");
        let bad = Histogram { edges: vec![1.0, 2.0], mass: vec![1.0, 2.0] };
        assert!(spectrum_plot(&dir.path().join("a.png"), &[1.0], Some(&bad), "t").is_err());
        assert!(names_in(dir.path()).is_empty(), "{:?}", names_in(dir.path()));
    }

    #[test]
    fn tick_labels() {
        assert_eq!(log_tick(&1e-5), "10⁻⁵");
        assert_eq!(log_tick(&1.0), "1");
        assert_eq!(log_tick(&100.0), "10²");
        assert_eq!(log_tick(&1e12), "10¹²");
        assert_eq!(log_tick(&2e-3), "");
        assert_eq!(linear_tick(&0.25), "0.25");
        assert_eq!(linear_tick(&3.0), "3");
        assert_eq!(decades(0.02, 0.5), (0.01, 1.0));
        assert_eq!(decades(1.0, 1.0), (0.1, 10.0));
    }
}
