"""Tests of the generated fact corpus."""

from __future__ import annotations

import collections
import hashlib
import json
import re

from absl import flags
from absl.testing import flagsaver
import pytest

from tracer import errors
from tracer import facts
from tracer import storage

_WORD = re.compile(r"[A-Za-z]+")


@pytest.fixture(scope="module")
def default():
  return facts.generate(facts.FactsConfig())


def _words(text):
  return set(_WORD.findall(text))


def _read_jsonl(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_same_seed_same_files_other_seed_other_files(tmp_path):
  config = facts.FactsConfig(seed=3, facts_per_bucket=10, distractor_docs=20)
  a = facts.write_fact_corpus(tmp_path / "a", config)
  b = facts.write_fact_corpus(tmp_path / "b", config)
  c = facts.write_fact_corpus(
      tmp_path / "c", facts.FactsConfig(seed=4, facts_per_bucket=10,
                                        distractor_docs=20))
  for pa, pb, pc in zip(a, b, c):
    assert pa.read_bytes() == pb.read_bytes()
    assert pa.read_bytes() != pc.read_bytes()
  assert [p.name for p in a] == ["corpus.jsonl", "queries.jsonl"]
  assert (_read_jsonl(a[0]), _read_jsonl(a[1])) == facts.generate(config)
  # Atomic writes leave no temporary files behind.
  assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
      "corpus.jsonl", "queries.jsonl"]


def test_default_sizes(default):
  corpus, queries = default
  config = facts.FactsConfig()
  assert len(queries) == 4 * config.facts_per_bucket
  assert facts.bucket_counts(queries) == {
      name: config.facts_per_bucket for name, _, _ in facts.DEFAULT_BUCKETS}
  n_fact_docs = sum(len(q["fact_doc_ids"]) for q in queries)
  assert len(corpus) == n_fact_docs + config.distractor_docs


def test_ids_unique_and_stable_format(default):
  corpus, queries = default
  doc_ids = [d["id"] for d in corpus]
  assert len(set(doc_ids)) == len(doc_ids)
  assert doc_ids == [f"doc-{i:05d}" for i in range(len(corpus))]
  assert [q["id"] for q in queries] == [
      f"q-{i:03d}" for i in range(len(queries))]
  assert len({q["subject"] for q in queries}) == len(queries)
  # Every document states at most one query fact, and texts never repeat.
  cited = [d for q in queries for d in q["fact_doc_ids"]]
  assert len(set(cited)) == len(cited)
  assert set(cited) <= set(doc_ids)
  texts = [d["text"] for d in corpus]
  assert len(set(texts)) == len(texts)


def test_documents_are_short(default):
  corpus, _ = default
  assert max(len(d["text"]) for d in corpus) <= 120
  assert all(d["text"] and d["text"].isascii() for d in corpus)


def test_fact_docs_state_the_fact_and_only_it(default):
  corpus, queries = default
  text = {d["id"]: d["text"] for d in corpus}
  subject_words = {w: q["id"] for q in queries for w in q["subject"].split()}
  for q in queries:
    for doc_id in q["fact_doc_ids"]:
      t = text[doc_id]
      assert q["subject"] in t and q["object"] in t, (q, t)
      # No other query's subject appears in this document.
      owners = {subject_words[w] for w in _words(t) if w in subject_words}
      assert owners == {q["id"]}, (q["id"], t)


def test_bucket_counts_within_range(default):
  _, queries = default
  ranges = {name: (lo, hi) for name, lo, hi in facts.DEFAULT_BUCKETS}
  assert ranges["11+"] == (11, 20)
  for q in queries:
    lo, hi = ranges[q["bucket"]]
    assert lo <= len(q["fact_doc_ids"]) <= hi, q


def test_distractors_never_mention_a_subject(default):
  corpus, queries = default
  subject_words = {w for q in queries for w in q["subject"].split()}
  cited = {d for q in queries for d in q["fact_doc_ids"]}
  distractors = [d for d in corpus if d["id"] not in cited]
  assert len(distractors) == facts.FactsConfig().distractor_docs
  for d in distractors:
    assert not _words(d["text"]) & subject_words, d
    assert not any(q["subject"] in d["text"] for q in queries), d


def test_subject_words_appear_nowhere_else(default):
  corpus, queries = default
  subject_words = {w for q in queries for w in q["subject"].split()}
  object_words = {q["object"] for q in queries}
  assert not subject_words & object_words
  template_words = {w.lower() for r in facts.RELATIONS
                    for t in r.templates for w in _WORD.findall(t)}
  assert not {w.lower() for w in subject_words} & template_words
  by_word = collections.defaultdict(set)
  for q in queries:
    for w in q["subject"].split():
      by_word[w].add(q["id"])
  assert all(len(ids) == 1 for ids in by_word.values())


def test_relations_and_templates():
  assert len(facts.RELATIONS) >= 8
  assert len({r.name for r in facts.RELATIONS}) == len(facts.RELATIONS)
  for r in facts.RELATIONS:
    assert len(r.templates) >= 3, r.name
    assert not r.prompt.endswith(" ")
    # Greedy decoding of the prompt can complete the canonical statement.
    assert r.templates[0].startswith(r.prompt + " {o}"), r.name
    for t in r.templates:
      assert "{s}" in t and "{o}" in t, t


def test_every_relation_in_every_bucket(default):
  _, queries = default
  seen = collections.defaultdict(set)
  for q in queries:
    seen[q["bucket"]].add(q["relation"])
  names = {r.name for r in facts.RELATIONS}
  assert all(rels == names for rels in seen.values())


def test_prompt_plus_target_is_stated_in_a_fact_doc(default):
  corpus, queries = default
  text = {d["id"]: d["text"] for d in corpus}
  for q in queries:
    assert q["target"] == " " + q["object"]
    assert q["prompt"] == q["prompt"].strip()
    completion = q["prompt"] + q["target"]
    # The completion starts a sentence: at the document start or after ". ".
    assert any(text[d].startswith(completion) or ". " + completion in text[d]
               for d in q["fact_doc_ids"]), q


def test_several_templates_in_frequent_facts(default):
  corpus, queries = default
  text = {d["id"]: d["text"] for d in corpus}
  frequent = [q for q in queries if q["bucket"] == "11+"]
  varied = 0
  for q in frequent:
    completion = q["prompt"] + q["target"]
    varied += any(completion not in text[d] for d in q["fact_doc_ids"])
  assert varied == len(frequent)


@pytest.mark.parametrize("field,value", [
    ("facts_per_bucket", 0),
    ("distractor_docs", -1),
    ("objects_per_relation", 1),
    ("max_doc_chars", 10),
    ("buckets", (("1", 2, 1),)),
    ("buckets", (("1", 1, 1), ("1", 2, 3))),
])
def test_bad_config_raises_input_error(field, value):
  with pytest.raises(errors.InputError, match=field):
    facts.FactsConfig(**{field: value})


def test_negative_seed_is_refused():
  """random.Random seeds by |seed|: before 2026-12-07 seed -1 (FactsConfig or
  ``tracer make-facts --seed=-1``) wrote seed 1's set."""
  from tracer.launch import make_facts  # pylint: disable=g-import-not-at-top
  with pytest.raises(errors.InputError, match=re.escape(
      "FactsConfig.seed: must be >= 0, got -1")):
    facts.FactsConfig(seed=-1)
  with flagsaver.flagsaver(), pytest.raises(
      flags.IllegalFlagValueError, match=re.escape("flag --seed=-1: ")):
    flags.FLAGS(["make_facts", "--out=o", "--seed=-1"])
  assert make_facts.main  # (its flags are defined)


def test_write_jsonl_round_trip(tmp_path):
  records = [{"id": "x", "text": "a\nb"}, {"id": "y", "text": "é"}]
  path = facts.write_jsonl(tmp_path / "sub" / "r.jsonl", records)
  assert _read_jsonl(path) == records
  facts.write_jsonl(path, records[:1])  # Overwrites in place.
  assert _read_jsonl(path) == records[:1]
  assert [p.name for p in path.parent.iterdir()] == ["r.jsonl"]


@pytest.mark.parametrize("where", ["path", "file_url", "memory_url"])
def test_make_facts_main(tmp_path, capsys, monkeypatch, where):
  """--out may be a URL (before 2026-12-06 pathlib folded it: gs://b/facts,
  file:///x and memory://facts were written to ./gs:/b/facts, ./file:/x
  and ./memory:/facts)."""
  from tracer.launch import make_facts  # pylint: disable=g-import-not-at-top
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  out_dir = {"path": str(tmp_path / "facts"),
             "file_url": f"file://{tmp_path}/facts",
             "memory_url": f"memory://make-facts-{tmp_path.name}/facts"}[where]
  with flagsaver.flagsaver():
    argv = flags.FLAGS(["make_facts", f"--out={out_dir}", "--seed=1",
                        "--facts_per_bucket=5", "--distractor_docs=7"])
    make_facts.main(argv)
  out = capsys.readouterr().out
  assert "20" in out and "bucket   11+: 5 queries" in out
  assert f"corpus:    {out_dir}/corpus.jsonl" in out
  assert not list(cwd.iterdir())  # nothing under a folder named after a URL
  read = lambda name: [json.loads(line) for line in storage.read_text(
      storage.join(out_dir, name)).split("\n") if line]
  corpus, queries = read("corpus.jsonl"), read("queries.jsonl")
  if where != "memory_url":
    assert sorted(p.name for p in (tmp_path / "facts").iterdir()) == [
        "corpus.jsonl", "queries.jsonl"]
  assert len(queries) == 20
  assert len(corpus) == 7 + sum(len(q["fact_doc_ids"]) for q in queries)
  # A scheme tracer has no driver for is refused before any work.
  with pytest.raises(errors.InputError, match=re.escape(
      "gcs://b/facts: unknown URL scheme 'gcs://'; expected a local path")):
    facts.write_fact_corpus("gcs://b/facts")
  assert not list(cwd.iterdir())


# --- styles: the benchmark family --------------------------------------------

_STYLE_SETS = [(style, seed) for style in facts.STYLES for seed in (0, 1)]


@pytest.fixture(scope="module", params=_STYLE_SETS, ids=lambda p: f"{p[0]}-{p[1]}")
def styled(request):
  style, seed = request.param
  config = facts.style_config(style, seed, facts_per_bucket=20,
                              distractor_docs=40)
  return config, *facts.generate(config)


def _statements(query):
  relation = {r.name: r for r in facts.RELATIONS}[query["relation"]]
  return {t.format(s=query["subject"], o=query["object"])
          for t in relation.templates + relation.extra_templates}


def test_style_fact_doc_ids_are_exactly_the_rows_stating_the_fact(styled):
  config, corpus, queries = styled
  ids = [d["id"] for d in corpus]
  assert len(set(ids)) == len(ids)
  assert len({d["text"] for d in corpus}) == len(corpus)
  assert max(len(d["text"]) for d in corpus) <= config.max_doc_chars
  for q in queries:
    stating = [d["id"] for d in corpus
               if any(st in d["text"] for st in _statements(q))]
    assert sorted(q["fact_doc_ids"]) == sorted(stating), q


def test_style_ids_and_buckets(styled):
  config, corpus, queries = styled
  assert [q["id"] for q in queries] == [f"q-{i:03d}" for i in range(len(queries))]
  assert facts.bucket_counts(queries) == {
      name: config.facts_per_bucket for name, _, _ in config.buckets}
  ranges = {name: (lo, hi) for name, lo, hi in config.buckets}
  for q in queries:
    lo, hi = ranges[q["bucket"]]
    # A fact is stated once per document: its rows lie in distinct documents.
    documents = {d.rsplit("-", 1)[0] if config.doc_windows > 1 else d
                 for d in q["fact_doc_ids"]}
    assert lo <= len(documents) == len(q["fact_doc_ids"]) <= hi, q
    assert q["target"] == " " + q["object"]


def test_style_rows_and_windows(styled):
  config, corpus, _ = styled
  if config.doc_windows == 1:
    assert all(re.fullmatch(r"doc-\d{5}", d["id"]) for d in corpus)
    return
  windows = collections.defaultdict(list)
  for d in corpus:
    doc, j = re.fullmatch(r"(doc-\d{5})-(\d)", d["id"]).groups()
    windows[doc].append(int(j))
  # Rows of one document are consecutive windows 0, 1, ..., at most doc_windows.
  assert all(js == list(range(len(js))) and len(js) <= config.doc_windows
             for js in windows.values())
  assert max(len(js) for js in windows.values()) > 1


def test_paraphrase_prompts_appear_in_no_document(styled):
  config, corpus, queries = styled
  texts = [d["text"] for d in corpus]
  for q in queries:
    if config.prompt_style == "paraphrase":
      assert not any(q["prompt"] + q["target"] in t for t in texts), q
      assert not any(q["prompt"] in t for t in texts), q
    else:
      assert any(q["prompt"] + q["target"] in t for t in texts), q


def test_natural_filler_names_objects_outside_fact_rows():
  config = facts.style_config("natural", 2)
  corpus, queries = facts.generate(config)
  cited = {d for q in queries for d in q["fact_doc_ids"]}
  objects = {q["object"] for q in queries}
  subject_words = {w for q in queries for w in q["subject"].split()}
  distractors = [d["text"] for d in corpus if d["id"] not in cited]
  assert sum(bool(_words(t) & objects) for t in distractors) > 20
  assert not any(_words(t) & subject_words for t in distractors)
  # Four objects per relation: each object is shared by several subjects.
  assert len(objects) <= 4 * len(facts.RELATIONS)


def test_dense_documents_hold_several_facts_and_subjects_several_facts():
  config = facts.style_config("dense", 0)
  corpus, queries = facts.generate(config)
  per_doc = collections.Counter(
      d.rsplit("-", 1)[0] for q in queries for d in q["fact_doc_ids"])
  assert max(per_doc.values()) == config.facts_per_doc
  per_subject = collections.Counter(q["subject"] for q in queries)
  assert set(per_subject.values()) <= {1, 2} and 2 in per_subject.values()
  for subject in per_subject:
    relations = [q["relation"] for q in queries if q["subject"] == subject]
    assert len(set(relations)) == len(relations)


def test_plain_style_is_the_original_set():
  # The demo's figures in WORKSPACE.md were measured on this exact set.
  assert facts.generate(facts.style_config("plain", 0)) == facts.generate()
  digest = hashlib.sha256(json.dumps(facts.generate()).encode()).hexdigest()
  assert digest == "48414c0236020f2a5e21339c029445eb6c82a5a93f156fcd21bc2a8d45433c56"


@pytest.mark.parametrize("field,value", [
    ("prompt_style", "other"), ("filler", "x"), ("facts_per_doc", 0),
    ("doc_windows", 9), ("facts_per_subject", 11),
])
def test_bad_style_field_raises_input_error(field, value):
  with pytest.raises(errors.InputError, match=field):
    facts.FactsConfig(**{field: value})
  with pytest.raises(errors.InputError, match="fact style 'odd'"):
    facts.style_config("odd")


def test_make_facts_main_writes_a_style(tmp_path, capsys):
  from tracer.launch import make_facts  # pylint: disable=g-import-not-at-top
  with flagsaver.flagsaver():
    argv = flags.FLAGS(["make_facts", f"--out={tmp_path}", "--style=dense",
                        "--seed=2", "--facts_per_bucket=5", "--distractor_docs=7"])
    make_facts.main(argv)
  assert "style:     dense" in capsys.readouterr().out
  expected = facts.generate(facts.style_config("dense", 2, facts_per_bucket=5,
                                               distractor_docs=7))
  assert (_read_jsonl(tmp_path / "corpus.jsonl"),
          _read_jsonl(tmp_path / "queries.jsonl")) == expected


def test_a_trained_workdir_keeps_its_facts(tmp_path):
  """``tracer quality`` without --corpus on a workdir whose model exists (a
  ``tracer family`` set's, of other fact settings) scores that model on the
  facts beside it: before 2026-12-08 they were replaced by the demo's."""
  from tracer.launch import demo  # pylint: disable=g-import-not-at-top
  (tmp_path / "checkpoints" / "5").mkdir(parents=True)
  made = tmp_path / "facts"
  made.mkdir()
  (made / "corpus.jsonl").write_text('{"id": "d", "text": "mine"}\n')
  (made / "queries.jsonl").write_text('{"id": "q", "prompt": "p", "target": " t"}\n')
  assert demo.ensure_model(str(tmp_path)) == (str(made / "corpus.jsonl"),
                                              str(made / "queries.jsonl"))
  assert (made / "corpus.jsonl").read_text() == '{"id": "d", "text": "mine"}\n'
