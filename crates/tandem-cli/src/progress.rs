//! Progress of long commands: a bar on a terminal, and plain lines when stderr is a log file or
//! CI's output (where a bar would print nothing until the end).

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// When stderr is not a terminal: a line at every tenth of the work, and at least this often.
const LINE_EVERY: Duration = Duration::from_secs(10);

/// Progress towards `total` units of work, named `what` ("prompts embedded").
pub struct Progress {
    bar: Option<ProgressBar>,
    what: String,
    total: Mutex<u64>,
    /// What the work found so far (shares, accuracy), shown after the count.
    message: Mutex<String>,
    state: Mutex<Lines>,
}

struct Lines {
    done: u64,
    started: Instant,
    last: Instant,
    /// The last tenth of the work a line was printed for.
    tenth: u64,
}

impl Progress {
    pub fn new(what: &str, total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(&format!(
                    "{{elapsed_precise}} [{{bar:30}}] {{pos}}/{{len}} {what} ({{eta}} left) {{msg}}"
                ))
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar
        });
        let now = Instant::now();
        Progress {
            bar,
            what: what.to_string(),
            total: Mutex::new(total),
            message: Mutex::new(String::new()),
            state: Mutex::new(Lines {
                done: 0,
                started: now,
                last: now,
                tenth: 0,
            }),
        }
    }

    pub fn set_total(&self, total: u64) {
        if let Some(b) = &self.bar {
            b.set_length(total);
        }
        if let Ok(mut t) = self.total.lock() {
            *t = total;
        }
    }

    /// Whether progress shows as a bar (stderr is a terminal), not as lines.
    pub fn is_bar(&self) -> bool {
        self.bar.is_some()
    }

    /// Replaces the message shown after the count.
    pub fn set_message(&self, m: String) {
        if let Some(b) = &self.bar {
            b.set_message(m);
        } else if let Ok(mut s) = self.message.lock() {
            *s = m;
        }
    }

    pub fn inc(&self, n: u64) {
        let done = match self.state.lock() {
            Ok(s) => s.done + n,
            Err(_) => return,
        };
        self.set(done);
    }

    /// Work done so far.
    pub fn set(&self, done: u64) {
        if let Some(b) = &self.bar {
            b.set_position(done);
            return;
        }
        let total = self.total.lock().map_or(0, |t| *t);
        let Ok(mut s) = self.state.lock() else {
            return;
        };
        s.done = done;
        let tenth = (done * 10).checked_div(total).unwrap_or(0);
        let now = Instant::now();
        if tenth > s.tenth || now.duration_since(s.last) >= LINE_EVERY {
            s.tenth = tenth;
            s.last = now;
            let msg = self.message.lock().map(|m| m.clone()).unwrap_or_default();
            let sep = if msg.is_empty() { "" } else { " " };
            eprintln!(
                "{}{sep}{msg}",
                line(&self.what, done, total, s.started.elapsed())
            );
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// "1200/14042 prompts embedded (8%), 20 s, about 3m 34s left".
fn line(what: &str, done: u64, total: u64, elapsed: Duration) -> String {
    let pct = (done * 100).checked_div(total).unwrap_or(0);
    let left = if done > 0 && total > done {
        let secs = elapsed.as_secs_f64() * (total - done) as f64 / done as f64;
        format!(", about {} left", human(secs))
    } else {
        String::new()
    };
    format!(
        "{done}/{total} {what} ({pct}%), {}{left}",
        human(elapsed.as_secs_f64())
    )
}

fn human(secs: f64) -> String {
    let s = secs.round() as u64;
    if s < 60 {
        format!("{s} s")
    } else if s < 3600 {
        format!("{}m {:02}s", s / 60, s % 60)
    } else {
        format!("{}h {:02}m", s / 3600, (s % 3600) / 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_say_how_far_and_how_long() {
        assert_eq!(
            line("prompts embedded", 1200, 14042, Duration::from_secs(20)),
            "1200/14042 prompts embedded (8%), 20 s, about 3m 34s left"
        );
        assert_eq!(
            line("items", 10, 10, Duration::from_secs(4000)),
            "10/10 items (100%), 1h 06m"
        );
        assert_eq!(line("items", 0, 0, Duration::ZERO), "0/0 items (0%), 0 s");
    }
}
