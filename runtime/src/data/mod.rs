//! Training data: formats, prompt templates, tokenization with loss masks, splits, batching.
//! (being written)
