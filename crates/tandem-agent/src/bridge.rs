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
        let t = t.trim();
        if t.is_empty() {
            "(no stderr)".into()
        } else {
            let start = t.len().saturating_sub(600);
            if start == 0 {
                return t.to_string();
            }
            // The last 600 bytes, from the start of a line (else of a word) so nothing is cut.
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
