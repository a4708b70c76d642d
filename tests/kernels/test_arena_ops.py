"""Arena kernels: init, prefill pack (read back against the reference mask), release, overflow."""
import pytest
import torch
import triton
import triton.language as tl

from vllm_dms.engine.arena import ArenaLayout, cdiv
from vllm_dms.worker.kernels.arena_ops import arena_read_row, arena_state, dms_release
from vllm_dms.worker.kernels.common import _load_kv, _to_store, fp8_grid
from vllm_dms.worker.kernels.pack import dms_prefill_pack
from vllm_dms.tools.reference import dms_mask, live_counts, shifted_flags

AO = "vllm_dms.worker.kernels.arena_ops"


def to_bits(x: torch.Tensor, elem: int) -> torch.Tensor:
    """Store encoding of already-quantised fp32 values (exact re-encode, -0 kept)."""
    return x.to(torch.float8_e4m3fn if elem == 1 else torch.bfloat16).view(
        torch.uint8 if elem == 1 else torch.int16)


def make_batch(lengths, H, D, shift, gen, p_flag=0.5, device="cpu", scale=1.0):
    T = sum(lengths)
    k = (torch.randn(T, H, D, generator=gen) * scale).to(torch.bfloat16)
    v = (torch.randn(T, H, D, generator=gen) * scale).to(torch.bfloat16)
    flags = torch.cat([shifted_flags(torch.rand(n, H, generator=gen) < p_flag, shift)
                       for n in lengths]) if T else torch.zeros(0, H, dtype=torch.bool)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)
    return k.to(device), v.to(device), flags.to(device), cu.to(device)


def check_row(kit, kv, layout, slot, h, k, v, flags_req, start):
    """Row (slot, h) holds exactly the reference survivors of the chunk's last query."""
    n, W, E = flags_req.shape[0], layout.window, layout.elem_bytes
    row = arena_read_row(kv, layout, slot, h)
    st = arena_state(kv.view(-1), layout)
    want = (dms_mask(flags_req.cpu(), W, torch.tensor([n - 1]))[h, 0].nonzero().flatten()
            if n else torch.zeros(0))
    assert row["pos"].tolist() == want.tolist(), "survivors, dense and in position order"
    assert int(st.row_len[slot, h]) == len(want)
    assert int(st.row_npages[slot, h]) == cdiv(len(want), layout.block_size)
    idx = (start + want).long()
    for got, src in ((row["k"], k), (row["v"], v)):
        ref = kit.quantize_like_store(src[idx, h].cpu(), E)
        assert torch.equal(to_bits(got, E), to_bits(ref, E)), "K/V bytes == quantised inputs"
    assert torch.equal(row["flag"], flags_req[want.long(), h].cpu())
    ring = st.ring[slot, h].cpu()
    for r, p in enumerate(row["pos"].tolist()):
        if p >= n - W - 1:
            assert int(ring[p % (W + 1)]) == r, f"ring entry of token {p}"
    return row["pages"]


@triton.jit
def _codec_kernel(x_ptr, bits_ptr, all_bytes, dec_ptr, N, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < N
    tl.store(bits_ptr + i, _to_store(tl.load(x_ptr + i, mask=m, other=0.0), 1), mask=m)
    j = tl.arange(0, 256)
    tl.store(dec_ptr + j, _load_kv(all_bytes + j, j < 256, 1).to(tl.float32))


def test_fp8_codec_exhaustive(device):
    """Every bf16 value encodes to torch's e4m3fn(clamp(x, +-448)); every byte decodes."""
    x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    x = x.to(device)
    bits = torch.empty(x.numel(), dtype=torch.uint8, device=device)
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8).to(device)
    dec = torch.empty(256, dtype=torch.float32, device=device)
    _codec_kernel[(triton.cdiv(x.numel(), 4096),)](x, bits, every, dec, x.numel(), BLOCK=4096)
    ref = x.float().clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8)
    nan = x.isnan()
    assert torch.equal(bits[~nan], ref[~nan])
    assert bool(((bits[nan] & 0x7F) == 0x7F).all()), "NaN stays NaN"
    # what prompt rows read (fp8_grid) is exactly what the arena hands back for the same value
    grid = fp8_grid(x)
    assert grid.dtype == torch.bfloat16
    assert torch.equal(grid[~nan].float(), bits[~nan].view(torch.float8_e4m3fn).float())
    want = every.view(torch.float8_e4m3fn).float()
    ok = (dec == want) | (dec.isnan() & want.isnan())
    if not dec.is_cuda:  # the interpreter decodes the NaN bytes 0x7f/0xff as +-480
        ok |= want.isnan()
    bad = (~ok).nonzero().flatten().tolist()
    assert not bad, [(i, float(dec[i]), float(want[i])) for i in bad]


def test_arena_init(device, kit):
    lay = kit.make_layout()
    kv = kit.new_arena(lay, device)
    st = arena_state(kv.view(-1), lay)
    assert int(st.free_top[0]) == lay.num_data_subpages
    assert int(st.row_len.abs().sum()) == 0 and int(st.ring.abs().sum()) == 0
    kit.check_pages_conserved(kv, lay)


@pytest.mark.parametrize("elem", [1, 2])
@pytest.mark.parametrize("W,P", [(1, 4), (4, 4), (64, 16)])
@pytest.mark.parametrize("shift", [0, 1])
def test_pack_readback_and_release(device, kit, elem, W, P, shift):
    gen = torch.Generator().manual_seed(1000 * W + 10 * elem + shift)
    lay = kit.make_layout(W=W, P=P, elem=elem)
    H, D = lay.num_kv_heads, lay.head_dim
    kv = kit.new_arena(lay, device)
    st = arena_state(kv.view(-1), lay)
    lengths = [5, 17, 0, 1, 33]
    slots = torch.tensor([3, 1, 5, 0, 4], dtype=torch.int32, device=device)  # permuted; 0 = pad
    # scale 200 pushes values past +-448 so FP8 saturation is exercised
    k, v, flags, cu = make_batch(lengths, H, D, shift, gen, device=device, scale=200.0)
    layer_pages = torch.zeros(lay.num_slots, dtype=torch.int32, device=device)
    overflow = torch.zeros(1, dtype=torch.int32, device=device)
    live = torch.zeros(lay.num_slots, dtype=torch.int32, device=device)
    top0 = int(st.free_top[0])
    dms_prefill_pack(kv, lay, k, v, flags, cu, slots, layer_pages, overflow, live=live)
    assert int(overflow[0]) == 0
    # the live counter is the rows' live count summed over heads (padding slot 0 untouched)
    assert live.tolist() == st.row_len.sum(-1).tolist()
    taken = 0
    for b, n in enumerate(lengths):
        s, a = int(slots[b]), int(cu[b])
        if s <= 0:
            continue
        row_pages = 0
        for h in range(H):
            row_pages += len(check_row(kit, kv, lay, s, h, k, v, flags[a:a + n], a))
        assert int(layer_pages[s]) == row_pages
        taken += row_pages
    assert int(st.free_top[0]) == top0 - taken, "free_top drops by exactly the pages taken"
    assert int(layer_pages[0]) == 0 and int(st.row_len[0].abs().sum()) == 0, "padding skipped"
    kit.check_pages_conserved(kv, lay)

    rel = torch.tensor([4, 0, 1, 3, 5], dtype=torch.int32, device=device)  # permuted, padded
    dms_release(kv, lay, rel, layer_pages, live=live)
    assert int(st.free_top[0]) == top0 and int(live.abs().sum()) == 0
    assert int(st.row_len.abs().sum()) == 0 and int(st.row_npages.abs().sum()) == 0
    assert int(layer_pages.abs().sum()) == 0
    kit.check_pages_conserved(kv, lay)


def test_pack_noncontiguous_inputs(device, kit):
    """k/v as strided views of a fused qkv buffer, flags from a wider bool tensor's columns."""
    gen = torch.Generator().manual_seed(7)
    lay = kit.make_layout(H=2, D=16, P=4, W=2)
    kv = kit.new_arena(lay, device)
    lengths = [9, 4]
    T, H, D = sum(lengths), 2, 16
    qkv = torch.randn(T, 3 * H * D, generator=gen).to(torch.bfloat16).to(device)
    k = qkv[:, H * D:2 * H * D].view(T, H, D)
    v = qkv[:, 2 * H * D:].view(T, H, D)
    flags = (torch.rand(T, H, generator=gen) < 0.6).to(device)
    cu = torch.tensor([0, 9, 13], dtype=torch.int32, device=device)
    slots = torch.tensor([6, 2], dtype=torch.int32, device=device)
    lp = torch.zeros(lay.num_slots, dtype=torch.int32, device=device)
    ov = torch.zeros(1, dtype=torch.int32, device=device)
    dms_prefill_pack(kv, lay, k, v, flags, cu, slots, lp, ov)
    for b, n in enumerate(lengths):
        for h in range(H):
            a = int(cu[b])
            check_row(kit, kv, lay, int(slots[b]), h, k, v, flags[a:a + n], a)


def test_pack_overflow(device, kit):
    """A row that does not fit sets overflow, takes nothing and writes nothing."""
    gen = torch.Generator().manual_seed(3)
    lay = kit.make_layout(H=2, D=16, P=4, W=1, num_blocks=1)
    while lay.num_data_blocks != 2:  # the state region depends weakly on num_blocks
        lay = ArenaLayout(**{**lay.__dict__, "num_blocks": lay.first_data_block + 2})
    kv = kit.new_arena(lay, device)
    st = arena_state(kv.view(-1), lay)
    free0 = int(st.free_top[0])  # 2 blocks * 2 heads = 4 sub-pages of 4 slots
    # request 0 (slot 2) needs 2 pages per head (fits); request 1 (slot 1) needs 5 per head
    lengths = [6, 20]
    k, v, _, cu = make_batch(lengths, 2, 16, 0, gen, device=device)
    flags = torch.zeros(sum(lengths), 2, dtype=torch.bool, device=device)  # keep everything
    slots = torch.tensor([2, 1], dtype=torch.int32, device=device)
    lp = torch.zeros(lay.num_slots, dtype=torch.int32, device=device)
    ov = torch.zeros(1, dtype=torch.int32, device=device)
    live = torch.zeros(lay.num_slots, dtype=torch.int32, device=device)
    before = kv.clone()
    dms_prefill_pack(kv, lay, k[6:], v[6:], flags[6:], cu[1:] - 6, slots[1:], lp, ov, live=live)
    assert int(ov[0]) == 1 and int(live.abs().sum()) == 0, "a refused row counts nothing"
    assert torch.equal(kv, before), "nothing written for an overflowing row"
    ov.zero_()
    dms_prefill_pack(kv, lay, k, v, flags, cu, slots, lp, ov, live=live)
    assert live.tolist() == st.row_len.sum(-1).tolist()
    assert int(ov[0]) == 1 and st.free_top[1:3].tolist() == [0, 0], "debt repaid, count reset"
    assert st.row_len[1].tolist() == [0, 0] and int(lp[1]) == 0
    served = [h for h in range(2) if int(st.row_len[2, h])]
    if not kv.is_cuda:  # programs run in order: the row that fits is served; on a GPU a
        assert served == [0, 1]  # concurrent failed pop may starve it (the row stays empty)
    for h in served:
        check_row(kit, kv, lay, 2, h, k, v, flags[:6], 0)
    assert int(st.free_top[0]) == free0 - 2 * len(served)
    kit.check_pages_conserved(kv, lay)


def test_arena_kernels_compile_sm90(compile_sm90):
    ptr = {"arena": "*i32", "k_ptr": "*bf16", "v_ptr": "*bf16", "flags": "*u8", "dec": "*u8"}
    specs = []
    for P, D, E in [(16, 128, 1), (16, 96, 2)]:
        for has_live in (False, True):
            specs.append(("vllm_dms.worker.kernels.pack", "_reserve_kernel", dict(ptr), dict(
                P=P, BLOCK_PG=64, HAS_LIVE=has_live, HAS_LENS=has_live)))
            specs.append(("vllm_dms.worker.kernels.pack", "_scatter_kernel", dict(ptr), dict(
                P=P, D=D, ELEM=E, BLOCK_T=64, BLOCK_D=triton_np2(D), HAS_LENS=has_live)))
            for shift in (0, 1):  # decisions as bools (shift 0) or from bf16 carrier lanes
                dec = {"dec": "*bf16" if shift else "*u8", "a_scale": "fp32", "a_offset": "fp32"}
                specs.append((AO, "_decode_store_kernel", {**ptr, **dec}, dict(
                    SHIFT=shift, P=P, D=D, ELEM=E, BLOCK_D=triton_np2(D), HAS_LIVE=has_live,
                    FROM_LANE=bool(shift))))
    for has_live in (False, True):
        specs.append((AO, "_release_kernel", {}, dict(BLOCK_PG=64, HAS_LIVE=has_live)))
    for s in specs:  # every pointer arg not named above is an int32 array
        s[2].update({a: "*i32" for a in
                     "arena cu slots layer_pages live overflow pos cum lens".split()})
    compile_sm90(specs)


def triton_np2(x: int) -> int:
    return 1 << (x - 1).bit_length()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("seed", range(4))
def test_pack_overflow_concurrent(kit, seed):
    """Many rows race for a stack that holds about half of what they need: every row ends
    either exact or empty, no sub-page is handed out twice, release restores the stack."""
    dev, S, H, P = "cuda", 48, 8, 16
    gen = torch.Generator().manual_seed(seed)
    lay = kit.make_layout(H=H, D=64, P=P, W=16, S=S, max_len=400, num_blocks=1)
    lengths = torch.randint(1, 400, (S,), generator=gen).tolist()
    need = H * sum(cdiv(n, P) for n in lengths)  # flags all clear: every key survives
    while lay.num_data_subpages < need // 2:
        lay = ArenaLayout(**{**lay.__dict__, "num_blocks": lay.num_blocks + 8})
    kv = kit.new_arena(lay, dev)
    st = arena_state(kv.view(-1), lay)
    top0 = int(st.free_top[0])
    k, v, flags, cu = make_batch(lengths, H, 64, 0, gen, p_flag=0.0, device=dev)
    slots = torch.randperm(S, generator=gen).add(1).to(torch.int32).to(dev)
    lp = torch.zeros(lay.num_slots, dtype=torch.int32, device=dev)
    ov = torch.zeros(1, dtype=torch.int32, device=dev)
    dms_prefill_pack(kv, lay, k, v, flags, cu, slots, lp, ov)
    assert int(ov[0]) == 1
    kit.check_pages_conserved(kv, lay)
    rl = st.row_len.cpu()
    for b, n in enumerate(lengths):
        s = int(slots[b])
        for h in range(H):
            assert int(rl[s, h]) in (0, n), "a row is exact or empty"
        a = int(cu[b])
        for h in range(H):
            if int(rl[s, h]):
                check_row(kit, kv, lay, s, h, k, v, flags[a:a + n], a)
    assert int(st.free_top[0]) == top0 - int(st.row_npages.sum())
    dms_release(kv, lay, slots, lp)
    assert int(st.free_top[0]) == top0
    kit.check_pages_conserved(kv, lay)
