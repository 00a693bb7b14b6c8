// Speed of the in-graph attention statistics (patch 0005) against llama.cpp's own path, on one
// prompt of random tokens: prefill ms and tok/s, decode tok/s, bytes the observer reads back.
// Rows (interleaved over repetitions after a warm-up; medians, min–max):
//   reference   flash attention as llama.cpp resolves it (auto), no observer
//   fa-off      flash attention off, no observer (what the host observer pays at the least)
//   csp-graph   observer: last W rows, n-softmax n = 1, text/media columns
//   h2o-graph   observer: all rows, softmax, text/media columns
//   both-graph  the two at once (CSP and H2O from one prefill)
// Positions [16, 16 + n_media) are marked "media" (as images in a LLaVA prompt), the rest text.
// One JSON object per row on stdout.
//
//   obs_bench MODEL.gguf [n_prompt=4096] [window=512] [n_media=3456] [reps=3] [n_decode=64]
//             [n_ubatch=512] [n_gpu_layers=999]
//
// OBS_FLAGS=2 forces the transpose reduction (Metal's path) where OUT_PROD exists;
// OBS_ROWS_CHUNK=N sets the rows per QKᵀ chunk (default 128). On the 2-core CPU machine the
// transpose path was not faster (csp window 0.91× vs 0.93× of the reference, -r 2).
#include "llama.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

struct Readback {
    double bytes = 0;
    long calls = 0;
};

static bool count_cb(void * ud, const llama_attn_obs_result * r) {
    auto * rb = (Readback *) ud;
    rb->calls++;
    rb->bytes += 4.0 * r->n_head_kv * r->n_cols * r->n_kv;
    volatile float sink = 0;
    for (int j = 0; j < r->n_kv; j += 97) sink += r->sums[j]; // touch the data like a consumer would
    (void) sink;
    return true;
}

static double now_ms() {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

struct Stat {
    double med, lo, hi;
};
static Stat stat(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    const size_t n = v.size();
    return {n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2, v.front(), v.back()};
}

int main(int argc, char ** argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODEL.gguf [n_prompt] [window] [n_media] [reps] [n_decode] [n_ubatch] [ngl]\n", argv[0]);
        return 2;
    }
    auto arg = [&](int i, long def) { return argc > i ? std::atol(argv[i]) : def; };
    const int N = arg(2, 4096), W = arg(3, 512), n_media = arg(4, 3456), reps = arg(5, 3), n_decode = arg(6, 64);
    const int n_ubatch = arg(7, 512), ngl = arg(8, 999);

    llama_backend_init();
    auto mp = llama_model_default_params();
    mp.n_gpu_layers = ngl;
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) { fprintf(stderr, "cannot load %s\n", argv[1]); return 1; }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    std::vector<llama_token> toks(N);
    uint64_t s = 7;
    for (auto & t : toks) { s = s * 6364136223846793005ull + 1442695040888963407ull; t = 259 + (int) ((s >> 33) % (uint64_t) (n_vocab - 259)); }
    toks[0] = 1;

    // columns: 0/1 = CSP window text/media (variant 0, n = 1); 2/3 = H2O all rows (variant 1, n = 0)
    auto is_media = [&](int p) { return p >= 16 && p < 16 + n_media; };
    std::vector<uint64_t> csp(N, 0), h2o(N, 0), both(N, 0);
    for (int p = 0; p < N; p++) {
        const int m = is_media(p) ? 1 : 0;
        if (p >= N - W) csp[p] |= 1ull << m;
        h2o[p] |= 1ull << (2 + m);
        both[p] = csp[p] | h2o[p];
    }
    const float nvar[2] = {1.0f, 0.0f};
    const int32_t col_var[4] = {0, 0, 1, 1};

    struct Row { const char * name; bool fa_off; const std::vector<uint64_t> * table; };
    const Row rows[] = {{"reference", false, nullptr}, {"fa-off", true, nullptr}, {"csp-graph", false, &csp},
                        {"h2o-graph", false, &h2o}, {"both-graph", false, &both}};
    const int n_rows = sizeof rows / sizeof rows[0];
    std::vector<std::vector<double>> pre(n_rows), dec(n_rows);
    std::vector<Readback> rb(n_rows);
    std::vector<int> fa_used(n_rows, -1);

    for (int rep = 0; rep <= reps; rep++) {
        for (int ri = 0; ri < n_rows; ri++) {
            const Row & r = rows[ri];
            auto cp = llama_context_default_params();
            cp.n_ctx = N + n_decode + 16;
            cp.n_batch = std::min(N, 2048);
            cp.n_ubatch = n_ubatch;
            cp.flash_attn_type = r.fa_off ? LLAMA_FLASH_ATTN_TYPE_DISABLED : LLAMA_FLASH_ATTN_TYPE_AUTO;
            cp.no_perf = true;
            llama_context * ctx = llama_init_from_model(model, cp);
            if (!ctx) { fprintf(stderr, "context failed\n"); return 1; }
            fa_used[ri] = llama_flash_attn_enabled(ctx);
            Readback here;
            if (r.table) {
                llama_attn_obs_params p = {};
                p.seq = 0; p.n_var = 2; p.n = nvar; p.n_cols = 4; p.col_var = col_var;
                p.n_pos = N; p.cols_of_pos = r.table->data(); p.n_rows_chunk = 0;
                p.cb = count_cb; p.user_data = &here;
                // OBS_FLAGS=2 forces the transpose reduction (LLAMA_ATTN_OBS_FORCE_TRANSPOSE)
                if (const char * f = getenv("OBS_FLAGS")) p.flags = (uint32_t) atoi(f);
                if (const char * c = getenv("OBS_ROWS_CHUNK")) p.n_rows_chunk = atoi(c);
                if (!llama_set_attn_observer(ctx, &p)) { fprintf(stderr, "observer refused\n"); return 1; }
            }
            llama_batch b = llama_batch_init(cp.n_batch, 0, 1);
            const double t0 = now_ms();
            for (int at = 0; at < N; at += cp.n_batch) {
                const int n = std::min<int>(cp.n_batch, N - at);
                b.n_tokens = n;
                for (int i = 0; i < n; i++) {
                    b.token[i] = toks[at + i]; b.pos[i] = at + i; b.n_seq_id[i] = 1; b.seq_id[i][0] = 0;
                    b.logits[i] = at + i == N - 1;
                }
                if (llama_decode(ctx, b)) { fprintf(stderr, "prefill failed\n"); return 1; }
            }
            llama_synchronize(ctx);
            const double t_pre = now_ms() - t0;
            if (r.table) llama_set_attn_observer(ctx, nullptr); // decode as the engine does
            llama_batch one = llama_batch_init(1, 0, 1);
            llama_token t = toks[N - 1];
            const double t1 = now_ms();
            for (int k = 0; k < n_decode; k++) {
                const float * lg = llama_get_logits_ith(ctx, -1);
                t = (llama_token) (std::max_element(lg, lg + n_vocab) - lg);
                one.n_tokens = 1; one.token[0] = t; one.pos[0] = N + k; one.n_seq_id[0] = 1; one.seq_id[0][0] = 0; one.logits[0] = 1;
                if (llama_decode(ctx, one)) { fprintf(stderr, "decode failed\n"); return 1; }
            }
            llama_synchronize(ctx);
            const double t_dec = now_ms() - t1;
            llama_batch_free(one);
            llama_batch_free(b);
            llama_free(ctx);
            if (rep > 0) {
                pre[ri].push_back(t_pre);
                dec[ri].push_back(n_decode * 1e3 / t_dec);
                rb[ri] = here;
            }
            fprintf(stderr, "rep %d %-10s prefill %.1f ms, decode %.1f tok/s\n", rep, r.name, t_pre, n_decode * 1e3 / t_dec);
        }
    }
    const Stat ref_pre = stat(pre[0]), ref_dec = stat(dec[0]);
    for (int ri = 0; ri < n_rows; ri++) {
        const Stat p = stat(pre[ri]), d = stat(dec[ri]);
        printf("{\"row\":\"%s\",\"n_prompt\":%d,\"window\":%d,\"n_ubatch\":%d,\"flash_attn\":%s,"
               "\"prefill_ms\":{\"median\":%.2f,\"min\":%.2f,\"max\":%.2f},\"prefill_tok_s\":%.1f,"
               "\"decode_tok_s\":{\"median\":%.2f,\"min\":%.2f,\"max\":%.2f},"
               "\"ratio_prefill\":%.3f,\"ratio_decode\":%.3f,\"bytes_read_back\":%.0f,\"callbacks\":%ld,\"reps\":%d}\n",
               rows[ri].name, N, W, n_ubatch, fa_used[ri] ? "true" : "false", p.med, p.lo, p.hi, N * 1e3 / p.med, d.med, d.lo,
               d.hi, ref_pre.med / p.med, d.med / ref_dec.med, rb[ri].bytes, rb[ri].calls, reps);
    }
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
