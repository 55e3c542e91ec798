"""Corpus and query inputs: strict JSONL readers, seqio sources, tokenization.

Row rule. Every corpus example has a stable integer *row*: sources are read in
order, each text is tokenized and followed by EOS, and a text longer than
``max_len`` tokens is either truncated to its first ``max_len`` tokens
(``overflow="truncate"``, the default) or split into consecutive windows of
``max_len`` tokens (``overflow="split"``), each window its own example. Rows
number the examples in that order, so they depend only on the source and the
rule, never on devices or hosts. ``Corpus.ids[row]`` and ``Corpus.texts[row]``
map a row back to its source id and the text the example covers.

Examples are dicts of numpy arrays (see ``tracer.model``): ``inputs``,
``targets`` int32[L] and ``weights`` float32[L].
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from tracer.errors import InputError, at

PAD_ID = 0
EOS_ID = 1


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """How texts become examples; stored in checkpoints and store manifests."""
  tokenizer: str = "byte"              # "byte" or "sentencepiece"
  sentencepiece_model: str | None = None
  overflow: str = "truncate"           # "truncate" or "split" (module doc)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def vocabulary(self):
    return make_vocabulary(self.tokenizer, self.sentencepiece_model)


# --- tokenizers ------------------------------------------------------------

def make_vocabulary(kind: str = "byte", sentencepiece_model: str | None = None):
  """A seqio vocabulary that needs no download.

  ``kind="byte"``: ``seqio.ByteVocabulary`` (259 ids: pad 0, eos 1, unk 2,
  then the 256 bytes). ``kind="sentencepiece"``: a model file made by
  ``train_sentencepiece``.
  """
  import seqio  # Lazy: importing seqio pulls in TensorFlow (seconds).
  if kind == "byte":
    return seqio.ByteVocabulary()
  if kind == "sentencepiece":
    if not sentencepiece_model or not os.path.exists(sentencepiece_model):
      raise InputError(f"{sentencepiece_model}: sentencepiece model file not found")
    return seqio.SentencePieceVocabulary(sentencepiece_model)
  raise InputError(f"tokenizer kind {kind!r}: expected 'byte' or 'sentencepiece'")


def train_sentencepiece(texts: Iterable[str], model_prefix: str,
                        vocab_size: int = 512) -> str:
  """Trains a sentencepiece model on ``texts``; returns the ``.model`` path.

  Ids follow seqio's convention (pad 0, eos 1, unk 2).
  """
  import sentencepiece as spm
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(list(texts)), model_prefix=model_prefix,
      vocab_size=vocab_size, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      model_type="unigram", character_coverage=1.0, hard_vocab_limit=False,
      minloglevel=2)
  return model_prefix + ".model"


# --- strict JSONL ------------------------------------------------------------

def iter_jsonl(path) -> Iterator[tuple[int, dict]]:
  """Yields (line number, JSON object) for every non-blank line of ``path``.

  Errors (missing file, bad UTF-8, bad JSON, not an object) name the file and
  line.
  """
  if not os.path.isfile(path):
    raise InputError(f"{path}: no such file")
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, start=1):
      where = at(path, lineno)
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise InputError(f"{where}: not valid UTF-8 ({e.reason} at byte "
                         f"{e.start})") from None
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise InputError(f"{where}: not valid JSON ({e.msg})") from None
      if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
      yield lineno, record


# Fields whose type is checked wherever they appear in corpus or query lines.
_STRING_FIELDS = ("id", "text", "prompt", "target", "bucket")
_STRING_LIST_FIELDS = ("fact_doc_ids",)


def read_jsonl(path, required: Sequence[str],
               nonempty: Sequence[str] = ()) -> Iterator[tuple[int, dict]]:
  """Yields (line number, record) of corpus or query lines, strictly.

  Every record holds the ``required`` fields; ``id``, ``text``, ``prompt``,
  ``target`` and ``bucket`` are strings and ``fact_doc_ids`` a list of strings
  wherever they appear; ``nonempty`` fields must not be blank; ids are unique.
  Blank lines are skipped. Errors name the file, line and field.
  """
  seen = {}
  for lineno, record in iter_jsonl(path):
    where = at(path, lineno)
    for field in required:
      if field not in record:
        raise InputError(f"{where}: missing field {field!r}")
    for field in _STRING_FIELDS:
      if field in record and not isinstance(record[field], str):
        raise InputError(f"{where}: field {field!r} must be a string, got "
                         f"{type(record[field]).__name__}")
    for field in _STRING_LIST_FIELDS:
      value = record.get(field, [])
      if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(f"{where}: field {field!r} must be a list of strings")
    for field in nonempty:
      if not record[field].strip():
        raise InputError(f"{where}: field {field!r} is empty")
    if "id" in required:
      if record["id"] in seen:
        raise InputError(f"{where}: duplicate id {record['id']!r} "
                         f"(first at line {seen[record['id']]})")
      seen[record["id"]] = lineno
    yield lineno, record


def read_queries(path: str) -> list[dict]:
  """Query lines ``{"id", "prompt", "target", ...}``; extra fields are kept."""
  queries = [r for _, r in read_jsonl(path, ("id", "prompt", "target"),
                                      ("id", "target"))]
  if not queries:
    raise InputError(f"{path}: no queries")
  return queries


# --- corpus ------------------------------------------------------------------

@dataclasses.dataclass
class Corpus:
  """The examples of a corpus, one per row. ``tokens[row]`` ends with EOS
  unless it was cut; ``segments[row]`` is the window index within its text."""
  source: str
  ids: list[str]
  texts: list[str]
  segments: list[int]
  tokens: list[np.ndarray]
  max_len: int

  def __len__(self) -> int:
    return len(self.ids)

  def examples(self, rows: Sequence[int] | np.ndarray) -> dict:
    """The example batch for ``rows``: arrays with leading axis len(rows)."""
    return stack_examples([corpus_example(self.tokens[r], self.max_len) for r in rows])


def corpus_example(tokens: np.ndarray, max_len: int) -> dict:
  """One LM example: every real token is a target, padding has weight 0."""
  n = len(tokens)
  targets = np.zeros(max_len, np.int32)
  targets[:n] = tokens
  inputs = np.zeros(max_len, np.int32)
  inputs[1:n] = tokens[:n - 1]
  weights = (np.arange(max_len) < n).astype(np.float32)
  return {"inputs": inputs, "targets": targets, "weights": weights}


def query_example(prompt_tokens: Sequence[int], target_tokens: Sequence[int],
                  max_len: int) -> dict:
  """One (prompt, target) example: only target tokens carry weight.

  A sequence longer than ``max_len`` loses tokens from the prompt's start.
  """
  prompt, target = list(prompt_tokens), list(target_tokens)
  if len(target) > max_len - 1:
    raise InputError(f"target of {len(target)} tokens does not fit max_len {max_len}")
  prompt = prompt[max(0, len(prompt) + len(target) - max_len):]
  ex = corpus_example(np.asarray(prompt + target, np.int32), max_len)
  ex["weights"][:len(prompt)] = 0.0
  return ex


def stack_examples(examples: Sequence[dict]) -> dict:
  return {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}


def segment(tokens: Sequence[int], max_len: int, overflow: str) -> list[np.ndarray]:
  """Token windows for one text (tokens already end with EOS); see module doc."""
  tokens = np.asarray(tokens, np.int32)
  if overflow == "truncate":
    return [tokens[:max_len]]
  if overflow == "split":
    return [tokens[i:i + max_len] for i in range(0, len(tokens), max_len)]
  raise InputError(f"overflow {overflow!r}: expected 'truncate' or 'split'")


def build_corpus(source: str, records: Iterable[tuple[str, str, list[int]]],
                 vocab, max_len: int, overflow: str = "truncate") -> Corpus:
  """Builds the row table from (id, text, tokens-without-EOS) records."""
  ids, texts, segs, toks = [], [], [], []
  for doc_id, text, tokens in records:
    windows = segment(list(tokens) + [EOS_ID], max_len, overflow)
    for j, window in enumerate(windows):
      ids.append(doc_id)
      texts.append(text if len(windows) == 1 else vocab.decode(window.tolist()))
      segs.append(j)
      toks.append(window)
  if not ids:
    raise InputError(f"{source}: the corpus is empty")
  return Corpus(source, ids, texts, segs, toks, max_len)


def read_jsonl_corpus(path: str, vocab, max_len: int,
                      overflow: str = "truncate") -> Corpus:
  """Corpus lines ``{"id": str, "text": str}``; text must not be empty."""
  records = ((r["id"], r["text"], vocab.encode(r["text"]))
             for _, r in read_jsonl(path, ("id", "text"), ("id", "text")))
  return build_corpus(path, records, vocab, max_len, overflow)


def read_seqio_corpus(name: str, vocab, max_len: int, overflow: str = "truncate",
                      split: str = "train", feature: str = "targets") -> Corpus:
  """Any registered seqio Task or Mixture as a corpus, in its source order.

  The task's preprocessors run (``shuffle=False``); the example's ``feature``
  tokens are used, its text is ``<feature>_pretokenized`` when present, and its
  id is the example's ``id`` feature when present, else its position. A
  Mixture is read task after task (seqio's name order, tasks of rate > 0),
  every example once, with ids ``"<task name>:<id>"``: seqio's own sampling
  would stop at the first exhausted task and drop ids.
  """
  import seqio
  try:
    provider = seqio.get_mixture_or_task(name)
  except ValueError:
    raise InputError(f"--corpus={name}: not a file, and no seqio task or mixture "
                     f"of that name is registered") from None
  if isinstance(provider, seqio.Mixture):
    parts = [(t, f"{t.name}:") for t in provider.tasks if provider.get_rate(t) > 0]
  else:
    parts = [(provider, "")]

  def records():
    for task, prefix in parts:
      dataset = task.get_dataset(sequence_length=None, split=split, shuffle=False,
                                 num_epochs=1)
      for i, ex in enumerate(dataset.as_numpy_iterator()):
        if feature not in ex:
          raise InputError(f"seqio {task.name}: example {i} has no feature "
                           f"{feature!r}")
        tokens = [int(t) for t in ex[feature] if t != EOS_ID]
        text = ex.get(f"{feature}_pretokenized")
        text = text.decode() if isinstance(text, bytes) else vocab.decode(tokens)
        doc_id = ex.get("id", str(i))
        doc_id = doc_id.decode() if isinstance(doc_id, bytes) else str(doc_id)
        yield prefix + doc_id, text, tokens

  return build_corpus(f"seqio:{name}", records(), vocab, max_len, overflow)


def read_corpus(source: str, vocab, max_len: int, overflow: str = "truncate") -> Corpus:
  """A JSONL file path, or the name of a registered seqio task or mixture."""
  if source.endswith(".jsonl") or os.path.sep in source or os.path.exists(source):
    return read_jsonl_corpus(source, vocab, max_len, overflow)
  return read_seqio_corpus(source, vocab, max_len, overflow)


def register_jsonl_task(name: str, path: str, vocab) -> Any:
  """Registers a seqio Task reading corpus lines from ``path``.

  Its examples hold ``id``, ``targets`` (tokens + EOS) and
  ``targets_pretokenized``; ``read_seqio_corpus(name, ...)`` then gives the same
  rows as ``read_jsonl_corpus(path, ...)``.
  """
  import seqio
  import tensorflow as tf

  records = [r for _, r in read_jsonl(path, ("id", "text"), ("text",))]

  def dataset_fn(split, shuffle_files, seed=None):
    del split, shuffle_files, seed
    return tf.data.Dataset.from_generator(
        lambda: ((r["id"], r["text"]) for r in records),
        output_signature=(tf.TensorSpec((), tf.string), tf.TensorSpec((), tf.string)),
    ).map(lambda i, t: {"id": i, "targets": t})

  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(
      name,
      source=seqio.FunctionDataSource(dataset_fn, splits=["train"]),
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
      output_features={"targets": seqio.Feature(vocab, add_eos=True)})


# --- queries -----------------------------------------------------------------

def query_examples(queries: Sequence[dict], vocab, max_len: int,
                   source: str = "queries") -> dict:
  """Stacked target-only examples for query records."""
  out = []
  for i, q in enumerate(queries):
    try:
      out.append(query_example(vocab.encode(q["prompt"]), vocab.encode(q["target"]),
                               max_len))
    except InputError as e:
      raise InputError(f"{source}: query {q.get('id', i)!r}: {e}") from None
  return stack_examples(out)


def batches(num_rows: int, batch_size: int, start: int = 0) -> Iterator[np.ndarray]:
  """Row index batches ``[start, num_rows)`` in order; the last may be short."""
  for lo in range(start, num_rows, batch_size):
    yield np.arange(lo, min(lo + batch_size, num_rows))
