//! An opt-in wall-clock trace of the host side, for finding where a step or a reshard
//! job spends its time on a machine without Nsight Systems: with `REMP_TRACE=1` each
//! traced span (a worker's step, a copy thread's job) prints one line on stderr,
//!
//! `trace <what>: at <ms since the first span> ms, <label> +<ms>, <label> +<ms>, ...`
//!
//! where each `+ms` is the wall time since the previous mark of that span. Marks are kept
//! per thread (a span never crosses threads), so the calls cost nothing to pass around;
//! without the variable every call is one relaxed load.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::sync::OnceLock;
use std::time::Instant;

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Whether `REMP_TRACE=1` (read once).
pub fn on() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        let on = std::env::var("REMP_TRACE").is_ok_and(|v| v == "1");
        if on {
            epoch();
        }
        on
    })
}

thread_local! {
    static MARKS: RefCell<Vec<(&'static str, Instant)>> = const { RefCell::new(Vec::new()) };
}

/// Starts this thread's span (drops an unfinished one).
pub fn begin() {
    if on() {
        MARKS.with(|m| {
            let mut m = m.borrow_mut();
            m.clear();
            m.push(("start", Instant::now()));
        });
    }
}

/// Marks the end of phase `label` of this thread's span.
pub fn mark(label: &'static str) {
    if on() {
        MARKS.with(|m| m.borrow_mut().push((label, Instant::now())));
    }
}

/// Ends this thread's span and prints it, named by `what` (built only when tracing).
pub fn end(what: impl FnOnce() -> String) {
    if !on() {
        return;
    }
    let marks = MARKS.with(|m| std::mem::take(&mut *m.borrow_mut()));
    let Some(&(_, t0)) = marks.first() else {
        return;
    };
    let mut line = format!(
        "trace {}: at {:.3} ms",
        what(),
        t0.duration_since(epoch()).as_secs_f64() * 1e3
    );
    for w in marks.windows(2) {
        let dt = w[1].1.duration_since(w[0].1).as_secs_f64() * 1e3;
        let _ = write!(line, ", {} +{dt:.3}", w[1].0);
    }
    let total = marks
        .last()
        .map_or(0.0, |l| l.1.duration_since(t0).as_secs_f64() * 1e3);
    let _ = write!(line, " (total {total:.3} ms)");
    eprintln!("{line}");
}
