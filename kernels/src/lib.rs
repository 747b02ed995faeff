//! LoRA merge kernels.
