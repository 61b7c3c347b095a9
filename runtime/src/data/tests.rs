use std::collections::{BTreeMap, BTreeSet};

use gristmill_core::ops::cross_entropy::IGNORE_INDEX;

use super::testutil::{TempDir, chatml_other_eos_tokenizer, chatml_tokenizer, plain_tokenizer, sid};
use super::*;
use crate::error::Error;
use crate::tokenizer::{ChatMessage, Tokenizer};

fn fields(ex: &Example) -> (&BTreeMap<String, String>, &str) {
    match &ex.kind {
        ExampleKind::PromptResponse { prompt_fields, response } => (prompt_fields, response),
        ExampleKind::Chat(_) => panic!("not a prompt/response example"),
    }
}

// ---------------------------------------------------------------------------------------------
// Formats

#[test]
fn alpaca_jsonl_and_json_array() {
    let dir = TempDir::new("alpaca");
    let jsonl = dir.file(
        "a.jsonl",
        "{\"instruction\": \"Add.\", \"input\": \"2 and 3\", \"output\": \"5\"}\n\
         \n\
         {\"instruction\": \"Say hi.\", \"output\": \"hi\"}\n\
         {\"instruction\": \"Say bye.\", \"input\": null, \"output\": \"bye\"}\n",
    );
    let (ex, report) = load_examples(&jsonl, Format::Auto).unwrap();
    assert_eq!(report.format, Format::Alpaca);
    assert_eq!((report.records, report.examples, report.n_skipped()), (3, 3, 0));
    let (f, r) = fields(&ex[0]);
    assert_eq!((f["instruction"].as_str(), f["input"].as_str(), r), ("Add.", "2 and 3", "5"));
    let (f, r) = fields(&ex[1]);
    assert_eq!((f["instruction"].as_str(), f["input"].as_str(), r), ("Say hi.", "", "hi"));
    assert_eq!(fields(&ex[2]).0["input"], "");

    // The same records as a pretty-printed JSON array (with a byte-order mark) load the same.
    let arr = dir.file(
        "a.json",
        "\u{feff}  [\n  {\"instruction\": \"Add.\", \"input\": \"2 and 3\", \"output\": \"5\"},\n  \
         {\"instruction\": \"Say hi.\",\n   \"output\": \"hi\"},\n  {\"instruction\": \"Say bye.\", \"output\": \"bye\"}\n]\n",
    );
    let (ex2, report) = load_examples(&arr, Format::Alpaca).unwrap();
    assert_eq!(ex2, ex);
    assert_eq!(report.records, 3);
    let empty = dir.file("empty.json", "[]");
    assert!(load_examples(&empty, Format::Auto).unwrap_err().to_string().contains("no records"));
}

#[test]
fn dolly_gsm8k_chat_formats() {
    let dir = TempDir::new("formats");
    let dolly = dir.file(
        "d.jsonl",
        "{\"instruction\": \"Summarise.\", \"context\": \"Long text.\", \"response\": \"Short.\", \"category\": \"summarization\"}\n\
         {\"instruction\": \"Name a colour.\", \"context\": \"\", \"response\": \"Red.\", \"category\": \"open_qa\"}\n",
    );
    let (ex, report) = load_examples(&dolly, Format::Auto).unwrap();
    assert_eq!(report.format, Format::Dolly);
    let (f, r) = fields(&ex[0]);
    assert_eq!((f["instruction"].as_str(), f["context"].as_str(), r), ("Summarise.", "Long text.", "Short."));
    assert_eq!(ex[0].meta["category"], "summarization");
    assert_eq!(fields(&ex[1]).0["context"], "");

    let gsm = dir.file("g.jsonl", "{\"question\": \"What is 2+3?\", \"answer\": \"2+3=5\\n#### 5\"}\n");
    let (ex, report) = load_examples(&gsm, Format::Auto).unwrap();
    assert_eq!(report.format, Format::Gsm8k);
    assert_eq!(ex[0].field("question"), Some("What is 2+3?"));
    assert_eq!(ex[0].response(), Some("2+3=5\n#### 5"));

    let chat = dir.file(
        "c.json",
        r#"[{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello!"}]},
            {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"},
                          {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]}]"#,
    );
    let (ex, report) = load_examples(&chat, Format::Auto).unwrap();
    assert_eq!(report.format, Format::Chat);
    assert_eq!(
        ex[0].kind,
        ExampleKind::Chat(vec![
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Hi"),
            ChatMessage::new("assistant", "Hello!")
        ])
    );
    assert_eq!(ex[1].response(), Some("A2"));

    // ShareGPT's layout is read as chat: conversations of {from, value}.
    let sharegpt = dir.file(
        "s.jsonl",
        r#"{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}
{"conversations": [{"from": "human", "value": "Q"}, {"from": "bot", "value": "A"}]}"#,
    );
    let (ex, report) = load_examples(&sharegpt, Format::Auto).unwrap();
    assert_eq!(report.format, Format::Chat);
    assert_eq!(
        ex[0].kind,
        ExampleKind::Chat(vec![
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Hi"),
            ChatMessage::new("assistant", "Hello!")
        ])
    );
    assert_eq!(ex.len(), 1, "the record with an unknown role is skipped");
    let why: Vec<&String> = report.skipped.keys().collect();
    assert!(why[0].contains("unknown role `bot`"), "{why:?}");

    // Named formats, and names that are not formats.
    assert_eq!("GSM8K".parse::<Format>().unwrap(), Format::Gsm8k);
    assert_eq!("messages".parse::<Format>().unwrap(), Format::Chat);
    assert_eq!("ShareGPT".parse::<Format>().unwrap(), Format::Chat);
    let err = "parquet".parse::<Format>().unwrap_err().to_string();
    assert!(err.contains("unknown data format `parquet`") && err.contains("paraphrase"), "{err}");
    // A named format that does not fit the records skips them all: an error.
    let err = load_examples(&gsm, Format::Alpaca).unwrap_err().to_string();
    assert!(err.contains("g.jsonl") && err.contains("missing field `instruction`") && err.contains("line 1"), "{err}");
}

#[test]
fn paraphrase_buckets() {
    let dir = TempDir::new("paraphrase");
    let p = dir.file(
        "p.jsonl",
        r#"{"instruction": "What is the capital of France?", "output": "Paris.", "paraphrases": [{"paraphrase": "France's capital?", "answer": "It is Paris.", "bucket": 1, "similarity": 0.9}, {"paraphrase": "Which city is France's capital?", "answer": "Paris", "bucket": 3}, {"paraphrase": "Capital of France, please.", "answer": "Paris!", "bucket": "5"}]}
{"output": "4", "paraphrases": [{"paraphrase": "two plus two", "answer": "four", "bucket": 2}, {"paraphrase": "2+2", "bucket": 2}, {"answer": "x", "bucket": 1}]}
"#,
    );
    let (ex, report) = load_examples(&p, Format::Auto).unwrap();
    assert_eq!(report.format, Format::Paraphrase);
    assert_eq!((report.records, report.examples), (2, 5));
    assert_eq!(report.skipped["paraphrase with missing field `paraphrase`"], SkipCount { count: 1, first_line: 2 });
    assert_eq!(ex[0].field("instruction"), Some("France's capital?"));
    assert_eq!(ex[0].response(), Some("Paris."));
    assert_eq!(ex[0].meta["bucket"], "1");
    assert_eq!(ex[0].meta["similarity"], "0.9");
    assert_eq!(ex[0].meta["original_instruction"], "What is the capital of France?");
    assert_eq!(ex[2].meta["bucket"], "5");

    let opts = LoadOptions { buckets: Some(parse_buckets("1-2").unwrap()), use_paraphrase_answers: true };
    let (ex, report) = load_examples_with(&p, Format::Paraphrase, &opts).unwrap();
    let got: Vec<(&str, &str, &str)> = ex
        .iter()
        .map(|e| (e.field("instruction").unwrap(), e.response().unwrap(), e.meta["bucket"].as_str()))
        .collect();
    assert_eq!(got, [("France's capital?", "It is Paris.", "1"), ("two plus two", "four", "2")]);
    assert_eq!(report.filtered_by_bucket, 2);
    // "2+2" has no answer of its own.
    assert_eq!(report.skipped["paraphrase with missing field `answer`"].count, 1);

    assert_eq!(parse_buckets("1-3").unwrap(), [1, 2, 3]);
    assert_eq!(parse_buckets("5, 1,3,3").unwrap(), [1, 3, 5]);
    assert_eq!(parse_buckets("1-2,4").unwrap(), [1, 2, 4]);
    for bad in ["", "1,,2", "3-1", "a", "1-x", "-1"] {
        assert!(matches!(parse_buckets(bad), Err(Error::Invalid(_))), "{bad:?}");
    }
}

#[test]
fn skipped_records_counted_with_lines() {
    let dir = TempDir::new("skips");
    let p = dir.file(
        "a.jsonl",
        "{\"instruction\": \"ok\", \"output\": \"fine\"}\n\
         {\"instruction\": \"no output\"}\n\
         {\"instruction\": \"ok 2\", \"output\": \"fine\"}\n\
         {\"instruction\": \"empty\", \"output\": \"  \"}\n\
         {\"instruction\": \"typed\", \"input\": 3, \"output\": \"x\"}\n\
         [1, 2]\n\
         {\"instruction\": \"no output again\", \"output\": null}\n",
    );
    let (ex, report) = load_examples(&p, Format::Auto).unwrap();
    assert_eq!(ex.len(), 2);
    assert_eq!(report.records, 7);
    assert_eq!(report.n_skipped(), 5);
    assert_eq!(report.skipped["missing field `output`"], SkipCount { count: 2, first_line: 2 });
    assert_eq!(report.skipped["empty `output`"], SkipCount { count: 1, first_line: 4 });
    assert_eq!(report.skipped["`input` is not a string (found a number)"], SkipCount { count: 1, first_line: 5 });
    assert_eq!(report.skipped["not a JSON object (found a list)"], SkipCount { count: 1, first_line: 6 });
    let shown = report.to_string();
    assert!(shown.contains("skipped 2 × missing field `output` (first at line 2)"), "{shown}");

    // Chat records with problems.
    let c = dir.file(
        "c.jsonl",
        r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
{"messages": [{"role": "user", "content": "hi"}]}
{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
{"messages": "hi"}
{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}
{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}
"#,
    );
    let (ex, report) = load_examples(&c, Format::Chat).unwrap();
    assert_eq!(ex.len(), 1);
    let lines: BTreeMap<&str, usize> = report.skipped.iter().map(|(k, v)| (k.as_str(), v.first_line)).collect();
    assert_eq!(
        lines,
        BTreeMap::from([
            ("no assistant turn", 2),
            ("unknown role `robot` (expected system, user or assistant)", 3),
            ("`messages` is not a list (found a string)", 4),
            ("empty assistant turns", 5),
            ("a message has missing field `content`", 6),
        ])
    );
}

#[test]
fn fatal_errors_name_file_and_line() {
    let dir = TempDir::new("fatal");
    let bad = dir.file("bad.jsonl", "{\"question\": \"q\", \"answer\": \"a\"}\n\n{\"question\": \"q\", \"answer\n");
    let err = load_examples(&bad, Format::Auto).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Format { .. }));
    assert!(msg.contains("bad.jsonl") && msg.contains("line 3: not valid JSON"), "{msg}");
    assert!(!msg.contains("column"), "{msg}");

    let arr = dir
        .file("bad.json", "[\n {\"question\": \"q\", \"answer\": \"a\"},\n {\"question\": \"q\",\n  \"answer\": }\n]");
    let msg = load_examples(&arr, Format::Auto).unwrap_err().to_string();
    assert!(msg.contains("bad.json") && msg.contains("line 4: not valid JSON"), "{msg}");
    let open = dir.file("open.json", "[{\"question\": \"q\", \"answer\": \"a\"}\n");
    assert!(
        load_examples(&open, Format::Auto).unwrap_err().to_string().contains("line 2: the JSON array is not closed")
    );
    let trailing = dir.file("trailing.json", "[{\"question\": \"q\", \"answer\": \"a\"}]\nx");
    assert!(load_examples(&trailing, Format::Auto).unwrap_err().to_string().contains("line 2: unexpected text"));

    let unknown = dir.file("unknown.jsonl", "\n{\"prompt\": \"p\", \"completion\": \"c\"}\n");
    let msg = load_examples(&unknown, Format::Auto).unwrap_err().to_string();
    assert!(msg.contains("unknown.jsonl") && msg.contains("line 2: cannot tell the data format"), "{msg}");
    assert!(msg.contains("\"completion\""), "{msg}");

    let none = dir.file("none.jsonl", "{\"question\": \"q\", \"answer\": \"\"}\n{\"question\": \"q\"}\n");
    let msg = load_examples(&none, Format::Auto).unwrap_err().to_string();
    assert!(msg.contains("no usable record among 2"), "{msg}");
    assert!(
        msg.contains("empty `answer` (first at line 1)") && msg.contains("missing field `answer` (first at line 2)"),
        "{msg}"
    );

    let missing = dir.path().join("missing.jsonl");
    assert!(matches!(load_examples(&missing, Format::Auto), Err(Error::Io { .. })));
}

// ---------------------------------------------------------------------------------------------
// Templates

fn alpaca(instruction: &str, input: &str, output: &str) -> Example {
    Example::prompt_response([("instruction", instruction), ("input", input)], output)
}

fn gsm(question: &str, answer: &str) -> Example {
    Example::prompt_response([("question", question)], answer)
}

fn text(t: &Template, ex: &Example) -> (String, String) {
    match t.render(ex).unwrap() {
        template::Rendered::Text { prompt, response } => (prompt, response),
        template::Rendered::Chat(_) => panic!("chat"),
    }
}

#[test]
fn templates_render_exactly() {
    let with_input = alpaca("Add the numbers.", "2 and 3", "5");
    let no_input = alpaca("Say hi.", "", "hi");
    assert_eq!(
        text(&Template::Alpaca, &with_input),
        (
            "Below is an instruction that describes a task, paired with an input that provides further context. \
             Write a response that appropriately completes the request.\n\n### Instruction:\nAdd the numbers.\n\n\
             ### Input:\n2 and 3\n\n### Response:\n"
                .to_string(),
            "5".to_string()
        )
    );
    let no_input_prompt = "Below is an instruction that describes a task. Write a response that appropriately \
                           completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n";
    assert_eq!(text(&Template::Alpaca, &no_input).0, no_input_prompt);
    // Dolly: the context under "### Context:", Alpaca's no-input text without one.
    let dolly = Example::prompt_response([("instruction", "Summarise."), ("context", "Long {text}.")], "Short.");
    assert_eq!(
        text(&Template::Dolly, &dolly).0,
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\
         \n\n### Instruction:\nSummarise.\n\n### Context:\nLong {text}.\n\n### Response:\n"
    );
    assert_eq!(text(&Template::Dolly, &no_input).0, no_input_prompt);
    // GSM8K through Alpaca: the question is the instruction.
    assert!(
        text(&Template::Alpaca, &gsm("What is 2+3?", "5"))
            .0
            .contains("### Instruction:\nWhat is 2+3?\n\n### Response:\n")
    );

    // Plain.
    assert_eq!(
        text(&Template::Plain, &gsm("What is 2+3?", "#### 5")),
        ("Question: What is 2+3?\nAnswer: ".into(), "#### 5".into())
    );
    assert_eq!(text(&Template::Plain, &with_input).0, "Add the numbers.\n\n2 and 3\n");
    assert_eq!(text(&Template::Plain, &no_input).0, "Say hi.\n");

    // Custom: split at the response placeholder, escapes, literal braces, aliases.
    let t = Template::parse("### Q: {question}\\n### A: {answer}").unwrap();
    assert_eq!(t, Template::Custom { prompt: "### Q: {question}\n### A: ".into(), response: "{answer}".into() });
    assert_eq!(
        t,
        Template::parse("### Q: {question}\n### A: ")
            .map(|t| match t {
                Template::Custom { prompt, .. } => Template::Custom { prompt, response: "{answer}".into() },
                other => other,
            })
            .unwrap()
    );
    assert_eq!(text(&t, &gsm("2+3?", "5")), ("### Q: 2+3?\n### A: ".into(), "5".into()));
    let t = Template::parse("{{{instruction}}} [{input}] => {response} <end>").unwrap();
    assert_eq!(text(&t, &with_input), ("{Add the numbers.} [2 and 3] => ".into(), "5 <end>".into()));
    let t = Template::parse("Q: {question}\nA: ").unwrap();
    let err = t.render(&alpaca("x", "", "y")).unwrap_err().to_string();
    assert!(err.contains("{question}") && err.contains("instruction"), "{err}");
    for bad in ["Q: {question", "Q: }x{question}", "{a b}", "{}"] {
        assert!(matches!(Template::parse(bad), Err(Error::Invalid(_))), "{bad}");
    }
    let err = Template::parse("llama").unwrap_err().to_string();
    assert!(err.contains("unknown prompt template `llama`"), "{err}");
    assert_eq!(Template::parse(" Alpaca ").unwrap(), Template::Alpaca);
    assert_eq!(Template::parse("plain").unwrap(), Template::Plain);
    assert_eq!(Template::parse("dolly").unwrap(), Template::Dolly);
    assert_eq!(Template::parse("chat").unwrap(), Template::Chat);
}

#[test]
fn chat_template_rendering_and_auto() {
    let chatml = chatml_tokenizer();
    let plain = plain_tokenizer();
    // Prompt/response examples become a user and an assistant message.
    let ex = alpaca("Add the numbers.", "2 and 3", "5");
    assert_eq!(
        Template::Chat.render(&ex).unwrap(),
        template::Rendered::Chat(vec![
            ChatMessage::new("user", "Add the numbers.\n\n2 and 3"),
            ChatMessage::new("assistant", "5")
        ])
    );
    assert_eq!(
        Template::Chat.prompt(&chatml, &gsm("2+3?", "5")).unwrap(),
        "<|im_start|>user\n2+3?<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(Template::Plain.prompt(&plain, &gsm("2+3?", "5")).unwrap(), "Question: 2+3?\nAnswer: ");
    // Chat examples need the chat template.
    let convo = Example { kind: ExampleKind::Chat(vec![ChatMessage::new("user", "hi")]), meta: BTreeMap::new() };
    assert!(matches!(Template::Alpaca.render(&convo), Err(Error::Unsupported(_))));

    assert_eq!(Template::auto(&chatml, Format::Gsm8k), Template::Chat);
    assert_eq!(Template::auto(&chatml, Format::Alpaca), Template::Chat);
    assert_eq!(Template::auto(&plain, Format::Alpaca), Template::Alpaca);
    assert_eq!(Template::auto(&plain, Format::Paraphrase), Template::Alpaca);
    assert_eq!(Template::auto(&plain, Format::Dolly), Template::Dolly);
    assert_eq!(Template::auto(&plain, Format::Gsm8k), Template::Plain);
    assert_eq!(Template::auto(&plain, Format::Chat), Template::Chat);
    assert_eq!(Template::resolve(Some("auto"), &plain, Format::Gsm8k).unwrap(), Template::Plain);
    assert_eq!(Template::resolve(None, &chatml, Format::Gsm8k).unwrap(), Template::Chat);
    assert_eq!(Template::resolve(Some("dolly"), &chatml, Format::Gsm8k).unwrap(), Template::Dolly);
    // Without a chat template, tokenizing a conversation says what to do.
    let err = tokenize(&plain, &Template::Chat, &gsm("q", "a"), &TokenizeOptions::default()).unwrap_err();
    assert!(err.to_string().contains("no chat template"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Tokenization

/// The text of the tokens with the given mask value, each run separated by `|`.
fn masked_text(tok: &Tokenizer, t: &Tokenized, want: bool) -> String {
    let mut runs = Vec::new();
    let mut run = Vec::new();
    for (&id, &m) in t.ids.iter().zip(&t.loss_mask) {
        if m == want {
            run.push(id);
        } else if !run.is_empty() {
            runs.push(tok.decode(&std::mem::take(&mut run), false).unwrap());
        }
    }
    if !run.is_empty() {
        runs.push(tok.decode(&run, false).unwrap());
    }
    runs.join("|")
}

#[test]
fn prompt_masked_response_and_eos_counted() {
    let tok = plain_tokenizer();
    let ex = alpaca("Say hello.", "", "hello world");
    let opts = TokenizeOptions::default();
    let t = tokenize(&tok, &Template::Alpaca, &ex, &opts).unwrap().unwrap();
    let (prompt, response) = text(&Template::Alpaca, &ex);
    let p = tok.encode(&prompt, false).unwrap();
    let r = tok.encode(&response, false).unwrap();
    assert_eq!(
        r,
        [tok.token_to_id("hello").unwrap(), tok.token_to_id("Ġw").unwrap(), tok.token_to_id("or").unwrap(), 108, 100]
    );
    let expected: Vec<u32> = [&[sid("<s>")][..], &p, &r, &[sid("</s>")]].concat();
    assert_eq!(t.ids, expected);
    let mask: Vec<bool> = (0..expected.len()).map(|i| i > p.len()).collect();
    assert_eq!(t.loss_mask, mask);
    assert_eq!(masked_text(&tok, &t, true), "hello world</s>");
    assert_eq!(t.n_loss(), r.len() + 1);

    // Without EOS; on every token (never the first: nothing predicts it).
    let t = tokenize(&tok, &Template::Alpaca, &ex, &TokenizeOptions { add_eos: false, ..opts }).unwrap().unwrap();
    assert_eq!(t.ids.len(), expected.len() - 1);
    assert_eq!(masked_text(&tok, &t, true), "hello world");
    let t = tokenize(&tok, &Template::Alpaca, &ex, &TokenizeOptions { loss_on: LossOn::All, ..opts }).unwrap().unwrap();
    assert!(!t.loss_mask[0] && t.loss_mask[1..].iter().all(|&m| m));

    // A custom response that already ends with EOS gets no second one.
    let t = Template::parse("Q: {instruction}\nA: {response}</s>").unwrap();
    let out = tokenize(&tok, &t, &ex, &opts).unwrap().unwrap();
    assert_eq!(out.ids.iter().filter(|&&i| i == sid("</s>")).count(), 1);
    assert_eq!(masked_text(&tok, &out, true), "hello world</s>");
}

#[test]
fn boundary_merge_falls_back_to_piecewise() {
    let tok = plain_tokenizer();
    // "Answer: " + "72": the whole text tokenizes " 7" as one token, which no prefix spells.
    let ex = gsm("What is 70+2?", "72");
    let whole = tok.encode("Question: What is 70+2?\nAnswer: 72", false).unwrap();
    assert!(whole.contains(&tok.token_to_id("Ġ7").unwrap()));
    let (out, report) =
        tokenize_all(&tok, &Template::Plain, std::slice::from_ref(&ex), &TokenizeOptions::default()).unwrap();
    assert_eq!(report.boundary_merges, 1);
    let p = tok.encode("Question: What is 70+2?\nAnswer: ", false).unwrap();
    let expected: Vec<u32> = [&[sid("<s>")][..], &p, &tok.encode("72", false).unwrap(), &[sid("</s>")]].concat();
    assert_eq!(out[0].ids, expected);
    assert_eq!(masked_text(&tok, &out[0], true), "72</s>");
    // What generation is given is exactly the unmasked start.
    assert_eq!(&out[0].ids[1..=p.len()], tok.encode(&Template::Plain.prompt(&tok, &ex).unwrap(), false).unwrap());

    // No merge across the boundary: the whole text's own tokens.
    let ex = gsm("What is 70+2?", "#### 72");
    let (out, report) = tokenize_all(&tok, &Template::Plain, &[ex], &TokenizeOptions::default()).unwrap();
    assert_eq!(report.boundary_merges, 0);
    let whole = tok.encode("Question: What is 70+2?\nAnswer: #### 72", false).unwrap();
    assert_eq!(out[0].ids, [&[sid("<s>")][..], &whole, &[sid("</s>")]].concat());
    assert_eq!(masked_text(&tok, &out[0], true), "#### 72</s>");
}

#[test]
fn chat_loss_only_on_assistant_turns() {
    let tok = chatml_tokenizer();
    let convo = Example {
        kind: ExampleKind::Chat(vec![
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Hi"),
            ChatMessage::new("assistant", "Hello!"),
            ChatMessage::new("user", "2+2?"),
            ChatMessage::new("assistant", "4 world"),
        ]),
        meta: BTreeMap::new(),
    };
    let t = tokenize(&tok, &Template::Chat, &convo, &TokenizeOptions::default()).unwrap().unwrap();
    let full = tok.apply_chat_template(
        match &convo.kind {
            ExampleKind::Chat(m) => m,
            _ => unreachable!(),
        },
        false,
    );
    // The whole conversation, tokenized as a whole; no extra EOS (the turn already ends with one).
    assert_eq!(t.ids, tok.encode(&full.unwrap(), false).unwrap());
    assert_eq!(masked_text(&tok, &t, true), "Hello!<|im_end|>|4 world<|im_end|>");
    assert_eq!(
        masked_text(&tok, &t, false),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n|\n\
         <|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n|\n"
    );

    // A GSM8K record through the chat template: the answer and its end of turn count.
    let t = tokenize(&tok, &Template::Chat, &gsm("2+3?", "#### 5"), &TokenizeOptions::default()).unwrap().unwrap();
    assert_eq!(masked_text(&tok, &t, true), "#### 5<|im_end|>");

    // When the end of turn is not an EOS, EOS follows the last assistant turn (only).
    let tok = chatml_other_eos_tokenizer();
    let t = tokenize(&tok, &Template::Chat, &convo, &TokenizeOptions::default()).unwrap().unwrap();
    assert_eq!(masked_text(&tok, &t, true), "Hello!<|im_end|>|4 world<|im_end|></s>");
    assert_eq!(tok.decode(&t.ids[t.ids.len() - 2..], false).unwrap(), "</s>\n");
}

#[test]
fn truncation_keeps_the_start_and_drops_what_cannot_train() {
    let tok = plain_tokenizer();
    let ex = alpaca("Say hello.", "", "hello world");
    let full = tokenize(&tok, &Template::Alpaca, &ex, &TokenizeOptions::default()).unwrap().unwrap();
    let n_prompt = full.loss_mask.iter().position(|&m| m).unwrap();
    // Cut inside the response: the prompt and the start of the response remain.
    let opts = TokenizeOptions { max_len: n_prompt + 2, ..Default::default() };
    let t = tokenize(&tok, &Template::Alpaca, &ex, &opts).unwrap().unwrap();
    assert_eq!(t.ids, full.ids[..n_prompt + 2]);
    assert_eq!(t.loss_mask, full.loss_mask[..n_prompt + 2]);
    assert_eq!(t.n_loss(), 2);
    // Cut inside the prompt: nothing left to learn.
    let opts = TokenizeOptions { max_len: n_prompt, ..Default::default() };
    assert_eq!(tokenize(&tok, &Template::Alpaca, &ex, &opts).unwrap(), None);
    let (kept, report) = tokenize_all(
        &tok,
        &Template::Alpaca,
        &[ex.clone(), alpaca("x", "", "y")],
        &TokenizeOptions { max_len: 40, ..Default::default() },
    )
    .unwrap();
    assert_eq!((report.examples, report.kept, report.dropped_no_loss), (2, 0, 2));
    assert!(kept.is_empty());
    let opts = TokenizeOptions { max_len: n_prompt + 2, ..Default::default() };
    let (_, report) = tokenize_all(&tok, &Template::Alpaca, std::slice::from_ref(&ex), &opts).unwrap();
    assert_eq!((report.kept, report.truncated, report.loss_tokens), (1, 1, 2));
    assert!(matches!(
        tokenize(&tok, &Template::Alpaca, &ex, &TokenizeOptions { max_len: 1, ..Default::default() }),
        Err(Error::Invalid(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// Splits

#[test]
fn splits_are_deterministic_and_disjoint() {
    let items: Vec<u32> = (0..1000).collect();
    let (a, b, c) = split(items.clone(), DEFAULT_SPLIT, 7);
    assert_eq!((a.len(), b.len(), c.len()), (800, 100, 100));
    let all: BTreeSet<u32> = a.iter().chain(&b).chain(&c).copied().collect();
    assert_eq!(all.len(), 1000);
    assert_eq!(split(items.clone(), DEFAULT_SPLIT, 7), (a.clone(), b.clone(), c.clone()));
    assert_ne!(split(items.clone(), DEFAULT_SPLIT, 8).0, a);
    // Shuffled, not cut in file order.
    assert_ne!(a, (0..800).collect::<Vec<_>>());

    let (a, b, c) = split(items.clone(), [8.0, 2.0, 0.0], 1);
    assert_eq!((a.len(), b.len(), c.len()), (800, 200, 0));
    let (a, b, c) = split(items.clone(), [0.0, f64::NAN, -1.0], 1);
    assert_eq!((a.len(), b.len(), c.len()), (1000, 0, 0));
    let (a, b, c) = split((0..7).collect::<Vec<u32>>(), DEFAULT_SPLIT, 3);
    assert_eq!(a.len() + b.len() + c.len(), 7);
    let (a, b, c) = split(Vec::<u32>::new(), DEFAULT_SPLIT, 3);
    assert!(a.is_empty() && b.is_empty() && c.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Batching

/// Examples whose first token is their index + 1000 (an identity), of assorted lengths, with the
/// first third of each masked out.
fn fake_examples(n: usize, seed: u64) -> Vec<Tokenized> {
    let mut rng = gristmill_core::rng::Rng::new(seed);
    (0..n)
        .map(|i| {
            let len = 3 + rng.below(30) as usize;
            let ids: Vec<u32> =
                std::iter::once(1000 + i as u32).chain((1..len).map(|_| rng.below(900) as u32 + 1)).collect();
            let loss_mask = (0..len).map(|j| j >= len / 3 && j > 0).collect();
            Tokenized { ids, loss_mask }
        })
        .collect()
}

/// Checks every invariant of a batch and returns the examples it holds (by identity).
fn check_batch(batch: &Batch, data: &[Tokenized], pad: u32, max_len: usize) -> Vec<usize> {
    let (b, t) = (batch.b, batch.t);
    for buf in [batch.tokens.len(), batch.targets.len(), batch.positions.len(), batch.segments.len()] {
        assert_eq!(buf, b * t);
    }
    assert!(t <= max_len);
    let mut seen = Vec::new();
    let (mut n_targets, mut n_tokens) = (0, 0);
    let mut longest = 0;
    for r in 0..b {
        let row = r * t..(r + 1) * t;
        let (tokens, targets) = (&batch.tokens[row.clone()], &batch.targets[row.clone()]);
        let (positions, segments) = (&batch.positions[row.clone()], &batch.segments[row]);
        let mut j = 0;
        let mut seg = 0;
        while j < t && tokens[j] >= 1000 {
            // An example starts here.
            let k = (tokens[j] - 1000) as usize;
            let ex = &data[k];
            seen.push(k);
            assert_eq!(&tokens[j..j + ex.len()], ex.ids.as_slice());
            for i in 0..ex.len() {
                assert_eq!(positions[j + i], i as u32, "positions restart per example");
                assert_eq!(segments[j + i], seg);
                let want =
                    if i + 1 < ex.len() && ex.loss_mask[i + 1] { i64::from(ex.ids[i + 1]) } else { IGNORE_INDEX };
                assert_eq!(targets[j + i], want, "target at {i} of example {k}");
                n_targets += usize::from(want != IGNORE_INDEX);
            }
            // The last token of an example never predicts the next example's first.
            assert_eq!(targets[j + ex.len() - 1], IGNORE_INDEX);
            j += ex.len();
            n_tokens += ex.len();
            seg += 1;
        }
        longest = longest.max(j);
        for p in j..t {
            assert_eq!(tokens[p], pad);
            assert_eq!(targets[p], IGNORE_INDEX, "padding is never a target");
            assert_eq!(segments[p], seg, "padding has its own segment");
        }
    }
    assert_eq!(longest, t, "padded only to the longest row");
    assert_eq!((batch.n_targets, batch.n_tokens), (n_targets, n_tokens));
    seen
}

/// Runs one epoch from the start of `epoch` and checks every example appears exactly once.
fn check_epoch(batcher: &mut Batcher, data: &[Tokenized], pad: u32, max_len: usize) -> Vec<Batch> {
    let epoch = batcher.epoch();
    let n = batcher.batches_per_epoch();
    let mut seen = Vec::new();
    let mut batches = Vec::new();
    for _ in 0..n {
        assert_eq!(batcher.epoch(), epoch);
        let batch = batcher.next_batch();
        seen.extend(check_batch(&batch, data, pad, max_len));
        batches.push(batch);
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..data.len()).collect::<Vec<_>>(), "every example once per epoch");
    batches
}

#[test]
fn padded_batches() {
    let data = fake_examples(103, 1);
    for group in [true, false] {
        let opts = BatchOptions { group_by_length: group, ..BatchOptions::new(8, 64, 5) };
        let mut batcher = Batcher::new(data.clone(), Some(7), opts).unwrap();
        assert_eq!(batcher.batches_per_epoch(), 13);
        let e0 = check_epoch(&mut batcher, &data, 7, 64);
        assert!(e0.iter().all(|b| b.b == 8 || b.b == 103 % 8));
        // The next epoch is a different shuffle of the same examples.
        assert_eq!(batcher.epoch(), 1);
        assert_eq!(batcher.state().cursor, 0);
        let e1 = check_epoch(&mut batcher, &data, 7, 64);
        assert_ne!(e0, e1);
    }
    // Grouping by length pads less.
    let padding = |group: bool| {
        let opts = BatchOptions { group_by_length: group, ..BatchOptions::new(8, 64, 5) };
        let mut batcher = Batcher::new(fake_examples(1000, 2), None, opts).unwrap();
        (0..batcher.batches_per_epoch()).map(|_| batcher.next_batch()).map(|b| b.b * b.t - b.n_tokens).sum::<usize>()
    };
    assert!(padding(true) * 3 < padding(false), "{} vs {}", padding(true), padding(false));

    // Long examples are cut to max_len; no pad id means 0.
    let mut batcher = Batcher::new(data.clone(), None, BatchOptions::new(4, 10, 5)).unwrap();
    let batch = batcher.next_batch();
    assert!(batch.t <= 10);
    assert!(batch.tokens.contains(&0) || batch.n_tokens == batch.b * batch.t);

    assert!(Batcher::new(Vec::new(), None, BatchOptions::new(4, 10, 5)).is_err());
    assert!(Batcher::new(data.clone(), None, BatchOptions::new(0, 10, 5)).is_err());
    let bad = vec![Tokenized { ids: vec![1, 2], loss_mask: vec![true] }];
    assert!(Batcher::new(bad, None, BatchOptions::new(1, 10, 5)).is_err());
}

#[test]
fn packed_batches() {
    let data = fake_examples(211, 3);
    let max_len = 64;
    let mut batcher = Batcher::new(data.clone(), Some(7), BatchOptions::packed(4, max_len, 9)).unwrap();
    for _ in 0..3 {
        let batches = check_epoch(&mut batcher, &data, 7, max_len);
        // Packing fills rows: few batches, several examples per row.
        let tokens: usize = data.iter().map(Tokenized::len).sum();
        let slots: usize = batches.iter().map(|b| b.b * max_len).sum();
        assert!(tokens as f64 > 0.8 * slots as f64, "{tokens} tokens in {slots} slots");
        assert!(batches.iter().any(|b| b.segments.iter().any(|&s| s >= 2)));
        // At each boundary inside a row, no target crosses into the next example.
        for b in &batches {
            for r in 0..b.b {
                for j in r * b.t..(r + 1) * b.t - 1 {
                    if b.segments[j] != b.segments[j + 1] {
                        assert_eq!(b.targets[j], IGNORE_INDEX);
                        assert_eq!(b.positions[j + 1], 0);
                    }
                }
            }
        }
        batcher.next_batch();
        let mut state = batcher.state();
        state.cursor = 0;
        batcher.restore(state).unwrap();
    }
}

#[test]
fn restore_replays_the_same_batches() {
    let data = fake_examples(37, 4);
    for opts in [BatchOptions::new(5, 24, 11), BatchOptions::packed(3, 40, 11)] {
        let mut a = Batcher::new(data.clone(), Some(7), opts).unwrap();
        // Past an epoch boundary, and again mid-epoch.
        for stop in [a.batches_per_epoch() + 2, 1] {
            for _ in 0..stop {
                a.next_batch();
            }
            let json = serde_json::to_string(&a.state()).unwrap();
            let state: BatcherState = serde_json::from_str(&json).unwrap();
            assert_eq!(state, a.state());
            // A fresh batcher with another seed in its options: the state's seed wins.
            let mut b = Batcher::new(data.clone(), Some(7), BatchOptions { seed: 99, ..opts }).unwrap();
            b.restore(state).unwrap();
            assert_eq!(b.state(), a.state());
            for _ in 0..(2 * a.batches_per_epoch() + 3) {
                assert_eq!(a.next_batch(), b.next_batch());
            }
        }
        // The same seed gives the same run; another seed another.
        let first = |seed: u64| Batcher::new(data.clone(), None, BatchOptions { seed, ..opts }).unwrap().next_batch();
        assert_eq!(first(1), first(1));
        assert_ne!(first(1), first(2));
        // A state that cannot belong to this data set is refused.
        let mut c = Batcher::new(data.clone(), None, opts).unwrap();
        let err = c.restore(BatcherState { epoch: 0, cursor: 10_000, seed: 1 }).unwrap_err();
        assert!(err.to_string().contains("batcher state"), "{err}");
    }
}

#[test]
fn tokenized_examples_batch_end_to_end() {
    let tok = chatml_tokenizer();
    let examples = synth::generate(40, 3);
    let opts = TokenizeOptions { max_len: 256, ..Default::default() };
    let (data, report) = tokenize_all(&tok, &Template::Chat, &examples, &opts).unwrap();
    assert_eq!(report.kept, 40);
    let pad = tok.pad_id();
    assert_eq!(pad, Some(sid("<|endoftext|>")));
    let mut batcher = Batcher::new(data, pad, BatchOptions::packed(2, 256, 1)).unwrap();
    let batch = batcher.next_batch();
    // Every target is a real token, and the targets decode to answers and their end of turn.
    let targets: Vec<u32> = batch.targets.iter().filter(|&&t| t != IGNORE_INDEX).map(|&t| t as u32).collect();
    let text = tok.decode(&targets, false).unwrap();
    assert!(text.contains("#### ") && text.contains("<|im_end|>"), "{text}");
    assert!(!text.contains("<|im_start|>") && !text.contains("<|endoftext|>"), "{text}");
}

// ---------------------------------------------------------------------------------------------
// The synthetic task and answer extraction

#[test]
fn synthetic_problems_are_exact() {
    let a = synth::generate(600, 42);
    assert_eq!(a, synth::generate(600, 42));
    assert_ne!(a, synth::generate(600, 43));
    let mut templates = BTreeSet::new();
    for ex in &a {
        let question = ex.field("question").unwrap();
        let answer = ex.response().unwrap();
        let gold = &ex.meta["gold"];
        templates.insert(ex.meta["template"].clone());
        assert_eq!(synth::extract_answer(answer).as_deref(), Some(gold.as_str()), "{answer}");
        assert!(answer.ends_with(&format!("\n#### {gold}")), "{answer}");
        assert!(question.ends_with('?'), "{question}");
        let g: u64 = gold.parse().unwrap();
        assert!((1..=150).contains(&g), "{question} {answer}");
        // Every equation in the worked answer holds.
        for line in answer.lines() {
            if let Some((lhs, rhs)) = line.split_once(" = ") {
                let expr: Vec<&str> = lhs.rsplit(' ').take(3).collect();
                let (y, op, x) = (expr[0].trim_start_matches('$'), expr[1], expr[2].trim_start_matches('$'));
                let (x, y): (u64, u64) = (x.parse().unwrap(), y.parse().unwrap());
                let z: u64 =
                    rhs.split(' ').next().unwrap().trim_start_matches('$').trim_end_matches('.').parse().unwrap();
                let want = match op {
                    "+" => x + y,
                    "-" => x - y,
                    "x" => x * y,
                    "/" => {
                        assert_eq!(x % y, 0);
                        x / y
                    }
                    _ => panic!("{line}"),
                };
                assert_eq!(z, want, "{line}");
            }
        }
    }
    assert_eq!(templates.len(), synth::TEMPLATES.len());
}

#[test]
fn answers_extract_and_match() {
    use synth::{exact_match, extract_answer};
    let cases = [
        ("He has 3 + 4 = 7 apples.\n#### 7", Some("7")),
        ("#### 1,234", Some("1234")),
        ("It costs $1,234,567.\n#### $1,234,567", Some("1234567")),
        ("#### 5.0", Some("5")),
        ("#### 2.50", Some("2.5")),
        ("#### -3", Some("-3")),
        ("#### -0", Some("0")),
        ("#### 007", Some("7")),
        ("The answer is 42.", Some("42")),
        ("5 apples and 6 pears, so 11", Some("11")),
        ("We need 3-4 more: 9", Some("9")),
        ("from 12 to 1,5", Some("5")),
        ("#### no number, but earlier 8", Some("8")),
        ("no numbers at all", None),
        ("", None),
        ("x = -12", Some("-12")),
        ("A-5", Some("5")),
    ];
    for (text, want) in cases {
        assert_eq!(extract_answer(text).as_deref(), want, "{text:?}");
    }
    assert!(exact_match("so the answer is 72.", "Natalia sold 48+24 = 72 clips.\n#### 72"));
    assert!(exact_match("#### 1,000", "1000"));
    assert!(exact_match("$5.00", "#### 5"));
    assert!(!exact_match("#### 71", "#### 72"));
    assert!(!exact_match("no idea", "#### 72"));
}

// ---------------------------------------------------------------------------------------------
// The real data set (GSM8K train), when GRISTMILL_DATA says where it is

fn gsm8k_path() -> Option<std::path::PathBuf> {
    match std::env::var_os("GRISTMILL_DATA") {
        Some(dir) => Some(std::path::PathBuf::from(dir).join("gsm8k").join("train.jsonl")),
        None => {
            println!("skipping: GRISTMILL_DATA is not set");
            None
        }
    }
}

#[test]
fn gsm8k_gold_answers_extract() {
    let Some(path) = gsm8k_path() else { return };
    let (examples, report) = load_examples(&path, Format::Auto).unwrap();
    assert_eq!((report.format, report.records, report.examples, report.n_skipped()), (Format::Gsm8k, 7473, 7473, 0));
    for ex in &examples {
        let answer = ex.response().unwrap();
        let (_, n) = answer.rsplit_once("####").unwrap();
        let want = n.trim().replace(',', "");
        assert_eq!(synth::extract_answer(answer), Some(want), "{answer}");
        assert!(synth::exact_match(answer, n));
    }
}

#[test]
fn gsm8k_loads_and_tokenizes() {
    let Some(path) = gsm8k_path() else { return };
    let (examples, report) = load_examples(&path, Format::Auto).unwrap();
    println!("{report}");
    let (train, val, test) = split(examples, DEFAULT_SPLIT, 0);
    assert_eq!((train.len(), val.len(), test.len()), (5979, 747, 747));
    let opts = TokenizeOptions { max_len: 1024, ..Default::default() };
    for (name, tok) in [("plain", plain_tokenizer()), ("chatml", chatml_tokenizer())] {
        let template = Template::auto(&tok, Format::Gsm8k);
        let start = std::time::Instant::now();
        let (data, report) = tokenize_all(&tok, &template, &train, &opts).unwrap();
        println!("{name} ({}): {report} in {:.2?}", template.name(), start.elapsed());
        assert!(report.kept > train.len() * 99 / 100);
        let mut batcher = Batcher::new(data, tok.pad_id(), BatchOptions::packed(8, 1024, 0)).unwrap();
        let b = batcher.next_batch();
        println!(
            "{name}: {} packed batches of 8 × 1024 per epoch; first batch {} tokens, {} targets",
            batcher.batches_per_epoch(),
            b.n_tokens,
            b.n_targets
        );
    }
}
