"""Generator parts: noise, DDPM step, timesteps, model loading, bad input, dry run."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from generate_helpers import ranks_worker, save_tiny_labeler, save_tiny_unet

from cifar5m.cli.main import cli
from cifar5m.core.errors import ConfigMismatchError, ModelError, OutputNotWritableError
from cifar5m.generator import noise
from cifar5m.generator.config import GenerateConfig
from cifar5m.generator.model import resolve
from cifar5m.generator.pipeline import run
from cifar5m.generator.sampler import build_scheduler, ddpm_step, quadratic_timesteps


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("models")
    return {"unet": save_tiny_unet(base / "unet"), "labeler": save_tiny_labeler(base / "labeler")}


def test_noise_depends_only_on_seed_id_stream() -> None:
    ids = torch.arange(100, 164)
    z = noise.normal(7, ids, 0, (3, 32, 32))
    parts = torch.cat([noise.normal(7, ids[a : a + 5], 0, (3, 32, 32)) for a in range(0, 64, 5)])
    assert torch.equal(z, parts)
    assert torch.equal(z[3:4], noise.normal(7, torch.tensor([103]), 0, (3, 32, 32)))
    assert not torch.equal(z, noise.normal(8, ids, 0, (3, 32, 32)))
    assert not torch.equal(z, noise.normal(7, ids, 1, (3, 32, 32)))
    flat = z.flatten().double()
    assert abs(flat.mean()) < 0.02 and abs(flat.std() - 1) < 0.02
    from scipy import stats

    assert stats.kstest(flat.numpy(), "norm").pvalue > 1e-3
    corr = torch.corrcoef(z.flatten(1)) - torch.eye(64)
    assert corr.abs().max() < 0.1  # 3072-dim independent draws: |r| ~ 0.02


def test_noise_rejects_bad_seed_and_ids_as_model_errors() -> None:
    with pytest.raises(ModelError, match="seed"):
        noise.normal(-1, torch.arange(2), 0, (3,))
    with pytest.raises(ModelError, match="non-negative; got -3"):
        noise.normal(0, torch.tensor([1, -3]), 0, (3,))


def test_noise_on_device_ids_reads_no_values() -> None:
    # A meta tensor has no values: reading one (.min() -> int, a device sync on CUDA)
    # raises, so this passes only if per-step noise never reads the ids.
    z = noise.normal(3, torch.arange(4, device="meta"), 1, (3, 2, 2))
    assert z.shape == (4, 3, 2, 2) and z.device.type == "meta"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_noise_on_cuda_does_not_sync() -> None:
    ids = torch.arange(64, device="cuda")
    torch.cuda.set_sync_debug_mode("error")  # any host-device sync raises
    try:
        z = noise.normal(3, ids, 1, (3, 32, 32))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # Same hash bits on every device; log/cos may differ by an ulp (docs/generate.md).
    assert torch.allclose(z.cpu(), noise.normal(3, ids.cpu(), 1, (3, 32, 32)), atol=1e-5)


def test_sampler_checks_ids_on_the_cpu_and_takes_class_labels_by_keyword(models) -> None:
    from cifar5m.generator.model import load_unet
    from cifar5m.generator.sampler import Sampler

    src = resolve(str(models["unet"]))
    sampler = Sampler(load_unet(src), src.scheduler_config, sampler="ddim", steps=1)
    with pytest.raises(ModelError, match="non-negative"):
        sampler.sample(0, torch.tensor([-1]))
    kind = inspect.signature(Sampler.sample).parameters["class_labels"].kind
    assert kind is inspect.Parameter.KEYWORD_ONLY
    with pytest.raises(ModelError, match="unknown sampler 'euler'"):
        build_scheduler("euler", src.scheduler_config, 10)
    with pytest.raises(ModelError, match=r"--steps must be in \[1, 1000\]"):
        build_scheduler("ddim", src.scheduler_config, 1001)


def test_ddpm_step_matches_diffusers_with_the_same_noise() -> None:
    from diffusers import DDPMScheduler

    x, eps = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    for variance in ("fixed_large", "fixed_small"):
        sched = DDPMScheduler(variance_type=variance, clip_sample=True)
        sched.set_timesteps(50)
        ts = [int(t) for t in sched.timesteps] + [-1]
        for k in (0, 25, 49):
            t, prev = ts[k], ts[k + 1]
            ref = sched.step(eps, t, x, generator=torch.Generator().manual_seed(3)).prev_sample
            z = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
            assert torch.allclose(ddpm_step(sched, eps, t, prev, x, z), ref, atol=1e-5)


def test_ddim_uses_the_ddim_papers_quadratic_timesteps() -> None:
    ts = quadratic_timesteps(20, 1000)
    assert ts[0] == 800 and ts[-1] == 0 and len(set(ts)) == 20
    expected = (np.linspace(0, np.sqrt(800), 20) ** 2).astype(int)[::-1]
    assert ts[:10] == expected[:10].tolist()
    sched = build_scheduler("ddim", {"num_train_timesteps": 1000}, 20)
    assert [int(t) for t in sched.timesteps] == ts and sched.config.solver_order == 1


def test_model_from_hub_cache_offline(models, tmp_path, monkeypatch) -> None:
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    snap = cache / "models--someone--tiny-ddpm" / "snapshots" / ("a" * 40)
    shutil.copytree(models["unet"], snap)
    (cache / "models--someone--tiny-ddpm" / "refs").mkdir()
    (cache / "models--someone--tiny-ddpm" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    src = resolve("someone/tiny-ddpm")
    assert src.unet_dir == snap and src.revision == "a" * 40
    with pytest.raises(ModelError, match=r"not in the Hub cache \(HF_HUB_OFFLINE is set\)") as err:
        resolve("someone/unknown-model")
    assert "builtin" not in str(err.value)  # another model is no stand-in for the one asked for


def test_the_default_model_offline_and_not_cached_suggests_the_builtin_one(tmp_path, monkeypatch) -> None:
    from huggingface_hub import constants

    from cifar5m.generator.model import DEFAULT_MODEL

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    res = CliRunner().invoke(cli, ["generate", "--count", "12", "--test-count", "2",
                                   "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output
    assert res.output.startswith(f"Error: model {DEFAULT_MODEL!r} is not a local directory and not in "
                                 "the Hub cache (HF_HUB_OFFLINE is set)")
    assert "or --model builtin (the small UNet installed with cifar5m" in res.output
    assert not (tmp_path / "o").exists()


def bad(models: dict[str, Path], out: Path, **kw) -> GenerateConfig:
    args = {"count": 20, "test_count": 5, "shard_size": 10, "steps": 1, "model": str(models["unet"]),
            "labeler": str(models["labeler"]), "out": str(out), **kw}
    return GenerateConfig(**args)


def test_bad_models_and_labelers_fail_before_writing(models, tmp_path) -> None:
    out = tmp_path / "out"
    with pytest.raises(ModelError, match="no such directory"):
        run(bad(models, out, model=str(tmp_path / "nope" / "x")), progress=False)
    small = save_tiny_unet(tmp_path / "small", sample_size=16)
    with pytest.raises(ModelError, match="32x32x3"):
        run(bad(models, out, model=str(small)), progress=False)
    five = save_tiny_labeler(tmp_path / "five", num_classes=5)
    with pytest.raises(ModelError, match="5 classes"):
        run(bad(models, out, labeler=str(five)), progress=False)
    with pytest.raises(ModelError, match="unconditional"):
        run(bad(models, out, labeler=None), progress=False)
    cfg = json.loads((models["unet"] / "config.json").read_text())
    assert cfg["_class_name"] == "UNet2DModel"
    assert not out.exists()


def test_unwritable_output_fails_before_writing(models, tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputNotWritableError, match="not writable"):
        run(bad(models, blocker / "out"), progress=False)
    with pytest.raises(OutputNotWritableError, match="not a directory"):
        run(bad(models, blocker), progress=False)


def test_other_settings_or_smaller_count_refused_unchanged(models, tmp_path) -> None:
    out = tmp_path / "out"
    run(bad(models, out), progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(ConfigMismatchError, match=r"seed differ"):
        run(bad(models, out, seed=1), progress=False)
    with pytest.raises(ConfigMismatchError, match=r"holds 20 samples.*--count >= 20"):
        run(bad(models, out, count=15), progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_a_dataset_not_made_by_generate_is_refused(models, make_dataset) -> None:
    root = make_dataset(n_train=20, n_test=5, shard_size=10)
    manifest = json.loads((root / "manifest.json").read_text())
    del manifest["provenance"]["fingerprint"]  # e.g. an imported CIFAR-10
    (root / "manifest.json").write_text(json.dumps(manifest))
    before = {p.name: p.stat().st_mtime_ns for p in root.iterdir()}
    with pytest.raises(ConfigMismatchError, match="not made by cifar5m generate"):
        run(bad(models, root, count=40), progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in root.iterdir()} == before


def test_config_rejects_bad_numbers() -> None:
    with pytest.raises(ValueError, match="test-count"):
        GenerateConfig(count=10, out="x", test_count=10)
    with pytest.raises(ValueError, match="unknown sampler"):
        GenerateConfig(count=10, out="x", test_count=1, sampler="euler")


def test_cli_dry_run_prints_the_plan_without_writing(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "never"
    res = CliRunner().invoke(cli, ["generate", "--count", "6000000", "--out", str(out),
                                   "--sampler", "ddim", "--steps", "20", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "NFE per image: 20" in res.output and "12.44 GFLOP" in res.output
    assert "GPU-hours" in res.output and "1.49e+18 FLOP" in res.output
    assert not out.exists()


def test_cli_dry_run_counts_flops_of_other_models(models, tmp_path) -> None:
    res = CliRunner().invoke(cli, ["generate", "--count", "1000", "--test-count", "100", "--out", str(tmp_path / "x"),
                                   "--model", str(models["unet"]), "--sampler", "unipc", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "NFE per image: 20" in res.output and "flop_counter" in res.output


def test_cli_reports_errors_in_one_line(tmp_path) -> None:
    res = CliRunner().invoke(cli, ["generate", "--count", "10", "--test-count", "2",
                                   "--out", str(tmp_path / "o"), "--model", str(tmp_path / "none")])
    assert res.exit_code == 1 and res.output.startswith("Error: model") and "no such directory" in res.output


def test_cli_steps_beyond_the_models_timesteps_is_one_error_line(models, tmp_path) -> None:
    out = tmp_path / "o"
    res = CliRunner().invoke(cli, ["generate", "--count", "10", "--test-count", "2", "--out", str(out),
                                   "--model", str(models["unet"]), "--labeler", str(models["labeler"]),
                                   "--sampler", "ddim", "--steps", "1001"])
    assert res.exit_code == 1, res.output
    assert res.output.splitlines() == [
        f"Error: --steps 1001 exceeds the 1000 training timesteps of model {str(models['unet'])!r}; "
        f"pass --steps 1000 or fewer"]
    assert not out.exists()


def test_cli_unusable_device_is_one_error_line(models, tmp_path) -> None:
    args = ["generate", "--count", "10", "--test-count", "2", "--out", str(tmp_path / "o"),
            "--model", str(models["unet"]), "--labeler", str(models["labeler"])]
    res = CliRunner().invoke(cli, [*args, "--device", "nonsense"])
    assert res.exit_code == 1 and res.output.startswith("Error: --device 'nonsense'"), res.output
    if not torch.cuda.is_available():
        res = CliRunner().invoke(cli, [*args, "--device", "cuda:0"])
        assert res.exit_code == 1 and "no CUDA device" in res.output, res.output


def test_config_and_dry_run_of_the_default_model_do_not_import_torch(tmp_path) -> None:
    code = (
        "import sys\n"
        "from cifar5m.cli.main import cli\n"
        "cli.main(args=['generate', '--count', '1000', '--test-count', '10', '--out', 'x', '--dry-run',"
        " '--device', 'cuda'],"
        " standalone_mode=False)\n"
        "print('torch loaded:', 'torch' in sys.modules)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "NFE per image: 1000" in res.stdout and "torch loaded: False" in res.stdout


def test_ranks_share_from_rank_0_and_report_failed_ranks_over_gloo(tmp_path) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(ranks_worker, args=(3, port, str(tmp_path)), nprocs=3, join=True)
    for r in range(3):
        got, failed = json.loads((tmp_path / f"{r}.json").read_text())
        assert got == {"kept": ["test-000000.tar"]} and failed == [1]


def test_the_previous_fingerprint_is_read_without_the_part_footers(tmp_path) -> None:
    """``generate`` reads an unfinished output's fingerprint (for its test split) from the
    state file alone: part footers are read only to check the count (check_existing)."""
    from cifar5m.generator import pipeline
    from cifar5m.shards.format import WORK_DIR

    root = tmp_path / "ds"
    (root / WORK_DIR).mkdir(parents=True)
    (root / WORK_DIR / "state.json").write_text(json.dumps({"fingerprint": {"seed": 3, "test_count": 2}}))
    (root / WORK_DIR / "train-000000.parquet").write_bytes(b"not a parquet footer")
    (root / "train-000000.tar").write_bytes(b"")
    assert pipeline.previous_fingerprint(root) == {"seed": 3, "test_count": 2}
    with pytest.raises(Exception, match="(?i)parquet"):  # the footer is read only for the sizes
        pipeline.existing_sizes(root)
    assert pipeline.previous_fingerprint(tmp_path / "none") is None
