"""Produce items in a background thread, a bounded number ahead of the consumer.

Used when a stream runs without DataLoader workers: the next batches are read and
decoded while the training step runs (Pillow's decoder, numpy copies and socket reads
release the GIL). Order is preserved, an error is raised at the item that failed, and
closing the consumer stops the thread; nothing is consumed until it is yielded.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_END = object()


def prefetched(fn: Callable[[int], T], items: Iterable[int], depth: int) -> Iterator[T]:
    """``fn(i) for i in items``, computed up to ``depth`` items ahead in one thread."""
    if depth <= 0:
        yield from (fn(i) for i in items)
        return
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for i in items:
                if stop.is_set() or not put((fn(i), None)):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            put((None, exc))
            return
        put(_END)

    thread = threading.Thread(target=run, name="cifar5m-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is _END:
                return
            value, error = item
            if error is not None:
                raise error
            yield value
    finally:
        stop.set()
        thread.join()
