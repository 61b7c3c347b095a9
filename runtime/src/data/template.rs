//! Prompt templates: how an [`Example`] becomes the text a model is trained on.
//!
//! A template renders a prompt/response example to a prompt text and a response text (the loss
//! goes on the response), or to a conversation for the tokenizer's chat template (the loss goes on
//! the assistant turns). Field names are those of [`ExampleKind::PromptResponse`]; the built-in
//! templates read them through two aliases so that every format works with every template:
//!
//! - the *instruction* is `instruction`, or else `question`;
//! - the *input* is `input`, or else `context` (empty when neither is set);
//! - the *user text* (the user message of the chat template) is the instruction, followed by a
//!   blank line and the input when there is one; for question-only records (GSM8K) the question.

use crate::error::{Error, Result};
use crate::tokenizer::{ChatMessage, Tokenizer};

use super::format::{Example, ExampleKind, Format};

/// A prompt template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Template {
    /// The Stanford Alpaca prompt: [`Template::ALPACA_WITH_INPUT`] when the example has an input,
    /// else [`Template::ALPACA_NO_INPUT`]; the response follows `### Response:\n` directly.
    Alpaca,
    /// Alpaca's text with the input under `### Context:` ([`Template::DOLLY_WITH_CONTEXT`]), and
    /// [`Template::ALPACA_NO_INPUT`] when there is no context.
    Dolly,
    /// The tokenizer's chat template: user = the user text, assistant = the response (chat
    /// examples go through as they are). The only template chat examples accept.
    Chat,
    /// A custom template with `{field}` placeholders, `{{` and `}}` for literal braces.
    ///
    /// Placeholders name a prompt field (`{question}`, `{instruction}`, `{input}`, ...);
    /// `{response}` — or its aliases `{output}` and `{answer}` when no prompt field has that
    /// name — is the response. [`Template::parse`] splits a custom string at its first response
    /// placeholder: `"### Q: {question}\n### A: {answer}"` has prompt `"### Q: {question}\n###
    /// A: "` and response `"{answer}"`; a string without one gets the response appended
    /// (`"### Q: {question}\n### A: "` is the same template).
    Custom {
        /// The prompt part, rendered with the prompt fields.
        prompt: String,
        /// The response part, containing the response placeholder; only it carries the loss.
        response: String,
    },
    /// No decoration: the user text followed by `"\n"`, then the response; for question-only
    /// records (GSM8K) `"Question: {question}\nAnswer: "`, then the response.
    Plain,
}

/// What a template makes of an example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rendered {
    /// A prompt (no loss) followed by a response (loss).
    Text {
        /// The prompt text.
        prompt: String,
        /// The response text, appended to the prompt as is.
        response: String,
    },
    /// A conversation for the tokenizer's chat template.
    Chat(Vec<ChatMessage>),
}

impl Template {
    /// The Alpaca prompt for an example with an input (Stanford Alpaca's `prompt_input`).
    pub const ALPACA_WITH_INPUT: &'static str = "Below is an instruction that describes a task, paired with an input \
         that provides further context. Write a response that appropriately completes the request.\n\n\
         ### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n";

    /// The Alpaca prompt for an example without input (Stanford Alpaca's `prompt_no_input`); also
    /// Dolly's when there is no context.
    pub const ALPACA_NO_INPUT: &'static str = "Below is an instruction that describes a task. Write a response \
         that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n";

    /// The Dolly prompt for an example with a context.
    pub const DOLLY_WITH_CONTEXT: &'static str = "Below is an instruction that describes a task. Write a response \
         that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n\
         ### Context:\n{context}\n\n### Response:\n";

    /// Parses a template: `alpaca`, `dolly`, `chat`, `plain` (case-insensitive), or else a custom
    /// string with `{field}` placeholders (see [`Template::Custom`]). In a custom string the
    /// two-character escapes `\n` and `\t` become a newline and a tab, so that a template can be
    /// written on a command line.
    pub fn parse(s: &str) -> Result<Template> {
        match s.trim().to_ascii_lowercase().as_str() {
            "alpaca" => return Ok(Template::Alpaca),
            "dolly" => return Ok(Template::Dolly),
            "chat" => return Ok(Template::Chat),
            "plain" => return Ok(Template::Plain),
            _ => {}
        }
        if !s.contains('{') {
            return Err(Error::Invalid(format!(
                "unknown prompt template `{s}`: expected alpaca, dolly, chat, plain, or a custom template \
                 with {{field}} placeholders such as \"### Q: {{question}}\\n### A: \""
            )));
        }
        let text = s.replace("\\n", "\n").replace("\\t", "\t");
        let pieces = parse_pieces(&text)?;
        // Split at the first response placeholder: everything from it on carries the loss.
        let mut offset = 0;
        for piece in &pieces {
            if let Piece::Field(name, _) = piece
                && is_response_name(name)
            {
                return Ok(Template::Custom {
                    prompt: text[..offset].to_string(),
                    response: text[offset..].to_string(),
                });
            }
            offset += piece.len();
        }
        Ok(Template::Custom { prompt: text, response: "{response}".into() })
    }

    /// The default template: the chat template when the tokenizer has one; else Alpaca for
    /// Alpaca and paraphrase data, Dolly for Dolly data; else (GSM8K, unknown) Plain. Chat data
    /// always gets [`Template::Chat`] (tokenizing it without a chat template is then an error that
    /// says to supply one).
    pub fn auto(tok: &Tokenizer, format: Format) -> Template {
        if tok.chat_template().is_some() || format == Format::Chat {
            return Template::Chat;
        }
        match format {
            Format::Alpaca | Format::Paraphrase => Template::Alpaca,
            Format::Dolly => Template::Dolly,
            _ => Template::Plain,
        }
    }

    /// [`Template::parse`], with `None` or `"auto"` meaning [`Template::auto`].
    pub fn resolve(spec: Option<&str>, tok: &Tokenizer, format: Format) -> Result<Template> {
        match spec {
            None => Ok(Template::auto(tok, format)),
            Some(s) if s.trim().eq_ignore_ascii_case("auto") => Ok(Template::auto(tok, format)),
            Some(s) => Template::parse(s),
        }
    }

    /// Renders an example.
    pub fn render(&self, example: &Example) -> Result<Rendered> {
        let (fields, response) = match &example.kind {
            ExampleKind::PromptResponse { prompt_fields, response } => (prompt_fields, response),
            ExampleKind::Chat(msgs) => {
                return match self {
                    Template::Chat => Ok(Rendered::Chat(msgs.clone())),
                    _ => Err(Error::Unsupported(format!(
                        "the {} prompt template on chat examples: conversations need the chat template",
                        self.name()
                    ))),
                };
            }
        };
        let get = |k: &str| fields.get(k).map(String::as_str).filter(|s| !s.is_empty());
        let instruction = get("instruction").or_else(|| get("question")).unwrap_or("");
        let input = get("input").or_else(|| get("context"));
        let text = |prompt: String| Ok(Rendered::Text { prompt, response: response.clone() });
        match self {
            Template::Alpaca => match input {
                Some(input) => text(fill_builtin(Template::ALPACA_WITH_INPUT, instruction, input, "{input}")),
                None => text(fill_builtin(Template::ALPACA_NO_INPUT, instruction, "", "")),
            },
            Template::Dolly => match input {
                Some(input) => text(fill_builtin(Template::DOLLY_WITH_CONTEXT, instruction, input, "{context}")),
                None => text(fill_builtin(Template::ALPACA_NO_INPUT, instruction, "", "")),
            },
            Template::Plain => match (get("instruction"), get("question")) {
                (None, Some(q)) => text(format!("Question: {q}\nAnswer: ")),
                _ => text(format!("{}\n", user_text(instruction, input))),
            },
            Template::Chat => Ok(Rendered::Chat(vec![
                ChatMessage::new("user", user_text(instruction, input)),
                ChatMessage::new("assistant", response.as_str()),
            ])),
            Template::Custom { prompt, response: resp } => {
                let lookup = |name: &str| -> Result<String> {
                    if let Some(v) = fields.get(name) {
                        Ok(v.clone())
                    } else if is_response_name(name) {
                        Ok(response.clone())
                    } else {
                        let names: Vec<&str> = fields.keys().map(String::as_str).collect();
                        Err(Error::Invalid(format!(
                            "prompt template placeholder {{{name}}}: the example has fields {names:?} and {{response}}"
                        )))
                    }
                };
                Ok(Rendered::Text { prompt: fill(prompt, &lookup)?, response: fill(resp, &lookup)? })
            }
        }
    }

    /// The text to give the model to generate the response of `example` (for evaluation and
    /// demos): the rendered prompt, or for the chat template the conversation up to the last
    /// assistant turn with the generation prompt.
    pub fn prompt(&self, tok: &Tokenizer, example: &Example) -> Result<String> {
        match self.render(example)? {
            Rendered::Text { prompt, .. } => Ok(prompt),
            Rendered::Chat(msgs) => {
                let cut = msgs.iter().rposition(|m| m.role == "assistant").unwrap_or(msgs.len());
                tok.apply_chat_template(&msgs[..cut], true)
            }
        }
    }

    /// A short name for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Template::Alpaca => "alpaca",
            Template::Dolly => "dolly",
            Template::Chat => "chat",
            Template::Custom { .. } => "custom",
            Template::Plain => "plain",
        }
    }
}

/// Whether a placeholder name means the response.
fn is_response_name(name: &str) -> bool {
    matches!(name, "response" | "output" | "answer")
}

/// The user text: the instruction, and the input after a blank line when there is one.
fn user_text(instruction: &str, input: Option<&str>) -> String {
    match input {
        Some(input) => format!("{instruction}\n\n{input}"),
        None => instruction.to_string(),
    }
}

/// Fills a built-in template. Plain replacement, not [`fill`]: the built-ins have no escaped
/// braces, and the values are inserted once so that braces inside them stay as they are.
fn fill_builtin(template: &str, instruction: &str, input: &str, input_key: &str) -> String {
    let (head, tail) = template.split_once("{instruction}").unwrap_or((template, ""));
    let tail = if input_key.is_empty() { tail.to_string() } else { tail.replacen(input_key, input, 1) };
    format!("{head}{instruction}{tail}")
}

/// A piece of a custom template: literal text, or a placeholder (name, length in the source).
enum Piece<'a> {
    Text(String, usize),
    Field(&'a str, usize),
}

impl Piece<'_> {
    /// Length of the piece in the template source.
    fn len(&self) -> usize {
        match self {
            Piece::Text(_, n) | Piece::Field(_, n) => *n,
        }
    }
}

/// Splits a custom template into literal text and placeholders.
fn parse_pieces(t: &str) -> Result<Vec<Piece<'_>>> {
    let bad = |why: &str| Error::Invalid(format!("prompt template {t:?}: {why}"));
    let mut pieces = Vec::new();
    let mut rest = t;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("{{") {
            pieces.push(Piece::Text("{".into(), 2));
            rest = r;
        } else if let Some(r) = rest.strip_prefix("}}") {
            pieces.push(Piece::Text("}".into(), 2));
            rest = r;
        } else if let Some(r) = rest.strip_prefix('{') {
            let end = r.find('}').ok_or_else(|| bad("a `{` without its `}` (write `{{` for a literal brace)"))?;
            let name = &r[..end];
            if name.is_empty() || !name.chars().all(|c| c.is_alphanumeric() || c == '_') {
                return Err(bad(&format!("`{{{name}}}` is not a placeholder (write `{{{{` for a literal brace)")));
            }
            pieces.push(Piece::Field(name, end + 2));
            rest = &r[end + 1..];
        } else if rest.starts_with('}') {
            return Err(bad("a `}` without its `{` (write `}}` for a literal brace)"));
        } else {
            let end = rest.find(['{', '}']).unwrap_or(rest.len());
            pieces.push(Piece::Text(rest[..end].to_string(), end));
            rest = &rest[end..];
        }
    }
    Ok(pieces)
}

/// Renders a custom template piece by piece.
fn fill(t: &str, lookup: &dyn Fn(&str) -> Result<String>) -> Result<String> {
    let mut out = String::with_capacity(t.len() + 64);
    for piece in parse_pieces(t)? {
        match piece {
            Piece::Text(s, _) => out.push_str(&s),
            Piece::Field(name, _) => out.push_str(&lookup(name)?),
        }
    }
    Ok(out)
}
