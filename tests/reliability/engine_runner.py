"""Run EngineArgs(...).create_engine_config() scenarios in a fresh interpreter (CPU platform).

Fresh interpreters because the plugin patches process-global vLLM state; scenarios inside one
interpreter run in order, so a list also exercises "engine after engine" in one process.
As in tests/patches/test_engine.py, the DMS architectures are pointed at vLLM's stock classes
(config plumbing only: ModelConfig inspects the routed class).

A scenario is {"name", "kwargs" (EngineArgs), "probe" (optional)}; probes:
* "dms_config": what the DMS model's __init__ does first (vllm_dms.worker.models.transform.dms_mode);
* "kv_blocks": num_blocks / groups vLLM's get_kv_cache_configs gives a dense spec.
"""
import json
import os
import subprocess
import sys

RESULT = "DMS_RELIABILITY_RESULT="
RUNNER = r"""
import json, logging, sys
import vllm.platforms as p
from vllm.platforms.cpu import CpuPlatform
p._current_platform = CpuPlatform()
import vllm.plugins
vllm.plugins.load_general_plugins()
from vllm import ModelRegistry
if "vllm_dms" in sys.modules:
    ModelRegistry.register_model("DMSQwen3ForCausalLM", "vllm.model_executor.models.qwen3:Qwen3ForCausalLM")
    ModelRegistry.register_model("DMSLlamaForCausalLM", "vllm.model_executor.models.llama:LlamaForCausalLM")
from vllm.engine.arg_utils import EngineArgs

class Grab(logging.Handler):
    records = []
    def emit(self, record):
        Grab.records.append(record.levelname + " " + record.getMessage())
logging.getLogger("vllm.dms").addHandler(Grab())

def probe(kind, c):
    if kind == "dms_config":
        from vllm_dms.worker.models.transform import dms_mode
        dms, compact = dms_mode(c)
        return {"window": dms.window, "compact": compact}
    if kind == "kv_blocks":
        import torch
        from vllm.v1.core.kv_cache_utils import get_kv_cache_configs
        from vllm.v1.kv_cache_interface import FullAttentionSpec
        spec = FullAttentionSpec(block_size=c.cache_config.block_size, num_kv_heads=2,
                                 head_size=32, dtype=torch.bfloat16)
        names = [f"model.layers.{i}.self_attn.attn" for i in range(2)]
        cfg = get_kv_cache_configs(c, [dict.fromkeys(names, spec)], [64 * 1024 * 1024])[0]
        return {"num_blocks": cfg.num_blocks, "groups": repr(cfg.kv_cache_groups)}
    return None

def summary(c):
    return dict(archs=c.model_config.architectures, hash=c.compute_hash(),
                cache=repr(c.cache_config), sched=repr(c.scheduler_config),
                attn=repr(c.attention_config), backend=str(c.attention_config.backend),
                dtype=c.cache_config.cache_dtype, sched_cls=c.scheduler_config.scheduler_cls,
                prefix=c.cache_config.enable_prefix_caching,
                chunked=c.scheduler_config.enable_chunked_prefill,
                mnbt=c.scheduler_config.max_num_batched_tokens,
                max_model_len=c.model_config.max_model_len)

out = []
for sc in json.loads(sys.argv[1]):
    Grab.records.clear()
    res = {"name": sc["name"]}
    try:
        c = EngineArgs(skip_tokenizer_init=True, **sc["kwargs"]).create_engine_config()
        res["ok"] = summary(c)
        if sc.get("probe"):
            try:
                res["probe"] = probe(sc["probe"], c)
            except Exception as e:
                res["probe_error"] = {"error": type(e).__name__, "msg": str(e)}
    except Exception as e:
        res.update(error=type(e).__name__, msg=str(e))
    res["logs"] = list(Grab.records)
    out.append(res)
print(%r + json.dumps(out), flush=True)
""" % RESULT


def start(scenarios: list[dict], plugins: bool = True) -> subprocess.Popen:
    """Start one interpreter running the scenarios in order (plugin loaded or excluded)."""
    env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}
    env.update(HF_HUB_OFFLINE="1", VLLM_LOGGING_LEVEL="INFO")
    if not plugins:
        env["VLLM_PLUGINS"] = "none_but_stock"
    return subprocess.Popen([sys.executable, "-c", RUNNER, json.dumps(scenarios)], env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def collect(proc: subprocess.Popen, timeout: int = 300) -> dict:
    """name -> result (``ok`` summary, or ``error`` + ``msg``; ``logs``; ``probe``)."""
    logs, _ = proc.communicate(timeout=timeout)
    lines = [ln for ln in logs.splitlines() if ln.startswith(RESULT)]
    assert proc.returncode == 0 and lines, logs[-4000:]
    return {res["name"]: res for res in json.loads(lines[-1][len(RESULT):])}
