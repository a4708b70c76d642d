"""Chunked prefill over the compact arena == one-shot prefill (vllm_dms/worker/kernels/chunked.py).

Every request's prompt is fed in chunks (first chunks through the first-chunk kernels, the rest
through dms_chunk_*, as the backend routes them), several requests per launch. After every chunk
each row must hold exactly the reference live set at query n1-1 (positions, flag bits, FP8 K/V
bytes), row_len == live count, the ring must point at the last W+1 tokens' row slots, and the
free stack must balance. Chunk outputs vs dms_attention_reference on the whole prefix with the
arena part (positions < n0) round-tripped through FP8 and the chunk's own K/V in bf16:
max abs err <= 2e-2 and ||out - ref|| / ||ref|| < 1e-2 (fp32 reference, bf16 in/out).
Then decode steps run on the chunked arena and on a one-shot arena side by side: the same live
counts and row contents, outputs within 1e-2 of each other (only the slot order, hence the
fp32 summation order, may differ) and within the tolerance above of the reference.
"""
import pytest
import torch

from vllm_dms.engine.arena import cdiv
from vllm_dms.worker.kernels.arena_ops import arena_read_row, arena_state, dms_decode_store
from vllm_dms.worker.kernels.pack import dms_prefill_pack
from vllm_dms.worker.kernels.chunked import dms_chunk_attention, dms_chunk_flag_prev, dms_chunk_pack
from vllm_dms.worker.kernels.decode import decode_workspace, dms_decode_attention
from vllm_dms.tools.reference import dms_attention_reference, dms_mask, shifted_flags

ATOL, RTOL = 2e-2, 1e-2
CK = "vllm_dms.worker.kernels.chunked"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def close(got, ref, atol=ATOL, rtol=RTOL, what=""):
    err = (got - ref).abs().max().item()
    rel = ((got - ref).norm() / ref.norm().clamp_min(1e-6)).item()
    assert err <= atol and rel < rtol, f"{what}: max err {err}, rel {rel}"


def row_snapshot(kv, lay, slot):
    """{h: {pos: (flag, k, v)}} of a slot's rows (order-free view of the live set)."""
    out = {}
    for h in range(lay.num_kv_heads):
        row = arena_read_row(kv, lay, slot, h)
        out[h] = {int(p): (bool(f), k, v) for p, f, k, v in
                  zip(row["pos"], row["flag"], row["k"], row["v"])}
    return out


def assert_same_rows(kv, kv1, lay, slot):
    a, b = row_snapshot(kv, lay, slot), row_snapshot(kv1, lay, slot)
    for h in a:
        assert a[h].keys() == b[h].keys(), f"live positions, slot {slot} h={h}"
        for p, (f, k, v) in a[h].items():
            assert f == b[h][p][0] and torch.equal(k, b[h][p][1]) and torch.equal(v, b[h][p][2])


def check_rows(kit, kv, lay, s, n1, slot, shift):
    """Row state after query n1-1 vs the reference mask (the newest flag pending under shift 1)."""
    W, E, P = lay.window, lay.elem_bytes, lay.block_size
    flags = shifted_flags(s["d"][:n1], shift)
    mask = dms_mask(flags, W, torch.tensor([n1 - 1]))[:, 0]
    st = arena_state(kv.view(-1), lay)
    assert st.row_len[slot].cpu().tolist() == mask.sum(-1).tolist(), f"row_len at q={n1 - 1}"
    for h in range(lay.num_kv_heads):
        row = arena_read_row(kv, lay, slot, h)
        pos = row["pos"].tolist()
        assert sorted(pos) == mask[h].nonzero().flatten().tolist(), f"live set h={h} q={n1 - 1}"
        assert torch.equal(row["flag"], flags[row["pos"], h]), "meta flag bits"
        assert int(st.row_npages[slot, h]) == cdiv(len(pos), P)
        for key in ("k", "v"):
            assert torch.equal(row[key], kit.quantize_like_store(s[key][row["pos"], h], E))
        ring, where = st.ring[slot, h].tolist(), {p: r for r, p in enumerate(pos)}
        for p in range(max(0, n1 - 1 - W), n1):
            assert ring[p % (W + 1)] == where[p], f"ring entry of {p} (q={n1 - 1})"


def simulate_chunked(kit, device, *, H, G, D, P, W, shift, reqs, steps, elem=1, seed=0,
                     first_via_chunk=False, p_flag=0.5, carrier=False):
    """reqs: (prompt_len, chunk_len, slot) per request. Each step every request with prompt
    left runs its next chunk; then `steps` decode steps on this arena and on a one-shot one.
    carrier: chunk queries carry junk in their borrowed lanes (read as 0 by the kernel)."""
    gen = torch.Generator().manual_seed(seed)
    R, Hq, scale = len(reqs), H * G, D ** -0.5
    total = [n + steps for n, _, _ in reqs]
    lay = kit.make_layout(H=H, D=D, P=P, W=W, S=max(r[2] for r in reqs) + 1,
                          max_len=max(total) + 1, elem=elem)
    kv, kv1 = kit.new_arena(lay, device), kit.new_arena(lay, device)
    st = arena_state(kv.view(-1), lay)
    top0 = int(st.free_top[0])
    seq = [dict(q=torch.randn(n, Hq, D, generator=gen).to(torch.bfloat16),
                k=torch.randn(n, H, D, generator=gen).to(torch.bfloat16),
                v=torch.randn(n, H, D, generator=gen).to(torch.bfloat16),
                d=torch.rand(n, H, generator=gen) < p_flag) for n in total]
    if carrier:  # the reference sees the lane as 0
        for s in seq:
            s["q"][:, ::G, D - 1] = 0
    i32 = dict(dtype=torch.int32, device=device)
    lp, lp1, live = (torch.zeros(lay.num_slots, **i32) for _ in range(3))
    ov = torch.zeros(1, **i32)
    done = [0] * R
    while any(done[i] < reqs[i][0] for i in range(R)):
        rows = [i for i in range(R) if done[i] < reqs[i][0]]
        span = {i: (done[i], min(done[i] + reqs[i][1], reqs[i][0])) for i in rows}
        cat = lambda key: torch.cat([seq[i][key][a:b] for i, (a, b) in span.items()])  # noqa
        q, k, v = (cat(x).to(device) for x in "qkv")
        fl = torch.cat([shifted_flags(seq[i]["d"][a:b], shift) for i, (a, b) in span.items()])
        fl = fl.to(device)
        lens = [b - a for a, b in span.values()]
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), **i32)
        n0 = torch.tensor([a for a, _ in span.values()], **i32)
        slots = torch.tensor([reqs[i][2] for i in rows], **i32)
        first = torch.where(n0 == 0, slots, 0)
        cont = slots if first_via_chunk else torch.where(n0 > 0, slots, 0)
        if shift == 1:
            dec_first = torch.stack([seq[i]["d"][a] for i, (a, _) in span.items()]).to(device)
            dms_chunk_flag_prev(kv, lay, dec_first, n0, cont)
        out = torch.full_like(q, float("nan"))
        if carrier:
            q[:, ::G, D - 1] = 40.0
        dms_chunk_attention(q, k, v, fl, cu, n0, cont, kv, lay, W, scale, out, max(lens),
                            carrier=carrier)
        if not first_via_chunk:
            dms_prefill_pack(kv, lay, k, v, fl, cu, first, lp, ov, live=live)
        dms_chunk_pack(kv, lay, k, v, fl, cu, n0, cont, lp, ov, live=live)
        assert int(ov[0]) == 0
        for j, (i, (a, b)) in enumerate(span.items()):
            s = seq[i]
            kq = torch.cat([kit.quantize_like_store(s["k"][:a], elem), s["k"][a:b].float()])
            vq = torch.cat([kit.quantize_like_store(s["v"][:a], elem), s["v"][a:b].float()])
            ref = dms_attention_reference(s["q"][:b], kq, vq, shifted_flags(s["d"][:b], shift),
                                          W, scale, torch.arange(a, b))
            close(out[int(cu[j]):int(cu[j + 1])].float().cpu(), ref, what=f"req {i} [{a},{b})")
            check_rows(kit, kv, lay, s, b, reqs[i][2], shift)
            done[i] = b
        assert int(st.free_top[0]) == top0 - int(lp.sum()), "free stack balance"
        assert torch.equal(live, st.row_len.sum(1)), "live counter == sum of row_len"
    kit.check_pages_conserved(kv, lay)
    # the same prompts in one step, into the second arena
    k1, v1 = (torch.cat([s[x][:n] for s, (n, _, _) in zip(seq, reqs)]).to(device) for x in "kv")
    fl1 = torch.cat([shifted_flags(s["d"][:n], shift) for s, (n, _, _) in zip(seq, reqs)])
    cu1 = torch.tensor([0] + torch.tensor([n for n, _, _ in reqs]).cumsum(0).tolist(), **i32)
    all_slots = torch.tensor([r[2] for r in reqs], **i32)
    dms_prefill_pack(kv1, lay, k1, v1, fl1.to(device), cu1, all_slots, lp1, ov)
    for _, _, sl in reqs:
        assert_same_rows(kv, kv1, lay, sl)
    ws = decode_workspace(R, Hq, D, 2, device)
    st1 = arena_state(kv1.view(-1), lay)
    for j in range(steps):
        pick = lambda key: torch.stack([s[key][n + j] for s, (n, _, _) in zip(seq, reqs)])  # noqa
        qb, kb, vb, db = (pick(x).to(device) for x in "qkvd")
        pos = torch.tensor([n + j for n, _, _ in reqs], **i32)
        outs = []
        for arena, pages in ((kv, lp), (kv1, lp1)):
            dms_decode_store(arena, lay, kb, vb, db, pos, all_slots, shift, pages, ov)
            if arena is kv or j in (0, steps - 1):  # one-shot outputs: first and last step
                o = torch.full_like(qb, float("nan"))
                dms_decode_attention(qb, arena, lay, all_slots, scale, o, ws.acc, ws.m, ws.l)
                outs.append(o.float().cpu())
        assert int(ov[0]) == 0
        if len(outs) == 2:
            close(outs[0], outs[1], atol=1e-2, what=f"chunked vs one-shot decode step {j}")
        assert torch.equal(st.row_len, st1.row_len), f"live counts, decode step {j}"
        for b, (s, (n, _, sl)) in enumerate(zip(seq, reqs)):
            m = n + j + 1
            flags = shifted_flags(s["d"][:m], shift)
            qm = torch.tensor([m - 1])
            assert st.row_len[sl].tolist() == dms_mask(flags, W, qm)[:, 0].sum(-1).tolist()
            kq, vq = (kit.quantize_like_store(s[x][:m].float(), elem) for x in "kv")
            ref = dms_attention_reference(s["q"][:m], kq, vq, flags, W, scale, qm)[0]
            close(outs[0][b], ref, what=f"decode req {b} q={m - 1}")
    for _, _, sl in reqs:  # same rows after decoding from either prefill
        assert_same_rows(kv, kv1, lay, sl)
    for b, (s, (n, _, sl)) in enumerate(zip(seq, reqs)):
        check_rows(kit, kv, lay, s, n + steps, sl, shift)
    assert torch.equal(lp, lp1)
    kit.check_pages_conserved(kv, lay)


def chunk_sizes(W):
    return sorted({1, 3, 7, W, W + 1})


@pytest.mark.parametrize("W,P", [(1, 4), (4, 4), (16, 16)])
@pytest.mark.parametrize("shift", [0, 1])
def test_chunked_matches_one_shot(kit, device, W, P, shift):
    # one request per chunk size plus a whole-prompt one, up to 64 tokens, at most ~10 chunks
    # each except size 1, which runs past the window (W + 6 tokens)
    sizes = chunk_sizes(W)
    prompts = {c: min(64, 10 * c - 3) for c in sizes} | {1: W + 6}
    slots = [5, 2, 7, 1, 4, 3, 6]
    reqs = [(prompts[c], c, slots[i]) for i, c in enumerate(sizes)] + [(64, 64, slots[-1])]
    simulate_chunked(kit, device, H=2, G=2, D=16, P=P, W=W, shift=shift, reqs=reqs,
                     steps=min(W + 2, 6), seed=10 * W + shift)


def test_chunked_bf16_store_and_first_chunk_via_chunk_kernels(kit, device):
    """bf16 store; first chunks go through dms_chunk_* too (n0 = 0: an empty row); queries
    carry decision junk in their borrowed lanes, as the backend hands them over."""
    simulate_chunked(kit, device, H=2, G=3, D=32, P=4, W=3, shift=1, elem=2,
                     reqs=[(23, 5, 2), (17, 4, 1), (9, 9, 3)], steps=5, seed=3,
                     first_via_chunk=True, carrier=True)


def test_chunk_all_flagged_long_chunks(kit, device):
    """Every decision set: each chunk longer than the window empties the arena's window (holes
    == W+1) and drops most of its own keys; a 3-token chunk leaves holes == chunk length."""
    simulate_chunked(kit, device, H=1, G=2, D=16, P=4, W=2, shift=0, p_flag=1.0,
                     reqs=[(40, 11, 1), (33, 3, 2)], steps=4, seed=8)


def test_chunk_pack_overflow(kit, device):
    """A continuation that needs sub-pages the stack cannot give: overflow, row unchanged."""
    lay = kit.make_layout(H=1, D=16, P=4, W=2, S=2, max_len=32)
    kv = kit.new_arena(lay, device)
    st = arena_state(kv.view(-1), lay)
    i32 = dict(dtype=torch.int32, device=device)
    lp, ov = torch.zeros(lay.num_slots, **i32), torch.zeros(1, **i32)
    x = torch.ones(12, 1, 16, dtype=torch.bfloat16, device=device)
    no = torch.zeros(12, 1, dtype=torch.bool, device=device)
    slot = torch.tensor([1], **i32)
    dms_prefill_pack(kv, lay, x[:6], x[:6], no[:6], torch.tensor([0, 6], **i32), slot, lp, ov)
    top = int(st.free_top[0])
    st.free_top[0] = 0  # the stack is empty now
    before = kv.clone()
    dms_chunk_pack(kv, lay, x[6:], x[6:], no[6:], torch.tensor([0, 6], **i32),
                   torch.tensor([6], **i32), slot, lp, ov)
    assert int(ov[0]) == 1 and torch.equal(kv, before), "row left as it was"
    st.free_top[0] = top
    ov.zero_()
    dms_chunk_pack(kv, lay, x[6:], x[6:], no[6:], torch.tensor([0, 6], **i32),
                   torch.tensor([6], **i32), slot, lp, ov)
    assert int(ov[0]) == 0 and int(st.row_len[1, 0]) == 12 and int(lp[1]) == 3
    kit.check_pages_conserved(kv, lay)


def test_chunked_compiles_sm90(compile_sm90):
    ptr = {n: "*bf16" for n in ("q_ptr", "k_ptr", "v_ptr", "out_ptr")}
    ptr.update({n: "*i32" for n in
                "arena cu n0_ptr slots layer_pages live overflow surv cum".split()})
    ptr.update(flags="*u8", dec="*u8", qk_scale="fp32")
    specs = []
    for G, D, E, W in [(4, 128, 1, 512), (3, 96, 2, 16)]:
        bd = 1 << (D - 1).bit_length()
        specs.append((CK, "_chunk_attn_kernel", ptr, dict(
            G=G, TM=128 // G, P=16, D=D, ELEM=E,
            BLOCK_R=128, BLOCK_N=128, BLOCK_D=bd, F32=False, CARRIER=E == 1)))
        specs.append((CK, "_chunk_pack_kernel", ptr, dict(
            P=16, D=D, ELEM=E, BLOCK_T=64, BLOCK_W=1 << W.bit_length(), BLOCK_D=bd,
            HAS_LIVE=True)))
        specs.append((CK, "_flag_prev_kernel", ptr, dict(P=16, D=D, ELEM=E)))
    compile_sm90(specs)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("W", [16, 512])
@pytest.mark.parametrize("shift", [0, 1])
def test_chunked_gpu_matrix(kit, W, shift):
    reqs = [(W + 6, 1, 3), (300, 37, 8), (700, W, 1), (700, W + 1, 5), (1200, 256, 2),
            (1100, 1100, 7), (40, 7, 4), (90, 3, 6)]
    simulate_chunked(kit, "cuda", H=2, G=4, D=128, P=16, W=W, shift=shift, reqs=reqs,
                     steps=min(W + 2, 24), seed=W + shift)


def _two_chunk_setup(kit, dev, lengths, first, H=2, G=4, D=128, P=16, W=16, p_flag=0.5):
    """Arena with each request's first `first` tokens packed; returns the continuation inputs."""
    gen = torch.Generator().manual_seed(sum(lengths))
    R = len(lengths)
    lay = kit.make_layout(H=H, D=D, P=P, W=W, S=R + 1, max_len=max(lengths) + 1)
    kv = kit.new_arena(lay, dev)
    x = [dict(q=torch.randn(n, H * G, D, generator=gen).to(torch.bfloat16),
              kv=torch.randn(n, H, D, generator=gen).to(torch.bfloat16),
              d=torch.rand(n, H, generator=gen) < p_flag) for n in lengths]
    i32 = dict(dtype=torch.int32, device=dev)
    lp, ov = torch.zeros(lay.num_slots, **i32), torch.zeros(1, **i32)
    slots = torch.arange(1, R + 1, **i32)

    def batch(a, b):  # tokens [a, b) of every request
        cu = torch.tensor([0] + torch.tensor([b(n) - a(n) for n in lengths]).cumsum(0).tolist(),
                          **i32)
        k = torch.cat([s["kv"][a(n):b(n)] for s, n in zip(x, lengths)]).to(dev)
        fl = torch.cat([shifted_flags(s["d"][a(n):b(n)], 1) for s, n in zip(x, lengths)])
        q = torch.cat([s["q"][a(n):b(n)] for s, n in zip(x, lengths)]).to(dev)
        dec = torch.stack([s["d"][a(n)] for s, n in zip(x, lengths)]).to(dev)
        return q, k, fl.to(dev), cu, dec

    _, k, fl, cu, _ = batch(lambda n: 0, lambda n: first)
    dms_prefill_pack(kv, lay, k, k, fl, cu, slots, lp, ov)
    n0 = torch.full((R,), first, **i32)
    return lay, kv, lp, ov, slots, n0, batch(lambda n: first, lambda n: n)


@pytest.mark.gpu
@needs_cuda
def test_chunk_kernels_cuda_graph(kit):
    """Capture safety: one continuation step (flag_prev, attention, pack) captured once and
    replayed on the restored arena gives the eager outputs and the same rows."""
    dev, lengths = "cuda", [90, 130, 57]
    lay, kv, lp, ov, slots, n0, (q, k, fl, cu, dec) = _two_chunk_setup(kit, dev, lengths, 40)
    out = torch.empty_like(q)

    def step():
        dms_chunk_flag_prev(kv, lay, dec, n0, slots)
        dms_chunk_attention(q, k, k, fl, cu, n0, slots, kv, lay, lay.window, 0.1, out, 90)
        dms_chunk_pack(kv, lay, k, k, fl, cu, n0, slots, lp, ov)

    saved = kv.clone(), lp.clone()
    step()
    eager = out.clone(), [row_snapshot(kv, lay, s) for s in range(1, 4)]
    kv.copy_(saved[0]), lp.copy_(saved[1])
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    kv.copy_(saved[0]), lp.copy_(saved[1])
    out.zero_()
    g.replay()
    assert torch.equal(out, eager[0]) and int(ov[0]) == 0
    for s, want in zip(range(1, 4), eager[1]):
        got = row_snapshot(kv, lay, s)
        for h in want:
            assert got[h].keys() == want[h].keys()
            assert all(got[h][p][0] == f and torch.equal(got[h][p][1], kk)
                       for p, (f, kk, _) in want[h].items())


@pytest.mark.gpu
@needs_cuda
def test_chunk_pack_overflow_concurrent(kit):
    """Every row needs 4 more sub-pages, the stack holds 300 of the 1280 asked for: each row is
    extended or untouched, no sub-page is handed out twice."""
    dev, S, H = "cuda", 40, 8
    lay, kv, lp, ov, slots, n0, (_, k, _, cu, _) = _two_chunk_setup(
        kit, dev, [128] * S, 64, H=H, D=64, p_flag=0.0)
    st = arena_state(kv.view(-1), lay)
    left = int(st.free_top[0])
    st.free_top[0] = 300
    no = torch.zeros(k.shape[0], H, dtype=torch.bool, device=dev)
    dms_chunk_pack(kv, lay, k, k, no, cu, n0, slots, lp, ov)
    rl = st.row_len[1:S + 1].cpu()
    done = int((rl == 128).sum())
    assert int(ov[0]) == 1 and done + int((rl == 64).sum()) == S * H and done <= 75
    top = int(st.free_top[0])
    assert top == 300 - 4 * done and st.free_top[1:3].tolist() == [0, 0]
    st.free_stack[top:top + left - 300] = st.free_stack[300:left].clone()  # still free above
    st.free_top[0] = top + left - 300
    kit.check_pages_conserved(kv, lay)
    for s in range(1, S + 1):
        for h in range(H):
            assert arena_read_row(kv, lay, s, h)["pos"].tolist() == list(range(int(rl[s - 1, h])))
