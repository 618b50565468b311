//! Between whole answers and streams of chunks, losing nothing: an [`Assembler`] merges a
//! stream's deltas into the whole answer (for the budget, feedback and learning); [`chunks_of`]
//! turns a whole answer into OpenAI's chunks (a cascade's judged draft sent to a streaming client);
//! [`for_client`] shapes what the client sees (tandem's id, the route as `model`, log-probabilities
//! only as asked).

use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

/// Fields a response or chunk carries at its top that describe the response itself, not an
/// answer; the rest (`system_fingerprint`, `service_tier`, unknown ones) pass through.
const OWN: [&str; 6] = ["id", "object", "created", "model", "choices", "usage"];

#[derive(Default)]
struct ChoiceAcc {
    message: Map<String, Value>,
    /// Tool calls by their stream index.
    tool_calls: BTreeMap<u64, Map<String, Value>>,
    finish_reason: Value,
    logprobs: Map<String, Value>,
    other: Map<String, Value>,
}

/// Merges a stream's chunks into the answer they spell.
#[derive(Default)]
pub struct Assembler {
    top: Map<String, Value>,
    choices: BTreeMap<u64, ChoiceAcc>,
    pub usage: Option<Value>,
    /// The first chunk's `created`.
    pub created: Option<Value>,
}

/// Appends strings; anything else is replaced by the newer value.
fn merge(dst: &mut Map<String, Value>, k: &str, v: &Value) {
    if v.is_null() && dst.contains_key(k) {
        return;
    }
    match (dst.get_mut(k), v) {
        (Some(Value::String(a)), Value::String(b)) => a.push_str(b),
        (Some(Value::Object(a)), Value::Object(b)) => {
            for (bk, bv) in b {
                merge(a, bk, bv);
            }
        }
        _ => {
            dst.insert(k.to_string(), v.clone());
        }
    }
}

impl Assembler {
    /// The fields beyond the answer (`system_fingerprint`, `service_tier`, unknown ones).
    pub fn top(&self) -> &Map<String, Value> {
        &self.top
    }

    pub fn feed(&mut self, chunk: &Map<String, Value>) {
        if self.created.is_none() {
            self.created = chunk.get("created").cloned();
        }
        for (k, v) in chunk {
            if !OWN.contains(&k.as_str()) {
                self.top.insert(k.clone(), v.clone());
            }
        }
        if let Some(u) = chunk.get("usage").filter(|u| u.is_object()) {
            self.usage = Some(u.clone());
        }
        let Some(cs) = chunk.get("choices").and_then(Value::as_array) else {
            return;
        };
        for c in cs {
            let idx = c["index"].as_u64().unwrap_or(0);
            let acc = self.choices.entry(idx).or_default();
            if let Some(d) = c["delta"].as_object() {
                for (k, v) in d {
                    if k == "tool_calls" {
                        for tc in v.as_array().into_iter().flatten() {
                            let ti = tc["index"].as_u64().unwrap_or(0);
                            let slot = acc.tool_calls.entry(ti).or_default();
                            for (tk, tv) in tc.as_object().into_iter().flatten() {
                                if tk != "index" {
                                    merge(slot, tk, tv);
                                }
                            }
                        }
                    } else {
                        merge(&mut acc.message, k, v);
                    }
                }
            }
            if c["finish_reason"].is_string() {
                acc.finish_reason = c["finish_reason"].clone();
            }
            if let Some(lp) = c["logprobs"].as_object() {
                for (k, v) in lp {
                    match (acc.logprobs.get_mut(k), v) {
                        (Some(Value::Array(a)), Value::Array(b)) => a.extend(b.iter().cloned()),
                        _ => {
                            acc.logprobs.insert(k.clone(), v.clone());
                        }
                    }
                }
            }
            for (k, v) in c.as_object().into_iter().flatten() {
                if !matches!(k.as_str(), "index" | "delta" | "finish_reason" | "logprobs") {
                    acc.other.insert(k.clone(), v.clone());
                }
            }
        }
    }

    /// The whole answer, as a `chat.completion` body (without `id`, `model`, `usage`: the caller's).
    pub fn body(&self) -> Map<String, Value> {
        let mut body = self.top.clone();
        body.insert("object".into(), json!("chat.completion"));
        let choices: Vec<Value> = self
            .choices
            .iter()
            .map(|(i, acc)| {
                let mut m = acc.message.clone();
                m.entry("role").or_insert(json!("assistant"));
                m.entry("content").or_insert(Value::Null);
                if !acc.tool_calls.is_empty() {
                    m.insert(
                        "tool_calls".into(),
                        Value::Array(
                            acc.tool_calls
                                .values()
                                .map(|t| Value::Object(t.clone()))
                                .collect(),
                        ),
                    );
                }
                let mut c = acc.other.clone();
                c.insert("index".into(), json!(i));
                c.insert("message".into(), Value::Object(m));
                c.insert(
                    "logprobs".into(),
                    if acc.logprobs.is_empty() {
                        Value::Null
                    } else {
                        Value::Object(acc.logprobs.clone())
                    },
                );
                c.insert("finish_reason".into(), acc.finish_reason.clone());
                Value::Object(c)
            })
            .collect();
        body.insert("choices".into(), Value::Array(choices));
        body
    }
}

/// Splits text after each run of whitespace, so pieces rejoin to exactly the text.
pub fn pieces(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut in_space = false;
    for (i, ch) in text.char_indices() {
        let space = ch.is_whitespace();
        if in_space && !space {
            out.push(&text[start..i]);
            start = i;
        }
        in_space = space;
    }
    if start < text.len() {
        out.push(&text[start..]);
    }
    out
}

/// A whole answer as OpenAI's chunks (without the usage chunk): per choice a role chunk, the
/// content in word-sized pieces (the choice's `logprobs` on the first), each tool call whole,
/// the message's other fields (refusal, reasoning, annotations, unknown ones) in one delta, and
/// a finish chunk with the choice's own `finish_reason` and other fields.
pub fn chunks_of(body: &Map<String, Value>) -> Vec<Map<String, Value>> {
    let top: Map<String, Value> = body
        .iter()
        .filter(|(k, _)| !OWN.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let chunk = |choice: Value| {
        let mut c = top.clone();
        c.insert("object".into(), json!("chat.completion.chunk"));
        c.insert("choices".into(), json!([choice]));
        c
    };
    let mut out = Vec::new();
    for (i, ch) in body
        .get("choices")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let index = ch["index"].as_u64().unwrap_or(i as u64);
        let msg = ch["message"].as_object().cloned().unwrap_or_default();
        let role = msg.get("role").cloned().unwrap_or(json!("assistant"));
        let mut logprobs = ch.get("logprobs").cloned().filter(|l| !l.is_null());
        let content = msg.get("content").and_then(Value::as_str).unwrap_or("");
        // A null content stays null (a tool call's turn); text starts empty and grows.
        let start = match msg.get("content") {
            Some(Value::String(_)) => json!(""),
            _ => Value::Null,
        };
        let first = json!({"index": index, "delta": {"role": role, "content": start}, "finish_reason": null});
        out.push(chunk(first));
        match logprobs.take().map(|lp| per_token(content, lp)) {
            // Token by token, each with its own entry, as the upstream would have streamed it.
            Some(Ok(tokens)) => {
                for (text, entry) in tokens {
                    out.push(chunk(json!({"index": index, "delta": {"content": text},
                        "logprobs": {"content": [entry]}, "finish_reason": null})));
                }
            }
            other => {
                let mut lp = other.and_then(|r| r.err());
                for p in pieces(content) {
                    let mut c =
                        json!({"index": index, "delta": {"content": p}, "finish_reason": null});
                    if let Some(lp) = lp.take() {
                        c["logprobs"] = lp;
                    }
                    out.push(chunk(c));
                }
                if let Some(lp) = lp {
                    // No content to carry them (a tool call): on a delta of their own.
                    out.push(chunk(
                        json!({"index": index, "delta": {}, "logprobs": lp, "finish_reason": null}),
                    ));
                }
            }
        }
        for (ti, tc) in msg
            .get("tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let mut t = tc.clone();
            if let Some(o) = t.as_object_mut() {
                o.insert("index".into(), json!(ti));
            }
            out.push(chunk(
                json!({"index": index, "delta": {"tool_calls": [t]}, "finish_reason": null}),
            ));
        }
        let rest: Map<String, Value> = msg
            .iter()
            .filter(|(k, v)| match k.as_str() {
                "role" | "tool_calls" => false,
                // Text content went in pieces; any other shape goes whole.
                "content" => !(v.is_string() || v.is_null()),
                _ => true,
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !rest.is_empty() {
            out.push(chunk(
                json!({"index": index, "delta": rest, "finish_reason": null}),
            ));
        }
        let mut last = json!({"index": index, "delta": {}, "finish_reason": ch["finish_reason"]});
        for (k, v) in ch.as_object().into_iter().flatten() {
            if !matches!(
                k.as_str(),
                "index" | "message" | "finish_reason" | "logprobs"
            ) {
                last[k] = v.clone();
            }
        }
        out.push(chunk(last));
    }
    out
}

/// A choice's `logprobs` split by token: (token text, its entry) when the tokens spell the content
/// exactly and nothing else is in it; else the `logprobs` back whole.
fn per_token(content: &str, lp: Value) -> Result<Vec<(String, Value)>, Value> {
    let Some(entries) = lp
        .as_object()
        .filter(|o| o.len() == 1)
        .and_then(|o| o.get("content"))
    else {
        return Err(lp);
    };
    let Some(entries) = entries.as_array().filter(|e| !e.is_empty()) else {
        return Err(lp);
    };
    let tokens: Option<Vec<(String, Value)>> = entries
        .iter()
        .map(|e| e["token"].as_str().map(|t| (t.to_string(), e.clone())))
        .collect();
    match tokens {
        Some(t) if t.iter().map(|(s, _)| s.as_str()).collect::<String>() == content => Ok(t),
        _ => Err(lp),
    }
}

/// Log-probabilities as the client asked: none (`null`) when it did not ask, else at most `k`
/// top alternatives per token (a gate may have asked the upstream for more).
pub fn trim_logprobs(choice: &mut Value, asked: Option<u32>) {
    let Some(c) = choice.as_object_mut() else {
        return;
    };
    match asked {
        None => {
            if c.contains_key("logprobs") {
                c.insert("logprobs".into(), Value::Null);
            }
        }
        Some(k) => {
            if let Some(lp) = c.get_mut("logprobs").and_then(Value::as_object_mut) {
                for (_, tokens) in lp.iter_mut() {
                    for t in tokens.as_array_mut().into_iter().flatten() {
                        if let Some(top) = t.get_mut("top_logprobs").and_then(Value::as_array_mut) {
                            top.truncate(k as usize);
                        }
                    }
                }
            }
        }
    }
}

/// What the client sees of a response or chunk: tandem's `id`, the route as `model`,
/// log-probabilities as asked; everything else as the upstream sent it.
pub fn for_client(
    body: &mut Map<String, Value>,
    id: &str,
    created: u64,
    model: &str,
    asked_logprobs: Option<u32>,
) {
    body.insert("id".into(), json!(id));
    // The upstream's own `created` passes through; tandem's only where it gave none.
    body.entry("created").or_insert(json!(created));
    body.insert("model".into(), json!(model));
    if let Some(cs) = body.get_mut("choices").and_then(Value::as_array_mut) {
        for c in cs {
            trim_logprobs(c, asked_logprobs);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn pieces_rejoin_exactly() {
        for t in ["", "one", "two words", "  lead and trail  ", "a\n\nb c"] {
            assert_eq!(pieces(t).concat(), t);
        }
        assert_eq!(pieces("two words"), vec!["two ", "words"]);
    }

    #[test]
    fn a_whole_answer_survives_chunking_and_reassembly() {
        let bodies = [
            json!({"object": "chat.completion", "system_fingerprint": "fp", "future": {"a": 1},
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "one two three",
                    "refusal": null, "annotations": [{"type": "url_citation"}], "novel": 5},
                    "logprobs": {"content": [{"token": "one", "logprob": -0.1, "top_logprobs": []}]},
                    "finish_reason": "stop"}]}),
            json!({"object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}},
                    {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{}"}}]},
                    "logprobs": null, "finish_reason": "tool_calls"}]}),
            json!({"object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": null, "refusal": "no"},
                    "logprobs": null, "finish_reason": "stop"},
                    {"index": 1, "message": {"role": "assistant", "content": "b", "reasoning_content": "think"},
                    "logprobs": null, "finish_reason": "length", "stop_reason": 7}]}),
        ];
        for b in bodies {
            let mut a = Assembler::default();
            for c in chunks_of(&obj(b.clone())) {
                assert_eq!(c["object"], "chat.completion.chunk");
                a.feed(&c);
            }
            assert_eq!(Value::Object(a.body()), b);
        }
    }

    #[test]
    fn logprobs_that_spell_the_content_go_token_by_token() {
        let b = json!({"object": "chat.completion", "choices": [{"index": 0,
            "message": {"role": "assistant", "content": "Hi there"},
            "logprobs": {"content": [{"token": "Hi", "logprob": -0.1, "top_logprobs": []},
                                     {"token": " there", "logprob": -0.2, "top_logprobs": []}]},
            "finish_reason": "stop"}]});
        let chunks = chunks_of(&obj(b.clone()));
        let texts: Vec<_> = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(texts, ["", "Hi", " there"]);
        assert_eq!(
            chunks[2]["choices"][0]["logprobs"]["content"][0]["token"],
            " there"
        );
        let mut a = Assembler::default();
        for c in &chunks {
            a.feed(c);
        }
        assert_eq!(Value::Object(a.body()), b);
    }

    #[test]
    fn streamed_tool_call_fragments_assemble() {
        let mut a = Assembler::default();
        for c in [
            json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": null, "tool_calls": [
                {"index": 0, "id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}}]}),
            json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\"ci"}}]}}]}),
            json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "ty\":\"Paris\"}"}}]}}]}),
            json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
            json!({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}}),
        ] {
            a.feed(&obj(c));
        }
        let b = a.body();
        let tc = &b["choices"][0]["message"]["tool_calls"][0];
        assert_eq!(tc["function"]["arguments"], "{\"city\":\"Paris\"}");
        assert_eq!(tc["id"], "c1");
        assert_eq!(b["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(a.usage.unwrap()["completion_tokens"], 2);
    }

    #[test]
    fn logprobs_only_as_asked() {
        let mut c = json!({"logprobs": {"content": [{"token": "a", "logprob": -0.1,
            "top_logprobs": [{"token": "a"}, {"token": "b"}, {"token": "c"}, {"token": "d"}, {"token": "e"}]}]}});
        let mut none = c.clone();
        trim_logprobs(&mut none, None);
        assert!(none["logprobs"].is_null());
        trim_logprobs(&mut c, Some(3));
        assert_eq!(
            c["logprobs"]["content"][0]["top_logprobs"]
                .as_array()
                .unwrap()
                .len(),
            3
        );
    }
}
