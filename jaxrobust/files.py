"""Writing files: atomically, and with one clear error when the disk refuses.

Every file a run writes outside orbax's checkpoints -- ``config.json``,
``results.json``, ``DONE.json``, artifacts (npz, JSON), plots, the rewrite of
``metrics.jsonl`` on resume -- goes through :func:`atomic_write`: the content
is written to a temporary file next to the target and renamed over it, so a
reader sees the old file or the new one, never half of one. A failure (a full
disk, a read-only or missing directory, a file-size limit) becomes a
:class:`WriteError` naming the path and what the operating system said, and
the temporary file is removed. ``launch.train`` reports it as one line; the
checkpoints already written stay intact, so the same command resumes once
there is room.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Callable, Iterator, Mapping

import numpy as np


class WriteError(OSError):
  """A file of the run could not be written (the message names it)."""


def describe(e: BaseException) -> str:
  """``'No space left on device'`` rather than ``'[Errno 28] No space ...'``."""
  if isinstance(e, OSError) and e.strerror:
    return e.strerror
  return " ".join(str(e).split()) or type(e).__name__


@contextlib.contextmanager
def writing(path: str, what: str) -> Iterator[None]:
  """Turns an ``OSError`` raised inside into :class:`WriteError` naming
  ``what`` (``'plot'``, ``'metrics'``) and ``path``."""
  try:
    yield
  except WriteError:
    raise
  except OSError as e:
    raise WriteError(f"could not write the {what} {path}: {describe(e)}.") from e


def atomic_write(path: str, write: Callable[[str], None], *, what: str = "file",
                 suffix: str = "") -> None:
  """``write(tmp_path)`` then rename ``tmp_path`` to ``path``.

  ``suffix`` is kept at the end of the temporary name for writers that add
  or check an extension (``np.savez`` appends ``.npz``, matplotlib picks the
  format from it).
  """
  directory = os.path.dirname(path) or "."
  tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}{suffix}")
  with writing(path, what):
    os.makedirs(directory, exist_ok=True)
    try:
      write(tmp)
      os.replace(tmp, path)
    except BaseException:
      with contextlib.suppress(OSError):
        os.remove(tmp)
      raise


def write_json(path: str, obj: Any, *, what: str = "JSON file", indent: int = 2) -> None:
  """Atomic JSON (sorted keys; numpy values as lists, anything else as str)."""
  def write(tmp: str) -> None:
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(obj, f, indent=indent, sort_keys=True, default=_json_default)
  atomic_write(path, write, what=what)


def write_text(path: str, text: str, *, what: str = "file") -> None:
  def write(tmp: str) -> None:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
  atomic_write(path, write, what=what)


def write_npz(path: str, arrays: Mapping[str, Any], *, what: str = "artifact") -> None:
  """Atomic ``np.savez`` of host arrays (read back with ``allow_pickle=False``)."""
  atomic_write(path, lambda tmp: np.savez(tmp, **{k: np.asarray(v) for k, v in arrays.items()}),
               what=what, suffix=".npz")


def _json_default(x: Any) -> Any:
  if isinstance(x, (np.generic, np.ndarray)):
    return x.tolist()
  return str(x)
