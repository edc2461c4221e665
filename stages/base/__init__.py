"""The base stage's models: the T5/UMT5 text encoder, the Wan2.1 DiT and the Wan2.1 VAE (which the
tsr stage uses to decode). Each loads the public Wan2.1 checkpoints in the official and the
diffusers layouts."""

from stages.base.dit import WAN_DIT_SIZES, WanDiT, WanDiTConfig
from stages.base.text_encoder import TEXT_ENCODER_SIZES, TextEncoder, TextEncoderConfig
from stages.base.vae import WAN_VAE_SIZES, WanVAE, WanVAEConfig

__all__ = [
    "WanDiT", "WanDiTConfig", "WAN_DIT_SIZES",
    "TextEncoder", "TextEncoderConfig", "TEXT_ENCODER_SIZES",
    "WanVAE", "WanVAEConfig", "WAN_VAE_SIZES",
]
