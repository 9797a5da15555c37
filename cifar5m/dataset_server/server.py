"""Running the server: configuration, start-up hashing, then the aiohttp worker processes.

Start-up scans every dataset once, so files that need hashing (those changed after
their manifest was written, e.g. copied without ``cp -p``) are hashed before the
first client waits on them; the hashes go to a cache file every worker loads,
instead of each worker hashing again.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path

from cifar5m.core.errors import ServerConfigError
from cifar5m.dataset_server.auth import AccessPolicy
from cifar5m.dataset_server.config import ServeConfig, configure_logging
from cifar5m.dataset_server.repo import SINGLE_ORG, Library, valid_name
from cifar5m.dataset_server.store_root import StoreLibrary, is_store_url, open_library
from cifar5m.dataset_server.workers import run_workers
from cifar5m.shards.format import MANIFEST_NAME

log = logging.getLogger("dataset_server")
__all__ = ["ServeConfig", "check_config", "prewarm", "run"]


def check_config(config: ServeConfig) -> None:
    """Raise ServerConfigError for a root, token file or option that cannot be served."""
    AccessPolicy.from_file(config.tokens)
    if config.page_size < 1 or config.workers < 1 or config.url_expiry_s < 1:
        raise ServerConfigError("--page-size, --workers and --url-expiry-s must be at least 1")
    prefix = config.accel_redirect
    if prefix is not None and not (prefix.startswith("/") and prefix.endswith("/") and "?" not in prefix):
        raise ServerConfigError(f"--accel-redirect {prefix!r} must be the path of nginx's internal "
                                "location, starting and ending with '/', e.g. /_cifar5m_files/")
    if is_store_url(config.root):
        if prefix is not None:
            raise ServerConfigError(f"--accel-redirect is for a local ROOT that nginx reads; files of "
                                    f"{config.root} are sent by the store itself (signed URLs)")
        return
    if config.storage_options:
        raise ServerConfigError(f"--storage-options is for an object-store ROOT (s3://...), not {config.root}")
    root = Path(config.root)
    if not root.is_dir():
        raise ServerConfigError(f"serve root {root} is not a directory; pass a dataset folder, "
                                "the folder that holds <org>/<name>/ datasets, or an s3://bucket/prefix URL")
    if (root / MANIFEST_NAME).is_file() and not valid_name(root.resolve().name):
        raise ServerConfigError(f"dataset folder {root} cannot be served as {SINGLE_ORG}/{root.resolve().name}: "
                                "rename it to letters, digits, '-', '_' and '.'")


def prewarm(config: ServeConfig) -> Library | StoreLibrary:
    """Scan (and hash where needed) every dataset under the root; log what is served."""
    library = open_library(config.root, config.storage_options)
    if isinstance(library, StoreLibrary):
        library.check_signing()
    served, skipped = 0, []
    for repo_id, state in library.scan_all():
        if isinstance(state, Exception):
            log.warning("not serving %s: %s", repo_id, state)
            skipped.append(f"{repo_id}: {state}")
            continue
        size = sum(f.size for f in state.files.values())
        log.info("serving %s: %d files, %.1f MB, commit %s", repo_id, len(state.files), size / 1e6, state.sha)
        served += 1
    if not served:
        raise ServerConfigError(
            f"no dataset to serve in {config.root}: expected {config.root}/manifest.json (one dataset), "
            f"{config.root}/<name>/manifest.json or {config.root}/<org>/<name>/manifest.json; symlinked dataset or org folders are not served"
            + "".join(f"; not served: {s}" for s in skipped))
    return library


def run(config: ServeConfig) -> None:
    """Serve until Ctrl-C or SIGTERM, then finish running requests (up to ``graceful_s``)."""
    check_config(config)
    configure_logging(access_log=config.access_log)  # before prewarm: it logs what is served
    library = prewarm(config)
    with tempfile.TemporaryDirectory(prefix="cifar5m-serve-") as tmp:
        cache = Path(tmp) / "hashes.json"
        library.hashes.save(cache)
        run_workers(dataclasses.replace(config, hash_cache=str(cache)))  # handles Ctrl-C / SIGTERM
    log.info("server stopped")
