use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One chat message, in the OpenAI shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// What a query asks: plain text (a prompt, an item to classify) or a chat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Input {
    Text(String),
    Chat(Vec<Message>),
}

/// A request to be answered by some tier. `metadata` carries what the caller knows besides the text
/// (a subject, a tenant, an episode id) and that policies may use as features.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Query {
    pub id: String,
    pub input: Input,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

impl Query {
    pub fn text(id: impl Into<String>, text: impl Into<String>) -> Self {
        Query {
            id: id.into(),
            input: Input::Text(text.into()),
            metadata: BTreeMap::new(),
        }
    }

    /// The text a router reads: the prompt, or for a chat the last user message (the turn being
    /// answered), which is what decides how hard the request is.
    pub fn routing_text(&self) -> &str {
        match &self.input {
            Input::Text(t) => t,
            Input::Chat(msgs) => msgs
                .iter()
                .rev()
                .find(|m| m.role == "user")
                .or(msgs.last())
                .map(|m| m.content.as_str())
                .unwrap_or(""),
        }
    }

    /// All text of the query, for token estimates.
    pub fn char_len(&self) -> usize {
        match &self.input {
            Input::Text(t) => t.chars().count(),
            Input::Chat(msgs) => msgs.iter().map(|m| m.content.chars().count()).sum(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_text_of_chat_is_last_user_turn() {
        let q = Query {
            id: "1".into(),
            input: Input::Chat(vec![
                Message {
                    role: "system".into(),
                    content: "be brief".into(),
                },
                Message {
                    role: "user".into(),
                    content: "first".into(),
                },
                Message {
                    role: "assistant".into(),
                    content: "ok".into(),
                },
                Message {
                    role: "user".into(),
                    content: "second".into(),
                },
            ]),
            metadata: BTreeMap::new(),
        };
        assert_eq!(q.routing_text(), "second");
        assert_eq!(q.char_len(), 8 + 5 + 2 + 6);
    }
}
