"""dms_fork_rows: a forked row is the source row (live set, K/V bytes, flags, ring, counters),
and the two continue identically under the same decode steps."""
import pytest
import torch

from vllm_dms.engine.arena import cdiv
from vllm_dms.worker.kernels.arena_ops import arena_read_row, arena_state, dms_decode_store, dms_release
from vllm_dms.worker.kernels.pack import dms_prefill_pack
from vllm_dms.worker.kernels.decode import decode_workspace, dms_decode_attention
from vllm_dms.worker.kernels.fork import dms_fork_rows
from vllm_dms.tools.reference import shifted_flags

HAS_CUDA = torch.cuda.is_available()


def setup(kit, device, *, H=2, D=16, P=4, W=3, elem=1, lens=(23, 9), shift=1, seed=0,
          num_blocks=None):
    g = torch.Generator().manual_seed(seed)
    lay = kit.make_layout(H=H, D=D, P=P, W=W, S=6, max_len=64, elem=elem, num_blocks=num_blocks)
    kv = kit.new_arena(lay, device)
    i32 = dict(dtype=torch.int32, device=device)
    lp, live, ov = (torch.zeros(n, **i32) for n in (lay.num_slots, lay.num_slots, 1))
    k = torch.randn(sum(lens), H, D, generator=g).to(torch.bfloat16).to(device)
    v = torch.randn(sum(lens), H, D, generator=g).to(torch.bfloat16).to(device)
    dec = torch.rand(sum(lens), H, generator=g) < 0.6
    cu_l = [0] + torch.tensor(lens).cumsum(0).tolist()
    fl = torch.cat([shifted_flags(dec[a:b], shift) for a, b in zip(cu_l, cu_l[1:])]).to(device)
    dms_prefill_pack(kv, lay, k, v, fl, torch.tensor(cu_l, **i32),
                     torch.arange(1, len(lens) + 1, **i32), lp, ov, live=live)
    return lay, kv, lp, live, ov, g


def rows_equal(kv, lay, a, b):
    st = arena_state(kv.view(-1), lay)
    assert torch.equal(st.row_len[a], st.row_len[b]) and torch.equal(st.ring[a], st.ring[b])
    for h in range(lay.num_kv_heads):
        ra, rb = arena_read_row(kv, lay, a, h), arena_read_row(kv, lay, b, h)
        for key in ("k", "v", "pos", "flag"):
            assert torch.equal(ra[key], rb[key]), (key, h)
        assert not set(ra["pages"]) & set(rb["pages"]), "a fork owns its own sub-pages"


def continue_chunk(kv, lay, k, d, shift, L, n, slot, lp, ov):
    """Prefill tokens [L, n) as a continuation chunk of rows (slot) holding tokens [0, L)."""
    from vllm_dms.worker.kernels.chunked import dms_chunk_flag_prev, dms_chunk_pack
    i32 = dict(dtype=torch.int32, device=kv.device)
    n0, s = torch.tensor([L], **i32), torch.tensor([slot], **i32)
    if shift == 1:  # the decision at L flags token L-1, pending until now
        dms_chunk_flag_prev(kv, lay, d[L:L + 1].to(kv.device), n0, s)
    dms_chunk_pack(kv, lay, k[L:n], k[L:n], shifted_flags(d[L:n], shift).to(kv.device),
                   torch.tensor([0, n - L], **i32), n0, s, lp, ov)


def assert_one_shot_rows(kit, kv, lay, k, d, shift, n, slot):
    """Rows (slot) hold what a one-shot prefill of tokens [0, n) packs (K = V = k)."""
    i32 = dict(dtype=torch.int32, device=kv.device)
    one = kit.new_arena(lay, kv.device)
    dms_prefill_pack(one, lay, k[:n], k[:n], shifted_flags(d[:n], shift).to(kv.device),
                     torch.tensor([0, n], **i32), torch.tensor([slot], **i32),
                     torch.zeros(lay.num_slots, **i32), torch.zeros(1, **i32))
    for h in range(lay.num_kv_heads):
        got, want = arena_read_row(kv, lay, slot, h), arena_read_row(one, lay, slot, h)
        og, ow = got["pos"].argsort(), want["pos"].argsort()
        for key in ("pos", "flag", "k", "v"):
            assert torch.equal(got[key][og], want[key][ow]), (slot, key, h)


@pytest.mark.parametrize("elem", [1, 2])
def test_fork_copies_rows_and_continues_identically(kit, device, elem):
    lay, kv, lp, live, ov, g = setup(kit, device, elem=elem)
    st = arena_state(kv.view(-1), lay)
    i32 = dict(dtype=torch.int32, device=device)
    H, D, G = lay.num_kv_heads, lay.head_dim, 2
    for step in range(5):  # decode on slot 1 first: rows reuse expired slots, ring moves
        kd = torch.randn(1, H, D, generator=g).to(torch.bfloat16).to(device)
        dms_decode_store(kv, lay, kd, kd, (torch.rand(1, H, generator=g) < 0.6).to(device),
                         torch.tensor([23 + step], **i32), torch.tensor([1], **i32), 1, lp, ov,
                         live=live)
    top0 = int(st.free_top[0])
    dms_fork_rows(kv, lay, torch.tensor([1, 0], **i32), torch.tensor([4, 5], **i32), lp, ov,
                  live=live)
    assert int(ov[0]) == 0 and int(st.row_len[5].sum()) == 0, "slot 0 pairs are skipped"
    rows_equal(kv, lay, 1, 4)
    assert int(lp[4]) == int(lp[1]) == sum(cdiv(int(n), lay.block_size) for n in st.row_len[1])
    assert int(live[4]) == int(live[1]) and int(st.free_top[0]) == top0 - int(lp[4])
    kit.check_pages_conserved(kv, lay)
    ws = decode_workspace(2, H * G, D, 3, device)
    for step in range(6):  # the same steps on source and fork: same outputs, same rows
        kd = torch.randn(1, H, D, generator=g).to(torch.bfloat16).repeat(2, 1, 1).to(device)
        d = (torch.rand(1, H, generator=g) < 0.6).repeat(2, 1).to(device)
        q = torch.randn(1, H * G, D, generator=g).to(torch.bfloat16).repeat(2, 1, 1).to(device)
        slots = torch.tensor([1, 4], **i32)
        dms_decode_store(kv, lay, kd, kd, d, torch.tensor([28 + step] * 2, **i32), slots, 1, lp,
                         ov, live=live)
        out = torch.empty_like(q)
        dms_decode_attention(q, kv, lay, slots, D ** -0.5, out, ws.acc, ws.m, ws.l)
        assert torch.equal(out[0], out[1])
        rows_equal(kv, lay, 1, 4)
    dms_release(kv, lay, torch.tensor([4], **i32), lp, live=live)
    assert int(lp[4]) == 0 and int(live[4]) == 0
    kit.check_pages_conserved(kv, lay)


def test_fork_without_room_raises_overflow_and_leaves_row_empty(kit, device):
    lay, kv, lp, live, ov, _ = setup(kit, device, lens=(40,), W=20)
    st = arena_state(kv.view(-1), lay)
    need = int(sum(cdiv(int(n), lay.block_size) for n in st.row_len[1]))
    i32 = dict(dtype=torch.int32, device=device)
    st.free_top[0] = need - 1  # hide the rest of the stack: the fork cannot get its pages
    dms_fork_rows(kv, lay, torch.tensor([1], **i32), torch.tensor([3], **i32), lp, ov,
                  live=live)
    assert int(ov[0]) == 1
    assert int(st.free_top[0]) >= 0, "a failed pop is repaid at the end of the launch"
    assert int(lp[3]) < need and int(live[3]) < int(live[1]), "no row is fully forked"
    for h in range(lay.num_kv_heads):
        if int(st.row_len[3, h]):  # a row that got its pages is a full copy
            assert torch.equal(arena_read_row(kv, lay, 3, h)["pos"],
                               arena_read_row(kv, lay, 1, h)["pos"])


def test_fork_compiles_sm90(compile_sm90):
    mod = "vllm_dms.worker.kernels.fork"
    ptr = {n: "*i32" for n in "arena src dst layer_pages live overflow".split()}
    compile_sm90([(mod, "_reserve_kernel", ptr, dict(P=64, BLOCK_PG=64, BLOCK_W=512,
                                                     HAS_LIVE=True)),
                  (mod, "_copy_kernel", ptr, dict(P=64, SLOT_B=260, KV_B=128, BLOCK_R=64,
                                                  BLOCK_B=128))])


@pytest.mark.parametrize("shift", [0, 1])
@pytest.mark.parametrize("L", [3, 17])
def test_prefix_snapshot_fork_then_continue_equals_one_shot(kit, device, shift, L):
    """The prefix-cache path at kernel level: the rows of a prefix of L tokens, forked into a
    new slot and continued with the rest of the prompt as a chunk, equal one-shot prefill rows
    of the whole prompt (positions, flags, K/V); the snapshot itself is left untouched."""
    from vllm_dms.worker.kernels.chunked import dms_chunk_flag_prev, dms_chunk_pack
    H, D, P, W, n = 2, 16, 4, 3, 30
    g = torch.Generator().manual_seed(7 + L + shift)
    lay = kit.make_layout(H=H, D=D, P=P, W=W, S=6, max_len=64)
    i32 = dict(dtype=torch.int32, device=device)
    k = torch.randn(n, H, D, generator=g).to(torch.bfloat16).to(device)
    v = torch.randn(n, H, D, generator=g).to(torch.bfloat16).to(device)
    d = torch.rand(n, H, generator=g) < 0.6

    def fresh(slot, m):  # one-shot prefill of the first m tokens into `slot` of a new arena
        kv = kit.new_arena(lay, device)
        lp, ov = torch.zeros(lay.num_slots, **i32), torch.zeros(1, **i32)
        dms_prefill_pack(kv, lay, k[:m], v[:m], shifted_flags(d[:m], shift).to(device),
                         torch.tensor([0, m], **i32), torch.tensor([slot], **i32), lp, ov)
        return kv, lp, ov

    kv, lp, ov = fresh(1, L)              # the snapshot (a cache slot)
    dms_fork_rows(kv, lay, torch.tensor([1], **i32), torch.tensor([2], **i32), lp, ov)
    n0, s2 = torch.tensor([L], **i32), torch.tensor([2], **i32)
    if shift == 1:  # the decision at L flags token L-1, pending in the snapshot
        dms_chunk_flag_prev(kv, lay, d[L:L + 1].to(device), n0, s2)
    dms_chunk_pack(kv, lay, k[L:], v[L:], shifted_flags(d[L:], shift).to(device),
                   torch.tensor([0, n - L], **i32), n0, s2, lp, ov)
    assert int(ov[0]) == 0
    one, _, _ = fresh(3, n)
    snap, _, _ = fresh(1, L)
    for h in range(H):
        got, want = arena_read_row(kv, lay, 2, h), arena_read_row(one, lay, 3, h)
        og, ow = got["pos"].argsort(), want["pos"].argsort()
        for key in ("pos", "flag", "k", "v"):
            assert torch.equal(got[key][og], want[key][ow]), (key, h)
        src, ref = arena_read_row(kv, lay, 1, h), arena_read_row(snap, lay, 1, h)
        for key in ("pos", "flag", "k", "v"):
            assert torch.equal(src[key], ref[key]), ("snapshot changed", key, h)


@pytest.mark.parametrize("shift", [0, 1])
def test_decoded_rows_then_continuation_equals_one_shot(kit, device, shift):
    """The prefix-reuse hit path (vllm_dms.engine.prefix_cache): a request prefills L0 tokens and
    decodes up to L; a follow-up prompt takes its rows and prefills [L, n) as a continuation
    chunk. The rows equal a one-shot prefill of all n tokens (positions, flags, K/V)."""
    H, D, P, W, L0, L, n = 2, 16, 4, 3, 11, 19, 33
    g = torch.Generator().manual_seed(40 + shift)
    lay = kit.make_layout(H=H, D=D, P=P, W=W, S=6, max_len=64)
    i32 = dict(dtype=torch.int32, device=device)
    k = torch.randn(n, H, D, generator=g).to(torch.bfloat16).to(device)
    d = torch.rand(n, H, generator=g) < 0.6
    kv = kit.new_arena(lay, device)
    lp, ov = torch.zeros(lay.num_slots, **i32), torch.zeros(1, **i32)
    s = torch.tensor([2], **i32)
    dms_prefill_pack(kv, lay, k[:L0], k[:L0], shifted_flags(d[:L0], shift).to(device),
                     torch.tensor([0, L0], **i32), s, lp, ov)
    for q in range(L0, L):  # decode: the decision at q (shift 1: it flags q-1)
        dms_decode_store(kv, lay, k[q:q + 1], k[q:q + 1], d[q:q + 1].to(device),
                         torch.tensor([q], **i32), s, shift, lp, ov)
    continue_chunk(kv, lay, k, d, shift, L, n, 2, lp, ov)
    assert int(ov[0]) == 0
    assert_one_shot_rows(kit, kv, lay, k, d, shift, n, 2)


@pytest.mark.parametrize("shift", [0, 1])
def test_snapshot_pack_during_prefill_then_continue_equals_one_shot(kit, device, shift):
    """A prefix snapshot taken while a prompt is prefilled (dms_prefill_pack with lens, into a
    cache slot, from the same chunk), continued later as a chunk, equals one-shot rows of the
    longer prompt; the request's own rows are the one-shot rows of its prompt."""
    H, D, P, W, L, n, n2 = 2, 16, 4, 3, 20, 29, 41
    g = torch.Generator().manual_seed(60 + shift)
    lay = kit.make_layout(H=H, D=D, P=P, W=W, S=6, max_len=64)
    i32 = dict(dtype=torch.int32, device=device)
    k = torch.randn(n2, H, D, generator=g).to(torch.bfloat16).to(device)
    d = torch.rand(n2, H, generator=g) < 0.6
    kv = kit.new_arena(lay, device)
    lp, ov = torch.zeros(lay.num_slots, **i32), torch.zeros(1, **i32)
    fl = shifted_flags(d[:n], shift).to(device)  # the request's prompt is n tokens
    cu = torch.tensor([0, n], **i32)
    dms_prefill_pack(kv, lay, k[:n], k[:n], fl, cu, torch.tensor([1], **i32), lp, ov)
    dms_prefill_pack(kv, lay, k[:n], k[:n], fl, cu, torch.tensor([4], **i32), lp, ov,
                     lens=torch.tensor([L], **i32))  # snapshot of its first L tokens
    continue_chunk(kv, lay, k, d, shift, L, n2, 4, lp, ov)  # another, longer prompt
    assert int(ov[0]) == 0
    assert_one_shot_rows(kit, kv, lay, k, d, shift, n, 1)
    assert_one_shot_rows(kit, kv, lay, k, d, shift, n2, 4)
    kit.check_pages_conserved(kv, lay)
