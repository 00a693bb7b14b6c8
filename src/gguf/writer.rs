//! GGUF v3 writer (metadata + F32/F16 tensors), byte-for-byte deterministic.

use std::io::{self, Write};

use super::{TensorType, Value, ALIGNMENT, MAGIC};

struct PendingTensor {
    name: String,
    /// ggml order: fastest-varying dimension first.
    ne: Vec<u64>,
    ty: TensorType,
    bytes: Vec<u8>,
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
        let bytes = match ty {
            TensorType::F32 => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            TensorType::F16 => data
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
        };
        self.tensors.push(PendingTensor {
            name: name.to_owned(),
            ne: ne.to_vec(),
            ty,
            bytes,
        });
        self
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
            offset = align(offset + t.bytes.len() as u64);
        }
        pad(&mut w)?;
        for t in &self.tensors {
            w.write_all(&t.bytes)?;
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
