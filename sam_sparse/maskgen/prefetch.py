"""Run a host-side function on the next items on a worker thread while the caller works on the current
one (images decoded and resized ahead, so the GPU does not wait for the CPU)."""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional


@dataclass
class Fetched:
    """One item and what `work(item)` gave, or the exception it raised (`error`)."""

    item: Any
    value: Any = None
    error: Optional[BaseException] = None


def prefetch(items: Iterable, work: Callable[[Any], Any], depth: int = 2,
             catch: tuple = (ValueError, OSError)) -> Iterator[Fetched]:
    """Yield Fetched(item, work(item)) for each item in order, `work` running on one worker thread up to
    `depth` items ahead. Exceptions of the `catch` types are handed over in Fetched.error; others are
    raised in the caller when their item's turn comes."""
    if depth < 1:
        raise ValueError(f"depth={depth!r}: expected an integer >= 1")
    it = iter(items)
    window: deque = deque()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sam-sparse-prefetch") as pool:
        for item in it:
            window.append((item, pool.submit(work, item)))
            if len(window) == depth:
                break
        while window:
            item, future = window.popleft()
            for nxt in it:  # keep `depth` items in flight
                window.append((nxt, pool.submit(work, nxt)))
                break
            try:
                value = future.result()
            except catch as e:
                yield Fetched(item, error=e)
                continue
            yield Fetched(item, value)
