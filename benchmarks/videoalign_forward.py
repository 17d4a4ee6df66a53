"""VideoAlign's full-size reward forward on one accelerator: time, memory, bf16 vs float32 scores.

    python benchmarks/videoalign_forward.py                       # 8 clips of 53 x 240 x 416 at 16 fps
    python benchmarks/videoalign_forward.py --folder /data/VideoReward   # the released weights
    python benchmarks/videoalign_forward.py --dry_run             # a tiny Qwen2-VL: checks the script

The released architecture (Qwen2-VL-2B, vocabulary 151660, the ``use_norm`` z-scoring), random
weights unless ``--folder`` gives the KlingTeam/VideoReward folder (the speed does not depend on
the weights; the bf16-vs-float32 score difference does, so quote it from a ``--folder`` run). The
whole score function — frame sampling, smart_resize, patchify, the vision tower, the decoder, the
head — is one jit over (B, T, H, W, 3) frames in [0, 1], as inside the train step. Prints one row
per dtype: compile s, forward s (min of ``--repeats``), clips/s, peak GiB (the allocator's on a GPU,
XLA's arguments + temporaries elsewhere), and the largest |score| difference to float32.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vipo_jax.models.qwen2_vl.config import preset as qwen_preset  # noqa: E402
from vipo_jax.rewards import videoalign as va  # noqa: E402
from vipo_jax.weights.loading import init_model  # noqa: E402

#: the dry run's tiny Qwen2-VL (the released vocabulary, so the real token ids fit)
TINY_TEXT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, mrope_section=(2, 3, 3))
TINY_VISION = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2)


def model_and_settings(a: argparse.Namespace, dtype: str, like: dict | None = None):
    """``((graphdef, params), settings)``: the released weights, or random ones of the release's shapes.
    ``like``: float32 random params to cast instead of drawing new ones (the same weights in every
    dtype, so the score difference is the precision's alone)."""
    if a.folder:
        model, settings, _ = va.load_videoalign(a.folder, param_dtype=dtype, dtype=dtype)
        return nnx.split(model), settings
    settings = va.RELEASE_SETTINGS
    qwen = qwen_preset("qwen2-vl-2b", param_dtype=dtype, dtype=dtype,
                       text_config={"vocab_size": 151660, **(TINY_TEXT if a.dry_run else {})},
                       vision_config=TINY_VISION if a.dry_run else {})
    cfg = va.VideoAlignConfig(qwen=qwen, output_dim=settings.output_dim)
    if like is None:
        return nnx.split(init_model(va.VideoAlignModel, cfg, abstract=False)), settings
    graphdef, shapes = nnx.split(init_model(va.VideoAlignModel, cfg, abstract=True))
    params = jax.tree.map(lambda s, x: jnp.asarray(x, s.dtype), shapes, like)
    return (graphdef, params), settings


def rows_for(settings, cfg, clips: int, frames: int, height: int, width: int, fps: float) -> dict:
    """Token rows of the right shapes (random ids, the three reward positions at the end): timing does
    not depend on the text, and ``--folder`` runs are about the model, not the tokenizer."""
    lay = va.video_layout(frames, height, width, fps, settings, cfg.qwen.vision_config)
    length = lay.num_video_tokens + 1000  # the template is about 1000 tokens
    ids = np.random.default_rng(0).integers(0, 151000, (clips, length)).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones((clips, length), np.int32),
            "reward_positions": np.tile(np.arange(length - 3, length, dtype=np.int32), (clips, 1)),
            "frame_indices": np.tile(np.asarray(lay.frame_indices, np.int32), (clips, 1))}


def peak_gib(compiled) -> float:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**30
    mem = compiled.memory_analysis()
    return (mem.argument_size_in_bytes + mem.temp_size_in_bytes) / 2**30 if mem else float("nan")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", default="", help="the KlingTeam/VideoReward folder (default: random weights)")
    p.add_argument("--clips", type=int, default=8)
    p.add_argument("--frames", type=int, default=53)
    p.add_argument("--size", default="240x416")
    p.add_argument("--fps", type=float, default=16.0)
    p.add_argument("--clips_per_call", type=int, default=0)
    p.add_argument("--dtypes", default="float32,bfloat16", help="float32 first: the others are compared to it")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dry_run", action="store_true", help="a tiny random Qwen2-VL, 2 clips of 8 x 56 x 56")
    a = p.parse_args(argv)
    if a.dry_run:
        a.clips, a.frames, a.size, a.repeats = 2, 8, "56x56", 1
    h, w = (int(x) for x in a.size.split("x"))
    videos = jax.random.uniform(jax.random.PRNGKey(0), (a.clips, a.frames, h, w, 3), jnp.float32)
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}; {a.clips} clips of "
          f"{a.frames} x {h} x {w} at {a.fps:g} fps; weights: {a.folder or 'random'}"
          f"{' (dry run: tiny model)' if a.dry_run else ''}\n")
    print("| dtype | frames read | video tokens | compile s | forward s | clips/s | peak GiB | "
          "max |Δ score| vs float32 |")
    print("|---|---|---|---|---|---|---|---|")
    scores: dict[str, np.ndarray] = {}
    f32 = None
    for dtype in a.dtypes.split(","):
        (graphdef, params), settings = model_and_settings(a, dtype, like=f32)
        if dtype == "float32" and not a.folder:
            f32 = params
        cfg = nnx.merge(graphdef, params).config
        rows = {k: jnp.asarray(v) for k, v in rows_for(settings, cfg, a.clips, a.frames, h, w, a.fps).items()}
        fn = va.make_score_fn(graphdef, settings, clips_per_call=a.clips_per_call)
        t = time.perf_counter()
        compiled = jax.jit(fn).lower(params, videos, rows).compile()
        compile_s = time.perf_counter() - t
        out = jax.block_until_ready(compiled(params, videos, rows))
        times = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            out = jax.block_until_ready(compiled(params, videos, rows))
            times.append(time.perf_counter() - t)
        scores[dtype] = np.asarray(out, np.float64)
        assert np.all(np.isfinite(scores[dtype])), f"{dtype}: non-finite scores"
        lay = va.video_layout(a.frames, h, w, a.fps, settings, cfg.qwen.vision_config)
        ref = scores.get("float32")
        diff = f"{np.abs(scores[dtype] - ref).max():.3g}" if ref is not None and dtype != "float32" else "—"
        print(f"| {dtype} | {len(lay.frame_indices)} | {lay.num_video_tokens} | {compile_s:.0f} | {min(times):.3f} | "
              f"{a.clips / min(times):.1f} | {peak_gib(compiled):.1f} | {diff} |")
    if "float32" in scores and len(scores) > 1:  # the bf16 row printed before float32 existed
        for dtype, s in scores.items():
            if dtype != "float32":
                print(f"\nmax |score({dtype}) - score(float32)| = {np.abs(s - scores['float32']).max():.4g} "
                      f"(scores' range {scores['float32'].min():.3g} .. {scores['float32'].max():.3g})")
    if a.dry_run:
        print("\ndry run ok")


if __name__ == "__main__":
    main()
