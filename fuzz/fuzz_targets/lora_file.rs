//! The LoRA parser on arbitrary bytes: parse, summarise, resolve against a
//! full-size SD 1.5 layout, and read every factor of every adapter it
//! accepts. Nothing may panic. The checks are the loader tests' own
//! (`loader/tests/parser_checks`), so CI and the fuzzer agree.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../loader/tests/parser_checks/mod.rs"]
mod parser_checks;

fuzz_target!(|data: &[u8]| {
    parser_checks::check_lora(data);
});
