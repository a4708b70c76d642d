"""Kernel timings at real shapes (no vLLM needed): DMS prefill / decode vs dense torch SDPA.

    python benchmarks/kernel_bench.py --out kernel-bench.json

Prefill: one 8K-token prompt, flags drawn at the cr=8 eviction rate, ``dms_prefill_attention``
vs ``scaled_dot_product_attention(is_causal=True, enable_gqa=True)`` (flash backend) on the same
bf16 q/k/v. Decode: c rows of 8K tokens compacted at cr=8 in the FP8 arena,
``dms_decode_store`` + ``dms_decode_attention`` vs SDPA over the dense bf16 8K keys.
Median of CUDA-event timings after warm-up, per layer; `*_graph_us` replays 20 calls from
one CUDA graph (no host launch overhead in the figure; plain timings include it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: TRITON_INTERPRET smoke run only
SHAPES = {"llama-3.2-1b": dict(H=8, G=4, D=64, W=256), "qwen3-8b": dict(H=8, G=4, D=128, W=512)}
# decode (BLOCK_N, warps, stages) swept beside the default (kernels/decode.py decode_tiles)
DECODE_TILES = ((64, 4, 3), (128, 4, 2), (128, 8, 3), (256, 8, 2), (64, 2, 4))


def timed(fn, reps: int = 20) -> float:
    if DEV == "cpu":
        fn()
        return float("nan")
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2] * 1e3  # us


def prefill_row(name, H, G, D, W, T=8192, evict=0.875):  # noqa: N803
    from vllm_dms.worker.kernels.prefill import dms_prefill_attention
    g = torch.Generator(device=DEV).manual_seed(0)
    Hq = H * G
    q = torch.randn(T, Hq, D, device=DEV, generator=g).to(torch.bfloat16)
    k = torch.randn(T, H, D, device=DEV, generator=g).to(torch.bfloat16)
    v = torch.randn(T, H, D, device=DEV, generator=g).to(torch.bfloat16)
    flags = torch.rand(T, H, device=DEV, generator=g) < evict
    cu = torch.tensor([0, T], dtype=torch.int32, device=DEV)
    out = torch.empty_like(q)
    scale = D ** -0.5
    dms = timed(lambda: dms_prefill_attention(q, k, v, flags, cu, T, W, scale, out, carrier=True))
    tiles = {}  # alternative CUDA tiles for this head_dim (vllm_dms.worker.kernels.prefill.CUDA_TILES)
    from vllm_dms.worker.kernels import prefill
    bound = 128 if D <= 128 else 256
    default = prefill.CUDA_TILES[bound]
    for cfg in ((128, 64, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 3),
                (64, 128, 4, 2)):
        prefill.CUDA_TILES[bound] = cfg
        try:
            tiles["x".join(map(str, cfg))] = timed(lambda: dms_prefill_attention(
                q, k, v, flags, cu, T, W, scale, out, carrier=True), reps=5)
        except Exception as e:  # noqa: BLE001  (e.g. out of shared memory: record, go on)
            tiles["x".join(map(str, cfg))] = repr(e)[:80]
    prefill.CUDA_TILES[bound] = default
    qs, ks, vs = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    sdpa = timed(lambda: torch.nn.functional.scaled_dot_product_attention(
        qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True))
    pack_us, release_us = pack_timings(k, v, flags, H, D, W, T)
    return dict(kernel="prefill_attention", shape=name, T=T, W=W, evict=evict,
                dms_us=dms, sdpa_causal_us=sdpa, dms_x_sdpa=sdpa / dms,
                tiles_default="x".join(map(str, default)), dms_us_by_tiles=tiles,
                pack_plus_release_us=pack_us, release_us=release_us)


def pack_timings(k, v, flags, H, D, W, T):
    """The survivor pack of one prompt (timed with the release that makes it repeatable)."""
    from vllm_dms.worker.kernels.arena_ops import dms_release
    from vllm_dms.worker.kernels.pack import dms_prefill_pack
    lay, kv = arena_for(H, D, W, T, c=1)
    i32 = dict(dtype=torch.int32, device=DEV)
    lp, ov = torch.zeros(lay.num_slots, **i32), torch.zeros(1, **i32)
    slots, cu = torch.ones(1, **i32), torch.tensor([0, T], **i32)

    def pack_release():
        dms_prefill_pack(kv, lay, k, v, flags, cu, slots, lp, ov)
        dms_release(kv, lay, slots, lp)
    both = graph_timed(pack_release, reps=5)  # GPU time only: replayed from one CUDA graph
    dms_prefill_pack(kv, lay, k, v, flags, cu, slots, lp, ov)
    rel = graph_timed(lambda: (dms_release(kv, lay, slots, lp)), reps=1)
    assert int(ov[0]) == 0
    return both, rel


def arena_for(H, D, W, T, c):
    from vllm_dms.engine.arena import ArenaLayout, cdiv
    from vllm_dms.worker.kernels.arena_ops import arena_init
    lay = ArenaLayout(num_layers=1, num_kv_heads=H, head_dim=D, block_size=64, window=W,
                      max_num_seqs=c, max_model_len=T + 64, num_blocks=1)
    for _ in range(2):  # the state region grows with num_blocks: settle
        lay = ArenaLayout(**{**lay.__dict__,
                             "num_blocks": lay.first_data_block + 2 * c * cdiv(T + 64, 64)})
    kv = torch.zeros(lay.num_blocks * lay.page_bytes, dtype=torch.uint8, device=DEV)
    arena_init(kv, lay)
    return lay, kv


def graph_timed(fn, reps: int = 20) -> float:
    """GPU time of fn replayed from a CUDA graph (no host launch overhead), per call."""
    if DEV == "cpu":
        fn()
        return float("nan")
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    return timed(g.replay, reps=5) / reps


def decode_row(name, H, G, D, W, c, T=8192, evict=0.875):
    from vllm_dms.worker.kernels.arena_ops import dms_decode_store
    from vllm_dms.worker.kernels.pack import dms_prefill_pack
    from vllm_dms.worker.kernels.decode import (decode_splits, decode_tiles, decode_workspace,
                                                dms_decode_attention, workspace_for)
    from vllm_dms.worker.runtime import DECODE_SPLITS
    lay, kv = arena_for(H, D, W, T, c)
    g = torch.Generator(device=DEV).manual_seed(1)
    i32 = dict(dtype=torch.int32, device=DEV)
    lp, ov, live = (torch.zeros(n, **i32) for n in (lay.num_slots, 1, lay.num_slots))
    slots = torch.arange(1, c + 1, **i32)
    for s in range(c):  # one prompt at a time keeps the pack's temporaries small
        kp = torch.randn(T, H, D, device=DEV, generator=g).to(torch.bfloat16)
        fl = torch.rand(T, H, device=DEV, generator=g) < evict
        dms_prefill_pack(kv, lay, kp, kp, fl, torch.tensor([0, T], **i32), slots[s:s + 1], lp,
                         ov, live=live)
    Hq = H * G
    q = torch.randn(c, Hq, D, device=DEV, generator=g).to(torch.bfloat16)
    kn = torch.randn(c, H, D, device=DEV, generator=g).to(torch.bfloat16)
    out = torch.empty_like(q)
    splits = decode_splits(c, H, DECODE_SPLITS)  # what the backend runs at this batch
    tiles = decode_tiles(D, DEV == "cuda")
    ws = workspace_for(decode_workspace(c, Hq, D, DECODE_SPLITS, DEV), c, splits)
    pos = torch.full((c,), T, **i32)
    lanes = q[:, ::G, D - 1]
    attn = timed(lambda: dms_decode_attention(q, kv, lay, slots, D ** -0.5, out, *ws,
                                              carrier=True))
    attn_graph = graph_timed(lambda: dms_decode_attention(q, kv, lay, slots, D ** -0.5, out,
                                                          *ws, carrier=True))
    sweep = {}  # split-K programs per (request, kv head); 1: no reduce launch (DIRECT)
    for ns in (1, 2, 4, 8, 16, 32):
        w = decode_workspace(c, Hq, D, ns, DEV)
        sweep[ns] = graph_timed(lambda: dms_decode_attention(q, kv, lay, slots, D ** -0.5, out,
                                                             w.acc, w.m, w.l, carrier=True))
    by_tiles = {}  # (BLOCK_N, warps, stages) at the backend's split count; default: decode_tiles
    for t in DECODE_TILES:
        by_tiles["x".join(map(str, t))] = graph_timed(lambda: dms_decode_attention(
            q, kv, lay, slots, D ** -0.5, out, *ws, carrier=True, tiles=t))
    # the store is not idempotent (it appends): time it on a copy of the state each rep
    saved = kv.clone()

    def store():
        dms_decode_store(kv, lay, kn, kn, lanes, pos, slots, 1, lp, ov, live=live,
                         alpha=(1.0, 0.0))
    store_us = graph_timed(store, reps=5)  # appends each call: the arena has room for it
    kv.copy_(saved)
    kd = torch.randn(c, H, T, D, device=DEV, generator=g).to(torch.bfloat16)
    sdpa = timed(lambda: torch.nn.functional.scaled_dot_product_attention(
        q.unsqueeze(2), kd, kd, scale=D ** -0.5, enable_gqa=True))
    kv_bytes = int(live[1:c + 1].sum()) * (2 * D + 4)  # K, V FP8 + meta per live entry
    live_mean = float(live[1:c + 1].float().mean()) / H
    return dict(kernel="decode", shape=name, c=c, T=T, W=W, evict=evict,
                live_tokens_per_row=live_mean, attention_us=attn, store_us=store_us,
                attention_graph_us=attn_graph, splits=splits,
                attention_graph_us_by_splits=sweep, tiles_default="x".join(map(str, tiles)),
                attention_graph_us_by_tiles=by_tiles,
                attention_graph_gb_s=kv_bytes / attn_graph / 1e3 if attn_graph == attn_graph
                else float("nan"),
                sdpa_dense_bf16_us=sdpa, dms_x_sdpa=sdpa / (attn + store_us))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--decode-c", type=int, nargs="+", default=[8, 32],
                    help="decode batch sizes (issue 15's decode-heavy runs 256)")
    a = ap.parse_args()
    rows = []
    for name, sh in SHAPES.items():
        rows.append(prefill_row(name, T=a.tokens, **sh))
        print(json.dumps(rows[-1]), flush=True)
        for c in a.decode_c:
            rows.append(decode_row(name, c=c, T=a.tokens, **sh))
            print(json.dumps(rows[-1]), flush=True)
    meta = dict(device=torch.cuda.get_device_name() if DEV == "cuda" else "cpu", commit=os.environ.get("VLLM_DMS_COMMIT", "?"),
                torch=torch.__version__)
    json.dump([{**r, **meta} for r in rows], open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
