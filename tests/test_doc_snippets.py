"""Every ```python block of README.md and docs/*.md runs, as written.

Blocks of one file run in file order in one shared namespace, in a fresh
temporary working directory. Fence labels:

* ```python: fedjax_lite code, run here;
* ```python tff / ```python fedjax / ```python flower: another framework's
  code, shown for comparison and never run (their libraries are not
  installed beside this project's JAX);
* any other ```python... label is an error (a typo would skip a block).

A block whose first line is ``# snippet: skip (reason)`` is shown but not
run; the reason is required and reported as the test's skip reason. Blocks
are small by construction (tiny datasets, few rounds), so none is
shortened behind the reader's back.

docs/migrating.md runs in tests/test_migration_guide.py (one namespace per
``##`` section, its sections being independent); this file checks that it
is covered there and runs the others.

README.md runs in a child process (a fresh interpreter, as a reader runs
it) compiled at XLA's optimization level 1 instead of the suite's 0: its
quick tour trains 100 rounds of 20 local epochs, a run that level 0's
unoptimized code makes about 2.4x slower (47.5 s against 19.6 s on 2 cores).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import traceback
from typing import NamedTuple

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUN = "python"
SHOWN = ("python tff", "python fedjax", "python flower")
SKIP = re.compile(r"^#\s*snippet:\s*skip\s*\((?P<reason>.+)\)\s*$")
_FENCE = re.compile(r"^\s*```(?P<label>.*)$")
# Files whose blocks another test runs: path -> that test file.
COVERED_ELSEWHERE = {"docs/migrating.md": "tests/test_migration_guide.py"}


class Block(NamedTuple):
  """One fenced block: its first code line (1-based), code, skip reason."""

  line: int
  code: str
  skip: str | None


class SnippetError(AssertionError):
  """A block that failed: the message names the file and the block's line."""


def extract_blocks(text: str, name: str) -> list[Block]:
  """The runnable ``python`` blocks of markdown ``text`` (named ``name`` in
  errors), in order. Raises ``ValueError`` for an unterminated block, an
  unknown ``python...`` label or a skip marker without a reason."""
  lines = text.splitlines()
  blocks = []
  i = 0
  while i < len(lines):
    m = _FENCE.match(lines[i])
    if not m:
      i += 1
      continue
    label, start = m.group("label").strip(), i + 1
    indent = len(lines[i]) - len(lines[i].lstrip())
    i += 1
    while i < len(lines) and lines[i].strip() != "```":
      i += 1
    if i == len(lines):
      raise ValueError(f"{name}:{start}: unterminated code block.")
    body = [ln[indent:] for ln in lines[start:i]]
    i += 1
    if not label.startswith("python") or label in SHOWN:
      continue
    if label != RUN:
      raise ValueError(
        f"{name}:{start}: unknown block label {label!r}; expected {RUN!r} "
        f"or one of {SHOWN}."
      )
    skip = None
    first = body[0].strip() if body else ""
    if first.startswith("# snippet:"):
      sm = SKIP.match(first)
      if sm is None:
        raise ValueError(
          f"{name}:{start + 1}: expected '# snippet: skip (reason)', got "
          f"{first!r}."
        )
      skip = sm.group("reason").strip()
    blocks.append(Block(start + 1, "\n".join(body), skip))
  return blocks


def run_blocks(blocks: list[Block], name: str, workdir: pathlib.Path) -> list:
  """Runs ``blocks`` in order in one namespace with ``workdir`` as the
  working directory; returns the skipped blocks' ``(line, reason)``.

  Raises:
    SnippetError: ``"<name>:<line>: block failed: <error>"`` for the first
      block that raises (the traceback's lines are the file's).
  """
  namespace = {"__name__": "__doc_snippet__"}
  skipped = []
  old = os.getcwd()
  os.chdir(workdir)
  try:
    for block in blocks:
      if block.skip is not None:
        skipped.append((block.line, block.skip))
        continue
      # Leading newlines make tracebacks point at the markdown's lines.
      source = "\n" * (block.line - 1) + block.code
      try:
        exec(compile(source, name, "exec"), namespace)  # noqa: S102
      except Exception as e:
        raise SnippetError(
          f"{name}:{block.line}: block failed: {type(e).__name__}: {e}"
        ) from e
  finally:
    os.chdir(old)
  return skipped


def doc_files() -> list[str]:
  return ["README.md"] + sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")
  )


RUN_HERE = [
  f
  for f in doc_files()
  if f not in COVERED_ELSEWHERE
  and extract_blocks((ROOT / f).read_text(encoding="utf-8"), f)
]


# Files run in a child process compiled at optimization level 1 (see the
# module docstring): path -> XLA's backend optimization level.
IN_CHILD = {"README.md": 1}
_CHILD = """
import json, pathlib, sys
sys.path.insert(0, sys.argv[3])
from test_doc_snippets import ROOT, SnippetError, extract_blocks, run_blocks
path = sys.argv[1]
blocks = extract_blocks((ROOT / path).read_text(encoding="utf-8"), path)
try:
  skipped = run_blocks(blocks, path, pathlib.Path(sys.argv[2]))
except SnippetError as e:
  print("SNIPPET_ERROR " + json.dumps(str(e)))
  raise SystemExit(1)
print("SNIPPET_DONE " + json.dumps([len(blocks), len(skipped)]))
"""


def run_file_in_child(path: str, workdir: pathlib.Path, level: int) -> tuple:
  """``(blocks, skipped)`` of ``path`` run by ``run_blocks`` in a fresh
  interpreter whose XLA compiles at optimization level ``level`` (the
  suite's other settings kept: forced devices aside, the child makes its
  own). Raises ``SnippetError`` with the child's message when a block
  fails."""
  flags = [
    f
    for f in os.environ.get("XLA_FLAGS", "").split()
    if not f.startswith("--xla_backend_optimization_level")
  ]
  env = dict(os.environ, JAX_NUMPY_RANK_PROMOTION="raise")
  env["XLA_FLAGS"] = " ".join(
    flags + [f"--xla_backend_optimization_level={level}"]
  )
  proc = subprocess.run(
    [sys.executable, "-c", _CHILD, path, str(workdir), str(ROOT / "tests")],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith("SNIPPET_ERROR "):
      raise SnippetError(json.loads(line[len("SNIPPET_ERROR ") :]))
    if line.startswith("SNIPPET_DONE ") and proc.returncode == 0:
      return tuple(json.loads(line[len("SNIPPET_DONE ") :]))
  raise AssertionError(
    f"{path}: the child exited with {proc.returncode}:\n{proc.stderr[-3000:]}"
  )


@pytest.mark.parametrize("path", RUN_HERE)
def test_doc_file_runs(path, tmp_path):
  if path in IN_CHILD:
    num_blocks, num_skipped = run_file_in_child(path, tmp_path, IN_CHILD[path])
  else:
    blocks = extract_blocks((ROOT / path).read_text(encoding="utf-8"), path)
    num_blocks, num_skipped = (
      len(blocks),
      len(run_blocks(blocks, path, tmp_path)),
    )
  assert num_skipped < num_blocks, f"{path}: every block is skipped"


SKIPPED = [
  (f"{f}:{b.line}", b.skip)
  for f in RUN_HERE
  for b in extract_blocks((ROOT / f).read_text(encoding="utf-8"), f)
  if b.skip is not None
]


@pytest.mark.parametrize(
  "where,reason", SKIPPED, ids=[w for w, _ in SKIPPED] or None
)
def test_skipped_doc_block(where, reason):
  """Lists each block marked ``# snippet: skip`` in the test report."""
  pytest.skip(f"{where}: {reason}")


def test_every_doc_file_is_run():
  for path in doc_files():
    text = (ROOT / path).read_text(encoding="utf-8")
    blocks = extract_blocks(text, path)  # also checks every label
    if path in COVERED_ELSEWHERE:
      runner = (ROOT / COVERED_ELSEWHERE[path]).read_text(encoding="utf-8")
      assert pathlib.Path(path).name in runner, (path, COVERED_ELSEWHERE)
      assert blocks, path
  assert "README.md" in RUN_HERE and "docs/scale_out.md" in RUN_HERE
  assert set(IN_CHILD) <= set(RUN_HERE)


BROKEN = """# A page

```python
x = 1
```

Text between blocks.

```python tff
this is not run
```

```python
y = x + undefined_name
```
"""


def test_broken_block_fails_naming_file_and_line(tmp_path):
  blocks = extract_blocks(BROKEN, "docs/broken.md")
  assert [b.line for b in blocks] == [4, 14]
  with pytest.raises(
    SnippetError,
    match=r"^docs/broken\.md:14: block failed: NameError: name "
    r"'undefined_name' is not defined$",
  ) as info:
    run_blocks(blocks, "docs/broken.md", tmp_path)
  # The traceback points at the markdown file's own line.
  frames = traceback.extract_tb(info.value.__cause__.__traceback__)
  assert (frames[-1].filename, frames[-1].lineno) == ("docs/broken.md", 14)


def test_extractor_rejects_bad_labels_and_markers():
  with pytest.raises(
    ValueError, match=r"page\.md:1: unknown block label 'python3'"
  ):
    extract_blocks("```python3\nx = 1\n```\n", "page.md")
  with pytest.raises(ValueError, match=r"page\.md:1: unterminated code block"):
    extract_blocks("```python\nx = 1\n", "page.md")
  with pytest.raises(
    ValueError, match=r"page\.md:2: expected '# snippet: skip"
  ):
    extract_blocks("```python\n# snippet: skip\nx\n```\n", "page.md")


def test_skip_marker_is_honoured_with_its_reason(tmp_path):
  text = "```python\n# snippet: skip (needs a GPU)\nraise SystemExit\n```\n"
  blocks = extract_blocks(text, "page.md")
  assert blocks[0].skip == "needs a GPU"
  assert run_blocks(blocks, "page.md", tmp_path) == [(2, "needs a GPU")]


def test_broken_block_in_a_child_fails_naming_file_and_line(tmp_path):
  doc = tmp_path / "broken.md"
  doc.write_text(BROKEN, encoding="utf-8")
  with pytest.raises(
    SnippetError,
    match=rf"^{re.escape(str(doc))}:14: block failed: NameError: name "
    r"'undefined_name' is not defined$",
  ):
    run_file_in_child(str(doc), tmp_path, 1)
