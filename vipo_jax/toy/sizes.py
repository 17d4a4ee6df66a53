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

DIT = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=32,
           num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=True,
           axes_dims_rope=(8, 12, 12))

# --- the video toy world (vipo_jax/toy/video.py, python -m vipo_jax.toy.pretrain_video) -------------
# 9 frames of 32x32 -> Wan VAE latents of 3 frames x 8x8 positions (4x in time and space). The Wan
# DiT patchifies (3, 1, 1) (not Wan2.1's (1, 2, 2)): 64 video tokens, one per latent position with its
# 3 latent frames, so a digit spans about 7 x 7 tokens as in the image toy world (with (1, 2, 2) it
# spans 3.5 x 3.5 and the base model does not learn readable digits in the time budget); it
# cross-attends to 8 text tokens.
VIDEO_FRAMES = 9
VIDEO_SIZE = 32

WAN_VAE = dict(base_dim=8, z_dim=8, dim_mult=(1, 2, 4), num_res_blocks=1, attn_scales=(),
               temperal_downsample=(True, True), scale_factor_temporal=4, scale_factor_spatial=4,
               latents_mean=(0.0,) * 8, latents_std=(1.0,) * 8)

# The text encoder in UMT5 mode (a relative-attention table per layer, as Wan2.1's UMT5-XXL).
WAN_T5 = dict(vocab_size=32, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
              relative_attention_num_buckets=8, relative_attention_max_distance=16,
              feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, model_type="umt5")

WAN_DIT = dict(patch_size=(3, 1, 1), num_attention_heads=4, attention_head_dim=32, in_channels=8, out_channels=8,
               text_dim=64, freq_dim=64, ffn_dim=256, num_layers=4, cross_attn_norm=True, eps=1e-6,
               rope_max_seq_len=64)
