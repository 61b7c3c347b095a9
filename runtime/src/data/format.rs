//! Reading training records from JSON or JSON Lines into [`Example`]s.
//!
//! A bad record (a missing or mistyped field, an empty response) is skipped and counted in the
//! [`LoadReport`] with the line it is on: one broken row in a file of thousands should not stop a
//! run, but the user must see that it was left out. Text that is not JSON at all, a format that
//! cannot be recognised, or a file without a single usable record is an error naming the file and
//! the line.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::tokenizer::ChatMessage;

/// The layout of the records of a training file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Recognised from the keys of the first record (see [`Format::detect`]).
    Auto,
    /// Stanford Alpaca: `{instruction, input?, output}`.
    Alpaca,
    /// Databricks Dolly: `{instruction, context?, response, category?}`.
    Dolly,
    /// GSM8K: `{question, answer}`, the answer ending in `#### N`.
    Gsm8k,
    /// Conversations: `{messages: [{role, content}]}` with roles `system`, `user`, `assistant`, or
    /// ShareGPT's `{conversations: [{from, value}]}` with `from` = `system`, `human`/`user`,
    /// `gpt`/`assistant`.
    Chat,
    /// Paraphrase buckets: `{instruction?, input?, output, paraphrases: [{paraphrase, answer,
    /// bucket, ...}]}`, one example per paraphrase of a selected bucket.
    Paraphrase,
}

impl Format {
    /// Every format, in the order names are listed in messages.
    pub const ALL: [Format; 6] =
        [Format::Auto, Format::Alpaca, Format::Dolly, Format::Gsm8k, Format::Chat, Format::Paraphrase];

    /// The name [`Format::from_str`] accepts.
    pub fn name(self) -> &'static str {
        match self {
            Format::Auto => "auto",
            Format::Alpaca => "alpaca",
            Format::Dolly => "dolly",
            Format::Gsm8k => "gsm8k",
            Format::Chat => "chat",
            Format::Paraphrase => "paraphrase",
        }
    }

    /// The format whose keys `record` has: `messages` or `conversations` → chat, `paraphrases` → paraphrase,
    /// `question` + `answer` → GSM8K, `instruction` + `response` → Dolly, `instruction` + `output`
    /// → Alpaca (checked in that order). `None` when none fits.
    pub fn detect(record: &Map<String, Value>) -> Option<Format> {
        let has = |k: &str| record.contains_key(k);
        if has("messages") || has("conversations") {
            Some(Format::Chat)
        } else if has("paraphrases") {
            Some(Format::Paraphrase)
        } else if has("question") && has("answer") {
            Some(Format::Gsm8k)
        } else if has("instruction") && has("response") {
            Some(Format::Dolly)
        } else if has("instruction") && has("output") {
            Some(Format::Alpaca)
        } else {
            None
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Format {
    type Err = Error;

    /// Parses a format name (case-insensitive); `messages` and `sharegpt` are accepted for `chat`.
    fn from_str(s: &str) -> Result<Self> {
        let lower = s.trim().to_ascii_lowercase();
        if lower == "messages" || lower == "sharegpt" {
            return Ok(Format::Chat);
        }
        Format::ALL.into_iter().find(|f| f.name() == lower).ok_or_else(|| {
            let names: Vec<&str> = Format::ALL.iter().map(|f| f.name()).collect();
            Error::Invalid(format!("unknown data format `{s}`: expected one of {}", names.join(", ")))
        })
    }
}

/// One training example, before templating.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// What is rendered and trained on.
    pub kind: ExampleKind,
    /// Extra facts that are not rendered: Dolly's `category`; for paraphrases the `bucket`, the
    /// `original_instruction` and the paraphrase's other scalar keys; for [`super::synth`] the
    /// `template` and the `gold` answer.
    pub meta: BTreeMap<String, String>,
}

/// The two shapes an example can take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExampleKind {
    /// A prompt built from named fields, and the response to learn.
    ///
    /// Field names per format (every name is always present, possibly empty, so a template can
    /// name it without failing on the records that leave it out):
    /// - Alpaca: `instruction`, `input`;
    /// - Dolly: `instruction`, `context`;
    /// - GSM8K and [`super::synth`]: `question` (the response is the `answer`);
    /// - paraphrase: `instruction` (the paraphrase), `input`.
    PromptResponse {
        /// The named prompt fields (see above).
        prompt_fields: BTreeMap<String, String>,
        /// The text the loss is computed on.
        response: String,
    },
    /// A conversation; the loss goes on the assistant turns.
    Chat(Vec<ChatMessage>),
}

impl Example {
    /// A prompt/response example from `(name, value)` fields, with no metadata.
    pub fn prompt_response<'a>(fields: impl IntoIterator<Item = (&'a str, &'a str)>, response: &str) -> Self {
        let prompt_fields = fields.into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Example {
            kind: ExampleKind::PromptResponse { prompt_fields, response: response.to_string() },
            meta: BTreeMap::new(),
        }
    }

    /// A prompt field by name (`None` for chat examples).
    pub fn field(&self, name: &str) -> Option<&str> {
        match &self.kind {
            ExampleKind::PromptResponse { prompt_fields, .. } => prompt_fields.get(name).map(String::as_str),
            ExampleKind::Chat(_) => None,
        }
    }

    /// The response of a prompt/response example, or the last assistant turn of a conversation.
    pub fn response(&self) -> Option<&str> {
        match &self.kind {
            ExampleKind::PromptResponse { response, .. } => Some(response),
            ExampleKind::Chat(msgs) => msgs.iter().rev().find(|m| m.role == "assistant").map(|m| m.content.as_str()),
        }
    }
}

/// Options of [`load_examples_with`] that only the paraphrase format uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// The paraphrase buckets to keep (`None`: all); see [`parse_buckets`].
    pub buckets: Option<Vec<u32>>,
    /// Train on each paraphrase's own `answer` instead of the record's canonical `output`.
    pub use_paraphrase_answers: bool,
}

/// How many records were skipped for one reason, and where the first one is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SkipCount {
    /// Records (or paraphrases) skipped for this reason.
    pub count: usize,
    /// The 1-based line of the first one.
    pub first_line: usize,
}

/// What [`load_examples`] read and what it left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadReport {
    /// The file read.
    pub path: PathBuf,
    /// The format used (the detected one when [`Format::Auto`] was asked for).
    pub format: Format,
    /// Records in the file.
    pub records: usize,
    /// Examples produced (a paraphrase record gives several).
    pub examples: usize,
    /// Skipped records by reason (e.g. "missing field `output`").
    pub skipped: BTreeMap<String, SkipCount>,
    /// Paraphrases left out because their bucket was not selected (not an error).
    pub filtered_by_bucket: usize,
}

impl LoadReport {
    /// The number of records (or paraphrases) skipped for any reason.
    pub fn n_skipped(&self) -> usize {
        self.skipped.values().map(|s| s.count).sum()
    }

    fn skip(&mut self, reason: String, line: usize) {
        self.skipped.entry(reason).and_modify(|s| s.count += 1).or_insert(SkipCount { count: 1, first_line: line });
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} records ({}), {} examples", self.path.display(), self.records, self.format, self.examples)?;
        if self.filtered_by_bucket > 0 {
            write!(f, ", {} paraphrases outside the selected buckets", self.filtered_by_bucket)?;
        }
        for (reason, s) in &self.skipped {
            write!(f, "; skipped {} × {reason} (first at line {})", s.count, s.first_line)?;
        }
        Ok(())
    }
}

/// Parses a bucket selection: comma-separated numbers and inclusive ranges, e.g. `"1-3"` or
/// `"1,3,5"` or `"1-2,5"`. Returns the sorted, de-duplicated buckets.
pub fn parse_buckets(s: &str) -> Result<Vec<u32>> {
    let bad = |part: &str, why: &str| Error::Invalid(format!("bucket selection `{s}`: `{part}` {why}"));
    let num = |part: &str, t: &str| t.trim().parse::<u32>().map_err(|_| bad(part, "is not a bucket number or range"));
    let mut out = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        if part.is_empty() {
            return Err(bad(part, "is empty"));
        }
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(part, a)?, num(part, b)?);
                if a > b {
                    return Err(bad(part, "is a range whose start is after its end"));
                }
                out.extend(a..=b);
            }
            None => out.push(num(part, part)?),
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Loads the examples of a JSON (array) or JSON Lines file with default [`LoadOptions`].
pub fn load_examples(path: impl AsRef<Path>, format: Format) -> Result<(Vec<Example>, LoadReport)> {
    load_examples_with(path, format, &LoadOptions::default())
}

/// Loads the examples of a JSON (array) or JSON Lines file: a file whose first non-blank
/// character is `[` is one JSON array, anything else one JSON value per line (blank lines
/// allowed). Bad records are skipped and counted in the report; unreadable JSON, an unknown
/// format or a file with no usable record is an error.
pub fn load_examples_with(
    path: impl AsRef<Path>,
    format: Format,
    opts: &LoadOptions,
) -> Result<(Vec<Example>, LoadReport)> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let records = parse_records(path, &text)?;
    let Some((first_line, first)) = records.first() else {
        return Err(Error::format(path, "no records: the file is empty"));
    };
    let format = match format {
        Format::Auto => {
            let keys: Vec<&str> = first.as_object().map(|o| o.keys().map(String::as_str).collect()).unwrap_or_default();
            first.as_object().and_then(Format::detect).ok_or_else(|| {
                Error::format(
                    path,
                    format!(
                        "line {first_line}: cannot tell the data format from the first record (keys {keys:?}): \
                         expected `messages` (chat), `paraphrases` (paraphrase), `question`+`answer` (gsm8k), \
                         `instruction`+`response` (dolly) or `instruction`+`output` (alpaca); \
                         name the format to use another layout"
                    ),
                )
            })?
        }
        f => f,
    };
    let mut report = LoadReport {
        path: path.to_path_buf(),
        format,
        records: records.len(),
        examples: 0,
        skipped: BTreeMap::new(),
        filtered_by_bucket: 0,
    };
    let mut out = Vec::new();
    for (line, value) in &records {
        let Some(obj) = value.as_object() else {
            report.skip(format!("not a JSON object (found {})", kind(value)), *line);
            continue;
        };
        let parsed = match format {
            Format::Alpaca => alpaca(obj).map(|e| out.push(e)),
            Format::Dolly => dolly(obj).map(|e| out.push(e)),
            Format::Gsm8k => gsm8k(obj).map(|e| out.push(e)),
            Format::Chat => chat(obj).map(|e| out.push(e)),
            Format::Paraphrase => paraphrase(obj, *line, opts, &mut out, &mut report),
            // Resolved above.
            Format::Auto => Ok(()),
        };
        if let Err(reason) = parsed {
            report.skip(reason, *line);
        }
    }
    report.examples = out.len();
    if out.is_empty() {
        let mut msg = format!("no usable record among {} (format {format})", records.len());
        if report.filtered_by_bucket > 0 {
            msg.push_str(&format!("; {} paraphrases outside the selected buckets", report.filtered_by_bucket));
        }
        for (reason, s) in &report.skipped {
            msg.push_str(&format!("; {} × {reason} (first at line {})", s.count, s.first_line));
        }
        return Err(Error::format(path, msg));
    }
    Ok((out, report))
}

/// The records of the file with the 1-based line each starts on.
fn parse_records(path: &Path, text: &str) -> Result<Vec<(usize, Value)>> {
    // A UTF-8 byte-order mark is legal at the start of a file and not JSON.
    let body = text.strip_prefix('\u{feff}').unwrap_or(text);
    let offset = text.len() - body.len();
    let start = offset + (body.len() - body.trim_start().len());
    if text[start..].starts_with('[') { parse_array(path, text, start + 1) } else { parse_lines(path, body) }
}

/// Parses a JSON array element by element, so that each record's line is known (serde_json
/// reports positions only for errors).
fn parse_array(path: &Path, text: &str, mut pos: usize) -> Result<Vec<(usize, Value)>> {
    let newlines: Vec<usize> = text.bytes().enumerate().filter(|&(_, b)| b == b'\n').map(|(i, _)| i).collect();
    let line_of = |pos: usize| newlines.partition_point(|&n| n < pos) + 1;
    let skip_ws = |mut pos: usize| {
        while text.as_bytes().get(pos).is_some_and(|b| b.is_ascii_whitespace()) {
            pos += 1;
        }
        pos
    };
    let mut out = Vec::new();
    pos = skip_ws(pos);
    if text.as_bytes().get(pos) == Some(&b']') {
        pos += 1;
    } else {
        loop {
            pos = skip_ws(pos);
            let mut stream = serde_json::Deserializer::from_str(&text[pos..]).into_iter::<Value>();
            match stream.next() {
                Some(Ok(v)) => {
                    out.push((line_of(pos), v));
                    pos += stream.byte_offset();
                }
                Some(Err(e)) => {
                    let line = line_of(pos) + e.line().saturating_sub(1);
                    return Err(Error::format(path, format!("line {line}: not valid JSON: {}", json_msg(&e))));
                }
                None => {
                    return Err(Error::format(path, format!("line {}: the JSON array is not closed", line_of(pos))));
                }
            }
            pos = skip_ws(pos);
            match text.as_bytes().get(pos) {
                Some(b',') => pos += 1,
                Some(b']') => {
                    pos += 1;
                    break;
                }
                Some(_) => {
                    return Err(Error::format(
                        path,
                        format!("line {}: not valid JSON: expected `,` or `]` after an array element", line_of(pos)),
                    ));
                }
                None => {
                    return Err(Error::format(path, format!("line {}: the JSON array is not closed", line_of(pos))));
                }
            }
        }
    }
    pos = skip_ws(pos);
    if pos < text.len() {
        return Err(Error::format(path, format!("line {}: unexpected text after the JSON array", line_of(pos))));
    }
    Ok(out)
}

/// Parses JSON Lines: one value per non-blank line.
fn parse_lines(path: &Path, text: &str) -> Result<Vec<(usize, Value)>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let v = serde_json::from_str(line)
            .map_err(|e| Error::format(path, format!("line {}: not valid JSON: {}", i + 1, json_msg(&e))))?;
        out.push((i + 1, v));
    }
    Ok(out)
}

/// serde_json's message without its position, which is relative to the piece parsed and would
/// contradict the line we report.
fn json_msg(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Why a record is skipped, as the report's key.
type Skip = std::result::Result<(), String>;

/// A required string field (null counts as missing).
fn req<'a>(obj: &'a Map<String, Value>, key: &str) -> std::result::Result<&'a str, String> {
    match opt(obj, key)? {
        Some(s) => Ok(s),
        None => Err(format!("missing field `{key}`")),
    }
}

/// A required string field that must not be blank.
fn nonempty<'a>(obj: &'a Map<String, Value>, key: &str) -> std::result::Result<&'a str, String> {
    let s = req(obj, key)?;
    if s.trim().is_empty() { Err(format!("empty `{key}`")) } else { Ok(s) }
}

/// An optional string field (absent or null is `None`).
fn opt<'a>(obj: &'a Map<String, Value>, key: &str) -> std::result::Result<Option<&'a str>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(format!("`{key}` is not a string (found {})", kind(other))),
    }
}

fn alpaca(obj: &Map<String, Value>) -> std::result::Result<Example, String> {
    let instruction = nonempty(obj, "instruction")?;
    let input = opt(obj, "input")?.unwrap_or("");
    let output = nonempty(obj, "output")?;
    Ok(Example::prompt_response([("instruction", instruction), ("input", input)], output))
}

fn dolly(obj: &Map<String, Value>) -> std::result::Result<Example, String> {
    let instruction = nonempty(obj, "instruction")?;
    let context = opt(obj, "context")?.unwrap_or("");
    let response = nonempty(obj, "response")?;
    let mut ex = Example::prompt_response([("instruction", instruction), ("context", context)], response);
    if let Some(c) = opt(obj, "category")? {
        ex.meta.insert("category".into(), c.to_string());
    }
    Ok(ex)
}

fn gsm8k(obj: &Map<String, Value>) -> std::result::Result<Example, String> {
    let question = nonempty(obj, "question")?;
    let answer = nonempty(obj, "answer")?;
    Ok(Example::prompt_response([("question", question)], answer))
}

fn chat(obj: &Map<String, Value>) -> std::result::Result<Example, String> {
    // ShareGPT names the list `conversations` and its fields `from`/`value`.
    let (field, role_key, content_key) =
        if obj.get("messages").is_none_or(Value::is_null) && obj.contains_key("conversations") {
            ("conversations", "from", "value")
        } else {
            ("messages", "role", "content")
        };
    let list = match obj.get(field) {
        None | Some(Value::Null) => return Err(format!("missing field `{field}`")),
        Some(Value::Array(list)) => list,
        Some(other) => return Err(format!("`{field}` is not a list (found {})", kind(other))),
    };
    let mut msgs = Vec::with_capacity(list.len());
    for m in list {
        let Some(m) = m.as_object() else {
            return Err(format!("a message is not an object (found {})", kind(m)));
        };
        let role = req(m, role_key).map_err(|r| format!("a message has {r}"))?;
        let content = req(m, content_key).map_err(|r| format!("a message has {r}"))?;
        let role = match role {
            "system" => "system",
            "user" | "human" => "user",
            "assistant" | "gpt" => "assistant",
            _ if field == "conversations" => {
                return Err(format!("unknown role `{role}` (expected system, human or gpt)"));
            }
            _ => return Err(format!("unknown role `{role}` (expected system, user or assistant)")),
        };
        msgs.push(ChatMessage::new(role, content));
    }
    if !msgs.iter().any(|m| m.role == "assistant") {
        return Err("no assistant turn".into());
    }
    if msgs.iter().all(|m| m.role != "assistant" || m.content.trim().is_empty()) {
        return Err("empty assistant turns".into());
    }
    Ok(Example { kind: ExampleKind::Chat(msgs), meta: BTreeMap::new() })
}

/// Expands a paraphrase record into one example per selected paraphrase. Whole-record problems
/// are returned; a bad paraphrase is counted on its own and the others are kept.
fn paraphrase(
    obj: &Map<String, Value>,
    line: usize,
    opts: &LoadOptions,
    out: &mut Vec<Example>,
    report: &mut LoadReport,
) -> Skip {
    let original = opt(obj, "instruction")?;
    let input = opt(obj, "input")?.unwrap_or("");
    let output = if opts.use_paraphrase_answers { opt(obj, "output")?.unwrap_or("") } else { nonempty(obj, "output")? };
    let list = match obj.get("paraphrases") {
        None | Some(Value::Null) => return Err("missing field `paraphrases`".into()),
        Some(Value::Array(list)) => list,
        Some(other) => return Err(format!("`paraphrases` is not a list (found {})", kind(other))),
    };
    for p in list {
        let Some(p) = p.as_object() else {
            report.skip(format!("a paraphrase is not an object (found {})", kind(p)), line);
            continue;
        };
        let one = || -> std::result::Result<Option<Example>, String> {
            let text = nonempty(p, "paraphrase").map_err(|r| format!("paraphrase with {r}"))?;
            let bucket = match p.get("bucket") {
                Some(Value::Number(n)) => n.as_u64().and_then(|b| u32::try_from(b).ok()),
                Some(Value::String(s)) => s.trim().parse::<u32>().ok(),
                _ => None,
            }
            .ok_or("paraphrase without a whole-number `bucket`")?;
            if opts.buckets.as_ref().is_some_and(|b| !b.contains(&bucket)) {
                return Ok(None);
            }
            let response = if opts.use_paraphrase_answers {
                nonempty(p, "answer").map_err(|r| format!("paraphrase with {r}"))?
            } else {
                output
            };
            let mut ex = Example::prompt_response([("instruction", text), ("input", input)], response);
            ex.meta.insert("bucket".into(), bucket.to_string());
            if let Some(o) = original {
                ex.meta.insert("original_instruction".into(), o.to_string());
            }
            for (k, v) in p {
                if matches!(k.as_str(), "paraphrase" | "answer" | "bucket") {
                    continue;
                }
                match v {
                    Value::String(s) => ex.meta.insert(k.clone(), s.clone()),
                    Value::Number(_) | Value::Bool(_) => ex.meta.insert(k.clone(), v.to_string()),
                    _ => None,
                };
            }
            Ok(Some(ex))
        };
        match one() {
            Ok(Some(ex)) => out.push(ex),
            Ok(None) => report.filtered_by_bucket += 1,
            Err(reason) => report.skip(reason, line),
        }
    }
    Ok(())
}
