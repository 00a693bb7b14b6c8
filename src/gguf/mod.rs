//! GGUF files: a writer for the deterministic tiny test models, and a header reader that lets the
//! engine check a model before llama.cpp sees it (clear errors for corrupt files, unsupported
//! architectures and projectors that do not fit the text model).
//!
//! Format (GGUF v3): magic `GGUF`, u32 version, u64 tensor count, u64 metadata count, metadata
//! `(key, type, value)*`, tensor infos `(name, n_dims, ne[n_dims], ggml type, offset)*`, padding
//! to `general.alignment` (32), tensor data. Little-endian throughout.

mod reader;
pub mod families;
pub mod shapes;
pub mod tiny;
mod writer;

pub use reader::{GgufHeader, TensorInfo};
pub use writer::GgufWriter;

/// `GGUF` in little-endian byte order.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// Default data alignment (`general.alignment`).
pub const ALIGNMENT: u64 = 32;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `u8`
    U8(u8),
    /// `i8`
    I8(i8),
    /// `u16`
    U16(u16),
    /// `i16`
    I16(i16),
    /// `u32`
    U32(u32),
    /// `i32`
    I32(i32),
    /// `f32`
    F32(f32),
    /// `bool`
    Bool(bool),
    /// UTF-8 string
    String(String),
    /// Homogeneous array
    Array(Vec<Value>),
    /// `u64`
    U64(u64),
    /// `i64`
    I64(i64),
    /// `f64`
    F64(f64),
}

impl Value {
    /// GGUF type id.
    fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    /// The value as an unsigned integer, if it is one.
    #[must_use]
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer, if it is an integer that fits one.
    #[must_use]
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as a float, if it is a float.
    #[must_use]
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => None,
        }
    }

    /// The value as a string, if it is one.
    #[must_use]
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
}

/// Tensor element types the writer produces (ggml type ids).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorType {
    /// 32-bit float
    F32,
    /// 16-bit IEEE float
    F16,
    /// 4-bit blocks of 32: an f16 scale `d` and 16 bytes of nibbles, value `d·(q − 8)`.
    Q4_0,
    /// 8-bit blocks of 32: an f16 scale `d` and 32 signed bytes, value `d·q`.
    Q8_0,
}

impl TensorType {
    /// ggml type id
    #[must_use]
    pub fn ggml_id(self) -> u32 {
        match self {
            TensorType::F32 => 0,
            TensorType::F16 => 1,
            TensorType::Q4_0 => 2,
            TensorType::Q8_0 => 8,
        }
    }

    /// Elements per block (1 for the float types).
    #[must_use]
    pub fn block_len(self) -> u64 {
        match self {
            TensorType::F32 | TensorType::F16 => 1,
            TensorType::Q4_0 | TensorType::Q8_0 => 32,
        }
    }

    /// Bytes per block.
    #[must_use]
    pub fn block_bytes(self) -> u64 {
        match self {
            TensorType::F32 => 4,
            TensorType::F16 => 2,
            TensorType::Q4_0 => 18,
            TensorType::Q8_0 => 34,
        }
    }

    /// Bytes of `n` elements (`n` a multiple of [`Self::block_len`]).
    #[must_use]
    pub fn bytes_for(self, n: u64) -> u64 {
        n / self.block_len() * self.block_bytes()
    }
}
