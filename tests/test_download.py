"""fetch / extract / cached against an HTTP server on 127.0.0.1 started here.

The server counts requests, honours ``Range: bytes=N-`` with ``206``, can cut
the connection halfway through a body, and can ignore ``Range`` (``200``
with the whole file). Nothing here touches the internet.
"""

import hashlib
import http.server
import io
import json
import os
import re
import socket
import tarfile
import threading
import time
import zipfile

import numpy as np
import pytest

from fedjax_lite.datasets import download
from fedjax_lite.datasets.download import DownloadError, RemoteFile


class _Handler(http.server.BaseHTTPRequestHandler):
  def log_message(self, *args):  # keep pytest output clean
    pass

  def do_GET(self):
    state = self.server.state
    with state["lock"]:
      state["requests"].append((self.path, self.headers.get("Range")))
      cut = state["cut"] > 0
      state["cut"] -= cut
    data = state["files"].get(self.path)
    if data is None:
      self.send_error(404)
      return
    start = 0
    asked = self.headers.get("Range")
    if asked and not state["ignore_range"]:
      start = int(re.match(r"bytes=(\d+)-$", asked).group(1))
      if start >= len(data):
        self.send_error(416)
        return
      self.send_response(206)
      self.send_header(
        "Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}"
      )
    else:
      self.send_response(200)
    body = data[start:]
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    if cut:  # half the body, then close: the client sees a short read
      self.wfile.write(body[: len(body) // 2])
      self.wfile.flush()
      self.close_connection = True
      return
    self.wfile.write(body)


@pytest.fixture
def server():
  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
  httpd.state = {
    "files": {},
    "requests": [],
    "cut": 0,
    "ignore_range": False,
    "lock": threading.Lock(),
  }
  thread = threading.Thread(
    target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
  )
  thread.start()
  httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
  yield httpd
  httpd.shutdown()
  httpd.server_close()
  thread.join()


def serve(server, name, data):
  server.state["files"]["/" + name] = data
  return RemoteFile(
    name, f"{server.url}/{name}", hashlib.sha256(data).hexdigest(), len(data)
  )


def payload(n=300_000, seed=0):
  return np.random.default_rng(seed).integers(0, 256, n, np.uint8).tobytes()


def leftovers(cache):
  return sorted(
    p.name
    for p in cache.iterdir()
    if p.name.endswith(".part") or ".tmp-" in p.name
  )


# ------------------------------------------------------------ RemoteFile
@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(sha256="abc"), "sha256 must be 64 hexadecimal digits"),
    (dict(sha256="g" * 64), "sha256 must be 64 hexadecimal digits"),
    (dict(filename="a/b.bin"), "filename must be a plain file name"),
    (dict(filename=".."), "filename must be a plain file name"),
    (dict(url="ssh://host/x"), "url must be an http"),
    (dict(size=-1), "size must be an int >= 0 or None"),
  ],
)
def test_remote_file_validation(kwargs, match):
  args = dict(filename="a.bin", url="https://h/a.bin", sha256="0" * 64)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    RemoteFile(**args)


def test_remote_file_digest_lower_case():
  assert RemoteFile("a", "https://h/a", "AB" * 32).sha256 == "ab" * 32


def test_data_dir_precedence(tmp_path, monkeypatch):
  monkeypatch.setenv("FEDJAX_LITE_DATA", str(tmp_path / "env"))
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert download.data_dir(tmp_path / "arg") == tmp_path / "arg"
  assert (tmp_path / "arg").is_dir()
  assert download.data_dir() == tmp_path / "env"
  monkeypatch.delenv("FEDJAX_LITE_DATA")
  assert download.data_dir() == tmp_path / "xdg" / "fedjax_lite"
  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert download.data_dir() == tmp_path / "home" / ".cache" / "fedjax_lite"
  (tmp_path / "file").write_text("x")
  with pytest.raises(ValueError, match="exists and is not a folder"):
    download.data_dir(tmp_path / "file")
  with pytest.raises(TypeError, match="data_dir must be a folder path"):
    download.data_dir(3)


# ------------------------------------------------------------- fetch
def test_fetch_downloads_verifies_and_caches(server, tmp_path, monkeypatch):
  data = payload()
  remote = serve(server, "a.bin", data)
  cache = tmp_path / "cache"
  path = download.fetch(remote, cache, progress=True)
  assert path == cache / "a.bin"
  assert path.read_bytes() == data
  assert len(server.state["requests"]) == 1
  assert leftovers(cache) == []
  # The second call neither downloads nor re-hashes (the sidecar remembers
  # the digest for this size and mtime).
  monkeypatch.setattr(
    download, "sha256_file", lambda p: pytest.fail("re-hashed")
  )
  assert download.fetch(remote, cache, progress=False) == path
  assert len(server.state["requests"]) == 1
  sidecars = list((cache / ".verified").glob("*.json"))
  assert [json.loads(s.read_text())["sha256"] for s in sidecars] == [
    remote.sha256
  ]


def test_fetch_wrong_digest_leaves_no_file(server, tmp_path):
  data = payload()
  good = serve(server, "b.bin", data)
  wrong = RemoteFile("b.bin", good.url, "1" * 64)
  cache = tmp_path / "cache"
  actual = hashlib.sha256(data).hexdigest()
  with pytest.raises(ValueError) as info:
    download.fetch(wrong, cache, progress=False)
  msg = str(info.value)
  for part in ("'b.bin'", actual, "1" * 64, good.url, "deleted"):
    assert part in msg, (part, msg)
  assert not (cache / "b.bin").exists()
  assert not (cache / "b.bin.part").exists()
  assert leftovers(cache) == []


def test_fetch_resumes_a_cut_download_with_range(server, tmp_path):
  data = payload()
  remote = serve(server, "c.bin", data)
  server.state["cut"] = 1
  path = download.fetch(remote, tmp_path, progress=False)
  assert path.read_bytes() == data
  reqs = server.state["requests"]
  assert reqs[0] == ("/c.bin", None)
  assert reqs[1] == ("/c.bin", f"bytes={len(data) // 2}-")
  assert len(reqs) == 2
  assert leftovers(tmp_path) == []


def test_fetch_resumes_a_part_left_by_another_run(server, tmp_path):
  data = payload()
  remote = serve(server, "d.bin", data)
  (tmp_path / "d.bin.part").write_bytes(data[:1000])
  path = download.fetch(remote, tmp_path, progress=False)
  assert path.read_bytes() == data
  assert server.state["requests"] == [("/d.bin", "bytes=1000-")]


def test_fetch_finishes_a_complete_part(server, tmp_path):
  data = payload()
  remote = serve(server, "p.bin", data)
  (tmp_path / "p.bin.part").write_bytes(data)  # killed before the rename
  path = download.fetch(remote, tmp_path, progress=False)
  assert path.read_bytes() == data
  assert server.state["requests"] == [("/p.bin", f"bytes={len(data)}-")]
  assert leftovers(tmp_path) == []


def test_fetch_restarts_when_server_ignores_range(server, tmp_path):
  data = payload()
  remote = serve(server, "e.bin", data)
  server.state["ignore_range"] = True
  (tmp_path / "e.bin.part").write_bytes(b"stale bytes of another file")
  path = download.fetch(remote, tmp_path, progress=False)
  assert path.read_bytes() == data
  assert server.state["requests"] == [("/e.bin", "bytes=27-")]
  assert leftovers(tmp_path) == []


def test_fetch_offline_is_one_line_within_timeout(tmp_path):
  sock = socket.socket()
  sock.bind(("127.0.0.1", 0))
  port = sock.getsockname()[1]
  sock.close()  # nothing listens on this port now
  url = f"http://127.0.0.1:{port}/f.bin"
  remote = RemoteFile("f.bin", url, "2" * 64)
  start = time.monotonic()
  with pytest.raises(DownloadError, match=re.escape(url)) as info:
    download.fetch(remote, tmp_path, progress=False, timeout=5.0)
  assert time.monotonic() - start < 5.0
  msg = str(info.value)
  assert "\n" not in msg
  assert str(tmp_path / "f.bin") in msg
  assert "$FEDJAX_LITE_DATA" in msg and "data_dir=" in msg
  assert isinstance(info.value, OSError)
  assert not (tmp_path / "f.bin").exists()


def test_fetch_http_error_names_status(server, tmp_path):
  remote = RemoteFile("missing.bin", f"{server.url}/missing.bin", "3" * 64)
  with pytest.raises(DownloadError, match="HTTP 404"):
    download.fetch(remote, tmp_path, progress=False)


def test_fetch_uses_search_folders_in_place(server, tmp_path):
  data = payload()
  remote = serve(server, "g.bin", data)
  bad, good = tmp_path / "bad", tmp_path / "good"
  bad.mkdir()
  good.mkdir()
  (bad / "g.bin").write_bytes(b"not it")
  (good / "g.bin").write_bytes(data)
  cache = tmp_path / "cache"
  with pytest.warns(UserWarning, match="has SHA-256 .* ignoring it"):
    path = download.fetch(remote, cache, search=[bad, good], progress=False)
  assert path == good / "g.bin"
  assert not (cache / "g.bin").exists()  # used in place, not copied
  assert server.state["requests"] == []
  with pytest.raises(TypeError, match="search must hold folder paths"):
    download.fetch(remote, cache, search=[1])


def test_fetch_replaces_a_corrupt_cached_file(server, tmp_path):
  data = payload()
  remote = serve(server, "h.bin", data)
  (tmp_path / "h.bin").write_bytes(b"corrupt")
  with pytest.warns(UserWarning, match="downloading .* again"):
    path = download.fetch(remote, tmp_path, progress=False)
  assert path.read_bytes() == data


def test_fetch_checks_arguments(tmp_path):
  remote = RemoteFile("a", "https://h/a", "0" * 64)
  with pytest.raises(TypeError, match="remote must be a RemoteFile"):
    download.fetch("https://h/a", tmp_path)
  with pytest.raises(ValueError, match="timeout must be a positive number"):
    download.fetch(remote, tmp_path, timeout=0)


# ------------------------------------------------------------- extract
def make_tar(path, members, mode="w:gz"):
  with tarfile.open(path, mode) as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return path


def test_extract_once_and_redo_half_finished(tmp_path, monkeypatch):
  archive = make_tar(
    tmp_path / "pack.tar.gz", {"top/a.txt": b"alpha", "b.txt": b"beta"}
  )
  dest = download.extract(archive)
  assert dest == tmp_path / "pack"
  assert (dest / "top" / "a.txt").read_bytes() == b"alpha"
  assert (dest / "b.txt").read_bytes() == b"beta"
  mtime = (dest / "b.txt").stat().st_mtime_ns
  calls = []
  real = download._unpack
  monkeypatch.setattr(
    download, "_unpack", lambda *a: calls.append(a) or real(*a)
  )
  assert download.extract(archive) == dest
  assert calls == [] and (dest / "b.txt").stat().st_mtime_ns == mtime
  # A new archive under the same name replaces the folder.
  make_tar(archive, {"b.txt": b"beta 2"})
  assert download.extract(archive) == dest
  assert len(calls) == 1 and (dest / "b.txt").read_bytes() == b"beta 2"
  assert not (dest / "top").exists()
  assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_extract_redoes_a_half_finished_extraction(tmp_path, monkeypatch):
  archive = make_tar(tmp_path / "pack.tar.gz", {"a.txt": b"alpha"})
  real = download._unpack

  def crash(archive, suffix, into):
    (into / "a.txt").write_bytes(b"al")  # half a file, then the crash
    raise KeyboardInterrupt

  monkeypatch.setattr(download, "_unpack", crash)
  with pytest.raises(KeyboardInterrupt):
    download.extract(archive)
  assert not (tmp_path / "pack").exists()  # no half folder under the name
  killed = tmp_path / ".pack.tmp-1-dead"  # what a SIGKILL would leave
  killed.mkdir()
  (killed / "a.txt").write_bytes(b"al")
  monkeypatch.setattr(download, "_unpack", real)
  dest = download.extract(archive)
  assert (dest / "a.txt").read_bytes() == b"alpha"
  assert not killed.exists()
  other = tmp_path / "mine"
  other.mkdir()
  (other / "notes.txt").write_text("keep")
  with pytest.raises(ValueError, match="was not made by extract"):
    download.extract(archive, other)
  assert (other / "notes.txt").read_text() == "keep"


@pytest.mark.parametrize(
  "suffix, mode", [(".tar.bz2", "w:bz2"), (".tgz", "w:gz")]
)
def test_extract_tar_kinds(tmp_path, suffix, mode):
  archive = make_tar(tmp_path / f"k{suffix}", {"x.bin": b"123"}, mode)
  out = download.extract(archive, tmp_path / "out")
  assert (out / "x.bin").read_bytes() == b"123"


def test_extract_zip(tmp_path):
  archive = tmp_path / "z.zip"
  with zipfile.ZipFile(archive, "w") as zf:
    zf.writestr("d/y.txt", "why")
  assert (download.extract(archive) / "d" / "y.txt").read_text() == "why"
  bad = tmp_path / "evil.zip"
  with zipfile.ZipFile(bad, "w") as zf:
    zf.writestr("../escape.txt", "no")
  with pytest.raises(ValueError, match=r"'\.\.' component"):
    download.extract(bad)
  assert not (tmp_path / "escape.txt").exists()


def test_extract_refuses_unsafe_members(tmp_path):
  evil = make_tar(tmp_path / "evil.tar.gz", {"ok.txt": b"1", "../up.txt": b"2"})
  with pytest.raises(ValueError, match=r"member '\.\./up\.txt' with a '\.\.'"):
    download.extract(evil)
  assert not (tmp_path / "up.txt").exists()
  assert not (tmp_path / "evil").exists()
  absolute = make_tar(tmp_path / "abs.tar.gz", {"/etc/x": b"1"})
  with pytest.raises(ValueError, match="absolute path"):
    download.extract(absolute)
  link = tmp_path / "link.tar.gz"
  with tarfile.open(link, "w:gz") as tar:
    info = tarfile.TarInfo("inside/ln")
    info.type = tarfile.SYMTYPE
    info.linkname = "../../outside"
    tar.addfile(info)
  with pytest.raises(ValueError, match="points outside the extraction"):
    download.extract(link)
  with pytest.raises(ValueError, match="expected a name ending in"):
    (tmp_path / "a.rar").write_bytes(b"")
    download.extract(tmp_path / "a.rar")
  with pytest.raises(FileNotFoundError, match="no such archive"):
    download.extract(tmp_path / "none.tar.gz")


def test_find_file(tmp_path):
  (tmp_path / "a" / "b").mkdir(parents=True)
  (tmp_path / "a" / "b" / "f.h5").write_bytes(b"")
  assert download.find_file(tmp_path, "f.h5") == tmp_path / "a" / "b" / "f.h5"
  with pytest.raises(FileNotFoundError, match="holds no file named 'g.h5'"):
    download.find_file(tmp_path, "g.h5")


# -------------------------------------------------------------- cached
def test_cached_builds_once(tmp_path):
  calls = []

  def build():
    calls.append(1)
    return {"a": np.arange(5, dtype=np.int32), "ids": np.array(["x", "yz"])}

  params = {"sha256": "ab" * 32, "n": 5}
  first = download.cached("thing", params, build, tmp_path)
  second = download.cached(
    "thing", dict(reversed(params.items())), build, tmp_path
  )
  assert len(calls) == 1
  for got in (first, second):
    np.testing.assert_array_equal(got["a"], np.arange(5))
    assert got["a"].dtype == np.int32
    np.testing.assert_array_equal(got["ids"], ["x", "yz"])
  files = list((tmp_path / "preprocessed").glob("thing-*.npz"))
  assert len(files) == 1
  download.cached("thing", {**params, "n": 6}, build, tmp_path)
  assert len(calls) == 2
  # An unreadable file is rebuilt.
  files[0].write_bytes(b"garbage")
  with pytest.warns(UserWarning, match="rebuilding the unreadable"):
    download.cached("thing", params, build, tmp_path)
  assert len(calls) == 3
  assert not [
    p for p in (tmp_path / "preprocessed").iterdir() if ".tmp-" in p.name
  ]


def test_cached_checks_arguments(tmp_path):
  def ok():
    return {"a": np.zeros(1)}

  with pytest.raises(ValueError, match="name must be a non-empty string"):
    download.cached("a/b", {}, ok, tmp_path)
  with pytest.raises(TypeError, match="params must be JSON-serialisable"):
    download.cached("a", {"x": object()}, ok, tmp_path)
  with pytest.raises(TypeError, match="expected string keys and numeric"):
    download.cached(
      "b", {}, lambda: {"a": np.array([{}, 1], dtype=object)}, tmp_path
    )
  with pytest.raises(TypeError, match="expected a dict of numpy arrays"):
    download.cached("c", {}, lambda: [1], tmp_path)
  assert os.listdir(tmp_path / "preprocessed") == []
