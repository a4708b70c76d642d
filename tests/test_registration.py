"""Plugin registration through the installed entry point, each case in a fresh interpreter.

Fresh subprocesses because registration patches process-global vLLM state, and because
vLLM loads general plugins once per process. The CPU platform is set in-process first (this
machine has no GPU; the CUDA wheel would otherwise resolve no platform).
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

RESULT = "DMS_TEST_RESULT="
PRELUDE = """
import json, sys
import vllm.platforms as p
from vllm.platforms.cpu import CpuPlatform
p._current_platform = CpuPlatform()
out = {}
def emit():
    print(%r + json.dumps(out), flush=True)
""" % RESULT


def run_py(body, **env_extra):
    env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}
    env.update(HF_HUB_OFFLINE="1", VLLM_LOGGING_LEVEL="INFO", **env_extra)
    code = PRELUDE + textwrap.dedent(body) + "\nemit()\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=env, timeout=240)
    logs = r.stdout + r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(RESULT)]
    assert r.returncode == 0 and lines, logs[-4000:]
    return json.loads(lines[-1][len(RESULT):]), logs


@pytest.fixture(scope="module")
def registered():
    return run_py("""
        from typing import get_args
        import vllm.plugins
        vllm.plugins.load_general_plugins()
        import vllm_dms
        out["registered"] = vllm_dms._registered
        from vllm.config import CacheConfig, VllmConfig
        out["cache_config"] = CacheConfig(cache_dtype="dms_fp8").cache_dtype
        out["vllm_config"] = VllmConfig(cache_config={"cache_dtype": "dms_fp8"}).cache_config.cache_dtype
        out["fp8_still_ok"] = CacheConfig(cache_dtype="fp8").cache_dtype
        from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE, is_quantized_kv_cache
        out["torch_dtype"] = str(STR_DTYPE_TO_TORCH_DTYPE.get("dms_fp8"))
        out["is_quantized"] = is_quantized_kv_cache("dms_fp8")
        import vllm.config.cache, vllm.v1.attention.selector as sel
        out["selector"] = get_args(sel.CacheDType).count("dms_fp8")
        out["cache_mod"] = get_args(vllm.config.cache.CacheDType).count("dms_fp8")
        from vllm.v1.attention.backends.registry import AttentionBackendEnum
        out["backend"] = AttentionBackendEnum.CUSTOM.get_path()
        from vllm import ModelRegistry
        out["models"] = {a: f"{m.module_name}:{m.class_name}" for a, m in
                         ModelRegistry.models.items() if a.startswith("DMS")}

        # register() twice, and every apply() again: nothing changes.
        from vllm.engine.arg_utils import EngineArgs
        from vllm_dms.patches import cache_dtype, engine
        ann = lambda: CacheConfig.__pydantic_fields__["cache_dtype"].annotation
        before = (EngineArgs.create_engine_config, ann(), sel.CacheDType)
        vllm_dms.register(); vllm_dms.register()
        cache_dtype.apply(); engine.apply()
        after = (EngineArgs.create_engine_config, ann(), sel.CacheDType)
        out["twice_same"] = all(a is b for a, b in zip(before, after))
        out["literal_count"] = get_args(ann()).count("dms_fp8")
        out["wrapped_once"] = not hasattr(EngineArgs.create_engine_config.__wrapped__, "__wrapped__")

        # The `vllm serve` parser, built the way the serve subcommand builds it.
        from vllm.utils.argparse_utils import FlexibleArgumentParser
        from vllm.entrypoints.openai.cli_args import make_arg_parser
        parser = make_arg_parser(FlexibleArgumentParser())
        action = next(a for a in parser._actions if "--kv-cache-dtype" in a.option_strings)
        out["choices"] = list(action.choices)
        out["parsed"] = parser.parse_args(["m", "--kv-cache-dtype", "dms_fp8"]).kv_cache_dtype
    """)


def test_entry_point_loaded(registered):
    out, logs = registered
    assert out["registered"] is True
    assert "Failed to load plugin" not in logs and "vllm_dms disabled" not in logs


def test_cache_config_accepts_dms_fp8(registered):
    out, _ = registered
    assert out["cache_config"] == out["vllm_config"] == "dms_fp8"
    assert out["fp8_still_ok"] == "fp8"


def test_torch_dtype_and_not_quantized(registered):
    out, _ = registered
    assert out["torch_dtype"] == "torch.uint8"
    assert out["is_quantized"] is False


def test_selector_literal_rebound(registered):
    out, _ = registered
    assert out["selector"] == 1 and out["cache_mod"] == 1


def test_backend_and_models_registered_lazily(registered):
    out, _ = registered
    assert out["backend"] == "vllm_dms.worker.backend.DMSCompactAttentionBackend"
    assert out["models"] == {
        "DMSLlamaForCausalLM": "vllm_dms.worker.models.llama:DMSLlamaForCausalLM",
        "DMSQwen3ForCausalLM": "vllm_dms.worker.models.qwen3:DMSQwen3ForCausalLM"}


def test_register_twice_is_noop(registered):
    out, _ = registered
    assert out["twice_same"] and out["literal_count"] == 1 and out["wrapped_once"]


def test_serve_parser_offers_dms_fp8(registered):
    out, _ = registered
    assert "dms_fp8" in out["choices"] and "fp8" in out["choices"]
    assert out["parsed"] == "dms_fp8"


def test_excluded_by_vllm_plugins():
    out, _ = run_py("""
        import vllm.plugins
        vllm.plugins.load_general_plugins()
        from pydantic import ValidationError
        from vllm.config import CacheConfig
        try:
            CacheConfig(cache_dtype="dms_fp8")
            out["error"] = None
        except ValidationError as e:
            out["error"] = str(e)
        out["imported"] = "vllm_dms" in sys.modules
    """, VLLM_PLUGINS="some_other_plugin")
    assert out["imported"] is False
    assert out["error"] and "cache_dtype" in out["error"]


def test_wrong_vllm_version_refuses_dms_fp8():
    out, logs = run_py("""
        import vllm
        vllm.__version__ = "0.27.0"
        import vllm.plugins
        vllm.plugins.load_general_plugins()
        import vllm_dms
        vllm_dms.register()  # a second call must not log again
        from pydantic import ValidationError
        from vllm.config import CacheConfig
        try:
            CacheConfig(cache_dtype="dms_fp8")
            out["error"] = None
        except ValidationError as e:
            out["error"] = str(e)
        out["fp8"] = CacheConfig(cache_dtype="fp8").cache_dtype
        from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE
        out["torch_dtype"] = "dms_fp8" in STR_DTYPE_TO_TORCH_DTYPE
        from vllm.engine.arg_utils import EngineArgs
        out["wrapped"] = hasattr(EngineArgs.create_engine_config, "__dms_wrapped__")
    """)
    assert out["error"] and "cache_dtype" in out["error"]
    assert out["fp8"] == "fp8"
    assert out["torch_dtype"] is False and out["wrapped"] is False
    refusals = [ln for ln in logs.splitlines() if "needs vllm==0.26.0 but vllm 0.27.0" in ln]
    assert len(refusals) == 1, logs[-3000:]
    assert "ERROR" in refusals[0] and "dms_fp8 will be rejected" in refusals[0]
