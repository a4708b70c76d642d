"""Multi-step DMS simulation: prefill pack, then decode store + split-K decode attention.

After every step each row's live set must equal the reference mask's row for that query
(``shifted_flags`` over the full decision sequence), and the decode output must match
``dms_attention_reference`` on the full sequence's last row with K/V round-tripped through the
store dtype (FP8 e4m3 or bf16). Tolerance for both stores: max abs err <= 2e-2 and
||out - ref|| / ||ref|| < 1e-2 (fp32 reference, bf16 inputs and output).
"""
import pytest
import torch

from vllm_dms.arena import cdiv
from vllm_dms.kernels.arena_ops import (arena_read_row, arena_state, dms_decode_store,
                                        dms_prefill_pack, dms_release, quantize_like_store)
from vllm_dms.kernels.decode import decode_workspace, dms_decode_attention
from vllm_dms.reference import dms_attention_reference, dms_mask, shifted_flags

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
ATOL, RTOL = 2e-2, 1e-2


def simulate(kit, device, *, H, G, D, P, W, shift, elem, prompts, steps, slot_ids, arrive=None,
             num_splits=3, seed=0, check_rows=True):
    """prompts[i] tokens of request i are packed at step arrive[i] (default 0), then it decodes
    one token per step; steps counts engine steps. slot_ids[i] is its arena slot."""
    gen = torch.Generator().manual_seed(seed)
    R, Hq = len(prompts), H * G
    arrive = arrive or [0] * R
    total = [p + steps - a for p, a in zip(prompts, arrive)]
    lay = kit.make_layout(H=H, D=D, P=P, W=W, S=max(slot_ids) + 1, max_len=max(total) + 1,
                          elem=elem)
    kv = kit.new_arena(lay, device)
    st = arena_state(kv.view(-1), lay)
    top0 = int(st.free_top[0])
    seq = [dict(q=torch.randn(n, Hq, D, generator=gen).to(torch.bfloat16),
                k=torch.randn(n, H, D, generator=gen).to(torch.bfloat16),
                v=torch.randn(n, H, D, generator=gen).to(torch.bfloat16),
                d=torch.rand(n, H, generator=gen) < 0.5) for n in total]
    layer_pages = torch.zeros(lay.num_slots, dtype=torch.int32, device=device)
    overflow = torch.zeros(1, dtype=torch.int32, device=device)
    ws = decode_workspace(R + 1, Hq, D, num_splits, device)
    scale = D ** -0.5
    done = [0] * R  # tokens in the arena
    for step in range(steps + 1):
        new = [i for i in range(R) if arrive[i] == step]
        if new:  # prefill-only rows of this step
            ks = torch.cat([seq[i]["k"][:prompts[i]] for i in new]).to(device)
            vs = torch.cat([seq[i]["v"][:prompts[i]] for i in new]).to(device)
            fl = torch.cat([shifted_flags(seq[i]["d"][:prompts[i]], shift) for i in new])
            cu = torch.tensor([0] + torch.tensor([prompts[i] for i in new]).cumsum(0).tolist(),
                              dtype=torch.int32, device=device)
            sl = torch.tensor([slot_ids[i] for i in new], dtype=torch.int32, device=device)
            dms_prefill_pack(kv, lay, ks, vs, fl.to(device), cu, sl, layer_pages, overflow)
            for i in new:
                done[i] = prompts[i]
        dec_rows = [i for i in range(R) if arrive[i] < step and done[i] < total[i]]
        if dec_rows:  # one padding entry (slot 0) rides along in every decode batch
            rows = dec_rows + [None]
            pick = lambda key, i: (seq[i][key][done[i]] if i is not None  # noqa: E731
                                   else torch.zeros_like(seq[0][key][0]))
            kb, vb, qb, db = (torch.stack([pick(x, i) for i in rows]).to(device)
                              for x in ("k", "v", "q", "d"))
            pos = torch.tensor([done[i] if i is not None else 0 for i in rows],
                               dtype=torch.int32, device=device)
            sl = torch.tensor([slot_ids[i] if i is not None else 0 for i in rows],
                              dtype=torch.int32, device=device)
            dms_decode_store(kv, lay, kb, vb, db, pos, sl, shift, layer_pages, overflow)
            out = torch.full_like(qb, float("nan"))
            dms_decode_attention(qb, kv, lay, sl, scale, out, ws.acc, ws.m, ws.l)
            assert torch.equal(out[-1].cpu(), torch.zeros_like(out[-1].cpu())), "padding -> 0"
            for j, i in enumerate(dec_rows):
                done[i] += 1
                check_step(kv, lay, seq[i], done[i], slot_ids[i], shift, out[j].float().cpu(),
                           scale, check_rows)
        assert int(overflow[0]) == 0
    for i in range(R):  # final footprint accounting
        want = sum(cdiv(int(st.row_len[slot_ids[i], h]), P) for h in range(H))
        assert int(layer_pages[slot_ids[i]]) == want
    assert int(st.free_top[0]) == top0 - int(layer_pages.sum())
    if check_rows:
        kit.check_pages_conserved(kv, lay)
    dms_release(kv, lay, torch.tensor(slot_ids, dtype=torch.int32, device=device), layer_pages)
    assert int(st.free_top[0]) == top0 and int(st.row_len.abs().sum()) == 0


def check_step(kv, lay, s, n, slot, shift, got, scale, check_rows):
    """After the query at position n-1: live rows and the attention output vs the reference."""
    W, E = lay.window, lay.elem_bytes
    flags = shifted_flags(s["d"][:n], shift)  # the newest key owns no decision yet under shift 1
    mask = dms_mask(flags, W)[:, n - 1]  # [H, n]
    st = arena_state(kv.view(-1), lay)
    assert st.row_len[slot].cpu().tolist() == mask.sum(-1).tolist(), f"live counts at q={n - 1}"
    if check_rows:
        for h in range(lay.num_kv_heads):
            row = arena_read_row(kv, lay, slot, h)
            live = mask[h].nonzero().flatten()
            assert sorted(row["pos"].tolist()) == live.tolist(), f"live set h={h} q={n - 1}"
            assert torch.equal(row["flag"], flags[row["pos"], h]), "meta flag bits"
    kq = quantize_like_store(s["k"][:n].float(), E)
    vq = quantize_like_store(s["v"][:n].float(), E)
    ref = dms_attention_reference(s["q"][:n], kq, vq, flags, W, scale)[-1]
    err = (got - ref).abs().max().item()
    rel = ((got - ref).norm() / ref.norm()).item()
    assert err <= ATOL and rel < RTOL, f"q={n - 1}: max err {err}, rel {rel}"


@pytest.mark.parametrize("elem", [1, 2])
@pytest.mark.parametrize("W", [1, 4, 16])
@pytest.mark.parametrize("shift", [0, 1])
def test_decode_simulation(kit, device, elem, W, shift):
    simulate(kit, device, H=2, G=2, D=32, P=4, W=W, shift=shift, elem=elem,
             prompts=[6, 11, 1], steps=W + 8, slot_ids=[3, 1, 4],
             seed=100 * W + 10 * elem + shift)


def test_decode_mixed_arrivals_and_splits(kit, device):
    """Requests join mid-run (prefill and decode in the same step), more splits than pages."""
    simulate(kit, device, H=2, G=3, D=16, P=4, W=3, shift=1, elem=1, prompts=[9, 2, 5],
             steps=9, slot_ids=[2, 5, 1], arrive=[0, 3, 6], num_splits=8, seed=11)


def test_decode_from_empty_row(kit, device):
    """A request whose prompt is a single token; all decisions set: row stays W+1 long."""
    simulate(kit, device, H=1, G=4, D=16, P=2, W=2, shift=0, elem=2, prompts=[1], steps=9,
             slot_ids=[1], num_splits=2, seed=5)


def test_decode_overflow(kit, device):
    """An append that needs a sub-page from an empty stack sets overflow and changes nothing."""
    lay = kit.make_layout(H=1, D=16, P=2, W=1, S=2, max_len=8)
    kv = kit.new_arena(lay, device)
    st = arena_state(kv.view(-1), lay)
    st.free_top[0] = 1  # only one sub-page available
    lp = torch.zeros(lay.num_slots, dtype=torch.int32, device=device)
    ov = torch.zeros(1, dtype=torch.int32, device=device)
    kvb = torch.ones(1, 1, 16, dtype=torch.bfloat16, device=device)
    no = torch.zeros(1, 1, dtype=torch.bool, device=device)
    slot = torch.tensor([1], dtype=torch.int32, device=device)
    for q in range(2):  # tokens 0, 1 fill the one page
        dms_decode_store(kv, lay, kvb, kvb, no, torch.tensor([q], dtype=torch.int32,
                         device=device), slot, 0, lp, ov)
    assert int(ov[0]) == 0 and int(st.row_len[1, 0]) == 2 and int(st.free_top[0]) == 0
    before = kv.clone()
    dms_decode_store(kv, lay, kvb, kvb, no, torch.tensor([2], dtype=torch.int32, device=device),
                     slot, 0, lp, ov)
    assert int(ov[0]) == 1 and torch.equal(kv, before)


def test_decode_compiles_sm90(compile_sm90):
    ptr = {"q_ptr": "*bf16", "out_ptr": "*bf16", "data": "*u8", "row_len": "*i32",
           "row_pages": "*i32", "slots": "*i32", "ws_acc": "*fp32", "ws_m": "*fp32",
           "ws_l": "*fp32", "qk_scale": "fp32"}
    mod, specs = "vllm_dms.kernels.decode", []
    for G, D, E, bn in [(3, 128, 1, 64), (4, 64, 2, 64), (8, 256, 1, 32), (1, 96, 1, 64)]:
        specs.append((mod, "_decode_split_kernel", ptr, dict(
            G=G, GP=16, P=16, D=D, ELEM=E, BLOCK_N=bn, BLOCK_D=1 << (D - 1).bit_length(),
            F32=False)))
        specs.append((mod, "_decode_reduce_kernel", ptr, dict(
            D=D, BLOCK_S=16, BLOCK_D=1 << (D - 1).bit_length())))
    compile_sm90(specs)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("G", [3, 4])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("W", [1, 16, 256])
@pytest.mark.parametrize("mode", ["decode_only", "prefill_only", "mixed"])
def test_decode_gpu_matrix(kit, G, D, W, mode):
    shift = (G + W) % 2
    kw = dict(H=2, G=G, D=D, P=16, W=W, shift=shift, elem=1, slot_ids=[7, 2, 5, 9],
              seed=G * 7 + D + W, num_splits=4, check_rows=False)
    if mode == "prefill_only":  # long prompts, one decode step, rows checked in full
        simulate(kit, "cuda", prompts=[700, 33, 1, 300], steps=1, **{**kw, "check_rows": True})
    elif mode == "decode_only":  # single-token prompts, W + 40 decode steps
        simulate(kit, "cuda", prompts=[1, 1, 1, 1], steps=W + 40, **kw)
    else:
        simulate(kit, "cuda", prompts=[400, 20, 300, 5], steps=30, arrive=[0, 4, 9, 20], **kw)
