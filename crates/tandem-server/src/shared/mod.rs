//! State that gateway replicas share through Redis (`[server.shared] redis_url`), so that any
//! number of replicas behind a load balancer together never pass a route's budget cap.
//!
//! - [`SharedStore`]: a route's budget window as atomic reservations in Redis (Lua scripts:
//!   check-and-reserve, settle, refund, expiry of old windows and reclaim of reservations whose
//!   replica died).
//! - [`LocalShare`]: what one replica may spend on its own while Redis is unreachable, as
//!   configured by [`OnRedisDown`]; its spend is pushed to Redis when Redis answers again.
//!
//! Money is integer micro-dollars ([`Micros`](tandem_core::Micros)); times are seconds since the
//! Unix epoch unless a field says otherwise.

pub mod budget;
pub mod fallback;
pub mod feedback;
pub mod learning;
pub mod route;

pub use budget::{
    Cap, Closed, Reserve, SharedConfig, SharedReservation, SharedSpent, SharedStore, Totals,
    Window, MAX_AMOUNT,
};
pub use fallback::{LocalHeld, LocalShare, OnRedisDown, Unsynced};
pub use route::{RouteShare, SharedHold};

use std::time::Duration;

/// What can go wrong talking to the shared store. Every message names the store (its URL without
/// the password) and the operation.
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    /// The URL is not a Redis URL (`redis://` or `rediss://`).
    #[error("shared store: bad Redis URL `{url}`: {source}")]
    BadUrl {
        url: String,
        source: redis::RedisError,
    },
    /// A setting or an argument the store cannot take (an amount over [`MAX_AMOUNT`], an empty
    /// route, a prefix with a `:`); nothing was sent.
    #[error("shared store: {what}: {why}")]
    BadInput { what: &'static str, why: String },
    /// The client needs a Tokio runtime (it runs a background task per connection).
    #[error("shared store at {url}: must be opened inside a Tokio runtime")]
    NoRuntime { url: String },
    /// Redis could not be reached, or the connection broke, or Redis answered with an error.
    #[error("shared store at {url}: {op} failed: {source}")]
    Redis {
        url: String,
        op: &'static str,
        source: redis::RedisError,
    },
    /// No answer within the operation timeout. The operation may still have been applied in
    /// Redis: a reservation then stays counted (as spent, once its hold ends), never lost.
    #[error("shared store at {url}: {op} got no answer within {} ms", .timeout.as_millis())]
    Timeout {
        url: String,
        op: &'static str,
        timeout: Duration,
    },
    /// Not tried: Redis failed recently, and each request waiting a full timeout on a store known
    /// to be down would stall the gateway. The next try is made after `retry_in`.
    #[error("shared store at {url}: {op} not tried, Redis is down (next try in {} ms)", .retry_in.as_millis())]
    Down {
        url: String,
        op: &'static str,
        retry_in: Duration,
    },
    /// Redis answered something the scripts never return (another program wrote these keys?).
    #[error("shared store at {url}: {op}: unexpected reply: {detail}")]
    Reply {
        url: String,
        op: &'static str,
        detail: String,
    },
}

impl SharedError {
    /// True when the store could not be reached or did not answer in time: the caller falls back
    /// as its [`OnRedisDown`] says. False for bad input or replies, which a retry cannot cure.
    pub fn is_unavailable(&self) -> bool {
        match self {
            SharedError::Timeout { .. } | SharedError::Down { .. } => true,
            SharedError::Redis { source, .. } => is_unreachable(source),
            _ => false,
        }
    }
}

/// Errors that say the store is not there or cannot serve now (as opposed to an error in what was
/// asked): I/O, a broken connection, and a server still loading its data, failing over or turned
/// read-only.
pub(crate) fn is_unreachable(e: &redis::RedisError) -> bool {
    use redis::{ErrorKind, RetryMethod, ServerErrorKind};
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || matches!(
            e.retry_method(),
            RetryMethod::Reconnect
                | RetryMethod::ReconnectFromInitialConnections
                | RetryMethod::WaitAndRetry
        )
        || e.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly)
}

/// `url` without its password, for messages and logs: `redis://user:***@host:6379/0`. The
/// user information ends at the last `@` (a password may hold `@` or `/`); a `password=`
/// query parameter is hidden too; anything without a scheme is hidden whole (it may be a bare
/// password put where a URL belongs).
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return "***".to_string();
    };
    let (head, query) = match url.find('?') {
        Some(q) => (&url[..q], Some(&url[q + 1..])),
        None => (url, None),
    };
    let rest = &head[scheme_end + 3..];
    let mut out = match rest.rfind('@') {
        None => head.to_string(),
        Some(at) => {
            let userinfo = &rest[..at];
            let shown = match userinfo.find(':') {
                Some(colon) => format!("{}:***", &userinfo[..colon]),
                None => userinfo.to_string(),
            };
            format!("{}{}{}", &head[..scheme_end + 3], shown, &rest[at..])
        }
    };
    if let Some(q) = query {
        let params: Vec<String> = q
            .split('&')
            .map(|p| match p.split_once('=') {
                Some((k, _))
                    if k.eq_ignore_ascii_case("password") || k.eq_ignore_ascii_case("pass") =>
                {
                    format!("{k}=***")
                }
                _ => p.to_string(),
            })
            .collect();
        out.push('?');
        out.push_str(&params.join("&"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_password_only() {
        for (url, shown) in [
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
            ("redis://:s3cret@host:6379/2", "redis://:***@host:6379/2"),
            ("rediss://tandem:p@ss@host/0", "rediss://tandem:***@host/0"),
            ("redis://user@host", "redis://user@host"),
            ("not a url", "***"),
            ("garbage-hunter2", "***"),
            (
                "redis://:hun/ter2@127.0.0.1:6379/0",
                "redis://:***@127.0.0.1:6379/0",
            ),
            (
                "redis://127.0.0.1:6379/0?password=hunter2&protocol=resp3",
                "redis://127.0.0.1:6379/0?password=***&protocol=resp3",
            ),
            ("redis://u:p@h/0?pass=x", "redis://u:***@h/0?pass=***"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }
}
