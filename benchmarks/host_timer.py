"""Host time of an in-process ``vllm.LLM`` by call site: the host half of a decode profile.

    with HostTimer(llm) as ht:
        llm.generate(...)
    ht.totals()  # {"Scheduler.schedule": (seconds, calls), ...}

Wrapped while the block runs (and restored after): the engine core's ``scheduler.schedule`` and
``scheduler.update_from_output`` (stock ``Scheduler`` or ``DMSScheduler``), the executor's
``execute_model`` and ``sample_tokens`` (the worker's input prep, the forward's launches or graph
replay, and any wait on the GPU), and ``build`` of every attention metadata builder class loaded
(FlashAttention's for BF16, ``DMSMetadataBuilder`` for dms_fp8). Needs the engine core in this
process (VLLM_ENABLE_V1_MULTIPROCESSING=0), as bench_speed runs it.
"""
from __future__ import annotations

import functools
import time
from collections import defaultdict


def _subclasses(cls) -> list[type]:
    out, todo = [], [cls]
    while todo:
        for sub in todo.pop().__subclasses__():
            out.append(sub)
            todo.append(sub)
    return out


class HostTimer:
    def __init__(self, llm):
        self.core = llm.llm_engine.engine_core.engine_core  # AttributeError: not in-process
        self.time: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._undo: list = []

    def _wrap(self, owner, attr: str, name: str, on_class: bool) -> None:
        fn = owner.__dict__[attr] if on_class else getattr(owner, attr)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.time[name] += time.perf_counter() - t0
                self.calls[name] += 1
        setattr(owner, attr, timed)
        # an instance wrap is undone by deleting the attribute (the class method shows again)
        self._undo.append((owner, attr, fn if on_class else None))

    def __enter__(self) -> "HostTimer":
        from vllm.v1.attention.backend import AttentionMetadataBuilder
        sched, ex = self.core.scheduler, self.core.model_executor
        for attr in ("schedule", "update_from_output"):
            self._wrap(sched, attr, f"{type(sched).__name__}.{attr}", on_class=False)
        for attr in ("execute_model", "sample_tokens"):
            if hasattr(ex, attr):
                self._wrap(ex, attr, f"executor.{attr}", on_class=False)
        for cls in _subclasses(AttentionMetadataBuilder):
            if "build" in cls.__dict__:
                self._wrap(cls, "build", f"{cls.__name__}.build", on_class=True)
        return self

    def __exit__(self, *exc) -> None:
        for owner, attr, fn in reversed(self._undo):
            if fn is None:
                delattr(owner, attr)
            else:
                setattr(owner, attr, fn)
        self._undo = []

    def totals(self) -> dict[str, tuple[float, int]]:
        return {k: (self.time[k], self.calls[k]) for k in self.time}


def per_step(short: dict, long: dict, steps: int) -> dict[str, list[float]]:
    """(long run - short run) / steps per call site: [us per step, calls per step]."""
    out = {}
    for name, (t, n) in long.items():
        t0, n0 = short.get(name, (0.0, 0))
        out[name] = [round(1e6 * (t - t0) / steps, 1), round((n - n0) / steps, 2)]
    return dict(sorted(out.items(), key=lambda kv: -kv[1][0]))
