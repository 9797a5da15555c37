"""Label an existing dataset with any labeler: ``cifar5m label`` and ``cifar5m eval-labeler``.

``label_dataset`` runs the labeler over every shard (decoded in the index's row order)
and saves each shard's probabilities under ``_label_work/<labeler sha256>/`` as it goes,
so a killed run resumes; then ``cifar5m.shards.label_columns.write_labels`` writes the new index
version and the work directory is removed. One relabel of a dataset at a time: it holds the
dataset's lock. ``evaluate`` measures a labeler's accuracy
against the labels of a split (CIFAR-10's test split is the usual reference).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cifar5m.core.errors import ModelError
from cifar5m.generator.report.figures import save_fig
from cifar5m.shards.format import INDEX_NAME
from cifar5m.shards.index import shard_runs
from cifar5m.shards.lock import DirectoryLock
from cifar5m.shards.reader import Dataset, Split

WORK = "_label_work"


def open_for(spec: str, dataset: Dataset, *, device: Any, batch_size: int | None = None) -> Any:
    """Load labeler ``spec`` with its outputs in the dataset's class order."""
    from cifar5m.generator.labeler import load_labeler

    names = list(dataset.manifest.class_names)
    lab = load_labeler(spec, device=device, class_names=names)
    if list(lab.class_names) != names:
        raise ModelError(f"labeler {spec!r} has classes {lab.class_names}; the dataset {dataset.url} "
                         f"has {names}")
    if batch_size is not None and hasattr(lab, "batch_size"):
        lab.batch_size = batch_size
    return lab


def confusion(before: np.ndarray, after: np.ndarray, k: int) -> np.ndarray:
    """(k, k) counts: row = previous label, column = new label."""
    return np.bincount(before.astype(np.int64) * k + after.astype(np.int64), minlength=k * k).reshape(k, k)


def _shard_probs(lab: Any, split: Split, shard: str, work: Path) -> np.ndarray:
    part = work / f"{shard}.npy"
    if part.is_file():
        return np.load(part)
    probs = np.asarray(lab.predict(split.decode_shard(shard).images), dtype=np.float32)
    with open(part.with_suffix(".tmp"), "wb") as f:
        np.save(f, probs)
    part.with_suffix(".tmp").replace(part)
    return probs


def label_dataset(root: str | Path, spec: str, *, keep_as: str, device: Any = "cpu",
                  batch_size: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Relabel the local dataset ``root`` with ``spec``; returns the report (agreement, ...).

    Holds the dataset's lock (``cifar5m.shards.lock``) throughout: a second relabel (or an
    upgrade) of it at the same time is refused at once, naming the process that runs."""
    with DirectoryLock(root, what="labelled"):
        return _label_locked(Path(root), spec, keep_as=keep_as, device=device, batch_size=batch_size,
                             progress=progress)


def _label_locked(root: Path, spec: str, *, keep_as: str, device: Any, batch_size: int | None,
                  progress: bool) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from cifar5m.shards.label_columns import finish_pending, write_labels

    finished = finish_pending(root)  # a run killed between the index and manifest renames
    dataset = Dataset(root)
    lab = open_for(spec, dataset, device=device, batch_size=batch_size)
    last = (dataset.manifest.provenance.get("relabels") or [{}])[-1]
    if finished and last.get("labeler", {}).get("sha256") == lab.sha256:
        return {**{k: last[k] for k in ("samples", "agreement", "confusion", "seconds")},
                "class_names": list(dataset.manifest.class_names), "kept_as": last["previous_labels"],
                "labeler": last["labeler"]}
    index = dataset.index
    k = len(dataset.manifest.class_names)
    runs = shard_runs(index["shard"])
    work = root / WORK / lab.sha256[:16]
    work.mkdir(parents=True, exist_ok=True)
    probs = np.zeros((len(index), k), np.float32)
    keys = index["key"]
    started = time.perf_counter()
    splits = {name: dataset.split(name) for name in dataset.manifest.splits}
    bar = tqdm(total=len(index), unit="img", desc="label", disable=not progress, dynamic_ncols=True)
    for info in dataset.manifest.shards:
        rows, split = runs[info.file], splits[info.split]
        if split.keys[split.rows(info.file)] != keys.slice(rows.start, rows.stop - rows.start).to_pylist():
            raise ModelError(f"{root / INDEX_NAME}: rows of {info.file} are not in split order")
        probs[rows] = _shard_probs(lab, split, info.file, work)
        bar.update(rows.stop - rows.start)
    bar.close()
    seconds = time.perf_counter() - started
    labels = probs.argmax(1)
    before = index["label"].to_numpy().astype(np.int64)
    matrix = confusion(before, labels, k)
    summary = {"samples": len(labels), "agreement": round(float(np.mean(labels == before)), 6),
               "confusion": matrix.tolist(), "seconds": round(seconds, 2)}
    details = lab.details() | {"spec": spec}
    write_labels(root, labels, probs[np.arange(len(labels)), labels], probs, keep_as=keep_as,
                 labeler=details, summary=summary)
    shutil.rmtree(root / WORK, ignore_errors=True)
    return {**summary, "class_names": list(dataset.manifest.class_names), "kept_as": keep_as,
            "labeler": details}


def format_report(report: dict[str, Any], *, title: str = "previous \\ new") -> str:
    """Agreement plus the confusion matrix (rows: previous labels, columns: new ones)."""
    names = [n[:6] for n in report["class_names"]]
    m = np.asarray(report["confusion"])
    lines = [f"agreement with the previous labels ({report['kept_as']}): {report['agreement']:.2%} "
             f"of {report['samples']:,} samples",
             f"{title:>16} " + " ".join(f"{n:>7}" for n in names)]
    for name, row in zip(report["class_names"], m, strict=True):
        lines.append(f"{name:>16} " + " ".join(f"{v:>7,}" for v in row))
    return "\n".join(lines)


def plot_confusion(report: dict[str, Any], path: str | Path) -> Path:
    """PNG of the confusion matrix, each row normalised (share of a previous label's samples)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(report["confusion"], dtype=float)
    share = m / np.maximum(m.sum(1, keepdims=True), 1)
    names = report["class_names"]
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    im = ax.imshow(share, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("new label")
    ax.set_ylabel(f"previous label ({report['kept_as']})")
    ax.set_title(f"agreement {report['agreement']:.2%} of {report['samples']:,} samples")
    fig.colorbar(im, ax=ax, label="share of the previous label's samples")
    fig.tight_layout()
    save_fig(fig, Path(path))  # atomic, titled like the report's figures
    return Path(path)


@dataclass(frozen=True)
class Evaluation:
    correct: int
    samples: int
    class_names: list[str]
    per_class: list[float]
    seconds: float
    load_seconds: float

    @property
    def accuracy(self) -> float:
        return self.correct / self.samples if self.samples else float("nan")

    @property
    def images_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds else float("nan")


def evaluate(root: str, spec: str, *, split: str = "test", device: Any = "cpu", batch_size: int = 256,
             limit: int | None = None, progress: bool = True) -> Evaluation:
    """Accuracy of labeler ``spec`` against the labels of ``split`` (time excludes loading)."""
    from tqdm.auto import tqdm

    dataset = Dataset(root)
    part = dataset.split(split)
    t0 = time.perf_counter()
    lab = open_for(spec, dataset, device=device, batch_size=batch_size)
    load_seconds = time.perf_counter() - t0
    k = len(dataset.manifest.class_names)
    total = len(part) if limit is None else min(limit, len(part))
    hits, counts, correct = np.zeros(k), np.zeros(k), 0
    seen, seconds = 0, 0.0
    with tqdm(total=total, unit="img", desc="eval-labeler", disable=not progress, dynamic_ncols=True) as bar:
        for batch in part.iter_batches(batch_size):
            n = min(len(batch.keys), total - seen)
            t = time.perf_counter()
            pred = lab.predict(batch.images[:n]).argmax(1)  # numpy out: synchronised
            seconds += time.perf_counter() - t
            truth = batch.labels[:n]
            correct += int(np.sum(pred == truth))
            np.add.at(counts, truth, 1)
            np.add.at(hits, truth[pred == truth], 1)
            seen += n
            bar.update(n)
            if seen >= total:
                break
    per_class = [float(h / c) if c else float("nan") for h, c in zip(hits, counts, strict=True)]
    return Evaluation(correct, seen, list(dataset.manifest.class_names), per_class, seconds, load_seconds)
