"""DMS prefill attention vs the dense fp32 reference.

Tolerance (bf16 inputs, bf16 output, fp32 reference on the same bf16 inputs):
max abs err <= 2e-2 and ||out - ref|| / ||ref|| < 1e-2.
"""
import pytest
import torch

from vllm_dms.worker.kernels.prefill import dms_prefill_attention
from vllm_dms.tools.reference import dms_attention_reference, shifted_flags

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
ATOL, RTOL = 2e-2, 1e-2


def run_case(lengths, H, G, D, W, shift, seed, device, p_flag=0.5, strided=False,
             carrier=False):
    """carrier: q's borrowed lanes hold junk (decision carriers) that the kernel must read as 0;
    the reference gets them zeroed."""
    gen = torch.Generator().manual_seed(seed)
    T, Hq = sum(lengths), H * G
    if strided:  # q/k/v as views of one fused qkv row, as vLLM hands them over
        qkv = torch.randn(T, (Hq + 2 * H) * D, generator=gen).to(torch.bfloat16).to(device)
        q = qkv[:, :Hq * D].view(T, Hq, D)
        k = qkv[:, Hq * D:(Hq + H) * D].view(T, H, D)
        v = qkv[:, (Hq + H) * D:].view(T, H, D)
    else:
        q = torch.randn(T, Hq, D, generator=gen).to(torch.bfloat16).to(device)
        k = torch.randn(T, H, D, generator=gen).to(torch.bfloat16).to(device)
        v = torch.randn(T, H, D, generator=gen).to(torch.bfloat16).to(device)
    dec = torch.rand(T, H, generator=gen) < p_flag
    # flags are shifted per request: a request's last key owns no decision under shift 1
    cu_l = [0] + torch.tensor(lengths).cumsum(0).tolist()
    flags = torch.cat([shifted_flags(dec[a:b], shift) for a, b in zip(cu_l, cu_l[1:])]).to(device)
    cu = torch.tensor(cu_l, dtype=torch.int32, device=device)
    out = torch.full((T, Hq, D), float("nan"), dtype=torch.bfloat16, device=device)
    scale = D ** -0.5
    q_ref = q
    if carrier:
        q_ref = q.clone()
        q_ref[:, ::G, D - 1] = 0
        q[:, ::G, D - 1] = 40.0  # would dominate every score if it were read
    dms_prefill_attention(q, k, v, flags, cu, max(lengths), W, scale, out, carrier=carrier)
    for a, b in zip(cu_l, cu_l[1:]):
        if b == a:
            continue
        ref = dms_attention_reference(q_ref[a:b].cpu(), k[a:b].cpu(), v[a:b].cpu(),
                                      flags[a:b].cpu(), W, scale)
        got = out[a:b].float().cpu()
        err = (got - ref).abs().max().item()
        rel = ((got - ref).norm() / ref.norm()).item()
        assert err <= ATOL and rel < RTOL, f"request [{a},{b}): max err {err}, rel {rel}"


@pytest.mark.parametrize("W", [1, 4, 64])  # 64 >= every length: plain causal
@pytest.mark.parametrize("shift", [0, 1])
@pytest.mark.parametrize("G", [1, 3])
def test_prefill_matches_reference(device, W, shift, G):
    run_case([1, 13, 0, 37], H=2, G=G, D=32, W=W, shift=shift, seed=W * 10 + shift + 100 * G,
             device=device)


def test_prefill_strided_inputs_and_odd_head_dim(device):
    run_case([19, 6], H=2, G=2, D=48, W=3, shift=1, seed=5, device=device, strided=True)


@pytest.mark.parametrize("G", [1, 3])
def test_prefill_reads_carrier_lane_as_zero(device, G):
    """The impl hands over q with the decision carriers still in the borrowed lanes."""
    run_case([21, 9], H=2, G=G, D=32, W=4, shift=0, seed=17, device=device, carrier=True)


@pytest.mark.parametrize("p_flag", [0.0, 1.0])
def test_prefill_all_or_no_flags(device, p_flag):
    """All flagged: every query sees only its last W+1 keys (far tiles are skipped)."""
    run_case([45], H=1, G=4, D=16, W=2, shift=0, seed=9, device=device, p_flag=p_flag)


def test_prefill_compiles_sm90(compile_sm90):
    ptr = {n: "*bf16" for n in ("q_ptr", "k_ptr", "v_ptr", "out_ptr")}
    ptr.update(flags="*u8", cu="*i32", surv="*i32", cum="*i32", qk_scale="fp32")
    specs = []
    for G, D, br, bn in [(3, 128, 64, 64), (8, 256, 64, 32)]:
        specs.append(("vllm_dms.worker.kernels.prefill", "_prefill_attn_kernel", ptr,
                      dict(G=G, TM=br // G, D=D, BLOCK_R=br, BLOCK_N=bn, BLOCK_D=D,
                           F32=False, CARRIER=G == 3)))
    compile_sm90(specs)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("G", [3, 4])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("W", [1, 16, 256])
@pytest.mark.parametrize("shift", [0, 1])
def test_prefill_gpu_matrix(G, D, W, shift):
    run_case([1, 300, 77, 1030, 0, 513], H=4, G=G, D=D, W=W, shift=shift,
             seed=G * 1000 + D + W + shift, device="cuda", strided=(W == 16), carrier=(W != 1))


def test_survivor_index_lists_unflagged_keys_per_head():
    from vllm_dms.worker.kernels.prefill import survivor_index
    g = torch.Generator().manual_seed(4)
    flags = torch.rand(37, 3, generator=g) < 0.7
    surv, cum = survivor_index(flags)
    for h in range(3):
        keep = (~flags[:, h]).nonzero().flatten()
        assert surv[h, :keep.numel()].tolist() == keep.tolist()
        assert cum[h].tolist() == [0] + (~flags[:, h]).int().cumsum(0).tolist()


@pytest.mark.parametrize("p_flag", [0.3, 0.9])
def test_prefill_long_prompts_use_survivor_lists(device, p_flag):
    """Prompts several tiles long with W well below them: most key tiles are 'far' and read
    through the survivor lists; two requests in one batch check the per-request offsets."""
    run_case([150, 97], H=2, G=2, D=16, W=5, shift=1, seed=21, device=device, p_flag=p_flag)
