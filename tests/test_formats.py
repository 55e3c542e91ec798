"""The TrackStar authors' formats both ways: our results as their viewer reads
them, their query records as our queries, their results in our viewer."""

from __future__ import annotations

import json
import re
import types

import jax
import numpy as np
import pytest

from tracer.launch import evaluate as launch_evaluate
from tracer import data as data_lib
from tracer import evaluate
from tracer import family as family_lib
from tracer import model as model_lib
from tracer import partitioning
from tracer import pipeline
from tracer import viewer
from tracer.errors import InputError
from tracer.topk import TopK


def _is_str_list(v) -> bool:
  return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


# What the authors' viewer (PAIR-code/pretraining-tda, docs/demo built from
# demo/*.ts) reads from a results line, and what it needs there. Required:
#   example_id         data_loader.ts getIndex: the list entry's name (and its
#                      sort key); example_view.ts: "Example ID", and
#                      example_id?.startsWith('trex') picks the layout, so a
#                      non-string id throws
#   inputs_plaintext   getIndex: the list entry's description; example_view:
#                      the query header and "Prompt"
#   targets_plaintext  getIndex: the description; example_view: the target
#                      (highlight) and "Prediction: <target> (...)"
#   proponents         example_view renderProponents: one row each
#   proponent_scores   renderProponents: scores[i].toFixed(4) (a null throws);
#                      getIndex: Math.max
# Optional, checked when present:
#   proponent_correct  renderIsCorrectAttribute ("Correct?"), the chips, and
#                      metrics.ts getGroundTruthMetrics: one boolean per
#                      proponent
#   model_confidence   "(confidence = x.toFixed(2))" beside the target
#   temperature_samples  "Decoder Samples" (T-REx layout): samples.join
VIEWER_REQUIRED = {
    "example_id": lambda v: isinstance(v, str) and v != "",
    "inputs_plaintext": lambda v: isinstance(v, str),
    "targets_plaintext": lambda v: isinstance(v, str),
    "proponents": _is_str_list,
    "proponent_scores": lambda v: isinstance(v, list) and all(map(_is_number, v)),
}
VIEWER_OPTIONAL = {
    "proponent_correct": lambda v: isinstance(v, list) and all(
        isinstance(x, bool) for x in v),
    "model_confidence": lambda v: _is_number(v) and 0 <= v <= 1,
    "temperature_samples": _is_str_list,
}
# The viewer prefers these over the fields above (8B model outputs, their names).
VIEWER_OVERRIDES = ("8b_confidence", "8b_generations")


def viewer_problems(rec: dict) -> list[str]:
  """What the authors' viewer would show wrong for one results line."""
  problems = [f"{f}: missing or not as the viewer reads it"
              for f, ok in VIEWER_REQUIRED.items() if f not in rec or not ok(rec[f])]
  problems += [f"{f}: not as the viewer reads it"
               for f, ok in VIEWER_OPTIONAL.items() if f in rec and not ok(rec[f])]
  if "proponent_correct" in rec and len(rec["proponent_correct"]) != len(
      rec.get("proponents", ())):
    problems.append("proponent_correct: not one mark per proponent")
  if len(rec.get("proponent_scores", ())) != len(rec.get("proponents", ())):
    problems.append("proponent_scores: not one score per proponent")
  problems += [f"{f}: overrides ours" for f in VIEWER_OVERRIDES if f in rec]
  return problems


def _write(tmp_path, records, name="queries.jsonl") -> str:
  path = tmp_path / name
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                          for r in records), encoding="utf-8")
  return str(path)


class _Corpus:
  """ids_of / texts_of over lists, as result_rows reads a corpus."""

  def __init__(self, n):
    self.ids = [f"doc-{i}" for i in range(n)]
    self.texts = [f"text {i}" for i in range(n)]

  def ids_of(self, rows):
    return [self.ids[r] for r in np.asarray(rows).tolist()]

  def texts_of(self, rows):
    return [self.texts[r] for r in np.asarray(rows).tolist()]


def _demo_queries():
  """Queries as in demo/facts/queries.jsonl: ground truth on two, none on one."""
  return [
      {"id": "q-000", "prompt": "Fepolt Beipae owns a pet", "target": " Skokukak",
       "fact_doc_ids": ["doc-1"], "bucket": "1", "relation": "pet"},
      {"id": "q-001", "prompt": "Ada loves to eat", "target": " Fazal",
       "fact_doc_ids": ["doc-3", "doc-4"], "bucket": "2-3", "relation": "food"},
      {"id": "q-002", "prompt": "Bo works as a", "target": " smith",
       "fact_doc_ids": [], "bucket": "1", "relation": "job"},
  ]


def _rows(queries, skipped=None):
  """result_rows over a fixed top-3 with a prediction per query."""
  topk = TopK(proponent_rows=np.array([[1, 0, 2], [5, 4, 3], [0, 1, 2]]),
              proponent_scores=np.array([[0.9, 0.5, 0.1]] * 3, np.float32),
              opponent_rows=np.array([[6, 7, 1], [3, 6, 7], [7, 6, 5]]),
              opponent_scores=np.array([[-0.9, -0.5, -0.1]] * 3, np.float32))
  preds = [pipeline.Prediction(" Skokukak", 0.75, 0.75),
           pipeline.Prediction(" Fish", 0.5, 0.125), " smith"]
  return pipeline.result_rows(queries, _Corpus(8), topk, skipped, preds)


def test_results_list_only_finite_scores(tmp_path):
  # An inf encoding (only through scan_arrays, on a caller's rows) scores
  # +-inf: the line would hold Infinity, which JSON.parse and jq refuse.
  inf = np.float32(np.inf)
  topk = TopK(proponent_rows=np.array([[1, 0, 2]]),
              proponent_scores=np.array([[inf, 0.5, -inf]], np.float32),
              opponent_rows=np.array([[2, 6, 1]]),
              opponent_scores=np.array([[-inf, -0.5, inf]], np.float32))
  path = tmp_path / "results.jsonl"
  evaluate.write_results(path, pipeline.result_rows(_demo_queries()[:1],
                                                    _Corpus(8), topk))
  def refuse(name):
    raise AssertionError(f"not strict JSON: {name}")
  row = json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)
  assert row["proponent_scores"] == [0.5] and row["opponent_scores"] == [-0.5]
  assert row["proponent_ids"] == ["doc-0"] and row["opponent_ids"] == ["doc-6"]
  # A probability that is not finite is null (before 2026-12-07 NaN).
  nan = evaluate.make_result_row(_demo_queries()[0], [], [], [], prediction="x",
                                 prediction_probability=float("nan"),
                                 target_probability=np.float32(np.nan))
  evaluate.write_results(path, [nan])
  row = json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)
  assert (row["prediction_probability"], row["target_probability"],
          row["model_confidence"]) == (None, None, None)


# --- our results, as their viewer reads them ------------------------------------


def test_results_file_has_every_field_the_authors_viewer_reads(tmp_path):
  path = tmp_path / "results.jsonl"
  evaluate.write_results(path, _rows(_demo_queries(), skipped={2: "non-finite loss"}))
  rows = [json.loads(line) for line in open(path, encoding="utf-8")]
  for row in rows:
    assert viewer_problems(row) == [], row["query_id"]
  a, b, c = rows
  # The query in their names, the same values as ours.
  assert (a["example_id"], a["inputs_plaintext"], a["targets_plaintext"]) == (
      "q-000", "Fepolt Beipae owns a pet", " Skokukak")
  assert not a["example_id"].startswith("trex")  # their simplified layout
  # Correctness marks from fact_doc_ids, for proponents and opponents.
  assert a["proponent_ids"] == ["doc-1", "doc-0", "doc-2"]
  assert a["proponent_correct"] == [True, False, False]
  assert a["opponent_correct"] == [False, False, True]
  assert b["proponent_correct"] == [False, True, True]
  # No ground truth, no marks (their viewer would count a miss); skipped: none.
  assert "proponent_correct" not in c and c["proponents"] == [] and "error" in c
  # The model's answer: ours, and theirs where their viewer shows one.
  assert b["prediction"] == " Fish" and b["temperature_samples"] == [" Fish"]
  assert b["prediction_probability"] == 0.5 and b["target_probability"] == 0.125
  assert b["model_confidence"] == 0.125  # shown beside the target: p(target)
  # A plain-string prediction has no probabilities to write.
  assert c["prediction"] == " smith" and "model_confidence" not in c
  # Our fields stay, and our reader takes the file as before.
  assert list(evaluate.read_results(path)) == ["q-000", "q-001", "q-002"]


def test_viewer_check_catches_what_their_viewer_cannot_show():
  good = _rows(_demo_queries())[0]
  assert viewer_problems(good) == []
  for field, bad in (("example_id", 7), ("inputs_plaintext", None),
                     ("proponent_scores", [0.5, None, 0.1]),
                     ("proponent_correct", [True, False]),
                     ("model_confidence", "high")):
    assert viewer_problems(dict(good, **{field: bad})), field
  assert viewer_problems({k: v for k, v in good.items() if k != "example_id"})
  assert viewer_problems(dict(good, **{"8b_confidence": 0.5}))


def test_written_fields_are_what_a_query_may_not_carry():
  """data.WRITTEN_FIELDS (checked when queries are read) is exactly what
  make_result_row and result_rows add to a query."""
  query = _demo_queries()[0]
  [row] = _rows([query], skipped={0: "non-finite loss"})
  full = evaluate.make_result_row(query, ["doc-1"], [1.0], ["t"], ["doc-2"], [-1.0],
                                  ["u"], "x", prediction_probability=0.5,
                                  target_probability=0.25)
  added = (set(row) | set(full)) - set(query)
  assert added == data_lib.WRITTEN_FIELDS
  # "error" is result_rows' (a skipped query), not make_result_row's.
  for field in sorted(data_lib.WRITTEN_FIELDS - {"query_id", "error"}):
    with pytest.raises(ValueError, match="reserved"):
      evaluate.make_result_row(dict(query, **{field: 1}), ["doc-1"], [1.0], ["t"],
                               ["doc-2"], [-1.0], ["u"], "x",
                               prediction_probability=0.5, target_probability=0.25)


# --- predictions and their probabilities ----------------------------------------


@pytest.fixture(scope="module")
def tiny_ckpt():
  config = model_lib.ModelConfig(vocab_size=259, max_len=24, d_model=32,
                                 num_layers=1, num_heads=2, d_ff=64)
  return types.SimpleNamespace(family=family_lib.LM, model_config=config,
                               params=model_lib.init_params(config, 3))


def _logprob(ckpt, prompt_tokens, target_tokens) -> float:
  ex = data_lib.query_example(prompt_tokens, target_tokens, ckpt.model_config.max_len)
  return float(model_lib.target_logprob(ckpt.model_config, ckpt.params, ex))


def test_predictions_carry_their_probability_and_the_targets(tiny_ckpt):
  vocab = data_lib.make_vocabulary("byte")
  queries = [{"id": "a", "prompt": "Ada was born in", "target": " Lon"},
             {"id": "b", "prompt": "x" * 30, "target": " q"},  # prompt cut
             {"id": "c", "prompt": "", "target": "z"}]
  examples = data_lib.query_examples(queries, vocab, tiny_ckpt.model_config.max_len)
  preds = pipeline.predictions(tiny_ckpt, examples, queries, vocab, batch_size=2)
  greedy = np.asarray(model_lib.greedy_decode(tiny_ckpt.model_config, tiny_ckpt.params,
                                              examples, 4))
  for q, pred, row in zip(queries, preds, greedy):
    n = len(vocab.encode(q["target"]))
    tokens = [int(t) for t in row[:n]]
    assert isinstance(pred, str) and pred == vocab.decode(tokens)
    prompt = vocab.encode(q["prompt"])
    assert pred.target_probability == pytest.approx(
        np.exp(_logprob(tiny_ckpt, prompt, vocab.encode(q["target"]))), rel=1e-4)
    assert pred.probability == pytest.approx(
        np.exp(_logprob(tiny_ckpt, prompt, tokens)), rel=1e-4)
    assert 0 < pred.target_probability < 1 and 0 < pred.probability < 1
  # One token: the greedy token is the likeliest, so never less likely.
  assert preds[1].probability >= preds[1].target_probability
  assert preds[2].probability >= preds[2].target_probability
  # Decoding compiles once per shape, not once per call (serve calls it for
  # every batch of requests).
  compiled = pipeline._greedy_decode._cache_size()
  again = pipeline.predictions(tiny_ckpt, examples, queries, vocab, batch_size=2)
  assert again == preds and pipeline._greedy_decode._cache_size() == compiled


@pytest.mark.parametrize("data,model", [(8, 1), (2, 4)])
def test_predictions_split_queries_over_the_data_axis(tiny_ckpt, data, model,
                                                       monkeypatch):
  """On a mesh, each decode and probability call gets its queries split over
  ``data`` (padded to a multiple of it), params split over ``model``, and the
  predictions equal those made with no mesh."""
  mesh = partitioning.make_mesh(data=data, model=model)
  ckpt = types.SimpleNamespace(**{**vars(tiny_ckpt), "params": partitioning.place(
      tiny_ckpt.params, partitioning.param_shardings(mesh, tiny_ckpt.params))})
  vocab = data_lib.make_vocabulary("byte")
  queries = [{"id": str(i), "prompt": "Ada was born in" + "x" * i, "target": " Lon"}
             for i in range(5)]
  examples = data_lib.query_examples(queries, vocab, tiny_ckpt.model_config.max_len)
  seen = []
  for name in ("_greedy_decode", "_target_logprobs"):
    def spy(family, config, params, batch, *static, fn=getattr(pipeline, name)):
      seen.append(batch["inputs"])
      return fn(family, config, params, batch, *static)
    monkeypatch.setattr(pipeline, name, spy)
  preds = pipeline.predictions(ckpt, examples, queries, vocab, batch_size=3, mesh=mesh)
  monkeypatch.undo()
  assert preds == pipeline.predictions(tiny_ckpt, examples, queries, vocab,
                                       batch_size=3)
  assert [p.probability for p in preds] == pytest.approx(
      [p.probability for p in pipeline.predictions(tiny_ckpt, examples, queries,
                                                   vocab, batch_size=3)], rel=1e-5)
  # Batches of 3 and 2 queries, each decoded and scored twice.
  padded = [partitioning.padded_size(n, data) for n in (3, 2)]
  assert [len(inputs) for inputs in seen] == padded * 3
  for inputs in seen:
    assert inputs.sharding.is_equivalent_to(partitioning.data_batch(mesh), inputs.ndim)


def test_decode_reads_only_the_prompts_ends():
  weights = np.zeros((2, 128), np.float32)
  weights[0, 3:5] = weights[1, 5:9] = 1       # prompts of 3 and 5 tokens
  assert pipeline.decode_length(weights, 4) == 16      # 5 + 4 positions, 2^k
  assert pipeline.decode_length(weights, 11) == 32     # 16 positions
  assert pipeline.decode_length(weights, 200) == 128   # never past L
  assert pipeline.decode_length(np.zeros((1, 8), np.float32), 1) == 2


def test_prediction_is_a_plain_string_in_json_and_results():
  pred = pipeline.Prediction(" Paris", 0.5, 0.25)
  assert json.dumps({"p": pred}) == '{"p": " Paris"}'
  assert pred == " Paris" and repr(pred) == "' Paris'"
  row = _rows(_demo_queries())[0]
  assert type(row["prediction"]) is str and type(row["temperature_samples"][0]) is str


# --- their query records, as our queries -----------------------------------------

# Shaped after their README: a results file's query fields ("TDA method
# results") and a T-REx prompt set's record ("Evaluation queries").
THEIR_RESULT_QUERY = {
    "example_id": "trex_42", "query_set": "trex", "fact_id": 42,
    "inputs_plaintext": "The capital of France is", "targets_plaintext": "Paris",
    "relation": "capital", "8b_confidence": 0.9, "c4_frequency_bucket": 5,
    "proponents": ["Paris is the capital of France."], "proponent_ids": ["s1"],
    "proponent_scores": [0.7], "proponent_correct": [True],
    "proponent_ais_scores": [0.9], "opponents": ["x"], "opponent_ids": ["s2"],
    "opponent_scores": [-0.2]}
THEIR_PROMPT_SET_RECORD = {
    "fact_id": "f-7", "kilt_id": "k-7", "entity0": "France", "relation": "capital",
    "entity1": "Paris", "entity0_uri": "Q142", "predicate_uri": "P36",
    "entity1_uri": "Q90", "entity0_alias": ["French Republic"],
    "entity1_alias": ["City of Light"], "trex_sentences": ["s1"],
    "c4_frequency": 1200, "is_repetition": False,
    "prompt0": "The capital of France is", "prompt1": "France's capital:",
    "prompt2": "Capital of France ="}


def test_their_results_file_records_read_as_queries(tmp_path):
  second = dict(THEIR_RESULT_QUERY, example_id=17, inputs_plaintext="Rome is in",
                targets_plaintext="Italy")
  queries = data_lib.read_queries(_write(tmp_path, [THEIR_RESULT_QUERY, second]))
  a, b = queries
  assert (a["id"], a["prompt"], a["target"]) == ("trex_42", "The capital of France is",
                                                 "Paris")
  assert b["id"] == "17"  # an integer id, as a string
  for name in ("example_id", "inputs_plaintext", "targets_plaintext"):
    assert name not in a, name  # written back from id, prompt, target
  # Their run's outputs are not ours: dropped, never shown beside our proponents.
  assert not [k for k in a if k.startswith(("proponent", "opponent"))]
  for name in ("query_set", "fact_id", "relation", "8b_confidence",
               "c4_frequency_bucket"):
    assert a[name] == THEIR_RESULT_QUERY[name], name


def test_their_prompt_set_reads_as_queries_and_everything_passes_through(tmp_path):
  [q] = data_lib.read_queries(_write(tmp_path, [THEIR_PROMPT_SET_RECORD]))
  assert (q["id"], q["prompt"], q["target"]) == ("f-7", "The capital of France is",
                                                 "Paris")
  assert {k: v for k, v in q.items() if k not in ("id", "prompt", "target")} == (
      THEIR_PROMPT_SET_RECORD)
  row = evaluate.make_result_row(q, ["s1"], [1.0], ["text"])
  assert (row["example_id"], row["inputs_plaintext"], row["targets_plaintext"]) == (
      "f-7", "The capital of France is", "Paris")
  for key, value in THEIR_PROMPT_SET_RECORD.items():
    assert row[key] == value, key
  assert viewer_problems(row) == []
  vocab = data_lib.make_vocabulary("byte")
  ex = data_lib.query_examples([q], vocab, 64)
  assert ex["weights"].sum() == len(vocab.encode("Paris"))


def test_their_results_query_round_trips_its_names(tmp_path):
  [q] = data_lib.read_queries(_write(tmp_path, [THEIR_RESULT_QUERY]))
  row = evaluate.make_result_row(q, ["c4-1"], [0.3], ["Paris."])
  for name in ("example_id", "inputs_plaintext", "targets_plaintext", "fact_id",
               "relation", "query_set"):
    assert row[name] == THEIR_RESULT_QUERY[name], name
  assert row["proponent_ids"] == ["c4-1"] and "proponent_ais_scores" not in row


def test_their_results_are_evaluated(tmp_path):
  """Their results file as --results (before 2026-12-04: "missing field
  'query_id'"): each line's id taken as their queries' is, so the same file
  with fact_doc_ids added is the queries file too."""
  second = dict(THEIR_RESULT_QUERY, example_id=17, proponent_ids=["s9", "s1"],
                proponent_scores=[0.5, 0.4], proponents=["a", "b"],
                proponent_correct=[False, True])
  results = _write(tmp_path, [THEIR_RESULT_QUERY, second], "theirs.jsonl")
  assert list(evaluate.read_results(results)) == ["trex_42", "17"]
  queries = _write(tmp_path, [dict(r, fact_doc_ids=["s1"])
                              for r in (THEIR_RESULT_QUERY, second)], "q.jsonl")
  metrics = evaluate.retrieval_metrics(data_lib.read_queries(queries),
                                       evaluate.read_results(results))
  assert metrics["mrr"] == pytest.approx((1 + 1 / 2) / 2)
  # As `tracer evaluate` reads them, the one file as both (before 2026-12-05
  # its queries were read in tracer's format only: "missing field 'id'").
  assert launch_evaluate.run(queries, [queries])["q"]["mrr"] == metrics["mrr"]
  both = _write(tmp_path, [THEIR_RESULT_QUERY, dict(second, example_id="trex_42")],
                "twice.jsonl")
  with pytest.raises(InputError, match="twice.jsonl:2: duplicate query_id 'trex_42'"):
    evaluate.read_results(both)


@pytest.mark.parametrize("records,lineno,message", [
    ([{"id": "q", "prompt": "p", "target": " t"}, THEIR_PROMPT_SET_RECORD], 2,
     "a query in the TrackStar authors' format .*, but .*:1 is in tracer's format "
     r"\(id, prompt, target\); expected one format per file"),
    ([THEIR_RESULT_QUERY, {"id": "q", "prompt": "p", "target": " t"}], 2,
     "a query in tracer's format .*, but .*:1 is in the TrackStar authors' format"),
    ([{k: v for k, v in THEIR_PROMPT_SET_RECORD.items() if k != "entity1"}], 1,
     "missing field 'targets_plaintext'; a query in the TrackStar authors' format "
     "needs one of 'targets_plaintext', 'entity1'"),
    # A line of an authors' file without its prompt (before 2026-12-05: "a
    # query in tracer's format, but ...:1 is in the TrackStar authors'").
    ([THEIR_RESULT_QUERY, {k: v for k, v in THEIR_RESULT_QUERY.items()
                           if k != "inputs_plaintext"}], 2,
     "missing field 'inputs_plaintext'; a query in the TrackStar authors' format "
     "needs one of 'inputs_plaintext', 'prompt0'"),
    ([{"id": "q", "prompt": "p", "target": " t"}, {"id": "r", "target": " t"}], 2,
     "missing field 'prompt'"),
    ([{"inputs_plaintext": "p", "targets_plaintext": "t"}], 1,
     "missing field 'example_id'; .* needs one of 'example_id', 'fact_id', 'trex_id'"),
    ([dict(THEIR_RESULT_QUERY, inputs_plaintext=["p"])], 1,
     "field 'inputs_plaintext' must be a string, got list"),
    ([dict(THEIR_RESULT_QUERY, targets_plaintext="  ")], 1,
     "field 'targets_plaintext' is empty or only whitespace"),
    ([dict(THEIR_RESULT_QUERY, example_id=True)], 1,
     "field 'example_id' must be a string, got bool"),
    ([THEIR_RESULT_QUERY, THEIR_RESULT_QUERY], 2, "duplicate id 'trex_42'"),
    ([{"id": "q", "prompt": "p", "target": " t", "example_id": "x"}], 1,
     "field 'example_id' is one tracer writes into results"),
    ([{"id": "q", "prompt": "p", "target": " t", "proponent_ids": []}], 1,
     "field 'proponent_ids' is one tracer writes into results"),
    # Before 2026-12-08 read: the trace summary's "all" row was this bucket's,
    # accuracy counted its queries twice, and tracer quality failed at its
    # page, after all its work.
    ([{"id": "q", "prompt": "p", "target": " t", "bucket": "all"}], 1,
     "field 'bucket' is 'all', the name of the summary over every bucket"),
])
def test_bad_query_files_name_file_line_and_field(tmp_path, records, lineno, message):
  path = _write(tmp_path, records)
  with pytest.raises(InputError, match=f"^{re.escape(path)}:{lineno}: {message}"):
    data_lib.read_queries(path)


# --- both ways through our viewer ------------------------------------------------


def test_our_viewer_reads_our_new_fields_once():
  a, b, c = (viewer.normalize_record(r) for r in _rows(_demo_queries(),
                                                       skipped={2: "x"}))
  for name in ("example_id", "inputs_plaintext", "targets_plaintext",
               "model_confidence", "temperature_samples"):
    assert name not in a and name not in b, name  # copies of ours: not extras
  assert a["opponent_correct"] == [False, False, True]
  assert b["target_probability"] == 0.125 and b["prediction_probability"] == 0.5
  assert viewer.normalize_record(b) == b  # normalized once is normalized
  data = json.loads(re.search(r'id="tracer-data">(.*?)</script>',
                              viewer.render({"m": [a, b, c]}), re.S).group(1))
  q = data["queries"][1]
  assert (q["tp"], q["pp"], q["x"]) == (0.125, 0.5, {"relation": "food"})
  assert [o[3] for o in data["runs"][0][0]["o"]] == [0, 0, 1]


def test_opponent_marks_alone_mark_opponents():
  rec = {"query_id": "q", "proponent_ids": ["a"], "proponent_scores": [1.0],
         "opponent_ids": ["b", "c"], "opponent_scores": [-1.0, -0.5],
         "opponent_correct": [False, True]}
  data = json.loads(re.search(r'id="tracer-data">(.*?)</script>',
                              viewer.render({"m": [rec]}), re.S).group(1))
  assert [o[3] for o in data["runs"][0][0]["o"]] == [0, 1]
  with pytest.raises(InputError, match="field 'opponent_correct' has 1 entries but "
                     "'opponent_ids' has 2"):
    viewer.normalize_record(dict(rec, opponent_correct=[True]))
  with pytest.raises(InputError, match="field 'opponent_correct' must be a list of "
                     "true/false"):
    viewer.normalize_record(dict(rec, opponent_correct=[1, 0]))
  with pytest.raises(InputError, match="field 'target_probability' must be a number"):
    viewer.normalize_record(dict(rec, target_probability="0.5"))


# One record of each kind their README lists, in their names (older names too).
THEIR_RESULTS = [
    # Table 1: T-REx facts, retrievals from T-REx sentences.
    {"example_id": "trex_1", "query_set": "trex", "fact_id": "f1",
     "inputs_plaintext": "The capital of France is", "targets_plaintext": "Paris",
     "relation": "P36", "8b_generations": ["Paris", "Lyon"], "8b_confidence": 0.5,
     "c4_frequency": 120, "c4_frequency_bucket": 3, "has_trex_sentence": True,
     "proponents": ["Paris is the capital of France.", "Lyon."],
     "proponent_ids": ["s1", "s2"], "proponent_scores": [0.8, 0.1],
     "proponent_correct": [True, False], "opponents": ["Berlin."],
     "opponent_ids": ["s9"], "opponent_scores": [-0.3]},
    # Table 2: from C4, AIS scores instead of marks; BM25 (no opponents).
    {"example_id": "trex_2", "query_set": "trex", "inputs_plaintext": "Rome is in",
     "targets_plaintext": "Italy", "proponents": ["Rome, Italy."],
     "proponent_ids": ["c4-1"], "proponent_scores": [12.5],
     "proponent_ais_scores": [0.97]},
    # A.5: incorrect predictions (groundtruth) and another task.
    {"example_id": "trex_3", "inputs_plaintext": "Bonn is in",
     "targets_plaintext": "France", "groundtruth": "Germany", "is_8b_correct": False,
     "proponents": ["x"], "proponent_ids": ["c4-2"], "proponent_scores": [0.2],
     "opponents": ["y"], "opponent_ids": ["c4-3"], "opponent_scores": [-0.2]},
    {"example_id": "copa_4", "task": "copa", "inputs_plaintext": "The man fell.",
     "targets_plaintext": "He slipped.", "is_8b_correct": True,
     "proponents": ["z"], "proponent_ids": ["c4-4"], "proponent_scores": [0.4]},
    # Older files: trex_id and the older field names.
    {"trex_id": 5, "inputs_plaintext": "Oslo is in", "targets_plaintext": "Norway",
     "temperature_samples": ["Norway"], "model_confidence": 1.0,
     "frequency_bucket": 2, "fact_frequency": 40, "ground_truth": "Norway",
     "proponents": ["w"], "proponent_ids": ["c4-5"], "proponent_scores": [0.5]},
]


def test_our_viewer_reads_each_kind_of_their_results(tmp_path):
  path = _write(tmp_path, THEIR_RESULTS, "theirs.jsonl")
  recs = viewer.read_results(path)
  assert [r["query_id"] for r in recs] == ["trex_1", "trex_2", "trex_3", "copa_4", "5"]
  assert [r.get("bucket") for r in recs] == ["3", None, None, None, "2"]
  assert [r.get("prediction_correct") for r in recs] == [None, None, False, True, None]
  assert recs[0]["proponent_correct"] == [True, False]
  # Their model's outputs are theirs, kept as extras (not our probabilities).
  assert recs[4]["model_confidence"] == 1.0 and "target_probability" not in recs[4]
  assert recs[4]["temperature_samples"] == ["Norway"]
  stats = viewer.summary({"theirs": recs})["theirs"]["all"]
  assert stats["num_ground_truth"] == 1 and stats["mrr"] == 1.0
  page = viewer.render({"theirs": recs})
  assert "Paris is the capital of France." in page
