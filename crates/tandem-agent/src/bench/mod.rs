//! `tandem bench londi`: success and normalised score against large-call share on held-out
//! episodes of any [`Environment`] (TextWorld games, BabyAI-Text levels, ScienceWorld tasks), for
//! always-small, always-large, random switching, a small-confidence threshold, LONDI at several
//! switching costs and LONDI-B at several budgets; mean and spread over seeds.
//!
//! Protocol, per seed: the small policy is warmed up by imitating the large one on one pass over
//! the training episodes (the same for every method). Each method then plays `train_episodes`
//! episodes on the training games (the controller explores and learns; the small policy keeps
//! learning from every large call), then one episode per held-out game, greedily, still learning
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
}

impl BenchConfig {
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

/// One method's figures on the held-out games, over seeds.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub name: String,
    /// Share of held-out episodes won (mean over seeds) and its spread (sample sd over seeds).
    pub success: f64,
    pub success_sd: f64,
    /// Mean normalised score, and its sd over seeds.
    pub score: f64,
    pub score_sd: f64,
    /// Large-model compute seconds over the held-out episodes of one seed (mean, sd over seeds;
    /// replayed calls count the seconds they took when recorded).
    pub large_seconds: f64,
    pub large_seconds_sd: f64,
    /// Large calls over steps.
    pub large_share: f64,
    pub large_calls_per_episode: f64,
    /// Most large calls in any one held-out episode (LONDI-B: never above its budget).
    pub max_large_calls: u32,
    pub steps_per_episode: f64,
    pub budget: Option<u32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub games: String,
    /// The training and held-out episodes by name.
    pub train: Vec<String>,
    pub test: Vec<String>,
    pub run_seeds: Vec<u64>,
    pub train_episodes: u32,
    pub max_steps: u32,
    pub large_model: String,
    pub rows: Vec<Row>,
    pub large_cost: LlmCost,
}

/// How one method switches, before its per-seed state exists.
#[derive(Debug, Clone)]
enum Method {
    AlwaysSmall,
    AlwaysLarge,
    Random(f32),
    Threshold(f32),
    Londi { cost: f32, budget: Option<u32> },
}

impl Method {
    fn name(&self) -> String {
        match self {
            Method::AlwaysSmall => "always-small".into(),
            Method::AlwaysLarge => "always-large".into(),
            Method::Random(s) => format!("random {:.0}%", s * 100.0),
            Method::Threshold(t) => format!("small-confidence < {t}"),
            Method::Londi { cost, budget: None } => format!("LONDI c={cost}"),
            Method::Londi {
                cost,
                budget: Some(b),
            } => format!("LONDI-B b={b} c={cost}"),
        }
    }
}

pub struct Bench<'a, E: Environment + ?Sized, G: Borrow<E::Episode>> {
    pub cfg: BenchConfig,
    pub env: &'a mut E,
    pub train: Vec<G>,
    pub test: Vec<G>,
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
        let mut methods = vec![Method::AlwaysSmall, Method::AlwaysLarge];
        methods.extend(self.cfg.thresholds.iter().map(|&t| Method::Threshold(t)));
        methods.extend(self.cfg.costs.iter().map(|&c| Method::Londi {
            cost: c,
            budget: None,
        }));
        let budget_cost = self.cfg.costs.first().copied().unwrap_or(0.02);
        methods.extend(self.cfg.budgets.iter().map(|&b| Method::Londi {
            cost: budget_cost,
            budget: Some(b),
        }));
        let only = self.cfg.only.clone();
        let keep =
            |name: &str| only.is_empty() || only.iter().any(|o| name.starts_with(o.as_str()));
        methods.retain(|m| keep(&m.name()));
        let mut rows = Vec::new();
        for m in &methods {
            let runs = self.run_method(m, &warm, train, test)?;
            rows.push(summarise(&m.name(), &runs, method_budget(m)));
            self.log_row(rows.last());
        }
        // Random switching at the share each LONDI and LONDI-B row reached, for comparison at equal share.
        let mut shares: Vec<f32> = rows
            .iter()
            .filter(|r| r.name.starts_with("LONDI"))
            // Shares are matched to the percent: rows closer than that share one random row.
            .map(|r| (r.large_share as f32 * 100.0).round() / 100.0)
            .collect();
        shares.sort_by(f32::total_cmp);
        shares.dedup();
        for s in shares {
            let m = Method::Random(s);
            if !keep(&m.name()) {
                continue;
            }
            let runs = self.run_method(&m, &warm, train, test)?;
            rows.push(summarise(&m.name(), &runs, None));
            self.log_row(rows.last());
        }
        let names = |gs: &[G]| gs.iter().map(|g| E::name(g.borrow())).collect();
        Ok(Report {
            games: self.games.clone(),
            train: names(train),
            test: names(test),
            run_seeds: self.cfg.run_seeds.clone(),
            train_episodes: self.cfg.train_episodes,
            max_steps: self.cfg.max_steps,
            large_model: self.large_name.clone(),
            rows,
            large_cost: self.large.cost(),
        })
    }

    fn log_row(&mut self, row: Option<&Row>) {
        if let Some(r) = row {
            (self.log)(&format!(
                "{:<22} success {:5.1}% ±{:4.1}  score {:.2}  large share {:5.1}%  large {:.1} s  max large/episode {}",
                r.name,
                r.success * 100.0,
                r.success_sd * 100.0,
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
            let trains = matches!(m, Method::Londi { .. });
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
            (Method::Random(s), _) => Switcher::Random { share: *s, rng },
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

fn method_budget(m: &Method) -> Option<u32> {
    match m {
        Method::Londi { budget, .. } => *budget,
        _ => None,
    }
}

/// Mean and sample sd of per-seed figures (sd 0 for one seed).
fn mean_sd(xs: &[f64]) -> (f64, f64) {
    let mean = xs.iter().sum::<f64>() / xs.len().max(1) as f64;
    let sd = if xs.len() > 1 {
        (xs.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / (xs.len() - 1) as f64).sqrt()
    } else {
        0.0
    };
    (mean, sd)
}

fn summarise(name: &str, runs: &[Tally], budget: Option<u32>) -> Row {
    let per_seed = |f: &dyn Fn(&Outcome) -> f64, average: bool| -> Vec<f64> {
        runs.iter()
            .map(|t| {
                let sum: f64 = t.outcomes.iter().map(f).sum();
                if average {
                    sum / t.outcomes.len().max(1) as f64
                } else {
                    sum
                }
            })
            .collect()
    };
    let (success, success_sd) = mean_sd(&per_seed(&|o| f64::from(u8::from(o.won)), true));
    let (score, score_sd) = mean_sd(&per_seed(&|o| f64::from(o.score), true));
    let (large_seconds, large_seconds_sd) = mean_sd(&per_seed(&|o| o.large_seconds, false));
    let all: Vec<&Outcome> = runs.iter().flat_map(|t| &t.outcomes).collect();
    let n = all.len().max(1) as f64;
    let steps: u64 = all.iter().map(|o| o.steps as u64).sum();
    let large: u64 = all.iter().map(|o| o.large_calls as u64).sum();
    Row {
        name: name.to_string(),
        success,
        success_sd,
        score,
        score_sd,
        large_seconds,
        large_seconds_sd,
        large_share: large as f64 / steps.max(1) as f64,
        large_calls_per_episode: large as f64 / n,
        max_large_calls: all.iter().map(|o| o.large_calls).max().unwrap_or(0),
        steps_per_episode: steps as f64 / n,
        budget,
    }
}

pub use plot::plot_frontier;
