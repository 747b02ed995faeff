//! The safetensors header parser on arbitrary bytes: it must never panic,
//! and what it accepts must be self-consistent (every tensor inside the data
//! section, its length its element count times its dtype's size).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use offload_loader::safetensors::parse_file_bytes;

fuzz_target!(|data: &[u8]| {
    let Ok(h) = parse_file_bytes(Path::new("fuzz.safetensors"), data, 0) else {
        return;
    };
    let file_len = data.len() as u64;
    assert_eq!(h.data_start, 8 + h.header_len);
    assert_eq!(h.data_start + h.data_len, file_len);
    for t in &h.tensors {
        assert!(
            t.data_offset >= h.data_start,
            "{} starts in the header",
            t.name
        );
        assert!(
            t.data_offset
                .checked_add(t.len)
                .is_some_and(|e| e <= file_len),
            "{} runs past the file",
            t.name
        );
        let numel = t
            .shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .expect("an accepted shape does not overflow");
        assert_eq!(numel * t.dtype.size_in_bytes() as u64, t.len, "{}", t.name);
        assert_eq!(t.file, 0);
    }
    for w in h.tensors.windows(2) {
        assert!(
            w[0].data_offset <= w[1].data_offset,
            "tensors in offset order"
        );
    }
});
