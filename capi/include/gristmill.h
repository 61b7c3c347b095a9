/*
 * gristmill.h — the C interface of gristmill (library gristmill_capi: libgristmill_capi.so or
 * libgristmill_capi.a, built by `cargo build --release -p gristmill-capi`).
 *
 * Written by hand beside capi/src/lib.rs; capi/tests/c_abi.rs compiles it and checks every
 * function, constant and struct layout against the Rust definitions.
 *
 * Conventions:
 *   - Handles are opaque. gristmill_model_load makes one, gristmill_model_free releases it.
 *     Memory the library hands out has its own free function: gristmill_string_free,
 *     gristmill_tokens_free. Every free function ignores NULL.
 *   - Strings are NUL-terminated UTF-8, in and out.
 *   - Functions that can fail return a gristmill_status: GRISTMILL_OK (0) or a GRISTMILL_ERR_*
 *     code; gristmill_last_error() then says what went wrong. On failure, out-parameters are
 *     left untouched.
 *   - Callbacks receive the `user` pointer given with them, unchanged, on the calling thread.
 *   - No Rust panic crosses this interface: a bug inside the library returns
 *     GRISTMILL_ERR_INTERNAL with a message.
 *   - A model may be used from any thread, by one call at a time. A callback must not free the
 *     model it is called for.
 *   - The library prints nothing; gristmill_set_logger receives its log messages.
 */
#ifndef GRISTMILL_H
#define GRISTMILL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- status codes ---------------------------------------------------------------------- */

typedef int32_t gristmill_status;

#define GRISTMILL_OK 0
/* A NULL or non-UTF-8 argument, an out-of-range value, a prompt longer than the context. */
#define GRISTMILL_ERR_INVALID_ARGUMENT 1
/* A file could not be opened, read or written. */
#define GRISTMILL_ERR_IO 2
/* A file is not in the format it claims, or is damaged. */
#define GRISTMILL_ERR_FORMAT 3
/* A tensor is missing or has the wrong dtype or shape. */
#define GRISTMILL_ERR_TENSOR 4
/* A model or training configuration is wrong. */
#define GRISTMILL_ERR_CONFIG 5
/* Something gristmill does not do. */
#define GRISTMILL_ERR_UNSUPPORTED 6
/* The tokenizer or the chat template failed, or a text holds a NUL byte. */
#define GRISTMILL_ERR_TOKENIZER 7
/* The core's checks (shapes, NF4, linear algebra). */
#define GRISTMILL_ERR_CORE 8
/* The GPU: driver, kernel launch. */
#define GRISTMILL_ERR_GPU 9
/* A bug in gristmill (a caught panic); the message says where. */
#define GRISTMILL_ERR_INTERNAL 10

/* `precision` of gristmill_model_load. */
#define GRISTMILL_PRECISION_AS_STORED 0 /* as the checkpoint stores them */
#define GRISTMILL_PRECISION_NF4 1       /* every linear weight quantized to NF4 at load */
#define GRISTMILL_PRECISION_F32 2       /* every linear weight dense f32 */

/* gristmill_generation.stop: why a generation ended. */
#define GRISTMILL_STOP_EOS 0        /* the model wrote its end-of-sequence token */
#define GRISTMILL_STOP_STRING 1     /* a stop string appeared (it is not part of the text) */
#define GRISTMILL_STOP_MAX_TOKENS 2 /* max_new_tokens were generated */
#define GRISTMILL_STOP_CONTEXT 3    /* the model's context is full */
#define GRISTMILL_STOP_CALLBACK 4   /* the text callback returned false */

/* ---- types ------------------------------------------------------------------------------ */

/* A loaded model (with its tokenizer and adapter), on its device. */
typedef struct gristmill_model gristmill_model;

/* How to sample. gristmill_sampling_default fills in the defaults. */
typedef struct gristmill_sampling {
    float temperature;        /* 0 = greedy */
    uint32_t top_k;           /* keep the k most likely tokens; 0 = off */
    float top_p;              /* nucleus sampling; 1 = off */
    float repetition_penalty; /* > 1 discourages repeats; 1 = off */
    uint64_t seed;
    uint32_t max_new_tokens;
    const char *const *stop; /* n_stop strings that end the generation; NULL when n_stop is 0 */
    size_t n_stop;
} gristmill_sampling;

/* What a generation did. */
typedef struct gristmill_generation {
    size_t prompt_tokens;
    size_t new_tokens;
    int32_t stop;     /* GRISTMILL_STOP_* */
    double prefill_s; /* seconds on the prompt */
    double decode_s;  /* seconds on the new tokens */
} gristmill_generation;

/* One optimizer step of a training run. Metrics the step does not have are NaN. */
typedef struct gristmill_step {
    size_t step; /* optimizer steps done */
    double epoch;
    double loss;
    double lr;
    double grad_norm;
    double tokens_per_s;
    double eval_loss;
    double elapsed_s;
    const char *json; /* the whole record as JSON (a metrics.jsonl line); valid during the callback */
} gristmill_step;

/* How a training run ended. */
typedef struct gristmill_train_result {
    size_t steps;
    size_t total_steps;
    double last_loss;
    double eval_loss; /* NaN without validation data */
    double seconds;
    uint64_t tokens;
    bool interrupted; /* the step callback stopped the run; a checkpoint was written */
    bool early_stopped;
} gristmill_train_result;

/* Receives each new piece of generated text: `len` bytes of UTF-8, also NUL-terminated, valid
 * during the call. Returns false to stop the generation. */
typedef bool (*gristmill_text_fn)(const char *piece, size_t len, void *user);

/* Receives each optimizer step (valid during the call). Returns false to stop the run. */
typedef bool (*gristmill_step_fn)(const gristmill_step *step, void *user);

/* Receives each log message: level 1 = error, 2 = warn, 3 = info, 4 = debug, 5 = trace; the
 * module it comes from; the text. Both strings are valid during the call. */
typedef void (*gristmill_log_fn)(int32_t level, const char *target, const char *message, void *user);

/* ---- the library ------------------------------------------------------------------------ */

/* The library's version, e.g. "0.1.0" (static). */
const char *gristmill_version(void);

/* The message of the last call on this thread that failed, or NULL when none has. Valid until
 * the next failing call on this thread. */
const char *gristmill_last_error(void);

/* Frees a string the library returned. */
void gristmill_string_free(char *s);

/* Frees a token array the library returned, with its length. */
void gristmill_tokens_free(uint32_t *ids, size_t n);

/* Sends the library's log messages up to max_level (0 = off … 5 = trace) to `callback`, which
 * must be callable from any thread with `user`; NULL turns logging off. Fails when the process
 * already has another logger for Rust's `log` facade. */
gristmill_status gristmill_set_logger(gristmill_log_fn callback, void *user, int32_t max_level);

/* ---- models ----------------------------------------------------------------------------- */

/* Loads the model directory `dir` (config.json, safetensors, tokenizer.json) with the PEFT LoRA
 * adapter directory `adapter` (NULL: none) on `device` ("cpu", "auto", "cuda", "cuda:N"; NULL:
 * the CPU), holding its linear weights as `precision` (GRISTMILL_PRECISION_*) says. On success
 * *out is a handle to free with gristmill_model_free. */
gristmill_status gristmill_model_load(const char *dir, const char *adapter, const char *device, int32_t precision,
                                      gristmill_model **out);

/* Frees a model. */
void gristmill_model_free(gristmill_model *model);

/* The model's context length in tokens (0 for NULL). */
size_t gristmill_model_context_len(const gristmill_model *model);

/* The ids of `text` as a plain prompt (with the special tokens the tokenizer adds, BOS for most
 * models): *n_ids ids at *ids, to free with gristmill_tokens_free. */
gristmill_status gristmill_tokenize(const gristmill_model *model, const char *text, uint32_t **ids, size_t *n_ids);

/* The text of `n` ids, special tokens left out; free *out with gristmill_string_free. */
gristmill_status gristmill_detokenize(const gristmill_model *model, const uint32_t *ids, size_t n, char **out);

/* Fills *cfg with the defaults: greedy, seed 0, 256 new tokens, no stop strings. */
void gristmill_sampling_default(gristmill_sampling *cfg);

/* Continues `prompt` (tokenized as gristmill_tokenize does) as `cfg` says (NULL: the defaults),
 * calling on_text(piece, len, user) with each new piece of text as it is decoded (NULL: no
 * streaming). Optional outputs (NULL to skip): *info, and the whole text in *text (free it with
 * gristmill_string_free). */
gristmill_status gristmill_generate(const gristmill_model *model, const char *prompt, const gristmill_sampling *cfg,
                                    gristmill_text_fn on_text, void *user, gristmill_generation *info,
                                    char **text);

/* The log-likelihood (natural log, summed over its tokens) of `continuation` after `prompt`. The
 * continuation is tokenized on its own, without special tokens: start it with the space that
 * separates it from the prompt (" Paris"). */
gristmill_status gristmill_score(const gristmill_model *model, const char *prompt, const char *continuation,
                                 double *logprob);

/* Writes the adapter the model was loaded with to `dir` in PEFT's format. */
gristmill_status gristmill_save_adapter(const gristmill_model *model, const char *dir);

/* ---- training and merging --------------------------------------------------------------- */

/* Trains a LoRA adapter. The configuration is the TOML file `config_path` (NULL: none) with the
 * n_sets overrides `sets` ("key=value", as `gristmill train --set`) applied in order; model.path,
 * data.paths and output.dir must be set by one or the other. on_step (NULL allowed) gets each
 * optimizer step and returns false to stop early; *result (NULL allowed) says how the run ended.
 * The adapter lands in output.dir, ready for gristmill_model_load. */
gristmill_status gristmill_train(const char *config_path, const char *const *sets, size_t n_sets,
                                 gristmill_step_fn on_step, void *user, gristmill_train_result *result);

/* Merges the PEFT adapter `adapter` into the full-precision model `base` and writes an HF
 * checkpoint to `out`. A bitsandbytes 4-bit base is refused unless allow_4bit. */
gristmill_status gristmill_merge(const char *base, const char *adapter, const char *out, bool allow_4bit);

#ifdef __cplusplus
}
#endif

#endif /* GRISTMILL_H */
