"""Two processes x 4 simulated CPU devices on localhost (jax.distributed over the VIPO_* contract of
``--distributed``, gloo CPU collectives) train the synthetic world with evaluation, a checkpoint
every iteration and a resume, and end with the parameters of one process x 8 devices."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_sharding import TOL_FIRST, compare_runs, subprocess_env

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
MESH = "data=2,fsdp=4"
NAME = "data2_fsdp4"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _worker(out: Path, devices: int, extra_env: dict, *flags: str) -> subprocess.Popen:
    # 2 iterations with a checkpoint each and evaluation at 0 and 2, then a second run to
    # iteration 3 that resumes from the checkpoint
    env = {**subprocess_env(devices), "VIPO_ITERATIONS": "2", "VIPO_RESUME_TO": "3", "VIPO_EVAL_EVERY": "2",
           "VIPO_CKPT_EVERY": "1", **extra_env}
    return subprocess.Popen([sys.executable, "-m", "tests.sharding_worker", "train", str(out), MESH, *flags],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # the train loop turns SIGTERM into a clean stop; a hung collective needs SIGKILL
        out, _ = proc.communicate()
        raise AssertionError(f"worker timed out:\n{out[-3000:]}") from None
    assert proc.returncode == 0, out[-3000:]
    return out


def test_two_processes_match_one_process(tmp_path):
    ref, multi = tmp_path / "one_process", tmp_path / "two_processes"
    ref.mkdir(), multi.mkdir()
    port = _free_port()
    procs = [_worker(ref, 8, {})]
    procs += [_worker(multi, 4, {"VIPO_COORDINATOR": f"localhost:{port}", "VIPO_NUM_PROCESSES": "2",
                                 "VIPO_PROCESS_ID": str(i)}, "--distributed") for i in range(2)]
    logs = [_finish(p, 600) for p in procs]
    for log in logs[1:]:
        assert "done data=2,fsdp=4 on 8 devices, 2 process(es)" in log, log[-2000:]
        assert "global_batch ok {'data': 2, 'fsdp': 4}" in log and "global_batch ok {'fsdp': 8}" in log, log[-2000:]

    (multi / f"ref_{NAME}.npz").write_bytes((ref / f"{NAME}.npz").read_bytes())
    (multi / f"ref_{NAME}.json").write_text((ref / f"{NAME}.json").read_text())
    p_err, m_err, p_tol = compare_runs(multi, f"ref_{NAME}", NAME)
    print(f"2 processes x 4 devices vs 1 x 8: first-iteration metrics {m_err:.2e} (bound {TOL_FIRST:.1e}), "
          f"params after 3 iterations {p_err:.2e} (bound {p_tol:.1e}), relative")
    assert m_err <= TOL_FIRST and p_err <= p_tol, (p_err, m_err, p_tol)

    info = json.loads((multi / f"{NAME}.json").read_text())
    kernel = "['l_up']['kernel'].value"
    assert info["processes"] == 2 and info["devices"][kernel] == 8 and info["specs"][kernel] == "P('fsdp',)", info
    steps = [r["step"] for r in info["metrics"]]
    assert steps == [0, 1, 2, 3], steps  # evaluation at 0 and 2 merged with the training records
    run = multi / f"run_{NAME}"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines)), "a record was written twice: only process 0 may log"
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "3"]
    assert {"eval_000000.png", "eval_000002.png", "eval_000003.png"} <= {p.name for p in (run / "samples").iterdir()}
    assert (run / "summary.json").is_file() and (run / "reward_curve.png").is_file()
