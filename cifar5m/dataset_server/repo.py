"""A dataset directory seen as a Hub dataset repository: its files, hashes and commit sha.

Served files are ``manifest.json`` and the files it lists (shards, ``index.parquet``,
``README.md``), nothing else: work folders, temp files and stray files never leave the
machine. The commit sha is a hash of every served file's name, size and sha256, so it
changes whenever any byte of any file changes and is the same on every restart.

Hashing 37 GB of shards takes minutes, so sha256s come from a cache keyed on (path,
size, mtime_ns, inode) and, for shards, from ``manifest.json`` itself when the file is
as the writer left it: same size, and not modified after the manifest (which is
written last). Anything else is hashed once, off the event loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from cifar5m.core.errors import ManifestError
from cifar5m.dataset_server.hashes import HashCache
from cifar5m.shards.format import CARD_NAME, MANIFEST_NAME
from cifar5m.shards.manifest import Manifest, safe_path

# Hub repo-name rules: letters, digits, '-', '_', '.', no leading/trailing punctuation,
# no '..' (so a name can never be a parent reference), at most 96 characters.
_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")
# Files at most this big with a text suffix are plain git files; the rest are LFS, as
# the Hub's default .gitattributes does for *.tar and *.parquet.
_TEXT_SUFFIXES = {".md", ".json", ".txt", ".yaml", ".yml"}
_LFS_MIN_BYTES = 10 * 1024 * 1024


def valid_name(part: str) -> bool:
    """Whether ``part`` is a valid organisation or dataset name."""
    return _NAME.fullmatch(part) is not None and ".." not in part


def served_name(name: str) -> bool:
    """Whether ``name`` may be served as a file of a dataset (one plain name: ``safe_path``)."""
    try:
        safe_path(None, name, where="a listing")
    except ManifestError:
        return False
    return True


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob holding ``data``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file the Hub stores in git for an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def is_lfs(name: str, size: int) -> bool:
    """Whether the Hub would keep ``name`` (of ``size`` bytes) in LFS rather than in git."""
    return Path(name).suffix not in _TEXT_SUFFIXES or size > _LFS_MIN_BYTES


@dataclass(frozen=True)
class RepoFile:
    """One served file."""

    name: str
    path: str
    size: int
    mtime_ns: int
    ino: int
    sha256: str
    oid: str  # git blob id: of the content for plain files, of the LFS pointer otherwise
    lfs: bool
    version: str = ""  # an object store's ETag of these bytes ("" on this machine's disk)

    def matches(self, st: os.stat_result) -> bool:
        return (st.st_size, st.st_mtime_ns, st.st_ino) == (self.size, self.mtime_ns, self.ino)


@dataclass(frozen=True)
class RepoState:
    """A snapshot of a dataset repository: one commit."""

    repo_id: str
    sha: str
    files: dict[str, RepoFile]
    last_modified: float
    manifest: Manifest
    card_data: dict = field(default_factory=dict)
    card_text: str = ""  # the card without its front matter (the viewer shows it)
    # What the scan saw of each file it looked at: (path, (inode, size, mtime_ns)), or
    # None for a listed file that was missing; None as a whole when a file was a symlink
    # or not a regular file (then only a full scan may tell whether that changed).
    checks: tuple[tuple[str, tuple[int, int, int] | None], ...] | None = None
    # Encoded API answers and the viewer's data of this commit (api.py, viewer.py): shared
    # by the copies ``replace`` makes.
    answers: dict = field(default_factory=dict, compare=False, repr=False)
    # The fsspec file system the files' paths are in (None: this machine's disk).
    fs: Any = field(default=None, compare=False, repr=False)


def parse_card(text: str) -> tuple[dict, str]:
    """A dataset card's YAML front matter ({} when it has none or it is broken) and its text."""
    _, _, rest = text.partition("\n")
    front, sep, body = rest.partition("\n---")
    if not text.startswith("---") or not sep:
        return {}, text.strip()
    try:
        data = yaml.safe_load(front)
    except yaml.YAMLError:
        data = None
    return (data if isinstance(data, dict) else {}), body.partition("\n")[2].strip()


def _read_text(f: RepoFile) -> str:
    return Path(f.path).read_text(encoding="utf-8")


def commit_state(repo_id: str, files: dict[str, RepoFile], manifest: Manifest, prev: RepoState | None,
                 read_text: Callable[[RepoFile], str], *, checks: tuple | None = None,
                 fs: Any = None) -> RepoState:
    """The commit of ``files`` (the card read by ``read_text``); ``prev`` itself when every
    entry is the one it had, so its encoded answers are kept."""
    if prev is not None and prev.files.keys() == files.keys() and \
            all(prev.files[name] is f for name, f in files.items()):
        return replace(prev, checks=checks)  # nothing changed: the same commit, only scanned again
    listing = "".join(f"{f.name}\0{f.size}\0{f.sha256}\n" for f in files.values())
    sha = hashlib.sha256(listing.encode()).hexdigest()[:40]
    card: tuple[dict, str] = ({}, "")
    if prev is not None and CARD_NAME in files and prev.files.get(CARD_NAME) is files[CARD_NAME]:
        card = prev.card_data, prev.card_text  # unchanged card: no re-reading, no YAML parse
    elif CARD_NAME in files:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            card = parse_card(read_text(files[CARD_NAME]))
    last = max(f.mtime_ns for f in files.values()) / 1e9
    return RepoState(repo_id, sha, files, last, manifest, *card, checks, fs=fs)


class DatasetRepo:
    """The dataset directory ``root/org/name`` as a Hub repository."""

    def __init__(self, directory: Path, repo_id: str, hashes: HashCache) -> None:
        self.dir = directory
        self.repo_id = repo_id
        self.hashes = hashes
        self._state: RepoState | None = None
        # Entries of the last scan by (path, size, mtime, inode): a re-scan of 600
        # unchanged shards costs their lstat calls only (measured 9.5 ms -> 3.5 ms).
        self._entries: dict[tuple, RepoFile] = {}
        self._seen: dict[tuple, RepoFile] = {}
        self._checks: list | None = None  # RepoState.checks, while a scan collects them
        self._checked_at = -math.inf  # when the state was last scanned or re-checked (monotonic)
        self._lock = threading.Lock()

    def cached(self, max_age: float) -> RepoState | None:
        """The last scan if it is at most ``max_age`` seconds old."""
        state = self._state
        if state is not None and time.monotonic() - self._checked_at <= max_age:
            return state
        return None

    def revalidated(self, max_files: int = 256) -> RepoState | None:
        """The last scan's state if every file it looked at is still as it saw it, else None.

        As fresh as a scan (which trusts an unchanged (inode, size, mtime) too): one lstat per
        file, inline, no thread and no hashing, ~1 us each. None (scan instead) when there is
        no state, when it had a symlink, more than ``max_files`` files (too long for the event
        loop), or when a scan is running (its lock is held).
        """
        state = self._state
        if state is None or state.checks is None or len(state.checks) > max_files:
            return None
        if not self._lock.acquire(blocking=False):
            return None
        try:
            if self._state is not state:
                return None  # a scan finished meanwhile
            lstat = os.lstat
            for path, seen in state.checks:
                try:
                    st = lstat(path)
                except OSError:
                    if seen is None:
                        continue  # still missing
                    return None
                if seen is None or (st.st_ino, st.st_size, st.st_mtime_ns) != seen or not stat.S_ISREG(st.st_mode):
                    return None
            self._checked_at = time.monotonic()
            return state
        finally:
            self._lock.release()

    def scan(self) -> RepoState:
        """Stat every served file (hashing new or changed ones) and return the state.

        Blocking (stat calls, maybe hashing): call it from a worker thread. Raises
        FileNotFoundError when the directory is no longer a finished dataset.
        """
        with self._lock:
            self._seen = {}
            self._checks = []
            real_dir = os.path.realpath(self.dir)
            # (a manifest.json symlinked to another dataset's would show that one's page)
            manifest_path = str(safe_path(real_dir, MANIFEST_NAME, where=real_dir))
            manifest_st = os.stat(manifest_path)
            manifest = self._manifest(manifest_path, manifest_st)
            files: dict[str, RepoFile | None] = {
                MANIFEST_NAME: self._entry(real_dir, MANIFEST_NAME, None, manifest_st.st_mtime_ns)}
            trusted = {s.file: (s.bytes, s.sha256) for s in manifest.shards}
            trusted.update({f.file: (f.bytes, f.sha256) for f in manifest.files})
            for name in sorted(trusted, key=lambda n: (n.endswith(".tar"), n)):
                entry = self._entry(real_dir, name, trusted[name], manifest_st.st_mtime_ns)
                if entry is not None:
                    files[name] = entry
            self._entries, self._seen = self._seen, {}
            checks = tuple(self._checks) if self._checks is not None else None
            self._state = commit_state(self.repo_id, {k: v for k, v in files.items() if v is not None},
                                       manifest, self._state, _read_text, checks=checks)
            self._checked_at = time.monotonic()
            return self._state

    def _manifest(self, path: str, st: os.stat_result) -> Manifest:
        """The manifest at ``path``: the last scan's, parsed again only when the file changed."""
        state = self._state
        known = state.files.get(MANIFEST_NAME) if state is not None else None
        if state is not None and known is not None and known.path == path and known.matches(st):
            return state.manifest
        with open(path, "rb") as f:
            return Manifest.from_json(f.read(), where=path)

    def _entry(self, real_dir: str, name: str, trusted: tuple[int, str] | None,
               manifest_mtime_ns: int) -> RepoFile | None:
        """The served entry for ``name``, or None if it is missing, unsafe or not a file."""
        path = os.path.join(real_dir, name)  # a plain name: Manifest.from_json checked it
        try:
            st = os.lstat(path)  # one syscall per file: API calls re-scan 600 shards
            if self._checks is not None:
                if stat.S_ISREG(st.st_mode):
                    self._checks.append((path, (st.st_ino, st.st_size, st.st_mtime_ns)))
                else:
                    self._checks = None  # a symlink or not a file: only a scan may re-check it
            if stat.S_ISLNK(st.st_mode):
                # A symlink may point anywhere: serve it only if it stays inside the dataset.
                path = os.path.realpath(safe_path(real_dir, name, where=real_dir))
                st = os.stat(path)
        except ManifestError:
            return None
        except OSError:
            if self._checks is not None and not os.path.lexists(path):
                self._checks.append((path, None))  # missing: revalidated while it stays so
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        key = self.hashes.key(path, st)
        known = self._entries.get(key)
        if known is not None and known.name == name:
            self._seen[key] = known
            return known
        lfs = is_lfs(name, st.st_size)
        sums = self.hashes.get(key)
        if sums is None and lfs and trusted is not None:
            size, sha = trusted
            # The manifest is written after every file it lists: a file not touched since
            # and of the recorded size is the one the manifest hashed.
            if st.st_size == size and st.st_mtime_ns <= manifest_mtime_ns:
                sums = (sha, None)
                self.hashes.put(key, sums)
        if sums is None or (not lfs and sums[1] is None):
            sums = self.hashes.hash_file(path, st, git=not lfs)
        sha256, blob = sums
        oid = git_blob_sha1(lfs_pointer(sha256, st.st_size)) if lfs else blob
        entry = RepoFile(name, path, st.st_size, st.st_mtime_ns, st.st_ino, sha256, oid, lfs)
        self._seen[key] = entry
        return entry


SINGLE_ORG = "local"  # the organisation of a dataset served on its own (``cifar5m serve DIR``)


class Library:
    """Every dataset under a root directory, looked up by ``org/name``.

    A dataset is served only under its own name: ``root/org/name`` must be a real
    directory (neither it nor ``org`` a symlink). A symlink inside the root naming
    another dataset (``ln -s private-set root/org/alias``) would otherwise serve that
    dataset under a name whose access rule is not its own; one leading out of the root
    would serve files the root does not hold. Both are refused.

    A dataset folder right under the root (``root/name/manifest.json``, as ``make demo``
    leaves them) is ``local/<name>``. A root that is a dataset itself (``root/manifest.json``)
    is served alone, as such a folder of its parent: ``local/<directory name>``.
    """

    def __init__(self, root: Path, hashes: HashCache | None = None) -> None:
        self.root = Path(root)
        self.only: str | None = None  # the one dataset served, when the root is one
        if (self.root / MANIFEST_NAME).is_file():
            real = Path(os.path.realpath(root))
            self.root, self.only = real.parent, real.name
        self.real_root = os.path.realpath(self.root)
        self.hashes = hashes or HashCache()
        self._repos: dict[str, DatasetRepo] = {}
        self._checked: dict[str, float] = {}  # repo id -> time of its last passed check
        self._lock = threading.Lock()

    def get(self, org: str, name: str, *, max_age: float = 0.0) -> DatasetRepo | None:
        """The repository ``org/name``, or None if there is no finished dataset by that name.

        The checks (realpath inside the root, manifest present) cost ~5 lstat calls,
        about 40 % of a HEAD request's CPU: one passed less than ``max_age`` seconds
        ago is reused (file requests pass the scan age, whose state they trust as long).
        """
        if not (valid_name(org) and valid_name(name)):
            return None
        repo_id = f"{org}/{name}"
        if max_age > 0 and time.monotonic() - self._checked.get(repo_id, -math.inf) <= max_age:
            return self._repos[repo_id]
        repo = self._check(org, name)
        if repo is None:
            self._checked.pop(repo_id, None)
        else:
            self._checked[repo_id] = time.monotonic()
        return repo

    def _check(self, org: str, name: str) -> DatasetRepo | None:
        if self.only is not None and (org, name) != (SINGLE_ORG, self.only):
            return None
        # (The root's own dataset is never looked for in a 'local' folder of its parent.)
        parts = (name,) if self.only or (org == SINGLE_ORG and self._flat(name)) else (org, name)
        directory = os.path.join(self.root, *parts)  # str: no pathlib parsing per API call
        expected = os.path.join(self.real_root, *parts)
        # Served only under its own name: no symlinked org or dataset folder (class doc).
        if os.path.realpath(directory) != expected:
            return None
        if not os.path.isfile(os.path.join(expected, MANIFEST_NAME)):
            return None
        repo_id = f"{org}/{name}"
        repo = self._repos.get(repo_id)
        if repo is not None:
            return repo
        with self._lock:
            return self._repos.setdefault(repo_id, DatasetRepo(Path(directory), repo_id, self.hashes))

    def _flat(self, name: str) -> bool:
        """``root/name`` is a dataset itself (served as ``local/name``), not an organisation."""
        return os.path.isfile(os.path.join(self.root, name, MANIFEST_NAME))

    def scan_all(self) -> Iterator[tuple[str, RepoState | Exception]]:
        """Every dataset's id and its state, scanned now (the error where it is unreadable,
        or why a ``root/local/<name>`` is hidden)."""
        for repo in self.repos():
            try:
                yield repo.repo_id, repo.scan()
            except (OSError, ValueError) as exc:
                yield repo.repo_id, exc
        local = self.root / SINGLE_ORG
        for name in sorted(os.listdir(local)) if self.only is None and local.is_dir() else []:
            if self._flat(name) and (local / name / MANIFEST_NAME).is_file():
                yield f"{SINGLE_ORG}/{name}", ValueError(
                    f"{local / name} has the name of {self.root / name}, which takes it: rename one of them")

    def repos(self) -> list[DatasetRepo]:
        """Every finished dataset under the root, each checked once (``get``)."""
        if self.only is not None:
            found = [self.get(SINGLE_ORG, self.only)]
        else:
            found = []
            for org_dir in sorted(self.root.iterdir()) if self.root.is_dir() else []:
                if not org_dir.is_dir():
                    continue
                if self._flat(org_dir.name):
                    found.append(self.get(SINGLE_ORG, org_dir.name))
                else:
                    found += [self.get(org_dir.name, ds.name) for ds in sorted(org_dir.iterdir())]
        # root/local/<name> is root/<name> where both exist (the latter wins): listed once
        return list({repo.repo_id: repo for repo in found if repo is not None}.values())
