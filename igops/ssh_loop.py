"""The one asyncio event loop that carries this process's SSH connections (and the deploy's health
probes, which run beside its agents' sessions), on a thread of its own, and the bridge that lets
synchronous callers (commands, the operation engines' worker threads) wait for a coroutine on it.

One loop, not a thread per connection: with a thread for each of a hundred connections at once,
every packet read handed the interpreter's lock to another thread, and the run spent more CPU
switching between threads (about 300 context switches a host) than on its handshakes."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_running: tuple[asyncio.AbstractEventLoop, threading.Thread] | None = None


def _loop() -> tuple[asyncio.AbstractEventLoop, threading.Thread]:
    global _running
    with _lock:
        if _running is None:
            loop = asyncio.new_event_loop()
            # A daemon: a process that ends with connections open must not wait on them (each
            # host sees its connection close, as after a kill, which every agent is made for).
            thread = threading.Thread(target=loop.run_forever, name="ssh-loop", daemon=True)
            thread.start()
            _running = (loop, thread)
        return _running


def _forget_in_child() -> None:
    # A forked child has the parent's loop object but not its thread: it starts its own.
    global _running, _lock
    _running = None
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_in_child)


def call(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run `coroutine` on the loop and wait for its result (or exception) in this thread. An
    interrupt while waiting (Ctrl-C) cancels it there too."""
    loop, thread = _loop()
    if threading.current_thread() is thread:
        coroutine.close()
        raise RuntimeError("a blocking SSH call from the SSH loop's own thread (a run's callback?) would hang it")
    future = asyncio.run_coroutine_threadsafe(coroutine, loop)
    try:
        return future.result()
    except BaseException:
        future.cancel()
        raise
