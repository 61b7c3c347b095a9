"""Writes tests/fixtures/tiny_llama/tokenizer.json and tokenizer_config.json: a byte-level BPE
tokenizer that fits the tiny model's 300-token vocabulary (256 byte tokens, 41 merges of common
English pairs, 3 special tokens), with a ChatML chat template, so that training, generation and
chat paths can run end to end on the tiny fixture model. No library needed: the JSON is written
directly (GPT-2's byte-to-unicode alphabet)."""

import json
import os
import sys

out = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/tiny_llama"


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


b2u = bytes_to_unicode()
vocab = {b2u[b]: b for b in range(256)}
sp = b2u[ord(" ")]
pairs = [("t", "h"), ("th", "e"), (sp, "the"), ("i", "n"), ("a", "n"), ("e", "r"), ("o", "n"), ("r", "e"),
         (sp, "a"), (sp, "t"), (sp, "s"), (sp, "w"), (sp, "o"), ("e", "s"), ("a", "t"), ("e", "n"), ("o", "r"),
         ("i", "s"), (sp, "c"), (sp, "b"), (sp, "h"), (sp, "m"), (sp, "p"), (sp, "f"), (sp, "in"), ("an", "d"),
         (sp, "and"), ("o", "u"), ("i", "t"), ("e", "d"), (sp, "is"), ("l", "l"), (sp, "d"), ("a", "s"),
         ("i", "c"), ("a", "r"), ("e", "s"), ("s", "t"), ("o", "w"), (sp, "l"), (sp, "n"), (sp, "g")]
merges = []
for a, b in pairs:
    tok = a + b
    if tok in vocab or len(vocab) >= 297:
        continue
    vocab[tok] = len(vocab)
    merges.append(f"{a} {b}")
specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
added = []
for s in specials:
    vocab[s] = len(vocab)
    added.append({"id": vocab[s], "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": False, "special": True})
assert len(vocab) <= 300, len(vocab)
tokenizer = {
    "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
    "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    "post_processor": None,
    "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
    "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
              "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
              "vocab": vocab, "merges": merges},
}
config = {
    "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
    "add_bos_token": False, "model_max_length": 256,
    "chat_template": "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
}
with open(os.path.join(out, "tokenizer.json"), "w") as f:
    json.dump(tokenizer, f, ensure_ascii=False)
with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=1)
print(len(vocab), "tokens,", len(merges), "merges")
