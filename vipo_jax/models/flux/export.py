"""Export of a FLUX.1 DiT to the layouts other tools load: a diffusers transformer folder
(``FluxTransformer2DModel.from_pretrained(folder)``) and the Black Forest Labs single file
(``flux1-dev.safetensors`` keys, which ComfyUI and the BFL reference code load).

:func:`to_diffusers` and :func:`to_bfl` are the exact inverses of
:func:`vipo_jax.models.flux.convert.convert_diffusers` / :func:`~vipo_jax.models.flux.convert.convert_bfl`:
the scanned stacks are unstacked into per-layer keys, kernels transposed back to torch's
``(out, in)``, the fused ``qkv`` / ``linear1`` split into diffusers' ``to_q``/``to_k``/``to_v``
(``add_*_proj``, ``proj_mlp``), and for BFL the halves of ``norm_out`` swapped back to
``(shift, scale)``. The values are bit-identical (no arithmetic, only slicing and transposes).

Memory: both return a :class:`LazyTensors` mapping; every shape is known (and checked against the
config) up front, but a tensor is only sliced out of the model (and transposed) where the model
lives, moved to the host and laid out in torch order when it is read. The writers
(:func:`save_diffusers`, :func:`save_bfl`, and ``weights.safetensors_io.write_safetensors``
underneath) stream: the header is computed from the shapes, then each tensor is built, cast,
written and dropped. Besides the model itself, the host holds a few copies of one tensor at most,
whatever the depth: the largest FLUX.1 tensor, a single block's ``linear1``, is 21504 x 3072
(264 MB in float32), and a FLUX-width model's export peaked at +0.45-0.5 GB of RSS in float32 or
bfloat16. No full second copy of the weights is ever made. Each file is written to ``<name>.tmp``
and renamed when complete.

The generic parts (:class:`LazyTensors`, :class:`ParamSource`, :func:`save_diffusers_folder`) are
shared with ``vipo_jax.models.wan.export``; the streaming writer is ``weights.safetensors_io``'s
(``write_safetensors``, re-exported here), which every other safetensors file is written with too.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from vipo_jax.errors import CheckpointError
from vipo_jax.models.config_io import architecture_dict
from vipo_jax.models.flux.config import FluxConfig
from vipo_jax.weights.loading import check_float_dtype
from vipo_jax.weights.safetensors_io import tensor_dtype, tensor_shape, write_safetensors

__all__ = [
    "DEFAULT_MAX_SHARD_SIZE",
    "DIFFUSERS_WEIGHTS",
    "LayoutBuilder",
    "LazyTensors",
    "ParamSource",
    "diffusers_config",
    "flat_params",
    "parse_size",
    "plan_shards",
    "save_bfl",
    "save_diffusers",
    "save_diffusers_folder",
    "source_and_config",
    "target_dtypes",
    "to_bfl",
    "to_diffusers",
    "write_safetensors",
]

#: diffusers' weights file stem (``diffusion_pytorch_model.safetensors`` or its shards + index)
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"
#: diffusers' ``ModelMixin.save_pretrained`` default shard size
DEFAULT_MAX_SHARD_SIZE = "10GB"
#: the first diffusers release with ``FluxTransformer2DModel`` (written as ``_diffusers_version``)
FLUX_DIFFUSERS_VERSION = "0.30.0"

# ---------------------------------------------------------------------------------------------
# Shared machinery: our parameters in, lazily laid-out checkpoint tensors out, streamed to disk.


def _host(x: Any) -> np.ndarray:
    """A (slice of a) parameter as a host numpy array. Arrays sharded over several hosts are
    gathered (a collective: every process must export in the same order)."""
    if isinstance(x, jax.Array):
        if not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            x = multihost_utils.process_allgather(x, tiled=True)
        return np.asarray(jax.device_get(x))
    return np.asarray(x)


def flat_params(model_or_state: Any) -> dict[str, Any]:
    """``{dotted nnx path: array}`` of an ``nnx.Module``, an ``nnx.State`` or a mapping already in
    that form (e.g. a converter's output or a native ``model.safetensors``). Arrays stay where they
    are (device or memory map). Unmerged LoRA adapters are refused."""
    if isinstance(model_or_state, nnx.Module):
        model_or_state = nnx.state(model_or_state)
    if isinstance(model_or_state, nnx.State):
        flat = {".".join(str(p) for p in path): var for path, var in nnx.to_flat_state(model_or_state)}
    elif isinstance(model_or_state, Mapping):
        flat = {str(k): model_or_state[k] for k in model_or_state}
    else:
        raise TypeError(f"expected an nnx.Module, nnx.State or {{path: array}} mapping, got {type(model_or_state)}")
    flat = {k: (v.get_value() if isinstance(v, nnx.Variable) else v) for k, v in flat.items()}
    lora = sorted(k for k in flat if k.rsplit(".", 1)[-1] in ("lora_a", "lora_b"))
    if lora:
        raise CheckpointError(f"the model carries unmerged LoRA adapters ({lora[:3]}...): fold them into the "
                              "weights first (vipo_jax.nn.lora.merge_lora) and export the merged model")
    return flat


class ParamSource:
    """Our flat parameters, with bookkeeping: every one must be exported, with the shape the config
    implies (so a wrong config or a foreign model fails before anything is written)."""

    def __init__(self, model_or_state: Any, where: str = "model"):
        self.arrays = flat_params(model_or_state)
        self.where = where
        self.used: set[str] = set()

    def expect(self, name: str, shape: tuple[int, ...]) -> np.dtype:
        """Mark ``name`` exported after checking its shape; returns its dtype."""
        if name not in self.arrays:
            raise CheckpointError(f"{self.where} has no parameter {name!r} (does the config match the model?)")
        got = tuple(np.shape(self.arrays[name]))
        if got != tuple(shape):
            raise CheckpointError(f"{self.where}: parameter {name!r} has shape {got}, the config implies "
                                  f"{tuple(shape)}")
        self.used.add(name)
        return np.dtype(self.arrays[name].dtype)

    def get(self, name: str, index: tuple = (), transpose: bool = False) -> np.ndarray:
        """``param[index]`` (``.T`` with ``transpose``) on the host. A jax array is sliced and
        transposed where it lives (XLA's transpose is several times faster than numpy's strided
        copy), so only the piece needed crosses to the host."""
        a = self.arrays[name]
        a = a[index] if index else a
        return _host(a.T if transpose else a)

    def check_all_used(self) -> None:
        rest = sorted(set(self.arrays) - self.used)
        if rest:
            more = f" (and {len(rest) - 8} more)" if len(rest) > 8 else ""
            raise CheckpointError(f"{self.where} has parameters the export layout has no place for: "
                                  f"{rest[:8]}{more}")


class LazyTensors(Mapping[str, np.ndarray]):
    """``{checkpoint key: array}`` whose arrays are built when read; :meth:`shape` and :meth:`dtype`
    are known without building them. Keys keep their insertion order (the model's module order)."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tuple[int, ...], np.dtype, Callable[[], np.ndarray]]] = {}

    def add(self, key: str, shape: tuple[int, ...], dtype: Any, make: Callable[[], np.ndarray]) -> None:
        if key in self._entries:
            raise ValueError(f"duplicate checkpoint key {key!r}")
        self._entries[key] = (tuple(int(s) for s in shape), np.dtype(dtype), make)

    def __getitem__(self, key: str) -> np.ndarray:
        shape, dtype, make = self._entries[key]
        a = np.asarray(make())
        if a.shape != shape or a.dtype != dtype:
            raise CheckpointError(f"export of {key!r} produced {a.dtype}{list(a.shape)}, expected "
                                  f"{dtype}{list(shape)}")
        return a

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][0]

    def dtype(self, key: str) -> np.dtype:
        return self._entries[key][1]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


class LayoutBuilder:
    """Builds a :class:`LazyTensors` whose keys are slices of our parameters (used by both families);
    :meth:`done` checks that every parameter was placed."""

    def __init__(self, src: ParamSource):
        self.src = src
        self.out = LazyTensors()

    def put(self, key: str, name: str, index: tuple, shape: tuple[int, ...],
            fn: Callable[[np.ndarray], np.ndarray] | None = None, transpose: bool = False) -> None:
        """``key`` is ``fn(param[index])`` (``param[index].T`` first with ``transpose``)."""
        dtype = np.dtype(self.src.arrays[name].dtype)
        self.out.add(key, shape, dtype, functools.partial(self._make, name, index, fn, transpose))

    def _make(self, name: str, index: tuple, fn: Callable | None, transpose: bool) -> np.ndarray:
        a = self.src.get(name, index, transpose)
        return fn(a) if fn is not None else a

    def dense(self, key: str, ours: str, n_in: int, n_out: int, *, layer: int | None = None, n_layers: int = 0,
              cols: tuple[int, int] | None = None, fn: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        """torch Linear ``key`` (``.weight`` (out, in), ``.bias``) from our ``ours`` (``.kernel``
        (in, out), ``.bias``; with a leading layer axis when ``layer`` is given), or from its output
        columns ``cols``. ``fn`` is applied to both in torch layout (along the output axis 0)."""
        lead = () if layer is None else (n_layers,)
        self.src.expect(f"{ours}.kernel", (*lead, n_in, n_out))
        self.src.expect(f"{ours}.bias", (*lead, n_out))
        a, b = cols or (0, n_out)
        pre = () if layer is None else (layer,)
        self.put(f"{key}.weight", f"{ours}.kernel", (*pre, slice(None), slice(a, b)), (b - a, n_in), fn,
                 transpose=True)
        self.put(f"{key}.bias", f"{ours}.bias", (*pre, slice(a, b)), (b - a,), fn)

    def vector(self, key: str, ours: str, shape: tuple[int, ...], *, layer: int | None = None, n_layers: int = 0,
               out_shape: tuple[int, ...] | None = None) -> None:
        """A tensor copied as is (norm scales; ``out_shape``: reshaped, e.g. Wan's modulation tables)."""
        lead = () if layer is None else (n_layers,)
        self.src.expect(ours, (*lead, *shape))
        pre = () if layer is None else (layer,)
        fn = None if out_shape is None else (lambda a, s=tuple(out_shape): a.reshape(s))
        self.put(key, ours, pre, tuple(out_shape or shape), fn)

    def done(self) -> LazyTensors:
        self.src.check_all_used()
        return self.out


def source_and_config(model_or_state: Any, cfg: Any, cfg_cls: type) -> tuple[ParamSource, Any]:
    """The parameters to export and their config (``cfg``, else the model's own ``.cfg``)."""
    if cfg is None:
        cfg = getattr(model_or_state, "cfg", None)
        if cfg is None:
            raise CheckpointError(f"pass cfg= (a {cfg_cls.__name__}) to export a state without its model")
    if not isinstance(cfg, cfg_cls):
        raise CheckpointError(f"cfg must be a {cfg_cls.__name__}, got {type(cfg).__name__}")
    return ParamSource(model_or_state, where=f"the model ({cfg_cls.__name__})"), cfg


def target_dtypes(tensors: Mapping[str, np.ndarray], dtype: Any = None,
                  keep: Callable[[str], bool] | None = None) -> dict[str, np.dtype]:
    """The dtype each tensor is written in: its own, or ``dtype`` ("float32", "bfloat16",
    "float16") for every floating tensor except those ``keep(key)`` selects (kept as they are)."""
    own = {k: tensor_dtype(tensors, k) for k in tensors}
    if dtype is None:
        return own
    want = np.dtype(check_float_dtype(dtype, "export dtype"))
    return {k: (d if (keep is not None and keep(k)) else want) for k, d in own.items()}


def _nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize


def parse_size(size: int | str) -> int:
    """``10000000`` / ``"10GB"`` / ``"500MB"`` / ``"4GiB"`` -> bytes (KB, MB, GB are powers of 1000, as in
    diffusers and huggingface_hub; KiB, MiB, GiB powers of 1024)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(I)?)?B?\s*", str(size).upper())
    if not m:
        raise CheckpointError(f"max_shard_size: cannot read {size!r} (e.g. 10GB, 500MB, 4GiB or bytes)")
    scale = (1024 if m.group(3) else 1000) ** ("KMGT".index(m.group(2)) + 1) if m.group(2) else 1
    return int(float(m.group(1)) * scale)


def plan_shards(sizes: Mapping[str, int], max_shard_size: int) -> list[list[str]]:
    """Greedy split in key order, as huggingface_hub does for diffusers: a shard is closed when the
    next tensor would take it over the limit; a tensor larger than the limit gets a shard alone."""
    shards: list[list[str]] = []
    cur: list[str] = []
    cur_size = 0
    for key, n in sizes.items():
        if n > max_shard_size:
            shards.append([key])
            continue
        if cur and cur_size + n > max_shard_size:
            shards.append(cur)
            cur, cur_size = [], 0
        cur.append(key)
        cur_size += n
    if cur or not shards:
        shards.append(cur)
    return shards


_SHARD_RE = re.compile(re.escape(DIFFUSERS_WEIGHTS) + r"-\d{5}-of-\d{5}\.safetensors")


def save_diffusers_folder(folder: str | os.PathLike, tensors: Mapping[str, np.ndarray], config: Mapping[str, Any],
                          *, dtypes: Mapping[str, np.dtype] | None = None,
                          max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> list[Path]:
    """Write a diffusers model folder: ``config.json`` and ``diffusion_pytorch_model.safetensors``,
    or, above ``max_shard_size``, ``diffusion_pytorch_model-0000i-of-0000n.safetensors`` plus
    ``diffusion_pytorch_model.safetensors.index.json`` (diffusers' names and index format). Weight
    files of an earlier save that this one does not overwrite are removed, as diffusers does.
    Returns the files written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dtypes = dict(dtypes) if dtypes is not None else target_dtypes(tensors)
    sizes = {k: _nbytes(tensor_shape(tensors, k), dtypes[k]) for k in tensors}
    shards = plan_shards(sizes, parse_size(max_shard_size))
    if len(shards) == 1:
        names = [f"{DIFFUSERS_WEIGHTS}.safetensors"]
    else:
        names = [f"{DIFFUSERS_WEIGHTS}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    index_path = folder / f"{DIFFUSERS_WEIGHTS}.safetensors.index.json"
    writer = jax.process_index() == 0
    written = []
    if writer:
        (folder / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
        written.append(folder / "config.json")
    for name, keys in zip(names, shards):
        write_safetensors(folder / name, tensors, keys=keys, dtypes=dtypes, metadata={"format": "pt"})
        written.append(folder / name)
    if not writer:
        return written
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())},
                 "weight_map": {k: name for name, keys in zip(names, shards) for k in keys}}
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        written.append(index_path)
    for p in folder.iterdir():  # stale weights of an earlier save (other shard count / unsharded)
        stale = p.name == f"{DIFFUSERS_WEIGHTS}.safetensors" or p == index_path or _SHARD_RE.fullmatch(p.name)
        if stale and p.is_file() and p not in written:
            p.unlink()
    return written


# ---------------------------------------------------------------------------------------------
# FLUX.1.


def diffusers_config(cfg: FluxConfig) -> dict[str, Any]:
    """``config.json`` of a diffusers ``FluxTransformer2DModel`` with ``cfg``'s architecture (every
    ``__init__`` argument; the runtime options are not written)."""
    arch = architecture_dict(cfg)
    arch["axes_dims_rope"] = list(arch["axes_dims_rope"])
    return {"_class_name": "FluxTransformer2DModel", "_diffusers_version": FLUX_DIFFUSERS_VERSION, **arch}


def to_diffusers(model_or_state: Any, cfg: FluxConfig | None = None) -> LazyTensors:
    """Our FLUX.1 DiT -> diffusers ``FluxTransformer2DModel`` state dict (numpy, torch layout), the
    inverse of ``convert_diffusers``. ``model_or_state``: a :class:`FluxTransformer`, its
    ``nnx.State`` or ``{nnx path: array}``; ``cfg`` defaults to the model's. The result is lazy
    (see the module docstring); ``dict(...)`` it to materialise every tensor."""
    src, cfg = source_and_config(model_or_state, cfg, FluxConfig)
    x = LayoutBuilder(src)
    d, hd, mlp = cfg.inner_dim, cfg.attention_head_dim, cfg.mlp_hidden_dim
    nl, ns = cfg.num_layers, cfg.num_single_layers
    embedders = [("timestep_embedder", cfg.timestep_channels)]
    if cfg.guidance_embeds:
        embedders.append(("guidance_embedder", cfg.timestep_channels))
    embedders.append(("text_embedder", cfg.pooled_projection_dim))
    for name, n_in in embedders:
        p = f"time_text_embed.{name}"
        x.dense(f"{p}.linear_1", f"{p}.linear_1", n_in, d)
        x.dense(f"{p}.linear_2", f"{p}.linear_2", d, d)
    x.dense("context_embedder", "context_embedder", cfg.joint_attention_dim, d)
    x.dense("x_embedder", "x_embedder", cfg.in_channels, d)

    tb = "transformer_blocks"
    for i in range(nl):
        p = f"{tb}.{i}."
        lay = dict(layer=i, n_layers=nl)
        x.dense(p + "norm1.linear", f"{tb}.img_mod", d, 6 * d, **lay)
        x.dense(p + "norm1_context.linear", f"{tb}.txt_mod", d, 6 * d, **lay)
        x.vector(p + "attn.norm_q.weight", f"{tb}.img_attn.norm_q.scale", (hd,), **lay)
        x.vector(p + "attn.norm_k.weight", f"{tb}.img_attn.norm_k.scale", (hd,), **lay)
        for j, c in enumerate("qkv"):
            x.dense(p + f"attn.to_{c}", f"{tb}.img_attn.qkv", d, 3 * d, cols=(j * d, (j + 1) * d), **lay)
        x.dense(p + "attn.to_out.0", f"{tb}.img_attn_out", d, d, **lay)
        x.vector(p + "attn.norm_added_q.weight", f"{tb}.txt_attn.norm_q.scale", (hd,), **lay)
        x.vector(p + "attn.norm_added_k.weight", f"{tb}.txt_attn.norm_k.scale", (hd,), **lay)
        for j, c in enumerate("qkv"):
            x.dense(p + f"attn.add_{c}_proj", f"{tb}.txt_attn.qkv", d, 3 * d, cols=(j * d, (j + 1) * d), **lay)
        x.dense(p + "attn.to_add_out", f"{tb}.txt_attn_out", d, d, **lay)
        for ours, theirs in (("img_mlp", "ff"), ("txt_mlp", "ff_context")):
            x.dense(f"{p}{theirs}.net.0.proj", f"{tb}.{ours}.linear_in", d, mlp, **lay)
            x.dense(f"{p}{theirs}.net.2", f"{tb}.{ours}.linear_out", mlp, d, **lay)

    sb = "single_transformer_blocks"
    for i in range(ns):
        p = f"{sb}.{i}."
        lay = dict(layer=i, n_layers=ns)
        x.dense(p + "norm.linear", f"{sb}.modulation", d, 3 * d, **lay)
        n1 = 3 * d + mlp
        x.dense(p + "proj_mlp", f"{sb}.linear1", d, n1, cols=(3 * d, n1), **lay)
        x.dense(p + "proj_out", f"{sb}.linear2", d + mlp, d, **lay)
        x.vector(p + "attn.norm_q.weight", f"{sb}.norm_q.scale", (hd,), **lay)
        x.vector(p + "attn.norm_k.weight", f"{sb}.norm_k.scale", (hd,), **lay)
        for j, c in enumerate("qkv"):
            x.dense(p + f"attn.to_{c}", f"{sb}.linear1", d, n1, cols=(j * d, (j + 1) * d), **lay)

    x.dense("norm_out.linear", "norm_out.linear", d, 2 * d)
    x.dense("proj_out", "proj_out", d, cfg.out_dim)
    return x.done()


def _swap_halves(a: np.ndarray) -> np.ndarray:
    """Exchange the two halves along axis 0: diffusers ``norm_out`` (scale, shift) <-> BFL
    ``final_layer.adaLN_modulation.1`` (shift, scale)."""
    first, second = np.split(a, 2, axis=0)
    return np.concatenate([second, first], axis=0)


def to_bfl(model_or_state: Any, cfg: FluxConfig | None = None) -> LazyTensors:
    """Our FLUX.1 DiT -> Black Forest Labs single-file state dict (``flux1-dev.safetensors`` keys,
    no ``model.diffusion_model.`` prefix), the inverse of ``convert_bfl``; lazy like
    :func:`to_diffusers`."""
    src, cfg = source_and_config(model_or_state, cfg, FluxConfig)
    x = LayoutBuilder(src)
    d, hd, mlp = cfg.inner_dim, cfg.attention_head_dim, cfg.mlp_hidden_dim
    nl, ns = cfg.num_layers, cfg.num_single_layers
    x.dense("img_in", "x_embedder", cfg.in_channels, d)
    embedders = [("time_in", "timestep_embedder", cfg.timestep_channels),
                 ("vector_in", "text_embedder", cfg.pooled_projection_dim)]
    if cfg.guidance_embeds:
        embedders.append(("guidance_in", "guidance_embedder", cfg.timestep_channels))
    for theirs, ours, n_in in embedders:
        x.dense(f"{theirs}.in_layer", f"time_text_embed.{ours}.linear_1", n_in, d)
        x.dense(f"{theirs}.out_layer", f"time_text_embed.{ours}.linear_2", d, d)
    x.dense("txt_in", "context_embedder", cfg.joint_attention_dim, d)

    tb = "transformer_blocks"
    for i in range(nl):
        p = f"double_blocks.{i}."
        lay = dict(layer=i, n_layers=nl)
        for s in ("img", "txt"):
            x.dense(f"{p}{s}_mod.lin", f"{tb}.{s}_mod", d, 6 * d, **lay)
            x.dense(f"{p}{s}_attn.qkv", f"{tb}.{s}_attn.qkv", d, 3 * d, **lay)
            x.vector(f"{p}{s}_attn.norm.query_norm.scale", f"{tb}.{s}_attn.norm_q.scale", (hd,), **lay)
            x.vector(f"{p}{s}_attn.norm.key_norm.scale", f"{tb}.{s}_attn.norm_k.scale", (hd,), **lay)
            x.dense(f"{p}{s}_attn.proj", f"{tb}.{s}_attn_out", d, d, **lay)
            x.dense(f"{p}{s}_mlp.0", f"{tb}.{s}_mlp.linear_in", d, mlp, **lay)
            x.dense(f"{p}{s}_mlp.2", f"{tb}.{s}_mlp.linear_out", mlp, d, **lay)

    sb = "single_transformer_blocks"
    for i in range(ns):
        p = f"single_blocks.{i}."
        lay = dict(layer=i, n_layers=ns)
        x.dense(p + "linear1", f"{sb}.linear1", d, 3 * d + mlp, **lay)
        x.dense(p + "linear2", f"{sb}.linear2", d + mlp, d, **lay)
        x.vector(p + "norm.query_norm.scale", f"{sb}.norm_q.scale", (hd,), **lay)
        x.vector(p + "norm.key_norm.scale", f"{sb}.norm_k.scale", (hd,), **lay)
        x.dense(p + "modulation.lin", f"{sb}.modulation", d, 3 * d, **lay)

    x.dense("final_layer.linear", "proj_out", d, cfg.out_dim)
    x.dense("final_layer.adaLN_modulation.1", "norm_out.linear", d, 2 * d, fn=_swap_halves)
    return x.done()


def save_diffusers(model: Any, folder: str | os.PathLike, *, dtype: Any = None, cfg: FluxConfig | None = None,
                   max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> list[Path]:
    """Write ``model`` as a diffusers ``FluxTransformer2DModel`` folder (``config.json`` +
    ``diffusion_pytorch_model.safetensors``, sharded with an index above ``max_shard_size``, 10 GB
    by default like diffusers: FLUX.1 in bfloat16 gives 3 shards). ``dtype`` ("bfloat16", ...)
    casts every tensor; default: the parameters' own dtype. Streams tensor by tensor (see the
    module docstring). Returns the files written."""
    tensors = to_diffusers(model, cfg)
    cfg = cfg or model.cfg
    return save_diffusers_folder(folder, tensors, diffusers_config(cfg), dtypes=target_dtypes(tensors, dtype),
                                 max_shard_size=max_shard_size)


def save_bfl(model: Any, path: str | os.PathLike, *, dtype: Any = None, cfg: FluxConfig | None = None) -> Path:
    """Write ``model`` as one BFL-layout ``.safetensors`` file (what ``flux1-dev.safetensors`` holds;
    ComfyUI's diffusion-model loader, the BFL code and our ``vipo_jax.models.flux.from_pretrained`` read it). One file,
    never sharded (FLUX.1 is 23.8 GB in bfloat16, as the original). Streams tensor by tensor."""
    path = Path(path)
    tensors = to_bfl(model, cfg)
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(path, tensors, dtypes=target_dtypes(tensors, dtype), metadata={"format": "pt"})
    return path
