//! Fuzzing on stable Rust: proptest strategies driven for a time budget, against everything that
//! parses bad input — the GGUF header reader (and its writer, by round trips), prompts with image
//! markers, chat templates (llama.cpp names and Jinja), eval JSONL and PrefixKV profiles.
//!
//! The property everywhere: `Ok` or an error of one line — never a panic, an abort or a hang —
//! and, for the GGUF reader, eval files and profiles, no allocation beyond what the file could
//! justify: a counting global allocator (per thread) measures the peak bytes live during each
//! parse, and it must stay within [`GGUF_FACTOR`] (GGUF) or [`JSON_FACTOR`] (JSON) × the file's
//! size + [`ALLOC_SLACK`]. Hostile chat templates (time, memory, stack) run in child processes
//! under a time and memory limit (`hostile_templates_are_bounded`).
//!
//! Budget: `CSP_FUZZ_SECS` seconds per target (default 8; the 10 targets run two at a time, so
//! about 45 s for the file), `CSP_FUZZ_CASES` caps the cases per target, `CSP_FUZZ_SEED` fixes
//! the random seed (printed on every run and in failures: the same seed replays the same cases).
//! `scripts/fuzz.sh` runs the same tests with a long budget, in a loop, with new seeds each
//! round. Every target prints `fuzz <target>: N cases in S s (CSP_FUZZ_SEED=…)` and what it
//! accepted and refused to stderr (`-- --nocapture` shows it).
//!
//! A failing case is shrunk (proptest's value trees) and the smallest input is printed.

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::fmt::Debug;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

use csp_llava::config::{ContextConfig, Request, SamplingConfig};
use csp_llava::gguf::{tiny, GgufHeader, GgufWriter, TensorType, Value};
use csp_llava::policy::{Budget, Params, PolicyConfig, PolicyKind, PrefixKvParams, Profile};
use csp_llava::span::Modality;

// ---------------------------------------------------------------------------------------------
// A counting allocator: live bytes and their peak, per thread (tests run in parallel).

/// Peak allocation allowed while reading a GGUF header: this many times the file's size (plus
/// [`ALLOC_SLACK`]). The worst case is an array of one-byte values: each becomes a 32-byte
/// `Value`, and the reader grows the vector as elements arrive (reserving at most 64 Ki up
/// front), so just past a doubling the old and the new buffer (2 × 32 and 4 × 32 bytes per
/// 2 elements…) are live together during the move: 96 × the array's bytes
/// (`gguf_worst_case_allocations` measures 96.0 × for 2^20 + 1 elements).
const GGUF_FACTOR: usize = 100;
/// The same for eval JSONL and PrefixKV profiles (serde_json: a 32-byte `Value` per `1,` of an
/// array, doubled by vector growth; measured up to ~45 ×).
const JSON_FACTOR: usize = 64;
/// … plus this much (buffers, paths, error messages).
const ALLOC_SLACK: usize = 1 << 20;

struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn note(delta: isize) {
    let _ = LIVE.try_with(|live| {
        let v = live.get() + delta;
        live.set(v);
        let _ = PEAK.try_with(|p| {
            if v > p.get() {
                p.set(v);
            }
        });
    });
}

// SAFETY (whole impl): every call forwards to `System` with the caller's arguments unchanged; the
// bookkeeping touches only const-initialised thread-locals without destructors, which neither
// allocate nor can be destroyed.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            note(layout.size() as isize);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            note(layout.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is.
        unsafe { System.dealloc(ptr, layout) };
        note(-(layout.size() as isize));
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded as is.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            // counted as a move: both blocks live for a moment
            note(new_size as isize);
            note(-(layout.size() as isize));
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns its result and the most bytes it had live at once (on this thread).
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    let peak = PEAK.with(Cell::get) - base;
    (out, peak.max(0) as usize)
}

/// Fails when a parse of `size` input bytes had more than `factor` × size + slack at its peak.
fn check_alloc(what: &str, peak: usize, size: usize, factor: usize) -> Result<(), String> {
    let bound = factor * size + ALLOC_SLACK;
    if peak > bound {
        return Err(format!("{what}: peak allocation {peak} B for a {size}-byte input (bound {bound} B)"));
    }
    Ok(())
}

/// What a target saw: accepted and refused inputs, the largest peak allocation and the largest
/// peak / size ratio (inputs of at least 4 KiB, where fixed overheads do not dominate).
#[derive(Default)]
struct Tally {
    ok: Cell<u64>,
    err: Cell<u64>,
    /// Refusals by the start of their message (digits dropped), to show what was exercised.
    reasons: std::cell::RefCell<std::collections::BTreeMap<String, u64>>,
    peak: Cell<usize>,
    ratio: Cell<f64>,
    factor: Cell<usize>,
}

impl Tally {
    fn new(factor: usize) -> Self {
        let t = Self::default();
        t.factor.set(factor);
        t
    }
    fn ok(&self) {
        self.ok.set(self.ok.get() + 1);
    }
    fn err(&self, msg: &str) {
        self.err.set(self.err.get() + 1);
        let key: String = msg.chars().filter(|c| !c.is_ascii_digit()).take(60).collect();
        *self.reasons.borrow_mut().entry(key).or_default() += 1;
    }
    /// Notes a parse's peak and checks it against the bound.
    fn alloc(&self, what: &str, peak: usize, size: usize) -> Result<(), String> {
        self.peak.set(self.peak.get().max(peak));
        if size >= 4096 {
            self.ratio.set(self.ratio.get().max(peak as f64 / size as f64));
        }
        check_alloc(what, peak, size, self.factor.get())
    }
    fn report(&self, target: &str) {
        let mut line = format!("fuzz {target}: {} accepted, {} refused", self.ok.get(), self.err.get());
        if self.peak.get() > 0 {
            line += &format!(
                "; largest peak allocation {} KiB, largest peak/size {:.1} for inputs ≥ 4 KiB (bound {} × size + 1 MiB)",
                self.peak.get() / 1024,
                self.ratio.get(),
                self.factor.get()
            );
        }
        let reasons = self.reasons.borrow();
        let mut top: Vec<_> = reasons.iter().collect();
        top.sort_by(|a, b| b.1.cmp(a.1));
        for (msg, n) in top.iter().take(4) {
            line += &format!("\n    {n:>6} × {msg}…");
        }
        if reasons.len() > 4 {
            line += &format!("\n    ({} other refusals)", reasons.len() - 4);
        }
        eprintln!("{line}");
    }
}

// ---------------------------------------------------------------------------------------------
// The driver: generate for a time budget, shrink on failure.

fn budget() -> Duration {
    let secs = std::env::var("CSP_FUZZ_SECS").ok().and_then(|v| v.parse::<f64>().ok()).unwrap_or(8.0);
    Duration::from_secs_f64(secs.max(0.0))
}

fn max_cases() -> u64 {
    std::env::var("CSP_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(u64::MAX)
}

/// The seed: `CSP_FUZZ_SEED=N` replays a run, `CSP_FUZZ_SEED=random` explores (scripts/fuzz.sh);
/// unset — the README's test command and CI — a fixed seed, so CI is repeatable and a failure
/// there is a regression, while new inputs are found by the long runs.
fn seed() -> u64 {
    const CI_SEED: u64 = 0x5eed_c5b1_1a7a_0001;
    match std::env::var("CSP_FUZZ_SEED").ok().as_deref() {
        Some("random") => {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            t.as_nanos() as u64 ^ u64::from(std::process::id()).rotate_left(32)
        }
        Some(v) => v.parse().unwrap_or(CI_SEED),
        None => CI_SEED,
    }
}

/// Panics anywhere in the process, caught or not (a panic the library catches on its own thread
/// still prints to stderr — bad input must not panic at all).
static PANICS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn count_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            prev(info);
        }));
    });
}

fn panics() -> u64 {
    PANICS.load(std::sync::atomic::Ordering::SeqCst)
}

/// A test outcome: `Err` with a reason, or a panic (caught and turned into `Err`).
fn attempt<V>(f: &impl Fn(V) -> Result<(), String>, v: V) -> Result<(), String> {
    match catch_unwind(AssertUnwindSafe(|| f(v))) {
        Ok(r) => r,
        Err(p) => Err(format!(
            "panicked: {}",
            p.downcast_ref::<String>().map(String::as_str).or_else(|| p.downcast_ref::<&str>().copied()).unwrap_or("?")
        )),
    }
}

/// Runs `test` on values of `strategy` until the budget or the case cap is spent; on a failure,
/// shrinks and panics with the smallest failing value. Returns the cases run.
fn fuzz<S>(target: &str, strategy: S, test: impl Fn(S::Value) -> Result<(), String>) -> u64
where
    S: Strategy,
    S::Value: Debug,
{
    count_panics();
    let seed = seed();
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &bytes);
    let mut runner = TestRunner::new_with_rng(Config { failure_persistence: None, ..Config::default() }, rng);
    let (start, budget, cap) = (Instant::now(), budget(), max_cases());
    let mut cases = 0u64;
    while cases < cap && (cases == 0 || start.elapsed() < budget) {
        let mut tree = strategy.new_tree(&mut runner).expect("strategy generates");
        cases += 1;
        let Err(first) = attempt(&test, tree.current()) else { continue };
        // shrink: proptest's simplify/complicate walk, at most 2,000 steps
        let mut smallest = (tree.current(), first);
        let mut steps = 0;
        // shrink quietly: the smallest input's failure is in the message below
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {
            PANICS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }));
        if tree.simplify() {
            while steps < 2000 {
                steps += 1;
                match attempt(&test, tree.current()) {
                    Err(e) => {
                        smallest = (tree.current(), e);
                        if !tree.simplify() {
                            break;
                        }
                    }
                    Ok(()) => {
                        if !tree.complicate() {
                            break;
                        }
                    }
                }
            }
        }
        std::panic::set_hook(hook);
        panic!(
            "fuzz {target}: case {cases} failed (CSP_FUZZ_SEED={seed}); smallest input after {steps} shrink steps:\n{:?}\nfailure: {}",
            smallest.0, smallest.1
        );
    }
    eprintln!("fuzz {target}: {cases} cases in {:.1} s (CSP_FUZZ_SEED={seed})", start.elapsed().as_secs_f64());
    cases
}

/// An error message must be one line.
fn one_line(what: &str, msg: &str) -> Result<(), String> {
    if msg.contains('\n') || msg.trim().is_empty() {
        return Err(format!("{what}: error message is not one line: {msg:?}"));
    }
    Ok(())
}

/// A scratch file for this thread's cases.
fn scratch(name: &str) -> std::path::PathBuf {
    let id = format!("{:?}", std::thread::current().id()).replace(|c: char| !c.is_ascii_alphanumeric(), "");
    support::scratch().join(format!("fuzz-{id}-{name}"))
}

// ---------------------------------------------------------------------------------------------
// GGUF: write → read round trips

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<u8>().prop_map(Value::U8),
        any::<i8>().prop_map(Value::I8),
        any::<u16>().prop_map(Value::U16),
        any::<i16>().prop_map(Value::I16),
        any::<u32>().prop_map(Value::U32),
        any::<i32>().prop_map(Value::I32),
        any::<f32>().prop_map(Value::F32),
        any::<bool>().prop_map(Value::Bool),
        ".{0,24}".prop_map(Value::String),
        any::<u64>().prop_map(Value::U64),
        any::<i64>().prop_map(Value::I64),
        any::<f64>().prop_map(Value::F64),
    ]
}

/// A metadata value; arrays are homogeneous and one level deep (what the reader accepts).
fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => scalar(),
        1 => (scalar(), 0usize..40).prop_map(|(v, n)| Value::Array(vec![v; n])),
        1 => prop::collection::vec(any::<u32>(), 0..40).prop_map(|v| Value::Array(v.into_iter().map(Value::U32).collect())),
        1 => prop::collection::vec(".{0,12}", 0..40).prop_map(|v| Value::Array(v.into_iter().map(Value::String).collect())),
        1 => prop::collection::vec(any::<f32>(), 0..40).prop_map(|v| Value::Array(v.into_iter().map(Value::F32).collect())),
    ]
}

/// Equality that treats NaNs with the same bits as equal.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::F32(x), Value::F32(y)) => x.to_bits() == y.to_bits(),
        (Value::F64(x), Value::F64(y)) => x.to_bits() == y.to_bits(),
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b)),
        _ => a == b,
    }
}

#[derive(Debug, Clone)]
struct TensorSpec {
    name: String,
    ne: Vec<u64>,
    f16: bool,
    seed: u32,
}

fn tensor_spec() -> impl Strategy<Value = TensorSpec> {
    (".{0,20}", prop::collection::vec(1u64..9, 1..=4), any::<bool>(), any::<u32>())
        .prop_map(|(name, ne, f16, seed)| TensorSpec { name, ne, f16, seed })
}

fn data_of(t: &TensorSpec) -> Vec<f32> {
    let n: u64 = t.ne.iter().product();
    (0..n).map(|i| ((i as u32 ^ t.seed) % 2001) as f32 / 7.0 - 100.0).collect()
}

#[test]
fn gguf_write_read_round_trips() {
    let path = scratch("roundtrip.gguf");
    let strategy = (
        prop::collection::btree_map("[a-z_.]{1,16}|.{0,24}", value(), 0..12),
        prop::collection::vec(tensor_spec(), 0..6),
    );
    fuzz("gguf write → read", strategy, |(kv, tensors)| {
        let kv: Vec<_> = kv.into_iter().filter(|(k, _)| k != "general.alignment").collect();
        // tensor names must be unique for the lookups below
        let mut seen = std::collections::BTreeSet::new();
        let tensors: Vec<_> = tensors.into_iter().filter(|t| seen.insert(t.name.clone())).collect();
        let mut w = GgufWriter::new();
        for (k, v) in &kv {
            w.kv(k, v.clone());
        }
        for t in &tensors {
            w.tensor(&t.name, &t.ne, if t.f16 { TensorType::F16 } else { TensorType::F32 }, &data_of(t));
        }
        let mut bytes = Vec::new();
        w.write_to(&mut bytes).map_err(|e| e.to_string())?;
        std::fs::write(&path, &bytes).map_err(|e| e.to_string())?;
        let h = GgufHeader::read(&path).map_err(|e| format!("read back: {e}"))?;
        if h.version != 3 || h.kv.len() != kv.len() || h.tensors.len() != tensors.len() {
            return Err(format!("read back {} kv / {} tensors, wrote {} / {}", h.kv.len(), h.tensors.len(), kv.len(), tensors.len()));
        }
        for (k, v) in &kv {
            let got = h.kv.get(k).ok_or_else(|| format!("key {k:?} lost"))?;
            // an empty array reads back with the writer's default element type
            if !same(got, v) {
                return Err(format!("{k:?}: wrote {v:?}, read {got:?}"));
            }
        }
        if h.data_start % 32 != 0 || h.data_start > bytes.len() as u64 {
            return Err(format!("data_start {} in a {}-byte file", h.data_start, bytes.len()));
        }
        for (t, info) in tensors.iter().zip(&h.tensors) {
            let ty = if t.f16 { 1 } else { 0 };
            if info.name != t.name || info.ne != t.ne || info.ggml_type != ty || info.offset % 32 != 0 {
                return Err(format!("tensor {t:?} read back as {info:?}"));
            }
            let got = h.tensor_f32(&path, &t.name).map_err(|e| format!("tensor_f32 {:?}: {e}", t.name))?;
            let want: Vec<f32> = data_of(t)
                .into_iter()
                .map(|v| if t.f16 { half::f16::from_f32(v).to_f32() } else { v })
                .collect();
            if got != want {
                return Err(format!("tensor {:?}: data differs", t.name));
            }
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// GGUF: mutations of the tiny model's real files

/// A length/count/type field of a GGUF header: byte offset and width.
#[derive(Debug, Clone, Copy)]
struct Field {
    at: usize,
    width: usize,
}

/// Offsets of every count, length, type and shape field in a valid GGUF header (walked here
/// independently of the reader), and the header's end.
fn header_fields(b: &[u8]) -> (Vec<Field>, usize) {
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap()) as usize;
    let mut f = vec![Field { at: 4, width: 4 }, Field { at: 8, width: 8 }, Field { at: 16, width: 8 }];
    let (n_tensors, n_kv) = (u64_at(8), u64_at(16));
    let mut o = 24;
    let string = |o: &mut usize, f: &mut Vec<Field>| {
        f.push(Field { at: *o, width: 8 });
        *o += 8 + u64_at(*o);
    };
    fn scalar_size(ty: u32) -> usize {
        match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4 | 5 | 6 => 4,
            10..=12 => 8,
            _ => panic!("type {ty}"),
        }
    }
    for _ in 0..n_kv {
        string(&mut o, &mut f);
        let ty = u32_at(o);
        f.push(Field { at: o, width: 4 });
        o += 4;
        match ty {
            8 => string(&mut o, &mut f),
            9 => {
                let elem = u32_at(o);
                f.push(Field { at: o, width: 4 });
                f.push(Field { at: o + 4, width: 8 });
                let n = u64_at(o + 4);
                o += 12;
                for _ in 0..n {
                    if elem == 8 {
                        string(&mut o, &mut f);
                    } else {
                        o += scalar_size(elem);
                    }
                }
            }
            t => o += scalar_size(t),
        }
    }
    for _ in 0..n_tensors {
        string(&mut o, &mut f);
        let n_dims = u32_at(o) as usize;
        f.push(Field { at: o, width: 4 });
        o += 4;
        for d in 0..n_dims {
            f.push(Field { at: o + 8 * d, width: 8 });
        }
        o += 8 * n_dims;
        f.push(Field { at: o, width: 4 });
        f.push(Field { at: o + 4, width: 8 });
        o += 12;
    }
    (f, o)
}

#[derive(Debug, Clone)]
enum Mutation {
    /// Flip one bit.
    Flip { at: prop::sample::Index, bit: u8, anywhere: bool },
    /// Overwrite one byte.
    Set { at: prop::sample::Index, byte: u8, anywhere: bool },
    /// Cut the file.
    Truncate { at: prop::sample::Index, anywhere: bool },
    /// Insert bytes.
    Insert { at: prop::sample::Index, bytes: Vec<u8>, anywhere: bool },
    /// Remove bytes.
    Remove { at: prop::sample::Index, len: usize, anywhere: bool },
    /// Overwrite a count/length/type/shape field with an extreme value.
    Field { which: prop::sample::Index, value: Extreme },
    /// Overwrite 8 bytes anywhere in the header with an extreme value.
    Word { at: prop::sample::Index, value: Extreme },
}

#[derive(Debug, Clone, Copy)]
enum Extreme {
    Fixed(u64),
    /// The file's size + k (k may be negative).
    Size(i64),
    Any(u64),
}

fn extreme() -> impl Strategy<Value = Extreme> {
    prop_oneof![
        3 => prop::sample::select(vec![
            0u64, 1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 30, 0xff, 0xffff, u64::from(u32::MAX), 1 << 31, 1 << 32,
            (1 << 32) + 1, 1 << 40, 1 << 61, 1 << 62, 1 << 63, u64::MAX, u64::MAX - 1, u64::MAX / 4 + 1,
        ]).prop_map(Extreme::Fixed),
        1 => (-64i64..64).prop_map(Extreme::Size),
        1 => any::<u64>().prop_map(Extreme::Any),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let idx = any::<prop::sample::Index>;
    let anywhere = || prop::bool::weighted(0.1);
    prop_oneof![
        2 => (idx(), 0u8..8, anywhere()).prop_map(|(at, bit, anywhere)| Mutation::Flip { at, bit, anywhere }),
        2 => (idx(), any::<u8>(), anywhere()).prop_map(|(at, byte, anywhere)| Mutation::Set { at, byte, anywhere }),
        1 => (idx(), anywhere()).prop_map(|(at, anywhere)| Mutation::Truncate { at, anywhere }),
        1 => (idx(), prop::collection::vec(any::<u8>(), 1..48), anywhere()).prop_map(|(at, bytes, anywhere)| Mutation::Insert { at, bytes, anywhere }),
        1 => (idx(), 1usize..64, anywhere()).prop_map(|(at, len, anywhere)| Mutation::Remove { at, len, anywhere }),
        4 => (idx(), extreme()).prop_map(|(which, value)| Mutation::Field { which, value }),
        1 => (idx(), extreme()).prop_map(|(at, value)| Mutation::Word { at, value }),
    ]
}

fn apply(bytes: &mut Vec<u8>, fields: &[Field], header_end: usize, m: &Mutation) {
    let pos = |at: &prop::sample::Index, anywhere: bool, len: usize| {
        let n = if anywhere { len } else { header_end.min(len) };
        if n == 0 { 0 } else { at.index(n) }
    };
    let value = |v: Extreme, len: usize| match v {
        Extreme::Fixed(x) | Extreme::Any(x) => x,
        Extreme::Size(k) => (len as i64 + k).max(0) as u64,
    };
    let write = |bytes: &mut Vec<u8>, at: usize, width: usize, v: u64| {
        let le = v.to_le_bytes();
        for i in 0..width {
            if let Some(b) = bytes.get_mut(at + i) {
                *b = le[i];
            }
        }
    };
    let len = bytes.len();
    match m {
        Mutation::Flip { at, bit, anywhere } => {
            if len > 0 {
                let p = pos(at, *anywhere, len);
                bytes[p] ^= 1 << bit;
            }
        }
        Mutation::Set { at, byte, anywhere } => {
            if len > 0 {
                let p = pos(at, *anywhere, len);
                bytes[p] = *byte;
            }
        }
        Mutation::Truncate { at, anywhere } => {
            let p = pos(at, *anywhere, len);
            bytes.truncate(p);
        }
        Mutation::Insert { at, bytes: ins, anywhere } => {
            let p = pos(at, *anywhere, len);
            bytes.splice(p..p, ins.iter().copied());
        }
        Mutation::Remove { at, len: n, anywhere } => {
            let p = pos(at, *anywhere, len);
            bytes.drain(p..(p + n).min(len));
        }
        Mutation::Field { which, value: v } => {
            let f = fields[which.index(fields.len())];
            write(bytes, f.at, f.width, value(*v, len));
        }
        Mutation::Word { at, value: v } => {
            let p = pos(at, false, len);
            write(bytes, p, 8, value(*v, len));
        }
    }
}

/// Bytes of `n` elements of the ggml types whose size the reader knows (its table).
fn type_bytes(ty: u32, n: u64) -> Option<u128> {
    let (block, size) = match ty {
        0 => (1, 4),
        1 | 30 => (1, 2),
        2 => (32, 18),
        3 => (32, 20),
        6 => (32, 22),
        7 => (32, 24),
        8 => (32, 34),
        12 => (256, 144),
        13 => (256, 176),
        14 => (256, 210),
        _ => return None,
    };
    (n % block == 0).then(|| u128::from(n / block) * size)
}

/// Reads `bytes` as a GGUF file: no panic, bounded allocation, one-line errors, and what is
/// accepted is consistent (every known-size tensor inside the file; F32/F16 tensors readable).
fn read_checked(path: &Path, bytes: &[u8], tally: &Tally) -> Result<(), String> {
    std::fs::write(path, bytes).map_err(|e| e.to_string())?;
    let size = bytes.len();
    let (r, peak) = peak_of(|| GgufHeader::read(path));
    tally.alloc("GgufHeader::read", peak, size)?;
    let h = match r {
        Err(e) => {
            tally.err(&e.to_string());
            return one_line("GgufHeader::read", &e.to_string());
        }
        Ok(h) => h,
    };
    tally.ok();
    if !(2..=3).contains(&h.version) {
        return Err(format!("accepted version {}", h.version));
    }
    for t in &h.tensors {
        if t.ne.len() > 4 {
            return Err(format!("accepted {} with {} dimensions", t.name, t.ne.len()));
        }
        let n = t.ne.iter().try_fold(1u64, |a, d| a.checked_mul(*d));
        let Some(n) = n else { return Err(format!("accepted {} whose element count overflows u64: {:?}", t.name, t.ne)) };
        if let Some(b) = type_bytes(t.ggml_type, n) {
            let end = u128::from(h.data_start) + u128::from(t.offset) + b;
            if end > size as u128 {
                return Err(format!(
                    "accepted tensor {:?} (ne {:?}, type {}, offset {}) ending at byte {end} of a {size}-byte file",
                    t.name, t.ne, t.ggml_type, t.offset
                ));
            }
        }
        if t.ggml_type <= 1 {
            let (r, peak) = peak_of(|| h.tensor_f32(path, &t.name));
            tally.alloc("tensor_f32", peak, size)?;
            match r {
                Ok(v) if v.len() as u64 != n => return Err(format!("tensor_f32 {}: {} values for {n} elements", t.name, v.len())),
                Ok(_) => {}
                Err(e) => one_line("tensor_f32", &e.to_string())?,
            }
        }
    }
    Ok(())
}

fn mutate_file(target: &str, original: Vec<u8>) {
    let (fields, header_end) = header_fields(&original);
    let path = scratch(&format!("{target}.gguf"));
    let tally = Tally::new(GGUF_FACTOR);
    fuzz(target, prop::collection::vec(mutation(), 1..5), |ms| {
        let mut bytes = original.clone();
        for m in &ms {
            apply(&mut bytes, &fields, header_end, m);
        }
        read_checked(&path, &bytes, &tally)
    });
    eprintln!(
        "fuzz {target}: the file has {} KiB, a {header_end}-byte header with {} count/length/type/shape fields",
        original.len() / 1024,
        fields.len()
    );
    tally.report(target);
}

#[test]
fn gguf_mutated_text_model() {
    let mut bytes = Vec::new();
    tiny::text_model(0).write_to(&mut bytes).unwrap();
    mutate_file("gguf mutations (tiny text model)", bytes);
}

#[test]
fn gguf_mutated_mmproj() {
    let mut bytes = Vec::new();
    tiny::mmproj(0).write_to(&mut bytes).unwrap();
    mutate_file("gguf mutations (tiny mmproj)", bytes);
}

/// Small headers from scratch: random counts, types and lengths after a valid magic/version.
#[test]
fn gguf_random_headers() {
    let path = scratch("random.gguf");
    let tally = Tally::new(GGUF_FACTOR);
    let word = prop_oneof![extreme().prop_map(|e| match e { Extreme::Fixed(x) | Extreme::Any(x) => x, Extreme::Size(k) => k.unsigned_abs() }), 0u64..16];
    let strategy = (
        prop::sample::select(vec![2u32, 3]),
        prop::collection::vec(prop_oneof![
            word.clone().prop_map(|w| w.to_le_bytes().to_vec()),
            word.prop_map(|w| (w as u32).to_le_bytes().to_vec()),
            prop::collection::vec(any::<u8>(), 0..16),
        ], 0..24),
    );
    fuzz("gguf random headers", strategy, |(version, parts)| {
        let mut bytes = b"GGUF".to_vec();
        bytes.extend(version.to_le_bytes());
        for p in parts {
            bytes.extend(p);
        }
        read_checked(&path, &bytes, &tally)
    });
    tally.report("gguf random headers");
}

/// The shapes that cost the reader the most memory per file byte, built on purpose: long arrays
/// of 1-byte values or empty strings (one `Value` each), many tiny metadata entries, many tiny
/// tensor infos. Prints each peak / size ratio; all must stay within the bound.
#[test]
fn gguf_worst_case_allocations() {
    let path = scratch("worst.gguf");
    let mut worst = (0.0f64, String::new());
    let mut check = |what: String, bytes: Vec<u8>| {
        std::fs::write(&path, &bytes).unwrap();
        let (r, peak) = peak_of(|| GgufHeader::read(&path));
        let ratio = peak as f64 / bytes.len() as f64;
        eprintln!("gguf worst case {what}: {} B file, peak {peak} B ({ratio:.1} × size), {}", bytes.len(), if r.is_ok() { "read" } else { "refused" });
        if ratio > worst.0 {
            worst = (ratio, what.clone());
        }
        check_alloc(&what, peak, bytes.len(), GGUF_FACTOR).unwrap();
    };
    for n in [4096usize, 100_000, (1 << 20) + 1] {
        for (name, item) in [("u8", Value::U8(7)), ("bool", Value::Bool(true)), ("empty string", Value::String(String::new()))] {
            let mut w = GgufWriter::new();
            w.kv("a", Value::Array(vec![item.clone(); n]));
            let mut bytes = Vec::new();
            w.write_to(&mut bytes).unwrap();
            check(format!("array of {n} × {name}"), bytes);
        }
        let mut w = GgufWriter::new();
        for i in 0..n / 16 {
            w.kv(&format!("{i:x}"), Value::U8(0));
        }
        let mut bytes = Vec::new();
        w.write_to(&mut bytes).unwrap();
        check(format!("{} one-byte entries", n / 16), bytes);
        // n/24 tensor infos with empty names, no dimensions, type F32, all at offset 0
        let k = n / 24;
        let mut bytes = b"GGUF".to_vec();
        bytes.extend(3u32.to_le_bytes());
        bytes.extend((k as u64).to_le_bytes());
        bytes.extend(0u64.to_le_bytes());
        for _ in 0..k {
            bytes.extend(0u64.to_le_bytes());
            bytes.extend(0u32.to_le_bytes());
            bytes.extend(0u32.to_le_bytes());
            bytes.extend(0u64.to_le_bytes());
        }
        bytes.extend([0u8; 64]);
        check(format!("{k} empty tensor infos"), bytes);
    }
    eprintln!("gguf worst case: largest peak/size {:.1} ({})", worst.0, worst.1);
}

// ---------------------------------------------------------------------------------------------
// Prompts, image markers and chat templates (through `Engine::prepare` on the tiny model)

fn prompt_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        3 => "[a-zA-Z ,.?!]{0,12}",
        2 => Just("<image>".to_owned()),
        2 => Just("<__media__>".to_owned()),
        1 => prop::sample::select(vec!["<imag", "<image", "image>", "<__media", "__media__>", "<<image>>", "<__media__<image>", "<|im_start|>", "<|im_end|>", "<s>", "</s>", "\n", "\r\n", "\t", " ", "\u{0}", "é", "🙂", "\u{2581}", "{{", "{%", "%}", "}}"]).prop_map(str::to_owned),
        1 => ".{0,6}",
    ];
    prop::collection::vec(piece, 0..10).prop_map(|v| v.concat())
}

/// How the chat template is chosen.
#[derive(Debug, Clone)]
enum TemplateChoice {
    Model,
    Raw,
    Name(String),
    Jinja(String),
}

/// A Jinja expression from the pieces chat templates use.
fn expr() -> impl Strategy<Value = String> {
    let leaf = prop::sample::select(vec![
        "messages", "messages[0]", "messages[-1]", "messages[1]", "messages[99]", "messages[0]['content']",
        "messages[0].role", "messages[-1]['content']", "message", "message['content']", "message.role", "bos_token",
        "eos_token", "add_generation_prompt", "tools", "undefined_thing", "none", "true", "0", "1", "-1", "2.5",
        "'text'", "''", "'<image>'", "\"x\\ny\"", "loop.index", "loop.first", "loop.last", "ns.v", "[]", "[1, 'a']",
        "{'role': 'user'}", "range(3)", "messages|length", "(messages|last)['content']",
        "messages|selectattr('role', 'equalto', 'user')|list", "messages[1:]", "messages[::-1]",
    ])
    .prop_map(str::to_owned);
    leaf.prop_recursive(3, 24, 2, |inner| {
        prop_oneof![
            (inner.clone(), inner.clone(), prop::sample::select(vec!["+", "~", "-", "*", "/", "//", "%", "==", "!=", "<", "and", "or", "in", "not in"]))
                .prop_map(|(a, b, op)| format!("({a} {op} {b})")),
            (inner.clone(), prop::sample::select(vec![
                "|tojson", "|tojson(indent=2)", "|tojson(indent=-3)", "|tojson(indent='\\t')", "|tojson(sort_keys=true)",
                "|tojson(ensure_ascii=true)", "|tojson(separators=[',', ':'])", "|tojson(bogus=1)", "|length", "|string",
                "|trim", "|upper", "|lower", "|list", "|first", "|last", "|reverse", "|join(', ')", "|default('d')",
                "|int", "|float", "|items", "|safe", "|capitalize", "|title", "|replace('a', 'b')", "|batch(2)|list",
                "|unknown_filter", ".strip()", ".lstrip('x')", ".split()", ".split('a')", ".startswith('<')",
                ".endswith('>')", ".upper()", ".replace('e', 'E')", ".items()", ".get('role')", ".keys()",
                ".values()", ".count('a')", ".find('a')", ".splitlines()", "[0]", "[-1]", "['role']", "[1:3]",
                " is defined", " is string", " is none", " is mapping", " is divisibleby(0)",
            ]))
                .prop_map(|(a, f)| format!("({a}){f}")),
            inner.clone().prop_map(|a| format!("not {a}")),
            (inner.clone(), inner.clone(), inner.clone()).prop_map(|(a, b, c)| format!("({a} if {b} else {c})")),
            inner.clone().prop_map(|a| format!("raise_exception({a})")),
            prop::sample::select(vec!["%Y-%m-%d", "%d %B %Y", "%-d %b", "%", "%-", "%Q%%", "%c|%x|%X|%j|%u|%w|%p|%I", "é%é", ""])
                .prop_map(|f| format!("strftime_now('{f}')")),
            (inner, 0i64..4).prop_map(|(a, n)| format!("({a}) * {n}")),
        ]
    })
}

/// A Jinja template built from tags chat templates use (well or badly formed).
fn jinja() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        3 => "[a-zA-Z <>|\\n:]{0,10}",
        3 => expr().prop_map(|e| format!("{{{{ {e} }}}}")),
        1 => expr().prop_map(|e| format!("{{%- set x = {e} -%}}")),
        1 => Just("{% set ns = namespace(v=0) %}{% set ns.v = ns.v + 1 %}".to_owned()),
        1 => prop::sample::select(vec![
            "{{", "}}", "{%", "%}", "{# c #}", "{% endfor %}", "{% endif %}", "{% else %}", "{% raw %}{{ x }}{% endraw %}",
            "{% break %}", "{% continue %}", "{{ }}", "{% %}", "{% if %}", "{% for %}", "{{ messages[ }}", "{#", "{% macro m(a) %}[{{ a }}]{% endmacro %}{{ m(1) }}",
            "{{ m() }}", "{% include 'x' %}", "{% extends 'y' %}", "{% call %}", "{% filter upper %}a{% endfilter %}",
        ]).prop_map(str::to_owned),
    ];
    leaf.prop_recursive(3, 32, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| v.concat()),
            (prop::sample::select(vec!["messages", "range(4)", "messages|reverse", "'ab'", "(messages[0]).items()", "[1, 2]", "x", "messages|batch(1)"]), inner.clone())
                .prop_map(|(it, body)| format!("{{% for message in {it} %}}{body}{{% endfor %}}")),
            (expr(), inner.clone(), inner.clone()).prop_map(|(c, a, b)| format!("{{% if {c} %}}{a}{{% else %}}{b}{{% endif %}}")),
            (expr(), inner).prop_map(|(c, a)| format!("{{%- if {c} -%}}{a}{{%- elif {c} -%}}x{{%- endif -%}}")),
        ]
    })
}

fn template_choice() -> impl Strategy<Value = TemplateChoice> {
    prop_oneof![
        1 => Just(TemplateChoice::Model),
        1 => Just(TemplateChoice::Raw),
        1 => prop::sample::select(vec!["chatml", "vicuna", "llama2", "llama3", "gemma", "mistral-v7", "phi3", "zephyr", "deepseek", "unknown-name", "", " ", "chatml\u{0}"])
            .prop_map(|n| TemplateChoice::Name(n.to_owned())),
        5 => jinja().prop_map(TemplateChoice::Jinja),
    ]
}

#[derive(Debug, Clone)]
struct PromptCase {
    prompt: String,
    system: Option<String>,
    n_images: usize,
    template: TemplateChoice,
    jinja: bool,
}

/// Markers in a user prompt, counted as the README defines them (`<image>` or `<__media__>`).
fn markers(prompt: &str) -> usize {
    let marker = "<__media__>";
    prompt.replace("<image>", marker).matches(marker).count()
}

/// Cases; with probability `matching` the prompt has text and as many images as markers (up to
/// 6), so that it reaches the chat template and the tokenizer.
fn prompt_case(templates: impl Strategy<Value = TemplateChoice>, matching: f64) -> impl Strategy<Value = PromptCase> {
    (prompt_text(), prop::option::of(prompt_text()), 0usize..4, prop::bool::weighted(matching), templates, any::<bool>()).prop_map(
        |(mut prompt, system, n_images, matching, template, jinja)| {
            let n_images = if matching && markers(&prompt) <= 6 {
                if prompt.trim().is_empty() {
                    prompt.push_str(" x");
                }
                markers(&prompt)
            } else {
                n_images
            };
            PromptCase { prompt, system, n_images, template, jinja }
        },
    )
}

/// Whether `Engine::prepare` must accept the case (for a llama.cpp template or the model's):
/// a prompt with text, markers matching the images (or none), no NUL byte, and no mtmd marker in
/// the system message (which is not the prompt's; today that gives mtmd's "Image preprocessing
/// error" — see the report of issue 13).
fn must_accept(c: &PromptCase) -> bool {
    let m = markers(&c.prompt);
    let known_template = match &c.template {
        TemplateChoice::Model => true,
        TemplateChoice::Name(n) => n == "chatml" || n == "vicuna",
        TemplateChoice::Raw | TemplateChoice::Jinja(_) => false,
    };
    known_template
        && !c.prompt.trim().is_empty()
        && (m == 0 || m == c.n_images)
        && !c.prompt.contains('\0')
        && c.system.as_deref().is_none_or(|s| !s.contains('\0') && !s.contains("<__media__>"))
}

/// `Engine::prepare` gives a consistent prompt or a one-line error.
fn prepare_checked(engine: &csp_llava::Engine, c: &PromptCase, tally: &Tally) -> Result<(), String> {
    let req = Request {
        images: (0..c.n_images).map(|i| support::image(i % tiny::N_SAMPLE_IMAGES)).collect(),
        prompt: c.prompt.clone(),
        system: c.system.clone(),
        chat_template: match &c.template {
            TemplateChoice::Name(s) | TemplateChoice::Jinja(s) => Some(s.clone()),
            _ => None,
        },
        raw: matches!(c.template, TemplateChoice::Raw),
        jinja: c.jinja,
        ..Default::default()
    };
    let markers = markers(&c.prompt);
    let before = panics();
    let prepared = engine.prepare(&req);
    if panics() != before {
        return Err("a panic while preparing (caught by the library, but printed on stderr)".into());
    }
    let p = match prepared {
        Err(e) => {
            tally.err(&e.to_string());
            if must_accept(c) {
                return Err(format!("refused: {e}"));
            }
            return one_line("prepare", &e.to_string());
        }
        Ok(p) => p,
    };
    tally.ok();
    if markers != 0 && markers != c.n_images {
        return Err(format!("{markers} markers for {} images accepted", c.n_images));
    }
    if c.prompt.trim().is_empty() {
        return Err("an empty prompt was accepted".into());
    }
    if p.n_images() != c.n_images || p.image_tokens != vec![tiny::vision::TOKENS_PER_IMAGE as usize; c.n_images] {
        return Err(format!("{} images gave image_tokens {:?}", c.n_images, p.image_tokens));
    }
    let images = p.spans.iter().filter(|s| s.modality == Modality::Image).count();
    let media: Vec<_> = p.spans.iter().filter_map(|s| s.media).collect();
    if images != c.n_images || media != (0..c.n_images).collect::<Vec<_>>() {
        return Err(format!("spans {:?} for {} images", p.spans, c.n_images));
    }
    let mut t = 0;
    for s in &p.spans {
        if s.tokens.start != t || s.tokens.end < s.tokens.start {
            return Err(format!("spans not contiguous: {:?}", p.spans));
        }
        t = s.tokens.end;
    }
    if p.spans.last().is_some_and(|s| s.modality != Modality::Text) {
        return Err("the prompt ends with an image".into());
    }
    Ok(())
}

#[test]
fn prompts_and_image_markers() {
    let engine = support::engine();
    let templates = prop_oneof![
        3 => Just(TemplateChoice::Model),
        1 => Just(TemplateChoice::Raw),
        1 => Just(TemplateChoice::Name("chatml".into())),
        1 => Just(TemplateChoice::Name("vicuna".into())),
    ];
    let tally = Tally::new(JSON_FACTOR);
    fuzz("prompts and image markers", prompt_case(templates, 0.5), |c| prepare_checked(&engine, &c, &tally));
    tally.report("prompts and image markers");
}

#[test]
fn chat_templates() {
    let engine = support::engine();
    let tally = Tally::new(JSON_FACTOR);
    fuzz("chat templates", prompt_case(template_choice(), 0.9), |c| prepare_checked(&engine, &c, &tally));
    tally.report("chat templates");
}

/// Templates built to exhaust time, memory or the stack (a GGUF's `tokenizer.chat_template` is
/// input like any other). Each runs in a child process (this binary, `hostile_template_child`)
/// under `ulimit -v` 1 GiB and a 5 s limit, so a hang, an abort or an allocation failure fails
/// this test instead of the whole run. Linux/Unix with `sh` only.
const HOSTILE: &[(&str, &str)] = &[
    ("10^10 loop iterations", "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}x"),
    ("tojson with an indent of 10^8 spaces", "{{ messages|tojson(indent=100000000) }}"),
    (
        "a list nested 100,000 deep, as JSON",
        "{% set ns = namespace(x=[]) %}{% for i in range(100000) %}{% set ns.x = [ns.x] %}{% endfor %}{{ ns.x|tojson }}",
    ),
    (
        "a list nested 100,000 deep, printed",
        "{% set ns = namespace(x=[]) %}{% for i in range(100000) %}{% set ns.x = [ns.x] %}{% endfor %}{{ ns.x }}",
    ),
    ("500 MB of output", "{% for i in range(5) %}{{ 'x' * 100000000 }}{% endfor %}"),
    ("divisibleby(0)", "{{ 3 is divisibleby(0) }}"),
    ("unbounded macro recursion", "{% macro m(n) %}{{ m(n) }}{% endmacro %}{{ m(1) }}"),
];

/// Child of `hostile_templates_are_bounded`: renders `HOSTILE[CSP_FUZZ_HOSTILE]`.
#[test]
#[ignore = "run by hostile_templates_are_bounded in a child process"]
fn hostile_template_child() {
    let Some(i) = std::env::var("CSP_FUZZ_HOSTILE").ok().and_then(|v| v.parse::<usize>().ok()) else { return };
    let engine = support::engine();
    let req = Request { prompt: "hi <image>".into(), images: vec![support::image(0)], chat_template: Some(HOSTILE[i].1.into()), ..Default::default() };
    match engine.prepare(&req) {
        Ok(p) => eprintln!("hostile template {i}: rendered, {} prompt tokens", p.n_tokens()),
        Err(e) => {
            eprintln!("hostile template {i}: {e}");
            one_line("prepare", &e.to_string()).unwrap();
        }
    }
}

#[test]
#[cfg(unix)]
fn hostile_templates_are_bounded() {
    let exe = std::env::current_exe().expect("test binary path");
    let mut failures = Vec::new();
    for (i, (what, _)) in HOSTILE.iter().enumerate() {
        let start = Instant::now();
        let mut child = std::process::Command::new("sh")
            .args(["-c", "ulimit -v 1048576 && exec \"$0\" \"$@\""])
            .arg(&exe)
            .args(["hostile_template_child", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
            .env("CSP_FUZZ_HOSTILE", i.to_string())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn the child");
        let status = loop {
            if let Some(s) = child.try_wait().expect("wait for the child") {
                break Some(s);
            }
            if start.elapsed() > Duration::from_secs(5) {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let out = child.wait_with_output().map(|o| String::from_utf8_lossy(&o.stderr).into_owned()).unwrap_or_default();
        let said = out.lines().filter(|l| l.starts_with("hostile template") || l.contains("panicked") || l.contains("overflow") || l.contains("memory allocation")).collect::<Vec<_>>().join(" / ");
        match status {
            None => failures.push(format!("{what}: still running after 5 s (killed)")),
            Some(s) if !s.success() => failures.push(format!("{what}: {s}: {said}")),
            Some(_) if out.contains("panicked at") => failures.push(format!("{what}: a panic, caught but printed: {said}")),
            Some(_) => eprintln!("hostile template, {what}: {said} ({:.1} s)", start.elapsed().as_secs_f64()),
        }
    }
    assert!(failures.is_empty(), "hostile chat templates (1 GiB, 5 s):\n  {}", failures.join("\n  "));
}

// ---------------------------------------------------------------------------------------------
// eval JSONL

fn json_value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        prop::sample::select(vec!["null", "true", "false", "0", "-1", "1e400", "-0.0", "18446744073709551616", "1.5", "\"\"", "\"img-0.png\"", "\"/abs/x.png\"", "\"../up.png\"", "\"\\u0000\"", "\"\\ud800\"", "\"é\""]).prop_map(str::to_owned),
        "[a-z0-9 ]{0,8}".prop_map(|s| format!("\"{s}\"")),
        any::<i64>().prop_map(|v| v.to_string()),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(","))),
            prop::collection::vec(("[a-z_]{1,8}", inner), 0..4)
                .prop_map(|v| format!("{{{}}}", v.into_iter().map(|(k, v)| format!("\"{k}\":{v}")).collect::<Vec<_>>().join(","))),
        ]
    })
}

/// One line of an eval file: a case (possibly with wrong types or extra fields), any JSON, or
/// garbage.
fn jsonl_line() -> impl Strategy<Value = Vec<u8>> {
    let field = |name: &'static str| prop::option::of(json_value()).prop_map(move |v| v.map(|v| format!("\"{name}\":{v}")));
    let case = (field("id"), field("images"), field("prompt"), field("answer"), field("extra"), prop::option::of(prop::collection::vec("[a-z0-9./é]{0,10}", 0..4)), prop::option::of("[a-zA-Z <>?]{0,20}"))
        .prop_map(|(id, images, prompt, answer, extra, good_images, good_prompt)| {
            let mut parts: Vec<String> = [id, images, prompt, answer, extra].into_iter().flatten().collect();
            if let Some(imgs) = good_images {
                parts.push(format!("\"images\":[{}]", imgs.iter().map(|s| format!("\"{s}\"")).collect::<Vec<_>>().join(",")));
            }
            if let Some(p) = good_prompt {
                parts.push(format!("\"prompt\":\"{p}\""));
                parts.push("\"id\":1".into());
            }
            format!("{{{}}}", parts.join(",")).into_bytes()
        });
    prop_oneof![
        4 => case,
        2 => json_value().prop_map(String::into_bytes),
        1 => prop::collection::vec(any::<u8>(), 0..40),
        1 => prop::sample::select(vec!["", " ", "\t", "\r", "{", "}", "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[", "\u{feff}{\"id\":1,\"prompt\":\"x\"}", "{\"id\":1,\"prompt\":\"x\"} trailing"]).prop_map(|s| s.as_bytes().to_vec()),
        1 => (0usize..300).prop_map(|n| format!("{}1{}", "[".repeat(n), "]".repeat(n)).into_bytes()),
        1 => big_line(),
    ]
}

/// A long line (4 KiB to ~200 KiB) of the shapes that cost the most memory per input byte once
/// parsed: long arrays and maps of tiny values as the id, many images, a long prompt.
fn big_line() -> impl Strategy<Value = Vec<u8>> {
    (1000usize..40_000, prop::sample::select(vec!["1", "[]", "{}", "\"\"", "null", "0.5"]), 0u8..4).prop_map(|(n, item, shape)| {
        let list = vec![item; n].join(",");
        match shape {
            0 => format!("{{\"id\":[{list}],\"prompt\":\"p\"}}"),
            1 => format!("{{\"id\":{{{}}},\"prompt\":\"p\"}}", (0..n).map(|i| format!("\"{i:x}\":{item}")).collect::<Vec<_>>().join(",")),
            2 => format!("{{\"id\":1,\"images\":[{}],\"prompt\":\"p\"}}", vec!["\"a\""; n].join(",")),
            _ => format!("{{\"id\":1,\"prompt\":\"{}\"}}", "x".repeat(n * 4)),
        }
        .into_bytes()
    })
}

#[test]
fn eval_jsonl() {
    let path = scratch("cases.jsonl");
    let tally = Tally::new(JSON_FACTOR);
    let strategy = (prop::collection::vec(jsonl_line(), 0..12), prop::sample::select(vec!["\n", "\r\n"]));
    fuzz("eval JSONL", strategy, |(lines, eol)| {
        let bytes = lines.join(eol.as_bytes());
        std::fs::write(&path, &bytes).map_err(|e| e.to_string())?;
        let (r, peak) = peak_of(|| csp_llava::eval::load_cases(&path));
        tally.alloc("load_cases", peak, bytes.len())?;
        match (r, std::str::from_utf8(&bytes)) {
            (Err(e), Err(_)) => one_line("load_cases", &e.to_string()),
            (Err(e), Ok(_)) => Err(format!("a UTF-8 file was refused as a whole: {e}")),
            (Ok(_), Err(_)) => Err("a file that is not UTF-8 was accepted".into()),
            (Ok(cases), Ok(text)) => {
                let lines = text.lines().filter(|l| !l.trim().is_empty()).count();
                if cases.len() != lines {
                    return Err(format!("{} results for {lines} non-empty lines", cases.len()));
                }
                for c in &cases {
                    match c {
                        Ok(case) => {
                            tally.ok();
                            if case.images.iter().any(|p| p.is_relative() && !p.starts_with(path.parent().unwrap())) {
                                return Err(format!("case {:?}: an image path not made relative to the file", case.id));
                            }
                        }
                        Err((id, msg)) => {
                            tally.err(msg);
                            one_line("case error", msg)?;
                            if !id.starts_with("line-") {
                                return Err(format!("case error id {id:?}"));
                            }
                        }
                    }
                }
                Ok(())
            }
        }
    });
    tally.report("eval JSONL (cases)");
}

// ---------------------------------------------------------------------------------------------
// PrefixKV profiles

fn number() -> impl Strategy<Value = String> {
    prop_oneof![
        (0.0f64..=1.0).prop_map(|v| v.to_string()),
        prop::sample::select(vec!["0", "1", "-0.0", "1.0000001", "-1", "2", "1e308", "1e400", "-1e400", "0.5", "null", "\"0.5\"", "[]", "true"]).prop_map(str::to_owned),
        any::<f64>().prop_map(|v| if v.is_finite() { format!("{v:e}") } else { "0".into() }),
    ]
}

fn profile_json() -> impl Strategy<Value = Vec<u8>> {
    let list = || prop::collection::vec(number(), 0..6).prop_map(|v| format!("[{}]", v.join(",")));
    let entry = (prop::option::of(number()), prop::option::of(list()), prop::option::of(list()))
        .prop_map(|(b, r, f)| {
            let parts: Vec<String> = [b.map(|b| format!("\"budget\":{b}")), r.map(|r| format!("\"retain\":{r}")), f.map(|f| format!("\"forget\":{f}"))]
                .into_iter()
                .flatten()
                .collect();
            format!("{{{}}}", parts.join(","))
        });
    let profile = (
        prop::option::of(prop_oneof!["[a-z./]{0,10}".prop_map(|s| format!("\"{s}\"")), json_value()]),
        prop::option::of(prop_oneof![(0u64..100).prop_map(|v| v.to_string()), json_value()]),
        prop::option::of(prop::collection::vec(entry, 0..4)),
        prop::option::of(json_value()),
    )
        .prop_map(|(model, samples, budgets, extra)| {
            let parts: Vec<String> = [
                model.map(|m| format!("\"model\":{m}")),
                samples.map(|s| format!("\"samples\":{s}")),
                budgets.map(|b| format!("\"budgets\":[{}]", b.join(","))),
                extra.map(|e| format!("\"extra\":{e}")),
            ]
            .into_iter()
            .flatten()
            .collect();
            format!("{{{}}}", parts.join(",")).into_bytes()
        });
    prop_oneof![
        6 => profile,
        1 => json_value().prop_map(String::into_bytes),
        1 => prop::collection::vec(any::<u8>(), 0..64),
        1 => (100usize..20_000, prop::sample::select(vec!["0.5", "0", "1e-300"])).prop_map(|(n, v)| {
            let list = vec![v; n].join(",");
            format!("{{\"model\":\"{}\",\"samples\":1,\"budgets\":[{{\"budget\":0.2,\"retain\":[{list}],\"forget\":[{list}]}}]}}", "m".repeat(n)).into_bytes()
        }),
        1 => (profile_base(), 0usize..64, any::<u8>()).prop_map(|(mut b, at, byte)| {
            let i = at % b.len();
            b[i] = byte;
            b
        }),
    ]
}

fn profile_base() -> impl Strategy<Value = Vec<u8>> {
    Just(br#"{"model":"m","samples":2,"budgets":[{"budget":0.2,"retain":[0.1,0.3],"forget":[0.9,0.7]}]}"#.to_vec())
}

#[test]
fn prefixkv_profiles_load_or_refuse() {
    let path = scratch("profile.json");
    let tally = Tally::new(JSON_FACTOR);
    fuzz("PrefixKV profile load", profile_json(), |bytes| {
        std::fs::write(&path, &bytes).map_err(|e| e.to_string())?;
        let (r, peak) = peak_of(|| Profile::load(&path));
        tally.alloc("Profile::load", peak, bytes.len())?;
        match r {
            Err(e) => {
                tally.err(&e.to_string());
                one_line("Profile::load", &e.to_string())
            }
            Ok(p) => {
                tally.ok();
                if p.budgets.is_empty() || p.budgets.iter().any(|b| b.forget.iter().any(|f| !(0.0..=1.0).contains(f))) {
                    return Err(format!("accepted {p:?}"));
                }
                Ok(())
            }
        }
    });
    tally.report("PrefixKV profile load");
}

/// Profiles `Profile::load` accepts, used for a generation on the tiny model (2 layers): any
/// layer count, a budget the profile has or not, a fraction or a cell count, granularity, shrink.
#[test]
fn prefixkv_profiles_run_or_refuse() {
    let engine = support::engine();
    let path = scratch("run-profile.json");
    let tally = Tally::new(JSON_FACTOR);
    let entry = (
        prop::sample::select(vec![0.1f64, 0.2, 0.5, 1.0, 0.0, 0.999]),
        // mostly the tiny model's 2 layers
        prop_oneof![
            3 => prop::collection::vec(prop_oneof![Just(0.0f64), Just(1.0), 0.0f64..=1.0], 2),
            1 => prop::collection::vec(prop_oneof![Just(0.0f64), Just(1.0), 0.0f64..=1.0], 0..5),
        ],
    );
    let strategy = (
        prop::collection::vec(entry, 1..3),
        // the run's budget: one of the profile's (mostly), another fraction, or a cell count
        prop_oneof![3 => Just(None), 1 => prop::sample::select(vec![0.1f64, 0.3, 1.0]).prop_map(Some)],
        // a cell count now and then (refused: profiles are per fraction)
        prop_oneof![5 => Just(None), 1 => prop::sample::select(vec![1usize, 2, 5, 40]).prop_map(Some)],
        0usize..3,
        any::<bool>(),
        prop::option::of(prop::sample::select(vec!["global", "layer", "head"])),
    );
    fuzz("PrefixKV profiles in a run", strategy, |(entries, other, cells, n_images, shrink, granularity)| {
        let budgets: Vec<String> = entries
            .iter()
            .map(|(b, forget)| {
                let f: Vec<String> = forget.iter().map(f64::to_string).collect();
                let r: Vec<String> = forget.iter().map(|v| (1.0 - v).to_string()).collect();
                format!("{{\"budget\":{b},\"retain\":[{}],\"forget\":[{}]}}", r.join(","), f.join(","))
            })
            .collect();
        let text = format!("{{\"model\":\"tiny\",\"samples\":1,\"budgets\":[{}]}}", budgets.join(","));
        std::fs::write(&path, text).map_err(|e| e.to_string())?;
        let profile = Profile::load(&path).map_err(|e| format!("a valid profile was refused: {e}"))?;
        let fraction = other.unwrap_or(entries[0].0);
        let policy = PolicyConfig {
            kind: PolicyKind::PrefixKv,
            budget: cells.map_or(Budget::Fraction(fraction), Budget::Cells),
            granularity: granularity.map(|g| g.parse().expect("a granularity name")),
            params: Params { prefixkv: PrefixKvParams { profile: Some(profile) }, ..Default::default() },
            ..Default::default()
        };
        let req = Request { images: (0..n_images).map(support::image).collect(), prompt: "Which shape is it?".into(), ..Default::default() };
        let ctx = ContextConfig { n_ctx: 512, kv_shrink: shrink, ..Default::default() };
        let sampling = SamplingConfig { n_predict: 3, temp: 0.0, seed: Some(0), ignore_eos: true, ..Default::default() };
        let before = panics();
        let result = engine.run(&req, &ctx, &sampling, &policy, &mut |_| {});
        if panics() != before {
            return Err("a panic during the run (caught by the library, but printed on stderr)".into());
        }
        match result {
            Ok(r) if r.n_generated != 3 => Err(format!("generated {} of 3", r.n_generated)),
            Ok(_) => {
                tally.ok();
                Ok(())
            }
            Err(e) => {
                tally.err(&e.to_string());
                one_line("run", &e.to_string())
            }
        }
    });
    tally.report("PrefixKV profiles in a run");
}
