"""Analytic FLOP count (2 per multiply-add) of one FLUX DiT forward, for the planner and the
per-phase throughput of a run. Checked against XLA's count of loop-free forwards in the tests."""

from __future__ import annotations


def flux_forward_flops(cfg, n_img: int, n_txt: int) -> float:
    """One FLUX DiT forward for one sample with ``n_img`` image and ``n_txt`` text tokens
    (``cfg``: a FluxConfig). Matmuls and attention; norms, RoPE and softmax are not counted."""
    d, n = cfg.inner_dim, n_img + n_txt
    per_token = 2 * (3 * d * d + d * d + 2 * d * cfg.mlp_hidden_dim)  # qkv, out, MLP (both block kinds)
    attn = 4 * n * n * d  # QK^T and AV
    blocks = (cfg.num_layers + cfg.num_single_layers) * (per_token * n + attn)
    modulation = 2 * d * d * (6 * 2 * cfg.num_layers + 3 * cfg.num_single_layers + 2)
    embed = (2 * n_img * cfg.in_channels * d + 2 * n_txt * cfg.joint_attention_dim * d
             + 2 * (cfg.timestep_channels * d + d * d) * (2 if cfg.guidance_embeds else 1)
             + 2 * (cfg.pooled_projection_dim * d + d * d))
    out = 2 * n_img * d * cfg.out_dim
    return float(blocks + modulation + embed + out)
