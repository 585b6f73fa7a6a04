//! `convert -p`: a progress bar on standard error, drawn by `indicatif`
//! only when standard error is a terminal (a redirected run stays clean,
//! as qemu-img's does when it cannot draw).

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A progress bar, or nothing when `-p` was not given.
pub(crate) struct Bar(Option<ProgressBar>);

impl Bar {
    /// A bar over `total` bytes when `enabled`.
    pub(crate) fn new(enabled: bool, total: u64) -> Self {
        if !enabled {
            return Self(None);
        }
        // `stderr()` hides the bar when standard error is not a terminal.
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(
            "{percent:>3}% [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        Self(Some(bar))
    }

    /// Records `done` bytes.
    pub(crate) fn set(&self, done: u64) {
        if let Some(b) = &self.0 {
            b.set_position(done);
        }
    }

    /// Draws the bar at 100% and leaves it on screen.
    pub(crate) fn finish(&self) {
        if let Some(b) = &self.0 {
            b.finish();
        }
    }
}
