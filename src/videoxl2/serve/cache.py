"""An LRU of pre-filled videos, bounded by the bytes of their KV memory.

A follow-up question on a video the server has seen (same content, sampling and engine settings, model)
reuses its VideoMemory: no decoding, no vision tower, no pre-fill.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from pathlib import Path


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def session_bytes(session) -> int:
    """What a cached session will hold: a bi-level one builds its sparse KV at its first question, so it is
    counted from the start."""
    memory = session.memory
    if memory is None:
        return 0
    bilevel = session.settings.mode == "bilevel"
    return memory.dense_bytes() + (memory.sparse_size_bytes() if bilevel else memory.sparse_bytes())


class SessionCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[tuple, tuple[object, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @property
    def nbytes(self) -> int:
        return sum(size for _, size in self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: tuple):
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: tuple, session) -> None:
        """Keep `session` (pre-filled); the least recently used go first when over budget. A session larger
        than the whole budget is not kept."""
        size = session_bytes(session)
        if size > self.max_bytes:
            return
        with self._lock:
            self._items[key] = (session, size)
            self._items.move_to_end(key)
            while self.nbytes > self.max_bytes:
                self._items.popitem(last=False)

    def clear(self) -> None:
        """Drop every cached session (their memory is freed once no request holds them)."""
        with self._lock:
            self._items.clear()
