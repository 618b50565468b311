//! The model's chat template from its GGUF metadata, rendered with minijinja.

use super::GgufError;
use minijinja::{context, Environment};
use tandem_core::Message;

pub struct ChatTemplate {
    env: Environment<'static>,
}

/// ChatML, for GGUF files that carry no template.
const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

impl ChatTemplate {
    pub fn new(source: Option<String>) -> Result<Self, GgufError> {
        let mut env = Environment::new();
        // Templates written for Python's Jinja call str methods such as .strip(); provide them.
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_template_owned("chat", source.unwrap_or_else(|| CHATML.to_string()))
            .map_err(|e| GgufError::Template(e.to_string()))?;
        Ok(ChatTemplate { env })
    }

    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, GgufError> {
        let t = self
            .env
            .get_template("chat")
            .map_err(|e| GgufError::Template(e.to_string()))?;
        t.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => "",
            eos_token => "",
        })
        .map_err(|e| GgufError::Template(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_chatml() {
        let t = ChatTemplate::new(None).unwrap();
        let s = t
            .render(
                &[Message {
                    role: "user".into(),
                    content: "hi".into(),
                }],
                true,
            )
            .unwrap();
        assert_eq!(s, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
        assert!(ChatTemplate::new(Some("{% for %}".into())).is_err());
    }
}
