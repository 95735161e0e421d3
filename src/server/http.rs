//! The HTTP listener: the API router behind a plain hyper accept loop, because a daemon that
//! must exit on SIGTERM cannot let its clients decide when. Each connection gets a header-read
//! timeout, the number of open connections is capped, and at shutdown whatever is still open
//! a few seconds later is closed.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Connections served at once; more wait in the kernel's accept queue.
pub const MAX_CONNECTIONS: usize = 256;
/// A client has this long to send a request head.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// At shutdown, requests in progress get this long to finish before their connection is closed.
pub const CLOSE_WITHIN: Duration = Duration::from_secs(3);

/// Serves `app` until `stop` is cancelled, then closes every connection within [`CLOSE_WITHIN`].
pub async fn serve(listener: TcpListener, app: axum::Router, stop: CancellationToken) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => break,
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let stream = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors, say: back off instead of spinning.
                    tracing::warn!(cause = %error, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let service = TowerToHyperService::new(app.clone());
        let stop = stop.clone();
        connections.spawn(async move {
            let _permit = permit;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(CLOSE_WITHIN, connection).await;
                }
            }
        });
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    let drained = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(CLOSE_WITHIN + Duration::from_secs(1), drained)
        .await
        .is_err()
    {
        connections.abort_all();
    }
}
