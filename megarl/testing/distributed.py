"""Run a function on N gloo ranks (separate processes) and gather what each returns.

    results = run_on_ranks(my_module.check_layout, world_size=4, args=(model_dir,), timeout=300)

The function must be importable by name (module level), since ranks are started with `spawn`. Each
rank gets torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so code
under test initialises torch.distributed exactly as it would under torchrun. A collective that never
matches hangs rather than fails on gloo, so every run has a timeout after which all ranks are killed.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from typing import Any, Callable, Sequence


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(fn, args, kwargs, rank, world_size, port, env, results):
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    try:
        import torch

        # Ranks share the machine's cores; oversubscribing them slows every rank down several-fold.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        # Plain pickle bytes: the queue's own pickler would share tensors through file descriptors
        # that vanish when this process exits before the parent reads them.
        results.put((rank, True, pickle.dumps(fn(*args, **kwargs))))
    except BaseException:  # report everything, including SystemExit from argparse
        results.put((rank, False, traceback.format_exc()))
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass


class RankFailure(RuntimeError):
    pass


def run_on_ranks(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    kwargs: dict | None = None,
    timeout: float = 600.0,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run fn(*args, **kwargs) on world_size spawned ranks; return the per-rank results in rank order.

    Raises RankFailure with the failing rank's traceback, or on timeout (all ranks are killed).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(fn, tuple(args), kwargs or {}, r, world_size, port, env or {}, results))
        for r in range(world_size)
    ]
    for proc in procs:
        proc.start()
    gathered: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(gathered) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RankFailure(
                    f"timed out after {timeout:.0f}s; ranks that finished: {sorted(gathered)} of {world_size} "
                    "(a collective that some rank never entered hangs on gloo)"
                )
            try:
                rank, ok, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in gathered]
                if dead:
                    raise RankFailure(f"rank(s) {dead} died with exit codes {[procs[r].exitcode for r in dead]}")
                continue
            if not ok:
                raise RankFailure(f"rank {rank} failed:\n{value}")
            gathered[rank] = pickle.loads(value)
    finally:
        for proc in procs:
            proc.join(timeout=5 if len(gathered) == world_size else 0.1)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return [gathered[r] for r in range(world_size)]
