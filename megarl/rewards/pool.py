"""A process pool for reward functions with a per-call timeout that is really enforced.

``concurrent.futures`` cannot stop a running call: a reward that hangs keeps its worker busy forever.
Here each worker is a process with its own pipe; a call that overruns its deadline gets its worker
killed and replaced, and the call is reported as a timeout. A worker that dies (segfault,
``os._exit``) is replaced too, and its call reported as an error. The trainer never waits longer than
the timeout for any call, and never sees a reward's exception.

Workers start from a "forkserver" by default: forking the trainer itself (which holds threads from
torch, Ray, vLLM) can deadlock the child.

The timeout measures the reward call only. The first call of a function in a fresh worker also pays
for the worker's start and the import of the function's module; that phase has its own, generous
limit (``resolve_timeout_s``), and the worker acknowledges its end so the call's clock starts then.
"""

from __future__ import annotations

import atexit
import importlib
import multiprocessing
import multiprocessing.connection
import signal
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from megarl.rewards.registry import get_reward, is_custom_spec, load_function


_RESOLVED = "resolved"


@dataclass(frozen=True)
class RewardRef:
    """How a worker process finds a reward function: a registered name (plus the module that
    registers it, imported first) or a custom ``file.py:function`` / ``module:function`` spec."""

    spec: str
    module: str | None = None


@dataclass
class RewardCall:
    ref: RewardRef
    args: tuple
    kwargs: dict = field(default_factory=dict)
    timeout_s: float | None = None  # None: the pool's default


@dataclass
class CallOutcome:
    status: str  # "ok" | "error" | "timeout"
    value: Any = None
    error: str | None = None


def resolve_ref(ref: RewardRef):
    if is_custom_spec(ref.spec):
        return load_function(ref.spec)
    if ref.module and ref.module != "__main__":
        importlib.import_module(ref.module)
    return get_reward(ref.spec).fn


def _worker_main(conn) -> None:
    # Ctrl-C goes to the whole process group; the trainer decides what to do, workers just serve.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    functions: dict[RewardRef, Any] = {}
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the trainer went away
        if message is None:
            return
        call_id, ref, args, kwargs = message
        try:
            if ref not in functions:
                functions[ref] = resolve_ref(ref)
                conn.send((call_id, _RESOLVED, None, None))  # the call's own timeout starts now
            reply = (call_id, "ok", functions[ref](*args, **kwargs), None)
        except BaseException as exc:  # noqa: BLE001 - a reward's SystemExit must not stop the worker either
            reply = (call_id, "error", None, describe_exception(exc))
        try:
            conn.send(reply)
        except Exception as exc:  # noqa: BLE001 - e.g. an unpicklable return value
            conn.send((call_id, "error", None, f"reward returned an unsendable value: {describe_exception(exc)}"))


def describe_exception(exc: BaseException) -> str:
    frames = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return f"{type(exc).__name__}: {exc}\n{''.join(frames[-3:])}"


class _Worker:
    def __init__(self, ctx):
        self.conn, child_conn = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_worker_main, args=(child_conn,), name="megarl-reward-worker")
        self.process.start()
        child_conn.close()
        self.resolved: set[RewardRef] = set()  # functions this worker has loaded (mirrors its cache)

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()


@dataclass
class _InFlight:
    worker: _Worker
    index: int  # position of the call in run()'s list
    call_id: int
    deadline: float  # time.monotonic() seconds
    resolving: bool  # the worker is still loading the function (start-up limit, not the call's)


class RewardWorkerPool:
    """``num_workers`` processes; ``run(calls)`` returns one CallOutcome per call, in order."""

    def __init__(self, num_workers: int, timeout_s: float, start_method: str = "forkserver",
                 resolve_timeout_s: float = 120.0):
        if num_workers < 1:
            raise ValueError(f"num_workers must be ≥ 1, got {num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self.resolve_timeout_s = resolve_timeout_s
        self._ctx = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            # Workers forked from the server start with the reward code already imported.
            self._ctx.set_forkserver_preload(["megarl.rewards.builtin", "math_verify"])
        self._workers = [_Worker(self._ctx) for _ in range(num_workers)]
        self._next_call_id = 0
        atexit.register(self.close)

    def run(self, calls: list[RewardCall]) -> list[CallOutcome]:
        outcomes: list[CallOutcome | None] = [None] * len(calls)
        pending = deque(range(len(calls)))
        idle = list(self._workers)
        busy: dict[int, _InFlight] = {}  # id(worker) → its call
        while pending or busy:
            while pending and idle:
                worker = idle.pop()
                index = pending.popleft()
                call = calls[index]
                call_id = self._next_call_id
                self._next_call_id += 1
                try:
                    worker.conn.send((call_id, call.ref, call.args, call.kwargs))
                except Exception as exc:  # noqa: BLE001 - a dead idle worker, or unpicklable arguments
                    if worker.process.is_alive():  # pickling fails before anything is written
                        outcomes[index] = CallOutcome("error", error=f"could not send the call: {describe_exception(exc)}")
                        idle.append(worker)
                    else:  # the worker died while idle: retry the call on a fresh one
                        pending.appendleft(index)
                        idle.append(self._replace(worker))
                    continue
                resolving = call.ref not in worker.resolved
                limit = self.resolve_timeout_s if resolving else self._timeout(call)
                busy[id(worker)] = _InFlight(worker, index, call_id, time.monotonic() + limit, resolving)
            if not busy:
                continue
            earliest = min(flight.deadline for flight in busy.values())
            ready = multiprocessing.connection.wait([f.worker.conn for f in busy.values()],
                                                    timeout=max(0.0, earliest - time.monotonic()))
            for conn in ready:
                flight = next(f for f in busy.values() if f.worker.conn is conn)
                try:
                    reply_id, status, value, error = conn.recv()
                except (EOFError, OSError) as exc:
                    del busy[id(flight.worker)]
                    outcomes[flight.index] = CallOutcome("error", error=f"reward worker died: {exc!r}")
                    idle.append(self._replace(flight.worker))
                    continue
                if reply_id != flight.call_id:  # cannot happen with one call in flight per worker
                    raise RuntimeError(f"reward worker answered call {reply_id}, expected {flight.call_id}")
                if status == _RESOLVED:  # function loaded: the call's own clock starts now
                    flight.worker.resolved.add(calls[flight.index].ref)
                    flight.resolving = False
                    flight.deadline = time.monotonic() + self._timeout(calls[flight.index])
                    continue
                del busy[id(flight.worker)]
                outcomes[flight.index] = CallOutcome(status, value, error)
                idle.append(flight.worker)
            now = time.monotonic()
            for key, flight in list(busy.items()):
                if now >= flight.deadline:
                    del busy[key]
                    if flight.resolving:
                        outcomes[flight.index] = CallOutcome(
                            "error", error=f"loading the reward function took over {self.resolve_timeout_s} s")
                    else:
                        outcomes[flight.index] = CallOutcome(
                            "timeout", error=f"reward call exceeded {self._timeout(calls[flight.index])} s")
                    idle.append(self._replace(flight.worker))
        return outcomes  # type: ignore[return-value]

    def _timeout(self, call: RewardCall) -> float:
        return call.timeout_s or self.timeout_s

    def _replace(self, worker: _Worker) -> _Worker:
        worker.kill()
        fresh = _Worker(self._ctx)
        self._workers[self._workers.index(worker)] = fresh
        return fresh

    def close(self) -> None:
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except Exception:  # noqa: BLE001 - already gone
                pass
        for worker in self._workers:
            worker.process.join(timeout=2)
            worker.kill()
        self._workers = []
        atexit.unregister(self.close)
