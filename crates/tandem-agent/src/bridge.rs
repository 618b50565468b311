//! A Python process behind JSON lines: one request line in, one reply line out, each with a
//! deadline. A reader thread moves the process's lines into a channel, so a hang is a timeout
//! (the process is killed) and a crash is an error carrying the end of its stderr — never a hang.

use crate::error::AgentError;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How to start the bridge.
#[derive(Debug, Clone)]
pub struct BridgeCommand {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Deadline for the first reply (the import of the environment's packages).
    pub start_timeout: Duration,
}

pub struct Bridge {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<std::io::Result<String>>,
    stderr_tail: Arc<Mutex<String>>,
    name: String,
}

const STDERR_KEEP: usize = 4000;

impl Bridge {
    /// Starts the process and waits for its answer to a ping.
    pub fn start(cmd: &BridgeCommand, name: &str) -> Result<Self, AgentError> {
        let mut child = Command::new(&cmd.program)
            .args(&cmd.args)
            .envs(cmd.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| AgentError::Bridge {
                bridge: name.to_string(),
                message: format!("cannot start {}: {e}", cmd.program.display()),
            })?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            let _ = child.kill();
            return Err(AgentError::Bridge {
                bridge: name.to_string(),
                message: "its pipes could not be opened".into(),
            });
        };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr_tail = Arc::new(Mutex::new(String::new()));
        let tail = stderr_tail.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stderr);
            let mut buf = [0u8; 4096];
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Ok(mut t) = tail.lock() {
                    t.push_str(&String::from_utf8_lossy(&buf[..n]));
                    if t.len() > 2 * STDERR_KEEP {
                        let cut = t.len() - STDERR_KEEP;
                        let cut = (cut..t.len()).find(|&i| t.is_char_boundary(i)).unwrap_or(0);
                        t.drain(..cut);
                    }
                }
            }
        });
        let mut bridge = Bridge {
            child,
            stdin,
            lines: rx,
            stderr_tail,
            name: name.to_string(),
        };
        bridge.request(&serde_json::json!({"op": "ping"}), cmd.start_timeout)?;
        Ok(bridge)
    }

    fn tail(&self) -> String {
        let t = self
            .stderr_tail
            .lock()
            .map(|t| t.clone())
            .unwrap_or_default();
        tail_of(&t, 600)
    }

    fn fail(&mut self, message: String) -> AgentError {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Let the stderr reader catch up with what the process printed before it ended.
        std::thread::sleep(Duration::from_millis(50));
        AgentError::Bridge {
            bridge: self.name.clone(),
            message: format!("{message}; its stderr ends: {}", self.tail()),
        }
    }

    /// Sends one request and waits up to `timeout` for its reply. A reply with `"ok": false` is an
    /// [`AgentError::Env`] (the bridge lives on); a timeout, a crash or an unreadable reply kills
    /// the bridge and is an [`AgentError::Bridge`].
    pub fn request(&mut self, req: &Value, timeout: Duration) -> Result<Value, AgentError> {
        let line = format!("{req}\n");
        if let Err(e) = self
            .stdin
            .write_all(line.as_bytes())
            .and_then(|_| self.stdin.flush())
        {
            return Err(self.fail(format!("cannot write to it: {e}")));
        }
        let reply = match self.lines.recv_timeout(timeout) {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => return Err(self.fail(format!("cannot read from it: {e}"))),
            Err(RecvTimeoutError::Timeout) => {
                return Err(self.fail(format!(
                    "no reply within {:.1} s to {}",
                    timeout.as_secs_f32(),
                    short(&line)
                )))
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status = self.child.wait().map(|s| s.to_string()).unwrap_or_default();
                return Err(self.fail(format!("it exited ({status}) before replying")));
            }
        };
        let v: Value = match serde_json::from_str(&reply) {
            Ok(v) => v,
            Err(e) => {
                return Err(self.fail(format!("its reply is not JSON ({e}): {}", short(&reply))))
            }
        };
        if v.get("ok").and_then(Value::as_bool) == Some(true) {
            Ok(v)
        } else {
            Err(AgentError::Env(
                v.get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("the bridge refused the request without saying why")
                    .to_string(),
            ))
        }
    }
}

/// The last `keep` bytes or so of a process's stderr, starting at a line (else at a word) so that
/// nothing is cut mid-word, with "…" where the start was dropped; "(no stderr)" when blank.
fn tail_of(t: &str, keep: usize) -> String {
    let t = t.trim();
    if t.is_empty() {
        return "(no stderr)".into();
    }
    let start = t.len().saturating_sub(keep);
    if start == 0 {
        return t.to_string();
    }
    let cut = &t[(start..t.len())
        .find(|&i| t.is_char_boundary(i))
        .unwrap_or(0)..];
    let from = cut
        .char_indices()
        .find(|&(_, c)| c == '\n')
        .or_else(|| cut.char_indices().find(|&(_, c)| c.is_whitespace()))
        .map_or(0, |(i, c)| i + c.len_utf8());
    format!("…{}", &cut[from..])
}

fn short(s: &str) -> String {
    let s = s.trim();
    match s.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::tail_of;

    #[test]
    fn a_short_or_blank_stderr_is_kept_whole() {
        assert_eq!(tail_of("", 600), "(no stderr)");
        assert_eq!(tail_of(" \n\t\n", 600), "(no stderr)");
        assert_eq!(tail_of("Traceback\n  boom\n", 600), "Traceback\n  boom");
    }

    #[test]
    fn a_long_stderr_is_cut_at_a_line_start() {
        let lines: Vec<String> = (0..200).map(|i| format!("line {i} of the log")).collect();
        let t = tail_of(&lines.join("\n"), 100);
        assert!(t.starts_with('…'), "{t}");
        let first = t.trim_start_matches('…').lines().next().unwrap();
        assert!(
            first.starts_with("line ") && first.ends_with("of the log"),
            "{t}"
        );
        assert!(t.ends_with("line 199 of the log"), "{t}");
        assert!(t.len() <= 100 + '…'.len_utf8());
    }

    #[test]
    fn one_long_line_is_cut_at_a_word() {
        let words = "java.lang.OutOfMemoryError Java heap space ".repeat(40);
        let t = tail_of(&words, 120);
        let body = t.trim_start_matches('…');
        assert!(
            ["java.lang.OutOfMemoryError", "Java", "heap", "space"]
                .iter()
                .any(|w| body.starts_with(w)),
            "{t}"
        );
    }

    #[test]
    fn multibyte_text_near_the_cut_is_not_split() {
        // é and 🙂 are 2 and 4 bytes: any cut point inside them must move to a boundary.
        for keep in 1..40 {
            let s = "é🙂é🙂 ".repeat(30) + "ñandú 🙂🙂🙂";
            let t = tail_of(&s, keep);
            assert!(t.ends_with("🙂🙂🙂") || t.ends_with('🙂'), "{keep}: {t}");
        }
        // No whitespace at all: the last bytes, from a character boundary.
        let t = tail_of(&"ü".repeat(500), 101);
        assert!(t.trim_start_matches('…').chars().all(|c| c == 'ü'));
    }
}
