//! An app crate outside this repository depends on csp-llava the way the README says (a path
//! dependency without the CLI's dependencies, and the `[patch.crates-io]` lines that point
//! llama-cpp-2 / llama-cpp-sys-2 at csp-llava's generated `vendor/`), builds, and answers a
//! question about an image with the tiny model. Slow the first time on a clean machine (the
//! app's llama.cpp build, ~5 minutes on 2 cores; it shares this target directory, so later
//! runs take seconds); offline: only crates this repository's build already fetched.

mod support;

use std::path::Path;
use std::process::Command;

#[test]
fn an_app_outside_the_repository_depends_on_the_library() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // target/<profile>/deps/<test> → target
    let target = std::env::current_exe().unwrap().parent().unwrap().parent().unwrap().parent().unwrap().to_path_buf();
    let app = tempfile::tempdir().unwrap();
    let r = root.display();
    std::fs::create_dir(app.path().join("src")).unwrap();
    std::fs::write(
        app.path().join("Cargo.toml"),
        format!(
            "[package]\nname = \"csp-llava-dependent-app\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[dependencies]\ncsp-llava = {{ path = \"{r}\", default-features = false }}\n\n[patch.crates-io]\nllama-cpp-sys-2 = {{ path = \"{r}/vendor/llama-cpp-sys-2\" }}\nllama-cpp-2 = {{ path = \"{r}/vendor/llama-cpp-2\" }}\n"
        ),
    )
    .unwrap();
    std::fs::write(
        app.path().join("src/main.rs"),
        r#"use std::sync::Arc;
use csp_llava::{Chat, ChatConfig, Engine, Flow, ModelConfig};
fn main() -> Result<(), csp_llava::Error> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let mut chat = Chat::new(Arc::new(Engine::load(&ModelConfig::new(&a[0], &a[1]))?), ChatConfig::default());
    chat.add_image(&a[2]);
    let answer = chat.ask("Which colour is it?", &mut |_| Flow::Continue)?;
    println!("tokens: {}", answer.n_tokens);
    Ok(())
}
"#,
    )
    .unwrap();
    // the versions this repository builds with (cargo adds the app and drops the rest)
    std::fs::copy(root.join("Cargo.lock"), app.path().join("Cargo.lock")).unwrap();
    let out = Command::new(env!("CARGO"))
        .args(["build", "--release", "--offline", "--quiet"])
        .current_dir(app.path())
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .expect("cargo runs");
    assert!(out.status.success(), "the app builds: {}", String::from_utf8_lossy(&out.stderr));
    let exe = target.join("release").join("csp-llava-dependent-app");
    let run = Command::new(&exe).arg(support::model()).arg(support::mmproj()).arg(support::image(0)).output().unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert!(stdout.contains("tokens: "), "{stdout}");
    // the library alone pulls none of the CLI's dependencies
    let tree = Command::new(env!("CARGO")).args(["tree", "--offline", "-e", "normal", "-p", "csp-llava"]).current_dir(app.path()).output().unwrap();
    let tree = String::from_utf8_lossy(&tree.stdout);
    for cli_only in ["clap ", "indicatif ", "tracing-subscriber ", "anyhow ", "hf-hub "] {
        assert!(!tree.contains(cli_only), "{cli_only}in the library's dependencies:\n{tree}");
    }
}
