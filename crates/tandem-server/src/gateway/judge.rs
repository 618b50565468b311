//! Whether a cascade's small draft can be served at all, before any gate scores it: an empty
//! answer, a refusal, or a tool call the request cannot use (a tool it did not offer, arguments
//! that are not JSON or break the tool's parameter schema, a call against `tool_choice`) is never
//! kept, however confident its tokens were.

use crate::upstream::Draft;
use serde_json::Value;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Valid,
    Empty,
    Refusal,
    UnknownTool,
    BadArguments,
    AgainstToolChoice,
}

impl Verdict {
    /// The metric label.
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Valid => "valid",
            Verdict::Empty => "empty",
            Verdict::Refusal => "refusal",
            Verdict::UnknownTool => "unknown_tool",
            Verdict::BadArguments => "bad_arguments",
            Verdict::AgainstToolChoice => "against_tool_choice",
        }
    }
}

/// Judges a draft against the request's `tools` (name → parameter schema) and `tool_choice`
/// (`auto`, `none`, `required` or `function:NAME`).
pub fn judge(d: &Draft, tools: &BTreeMap<String, Value>, tool_choice: Option<&str>) -> Verdict {
    let has_text = d.content.as_deref().is_some_and(|c| !c.trim().is_empty());
    if d.tool_calls.is_empty() {
        if d.refusal.is_some() {
            return Verdict::Refusal;
        }
        if !has_text {
            return Verdict::Empty;
        }
        return match tool_choice {
            Some("required") => Verdict::AgainstToolChoice,
            Some(c) if c.starts_with("function:") => Verdict::AgainstToolChoice,
            _ => Verdict::Valid,
        };
    }
    if tool_choice == Some("none") {
        return Verdict::AgainstToolChoice;
    }
    for call in &d.tool_calls {
        let f = &call["function"];
        let Some(name) = f["name"].as_str() else {
            return Verdict::UnknownTool;
        };
        if let Some(forced) = tool_choice.and_then(|c| c.strip_prefix("function:")) {
            if name != forced {
                return Verdict::AgainstToolChoice;
            }
        }
        let Some(schema) = tools.get(name) else {
            return Verdict::UnknownTool;
        };
        let args: Value = match f["arguments"].as_str() {
            Some(a) if a.trim().is_empty() => Value::Object(Default::default()),
            Some(a) => match serde_json::from_str(a) {
                Ok(v) => v,
                Err(_) => return Verdict::BadArguments,
            },
            None => return Verdict::BadArguments,
        };
        if !schema_accepts(schema, &args) {
            return Verdict::BadArguments;
        }
    }
    Verdict::Valid
}

/// Whether `args` satisfy a tool's JSON schema. No schema accepts any object; a schema that does
/// not compile is not held against the draft (the upstream accepted it).
fn schema_accepts(schema: &Value, args: &Value) -> bool {
    if schema.is_null() || schema.as_object().is_some_and(|o| o.is_empty()) {
        return args.is_object();
    }
    match jsonschema::validator_for(schema) {
        Ok(v) => v.is_valid(args),
        Err(_) => args.is_object(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tools() -> BTreeMap<String, Value> {
        let mut t = BTreeMap::new();
        t.insert(
            "get_weather".to_string(),
            json!({"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}),
        );
        t.insert("now".to_string(), Value::Null);
        t
    }

    fn call(name: &str, args: &str) -> Draft {
        Draft {
            content: None,
            tool_calls: vec![
                json!({"id": "c", "type": "function", "function": {"name": name, "arguments": args}}),
            ],
            refusal: None,
            finish_reason: "tool_calls".into(),
        }
    }

    fn text(t: Option<&str>, refusal: Option<&str>) -> Draft {
        Draft {
            content: t.map(str::to_string),
            tool_calls: vec![],
            refusal: refusal.map(str::to_string),
            finish_reason: "stop".into(),
        }
    }

    #[test]
    fn valid_calls_and_answers_pass() {
        let t = tools();
        for d in [
            call("get_weather", r#"{"city": "Paris"}"#),
            call("get_weather", r#"{"city": "Paris", "days": 3}"#),
            call("now", ""),
            call("now", "{}"),
            text(Some("four"), None),
        ] {
            assert_eq!(judge(&d, &t, None), Verdict::Valid, "{d:?}");
        }
        assert_eq!(
            judge(
                &call("get_weather", r#"{"city":"Oslo"}"#),
                &t,
                Some("function:get_weather")
            ),
            Verdict::Valid
        );
    }

    #[test]
    fn unusable_drafts_are_named() {
        let t = tools();
        let cases = [
            (
                call("get_wether", r#"{"city": "Paris"}"#),
                None,
                Verdict::UnknownTool,
            ),
            (
                call("get_weather", r#"{"city": "Par"#),
                None,
                Verdict::BadArguments,
            ),
            (
                call("get_weather", r#"{"days": 3}"#),
                None,
                Verdict::BadArguments,
            ),
            (
                call("get_weather", r#"{"city": 5}"#),
                None,
                Verdict::BadArguments,
            ),
            (call("get_weather", r#"[1]"#), None, Verdict::BadArguments),
            (text(None, None), None, Verdict::Empty),
            (text(Some("  "), None), None, Verdict::Empty),
            (text(None, Some("I can't help")), None, Verdict::Refusal),
            (
                text(Some("sunny"), None),
                Some("required"),
                Verdict::AgainstToolChoice,
            ),
            (
                text(Some("sunny"), None),
                Some("function:get_weather"),
                Verdict::AgainstToolChoice,
            ),
            (call("now", "{}"), Some("none"), Verdict::AgainstToolChoice),
            (
                call("now", "{}"),
                Some("function:get_weather"),
                Verdict::AgainstToolChoice,
            ),
        ];
        for (d, choice, want) in cases {
            assert_eq!(judge(&d, &t, choice), want, "{d:?} {choice:?}");
        }
    }
}
