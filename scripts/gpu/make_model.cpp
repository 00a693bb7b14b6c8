// Writes a random-weight llama-architecture GGUF of given shapes (default: LLaVA-1.5-7B's
// language model, Vicuna-7B: 32 layers, 4096 wide, 32 heads of 128, FFN 11008, vocab 32000),
// Q4_0 matrices and F32 norms — for measuring speed where no real weights can be downloaded
// (the GPU check, scripts/gpu-check.sh). Weights are random, so text is gibberish; shapes, memory
// and kernels are the real model's.
//
//   make_model OUT.gguf [n_layer=32] [n_embd=4096] [n_head=32] [n_head_kv=32] [n_ff=11008]
//                       [n_vocab=32000] [seed=1]
#include "ggml.h"
#include "gguf.h"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

static uint64_t rng_state = 1;
static uint64_t next_u64() { // SplitMix64
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static float next_f(float scale) { return ((next_u64() >> 40) / float(1ull << 24) * 2.0f - 1.0f) * scale; }

int main(int argc, char ** argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s OUT.gguf [n_layer] [n_embd] [n_head] [n_head_kv] [n_ff] [n_vocab] [seed]\n", argv[0]);
        return 2;
    }
    auto arg = [&](int i, long def) { return argc > i ? std::atol(argv[i]) : def; };
    const int n_layer = arg(2, 32), n_embd = arg(3, 4096), n_head = arg(4, 32), n_head_kv = arg(5, 32);
    const int n_ff = arg(6, 11008), n_vocab = arg(7, 32000);
    rng_state = arg(8, 1);
    const int head_dim = n_embd / n_head;
    if (n_embd % n_head || n_head % n_head_kv || n_embd % 32 || n_ff % 32 || n_vocab < 300) {
        fprintf(stderr, "bad shapes\n");
        return 2;
    }

    gguf_context * g = gguf_init_empty();
    gguf_set_val_str(g, "general.architecture", "llama");
    gguf_set_val_str(g, "general.name", "random-llama (csp-llava gpu check)");
    gguf_set_val_u32(g, "general.file_type", 2); // MOSTLY_Q4_0
    gguf_set_val_u32(g, "llama.context_length", 16384);
    gguf_set_val_u32(g, "llama.embedding_length", n_embd);
    gguf_set_val_u32(g, "llama.block_count", n_layer);
    gguf_set_val_u32(g, "llama.feed_forward_length", n_ff);
    gguf_set_val_u32(g, "llama.attention.head_count", n_head);
    gguf_set_val_u32(g, "llama.attention.head_count_kv", n_head_kv);
    gguf_set_val_u32(g, "llama.rope.dimension_count", head_dim);
    gguf_set_val_f32(g, "llama.attention.layer_norm_rms_epsilon", 1e-5f);
    gguf_set_val_f32(g, "llama.rope.freq_base", 10000.0f);

    // an SPM vocabulary: <unk> <s> </s>, 256 byte tokens, then plain pieces
    std::vector<std::string> tok(n_vocab);
    std::vector<float> score(n_vocab);
    std::vector<int32_t> type(n_vocab);
    for (int i = 0; i < n_vocab; i++) {
        char buf[32];
        if (i == 0) { tok[i] = "<unk>"; type[i] = 2; }
        else if (i == 1) { tok[i] = "<s>"; type[i] = 3; }
        else if (i == 2) { tok[i] = "</s>"; type[i] = 3; }
        else if (i < 3 + 256) { snprintf(buf, sizeof buf, "<0x%02X>", i - 3); tok[i] = buf; type[i] = 6; }
        else { snprintf(buf, sizeof buf, "\xe2\x96\x81t%d", i); tok[i] = buf; type[i] = 1; }
        score[i] = -float(i);
    }
    std::vector<const char *> tp(n_vocab);
    for (int i = 0; i < n_vocab; i++) tp[i] = tok[i].c_str();
    gguf_set_val_str(g, "tokenizer.ggml.model", "llama");
    gguf_set_arr_str(g, "tokenizer.ggml.tokens", tp.data(), n_vocab);
    gguf_set_arr_data(g, "tokenizer.ggml.scores", GGUF_TYPE_FLOAT32, score.data(), n_vocab);
    gguf_set_arr_data(g, "tokenizer.ggml.token_type", GGUF_TYPE_INT32, type.data(), n_vocab);
    gguf_set_val_u32(g, "tokenizer.ggml.bos_token_id", 1);
    gguf_set_val_u32(g, "tokenizer.ggml.eos_token_id", 2);
    gguf_set_val_u32(g, "tokenizer.ggml.unknown_token_id", 0);

    // tensor data lives in one ggml context (Q4_0 ≈ 0.56 B per weight: ~3.8 GB for 7B)
    struct Spec { std::string name; int64_t ne0, ne1; bool quant; };
    std::vector<Spec> specs;
    specs.push_back({"token_embd.weight", n_embd, n_vocab, true});
    specs.push_back({"output_norm.weight", n_embd, 1, false});
    specs.push_back({"output.weight", n_embd, n_vocab, true});
    const int n_embd_kv = head_dim * n_head_kv;
    for (int il = 0; il < n_layer; il++) {
        auto b = "blk." + std::to_string(il) + ".";
        specs.push_back({b + "attn_norm.weight", n_embd, 1, false});
        specs.push_back({b + "attn_q.weight", n_embd, n_embd, true});
        specs.push_back({b + "attn_k.weight", n_embd, n_embd_kv, true});
        specs.push_back({b + "attn_v.weight", n_embd, n_embd_kv, true});
        specs.push_back({b + "attn_output.weight", n_embd, n_embd, true});
        specs.push_back({b + "ffn_norm.weight", n_embd, 1, false});
        specs.push_back({b + "ffn_gate.weight", n_embd, n_ff, true});
        specs.push_back({b + "ffn_up.weight", n_embd, n_ff, true});
        specs.push_back({b + "ffn_down.weight", n_ff, n_embd, true});
    }
    size_t bytes = 0;
    for (auto & s : specs) {
        bytes += ggml_row_size(s.quant ? GGML_TYPE_Q4_0 : GGML_TYPE_F32, s.ne0) * s.ne1 + 256;
    }
    ggml_init_params ip = { bytes + specs.size() * ggml_tensor_overhead() + (1 << 20), nullptr, false };
    ggml_context * ctx = ggml_init(ip);
    if (!ctx) { fprintf(stderr, "cannot allocate %zu bytes\n", bytes); return 1; }
    std::vector<float> row;
    for (auto & s : specs) {
        ggml_tensor * t = s.ne1 == 1 ? ggml_new_tensor_1d(ctx, s.quant ? GGML_TYPE_Q4_0 : GGML_TYPE_F32, s.ne0)
                                     : ggml_new_tensor_2d(ctx, s.quant ? GGML_TYPE_Q4_0 : GGML_TYPE_F32, s.ne0, s.ne1);
        ggml_set_name(t, s.name.c_str());
        if (!s.quant) {
            float * d = (float *) t->data;
            for (int64_t i = 0; i < s.ne0 * s.ne1; i++) d[i] = 1.0f; // RMS-norm weights
        } else {
            // quantize random rows: scale 1/sqrt(fan-in) keeps activations in range
            const float scale = 1.0f / std::sqrt(float(s.ne0));
            row.resize(s.ne0);
            const size_t rs = ggml_row_size(GGML_TYPE_Q4_0, s.ne0);
            for (int64_t r = 0; r < s.ne1; r++) {
                for (int64_t i = 0; i < s.ne0; i++) row[i] = next_f(scale * 1.7f);
                ggml_quantize_chunk(GGML_TYPE_Q4_0, row.data(), (char *) t->data + r * rs, 0, 1, s.ne0, nullptr);
            }
        }
        gguf_add_tensor(g, t);
    }
    if (!gguf_write_to_file(g, argv[1], false)) { fprintf(stderr, "cannot write %s\n", argv[1]); return 1; }
    fprintf(stderr, "wrote %s: %d layers, %d wide, %d/%d heads of %d, ffn %d, vocab %d, %.2f GB\n", argv[1], n_layer, n_embd,
            n_head, n_head_kv, head_dim, n_ff, n_vocab, bytes / 1e9);
    gguf_free(g);
    ggml_free(ctx);
    return 0;
}
