"""DMS retrofit: teach a plain Llama / Qwen3 checkpoint to make eviction decisions (DMS, variant A).

Student = the base model with its eviction decision read from the borrowed query lane (first query
head of each GQA group, last lane, pre-RoPE), the lane zeroed before and after RoPE (NVIDIA
convention, decision_shift 1). Teacher = the same frozen base weights, plain causal attention.

Per layer, a = scale * q_lane - offset; with logistic noise n (difference of two Gumbels, seeded
per step) the decision is d = 1[(a + n)/tau > 0] with the straight-through gradient of
p = sigmoid((a + n)/tau). Attention adds log sigmoid(-(a_owner + n)/tau) to every key that is more
than W positions behind the query, where a_owner is the logit of the key's flag owner (token k+1
under shift 1). As tau -> 0 this is exactly the hard visibility rule of vllm_dms.tools.reference.

Loss = KL(teacher || student) per token + max(target - mean d, 0), target ramped linearly from 0
to 1 - 1/cr. Trainable: the q_proj rows (and bias) of the borrowed heads only; see ROW_MODES.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F

from vllm_dms.engine.config import DMSConfig
from vllm_dms.tools.reference import _apply_rope, _rms_norm, _rope_cos_sin, borrowed_heads

TRAIN_TEXTS = ("plrabn12.txt", "asyoulik.txt", "lcet10.txt")  # alice29.txt is held out for eval
DELTA_NAME = "dms_delta.safetensors"
# "heads": all D rows of each borrowed head (decision lane + the rest of the head, which has just
# lost lane D-1 and must attend under eviction); "lane": only the decision row of each head.
ROW_MODES = ("heads", "lane")


# ------------------------------------------------------------------ the soft DMS attention
def logistic_noise(shape, generator: torch.Generator, device) -> torch.Tensor:
    """Difference of two standard Gumbels (= Logistic(0, 1)), from a seeded generator."""
    eps = torch.finfo(torch.float32).tiny
    u = torch.rand((2, *shape), generator=generator, device=device).clamp_min(eps)
    g = -torch.log((-torch.log(u)).clamp_min(eps))
    return g[0] - g[1]


def owner_logits(logits: torch.Tensor, shift: int) -> torch.Tensor:
    """logits [B, T, H] computed at each token -> logit of the flag each key owns (shift 0/1).

    Keys past the end under shift 1 get -inf (never flagged), matching shifted_flags; such a key
    is always inside the window of every query that sees it.
    """
    if shift == 0:
        return logits
    pad = torch.full_like(logits[:, :1], float("-inf"))
    return torch.cat([logits[:, 1:], pad], dim=1)


def soft_dms_bias(noisy: torch.Tensor, window: int, shift: int) -> torch.Tensor:
    """noisy (a + n)/tau [B, T, H] -> additive attention bias [B, H, T(query), T(key)] (fp32).

    0 inside the window, log sigmoid(-noisy[owner(k)]) = log P(key kept) beyond it, -inf above
    the diagonal.
    """
    T = noisy.shape[1]
    keep_log = F.logsigmoid(-owner_logits(noisy.float(), shift))  # [B, T, H]
    pos = torch.arange(T, device=noisy.device)
    dist = pos.view(T, 1) - pos.view(1, T)  # query - key
    far = (dist > window).view(1, 1, T, T)
    bias = torch.where(far, keep_log.transpose(1, 2).unsqueeze(2), keep_log.new_zeros(()))
    return bias.masked_fill((dist < 0).view(1, 1, T, T), float("-inf"))


def lane_keep_mask(dms: DMSConfig, device) -> torch.Tensor:
    """[Hq, D] ones, borrowed lanes 0: multiplying by it zeroes them and keeps autograd simple."""
    m = torch.ones(dms.num_q_heads, dms.head_dim, device=device)
    m[borrowed_heads(dms), dms.head_dim - 1] = 0.0
    return m


def _lin(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x.to(w.dtype), w, b)  # runs in the weights' dtype (bf16 or fp32)


def _mod(x: torch.Tensor, mod: torch.nn.Module) -> torch.Tensor:
    return _lin(x, mod.weight, mod.bias)


def _norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    return _rms_norm(x.float(), norm)  # RMSNorm always in fp32


def student_forward(model, dms: DMSConfig, ids: torch.Tensor, q_weights, q_biases=None, *,
                    tau: float = 0.1, noise: torch.Tensor | None = None, evict: bool = True):
    """Batched DMS training forward of ids [B, T] with per-layer q_proj weights (trainable).

    noise [L, B, T, H] or None (noiseless). Matmuls run in the model's dtype, norms, RoPE, the
    residual stream and the decision logits in fp32. Returns logits [B, T, V], straight-through
    decisions [L, B, T, H] (value hard 0/1, gradient of the sigmoid) and the clean hard decisions
    a > 0 [L, B, T, H].
    """
    B, T = ids.shape
    Hq, H, D, G = dms.num_q_heads, dms.num_kv_heads, dms.head_dim, dms.group
    device = ids.device
    cos, sin = _rope_cos_sin(model, T, device)
    keep = lane_keep_mask(dms, device)
    heads = borrowed_heads(dms).to(device)
    h = model.model.embed_tokens(ids).float()
    st, hard = [], []
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        x = _norm(h, layer.input_layernorm)
        bias_i = None if q_biases is None else q_biases[i]
        q = _lin(x, q_weights[i], bias_i).view(B, T, Hq, D).float()
        k = _mod(x, attn.k_proj).view(B, T, H, D).float()
        v = _mod(x, attn.v_proj).view(B, T, H, D)
        if getattr(attn, "q_norm", None) is not None:  # Qwen3 reads the lane after q_norm
            q, k = _rms_norm(q, attn.q_norm), _rms_norm(k, attn.k_norm)
        a = dms.alpha_scale * q[:, :, heads, D - 1] - dms.alpha_offset  # [B, T, H] fp32
        hard.append(a.detach() > 0)
        noisy = (a if noise is None else a + noise[i]) / tau
        p = torch.sigmoid(noisy)
        st.append((noisy > 0).float() + p - p.detach())  # straight-through estimator
        q = _apply_rope(q * keep, cos, sin) * keep  # zero the lane before and after RoPE
        k = _apply_rope(k, cos, sin)
        cdt = v.dtype
        qh = q.to(cdt).transpose(1, 2)
        kh = k.to(cdt).repeat_interleave(G, 2).transpose(1, 2)
        vh = v.repeat_interleave(G, 2).transpose(1, 2)
        if evict:
            mask = soft_dms_bias(noisy, dms.window, dms.decision_shift)
            mask = mask.repeat_interleave(G, dim=1).to(cdt)
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
        else:
            out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
        o = out.transpose(1, 2).reshape(B, T, Hq * D)
        h = h + _mod(o, attn.o_proj).float()
        x = _norm(h, layer.post_attention_layernorm)
        mlp = layer.mlp
        up = mlp.act_fn(_mod(x, mlp.gate_proj)) * _mod(x, mlp.up_proj)
        h = h + _mod(up, mlp.down_proj).float()
    logits = _mod(_norm(h, model.model.norm), model.lm_head)
    return logits, torch.stack(st), torch.stack(hard)


def kd_forward_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student), in nats, computed in fp32."""
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


# ------------------------------------------------------------------ data and parameters
def token_stream(tokenizer, names=TRAIN_TEXTS) -> torch.Tensor:
    """All training texts tokenized and joined with EOS, as one 1-D LongTensor."""
    from vllm_dms.tools.texts import gutenberg_text
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    ids: list[int] = []
    for name in names:
        ids += tokenizer(gutenberg_text(name), add_special_tokens=False)["input_ids"] + [eos]
    return torch.tensor(ids, dtype=torch.long)


def sample_batch(stream: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator):
    starts = torch.randint(0, stream.numel() - seq_len, (batch,), generator=gen)
    return torch.stack([stream[s:s + seq_len] for s in starts.tolist()])


class BorrowedRows:
    """Trainable fp32 copies of the borrowed heads' q_proj rows, spliced into the frozen weights.

    Decision rows (lane D-1 of each borrowed head) only feed the decision, since attention sees
    that lane zeroed; "zero" init starts them at 0 (a = -offset: nothing evicted, and the logit
    sits where the noise gives it a gradient). In "heads" mode the head's other D-1 rows train
    too (smaller lr): that head lost a lane and must attend under eviction.
    """

    def __init__(self, model, dms: DMSConfig, mode: str = "heads", init: str = "zero"):
        if mode not in ROW_MODES or init not in ("zero", "keep"):
            raise ValueError(f"rows={mode!r} (want {ROW_MODES}), init={init!r} (want zero|keep)")
        D, dev = dms.head_dim, model.lm_head.weight.device
        starts = borrowed_heads(dms) * D
        self.dec_idx = (starts + D - 1).to(dev)
        rest = (starts.view(-1, 1) + torch.arange(D - 1).view(1, -1)).reshape(-1)
        self.rest_idx = rest.to(dev) if mode == "heads" else None
        self.projs = [layer.self_attn.q_proj for layer in model.model.layers]

        def take(t, idx, zero=False):
            if t is None or idx is None:
                return None
            r = t[idx].detach().float().clone()
            return (r.zero_() if zero else r).requires_grad_()
        z = init == "zero"
        self.dec = [(take(p.weight, self.dec_idx, z), take(p.bias, self.dec_idx, z))
                    for p in self.projs]
        self.rest = [(take(p.weight, self.rest_idx), take(p.bias, self.rest_idx))
                     for p in self.projs]

    def param_groups(self, lr: float, rest_lr_scale: float) -> list[dict]:
        dec = [t for pair in self.dec for t in pair if t is not None]
        rest = [t for pair in self.rest for t in pair if t is not None]
        groups = [dict(params=dec, lr=lr, base_lr=lr)]
        if rest:
            groups.append(dict(params=rest, lr=lr * rest_lr_scale, base_lr=lr * rest_lr_scale))
        return groups

    def _splice(self, base, dec, rest):
        if base is None:
            return None
        out = base.index_put((self.dec_idx,), dec.to(base.dtype))
        return out if rest is None else out.index_put((self.rest_idx,), rest.to(base.dtype))

    def weights(self) -> list[torch.Tensor]:
        return [self._splice(p.weight, d[0], r[0])
                for p, d, r in zip(self.projs, self.dec, self.rest)]

    def biases(self) -> list[torch.Tensor | None]:
        return [self._splice(p.bias, d[1], r[1])
                for p, d, r in zip(self.projs, self.dec, self.rest)]

    @torch.no_grad()
    def state(self) -> dict[str, torch.Tensor]:
        """Full q_proj tensors (HF names) with the trained rows in place."""
        out = {}
        for i, (w, b) in enumerate(zip(self.weights(), self.biases())):
            out[f"model.layers.{i}.self_attn.q_proj.weight"] = w.detach().cpu()
            if b is not None:
                out[f"model.layers.{i}.self_attn.q_proj.bias"] = b.detach().cpu()
        return out


def dms_fields(window: int, cr: float, alpha_scale: float = 100.0, alpha_offset: float = 5.0,
               decision_shift: int = 1) -> dict:
    """The DMS fields a trained checkpoint carries (keyword arguments of add_dms_fields)."""
    return dict(window=int(window), alpha_scale=float(alpha_scale),
                alpha_offset=float(alpha_offset), decision_shift=int(decision_shift),
                cr=int(cr) if float(cr).is_integer() else float(cr))  # config.json: 8, not 8.0


def dms_config_for(hf_config: dict, fields: dict) -> DMSConfig:
    hf = dict(hf_config)
    hf.update(dms_window_size=fields["window"], dms_alpha_scale=fields["alpha_scale"],
              dms_initial_alpha_offset=fields["alpha_offset"], dms_cr=fields["cr"],
              dms_decision_shift=fields["decision_shift"])
    return DMSConfig.from_dicts(hf, where="train")


def compression_target(step: int, steps: int, cr: float, ramp_frac: float) -> float:
    """Eviction-rate target, linear from 0 to 1 - 1/cr over the first ramp_frac of training."""
    ramp = max(1, int(round(ramp_frac * steps)))
    return (1.0 - 1.0 / cr) * min(1.0, step / ramp)


# ------------------------------------------------------------------ the recipe
def train(base_dir: str | None, out_dir: str, *, cr: float = 8, window: int = 16,
          steps: int = 1000, seq_len: int = 1024, batch: int = 16, lr: float = 2e-3,
          device: str = "cuda", log_path: str | None = None, tau: float = 0.1,
          ramp_frac: float = 0.6, comp_weight: float = 1.0, rows: str = "heads",
          init: str = "zero", rest_lr_scale: float = 0.05, seed: int = 0,
          alpha_scale: float = 100.0, alpha_offset: float = 5.0, decision_shift: int = 1,
          bf16: bool | None = None, texts=TRAIN_TEXTS, max_minutes: float | None = None,
          model=None, tokenizer=None, stream: torch.Tensor | None = None) -> dict:
    """Train a DMS delta from base_dir; writes out_dir/dms_delta.safetensors and a JSONL log.

    Defaults are the one-H200 recipe: 1000 steps x 16 x 1024 tokens, measured at 0.27 s/step
    for the SmolLM2-135M shape in bf16 (about 5 minutes, 39 GB peak).
    model / tokenizer / stream may be passed in (tests; base_dir None then skips the delta).
    bf16 (default: on for CUDA) runs the frozen model in bf16. Returns a summary dict (the log's
    last line) plus "state": the trained q_proj tensors.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_dms.tools.training.delta import save_delta

    t0 = time.time()
    torch.manual_seed(seed)
    os.makedirs(out_dir, exist_ok=True)
    log_path = log_path or os.path.join(out_dir, "train_log.jsonl")
    bf16 = device.startswith("cuda") if bf16 is None else bf16
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    dtype = torch.bfloat16 if bf16 else torch.float32
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    fields = dms_fields(window, cr, alpha_scale, alpha_offset, decision_shift)
    dms = dms_config_for(_hf_dict(model), fields)
    if stream is None:
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(base_dir)
        stream = token_stream(tokenizer, texts)
    trained = BorrowedRows(model, dms, rows, init)
    groups = trained.param_groups(lr, rest_lr_scale)
    params = [t for g in groups for t in g["params"]]
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, min(20, steps // 10))
    data_gen = torch.Generator().manual_seed(seed)
    log = open(log_path, "w")
    _log(log, dict(event="start", base_dir=os.path.abspath(base_dir) if base_dir else None,
                   cr=cr, window=window, steps=steps, seq_len=seq_len, batch=batch, lr=lr,
                   rest_lr_scale=rest_lr_scale, tau=tau, ramp_frac=ramp_frac,
                   comp_weight=comp_weight, rows=rows, init=init, seed=seed, device=device,
                   bf16=bf16, train_tokens_available=int(stream.numel()),
                   trainable_params=sum(p.numel() for p in params), texts=list(texts)))
    rec: dict = {}
    for step in range(steps):
        if max_minutes is not None and time.time() - t0 > 60 * max_minutes:
            break
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * min(1.0, (step + 1) / warmup)
        ids = sample_batch(stream, batch, seq_len, data_gen).to(device)
        noise_gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)
        noise = logistic_noise((dms.num_layers, batch, seq_len, dms.num_kv_heads), noise_gen,
                               device)
        with torch.no_grad():
            teacher = model(input_ids=ids).logits
        logits, st, hard = student_forward(model, dms, ids, trained.weights(), trained.biases(),
                                           tau=tau, noise=noise)
        kd = kd_forward_kl(teacher, logits)
        del teacher
        target = compression_target(step, steps, cr, ramp_frac)
        comp = torch.clamp(target - st.mean(), min=0.0)
        loss = kd + comp_weight * comp
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        rec = dict(step=step, loss=loss.item(), kd=kd.item(), comp=comp.item(), target=target,
                   evict_rate=hard.float().mean().item(), evict_rate_noisy=st.mean().item(),
                   grad_norm=float(gnorm), lr=opt.param_groups[0]["lr"],
                   tokens=(step + 1) * batch * seq_len, elapsed_s=round(time.time() - t0, 2))
        _log(log, rec)
    state = trained.state()
    delta_path = os.path.join(out_dir, DELTA_NAME)
    info = save_delta(base_dir, state, delta_path, fields) if base_dir else None
    per_layer = None if not rec else hard.float().mean(dim=(1, 2, 3)).tolist()
    summary = dict(event="done", steps_run=rec.get("step", -1) + 1,
                   wall_s=round(time.time() - t0, 1), final_evict_rate=rec.get("evict_rate"),
                   final_target=rec.get("target"), final_kd=rec.get("kd"),
                   final_evict_rate_per_layer=per_layer,
                   delta_path=delta_path if info else None,
                   delta_bytes=None if info is None else info["bytes"])
    _log(log, summary)
    log.close()
    summary["state"] = state
    return summary


def _hf_dict(model) -> dict:
    hf = model.config.to_dict()
    hf["architectures"] = [type(model).__name__]
    return hf


def _log(f, rec: dict) -> None:
    f.write(json.dumps(rec) + "\n")
    f.flush()  # a crashed or killed run still leaves every finished step on disk


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vllm_dms.tools.training.train",
                                description="Retrofit DMS onto a base checkpoint (distillation).")
    p.add_argument("--base", default="smollm2", help="base checkpoint dir, or 'smollm2'")
    p.add_argument("--out", required=True, help="output folder (delta + log)")
    p.add_argument("--build", default=None, help="also build the DMS checkpoint into this dir")
    for name, typ, default in (("cr", float, 8), ("window", int, 16), ("steps", int, 1000),
                               ("seq-len", int, 1024), ("batch", int, 16), ("lr", float, 2e-3),
                               ("rest-lr-scale", float, 0.05),
                               ("tau", float, 0.1), ("ramp-frac", float, 0.6),
                               ("comp-weight", float, 1.0), ("seed", int, 0),
                               ("max-minutes", float, None), ("threads", int, None)):
        p.add_argument("--" + name, type=typ, default=default)
    p.add_argument("--rows", choices=ROW_MODES, default="heads")
    p.add_argument("--init", choices=("zero", "keep"), default="zero")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", type=int, choices=(0, 1), default=None)
    p.add_argument("--log", default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    base = a.base
    if base == "smollm2":
        from vllm_dms.tools.checkpoints import smollm2_base
        base = smollm2_base()
    s = train(base, a.out, cr=a.cr, window=a.window, steps=a.steps, seq_len=a.seq_len,
              batch=a.batch, lr=a.lr, device=a.device, log_path=a.log, tau=a.tau,
              ramp_frac=a.ramp_frac, comp_weight=a.comp_weight, rows=a.rows, init=a.init,
              rest_lr_scale=a.rest_lr_scale, seed=a.seed,
              bf16=None if a.bf16 is None else bool(a.bf16), max_minutes=a.max_minutes)
    s.pop("state")
    if a.build:
        from vllm_dms.tools.training.delta import build_from_delta
        s["checkpoint"] = build_from_delta(s["delta_path"], a.build,
                                           base_dir=None if a.base == "smollm2" else base)
    print(json.dumps(s, indent=2))
    return 0 if math.isfinite(s["final_kd"] or float("nan")) else 1


if __name__ == "__main__":
    raise SystemExit(main())
