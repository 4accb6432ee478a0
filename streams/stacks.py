"""What a running worker waits on: every asyncio task's await chain and every thread's stack,
which the worker prints to stderr (its log) on SIGUSR1 (``streams/worker.py``).

Faust's worker answers SIGUSR1 with each task's outermost frame only, plus every frame's local
variables: it cannot tell an agent waiting for input (its ``async for`` over the stream) from
one waiting for Kafka's acknowledgements. Following each coroutine's ``cr_await`` gives the
line every coroutine of the chain waits on. For a worker that stops making progress with
nothing in its log, which the SIGKILL recovery test once saw (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import threading
import traceback
from types import FrameType
from typing import Any

__all__ = ["render_stacks", "task_chain"]

#: how deep an await chain is followed (they are a dozen frames deep at most)
_MAX_DEPTH = 64


def _first_attr(obj: Any, attrs: tuple[str, ...]) -> Any:
    # coroutines, async generators and generators name the same thing differently
    for attr in attrs:
        value = getattr(obj, attr, None)
        if value is not None:
            return value
    return None


def _frame_of(obj: Any) -> FrameType | None:
    frame: FrameType | None = _first_attr(obj, ("cr_frame", "ag_frame", "gi_frame"))
    return frame


def _awaited_by(obj: Any) -> Any:
    return _first_attr(obj, ("cr_await", "ag_await", "gi_yieldfrom"))


def _unwrap(obj: Any) -> Any:
    for ref in gc.get_referents(obj):
        if isinstance(ref, asyncio.Future) or _frame_of(ref) is not None:
            return ref
    return None


def task_chain(task: asyncio.Task[Any]) -> list[str]:
    """The frames a task waits in, outermost first, then what the innermost one awaits (a
    future, or an async generator step, whose frames Python does not expose)."""
    lines: list[str] = []
    obj: Any = task.get_coro()
    for _ in range(_MAX_DEPTH):
        frame = _frame_of(obj)
        if frame is None:
            # an awaited coroutine's wrapper, an async generator's step or a future's
            # iterator hide what they wrap from Python; the collector still lists it
            inner = _unwrap(obj)
            if inner is None:
                lines.append(f"  awaiting {type(obj).__name__}")
                break
            if isinstance(inner, asyncio.Future):
                lines.append(f"  awaiting {inner!r:.200}")
                break
            obj = inner
            continue
        lines.append(f'  File "{frame.f_code.co_filename}", line {frame.f_lineno}, '
                     f"in {frame.f_code.co_name}")
        obj = _awaited_by(obj)
        if obj is None:
            break
    return lines


def render_stacks(loop: asyncio.AbstractEventLoop) -> str:
    """Every thread's stack, then every task of ``loop`` with its await chain."""
    out = [f"==== stacks of pid {os.getpid()} ===="]
    names = {t.ident: t.name for t in threading.enumerate()}
    for ident, frame in sys._current_frames().items():
        out.append(f"THREAD {names.get(ident, ident)}")
        out.extend(line.rstrip("\n") for line in traceback.format_stack(frame, limit=12))
    for task in sorted(asyncio.all_tasks(loop), key=lambda t: t.get_name()):
        out.append(f"TASK {task.get_name()} {task.get_coro()!r:.120}")
        out.extend(task_chain(task))
    out.append("==== end of stacks ====")
    return "\n".join(out) + "\n"
