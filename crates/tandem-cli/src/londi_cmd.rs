//! `tandem bench londi`: LONDI's switching controller on TextWorld games, BabyAI-Text levels or
//! ScienceWorld tasks (see tandem_agent::bench).

use crate::assets_cmd::ensure_installed;
use crate::run_cmd::write_json;
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use std::path::{Path, PathBuf};
use tandem_agent::actor::{Expert, LargePolicy, LlmActor, RecordKey};
use tandem_agent::bench::{
    londi_name, only_selects, plot_frontier, pm, threshold_name, Bench, BenchConfig, Report,
    TextWorldGames,
};
use tandem_agent::env::scienceworld::SwConfig;
use tandem_agent::env::{
    BabyAiEpisode, BabyAiText, Environment, ScienceWorld, Split, SwEpisode, TextWorld,
};
use tandem_models::assets::Store;
use tandem_models::gguf::GgufLm;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EnvName {
    /// TextWorld's generated games (scripts/setup-textworld).
    Textworld,
    /// BabyAI-Text: minigrid's GoToObj, GoToLocal and PickupLoc levels (scripts/setup-babyai).
    Babyai,
    /// ScienceWorld's short tasks: find-*, lifespan-* (scripts/setup-scienceworld).
    Scienceworld,
}

impl EnvName {
    /// As `--env` spells it.
    fn flag(self) -> &'static str {
        match self {
            EnvName::Textworld => "textworld",
            EnvName::Babyai => "babyai",
            EnvName::Scienceworld => "scienceworld",
        }
    }
}

#[derive(Args, Debug)]
pub struct LondiArgs {
    /// Which environment.
    #[arg(long, value_enum, default_value = "textworld")]
    env: EnvName,
    /// The small version run in CI: a few training and held-out episodes, SmolLM2-135M as the
    /// large policy, one seed.
    #[arg(long)]
    quick: bool,
    /// The large policy's model: an installed asset id (smollm2-135m, qwen2.5-coder-0.5b,
    /// qwen2.5-coder-1.5b) [default: qwen2.5-coder-0.5b; --quick: smollm2-135m], or `bot` on BabyAI: BabyAI's own planning bot, which solves its
    /// levels — not a language model, a large policy that knows what to do, for measuring the
    /// switching controller apart from what a local model can play.
    #[arg(long)]
    large: Option<String>,
    /// Seeds of the runs (controller initialisation, exploration, episode order) [default:
    /// 1,2,3; --quick: 1].
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    seeds: Option<Vec<u64>>,
    /// Switching costs c of the LONDI rows, 0 to 1 in reward units per large call (an episode's
    /// whole reward is 1) [default: 0.02,0.1; --quick: 0.05].
    #[arg(long, value_delimiter = ',', value_parser = cost, allow_negative_numbers = true)]
    costs: Option<Vec<f32>>,
    /// The switching cost c of the LONDI-B rows, 0 to 1 [default: the first of --costs]. A higher
    /// c keeps LONDI-B from spending its budget on the first steps.
    #[arg(long, value_parser = cost, allow_negative_numbers = true)]
    budget_cost: Option<f32>,
    /// Per-episode budgets of the LONDI-B rows (large calls, at least 1) [default: 2,4; BabyAI
    /// 3,6; --quick: 2, BabyAI 3].
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true,
          value_parser = clap::value_parser!(u32).range(1..))]
    budgets: Option<Vec<u32>>,
    /// Small-confidence thresholds of the threshold rows (0 to 1): call large below it [default:
    /// 0.5,0.8; ScienceWorld 0.05,0.2; --quick: 0.6, ScienceWorld 0.1].
    #[arg(long, value_delimiter = ',', value_parser = threshold, allow_negative_numbers = true)]
    thresholds: Option<Vec<f32>>,
    /// Training episodes per method and seed [default: 200; BabyAI 150; ScienceWorld 100;
    /// --quick: 60, BabyAI 20, ScienceWorld 12].
    #[arg(long, allow_negative_numbers = true, value_parser = clap::value_parser!(u32).range(1..))]
    train_episodes: Option<u32>,
    /// Run only the policies whose names start with one of these (e.g. always-large,LONDI).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// TextWorld's game generator: rooms per game, 1 to 20 (default 3; TextWorld only).
    #[arg(long, allow_negative_numbers = true)]
    rooms: Option<u32>,
    /// TextWorld's game generator: objects per game, 1 to 50 (default 4; TextWorld only).
    #[arg(long, allow_negative_numbers = true)]
    objects: Option<u32>,
    /// TextWorld's game generator: length of the quest, 1 to 20 (default 2; TextWorld only).
    #[arg(long, allow_negative_numbers = true)]
    quest_length: Option<u32>,
    /// Steps an episode may take before it ends unsolved (1 to 1000) [default: 12; BabyAI and
    /// ScienceWorld 20; --quick: 10].
    #[arg(long, allow_negative_numbers = true, value_parser = clap::value_parser!(u32).range(1..=1000))]
    max_steps: Option<u32>,
    /// Training episodes: TextWorld games (seeds 1..), BabyAI seeds per level, ScienceWorld
    /// variations per task (from its training split) [default: 8; BabyAI 4; ScienceWorld 3;
    /// --quick: 2, ScienceWorld 1].
    #[arg(long, allow_negative_numbers = true)]
    train_games: Option<u64>,
    /// Held-out episodes: TextWorld games (seeds 1001..), BabyAI seeds per level (from
    /// 2,000,000), ScienceWorld variations per task (its test split); at most 100,000 [default:
    /// 16; BabyAI 8; ScienceWorld 5; --quick: 2, ScienceWorld 1].
    #[arg(long, allow_negative_numbers = true)]
    test_games: Option<u64>,
    /// BabyAI levels or ScienceWorld tasks (comma-separated) instead of the defaults.
    #[arg(long, value_delimiter = ',')]
    tasks: Option<Vec<String>>,
    /// At most this many admissible actions scored by the large policy a step (0: all) [default:
    /// 24 on ScienceWorld (--quick: 12), all elsewhere].
    #[arg(long, allow_negative_numbers = true)]
    shortlist: Option<usize>,
    /// Replay recorded large-model scores only; fail on a state that was never recorded.
    #[arg(long)]
    replay_only: bool,
    /// Write the report (every row, the settings, the large policy's cost) as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Where games, recordings and the plot go (default out/bench-londi, with the environment's
    /// name appended for BabyAI and ScienceWorld).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Log every held-out episode's actions (s: small, l: large).
    #[arg(long)]
    trace: bool,
    /// The controller does not learn from steps where the large model chose the small one's
    /// action that choosing small would have done the same (an ablation).
    #[arg(long)]
    no_counterfactual: bool,
    /// The controller also reads the small policy's entropy and the episode's revisits of a state
    /// (loops), beside its confidence and margin. Off by default: on BabyAI with the bot it
    /// measured no gain (README).
    #[arg(long)]
    loop_state: bool,
    /// CPU threads for the model (not with --large bot, which runs no model) [default: all cores].
    #[arg(long, value_parser = crate::at_least_one())]
    threads: Option<usize>,
}

/// `--costs`, `--budget-cost`: a finite c from 0 to 1, refused naming the value as typed.
fn cost(s: &str) -> std::result::Result<f32, String> {
    unit_interval(s, "a switching cost is a number from 0 to 1 (an episode's whole reward is 1: above it no large call can pay)")
}

/// `--thresholds`: a confidence from 0 to 1.
fn threshold(s: &str) -> std::result::Result<f32, String> {
    unit_interval(s, "a confidence threshold is a number from 0 to 1")
}

fn unit_interval(s: &str, what: &str) -> std::result::Result<f32, String> {
    match s.trim().parse::<f64>() {
        // A value f32 cannot tell from 0 (1e-50) would run as 0 under another name.
        Ok(x) if x != 0.0 && (x as f32) == 0.0 => Err(format!("{what}; {s} is too small to hold")),
        // -0 is 0 (and is named so).
        Ok(x) if x.is_finite() && (0.0..=1.0).contains(&x) => Ok(x as f32 + 0.0),
        _ => Err(what.to_string()),
    }
}

fn model_of(id: &str) -> Result<&'static str> {
    Ok(match id {
        "smollm2-135m" => "SmolLM2-135M-Instruct.Q4_1.gguf",
        "qwen2.5-coder-0.5b" => "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "qwen2.5-coder-1.5b" => "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        other => bail!(
            "--large {other}: not a GGUF asset (smollm2-135m, qwen2.5-coder-0.5b or qwen2.5-coder-1.5b) \
             nor `{BOT}` (BabyAI's bot, with --env babyai)"
        ),
    })
}

/// `--large bot`: BabyAI's planning bot as the large policy.
const BOT: &str = "bot";

/// BabyAI-Text's levels of the bench: the sanity level and two of the paper's.
const BABYAI_LEVELS: [&str; 3] = [
    "BabyAI-GoToObj-v0",
    "BabyAI-GoToLocal-v0",
    "BabyAI-PickupLoc-v0",
];
/// What BabyAI-Text's actions do, as the large policy is told (BabyAI-Text's own prompt only lists
/// them; Qwen2.5-0.5B without this turned right at nearly every step).
const BABYAI_SYSTEM: &str = "You control an agent in a grid world, one action at a time. \
    Positions are given from where you face: \"2 steps left and 1 step forward\". \
    \"turn left\" and \"turn right\" turn you in place by a quarter turn; \"go forward\" moves \
    you one step forward; \"pick up\" picks up the object 1 step forward; \"drop\" drops what \
    you carry; \"toggle\" opens the door 1 step forward. You are next to an object when it is \
    1 step forward.";

/// ScienceWorld's short tasks (gold paths of 5–10 steps).
const SW_TASKS: [&str; 4] = [
    "find-living-thing",
    "find-animal",
    "lifespan-longest-lived",
    "lifespan-shortest-lived",
];

/// The bench's settings for an environment, before the flags.
fn defaults(env: EnvName, quick: bool) -> BenchConfig {
    let mut cfg = if quick {
        BenchConfig::quick()
    } else {
        BenchConfig::full()
    };
    match env {
        EnvName::Textworld => {}
        EnvName::Babyai => {
            cfg.max_steps = if quick { 10 } else { 20 };
            cfg.train_episodes = if quick { 20 } else { 150 };
            cfg.budgets = if quick { vec![3] } else { vec![3, 6] };
            cfg.goal_line = true;
        }
        EnvName::Scienceworld => {
            cfg.max_steps = if quick { 10 } else { 20 };
            cfg.train_episodes = if quick { 12 } else { 100 };
            // Fewer candidates in CI: a shorter prompt for each large step.
            cfg.shortlist = if quick { 12 } else { 24 };
            // ~100-256 actions: the small policy's confidence in its choice is rarely above 0.5.
            cfg.thresholds = if quick { vec![0.1] } else { vec![0.05, 0.2] };
            cfg.budgets = if quick { vec![2] } else { vec![2, 4] };
        }
    }
    cfg
}

pub fn run(a: LondiArgs) -> Result<()> {
    crate::run_cmd::set_threads(a.threads);
    let store = Store::default_home();
    let large_id = a.large.clone().unwrap_or_else(|| {
        if a.quick {
            "smollm2-135m".into()
        } else {
            "qwen2.5-coder-0.5b".into()
        }
    });
    let bot = large_id == BOT;
    if bot && !matches!(a.env, EnvName::Babyai) {
        bail!(
            "--large {BOT}: only BabyAI has an expert to stand in for the large model (its bot); \
             with --env {} the large policy is a GGUF asset (smollm2-135m, qwen2.5-coder-0.5b, \
             qwen2.5-coder-1.5b)",
            a.env.flag()
        );
    }
    check_flags(&a, bot)?;
    let out = a.out.clone().unwrap_or_else(|| match a.env {
        EnvName::Textworld => PathBuf::from("out/bench-londi"),
        EnvName::Babyai => PathBuf::from("out/bench-londi-babyai"),
        EnvName::Scienceworld => PathBuf::from("out/bench-londi-scienceworld"),
    });
    let mut cfg = defaults(a.env, a.quick);
    if let Some(s) = &a.seeds {
        cfg.run_seeds = s.clone();
    }
    if let Some(c) = &a.costs {
        cfg.costs = c.clone();
    }
    if let Some(b) = &a.budgets {
        cfg.budgets = b.clone();
    }
    cfg.budget_cost = a.budget_cost;
    if let Some(t) = &a.thresholds {
        cfg.thresholds = t.clone();
    }
    if let Some(e) = a.train_episodes {
        cfg.train_episodes = e;
    }
    if let Some(k) = a.shortlist {
        cfg.shortlist = k;
    }
    cfg.trace = a.trace;
    cfg.counterfactual = !a.no_counterfactual;
    cfg.loop_state = a.loop_state;
    cfg.only = a.only.clone();
    cfg.max_steps = a.max_steps.unwrap_or(cfg.max_steps);
    if cfg.max_steps == 0 {
        bail!("--max-steps must be positive");
    }
    if cfg.run_seeds.is_empty() {
        bail!("--seeds: at least one");
    }
    if a.test_games == Some(0) {
        bail!("--test-games must be positive");
    }
    // Where the results go is checked before the run, not after it.
    std::fs::create_dir_all(&out)
        .with_context(|| format!("--out {}: cannot create the directory", out.display()))?;
    if let Some(p) = &a.json {
        if p.as_os_str() == "-" {
            bail!("--json -: the table goes to stdout; give the report a file name");
        }
        if p.is_dir() {
            bail!("--json {}: is a directory; give a file name", p.display());
        }
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("--json {}: cannot create its directory", p.display()))?;
        }
        // The report must not land on what the bench writes or keeps in --out, however the path
        // is spelled (.., symlinks): the plot, or any model's recording (hours to remake).
        let target =
            resolve(p).with_context(|| format!("--json {}: not a file path", p.display()))?;
        let out_dir = out
            .canonicalize()
            .with_context(|| format!("--out {}", out.display()))?;
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if target.parent() == Some(out_dir.as_path()) {
            if name == "londi-frontier.svg" {
                bail!(
                    "--json {}: is where the frontier plot goes; give another file",
                    p.display()
                );
            }
            if name.starts_with("recorded-") && name.ends_with(".jsonl") {
                bail!(
                    "--json {}: is a large model's recording of scores; give another file",
                    p.display()
                );
            }
        }
        writable(p).with_context(|| format!("--json {}: cannot be written", p.display()))?;
    }
    let recording = out.join(format!("recorded-{large_id}.jsonl"));
    // The bot needs no model and no recording: it plans in the environment at every step.
    let large = if bot {
        None
    } else {
        let file = model_of(&large_id)?;
        let model = if a.replay_only {
            None
        } else {
            ensure_installed(&store, &[&large_id])?;
            let path = store.path(&large_id, &format!("{large_id}/{file}"))?;
            Some(GgufLm::load(&path).with_context(|| format!("loading {}", path.display()))?)
        };
        let actor = LlmActor::new(model, &large_id, Some(&recording))?;
        if let Some(line) = actor.torn_line() {
            eprintln!(
                "tandem: {}: line {line} was left unfinished by an interrupted run and is \
                 dropped; the model scores its state again when needed",
                recording.display()
            );
        }
        Some(actor)
    };
    let (report, title) = match (a.env, large) {
        (EnvName::Babyai, large) => babyai(&a, cfg, &store, large, &large_id)?,
        (EnvName::Textworld, Some(large)) => textworld(&a, cfg, &store, &out, large, &large_id)?,
        (EnvName::Scienceworld, Some(large)) => scienceworld(&a, cfg, &store, large, &large_id)?,
        (env, None) => bail!("--env {} needs a GGUF large policy", env.flag()),
    };
    print_report(&report, &title, (!bot).then_some(recording.as_path()));
    let plot = out.join("londi-frontier.svg");
    plot_frontier(
        &report.rows,
        &format!("{title} (large = {large_id})"),
        &plot,
    )?;
    println!("plot: {}", plot.display());
    if let Some(p) = &a.json {
        write_json(p, &report)?;
    }
    Ok(())
}

/// Whether `p` can be written, without changing it: an existing file is opened for appending;
/// a new one is created and removed again.
fn writable(p: &Path) -> std::io::Result<()> {
    if p.exists() {
        std::fs::OpenOptions::new().append(true).open(p).map(drop)
    } else {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(p)?;
        std::fs::remove_file(p)
    }
}

/// Where a file path leads: through a symlink if it is one, else its (existing) directory's
/// real path joined with its name; `None` without a file name.
fn resolve(p: &Path) -> Option<PathBuf> {
    let mut p = p.to_path_buf();
    // A symlink to a file not yet written (a dangling one) leads where the write would go.
    for _ in 0..16 {
        if let Ok(real) = p.canonicalize() {
            return Some(real);
        }
        let dir = p
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        match std::fs::read_link(&p) {
            Ok(to) => p = dir.join(to),
            Err(_) => return Some(dir.canonicalize().ok()?.join(p.file_name()?)),
        }
    }
    None
}

/// The row families `--only` can select (a row's name starts with one of them).
const FAMILIES: [&str; 5] = [
    "always-small",
    "always-large",
    "small-confidence",
    "LONDI",
    "random",
];

/// The most training or held-out games/episodes a flag may ask for.
const MAX_GAMES: u64 = 100_000;

/// Refuses, before anything runs, flag values that would give a silent wrong run: duplicates
/// (a fake ± 0.0 over the same seed twice), out-of-range numbers, flags the chosen environment
/// or large policy does not read.
fn check_flags(a: &LondiArgs, bot: bool) -> Result<()> {
    fn no_duplicates<T: PartialEq + std::fmt::Debug>(flag: &str, v: &[T]) -> Result<()> {
        for (i, x) in v.iter().enumerate() {
            if v[..i].contains(x) {
                bail!("{flag}: {x:?} is given twice; each value runs once");
            }
        }
        Ok(())
    }
    if let Some(s) = &a.seeds {
        no_duplicates("--seeds", s)?;
    }
    if let Some(c) = &a.costs {
        no_duplicates("--costs", c)?;
    }
    if let Some(b) = &a.budgets {
        no_duplicates("--budgets", b)?;
        if b.contains(&0) {
            bail!("--budgets 0: a budget is at least one large call per episode (always-small is its own row)");
        }
    }
    if let Some(t) = &a.thresholds {
        no_duplicates("--thresholds", t)?;
    }
    if let Some(t) = &a.tasks {
        no_duplicates("--tasks", t)?;
        if let Some(x) = t
            .iter()
            .find(|x| x.trim().is_empty() || x.trim() != x.as_str())
        {
            bail!("--tasks {x:?}: a level or task name, without spaces around it (an empty name comes from a stray comma)");
        }
    }
    for (flag, n) in [
        ("--train-games", a.train_games),
        ("--test-games", a.test_games),
    ] {
        match n {
            Some(0) => bail!("{flag} 0: must be positive"),
            Some(n) if n > MAX_GAMES => bail!("{flag} {n}: at most {MAX_GAMES}"),
            _ => {}
        }
    }
    if a.train_episodes == Some(0) {
        bail!("--train-episodes 0: LONDI learns from its training episodes; give at least one");
    }
    if let Some(m) = a.max_steps {
        if !(1..=1000).contains(&m) {
            bail!("--max-steps {m}: must be 1 to 1000");
        }
    }
    if let Some(p) = a.only.iter().find(|p| p.trim().is_empty()) {
        bail!("--only {p:?}: an empty name (from a stray comma?) would select every row");
    }
    no_duplicates("--only", &a.only)?;
    for p in &a.only {
        if !FAMILIES
            .iter()
            .any(|f| f.starts_with(p.as_str()) || p.starts_with(f))
        {
            bail!(
                "--only {p:?}: matches no policy; rows start with {}",
                FAMILIES.join(", ")
            );
        }
    }
    let selects = |f: &str| {
        a.only.is_empty()
            || a.only
                .iter()
                .any(|p| f.starts_with(p.as_str()) || p.starts_with(f))
    };
    if selects("random") && !a.only.is_empty() && !selects("LONDI") {
        bail!("--only {}: random switching runs at the shares the LONDI rows reach; select LONDI rows too", a.only.join(","));
    }
    // Settings of rows that --only leaves out would be reported without shaping any row.
    // --costs sets the LONDI rows' c, and LONDI-B's unless --budget-cost does.
    let costs_used = selects("LONDI c=") || (selects("LONDI-B") && a.budget_cost.is_none());
    for (flag, set, used, rows) in [
        (
            "--costs",
            a.costs.is_some(),
            costs_used,
            "LONDI c= (nor, without --budget-cost, LONDI-B)",
        ),
        (
            "--budgets",
            a.budgets.is_some(),
            selects("LONDI-B"),
            "LONDI-B",
        ),
        (
            "--budget-cost",
            a.budget_cost.is_some(),
            selects("LONDI-B"),
            "LONDI-B",
        ),
        (
            "--thresholds",
            a.thresholds.is_some(),
            selects("small-confidence"),
            "threshold",
        ),
        (
            "--no-counterfactual",
            a.no_counterfactual,
            selects("LONDI"),
            "LONDI",
        ),
        ("--loop-state", a.loop_state, selects("LONDI"), "LONDI"),
    ] {
        if set && !used {
            bail!(
                "{flag}: --only {} runs no {rows} row, so it would set nothing",
                a.only.join(",")
            );
        }
    }
    if !a.only.is_empty() {
        per_value_only(a)?;
    }
    if let (true, Some(n)) = (bot, a.threads) {
        bail!("--threads {n} with --large bot: the bot runs no model; the bench's own work is single-threaded");
    }
    if let (true, Some(n)) = (a.replay_only, a.threads) {
        bail!("--threads {n} with --replay-only: no model is loaded; the bench's own work is single-threaded");
    }
    if bot && a.shortlist.is_some() {
        bail!(
            "--shortlist with --large bot: the bot names one action, which a shortlist could drop"
        );
    }
    if bot && a.replay_only {
        bail!("--replay-only with --large bot: the bot plans in the environment and records nothing to replay");
    }
    let textworld = matches!(a.env, EnvName::Textworld);
    if !textworld {
        for (flag, set) in [
            ("--rooms", a.rooms.is_some()),
            ("--objects", a.objects.is_some()),
            ("--quest-length", a.quest_length.is_some()),
        ] {
            if set {
                bail!(
                    "{flag}: only TextWorld's game generator reads it, not --env {}",
                    a.env.flag()
                );
            }
        }
    } else if a.tasks.is_some() {
        bail!("--tasks: BabyAI levels or ScienceWorld tasks; TextWorld's games are set by --rooms, --objects, --quest-length");
    }
    // TextWorld's generator runs for minutes and gigabytes on a huge world, then times out.
    for (flag, value, range) in [
        ("--rooms", a.rooms, 1..=MAX_ROOMS),
        ("--objects", a.objects, 1..=MAX_OBJECTS),
        ("--quest-length", a.quest_length, 1..=MAX_QUEST),
    ] {
        if let Some(v) = value.filter(|v| !range.contains(v)) {
            bail!(
                "{flag} {v}: must be {} to {} (TextWorld's generator)",
                range.start(),
                range.end()
            );
        }
    }
    Ok(())
}

/// TextWorld's generator bounds: rooms, objects and quest length per game.
const MAX_ROOMS: u32 = 20;
const MAX_OBJECTS: u32 = 50;
const MAX_QUEST: u32 = 20;

/// With `--only`, each value given to `--costs`, `--budgets` and `--thresholds` must shape a
/// selected row; a value whose row `--only` leaves out would be reported without running.
fn per_value_only(a: &LondiArgs) -> Result<()> {
    let mut d = defaults(a.env, a.quick);
    if let Some(c) = &a.costs {
        d.costs = c.clone();
    }
    d.budget_cost = a.budget_cost;
    let budget_cost = d.londi_b_cost();
    let budgets = a.budgets.as_ref().unwrap_or(&d.budgets);
    let selected = |name: &str| only_selects(&a.only, name);
    let only = a.only.join(",");
    for &c in a.costs.iter().flatten() {
        let as_londi_b = a.budget_cost.is_none()
            && c == budget_cost
            && budgets.iter().any(|&b| selected(&londi_name(c, Some(b))));
        if !selected(&londi_name(c, None)) && !as_londi_b {
            bail!(
                "--costs {c}: --only {only} runs no {} row, so it would set nothing",
                londi_name(c, None)
            );
        }
    }
    for &b in a.budgets.iter().flatten() {
        if !selected(&londi_name(budget_cost, Some(b))) {
            bail!(
                "--budgets {b}: --only {only} runs no {} row, so it would set nothing",
                londi_name(budget_cost, Some(b))
            );
        }
    }
    for &t in a.thresholds.iter().flatten() {
        if !selected(&threshold_name(t)) {
            bail!(
                "--thresholds {t}: --only {only} runs no {} row, so it would set nothing",
                threshold_name(t)
            );
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn bench<E: Environment + ?Sized, G: std::borrow::Borrow<E::Episode>>(
    env_name: EnvName,
    cfg: BenchConfig,
    env: &mut E,
    train: Vec<G>,
    test: Vec<G>,
    games: String,
    large: &mut dyn LargePolicy,
    large_id: &str,
) -> Result<Report> {
    let mut log = |l: &str| eprintln!("tandem: {l}");
    Ok(Bench {
        cfg,
        env,
        train,
        test,
        env_name: env_name.flag().to_string(),
        games,
        large,
        large_name: large_id.to_string(),
        log: &mut log,
    }
    .run()?)
}

fn textworld(
    a: &LondiArgs,
    cfg: BenchConfig,
    store: &Store,
    out: &Path,
    mut large: LlmActor,
    large_id: &str,
) -> Result<(Report, String)> {
    let dir = out.join("games");
    let mut games = if a.quick {
        TextWorldGames::quick(dir)
    } else {
        TextWorldGames::full(dir)
    };
    games.rooms = a.rooms.unwrap_or(games.rooms);
    games.objects = a.objects.unwrap_or(games.objects);
    games.quest_length = a.quest_length.unwrap_or(games.quest_length);
    if let Some(n) = a.train_games {
        games.train_seeds = (1..=n).collect();
    }
    if let Some(n) = a.test_games {
        games.test_seeds = (1001..1001 + n).collect();
    }
    let site = store.home().join("py/textworld");
    let mut env = TextWorld::start(&site, Path::new("python3"))
        .context("starting TextWorld (scripts/setup-textworld installs it)")?;
    let (train, test) = games.make(&mut env).with_context(|| {
        format!(
            "TextWorld could not make the games with --rooms {} --objects {} --quest-length {} \
             (a longer quest needs more rooms and objects)",
            games.rooms, games.objects, games.quest_length
        )
    })?;
    eprintln!("tandem: games in {}", games.dir.display());
    let report = bench(
        EnvName::Textworld,
        cfg,
        &mut env,
        train,
        test,
        games.describe(),
        &mut large,
        large_id,
    )?;
    Ok((report, "LONDI on held-out TextWorld games".into()))
}

fn babyai(
    a: &LondiArgs,
    cfg: BenchConfig,
    store: &Store,
    large: Option<LlmActor>,
    large_id: &str,
) -> Result<(Report, String)> {
    let levels: Vec<String> = match &a.tasks {
        Some(t) => t.clone(),
        None => BABYAI_LEVELS.iter().map(|s| s.to_string()).collect(),
    };
    let (n_train, n_test) = if a.quick { (2, 2) } else { (4, 8) };
    let n_train = a.train_games.unwrap_or(n_train);
    let n_test = a.test_games.unwrap_or(n_test);
    let episodes = |split: Split, n: u64| -> Vec<BabyAiEpisode> {
        levels
            .iter()
            .flat_map(|l| {
                BabyAiText::seeds(split, n)
                    .into_iter()
                    .map(|s| BabyAiEpisode::new(l, s))
            })
            .collect()
    };
    let site = store.home().join("py/babyai");
    let mut env = BabyAiText::start(&site, Path::new("python3"), cfg.max_steps)
        .context("starting BabyAI-Text (scripts/setup-babyai installs it)")?;
    if a.tasks.is_some() {
        known("BabyAI level", &levels, &env.all_levels()?)?;
    }
    let mut expert = Expert::new();
    let mut model;
    let large: &mut dyn LargePolicy = match large {
        Some(l) => {
            model = l
                .system(BABYAI_SYSTEM)
                .room_is_observation(true)
                .answer_by_letter(true);
            &mut model
        }
        None => &mut expert,
    };
    let games = format!(
        "BabyAI-Text levels {}: {n_train} training and {n_test} held-out seeds each (from 0 and from 2,000,000)",
        levels.join(", ")
    );
    let report = bench(
        EnvName::Babyai,
        cfg,
        &mut env,
        episodes(Split::Train, n_train),
        episodes(Split::Test, n_test),
        games,
        large,
        large_id,
    )?;
    Ok((report, "LONDI on held-out BabyAI-Text episodes".into()))
}

fn scienceworld(
    a: &LondiArgs,
    cfg: BenchConfig,
    store: &Store,
    large: LlmActor,
    large_id: &str,
) -> Result<(Report, String)> {
    let tasks: Vec<String> = match &a.tasks {
        Some(t) => t.clone(),
        None => SW_TASKS.iter().map(|s| s.to_string()).collect(),
    };
    let (n_train, n_test) = if a.quick { (1, 1) } else { (3, 5) };
    let n_train = a.train_games.unwrap_or(n_train) as usize;
    let n_test = a.test_games.unwrap_or(n_test) as usize;
    let site = store.home().join("py/scienceworld");
    let mut env = ScienceWorld::start(
        &site,
        Path::new("python3"),
        SwConfig {
            step_limit: cfg.max_steps,
            ..SwConfig::default()
        },
    )
    .context("starting ScienceWorld (scripts/setup-scienceworld installs it)")?;
    if a.tasks.is_some() {
        known("ScienceWorld task", &tasks, &env.tasks()?)?;
    }
    let mut train = Vec::new();
    let mut test = Vec::new();
    let mut short = Vec::new();
    for t in &tasks {
        let v = env.variations(t)?;
        // Asked for more variations than a split holds: refused below, not silently fewer.
        for (flag, n, split, have) in [
            ("--train-games", n_train, "training", v.train.len()),
            ("--test-games", n_test, "test", v.test.len()),
        ] {
            if have < n {
                short.push(format!("{flag} {n}: {t} has {have} {split} variations"));
            }
        }
        // The first variations of each split: a fixed, documented choice.
        train.extend(v.train.iter().take(n_train).map(|&i| SwEpisode::new(t, i)));
        test.extend(v.test.iter().take(n_test).map(|&i| SwEpisode::new(t, i)));
    }
    if !short.is_empty() {
        bail!(
            "ScienceWorld has fewer variations than asked for; ask for at most as many as every \
             task has, or choose --tasks:\n  {}",
            short.join("\n  ")
        );
    }
    // ScienceWorld words a state differently from run to run: recordings keyed by history.
    let mut large = large
        .system("You are an agent in a simulated world doing an elementary science task.")
        .key_by(RecordKey::History)
        .answer_by_letter(true);
    let games = format!(
        "ScienceWorld tasks {}: the first {n_train} training and {n_test} test variations each, \
         {} scored by the large policy a step",
        tasks.join(", "),
        match cfg.shortlist {
            0 => "every admissible action".to_string(),
            k => format!("at most {k} actions"),
        }
    );
    let report = bench(
        EnvName::Scienceworld,
        cfg,
        &mut env,
        train,
        test,
        games,
        &mut large,
        large_id,
    )?;
    Ok((report, "LONDI on held-out ScienceWorld variations".into()))
}

/// Refuses `--tasks` names the environment does not have, listing those it has.
fn known(what: &str, asked: &[String], have: &[String]) -> Result<()> {
    let unknown: Vec<&str> = asked
        .iter()
        .filter(|t| !have.contains(t))
        .map(String::as_str)
        .collect();
    if !unknown.is_empty() {
        bail!(
            "--tasks {}: not a {what} (names are case-sensitive); there are: {}",
            unknown.join(","),
            have.join(", ")
        );
    }
    Ok(())
}

/// `recording`: where the large model's scores are kept (None: the large policy is BabyAI's bot).
fn print_report(report: &Report, title: &str, recording: Option<&Path>) {
    let st = &report.settings;
    let on = |b: bool| if b { "on" } else { "off" };
    println!(
        "{title} ({}; large = {}, {} training episodes, seeds {:?}; controller: counterfactual {}, loop state {}{})",
        report.games,
        report.large_model,
        report.train_episodes,
        report.run_seeds,
        on(st.counterfactual),
        on(st.loop_state),
        st.budget_cost
            .map_or(String::new(), |c| format!("; LONDI-B at c={c}"))
    );
    println!(
        "{:<24} {:>14} {:>13} {:>15} {:>15} {:>14} {:>9} {:>10}",
        "policy",
        "success",
        "score",
        "large share",
        "large s",
        "large/episode",
        "max large",
        "vs random"
    );
    for r in &report.rows {
        let vs = r
            .vs_random
            .map_or(String::new(), |d| format!("{:+.1} pt", d * 100.0));
        println!(
            "{:<24} {:>7.1}% {:>6} {:>6.2} {:>6} {:>7.1}% {:>7} {:>7.1} {:>7} {:>6.2} {:>7} {:>9} {:>10}",
            r.name,
            r.success * 100.0,
            pm(r.success_sd, 100.0, 1),
            r.score,
            pm(r.score_sd, 1.0, 2),
            r.large_share * 100.0,
            pm(r.large_share_sd, 100.0, 1),
            r.large_seconds,
            pm(r.large_seconds_sd, 1.0, 1),
            r.large_calls_per_episode,
            pm(r.large_calls_per_episode_sd, 1.0, 2),
            r.max_large_calls,
            vs
        );
    }
    if report.run_seeds.len() < 2 {
        println!("± n/a: one seed gives no spread; give several with --seeds");
    } else {
        println!(
            "±: sample sd over the {} seeds of each seed's figure",
            report.run_seeds.len()
        );
    }
    let randoms: Vec<_> = report.rows.iter().filter(|r| r.kind == "random").collect();
    if !randoms.is_empty() {
        println!(
            "random switching calls the large model with probability = the share a LONDI row reached (to the percent):"
        );
        for r in randoms {
            println!("  {:<12} at the share of {}", r.name, r.matches.join(", "));
        }
    }
    if let Some(m) = report.vs_random_mean {
        println!(
            "vs random: success minus random switching's at the row's own share, read off the line through \
             the random rows' (share, success) and always-small/always-large at 0%/100%; mean over {} LONDI rows {:+.1} points",
            report.vs_random_rows,
            m * 100.0
        );
    }
    let c = report.large_cost;
    match recording {
        Some(recording) => println!(
            "large policy: {} steps asked, {} replayed from {}, {:.1} s of model compute in this run; \
             large s: compute seconds over one seed's held-out episodes (replayed steps as recorded)",
            c.calls,
            c.replayed,
            recording.display(),
            c.seconds
        ),
        None => println!(
            "large policy: BabyAI's bot (plans on the full grid; not a language model), {} steps \
             asked, {} without an answer (the first action taken instead); its compute is the \
             environment's, so compare large share and large calls, not seconds",
            c.calls, c.unanswered
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::{cost, threshold};

    #[test]
    fn costs_and_thresholds_are_numbers_from_0_to_1_as_typed() {
        for ok in ["0", "0.02", "1", " 0.5 ", "1e-3"] {
            assert!(cost(ok).is_ok(), "{ok}");
            assert!(threshold(ok).is_ok(), "{ok}");
        }
        // -0 runs (and is named) as 0.
        let z = cost("-0").unwrap();
        assert!(z == 0.0 && z.is_sign_positive());
        for bad in ["-1", "1.5", "1e39", "inf", "NaN", "", "x", "0.1,0.2"] {
            assert!(cost(bad).is_err(), "{bad}");
            assert!(threshold(bad).is_err(), "{bad}");
        }
        // Too small for an f32: it would run as 0 under another name.
        assert!(cost("1e-50").unwrap_err().contains("1e-50 is too small"));
    }
}
