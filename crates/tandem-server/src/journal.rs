//! Crash-safe budget spend: an append-only journal per capped route, `<state_dir>/<route>.journal`.
//!
//! Every large call's reservation is written here, and flushed to disk, before the call it pays
//! for is made ([`crate::budget::Held::durable`]); its settlement (the real cost) or release (the
//! call failed) follows without waiting. After a crash — `kill -9`, power loss — the journal is
//! replayed: a settled reservation counts its real cost, a released one nothing, and one still
//! open counts as a call at its estimate (what it cost is unknown; the upstream may have billed
//! it). So a restart never allows more than the cap: every call that reached an upstream was on
//! disk first. Losing a settle or release record only over-counts.
//!
//! **Group commit.** One writer thread per journal takes every record queued since its last
//! write, writes them with one `write`, calls `fdatasync` once, then wakes every reservation of
//! that batch: 64 concurrent reservations cost about one disk flush, not 64. A batch of
//! settlements and releases alone is written but not flushed (nobody waits on it; the next
//! reservation's flush covers it).
//!
//! **Format.** A header — magic `TNDMJRNL`, version (u32), the route's name (u16 length, bytes),
//! the length of the compacted records (u64), xxh3-64 of the header's fields — then records: the
//! compacted ones, then those appended since. Each is a kind byte, fixed little-endian fields and
//! the xxh3-64 of kind and fields:
//! reserve (id, window start, estimate), settle (id, actual), release (id), and spent (window
//! start, calls, micro-dollars: a compacted total). Money is micro-dollars; window starts are
//! seconds since the Unix epoch (0 for a budget without a window).
//!
//! **Torn and corrupt records.** A crash can cut the last batch short (its `fdatasync` never
//! returned, so no call it held was made). The first appended record that fails its checksum is
//! a torn tail when it is the file's last record or only zeros follow it, and is ignored with what
//! follows; anything else — a bad header, a bad compacted record (those were flushed before the
//! file was renamed into place, so no crash can tear them) — is corruption: the journal is refused and its route serves with its
//! budget closed, the file kept, until an operator acts (as for a bad state file).
//!
//! **Compaction.** When the route's state is saved (every `persist_interval_s`, and at shutdown)
//! and whenever the journal has grown past [`COMPACT_BYTES`], it is rewritten atomically (new
//! file, fsync, rename, fsync of the directory) as the spent total of the current window (and any
//! later one) plus the reservations still open. At start, reservations left open by the dead
//! process are folded into the total as calls at their estimate, and spend of older windows is
//! dropped.
//!
//! **Source of truth.** When a route's journal exists, it alone says what the route spent: the
//! `budget` field of its state file is ignored (the state file says it is stale: its
//! `spend_journal` flag is set once the journal exists). The state file's spend only seeds a
//! journal that does not exist yet (an upgrade, or a cap newly set); a missing journal whose state
//! file says it existed is refused, never reset. Routes without a cap (`max_calls`, `max_usd`)
//! keep no journal: they have nothing to pass.

use crate::budget::Spent;
use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use tandem_core::Micros;
use thiserror::Error;
use xxhash_rust::xxh3::xxh3_64;

const MAGIC: &[u8; 8] = b"TNDMJRNL";
const VERSION: u32 = 1;

/// The journal compacts itself once its appended records pass this many bytes, so a long
/// `persist_interval_s` under heavy load cannot grow it without bound (about 70k calls).
pub const COMPACT_BYTES: u64 = 4 << 20;

const RESERVE: u8 = 1;
const SETTLE: u8 = 2;
const RELEASE: u8 = 3;
const SPENT: u8 = 4;
const SUM: usize = 8;

/// Why a journal could not be read, written or trusted. Every message names the file.
#[derive(Debug, Clone, Error, PartialEq)]
pub enum JournalError {
    #[error("{path}: {what}: {why}")]
    Io {
        path: String,
        what: &'static str,
        why: String,
    },
    #[error("{path}: corrupt at byte {offset}: {why}; restore it from a backup, or move it and the route's state file away to start the route afresh (its spend forgotten)")]
    Corrupt {
        path: String,
        offset: usize,
        why: String,
    },
    #[error("{path} is missing, but the route's state file says its spend is kept there; restore it, or move the state file away too to start the route afresh")]
    Missing { path: String },
    /// The writer thread has stopped (the gateway is shutting down).
    #[error("{path}: the journal is closed")]
    Closed { path: String },
}

/// One journal record. Ids are unique within one process's life of the journal (a restart folds
/// every open reservation into the total, so ids start again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    /// A call is about to be made, reserving `estimate` micro-dollars in the window starting at
    /// `window_start` (seconds since the epoch).
    Reserve {
        id: u64,
        window_start: u64,
        estimate: Micros,
    },
    /// The call cost `actual` micro-dollars.
    Settle { id: u64, actual: Micros },
    /// The call was not made.
    Release { id: u64 },
    /// A compacted total: `calls` finished calls costing `micros` in the window.
    Spent {
        window_start: u64,
        calls: u64,
        micros: Micros,
    },
}

impl Record {
    fn fields(kind: u8) -> Option<usize> {
        match kind {
            RESERVE | SPENT => Some(3),
            SETTLE => Some(2),
            RELEASE => Some(1),
            _ => None,
        }
    }

    /// Size on disk of a record of `kind`: kind byte, fields, checksum.
    fn size(kind: u8) -> Option<usize> {
        Self::fields(kind).map(|n| 1 + 8 * n + SUM)
    }

    /// Appends the record's bytes to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        let (kind, fields): (u8, &[u64]) = match *self {
            Record::Reserve {
                id,
                window_start,
                estimate,
            } => (RESERVE, &[id, window_start, estimate]),
            Record::Settle { id, actual } => (SETTLE, &[id, actual]),
            Record::Release { id } => (RELEASE, &[id]),
            Record::Spent {
                window_start,
                calls,
                micros,
            } => (SPENT, &[window_start, calls, micros]),
        };
        out.push(kind);
        for f in fields {
            out.extend_from_slice(&f.to_le_bytes());
        }
        let sum = xxh3_64(&out[start..]);
        out.extend_from_slice(&sum.to_le_bytes());
    }

    /// Decodes the record at the start of `b`: None when it is incomplete, of an unknown kind or
    /// fails its checksum.
    fn decode(b: &[u8]) -> Option<(Record, usize)> {
        let kind = *b.first()?;
        let size = Self::size(kind)?;
        let rec = b.get(..size)?;
        let (body, sum) = rec.split_at(size - SUM);
        if u64::from_le_bytes(sum.try_into().ok()?) != xxh3_64(body) {
            return None;
        }
        let f = |i: usize| -> Option<u64> {
            Some(u64::from_le_bytes(
                body.get(1 + 8 * i..9 + 8 * i)?.try_into().ok()?,
            ))
        };
        let r = match kind {
            RESERVE => Record::Reserve {
                id: f(0)?,
                window_start: f(1)?,
                estimate: f(2)?,
            },
            SETTLE => Record::Settle {
                id: f(0)?,
                actual: f(1)?,
            },
            RELEASE => Record::Release { id: f(0)? },
            _ => Record::Spent {
                window_start: f(0)?,
                calls: f(1)?,
                micros: f(2)?,
            },
        };
        Some((r, size))
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Tally {
    calls: u64,
    micros: Micros,
}

/// Spend as the journal's records say: finished calls per window, and reservations still open.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Ledger {
    closed: BTreeMap<u64, Tally>,
    /// Open reservation id → (window start, estimate).
    open: HashMap<u64, (u64, Micros)>,
}

impl Ledger {
    /// A ledger holding `spent` as a finished total (a state file's spend seeding a new journal).
    pub fn seeded(spent: Spent) -> Ledger {
        let mut l = Ledger::default();
        if spent.calls > 0 || spent.micros > 0 {
            l.closed.insert(
                spent.window_start,
                Tally {
                    calls: spent.calls,
                    micros: spent.micros,
                },
            );
        }
        l
    }

    /// Applies one record. A settle or release of an unknown id is ignored: its reservation was
    /// in a window compaction dropped. An id reserved twice is an error (a journal whose
    /// checksums hold cannot have one).
    pub fn apply(&mut self, r: Record) -> Result<(), String> {
        match r {
            Record::Reserve {
                id,
                window_start,
                estimate,
            } => {
                if self.open.insert(id, (window_start, estimate)).is_some() {
                    return Err(format!("reservation {id} is reserved twice"));
                }
            }
            Record::Settle { id, actual } => {
                if let Some((w, _)) = self.open.remove(&id) {
                    let t = self.closed.entry(w).or_default();
                    t.calls = t.calls.saturating_add(1);
                    t.micros = t.micros.saturating_add(actual);
                }
            }
            Record::Release { id } => {
                self.open.remove(&id);
            }
            Record::Spent {
                window_start,
                calls,
                micros,
            } => {
                let t = self.closed.entry(window_start).or_default();
                t.calls = t.calls.saturating_add(calls);
                t.micros = t.micros.saturating_add(micros);
            }
        }
        Ok(())
    }

    /// Spend in the window starting at `window_start`: finished calls, and open reservations at
    /// their estimate.
    pub fn spent(&self, window_start: u64) -> Spent {
        let t = self.closed.get(&window_start).copied().unwrap_or_default();
        let (calls, micros) = self
            .open
            .values()
            .filter(|(w, _)| *w == window_start)
            .fold((t.calls, t.micros), |(c, m), (_, e)| {
                (c.saturating_add(1), m.saturating_add(*e))
            });
        Spent {
            window_start,
            calls,
            micros,
        }
    }

    /// Counts every open reservation as a finished call at its estimate: at start, the process
    /// that made them is gone, and what they cost is unknown.
    pub fn fold_open(&mut self) {
        for (_, (w, e)) in self.open.drain() {
            let t = self.closed.entry(w).or_default();
            t.calls = t.calls.saturating_add(1);
            t.micros = t.micros.saturating_add(e);
        }
    }

    /// Drops the spend of windows that started before `window_start`: they no longer count.
    pub fn retain_from(&mut self, window_start: u64) {
        self.closed.retain(|w, _| *w >= window_start);
        self.open.retain(|_, (w, _)| *w >= window_start);
    }

    /// The records that rebuild this ledger.
    pub fn snapshot(&self) -> Vec<Record> {
        let mut out: Vec<Record> = self
            .closed
            .iter()
            .map(|(w, t)| Record::Spent {
                window_start: *w,
                calls: t.calls,
                micros: t.micros,
            })
            .collect();
        let mut open: Vec<_> = self.open.iter().collect();
        open.sort_unstable_by_key(|(id, _)| **id);
        out.extend(open.into_iter().map(|(id, (w, e))| Record::Reserve {
            id: *id,
            window_start: *w,
            estimate: *e,
        }));
        out
    }

    /// Open reservations.
    pub fn open_count(&self) -> usize {
        self.open.len()
    }
}

/// A journal read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replayed {
    pub ledger: Ledger,
    /// Bytes of a torn last record (or zero-filled tail) that were ignored.
    pub torn: usize,
}

/// A journal's header; `snapshot` is the length in bytes of the compacted records that follow
/// it (written whole before the file was renamed into place, so they can never be torn).
fn header(route: &str, snapshot: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(40 + route.len());
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&VERSION.to_le_bytes());
    // Route names are short; a longer one is cut in the header only (it is a check, not a key).
    let name = &route.as_bytes()[..route.len().min(u16::MAX as usize)];
    h.extend_from_slice(&(name.len() as u16).to_le_bytes());
    h.extend_from_slice(name);
    h.extend_from_slice(&snapshot.to_le_bytes());
    let sum = xxh3_64(&h[MAGIC.len()..]);
    h.extend_from_slice(&sum.to_le_bytes());
    h
}

/// Reads a journal's bytes (`path` only names it in errors): the spend it records, or why it
/// cannot be trusted.
pub fn replay(bytes: &[u8], path: &Path, route: &str) -> Result<Replayed, JournalError> {
    let corrupt = |offset: usize, why: String| JournalError::Corrupt {
        path: path.display().to_string(),
        offset,
        why,
    };
    if bytes.get(..MAGIC.len()) != Some(MAGIC.as_slice()) {
        return Err(corrupt(0, "not a tandem spend journal".into()));
    }
    let u = |at: usize, n: usize| bytes.get(at..at.checked_add(n)?);
    let le = |at: usize| -> Option<u64> {
        let b = u(at, 8)?;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    };
    let version = u(8, 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or_else(|| corrupt(8, "truncated header".into()))?;
    if version != VERSION {
        return Err(corrupt(
            8,
            format!("unknown version {version} (this tandem reads version {VERSION})"),
        ));
    }
    let name_len = u(12, 2)
        .and_then(|b| b.try_into().ok())
        .map(u16::from_le_bytes)
        .ok_or_else(|| corrupt(12, "truncated header".into()))? as usize;
    let name_end = 14 + name_len;
    let end = name_end + 8;
    let (name, snapshot, sum) = match (u(14, name_len), le(name_end), le(end)) {
        (Some(n), Some(s), Some(c)) => (n, s, c),
        _ => return Err(corrupt(12, "truncated header".into())),
    };
    if sum != xxh3_64(&bytes[MAGIC.len()..end]) {
        return Err(corrupt(0, "the header fails its checksum".into()));
    }
    let expected = &route.as_bytes()[..route.len().min(u16::MAX as usize)];
    if name != expected {
        return Err(corrupt(
            14,
            format!(
                "it is route `{}`'s journal, not route `{route}`'s",
                String::from_utf8_lossy(name)
            ),
        ));
    }
    let start = end + SUM;
    // Checked before it is used: a lying length cannot reach past the file.
    let snapshot_end = usize::try_from(snapshot)
        .ok()
        .and_then(|n| start.checked_add(n))
        .filter(|e| *e <= bytes.len())
        .ok_or_else(|| {
            corrupt(
                name_end,
                format!(
                    "its compacted part claims {snapshot} bytes but {} follow the header",
                    bytes.len().saturating_sub(start)
                ),
            )
        })?;
    let mut ledger = Ledger::default();
    let mut at = start;
    while at < bytes.len() {
        let rest = &bytes[at..];
        match Record::decode(rest) {
            Some((r, n)) if at + n <= snapshot_end || at >= snapshot_end => {
                ledger.apply(r).map_err(|why| corrupt(at, why))?;
                at += n;
            }
            _ if at < snapshot_end => {
                return Err(corrupt(
                    at,
                    "a compacted record fails its checksum".to_string(),
                ));
            }
            _ => {
                // The first bad appended record: a torn tail if nothing but zeros follows it, or
                // if it is cut short at the file's end (the last, unflushed batch). A whole last
                // record that fails its checksum is refused, not ignored: it may be a flushed
                // reservation that rotted, and ignoring it could pass the cap.
                let last = match Record::size(rest[0]) {
                    Some(size) => rest.len() < size,
                    None => rest.len() < Record::size(RELEASE).unwrap_or(0),
                };
                if last || rest.iter().all(|&b| b == 0) {
                    return Ok(Replayed {
                        ledger,
                        torn: rest.len(),
                    });
                }
                return Err(corrupt(
                    at,
                    format!(
                        "a record fails its checksum (kind {}) with {} more bytes after it",
                        rest[0],
                        rest.len()
                    ),
                ));
            }
        }
    }
    Ok(Replayed { ledger, torn: 0 })
}

/// The file a route's journal lives in.
pub fn journal_path(dir: &Path, route: &str) -> PathBuf {
    dir.join(format!("{}.journal", crate::persist::file_stem(route)))
}

fn io(path: &Path, what: &'static str, e: impl std::fmt::Display) -> JournalError {
    JournalError::Io {
        path: path.display().to_string(),
        what,
        why: e.to_string(),
    }
}

/// What the writer has done so far, for reservations waiting on it.
#[derive(Debug, Clone, Default)]
struct Outcome {
    /// Every record with a sequence number up to this one has been written (or has failed).
    processed: u64,
    /// Every record up to this one is on disk (written and flushed). Only a whole rewrite
    /// recovers from a failed write, so this is always a prefix; reservations are only ever in
    /// flushed batches, so one whose batch was processed is on disk exactly when it is at or
    /// below this.
    durable: u64,
    /// Why the last failed write failed.
    error: Option<Arc<str>>,
    /// The writer has stopped: records after `processed` will never be written.
    closed: bool,
}

#[derive(Default)]
struct Queue {
    records: Vec<Record>,
    /// Sequence number of the last record queued.
    seq: u64,
    compact: Vec<mpsc::Sender<Result<(), JournalError>>>,
    stop: bool,
}

struct Inner {
    route: String,
    path: PathBuf,
    window_s: Option<u64>,
    queue: Mutex<Queue>,
    wake: Condvar,
    outcome: tokio::sync::watch::Sender<Outcome>,
    next_id: AtomicU64,
    /// Disk flushes (appends and rewrites) so far, for measurements and tests.
    syncs: AtomicU64,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // The queue is only pushed to and swapped out whole; a panic cannot leave it half-done.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, r: Record) -> u64 {
        let mut q = self.lock();
        q.records.push(r);
        q.seq += 1;
        let seq = q.seq;
        drop(q);
        self.wake.notify_one();
        seq
    }

    fn window_start(&self, now: u64) -> u64 {
        match self.window_s {
            Some(len) if len > 0 => now - now % len,
            _ => 0,
        }
    }
}

/// A reservation's place in its route's journal.
pub struct Ticket {
    inner: Arc<Inner>,
    id: u64,
    seq: u64,
}

impl Ticket {
    /// Resolves once the reserve record is on disk; the error says why it never will be.
    pub async fn durable(&self) -> Result<(), JournalError> {
        let mut rx = self.inner.outcome.subscribe();
        let seq = self.seq;
        let o = rx
            .wait_for(|o| o.processed >= seq || o.closed)
            .await
            .map(|o| o.clone())
            .map_err(|_| self.closed())?;
        if o.durable >= seq {
            return Ok(());
        }
        match o.error {
            Some(why) if o.processed >= seq => Err(JournalError::Io {
                path: self.inner.path.display().to_string(),
                what: "cannot write",
                why: why.to_string(),
            }),
            _ => Err(self.closed()),
        }
    }

    fn closed(&self) -> JournalError {
        JournalError::Closed {
            path: self.inner.path.display().to_string(),
        }
    }

    /// Appends the settlement (not waited for: losing it only over-counts).
    pub fn settle(&self, actual: Micros) {
        self.inner.push(Record::Settle {
            id: self.id,
            actual,
        });
    }

    /// Appends the release (not waited for).
    pub fn release(&self) {
        self.inner.push(Record::Release { id: self.id });
    }

    /// The route whose journal this is.
    pub fn route(&self) -> &str {
        &self.inner.route
    }
}

/// A route's open spend journal and its writer thread.
pub struct Journal {
    inner: Arc<Inner>,
    thread: Option<JoinHandle<()>>,
}

/// What [`Journal::open`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    /// Spend of the current window, to restore into the route's budget.
    pub spent: Spent,
    /// Reservations the last process left open, now counted as calls at their estimate.
    pub folded: usize,
    /// Bytes of a torn tail ignored.
    pub torn: usize,
}

impl Journal {
    /// Opens route `route`'s journal in `dir` at time `now` (seconds since the epoch): replays
    /// it (or, when there is none, starts one from `seed`, the state file's spend — unless
    /// `must_exist`: the state file says there was one), folds open reservations in, drops older
    /// windows, rewrites it compacted, and starts its writer.
    ///
    /// Errors: the file cannot be read or written ([`JournalError::Io`]), fails its checks
    /// ([`JournalError::Corrupt`]), or is missing when it must exist ([`JournalError::Missing`]).
    pub fn open(
        dir: &Path,
        route: &str,
        window_s: Option<u64>,
        seed: Spent,
        must_exist: bool,
        now: u64,
    ) -> Result<(Journal, Opened), JournalError> {
        let path = journal_path(dir, route);
        let (mut ledger, torn) = match std::fs::read(&path) {
            Ok(bytes) => {
                let r = replay(&bytes, &path, route)?;
                (r.ledger, r.torn)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if must_exist {
                    return Err(JournalError::Missing {
                        path: path.display().to_string(),
                    });
                }
                (Ledger::seeded(seed), 0)
            }
            Err(e) => return Err(io(&path, "cannot read", e)),
        };
        let folded = ledger.open_count();
        ledger.fold_open();
        let (tx, _) = tokio::sync::watch::channel(Outcome::default());
        let inner = Arc::new(Inner {
            route: route.to_string(),
            path: path.clone(),
            window_s,
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            outcome: tx,
            next_id: AtomicU64::new(1),
            syncs: AtomicU64::new(0),
        });
        let current = inner.window_start(now);
        ledger.retain_from(current);
        let spent = ledger.spent(current);
        std::fs::create_dir_all(dir).map_err(|e| io(dir, "cannot create", e))?;
        let mut w = Writer {
            inner: inner.clone(),
            dir: dir.to_path_buf(),
            ledger,
            file: None,
            appended: 0,
            poisoned: None,
            buf: Vec::new(),
        };
        w.rewrite(now)?;
        let thread = std::thread::Builder::new()
            .name(format!("tandem-journal-{route}"))
            .spawn(move || w.run())
            .map_err(|e| io(&path, "cannot start its writer", e))?;
        Ok((
            Journal {
                inner,
                thread: Some(thread),
            },
            Opened {
                spent,
                folded,
                torn,
            },
        ))
    }

    /// Queues a reserve record for a call in the window starting at `window_start` costing at
    /// most `estimate` micro-dollars; [`Ticket::durable`] says when it is on disk.
    pub fn reserve(&self, window_start: u64, estimate: Micros) -> Ticket {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let seq = self.inner.push(Record::Reserve {
            id,
            window_start,
            estimate,
        });
        Ticket {
            inner: self.inner.clone(),
            id,
            seq,
        }
    }

    /// Rewrites the journal as a snapshot, after what was queued before it is written; blocks
    /// until done. Errors: the new file could not be written (the old one is then untouched).
    pub fn compact(&self) -> Result<(), JournalError> {
        let (tx, rx) = mpsc::channel();
        self.inner.lock().compact.push(tx);
        self.inner.wake.notify_one();
        rx.recv().map_err(|_| JournalError::Closed {
            path: self.inner.path.display().to_string(),
        })?
    }

    /// The journal's file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Disk flushes made so far (each batch of records costs one; so does each compaction).
    pub fn syncs(&self) -> u64 {
        self.inner.syncs.load(Ordering::Relaxed)
    }
}

impl Drop for Journal {
    /// Writes what is queued, then stops the writer.
    fn drop(&mut self) {
        self.inner.lock().stop = true;
        self.inner.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The writer thread's own state.
struct Writer {
    inner: Arc<Inner>,
    dir: PathBuf,
    ledger: Ledger,
    /// Open for appending; None after a failed rewrite.
    file: Option<File>,
    /// Bytes appended since the last rewrite.
    appended: u64,
    /// A write failed: the file's tail is unknown until a rewrite succeeds.
    poisoned: Option<String>,
    buf: Vec<u8>,
}

impl Writer {
    fn run(mut self) {
        loop {
            let (records, upto, compact, stop) = {
                let mut q = self.inner.lock();
                while q.records.is_empty() && q.compact.is_empty() && !q.stop {
                    q = self.inner.wake.wait(q).unwrap_or_else(|e| e.into_inner());
                }
                (
                    std::mem::take(&mut q.records),
                    q.seq,
                    std::mem::take(&mut q.compact),
                    q.stop,
                )
            };
            let now = crate::gateway::unix_now();
            if !records.is_empty() {
                let res = self.commit(&records, now);
                self.inner.outcome.send_modify(|o| {
                    o.processed = upto;
                    match &res {
                        // An unflushed batch holds no reservation: no one waits on it.
                        Ok(true) => o.durable = upto,
                        Ok(false) => {}
                        Err(e) => o.error = Some(Arc::from(e.to_string())),
                    }
                });
                if let Err(e) = res {
                    tracing::error!(route = %self.inner.route, error = %e, "spend journal write failed: large calls are refused until it can be rewritten");
                }
            }
            if !compact.is_empty() {
                let res = self.rewrite(now);
                for c in compact {
                    let _ = c.send(res.clone());
                }
            }
            if stop {
                self.inner.outcome.send_modify(|o| o.closed = true);
                return;
            }
        }
    }

    /// Writes one batch and, when it holds a reservation, flushes it (one `fdatasync` for the
    /// whole batch). Settlements and releases alone are written without a flush: nobody waits on
    /// them, losing them only over-counts, a process crash keeps them (they are in the kernel),
    /// and the next reservation's flush covers them. After a failure, the whole journal is
    /// rewritten instead. Returns whether everything written is on disk.
    fn commit(&mut self, records: &[Record], now: u64) -> Result<bool, JournalError> {
        self.buf.clear();
        let mut reserves = false;
        for r in records {
            if let Err(why) = self.ledger.apply(*r) {
                // Only this process makes ids, one at a time: cannot happen; logged if it does.
                tracing::error!(route = %self.inner.route, why, "spend journal: record ignored");
            }
            reserves |= matches!(r, Record::Reserve { .. });
            r.encode(&mut self.buf);
        }
        if self.poisoned.is_some() || self.appended >= COMPACT_BYTES {
            return self.rewrite(now).map(|_| true);
        }
        let path = &self.inner.path;
        let res = match self.file.as_mut() {
            Some(f) => f
                .write_all(&self.buf)
                .and_then(|_| if reserves { f.sync_data() } else { Ok(()) })
                .map_err(|e| io(path, "cannot write", e)),
            None => Err(io(path, "cannot write", "the journal is not open")),
        };
        if reserves {
            self.inner.syncs.fetch_add(1, Ordering::Relaxed);
        }
        match res {
            Ok(()) => {
                self.appended += self.buf.len() as u64;
                Ok(reserves)
            }
            Err(e) => {
                self.poisoned = Some(e.to_string());
                Err(e)
            }
        }
    }

    /// Replaces the file by a snapshot of the ledger (new file, fsync, rename, directory fsync).
    /// On success everything applied so far is durable.
    fn rewrite(&mut self, now: u64) -> Result<(), JournalError> {
        let path = self.inner.path.clone();
        let res = self.try_rewrite(&path, now);
        self.inner.syncs.fetch_add(1, Ordering::Relaxed);
        match res {
            Ok(f) => {
                self.file = Some(f);
                self.appended = 0;
                self.poisoned = None;
                let upto = self.inner.outcome.borrow().processed;
                self.inner
                    .outcome
                    .send_modify(|o| o.durable = o.durable.max(upto));
                Ok(())
            }
            Err(e) => {
                self.poisoned = Some(e.to_string());
                Err(e)
            }
        }
    }

    fn try_rewrite(&mut self, path: &Path, now: u64) -> Result<File, JournalError> {
        self.ledger.retain_from(self.inner.window_start(now));
        let mut records = Vec::new();
        for r in self.ledger.snapshot() {
            r.encode(&mut records);
        }
        let mut buf = header(&self.inner.route, records.len() as u64);
        buf.extend_from_slice(&records);
        let tmp = path.with_extension("journal.tmp");
        let mut f = File::create(&tmp).map_err(|e| io(&tmp, "cannot create", e))?;
        f.write_all(&buf)
            .and_then(|_| f.sync_all())
            .map_err(|e| io(&tmp, "cannot write", e))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(|e| io(path, "cannot replace", e))?;
        if let Ok(d) = File::open(&self.dir) {
            // Makes the rename durable; not every platform can sync a directory.
            let _ = d.sync_all();
        }
        OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| io(path, "cannot open", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn spent(window_start: u64, calls: u64, micros: Micros) -> Spent {
        Spent {
            window_start,
            calls,
            micros,
        }
    }

    /// A journal of appended records (nothing compacted).
    fn file(route: &str, records: &[Record]) -> Vec<u8> {
        let mut b = header(route, 0);
        for r in records {
            r.encode(&mut b);
        }
        b
    }

    /// A journal as compaction writes it.
    fn compacted(route: &str, records: &[Record]) -> Vec<u8> {
        let mut body = Vec::new();
        for r in records {
            r.encode(&mut body);
        }
        let mut b = header(route, body.len() as u64);
        b.extend_from_slice(&body);
        b
    }

    fn reserve(id: u64, w: u64, e: Micros) -> Record {
        Record::Reserve {
            id,
            window_start: w,
            estimate: e,
        }
    }

    fn settle(id: u64, a: Micros) -> Record {
        Record::Settle { id, actual: a }
    }

    fn play(b: &[u8]) -> Result<Replayed, JournalError> {
        replay(b, Path::new("r.journal"), "r")
    }

    #[test]
    fn replay_counts_settled_released_and_open_reservations() {
        let cases: Vec<(&str, Vec<Record>, (u64, Micros))> = vec![
            ("empty", vec![], (0, 0)),
            (
                "settled at actual",
                vec![reserve(1, 0, 100), settle(1, 40)],
                (1, 40),
            ),
            (
                "released counts nothing",
                vec![reserve(1, 0, 100), Record::Release { id: 1 }],
                (0, 0),
            ),
            (
                "open counts its estimate",
                vec![reserve(1, 0, 100)],
                (1, 100),
            ),
            (
                "mixed",
                vec![
                    Record::Spent {
                        window_start: 0,
                        calls: 3,
                        micros: 30,
                    },
                    reserve(1, 0, 100),
                    reserve(2, 0, 50),
                    reserve(3, 0, 70),
                    settle(2, 10),
                    Record::Release { id: 3 },
                ],
                (5, 140),
            ),
            (
                "settle of an unknown id is ignored",
                vec![settle(9, 1000), Record::Release { id: 8 }],
                (0, 0),
            ),
            (
                "a settle above the estimate counts what was billed",
                vec![reserve(4, 0, 10), settle(4, 25)],
                (1, 25),
            ),
        ];
        for (what, records, (calls, micros)) in cases {
            let r = play(&file("r", &records)).unwrap();
            assert_eq!(r.torn, 0, "{what}");
            assert_eq!(r.ledger.spent(0), spent(0, calls, micros), "{what}");
        }
    }

    #[test]
    fn an_id_reserved_twice_is_refused() {
        let e = play(&file("r", &[reserve(1, 0, 5), reserve(1, 0, 5)])).unwrap_err();
        assert!(e.to_string().contains("reserved twice"), "{e}");
    }

    #[test]
    fn a_torn_last_record_is_ignored() {
        let good = [reserve(1, 0, 100), settle(1, 40), reserve(2, 0, 70)];
        let full = file("r", &good);
        let before_last = file("r", &good[..2]).len();
        // Cut anywhere inside the last record; garble its last byte; a zero-filled tail.
        let mut cases: Vec<(String, Vec<u8>)> = (before_last + 1..full.len())
            .map(|cut| (format!("cut at {cut}"), full[..cut].to_vec()))
            .collect();
        let mut zeros = file("r", &good[..2]);
        zeros.extend_from_slice(&[0u8; 300]);
        cases.push(("zero-filled tail".into(), zeros));
        let mut junk_kind = file("r", &good[..2]);
        junk_kind.extend_from_slice(&[77u8, 1, 2]);
        cases.push(("a short tail of unknown kind".into(), junk_kind));
        for (what, bytes) in cases {
            let r = play(&bytes).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert!(r.torn > 0, "{what}");
            assert_eq!(r.ledger.spent(0), spent(0, 1, 40), "{what}");
        }
        // Whole: the open reservation counts.
        assert_eq!(play(&full).unwrap().ledger.spent(0), spent(0, 2, 110));
        // A whole last record that fails its checksum may be a flushed reservation that rotted:
        // refused, never dropped (dropping it could pass the cap).
        for byte in [1usize, 2, 5] {
            let mut garbled = full.clone();
            let n = garbled.len();
            garbled[n - byte] ^= 0x40;
            let e = play(&garbled).unwrap_err();
            assert!(e.to_string().contains("checksum"), "byte -{byte}: {e}");
        }
    }

    #[test]
    fn a_corrupt_middle_record_refuses_the_journal() {
        let good = [reserve(1, 0, 100), settle(1, 40), reserve(2, 0, 70)];
        let full = file("r", &good);
        let h = header("r", 0).len();
        let rec = Record::size(RESERVE).unwrap();
        for (what, at) in [
            ("first record's field", h + 3),
            ("first record's kind", h),
            ("second record's checksum", h + rec + 20),
        ] {
            let mut b = full.clone();
            b[at] ^= 0x10;
            let e = play(&b).unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.contains("r.journal") && msg.contains("corrupt at byte"),
                "{what}: {msg}"
            );
        }
        // The header itself.
        for (what, at, needle) in [
            ("magic", 0, "not a tandem spend journal"),
            ("version", 8, "unknown version"),
            ("route name", 15, "checksum"),
        ] {
            let mut b = full.clone();
            b[at] ^= 0x01;
            let e = play(&b).unwrap_err().to_string();
            assert!(e.contains(needle), "{what}: {e}");
        }
        let e = replay(&full, Path::new("x.journal"), "other")
            .unwrap_err()
            .to_string();
        assert!(e.contains("route `r`'s journal"), "{e}");
        assert!(play(b"TNDMJRNL\x01").is_err(), "truncated header");
    }

    #[test]
    fn compacted_records_are_never_taken_for_a_torn_tail() {
        let snap = [
            Record::Spent {
                window_start: 0,
                calls: 5,
                micros: 500,
            },
            reserve(3, 0, 70),
        ];
        let good = compacted("r", &snap);
        assert_eq!(play(&good).unwrap().ledger.spent(0), spent(0, 6, 570));
        // A damaged last compacted record, or a file cut inside the compacted part: refused,
        // not ignored (that would forget the spend).
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 1;
        let cut = good[..good.len() - 3].to_vec();
        let mut lying = good.clone();
        let at = header("r", 0).len() - 16;
        lying[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        for (what, b, needle) in [
            ("flipped", flipped, "compacted record"),
            ("cut", cut, "compacted part claims"),
            ("lying length", lying, "checksum"),
        ] {
            let e = play(&b).unwrap_err().to_string();
            assert!(e.contains(needle), "{what}: {e}");
        }
        // Appended records after it still tear as usual.
        let mut torn = good.clone();
        reserve(4, 0, 9).encode(&mut torn);
        torn.truncate(torn.len() - 2);
        let r = play(&torn).unwrap();
        assert_eq!((r.ledger.spent(0), r.torn > 0), (spent(0, 6, 570), true));
    }

    #[test]
    fn old_windows_are_dropped_and_open_reservations_folded() {
        let records = [
            Record::Spent {
                window_start: 0,
                calls: 9,
                micros: 900,
            },
            reserve(1, 60, 100),
            reserve(2, 120, 30),
            settle(1, 50),
            reserve(3, 120, 20),
            settle(3, 5),
        ];
        let mut l = play(&file("r", &records)).unwrap().ledger;
        assert_eq!(l.spent(0), spent(0, 9, 900));
        assert_eq!(l.spent(60), spent(60, 1, 50));
        assert_eq!(l.spent(120), spent(120, 2, 35));
        l.fold_open();
        l.retain_from(120);
        assert_eq!(l.open_count(), 0);
        assert_eq!(l.spent(0), spent(0, 0, 0));
        assert_eq!(l.spent(60), spent(60, 0, 0));
        assert_eq!(l.spent(120), spent(120, 2, 35));
    }

    #[test]
    fn compaction_round_trips() {
        let mut l = Ledger::seeded(spent(60, 4, 400));
        for r in [
            reserve(1, 60, 10),
            reserve(2, 60, 20),
            settle(1, 7),
            reserve(3, 120, 99),
        ] {
            l.apply(r).unwrap();
        }
        let b = compacted("r", &l.snapshot());
        let back = play(&b).unwrap().ledger;
        assert_eq!(back, l);
        // The open reservations stay open: their settlements still apply after compaction.
        let mut back2 = back.clone();
        back2.apply(settle(2, 3)).unwrap();
        assert_eq!(back2.spent(60), spent(60, 6, 410));
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_journal_survives_reopen_as_if_killed() {
        let (dir, crashed) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let now = 1_000;
        let (j, o) = Journal::open(dir.path(), "r", None, spent(0, 2, 20), false, now).unwrap();
        assert_eq!(o.spent, spent(0, 2, 20), "seeded from the state file");
        let rt = rt();
        let a = j.reserve(0, 100);
        let b = j.reserve(0, 50);
        let c = j.reserve(0, 30);
        rt.block_on(async {
            a.durable().await.unwrap();
            b.durable().await.unwrap();
            c.durable().await.unwrap();
        });
        a.settle(60);
        b.release();
        let d = j.reserve(0, 1000);
        rt.block_on(d.durable()).unwrap();
        // c stays open. The process "dies" now: copy the file as it is on disk.
        std::fs::copy(j.path(), journal_path(crashed.path(), "r")).unwrap();
        let (_j, o) = Journal::open(crashed.path(), "r", None, spent(0, 0, 0), true, now).unwrap();
        assert_eq!(
            o.spent,
            spent(0, 5, 1110),
            "journal is the truth, not the seed"
        );
        assert_eq!(o.folded, 2);
        // Compacted at open: the folded total alone, and the same spend again.
        let b2 = std::fs::read(journal_path(crashed.path(), "r")).unwrap();
        assert_eq!(
            b2.len(),
            header("r", 0).len() + Record::size(SPENT).unwrap()
        );
        drop(_j);
        let (_, o) = Journal::open(crashed.path(), "r", None, spent(0, 0, 0), true, now).unwrap();
        assert_eq!(o.spent, spent(0, 5, 1110));
    }

    fn play_route(b: &[u8], path: &Path, route: &str) -> Ledger {
        replay(b, path, route).unwrap().ledger
    }

    #[test]
    fn a_missing_journal_that_must_exist_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let e = Journal::open(dir.path(), "r", None, spent(0, 0, 0), true, 5)
            .err()
            .unwrap();
        assert!(matches!(e, JournalError::Missing { .. }), "{e}");
        assert!(e.to_string().contains("r.journal"));
    }

    #[test]
    fn a_window_change_drops_old_spend_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path(), "r", Some(60), spent(0, 0, 0), false, 1000).unwrap();
        let t = j.reserve(960, 10);
        rt().block_on(t.durable()).unwrap();
        drop(j);
        let (_, o) = Journal::open(dir.path(), "r", Some(60), spent(0, 0, 0), true, 1010).unwrap();
        assert_eq!(o.spent, spent(960, 1, 10), "same window");
        let (_, o) = Journal::open(dir.path(), "r", Some(60), spent(0, 0, 0), true, 1030).unwrap();
        assert_eq!(o.spent, spent(1020, 0, 0), "next window starts fresh");
    }

    #[test]
    fn writes_after_a_torn_tail_replay_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path(), "r", None, spent(0, 0, 0), false, 5).unwrap();
        let t = j.reserve(0, 10);
        rt().block_on(t.durable()).unwrap();
        let path = j.path().to_path_buf();
        drop(j);
        let mut b = std::fs::read(&path).unwrap();
        b.extend_from_slice(&[RESERVE, 1, 2, 3]);
        std::fs::write(&path, &b).unwrap();
        let (j, o) = Journal::open(dir.path(), "r", None, spent(0, 0, 0), true, 5).unwrap();
        assert_eq!((o.spent, o.torn), (spent(0, 1, 10), 4));
        let t = j.reserve(0, 5);
        rt().block_on(t.durable()).unwrap();
        drop(j);
        let (_, o) = Journal::open(dir.path(), "r", None, spent(0, 0, 0), true, 5).unwrap();
        assert_eq!((o.spent, o.torn), (spent(0, 2, 15), 0));
    }

    /// 64 reservations made at once are all on disk when they resolve, in far fewer flushes than
    /// reservations (group commit); prints the latency of one reservation alone and the cost of
    /// 64 at once (`cargo test -p tandem-server journal -- --nocapture`).
    #[test]
    fn concurrent_reservations_share_flushes_and_all_are_durable() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path(), "r", None, spent(0, 0, 0), false, 5).unwrap();
        let j = Arc::new(j);
        let rt = rt();
        // The disk's own cost, for comparison: a 33-byte append and its fdatasync.
        let mut raw = Vec::new();
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join("raw"))
            .unwrap();
        for _ in 0..200 {
            let t0 = Instant::now();
            f.write_all(&[7u8; 33]).unwrap();
            f.sync_data().unwrap();
            raw.push(t0.elapsed());
        }
        raw.sort();
        // One at a time: the added latency of a reservation (one write + fdatasync).
        let mut lat = Vec::new();
        for _ in 0..200 {
            let t0 = Instant::now();
            let t = j.reserve(0, 1);
            rt.block_on(t.durable()).unwrap();
            lat.push(t0.elapsed());
            t.settle(1);
        }
        lat.sort();
        let (p50, p99) = (lat[lat.len() / 2], lat[lat.len() * 99 / 100]);
        // 64 at once, 20 rounds.
        let mut rounds = Vec::new();
        let mut syncs = 0;
        for _ in 0..20 {
            let before = j.syncs();
            let t0 = Instant::now();
            let done = rt.block_on(async {
                let tasks: Vec<_> = (0..64)
                    .map(|_| {
                        let j = j.clone();
                        tokio::spawn(async move {
                            let t = j.reserve(0, 1);
                            t.durable().await.map(|_| t)
                        })
                    })
                    .collect();
                let mut done = Vec::new();
                for t in tasks {
                    done.push(t.await.unwrap().unwrap());
                }
                done
            });
            rounds.push(t0.elapsed());
            syncs += j.syncs() - before;
            for t in done {
                t.release();
            }
        }
        rounds.sort();
        let per_round = syncs as f64 / 20.0;
        println!(
            "journal: bare append+fdatasync p50 {:?}, p99 {:?}; one reservation p50 {:?}, p99 {:?}; 64 concurrent: median {:?} per 64 ({:.1} flushes per 64, {:.0} reservations/s)",
            raw[100],
            raw[198],
            p50,
            p99,
            rounds[10],
            per_round,
            64.0 / rounds[10].as_secs_f64()
        );
        assert!(
            per_round <= 8.0,
            "64 concurrent reservations took {per_round} flushes on average: no group commit"
        );
        // Everything is on disk: 200 settled at 1, 1280 released.
        let path = j.path().to_path_buf();
        drop(rt);
        let j = Arc::into_inner(j).unwrap();
        drop(j);
        let b = std::fs::read(&path).unwrap();
        assert_eq!(play_route(&b, &path, "r").spent(0), spent(0, 200, 200));
    }

    #[test]
    fn a_failed_write_fails_the_reservation_and_a_rewrite_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path(), "r", None, spent(0, 0, 0), false, 5).unwrap();
        let rt = rt();
        // Make the file unwritable underneath the writer: replace it with a directory, so the
        // next rewrite cannot rename over it, and make the append fail by poisoning.
        let path = j.path().to_path_buf();
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("x"), b"x").unwrap();
        // Appends still go to the unlinked inode; force the rewrite path with a compaction.
        assert!(j.compact().is_err(), "renaming over a directory fails");
        let t = j.reserve(0, 10);
        let e = rt.block_on(t.durable()).unwrap_err();
        assert!(e.to_string().contains("r.journal"), "{e}");
        t.release();
        // The operator frees the path: the next batch rewrites the whole journal.
        std::fs::remove_dir_all(&path).unwrap();
        let t = j.reserve(0, 7);
        rt.block_on(t.durable()).unwrap();
        drop(j);
        let b = std::fs::read(&path).unwrap();
        assert_eq!(play_route(&b, &path, "r").spent(0), spent(0, 1, 7));
    }
}
