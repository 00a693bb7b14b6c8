// Check of patch 0005 (in-graph attention observer) against a double-precision reference computed
// from the host `kq-<il>` logits (cb_eval, flash attention off), plus logits identity on/off,
// flash attention on vs off, and the OUT_PROD vs transpose reductions; with patch 0008, AirCache's
// elite observation window (elite variants) against an f64 implementation of its two steps.
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
    // elite variants (patch 0008): per (layer, variant < 2) the elite set by position and the
    // callback's n_elite_rows / n_rows; `elite_null` counts elite variants called without a set
    std::vector<int8_t> eset;
    std::vector<int> n_elite_rows, n_rows;
    long elite_null = 0, elite_calls = 0;
    void init() {
        v.assign((size_t) n_layer*n_head_kv*n_cols*N, 0.0); junk = 0; calls = 0; rows[0] = rows[1] = 0;
        eset.assign((size_t) n_layer*2*N, 0); n_elite_rows.assign(n_layer*2, -1); n_rows.assign(n_layer*2, -1);
        elite_null = elite_calls = 0;
    }
    double & at(int il, int h, int c, int p) { return v[((size_t) (il*n_head_kv + h)*n_cols + c)*N + p]; }
};

static bool elite_var[3] = { false, false, false }; // which variants of the current run are elite

static bool obs_cb(void * ud, const llama_attn_obs_result * r) {
    auto * s = (Sums *) ud;
    s->calls++;
    if (r->il == 0 && r->var < 2) s->rows[r->var] += r->n_rows;
#ifdef LLAMA_ATTN_OBS_KEY_TEXT
    if (elite_var[r->var]) {
        s->elite_calls++;
        if (!r->elite) { s->elite_null++; }
        else {
            for (int j = 0; j < r->n_kv; ++j) {
                const llama_pos p = r->cell_pos[j];
                if (p >= 0 && p < N && r->elite[j] != 0.0f) s->eset[((size_t) r->il*2 + r->var)*N + p] = r->elite[j] == 1.0f ? 1 : 2;
            }
        }
        s->n_elite_rows[r->il*2 + r->var] = r->n_elite_rows;
        s->n_rows[r->il*2 + r->var] = r->n_rows;
    } else if (r->elite || r->n_elite_rows) {
        s->elite_null = -1000000; // a plain variant got elite data
    }
#endif
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
    if (R->start >= N) return true; // decode step
    if (T != std::min(NUB, N - R->start)) { fprintf(stderr, "unexpected ubatch size %d\n", T); exit(1); }
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

static bool is_qk(const ggml_tensor * t) {
    return (strncmp(t->name, "Qcur-", 5) == 0 || strncmp(t->name, "Kcur-", 5) == 0) && t->op == GGML_OP_ROPE;
}

// One RoPE'd Qcur-<il>/Kcur-<il> of a prompt ubatch, copied to the host. The callbacks count
// ubatches at Qcur-0; false (nothing read) for a decode step (a prompt's last ubatch may have
// one row, so rows alone do not tell).
struct QkSeen { bool isq; int il, d, Hx, T, start; std::vector<float> buf; };

static bool qk_read(ggml_tensor * t, int & ubatch, QkSeen & s) {
    s.isq = strncmp(t->name, "Qcur-", 5) == 0;
    s.il = atoi(t->name + 5);
    s.d = t->ne[0]; s.Hx = t->ne[1]; s.T = t->ne[2];
    if (s.isq && s.il == 0) ubatch++;
    s.start = ubatch*NUB;
    if (s.start >= N) return false;
    if (!ggml_is_contiguous(t)) { fprintf(stderr, "non-contiguous %s\n", t->name); exit(1); }
    s.buf.resize(ggml_nelements(t));
    ggml_backend_tensor_get(t, s.buf.data(), 0, ggml_nbytes(t));
    return true;
}

static bool qk_cb(ggml_tensor * t, bool ask, void * ud) {
    auto * R = (QKRef *) ud;
    if (ask) return is_qk(t);
    QkSeen s;
    if (!is_qk(t) || !qk_read(t, R->ubatch, s)) return true;
    const bool isq = s.isq;
    const int il = s.il, d = s.d, Hx = s.Hx, T = s.T, start = s.start;
    const std::vector<float> & buf = s.buf;
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

#ifdef LLAMA_ATTN_OBS_KEY_TEXT
// ---- AirCache's elite window (patch 0008) ----
// every layer's RoPE'd Q and K at every prompt position (K and Q F16-rounded as the observer sees them)
struct QKAll {
    int ubatch = -1, d = 0;
    std::vector<std::vector<float>> Q, K; // [il][pos][head][d]
};

static bool qkall_cb(ggml_tensor * t, bool ask, void * ud) {
    auto * R = (QKAll *) ud;
    if (ask) return is_qk(t);
    QkSeen s;
    if (!is_qk(t) || !qk_read(t, R->ubatch, s)) return true;
    const bool isq = s.isq;
    const int il = s.il, d = s.d, Hx = s.Hx, T = s.T, start = s.start;
    const std::vector<float> & buf = s.buf;
    if (R->Q.empty()) { R->d = d; R->Q.assign(n_layer, std::vector<float>((size_t) N*n_head*d)); R->K.assign(n_layer, std::vector<float>((size_t) N*n_head_kv*d)); }
    auto & dst = isq ? R->Q[il] : R->K[il];
    for (int i = 0; i < T; ++i) for (int h = 0; h < Hx; ++h) for (int e = 0; e < d; ++e)
        dst[((size_t) (start + i)*Hx + h)*d + e] = f16r(buf[((size_t) i*Hx + h)*d + e]);
    return true;
}

// f64 implementation of the two steps (src/stats/elite.rs): key classes kop (bit 0 text, bit 1
// eligible), candidate rows = text rows of [ub0, last] (the anchor's ubatch); fresh cache: cell = position.
struct EliteRef {
    std::vector<double> s;          // [il][kvh][pos]
    std::vector<int8_t> eset;       // [il][pos]
    std::vector<int>    n_obs;      // [il] observed elite rows
    double min_margin = 1e300;      // min over layers and eligible keys but the top one of |att - alpha*top| / top
};

static EliteRef elite_reference(const QKAll & A, const std::vector<uint8_t> & kop, float alpha, int last, int ub0) {
    EliteRef R;
    R.s.assign((size_t) n_layer*n_head_kv*N, 0.0);
    R.eset.assign((size_t) n_layer*N, 0);
    R.n_obs.assign(n_layer, 0);
    const int d = A.d;
    auto text = [&](int u) { return (kop[u] & 1) != 0; };
    for (int il = 0; il < n_layer; ++il) {
        auto logit = [&](int r, int h, int u) {
            const float * q = A.Q[il].data() + ((size_t) r*n_head + h)*d;
            const float * k = A.K[il].data() + ((size_t) u*n_head_kv + h/g)*d;
            double acc = 0;
            for (int c = 0; c < d; ++c) acc += (double) q[c]*k[c];
            return acc*kq_scale;
        };
        // 1. the anchor over text keys <= last, per head, mean over heads
        std::vector<double> att(N, 0.0), x(N), e(N);
        for (int h = 0; h < n_head; ++h) {
            double m = -INFINITY;
            for (int u = 0; u <= last; ++u) if (text(u)) { x[u] = logit(last, h, u); m = std::max(m, x[u]); }
            double z = 0;
            for (int u = 0; u <= last; ++u) if (text(u)) { e[u] = exp(x[u] - m); z += e[u]; }
            for (int u = 0; u <= last; ++u) if (text(u)) att[u] += e[u]/z/n_head;
        }
        auto elig = [&](int u) { return u <= last && text(u) && (kop[u] & 2); };
        double top = 0;
        int arg = -1;
        for (int u = 0; u <= last; ++u) if (elig(u) && (arg < 0 || att[u] > top)) { top = att[u]; arg = u; }
        std::vector<char> el(N, 0);
        for (int u = 0; u <= last; ++u) if (elig(u)) {
            if (att[u] >= alpha*top) el[u] = 1;
            if (top > 0 && u != arg) R.min_margin = std::min(R.min_margin, fabs(att[u] - alpha*top)/top);
        }
        el[last] = 1;
        for (int u = 0; u < N; ++u) R.eset[(size_t) il*N + u] = el[u];
        // 2. elite rows of the anchor's ubatch over media + elite text keys
        std::vector<int> rows;
        for (int r = ub0; r <= last; ++r) if (el[r]) rows.push_back(r); // eligible text rows and the anchor
        R.n_obs[il] = (int) rows.size();
        for (int h = 0; h < n_head; ++h) {
            for (int r : rows) {
                double m = -INFINITY;
                for (int u = 0; u <= r; ++u) if (!text(u) || el[u]) { x[u] = logit(r, h, u); m = std::max(m, x[u]); }
                double z = 0;
                for (int u = 0; u <= r; ++u) if (!text(u) || el[u]) { e[u] = exp(x[u] - m); z += e[u]; }
                for (int u = 0; u <= r; ++u) if (!text(u)) R.s[((size_t) il*n_head_kv + h/g)*N + u] += e[u]/z;
            }
        }
        const double w = 1.0/(std::max<size_t>(rows.size(), 1)*g);
        for (int h = 0; h < n_head_kv; ++h) for (int u = 0; u < N; ++u) R.s[((size_t) il*n_head_kv + h)*N + u] *= w;
    }
    return R;
}
#endif

#ifdef LLAMA_ATTN_OBS_KEY_TEXT
static QKAll * g_qkall = nullptr; // capture Q/K of every layer in run()
#endif

struct Run {
    Sums obs;
    std::vector<std::vector<float>> logits; // prompt last row, then each decode step
};

static void run(llama_model * model, const std::vector<llama_token> & toks, bool fa, bool observe, uint32_t flags,
        Ref * ref, Run & out, int n_decode, QKRef * qkref = nullptr,
        const std::vector<uint64_t> * table = nullptr, bool off_after_prompt = false,
        const llama_attn_obs_params * custom = nullptr) {
    auto cp = llama_context_default_params();
    cp.n_ctx = 1024;
    cp.n_batch = 512;
    cp.n_ubatch = NUB;
    cp.n_threads = cp.n_threads_batch = 2;
    cp.flash_attn_type = fa ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
    cp.no_perf = true;
    if (ref) { cp.cb_eval = eval_cb; cp.cb_eval_user_data = ref; }
#ifdef LLAMA_ATTN_OBS_KEY_TEXT
    if (g_qkall) { cp.cb_eval = qkall_cb; cp.cb_eval_user_data = g_qkall; }
#endif
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
        if (custom) { p = *custom; p.flags = flags; p.cb = obs_cb; p.user_data = &out.obs; }
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

#ifdef LLAMA_ATTN_OBS_KEY_TEXT
// (6) AirCache's elite window (patch 0008): two elite variants (alpha 0.3 and 1.0, one column each)
// next to an H2O all-rows variant, four key tables (below); the prompt's last ubatch holds text rows on
// both sides of a second media run.
static bool elite_checks(llama_model * model, const std::vector<llama_token> & toks, Run & B, const Run & C,
        const Run & E, int n_decode) {
    bool ok = true;
    const int last = N - 1, ub0 = (last/NUB)*NUB;
    bool media_anchor = false; // the last configuration ends the prompt with a media token
    auto media = [&](int p) { return is_media(p) || (p >= N - 22 && p < N - 14 && p >= ub0 + 2) || (media_anchor && p == last); };
    int n_cand = 0, n_media_last_ub = 0;
    for (int p = ub0; p <= last; ++p) { n_cand += !media(p); n_media_last_ub += media(p); }
    static const float   alphas[2] = { 0.3f, 1.0f };
    static const float   n3[3]     = { 0.0f, 0.0f, 0.0f };
    static const int32_t cv[4]     = { 0, 1, 2, 2 };
    std::vector<uint64_t> cop(N, 0);
    auto fill_cop = [&] {
        cop.assign(N, 0);
        n_cand = 0;
        for (int p = 0; p < N; ++p) {
            if ((!media(p) || p == last) && p <= last) cop[p] |= 3ull; // elite candidates: text rows <= last, the anchor
            cop[p] |= 1ull << (2 + (is_media(p) ? 1 : 0));             // H2O all rows, as in run B's columns 2, 3
            n_cand += p >= ub0 && p <= last && (!media(p) || p == last);
        }
    };
    fill_cop();
    printf("(6) elite window: anchor %d, its ubatch [%d, %d]: %d text rows (candidates), %d media rows; media keys %d\n",
            last, ub0, last, n_cand, n_media_last_ub, (int) [&] { int c = 0; for (int p = 0; p < N; ++p) c += media(p); return c; }());
    // keep_sink off, on, on with every third text key not eligible (the host's table decides), and
    // off with the prompt ending on a media token (the anchor is then a media key and an elite row)
    for (int keep_sink = 0; keep_sink < 4; ++keep_sink) {
        media_anchor = keep_sink == 3;
        fill_cop();
        std::vector<uint8_t> kop(N);
        for (int p = 0; p < N; ++p) {
            const bool eligible = (p != 0 || (keep_sink == 1 || keep_sink == 2)) && !(keep_sink == 2 && p % 3 == 1);
            kop[p] = media(p) ? 0 : (uint8_t) (LLAMA_ATTN_OBS_KEY_TEXT | (eligible ? LLAMA_ATTN_OBS_KEY_ELIGIBLE : 0));
        }
        const float alpha3[3] = { alphas[0], alphas[1], 0.0f };
        llama_attn_obs_params P = {};
        P.seq = 0; P.n_var = 3; P.n = n3; P.n_cols = 4; P.col_var = cv;
        P.n_pos = N; P.cols_of_pos = cop.data(); P.n_rows_chunk = getenv("OBS_CHECK_ELITE_CHUNK") ? atoi(getenv("OBS_CHECK_ELITE_CHUNK")) : 6; // several chunks in the anchor's ubatch
        P.var_elite_alpha = alpha3; P.key_of_pos = kop.data(); P.elite_last = last;
        elite_var[0] = elite_var[1] = true; elite_var[2] = false;

        Run X1, X2, X3, X4;
        QKAll qk;
        run(model, toks, true,  true, 0, nullptr, X1, n_decode, nullptr, nullptr, false, &P);
        run(model, toks, true,  true, LLAMA_ATTN_OBS_FORCE_TRANSPOSE, nullptr, X2, n_decode, nullptr, nullptr, false, &P);
        g_qkall = &qk;
        run(model, toks, true,  true, 0, nullptr, X3, 0, nullptr, nullptr, false, &P);
        g_qkall = nullptr;
        run(model, toks, false, true, 0, nullptr, X4, n_decode, nullptr, nullptr, false, &P);

        static const char * label[4] = { "keep_sink off", "keep_sink on", "keep_sink on, positions 1 mod 3 not eligible", "keep_sink off, the anchor a media token" };
        printf("  %s:\n", label[keep_sink]);
        for (int v = 0; v < 2; ++v) {
            const EliteRef R = elite_reference(qk, kop, alphas[v], last, ub0);
            double err = 0, err0_fa_off = 0, mv = 0, text_max = 0, dtr = 0, dcap = 0, mass_min = 1e9, mass_max = 0;
            int set_mismatch = 0, nrow_mismatch = 0, size_min = 1 << 30, size_max = 0, obs_min = 1 << 30, obs_max = 0;
            for (int il = 0; il < n_layer; ++il) {
                int size = 0;
                for (int p = 0; p < N; ++p) {
                    set_mismatch += X3.obs.eset[((size_t) il*2 + v)*N + p] != R.eset[(size_t) il*N + p];
                    size += R.eset[(size_t) il*N + p];
                }
                size_min = std::min(size_min, size); size_max = std::max(size_max, size);
                obs_min = std::min(obs_min, R.n_obs[il]); obs_max = std::max(obs_max, R.n_obs[il]);
                nrow_mismatch += X3.obs.n_elite_rows[il*2 + v] != R.n_obs[il] || X3.obs.n_rows[il*2 + v] != n_cand;
                for (int h = 0; h < n_head_kv; ++h) {
                    double mass = 0;
                    for (int p = 0; p < N; ++p) {
                        const double ref = R.s[((size_t) il*n_head_kv + h)*N + p];
                        const double got = X3.obs.at(il, h, v, p);
                        if (media(p)) { err = std::max(err, fabs(got - ref)); mv = std::max(mv, fabs(ref)); mass += got; }
                        else text_max = std::max(text_max, fabs(got));
                        if (il == 0) err0_fa_off = std::max(err0_fa_off, fabs(X4.obs.at(il, h, v, p) - ref));
                        dtr  = std::max(dtr,  fabs(X2.obs.at(il, h, v, p) - X1.obs.at(il, h, v, p)));
                        dcap = std::max(dcap, fabs(X3.obs.at(il, h, v, p) - X1.obs.at(il, h, v, p)));
                    }
                    mass_min = std::min(mass_min, mass); mass_max = std::max(mass_max, mass);
                }
            }
            const bool pass = err <= 1e-4 && text_max == 0 && set_mismatch == 0 && nrow_mismatch == 0 && err0_fa_off <= 1e-4 && dtr/mv <= 1e-6;
            printf("    alpha %.1f: elite set %d..%d cells (anchor included), observed elite rows %d..%d of %d; vs f64 (FA on, all layers): max abs err %.3g (max value %.3g),"
                   " text cells max |sum| %.3g, elite-set mismatches %d, n_elite_rows/n_rows mismatches %d; FA off layer 0: %.3g;"
                   " transpose vs OUT_PROD %.3g (rel %.3g); with vs without cb_eval %.3g; media mass per (layer, kv head) %.3f..%.3f;"
                   " nearest threshold margin %.3g of top  %s\n",
                   alphas[v], size_min, size_max, obs_min, obs_max, n_cand, err, mv, text_max, set_mismatch, nrow_mismatch, err0_fa_off,
                   dtr, dtr/mv, dcap, mass_min, mass_max, R.min_margin, pass ? "OK" : "FAIL");
            ok &= pass;
        }
        // the H2O variant alongside: the same sums as run B's columns 2, 3
        double dh = 0, hv = 0;
        for (int il = 0; il < n_layer; ++il) for (int h = 0; h < n_head_kv; ++h) for (int c = 2; c < 4; ++c) for (int p = 0; p < N; ++p) {
            dh = std::max(dh, fabs(X1.obs.at(il, h, c, p) - B.obs.at(il, h, c, p)));
            hv = std::max(hv, fabs(B.obs.at(il, h, c, p)));
        }
        const long exp_elite_calls = 2L*n_layer;
        const bool lg1 = same_logits(X1, C), lg2 = same_logits(X2, C), lg4 = same_logits(X4, E);
        printf("    H2O variant beside them vs run B: max abs diff %.3g (rel %.3g, other row chunks); elite callbacks %ld (expect %ld, anchor's ubatch only), without a set %ld;"
               " junk %.3g %.3g; logits (prompt + %d decode steps) vs observer off: OUT_PROD %s, transpose %s, FA off %s\n",
               dh, dh/hv, X1.obs.elite_calls, exp_elite_calls, X1.obs.elite_null, X1.obs.junk, X2.obs.junk, n_decode,
               lg1 ? "IDENTICAL" : "DIFFER", lg2 ? "IDENTICAL" : "DIFFER", lg4 ? "IDENTICAL" : "DIFFER");
        ok &= dh/hv <= 1e-6 && X1.obs.elite_calls == exp_elite_calls && X1.obs.elite_null == 0 && X2.obs.elite_null == 0 &&
              X1.obs.junk == 0 && X2.obs.junk == 0 && lg1 && lg2 && lg4;

        if (keep_sink == 0) { // invalid parameters are refused, the observer unchanged
            auto cp = llama_context_default_params();
            cp.n_ctx = 512; cp.n_ubatch = NUB; cp.no_perf = true;
            llama_context * ctx = llama_init_from_model(model, cp);
            Sums dummy; dummy.init();
            llama_attn_obs_params Q = P; Q.cb = obs_cb; Q.user_data = &dummy;
            int refused = 0, n_bad = 0;
            auto bad = [&](llama_attn_obs_params x) { ++n_bad; llama_log_set([](ggml_log_level, const char *, void *) {}, nullptr);
                refused += !llama_set_attn_observer(ctx, &x);
                llama_log_set([](ggml_log_level l, const char * t, void *) { if (l >= GGML_LOG_LEVEL_ERROR) fputs(t, stderr); }, nullptr); };
            const float n_bad_v[3] = { 1.0f, 0.0f, 0.0f }, a_nan[3] = { NAN, 0, 0 }, a_neg[3] = { -1, 0, 0 };
            std::vector<uint64_t> cop2 = cop; cop2[last] = 1ull << 2;
            { auto x = Q; x.n = n_bad_v; bad(x); }
            { auto x = Q; x.key_of_pos = nullptr; bad(x); }
            { auto x = Q; x.elite_last = N; bad(x); }
            { auto x = Q; x.elite_last = -1; bad(x); }
            { auto x = Q; x.cols_of_pos = cop2.data(); bad(x); }
            { auto x = Q; x.var_elite_alpha = a_nan; bad(x); }
            { auto x = Q; x.var_elite_alpha = a_neg; bad(x); }
            const bool good = llama_set_attn_observer(ctx, &Q);
            printf("    invalid elite parameters refused: %d of %d; valid accepted: %s\n", refused, n_bad, good ? "yes" : "NO");
            ok &= refused == n_bad && good;
            llama_free(ctx);
        }
    }
    elite_var[0] = elite_var[1] = elite_var[2] = false;
    return ok;
}
#endif

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
#ifdef LLAMA_ATTN_OBS_KEY_TEXT
    ok &= elite_checks(model, toks, B, C, E, n_decode);
#else
    printf("(6) elite window: llama.h lacks patch 0008, not checked\n");
#endif
    printf("%s\n", ok ? "ALL OK" : "SOME CHECKS FAILED");
    llama_model_free(model);
    return ok ? 0 : 1;
}
