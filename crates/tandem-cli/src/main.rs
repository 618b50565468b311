//! The `tandem` command. Parses arguments, wires the library together and prints; nothing else.

mod assets_cmd;
mod eval_cmd;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "tandem",
    version,
    about = "Small and large language models in tandem: route, cascade and learn online within a hard budget"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Evaluate routing and cascade policies on a file of recorded model answers.
    Eval(Box<eval_cmd::EvalArgs>),
    /// Install or inspect the pinned model weights and data sets.
    Assets(assets_cmd::AssetsArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Eval(args) => eval_cmd::run(*args),
        Command::Assets(args) => assets_cmd::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tandem: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
