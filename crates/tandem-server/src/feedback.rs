//! Recent responses that can still receive feedback, and turning feedback into an observation.
//! Bounded: the oldest responses are forgotten first. Each response takes feedback once, so a
//! retried feedback call cannot teach the same lesson twice.

use crate::error::GatewayError;
use crate::openai::Feedback;
use std::collections::{HashMap, VecDeque};
use tandem_core::policy::response::agreement;
use tandem_core::policy::Observation;
use tandem_core::{Answer, Query};

/// Which model's answer was served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Served {
    Small,
    Large,
}

pub struct Pending {
    pub route: usize,
    pub query: Query,
    pub small: Option<Answer>,
    pub served: Served,
    pub served_text: String,
    /// Whether the learned model may learn from this response (not when the client said no_learn).
    pub learn: bool,
    /// An engine cascade's walk: which tiers answered what, for feedback to teach its policy.
    pub walk: Option<Box<tandem_core::engine::Walk>>,
}

pub struct FeedbackLog {
    capacity: usize,
    order: VecDeque<String>,
    pending: HashMap<String, Pending>,
}

impl FeedbackLog {
    pub fn new(capacity: usize) -> Self {
        FeedbackLog {
            capacity: capacity.max(1),
            order: VecDeque::new(),
            pending: HashMap::new(),
        }
    }

    pub fn insert(&mut self, id: String, p: Pending) {
        while self.order.len() >= self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.pending.remove(&old);
            }
        }
        self.order.push_back(id.clone());
        self.pending.insert(id, p);
    }

    /// Takes the response's record: feedback for it is then consumed.
    pub fn take(&mut self, id: &str) -> Option<Pending> {
        // The id stays in `order` until evicted; eviction of a missing key is harmless.
        self.pending.remove(id)
    }
}

/// The served answer's quality in [0, 1] from the feedback, and the observation it makes.
/// An engine cascade's outcomes per tier, from feedback on its response: the served tier's as
/// `o` says, and — when a reference answer is given — every tier that answered, graded against
/// it. None where nothing was revealed.
pub fn tier_outcomes(
    fb: &Feedback,
    o: &Observation,
    walk: &tandem_core::engine::Walk,
    tiers: usize,
) -> Vec<Option<f32>> {
    let mut out = vec![None; tiers];
    if let Some(r) = &fb.reference {
        for (reply, call) in walk.replies().iter().zip(walk.calls()) {
            if let (Some(t), Some(slot)) = (&reply.text, out.get_mut(call.tier)) {
                *slot = Some(agreement(t, r));
            }
        }
    }
    if let Some(k) = walk.finished() {
        let served = if k + 1 == tiers { o.strong } else { o.weak };
        if let (Some(y), Some(slot)) = (served, out.get_mut(k)) {
            *slot = Some(y);
        }
    }
    out
}

pub fn observation(fb: &Feedback, p: &Pending) -> Result<Observation, GatewayError> {
    let given = [
        fb.score.is_some(),
        fb.correct.is_some(),
        fb.reference.is_some(),
    ]
    .iter()
    .filter(|&&b| b)
    .count();
    if given != 1 {
        return Err(GatewayError::BadRequest(
            "feedback needs exactly one of `score` (0 to 1), `correct` (true/false) or `reference` (an answer)".into(),
        ));
    }
    let y = match (fb.score, fb.correct, &fb.reference) {
        (Some(s), _, _) => {
            if !(0.0..=1.0).contains(&s) {
                return Err(GatewayError::InvalidParam {
                    param: "score",
                    message: format!("`score` must be between 0 and 1, got {s}"),
                });
            }
            s as f32
        }
        (_, Some(c), _) => f32::from(u8::from(c)),
        (_, _, Some(r)) if r.trim().is_empty() => {
            return Err(GatewayError::InvalidParam {
                param: "reference",
                message: "`reference` must not be empty: give the answer to grade against".into(),
            })
        }
        (_, _, Some(r)) => agreement(&p.served_text, r),
        _ => 0.0,
    };
    let mut o = Observation::default();
    match p.served {
        Served::Small => o.weak = Some(y),
        Served::Large => o.strong = Some(y),
    }
    // A reference also grades the small draft of an escalated cascade.
    if let (Some(r), Some(small), Served::Large) = (&fb.reference, &p.small, p.served) {
        if let Some(t) = small.text() {
            o.weak = Some(agreement(t, r));
        }
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(served: Served) -> Pending {
        Pending {
            route: 0,
            query: Query::text("q", "2+2?"),
            small: None,
            served,
            served_text: "The answer is 4".into(),
            learn: true,
            walk: None,
        }
    }

    fn fb(score: Option<f64>, correct: Option<bool>, reference: Option<&str>) -> Feedback {
        Feedback {
            response_id: Some("r".into()),
            episode_id: None,
            reward: None,
            done: false,
            score,
            correct,
            reference: reference.map(str::to_string),
        }
    }

    #[test]
    fn feedback_grades_the_served_model() {
        let o = observation(&fb(None, Some(false), None), &pending(Served::Small)).unwrap();
        assert_eq!(
            o,
            Observation {
                weak: Some(0.0),
                strong: None
            }
        );
        let o = observation(&fb(Some(0.75), None, None), &pending(Served::Large)).unwrap();
        assert_eq!(o.strong, Some(0.75));
        let o = observation(&fb(None, None, Some("#### 4")), &pending(Served::Large)).unwrap();
        assert_eq!(o.strong, Some(1.0));
        assert!(observation(&fb(Some(1.5), None, None), &pending(Served::Small)).is_err());
        assert!(observation(&fb(Some(1.0), Some(true), None), &pending(Served::Small)).is_err());
        assert!(observation(&fb(None, None, None), &pending(Served::Small)).is_err());
    }

    #[test]
    fn the_log_is_bounded_and_feedback_is_taken_once() {
        let mut log = FeedbackLog::new(2);
        for id in ["a", "b", "c"] {
            log.insert(id.into(), pending(Served::Small));
        }
        assert!(log.take("a").is_none(), "evicted");
        assert!(log.take("b").is_some());
        assert!(log.take("b").is_none(), "taken once");
        assert!(log.take("c").is_some());
    }
}
