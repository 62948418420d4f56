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
    let sums = SUMS.with(|s| std::mem::take(&mut *s.borrow_mut()));
    if let Some(line) = format_span(&what(), epoch(), &marks, &sums) {
        eprintln!("{line}");
    }
}

/// The printed line of one span (`None` without marks): see the module comment.
fn format_span(
    what: &str,
    epoch: Instant,
    marks: &[(&'static str, Instant)],
    sums: &[(&'static str, f64, u32)],
) -> Option<String> {
    let &(_, t0) = marks.first()?;
    let ms = |a: Instant, b: Instant| b.duration_since(a).as_secs_f64() * 1e3;
    let mut line = format!("trace {what}: at {:.3} ms", ms(epoch, t0));
    for w in marks.windows(2) {
        let _ = write!(line, ", {} +{:.3}", w[1].0, ms(w[0].1, w[1].1));
    }
    let total = marks.last().map_or(0.0, |l| ms(t0, l.1));
    let _ = write!(line, " (total {total:.3} ms)");
    for (label, ms, n) in sums {
        let _ = write!(line, ", {label} Σ{ms:.3}/{n}");
    }
    Some(line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_span_prints_each_phase_since_the_previous_mark_then_the_sums() {
        let e = Instant::now();
        let at = |ms: u64| e + Duration::from_millis(ms);
        let marks = [("start", at(10)), ("alloc", at(12)), ("sync", at(17))];
        let line = format_span("step 3 on w1", e, &marks, &[("launch", 1.25, 8)]).unwrap();
        assert_eq!(
            line,
            "trace step 3 on w1: at 10.000 ms, alloc +2.000, sync +5.000 (total 7.000 ms), \
             launch Σ1.250/8"
        );
        assert_eq!(format_span("empty", e, &[], &[]), None);
    }
}
