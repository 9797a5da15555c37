"""Settings chosen by the device, the start line, the test split of small counts, the
image-step progress bar and the device-aware --dry-run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from generate_helpers import save_tiny_labeler, save_tiny_unet

from cifar5m.cli.main import cli
from cifar5m.generator import defaults
from cifar5m.generator.config import GenerateConfig
from cifar5m.shards.reader import Dataset


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.set_num_threads(1)  # 2 threads on 2 shared cores wait for each other (10x slower)
    base = tmp_path_factory.mktemp("models")
    return {"unet": save_tiny_unet(base / "unet"), "labeler": save_tiny_labeler(base / "labeler")}


def test_cpu_gets_a_few_step_solver_with_fast_kernels_and_cuda_the_cifar5m_setting() -> None:
    given = GenerateConfig(count=200, out="x")
    cpu = defaults.for_device(given, "cpu", bf16=True)
    assert (cpu.sampler, cpu.num_steps, cpu.dtype, cpu.exact_cpu, cpu.compile) == (
        "dpmsolver++", 20, "bf16", False, False)
    assert defaults.for_device(given, "cpu", bf16=False).dtype == "fp32"  # no native bf16: fp32
    cuda = defaults.for_device(given, "cuda")
    assert (cuda.sampler, cuda.num_steps, cuda.dtype, cuda.compile) == ("ddpm", 1000, "bf16", True)
    assert defaults.chosen(given, "cpu") == ["sampler", "steps", "dtype", "kernels"]
    assert defaults.chosen(given, "cuda") == ["sampler", "steps", "dtype", "compile"]
    assert defaults.for_device(cpu, "cpu", bf16=False) == cpu  # resolving twice changes nothing


def test_every_choice_can_be_overridden() -> None:
    given = GenerateConfig(count=200, out="x", sampler="ddim", dtype="fp16", exact_cpu=True,
                           compile=True)
    cpu = defaults.for_device(given, "cpu", bf16=True)
    assert (cpu.sampler, cpu.num_steps, cpu.dtype, cpu.exact_cpu, cpu.compile) == (
        "ddim", 100, "fp16", True, True)  # an explicit sampler gets its own default steps
    assert defaults.chosen(given, "cpu") == ["steps"]
    exact = defaults.for_device(GenerateConfig(count=9, out="x", exact_cpu=True), "cpu", bf16=True)
    assert exact.dtype == "fp32"  # exact kernels run bf16 about 100x slower: fp32
    assert defaults.for_device(GenerateConfig(count=9, out="x", steps=7), "cuda").num_steps == 7


def test_default_test_split_fits_any_count() -> None:
    assert [defaults.default_test_count(n) for n in (1, 5, 6, 200, 59_999, 60_000, 6_000_000)] == [
        0, 0, 1, 33, 9_999, 10_000, 10_000]
    cfg = GenerateConfig(count=100, out="x")  # no error about a --test-count nobody set
    assert defaults.with_test_count(cfg, None).test_count == 16
    assert defaults.with_test_count(cfg, {"test_count": 2}).test_count == 2  # extending keeps it
    assert defaults.with_test_count(cfg, {"test_count": 500}).test_count == 16  # does not fit
    assert defaults.with_test_count(GenerateConfig(count=100, out="x", test_count=7), {"test_count": 2}
                                    ).test_count == 7


def test_cli_on_cpu_prints_one_start_line_and_records_the_choices(models, tmp_path) -> None:
    out = tmp_path / "g"
    args = ["generate", "--count", "12", "--model", str(models["unet"]), "--labeler",
            str(models["labeler"]), "--out", str(out), "--device", "cpu", "--shard-size", "5"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    start = [line for line in res.output.splitlines() if line.startswith("generate on cpu")]
    assert len(start) == 1, res.output
    threads = torch.get_num_threads()
    dtype = "bf16" if defaults.cpu_has_bf16() else "fp32"
    assert start[0].startswith(
        f"generate on cpu ({threads} thread{'s' if threads > 1 else ''}): dpmsolver++ 20 steps, "
        f"{dtype}, oneDNN kernels (sampler, steps, dtype, kernels chosen for cpu; override with "
        f"--sampler --steps --dtype --exact-cpu); 12 images x 20 steps, about ")
    ds = Dataset(out)
    assert len(ds.split("test")) == 2 and len(ds.split("train")) == 10  # 12 // 6 test samples
    prov = ds.manifest.provenance
    assert (prov["sampler"], prov["steps"], prov["dtype"], prov["cpu_kernels"], prov["compile"]) == (
        "dpmsolver++", 20, dtype, "onednn", False)
    assert prov["chosen_by_device"] == ["sampler", "steps", "dtype", "kernels"]
    saved = json.loads((out / "generate_config.json").read_text())
    assert (saved["sampler"], saved["steps"], saved["exact_cpu"], saved["test_count"]) == (
        "dpmsolver++", 20, False, 2)

    # Extending with a larger count keeps the 2 test samples (the default for 30 would be 5).
    res = CliRunner().invoke(cli, [*args[:2], "30", *args[3:]])
    assert res.exit_code == 0, res.output
    assert len(Dataset(out).split("test")) == 2 and len(Dataset(out).split("train")) == 28


def test_progress_bar_counts_image_steps(models, tmp_path, capsys) -> None:
    from cifar5m.generator import model as model_mod
    from cifar5m.generator.pipeline import run
    from cifar5m.generator.sampler import Sampler

    src = model_mod.resolve(str(models["unet"]))
    sampler = Sampler(model_mod.load_unet(src), src.scheduler_config, sampler="unipc", steps=3)
    calls: list[int] = []
    sampler.sample(0, torch.arange(5), on_step=calls.append)
    assert calls == [5, 5, 5]  # one call per UNet step, with the batch's image count
    run(GenerateConfig(count=12, test_count=2, out=str(tmp_path / "g"), model=str(models["unet"]),
                       labeler=str(models["labeler"]), steps=3, batch_size=4, device="cpu"))
    err = capsys.readouterr().err
    assert "12/12 img" in err and "img/s" in err


def test_dry_run_estimates_the_time_on_the_device_it_would_use(models, tmp_path) -> None:
    base = ["generate", "--count", "200", "--model", str(models["unet"]), "--out", str(tmp_path / "x"),
            "--dry-run"]
    res = CliRunner().invoke(cli, [*base, "--device", "cpu"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].startswith("device:        cpu (") and "dpmsolver++ 20 steps" in lines[0]
    assert lines[1].startswith("time here:     about ") and "per CPU thread" in lines[1]
    assert "images:        200 (33 test, 167 train)" in res.output
    res = CliRunner().invoke(cli, [*base, "--device", "cuda"])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("device:        cuda: ddpm 1000 steps, bf16, compiled")
    assert not (tmp_path / "x").exists()


def test_help_shows_a_cpu_example_and_the_measured_fast_cpu_speedup() -> None:
    res = CliRunner().invoke(cli, ["generate", "--help"])
    assert res.exit_code == 0
    text = " ".join(res.output.split())
    assert "cifar5m generate --count 200 --model builtin --labeler builtin" in text
    assert "--count 6000000" in text
    assert "batch 256" in text and "80x" not in text


def test_cpu_threads_leave_busy_cores_alone(monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert defaults.cpu_threads(2, cores=2, load=0.2) == 2  # a quiet machine: every core
    assert defaults.cpu_threads(2, cores=2, load=1.0) == 1  # one core busy elsewhere
    assert defaults.cpu_threads(2, cores=2, load=7.0) == 1  # at least one
    assert defaults.cpu_threads(1, cores=16, load=0.0) == 1  # never more than torch's own
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert defaults.cpu_threads(2, cores=2, load=7.0) == 2  # the user's choice stays


def test_dry_run_and_the_start_line_share_threads_and_time_estimate(models, tmp_path, monkeypatch) -> None:
    """--dry-run's time and a run's start line come from one estimate (same threads, NFE, GFLOP)."""
    import re

    from cifar5m.core.ranks import Rank
    from cifar5m.generator.cost import dry_run
    from cifar5m.generator.generation import Session

    monkeypatch.setattr(defaults, "cpu_threads", lambda current: 3)  # one answer for both paths
    cfg = GenerateConfig(count=60_000, test_count=10, out=str(tmp_path / "x"), model=str(models["unet"]),
                         labeler=str(models["labeler"]), device="cpu", sampler="ddim", steps=7)
    dry = dry_run(cfg)
    session = Session(cfg, Rank())
    assert session.threads == 3
    line = session.start_line(60_000)
    assert dry.startswith("device:        cpu (3 threads): ddim 7 steps") and "(3 threads)" in line
    about = re.search(r"about (.+?) of sampling", dry).group(1)
    assert f"60,000 images x 7 steps, about {about} (estimate" in line
