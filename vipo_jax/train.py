"""Command line: ``python -m vipo_jax.train --config=configs/flux.py:toy --workdir=runs/toy``.

Dotted overrides: ``--config.optim.lr=1e-5 --config.psm.enabled=False``. Re-running with the same
``--workdir`` resumes from its latest checkpoint; a config that differs from the workdir's
``config.json`` in a key that changes training is refused (the keys are listed) unless
``--resume_anyway`` (recorded in ``resumes.jsonl``). Every error is one line ``error: ...``, exit status 2.

Several hosts: run the same command on every host with ``--distributed``; ``jax.distributed`` takes
the coordinator (host:port), process count and process id from ``VIPO_COORDINATOR``,
``VIPO_NUM_PROCESSES`` and ``VIPO_PROCESS_ID`` where set, and auto-detects them otherwise (TPU pods,
SLURM). The mesh spans all hosts' devices (``--config.mesh.*``).

``--compile_only``: build the world, compile the train step ahead of time, print the compile time and
XLA's per-device memory, and exit (nothing is trained or written), e.g. to check that a mesh or
micro-batch fits before a long run. Training runs compile the same way before their first
iteration; with the persistent compilation cache a restart reads the executable from the cache.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # tokenizers only: no "PyTorch not found" banner

from absl import app, flags, logging
from ml_collections import config_flags

from vipo_jax.errors import VipoError
from vipo_jax.utils.cli import fail, flags_parser

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<name>.py[:arg]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output folder (metrics, samples, checkpoints)")
_NO_PROGRESS = flags.DEFINE_bool("no_progress", False, "disable the progress bar")
_COMPILE_ONLY = flags.DEFINE_bool("compile_only", False, "compile the train step, print its compile time and "
                                   "per-device memory, and exit without training")
_LIST = flags.DEFINE_bool("list_rewards", False, "print the registered rewards, metrics, PSM backbones and model "
                          "families, and exit")
_RESUME_ANYWAY = flags.DEFINE_bool("resume_anyway", False, "resume a workdir whose config.json differs from this "
                                   "config in keys that change training (recorded in WORKDIR/resumes.jsonl)")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "multi-host: jax.distributed.initialize() from the "
                                 "VIPO_COORDINATOR / VIPO_NUM_PROCESSES / VIPO_PROCESS_ID variables or auto-detection")


def print_registries() -> None:
    """What ``--config.rewards.names``, ``--config.psm.backbone_kind`` and ``--config.model.family`` accept."""
    from vipo_jax import backbones, rewards
    from vipo_jax.worlds import FAMILIES

    print("rewards (--config.rewards.names) and metrics; sources: toy | pretrained (world=real) | random | abstract")
    for e in rewards.REWARDS.values():
        kind = "reward" if e.trainable else "metric"
        print(f"  {e.name:18s} {kind:6s} reads {e.reads:6s} sources {','.join(e.sources):34s} {e.help}")
    print("PSM backbones (--config.psm.backbone_kind):")
    for b in backbones.BACKBONES.values():
        print(f"  {b.name:18s} sources {','.join(b.sources):34s} {b.help}")
    print(f"model families (--config.model.family): {', '.join(FAMILIES)}")


def main(argv: list[str]) -> None:
    del argv
    if _LIST.value:
        print_registries()
        return
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config=configs/flux.py:toy")
    workdir = _WORKDIR.value or "runs/default"
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    try:
        if _DISTRIBUTED.value:  # before anything touches a device
            from vipo_jax.sharding import initialize_distributed

            initialize_distributed()
        from vipo_jax.training.run import result_line, train
        from vipo_jax.utils.compile_cache import enable_compilation_cache

        enable_compilation_cache()
        summary = train(_CONFIG.value, workdir, progress=not _NO_PROGRESS.value, compile_only=_COMPILE_ONLY.value,
                        resume_anyway=_RESUME_ANYWAY.value)
    except (VipoError, OSError) as e:
        fail(e)
    summary.pop("state", None)
    import jax

    if jax.process_index() != 0:
        return
    if _COMPILE_ONLY.value:
        print("compile only:", {k: round(v, 4) for k, v in summary.items()})
        return
    print("summary:", {k: (round(v, 5) if isinstance(v, float) else v) for k, v in summary.items()})
    if line := result_line(summary):
        print(f"result: {line}")
    print(f"outputs in {workdir}: metrics.jsonl, tensorboard/, samples/, reward_curve.png, checkpoints/")


if __name__ == "__main__":
    app.run(main, flags_parser=flags_parser(_CONFIG))
