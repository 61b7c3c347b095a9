//! Progress on stderr, and Ctrl-C.
//!
//! On a terminal one line redraws itself in place, at most ~10 times a second:
//!
//! ```text
//! [########------------] 120/500  loss 1.234  lr 1.9e-04  812 tok/s  ETA 3m12s
//! ```
//!
//! Anywhere else (a log file, CI) a plain line is printed every `max(1, total / 50)` steps, so a
//! log holds about fifty of them. Write errors on stderr are ignored on purpose: a closed or full
//! stderr must not stop a training run.

use crate::error::{Error, Result};
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BAR_WIDTH: usize = 20;
const REDRAW_EVERY: Duration = Duration::from_millis(100);
/// Erase the terminal line and return to its start (CSI 2K).
const CLEAR: &str = "\r\x1b[2K";

/// The progress display of one training run.
#[derive(Debug)]
pub struct Progress {
    total: usize,
    tty: bool,
    every: usize,
    /// The first update seen (step, time): rates are measured from it, so time spent loading, or
    /// the steps a resumed run skipped, do not distort the ETA.
    first: Option<(usize, Instant)>,
    last_draw: Option<Instant>,
    /// The bar of the latest update, to put back under a message.
    line: Option<String>,
    /// `line` is newer than what the terminal shows (the redraw was rate-limited).
    stale: bool,
    finished: bool,
}

impl Progress {
    /// A display for a run of `total_steps` optimizer steps; `is_tty` chooses the redrawn bar over
    /// plain lines.
    pub fn new(total_steps: usize, is_tty: bool) -> Self {
        Progress {
            total: total_steps,
            tty: is_tty,
            every: (total_steps / 50).max(1),
            first: None,
            last_draw: None,
            line: None,
            stale: false,
            finished: false,
        }
    }

    /// A display on stderr, as a bar when stderr is a terminal.
    pub fn stderr(total_steps: usize) -> Self {
        Self::new(total_steps, std::io::stderr().is_terminal())
    }

    /// Reports that `step` optimizer steps are done, with the latest loss, learning rate and
    /// throughput.
    pub fn update(&mut self, step: usize, loss: f64, lr: f64, tokens_per_s: f64) {
        let now = Instant::now();
        let (first_step, first_time) = *self.first.get_or_insert((step, now));
        let eta = eta_seconds(step, self.total, step.saturating_sub(first_step), (now - first_time).as_secs_f64());
        let last = step >= self.total;
        if self.tty {
            // Kept even when not drawn now, so that `finish` and `message` show the latest state.
            self.line = Some(format!(
                "{} {}",
                format_bar(step, self.total, BAR_WIDTH),
                format_status(step, self.total, loss, lr, tokens_per_s, eta)
            ));
            if !last && self.last_draw.is_some_and(|t| now - t < REDRAW_EVERY) {
                self.stale = true;
                return;
            }
            self.draw();
            self.last_draw = Some(now);
        } else if step == first_step || step.is_multiple_of(self.every) || last {
            let line = format!("step {}", format_status(step, self.total, loss, lr, tokens_per_s, eta));
            let _ = writeln!(std::io::stderr().lock(), "{line}");
        }
    }

    /// Prints `msg` on its own line (above the bar on a terminal).
    pub fn message(&mut self, msg: &str) {
        let mut err = std::io::stderr().lock();
        if self.tty && !self.finished {
            let _ = writeln!(err, "{CLEAR}{msg}");
            if let Some(line) = &self.line {
                let _ = write!(err, "{line}");
            }
            self.stale = false;
        } else {
            let _ = writeln!(err, "{msg}");
        }
    }

    /// Ends the display: on a terminal the bar stays as the last line drawn, followed by a newline.
    pub fn finish(&mut self) {
        if self.tty && !self.finished && self.line.is_some() {
            if self.stale {
                self.draw();
            }
            let _ = writeln!(std::io::stderr().lock());
        }
        self.finished = true;
    }

    fn draw(&mut self) {
        if let Some(line) = &self.line {
            let _ = write!(std::io::stderr().lock(), "{CLEAR}{line}");
        }
        self.stale = false;
    }
}

/// Seconds left for a run at `step` of `total`, given that `steps_timed` steps took `elapsed_s`
/// seconds; `None` until a step has been timed.
pub fn eta_seconds(step: usize, total: usize, steps_timed: usize, elapsed_s: f64) -> Option<f64> {
    if steps_timed == 0 || !(elapsed_s.is_finite() && elapsed_s >= 0.0) {
        return None;
    }
    Some(total.saturating_sub(step) as f64 * elapsed_s / steps_timed as f64)
}

/// `45s`, `3m12s`, `1h02m`, `2d03h`: two units at most, the way a glance wants it.
pub fn format_duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "--".into();
    }
    let s = secs.round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// `[#####-----]`: `width` cells, filled in proportion to `done` of `total`.
pub fn format_bar(done: usize, total: usize, width: usize) -> String {
    let filled = (done.min(total) * width).checked_div(total).unwrap_or(width);
    format!("[{}{}]", "#".repeat(filled), "-".repeat(width - filled))
}

/// A learning rate as `1.9e-04` (the way Python prints it, so it matches other tools' logs).
pub fn format_lr(lr: f64) -> String {
    if lr == 0.0 {
        return "0".into();
    }
    if !lr.is_finite() {
        return format!("{lr}");
    }
    let s = format!("{lr:.1e}");
    match s.split_once('e') {
        Some((m, e)) => {
            let (sign, digits) = match e.strip_prefix('-') {
                Some(d) => ('-', d),
                None => ('+', e),
            };
            format!("{m}e{sign}{digits:0>2}")
        }
        None => s,
    }
}

/// `812 tok/s`, `12.3k tok/s`.
pub fn format_rate(tokens_per_s: f64) -> String {
    if !tokens_per_s.is_finite() || tokens_per_s < 0.0 {
        "-- tok/s".into()
    } else if tokens_per_s >= 10_000.0 {
        format!("{:.1}k tok/s", tokens_per_s / 1000.0)
    } else {
        format!("{tokens_per_s:.0} tok/s")
    }
}

/// `120/500  loss 1.234  lr 1.9e-04  812 tok/s  ETA 3m12s`.
pub fn format_status(step: usize, total: usize, loss: f64, lr: f64, tokens_per_s: f64, eta: Option<f64>) -> String {
    let eta = eta.map_or_else(|| "--".to_string(), format_duration);
    format!("{step}/{total}  loss {loss:.3}  lr {}  {}  ETA {eta}", format_lr(lr), format_rate(tokens_per_s))
}

static INTERRUPT: Mutex<Option<Arc<AtomicBool>>> = Mutex::new(None);

/// The flag set by Ctrl-C, installing the handler on first use (later calls return the same flag).
/// The first Ctrl-C sets it and says (a warning through the `log` facade) that the run will save
/// and stop; a second one exits at once with status 130, without saving.
pub fn interrupt_flag() -> Result<Arc<AtomicBool>> {
    // A panic elsewhere while holding the lock leaves the Option intact: keep using it.
    let mut slot = INTERRUPT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(flag) = slot.as_ref() {
        return Ok(flag.clone());
    }
    let flag = Arc::new(AtomicBool::new(false));
    let seen = flag.clone();
    ctrlc::set_handler(move || {
        // The handler runs on ctrlc's own thread, not in signal context: logging is fine here.
        if seen.swap(true, Ordering::SeqCst) {
            log::warn!("interrupted again: exiting now, without saving");
            std::process::exit(130);
        }
        log::warn!("interrupted: saving a checkpoint, then stopping (Ctrl-C again quits at once, without saving)");
    })
    .map_err(|e| Error::Invalid(format!("cannot install the Ctrl-C handler: {e}")))?;
    *slot = Some(flag.clone());
    Ok(flag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(format_duration(0.0), "0s");
        assert_eq!(format_duration(44.6), "45s");
        assert_eq!(format_duration(59.4), "59s");
        assert_eq!(format_duration(60.0), "1m00s");
        assert_eq!(format_duration(192.0), "3m12s");
        assert_eq!(format_duration(3599.0), "59m59s");
        assert_eq!(format_duration(3600.0), "1h00m");
        assert_eq!(format_duration(3720.0), "1h02m");
        assert_eq!(format_duration(86400.0 * 2.0 + 3.0 * 3600.0), "2d03h");
        assert_eq!(format_duration(f64::NAN), "--");
        assert_eq!(format_duration(-1.0), "--");
    }

    #[test]
    fn eta() {
        assert_eq!(eta_seconds(10, 100, 0, 5.0), None, "nothing timed yet");
        assert_eq!(eta_seconds(120, 500, 20, 10.0), Some(190.0));
        assert_eq!(eta_seconds(500, 500, 20, 10.0), Some(0.0));
        assert_eq!(eta_seconds(600, 500, 20, 10.0), Some(0.0));
        assert_eq!(eta_seconds(1, 2, 1, f64::NAN), None);
    }

    #[test]
    fn bars_and_numbers() {
        assert_eq!(format_bar(0, 500, 10), "[----------]");
        assert_eq!(format_bar(250, 500, 10), "[#####-----]");
        assert_eq!(format_bar(499, 500, 10), "[#########-]");
        assert_eq!(format_bar(500, 500, 10), "[##########]");
        assert_eq!(format_bar(900, 500, 10), "[##########]");
        assert_eq!(format_bar(0, 0, 4), "[####]");
        assert_eq!(format_lr(1.9e-4), "1.9e-04");
        assert_eq!(format_lr(2e-4), "2.0e-04");
        assert_eq!(format_lr(1e-10), "1.0e-10");
        assert_eq!(format_lr(1.5), "1.5e+00");
        assert_eq!(format_lr(0.0), "0");
        assert_eq!(format_rate(812.4), "812 tok/s");
        assert_eq!(format_rate(12_345.0), "12.3k tok/s");
        assert_eq!(format_rate(f64::NAN), "-- tok/s");
    }

    #[test]
    fn status_line() {
        assert_eq!(
            format_status(120, 500, 1.23449, 1.9e-4, 812.0, Some(192.0)),
            "120/500  loss 1.234  lr 1.9e-04  812 tok/s  ETA 3m12s"
        );
        assert_eq!(format_status(1, 10, f64::NAN, 0.0, 0.0, None), "1/10  loss NaN  lr 0  0 tok/s  ETA --");
    }

    #[test]
    fn display_does_not_panic() {
        // Both modes, including updates past the total and a message before any bar.
        for tty in [false, true] {
            let mut p = Progress::new(3, tty);
            p.message("starting");
            for s in 1..=4 {
                p.update(s, 1.0 / s as f64, 1e-4, 100.0);
            }
            p.message("done");
            p.finish();
            p.finish();
            p.message("after");
        }
        assert_eq!(Progress::new(1000, false).every, 20);
        assert_eq!(Progress::new(10, false).every, 1);
    }

    #[test]
    fn interrupt_flag_is_shared() {
        let a = interrupt_flag().unwrap();
        let b = interrupt_flag().unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!a.load(Ordering::SeqCst));
    }
}
