"""The dense DMS reference: mask rule vs brute force, and the full-model forward vs HF."""
import dataclasses

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from vllm_dms.engine.config import DMSConfig
from vllm_dms.tools.reference import (borrowed_heads, dms_attention_reference, dms_mask, fp8_roundtrip,
                                      greedy_generate_reference, live_counts, reference_forward,
                                      shifted_flags)

VOCAB = 97


# ------------------------------------------------------------------ brute-force oracles
def brute_visible(dec: list, shift: int, window: int, q: int, k: int, h: int) -> bool:
    """The visibility rule written out for one (query, key, head), straight from the spec."""
    T = len(dec)
    flag = dec[k + shift][h] if k + shift < T else False
    return k <= q and (q - k <= window or not flag)


def lengths_around(window: int) -> list[int]:
    # shorter than, equal to and longer than the W+1 tokens a flagged key stays visible to
    longer = window + 1 + (37 if window > 100 else window + 5)
    return [max(1, window - 1), window + 1, longer]


@pytest.mark.parametrize("shift", [0, 1])
@pytest.mark.parametrize("window", [1, 4, 256])
def test_mask_and_flags_match_brute_force(window, shift):
    g = torch.Generator().manual_seed(window * 10 + shift)
    for T in lengths_around(window):
        dec = torch.rand(T, 2, generator=g) < 0.5
        flags = shifted_flags(dec, shift)
        mask = dms_mask(flags, window)
        dl = dec.tolist()
        want = torch.tensor([[[brute_visible(dl, shift, window, q, k, h) for k in range(T)]
                              for q in range(T)] for h in range(2)])
        assert torch.equal(mask, want), (T, window, shift)
        want_flags = [[dl[k + shift][h] if k + shift < T else False for h in range(2)]
                      for k in range(T)]
        assert flags.tolist() == want_flags


@pytest.mark.parametrize("shift", [0, 1])
@pytest.mark.parametrize("window", [1, 4, 256])
def test_live_counts_match_brute_force(window, shift):
    g = torch.Generator().manual_seed(7 + window + shift)
    for T in lengths_around(window):
        dec = torch.rand(T, 3, generator=g) < 0.7
        live = live_counts(shifted_flags(dec, shift), window)
        dl = dec.tolist()
        want = [[sum(brute_visible(dl, shift, window, q, k, h) for k in range(T))
                 for h in range(3)] for q in range(T)]
        assert live.dtype == torch.int64 and live.tolist() == want


def test_attention_reference_matches_per_query_loop():
    g = torch.Generator().manual_seed(3)
    T, H, G, D, W = 13, 2, 3, 8, 3
    q, k, v = (torch.randn(T, n, D, generator=g) for n in (H * G, H, H))
    flags = torch.rand(T, H, generator=g) < 0.5
    out = dms_attention_reference(q, k, v, flags, W, D ** -0.5)
    for t in range(T):
        for hq in range(H * G):
            h = hq // G
            keys = [j for j in range(t + 1) if t - j <= W or not flags[j, h]]
            p = torch.softmax(k[keys, h] @ q[t, hq] * D ** -0.5, dim=0)
            torch.testing.assert_close(out[t, hq], p @ v[keys, h], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ tiny random models
def tiny_llama() -> LlamaForCausalLM:
    # GQA group 3, q/k/v biases and llama3 rope scaling, so all of those paths are exercised
    cfg = LlamaConfig(hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                      vocab_size=VOCAB, attention_bias=True, max_position_embeddings=256,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0,
                                       "factor": 4.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 16})
    return LlamaForCausalLM(cfg)


def tiny_qwen3() -> Qwen3ForCausalLM:
    cfg = Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                      vocab_size=VOCAB, max_position_embeddings=256,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return Qwen3ForCausalLM(cfg)


def dms_for(model, window: int = 4, shift: int = 1, **kw) -> DMSConfig:
    hf = model.config.to_dict()
    hf["architectures"] = [type(model).__name__]
    hf.update(dms_window_size=window, dms_alpha_scale=100.0, dms_initial_alpha_offset=5.0,
              dms_cr=8, dms_decision_shift=shift)
    return dataclasses.replace(DMSConfig.from_dicts(hf), **kw)


@pytest.fixture(params=["llama", "qwen3"])
def model(request):
    torch.manual_seed(0)
    m = tiny_llama() if request.param == "llama" else tiny_qwen3()
    with torch.no_grad():  # larger-than-default init so lanes cross the 0.05 threshold both ways
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.05)
            elif p.dim() == 2:
                p.normal_(0.0, 0.08)
            else:  # norm weights: not all ones, so a missed norm weight would show
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return m.eval()


def ids_of(T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (T,), generator=torch.Generator().manual_seed(seed))


def zero_q_rows(model, dms: DMSConfig, lanes: list[int]) -> None:
    """Zero the q_proj rows (and bias) of the given lanes of every borrowed head."""
    with torch.no_grad():
        for layer in model.model.layers:
            proj = layer.self_attn.q_proj
            w = proj.weight.view(dms.num_q_heads, dms.head_dim, -1)
            b = None if proj.bias is None else proj.bias.view(dms.num_q_heads, dms.head_dim)
            for lane in lanes:
                w[borrowed_heads(dms), lane] = 0.0
                if b is not None:
                    b[borrowed_heads(dms), lane] = 0.0


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids[None]).logits[0].float()


def test_no_evict_matches_hf_when_lane_is_zero(model):
    dms = dms_for(model)
    zero_q_rows(model, dms, [dms.head_dim - 1])
    ids = ids_of(40)
    want = hf_logits(model, ids)
    before_only = dataclasses.replace(dms, zero_lane_after_rope=False)
    got = reference_forward(model, before_only, ids, evict=False).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    got = reference_forward(model, dms, ids, evict=False, zero_lane=False).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # RoPE rotates lane D/2-1 into D-1: with that row zero too, after-RoPE zeroing is a no-op
    zero_q_rows(model, dms, [dms.head_dim // 2 - 1])
    want = hf_logits(model, ids)
    got = reference_forward(model, dms, ids, evict=False).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_after_rope_zeroing_is_a_real_but_small_change(model):
    dms = dms_for(model)
    ids = ids_of(40)
    a = reference_forward(model, dms, ids, evict=False).logits
    b = reference_forward(model, dataclasses.replace(dms, zero_lane_after_rope=False), ids,
                          evict=False).logits
    assert not torch.equal(a, b)
    torch.testing.assert_close(a, b, rtol=0.05, atol=0.05)


def captured_queries(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, the query right before RoPE, captured from the HF model's own run."""
    seen = []
    for layer in model.model.layers:
        attn = layer.self_attn
        mod = attn.q_norm if hasattr(attn, "q_norm") else attn.q_proj
        mod.register_forward_hook(lambda _m, _i, out: seen.append(out.detach()[0].float()))
    hf_logits(model, ids)
    return seen


def test_decisions_equal_direct_lane_computation(model):
    dms = dms_for(model)
    ids = ids_of(33)
    # zero_lane=False, evict=False is exactly HF's forward, so HF's layer inputs are ours too
    out = reference_forward(model, dms, ids, evict=False, zero_lane=False)
    T, G, D = ids.numel(), dms.group, dms.head_dim
    for layer, q in enumerate(captured_queries(model, ids)):
        q = q.reshape(T, dms.num_q_heads, D)
        want = [[float(q[t, h * G, D - 1]) * 100.0 - 5.0 > 0 for h in range(dms.num_kv_heads)]
                for t in range(T)]
        assert out.decisions[layer].tolist() == want
    rate = out.decisions.float().mean().item()
    assert 0.05 < rate < 0.95, rate


def test_huge_window_equals_no_evict(model):
    dms = dms_for(model, window=100_000)
    ids = ids_of(48)
    ev = reference_forward(model, dms, ids, evict=True)
    ne = reference_forward(model, dms, ids, evict=False)
    assert ev.decisions.any() and ev.flags.any()
    assert torch.equal(ev.logits, ne.logits)
    assert torch.equal(ev.decisions, ne.decisions)


@pytest.mark.parametrize("shift", [0, 1])
def test_small_window_evicts_only_after_window(model, shift):
    W, T = 3, 40
    dms = dms_for(model, window=W, shift=shift)
    ids = ids_of(T)
    ev = reference_forward(model, dms, ids, evict=True)
    ne = reference_forward(model, dms, ids, evict=False)
    assert ev.logits.shape == (T, VOCAB) and ev.logits.dtype == torch.float32
    L, H = dms.num_layers, dms.num_kv_heads
    assert ev.decisions.shape == ev.flags.shape == ev.live.shape == (L, T, H)
    for layer in range(L):
        assert torch.equal(ev.flags[layer], shifted_flags(ev.decisions[layer], shift))
        assert torch.equal(ev.live[layer], live_counts(ev.flags[layer], W))
    assert torch.equal(ne.live, torch.arange(1, T + 1).view(1, T, 1).expand(L, T, H))
    # queries 0..W see every earlier key either way; later ones lose flagged keys
    assert torch.equal(ev.logits[:W + 1], ne.logits[:W + 1])
    assert not torch.equal(ev.logits, ne.logits)
    assert (ev.live[:, -1] < T).any()


def test_injected_decisions_are_honoured(model):
    dms = dms_for(model, window=1)
    ids = ids_of(30)
    L, T, H = dms.num_layers, ids.numel(), dms.num_kv_heads
    computed = reference_forward(model, dms, ids).decisions
    inject = ~computed  # the opposite of what the model would decide
    out = reference_forward(model, dms, ids, injected_decisions=inject)
    assert torch.equal(out.decisions, inject)
    for layer in range(L):
        assert torch.equal(out.flags[layer], shifted_flags(inject[layer], 1))
        assert torch.equal(out.live[layer], live_counts(out.flags[layer], 1))
    keep_all = reference_forward(model, dms, ids,
                                 injected_decisions=torch.zeros(L, T, H, dtype=torch.bool))
    no_evict = reference_forward(model, dms, ids, evict=False)
    assert torch.equal(keep_all.logits, no_evict.logits)
    evict_all = reference_forward(model, dms, ids,
                                  injected_decisions=torch.ones(L, T, H, dtype=torch.bool))
    # everything flagged: each query keeps only its window, min(q+1, W+1) keys
    want = torch.arange(1, T + 1).clamp(max=2).view(1, T, 1).expand(L, T, H)
    assert torch.equal(evict_all.live, want)
    assert not torch.equal(evict_all.logits, no_evict.logits)


def test_kv_fp8_roundtrip(model):
    x = torch.tensor([1000.0, -1000.0, 0.1, 1.0])
    y = fp8_roundtrip(x)
    assert y[0] == 448.0 and y[1] == -448.0 and y[3] == 1.0 and y[2] != 0.1
    dms = dms_for(model)
    ids = ids_of(24)
    b = reference_forward(model, dms, ids)
    # same decisions in both runs, so only the e4m3 rounding of K/V differs
    a = reference_forward(model, dms, ids, kv_fp8=True, injected_decisions=b.decisions)
    err = (a.logits - b.logits).abs()
    assert 0 < err.mean() < 0.05 * b.logits.std()


def test_bf16_model_is_computed_in_fp32(model):
    dms = dms_for(model)
    ids = ids_of(20)
    half = model.to(torch.bfloat16)
    assert half.model.rotary_emb.inv_freq.dtype == torch.bfloat16  # .to() rounds it too
    exact = type(model)(model.config)  # fresh fp32 model (and inv_freq) with the bf16 weights
    exact.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    got = reference_forward(half, dms, ids)
    want = reference_forward(exact.eval(), dms, ids)
    assert got.logits.dtype == torch.float32
    assert torch.equal(got.logits, want.logits)
    assert torch.equal(got.decisions, want.decisions)


def test_greedy_generate_reference_is_causal(model):
    dms = dms_for(model, window=2)
    prompt = ids_of(12)
    tokens, out = greedy_generate_reference(model, dms, prompt, 6)
    assert tokens.shape == (6,) and out.logits.shape[0] == 18
    assert torch.equal(out.logits[11:17].argmax(-1), tokens)
    assert torch.equal(reference_forward(model, dms, torch.cat([prompt, tokens])).logits,
                       out.logits)


def test_kv_fp8_from_splits_prompt_and_decode_rows(model):
    dms = dms_for(model)
    ids = ids_of(24)
    b = reference_forward(model, dms, ids)
    inj = b.decisions
    all8 = reference_forward(model, dms, ids, kv_fp8=True, injected_decisions=inj)
    none8 = reference_forward(model, dms, ids, injected_decisions=inj)
    assert torch.equal(reference_forward(model, dms, ids, kv_fp8_from=0,
                                         injected_decisions=inj).logits, all8.logits)
    assert torch.equal(reference_forward(model, dms, ids, kv_fp8_from=24,
                                         injected_decisions=inj).logits, none8.logits)
    mixed = reference_forward(model, dms, ids, kv_fp8_from=16, injected_decisions=inj)
    # prompt rows (causal: they only see prompt rows) are unaffected; decode rows see FP8 keys
    assert torch.allclose(mixed.logits[:16], none8.logits[:16], atol=1e-5)
    assert not torch.equal(mixed.logits[16:], none8.logits[16:])


def test_lane_logits_are_the_decision_rule_also_when_injected(model):
    dms = dms_for(model)
    ids = ids_of(33)
    out = reference_forward(model, dms, ids)
    assert torch.equal(out.lane_logits > 0, out.decisions)
    inj = ~out.decisions  # injected decisions steer the mask; the logits stay the lane's own
    forced = reference_forward(model, dms, ids, injected_decisions=inj)
    assert torch.equal(forced.decisions, inj)
    assert torch.equal(forced.lane_logits[0], out.lane_logits[0])  # layer 0 sees no mask yet
    assert not torch.equal(forced.lane_logits[1:], out.lane_logits[1:])


def test_bf16_compute_rounds_activations_but_stays_close(model):
    dms = dms_for(model)
    ids = ids_of(33)
    m = model.to(torch.bfloat16)
    f32 = reference_forward(m, dms, ids, evict=False)
    b16 = reference_forward(m, dms, ids, evict=False, dtype=torch.bfloat16)
    diff = (f32.lane_logits - b16.lane_logits).abs()
    assert float(diff.max()) > 0, "bf16 rounding happened"
    # lane logits are 100 * lane - 5: bf16 moves the lane by ~1e-2 relative, not more
    assert float(diff.max()) < 0.1 * float(f32.lane_logits.abs().max()), float(diff.max())
    rel = ((f32.logits - b16.logits).norm() / f32.logits.norm()).item()
    assert 0 < rel < 0.05, rel


def test_greedy_generate_reference_stops_after_the_stop_token(model):
    dms = dms_for(model)
    prompt = ids_of(9)
    full, _ = greedy_generate_reference(model, dms, prompt, 6)
    stop = int(full[2])
    first = next(i for i, t in enumerate(full.tolist()) if t == stop)
    got, out = greedy_generate_reference(model, dms, prompt, 6, stop_id=stop)
    assert got.tolist() == full[:first + 1].tolist()
    assert out.logits.shape[0] == prompt.numel() + first + 1


def test_lane_pre_is_the_lane_before_q_norm(model):
    dms = dms_for(model)
    out = reference_forward(model, dms, ids_of(33))
    if not hasattr(model.model.layers[0].self_attn, "q_norm"):  # llama: the lane itself
        assert torch.allclose(out.lane_pre * dms.alpha_scale - dms.alpha_offset, out.lane_logits)
        return
    # qwen3: q_norm rescales a head, so the lane keeps its sign and changes its size
    lane = (out.lane_logits + dms.alpha_offset) / dms.alpha_scale
    assert not torch.allclose(out.lane_pre, lane, atol=1e-3)
    assert torch.equal(out.lane_pre > 0, lane > 0)
