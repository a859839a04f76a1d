r"""Downloads with pinned SHA-256 digests, one-time extraction, and a cache of
preprocessed arrays.

* :class:`RemoteFile`: a file name, its URL, its SHA-256 (64 hex digits) and
  optionally its size in bytes, as the publisher pins them.
* :func:`data_dir`: the cache folder: the argument, else ``$FEDJAX_LITE_DATA``,
  else ``$XDG_CACHE_HOME/fedjax_lite``, else ``~/.cache/fedjax_lite``.
* :func:`fetch`: returns a local path whose SHA-256 equals the pinned one,
  looking in this order at

  1. ``<cache>/<filename>`` (hashed once; the result is remembered in a JSON
     sidecar ``<cache>/.verified/<key>.json`` holding the path, size,
     ``mtime_ns`` and digest, so later calls compare size and mtime instead
     of re-hashing gigabytes);
  2. ``<folder>/<filename>`` for each of the user's ``search`` folders (used
     in place, never copied);
  3. a download of the URL to ``<cache>/<filename>.part``: an interrupted
     download is resumed with ``Range: bytes=<size of .part>-`` (a ``206``
     answer appends; a ``200`` answer, from a server that ignores ``Range``,
     restarts from byte 0, and so does a ``206`` for another range; a ``416``
     means the ``.part`` is already whole); a connection cut mid-body is
     resumed the same way up to 3 times. The SHA-256 of the whole ``.part`` is compared with the
     pinned digest and the ``.part`` is renamed to ``<filename>`` only if
     they agree; otherwise it is deleted and ``ValueError`` names the file,
     both digests and the URL. No network raises :class:`DownloadError` with
     one line saying where to put the file by hand.

  Concurrent processes fetching the same file serialise on
  ``<cache>/<filename>.lock`` (``fcntl.flock`` where available).
* :func:`extract`: unpacks ``.tar.bz2``, ``.tar.gz``, ``.tgz``, ``.tar`` or
  ``.zip`` once, into a folder next to the archive. The folder is built under
  a temporary name (``.<folder>.tmp-*``) and renamed into place holding a
  marker ``.fedjax_lite_extracted.json`` (the archive's size, mtime and
  SHA-256). A later call whose archive matches the marker returns at once; a
  half-finished extraction (the temporary folder of a crashed or killed run)
  is deleted and redone; a folder whose marker names another archive is
  replaced. Members with absolute paths, ``..`` components, links that point
  outside the folder, or device files are refused.
* :func:`find_file`: the file of a given name anywhere under an extracted
  folder (publishers nest their archives differently);
  :func:`search_folders` normalises a ``search=`` argument; and
  :func:`sha256_file` hashes a file in 1 MiB chunks.
* :func:`cached`: builds a dict of numpy arrays once and keeps it as
  ``<cache>/preprocessed/<name>-<key>.npz`` where ``key`` is the SHA-256 of
  ``name`` and the JSON of ``params`` (put the source files' digests in
  ``params``, so new sources give a new key); read back with
  ``allow_pickle=False``.

Every file is written under a temporary name in its final folder and moved
into place with ``os.replace``; no partial file ever carries a final name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import json
import os
import re
import shutil
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import uuid
import warnings
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np

from fedjax_lite._optional import MissingExtraError, require

ENV_VAR = "FEDJAX_LITE_DATA"
_CHUNK = 1 << 20
_RETRIES = 3
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_MARKER = ".fedjax_lite_extracted.json"
_ARCHIVE_SUFFIXES = (".tar.bz2", ".tar.gz", ".tgz", ".tar", ".zip")


class DownloadError(OSError):
  """A download failed for lack of network (or an HTTP error); the message
  is one line: the URL and the full path to place the file at by hand."""


@dataclasses.dataclass(frozen=True)
class RemoteFile:
  """A published file: where to get it and the digest that proves it.

  Attributes:
    filename: the plain file name it is cached under (no folders).
    url: where to download it from (``http``, ``https``, ``ftp``, ``file``).
    sha256: its SHA-256, 64 hexadecimal digits (stored lower-case).
    size: its size in bytes if known (a ``.part`` larger than this is
      discarded instead of resumed), else None.
  """

  filename: str
  url: str
  sha256: str
  size: int | None = None

  def __post_init__(self):
    name = self.filename
    if (
      not isinstance(name, str)
      or not name
      or name in (".", "..")
      or any(c in name for c in "/\\\0")
    ):
      raise ValueError(
        f"RemoteFile.filename must be a plain file name (no folders, not "
        f"'.' or '..'), got {name!r}."
      )
    if not isinstance(self.url, str) or urllib.parse.urlparse(
      self.url
    ).scheme not in ("http", "https", "ftp", "file"):
      raise ValueError(
        f"RemoteFile.url must be an http(s), ftp or file URL, got {self.url!r}."
      )
    digest = self.sha256.lower() if isinstance(self.sha256, str) else None
    if digest is None or not _HEX64.match(digest):
      raise ValueError(
        f"RemoteFile.sha256 must be 64 hexadecimal digits, got {self.sha256!r}."
      )
    object.__setattr__(self, "sha256", digest)
    size = self.size
    if size is not None and (
      isinstance(size, bool) or not isinstance(size, int) or size < 0
    ):
      raise ValueError(
        f"RemoteFile.size must be an int >= 0 or None, got {size!r}."
      )


# ------------------------------------------------------------ the cache
def data_dir(data_dir: str | os.PathLike | None = None) -> Path:
  """The cache folder (created if missing).

  ``data_dir`` if given, else ``$FEDJAX_LITE_DATA``, else
  ``$XDG_CACHE_HOME/fedjax_lite``, else ``~/.cache/fedjax_lite``.

  Raises:
    TypeError: ``data_dir`` is not a path.
    ValueError: the path exists and is not a folder.
  """
  return _cache_dir(data_dir)


def _cache_dir(data_dir) -> Path:
  if data_dir is not None and not isinstance(data_dir, (str, os.PathLike)):
    raise TypeError(
      f"data_dir must be a folder path (str or os.PathLike) or None, got "
      f"{type(data_dir).__name__}."
    )
  if data_dir is not None and str(data_dir):
    folder = Path(data_dir).expanduser()
  elif os.environ.get(ENV_VAR):
    folder = Path(os.environ[ENV_VAR]).expanduser()
  elif os.environ.get("XDG_CACHE_HOME"):
    folder = Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "fedjax_lite"
  else:
    folder = Path("~/.cache/fedjax_lite").expanduser()
  if folder.exists() and not folder.is_dir():
    raise ValueError(
      f"the data folder '{folder}' exists and is not a folder; pass "
      f"data_dir= or set ${ENV_VAR} to a folder."
    )
  folder.mkdir(parents=True, exist_ok=True)
  return folder


def _tmp_name(final: Path) -> Path:
  return final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex}")


def _write_atomic(final: Path, data: bytes) -> None:
  tmp = _tmp_name(final)
  try:
    with open(tmp, "wb") as fh:
      fh.write(data)
    os.replace(tmp, final)
  finally:
    tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _lock(path: Path):
  """An exclusive advisory lock on ``path`` (no-op without ``fcntl``)."""
  try:
    import fcntl  # pylint: disable=g-import-not-at-top
  except ImportError:  # pragma: no cover  (Windows)
    yield
    return
  with open(path, "a+b") as fh:
    fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def sha256_file(path: str | os.PathLike) -> str:
  """The SHA-256 of a file's bytes, read in 1 MiB chunks."""
  h = hashlib.sha256()
  with open(path, "rb") as fh:
    for chunk in iter(lambda: fh.read(_CHUNK), b""):
      h.update(chunk)
  return h.hexdigest()


def _sidecar(cache: Path, path: Path) -> Path:
  key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
  return cache / ".verified" / f"{key}.json"


def _stat_key(path: Path) -> dict:
  st = path.stat()
  return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _digest(path: Path, cache: Path) -> str:
  """``path``'s SHA-256, from its sidecar when size and mtime still match."""
  side = _sidecar(cache, path)
  key = _stat_key(path)
  try:
    rec = json.loads(side.read_text())
    if (
      rec.get("path") == str(path.resolve())
      and rec.get("size") == key["size"]
      and rec.get("mtime_ns") == key["mtime_ns"]
      and _HEX64.match(str(rec.get("sha256", "")))
    ):
      return rec["sha256"]
  except (OSError, ValueError):
    pass
  digest = sha256_file(path)
  _remember(path, cache, digest)
  return digest


def _remember(path: Path, cache: Path, digest: str) -> None:
  side = _sidecar(cache, path)
  side.parent.mkdir(parents=True, exist_ok=True)
  rec = {"path": str(path.resolve()), **_stat_key(path), "sha256": digest}
  _write_atomic(side, json.dumps(rec).encode())


def search_folders(search) -> list[Path]:
  """``search`` (one folder or an iterable of folders) as a list of Paths."""
  if isinstance(search, (str, os.PathLike)):
    search = [search]
  try:
    folders = list(search)
  except TypeError:
    raise TypeError(
      f"search must be a folder path or a list of folder paths, got "
      f"{type(search).__name__}."
    ) from None
  out = []
  for f in folders:
    if not isinstance(f, (str, os.PathLike)):
      raise TypeError(
        f"search must hold folder paths (str or os.PathLike), got "
        f"{f!r} ({type(f).__name__})."
      )
    out.append(Path(f).expanduser())
  return out


# ------------------------------------------------------------- fetching
def _pinned(
  path: Path, remote: RemoteFile, cache: Path, otherwise: str
) -> bool:
  """Whether ``path`` is a file with ``remote``'s pinned SHA-256; a file
  with another digest is reported in a warning ending with ``otherwise``
  (what :func:`fetch` does instead), for :func:`fetch`'s caller."""
  if not path.is_file():
    return False
  digest = _digest(path, cache)
  if digest == remote.sha256:
    return True
  warnings.warn(
    f"'{path}' has SHA-256 {digest}, expected {remote.sha256}; {otherwise}.",
    stacklevel=3,
  )
  return False


def fetch(
  remote: RemoteFile,
  data_dir: str | os.PathLike | None = None,
  *,
  search: Iterable[str | os.PathLike] = (),
  progress: bool = True,
  timeout: float = 30.0,
) -> Path:
  """A local copy of ``remote`` whose SHA-256 is the pinned one.

  Looks in the cache folder, then in each ``search`` folder (a file there is
  used in place), then downloads (see the module docstring for resuming and
  verification).

  Args:
    remote: the file to get.
    data_dir: the cache folder (see :func:`data_dir`).
    search: folders that may already hold ``remote.filename``.
    progress: show a progress bar while downloading (needs tqdm; without it
      the download runs without a bar).
    timeout: seconds to wait for the server to connect or send data.

  Returns:
    The path of the verified file.

  Raises:
    DownloadError: no network, or the server answered with an HTTP error.
    ValueError: the downloaded file's digest is not the pinned one.
  """
  if not isinstance(remote, RemoteFile):
    raise TypeError(
      f"remote must be a RemoteFile, got {type(remote).__name__}."
    )
  if (
    isinstance(timeout, bool)
    or not isinstance(timeout, (int, float))
    or not timeout > 0
  ):
    raise ValueError(f"timeout must be a positive number, got {timeout!r}.")
  folders = search_folders(search)
  cache = _cache_dir(data_dir)
  final = cache / remote.filename
  with _lock(cache / f"{remote.filename}.lock"):
    if _pinned(final, remote, cache, f"downloading {remote.url} again"):
      return final
    for folder in folders:
      candidate = folder / remote.filename
      if _pinned(candidate, remote, cache, "ignoring it"):
        return candidate
    _download(remote, final, cache, progress, float(timeout))
    return final


def _offline(remote: RemoteFile, final: Path, why: str) -> DownloadError:
  why = " ".join(str(why).split())
  return DownloadError(
    f"could not download {remote.url} ({why}); download it by hand and "
    f"place it at {final} (set ${ENV_VAR} or pass data_dir= to use "
    "another folder)."
  )


def _reason(e: BaseException) -> str:
  if isinstance(e, urllib.error.HTTPError):
    return f"HTTP {e.code} {e.reason}"
  if isinstance(e, urllib.error.URLError):
    r = e.reason
    return (
      f"{type(r).__name__}: {r}" if isinstance(r, BaseException) else str(r)
    )
  return f"{type(e).__name__}: {e}"


def _progress_bar(total, initial, name, show):
  if not show:
    return None
  try:
    tqdm_auto = require("tqdm.auto", "experiment")
  except MissingExtraError:
    return None
  return tqdm_auto.tqdm(
    total=total,
    initial=initial,
    unit="B",
    unit_scale=True,
    unit_divisor=1024,
    desc=name,
    leave=False,
  )


def _content_range_start(value: str | None) -> int | None:
  m = re.match(r"^\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*$", value or "")
  return int(m.group(1)) if m else None


def _download(
  remote: RemoteFile, final: Path, cache: Path, progress: bool, timeout: float
) -> None:
  part = final.with_name(final.name + ".part")
  for attempt in range(_RETRIES + 1):
    have = part.stat().st_size if part.is_file() else 0
    if remote.size is not None and have > remote.size:
      part.unlink()
      have = 0
    headers = {"User-Agent": "fedjax_lite", "Accept-Encoding": "identity"}
    if have:
      headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(remote.url, headers=headers)
    try:
      response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
      e.close()
      if e.code == 416 and have:  # the .part may already be complete
        break
      raise _offline(remote, final, _reason(e)) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
      raise _offline(remote, final, _reason(e)) from None
    with response:
      status = getattr(response, "status", 200)
      if status == 206 and have:
        if _content_range_start(response.headers.get("Content-Range")) != have:
          part.unlink()  # a range other than the one asked: start over
          continue
        mode = "ab"
      else:  # 200: the whole file from byte 0
        mode, have = "wb", 0
      length = response.headers.get("Content-Length")
      total = have + int(length) if length and length.isdigit() else remote.size
      bar = _progress_bar(total, have, remote.filename, progress)
      try:
        with open(part, mode) as out:
          while True:
            chunk = response.read(_CHUNK)
            if not chunk:
              break
            out.write(chunk)
            if bar is not None:
              bar.update(len(chunk))
          out.flush()
          os.fsync(out.fileno())
        complete = total is None or part.stat().st_size >= total
      except (OSError, http.client.HTTPException) as e:
        complete = False
        if attempt == _RETRIES:
          raise _offline(remote, final, _reason(e)) from None
      finally:
        if bar is not None:
          bar.close()
    if complete:
      break
  else:
    raise _offline(
      remote, final, f"the connection ended early {_RETRIES + 1} times"
    )
  digest = sha256_file(part)
  if digest != remote.sha256:
    part.unlink(missing_ok=True)
    raise ValueError(
      f"downloaded '{remote.filename}' has SHA-256 {digest}, expected "
      f"{remote.sha256} (from {remote.url}); the file was deleted. The "
      "server may hold another version of the file."
    )
  os.replace(part, final)
  _remember(final, cache, digest)


# ----------------------------------------------------------- extraction
def _archive_kind(archive: Path) -> tuple[str, str]:
  name = archive.name
  for suffix in _ARCHIVE_SUFFIXES:
    if name.endswith(suffix) and len(name) > len(suffix):
      return suffix, name[: -len(suffix)]
  raise ValueError(
    f"cannot extract '{archive}': expected a name ending in "
    f"{', '.join(_ARCHIVE_SUFFIXES)}."
  )


def _inside(name: str) -> bool:
  """``name`` (a relative '/'-separated path) stays inside its root."""
  if not name or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
    return False
  depth = 0
  for part in re.split(r"[/\\]+", name):
    if part == "..":
      depth -= 1
      if depth < 0:
        return False
    elif part not in ("", "."):
      depth += 1
  return True


def _check_member(archive: Path, name: str, what: str = "member") -> None:
  if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
    raise ValueError(
      f"archive '{archive}' holds {what} {name!r} with an absolute path; "
      "refusing to extract it."
    )
  if ".." in re.split(r"[/\\]+", name) or not _inside(name):
    raise ValueError(
      f"archive '{archive}' holds {what} {name!r} with a '..' component; "
      "refusing to extract it."
    )


def _safe_tar_members(archive: Path, tar: tarfile.TarFile):
  members = []
  for m in tar.getmembers():
    _check_member(archive, m.name)
    if m.issym():
      target = os.path.normpath(
        os.path.join(os.path.dirname(m.name), m.linkname)
      )
      if os.path.isabs(m.linkname) or not _inside(target.replace(os.sep, "/")):
        raise ValueError(
          f"archive '{archive}' holds a link {m.name!r} -> {m.linkname!r} "
          "that points outside the extraction folder; refusing to extract it."
        )
    elif m.islnk():
      if os.path.isabs(m.linkname) or not _inside(m.linkname):
        raise ValueError(
          f"archive '{archive}' holds a link {m.name!r} -> {m.linkname!r} "
          "that points outside the extraction folder; refusing to extract it."
        )
    elif not (m.isfile() or m.isdir()):
      raise ValueError(
        f"archive '{archive}' holds {m.name!r}, a device or special file; "
        "refusing to extract it."
      )
    members.append(m)
  return members


def _unpack(archive: Path, suffix: str, into: Path) -> None:
  if suffix == ".zip":
    with zipfile.ZipFile(archive) as zf:
      for info in zf.infolist():
        _check_member(archive, info.filename)
      zf.extractall(into)
    return
  mode = {".tar.bz2": "r:bz2", ".tar.gz": "r:gz", ".tgz": "r:gz"}.get(
    suffix, "r:"
  )
  with tarfile.open(archive, mode) as tar:
    members = _safe_tar_members(archive, tar)
    kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    tar.extractall(into, members=members, **kwargs)


def _marker_matches(dest: Path, archive: Path) -> bool:
  try:
    rec = json.loads((dest / _MARKER).read_text())
  except (OSError, ValueError):
    return False
  if not isinstance(rec, dict):
    return False
  key = _stat_key(archive)
  if rec.get("size") == key["size"] and rec.get("mtime_ns") == key["mtime_ns"]:
    return True
  return rec.get("size") == key["size"] and rec.get("sha256") == sha256_file(
    archive
  )


def extract(
  archive: str | os.PathLike, dest: str | os.PathLike | None = None
) -> Path:
  """Unpacks ``archive`` once and returns the folder holding its members.

  Args:
    archive: a ``.tar.bz2``, ``.tar.gz``, ``.tgz``, ``.tar`` or ``.zip`` file.
    dest: the folder to unpack into; default: next to the archive, named
      after it without the suffix (``fed_emnist.tar.bz2`` ->
      ``fed_emnist/``).

  Raises:
    FileNotFoundError: the archive does not exist.
    ValueError: an unknown suffix, a corrupt archive, a member with an
      absolute path, a ``..`` component, a link leaving the folder, or a
      device file (nothing is extracted then), or ``dest`` is a non-empty
      folder that extract did not make (it is never deleted).
  """
  archive = Path(archive).expanduser()
  if not archive.is_file():
    raise FileNotFoundError(f"no such archive: '{archive}'.")
  suffix, stem = _archive_kind(archive)
  dest = archive.parent / stem if dest is None else Path(dest).expanduser()
  if _marker_matches(dest, archive):
    return dest
  dest.parent.mkdir(parents=True, exist_ok=True)
  with _lock(dest.parent / f".{dest.name}.lock"):
    if _marker_matches(dest, archive):
      return dest
    for stale in dest.parent.glob(f".{dest.name}.tmp-*"):  # killed runs
      shutil.rmtree(stale, ignore_errors=True)
    if dest.exists() and not (
      (dest / _MARKER).is_file() or (dest.is_dir() and not any(dest.iterdir()))
    ):
      raise ValueError(
        f"cannot extract '{archive}' into '{dest}': it exists and was not "
        "made by extract (no completion marker); remove it or pass another "
        "dest."
      )
    tmp = _tmp_name(dest)
    try:
      tmp.mkdir()
      try:
        _unpack(archive, suffix, tmp)
      except (tarfile.TarError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(
          f"cannot extract '{archive}': {type(e).__name__}: {e}."
        ) from None
      rec = {**_stat_key(archive), "sha256": sha256_file(archive)}
      (tmp / _MARKER).write_text(json.dumps(rec))
      if dest.exists():
        shutil.rmtree(dest)
      os.replace(tmp, dest)
    finally:
      if tmp.exists():
        shutil.rmtree(tmp, ignore_errors=True)
  return dest


def find_file(folder: str | os.PathLike, name: str) -> Path:
  """The one file called ``name`` under ``folder`` (at any depth).

  Archives nest their files differently (``fed_emnist_train.h5`` at the top,
  ``cifar-10-batches-bin/data_batch_1.bin`` one folder down); this finds the
  file wherever it is.

  Raises:
    FileNotFoundError: no such file, naming the folder and the file.
  """
  folder = Path(folder)
  found = sorted(p for p in folder.rglob(name) if p.is_file())
  if not found:
    raise FileNotFoundError(
      f"'{folder}' holds no file named {name!r}; the archive it was "
      "extracted from does not have the expected layout."
    )
  return min(found, key=lambda p: (len(p.parts), str(p)))


# ------------------------------------------------- preprocessing cache
def cached(
  name: str,
  params: Mapping,
  build: Callable[[], Mapping[str, np.ndarray]],
  data_dir: str | os.PathLike | None = None,
) -> dict[str, np.ndarray]:
  """``build()``'s arrays, computed once per ``(name, params)``.

  The arrays live in ``<cache>/preprocessed/<name>-<key>.npz`` with ``key``
  the SHA-256 of ``json.dumps({"name": name, "params": params},
  sort_keys=True)``; an unreadable file is rebuilt.

  Args:
    name: what is built (letters, digits, ``._-``; part of the file name).
    params: everything the result depends on, JSON-serialisable (include
      the digests of the source files and a version of the preprocessing).
    build: returns a dict of numeric (or fixed-width string) numpy arrays.
    data_dir: the cache folder (see :func:`data_dir`).
  """
  if not isinstance(name, str) or not re.match(r"^[A-Za-z0-9._-]+$", name):
    raise ValueError(
      f"name must be a non-empty string of letters, digits, '.', '_' or "
      f"'-', got {name!r}."
    )
  if not isinstance(params, Mapping):
    raise TypeError(f"params must be a dict, got {type(params).__name__}.")
  try:
    text = json.dumps(
      {"name": name, "params": params}, sort_keys=True, separators=(",", ":")
    )
  except (TypeError, ValueError) as e:
    raise TypeError(
      f"params must be JSON-serialisable (numbers, strings, lists, dicts): {e}."
    ) from None
  if not callable(build):
    raise TypeError(f"build must be callable, got {type(build).__name__}.")
  key = hashlib.sha256(text.encode()).hexdigest()
  folder = _cache_dir(data_dir) / "preprocessed"
  folder.mkdir(parents=True, exist_ok=True)
  path = folder / f"{name}-{key[:24]}.npz"
  if path.is_file():
    try:
      with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
      warnings.warn(
        f"rebuilding the unreadable cache file '{path}' ({e}).", stacklevel=2
      )
  arrays = build()
  if not isinstance(arrays, Mapping):
    raise TypeError(
      f"build() returned a {type(arrays).__name__}; expected a dict of "
      "numpy arrays."
    )
  out = {}
  for k, v in arrays.items():
    a = np.asarray(v)
    if not isinstance(k, str) or a.dtype == object:
      raise TypeError(
        f"build() returned {k!r} -> {a.dtype} array; expected string keys "
        "and numeric or fixed-width string arrays (no objects)."
      )
    out[k] = a
  tmp = _tmp_name(path)
  try:
    with open(tmp, "wb") as fh:
      np.savez(fh, **out)
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)
  return out
