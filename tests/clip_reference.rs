//! The vision path against an independent forward pass: a tiny CLIP mmproj *with a class
//! embedding* (as every real LLaVA-1.5/1.6 projector has) run through llama.cpp must equal a
//! plain Rust implementation of CLIP + the LLaVA `mlp` projector with the CLS token first —
//! which holds only with our patch for upstream llama.cpp issue 25814.

mod support;

use csp_llava::config::{ModelConfig, Request};
use csp_llava::gguf::{tiny, GgufHeader};
use csp_llava::Engine;

struct Clip {
    h: GgufHeader,
    path: std::path::PathBuf,
}

impl Clip {
    fn t(&self, name: &str) -> Vec<f32> {
        self.h.tensor_f32(&self.path, name).unwrap_or_else(|e| panic!("{name}: {e}"))
    }
}

/// y = W·x + b for W stored ggml-style `[n_in, n_out]` (row o holds W[o][·]).
fn linear(w: &[f32], b: Option<&[f32]>, x: &[f32], n_out: usize) -> Vec<f32> {
    let n_in = x.len();
    (0..n_out).map(|o| w[o * n_in..(o + 1) * n_in].iter().zip(x).map(|(a, b)| a * b).sum::<f32>() + b.map_or(0.0, |b| b[o])).collect()
}

fn layer_norm(x: &[f32], w: &[f32], b: &[f32], eps: f32) -> Vec<f32> {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    x.iter().enumerate().map(|(i, v)| (v - mean) / (var + eps).sqrt() * w[i] + b[i]).collect()
}

fn gelu_tanh(x: f32) -> f32 {
    0.5 * x * (1.0 + ((2.0 / std::f32::consts::PI).sqrt() * (x + 0.044_715 * x * x * x)).tanh())
}

/// The reference forward: CLS first (or last, to show what the unpatched graph computes).
fn reference(clip: &Clip, rgb: &[u8], cls_first: bool) -> Vec<Vec<f32>> {
    use tiny::vision::*;
    let (e, p, side) = (N_EMBD as usize, PATCH as usize, IMAGE as usize);
    let g = side / p;
    let mean = [0.481_454_66f32, 0.457_827_5, 0.408_210_73];
    let std = [0.268_629_54f32, 0.261_302_58, 0.275_777_1];
    let px = |c: usize, y: usize, x: usize| (f32::from(rgb[(y * side + x) * 3 + c]) / 255.0 - mean[c]) / std[c];
    let conv = clip.t("v.patch_embd.weight"); // ne [p, p, 3, e]
    let mut patches = Vec::new();
    for py in 0..g {
        for pxi in 0..g {
            patches.push(
                (0..e)
                    .map(|o| {
                        let mut s = 0f32;
                        for c in 0..3 {
                            for ky in 0..p {
                                for kx in 0..p {
                                    s += conv[kx + p * (ky + p * (c + 3 * o))] * px(c, py * p + ky, pxi * p + kx);
                                }
                            }
                        }
                        s
                    })
                    .collect::<Vec<f32>>(),
            );
        }
    }
    let cls = clip.t("v.class_embd");
    let mut x: Vec<Vec<f32>> = if cls_first { std::iter::once(cls.clone()).chain(patches).collect() } else { patches.into_iter().chain(std::iter::once(cls)).collect() };
    let pos = clip.t("v.position_embd.weight");
    for (i, row) in x.iter_mut().enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v += pos[i * e + j];
        }
    }
    let eps = 1e-5;
    x = x.iter().map(|r| layer_norm(r, &clip.t("v.pre_ln.weight"), &clip.t("v.pre_ln.bias"), eps)).collect();
    // LLaVA uses the penultimate layer: with 2 blocks, block 0 only
    let (n_head, d) = (N_HEAD as usize, e / N_HEAD as usize);
    let b = |n: &str| clip.t(&format!("v.blk.0.{n}"));
    let n_tok = x.len();
    let xn: Vec<Vec<f32>> = x.iter().map(|r| layer_norm(r, &b("ln1.weight"), &b("ln1.bias"), eps)).collect();
    let proj = |w: &str, bias: &str| -> Vec<Vec<f32>> { xn.iter().map(|r| linear(&b(w), Some(&b(bias)), r, e)).collect() };
    let (q, k, v) = (proj("attn_q.weight", "attn_q.bias"), proj("attn_k.weight", "attn_k.bias"), proj("attn_v.weight", "attn_v.bias"));
    let mut attn = vec![vec![0f32; e]; n_tok];
    for h in 0..n_head {
        for i in 0..n_tok {
            let s: Vec<f32> = (0..n_tok).map(|j| (0..d).map(|c| q[i][h * d + c] * k[j][h * d + c]).sum::<f32>() / (d as f32).sqrt()).collect();
            let mx = s.iter().copied().fold(f32::MIN, f32::max);
            let z: f32 = s.iter().map(|v| (v - mx).exp()).sum();
            for j in 0..n_tok {
                let w = (s[j] - mx).exp() / z;
                for c in 0..d {
                    attn[i][h * d + c] += w * v[j][h * d + c];
                }
            }
        }
    }
    for i in 0..n_tok {
        let o = linear(&b("attn_out.weight"), Some(&b("attn_out.bias")), &attn[i], e);
        x[i].iter_mut().zip(o).for_each(|(a, o)| *a += o);
        let n2 = layer_norm(&x[i], &b("ln2.weight"), &b("ln2.bias"), eps);
        let up = linear(&b("ffn_up.weight"), Some(&b("ffn_up.bias")), &n2, N_FF as usize);
        let act: Vec<f32> = up.iter().map(|u| u / (1.0 + (-1.702 * u).exp())).collect(); // quick GELU
        let down = linear(&b("ffn_down.weight"), Some(&b("ffn_down.bias")), &act, e);
        x[i].iter_mut().zip(down).for_each(|(a, o)| *a += o);
    }
    // the projector reads rows 1..=n_patches (CLS assumed at row 0)
    let dd = tiny::text::N_EMBD as usize;
    x[1..].iter()
        .map(|r| {
            let h: Vec<f32> = linear(&clip.t("mm.0.weight"), Some(&clip.t("mm.0.bias")), r, dd).into_iter().map(gelu_tanh).collect();
            linear(&clip.t("mm.2.weight"), Some(&clip.t("mm.2.bias")), &h, dd)
        })
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

#[test]
fn llava_projector_with_cls_matches_the_reference_forward() {
    let dir = support::scratch().join("clip-cls");
    std::fs::create_dir_all(&dir).unwrap();
    let mmproj = dir.join("tiny-mmproj-cls.gguf");
    tiny::mmproj_with(0, tiny::text::N_EMBD, true).write_file(&mmproj).unwrap();
    let mut cfg = ModelConfig::new(support::model(), &mmproj);
    cfg.threads = 1;
    let engine = Engine::load(&cfg).unwrap();
    let req = Request { images: vec![support::image(0)], prompt: "x".into(), ..Default::default() };
    let prompt = engine.prepare(&req).unwrap();
    let chunk = prompt.spans.iter().position(|s| s.media == Some(0)).unwrap();
    let got = engine.media_embeddings(&prompt, chunk).unwrap();
    let d = tiny::text::N_EMBD as usize;
    assert_eq!(got.len(), 64 * d, "64 patch tokens, CLS not among them");

    let clip = Clip { h: GgufHeader::read(&mmproj).unwrap(), path: mmproj.clone() };
    let rgb = tiny::sample_image_rgb(0, 0, tiny::vision::IMAGE);
    let cls_first = reference(&clip, &rgb, true);
    let cls_last = reference(&clip, &rgb, false);
    let (mut worst, mut worst_unpatched) = (f64::MAX, 0f64);
    for (i, want) in cls_first.iter().enumerate() {
        let row = &got[i * d..(i + 1) * d];
        worst = worst.min(cosine(row, want));
        worst_unpatched = worst_unpatched.max(1.0 - cosine(row, &cls_last[i]));
    }
    assert!(worst >= 0.999, "worst per-token cosine to the CLS-first reference: {worst}");
    assert!(worst_unpatched > 0.01, "the CLS-last (unpatched) forward must differ, or the test proves nothing: {worst_unpatched}");
}
