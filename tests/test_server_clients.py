"""The real clients against the server: huggingface_hub, datasets and webdataset URLs.

Each client runs in a fresh Python with HF_ENDPOINT pointed at the test server (the
libraries read it at import) and caches under tmp; it prints its findings as JSON.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from cifar5m.shards.format import CIFAR10_CLASSES
from cifar5m.shards.synthetic import synthetic_images
from tests.test_server_support import build_root, run_client, serving

HUB_SCRIPT = r"""
import hashlib, json, os
from pathlib import Path
from huggingface_hub import HfApi, HfFileSystem, hf_hub_download, snapshot_download
from huggingface_hub import errors

def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()

out = {}
snap = Path(snapshot_download("lab/ds", repo_type="dataset"))
out["snapshot"] = {p.name: digest(p) for p in snap.iterdir()}
out["snapshot_dir"] = snap.name
sha = HfApi().dataset_info("lab/ds").sha
out["sha"] = sha
one = hf_hub_download("lab/ds", "train-000001.tar", repo_type="dataset", revision=sha,
                      local_dir="by-sha")
out["by_sha"] = digest(one)
fs = HfFileSystem()
out["ls"] = sorted(fs.ls("datasets/lab/ds", detail=False))
out["info_size"] = fs.info("datasets/lab/ds/train-000000.tar")["size"]
with fs.open("datasets/lab/ds/train-000000.tar", "rb") as f:   # buffered: Range reads
    f.seek(1000); a = f.read(300)
    f.seek(-100, 2); b = f.read()
out["random_reads"] = [a.hex(), b.hex()]
with fs.open(f"datasets/lab/ds@{sha}/index.parquet", "rb", block_size=0) as f:  # streaming
    out["stream"] = hashlib.sha256(f.read()).hexdigest()

def error_of(fn):
    try:
        fn()
    except Exception as exc:
        return [type(exc).__name__] + [c.__name__ for c in type(exc).__mro__]
    return ["no error"]

dl = lambda repo, name, **kw: hf_hub_download(repo, name, repo_type="dataset", **kw)
out["errors"] = {
    "repo": error_of(lambda: dl("lab/nope", "README.md")),
    "revision": error_of(lambda: dl("lab/ds", "README.md", revision="v9")),
    "entry": error_of(lambda: dl("lab/ds", "missing.json")),
    "private": error_of(lambda: snapshot_download("lab/private", repo_type="dataset")),
    "private_wrong": error_of(lambda: dl("lab/private", "README.md", token="nope")),
    "gated": error_of(lambda: dl("lab/gated", "README.md")),
    "snapshot_revision": error_of(lambda: snapshot_download("lab/ds", repo_type="dataset", revision="v9")),
}
priv = snapshot_download("lab/private", repo_type="dataset", token="s3cret", local_dir="private")
out["private_files"] = sorted(p.name for p in Path(priv).iterdir() if p.is_file())
out["gated_ok"] = digest(dl("lab/gated", "README.md", token="g4ted"))
print(json.dumps(out))
"""

DATASETS_SCRIPT = r"""
import json, numpy as np
import datasets
ds = datasets.load_dataset("lab/ds", streaming=True)
out = {"features": {k: str(v) for k, v in ds["train"].features.items()},
       "names": ds["train"].features["cls"].names}
for split in ("train", "test"):
    rows = list(ds[split])
    out[split] = {"labels": [r["cls"] for r in rows],
                  "pixels": [int(np.asarray(r["png"], dtype=np.int64).sum()) for r in rows]}
priv = datasets.load_dataset("lab/private", split="train", streaming=True, token="s3cret")
out["private_rows"] = sum(1 for _ in priv)
import webdataset as wds
url = __import__("os").environ["HF_ENDPOINT"] + "/datasets/lab/ds/resolve/main/train-{000000..000003}.tar"
keys = [s["__key__"] for s in wds.WebDataset(url, shardshuffle=False)]
out["wds_keys"] = keys
print(json.dumps(out))
"""


@pytest.fixture
def three_datasets(make_dataset, tmp_path) -> tuple[Path, Path]:
    root = build_root(make_dataset, tmp_path / "root", ("lab/ds",))
    build_root(make_dataset, root, ("lab/private", "lab/gated"), n_train=20, n_test=10, shard_size=10)
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"datasets": {"lab/private": ["s3cret"],
                                               "lab/gated": {"gated": True, "tokens": ["g4ted"]}}}))
    return root, tokens


def test_huggingface_hub_clients_get_identical_bytes_and_typed_errors(three_datasets, tmp_path):
    from cifar5m.dataset_server.app import create_app

    root, tokens = three_datasets
    ds = root / "lab/ds"
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in ds.iterdir() if p.is_file()}
    with serving(create_app(root=root, tokens=tokens, page_size=3)) as url:
        out = run_client(HUB_SCRIPT, url, tmp_path)
    assert out["snapshot"] == files and out["snapshot_dir"] == out["sha"]
    assert out["by_sha"] == files["train-000001.tar"]
    assert out["ls"] == sorted(f"datasets/lab/ds/{n}" for n in files)
    shard = (ds / "train-000000.tar").read_bytes()
    assert out["info_size"] == len(shard)
    assert out["random_reads"] == [shard[1000:1300].hex(), shard[-100:].hex()]
    assert out["stream"] == files["index.parquet"]
    errors = out["errors"]
    assert "RepositoryNotFoundError" in errors["repo"]
    assert "RevisionNotFoundError" in errors["revision"]
    assert "RevisionNotFoundError" in errors["snapshot_revision"]
    assert "RemoteEntryNotFoundError" in errors["entry"] and "EntryNotFoundError" in errors["entry"]
    assert "RepositoryNotFoundError" in errors["private"]
    assert "RepositoryNotFoundError" in errors["private_wrong"]
    assert errors["gated"][0] == "GatedRepoError"
    assert "manifest.json" in out["private_files"] and "train-000000.tar" in out["private_files"]
    assert out["gated_ok"] == hashlib.sha256((root / "lab/gated/README.md").read_bytes()).hexdigest()


def test_datasets_streaming_and_webdataset_urls_give_the_right_samples(three_datasets, tmp_path):
    from cifar5m.dataset_server.app import create_app

    root, tokens = three_datasets
    with serving(create_app(root=root, tokens=tokens)) as url:
        out = run_client(DATASETS_SCRIPT, url, tmp_path, timeout=240)
    assert out["features"]["png"].startswith("Image(") and out["features"]["cls"].startswith("ClassLabel(")
    assert out["names"] == list(CIFAR10_CLASSES)
    images = synthetic_images(250, seed=0).astype("int64")
    assert out["train"]["labels"] == [i % 10 for i in range(200)]
    assert out["test"]["labels"] == [j % 10 for j in range(50)]
    assert out["train"]["pixels"] == [int(images[i].sum()) for i in range(200)]
    assert out["test"]["pixels"] == [int(images[200 + j].sum()) for j in range(50)]
    assert out["private_rows"] == 20
    assert out["wds_keys"] == [f"t{i:06d}" for i in range(200)]


NPY_SCRIPT = r"""
import json, numpy as np, datasets
from datasets.packaged_modules.webdataset.webdataset import WebDataset
probes = []  # shards read before iterating: the builder's feature inference
real = WebDataset._get_pipeline_from_tar.__func__
WebDataset._get_pipeline_from_tar = classmethod(lambda cls, p, it: (probes.append(p), real(cls, p, it))[1])
ds = datasets.load_dataset("lab/npy", split="test", streaming=True)
out = {"probes": len(probes), "features": {k: str(v) for k, v in ds.features.items()},
       "names": ds.features["cls"].names}
rows = list(ds)
out["types"] = sorted({f"{type(r['npy']).__name__} {r['npy'].dtype} {r['npy'].shape}" for r in rows})
out["labels"] = [r["cls"] for r in rows]
out["pixels"] = [int(r["npy"].astype(np.int64).sum()) for r in rows]
print(json.dumps(out))
"""


def test_datasets_opens_an_npy_dataset_from_its_card_and_returns_arrays(make_dataset, tmp_path):
    """The card declares Array3D + ClassLabel for npy: no shard is probed to infer them."""
    from cifar5m.dataset_server.app import create_app

    root = build_root(make_dataset, tmp_path / "root", ("lab/npy",), n_train=12, n_test=6, shard_size=4,
                      image_format="npy")
    with serving(create_app(root=root)) as url:
        out = run_client(NPY_SCRIPT, url, tmp_path, timeout=240)
    assert out["probes"] == 0
    assert out["features"] == {"npy": "Array3D(shape=(32, 32, 3), dtype='uint8')",
                               "cls": f"ClassLabel(names={list(CIFAR10_CLASSES)})"}
    assert out["names"] == list(CIFAR10_CLASSES)
    assert out["types"] == ["ndarray uint8 (32, 32, 3)"]
    images = synthetic_images(18, seed=0).astype("int64")
    assert out["labels"] == [j % 10 for j in range(6)]
    assert out["pixels"] == [int(images[12 + j].sum()) for j in range(6)]
