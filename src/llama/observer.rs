//! The `cb_eval` trampoline: llama.cpp's graph scheduler calls it for every node, first to ask
//! whether we want the node's data (`ask = true`), then with the data computed. We want:
//!
//! * `cache_k_l0` (`SET_ROWS`, once per ubatch): its `src[1]` holds the KV cells the ubatch's
//!   tokens are written to — handed to the sink's cell → token map;
//! * `kq-<il>` (raw logits), only when the sink wants rows of the current ubatch;
//! * in tests, named tensors to capture (`Qcur-<il>`, `Kcur-<il>` after RoPE).
//!
//! What it reads goes to an [`AttentionSink`] (see [`super::sink`]); this file knows nothing
//! of the statistics made of it.
//!
//! The graph path (patch 0005): llama.cpp computes the sums itself and calls
//! `graph_trampoline` once per observed (ubatch, layer, variant); `cb_eval` then wants no
//! node (unless tensors are captured for a test), so nothing splits the graph or is copied.
//!
//! Every wanted node splits the graph computation (a synchronisation), so asking is selective.
//! Panics are caught (unwinding must not cross `extern "C"`); a failure returns `false`, which
//! aborts the computation, and the error is kept for the engine to report.

use std::ffi::{c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, MutexGuard, PoisonError};

use llama_cpp_sys_2 as sys;

use super::sink::{AttentionSink, GraphSums, KqShape, QueryMomentSums, SharedSink};

/// A tensor captured by name (tests): shape `ne` and F32 data.
#[derive(Debug, Clone)]
pub struct Captured {
    /// Tensor name, e.g. `Qcur-0`.
    pub name: String,
    /// ggml shape.
    pub ne: [usize; 4],
    /// Contiguous F32 data.
    pub data: Vec<f32>,
}

#[derive(Default)]
struct State {
    active: bool,
    /// The sink is fed by the graph path (no `kq` read on the host).
    graph: bool,
    sink: Option<SharedSink>,
    /// Names to capture (exact, e.g. "Qcur-0") with the op they must have (ROPE output).
    capture: Vec<(String, u32)>,
    captured: Vec<Captured>,
    error: Option<String>,
    /// Bytes of attention data copied out of llama.cpp's buffers for the sink (host path: `kq`
    /// rows copied from device memory — host memory is read in place; graph path: the sums and
    /// cell positions).
    bytes_read: u64,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("active", &self.active)
            .field("sink", &self.sink.is_some())
            .field("capture", &self.capture)
            .field("captured", &self.captured.len())
            .field("error", &self.error)
            .finish()
    }
}

fn lock_sink(sink: &SharedSink) -> MutexGuard<'_, dyn AttentionSink + 'static> {
    sink.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Attention observer shared with llama.cpp through `cb_eval_user_data`.
///
/// Must outlive the context it is installed in: `Session` owns it in a `Box` declared after
/// the context, so the context is dropped first.
#[derive(Debug, Default)]
pub struct Observer {
    state: Mutex<State>,
}

impl Observer {
    /// An observer feeding `sink` from host `kq` logits through `cb_eval` (active from the
    /// start; flash attention must be off while it observes).
    #[must_use]
    pub fn new(sink: Option<SharedSink>) -> Self {
        Self { state: Mutex::new(State { active: sink.is_some(), sink, ..State::default() }) }
    }

    /// An observer feeding `sink` from sums computed inside llama.cpp's graph (patch 0005;
    /// install the plan with `Context::set_graph_plan`). Its `cb_eval` wants no node unless
    /// tensors are captured (tests).
    #[must_use]
    pub fn graph(sink: SharedSink) -> Self {
        Self { state: Mutex::new(State { active: true, graph: true, sink: Some(sink), ..State::default() }) }
    }

    /// Whether the sink is fed by the graph path.
    #[must_use]
    pub fn is_graph(&self) -> bool {
        self.lock().graph
    }


    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Captures the RoPE'd `Qcur-<il>`/`Kcur-<il>` of `layers` (for tests against an independent
    /// recomputation).
    pub fn capture_qk(&self, layers: usize) {
        let mut s = self.lock();
        s.active = true;
        for il in 0..layers {
            s.capture.push((format!("Qcur-{il}"), sys::GGML_OP_ROPE));
            s.capture.push((format!("Kcur-{il}"), sys::GGML_OP_ROPE));
        }
    }

    /// Captures the pre-RoPE `Qcur-<il>` and the RoPE'd `Kcur-<il>` of `layers` (tests of
    /// Expected Attention's query moments and scores, patch 0013).
    pub fn capture_q_pre_k(&self, layers: usize) {
        let mut s = self.lock();
        s.active = true;
        for il in 0..layers {
            s.capture.push((format!("Qcur-{il}"), sys::GGML_OP_RESHAPE));
            s.capture.push((format!("Kcur-{il}"), sys::GGML_OP_ROPE));
        }
    }

    /// Captures the RoPE'd `Kcur-<il>` and the `Vcur-<il>` (the rows the cache stores) of
    /// `layers` (tests of the KV scan, patch 0009).
    pub fn capture_kv(&self, layers: usize) {
        let mut s = self.lock();
        s.active = true;
        for il in 0..layers {
            s.capture.push((format!("Kcur-{il}"), sys::GGML_OP_ROPE));
            s.capture.push((format!("Vcur-{il}"), sys::GGML_OP_RESHAPE));
        }
    }

    /// Captures, at the next evaluations, each layer's raw logits `kq-<il>`, the logits plus the
    /// per-head mask `kq_plus_kq_b-<il>` (masked layers only) and the probabilities
    /// `kq_soft_max-<il>` (tests: what each head attends to after masking, sinks).
    pub fn capture_attention(&self, layers: usize) {
        let mut s = self.lock();
        s.active = true;
        for il in 0..layers {
            s.capture.push((format!("kq-{il}"), sys::GGML_OP_MUL_MAT));
            s.capture.push((format!("kq_plus_kq_b-{il}"), sys::GGML_OP_ADD));
            s.capture.push((format!("kq_soft_max-{il}"), sys::GGML_OP_SOFT_MAX));
        }
    }

    /// Stops observing (decode steps are not observed).
    pub fn deactivate(&self) {
        self.lock().active = false;
    }

    /// Stops observing and detaches the sink: returns it (if it was still attached) and any
    /// error.
    pub fn finish(&self) -> (Option<SharedSink>, Option<String>) {
        let mut s = self.lock();
        s.active = false;
        (s.sink.take(), s.error.take())
    }

    /// Whether a sink is attached (until [`finish`](Self::finish)).
    #[must_use]
    pub fn has_sink(&self) -> bool {
        self.lock().sink.is_some()
    }

    /// Bytes of attention data read out of llama.cpp for the sink so far.
    #[must_use]
    pub fn bytes_read(&self) -> u64 {
        self.lock().bytes_read
    }

    /// Takes the captured tensors.
    pub fn take_captured(&self) -> Vec<Captured> {
        std::mem::take(&mut self.lock().captured)
    }

    /// The callback for `LlamaContextParams::with_cb_eval`, and the user data to pass with it.
    #[must_use]
    pub fn callback(&self) -> (sys::ggml_backend_sched_eval_callback, *mut c_void) {
        (Some(trampoline), std::ptr::from_ref(self).cast_mut().cast())
    }

    /// Ask phase: is this node wanted?
    fn wants(&self, t: &sys::ggml_tensor, name: &str) -> bool {
        let s = self.lock();
        if !s.active {
            return false;
        }
        if s.capture.iter().any(|(n, op)| n == name && t.op == *op) {
            return true;
        }
        let Some(sink) = &s.sink else { return false };
        if s.graph {
            return false;
        }
        if t.op == sys::GGML_OP_SET_ROWS && name.starts_with("cache_k_l0") {
            return true;
        }
        kq_layer(name).is_some() && !lock_sink(sink).wanted_rows().is_empty()
    }

    /// Data phase.
    ///
    /// # Safety
    /// `t` is a computed node of the running graph (llama.cpp guarantees it for the data call).
    unsafe fn on_data(&self, t: *mut sys::ggml_tensor, name: &str) -> Result<(), String> {
        let mut s = self.lock();
        // SAFETY: per the contract, `t` is a valid node for the duration of the callback.
        let tr = unsafe { &*t };
        if s.capture.iter().any(|(n, op)| n == name && tr.op == *op) {
            // SAFETY: as above.
            let c = unsafe { read_f32(t) }?;
            s.captured.push(Captured { name: name.to_owned(), ne: ne(tr), data: c });
            return Ok(());
        }
        let Some(shared) = s.sink.clone() else { return Ok(()) };
        let mut sink = lock_sink(&shared);
        if tr.op == sys::GGML_OP_SET_ROWS {
            let idx = tr.src[1];
            // SAFETY: a SET_ROWS node's src[1] is its row-index input, allocated and filled
            // before the node ran; null-checked first.
            let (ok, n) = unsafe { (!idx.is_null() && (*idx).type_ == sys::GGML_TYPE_I64, if idx.is_null() { 0 } else { (*idx).ne[0] as usize }) };
            if !ok {
                return Err("cache_k_l0: unexpected cell-index input".into());
            }
            let mut cells = vec![0i64; n];
            // SAFETY: reads n I64 values (the whole tensor) into a buffer of that size.
            unsafe { sys::ggml_backend_tensor_get(idx, cells.as_mut_ptr().cast(), 0, n * 8) };
            sink.on_ubatch(&cells);
            return Ok(());
        }
        let Some(layer) = kq_layer(name) else { return Ok(()) };
        if tr.type_ != sys::GGML_TYPE_F32 || tr.nb[0] != 4 {
            return Err(format!("{name}: expected contiguous F32 logits"));
        }
        let [n_kv, n_rows, n_head, n_stream] = ne(tr);
        if n_stream != 1 {
            return Err(format!("{name}: {n_stream} KV streams (only a unified cache is observed)"));
        }
        let rows = sink.wanted_rows();
        let (nb1, nb2) = (tr.nb[1], tr.nb[2]);
        let row_block = rows.len() * n_kv;
        // SAFETY: the node's buffer pointer is valid (or null, checked) while the graph runs.
        let host = nb1 == n_kv * 4 && !tr.buffer.is_null() && unsafe { sys::ggml_backend_buffer_is_host(tr.buffer) };
        // Device memory: copy each head's wanted rows. Host memory: borrow them in place.
        let copies: Vec<Vec<f32>> = if host {
            Vec::new()
        } else {
            s.bytes_read += (n_head * row_block * 4) as u64;
            (0..n_head)
                .map(|h| {
                    let mut v = vec![0f32; row_block];
                    for (k, r) in rows.clone().enumerate() {
                        // SAFETY: row r of head h is n_kv F32 values at byte offset
                        // r·nb1 + h·nb2 inside the tensor; the destination has room for them.
                        unsafe { sys::ggml_backend_tensor_get(t, v[k * n_kv..].as_mut_ptr().cast(), r * nb1 + h * nb2, n_kv * 4) };
                    }
                    v
                })
                .collect()
        };
        let base = tr.data as usize;
        let start = rows.start;
        let head_rows = |h: usize| -> &[f32] {
            if host {
                // SAFETY: host buffer of n_head × n_rows × n_kv F32 with row stride
                // nb1 = 4·n_kv (checked) and head stride nb2; rows start..start+len lie inside
                // it, and the data stays alive and unmodified during this callback.
                unsafe { std::slice::from_raw_parts((base + h * nb2 + start * nb1) as *const f32, row_block) }
            } else {
                &copies[h]
            }
        };
        sink.on_logits(KqShape { layer, n_kv, n_rows, n_head }, &head_rows);
        Ok(())
    }

    /// Graph path: one (layer, variant)'s sums of the ubatch just computed.
    fn on_sums(&self, sums: &GraphSums<'_>) -> Result<(), String> {
        let mut s = self.lock();
        if !s.active || !s.graph {
            return Ok(());
        }
        s.bytes_read += ((sums.sums.len() + sums.cell_pos.len() + sums.row_pos.len()) * 4) as u64;
        let Some(sink) = &s.sink else { return Ok(()) };
        let res = lock_sink(sink).on_sums(sums);
        res
    }

    fn fail(&self, msg: String) {
        let mut s = self.lock();
        s.error.get_or_insert(msg);
        s.active = false;
    }
}

fn ne(t: &sys::ggml_tensor) -> [usize; 4] {
    t.ne.map(|x| usize::try_from(x).unwrap_or(0))
}

/// `kq-<il>` → il.
fn kq_layer(name: &str) -> Option<usize> {
    let rest = name.strip_prefix("kq-")?;
    rest.bytes().all(|b| b.is_ascii_digit()).then(|| rest.parse().ok()).flatten()
}

/// Copies a contiguous F32 tensor.
///
/// # Safety
/// `t` is a computed tensor of the running graph.
unsafe fn read_f32(t: *mut sys::ggml_tensor) -> Result<Vec<f32>, String> {
    // SAFETY: `t` is valid per the contract; these functions only read its header.
    let (ty, n, bytes, contiguous) = unsafe { ((*t).type_, sys::ggml_nelements(t) as usize, sys::ggml_nbytes(t), sys::ggml_is_contiguous(t)) };
    if ty != sys::GGML_TYPE_F32 || bytes != n * 4 || !contiguous {
        return Err("capture: not a contiguous F32 tensor".into());
    }
    let mut v = vec![0f32; n];
    // SAFETY: copies the whole tensor (`bytes`) into a buffer of exactly that size.
    unsafe { sys::ggml_backend_tensor_get(t, v.as_mut_ptr().cast(), 0, bytes) };
    Ok(v)
}

unsafe extern "C" fn trampoline(t: *mut sys::ggml_tensor, ask: bool, ud: *mut c_void) -> bool {
    // SAFETY: `ud` is the `Observer` registered with this context, alive while the context is.
    let obs = unsafe { &*(ud as *const Observer) };
    let res = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: llama.cpp passes a valid node whose name is a NUL-terminated array.
        let tr = unsafe { &*t };
        let name = unsafe { CStr::from_ptr(tr.name.as_ptr()) }.to_str().unwrap_or("");
        if ask {
            return obs.wants(tr, name);
        }
        // SAFETY: data phase: `t` has been computed and is readable.
        match unsafe { obs.on_data(t, name) } {
            Ok(()) => true,
            Err(e) => {
                obs.fail(e);
                false
            }
        }
    }));
    res.unwrap_or_else(|_| {
        obs.fail("panic in the attention observer".into());
        false
    })
}

/// The graph path's callback (`llama_attn_obs_cb`): `ud` is the context's `Observer`.
pub(super) unsafe extern "C" fn graph_trampoline(ud: *mut c_void, r: *const sys::llama_attn_obs_result) -> bool {
    // SAFETY: `ud` is the `Observer` the context owns and drops after itself (see Context).
    let obs = unsafe { &*(ud as *const Observer) };
    let res = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: llama.cpp passes a valid result whose arrays hold the lengths its fields
        // state (n_cols, n_head_kv·n_cols·n_kv, n_kv, n_rows; q_moments n_head·(1+d)·d),
        // valid during this call; each is
        // null-checked (or its length 0) before a slice is made.
        let sums = unsafe {
            let r = &*r;
            let len = |n: i32| usize::try_from(n).unwrap_or(0);
            let (n_kv, n_head_kv, n_cols, n_rows) = (len(r.n_kv), len(r.n_head_kv), len(r.n_cols), len(r.n_rows));
            let slice = |p: *const f32, n: usize| if p.is_null() || n == 0 { &[][..] } else { std::slice::from_raw_parts(p, n) };
            let islice = |p: *const i32, n: usize| if p.is_null() || n == 0 { &[][..] } else { std::slice::from_raw_parts(p, n) };
            GraphSums {
                layer: len(r.il),
                var: len(r.var),
                n_kv,
                n_head_kv,
                cols: islice(r.cols, n_cols),
                sums: slice(r.sums, n_head_kv * n_cols * n_kv),
                cell_pos: islice(r.cell_pos, n_kv),
                row_pos: islice(r.row_pos, n_rows),
                n_elite_rows: len(r.n_elite_rows),
                q_moments: (!r.q_moments.is_null()).then(|| QueryMomentSums { n_head: len(r.n_head), d: len(r.d), data: slice(r.q_moments, len(r.n_head) * (1 + len(r.d)) * len(r.d)) }),
            }
        };
        if sums.q_moments.is_none() && (sums.sums.len() != sums.n_head_kv * sums.cols.len() * sums.n_kv || sums.cell_pos.len() != sums.n_kv) {
            return Err("attention sums: missing arrays".to_owned());
        }
        obs.on_sums(&sums)
    }));
    match res {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            obs.fail(e);
            false
        }
        Err(_) => {
            obs.fail("panic in the attention observer".into());
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::kq_layer;

    #[test]
    fn layer_names() {
        assert_eq!(kq_layer("kq-0"), Some(0));
        assert_eq!(kq_layer("kq-31"), Some(31));
        assert_eq!(kq_layer("kq_soft_max-3"), None);
        assert_eq!(kq_layer("kq-3 (view)"), None);
    }
}
