//! The `tandem` command. Parses arguments, wires the library together and prints; nothing else.

mod assets_cmd;
mod bench_cmd;
mod demo_cmd;
mod eval_cmd;
mod log_writer;
mod londi_cmd;
mod progress;
mod record_cmd;
mod run_cmd;
mod serve_cmd;
mod train_cmd;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

// mimalloc rather than glibc's malloc: a gateway request makes hundreds of small, short-lived
// allocations across threads, and glibc's malloc and free were a fifth of `tandem serve`'s CPU.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Fit a router (and cascade scorer) on recorded files: a prior that eval and serve start from.
    Train(train_cmd::TrainArgs),
    /// Install or inspect the pinned model weights and data sets.
    Assets(assets_cmd::AssetsArgs),
    /// Stream texts through a cascade of local tiers that learn online from the top tier.
    Run(Box<run_cmd::RunArgs>),
    /// Record an LLM tier's answers over a dataset, for fast and repeatable reruns.
    Record(record_cmd::RecordArgs),
    /// Benchmarks: `tandem bench cascade` runs every cascade policy side by side.
    Bench(Box<bench_cmd::BenchArgs>),
    /// An OpenAI-compatible gateway that routes each request between a small and a large model.
    Serve(serve_cmd::ServeArgs),
    /// The default job: movie-review snippets through hashed -> MiniLM -> local LLM (installs assets if needed).
    Demo(demo_cmd::DemoArgs),
}

/// Exit status of a command whose reader closed its stdout (`tandem … | head`): the shell's own
/// for a process ended by SIGPIPE (128 + 13).
const BROKEN_PIPE_EXIT: i32 = 141;

/// Makes a write to a closed stdout or stderr (`tandem … 2>&1 | head`) end the process
/// quietly instead of panicking with a backtrace. SIGPIPE stays ignored (Rust's default),
/// because the LONDI bridge writes to a child's stdin and must see a dead child as an error
/// there, not die silently; `println!`/`eprintln!` turn the resulting EPIPE into a panic, which
/// this hook recognises and ends.
fn exit_quietly_on_closed_output() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if info.payload_as_str().is_some_and(is_closed_output) {
            std::process::exit(BROKEN_PIPE_EXIT);
        }
        default(info)
    }));
}

/// Whether a panic message is std's for printing to a stdout or stderr whose reader has gone
/// (EPIPE).
fn is_closed_output(message: &str) -> bool {
    (message.starts_with("failed printing to stdout")
        || message.starts_with("failed printing to stderr"))
        && message.contains("(os error 32)")
}

/// Parser for counts that must be positive (`--threads`): 0 is refused naming the flag, rather
/// than quietly run as 1.
pub(crate) fn at_least_one() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
}

fn main() -> ExitCode {
    exit_quietly_on_closed_output();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Eval(args) => eval_cmd::run(*args),
        Command::Train(args) => train_cmd::run(args),
        Command::Assets(args) => assets_cmd::run(args),
        Command::Run(args) => run_cmd::run(*args),
        Command::Demo(args) => demo_cmd::run(args),
        Command::Record(args) => record_cmd::run(args),
        Command::Bench(args) => bench_cmd::run(*args),
        Command::Serve(args) => serve_cmd::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tandem: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_closed_output;

    #[test]
    fn only_a_closed_stdout_or_stderr_is_recognised() {
        assert!(is_closed_output(
            "failed printing to stdout: Broken pipe (os error 32)"
        ));
        assert!(is_closed_output(
            "failed printing to stderr: Broken pipe (os error 32)"
        ));
        assert!(!is_closed_output(
            "failed printing to stdout: No space left on device (os error 28)"
        ));
        assert!(!is_closed_output(
            "failed printing to stderr: No space left on device (os error 28)"
        ));
        assert!(!is_closed_output("index out of bounds"));
    }
}
