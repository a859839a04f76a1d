r"""Federated Stack Overflow (TensorFlow Federated's release): next-word and
tag prediction, preprocessed the way FedJAX and TFF's baselines do.

Source. TFF's ``stackoverflow.tar.bz2`` (``tff.simulation.datasets.
stackoverflow.load_data``) holds three HDF5 files at the top of the archive,
``stackoverflow_{train,held_out,test}.h5``, each with one group per user,
``/examples/<client_id>/<feature>``, one dataset per feature with one entry
per sentence: ``tokens`` (the sentence's words joined by single spaces),
``title`` (the question's title), ``tags`` (the question's tags joined by
``|``), ``type`` (``question``/``answer``), ``creation_date`` (byte strings)
and ``score`` (int64). Train: 342,477 users, 135,818,730 sentences; held-out:
38,758 users; test: 204,088 users, 16,586,035 sentences (TFF's docstring).
:func:`stackoverflow` returns ``(train, test)``; :func:`stackoverflow_split`
reads any split, ``held_out`` included. Clients are in sorted id order (as
``tff.simulation.datasets.HDF5ClientData`` lists them) and
``max_clients=N`` keeps the first ``N`` ids of each split.

Vocabularies. ``stackoverflow.word_count.tar.bz2`` holds the text file
``stackoverflow.word_count``: one ``<word> <count>`` line per word, most
frequent first; the word vocabulary is its first ``vocab_size`` words
(TFF's ``load_word_counts(vocab_size=...)``, FedJAX's ``default_vocab``).
``stackoverflow.tag_count.tar.bz2`` holds ``stackoverflow.tag_count``, a JSON
object ``{tag: count}``; the tag vocabulary is its first ``num_tags`` tags after
a stable sort by decreasing count (TFF's ``load_tag_counts``).

Next-word prediction (``task="nwp"``; FedJAX's ``StackoverflowTokenizer``,
TFF's ``word_prediction_preprocessing``). A sentence is split on single
spaces into words :math:`w_1 .. w_n`; with :math:`L` = ``sequence_length``,
:math:`m = \min(n, L)` and :math:`t_j` the id of :math:`w_j`,

.. math:: s = (\mathrm{BOS}, t_1, \dots, t_m, [\mathrm{EOS}\ \text{if}\ n < L],
          \mathrm{PAD}, \dots) \in \mathbb{Z}^{L+1},\qquad
          x = s_{0:L},\quad y = s_{1:L+1}

(int32 ``[L]`` each). Under FedJAX's ids ``x`` holds PAD where ``s`` holds
EOS (FedJAX shifts ``[BOS, t, EOS]`` before truncating, so EOS is never an
input); TFF's ``x`` keeps it. Both put PAD in ``y`` at that position, so a
loss masked on ``y == PAD`` is the same. Token ids (``V`` = ``vocab_size``,
one OOV bucket, so every unknown word gets the same id):

=========== ============== ======================
token       ``"fedjax"``   ``"tff"``
=========== ============== ======================
PAD         0              0
BOS         1              V + 2
EOS         2              V + 3
word k      k + 3          k + 1
OOV         V + 3          V + 1
=========== ============== ======================

``V + 4`` classes either way (:func:`stackoverflow_special_tokens`). The
metric "accuracy without out-of-vocabulary and end-of-sentence tokens"
(TFF's ``accuracy_without_out_of_vocab_or_end_of_sentence``) counts the
positions whose target ``y`` is none of PAD, EOS, OOV.

Tag prediction (``task="tag"``; TFF's ``tag_prediction_preprocessing``, the
research code's logistic-regression task). The words of ``tokens + " " +
title`` (split on whitespace, empty strings dropped) give the bag of words

.. math:: x_k = \frac{|\{j : w_j = \mathrm{vocab}_k\}|}{n},\quad k < V

(float32 ``[V]``; ``n`` counts out-of-vocabulary words too, so a row sums
to the in-vocabulary share; an example with no word at all, where TFF's mean
is 0/0, gets zeros). ``y`` is float32 ``[num_tags]``: for each of the
example's ``|``-separated tags in the tag vocabulary, 1 at its index: a
multi-hot vector (TFF sums one-hot vectors, which differs only for a tag
listed twice on one question; here it is still 1, the label the
multi-label loss and recall@5 take).

Memory. Every example is a dense row: next-word prediction costs
``8 * sequence_length`` bytes per sentence (full train split: 21.7 GB at
``sequence_length=20``; test 2.7 GB), tag prediction
``4 * (vocab_size + num_tags)`` bytes (42 KB at the defaults: about 17 MB per
train client on average, so ``max_clients`` of a few hundred). The arrays are
filled in place (no second copy); a split that would not fit in the
machine's memory raises ``MemoryError`` before anything is allocated, naming
a ``max_clients`` that fits. Preprocessed splits are cached as ``.npz``
(:func:`fedjax_lite.datasets.download.cached`, keyed on every argument and
the files' digests), the same size again on disk. The downloads are
``stackoverflow.tar.bz2`` plus its extracted HDF5 files; nothing is read
from them when the cache already holds the split.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from fedjax_lite import checks
from fedjax_lite._optional import require
from fedjax_lite.data.federated_dataset import FederatedDataset
from fedjax_lite.datasets import download
from fedjax_lite.datasets.download import RemoteFile
from fedjax_lite.datasets.loaders import tff_examples

# URLs and SHA-256 digests pinned by TFF,
# tensorflow_federated/python/simulation/datasets/stackoverflow.py (the
# tf.keras.utils.get_file calls of load_data, load_word_counts and
# load_tag_counts, hash_algorithm="sha256"). FedJAX
# (fedjax/datasets/stackoverflow.py) reads its own SQLite conversion and its
# vocabulary gs://gresearch/fedjax/stackoverflow/stackoverflow.word_count (the
# same format) and pins no digest.
_TFF_URL = "https://storage.googleapis.com/tff-datasets-public/"
REMOTE_FILES: dict[str, RemoteFile] = {
  "stackoverflow": RemoteFile(
    "stackoverflow.tar.bz2",
    _TFF_URL + "stackoverflow.tar.bz2",
    "99eca2f8b8327a09e5fc123979df2d237acbc5e52322f6d86bf523ee47b961a2",
  ),
  "stackoverflow.word_count": RemoteFile(
    "stackoverflow.word_count.tar.bz2",
    _TFF_URL + "stackoverflow.word_count.tar.bz2",
    "1dc00256d6e527c54b9756d968118378ae14e6692c0b3b6cad470cdd3f0c519c",
  ),
  "stackoverflow.tag_count": RemoteFile(
    "stackoverflow.tag_count.tar.bz2",
    _TFF_URL + "stackoverflow.tag_count.tar.bz2",
    "6fe281cec490d9384a290d560072438e7e2b377bbb823876ce7bd6f82696772d",
  ),
}
"""TFF's archives by stem; the loaders read this at call time, so replacing an
entry (``monkeypatch.setitem``) points them at another :class:`RemoteFile`."""
SPLITS = ("train", "held_out", "test")
TASKS = ("nwp", "tag")
TOKEN_IDS = ("fedjax", "tff")
_VERSION = 1  # bump when the preprocessing changes (invalidates the cache)


class SpecialTokens(NamedTuple):
  """Ids of the next-word-prediction special tokens (see the module doc).

  Attributes:
    pad: padding (targets to mask out of the loss).
    oov: the single out-of-vocabulary bucket.
    bos: beginning of sentence (first input of every sequence).
    eos: end of sentence (target after a sentence's last word).
    num_classes: ``vocab_size + 4``, the model's output size.
    first_word: id of the vocabulary's first word (word ``k`` is
      ``first_word + k``).
  """

  pad: int
  oov: int
  bos: int
  eos: int
  num_classes: int
  first_word: int


def stackoverflow_special_tokens(
  vocab_size: int = 10000, token_ids: str = "fedjax"
) -> SpecialTokens:
  """Special token ids for a ``vocab_size``-word vocabulary.

  ``"fedjax"`` (FedJAX's ``StackoverflowTokenizer``): PAD 0, BOS 1, EOS 2,
  words ``3 .. V+2``, OOV ``V+3``. ``"tff"`` (TFF's ``get_special_tokens``
  with one OOV bucket): PAD 0, words ``1 .. V``, OOV ``V+1``, BOS ``V+2``, EOS
  ``V+3``. With the default ``V = 10000``: FedJAX OOV 10003; TFF OOV 10001,
  BOS 10002, EOS 10003; 10004 classes.
  """
  v = checks.positive_int("vocab_size", vocab_size)
  _choice("token_ids", token_ids, TOKEN_IDS)
  if token_ids == "fedjax":
    return SpecialTokens(0, v + 3, 1, 2, v + 4, 3)
  return SpecialTokens(0, v + 1, v + 2, v + 3, v + 4, 1)


# ------------------------------------------------------------------ checks
def _choice(name: str, value, allowed: Sequence[str]) -> str:
  if not isinstance(value, str) or value not in allowed:
    raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}.")
  return value


def _check_bool(name: str, value) -> bool:
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be True or False, got {value!r}.")
  return bool(value)


# ------------------------------------------------------------ the files
def _archive_member(
  stem: str, member: str, cache: Path, search: list, progress: bool
) -> Path:
  """File ``member`` of TFF's archive ``<stem>.tar.bz2``, fetched (cache,
  ``search`` folders or download) and extracted once into ``cache/<stem>``."""
  archive = download.fetch(
    REMOTE_FILES[stem], cache, search=search, progress=progress
  )
  return download.find_file(download.extract(archive, cache / stem), member)


def _read_words(path: Path, vocab_size: int) -> list[bytes]:
  """First ``vocab_size`` words of a ``<word> <count>`` per line file."""
  words: list[bytes] = []
  with open(path, "rb") as f:
    for lineno, line in enumerate(f, 1):
      parts = line.split()
      if len(parts) != 2 or not parts[1].lstrip(b"-").isdigit():
        raise ValueError(
          f"word-count file '{path}', line {lineno}: {line[:80]!r}; "
          "expected '<word> <count>'."
        )
      words.append(parts[0])
      if len(words) == vocab_size:
        return words
  raise ValueError(
    f"vocab_size={vocab_size} but the word-count file '{path}' lists "
    f"{len(words)} words; choose vocab_size <= {len(words)}."
  )


def _read_tags(path: Path, num_tags: int) -> list[bytes]:
  """The ``num_tags`` most frequent tags of a JSON ``{tag: count}`` file."""
  try:
    with open(path, "rb") as f:
      counts = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(
      f"tag-count file '{path}' is not JSON ({e}); expected an object "
      "{tag: count}."
    ) from None
  if not isinstance(counts, dict):
    raise ValueError(
      f"tag-count file '{path}' holds a {type(counts).__name__}; expected "
      "a JSON object {tag: count}."
    )
  bad = [(t, c) for t, c in counts.items() if not checks.is_int(c)][:1]
  if bad:
    raise ValueError(
      f"tag-count file '{path}' gives tag {bad[0][0]!r} the count "
      f"{bad[0][1]!r}; expected integer counts."
    )
  if num_tags > len(counts):
    raise ValueError(
      f"num_tags={num_tags} but the tag-count file '{path}' lists "
      f"{len(counts)} tags; choose num_tags <= {len(counts)}."
    )
  ranked = sorted(counts.items(), key=lambda kv: kv[1], reverse=True)
  return [t.encode("utf-8") for t, _ in ranked[:num_tags]]


def _words(vocab_size: int, cache: Path, search: list, progress: bool):
  path = _archive_member(
    "stackoverflow.word_count",
    "stackoverflow.word_count",
    cache,
    search,
    progress,
  )
  return _read_words(path, vocab_size)


def _tags(num_tags: int, cache: Path, search: list, progress: bool):
  path = _archive_member(
    "stackoverflow.tag_count",
    "stackoverflow.tag_count",
    cache,
    search,
    progress,
  )
  return _read_tags(path, num_tags)


def stackoverflow_vocab(
  vocab_size: int = 10000,
  num_tags: int = 500,
  *,
  data_dir: str | os.PathLike | None = None,
  search: Sequence[str | os.PathLike] = (),
  progress: bool = True,
) -> tuple[list[str], list[str]]:
  """The word and tag vocabularies: ``(words, tags)``.

  ``words[k]`` has id ``first_word + k`` in next-word prediction
  (:func:`stackoverflow_special_tokens`) and is column ``k`` of the tag
  task's bag of words; ``tags[k]`` is column ``k`` of its labels.

  Args:
    vocab_size: the number of most frequent words.
    num_tags: the number of most frequent tags.
    data_dir: the download and cache folder (default ``$FEDJAX_LITE_DATA``
      or ``~/.cache/fedjax_lite``; see
      :func:`fedjax_lite.datasets.download.data_dir`).
    search: folders that may already hold TFF's ``.tar.bz2`` files.
    progress: show download progress.
  """
  vocab_size = checks.positive_int("vocab_size", vocab_size)
  num_tags = checks.positive_int("num_tags", num_tags)
  progress = _check_bool("progress", progress)
  search = download.search_folders(search)
  cache = download.data_dir(data_dir)
  words = _words(vocab_size, cache, search, progress)
  tags = _tags(num_tags, cache, search, progress)
  return [w.decode("utf-8") for w in words], [t.decode("utf-8") for t in tags]


# ------------------------------------------------------- preprocessing
def _as_bytes(values) -> list[bytes]:
  """An HDF5 string column (fixed ``S``, variable-length bytes or str)."""
  return [
    v.encode("utf-8") if isinstance(v, str) else bytes(v)
    for v in np.asarray(values, dtype=object).reshape(-1)
  ]


def _nwp_arrays(
  sentences: Sequence[bytes],
  lookup: dict,
  tokens: SpecialTokens,
  sequence_length: int,
  keep_eos_input: bool,
) -> tuple[np.ndarray, np.ndarray]:
  """``x, y`` int32 ``[n, sequence_length]`` of one client's sentences.

  ``lookup`` maps a word (bytes) to its id; other words get ``tokens.oov``.
  ``keep_eos_input``: TFF's layout (EOS may appear in ``x``); else FedJAX's.
  """
  n, length = len(sentences), sequence_length
  words = [s.split(b" ")[:length] for s in sentences]
  lens = np.fromiter(map(len, words), np.int64, n)
  flat = list(itertools.chain.from_iterable(words))
  ids = np.fromiter(
    map(lookup.get, flat, itertools.repeat(tokens.oov)), np.int32, len(flat)
  )
  seq = np.full((n, length + 1), tokens.pad, np.int32)
  seq[:, 0] = tokens.bos
  rows = np.repeat(np.arange(n), lens)
  starts = np.repeat(np.cumsum(lens) - lens, lens)
  seq[rows, 1 + np.arange(len(flat)) - starts] = ids
  short = np.flatnonzero(lens < length)
  seq[short, lens[short] + 1] = tokens.eos
  x = seq[:, :length].copy()
  if not keep_eos_input:
    inside = short[lens[short] + 1 < length]
    x[inside, lens[inside] + 1] = tokens.pad
  return x, seq[:, 1:]


def _tag_arrays(
  tokens: Sequence[bytes],
  titles: Sequence[bytes],
  tags: Sequence[bytes],
  word_index: dict,
  tag_index: dict,
) -> tuple[np.ndarray, np.ndarray]:
  """Bag of words ``x`` float32 ``[n, V]`` and tags ``y`` float32 ``[n, T]``.

  ``word_index``/``tag_index`` map bytes to a column in ``[0, V)`` /
  ``[0, T)``; anything else counts in the denominator only (words) or not at
  all (tags).
  """
  n, v, t = len(tokens), len(word_index), len(tag_index)
  words = [(a + b" " + b).split() for a, b in zip(tokens, titles)]
  lens = np.fromiter(map(len, words), np.int64, n)
  flat = list(itertools.chain.from_iterable(words))
  cols = np.fromiter(
    map(word_index.get, flat, itertools.repeat(v)), np.int64, len(flat)
  )
  rows = np.repeat(np.arange(n), lens)
  x = np.zeros((n, v), np.float32)
  keep = cols < v
  np.add.at(x, (rows[keep], cols[keep]), np.float32(1))
  x /= np.maximum(lens, 1).astype(np.float32)[:, None]
  split = [s.split(b"|") for s in tags]
  tlens = np.fromiter(map(len, split), np.int64, n)
  tcols = np.fromiter(
    map(
      tag_index.get, itertools.chain.from_iterable(split), itertools.repeat(t)
    ),
    np.int64,
    int(tlens.sum()),
  )
  trows = np.repeat(np.arange(n), tlens)
  y = np.zeros((n, t), np.float32)
  tkeep = tcols < t
  y[trows[tkeep], tcols[tkeep]] = 1.0
  return x, y


def _physical_memory() -> int | None:
  """Bytes of RAM, or None where the OS does not say."""
  try:
    return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
  except (ValueError, OSError, AttributeError):
    return None


def _check_memory(counts: np.ndarray, row_bytes: int, what: str) -> None:
  total = int(counts.sum()) * row_bytes
  ram = _physical_memory()
  if ram is None or total <= ram:
    return
  fits = int(np.searchsorted(np.cumsum(counts) * row_bytes, ram // 2))
  raise MemoryError(
    f"{what}: {len(counts)} clients with {int(counts.sum())} examples need "
    f"{total / 2**30:.1f} GiB as dense arrays ({row_bytes} bytes per "
    f"example) but this machine has {ram / 2**30:.1f} GiB; pass "
    f"max_clients={max(fits, 1)} (half the memory) or fewer."
  )


def _read_split(
  path: Path,
  task: str,
  max_clients: int | None,
  encode,
  row_bytes: int,
  features: tuple[str, ...],
) -> dict[str, np.ndarray]:
  """Preprocesses a TFF HDF5 split client by client into preallocated rows."""
  h5py = require("h5py", "data")
  source = f"TFF HDF5 file '{path}'"
  with tff_examples(path, source) as group:
    ids = sorted(group.keys())[:max_clients]
    counts = np.zeros(len(ids), np.int64)
    for k, cid in enumerate(ids):
      g = group[cid]
      missing = [f for f in features if not isinstance(g.get(f), h5py.Dataset)]
      if missing:
        raise ValueError(
          f"{source}: /examples/{cid} has no dataset(s) {missing} (it has "
          f"{sorted(g.keys())}); expected TFF's Stack Overflow features."
        )
      lens = {f: g[f].shape[0] if g[f].ndim else -1 for f in features}
      if len(set(lens.values())) != 1 or -1 in lens.values():
        raise ValueError(
          f"{source}: /examples/{cid} has features of lengths {lens}; "
          "expected one entry per sentence in each."
        )
      counts[k] = lens[features[0]]
    _check_memory(counts, row_bytes, f"Stack Overflow {task} ({path.name})")
    keep = np.flatnonzero(counts > 0)
    if keep.size == 0:
      raise ValueError(f"{source} holds no client with examples.")
    out_x = out_y = None
    row = 0
    for k in keep:
      g = group[ids[k]]
      x, y = encode(*(_as_bytes(g[f][()]) for f in features))
      if out_x is None:
        total = int(counts[keep].sum())
        out_x = np.empty((total,) + x.shape[1:], x.dtype)
        out_y = np.empty((total,) + y.shape[1:], y.dtype)
      out_x[row : row + len(x)] = x
      out_y[row : row + len(y)] = y
      row += len(x)
  return {
    "x": out_x,
    "y": out_y,
    "counts": counts[keep],
    "client_ids": np.asarray([ids[k] for k in keep], dtype=np.str_),
  }


def _to_dataset(arrays: dict[str, np.ndarray]) -> FederatedDataset:
  counts = np.asarray(arrays["counts"], np.int64)
  offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
  return FederatedDataset(
    {"x": arrays["x"], "y": arrays["y"]},
    offsets,
    counts,
    tuple(str(c) for c in arrays["client_ids"]),
  )


# --------------------------------------------------------------- datasets
def stackoverflow_split(
  split: str,
  task: str = "nwp",
  *,
  vocab_size: int = 10000,
  num_tags: int = 500,
  sequence_length: int = 20,
  token_ids: str = "fedjax",
  data_dir: str | os.PathLike | None = None,
  search: Sequence[str | os.PathLike] = (),
  progress: bool = True,
  max_clients: int | None = None,
) -> FederatedDataset:
  """One split (``"train"``, ``"held_out"`` or ``"test"``) of
  :func:`stackoverflow`; the arguments are the same."""
  _choice("split", split, SPLITS)
  _choice("task", task, TASKS)
  vocab_size = checks.positive_int("vocab_size", vocab_size)
  num_tags = checks.positive_int("num_tags", num_tags)
  sequence_length = checks.positive_int("sequence_length", sequence_length)
  _choice("token_ids", token_ids, TOKEN_IDS)
  max_clients = checks.positive_int(
    "max_clients", max_clients, allow_none=True, hint=" (None: every client)"
  )
  progress = _check_bool("progress", progress)
  search = download.search_folders(search)
  cache = download.data_dir(data_dir)
  params = {
    "version": _VERSION,
    "split": split,
    "task": task,
    "vocab_size": vocab_size,
    "max_clients": max_clients,
    "archive": REMOTE_FILES["stackoverflow"].sha256,
    "word_counts": REMOTE_FILES["stackoverflow.word_count"].sha256,
  }
  if task == "nwp":
    params |= {"sequence_length": sequence_length, "token_ids": token_ids}
  else:
    params |= {
      "num_tags": num_tags,
      "tag_counts": REMOTE_FILES["stackoverflow.tag_count"].sha256,
    }

  def build() -> dict[str, np.ndarray]:
    h5 = _archive_member(
      "stackoverflow", f"stackoverflow_{split}.h5", cache, search, progress
    )
    words = _words(vocab_size, cache, search, progress)
    if task == "nwp":
      special = stackoverflow_special_tokens(vocab_size, token_ids)
      lookup = {w: special.first_word + k for k, w in enumerate(words)}

      def encode(sentences):
        return _nwp_arrays(
          sentences, lookup, special, sequence_length, token_ids == "tff"
        )

      return _read_split(
        h5, task, max_clients, encode, 8 * sequence_length, ("tokens",)
      )
    tags = _tags(num_tags, cache, search, progress)
    word_index = {w: k for k, w in enumerate(words)}
    tag_index = {t: k for k, t in enumerate(tags)}

    def encode(tokens, titles, tag_strings):
      return _tag_arrays(tokens, titles, tag_strings, word_index, tag_index)

    return _read_split(
      h5,
      task,
      max_clients,
      encode,
      4 * (vocab_size + num_tags),
      ("tokens", "title", "tags"),
    )

  return _to_dataset(
    download.cached(f"stackoverflow_{task}_{split}", params, build, cache)
  )


def stackoverflow(
  task: str = "nwp",
  *,
  vocab_size: int = 10000,
  num_tags: int = 500,
  sequence_length: int = 20,
  token_ids: str = "fedjax",
  data_dir: str | os.PathLike | None = None,
  search: Sequence[str | os.PathLike] = (),
  progress: bool = True,
  max_clients: int | None = None,
) -> tuple[FederatedDataset, FederatedDataset]:
  """Federated Stack Overflow ``(train, test)`` from TFF's HDF5 release.

  See the module docstring for the files, the preprocessing and memory.

  Args:
    task: ``"nwp"`` (next-word prediction) or ``"tag"`` (tag prediction).
    vocab_size: words in the vocabulary, most frequent first (10000 in
      FedJAX and TFF's baselines).
    num_tags: tags in the label vocabulary (``"tag"`` only; TFF: 500).
    sequence_length: tokens per input/target sequence (``"nwp"`` only;
      TFF's default and FedJAX's training length: 20).
    token_ids: ``"fedjax"`` (PAD 0, BOS 1, EOS 2, word ``k`` -> ``k + 3``,
      OOV ``V + 3``) or ``"tff"`` (PAD 0, word ``k`` -> ``k + 1``, OOV
      ``V + 1``, BOS ``V + 2``, EOS ``V + 3``); ``"nwp"`` only. See
      :func:`stackoverflow_special_tokens`.
    data_dir: the download, extraction and cache folder (default
      ``$FEDJAX_LITE_DATA`` or ``~/.cache/fedjax_lite``).
    search: folders that may already hold TFF's ``.tar.bz2`` files (e.g.
      ``~/.keras/datasets``); their SHA-256 digests are checked.
    progress: show download progress.
    max_clients: keep the first this many client ids (sorted) of each
      split; None keeps all (342,477 train users; see Memory).

  Returns:
    ``(train, test)`` :class:`FederatedDataset` with TFF's user ids.
    ``"nwp"``: ``x``, ``y`` int32 ``[n, sequence_length]``. ``"tag"``: ``x``
    float32 ``[n, vocab_size]`` (normalized bag of words), ``y`` float32
    ``[n, num_tags]`` (tag counts, 0/1 for distinct tags).

  Raises:
    ValueError: an argument outside the allowed values, a vocabulary size
      above what the count files list, or malformed files.
    MemoryError: the requested split does not fit in memory.
  """
  kw = dict(
    task=task,
    vocab_size=vocab_size,
    num_tags=num_tags,
    sequence_length=sequence_length,
    token_ids=token_ids,
    data_dir=data_dir,
    search=search,
    progress=progress,
    max_clients=max_clients,
  )
  return stackoverflow_split("train", **kw), stackoverflow_split("test", **kw)
