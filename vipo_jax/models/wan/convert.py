"""Checkpoint conversion for the Wan2.1 T2V DiT (diffusers ``WanTransformer3DModel`` layout), and its
loader.

The diffusers layout (``transformer/diffusion_pytorch_model*.safetensors`` + ``config.json``; the
14B ships as several shards behind an ``.index.json``) maps almost one to one onto our names:
torch Linears are transposed, ``patch_embedding``'s Conv3d kernel becomes channels-last
``(t, h, w, in, out)``, per-block tensors are stacked along a leading layer axis, and the
``(1, n, D)`` modulation tables lose their leading 1.

The conversion is lazy: every key is checked (presence and shape, against the sizes the config
implies) up front, and each stacked array is only built when the loader asks for it, so loading
the 14B never holds more than one converted parameter in host memory besides the memory-mapped
files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import numpy as np

from vipo_jax.errors import CheckpointError
from vipo_jax.models.wan.config import WanConfig
from vipo_jax.weights.loading import SourceKeys, conv, linear
from vipo_jax.weights.safetensors_io import SafetensorsFile

# diffusers' WanTransformer3DModel._keys_to_ignore_on_load_unexpected: leftovers of older exports
# that diffusers itself drops when loading.
_IGNORED = ("norm_added_q",)


class LazyParams(Mapping[str, np.ndarray]):
    """``{nnx path: array}`` whose arrays are built on access (see the module docstring)."""

    def __init__(self, makers: dict[str, Callable[[], np.ndarray]]):
        self._makers = makers

    def __getitem__(self, name: str) -> np.ndarray:
        return self._makers[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._makers)

    def __len__(self) -> int:
        return len(self._makers)


class _Reader:
    """SourceKeys with shape checks; ``take`` marks a key used and returns a (memory-mapped) view."""

    def __init__(self, tensors: Mapping[str, np.ndarray], where: str):
        self.sk = tensors if isinstance(tensors, SourceKeys) else SourceKeys(tensors, where)

    def take(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in self.sk:
            raise CheckpointError(f"missing key {key!r} in {self.sk.where}")
        got = self.sk.shape(key)
        if got != tuple(shape):
            raise CheckpointError(f"shape mismatch for {key!r} in {self.sk.where}: checkpoint has {got}, "
                                  f"the config implies {tuple(shape)}")
        return self.sk.take(key)


def convert_diffusers(tensors: Mapping[str, np.ndarray], cfg: WanConfig, *, where: str | None = None) -> LazyParams:
    """diffusers ``WanTransformer3DModel`` state dict -> ``{nnx path: array}`` (lazy mapping).

    Missing keys, unexpected keys and wrong shapes raise :class:`CheckpointError` naming the key."""
    if where is None:
        where = str(tensors.path) if isinstance(tensors, SafetensorsFile) else "Wan transformer checkpoint"
    r = _Reader(tensors, where)
    d, n_layers = cfg.inner_dim, cfg.num_layers
    makers: dict[str, Callable[[], np.ndarray]] = {}

    def dense(ours: str, theirs: str, n_in: int, n_out: int, per_layer: bool = False) -> None:
        if per_layer:
            ws = [r.take(f"blocks.{i}.{theirs}.weight", (n_out, n_in)) for i in range(n_layers)]
            bs = [r.take(f"blocks.{i}.{theirs}.bias", (n_out,)) for i in range(n_layers)]
            makers[f"blocks.{ours}.kernel"] = lambda: np.stack([linear(w) for w in ws])
            makers[f"blocks.{ours}.bias"] = lambda: np.stack(bs)
        else:
            w, b = r.take(f"{theirs}.weight", (n_out, n_in)), r.take(f"{theirs}.bias", (n_out,))
            makers[f"{ours}.kernel"] = lambda: linear(w)
            makers[f"{ours}.bias"] = lambda: np.asarray(b)

    def vector(ours: str, theirs: str, shape: tuple[int, ...], out_shape: tuple[int, ...]) -> None:
        """Per-layer tensors (norm scales, modulation tables) reshaped and stacked."""
        vs = [r.take(f"blocks.{i}.{theirs}", shape) for i in range(n_layers)]
        makers[f"blocks.{ours}"] = lambda: np.stack([np.reshape(v, out_shape) for v in vs])

    pt, ph, pw = cfg.patch_size
    pw_key = r.take("patch_embedding.weight", (d, cfg.in_channels, pt, ph, pw))
    pb_key = r.take("patch_embedding.bias", (d,))
    makers["patch_embedding.kernel"] = lambda: conv(pw_key)
    makers["patch_embedding.bias"] = lambda: np.asarray(pb_key)

    ce = "condition_embedder"
    dense(f"{ce}.time_embedder.linear_1", f"{ce}.time_embedder.linear_1", cfg.freq_dim, d)
    dense(f"{ce}.time_embedder.linear_2", f"{ce}.time_embedder.linear_2", d, d)
    dense(f"{ce}.time_proj", f"{ce}.time_proj", d, 6 * d)
    dense(f"{ce}.text_embedder.linear_1", f"{ce}.text_embedder.linear_1", cfg.text_dim, d)
    dense(f"{ce}.text_embedder.linear_2", f"{ce}.text_embedder.linear_2", d, d)

    if n_layers:
        for attn in ("attn1", "attn2"):
            for proj in ("to_q", "to_k", "to_v"):
                dense(f"{attn}.{proj}", f"{attn}.{proj}", d, d, per_layer=True)
            dense(f"{attn}.to_out", f"{attn}.to_out.0", d, d, per_layer=True)
            vector(f"{attn}.norm_q.scale", f"{attn}.norm_q.weight", (d,), (d,))
            vector(f"{attn}.norm_k.scale", f"{attn}.norm_k.weight", (d,), (d,))
        if cfg.cross_attn_norm:
            vector("norm2.scale", "norm2.weight", (d,), (d,))
            vector("norm2.bias", "norm2.bias", (d,), (d,))
        dense("ffn.linear_in", "ffn.net.0.proj", d, cfg.ffn_dim, per_layer=True)
        dense("ffn.linear_out", "ffn.net.2", cfg.ffn_dim, d, per_layer=True)
        vector("scale_shift_table", "scale_shift_table", (1, 6, d), (6, d))

    dense("proj_out", "proj_out", d, cfg.out_dim)
    sst = r.take("scale_shift_table", (1, 2, d))
    makers["scale_shift_table"] = lambda: np.reshape(sst, (2, d))
    r.sk.check_all_used(ignore=lambda k: any(s in k for s in _IGNORED))
    return LazyParams(makers)
