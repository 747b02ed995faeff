//! Branch-free f16/bf16 ↔ f32 conversions that the compiler vectorizes
//! inside the merge's loops.
//!
//! `half` converts f16 slices with F16C, but through a function pointer per
//! eight elements, which cost the merge about 6 ms per direction on a
//! 4096 × 4096 weight, and its bf16 conversions vectorize poorly; these
//! scalar forms are inlined into the loops and vectorized (with AVX2 in the
//! AVX2 build). They round like `half` (to nearest, ties to even; overflow
//! to infinity; subnormals exact) and are bit-exact with it except for NaN
//! payloads: f32 → f16 gives the quiet NaN `0x7e00` with the input's sign,
//! bf16 → f32 keeps a signalling NaN signalling (NaN stays NaN either way).
//! The tests check every f16 and bf16 value and a dense sample of f32
//! values; an ignored test checks every f32 value.
//!
//! The f16 forms follow F. Giesen, "half_to_float_fast5" and
//! "float_to_half_fast3_rtne" (public domain).

/// f16 bits to f32, exactly.
#[inline(always)]
pub(super) fn f16_to_f32(h: u16) -> f32 {
    const SHIFTED_EXP: u32 = 0x7c00 << 13;
    let h = u32::from(h);
    let mut o = (h & 0x7fff) << 13;
    let exp = o & SHIFTED_EXP;
    o += (127 - 15) << 23;
    let o = if exp == SHIFTED_EXP {
        // Infinity or NaN: finish the exponent, keep the payload.
        o + ((128 - 16) << 23)
    } else if exp == 0 {
        // Zero or subnormal: renormalize exactly with one subtraction.
        (f32::from_bits(o + (1 << 23)) - f32::from_bits(113 << 23)).to_bits()
    } else {
        o
    };
    f32::from_bits(o | ((h & 0x8000) << 16))
}

/// f32 to f16 bits, rounded to nearest, ties to even.
#[inline(always)]
pub(super) fn f32_to_f16(f: f32) -> u16 {
    const F32_INFINITY: u32 = 255 << 23;
    const F16_OVERFLOW: u32 = (127 + 16) << 23;
    const DENORM_MAGIC: u32 = ((127 - 15) + (23 - 10) + 1) << 23;
    // Rebias the exponent from 127 to 15 and add the rounding bias 0x0fff.
    const REBIAS: u32 = (((15 - 127) << 23) as u32).wrapping_add(0x0fff);
    let bits = f.to_bits();
    let sign = bits & 0x8000_0000;
    let a = bits ^ sign;
    let o = if a >= F16_OVERFLOW {
        // |f| ≥ 2^16: infinity, or NaN.
        if a > F32_INFINITY {
            0x7e00
        } else {
            0x7c00
        }
    } else if a < (113 << 23) {
        // |f| < 2^-14: subnormal or zero. The f32 addition rounds the
        // mantissa into place (to nearest, ties to even).
        (f32::from_bits(a) + f32::from_bits(DENORM_MAGIC))
            .to_bits()
            .wrapping_sub(DENORM_MAGIC)
    } else {
        // Normal: add half an ulp minus one, plus one if the result's last
        // bit is odd, then truncate; a carry into the exponent is correct
        // (it also rounds [65520, 65536) to infinity).
        let odd = (a >> 13) & 1;
        a.wrapping_add(REBIAS).wrapping_add(odd) >> 13
    };
    (o | (sign >> 16)) as u16
}

/// bf16 bits to f32, exactly.
#[inline(always)]
pub(super) fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// f32 to bf16 bits, rounded to nearest, ties to even; NaN stays NaN
/// (quieted, sign and upper payload kept).
#[inline(always)]
pub(super) fn f32_to_bf16(f: f32) -> u16 {
    let x = f.to_bits();
    if f.is_nan() {
        ((x >> 16) | 0x40) as u16
    } else {
        // Add half an ulp minus one, plus one if the result's last bit is
        // odd, then truncate; a carry into the exponent is correct.
        (x.wrapping_add(0x7fff + ((x >> 16) & 1)) >> 16) as u16
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    /// Same bits, or both NaN with the same sign.
    fn same_f16(a: u16, b: u16) -> bool {
        let nan = |x: u16| x & 0x7c00 == 0x7c00 && x & 0x03ff != 0;
        a == b || (nan(a) && nan(b) && (a ^ b) & 0x8000 == 0)
    }

    #[test]
    fn f16_to_f32_is_exact_for_every_value() {
        for h in 0..=u16::MAX {
            let want = f16::from_bits(h).to_f32();
            let got = f16_to_f32(h);
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{h:#06x}: {got:e} vs {want:e}"
            );
        }
    }

    #[test]
    fn f32_to_f16_rounds_like_half() {
        let check = |x: f32| {
            let want = f16::from_f32(x).to_bits();
            let got = f32_to_f16(x);
            assert!(
                same_f16(got, want),
                "{x:e} ({:#010x}): {got:#06x} vs {want:#06x}",
                x.to_bits()
            );
        };
        // Every f16 value, the midpoints to its neighbours (the ties), and
        // the f32 values next to them.
        for h in 0..0x7c00u16 {
            for sign in [0, 0x8000] {
                let x = f16::from_bits(h | sign).to_f64();
                let next = f16::from_bits((h + 1) | sign).to_f64();
                check(x as f32);
                let mid = ((x + next) / 2.0) as f32;
                for m in [
                    mid,
                    f32::from_bits(mid.to_bits() - 1),
                    f32::from_bits(mid.to_bits() + 1),
                ] {
                    check(m);
                }
            }
        }
        // A dense sample of all f32 bit patterns (every 257th), including
        // infinities and NaNs.
        for i in 0..(1u64 << 32) / 257 {
            check(f32::from_bits((i * 257) as u32));
        }
        for x in [
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            f32::MIN_POSITIVE,
            65504.0,
            65519.99,
            65520.0,
        ] {
            check(x);
            check(-x);
        }
    }

    #[test]
    fn bf16_conversions_match_half() {
        for h in 0..=u16::MAX {
            let want = bf16::from_bits(h).to_f32();
            let got = bf16_to_f32(h);
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{h:#06x}"
            );
        }
        for i in 0..(1u64 << 32) / 257 {
            let x = f32::from_bits((i * 257) as u32);
            assert_eq!(f32_to_bf16(x), bf16::from_f32(x).to_bits(), "{x:e}");
        }
    }

    /// Every f32 bit pattern (about 10 s in release):
    /// `cargo test --release -p offload-kernels -- --ignored every_f32`.
    #[test]
    #[ignore = "slow: 2^32 conversions"]
    fn every_f32_rounds_like_half() {
        for bits in 0..=u32::MAX {
            let x = f32::from_bits(bits);
            assert!(
                same_f16(f32_to_f16(x), f16::from_f32(x).to_bits()),
                "{bits:#010x}"
            );
        }
    }
}
