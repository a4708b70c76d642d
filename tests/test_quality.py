"""The quality harness on a tiny random model: metric identities and the cached greedy decoder."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from vllm_dms.config import DMSConfig
from vllm_dms.quality import (ROW_KEYS, compression, greedy_cached, logit_stats, make_prompts,
                              make_row, make_windows, merge_rows, score_reference)
from vllm_dms.reference import greedy_generate_reference, live_counts, reference_forward

VOCAB = 83


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))
    with torch.no_grad():  # wide init: lanes on both sides of the threshold, peaked logits
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.1)
    return m.eval()


def dms_for(model, window: int, shift: int = 1) -> DMSConfig:
    hf = model.config.to_dict()
    hf["architectures"] = ["LlamaForCausalLM"]
    hf.update(dms_window_size=window, dms_alpha_scale=100.0, dms_initial_alpha_offset=5.0,
              dms_cr=8, dms_decision_shift=shift)
    return DMSConfig.from_dicts(hf)


def windows(n=3, T=40, seed=1):
    return torch.randint(0, VOCAB, (n, T), generator=torch.Generator().manual_seed(seed))


def test_eviction_off_on_both_sides_gives_zero_kld_and_full_match(model):
    dms = dms_for(model, window=3)
    wins = windows()
    ne = reference_forward(model, dms, wins[0], evict=False)
    st = logit_stats(ne.logits, ne.logits, wins[0])
    assert st["n"] == 39 and st["kld"] == 0.0 and st["match"] == 39
    assert st["nll"] == st["nll_ref"]
    # a window no query can outgrow: eviction never bites, so DMS == no-evict exactly
    s = score_reference(model, dms_for(model, window=1000), wins)
    assert s["kld_vs_noevict"] == 0.0 and s["token_match"] == 1.0
    assert s["tokens_scored"] == 3 * 39 and s["ppl"] == s["ppl_noevict"]
    assert s["measured_compression"] == 1.0 and s["compression_per_layer"] == [1.0, 1.0]


def test_small_window_metrics_match_hand_computation(model):
    dms = dms_for(model, window=3)
    wins = windows()
    s = score_reference(model, dms, wins)
    lives, nll, kld, match = [], 0.0, 0.0, 0
    for ids in wins:
        ev = reference_forward(model, dms, ids)
        ne = reference_forward(model, dms, ids, evict=False)
        for layer in range(dms.num_layers):
            assert torch.equal(ev.live[layer], live_counts(ev.flags[layer], 3))
        lives.append(ev.live[:, -1].float())  # [L, H] after the last query
        lp = F.log_softmax(ev.logits[:-1], -1)
        lr = F.log_softmax(ne.logits[:-1], -1)
        nll -= lp[torch.arange(39), ids[1:]].sum().item()
        kld += F.kl_div(lp, lr, log_target=True, reduction="sum").item()
        match += (lp.argmax(-1) == lr.argmax(-1)).sum().item()
    live = torch.stack(lives)
    assert s["measured_compression"] == pytest.approx(40 / live.mean().item(), rel=1e-6)
    for layer, c in enumerate(s["compression_per_layer"]):
        assert c == pytest.approx(40 / live[:, layer].mean().item(), rel=1e-6)
    assert s["measured_compression"] > 1.5  # this model evicts: the live set really shrank
    assert s["ppl"] == pytest.approx(math.exp(nll / 117), rel=1e-5)
    assert s["kld_vs_noevict"] == pytest.approx(kld / 117, rel=1e-4, abs=1e-7)
    assert s["kld_vs_noevict"] > 0 and s["token_match"] == match / 117 < 1.0


def test_compression_helper():
    live = torch.tensor([[[4, 6], [10, 10]], [[2, 4], [10, 10]]])  # [windows, layers, heads]
    overall, per_layer = compression(live, 20)
    assert overall == pytest.approx(20 / 7) and per_layer == [5.0, 2.0]


@pytest.mark.parametrize("shift", [0, 1])
@pytest.mark.parametrize("evict", [True, False])
def test_cached_greedy_equals_reference_greedy(model, shift, evict):
    dms = dms_for(model, window=2, shift=shift)
    prompt = windows(1, 9, seed=7)[0]
    want, _ = greedy_generate_reference(model, dms, prompt, 12, evict=evict)
    got = greedy_cached(model, dms, prompt, 12, evict=evict)
    assert got.tolist() == want.tolist()


def test_windows_prompts_and_rows(tmp_path):
    toks = torch.arange(100)
    w = make_windows(toks, 3, 30)
    assert w.shape == (3, 30) and w[1, 0] == 30
    with pytest.raises(ValueError):
        make_windows(toks, 4, 30)
    ps = make_prompts(toks, 4, 10)
    assert len(ps) == 4 and all(p.numel() == 10 for p in ps)
    dms = DMSConfig.from_dicts(dict(
        architectures=["LlamaForCausalLM"], num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, hidden_size=64, dms_window_size=3, dms_alpha_scale=100.0,
        dms_initial_alpha_offset=5.0, dms_cr=8))
    scores = dict(measured_compression=3.0, kld_vs_noevict=0.1, token_match=0.9,
                  tokens_scored=10, ppl=5.0, ppl_noevict=4.0)
    row = make_row("m", "reference", dms, scores, 3.5, "2026-01-01", {"x": 1})
    assert tuple(k for k in row if k != "details") == ROW_KEYS
    assert row["cr_target"] == 8 and row["details"] == {"ppl_noevict": 4.0, "x": 1}
    out = str(tmp_path / "q.json")
    merge_rows(out, [row, dict(row, model="n")])
    merge_rows(out, [dict(row, ppl=6.0)])  # same (model, path) replaces the old row
    rows = json.load(open(out))
    assert [(r["model"], r["ppl"]) for r in rows] == [("n", 5.0), ("m", 6.0)]
