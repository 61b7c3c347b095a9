//! The HF tokenizer of a model: `tokenizer.json` (through the `tokenizers` crate), the special
//! tokens of `tokenizer_config.json` and `generation_config.json`, streaming decode for
//! generation, and chat templates rendered with minijinja the way transformers renders them.
//!
//! Special tokens are resolved once, at load, to ids: a token named in a config but missing from
//! the vocabulary is an error there rather than a silent `None` at generation time.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{ErrorKind, Value};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A plain ChatML template (`<|im_start|>role\ncontent<|im_end|>\n` per message), for callers that
/// opt into it explicitly (`with_chat_template(CHATML_TEMPLATE.into())`) when a tokenizer has no
/// template of its own. It is never applied implicitly: a model not trained on ChatML would get a
/// prompt format it has never seen.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}\
{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\
{% endfor %}\
{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// The message `apply_chat_template` gives when there is no template to apply.
const NO_TEMPLATE: &str = "this tokenizer has no chat template; pass --chat-template or use a plain prompt";

/// One message of a conversation, as chat templates see it (`message['role']`,
/// `message['content']`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` (or whatever roles the template knows).
    pub role: String,
    /// The text of the message.
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into() }
    }
}

/// A special token resolved through the vocabulary.
#[derive(Debug, Clone)]
struct Special {
    token: String,
    id: u32,
}

/// How `encode(.., add_special_tokens = true)` adds special tokens.
#[derive(Debug, Clone)]
enum AddSpecials {
    /// Prepend and append these ids around the plain encoding. Used whenever the post-processor
    /// of `tokenizer.json` is understood (it only adds tokens before and after the text, as every
    /// Llama-family one does) or `tokenizer_config.json` overrides it with `add_bos_token` /
    /// `add_eos_token`, as transformers does by rewriting the post-processor.
    Around { prefix: Vec<u32>, suffix: Vec<u32> },
    /// Leave it to the post-processor of `tokenizer.json` (one we could not take apart).
    PostProcessor,
}

/// A model's tokenizer with its special tokens and chat template.
///
/// Cheap to clone: the vocabulary is shared.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<tokenizers::Tokenizer>,
    /// Where `tokenizer.json` came from, for error messages.
    path: PathBuf,
    bos: Option<Special>,
    /// The `eos_token` of tokenizer_config (what templates call `eos_token`).
    eos: Option<Special>,
    /// Every id that ends generation: the `eos_token` first, then generation_config's ids.
    eos_ids: Vec<u32>,
    pad: Option<Special>,
    pad_id: Option<u32>,
    unk: Option<Special>,
    add_specials: AddSpecials,
    vocab_size: usize,
    chat_template: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    // The derived form would print the whole vocabulary.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("path", &self.path)
            .field("vocab_size", &self.vocab_size)
            .field("bos", &self.bos)
            .field("eos_ids", &self.eos_ids)
            .field("pad_id", &self.pad_id)
            .field("unk", &self.unk)
            .field("add_specials", &self.add_specials)
            .field("chat_template", &self.chat_template.is_some())
            .finish()
    }
}

/// A field of a config that may be absent, explicitly null, or set.
enum Field<T> {
    Absent,
    Null,
    Set(T),
}

/// The parts of `tokenizer_config.json` we use.
struct TokenizerConfig {
    path: PathBuf,
    bos: Field<String>,
    eos: Field<String>,
    pad: Field<String>,
    unk: Field<String>,
    add_bos: Option<bool>,
    add_eos: Option<bool>,
    chat_template: Option<String>,
}

/// The parts of `generation_config.json` we use.
#[derive(Default)]
struct GenerationConfig {
    path: PathBuf,
    bos: Option<u32>,
    eos: Vec<u32>,
    pad: Option<u32>,
}

fn read_json(path: &Path) -> Result<serde_json::Map<String, serde_json::Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    match serde_json::from_str(&text) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(other) => Err(Error::format(path, format!("expected a JSON object, found {}", json_kind(&other)))),
        Err(e) => Err(Error::format(path, format!("not valid JSON: {e}"))),
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "an object",
    }
}

impl TokenizerConfig {
    fn read(path: &Path) -> Result<Self> {
        let map = read_json(path)?;
        let token = |field: &str| -> Result<Field<String>> {
            match map.get(field) {
                None => Ok(Field::Absent),
                Some(serde_json::Value::Null) => Ok(Field::Null),
                Some(serde_json::Value::String(s)) => Ok(Field::Set(s.clone())),
                // The AddedToken form: {"content": "<s>", "lstrip": false, ...}.
                Some(serde_json::Value::Object(o)) => match o.get("content") {
                    Some(serde_json::Value::String(s)) => Ok(Field::Set(s.clone())),
                    _ => Err(Error::format(path, format!("`{field}` is an object without a string `content`"))),
                },
                Some(other) => Err(Error::format(
                    path,
                    format!("`{field}`: expected a string or {{\"content\": ...}}, found {}", json_kind(other)),
                )),
            }
        };
        let flag = |field: &str| -> Result<Option<bool>> {
            match map.get(field) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::Bool(b)) => Ok(Some(*b)),
                Some(other) => {
                    Err(Error::format(path, format!("`{field}`: expected a boolean, found {}", json_kind(other))))
                }
            }
        };
        let chat_template = match map.get("chat_template") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(list)) => Some(pick_default_template(path, list)?),
            Some(other) => {
                return Err(Error::format(
                    path,
                    format!(
                        "`chat_template`: expected a string or a list of {{name, template}}, found {}",
                        json_kind(other)
                    ),
                ));
            }
        };
        Ok(TokenizerConfig {
            path: path.to_path_buf(),
            bos: token("bos_token")?,
            eos: token("eos_token")?,
            pad: token("pad_token")?,
            unk: token("unk_token")?,
            add_bos: flag("add_bos_token")?,
            add_eos: flag("add_eos_token")?,
            chat_template,
        })
    }
}

/// From a list of named templates, the one named "default" (what transformers uses when no name
/// is asked for; it refuses a list without one, and so do we).
fn pick_default_template(path: &Path, list: &[serde_json::Value]) -> Result<String> {
    let mut names = Vec::new();
    for entry in list {
        let name = entry.get("name").and_then(|v| v.as_str());
        let template = entry.get("template").and_then(|v| v.as_str());
        match (name, template) {
            (Some("default"), Some(t)) => return Ok(t.to_string()),
            (Some(n), Some(_)) => names.push(n.to_string()),
            _ => {
                return Err(Error::format(
                    path,
                    "`chat_template`: each entry of the list needs a string `name` and `template`",
                ));
            }
        }
    }
    Err(Error::format(path, format!("`chat_template`: no template named \"default\" among {names:?}")))
}

impl GenerationConfig {
    fn read(path: &Path) -> Result<Self> {
        let map = read_json(path)?;
        // generation_config gives ids as an int or a list of ints (Llama-3-Instruct lists
        // <|end_of_text|>, <|eom_id|> and <|eot_id|>).
        let ids = |field: &str| -> Result<Vec<u32>> {
            let one = |v: &serde_json::Value| {
                v.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| Error::format(path, format!("`{field}`: expected a token id, found {v}")))
            };
            match map.get(field) {
                None | Some(serde_json::Value::Null) => Ok(Vec::new()),
                Some(serde_json::Value::Array(list)) => list.iter().map(one).collect(),
                Some(v) => Ok(vec![one(v)?]),
            }
        };
        Ok(GenerationConfig {
            path: path.to_path_buf(),
            bos: ids("bos_token_id")?.first().copied(),
            eos: ids("eos_token_id")?,
            pad: ids("pad_token_id")?.first().copied(),
        })
    }
}

/// Parses the bytes of a `tokenizer.json` with the tokenizers library, which panics (instead of
/// returning an error) on some malformed files: invalid JSON inside the `decoder` section, a bad
/// precompiled character map. JSON errors are caught first, with their position; any other panic
/// of the library is contained and reported as an error on the file.
fn parse_tokenizer_json(path: &Path, bytes: &[u8]) -> Result<tokenizers::Tokenizer> {
    serde_json::from_slice::<serde_json::Value>(bytes)
        .map_err(|e| Error::format(path, format!("not a valid tokenizer.json: invalid JSON: {e}")))?;
    match std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(bytes)) {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(Error::format(path, format!("not a valid tokenizer.json: {e}"))),
        Err(panic) => {
            let why = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("no message");
            Err(Error::format(path, format!("not a valid tokenizer.json: the tokenizers library failed on it ({why})")))
        }
    }
}

impl Tokenizer {
    /// Loads the tokenizer of a model directory: `tokenizer.json`, plus `tokenizer_config.json`
    /// and `generation_config.json` when present. When `tokenizer_config.json` has no chat
    /// template, `chat_template.jinja` (where recent transformers saves it) is used if present.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let optional = |name: &str| {
            let p = dir.join(name);
            p.is_file().then_some(p)
        };
        let tc = optional("tokenizer_config.json");
        let gc = optional("generation_config.json");
        let mut tok = Self::from_files(dir.join("tokenizer.json"), tc.as_deref(), gc.as_deref())?;
        if tok.chat_template.is_none()
            && let Some(p) = optional("chat_template.jinja")
        {
            tok.chat_template = Some(std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?);
        }
        Ok(tok)
    }

    /// Loads a tokenizer from explicit files. Without `tokenizer_config` there are no named
    /// special tokens beyond generation_config's ids, and no chat template.
    pub fn from_files(
        tokenizer_json: impl AsRef<Path>,
        tokenizer_config: Option<&Path>,
        generation_config: Option<&Path>,
    ) -> Result<Self> {
        let path = tokenizer_json.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let inner = parse_tokenizer_json(path, &bytes)?;
        let tc = tokenizer_config.map(TokenizerConfig::read).transpose()?;
        let gc = generation_config.map(GenerationConfig::read).transpose()?;
        Self::build(inner, path, tc, gc)
    }

    fn build(
        inner: tokenizers::Tokenizer,
        path: &Path,
        tc: Option<TokenizerConfig>,
        gc: Option<GenerationConfig>,
    ) -> Result<Self> {
        let vocab_size = inner.get_vocab_size(true);
        let resolve = |field: &str, value: &Field<String>| -> Result<Option<Special>> {
            let Field::Set(token) = value else { return Ok(None) };
            match inner.token_to_id(token) {
                Some(id) => Ok(Some(Special { token: token.clone(), id })),
                None => Err(Error::format(
                    tc.as_ref().map_or(path, |c| c.path.as_path()),
                    format!(
                        "`{field}` is {token:?}, which is not in the vocabulary of {} \
                         ({vocab_size} tokens)",
                        path.display()
                    ),
                )),
            }
        };
        // An id from generation_config must name a token, or generation would stop on (or
        // decode) something that does not exist.
        let check_id = |field: &str, id: u32| -> Result<Special> {
            match inner.id_to_token(id) {
                Some(token) => Ok(Special { token, id }),
                None => Err(Error::format(
                    gc.as_ref().map_or(path, |c| c.path.as_path()),
                    format!("`{field}` {id} is not a token of {} ({vocab_size} tokens)", path.display()),
                )),
            }
        };
        let field = |get: fn(&TokenizerConfig) -> &Field<String>| match &tc {
            Some(c) => get(c),
            None => &Field::Absent,
        };

        // tokenizer_config names tokens; generation_config only fills in what it leaves out (an
        // explicit null in tokenizer_config means "none", as Qwen2's bos_token does).
        let bos = match field(|c| &c.bos) {
            Field::Absent => match gc.as_ref().and_then(|g| g.bos) {
                Some(id) => Some(check_id("bos_token_id", id)?),
                None => None,
            },
            f => resolve("bos_token", f)?,
        };
        let eos = resolve("eos_token", field(|c| &c.eos))?;
        let mut eos_ids: Vec<u32> = eos.iter().map(|s| s.id).collect();
        for &id in gc.as_ref().map_or(&[][..], |g| g.eos.as_slice()) {
            check_id("eos_token_id", id)?;
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
        let pad = match field(|c| &c.pad) {
            Field::Absent => match gc.as_ref().and_then(|g| g.pad) {
                Some(id) => Some(check_id("pad_token_id", id)?),
                None => None,
            },
            f => resolve("pad_token", f)?,
        };
        // Llama-family models rarely define a pad token; batches are padded with EOS (the padded
        // positions are masked out of attention and loss, so which id fills them does not matter).
        let pad_id = pad.as_ref().map(|s| s.id).or_else(|| eos_ids.first().copied());
        let unk = resolve("unk_token", field(|c| &c.unk))?;

        let add_specials = Self::add_specials(&inner, path, tc.as_ref(), &bos, &eos_ids)?;
        Ok(Tokenizer {
            inner: Arc::new(inner),
            path: path.to_path_buf(),
            bos,
            eos,
            eos_ids,
            pad,
            pad_id,
            unk,
            add_specials,
            vocab_size,
            chat_template: tc.and_then(|c| c.chat_template),
        })
    }

    /// Decides what `add_special_tokens = true` adds. The post-processor is taken apart by
    /// experiment (what it adds around a one-character text) rather than by matching its JSON,
    /// so every kind of post-processor (template, sequence, byte-level) is handled alike.
    fn add_specials(
        inner: &tokenizers::Tokenizer,
        path: &Path,
        tc: Option<&TokenizerConfig>,
        bos: &Option<Special>,
        eos_ids: &[u32],
    ) -> Result<AddSpecials> {
        let enc = |add: bool| {
            inner
                .encode("a", add)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| Error::format(path, format!("cannot encode a test string: {e}")))
        };
        let plain = enc(false)?;
        let full = enc(true)?;
        let split = if plain.is_empty() {
            None
        } else {
            full.windows(plain.len())
                .position(|w| w == plain.as_slice())
                .map(|i| (full[..i].to_vec(), full[i + plain.len()..].to_vec()))
        };
        let (add_bos, add_eos) = match tc {
            Some(c) => (c.add_bos, c.add_eos),
            None => (None, None),
        };
        let cfg_path = tc.map_or(path, |c| c.path.as_path());
        let (mut prefix, mut suffix) = match split {
            Some(parts) => parts,
            None if add_bos.is_none() && add_eos.is_none() => return Ok(AddSpecials::PostProcessor),
            None => (Vec::new(), Vec::new()),
        };
        match add_bos {
            Some(true) => match bos {
                Some(b) => prefix = vec![b.id],
                None => {
                    return Err(Error::format(cfg_path, "`add_bos_token` is true but no `bos_token` is set"));
                }
            },
            Some(false) => prefix.clear(),
            None => {}
        }
        match add_eos {
            Some(true) => match eos_ids.first() {
                Some(&id) => suffix = vec![id],
                None => {
                    return Err(Error::format(cfg_path, "`add_eos_token` is true but no `eos_token` is set"));
                }
            },
            Some(false) => suffix.clear(),
            None => {}
        }
        Ok(AddSpecials::Around { prefix, suffix })
    }

    /// The BOS id, if the tokenizer has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos.as_ref().map(|s| s.id)
    }

    /// The BOS token as a string, if any (what templates call `bos_token`).
    pub fn bos_token(&self) -> Option<&str> {
        self.bos.as_ref().map(|s| s.token.as_str())
    }

    /// Every id that ends generation: tokenizer_config's `eos_token` first, then the
    /// `eos_token_id`s of generation_config (e.g. Llama-3-Instruct's `<|eot_id|>`, which ends a
    /// chat turn while its `eos_token` is `<|end_of_text|>`). Empty when neither file names one.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// The EOS token of tokenizer_config as a string, if any (what templates call `eos_token`).
    pub fn eos_token(&self) -> Option<&str> {
        self.eos.as_ref().map(|s| s.token.as_str())
    }

    /// Whether `id` ends generation.
    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_ids.contains(&id)
    }

    /// The id to pad batches with: the pad token of tokenizer_config (or generation_config's
    /// `pad_token_id`), falling back to the first EOS id since most Llama-family models define
    /// no pad token. `None` only when there is neither.
    pub fn pad_id(&self) -> Option<u32> {
        self.pad_id
    }

    /// The UNK id named by tokenizer_config, if any.
    pub fn unk_id(&self) -> Option<u32> {
        self.unk.as_ref().map(|s| s.id)
    }

    /// Whether `encode(.., true)` prepends BOS.
    pub fn add_bos_token(&self) -> bool {
        match (&self.add_specials, self.bos_id()) {
            (AddSpecials::Around { prefix, .. }, Some(bos)) => prefix.first() == Some(&bos),
            _ => false,
        }
    }

    /// Whether `encode(.., true)` appends an EOS id.
    pub fn add_eos_token(&self) -> bool {
        match &self.add_specials {
            AddSpecials::Around { suffix, .. } => suffix.last().is_some_and(|&id| self.is_eos(id)),
            AddSpecials::PostProcessor => false,
        }
    }

    /// The number of distinct tokens, added tokens included (ids may have holes: the model's
    /// embedding can be larger).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Checks that every id this tokenizer can produce has a row in the model's embedding of
    /// `model_vocab` rows (an embedding may be larger, padded; never smaller). A tokenizer from
    /// another model would otherwise index past the embedding.
    pub fn check_fits_model(&self, model_vocab: usize) -> Result<()> {
        let vocab = self.inner.get_vocab(true);
        let Some((token, &max_id)) = vocab.iter().max_by_key(|(_, id)| **id) else {
            return Err(Error::Tokenizer("the tokenizer has an empty vocabulary".into()));
        };
        if max_id as usize >= model_vocab {
            return Err(Error::Tokenizer(format!(
                "the tokenizer does not match the model: its token `{token}` has id {max_id} ({} tokens), but the \
                 model's vocab_size is {model_vocab} (ids 0..{model_vocab}); use the tokenizer files of the model's \
                 own directory",
                self.vocab_size
            )));
        }
        Ok(())
    }

    /// The id of a token (added tokens included), if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token of an id, in the vocabulary's own spelling (byte-level BPE shows a space as
    /// `Ġ`); `decode` gives text.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The chat template in use, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Replaces the chat template (from `--chat-template`, or [`CHATML_TEMPLATE`]).
    pub fn with_chat_template(&mut self, template: String) {
        self.chat_template = Some(template);
    }

    /// Encodes `text` to ids. With `add_special_tokens`, BOS/EOS are added as
    /// tokenizer_config's `add_bos_token`/`add_eos_token` say, or else as tokenizer.json's
    /// post-processor does. Special tokens written in the text (`<|im_start|>`) become their ids.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let post = add_special_tokens && matches!(self.add_specials, AddSpecials::PostProcessor);
        let enc = self.inner.encode(text, post).map_err(|e| Error::Tokenizer(format!("cannot encode text: {e}")))?;
        Ok(self.around(enc.get_ids(), add_special_tokens))
    }

    /// Encodes several texts (in parallel), as [`Tokenizer::encode`] does each.
    pub fn encode_batch<S: AsRef<str>>(&self, texts: &[S], add_special_tokens: bool) -> Result<Vec<Vec<u32>>> {
        let post = add_special_tokens && matches!(self.add_specials, AddSpecials::PostProcessor);
        let inputs: Vec<&str> = texts.iter().map(AsRef::as_ref).collect();
        let encs =
            self.inner.encode_batch(inputs, post).map_err(|e| Error::Tokenizer(format!("cannot encode batch: {e}")))?;
        Ok(encs.iter().map(|e| self.around(e.get_ids(), add_special_tokens)).collect())
    }

    fn around(&self, ids: &[u32], add_special_tokens: bool) -> Vec<u32> {
        match &self.add_specials {
            AddSpecials::Around { prefix, suffix } if add_special_tokens => {
                let mut out = Vec::with_capacity(prefix.len() + ids.len() + suffix.len());
                out.extend_from_slice(prefix);
                out.extend_from_slice(ids);
                out.extend_from_slice(suffix);
                out
            }
            _ => ids.to_vec(),
        }
    }

    /// Decodes ids to text, leaving out special tokens when `skip_special_tokens`. An id outside
    /// the vocabulary is an error (the `tokenizers` crate would silently drop it).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        check_ids(&self.inner, ids)?;
        raw_decode(&self.inner, ids, skip_special_tokens)
    }

    /// A streaming decoder for generation: feed it ids one by one, get back the text each
    /// completes.
    pub fn decode_stream(&self, skip_special_tokens: bool) -> DecodeStream {
        DecodeStream {
            inner: Arc::clone(&self.inner),
            skip_special_tokens,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// Renders the chat template on `messages`, as transformers' `apply_chat_template(...,
    /// tokenize=False)` does. With `add_generation_prompt` the text ends with the header of an
    /// assistant turn, ready for generation. Templates insert BOS themselves when the model wants
    /// it: encode the result with `add_special_tokens = false`.
    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| Error::Tokenizer(NO_TEMPLATE.into()))?;
        let mut vars: BTreeMap<&str, Value> = BTreeMap::new();
        let msgs: Vec<Value> = messages
            .iter()
            .map(|m| {
                Value::from_pairs([
                    ("role", Value::from(m.role.as_str())),
                    ("content", Value::from(m.content.as_str())),
                ])
            })
            .collect();
        vars.insert("messages", Value::from(msgs));
        vars.insert("add_generation_prompt", Value::from(add_generation_prompt));
        let specials =
            [("bos_token", &self.bos), ("eos_token", &self.eos), ("pad_token", &self.pad), ("unk_token", &self.unk)];
        for (name, special) in specials {
            if let Some(s) = special {
                vars.insert(name, Value::from(s.token.as_str()));
            }
        }
        render_template(template, Value::from_pairs(vars))
    }
}

/// Errors on an id that names no token.
fn check_ids(inner: &tokenizers::Tokenizer, ids: &[u32]) -> Result<()> {
    match ids.iter().find(|&&id| inner.id_to_token(id).is_none()) {
        Some(id) => Err(Error::Tokenizer(format!(
            "cannot decode id {id}: not in the vocabulary ({} tokens)",
            inner.get_vocab_size(true)
        ))),
        None => Ok(()),
    }
}

fn raw_decode(inner: &tokenizers::Tokenizer, ids: &[u32], skip: bool) -> Result<String> {
    inner.decode(ids, skip).map_err(|e| Error::Tokenizer(format!("cannot decode: {e}")))
}

/// Decodes generated ids one at a time, returning only newly completed text.
///
/// A token can end inside a UTF-8 character (byte-level BPE and byte fallback split rare
/// characters into bytes), and some decoders change a token's text depending on what precedes
/// it (a leading space dropped at the start). So each step decodes a short window of recent ids
/// twice, with and without the new ones, and emits the difference once it does not end in an
/// incomplete character (U+FFFD). This is the scheme of `tokenizers`' own `DecodeStream`; ours
/// owns its tokenizer (no lifetime to thread through a generation loop), refuses unknown ids and
/// has [`DecodeStream::flush`] to emit what is held back when generation stops.
#[derive(Clone)]
pub struct DecodeStream {
    inner: Arc<tokenizers::Tokenizer>,
    skip_special_tokens: bool,
    /// The window of recent ids (older ones are dropped once emitted).
    ids: Vec<u32>,
    /// `ids[prefix_offset..read_offset]` is context whose text was already emitted; it is
    /// decoded again so that the new text is cut from the same decoding.
    prefix_offset: usize,
    /// `ids[read_offset..]` is not emitted yet.
    read_offset: usize,
}

impl std::fmt::Debug for DecodeStream {
    // The derived form would print the whole vocabulary.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecodeStream")
            .field("skip_special_tokens", &self.skip_special_tokens)
            .field("pending_ids", &&self.ids[self.read_offset..])
            .finish()
    }
}

impl DecodeStream {
    /// Adds one id; returns the text it completes, or `None` when it only begins a character
    /// (or is a skipped special token).
    pub fn step(&mut self, id: u32) -> Result<Option<String>> {
        check_ids(&self.inner, &[id])?;
        self.ids.push(id);
        let (prefix, text) = self.window()?;
        if text.len() > prefix.len() && !text.ends_with('\u{FFFD}') {
            Ok(Some(self.advance(&prefix, &text)))
        } else {
            Ok(None)
        }
    }

    /// Emits whatever is held back (an incomplete character shows as U+FFFD, as a full decode
    /// shows it). Call it when generation stops; the stream can go on afterwards.
    pub fn flush(&mut self) -> Result<Option<String>> {
        if self.read_offset == self.ids.len() {
            return Ok(None);
        }
        let (prefix, text) = self.window()?;
        let out = self.advance(&prefix, &text);
        Ok((!out.is_empty()).then_some(out))
    }

    fn window(&self) -> Result<(String, String)> {
        let skip = self.skip_special_tokens;
        let prefix = raw_decode(&self.inner, &self.ids[self.prefix_offset..self.read_offset], skip)?;
        let text = raw_decode(&self.inner, &self.ids[self.prefix_offset..], skip)?;
        Ok((prefix, text))
    }

    /// Takes the new text out of `text` and moves the window past it.
    fn advance(&mut self, prefix: &str, text: &str) -> String {
        // `text` extends `prefix` for every decoder of the Llama family; should one rewrite the
        // earlier text, emit from where they part (on a character boundary) rather than fail
        // mid-generation.
        let mut common = 0;
        for ((i, a), b) in text.char_indices().zip(prefix.chars()) {
            if a != b {
                break;
            }
            common = i + a.len_utf8();
        }
        let out = text[common..].to_string();
        self.ids.drain(..self.read_offset);
        self.prefix_offset = 0;
        self.read_offset = self.ids.len();
        out
    }
}

/// Carries the message of a template's `raise_exception` through minijinja's error.
#[derive(Debug)]
struct TemplateException(String);

impl std::fmt::Display for TemplateException {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TemplateException {}

/// Renders a chat template with the environment transformers gives it.
fn render_template(template: &str, ctx: Value) -> Result<String> {
    let mut env = minijinja::Environment::new();
    // transformers renders with trim_blocks and lstrip_blocks on, keep_trailing_newline off.
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .keep_trailing_newline(false)
        .build()
        .map_err(|e| template_error(&e))?;
    env.set_syntax(syntax);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> std::result::Result<Value, minijinja::Error> {
        Err(minijinja::Error::new(ErrorKind::InvalidOperation, "raise_exception").with_source(TemplateException(msg)))
    });
    env.add_function("strftime_now", |fmt: String| -> std::result::Result<String, minijinja::Error> {
        let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let secs = i64::try_from(secs).unwrap_or(i64::MAX);
        strftime(&fmt, secs).map_err(|msg| minijinja::Error::new(ErrorKind::InvalidOperation, msg))
    });
    // minijinja's own tojson escapes <, >, & and ' for HTML; transformers' is json.dumps.
    env.add_filter("tojson", tojson);
    env.add_template("chat_template", template).map_err(|e| template_error(&e))?;
    let tmpl = env.get_template("chat_template").map_err(|e| template_error(&e))?;
    tmpl.render(ctx).map_err(|e| template_error(&e))
}

fn template_error(err: &minijinja::Error) -> Error {
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        if let Some(TemplateException(msg)) = s.downcast_ref::<TemplateException>() {
            return Error::Tokenizer(format!("chat template raised an exception: {msg}"));
        }
        source = s.source();
    }
    let line = err.line().map(|l| format!(" (line {l})")).unwrap_or_default();
    let detail = err.detail().map(|d| format!(": {d}")).unwrap_or_default();
    Error::Tokenizer(format!("chat template: {}{detail}{line}", err.kind()))
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];

/// The civil date (year, month 1–12, day 1–31) of a day counted from 1970-01-01, in the
/// proleptic Gregorian calendar (H. Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, usize, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, usize::try_from(month).unwrap_or(1), day)
}

/// Python's `strftime` for the directives chat templates use, in UTC (transformers uses local
/// time; without a time-zone database UTC is the honest choice).
fn strftime(fmt: &str, unix_secs: i64) -> std::result::Result<String, String> {
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    // 1970-01-01 was a Thursday (index 3 from Monday).
    let weekday = usize::try_from((days + 3).rem_euclid(7)).unwrap_or(0);
    let month_name = MONTHS[(month - 1) % 12];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:>2}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('b') => out.push_str(&month_name[..3]),
            Some('B') => out.push_str(month_name),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            Some('H') => out.push_str(&format!("{:02}", secs / 3600)),
            Some('M') => out.push_str(&format!("{:02}", secs / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", secs % 60)),
            Some('a') => out.push_str(&WEEKDAYS[weekday][..3]),
            Some('A') => out.push_str(WEEKDAYS[weekday]),
            Some('%') => out.push('%'),
            Some(other) => return Err(format!("strftime_now: unsupported directive %{other}")),
            None => return Err("strftime_now: format ends with a lone %".into()),
        }
    }
    Ok(out)
}

/// The `tojson` filter of transformers: Python's `json.dumps(value, ensure_ascii=False,
/// indent=indent, sort_keys=sort_keys)`, with its `", "` and `": "` separators.
fn tojson(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent = match indent {
        Some(v) => Some(v),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(usize::try_from(v)?),
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    // Accepted and ignored: we always write non-ASCII as is, as transformers asks.
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&mut out, value, indent, sort_keys, 0)?;
    Ok(Value::from_safe_string(out))
}

fn write_json(
    out: &mut String,
    value: &Value,
    indent: Option<usize>,
    sort_keys: bool,
    depth: usize,
) -> std::result::Result<(), minijinja::Error> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    // With an indent Python separates items with "," and a newline; without, with ", ".
    let item_sep = if indent.is_some() { "," } else { ", " };
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            let f = f64::try_from(value.clone()).ok();
            match f {
                Some(f) if !value.is_integer() && f.is_nan() => out.push_str("NaN"),
                Some(f) if !value.is_integer() && f.is_infinite() => {
                    out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" })
                }
                _ => out.push_str(&value.to_string()),
            }
        }
        ValueKind::String => write_json_str(out, value.as_str().unwrap_or_default()),
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if sort_keys {
                keys.sort();
            }
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                match key.as_str() {
                    Some(s) => write_json_str(out, s),
                    None => write_json_str(out, &key.to_string()),
                }
                out.push_str(": ");
                write_json(out, &value.get_item(key)?, indent, sort_keys, depth + 1)?;
            }
            newline(out, depth);
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_json(out, item, indent, sort_keys, depth + 1)?;
            }
            newline(out, depth);
            out.push(']');
        }
        kind => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: cannot serialize a {kind}"),
            ));
        }
    }
    Ok(())
}

fn write_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0C}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    use crate::util::TempDir;

    /// GPT-2's byte-to-character map of byte-level BPE.
    fn byte_chars() -> Vec<char> {
        (0..=255u8).map(crate::gguf::byte_char).collect()
    }

    // Merges: "hello", " w", and the first two bytes of 漢 (E6 BC), so that 漢 splits into a
    // token that ends inside the character and one that completes it; é (C3 A9) is one token.
    const MERGES: [&str; 7] = ["h e", "l l", "he ll", "hell o", "Ġ w", "Ã ©", "æ ¼"];
    const SPECIALS: [&str; 6] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "<|eot_id|>", "</s>"];

    fn vocab() -> Vec<String> {
        let mut v: Vec<String> = byte_chars().iter().map(|c| c.to_string()).collect();
        for m in MERGES {
            v.push(m.replace(' ', ""));
        }
        v
    }

    /// Id of the special token `name` in the test tokenizer.
    fn sid(name: &str) -> u32 {
        (vocab().len() + SPECIALS.iter().position(|s| *s == name).unwrap()) as u32
    }

    fn tokenizer_json(post_processor: serde_json::Value) -> serde_json::Value {
        let vocab: serde_json::Map<String, serde_json::Value> =
            vocab().into_iter().enumerate().map(|(i, t)| (t, json!(i))).collect();
        let added: Vec<serde_json::Value> = SPECIALS
            .iter()
            .map(|s| {
                json!({"id": sid(s), "content": s, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false,
                              "trim_offsets": true, "use_regex": true},
            "post_processor": post_processor,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                        "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": MERGES}
        })
    }

    fn byte_level_post() -> serde_json::Value {
        json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false,
               "use_regex": true})
    }

    /// A Llama-style post-processor that prepends `<s>`.
    fn bos_template_post() -> serde_json::Value {
        json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [sid("<s>")], "tokens": ["<s>"]}}
        })
    }

    /// Writes a model directory and loads it.
    fn load(
        dir: &TempDir,
        post: serde_json::Value,
        tc: Option<serde_json::Value>,
        gc: Option<serde_json::Value>,
    ) -> Result<Tokenizer> {
        dir.write("tokenizer.json", &tokenizer_json(post));
        if let Some(tc) = tc {
            dir.write("tokenizer_config.json", &tc);
        }
        if let Some(gc) = gc {
            dir.write("generation_config.json", &gc);
        }
        Tokenizer::from_dir(&dir.0)
    }

    fn chatml_tokenizer(dir: &TempDir) -> Tokenizer {
        let tc = json!({"bos_token": null, "eos_token": "<|im_end|>",
                        "pad_token": "<|endoftext|>", "unk_token": null});
        load(dir, byte_level_post(), Some(tc), None).unwrap()
    }

    const TEXTS: [&str; 5] =
        ["hello world", "Hello, hello! The  spaces\tand\nnewlines.", "café é", "漢字 and 漢", "emoji 😀🎉 done"];

    #[test]
    fn encode_decode_round_trips() {
        let dir = TempDir::new("roundtrip");
        let tok = chatml_tokenizer(&dir);
        for text in TEXTS {
            let ids = tok.encode(text, true).unwrap();
            assert_eq!(tok.decode(&ids, false).unwrap(), text);
            assert_eq!(tok.decode(&ids, true).unwrap(), text);
        }
        // Merges apply: "hello" is one token, " w" one, é one.
        let hello = tok.token_to_id("hello").unwrap();
        assert_eq!(tok.encode("hello", false).unwrap(), vec![hello]);
        assert_eq!(tok.encode("é", false).unwrap(), vec![tok.token_to_id("Ã©").unwrap()]);
        assert_eq!(tok.encode("漢", false).unwrap().len(), 2);
        assert_eq!(tok.id_to_token(hello).as_deref(), Some("hello"));
        assert_eq!(tok.vocab_size(), vocab().len() + SPECIALS.len());
    }

    #[test]
    fn encode_batch_matches_encode() {
        let dir = TempDir::new("batch");
        let tok = chatml_tokenizer(&dir);
        let batch = tok.encode_batch(&TEXTS, false).unwrap();
        for (text, ids) in TEXTS.iter().zip(&batch) {
            assert_eq!(&tok.encode(text, false).unwrap(), ids);
        }
    }

    #[test]
    fn special_tokens_are_single_ids_and_skippable() {
        let dir = TempDir::new("specials");
        let tok = chatml_tokenizer(&dir);
        let text = "<|im_start|>user\nhello<|im_end|>\n<|endoftext|>";
        let ids = tok.encode(text, false).unwrap();
        let hello = tok.token_to_id("hello").unwrap();
        let nl = tok.token_to_id("Ċ").unwrap();
        assert_eq!(ids[0], sid("<|im_start|>"));
        assert_eq!(ids[ids.len() - 3..], [sid("<|im_end|>"), nl, sid("<|endoftext|>")]);
        assert!(ids.contains(&hello));
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
        assert_eq!(tok.decode(&ids, true).unwrap(), "user\nhello\n");
    }

    #[test]
    fn decode_rejects_unknown_ids() {
        let dir = TempDir::new("unknown-id");
        let tok = chatml_tokenizer(&dir);
        let err = tok.decode(&[1, 99_999], false).unwrap_err().to_string();
        assert!(err.contains("99999"), "{err}");
        assert!(tok.decode_stream(false).step(99_999).is_err());
    }

    /// Streams `ids` and checks the pieces: never a broken character, and with the flush they
    /// add up to the full decode.
    fn check_stream(tok: &Tokenizer, ids: &[u32], skip: bool) {
        let full = tok.decode(ids, skip).unwrap();
        let mut stream = tok.decode_stream(skip);
        let mut out = String::new();
        for &id in ids {
            if let Some(piece) = stream.step(id).unwrap() {
                assert!(!piece.contains('\u{FFFD}'), "broken character in {piece:?}");
                assert!(!piece.is_empty());
                out.push_str(&piece);
            }
        }
        assert!(full.starts_with(&out), "{out:?} is not a prefix of {full:?}");
        if let Some(rest) = stream.flush().unwrap() {
            out.push_str(&rest);
        }
        assert_eq!(out, full);
    }

    #[test]
    fn streaming_decode_equals_full_decode_for_every_prefix() {
        let dir = TempDir::new("stream");
        let tok = chatml_tokenizer(&dir);
        let text = "<|im_start|>assistant\nhéllo 漢字 😀 wörld 🎉<|im_end|>";
        let ids = tok.encode(text, false).unwrap();
        assert!(ids.len() > 20);
        for n in 0..=ids.len() {
            check_stream(&tok, &ids[..n], false);
            check_stream(&tok, &ids[..n], true);
        }
        // A prefix that ends inside a character is held back, then completed.
        let han = tok.encode("漢", false).unwrap();
        let mut stream = tok.decode_stream(false);
        assert_eq!(stream.step(han[0]).unwrap(), None);
        assert_eq!(stream.step(han[1]).unwrap().as_deref(), Some("漢"));
        assert_eq!(stream.flush().unwrap(), None);
        // Generation that stops inside a character: the flush shows what a full decode shows.
        let mut stream = tok.decode_stream(false);
        assert_eq!(stream.step(han[0]).unwrap(), None);
        assert_eq!(stream.flush().unwrap(), Some(tok.decode(&han[..1], false).unwrap()));
    }

    #[test]
    fn special_tokens_from_strings_objects_and_generation_config() {
        let dir = TempDir::new("eos-set");
        let tc = json!({
            "bos_token": {"content": "<s>", "lstrip": false, "normalized": false},
            "eos_token": "<|im_end|>",
            "unk_token": {"content": "<|endoftext|>"},
        });
        let gc = json!({"bos_token_id": sid("<|im_start|>"),
                        "eos_token_id": [sid("<|im_end|>"), sid("<|eot_id|>"), sid("</s>")]});
        let tok = load(&dir, byte_level_post(), Some(tc), Some(gc)).unwrap();
        // tokenizer_config's bos wins over generation_config's.
        assert_eq!(tok.bos_id(), Some(sid("<s>")));
        assert_eq!(tok.bos_token(), Some("<s>"));
        assert_eq!(tok.eos_ids(), &[sid("<|im_end|>"), sid("<|eot_id|>"), sid("</s>")]);
        assert_eq!(tok.eos_token(), Some("<|im_end|>"));
        assert!(tok.is_eos(sid("<|eot_id|>")) && !tok.is_eos(sid("<s>")));
        // No pad token: padding falls back to the first EOS.
        assert_eq!(tok.pad_id(), Some(sid("<|im_end|>")));
        assert_eq!(tok.unk_id(), Some(sid("<|endoftext|>")));
    }

    #[test]
    fn llama3_style_eos_from_generation_config_int() {
        // Llama-3-Instruct: eos_token <|end_of_text|>, turns end with <|eot_id|>.
        let dir = TempDir::new("eos-int");
        let tc = json!({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<|endoftext|>"});
        let gc = json!({"eos_token_id": sid("<|eot_id|>"), "pad_token_id": null});
        let tok = load(&dir, byte_level_post(), Some(tc), Some(gc)).unwrap();
        assert_eq!(tok.eos_ids(), &[sid("</s>"), sid("<|eot_id|>")]);
        assert_eq!(tok.pad_id(), Some(sid("<|endoftext|>")));

        // Without tokenizer_config, generation_config alone names the ids.
        let dir = TempDir::new("gc-only");
        let gc = json!({"bos_token_id": sid("<s>"), "eos_token_id": sid("</s>")});
        let tok = load(&dir, byte_level_post(), None, Some(gc)).unwrap();
        assert_eq!(tok.bos_id(), Some(sid("<s>")));
        assert_eq!(tok.eos_ids(), &[sid("</s>")]);
        assert_eq!(tok.pad_id(), Some(sid("</s>")));
        assert!(tok.chat_template().is_none());
    }

    #[test]
    fn unknown_special_token_is_an_error_naming_it() {
        let dir = TempDir::new("bad-eos");
        let tc = json!({"eos_token": "<|no_such_token|>"});
        let err = load(&dir, byte_level_post(), Some(tc), None).unwrap_err();
        assert!(matches!(err, Error::Format { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("tokenizer_config.json"), "{msg}");
        assert!(msg.contains("eos_token") && msg.contains("<|no_such_token|>"), "{msg}");

        let dir = TempDir::new("bad-gc");
        let gc = json!({"eos_token_id": [1, 1_000_000]});
        let msg = load(&dir, byte_level_post(), None, Some(gc)).unwrap_err().to_string();
        assert!(msg.contains("generation_config.json") && msg.contains("1000000"), "{msg}");

        let dir = TempDir::new("bad-type");
        let tc = json!({"eos_token": 7});
        let msg = load(&dir, byte_level_post(), Some(tc), None).unwrap_err().to_string();
        assert!(msg.contains("eos_token") && msg.contains("a number"), "{msg}");
    }

    #[test]
    fn missing_or_malformed_files_name_the_file() {
        let dir = TempDir::new("missing");
        let err = Tokenizer::from_dir(&dir.0).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err:?}");
        assert!(err.to_string().contains("tokenizer.json"), "{err}");

        std::fs::write(dir.0.join("tokenizer.json"), "{ not json").unwrap();
        let err = Tokenizer::from_dir(&dir.0).unwrap_err();
        assert!(matches!(err, Error::Format { .. }), "{err:?}");
        assert!(err.to_string().contains("tokenizer.json"), "{err}");

        dir.write("tokenizer.json", &tokenizer_json(byte_level_post()));
        std::fs::write(dir.0.join("generation_config.json"), "[1, 2").unwrap();
        let err = Tokenizer::from_dir(&dir.0).unwrap_err();
        assert!(err.to_string().contains("generation_config.json"), "{err}");
        let tj = dir.0.join("tokenizer.json");
        let missing = dir.0.join("nope.json");
        let err = Tokenizer::from_files(&tj, Some(&missing), None).unwrap_err();
        assert!(matches!(err, Error::Io { .. }) && err.to_string().contains("nope.json"));
    }

    #[test]
    fn bos_and_eos_follow_config_flags_or_post_processor() {
        let text = "hello";
        let tc = json!({"bos_token": "<s>", "eos_token": "</s>"});
        // No flags: the post-processor decides (this one prepends <s>).
        let dir = TempDir::new("post-bos");
        let tok = load(&dir, bos_template_post(), Some(tc.clone()), None).unwrap();
        let plain = tok.encode(text, false).unwrap();
        assert_eq!(tok.encode(text, true).unwrap(), [&[sid("<s>")][..], &plain].concat());
        assert!(tok.add_bos_token() && !tok.add_eos_token());

        // add_bos_token = false overrides the post-processor; add_eos_token adds EOS.
        let dir = TempDir::new("flags");
        let mut flags = tc.clone();
        flags["add_bos_token"] = json!(false);
        flags["add_eos_token"] = json!(true);
        let tok = load(&dir, bos_template_post(), Some(flags), None).unwrap();
        assert_eq!(tok.encode(text, true).unwrap(), [&plain[..], &[sid("</s>")]].concat());
        assert!(!tok.add_bos_token() && tok.add_eos_token());
        let batch = tok.encode_batch(&[text], true).unwrap();
        assert_eq!(batch[0], tok.encode(text, true).unwrap());

        // add_bos_token = true with a post-processor that adds nothing.
        let dir = TempDir::new("flag-bos");
        let mut flags = tc;
        flags["add_bos_token"] = json!(true);
        let tok = load(&dir, byte_level_post(), Some(flags), None).unwrap();
        assert_eq!(tok.encode(text, true).unwrap(), [&[sid("<s>")][..], &plain].concat());
        assert_eq!(tok.encode(text, false).unwrap(), plain);

        // add_bos_token without a bos_token cannot be honoured.
        let dir = TempDir::new("flag-no-bos");
        let msg = load(&dir, byte_level_post(), Some(json!({"add_bos_token": true})), None).unwrap_err().to_string();
        assert!(msg.contains("add_bos_token"), "{msg}");
    }

    const SMOLLM2_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    /// The chat template of Llama-3.1-8B-Instruct's tokenizer_config.json.
    const LLAMA31_TEMPLATE: &str = r#"{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"#;

    fn with_template(dir: &TempDir, template: serde_json::Value) -> Tokenizer {
        let tc = json!({"bos_token": "<s>", "eos_token": "<|im_end|>", "chat_template": template});
        load(dir, byte_level_post(), Some(tc), None).unwrap()
    }

    fn msgs(pairs: &[(&str, &str)]) -> Vec<ChatMessage> {
        pairs.iter().map(|(r, c)| ChatMessage::new(*r, *c)).collect()
    }

    #[test]
    fn smollm2_chat_template() {
        let dir = TempDir::new("smollm2");
        let tok = with_template(&dir, json!(SMOLLM2_TEMPLATE));
        let user = msgs(&[("user", "What is 2+2?")]);
        let default_system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, \
                              trained by Hugging Face<|im_end|>\n";
        assert_eq!(
            tok.apply_chat_template(&user, false).unwrap(),
            format!("{default_system}<|im_start|>user\nWhat is 2+2?<|im_end|>\n")
        );
        assert_eq!(
            tok.apply_chat_template(&user, true).unwrap(),
            format!("{default_system}<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
        );
        let convo = msgs(&[("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "2+2?")]);
        assert_eq!(
            tok.apply_chat_template(&convo, true).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n\
             <|im_start|>assistant\n"
        );
        // The rendered prompt encodes with its markers as single special ids.
        let ids = tok.encode(&tok.apply_chat_template(&convo, true).unwrap(), false).unwrap();
        assert_eq!(ids.iter().filter(|&&i| i == sid("<|im_start|>")).count(), 5);
    }

    #[test]
    fn llama31_chat_template() {
        let dir = TempDir::new("llama31");
        let tc = json!({"bos_token": "<s>", "eos_token": "</s>", "chat_template": LLAMA31_TEMPLATE});
        let tok = load(&dir, byte_level_post(), Some(tc), None).unwrap();
        let header = "<s><|start_header_id|>system<|end_header_id|>\n\n\
                      Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n";
        let convo = msgs(&[("system", "  You are terse.\n"), ("user", "Hi there ")]);
        assert_eq!(
            tok.apply_chat_template(&convo, true).unwrap(),
            format!(
                "{header}You are terse.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n\
                 Hi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
            )
        );
        let convo = msgs(&[("user", "Hi"), ("assistant", "Hello.")]);
        assert_eq!(
            tok.apply_chat_template(&convo, false).unwrap(),
            format!(
                "{header}<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
                 <|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
            )
        );
    }

    #[test]
    fn template_helpers() {
        let dir = TempDir::new("helpers");
        // raise_exception surfaces the template's own message.
        let tok = with_template(
            &dir,
            json!(
                "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with a user turn') }}{% endif %}ok"
            ),
        );
        let err = tok.apply_chat_template(&msgs(&[("assistant", "x")]), false).unwrap_err();
        assert!(matches!(err, Error::Tokenizer(_)));
        assert!(err.to_string().contains("Conversation must start with a user turn"), "{err}");
        assert_eq!(tok.apply_chat_template(&msgs(&[("user", "x")]), false).unwrap(), "ok");

        // Python string methods, and the trim_blocks/lstrip_blocks of transformers.
        let dir = TempDir::new("pycompat");
        let tok = with_template(
            &dir,
            json!(
                "{% for m in messages %}\n    {% if m.content.strip().startswith('Q') %}\n[{{ m.content.strip().upper() }}]\n    {% endif %}\n{% endfor %}\n"
            ),
        );
        let out = tok.apply_chat_template(&msgs(&[("user", "  q?  "), ("user", " Qx ")]), false);
        assert_eq!(out.unwrap(), "[QX]\n");

        // strftime_now renders today's date in the shape Llama 3.2 templates ask for.
        let dir = TempDir::new("strftime");
        let tok = with_template(&dir, json!("{{ strftime_now('%d %b %Y') }}"));
        let date = tok.apply_chat_template(&[], false).unwrap();
        let parts: Vec<&str> = date.split(' ').collect();
        assert_eq!(parts.len(), 3, "{date}");
        assert!(parts[0].len() == 2 && parts[1].len() == 3 && parts[2].len() == 4, "{date}");

        // tojson writes what Python's json.dumps writes (no HTML escaping).
        let dir = TempDir::new("tojson");
        let tok = with_template(
            &dir,
            json!(
                "{{ messages[0] | tojson(sort_keys=true) }}|{{ [1, 'a<b', none, true] | tojson }}|{{ {'k': [1, 2]} | tojson(indent=2) }}"
            ),
        );
        let out = tok.apply_chat_template(&msgs(&[("user", "é \"x\"\n")]), false).unwrap();
        assert_eq!(
            out,
            "{\"content\": \"é \\\"x\\\"\\n\", \"role\": \"user\"}|[1, \"a<b\", null, true]|\
             {\n  \"k\": [\n    1,\n    2\n  ]\n}"
        );

        // bos_token and eos_token are the configured strings.
        let dir = TempDir::new("vars");
        let tok = with_template(&dir, json!("{{ bos_token }}|{{ eos_token }}"));
        assert_eq!(tok.apply_chat_template(&[], false).unwrap(), "<s>|<|im_end|>");
    }

    #[test]
    fn strftime_formats() {
        // 2024-07-26 14:05:09 UTC, a Friday.
        let t = 1_722_002_709;
        assert_eq!(strftime("%d %b %Y", t).unwrap(), "26 Jul 2024");
        assert_eq!(strftime("%B %m %H:%M:%S %a %A %y %%", t).unwrap(), "July 07 14:05:09 Fri Friday 24 %");
        assert_eq!(strftime("%d %b %Y", 0).unwrap(), "01 Jan 1970");
        assert_eq!(strftime("%Y-%m-%d", 951_782_400).unwrap(), "2000-02-29");
        assert!(strftime("%Q", t).is_err());
    }

    #[test]
    fn chat_template_sources() {
        // No template: a clear error, until one is supplied.
        let dir = TempDir::new("no-template");
        let mut tok = chatml_tokenizer(&dir);
        let err = tok.apply_chat_template(&msgs(&[("user", "hi")]), true).unwrap_err();
        assert!(err.to_string().contains("no chat template; pass --chat-template"), "{err}");
        tok.with_chat_template(CHATML_TEMPLATE.to_string());
        assert_eq!(
            tok.apply_chat_template(&msgs(&[("system", "S"), ("user", "hi")]), true).unwrap(),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );

        // A list of named templates: "default" is used.
        let dir = TempDir::new("named");
        let tok = with_template(
            &dir,
            json!([{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "plain"}]),
        );
        assert_eq!(tok.apply_chat_template(&[], false).unwrap(), "plain");
        let dir = TempDir::new("named-no-default");
        dir.write("tokenizer.json", &tokenizer_json(byte_level_post()));
        dir.write("tokenizer_config.json", &json!({"chat_template": [{"name": "tool_use", "template": "t"}]}));
        let msg = Tokenizer::from_dir(&dir.0).unwrap_err().to_string();
        assert!(msg.contains("default") && msg.contains("tool_use"), "{msg}");

        // chat_template.jinja beside the configs, as recent transformers saves it.
        let dir = TempDir::new("jinja-file");
        dir.write("tokenizer.json", &tokenizer_json(byte_level_post()));
        std::fs::write(dir.0.join("chat_template.jinja"), "from file\n").unwrap();
        let tok = Tokenizer::from_dir(&dir.0).unwrap();
        assert_eq!(tok.apply_chat_template(&[], false).unwrap(), "from file");

        // A syntax error names the problem.
        let dir = TempDir::new("syntax");
        let tok = with_template(&dir, json!("{% for m in messages %}"));
        let msg = tok.apply_chat_template(&[], false).unwrap_err().to_string();
        assert!(msg.starts_with("tokenizer: chat template: syntax error"), "{msg}");
    }

    #[test]
    fn shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Tokenizer>();
        assert_send_sync::<DecodeStream>();
    }

    #[test]
    fn chat_message_serde() {
        let m: ChatMessage = serde_json::from_str(r#"{"role": "user", "content": "hi"}"#).unwrap();
        assert_eq!(m, ChatMessage::new("user", "hi"));
        assert_eq!(serde_json::to_value(&m).unwrap(), json!({"role": "user", "content": "hi"}));
    }
}
