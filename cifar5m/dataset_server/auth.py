"""Who may read which dataset: bearer tokens per dataset from a YAML or JSON file.

The file maps ``org/name`` (or ``org/*`` for a whole organisation) to its tokens::

    datasets:
      lab/private-set: [s3cret-1, s3cret-2]    # private: invisible without a token
      lab/*:                                   # every dataset of org "lab" not listed
        tokens: [lab-token]
      lab/gated-set:                           # gated: listed and described to
        gated: true                            # anyone, files only with a token
        tokens: [g4ted]

Datasets not in the file are public. Clients send ``Authorization: Bearer <token>``
(huggingface_hub does so with ``token=`` or ``HF_TOKEN``).
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import yaml

from cifar5m.core.errors import ServerConfigError


class Access(Enum):
    """What a request may do with a dataset."""

    FULL = "full"  # public, or the right token
    METADATA = "metadata"  # gated without the right token: info and listings only
    NONE = "none"  # private without the right token: it does not exist


@dataclass(frozen=True)
class Rule:
    """Access rule of one dataset (or one organisation, for ``org/*``)."""

    tokens: tuple[str, ...]
    gated: bool = False


def _rule(pattern: str, value: object, where: str) -> Rule:
    if isinstance(value, (str, list)):
        value = {"tokens": value}
    if not isinstance(value, dict) or set(value) - {"tokens", "gated"}:
        raise ServerConfigError(
            f"{where}: entry {pattern!r} must be a token, a list of tokens or "
            "{tokens: [...], gated: true|false}"
        )
    tokens = value.get("tokens", [])
    tokens = [tokens] if isinstance(tokens, str) else tokens
    # A request's token is stripped before it is compared: " ", "" or "t " could never match.
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) and t and t == t.strip()
                                                             for t in tokens):
        raise ServerConfigError(f"{where}: entry {pattern!r} needs at least one non-empty token string "
                                "(no spaces around it)")
    return Rule(tuple(tokens), bool(value.get("gated", False)))


class AccessPolicy:
    """Decides :class:`Access` from a repo id and an ``Authorization`` header."""

    def __init__(self, rules: dict[str, Rule] | None = None) -> None:
        self.rules = dict(rules or {})

    @classmethod
    def from_file(cls, path: str | Path | None) -> AccessPolicy:
        """Read a token file (YAML or JSON; see the module docstring); None: all public."""
        if path is None:
            return cls()
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ServerConfigError(f"cannot read token file {path}: {exc.strerror}") from exc
        try:
            doc = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as exc:
            raise ServerConfigError(f"token file {path} is not valid JSON/YAML: {exc}") from exc
        entries = doc.get("datasets") if isinstance(doc, dict) else None
        if not isinstance(entries, dict):
            raise ServerConfigError(
                f"token file {path} must hold a mapping 'datasets: {{org/name: [token, ...]}}'"
            )
        rules = {}
        for pattern, value in entries.items():
            org, _, name = str(pattern).partition("/")
            if not org or not name or "/" in name:
                raise ServerConfigError(f"{path}: {pattern!r} is not 'org/name' or 'org/*'")
            rules[str(pattern)] = _rule(str(pattern), value, str(path))
        return cls(rules)

    def rule(self, repo_id: str) -> Rule | None:
        org = repo_id.split("/", 1)[0]
        return self.rules.get(repo_id) or self.rules.get(f"{org}/*")

    def access(self, repo_id: str, authorization: str | None) -> Access:
        rule = self.rule(repo_id)
        if rule is None:
            return Access.FULL
        token = bearer_token(authorization)
        # compare_digest against every token: the time taken says nothing about them.
        ok = token is not None and any(
            hmac.compare_digest(token.encode(), t.encode()) for t in rule.tokens
        )
        if ok:
            return Access.FULL
        return Access.METADATA if rule.gated else Access.NONE

    def gated(self, repo_id: str) -> bool:
        rule = self.rule(repo_id)
        return rule is not None and rule.gated

    def private(self, repo_id: str) -> bool:
        rule = self.rule(repo_id)
        return rule is not None and not rule.gated


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
