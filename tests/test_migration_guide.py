"""docs/migrating.md runs: every executable ```python block, section by section.

Blocks fenced as plain ```python are fedjax_lite code and run here, in file
order, one namespace per ``## `` section. Blocks of the other frameworks
(```python tff, ```python fedjax, ```python flower) are shown, not run.

The file also checks the guide's statement about Adam's epsilon (TFF's Keras-
style Adam vs optax) with a float64 numpy reference, independently of the
guide's own snippet.
"""

from __future__ import annotations

import pathlib
import re

import jax.numpy as jnp
import numpy as np
import optax
import pytest

GUIDE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "migrating.md"
RUN = "python"
SHOWN = ("python tff", "python fedjax", "python flower")
_FENCE = re.compile(r"^```(.*)$")


def parse_guide(text: str) -> list[tuple[str, list[tuple[int, str]]]]:
  """``[(section title, [(first line number, code), ...]), ...]``.

  Only plain ``python`` blocks are collected; other labels must be one of
  ``SHOWN`` (a typo such as ```pyhton would otherwise silently skip a block).
  """
  sections: list[tuple[str, list[tuple[int, str]]]] = [("(preamble)", [])]
  lines = text.splitlines()
  i = 0
  while i < len(lines):
    line = lines[i]
    if line.startswith("## "):
      sections.append((line[3:].strip(), []))
    m = _FENCE.match(line)
    if m:
      label = m.group(1).strip()
      start = i + 1
      i += 1
      while i < len(lines) and lines[i].rstrip() != "```":
        i += 1
      if i == len(lines):
        raise ValueError(f"{GUIDE.name}:{start}: unterminated code block.")
      if label.startswith("python"):
        if label == RUN:
          sections[-1][1].append((start + 1, "\n".join(lines[start:i])))
        elif label not in SHOWN:
          raise ValueError(
            f"{GUIDE.name}:{start}: unknown block label "
            f"{label!r}; expected {RUN!r} or one of {SHOWN}."
          )
    i += 1
  return [(title, blocks) for title, blocks in sections if blocks]


SECTIONS = parse_guide(GUIDE.read_text(encoding="utf-8"))


def test_guide_has_runnable_sections():
  titles = [t for t, _ in SECTIONS]
  for framework in (
    "TensorFlow Federated",
    "FedJAX",
    "Flower",
    "numeric differences",
  ):
    assert any(framework in t for t in titles), (framework, titles)
  assert sum(len(b) for _, b in SECTIONS) >= 15


@pytest.mark.parametrize(
  "title,blocks",
  SECTIONS,
  ids=[t.split(" ")[0] + "_" + t.split(" ")[-1] for t, _ in SECTIONS],
)
def test_guide_section_runs(title, blocks):
  namespace = {"__name__": f"migrating_guide_{len(title)}"}
  for line, code in blocks:
    # Padding with newlines makes tracebacks point at the guide's lines.
    source = "\n" * (line - 1) + code
    exec(compile(source, str(GUIDE), "exec"), namespace)  # noqa: S102


# ---------------------------------------------------------------- Adam eps
def keras_adam_steps(w, grads, lr, b1, b2, eps):
  """TFF's ``build_adam`` / Keras Adam in float64: the bias correction
  scales the step size and epsilon is added to ``sqrt(v)``:
  ``w -= lr sqrt(1-b2^t)/(1-b1^t) m / (sqrt(v) + eps)``."""
  w = np.array(w, np.float64)
  m = np.zeros_like(w)
  v = np.zeros_like(w)
  for t, g in enumerate(grads, start=1):
    g = np.asarray(g, np.float64)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    w = w - lr * np.sqrt(1 - b2**t) / (1 - b1**t) * m / (np.sqrt(v) + eps)
  return w


def paper_adam_steps(w, grads, lr, b1, b2, eps):
  """Kingma & Ba's Algorithm 1 (optax's placement) in float64:
  ``w -= lr m_hat / (sqrt(v_hat) + eps)``."""
  w = np.array(w, np.float64)
  m = np.zeros_like(w)
  v = np.zeros_like(w)
  for t, g in enumerate(grads, start=1):
    g = np.asarray(g, np.float64)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    w = w - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
  return w


def optax_adam_steps(w, grads, lr, b1, b2, eps):
  opt = optax.adam(lr, b1=b1, b2=b2, eps=eps)
  w = jnp.asarray(w, jnp.float32)
  state = opt.init(w)
  for g in grads:
    updates, state = opt.update(jnp.asarray(g, jnp.float32), state, w)
    w = optax.apply_updates(w, updates)
  return np.asarray(w, np.float64)


@pytest.fixture(scope="module")
def adam_problem():
  r = np.random.default_rng(3)
  w0 = r.standard_normal(6)
  # Small pseudo-gradients (as a server sees late in training): there
  # sqrt(v) is comparable to epsilon and the placement matters.
  grads = [1e-3 * r.standard_normal(6) for _ in range(3)]
  return w0, grads


def test_adam_epsilon_zero_keras_equals_optax(adam_problem):
  w0, grads = adam_problem
  keras = keras_adam_steps(w0, grads, 0.01, 0.9, 0.999, 0.0)
  paper = paper_adam_steps(w0, grads, 0.01, 0.9, 0.999, 0.0)
  np.testing.assert_allclose(keras, paper, rtol=1e-12)
  # optax runs in float32: compare the displacement w - w0 (about 0.03 per
  # coordinate after 3 steps) to float32 resolution of w.
  got = optax_adam_steps(w0, grads, 0.01, 0.9, 0.999, 0.0)
  np.testing.assert_allclose(got - w0, keras - w0, rtol=1e-4, atol=1e-6)


def test_adam_epsilon_positive_keras_differs_from_optax(adam_problem):
  w0, grads = adam_problem
  eps = 1e-3
  keras = keras_adam_steps(w0, grads, 0.01, 0.9, 0.999, eps)
  paper = paper_adam_steps(w0, grads, 0.01, 0.9, 0.999, eps)
  got = optax_adam_steps(w0, grads, 0.01, 0.9, 0.999, eps)
  # optax follows the paper's placement ...
  np.testing.assert_allclose(got - w0, paper - w0, rtol=1e-4, atol=1e-6)
  # ... and the Keras-style steps are measurably different: relative to the
  # distance travelled, by more than 10% here.
  travelled = np.linalg.norm(paper - w0)
  assert np.linalg.norm(keras - paper) > 0.1 * travelled
