"""Analytic FLOP counts (2 per multiply-add) of the policies' forward passes and of one ViPO
iteration. XLA's cost analysis counts a loop body once, whatever its trip count (the layer scan,
the rollout scan, the update scans), so iteration totals come from here; the planner checks these
formulas against XLA on loop-free (unrolled) forwards.
"""

from __future__ import annotations

import dataclasses


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


@dataclasses.dataclass(frozen=True)
class IterationFlops:
    rollout: float
    train: float  # forward + backward of the trained transitions (model FLOPs, no recompute)
    recompute: float  # remat's extra forwards (hardware FLOPs, not model FLOPs)
    frozen: float  # decode, reward models, PSM backbone (XLA-counted or estimated by the caller)

    @property
    def model_flops(self) -> float:
        return self.rollout + self.train + self.frozen

    @property
    def hardware_flops(self) -> float:
        return self.model_flops + self.recompute


def iteration_flops(forward: float, *, samples: int, num_steps: int, trained_steps: int, num_updates: int = 1,
                    remat: str = "none", cfg_passes: int = 1, frozen: float = 0.0) -> IterationFlops:
    """One ViPO iteration from the per-sample policy forward ``forward``: the rollout runs
    ``num_steps`` forwards per sample; training runs forward + backward (3x) per trained step and
    sample, once per update chunk's samples (each sample is trained in exactly one chunk), plus one
    recomputed forward under remat. ``cfg_passes`` = 2 with true classifier-free guidance (Wan)."""
    del num_updates  # chunks partition the samples: the total does not depend on their number
    f = forward * cfg_passes
    rollout = samples * num_steps * f
    train = samples * trained_steps * 3 * f
    recompute = samples * trained_steps * f if remat != "none" else 0.0
    return IterationFlops(rollout=rollout, train=train, recompute=recompute, frozen=frozen)
