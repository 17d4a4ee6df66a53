"""Sizes of the toy world's models: the real classes (Flux DiT, AutoencoderKL, T5, CLIP, DINOv2)
at tiny widths, chosen so that a 64x64 image has a 16x16 latent grid (VAE downsamples by 4), the
DiT sees 64 image + 8 text tokens, and the PSM backbone a grid of 8x8 patches."""

from __future__ import annotations

IMAGE_SIZE = 64

VAE = dict(
    in_channels=3, out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(8, 16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=4,
    sample_size=IMAGE_SIZE, scaling_factor=1.0, shift_factor=0.0, use_quant_conv=False,
    use_post_quant_conv=False, mid_block_add_attention=True,
)

T5 = dict(vocab_size=32, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
          relative_attention_num_buckets=8, relative_attention_max_distance=16,
          feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, model_type="t5")

CLIP_TEXT = dict(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=10, hidden_act="quick_gelu", layer_norm_eps=1e-5)
CLIP_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                   image_size=IMAGE_SIZE, patch_size=8, hidden_act="quick_gelu", layer_norm_eps=1e-5)
CLIP_PROJECTION = 64

DINO = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, mlp_ratio=4, image_size=IMAGE_SIZE,
            patch_size=8, num_channels=3, layer_norm_eps=1e-6, layerscale_value=1.0, use_swiglu_ffn=False,
            num_register_tokens=0, hidden_act="gelu", qkv_bias=True)

DIT = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=32,
           num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=True,
           axes_dims_rope=(8, 12, 12))
