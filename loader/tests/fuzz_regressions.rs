//! The fuzz regression corpus: every input in `fuzz-regressions/` goes
//! through both parsers with the fuzz targets' checks (`parser_checks`).
//! `crashes/` holds inputs that once made a target fail (none so far: see
//! docs/reliability.md); `safetensors/` and `lora/` hold small inputs the
//! fuzzers found that reach distinct code (kept by `cargo fuzz cmin` and a
//! size cut), so the paths they opened stay covered in CI.

mod parser_checks;

use std::path::PathBuf;

fn inputs(sub: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz-regressions")
        .join(sub);
    let mut v: Vec<_> = match std::fs::read_dir(&dir) {
        Ok(d) => d
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file() && p.file_name().is_some_and(|n| n != "README.md"))
            .map(|p| {
                let b = std::fs::read(&p).unwrap();
                (p, b)
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

#[test]
fn every_regression_input_is_handled() {
    let mut n = 0;
    let (mut headers, mut loras) = (0, 0);
    for sub in ["crashes", "safetensors", "lora"] {
        for (path, bytes) in inputs(sub) {
            let seen = std::panic::catch_unwind(|| parser_checks::check(&bytes))
                .unwrap_or_else(|_| panic!("{} fails the parser checks", path.display()));
            n += 1;
            headers += seen.header_ok as usize;
            loras += seen.lora_ok as usize;
        }
    }
    // The corpus is committed: an empty or missing one is a broken checkout.
    assert!(n >= 20, "only {n} regression inputs");
    // It holds accepted and refused inputs alike.
    assert!(headers > 0 && headers < n, "{headers} of {n} accepted");
    assert!(loras > 0, "no input reached the LoRA resolver");
}
