"""The URLs the CLI documents work: `cifar5m stream --help`'s example against `cifar5m serve`,
and `cifar5m download` against a server that is down says so in one line."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner

from cifar5m.cli.main import cli
from cifar5m.dataset_server.launcher import free_port

ROOT = Path(__file__).resolve().parents[1]



def wait_listening(port: int, proc: subprocess.Popen, *, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else "serve exited"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"cifar5m serve did not listen on {port} in {timeout} s")


def test_stream_help_url_example_works_against_cifar5m_serve(tmp_path) -> None:
    from cifar5m.shards.synthetic import write_synthetic_dataset

    help_text = CliRunner().invoke(cli, ["stream", "--help"]).output
    serve_line = re.search(r"cifar5m serve (\S+) --port (\d+)", help_text)
    url = re.search(r"cifar5m stream (http://127\.0\.0\.1:\d+/\S+)", help_text)
    assert serve_line and url, help_text
    # The example's layout: ROOT/lab/cifar5m is served as lab/cifar5m.
    data_root = tmp_path / serve_line.group(1)
    write_synthetic_dataset(data_root / "lab" / "cifar5m", n_train=64, n_test=16, shard_size=32)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cifar5m", "serve", str(data_root), "--port", str(port),
                             "--workers", "1", "--no-access-log"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        wait_listening(port, proc)
        source = url.group(1).replace(f":{serve_line.group(2)}/", f":{port}/")
        res = CliRunner().invoke(cli, ["stream", source, "--batch-size", "16", "--limit", "2"])
        assert res.exit_code == 0, res.output
        assert "delivered: 2 batches, 32 images" in res.output
    finally:
        proc.terminate()
        proc.wait(30)


def test_download_from_a_server_that_is_down_is_one_line(tmp_path) -> None:
    port = free_port()  # closed again: nothing listens there
    res = CliRunner().invoke(cli, ["download", "lab/cifar10", "--endpoint", f"http://127.0.0.1:{port}",
                                   "--local-dir", str(tmp_path / "dl")])
    assert res.exit_code == 1
    assert res.output.splitlines() == [
        f"Error: connection refused at http://127.0.0.1:{port}: is the server running and "
        f"--endpoint right?"]


def test_readme_says_how_to_run_the_cli_and_agrees_with_the_makefile_on_torch() -> None:
    readme = (ROOT / "README.md").read_text()
    assert ".venv/bin/cifar5m" in readme and "source .venv/bin/activate" in readme
    assert "TORCH_INDEX=https://download.pytorch.org/whl/cpu" in readme
    cuda = re.search(r"make install (TORCH_SPEC='[^']+' TORCH_INDEX=\S+)", (ROOT / "Makefile").read_text())
    assert cuda is not None and f"make install {cuda.group(1)}" in readme
