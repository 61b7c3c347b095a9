/*
 * Embedding gristmill in a C program: load a model, tokenize, stream a generation, score two
 * continuations, and show what an error looks like.
 *
 * Build and run (from the repository root):
 *
 *   cargo build --release -p gristmill-capi
 *   cc -std=c99 -Wall -Wextra -o embed examples/c/embed.c -I capi/include \
 *      -L target/release -lgristmill_capi -Wl,-rpath,"$PWD/target/release"
 *   ./embed tests/fixtures/tiny_llama ["prompt"]
 *
 * capi/tests/c_abi.rs builds and runs it the same way under `cargo test`.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gristmill.h"

/* Streams each piece to stdout and counts them; stops when stdout fails. */
static bool on_text(const char *piece, size_t len, void *user) {
    size_t *pieces = user;
    (*pieces)++;
    return fwrite(piece, 1, len, stdout) == len && fflush(stdout) == 0;
}

/* The library prints nothing itself: show its warnings on stderr. */
static void on_log(int32_t level, const char *target, const char *message, void *user) {
    (void)user;
    fprintf(stderr, "[log %d %s] %s\n", (int)level, target, message);
}

static int fail(const char *what) {
    fprintf(stderr, "%s failed: %s\n", what, gristmill_last_error());
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODEL_DIR [PROMPT]\n", argv[0]);
        return 2;
    }
    const char *prompt = argc > 2 ? argv[2] : "Question: what is 12 + 30?\nAnswer:";
    printf("gristmill %s\n", gristmill_version());
    if (gristmill_set_logger(on_log, NULL, 2) != GRISTMILL_OK) return fail("gristmill_set_logger");

    /* A missing directory is an error with a code and a message, not a crash. */
    gristmill_model *missing = NULL;
    gristmill_status st = gristmill_model_load("/no/such/model", NULL, NULL, GRISTMILL_PRECISION_AS_STORED, &missing);
    printf("loading /no/such/model: status %d (%s), message: %s\n", (int)st,
           st == GRISTMILL_ERR_IO ? "GRISTMILL_ERR_IO" : "unexpected", gristmill_last_error());
    if (st != GRISTMILL_ERR_IO || missing != NULL) return 1;

    gristmill_model *model = NULL;
    if (gristmill_model_load(argv[1], NULL, "cpu", GRISTMILL_PRECISION_AS_STORED, &model) != GRISTMILL_OK)
        return fail("gristmill_model_load");
    printf("context: %zu tokens\n", gristmill_model_context_len(model));

    uint32_t *ids = NULL;
    size_t n_ids = 0;
    if (gristmill_tokenize(model, prompt, &ids, &n_ids) != GRISTMILL_OK) return fail("gristmill_tokenize");
    char *round_trip = NULL;
    if (gristmill_detokenize(model, ids, n_ids, &round_trip) != GRISTMILL_OK) return fail("gristmill_detokenize");
    printf("prompt: %zu tokens, decoded back %s\n", n_ids, strcmp(round_trip, prompt) == 0 ? "unchanged" : "changed");
    gristmill_tokens_free(ids, n_ids);
    gristmill_string_free(round_trip);

    gristmill_sampling cfg;
    gristmill_sampling_default(&cfg);
    cfg.temperature = 0.7f;
    cfg.top_p = 0.9f;
    cfg.seed = 1;
    cfg.max_new_tokens = 24;
    const char *stops[] = {"\n\n"};
    cfg.stop = stops;
    cfg.n_stop = 1;

    size_t pieces = 0;
    gristmill_generation info;
    char *text = NULL;
    printf("generation: ");
    if (gristmill_generate(model, prompt, &cfg, on_text, &pieces, &info, &text) != GRISTMILL_OK)
        return fail("gristmill_generate");
    printf("\n[%zu prompt tokens, %zu new tokens in %zu pieces, stop %d]\n", info.prompt_tokens, info.new_tokens,
           pieces, (int)info.stop);
    gristmill_string_free(text);

    const char *continuations[] = {" 42", " 7"};
    for (int i = 0; i < 2; i++) {
        double logprob = 0.0;
        if (gristmill_score(model, prompt, continuations[i], &logprob) != GRISTMILL_OK)
            return fail("gristmill_score");
        printf("log P(\"%s\" | prompt) = %.4f\n", continuations[i], logprob);
    }

    /* Bad arguments are refused, not dereferenced. */
    double unused = 0.0;
    if (gristmill_score(model, prompt, NULL, &unused) != GRISTMILL_ERR_INVALID_ARGUMENT) return 1;
    printf("NULL argument: %s\n", gristmill_last_error());

    gristmill_model_free(model);
    printf("done\n");
    return 0;
}
