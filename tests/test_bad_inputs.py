"""The bad-input catalogue (issue 17): every input a user can get wrong, one case each. A library call
raises a vipo_jax error whose one-line message names the field or file; at the command line (the
flag parser, ``fail``) it is one line ``error: ...`` with exit status 2 and no traceback; and the run
directory is byte-for-byte what it was (config.json, metrics.jsonl, the checkpoint files).

One toy run (2 iterations, 2 prompts x 2 samples, 3 steps, a checkpoint at each iteration) is
trained once per module and copied per case; resumes that need no further iteration reuse its
world, so only that run compiles a train step. A few subprocesses prove the real CLIs' exit status."""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import flags
from ml_collections import config_flags

from configs import flux
from launch import sweep
from vipo_jax.errors import CheckpointError, ConfigError, VipoError, WorkdirError
from vipo_jax.evaluation.checkpoints import CheckpointSpec
from vipo_jax.evaluation.export import export_policy
from vipo_jax.evaluation.run import checkpoint_params
from vipo_jax.models.flux import FluxConfig, FluxTransformer
from vipo_jax.training import run_dir
from vipo_jax.training.checkpoint import RunCheckpointer
from vipo_jax.training.metrics_log import MetricsWriter
from vipo_jax.training.run import train
from vipo_jax.utils import cli
from vipo_jax.weights.native import load_native
from vipo_jax.weights.safetensors_io import SafetensorsFile

# orbax leaves an asyncio callback behind when a damaged checkpoint fails to read (harmless, and not
# printed by the command lines)
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "vipo_jax" / "toy" / "assets"
SAMPLING = {"sampling.prompts_per_iter": 2, "sampling.group_size": 2, "sampling.num_steps": 3}
LR = flux.get_config("toy").optim.lr  # the trained run's


def small(**over: Any):
    """The trained run's config (tests/test_psm_variants.py's, with a checkpoint per iteration)."""
    c = flux.get_config("toy")
    c.train.iterations = 2
    c.log.eval_every, c.log.ckpt_every, c.log.tensorboard, c.log.phase_times = 0, 1, False, False
    for k, v in {**SAMPLING, **over}.items():
        *section, name = k.split(".")
        (c[section[0]] if section else c)[name] = v
    return c


@pytest.fixture(scope="module")
def world():
    from vipo_jax.worlds import build_world

    return build_world(small())


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bad_inputs") / "run"
    train(small(), d, world=world, progress=False)
    assert run_dir.checkpoint_steps(d) == [1, 2]
    return d


def snapshot(d: Path) -> dict:
    """What a failed command must not change: every file's size and mtime, config.json's and
    metrics.jsonl's bytes."""
    if not d.exists():
        return {}
    files = {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(d.rglob("*"))
             if p.is_file()}
    return {"files": files, **{n: (d / n).read_bytes() for n in ("config.json", "metrics.jsonl") if (d / n).is_file()}}


@dataclasses.dataclass
class Ctx:
    trained: Path
    tmp: Path
    world: Any
    monkeypatch: pytest.MonkeyPatch
    _run: Path | None = None

    @property
    def run(self) -> Path:
        """A copy of the trained run for this case."""
        if self._run is None:
            self._run = self.tmp / "run"
            shutil.copytree(self.trained, self._run)
        return self._run


@dataclasses.dataclass
class Case:
    name: str
    act: Callable[[Ctx], Any]
    error: type[BaseException]  # SystemExit: a command line's exit, checked for status 2 and one stderr line
    match: str  # in the message: the field or file at fault
    setup: Callable[[Ctx], Any] | None = None
    needs_run: bool = True  # the case uses the trained run (its copy is checked for changes)


# --- command lines parsed in-process, on their own flag registry ---------------------------------------------
def parse(*args: str) -> None:
    argv = ["vipo", *args]
    fv = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "", flag_values=fv)
    cli.parse_flags(argv, [holder], flag_values=fv)


def toy_assets(ctx: Ctx, config: str) -> Path:
    """A toy-assets folder whose transformer/config.json is ``config`` (the other models linked)."""
    root = ctx.tmp / "assets"
    root.mkdir()
    for p in ASSETS.iterdir():
        if p.name != "transformer":
            (root / p.name).symlink_to(p)
    (root / "transformer").mkdir()
    (root / "transformer" / "model.safetensors").symlink_to(ASSETS / "transformer" / "model.safetensors")
    (root / "transformer" / "config.json").write_text(config)
    return root


def wrong_typed_config() -> str:
    d = json.loads((ASSETS / "transformer" / "config.json").read_text())
    d["num_layers"] = "two"
    return json.dumps(d)


def safetensors_file(ctx: Ctx, entry: dict, data: bytes = b"\0" * 24) -> Path:
    header = json.dumps({"w": entry}).encode()
    path = ctx.tmp / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def full_disk(path_suffix: str):
    """os.replace failing with ENOSPC for paths ending in ``path_suffix``."""
    real = os.replace

    def replace(src, dst, *a, **k):
        if str(dst).endswith(path_suffix):
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real(src, dst, *a, **k)

    return replace


def orbax_full_disk(self, *a, **k):
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError as e:
        raise RuntimeError("Event loop is closed") from e


class _FullFile(io.StringIO):
    """A file on a full disk: every write fails with ENOSPC (flush and close are StringIO's)."""

    def write(self, s: str) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


def save_step_3(run: Path, state: dict) -> None:
    """A checkpoint of ``state`` as step 3 next to steps 1 and 2 (keep=2: a save would rotate out step 1)."""
    ckpt = RunCheckpointer(run, keep=2)
    try:
        ckpt.save(3, state, {"iteration": 3})
    finally:
        ckpt.close()


def metrics_on_full_disk(ctx: Ctx) -> None:
    w = MetricsWriter(ctx.run, tensorboard=False)
    w._f.close()
    w._f = _FullFile()
    w.write(3, {"loss": 0.0})


def corrupt_latest(run: Path) -> None:
    """Zero every data file of step 2's arrays (a disk error; its metadata stays readable)."""
    for f in (run / "checkpoints" / "2" / "state" / "ocdbt.process_0" / "d").iterdir():
        f.write_bytes(b"\0" * f.stat().st_size)


def edit_run_config(ctx: Ctx, **changes: Any) -> None:
    path = ctx.run / "config.json"
    d = json.loads(path.read_text())
    for k, v in changes.items():
        section, name = k.split(".")
        d[section][name] = v
    path.write_text(json.dumps(d, indent=1))


CASES = [
    # config keys, files and :arg, as the command lines parse them (vipo_jax.utils.cli.parse_flags)
    Case("unknown_config_key", lambda x: parse("--config=configs/flux.py:toy", "--config.optim.lrr=1"), SystemExit,
         r"--config\.optim\.lrr: unknown config key 'lrr' in config\.optim; did you mean --config\.optim\.lr\?",
         needs_run=False),
    Case("unknown_config_group", lambda x: parse("--config=configs/flux.py:toy", "--config.optimm.lr=1"), SystemExit,
         r"unknown config key 'optimm'.*did you mean --config\.optim\.lr\?", needs_run=False),
    Case("config_value_wrong_type", lambda x: parse("--config=configs/flux.py:toy", "--config.optim.lr=abc"),
         SystemExit, r"--config\.optim\.lr=abc", needs_run=False),
    Case("missing_config_file", lambda x: parse("--config=configs/nothere.py:toy"), SystemExit,
         r"configs/nothere\.py not found", needs_run=False),
    Case("config_file_is_a_folder", lambda x: parse("--config=configs"), SystemExit, r"configs is a folder",
         needs_run=False),
    Case("bad_config_arg", lambda x: parse("--config=configs/flux.py:nonsense"), SystemExit,
         r"--config=configs/flux\.py:nonsense: .*unknown argument 'nonsense'", needs_run=False),
    # config values (training/checks.py), checked before the workdir is touched
    Case("lr_1e30", lambda x: train(small(**{"optim.lr": 1e30}), x.run, world=x.world, progress=False), ConfigError,
         r"--config\.optim\.lr=1e\+30"),
    Case("lr_nan", lambda x: train(small(**{"optim.lr": float("nan")}), x.run, world=x.world, progress=False),
         ConfigError, r"--config\.optim\.lr=nan must be a finite number"),
    Case("keep_checkpoints_0", lambda x: train(small(**{"log.keep_checkpoints": 0}), x.run, progress=False),
         ConfigError, r"--config\.log\.keep_checkpoints=0"),
    Case("num_eval_prompts_0", lambda x: train(small(**{"log.num_eval_prompts": 0}), x.run, progress=False),
         ConfigError, r"--config\.log\.num_eval_prompts=0"),
    Case("reward_coef_inf", lambda x: train(small(**{"rewards.coefs": "inf"}), x.run, progress=False), ConfigError,
         r"--config\.rewards\.coefs.*inf"),
    # checks that were there before issue 17 (kept in the catalogue)
    Case("unknown_world", lambda x: train(small(world="bogus"), x.run, progress=False), ConfigError,
         r"--config\.world='bogus' is not one of"),
    Case("unknown_family", lambda x: train(small(**{"model.family": "sdxl"}), x.run, progress=False), ConfigError,
         r"--config\.model\.family='sdxl'"),
    Case("unknown_reward", lambda x: train(small(**{"rewards.names": "nosuch"}), x.run, progress=False), ConfigError,
         r"--config\.rewards\.names: unknown reward 'nosuch'"),
    Case("unknown_backbone", lambda x: train(small(**{"psm.backbone_kind": "nosuch"}), x.run, progress=False),
         ConfigError, r"--config\.psm\.backbone_kind='nosuch'"),
    Case("zero_iterations", lambda x: train(small(**{"train.iterations": 0}), x.run, progress=False), ConfigError,
         r"--config\.train\.iterations=0"),
    Case("group_of_one", lambda x: train(small(**{"sampling.group_size": 1}), x.run, progress=False), ConfigError,
         r"--config\.sampling\.group_size=1"),
    Case("ema_decay_above_1", lambda x: train(small(**{"train.ema_decay": 1.5}), x.run, progress=False),
         ConfigError, r"--config\.train\.ema_decay=1\.5"),
    Case("negative_lora_rank", lambda x: train(small(**{"lora.rank": -1}), x.run, progress=False), ConfigError,
         r"--config\.lora\.rank=-1"),
    Case("real_world_without_weights", lambda x: train(flux.get_config(""), x.tmp / "fresh", progress=False),
         CheckpointError, r"FLUX\.1 weights not found \(--config\.model\.path is empty\)\. Download", needs_run=False),
    Case("evaluate_a_folder_without_checkpoints",
         lambda x: checkpoint_params(CheckpointSpec("x", str(x.tmp)), x.world.policy(), x.world.params),
         CheckpointError, r"no checkpoints/ folder", needs_run=False),
    Case("export_a_missing_workdir", lambda x: export_policy(x.tmp / "nothing", x.tmp / "out"), CheckpointError,
         r"nothing does not exist", needs_run=False),
    # the run directory
    Case("resume_with_another_lr", lambda x: train(small(**{"optim.lr": 1e-4}), x.run, progress=False), WorkdirError,
         rf"optim\.lr: {LR!r} -> 0\.0001.*--resume_anyway"),
    Case("resume_with_another_lora_rank", lambda x: train(small(**{"lora.rank": 4}), x.run, progress=False),
         WorkdirError, r"lora\.rank: 0 -> 4"),
    Case("checkpoints_without_config_json", lambda x: train(small(), x.run, progress=False), WorkdirError,
         r"no config\.json", setup=lambda x: (x.run / "config.json").unlink()),
    Case("run_config_json_not_json", lambda x: train(small(), x.run, progress=False), CheckpointError,
         r"config\.json is not readable JSON", setup=lambda x: (x.run / "config.json").write_text("{oops")),
    Case("workdir_is_a_file", lambda x: train(small(), x.run / "metrics.jsonl", progress=False), WorkdirError,
         r"metrics\.jsonl is a file, not a folder"),
    Case("workdir_read_only", lambda x: train(small(), x.run, progress=False), WorkdirError, r"read-only",
         setup=lambda x: x.monkeypatch.setattr(run_dir.os, "access", lambda p, mode: False)),
    Case("full_disk_writing_config_json",
         lambda x: train(small(), x.tmp / "fresh", world=x.world, progress=False), WorkdirError,
         r"cannot write .*fresh/config\.json: the disk is full",
         setup=lambda x: x.monkeypatch.setattr(os, "replace", full_disk("config.json")), needs_run=False),
    Case("full_disk_writing_a_checkpoint",
         lambda x: save_step_3(x.run, {"params": jnp.ones(2)}), CheckpointError,
         r"cannot write checkpoint step 3 .*the disk is full.*latest: step 2",
         setup=lambda x: x.monkeypatch.setattr(ocp.CheckpointManager, "save", orbax_full_disk)),
    Case("full_disk_writing_metrics", metrics_on_full_disk, WorkdirError,
         r"metrics\.jsonl: the disk is full"),
    Case("nonfinite_state_is_not_checkpointed",
         lambda x: save_step_3(x.run, {"params": jnp.array([1.0, jnp.nan])}),
         CheckpointError, r"not saving step 3: the train state holds non-finite values.*latest: step 2"),
    Case("failed_run_keeps_config_json",  # a workdir whose run died before its first checkpoint
         lambda x: train(small(**{"model.path": str(toy_assets(x, "{"))}), x.run, progress=False), CheckpointError,
         r"assets/transformer/config\.json is not readable JSON",
         setup=lambda x: shutil.rmtree(x.run / "checkpoints")),
    # checkpoints read by evaluate / export
    Case("evaluate_corrupt_latest_checkpoint",
         lambda x: checkpoint_params(CheckpointSpec("run", str(x.run)), x.world.policy(), x.world.params),
         CheckpointError, r"cannot read the policy params of .*checkpoints step 2",
         setup=lambda x: corrupt_latest(x.run)),
    Case("export_full_finetune_whose_config_says_lora", lambda x: export_policy(x.run, x.tmp / "out"),
         CheckpointError, r"hold no .*lora.*config\.json", setup=lambda x: edit_run_config(x, **{"lora.rank": 4})),
    # weights (vipo_jax/weights): a training run on a fresh workdir fails before writing anything
    Case("weights_config_not_json",
         lambda x: train(small(**{"model.path": str(toy_assets(x, "{not json"))}), x.tmp / "fresh", progress=False),
         CheckpointError, r"transformer/config\.json is not readable JSON", needs_run=False),
    Case("weights_config_wrong_type",
         lambda x: load_native(toy_assets(x, wrong_typed_config()) / "transformer", "flux", FluxConfig,
                               FluxTransformer),
         CheckpointError, r"config\.json: field 'num_layers' is 'two' \(str\); FluxConfig expects int",
         needs_run=False),
    Case("safetensors_missing_dtype",
         lambda x: SafetensorsFile(safetensors_file(x, {"shape": [2, 3], "data_offsets": [0, 24]})), CheckpointError,
         r"bad\.safetensors: tensor 'w' has no dtype", needs_run=False),
    Case("safetensors_shape_disagrees_with_bytes",
         lambda x: SafetensorsFile(safetensors_file(x, {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 24]})),
         CheckpointError, r"tensor 'w': shape \[2, 4\] of F32 needs 32 bytes but its byte range \[0, 24\] holds 24",
         needs_run=False),
    # the planner and the sweep launcher
    Case("plan_bad_devices", lambda x: _plan_devices("--devices=abc"), SystemExit, r"--devices='abc'",
         needs_run=False),
    Case("plan_negative_devices", lambda x: _plan_devices("--devices=-2"), SystemExit, r"--devices='-2'",
         needs_run=False),
    Case("sweep_bad_arg", lambda x: _sweep(f"--sweep={ROOT}/configs/sweeps/toy_grpo_vs_vipo.py:bogus",
                                           f"--workdir={x.tmp}/sw"), SystemExit,
         r"toy_grpo_vs_vipo\.py:bogus: ValueError: .*unknown argument 'bogus'", needs_run=False),
    Case("sweep_backend_args_unclosed_quote",
         lambda x: _sweep(f"--sweep={ROOT}/configs/sweeps/toy_grpo_vs_vipo.py", f"--workdir={x.tmp}/sw",
                          "--backend_args=\"--name", "--dry_run"), SystemExit, r"--backend_args=.*No closing quotation",
         needs_run=False),
    Case("sweep_workdir_is_a_file",
         lambda x: _sweep(f"--sweep={ROOT}/configs/sweeps/toy_grpo_vs_vipo.py", f"--workdir={x.run}/config.json",
                          "--dry_run"), SystemExit, r"config\.json is a file"),
    Case("sweep_missing_file", lambda x: _sweep("--sweep=configs/sweeps/nothere.py", f"--workdir={x.tmp}/sw"),
         SystemExit, r"nothere\.py' not found", needs_run=False),
]


def _plan_devices(arg: str) -> None:
    from vipo_jax.plan.__main__ import _early_devices

    _early_devices(["plan", arg])


def _sweep(*args: str) -> None:
    sys.exit(sweep.main(list(args)))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, trained, world, tmp_path, monkeypatch, capsys):
    ctx = Ctx(trained, tmp_path, world, monkeypatch)
    if case.needs_run:
        _ = ctx.run
    if case.setup is not None:
        case.setup(ctx)
    before = snapshot(tmp_path / "run")
    with pytest.raises(case.error) as info:
        case.act(ctx)
    monkeypatch.undo()
    exit_info = info
    if case.error is not SystemExit:  # what the command lines print for it
        assert isinstance(info.value, VipoError), info.value
        with pytest.raises(SystemExit) as exit_info:
            cli.fail(info.value)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and message.startswith("error: "), message
    assert re.search(case.match, message), message
    fresh = tmp_path / "fresh"
    assert not fresh.exists() or not any(p.is_file() for p in fresh.rglob("*")), list(fresh.rglob("*"))
    assert snapshot(tmp_path / "run") == before


# --- what a resume does with a damaged or changed workdir ------------------------------------------------------
def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(trained, world, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    corrupt_latest(run)
    out = train(small(**{"train.iterations": 1}), run, world=world, progress=False)
    printed = capsys.readouterr().out
    assert out["iterations"] == 1
    line = next(ln for ln in printed.splitlines() if "unreadable" in ln)
    assert "checkpoint step 2" in line and "previous one, step 1" in line and "TensorStore({" not in line
    assert run_dir.checkpoint_steps(run) == [1] and (run / "checkpoints_corrupt" / "2").is_dir()
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1]


def test_killed_during_a_checkpoint_write_leaves_no_duplicate_metrics(trained, world, tmp_path, capsys):
    """SIGKILL while step 2 is written: orbax's temporary folder, and metrics.jsonl already holds step 2
    (and half a line). The resume restores step 1 and cuts metrics.jsonl back to it."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "checkpoints" / "2").rename(run / "checkpoints" / "2.orbax-checkpoint-tmp-1700000000")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss"')
    train(small(**{"train.iterations": 1}), run, world=world, progress=False)
    assert "at iteration 1" in capsys.readouterr().out
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["1"]  # the temporary folder removed


def test_resume_anyway_records_the_differences_and_keeps_config_json(trained, world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    config = (run / "config.json").read_bytes()
    train(small(**{"optim.lr": 1e-4, "seed": 7}), run, world=world, progress=False, resume_anyway=True)
    (rec,) = [json.loads(x) for x in (run / "resumes.jsonl").read_text().splitlines()]
    assert rec["step"] == 2 and rec["differing"] == {"optim.lr": [LR, 1e-4], "seed": [42, 7]} and rec["time"]
    assert (run / "config.json").read_bytes() == config
    # keys that do not change training differ freely: no refusal, no record
    train(small(**{"log.every": 2, "log.keep_checkpoints": 3, "model.remat": "full"}), run, world=world,
          progress=False)
    assert len((run / "resumes.jsonl").read_text().splitlines()) == 1


def test_resumable_keys_are_few_and_explicit():
    assert run_dir.resumable("log.eval_every") and run_dir.resumable("train.iterations")
    for key in ("optim.lr", "seed", "lora.rank", "sampling.group_size", "train.ema_decay", "model.path"):
        assert not run_dir.resumable(key), key


# --- said once, not silently ------------------------------------------------------------------------------------
def test_a_truncated_prompt_is_a_warning(caplog):
    from vipo_jax.text import tokenizers

    tok = tokenizers.load_tokenizer(ASSETS / "tokenizer_2")
    tokenizers._warned.clear()
    long = "a red 3 on a blue background with a small green 4 on top"
    with caplog.at_level(logging.WARNING):
        ids, _ = tokenizers.tokenize(tok, ["a red 3", long], 8)
        tokenizers.tokenize(tok, [long], 8)
    warnings = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert ids.shape == (2, 8) and len(warnings) == 1, warnings
    assert "1 of 2 prompt(s)" in warnings[0] and "8 tokens" in warnings[0] and "tokens dropped" in warnings[0]


def test_data_prompts_in_the_toy_world_is_a_warning(caplog, tmp_path):
    from vipo_jax.worlds import build

    build._warned_ignored.clear()
    with caplog.at_level(logging.WARNING):
        build.warn_ignored_options(small(**{"data.prompts": str(tmp_path / "p.txt")}), "toy")
        build.warn_ignored_options(small(**{"data.prompts": str(tmp_path / "p.txt")}), "toy")
        build.warn_ignored_options(small(**{"data.prompts": str(tmp_path / "p.txt")}), "pretrained")
    warnings = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert len(warnings) == 1 and "--config.data.prompts" in warnings[0] and "toy world" in warnings[0]


# --- the real command lines: one line, exit 2, no traceback -----------------------------------------------------
def test_command_lines_exit_2_with_one_line(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = snapshot(run)
    same = [f"--config.{k}={v}" for k, v in SAMPLING.items()]
    commands = {
        "unknown key": ["vipo_jax.train", "--config=configs/flux.py:toy", "--config.optim.lrr=1",
                        f"--workdir={tmp_path / 'x'}"],
        "another lr": ["vipo_jax.train", "--config=configs/flux.py:toy", *same, "--config.optim.lr=1e-4",
                       f"--workdir={run}"],
        "plan devices": ["vipo_jax.plan", "--config=configs/flux.py:toy", "--devices=abc"],
        "evaluate :arg": ["vipo_jax.evaluate", "--config=configs/flux.py:nonsense"],
    }
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = {k: subprocess.Popen([sys.executable, "-m", *v], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for k, v in commands.items()}
    want = {"unknown key": "did you mean --config.optim.lr?", "another lr": f"optim.lr: {LR!r} -> 0.0001",
            "plan devices": "--devices='abc'", "evaluate :arg": "unknown argument 'nonsense'"}
    for k, p in procs.items():
        out, err = p.communicate(timeout=300)
        lines = err.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (k, err[-2000:])
        assert want[k] in lines[0] and "Traceback" not in err, (k, err)
    assert snapshot(run) == before
    assert not (tmp_path / "x").exists()


def test_state_finite_check():
    from vipo_jax.training.checkpoint import all_finite

    assert all_finite({"p": jnp.ones(3), "step": jnp.int32(1), "rng": jnp.zeros(2, jnp.uint32)})
    assert not all_finite({"p": jnp.ones(3), "opt": (jnp.array([np.inf]),)})
