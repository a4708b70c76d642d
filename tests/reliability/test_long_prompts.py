"""C.4 row 17: prompt-length boundaries on the arena side, through the real kernels (Triton's
interpreter on CPU): 1 token, sub-page boundaries P-1 / P / P+1, W, W+1, W+2, and a request of
exactly max_model_len in the tightest arena admission allows.

* live counts equal the reference (``tests/kernels/test_decode.simulate`` checks every step);
* prompts of at most W+1 tokens keep every token and attend exactly like no-evict;
* a max_model_len request fills exactly its unmeasured reservation; one token more is refused by
  the kernel's capacity check (overflow flag, arena unchanged), never written out of bounds.
"""
import pytest
import torch
from test_decode import simulate

from vllm_dms.engine.arena import ArenaLayout, cdiv
from vllm_dms.worker.kernels.arena_ops import arena_state, dms_decode_store
from vllm_dms.worker.kernels.pack import dms_prefill_pack
from vllm_dms.worker.kernels.prefill import dms_prefill_attention
from vllm_dms.tools.reference import dms_attention_reference, live_counts, shifted_flags

H, G, D, P, W = 2, 2, 32, 4, 9  # W is not a multiple of P: window and page edges differ
BOUNDARIES = sorted({1, P - 1, P, P + 1, 2 * P, 2 * P + 1, W, W + 1, W + 2})


@pytest.mark.parametrize("shift", [0, 1])
@pytest.mark.parametrize("n", BOUNDARIES)
def test_r17_boundary_prompt_then_decode_matches_reference(kit, device, n, shift):
    simulate(kit, device, H=H, G=G, D=D, P=P, W=W, shift=shift, elem=1, prompts=[n], steps=3,
             slot_ids=[2], num_splits=2, seed=100 * n + shift)


def _pack_one(kit, device, n, dec, shift, lay=None):
    lay = lay or kit.make_layout(H=H, D=D, P=P, W=W, S=3, max_len=4 * W)
    kv = kit.new_arena(lay, device)
    gen = torch.Generator().manual_seed(n)
    k, v = (torch.randn(n, H, D, generator=gen).to(torch.bfloat16).to(device) for _ in "kv")
    flags = shifted_flags(dec, shift).to(device)
    lp = torch.zeros(lay.num_slots, dtype=torch.int32, device=device)
    ov = torch.zeros(1, dtype=torch.int32, device=device)
    cu = torch.tensor([0, n], dtype=torch.int32, device=device)
    dms_prefill_pack(kv, lay, k, v, flags, cu, torch.tensor([1], dtype=torch.int32,
                                                            device=device), lp, ov)
    assert int(ov[0]) == 0
    return lay, kv, k, v, flags, lp, ov


@pytest.mark.parametrize("shift", [0, 1])
@pytest.mark.parametrize("n", [1, P, W, W + 1])
def test_r17_near_window_prompt_keeps_everything_like_no_evict(kit, device, n, shift):
    dec = torch.ones(n, H, dtype=torch.bool)  # every decision says evict: the hardest case
    lay, kv, k, v, flags, _, _ = _pack_one(kit, device, n, dec, shift)
    st = arena_state(kv.view(-1), lay)
    assert st.row_len[1].tolist() == [n] * H  # nothing can leave a window of W+1 queries
    q = torch.randn(n, H * G, D, generator=torch.Generator().manual_seed(7)).to(
        torch.bfloat16).to(device)
    cu = torch.tensor([0, n], dtype=torch.int32, device=device)
    out_dms, out_none = (torch.empty(n, H * G, D, dtype=torch.bfloat16, device=device)
                         for _ in range(2))
    dms_prefill_attention(q, k, v, flags, cu, n, W, D ** -0.5, out_dms)
    dms_prefill_attention(q, k, v, torch.zeros_like(flags), cu, n, W, D ** -0.5, out_none)
    assert torch.equal(out_dms, out_none)  # identical to no-evict, not merely close
    ref = dms_attention_reference(q.cpu(), k.cpu(), v.cpu(), torch.zeros(n, H, dtype=torch.bool),
                                  W, D ** -0.5)
    assert (out_dms.float().cpu() - ref).abs().max() <= 2e-2


@pytest.mark.parametrize("shift", [0, 1])
def test_r17_first_prompt_past_the_window_evicts(kit, device, shift):
    n = W + 2  # the oldest flagged key is W+1 queries behind the last one
    dec = torch.ones(n, H, dtype=torch.bool)
    lay, kv, *_ = _pack_one(kit, device, n, dec, shift)
    want = live_counts(shifted_flags(dec, shift), W)[-1]
    st = arena_state(kv.view(-1), lay)
    assert st.row_len[1].tolist() == want.tolist() == [n - 1] * H


def _tight_layout(max_len: int) -> ArenaLayout:
    """State region plus exactly one unmeasured max_len reservation: the least admission allows."""
    lay = ArenaLayout(num_layers=1, num_kv_heads=H, head_dim=D, block_size=P, window=W,
                      max_num_seqs=2, max_model_len=max_len, num_blocks=1)
    for _ in range(10):  # the state region grows with num_blocks (free stack): iterate
        nb = lay.first_data_block + lay.max_request_blocks()
        if nb == lay.num_blocks:
            return lay
        lay = ArenaLayout(**{**lay.__dict__, "num_blocks": nb})
    raise AssertionError("layout did not settle")


@pytest.mark.parametrize("max_len", [8 * P, 8 * P + 1])  # ends on / just past a page edge
def test_r17_max_model_len_request_fills_its_reservation_exactly(kit, device, max_len):
    lay = _tight_layout(max_len)
    keep = torch.zeros(max_len - 1, H, dtype=torch.bool)  # no eviction: the dense worst case
    _, kv, _, _, _, lp, ov = _pack_one(kit, device, max_len - 1, keep, 0, lay=lay)
    one = torch.ones(1, H, D, dtype=torch.bfloat16, device=device)
    no = torch.zeros(1, H, dtype=torch.bool, device=device)
    slot = torch.tensor([1], dtype=torch.int32, device=device)
    dms_decode_store(kv, lay, one, one, no, torch.tensor([max_len - 1], dtype=torch.int32,
                     device=device), slot, 0, lp, ov)
    st = arena_state(kv.view(-1), lay)
    assert int(ov[0]) == 0 and st.row_len[1].tolist() == [max_len] * H
    assert int(lp[1]) == H * cdiv(max_len, P) == H * lay.max_request_blocks()
    assert int(st.free_top[0]) == lay.num_data_subpages - int(lp[1])
    kit.check_pages_conserved(kv, lay)
    if max_len % P == 0:  # the arena is now full: a token past max_model_len is refused
        assert int(st.free_top[0]) == 0
        before = kv.clone()
        dms_decode_store(kv, lay, one, one, no, torch.tensor([max_len], dtype=torch.int32,
                         device=device), slot, 0, lp, ov)
        assert int(ov[0]) == 1 and torch.equal(kv, before)
