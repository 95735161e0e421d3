//! Test-only pause points at step boundaries (the `failpoints` feature): the process stops
//! there so a test can kill it and exercise crash recovery at that exact boundary.

/// Names the boundary `step:subject:status`; pauses when `LLMTRACE_ROTATOR_PAUSE_AT` names it
/// (forever, or `LLMTRACE_ROTATOR_PAUSE_FOR` milliseconds), and sends this process SIGTERM
/// when `LLMTRACE_ROTATOR_SIGTERM_AT` does. With
/// `LLMTRACE_ROTATOR_TRACE_BOUNDARIES` set, prints each boundary as it is crossed (steps of a
/// chunk start, and end, together: a report's step list does not show that order).
#[cfg(feature = "failpoints")]
pub async fn boundary(step: &str, subject: &str, status: &str) {
    let name = format!("{step}:{subject}:{status}");
    if std::env::var_os("LLMTRACE_ROTATOR_TRACE_BOUNDARIES").is_some() {
        eprintln!("failpoint boundary: {name}");
    }
    if std::env::var("LLMTRACE_ROTATOR_SIGTERM_AT").is_ok_and(|want| want == name) {
        eprintln!("failpoint reached: SIGTERM at {name}");
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::TERM);
        // Let the signal handler see it before the run takes its next step.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    if std::env::var("LLMTRACE_ROTATOR_PAUSE_AT").is_ok_and(|want| want == name) {
        eprintln!("failpoint reached: {name}");
        // `LLMTRACE_ROTATOR_PAUSE_FOR` (milliseconds): go on afterwards, as a slow step would.
        match std::env::var("LLMTRACE_ROTATOR_PAUSE_FOR").map(|ms| ms.parse::<u64>()) {
            Ok(Ok(ms)) => tokio::time::sleep(std::time::Duration::from_millis(ms)).await,
            _ => std::future::pending::<()>().await,
        }
    }
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub async fn boundary(_step: &str, _subject: &str, _status: &str) {}

/// Whether the journal is to fail from this boundary on (`LLMTRACE_ROTATOR_JOURNAL_DOWN_AT` names
/// it): every checkpoint from the named one to the end of the process fails, as when the journal
/// database goes away mid-run.
#[cfg(feature = "failpoints")]
pub fn journal_down(step: &str, subject: &str, status: &str) -> bool {
    use std::sync::atomic::{AtomicBool, Ordering};
    static DOWN: AtomicBool = AtomicBool::new(false);
    let name = format!("{step}:{subject}:{status}");
    if std::env::var("LLMTRACE_ROTATOR_JOURNAL_DOWN_AT").is_ok_and(|want| want == name) {
        eprintln!("failpoint reached: journal down from {name}");
        DOWN.store(true, Ordering::SeqCst);
    }
    DOWN.load(Ordering::SeqCst)
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn journal_down(_step: &str, _subject: &str, _status: &str) -> bool {
    false
}
