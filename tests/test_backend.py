"""The DMS backend impl (store then attend) and the model transform, without a vLLM worker.

The impl is driven with hand-built per-step metadata over a real arena (Triton interpreter on
CPU): a prompt is prefilled, then decoded token by token. Queries carry the raw borrowed-lane
value in lane D-1 of each group's first head (what DMSRotary hands over); outputs and live counts
must match the dense reference with the decisions read from that lane.
"""
import os
import types

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from vllm_dms.engine.arena import ArenaLayout  # noqa: E402
from vllm_dms.worker.backend import (DMSCompactAttentionImpl, DMSMetadata,  # noqa: E402
                                     prefill_chunk_rows)
from vllm_dms.engine.config import DMSConfig  # noqa: E402
from vllm_dms.worker.kernels.arena_ops import arena_read_row, arena_state  # noqa: E402
from vllm_dms.worker.models.transform import DMSRotary  # noqa: E402
from vllm_dms.tools.reference import dms_attention_reference, live_counts, shifted_flags  # noqa: E402
from vllm_dms.worker.runtime import DMSRuntime  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _dms(shift: int, W: int, H=2, G=2, D=32) -> DMSConfig:
    return DMSConfig(arch="llama", num_layers=1, num_q_heads=H * G, num_kv_heads=H, head_dim=D,
                     window=W, alpha_scale=100.0, alpha_offset=5.0, decision_shift=shift,
                     target_cr=None, source="test")


def _arena_runtime(dms: DMSConfig, P: int, data_blocks: int):
    """One-layer arena (3 request slots, max_model_len 64) and its DMSRuntime."""
    H, D = dms.num_kv_heads, dms.head_dim
    lay = ArenaLayout(num_layers=1, num_kv_heads=H, head_dim=D, block_size=P, window=dms.window,
                      max_num_seqs=3, max_model_len=64, num_blocks=0)
    lay = ArenaLayout(**{**lay.__dict__, "num_blocks": lay.first_data_block + data_blocks})
    kv = torch.zeros(lay.num_blocks, lay.page_bytes, dtype=torch.uint8, device=DEV)
    rt = DMSRuntime(dms, lay, ["l0"], dms.num_q_heads, DEV)
    rt.init_arenas([kv])
    return lay, kv, rt


def _meta(rt, slot, n_done, n_new, prefill):
    i32 = dict(dtype=torch.int32, device=DEV)
    s = torch.tensor([slot], **i32)
    if prefill:
        cu = torch.tensor([0, n_new], **i32)
        return DMSMetadata(num_actual_tokens=n_new, num_decodes=0, num_decode_tokens=0,
                           num_prefills=1, max_prefill_len=n_new, slots=s,
                           decode_pos=torch.zeros(0, **i32), prefill_cu=cu,
                           prefill_last=(cu[1:] - 1).long(), runtime=rt)
    return DMSMetadata(num_actual_tokens=1, num_decodes=1, num_decode_tokens=1, num_prefills=0,
                       max_prefill_len=0, slots=s, decode_pos=torch.tensor([n_done], **i32),
                       prefill_cu=torch.zeros(1, **i32), prefill_last=torch.zeros(0, dtype=torch.long,
                                                                                    device=DEV),
                       runtime=rt)


@pytest.mark.parametrize("shift,W", [(1, 3), (0, 3), (1, 40)])
def test_impl_prefill_then_decode_matches_reference(shift, W):
    H, G, D, P, prompt, steps, slot = 2, 2, 32, 16, 12, 6, 2
    dms = _dms(shift, W, H, G, D)
    T = prompt + steps
    lay, kv, rt = _arena_runtime(dms, P, 6)
    g = torch.Generator().manual_seed(shift * 100 + W)
    q = torch.randn(T, H * G, D, generator=g).to(torch.bfloat16)
    k = torch.randn(T, H, D, generator=g).to(torch.bfloat16)
    v = torch.randn(T, H, D, generator=g).to(torch.bfloat16)
    lane = torch.where(torch.rand(T, H, generator=g) < 0.5, 0.3, -0.2).to(torch.bfloat16)
    q[:, ::G, D - 1] = lane  # the carrier the model transform leaves there
    impl = DMSCompactAttentionImpl(H * G, D, D ** -0.5, H)
    layer = types.SimpleNamespace(layer_name="l0")
    outs = []
    for n_done, n_new in [(0, prompt)] + [(prompt + i, 1) for i in range(steps)]:
        sl = slice(n_done, n_done + n_new)
        out = torch.full((n_new, H * G * D), float("nan"), dtype=torch.bfloat16, device=DEV)
        impl.forward(layer, q[sl].reshape(n_new, -1).to(DEV), k[sl].reshape(n_new, -1).to(DEV),
                     v[sl].reshape(n_new, -1).to(DEV), kv,
                     _meta(rt, slot, n_done, n_new, n_done == 0), out)
        outs.append(out.view(n_new, H * G, D).float().cpu())
        st = arena_state(kv.view(-1), lay)
        flags = shifted_flags(lane.float() > 0.05, shift)[: n_done + n_new]
        if shift == 1:
            flags[-1] = False  # the newest token's flag is still pending
        want_live = live_counts(flags, W)[-1]
        assert torch.equal(st.row_len[slot].cpu().long(), want_live), (n_done, n_new)
    q0 = q.clone()
    q0[:, ::G, D - 1] = 0  # the lane is zero for attention
    dec = lane.float() > 0.05
    flags = shifted_flags(dec, shift)
    kq = k.float().to(torch.float8_e4m3fn).float()  # every row reads K/V on the FP8 grid
    vq = v.float().to(torch.float8_e4m3fn).float()
    ref_prompt = dms_attention_reference(q0[:prompt], kq[:prompt], vq[:prompt],
                                         shifted_flags(dec[:prompt], shift)
                                         if shift == 0 else
                                         torch.cat([dec[1:prompt], torch.zeros(1, H, dtype=torch.bool)]),
                                         W, D ** -0.5)
    assert (outs[0] - ref_prompt).abs().max() < 2e-2
    for i in range(steps):
        n = prompt + i + 1
        fl = flags[:n].clone()
        fl[-1] = fl[-1] if shift == 0 else False
        ref = dms_attention_reference(q0[:n], kq[:n], vq[:n], fl, W, D ** -0.5)[-1]
        assert (outs[1 + i][0] - ref).abs().max() < 3e-2, i
    assert int(rt.overflow[0]) == 0


def test_dms_rotary_carries_or_zeroes_the_lane():
    T, Hq, Hkv, D = 5, 4, 2, 8

    def rope(positions, q, k):  # any rotation mixing lane D-1 with D/2-1
        qh = q.view(T, Hq, D).clone()
        a, b = qh[..., D // 2 - 1] + qh[..., D - 1], qh[..., D - 1].clone()
        qh[..., D - 1], qh[..., D // 2 - 1] = a, b
        return qh.view(T, -1), k

    q = torch.randn(T, Hq * D)
    lane = q.view(T, Hq, D)[:, ::2, D - 1].clone()
    carry = DMSRotary(types.SimpleNamespace(), Hq, Hkv, D, carry=True)
    carry.rope = rope
    qc, _ = carry(torch.arange(T), q.clone(), torch.zeros(T, Hkv * D))
    assert torch.equal(qc.view(T, Hq, D)[:, ::2, D - 1], lane)
    # zeroing before RoPE means the partner lane did not receive the borrowed lane's value
    assert torch.equal(qc.view(T, Hq, D)[:, ::2, D // 2 - 1], torch.zeros(T, 2))
    zero = DMSRotary(types.SimpleNamespace(), Hq, Hkv, D, carry=False)
    zero.rope = rope
    qz, _ = zero(torch.arange(T), q.clone(), torch.zeros(T, Hkv * D))
    assert torch.equal(qz.view(T, Hq, D)[:, ::2, D - 1], torch.zeros(T, 2))
    assert torch.equal(qz.view(T, Hq, D)[:, 1::2], qc.view(T, Hq, D)[:, 1::2])


def _step_meta(rt, rows):
    """rows: (slot, n_done, n_new) with 1-token rows first, as vLLM orders them; the metadata
    the builder makes (1-token chunks are decode rows there too; n0 split on the GPU)."""
    i32 = dict(dtype=torch.int32, device=DEV)
    nd = sum(r[2] == 1 for r in rows)
    pf = rows[nd:]
    cu = torch.tensor([0] + torch.tensor([r[2] for r in pf]).cumsum(0).tolist(), **i32)
    slots = torch.tensor([r[0] for r in rows], **i32)
    md = DMSMetadata(num_actual_tokens=sum(r[2] for r in rows), num_decodes=nd,
                     num_decode_tokens=nd, num_prefills=len(pf),
                     max_prefill_len=max([r[2] for r in pf], default=0), slots=slots,
                     decode_pos=torch.tensor([r[1] for r in rows[:nd]], **i32), prefill_cu=cu,
                     prefill_last=(cu[1:] - 1).long(), runtime=rt)
    if any(r[1] > 0 for r in pf):
        md.prefill_n0 = torch.tensor([r[1] for r in pf], **i32)
        md.prefill_first_slots, md.prefill_cont_slots = prefill_chunk_rows(slots[nd:],
                                                                           md.prefill_n0)
    return md


@pytest.mark.parametrize("shift,W", [(1, 3), (0, 2)])
def test_impl_chunked_prefill_matches_one_shot(shift, W):
    """Prompts in chunks through DMSCompactAttentionImpl.forward, mixed in one step with first
    chunks and decodes (a 1-token chunk runs as a decode row, as vLLM classifies it), then
    decoding: the same live sets and outputs (prompt and decode rows) as one-shot prefill, and
    the reference (every key on the FP8 grid; tolerance 3e-2 as above, 1e-2 between runs)."""
    H, G, D, P, steps = 2, 2, 32, 16, 4
    reqs = [(2, 14, [5, 1, 4, 4], 0), (1, 11, [3, 3, 5], 0), (3, 6, [6], 2)]  # slot, prompt,
    dms = _dms(shift, W, H, G, D)                                             # chunks, arrival
    lay = ArenaLayout(num_layers=1, num_kv_heads=H, head_dim=D, block_size=P, window=W,
                      max_num_seqs=3, max_model_len=64, num_blocks=0)
    lay = ArenaLayout(**{**lay.__dict__, "num_blocks": lay.first_data_block + 8})
    g = torch.Generator().manual_seed(7 * W + shift)
    seq = []
    for _, n, _, _ in reqs:
        T = n + steps
        x = dict(q=torch.randn(T, H * G, D, generator=g).to(torch.bfloat16),
                 k=torch.randn(T, H, D, generator=g).to(torch.bfloat16),
                 v=torch.randn(T, H, D, generator=g).to(torch.bfloat16),
                 lane=torch.where(torch.rand(T, H, generator=g) < 0.5, 0.3, -0.2))
        x["q"][:, ::G, D - 1] = x["lane"].to(torch.bfloat16)
        x["q0"] = x["q"].clone()
        x["q0"][:, ::G, D - 1] = 0
        x["flags"] = shifted_flags(x["lane"] > 0.05, shift)
        seq.append(x)
    impl = DMSCompactAttentionImpl(H * G, D, D ** -0.5, H)
    layer = types.SimpleNamespace(layer_name="l0")

    def run(schedule):
        """schedule: list of steps, each a list of (request, n_done, n_new); returns the arena,
        its runtime and {(request, position): output [Hq, D]}."""
        kv = torch.zeros(lay.num_blocks, lay.page_bytes, dtype=torch.uint8, device=DEV)
        rt = DMSRuntime(dms, lay, ["l0"], H * G, DEV)
        rt.init_arenas([kv])
        outs = {}
        for rows in schedule:
            rows = sorted(rows, key=lambda r: r[2] != 1)  # decode rows first
            cat = lambda key: torch.cat([seq[i][key][a:a + n] for i, a, n in rows])  # noqa
            N = sum(n for _, _, n in rows)
            out = torch.full((N, H * G * D), float("nan"), dtype=torch.bfloat16, device=DEV)
            impl.forward(layer, cat("q").reshape(N, -1).to(DEV), cat("k").reshape(N, -1).to(DEV),
                         cat("v").reshape(N, -1).to(DEV), kv,
                         _step_meta(rt, [(reqs[i][0], a, n) for i, a, n in rows]), out)
            out = out.view(N, H * G, D).float().cpu()
            st, o = arena_state(kv.view(-1), lay), 0
            for i, a, n in rows:
                s, b = seq[i], a + n
                for t in range(n):
                    outs[(i, a + t)] = out[o + t]
                # every row, prompt or decode, reads K/V on the arena's FP8 grid
                kq = s["k"][:b].float().to(torch.float8_e4m3fn).float()
                vq = s["v"][:b].float().to(torch.float8_e4m3fn).float()
                ref = dms_attention_reference(s["q0"][:b], kq, vq, s["flags"][:b].clone(), W,
                                              D ** -0.5)[a:]
                assert (out[o:o + n] - ref).abs().max() < 3e-2, (i, a, n)
                o += n
                fl = s["flags"][:b].clone()
                fl[-1] = fl[-1] if shift == 0 else False  # the newest flag is still pending
                want = live_counts(fl, W)[-1]
                assert torch.equal(st.row_len[reqs[i][0]].cpu().long(), want), (i, a, n)
        assert int(rt.overflow[0]) == 0
        assert torch.equal(rt.slot_live.cpu(), st.row_len.sum(1).cpu())
        return kv, outs

    chunked, pos, ci = [], [0] * len(reqs), [0] * len(reqs)  # chunks, then `steps` decodes
    for step in range(16):
        rows = []
        for i, (_, n, chunks, arrive) in enumerate(reqs):
            if step >= arrive and pos[i] < n + steps:
                m = chunks[ci[i]] if pos[i] < n else 1
                ci[i] += pos[i] < n
                rows.append((i, pos[i], m))
                pos[i] += m
        if rows:
            chunked.append(rows)
    lens = [n for _, n, _, _ in reqs]  # one-shot: each prompt in one step, then decode rows
    one_shot = [[(i, 0, n)] for i, n in enumerate(lens)]
    one_shot += [[(i, p, 1) for i, n in enumerate(lens) if n <= p < n + steps]
                 for p in range(min(lens), max(lens) + steps)]
    one_shot = [rows for rows in one_shot if rows]
    kv_c, out_c = run(chunked)
    kv_o, out_o = run(one_shot)
    for i, (slot, n, _, _) in enumerate(reqs):
        for p in range(n + steps):  # prompt rows too: chunking does not change what they read
            assert (out_c[(i, p)] - out_o[(i, p)]).abs().max() < 1e-2, (i, p)
        for h in range(H):  # the same rows: positions, flags, FP8 K/V (slot order may differ)
            rc, ro = arena_read_row(kv_c, lay, slot, h), arena_read_row(kv_o, lay, slot, h)
            ic, io = rc["pos"].argsort(), ro["pos"].argsort()
            for key in ("pos", "flag", "k", "v"):
                assert torch.equal(rc[key][ic], ro[key][io]), (i, h, key)


def test_builder_splits_first_and_continuation_chunks():
    """build() without a worker: n0 = seq_len - query_len (device tensors), first-chunk and
    continuation slots split; exact CPU seq_lens without continuations keep the one-shot path."""
    from vllm_dms.worker.backend import DMSMetadataBuilder
    lay = ArenaLayout(num_layers=1, num_kv_heads=2, head_dim=32, block_size=16, window=3,
                      max_num_seqs=3, max_model_len=64, num_blocks=0)
    lay = ArenaLayout(**{**lay.__dict__, "num_blocks": lay.first_data_block + 4})
    kv = torch.zeros(lay.num_blocks, lay.page_bytes, dtype=torch.uint8, device=DEV)
    rt = DMSRuntime(_dms(1, 3), lay, ["l0"], 4, DEV)
    rt.init_arenas([kv])
    b = object.__new__(DMSMetadataBuilder)  # only what build() reads
    b.runtime, b._kv_layers = rt, (lambda: [kv])
    from vllm_dms.worker.runtime import WorkerLink
    b.link = WorkerLink()  # no snapshot orders this step
    b._slots, b._pos = (torch.zeros(4, dtype=torch.int32, device=DEV) for _ in range(2))

    def cam(qsl, seq, slots, cpu_seq=True):
        t = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
        return types.SimpleNamespace(
            query_start_loc=t(qsl).to(DEV), query_start_loc_cpu=t(qsl), seq_lens=t(seq).to(DEV),
            seq_lens_cpu_upper_bound=t(seq) if cpu_seq else None, num_reqs=len(seq),
            num_actual_tokens=qsl[-1], max_query_len=max(x - y for x, y in zip(qsl[1:], qsl)),
            block_table_tensor=t([[s] for s in slots]).to(DEV))

    # a decode (slot 3), a first chunk of 5 (slot 1), a continuation of 4 after 6 (slot 2)
    for cpu_seq in (True, False):
        md = b.build(0, cam([0, 1, 6, 10], [9, 5, 10], [3, 1, 2], cpu_seq))
        assert (md.num_decodes, md.num_prefills, md.max_prefill_len) == (1, 2, 5)
        assert md.prefill_n0.tolist() == [0, 6] and md.prefill_cu.tolist() == [0, 5, 9]
        assert md.prefill_first_slots.tolist() == [1, 0]
        assert md.prefill_cont_slots.tolist() == [0, 2]
    md = b.build(0, cam([0, 1, 6], [9, 5], [3, 1]))  # first chunks only: the one-shot path
    assert md.prefill_cont_slots is None and md.prefill_n0 is None
    md = b.build(0, cam([0, 5], [5], [1], cpu_seq=False))  # unknown: chunk path, n0 = 0
    assert md.prefill_n0.tolist() == [0] and md.prefill_cont_slots.tolist() == [0]


@pytest.mark.parametrize("shift", [0, 1])
def test_impl_prefill_with_snapshot_order_packs_the_prefix(shift):
    """Scheduler snapshot orders (request slot, L, cache slot, tag), two for one request, reach
    the impl through DMSRuntime.order_snapshots: each cache slot's rows are the one-shot rows
    of the first L tokens (token L-1's flag final), the request's own rows are untouched, and
    each cache slot reports L tokens under its tag."""
    from vllm_dms.worker.kernels.pack import dms_prefill_pack
    H, G, D, P, W, n, slot = 2, 2, 32, 16, 3, 21, 1
    orders = [(slot, 16, 3, 5), (slot, 9, 2, 7)]
    dms = _dms(shift, W, H, G, D)
    lay, kv, rt = _arena_runtime(dms, P, 8)
    g = torch.Generator().manual_seed(70 + shift)
    q = torch.randn(n, H * G, D, generator=g).to(torch.bfloat16)
    k = torch.randn(n, H, D, generator=g).to(torch.bfloat16)
    lane = torch.where(torch.rand(n, H, generator=g) < 0.6, 0.3, -0.2).to(torch.bfloat16)
    q[:, ::G, D - 1] = lane
    md = _meta(rt, slot, 0, n, True)
    md.snap_starts, md.snap_len, md.snap_dst = rt.order_snapshots(orders, md.slots,
                                                                  md.prefill_cu)
    out = torch.empty(n, H * G * D, dtype=torch.bfloat16, device=DEV)
    impl = DMSCompactAttentionImpl(H * G, D, D ** -0.5, H)
    impl.forward(types.SimpleNamespace(layer_name="l0"), q.reshape(n, -1).to(DEV),
                 k.reshape(n, -1).to(DEV), k.reshape(n, -1).to(DEV), kv, md, out)
    fl = shifted_flags(lane.float() > 0.05, shift)
    i32 = dict(dtype=torch.int32, device=DEV)
    cases = [((L, c), fl[:L], c) for _, L, c, _ in orders] + [((n, slot), fl[:n].clone(), slot)]
    for rows, m, s in cases:
        if s == slot and shift == 1:
            m[-1] = False  # the request's last flag is pending; the snapshot's L-1 is not
        one = torch.zeros_like(kv)
        from vllm_dms.worker.kernels.arena_ops import arena_init
        arena_init(one.view(-1), lay)
        dms_prefill_pack(one, lay, k[:rows[0]].to(DEV), k[:rows[0]].to(DEV), m.to(DEV),
                         torch.tensor([0, rows[0]], **i32), torch.tensor([s], **i32),
                         torch.zeros(lay.num_slots, **i32), torch.zeros(1, **i32))
        for h in range(H):
            got, want = arena_read_row(kv, lay, s, h), arena_read_row(one, lay, s, h)
            for key in ("pos", "flag", "k", "v"):
                assert torch.equal(got[key], want[key]), (s, key, h)
    for _, L, c, tag in orders:
        assert int(rt.slot_ntok[c]) == L and int(rt.slot_tag[c]) == tag
    assert int(rt.overflow[0]) == 0


def test_snapshot_order_of_a_request_not_in_the_batch_reports_nothing():
    """An order whose request slot is not among this step's prefill rows is skipped (cache slot
    0) and its cache slot keeps its previous token count and tag: reporting L tokens under the
    new tag would tell the scheduler that empty rows are a ready snapshot."""
    lay, kv, rt = _arena_runtime(_dms(1, 3), 16, 8)
    rt.slot_ntok[2], rt.slot_tag[2] = 4, 9  # what the cache slot last reported
    md = _meta(rt, 1, 0, 21, True)
    starts, lens, dst = rt.order_snapshots([(1, 16, 3, 5), (2, 9, 2, 7)], md.slots,
                                           md.prefill_cu)
    assert dst.tolist() == [3, 0] and lens.tolist() == [16, 9]
    assert (int(rt.slot_ntok[3]), int(rt.slot_tag[3])) == (16, 5), "the packed one reports"
    assert (int(rt.slot_ntok[2]), int(rt.slot_tag[2])) == (4, 9), "the skipped one does not"
    assert int(rt.slot_ntok[0]) == 0, "nothing lands on the padding slot"


def test_backend_declares_only_what_the_kernels_and_startup_check_accept():
    from vllm_dms.worker.backend import DMSCompactAttentionBackend as B
    from vllm_dms.engine.config import DMS_MODEL_DTYPE, compact_head_size_ok
    assert B.supported_dtypes == [getattr(torch, DMS_MODEL_DTYPE)], "fp16 would die in a kernel"
    assert [d for d in range(8, 264, 8) if B.supports_head_size(d)] == list(range(16, 257, 16))
    assert not compact_head_size_ok(72)
