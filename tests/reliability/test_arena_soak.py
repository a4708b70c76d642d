"""C.4 row 16 (CPU part): an abort-storm soak on the arena itself, through the real kernels.

Random admissions (prefill pack), decode steps and aborts (release) of random slots, mixed
in one stream. Every step: live counts equal the reference for every active row, and every
data sub-page is on the free stack or in exactly one row. At the end the free stack is back to
its initial size (FastDMS's soak invariant). The scheduler-side ledger under 10,000 random
events is tests/test_admission_events.py; the 30-60 minute GPU soak is tests/reliability/
test_gpu_e2e.py::test_r16_abort_storm_soak.
"""
import random

import torch

from vllm_dms.worker.kernels.arena_ops import arena_state, dms_decode_store, dms_release
from vllm_dms.worker.kernels.pack import dms_prefill_pack
from vllm_dms.tools.reference import live_counts, shifted_flags

H, D, P, W, S, MAX_LEN = 2, 16, 4, 3, 6, 40


def test_r16_arena_abort_storm_returns_to_initial_free_stack(kit, device):
    rng = random.Random(16)
    gen = torch.Generator().manual_seed(16)
    lay = kit.make_layout(H=H, D=D, P=P, W=W, S=S, max_len=MAX_LEN)
    kv = kit.new_arena(lay, device)
    st = arena_state(kv.view(-1), lay)
    top0 = int(st.free_top[0])
    lp = torch.zeros(lay.num_slots, dtype=torch.int32, device=device)
    ov = torch.zeros(1, dtype=torch.int32, device=device)
    active: dict[int, torch.Tensor] = {}  # slot -> decisions so far [n, H]
    shift, counts = 1, dict(admit=0, decode=0, abort=0)

    def i32(x):
        return torch.tensor(x, dtype=torch.int32, device=device)

    def release(slots):
        dms_release(kv, lay, i32(slots), lp)
        for s in slots:
            del active[s]

    for _ in range(120):
        x, free = rng.random(), [s for s in range(1, S + 1) if s not in active]
        if x < 0.3 and free:
            s, n = rng.choice(free), rng.randint(1, 16)
            d = torch.rand(n, H, generator=gen) < 0.5
            k = torch.randn(n, H, D, generator=gen).to(torch.bfloat16).to(device)
            dms_prefill_pack(kv, lay, k, k, shifted_flags(d, shift).to(device), i32([0, n]),
                             i32([s]), lp, ov)
            active[s], counts["admit"] = d, counts["admit"] + 1
        elif x < 0.8 and active:
            slots = [s for s in active if active[s].shape[0] < MAX_LEN]
            if not slots:
                continue
            d = torch.rand(len(slots), H, generator=gen) < 0.5
            k = torch.randn(len(slots), H, D, generator=gen).to(torch.bfloat16).to(device)
            pos = i32([active[s].shape[0] for s in slots])
            dms_decode_store(kv, lay, k, k, d.to(device), pos, i32(slots), shift, lp, ov)
            for j, s in enumerate(slots):
                active[s] = torch.cat([active[s], d[j:j + 1]])
            counts["decode"] += 1
        elif active:
            release(rng.sample(sorted(active), rng.randint(1, len(active))))
            counts["abort"] += 1
        assert int(ov[0]) == 0
        for s, d in active.items():
            flags = shifted_flags(d, shift)  # the newest key's flag is not known yet (shift 1)
            assert st.row_len[s].tolist() == live_counts(flags, W)[-1].tolist(), s
        kit.check_pages_conserved(kv, lay)
    release(sorted(active))
    assert int(st.free_top[0]) == top0 and int(lp.abs().sum()) == 0
    assert int(st.row_len.abs().sum()) == 0 and int(st.row_npages.abs().sum()) == 0
    assert min(counts.values()) > 5, counts
