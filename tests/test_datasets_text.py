"""Stack Overflow (next-word and tag prediction) and TFF's Shakespeare.

The tests write small files in the publishers' formats (TFF's HDF5
``/examples/<client>/<feature>`` groups of byte strings inside ``.tar.bz2``
archives with the files at the top, the word-count text file and the
tag-count JSON), point the loaders' ``REMOTE_FILES`` at them (their own
SHA-256) and hand them over through ``search=`` folders, or an HTTP server on
127.0.0.1. The expected arrays come from plain-Python re-implementations of
FedJAX's and TFF's preprocessing written here.
"""

import functools
import hashlib
import http.server
import importlib
import io
import json
import tarfile
import threading

import h5py
import numpy as np
import pytest

from fedjax_lite.datasets import download
from fedjax_lite.datasets.download import RemoteFile

SO = importlib.import_module("fedjax_lite.datasets.stackoverflow")
SH = importlib.import_module("fedjax_lite.datasets.shakespeare")

UNREACHABLE = "http://127.0.0.1:9/"  # discard port: a download would fail

# ------------------------------------------------------------ file writing
WORD_COUNT = """the 900
. 800
to 700
i 600
a 500
is 400
, 300
you 200
it 100
code 90
in 80
this 70
"""
WORDS = [line.split()[0] for line in WORD_COUNT.splitlines()]
# Ties (java, c++, sql: 5) keep the file's order under the stable sort.
TAG_COUNT = {"java": 5, "python": 7, "c++": 5, "sql": 5, "go": 1}

STACKOVERFLOW = {
  "train": {
    "00000002": [
      # (tokens, title, tags, type)
      ("i want to use a function .", "a question", "python|java", "question"),
      ("the code is here", "a question", "python|java", "answer"),
      ("you , .", "it is", "c++", "answer"),
      ("", "", "", "answer"),
      ("it  is", "to you", "python|python", "question"),
      ("a b c d e", "the title", "sql|c++", "answer"),
      ("the the the the the the", "is it", "unknown|java", "question"),
    ],
    "00000010": [
      ("this is it .", "code in", "go", "question"),
      ("to be , or not to be , that is the question", "to", "java", "answer"),
    ],
    "00000050": [],
    "00000100": [("in", "the", "python", "answer")],
  },
  "held_out": {"00000020": [("you is a", "you", "java|sql", "question")]},
  "test": {
    "00000003": [("i use it .", "why", "c++|go", "question")],
    "00000010": [
      ("is this the a", "", "python", "answer"),
      ("a", "a . a", "java|c++", "answer"),
    ],
  },
}


def _sha256(path):
  return hashlib.sha256(path.read_bytes()).hexdigest()


def _tar_bz2(path, members: dict):
  """A ``.tar.bz2`` holding ``{name: bytes}`` at its top level."""
  with tarfile.open(path, "w:bz2") as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return path


def _h5_bytes(tmp_path, name, clients, write_client):
  path = tmp_path / name
  with h5py.File(path, "w") as f:
    examples = f.create_group("examples")
    for cid, rows in clients.items():
      write_client(examples.create_group(cid), rows)
  data = path.read_bytes()
  path.unlink()
  return data


def _strings(values, vlen):
  data = [v.encode() for v in values]
  if vlen:  # variable-length byte strings
    return np.array(data, dtype=h5py.string_dtype("ascii"))
  return np.array(data, dtype="S") if data else np.zeros(0, "S1")


def _so_client(vlen):
  def write(group, rows):
    cols = list(zip(*rows)) if rows else [(), (), (), ()]
    for name, values in zip(("tokens", "title", "tags", "type"), cols):
      group.create_dataset(name, data=_strings(values, vlen))
    n = len(rows)
    group.create_dataset(
      "creation_date", data=_strings(["2010-01-08 09:34:05 UTC"] * n, vlen)
    )
    group.create_dataset("score", data=np.arange(n, dtype=np.int64))

  return write


def _publish(monkeypatch, module, key, path):
  monkeypatch.setitem(
    module.REMOTE_FILES,
    key,
    RemoteFile(path.name, UNREACHABLE + path.name, _sha256(path)),
  )


@pytest.fixture
def so(tmp_path, monkeypatch):
  """TFF's three Stack Overflow archives in a search folder."""
  folder = tmp_path / "downloads"
  folder.mkdir()
  h5 = {
    f"stackoverflow_{split}.h5": _h5_bytes(
      tmp_path, f"{split}.h5", clients, _so_client(split != "test")
    )
    for split, clients in STACKOVERFLOW.items()
  }
  archives = {
    "stackoverflow": _tar_bz2(folder / "stackoverflow.tar.bz2", h5),
    "stackoverflow.word_count": _tar_bz2(
      folder / "stackoverflow.word_count.tar.bz2",
      {"stackoverflow.word_count": WORD_COUNT.encode()},
    ),
    "stackoverflow.tag_count": _tar_bz2(
      folder / "stackoverflow.tag_count.tar.bz2",
      {"stackoverflow.tag_count": json.dumps(TAG_COUNT).encode()},
    ),
  }
  for key, path in archives.items():
    _publish(monkeypatch, SO, key, path)
  return {"search": [folder], "data_dir": tmp_path / "data", "progress": False}


# ----------------------------------------------- reference preprocessing
def fedjax_nwp(sentence, vocab, length):
  """FedJAX's StackoverflowTokenizer: [BOS] ids [EOS], shift, pad/truncate."""
  v = len(vocab)
  ids = [
    vocab.index(w) + 3 if w in vocab else v + 3 for w in sentence.split(" ")
  ]
  full = [1] + ids + [2]
  return (full[:-1] + [0] * length)[:length], (full[1:] + [0] * length)[:length]


def tff_nwp(sentence, vocab, length):
  """TFF's word_prediction_preprocessing.build_to_ids_fn + batch_and_split."""
  v = len(vocab)
  words = sentence.split(" ")[:length]
  ids = [vocab.index(w) + 1 if w in vocab else v + 1 for w in words]
  if len(ids) < length:
    ids.append(v + 3)
  seq = [v + 2] + ids
  seq += [0] * (length + 1 - len(seq))
  return seq[:-1], seq[1:]


def tff_tag(tokens, title, tags, vocab, tag_vocab):
  """TFF's tag_prediction_preprocessing.build_to_ids_fn (one-hot mean/sum),
  the tags as a multi-hot vector (capped at 1)."""
  words = (tokens + " " + title).split()
  x = np.zeros(len(vocab), np.float32)
  for w in words:
    if w in vocab:
      x[vocab.index(w)] += 1
  if words:
    x = x / np.float32(len(words))
  y = np.zeros(len(tag_vocab), np.float32)
  for t in tags.split("|"):
    if t in tag_vocab:
      y[tag_vocab.index(t)] = 1
  return x, y


def ref_tags(num_tags):
  return [t for t, _ in sorted(TAG_COUNT.items(), key=lambda kv: -kv[1])][
    :num_tags
  ]


def expected_clients(split, max_clients=None):
  ids = [c for c in sorted(STACKOVERFLOW[split]) if STACKOVERFLOW[split][c]]
  if max_clients is not None:
    ids = [c for c in sorted(STACKOVERFLOW[split])[:max_clients] if c in ids]
  return ids


def _check_clients(ds, split, row_fn, max_clients=None):
  ids = expected_clients(split, max_clients)
  assert ds.client_ids == tuple(ids)
  for k, cid in enumerate(ids):
    client = ds.client(k)
    rows = [row_fn(*r) for r in STACKOVERFLOW[split][cid]]
    np.testing.assert_array_equal(client["x"], np.array([r[0] for r in rows]))
    np.testing.assert_array_equal(client["y"], np.array([r[1] for r in rows]))


# ---------------------------------------------------------- Stack Overflow
@pytest.mark.parametrize("length", [6, 3])
def test_nwp_fedjax_ids_match_fedjax_tokenizer(so, length):
  vocab = WORDS[:8]
  train, test = SO.stackoverflow(
    "nwp", vocab_size=8, sequence_length=length, **so
  )
  for ds, split in ((train, "train"), (test, "test")):
    assert ds.features["x"].dtype == np.int32
    assert ds.features["y"].dtype == np.int32
    assert ds.features["x"].shape == (ds.num_examples, length)
    _check_clients(ds, split, lambda t, *_: fedjax_nwp(t, vocab, length))
  x, y = train.features["x"], train.features["y"]
  tok = SO.stackoverflow_special_tokens(8)
  assert (tok.pad, tok.bos, tok.eos, tok.oov, tok.num_classes) == (
    0,
    1,
    2,
    11,
    12,
  )
  assert np.all(x[:, 0] == tok.bos) and not np.any(x == tok.eos)
  assert np.any(y == tok.oov) and np.any(y == tok.eos)
  assert x.max() < tok.num_classes and y.max() < tok.num_classes


def test_nwp_tff_ids_match_tff_preprocessing(so):
  vocab = WORDS[:8]
  train, test = SO.stackoverflow(
    "nwp", vocab_size=8, sequence_length=6, token_ids="tff", **so
  )
  for ds, split in ((train, "train"), (test, "test")):
    _check_clients(ds, split, lambda t, *_: tff_nwp(t, vocab, 6))
  tok = SO.stackoverflow_special_tokens(8, "tff")
  assert (tok.pad, tok.oov, tok.bos, tok.eos) == (0, 9, 10, 11)
  x = train.features["x"]
  # "you , ." (3 words): BOS you , . EOS PAD; TFF keeps EOS in the inputs.
  np.testing.assert_array_equal(x[2], [10, 8, 7, 2, 11, 0])
  np.testing.assert_array_equal(train.features["y"][2], [8, 7, 2, 11, 0, 0])


def test_tag_prediction_bag_of_words_and_multi_hot(so):
  vocab, tags = WORDS[:8], ref_tags(3)
  assert tags == ["python", "java", "c++"]  # ties in the file's order
  train, test = SO.stackoverflow("tag", vocab_size=8, num_tags=3, **so)
  for ds, split in ((train, "train"), (test, "test")):
    assert ds.features["x"].dtype == np.float32
    assert ds.features["y"].dtype == np.float32
    assert ds.features["x"].shape == (ds.num_examples, 8)
    assert ds.features["y"].shape == (ds.num_examples, 3)
    _check_clients(
      ds, split, lambda t, ti, tg, _: tff_tag(t, ti, tg, vocab, tags)
    )
  x, y = train.features["x"], train.features["y"]
  assert np.all(x.sum(1) <= 1 + 1e-6)
  # "the the the the the the" + "is it": 8 words, 6 "the", 1 "is", 1 OOV.
  np.testing.assert_allclose(x[6, :], [6 / 8, 0, 0, 0, 0, 1 / 8, 0, 0])
  np.testing.assert_array_equal(y[4], [1, 0, 0])  # "python|python": 1
  np.testing.assert_array_equal(x[3], np.zeros(8))  # no word at all


def test_vocab_special_tokens_held_out_and_max_clients(so):
  words, tags = SO.stackoverflow_vocab(5, 4, **so)
  assert words == WORDS[:5] and tags == ["python", "java", "c++", "sql"]
  fed, tff = (
    SO.stackoverflow_special_tokens(token_ids=t) for t in ("fedjax", "tff")
  )
  assert (fed.pad, fed.bos, fed.eos, fed.oov, fed.first_word) == (
    0,
    1,
    2,
    10003,
    3,
  )
  assert (tff.pad, tff.oov, tff.bos, tff.eos, tff.first_word) == (
    0,
    10001,
    10002,
    10003,
    1,
  )
  assert fed.num_classes == tff.num_classes == 10004
  held = SO.stackoverflow_split("held_out", vocab_size=8, **so)
  _check_clients(held, "held_out", lambda t, *_: fedjax_nwp(t, WORDS[:8], 20))
  # The first 3 sorted ids of train include the empty client, dropped.
  train, test = SO.stackoverflow(vocab_size=8, max_clients=3, **so)
  assert train.client_ids == ("00000002", "00000010")
  assert test.client_ids == ("00000003", "00000010")
  _check_clients(
    train, "train", lambda t, *_: fedjax_nwp(t, WORDS[:8], 20), max_clients=3
  )


def test_preprocessed_splits_are_cached(so, monkeypatch):
  first = SO.stackoverflow("tag", vocab_size=8, num_tags=3, **so)

  def no_fetch(*args, **kwargs):
    raise AssertionError("fetch called although the cache holds the split")

  monkeypatch.setattr(download, "fetch", no_fetch)
  again = SO.stackoverflow("tag", vocab_size=8, num_tags=3, **so)
  for a, b in zip(first, again):
    assert a.client_ids == b.client_ids
    np.testing.assert_array_equal(a.features["x"], b.features["x"])
    np.testing.assert_array_equal(a.features["y"], b.features["y"])
  with pytest.raises(AssertionError, match="fetch called"):
    SO.stackoverflow("tag", vocab_size=7, num_tags=3, **so)  # new key


@pytest.mark.parametrize(
  "kwargs, error, match",
  [
    ({"task": "lm"}, ValueError, r"task must be one of \('nwp', 'tag'\)"),
    ({"vocab_size": 0}, ValueError, "vocab_size must be a positive int"),
    ({"num_tags": 2.5}, ValueError, "num_tags must be a positive int"),
    ({"sequence_length": True}, ValueError, "sequence_length must be"),
    ({"max_clients": 0}, ValueError, r"max_clients must be .*got 0"),
    ({"token_ids": "keras"}, ValueError, "token_ids must be one of"),
    ({"progress": "no"}, TypeError, "progress must be True or False"),
    ({"search": [3]}, TypeError, "search must hold folder paths"),
  ],
)
def test_stackoverflow_argument_errors(kwargs, error, match):
  with pytest.raises(error, match=match):
    SO.stackoverflow(**kwargs)


def test_stackoverflow_file_errors(so, tmp_path, monkeypatch):
  with pytest.raises(ValueError, match="vocab_size=13 but .* lists 12 words"):
    SO.stackoverflow(vocab_size=13, **so)
  with pytest.raises(ValueError, match="num_tags=6 but .* lists 5 tags"):
    SO.stackoverflow("tag", vocab_size=8, num_tags=6, **so)
  with pytest.raises(ValueError, match="split must be one of"):
    SO.stackoverflow_split("validation", **so)
  with monkeypatch.context() as m:
    m.setattr(SO, "_physical_memory", lambda: 100)
    with pytest.raises(MemoryError, match=r"need .* pass max_clients=1 "):
      SO.stackoverflow("tag", vocab_size=8, num_tags=3, **so)
  # A split whose client lacks a feature, and a malformed word-count file.
  folder = tmp_path / "broken"
  folder.mkdir()

  def no_title(group, rows):
    group.create_dataset("tokens", data=_strings(["a b"], True))

  bad = _h5_bytes(tmp_path, "bad.h5", {"7": [None]}, no_title)
  archive = _tar_bz2(
    folder / "stackoverflow.tar.bz2", {"stackoverflow_train.h5": bad}
  )
  _publish(monkeypatch, SO, "stackoverflow", archive)
  counts = _tar_bz2(
    folder / "stackoverflow.word_count.tar.bz2",
    {"stackoverflow.word_count": b"the 9\nbroken line here\n"},
  )
  _publish(monkeypatch, SO, "stackoverflow.word_count", counts)
  opts = dict(so, search=[folder, *so["search"]], data_dir=tmp_path / "data2")
  with pytest.raises(ValueError, match=r"line 2: .*expected '<word> <count>'"):
    SO.stackoverflow_split("train", vocab_size=2, **opts)
  with pytest.raises(ValueError, match=r"/examples/7 has no dataset\(s\)"):
    SO.stackoverflow_split("train", "tag", vocab_size=1, num_tags=1, **opts)


# --------------------------------------------------------- TFF Shakespeare
CHARS = (
  "dhlptx@DHLPTX $(,048cgkoswCGKOSW[_#'/37;?bfjnrvzBFJNRVZ\"&*.26:\n"
  "aeimquyAEIMQUY]!%)-159\r"
)  # FedJAX's vocabulary: label 3 + position
SHAKESPEARE = {
  "train": {
    "THE_TRAGEDY_OF_KING_LEAR_KING": [
      "Meantime we shall express our darker purpose.",
      "Give me the map there.\nKnow that we have divided",
    ],
    "ALLS_WELL_THAT_ENDS_WELL_BERTRAM": ["Madam, I {take} ~leave~."],
    "MUCH_ADO_ABOUT_NOTHING_OTHELLO": ["O!", "", "x" * 200],
  },
  "test": {
    "THE_TRAGEDY_OF_KING_LEAR_KING": ["Nothing, my lord."],
    "ALLS_WELL_THAT_ENDS_WELL_BERTRAM": ["And I in going, madam."],
    "MUCH_ADO_ABOUT_NOTHING_OTHELLO": ["No."],
  },
}


def fedjax_chars(snippets, length):
  """FedJAX's shakespeare.preprocess_client, written out with lists."""
  joined = []
  for s in snippets:
    joined += [1] + [CHARS.index(c) + 3 if c in CHARS else 89 for c in s] + [2]
  x, y = joined[:-1], joined[1:]
  rows = -(-len(x) // length)
  pad = [0] * (rows * length - len(x))
  return (
    np.array(x + pad).reshape(rows, length),
    np.array(y + pad).reshape(rows, length),
  )


@pytest.fixture
def tff_shakespeare(tmp_path):
  folder = tmp_path / "served"
  folder.mkdir()

  def write(group, snippets):
    group.create_dataset(
      "snippets", data=_strings(snippets, vlen=len(snippets) != 1)
    )

  members = {
    f"shakespeare_{split}.h5": _h5_bytes(tmp_path, f"{split}.h5", c, write)
    for split, c in SHAKESPEARE.items()
  }
  return _tar_bz2(folder / "shakespeare.tar.bz2", members)


@pytest.mark.parametrize("length", [80, 7])
def test_tff_shakespeare_matches_fedjax(
  tff_shakespeare, tmp_path, monkeypatch, length
):
  _publish(monkeypatch, SH, "shakespeare", tff_shakespeare)
  train, test = SH.shakespeare(
    source="tff",
    seq_len=length,
    data_dir=tmp_path / "data",
    search=[tff_shakespeare.parent],
    progress=False,
  )
  for ds, split in ((train, "train"), (test, "test")):
    ids = sorted(SHAKESPEARE[split])
    assert ds.client_ids == tuple(ids)
    assert ds.features["x"].dtype == ds.features["y"].dtype == np.int32
    for k, cid in enumerate(ids):
      x, y = fedjax_chars(SHAKESPEARE[split][cid], length)
      np.testing.assert_array_equal(ds.client(k)["x"], x)
      np.testing.assert_array_equal(ds.client(k)["y"], y)
  x = train.features["x"]
  assert x.max() == SH.FEDJAX_OOV == 89 and SH.FEDJAX_VOCAB_SIZE == 90
  assert "{" not in CHARS and "~" not in CHARS
  small = SH.shakespeare(
    source="tff",
    seq_len=length,
    max_clients=2,
    data_dir=tmp_path / "data",
    progress=False,
  )  # served from the cache: no search folder needed
  for ds in small:
    assert ds.client_ids == tuple(sorted(SHAKESPEARE["train"])[:2])


def test_fedjax_char_sequences_docstring_example():
  a, b, c, d, e = (CHARS.index(ch) + 3 for ch in "ABCDE")
  x, y = SH.fedjax_char_sequences([b"ABCD", b"E"], 3)
  np.testing.assert_array_equal(x, [[1, a, b], [c, d, 2], [1, e, 0]])
  np.testing.assert_array_equal(y, [[a, b, c], [d, 2, 1], [e, 2, 0]])


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
  def log_message(self, *args):
    pass


def test_tff_shakespeare_downloads_from_a_server(
  tff_shakespeare, tmp_path, monkeypatch
):
  handler = functools.partial(
    _QuietHandler, directory=str(tff_shakespeare.parent)
  )
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    url = f"http://127.0.0.1:{server.server_address[1]}/shakespeare.tar.bz2"
    remote = RemoteFile("shakespeare.tar.bz2", url, _sha256(tff_shakespeare))
    monkeypatch.setitem(SH.REMOTE_FILES, "shakespeare", remote)
    train, test = SH.shakespeare(
      source="tff", data_dir=tmp_path / "data", progress=False, cache=False
    )
  finally:
    server.shutdown()
    server.server_close()
  assert (tmp_path / "data" / "shakespeare.tar.bz2").is_file()
  assert train.num_clients == test.num_clients == 3
  x, _ = fedjax_chars(SHAKESPEARE["test"]["MUCH_ADO_ABOUT_NOTHING_OTHELLO"], 80)
  np.testing.assert_array_equal(test.client(1)["x"], x)


@pytest.mark.parametrize(
  "kwargs, error, match",
  [
    (
      {"source": "leaf"},
      ValueError,
      r"source must be one of \('plays', 'tff'\)",
    ),
    (
      {"source": "tff", "train_fraction": 0.5},
      ValueError,
      "train_fraction=0.5 apply to source='plays' only",
    ),
    (
      {"source": "tff", "max_clients": -1},
      ValueError,
      "max_clients must be a positive int",
    ),
    ({"source": "tff", "seq_len": 0}, ValueError, "seq_len must be"),
    (
      {"source": "tff", "cache": "yes"},
      TypeError,
      "cache must be True or False",
    ),
    (
      {"source": "plays", "search": ["/tmp"]},
      ValueError,
      "search applies to source='tff' only",
    ),
    (
      {"data_dir": "/tmp"},
      ValueError,
      "data_dir applies to source='tff' only",
    ),
  ],
)
def test_shakespeare_source_argument_errors(kwargs, error, match):
  with pytest.raises(error, match=match):
    SH.shakespeare(**kwargs)


def test_tff_shakespeare_needs_snippets(tmp_path, monkeypatch):
  folder = tmp_path / "bad"
  folder.mkdir()

  def write(group, rows):
    group.create_dataset("text", data=_strings(rows, vlen=True))

  h5 = _h5_bytes(tmp_path, "t.h5", {"ROLE": ["hi"]}, write)
  archive = _tar_bz2(
    folder / "shakespeare.tar.bz2",
    {"shakespeare_train.h5": h5, "shakespeare_test.h5": h5},
  )
  _publish(monkeypatch, SH, "shakespeare", archive)
  with pytest.raises(
    ValueError, match=r"client 'ROLE' has features \['text'\]"
  ):
    SH.shakespeare(
      source="tff", data_dir=tmp_path / "d", search=[folder], progress=False
    )
