//! The bridge never hangs tandem: a crash, a hang, garbage or a refusal from the Python side is a
//! clear error within its deadline.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::json;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tandem_agent::bridge::{Bridge, BridgeCommand};
use tandem_agent::AgentError;

/// A fake bridge: answers a ping, then behaves as `script` says for every other request.
fn fake(behaviour: &str) -> BridgeCommand {
    let script = format!(
        r#"
import json, sys, time
for line in sys.stdin:
    req = json.loads(line)
    if req.get("op") == "ping":
        print(json.dumps({{"ok": True}}), flush=True)
        continue
{behaviour}
"#
    );
    BridgeCommand {
        program: PathBuf::from("python3"),
        args: vec!["-u".into(), "-c".into(), script],
        env: vec![],
        start_timeout: Duration::from_secs(20),
    }
}

fn request(cmd: &BridgeCommand) -> (Result<serde_json::Value, AgentError>, Duration) {
    let mut b = Bridge::start(cmd, "fake").unwrap();
    let t = Instant::now();
    let r = b.request(&json!({"op": "step"}), Duration::from_millis(1500));
    (r, t.elapsed())
}

#[test]
fn a_crash_is_an_error_with_its_stderr() {
    let (r, _) = request(&fake(
        "    sys.stderr.write('Traceback: the game engine broke\\n'); sys.stderr.flush(); sys.exit(3)",
    ));
    let e = r.unwrap_err().to_string();
    assert!(e.contains("exited"), "{e}");
    assert!(e.contains("the game engine broke"), "{e}");
}

#[test]
fn a_hang_is_a_timeout_not_a_hang() {
    let (r, took) = request(&fake("    time.sleep(60)"));
    let e = r.unwrap_err().to_string();
    assert!(e.contains("no reply within 1.5 s"), "{e}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

#[test]
fn garbage_is_an_error_naming_it() {
    let (r, _) = request(&fake("    print('Inform 7 says hello', flush=True)"));
    let e = r.unwrap_err().to_string();
    assert!(
        e.contains("not JSON") && e.contains("Inform 7 says hello"),
        "{e}"
    );
}

#[test]
fn a_refusal_keeps_the_bridge_usable() {
    let mut b = Bridge::start(
        &fake(
            "    if req.get('op') == 'step':\n        print(json.dumps({'ok': False, 'error': 'no game loaded'}), flush=True)\n    else:\n        print(json.dumps({'ok': True, 'echo': req}), flush=True)",
        ),
        "fake",
    )
    .unwrap();
    let e = b
        .request(&json!({"op": "step"}), Duration::from_secs(5))
        .unwrap_err();
    assert!(
        matches!(&e, AgentError::Env(m) if m == "no game loaded"),
        "{e}"
    );
    let v = b
        .request(&json!({"op": "other", "x": 1}), Duration::from_secs(5))
        .unwrap();
    assert_eq!(v["echo"]["x"], 1);
}

#[test]
fn a_program_that_cannot_start_is_a_clear_error() {
    let cmd = BridgeCommand {
        program: PathBuf::from("/nonexistent/python9"),
        args: vec![],
        env: vec![],
        start_timeout: Duration::from_secs(2),
    };
    let e = Bridge::start(&cmd, "fake").err().unwrap().to_string();
    assert!(e.contains("cannot start /nonexistent/python9"), "{e}");
}
