"""`cifar5m demo`'s steps and its closing guide (no real run: the steps are recorded; each
command is tested on its own elsewhere, and `make demo` runs the whole thing)."""

from __future__ import annotations

from click.testing import CliRunner

from cifar5m.cli import demo
from cifar5m.dataset_server.launcher import free_port


def record_steps(tmp_path, monkeypatch) -> list[tuple[list[str], dict | None]]:
    steps: list[tuple[list[str], dict | None]] = []

    def record(args, *, env=None):
        steps.append((args, env))
        if args[0] == "bootstrap":  # what the real step leaves behind
            out = args[args.index("--out") + 1]
            (tmp_path / out).mkdir(parents=True, exist_ok=True)
            (tmp_path / out / "bootstrap.png").write_bytes(b"png")

    monkeypatch.setattr(demo, "run_step", record)
    monkeypatch.setattr(demo, "serve_and_stream", lambda root, name: steps.append((["serve+stream", name], None)))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(demo, "ONE_THREAD", {"OMP_NUM_THREADS": "1"})
    return steps


def values(args: list[str]) -> dict[str, str]:
    return dict(zip(args[1::2], args[2::2], strict=False))


def test_offline_the_demo_runs_on_generated_data_and_says_what_it_left_out(tmp_path, monkeypatch):
    steps = record_steps(tmp_path, monkeypatch)
    monkeypatch.setenv("CIFAR5M_CIFAR10_URL", f"http://127.0.0.1:{free_port()}/cifar-10-python.tar.gz")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "out"
    done = CliRunner().invoke(demo.demo_cmd, ["--out", str(out)])
    assert done.exit_code == 0, done.output
    names = [args[0] for args, _ in steps]
    assert names == ["generate", "verify", "grid", "serve+stream", "report", "bootstrap"]
    boot, env = steps[-1]
    v = values(boot)
    assert v["--data"] == str(out / "generated") and env == {"OMP_NUM_THREADS": "1"}
    # the ideal world is one true pass over the generated train split (3,000 - 300 test), no wrap
    assert int(v["--steps"]) * int(v["--batch-size"]) <= 2700 < (int(v["--steps"]) + 1) * int(v["--batch-size"])
    assert "--wrap" not in boot and "--cifar10-test" not in boot
    assert steps[4][0][0] == "report" and "--reference" not in steps[4][0]
    skipped = [line for line in done.output.splitlines() if line.startswith("skipped:")]
    assert len(skipped) == 1 and "CIFAR-10" in skipped[0] and "make demo CIFAR10=" in skipped[0]
    guide = done.output[done.output.index("Results (open the first one first)"):]
    assert "bootstrap.png\n      OPEN FIRST: real vs ideal world on the generated data" in guide
    assert "bootstrap-cifar10" not in guide  # only outputs that exist are listed
    assert "Why a real world can end below the ideal one" in guide


def test_with_cifar10_the_demo_adds_the_reference_and_its_figure(tmp_path, monkeypatch):
    steps = record_steps(tmp_path, monkeypatch)
    tarball = tmp_path / "cifar10.tar.gz"
    tarball.write_bytes(b"")
    out = tmp_path / "out"
    done = CliRunner().invoke(demo.demo_cmd, ["--out", str(out), "--cifar10", str(tarball)])
    assert done.exit_code == 0, done.output
    assert "skipped:" not in done.output
    boots = [args for args, _ in steps if args[0] == "bootstrap"]
    assert len(boots) == 2
    # the generated world's runs are the same as offline, so adding CIFAR-10 later reuses them
    assert "--cifar10-test" not in boots[0] and values(boots[0])["--data"] == str(out / "generated")
    cifar = values(boots[1])
    assert cifar["--data"] == str(out / "cifar10")
    # one true pass over CIFAR-10's 50,000 training images
    assert int(cifar["--steps"]) * int(cifar["--batch-size"]) == 49_920
    report = next(args for args, _ in steps if args[0] == "report")
    assert report[report.index("--reference") + 1] == str(out / "cifar10")
    assert "bootstrap-cifar10/bootstrap.png" in done.output
