"""Run one call into user code (a tool, an environment's ``reset``/``step``), sync or async, with
a timeout, from an asyncio event loop.

- An ``async def`` (or any callable returning an awaitable) is awaited on the loop, so many rows'
  calls run together; on timeout it is cancelled.
- A plain function runs in its own daemon thread, so a blocking call (a subprocess, an HTTP
  request) does not stall the loop. Why not a ``ThreadPoolExecutor``: a hung call would hold a
  pool slot forever, and the pool's threads are joined at interpreter exit, so one tool that never
  returns would keep the training process alive after it finished. A thread cannot be killed:
  on timeout the caller gets :class:`CallTimeout` and the thread is abandoned (it ends with the
  process).

Limit: an ``async def`` that blocks without awaiting (``time.sleep`` in a coroutine) blocks the
whole loop, and no timeout can interrupt it; write ``await asyncio.sleep`` there.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Callable
from typing import Any


class CallTimeout(Exception):
    """A call did not return within its timeout (seconds in ``timeout``)."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        super().__init__(f"did not return within {timeout:g} s")


async def call_with_timeout(fn: Callable[..., Any], args: tuple = (), kwargs: dict | None = None,
                            timeout: float | None = None) -> Any:
    """``fn(*args, **kwargs)``'s value (awaited when it is awaitable); raises :class:`CallTimeout`
    after ``timeout`` seconds (None: wait forever), or whatever ``fn`` raised."""
    kwargs = kwargs or {}
    if inspect.iscoroutinefunction(fn):
        work = fn(*args, **kwargs)
    else:
        work = _await_result(_in_daemon_thread(fn, args, kwargs))
    try:
        return await asyncio.wait_for(work, timeout)
    except asyncio.TimeoutError:
        raise CallTimeout(timeout) from None


async def _await_result(work):
    """A sync callable may still return an awaitable (``functools.partial`` of an ``async def``)."""
    value = await work
    return await value if inspect.isawaitable(value) else value


def _in_daemon_thread(fn: Callable[..., Any], args: tuple, kwargs: dict) -> asyncio.Future:
    """A future on the running loop that gets ``fn(*args, **kwargs)``'s value or exception."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(value, error):
        if not future.done():  # cancelled by a timeout: nobody waits for the value any more
            if error is None:
                future.set_result(value)
            else:
                future.set_exception(error)

    def target():
        try:
            value, error = fn(*args, **kwargs), None
        except BaseException as e:  # handed to the awaiting coroutine, which decides
            value, error = None, e
        try:
            loop.call_soon_threadsafe(settle, value, error)
        except RuntimeError:  # the loop was closed while this call hung: nothing to tell
            pass

    name = f"rlhf_ppo-call-{getattr(fn, '__name__', 'fn')}"
    threading.Thread(target=target, daemon=True, name=name).start()
    return future
