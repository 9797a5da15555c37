"""Worker processes that die with the process that started them.

``cifar5m import --workers N`` encodes shards in a ``forkserver`` process pool. When
the command was SIGKILLed its workers (blocked in a queue read), the fork server and the
resource tracker were re-parented to PID 1 and never exited.

A parent-death signal (``prctl(PR_SET_PDEATHSIG)``) cannot fix this: a forkserver
worker's parent is the fork server, and the fork server only exits once every holder of
its "alive" pipe is gone, the workers included, so it outlives the command as long as
they do. Each worker therefore watches a pipe instead: the one multiprocessing already
gives every child as ``parent_process().sentinel``, whose write end only the command
holds, so it reads EOF the moment the command dies, however it dies. A daemon thread
blocks on it (no polling) and ends the worker with ``os._exit``. With the workers gone
the fork server reads EOF on its alive pipe and exits, and so does the resource tracker
on its own pipe. This works wherever multiprocessing does, not only on Linux.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.connection import wait


def die_with_parent() -> None:
    """Pool initializer: end this worker as soon as the process that started it dies."""
    parent = multiprocessing.parent_process()
    if parent is None or parent.sentinel is None:
        return

    def watch() -> None:
        wait([parent.sentinel])  # readable only at EOF: the parent is gone
        os._exit(1)  # anything half-written is a temp file, never a finished shard

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A ``forkserver`` pool of ``workers`` processes that die with their parent."""
    ctx = multiprocessing.get_context("forkserver")
    return ProcessPoolExecutor(workers, mp_context=ctx, initializer=die_with_parent)
