//! GGUF v3 writer (metadata + F32/F16/Q4_0/Q8_0 tensors), byte-for-byte deterministic. Tensors
//! are either given (values, quantized here) or random and generated while the file is written,
//! so a 7B-shaped model never sits in memory.

use std::io::{self, Write};

use super::{TensorType, Value, ALIGNMENT, MAGIC};

struct PendingTensor {
    name: String,
    /// ggml order: fastest-varying dimension first.
    ne: Vec<u64>,
    ty: TensorType,
    data: Data,
}

enum Data {
    Bytes(Vec<u8>),
    /// Random values of standard deviation `std` (about; see [`GgufWriter::tensor_random`]),
    /// from the stream `Rng::new(seed, name)`.
    Random {
        seed: u64,
        std: f32,
    },
}

impl PendingTensor {
    fn n_elements(&self) -> u64 {
        self.ne.iter().product()
    }

    fn n_bytes(&self) -> u64 {
        self.ty.bytes_for(self.n_elements())
    }

    fn write(&self, w: &mut impl Write) -> io::Result<()> {
        match &self.data {
            Data::Bytes(b) => w.write_all(b),
            Data::Random { seed, std } => {
                let mut rng = crate::rng::Rng::new(*seed, &self.name);
                let n_blocks = self.n_elements() / self.ty.block_len();
                let chunk_blocks = (1u64 << 20) / self.ty.block_bytes();
                let mut buf = Vec::with_capacity((chunk_blocks * self.ty.block_bytes()) as usize);
                let mut done = 0;
                while done < n_blocks {
                    let k = chunk_blocks.min(n_blocks - done);
                    buf.clear();
                    random_blocks(self.ty, *std, k, &mut rng, &mut buf);
                    w.write_all(&buf)?;
                    done += k;
                }
                Ok(())
            }
        }
    }
}

/// `n_blocks` random blocks of `ty` into `out`. The quantized types are drawn directly as codes:
/// Q4_0 nibbles uniform in 0..16 (values `d·(q − 8)`, E[(q−8)²] = 21.5), Q8_0 bytes uniform in
/// −128..128 (E[q²] ≈ 5461), with `d` set so the values' RMS is `std`; the float types uniform
/// in ±√3·std.
fn random_blocks(ty: TensorType, std: f32, n_blocks: u64, rng: &mut crate::rng::Rng, out: &mut Vec<u8>) {
    match ty {
        TensorType::F32 | TensorType::F16 => {
            let a = std * 3f32.sqrt();
            for _ in 0..n_blocks {
                let v = rng.symmetric(a);
                if ty == TensorType::F32 {
                    out.extend_from_slice(&v.to_le_bytes());
                } else {
                    out.extend_from_slice(&half::f16::from_f32(v).to_le_bytes());
                }
            }
        }
        TensorType::Q4_0 | TensorType::Q8_0 => {
            let (d, n_code) = if ty == TensorType::Q4_0 { (std / 21.5f32.sqrt(), 16) } else { (std / 5461f32.sqrt(), 32) };
            let d = half::f16::from_f32(d).to_le_bytes();
            for _ in 0..n_blocks {
                out.extend_from_slice(&d);
                for _ in 0..n_code / 8 {
                    out.extend_from_slice(&rng.next_u64().to_le_bytes());
                }
            }
        }
    }
}

/// `data` as `ty`, quantized as ggml's reference quantizers do (`quantize_row_q4_0_ref`,
/// `quantize_row_q8_0_ref`).
fn encode(ty: TensorType, data: &[f32]) -> Vec<u8> {
    match ty {
        TensorType::F32 => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        TensorType::F16 => data.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
        TensorType::Q4_0 => data
            .chunks(32)
            .flat_map(|b| {
                // the value of largest magnitude, sign kept, maps to −8
                let max = b.iter().copied().fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
                let d = max / -8.0;
                let id = if d == 0.0 { 0.0 } else { 1.0 / d };
                let q = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
                let mut out = half::f16::from_f32(d).to_le_bytes().to_vec();
                out.extend((0..16).map(|j| q(b[j]) | (q(b[j + 16]) << 4)));
                out
            })
            .collect(),
        TensorType::Q8_0 => data
            .chunks(32)
            .flat_map(|b| {
                let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d == 0.0 { 0.0 } else { 1.0 / d };
                let mut out = half::f16::from_f32(d).to_le_bytes().to_vec();
                out.extend(b.iter().map(|v| (v * id).round() as i8 as u8));
                out
            })
            .collect(),
    }
}

/// Collects metadata and tensors in insertion order, then writes one GGUF file.
#[derive(Default)]
pub struct GgufWriter {
    kv: Vec<(String, Value)>,
    tensors: Vec<PendingTensor>,
}

impl std::fmt::Debug for GgufWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufWriter")
            .field("n_kv", &self.kv.len())
            .field("n_tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufWriter {
    /// An empty file.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a metadata entry.
    pub fn kv(&mut self, key: &str, value: Value) -> &mut Self {
        self.kv.push((key.to_owned(), value));
        self
    }

    /// Adds a `u32` entry.
    pub fn u32(&mut self, key: &str, v: u32) -> &mut Self {
        self.kv(key, Value::U32(v))
    }

    /// Adds an `f32` entry.
    pub fn f32(&mut self, key: &str, v: f32) -> &mut Self {
        self.kv(key, Value::F32(v))
    }

    /// Adds a string entry.
    pub fn string(&mut self, key: &str, v: &str) -> &mut Self {
        self.kv(key, Value::String(v.to_owned()))
    }

    /// Adds a bool entry.
    pub fn bool(&mut self, key: &str, v: bool) -> &mut Self {
        self.kv(key, Value::Bool(v))
    }

    /// Adds a tensor. `ne` is in ggml order (fastest dimension first, i.e. `[in, out]` for a
    /// weight matrix); `data` is row-major in that order and is stored as `ty`.
    ///
    /// # Panics
    /// If `data.len()` is not the product of `ne` (a programming error in the recipe).
    pub fn tensor(&mut self, name: &str, ne: &[u64], ty: TensorType, data: &[f32]) -> &mut Self {
        let n: u64 = ne.iter().product();
        assert_eq!(n, data.len() as u64, "tensor {name}: shape {ne:?} does not match data");
        assert_eq!(ne[0] % ty.block_len(), 0, "tensor {name}: rows of {} are not whole {ty:?} blocks", ne[0]);
        self.tensors.push(PendingTensor { name: name.to_owned(), ne: ne.to_vec(), ty, data: Data::Bytes(encode(ty, data)) });
        self
    }

    /// Adds a tensor of random values with RMS about `std`, generated while the file is written
    /// (the stream is `Rng::new(seed, name)`; the bytes are deterministic). Quantized types are
    /// drawn directly as block codes (see `random_blocks`), never through f32.
    ///
    /// # Panics
    /// If the rows (`ne[0]`) are not whole blocks of `ty` (a programming error in the recipe).
    pub fn tensor_random(&mut self, name: &str, ne: &[u64], ty: TensorType, seed: u64, std: f32) -> &mut Self {
        assert_eq!(ne[0] % ty.block_len(), 0, "tensor {name}: rows of {} are not whole {ty:?} blocks", ne[0]);
        self.tensors.push(PendingTensor { name: name.to_owned(), ne: ne.to_vec(), ty, data: Data::Random { seed, std } });
        self
    }

    /// Bytes of tensor data the file will hold (without padding).
    #[must_use]
    pub fn tensor_bytes(&self) -> u64 {
        self.tensors.iter().map(PendingTensor::n_bytes).sum()
    }

    /// Replaces the value of metadata entry `key` where it stands, or adds it at the end (tests
    /// build bad variants of the tiny model this way).
    pub fn set(&mut self, key: &str, value: Value) -> &mut Self {
        match self.kv.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value,
            None => self.kv.push((key.to_owned(), value)),
        }
        self
    }

    /// Removes metadata entry `key` (if present).
    pub fn remove(&mut self, key: &str) -> &mut Self {
        self.kv.retain(|(k, _)| k != key);
        self
    }

    /// Declares tensor `name` with shape `ne` instead, keeping its data (so the element count
    /// must stay the same: a transposed matrix, a 2-D tensor made 3-D).
    ///
    /// # Panics
    /// If there is no such tensor or the element counts differ (a programming error in a test).
    pub fn reshape(&mut self, name: &str, ne: &[u64]) -> &mut Self {
        let t = self.tensors.iter_mut().find(|t| t.name == name).unwrap_or_else(|| panic!("no tensor {name}"));
        assert_eq!(t.ne.iter().product::<u64>(), ne.iter().product::<u64>(), "tensor {name}: {ne:?} has another element count");
        t.ne = ne.to_vec();
        self
    }

    /// Removes tensor `name` (if present).
    pub fn remove_tensor(&mut self, name: &str) -> &mut Self {
        self.tensors.retain(|t| t.name != name);
        self
    }

    /// Writes the whole file.
    ///
    /// # Errors
    /// I/O errors of `out`.
    pub fn write_to(&self, out: &mut impl Write) -> io::Result<()> {
        let mut w = Counting { out, n: 0 };
        w.write_all(&MAGIC)?;
        w.write_all(&3u32.to_le_bytes())?;
        w.write_all(&(self.tensors.len() as u64).to_le_bytes())?;
        w.write_all(&(self.kv.len() as u64).to_le_bytes())?;
        for (key, value) in &self.kv {
            write_str(&mut w, key)?;
            w.write_all(&value.type_id().to_le_bytes())?;
            write_value(&mut w, value)?;
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            write_str(&mut w, &t.name)?;
            w.write_all(&(t.ne.len() as u32).to_le_bytes())?;
            for d in &t.ne {
                w.write_all(&d.to_le_bytes())?;
            }
            w.write_all(&t.ty.ggml_id().to_le_bytes())?;
            w.write_all(&offset.to_le_bytes())?;
            offset = align(offset + t.n_bytes());
        }
        pad(&mut w)?;
        for t in &self.tensors {
            t.write(&mut w)?;
            pad(&mut w)?;
        }
        w.out.flush()
    }

    /// Writes the file to `path` (created or truncated).
    ///
    /// # Errors
    /// I/O errors.
    pub fn write_file(&self, path: &std::path::Path) -> io::Result<()> {
        let mut f = io::BufWriter::new(std::fs::File::create(path)?);
        self.write_to(&mut f)
    }
}

fn align(n: u64) -> u64 {
    n.div_ceil(ALIGNMENT) * ALIGNMENT
}

struct Counting<'a, W: Write> {
    out: &'a mut W,
    n: u64,
}

impl<W: Write> Write for Counting<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let k = self.out.write(buf)?;
        self.n += k as u64;
        Ok(k)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

fn pad<W: Write>(w: &mut Counting<'_, W>) -> io::Result<()> {
    let zeros = [0u8; ALIGNMENT as usize];
    let k = (align(w.n) - w.n) as usize;
    w.write_all(&zeros[..k])
}

fn write_str(w: &mut impl Write, s: &str) -> io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn write_value(w: &mut impl Write, v: &Value) -> io::Result<()> {
    match v {
        Value::U8(x) => w.write_all(&x.to_le_bytes()),
        Value::I8(x) => w.write_all(&x.to_le_bytes()),
        Value::U16(x) => w.write_all(&x.to_le_bytes()),
        Value::I16(x) => w.write_all(&x.to_le_bytes()),
        Value::U32(x) => w.write_all(&x.to_le_bytes()),
        Value::I32(x) => w.write_all(&x.to_le_bytes()),
        Value::F32(x) => w.write_all(&x.to_le_bytes()),
        Value::Bool(x) => w.write_all(&[u8::from(*x)]),
        Value::String(s) => write_str(w, s),
        Value::U64(x) => w.write_all(&x.to_le_bytes()),
        Value::I64(x) => w.write_all(&x.to_le_bytes()),
        Value::F64(x) => w.write_all(&x.to_le_bytes()),
        Value::Array(items) => {
            let elem = items.first().map_or(4, Value::type_id);
            w.write_all(&elem.to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            for it in items {
                debug_assert_eq!(it.type_id(), elem, "GGUF arrays are homogeneous");
                write_value(w, it)?;
            }
            Ok(())
        }
    }
}
