//! Backfill progress on a terminal: one bar per poller (days read of days to read, records
//! per second of its stream, ETA), drawn with `indicatif` on stderr when it is a terminal.
//! Elsewhere `run` logs one progress line per stream every 30 s instead.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Instant;

use chrono::Utc;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::ops::Registry;

/// The bars of every poller.
pub struct Bars {
    multi: MultiProgress,
    bars: HashMap<String, ProgressBar>,
    style: ProgressStyle,
    rates: HashMap<&'static str, (Instant, u64)>,
}

impl Bars {
    /// Returns bars on stderr, or `None` when stderr is not a terminal.
    pub fn on_terminal() -> Option<Bars> {
        use std::io::IsTerminal;
        if !std::io::stderr().is_terminal() {
            return None;
        }
        let style = ProgressStyle::with_template(
            "{prefix:<26} [{bar:30}] {pos:>5}/{len:5} days  {msg}  ETA {eta}",
        )
        .ok()?
        .progress_chars("=> ");
        Some(Bars {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
            bars: HashMap::new(),
            style,
            rates: HashMap::new(),
        })
    }

    /// Redraws every poller's bar from the registry.
    pub fn update(&mut self, ops: &Registry) {
        let now = Instant::now();
        let mut rates: HashMap<&'static str, f64> = HashMap::new();
        for (stream, stats) in &ops.streams {
            let fetched = stats.fetched.load(Ordering::Relaxed);
            let (then, before) = self
                .rates
                .insert(stream, (now, fetched))
                .unwrap_or((now, 0));
            let secs = now.duration_since(then).as_secs_f64();
            if secs > 0.0 {
                rates.insert(stream, (fetched - before.min(fetched)) as f64 / secs);
            }
        }
        let today = Utc::now().with_timezone(&ops.tz).date_naive();
        for (name, poller) in ops.pollers() {
            if poller.cursors.is_empty() {
                continue;
            }
            let (done, total) = poller.days(today);
            let bar = self.bars.entry(name.clone()).or_insert_with(|| {
                let bar = self.multi.add(ProgressBar::new(total));
                bar.set_style(self.style.clone());
                bar.set_prefix(name.clone());
                bar
            });
            if bar.is_finished() {
                continue;
            }
            bar.set_length(total);
            bar.set_position(done);
            let rate = rates.get(poller.stream).copied().unwrap_or(0.0);
            if done >= total {
                bar.finish_with_message("caught up");
            } else {
                bar.set_message(format!("{rate:>8.0} records/s"));
            }
        }
    }
}
