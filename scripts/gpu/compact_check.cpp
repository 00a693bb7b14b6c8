// Check of patch 0006 (KV compaction on the device): llama_memory_seq_compact and
// llama_memory_seq_copy_to against the state round trip (llama_state_seq_get_data, clear,
// llama_state_seq_set_data) that csp-llava used before. For each case two contexts evaluate the
// same prompt, drop the same scattered position ranges (~30% kept, in runs), optionally set patch
// 0003 head masks and/or renumber positions with llama_memory_seq_add (pending K-shift), then one
// compacts on the device and the other goes through the host; both decode 16 greedy tokens and
// the logits are compared at every step (bit-identical expected).
//
//   compact_check <text.gguf> [n_prompt=300] [big_prompt=4096] [big_ctx=8192]
#include "llama.h"
#include "ggml.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

static int N = 300;
static int n_layer, n_head, n_vocab;
static std::vector<llama_token> toks;
static bool ok = true;

static double now_ms() {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

static llama_context * make_ctx(llama_model * model, int n_ctx, bool fa, int nub = 256) {
    auto cp = llama_context_default_params();
    cp.n_ctx = n_ctx;
    cp.n_batch = std::min(512, n_ctx);
    cp.n_ubatch = std::min(nub, n_ctx);
    cp.n_seq_max = 1;
    cp.n_threads = cp.n_threads_batch = 2;
    cp.flash_attn_type = fa ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
    cp.no_perf = true;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "context failed\n"); exit(1); }
    if (llama_flash_attn_enabled(ctx) != fa) { fprintf(stderr, "flash attention did not resolve to %d\n", fa); exit(1); }
    return ctx;
}

static std::vector<float> prefill(llama_context * ctx, int n) {
    const int nb = llama_n_batch(ctx);
    llama_batch b = llama_batch_init(nb, 0, 1);
    for (int s = 0; s < n; s += nb) {
        const int m = std::min(nb, n - s);
        for (int i = 0; i < m; ++i) {
            b.token[i] = toks[s + i]; b.pos[i] = s + i; b.n_seq_id[i] = 1; b.seq_id[i][0] = 0; b.logits[i] = s + i == n - 1;
        }
        b.n_tokens = m;
        if (llama_decode(ctx, b)) { fprintf(stderr, "decode failed\n"); exit(1); }
    }
    llama_batch_free(b);
    const float * lg = llama_get_logits_ith(ctx, -1);
    return std::vector<float>(lg, lg + n_vocab);
}

static std::vector<float> step(llama_context * ctx, llama_token t, llama_pos pos) {
    llama_batch one = llama_batch_init(1, 0, 1);
    one.token[0] = t; one.pos[0] = pos; one.n_seq_id[0] = 1; one.seq_id[0][0] = 0; one.logits[0] = 1; one.n_tokens = 1;
    if (llama_decode(ctx, one)) { fprintf(stderr, "decode step failed\n"); exit(1); }
    llama_batch_free(one);
    const float * lg = llama_get_logits_ith(ctx, -1);
    return std::vector<float>(lg, lg + n_vocab);
}

static llama_token argmax(const std::vector<float> & v) {
    llama_token t = 0;
    for (int j = 1; j < (int) v.size(); ++j) if (v[j] > v[t]) t = j;
    return t;
}

// kept positions: runs of 11 out of every 37, plus the last 4 (~30%)
static bool keep(int p, int n) { return (p % 37) < 11 || p >= n - 4; }

// drops the other positions with llama_memory_seq_rm over maximal ranges; returns the kept count
static int evict(llama_context * ctx, int n) {
    llama_memory_t mem = llama_get_memory(ctx);
    int kept = 0;
    for (int p = 0; p < n; ) {
        if (keep(p, n)) { ++kept; ++p; continue; }
        int q = p;
        while (q < n && !keep(q, n)) ++q;
        if (!llama_memory_seq_rm(mem, 0, p, q)) { fprintf(stderr, "seq_rm failed\n"); exit(1); }
        p = q;
    }
    return kept;
}

// --kv-shift: renumber the kept positions 0..kept-1 (keys re-rotated lazily: a pending K-shift)
static void shift(llama_context * ctx, int n) {
    llama_memory_t mem = llama_get_memory(ctx);
    int np = 0;
    for (int p = 0; p < n; ) {
        if (!keep(p, n)) { ++p; continue; }
        int q = p;
        while (q < n && keep(q, n)) ++q;
        const int delta = np - p;
        if (delta != 0) llama_memory_seq_add(mem, 0, p, q, delta);
        np += q - p;
        p = q;
    }
}

// patch 0003 masks on the current (kept) positions: every other layer, some heads, every 3rd cell
static void masks(llama_context * ctx, const std::vector<llama_pos> & cur_pos) {
    llama_memory_t mem = llama_get_memory(ctx);
    std::vector<llama_pos> hide;
    for (size_t i = 0; i < cur_pos.size(); ++i) if (i % 3 == 1) hide.push_back(cur_pos[i]);
    for (int il = 0; il < n_layer; il += 2) {
        const uint64_t bits = (il % 4 == 0 ? 0x5555555555555555ull : 0x3ull) & (n_head >= 64 ? ~0ull : ((1ull << n_head) - 1));
        if (!llama_memory_seq_mask_layer(mem, 0, il, hide.data(), hide.size(), bits)) { fprintf(stderr, "mask failed\n"); exit(1); }
    }
}

static std::vector<llama_pos> kept_positions(int n, bool shifted) {
    std::vector<llama_pos> v;
    for (int p = 0; p < n; ++p) if (keep(p, n)) v.push_back(shifted ? (llama_pos) v.size() : p);
    return v;
}

// the state round trip of csp-llava's Session::compact (into dst, which may be a new context)
static size_t roundtrip(llama_context * src, llama_context * dst, double * ms_out) {
    const double t0 = now_ms();
    const size_t sz = llama_state_seq_get_size(src, 0);
    std::vector<uint8_t> buf(sz);
    const size_t w = llama_state_seq_get_data(src, buf.data(), buf.size(), 0);
    if (w == 0) { fprintf(stderr, "state get failed\n"); exit(1); }
    llama_memory_clear(llama_get_memory(dst), true);
    if (llama_state_seq_set_data(dst, buf.data(), w, 0) == 0) { fprintf(stderr, "state set failed\n"); exit(1); }
    if (ms_out) *ms_out = now_ms() - t0;
    return w;
}

struct Cmp { double max_abs = 0; bool identical = true; bool same_tokens = true; };

// greedy decode from `first` on both, comparing logits at every step
static Cmp decode_compare(llama_context * a, llama_context * b, llama_token first, llama_pos pos0, int n_steps) {
    Cmp c;
    llama_token ta = first, tb = first;
    for (int s = 0; s < n_steps; ++s) {
        const auto la = step(a, ta, pos0 + s);
        const auto lb = step(b, tb, pos0 + s);
        if (memcmp(la.data(), lb.data(), n_vocab*sizeof(float)) != 0) c.identical = false;
        for (int j = 0; j < n_vocab; ++j) c.max_abs = std::max(c.max_abs, (double) fabsf(la[j] - lb[j]));
        ta = argmax(la); tb = argmax(lb);
        if (ta != tb) c.same_tokens = false;
    }
    return c;
}

static void report(const char * what, const Cmp & c, double tol = 1e-5) {
    const bool pass = c.same_tokens && c.max_abs <= tol;
    printf("  %-58s tokens %s, logits %s (max abs %.3g) %s\n", what, c.same_tokens ? "same" : "DIFFER",
            c.identical ? "bit-identical" : "differ", c.max_abs, pass ? "OK" : "FAIL");
    ok &= pass;
}

static void check_meta(llama_context * a, llama_context * b, int expect_n, const char * what) {
    llama_kv_info ia = {}, ib = {};
    llama_memory_kv_info(llama_get_memory(a), &ia);
    llama_memory_kv_info(llama_get_memory(b), &ib);
    const llama_pos amin = llama_memory_seq_pos_min(llama_get_memory(a), 0), amax = llama_memory_seq_pos_max(llama_get_memory(a), 0);
    const llama_pos bmin = llama_memory_seq_pos_min(llama_get_memory(b), 0), bmax = llama_memory_seq_pos_max(llama_get_memory(b), 0);
    const bool pass = ia.n_used == ib.n_used && (int) ia.n_used == expect_n && ia.used_max_p1 == ib.used_max_p1 &&
        (int) ia.used_max_p1 == expect_n && amin == bmin && amax == bmax;
    printf("  %-58s used %u/%u, highest+1 %u/%u, pos %d..%d / %d..%d %s\n", what, ia.n_used, ib.n_used, ia.used_max_p1, ib.used_max_p1,
            amin, amax, bmin, bmax, pass ? "OK" : "FAIL");
    ok &= pass;
}

// (1) device compaction vs state round trip in place
static void case_compact(llama_model * model, bool fa, bool with_masks, bool with_shift) {
    char name[128];
    snprintf(name, sizeof(name), "compact FA %s%s%s", fa ? "on" : "off", with_masks ? " + head masks" : "", with_shift ? " + pending K-shift" : "");
    printf("%s\n", name);
    llama_context * A = make_ctx(model, 1024, fa);
    llama_context * B = make_ctx(model, 1024, fa);
    llama_context * C = make_ctx(model, 1024, fa); // no compaction at all (holes kept): sanity
    const auto la = prefill(A, N), lb = prefill(B, N), lc = prefill(C, N);
    if (memcmp(la.data(), lb.data(), n_vocab*sizeof(float)) != 0) { printf("  prompt logits differ between contexts\n"); ok = false; }
    const int kept = evict(A, N); evict(B, N); evict(C, N);
    if (with_shift) { shift(A, N); shift(B, N); shift(C, N); }
    const auto pos = kept_positions(N, with_shift);
    if (with_masks) { masks(A, pos); masks(B, pos); masks(C, pos); }
    uint64_t bytes = 0;
    const double t0 = now_ms();
    const int n = llama_memory_seq_compact(A, 0, &bytes);
    const double t1 = now_ms();
    if (n != kept) { printf("  llama_memory_seq_compact returned %d, expected %d FAIL\n", n, kept); ok = false; }
    if (with_shift) llama_memory_apply_updates(B); // a saved state needs rotated keys
    double ms_rt = 0;
    const size_t sz = roundtrip(B, B, &ms_rt);
    if (with_masks) masks(B, pos); // the state does not carry masks (cleared with the cache)
    printf("  kept %d of %d cells; device compaction %.2f ms, %llu bytes written; state round trip %.2f ms, %zu-byte state\n",
            kept, N, t1 - t0, (unsigned long long) bytes, ms_rt, sz);
    if (with_masks) {
        bool same = true;
        for (int il = 0; il < n_layer; ++il) for (int h = 0; h < n_head && h < 64; ++h)
            same &= llama_memory_layer_mask_count(llama_get_memory(A), il, h) == llama_memory_layer_mask_count(llama_get_memory(B), il, h);
        printf("  %-58s %s\n", "mask counts per (layer, head) equal", same ? "OK" : "FAIL");
        ok &= same;
    }
    check_meta(A, B, kept, "cells after compaction (device / round trip)");
    const llama_pos pos0 = with_shift ? kept : N;
    const llama_token first = argmax(la);
    report("16 greedy steps: device compaction vs state round trip", decode_compare(A, B, first, pos0, 16));
    // sanity: the uncompacted cache computes the same thing up to summation order
    llama_free(B);
    B = make_ctx(model, 1024, fa);
    prefill(B, N); evict(B, N);
    if (with_shift) shift(B, N);
    if (with_masks) masks(B, pos);
    llama_memory_seq_compact(B, 0, nullptr);
    // first step only (later steps may diverge once a near-tie flips the greedy token)
    const auto lb1 = step(B, first, pos0), lc1 = step(C, first, pos0);
    double d1 = 0, m1 = 0;
    for (int j = 0; j < n_vocab; ++j) { d1 = std::max(d1, (double) fabsf(lb1[j] - lc1[j])); m1 = std::max(m1, (double) fabsf(lc1[j])); }
    printf("  %-58s first step max abs %.3g (max |logit| %.3g): summation order only (<= 5%%)\n", "sanity: compacted vs uncompacted cache", d1, m1);
    ok &= d1 <= 5e-2*m1; // FA on CPU accumulates V in F16: order changes show at ~1e-2
    (void) lc;
    llama_free(A); llama_free(B); llama_free(C);
}

// (2) copy_to into a smaller context vs the state round trip into a smaller context
static void case_copy(llama_model * model, bool fa_src, bool fa_dst, bool with_masks, bool compact_first) {
    char name[160];
    snprintf(name, sizeof(name), "copy_to 1024 -> 256 cells, FA %s -> %s%s%s", fa_src ? "on" : "off", fa_dst ? "on" : "off",
            with_masks ? " + head masks" : "", compact_first ? " (compacted first)" : " (scattered source)");
    printf("%s\n", name);
    llama_context * S1 = make_ctx(model, 1024, fa_src);
    llama_context * S2 = make_ctx(model, 1024, fa_dst); // the round trip needs dst's V layout
    if (fa_src != fa_dst) {
        // same K/V bits in both sources: compute without flash attention in both (V layout unchanged)
        llama_set_flash_attn(S1, false);
        llama_set_flash_attn(S2, false);
    }
    const auto l1 = prefill(S1, N); prefill(S2, N);
    const int kept = evict(S1, N); evict(S2, N);
    const auto pos = kept_positions(N, false);
    if (with_masks) { masks(S1, pos); masks(S2, pos); }
    if (compact_first) llama_memory_seq_compact(S1, 0, nullptr);
    llama_context * D1 = make_ctx(model, 256, fa_dst);
    llama_context * D2 = make_ctx(model, 256, fa_dst);
    uint64_t bytes = 0;
    const double t0 = now_ms();
    const int n = llama_memory_seq_copy_to(S1, D1, 0, &bytes);
    const double t1 = now_ms();
    if (n != kept) { printf("  llama_memory_seq_copy_to returned %d, expected %d FAIL\n", n, kept); ok = false; }
    double ms_rt = 0;
    roundtrip(S2, D2, &ms_rt);
    if (with_masks) masks(D2, pos);
    printf("  copy_to %.2f ms, %llu bytes written; state round trip %.2f ms\n", t1 - t0, (unsigned long long) bytes, ms_rt);
    check_meta(D1, D2, kept, "cells in the small context (copy_to / round trip)");
    // the source must be unchanged by copy_to (scattered case): used cells
    llama_kv_info is = {};
    llama_memory_kv_info(llama_get_memory(S1), &is);
    if ((int) is.n_used != kept) { printf("  source changed FAIL\n"); ok = false; }
    llama_free(S1); llama_free(S2);
    report("16 greedy steps: copy_to vs state round trip", decode_compare(D1, D2, argmax(l1), N, 16));
    llama_free(D1); llama_free(D2);
}

// (3) timing with a large cache
static void case_big(llama_model * model, bool fa, int n_big, int ctx_big) {
    printf("timing: n_ctx %d, %d-token prompt, ~30%% kept, FA %s\n", ctx_big, n_big, fa ? "on" : "off");
    llama_context * A = make_ctx(model, ctx_big, fa, 512);
    llama_context * B = make_ctx(model, ctx_big, fa, 512);
    const auto la = prefill(A, n_big); prefill(B, n_big);
    const int kept = evict(A, n_big); evict(B, n_big);
    uint64_t bytes = 0;
    double t0 = now_ms();
    const int n = llama_memory_seq_compact(A, 0, &bytes);
    double t1 = now_ms();
    double ms_rt = 0;
    const size_t sz = roundtrip(B, B, &ms_rt);
    printf("  kept %d (compact returned %d): llama_memory_seq_compact %.1f ms (%.1f MiB K+V written); state round trip %.1f ms (%.1f MiB state)\n",
            kept, n, t1 - t0, bytes/1048576.0, ms_rt, sz/1048576.0);
    ok &= n == kept;
    report("16 greedy steps after compaction: device vs round trip", decode_compare(A, B, argmax(la), n_big, 16));
    // shrink: into a context of kept + 256 cells
    const int small = ((kept + 256 + 255)/256)*256;
    const double t2 = now_ms();
    llama_context * D1 = make_ctx(model, small, fa, 512);
    const double t3 = now_ms();
    const int n2 = llama_memory_seq_copy_to(A, D1, 0, &bytes);
    const double t4 = now_ms();
    llama_context * D2 = make_ctx(model, small, fa, 512);
    double ms_rt2 = 0;
    roundtrip(B, D2, &ms_rt2);
    printf("  shrink into %d cells: context creation %.1f ms; llama_memory_seq_copy_to %.1f ms (%.1f MiB); state round trip %.1f ms\n",
            small, t3 - t2, t4 - t3, bytes/1048576.0, ms_rt2);
    ok &= n2 == kept + 16;
    report("16 greedy steps after shrink: copy_to vs round trip", decode_compare(D1, D2, 1, n_big + 16, 16));
    llama_free(A); llama_free(B); llama_free(D1); llama_free(D2);
}

int main(int argc, char ** argv) {
    if (argc < 2) { fprintf(stderr, "usage: %s text.gguf [n_prompt] [big_prompt] [big_ctx]\n", argv[0]); return 2; }
    if (argc > 2) N = atoi(argv[2]);
    const int n_big   = argc > 3 ? atoi(argv[3]) : 4096;
    const int ctx_big = argc > 4 ? atoi(argv[4]) : 8192;
    llama_log_set([](ggml_log_level l, const char * t, void *) { if (l >= GGML_LOG_LEVEL_ERROR) fputs(t, stderr); }, nullptr);
    llama_backend_init();
    auto mp = llama_model_default_params();
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) { fprintf(stderr, "model load failed\n"); return 1; }
    n_layer = llama_model_n_layer(model);
    n_head = llama_model_n_head(model);
    const llama_vocab * vocab = llama_model_get_vocab(model);
    n_vocab = llama_vocab_n_tokens(vocab);
    printf("model: n_layer %d n_head %d n_head_kv %d head_dim %d; prompt %d\n", n_layer, n_head, llama_model_n_head_kv(model),
            llama_model_n_embd(model)/n_head, N);

    std::string text;
    const int n_tok = std::max(N, n_big);
    while ((int) text.size() < 8*n_tok) text += "The quick brown fox jumps over the lazy dog while the cache is compacted. In 1905, 17 cats sat on 3 mats; why? ";
    toks.resize(text.size() + 8);
    int nt = llama_tokenize(vocab, text.c_str(), (int) text.size(), toks.data(), (int) toks.size(), true, false);
    if (nt < 0) { // a byte-level vocabulary (the random model of make_model.cpp) needs more room
        toks.resize(-nt);
        nt = llama_tokenize(vocab, text.c_str(), (int) text.size(), toks.data(), (int) toks.size(), true, false);
    }
    if (nt < n_tok) { fprintf(stderr, "tokenize gave %d tokens\n", nt); return 1; }
    toks.resize(nt);

    for (int fa = 1; fa >= 0; --fa) {
        case_compact(model, fa, false, false);
        case_compact(model, fa, true,  false);
        case_compact(model, fa, false, true);
        case_compact(model, fa, true,  true);
    }
    for (int fa = 1; fa >= 0; --fa) {
        case_copy(model, fa, fa, false, false);
        case_copy(model, fa, fa, true,  true);
    }
    case_copy(model, false, true, true, false); // V transposed -> not transposed
    case_copy(model, true, false, false, true); // V not transposed -> transposed
    if (n_big > 0) {
        case_big(model, true, n_big, ctx_big);
        case_big(model, false, n_big, ctx_big);
    }
    printf("%s\n", ok ? "ALL OK" : "SOME CHECKS FAILED");
    llama_model_free(model);
    return ok ? 0 : 1;
}
