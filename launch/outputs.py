"""Checks made before any work, so a run cannot fail (or destroy an input)
at its end: an output location, and a top_k against the corpus.

Flag-free, so that the scripts with flags of their own (``launch.bm25``,
``launch.evaluate``) check as the others do; ``launch.config`` re-exports
``check_top_k``, ``check_writable`` and ``same_file``.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping

from tracer import data as data_lib
from tracer import storage
from tracer.errors import InputError


def check_writable(location: str, what: str = "output", kind: str = "file"
                   ) -> None:
  """InputError unless a ``kind`` ("file" or "directory") can be written at
  the local path ``location``: none of the other kind is there, and the
  directory itself (if it exists) or its nearest existing ancestor is a
  writable directory. URLs other than
  file:// are not checked: a bucket says so at the first write."""
  local = storage.local_path(location) if location else None
  if not local:
    return
  check_kind(location, what, kind)
  path = os.path.abspath(local)
  # Where the first write lands: inside an existing directory, else in the
  # nearest existing ancestor (a file is replaced by a rename beside it).
  parent = nearest_existing(
      path if kind == "directory" and os.path.isdir(path) else os.path.dirname(path))
  if not os.path.isdir(parent):
    raise InputError(f"{what}={location}: cannot be created, {parent} is a file; "
                     "expected a path in a writable directory")
  if not os.access(parent, os.W_OK):
    try:
      readonly = bool(os.statvfs(parent).f_flag & os.ST_RDONLY)
    except OSError:
      readonly = False
    why = "read-only file system" if readonly else "permission denied"
    raise InputError(f"{what}={location}: cannot be written, {parent} is not "
                     f"writable ({why}); expected a path in a writable directory")


def nearest_existing(path: str) -> str:
  """``path`` if it exists, else its nearest existing ancestor."""
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return path


def check_kind(location: str | None, what: str, kind: str, written: bool = True
               ) -> None:
  """InputError if the local path ``location`` holds the other kind ("file"
  or "directory") than ``kind``; nothing there, or a URL, passes. For inputs
  too (a read-only store passes; ``written=False``: one only read, a
  checkpoint): a workdir that is a file failed deep in orbax or tensorstore
  with a traceback."""
  local = storage.local_path(location) if location else None
  if not local:
    return
  if kind == "file" and os.path.isdir(local):
    raise InputError(f"{what}={location}: is a directory; expected a file "
                     "(new, or one to replace)")
  if kind == "directory" and os.path.isfile(local):
    raise InputError(f"{what}={location}: is a file; expected a directory"
                     + (" (new, empty, or one tracer wrote)" if written else ""))


def same_file(a: str, b: str) -> bool:
  """Whether two locations name one file (local: through links too)."""
  if storage.is_url(a) or storage.is_url(b):
    return storage.normalize(a) == storage.normalize(b)
  try:
    return os.path.samefile(a, b)
  except OSError:  # one does not exist yet
    return os.path.realpath(a) == os.path.realpath(b)


def _inside(path: str, directory: str) -> bool:
  """Whether ``path`` is ``directory`` or under it (local: through links)."""
  if storage.is_url(path) or storage.is_url(directory):
    path, directory = storage.normalize(path), storage.normalize(directory)
  else:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
  return path == directory or path.startswith(directory.rstrip("/") + "/")


def _input_files(name: str, source: str) -> list[str]:
  """The files the flag ``--name=source`` names: itself or its glob's
  matches, without a corpus source's ``#text=...`` (``data.split_source``)."""
  files = data_lib.split_source(source)[0] if name == "corpus" else source
  if glob.has_magic(files) and not storage.is_url(files):
    return sorted(glob.glob(files)) or [files]
  return [files]


def check_not_an_input(output: str, inputs: Mapping[str, str | None],
                       what: str = "--output") -> None:
  """InputError if writing ``output`` would replace an input: one of the
  files ``inputs`` (flag name -> value: a file, a glob, a corpus source)
  names, or anything inside one that is a directory (a store, a checkpoint,
  a tokenized corpus). Before 2026-12-05 only a file given as is was caught:
  ``--output=STORE/manifest.json`` or the ``--corpus`` of ``FILE#text=body``
  was overwritten."""
  for name, given in inputs.items():
    if not given:
      continue
    for path in _input_files(name, given):
      local = storage.local_path(path)
      is_dir = name in ("store", "checkpoint") or (
          local is not None and os.path.isdir(local))
      if same_file(path, output):
        which = "" if path == given else f" {path}"
        raise InputError(f"{what}={output}: is the --{name} "
                         f"{'directory' if is_dir else 'file'}{which}; "
                         "expected another path (the output would replace it)")
      if is_dir and _inside(output, path):
        raise InputError(f"{what}={output}: is inside the --{name} directory "
                         f"{path}; expected a path outside it (the output "
                         "would replace its files)")


def check_top_k(top_k: int, num_rows: int, flag: str = "--top_k",
                least: int = 1) -> None:
  """InputError unless least <= top_k <= num_rows (the corpus's rows):
  checked once the corpus is open, before any gradient is computed.
  ``flag``: the flag's name in the message."""
  if not least <= top_k <= num_rows:
    more = f"more than the corpus's {num_rows} rows; " if top_k > num_rows else ""
    raise InputError(f"{flag}={top_k}: {more}expected {least}..{num_rows}")
