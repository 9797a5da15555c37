"""`cifar5m demo`'s bootstrap step and its closing guide to the outputs (no real run: the steps
are recorded; the bootstrap command itself is tested in test_bootstrap.py)."""

from __future__ import annotations

from click.testing import CliRunner

from cifar5m.cli import demo


def test_demo_runs_a_bootstrap_and_ends_with_a_guide(tmp_path, monkeypatch):
    steps: list[tuple[list[str], dict | None]] = []

    def record(args, *, env=None):
        steps.append((args, env))
        if args[0] == "bootstrap":  # what the real step leaves behind
            (tmp_path / "out" / "bootstrap").mkdir(parents=True)
            (tmp_path / "out" / "bootstrap" / "bootstrap.png").write_bytes(b"png")

    monkeypatch.setattr(demo, "run_step", record)
    monkeypatch.setattr(demo, "BUILTIN_UNET", tmp_path / "missing.json")  # skip generation
    tarball = tmp_path / "cifar10.tar.gz"
    tarball.write_bytes(b"")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    done = CliRunner().invoke(demo.demo_cmd, ["--out", str(tmp_path / "out"), "--cifar10", str(tarball)])
    assert done.exit_code == 0, done.output
    boot = [(args, env) for args, env in steps if args[0] == "bootstrap"]
    assert len(boot) == 1 and steps[-1] == boot[0]
    args, env = boot[0]
    assert args[args.index("--data") + 1] == str(tmp_path / "out" / "cifar10")
    assert env == {"OMP_NUM_THREADS": "1"}
    value = dict(zip(args[1::2], args[2::2], strict=False))
    # the ideal world is one true pass over CIFAR-10's 50,000 training images, no wrap
    assert int(value["--steps"]) * int(value["--batch-size"]) == 49_920 and "--wrap" not in args
    assert [int(n) for n in value["--n"].split(",")] == [1000, 5000]
    guide = done.output[done.output.index("Results (open the first one first)"):]
    assert "bootstrap.png\n      OPEN FIRST: the Deep Bootstrap on CIFAR-10" in guide
    assert "generated-grid.png" not in guide  # only outputs that exist are listed
