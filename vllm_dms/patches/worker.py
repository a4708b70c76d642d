"""Carry the DMS step messages through vLLM's worker entry point (``vllm_dms.engine.channel``).

``WorkerWrapperBase`` (vllm/v1/worker/worker_base.py) is what every executor calls: the
UniProcExecutor in the engine core, each MultiprocExecutor worker process (any TP rank), with
or without async scheduling. For a worker whose model has dms_fp8 attention layers:

* ``execute_model``: hands the orders on the SchedulerOutput to the engine's ``WorkerLink``
  (releases and forks run now, before the forward; snapshots wait for the build), runs the step
  and, after a forward, posts the staged rows to the host ring (TP: combined over the ranks,
  every rank calls it after the same step);
* ``execute_model`` / ``sample_tokens``: put the newest landed rows on the ``ModelRunnerOutput``
  they return (``FEEDBACK_ATTR``), also on the deferred one of async scheduling
  (``AsyncModelRunnerOutput.get_output``, which may run in another thread: the rows are taken
  here, in the worker's thread).

Any other worker: stock (one scan of its forward context, cached on the wrapper).
"""
from __future__ import annotations

_MARK = "__dms_wrapped__"
_CACHE = "_dms_link"  # on the WorkerWrapperBase instance: its WorkerLink, or False (not DMS)


def check() -> None:
    from vllm.v1.worker.worker_base import WorkerBase, WorkerWrapperBase

    from vllm_dms.patches import require_params
    fn = WorkerWrapperBase.execute_model
    if not getattr(fn, _MARK, False):
        require_params(fn, ("self", "scheduler_output"), "WorkerWrapperBase.execute_model")
    require_params(WorkerBase.sample_tokens, ("self", "grammar_output"), "WorkerBase.sample_tokens")
    own = WorkerWrapperBase.__dict__.get("sample_tokens")
    if own is not None and not getattr(own, _MARK, False):
        require_params(own, ("self", "grammar_output"), "WorkerWrapperBase.sample_tokens")
    import inspect
    src = inspect.getsource(WorkerWrapperBase.init_worker)
    for line in ("self.vllm_config = ", "self.worker = "):  # what _link and sample_tokens read
        if line not in src:
            from vllm_dms.patches import PatchError
            raise PatchError(f"WorkerWrapperBase.init_worker no longer has {line.strip()!r}")


def _link(wrapper):
    """The WorkerLink of this worker's engine, None for a model without dms_fp8 layers."""
    cached = wrapper.__dict__.get(_CACHE)
    if cached is not None:
        return cached or None
    from vllm_dms.worker.runtime import dms_layer_names, worker_link
    ctx = wrapper.__dict__["vllm_config"].compilation_config.static_forward_context
    if not ctx:
        return None  # no model loaded yet: decide later
    names = dms_layer_names(ctx)
    link = worker_link(ctx, names) if names else False
    wrapper.__dict__[_CACHE] = link
    return link or None


def _attach(out, link):
    from vllm.v1.outputs import (EMPTY_MODEL_RUNNER_OUTPUT, AsyncModelRunnerOutput,
                                 ModelRunnerOutput)

    from vllm_dms.engine.channel import FEEDBACK_ATTR
    if out is EMPTY_MODEL_RUNNER_OUTPUT or not isinstance(
            out, (ModelRunnerOutput, AsyncModelRunnerOutput)):
        return out  # a shared singleton, None (sample next) or intermediate tensors
    rows = link.report()
    if rows is None:
        return out
    if isinstance(out, ModelRunnerOutput):
        setattr(out, FEEDBACK_ATTR, rows)
        return out
    get = out.get_output

    def get_output():
        o = get()
        if o is not EMPTY_MODEL_RUNNER_OUTPUT:
            setattr(o, FEEDBACK_ATTR, rows)
        return o

    out.get_output = get_output  # this instance only
    return out


def apply() -> None:
    import torch
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    from vllm_dms.engine.channel import ORDERS_ATTR
    original = WorkerWrapperBase.execute_model
    if getattr(original, _MARK, False):
        return
    own_sample = WorkerWrapperBase.__dict__.get("sample_tokens")

    def execute_model(self, scheduler_output):
        link = _link(self)
        if link is None:
            return original(self, scheduler_output)
        with torch.inference_mode():  # the runtime's tensors are inference tensors
            link.receive(getattr(scheduler_output, ORDERS_ATTR, None))
        out = original(self, scheduler_output)
        if scheduler_output.total_num_scheduled_tokens > 0:
            with torch.inference_mode():
                link.after_forward()
        return _attach(out, link)

    def sample_tokens(self, grammar_output):
        if own_sample is not None:
            out = own_sample(self, grammar_output)
        else:
            out = self.worker.sample_tokens(grammar_output)
        link = _link(self)
        return out if link is None else _attach(out, link)

    for fn, orig in ((execute_model, original), (sample_tokens, own_sample)):
        setattr(fn, _MARK, True)
        fn.__wrapped__ = orig
    WorkerWrapperBase.execute_model = execute_model
    WorkerWrapperBase.sample_tokens = sample_tokens
