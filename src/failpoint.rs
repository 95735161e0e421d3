//! Test-only pause points at step boundaries (the `failpoints` feature): the process stops
//! there so a test can kill it and exercise crash recovery at that exact boundary.

/// Names the boundary `step:subject:status`; pauses forever when `LLMTRACE_ROTATOR_PAUSE_AT` names it.
#[cfg(feature = "failpoints")]
pub async fn boundary(step: &str, subject: &str, status: &str) {
    let name = format!("{step}:{subject}:{status}");
    if std::env::var("LLMTRACE_ROTATOR_PAUSE_AT").is_ok_and(|want| want == name) {
        eprintln!("failpoint reached: {name}");
        std::future::pending::<()>().await;
    }
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub async fn boundary(_step: &str, _subject: &str, _status: &str) {}
