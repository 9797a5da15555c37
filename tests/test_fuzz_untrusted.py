"""Generated manifests, file names, request paths and headers thrown at download, verify, the
readers and the server: nothing outside the output is opened for writing (an audit hook
watches every open, rename, remove and mkdir), no answer is a 500, and every error is one
line (a project error, never another exception)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cifar5m.core.errors import Cifar5mError
from cifar5m.dataset_server.app import create_app
from cifar5m.dataset_server.download import download, verify_download
from cifar5m.shards.reader import Dataset
from cifar5m.shards.verify import verify_dataset
from tests.test_server_support import Lying, build_root, request, serving

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# --- what is written where ------------------------------------------------------------------

_WATCH: dict = {"allowed": None, "seen": []}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_PATH_EVENTS = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.truncate": 1, "shutil.rmtree": 1,
                "os.chmod": 1, "os.utime": 1, "os.rename": 2, "os.symlink": 2, "os.link": 2}


def _written(event: str, args: tuple) -> list:
    """The paths an audited event writes (joined to its dir_fd's folder where it has one)."""
    if event == "open":
        path, mode, flags = args
        write = any(c in str(mode or "") for c in "wax+") or bool((flags or 0) & _WRITE_FLAGS)
        return [path] if write and not isinstance(path, int) else []
    count = _PATH_EVENTS.get(event)
    if count is None:
        return []
    paths = list(args[:count])[-1:] if event in ("os.symlink", "os.link") else list(args[:count])
    dir_fd = args[-1] if event != "os.rename" and len(args) > count and isinstance(args[-1], int) else -1
    return [os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), os.fsdecode(p)) if dir_fd >= 0
            else p for p in paths if not isinstance(p, int)]


def _audit(event: str, args: tuple) -> None:
    allowed = _WATCH["allowed"]
    if allowed is None:
        return
    try:
        for path in _written(event, args):
            real = os.path.realpath(os.fsdecode(path))
            if "__pycache__" not in real and not any(real == a or real.startswith(a + os.sep) for a in allowed):
                _WATCH["seen"].append((event, real))
    except Exception as exc:  # never break the audited call
        _WATCH["seen"].append((event, f"audit failed: {exc!r}"))


if not getattr(sys, "_cifar5m_fuzz_audit", False):
    sys.addaudithook(_audit)
    sys._cifar5m_fuzz_audit = True


class writes_only_under:  # (a context manager, read as a phrase)
    """Record every write outside ``folders`` while the block runs; assert there was none."""

    def __init__(self, *folders: Path) -> None:
        self.allowed = [os.path.realpath(f) for f in folders]

    def __enter__(self) -> None:
        _WATCH["seen"], _WATCH["allowed"] = [], self.allowed

    def __exit__(self, *exc: object) -> None:
        _WATCH["allowed"] = None
        assert _WATCH["seen"] == [], _WATCH["seen"]


def one_line(call, *args, **kwargs) -> None:
    """Run ``call``: success, or a project error of one line (any other exception fails the test)."""
    try:
        call(*args, **kwargs)
    except Cifar5mError as exc:
        assert "\n" not in str(exc) and str(exc).strip(), repr(exc)


# --- generated manifests ---------------------------------------------------------------------

TRAVERSALS = ["../victims/v1", "../../zone/victims/v1", "..", ".", "", "a/b", "./x", ".hidden",
              ".cifar5m.lock", ".cache/cifar5m/verified.json", "x\0y", "x\ny", "train-000000.tar/",
              "C:\\x", "\\\\host\\x", "~", "%2e%2e", "x" * 300]
LISTED = ["train-000000.tar", "train-000001.tar", "test-000000.tar", "index.parquet", "README.md",
          "manifest.json", "x.html"]
names = st.one_of(st.sampled_from(TRAVERSALS), st.sampled_from(LISTED), st.text(max_size=12))
counts = st.one_of(st.integers(0, 1 << 16), st.integers(-5, 1 << 62), st.sampled_from([True, None, "12", 1.5, []]))
FIELDS = {"file": names, "bytes": counts, "samples": counts, "first_key": st.text(max_size=5),
          "split": st.one_of(st.sampled_from(["train", "test", "<b>x</b>"]), st.text(max_size=8), st.none()),
          "sha256": st.one_of(st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
                              st.text(max_size=70), st.integers())}
changes = st.lists(st.one_of(*(st.tuples(st.just(k), v) for k, v in FIELDS.items())), min_size=1, max_size=2)
tops = st.tuples(st.sampled_from(["version", "format", "image_format", "class_names", "shards", "files", "provenance"]),
                 st.one_of(st.integers(-1, 10), st.text(max_size=10), st.none(), st.lists(st.text(max_size=5), max_size=3),
                           st.just([{"file": 1}]), st.just({"a": "<script>"})))


def manifests(base: dict):
    """A valid manifest with a generated change: one or two fields of an entry, a new entry
    like an existing one, a top-level field, or bytes that are no JSON at all."""
    def changed(change: tuple) -> bytes:
        doc = json.loads(json.dumps(base))
        kind, where, index, value = change
        if kind == "raw":
            return value
        if kind == "top":
            doc[value[0]] = value[1]
        else:
            entries = doc[where]
            entry = entries[index % len(entries)]
            if kind == "add":
                entry = dict(entry)
                entries.append(entry)
            entry.update(dict(value))
        return json.dumps(doc).encode()

    return st.one_of(
        st.tuples(st.sampled_from(["entry", "add"]), st.sampled_from(["files", "shards"]), st.integers(0, 9), changes),
        st.tuples(st.just("top"), st.none(), st.just(0), tops),
        st.tuples(st.just("raw"), st.none(), st.just(0), st.binary(max_size=100))).map(changed)


def link_out(folder: Path, name: str | None, victim: Path) -> None:
    """Make ``folder/name`` a symlink leading to ``victim`` (outside ``folder``)."""
    if name is not None:
        (folder / name).unlink(missing_ok=True)
        (folder / name).symlink_to(victim)


@pytest.fixture
def zone(make_dataset, tmp_path) -> Path:
    """``zone/root`` served (lab/ds), ``zone/victims`` that nothing may touch, outputs beside."""
    zone = tmp_path / "zone"
    build_root(make_dataset, zone / "root", ("lab/ds",), n_train=20, n_test=10, shard_size=10)
    (zone / "victims").mkdir()
    (zone / "victims/v1").write_bytes(b"precious")
    return zone


def test_the_audit_hook_sees_a_write_outside(tmp_path):
    inside, outside = tmp_path / "in", tmp_path / "out"
    inside.mkdir()
    with pytest.raises(AssertionError, match="open"), writes_only_under(inside):
        (outside).write_bytes(b"x")
    with writes_only_under(inside):
        (inside / "ok").write_bytes(b"x")
        os.replace(inside / "ok", inside / "ok2")


def test_download_of_generated_manifests_writes_only_its_output(zone):
    base = json.loads((zone / "root/lab/ds/manifest.json").read_text())
    app = create_app(root=zone / "root", scan_max_age=0.0)
    lying = Lying(app)
    out = zone / "out"
    with serving(app) as url:
        download("lab/ds", endpoint=url, local_dir=out)  # imports done, the honest case works

        @FUZZ
        @given(manifests(base), st.one_of(st.none(), st.sampled_from(LISTED)))
        def check(manifest: bytes, linked: str | None) -> None:
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            link_out(out, linked, zone / "victims/v1")  # a local copy with a symlink leading out
            lying.manifest = manifest
            with writes_only_under(out):
                one_line(download, "lab/ds", endpoint=url, local_dir=out)

        check()
    assert (zone / "victims/v1").read_bytes() == b"precious"


def test_verify_and_readers_of_generated_manifests_write_only_the_dataset(zone):
    pristine, folder = zone / "root/lab/ds", zone / "copy"
    base = json.loads((pristine / "manifest.json").read_text())

    @FUZZ
    @given(manifests(base), st.one_of(st.none(), st.sampled_from(LISTED)))
    def check(manifest: bytes, linked: str | None) -> None:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(pristine, folder)
        (folder / "manifest.json").write_bytes(manifest)
        link_out(folder, linked if linked != "manifest.json" else None, zone / "victims/v1")
        with writes_only_under(folder):
            one_line(verify_dataset, folder, progress=False)
            one_line(verify_download, folder)
            one_line(lambda: Dataset(folder).split("train")[0])

    check()
    assert (zone / "victims/v1").read_bytes() == b"precious"


segments = st.one_of(
    st.sampled_from(["datasets", "lab", "ds", "resolve", "main", "api", "tree", "samples", "0.png", "revision",
                     "paths-info", "manifest.json", "train-000000.tar", "..", ".", "%2e%2e", "%00", "%C2%B2.png",
                     "%ff", "1" * 5000 + ".png", "refs%2Fpr%2F1", "healthz"]),
    st.text(max_size=8).map(lambda t: quote(t, safe="")),
    st.from_regex(r"[0-9\u00b2\u00b3\u0660\uff10]{1,6}\.png", fullmatch=True).map(quote))
ROUTES = ["/datasets/lab/ds/samples/{}", "/datasets/lab/ds/resolve/{}/{}", "/api/datasets/lab/ds/tree/{}/{}",
          "/datasets/{}/{}", "/api/datasets/{}/{}/revision/{}", "/api/datasets/lab/ds/paths-info/{}",
          "/datasets/lab/ds/resolve/main/{}?{}", "/datasets/lab/gated/{}/{}/{}"]
paths = st.one_of(st.lists(segments, max_size=7).map(lambda p: "/" + "/".join(p)),
                  *[st.lists(segments, min_size=3, max_size=3).map(lambda t, r=r: r.format(*t)) for r in ROUTES])
header_values = st.one_of(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
                          st.sampled_from(["bytes=0-9", "bytes=-5", "bytes=5-", "bytes=9-0", "bytes=0-0,2-3",
                                           '"x"', "*", "W/\"x\"", "Bearer s3cret", "Thu, 01 Jan 1970 00:00:00 GMT",
                                           "Fri, 31 Dec 9999 23:59:59 GMT", "Mon, 99 Foo 2020 25:61:61 GMT"]))
headers = st.dictionaries(st.sampled_from(["Range", "If-Range", "If-Match", "If-None-Match", "If-Unmodified-Since",
                                           "If-Modified-Since", "Authorization", "Accept-Encoding"]),
                          header_values, max_size=3)


def test_the_server_answers_generated_requests_and_manifests_without_a_500(zone, caplog):
    folder = zone / "root/lab/ds"
    base = json.loads((folder / "manifest.json").read_text())
    tokens = zone / "tokens.yaml"
    shutil.copytree(folder, zone / "root/lab/gated")
    tokens.write_text("datasets:\n  lab/gated: {gated: true, tokens: [s3cret]}\n")
    with caplog.at_level(logging.WARNING), \
            serving(create_app(root=zone / "root", tokens=tokens, scan_max_age=0.0)) as url:

        @settings(FUZZ, max_examples=600)  # ~1 ms a request
        @given(st.one_of(st.none(), manifests(base)), paths, st.sampled_from(["GET", "HEAD", "POST"]), headers)
        def check(manifest: bytes | None, path: str, method: str, sent: dict) -> None:
            (folder / "manifest.json").write_bytes(json.dumps(base).encode() if manifest is None else manifest)
            with writes_only_under(zone / "root"):
                for p in (path, "/", "/datasets/lab/ds", "/datasets/lab/ds/samples/1.png"):
                    status, got, body = request(url, method, p, headers=sent, body=b"{}" if method == "POST" else None)
                    assert status < 500 or status in (501, 503, 505), (method, p, sent, status, body[:300])
                    if status >= 400 and got.get("content-type", "").startswith("application/json") and body:
                        assert "\n" not in json.loads(body)["error"], body

        check()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.records[:3]
