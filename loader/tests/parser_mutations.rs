//! Malformed input: a proptest mutation test of the safetensors header
//! parser and the LoRA parser over the real files in ../shared/data. Each
//! case takes a real file and applies a few mutations aimed at the header
//! (byte flips, a new header length, JSON tokens spliced in, insertions,
//! truncation); the parsers must never panic, and what they accept must be
//! self-consistent (`parser_checks`, the same checks as the fuzz targets).
//!
//! `PROPTEST_CASES` sets the number of cases (default 256, a few seconds);
//! cargo-fuzz runs the same checks for hours (docs/reliability.md).

mod common;
mod parser_checks;

use std::sync::OnceLock;

use proptest::prelude::*;

/// Every real safetensors file (models and LoRAs), read once.
fn files() -> &'static Vec<(String, Vec<u8>)> {
    static FILES: OnceLock<Vec<(String, Vec<u8>)>> = OnceLock::new();
    FILES.get_or_init(|| {
        let mut v = Vec::new();
        for dir in ["model", "lora"] {
            let d = common::data(dir);
            let mut names: Vec<_> = std::fs::read_dir(&d)
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                .collect();
            names.sort();
            for p in names {
                v.push((p.display().to_string(), std::fs::read(&p).unwrap()));
            }
        }
        assert!(v.len() >= 10, "the real files are missing: {}", v.len());
        v
    })
}

/// JSON fragments that break parsers: huge and negative numbers, wrong types, escapes.
const TOKENS: &[&str] = &[
    "-1",
    "0",
    "1e400",
    "18446744073709551615",
    "18446744073709551616",
    "4294967296",
    "[]",
    "{}",
    "null",
    "true",
    ",",
    ":",
    "\"",
    "\\u0000",
    "\\ud800",
    "\"F16\"",
    "\"BF16\"",
    "\"I64\"",
    "\"F8_E4M3\"",
    "\"XX\"",
    "\"dtype\"",
    "\"shape\"",
    "\"data_offsets\"",
    "\"__metadata__\"",
    "[0,0]",
    "[1,0]",
    "[0,18446744073709551615]",
    "[4294967296,4294967296]",
    ".alpha",
    ".lora_down.weight",
    ".lora_up.weight",
    ".hada_w1_a",
    ".lokr_w1",
    "lora_unet_",
    "lora_te_",
];

#[derive(Clone, Debug)]
enum Mutation {
    /// XOR a byte at a position inside the header (as a fraction of it).
    Flip(f64, u8),
    /// Replace the 8-byte header length.
    HeaderLen(u64),
    /// Add a small delta to the header length.
    HeaderLenDelta(i16),
    /// Splice a token over a few bytes of the header.
    Splice(f64, usize, usize),
    /// Insert bytes inside the header.
    Insert(f64, Vec<u8>),
    /// Cut the file at a fraction of its length.
    Truncate(f64),
    /// XOR a byte of the data section (the header stays valid; `.alpha`
    /// values and factors change).
    FlipData(f64, u8),
    /// Replace a digit of the header by another (offsets and shapes change,
    /// the JSON stays valid).
    Digit(f64, u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (0.0..1.0f64, 1u8..=255).prop_map(|(p, x)| Mutation::Flip(p, x)),
        1 => any::<u64>().prop_map(Mutation::HeaderLen),
        1 => any::<i16>().prop_map(Mutation::HeaderLenDelta),
        4 => (0.0..1.0f64, 0..TOKENS.len(), 0usize..8).prop_map(|(p, t, n)| Mutation::Splice(p, t, n)),
        1 => (0.0..1.0f64, prop::collection::vec(any::<u8>(), 1..16)).prop_map(|(p, b)| Mutation::Insert(p, b)),
        1 => (0.0..1.0f64).prop_map(Mutation::Truncate),
        3 => (0.0..1.0f64, 1u8..=255).prop_map(|(p, x)| Mutation::FlipData(p, x)),
        3 => (0.0..1.0f64, 0u8..10).prop_map(|(p, d)| Mutation::Digit(p, d)),
    ]
}

fn header_len(b: &[u8]) -> usize {
    b.get(..8)
        .map(|h| u64::from_le_bytes(h.try_into().unwrap()))
        .map_or(0, |n| n.min(b.len().saturating_sub(8) as u64) as usize)
}

fn apply(mut b: Vec<u8>, muts: &[Mutation]) -> Vec<u8> {
    for m in muts {
        // Positions inside the header: the JSON and its length prefix.
        let end = 8 + header_len(&b);
        let at = |p: f64| ((p * end as f64) as usize).min(end.saturating_sub(1));
        match m {
            Mutation::Flip(p, x) if !b.is_empty() => {
                let i = at(*p);
                b[i] ^= x;
            }
            Mutation::HeaderLen(n) if b.len() >= 8 => b[..8].copy_from_slice(&n.to_le_bytes()),
            Mutation::HeaderLenDelta(d) if b.len() >= 8 => {
                let n = u64::from_le_bytes(b[..8].try_into().unwrap());
                b[..8].copy_from_slice(&n.wrapping_add(*d as i64 as u64).to_le_bytes());
            }
            Mutation::Splice(p, t, n) => {
                let i = at(*p).max(8.min(b.len()));
                let j = (i + n).min(b.len());
                b.splice(i..j, TOKENS[*t].bytes());
            }
            Mutation::Insert(p, bytes) => {
                let i = at(*p).max(8.min(b.len()));
                b.splice(i..i, bytes.iter().copied());
            }
            Mutation::Truncate(p) => {
                let n = (*p * b.len() as f64) as usize;
                b.truncate(n);
            }
            Mutation::FlipData(p, x) if b.len() > end => {
                let i = end + ((p * (b.len() - end) as f64) as usize).min(b.len() - end - 1);
                b[i] ^= x;
            }
            Mutation::Digit(p, d) => {
                // The first digit at or after the position.
                let from = at(*p).max(8.min(b.len()));
                if let Some(i) = (from..end.min(b.len())).find(|&i| b[i].is_ascii_digit()) {
                    b[i] = b'0' + d;
                }
            }
            _ => {}
        }
    }
    b
}

#[test]
fn mutated_real_files_never_panic_the_parsers() {
    use proptest::test_runner::TestRunner;
    use std::cell::Cell;
    // PROPTEST_CASES is honoured by the default configuration.
    let mut runner = TestRunner::new(ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let (cases, header_ok, lora_ok) = (Cell::new(0u64), Cell::new(0u64), Cell::new(0u64));
    let strategy = (0usize..16, prop::collection::vec(mutation(), 1..4));
    let result = runner.run(&strategy, |(file, muts)| {
        let (_, bytes) = &files()[file % files().len()];
        let input = apply(bytes.clone(), &muts);
        let seen = parser_checks::check(&input);
        cases.set(cases.get() + 1);
        header_ok.set(header_ok.get() + seen.header_ok as u64);
        lora_ok.set(lora_ok.get() + seen.lora_ok as u64);
        Ok(())
    });
    eprintln!(
        "{} mutated inputs: {} accepted by the header parser, {} by the LoRA parser",
        cases.get(),
        header_ok.get(),
        lora_ok.get()
    );
    if let Err(e) = result {
        panic!("{e}");
    }
    assert!(
        header_ok.get() > 0 && header_ok.get() < cases.get(),
        "the mutations should sometimes keep a header valid and sometimes not"
    );
}

#[test]
fn the_unmutated_files_parse_and_the_loras_resolve() {
    // The mutation test starts from inputs both parsers accept, so its
    // mutations reach deep into them.
    let mut adapters = 0;
    for (name, bytes) in files() {
        let seen = parser_checks::check(bytes);
        assert!(seen.header_ok, "{name}");
        if name.contains("/lora/") {
            assert!(seen.lora_ok, "{name}");
            adapters += seen.adapters;
        }
    }
    assert!(adapters > 0, "no real LoRA resolved against SD 1.5");
}
