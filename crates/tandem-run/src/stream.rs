//! Where a run's texts come from: a JSONL file (`{"id"?, "text", "label"?}` a line), standard input
//! in the same format, or a named built-in dataset from the installed assets.

use crate::config::{InputConfig, Overlong, RunConfig};
use crate::error::{io, RunError};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use std::io::Read;
use std::path::Path;
use tandem_models::assets::Store;

#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub id: String,
    pub text: String,
    /// The gold label's index, when the source has one (for reporting only: never learned from).
    pub gold: Option<usize>,
}

#[derive(Debug, Clone, Default)]
pub struct Stream {
    pub name: String,
    pub items: Vec<Item>,
    /// Texts cut to `max_chars`.
    pub truncated: usize,
}

/// Built-in datasets and the labels they use.
pub const BUILTIN: &[(&str, &str)] = &[
    ("snippets", "10,605 movie-review snippets, labels negative/positive (sign of the mean human rating; zeros dropped); shuffled by --seed"),
    ("amazon", "3,708 Amazon product-review snippets, the same rating scheme (zeros dropped); shuffled by --seed"),
];

pub fn open(source: &str, cfg: &RunConfig, seed: u64, store: &Store) -> Result<Stream, RunError> {
    let mut s = match source {
        "-" => {
            let mut bytes = Vec::new();
            std::io::stdin()
                .read_to_end(&mut bytes)
                .map_err(io(Path::new("<stdin>")))?;
            parse_jsonl("<stdin>", &bytes, cfg)?
        }
        "snippets" => hutto(
            store,
            "snippets",
            "movieReviewSnippets_GroundTruth.txt",
            cfg,
            seed,
        )?,
        "amazon" => hutto(
            store,
            "amazon",
            "amazonReviewSnippets_GroundTruth.txt",
            cfg,
            seed,
        )?,
        path => {
            let p = Path::new(path);
            if !p.exists() {
                return Err(RunError::Invalid(format!(
                    "{path}: no such file, and not a built-in dataset (built-in: {})",
                    BUILTIN.iter().map(|b| b.0).collect::<Vec<_>>().join(", ")
                )));
            }
            let bytes = std::fs::read(p).map_err(io(p))?;
            parse_jsonl(path, &bytes, cfg)?
        }
    };
    apply_limits(&mut s, &cfg.input)?;
    if s.items.is_empty() {
        return Err(RunError::Invalid(format!("{}: no items", s.name)));
    }
    Ok(s)
}

fn apply_limits(s: &mut Stream, input: &InputConfig) -> Result<(), RunError> {
    for (i, item) in s.items.iter_mut().enumerate() {
        if item.text.chars().count() > input.max_chars {
            match input.overlong {
                Overlong::Truncate => {
                    item.text = item.text.chars().take(input.max_chars).collect();
                    s.truncated += 1;
                }
                Overlong::Reject => {
                    return Err(RunError::Input {
                        source_name: s.name.clone(),
                        line: i + 1,
                        message: format!("item {:?} is longer than [input] max_chars = {} (set overlong = \"truncate\" to cut it)", item.id, input.max_chars),
                    })
                }
            }
        }
    }
    Ok(())
}

pub fn parse_jsonl(name: &str, bytes: &[u8], cfg: &RunConfig) -> Result<Stream, RunError> {
    let mut items = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = i + 1;
        let bad = |message: String| RunError::Input {
            source_name: name.to_string(),
            line,
            message,
        };
        let text = std::str::from_utf8(raw)
            .map_err(|e| bad(format!("invalid UTF-8 at byte {}", e.valid_up_to())))?;
        if text.trim().is_empty() {
            continue;
        }
        let v: Value =
            serde_json::from_str(text).map_err(|e| bad(format!("malformed JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| bad("expected a JSON object".into()))?;
        let body = match obj.get("text") {
            Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
            Some(Value::String(_)) => return Err(bad("field `text`: empty".into())),
            Some(other) => {
                return Err(bad(format!("field `text`: expected a string, got {other}")))
            }
            None => return Err(bad("missing field `text`".into())),
        };
        let id = match obj.get("id") {
            None | Some(Value::Null) => line.to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            Some(other) => {
                return Err(bad(format!(
                    "field `id`: expected a string or number, got {other}"
                )))
            }
        };
        if !seen.insert(id.clone()) {
            return Err(bad(format!("field `id`: duplicate id {id:?}")));
        }
        let gold = match obj.get("label") {
            None | Some(Value::Null) => None,
            Some(Value::String(l)) => Some(cfg.label_index(l).ok_or_else(|| {
                bad(format!(
                    "field `label`: {l:?} is not one of the configured labels {:?}",
                    cfg.labels
                ))
            })?),
            Some(other) => {
                return Err(bad(format!(
                    "field `label`: expected a string, got {other}"
                )))
            }
        };
        items.push(Item {
            id,
            text: body,
            gold,
        });
    }
    Ok(Stream {
        name: name.to_string(),
        items,
        truncated: 0,
    })
}

/// Hutto & Gilbert's rated snippets: `id<TAB>mean score<TAB>text`, a header line; UTF-8, or
/// latin-1 where a file is not (the movie reviews).
fn hutto(
    store: &Store,
    asset: &str,
    file: &str,
    cfg: &RunConfig,
    seed: u64,
) -> Result<Stream, RunError> {
    let path = store.path(asset, file)?;
    let (neg, pos) = match (cfg.label_index("negative"), cfg.label_index("positive")) {
        (Some(n), Some(p)) => (n, p),
        _ => return Err(RunError::Invalid(format!("the {asset} dataset needs labels \"negative\" and \"positive\"; the configuration has {:?}", cfg.labels))),
    };
    let bytes = std::fs::read(&path).map_err(io(&path))?;
    let text = match String::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => e.as_bytes().iter().map(|&b| b as char).collect(),
    };
    let name = path.display().to_string();
    let mut items = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        let bad = |m: &str| RunError::Input {
            source_name: name.clone(),
            line: i + 1,
            message: m.to_string(),
        };
        if line.trim().is_empty() {
            continue;
        }
        let mut f = line.splitn(3, '\t');
        let (Some(id), Some(score), Some(body)) = (f.next(), f.next(), f.next()) else {
            return Err(bad("expected id<TAB>score<TAB>text"));
        };
        let score: f64 = score
            .trim()
            .parse()
            .map_err(|_| bad("score is not a number"))?;
        if score == 0.0 {
            continue;
        }
        items.push(Item {
            id: id.to_string(),
            text: body.trim().to_string(),
            gold: Some(if score > 0.0 { pos } else { neg }),
        });
    }
    items.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    Ok(Stream {
        name: asset.into(),
        items,
        truncated: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> RunConfig {
        RunConfig::parse(
            Path::new("c.toml"),
            "labels = [\"negative\", \"positive\"]\n[[tier]]\nname = \"h\"\nkind = \"hashed\"\n[[tier]]\nname = \"l\"\nkind = \"gguf\"\nasset = \"smollm2-135m\"\ninstruction = \"{text}\"\n",
        )
        .unwrap()
    }

    #[test]
    fn jsonl_items_and_errors() {
        let c = cfg();
        let s = parse_jsonl(
            "in.jsonl",
            b"{\"id\":\"a\",\"text\":\"good\",\"label\":\"positive\"}\n\n{\"text\":\"meh\"}\n",
            &c,
        )
        .unwrap();
        assert_eq!(s.items.len(), 2);
        assert_eq!(s.items[0].gold, Some(1));
        assert_eq!(s.items[1].id, "3");
        let e = |b: &[u8]| parse_jsonl("in.jsonl", b, &c).unwrap_err().to_string();
        assert_eq!(e(b"{\"text\":\"x\",\"label\":\"neutral\"}"), "in.jsonl:1: field `label`: \"neutral\" is not one of the configured labels [\"negative\", \"positive\"]");
        assert_eq!(e(b"{\"id\":1}"), "in.jsonl:1: missing field `text`");
        assert!(e(b"\n{oops").starts_with("in.jsonl:2: malformed JSON"));
        assert_eq!(e(b"\xff"), "in.jsonl:1: invalid UTF-8 at byte 0");
        assert!(e(b"{\"id\":1,\"text\":\"a\"}\n{\"id\":1,\"text\":\"b\"}")
            .contains("in.jsonl:2: field `id`: duplicate id"));
    }

    #[test]
    fn overlong_inputs_are_truncated_and_counted_or_rejected() {
        let mut s = Stream {
            name: "t".into(),
            items: vec![Item {
                id: "a".into(),
                text: "x".repeat(40),
                gold: None,
            }],
            truncated: 0,
        };
        apply_limits(
            &mut s,
            &InputConfig {
                max_chars: 16,
                overlong: Overlong::Truncate,
            },
        )
        .unwrap();
        assert_eq!((s.items[0].text.len(), s.truncated), (16, 1));
        s.items[0].text = "y".repeat(40);
        let e = apply_limits(
            &mut s,
            &InputConfig {
                max_chars: 16,
                overlong: Overlong::Reject,
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("longer than [input] max_chars = 16"));
    }
}
