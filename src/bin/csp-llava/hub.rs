//! `-hf user/repo[:quant]`: the model GGUF and its projector from a Hugging Face repository,
//! through the `hf-hub` crate, into the standard Hugging Face cache.
//!
//! The files are picked the way llama.cpp's `common/download.cpp` picks them: with `:QUANT`, the
//! first model GGUF whose name has the quant followed by `.` or `-` (case-insensitive); without,
//! Q4_K_M, else Q8_0, else the first model GGUF. A model GGUF is any `.gguf` that is not a
//! projector (`mmproj`), an importance matrix or a draft model. A split model
//! (`NAME-00001-of-0000N.gguf`) brings all its parts; the first is returned. The projector is the
//! `mmproj*.gguf` nearest to the model in the repository's folders, preferring the model's
//! quant, then f16, then the first one.
//!
//! The environment is the Hugging Face one: `HF_ENDPOINT`, `HF_TOKEN` (after `--hf-token`, before
//! the cache's token file), `HF_HUB_CACHE`/`HF_HOME` (default `~/.cache/huggingface/hub`) and
//! `HF_HUB_OFFLINE`. Files already in the snapshot of the repository's current commit are not
//! downloaded again; when the Hub cannot be reached (or `HF_HUB_OFFLINE` is set) the same rules
//! pick among the files of the cached snapshot.

use std::fmt;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::api::{Progress, RepoInfo};
use hf_hub::{Cache, Repo};
use indicatif::{ProgressBar, ProgressStyle};

use crate::args::HfArgs;

/// The Hub used when `HF_ENDPOINT` is not set.
const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// The only revision `-hf` reads (as llama.cpp).
const REVISION: &str = "main";
/// How long the repository listing may take before the Hub counts as unreachable.
const INFO_TIMEOUT: Duration = Duration::from_secs(30);
/// How often an interrupted download is resumed before giving up.
const DOWNLOAD_RETRIES: usize = 3;
/// Quants tried, in order, when `-hf` names none (as llama.cpp).
const DEFAULT_QUANTS: [&str; 2] = ["Q4_K_M", "Q8_0"];
/// Words in a GGUF file name that make it something other than a model (as llama.cpp).
const NOT_MODEL: [&str; 6] = ["mmproj", "imatrix", "mtp-", "eagle3-", "dflash-", "dspark-"];
/// At most this many names are listed in an error message.
const MAX_LISTED: usize = 12;

/// The files `-hf` names, downloaded (or found in the cache).
#[derive(Debug)]
pub struct HfFiles {
    /// The text model GGUF (its first part if it is split).
    pub model: PathBuf,
    /// The projector (`mmproj*.gguf`), if the repository has one.
    pub mmproj: Option<PathBuf>,
}

/// Resolves `-hf`/`-hff`/`-hft` to local files: lists the repository, picks the files, and
/// downloads those the cache does not have. Errors are one line.
pub fn resolve(hf: &HfArgs) -> Result<HfFiles> {
    let raw = hf.hf_repo.as_deref().unwrap_or_default();
    let spec = Spec::parse(raw)?;
    let hub = Hub::from_env(hf.hf_token.as_deref())?;
    let want = Want { quant: spec.quant.as_deref(), file: hf.hf_file.as_deref() };
    if hub.offline {
        return from_cache(&hub, &spec.repo, want)
            .map_err(|e| anyhow!("HF_HUB_OFFLINE is set; {e} (cache: {})", hub.cache_dir.display()));
    }
    match online(&hub, &spec.repo, want) {
        Ok(files) => Ok(files),
        Err(Failure::Fatal(e)) => Err(e),
        Err(Failure::Unreachable(cause)) => {
            let unreachable = format!("cannot reach the Hugging Face Hub at {} ({cause})", hub.endpoint);
            let files = from_cache(&hub, &spec.repo, want).map_err(|e| anyhow!("{unreachable}; {e}"))?;
            tracing::warn!("{unreachable}; using the cached files of {}", spec.repo);
            Ok(files)
        }
    }
}

/// A parsed `user/repo[:quant]`.
#[derive(Debug, PartialEq)]
struct Spec {
    /// `user/repo`.
    repo: String,
    /// The quant after `:`, if any.
    quant: Option<String>,
}

impl Spec {
    /// Parses and checks `user/repo[:quant]` (an empty quant is no quant, as in llama.cpp).
    fn parse(raw: &str) -> Result<Spec> {
        let bad = |why: &str| {
            anyhow!("bad -hf value '{raw}': {why}; expected USER/REPO[:QUANT], e.g. ggml-org/SmolVLM-256M-Instruct-GGUF:Q8_0")
        };
        let (repo, quant) = match raw.split_once(':') {
            Some((r, q)) => (r, Some(q)),
            None => (raw, None),
        };
        let Some((user, name)) = repo.split_once('/') else {
            return Err(bad("no '/' between the user and the repository"));
        };
        if user.is_empty() || name.is_empty() || name.contains('/') {
            return Err(bad("the repository must be exactly USER/REPO"));
        }
        if !repo.chars().all(|c| c == '/' || is_name_char(c)) {
            return Err(bad("a repository name has only letters, digits, '-', '_' and '.'"));
        }
        let quant = quant.filter(|q| !q.is_empty());
        if quant.is_some_and(|q| !q.chars().all(is_name_char)) {
            return Err(bad("a quant has only letters, digits, '-', '_' and '.'"));
        }
        Ok(Spec { repo: repo.to_owned(), quant: quant.map(str::to_owned) })
    }
}

/// Characters of Hub user, repository and quant names.
fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

/// What the user asked for besides the repository.
#[derive(Debug, Clone, Copy)]
struct Want<'a> {
    /// The quant of `user/repo:QUANT`.
    quant: Option<&'a str>,
    /// The model file of `-hff`.
    file: Option<&'a str>,
}

/// Where the Hub and the cache are, and how to talk to the Hub (from the environment).
struct Hub {
    /// The Hub's base URL, without a trailing `/`.
    endpoint: String,
    /// The hub cache folder (`…/huggingface/hub`).
    cache_dir: PathBuf,
    /// `--hf-token`, else `HF_TOKEN` (else hf-hub reads the cache's token file).
    token: Option<String>,
    /// `HF_HUB_OFFLINE`: never touch the network.
    offline: bool,
}

impl Hub {
    /// Reads `HF_ENDPOINT`, `HF_HUB_CACHE`/`HF_HOME`, `HF_TOKEN` and `HF_HUB_OFFLINE`.
    fn from_env(token_flag: Option<&str>) -> Result<Hub> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let endpoint = var("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned());
        let endpoint = endpoint.trim().trim_end_matches('/').to_owned();
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) || endpoint.contains(char::is_whitespace) {
            bail!("bad HF_ENDPOINT '{endpoint}': expected an http:// or https:// URL");
        }
        let token = token_flag.map(str::to_owned).or_else(|| var("HF_TOKEN")).map(|t| t.trim().to_owned());
        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| is_truthy(&v));
        Ok(Hub { endpoint, cache_dir: cache_dir(var)?, token, offline })
    }
}

/// `1`, `true`, `yes`, `on` (any case), as huggingface_hub reads boolean variables.
fn is_truthy(v: &str) -> bool {
    matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
}

/// The hub cache folder: `HF_HUB_CACHE`, else `HF_HOME/hub`, else
/// `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub` (as huggingface_hub).
fn cache_dir(var: impl Fn(&str) -> Option<String>) -> Result<PathBuf> {
    if let Some(dir) = var("HF_HUB_CACHE") {
        return Ok(dir.into());
    }
    let home = var("HF_HOME").map(PathBuf::from).or_else(|| {
        var("XDG_CACHE_HOME").or_else(|| var("HOME").map(|h| format!("{h}/.cache"))).map(|c| Path::new(&c).join("huggingface"))
    });
    home.map(|h| h.join("hub"))
        .ok_or_else(|| anyhow!("cannot find the Hugging Face cache: set HF_HOME (or HOME)"))
}

/// Why talking to the Hub failed: unreachable (the cache may answer instead) or not.
enum Failure {
    /// No network, a timeout or a server error: the cause, one line.
    Unreachable(String),
    /// Anything else (not found, refused, bad answer, local I/O): the final error.
    Fatal(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Fatal(e)
    }
}

/// Lists the repository on the Hub, picks the files and fetches those not cached.
fn online(hub: &Hub, repo_id: &str, want: Want) -> Result<HfFiles, Failure> {
    let mut builder = ApiBuilder::from_cache(Cache::new(hub.cache_dir.clone()))
        .with_endpoint(hub.endpoint.clone())
        .with_progress(false)
        .with_retries(DOWNLOAD_RETRIES)
        .with_user_agent("csp-llava", env!("CARGO_PKG_VERSION"));
    if hub.token.is_some() {
        builder = builder.with_token(hub.token.clone());
    }
    let api = builder.build().map_err(|e| anyhow!("cannot set up the Hugging Face Hub client: {}", one_line(&e)))?;
    let repo = api.repo(Repo::model(repo_id.to_owned()));
    let info = repo_info(&repo, hub, repo_id)?;
    let names: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let plan = pick(&names, want).map_err(|e| anyhow!("{repo_id} on {}: {e}", hub.endpoint))?;
    let snapshot = hub.cache_dir.join(Repo::model(repo_id.to_owned()).folder_name()).join("snapshots").join(&info.sha);
    let get = |name: &str| fetch(&repo, &snapshot, name, repo_id);
    let mut model = None;
    for part in &plan.model {
        let path = get(part)?;
        model.get_or_insert(path);
    }
    let model = model.ok_or_else(|| anyhow!("{repo_id}: no model file was picked"))?;
    let mmproj = plan.mmproj.as_deref().map(get).transpose()?;
    Ok(HfFiles { model, mmproj })
}

/// The repository's file list and commit (`/api/models/{repo}/revision/main`).
fn repo_info(repo: &ApiRepo, hub: &Hub, repo_id: &str) -> Result<RepoInfo, Failure> {
    let response = repo.info_request().timeout(INFO_TIMEOUT).call().map_err(|e| match e {
        ureq::Error::Status(code, _) if code < 500 => Failure::Fatal(not_found(hub, repo_id, code)),
        e => classify(e, repo_id),
    })?;
    response.into_json::<RepoInfo>().map_err(|e| {
        Failure::Fatal(anyhow!("unexpected answer from {} about {repo_id} (not a repository listing: {})", hub.endpoint, one_line(&e)))
    })
}

/// The error for a repository the Hub refuses to list (HTTP 4xx).
fn not_found(hub: &Hub, repo_id: &str, code: u16) -> anyhow::Error {
    let hint = match (code, hub.token.is_some()) {
        (401 | 403 | 404, false) => "; if it is private or gated, give a token with --hf-token or HF_TOKEN",
        (401 | 403, true) => "; check that the token may read it (gated repositories need their terms accepted)",
        _ => "",
    };
    let what = if matches!(code, 401 | 403) { "cannot be read from" } else { "was not found on" };
    anyhow!("the repository {repo_id} {what} {} (HTTP {code}{hint})", hub.endpoint)
}

/// One file of the repository: from the snapshot of the listed commit if it is there, else
/// downloaded (with a progress bar on a terminal).
fn fetch(repo: &ApiRepo, snapshot: &Path, name: &str, repo_id: &str) -> Result<PathBuf, Failure> {
    let cached = snapshot.join(name);
    if cached.is_file() {
        tracing::info!("using the cached {}", cached.display());
        return Ok(cached);
    }
    tracing::info!("downloading {name} from {repo_id}");
    let bar = if std::io::stderr().is_terminal() { ProgressBar::new(0) } else { ProgressBar::hidden() };
    let result = repo.download_with_progress(name, Bar(bar.clone()));
    if result.is_err() {
        bar.finish_and_clear();
    }
    result.map_err(|e| match e {
        ApiError::RequestError(e) => classify(*e, &format!("{name} of {repo_id}")),
        ApiError::TooManyRetries(e) => Failure::Unreachable(format!("downloading {name} failed: {}", one_line(&e))),
        ApiError::IoError(e) if is_network_io(&e) => Failure::Unreachable(one_line(&e)),
        e => Failure::Fatal(anyhow!("cannot download {name} of {repo_id}: {}", one_line(&e))),
    })
}

/// Sorts an HTTP client error: transport errors and 5xx make the Hub unreachable.
fn classify(e: ureq::Error, what: &str) -> Failure {
    match e {
        ureq::Error::Transport(t) => {
            let mut cause = t.kind().to_string();
            if let Some(m) = t.message() {
                cause += &format!(": {m}");
            }
            if let Some(s) = std::error::Error::source(&t) {
                cause += &format!(": {s}");
            }
            Failure::Unreachable(one_line(&cause))
        }
        ureq::Error::Status(code, _) if code >= 500 => Failure::Unreachable(format!("HTTP {code}")),
        ureq::Error::Status(code, _) => Failure::Fatal(anyhow!("cannot download {what}: HTTP {code}")),
    }
}

/// I/O errors that come from the connection rather than the disk.
fn is_network_io(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionReset | ConnectionAborted | ConnectionRefused | TimedOut | UnexpectedEof | BrokenPipe)
}

/// A message on one line (causes joined, line breaks replaced).
fn one_line(e: &dyn fmt::Display) -> String {
    e.to_string().split_whitespace().collect::<Vec<_>>().join(" ")
}

/// hf-hub's progress callbacks drawn on an indicatif bar (hidden when stderr is not a terminal).
struct Bar(ProgressBar);

impl Progress for Bar {
    fn init(&mut self, size: usize, filename: &str) {
        let style = ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ({eta})")
            .map(|s| s.progress_chars("=> "))
            .unwrap_or_else(|_| ProgressStyle::default_bar());
        self.0.set_style(style);
        self.0.set_length(size as u64);
        self.0.set_position(0);
        self.0.set_message(filename.rsplit('/').next().unwrap_or(filename).to_owned());
    }

    fn update(&mut self, size: usize) {
        self.0.inc(size as u64);
    }

    fn finish(&mut self) {
        self.0.finish();
    }
}

/// The files of the cached snapshot of `main`, picked by the same rules (no network).
fn from_cache(hub: &Hub, repo_id: &str, want: Want) -> Result<HfFiles> {
    let cache = Cache::new(hub.cache_dir.clone()).repo(Repo::model(repo_id.to_owned()));
    let names = cached_names(&hub.cache_dir, repo_id);
    if names.is_empty() {
        bail!("nothing for {repo_id} is cached");
    }
    let plan = pick(&names, want).map_err(|e| anyhow!("in the cache of {repo_id}: {e}"))?;
    let get = |name: &str| cache.get(name).with_context(|| format!("{name} of {repo_id} is not in the cache"));
    let mut parts = plan.model.iter().map(|p| get(p)).collect::<Result<Vec<_>>>()?.into_iter();
    let model = parts.next().ok_or_else(|| anyhow!("{repo_id}: no model file was picked"))?;
    let mmproj = plan.mmproj.as_deref().map(get).transpose()?;
    Ok(HfFiles { model, mmproj })
}

/// The files (relative paths, `/`-separated, sorted) of the snapshot `refs/main` points to;
/// empty when there is none.
fn cached_names(cache_dir: &Path, repo_id: &str) -> Vec<String> {
    let repo_dir = cache_dir.join(Repo::model(repo_id.to_owned()).folder_name());
    let Ok(commit) = std::fs::read_to_string(repo_dir.join("refs").join(REVISION)) else {
        return Vec::new();
    };
    let mut names = Vec::new();
    walk(&repo_dir.join("snapshots").join(commit.trim()), "", &mut names);
    names.sort();
    names
}

/// Collects the files under `dir` (following the snapshot's links to blobs) as `prefix/name`.
fn walk(dir: &Path, prefix: &str, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let Some(name) = entry.file_name().to_str().map(|n| format!("{prefix}{n}")) else { continue };
        let path = entry.path();
        if path.is_dir() {
            walk(&path, &format!("{name}/"), out);
        } else if path.is_file() {
            out.push(name);
        }
    }
}

/// What to fetch: the model's files (all parts of a split, in order) and the projector.
#[derive(Debug, PartialEq)]
struct Plan {
    /// The model file, or the parts of a split model (the first part first).
    model: Vec<String>,
    /// The `mmproj*.gguf` projector, if there is one.
    mmproj: Option<String>,
}

/// Why no model could be picked from a file list.
#[derive(Debug, PartialEq)]
enum PickError {
    /// No model GGUF at all; some of the files there are.
    NoGguf(Vec<String>),
    /// No model GGUF with the quant asked; the quants there are.
    NoQuant { quant: String, available: Vec<String> },
    /// The `-hff` file is not there; the GGUF files there are.
    NoFile { file: String, available: Vec<String> },
    /// A split model misses parts.
    MissingParts { file: String, count: u32, found: usize },
}

impl fmt::Display for PickError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PickError::NoGguf(files) => write!(f, "no GGUF model file (files: {})", listing(files)),
            PickError::NoQuant { quant, available } => {
                write!(f, "no GGUF file for quant {quant}; the quants there are {}", listing(available))
            }
            PickError::NoFile { file, available } => {
                write!(f, "no file {file}; the GGUF files there are {}", listing(available))
            }
            PickError::MissingParts { file, count, found } => {
                write!(f, "{file} is split in {count} parts but {found} are there")
            }
        }
    }
}

/// Names joined by ", " (at most [`MAX_LISTED`], then a count), or "none".
fn listing(names: &[String]) -> String {
    if names.is_empty() {
        return "none".into();
    }
    let mut s = names.iter().take(MAX_LISTED).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > MAX_LISTED {
        s += &format!(" and {} more", names.len() - MAX_LISTED);
    }
    s
}

/// Picks the model (and its split parts) and the projector from a repository's file list
/// (llama.cpp's rules; see the module doc).
fn pick(files: &[String], want: Want) -> Result<Plan, PickError> {
    let primary = match want.file {
        Some(file) => files.iter().find(|f| *f == file).ok_or_else(|| PickError::NoFile {
            file: file.to_owned(),
            available: files.iter().filter(|f| is_gguf(f)).cloned().collect(),
        })?,
        None => find_model(files, want.quant)?,
    };
    let model = split_parts(files, primary)?;
    let quant = want.quant.map(str::to_ascii_uppercase).or_else(|| GgufName::parse(primary).map(|n| n.tag));
    let mmproj = find_mmproj(files, primary, quant.as_deref()).cloned();
    Ok(Plan { model, mmproj })
}

/// A `.gguf` file name (any case).
fn is_gguf(path: &str) -> bool {
    path.to_ascii_lowercase().ends_with(".gguf")
}

/// The file name after the last `/`.
fn base_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// A GGUF that is a model (not a projector, importance matrix or draft model).
fn is_model(path: &str) -> bool {
    let base = base_name(path).to_ascii_lowercase();
    is_gguf(path) && !NOT_MODEL.iter().any(|w| base.contains(w))
}

/// A GGUF file name split as llama.cpp splits it.
#[derive(Debug, PartialEq)]
struct GgufName {
    /// The path without `.gguf` and without `-0000K-of-0000N` (the tag included).
    prefix: String,
    /// The quant at the end of the prefix after `-` or `.`, upper case (`Q4_K_M`, `F16`), or "".
    tag: String,
    /// The part number (1 when not split).
    index: u32,
    /// The number of parts (1 when not split).
    count: u32,
}

impl GgufName {
    /// Splits `path` (None when it is not a `.gguf`).
    fn parse(path: &str) -> Option<GgufName> {
        if !is_gguf(path) {
            return None;
        }
        let mut prefix = &path[..path.len() - ".gguf".len()];
        let (mut index, mut count) = (1, 1);
        if let Some((p, i, n)) = split_suffix(prefix) {
            (prefix, index, count) = (p, i, n);
        }
        let tail = prefix.rsplit(['-', '.']).next().unwrap_or("");
        let has_sep = prefix.len() > tail.len();
        let tag = if has_sep && !tail.is_empty() && tail.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            tail.to_ascii_uppercase()
        } else {
            String::new()
        };
        Some(GgufName { prefix: prefix.to_owned(), tag, index, count })
    }
}

/// `NAME-0000K-of-0000N` → (`NAME`, K, N), five digits each (llama.cpp's split names).
fn split_suffix(s: &str) -> Option<(&str, u32, u32)> {
    let n = s.len().checked_sub(15)?;
    let (prefix, tail) = (s.get(..n)?, s.get(n..)?);
    let digits = |d: &str| (d.len() == 5 && d.bytes().all(|b| b.is_ascii_digit())).then(|| d.parse().ok()).flatten();
    let index = digits(tail.get(1..6)?)?;
    let count = digits(tail.get(10..15)?)?;
    let sep_ok = tail.starts_with('-') && tail.get(6..10).is_some_and(|m| m.eq_ignore_ascii_case("-of-"));
    (sep_ok && !prefix.is_empty()).then_some((prefix, index, count))
}

/// Whether `path` has the quant followed by `.` or `-` (llama.cpp's `QUANT[.-]`, any case).
fn has_quant(path: &str, quant: &str) -> bool {
    let (p, q) = (path.to_ascii_lowercase(), quant.to_ascii_lowercase());
    p.contains(&format!("{q}.")) || p.contains(&format!("{q}-"))
}

/// Not a later part of a split model.
fn is_first_part(path: &str) -> bool {
    GgufName::parse(path).is_none_or(|n| n.count <= 1 || n.index == 1)
}

/// The model GGUF for the quant asked (else Q4_K_M, else Q8_0, else the first model GGUF).
fn find_model<'a>(files: &'a [String], quant: Option<&str>) -> Result<&'a String, PickError> {
    let models: Vec<&String> = files.iter().filter(|f| is_model(f) && is_first_part(f)).collect();
    let quants: Vec<&str> = quant.map_or(DEFAULT_QUANTS.to_vec(), |q| vec![q]);
    let found = quants.iter().find_map(|q| models.iter().find(|f| has_quant(f, q)));
    match (found, quant) {
        (Some(f), _) => Ok(f),
        (None, None) => models.first().copied().ok_or_else(|| PickError::NoGguf(files.to_vec())),
        (None, Some(_)) if models.is_empty() => Err(PickError::NoGguf(files.to_vec())),
        (None, Some(q)) => Err(PickError::NoQuant { quant: q.to_owned(), available: quants_of(&models) }),
    }
}

/// The quants of the model files (their file names where there is no quant), without repeats.
fn quants_of(models: &[&String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for f in models {
        let name = GgufName::parse(f).map(|n| n.tag).filter(|t| !t.is_empty()).unwrap_or_else(|| f.to_string());
        if !out.contains(&name) {
            out.push(name);
        }
    }
    out
}

/// All parts of the model `primary` (itself alone when it is not split), the first first.
fn split_parts(files: &[String], primary: &str) -> Result<Vec<String>, PickError> {
    let Some(name) = GgufName::parse(primary).filter(|n| n.count > 1) else {
        return Ok(vec![primary.to_owned()]);
    };
    let mut parts: Vec<(u32, &String)> = files
        .iter()
        .filter_map(|f| GgufName::parse(f).map(|n| (n, f)))
        .filter(|(n, _)| n.prefix == name.prefix && n.count == name.count)
        .map(|(n, f)| (n.index, f))
        .collect();
    parts.sort();
    parts.dedup_by_key(|(i, _)| *i);
    if parts.len() != name.count as usize || parts.first().is_none_or(|(i, _)| *i != 1) {
        return Err(PickError::MissingParts { file: primary.to_owned(), count: name.count, found: parts.len() });
    }
    Ok(parts.into_iter().map(|(_, f)| f.clone()).collect())
}

/// The folders of a path (all but the file name).
fn folders(path: &str) -> Vec<&str> {
    let mut parts: Vec<&str> = path.split('/').collect();
    parts.pop();
    parts
}

/// The projector for `model`: an `mmproj*.gguf` in the model's folder or one above it, the
/// deepest first, then the one with the quant, then f16, then the first.
fn find_mmproj<'a>(files: &'a [String], model: &str, quant: Option<&str>) -> Option<&'a String> {
    let model_dirs = folders(model);
    let mut best: Option<(usize, u8, &String)> = None;
    for f in files.iter().filter(|f| is_gguf(f) && base_name(f).to_ascii_lowercase().contains("mmproj")) {
        let dirs = folders(f);
        if dirs.len() > model_dirs.len() || dirs[..] != model_dirs[..dirs.len()] {
            continue;
        }
        let tag = GgufName::parse(f).map(|n| n.tag).unwrap_or_default();
        let rank = match tag.as_str() {
            t if quant.is_some_and(|q| q.eq_ignore_ascii_case(t)) => 2,
            "F16" => 1,
            _ => 0,
        };
        if best.is_none_or(|(d, r, _)| (dirs.len(), rank) > (d, r)) {
            best = Some((dirs.len(), rank, f));
        }
    }
    best.map(|(_, _, f)| f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn want<'a>(quant: Option<&'a str>, file: Option<&'a str>) -> Want<'a> {
        Want { quant, file }
    }

    const REPO: [&str; 7] = [
        ".gitattributes",
        "README.md",
        "mmproj-tiny-f16.gguf",
        "mmproj-tiny-Q8_0.gguf",
        "tiny-Q4_K_M.gguf",
        "tiny-Q4_K.gguf",
        "tiny-Q8_0.gguf",
    ];

    #[test]
    fn spec_parses_and_rejects_bad_values() {
        assert_eq!(Spec::parse("a/b").unwrap(), Spec { repo: "a/b".into(), quant: None });
        assert_eq!(Spec::parse("a/b:").unwrap(), Spec { repo: "a/b".into(), quant: None });
        assert_eq!(Spec::parse("ggml-org/X.y_z:q4_k_m").unwrap().quant.as_deref(), Some("q4_k_m"));
        for bad in ["", "ab", "/b", "a/", "a/b/c", "a b/c", "a/b:Q4 K", "a/b:Q:4"] {
            let e = Spec::parse(bad).unwrap_err().to_string();
            assert!(e.contains("USER/REPO[:QUANT]") && !e.contains('\n'), "{bad}: {e}");
        }
    }

    #[test]
    fn quant_picks_its_file_case_insensitively_and_its_projector() {
        let files = names(&REPO);
        let p = pick(&files, want(Some("q8_0"), None)).unwrap();
        assert_eq!(p, Plan { model: names(&["tiny-Q8_0.gguf"]), mmproj: Some("mmproj-tiny-Q8_0.gguf".into()) });
        // Q4_K does not match Q4_K_M (the quant must be followed by '.' or '-')
        assert_eq!(pick(&files, want(Some("Q4_K"), None)).unwrap().model, names(&["tiny-Q4_K.gguf"]));
        // no projector with the quant: f16
        let p = pick(&files, want(Some("Q4_K_M"), None)).unwrap();
        assert_eq!(p.model, names(&["tiny-Q4_K_M.gguf"]));
        assert_eq!(p.mmproj.as_deref(), Some("mmproj-tiny-f16.gguf"));
    }

    #[test]
    fn default_is_q4_k_m_then_q8_0_then_the_first_model() {
        let files = names(&REPO);
        assert_eq!(pick(&files, want(None, None)).unwrap().model, names(&["tiny-Q4_K_M.gguf"]));
        let files = names(&["mmproj-a-F32.gguf", "x-Q5_K_S.gguf", "x-Q8_0.gguf"]);
        let p = pick(&files, want(None, None)).unwrap();
        assert_eq!(p.model, names(&["x-Q8_0.gguf"]));
        assert_eq!(p.mmproj.as_deref(), Some("mmproj-a-F32.gguf"), "the only projector");
        let files = names(&["imatrix.gguf", "mmproj-f16.gguf", "x-IQ2_XS.gguf", "x-Q5_K_S.gguf"]);
        let p = pick(&files, want(None, None)).unwrap();
        assert_eq!(p, Plan { model: names(&["x-IQ2_XS.gguf"]), mmproj: Some("mmproj-f16.gguf".into()) });
    }

    #[test]
    fn missing_quant_lists_the_quants_there_are() {
        let e = pick(&names(&REPO), want(Some("Q5_K_S"), None)).unwrap_err();
        let available = names(&["Q4_K_M", "Q4_K", "Q8_0"]);
        assert_eq!(e, PickError::NoQuant { quant: "Q5_K_S".into(), available });
        assert!(e.to_string().contains("Q5_K_S; the quants there are Q4_K_M, Q4_K, Q8_0"), "{e}");
    }

    #[test]
    fn no_gguf_and_no_projector() {
        let files = names(&["README.md", "model.safetensors"]);
        assert!(matches!(pick(&files, want(None, None)), Err(PickError::NoGguf(_))));
        assert!(matches!(pick(&files, want(Some("Q8_0"), None)), Err(PickError::NoGguf(_))));
        let p = pick(&names(&["m.gguf"]), want(None, None)).unwrap();
        assert_eq!(p, Plan { model: names(&["m.gguf"]), mmproj: None });
    }

    #[test]
    fn hf_file_names_the_model() {
        let files = names(&REPO);
        let p = pick(&files, want(Some("Q4_K_M"), Some("tiny-Q8_0.gguf"))).unwrap();
        assert_eq!(p.model, names(&["tiny-Q8_0.gguf"]));
        let e = pick(&files, want(None, Some("nope.gguf"))).unwrap_err();
        assert!(matches!(&e, PickError::NoFile { available, .. } if available.len() == 5), "{e:?}");
    }

    #[test]
    fn split_models_bring_all_parts_first_part_first() {
        let files = names(&[
            "big-Q4_K_M-00002-of-00003.gguf",
            "big-Q4_K_M-00001-of-00003.gguf",
            "big-Q4_K_M-00003-of-00003.gguf",
            "big-Q8_0-00001-of-00002.gguf",
            "big-Q8_0-00002-of-00002.gguf",
            "mmproj-big-f16.gguf",
        ]);
        let p = pick(&files, want(None, None)).unwrap();
        let parts = ["big-Q4_K_M-00001-of-00003.gguf", "big-Q4_K_M-00002-of-00003.gguf", "big-Q4_K_M-00003-of-00003.gguf"];
        assert_eq!(p.model, names(&parts));
        assert_eq!(p.mmproj.as_deref(), Some("mmproj-big-f16.gguf"));
        assert_eq!(pick(&files, want(Some("Q8_0"), None)).unwrap().model.len(), 2);
        // a missing part is an error, not a broken model
        let e = pick(&files[..2], want(None, None)).unwrap_err();
        assert_eq!(e, PickError::MissingParts { file: parts[0].into(), count: 3, found: 2 });
    }

    #[test]
    fn gguf_names_split_like_llama_cpp() {
        let n = GgufName::parse("dir/Model-7B-Q4_K_M-00001-of-00002.gguf").unwrap();
        assert_eq!(n, GgufName { prefix: "dir/Model-7B-Q4_K_M".into(), tag: "Q4_K_M".into(), index: 1, count: 2 });
        assert_eq!(GgufName::parse("mmproj-model-f16.gguf").unwrap().tag, "F16");
        assert_eq!(GgufName::parse("ggml-model.q8_0.gguf").unwrap().tag, "Q8_0");
        assert_eq!(GgufName::parse("model.gguf").unwrap().tag, "");
        assert_eq!(GgufName::parse("model.safetensors"), None);
        assert_eq!(split_suffix("x-1-of-2"), None);
        assert_eq!(split_suffix("-00001-of-00002"), None);
    }

    #[test]
    fn projector_is_the_nearest_in_the_folders() {
        let files = names(&["Q4_K_M/m-Q4_K_M.gguf", "Q4_K_M/mmproj-F16.gguf", "mmproj-BF16.gguf", "other/mmproj-Q4_K_M.gguf"]);
        let p = pick(&files, want(None, None)).unwrap();
        assert_eq!(p.mmproj.as_deref(), Some("Q4_K_M/mmproj-F16.gguf"));
        let files = names(&["m-Q4_K_M.gguf", "mmproj-BF16.gguf", "mmproj-F16.gguf", "sub/mmproj-F16.gguf"]);
        assert_eq!(pick(&files, want(None, None)).unwrap().mmproj.as_deref(), Some("mmproj-F16.gguf"));
    }

    #[test]
    fn cache_dir_follows_the_hugging_face_variables() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        assert_eq!(cache_dir(env(&[("HF_HUB_CACHE", "/c"), ("HF_HOME", "/h")])).unwrap(), PathBuf::from("/c"));
        assert_eq!(cache_dir(env(&[("HF_HOME", "/h"), ("HOME", "/u")])).unwrap(), PathBuf::from("/h/hub"));
        assert_eq!(cache_dir(env(&[("XDG_CACHE_HOME", "/x"), ("HOME", "/u")])).unwrap(), PathBuf::from("/x/huggingface/hub"));
        assert_eq!(cache_dir(env(&[("HOME", "/u")])).unwrap(), PathBuf::from("/u/.cache/huggingface/hub"));
        assert!(cache_dir(env(&[])).is_err());
        assert!(is_truthy("1") && is_truthy("TRUE") && !is_truthy("0") && !is_truthy(""));
    }
}
