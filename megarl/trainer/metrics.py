"""Phase timings and metric logging (console + TensorBoard), with verl/slime metric names."""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager


class PhaseTimer:
    """Wall-clock seconds per named phase of one step: `with timer.phase("generate"): ...`.

    Reported as `timing_s/<phase>`; a phase entered twice in a step accumulates.
    """

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        out = {f"timing_s/{name}": value for name, value in self.seconds.items()}
        out["timing_s/step"] = sum(self.seconds.values())
        return out

    def reset(self) -> None:
        self.seconds.clear()


def summarize(prefix: str, values) -> dict[str, float]:
    """mean/std/max/min of a list of numbers under `prefix/…` (population std, as verl reports it)."""
    values = [float(v) for v in values]
    if not values:
        return {}
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return {f"{prefix}/mean": mean, f"{prefix}/std": std, f"{prefix}/max": max(values), f"{prefix}/min": min(values)}


class MetricsLogger:
    """Writes scalars to the console and/or TensorBoard (`<log_dir>/events.out.tfevents.*`)."""

    def __init__(self, log_dir: str | None, backends=("console", "tensorboard"), console_keys=None,
                 jsonl_path: str | None = None):
        unknown = set(backends) - {"console", "tensorboard"}
        if unknown:
            raise ValueError(f"unknown logger backend(s) {sorted(unknown)}; choose from console, tensorboard")
        self.console = "console" in backends
        self.console_keys = console_keys
        self.writer = None
        self.jsonl_path = jsonl_path  # one JSON object per step: the exact values, for tools and tests
        if "tensorboard" in backends:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=log_dir)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        scalars = {k: float(v) for k, v in metrics.items() if _is_number(v)}
        if self.jsonl_path:
            import json

            os.makedirs(os.path.dirname(os.path.abspath(self.jsonl_path)), exist_ok=True)
            with open(self.jsonl_path, "a") as f:
                f.write(json.dumps({"step": step, **scalars}, sort_keys=True) + "\n")
        if self.writer is not None:
            for key, value in sorted(scalars.items()):
                self.writer.add_scalar(key, value, step)
            self.writer.flush()
        if self.console:
            keys = self.console_keys or sorted(scalars)
            shown = " ".join(f"{k}={scalars[k]:.4g}" for k in keys if k in scalars)
            print(f"[step {step}] {shown}", flush=True)

    def log_text(self, step: int, tag: str, text: str) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)
            self.writer.flush()
        if self.console:
            print(f"[step {step}] {tag}:\n{text}", flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_tensorboard_scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from every event file under log_dir (for tests and tools)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _is_number(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
