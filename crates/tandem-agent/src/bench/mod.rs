//! `tandem bench londi`: success and normalised score against large-call share on held-out
//! TextWorld games, for always-small, always-large, random switching, a small-confidence threshold,
//! LONDI at several switching costs and LONDI-B at several budgets; mean and spread over seeds.
//!
//! Protocol, per seed: the small policy is warmed up by imitating the large one on one pass over
//! the training games (the same for every method). Each method then plays `train_episodes`
//! episodes on the training games (the controller explores and learns; the small policy keeps
//! learning from every large call), then one episode per held-out game, greedily, still learning
//! online. Large-model scores are recorded, so reruns replay them.

mod plot;

use crate::actor::{LlmActor, LlmCost, NgramActor};
use crate::env::{GameSpec, TextWorld};
use crate::error::AgentError;
use crate::play::{play_episode, Londi, Outcome, Policies, Switcher};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::path::{Path, PathBuf};
use tandem_core::londi::SwitchConfig;

#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub train_seeds: Vec<u64>,
    pub test_seeds: Vec<u64>,
    pub rooms: u32,
    pub objects: u32,
    pub quest_length: u32,
    pub max_steps: u32,
    pub train_episodes: u32,
    pub run_seeds: Vec<u64>,
    pub costs: Vec<f32>,
    pub budgets: Vec<u32>,
    pub thresholds: Vec<f32>,
    pub games_dir: PathBuf,
    /// Log every held-out episode's actions.
    pub trace: bool,
    /// Run only the methods whose names start with one of these (all when empty).
    pub only: Vec<String>,
}

impl BenchConfig {
    pub fn full(games_dir: PathBuf) -> Self {
        BenchConfig {
            train_seeds: (1..=8).collect(),
            test_seeds: (1001..=1016).collect(),
            rooms: 3,
            objects: 4,
            quest_length: 2,
            max_steps: 12,
            train_episodes: 200,
            run_seeds: vec![1, 2, 3],
            costs: vec![0.02, 0.1],
            budgets: vec![2, 4],
            thresholds: vec![0.5, 0.8],
            games_dir,
            trace: false,
            only: Vec::new(),
        }
    }

    pub fn quick(games_dir: PathBuf) -> Self {
        BenchConfig {
            train_seeds: vec![1, 2],
            test_seeds: vec![1001, 1002],
            rooms: 3,
            objects: 4,
            quest_length: 2,
            max_steps: 10,
            train_episodes: 60,
            run_seeds: vec![1],
            costs: vec![0.05],
            budgets: vec![2],
            thresholds: vec![0.6],
            games_dir,
            trace: false,
            only: Vec::new(),
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
}

/// One method's figures on the held-out games, over seeds.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub name: String,
    /// Share of held-out episodes won (mean over seeds) and its spread (sample sd over seeds).
    pub success: f64,
    pub success_sd: f64,
    /// Mean normalised score.
    pub score: f64,
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
    pub train_seeds: Vec<u64>,
    pub test_seeds: Vec<u64>,
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

pub struct Bench<'a> {
    pub cfg: BenchConfig,
    pub env: &'a mut TextWorld,
    pub large: &'a mut LlmActor,
    pub large_name: String,
    pub log: &'a mut dyn FnMut(&str),
}

#[derive(Default)]
struct Tally {
    outcomes: Vec<Outcome>,
}

impl Bench<'_> {
    fn games(&mut self, seeds: &[u64]) -> Result<Vec<PathBuf>, AgentError> {
        let dir = self.cfg.games_dir.clone();
        seeds
            .iter()
            .map(|&s| self.env.make(self.cfg.spec(s), &dir))
            .collect()
    }

    pub fn run(&mut self) -> Result<Report, AgentError> {
        let train = self.games(&self.cfg.train_seeds.clone())?;
        let test = self.games(&self.cfg.test_seeds.clone())?;
        (self.log)(&format!(
            "{} training and {} held-out games in {}",
            train.len(),
            test.len(),
            self.cfg.games_dir.display()
        ));
        // Warm-up: the small policy imitates the large one on a pass over the training games.
        let mut warm = NgramActor::new(16, 0.5)?;
        for (i, g) in train.iter().enumerate() {
            let mut p = Policies {
                small: &mut warm,
                large: self.large,
                l4s: true,
            };
            play_episode(
                self.env,
                g,
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
            let runs = self.run_method(m, &warm, &train, &test)?;
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
            let runs = self.run_method(&m, &warm, &train, &test)?;
            rows.push(summarise(&m.name(), &runs, None));
            self.log_row(rows.last());
        }
        Ok(Report {
            games: format!(
                "TextWorld custom games: {} rooms, {} objects, quest length {}",
                self.cfg.rooms, self.cfg.objects, self.cfg.quest_length
            ),
            train_seeds: self.cfg.train_seeds.clone(),
            test_seeds: self.cfg.test_seeds.clone(),
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
                "{:<22} success {:5.1}% ±{:4.1}  score {:.2}  large share {:5.1}%  max large/episode {}",
                r.name,
                r.success * 100.0,
                r.success_sd * 100.0,
                r.score,
                r.large_share * 100.0,
                r.max_large_calls
            ));
        }
    }

    /// Per seed: training episodes, then the held-out games.
    fn run_method(
        &mut self,
        m: &Method,
        warm: &NgramActor,
        train: &[PathBuf],
        test: &[PathBuf],
    ) -> Result<Vec<Tally>, AgentError> {
        let mut out = Vec::new();
        for seed in self.cfg.run_seeds.clone() {
            let mut small = warm.clone();
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut controller = match m {
                Method::Londi { cost, budget } => Some(Londi::new(SwitchConfig {
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
                    ..Default::default()
                })?),
                _ => None,
            };
            let trains = matches!(m, Method::Londi { .. });
            if trains {
                let mut order: Vec<&PathBuf> = Vec::new();
                while order.len() < self.cfg.train_episodes as usize {
                    let mut pass: Vec<&PathBuf> = train.iter().collect();
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
                        g,
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
                    g,
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
        game: &Path,
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

fn summarise(name: &str, runs: &[Tally], budget: Option<u32>) -> Row {
    let per_seed: Vec<f64> = runs
        .iter()
        .map(|t| {
            t.outcomes.iter().filter(|o| o.won).count() as f64 / t.outcomes.len().max(1) as f64
        })
        .collect();
    let all: Vec<&Outcome> = runs.iter().flat_map(|t| &t.outcomes).collect();
    let n = all.len().max(1) as f64;
    let steps: u64 = all.iter().map(|o| o.steps as u64).sum();
    let large: u64 = all.iter().map(|o| o.large_calls as u64).sum();
    let mean = per_seed.iter().sum::<f64>() / per_seed.len().max(1) as f64;
    let sd = if per_seed.len() > 1 {
        (per_seed.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / (per_seed.len() - 1) as f64)
            .sqrt()
    } else {
        0.0
    };
    Row {
        name: name.to_string(),
        success: mean,
        success_sd: sd,
        score: all.iter().map(|o| o.score as f64).sum::<f64>() / n,
        large_share: large as f64 / steps.max(1) as f64,
        large_calls_per_episode: large as f64 / n,
        max_large_calls: all.iter().map(|o| o.large_calls).max().unwrap_or(0),
        steps_per_episode: steps as f64 / n,
        budget,
    }
}

pub use plot::plot_frontier;
