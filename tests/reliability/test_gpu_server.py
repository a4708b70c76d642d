"""GPU reliability tests through `vllm serve` over HTTP (C.4 rows 10-13, 15, 16, 22, 25).

One server per module (per xdist worker): --kv-cache-dtype dms_fp8 with vLLM's defaults
(chunked prefill, prefix caching), max_model_len 1024, max_num_seqs 8, a small arena,
VLLM_SERVER_DEV_MODE=1 (for /reset_prefix_cache). Needs CUDA; skipped without it.
$VLLM_DMS_SOAK_SECONDS sets the abort-storm length (default 120; nightly: 1800-3600).
"""
import json
import os
import random
import subprocess
import sys
import threading
import time

import pytest

from gpu_util import UTIL, Server, build_checkpoints, kv_bytes_for_blocks, prompts

# --dist loadgroup: the module's tests share one server (the soak gets its own, in parallel)
pytestmark = [pytest.mark.gpu, pytest.mark.xdist_group("server")]
MAX_LEN, SEQS = 1024, 8


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    dms, _ = build_checkpoints(str(tmp_path_factory.mktemp("gpu_ckpt")))
    with Server(dms, "--kv-cache-dtype", "dms_fp8", "--max-model-len", str(MAX_LEN),
                "--max-num-seqs", str(SEQS), "--enforce-eager", "--kv-cache-memory-bytes",
                str(kv_bytes_for_blocks(dms, 64)), "--gpu-memory-utilization", str(UTIL), env={"VLLM_SERVER_DEV_MODE": "1"}) as s:
        yield s


def idle(server, timeout=120):
    """Wait until nothing runs or waits and the compact reservation is back to zero."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = server.metrics()
        if (m.get("vllm:num_requests_running", 1) == 0 and m.get("vllm:num_requests_waiting", 1)
                == 0 and m.get("vllm:kv_cache_usage_perc", 1) == 0):
            return m
        time.sleep(0.5)
    raise AssertionError(f"not idle after {timeout}s: {server.metrics()}")


def healthy(server, probe=None):
    import requests
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
    r = server.complete(probe or prompts(1, 32, seed=99)[0], max_tokens=8, ignore_eos=True)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def tokens(server, prompt, n):
    r = server.complete(prompt, max_tokens=n, ignore_eos=True, return_token_ids=True)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


# ------------------------------------------------------------------------- rows 10, 11
@pytest.mark.parametrize("body, needle", [
    (dict(prompt=""), "prompt"),
    (dict(prompt=[10**7]), "vocab"),
    (dict(prompt=[-1, 5]), ""),
    (dict(prompt=[5, 6], max_tokens=0), "max_tokens"),
    (dict(prompt=[5, 6], max_tokens=-3), "max_tokens"),
    (dict(prompt=[5] * 1000, max_tokens=100), "maximum context length"),  # row 11
])
def test_r10_r11_bad_request_is_400_and_server_stays_healthy(server, body, needle):
    import requests
    r = requests.post(server.url + "/v1/completions",
                      json=dict(model=server.cmd[4], temperature=0.0, **body), timeout=60)
    assert r.status_code == 400, (r.status_code, r.text)
    assert needle.lower() in r.text.lower(), r.text
    healthy(server)


@pytest.mark.parametrize("extra", [dict(n=2, temperature=0.8, seed=0),  # vLLM: greedy n=1
                                   dict(use_beam_search=True, n=2),
                                   dict(prompt_logprobs=1)])
def test_r10_served_variants_work(server, extra):
    r = server.complete(prompts(1, 40, seed=3)[0], max_tokens=6, **extra)
    assert r.status_code == 200, r.text
    healthy(server)


# ------------------------------------------------------------------------------ row 12
def test_r12_longest_admissible_request_is_served(server):
    r = server.complete(prompts(1, MAX_LEN - 64, seed=12)[0], max_tokens=64, ignore_eos=True)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 64, r.text
    idle(server)


# ------------------------------------------------------------------------- rows 13, 22
def test_r13_r22_overload_4x_with_vllm_bench_serve(server, tmp_path):
    idle(server)
    peak = {"waiting": 0.0, "usage": 0.0, "preempt": 0.0}
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            m = server.metrics()
            peak["waiting"] = max(peak["waiting"], m.get("vllm:num_requests_waiting", 0))
            peak["usage"] = max(peak["usage"], m.get("vllm:kv_cache_usage_perc", 0))
            peak["preempt"] = m.get("vllm:num_preemptions_total", 0)
            time.sleep(0.25)
    t = threading.Thread(target=poll, daemon=True)
    t.start()
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve",
           "--backend", "openai", "--base-url", server.url, "--model", server.cmd[4],
           "--dataset-name", "random", "--random-input-len", "256", "--random-output-len", "192",
           "--num-prompts", str(8 * SEQS), "--max-concurrency", str(4 * SEQS), "--ignore-eos",
           "--save-result", "--result-dir", str(tmp_path), "--result-filename", "bench.json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    stop.set()
    t.join()
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    res = json.loads((tmp_path / "bench.json").read_text())
    assert res["completed"] == 8 * SEQS and res.get("failed", 0) == 0, res
    assert peak["waiting"] > 0, peak  # requests queued instead of failing
    assert 0 < peak["usage"] <= 1.0, peak  # compact usage, never above 100%
    m = idle(server)
    assert any(k.startswith("vllm:dms_") for k in m), sorted(m)  # DMS gauges exported
    healthy(server)


# ------------------------------------------------------------------------------ row 15
def _stream(server, prompt, n, stop_after=None):
    """Stream a completion; close the connection after `stop_after` chunks (0: right after the
    headers, i.e. while waiting or in prefill; None: read to the end)."""
    import requests
    body = dict(model=server.cmd[4], prompt=prompt, max_tokens=n, temperature=0.0,
                ignore_eos=True, stream=True)
    with requests.post(server.url + "/v1/completions", json=body, stream=True,
                       timeout=300) as r:
        assert r.status_code == 200, r.text
        if stop_after == 0:
            return 0
        got = 0
        for line in r.iter_lines():
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                got += 1
                if stop_after is not None and got >= stop_after:
                    return got  # leaving the with-block closes the socket: a client abort
        return got


def run_threads(targets):
    """Run callables in threads; re-raise the first exception any of them hit."""
    errors = []

    def wrap(fn):
        try:
            fn()
        except BaseException as e:  # noqa: B902 (reported below)
            errors.append(e)
    threads = [threading.Thread(target=wrap, args=(fn,)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def test_r15_aborts_mid_stream_while_waiting_and_in_prefill(server):
    probe = prompts(1, 200, seed=15)[0]
    idle(server)
    before = tokens(server, probe, 32)
    ps = prompts(4 * SEQS, 300, seed=16)  # 4x capacity: many abort while still waiting
    run_threads([lambda p=p, i=i: _stream(server, p, 200, stop_after=[0, 1, 5, None][i % 4])
                 for i, p in enumerate(ps)])
    idle(server)
    assert tokens(server, probe, 32) == before  # unaffected, nothing left behind
    healthy(server)


# ------------------------------------------------------------------------------ row 16
@pytest.mark.slow
@pytest.mark.xdist_group("server-soak")
def test_r16_abort_storm_soak(server):
    seconds = float(os.environ.get("VLLM_DMS_SOAK_SECONDS", "120"))
    probe = prompts(1, 200, seed=160)[0]
    idle(server)
    before, rss0 = tokens(server, probe, 32), server.rss_bytes()
    rng, done = random.Random(16), {"n": 0}
    deadline = time.monotonic() + seconds

    def client(seed):
        r = random.Random(seed)
        while time.monotonic() < deadline:
            p = [r.randrange(100, 30000) for _ in range(r.randint(1, 900))]
            _stream(server, p, r.randint(1, MAX_LEN - len(p)), stop_after=r.randint(0, 64))
            done["n"] += 1
    run_threads([lambda seed=rng.random(): client(seed) for _ in range(3 * SEQS)])
    idle(server)
    assert done["n"] > 10 * SEQS
    assert tokens(server, probe, 32) == before
    assert server.rss_bytes() < rss0 * 1.25 + (256 << 20), (rss0, server.rss_bytes())


# ------------------------------------------------------------------------------ row 25
def test_r25_reset_prefix_cache_endpoint(server):
    import requests
    probe = prompts(1, 100, seed=25)[0]
    idle(server)
    before = tokens(server, probe, 16)
    r = requests.post(server.url + "/reset_prefix_cache", timeout=60)
    assert r.status_code == 200, r.text
    idle(server)
    assert tokens(server, probe, 16) == before
