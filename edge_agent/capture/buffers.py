"""Hand-off structures between the capture loop and its consumers. None ever blocks the producer.

- :class:`BoundedBuffer`: a FIFO with a fixed capacity. When it is full, the new
  item is refused and counted in ``dropped``; the producer moves on.
- :class:`LatestSlot`: one slot, "latest wins" (as Google's Coral camera
  examples hand frames to inference). A newer item replaces an unread one and
  the replaced item is counted in ``replaced``.

Both are single-producer. ``close()`` ends the stream: a consumer drains what is
left and then sees ``None``.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

_END = object()  # end-of-stream marker put by close()


class BoundedBuffer(Generic[T]):
    """A bounded FIFO whose producer never waits: when full, the newest item is dropped.

    Dropping the newest (not the oldest) keeps what a consumer receives a
    contiguous prefix plus later runs, so a consumer that sees a gap in ``seq``
    knows exactly which frames to fetch again from the finished segments.
    """

    def __init__(self, maxlen: int, name: str = "buffer") -> None:
        if maxlen < 1:
            raise ValueError(f"{name}: maxlen must be at least 1, got {maxlen}")
        self.name = name
        self.maxlen = maxlen
        self.offered = 0
        self.dropped = 0
        # SimpleQueue is implemented in C and never blocks on put; the bound is
        # checked here, which is race-free because there is a single producer
        # and consumers only ever shrink the queue.
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._ended = False

    def offer(self, item: T) -> bool:
        """Append ``item`` unless the buffer is full or closed. Never blocks."""
        self.offered += 1
        if self._closed or self._q.qsize() >= self.maxlen:
            self.dropped += 1
            return False
        self._q.put(item)
        return True

    def get(self, timeout: float | None = None) -> T | None:
        """The next item; ``None`` once the buffer is closed and drained.

        Raises ``queue.Empty`` if ``timeout`` passes with nothing to return.
        """
        if self._ended:
            return None
        item = self._q.get(timeout=timeout)
        if item is _END:
            self._ended = True
            return None
        return item

    def close(self) -> None:
        """End the stream. Items already queued are still delivered."""
        if not self._closed:
            self._closed = True
            self._q.put(_END)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def depth(self) -> int:
        n = self._q.qsize()
        return n - 1 if self._closed and not self._ended and n else n

    def __iter__(self) -> Iterator[T]:
        while (item := self.get()) is not None:
            yield item

    def stats(self) -> dict[str, int]:
        return {"depth": self.depth, "capacity": self.maxlen, "dropped": self.dropped}


class LatestSlot(Generic[T]):
    """One item, latest wins. The producer never waits; the consumer waits for something new."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._item: T | None = None
        self._closed = False
        self.offered = 0
        self.taken = 0
        self.replaced = 0

    def put(self, item: T) -> None:
        with self._cond:
            self.offered += 1
            if self._item is not None:
                self.replaced += 1
            self._item = item
            self._cond.notify()

    def take(self, timeout: float | None = None) -> T | None:
        """The newest unread item; waits for one. ``None`` when closed and empty, or on timeout."""
        with self._cond:
            while self._item is None and not self._closed:
                if not self._cond.wait(timeout):
                    return None
            item, self._item = self._item, None
            if item is not None:
                self.taken += 1
            return item

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pending(self) -> bool:
        return self._item is not None
