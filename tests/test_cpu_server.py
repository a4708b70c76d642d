"""`vllm serve MODEL --kv-cache-dtype dms_fp8` on the CPU, over HTTP (C.4 rows 10-12, 15, 22, 25).

The server process and its engine core apply tests/cpu_engine.py at start (tests/cpu_site on
PYTHONPATH, VLLM_DMS_CPU_ENGINE=1), so stock vLLM's API server, engine core, CPU worker and V1
runner serve the plugin on a tiny random Llama with SmolLM2's tokenizer. The server tests of
tests/reliability/test_gpu_server.py that fit a CPU run here unchanged against this server;
the ones that need load (overload with vllm bench serve, 32 concurrent streams, the soak) stay
GPU-only.
"""
import json
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS / "reliability"))
import test_gpu_server as G  # noqa: E402
from gpu_util import Server, kv_bytes_for_blocks  # noqa: E402
from sim_engine import write_checkpoint  # noqa: E402

ENV = {"PYTHONPATH": f"{TESTS.parent}:{TESTS / 'cpu_site'}:{TESTS}", "VLLM_DMS_CPU_ENGINE": "1",
       "TRITON_INTERPRET": "1", "VLLM_USE_V2_MODEL_RUNNER": "0", "VLLM_SERVER_DEV_MODE": "1",
       "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = write_checkpoint(tmp_path_factory.mktemp("cpu_server"), smollm2_tokenizer=True)
    with Server(ckpt, "--kv-cache-dtype", "dms_fp8", "--max-model-len", str(G.MAX_LEN),
                "--max-num-seqs", str(G.SEQS), "--enforce-eager", "--dtype", "bfloat16",
                "--compilation-config", json.dumps({"custom_ops": ["none"]}),
                "--kv-cache-memory-bytes", str(kv_bytes_for_blocks(ckpt, 64)), env=ENV) as s:
        yield s


# the GPU module's tests, collected here against the CPU server (its `gpu` mark stays there)
test_r10_r11_bad_request_is_400_and_server_stays_healthy = \
    G.test_r10_r11_bad_request_is_400_and_server_stays_healthy
test_r10_served_variants_work = G.test_r10_served_variants_work
test_r12_longest_admissible_request_is_served = G.test_r12_longest_admissible_request_is_served
test_r25_reset_prefix_cache_endpoint = G.test_r25_reset_prefix_cache_endpoint


def test_streaming_chat_then_abort_returns_the_arena_to_idle(server):
    """A streamed chat completion (SmolLM2's chat template), then a stream the client drops
    after 3 of 200 tokens: the server aborts it (it generates far fewer than 200), and the DMS
    gauges and kv_cache_usage_perc return
    to their idle values (arena bytes in use = the state region only)."""
    import requests
    body = dict(model=server.cmd[4], stream=True, max_tokens=12, temperature=0.0,
                messages=[{"role": "user", "content": "Say something about the sea."}])
    chunks = []
    with requests.post(server.url + "/v1/chat/completions", json=body, stream=True,
                       timeout=300) as r:
        assert r.status_code == 200, r.text
        for line in r.iter_lines():
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                chunks.append(json.loads(line[6:]))
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(bool(c["choices"][0]["delta"].get("content")) for c in chunks) >= 6
    idle0 = G.idle(server)  # after a request, so the DMS gauges have been published
    made = idle0["vllm:generation_tokens_total"]
    G._stream(server, list(range(300, 700)), 200, stop_after=3)  # the client hangs up
    m = G.idle(server)
    made = m["vllm:generation_tokens_total"] - made
    assert 3 <= made < 50, f"{made} tokens: the dropped stream should be aborted, not finished"
    assert m["vllm:dms_arena_bytes_in_use"] == idle0["vllm:dms_arena_bytes_in_use"]
    assert m["vllm:dms_live_kv_tokens"] == 0 and m["vllm:kv_cache_usage_perc"] == 0
    G.healthy(server)


def test_serve_bench_drain_check_sees_prefix_entries_then_the_settled_arena(server):
    """benchmarks/serve_bench.py's drain check against a live server: finished requests with
    full blocks leave prefix entries (caching is on by default), which hold arena bytes after
    the run; /reset_prefix_cache plus a 1-token request (``settle``) brings the arena back to
    the bytes in use it had before."""
    sys.path.insert(0, str(TESTS.parent / "benchmarks"))
    import serve_bench
    key = "vllm:dms_arena_bytes_in_use"
    at_start = serve_bench.settle(server)
    for i in range(3):  # 150 tokens: two full 64-token blocks each
        r = server.complete(list(range(20 + i, 170 + i)), max_tokens=4)
        assert r.status_code == 200, r.text
    r = server.complete([1], max_tokens=1)  # publishes the gauges with the entries in place
    assert r.status_code == 200, r.text
    idle = serve_bench.wait_idle(server)
    assert idle["vllm:kv_cache_usage_perc"] == 0, "entries are not running requests"
    assert idle[key] > at_start[key], (idle[key], at_start[key])
    drained = serve_bench.settle(server)
    assert drained["vllm:kv_cache_usage_perc"] == 0 and drained[key] == at_start[key], (
        drained[key], at_start[key])
    G.healthy(server)
