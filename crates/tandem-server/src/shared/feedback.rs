//! Feedback records in Redis, so feedback given to any replica reaches the answer another one
//! served. A record is written when its response is served (off the request path) and taken
//! with `GETDEL`, so a response takes feedback once across all replicas. A record that could not
//! be written stays in its replica's own bounded log instead: it lives in one place at a time.
//!
//! Key: `tandem:{prefix}:resp:{response id}`, a JSON string, expiring after `feedback_ttl_s`.

use super::{SharedError, SharedStore};
use std::time::Duration;

impl SharedStore {
    fn response_key(&self, id: &str) -> String {
        format!("{}resp:{id}", self.root)
    }

    /// Keeps the record `json` of response `id` for `ttl` (at least 1 s).
    pub async fn put_response(
        &self,
        id: &str,
        json: &str,
        ttl: Duration,
    ) -> Result<(), SharedError> {
        let key = self.response_key(id);
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("SET");
        cmd.arg(&key).arg(json).arg("EX").arg(ttl.as_secs().max(1));
        let _: () = self
            .guarded("put_response", cmd.query_async(&mut conn))
            .await?;
        Ok(())
    }

    /// Deletes response `id`'s record in the background, trying every second for a minute: for
    /// a write that timed out (Redis may still apply it) whose record is now kept elsewhere.
    /// Sent on the same connection, the delete runs after the write.
    pub fn forget_response_later(&self, id: &str) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let key = self.response_key(id);
        let conn = self.conn.clone();
        let timeout = self.op_timeout;
        rt.spawn(async move {
            for _ in 0..60 {
                let mut c = conn.clone();
                let mut cmd = redis::cmd("DEL");
                cmd.arg(&key);
                let done: Result<redis::RedisResult<i64>, _> =
                    tokio::time::timeout(timeout, cmd.query_async(&mut c)).await;
                if matches!(done, Ok(Ok(_))) {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }

    /// Takes response `id`'s record (None: unknown, expired or taken already). Redis ≥ 6.2.
    pub async fn take_response(&self, id: &str) -> Result<Option<String>, SharedError> {
        let key = self.response_key(id);
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("GETDEL");
        cmd.arg(&key);
        self.guarded("take_response", cmd.query_async(&mut conn))
            .await
    }
}
