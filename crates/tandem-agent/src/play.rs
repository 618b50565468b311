//! One episode of a game: at each step a switching rule picks the small or the large policy, the
//! chosen one picks the action, and the large one's choices teach the small one (L4S).

use crate::actor::{shortlist, Choice, Context, LargePolicy, NgramActor};
use crate::env::Environment;
use crate::error::AgentError;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use tandem_core::engine::{Cascade, Next};
use tandem_core::londi::{Switch, SwitchConfig};
use tandem_core::policy::switching::{StepMeta, SwitchHandle, Switching};
use tandem_core::policy::teaching::Teaching;
use tandem_core::{Input, Query};

/// LONDI (Chen, Du, Mguni 2024) on the core's engine: a cascade of two tiers (small, large) whose
/// switching policy picks the entry tier at each step of an episode — the learned controller,
/// under LONDI-B its per-episode budget of large calls. Rewards and episode ends go to the
/// policy's handle.
pub struct Londi {
    engine: Cascade,
    episodes: SwitchHandle,
    loop_state: bool,
}

impl Londi {
    pub fn new(cfg: SwitchConfig) -> Result<Self, AgentError> {
        let policy = Switching::new(cfg)?;
        let episodes = policy.handle();
        Ok(Londi {
            engine: Cascade::new(2, Box::new(policy), Teaching::default())?,
            episodes,
            loop_state: false,
        })
    }

    /// Whether the controller reads the small policy's entropy and the episode's revisits of a
    /// state (default no: its confidence and margin only; measured no gain on BabyAI).
    pub fn loop_state(mut self, yes: bool) -> Self {
        self.loop_state = yes;
        self
    }

    /// The engine's entry for one step: the large policy when it enters at the top tier.
    fn decide(&mut self, text: String, meta: &StepMeta) -> Result<Switch, AgentError> {
        let mut query = Query {
            id: meta.episode.clone(),
            input: Input::Text(text),
            metadata: Default::default(),
        };
        meta.write(&mut query.metadata);
        let top = self.engine.top();
        // No tier has a price here: the policy decides before any call.
        let walk = self.engine.begin(&query, vec![0; top + 1])?;
        Ok(match walk.next() {
            Next::Call { tier, .. } if tier == top => Switch::Large,
            _ => Switch::Small,
        })
    }
}

/// Who decides between the small and the large policy.
pub enum Switcher<'a> {
    AlwaysSmall,
    AlwaysLarge,
    /// Large with probability `share` at each step.
    Random {
        share: f32,
        rng: &'a mut ChaCha8Rng,
    },
    /// Large when the small policy's confidence in its own choice is below `min_confidence`.
    Threshold {
        min_confidence: f32,
    },
    /// The learned controller (LONDI, or LONDI-B when its config has a budget).
    Londi {
        londi: &'a mut Londi,
        explore: bool,
    },
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    pub won: bool,
    /// Score over the game's maximum, in [0, 1].
    pub score: f32,
    pub steps: u32,
    pub large_calls: u32,
    /// Compute seconds of the large calls (as recorded, for replayed ones).
    pub large_seconds: f64,
    /// Who acted at each step, and the action.
    pub trace: Vec<(Switch, String)>,
}

pub struct Policies<'a> {
    pub small: &'a mut NgramActor,
    pub large: &'a mut dyn LargePolicy,
    /// Train the small policy on the large one's choices.
    pub l4s: bool,
    /// At most this many actions for the large policy to score ([`shortlist`]; 0: all).
    pub shortlist: usize,
}

/// The controller's view of a step: where the agent is, what it carries, what just happened.
fn state_text(s: &crate::env::GameState) -> String {
    format!("{}\n{}\n{}", s.description, s.inventory, s.observation)
}

/// Plays `game` from its start. `episode` names this play (the controller's episode); recordings
/// of the large policy are keyed by the environment's stable name of `game`.
pub fn play_episode<E: Environment + ?Sized>(
    env: &mut E,
    game: &E::Episode,
    episode: &str,
    p: &mut Policies,
    switcher: &mut Switcher,
    max_steps: u32,
) -> Result<Outcome, AgentError> {
    let name = E::name(game);
    let mut state = env.reset(game)?;
    let max_score = state.max_score.max(1) as f32;
    let mut history: Vec<String> = Vec::new();
    // The states of the episode so far, for the controller's loop feature.
    let mut seen: Vec<String> = Vec::new();
    let mut out = Outcome::default();
    let result = (|| {
        while !state.done && out.steps < max_steps {
            let ctx = Context {
                episode: &name,
                objective: &state.objective,
                observation: &state.observation,
                description: &state.description,
                inventory: &state.inventory,
                history: &history,
                admissible: &state.admissible,
                expert: state.expert.as_deref(),
            };
            let small = p.small.choose(&ctx)?;
            let here = state_text(&state);
            let choice = match switcher {
                Switcher::AlwaysSmall => Switch::Small,
                Switcher::AlwaysLarge => Switch::Large,
                Switcher::Random { share, rng } => {
                    if rng.gen::<f32>() < *share {
                        Switch::Large
                    } else {
                        Switch::Small
                    }
                }
                Switcher::Threshold { min_confidence } => {
                    if small.confidence() < *min_confidence {
                        Switch::Large
                    } else {
                        Switch::Small
                    }
                }
                Switcher::Londi { londi, explore } => londi.decide(
                    here.clone(),
                    &StepMeta {
                        episode: episode.to_string(),
                        step: Some(out.steps),
                        admissible: Some(state.admissible.len()),
                        small_confidence: Some(small.confidence()),
                        small_margin: Some(small.margin()),
                        small_entropy: londi.loop_state.then(|| small.entropy()),
                        revisits: londi
                            .loop_state
                            .then(|| seen.iter().filter(|s| **s == here).count() as u32),
                        greedy: !*explore,
                        no_learn: false,
                    },
                )?,
            };
            let index = if choice == Switch::Large {
                out.large_calls += 1;
                let large = large_choice(p.large, &ctx, p.shortlist)?;
                out.large_seconds += p.large.last_seconds();
                if p.l4s {
                    p.small.learn(&ctx, large.index, large.confidence())?;
                }
                if large.index == small.index {
                    if let Switcher::Londi { londi, .. } = switcher {
                        londi.episodes.lock().agreed(episode)?;
                    }
                }
                large.index
            } else {
                small.index
            };
            seen.push(here);
            let action = state.admissible[index].clone();
            let before = state.score;
            state = env.step(&action)?;
            out.trace.push((choice, action.clone()));
            history.push(action);
            out.steps += 1;
            if let Switcher::Londi { londi, .. } = switcher {
                let gained = (state.score - before) as f32 / max_score;
                if gained != 0.0 {
                    londi.episodes.reward(episode, gained)?;
                }
            }
        }
        Ok::<(), AgentError>(())
    })();
    if let Switcher::Londi { londi, .. } = switcher {
        // Close the episode whatever happened, so no half-episode stays open.
        londi.episodes.end_episode(episode);
    }
    result?;
    out.won = state.won;
    out.score = (state.score.max(0) as f32 / max_score).min(1.0);
    Ok(out)
}

/// The large policy's choice among the admissible actions, scoring only a shortlist of them when
/// there are more than `k` (the rest get probability 0).
fn large_choice(
    large: &mut dyn LargePolicy,
    ctx: &Context,
    k: usize,
) -> Result<Choice, AgentError> {
    let keep = shortlist(ctx, k);
    if keep.len() == ctx.admissible.len() {
        return large.choose(ctx);
    }
    let actions: Vec<String> = keep.iter().map(|&i| ctx.admissible[i].clone()).collect();
    let sub = large.choose(&Context {
        admissible: &actions,
        ..*ctx
    })?;
    let mut probs = vec![0.0; ctx.admissible.len()];
    for (j, &i) in keep.iter().enumerate() {
        probs[i] = sub.probs[j];
    }
    Ok(Choice {
        index: keep[sub.index],
        probs,
    })
}
