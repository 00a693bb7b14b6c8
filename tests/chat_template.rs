//! Chat templates through the binary: a custom Jinja template file, `--jinja` on the model's own
//! template, llama.cpp's built-in names, and the errors. The formatted prompt is read from the
//! library's debug log (`chat template applied via=… prompt="…"`, the text `Debug`-escaped).

mod support;

use std::path::Path;
use std::process::Output;

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_owned()
}

/// Runs the binary on the tiny model with `extra`, logging the formatted prompt.
fn run_tiny(extra: &[&str]) -> Output {
    run_model(&support::model(), extra)
}

/// Runs the binary on `model` (+ the tiny projector) with `extra`, logging the formatted prompt.
fn run_model(model: &Path, extra: &[&str]) -> Output {
    let (m, p) = (s(model), s(&support::mmproj()));
    std::process::Command::new(env!("CARGO_BIN_EXE_csp-llava"))
        .args([
            "-m", &m, "--mmproj", &p, "-c", "512", "-n", "2", "--temp", "0", "--json",
        ])
        .args(extra)
        .env("RUST_LOG", "csp_llava::engine::prompt=debug")
        .output()
        .expect("binary runs")
}

/// Writes a template file into the scratch directory.
fn template_file(name: &str, text: &str) -> String {
    let path = support::scratch().join(name);
    std::fs::write(&path, text).unwrap();
    s(&path)
}

/// A successful run: (the JSON report, how the template was applied, the formatted prompt as
/// `Debug` writes it).
#[track_caller]
fn formatted(out: &Output) -> (serde_json::Value, String, String) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "run failed: {err}");
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("stdout is one JSON object");
    let line = err
        .lines()
        .find(|l| l.contains("chat template applied"))
        .unwrap_or_else(|| panic!("no 'chat template applied' debug line in: {err}"));
    let via = line
        .split("via=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("via field")
        .to_owned();
    let prompt = line
        .split_once("prompt=")
        .expect("prompt field")
        .1
        .trim_end()
        .to_owned();
    (v, via, prompt)
}

/// Asserts a failure with exit status 1 and one stderr line containing every needle.
#[track_caller]
fn fails_with(out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "exit 1 expected; stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    let lines: Vec<_> = err
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.contains("DEBUG"))
        .collect();
    assert_eq!(lines.len(), 1, "one line expected, got: {err}");
    for n in needles {
        assert!(lines[0].contains(n), "expected '{n}' in: {err}");
    }
}

/// A template llama.cpp's heuristics do not recognise (llama.cpp's formatter fails on it): Python
/// string methods, loop.first/last, bos_token (removed again: the tiny model's tokenizer adds BOS).
const CUSTOM: &str = "{{ bos_token }}{% for m in messages %}
    {% if loop.first and m['role'] == 'system' %}
[[sys]] {{ m['content'].strip() }}
    {% else %}
[[{{ m.role.upper() }}]] {{ m.content }}{% if loop.last %} [[end]]{% endif %}

    {% endif %}
{% endfor %}
{% if add_generation_prompt %}[[bot]]{% endif %}
";

#[test]
fn custom_template_file_is_rendered_with_jinja() {
    let file = template_file("custom.jinja", CUSTOM);
    let img = s(&support::image(0));
    let out = run_tiny(&[
        "--chat-template-file",
        &file,
        "--system",
        "  Be brief. ",
        "--image",
        &img,
        "-p",
        "<image>\nhello",
    ]);
    let (v, via, prompt) = formatted(&out);
    assert_eq!(via, "jinja");
    let want = "[[sys]] Be brief.\n[[USER]] <__media__>\nhello [[end]]\n[[bot]]";
    assert_eq!(
        prompt,
        format!("{want:?}"),
        "the image marker passes through untouched"
    );
    assert_eq!(v["n_images"], 1);
    assert_eq!(v["image_tokens"], serde_json::json!([64]));
    assert_eq!(v["n_generated"], 2);

    // the same template given inline (no --jinja needed: it has Jinja tags)
    let out = run_tiny(&[
        "--chat-template",
        CUSTOM,
        "--system",
        "  Be brief. ",
        "--image",
        &img,
        "-p",
        "<image>\nhello",
    ]);
    let (v2, via2, prompt2) = formatted(&out);
    assert_eq!(
        (via2.as_str(), prompt2.as_str()),
        ("jinja", prompt.as_str())
    );
    assert_eq!(v2["n_prompt_tokens"], v["n_prompt_tokens"]);
}

#[test]
fn jinja_on_the_model_template_matches_llama_cpp_chatml() {
    let common = ["--system", "Be brief.", "-p", "what is this"];
    let run = |extra: &[&str]| {
        let mut args = common.to_vec();
        args.extend_from_slice(extra);
        formatted(&run_tiny(&args))
    };
    // the model's own (ChatML) template through llama.cpp's formatter, through minijinja, and
    // llama.cpp's built-in chatml by name
    let (v_cpp, via_cpp, p_cpp) = run(&[]);
    let (v_jinja, via_jinja, p_jinja) = run(&["--jinja"]);
    let (v_named, via_named, p_named) = run(&["--chat-template", "chatml"]);
    assert_eq!(via_cpp, "llama.cpp");
    assert_eq!(via_jinja, "jinja");
    assert_eq!(via_named, "llama.cpp built-in");
    let want = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nwhat is this<|im_end|>\n<|im_start|>assistant\n";
    assert_eq!(p_cpp, format!("{want:?}"));
    assert_eq!(
        p_jinja, p_cpp,
        "--jinja renders the model's ChatML template as llama.cpp's chatml"
    );
    assert_eq!(p_named, p_cpp);
    assert_eq!(v_jinja["n_prompt_tokens"], v_cpp["n_prompt_tokens"]);
    assert_eq!(v_named["n_prompt_tokens"], v_cpp["n_prompt_tokens"]);
    assert_eq!(
        v_jinja["text"], v_cpp["text"],
        "same prompt, greedy: same answer"
    );
}

#[test]
fn unknown_template_name_lists_the_built_in_names() {
    let out = run_tiny(&["--chat-template", "nosuchname", "-p", "hi"]);
    fails_with(
        &out,
        &[
            "--chat-template",
            "'nosuchname'",
            "chatml",
            "vicuna",
            "llama2",
        ],
    );
}

#[test]
fn template_errors_are_one_line() {
    let raise = template_file(
        "raise.jinja",
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system message is required') }}{% endif %}",
    );
    fails_with(
        &run_tiny(&["--chat-template-file", &raise, "-p", "hi"]),
        &["a system message is required"],
    );
    let broken = template_file(
        "broken.jinja",
        "{% for m in messages %}\n{{ m.content | no_such_filter }}\n",
    );
    fails_with(
        &run_tiny(&["--chat-template-file", &broken, "-p", "hi"]),
        &["chat template"],
    );
}

/// The tiny model with its ChatML template replaced (same length, so the GGUF stays valid) by
/// one llama.cpp's heuristics do not recognise.
fn model_with_custom_template() -> std::path::PathBuf {
    use csp_llava::gguf::tiny::CHATML_TEMPLATE;
    let mut custom =
        "{% for m in messages %}[[{{ m.role }}]] {{ m.content }}\n{% endfor %}[[assistant]]"
            .to_owned();
    assert!(custom.len() + 4 <= CHATML_TEMPLATE.len());
    custom = format!(
        "{custom}{{#{}#}}",
        "x".repeat(CHATML_TEMPLATE.len() - custom.len() - 4)
    );
    assert_eq!(custom.len(), CHATML_TEMPLATE.len());
    let mut bytes = std::fs::read(support::model()).unwrap();
    let at = bytes
        .windows(CHATML_TEMPLATE.len())
        .position(|w| w == CHATML_TEMPLATE.as_bytes())
        .expect("the tiny model stores its ChatML template");
    bytes[at..at + custom.len()].copy_from_slice(custom.as_bytes());
    let path = support::scratch().join("tiny-custom-template.gguf");
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn a_model_template_llama_cpp_does_not_know_is_rendered_with_jinja() {
    let model = model_with_custom_template();
    let want = format!("{:?}", "[[system]] Be brief.\n[[user]] hi\n[[assistant]]");
    for extra in [&[][..], &["--jinja"][..]] {
        let mut args = vec!["--system", "Be brief.", "-p", "hi"];
        args.extend_from_slice(extra);
        let (v, via, prompt) = formatted(&run_model(&model, &args));
        assert_eq!(via, "jinja", "{extra:?}");
        assert_eq!(prompt, want, "{extra:?}");
        assert_eq!(v["n_generated"], 2);
    }
    // a built-in name still overrides the model's template
    let (_, via, prompt) = formatted(&run_model(
        &model,
        &["--chat-template", "chatml", "-p", "hi"],
    ));
    assert_eq!(via, "llama.cpp built-in");
    assert!(prompt.starts_with("\"<|im_start|>user"), "{prompt}");
}
