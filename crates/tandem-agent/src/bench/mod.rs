//! `tandem bench londi`: success and normalised score against large-call share on held-out
//! episodes of any [`Environment`] (TextWorld games, BabyAI-Text levels, ScienceWorld tasks), for
//! always-small, always-large, random switching, a small-confidence threshold, LONDI at several
//! switching costs and LONDI-B at several budgets; mean and spread over seeds.
//!
//! Protocol, per seed: the small policy is warmed up by imitating the large one on one pass over
//! the training episodes (the same for every method). Each method then plays `train_episodes`
//! episodes on the training games under its own switching rule (LONDI's controller explores and
//! learns; under every rule the small policy keeps learning from each large call; always-small
//! makes none and skips them), then one episode per held-out game, greedily, still learning
//! online. Large-model scores are recorded, so reruns replay them.

mod plot;

use crate::actor::{LargePolicy, LlmCost, NgramActor};
use crate::env::{Environment, GameSpec, TextWorld};
use crate::error::AgentError;
use crate::play::{play_episode, Londi, Outcome, Policies, Switcher};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::borrow::Borrow;
use std::path::PathBuf;
use tandem_core::londi::SwitchConfig;

/// How every environment's bench runs: steps, training, seeds and the methods' settings.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub max_steps: u32,
    pub train_episodes: u32,
    pub run_seeds: Vec<u64>,
    pub costs: Vec<f32>,
    pub budgets: Vec<u32>,
    pub thresholds: Vec<f32>,
    /// At most this many admissible actions scored by the large policy a step (0: all).
    pub shortlist: usize,
    /// The small policy also reads the reply's line about the goal ([`NgramActor::with_goal_line`]).
    pub goal_line: bool,
    /// Log every held-out episode's actions.
    pub trace: bool,
    /// Run only the methods whose names start with one of these (all when empty).
    pub only: Vec<String>,
    /// The controller also learns, where the large model chose the small one's action, that
    /// choosing small there would have done the same ([`SwitchConfig::counterfactual`]).
    pub counterfactual: bool,
    /// The controller's state includes the small policy's entropy and the episode's revisits of
    /// the state (loops), beside its confidence and margin.
    pub loop_state: bool,
    /// LONDI-B's switching cost c (`None`: the first of `costs`, else 0.02).
    pub budget_cost: Option<f32>,
}

impl BenchConfig {
    /// LONDI-B's switching cost c: `budget_cost`, else the first of `costs`, else 0.02.
    pub fn londi_b_cost(&self) -> f32 {
        self.budget_cost
            .or_else(|| self.costs.first().copied())
            .unwrap_or(0.02)
    }

    /// TextWorld's full bench.
    pub fn full() -> Self {
        BenchConfig {
            max_steps: 12,
            train_episodes: 200,
            run_seeds: vec![1, 2, 3],
            costs: vec![0.02, 0.1],
            budgets: vec![2, 4],
            thresholds: vec![0.5, 0.8],
            shortlist: 0,
            goal_line: false,
            trace: false,
            only: Vec::new(),
            counterfactual: true,
            loop_state: false,
            budget_cost: None,
        }
    }

    /// TextWorld's CI bench.
    pub fn quick() -> Self {
        BenchConfig {
            max_steps: 10,
            train_episodes: 60,
            run_seeds: vec![1],
            costs: vec![0.05],
            budgets: vec![2],
            thresholds: vec![0.6],
            shortlist: 0,
            goal_line: false,
            trace: false,
            only: Vec::new(),
            counterfactual: true,
            loop_state: false,
            budget_cost: None,
        }
    }
}

/// TextWorld's generated games: training and held-out seeds of the generator.
#[derive(Debug, Clone)]
pub struct TextWorldGames {
    pub train_seeds: Vec<u64>,
    pub test_seeds: Vec<u64>,
    pub rooms: u32,
    pub objects: u32,
    pub quest_length: u32,
    pub dir: PathBuf,
}

impl TextWorldGames {
    pub fn full(dir: PathBuf) -> Self {
        TextWorldGames {
            train_seeds: (1..=8).collect(),
            test_seeds: (1001..=1016).collect(),
            rooms: 3,
            objects: 4,
            quest_length: 2,
            dir,
        }
    }

    pub fn quick(dir: PathBuf) -> Self {
        TextWorldGames {
            train_seeds: vec![1, 2],
            test_seeds: vec![1001, 1002],
            ..TextWorldGames::full(dir)
        }
    }

    fn spec(&self, seed: u64) -> GameSpec {
        GameSpec {
            seed,
            rooms: self.rooms,
            objects: self.objects,
            quest_length: self.quest_length,
        }
    }

    /// The training and held-out game files, generated where missing.
    pub fn make(&self, env: &mut TextWorld) -> Result<(Vec<PathBuf>, Vec<PathBuf>), AgentError> {
        let mut make = |seeds: &[u64]| -> Result<Vec<PathBuf>, AgentError> {
            seeds
                .iter()
                .map(|&s| env.make(self.spec(s), &self.dir))
                .collect()
        };
        Ok((make(&self.train_seeds)?, make(&self.test_seeds)?))
    }

    pub fn describe(&self) -> String {
        format!(
            "TextWorld custom games: {} rooms, {} objects, quest length {}",
            self.rooms, self.objects, self.quest_length
        )
    }
}

/// One method's figures on the held-out games, over seeds. Spreads are sample sds over seeds,
/// `None` with one seed (not measured, rather than zero).
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub name: String,
    /// The switching rule: `always-small`, `always-large`, `threshold`, `londi`, `londi-b` or
    /// `random`.
    pub kind: &'static str,
    /// LONDI's and LONDI-B's switching cost c (reward units per large call).
    pub cost: Option<f32>,
    /// LONDI-B's budget: large calls per episode.
    pub budget: Option<u32>,
    /// The threshold rule's small-confidence threshold (large below it).
    pub threshold: Option<f32>,
    /// Random switching's probability of a large call per step: the share the rows in
    /// `matches` reached, to the percent.
    pub target_share: Option<f64>,
    /// Random rows: the LONDI and LONDI-B rows whose share this row matches.
    pub matches: Vec<String>,
    /// LONDI and LONDI-B rows: the random row run at this row's share (to the percent).
    pub random_row: Option<String>,
    /// Random switching's success at exactly this row's share: interpolated linearly between
    /// the shares the random rows reached (always-small and always-large, where they ran, are
    /// random switching at 0% and 100%); the nearest one's beyond them.
    pub random_at_share: Option<f64>,
    /// This row's success minus `random_at_share` (fraction; positive: LONDI ahead).
    pub vs_random: Option<f64>,
    /// Share of held-out episodes won (mean over seeds).
    pub success: f64,
    pub success_sd: Option<f64>,
    /// Mean normalised score in [0, 1].
    pub score: f64,
    pub score_sd: Option<f64>,
    /// Large-model compute seconds over the held-out episodes of one seed (replayed calls count
    /// the seconds they took when recorded).
    pub large_seconds: f64,
    pub large_seconds_sd: Option<f64>,
    /// Large calls over steps (mean over seeds of each seed's share).
    pub large_share: f64,
    pub large_share_sd: Option<f64>,
    pub large_calls_per_episode: f64,
    pub large_calls_per_episode_sd: Option<f64>,
    /// Most large calls in any one held-out episode (LONDI-B: never above its budget).
    pub max_large_calls: u32,
    pub steps_per_episode: f64,
    /// The figures of each seed, in the order of the report's `run_seeds`.
    pub per_seed: Vec<SeedFigures>,
}

/// One seed's figures over the held-out episodes.
#[derive(Debug, Clone, Serialize)]
pub struct SeedFigures {
    pub seed: u64,
    pub success: f64,
    pub score: f64,
    pub large_share: f64,
    pub large_calls_per_episode: f64,
    pub large_seconds: f64,
    pub max_large_calls: u32,
}

/// The settings a report was made with, as given or defaulted.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub costs: Vec<f32>,
    pub budgets: Vec<u32>,
    pub thresholds: Vec<f32>,
    /// LONDI-B rows run at this switching cost (`--budget-cost`, else the first of `costs`);
    /// `None` when no LONDI-B row ran.
    pub budget_cost: Option<f32>,
    pub shortlist: usize,
    pub goal_line: bool,
    pub counterfactual: bool,
    pub loop_state: bool,
    pub only: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The environment (`textworld`, `babyai`, `scienceworld`), as the caller names it.
    pub env: String,
    pub games: String,
    /// The training and held-out episodes by name.
    pub train: Vec<String>,
    pub test: Vec<String>,
    pub run_seeds: Vec<u64>,
    pub train_episodes: u32,
    pub max_steps: u32,
    pub large_model: String,
    pub settings: Settings,
    pub rows: Vec<Row>,
    /// LONDI's and LONDI-B's rows against random switching at their shares: mean of
    /// `vs_random` (fraction), and how many rows it averages.
    pub vs_random_mean: Option<f64>,
    pub vs_random_rows: usize,
    pub large_cost: LlmCost,
}

/// How one method switches, before its per-seed state exists.
#[derive(Debug, Clone)]
enum Method {
    AlwaysSmall,
    AlwaysLarge,
    /// A share to the percent, and the LONDI rows that reached it.
    Random(f64, Vec<String>),
    Threshold(f32),
    Londi {
        cost: f32,
        budget: Option<u32>,
    },
}

impl Method {
    fn kind(&self) -> &'static str {
        match self {
            Method::AlwaysSmall => "always-small",
            Method::AlwaysLarge => "always-large",
            Method::Random(..) => "random",
            Method::Threshold(_) => "threshold",
            Method::Londi { budget: None, .. } => "londi",
            Method::Londi {
                budget: Some(_), ..
            } => "londi-b",
        }
    }

    fn name(&self) -> String {
        match self {
            Method::AlwaysSmall => "always-small".into(),
            Method::AlwaysLarge => "always-large".into(),
            Method::Random(s, _) => format!("random {:.0}%", s * 100.0),
            Method::Threshold(t) => threshold_name(*t),
            Method::Londi { cost, budget } => londi_name(*cost, *budget),
        }
    }
}

/// The name of a confidence-threshold row ("small-confidence < 0.5").
pub fn threshold_name(threshold: f32) -> String {
    format!("small-confidence < {threshold}")
}

/// The name of a LONDI row ("LONDI c=0.02") or, with a budget of large calls per episode, a
/// LONDI-B row ("LONDI-B b=3 c=0.02").
pub fn londi_name(cost: f32, budget: Option<u32>) -> String {
    match budget {
        None => format!("LONDI c={cost}"),
        Some(b) => format!("LONDI-B b={b} c={cost}"),
    }
}

/// Whether `--only`'s names select the row `name` (all rows when `only` is empty): a name
/// selects the rows it begins, but never splits a number, so "LONDI c=0.1" selects neither
/// "LONDI c=0.15" nor, as "LONDI-B b=2", "LONDI-B b=20 c=0.02".
pub fn only_selects(only: &[String], name: &str) -> bool {
    only.is_empty()
        || only.iter().any(|o| {
            name.strip_prefix(o.as_str()).is_some_and(|rest| {
                !(rest.starts_with(|c: char| c.is_ascii_digit() || c == '.')
                    && o.ends_with(|c: char| c.is_ascii_digit() || c == '.'))
            })
        })
}

pub struct Bench<'a, E: Environment + ?Sized, G: Borrow<E::Episode>> {
    pub cfg: BenchConfig,
    pub env: &'a mut E,
    pub train: Vec<G>,
    pub test: Vec<G>,
    /// The environment's name (`textworld`, `babyai`, `scienceworld`), for the report.
    pub env_name: String,
    /// What the episodes are, for the report.
    pub games: String,
    pub large: &'a mut dyn LargePolicy,
    pub large_name: String,
    pub log: &'a mut dyn FnMut(&str),
}

#[derive(Default)]
struct Tally {
    outcomes: Vec<Outcome>,
}

impl<E: Environment + ?Sized, G: Borrow<E::Episode>> Bench<'_, E, G> {
    pub fn run(&mut self) -> Result<Report, AgentError> {
        let train = std::mem::take(&mut self.train);
        let test = std::mem::take(&mut self.test);
        let result = self.run_on(&train, &test);
        self.train = train;
        self.test = test;
        result
    }

    fn run_on(&mut self, train: &[G], test: &[G]) -> Result<Report, AgentError> {
        if test.is_empty() {
            return Err(AgentError::Env("no held-out episode to play".into()));
        }
        (self.log)(&format!(
            "{}: {} training and {} held-out episodes",
            self.games,
            train.len(),
            test.len(),
        ));
        let mut methods = vec![Method::AlwaysSmall, Method::AlwaysLarge];
        methods.extend(self.cfg.thresholds.iter().map(|&t| Method::Threshold(t)));
        methods.extend(self.cfg.costs.iter().map(|&c| Method::Londi {
            cost: c,
            budget: None,
        }));
        let budget_cost = self.cfg.londi_b_cost();
        methods.extend(self.cfg.budgets.iter().map(|&b| Method::Londi {
            cost: budget_cost,
            budget: Some(b),
        }));
        let only = self.cfg.only.clone();
        let keep = |name: &str| only_selects(&only, name);
        // Random switching is compared along the line from always-small (random at 0%) to
        // always-large (100%): where random rows run, so do those two.
        let randoms = keep("random ");
        let all_names: Vec<String> = methods.iter().map(Method::name).collect();
        methods.retain(|m| {
            keep(&m.name()) || (randoms && matches!(m, Method::AlwaysSmall | Method::AlwaysLarge))
        });
        // Every --only name must select a row (random rows are named by the shares reached).
        if let Some(o) = only.iter().find(|o| {
            !methods
                .iter()
                .any(|m| only_selects(std::slice::from_ref(o), &m.name()))
                && !o.starts_with("random")
        }) {
            return Err(AgentError::Config(format!(
                "--only {o:?} selects no row; the rows are: {} (and random rows at the shares \
                 the LONDI rows reach)",
                all_names.join(", ")
            )));
        }
        if methods.is_empty() {
            return Err(AgentError::Config("--only selects no row".into()));
        }
        // Warm-up: the small policy imitates the large one on a pass over the training episodes.
        let mut warm = NgramActor::new(16, 0.5)?.with_goal_line(self.cfg.goal_line);
        for (i, g) in train.iter().enumerate() {
            let mut p = Policies {
                small: &mut warm,
                large: self.large,
                l4s: true,
                shortlist: self.cfg.shortlist,
            };
            play_episode(
                self.env,
                g.borrow(),
                &format!("warmup-{i}"),
                &mut p,
                &mut Switcher::AlwaysLarge,
                self.cfg.max_steps,
            )?;
        }
        let mut rows = Vec::new();
        for m in &methods {
            let runs = self.run_method(m, &warm, train, test)?;
            rows.push(summarise(m, &runs, &self.cfg.run_seeds));
            self.log_row(rows.last());
        }
        // Random switching at the share each LONDI and LONDI-B row reached, for comparison at
        // equal share. Shares are matched to the percent: rows closer than that share one row.
        let mut shares: Vec<(f64, Vec<String>)> = Vec::new();
        for r in rows.iter().filter(|r| r.kind.starts_with("londi")) {
            let s = (r.large_share * 100.0).round() / 100.0;
            match shares.iter_mut().find(|(x, _)| *x == s) {
                Some((_, names)) => names.push(r.name.clone()),
                None => shares.push((s, vec![r.name.clone()])),
            }
        }
        shares.sort_by(|a, b| a.0.total_cmp(&b.0));
        for (s, names) in shares {
            // Random switching at 0% or 100% is always-small or always-large.
            if s <= 0.0 || s >= 1.0 {
                let to = if s <= 0.0 {
                    "always-small"
                } else {
                    "always-large"
                };
                for r in rows.iter_mut().filter(|r| names.contains(&r.name)) {
                    r.random_row = Some(to.to_string());
                }
                continue;
            }
            let m = Method::Random(s, names);
            if !keep(&m.name()) {
                continue;
            }
            let runs = self.run_method(&m, &warm, train, test)?;
            let random = summarise(&m, &runs, &self.cfg.run_seeds);
            for r in rows.iter_mut().filter(|r| random.matches.contains(&r.name)) {
                r.random_row = Some(random.name.clone());
            }
            rows.push(random);
            self.log_row(rows.last());
        }
        compare_with_random(&mut rows);
        let deltas: Vec<f64> = rows.iter().filter_map(|r| r.vs_random).collect();
        let vs_random_mean =
            (!deltas.is_empty()).then(|| deltas.iter().sum::<f64>() / deltas.len() as f64);
        let names = |gs: &[G]| gs.iter().map(|g| E::name(g.borrow())).collect();
        let c = &self.cfg;
        Ok(Report {
            env: self.env_name.clone(),
            games: self.games.clone(),
            train: names(train),
            test: names(test),
            run_seeds: self.cfg.run_seeds.clone(),
            train_episodes: self.cfg.train_episodes,
            max_steps: self.cfg.max_steps,
            large_model: self.large_name.clone(),
            settings: Settings {
                costs: c.costs.clone(),
                budgets: c.budgets.clone(),
                thresholds: c.thresholds.clone(),
                budget_cost: methods
                    .iter()
                    .any(|m| {
                        matches!(
                            m,
                            Method::Londi {
                                budget: Some(_),
                                ..
                            }
                        )
                    })
                    .then_some(budget_cost),
                shortlist: c.shortlist,
                goal_line: c.goal_line,
                counterfactual: c.counterfactual,
                loop_state: c.loop_state,
                only: c.only.clone(),
            },
            rows,
            vs_random_mean,
            vs_random_rows: deltas.len(),
            large_cost: self.large.cost(),
        })
    }

    fn log_row(&mut self, row: Option<&Row>) {
        if let Some(r) = row {
            (self.log)(&format!(
                "{:<22} success {:5.1}% {}  score {:.2}  large share {:5.1}%  large {:.1} s  max large/episode {}",
                r.name,
                r.success * 100.0,
                pm(r.success_sd, 100.0, 1),
                r.score,
                r.large_share * 100.0,
                r.large_seconds,
                r.max_large_calls
            ));
        }
    }

    /// Per seed: training episodes, then the held-out games.
    fn run_method(
        &mut self,
        m: &Method,
        warm: &NgramActor,
        train: &[G],
        test: &[G],
    ) -> Result<Vec<Tally>, AgentError> {
        let mut out = Vec::new();
        for seed in self.cfg.run_seeds.clone() {
            let mut small = warm.clone();
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut controller = match m {
                Method::Londi { cost, budget } => Some(
                    Londi::new(SwitchConfig {
                        cost: *cost,
                        budget: *budget,
                        optimism: 1.0,
                        // Episodes are short: returns to the end of the episode carry its reward
                        // straight back to every step.
                        n_step: self.cfg.max_steps,
                        learning_rate: 0.05,
                        epsilon_decay_episodes: self.cfg.train_episodes.max(1),
                        horizon: self.cfg.max_steps,
                        seed,
                        counterfactual: self.cfg.counterfactual,
                        ..Default::default()
                    })?
                    .loop_state(self.cfg.loop_state),
                ),
                _ => None,
            };
            // Every rule plays the training episodes, so the small policy learns (L4S) from its
            // own large calls as much under a baseline as under LONDI; always-small makes none.
            let trains = !matches!(m, Method::AlwaysSmall);
            if trains {
                let mut order: Vec<&G> = Vec::new();
                while !train.is_empty() && order.len() < self.cfg.train_episodes as usize {
                    let mut pass: Vec<&G> = train.iter().collect();
                    pass.shuffle(&mut rng);
                    order.extend(pass);
                }
                order.truncate(self.cfg.train_episodes as usize);
                for (i, g) in order.into_iter().enumerate() {
                    self.episode(
                        m,
                        &mut small,
                        controller.as_mut(),
                        &mut rng,
                        g.borrow(),
                        &format!("train-{seed}-{i}"),
                        true,
                    )?;
                }
            }
            let mut tally = Tally::default();
            for (i, g) in test.iter().enumerate() {
                let o = self.episode(
                    m,
                    &mut small,
                    controller.as_mut(),
                    &mut rng,
                    g.borrow(),
                    &format!("test-{seed}-{i}"),
                    false,
                )?;
                if self.cfg.trace {
                    let steps: Vec<String> = o
                        .trace
                        .iter()
                        .map(|(w, a)| format!("{}:{a}", &w.as_str()[..1]))
                        .collect();
                    (self.log)(&format!(
                        "{} seed {seed} game {i}: won {} score {:.2} | {}",
                        m.name(),
                        o.won,
                        o.score,
                        steps.join(" | ")
                    ));
                }
                tally.outcomes.push(o);
            }
            out.push(tally);
        }
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn episode(
        &mut self,
        m: &Method,
        small: &mut NgramActor,
        controller: Option<&mut Londi>,
        rng: &mut ChaCha8Rng,
        game: &E::Episode,
        id: &str,
        explore: bool,
    ) -> Result<Outcome, AgentError> {
        let mut switcher = match (m, controller) {
            (Method::AlwaysSmall, _) => Switcher::AlwaysSmall,
            (Method::AlwaysLarge, _) => Switcher::AlwaysLarge,
            (Method::Random(s, _), _) => Switcher::Random {
                share: *s as f32,
                rng,
            },
            (Method::Threshold(t), _) => Switcher::Threshold { min_confidence: *t },
            (Method::Londi { .. }, Some(londi)) => Switcher::Londi { londi, explore },
            (Method::Londi { .. }, None) => {
                return Err(AgentError::Env("LONDI without a controller".into()))
            }
        };
        let mut p = Policies {
            small,
            large: self.large,
            l4s: true,
            shortlist: self.cfg.shortlist,
        };
        play_episode(
            self.env,
            game,
            id,
            &mut p,
            &mut switcher,
            self.cfg.max_steps,
        )
    }
}

/// Sets each LONDI and LONDI-B row's `random_at_share` and `vs_random`: random switching's
/// success at the row's own share, read off the curve through the random rows' (share, success)
/// points, with always-small at 0% and always-large at 100% (random switching at p = 0 and 1).
/// The random rows are run at the LONDI rows' shares, but reach them only up to sampling noise;
/// the curve compares at exactly equal share.
fn compare_with_random(rows: &mut [Row]) {
    let mut curve: Vec<(f64, f64)> = rows
        .iter()
        .filter(|r| matches!(r.kind, "random" | "always-small" | "always-large"))
        .map(|r| (r.large_share, r.success))
        .collect();
    // Compared only where random switching was asked for (its rows, or its ends at 0% and 100%).
    if !rows
        .iter()
        .any(|r| r.kind == "random" || (r.kind.starts_with("londi") && r.random_row.is_some()))
    {
        return;
    }
    curve.sort_by(|a, b| a.0.total_cmp(&b.0));
    for r in rows.iter_mut().filter(|r| r.kind.starts_with("londi")) {
        let at = interpolate(&curve, r.large_share);
        r.random_at_share = at;
        r.vs_random = at.map(|y| r.success - y);
    }
}

/// The piecewise-linear curve through `points` (sorted by x) at `x`; the nearest end's y beyond
/// its ends; `None` without points.
fn interpolate(points: &[(f64, f64)], x: f64) -> Option<f64> {
    // Points at one x (two rows at one share) count as their mean.
    let mut merged: Vec<(f64, f64, f64)> = Vec::new();
    for &(px, py) in points {
        match merged.last_mut() {
            Some(m) if (m.0 - px).abs() <= f64::EPSILON => {
                m.1 += py;
                m.2 += 1.0;
            }
            _ => merged.push((px, py, 1.0)),
        }
    }
    let points: Vec<(f64, f64)> = merged.into_iter().map(|(x, y, n)| (x, y / n)).collect();
    let (first, last) = (points.first()?, points.last()?);
    if x <= first.0 {
        return Some(first.1);
    }
    if x >= last.0 {
        return Some(last.1);
    }
    let i = points.iter().position(|p| p.0 >= x)?;
    let (a, b) = (points[i - 1], points[i]);
    Some(a.1 + (b.1 - a.1) * (x - a.0) / (b.0 - a.0))
}

/// "± sd" scaled and to `digits` decimals, or "± n/a" where one seed gives no spread.
pub fn pm(sd: Option<f64>, scale: f64, digits: usize) -> String {
    match sd {
        Some(sd) => format!("±{:.*}", digits, sd * scale),
        None => "± n/a".to_string(),
    }
}

/// Mean and sample sd of per-seed figures (sd `None` for fewer than two seeds).
fn mean_sd(xs: &[f64]) -> (f64, Option<f64>) {
    let mean = xs.iter().sum::<f64>() / xs.len().max(1) as f64;
    let sd = (xs.len() > 1).then(|| {
        (xs.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / (xs.len() - 1) as f64).sqrt()
    });
    (mean, sd)
}

fn seed_figures(seed: u64, t: &Tally) -> SeedFigures {
    let n = t.outcomes.len().max(1) as f64;
    let steps: u64 = t.outcomes.iter().map(|o| u64::from(o.steps)).sum();
    let large: u64 = t.outcomes.iter().map(|o| u64::from(o.large_calls)).sum();
    SeedFigures {
        seed,
        success: t.outcomes.iter().filter(|o| o.won).count() as f64 / n,
        score: t.outcomes.iter().map(|o| f64::from(o.score)).sum::<f64>() / n,
        large_share: large as f64 / steps.max(1) as f64,
        large_calls_per_episode: large as f64 / n,
        large_seconds: t.outcomes.iter().map(|o| o.large_seconds).sum(),
        max_large_calls: t.outcomes.iter().map(|o| o.large_calls).max().unwrap_or(0),
    }
}

fn summarise(m: &Method, runs: &[Tally], seeds: &[u64]) -> Row {
    let per_seed: Vec<SeedFigures> = runs
        .iter()
        .zip(seeds)
        .map(|(t, &s)| seed_figures(s, t))
        .collect();
    let stat = |f: fn(&SeedFigures) -> f64| mean_sd(&per_seed.iter().map(f).collect::<Vec<_>>());
    let (success, success_sd) = stat(|s| s.success);
    let (score, score_sd) = stat(|s| s.score);
    let (large_seconds, large_seconds_sd) = stat(|s| s.large_seconds);
    let (large_share, large_share_sd) = stat(|s| s.large_share);
    let (large_calls_per_episode, large_calls_per_episode_sd) = stat(|s| s.large_calls_per_episode);
    let episodes: usize = runs.iter().map(|t| t.outcomes.len()).sum();
    let steps: u64 = runs
        .iter()
        .flat_map(|t| &t.outcomes)
        .map(|o| u64::from(o.steps))
        .sum();
    let (cost, budget, threshold, target_share, matches) = match m {
        Method::Londi { cost, budget } => (Some(*cost), *budget, None, None, Vec::new()),
        Method::Threshold(t) => (None, None, Some(*t), None, Vec::new()),
        Method::Random(s, names) => (None, None, None, Some(*s), names.clone()),
        Method::AlwaysSmall | Method::AlwaysLarge => (None, None, None, None, Vec::new()),
    };
    Row {
        name: m.name(),
        kind: m.kind(),
        cost,
        budget,
        threshold,
        target_share,
        matches,
        random_row: None,
        random_at_share: None,
        vs_random: None,
        success,
        success_sd,
        score,
        score_sd,
        large_seconds,
        large_seconds_sd,
        large_share,
        large_share_sd,
        large_calls_per_episode,
        large_calls_per_episode_sd,
        max_large_calls: per_seed
            .iter()
            .map(|s| s.max_large_calls)
            .max()
            .unwrap_or(0),
        steps_per_episode: steps as f64 / episodes.max(1) as f64,
        per_seed,
    }
}

pub use plot::plot_frontier;

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(won: bool, steps: u32, large_calls: u32) -> Outcome {
        Outcome {
            won,
            score: if won { 1.0 } else { 0.25 },
            steps,
            large_calls,
            large_seconds: f64::from(large_calls) * 0.5,
            trace: Vec::new(),
        }
    }

    fn tally(o: &[Outcome]) -> Tally {
        Tally {
            outcomes: o.to_vec(),
        }
    }

    #[test]
    fn one_seed_has_no_spread_and_two_seeds_have_one() {
        let m = Method::Londi {
            cost: 0.05,
            budget: Some(3),
        };
        let a = tally(&[outcome(true, 10, 2), outcome(false, 10, 3)]);
        let b = tally(&[outcome(true, 4, 0), outcome(true, 6, 3)]);
        let one = summarise(&m, std::slice::from_ref(&a), &[7]);
        assert_eq!(one.success, 0.5);
        assert_eq!(
            (one.success_sd, one.large_share_sd, one.score_sd),
            (None, None, None)
        );
        assert_eq!(one.per_seed.len(), 1);
        assert_eq!(one.per_seed[0].seed, 7);
        assert_eq!(
            (one.kind, one.cost, one.budget),
            ("londi-b", Some(0.05), Some(3))
        );

        let two = summarise(&m, &[a, b], &[7, 8]);
        // Seed 7: 1/2 won, 5 of 20 steps large; seed 8: 2/2 won, 3 of 10 steps large.
        assert!((two.success - 0.75).abs() < 1e-12);
        let sd = two.success_sd.unwrap();
        assert!((sd - (0.125f64).sqrt()).abs() < 1e-12, "{sd}");
        assert!((two.large_share - 0.275).abs() < 1e-12);
        assert!(two.large_share_sd.unwrap() > 0.0);
        assert!((two.large_calls_per_episode - 2.0).abs() < 1e-12);
        // 2.5 and 1.5 calls an episode.
        assert!((two.large_calls_per_episode_sd.unwrap() - 0.5f64.sqrt()).abs() < 1e-12);
        assert_eq!(two.max_large_calls, 3);
        assert_eq!(
            two.per_seed.iter().map(|s| s.seed).collect::<Vec<_>>(),
            [7, 8]
        );
        assert_eq!(two.per_seed[1].large_seconds, 1.5);
    }

    #[test]
    fn only_selects_whole_numbers_and_families() {
        let only = |o: &[&str], name: &str| {
            only_selects(&o.iter().map(|s| s.to_string()).collect::<Vec<_>>(), name)
        };
        assert!(only(&[], "LONDI c=0.1"));
        for (o, name, yes) in [
            ("LONDI c=0.1", "LONDI c=0.1", true),
            ("LONDI c=0.1", "LONDI c=0.15", false),
            ("LONDI c=0", "LONDI c=0.02", false),
            ("LONDI c=", "LONDI c=0.02", true),
            ("LONDI c", "LONDI c=0.02", true),
            ("LONDI c", "LONDI-B b=2 c=0.02", false),
            ("LONDI", "LONDI-B b=2 c=0.02", true),
            ("LONDI-B b=2", "LONDI-B b=2 c=0.02", true),
            ("LONDI-B b=2", "LONDI-B b=20 c=0.02", false),
            ("small-confidence < 0.9", "small-confidence < 0.95", false),
            ("small-confidence < 0.9", "small-confidence < 0.9", true),
            ("small", "small-confidence < 0.9", true),
            ("random 1", "random 16%", false),
            ("random 16", "random 16%", true),
            ("always", "always-large", true),
        ] {
            assert_eq!(only(&[o], name), yes, "{o:?} {name:?}");
        }
        assert!(only(&["LONDI c=0.1", "LONDI c=0.15"], "LONDI c=0.15"));
        assert_eq!(londi_name(0.02, Some(3)), "LONDI-B b=3 c=0.02");
        assert_eq!(threshold_name(0.5), "small-confidence < 0.5");
    }

    #[test]
    fn rows_carry_what_made_them() {
        let t = [tally(&[outcome(false, 5, 1)])];
        let r = summarise(&Method::Threshold(0.8), &t, &[1]);
        assert_eq!(
            (r.kind, r.threshold, r.cost),
            ("threshold", Some(0.8), None)
        );
        let names = vec!["LONDI c=0.1".to_string(), "LONDI-B b=2 c=0.1".to_string()];
        let r = summarise(&Method::Random(0.2, names.clone()), &t, &[1]);
        assert_eq!(r.target_share, Some(0.2));
        assert_eq!(r.name, "random 20%");
        assert_eq!((r.kind, r.matches), ("random", names));
        let r = summarise(&Method::AlwaysSmall, &t, &[1]);
        assert_eq!((r.kind, r.cost, r.threshold), ("always-small", None, None));
    }

    #[test]
    fn interpolation_reads_the_curve_at_the_share() {
        let pts = [(0.0, 0.6), (0.1, 0.7), (0.3, 0.8), (1.0, 1.0)];
        let at = |x| interpolate(&pts, x).unwrap();
        assert!((at(0.05) - 0.65).abs() < 1e-12);
        assert!((at(0.2) - 0.75).abs() < 1e-12);
        assert!((at(0.3) - 0.8).abs() < 1e-12);
        assert!((at(0.65) - 0.9).abs() < 1e-12);
        assert_eq!(at(-0.1), 0.6);
        assert_eq!(at(1.5), 1.0);
        assert_eq!(interpolate(&[], 0.5), None);
        assert_eq!(interpolate(&[(0.4, 0.5)], 0.1), Some(0.5));
        // Two random rows at one share: their mean.
        let two = interpolate(&[(0.0, 0.5), (0.4, 0.6), (0.4, 0.8)], 0.4).unwrap();
        assert!((two - 0.7).abs() < 1e-12, "{two}");
        let between = interpolate(&[(0.0, 0.5), (0.4, 0.6), (0.4, 0.8)], 0.2).unwrap();
        assert!((between - 0.6).abs() < 1e-12, "{between}");
    }

    #[test]
    fn londi_rows_are_compared_with_random_at_their_own_share() {
        let row = |m: Method, won: &[bool], large: u32| {
            let o: Vec<Outcome> = won.iter().map(|&w| outcome(w, 10, large)).collect();
            summarise(&m, &[tally(&o)], &[1])
        };
        let mut rows = vec![
            row(Method::AlwaysSmall, &[false, false, true, true], 0),
            row(Method::AlwaysLarge, &[true, true, true, true], 10),
            // 30% share, 3/4 won.
            row(
                Method::Londi {
                    cost: 0.1,
                    budget: None,
                },
                &[true, true, true, false],
                3,
            ),
            // Run at 30%, reached 40%, 3/4 won.
            row(
                Method::Random(0.3, vec!["LONDI c=0.1".into()]),
                &[true, true, true, false],
                4,
            ),
        ];
        rows[2].random_row = Some(rows[3].name.clone());
        compare_with_random(&mut rows);
        // The curve: (0, 0.5), (0.4, 0.75), (1, 1); at 0.3: 0.5 + 0.25 * 0.75 = 0.6875.
        let l = &rows[2];
        assert!((l.random_at_share.unwrap() - 0.6875).abs() < 1e-12, "{l:?}");
        assert!((l.vs_random.unwrap() - 0.0625).abs() < 1e-12);
        assert_eq!(rows[3].vs_random, None);
        // Without random rows (left out by --only, so the LONDI row names none) nothing is
        // compared, even with always-small and always-large present.
        for ends in [vec![0], vec![0, 1], vec![1]] {
            let mut alone: Vec<Row> = ends.iter().map(|&i| rows[i].clone()).collect();
            let mut l = rows[2].clone();
            l.random_row = None;
            l.vs_random = None;
            l.random_at_share = None;
            alone.push(l);
            compare_with_random(&mut alone);
            let l = alone.last().unwrap();
            assert_eq!((l.vs_random, l.random_at_share), (None, None), "{ends:?}");
        }
        // A LONDI row at 0% share is compared with always-small, its random switching.
        let mut at_zero = vec![rows[0].clone(), rows[1].clone()];
        let mut l = row(
            Method::Londi {
                cost: 0.4,
                budget: None,
            },
            &[true, false, true, true],
            0,
        );
        l.random_row = Some("always-small".into());
        at_zero.push(l);
        compare_with_random(&mut at_zero);
        assert!(
            (at_zero[2].vs_random.unwrap() - 0.25).abs() < 1e-12,
            "{:?}",
            at_zero[2]
        );
    }
}
