"""cifar5m report: files written, summary contents, distances; the Frechet distance itself."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cifar5m.cli.main import cli
from cifar5m.generator.labeler import ARCHS, save_labeler
from cifar5m.generator.report.frechet import (
    feature_stats,
    frechet_distance,
    frechet_distance_features,
)
from cifar5m.generator.report.summary import ReportConfig, make_report


def _reference_fd(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    m1, m2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_frechet_matches_scipy_sqrtm(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(300, 16))
    b = rng.normal(size=(200, 16)) @ rng.normal(size=(16, 16)) * 0.5 + rng.normal(size=16)
    assert frechet_distance_features(a, b) == pytest.approx(_reference_fd(a, b), rel=1e-8)


def test_frechet_properties() -> None:
    rng = np.random.default_rng(3)
    a = rng.normal(size=(100, 8))
    assert frechet_distance_features(a, a) == pytest.approx(0, abs=1e-8)
    mu, sigma = feature_stats(a)
    assert frechet_distance(mu, sigma, mu + 2, sigma) == pytest.approx(4 * 8)
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(mu, sigma, mu[:3], sigma[:3, :3])


def _labeler(tmp_path: Path) -> Path:
    return save_labeler(ARCHS["tiny"](), tmp_path / "lab", arch="tiny", arch_kwargs={},
                        class_names=[str(i) for i in range(10)])


def test_report_writes_its_files(make_dataset, tmp_path: Path) -> None:
    data = make_dataset(n_train=100, n_test=30)
    ref = make_dataset("ref", n_train=20, n_test=40, seed=5)
    cfg = ReportConfig(root=str(data), out=str(tmp_path / "rep"), per_class=4, reference=str(ref),
                       labeler=str(_labeler(tmp_path)), max_samples=50)
    summary = make_report(cfg)
    files = sorted(p.name for p in (tmp_path / "rep").iterdir())
    assert files == sorted(["class_histogram.png", "confidence_histogram.png", "summary.json", "summary.txt",
                            *[f"grid_{n}.png" for n in ("airplane", "automobile", "bird", "cat", "deer",
                                                          "dog", "frog", "horse", "ship", "truck")]])
    assert summary["samples"] == 100 and set(summary["class_counts"].values()) == {10}
    assert summary["confidence"]["count"] == 100 and summary["confidence"]["mean"] == pytest.approx(0.9)
    dist = summary["labeler_distance"]
    assert dist["samples"] == 50 and dist["reference_samples"] == 40 and dist["labeler_frechet_distance"] >= 0
    assert summary["fid"] is None and "--fid-weights" in summary["fid_message"]
    assert json.loads((tmp_path / "rep" / "summary.json").read_text())["samples"] == 100
    text = (tmp_path / "rep" / "summary.txt").read_text()
    assert "not comparable to published FID" in text and "labeler confidence: mean 0.900" in text
    from PIL import Image

    assert Image.open(tmp_path / "rep" / "grid_cat.png").size == (8 * 34 * 2, 34 * 2 + 18)  # + title


def test_report_cli_without_confidence_and_fid_message(make_dataset, tmp_path: Path) -> None:
    data = make_dataset(n_train=20, n_test=20)
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"x")
    result = CliRunner().invoke(cli, ["report", str(data), "--split", "test", "--per-class", "2",
                                      "--fid-weights", str(weights)])
    assert result.exit_code == 0, result.output
    assert "labeler confidence: none recorded" in result.output and "FID skipped" in result.output
    assert (data / "report" / "summary.json").is_file()
    assert not (data / "report" / "confidence_histogram.png").exists()
