//! The safetensors header parser on arbitrary bytes: it must never panic,
//! and what it accepts must be self-consistent. The checks are the loader
//! tests' own (`loader/tests/parser_checks`), so CI and the fuzzer agree.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../loader/tests/parser_checks/mod.rs"]
mod parser_checks;

fuzz_target!(|data: &[u8]| {
    parser_checks::check_header(data);
});
