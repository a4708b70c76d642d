"""Per-request rules for ``--kv-cache-dtype dms_fp8``, in one place: :func:`request_problem`.

It runs twice, on the same inputs:

* front-end: :func:`install_frontend_check` wraps vLLM's ``InputProcessor.process_inputs`` in the
  process that builds a dms_fp8 VllmConfig (``patches/engine.py``); a violation raises
  ``VLLMValidationError``, which the OpenAI server answers with HTTP 400 and the message, before
  anything reaches the engine;
* engine core: ``DMSScheduler.add_request`` applies it to requests that did not come through that
  InputProcessor and finishes them with FINISHED_ERROR; the engine keeps serving.

Already refused by vLLM 0.26 with HTTP 400, so not repeated here (tests/test_validation.py):
empty prompt and prompt >= max_model_len (InputProcessor, renderer ``TokenizeParams``), negative
ids on /v1/completions (``Field(ge=0)``), ids past the vocabulary when a tokenizer is loaded.
Served as-is: n > 1 (independent child requests), beam search (a front-end loop of ordinary
requests), prompt_logprobs (the DMS prefill computes every prompt row).

Added for DMS:

* every prompt token id in [0, vocab_size): vLLM skips the upper bound without a tokenizer
  (--skip-tokenizer-init) and the lower bound outside /v1/completions; such an id would index
  past the embedding table and take the engine down for every request;
* no resumable (streaming-input) requests: between input chunks a session keeps its arena slot
  and comes back through vLLM's waiting queue with tokens already in its rows; the DMS ledger
  (``DMSKVCacheManager``) only continues rows of a running request or of a prefix entry, and
  re-admitting such a session is a path it has never been built or tested for.

A request that can never fit the arena is impossible after startup (``DMSKVCacheManager``).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

_MARK = "_vllm_dms_validates"


def request_problem(token_ids: Sequence[int] | None, *, vocab_size: int,
                    resumable: bool = False) -> tuple[str, str, object] | None:
    """(parameter, message, value) of the first rule a request breaks, None if it may run."""
    if resumable:
        return ("stream", "streaming-input (resumable) requests are not supported with "
                "--kv-cache-dtype dms_fp8: a session would keep its DMS arena slot between "
                "input chunks, which the DMS scheduler does not support; send each input as "
                "its own request", True)
    if token_ids:
        lo, hi = min(token_ids), max(token_ids)
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            return ("prompt_token_ids", f"prompt token id {bad} (position "
                    f"{list(token_ids).index(bad)}) is outside the model's vocabulary "
                    f"[0, {vocab_size})", bad)
    return None


def install_frontend_check() -> None:
    """Run :func:`request_problem` on every request a dms_fp8 InputProcessor builds (idempotent)."""
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.input_processor import InputProcessor

    from vllm_dms import DMS_DTYPE

    orig = InputProcessor.process_inputs
    if getattr(orig, _MARK, False):
        return

    @functools.wraps(orig)
    def process_inputs(self, *args, **kwargs):
        request = orig(self, *args, **kwargs)
        if self.cache_config.cache_dtype == DMS_DTYPE:  # other engines in this process: stock
            problem = request_problem(request.prompt_token_ids,
                                      vocab_size=self.model_config.get_vocab_size(),
                                      resumable=request.resumable)
            if problem is not None:
                param, message, value = problem
                raise VLLMValidationError(message, parameter=param, value=value)
        return request

    setattr(process_inputs, _MARK, True)
    InputProcessor.process_inputs = process_inputs
