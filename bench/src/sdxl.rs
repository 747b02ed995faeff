//! The SDXL UNet's linear and conv weight sizes, from the loader's full-size SDXL preset.

use offload_loader::synth::{preset_specs, Preset, PresetOptions};
use offload_loader::Dtype;

/// Byte sizes (fp16) of the SDXL base UNet's linear (2-D) and conv (4-D)
/// weights, in checkpoint order. Norms and biases are left out: they are
/// small and not what an allocator struggles with.
pub fn sdxl_unet_weight_bytes() -> Vec<usize> {
    let opts = PresetOptions {
        scale: 1,
        dtype: Dtype::F16,
        text_encoders: false,
        vae: false,
    };
    preset_specs(Preset::Sdxl, &opts)
        .into_iter()
        .filter(|t| t.name.starts_with("model.diffusion_model.") && t.name.ends_with(".weight"))
        .filter(|t| t.shape.len() == 2 || t.shape.len() == 4)
        .filter_map(|t| t.byte_len().map(|b| b as usize))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_the_sdxl_unet_weights() {
        let w = sdxl_unet_weight_bytes();
        // The largest: the 1280 x 2560 x 3 x 3 conv of the first up-block resnet.
        assert_eq!(w.iter().max(), Some(&(1280 * 2560 * 9 * 2)));
        // The smallest: conv_in, 320 x 4 x 3 x 3.
        assert_eq!(w.iter().min(), Some(&(320 * 4 * 9 * 2)));
        let params: usize = w.iter().sum::<usize>() / 2;
        // 2,567,463,684 parameters in all; norms and biases are about 3 million of them.
        assert!((2_560_000_000..2_567_463_684).contains(&params), "{params}");
    }
}
