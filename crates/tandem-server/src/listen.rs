//! The accept loop: hyper's HTTP/1 connections under tokio, one task per connection as
//! `axum::serve` runs them, plus what `axum::serve` cannot be told to do — a header read timeout,
//! a cap on open connections, and a shutdown with a deadline.
//!
//! Past `max_connections`, a new connection is not left in the listen queue: HTTP/1 clients keep
//! their connections alive and reuse them, so a queued connection would wait for one of theirs
//! to close, which under load never comes (the client's request hangs). It is accepted and its
//! first request answered 503 `overloaded` with `Retry-After: 1` and `Connection: close`; at
//! most [`REFUSING`] such connections at once, further ones are closed unanswered.

use crate::error::GatewayError;
use axum::response::IntoResponse;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpSocket};
use tokio::task::JoinSet;

/// Connections being refused (answered 503 past the cap) at once, at most; past it, closed
/// unanswered. Each holds a file descriptor for at most its header read timeout.
pub const REFUSING: usize = 64;

/// Pending connections the kernel queues before `accept` (capped by `net.core.somaxconn`).
/// The standard library's 128 overflows when a client opens hundreds at once, and each
/// connection dropped there costs its client a one-second SYN retry.
pub const BACKLOG: u32 = 4096;

/// Binds `addr` (`host:port`) with a listen backlog of [`BACKLOG`].
pub async fn bind(addr: &str) -> std::io::Result<TcpListener> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        match bind_one(a) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::AddrNotAvailable,
            format!("{addr}: no address to listen on"),
        )
    }))
}

fn bind_one(a: SocketAddr) -> std::io::Result<TcpListener> {
    let s = if a.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // As the standard library does: a restarted gateway can bind while old connections linger.
    s.set_reuseaddr(true)?;
    s.bind(a)?;
    s.listen(BACKLOG)
}

/// Raises the soft open-file limit to the hard one (as Go's runtime does: the soft default, often
/// 1,024, is a leftover of `select`) and returns the soft limit now in force; None where there
/// is no limit to read. Each client connection, upstream connection and file is one.
#[cfg(unix)]
pub fn raise_open_file_limit() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current < lim.maximum {
        let old = lim.current;
        lim.current = lim.maximum;
        if setrlimit(Resource::Nofile, lim).is_err() {
            lim.current = old;
        }
    }
    lim.current
}

/// No open-file limit to raise or read here.
#[cfg(not(unix))]
pub fn raise_open_file_limit() -> Option<u64> {
    None
}

/// `max_connections` within the open-file limit: at most half of it (less a few for the
/// process's own files), the other half being for upstream connections. Lowered with a warning.
pub fn fit_connections(max_connections: usize, open_files: Option<u64>) -> usize {
    let Some(files) = open_files else {
        return max_connections;
    };
    let fit = usize::try_from(files.saturating_sub(64) / 2)
        .unwrap_or(usize::MAX)
        .max(1);
    if max_connections > fit {
        tracing::warn!(
            max_connections,
            open_file_limit = files,
            lowered_to = fit,
            "server.max_connections is above half the open-file limit: lowered (raise the limit, `ulimit -n`, to keep it)"
        );
        return fit;
    }
    max_connections
}

/// How the loop treats connections (from `[server]`).
pub struct Limits {
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    pub shutdown_grace: Duration,
}

/// Decrements the open-connection count when its connection's task ends (or is aborted).
struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves `app` on `listener` until `shutdown` completes; then closes idle connections, lets
/// requests in flight finish for up to `shutdown_grace`, and drops whatever is left (stalled
/// clients included). Returns once no connection task is left.
pub async fn run(
    listener: TcpListener,
    app: axum::Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let service = hyper_util::service::TowerToHyperService::new(app);
    let mut http1 = hyper::server::conn::http1::Builder::new();
    // The timer also closes a kept-alive connection idle for as long between two requests.
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let mut refuse = http1.clone();
    refuse.keep_alive(false);
    let refuser = hyper::service::service_fn(|_req| async {
        metrics::counter!("tandem_connections_refused_total").increment(1);
        Ok::<_, std::convert::Infallible>(GatewayError::Overloaded.into_response())
    });
    let open = Arc::new(AtomicUsize::new(0));
    let refusing = Arc::new(AtomicUsize::new(0));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    // Every connection's task, so that those still open after the grace period can be dropped.
    let mut tasks = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let tcp = tokio::select! {
            a = listener.accept() => match a {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        // Finished tasks' results, so the set holds only open connections.
        while tasks.try_join_next().is_some() {}
        // Without TCP_NODELAY, small responses on kept-alive connections wait on Nagle's algorithm.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
        let io = TokioIo::new(tcp);
        if open.load(Ordering::Relaxed) >= limits.max_connections {
            if refusing.load(Ordering::Relaxed) >= REFUSING {
                metrics::counter!("tandem_connections_dropped_total").increment(1);
                continue;
            }
            refusing.fetch_add(1, Ordering::Relaxed);
            let guard = Open(refusing.clone());
            let conn = graceful.watch(refuse.serve_connection(io, refuser));
            tasks.spawn(async move {
                let _ = conn.await;
                drop(guard);
            });
            continue;
        }
        open.fetch_add(1, Ordering::Relaxed);
        let guard = Open(open.clone());
        let conn = graceful.watch(http1.serve_connection(io, service.clone()));
        tasks.spawn(async move {
            // Errors here are a client's (reset, timed-out headers): nothing to answer.
            let _ = conn.await;
            drop(guard);
        });
    }
    drop(listener);
    // Idle connections close at once; busy ones after their response.
    if tokio::time::timeout(limits.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            connections = tasks.len(),
            grace_s = limits.shutdown_grace.as_secs_f64(),
            "shutdown: connections still open after the grace period are dropped"
        );
    }
    tasks.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_fit_in_half_the_open_files() {
        // A 1,024 soft limit: (1,024 − 64) / 2 connections; upstreams and files get the rest.
        assert_eq!(fit_connections(4096, Some(1024)), 480);
        assert_eq!(fit_connections(100, Some(1024)), 100);
        assert_eq!(fit_connections(4096, Some(1_048_576)), 4096);
        assert_eq!(fit_connections(4096, None), 4096);
        assert_eq!(fit_connections(4096, Some(10)), 1);
    }

    #[test]
    fn the_open_file_limit_is_raised_not_lowered() {
        #[cfg(unix)]
        {
            let before = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
            let after = raise_open_file_limit();
            assert!(
                after >= before || after.is_none(),
                "{before:?} -> {after:?}"
            );
        }
    }
}
