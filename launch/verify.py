r"""Re-reads a store and checks every chunk against the checksum in its marker.

  tracer verify --store=W/store [--repair]

Prints ``OK: ...`` and exits 0 when every chunk is written and matches its
checksum; otherwise lists each corrupt or missing chunk (its file, rows and
why), and each stray marker past the last chunk, and exits 1. A manifest
field out of range (its format, epsilon, sizes) is an error. ``--repair``
removes the markers of corrupt chunks (and stray ones), so the
next ``launch.encode`` / ``launch.trace`` on the store rewrites exactly those.
Needs no checkpoint. On several hosts, run it on each (as ``launch.encode``):
each re-reads an equal share of the chunks.
"""

from __future__ import annotations

import sys

from absl import flags
import jax
import numpy as np

from tracer.launch import common
from tracer.launch import config
from tracer import pipeline
from tracer import storage
from tracer import store as store_lib

flags.DEFINE_bool("repair", False, "Unmark corrupt chunks so that the next "
                  "encode rewrites them.")
FLAGS = flags.FLAGS


def run(location: str, repair: bool = False) -> int:
  """Verifies the store; returns the exit status (0 OK, 1 bad chunks)."""
  store = store_lib.open_store(location)
  pipeline.store_basis(store)  # the basis file must match the manifest
  missing = pipeline.agreed_pending_chunks(store).tolist()
  share = pipeline.written_share(store)  # listed once: repairs unmark chunks
  bad, unchecked = pipeline.verify_store(
      store, repair, common.Progress("verify", "chunks"), share)
  for chunk, why in sorted(bad.items()):
    lo, hi = store.chunk_bounds(chunk)
    print(f"corrupt: {store.chunk_file(chunk)}: chunk {chunk} (rows {lo}..{hi}): "
          f"{why}" + ("; unmarked, the next encode rewrites it" if repair else ""),
          flush=True)
  # Each host reads only its share's markers; the counts are summed.
  # (a bad chunk's marker may be what is damaged: not read again)
  counts = np.array([len(bad), len(store.quarantined([c for c in share if c not in bad])),
                     unchecked], np.int64)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    counts = np.asarray(multihost_utils.process_allgather(counts)).reshape(-1, 3).sum(0)
  count, quarantined, unchecked = (int(c) for c in counts)
  # Stray markers are listed by process 0 alone; every process exits with
  # its verdict (before 2026-12-07 the others exited 0 on strays alone).
  stray = store.stray_markers() if jax.process_index() == 0 else {}
  strays = len(stray)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    strays = int(multihost_utils.broadcast_one_to_all(np.int64(strays)))
  if jax.process_index() != 0:
    return 1 if count or missing or strays else 0
  for chunk in missing[:20]:
    lo, hi = store.chunk_bounds(chunk)
    print(f"missing: chunk {chunk} (rows {lo}..{hi}): not written")
  if len(missing) > 20:
    print(f"missing: ... {len(missing) - 20} more chunks not written")
  for chunk, marker in stray.items():
    print(f"stray: {marker}: marks chunk {chunk}, past the store's "
          f"{store.num_chunks} chunks" + ("; removed" if repair else ""))
    if repair:
      storage.delete(marker)
  if count or missing or stray:
    print(f"{location}: {count} corrupt and {len(missing)} missing of "
          f"{store.num_chunks} chunks" + (f"; {len(stray)} stray markers" if stray else ""))
    return 1
  no_checksum = (f", {unchecked} {'has' if unchecked == 1 else 'have'} none to "
                 "check (markers of an earlier tracer: read back, not checked)"
                 if unchecked else "")
  print(f"OK: {location}: {store.num_chunks} chunks, {store.num_rows} rows x "
        f"d={store.dim} ({store.manifest.dtype}); {store.num_chunks - unchecked} "
        f"match their checksums{no_checksum}; {quarantined} rows quarantined")
  return 0


def main(argv):
  del argv
  config.setup(required=("store",))
  sys.exit(run(FLAGS.store, FLAGS.repair))


# The shared flags (config.SCRIPT_FLAGS) this script reads.
USES = ("store",)


if __name__ == "__main__":
  config.run(main, uses=USES)
