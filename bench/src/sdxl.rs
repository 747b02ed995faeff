//! Tensor shapes of the SDXL UNet, derived from its published configuration.
//!
//! The diffusers `UNet2DConditionModel` configuration of SDXL base 1.0:
//! block_out_channels (320, 640, 1280), layers_per_block 2,
//! transformer_layers_per_block (1, 2, 10), cross_attention_dim 2048,
//! addition embedding input 2816, linear projections, GEGLU feed-forward.
//! Only weights of linear and conv layers are listed (norms and biases are
//! small and not what an allocator struggles with).

/// One weight tensor: name and shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightShape {
    /// Diffusers-style name.
    pub name: String,
    /// Shape: [out, in] for linear, [out, in, kh, kw] for conv.
    pub shape: Vec<usize>,
}

impl WeightShape {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

struct Builder(Vec<WeightShape>);

impl Builder {
    fn linear(&mut self, name: String, out: usize, inp: usize) {
        self.0.push(WeightShape {
            name,
            shape: vec![out, inp],
        });
    }
    fn conv(&mut self, name: String, out: usize, inp: usize, k: usize) {
        self.0.push(WeightShape {
            name,
            shape: vec![out, inp, k, k],
        });
    }
    fn resnet(&mut self, p: &str, inp: usize, out: usize) {
        self.conv(format!("{p}.conv1.weight"), out, inp, 3);
        self.linear(format!("{p}.time_emb_proj.weight"), out, 1280);
        self.conv(format!("{p}.conv2.weight"), out, out, 3);
        if inp != out {
            self.conv(format!("{p}.conv_shortcut.weight"), out, inp, 1);
        }
    }
    fn transformer(&mut self, p: &str, c: usize, depth: usize) {
        self.linear(format!("{p}.proj_in.weight"), c, c);
        for d in 0..depth {
            let b = format!("{p}.transformer_blocks.{d}");
            for w in ["to_q", "to_k", "to_v", "to_out.0"] {
                self.linear(format!("{b}.attn1.{w}.weight"), c, c);
            }
            self.linear(format!("{b}.attn2.to_q.weight"), c, c);
            self.linear(format!("{b}.attn2.to_k.weight"), c, 2048);
            self.linear(format!("{b}.attn2.to_v.weight"), c, 2048);
            self.linear(format!("{b}.attn2.to_out.0.weight"), c, c);
            self.linear(format!("{b}.ff.net.0.proj.weight"), 8 * c, c);
            self.linear(format!("{b}.ff.net.2.weight"), c, 4 * c);
        }
        self.linear(format!("{p}.proj_out.weight"), c, c);
    }
}

/// The linear and conv weights of the SDXL base UNet, in execution order.
pub fn sdxl_unet_weights() -> Vec<WeightShape> {
    let mut b = Builder(Vec::new());
    b.conv("conv_in.weight".into(), 320, 4, 3);
    b.linear("time_embedding.linear_1.weight".into(), 1280, 320);
    b.linear("time_embedding.linear_2.weight".into(), 1280, 1280);
    b.linear("add_embedding.linear_1.weight".into(), 1280, 2816);
    b.linear("add_embedding.linear_2.weight".into(), 1280, 1280);
    let chans = [320, 640, 1280];
    let depth = [0, 2, 10];
    let mut skip = vec![320];
    let mut c_in = 320;
    for (i, (&c, &d)) in chans.iter().zip(&depth).enumerate() {
        for j in 0..2 {
            b.resnet(&format!("down_blocks.{i}.resnets.{j}"), c_in, c);
            if d > 0 {
                b.transformer(&format!("down_blocks.{i}.attentions.{j}"), c, d);
            }
            c_in = c;
            skip.push(c);
        }
        if i < 2 {
            b.conv(
                format!("down_blocks.{i}.downsamplers.0.conv.weight"),
                c,
                c,
                3,
            );
            skip.push(c);
        }
    }
    b.resnet("mid_block.resnets.0", 1280, 1280);
    b.transformer("mid_block.attentions.0", 1280, 10);
    b.resnet("mid_block.resnets.1", 1280, 1280);
    let mut c_prev = 1280;
    for (i, (&c, &d)) in chans.iter().rev().zip(depth.iter().rev()).enumerate() {
        for j in 0..3 {
            let s = skip.pop().expect("one skip connection per up resnet");
            b.resnet(&format!("up_blocks.{i}.resnets.{j}"), c_prev + s, c);
            if d > 0 {
                b.transformer(&format!("up_blocks.{i}.attentions.{j}"), c, d);
            }
            c_prev = c;
        }
        if i < 2 {
            b.conv(format!("up_blocks.{i}.upsamplers.0.conv.weight"), c, c, 3);
        }
    }
    b.conv("conv_out.weight".into(), 4, 320, 3);
    b.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_count_matches_sdxl() {
        let w = sdxl_unet_weights();
        let params: usize = w.iter().map(WeightShape::numel).sum();
        // SDXL's UNet has 2.567 billion parameters; norms and biases are a few million of them.
        assert!((2_550_000_000..2_567_000_000).contains(&params), "{params}");
        // The largest conv weight: 1280 x 2560 x 3 x 3 (up block 0, first resnet).
        let largest = w.iter().map(WeightShape::numel).max().unwrap();
        assert_eq!(largest, 1280 * 2560 * 9);
        assert_eq!(
            w.iter()
                .filter(|s| s.name.ends_with("attn2.to_k.weight"))
                .count(),
            70
        );
    }
}
