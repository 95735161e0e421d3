//! Kubernetes API helpers shared by the stores, consumers and references: the error text users
//! see, conflict detection, and the one compare-and-swap retry loop every store write uses.

use std::future::Future;
use std::time::Duration;

/// A value rewritten under us this many times is contended; give up and roll back.
pub const CONFLICT_RETRIES: u32 = 5;
/// Waited before the second try; the nth retry waits n times this.
pub const CONFLICT_BACKOFF: Duration = Duration::from_millis(100);

/// The API server's own message, which names the object and never echoes Secret data.
pub fn describe_kube_error(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => format!(
            "the API server answered {} {}: {}",
            status.code, status.reason, status.message
        ),
        other => format!("the API server could not be reached: {other}"),
    }
}

/// A write refused because the object changed since it was read (409 on its resourceVersion).
pub fn is_conflict(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 409)
}

/// How one read-modify-write try ended when it did not succeed.
#[derive(Debug)]
pub enum Attempt<E> {
    /// Someone wrote in between: read again and retry, unless this was the last try.
    Conflict(E),
    /// Any other failure: give up at once.
    Failed(E),
}

/// Runs `write` (read, check, write under the version read) until it succeeds, fails, or
/// meets a conflict [`CONFLICT_RETRIES`] times; the last conflict's error is returned.
/// `what` names the object in the log line, `store` the store.
pub async fn retry_on_conflict<T, E, F, Fut>(store: &str, what: &str, write: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Attempt<E>>>,
{
    retry_with_backoff(store, what, CONFLICT_BACKOFF, write).await
}

async fn retry_with_backoff<T, E, F, Fut>(
    store: &str,
    what: &str,
    backoff: Duration,
    mut write: F,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Attempt<E>>>,
{
    let mut attempt = 1;
    loop {
        match write().await {
            Ok(value) => return Ok(value),
            Err(Attempt::Conflict(_)) if attempt < CONFLICT_RETRIES => {
                tracing::info!(
                    store,
                    attempt,
                    "{what} changed while writing; reading it again"
                );
                tokio::time::sleep(backoff * attempt).await;
                attempt += 1;
            }
            Err(Attempt::Conflict(error) | Attempt::Failed(error)) => return Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test]
    async fn conflicts_are_retried_then_the_last_one_is_returned() {
        let tries = AtomicU32::new(0);
        let result: Result<(), u32> = retry_with_backoff("s", "x", Duration::ZERO, || async {
            Err(Attempt::Conflict(tries.fetch_add(1, Ordering::SeqCst) + 1))
        })
        .await;
        assert_eq!(result, Err(CONFLICT_RETRIES));
        assert_eq!(tries.load(Ordering::SeqCst), CONFLICT_RETRIES);
    }

    #[tokio::test]
    async fn a_conflict_then_success_succeeds_and_other_failures_stop_at_once() {
        let tries = AtomicU32::new(0);
        let result: Result<u32, ()> = retry_with_backoff("s", "x", Duration::ZERO, || async {
            match tries.fetch_add(1, Ordering::SeqCst) {
                0 => Err(Attempt::Conflict(())),
                n => Ok(n),
            }
        })
        .await;
        assert_eq!(result, Ok(1));

        let tries = AtomicU32::new(0);
        let result: Result<(), &str> = retry_with_backoff("s", "x", Duration::ZERO, || async {
            tries.fetch_add(1, Ordering::SeqCst);
            Err(Attempt::Failed("down"))
        })
        .await;
        assert_eq!(result, Err("down"));
        assert_eq!(tries.load(Ordering::SeqCst), 1);
    }
}
