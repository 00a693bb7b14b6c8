//! The hot pure-Rust parts at LLaVA-1.5-7B shapes: the host observer's reduction of one layer's
//! attention logits (32 heads × 400 window rows × 4096 keys); what remains on the host of the
//! in-graph statistics (the plan for a prompt, placing one layer's sums of 32 KV heads × 2
//! columns × 4096 cells); and a policy's selection over statistics of 32 layers × 32 KV heads ×
//! 4096 tokens.
//!
//!     cargo bench --bench hot_paths

use criterion::{criterion_group, criterion_main, Criterion};
use csp_llava::stats::{AttentionStats, Bucket, GraphSums, KqShape, Reducer, Rows, StatRequest};
use csp_llava::policy::{self, Budget, PolicyConfig, PolicyKind, Split};
use csp_llava::rng::Rng;
use csp_llava::span::Modality;

const LAYERS: usize = 32;
const HEADS: usize = 32;
const L: usize = 4096;
const WINDOW: usize = 400;

/// 8 images of 576 tokens between text runs, as a LLaVA-1.5 multi-image prompt.
fn modality() -> Vec<Modality> {
    (0..L).map(|t| if (t % 512) < 400 && t < 8 * 512 - 200 { Modality::Image } else { Modality::Text }).collect()
}

fn reduction(c: &mut Criterion) {
    let modality = modality();
    let mut rng = Rng::new(1, "bench-logits");
    // one head's 512-row ubatch is the last of the prompt; the window is its last 400 rows
    let slabs: Vec<Vec<f32>> = (0..HEADS).map(|_| (0..WINDOW * L).map(|_| rng.symmetric(8.0)).collect()).collect();
    for threads in [1, 2] {
        c.bench_function(&format!("observer: reduce one layer, 32 heads × 400 rows × 4096 keys, {threads} thread(s)"), |b| {
            b.iter_batched(
                || {
                    let mut r = Reducer::new(vec![StatRequest { rows: Rows::Last(WINDOW), n: 1.0 }], &modality, LAYERS, HEADS, 0.088, threads);
                    r.on_ubatch(&(0..(L - 512) as i64).collect::<Vec<_>>());
                    r.on_ubatch(&((L - 512) as i64..L as i64).collect::<Vec<_>>());
                    r
                },
                |mut r| {
                    let get = |h: usize| -> &[f32] { &slabs[h] };
                    r.reduce(KqShape { layer: 0, n_kv: L, n_rows: 512, n_head: HEADS }, &get);
                    r
                },
                criterion::BatchSize::LargeInput,
            );
        });
    }
}

fn graph_host_part(c: &mut Criterion) {
    let modality = modality();
    let reqs = vec![StatRequest { rows: Rows::Last(WINDOW), n: 1.0 }, StatRequest { rows: Rows::All, n: 0.0 }];
    c.bench_function("graph: plan for a 4096-token prompt, CSP window + H2O", |b| {
        b.iter_batched(
            || Reducer::new(reqs.clone(), &modality, LAYERS, HEADS, 0.088, 1),
            |mut r| r.graph_plan(0, &[], 0),
            criterion::BatchSize::LargeInput,
        );
    });
    let mut rng = Rng::new(3, "bench-sums");
    let sums: Vec<f32> = (0..HEADS * 2 * L).map(|_| rng.uniform()).collect();
    let cell_pos: Vec<i32> = (0..L as i32).collect();
    let row_pos: Vec<i32> = ((L - 512) as i32..L as i32).collect();
    let mut r = Reducer::new(reqs.clone(), &modality, LAYERS, HEADS, 0.088, 1);
    r.graph_plan(0, &[], 0);
    c.bench_function("graph: place one layer's sums, 32 KV heads × 2 columns × 4096 cells", |b| {
        b.iter(|| {
            let s = GraphSums { layer: 1, var: 0, n_kv: L, n_head_kv: HEADS, cols: &[0, 1], sums: &sums, cell_pos: &cell_pos, row_pos: &row_pos, n_elite_rows: 0 };
            r.add_sums(&s).unwrap();
        });
    });
}

fn selection(c: &mut Criterion) {
    let modality = modality();
    let mut stats = AttentionStats::new(LAYERS, HEADS, L);
    let mut rng = Rng::new(2, "bench-stats");
    for layer in 0..LAYERS {
        for h in 0..HEADS {
            for b in [Bucket::Text, Bucket::Media] {
                stats.column_mut(b, layer, h).iter_mut().for_each(|v| *v = rng.uniform());
            }
        }
    }
    let split = Split::new(Budget::Fraction(0.2), L, 1.0).unwrap();
    for kind in [PolicyKind::Csp, PolicyKind::H2o, PolicyKind::SnapKv] {
        let p = kind.build(&PolicyConfig::default()).unwrap();
        c.bench_function(&format!("select: {kind}, 32 layers × 32 KV heads × 4096 tokens, budget 0.2"), |b| {
            b.iter(|| policy::retain(p.as_ref(), &policy::Input { modality: &modality, split, stats: Some(&stats), protect: Default::default(), kv: None }, None).unwrap());
        });
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = reduction, graph_host_part, selection
}
criterion_main!(benches);
