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

from vllm_dms.arena import ArenaLayout  # noqa: E402
from vllm_dms.backend import DMSCompactAttentionImpl, DMSMetadata  # noqa: E402
from vllm_dms.config import DMSConfig  # noqa: E402
from vllm_dms.kernels.arena_ops import arena_state  # noqa: E402
from vllm_dms.models.transform import DMSRotary  # noqa: E402
from vllm_dms.reference import dms_attention_reference, live_counts, shifted_flags  # noqa: E402
from vllm_dms.runtime import DMSRuntime  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _dms(shift: int, W: int, H=2, G=2, D=32) -> DMSConfig:
    return DMSConfig(arch="llama", num_layers=1, num_q_heads=H * G, num_kv_heads=H, head_dim=D,
                     window=W, alpha_scale=100.0, alpha_offset=5.0, decision_shift=shift,
                     target_cr=None, source="test")


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
    lay = ArenaLayout(num_layers=1, num_kv_heads=H, head_dim=D, block_size=P, window=W,
                      max_num_seqs=3, max_model_len=64, num_blocks=0)
    lay = ArenaLayout(**{**lay.__dict__, "num_blocks": lay.first_data_block + 6})
    kv = torch.zeros(lay.num_blocks, lay.page_bytes, dtype=torch.uint8, device=DEV)
    rt = DMSRuntime(dms, lay, ["l0"], H * G, DEV)
    rt.init_arenas([kv])
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
    ref_prompt = dms_attention_reference(q0[:prompt], k[:prompt], v[:prompt],
                                         shifted_flags(dec[:prompt], shift)
                                         if shift == 0 else
                                         torch.cat([dec[1:prompt], torch.zeros(1, H, dtype=torch.bool)]),
                                         W, D ** -0.5)
    assert (outs[0] - ref_prompt).abs().max() < 2e-2
    kq = k.float().to(torch.float8_e4m3fn).float()  # decode rows read FP8 K/V
    vq = v.float().to(torch.float8_e4m3fn).float()
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
