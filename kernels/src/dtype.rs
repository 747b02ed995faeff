//! The element types a merge reads and writes.

use std::fmt;

use crate::error::KernelError;

/// Element type of a weight or factor: the floating-point subset of the
/// safetensors dtypes that the merge kernels handle.
///
/// All three are stored little-endian. Byte slices of these types may start
/// at any address; the kernels never cast them to typed slices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// IEEE 754 binary32.
    F32,
    /// IEEE 754 binary16.
    F16,
    /// bfloat16.
    BF16,
}

impl Dtype {
    /// Every dtype the kernels handle.
    pub const ALL: [Dtype; 3] = [Dtype::F32, Dtype::F16, Dtype::BF16];

    /// Bytes per element.
    pub const fn size_in_bytes(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
        }
    }

    /// The name used in safetensors headers (`"F32"`, `"F16"`, `"BF16"`).
    pub const fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
        }
    }

    /// Parses a safetensors dtype name; any other name (including integer
    /// and FP8 types) is [`KernelError::UnsupportedDtype`].
    pub fn from_name(name: &str) -> Result<Dtype, KernelError> {
        match name {
            "F32" => Ok(Dtype::F32),
            "F16" => Ok(Dtype::F16),
            "BF16" => Ok(Dtype::BF16),
            _ => Err(KernelError::UnsupportedDtype {
                name: name.to_owned(),
            }),
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
