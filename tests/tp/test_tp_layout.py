"""Head sharding and decision-lane ownership under tensor parallelism (CPU, layout only).

These tests pin down the layout the TP path follows: every KV head on exactly one rank, its
borrowed lane (query head h*G, the first head of its group) on the same rank, and reservations
covering the fullest rank (also through the rows the ranks combine after each step). The engine
at TP=2 on vLLM's CPU platform: tests/test_cpu_executors.py; on GPUs it has not run yet.
"""
import pytest

from vllm_dms.engine.arena import ArenaLayout
from vllm_dms.engine.config import DMSConfig, DMSConfigError
from vllm_dms.engine.tp import rank_layout, reservation_over_ranks, shard_heads

SHAPES = {"llama-3.2-1b": (32, 8, 64, 16), "qwen3-8b": (32, 8, 128, 36)}


def _dms(name):
    hq, hkv, d, layers = SHAPES[name]
    return DMSConfig(arch="llama" if "llama" in name else "qwen3", num_layers=layers,
                     num_q_heads=hq, num_kv_heads=hkv, head_dim=d, window=256,
                     alpha_scale=100.0, alpha_offset=5.0, decision_shift=1, target_cr=8.0,
                     source="test")


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_every_head_and_its_lane_live_on_one_rank(name, tp):
    dms = _dms(name)
    ranks = shard_heads(dms, tp)
    kv_all = [h for r in ranks for h in r.kv_heads]
    q_all = [h for r in ranks for h in r.q_heads]
    assert sorted(kv_all) == list(range(dms.num_kv_heads)) and len(set(kv_all)) == len(kv_all)
    assert sorted(q_all) == list(range(dms.num_q_heads))
    for r in ranks:
        for i, h in enumerate(r.kv_heads):
            lane_head = h * dms.group
            assert lane_head in r.q_heads  # the decision is computed where the row lives
            assert r.q_heads[r.borrowed_local[i]] == lane_head
            # the whole GQA group of h is on this rank too
            assert set(range(lane_head, lane_head + dms.group)) <= set(r.q_heads)
        # the local model sees group G and lane index (local kv)*G, as the transform assumes
        assert r.borrowed_local == tuple(i * dms.group for i in range(len(r.kv_heads)))


@pytest.mark.parametrize("tp", [3, 16])
def test_tp_not_dividing_kv_heads_is_refused(tp):
    with pytest.raises(DMSConfigError, match="--tensor-parallel-size"):
        shard_heads(_dms("qwen3-8b"), tp)


def test_reservation_covers_the_fullest_rank():
    lay = ArenaLayout(num_layers=36, num_kv_heads=8, head_dim=128, block_size=64, window=512,
                      max_num_seqs=8, max_model_len=8320, num_blocks=4096)
    per_rank = rank_layout(lay, 2)
    assert per_rank.num_kv_heads == 4 and per_rank.page_bytes * 2 == lay.page_bytes
    # rank 0 keeps little, rank 1 keeps a lot: the ledger must reserve for rank 1
    measured = [(8192, 4 * 20), (8192, 4 * 120)]
    need = reservation_over_ranks(per_rank, 8193, measured)
    assert need == per_rank.reservation_blocks(8193, measured[1]) == 120 + 1
    assert need > per_rank.reservation_blocks(8193, measured[0])
    # an unmeasured rank forces the worst case (dense pages for the prompt)
    assert reservation_over_ranks(per_rank, 8192, [measured[0], None]) == 8192 // 64


def test_rows_combined_over_ranks_reserve_for_the_fullest_rank():
    import torch

    from vllm_dms.engine.channel import COLS
    from vllm_dms.worker.runtime import combine_ranks
    lay = rank_layout(ArenaLayout(num_layers=36, num_kv_heads=8, head_dim=128, block_size=64,
                                  window=512, max_num_seqs=8, max_model_len=8320,
                                  num_blocks=4096), 2)
    gathered = torch.zeros(2, lay.num_slots + 1, COLS, dtype=torch.int32)  # + overflow row
    gathered[:, 3] = torch.tensor([[8192, 4 * 20, 900, 5], [8192, 4 * 120, 4000, 5]])
    rows, _ = combine_ranks(gathered.view(-1, COLS), 2)
    n_done, pages, live, tag = rows[3].tolist()
    assert (n_done, live, tag) == (8192, 4900, 5), "live keys of both ranks' heads"
    per_rank = [(8192, 4 * 20), (8192, 4 * 120)]
    assert lay.reservation_blocks(8193, (n_done, pages)) == \
        reservation_over_ranks(lay, 8193, per_rank) == 121
