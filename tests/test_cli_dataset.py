"""The dataset commands through click's CliRunner, and the one-line error handling."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from click.testing import CliRunner
from PIL import Image

from cifar5m.cli.main import COMMANDS, cli
from cifar5m.shards.synthetic import synthetic_images


def test_import_info_verify_grid(tmp_path):
    np.savez(tmp_path / "cifar5m_part0.npz", X=synthetic_images(30), Y=np.arange(30) % 10)
    runner = CliRunner()
    out = tmp_path / "ds"
    result = runner.invoke(cli, ["import", str(tmp_path / "cifar5m_part0.npz"), "--out", str(out), "--shard-size", "16"])
    assert result.exit_code == 0, result.output
    assert "train: 30 samples in 2 shards" in result.output
    result = runner.invoke(cli, ["info", str(out), "--json"])
    info = json.loads(result.output)
    assert info["splits"]["train"]["classes"]["airplane"] == 3
    result = runner.invoke(cli, ["verify", str(out), "--decode"])
    assert result.exit_code == 0 and "OK: 2 shards, 30 train samples" in result.output
    result = runner.invoke(cli, ["grid", str(out), "-o", str(tmp_path / "g.png"), "--per-class", "2"])
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "g.png") as img:  # 10 rows of 2 under a title band of 18 px
        assert img.size[0] >= 90 + 2 * 66 and img.size[1] == 10 * 66 + 18
        assert img.text["Title"] == f"{out.name} / train: CIFAR-5m (imported: DDPM samples of Nakkiran et al.)"


def test_project_errors_are_one_line(tmp_path, make_dataset):
    root = make_dataset(n_train=20, shard_size=8)
    (root / "train-000001.tar").unlink()
    result = CliRunner().invoke(cli, ["verify", str(root)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith("Error: ")
    assert "train-000001.tar is missing" in result.output


def test_every_command_has_help_with_an_example():
    runner = CliRunner()
    for name in COMMANDS:
        result = runner.invoke(cli, [name, "--help"])
        assert result.exit_code == 0, name
        assert "cifar5m " + name in result.output or "Example" in result.output, name


def test_console_script_runs_without_importing_torch():
    code = "import sys; from cifar5m.cli.main import main; sys.argv=['cifar5m','--help']\ntry:\n main()\nexcept SystemExit: pass\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")


def _run_cli(body: str, tmp_path) -> subprocess.CompletedProcess:
    """``cifar5m.cli.run`` with ``main`` replaced by ``body`` (Python source), in a child."""
    code = ("import atexit, sys\nimport cifar5m.cli.main as cli\n"
            "def main():\n" + "".join(f"    {line}\n" for line in body.splitlines()) +
            "cli.main = main\ncli.run()\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)


def test_the_command_exits_with_its_status_after_every_atexit_handler(tmp_path):
    # run() ends the process with os._exit once Python's exit work is done (native teardown
    # aborted finished commands now and then): statuses and exit handlers must be as before
    done = _run_cli("atexit.register(lambda: open('handler-ran', 'w').close())\n"
                    "print('output', end='')", tmp_path)
    assert (done.returncode, done.stdout) == (0, "output")
    assert (tmp_path / "handler-ran").exists()
    assert _run_cli("sys.exit(3)", tmp_path).returncode == 3
    failed = _run_cli("sys.exit('Error: something named')", tmp_path)
    assert (failed.returncode, failed.stderr.strip()) == (1, "Error: something named")
    crashed = _run_cli("1 / 0", tmp_path)
    assert crashed.returncode == 1 and "ZeroDivisionError" in crashed.stderr
    usage = subprocess.run([sys.executable, "-m", "cifar5m", "--no-such-option"], capture_output=True, text=True)
    assert usage.returncode == 2 and "No such option" in usage.stderr
