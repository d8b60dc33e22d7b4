//! A progress bar on stderr for long runs (indicatif), shown only to a person watching:
//! hidden under `--quiet` and `--json`, and whenever stderr is not a terminal (a pipe, a
//! file, a CI log), so that redirected output never holds control codes.
//!
//! ```
//! use fisher_engine::output::progress::Progress;
//! let progress = Progress::new("quadratic forms", 10, Progress::wanted(false, false));
//! let mut report = progress.callback();
//! for done in 1..=10 {
//!     report(done, 10); // e.g. the `progress` argument of `action::measure`
//! }
//! progress.finish(); // also done on drop
//! ```

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A progress bar that draws on stderr, or nothing.
#[derive(Debug)]
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// Whether a run should show progress: not under `--quiet` or `--json`, and only when
    /// stderr is a terminal.
    pub fn wanted(quiet: bool, json: bool) -> bool {
        !quiet && !json && std::io::stderr().is_terminal()
    }

    /// A bar labelled `label` over `total` units, drawn on stderr when `show` (see
    /// [`Progress::wanted`]) and stderr is a terminal, else hidden.
    pub fn new(label: &str, total: usize, show: bool) -> Self {
        // indicatif's stderr target hides itself off a terminal already; the explicit check
        // keeps that guarantee independent of the library's defaults.
        if !show || !std::io::stderr().is_terminal() {
            return Progress::hidden();
        }
        let style = ProgressStyle::with_template("{msg} {wide_bar:.cyan/blue} {pos}/{len} [{elapsed}<{eta}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("█▉▊▋▌▍▎▏ ");
        let bar = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr())
            .with_style(style)
            .with_message(label.to_string());
        // Redraw (elapsed time) while a single slow unit runs.
        bar.enable_steady_tick(Duration::from_millis(200));
        Progress { bar }
    }

    /// A bar that draws nothing.
    pub fn hidden() -> Self {
        Progress { bar: ProgressBar::hidden() }
    }

    /// Whether nothing is drawn.
    pub fn is_hidden(&self) -> bool {
        self.bar.is_hidden()
    }

    /// Sets `done` of `total` units.
    pub fn set(&self, done: usize, total: usize) {
        self.bar.set_length(total as u64);
        self.bar.set_position(done as u64);
    }

    /// A `(done, total)` callback for library functions that report progress.
    pub fn callback(&self) -> impl FnMut(usize, usize) + '_ {
        move |done, total| self.set(done, total)
    }

    /// Removes the bar from the terminal (before the results are printed).
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        // On an error path too: the one-line error must not share its line with a bar.
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hidden_when_not_wanted() {
        assert!(Progress::new("x", 5, false).is_hidden());
        assert!(!Progress::wanted(true, false) && !Progress::wanted(false, true));
        // Under `cargo test` stderr is captured (not a terminal): hidden even when asked for.
        if !std::io::stderr().is_terminal() {
            assert!(Progress::new("x", 5, true).is_hidden());
            assert!(!Progress::wanted(false, false));
        }
        let p = Progress::hidden();
        let mut cb = p.callback();
        cb(1, 3);
        cb(3, 3);
        p.finish();
    }
}
