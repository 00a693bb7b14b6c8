//! GGUF header reader: metadata and tensor infos, no tensor data. Defensive against truncated or
//! corrupt files: every count and length is checked against the bytes left in the file (a string
//! of `n` bytes needs `n` bytes, an array of `n` u32 needs `4n`, a tensor info at least 24), memory
//! is reserved only as data arrives, and the decoded header may use at most [`MAX_HEADER_MEMORY`]
//! — so a bad file is an error, never an allocation of garbage size.

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
    if n % block != 0 {
        return None;
    }
    (n / block).checked_mul(size)
}

/// The fewest bytes `n` values of `ggml_type` take: exact for the types [`type_bytes`] knows
/// (`None` when `n` is not a whole number of blocks or the size overflows), else `n / 8` (no
/// ggml type packs a value into less than a bit).
fn min_extent(ggml_type: u32, n: u64) -> Option<u64> {
    match ggml_type {
        0..=3 | 6..=8 | 12..=14 | 30 => type_bytes(ggml_type, n),
        _ => Some(n / 8),
    }
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
    ///
    /// Opens `path` as it is: a FIFO blocks here. Callers that take paths from users open them
    /// with [`crate::input::open_regular`] and use [`GgufHeader::read_from`].
    pub fn read(path: &Path) -> io::Result<Self> {
        let file = std::fs::File::open(path)?;
        let size = file.metadata()?.len();
        Self::read_from(file, size)
    }

    /// Reads a header from `r`, the start of a GGUF file of `size` bytes; `size` bounds every
    /// count and length in it.
    ///
    /// # Errors
    /// I/O errors, and `InvalidData` for data that is not GGUF or is truncated/corrupt.
    pub fn read_from(r: impl Read, size: u64) -> io::Result<Self> {
        let mut r = Reader { r: BufReader::new(r), left: size, size, memory: 0 };
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

    /// A boolean entry.
    #[must_use]
    pub fn get_bool(&self, key: &str) -> Option<bool> {
        match self.kv.get(key) {
            Some(Value::Bool(b)) => Some(*b),
            _ => None,
        }
    }

    /// An array entry of integers (`None` for a missing key, a scalar, or other elements).
    #[must_use]
    pub fn get_int_array(&self, key: &str) -> Option<Vec<i64>> {
        match self.kv.get(key) {
            Some(Value::Array(items)) => items.iter().map(Value::as_i64).collect(),
            _ => None,
        }
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

/// A format error; the message may quote names from the file, so control characters are
/// escaped (an error is always one line).
fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, crate::input::one_line(&msg.into()))
}


/// The most memory a decoded header may take (metadata values and tensor infos, estimated).
/// Real headers take tens of MiB — a 262k-token vocabulary with scores and types about 15 MiB —
/// so this only stops corrupt counts in multi-GB files (each one-byte array element decodes to a
/// [`Value`] of 32 bytes) from exhausting memory before the file runs out.
pub const MAX_HEADER_MEMORY: u64 = 1 << 30;

/// Fewest bytes one value of GGUF metadata type `ty` takes in the file (for arrays: their
/// element type and count), so `left / min_size` bounds any count.
fn min_size(ty: u32) -> u64 {
    match ty {
        0 | 1 | 7 => 1,      // u8, i8, bool
        2 | 3 => 2,          // u16, i16
        4..=6 => 4,          // u32, i32, f32
        8 | 10..=12 => 8,    // string (length), u64, i64, f64
        9 => 12,             // array: element type and count
        _ => 1,
    }
}

struct Reader<R> {
    r: R,
    /// Bytes left in the file: bounds every length field.
    left: u64,
    /// File size.
    size: u64,
    /// Estimated memory of what has been decoded so far.
    memory: u64,
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
    /// Counts `bytes` of decoded memory against [`MAX_HEADER_MEMORY`].
    fn charge(&mut self, bytes: u64) -> io::Result<()> {
        self.memory = self.memory.saturating_add(bytes);
        if self.memory > MAX_HEADER_MEMORY {
            return Err(bad(format!("the metadata would take more than {} MiB of memory", MAX_HEADER_MEMORY >> 20)));
        }
        Ok(())
    }

    fn string(&mut self) -> io::Result<String> {
        let n = self.u64()?;
        if n > self.left {
            return Err(bad(format!("string length {n} exceeds the file")));
        }
        self.charge(n)?;
        // Reserve what the file can hold, grow as bytes arrive: the length is not trusted.
        let mut b = Vec::with_capacity(usize::try_from(n.min(1 << 16)).unwrap_or(0));
        (&mut self.r).take(n).read_to_end(&mut b).map_err(|_| bad("truncated"))?;
        if b.len() as u64 != n {
            return Err(bad("truncated"));
        }
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
                if n > self.left / min_size(elem) {
                    return Err(bad(format!("array length {n} exceeds the file")));
                }
                self.charge(n.saturating_mul(std::mem::size_of::<Value>() as u64))?;
                let mut items = Vec::with_capacity(usize::try_from(n.min(1 << 16)).unwrap_or(0));
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
        // A metadata entry takes at least 13 bytes (key length, type, one byte of value), a
        // tensor info at least 24 (name length, dimension count, type, offset): larger counts
        // are corruption.
        if n_kv > self.left / 13 {
            return Err(bad(format!("corrupt header: {n_kv} metadata entries cannot fit in {} bytes", self.size)));
        }
        if n_tensors > self.left.saturating_sub(n_kv * 13) / 24 {
            return Err(bad(format!("corrupt header: {n_tensors} tensors cannot fit in {} bytes", self.size)));
        }
        let mut kv = BTreeMap::new();
        for _ in 0..n_kv {
            let key = self.string()?;
            let ty = self.u32()?;
            let v = self.value(ty, 0)?;
            self.charge(std::mem::size_of::<(String, Value)>() as u64)?;
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
            self.charge(std::mem::size_of::<TensorInfo>() as u64 + 32)?;
            tensors.push(TensorInfo { name, ne, ggml_type, offset });
        }
        // llama.cpp's gguf loader refuses a name twice; lookups by name would pick the first
        let mut names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(bad(format!("tensor {} appears twice", w[0])));
        }
        // Tensor data must lie inside the file: catches truncated downloads before llama.cpp.
        let alignment = kv.get("general.alignment").and_then(Value::as_u64).filter(|a| *a > 0).unwrap_or(super::ALIGNMENT);
        let data_start = (self.size - self.left).div_ceil(alignment) * alignment;
        for t in &tensors {
            let n = t.ne.iter().try_fold(1u64, |a, d| a.checked_mul(*d)).ok_or_else(|| bad("tensor too large"))?;
            let end = min_extent(t.ggml_type, n)
                .and_then(|b| data_start.checked_add(t.offset)?.checked_add(b))
                .ok_or_else(|| bad(format!("tensor {}: shape {:?} of type {} is not a valid size", t.name, t.ne, t.ggml_type)))?;
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

    /// A GGUF v3 preamble: magic, version, tensor count, metadata count.
    fn preamble(n_tensors: u64, n_kv: u64) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(n_tensors.to_le_bytes());
        b.extend(n_kv.to_le_bytes());
        b
    }

    /// `bytes` padded with zeros to 100 bytes, written to a file and read back.
    fn read_100(dir: &Path, bytes: &[u8]) -> io::Result<GgufHeader> {
        let mut b = bytes.to_vec();
        b.resize(100, 0);
        let p = dir.join("claims.gguf");
        std::fs::write(&p, &b).unwrap();
        GgufHeader::read(&p)
    }

    #[test]
    fn absurd_counts_and_lengths_are_refused_before_allocating() {
        let dir = tempfile::tempdir().unwrap();
        let start = std::time::Instant::now();
        let huge = 1u64 << 40;
        // 2^40 tensors, 2^40 metadata entries in 100 bytes
        let e = read_100(dir.path(), &preamble(huge, 0)).unwrap_err().to_string();
        assert!(e.contains("tensors cannot fit in 100 bytes"), "{e}");
        let e = read_100(dir.path(), &preamble(0, huge)).unwrap_err().to_string();
        assert!(e.contains("metadata entries cannot fit"), "{e}");
        // a key of 2^40 bytes
        let mut b = preamble(0, 1);
        b.extend(huge.to_le_bytes());
        let e = read_100(dir.path(), &b).unwrap_err().to_string();
        assert!(e.contains("string length 1099511627776 exceeds the file"), "{e}");
        // an array of 2^40 strings; of 30 u32 in the 60 bytes left (each needs 4)
        for (elem, n) in [(8u32, huge), (4, 30)] {
            let mut b = preamble(0, 1);
            b.extend(1u64.to_le_bytes());
            b.push(b'k');
            b.extend(9u32.to_le_bytes());
            b.extend(elem.to_le_bytes());
            b.extend(n.to_le_bytes());
            let e = read_100(dir.path(), &b).unwrap_err().to_string();
            assert!(e.contains(&format!("array length {n} exceeds the file")), "{e}");
        }
        // a tensor name of 2^40 bytes
        let mut b = preamble(1, 0);
        b.extend(huge.to_le_bytes());
        assert!(read_100(dir.path(), &b).is_err());
        assert!(start.elapsed() < std::time::Duration::from_secs(2), "{:?}", start.elapsed());
    }

    #[test]
    fn a_huge_file_with_a_corrupt_count_stays_within_the_memory_bound() {
        // A "file" of 64 GiB (zeros, never materialised) whose only entry claims 2^34 u8 values:
        // the count fits the file, but decoded they would take 512 GiB.
        let mut b = preamble(0, 1);
        b.extend(1u64.to_le_bytes());
        b.push(b'k');
        b.extend(9u32.to_le_bytes());
        b.extend(0u32.to_le_bytes());
        b.extend((1u64 << 34).to_le_bytes());
        let size = 1u64 << 36;
        let data = io::Cursor::new(b).chain(io::repeat(0));
        let start = std::time::Instant::now();
        let e = GgufHeader::read_from(data, size).unwrap_err().to_string();
        assert!(e.contains("more than 1024 MiB of memory"), "{e}");
        assert!(start.elapsed() < std::time::Duration::from_secs(2));
        // and a string of 2^33 bytes, which the file could hold, is read as it arrives: here
        // the data ends after 10 bytes, which is an error, not an 8 GiB buffer
        let mut b = preamble(0, 1);
        b.extend((1u64 << 33).to_le_bytes());
        let mut short = b.clone();
        short.extend([b'x'; 10]);
        let e = GgufHeader::read_from(io::Cursor::new(short), size).unwrap_err().to_string();
        assert!(e.contains("truncated") || e.contains("more than"), "{e}");
    }

    #[test]
    fn set_reshape_and_remove_make_variants() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.gguf");
        let mut w = GgufWriter::new();
        w.u32("a", 1).u32("b", 2).tensor("m", &[2, 3], TensorType::F32, &[0.0; 6]).tensor("n", &[1], TensorType::F32, &[0.0]);
        w.set("a", Value::U64(1 << 40)).set("c", Value::Bool(true)).remove("b").reshape("m", &[3, 2]).remove_tensor("n");
        w.write_file(&p).unwrap();
        let h = GgufHeader::read(&p).unwrap();
        assert_eq!(h.kv.keys().collect::<Vec<_>>(), ["a", "c"]);
        assert_eq!(h.get_u64("a"), Some(1 << 40));
        assert_eq!(h.tensors.len(), 1);
        assert_eq!(h.tensor("m").unwrap().ne, vec![3, 2]);
    }
}
