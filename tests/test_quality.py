"""The quality harness on a tiny random model: metric identities and the cached greedy decoder."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from vllm_dms.engine.config import DMSConfig
from vllm_dms.tools.quality import (DMS_FP8_KEYS, ROW_KEYS, base_ppl, compression, greedy_cached,
                                    logit_stats, make_prompts, make_row, make_windows, merge_rows,
                                    score_dms_fp8, score_reference)
from vllm_dms.tools.quality_vllm import VllmScores, WindowLogprobs, topk_of
from vllm_dms.tools.reference import greedy_generate_reference, live_counts, reference_forward

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
    row = make_row("m", "reference", dms, 1024, scores, 3.5, "2026-01-01", {"x": 1})
    assert tuple(k for k in row if k != "details") == ROW_KEYS
    assert row["cr_target"] == 8 and row["details"] == {"kld_vs_noevict": 0.1, "x": 1}
    assert row["context"] == 1024 and row["ppl_noevict"] == 4.0 and row["kld_vs_base"] is None
    out = str(tmp_path / "q.json")
    merge_rows(out, [row, dict(row, model="n")])
    merge_rows(out, [dict(row, ppl=6.0)])  # same (model, path) replaces the old row
    rows = json.load(open(out))
    assert [(r["model"], r["ppl"]) for r in rows] == [("n", 5.0), ("m", 6.0)]


# ------------------------------------------------------------------ the dms_fp8 path, engine faked
def fake_vllm_scores(model, dms, wins, top_k, live=True) -> VllmScores:
    """What a perfect engine would return: the evict reference's own top-k and live counts (K/V
    on the FP8 grid, as dms_fp8 reads them)."""
    out, lives = [], []
    for ids in wins:
        ev = reference_forward(model, dms, ids, evict=True, kv_fp8=True)
        lp = F.log_softmax(ev.logits[:-1].double(), -1)
        out.append(WindowLogprobs(lp[torch.arange(ids.numel() - 1), ids[1:]],
                                  *topk_of(ev.logits[:-1], top_k)))
        lives.append(ev.live[:, -1])
    return VllmScores(out, torch.stack(lives) if live else None, "" if live else "why", {})


def test_dms_fp8_scores_of_an_engine_equal_to_the_reference(model):
    dms, wins = dms_for(model, window=3), windows()
    ref = score_reference(model, dms, wins, kv_fp8=True)
    s = score_dms_fp8(model, dms, wins, fake_vllm_scores(model, dms, wins, 5), top_k=5)
    assert s["kld_vs_reference_evict"] == 0.0 and s["token_match_vs_reference_evict"] == 1.0
    assert s["kld_support"] == "top5+tail" and s["tokens_scored"] == 117
    # same lens, same numbers; the lens only loses divergence
    assert s["kld_vs_noevict"] == s["reference_kld_vs_noevict_topk"]
    assert 0 < s["kld_vs_noevict"] < s["reference_kld_vs_noevict"]
    assert s["reference_kld_vs_noevict"] == pytest.approx(ref["kld_vs_noevict"], rel=1e-6)
    assert s["token_match"] == s["reference_token_match"] == ref["token_match"] < 1.0
    assert s["ppl"] == pytest.approx(ref["ppl"], rel=1e-5) == s["reference_ppl"]
    assert s["ppl_noevict"] == pytest.approx(ref["ppl_noevict"], rel=1e-6)
    assert s["measured_compression"] == ref["measured_compression"] == s["reference_compression"]
    assert s["measured_compression_source"] == "engine_arena" and s["engine_live_match"] == 1.0


def test_dms_fp8_compression_source(model):
    dms, wins = dms_for(model, window=3), windows(n=2)
    vs = fake_vllm_scores(model, dms, wins, 5, live=False)
    s = score_dms_fp8(model, dms, wins, vs, top_k=5)
    assert s["measured_compression"] == s["reference_compression"] > 1.5
    assert s["measured_compression_source"] == "reference_evict (same windows); why"
    assert "engine_live_match" not in s
    vs.live = fake_vllm_scores(model, dms, wins, 5).live + 1  # one more key live everywhere
    s = score_dms_fp8(model, dms, wins, vs, top_k=5)
    assert s["engine_live_match"] == 0.0
    assert s["measured_compression"] < s["reference_compression"]


def _fake_engine(monkeypatch, quality, seen, perfect_for=None):
    """open_engine / score_vllm faked: the engine returns the evict reference's own top-k (DMS)
    or the base's (the floor paths)."""
    def fake_open(model_dir, max_len, top_k, kv, **kw):
        seen.update(open=(model_dir, max_len, top_k, kv, kw))
        return ("llm", dict(kv_cache_dtype=kv))

    def fake_score(model_dir, wins, *, top_k, kv_cache_dtype, engine):
        seen.setdefault("scored", []).append((model_dir, wins.shape, kv_cache_dtype, engine))
        m = quality._load(model_dir, "cpu")
        if kv_cache_dtype == "dms_fp8":
            return fake_vllm_scores(m, DMSConfig.from_checkpoint(model_dir), wins, top_k)
        out = []
        for ids in wins:
            lg = quality.base_logits(m, ids)
            lp = F.log_softmax(lg[:-1].double(), -1)
            out.append(WindowLogprobs(lp[torch.arange(ids.numel() - 1), ids[1:]],
                                      *topk_of(lg[:-1], top_k)))
        return VllmScores(out, None, "not a DMS engine", dict(kv_cache_dtype=kv_cache_dtype))
    monkeypatch.setattr(quality, "open_engine", fake_open)
    monkeypatch.setattr(quality, "score_vllm", fake_score)


def _tiny_ckpts(model, tmp_path):
    from vllm_dms.tools.checkpoints import add_dms_fields
    src = str(tmp_path / "plain")
    model.save_pretrained(src)
    return src, add_dms_fields(src, str(tmp_path / "dms"), window=3)


def test_evaluate_rows_per_context_and_path(model, tmp_path, monkeypatch):
    import transformers

    from vllm_dms.tools import quality
    src, ckpt = _tiny_ckpts(model, tmp_path)
    seen = {}
    _fake_engine(monkeypatch, quality, seen)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: None)
    monkeypatch.setattr(quality, "eval_tokens", lambda tok: windows(1, 200)[0])
    rows = quality.evaluate(ckpt, base_dir=src, name="tiny", path="dms_fp8", windows=2,
                            contexts=(20, 40), top_k=5, engine_kw={"enforce_eager": True},
                            date="2026-01-02")
    assert [r["context"] for r in rows] == [20, 40] and seen["open"][:4] == (ckpt, 40, 5,
                                                                          "dms_fp8")
    assert seen["open"][4] == {"enforce_eager": True} and len(seen["scored"]) == 2
    assert all(s[3] == ("llm", {"kv_cache_dtype": "dms_fp8"}) for s in seen["scored"])  # reused
    row = rows[1]
    assert tuple(k for k in row if k != "details") == ROW_KEYS + DMS_FP8_KEYS
    assert row["path"] == "dms_fp8" and row["kld_support"] == "top5+tail"
    assert row["kld_vs_reference_evict"] == 0.0 and row["tokens_scored"] == 78
    wins = windows(1, 200)[0][:80].view(2, 40)
    assert row["ppl_base"] == pytest.approx(base_ppl(model, wins), rel=1e-5)
    # the same model as base: any KLD against the base comes from DMS (lane zeroed + eviction)
    dms = DMSConfig.from_checkpoint(ckpt)
    ref = score_reference(model, dms, wins, base_model=model)
    ref8 = score_reference(model, dms, wins, kv_fp8=True, base_model=model)  # as dms_fp8 reads
    assert row["kld_vs_base"] > 0 and row["token_match"] < 1.0
    assert row["details"]["reference_kld_vs_noevict"] == pytest.approx(ref8["kld_vs_noevict"])
    assert row["ppl_noevict"] == pytest.approx(ref8["ppl_noevict"], rel=1e-6)
    assert row["measured_compression"] == pytest.approx(ref8["measured_compression"])
    floor = quality.evaluate(ckpt, base_dir=src, name="tiny", path="vllm-fp8", windows=2,
                             contexts=(40,), top_k=5, date="2026-01-02")[0]
    assert seen["open"][0] == src and seen["open"][3] == "fp8"  # the base, vLLM's own fp8 KV
    assert floor["kld_vs_base"] == 0.0 and floor["token_match"] == 1.0  # a perfect engine
    assert floor["ppl"] == pytest.approx(floor["ppl_base"], rel=1e-6)
    assert floor["cr_target"] is None and floor["measured_compression"] == 1.0
    refrows = quality.evaluate(ckpt, base_dir=src, name="tiny", path="reference", windows=2,
                               contexts=(20, 40), date="2026-01-02")
    assert [r["context"] for r in refrows] == [20, 40] and refrows[1]["device"] == "cpu"
    assert tuple(k for k in refrows[1] if k != "details") == ROW_KEYS
    assert refrows[1]["kld_vs_base"] == pytest.approx(ref["kld_vs_base"], rel=1e-6)
    assert refrows[1]["ppl_base"] == pytest.approx(row["ppl_base"], rel=1e-6)
    assert refrows[1]["details"]["compression_per_layer"] == ref["compression_per_layer"]
    assert refrows[0]["tokens_scored"] == 2 * 19
    with pytest.raises(ValueError):
        quality.evaluate(ckpt, base_dir=src, name="tiny", path="dms_fp8", kv_fp8=True)


def test_reference_scores_against_the_base(model, tmp_path):
    from vllm_dms.tools.quality import base_logits
    dms, wins = dms_for(model, window=3), windows(n=2)
    # the base is the plain model: its forward is the reference without DMS and lane kept
    bl = base_logits(model, wins[0])
    nodms = reference_forward(model, dms, wins[0], evict=False, zero_lane=False).logits
    torch.testing.assert_close(bl, nodms, rtol=1e-4, atol=1e-4)
    s = score_reference(model, dms, wins, base_model=model)
    kld, match, nll = 0.0, 0, 0.0
    for ids in wins:
        ev = reference_forward(model, dms, ids).logits[:-1]
        b = F.log_softmax(base_logits(model, ids)[:-1], -1)
        lp = F.log_softmax(ev, -1)
        kld += (b.exp() * (b - lp)).sum().item()
        match += (lp.argmax(-1) == b.argmax(-1)).sum().item()
        nll -= b[torch.arange(39), ids[1:]].sum().item()
    assert s["kld_vs_base"] == pytest.approx(kld / 78, rel=1e-4)
    assert s["token_match"] == match / 78 and s["ppl_base"] == pytest.approx(
        math.exp(nll / 78), rel=1e-5)
    # against the lane-zeroed no-evict model the lane's own cost would be missed
    assert s["kld_vs_base"] != pytest.approx(s["kld_vs_noevict"], rel=1e-3)


def test_cli_eval_dms_fp8_wiring(tmp_path, monkeypatch):
    from vllm_dms.tools import quality
    from vllm_dms.tools.cli import main
    seen = {}

    def fake_evaluate(model_dir, **kw):
        seen.update(kw, model_dir=model_dir)
        return [dict(model=kw["name"], path=kw["path"], context=c, ppl=1.0)
                for c in kw["contexts"]]

    monkeypatch.setattr(quality, "evaluate", fake_evaluate)
    out = str(tmp_path / "q.json")
    assert main(["eval", str(tmp_path / "ck"), "--path", "dms_fp8", "--base-dir", "b",
                 "--top-k", "7", "--enforce-eager", "--device", "cpu", "--out", out]) == 0
    assert seen["path"] == "dms_fp8" and seen["top_k"] == 7 and seen["base_dir"] == "b"
    assert seen["engine_kw"] == dict(gpu_memory_utilization=0.3, enforce_eager=True)
    assert json.load(open(out)) == [dict(model="ck", path="dms_fp8", context=c, ppl=1.0)
                                    for c in (1024, 4096)]  # both contexts by default
    assert main(["eval", "x", "--path", "vllm-fp8", "--base-dir", "b", "--window-len", "512",
                 "--out", out]) == 0 and seen["contexts"] == [512] and seen["path"] == "vllm-fp8"
    with pytest.raises(SystemExit) as e:
        main(["eval", "x", "--path", "dms_fp8", "--kv-fp8", "--base-dir", "b", "--out", out])
    assert e.value.code == 2
