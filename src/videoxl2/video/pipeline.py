"""Run a producer (decode + preprocess) ahead of its consumer (the model) in a background thread.

Reading a long video costs as much as encoding it, so the two overlap: a worker thread fills a bounded queue
while the caller's thread runs the model. The queue holds at most `depth` items, so memory stays bounded
whatever the video's length. The producer's iterator is created, advanced and closed in the worker thread
(a generator belongs to one thread); its errors reach the consumer unchanged, at the item where they
happened; closing the consumer (end, error, Ctrl-C, a cancelled request) stops and joins the worker.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")
_END = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher(Generic[T]):
    """Iterate `make_items()` in a worker thread, up to `depth` items ahead of the caller.

    `busy_s`: seconds the worker spent producing; `wait_s`: seconds the caller spent waiting for items
    (so `busy_s - wait_s` of the production was hidden behind the caller's own work)."""

    def __init__(self, make_items: Callable[[], Iterator[T]], depth: int = 2, name: str = "videoxl2-reader"):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._make_items = make_items
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self.busy_s = 0.0
        self.wait_s = 0.0
        self._done = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        items = None
        try:
            start = time.perf_counter()
            items = self._make_items()
            while not self._stop.is_set():
                try:
                    item = next(items)
                except StopIteration:
                    break
                finally:
                    self.busy_s += time.perf_counter() - start
                if not self._put(item):
                    return
                start = time.perf_counter()
            self._put(_END)
        except BaseException as error:  # handed to the consumer, which raises it
            self._put(_Failure(error))
        finally:
            if items is not None and hasattr(items, "close"):
                items.close()

    def __iter__(self) -> Prefetcher[T]:
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        start = time.perf_counter()
        item = self._queue.get()
        self.wait_s += time.perf_counter() - start
        if item is _END:
            self.close()
            raise StopIteration
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        return item

    def close(self) -> None:
        """Stop the worker and wait for it (it finishes the item in hand, then closes its iterator)."""
        self._done = True
        self._stop.set()
        while self._thread.is_alive():
            try:
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.05)

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
