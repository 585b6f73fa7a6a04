//! `-p` (`convert`, `commit`, `rebase`, `amend`): progress in qemu-img's
//! form or as a bar.
//!
//! When standard output is not a terminal (a pipe or file, as when an
//! orchestrator runs qimg), the lines are qemu-img's, on standard output:
//! `    (NN.NN/100%)` each ended by `\r`, starting at `0.00`, one whenever
//! the progress moved on by more than 1% since the last one printed, a
//! last `100.00` and then `\n`. When both standard output and standard
//! error are terminals, `indicatif` draws a bar on standard error instead.

use std::io::{IsTerminal, Write};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// qemu-img prints a new line once the progress moved on by more than this
/// many percentage points.
const MIN_STEP: f64 = 1.0;

/// How progress is shown.
enum Shown {
    /// `-p` not given.
    Off,
    /// A bar on a terminal.
    Bar(ProgressBar),
    /// qemu-img's lines on standard output; the last percentage printed.
    Lines {
        total: u64,
        last: std::cell::Cell<f64>,
    },
}

/// A progress display, or nothing when `-p` was not given.
pub(crate) struct Bar(Shown);

fn print_line(pct: f64) {
    let mut out = std::io::stdout().lock();
    // A closed or full standard output must not fail the copy.
    let _ = write!(out, "    ({pct:.2}/100%)\r");
    let _ = out.flush();
}

impl Bar {
    /// Progress over `total` bytes when `enabled`.
    pub(crate) fn new(enabled: bool, total: u64) -> Self {
        if !enabled {
            return Self(Shown::Off);
        }
        if !std::io::stdout().is_terminal() || !std::io::stderr().is_terminal() {
            print_line(0.0);
            return Self(Shown::Lines {
                total,
                last: std::cell::Cell::new(0.0),
            });
        }
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(
            "{percent:>3}% [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        Self(Shown::Bar(bar))
    }

    /// Records `done` bytes.
    pub(crate) fn set(&self, done: u64) {
        match &self.0 {
            Shown::Off => {}
            Shown::Bar(b) => b.set_position(done),
            Shown::Lines { total, last } => {
                let pct = percent(done, *total);
                if pct > last.get() + MIN_STEP || (pct >= 100.0 && last.get() < 100.0) {
                    print_line(pct);
                    last.set(pct);
                }
            }
        }
    }

    /// Shows 100% and ends the display (qemu-img's lines end with `\n`).
    pub(crate) fn finish(&self) {
        match &self.0 {
            Shown::Off => {}
            Shown::Bar(b) => b.finish(),
            Shown::Lines { .. } => {
                print_line(100.0);
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(b"\n");
                let _ = out.flush();
            }
        }
    }
}

/// `done` of `total` in percent; an empty copy is complete.
fn percent(done: u64, total: u64) -> f64 {
    if total == 0 {
        return 100.0;
    }
    // Precision: f64 holds byte counts up to 2^53 exactly; the percentage
    // is printed with two decimals.
    #[allow(clippy::cast_precision_loss)]
    let p = done.min(total) as f64 * 100.0 / total as f64;
    p
}

#[cfg(test)]
mod tests {
    use super::percent;

    #[test]
    fn percentages_are_bounded() {
        assert_eq!(percent(0, 0), 100.0);
        assert_eq!(percent(5, 10), 50.0);
        assert_eq!(percent(20, 10), 100.0);
    }
}
