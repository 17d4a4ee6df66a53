"""Prompt data: a local prompts file -> a tensorflow-datasets ArrayRecord dataset -> batches.

Input: a plain text file (one prompt per line; blank lines skipped; leading/trailing whitespace
stripped) or a JSONL file (`.jsonl` / `.ndjson` / `.json`: one JSON object per non-blank line with a
non-empty string "prompt" and optionally "metadata", any JSON value). Problems raise
`vipo_jax.errors.DataError` naming the file (and line): missing, not a file, unreadable, not UTF-8,
empty (or only blank lines), malformed JSONL line.

`prepare_prompts` validates the file and builds it with a `tfds.core.GeneratorBasedBuilder`
(`VipoPrompts`, name "vipo_prompts") into ArrayRecord files under
`cache_dir/<file stem>-<content hash>/`, so a changed file gets a fresh dataset and an unchanged one
is built once. Records are shuffled at write time; each keeps `idx`, its position among the
file's prompts (0-based, blank lines not counted). `load_prompts` reads it back with
`as_data_source` (random access, no TensorFlow: only tf.data paths such as `tfds.load` need TF).

`PromptLoader` is the sampler: deterministic, resumable and sharded over processes, numpy only.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vipo_jax.errors import CheckpointError, ConfigError, DataError

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
BUILDER_NAME = "vipo_prompts"
BUILDER_VERSION = "1.0.0"


@dataclass(frozen=True)
class PromptRecord:
    prompt: str
    idx: int
    metadata: Any = None


# ---------------------------------------------------------------------------------------------
# Reading and validating the source file


def _detect_format(path: Path, fmt: str) -> str:
    if fmt == "auto":
        return "jsonl" if path.suffix.lower() in JSONL_SUFFIXES else "txt"
    if fmt not in ("txt", "jsonl"):
        raise ConfigError(f"prompt file format must be 'auto', 'txt' or 'jsonl', got {fmt!r}")
    return fmt


def _read_text(path: Path) -> str:
    if not path.exists():
        raise DataError(f"prompt file {path} does not exist")
    if not path.is_file():
        raise DataError(f"prompt file {path} is not a regular file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read prompt file {path}: {e.strerror or e}") from e
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"prompt file {path} is not valid UTF-8 text (line {line}, byte {e.start})") from e


def read_prompts_file(path: str | os.PathLike, fmt: str = "auto") -> list[PromptRecord]:
    """Parse and validate a prompts file (see module docstring); raises DataError."""
    path = Path(path)
    fmt = _detect_format(path, fmt)
    text = _read_text(path)
    records: list[PromptRecord] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        if fmt == "txt":
            records.append(PromptRecord(line, len(records)))
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: malformed JSONL line ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: malformed JSONL line (expected a JSON object with a 'prompt' "
                            f"field, got {type(obj).__name__})")
        if "prompt" not in obj:
            raise DataError(f"{where}: malformed JSONL line (no 'prompt' field; keys: {sorted(obj)})")
        prompt = obj["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{where}: malformed JSONL line ('prompt' must be a non-empty string, "
                            f"got {prompt!r})")
        records.append(PromptRecord(prompt.strip(), len(records), obj.get("metadata")))
    if not records:
        raise DataError(f"prompt file {path} is empty (no non-blank lines)")
    return records


# ---------------------------------------------------------------------------------------------
# The tfds builder


def _builder_class():
    # Imported lazily: tensorflow_datasets is slow to import (~1 s) and only needed here.
    import tensorflow_datasets as tfds

    global _BUILDER_CLASS
    if _BUILDER_CLASS is not None:
        return _BUILDER_CLASS

    class VipoPrompts(tfds.core.GeneratorBasedBuilder):
        """Prompts from a local file (given to the constructor as parsed `records`)."""

        name = BUILDER_NAME
        VERSION = tfds.core.Version(BUILDER_VERSION)
        RELEASE_NOTES = {BUILDER_VERSION: "Prompts with idx and JSON metadata."}
        # No code folder (no checksums file, no downloads). The inherited classproperty resolves the
        # package's resource path and, for a class inside a package, touches the optional
        # `importlib_resources` backport (ModuleNotFoundError when it is not installed).
        code_path = None

        def __init__(self, *, records: Sequence[PromptRecord] | None = None, **kwargs):
            self._records = records
            super().__init__(**kwargs)

        def _info(self):
            # Not self.dataset_info_from_configs(...): that reads metadata files next to the module.
            return tfds.core.DatasetInfo(
                builder=self,
                description="Text prompts for RL post-training (vipo_jax).",
                features=tfds.features.FeaturesDict({
                    "prompt": tfds.features.Text(),
                    "idx": np.int64,
                    "metadata": tfds.features.Text(),   # JSON, "null" when absent
                }),
            )

        def _split_generators(self, dl_manager):
            if self._records is None:
                raise DataError("VipoPrompts needs `records` to build a dataset")
            return {"train": self._generate_examples(self._records)}

        def _generate_examples(self, records):
            for r in records:
                yield r.idx, {"prompt": r.prompt, "idx": r.idx,
                              "metadata": json.dumps(r.metadata, sort_keys=True)}

    _BUILDER_CLASS = VipoPrompts
    return VipoPrompts


_BUILDER_CLASS = None


def default_cache_dir() -> Path:
    """`$VIPO_JAX_CACHE/prompts`, default `~/.cache/vipo_jax/prompts`."""
    return Path(os.environ.get("VIPO_JAX_CACHE", "~/.cache/vipo_jax")).expanduser() / "prompts"


def _content_key(records: Sequence[PromptRecord]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r.idx, r.prompt, r.metadata], sort_keys=True).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def prepare_prompts(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                    fmt: str = "auto") -> Path:
    """Validate `path` and build it into ArrayRecord files (once per content); returns the tfds
    data_dir (`cache_dir/<stem>-<hash>`), holding `vipo_prompts/1.0.0/`."""
    path = Path(path)
    records = read_prompts_file(path, fmt)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    data_dir = cache / f"{path.stem}-{_content_key(records)}"
    done = data_dir / BUILDER_NAME / BUILDER_VERSION / "dataset_info.json"
    if not done.exists():
        from tensorflow_datasets.core.utils import tqdm_utils

        builder = _builder_class()(records=records, data_dir=str(data_dir), file_format="array_record")
        was_active = tqdm_utils._active
        tqdm_utils.display_progress_bar(False)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                builder.download_and_prepare(file_format="array_record")
        except Exception:
            # Another process (same file, same cache) may have finished the same build first.
            if not done.exists():
                raise
        finally:
            tqdm_utils.display_progress_bar(was_active)
    return data_dir


class PromptSource:
    """Random access to a prepared prompt dataset: `len`, `[i]` and `get_batch(indices)` give
    decoded records {"prompt": str, "idx": int, "metadata": JSON value}."""

    def __init__(self, data_dir: str | os.PathLike):
        import tensorflow_datasets as tfds

        self.data_dir = Path(data_dir)
        version_dir = self.data_dir / BUILDER_NAME / BUILDER_VERSION
        if not (version_dir / "dataset_info.json").exists():
            raise DataError(f"no prepared prompt dataset in {self.data_dir} (expected {version_dir})")
        self._ds = tfds.builder_from_directory(str(version_dir)).as_data_source(split="train")

    def __len__(self) -> int:
        return len(self._ds)

    @staticmethod
    def _decode(ex: dict) -> dict:
        p, m = ex["prompt"], ex["metadata"]
        return {"prompt": p.decode("utf-8") if isinstance(p, bytes) else str(p),
                "idx": int(ex["idx"]),
                "metadata": json.loads(m.decode("utf-8") if isinstance(m, bytes) else m)}

    def __getitem__(self, i: int) -> dict:
        n = len(self)
        if not -n <= int(i) < n:
            raise IndexError(f"record {i} out of range for {n} prompts")
        return self._decode(self._ds[int(i) % n])

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> list[dict]:
        idx = [int(i) for i in np.asarray(indices).reshape(-1)]
        if hasattr(self._ds, "__getitems__"):
            return [self._decode(ex) for ex in self._ds.__getitems__(idx)]
        return [self[i] for i in idx]

    def prompts(self) -> list[str]:
        """All prompts in file order (sorted by `idx`)."""
        recs = self.get_batch(np.arange(len(self)))
        return [r["prompt"] for r in sorted(recs, key=lambda r: r["idx"])]


def load_prompts(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                 fmt: str = "auto") -> PromptSource:
    """`prepare_prompts` then open the result as a `PromptSource`."""
    return PromptSource(prepare_prompts(path, cache_dir, fmt))


# ---------------------------------------------------------------------------------------------
# The sampler


@dataclass
class PromptLoader:
    """Deterministic, resumable, per-process sharded batches of record indices (and prompts).

    The global stream is the concatenation of per-epoch permutations of `range(num_records)`,
    epoch e's permutation seeded by (seed, e). Each step takes the next `batch_size` (global)
    indices from the stream, crossing epoch boundaries when needed (so nothing is dropped and
    `num_records < batch_size` works); process `process_index` of `process_count` keeps its own
    contiguous slice of `batch_size // process_count`. Iterating yields dicts with "index" (int64
    record indices, local slice) and, when a `source` is given, "prompt", "idx", "metadata" lists.
    `num_epochs=None` iterates forever; otherwise iteration stops before the first batch that
    would need records beyond epoch `num_epochs - 1`.

    `state()` -> {"epoch", "position"} (global, the same on every process: where the next batch
    starts); `restore(state)` resumes exactly there, also with another process count.
    """

    num_records: int
    batch_size: int
    seed: int = 0
    process_index: int = 0
    process_count: int = 1
    source: PromptSource | Sequence[dict] | None = None
    num_epochs: int | None = None
    _epoch: int = field(default=0, init=False, repr=False)
    _position: int = field(default=0, init=False, repr=False)
    _perms: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        def _int(name, v, lo):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ConfigError(f"PromptLoader: {name} must be an integer >= {lo}, got {v!r}")
        _int("num_records", self.num_records, 1)
        _int("batch_size", self.batch_size, 1)
        _int("seed", self.seed, 0)
        _int("process_count", self.process_count, 1)
        _int("process_index", self.process_index, 0)
        if self.num_epochs is not None:
            _int("num_epochs", self.num_epochs, 1)
        if self.process_index >= self.process_count:
            raise ConfigError(f"PromptLoader: process_index {self.process_index} must be < "
                              f"process_count {self.process_count}")
        if self.batch_size % self.process_count:
            raise ConfigError(f"PromptLoader: batch_size {self.batch_size} (global) must be divisible "
                              f"by process_count {self.process_count}")
        if self.source is not None and len(self.source) != self.num_records:
            raise ConfigError(f"PromptLoader: num_records {self.num_records} != len(source) "
                              f"{len(self.source)}")

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.process_count

    def permutation(self, epoch: int) -> np.ndarray:
        """The record order of `epoch` (int64, a permutation of range(num_records))."""
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            rng = np.random.default_rng(np.random.SeedSequence([int(self.seed), int(epoch)]))
            self._perms[epoch] = rng.permutation(self.num_records).astype(np.int64)
        return self._perms[epoch]

    def state(self) -> dict:
        return {"epoch": int(self._epoch), "position": int(self._position)}

    def restore(self, state: dict) -> None:
        try:
            epoch, position = state["epoch"], state["position"]
        except (KeyError, TypeError):
            raise CheckpointError(f"PromptLoader state must be a dict with 'epoch' and 'position', "
                                  f"got {state!r}") from None
        epoch, position = int(np.asarray(epoch)), int(np.asarray(position))
        if epoch < 0 or not 0 <= position < self.num_records:
            raise CheckpointError(f"PromptLoader state {state!r} does not fit {self.num_records} "
                                  f"records (need epoch >= 0, 0 <= position < num_records)")
        self._epoch, self._position = epoch, position

    def next_global_indices(self) -> np.ndarray:
        """The next global batch (all processes), advancing the state."""
        n, b = self.num_records, self.batch_size
        if self.num_epochs is not None and self._epoch * n + self._position + b > self.num_epochs * n:
            raise StopIteration
        parts, need = [], b
        epoch, pos = self._epoch, self._position
        while need:
            take = min(need, n - pos)
            parts.append(self.permutation(epoch)[pos:pos + take])
            pos += take
            need -= take
            if pos == n:
                epoch, pos = epoch + 1, 0
        self._epoch, self._position = epoch, pos
        return np.concatenate(parts)

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        g = self.next_global_indices()
        k = self.local_batch_size
        local = g[self.process_index * k:(self.process_index + 1) * k]
        batch: dict[str, Any] = {"index": local}
        if self.source is not None:
            if hasattr(self.source, "get_batch"):
                recs = self.source.get_batch(local)
            else:
                recs = [self.source[int(i)] for i in local]
            batch["prompt"] = [r["prompt"] for r in recs]
            batch["idx"] = np.asarray([r["idx"] for r in recs], dtype=np.int64)
            batch["metadata"] = [r.get("metadata") for r in recs]
        return batch
