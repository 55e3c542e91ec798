"""Tests for launch.plan: the arithmetic, checked by hand, and the CLI."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import subprocess
import sys

import pytest

from tracer.launch import plan as plan_lib

REPO = pathlib.Path(__file__).resolve().parents[1]

BASE = dict(params=8e9, tokens=160e9, seq_len=2048, projection_dim=65536,
            chips=256, chip="v5p")


def _run(*args, code=None):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  command = [sys.executable] + (["-c", code] if code else
                                ["-m", "tracer.launch.plan", *args])
  return subprocess.run(command, cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=60)


def test_rows_and_store_bytes():
  p = plan_lib.plan(**BASE)
  assert p["rows"] == 78_125_000
  assert p["store_bytes"] == 78_125_000 * 65_536 * 2
  assert p["store_bytes"] == 10_240_000_000_000          # 10.24 TB
  assert p["hosts"] == 64                                  # 4 v5p chips a host
  assert p["store_bytes_per_host"] == 10_240_000_000_000 / 64
  f32 = plan_lib.plan(**{**BASE, "store_dtype": "float32"})
  assert f32["store_bytes"] == 78_125_000 * 65_536 * 4
  int8 = plan_lib.plan(**{**BASE, "store_dtype": "int8"})
  assert int8["store_bytes"] == 78_125_000 * (65_536 + 4)    # a scale per row


def test_tokenized_corpus_bytes():
  p = plan_lib.plan(**BASE)                      # vocab 256,000: int32 tokens
  assert p["tokenized_tokens_bytes"] == 78_125_000 * 2048 * 4
  assert p["tokenized_text_bytes"] == 160e9 * 4.0
  assert p["tokenized_bytes_per_host"] == (78_125_000 * 2048 * 4 + 640e9) / 64
  small = plan_lib.plan(**BASE, vocab_size=65_536, text_bytes_per_token=1.0)
  assert small["tokenized_tokens_bytes"] == 78_125_000 * 2048 * 2
  assert small["tokenized_bytes"] == 78_125_000 * 2048 * 2 + 160e9
  with pytest.raises(ValueError, match="text_bytes_per_token must be a positive"):
    plan_lib.plan(**BASE, text_bytes_per_token=0)


@pytest.mark.parametrize("change,message", [
    # A traceback (OverflowError, ZeroDivisionError) before 2026-12-04.
    ({"tokens": float("inf")}, "tokens must be a positive, finite number, got inf"),
    ({"params": float("nan")}, "params must be a positive, finite number"),
    ({"encode_train_ratio": float("inf")}, "encode_train_ratio must be a "
     "positive, finite number"),
    ({"tokens": 0.4}, "tokens must be at least 1"),
    ({"chips": 8, "hosts": 64}, "hosts must be between 1 and the 8 chips"),
    # An impossible plan printed with exit 0 before 2026-12-05.
    ({"chips": 10, "hosts": 3}, r"hosts must divide the 10 chips \(each host "
     r"drives as many\), got 3; expected one of 1, 2, 5, 10$"),
    # Without hosts, worded around the chips and the chip's hosts (until an
    # audit on 2026-12-08 "hosts must divide the 9 chips ..., got 2", a
    # host count the user never gave).
    ({"chips": 9, "chip": "h100"}, r"^chips: 9 h100 chips do not split evenly "
     r"over hosts of at most 8 \(the h100's chips per host: ceil\(9 / 8\) = 2 "
     r"hosts by default\); expected --chips that do \(a multiple of 8 does\), "
     r"or --hosts set to one of 1, 3, 9$"),
    ({"tokens": 2047}, "tokens must be at least one row of seq_len=2048, got 2047"),
    ({"params": 1e14, "chips": 4}, r"params: their bf16 weights \(200 TB\) exceed "
     r"the HBM of 4 v5p chips \(380 GB\); expected more chips"),
    ({"host_memory": 0}, "host_memory must be a positive, finite number, "
     "got 0"),
    ({"host_memory": -16e9}, "host_memory must be a positive, finite number"),
    # (ignored without a word before stop 74)
    ({"host_memory": 16e9, "local_store": True}, "host_memory bounds the "
     "pooled reads of a store in object storage, and local_store maps the "
     "store's chunks with no pool: it would be ignored; expected one of them$"),
    # (named d alone before stop 74, whatever made the step too large; a k
    # within the corpus's 1.25e9 rows, as a larger one is cut to them)
    ({"chip": "v5e", "seq_len": 128, "top_k": 10**9}, r"projection_dim: one query's scan step "
     r"at d=65,536 with k=1,000,000,000 does not fit a v5e chip's 16 GB; "
     r"expected a smaller d or top_k$"),
    # Finite inputs whose figures overflow a float: OverflowError tracebacks
    # before 2026-12-07, named by the input furthest from 1.
    ({"tokens": 1e300}, r"^tokens makes the plan's figures too large to "
     r"compute \(train_flops is inf\), got 1e\+300; expected a smaller value$"),
    ({"tokens": 1e308}, r"^tokens makes the plan's figures too large to "
     r"compute \(one is past the largest float\), got 1e\+308"),
    ({"mfu": 1e-320}, r"^mfu makes the plan's figures too large to compute "
     r"\(encode_chip_hours is inf\), got 9.99989e-321; expected a larger value$"),
    ({"encode_train_ratio": 1e308}, r"^encode_train_ratio makes the plan's "
     r"figures too large to compute \(encode_flops is inf\)"),
    ({"projection_dim": 10**400}, r"^projection_dim makes the plan's figures "
     r"too large to compute \(one is past the largest float\), got 10,000,"),
])
def test_bad_numbers_are_refused(change, message):
  with pytest.raises(ValueError, match=message):
    plan_lib.plan(**{**BASE, **change})


def test_default_hosts_are_the_chip_s():
  assert plan_lib.plan(**{**BASE, "chips": 10, "chip": "h100"})["hosts"] == 2
  assert plan_lib.plan(**{**BASE, "chips": 4, "chip": "h100"})["hosts"] == 1
  assert plan_lib.plan(**{**BASE, "chips": 9, "chip": "h100",
                          "hosts": 3})["hosts"] == 3


def test_rows_round_up():
  p = plan_lib.plan(**{**BASE, "tokens": 2049, "seq_len": 2048})
  assert p["rows"] == 2


def test_encode_flops_and_chip_hours():
  p = plan_lib.plan(**BASE)
  train = 6 * 8e9 * 160e9                                  # 7.68e21 FLOP
  assert p["train_flops"] == pytest.approx(7.68e21)
  assert p["encode_flops"] == pytest.approx(train * 1.33)
  chip_hours = train * 1.33 / (459e12 * 0.4) / 3600
  assert p["encode_chip_hours"] == pytest.approx(chip_hours)
  assert 15_400 < p["encode_chip_hours"] < 15_500
  assert p["encode_wall_hours"] == pytest.approx(chip_hours / 256)
  # An explicit ratio and mfu replace the defaults.
  q = plan_lib.plan(**BASE, encode_train_ratio=2.0, mfu=0.5)
  assert q["encode_chip_hours"] == pytest.approx(
      train * 2.0 / (459e12 * 0.5) / 3600)


def test_scan_bounds_when_store_fits():
  p = plan_lib.plan(**BASE)
  assert p["store_fits_in_hbm"]                # 10.24 TB < 256 * 95 GB - 16 GB
  # Q = 64 query columns and 1 + 64 for the row norms under the queries' R,
  # each product three bf16 passes (exact fp32 scores of bf16 rows).
  assert p["scan_compute_s"] == pytest.approx(
      2 * 78_125_000 * 65_536 * (64 + 65) * 3 / (256 * 459e12))
  f32 = plan_lib.plan(**{**BASE, "store_dtype": "float32"})
  assert f32["scan_compute_s"] == pytest.approx(2 * p["scan_compute_s"])
  assert p["scan_hbm_s"] == pytest.approx(10.24e12 / (256 * 2765e9))
  assert p["scan_resident_s"] == pytest.approx(
      max(p["scan_compute_s"], p["scan_hbm_s"]))
  # The scan as built streams the store: 64 hosts at the assumed 1 GB/s.
  assert p["scan_host_read_s"] == pytest.approx(10.24e12 / (64 * 1e9))
  assert p["scan_estimate_s"] == p["scan_host_read_s"]


def test_summed_checkpoints_multiply_encode_store_and_scan():
  one = plan_lib.plan(**BASE)
  three = plan_lib.plan(**BASE, checkpoints=3)
  for key in ("store_bytes", "encode_flops", "encode_chip_hours",
              "scan_compute_s", "scan_hbm_s", "scan_host_read_s"):
    assert three[key] == pytest.approx(3 * one[key]), key
  assert three["params_bytes"] == 3 * 8e9 * 2   # serve holds every step's
  assert not three["store_fits_in_hbm"]         # 30.7 TB > 24.3 TB free
  # Params of many checkpoints past the pod's HBM: none free (negative before).
  many = plan_lib.plan(**{**BASE, "chips": 4, "params": 8e10, "checkpoints": 3})
  assert many["pod_hbm_free_bytes"] == 0 and not many["store_fits_in_hbm"]
  assert three["scan_resident_s"] is None


def test_summed_checkpoints_count_each_encode_s_steps():
  """S checkpoints take S encodes, each of every row: S times the steps at
  one encode's time per step. Until an audit on 2026-12-08 the steps
  counted one encode against S encodes' wall-clock, S times too long a
  step (45.6 s for S = 4 here)."""
  one = plan_lib.plan(**BASE)
  four = plan_lib.plan(**BASE, checkpoints=4)
  assert one["encode_steps"] == -(-78_125_000 // (64 * 64))
  assert four["encode_steps"] == 4 * one["encode_steps"]
  assert four["encode_step_s"] == pytest.approx(one["encode_step_s"])
  assert "* 4 checkpoints = ceil(rows / (64 * 64)) * 4" in plan_lib.report(four)


def test_queries_where_compute_meets_the_read():
  # At the balance the compute bound (Q + 1 + min(Q, block) columns) equals
  # the read, on both sides of the block size.
  for chips, block in ((256, 1024), (256, 64)):
    p = plan_lib.plan(**{**BASE, "chips": chips, "r_block_dim": block})
    q = p["balance_queries"]
    per_column = p["scan_compute_s"] / (64 + p["norm_columns"])
    assert per_column * (q + 1 + min(q, block)) == pytest.approx(
        p["scan_host_read_s"])
  small = plan_lib.plan(**{**BASE, "host_read_gbps": 3e5, "r_block_dim": 4096})
  q = small["balance_queries"]
  assert q < 4096                              # below the block: 2 columns each
  per_column = small["scan_compute_s"] / (64 + small["norm_columns"])
  assert per_column * (2 * q + 1) == pytest.approx(small["scan_host_read_s"])


def test_many_queries_take_passes_or_are_split_over_the_chips():
  """As tracer.scan plans them: 100,000 queries at d = 2^16 do not fit a
  16 GB v5e chip whole (26 GB), would take 7 runs of whole queries, and
  split over 256 chips (padded to 114,688: 448 a chip) take one pass; 10M
  take 4 split passes, each reading the store again. Before 2026-12-06
  (stop 73) the plan assumed one pass for any Q. A v5e's step is 11,776
  rows (23 chunks of 512), not 2 GiB: the 5 other steps a chip holds
  (``scan.device_steps``) share the half a run leaves (since stop 75)."""
  v5e = {**BASE, "chip": "v5e", "local_store": True}    # (chunks mapped)
  d, row = 65_536, 4 * 65_536 + 16 * 10
  p = plan_lib.plan(**v5e, queries=100_000)
  assert p["scan_step_rows"] == 11_776 == (8 * 10**9 // (5 * 2 * d)) // 512 * 512
  assert p["query_bytes"] == 100_000 * row
  assert (p["scan_passes"], p["queries_split"], p["whole_query_runs"]) == (1, True, 6)
  assert (p["queries_per_pass"], p["query_block"]) == (114_688, 448)
  assert p["query_block_bytes"] == 2 * 448 * row           # one block arriving
  assert p["scan_compute_s"] == pytest.approx(
      2 * 78_125_000 * d * (114_688 + 1025) * 3 / (256 * 197e12))
  # Every step (26 of 11,776 rows a chip) sends each block but the chip's
  # own, and every block's top-k, on around the ring.
  assert p["ring_bytes_per_chip"] == pytest.approx(
      26 * 114_688 * (4 * d * 255 / 256 + 16 * 10))
  one = plan_lib.plan(**v5e)                                # Q = 64: one pass, whole
  assert one["ring_bytes_per_chip"] == 0
  assert (one["scan_passes"], one["queries_split"]) == (1, False)
  assert p["scan_host_read_s"] == one["scan_host_read_s"]
  many = plan_lib.plan(**v5e, queries=10_000_000)
  assert many["queries_split"] and many["scan_passes"] == 4
  assert many["scan_host_read_s"] == pytest.approx(4 * one["scan_host_read_s"])
  assert many["queries_per_pass"] % (64 * 256) == 0
  assert 4 * many["queries_per_pass"] >= 10_000_000 > 3 * many["queries_per_pass"]
  # Each pass's step fits half a chip; the block of 3 passes would not.
  half = 16e9 / 2
  assert plan_lib.run_bytes(many["query_block"], d, 2, 10, True,
                            hbm_bytes=16e9) <= half
  three = -(-10_000_000 // 3 // (64 * 256)) * 64
  assert plan_lib.run_bytes(three, d, 2, 10, True, hbm_bytes=16e9) > half
  # One chip: no ring to split over, so runs of whole queries.
  alone = plan_lib.plan(**{**v5e, "params": 1e8, "tokens": 1e9, "chips": 1,
                           "queries": 100_000})
  assert not alone["queries_split"] and alone["scan_passes"] == 6
  # The step: 2 GiB of rows (16,384 at d = 2^16, bf16), their scores (8 B a
  # row and query) and the queries with their top-k.
  assert plan_lib.run_bytes(64, d, 2, 10, False) == 2**31 + 16_384 * 64 * 8 + 64 * row
  assert plan_lib.run_bytes(64, d, 2, 10, False, hbm_bytes=16e9) == (
      12_207 * 2 * d + 12_207 * 64 * 8 + 64 * row)    # (8e9 // (5 * 2 * d))
  text = plan_lib.report(p)
  assert "split over the chips  448 a chip" in text
  assert "ring traffic a chip" in text and "ring traffic" not in plan_lib.report(one)
  assert "1 pass (queries split)" in text and "they take 6 passes" in text
  assert "store / (64 * 1 GB/s) * 4" in plan_lib.report(many)
  # From object storage (the default) a step is staged through a host's
  # pooled buffers: 8 GiB for 6 pieces in flight of a buffer for each of its
  # 4 chips, pieces of whole chunks of 512 rows, at most 2,560 rows a chip:
  # a step of 11,776 rows is 23 pieces of 512 (the most rows), and the ring
  # sends what a local store's does. Until stop 75 the pool bounded the step
  # (10 sets, 1,536 rows a chip) and the blocks went around ~10 times as often.
  assert plan_lib.staged_rows(d, 2, 4, 512) == 8 * 2**30 // (6 * 4 * 2 * d) // 512 * 512
  assert plan_lib.staged_rows(d, 2, 4, 512) == 2_560
  remote = plan_lib.plan(**{**v5e, "local_store": False}, queries=100_000)
  assert (remote["scan_step_rows"], remote["scan_pieces"]) == (11_776, (512, 23))
  assert (remote["scan_passes"], remote["queries_split"]) == (1, True)
  assert remote["whole_query_runs"] == 6
  assert remote["ring_bytes_per_chip"] == p["ring_bytes_per_chip"]
  assert "in 23 pieces of 512 rows a chip" in plan_lib.report(remote)


def test_query_passes_plan_as_the_scan_where_a_step_shrinks_with_more_queries():
  """At small d a step's bytes fall as queries grow once its scores cap its
  rows (``SCORE_STEPS`` * 2 GiB / (8 B * Q)): at d = 1,024 (bf16, k = 10)
  1,000 queries take 10.54 GB a step, 2,000 take 9.70 GB. On a chip of 20
  GB (half: 10 GB) ``scan.query_batch`` takes the 2,000 in one run; until
  2026-12-06 the plan bisected as if a step only grew with its queries,
  and planned 3 runs of 667 on one chip, a split over 8."""
  from tracer import scan  # pylint: disable=g-import-not-at-top
  d, k, have = 1024, 10, 20 * 10**9
  step = lambda n: plan_lib.run_bytes(n, d, 2, k, False)
  rows = 4 * 2**31 // (8 * 2000)                        # 536,870: scores' cap
  assert plan_lib.step_rows(2000, d, 2) == rows
  assert (step(2000) == rows * d * 2 + rows * 2000 * 8 + 2000 * (4 * d + 16 * k)
          == 9_697_941_760)
  assert (step(1000) == 2**31 + 2**20 * 1000 * 8 + 1000 * (4 * d + 16 * k)
          == 10_540_347_648)
  assert scan.query_batch(2000, step, have) == 2000
  for chips in (1, 8):
    got = plan_lib.query_passes(2000, d, 2, k, chips, have)
    assert (got["passes"], got["split"], got["per_run"], got["whole_runs"]) == (
        1, False, 2000, 1), chips
    assert (got["step_bytes"], got["limit_bytes"]) == (9_697_941_760, 10**10)
  # On one chip the plan's runs are query_batch's, wherever the bytes fall.
  for d in (64, 256, 1024):
    for gb in (17, 18, 19, 20, 21):
      for queries in (500, 1000, 2000, 5000, 10_000):
        step = lambda n, d=d, gb=gb: plan_lib.run_bytes(n, d, 2, k, False,
                                                        hbm_bytes=gb * 10**9)
        batch = scan.query_batch(queries, step, gb * 10**9)
        got = plan_lib.query_passes(queries, d, 2, k, 1, gb * 10**9)
        assert (got["passes"], got["per_run"]) == (
            -(-queries // batch), batch), (d, gb, queries)


def test_a_step_is_whole_store_chunks_as_the_scan_takes_them():
  """The scan's steps are whole store chunks a device: its bytes' rows
  rounded up (``scan.default_chunk_rows``: 2 GiB over 3 stores of d = 2^16
  bf16 is 5,461.3 rows, 11 chunks of 512), the scores' cap down and at least
  one chunk (``scan.query_capped_step``: 10,000,384 queries at d = 64 cap a
  chip's 8 GiB of scores at 858 rows, one chunk). Before stop 74 the plan
  took 5,461 and 858 rows."""
  from tracer import scan  # pylint: disable=g-import-not-at-top
  summed = plan_lib.plan(**{**BASE, "queries": 2000,   # (v5p: 95 GB)
                            "checkpoints": 3, "local_store": True})
  assert summed["scan_step_rows"] == 11 * 512 == scan.default_chunk_rows(
      65536, 2 * 3, 1, 512, "gpu")
  small = plan_lib.plan(**{**BASE, "chip": "v5e", "chips": 8,
                           "queries": 10**7, "projection_dim": 64,
                           "local_store": True})
  assert (small["queries_split"], small["queries_per_pass"]) == (True, 10_000_384)
  assert small["scan_step_rows"] == 512
  assert scan.SCORE_STEPS * scan.ACCELERATOR_CHUNK_BYTES // (
      scan.PAIR_BYTES * 10_000_384 // 8) == 858


def test_store_passes_name_the_bound_their_runs_are_held_to():
  """Runs are held to half a chip's HBM, or to all of it where even the
  least step passes half (``scan.query_batch``): a chip of 100 MB, whose
  half not even one 64 MiB store chunk's step fits (a step's rows shrink
  with the chip since stop 75: on 4 GB they fit half). Until 2026-12-06
  the report said half either way."""
  small = dataclasses.replace(plan_lib.find_chip("v5e"), name="small",
                              hbm_bytes=100e6)
  args = {**BASE, "params": 1e8, "chip": "small", "local_store": True}
  with pytest.MonkeyPatch.context() as m:
    m.setattr(plan_lib, "CHIPS", plan_lib.CHIPS + (small,))
    p = plan_lib.plan(**args)
  text = plan_lib.report(p)
  assert ("each step 84.2 MB a chip, within all of a chip's HBM (even the "
          "least step passes half)") in text
  assert "half a chip's HBM" not in text
  need = 512 * 2 * 65_536 + 512 * 64 * 8 + 64 * (4 * 65_536 + 16 * 10)
  assert plan_lib.run_bytes(1, 65_536, 2, 10, False, multiple=512,
                            hbm_bytes=100e6) > 50e6
  assert (p["scan_passes"], p["queries_split"]) == (1, False)
  assert (p["scan_step_bytes"], p["scan_step_limit_bytes"]) == (need, 100e6)
  v5e = plan_lib.plan(**{**args, "chip": "v5e"})
  assert v5e["scan_step_limit_bytes"] == 8e9
  assert ("each step 1.57 GB a chip, within half a chip's HBM: its rows"
          in plan_lib.report(v5e))


def test_chunks_too_large_for_the_other_steps_cut_the_prefetch():
  """Where even a store chunk in each of the 5 other steps a chip holds
  passes the half a run leaves them, the scan prefetches fewer
  (``scan.held_prefetch``), and the plan says so: 2 GiB chunks (16,384 rows
  at d = 2^16) on a 16 GB v5e, 3 other steps (6.4 GB), not 5 (10.7 GB).
  Until stop 76 both held 5. 512-row chunks keep 5."""
  v5e = {**BASE, "chip": "v5e", "chips": 256, "projection_dim": 65_536}
  big = plan_lib.plan(**v5e, chunk_rows=16_384)
  assert (big["scan_other_steps"], big["scan_step_rows"]) == (3, 16_384)
  assert ("the rows of the 3 other steps a chip holds within the other half: "
          "fewer prefetched, as even a chunk in each of the default's 5 would "
          "not fit") in plan_lib.report(big)
  small = plan_lib.plan(**v5e, chunk_rows=512)
  assert (small["scan_other_steps"], small["scan_step_rows"]) == (5, 11_776)
  assert "the rows of the 5 other steps a chip holds within the other half)" in (
      plan_lib.report(small))


def test_a_step_is_no_longer_than_the_corpus():
  """A corpus smaller than a step takes one step of its own rows a chip,
  whole chunks, as the scan caps it (``min(s, padded_size(num_rows, ...))``):
  1,000 rows on 4 v5e chips at d = 1,024 with 512-row chunks, 512 rows a
  chip in 1 piece. Until stop 76 the plan said 780,800 rows a chip in 5
  pieces of 156,160 (helper-52's audit)."""
  p = plan_lib.plan(**{**BASE, "params": 1e8, "tokens": 1000 * 2048,
                       "projection_dim": 1024, "chips": 4, "chip": "v5e"})
  assert (p["rows"], p["scan_step_rows"], p["scan_pieces"]) == (1000, 512, (512, 1))
  assert plan_lib.step_rows(64, 1024, 2, multiple=512, chip_rows=250) == 512
  assert plan_lib.step_rows(64, 1024, 2, multiple=512, chip_rows=1100) == 1536


def test_a_top_k_past_the_corpus_is_cut_to_its_rows():
  """As ``scan._scan`` cuts k to the rows (``min(k, max(num_rows, 1))``): 100
  rows with k = 10**6 plan as k = 100, one whole pass, and the report says
  so. Until an audit on 2026-12-08 the plan took the k asked: 3 passes,
  split, of 29 GB steps on 8 H100s, and k = 10**9 10,000 passes."""
  small = dict(BASE, params=1e8, tokens=100 * 2048, chips=8, chip="h100",
               queries=20_000)
  asked = plan_lib.plan(**small, top_k=100)
  for k in (10**6, 10**9):
    p = plan_lib.plan(**small, top_k=k)
    assert (p["top_k"], p["top_k_asked"]) == (100, k)
    for key in ("scan_passes", "queries_split", "query_bytes",
                "scan_step_bytes"):
      assert p[key] == asked[key], key
  assert (asked["scan_passes"], asked["queries_split"]) == (1, False)
  assert re.search(r"\n  k +100 of the 1,000,000,000 asked +cut to the "
                   "corpus's rows", plan_lib.report(p))
  assert "100 of the" not in plan_lib.report(asked)


def test_a_local_store_step_is_at_most_max_pieces_chunks():
  """A local store's step is at most ``scan.MAX_PIECES`` chunks a chip,
  mapped in place, as the scan takes it (since stop 75): on 8 H100s at d =
  2^14 with 512-row chunks, 2 GiB would be 128 chunks; the step is 32
  (16,384 rows). From object storage the 2 GiB step, 65,536 rows, is
  staged in 16 pieces of 4,096. Until stop 75 the plan said 65,536 rows
  mapped where the scan shrank the step to its pool and mapped 10 chunks."""
  h100 = {**BASE, "chips": 8, "chip": "h100", "projection_dim": 2**14}
  local = plan_lib.plan(**h100, local_store=True)
  remote = plan_lib.plan(**h100)
  assert (local["scan_step_rows"], local["scan_pieces"]) == (32 * 512, None)
  assert (remote["scan_step_rows"], remote["scan_pieces"]) == (65_536, (4_096, 16))
  assert plan_lib.step_rows(64, 2**14, 2, multiple=512, hbm_bytes=80e9,
                            mapped=True) == 16_384


def test_host_memory_bounds_the_pooled_reads():
  """A scan from object storage pools its reads in a quarter of a host's
  memory, at most 8 GiB (``scan.host_buffer_bytes``), and stages each step
  through the pool a piece at a time: a v5p host of 16 GB pools 4 GB,
  pieces of 1,024 rows a chip at d = 2^16 (6 pieces in flight, a buffer for
  each of 4 chips), where the default (a host of at least 32 GiB) pools 8
  GiB, 2,048-row pieces; the step is 16,384 rows either way. Until
  2026-12-06 the plan assumed 8 GiB on any host; until stop 75 the pool
  bounded the step (512 and 1,536 rows)."""
  d = 65_536
  assert plan_lib.staged_rows(d, 2, 4, 512, 16e9) == 1_024
  assert 4 * 10**9 // (6 * 4 * 2 * d) == 1_271            # two chunks of 512
  assert plan_lib.staged_rows(d, 2, 4, 512) == 2_560
  assert plan_lib.staged_rows(d, 2, 4, 512, 400e9) == 2_560
  v5p = dict(BASE)                                     # (4 chips a host)
  default, small = plan_lib.plan(**v5p), plan_lib.plan(**v5p, host_memory=16e9)
  assert (default["scan_step_rows"], small["scan_step_rows"]) == (16_384, 16_384)
  assert (default["scan_pieces"], small["scan_pieces"]) == ((2_048, 8), (1_024, 16))
  # (6 pieces of a chip's rows for each of 4 chips, within the pool)
  assert (default["host_pool_bytes"], small["host_pool_bytes"]) == (
      6 * 4 * 2_048 * 2 * d, 6 * 4 * 1_024 * 2 * d)
  text = plan_lib.report(small)
  assert ("in 16 pieces of 1,024 rows a chip, each staged through the host's "
          "pooled buffers (3.22 GB (3 GiB) for 6 pieces in flight, a buffer a "
          "chip, within the pool of 4 GB (3.73 GiB) of a host's 16 GB)") in text
  assert "host memory 16 GB (--host_memory)" in text
  text = plan_lib.report(default)
  assert ("pooled buffers (6.44 GB (6 GiB) for 6 pieces in flight, a buffer "
          "a chip, within the pool of 8.59 GB (8 GiB))" in text)
  assert "host memory at least 32 GiB: ASSUMED (--host_memory)" in text
  # Where 6 pieces of a chunk for each of 8 GPUs pass the pool (a host of 8
  # GB), the scan reads fewer ahead; a piece is one chunk, the step 2 GiB
  # (of two checkpoints' stores: 8,192 rows of each, 16 pieces).
  h100 = plan_lib.plan(**{**BASE, "chips": 8, "chip": "h100", "checkpoints": 2,
                          "host_memory": 8e9})
  assert h100["host_pool_short"] and h100["host_pool_sets"] == 3
  assert (h100["scan_step_rows"], h100["scan_pieces"]) == (8_192, (512, 16))
  assert ("(1.61 GB (1.5 GiB) for 3 pieces in flight, a buffer a chip, within "
          "the pool of 2 GB (1.86 GiB) of a host's 8 GB: 6 of a chunk would not "
          "fit)") in plan_lib.report(h100)
  assert "host memory" not in plan_lib.report(
      plan_lib.plan(**BASE, local_store=True)).split("Assumptions")[1]


def test_the_pool_is_of_the_pieces_a_step_takes():
  """The pooled buffers are of a staged step's pieces, which are fewer rows
  than the pool allows where the step is short: 977 rows on 8 v5e chips (4
  a host) are a step of one 512-row chunk a chip, so 6 pieces in flight
  take 6 * 4 * 512 rows of d = 2^16 bf16, 1.61 GB, within the 8 GiB pool; a
  pod's 11,776-row steps (23 chunks, none larger dividing them) take the
  same. Before, the plan said the buffers took all 8.59 GB."""
  d = 65_536
  small = plan_lib.plan(**{**BASE, "tokens": 2e6, "chips": 8, "chip": "v5e"})
  pod = plan_lib.plan(**{**BASE, "chips": 256, "chip": "v5e",
                         "queries": 100_000})
  assert (small["rows"], small["scan_step_rows"], small["scan_pieces"]) == (
      977, 512, (512, 1))
  assert (pod["scan_step_rows"], pod["scan_pieces"]) == (11_776, (512, 23))
  for p in (small, pod):
    assert (p["host_pool_bytes"], p["host_pool_allowed_bytes"]) == (
        6 * 4 * 512 * 2 * d, 8 * 2**30)
    assert ("pooled buffers (1.61 GB (1.5 GiB) for 6 pieces in flight, a "
            "buffer a chip, within the pool of 8.59 GB (8 GiB))"
            ) in plan_lib.report(p)


def test_a_pool_too_small_for_two_pieces_is_the_scan_s_floor():
  """``--host_memory=1`` allows a pool of 0 B, but a scan from object
  storage still keeps two sets of a chunk a chip (``scan.staged_read_ahead``
  cuts its read-ahead to 0, no further): on a v5p host (4 chips, 512-row
  chunks of d = 2^16 bf16) 2 * 4 * 64 MiB = 512 MiB, which the plan reports
  as the floor. Before, it said a pool of "0 B (0 B)" for "fewer than 6
  pieces in flight"."""
  from tracer import scan  # pylint: disable=g-import-not-at-top
  p = plan_lib.plan(**BASE, host_memory=1)
  text = plan_lib.report(p)
  assert ("each staged through the host's pooled buffers (537 MB (512 MiB) for "
          "2 pieces in flight, a buffer a chip: the floor, as few as a scan "
          "keeps, past the pool of 0 B (0 B) of a host's 1 B)") in text
  assert ("(scan.host_buffer_bytes): 0 B (0 B); at its floor, 2 pieces of a "
          "chunk a chip in flight, it takes 537 MB (512 MiB).") in text
  chunk = 512 * 65_536 * 2
  assert [scan.staged_read_ahead(4, chunk, share) for share in (
      0, 3 * chunk - 1, 3 * chunk, 6 * chunk)] == [0, 0, 1, 4]
  assert plan_lib.staged_pool(65_536, 2, 4, 512, 1) == plan_lib.StagedPool(
      512, 2, 2 * 4 * chunk, 0)
  assert (p["host_pool_bytes"], p["host_pool_allowed_bytes"], p["host_pool_sets"],
          p["host_pool_floor"], p["scan_pieces"]) == (2**29, 0, 2, True, (512, 32))
  result = _run("--params=8e9", "--tokens=160e9", "--chips=256", "--chip=v5p",
                "--host_memory=1")
  assert result.returncode == 0, result.stderr
  assert "537 MB (512 MiB) for 2 pieces in flight" in result.stdout
  assert not plan_lib.plan(**BASE, host_memory=16e9)["host_pool_floor"]


def test_summed_checkpoints_hold_each_store_s_step_and_queries():
  """A summed scan (``tracer trace --sum_steps``: ``scan.scan_stores``)
  holds a step of rows of every checkpoint's store, together a step's 2
  GiB (``scan._scan``), every checkpoint's queries, and one top-k. 10,000
  queries at d = 2^16 on v5e with three checkpoints take 7.9 GB whole
  beside the rows: tracer splits them (one pass, 64 a chip). Until an
  audit on 2026-12-06 the plan sized the step as one store's and counted
  each ring step's top-k once per checkpoint; and until the scan's step
  was shared by its stores (the same evening) eight stores' steps, 17.2
  GB, fit no v5e chip."""
  v5e, d, k = {**BASE, "chip": "v5e", "local_store": True}, 65_536, 10
  half = 16e9 / 2
  rows = 2**31 // (3 * 2 * d)                          # 5,461 of each store
  assert plan_lib.step_rows(2000, d, 2, 3) == rows
  assert plan_lib.run_bytes(2000, d, 2, k, False, parts=3) == (
      3 * rows * 2 * d + rows * 2000 * 8 + 2000 * (3 * 4 * d + 16 * k))
  three = plan_lib.plan(**v5e, queries=2000, checkpoints=3)
  assert (three["scan_passes"], three["queries_split"]) == (1, False)
  assert three["query_bytes"] == 2000 * (3 * 4 * d + 16 * k)
  assert "Q * (3 * d * 4 + k * 16) B" in plan_lib.report(three)
  many = plan_lib.plan(**v5e, queries=10_000, checkpoints=3)
  assert plan_lib.run_bytes(10_000, d, 2, k, False, parts=3) > half
  assert (many["scan_passes"], many["queries_split"]) == (1, True)
  assert (many["queries_per_pass"], many["query_block"]) == (16_384, 64)
  # 86 steps of 7 chunks: whole chunks, the 5 other steps' rows of the
  # three stores within half a v5e (8e9 // (5 * 3 * 2 * d) = 4,069 rows)
  assert many["scan_step_rows"] == 7 * 512
  steps = -(-78_125_000 // (256 * 7 * 512))
  assert many["ring_bytes_per_chip"] == pytest.approx(
      steps * 16_384 * (3 * 4 * d * 255 / 256 + 16 * k))
  eight = plan_lib.plan(**v5e, queries=64, checkpoints=8)
  assert plan_lib.run_bytes(64, d, 2, k, False, parts=8) < half
  assert (eight["scan_passes"], eight["queries_split"]) == (1, False)


def test_scan_reads_from_hosts_when_store_does_not_fit():
  p = plan_lib.plan(**{**BASE, "chips": 16})   # 16 * 95 GB = 1.52 TB < store
  assert not p["store_fits_in_hbm"]
  assert p["hosts"] == 4
  assert p["scan_host_read_s"] == pytest.approx(10.24e12 / (4 * 1e9))
  assert p["scan_estimate_s"] == p["scan_host_read_s"]
  assert p["scan_bound"] == "host read"
  assert p["scan_resident_s"] is None


def test_host_memory_is_independent_of_corpus_size():
  small = plan_lib.plan(**BASE)
  large = plan_lib.plan(**{**BASE, "tokens": 160e9 * 1000})
  assert large["rows"] == 1000 * small["rows"]
  assert large["host_memory_bytes"] == small["host_memory_bytes"]
  # The copies measured by `tracer benchmark-data --encode_memory`: a
  # chunk's 8 bytes per element, 4.5 f32 copies of each encoding of a batch
  # and 5 of each example (12 bytes a token); R's blocks. (Until 2026-12-06
  # one copy of each: 420 MB where the pipeline's own checks count 620.)
  expected = (512 * 65_536 * 8 + int(64 * 65_536 * 4 * 4.5) + 64 * 2048 * 12 * 5
              + 65_536 * 1024 * 4)
  assert small["host_memory_bytes"] == expected


def test_unknown_chip_lists_known_chips():
  with pytest.raises(ValueError) as e:
    plan_lib.plan(**{**BASE, "chip": "tpu9"})
  for chip in plan_lib.CHIPS:
    assert chip.name in str(e.value)
  assert plan_lib.find_chip("H100").name == "h100"


def test_every_chip_names_its_sources():
  for chip in plan_lib.CHIPS:
    assert chip.source and chip.ratio_source
    assert chip.peak_flops > 0 and chip.hbm_bytes > 0
    assert chip.hbm_bandwidth > 0 and chip.chips_per_host > 0


def test_cli_prints_plan():
  result = _run("--params=8e9", "--tokens=160e9", "--seq_len=2048",
                "--projection_dim=65536", "--chips=256", "--chip=v5p")
  assert result.returncode == 0, result.stderr
  assert "78,125,000 rows" in result.stdout
  assert "Assumptions" in result.stdout
  assert "ASSUMED" in result.stdout


def test_cli_host_memory():
  args = ("--params=8e9", "--tokens=160e9", "--chips=256", "--chip=v5p")
  result = _run(*args, "--host_memory=16e9")
  assert result.returncode == 0, result.stderr
  assert "16 pieces of 1,024 rows a chip" in result.stdout
  assert "4 GB (3.73 GiB) of a host's 16 GB" in result.stdout
  result = _run(*args, "--host_memory=-1")
  assert result.returncode != 0
  assert "host_memory must be a positive, finite number" in result.stderr


def test_cli_unknown_chip_fails_clearly():
  result = _run("--params=8e9", "--tokens=160e9", "--chips=8", "--chip=tpu9")
  assert result.returncode != 0
  assert "unknown chip 'tpu9'" in result.stderr
  assert "v5p" in result.stderr and "h100" in result.stderr


def test_module_does_not_import_jax():
  result = _run(code="import sys, tracer.launch.plan; "
                "assert 'jax' not in sys.modules, 'jax imported'")
  assert result.returncode == 0, result.stderr
