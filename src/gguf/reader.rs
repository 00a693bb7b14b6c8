//! GGUF header reader: metadata and tensor infos, no tensor data. Defensive against truncated or
//! corrupt files (every length is checked against the file size), so a bad file becomes an error
//! instead of an allocation of garbage size.

use std::collections::BTreeMap;
use std::io::{self, BufReader, Read};
use std::path::Path;

use super::{Value, MAGIC};

/// A tensor's name, shape (ggml order) and type id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Tensor name, e.g. `mm.2.weight`.
    pub name: String,
    /// Shape, fastest dimension first.
    pub ne: Vec<u64>,
    /// ggml type id.
    pub ggml_type: u32,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
}

/// Bytes of `n` elements of a ggml type, for the types whose block layout is fixed and common
/// in GGUF files; `None` for others (their bounds are not checked).
fn type_bytes(ggml_type: u32, n: u64) -> Option<u64> {
    let (block, size) = match ggml_type {
        0 => (1, 4),       // F32
        1 | 30 => (1, 2),  // F16, BF16
        2 => (32, 18),     // Q4_0
        3 => (32, 20),     // Q4_1
        6 => (32, 22),     // Q5_0
        7 => (32, 24),     // Q5_1
        8 => (32, 34),     // Q8_0
        12 => (256, 144),  // Q4_K
        13 => (256, 176),  // Q5_K
        14 => (256, 210),  // Q6_K
        _ => return None,
    };
    (n % block == 0).then(|| n / block * size)
}

/// Metadata and tensor infos of a GGUF file.
#[derive(Debug, Clone, Default)]
pub struct GgufHeader {
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata by key.
    pub kv: BTreeMap<String, Value>,
    /// Tensor infos in file order.
    pub tensors: Vec<TensorInfo>,
    /// Byte offset of the tensor data section.
    pub data_start: u64,
}

impl GgufHeader {
    /// Reads the header of the GGUF file at `path`.
    ///
    /// # Errors
    /// I/O errors, and `InvalidData` for a file that is not GGUF or is truncated/corrupt.
    pub fn read(path: &Path) -> io::Result<Self> {
        let file = std::fs::File::open(path)?;
        let size = file.metadata()?.len();
        let mut r = Reader { r: BufReader::new(file), left: size, size };
        r.parse()
    }

    /// `general.architecture`.
    #[must_use]
    pub fn architecture(&self) -> Option<&str> {
        self.kv.get("general.architecture").and_then(Value::as_str)
    }

    /// A string entry.
    #[must_use]
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.kv.get(key).and_then(Value::as_str)
    }

    /// An unsigned integer entry.
    #[must_use]
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.kv.get(key).and_then(Value::as_u64)
    }

    /// Reads an F32 or F16 tensor's values (as f32) from the file the header came from.
    ///
    /// # Errors
    /// I/O errors; a missing tensor or another type (`InvalidData`).
    pub fn tensor_f32(&self, path: &Path, name: &str) -> io::Result<Vec<f32>> {
        use std::io::{Seek, SeekFrom};
        let t = self.tensor(name).ok_or_else(|| bad(format!("no tensor {name}")))?;
        let n = usize::try_from(t.ne.iter().product::<u64>()).map_err(|_| bad("tensor too large"))?;
        let width = match t.ggml_type {
            0 => 4,
            1 => 2,
            other => return Err(bad(format!("{name}: type {other} is neither F32 nor F16"))),
        };
        let mut f = std::fs::File::open(path)?;
        f.seek(SeekFrom::Start(self.data_start + t.offset))?;
        let mut bytes = vec![0u8; n * width];
        f.read_exact(&mut bytes)?;
        Ok(if width == 4 {
            bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
        } else {
            bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
        })
    }

    /// A tensor info by name.
    #[must_use]
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

struct Reader<R> {
    r: R,
    /// Bytes left in the file: bounds every length field.
    left: u64,
    /// File size.
    size: u64,
}

impl<R: Read> Reader<R> {
    fn bytes<const N: usize>(&mut self) -> io::Result<[u8; N]> {
        if self.left < N as u64 {
            return Err(bad("truncated"));
        }
        let mut b = [0u8; N];
        self.r.read_exact(&mut b).map_err(|_| bad("truncated"))?;
        self.left -= N as u64;
        Ok(b)
    }
    fn u32(&mut self) -> io::Result<u32> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }
    fn u64(&mut self) -> io::Result<u64> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }
    fn string(&mut self) -> io::Result<String> {
        let n = self.u64()?;
        if n > self.left {
            return Err(bad(format!("string length {n} exceeds the file")));
        }
        let mut b = vec![0u8; usize::try_from(n).map_err(|_| bad("string too long"))?];
        self.r.read_exact(&mut b).map_err(|_| bad("truncated"))?;
        self.left -= n;
        String::from_utf8(b).map_err(|_| bad("string is not UTF-8"))
    }

    fn value(&mut self, ty: u32, depth: u32) -> io::Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.bytes::<1>()?[0]),
            1 => Value::I8(i8::from_le_bytes(self.bytes()?)),
            2 => Value::U16(u16::from_le_bytes(self.bytes()?)),
            3 => Value::I16(i16::from_le_bytes(self.bytes()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.bytes()?)),
            6 => Value::F32(f32::from_le_bytes(self.bytes()?)),
            7 => Value::Bool(self.bytes::<1>()?[0] != 0),
            8 => Value::String(self.string()?),
            9 if depth == 0 => {
                let elem = self.u32()?;
                let n = self.u64()?;
                if n > self.left {
                    return Err(bad(format!("array length {n} exceeds the file")));
                }
                let mut items = Vec::with_capacity(usize::try_from(n.min(1 << 20)).unwrap_or(0));
                for _ in 0..n {
                    items.push(self.value(elem, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.bytes()?)),
            12 => Value::F64(f64::from_le_bytes(self.bytes()?)),
            other => return Err(bad(format!("unknown metadata type {other}"))),
        })
    }

    fn parse(&mut self) -> io::Result<GgufHeader> {
        if self.bytes::<4>().map_err(|_| bad("not a GGUF file (too short)"))? != MAGIC {
            return Err(bad("not a GGUF file (bad magic)"));
        }
        let version = self.u32()?;
        if !(2..=3).contains(&version) {
            return Err(bad(format!("unsupported GGUF version {version}")));
        }
        let n_tensors = self.u64()?;
        let n_kv = self.u64()?;
        // Each entry needs at least 8 bytes: a count larger than that is corruption.
        if n_tensors > self.left / 8 || n_kv > self.left / 8 {
            return Err(bad("corrupt header counts"));
        }
        let mut kv = BTreeMap::new();
        for _ in 0..n_kv {
            let key = self.string()?;
            let ty = self.u32()?;
            let v = self.value(ty, 0)?;
            kv.insert(key, v);
        }
        let mut tensors = Vec::new();
        for _ in 0..n_tensors {
            let name = self.string()?;
            let n_dims = self.u32()?;
            if n_dims > 4 {
                return Err(bad(format!("tensor {name}: {n_dims} dimensions")));
            }
            let ne = (0..n_dims).map(|_| self.u64()).collect::<io::Result<Vec<_>>>()?;
            let ggml_type = self.u32()?;
            let offset = self.u64()?;
            tensors.push(TensorInfo { name, ne, ggml_type, offset });
        }
        // Tensor data must lie inside the file: catches truncated downloads before llama.cpp.
        let alignment = kv.get("general.alignment").and_then(Value::as_u64).filter(|a| *a > 0).unwrap_or(super::ALIGNMENT);
        let data_start = (self.size - self.left).div_ceil(alignment) * alignment;
        for t in &tensors {
            let n = t.ne.iter().try_fold(1u64, |a, d| a.checked_mul(*d)).ok_or_else(|| bad("tensor too large"))?;
            let end = data_start.saturating_add(t.offset).saturating_add(type_bytes(t.ggml_type, n).unwrap_or(0));
            if end > self.size {
                return Err(bad(format!(
                    "truncated: tensor {} ends at byte {end} but the file has {} bytes",
                    t.name, self.size
                )));
            }
        }
        Ok(GgufHeader { version, kv, tensors, data_start })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{GgufWriter, TensorType};

    #[test]
    fn round_trip_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.gguf");
        let mut w = GgufWriter::new();
        w.string("general.architecture", "llama")
            .u32("llama.block_count", 2)
            .kv("arr", Value::Array(vec![Value::F32(1.0), Value::F32(2.0)]))
            .tensor("x.weight", &[3, 2], TensorType::F32, &[0.0; 6]);
        w.write_file(&p).unwrap();
        let h = GgufHeader::read(&p).unwrap();
        assert_eq!(h.architecture(), Some("llama"));
        assert_eq!(h.get_u64("llama.block_count"), Some(2));
        assert_eq!(h.tensor("x.weight").unwrap().ne, vec![3, 2]);
        assert_eq!(h.kv["arr"], Value::Array(vec![Value::F32(1.0), Value::F32(2.0)]));
        assert_eq!(h.tensor_f32(&p, "x.weight").unwrap(), vec![0.0; 6]);
        assert!(h.tensor_f32(&p, "y").is_err());

        // truncated and garbage files are errors, not panics
        let bytes = std::fs::read(&p).unwrap();
        for cut in [0, 3, 10, 30, 60, bytes.len() - 9] {
            std::fs::write(&p, &bytes[..cut]).unwrap();
            assert!(GgufHeader::read(&p).is_err(), "cut at {cut}");
        }
        std::fs::write(&p, b"GGUF\x03\0\0\0\xff\xff\xff\xff\xff\xff\xff\xff\0\0\0\0\0\0\0\0").unwrap();
        assert!(GgufHeader::read(&p).is_err());
    }
}
