// Check of patch 0005 (in-graph attention observer) against a double-precision reference computed
// from the host `kq-<il>` logits (cb_eval, flash attention off), plus logits identity on/off,
// flash attention on vs off, and the OUT_PROD vs transpose reductions.
//
//   obs_check <text.gguf> [n_prompt=280] [window=40] [n_ubatch=128]
#include "llama.h"
#include "ggml.h"
#include "ggml-backend.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

static int N = 280, W = 40, NUB = 128;
static int n_layer, n_head, n_head_kv, g, n_vocab;
static float kq_scale;
static const int n_cols = 4; // 0: CSP window text rows, 1: CSP window media rows (n=1); 2,3: H2O all rows (n=0)
static const int col_var[n_cols] = { 0, 0, 1, 1 };
static const float nvar[2] = { 1.0f, 0.0f };
static std::vector<uint64_t> cols_of_pos;

static bool is_media(int p) { return p >= 50 && p < 150; }

// sums[il][kvh][col][key position]
struct Sums {
    std::vector<double> v;
    double junk = 0; // largest |sum| at cells outside the sequence
    long calls = 0;
    long rows[2] = {0, 0};
    void init() { v.assign((size_t) n_layer*n_head_kv*n_cols*N, 0.0); junk = 0; calls = 0; rows[0] = rows[1] = 0; }
    double & at(int il, int h, int c, int p) { return v[((size_t) (il*n_head_kv + h)*n_cols + c)*N + p]; }
};

static bool obs_cb(void * ud, const llama_attn_obs_result * r) {
    auto * s = (Sums *) ud;
    s->calls++;
    if (r->il == 0) s->rows[r->var] += r->n_rows;
    for (int h = 0; h < r->n_head_kv; ++h) {
        for (int lc = 0; lc < r->n_cols; ++lc) {
            const float * row = r->sums + ((size_t) h*r->n_cols + lc)*r->n_kv;
            for (int j = 0; j < r->n_kv; ++j) {
                const llama_pos p = r->cell_pos[j];
                if (p < 0 || p >= N) { s->junk = std::max(s->junk, (double) fabsf(row[j])); continue; }
                s->at(r->il, h, r->cols[lc], p) += row[j];
            }
        }
    }
    return true;
}

// host reference from kq-<il> (flash attention off)
struct Ref {
    Sums s;
    int ubatch = -1;
    int start = 0;
    std::vector<float> kq;
};

static bool eval_cb(ggml_tensor * t, bool ask, void * ud) {
    auto * R = (Ref *) ud;
    const char * name = t->name;
    if (strncmp(name, "kq-", 3) != 0 || t->op != GGML_OP_MUL_MAT) return ask ? false : true;
    for (const char * c = name + 3; *c; ++c) if (*c < '0' || *c > '9') return ask ? false : true;
    if (ask) return true;
    const int il = atoi(name + 3);
    const int n_kv = t->ne[0], T = t->ne[1], H = t->ne[2];
    if (il == 0) { R->ubatch++; }
    R->start = R->ubatch*NUB;
    if (T > 1 && T != std::min(NUB, N - R->start)) { fprintf(stderr, "unexpected ubatch size %d\n", T); exit(1); }
    if (T == 1) return true; // decode step
    R->kq.resize(ggml_nelements(t));
    ggml_backend_tensor_get(t, R->kq.data(), 0, ggml_nbytes(t));
    std::vector<double> e(n_kv);
    for (int h = 0; h < H; ++h) {
        for (int i = 0; i < T; ++i) {
            const int p = R->start + i;
            const uint64_t bits = cols_of_pos[p];
            if (!bits) continue;
            const float * x = R->kq.data() + (size_t) n_kv*(i + (size_t) T*h);
            // fresh cache, one sequence: cell j holds position j
            double m = -INFINITY;
            for (int j = 0; j <= p; ++j) m = std::max(m, (double) x[j]*kq_scale);
            double z = 0;
            for (int j = 0; j <= p; ++j) { e[j] = exp((double) x[j]*kq_scale - m); z += e[j]; }
            for (int v = 0; v < 2; ++v) {
                const double Z = z + nvar[v]*exp(-m);
                for (int c = 0; c < n_cols; ++c) {
                    if (col_var[c] != v || !(bits >> c & 1)) continue;
                    for (int j = 0; j <= p; ++j) R->s.at(il, h/g, c, j) += e[j]/Z/g;
                }
            }
        }
    }
    return true;
}

// reference from the RoPE'd Qcur/Kcur captured in a flash-attention run (rounded to F16 like the
// K cache and the F16 mul_mat): p = n-softmax(scale * q.k) over keys at positions <= row's
struct QKRef {
    Sums s;
    int ubatch = -1;
    std::vector<std::vector<float>> K; // [il][pos][kvh][d], F16-rounded
    std::vector<float> q;              // current layer's Q [T][H][d]
    int q_il = -1, T = 0, d = 0;
};

static float f16r(float x) { return ggml_fp16_to_fp32(ggml_fp32_to_fp16(x)); }

static bool qk_cb(ggml_tensor * t, bool ask, void * ud) {
    auto * R = (QKRef *) ud;
    const bool isq = strncmp(t->name, "Qcur-", 5) == 0, isk = strncmp(t->name, "Kcur-", 5) == 0;
    if (!(isq || isk) || t->op != GGML_OP_ROPE) return ask ? false : true;
    if (ask) return true;
    const int il = atoi(t->name + 5);
    const int d = t->ne[0], Hx = t->ne[1], T = t->ne[2];
    if (T == 1) return true; // decode
    std::vector<float> buf(ggml_nelements(t));
    if (!ggml_is_contiguous(t)) { fprintf(stderr, "non-contiguous %s\n", t->name); exit(1); }
    ggml_backend_tensor_get(t, buf.data(), 0, ggml_nbytes(t));
    if (isq && il == 0) R->ubatch++;
    const int start = R->ubatch*NUB;
    if (R->K.empty()) R->K.assign(n_layer, std::vector<float>((size_t) N*n_head_kv*d, 0.0f));
    if (isq) { R->q = buf; R->q_il = il; R->T = T; R->d = d; return true; }
    for (int i = 0; i < T; ++i) for (int h = 0; h < Hx; ++h) for (int e = 0; e < d; ++e)
        R->K[il][((size_t) (start + i)*n_head_kv + h)*d + e] = f16r(buf[((size_t) i*Hx + h)*d + e]);
    if (R->q_il != il) { fprintf(stderr, "Q of layer %d not seen before K\n", il); exit(1); }
    std::vector<double> x(N), e(N);
    for (int h = 0; h < n_head; ++h) for (int i = 0; i < T; ++i) {
        const int p = start + i;
        const uint64_t bits = cols_of_pos[p];
        if (!bits) continue;
        const float * q = R->q.data() + ((size_t) i*n_head + h)*d;
        double m = -INFINITY;
        for (int j = 0; j <= p; ++j) {
            const float * k = R->K[il].data() + ((size_t) j*n_head_kv + h/g)*d;
            double acc = 0;
            for (int c = 0; c < d; ++c) acc += (double) f16r(q[c])*k[c];
            x[j] = acc*kq_scale; m = std::max(m, x[j]);
        }
        double z = 0;
        for (int j = 0; j <= p; ++j) { e[j] = exp(x[j] - m); z += e[j]; }
        for (int v = 0; v < 2; ++v) {
            const double Z = z + nvar[v]*exp(-m);
            for (int c = 0; c < n_cols; ++c) {
                if (col_var[c] != v || !(bits >> c & 1)) continue;
                for (int j = 0; j <= p; ++j) R->s.at(il, h/g, c, j) += e[j]/Z/g;
            }
        }
    }
    return true;
}

struct Run {
    Sums obs;
    std::vector<std::vector<float>> logits; // prompt last row, then each decode step
};

static void run(llama_model * model, const std::vector<llama_token> & toks, bool fa, bool observe, uint32_t flags,
        Ref * ref, Run & out, int n_decode, QKRef * qkref = nullptr,
        const std::vector<uint64_t> * table = nullptr, bool off_after_prompt = false) {
    auto cp = llama_context_default_params();
    cp.n_ctx = 1024;
    cp.n_batch = 512;
    cp.n_ubatch = NUB;
    cp.n_threads = cp.n_threads_batch = 2;
    cp.flash_attn_type = fa ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
    cp.no_perf = true;
    if (ref) { cp.cb_eval = eval_cb; cp.cb_eval_user_data = ref; }
    if (qkref) { cp.cb_eval = qk_cb; cp.cb_eval_user_data = qkref; }
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "context failed\n"); exit(1); }
    if (llama_flash_attn_enabled(ctx) != fa) { fprintf(stderr, "flash attention did not resolve to %d\n", fa); exit(1); }
    out.obs.init();
    if (observe) {
        llama_attn_obs_params p = {};
        p.seq = 0; p.n_var = 2; p.n = nvar; p.n_cols = n_cols; p.col_var = col_var;
        if (!table) table = &cols_of_pos;
        p.n_pos = (int32_t) table->size(); p.cols_of_pos = table->data();
        p.n_rows_chunk = 48; // several chunks per ubatch
        p.flags = flags; p.cb = obs_cb; p.user_data = &out.obs;
        if (!llama_set_attn_observer(ctx, &p)) { fprintf(stderr, "set observer failed\n"); exit(1); }
    }
    llama_batch b = llama_batch_init(N, 0, 1);
    for (int i = 0; i < N; ++i) {
        b.token[i] = toks[i]; b.pos[i] = i; b.n_seq_id[i] = 1; b.seq_id[i][0] = 0; b.logits[i] = i == N - 1;
    }
    b.n_tokens = N;
    if (llama_decode(ctx, b)) { fprintf(stderr, "decode failed\n"); exit(1); }
    llama_batch_free(b);
    const float * lg = llama_get_logits_ith(ctx, -1);
    out.logits.emplace_back(lg, lg + n_vocab);
    if (off_after_prompt) llama_set_attn_observer(ctx, nullptr);
    for (int s = 0; s < n_decode; ++s) {
        const auto & last = out.logits.back();
        llama_token t = 0;
        for (int j = 1; j < n_vocab; ++j) if (last[j] > last[t]) t = j;
        llama_batch one = llama_batch_init(1, 0, 1);
        one.token[0] = t; one.pos[0] = N + s; one.n_seq_id[0] = 1; one.seq_id[0][0] = 0; one.logits[0] = 1; one.n_tokens = 1;
        if (llama_decode(ctx, one)) { fprintf(stderr, "decode step failed\n"); exit(1); }
        llama_batch_free(one);
        lg = llama_get_logits_ith(ctx, -1);
        out.logits.emplace_back(lg, lg + n_vocab);
    }
    llama_free(ctx);
}

static double max_err(Sums & a, Sums & b, int il_only = -1, double * max_val = nullptr) {
    double e = 0, mv = 0;
    for (int il = 0; il < n_layer; ++il) {
        if (il_only >= 0 && il != il_only) continue;
        for (int h = 0; h < n_head_kv; ++h) for (int c = 0; c < n_cols; ++c) for (int p = 0; p < N; ++p) {
            e = std::max(e, fabs(a.at(il, h, c, p) - b.at(il, h, c, p)));
            mv = std::max(mv, fabs(b.at(il, h, c, p)));
        }
    }
    if (max_val) *max_val = mv;
    return e;
}

static bool same_logits(const Run & a, const Run & b) {
    if (a.logits.size() != b.logits.size()) return false;
    for (size_t i = 0; i < a.logits.size(); ++i) {
        if (memcmp(a.logits[i].data(), b.logits[i].data(), n_vocab*sizeof(float)) != 0) {
            double d = 0;
            for (int j = 0; j < n_vocab; ++j) d = std::max(d, (double) fabsf(a.logits[i][j] - b.logits[i][j]));
            printf("  logits step %zu differ (max abs %.3g)\n", i, d);
            return false;
        }
    }
    return true;
}

int main(int argc, char ** argv) {
    if (argc < 2) { fprintf(stderr, "usage: %s text.gguf [n_prompt] [window] [n_ubatch]\n", argv[0]); return 2; }
    if (argc > 2) N = atoi(argv[2]);
    if (argc > 3) W = atoi(argv[3]);
    if (argc > 4) NUB = atoi(argv[4]);
    llama_log_set([](ggml_log_level l, const char * t, void *) { if (l >= GGML_LOG_LEVEL_ERROR) fputs(t, stderr); }, nullptr);
    llama_backend_init();
    auto mp = llama_model_default_params();
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) { fprintf(stderr, "model load failed\n"); return 1; }
    n_layer = llama_model_n_layer(model);
    n_head = llama_model_n_head(model);
    n_head_kv = llama_model_n_head_kv(model);
    g = n_head/n_head_kv;
    kq_scale = 1.0f/sqrtf((float) (llama_model_n_embd(model)/n_head));
    const llama_vocab * vocab = llama_model_get_vocab(model);
    n_vocab = llama_vocab_n_tokens(vocab);
    printf("model: n_layer %d n_head %d n_head_kv %d (g %d) head_dim %d; prompt %d, window %d, n_ubatch %d\n",
            n_layer, n_head, n_head_kv, g, llama_model_n_embd(model)/n_head, N, W, NUB);

    std::string text;
    while ((int) text.size() < 8*N) text += "The quick brown fox jumps over the lazy dog while the observer counts attention. In 1905, 17 cats sat on 3 mats; why? ";
    std::vector<llama_token> toks(text.size() + 8);
    int nt = llama_tokenize(vocab, text.c_str(), (int) text.size(), toks.data(), (int) toks.size(), true, false);
    if (nt < 0) { // a byte-level vocabulary (the random model of make_model.cpp) needs more room
        toks.resize(-nt);
        nt = llama_tokenize(vocab, text.c_str(), (int) text.size(), toks.data(), (int) toks.size(), true, false);
    }
    if (nt < N) { fprintf(stderr, "tokenize gave %d tokens\n", nt); return 1; }
    toks.resize(N);

    cols_of_pos.assign(N, 0);
    for (int p = 0; p < N; ++p) {
        const int m = is_media(p) ? 1 : 0;
        if (p >= N - W) cols_of_pos[p] |= 1ull << (0 + m);
        cols_of_pos[p] |= 1ull << (2 + m);
    }
    const int n_decode = 8;
    bool ok = true;

    Ref ref; ref.s.init();
    QKRef qkref; qkref.s.init();
    Run A, B, C, D, E, F;
    run(model, toks, /*fa*/false, true, 0, &ref, A, n_decode);                              // FA off + host reference
    run(model, toks, /*fa*/true,  true, 0, nullptr, B, n_decode);                           // FA on, OUT_PROD
    run(model, toks, /*fa*/true,  false, 0, nullptr, C, n_decode);                          // FA on, observer off
    run(model, toks, /*fa*/true,  true, LLAMA_ATTN_OBS_FORCE_TRANSPOSE, nullptr, D, n_decode); // FA on, transpose
    run(model, toks, /*fa*/false, false, 0, nullptr, E, n_decode);                          // FA off, observer off
    run(model, toks, /*fa*/true,  true, 0, nullptr, F, 0, &qkref);                          // FA on + Q/K capture

    printf("callbacks per run: %ld (expected %d layers x (ubatches with rows per variant)); rows seen at layer 0: var0 %ld (expect %d), var1 %ld (expect %d)\n",
            B.obs.calls, n_layer, B.obs.rows[0], W, B.obs.rows[1], N);
    ok &= B.obs.rows[0] == W && B.obs.rows[1] == N && A.obs.rows[0] == W && A.obs.rows[1] == N;

    double mv;
    const double e1 = max_err(A.obs, ref.s, -1, &mv);
    printf("(1) in-graph (FA off) vs f64 reference from kq (same run): max abs err %.3g (max value %.3g) %s\n", e1, mv, e1 <= 1e-4 ? "OK" : "FAIL");
    ok &= e1 <= 1e-4;
    const double e2_0 = max_err(B.obs, ref.s, 0);
    const double e2 = max_err(B.obs, ref.s);
    printf("(2) in-graph (FA on) vs f64 reference (FA off run): layer 0 max abs err %.3g %s; all layers %.3g (includes FA-vs-non-FA drift of hidden states)\n",
            e2_0, e2_0 <= 1e-4 ? "OK" : "FAIL", e2);
    ok &= e2_0 <= 1e-4;
    {
        double dl = 0;
        for (int j = 0; j < n_vocab; ++j) dl = std::max(dl, (double) fabsf(C.logits[0][j] - E.logits[0][j]));
        printf("    (FA on vs FA off, observer off: prompt logits differ by up to %.3g: hidden states drift)\n", dl);
    }
    const double e4 = max_err(F.obs, qkref.s, -1, &mv);
    printf("(2') in-graph (FA on) vs f64 reference from the same run's captured Qcur/Kcur (F16-rounded), all layers: max abs err %.3g (max value %.3g) %s\n",
            e4, mv, e4 <= 1e-4 ? "OK" : "FAIL");
    ok &= e4 <= 1e-4;
    const double e5 = max_err(F.obs, B.obs);
    printf("     same run without cb_eval (B) vs with (F): max abs diff %.3g\n", e5);
    const double e3 = max_err(D.obs, B.obs, -1, &mv);
    printf("(3) transpose fallback vs OUT_PROD (FA on): max abs err %.3g, relative to max value %.3g: %.3g %s\n", e3, mv, e3/mv, e3/mv <= 1e-6 ? "OK" : "FAIL");
    ok &= e3/mv <= 1e-6;
    printf("    cells outside the sequence: max |sum| %.3g (A) %.3g (B) %.3g (D)\n", A.obs.junk, B.obs.junk, D.obs.junk);
    ok &= A.obs.junk == 0 && B.obs.junk == 0 && D.obs.junk == 0;
    const bool l1 = same_logits(B, C);
    printf("(4) logits observer on vs off, FA on (prompt + %d greedy decode steps): %s\n", n_decode, l1 ? "IDENTICAL" : "DIFFER");
    const bool l2 = same_logits(D, C);
    printf("    transpose fallback on vs off, FA on: %s\n", l2 ? "IDENTICAL" : "DIFFER");
    const bool l3 = same_logits(A, E);
    printf("    observer + cb_eval on vs both off, FA off: %s\n", l3 ? "IDENTICAL" : "DIFFER");
    ok &= l1 && l2 && l3;
    {
        // (5) graph reuse: observer switched off after an observed prompt; decode rows observed (R = 1)
        Run G, Hh;
        std::vector<uint64_t> tab = cols_of_pos;
        for (int s = 0; s < n_decode; ++s) tab.push_back(1ull << 2); // H2O text column for decode rows
        run(model, toks, true, true, 0, nullptr, G, n_decode, nullptr, &tab);
        run(model, toks, true, true, 0, nullptr, Hh, n_decode, nullptr, nullptr, true);
        const bool lg = same_logits(G, C), lh = same_logits(Hh, C);
        const long exp_calls = B.obs.calls + (long) n_decode*n_layer;
        printf("(5) decode rows observed (R = 1 per step): callbacks %ld (expect %ld), var1 rows at layer 0 %ld (expect %d), logits %s;\n"
               "    observer off after the prompt: callbacks %ld (expect %ld), logits %s\n",
               G.obs.calls, exp_calls, G.obs.rows[1], N + n_decode, lg ? "IDENTICAL" : "DIFFER",
               Hh.obs.calls, B.obs.calls, lh ? "IDENTICAL" : "DIFFER");
        ok &= lg && lh && G.obs.calls == exp_calls && G.obs.rows[1] == N + n_decode && Hh.obs.calls == B.obs.calls;
        const double e6 = max_err(Hh.obs, B.obs);
        ok &= e6 == 0;
    }
    printf("%s\n", ok ? "ALL OK" : "SOME CHECKS FAILED");
    llama_model_free(model);
    return ok ? 0 : 1;
}
