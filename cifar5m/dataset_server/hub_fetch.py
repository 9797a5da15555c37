"""Files of a Hub-style dataset repo by ``huggingface_hub.hf_hub_download``, each stopped at
the most bytes it may have, every error one line (a ``DownloadError``): ``cifar5m download``'s
transfer (``download.py`` checks what arrives)."""

from __future__ import annotations

import functools
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cifar5m.core.errors import DownloadError
from cifar5m.shards.format import MANIFEST_NAME

_COMMIT = re.compile(r"[0-9a-f]{40}")  # a commit sha, as huggingface_hub tells one from a branch


def _unreachable(exc: BaseException) -> str | None:
    """'connection refused' (or the connect error) when ``exc`` comes from not reaching the
    server at all; huggingface_hub wraps it in two lines about the Hub and local snapshots."""
    chain: list[BaseException] = []
    while exc is not None and len(chain) < 20:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    if any(isinstance(e, ConnectionRefusedError) for e in chain):
        return "connection refused"
    # huggingface_hub's HTTP client (httpx or its fork) is not ours to import: match its
    # connect error by name.
    connect = next((e for e in chain if type(e).__name__ == "ConnectError"), None)
    return None if connect is None else f"cannot connect ({connect})"


class _Capped:
    """huggingface_hub's progress bar of one file (its ``tqdm_class``), which ends the transfer
    when the server sends more than ``limit`` bytes, before they reach the disk (the bytes of
    a chunk are counted before they are written); progress goes to ``bar``."""

    def __init__(self, *, limit: int, url: str, bar, initial: int = 0, **_: object) -> None:
        self.n, self.limit, self.url, self.bar = initial, limit, url, bar

    def __enter__(self) -> _Capped:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def close(self) -> None:
        return None

    def update(self, n: int | float | None = 1) -> None:
        self.n += int(n or 0)
        if self.n > self.limit:
            raise DownloadError(f"{self.url} sends more than the {self.limit:,} bytes {MANIFEST_NAME} lists "
                                f"for it: stopped there; ask whoever runs the server to run `cifar5m verify`")
        self.bar.update(int(n or 0))


class Fetch:
    """Files of one repo by ``hf_hub_download``, each stopped at its expected size, errors
    turned into one-line DownloadErrors."""

    def __init__(self, repo_id: str, *, endpoint: str | None, revision: str | None,
                 token: str | None, max_workers: int) -> None:
        self.repo_id, self.endpoint, self.revision = repo_id, endpoint, revision
        self.token, self.max_workers = token, max_workers
        self.asked = False  # whether the repo was asked for (once, before the first file)

    def url(self, file: str) -> str:
        base = (self.endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
        return f"{base}/datasets/{self.repo_id}/resolve/{self.revision or 'main'}/{file}"

    def __call__(self, local_dir: Path | None, files: dict[str, int]) -> Path:
        """Fetch ``files`` (name -> the most bytes it may have) into ``local_dir`` (None: the
        huggingface_hub cache); returns the folder that holds them."""
        from huggingface_hub import errors as hf_errors

        # huggingface_hub re-exports its HTTP client's base error (httpx2.HTTPError) as
        # errors.HTTPError; HfHubHTTPError alone where a version does not.
        http_errors = (hf_errors.HfHubHTTPError, getattr(hf_errors, "HTTPError", hf_errors.HfHubHTTPError))
        repo, where = self.repo_id, self.endpoint or "the default endpoint (HF_ENDPOINT or huggingface.co)"
        try:
            return self._get(local_dir, files)
        except DownloadError:
            raise
        except hf_errors.GatedRepoError as exc:
            raise DownloadError(f"dataset {repo} at {where} is gated: pass --token with access") from exc
        except hf_errors.RepositoryNotFoundError as exc:
            raise DownloadError(f"dataset {repo} not found at {where}, or it is private: check the "
                                "name and pass --token") from exc
        except hf_errors.RevisionNotFoundError as exc:
            raise DownloadError(f"dataset {repo} has no revision {self.revision!r} at {where}: use "
                                "'main' or the current commit sha") from exc
        except (*http_errors, hf_errors.LocalEntryNotFoundError, OSError) as exc:
            if (unreachable := _unreachable(exc)) is not None:
                raise DownloadError(f"{unreachable} at {where}: is the server "
                                    "running and --endpoint right?") from exc
            response = getattr(exc, "response", None)
            if response is not None and response.headers.get("X-Error-Code") == "DatasetUnreadable":
                # e.g. a manifest of a format newer than the server's cifar5m: not to be resumed
                raise DownloadError(f"{where} cannot serve dataset {repo}: "
                                    f"{response.headers.get('X-Error-Message', exc)}") from exc
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DownloadError(f"downloading {repo} from {where} failed ({reason}); re-run the same "
                                "command to resume (complete files are kept)") from exc

    def _get(self, local_dir: Path | None, files: dict[str, int]) -> Path:
        import huggingface_hub
        from huggingface_hub import HfApi, hf_hub_download
        from tqdm import tqdm

        # hf_hub_download answers a file it cannot look up (a wrong token, the server down)
        # with whatever local_dir or the cache holds (huggingface_hub's offline mode): a
        # download would then "verify" that copy. Asking for the repo first raises instead;
        # not for a commit sha (its copy cannot be stale, and a server may keep only its
        # newest commit) nor where offline mode was asked for (HF_HUB_OFFLINE=1).
        offline = getattr(huggingface_hub, "is_offline_mode", lambda: huggingface_hub.constants.HF_HUB_OFFLINE)
        if offline() and local_dir is not None and all((local_dir / f).is_file() for f in files):
            return local_dir  # what huggingface_hub would hand back, after a warning that says so
        if not (self.asked or offline() or _COMMIT.fullmatch(self.revision or "")):
            HfApi(endpoint=self.endpoint, token=self.token).repo_info(self.repo_id, repo_type="dataset",
                                                                      revision=self.revision)
        self.asked = True
        with tqdm(total=sum(files.values()) if len(files) > 1 else None, unit="B", unit_scale=True,
                  desc="download", disable=None if len(files) > 1 else True) as bar:  # None: on a terminal
            def get(item: tuple[str, int]) -> str:
                capped = functools.partial(_Capped, limit=item[1], url=self.url(item[0]), bar=bar)
                return hf_hub_download(self.repo_id, item[0], repo_type="dataset", revision=self.revision,
                                       endpoint=self.endpoint, local_dir=local_dir, token=self.token,
                                       tqdm_class=capped)

            pool = ThreadPoolExecutor(self.max_workers)
            try:
                paths = list(pool.map(get, files.items()))
            finally:
                pool.shutdown(cancel_futures=True)
        return Path(paths[0]).parent if paths else Path(local_dir or ".")
