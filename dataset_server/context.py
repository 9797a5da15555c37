"""What every request handler needs: the datasets, the access policy and the limits."""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio
from starlette.requests import Request
from starlette.responses import Response

from dataset_server.auth import Access, AccessPolicy
from dataset_server.handles import OpenFiles
from dataset_server.repo import DatasetRepo, Library, RepoState, valid_name
from dataset_server.responses import hub_error, repo_not_found

MAIN = "main"


@dataclass(frozen=True)
class ServerContext:
    library: Library
    policy: AccessPolicy
    page_size: int = 1000
    max_body: int = 1024 * 1024
    # A file request re-stats the whole dataset at most this often (seconds); each one
    # still checks its own file, and API calls always re-scan.
    scan_max_age: float = 1.0
    # fds that whole files are handed to the server by (pathsend; granian only).
    open_files: OpenFiles = field(default_factory=OpenFiles)


class Denied(Exception):
    """Carries the error response a lookup ended in."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status_code)
        self.response = response


def lookup(ctx: ServerContext, request: Request, org: str, name: str, *,
           files: bool) -> DatasetRepo:
    """The repo ``org/name`` if this request may see it (and, with ``files``, read files)."""
    repo_id = f"{org}/{name}"
    if not (valid_name(org) and valid_name(name)):
        # '..', '.', '%2F' and the like can never name a dataset: plain 404, no probing risk.
        raise Denied(hub_error(404, "RepoNotFound", f"Repository not found: {repo_id!r} is not a valid name"))
    repo = ctx.library.get(org, name, max_age=ctx.scan_max_age if files else 0.0)
    access = ctx.policy.access(repo_id, request.headers.get("authorization"))
    if repo is None or access is Access.NONE:
        raise Denied(repo_not_found(repo_id))
    if files and access is Access.METADATA:
        has_token = request.headers.get("authorization") is not None
        raise Denied(hub_error(
            403 if has_token else 401, "GatedRepo",
            f"Access to dataset {repo_id} is restricted: pass a token that has access "
            "(token=... or HF_TOKEN)"))
    return repo


async def state_at(repo: DatasetRepo, revision: str, *, max_age: float = 0.0) -> RepoState:
    """The repo's current state if ``revision`` names it (``main`` or its commit sha)."""
    state = repo.cached(max_age)
    if state is None:
        try:
            state = await anyio.to_thread.run_sync(repo.scan)
        except (OSError, ValueError) as exc:
            # The folder vanished or its manifest broke between lookup and scan.
            raise Denied(repo_not_found(repo.repo_id)) from exc
    if revision not in (MAIN, state.sha):
        raise Denied(hub_error(
            404, "RevisionNotFound",
            f"Invalid rev id: {revision} (dataset {repo.repo_id} has only 'main' = {state.sha}; "
            "an older commit is gone once a file changes)"))
    return state
