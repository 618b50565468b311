//! Recorded answers of several models to the same prompts, one JSON object a line, as the RouteLLM
//! files are: `{"id", "prompt", "correct": {model: bool}, "response": {model: text}?, ...}`, with
//! two or more models. Graded outcomes: `"score": {model: number}` beside or instead of `correct`
//! (any range, e.g. a 1–10 judge score), normalised per file to [0, 1] by the file's lowest and
//! highest score; quality is then the mean normalised score, as RouteLLM scores MT-Bench. `"cost": {model: dollars}?` records what each answer cost; a model's cost is
//! recorded on every line or on none (then its price comes from the command line).
//! Other string fields named in `metadata_fields` (e.g. `subject`) become query metadata; the
//! outcome fields are kept apart from the queries so that policies cannot see them.

use crate::error::EvalError;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tandem_core::money::usd_to_micros;
use tandem_core::{Micros, Query};

/// The largest magnitude a graded score may have: the largest f32, in which scores are kept.
const MAX_SCORE: f64 = f32::MAX as f64;

#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Skip malformed lines and count them, instead of failing on the first one.
    pub skip_bad: bool,
    /// Top-level string fields copied into query metadata.
    pub metadata_fields: Vec<String>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            skip_bad: false,
            metadata_fields: vec!["subject".to_string()],
        }
    }
}

/// One recorded item: the query, and per model whether it answered correctly and what it said.
#[derive(Debug, Clone)]
pub struct Row {
    pub query: Query,
    /// Indexed like [`Dataset::models`]: right or wrong (a graded file without `correct`: a
    /// normalised score of at least one half).
    pub correct: Vec<bool>,
    /// Each answer's quality in [0, 1]: 1 or 0 for right or wrong, or the normalised score.
    pub quality: Vec<f32>,
    pub response: Vec<Option<String>>,
    /// What each model's answer cost, when the file records it.
    pub cost: Vec<Option<Micros>>,
}

#[derive(Debug, Clone)]
pub struct BadLine {
    pub line: usize,
    pub message: String,
}

#[derive(Debug, Clone)]
pub struct Dataset {
    pub path: PathBuf,
    pub models: Vec<String>,
    pub rows: Vec<Row>,
    pub skipped: Vec<BadLine>,
    index: HashMap<String, usize>,
    /// Per model: the first record has its cost, so every record must.
    costed: Vec<bool>,
    /// The lowest and highest score of a graded file (its normalisation), None for right/wrong.
    pub graded: Option<(f64, f64)>,
    /// The first record has scores, so every record must.
    scored: bool,
    /// The first record says right or wrong (`correct`), so every record must.
    judged: bool,
}

impl Dataset {
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Self, EvalError> {
        let bytes = std::fs::read(path).map_err(|error| EvalError::Io {
            path: path.to_path_buf(),
            error,
        })?;
        Self::parse(path, &bytes, opts)
    }

    pub fn parse(path: &Path, bytes: &[u8], opts: &LoadOptions) -> Result<Self, EvalError> {
        let mut ds = Dataset {
            path: path.to_path_buf(),
            models: Vec::new(),
            rows: Vec::new(),
            skipped: Vec::new(),
            index: HashMap::new(),
            costed: Vec::new(),
            graded: None,
            scored: false,
            judged: false,
        };
        for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
            let line = i + 1;
            let result = std::str::from_utf8(raw)
                .map_err(|e| format!("invalid UTF-8 at byte {}", e.valid_up_to()))
                .and_then(|text| {
                    if text.trim().is_empty() {
                        Ok(None)
                    } else {
                        ds.parse_row(text, opts).map(Some)
                    }
                });
            match result {
                Ok(None) => {}
                Ok(Some(row)) => {
                    ds.index.insert(row.query.id.clone(), ds.rows.len());
                    ds.rows.push(row);
                }
                Err(message) if opts.skip_bad => ds.skipped.push(BadLine { line, message }),
                Err(message) => {
                    return Err(EvalError::BadLine {
                        path: path.to_path_buf(),
                        line,
                        message,
                    })
                }
            }
        }
        if ds.scored && !ds.rows.is_empty() {
            ds.normalise_scores()
                .map_err(|message| EvalError::BadFile {
                    path: path.to_path_buf(),
                    message,
                })?;
        }
        if ds.rows.is_empty() {
            let why = if ds.skipped.is_empty() {
                "no records: the file is empty".to_string()
            } else {
                format!("no valid records ({} bad lines skipped)", ds.skipped.len())
            };
            return Err(EvalError::BadFile {
                path: path.to_path_buf(),
                message: why,
            });
        }
        Ok(ds)
    }

    fn parse_row(&mut self, text: &str, opts: &LoadOptions) -> Result<Row, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("malformed JSON: {e}"))?;
        let obj = v.as_object().ok_or("expected a JSON object")?;
        let id = str_field(obj, "id")?;
        if self.index.contains_key(id) {
            return Err(format!(
                "field `id`: duplicate id {id:?} (each item must appear once)"
            ));
        }
        let prompt = str_field(obj, "prompt")?;
        let object = |field: &str, what: &str| match obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(o)) if o.is_empty() => Err(format!("field `{field}`: no models")),
            Some(Value::Object(o)) => Ok(Some(o)),
            Some(_) => Err(format!(
                "field `{field}`: expected an object of model name to {what}"
            )),
        };
        let correct = object("correct", "true/false")?;
        let scores = object("score", "a number")?;
        // The first valid record fixes the model set and whether scores are recorded;
        // `models` is only set once it parsed whole.
        let first = self.models.is_empty();
        let models: Vec<String> = match (first, correct.or(scores)) {
            (false, _) => self.models.clone(),
            (true, Some(o)) => o.keys().cloned().collect(),
            (true, None) => return Err("missing field `correct` (or `score`)".into()),
        };
        let scored = if first { scores.is_some() } else { self.scored };
        match (scored, scores.is_some()) {
            (true, false) => {
                return Err("missing field `score` (the first record has it; record scores on every line or on none)".into())
            }
            (false, true) => {
                return Err("field `score`: the first record has no scores (record scores on every line or on none)".into())
            }
            _ => {}
        }
        let judged = if first {
            correct.is_some()
        } else {
            self.judged
        };
        if judged != correct.is_some() {
            return Err(if judged {
                "missing field `correct` (the first record has it; record it on every line or on none)".into()
            } else {
                "field `correct`: the first record has none (record it on every line or on none)"
                    .into()
            });
        }
        if correct.is_none() && scores.is_none() {
            return Err("missing field `correct` (or `score`)".into());
        }
        let mut row_correct = Vec::with_capacity(models.len());
        let mut row_quality = Vec::with_capacity(models.len());
        for m in &models {
            // Raw scores for now: normalised once the whole file is read.
            let score = match scores {
                None => None,
                Some(o) => {
                    let v = o.get(m).ok_or_else(|| {
                        format!("missing field `score.{m}` (the first record has it)")
                    })?;
                    let x = v
                        .as_f64()
                        .ok_or_else(|| format!("field `score.{m}`: expected a number, got {v}"))?;
                    // Scores are kept as f32: a larger one would become infinite, and the
                    // file's normalisation NaN.
                    if !(x.is_finite() && x.abs() <= MAX_SCORE) {
                        return Err(format!(
                                "field `score.{m}`: {v} is out of range (scores are finite numbers between -3.4e38 and 3.4e38)"
                            ));
                    }
                    Some(x)
                }
            };
            let right = match correct {
                None => None,
                Some(o) => {
                    let c = o.get(m).ok_or_else(|| {
                        format!("missing field `correct.{m}` (the first record has it)")
                    })?;
                    Some(c.as_bool().ok_or_else(|| {
                        format!("field `correct.{m}`: expected true or false, got {c}")
                    })?)
                }
            };
            row_correct.push(right.unwrap_or(false));
            row_quality.push(match (score, right) {
                (Some(s), _) => s as f32,
                (None, r) => f32::from(u8::from(r.unwrap_or(false))),
            });
        }
        if models.len() < 2 {
            // The field the model set was read from.
            let field = if correct.is_some() {
                "correct"
            } else {
                "score"
            };
            return Err(format!(
                "field `{field}`: only one model ({}); a cascade needs at least two",
                models.join(", ")
            ));
        }
        for (field, o) in [("correct", correct), ("score", scores)] {
            if let Some(extra) = o.and_then(|o| o.keys().find(|k| !models.contains(k))) {
                return Err(format!(
                    "field `{field}.{extra}`: model not in the first record"
                ));
            }
        }
        let responses = match obj.get("response") {
            None | Some(Value::Null) => None,
            Some(Value::Object(r)) => Some(r),
            Some(other) => {
                return Err(format!("field `response`: expected an object, got {other}"))
            }
        };
        let mut row_response = Vec::with_capacity(models.len());
        for m in &models {
            row_response.push(match responses.and_then(|r| r.get(m)) {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(other) => {
                    return Err(format!(
                        "field `response.{m}`: expected a string, got {other}"
                    ))
                }
            });
        }
        let costs = match obj.get("cost") {
            None | Some(Value::Null) => None,
            Some(Value::Object(c)) => Some(c),
            Some(other) => {
                return Err(format!(
                    "field `cost`: expected an object of model name to dollars, got {other}"
                ))
            }
        };
        if let Some(extra) = costs.and_then(|c| c.keys().find(|k| !models.contains(k))) {
            let of = if correct.is_some() {
                "correct"
            } else {
                "score"
            };
            return Err(format!("field `cost.{extra}`: model not in `{of}`"));
        }
        let mut row_cost = Vec::with_capacity(models.len());
        for (k, m) in models.iter().enumerate() {
            let cost = match costs.and_then(|c| c.get(m)) {
                None | Some(Value::Null) => None,
                Some(v) => Some(v.as_f64().and_then(usd_to_micros).ok_or_else(|| {
                    format!("field `cost.{m}`: expected a non-negative number of dollars, got {v}")
                })?),
            };
            // A cost recorded on some lines only would price the model two ways in one run.
            match (first, self.costed.get(k).copied().unwrap_or(false), cost) {
                (true, _, _) | (false, true, Some(_)) | (false, false, None) => {}
                (false, true, None) => {
                    return Err(format!(
                        "missing field `cost.{m}` (the first record has it; record a model's cost on every line or on none)"
                    ))
                }
                (false, false, Some(_)) => {
                    return Err(format!(
                        "field `cost.{m}`: the first record has no cost for this model (record a model's cost on every line or on none)"
                    ))
                }
            }
            row_cost.push(cost);
        }
        let mut metadata = BTreeMap::new();
        for f in &opts.metadata_fields {
            match obj.get(f) {
                None | Some(Value::Null) => {}
                Some(Value::String(s)) => {
                    metadata.insert(f.clone(), s.clone());
                }
                Some(other) => return Err(format!("field `{f}`: expected a string, got {other}")),
            }
        }
        let mut query = Query::text(id, prompt);
        query.metadata = metadata;
        if first {
            self.costed = row_cost.iter().map(Option::is_some).collect();
            self.models = models;
            self.scored = scored;
            self.judged = judged;
        }
        Ok(Row {
            query,
            correct: row_correct,
            quality: row_quality,
            response: row_response,
            cost: row_cost,
        })
    }

    pub fn model_index(&self, name: &str) -> Result<usize, EvalError> {
        self.models
            .iter()
            .position(|m| m == name)
            .ok_or_else(|| EvalError::BadFile {
                path: self.path.clone(),
                message: format!(
                    "model {name:?} is not in the file (it has: {})",
                    self.models.join(", ")
                ),
            })
    }

    /// Maps every raw score to [0, 1] by the file's lowest and highest; right/wrong follows (at
    /// least one half) where the file gives no `correct`.
    ///
    /// Errors: every score is the same (nothing tells a better answer from a worse one, and
    /// both models would score 100%), or the range does not normalise to finite numbers.
    fn normalise_scores(&mut self) -> Result<(), String> {
        let (lo, hi) = self
            .rows
            .iter()
            .flat_map(|r| r.quality.iter().copied())
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
                (lo.min(f64::from(x)), hi.max(f64::from(x)))
            });
        let span = hi - lo;
        if !span.is_finite() {
            return Err(format!(
                "field `score`: the scores run from {lo:e} to {hi:e}, a range too wide to normalise"
            ));
        }
        if span <= 0.0 {
            return Err(format!(
                "field `score`: every score in the file is {lo}, so no answer is better than another; record differing scores, or `correct` alone"
            ));
        }
        self.graded = Some((lo, hi));
        for r in &mut self.rows {
            for (q, c) in r.quality.iter_mut().zip(r.correct.iter_mut()) {
                *q = ((f64::from(*q) - lo) / span) as f32;
                if !self.judged {
                    *c = *q >= 0.5;
                }
            }
        }
        Ok(())
    }

    pub fn row_of(&self, id: &str) -> Option<&Row> {
        self.index.get(id).and_then(|&i| self.rows.get(i))
    }

    /// The model's mean quality: its share of right answers, or its mean normalised score.
    pub fn quality(&self, model: usize) -> f64 {
        let sum: f64 = self
            .rows
            .iter()
            .map(|r| f64::from(r.quality.get(model).copied().unwrap_or(0.0)))
            .sum();
        sum / self.rows.len().max(1) as f64
    }

    /// Whether the file records what `model`'s answers cost (then on every line).
    pub fn has_costs(&self, model: usize) -> bool {
        self.costed.get(model).copied().unwrap_or(false)
    }

    /// Whether every row has a recorded response of `model` (needed by cascade policies).
    pub fn has_responses(&self, model: usize) -> bool {
        self.rows
            .iter()
            .all(|r| r.response.get(model).is_some_and(Option::is_some))
    }
}

fn str_field<'a>(obj: &'a Map<String, Value>, name: &str) -> Result<&'a str, String> {
    match obj.get(name) {
        None => Err(format!("missing field `{name}`")),
        Some(Value::String(s)) if s.trim().is_empty() => Err(format!("field `{name}`: empty")),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(format!("field `{name}`: expected a string, got {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, skip_bad: bool) -> Result<Dataset, EvalError> {
        Dataset::parse(
            Path::new("t.jsonl"),
            text.as_bytes(),
            &LoadOptions {
                skip_bad,
                ..Default::default()
            },
        )
    }

    /// Graded files: scores in any range are normalised by the file's lowest and highest;
    /// right/wrong follows the score where `correct` is absent, and is kept where given.
    #[test]
    fn scores_are_normalised_per_file() {
        let ds = parse(
            "{\"id\":\"a\",\"prompt\":\"p\",\"score\":{\"w\":1,\"s\":10}}\n\
             {\"id\":\"b\",\"prompt\":\"q\",\"score\":{\"w\":4,\"s\":7}}\n",
            false,
        )
        .unwrap();
        let (w, st) = (ds.model_index("w").unwrap(), ds.model_index("s").unwrap());
        assert_eq!(ds.graded, Some((1.0, 10.0)));
        assert_eq!((ds.rows[0].quality[w], ds.rows[0].quality[st]), (0.0, 1.0));
        assert_eq!(
            (ds.rows[1].quality[w], ds.rows[1].quality[st]),
            (1.0 / 3.0, 2.0 / 3.0)
        );
        assert_eq!(
            (ds.rows[1].correct[w], ds.rows[1].correct[st]),
            (false, true)
        );
        assert!((ds.quality(st) - (1.0 + 2.0 / 3.0) / 2.0).abs() < 1e-6);
        // Beside `correct`: the score is the quality, `correct` stays as recorded.
        let ds = parse(
            "{\"id\":\"a\",\"prompt\":\"p\",\"correct\":{\"w\":true,\"s\":true},\"score\":{\"w\":0.2,\"s\":0.9}}\n\
             {\"id\":\"b\",\"prompt\":\"q\",\"correct\":{\"w\":false,\"s\":true},\"score\":{\"w\":0.1,\"s\":0.5}}\n",
            false,
        )
        .unwrap();
        let w = ds.model_index("w").unwrap();
        assert_eq!(ds.rows[0].correct, vec![true, true]);
        assert!((ds.rows[0].quality[w] - 0.125).abs() < 1e-6);
        // Right/wrong files are unchanged: quality 1 or 0.
        let ds = parse(GOOD, false).unwrap();
        let (w, st) = (ds.model_index("w").unwrap(), ds.model_index("s").unwrap());
        assert_eq!(ds.graded, None);
        assert_eq!((ds.rows[0].quality[w], ds.rows[0].quality[st]), (1.0, 0.0));
    }

    #[test]
    fn bad_scores_are_named() {
        for (text, needle) in [
            (
                "{\"id\":\"a\",\"prompt\":\"p\",\"score\":{\"w\":\"high\",\"s\":1}}",
                "t.jsonl:1: field `score.w`: expected a number",
            ),
            (
                "{\"id\":\"a\",\"prompt\":\"p\",\"score\":{\"w\":1,\"s\":2}}\n{\"id\":\"b\",\"prompt\":\"q\",\"correct\":{\"w\":true,\"s\":true}}",
                "t.jsonl:2: missing field `score`",
            ),
            (
                "{\"id\":\"a\",\"prompt\":\"p\",\"correct\":{\"w\":true,\"s\":true}}\n{\"id\":\"b\",\"prompt\":\"q\",\"correct\":{\"w\":true,\"s\":true},\"score\":{\"w\":1,\"s\":2}}",
                "t.jsonl:2: field `score`: the first record has no scores",
            ),
            (
                "{\"id\":\"a\",\"prompt\":\"p\",\"score\":{\"w\":1,\"s\":2}}\n{\"id\":\"b\",\"prompt\":\"q\",\"score\":{\"w\":1}}",
                "t.jsonl:2: missing field `score.s`",
            ),
            (
                "{\"id\":\"a\",\"prompt\":\"p\",\"score\":{\"w\":1,\"s\":2}}\n{\"id\":\"b\",\"prompt\":\"q\",\"score\":{\"w\":1,\"s\":2,\"x\":3}}",
                "t.jsonl:2: field `score.x`: model not in the first record",
            ),
            (
                "{\"id\":\"a\",\"prompt\":\"p\"}",
                "t.jsonl:1: missing field `correct` (or `score`)",
            ),
            // Scores beyond f32's range, which would normalise to NaN.
            (
                "{\"id\":\"a\",\"prompt\":\"p\",\"score\":{\"small\":1e308,\"big\":2}}",
                "t.jsonl:1: field `score.small`: 1e+308 is out of range",
            ),
            (
                "{\"id\":\"a\",\"prompt\":\"p\",\"score\":{\"w\":1,\"s\":2}}\n{\"id\":\"b\",\"prompt\":\"q\",\"score\":{\"w\":1,\"s\":-3.5e38}}",
                "t.jsonl:2: field `score.s`: -3.5e+38 is out of range",
            ),
            (
                "{\"id\":\"a\",\"prompt\":\"p\",\"score\":{\"w\":1,\"s\":2}}\n{\"id\":\"b\",\"prompt\":\"q\",\"score\":{\"w\":1e39,\"s\":2}}",
                "t.jsonl:2: field `score.w`: 1e+39 is out of range",
            ),
            // One model: the field the file names its models in.
            (
                "{\"id\":\"a\",\"prompt\":\"p\",\"score\":{\"w\":1}}",
                "t.jsonl:1: field `score`: only one model (w)",
            ),
            (
                "{\"id\":\"a\",\"prompt\":\"p\",\"correct\":{\"w\":true}}",
                "t.jsonl:1: field `correct`: only one model (w)",
            ),
            // No spread: nothing to normalise by.
            (
                "{\"id\":\"a\",\"prompt\":\"p\",\"score\":{\"w\":5,\"s\":5}}\n{\"id\":\"b\",\"prompt\":\"q\",\"score\":{\"w\":5,\"s\":5}}",
                "t.jsonl: field `score`: every score in the file is 5,",
            ),
            (
                "{\"id\":\"a\",\"prompt\":\"p\",\"correct\":{\"w\":true,\"s\":false},\"score\":{\"w\":0,\"s\":0}}",
                "t.jsonl: field `score`: every score in the file is 0,",
            ),
        ] {
            let e = parse(text, false).err().unwrap().to_string();
            assert!(e.contains(needle), "{needle}: {e}");
        }
        // The widest range f32 holds normalises to finite qualities.
        let ds = parse(
            "{\"id\":\"a\",\"prompt\":\"p\",\"score\":{\"w\":-3.4e38,\"s\":3.4e38}}\n{\"id\":\"b\",\"prompt\":\"q\",\"score\":{\"w\":0,\"s\":1}}",
            false,
        )
        .unwrap();
        assert!(ds
            .rows
            .iter()
            .flat_map(|r| &r.quality)
            .all(|q| q.is_finite() && (0.0..=1.0).contains(q)));
        // --skip-bad skips an out-of-range line and evaluates the rest.
        let ds = parse(
            "{\"id\":\"a\",\"prompt\":\"p\",\"score\":{\"w\":1e308,\"s\":2}}\n{\"id\":\"b\",\"prompt\":\"q\",\"score\":{\"w\":1,\"s\":2}}\n{\"id\":\"c\",\"prompt\":\"r\",\"score\":{\"w\":3,\"s\":9}}",
            true,
        )
        .unwrap();
        assert_eq!(ds.rows.len(), 2);
        assert_eq!(ds.skipped.len(), 1);
        assert_eq!(ds.skipped[0].line, 1);
        assert!(
            ds.skipped[0].message.contains("score.w"),
            "{}",
            ds.skipped[0].message
        );
        assert_eq!(ds.graded, Some((1.0, 9.0)));
    }

    const GOOD: &str =
        r#"{"id":"a","prompt":"p1","subject":"math","correct":{"w":true,"s":false}}"#;

    #[test]
    fn reads_rows_and_metadata() {
        let text = format!(
            "{GOOD}\n\n{}\n",
            r#"{"id":"b","prompt":"p2","correct":{"s":true,"w":false},"response":{"w":"x","s":"y"}}"#
        );
        let ds = parse(&text, false).unwrap();
        assert_eq!(ds.models, vec!["s", "w"]);
        assert_eq!(ds.rows.len(), 2);
        assert_eq!(
            ds.rows[0].query.metadata.get("subject").map(String::as_str),
            Some("math")
        );
        assert_eq!(ds.rows[1].correct, vec![true, false]);
        assert_eq!(ds.rows[1].response[1].as_deref(), Some("x"));
        assert!((ds.quality(1) - 0.5).abs() < 1e-12);
        assert!(!ds.has_responses(0));
    }

    fn err(text: &str) -> String {
        parse(text, false).unwrap_err().to_string()
    }

    #[test]
    fn bad_input_names_line_and_field() {
        assert_eq!(err(""), "t.jsonl: no records: the file is empty");
        assert!(err(&format!("{GOOD}\n{{not json")).starts_with("t.jsonl:2: malformed JSON"));
        assert_eq!(
            err(r#"{"prompt":"p","correct":{"w":true}}"#),
            "t.jsonl:1: missing field `id`"
        );
        assert_eq!(
            err(r#"{"id":"a","correct":{"w":true}}"#),
            "t.jsonl:1: missing field `prompt`"
        );
        assert_eq!(
            err(r#"{"id":"a","prompt":"p"}"#),
            "t.jsonl:1: missing field `correct` (or `score`)"
        );
        assert!(err(&format!(
            "{GOOD}\n{}",
            r#"{"id":"b","prompt":"p","correct":{"w":true}}"#
        ))
        .starts_with("t.jsonl:2: missing field `correct.s`"));
        assert!(err(r#"{"id":"a","prompt":"p","correct":{"w":"yes"}}"#)
            .contains("field `correct.w`: expected true or false"));
        assert!(err(&format!("{GOOD}\n{GOOD}")).contains("t.jsonl:2: field `id`: duplicate id"));
        assert!(err("[1,2]").contains("expected a JSON object"));
        let ds = parse(GOOD, false).unwrap();
        assert!(ds
            .model_index("gpt-5")
            .unwrap_err()
            .to_string()
            .contains("model \"gpt-5\" is not in the file"));
    }

    #[test]
    fn n_model_files_and_their_bad_input() {
        let l1 =
            r#"{"id":"a","prompt":"p","correct":{"s":true,"m":true,"b":false},"cost":{"m":0.5}}"#;
        let ds = parse(l1, false).unwrap();
        assert_eq!(ds.models, vec!["b", "m", "s"]);
        assert_eq!(ds.rows[0].cost, vec![None, Some(500_000), None]);
        assert!(ds.has_costs(1) && !ds.has_costs(0));
        let two = |second: &str| {
            err(&format!(
                "{l1}
{second}"
            ))
        };
        // A record missing a model.
        assert_eq!(
            two(r#"{"id":"b","prompt":"p","correct":{"s":true,"b":false},"cost":{"m":1}}"#),
            "t.jsonl:2: missing field `correct.m` (the first record has it)"
        );
        // Another model set.
        assert_eq!(
            two(
                r#"{"id":"b","prompt":"p","correct":{"s":true,"m":true,"b":false,"x":true},"cost":{"m":1}}"#
            ),
            "t.jsonl:2: field `correct.x`: model not in the first record"
        );
        // A cost recorded on some lines only, or for a model the file does not have.
        assert!(
            two(r#"{"id":"b","prompt":"p","correct":{"s":true,"m":true,"b":false}}"#)
                .starts_with("t.jsonl:2: missing field `cost.m` (the first record has it")
        );
        assert!(two(
            r#"{"id":"b","prompt":"p","correct":{"s":true,"m":true,"b":false},"cost":{"m":1,"s":2}}"#
        )
        .starts_with("t.jsonl:2: field `cost.s`: the first record has no cost for this model"));
        assert_eq!(
            err(r#"{"id":"a","prompt":"p","correct":{"s":true,"m":true},"cost":{"z":1}}"#),
            "t.jsonl:1: field `cost.z`: model not in `correct`"
        );
        // A cost that is not an amount of dollars.
        assert!(
            err(r#"{"id":"a","prompt":"p","correct":{"s":true,"m":true},"cost":{"m":-1}}"#)
                .starts_with(
                    "t.jsonl:1: field `cost.m`: expected a non-negative number of dollars"
                )
        );
        assert!(
            err(r#"{"id":"a","prompt":"p","correct":{"s":true,"m":true},"cost":{"m":"$1"}}"#)
                .contains("field `cost.m`: expected a non-negative number")
        );
        assert!(
            err(r#"{"id":"a","prompt":"p","correct":{"s":true,"m":true},"cost":3}"#)
                .starts_with("t.jsonl:1: field `cost`: expected an object")
        );
        // Fewer than two models.
        assert_eq!(
            err(r#"{"id":"a","prompt":"p","correct":{"s":true}}"#),
            "t.jsonl:1: field `correct`: only one model (s); a cascade needs at least two"
        );
    }

    #[test]
    fn skip_bad_counts_every_bad_line() {
        let text = format!("{GOOD}\nnope\n{}\n\u{0}", r#"{"id":"c"}"#);
        let ds = parse(&text, true).unwrap();
        assert_eq!(ds.rows.len(), 1);
        assert_eq!(
            ds.skipped.iter().map(|b| b.line).collect::<Vec<_>>(),
            vec![2, 3, 4]
        );
        assert!(parse("nope\n", true)
            .unwrap_err()
            .to_string()
            .contains("no valid records (1 bad lines skipped)"));
    }

    #[test]
    fn invalid_utf8_is_a_clear_error() {
        let e = Dataset::parse(Path::new("t.jsonl"), b"\xff\xfe\n", &LoadOptions::default())
            .unwrap_err();
        assert_eq!(e.to_string(), "t.jsonl:1: invalid UTF-8 at byte 0");
    }
}
