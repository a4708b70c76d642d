"""C.4 row 6: a vLLM other than 0.26.0 (version string or internal shape) disables dms_fp8 with
one message naming the version and the alternative, and leaves every other dtype usable.

Fresh interpreters (tests/test_registration.py's run_py) because registration is per process.
"""
import logging
import os

import pytest
from test_registration import run_py

FIX = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures")
NV, PLAIN = os.path.join(FIX, "ckpt_nvidia_qwen3"), os.path.join(FIX, "ckpt_plain_qwen3")


def test_r6_wrong_version_message_names_version_and_alternative():
    out, logs = run_py("""
        import vllm
        vllm.__version__ = "0.25.1"
        import vllm.plugins
        vllm.plugins.load_general_plugins()
        from vllm.engine.arg_utils import EngineArgs
        model, plain = %r, %r
        try:
            EngineArgs(model=model, skip_tokenizer_init=True,
                       kv_cache_dtype="dms_fp8").create_engine_config()
            out["dms"] = None
        except Exception as e:
            out["dms"] = type(e).__name__ + ": " + str(e)
        c = EngineArgs(model=plain, skip_tokenizer_init=True,
                       kv_cache_dtype="fp8").create_engine_config()
        out["fp8"] = c.cache_config.cache_dtype
    """ % (NV, PLAIN))
    assert out["dms"] and "cache_dtype" in out["dms"]  # refused, never half-applied
    assert out["fp8"] == "fp8"
    lines = [ln for ln in logs.splitlines() if "needs vllm==0.26.0" in ln]
    assert len(lines) == 1, logs[-3000:]
    for needle in ("vllm 0.25.1 is installed", "--kv-cache-dtype dms_fp8 will be rejected",
                   "other KV-cache dtypes are unaffected", "Install vllm==0.26.0"):
        assert needle in lines[0], (needle, lines[0])


def test_r6_changed_internals_message_names_alternative(monkeypatch, caplog):
    pytest.importorskip("vllm")
    from vllm_dms.patches import PatchError, apply_all, cache_dtype, engine

    def broken():
        raise PatchError("EngineArgs.create_engine_config: expected parameters (...)")

    applied = []
    monkeypatch.setattr(engine, "check", broken)
    monkeypatch.setattr(cache_dtype, "apply", lambda: applied.append("cache_dtype"))
    with caplog.at_level(logging.ERROR, logger="test_dms_r6"):
        assert apply_all(logging.getLogger("test_dms_r6")) is False
    assert applied == []
    for needle in ("create_engine_config", "dms_fp8 will be rejected",
                   "other KV-cache dtypes are unaffected", "vllm==0.26.0"):
        assert needle in caplog.text, (needle, caplog.text)
