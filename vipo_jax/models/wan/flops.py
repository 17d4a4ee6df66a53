"""Analytic FLOP count (2 per multiply-add) of one Wan DiT forward, for the planner and the
per-phase throughput of a run. Checked against XLA's count of loop-free forwards in the tests."""

from __future__ import annotations


def wan_forward_flops(cfg, n_video: int, n_txt: int) -> float:
    """One Wan DiT forward for one sample with ``n_video`` patch tokens and ``n_txt`` text tokens
    (``cfg``: a WanConfig)."""
    d = cfg.num_attention_heads * cfg.attention_head_dim
    per_block = (2 * n_video * d * d * 4  # self-attention q, k, v, out
                 + 4 * n_video * n_video * d  # self-attention scores and values
                 + 2 * n_video * d * d * 2  # cross-attention q, out
                 + 2 * n_txt * d * d * 2  # cross-attention k, v on the text
                 + 4 * n_video * n_txt * d  # cross-attention scores and values
                 + 2 * n_video * d * cfg.ffn_dim * 2)  # FFN
    embed = (2 * n_video * cfg.in_channels * d * _prod(cfg.patch_size) + 2 * n_txt * (cfg.text_dim * d + d * d)
             + 2 * (cfg.freq_dim * d + d * d + d * 6 * d))
    out = 2 * n_video * d * cfg.out_channels * _prod(cfg.patch_size)
    return float(cfg.num_layers * per_block + embed + out)


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out
