#!/usr/bin/env python3
"""Trains the LLaVA-style projector (mm.0 -> GELU -> mm.2, 384 -> 576 -> 576) that joins the
frozen DINOv2-small encoder to the frozen SmolLM2-135M-Instruct, on easy-vqa train images.

  * features: models/cache/features/train.npy (models/features.py: DINOv2 at 112 px, exactly what
    llama.cpp computes — see tests/real_model.rs);
  * language model: the same Q4_1 GGUF csp-llava runs, dequantised into a small PyTorch llama
    forward (RoPE in llama.cpp's adjacent-pair layout, GQA 9/3 heads, tied embeddings);
  * sequences: laid out by `csp-llava prompt-layout`, i.e. exactly the tokens csp-llava feeds the
    model (chat template, image slots), so training and inference see the same prompt;
  * samples (seeded): single-image easy-vqa questions; 2-4 images with "In image k, <question>";
    and two-image comparisons ("Do image a and image b have the same color/shape?");
  * loss: cross-entropy on the answer tokens and <|im_end|>; AdamW on the projector only.

Writes models/projector/projector.npz (float16) and models/projector/TRAINING.md (command, seed,
data hash, time, loss curve). Runs with Debian's python3-torch (CPU) in a venv made with
--system-site-packages (plus `pip install gguf==0.19.0`), or any torch. Debian's torch uses the
system BLAS: install libopenblas0-pthread (135 GFLOPS here instead of 5 with the reference BLAS).

  models/cache/train-venv/bin/python models/train_projector.py --minutes 40 --seed 0
"""
import argparse
import hashlib
import json
import math
import os
import random
import re
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, "cache")
MODEL = os.path.join(CACHE, "smolvlm-dino")
COLORS = ["red", "green", "blue", "yellow", "teal", "brown", "gray", "black"]
SHAPES = ["circle", "rectangle", "triangle"]


def load_llm(path):
    import gguf
    r = gguf.GGUFReader(path)
    def field(k):
        f = r.fields[k]
        return f.parts[f.data[0]][0]
    cfg = dict(n_layer=int(field("llama.block_count")), n_head=int(field("llama.attention.head_count")),
               n_head_kv=int(field("llama.attention.head_count_kv")), eps=float(field("llama.attention.layer_norm_rms_epsilon")),
               base=float(field("llama.rope.freq_base")))
    w = {t.name: torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)) for t in r.tensors}
    return cfg, w


class Llama(torch.nn.Module):
    """llama.cpp's llama graph in PyTorch (frozen)."""

    def __init__(self, cfg, w):
        super().__init__()
        self.cfg, self.w = cfg, w
        self.emb = w["token_embd.weight"]                      # [vocab, 576], tied output
        self.d = self.emb.shape[1]
        self.hd = self.d // cfg["n_head"]

    def rms(self, x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.cfg["eps"]) * weight

    def rope(self, x, pos):
        # llama.cpp LLAMA_ROPE_TYPE_NORM: rotate adjacent pairs (x0, x1), (x2, x3), ...
        hd = x.shape[-1]
        inv = self.cfg["base"] ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)
        ang = pos[:, None].float() * inv[None, :]             # [T, hd/2]
        cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), -1).flatten(-2)

    def forward(self, h, key_mask):
        """h: [B, T, d] input embeddings; key_mask: [B, T] True for real tokens. Returns the
        final hidden states (normalised); logits = hidden @ emb.T."""
        B, T, _ = h.shape
        c, w = self.cfg, self.w
        pos = torch.arange(T)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        mask = causal[None, None] & key_mask[:, None, None, :]
        bias = torch.zeros(B, 1, T, T).masked_fill(~mask, float("-inf"))
        for i in range(c["n_layer"]):
            p = f"blk.{i}."
            x = self.rms(h, w[p + "attn_norm.weight"])
            q = (x @ w[p + "attn_q.weight"].T).view(B, T, c["n_head"], self.hd)
            k = (x @ w[p + "attn_k.weight"].T).view(B, T, c["n_head_kv"], self.hd)
            v = (x @ w[p + "attn_v.weight"].T).view(B, T, c["n_head_kv"], self.hd)
            q, k = self.rope(q, pos), self.rope(k, pos)
            rep = c["n_head"] // c["n_head_kv"]
            k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)   # [B, H, T, hd]
            a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.hd) + bias, -1)
            o = (a @ v).transpose(1, 2).reshape(B, T, self.d)
            h = h + o @ w[p + "attn_output.weight"].T
            x = self.rms(h, w[p + "ffn_norm.weight"])
            h = h + (F.silu(x @ w[p + "ffn_gate.weight"].T) * (x @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
        return self.rms(h, w["output_norm.weight"])


class Projector(torch.nn.Module):
    def __init__(self, d_in=384, d_hidden=576, d_out=576):
        super().__init__()
        self.mm0 = torch.nn.Linear(d_in, d_hidden)
        self.mm2 = torch.nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.mm2(F.gelu(self.mm0(x), approximate="tanh"))    # ggml_gelu is the tanh form


def image_labels(questions):
    color, shape = {}, {}
    for q, a, i in questions:
        if a in COLORS and ("color" in q):
            color[i] = a
        if a in SHAPES and q.startswith("what") and "color" not in q:
            shape[i] = a
    return color, shape


def make_samples(questions, n, seed, n_images_max=4):
    """(prompt, image ids, answer) triples, deterministic from the seed."""
    rng = random.Random(seed)
    color, shape = image_labels(questions)
    by_image = {}
    for q, a, i in questions:
        by_image.setdefault(i, []).append((q, a))
    ids = sorted(i for i in by_image if i in color and i in shape)
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.5:
            q, a, i = questions[rng.randrange(len(questions))]
            out.append((q, [i], a))
        elif r < 0.85:
            k = rng.randint(2, n_images_max)
            imgs = rng.sample(ids, k)
            t = rng.randrange(k)
            q, a = rng.choice(by_image[imgs[t]])
            out.append((f"In image {t + 1}, {q}", imgs, a))
        else:
            k = rng.randint(2, n_images_max)
            imgs = rng.sample(ids, k)
            x, y = sorted(rng.sample(range(k), 2))
            what = rng.choice(["color", "shape"])
            lab = color if what == "color" else shape
            same = lab[imgs[x]] == lab[imgs[y]]
            out.append((f"Do image {x + 1} and image {y + 1} have the same {what}?", imgs, "yes" if same else "no"))
    return out


def layouts(csp_llava, prompts):
    """Token layout of each (prompt, n_images) as csp-llava builds it."""
    inp = "".join(json.dumps({"prompt": p, "n_images": n}) + "\n" for p, n in prompts)
    res = subprocess.run([csp_llava, "prompt-layout", "-m", os.path.join(MODEL, "text.gguf"), "--mmproj", os.path.join(MODEL, "mmproj.gguf")],
                         input=inp, capture_output=True, text=True, check=True)
    return [json.loads(l)["chunks"] for l in res.stdout.splitlines()]


def answer_tokens(csp_llava, answers):
    inp = "".join(json.dumps({"prompt": a, "raw": True, "n_images": 0}) + "\n" for a in answers)
    res = subprocess.run([csp_llava, "prompt-layout", "-m", os.path.join(MODEL, "text.gguf"), "--mmproj", os.path.join(MODEL, "mmproj.gguf")],
                         input=inp, capture_output=True, text=True, check=True)
    return {a: json.loads(l)["chunks"][0]["text"] for a, l in zip(answers, res.stdout.splitlines())}


def build_batch(llm, proj, feats, batch, eos):
    """Input embeddings, key mask and per-position targets (-100 = no loss)."""
    seqs = []
    for chunks, imgs, ans in batch:
        parts, targets, k = [], [], 0
        for c in chunks:
            if "text" in c:
                ids = torch.tensor(c["text"], dtype=torch.long)
                parts.append(llm.emb[ids])
                targets += [-100] * len(ids)
            else:
                parts.append(proj(feats[imgs[k]]))
                targets += [-100] * c["image"]
                k += 1
        a = torch.tensor(ans + [eos], dtype=torch.long)
        parts.append(llm.emb[a])
        # position t predicts token t+1: the last prompt token predicts the first answer token
        targets[-1] = int(a[0])
        targets += [int(x) for x in a[1:]] + [-100]
        seqs.append((torch.cat(parts), torch.tensor(targets)))
    T = max(s[0].shape[0] for s in seqs)
    d = seqs[0][0].shape[1]
    h = torch.zeros(len(seqs), T, d)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    tgt = torch.full((len(seqs), T), -100, dtype=torch.long)
    for b, (e, t) in enumerate(seqs):
        h[b, :e.shape[0]] = e
        mask[b, :e.shape[0]] = True
        tgt[b, :t.shape[0]] = t
    return h, mask, tgt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=40.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--samples", type=int, default=20000)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--csp-llava", default=os.path.join(HERE, "..", "target", "release", "csp-llava"))
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t0 = time.time()

    questions = json.load(open(os.path.join(CACHE, "easy-vqa", "train", "questions.json")))
    feats_np = np.load(os.path.join(CACHE, "features", "train.npy"))
    feats = torch.from_numpy(feats_np.astype(np.float32))
    data_hash = hashlib.sha256(feats_np.tobytes() + json.dumps(questions).encode()).hexdigest()[:16]
    samples = make_samples(questions, args.samples, args.seed)
    lays = layouts(args.csp_llava, [(p, len(imgs)) for p, imgs, _ in samples])
    ans = answer_tokens(args.csp_llava, sorted({a for _, _, a in samples}))
    eos = 2  # <|im_end|>
    print(f"{len(samples)} samples laid out in {time.time() - t0:.0f} s; data hash {data_hash}", file=sys.stderr)

    cfg, w = load_llm(os.path.join(MODEL, "text.gguf"))
    llm = Llama(cfg, w)
    proj = Projector()
    # start the output at the scale of the token embeddings
    with torch.no_grad():
        proj.mm2.weight.mul_(float(llm.emb.std()) / 0.05)
    opt = torch.optim.AdamW(proj.parameters(), lr=args.lr, weight_decay=0.0)
    log = []
    step, seen, i = 0, 0, 0
    budget = args.minutes * 60
    start = time.time()
    ema = None
    while time.time() - start < budget and i < len(samples):
        batch = [(lays[j], samples[j][1], ans[samples[j][2]]) for j in range(i, min(i + args.batch, len(samples)))]
        i += len(batch)
        frac = (time.time() - start) / budget
        lr = args.lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))
        for g in opt.param_groups:
            g["lr"] = lr
        h, mask, tgt = build_batch(llm, proj, feats, batch, eos)
        hidden = llm(h, mask)
        sel = tgt != -100                       # the LM head only where there is a target
        loss = F.cross_entropy(hidden[sel] @ llm.emb.T, tgt[sel])
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        seen += len(batch)
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 10 == 0:
            log.append((step, seen, round(time.time() - start), round(loss.item(), 4), round(ema, 4)))
            print(f"step {step} samples {seen} {time.time() - start:.0f}s loss {loss.item():.3f} ema {ema:.3f}", file=sys.stderr, flush=True)

    out = os.path.join(HERE, "projector")
    os.makedirs(out, exist_ok=True)
    np.savez(os.path.join(out, "projector.npz"),
             mm0_w=proj.mm0.weight.detach().numpy().astype(np.float16), mm0_b=proj.mm0.bias.detach().numpy().astype(np.float16),
             mm2_w=proj.mm2.weight.detach().numpy().astype(np.float16), mm2_b=proj.mm2.bias.detach().numpy().astype(np.float16))
    with open(os.path.join(out, "TRAINING.md"), "w") as f:
        f.write("# Projector training record\n\n")
        f.write(f"Command: `models/cache/train-venv/bin/python models/train_projector.py --minutes {args.minutes:g} --seed {args.seed} "
                f"--batch {args.batch} --lr {args.lr:g} --samples {args.samples} --threads {args.threads}`\n\n")
        f.write(f"- torch {torch.__version__}, {args.threads} CPU thread(s); seed {args.seed}\n")
        f.write(f"- data: easy-vqa 1.0 train ({len(questions)} questions, {feats_np.shape[0]} images), DINOv2 features hash {data_hash}\n")
        f.write(f"- trained {step} steps, {seen} samples, {time.time() - start:.0f} s (wall {time.time() - t0:.0f} s incl. setup)\n")
        f.write(f"- sample mix: 50% single image, 35% 2-4 images with 'In image k, ...', 15% two-image same color/shape\n\n")
        f.write("| step | samples | seconds | loss | loss (EMA) |\n|---|---|---|---|---|\n")
        for r in log:
            f.write("| " + " | ".join(str(x) for x in r) + " |\n")
    print("wrote", os.path.join(out, "projector.npz"), file=sys.stderr)


if __name__ == "__main__":
    main()
