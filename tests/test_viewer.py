"""The dataset pages: their content and token rules over HTTP, and one page in a real browser.

The browser test drives the distribution's headless Chromium over the DevTools protocol
(aiohttp's websocket client, no driver package): it loads the page, reads every image's
``naturalWidth`` once the page has loaded, and saves a screenshot (to
``$CIFAR5M_SCREENSHOT`` when set). It skips, saying why, where no Chromium is installed.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifar5m.dataset_server.app import create_app
from cifar5m.shards.synthetic import synthetic_images
from tests.test_server_support import build_root, request, serving

BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--hide-scrollbars", "--remote-debugging-port=0"]


@pytest.fixture
def root(make_dataset, tmp_path) -> Path:
    root = build_root(make_dataset, tmp_path / "root", ("lab/ds",))
    build_root(make_dataset, root, ("lab/private", "lab/gated"), n_train=20, n_test=10, shard_size=10)
    (tmp_path / "tokens.yaml").write_text("datasets:\n  lab/private: [s3cret]\n"
                                          "  lab/gated: {gated: true, tokens: [g4ted]}\n")
    return root


def test_pages_show_counts_files_snippets_and_real_samples(root, tmp_path):
    with serving(create_app(root=root, tokens=tmp_path / "tokens.yaml")) as url:
        status, headers, body = request(url, "GET", "/")
        page = body.decode()
        assert status == 200 and headers["content-type"].startswith("text/html")
        assert "/datasets/lab/ds" in page and "/datasets/lab/gated" in page and "private" not in page
        status, _, body = request(url, "GET", "/datasets/lab/ds")
        page = body.decode()
        assert status == 200 and "200</td>" in page and "50</td>" in page  # train and test counts
        manifest = json.loads((root / "lab/ds/manifest.json").read_text())
        for shard in manifest["shards"]:
            assert shard["file"] in page and shard["sha256"] in page
        assert f"cifar5m download lab/ds --endpoint {url}" in page and f"HF_ENDPOINT={url}" in page
        assert "synthetic test data" in page  # provenance
        assert "<script" not in page and "http" not in page.replace(url, "").replace("https://", "")
        # Class 3's strip holds the first 8 train samples of class 3: positions 3, 13, 23, ...
        status, headers, png = request(url, "GET", "/datasets/lab/ds/samples/3.png")
        strip = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        images = synthetic_images(250)
        assert status == 200 and headers["content-type"] == "image/png" and strip.shape == (32, 8 * 33, 3)
        for j in range(8):
            np.testing.assert_array_equal(strip[:, j * 33:j * 33 + 32], images[3 + 10 * j])
        # Token rules: private is not found without its token, gated shows no samples.
        assert request(url, "GET", "/datasets/lab/private")[0] == 401
        assert request(url, "GET", "/datasets/lab/private", headers={"Authorization": "Bearer s3cret"})[0] == 200
        status, _, body = request(url, "GET", "/datasets/lab/gated")
        assert status == 200 and "samples/0.png" not in body.decode() and "gated" in body.decode()
        status, headers, _ = request(url, "GET", "/datasets/lab/gated/samples/0.png")
        assert (status, headers["x-error-code"]) == (401, "GatedRepo")
        assert request(url, "GET", "/datasets/lab/ds/samples/10.png")[0] == 404


def chromium() -> str | None:
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


async def devtools(port: int, url: str) -> tuple[dict, bytes]:
    """Load ``url`` in the browser's page; what ``LOADED`` finds there, and a screenshot."""
    import base64

    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/json/list") as reply:
            target = next(t for t in await reply.json() if t["type"] == "page")
        async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            async def call(msg_id: int, method: str, *, until: str | None = None, **params) -> dict:
                """Send one command; its result (and, with ``until``, wait for that event too)."""
                await ws.send_json({"id": msg_id, "method": method, "params": params})
                result = None
                async for msg in ws:
                    data = json.loads(msg.data)
                    if data.get("id") == msg_id:
                        if "error" in data:
                            raise RuntimeError(f"{method}: {data['error']}")
                        result = data["result"]
                    if result is not None and (until is None or data.get("method") == until):
                        return result
                raise RuntimeError("the browser closed the DevTools connection")

            await call(1, "Page.enable")
            await call(2, "Page.navigate", url=url, until="Page.loadEventFired")  # images loaded too
            value = await call(3, "Runtime.evaluate", expression=LOADED, returnByValue=True)
            page = json.loads(value["result"]["value"])
            await call(4, "Emulation.setDeviceMetricsOverride", width=1100, height=page["height"],
                       deviceScaleFactor=1, mobile=False)
            shot = await call(5, "Page.captureScreenshot", format="png")
    return page, base64.b64decode(shot["data"])


LOADED = """JSON.stringify({
  widths: Array.from(document.images).map(i => i.naturalWidth),
  complete: Array.from(document.images).every(i => i.complete),
  h1: document.querySelector("h1").textContent, title: document.title,
  height: Math.min(document.documentElement.scrollHeight, 4000)})"""


@pytest.mark.skipif(chromium() is None, reason="no Chromium installed (apt-get install chromium; .ci/run does)")
def test_the_page_renders_in_headless_chromium_with_every_sample_image_decoded(root, tmp_path):
    with serving(create_app(root=root)) as url:
        profile = tmp_path / "profile"
        proc = subprocess.Popen([chromium(), *BROWSER_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            port_file = profile / "DevToolsActivePort"
            deadline = time.monotonic() + 60
            while not (port_file.is_file() and port_file.read_text().strip()):
                assert proc.poll() is None and time.monotonic() < deadline, "Chromium did not start"
                time.sleep(0.1)
            port = int(port_file.read_text().split()[0])
            page, shot = asyncio.run(asyncio.wait_for(devtools(port, f"{url}/datasets/lab/ds"), 60))
        finally:
            proc.terminate()
            proc.wait(30)
    assert page["h1"] == "lab/ds" and page["title"] == "lab/ds"
    assert page["complete"] and len(page["widths"]) == 10 and all(w == 8 * 33 for w in page["widths"])
    image = Image.open(io.BytesIO(shot))
    assert image.format == "PNG" and image.width >= 800 and image.height >= 800
    if os.environ.get("CIFAR5M_SCREENSHOT"):
        Path(os.environ["CIFAR5M_SCREENSHOT"]).write_bytes(shot)
