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

fn main() -> ExitCode {
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
