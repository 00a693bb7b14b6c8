/* Prune once, ask several, from C: the images are read and pruned (CSP keeping 20% of them)
 * before any question; then each question is answered from the pruned cache.
 *
 *   cc -Iinclude examples/c/chat.c -Ltarget/release -lcsp_llava -Wl,-rpath,target/release -o chat
 *   ./chat text.gguf mmproj.gguf a.png b.png
 *
 * Questions come from standard input, one per line; the answers go to standard output. */
#include <stdio.h>
#include <string.h>
#include "csp_llava.h"

/* print each piece as it comes; stop an answer after 200 pieces */
static int on_piece(const char *piece, void *user_data) {
    int *n = (int *) user_data;
    fputs(piece, stdout);
    fflush(stdout);
    return ++*n >= 200;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s TEXT.gguf MMPROJ.gguf [IMAGE...]\n", argv[0]);
        return 2;
    }
    cspl_engine_params ep = cspl_engine_params_default();
    cspl_engine *engine = cspl_engine_load(argv[1], argv[2], &ep);
    if (!engine) {
        fprintf(stderr, "error: %s\n", cspl_last_error());
        return 1;
    }
    cspl_chat_params cp = cspl_chat_params_default(); /* CSP at 0.2, greedy */
    cp.n_predict = 32;
    cspl_chat *chat = cspl_chat_new(engine, &cp);
    cspl_engine_free(engine); /* the chat keeps the model alive */
    if (!chat) {
        fprintf(stderr, "error: %s\n", cspl_last_error());
        return 1;
    }
    for (int i = 3; i < argc; ++i) {
        if (cspl_chat_add_image_file(chat, argv[i]) < 0) {
            fprintf(stderr, "error: %s\n", cspl_last_error());
        }
    }
    char line[4096];
    int status = 0;
    while (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\r\n")] = '\0';
        if (!line[0]) {
            continue;
        }
        int pieces = 0;
        int n = cspl_chat_ask(chat, line, on_piece, &pieces);
        if (n < 0) {
            fprintf(stderr, "error: %s\n", cspl_last_error());
            status = 1;
            continue;
        }
        printf("\n");
        fprintf(stderr, "[%d tokens]\n", n);
    }
    cspl_chat_free(chat);
    return status;
}
