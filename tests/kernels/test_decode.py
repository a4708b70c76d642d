"""Multi-step DMS simulation: prefill pack, then decode store + split-K decode attention.

After every step each row's live set must equal the reference mask's row for that query
(``shifted_flags`` over the full decision sequence), and the decode output must match
``dms_attention_reference`` on the full sequence's last row with K/V round-tripped through the
store dtype (FP8 e4m3 or bf16). Tolerance for both stores: max abs err <= 2e-2 and
||out - ref|| / ||ref|| < 1e-2 (fp32 reference, bf16 inputs and output).
"""
import pytest
import torch

from vllm_dms.engine.arena import cdiv
from vllm_dms.worker.kernels.arena_ops import arena_read_row, arena_state, dms_decode_store, dms_release
from vllm_dms.worker.kernels.pack import dms_prefill_pack
from vllm_dms.worker.kernels.decode import decode_workspace, dms_decode_attention
from vllm_dms.tools.reference import dms_attention_reference, dms_mask, shifted_flags

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
ATOL, RTOL = 2e-2, 1e-2


def last(n: int) -> torch.Tensor:
    """The query position n-1 alone: per-step checks stay O(n), not O(n^2)."""
    return torch.tensor([n - 1])


def simulate(kit, device, *, H, G, D, P, W, shift, elem, prompts, steps, slot_ids, arrive=None,
             num_splits=3, seed=0, check_rows=True, carrier=False, tiles=None):
    """prompts[i] tokens of request i are packed at step arrive[i] (default 0), then it decodes
    one token per step; steps counts engine steps. slot_ids[i] is its arena slot.
    carrier: as the backend runs it: each decode query's borrowed lanes carry its decisions
    (+-30, alpha = (1, 0)); the store decides from them and attention reads them as 0."""
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
    if carrier:  # what attention must see: the lane as 0
        for s in seq:
            s["q"][:, ::G, D - 1] = 0
    layer_pages = torch.zeros(lay.num_slots, dtype=torch.int32, device=device)
    overflow = torch.zeros(1, dtype=torch.int32, device=device)
    live = torch.zeros(lay.num_slots, dtype=torch.int32, device=device)  # runtime's counter
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
            dms_prefill_pack(kv, lay, ks, vs, fl.to(device), cu, sl, layer_pages, overflow,
                             live=live)
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
            if carrier:
                qb[:, ::G, D - 1] = torch.where(db, 30.0, -30.0).to(qb.dtype)
                dms_decode_store(kv, lay, kb, vb, qb[:, ::G, D - 1], pos, sl, shift, layer_pages,
                                 overflow, live=live, alpha=(1.0, 0.0))
            else:
                dms_decode_store(kv, lay, kb, vb, db, pos, sl, shift, layer_pages, overflow,
                                 live=live)
            out = torch.full_like(qb, float("nan"))
            dms_decode_attention(qb, kv, lay, sl, scale, out, ws.acc, ws.m, ws.l,
                                 carrier=carrier, tiles=tiles)
            assert torch.equal(out[-1].cpu(), torch.zeros_like(out[-1].cpu())), "padding -> 0"
            for j, i in enumerate(dec_rows):
                done[i] += 1
                check_step(kit, kv, lay, seq[i], done[i], slot_ids[i], shift,
                           out[j].float().cpu(), scale, check_rows)
        assert int(overflow[0]) == 0
        for i in range(R):  # counter == reference live count summed over heads, every step
            if arrive[i] <= step:
                want = int(dms_mask(shifted_flags(seq[i]["d"][:done[i]], shift), W,
                                    last(done[i])).sum()) if done[i] else 0
                assert int(live[slot_ids[i]]) == want, (step, i)
        assert int(live[0]) == 0, "padding rows count nothing"
    for i in range(R):  # final footprint accounting
        want = sum(cdiv(int(st.row_len[slot_ids[i], h]), P) for h in range(H))
        assert int(layer_pages[slot_ids[i]]) == want
    assert int(st.free_top[0]) == top0 - int(layer_pages.sum())
    if check_rows:
        kit.check_pages_conserved(kv, lay)
    dms_release(kv, lay, torch.tensor(slot_ids, dtype=torch.int32, device=device), layer_pages,
                live=live)
    assert int(st.free_top[0]) == top0 and int(st.row_len.abs().sum()) == 0
    assert int(live.abs().sum()) == 0


def check_step(kit, kv, lay, s, n, slot, shift, got, scale, check_rows):
    """After the query at position n-1: live rows and the attention output vs the reference."""
    W, E = lay.window, lay.elem_bytes
    flags = shifted_flags(s["d"][:n], shift)  # the newest key owns no decision yet under shift 1
    mask = dms_mask(flags, W, last(n))[:, 0]  # [H, n]
    st = arena_state(kv.view(-1), lay)
    assert st.row_len[slot].cpu().tolist() == mask.sum(-1).tolist(), f"live counts at q={n - 1}"
    if check_rows:
        for h in range(lay.num_kv_heads):
            row = arena_read_row(kv, lay, slot, h)
            live = mask[h].nonzero().flatten()
            assert sorted(row["pos"].tolist()) == live.tolist(), f"live set h={h} q={n - 1}"
            assert torch.equal(row["flag"], flags[row["pos"], h]), "meta flag bits"
    kq = kit.quantize_like_store(s["k"][:n].float(), E)
    vq = kit.quantize_like_store(s["v"][:n].float(), E)
    ref = dms_attention_reference(s["q"][:n], kq, vq, flags, W, scale, last(n))[0]
    err = (got - ref).abs().max().item()
    rel = ((got - ref).norm() / ref.norm()).item()
    assert err <= ATOL and rel < RTOL, f"q={n - 1}: max err {err}, rel {rel}"


@pytest.mark.parametrize("elem,W", [(1, 1), (1, 4), (1, 16), (2, 4)])  # FP8 store; bf16 store
@pytest.mark.parametrize("shift", [0, 1])
def test_decode_simulation(kit, device, elem, W, shift):
    # W + 6 steps: decode-written tokens leave the window too (reuse of a decoded slot)
    simulate(kit, device, H=2, G=2, D=32, P=4, W=W, shift=shift, elem=elem,
             prompts=[6, 11, 1], steps=W + 6, slot_ids=[3, 1, 4], num_splits=2,
             seed=100 * W + 10 * elem + shift)


@pytest.mark.parametrize("carrier", [False, True])
def test_decode_mixed_arrivals_and_splits(kit, device, carrier):
    """Requests join mid-run (prefill and decode in the same step), more splits than pages."""
    simulate(kit, device, H=2, G=3, D=16, P=4, W=3, shift=1, elem=1, prompts=[9, 2, 5],
             steps=9, slot_ids=[2, 5, 1], arrive=[0, 3, 6], num_splits=8, seed=11,
             carrier=carrier)


@pytest.mark.parametrize("splits,tiles", [(1, (32, 2, 2)), (4, (64, 8, 3))])
def test_decode_tiles_and_one_split(kit, device, splits, tiles):
    """The tiles kernel_bench sweeps (and a single split) give the reference's output too."""
    simulate(kit, device, H=2, G=4, D=16, P=4, W=5, shift=1, elem=1, prompts=[40, 3, 17],
             steps=8, slot_ids=[1, 3, 2], num_splits=splits, seed=5, carrier=True,
             tiles=tiles)


def test_store_decides_from_lane_exactly_as_config(kit, device):
    """In-kernel decision == DMSConfig.decisions_from_lane, also exactly at the threshold."""
    from vllm_dms.engine.config import DMSConfig
    H, S = 8, 6
    lay = kit.make_layout(H=H, D=16, P=4, W=2, S=S, max_len=8)
    kv = kit.new_arena(lay, device)
    x = torch.linspace(-2, 2, S * H).to(torch.bfloat16).view(S, H)
    # offset == fl(x[2, 3] * scale): that lane sits exactly on the threshold (must be False)
    cfg = DMSConfig(arch="llama", num_layers=1, num_q_heads=H, num_kv_heads=H, head_dim=16,
                    window=2, alpha_scale=1 / 3, alpha_offset=float(x[2, 3].float() * (1 / 3)),
                    decision_shift=0, target_cr=8.0, source="test")
    lanes = torch.zeros(S, H, 5, dtype=torch.bfloat16)
    lanes[..., 2] = x  # a strided [S, H] view, like q[:, ::G, D - 1]
    lanes = lanes.to(device)
    slots = torch.arange(1, S + 1, dtype=torch.int32, device=device)
    k = torch.randn(S, H, 16).to(torch.bfloat16).to(device)
    lp = torch.zeros(lay.num_slots, dtype=torch.int32, device=device)
    ov = torch.zeros(1, dtype=torch.int32, device=device)
    dms_decode_store(kv, lay, k, k, lanes[..., 2], torch.zeros(S, dtype=torch.int32,
                     device=device), slots, 0, lp, ov, alpha=(cfg.alpha_scale, cfg.alpha_offset))
    want = cfg.decisions_from_lane(x)
    assert not bool(want[2, 3]) and bool(want.any()) and not bool(want.all())
    got = torch.tensor([[bool(arena_read_row(kv, lay, s + 1, h)["flag"][0]) for h in range(H)]
                        for s in range(S)])
    assert torch.equal(got, want)


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
    live = torch.zeros(lay.num_slots, dtype=torch.int32, device=device)
    for q in range(2):  # tokens 0, 1 fill the one page
        dms_decode_store(kv, lay, kvb, kvb, no, torch.tensor([q], dtype=torch.int32,
                         device=device), slot, 0, lp, ov, live=live)
    assert int(ov[0]) == 0 and int(st.row_len[1, 0]) == 2 and int(st.free_top[0]) == 0
    assert int(live[1]) == 2
    before = kv.clone()
    dms_decode_store(kv, lay, kvb, kvb, no, torch.tensor([2], dtype=torch.int32, device=device),
                     slot, 0, lp, ov, live=live)
    assert int(ov[0]) == 1 and torch.equal(kv, before)
    assert int(live[1]) == 2, "a refused append counts nothing"


def test_decode_compiles_sm90(compile_sm90):
    ptr = {"q_ptr": "*bf16", "out_ptr": "*bf16", "arena": "*i32", "slots": "*i32",
           "ws_acc": "*fp32", "ws_m": "*fp32", "ws_l": "*fp32", "qk_scale": "fp32"}
    mod, specs = "vllm_dms.worker.kernels.decode", []
    for G, D, E, bn, direct in [(3, 128, 1, 64, False), (4, 96, 2, 64, False),
                                (4, 64, 1, 128, True)]:
        specs.append((mod, "_decode_split_kernel", ptr, dict(
            G=G, GP=16, P=16, D=D, ELEM=E, BLOCK_N=bn, BLOCK_D=1 << (D - 1).bit_length(),
            F32=False, CARRIER=E == 1, DIRECT=direct)))
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
        simulate(kit, "cuda", prompts=[400, 20, 300, 5], steps=30, arrive=[0, 4, 9, 20],
                 carrier=True, **kw)


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_capture(kit):
    """Capture-safety: one decode step (store + attention) is captured once and replayed for
    every later position; release + pack are captured too and replayed into the same slots."""
    dev, H, G, D, P, W, shift, steps = "cuda", 2, 4, 128, 16, 16, 1, 30
    prompts, slot_ids, B = [40, 70], [3, 1], 2
    gen = torch.Generator().manual_seed(21)
    lay = kit.make_layout(H=H, D=D, P=P, W=W, S=4, max_len=max(prompts) + steps + 1, elem=1)
    kv = kit.new_arena(lay, dev)
    seq = [dict(q=torch.randn(n + steps, H * G, D, generator=gen).to(torch.bfloat16),
                k=torch.randn(n + steps, H, D, generator=gen).to(torch.bfloat16),
                v=torch.randn(n + steps, H, D, generator=gen).to(torch.bfloat16),
                d=torch.rand(n + steps, H, generator=gen) < 0.5) for n in prompts]
    lp = torch.zeros(lay.num_slots, dtype=torch.int32, device=dev)
    ov = torch.zeros(1, dtype=torch.int32, device=dev)
    sl = torch.tensor(slot_ids, dtype=torch.int32, device=dev)
    cu = torch.tensor([0, prompts[0], sum(prompts)], dtype=torch.int32, device=dev)
    pk, pv = (torch.cat([x[key][:n] for x, n in zip(seq, prompts)]).to(dev) for key in "kv")
    pf = torch.cat([shifted_flags(x["d"][:n], shift) for x, n in zip(seq, prompts)]).to(dev)
    kb, vb, qb = (torch.empty(B, *x, dtype=torch.bfloat16, device=dev)
                  for x in ((H, D), (H, D), (H * G, D)))
    db = torch.empty(B, H, dtype=torch.bool, device=dev)
    pos = torch.empty(B, dtype=torch.int32, device=dev)
    out = torch.empty(B, H * G, D, dtype=torch.bfloat16, device=dev)
    ws = decode_workspace(B, H * G, D, 4, dev)

    def pack():
        dms_release(kv, lay, sl, lp)
        dms_prefill_pack(kv, lay, pk, pv, pf, cu, sl, lp, ov)

    def step():
        dms_decode_store(kv, lay, kb, vb, db, pos, sl, shift, lp, ov)
        dms_decode_attention(qb, kv, lay, sl, D ** -0.5, out, ws.acc, ws.m, ws.l)

    def run_steps(first_graph):
        for j in range(steps):
            for b, x in enumerate(seq):
                p = prompts[b] + j
                kb[b], vb[b], qb[b], db[b], pos[b] = x["k"][p], x["v"][p], x["q"][p], x["d"][p], p
            first_graph.replay() if first_graph is not None else step()
            for b, x in enumerate(seq):
                check_step(kit, kv, lay, x, prompts[b] + j + 1, slot_ids[b], shift,
                           out[b].float().cpu(), D ** -0.5, check_rows=False)

    pack()
    kb.zero_(), vb.zero_(), qb.zero_(), db.zero_(), pos.zero_()
    torch.cuda.synchronize()
    g_step, g_pack = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(g_pack):  # kernels are compiled by the eager pack() above
        pack()
    st = arena_state(kv.view(-1), lay)
    saved = kv.clone(), lp.clone()
    step()  # compile the decode kernels eagerly, then restore the arena
    kv.copy_(saved[0]), lp.copy_(saved[1])
    with torch.cuda.graph(g_step):
        step()
    run_steps(g_step)
    g_pack.replay()  # back to the freshly packed prompts, by graph
    for x, n, s in zip(seq, prompts, slot_ids):
        live = dms_mask(shifted_flags(x["d"][:n], shift), W, last(n))[:, 0].sum(-1)
        assert st.row_len[s].tolist() == live.tolist()
    run_steps(g_step)
    assert int(ov[0]) == 0


@pytest.mark.gpu
@needs_cuda
def test_decode_store_overflow_concurrent(kit):
    """Every row needs a fresh sub-page in the same step but only some are left: each row is
    appended or untouched, and no sub-page is handed out twice."""
    dev, S, H, P, n = "cuda", 40, 8, 16, 64
    lay = kit.make_layout(H=H, D=64, P=P, W=4, S=S, max_len=n + 8)
    kv = kit.new_arena(lay, dev)
    st = arena_state(kv.view(-1), lay)
    gen = torch.Generator().manual_seed(1)
    k = torch.randn(S * n, H, 64, generator=gen).to(torch.bfloat16).to(dev)
    flags = torch.zeros(S * n, H, dtype=torch.bool, device=dev)
    cu = (torch.arange(S + 1, dtype=torch.int32) * n).to(dev)
    slots = torch.arange(1, S + 1, dtype=torch.int32, device=dev)
    lp = torch.zeros(lay.num_slots, dtype=torch.int32, device=dev)
    ov = torch.zeros(1, dtype=torch.int32, device=dev)
    dms_prefill_pack(kv, lay, k, k, flags, cu, slots, lp, ov)
    left = int(st.free_top[0])
    st.free_top[0] = 100  # fewer than the S * H = 320 rows that need one now
    kd = torch.randn(S, H, 64, generator=gen).to(torch.bfloat16).to(dev)
    dd = torch.zeros(S, H, dtype=torch.bool, device=dev)
    pos = torch.full((S,), n, dtype=torch.int32, device=dev)
    dms_decode_store(kv, lay, kd, kd, dd, pos, slots, 0, lp, ov)
    assert int(ov[0]) == 1 and int(st.free_top[0]) == 0
    rl = st.row_len[1:].cpu()
    assert int((rl == n + 1).sum()) == 100 and int((rl == n).sum()) == S * H - 100
    hidden = st.free_stack[100:left].clone()  # entries above the lowered top: still free
    st.free_stack[:left - 100] = hidden
    st.free_top[0] = left - 100
    kit.check_pages_conserved(kv, lay)


def test_decode_split_rule_and_workspace_views():
    """~256 programs per launch (benchmarks/kernel_bench.py sweep): 16 at c=1, 4 at c=8, 2 from
    c=32 on; never above the workspace's split count; views are contiguous and disjoint-free."""
    from vllm_dms.worker.kernels.decode import decode_splits, workspace_for
    assert [decode_splits(c, 8, 16) for c in (1, 2, 4, 8, 16, 32, 256)] == [16, 16, 8, 4, 2, 2, 2]
    assert decode_splits(1, 1, 8) == 8 and decode_splits(64, 8, 1) == 1
    ws = decode_workspace(32, 12, 16, 16, "cpu")
    acc, m, l = workspace_for(ws, 5, 4)
    assert acc.shape == (5, 12, 4, 16) and m.shape == l.shape == (5, 12, 4)
    assert all(t.is_contiguous() for t in (acc, m, l))
    assert acc.data_ptr() == ws.acc.data_ptr() and l.data_ptr() == ws.l.data_ptr()
    with pytest.raises(AssertionError):
        workspace_for(ws, 33, 4)
