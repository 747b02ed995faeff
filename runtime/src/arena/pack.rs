//! Packing the tensors of one layer into one allocation.

/// Alignment of every tensor inside a packed allocation, in bytes.
pub const TENSOR_ALIGN: usize = 256;

/// Where each tensor of a layer goes inside its allocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackedLayout {
    /// Byte offset of each tensor, in the order given, each a multiple of [`TENSOR_ALIGN`].
    pub offsets: Vec<usize>,
    /// Bytes the allocation needs (end of the last tensor).
    pub total: usize,
}

/// Lay out tensors of the given byte sizes one after another, each aligned to
/// [`TENSOR_ALIGN`]. Returns `None` if the total overflows `usize`.
pub fn pack(sizes: &[usize]) -> Option<PackedLayout> {
    let mut offsets = Vec::with_capacity(sizes.len());
    let mut end = 0usize;
    for &s in sizes {
        let off = end.checked_next_multiple_of(TENSOR_ALIGN)?;
        offsets.push(off);
        end = off.checked_add(s)?;
    }
    Some(PackedLayout {
        offsets,
        total: end,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_aligned_and_in_order() {
        let l = pack(&[10, 256, 0, 1, 300]).unwrap();
        assert_eq!(l.offsets, vec![0, 256, 512, 512, 768]);
        assert_eq!(l.total, 1068);
    }

    #[test]
    fn overflow_is_none() {
        assert_eq!(pack(&[usize::MAX, 1]), None);
    }
}
