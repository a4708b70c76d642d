"""Request validation for dms_fp8 (vllm_dms.engine.validation), CPU only, no HTTP server.

The HTTP status is what vLLM's OpenAI server would answer: its exception handlers
(vllm/entrypoints/serve/utils/server_utils.py) are called on the exception each path raises.

1. What vLLM 0.26 already answers with 400 (nothing added by DMS).
2. What DMS adds, through the real front-end path: a fresh interpreter loads the plugin, builds a
   dms_fp8 VllmConfig with EngineArgs (which installs the InputProcessor check) and feeds
   vLLM's InputProcessor; a dense engine in the same process stays stock.
3. The engine side: the same rules finish a request with FINISHED_ERROR, the others are served.
4. Startup refuses an arena that cannot hold one max_model_len request (the exact boundary).
"""
import asyncio
import json
import os
import subprocess
import sys
import types

from test_scheduler import (SimWorker, dms, dms_live_8x, dms_spec, drive,  # noqa: F401
                            llama_dir, make_request, make_scheduler, make_vllm_config)

import pytest  # noqa: E402
from vllm.utils.math_utils import cdiv  # noqa: E402
from vllm.v1.request import RequestStatus  # noqa: E402

from vllm_dms.engine.arena import ArenaLayout  # noqa: E402
from vllm_dms.engine.config import DMSConfigError  # noqa: E402
from vllm_dms.engine.validation import request_problem  # noqa: E402

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
RESULT = "DMS_TEST_RESULT="
_REQ = types.SimpleNamespace(app=types.SimpleNamespace(state=types.SimpleNamespace(
    args=types.SimpleNamespace(log_error_stack=False))), state=types.SimpleNamespace())


def http(exc: Exception) -> tuple[int, str]:
    """(status, message) of vLLM's server for an exception a request path raised."""
    from fastapi.exceptions import RequestValidationError
    from vllm.entrypoints.serve.utils.server_utils import (exception_handler,
                                                           validation_exception_handler)
    handler = (validation_exception_handler if isinstance(exc, RequestValidationError)
               else exception_handler)
    resp = asyncio.run(handler(_REQ, exc))
    return resp.status_code, json.loads(resp.body)["error"]["message"]


# ---------------------------------------------------------------------------- 1. vLLM already
@pytest.fixture(scope="module")
def processor(llama_dir):  # noqa: F811
    from vllm.v1.engine.input_processor import InputProcessor
    vc = make_vllm_config(llama_dir, max_num_seqs=4, max_num_batched_tokens=256,
                          max_model_len=64)
    return InputProcessor(vc)


def process(ip, ids, **sp):
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import SamplingParams
    return ip.process_inputs("r", TokensPrompt(prompt_token_ids=ids),
                             SamplingParams(max_tokens=4, **sp), ("generate",))


def test_vllm_rejects_empty_and_too_long_prompts(processor):
    for ids, words in (([], "cannot be empty"), ([1] * 64, "maximum model length of 64"),
                       ([1] * 80, "maximum context length is 64")):
        with pytest.raises(ValueError) as e:
            process(processor, ids)
        status, msg = http(e.value)
        assert status == 400 and words in msg, msg
    # /v1/completions checks length before the engine too (renderer TokenizeParams)
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    req = CompletionRequest(prompt=[1] * 62, max_tokens=4)
    with pytest.raises(ValueError) as e:
        req.build_tok_params(processor.model_config).apply_post_tokenization(
            None, {"prompt_token_ids": [1] * 62})
    status, msg = http(e.value)
    assert status == 400 and "maximum context length is 64" in msg, msg


def test_vllm_rejects_negative_ids_on_completions():
    from fastapi.exceptions import RequestValidationError
    from pydantic import ValidationError
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    with pytest.raises(ValidationError) as e:
        CompletionRequest(prompt=[5, -3])  # what FastAPI validates the body against
    status, msg = http(RequestValidationError(e.value.errors()))
    assert status == 400 and "greater than or equal to 0" in msg, msg


def test_vllm_rejects_out_of_vocab_ids_with_a_tokenizer(processor, monkeypatch):
    vocab = processor.model_config.get_vocab_size()
    monkeypatch.setattr(processor, "renderer",
                        types.SimpleNamespace(tokenizer=types.SimpleNamespace(
                            max_token_id=vocab - 1)))
    with pytest.raises(ValueError) as e:
        processor._validate_model_inputs(None, {"type": "token",
                                                "prompt_token_ids": [1, vocab]})
    status, msg = http(e.value)
    assert status == 400 and f"Token id {vocab} is out of vocabulary" in msg


def test_vllm_lets_through_what_dms_must_catch(processor):
    """No tokenizer (--skip-tokenizer-init) or the Python API: vLLM passes these on."""
    vocab = processor.model_config.get_vocab_size()
    for ids in ([1, vocab], [5, -3]):
        assert process(processor, ids).prompt_token_ids == ids


def test_rules():
    assert request_problem([0, 5, 1023], vocab_size=1024) is None
    assert request_problem(None, vocab_size=1024) is None  # prompt embeds
    assert request_problem([], vocab_size=1024) is None  # vLLM's own empty-prompt check
    param, msg, value = request_problem([7, 1024, 3], vocab_size=1024)
    assert (param, value) == ("prompt_token_ids", 1024) and "position 1" in msg
    assert "[0, 1024)" in msg
    assert request_problem([7, -2, 9999], vocab_size=1024)[2] == -2  # the lower bound first
    assert request_problem([1], vocab_size=1024, resumable=True)[0] == "stream"


# ---------------------------------------------------------------------------- 2. DMS front-end
RUNNER = r"""
import json, sys
import vllm.platforms as p
from vllm.platforms.cpu import CpuPlatform
p._current_platform = CpuPlatform()
import vllm.plugins
vllm.plugins.load_general_plugins()
from vllm import ModelRegistry
ModelRegistry.register_model(  # config plumbing only, as in tests/patches/test_engine.py
    "DMSQwen3ForCausalLM", "vllm.model_executor.models.qwen3:Qwen3ForCausalLM")
from vllm.engine.arg_utils import EngineArgs
from vllm.entrypoints.serve.utils.error_response import create_error_response
from vllm.inputs import TokensPrompt
from vllm.sampling_params import SamplingParams
from vllm.v1.engine.input_processor import InputProcessor

def processor(**kw):
    vc = EngineArgs(skip_tokenizer_init=True, max_model_len=256, **kw).create_engine_config()
    return InputProcessor(vc)

def run(ip, ids, resumable=False, **sp):
    try:
        r = ip.process_inputs("r", TokensPrompt(prompt_token_ids=ids),
                              SamplingParams(max_tokens=4, **sp), ("generate",),
                              resumable=resumable)
        return {"ok": True}
    except Exception as e:  # what the server's exception handler turns into a response
        err = create_error_response(e).error
        return {"code": err.code, "message": err.message, "param": err.param}

nv, plain = sys.argv[1], sys.argv[2]
dms = processor(model=nv, kv_cache_dtype="dms_fp8")
dense = processor(model=plain)
out = {
    "oov": run(dms, [1, 2, 1024]), "negative": run(dms, [5, -3, 7]),
    "resumable": run(dms, [1, 2], resumable=True), "ok": run(dms, [1, 2, 3]),
    "sampling": run(dms, [1, 2, 3], n=2, prompt_logprobs=1, logprobs=2),
    "empty": run(dms, []), "too_long": run(dms, [1] * 300),
    "dense_oov": run(dense, [1, 2, 1024]),
}
from vllm_dms.engine.validation import install_frontend_check
before = InputProcessor.process_inputs
install_frontend_check()
out["wrapped_once"] = InputProcessor.process_inputs is before
print(%r + json.dumps(out), flush=True)
""" % RESULT


@pytest.fixture(scope="module")
def frontend():
    env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}
    env.update(HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-c", RUNNER, os.path.join(FIX, "ckpt_nvidia_qwen3"),
                        os.path.join(FIX, "ckpt_plain_qwen3")],
                       capture_output=True, text=True, env=env, timeout=300)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(RESULT)]
    assert r.returncode == 0 and lines, (r.stdout + r.stderr)[-4000:]
    return json.loads(lines[-1][len(RESULT):])


def test_frontend_out_of_vocab_and_negative_ids_are_400(frontend):
    oov, neg = frontend["oov"], frontend["negative"]
    assert oov["code"] == 400 and oov["param"] == "prompt_token_ids"
    assert "prompt token id 1024 (position 2) is outside the model's vocabulary [0, 1024)" in (
        oov["message"])
    assert neg["code"] == 400 and "prompt token id -3 (position 1)" in neg["message"]


def test_frontend_resumable_is_400(frontend):
    res = frontend["resumable"]
    assert res["code"] == 400 and res["param"] == "stream"
    assert "keep its DMS arena slot" in res["message"] and "its own request" in res["message"]


def test_frontend_serves_the_rest_and_keeps_vllms_checks(frontend):
    assert frontend["ok"] == {"ok": True} and frontend["sampling"] == {"ok": True}
    assert frontend["empty"]["code"] == 400 and "cannot be empty" in frontend["empty"]["message"]
    assert frontend["too_long"]["code"] == 400
    assert frontend["dense_oov"] == {"ok": True}, "a dense engine stays stock"
    assert frontend["wrapped_once"] is True


# ---------------------------------------------------------------------------- 3. engine side
def test_engine_refuses_bad_requests_and_serves_the_others(dms, llama_dir):  # noqa: F811
    spec_mod, sched_mod = dms
    from vllm.v1.engine import FinishReason
    vc = make_vllm_config(llama_dir, max_num_seqs=8, max_num_batched_tokens=512,
                          max_model_len=1024)
    sched = make_scheduler(sched_mod.DMSScheduler, vc, dms_spec(spec_mod, max_num_seqs=8), 16,
                           200)
    vocab = vc.model_config.get_vocab_size()
    bad = {"oov": make_request("oov", 20, 4, token=vocab),
           "neg": make_request("neg", 20, 4, token=-1),
           "stream": make_request("stream", 20, 4)}
    bad["stream"].resumable = True
    sched.add_request(make_request("small0", 100, 8))
    for req in bad.values():
        sched.add_request(req)
        assert req.status == RequestStatus.FINISHED_ERROR and req.request_id not in sched.requests
    sched.add_request(make_request("small1", 100, 8))
    finished = {}

    def on_step(step, out, outputs):
        for eco in outputs.values():
            for o in eco.outputs:
                if o.finish_reason is not None:
                    finished[o.request_id] = o
    drive(sched, SimWorker(sched.dms, dms_live_8x(256)).step, 200, on_step)
    for rid, words in (("oov", f"prompt token id {vocab} (position 0)"),
                       ("neg", "prompt token id -1"), ("stream", "streaming-input")):
        assert finished[rid].finish_reason == FinishReason.ERROR, rid
        assert finished[rid].new_token_ids == [] and words in finished[rid].stop_reason
    assert finished["small0"].finish_reason == FinishReason.LENGTH
    assert finished["small1"].finish_reason == FinishReason.LENGTH


# ---------------------------------------------------------------------------- 4. startup
def test_startup_boundary_is_one_max_model_len_request(dms, llama_dir):  # noqa: F811
    spec_mod, sched_mod = dms
    max_len, P, seqs, L = 1024, 16, 8, 16
    spec = dms_spec(spec_mod, max_num_seqs=seqs)
    need = cdiv(max_len, P)

    def usable(num_blocks):
        return ArenaLayout(num_layers=L, num_kv_heads=spec.num_kv_heads,
                           head_dim=spec.head_size, block_size=P, window=spec.dms_window,
                           max_num_seqs=seqs, max_model_len=max_len,
                           num_blocks=num_blocks).num_data_blocks
    fits = next(n for n in range(need, 4 * need) if usable(n) >= need)
    assert usable(fits) == need and usable(fits - 1) == need - 1
    for blocks, ok in ((fits, True), (fits - 1, False)):
        vc = make_vllm_config(llama_dir, max_num_seqs=seqs, max_num_batched_tokens=1024,
                              max_model_len=max_len)
        if ok:
            s = make_scheduler(sched_mod.DMSScheduler, vc, spec, L, blocks)
            s.add_request(make_request("full", max_len - 8, 8))  # the longest request
            assert s.requests["full"].status == RequestStatus.WAITING
        else:
            with pytest.raises(DMSConfigError, match="--max-model-len 1024") as e:
                make_scheduler(sched_mod.DMSScheduler, vc, spec, L, blocks)
            assert f"at most {(need - 1) * P} tokens" in str(e.value)
            assert "--gpu-memory-utilization" in str(e.value)
