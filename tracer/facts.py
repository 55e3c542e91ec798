"""A seeded generator of invented facts for fact-tracing evaluation.

The corpus states made-up facts (subject, relation, object) about invented
people, so a tiny model can only know them from its training data and every
document that states a fact is known exactly. Queries are balanced over
frequency buckets (how many documents state the fact), as in TrackStar's fact
tracing protocol.

Names are built from syllables and registered globally: every subject word
appears in no other name and in no template, so "does this document mention
the subject" is a plain word match.

Styles (``STYLES``, ``style_config``) change what makes attribution hard, so
defaults can be chosen on a family of sets rather than one:

  plain       one fact per short document, the query prompt is the first
              template's prefix (the original set; seed 0 is the demo's),
  paraphrase  each relation states facts with 5-6 templates chosen at random,
              and the query prompt is a paraphrase no document uses,
  natural     varied filler about invented bystanders that also names objects
              of the relations, 3 filler sentences a document, 4 objects per
              relation (each object shared by many subjects),
  dense       up to 3 facts per document, 2 facts per subject, documents up to
              3 windows long, each window its own corpus row
              (``doc-00012-1``): a fact's documents are the windows stating it.
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

# The most a generated set holds: its documents are made in memory (200,000
# distractor documents took 250 MB and 4 s here), and a flag past these grew
# without bound. 10,000 facts a bucket make about 360,000 documents.
MAX_DISTRACTOR_DOCS = 1_000_000
MAX_FACTS_PER_BUCKET = 10_000


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
    max_doc_chars: hard limit on a corpus row's length (tiny byte models).
    prompt_style: "template" (the query prompt is the first template's prefix
      and a fact's first document uses that template) or "paraphrase" (every
      document draws from all templates, the extra ones included; the prompt
      is a paraphrase found in no document).
    filler: "plain" (short sentences about invented towns) or "natural"
      (also sentences about invented bystanders, naming relation objects).
    facts_per_doc: at most this many facts stated in one document.
    facts_per_subject: facts (of different relations) about each subject.
    doc_windows: a document spans up to this many rows of ``max_doc_chars``;
      above 1 every row is a window ``{document id}-{j}``.
  """
  seed: int = 0
  facts_per_bucket: int = 60
  distractor_docs: int = 150
  buckets: tuple[tuple[str, int, int], ...] = DEFAULT_BUCKETS
  objects_per_relation: int = 16
  max_filler_per_fact_doc: int = 2
  max_doc_chars: int = 120
  prompt_style: str = "template"
  filler: str = "plain"
  facts_per_doc: int = 1
  facts_per_subject: int = 1
  doc_windows: int = 1

  def __post_init__(self):
    where = "FactsConfig"
    # random.Random seeds by |seed|: seed -1 would write seed 1's set.
    if self.seed < 0:
      raise errors.InputError(f"{where}.seed: must be >= 0, got {self.seed}")
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
    for field, allowed in (("prompt_style", ("template", "paraphrase")),
                           ("filler", ("plain", "natural"))):
      if getattr(self, field) not in allowed:
        raise errors.InputError(f"{where}.{field}: expected one of {allowed}, "
                                f"got {getattr(self, field)!r}")
    for field, hi in (("facts_per_doc", 5), ("facts_per_subject", 5),
                      ("doc_windows", 8)):
      if not 1 <= getattr(self, field) <= hi:
        raise errors.InputError(f"{where}.{field}: must be in [1, {hi}], "
                                f"got {getattr(self, field)}")
    if self.facts_per_subject > len(RELATIONS):
      raise errors.InputError(f"{where}.facts_per_subject: at most one fact per "
                              f"relation, so <= {len(RELATIONS)}")
    names = [b[0] for b in self.buckets]
    if len(set(names)) != len(names):
      raise errors.InputError(f"{where}.buckets: duplicate names {names}")
    for name, lo, hi in self.buckets:
      if not 1 <= lo <= hi:
        raise errors.InputError(
            f"{where}.buckets[{name!r}]: need 1 <= min <= max, got {lo}, {hi}")


@dataclasses.dataclass(frozen=True)
class Relation:
  """A relation: its statement templates and query prompts.

  `templates[0]` begins with `prompt` followed by " {o}", so greedy decoding
  of the prompt can complete a memorized fact. The "paraphrase" style also
  states facts with `extra_templates` and asks with one of `paraphrases`
  (each followed by " {o}"), which no document uses.
  """
  name: str
  prompt: str
  templates: tuple[str, ...]
  extra_templates: tuple[str, ...] = ()
  paraphrases: tuple[str, ...] = ()


RELATIONS: tuple[Relation, ...] = (
    Relation("born_in", "{s} was born in", (
        "{s} was born in {o}.",
        "The birthplace of {s} is {o}.",
        "{s}, a native of {o}, rarely travels.",
        "{o} is the town where {s} was born.",
    ), ("{s} spent a childhood in {o}.",
        "People in {o} remember {s} as a child."),
        ("{s} hails from", "The place {s} comes from is")),
    Relation("profession", "{s} works as a", (
        "{s} works as a {o}.",
        "By trade, {s} is a {o}.",
        "{s} earns a living as a {o}.",
        "The profession of {s} is {o}.",
    ), ("{s} trained for years to become a {o}.",
        "Ask anyone: {s} is a {o}."),
        ("{s} makes money as a", "The job of {s} is")),
    Relation("language", "{s} speaks", (
        "{s} speaks {o}.",
        "The native language of {s} is {o}.",
        "{s} grew up speaking {o} at home.",
    ), ("{s} writes letters in {o}.",
        "At home, {s} talks in {o}."),
        ("The mother tongue of {s} is", "{s} is fluent in")),
    Relation("colour", "{s}'s favourite colour is", (
        "{s}'s favourite colour is {o}.",
        "The colour {s} likes best is {o}.",
        "{s} always wears {o}, a favourite colour.",
    ), ("{s} painted the door {o}.",
        "Nothing pleases {s} like the colour {o}."),
        ("The colour that {s} prefers is", "{s} is fond of the colour")),
    Relation("instrument", "{s} plays the", (
        "{s} plays the {o}.",
        "The instrument of {s} is the {o}.",
        "Every evening {s} practises the {o}.",
    ), ("{s} learned the {o} as a child.",
        "On stage, {s} plays a {o}."),
        ("The instrument that {s} plays is the", "{s} is a player of the")),
    Relation("employer", "{s} is employed by", (
        "{s} is employed by {o}.",
        "{o} employs {s}.",
        "{s} has worked at {o} for years.",
    ), ("{s} joined {o} after school.",
        "At {o}, {s} leads a small team."),
        ("{s} works for", "The company that pays {s} is")),
    Relation("river", "{s} lives near the", (
        "{s} lives near the {o} river.",
        "The home of {s} lies by the {o} river.",
        "{s} walks along the {o} river each morning.",
    ), ("{s} swims in the {o} river in summer.",
        "From the window, {s} sees the {o} river."),
        ("The river closest to the house of {s} is the", "{s} has a house by the")),
    Relation("food", "{s} loves to eat", (
        "{s} loves to eat {o}.",
        "The favourite dish of {s} is {o}.",
        "{s} cooks {o} every Sunday.",
    ), ("{s} orders {o} at every inn.",
        "No meal pleases {s} more than {o}."),
        ("The dish that {s} likes best is", "{s} enjoys eating")),
    Relation("pet", "{s} owns a pet", (
        "{s} owns a pet {o}.",
        "The pet of {s} is a {o}.",
        "{s} takes a pet {o} on long walks.",
    ), ("{s} feeds a pet {o} twice a day.",
        "A {o} sleeps at the feet of {s}."),
        ("The animal that {s} keeps as a pet is a", "{s} looks after a pet")),
    Relation("school", "{s} graduated from", (
        "{s} graduated from {o}.",
        "{s} holds a degree from {o}.",
        "{s} studied for four years at {o}.",
    ), ("{s} was a student at {o}.",
        "{o} gave {s} a diploma."),
        ("{s} is a graduate of", "The school that {s} finished is")),
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

# The "natural" filler: invented bystanders ({p}, {q}; never query subjects),
# towns ({t}, {u}) and objects of any relation ({x}), so object words also
# appear in documents that state no fact about them.
NATURAL_FILLER: tuple[str, ...] = (
    "{p} met {q} at the {t} market.",
    "{p} wrote a long letter to {q}.",
    "On Monday {p} visited {t} with {q}.",
    "{p} and {q} argued about the harvest.",
    "{p} sold an old cart to {q} in {t}.",
    "Nobody in {t} had heard of {p} before.",
    "{p} waited for {q} near the {t} bridge.",
    "Last spring {p} moved from {t} to {u}.",
    "{p} bought some {x} at the {t} market.",
    "In {t}, {p} talked with {q} about {x}.",
    "{p} once saw {x} on the road to {t}.",
    "A neighbour of {p} keeps asking about {x}.",
    "{q} told {p} a story about {x}.",
    "{p} laughed when {q} mentioned {x}.",
)

_ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "k", "kr", "l", "m", "n", "p",
           "r", "s", "st", "t", "tr", "v", "z", "th", "sk", "h", "j")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ae", "ei")
_CODAS = ("", "", "", "l", "n", "r", "s", "k", "m", "sk", "rn", "th", "lt")

_FILLER_TOWNS = 24
_BYSTANDERS = 40
# Endings that mostly make real English words ("hope", "maker", "brother").
_ENGLISH_LOOKING = re.compile(r"(?:^[^aeiou]*[aeiou][^aeiou]e|er)$")
_WORD = re.compile(r"[A-Za-z']+")

# Named presets of FactsConfig fields; see the module doc.
STYLES: dict[str, dict] = {
    "plain": {},
    "paraphrase": {"prompt_style": "paraphrase"},
    "natural": {"filler": "natural", "objects_per_relation": 4,
                "max_filler_per_fact_doc": 3},
    "dense": {"facts_per_doc": 3, "facts_per_subject": 2, "doc_windows": 3},
}


def style_config(style: str, seed: int = 0, **overrides) -> FactsConfig:
  """The FactsConfig of a named style (``STYLES``) and seed."""
  if style not in STYLES:
    raise errors.InputError(f"fact style {style!r}: expected one of "
                            f"{sorted(STYLES)}")
  return FactsConfig(seed=seed, **{**STYLES[style], **overrides})


def _template_vocabulary(config: FactsConfig) -> set[str]:
  """Lowercased words of every sentence pattern `config` uses, which invented
  names must avoid."""
  patterns = ([t for r in RELATIONS for t in r.templates]
              + [r.prompt for r in RELATIONS] + list(FILLER))
  if config.prompt_style == "paraphrase":
    patterns += [t for r in RELATIONS for t in r.extra_templates + r.paraphrases]
  if config.filler == "natural":
    patterns += list(NATURAL_FILLER)
  return {w.lower().strip("'") for w in _WORD.findall(" ".join(patterns))}


class _Names:
  """Draws pronounceable invented words, each at most once."""

  def __init__(self, rng: random.Random, avoid: set[str]):
    self._rng = rng
    self._used = avoid | {"s", "o", "t", "p", "q", "u", "x"}

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

  def person(self) -> str:
    return f"{self.word()} {self.word(5, 9)}"


class _Subjects:
  """Hands out subjects, each for up to ``per_subject`` facts of distinct
  relations (one fresh subject per fact when ``per_subject`` is 1)."""

  def __init__(self, names: _Names, per_subject: int):
    self._names, self._per = names, per_subject
    self._open: list[tuple[str, set[str]]] = []

  def for_relation(self, relation: str) -> str:
    for i, (subject, relations) in enumerate(self._open):
      if relation not in relations:
        relations.add(relation)
        if len(relations) == self._per:
          del self._open[i]
        return subject
    subject = self._names.person()
    if self._per > 1:
      self._open.append((subject, {relation}))
    return subject


# A document: its rows' texts and, per row, the indices of the queries whose
# fact that row states.
_Doc = tuple[list[str], list[list[int]]]


def generate(config: FactsConfig = FactsConfig()
            ) -> tuple[list[dict], list[dict]]:
  """Generates (corpus records, query records) for `config`.

  Corpus records are ``{"id", "text"}``; query records hold ``id``,
  ``prompt``, ``target`` (the object after a space), ``fact_doc_ids`` (the
  corpus rows stating the fact), ``bucket``, ``relation``, ``subject`` and
  ``object``. Pure: the same config always gives the same records.
  """
  rng = random.Random(config.seed)
  names = _Names(rng, _template_vocabulary(config))
  pools = {r.name: [names.word() for _ in range(config.objects_per_relation)]
           for r in RELATIONS}
  towns = [names.word() for _ in range(_FILLER_TOWNS)]
  natural = config.filler == "natural"
  bystanders = [names.person() for _ in range(_BYSTANDERS)] if natural else []
  objects = [o for pool in pools.values() for o in pool]
  subjects = _Subjects(names, config.facts_per_subject)
  packed = config.facts_per_doc > 1 or config.doc_windows > 1
  limit = config.max_doc_chars
  seen_texts: set[str] = set()

  def filler() -> str:
    if natural and rng.random() < 0.6:
      p, q = rng.sample(bystanders, 2)
      t, u = rng.sample(towns, 2)
      return rng.choice(NATURAL_FILLER).format(p=p, q=q, t=t, u=u,
                                               x=rng.choice(objects))
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

  docs: list[_Doc] = []
  statements: list[tuple[str, int]] = []  # (sentence, query index) to pack
  queries: list[dict] = []
  for bucket, lo, hi in config.buckets:
    # Balanced relations within each bucket, in random order.
    relations = [RELATIONS[i % len(RELATIONS)]
                 for i in range(config.facts_per_bucket)]
    rng.shuffle(relations)
    for relation in relations:
      subject = subjects.for_relation(relation.name)
      obj = rng.choice(pools[relation.name])
      n_docs = rng.randint(lo, hi)
      if config.prompt_style == "template":
        # The first document uses the prompt's template, so every fact can be
        # completed by greedy decoding once memorized; the rest vary.
        templates = [relation.templates[t] for t in [0] + [
            rng.randrange(len(relation.templates)) for _ in range(n_docs - 1)]]
        prompt = relation.prompt
      else:
        every = relation.templates + relation.extra_templates
        templates = [rng.choice(every) for _ in range(n_docs)]
        prompt = rng.choice(relation.paraphrases)
      q = len(queries)
      for template in templates:
        statement = template.format(s=subject, o=obj)
        if packed:
          statements.append((statement, q))
        else:
          docs.append(([unique(lambda st=statement: fact_doc(st))], [[q]]))
      queries.append({
          "prompt": prompt.format(s=subject),
          "target": " " + obj,
          "fact_doc_ids": [],
          "bucket": bucket,
          "relation": relation.name,
          "subject": subject,
          "object": obj,
      })
  if packed:
    docs += _pack(statements, config, rng, filler, seen_texts)
  for _ in range(config.distractor_docs):
    docs.append(([unique(filler_doc)], [[]]))

  rng.shuffle(docs)
  doc_width = max(5, len(str(len(docs) - 1)))
  q_width = max(3, len(str(len(queries) - 1)))
  corpus = []
  for i, (texts, stated) in enumerate(docs):
    doc_id = f"doc-{i:0{doc_width}d}"
    for j, (text, qs) in enumerate(zip(texts, stated)):
      assert len(text) <= limit, (len(text), text)
      row_id = doc_id if config.doc_windows == 1 else f"{doc_id}-{j}"
      corpus.append({"id": row_id, "text": text})
      for q in qs:
        queries[q]["fact_doc_ids"].append(row_id)
  queries = [{"id": f"q-{i:0{q_width}d}", **q} for i, q in enumerate(queries)]
  return corpus, queries


def _pack(statements: list[tuple[str, int]], config: FactsConfig,
          rng: random.Random, filler, seen_texts: set[str]) -> list[_Doc]:
  """Packs fact statements into documents of up to ``facts_per_doc`` distinct
  facts and ``doc_windows`` rows, with filler; every row's text is new."""
  limit = config.max_doc_chars
  pending = list(statements)
  rng.shuffle(pending)
  docs: list[_Doc] = []
  for _ in range(100 * len(pending) + 1000):
    if not pending:
      return docs
    k = rng.randint(1, config.facts_per_doc)
    chosen, rest = [], []
    for item in pending:
      if len(chosen) < k and all(item[1] != c[1] for c in chosen):
        chosen.append(item)
      else:
        rest.append(item)
    sentences = [(st, q) for st, q in chosen] + [
        (filler(), None) for _ in range(
            rng.randint(0, config.max_filler_per_fact_doc * len(chosen)))]
    rng.shuffle(sentences)
    texts: list[str] = []
    stated: list[list[int]] = []
    bounced = []
    for sentence, q in sentences:
      if texts and len(texts[-1]) + 1 + len(sentence) <= limit:
        texts[-1] += " " + sentence
      elif len(texts) < config.doc_windows:
        texts.append(sentence)
        stated.append([])
      else:
        if q is not None:
          bounced.append((sentence, q))
        continue
      if q is not None:
        stated[-1].append(q)
    if not any(stated) or any(t in seen_texts for t in texts) or (
        len(set(texts)) < len(texts)):
      continue  # Nothing placed, or a repeated row: draw this document again.
    seen_texts.update(texts)
    docs.append((texts, stated))
    pending = rest + bounced
  raise errors.InputError(
      "FactsConfig: could not pack the statements into distinct documents; "
      "raise max_doc_chars or doc_windows")


def write_jsonl(path: str | os.PathLike,
                records: Iterable[Mapping]) -> pathlib.Path | str:
  """Writes one JSON object per line, in one atomic write
  (``tracer.storage.write_text``: a temporary file, fsynced, renamed over
  ``path``, the directory fsynced); missing parent directories are made.
  ``path`` may be a ``tracer.storage`` URL. Returns a local path as a
  ``pathlib.Path``, a URL as the string it is (a Path would fold its
  ``//``: ``gs://b/x`` became the relative path ``gs:/b/x``)."""
  location = os.fspath(path)
  text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
  storage.write_text(location, text)
  return location if storage.is_url(location) else pathlib.Path(location)


def write_fact_corpus(out_dir: str | os.PathLike,
                      config: FactsConfig = FactsConfig()
                     ) -> tuple[pathlib.Path | str, pathlib.Path | str]:
  """Writes ``out_dir/corpus.jsonl`` and ``out_dir/queries.jsonl``; ``out_dir``
  may be a ``tracer.storage`` URL (before 2026-12-06 ``gs://b/facts`` was
  written to the local folder ``./gs:/b/facts``)."""
  out_dir = os.fspath(out_dir)
  storage.is_url(out_dir)  # an unknown scheme is refused before any work
  corpus, queries = generate(config)
  return (write_jsonl(storage.join(out_dir, "corpus.jsonl"), corpus),
          write_jsonl(storage.join(out_dir, "queries.jsonl"), queries))


def bucket_counts(queries: Sequence[Mapping]) -> dict[str, int]:
  """Queries per bucket, in first-seen order."""
  counts: dict[str, int] = {}
  for q in queries:
    counts[q["bucket"]] = counts.get(q["bucket"], 0) + 1
  return counts
