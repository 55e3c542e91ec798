"""Errors raised on bad input: they always name the file, line or field at fault."""


class InputError(ValueError):
  """A file, line or field does not hold what was expected.

  The message starts with where the problem is, e.g. ``corpus.jsonl:17: ...``.
  """


def at(path, line=None) -> str:
  """Formats a location as ``path`` or ``path:line`` for error messages."""
  return f"{path}:{line}" if line is not None else str(path)


class CorruptStoreError(InputError):
  """A store's chunk does not hold what its marker says it was written with
  (checksum, size), or cannot be read; the message names the chunk."""


class StoreClaimedError(InputError):
  """Another live job is writing the store (the message names it)."""


class QuarantineLimitError(InputError):
  """More examples had a non-finite loss or gradient than the run allows."""


class OtherProcessError(InputError):
  """Another process of a jax.distributed run failed; the message is its own."""
