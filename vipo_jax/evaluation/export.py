"""Merge-and-export: a run's trained policy (its LoRA adapters folded into the base weights, or its
EMA) written as one plain model that loads without the run, its config or any adapter code, in one
of three layouts (``fmt``):

* ``native`` (default dtype float32): ``OUT/transformer`` in our layout (``weights/native.py``:
  ``config.json`` + ``model.safetensors``). For the toy worlds ``OUT`` becomes a complete toy-assets
  folder (the other toy models copied beside it), so ``--config.model.path=OUT`` trains or evaluates
  from the fine-tuned policy.
* ``diffusers`` (default bfloat16, what FLUX.1 and Wan2.1 ship in): ``OUT/transformer`` is a
  diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors``, sharded above
  10 GB) that ``FluxTransformer2DModel`` / ``WanTransformer3DModel.from_pretrained`` load, to drop
  into a diffusers pipeline (``FluxPipeline.from_pretrained(base, transformer=...)``). Wan keeps
  the modules diffusers keeps in float32 in float32.
* ``bfl`` (FLUX only, default bfloat16): ``OUT/flux1-<variant>-vipo.safetensors``, the Black Forest
  Labs single-file layout ComfyUI and the BFL code load.

float32 loses nothing (LoRA merges are computed in float32 and the weights are never more precise);
bfloat16 halves the files, as the released checkpoints are. Every layout writes ``OUT/export.json``
(format, dtype, step, params or EMA, LoRA settings) and is read back by :func:`load_exported`. The
writers stream tensor by tensor (``models/<family>/export.py``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jax
import ml_collections as mlc
from flax import nnx

from vipo_jax.errors import CheckpointError, ConfigError
from vipo_jax.evaluation.checkpoints import CheckpointSpec
from vipo_jax.evaluation.run import checkpoint_params
from vipo_jax.models.config_io import FLOAT_DTYPES, architecture_dict
from vipo_jax.models.flux import FluxConfig, FluxTransformer
from vipo_jax.models.flux import export as flux_export
from vipo_jax.models.flux import from_pretrained as load_flux
from vipo_jax.models.wan import WanConfig, WanTransformer
from vipo_jax.models.wan import export as wan_export
from vipo_jax.models.wan import from_pretrained as load_wan
from vipo_jax.models.wan.config import CLASS_NAME as WAN_CLASS
from vipo_jax.training.lora import lora_config
from vipo_jax.training.run_dir import run_config
from vipo_jax.weights.loading import ShardingFn
from vipo_jax.weights.native import load_native, save_native
from vipo_jax.worlds import get_family

#: native ``vipo_kind`` of each family's policy
KINDS = {"flux": "flux", "wan": "wan"}
#: export layouts and the families each is written for
FORMATS = {"native": ("flux", "wan"), "diffusers": ("flux", "wan"), "bfl": ("flux",)}
#: the dtype each layout is written in unless ``dtype`` is given (see the module docstring)
DEFAULT_DTYPES = {"native": "float32", "diffusers": "bfloat16", "bfl": "bfloat16"}
#: diffusers ``_class_name`` of each family's transformer
DIFFUSERS_CLASSES = {"flux": "FluxTransformer2DModel", "wan": WAN_CLASS}


def load_policy(c: mlc.ConfigDict, sharding: ShardingFn | None = None) -> tuple[nnx.Module, Path | None]:
    """The run's policy as its world loads it (same dtypes, remat, attention), without the other
    models; returns it and, for toy worlds, the assets folder it came from."""
    family = get_family(c.model.family)
    if c.world == "toy":
        toy = family.toy_models(c)
        return toy.policy, toy.root
    root = Path(c.model.path) if c.model.path else None
    if root is None or not root.is_dir():
        raise CheckpointError(f"the run's base model is not at --config.model.path={c.model.path!r}; pass "
                              "--model_path=<the folder the run was trained from>")
    return family.pretrained_models(c, root, sharding)[0], None


def check_format(fmt: str, dtype: str | None, family: str) -> str:
    """Validate a layout for a model family and return the dtype to write (``dtype`` or the
    layout's default), before anything is loaded."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format={fmt!r}: choose one of {', '.join(FORMATS)}")
    if family not in FORMATS[fmt]:
        raise ConfigError(f"--format={fmt} is for {' / '.join(FORMATS[fmt])} models only; this run trained a "
                          f"{family} model: use --format=diffusers or --format=native")
    dtype = dtype or DEFAULT_DTYPES[fmt]
    if dtype not in FLOAT_DTYPES:
        raise ConfigError(f"--dtype={dtype!r}: choose one of {', '.join(FLOAT_DTYPES)}")
    return dtype


def bfl_name(c: mlc.ConfigDict) -> str:
    """The single file's name: ``flux1-<variant>-vipo.safetensors`` (not the original's name)."""
    return f"flux1-{c.model.get('variant', 'dev')}-vipo.safetensors"


def _cast(policy: nnx.Module, dtype: str) -> nnx.Module:
    """``policy`` with every parameter in ``dtype`` and its config saying so (for the native layout)."""
    state = nnx.state(policy)
    nnx.update(policy, jax.tree.map(lambda x: x.astype(dtype), state))
    policy.cfg = policy.cfg.replace(param_dtype=dtype)
    return policy


def export_policy(workdir: str | Path, out: str | Path, *, step: int | None = None, use_ema: bool = False,
                  model_path: str | None = None, fmt: str = "native", dtype: str | None = None) -> dict:
    """Write the run's merged policy to ``out`` in layout ``fmt`` and ``dtype`` (default: the
    layout's, :data:`DEFAULT_DTYPES`; see the module docstring); returns what was written (also
    ``out/export.json``). A layout the run's family has no form in is refused before anything is
    loaded."""
    workdir, out = Path(workdir), Path(out)
    if not workdir.is_dir():
        raise CheckpointError(f"run workdir {workdir} does not exist")
    if not (workdir / "checkpoints").is_dir():
        raise CheckpointError(f"{workdir}: no checkpoints/ folder (is it a vipo_jax run workdir?)")
    c = run_config(workdir)
    family = c.model.family
    dtype = check_format(fmt, dtype, family)
    if model_path:
        c.model.path = model_path
    policy, toy_root = load_policy(c)
    spec = CheckpointSpec("export", str(workdir), step, ema=use_ema)
    params, got, info = checkpoint_params(spec, policy, nnx.state(policy))
    nnx.update(policy, params)
    lora = lora_config(c)
    info.pop("lora_rank", None)
    info["lora"] = ({"rank": lora.rank, "alpha": lora.alpha, "scale": lora.scale, "targets": list(lora.targets)}
                    if lora.enabled else None)
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"format": fmt, "dtype": dtype}
    if fmt == "native":
        kind = KINDS[family]
        if toy_root is not None:  # a complete toy-assets folder: the other toy models alongside
            for sub in sorted(toy_root.iterdir()):
                if sub.is_dir() and sub.name != "transformer":
                    shutil.copytree(sub, out / sub.name, dirs_exist_ok=True)
        policy = _cast(policy, dtype)
        save_native(policy, out / "transformer", policy.cfg, kind)
        target = out / "transformer"
        record["kind"] = kind
    elif fmt == "diffusers":
        target = out / "transformer"
        exporter = flux_export if family == "flux" else wan_export
        exporter.save_diffusers(policy, target, dtype=dtype)
        record["class_name"] = DIFFUSERS_CLASSES[family]
    else:  # bfl: the file has no config; load_exported rebuilds it from the architecture recorded here
        target = out / bfl_name(c)
        flux_export.save_bfl(policy, target, dtype=dtype)
        record["architecture"] = architecture_dict(policy.cfg)
    record.update({"workdir": str(workdir.absolute()), "step": got, "ema": use_ema, "family": family,
                   "world": c.world, "transformer": str(target.absolute()), **info})
    if jax.process_index() == 0:
        (out / "export.json").write_text(json.dumps(record, indent=1))
    return record


def load_exported(out: str | Path, **overrides: Any) -> nnx.Module:
    """The policy written by :func:`export_policy`, whatever its layout (``overrides``: runtime
    config fields such as ``param_dtype``, ``dtype``, ``remat``, ``attention``). A diffusers or
    BFL export is loaded in the dtype it was written in unless ``param_dtype`` is given."""
    out = Path(out)
    rec_path = out / "export.json"
    rec = json.loads(rec_path.read_text()) if rec_path.is_file() else {}
    folder = out / "transformer"
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if rec.get("format") in ("diffusers", "bfl"):
        overrides.setdefault("param_dtype", rec["dtype"])
    if cfg.get("vipo_kind") == "flux":
        return load_native(folder, "flux", FluxConfig, FluxTransformer, **overrides)
    if cfg.get("vipo_kind") == "wan":
        return load_native(folder, "wan", WanConfig, WanTransformer, **overrides)
    if cfg.get("_class_name") == DIFFUSERS_CLASSES["flux"]:
        return load_flux(folder, **overrides)
    if cfg.get("_class_name") == DIFFUSERS_CLASSES["wan"]:
        return load_wan(folder, **overrides)
    if rec.get("format") == "bfl":
        path = out / Path(rec["transformer"]).name
        return load_flux(path, config=FluxConfig.from_dict(rec["architecture"]), **overrides)
    raise CheckpointError(f"{out}: not a vipo_jax export (no transformer/config.json of a native or diffusers "
                          "export, no export.json of a BFL one); write one with python -m vipo_jax.export")
