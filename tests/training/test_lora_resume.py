"""LoRA retrofit: resumed runs equal straight runs bit for bit, the format-2 delta rebuilds the
trained weights, the shipped size stays under 10 MB, the schedules and the chart."""
import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file

from test_train import VOCAB, _tiny_checkpoint, dms_for, tiny
from vllm_dms.engine.config import DMSConfig
from vllm_dms.tools.reference import live_counts, reference_forward, shifted_flags
from vllm_dms.tools.training import state as st_mod
from vllm_dms.tools.training.adapters import (BorrowedRows, Lora, effective_weights,
                                              lora_delta_bytes, tensor_name)
from vllm_dms.tools.training.chart import read_steps, write_chart
from vllm_dms.tools.training.delta import (MAX_LORA_BYTES, build_from_delta, load_lora,
                                           merge_lora)
from vllm_dms.tools.training.soft import LINEARS, student_forward
from vllm_dms.tools.training.train import (evict_target, last_query_live, lr_factor, train)

RUN = dict(cr=4, window=3, steps=4, seq_len=24, batch=4, micro_batch=2, lr=1e-2, lora_rank=2,
           lora_lr=2e-2, device="cpu", bf16=False, ramp_frac=0.5, target_ctx=0, save_every=0)
STREAM = torch.randint(0, VOCAB, (3000,), generator=torch.Generator().manual_seed(9))


def _steps(path):
    return [json.loads(x) for x in open(path) if '"step"' in x and '"event"' not in x]


def _strip(rec):
    return {k: v for k, v in rec.items() if k not in ("elapsed_s", "step_s", "tokens_per_s")}


def test_two_plus_two_resumed_steps_equal_four_straight(tmp_path, monkeypatch):
    m = tiny()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    straight = train(None, str(tmp_path / "a"), model=m, stream=STREAM, **RUN)
    monkeypatch.setattr(st_mod, "MAX_FILE", 3000)  # force many shards and split tensors
    state = str(tmp_path / "state")
    # the same recipe, this invocation cut after 2 steps (as --max-minutes cuts it)
    first = train(None, str(tmp_path / "b"), model=m, stream=STREAM, state_dir=state,
                  run_steps=2, **RUN)
    assert first["done"] is False and first["steps_run"] == 2
    shards = [f for f in first["state_files"] if f.endswith(".safetensors")]
    assert len(shards) > 5 and all(os.path.getsize(f) <= 3000 for f in shards)
    second = train(None, str(tmp_path / "b"), model=m, stream=STREAM, state_dir=state, **RUN)
    assert second["done"] is True and second["steps_run"] == 4
    for name, (a, b) in straight["lora"].items():
        ra, rb = second["lora"][name]
        assert torch.equal(a, ra) and torch.equal(b, rb), name
    assert any(b.abs().sum() > 0 for _, b in straight["lora"].values())  # B really trained
    for name, (idx, vals) in straight["rows"].items():
        assert torch.equal(idx, second["rows"][name][0])
        assert torch.equal(vals, second["rows"][name][1]), name
    a, b = _steps(tmp_path / "a" / "train_log.jsonl"), _steps(tmp_path / "b" / "train_log.jsonl")
    assert [_strip(r) for r in a] == [_strip(r) for r in b] and len(a) == 4
    # the teacher is the base: training never writes into the model's own weights
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    with pytest.raises(ValueError, match="another recipe"):
        train(None, str(tmp_path / "b"), model=m, stream=STREAM, state_dir=state,
              **dict(RUN, lr=5e-3))


def test_lora_delta_rebuilds_the_trained_weights(tmp_path):
    base = _tiny_checkpoint(tmp_path / "base")
    s = train(base, str(tmp_path / "run"), stream=STREAM, **dict(RUN, steps=3))
    out = build_from_delta(s["delta_path"], str(tmp_path / "ckpt"), base_dir=base)
    built = load_file(os.path.join(out, "model.safetensors"))
    orig = load_file(os.path.join(base, "model.safetensors"))
    factors, scale = load_lora(s["delta_path"])
    assert scale == s["lora_scale"] == 2.0 and len(factors) == 2 * len(LINEARS)
    for name, (a, b) in s["lora"].items():
        fa, fb = factors[name]
        assert torch.equal(fa, a.to(torch.bfloat16)) and torch.equal(fb, b.to(torch.bfloat16))
        want = merge_lora(orig[name], fa, fb, scale)
        if name in s["rows"]:
            idx, vals = s["rows"][name]
            want[idx] = vals.to(want.dtype)
            assert not torch.equal(want, merge_lora(orig[name], fa, fb, scale))
        assert torch.equal(built[name], want), name
        # within bf16 rounding of the fp32 weights training used
        trained = orig[name].float() + scale * (b @ a)
        if name in s["rows"]:
            trained[s["rows"][name][0]] = s["rows"][name][1]
        torch.testing.assert_close(built[name].float(), trained, rtol=2e-2, atol=2e-3)
    untouched = [n for n in orig if n not in s["lora"]]
    assert untouched and all(torch.equal(built[n], orig[n]) for n in untouched)
    assert DMSConfig.from_checkpoint(out).window == 3
    from safetensors.torch import save_file
    w = dict(orig)
    w["model.layers.1.mlp.up_proj.weight"] = w["model.layers.1.mlp.up_proj.weight"] + 1
    os.makedirs(tmp_path / "other")
    for f in os.listdir(base):
        if f != "model.safetensors":
            os.link(os.path.join(base, f), tmp_path / "other" / f)
    save_file(w, str(tmp_path / "other" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="different base"):
        build_from_delta(s["delta_path"], str(tmp_path / "bad"), base_dir=str(tmp_path / "other"))


SMOLLM2 = dict(layers=30, hidden=576, q=576, kv=192, inter=1536, kv_heads=3)


def test_default_smollm2_delta_fits_the_package_limit(tmp_path):
    h, kv, inter = SMOLLM2["hidden"], SMOLLM2["kv"], SMOLLM2["inter"]
    per_layer = dict(q_proj=(SMOLLM2["q"], h), k_proj=(kv, h), v_proj=(kv, h),
                     o_proj=(h, SMOLLM2["q"]), gate_proj=(inter, h), up_proj=(inter, h),
                     down_proj=(h, inter))
    shapes = {tensor_name(i, p): s for i in range(SMOLLM2["layers"]) for p, s in per_layer.items()}
    lane_rows = SMOLLM2["layers"] * SMOLLM2["kv_heads"]
    need = lora_delta_bytes(shapes, 16, lane_rows, h)  # the CLI default: rank 16, rows lane
    header = 200 * len(shapes) * 2  # safetensors JSON header, generously per tensor
    assert need + header <= MAX_LORA_BYTES, need
    assert lora_delta_bytes(shapes, 16, lane_rows * 64, h) > MAX_LORA_BYTES  # rows=heads: no
    # the estimate is the real file's tensor bytes (tiny model, one real delta)
    base = _tiny_checkpoint(tmp_path / "base")
    s = train(base, str(tmp_path / "run"), stream=STREAM, **dict(RUN, steps=1))
    with open(s["delta_path"], "rb") as f:
        hdr = struct.unpack("<Q", f.read(8))[0]
    tiny_shapes = {n: (b.shape[0], a.shape[1]) for n, (a, b) in s["lora"].items()}
    rows = sum(i.numel() for i, _ in s["rows"].values())
    assert s["delta_bytes"] - 8 - hdr == lora_delta_bytes(tiny_shapes, 2, rows, 64)


def test_rank_that_cannot_ship_is_refused_before_training(tmp_path, monkeypatch):
    import vllm_dms.tools.training.delta as delta
    monkeypatch.setattr(delta, "MAX_LORA_BYTES", 1000)
    with pytest.raises(ValueError, match="lower --lora-rank"):
        train(None, str(tmp_path), model=tiny(), stream=STREAM, **RUN)


def test_zero_lora_is_the_base_and_checkpointing_changes_no_gradient():
    m = tiny()
    dms = dms_for(m, window=3)
    rows, lora = BorrowedRows(m, dms, "lane", "keep"), Lora(m, 3, seed=1)
    qw, qb, other = effective_weights(m, rows, lora, torch.float32)
    for i, layer in enumerate(m.model.layers):  # B = 0: exactly the module weights
        assert torch.equal(qw[i], layer.self_attn.q_proj.weight)
        assert all(torch.equal(other[i][p], getattr(layer.mlp, p).weight)
                   for p in ("gate_proj", "up_proj", "down_proj"))
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(3))
    grads = []
    for ck in (False, True):
        for t in lora.named_params().values():
            t.grad = None
        with torch.no_grad():
            for _, b in lora.factors.values():
                b.fill_(0.01)
        qw, qb, other = effective_weights(m, rows, lora, torch.float32)
        logits, st, _ = student_forward(m, dms, ids, qw, qb, other=other, tau=0.5, grad_ckpt=ck)
        (logits.logsumexp(-1).mean() + st.mean()).backward()
        grads.append([t.grad.clone() for t in lora.named_params().values()])
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(*grads))
    assert any(g.abs().sum() > 0 for g in grads[0])


@pytest.mark.parametrize("shift", [0, 1])
def test_last_query_live_is_the_reference_count(shift):
    m = tiny()
    dms = dms_for(m, window=3, shift=shift)
    ids = torch.randint(0, VOCAB, (30,), generator=torch.Generator().manual_seed(5))
    ref = reference_forward(m, dms, ids)
    got = last_query_live(ref.decisions.unsqueeze(1), 3, shift)[:, 0]  # [L, H]
    want = torch.stack([live_counts(shifted_flags(d, shift), 3)[-1] for d in ref.decisions])
    assert torch.equal(got, want) and (want < 30).any()


def test_evict_target_and_lr_schedule():
    assert evict_target(8, 256, 0) == 0.875
    t = evict_target(8, 256, 4096)
    assert t == pytest.approx(1 - (512 - 257) / 3839)
    assert 4096 / (257 + (4096 - 257) * (1 - t)) == pytest.approx(8.0)  # cr 8 at 4096 exactly
    assert evict_target(8, 1000, 1024) == 1.0  # the window alone keeps > 1024/8: evict all else
    assert evict_target(8, 256, 200) == 0.875  # no key ever leaves the window: plain 1 - 1/cr
    f = [lr_factor(s, 100, 10, 50, 0.1) for s in range(100)]
    assert f[0] == 0.1 and f[9] == 1.0 and f[10:50] == [1.0] * 40
    assert f[99] == pytest.approx(0.1, abs=1e-3) and all(a >= b for a, b in zip(f[50:], f[51:]))


def test_chart_png(tmp_path):
    log = tmp_path / "log.jsonl"
    recs = [dict(event="start")] + [dict(step=i, kl=1 / (i + 1), evict_rate=i / 20, target=0.5,
                                         compression=1 + i / 10, lr=1e-3) for i in range(20)]
    recs.append(dict(step=3, kl=9.0, evict_rate=0, target=0, compression=1, lr=0))  # resumed
    log.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert len(read_steps(str(log))) == 20 and read_steps(str(log))[3]["kl"] == 9.0
    png = tmp_path / "c.png"
    assert write_chart(str(log), str(png)) is None
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    empty = tmp_path / "e.jsonl"
    empty.write_text(json.dumps(dict(event="start")) + "\n")
    assert "no steps" in write_chart(str(empty), str(tmp_path / "e.png"))


def test_state_files_round_trip_odd_dtypes(tmp_path):
    t = {"a": torch.arange(1000, dtype=torch.float32).view(10, 100), "b": torch.tensor(3.5),
         "c": torch.arange(7, dtype=torch.uint8), "d": torch.randn(3, 5).to(torch.bfloat16)}
    files = st_mod.save_state(str(tmp_path), t, {"step": 7}, max_file=1024)
    assert all(os.path.getsize(f) <= 1024 for f in files) and len(files) >= 5
    got, info = st_mod.load_state(str(tmp_path))
    assert info == {"step": 7} and set(got) == set(t)
    assert all(torch.equal(got[k], v) and got[k].dtype == v.dtype for k, v in t.items())
    st_mod.save_state(str(tmp_path), {"a": t["a"] + 1}, {"step": 8}, max_file=1024)
    got, info = st_mod.load_state(str(tmp_path))  # the new state replaced the old one whole
    assert info["step"] == 8 and set(got) == {"a"} and torch.equal(got["a"], t["a"] + 1)
