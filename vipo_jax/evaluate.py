"""Command line: compare checkpoints on held-out prompts.

    python -m vipo_jax.evaluate --config=configs/flux.py:toy \
        --checkpoint=base --checkpoint=grpo=runs/toy_grpo --checkpoint=vipo=runs/toy_vipo --out=runs/eval

``--checkpoint`` is ``base`` (the world's initial weights), a run workdir (latest checkpoint),
``DIR@STEP``, or ``LABEL=DIR[@STEP]``; repeat it to compare several in one table. A glob
(``--checkpoint=vipo=runs/toy_grpo_vs_vipo/vipo_seed-*``) adds every matching run and a second
table gives each such group's mean ± std over its runs (e.g. a method over seeds). Runs trained with
LoRA are read with their own ``config.json``'s LoRA settings (adapters merged into the base weights);
``--use_ema`` evaluates the runs' EMA weights (``train.ema_decay > 0``) instead of their raw ones. Prompts come from
``--prompts`` (a text or JSONL file); without it the toy world uses its 54 held-out prompt
combinations, a real world ``--config.data.eval_prompts``. Every metric the world knows is scored:
every toy reward and metric in the toy world (redness, subject / background redness, toy CLIP,
digit log-probability, digit accuracy by both classifiers, colour match); for FLUX.1 every reward
model given a path (``--config.rewards.hpsv21=... --config.rewards.pickscore=...``), not only the
trained one. Writes results.json, report.md, report.html, comparison.png and per-checkpoint grids
(with a row of the checkpoint's PSM maps over its samples; ``--nomaps`` skips them).
"""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from absl import app, flags, logging
from ml_collections import config_flags

from vipo_jax.data.prompts import load_prompts
from vipo_jax.errors import VipoError
from vipo_jax.evaluation import evaluate, expand_checkpoint
from vipo_jax.evaluation.report import comparison_rows, group_rows
from vipo_jax.toy.digits import prompt_set
from vipo_jax.utils.cli import fail, flags_parser
from vipo_jax.utils.compile_cache import enable_compilation_cache

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<name>.py[:arg] of the evaluated runs",
                                          lock_config=False)
_CHECKPOINTS = flags.DEFINE_multi_string("checkpoint", ["base"], "base | DIR | DIR@STEP | LABEL=DIR[@STEP]; a glob DIR "
                                            "(LABEL=runs/sweep/vipo_seed-*) adds every match, summarised as one group")
_PROMPTS = flags.DEFINE_string("prompts", "", "prompts file (text, one per line, or JSONL with 'prompt')")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 0, "use only the first N prompts (0: all)")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "noise seeds; every prompt is sampled once per seed")
_OUT = flags.DEFINE_string("out", "runs/eval", "output folder")
_BATCH = flags.DEFINE_integer("batch_size", 16, "samples per jitted sampling call")
_GRID = flags.DEFINE_integer("grid_prompts", 8, "prompts shown in the image grids")
_NO_PROGRESS = flags.DEFINE_bool("no_progress", False, "disable the progress bar")
_USE_EMA = flags.DEFINE_bool("use_ema", False, "evaluate the runs' EMA weights (train.ema_decay > 0)")
_MAPS = flags.DEFINE_bool("maps", True, "draw each checkpoint's PSM maps under its grid (with --config.psm.enabled; "
                          "loads the PSM backbone)")


def default_prompts(c) -> list[str]:
    if _PROMPTS.value:
        return load_prompts(_PROMPTS.value, c.data.cache_dir or None).prompts()
    if c.world == "toy":
        return prompt_set("eval")
    if c.data.eval_prompts:
        return load_prompts(c.data.eval_prompts, c.data.cache_dir or None).prompts()
    raise app.UsageError("give --prompts=FILE (or --config.data.eval_prompts)")


def main(argv: list[str]) -> None:
    del argv
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config=configs/flux.py:toy")
    logging.set_verbosity(logging.WARNING)
    enable_compilation_cache()
    try:
        c = _CONFIG.value
        if not _MAPS.value:
            c.psm.enabled = False
        prompts = default_prompts(c)
        if _NUM_PROMPTS.value:
            prompts = prompts[: _NUM_PROMPTS.value]
        seeds = [int(s) for s in _SEEDS.value]
        specs = [s for a in _CHECKPOINTS.value for s in expand_checkpoint(a)]
        if _USE_EMA.value:
            specs = [dataclasses.replace(s, ema=True) if s.path else s for s in specs]
        results = evaluate(c, specs, prompts, seeds, _OUT.value, batch_size=_BATCH.value,
                           grid_prompts=_GRID.value, progress=not _NO_PROGRESS.value)
    except (VipoError, ValueError, OSError) as e:
        fail(e)
    for header, rows in (comparison_rows(results), group_rows(results)):
        if rows:
            print(" | ".join(header))
            for r in rows:
                print(" | ".join(r))
    print(f"report: {os.path.join(_OUT.value, 'report.md')} (also report.html, results.json, comparison.png)")


if __name__ == "__main__":
    app.run(main, flags_parser=flags_parser(_CONFIG))
