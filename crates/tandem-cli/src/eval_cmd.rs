use crate::progress::Progress;
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tandem_core::money::usd_to_micros;
use tandem_core::policy::cascade::CascadeConfig;
use tandem_core::policy::router::RouterConfig;
use tandem_core::policy::FeedbackMode;
use tandem_core::{BudgetLimits, Price};
use tandem_eval::eval::{default_policies, total_work};
use tandem_eval::ntier::{default_ladder_policies, ladder_work};
use tandem_eval::plot::{
    cost_plot_path, svg_and_png, write_cost_plot, write_ladder_plot, write_plot,
};
use tandem_eval::runner::{Models, PolicyKind};
use tandem_eval::{
    evaluate, evaluate_ladder, Dataset, EvalConfig, EvalError, Ladder, LadderConfig, LadderPolicy,
    LadderSpec, LoadOptions, PolicySpec,
};

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Recorded answers, one JSON object a line: {"id", "prompt", "correct": {model: bool}, "response"?: {model: text}, "cost"?: {model: dollars}}; two or more models.
    #[arg(long)]
    data: PathBuf,
    /// Write the table as JSON here (and the plot beside it, unless --plot says otherwise).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the quality/share plot as NAME.svg and NAME.png (give either, or NAME), and quality
    /// against dollars as NAME-cost.svg and .png.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Seeds the stream order and every random choice.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Share of strong-model calls at the operating point (quality, share and cost columns).
    #[arg(long, default_value_t = 0.3)]
    target_share: f64,
    /// Exploration rate of partial-feedback policies (queries on which both models are called).
    #[arg(long, default_value_t = 0.1)]
    explore: f64,
    /// Number of strong-call shares in [0, 1] each curve is measured at (APGR averages over
    /// them), from 3 to 201.
    #[arg(long, default_value_t = 21)]
    grid: usize,
    /// How many recent scores the online threshold is taken from.
    #[arg(long, default_value_t = 1000)]
    window: usize,
    /// Run the models named here (comma-separated, two or more) as a cascade ordered by cost
    /// (default with three or more models and no --weak/--strong: all of the file's).
    #[arg(long, value_delimiter = ',')]
    tiers: Vec<String>,
    /// A model's price in a cascade, `NAME=token:IN[:OUT]` or `NAME=call:USD` (repeat, or
    /// comma-separate); not needed for a model whose `cost` the file records on every line.
    #[arg(long = "price", value_delimiter = ',')]
    prices: Vec<String>,
    /// Weak model's name in the file (default: the less accurate of exactly two).
    #[arg(long)]
    weak: Option<String>,
    /// Strong model's name in the file (default: the more accurate of exactly two).
    #[arg(long)]
    strong: Option<String>,
    /// Weak model's price: `token:IN[:OUT]` in dollars per million tokens, or `call:USD`.
    #[arg(long, default_value = "token:0.24")]
    weak_price: String,
    /// Strong model's price, as --weak-price (default: RouteLLM's GPT-4 price).
    #[arg(long, default_value = "token:24.7")]
    strong_price: String,
    /// Output tokens charged for an answer whose text was not recorded.
    #[arg(long, default_value_t = 1)]
    output_tokens: u64,
    /// Hard cap: at most this many strong-model calls per run.
    #[arg(long)]
    max_strong_calls: Option<u64>,
    /// Hard cap: at most this many dollars of strong-model spend per run.
    #[arg(long)]
    max_usd: Option<f64>,
    /// Skip malformed lines (and report how many) instead of stopping at the first.
    #[arg(long)]
    skip_bad: bool,
    /// Evaluate only the first N items of the shuffled stream.
    #[arg(long)]
    limit: Option<usize>,
    /// Worker threads for the curve runs (default: all cores).
    #[arg(long, value_parser = crate::at_least_one())]
    threads: Option<usize>,
    /// Comma-separated policies, e.g. `random,oracle,router:full,cascade:partial` (default: all that apply);
    /// for a cascade of N models: `random,oracle,ocl:full,ocl:partial`.
    #[arg(long)]
    policies: Option<String>,
    /// Do not use the records' metadata (e.g. `subject`) as router features.
    #[arg(long)]
    no_metadata: bool,
    /// The learned router's weight on the strong call's price, 0 to 1: 0 escalates where the
    /// quality gain is highest, 1 where the gain per dollar is.
    #[arg(long, default_value_t = 0.0)]
    cost_weight: f32,
    /// Start the learned router and cascade scorer from this prior (`tandem train --out`)
    /// instead of from nothing; they keep learning online. Its feature settings are used.
    #[arg(long)]
    prior: Option<PathBuf>,
    /// The learned router also reads MiniLM sentence vectors of the prompts, and the cascade
    /// scorer those of the prompts and the weak answers (beside their n-grams, and a
    /// nearest-neighbour estimate over past items). Needs the `minilm` asset
    /// (`scripts/setup minilm`); the vectors are computed once and cached under
    /// $TANDEM_HOME/embeddings.
    #[arg(long)]
    embed: bool,
}

fn parse_price(flag: &str, s: &str) -> Result<Price> {
    Price::parse(s).map_err(|e| anyhow::anyhow!("{flag} {s:?}: {e}"))
}

fn parse_policies(s: &str, has_responses: bool) -> Result<Vec<PolicySpec>> {
    let mut out = Vec::new();
    for item in s.split(',').map(str::trim).filter(|x| !x.is_empty()) {
        let (name, mode) = item.split_once(':').unwrap_or((item, ""));
        let kind = match name {
            "always-weak" => PolicyKind::AlwaysWeak,
            "always-strong" => PolicyKind::AlwaysStrong,
            "random" => PolicyKind::Random,
            "oracle" => PolicyKind::Oracle,
            "router" => PolicyKind::Router,
            "cascade" => PolicyKind::Cascade,
            other => bail!("--policies: unknown policy {other:?} (known: always-weak, always-strong, random, oracle, router, cascade)"),
        };
        if kind == PolicyKind::Cascade && !has_responses {
            bail!("--policies: `cascade` needs the weak model's recorded responses, and this file has none");
        }
        let learned = matches!(kind, PolicyKind::Router | PolicyKind::Cascade);
        out.extend(
            feedback_modes(item, mode, learned, "learned policies")?
                .into_iter()
                .map(|feedback| PolicySpec { kind, feedback }),
        );
    }
    if out.is_empty() {
        bail!("--policies: no policy named");
    }
    Ok(out)
}

/// The feedback modes `mode` (after the `:` of `item`) asks for: both when empty for a learned
/// policy, none for the others; `learned_names` names the learned ones in the error.
fn feedback_modes(
    item: &str,
    mode: &str,
    learned: bool,
    learned_names: &str,
) -> Result<Vec<FeedbackMode>> {
    Ok(match (mode, learned) {
        ("", true) => vec![FeedbackMode::Full, FeedbackMode::Partial],
        ("full", true) => vec![FeedbackMode::Full],
        ("partial", true) => vec![FeedbackMode::Partial],
        ("", false) | ("none", false) => vec![FeedbackMode::None],
        (m, _) => bail!("--policies: {item:?}: feedback mode {m:?} does not apply (full or partial for {learned_names})"),
    })
}

fn parse_ladder_policies(s: &str) -> Result<Vec<LadderSpec>> {
    let mut out = Vec::new();
    for item in s.split(',').map(str::trim).filter(|x| !x.is_empty()) {
        let (name, mode) = item.split_once(':').unwrap_or((item, ""));
        let policy = match name {
            "random" => LadderPolicy::Random,
            "oracle" => LadderPolicy::Oracle,
            "ocl" => LadderPolicy::Ocl,
            other => bail!("--policies: unknown policy {other:?} for a cascade of N models (known: random, oracle, ocl)"),
        };
        out.extend(
            feedback_modes(item, mode, policy == LadderPolicy::Ocl, "ocl")?
                .into_iter()
                .map(|feedback| LadderSpec { policy, feedback }),
        );
    }
    if out.is_empty() {
        bail!("--policies: no policy named");
    }
    Ok(out)
}

fn parse_model_prices(flags: &[String]) -> Result<Vec<(String, Price)>> {
    flags
        .iter()
        .map(|f| {
            let (name, spec) = f.split_once('=').with_context(|| {
                format!("--price {f:?}: expected NAME=token:IN[:OUT] or NAME=call:USD")
            })?;
            Ok((
                name.trim().to_string(),
                parse_price(&format!("--price {name}"), spec.trim())?,
            ))
        })
        .collect()
}

/// The weak and strong models: as named, or the less and more accurate of exactly two.
pub(crate) fn pick_models(
    data: &Dataset,
    weak: Option<&str>,
    strong: Option<&str>,
) -> Result<(usize, usize)> {
    let (w, s) = match (weak, strong) {
        (Some(w), Some(s)) => (data.model_index(w)?, data.model_index(s)?),
        (w, s) if data.models.len() == 2 => {
            let (a, b) = if data.quality(0) <= data.quality(1) {
                (0, 1)
            } else {
                (1, 0)
            };
            match (w, s) {
                (Some(w), None) => {
                    let w = data.model_index(w)?;
                    (w, 1 - w)
                }
                (None, Some(s)) => {
                    let s = data.model_index(s)?;
                    (1 - s, s)
                }
                _ => (a, b),
            }
        }
        _ => bail!(
            "{} has {} models ({}): name them with --weak and --strong",
            data.path.display(),
            data.models.len(),
            data.models.join(", ")
        ),
    };
    if w == s {
        bail!(
            "--weak and --strong name the same model {:?}",
            data.models[w]
        );
    }
    Ok((w, s))
}

/// One file's texts to encode: its prompts, the responses of `responses_of` (the model a cascade
/// scorer reads the answers of), only at `rows` (the rows the run replays; `None`: all of them),
/// so that `--limit` encodes only what it reads.
pub(crate) struct ToEmbed {
    pub data: Arc<Dataset>,
    pub responses_of: Option<usize>,
    pub rows: Option<Vec<usize>>,
}

/// MiniLM's vectors of every prompt of the files, and of every recorded response of the model
/// each names (the weak one, whose answers a cascade scorer reads; `None`: prompts only), from
/// the cache (one per file, named after it) or computed, with progress on stderr.
pub(crate) fn embed_texts(files: &[ToEmbed]) -> Result<Arc<dyn tandem_core::embed::Embedder>> {
    let store = tandem_models::assets::Store::default_home();
    crate::assets_cmd::ensure_installed(&store, &["minilm"])?;
    let mut all: Option<tandem_core::embed::EmbeddingTable> = None;
    for ToEmbed {
        data,
        responses_of,
        rows: subset,
    } in files
    {
        let rows: Vec<&tandem_eval::data::Row> = match subset {
            Some(ix) => ix.iter().filter_map(|&i| data.rows.get(i)).collect(),
            None => data.rows.iter().collect(),
        };
        let mut texts: Vec<&str> = rows.iter().map(|r| r.query.routing_text()).collect();
        if let Some(m) = *responses_of {
            texts.extend(
                rows.iter()
                    .filter_map(|r| r.response.get(m).and_then(Option::as_deref)),
            );
        }
        let name = data
            .path
            .file_stem()
            .map_or_else(|| "data".to_string(), |s| s.to_string_lossy().into_owned());
        let what = if responses_of.is_some() {
            "prompts and responses"
        } else {
            "prompts"
        };
        let bar = Progress::new(
            &format!("{what} of {name} embedded (MiniLM, once; then cached)"),
            texts.len() as u64,
        );
        let table = tandem_models::embed_cache::minilm_table(&store, &name, &texts, &mut |d, n| {
            bar.set_total(n as u64);
            bar.set(d as u64);
        })
        .with_context(|| format!("embedding the {what} of {}", data.path.display()))?;
        bar.finish();
        match &mut all {
            None => all = Some(table),
            Some(t) => t.extend(table)?,
        }
    }
    match all {
        Some(t) => Ok(Arc::new(t)),
        None => bail!("no files to embed"),
    }
}

pub fn run(a: EvalArgs) -> Result<()> {
    // A plot name that cannot be written fails now, not after the runs.
    if let Some(p) = &a.plot {
        svg_and_png(p)?;
    }
    let budget = BudgetLimits {
        max_calls: a.max_strong_calls,
        max_micros: match a.max_usd {
            None => None,
            Some(x) => Some(
                usd_to_micros(x)
                    .with_context(|| format!("--max-usd {x}: must be a non-negative amount"))?,
            ),
        },
    };
    budget
        .validate()
        .map_err(|e| anyhow::anyhow!("{e} (--max-strong-calls / --max-usd)"))?;
    let weak_price = parse_price("--weak-price", &a.weak_price)?;
    let strong_price = parse_price("--strong-price", &a.strong_price)?;

    let data = load_data(&a.data, a.skip_bad)?;
    let cascade =
        !a.tiers.is_empty() || (data.models.len() > 2 && a.weak.is_none() && a.strong.is_none());
    if cascade {
        if a.embed || a.cost_weight > 0.0 {
            bail!("--embed and --cost-weight apply to the learned router of two models (--weak and --strong); a cascade of {} models has none", data.models.len());
        }
        return run_ladder(a, data, budget);
    }
    if !a.prices.is_empty() {
        bail!("--price prices the models of a cascade (--tiers, or a file of three or more models); with two, use --weak-price and --strong-price");
    }
    let (weak, strong) = pick_models(&data, a.weak.as_deref(), a.strong.as_deref())?;
    let has_responses = data.has_responses(weak);
    let policies = match &a.policies {
        Some(s) => parse_policies(s, has_responses)?,
        None => default_policies(has_responses),
    };
    let prior = match &a.prior {
        Some(p) => {
            let prior = tandem_core::prior::Prior::load(p)?;
            println!("{}", describe_prior(p, &prior));
            Some(Arc::new(prior))
        }
        None => None,
    };
    let data = Arc::new(data);
    let learns = |k: PolicyKind| policies.iter().any(|p| p.kind == k);
    if a.embed && !learns(PolicyKind::Router) && !learns(PolicyKind::Cascade) {
        bail!("--embed: the sentence vectors are read by the learned router and cascade scorer, and --policies runs neither");
    }
    // Before encoding: a prior that cannot take these vectors (or needs some) fails at once.
    if let Some(p) = &prior {
        let name = a.embed.then(tandem_models::embed_cache::minilm_table_name);
        check_prior_encoder(p, name.as_deref())?;
    }
    let embedder = if a.embed {
        // The weak answers' vectors only where a cascade scorer reads them.
        let responses_of = learns(PolicyKind::Cascade).then_some(weak);
        // Only the rows this run replays (`--limit`), in any order: vectors are looked up by text.
        let rows = a
            .limit
            .map(|l| tandem_eval::stream_order(data.rows.len(), a.seed, Some(l)));
        Some(embed_texts(&[ToEmbed {
            data: data.clone(),
            responses_of,
            rows,
        }])?)
    } else {
        None
    };
    let items = data.rows.len();
    let models = Models {
        data,
        weak,
        strong,
        weak_price,
        strong_price,
        default_output_tokens: a.output_tokens,
    };
    let cfg = EvalConfig {
        seed: a.seed,
        target_share: a.target_share,
        explore: a.explore,
        grid: a.grid,
        window: a.window,
        budget,
        threads: threads(&a),
        limit: a.limit,
        policies,
        router: RouterConfig {
            use_metadata: !a.no_metadata,
            ..RouterConfig::default()
        },
        cascade: CascadeConfig::default(),
        prior,
        cost_weight: a.cost_weight,
        embedder,
    };
    cfg.validate()?;
    let report = with_progress(total_work(&cfg, items), |p| evaluate(&models, &cfg, p))?;
    print!("{}", report.table());
    write_outputs(&a, &report, write_plot, Some(write_cost_plot))
}

/// A cascade of the file's models (or --tiers), ordered by cost, with each policy's frontier.
fn run_ladder(a: EvalArgs, data: Dataset, budget: BudgetLimits) -> Result<()> {
    if a.weak.is_some() || a.strong.is_some() {
        bail!("--tiers runs a cascade of the models it names; --weak and --strong pick two models instead");
    }
    if a.prior.is_some() {
        bail!("--prior starts the two-model router and cascade scorer; a cascade of N models (--tiers, or a file of three or more) has no prior yet");
    }
    let prices = parse_model_prices(&a.prices)?;
    let items = data.rows.len();
    let ladder = Ladder::new(Arc::new(data), &a.tiers, &prices, a.output_tokens)?;
    let cfg = LadderConfig {
        seed: a.seed,
        target_share: a.target_share,
        explore: a.explore,
        grid: a.grid,
        budget,
        threads: threads(&a),
        limit: a.limit,
        policies: match &a.policies {
            Some(s) => parse_ladder_policies(s)?,
            None => default_ladder_policies(),
        },
    };
    cfg.validate()?;
    let report = with_progress(ladder_work(&cfg, items), |p| {
        evaluate_ladder(&ladder, &cfg, p)
    })?;
    print!("{}", report.table());
    // The ladder's plot already has a dollar panel beside the share one.
    write_outputs(&a, &report, write_ladder_plot, None)
}

/// Worker threads for the curve runs: --threads, or all cores.
fn threads(a: &EvalArgs) -> usize {
    a.threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Runs `evaluate` under a progress bar of `work` decisions, cleared when it is done.
fn with_progress<R>(
    work: u64,
    evaluate: impl FnOnce(&(dyn Fn(u64) + Sync)) -> Result<R, EvalError>,
) -> Result<R> {
    let bar = Progress::new("decisions", work);
    let report = evaluate(&|n| bar.inc(n))?;
    bar.finish();
    Ok(report)
}

type PlotFn<R> = fn(&R, &Path) -> Result<(), EvalError>;

/// Writes the report as JSON (--json) and its plot as SVG and PNG (--plot, or beside the JSON);
/// `cost_plot`, when given, also writes quality against dollars as `NAME-cost.svg` and `.png`.
fn write_outputs<R: serde::Serialize>(
    a: &EvalArgs,
    report: &R,
    plot: PlotFn<R>,
    cost_plot: Option<PlotFn<R>>,
) -> Result<()> {
    if let Some(path) = &a.json {
        crate::run_cmd::write_json(path, report)?;
        println!("wrote {}", path.display());
    }
    let svg_path = a
        .plot
        .clone()
        .or_else(|| a.json.as_ref().map(|j| j.with_extension("svg")));
    if let Some(given) = svg_path {
        let (svg, png) = svg_and_png(&given)?;
        plot(report, &svg)?;
        plot(report, &png)?;
        println!("wrote {} and {}", svg.display(), png.display());
        if let Some(cost_plot) = cost_plot {
            let svg = cost_plot_path(&svg);
            let png = svg.with_extension("png");
            cost_plot(report, &svg)?;
            cost_plot(report, &png)?;
            println!("wrote {} and {}", svg.display(), png.display());
        }
    }
    Ok(())
}

/// A prior whose router read sentence vectors needs the same encoder here, and one that did not
/// cannot be given vectors it never learned.
/// `embedder` is the name of the encoder whose vectors this run reads, if any.
pub(crate) fn check_prior_encoder(
    p: &tandem_core::prior::Prior,
    embedder: Option<&str>,
) -> Result<()> {
    match (p.info.embedder.as_deref(), embedder) {
        (Some(want), Some(e)) if want != e => bail!(
            "--prior: its router read {want}'s vectors, not {e}'s"
        ),
        (Some(want), None) => bail!("--prior: its router reads {want} sentence vectors: add --embed"),
        (None, Some(_)) => bail!("--prior: its router was trained without sentence vectors: drop --embed, or train it with --embed"),
        _ => Ok(()),
    }
}

/// One line on what a prior holds and what it was trained on.
pub(crate) fn describe_prior(path: &std::path::Path, p: &tandem_core::prior::Prior) -> String {
    let files: Vec<String> = p
        .info
        .trained_on
        .iter()
        .map(|t| format!("{} ({} items, {} vs {})", t.file, t.items, t.weak, t.strong))
        .collect();
    format!(
        "prior {}: router {}{}, cascade scorer {}; trained on {} ({} passes, seed {})",
        path.display(),
        if p.router.is_some() { "yes" } else { "no" },
        p.info
            .embedder
            .as_deref()
            .map_or(String::new(), |e| format!(" (reads {e} vectors)")),
        if p.cascade.is_some() { "yes" } else { "no" },
        files.join(", "),
        p.info.epochs,
        p.info.seed
    )
}

/// Loads a recorded file; with `skip_bad`, says how many bad lines were skipped (and the first
/// five) on stderr.
pub(crate) fn load_data(path: &std::path::Path, skip_bad: bool) -> Result<Dataset> {
    let data = Dataset::load(
        path,
        &LoadOptions {
            skip_bad,
            ..Default::default()
        },
    )?;
    if !data.skipped.is_empty() {
        eprintln!(
            "tandem: skipped {} bad lines of {} (--skip-bad):",
            data.skipped.len(),
            path.display()
        );
        for b in data.skipped.iter().take(5) {
            eprintln!("  line {}: {}", b.line, b.message);
        }
    }
    Ok(data)
}
