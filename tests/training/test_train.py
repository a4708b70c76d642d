"""DMS retrofit training: soft mask vs the exact rule, a short run on a tiny model, the delta."""
import dataclasses
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from vllm_dms.engine.config import DMSConfig
from vllm_dms.tools.reference import dms_mask, reference_forward, shifted_flags
from vllm_dms.tools.training.delta import build_from_delta, load_delta, save_delta
from vllm_dms.tools.training.train import (BorrowedRows, logistic_noise, soft_dms_bias, student_forward,
                                           train)

VOCAB = 89


def tiny(arch: str = "llama"):
    torch.manual_seed(0)
    if arch == "llama":
        m = LlamaForCausalLM(LlamaConfig(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=256,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))
    else:
        m = Qwen3ForCausalLM(Qwen3Config(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=256,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))
    with torch.no_grad():  # wide init so borrowed lanes fall on both sides of the threshold
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    return m.eval()


def dms_for(model, window: int, shift: int = 1) -> DMSConfig:
    hf = model.config.to_dict()
    hf["architectures"] = [type(model).__name__]
    hf.update(dms_window_size=window, dms_alpha_scale=100.0, dms_initial_alpha_offset=5.0,
              dms_cr=4, dms_decision_shift=shift)
    return DMSConfig.from_dicts(hf)


@pytest.mark.parametrize("shift", [0, 1])
@pytest.mark.parametrize("window", [1, 3, 50])
def test_soft_bias_is_the_hard_mask_when_decisions_are_hard(window, shift):
    g = torch.Generator().manual_seed(window + 10 * shift)
    T, H, tau = 23, 3, 1e-4
    d = torch.rand(T, H, generator=g) < 0.6
    logits = torch.where(d, 1.0, -1.0)  # hard decisions as +-1 logits, tau -> 0
    bias = soft_dms_bias((logits / tau)[None], window, shift)[0]
    want = dms_mask(shifted_flags(d, shift), window)
    assert torch.equal(torch.exp(bias), want.float())  # 0 where visible, -1e4 / -inf elsewhere


def test_soft_bias_beyond_window_is_log_keep_probability():
    g = torch.Generator().manual_seed(5)
    T, H, W = 12, 2, 2
    noisy = torch.randn(1, T, H, generator=g) * 3
    bias = soft_dms_bias(noisy, W, 1)[0]
    for h in range(H):
        for q in range(T):
            for k in range(T):
                if k > q:
                    assert bias[h, q, k] == float("-inf")
                elif q - k <= W:
                    assert bias[h, q, k] == 0
                else:  # owner k+1 exists because q - k > W >= 1
                    want = math.log(1 - torch.sigmoid(noisy[0, k + 1, h]).item())
                    assert bias[h, q, k].item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_logistic_noise_is_seeded_and_logistic():
    a = logistic_noise((200_000,), torch.Generator().manual_seed(3), "cpu")
    b = logistic_noise((200_000,), torch.Generator().manual_seed(3), "cpu")
    assert torch.equal(a, b) and torch.isfinite(a).all()
    assert abs(a.mean().item()) < 0.03
    assert a.var().item() == pytest.approx(math.pi ** 2 / 3, rel=0.03)  # Logistic(0, 1)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("shift", [0, 1])
def test_student_forward_at_zero_tau_is_the_exact_reference(arch, shift):
    m = tiny(arch)
    dms = dms_for(m, window=3, shift=shift)
    ids = torch.randint(0, VOCAB, (30,), generator=torch.Generator().manual_seed(1))
    qw = [layer.self_attn.q_proj.weight for layer in m.model.layers]
    qb = [layer.self_attn.q_proj.bias for layer in m.model.layers]
    with torch.no_grad():
        logits, st, hard = student_forward(m, dms, ids[None], qw, qb, tau=1e-6)
        ne_logits, *_ = student_forward(m, dms, ids[None], qw, qb, tau=1e-6, evict=False)
    ref = reference_forward(m, dms, ids)
    assert torch.equal(hard[:, 0], ref.decisions) and ref.decisions.any()
    assert torch.equal(st[:, 0].bool(), ref.decisions)
    torch.testing.assert_close(logits[0], ref.logits, rtol=1e-4, atol=1e-4)
    ne = reference_forward(m, dms, ids, evict=False)
    torch.testing.assert_close(ne_logits[0], ne.logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits[0], ne_logits[0])  # the window really evicted something


def test_short_training_lowers_loss_and_moves_eviction_to_target(tmp_path):
    m = tiny()
    stream = torch.randint(0, VOCAB, (4000,), generator=torch.Generator().manual_seed(2))
    s = train(None, str(tmp_path), cr=4, window=3, steps=40, seq_len=32, batch=4, lr=3e-2,
              device="cpu", bf16=False, ramp_frac=0.01, model=m, stream=stream, lora_rank=0,
              rows="heads", target_ctx=0)
    recs = [json.loads(line) for line in open(tmp_path / "train_log.jsonl")]
    steps = [r for r in recs if "step" in r]
    assert recs[0]["event"] == "start" and recs[-1]["event"] == "done" and len(steps) == 40
    assert steps[0]["evict_rate"] == 0.0  # zero-initialised decision rows: nothing evicted
    first = sum(r["loss"] for r in steps[1:6]) / 5
    last = sum(r["loss"] for r in steps[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert steps[-1]["target"] == 0.75
    assert sum(r["evict_rate"] for r in steps[-5:]) / 5 > 0.4
    assert all(math.isfinite(r["kd"]) and r["kd"] >= -1e-6 for r in steps)
    assert s["steps_run"] == 40 and set(s["state"]) == {
        f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)}


def _tiny_checkpoint(path) -> str:
    m = tiny()
    m.config.architectures = ["LlamaForCausalLM"]
    m.to(torch.bfloat16).save_pretrained(str(path), safe_serialization=True)
    return str(path)


def test_delta_round_trip_rebuilds_identical_tensors(tmp_path):
    base = _tiny_checkpoint(tmp_path / "base")
    m = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    dms = dms_for(m, window=3)
    rows = BorrowedRows(m, dms, "heads", "keep")
    with torch.no_grad():
        for w, _ in rows.dec + rows.rest:
            w.add_(0.01 * torch.randn_like(w))
    state = rows.state()
    fields = dict(window=3, alpha_scale=100.0, alpha_offset=5.0, cr=4, decision_shift=1)
    info = save_delta(base, state, str(tmp_path / "d.safetensors"), fields)
    patches, got_fields, meta = load_delta(str(tmp_path / "d.safetensors"))
    assert got_fields == fields and meta["format"] == "vllm_dms.delta/1"
    # only the borrowed heads' rows travel: 2 layers x 2 KV heads x 16 lanes
    assert info["rows"] == 2 * 2 * 16 == sum(r.numel() for r, _ in patches.values())
    out = build_from_delta(str(tmp_path / "d.safetensors"), str(tmp_path / "ckpt"), base_dir=base)
    built, orig = load_file(os.path.join(out, "model.safetensors")), load_file(
        os.path.join(base, "model.safetensors"))
    for name, t in orig.items():
        want = state[name].to(torch.bfloat16) if name in state else t
        assert built[name].dtype == t.dtype and torch.equal(built[name], want), name
    assert DMSConfig.from_checkpoint(out).window == 3
    base_again = load_file(os.path.join(base, "model.safetensors"))
    assert all(torch.equal(base_again[n], orig[n]) for n in orig)  # base never written through
    mtime = os.path.getmtime(os.path.join(out, "model.safetensors"))
    assert build_from_delta(str(tmp_path / "d.safetensors"), out, base_dir=base) == out
    assert os.path.getmtime(os.path.join(out, "model.safetensors")) == mtime  # cached
    other = _tiny_checkpoint(tmp_path / "other")  # same names, different rows: refused
    w = load_file(os.path.join(other, "model.safetensors"))
    w["model.layers.0.self_attn.q_proj.weight"] += 1
    from safetensors.torch import save_file
    save_file(w, os.path.join(other, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="different base"):
        build_from_delta(str(tmp_path / "d.safetensors"), str(tmp_path / "bad"), base_dir=other)


def test_train_writes_a_delta_that_rebuilds_the_trained_weights(tmp_path):
    base = _tiny_checkpoint(tmp_path / "base")
    stream = torch.randint(0, VOCAB, (2000,), generator=torch.Generator().manual_seed(4))
    s = train(base, str(tmp_path / "run"), cr=4, window=3, steps=3, seq_len=24, batch=2,
              lr=1e-2, device="cpu", bf16=False, stream=stream, lora_rank=0, rows="heads")
    out = build_from_delta(s["delta_path"], str(tmp_path / "ckpt"), base_dir=base)
    built = load_file(os.path.join(out, "model.safetensors"))
    for name, t in s["state"].items():
        assert torch.equal(built[name], t.to(torch.bfloat16)), name
    cfg = DMSConfig.from_checkpoint(out)
    assert (cfg.window, cfg.target_cr, cfg.decision_shift) == (3, 4, 1)
    assert dataclasses.asdict(cfg)["alpha_scale"] == 100.0
