//! `csp-llava demo`: the main job on a built-in default — the project's small VLM with CSP on
//! four easy-vqa images (or the tiny random model when that is not built).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use csp_llava::gguf::tiny;

use super::run::run;
use crate::args::RunArgs;

/// Where `models/build.sh` puts the real small VLM (the checkout this binary was built from).
fn real_model_dir() -> Option<PathBuf> {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/cache");
    d.join("smolvlm-dino/.stamp").exists().then_some(d)
}

/// easy-vqa test images of the demo (red triangle, blue circle, red circle, black rectangle) and a
/// question about one of them by its number.
const DEMO_IMAGES: [u32; 4] = [12, 6, 4, 11];
const DEMO_PROMPT: &str = "In image 4, what shape is in the image?";

pub fn demo(dir: Option<PathBuf>, mut run_args: RunArgs, verbose: u8) -> Result<()> {
    if run_args.model.hf.hf_repo.is_some() {
        return run(&run_args, verbose);
    }
    let own_model = run_args.model.model.is_some() || run_args.model.mmproj.is_some();
    let real = if own_model || dir.is_some() { None } else { real_model_dir() };
    if let Some(cache) = real {
        let m = cache.join("smolvlm-dino");
        run_args.model.model = Some(m.join("text.gguf"));
        run_args.model.mmproj = Some(m.join("mmproj.gguf"));
        let own_images = !run_args.prompt.images.is_empty();
        if !own_images {
            run_args.prompt.images = DEMO_IMAGES.iter().map(|i| cache.join(format!("easy-vqa/test/images112/{i}.png"))).collect();
        }
        if run_args.prompt.prompt.is_none() && run_args.prompt.file.is_none() {
            run_args.prompt.prompt = Some(if own_images { "What shape is in image 1?".into() } else { DEMO_PROMPT.into() });
        }
        if run_args.kv_policy == csp_llava::PolicyKind::Full {
            run_args.kv_policy = csp_llava::PolicyKind::Csp;
            run_args.kv_budget.get_or_insert(csp_llava::Budget::Fraction(0.5));
        }
        run_args.sampling.n_predict.get_or_insert(16);
        run_args.sampling.temp.get_or_insert(0.0);
        if !run_args.json {
            let images = if own_images { format!("{} image(s) of yours", run_args.prompt.images.len()) } else { "4 easy-vqa test images".into() };
            eprintln!(
                "csp-llava demo: SmolLM2-135M + DINOv2-small (models/build.sh), {images}, {} keeping {} of the KV cache\nprompt: {}",
                run_args.kv_policy.name(),
                run_args.kv_budget.map_or("0.2".into(), |b| b.to_string()),
                run_args.prompt.prompt.as_deref().unwrap_or("")
            );
        }
        return run(&run_args, verbose);
    }
    let why = if own_model {
        None
    } else if dir.is_some() {
        Some("--dir asks for the tiny random-weight model")
    } else {
        Some("the real small VLM is not built (models/build.sh needs PyPI), so this is the tiny random-weight model")
    };
    let dir = dir.unwrap_or_else(|| std::env::temp_dir().join("csp-llava-demo"));
    if !own_model {
        tiny::write_all(&dir, 0).with_context(|| format!("cannot write the tiny model into {}", dir.display()))?;
        run_args.model.model = Some(dir.join(tiny::TEXT_FILE));
        run_args.model.mmproj = Some(dir.join(tiny::MMPROJ_FILE));
        if run_args.prompt.images.is_empty() {
            run_args.prompt.images = (0..3).map(|i| dir.join(tiny::image_file(i))).collect();
        }
    }
    if run_args.prompt.prompt.is_none() && run_args.prompt.file.is_none() {
        run_args.prompt.prompt = Some(format!("Compare the {} images.", run_args.prompt.images.len()));
    }
    run_args.sampling.n_predict.get_or_insert(48);
    run_args.sampling.temp.get_or_insert(0.0);
    if let (false, Some(why)) = (run_args.json, why) {
        eprintln!("csp-llava demo: {why} in {} — its answer is gibberish; it shows the pipeline", dir.display());
    }
    run(&run_args, verbose)
}
