//! What the end-to-end tests share.

use std::process::{Command, Output};

/// Runs the `tandem` binary this build made with `args`, to completion.
pub fn tandem(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(args)
        .output()
        .expect("run tandem")
}
