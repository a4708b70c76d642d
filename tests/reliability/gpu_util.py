"""Helpers for the GPU reliability tests (test_gpu_offline.py, test_gpu_server.py).

Checkpoint: a random-weight Llama with DMS fields built by benchmarks/make_random_llama.py
(tokenizer from $VLLM_DMS_TOKENIZER_DIR, else SmolLM2's from vllm_dms.tools.checkpoints), plus a
plain copy without the DMS fields. $VLLM_DMS_TEST_CKPT overrides the DMS checkpoint.
Engines run in fresh interpreters (plugin loading and CUDA state are per process): `run_py` for
a one-off script, `Engine` for a long-lived one that several tests (module-scoped fixtures) send
jobs to. Every engine names its KV memory (`kv_cache_memory_bytes`) and asks for a small
`gpu_memory_utilization` (UTIL), so that several share the GPU when tests run in parallel.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MARK = "DMS_GPU_RESULT="
BLOCK = 64  # --block-size default with dms_fp8 (patches/engine.py DMS_BLOCK_SIZE)
UTIL = 0.05  # vLLM only checks that this much is free at start-up: KV memory is explicit


def build_checkpoints(root: str) -> tuple[str, str]:
    """(dms_dir, plain_dir)."""
    dms_dir = os.environ.get("VLLM_DMS_TEST_CKPT")
    if not dms_dir:
        dms_dir = os.path.join(root, "random-llama-dms")
        tok = os.environ.get("VLLM_DMS_TOKENIZER_DIR")
        if not tok:
            from vllm_dms.tools.checkpoints import smollm2_base
            tok = smollm2_base()
        subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "make_random_llama.py"),
                        dms_dir, tok], check=True, timeout=900)
    plain = os.path.join(root, "random-llama-plain")
    os.makedirs(plain, exist_ok=True)
    for name in os.listdir(dms_dir):
        src, dst = os.path.join(dms_dir, name), os.path.join(plain, name)
        if name != "config.json" and os.path.isfile(src) and not os.path.exists(dst):
            os.symlink(src, dst)
    cfg = json.load(open(os.path.join(dms_dir, "config.json")))
    json.dump({k: v for k, v in cfg.items() if not k.startswith("dms_")},
              open(os.path.join(plain, "config.json"), "w"))
    return dms_dir, plain


def kv_bytes_for_blocks(model_dir: str, blocks: int, block_size: int = BLOCK) -> int:
    """--kv-cache-memory-bytes that gives exactly `blocks` DMS blocks (FP8, all layers)."""
    from vllm_dms.engine.arena import spec_page_bytes
    c = json.load(open(os.path.join(model_dir, "config.json")))
    hd = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    page = spec_page_bytes(c["num_key_value_heads"], hd, block_size)
    return blocks * page * c["num_hidden_layers"]


def prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    import random
    rng = random.Random(seed)
    return [[rng.randrange(100, 30000) for _ in range(length)] for _ in range(n)]


PRELUDE = """
import json, os, sys
A = json.loads(sys.argv[1])
out = {}
def generate(llm, prompts, n, **kw):
    # greedy tokens and each request's prompt tokens served from the prefix cache
    from vllm import SamplingParams
    sp = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False, **kw)
    res = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in res], [o.num_cached_tokens for o in res]
def greedy(llm, prompts, n, **kw):
    return generate(llm, prompts, n, **kw)[0]
def metric(llm, prefix):
    return sum(m.value for m in llm.get_metrics() if m.name.startswith(prefix)
               and hasattr(m, "value"))
"""


def run_py(body: str, args: dict, env: dict | None = None, timeout: int = 900) -> dict:
    """Run PRELUDE + body in a fresh interpreter; body fills `out` (JSON)."""
    code = PRELUDE + textwrap.dedent(body) + f"\nprint({MARK!r} + json.dumps(out), flush=True)\n"
    e = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    e.update(env or {})
    r = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True,
                       text=True, env=e, timeout=timeout, cwd=REPO)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(MARK)]
    assert r.returncode == 0 and lines, (r.stdout + r.stderr)[-6000:]
    return json.loads(lines[-1][len(MARK):])


ENGINE_LOOP = """
from vllm import LLM
llm = LLM(A["model"], **A["engine"])
info = dict(num_gpu_blocks=llm.llm_engine.vllm_config.cache_config.num_gpu_blocks,
            backend=str(llm.llm_engine.vllm_config.attention_config.backend))
print(MARK + json.dumps(info), flush=True)
for line in sys.stdin:  # one job per line: {"prompts": [[ids]], "n": tokens, "metrics": [...]}
    job = json.loads(line)
    toks, cached = generate(llm, job["prompts"], job["n"]) if job["prompts"] else ([], [])
    res = dict(tokens=toks, cached=cached)
    res.update({p: metric(llm, p) for p in job.get("metrics", [])})
    if job.get("dms_state"):  # the prefix store of an in-process engine (diagnosis)
        from vllm_dms.worker.runtime import inprocess_engine
        mgr = inprocess_engine(llm)[0]
        res["dms_state"] = dict(
            entries=[[e.slot, len(e.tokens), e.shared, e.ready, e.measured, len(e.held)]
                     for e in (mgr.cache.entries() if mgr.cache is not None else [])],
            free_slots=len(mgr._free_slots), running=len(mgr._slot_of),
            free_blocks=mgr.block_pool.get_num_free_blocks())
    if job.get("score"):  # top-1 logprob minus the sequence's own token's, per position >= start
        from vllm import SamplingParams
        sp = SamplingParams(max_tokens=1, prompt_logprobs=1, detokenize=False)
        outs = llm.generate([{"prompt_token_ids": s} for s in job["score"]], sp, use_tqdm=False)
        res["gaps"] = [[max(x.logprob for x in d.values()) - d[t].logprob
                        for t, d in zip(s[k:], o.prompt_logprobs[k:])]
                       for s, k, o in zip(job["score"], job["start"], outs)]
    print(MARK + json.dumps(res), flush=True)
"""


class Engine:
    """A `vllm.LLM` in its own interpreter, kept alive for many greedy jobs.

    `Engine(model, env=..., **engine_kwargs).start()` returns at once (start several, then
    `ready()` each: they initialise concurrently); `greedy(prompts, n)` -> token lists."""

    def __init__(self, model: str, env: dict | None = None, **engine: object):
        self.args = dict(model=model, engine=engine)
        self.env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
                        VLLM_LOGGING_STREAM="ext://sys.stderr")  # stdout carries replies only
        self.env.update(env or {})
        self.info: dict | None = None

    def start(self) -> "Engine":
        if hasattr(self, "proc"):  # already running (a shared fixture)
            return self
        code = PRELUDE + ENGINE_LOOP.replace("MARK", repr(MARK))
        self.log = open(os.path.join(_log_dir(), f"engine-{id(self)}.log"), "w+")
        self.proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(self.args)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env=self.env, cwd=REPO)
        return self

    def _reply(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        self.log.seek(0)
        raise AssertionError(f"engine died (rc {self.proc.wait()}): {self.log.read()[-6000:]}")

    def ready(self) -> "Engine":
        if self.info is None:
            self.info = self._reply()
        return self

    def _job(self, **job: object) -> dict:
        """One line of ENGINE_LOOP's protocol out, its reply back."""
        self.ready()
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def greedy(self, prompts: list[list[int]], n: int, metrics: tuple = ()) -> dict:
        return self._job(prompts=prompts, n=n, metrics=list(metrics))

    def tokens(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        return self.greedy(prompts, n)["tokens"]

    def gaps(self, seqs: list[list[int]], starts: list[int]) -> list[list[float]]:
        """How far each token of seqs[i][starts[i]:] is from this engine's greedy choice
        (top-1 logprob minus the token's, 0 where it is the top-1), scored as one prompt."""
        return self._job(prompts=[], n=0, score=seqs, start=starts)["gaps"]

    def cached(self, prompts: list[list[int]], n: int) -> tuple[list[list[int]], list[int]]:
        """(tokens, prompt tokens each request took from the prefix cache). Per request, unlike
        vllm:prefix_cache_hits: the offline LLMEngine drops a step's stats when that step has no
        request output (vllm/v1/engine/llm_engine.py, step), and under async scheduling the
        step that reports a new request's hit can be such a step."""
        r = self.greedy(prompts, n)
        return r["tokens"], r["cached"]

    def metric(self, prefix: str) -> float:
        """Sum of vLLM's metrics named prefix* (needs disable_log_stats=False)."""
        return self.greedy([], 0, metrics=(prefix,))[prefix]

    def dms_state(self) -> dict:
        """Prefix entries [slot, L, shared, ready, measured, blocks], free slots and blocks
        (needs VLLM_ENABLE_V1_MULTIPROCESSING=0 in env)."""
        return self._job(prompts=[], n=0, dms_state=True)["dms_state"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def assert_near_greedy(ref: Engine, prompts: list[list[int]], outputs: list[list[int]],
                       tol: float, flips_per_1000: int = 0) -> float:
    """Every output token is the reference engine's greedy choice up to `tol` nats: where two
    paths read K/V differently (FP8 arena vs in-flight bf16), a random-weight model's near-ties
    may flip, a wrong live set moves logprobs by far more. flips_per_1000: that many tokens per
    1000 scored may be up to 2 * tol off, where the paths decide eviction in different kernels
    (a decision within bf16 rounding of its threshold keeps another key). Returns the largest."""
    gaps = ref.gaps([p + o for p, o in zip(prompts, outputs)], [len(p) for p in prompts])
    flat = [x for g in gaps for x in g]
    worst = max(flat, default=0.0)
    over = sum(x > tol for x in flat)
    allowed = len(flat) * flips_per_1000 // 1000
    ok = worst <= tol or (over <= allowed and worst <= 2 * tol)
    assert ok, (f"largest gap {worst:.3f} > {tol} at {over} of {len(flat)} tokens "
                f"({allowed} may reach {2 * tol}): {[max(g or [0]) for g in gaps]}")
    return worst


def started(*engines: Engine) -> list[Engine]:
    """Start all, then wait for each: their start-ups overlap."""
    for e in engines:
        e.start()
    return [e.ready() for e in engines]


def _log_dir() -> str:
    d = os.environ.get("VLLM_DMS_GPU_LOG_DIR") or os.path.join(REPO, ".pytest-gpu-logs")
    os.makedirs(d, exist_ok=True)
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`vllm serve MODEL ARGS...` in its own process group; `with Server(...) as s: s.url`."""

    def __init__(self, model: str, *args: str, env: dict | None = None, timeout: int = 900):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model,
                    "--port", str(self.port), *args]
        self.env = dict(os.environ, **(env or {}))
        self.timeout = timeout

    def __enter__(self):
        import requests
        # a file, not a pipe: nobody reads a pipe while the server runs, and a full one (64 KiB
        # of request logs in the soak) blocks the server's next write, so it stops serving
        self.log = os.path.join(_log_dir(), f"server-{self.port}.log")
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(self.cmd, env=self.env, start_new_session=True,
                                         stdout=f, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_tail()
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(2)
        self.__exit__(None, None, None)
        raise TimeoutError(f"server did not start: {self.cmd}")

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def log_tail(self, n: int = 6000) -> str:
        with open(self.log) as f:
            return f.read()[-n:]

    def metrics(self) -> dict[str, float]:
        """Prometheus text -> {series name (labels dropped): summed value}."""
        import requests
        vals: dict[str, float] = {}
        for line in requests.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            name, value = line.split("{")[0].split(" ")[0], line.rsplit(" ", 1)[-1]
            vals[name] = vals.get(name, 0.0) + float(value)
        return vals

    def complete(self, prompt, **kw):
        import requests
        body = {"model": self.cmd[4], "prompt": prompt, "temperature": 0.0, **kw}
        return requests.post(self.url + "/v1/completions", json=body, timeout=300)

    def rss_bytes(self) -> int:
        """RSS of the server's whole process group (front-end + engine core)."""
        total = 0
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                if os.getpgid(int(pid)) != self.proc.pid:
                    continue
                with open(f"/proc/{pid}/status") as f:
                    total += next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmRSS"))
            except (OSError, StopIteration):
                pass
        return total
