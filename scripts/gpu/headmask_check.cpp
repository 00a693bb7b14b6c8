// Check of patch 0007 (patch 0003's per-(layer, head) masks through flash attention): a context
// with flash attention on, whose masked layers now run ggml_flash_attn_ext with a per-head F16
// mask, against the same context type with LLAMA_CSP_HEAD_MASK_FA=0 (masked layers on the
// non-flash kq_b path, as patch 0003 did; unmasked layers on flash attention in both), for a
// prompt whose second part is evaluated after masks were set (multi-token ubatches through the
// masked path) and 16 greedy decode steps; then after a compaction (masks moved, bias re-uploaded);
// and decode speed with masks: flash attention for masked layers vs the non-flash path.
//
//   headmask_check <text.gguf> [n_prompt=300] [bench_prompt=2048] [bench_steps=64]
#include "llama.h"
#include "ggml.h"
#include "ggml-backend.h"

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

// every llama_decode of a context runs under its own setting (graphs are rebuilt when not reused;
// a context keeps one setting for its whole life here)
static void set_mode(bool mask_fa) { setenv("LLAMA_CSP_HEAD_MASK_FA", mask_fa ? "1" : "0", 1); }

// attention nodes seen by the scheduler (ask phase only: no synchronisation)
// and a copy of layer 0's attention output (kqv_out-0: same inputs on both paths, so it isolates
// the attention kernel: flash attention with the per-head mask vs soft_max with kq_b)
struct Count { long fa = 0, softmax = 0; std::vector<float> kqv0; };
static bool count_cb(ggml_tensor * t, bool ask, void * ud) {
    auto * c = (Count *) ud;
    const bool want = strcmp(t->name, "kqv_out-0") == 0;
    if (ask) {
        c->fa      += t->op == GGML_OP_FLASH_ATTN_EXT;
        c->softmax += t->op == GGML_OP_SOFT_MAX;
        return want;
    }
    if (want) {
        c->kqv0.resize(ggml_nelements(t));
        if (t->type != GGML_TYPE_F32 || !ggml_is_contiguous(t)) { fprintf(stderr, "kqv_out-0 not F32 contiguous\n"); exit(1); }
        ggml_backend_tensor_get(t, c->kqv0.data(), 0, ggml_nbytes(t));
    }
    return true;
}

struct Ctx {
    llama_context * ctx;
    bool mask_fa;
    Count * cnt;
};

static int n_threads = 2;

static Ctx make_ctx(llama_model * model, int n_ctx, bool fa, bool mask_fa, int nub = 128, bool cb = true) {
    auto cp = llama_context_default_params();
    cp.n_ctx = n_ctx;
    cp.n_batch = 512;
    cp.n_ubatch = nub;
    cp.n_seq_max = 1;
    cp.n_threads = cp.n_threads_batch = n_threads;
    cp.flash_attn_type = fa ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
    cp.no_perf = cb;
    Count * cnt = new Count();
    if (cb) { cp.cb_eval = count_cb; cp.cb_eval_user_data = cnt; }
    set_mode(mask_fa);
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "context failed\n"); exit(1); }
    if (llama_flash_attn_enabled(ctx) != fa) { fprintf(stderr, "flash attention did not resolve to %d\n", fa); exit(1); }
    return { ctx, mask_fa, cnt };
}

static std::vector<float> eval(Ctx & c, int p0, int p1) {
    set_mode(c.mask_fa);
    llama_batch b = llama_batch_init(512, 0, 1);
    for (int s = p0; s < p1; s += 512) {
        const int m = std::min(512, p1 - s);
        for (int i = 0; i < m; ++i) {
            b.token[i] = toks[s + i]; b.pos[i] = s + i; b.n_seq_id[i] = 1; b.seq_id[i][0] = 0; b.logits[i] = s + i == p1 - 1;
        }
        b.n_tokens = m;
        if (llama_decode(c.ctx, b)) { fprintf(stderr, "decode failed\n"); exit(1); }
    }
    llama_batch_free(b);
    const float * lg = llama_get_logits_ith(c.ctx, -1);
    return std::vector<float>(lg, lg + n_vocab);
}

static std::vector<float> step(Ctx & c, llama_token t, llama_pos pos) {
    set_mode(c.mask_fa);
    llama_batch one = llama_batch_init(1, 0, 1);
    one.token[0] = t; one.pos[0] = pos; one.n_seq_id[0] = 1; one.seq_id[0][0] = 0; one.logits[0] = 1; one.n_tokens = 1;
    if (llama_decode(c.ctx, one)) { fprintf(stderr, "decode step failed\n"); exit(1); }
    llama_batch_free(one);
    const float * lg = llama_get_logits_ith(c.ctx, -1);
    return std::vector<float>(lg, lg + n_vocab);
}

static llama_token argmax(const std::vector<float> & v) {
    llama_token t = 0;
    for (int j = 1; j < (int) v.size(); ++j) if (v[j] > v[t]) t = j;
    return t;
}

// masks over positions [0, upto): every layer, different heads per layer; some cells hidden from
// all heads of a layer, some from a few heads
static void set_masks(Ctx & c, int upto) {
    llama_memory_t mem = llama_get_memory(c.ctx);
    const uint64_t all = n_head >= 64 ? ~0ull : ((1ull << n_head) - 1);
    for (int il = 0; il < n_layer; ++il) {
        std::vector<llama_pos> a, b;
        for (int p = 1; p < upto; ++p) {
            if ((p + il) % 5 == 0) a.push_back(p);           // hidden from some heads
            else if ((p*7 + il) % 23 == 0) b.push_back(p);   // hidden from all heads
        }
        const uint64_t heads = (0x9ull << (il % 5)) & all;
        if (!llama_memory_seq_mask_layer(mem, 0, il, a.data(), a.size(), heads ? heads : 1)) { fprintf(stderr, "mask failed\n"); exit(1); }
        if (!llama_memory_seq_mask_layer(mem, 0, il, b.data(), b.size(), all)) { fprintf(stderr, "mask failed\n"); exit(1); }
    }
}

struct Diff { double abs = 0, ref = 0; double rel() const { return ref > 0 ? abs/ref : abs; } };
static double l0_fa_drift = 0, l0_mask_effect = 0;
static Diff l0; // layer-0 attention output, accumulated by run_pair / cmp_l0

static void cmp_l0(const Ctx & a, const Ctx & b) {
    if (a.cnt->kqv0.size() != b.cnt->kqv0.size() || a.cnt->kqv0.empty()) { fprintf(stderr, "kqv_out-0 missing\n"); exit(1); }
    for (size_t j = 0; j < a.cnt->kqv0.size(); ++j) {
        l0.abs = std::max(l0.abs, (double) fabsf(a.cnt->kqv0[j] - b.cnt->kqv0[j]));
        l0.ref = std::max(l0.ref, (double) fabsf(b.cnt->kqv0[j]));
    }
}

static void acc(Diff & d, const std::vector<float> & a, const std::vector<float> & b) {
    for (int j = 0; j < n_vocab; ++j) {
        d.abs = std::max(d.abs, (double) fabsf(a[j] - b[j]));
        d.ref = std::max(d.ref, (double) fabsf(b[j]));
    }
}

// prompt in two parts with masks set in between, then greedy steps (tokens from b); returns diffs per phase
static void run_pair(Ctx & a, Ctx & b, int n1, int n_steps, bool masks, Diff & dp, Diff & dd, bool & same_tok, std::vector<float> * last_a = nullptr) {
    eval(a, 0, n1); eval(b, 0, n1);
    if (masks) { set_masks(a, n1); set_masks(b, n1); }
    const auto la = eval(a, n1, N), lb = eval(b, n1, N);
    acc(dp, la, lb);
    cmp_l0(a, b);
    llama_token t = argmax(lb);
    same_tok = argmax(la) == t;
    for (int s = 0; s < n_steps; ++s) {
        const auto xa = step(a, t, N + s), xb = step(b, t, N + s);
        acc(dd, xa, xb);
        cmp_l0(a, b);
        same_tok &= argmax(xa) == argmax(xb);
        t = argmax(xb);
        if (last_a) *last_a = xa;
    }
}

int main(int argc, char ** argv) {
    if (argc < 2) { fprintf(stderr, "usage: %s text.gguf [n_prompt] [bench_prompt] [bench_steps]\n", argv[0]); return 2; }
    if (argc > 2) N = atoi(argv[2]); // 0: speed only
    const int n_bench = argc > 3 ? atoi(argv[3]) : 2048;
    const int n_bsteps = argc > 4 ? atoi(argv[4]) : 64;
    llama_log_set([](ggml_log_level l, const char * t, void *) { if (l >= GGML_LOG_LEVEL_ERROR) fputs(t, stderr); }, nullptr);
    llama_backend_init();
    auto mp = llama_model_default_params();
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) { fprintf(stderr, "model load failed\n"); return 1; }
    n_layer = llama_model_n_layer(model);
    n_head = llama_model_n_head(model);
    const llama_vocab * vocab = llama_model_get_vocab(model);
    n_vocab = llama_vocab_n_tokens(vocab);
    printf("model: n_layer %d n_head %d n_head_kv %d; prompt %d (masks set after %d tokens), ubatch 128\n",
            n_layer, n_head, llama_model_n_head_kv(model), N, 2*N/3);
    std::string text;
    const int n_tok = std::max(N, n_bench) + n_bsteps + 40;
    while ((int) text.size() < 8*n_tok) text += "The quick brown fox jumps over the lazy dog while some heads look away. In 1905, 17 cats sat on 3 mats; why? ";
    toks.resize(text.size() + 8);
    int nt = llama_tokenize(vocab, text.c_str(), (int) text.size(), toks.data(), (int) toks.size(), true, false);
    if (nt < 0) { // a byte-level vocabulary (the random model of make_model.cpp) needs more room
        toks.resize(-nt);
        nt = llama_tokenize(vocab, text.c_str(), (int) text.size(), toks.data(), (int) toks.size(), true, false);
    }
    if (nt < n_tok) { fprintf(stderr, "tokenize gave %d tokens\n", nt); return 1; }
    toks.resize(nt);
    const int n1 = 2*N/3;

    if (N > 0) {
        // (0) drift inherent to flash vs non-flash attention, no masks (for scale)
        Ctx u1 = make_ctx(model, 1024, true, true), u2 = make_ctx(model, 1024, false, true);
        Diff dp, dd; bool st;
        l0 = Diff();
        run_pair(u1, u2, n1, 16, false, dp, dd, st);
        l0_fa_drift = l0.rel();
        printf("(0) no masks, FA on vs FA off (all layers): layer-0 attention output rel %.2e; logits: prompt rel %.2e, decode rel %.2e, tokens %s\n"
               "    [the scale of flash vs non-flash differences: CPU flash attention rounds Q to F16 and accumulates V in F16]\n",
                l0.rel(), dp.rel(), dd.rel(), st ? "same" : "differ");
        llama_free(u1.ctx); llama_free(u2.ctx);
    }
    if (N > 0) {
        // scale of the masks' effect on layer 0's attention output (FA on, masked vs unmasked)
        Ctx m = make_ctx(model, 1024, true, true), u = make_ctx(model, 1024, true, true);
        eval(m, 0, n1); eval(u, 0, n1);
        set_masks(m, n1);
        eval(m, n1, N); eval(u, n1, N);
        l0 = Diff();
        cmp_l0(m, u);
        l0_mask_effect = l0.rel();
        printf("    masks' effect on layer 0's attention output (masked vs unmasked, FA on): rel %.2e\n", l0_mask_effect);
        llama_free(m.ctx); llama_free(u.ctx);
    }
    // pass: the masked flash path is as close to the non-flash path as flash attention is without
    // masks (2x margin), and far below the masks' own effect
    auto l0_pass = [&](double r) { return r <= std::max(1e-3, 2.0*l0_fa_drift) && r <= 0.1*l0_mask_effect; };
    std::vector<float> last_masked;
    if (N > 0) {
        // (1) masked layers through FA (0007) vs through the kq_b path (0003), everything else equal
        Ctx x = make_ctx(model, 1024, true, true), y = make_ctx(model, 1024, true, false);
        Diff dp, dd; bool st;
        l0 = Diff();
        run_pair(x, y, n1, 16, true, dp, dd, st, &last_masked);
        const bool pass = l0_pass(l0.rel());
        printf("(1) masks on all layers: FA per-head mask (0007) vs kq_b non-FA path (0003):\n"
               "    layer-0 attention output (prompt part after the masks, T = %d, + 16 decode steps): rel %.2e (abs %.3g) %s\n"
               "    logits (30 layers of drift): prompt rel %.2e (abs %.3g), decode rel %.2e (abs %.3g), greedy tokens %s\n",
                N - n1, l0.rel(), l0.abs, pass ? "OK" : "FAIL", dp.rel(), dp.abs, dd.rel(), dd.abs, st ? "same" : "differ");
        ok &= pass;
        *x.cnt = Count(); *y.cnt = Count();
        step(x, 1, N + 16); step(y, 1, N + 16);
        printf("    one decode step, attention nodes: 0007 context %ld flash_attn_ext + %ld soft_max; 0003 path %ld flash_attn_ext + %ld soft_max\n",
                x.cnt->fa, x.cnt->softmax, y.cnt->fa, y.cnt->softmax);
        ok &= x.cnt->fa == n_layer && x.cnt->softmax == 0 && y.cnt->softmax == n_layer;

        // (2) after compaction of an evicted cache (masks moved, bias re-uploaded): same comparison
        llama_memory_t mx = llama_get_memory(x.ctx), my = llama_get_memory(y.ctx);
        for (int p = 10; p < N; p += 40) { llama_memory_seq_rm(mx, 0, p, p + 25); llama_memory_seq_rm(my, 0, p, p + 25); }
        set_mode(true);  const int nx = llama_memory_seq_compact(x.ctx, 0, nullptr);
        set_mode(false); const int ny = llama_memory_seq_compact(y.ctx, 0, nullptr);
        Diff d2; bool st2 = true;
        l0 = Diff();
        llama_token t = 1;
        for (int s = 0; s < 16; ++s) {
            const auto a = step(x, t, N + 17 + s), b = step(y, t, N + 17 + s);
            acc(d2, a, b);
            cmp_l0(x, y);
            st2 &= argmax(a) == argmax(b);
            t = argmax(b);
        }
        const bool pass2 = l0_pass(l0.rel()) && nx == ny && nx > 0;
        printf("(2) after eviction + llama_memory_seq_compact (%d cells; masks moved, bias re-uploaded), 16 decode steps:\n"
               "    layer-0 attention output rel %.2e (abs %.3g) %s; logits rel %.2e, greedy tokens %s\n",
                nx, l0.rel(), l0.abs, pass2 ? "OK" : "FAIL", d2.rel(), st2 ? "same" : "differ");
        ok &= pass2;
        llama_free(x.ctx); llama_free(y.ctx);
    }
    if (N > 0) {
        // (3) the masks act: masked FA vs unmasked FA must differ
        Ctx u = make_ctx(model, 1024, true, true), v = make_ctx(model, 1024, true, true);
        Diff dp, dd; bool st;
        std::vector<float> last_u;
        eval(u, 0, N);
        // v with masks, same flow as (1)
        eval(v, 0, n1); set_masks(v, n1); const auto lv = eval(v, n1, N);
        const auto lu = llama_get_logits_ith(u.ctx, -1);
        std::vector<float> luv(lu, lu + n_vocab);
        acc(dp, lv, luv);
        printf("(3) masked vs unmasked (both FA on): prompt logits differ by abs %.3g (rel %.2e) %s\n", dp.abs, dp.rel(), dp.rel() > 1e-2 ? "OK (masks act)" : "FAIL");
        ok &= dp.rel() > 1e-2;
        (void) dd; (void) st;
        llama_free(u.ctx); llama_free(v.ctx);
    }
    if (N > 0) {
        // (5) patch 0005's observer with the device-resident bias (a strided kq_b view): the sums at
        // cells hidden from every head of a layer must be 0, and visible cells must get mass
        Ctx c = make_ctx(model, 1024, true, true);
        eval(c, 0, n1);
        set_masks(c, n1);
        struct Obs { long hidden_nonzero = 0, visible_zero = 0, visible = 0, calls = 0; } o;
        std::vector<uint64_t> cols(N, 0);
        for (int p = n1; p < N; ++p) cols[p] = 1;
        const float nvar[1] = { 0.0f };
        const int32_t col_var[1] = { 0 };
        llama_attn_obs_params op = {};
        op.seq = 0; op.n_var = 1; op.n = nvar; op.n_cols = 1; op.col_var = col_var;
        op.n_pos = N; op.cols_of_pos = cols.data(); op.n_rows_chunk = 64; op.flags = 0;
        op.cb = [](void * ud, const llama_attn_obs_result * r) -> bool {
            auto * o = (Obs *) ud;
            o->calls++;
            for (int h = 0; h < r->n_head_kv; ++h) {
                const float * row = r->sums + (size_t) h*r->n_cols*r->n_kv;
                for (int j = 0; j < r->n_kv; ++j) {
                    const llama_pos p = r->cell_pos[j];
                    if (p < 1 || p >= (llama_pos) (2*N/3)) continue;
                    const bool all_hidden = (p + r->il) % 5 != 0 && (p*7 + r->il) % 23 == 0;
                    if (all_hidden) o->hidden_nonzero += row[j] != 0.0f;
                    else if ((p + r->il) % 5 != 0) { o->visible++; o->visible_zero += row[j] == 0.0f; }
                }
            }
            return true;
        };
        op.user_data = &o;
        if (!llama_set_attn_observer(c.ctx, &op)) { fprintf(stderr, "observer failed\n"); exit(1); }
        eval(c, n1, N);
        llama_set_attn_observer(c.ctx, nullptr);
        const bool pass = o.calls > 0 && o.hidden_nonzero == 0 && o.visible_zero == 0;
        printf("(5) observer (0005) with masks as a device view: %ld callbacks, nonzero sums at fully hidden cells %ld, zero sums at visible cells %ld of %ld %s\n",
                o.calls, o.hidden_nonzero, o.visible_zero, o.visible, pass ? "OK" : "FAIL");
        ok &= pass;
        llama_free(c.ctx);
    }
    if (n_bench > 0) {
        // (4) decode speed with masks on every layer, cache of n_bench cells
        printf("(4) decode speed, %d-token prompt, masks on all %d layers, %d steps, 1 thread:\n", n_bench, n_layer, n_bsteps);
        const int n_ctx = ((n_bench + n_bsteps + 255)/256)*256;
        struct Mode { const char * name; bool fa; bool mask_fa; bool masks; };
        const Mode modes[] = {
            { "FA on, masked layers via FA (0007)",          true,  true,  true  },
            { "FA on, masked layers via kq_b non-FA (0003)", true,  false, true  },
            { "FA off (all layers non-FA, kq_b)",            false, true,  true  },
            { "FA on, no masks (reference)",                 true,  true,  false },
        };
        // one thread for the timed steps (on a shared 2-core machine two spinning threads are at the
        // mercy of other processes); each mode twice, interleaved, best of the two
        double best[4] = { 1e30, 1e30, 1e30, 1e30 };
        for (int rep = 0; rep < 2; ++rep)
        for (int mi = 0; mi < 4; ++mi) {
            const Mode & m = modes[mi];
            Ctx c = make_ctx(model, n_ctx, m.fa, m.mask_fa, 512, /*cb*/ false);
            const int save_N = N; N = n_bench;
            eval(c, 0, n_bench);
            N = save_N;
            if (m.masks) set_masks(c, n_bench);
            llama_token t = 1;
            step(c, t, n_bench); // warm-up (graph build, bias upload)
            llama_set_n_threads(c.ctx, 1, 1);
            const double t0 = now_ms();
            for (int s = 1; s <= n_bsteps; ++s) {
                const auto l = step(c, t, n_bench + s);
                t = argmax(l);
            }
            const double dt = now_ms() - t0;
            best[mi] = std::min(best[mi], dt);
            if (rep == 1) {
                printf("    %-46s %7.2f tok/s (%.2f ms/token, best of 2)\n", m.name, n_bsteps*1000.0/best[mi], best[mi]/n_bsteps);
            }
            llama_free(c.ctx);
        }
    }
    printf("%s\n", ok ? "ALL OK" : "SOME CHECKS FAILED");
    llama_model_free(model);
    return ok ? 0 : 1;
}
