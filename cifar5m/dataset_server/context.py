"""What every request handler needs: the datasets, the access policy and the limits."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from aiohttp import web

from cifar5m.core.errors import StoreError
from cifar5m.dataset_server.auth import Access, AccessPolicy
from cifar5m.dataset_server.config import ServeConfig
from cifar5m.dataset_server.repo import DatasetRepo, Library, RepoState, valid_name
from cifar5m.dataset_server.responses import Denied, hub_error, printable, repo_not_found
from cifar5m.dataset_server.store_root import StoreLibrary, StoreRepo

MAIN = "main"


@dataclass(frozen=True)
class ServerContext:
    library: Library | StoreLibrary
    policy: AccessPolicy
    config: ServeConfig
    # The re-scan in flight per dataset, which file requests join: when the last scan
    # expires, 32 clients would otherwise start 32 scans at once (threads, lock and GIL
    # contention: ~2 futex calls and 2 stat calls per request under load).
    scans: dict[str, asyncio.Future] = field(default_factory=dict)


def access_of(ctx: ServerContext, request: web.BaseRequest, org: str, name: str, *,
              max_age: float = 0.0) -> tuple[DatasetRepo | StoreRepo, Access]:
    """The repo ``org/name`` and what this request may do with it (Denied if nothing)."""
    repo_id = f"{org}/{name}"
    if not (valid_name(org) and valid_name(name)):
        # '..', '.', '%2F' and the like can never name a dataset: plain 404, no probing risk.
        raise Denied(hub_error(404, "RepoNotFound",
                               f"Repository not found: {printable(repo_id, 200)!r} is not a valid name"))
    repo = ctx.library.get(org, name, max_age=max_age)
    # The rule of the id the dataset is served under: the library serves a dataset only
    # under its own directory's name, never through a symlinked alias (repo.py).
    access = ctx.policy.access(repo_id, request.headers.get("Authorization"))
    if repo is None or access is Access.NONE:
        raise Denied(repo_not_found(repo_id))
    return repo, access


def visible(ctx: ServerContext, request: web.BaseRequest) -> Iterator[tuple[DatasetRepo | StoreRepo, Access]]:
    """Every dataset this request may see, and what it may do with it."""
    authorization = request.headers.get("Authorization")
    for repo in ctx.library.repos():
        access = ctx.policy.access(repo.repo_id, authorization)
        if access is not Access.NONE:
            yield repo, access


def lookup(ctx: ServerContext, request: web.BaseRequest, org: str, name: str, *,
           files: bool) -> DatasetRepo | StoreRepo:
    """The repo ``org/name`` if this request may see it (and, with ``files``, read files)."""
    repo, access = access_of(ctx, request, org, name, max_age=ctx.config.scan_max_age if files else 0.0)
    if files and access is Access.METADATA:
        has_token = request.headers.get("Authorization") is not None
        raise Denied(hub_error(
            403 if has_token else 401, "GatedRepo",
            f"Access to dataset {repo.repo_id} is restricted: pass a token that has access "
            "(token=... or HF_TOKEN)"))
    return repo


def _scan(ctx: ServerContext | None, repo: DatasetRepo | StoreRepo) -> asyncio.Future:
    """A scan of ``repo`` in a thread: the one in flight if there is one (``ctx`` given)."""
    if ctx is None:
        return asyncio.ensure_future(asyncio.to_thread(repo.scan))
    running = ctx.scans.get(repo.repo_id)
    if running is None:
        running = ctx.scans[repo.repo_id] = asyncio.ensure_future(asyncio.to_thread(repo.scan))
        running.add_done_callback(lambda _: ctx.scans.pop(repo.repo_id, None))
    return asyncio.shield(running)


async def state_at(repo: DatasetRepo | StoreRepo, revision: str, *, max_age: float = 0.0,
                   ctx: ServerContext | None = None) -> RepoState:
    """The repo's current state if ``revision`` names it (``main`` or its commit sha).

    With ``ctx``, a request that may take a scan up to ``max_age`` old joins the scan in
    flight, if any, instead of starting another; without, it starts its own scan when one is needed (API calls).
    Either way an unchanged dataset is first re-checked inline (``DatasetRepo.revalidated``:
    one lstat per file, as fresh as a scan), which spares the thread and the scan."""
    state = repo.cached(max_age) or repo.revalidated()
    if state is None:
        try:
            state = await _scan(ctx if max_age > 0 else None, repo)
        except ValueError as exc:
            # A manifest this version cannot read (a newer format, a broken file): the
            # reason, not a "not found" that sends the user looking for a token.
            reason = str(exc).replace(os.path.realpath(repo.dir), repo.repo_id)  # no server paths
            raise Denied(hub_error(501, "DatasetUnreadable", f"dataset {repo.repo_id}: {reason}")) from exc
        except StoreError as exc:
            raise Denied(hub_error(503, None, f"dataset {repo.repo_id}: its store did not answer; "
                                   "retry later")) from exc
        except OSError as exc:
            # The folder vanished or its manifest went between lookup and scan.
            raise Denied(repo_not_found(repo.repo_id)) from exc
    if revision not in (MAIN, state.sha):
        raise Denied(hub_error(
            404, "RevisionNotFound",
            f"Invalid rev id: {printable(revision, 100)} (dataset {repo.repo_id} has only 'main' = "
            f"{state.sha}; an older commit is gone once a file changes)"))
    return state
