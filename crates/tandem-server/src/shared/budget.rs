//! A route's budget window in Redis, shared by any number of gateway replicas.
//!
//! # Layout
//! Per route and window, two keys (`{prefix}` names the deployment, `{start}` is the window's
//! start in seconds since the Unix epoch, 0 for a budget without windows):
//! - `tandem:{prefix}:budget:{route}:{start}`, a hash: `calls` and `micros` count every call of
//!   the window, settled or still open (an open call at its estimate), so a reservation is checked
//!   against both caps in O(1); `lapsed` counts reservations reclaimed from dead replicas; and one
//!   field `r:{id}` per open reservation holds its estimate.
//! - `tandem:{prefix}:budget:{route}:{start}:open`, a sorted set: each open reservation's id,
//!   scored by its deadline (Redis' clock, milliseconds): when it was taken plus its hold.
//!
//! Each operation is one Lua script, so it is atomic across replicas: reserve (check both caps,
//! count the call), settle (the call stays counted, its estimate is replaced by what it cost),
//! release (a refund: the estimate and the call go) and add (spend made elsewhere, e.g. while
//! Redis was down). Redis ≥ 5 (scripts read `TIME`); a single primary, not Redis Cluster (the
//! scripts touch two keys).
//!
//! # A replica that dies
//! A replica that dies between reserve and settle may have been billed for its call, so its
//! reservation must not vanish. It stays counted at its estimate — the most the call can cost —
//! and once its hold has passed, the next reservation in that window reclaims its bookkeeping:
//! the `r:{id}` entry goes, `lapsed` goes up, `calls` and `micros` keep it as spent. A settle or
//! release that comes after that changes nothing and says so ([`Closed::NotOpen`]); the hold
//! must therefore be longer than any call can last.
//!
//! # Old windows
//! A window's keys expire by themselves `key_margin` after the window ends (late settles of calls
//! reserved at the end still land); never, for a budget without windows. Expiry times are taken
//! from Redis' clock, never less than `key_margin` from now, so a replica whose clock is ahead
//! cannot make a live window vanish.

use super::{is_unreachable, redact_url, SharedError};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{FromRedisValue, RedisResult, Script};
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tandem_core::{BudgetLimits, Micros};

/// The largest amount (micro-dollars, ≈ $1.1 billion) or call count the store takes: the scripts
/// compare in Lua's doubles, exact up to 2^53, with room left for sums.
pub const MAX_AMOUNT: u64 = 1 << 50;

/// Check both caps and count one call. KEYS: window hash, open set. ARGV: id, estimate,
/// max_calls (-1: none), max_micros (-1: none), hold_ms, expire_at_s (0: never), margin_s.
/// Returns {code, calls, micros}: code 1 reserved, 0 refused by the call cap, -1 by the dollar cap.
const RESERVE: &str = r"
local t = redis.call('TIME')
local now_s = tonumber(t[1])
local now_ms = now_s * 1000 + math.floor(tonumber(t[2]) / 1000)
-- Past their hold: their replica is gone. They stay spent at their estimate; their entries go.
local late = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now_ms, 'LIMIT', 0, 100)
if #late > 0 then
  for _, rid in ipairs(late) do
    redis.call('HDEL', KEYS[1], 'r:' .. rid)
  end
  redis.call('ZREM', KEYS[2], unpack(late))
  redis.call('HINCRBY', KEYS[1], 'lapsed', #late)
end
local calls = tonumber(redis.call('HGET', KEYS[1], 'calls') or '0')
local micros = tonumber(redis.call('HGET', KEYS[1], 'micros') or '0')
local max_calls = tonumber(ARGV[3])
if max_calls >= 0 and calls + 1 > max_calls then
  return {0, calls, micros}
end
local max_micros = tonumber(ARGV[4])
if max_micros >= 0 and micros + tonumber(ARGV[2]) > max_micros then
  return {-1, calls, micros}
end
calls = redis.call('HINCRBY', KEYS[1], 'calls', 1)
micros = redis.call('HINCRBY', KEYS[1], 'micros', ARGV[2])
redis.call('HSET', KEYS[1], 'r:' .. ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now_ms + tonumber(ARGV[5]), ARGV[1])
local at = tonumber(ARGV[6])
if at > 0 then
  if at < now_s + tonumber(ARGV[7]) then
    at = now_s + tonumber(ARGV[7])
  end
  redis.call('EXPIREAT', KEYS[1], at)
  redis.call('EXPIREAT', KEYS[2], at)
end
return {1, calls, micros}
";

/// Settle or release an open reservation. KEYS: window hash, open set. ARGV: id, 'settle' or
/// 'release', actual. Returns {code, calls, micros}: code 1 applied, 0 not open (lapsed, closed
/// already, or its window expired), in which case nothing changed.
const CLOSE: &str = r"
local f = 'r:' .. ARGV[1]
local est = redis.call('HGET', KEYS[1], f)
if not est then
  return {0, tonumber(redis.call('HGET', KEYS[1], 'calls') or '0'),
          tonumber(redis.call('HGET', KEYS[1], 'micros') or '0')}
end
redis.call('HDEL', KEYS[1], f)
redis.call('ZREM', KEYS[2], ARGV[1])
-- Integer strings throughout: Lua prints large numbers as 1e+15, which HINCRBY refuses ('-0' too).
local micros
if est ~= '0' then
  micros = redis.call('HINCRBY', KEYS[1], 'micros', '-' .. est)
else
  micros = tonumber(redis.call('HGET', KEYS[1], 'micros') or '0')
end
local calls
if ARGV[2] == 'settle' then
  micros = redis.call('HINCRBY', KEYS[1], 'micros', ARGV[3])
  calls = tonumber(redis.call('HGET', KEYS[1], 'calls') or '0')
else
  calls = redis.call('HINCRBY', KEYS[1], 'calls', -1)
end
return {1, calls, micros}
";

/// Add spend made without a reservation here. KEYS: window hash. ARGV: calls, micros,
/// expire_at_s (0: never), margin_s. Returns {calls, micros}.
const ADD: &str = r"
local calls = redis.call('HINCRBY', KEYS[1], 'calls', ARGV[1])
local micros = redis.call('HINCRBY', KEYS[1], 'micros', ARGV[2])
local at = tonumber(ARGV[3])
if at > 0 then
  local now_s = tonumber(redis.call('TIME')[1])
  if at < now_s + tonumber(ARGV[4]) then
    at = now_s + tonumber(ARGV[4])
  end
  redis.call('EXPIREAT', KEYS[1], at)
end
return {calls, micros}
";

/// Read a window. KEYS: window hash, open set. Returns {calls, micros, open, lapsed}.
const SPENT: &str = r"
local v = redis.call('HMGET', KEYS[1], 'calls', 'micros', 'lapsed')
return {tonumber(v[1] or '0'), tonumber(v[2] or '0'), redis.call('ZCARD', KEYS[2]),
        tonumber(v[3] or '0')}
";

/// How to reach the shared store, and how long to wait for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedConfig {
    /// `redis://[[user]:password@]host[:port][/db]`, or `rediss://…` for TLS (server certificates
    /// checked against the Mozilla roots that ship in the binary).
    pub url: String,
    /// Namespace, so several deployments can share one Redis: keys are `tandem:{prefix}:…`.
    /// Letters, digits, `_`, `-` and `.`.
    pub prefix: String,
    /// Names this replica in reservation ids (for an operator reading Redis). Ids are unique
    /// without it: each [`SharedStore`] adds a random 64-bit tag and a counter.
    pub replica_id: Option<String>,
    /// Longest one operation may take, connecting included; then it fails with
    /// [`SharedError::Timeout`]. Default 500 ms.
    pub op_timeout: Duration,
    /// After Redis failed, operations fail at once with [`SharedError::Down`] for this long,
    /// rather than each waiting `op_timeout`; then one is tried again. Default 1 s.
    pub retry_after: Duration,
    /// How long a window's keys outlive the window. Default 10 minutes.
    pub key_margin: Duration,
}

impl SharedConfig {
    /// The store at `url` under `tandem:{prefix}:`, with the default timeouts.
    pub fn new(url: impl Into<String>, prefix: impl Into<String>) -> Self {
        SharedConfig {
            url: url.into(),
            prefix: prefix.into(),
            replica_id: None,
            op_timeout: Duration::from_millis(500),
            retry_after: Duration::from_secs(1),
            key_margin: Duration::from_secs(600),
        }
    }
}

/// A budget window: `start_s` in seconds since the Unix epoch, `len_s` its length in seconds
/// (None: one window for ever, starting at 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Window {
    pub start_s: u64,
    pub len_s: Option<u64>,
}

impl Window {
    /// The window `now_s` falls in, aligned the way [`crate::budget::WindowBudget`] aligns them
    /// (multiples of the length), so every replica names the same window.
    pub fn containing(now_s: u64, len_s: Option<u64>) -> Window {
        match len_s.and_then(|len| now_s.checked_rem(len)) {
            Some(rem) => Window {
                start_s: now_s - rem,
                len_s,
            },
            None => Window {
                start_s: 0,
                len_s: None,
            },
        }
    }

    /// When the window's keys may go (0: never).
    fn expire_at(self, margin_s: u64) -> u64 {
        match self.len_s {
            Some(len) => self.start_s.saturating_add(len).saturating_add(margin_s),
            None => 0,
        }
    }
}

/// What a window counts: its calls, and their micro-dollars (settled calls at their cost, open
/// reservations at their estimate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Totals {
    pub calls: u64,
    pub micros: Micros,
}

/// A window as [`SharedStore::spent`] reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SharedSpent {
    /// Calls counted (settled, open, or reclaimed from a dead replica).
    pub calls: u64,
    /// Micro-dollars counted, open reservations at their estimate.
    pub micros: Micros,
    /// Reservations still open (including any past their hold, not reclaimed yet).
    pub open: u64,
    /// Reservations reclaimed after their hold: counted as spent at their estimate.
    pub lapsed: u64,
}

/// The cap a reservation would have passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    Calls,
    Micros,
}

/// An open reservation in the shared store. Clone it to retry a settle or release that failed
/// (both are idempotent: a second one finds the reservation closed).
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use = "settle or release it: an open reservation counts as spent at its estimate"]
pub struct SharedReservation {
    id: String,
    route: String,
    window_start: u64,
    estimate: Micros,
}

impl SharedReservation {
    /// Unique across replicas: `[{replica_id}.]{random tag}.{counter}`.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn route(&self) -> &str {
        &self.route
    }

    /// The window it was taken in (and settles into, even when a newer window has begun).
    pub fn window_start(&self) -> u64 {
        self.window_start
    }

    /// Micro-dollars reserved.
    pub fn estimate(&self) -> Micros {
        self.estimate
    }
}

/// The answer to [`SharedStore::reserve`]; both arms carry the window's totals after it, for
/// [`super::LocalShare::observe`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reserve {
    Reserved {
        reservation: SharedReservation,
        totals: Totals,
    },
    /// Nothing was counted: one more call would pass `cap`.
    Refused { cap: Cap, totals: Totals },
}

/// The answer to [`SharedStore::settle`] and [`SharedStore::release`], with the window's totals
/// after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    Applied(Totals),
    /// The reservation was not open — reclaimed after its hold (it stays spent at its estimate),
    /// closed already, or its window expired: nothing changed.
    NotOpen(Totals),
}

impl Closed {
    pub fn totals(&self) -> Totals {
        match self {
            Closed::Applied(t) | Closed::NotOpen(t) => *t,
        }
    }
}

struct Scripts {
    reserve: Script,
    close: Script,
    add: Script,
    spent: Script,
}

/// What replicas share in one Redis, for every replica that opens it with the same prefix:
/// route budgets (here), feedback records ([`super::feedback`]) and learning
/// ([`super::learning`]). Cheap to share behind an `Arc`; one multiplexed connection,
/// reconnected after Redis returns.
pub struct SharedStore {
    pub(super) conn: ConnectionManager,
    /// `tandem:{prefix}:`
    pub(super) root: String,
    /// The URL without its password, for messages.
    url: String,
    /// `tandem:{prefix}:budget:`
    key_root: String,
    /// `[{replica_id}.]{tag}.`
    id_root: String,
    next_id: AtomicU64,
    pub(super) op_timeout: Duration,
    retry_after: Duration,
    key_margin_s: u64,
    /// `down_until_ms` counts from here; 0 means up.
    epoch: Instant,
    down_until_ms: AtomicU64,
    scripts: Scripts,
}

impl fmt::Debug for SharedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedStore")
            .field("url", &self.url)
            .field("key_root", &self.key_root)
            .field("id_root", &self.id_root)
            .finish_non_exhaustive()
    }
}

fn bad(what: &'static str, why: impl Into<String>) -> SharedError {
    SharedError::BadInput {
        what,
        why: why.into(),
    }
}

fn check_amount(what: &'static str, v: u64) -> Result<(), SharedError> {
    if v > MAX_AMOUNT {
        return Err(bad(what, format!("{v} is over the limit of {MAX_AMOUNT}")));
    }
    Ok(())
}

fn check_route(route: &str) -> Result<(), SharedError> {
    if route.is_empty() {
        return Err(bad("route", "empty route name"));
    }
    Ok(())
}

/// A cap as the scripts take it: -1 for none.
fn cap_arg(cap: Option<u64>) -> i64 {
    // Checked against MAX_AMOUNT before, so it fits.
    cap.map_or(-1, |c| c.min(MAX_AMOUNT) as i64)
}

impl SharedStore {
    /// Opens the store. No I/O: the connection is made by the first operation (so a gateway can
    /// start while Redis is down) and remade after Redis comes back. Must run inside a Tokio
    /// runtime. Errors: [`SharedError::BadUrl`], [`SharedError::BadInput`] (prefix, replica id,
    /// a zero timeout), [`SharedError::NoRuntime`].
    pub fn new(config: SharedConfig) -> Result<Self, SharedError> {
        let url = redact_url(&config.url);
        let prefix_ok = config
            .prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if config.prefix.is_empty() || !prefix_ok {
            return Err(bad(
                "prefix",
                format!("`{}`: use letters, digits, `_`, `-` and `.`", config.prefix),
            ));
        }
        if let Some(r) = &config.replica_id {
            if r.is_empty() || r.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(bad("replica_id", format!("`{r}`: empty or has spaces")));
            }
        }
        if config.op_timeout.is_zero() || config.retry_after.is_zero() {
            return Err(bad(
                "timeouts",
                "op_timeout and retry_after must be above zero",
            ));
        }
        // The connection manager spawns a task as it is made.
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(SharedError::NoRuntime { url });
        }
        if config.url.starts_with("rediss:") {
            // The Redis client builds its TLS settings on rustls' process-wide provider, which
            // rustls cannot pick by itself when no or both providers are built in (it panics):
            // install ring, the one reqwest already uses, unless one is installed.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let client =
            redis::Client::open(config.url.as_str()).map_err(|source| SharedError::BadUrl {
                url: url.clone(),
                source,
            })?;
        // One quick retry inside an operation; the next operation starts a new attempt. Long
        // retry loops would hold requests past `op_timeout`.
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.op_timeout))
            .set_response_timeout(Some(config.op_timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(20))
            .set_max_delay(config.retry_after);
        let conn = ConnectionManager::new_lazy_with_config(client, manager).map_err(|source| {
            SharedError::Redis {
                url: url.clone(),
                op: "open",
                source,
            }
        })?;
        // A random tag per instance: a replica restarted under the same name must not reuse the
        // ids of reservations its previous life left open.
        let tag: u64 = rand::random();
        let id_root = match &config.replica_id {
            Some(r) => format!("{r}.{tag:016x}."),
            None => format!("{tag:016x}."),
        };
        Ok(SharedStore {
            conn,
            url,
            key_root: format!("tandem:{}:budget:", config.prefix),
            root: format!("tandem:{}:", config.prefix),
            id_root,
            next_id: AtomicU64::new(0),
            op_timeout: config.op_timeout,
            retry_after: config.retry_after,
            key_margin_s: config.key_margin.as_secs(),
            epoch: Instant::now(),
            down_until_ms: AtomicU64::new(0),
            scripts: Scripts {
                reserve: Script::new(RESERVE),
                close: Script::new(CLOSE),
                add: Script::new(ADD),
                spent: Script::new(SPENT),
            },
        })
    }

    /// The store's URL, without its password.
    /// Whether the last operation failed to reach Redis (operations then fail at once until
    /// `retry_after` has passed).
    pub fn is_down(&self) -> bool {
        self.down_until_ms.load(Ordering::Relaxed) != 0
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The key of a route's window hash (its open set is this plus `:open`).
    pub fn window_key(&self, route: &str, window_start: u64) -> String {
        format!("{}{route}:{window_start}", self.key_root)
    }

    /// Checks that Redis answers (e.g. at start, to log whether the store is there).
    pub async fn ping(&self) -> Result<(), SharedError> {
        let mut conn = self.conn.clone();
        let pong: String = self
            .guarded("ping", redis::cmd("PING").query_async(&mut conn))
            .await?;
        if pong != "PONG" {
            return Err(self.reply("ping", format!("`{pong}`")));
        }
        Ok(())
    }

    /// Reserves one call costing at most `estimate` micro-dollars in `route`'s `window`, unless
    /// that would pass `limits` (open reservations of every replica count at their estimate).
    /// `hold`: how long the reservation may stay open before it is taken for a dead replica's
    /// and reclaimed as spent — longer than any call can last. Errors: [`SharedError::BadInput`]
    /// (empty route, amounts over [`MAX_AMOUNT`], zero hold), or the store's (see
    /// [`SharedError::is_unavailable`]).
    pub async fn reserve(
        &self,
        route: &str,
        window: Window,
        estimate: Micros,
        limits: BudgetLimits,
        hold: Duration,
    ) -> Result<Reserve, SharedError> {
        check_route(route)?;
        check_amount("estimate", estimate)?;
        check_amount("max_calls", limits.max_calls.unwrap_or(0))?;
        check_amount("max_micros", limits.max_micros.unwrap_or(0))?;
        let hold_ms = u64::try_from(hold.as_millis()).unwrap_or(u64::MAX);
        if hold_ms == 0 {
            return Err(bad("hold", "must be at least 1 ms"));
        }
        let hold_ms = hold_ms.min(MAX_AMOUNT);
        let id = format!(
            "{}{}",
            self.id_root,
            self.next_id.fetch_add(1, Ordering::Relaxed)
        );
        let key = self.window_key(route, window.start_s);
        let mut inv = self.scripts.reserve.prepare_invoke();
        inv.key(&key)
            .key(format!("{key}:open"))
            .arg(&id)
            .arg(estimate)
            .arg(cap_arg(limits.max_calls))
            .arg(cap_arg(limits.max_micros))
            .arg(hold_ms)
            .arg(window.expire_at(self.key_margin_s))
            .arg(self.key_margin_s);
        let mut conn = self.conn.clone();
        let answer = self.guarded("reserve", inv.invoke_async(&mut conn)).await;
        let (code, calls, micros): (i64, u64, u64) = match answer {
            Ok(v) => v,
            Err(e) => {
                if matches!(e, SharedError::Timeout { .. }) {
                    // The script may still run once Redis answers: take it back, so a call
                    // that was never made is not counted.
                    self.release_later(SharedReservation {
                        id,
                        route: route.to_string(),
                        window_start: window.start_s,
                        estimate,
                    });
                }
                return Err(e);
            }
        };
        let totals = Totals { calls, micros };
        match code {
            1 => Ok(Reserve::Reserved {
                reservation: SharedReservation {
                    id,
                    route: route.to_string(),
                    window_start: window.start_s,
                    estimate,
                },
                totals,
            }),
            0 => Ok(Reserve::Refused {
                cap: Cap::Calls,
                totals,
            }),
            -1 => Ok(Reserve::Refused {
                cap: Cap::Micros,
                totals,
            }),
            other => Err(self.reply("reserve", format!("code {other}"))),
        }
    }

    /// Replaces the reservation's estimate by `actual` micro-dollars; the call stays counted. An
    /// `actual` above the estimate can take the window past its dollar cap by the difference
    /// (the money is spent); later reservations see it and are refused.
    pub async fn settle(
        &self,
        reservation: &SharedReservation,
        actual: Micros,
    ) -> Result<Closed, SharedError> {
        check_amount("actual", actual)?;
        self.close("settle", reservation, actual).await
    }

    /// Gives the reservation back: the call was not made (or cost nothing and must not count).
    pub async fn release(&self, reservation: &SharedReservation) -> Result<Closed, SharedError> {
        self.close("release", reservation, 0).await
    }

    /// Releases `r` in the background, trying every second for a minute: for a reserve that
    /// timed out, whose script Redis may still run. Sent on the same connection, the release
    /// runs after it; on a reservation that never landed it changes nothing.
    fn release_later(&self, r: SharedReservation) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let conn = self.conn.clone();
        let script = self.scripts.close.clone();
        let key = self.window_key(&r.route, r.window_start);
        let timeout = self.op_timeout;
        rt.spawn(async move {
            for _ in 0..60 {
                let mut inv = script.prepare_invoke();
                inv.key(&key)
                    .key(format!("{key}:open"))
                    .arg(&r.id)
                    .arg("release")
                    .arg(0);
                let mut c = conn.clone();
                let done: Result<RedisResult<(i64, u64, u64)>, _> =
                    tokio::time::timeout(timeout, inv.invoke_async(&mut c)).await;
                if matches!(done, Ok(Ok(_))) {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }

    async fn close(
        &self,
        op: &'static str,
        r: &SharedReservation,
        actual: Micros,
    ) -> Result<Closed, SharedError> {
        let key = self.window_key(&r.route, r.window_start);
        let mut inv = self.scripts.close.prepare_invoke();
        inv.key(&key)
            .key(format!("{key}:open"))
            .arg(&r.id)
            .arg(op)
            .arg(actual);
        let mut conn = self.conn.clone();
        let (code, calls, micros): (i64, u64, u64) =
            self.guarded(op, inv.invoke_async(&mut conn)).await?;
        let totals = Totals { calls, micros };
        match code {
            1 => Ok(Closed::Applied(totals)),
            0 => Ok(Closed::NotOpen(totals)),
            other => Err(self.reply(op, format!("code {other}"))),
        }
    }

    /// Adds `calls` and `micros` spent without a reservation in this store — a replica's local
    /// share spent while Redis was down ([`super::LocalShare::take_unsynced`]) — to `route`'s
    /// `window`, whatever the caps (the money is spent). Returns the window's totals after it.
    pub async fn add_spent(
        &self,
        route: &str,
        window: Window,
        calls: u64,
        micros: Micros,
    ) -> Result<Totals, SharedError> {
        check_route(route)?;
        check_amount("calls", calls)?;
        check_amount("micros", micros)?;
        let key = self.window_key(route, window.start_s);
        let mut inv = self.scripts.add.prepare_invoke();
        inv.key(&key)
            .arg(calls)
            .arg(micros)
            .arg(window.expire_at(self.key_margin_s))
            .arg(self.key_margin_s);
        let mut conn = self.conn.clone();
        let (calls, micros): (u64, u64) = self
            .guarded("add_spent", inv.invoke_async(&mut conn))
            .await?;
        Ok(Totals { calls, micros })
    }

    /// What `route`'s window starting at `window_start` counts (all zero for a window nobody
    /// used, or one that expired).
    pub async fn spent(&self, route: &str, window_start: u64) -> Result<SharedSpent, SharedError> {
        check_route(route)?;
        let key = self.window_key(route, window_start);
        let mut inv = self.scripts.spent.prepare_invoke();
        inv.key(&key).key(format!("{key}:open"));
        let mut conn = self.conn.clone();
        let (calls, micros, open, lapsed): (u64, u64, u64, u64) =
            self.guarded("spent", inv.invoke_async(&mut conn)).await?;
        Ok(SharedSpent {
            calls,
            micros,
            open,
            lapsed,
        })
    }

    pub(super) fn reply(&self, op: &'static str, detail: String) -> SharedError {
        SharedError::Reply {
            url: self.url.clone(),
            op,
            detail,
        }
    }

    fn now_ms(&self) -> u64 {
        // +1: 0 stands for "up".
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    /// Runs one request to Redis within `op_timeout`, unless Redis failed within `retry_after`.
    pub(super) async fn guarded<T: FromRedisValue>(
        &self,
        op: &'static str,
        request: impl Future<Output = RedisResult<T>>,
    ) -> Result<T, SharedError> {
        let until = self.down_until_ms.load(Ordering::Relaxed);
        let now = self.now_ms();
        if until > now {
            return Err(SharedError::Down {
                url: self.url.clone(),
                op,
                retry_in: Duration::from_millis(until - now),
            });
        }
        let mark_down = || {
            let until = self.now_ms().saturating_add(
                u64::try_from(self.retry_after.as_millis()).unwrap_or(u64::MAX / 2),
            );
            self.down_until_ms.store(until, Ordering::Relaxed);
        };
        match tokio::time::timeout(self.op_timeout, request).await {
            Err(_) => {
                mark_down();
                Err(SharedError::Timeout {
                    url: self.url.clone(),
                    op,
                    timeout: self.op_timeout,
                })
            }
            Ok(Err(source)) => {
                if is_unreachable(&source) {
                    mark_down();
                }
                Err(SharedError::Redis {
                    url: self.url.clone(),
                    op,
                    source,
                })
            }
            Ok(Ok(v)) => {
                self.down_until_ms.store(0, Ordering::Relaxed);
                Ok(v)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_align_like_the_local_budget() {
        assert_eq!(
            Window::containing(1000, Some(60)),
            Window {
                start_s: 960,
                len_s: Some(60)
            }
        );
        assert_eq!(Window::containing(1020, Some(60)).start_s, 1020);
        assert_eq!(Window::containing(1000, None).start_s, 0);
        // A zero length (refused by the config) must not divide by zero here.
        assert_eq!(Window::containing(1000, Some(0)).start_s, 0);
        assert_eq!(
            Window::containing(1000, Some(60)).expire_at(600),
            960 + 60 + 600
        );
        assert_eq!(Window::containing(1000, None).expire_at(600), 0);
    }

    #[test]
    fn opening_needs_a_runtime_and_a_sane_config() {
        let e = SharedStore::new(SharedConfig::new("redis://:pw@127.0.0.1:1", "t")).unwrap_err();
        assert!(matches!(e, SharedError::NoRuntime { .. }), "{e}");
        assert!(!e.to_string().contains("pw"), "{e}");
    }

    #[tokio::test]
    async fn bad_settings_and_inputs_are_refused_before_any_io() {
        for (url, prefix) in [
            ("redis://127.0.0.1:1", ""),
            ("redis://127.0.0.1:1", "a:b"),
            ("redis://127.0.0.1:1", "a b"),
            ("http://127.0.0.1:1", "t"),
            ("redis://127.0.0.1:notaport", "t"),
        ] {
            let e = SharedStore::new(SharedConfig::new(url, prefix)).unwrap_err();
            assert!(
                matches!(e, SharedError::BadInput { .. } | SharedError::BadUrl { .. }),
                "{url} {prefix}: {e}"
            );
        }
        // Port 1: nothing listens; every case below must fail before trying it.
        let b = SharedStore::new(SharedConfig::new("redis://127.0.0.1:1", "t")).unwrap();
        let w = Window::containing(1000, Some(60));
        let hold = Duration::from_secs(60);
        let none = BudgetLimits {
            max_calls: None,
            max_micros: None,
        };
        let cases = [
            ("", 1, none, hold),
            ("r", MAX_AMOUNT + 1, none, hold),
            (
                "r",
                1,
                BudgetLimits {
                    max_calls: None,
                    max_micros: Some(u64::MAX),
                },
                hold,
            ),
            ("r", 1, none, Duration::ZERO),
        ];
        for (route, estimate, limits, hold) in cases {
            let e = b
                .reserve(route, w, estimate, limits, hold)
                .await
                .unwrap_err();
            assert!(matches!(e, SharedError::BadInput { .. }), "{e}");
            assert!(!e.is_unavailable());
        }
        let e = b.add_spent("r", w, 1, u64::MAX).await.unwrap_err();
        assert!(matches!(e, SharedError::BadInput { .. }), "{e}");
    }

    #[tokio::test]
    async fn keys_and_ids_are_namespaced_and_unique() {
        let mut c = SharedConfig::new("redis://127.0.0.1:1", "prod-eu");
        c.replica_id = Some("gw-1".into());
        let a = SharedStore::new(c.clone()).unwrap();
        let b = SharedStore::new(c).unwrap();
        assert_eq!(
            a.window_key("tandem", 1020),
            "tandem:prod-eu:budget:tandem:1020"
        );
        assert!(a.id_root.starts_with("gw-1."));
        assert_ne!(
            a.id_root, b.id_root,
            "two lives of one replica share no ids"
        );
    }

    #[tokio::test]
    async fn an_absent_store_fails_fast_then_is_not_retried_at_once() {
        let mut c = SharedConfig::new("redis://127.0.0.1:1", "t");
        c.retry_after = Duration::from_secs(30);
        let b = SharedStore::new(c).unwrap();
        let t = Instant::now();
        let e = b.spent("r", 0).await.unwrap_err();
        assert!(e.is_unavailable(), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        let e = b.spent("r", 0).await.unwrap_err();
        assert!(matches!(e, SharedError::Down { .. }), "{e}");
        assert!(e.to_string().contains("redis://127.0.0.1:1"), "{e}");
    }
}
