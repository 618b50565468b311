//! Learning shared by replicas: every replica appends what its requests and feedback taught to a
//! Redis stream per route, and every replica applies what the others appended. So each replica's
//! learner sees all the traffic, as one learner in front of every replica would — without an
//! election, a leader or snapshots to ship (learning an event takes microseconds, so learning
//! every event on every replica costs little; the order in which replicas apply concurrent
//! events may differ, which online learners tolerate).
//!
//! Key: `tandem:{prefix}:learn:{route}`, a stream trimmed to about `keep` entries; each entry
//! has `o` (the replica that learned it) and `e` (the event, JSON).
//!
//! Events a replica cannot append while Redis is down are kept (up to a bound) and appended
//! when it returns; a replica that was away applies what it missed as long as the stream still
//! holds it.

use super::{SharedError, SharedStore};
use redis::streams::StreamReadReply;

/// One entry read from a route's stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Learned {
    /// Index of the route in the cursors given to [`SharedStore::read_learning`].
    pub route: usize,
    /// The stream id, the cursor for the next read.
    pub id: String,
    /// The replica that appended it.
    pub origin: String,
    /// The event, as appended.
    pub event: String,
}

impl SharedStore {
    /// The stream of `route`'s learning events.
    pub fn learning_key(&self, route: &str) -> String {
        format!("{}learn:{route}", self.root)
    }

    /// Appends `events` (JSON) from replica `origin` to `route`'s stream, in one round trip,
    /// trimming it to about `keep` entries.
    pub async fn publish_learning(
        &self,
        route: &str,
        origin: &str,
        events: &[String],
        keep: u64,
    ) -> Result<(), SharedError> {
        if events.is_empty() {
            return Ok(());
        }
        let key = self.learning_key(route);
        let mut pipe = redis::pipe();
        for e in events {
            pipe.cmd("XADD")
                .arg(&key)
                .arg("MAXLEN")
                .arg("~")
                .arg(keep)
                .arg("*")
                .arg("o")
                .arg(origin)
                .arg("e")
                .arg(e)
                .ignore();
        }
        let mut conn = self.conn.clone();
        let _: () = self
            .guarded("publish_learning", pipe.query_async(&mut conn))
            .await?;
        Ok(())
    }

    /// The last id of `route`'s stream (`0-0` when empty): where a replica that starts from its
    /// own saved state begins reading.
    pub async fn learning_tail(&self, route: &str) -> Result<String, SharedError> {
        let key = self.learning_key(route);
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("XREVRANGE");
        cmd.arg(&key).arg("+").arg("-").arg("COUNT").arg(1);
        let reply: redis::streams::StreamRangeReply = self
            .guarded("learning_tail", cmd.query_async(&mut conn))
            .await?;
        Ok(reply
            .ids
            .first()
            .map_or_else(|| "0-0".to_string(), |e| e.id.clone()))
    }

    /// Reads up to `count` entries per route after each cursor (`(route name, last id read)`),
    /// without blocking (the connection is shared with budget operations).
    pub async fn read_learning(
        &self,
        cursors: &[(String, String)],
        count: usize,
    ) -> Result<Vec<Learned>, SharedError> {
        if cursors.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT").arg(count).arg("STREAMS");
        for (route, _) in cursors {
            cmd.arg(self.learning_key(route));
        }
        for (_, id) in cursors {
            cmd.arg(id);
        }
        let mut conn = self.conn.clone();
        let reply: Option<StreamReadReply> = self
            .guarded("read_learning", cmd.query_async(&mut conn))
            .await?;
        let mut out = Vec::new();
        for k in reply.map(|r| r.keys).unwrap_or_default() {
            let Some(route) = cursors
                .iter()
                .position(|(r, _)| self.learning_key(r) == k.key)
            else {
                continue;
            };
            for e in k.ids {
                let (Some(origin), Some(event)) = (e.get::<String>("o"), e.get::<String>("e"))
                else {
                    return Err(self.reply(
                        "read_learning",
                        format!("entry {} of {} lacks `o` or `e`", e.id, k.key),
                    ));
                };
                out.push(Learned {
                    route,
                    id: e.id,
                    origin,
                    event,
                });
            }
        }
        Ok(out)
    }
}
