//! `-hf user/repo[:quant]` against a fake Hugging Face Hub: a local HTTP server that answers the
//! requests hf-hub makes (the repository listing `/api/models/{repo}/revision/main`, then per file
//! `/{repo}/resolve/main/{file}`, first with `Range: bytes=0-0` for the commit, etag and size,
//! then for the bytes; GGUF files are redirected to a CDN path as the Hub does for LFS files).
//! The repositories hold the tiny model renamed as quants of one model.

mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// The commit every fake repository is at.
const SHA: &str = "0123456789abcdef0123456789abcdef01234567";
/// The token the gated repository wants.
const TOKEN: &str = "hf_sekrit";

/// One request the fake Hub received: its path and Authorization header.
#[derive(Debug, Clone)]
struct Hit {
    path: String,
    auth: Option<String>,
}

/// The fake Hub's state shared with its threads.
struct State {
    /// File name → bytes, of `user/tiny` (and of the gated `user/gated`).
    files: BTreeMap<String, Vec<u8>>,
    log: Mutex<Vec<Hit>>,
}

/// A fake Hugging Face Hub on 127.0.0.1, serving until [`FakeHub::stop`] (or drop).
struct FakeHub {
    port: u16,
    state: Arc<State>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeHub {
    /// Serves `user/tiny` and the gated `user/gated`, both holding the tiny model as
    /// `tiny-Q4_K_M.gguf`, `tiny-Q8_0.gguf` and `mmproj-tiny-f16.gguf`, plus a README.
    fn start() -> FakeHub {
        let text = std::fs::read(support::model()).expect("tiny model");
        let mmproj = std::fs::read(support::mmproj()).expect("tiny mmproj");
        let files = BTreeMap::from([
            (".gitattributes".to_owned(), b"*.gguf filter=lfs\n".to_vec()),
            ("README.md".to_owned(), b"# tiny\n".to_vec()),
            ("mmproj-tiny-f16.gguf".to_owned(), mmproj),
            ("tiny-Q4_K_M.gguf".to_owned(), text.clone()),
            ("tiny-Q8_0.gguf".to_owned(), text),
        ]);
        let state = Arc::new(State { files, log: Mutex::new(Vec::new()) });
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let stop = Arc::new(AtomicBool::new(false));
        let (st, stp) = (state.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stp.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let st = st.clone();
                std::thread::spawn(move || {
                    let _ = serve(&st, port, conn);
                });
            }
        });
        FakeHub { port, state, stop, thread: Some(thread) }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn hits(&self) -> Vec<Hit> {
        self.state.log.lock().unwrap().clone()
    }

    /// How many times `file` of `user/tiny` was downloaded (GETs of its bytes on the CDN path
    /// without the one-byte metadata probe).
    fn downloads(&self, file: &str) -> usize {
        self.hits().iter().filter(|h| h.path == format!("/cdn/user/tiny/{file}")).count()
    }

    /// Stops listening: afterwards nothing answers on the port.
    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            t.join().expect("server thread");
        }
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Answers one request (one per connection).
fn serve(state: &State, port: u16, conn: TcpStream) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let (mut range, mut auth) = (None, None);
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            match k.trim().to_ascii_lowercase().as_str() {
                "range" => range = Some(v.trim().to_owned()),
                "authorization" => auth = Some(v.trim().to_owned()),
                _ => {}
            }
        }
    }
    // the metadata probe (bytes=0-0) is not logged as a download
    if range.as_deref() != Some("bytes=0-0") || !path.starts_with("/cdn/") {
        state.log.lock().unwrap().push(Hit { path: path.clone(), auth: auth.clone() });
    }
    let response = route(state, port, &path, range.as_deref(), auth.as_deref());
    let mut conn = conn;
    conn.write_all(&response)?;
    conn.flush()
}

/// The repositories the fake Hub has.
const REPOS: [&str; 2] = ["user/tiny", "user/gated"];

/// The repository a path is about (listing, resolve or CDN path).
fn repo_in(path: &str) -> Option<&'static str> {
    REPOS.into_iter().find(|r| {
        path == format!("/api/models/{r}/revision/main") || path.starts_with(&format!("/{r}/")) || path.starts_with(&format!("/cdn/{r}/"))
    })
}

/// The Hub's answer to GET `path`.
fn route(state: &State, port: u16, path: &str, range: Option<&str>, auth: Option<&str>) -> Vec<u8> {
    let not_found = |code| respond("404 Not Found", &[("X-Error-Code", code)], b"{\"error\":\"not found\"}");
    let Some(repo) = repo_in(path) else { return not_found("RepoNotFound".into()) };
    if repo == "user/gated" && auth != Some(&format!("Bearer {TOKEN}")) {
        return respond("401 Unauthorized", &[("X-Error-Code", "GatedRepo".into())], b"{\"error\":\"gated\"}");
    }
    if path.starts_with("/api/models/") {
        let siblings: Vec<_> = state.files.keys().map(|f| serde_json::json!({ "rfilename": f })).collect();
        let body = serde_json::json!({ "id": repo, "modelId": repo, "sha": SHA, "siblings": siblings });
        return respond("200 OK", &[("Content-Type", "application/json".into())], body.to_string().as_bytes());
    }
    if let Some(file) = path.strip_prefix(&format!("/cdn/{repo}/")) {
        return state.files.get(file).map_or_else(|| not_found("EntryNotFound".into()), |b| ranged(b, range, &[]));
    }
    let Some(bytes) = path.strip_prefix(&format!("/{repo}/resolve/main/")).and_then(|f| state.files.get(f)) else {
        return not_found("EntryNotFound".into());
    };
    let etag = format!("\"{:016x}\"", fnv(bytes));
    if path.ends_with(".gguf") {
        // LFS files: the Hub redirects to its CDN, the content hash in x-linked-etag
        let location = format!("http://127.0.0.1:{port}{}", path.replacen("/resolve/main/", "/", 1).replacen('/', "/cdn/", 1));
        let headers = [("Location", location), ("X-Repo-Commit", SHA.into()), ("X-Linked-Etag", etag)];
        return respond("302 Found", &headers, b"");
    }
    ranged(bytes, range, &[("X-Repo-Commit", SHA.into()), ("ETag", etag)])
}

/// The bytes asked by `Range: bytes=A-[B]` (206 with Content-Range), or all of them (200).
fn ranged(bytes: &[u8], range: Option<&str>, headers: &[(&str, String)]) -> Vec<u8> {
    let mut headers = headers.to_vec();
    let Some((a, b)) = range.and_then(|r| r.strip_prefix("bytes=")).and_then(|r| r.split_once('-')) else {
        return respond("200 OK", &headers, bytes);
    };
    let len = bytes.len();
    let last = len.saturating_sub(1);
    let start = a.parse::<usize>().unwrap_or(0).min(last);
    let end = b.parse::<usize>().map_or(last, |e| e.min(last)).max(start);
    headers.push(("Content-Range", format!("bytes {start}-{end}/{len}")));
    respond("206 Partial Content", &headers, &bytes[start..=end])
}

/// An HTTP/1.1 response that closes the connection.
fn respond(status: &str, headers: &[(&str, String)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
    for (k, v) in headers {
        out += &format!("{k}: {v}\r\n");
    }
    out += "\r\n";
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

/// A content hash standing in for the Hub's sha256 etags.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100000001b3))
}

/// Runs the binary against `endpoint` with HF_HOME=`home` (and extra environment variables).
fn csp(endpoint: &str, home: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_csp-llava"));
    cmd.args(args).env("HF_ENDPOINT", endpoint).env("HF_HOME", home);
    for var in ["RUST_LOG", "HF_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_CACHE"] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("binary runs")
}

/// `-hf SPEC -p hi -n 4 --temp 0 --json` plus `extra`.
fn run_hf(endpoint: &str, home: &Path, env: &[(&str, &str)], spec: &str, extra: &[&str]) -> Output {
    let mut args = vec!["-hf", spec, "-p", "hi", "-n", "4", "--temp", "0", "--json"];
    args.extend_from_slice(extra);
    csp(endpoint, home, env, &args)
}

/// Asserts the run answered: exit 0 and one JSON object on stdout.
#[track_caller]
fn assert_answers(out: &Output) -> serde_json::Value {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "expected success; stderr: {err}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON object");
    assert!(v.get("n_generated").is_some() && v.get("text").is_some(), "{v}");
    v
}

/// Asserts a clean failure (exit 1) whose one stderr line has every needle.
#[track_caller]
fn assert_fails_with(out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "expected exit 1; stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    let lines: Vec<_> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected, got: {err}");
    assert!(lines[0].starts_with("csp-llava: error: "), "{err}");
    for n in needles {
        assert!(lines[0].contains(n), "expected '{n}' in: {err}");
    }
}

/// Where the snapshot of `repo` at [`SHA`] keeps `file` under HF_HOME.
fn snapshot(home: &Path, repo: &str, file: &str) -> PathBuf {
    home.join("hub").join(format!("models--{}", repo.replace('/', "--"))).join("snapshots").join(SHA).join(file)
}

#[test]
fn quant_downloads_its_file_and_works_from_the_cache_without_the_hub() {
    let mut hub = FakeHub::start();
    let home = tempfile::tempdir().unwrap();
    let out = run_hf(&hub.url(), home.path(), &[], "user/tiny:Q8_0", &[]);
    assert_answers(&out);
    assert_eq!(hub.downloads("tiny-Q8_0.gguf"), 1, "{:?}", hub.hits());
    assert_eq!(hub.downloads("mmproj-tiny-f16.gguf"), 1, "{:?}", hub.hits());
    assert_eq!(hub.downloads("tiny-Q4_K_M.gguf"), 0, "{:?}", hub.hits());
    assert!(hub.hits().iter().any(|h| h.path == "/api/models/user/tiny/revision/main"), "{:?}", hub.hits());
    let cached = snapshot(home.path(), "user/tiny", "tiny-Q8_0.gguf");
    assert_eq!(std::fs::read(&cached).unwrap(), std::fs::read(support::model()).unwrap());
    assert!(snapshot(home.path(), "user/tiny", "mmproj-tiny-f16.gguf").is_file());

    // the quant in lower case; the cached snapshot of the listed commit is not downloaded again
    assert_answers(&run_hf(&hub.url(), home.path(), &[], "user/tiny:q8_0", &[]));
    assert_eq!(hub.downloads("tiny-Q8_0.gguf"), 1, "downloaded again: {:?}", hub.hits());

    // the Hub gone: the cache answers (with a warning)
    let url = hub.url();
    hub.stop();
    let out = run_hf(&url, home.path(), &[], "user/tiny:Q8_0", &[]);
    assert_answers(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the Hugging Face Hub"));
    // HF_HUB_OFFLINE: no network at all
    assert_answers(&run_hf(&url, home.path(), &[("HF_HUB_OFFLINE", "1")], "user/tiny:Q8_0", &[]));
    // what is not cached is not there offline; the message names what is
    let out = run_hf(&url, home.path(), &[("HF_HUB_OFFLINE", "1")], "user/tiny:Q4_K_M", &[]);
    assert_fails_with(&out, &["HF_HUB_OFFLINE", "Q4_K_M", "Q8_0"]);
    let out = run_hf(&url, home.path(), &[], "user/tiny:Q4_K_M", &[]);
    assert_fails_with(&out, &["cannot reach the Hugging Face Hub", "Q4_K_M", "Q8_0"]);
}

#[test]
fn no_quant_and_q4_k_m_pick_q4_k_m() {
    let hub = FakeHub::start();
    let home = tempfile::tempdir().unwrap();
    assert_answers(&run_hf(&hub.url(), home.path(), &[], "user/tiny", &[]));
    assert_eq!(hub.downloads("tiny-Q4_K_M.gguf"), 1, "{:?}", hub.hits());
    assert_eq!(hub.downloads("tiny-Q8_0.gguf"), 0, "{:?}", hub.hits());
    assert_eq!(hub.downloads("mmproj-tiny-f16.gguf"), 1, "{:?}", hub.hits());
    assert!(snapshot(home.path(), "user/tiny", "tiny-Q4_K_M.gguf").is_file());
    // same file: taken from the cache
    assert_answers(&run_hf(&hub.url(), home.path(), &[], "user/tiny:Q4_K_M", &[]));
    assert_eq!(hub.downloads("tiny-Q4_K_M.gguf"), 1, "{:?}", hub.hits());
    assert_eq!(hub.downloads("tiny-Q8_0.gguf"), 0, "{:?}", hub.hits());
    // a fresh cache downloads it again
    let home2 = tempfile::tempdir().unwrap();
    assert_answers(&run_hf(&hub.url(), home2.path(), &[], "user/tiny:Q4_K_M", &[]));
    assert_eq!(hub.downloads("tiny-Q4_K_M.gguf"), 2, "{:?}", hub.hits());
}

#[test]
fn hf_file_names_the_model() {
    let hub = FakeHub::start();
    let home = tempfile::tempdir().unwrap();
    assert_answers(&run_hf(&hub.url(), home.path(), &[], "user/tiny", &["-hff", "tiny-Q8_0.gguf"]));
    assert_eq!(hub.downloads("tiny-Q8_0.gguf"), 1, "{:?}", hub.hits());
    assert_eq!(hub.downloads("tiny-Q4_K_M.gguf"), 0, "{:?}", hub.hits());
    let out = run_hf(&hub.url(), home.path(), &[], "user/tiny", &["-hff", "tiny-Q2_K.gguf"]);
    assert_fails_with(&out, &["tiny-Q2_K.gguf", "tiny-Q4_K_M.gguf", "tiny-Q8_0.gguf"]);
}

#[test]
fn unknown_quant_names_the_quants_there_are() {
    let hub = FakeHub::start();
    let home = tempfile::tempdir().unwrap();
    let out = run_hf(&hub.url(), home.path(), &[], "user/tiny:Q5_K_S", &[]);
    assert_fails_with(&out, &["user/tiny", "Q5_K_S", "Q4_K_M, Q8_0"]);
    assert!(hub.hits().iter().all(|h| !h.path.contains("/resolve/")), "nothing downloaded: {:?}", hub.hits());
}

#[test]
fn unknown_repo_and_gated_repo() {
    let hub = FakeHub::start();
    let home = tempfile::tempdir().unwrap();
    let out = run_hf(&hub.url(), home.path(), &[], "user/missing", &[]);
    assert_fails_with(&out, &["user/missing", "not found", "HTTP 404"]);
    let out = run_hf(&hub.url(), home.path(), &[], "user/gated:Q8_0", &[]);
    assert_fails_with(&out, &["user/gated", "HTTP 401", "HF_TOKEN"]);
    // --hf-token and HF_TOKEN are sent as a bearer token
    assert_answers(&run_hf(&hub.url(), home.path(), &[], "user/gated:Q8_0", &["-hft", TOKEN]));
    let home2 = tempfile::tempdir().unwrap();
    assert_answers(&run_hf(&hub.url(), home2.path(), &[("HF_TOKEN", TOKEN)], "user/gated:Q8_0", &[]));
    let bearer = format!("Bearer {TOKEN}");
    let gated: Vec<_> = hub.hits().into_iter().filter(|h| h.path.contains("user/gated")).collect();
    assert!(gated.iter().filter(|h| h.auth.as_deref() == Some(bearer.as_str())).count() >= 4, "{gated:?}");
}

#[test]
fn unreachable_hub_with_an_empty_cache_is_one_line() {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let home = tempfile::tempdir().unwrap();
    let out = run_hf(&format!("http://127.0.0.1:{port}"), home.path(), &[], "user/tiny:Q8_0", &[]);
    assert_fails_with(&out, &["cannot reach the Hugging Face Hub at http://127.0.0.1", "nothing for user/tiny is cached"]);
    let out = run_hf(&format!("http://127.0.0.1:{port}"), home.path(), &[("HF_HUB_OFFLINE", "1")], "user/tiny", &[]);
    assert_fails_with(&out, &["HF_HUB_OFFLINE", "nothing for user/tiny is cached"]);
}

#[test]
fn bad_spec_is_one_line() {
    let home = tempfile::tempdir().unwrap();
    for spec in ["tiny", "user/tiny/extra", "user/ti ny", "user/tiny:Q4 K"] {
        let out = run_hf("http://127.0.0.1:9", home.path(), &[], spec, &[]);
        assert_fails_with(&out, &["bad -hf value", "USER/REPO[:QUANT]"]);
    }
    let out = run_hf("localhost:8080", home.path(), &[], "user/tiny", &[]);
    assert_fails_with(&out, &["HF_ENDPOINT"]);
}
