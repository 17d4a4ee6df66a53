"""How the command lines fail: one line ``error: ...`` on stderr and exit status 2, never a traceback,
for a bad flag, config file, ``:arg`` or config key (with ml_collections' "did you mean" suggestion),
a vipo_jax error, or an OS error (read-only or full disk), so a user sees what to change at once.

``app.run(main, flags_parser=flags_parser(_CONFIG))`` replaces absl's parser (whose config-file
errors are tracebacks); ``main`` wraps its body in ``except (VipoError, OSError) as e: fail(e)``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from absl import flags

_MAX = 400  # characters of an underlying library's message kept in one error line


def one_line(e: BaseException | str, limit: int = _MAX) -> str:
    """A message on one line: whitespace runs (newlines of multi-line library errors) become one
    space and the rest after ``limit`` characters is cut (a TensorStore error dumps whole specs)."""
    text = " ".join(str(e).split())
    text = text.split(" See full TensorStore details", 1)[0]  # the rest is a dump of the store's spec
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_json_object(path: Path, remedy: str) -> dict:
    """The JSON object in ``path``, or a ``CheckpointError`` saying the file is not one and ``remedy``
    (what the user should do: restore it from where it came from)."""
    from vipo_jax.errors import CheckpointError

    try:
        d = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not readable JSON ({one_line(e, 200)}); {remedy}") from e
    if not isinstance(d, dict):
        raise CheckpointError(f"{path} does not hold a JSON object; {remedy}")
    return d


def os_error_reason(e: OSError) -> str:
    """What an OSError means for the user and what to do about it (a full disk, a read-only folder)."""
    advice = {errno.ENOSPC: "the disk is full: free space or use a --workdir on another disk",
              errno.EDQUOT: "the disk quota is exceeded: free space or use a --workdir on another disk",
              errno.EROFS: "the file system is read-only: use a writable --workdir",
              errno.EACCES: "permission denied: use a folder you can write",
              errno.EPERM: "permission denied: use a folder you can write",
              errno.ENOTDIR: "a part of the path is a file, not a folder",
              errno.EEXIST: "a file is in the way",
              errno.ENOENT: "no such file or folder"}.get(e.errno)
    return advice or one_line(e.strerror or e)


def fail(e: BaseException | str) -> NoReturn:
    """Print ``error: <message>`` (one line) to stderr and exit with status 2. vipo_jax's own messages
    are kept whole (a download instruction may be long); other libraries' are cut at 400 characters."""
    msg = one_line(e, limit=10_000 if _is_vipo(e) else _MAX)
    if isinstance(e, OSError) and not _is_vipo(e):
        msg = (f"cannot use {e.filename}: " if e.filename else "") + os_error_reason(e)
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def _is_vipo(e: BaseException) -> bool:
    from vipo_jax.errors import VipoError

    return isinstance(e, VipoError)


def _chain(e: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while e is not None and e not in out:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _flag_value(argv: Sequence[str], name: str) -> str | None:
    """The value of ``--name=value`` or ``--name value`` in ``argv`` (the last one given)."""
    value = None
    for i, a in enumerate(argv):
        if a.startswith(f"--{name}="):
            value = a.split("=", 1)[1]
        elif a == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def _overrides(argv: Sequence[str], name: str) -> list[str]:
    """The dotted keys of ``--name.a.b=value`` overrides in ``argv`` (``--noname.a.b`` included)."""
    keys = []
    for a in argv:
        m = re.match(rf"--(?:no)?{re.escape(name)}\.([^=\s]+)", a)
        if m:
            keys.append(m.group(1))
    return keys


def _unknown_key(argv: Sequence[str], name: str, chain: list[BaseException]) -> str | None:
    """The message for an override naming a key the config does not have, from ml_collections'
    ``KeyError('\\'lrr\\'\\nDid you mean "lr" instead of "lrr"?')``."""
    key, suggestion = None, None
    for e in chain:
        if isinstance(e, KeyError) and e.args and isinstance(e.args[0], str):
            text = e.args[0]
            m = re.match(r"'([^']+)'", text)
            key = m.group(1) if m else key
            s = re.search(r'Did you mean "([^"]+)"', text)
            suggestion = s.group(1) if s else suggestion
    if key is None:
        return None
    for dotted in _overrides(argv, name):
        parts = dotted.split(".")
        if key in parts:
            i = parts.index(key)
            group = ".".join([name, *parts[:i]])
            msg = f"--{name}.{dotted}: unknown config key {key!r} in {group}"
            if suggestion:
                return msg + f"; did you mean --{'.'.join([name, *parts[:i], suggestion, *parts[i + 1:]])}?"
            return msg + f" (the config file lists {group}'s keys)"
    return f"unknown config key {key!r}" + (f"; did you mean {suggestion!r}?" if suggestion else "")


def _config_file_problem(argv: Sequence[str], name: str) -> str | None:
    """``--name=path[:arg]`` whose file is missing or not a file (checked before absl loads it)."""
    value = _flag_value(argv, name)
    if value is None:
        return None
    path = value.split(":", 1)[0]
    if not Path(path).is_file():
        what = "is a folder, not a config file" if Path(path).is_dir() else "not found"
        return f"--{name}={value}: config file {path} {what} (paths are relative to {os.getcwd()})"
    return None


def parse_flags(argv: list[str], config_flags: Sequence[Any] = (), flag_values: flags.FlagValues | None = None
                ) -> list[str]:
    """absl's ``FLAGS(argv)`` with every failure as :func:`fail` (exit 2): unknown flags, bad values,
    a missing config file, a config file's own error (its ``:arg`` refused), an unknown config key.
    ``config_flags``: the holders of the ``DEFINE_config_file`` flags; ``flag_values``: default absl's FLAGS."""
    names = [h.name for h in config_flags]
    for name in names:
        problem = _config_file_problem(argv, name)
        if problem:
            fail(problem)
    try:
        rest = (flag_values or flags.FLAGS)(argv)
    except Exception as e:  # flags.Error, and what ml_collections raises from a config file or a key
        chain = _chain(e)
        for name in names:
            msg = _unknown_key(argv, name, chain)
            if msg:
                fail(msg)
        innermost = chain[-1]
        if "Error whilst parsing config file" in str(e):  # the config file's get_config(arg) raised
            name = next((n for n in names if _flag_value(argv, n) is not None), "config")
            fail(f"--{name}={_flag_value(argv, name)}: {type(innermost).__name__}: {one_line(innermost)}")
        if isinstance(e, flags.Error):
            fail(f"{one_line(e)} (--helpfull lists the flags)")
        fail(f"{type(innermost).__name__}: {one_line(innermost)}")
    for holder in config_flags:  # ml_collections defers some load errors to the first access
        value = holder.value
        if value is not None and type(value).__name__ == "_ErrorConfig":
            try:
                value.keys()
            except Exception as e:  # noqa: BLE001 - report whatever the config file raised
                fail(f"--{holder.name}={_flag_value(argv, holder.name)}: {one_line(_chain(e)[-1])}")
    return rest


def flags_parser(*config_flags: Any) -> Callable[[list[str]], list[str]]:
    """``app.run(main, flags_parser=flags_parser(_CONFIG))``: :func:`parse_flags` for these config flags."""
    return lambda argv: parse_flags(argv, config_flags)
