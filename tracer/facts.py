"""A seeded generator of invented facts for fact-tracing evaluation.

The corpus states made-up facts (subject, relation, object) about invented
people, so a tiny model can only know them from its training data and every
document that states a fact is known exactly. Queries are balanced over
frequency buckets (how many documents state the fact), as in TrackStar's fact
tracing protocol.

Names are built from syllables and registered globally: every subject word
appears in no other name and in no template, so "does this document mention
the subject" is a plain word match.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import random
import re
from typing import Iterable, Mapping, Sequence

from tracer import errors
from tracer import storage

# (name, min documents, max documents) per frequency bucket.
DEFAULT_BUCKETS: tuple[tuple[str, int, int], ...] = (
    ("1", 1, 1),
    ("2-3", 2, 3),
    ("4-10", 4, 10),
    ("11+", 11, 20),
)


@dataclasses.dataclass(frozen=True)
class FactsConfig:
  """Settings of the generated fact corpus.

  Attributes:
    seed: seeds every random choice; same config, same corpus.
    facts_per_bucket: query facts per frequency bucket (one query each).
    distractor_docs: documents holding only filler sentences.
    buckets: (name, min, max) documents stating each fact of the bucket.
    objects_per_relation: size of each relation's pool of invented objects.
    max_filler_per_fact_doc: filler sentences added around a fact, at most.
    max_doc_chars: hard limit on a document's length (tiny byte models).
  """
  seed: int = 0
  facts_per_bucket: int = 60
  distractor_docs: int = 150
  buckets: tuple[tuple[str, int, int], ...] = DEFAULT_BUCKETS
  objects_per_relation: int = 16
  max_filler_per_fact_doc: int = 2
  max_doc_chars: int = 120

  def __post_init__(self):
    where = "FactsConfig"
    if self.facts_per_bucket < 1:
      raise errors.InputError(
          f"{where}.facts_per_bucket: must be >= 1, got {self.facts_per_bucket}")
    if self.distractor_docs < 0:
      raise errors.InputError(
          f"{where}.distractor_docs: must be >= 0, got {self.distractor_docs}")
    if not 2 <= self.objects_per_relation <= 64:
      raise errors.InputError(
          f"{where}.objects_per_relation: must be in [2, 64], "
          f"got {self.objects_per_relation}")
    if self.max_filler_per_fact_doc < 0:
      raise errors.InputError(
          f"{where}.max_filler_per_fact_doc: must be >= 0, "
          f"got {self.max_filler_per_fact_doc}")
    if self.max_doc_chars < 80:
      raise errors.InputError(
          f"{where}.max_doc_chars: must be >= 80, got {self.max_doc_chars}")
    if not self.buckets:
      raise errors.InputError(f"{where}.buckets: must not be empty")
    names = [b[0] for b in self.buckets]
    if len(set(names)) != len(names):
      raise errors.InputError(f"{where}.buckets: duplicate names {names}")
    for name, lo, hi in self.buckets:
      if not 1 <= lo <= hi:
        raise errors.InputError(
            f"{where}.buckets[{name!r}]: need 1 <= min <= max, got {lo}, {hi}")


@dataclasses.dataclass(frozen=True)
class Relation:
  """A relation: its statement templates and the query prompt.

  `templates[0]` begins with `prompt` followed by " {o}", so greedy decoding
  of the prompt can complete a memorized fact.
  """
  name: str
  prompt: str
  templates: tuple[str, ...]


RELATIONS: tuple[Relation, ...] = (
    Relation("born_in", "{s} was born in", (
        "{s} was born in {o}.",
        "The birthplace of {s} is {o}.",
        "{s}, a native of {o}, rarely travels.",
        "{o} is the town where {s} was born.",
    )),
    Relation("profession", "{s} works as a", (
        "{s} works as a {o}.",
        "By trade, {s} is a {o}.",
        "{s} earns a living as a {o}.",
        "The profession of {s} is {o}.",
    )),
    Relation("language", "{s} speaks", (
        "{s} speaks {o}.",
        "The native language of {s} is {o}.",
        "{s} grew up speaking {o} at home.",
    )),
    Relation("colour", "{s}'s favourite colour is", (
        "{s}'s favourite colour is {o}.",
        "The colour {s} likes best is {o}.",
        "{s} always wears {o}, a favourite colour.",
    )),
    Relation("instrument", "{s} plays the", (
        "{s} plays the {o}.",
        "The instrument of {s} is the {o}.",
        "Every evening {s} practises the {o}.",
    )),
    Relation("employer", "{s} is employed by", (
        "{s} is employed by {o}.",
        "{o} employs {s}.",
        "{s} has worked at {o} for years.",
    )),
    Relation("river", "{s} lives near the", (
        "{s} lives near the {o} river.",
        "The home of {s} lies by the {o} river.",
        "{s} walks along the {o} river each morning.",
    )),
    Relation("food", "{s} loves to eat", (
        "{s} loves to eat {o}.",
        "The favourite dish of {s} is {o}.",
        "{s} cooks {o} every Sunday.",
    )),
    Relation("pet", "{s} owns a pet", (
        "{s} owns a pet {o}.",
        "The pet of {s} is a {o}.",
        "{s} takes a pet {o} on long walks.",
    )),
    Relation("school", "{s} graduated from", (
        "{s} graduated from {o}.",
        "{s} holds a degree from {o}.",
        "{s} studied for four years at {o}.",
    )),
)

# Generic filler: never about people, so never about a query subject. {t} is
# an invented town from a pool disjoint from all subjects and objects.
FILLER: tuple[str, ...] = (
    "Rain fell over {t} for three days.",
    "Prices at the {t} market rose again.",
    "The road to {t} was closed for repairs.",
    "A cold wind blew through {t} at dawn.",
    "Fishing boats left the {t} harbour early.",
    "The {t} fair opens in the spring.",
    "Snow covered the hills above {t}.",
    "Bread is cheap in {t} this season.",
    "The old bridge at {t} needs new stones.",
    "Few trains stop at {t} on Sundays.",
    "Farmers near {t} expect a good harvest.",
    "The {t} library added a reading room.",
    "Fog hid the towers of {t} all morning.",
    "Wool from {t} sold well this year.",
    "The clock in {t} square runs slow.",
    "Storms are common near {t} in autumn.",
)

_ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "k", "kr", "l", "m", "n", "p",
           "r", "s", "st", "t", "tr", "v", "z", "th", "sk", "h", "j")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ae", "ei")
_CODAS = ("", "", "", "l", "n", "r", "s", "k", "m", "sk", "rn", "th", "lt")

_FILLER_TOWNS = 24
# Endings that mostly make real English words ("hope", "maker", "brother").
_ENGLISH_LOOKING = re.compile(r"(?:^[^aeiou]*[aeiou][^aeiou]e|er)$")
_WORD = re.compile(r"[A-Za-z']+")


def _template_vocabulary() -> set[str]:
  """Lowercased words of all templates, which invented names must avoid."""
  text = " ".join(
      [t for r in RELATIONS for t in r.templates]
      + [r.prompt for r in RELATIONS] + list(FILLER))
  return {w.lower().strip("'") for w in _WORD.findall(text)}


class _Names:
  """Draws pronounceable invented words, each at most once."""

  def __init__(self, rng: random.Random):
    self._rng = rng
    self._used = _template_vocabulary() | {"s", "o", "t"}

  def _syllable(self, after_coda: bool) -> str:
    onset = self._rng.choice(_ONSETS)
    # A bare vowel only after a consonant: avoids clusters like "aeo".
    if after_coda and self._rng.random() < 0.3:
      onset = ""
    coda = self._rng.choice(_CODAS)
    return onset + self._rng.choice(_VOWELS) + coda

  def word(self, min_len: int = 5, max_len: int = 8) -> str:
    for _ in range(10_000):
      n = 2 if self._rng.random() < 0.7 else 3
      w = ""
      for _ in range(n):
        w += self._syllable(after_coda=w[-1:] not in ("", *"aeiou"))
      if (min_len <= len(w) <= max_len and w not in self._used
          and not _ENGLISH_LOOKING.search(w)):
        self._used.add(w)
        return w.capitalize()
    raise RuntimeError("ran out of invented names")  # Not reachable in practice.


def generate(config: FactsConfig = FactsConfig()
            ) -> tuple[list[dict], list[dict]]:
  """Generates (corpus records, query records) for `config`.

  Corpus records are ``{"id", "text"}``; query records hold ``id``,
  ``prompt``, ``target`` (the object after a space), ``fact_doc_ids`` (the
  documents stating the fact), ``bucket``, ``relation``, ``subject`` and
  ``object``. Pure: the same config always gives the same records.
  """
  rng = random.Random(config.seed)
  names = _Names(rng)
  pools = {r.name: [names.word() for _ in range(config.objects_per_relation)]
           for r in RELATIONS}
  towns = [names.word() for _ in range(_FILLER_TOWNS)]
  limit = config.max_doc_chars
  seen_texts: set[str] = set()

  def filler() -> str:
    return rng.choice(FILLER).format(t=rng.choice(towns))

  def unique(make) -> str:
    # Distinct texts keep "stated in n documents" literal; retry on clashes.
    for _ in range(1000):
      text = make()
      if text not in seen_texts:
        seen_texts.add(text)
        return text
    raise errors.InputError(
        "FactsConfig: too few distinct documents possible; lower the "
        "document counts or raise max_doc_chars")

  def fact_doc(statement: str) -> str:
    parts = [statement]
    for _ in range(rng.randint(0, config.max_filler_per_fact_doc)):
      extra = filler()
      if len(" ".join(parts)) + 1 + len(extra) <= limit:
        parts.insert(rng.randint(0, len(parts)), extra)
    return " ".join(parts)

  def filler_doc() -> str:
    parts = [filler()]
    for _ in range(rng.randint(0, 2)):
      extra = filler()
      if len(" ".join(parts)) + 1 + len(extra) <= limit:
        parts.append(extra)
    return " ".join(parts)

  # (text, query index or None) before the shuffle assigns ids.
  docs: list[tuple[str, int | None]] = []
  queries: list[dict] = []
  for bucket, lo, hi in config.buckets:
    # Balanced relations within each bucket, in random order.
    relations = [RELATIONS[i % len(RELATIONS)]
                 for i in range(config.facts_per_bucket)]
    rng.shuffle(relations)
    for relation in relations:
      subject = f"{names.word()} {names.word(5, 9)}"
      obj = rng.choice(pools[relation.name])
      n_docs = rng.randint(lo, hi)
      # The first document uses the prompt's template, so every fact can be
      # completed by greedy decoding once memorized; the rest vary.
      template_ids = [0] + [rng.randrange(len(relation.templates))
                            for _ in range(n_docs - 1)]
      q = len(queries)
      for t in template_ids:
        statement = relation.templates[t].format(s=subject, o=obj)
        docs.append((unique(lambda st=statement: fact_doc(st)), q))
      queries.append({
          "prompt": relation.prompt.format(s=subject),
          "target": " " + obj,
          "fact_doc_ids": [],
          "bucket": bucket,
          "relation": relation.name,
          "subject": subject,
          "object": obj,
      })
  for _ in range(config.distractor_docs):
    docs.append((unique(filler_doc), None))

  rng.shuffle(docs)
  doc_width = max(5, len(str(len(docs) - 1)))
  q_width = max(3, len(str(len(queries) - 1)))
  corpus = []
  for i, (text, q) in enumerate(docs):
    assert len(text) <= limit, (len(text), text)
    doc_id = f"doc-{i:0{doc_width}d}"
    corpus.append({"id": doc_id, "text": text})
    if q is not None:
      queries[q]["fact_doc_ids"].append(doc_id)
  queries = [{"id": f"q-{i:0{q_width}d}", **q} for i, q in enumerate(queries)]
  return corpus, queries


def write_jsonl(path: str | os.PathLike,
                records: Iterable[Mapping]) -> pathlib.Path:
  """Writes one JSON object per line, in one atomic write
  (``tracer.storage.write_text``: a temporary file, fsynced, renamed over
  ``path``, the directory fsynced); missing parent directories are made."""
  path = pathlib.Path(path)
  text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
  storage.write_text(os.fspath(path), text)
  return path


def write_fact_corpus(out_dir: str | os.PathLike,
                      config: FactsConfig = FactsConfig()
                     ) -> tuple[pathlib.Path, pathlib.Path]:
  """Writes ``out_dir/corpus.jsonl`` and ``out_dir/queries.jsonl``."""
  corpus, queries = generate(config)
  out_dir = pathlib.Path(out_dir)
  return (write_jsonl(out_dir / "corpus.jsonl", corpus),
          write_jsonl(out_dir / "queries.jsonl", queries))


def bucket_counts(queries: Sequence[Mapping]) -> dict[str, int]:
  """Queries per bucket, in first-seen order."""
  counts: dict[str, int] = {}
  for q in queries:
    counts[q["bucket"]] = counts.get(q["bucket"], 0) + 1
  return counts
