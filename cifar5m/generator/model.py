"""Load a diffusers ``UNet2DModel`` and its noise schedule from a directory or a Hub id.

Accepted layouts (what ``save_pretrained`` and the Hub's DDPM repos produce):

* ``DIR/config.json`` + weights, and ``DIR/scheduler_config.json``
  (``google/ddpm-cifar10-32`` keeps its UNet at the repo root);
* a pipeline directory ``DIR/unet/`` + ``DIR/scheduler/scheduler_config.json``.

Hub ids go through ``huggingface_hub.snapshot_download``, so the Hub cache
(``HF_HOME``/``HF_HUB_CACHE``) and ``HF_HUB_OFFLINE=1`` are honoured. ``builtin``
is the UNet shipped in ``generator/builtin/unet/``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cifar5m.core.errors import ModelError

DEFAULT_MODEL = "google/ddpm-cifar10-32"
BUILTIN_DIR = Path(__file__).resolve().parent / "builtin" / "unet"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_WEIGHT_GLOBS = ("diffusion_pytorch_model*.safetensors", "diffusion_pytorch_model*.bin")
_SCHED_NAMES = ("scheduler/scheduler_config.json", "scheduler_config.json")


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are, checked, before its weights are loaded."""

    name: str  # what the user asked for (Hub id, path or "builtin")
    unet_dir: Path
    config: dict[str, Any]  # the UNet's config.json
    scheduler_config: dict[str, Any]
    revision: str | None  # Hub commit of the snapshot, if from the Hub

    @property
    def num_class_embeds(self) -> int | None:
        return self.config.get("num_class_embeds")

    def weights_sha256(self) -> str:
        """sha256 over the weight files' bytes (in name order)."""
        return sha256_files(weight_files(self.unet_dir))


def sha256_files(files: Sequence[Path]) -> str:
    """sha256 over the files' bytes, one after the other."""
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def weight_files(unet_dir: Path) -> list[Path]:
    for pattern in _WEIGHT_GLOBS:
        found = sorted(unet_dir.glob(pattern))
        if found:
            return found
    raise ModelError(f"{unet_dir} has no diffusion_pytorch_model.safetensors/.bin weights")


def download_snapshot(repo_id: str, *, what: str = "model", revision: str | None = None,
                      not_found: str = "", not_cached: str = "") -> tuple[Path, str]:
    """The Hub snapshot of ``repo_id`` (configs and weights only) through the Hub cache, and
    its name. Honours ``HF_HUB_OFFLINE``; every failure is one ``ModelError`` naming ``what``
    (``not_found`` / ``not_cached``: what else to try, added to those two messages)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        path = Path(snapshot_download(repo_id, revision=revision,
                                      allow_patterns=["*.json", "*.safetensors", "*.bin"]))
    except RepositoryNotFoundError:
        raise ModelError(f"{what} {repo_id!r}: no such local directory, and no such Hub repository "
                         f"(or it is private){not_found}") from None
    except LocalEntryNotFoundError:
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        raise ModelError(f"{what} {repo_id!r} is not a local directory and not in the Hub "
                         f"cache{offline}; download it once online or pass a local directory"
                         f"{not_cached}") from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ModelError(f"{what} {repo_id!r}: download failed: {exc}") from None
    return path, path.name

def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: cannot read JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return data


def resolve(name: str) -> ModelSource:
    """Find and check a model's files; raises ``ModelError`` before loading any weights."""
    revision = None
    if name == "builtin":
        root = BUILTIN_DIR
        if not (root / "config.json").is_file():
            raise ModelError(f"the builtin UNet is not installed ({root} has no config.json); "
                             f"pass --model {DEFAULT_MODEL} or a local directory")
    elif Path(name).expanduser().exists():
        root = Path(name).expanduser().resolve()
        if not root.is_dir():
            raise ModelError(f"model {name!r} is a file; pass the directory save_pretrained wrote")
    elif _HUB_ID.match(name) and not name.startswith((".", "~")):
        offline = (", or --model builtin (the small UNet installed with cifar5m, nothing to "
                   "download)") if name == DEFAULT_MODEL else ""
        root, revision = download_snapshot(
            name, not_found=f"; pass a Hub id like {DEFAULT_MODEL!r} or a local directory",
            not_cached=offline)
    else:
        raise ModelError(f"model {name!r}: no such directory, and not a Hub id")
    unet_dir = root / "unet" if (root / "unet" / "config.json").is_file() else root
    if not (unet_dir / "config.json").is_file():
        raise ModelError(f"{root} holds no UNet config.json (nor unet/config.json)")
    config = _read_json(unet_dir / "config.json")
    sched = next((root / n for n in _SCHED_NAMES if (root / n).is_file()), None)
    if sched is None:
        raise ModelError(f"{root} has no scheduler_config.json (nor scheduler/scheduler_config.json): "
                         f"the sampler needs the model's noise schedule (betas)")
    source = ModelSource(name, unet_dir, config, _read_json(sched), revision)
    check_config(source)
    return source


def check_config(source: ModelSource) -> None:
    cfg, where = source.config, source.unet_dir / "config.json"
    if cfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ModelError(f"{where}: a {cfg['_class_name']}, not a UNet2DModel")
    size = cfg.get("sample_size")
    size = tuple(size) if isinstance(size, list) else (size, size)
    shape = (cfg.get("in_channels"), cfg.get("out_channels"), *size)
    if shape != (3, 3, 32, 32):
        raise ModelError(f"{where}: the UNet must map 32x32x3 to 32x32x3 (CIFAR); it has "
                         f"in_channels={shape[0]}, out_channels={shape[1]}, sample_size={size}")
    pred = source.scheduler_config.get("prediction_type", "epsilon")
    if pred not in ("epsilon", "sample", "v_prediction"):
        raise ModelError(f"{source.name}: unsupported prediction_type {pred!r}")


def load_unet(source: ModelSource) -> Any:
    """The UNet2DModel in eval mode on CPU (float32)."""
    from diffusers import UNet2DModel

    try:
        unet = UNet2DModel.from_pretrained(source.unet_dir)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{source.unet_dir}: cannot load the UNet: {exc}") from None
    return unet.eval().requires_grad_(False)
