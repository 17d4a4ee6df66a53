"""Prompt files -> tfds ArrayRecord data source (no TensorFlow) -> deterministic sharded batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from vipo_jax.data.prompts import (
    PromptLoader,
    PromptSource,
    load_prompts,
    prepare_prompts,
    read_prompts_file,
)
from vipo_jax.errors import CheckpointError, ConfigError, DataError

PROMPTS = [f"a {c} {d} on a black background" for d in range(5) for c in ("red", "green", "blue")]


@pytest.fixture(scope="module")
def txt_source(tmp_path_factory):
    d = tmp_path_factory.mktemp("prompts")
    path = d / "prompts.txt"
    lines = []
    for i, p in enumerate(PROMPTS):
        lines.append(f"  {p}  ")
        if i % 4 == 0:
            lines.append("")   # blank lines are skipped and not counted in idx
    path.write_text("\n".join(lines) + "\n")
    return load_prompts(path, cache_dir=d / "cache")


def test_builder_from_txt_keeps_idx(txt_source):
    assert "tensorflow" not in sys.modules
    assert len(txt_source) == len(PROMPTS)
    recs = [txt_source[i] for i in range(len(txt_source))]
    assert all(PROMPTS[r["idx"]] == r["prompt"] and r["metadata"] is None for r in recs)
    assert sorted(r["idx"] for r in recs) == list(range(len(PROMPTS)))
    assert [r["idx"] for r in recs] != list(range(len(PROMPTS)))   # shuffled at write time
    assert txt_source.prompts() == PROMPTS
    assert txt_source.get_batch([3, 0]) == [recs[3], recs[0]]
    files = sorted(os.listdir(txt_source.data_dir / "vipo_prompts" / "1.0.0"))
    assert any(".array_record-" in f for f in files) and "dataset_info.json" in files
    assert "tensorflow" not in sys.modules


def test_builder_from_jsonl_with_metadata(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "a red 1 on a blue background", "metadata": {"digit": 1, "tags": ["x"]}},
            {"prompt": "a cyan 2 on a gray background"},
            {"prompt": "a white 3 on a red background", "metadata": "note", "other": 5}]
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n")
    src = load_prompts(path, cache_dir=tmp_path / "cache")
    by_idx = {r["idx"]: r for r in src.get_batch(range(len(src)))}
    assert [by_idx[i]["prompt"] for i in range(3)] == [r["prompt"] for r in rows]
    assert [by_idx[i]["metadata"] for i in range(3)] == [{"digit": 1, "tags": ["x"]}, None, "note"]
    # Same content -> the cached build is reused; changed content -> a new data_dir.
    assert prepare_prompts(path, tmp_path / "cache") == src.data_dir
    path.write_text(json.dumps(rows[0]) + "\n")
    new_dir = prepare_prompts(path, tmp_path / "cache")
    assert new_dir != src.data_dir and len(PromptSource(new_dir)) == 1
    assert "tensorflow" not in sys.modules


def test_fresh_process_reads_without_tensorflow(txt_source):
    code = (
        "import sys; import tensorflow_datasets as tfds\n"
        f"ds = tfds.data_source('vipo_prompts', data_dir={str(txt_source.data_dir)!r}, split='train')\n"
        "assert len(ds) == %d, len(ds)\n"
        "assert isinstance(ds[0]['prompt'], bytes)\n"
        "assert 'tensorflow' not in sys.modules\n" % len(PROMPTS))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("name, content, match", [
    ("empty.txt", "", "is empty"),
    ("blank.txt", "\n   \n\t\n", "is empty"),
    ("blank.jsonl", "\n\n", "is empty"),
    ("bad.jsonl", '{"prompt": "ok"}\n\n{"prompt": "oops"\n', r"bad\.jsonl:3: malformed JSONL line"),
    ("list.jsonl", '{"prompt": "ok"}\n["a"]\n', r"list\.jsonl:2: malformed JSONL line.*JSON object"),
    ("noprompt.jsonl", '{"text": "ok"}\n', r"noprompt\.jsonl:1: .*no 'prompt' field"),
    ("emptyprompt.jsonl", '{"prompt": "  "}\n', r"emptyprompt\.jsonl:1: .*non-empty string"),
    ("latin1.txt", b"caf\xe9\n", r"latin1\.txt is not valid UTF-8"),
])
def test_bad_files_raise_data_error(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=match):
        read_prompts_file(path)
    with pytest.raises(DataError, match=match):
        prepare_prompts(path, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(DataError, match=r"nope\.txt does not exist"):
        load_prompts(tmp_path / "nope.txt", cache_dir=tmp_path / "cache")
    with pytest.raises(DataError, match="is not a regular file"):
        read_prompts_file(tmp_path)
    if os.geteuid() != 0:   # root reads files whatever their mode
        path = tmp_path / "locked.txt"
        path.write_text("a prompt\n")
        path.chmod(0)
        with pytest.raises(DataError, match=r"cannot read prompt file .*locked\.txt"):
            read_prompts_file(path)
    with pytest.raises(DataError, match="no prepared prompt dataset"):
        PromptSource(tmp_path)


def _take(loader, k):
    return [next(loader) for _ in range(k)]


def test_loader_is_deterministic_and_covers_epochs():
    a = _take(PromptLoader(10, 4, seed=3), 5)
    b = _take(PromptLoader(10, 4, seed=3), 5)
    c = _take(PromptLoader(10, 4, seed=4), 5)
    assert all(np.array_equal(x["index"], y["index"]) for x, y in zip(a, b))
    assert not all(np.array_equal(x["index"], y["index"]) for x, y in zip(a, c))
    stream = np.concatenate([x["index"] for x in a])        # 20 = two whole epochs of 10
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert not np.array_equal(stream[:10], stream[10:])     # a new permutation each epoch
    # Fewer records than a batch: batches span epochs, nothing is dropped.
    small = PromptLoader(3, 8, seed=0)
    s = next(small)["index"]
    assert len(s) == 8 and sorted(s[:3]) == [0, 1, 2] and small.state() == {"epoch": 2, "position": 2}
    # num_epochs: stops before a batch would run past the last epoch.
    assert len(list(PromptLoader(10, 4, seed=0, num_epochs=2))) == 5
    assert len(list(PromptLoader(10, 3, seed=0, num_epochs=1))) == 3


def test_loader_resume_is_exact(txt_source):
    n = len(txt_source)
    straight = _take(PromptLoader(n, 6, seed=7, source=txt_source), 4)
    first = PromptLoader(n, 6, seed=7, source=txt_source)
    _take(first, 2)
    state = json.loads(json.dumps(first.state()))   # survives a JSON round trip
    assert set(state) == {"epoch", "position"}
    resumed = PromptLoader(n, 6, seed=7, source=txt_source)
    resumed.restore(state)
    for x, y in zip(straight[2:], _take(resumed, 2)):
        np.testing.assert_array_equal(x["index"], y["index"])
        np.testing.assert_array_equal(x["idx"], y["idx"])
        assert x["prompt"] == y["prompt"]
    for b in straight:
        assert b["prompt"] == [PROMPTS[i] for i in b["idx"]]
    with pytest.raises(CheckpointError):
        resumed.restore({"epoch": 0})
    with pytest.raises(CheckpointError):
        resumed.restore({"epoch": 0, "position": n})


def test_loader_sharding_union_equals_single_process():
    single = PromptLoader(37, 8, seed=1)
    shards = [PromptLoader(37, 8, seed=1, process_index=i, process_count=2) for i in range(2)]
    for _ in range(12):   # crosses two epoch boundaries
        whole = next(single)["index"]
        parts = [next(s)["index"] for s in shards]
        assert all(len(p) == 4 for p in parts)
        np.testing.assert_array_equal(np.concatenate(parts), whole)
    assert shards[0].state() == shards[1].state() == single.state()
    # A state saved by one process count resumes under another.
    four = PromptLoader(37, 8, seed=1, process_index=3, process_count=4)
    four.restore(single.state())
    np.testing.assert_array_equal(next(four)["index"], next(single)["index"][6:8])


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_records=0, batch_size=4), "num_records"),
    (dict(num_records=10, batch_size=6, process_count=4), "divisible"),
    (dict(num_records=10, batch_size=4, process_index=2, process_count=2), "process_index"),
    (dict(num_records=10, batch_size=4, seed=-1), "seed"),
])
def test_loader_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        PromptLoader(**kwargs)
