//! Element types of safetensors tensors and safe conversions between bytes
//! and values.
//!
//! Tensor bytes in a safetensors file start at arbitrary offsets, so a byte
//! slice may not be aligned for its element type. Nothing here casts a byte
//! slice to a typed slice: values are assembled with `from_le_bytes`.

use std::fmt;

use half::{bf16, f16};

use crate::error::{LoaderError, Result};

/// Element type of a tensor, as named in a safetensors header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dtype {
    /// IEEE 754 binary64.
    F64,
    /// IEEE 754 binary32.
    F32,
    /// IEEE 754 binary16.
    F16,
    /// bfloat16.
    BF16,
    /// Signed 64-bit integer.
    I64,
    /// Signed 32-bit integer.
    I32,
    /// Signed 16-bit integer.
    I16,
    /// Signed 8-bit integer.
    I8,
    /// Unsigned 8-bit integer.
    U8,
    /// Boolean, one byte.
    Bool,
    /// FP8 E4M3 (paged as bytes).
    F8E4M3,
    /// FP8 E5M2 (paged as bytes).
    F8E5M2,
}

impl Dtype {
    /// Every dtype, in the order of the safetensors specification.
    pub const ALL: [Dtype; 12] = [
        Dtype::F64,
        Dtype::F32,
        Dtype::F16,
        Dtype::BF16,
        Dtype::I64,
        Dtype::I32,
        Dtype::I16,
        Dtype::I8,
        Dtype::U8,
        Dtype::Bool,
        Dtype::F8E4M3,
        Dtype::F8E5M2,
    ];

    /// Bytes per element.
    pub const fn size_in_bytes(self) -> usize {
        match self {
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F16 | Dtype::BF16 | Dtype::I16 => 2,
            Dtype::I8 | Dtype::U8 | Dtype::Bool | Dtype::F8E4M3 | Dtype::F8E5M2 => 1,
        }
    }

    /// The name used in safetensors headers (`"F16"`, `"F8_E4M3"`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            Dtype::F64 => "F64",
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I64 => "I64",
            Dtype::I32 => "I32",
            Dtype::I16 => "I16",
            Dtype::I8 => "I8",
            Dtype::U8 => "U8",
            Dtype::Bool => "BOOL",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::F8E5M2 => "F8_E5M2",
        }
    }

    /// Parses a safetensors header dtype name; `None` if unknown.
    pub fn from_name(name: &str) -> Option<Dtype> {
        Dtype::ALL.into_iter().find(|d| d.name() == name)
    }

    /// Whether [`to_f32_vec`] and [`from_f32_slice`] handle this dtype
    /// (F64, F32, F16, BF16).
    pub const fn is_float(self) -> bool {
        matches!(self, Dtype::F64 | Dtype::F32 | Dtype::F16 | Dtype::BF16)
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Decodes little-endian `bytes` of a float dtype (F64, F32, F16, BF16)
/// into `f32` values. Works on unaligned slices.
///
/// Errors if the dtype is not one of those four or if the length is not a
/// multiple of the element size.
pub fn to_f32_vec(bytes: &[u8], dtype: Dtype) -> Result<Vec<f32>> {
    let size = dtype.size_in_bytes();
    if !dtype.is_float() {
        return Err(LoaderError::Decode {
            path: None,
            tensor: None,
            dtype,
            len: bytes.len(),
            problem: "only F64, F32, F16 and BF16 decode to f32",
        });
    }
    if bytes.len() % size != 0 {
        return Err(LoaderError::Decode {
            path: None,
            tensor: None,
            dtype,
            len: bytes.len(),
            problem: "length is not a multiple of the element size",
        });
    }
    let chunks = bytes.chunks_exact(size);
    let out = match dtype {
        Dtype::F64 => chunks
            .map(|c| {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                f64::from_le_bytes(a) as f32
            })
            .collect(),
        Dtype::F32 => chunks
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => chunks
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => chunks
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => unreachable!("checked by is_float above"),
    };
    Ok(out)
}

/// Decodes one element of a float or integer dtype (F64, F32, F16, BF16,
/// I64, I32, I16, I8, U8) from little-endian `bytes`, which must hold
/// exactly one element. Integers convert to the nearest `f64`. Works on
/// unaligned slices.
pub fn scalar_to_f64(bytes: &[u8], dtype: Dtype) -> Result<f64> {
    let err = |problem| LoaderError::Decode {
        path: None,
        tensor: None,
        dtype,
        len: bytes.len(),
        problem,
    };
    if bytes.len() != dtype.size_in_bytes() {
        return Err(err("expected exactly one element"));
    }
    let mut a = [0u8; 8];
    a[..bytes.len()].copy_from_slice(bytes);
    Ok(match dtype {
        Dtype::F64 => f64::from_le_bytes(a),
        Dtype::F32 => f64::from(f32::from_le_bytes([a[0], a[1], a[2], a[3]])),
        Dtype::F16 => f64::from(f16::from_le_bytes([a[0], a[1]]).to_f32()),
        Dtype::BF16 => f64::from(bf16::from_le_bytes([a[0], a[1]]).to_f32()),
        Dtype::I64 => i64::from_le_bytes(a) as f64,
        Dtype::I32 => f64::from(i32::from_le_bytes([a[0], a[1], a[2], a[3]])),
        Dtype::I16 => f64::from(i16::from_le_bytes([a[0], a[1]])),
        Dtype::I8 => f64::from(a[0] as i8),
        Dtype::U8 => f64::from(a[0]),
        Dtype::Bool | Dtype::F8E4M3 | Dtype::F8E5M2 => {
            return Err(err(
                "only F64, F32, F16, BF16, I64, I32, I16, I8 and U8 scalars are numbers",
            ))
        }
    })
}

/// Encodes `values` as little-endian bytes of a float dtype (F64, F32, F16,
/// BF16; rounding to nearest for the 16-bit types).
///
/// Errors if the dtype is not one of those four.
pub fn from_f32_slice(values: &[f32], dtype: Dtype) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(values.len() * dtype.size_in_bytes());
    match dtype {
        Dtype::F64 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&f64::from(*v).to_le_bytes())),
        Dtype::F32 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        Dtype::F16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
        Dtype::BF16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&bf16::from_f32(*v).to_le_bytes())),
        _ => {
            return Err(LoaderError::Decode {
                path: None,
                tensor: None,
                dtype,
                len: values.len(),
                problem: "only F64, F32, F16 and BF16 can be encoded from f32",
            })
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_sizes() {
        for d in Dtype::ALL {
            assert_eq!(Dtype::from_name(d.name()), Some(d));
        }
        assert_eq!(Dtype::from_name("f16"), None);
        assert_eq!(Dtype::from_name("F8_E4M3FN"), None);
        let sizes: Vec<usize> = Dtype::ALL.iter().map(|d| d.size_in_bytes()).collect();
        assert_eq!(sizes, [8, 4, 2, 2, 8, 4, 2, 1, 1, 1, 1, 1]);
    }

    #[test]
    fn decode_unaligned_slices() {
        let vals = [1.5f32, -2.25, 0.0, 65504.0];
        for d in [Dtype::F64, Dtype::F32, Dtype::F16, Dtype::BF16] {
            let bytes = from_f32_slice(&vals, d).unwrap();
            assert_eq!(bytes.len(), vals.len() * d.size_in_bytes());
            // Place at an odd offset so the slice is unaligned for the type.
            let mut buf = vec![0u8; bytes.len() + 1];
            buf[1..].copy_from_slice(&bytes);
            let back = to_f32_vec(&buf[1..], d).unwrap();
            let expect: Vec<f32> = if d == Dtype::BF16 {
                // 65504 is not representable in bf16; it rounds to 65536.
                vec![1.5, -2.25, 0.0, 65536.0]
            } else {
                vals.to_vec()
            };
            assert_eq!(back, expect, "{d}");
        }
    }

    #[test]
    fn decode_errors() {
        assert!(matches!(
            to_f32_vec(&[0u8; 3], Dtype::F16),
            Err(LoaderError::Decode { len: 3, .. })
        ));
        assert!(matches!(
            to_f32_vec(&[0u8; 4], Dtype::I32),
            Err(LoaderError::Decode {
                dtype: Dtype::I32,
                ..
            })
        ));
        assert!(from_f32_slice(&[1.0], Dtype::U8).is_err());
        let e = to_f32_vec(&[0u8; 3], Dtype::F16)
            .unwrap_err()
            .in_tensor(std::path::Path::new("l.safetensors"), "m.alpha");
        let msg = e.to_string();
        assert!(
            msg.starts_with("l.safetensors: tensor `m.alpha`: cannot decode 3 bytes as F16"),
            "{msg}"
        );
    }

    #[test]
    fn integer_and_float_scalars() {
        assert_eq!(
            scalar_to_f64(&16i64.to_le_bytes(), Dtype::I64).unwrap(),
            16.0
        );
        assert_eq!(
            scalar_to_f64(&(-3i32).to_le_bytes(), Dtype::I32).unwrap(),
            -3.0
        );
        assert_eq!(scalar_to_f64(&8i16.to_le_bytes(), Dtype::I16).unwrap(), 8.0);
        assert_eq!(scalar_to_f64(&[0xff], Dtype::I8).unwrap(), -1.0);
        assert_eq!(scalar_to_f64(&[200], Dtype::U8).unwrap(), 200.0);
        let h = from_f32_slice(&[4.0], Dtype::BF16).unwrap();
        assert_eq!(scalar_to_f64(&h, Dtype::BF16).unwrap(), 4.0);
        assert!(scalar_to_f64(&[1], Dtype::Bool).is_err());
        assert!(scalar_to_f64(&[0u8; 4], Dtype::I64).is_err());
    }
}
