"""``cifar5m report DIR``: what a dataset looks like, as PNGs plus a JSON and text summary.

Writes to ``--out`` (default ``DIR/report``):

    class_histogram.png        samples per class
    confidence_histogram.png   the labeler confidence column of the index (if any)
    grid_<class>.png           a grid of random samples of each class
    summary.json, summary.txt  counts, confidence stats, distances

Distances: a Frechet distance in the labeler's penultimate feature space against a
reference dataset (``--reference``, e.g. CIFAR-10 in our format), which always works
offline but is NOT comparable to published FID; and real FID (Inception-v3) only
when torch-fidelity is installed and ``--fid-weights`` points at local weights.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cifar5m.core.atomic import atomic_write_bytes
from cifar5m.generator.report.figures import class_histogram, confidence_histogram, write_grid


@dataclass(frozen=True)
class ReportConfig:
    root: str
    out: str
    split: str = "train"
    per_class: int = 64
    reference: str | None = None        # dataset dir; its test split is the reference
    labeler: str = "builtin"
    max_samples: int = 10_000           # per side, for the distances
    fid_weights: str | None = None
    seed: int = 0


def _subset_images(split, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` random samples of a split as (uint8 NHWC images, labels)."""
    rng = np.random.default_rng(seed)
    pos = np.sort(rng.choice(len(split), size=min(n, len(split)), replace=False))
    by_shard: dict[str, list[int]] = {}
    for p in pos.tolist():
        by_shard.setdefault(split.shard_of[p], []).append(p)
    images, labels = [], []
    for shard, ps in by_shard.items():
        batch = split.decode_shard(shard)
        first = split.rows(shard).start
        idx = np.asarray(ps) - first
        images.append(batch.images[idx])
        labels.append(batch.labels[idx])
    return np.concatenate(images), np.concatenate(labels)


def reference_samples(cfg: ReportConfig, split) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(our images, their stored labels, reference test images), both sides drawn by ``cfg.seed``."""
    from cifar5m.shards.reader import Dataset

    ours, our_labels = _subset_images(split, cfg.max_samples, cfg.seed)
    ref, _ = _subset_images(Dataset(cfg.reference).split("test"), cfg.max_samples, cfg.seed)
    return ours, our_labels, ref


def labeler_distance(cfg: ReportConfig, lab, ours: np.ndarray, our_labels: np.ndarray,
                     ref: np.ndarray, *, agreement: bool = True) -> dict[str, Any]:
    """Frechet distance in the labeler's feature space, and (``agreement``) its agreement
    with the stored labels."""
    from cifar5m.generator.report.frechet import frechet_distance_features

    feats_a, feats_b = lab.features(ours), lab.features(ref)
    out = {"labeler_frechet_distance": frechet_distance_features(feats_a, feats_b),
           "labeler": cfg.labeler, "labeler_sha256": lab.sha256, "feature_dim": int(feats_a.shape[1]),
           "samples": len(ours), "reference": cfg.reference, "reference_samples": len(ref)}
    if agreement:
        out["labeler_agreement_with_stored_labels"] = float((lab.predict(ours).argmax(1) == our_labels).mean())
    out["note"] = "labeler feature space; NOT comparable to published (Inception) FID"
    return out


def labels_are_independent(provenance: dict[str, Any]) -> bool:
    """Whether a dataset's labels come from somewhere other than a labeler: the classes a
    conditional model was asked for, or an imported dataset's own labels."""
    if provenance.get("source") == "cifar5m generate":
        return bool(provenance.get("conditional"))
    return True


def inception_fid(cfg: ReportConfig, samples: tuple[np.ndarray, np.ndarray, np.ndarray] | None) -> dict[str, Any]:
    """FID with torch-fidelity and local Inception weights; a message when that is impossible.

    ``samples`` is ``reference_samples`` (None without ``--reference``).
    """
    if not cfg.fid_weights:
        return {"fid": None, "fid_message": "FID skipped: give --fid-weights PATH (local Inception-v3 "
                "FID weights, pt_inception-2015-12-05) and --reference; nothing is downloaded"}
    if not Path(cfg.fid_weights).is_file():
        return {"fid": None, "fid_message": f"FID skipped: {cfg.fid_weights} is not a file"}
    if cfg.reference is None:
        return {"fid": None, "fid_message": "FID skipped: --reference DATASET is needed"}
    try:
        import torch
        import torch_fidelity
    except ImportError:
        return {"fid": None, "fid_message": "FID skipped: torch-fidelity is not installed "
                "(pip install torch-fidelity); the labeler Frechet distance is reported instead"}
    class _Images(torch.utils.data.Dataset):
        def __init__(self, images: np.ndarray) -> None:
            self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()

        def __len__(self) -> int:
            return len(self.images)

        def __getitem__(self, i: int):
            return self.images[i]

    ours, _, ref = samples
    metrics = torch_fidelity.calculate_metrics(
        input1=_Images(ours), input2=_Images(ref), fid=True, verbose=False,
        cuda=torch.cuda.is_available(), feature_extractor_weights_path=cfg.fid_weights)
    return {"fid": float(metrics["frechet_inception_distance"]), "fid_samples": len(ours),
            "fid_message": "torch-fidelity, Inception-v3 from --fid-weights"}


def make_report(cfg: ReportConfig) -> dict[str, Any]:
    """Write the report files for ``cfg.root`` into ``cfg.out``; return the summary."""
    import pyarrow.compute as pc

    from cifar5m.shards.grid import describe_source, pick_positions
    from cifar5m.shards.reader import Dataset

    ds = Dataset(cfg.root)
    index = ds.index  # read once: the split's catalog is built from it (no second read)
    split = ds.split(cfg.split)
    names = list(ds.manifest.class_names)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(split.labels)
    counts = np.bincount(labels, minlength=len(names))
    source = describe_source(ds.manifest.provenance)
    class_histogram(counts, names, out / "class_histogram.png",
                    f"{Path(cfg.root).name} / {cfg.split}: classes\n{source}")
    conf_col = index["confidence"].filter(pc.equal(index["split"], cfg.split))
    conf = pc.drop_null(conf_col).to_numpy().astype(np.float64)
    summary: dict[str, Any] = {
        "dataset": cfg.root, "split": cfg.split, "samples": len(labels),
        "class_counts": dict(zip(names, counts.tolist(), strict=True)),
        "splits": {s: t["samples"] for s, t in ds.manifest.totals().items()},
        "provenance": ds.manifest.provenance,
    }
    if len(conf):
        confidence_histogram(conf, out / "confidence_histogram.png",
                             f"{Path(cfg.root).name} / {cfg.split}: labeler confidence\n{source}")
        summary["confidence"] = {"count": len(conf), "mean": float(conf.mean()),
                                 "median": float(np.median(conf)),
                                 "fraction_below_0.5": float((conf < 0.5).mean()),
                                 "fraction_above_0.9": float((conf > 0.9).mean())}
    else:
        summary["confidence"] = None
    grids = {}
    picks = pick_positions(labels, per_class=cfg.per_class, classes=len(names), seed=cfg.seed)
    for name, pick in zip(names, picks, strict=True):
        if pick:  # a class with no samples gets no grid
            images = np.stack([split[p].image for p in pick])
            grids[name] = write_grid(images, out / f"grid_{name}.png",
                                     title=f"class {name}: {len(pick)} samples of {cfg.split}, {source}").name
    summary["grids"] = grids
    samples = None
    if cfg.reference is not None:
        from cifar5m.generator.labeler import load_labeler

        lab = load_labeler(cfg.labeler)  # first, as before: a bad --labeler fails before any decoding
        samples = reference_samples(cfg, split)  # one draw for both distances
        # Where the labels are some labeler's argmax, agreeing with them says nothing of quality.
        summary["labeler_distance"] = labeler_distance(
            cfg, lab, *samples, agreement=labels_are_independent(ds.manifest.provenance))
    summary.update(inception_fid(cfg, samples))
    summary["config"] = asdict(cfg)
    atomic_write_bytes(out / "summary.json", (json.dumps(summary, indent=2, default=str) + "\n").encode())
    atomic_write_bytes(out / "summary.txt", render_text(summary).encode())
    return summary


def render_text(s: dict[str, Any]) -> str:
    lines = [f"dataset {s['dataset']} split {s['split']}: {s['samples']} samples",
             "class counts: " + ", ".join(f"{k} {v}" for k, v in s["class_counts"].items())]
    if s.get("confidence"):
        c = s["confidence"]
        lines.append(f"labeler confidence: mean {c['mean']:.3f}, median {c['median']:.3f}, "
                     f"<0.5: {c['fraction_below_0.5']:.1%}, >0.9: {c['fraction_above_0.9']:.1%}")
    else:
        lines.append("labeler confidence: none recorded in the index")
    if "labeler_distance" in s:
        d = s["labeler_distance"]
        lines.append(f"labeler-feature Frechet distance vs {d['reference']} test: "
                     f"{d['labeler_frechet_distance']:.3f} ({d['samples']} vs {d['reference_samples']} "
                     f"samples; not comparable to published FID)")
        if "labeler_agreement_with_stored_labels" in d:
            lines.append(f"labeler agreement with stored labels: {d['labeler_agreement_with_stored_labels']:.1%}")
    lines.append(f"FID: {s['fid']:.2f}" if s.get("fid") is not None else s["fid_message"])
    lines.append("grids: " + ", ".join(s["grids"].values()))
    return "\n".join(lines) + "\n"
