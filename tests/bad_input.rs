//! Bad and careless input against the CLI (issue 13's matrix, the parts in the binary, eval and
//! policies): each is one clear line and the right exit code — 1 for bad input, 2 for usage
//! errors, 0 when the reader goes away — never a hang, an unbounded read or a lost file.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_csp-llava"));
    c.env_remove("RUST_LOG");
    c
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_owned()
}

/// Runs with a deadline: a hang fails the test instead of blocking it.
fn run_within(mut cmd: Command, limit: Duration) -> Output {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let start = Instant::now();
    while start.elapsed() < limit {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    panic!("still running after {limit:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn tiny_args(extra: &[&str]) -> Vec<String> {
    let mut a = vec!["-m".to_owned(), s(&support::model()), "--mmproj".into(), s(&support::mmproj()), "-t".into(), "1".into()];
    a.extend(extra.iter().map(|x| (*x).to_owned()));
    a
}

fn tiny(extra: &[&str]) -> Output {
    let mut c = bin();
    c.args(tiny_args(extra));
    run_within(c, Duration::from_secs(60))
}

/// Exit `code`, exactly one stderr line containing `needle`, no panic.
#[track_caller]
fn assert_one_line(out: &Output, code: i32, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<_> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected: {err}");
    assert!(lines[0].contains(needle), "'{needle}' not in: {err}");
}

fn fifo(name: &str) -> PathBuf {
    let p = support::scratch().join(name);
    if !p.exists() {
        assert!(Command::new("mkfifo").arg(&p).status().unwrap().success());
    }
    p
}

#[test]
fn repeat_last_n_is_bounded_by_the_context() {
    for n in ["2000000000", "500000000"] {
        let out = tiny(&["-p", "hi", "-n", "4", "--repeat-penalty", "1.1", "--repeat-last-n", n, "-c", "512"]);
        assert!(out.status.success(), "{n}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn pipes_devices_and_directories_are_refused_at_once() {
    let f = fifo("prompt-fifo");
    let d = support::scratch().join("a-dir");
    std::fs::create_dir_all(&d).unwrap();
    let quick = Duration::from_secs(20);
    for (flag, path) in [("-f", s(&f)), ("-f", "/dev/zero".into()), ("-f", s(&d)), ("--chat-template-file", s(&f)), ("--prefixkv-profile", "/dev/zero".into())] {
        let mut c = bin();
        c.args(tiny_args(&[flag, &path, "--kv-policy", "prefixkv"]));
        if flag != "-f" {
            c.args(["-p", "hi"]);
        }
        let out = run_within(c, quick);
        assert_eq!(out.status.code(), Some(1), "{flag} {path}: {}", String::from_utf8_lossy(&out.stderr));
        assert_one_line(&out, 1, "cannot read");
    }
    for data in [s(&f), "/dev/zero".into(), "/dev/urandom".into()] {
        let mut c = bin();
        c.args(["eval", "--data", &data]).args(tiny_args(&[]));
        let out = run_within(c, quick);
        assert_one_line(&out, 1, "not a regular file");
    }
}

#[test]
fn a_budget_of_one_cell_keeps_the_last_token() {
    let img = s(&support::image(0));
    for policy in ["prefixkv", "csp", "h2o", "snapkv", "streaming", "random", "aircache"] {
        let out = tiny(&["--image", &img, "-p", "hi", "-n", "3", "--json", "--kv-policy", policy, "--kv-granularity", "global", "--kv-budget", "1", "--ignore-eos"]);
        assert!(out.status.success(), "{policy}: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["n_generated"], 3, "{policy}");
        if policy != "aircache" {
            assert_eq!(v["kv_cells_after"], 1, "{policy}");
        }
    }
}

fn cases_file(dir: &str, n: usize) -> PathBuf {
    let d = support::scratch().join(dir);
    std::fs::create_dir_all(&d).unwrap();
    for i in 0..2 {
        std::fs::copy(support::image(i), d.join(format!("img-{i}.png"))).unwrap();
    }
    let lines: Vec<String> = (0..n).map(|i| format!(r#"{{"id": "c{i}", "images": ["img-{}.png"], "prompt": "What is it?", "answer": "x"}}"#, i % 2)).collect();
    let p = d.join("cases.jsonl");
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

fn eval(data: &Path, extra: &[&str]) -> Output {
    let mut c = bin();
    c.args(["eval", "--data", &s(data), "-n", "2", "--kv-policy", "full,streaming", "--kv-budget", "0.5"]).args(extra).args(tiny_args(&[]));
    run_within(c, Duration::from_secs(120))
}

fn ids(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn eval_never_loses_or_duplicates_results() {
    let data = cases_file("eval-safety", 3);
    let before = std::fs::read(&data).unwrap();
    // --cases-out = --data: refused, the cases untouched
    assert_one_line(&eval(&data, &["--cases-out", &s(&data)]), 1, "is the --data file");
    assert_eq!(std::fs::read(&data).unwrap(), before);

    let out_path = data.with_file_name("out.jsonl");
    let out = eval(&data, &["--cases-out", &s(&out_path)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(ids(&out_path), ["c0", "c1", "c2"]);
    // resume on a complete file: nothing rerun, nothing appended
    let done = std::fs::read(&out_path).unwrap();
    assert!(eval(&data, &["--cases-out", &s(&out_path), "--resume"]).status.success());
    assert_eq!(std::fs::read(&out_path).unwrap(), done);

    // a last line cut mid-write: dropped, that case rerun, no duplicates
    let text = String::from_utf8(done.clone()).unwrap();
    let cut = &text[..text.len() - 20];
    std::fs::write(&out_path, cut).unwrap();
    let out = eval(&data, &["--cases-out", &s(&out_path), "--resume"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut got = ids(&out_path);
    got.sort();
    assert_eq!(got, ["c0", "c1", "c2"]);

    // not UTF-8, or a bad line in the middle: refused, the file left as it is
    for bad in [b"\xff\xfe not text\n".to_vec(), format!("{{\"id\": 1}}\n{}", text).into_bytes()] {
        std::fs::write(&out_path, &bad).unwrap();
        let out = eval(&data, &["--cases-out", &s(&out_path), "--resume"]);
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("unchanged"), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(std::fs::read(&out_path).unwrap(), bad);
    }
}

#[test]
fn negative_numbers_in_subcommands_are_understood() {
    let data = cases_file("eval-neg", 1);
    let mut c = bin();
    c.args(["eval", "--data", &s(&data), "-n", "-1"]).args(tiny_args(&[]));
    assert_one_line(&run_within(c, Duration::from_secs(30)), 2, "at least 1");
    let mut c = bin();
    c.args(["bench", "--images", "1", "-n", "-1"]).args(tiny_args(&[]));
    assert_one_line(&run_within(c, Duration::from_secs(30)), 2, "at least 1");
    // -1 = all cases
    let profile = support::scratch().join("profile.json");
    let mut c = bin();
    c.args(["calibrate", "--data", &s(&data), "--max-cases", "-1", "--kv-budget", "0.5", "--out", &s(&profile)]).args(tiny_args(&[]));
    let out = run_within(c, Duration::from_secs(60));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn out_of_range_values_are_usage_errors_like_values_that_do_not_parse() {
    assert_one_line(&tiny(&["-p", "hi", "--kv-policy", "csp", "--kv-budget", "1.5"]), 2, "--kv-budget");
    assert_one_line(&tiny(&["-p", "hi", "--top-p", "2"]), 2, "--top-p");
    assert_one_line(&tiny(&["-p", "hi", "-b", "0"]), 2, "--batch-size");
}

#[test]
fn outputs_are_checked_before_the_work() {
    let d = support::scratch().join("plot-dir");
    std::fs::create_dir_all(&d).unwrap();
    let mut c = bin();
    c.args(["bench", "--images", "1,2,4", "-r", "5", "--plot", &s(&d)]).args(tiny_args(&[]));
    let t = Instant::now();
    let out = run_within(c, Duration::from_secs(60));
    assert_one_line(&out, 1, "cannot write the plot");
    assert!(t.elapsed() < Duration::from_secs(5), "failed only after {:?}", t.elapsed());
    // an I/O error says its cause once
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(err.matches("os error").count(), 1, "{err}");
    assert_one_line(&tiny(&["-p", "hi", "--dump-retention", &s(&d)]), 1, "cannot write");
}

#[test]
fn a_reader_that_goes_away_ends_the_run_quietly() {
    // `csp-llava … | head -c 1`: stop at the first failed write, exit 0, nothing on stderr
    let mut child = bin()
        .args(tiny_args(&["-p", "hi", "-n", "-1", "--ignore-eos", "-c", "100000", "--temp", "0"]))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut one = [0u8; 1];
    std::io::Read::read_exact(&mut stdout, &mut one).unwrap();
    drop(stdout);
    let t = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    // a full disk is an error, one line
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
    let mut c = bin();
    c.args(tiny_args(&["-p", "hi", "-n", "4", "-c", "512"])).stdout(full).stderr(Stdio::piped());
    let out = c.output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("cannot write the output"), "{err}");
}

#[test]
fn ctrl_c_in_bench_leaves_no_temporary_files() {
    let child = bin().args(["bench", "--images", "2,4", "-r", "50", "-n", "64", "-o", "jsonl"]).args(tiny_args(&[])).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let scratch = std::env::temp_dir().join(format!("csp-llava-bench-{}", child.id()));
    let t = Instant::now();
    while !scratch.exists() && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(scratch.exists(), "bench wrote its images to {}", scratch.display());
    std::thread::sleep(Duration::from_millis(300));
    assert!(Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!scratch.exists(), "{} left behind", scratch.display());
    // the first Ctrl-C ends the bench after its current run and writes what was measured
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.lines().next().is_some_and(|l| l.contains("provenance")), "{stdout}");
}

#[test]
fn demo_with_images_does_not_claim_the_model_is_missing() {
    let bad = support::scratch().join("bad.png");
    std::fs::write(&bad, "not an image").unwrap();
    let out = run_within({
        let mut c = bin();
        c.args(["demo", "--image", &s(&bad), "-t", "1"]);
        c
    }, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("not built") || !Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/models/cache/smolvlm-dino/.stamp")).exists(), "{err}");
    assert!(err.lines().last().unwrap().starts_with("csp-llava: error: "), "{err}");
}

#[test]
fn prompt_layout_bounds_the_image_count() {
    let mut child = bin()
        .args(["prompt-layout", "-m", &s(&support::model()), "--mmproj", &s(&support::mmproj())])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(br#"{"prompt": "hi", "n_images": 100000000000}"#).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_one_line(&out, 1, "n_images");
}

#[test]
fn image_markers_the_template_adds_or_drops_are_named() {
    let img = s(&support::image(0));
    assert_one_line(&tiny(&["--image", &img, "-p", "hi", "-sys", "<__media__>", "-c", "512"]), 1, "image marker(s) for 1 image(s)");
    assert_one_line(&tiny(&["--image", &img, "-p", "hi", "--chat-template", "{{ 'no user turn' }}", "-c", "512"]), 1, "0 image marker(s)");
}
