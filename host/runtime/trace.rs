//! An opt-in wall-clock trace of the host side, for finding where a step or a reshard
//! job spends its time on a machine without Nsight Systems: with `REMP_TRACE=1` each
//! traced span (a worker's step, a copy thread's job) prints one line on stderr,
//!
//! `trace <what>: at <ms since the first span> ms, <label> +<ms>, <label> +<ms>, ...`
//!
//! where each `+ms` is the wall time since the previous mark of that span, followed by
//! `label Σ<ms>/<calls>` for work timed many times a span ([`timed`]). Marks are kept
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
    /// Time summed per label inside the span ([`timed`]), in first-seen order.
    static SUMS: RefCell<Vec<(&'static str, f64, u32)>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f`, adding its wall time to label `label` of this thread's span (printed after
/// the marks as `label Σ<ms>/<calls>`): for work repeated many times a span, e.g. the
/// waits for peers in a step's exchanges.
pub fn timed<T>(label: &'static str, f: impl FnOnce() -> T) -> T {
    if !on() {
        return f();
    }
    let t = Instant::now();
    let r = f();
    let dt = t.elapsed().as_secs_f64() * 1e3;
    SUMS.with(|s| {
        let mut s = s.borrow_mut();
        match s.iter_mut().find(|e| e.0 == label) {
            Some(e) => {
                e.1 += dt;
                e.2 += 1;
            }
            None => s.push((label, dt, 1)),
        }
    });
    r
}

/// Starts this thread's span (drops an unfinished one).
pub fn begin() {
    if on() {
        MARKS.with(|m| {
            let mut m = m.borrow_mut();
            m.clear();
            m.push(("start", Instant::now()));
        });
        SUMS.with(|s| s.borrow_mut().clear());
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
    for (label, ms, n) in SUMS.with(|s| std::mem::take(&mut *s.borrow_mut())) {
        let _ = write!(line, ", {label} Σ{ms:.3}/{n}");
    }
    eprintln!("{line}");
}
