"""The vLLM paths of the quality harness: vLLM's teacher-forced prompt logprobs, and metrics.

``score_vllm`` runs ``vllm.LLM(model_dir, kv_cache_dtype="dms_fp8")`` (or ``fp8`` / ``auto`` on
the base model: the floor rows; one engine may serve several contexts) once per window with
``SamplingParams(max_tokens=1, prompt_logprobs=top_k, temperature=0)``. vLLM returns, per prompt
position t >= 1, a dict token id -> Logprob holding its top_k tokens and the actual token t. So
only the top_k of vLLM's distribution is known, and every KLD here is computed on a coarser
support: vLLM's top_k ids at that position plus one "tail" bucket holding the rest of each side's
mass (row field kld_support, e.g. "top20+tail"). Merging outcomes never increases a KL divergence,
so this is a lower bound of the full-vocabulary KLD, equal to it when the tails agree in shape and
possibly well below it otherwise: dms_fp8 rows also carry the reference's own evict-vs-no-evict
KLD both ways (details reference_kld_vs_noevict and reference_kld_vs_noevict_topk).

Everything but ``score_vllm`` / ``arena_live`` is pure torch and runs on CPU; vLLM is imported
inside score_vllm only.
"""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.nn.functional as F

TOP_K = 20
TAIL_FLOOR = 1e-12  # vLLM's top_k mass can round to >= 1 (fp32): keep log(q_tail) finite
# A reference top-1 that leads by less than this (logit nats) may flip between a bf16 engine and
# the fp32 reference (and with it a near-threshold eviction decision): "clear" positions lead more.
CLEAR_NATS = 1.0


def kld_support(top_k: int) -> str:
    return f"top{top_k}+tail"


@dataclasses.dataclass
class WindowLogprobs:
    """vLLM's view of one window of T tokens; row i predicts token i+1 (i < T-1)."""
    actual: torch.Tensor   # [T-1] float64: log p(token i+1)
    top_ids: torch.Tensor  # [T-1, k] int64, most likely first
    top_lp: torch.Tensor   # [T-1, k] float64


@dataclasses.dataclass
class VllmScores:
    windows: list[WindowLogprobs]
    live: torch.Tensor | None  # [W, L, H] live keys in the engine's arena after each window
    live_note: str             # why live is None ("" when read)
    engine: dict               # the LLM(...) arguments used


# ------------------------------------------------------------------ vLLM output -> tensors
def window_logprobs(output, ids: torch.Tensor, top_k: int) -> WindowLogprobs:
    """A RequestOutput-like object (``.prompt_logprobs``: list or FlatLogprobs, entry 0 None)
    for prompt ids [T] -> WindowLogprobs. vLLM adds the actual token even outside its top_k:
    an entry with rank > top_k is dropped, then entries are ordered by logprob."""
    plp, ids = output.prompt_logprobs, ids.reshape(-1).tolist()
    if plp is None or len(plp) != len(ids) or plp[0] is not None:
        raise ValueError(f"prompt_logprobs: expected {len(ids)} entries, the first None "
                         f"(was the request made with prompt_logprobs={top_k}?)")
    actual, top_ids, top_lp = [], [], []
    for t in range(1, len(ids)):
        pos = plp[t]
        best = _top_entries(pos, top_k)
        if ids[t] not in pos or len(best) < top_k:
            raise ValueError(f"prompt_logprobs[{t}]: {len(best)} top entries, token {ids[t]} "
                             f"{'present' if ids[t] in pos else 'missing'}; need the top {top_k}")
        actual.append(pos[ids[t]].logprob)
        top_ids.append([tid for tid, _ in best])
        top_lp.append([lp.logprob for _, lp in best])
    return WindowLogprobs(torch.tensor(actual, dtype=torch.float64),
                          torch.tensor(top_ids, dtype=torch.long).view(-1, top_k),
                          torch.tensor(top_lp, dtype=torch.float64).view(-1, top_k))


def _top_entries(pos: dict, top_k: int) -> list:
    """The top_k (id, Logprob) of one position, most likely first (rank, when given, decides
    membership, so a tie with the out-of-top-k actual token cannot swap it in)."""
    kept = [(tid, lp) for tid, lp in pos.items() if (getattr(lp, "rank", None) or 0) <= top_k]
    return sorted(kept, key=lambda kv: -kv[1].logprob)[:top_k]


def topk_of(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, logprobs) [N, k] of full logits [N, V]: what vLLM would return for them."""
    lp = F.log_softmax(logits.double(), -1)
    vals, idx = lp.topk(top_k, dim=-1)
    return idx, vals


# ------------------------------------------------------------------ metrics
def kl_topk(ref_logits: torch.Tensor, top_ids: torch.Tensor, top_lp: torch.Tensor) -> torch.Tensor:
    """Per row KL(P_ref || P_vllm) [N] on the support {vLLM's top_k ids, tail}.

    ref_logits [N, V] (full, unnormalised), top_ids / top_lp [N, k] from vLLM. The tail of each
    side is 1 - its mass on the top_k ids (vLLM's floored at TAIL_FLOOR). A lower bound of the
    full KLD; exactly 0 when P_ref's logprobs on the ids equal top_lp.
    """
    lr = F.log_softmax(ref_logits.double(), -1).gather(1, top_ids.to(ref_logits.device)).cpu()
    lq = top_lp.double().cpu()
    head = (lr.exp() * (lr - lq)).sum(-1)
    p_tail = (1.0 - lr.exp().sum(-1)).clamp(min=0.0)
    q_tail = (1.0 - lq.exp().sum(-1)).clamp(min=TAIL_FLOOR)
    # 0 * log 0 = 0: a reference with no tail mass adds nothing, whatever vLLM's tail is
    tail = torch.where(p_tail > 0, p_tail * (p_tail.clamp(min=TAIL_FLOOR).log() - q_tail.log()),
                       torch.zeros_like(p_tail))
    return head + tail


def kld_vs_reference(wl: WindowLogprobs, ref_logits: torch.Tensor) -> float:
    """Summed top-k KLD of vLLM's window against reference logits [T, V] (any reference run:
    no-evict for the harness's kld_vs_noevict, evict for kld_vs_reference_evict)."""
    return float(kl_topk(ref_logits[:-1], wl.top_ids, wl.top_lp).sum())


def token_matches(wl: WindowLogprobs, ref_logits: torch.Tensor) -> int:
    """Positions where vLLM's top-1 equals the reference's argmax."""
    return int((wl.top_ids[:, 0] == ref_logits[:-1].argmax(-1).cpu()).sum())


def clear_matches(wl: WindowLogprobs, ref_logits: torch.Tensor) -> tuple[int, int]:
    """(positions whose reference top-1 leads its top-2 by >= CLEAR_NATS, vLLM's top-1 equal to
    the reference's argmax among them)."""
    top2 = ref_logits[:-1].float().topk(2, dim=-1)
    clear = ((top2.values[:, 0] - top2.values[:, 1]) >= CLEAR_NATS).cpu()
    same = wl.top_ids[:, 0] == top2.indices[:, 0].cpu()
    return int(clear.sum()), int((same & clear).sum())


def window_stats(wl: WindowLogprobs, ref_noevict: torch.Tensor, ref_evict: torch.Tensor) -> dict:
    """Sums for one window against both reference runs (logits [T, V] each)."""
    n_clear, match_clear = clear_matches(wl, ref_evict)
    return dict(n=wl.actual.numel(), nll=float(-wl.actual.sum()),
                kld=kld_vs_reference(wl, ref_noevict), match=token_matches(wl, ref_noevict),
                kld_ev=kld_vs_reference(wl, ref_evict), match_ev=token_matches(wl, ref_evict),
                n_clear_ev=n_clear, match_clear_ev=match_clear)


def summarize(tot: dict, top_k: int) -> dict:
    """Window sums (window_stats added up) -> the harness's per-token means."""
    n = tot["n"]
    return dict(tokens_scored=n, kld_vs_noevict=tot["kld"] / n, token_match=tot["match"] / n,
                ppl=float(torch.tensor(tot["nll"] / n).exp()),
                kld_vs_reference_evict=tot["kld_ev"] / n,
                token_match_vs_reference_evict=tot["match_ev"] / n,
                clear_fraction_vs_reference_evict=tot["n_clear_ev"] / n,
                token_match_vs_reference_evict_clear=(tot["match_clear_ev"]
                                                      / max(tot["n_clear_ev"], 1)),
                kld_support=kld_support(top_k))


# ------------------------------------------------------------------ the engine (GPU)
def engine_args(window_len: int, top_k: int = TOP_K, kv_cache_dtype: str = "dms_fp8",
                **engine_kw) -> dict:
    """LLM(...) keyword arguments: room for the window plus the one sampled token."""
    # no prefix caching: each finished window's slot is released, where arena_live reads it
    kw = dict(max_model_len=window_len + 1, gpu_memory_utilization=0.3, seed=0,
              enforce_eager=False, max_logprobs=max(TOP_K, top_k), enable_prefix_caching=False)
    kw.update(engine_kw)
    if kw["max_model_len"] < window_len + 1:
        raise ValueError(f"max_model_len {kw['max_model_len']} < window {window_len} + 1")
    kw["kv_cache_dtype"] = kv_cache_dtype  # dms_fp8, or fp8 / auto for vLLM's own floor rows
    return kw


def arena_live(llm, n_tokens: int) -> torch.Tensor:
    """[L, H] live keys of the request the engine released last, n_tokens long (in-process
    engine only: the arena row is intact until the next step drains the release list)."""
    from vllm_dms.worker.kernels.arena_ops import arena_state
    from vllm_dms.worker.runtime import inprocess_engine
    mgr, rt = inprocess_engine(llm)
    if not mgr.link.release:
        raise RuntimeError("no released slot: no request finished since the last step")
    ctx = llm.llm_engine.vllm_config.compilation_config.static_forward_context
    by_index = sorted(rt.layer_index, key=rt.layer_index.get)
    slot = mgr.link.release[-1]
    live = torch.stack([arena_state(ctx[n].kv_cache.view(-1), rt.layout).row_len[slot].cpu()
                        for n in by_index])
    # the newest key is always live: a count outside [1, n] means the row was already drained
    if int(live.min()) < 1 or int(live.max()) > n_tokens:
        raise RuntimeError(f"arena row of slot {slot} holds {int(live.min())}..{int(live.max())} "
                           f"live keys for {n_tokens} tokens: released or reused already")
    return live


def open_engine(model_dir: str, max_len: int, top_k: int = TOP_K,
                kv_cache_dtype: str = "dms_fp8", read_live: bool = True, **engine_kw):
    """-> (vllm.LLM for windows up to max_len tokens, its keyword arguments)."""
    if read_live and kv_cache_dtype == "dms_fp8":  # the arena is readable in-process only
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM
    kw = engine_args(max_len, top_k, kv_cache_dtype, **engine_kw)
    return LLM(model_dir, **kw), kw


def score_vllm(model_dir: str, windows: torch.Tensor, *, top_k: int = TOP_K,
               read_live: bool = True, kv_cache_dtype: str = "dms_fp8", engine=None,
               **engine_kw) -> VllmScores:
    """Teacher-forced top-k logprobs of each window [n, T] from vLLM, one request at a time
    (so the released slot is that window's); live counts when read_live and dms_fp8.
    engine: an (LLM, kwargs) pair from open_engine to reuse (one engine, several contexts)."""
    read_live = read_live and kv_cache_dtype == "dms_fp8"
    from vllm import SamplingParams
    own = engine is None
    llm, kw = engine or open_engine(model_dir, windows.shape[1], top_k, kv_cache_dtype,
                                    read_live, **engine_kw)
    sp = SamplingParams(max_tokens=1, prompt_logprobs=top_k, temperature=0.0)
    out, live, note = [], [], "" if read_live else "not requested"
    for ids in windows:
        res = llm.generate([{"prompt_token_ids": ids.tolist()}], sp, use_tqdm=False)[0]
        out.append(window_logprobs(res, ids, top_k))
        if not note:
            try:
                live.append(arena_live(llm, ids.numel()))
            except Exception as e:  # a diagnostic: losing it must not lose the KLD rows
                note = f"engine live counts unavailable: {type(e).__name__}: {e}"
    if own:
        del llm
    return VllmScores(out, None if note else torch.stack(live), note, kw)
