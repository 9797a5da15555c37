"""The one format of a stream's state (``SampleStream.state_dict()``), checked before a resume,
and read back out of a torchdata ``StatefulDataLoader``'s state."""

from __future__ import annotations

from typing import Any

from cifar5m.core.errors import StreamStateError

STATE_VERSION = 1
# Fields a saved state must agree on: they define the order. world_size, num_workers,
# steps and the source URL (same data behind another transport) may change.
STATE_KEYS = ("world", "n", "batch_size", "seed", "split", "class_balanced", "block", "window")


def checked_state(state: dict[str, Any], mine: dict[str, Any]) -> dict[str, Any]:
    """``state`` if this stream (whose own state is ``mine``) can resume from it."""
    for key in (*STATE_KEYS, "dataset"):
        if state.get(key) != mine[key]:
            raise StreamStateError(
                f"the saved stream state has {key}={state.get(key)!r} but this stream has "
                f"{key}={mine[key]!r}; resume with the same {key}")
    if not 0 <= state["next_batch"] <= mine["total_batches"]:
        raise StreamStateError(
            f"the saved state is at batch {state['next_batch']} but this stream has only "
            f"{mine['total_batches']} batches; raise steps")
    return state


def loader_stream_state(state: dict[str, Any]) -> dict[str, Any]:
    """A stream state from a torchdata ``StatefulDataLoader.state_dict()`` (the state itself
    when it is one). With workers the loader keeps each worker's state as of the last batch it
    handed over from that worker; batches are handed over in order, so the furthest worker's
    ``next_batch`` is what was consumed."""
    if "next_batch" in state:
        return state
    snapshot = state.get("_snapshot")
    if snapshot is None:  # num_workers=0: the dataset's own state
        found = [state.get("dataset_state")]
    else:
        found = [w.get("dataset_state") for w in snapshot.get("_worker_snapshots", {}).values()]
    found = [s for s in found if isinstance(s, dict) and "next_batch" in s]
    if not found:
        raise StreamStateError("this state holds no stream state: pass stream.state_dict() or a "
                               "StatefulDataLoader's state_dict() over a SampleStream")
    best = max(found, key=lambda s: s["next_batch"])
    return {k: v for k, v in best.items() if k != "loader_worker"}
