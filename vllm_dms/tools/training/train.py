"""DMS retrofit: teach a plain Llama / Qwen3 checkpoint to make eviction decisions (DMS, variant A).

Student = the base model with its eviction decision read from the borrowed query lane (first query
head of each GQA group, last lane, pre-RoPE), the lane zeroed before and after RoPE (NVIDIA
convention, decision_shift 1), soft eviction beyond the window W (vllm_dms.tools.training.soft).
Teacher = the frozen base weights through the model's own forward: no DMS, lane not zeroed.
Trainable (vllm_dms.tools.training.adapters): the borrowed q_proj rows, plus LoRA of rank r on
every linear (q, k, v, o, gate, up, down) when r > 0, merged into the weights when built.

Loss = KL(teacher || student) per token + comp_weight * max(target - mean d, 0); the target ramps
linearly to the decision rate that leaves target_ctx / cr live keys at context target_ctx (with a
window of W+1 always live), or to 1 - 1/cr when target_ctx is 0.

Resumable: with state_dir, each invocation continues from DIR/current (adapters, optimizer, step,
data RNG) and saves there before it stops (max_minutes); the continuation is bit-for-bit the
straight run. The JSONL log is appended across invocations; every invocation writes the delta.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

from vllm_dms.engine.config import DMSConfig
from vllm_dms.tools import texts as tx
from vllm_dms.tools.training import state as st_mod
from vllm_dms.tools.training.adapters import (ROW_MODES, BorrowedRows, Lora,  # noqa: F401
                                              effective_weights, lora_delta_bytes, tensor_name)
from vllm_dms.tools.training.soft import (LINEARS, kd_forward_kl, lane_keep_mask,  # noqa: F401
                                          logistic_noise, owner_logits, soft_dms_bias,
                                          student_forward)

_BROTLI_TRAIN = ("plrabn12.txt", "asyoulik.txt", "lcet10.txt")
# training texts by corpus name; tx.HELD_OUT (alice29.txt) is in none: evaluation text only.
# SmolLM2 tokens with one EOS per text: small 264,678 (the 2026-12-07 run: ~50 epochs in 800
# steps of 8 x 2048), large 2,105,624 (~6 epochs)
CORPORA = {"small": _BROTLI_TRAIN, "large": _BROTLI_TRAIN + tx.SHAKESPEARE + (tx.BOTCHAN,)}
DELTA_NAME = "dms_delta.safetensors"
# hyper-parameters a resumed run must share with the run that saved the state
RECIPE_KEYS = ("cr", "window", "steps", "seq_len", "batch", "micro_batch", "lr", "lora_rank",
               "lora_alpha", "lora_lr", "tau", "ramp_frac", "comp_weight", "rows", "init",
               "rest_lr_scale", "seed", "alpha_scale", "alpha_offset", "decision_shift", "bf16",
               "corpus", "texts", "target_ctx", "min_lr_frac")


# ------------------------------------------------------------------ data and schedules
def token_stream(tokenizer, names=CORPORA["large"]) -> torch.Tensor:
    """All training texts tokenized and joined with EOS, as one 1-D LongTensor."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    ids: list[int] = []
    for name in names:
        ids += tokenizer(tx.gutenberg_text(name), add_special_tokens=False)["input_ids"] + [eos]
    return torch.tensor(ids, dtype=torch.long)


def sample_batch(stream: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator):
    starts = torch.randint(0, stream.numel() - seq_len, (batch,), generator=gen)
    return torch.stack([stream[s:s + seq_len] for s in starts.tolist()])


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


def evict_target(cr: float, window: int, ctx: int = 0) -> float:
    """Decision rate that leaves ctx / cr live keys at context ctx (the last W+1 keys are always
    live, so 1.0 when even that keeps more); 1 - 1/cr when ctx is 0 or inside the window.
    E.g. cr 8, W 256, ctx 4096: 0.934."""
    if not ctx or ctx <= window + 1:
        return 1.0 - 1.0 / cr
    keep = (ctx / cr - (window + 1)) / (ctx - window - 1)
    return min(1.0, max(0.0, 1.0 - keep))


def compression_target(step: int, steps: int, cr: float, ramp_frac: float, window: int = 0,
                       ctx: int = 0) -> float:
    """Decision-rate target, linear from 0 to evict_target over the first ramp_frac of steps."""
    ramp = max(1, int(round(ramp_frac * steps)))
    return evict_target(cr, window, ctx) * min(1.0, step / ramp)


def lr_factor(step: int, steps: int, warmup: int, hold_until: int, min_frac: float) -> float:
    """Linear warm-up, constant while the target ramps, then cosine down to min_frac."""
    if step < warmup:
        return (step + 1) / warmup
    if step < hold_until or steps <= hold_until:
        return 1.0
    t = (step - hold_until) / max(1, steps - hold_until)
    return min_frac + (1.0 - min_frac) * 0.5 * (1.0 + math.cos(math.pi * t))


def last_query_live(hard: torch.Tensor, window: int, shift: int) -> torch.Tensor:
    """hard decisions [L, B, T, H] -> live keys after the last query [L, B, H] (exact rule)."""
    T = hard.shape[2]
    flags = hard if shift == 0 else torch.cat(
        [hard[:, :, 1:], torch.zeros_like(hard[:, :, :1])], 2)
    old = max(0, T - 1 - window)  # keys k with T-1-k > W: live only when unflagged
    return min(T, window + 1) + (~flags[:, :, :old]).sum(2)


# ------------------------------------------------------------------ the recipe
def train(base_dir: str | None, out_dir: str, *, cr: float = 8, window: int = 256,
          steps: int = 800, seq_len: int = 2048, batch: int = 8, micro_batch: int | None = None,
          lr: float = 2e-3, lora_rank: int = 16, lora_alpha: float | None = None,
          lora_lr: float = 1e-3, device: str = "cuda", log_path: str | None = None,
          tau: float = 0.1, ramp_frac: float = 0.5, comp_weight: float = 1.0, rows: str = "lane",
          init: str = "zero", rest_lr_scale: float = 0.05, seed: int = 0,
          alpha_scale: float = 100.0, alpha_offset: float = 5.0, decision_shift: int = 1,
          bf16: bool | None = None, corpus: str | None = None, max_minutes: float | None = None,
          state_dir: str | None = None, run_steps: int | None = None, save_every: int = 200,
          target_ctx: int = 4096,
          min_lr_frac: float = 0.1, grad_ckpt: bool = False, model=None, tokenizer=None,
          stream: torch.Tensor | None = None) -> dict:
    """Train (or continue, with state_dir) a DMS delta from base_dir; writes
    out_dir/dms_delta.safetensors and appends to the JSONL log. lora_rank 0 trains the rows only.

    corpus names the training texts (CORPORA): "large" for a new run; a resumed run keeps its
    state's and refuses another. The start event logs it (recipe) and its token count
    (train_tokens_available).
    model / tokenizer / stream may be passed in (tests; base_dir None then skips the delta).
    bf16 (default: on for CUDA) runs the frozen model and the student's matmuls in bf16.
    Returns a summary dict (the log's last line) plus the trained tensors: "state" (rows only:
    the q_proj tensors) or "lora" / "lora_scale" / "rows" (LoRA).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_dms.tools.training.delta import MAX_LORA_BYTES, save_delta, save_lora_delta

    t0 = time.time()
    saved = st_mod.load_info(state_dir) if st_mod.has_state(state_dir) else None
    corpus = corpus or (_saved_recipe(saved)["corpus"] if saved else "large")
    if corpus not in CORPORA:
        raise ValueError(f"corpus {corpus!r}: not one of {sorted(CORPORA)}")
    recipe = dict(cr=cr, window=window, steps=steps, seq_len=seq_len, batch=batch,
                  micro_batch=micro_batch or batch, lr=lr, lora_rank=lora_rank,
                  lora_alpha=lora_alpha, lora_lr=lora_lr, tau=tau, ramp_frac=ramp_frac,
                  comp_weight=comp_weight, rows=rows, init=init, rest_lr_scale=rest_lr_scale,
                  seed=seed, alpha_scale=alpha_scale, alpha_offset=alpha_offset,
                  decision_shift=decision_shift, bf16=None, corpus=corpus,
                  texts=list(CORPORA[corpus]),
                  target_ctx=target_ctx, min_lr_frac=min_lr_frac)
    bf16 = device.startswith("cuda") if bf16 is None else bf16
    recipe["bf16"] = bf16
    micro = recipe["micro_batch"]
    if batch % micro:
        raise ValueError(f"batch {batch} is not a multiple of micro_batch {micro}")
    os.makedirs(out_dir, exist_ok=True)
    log_path = log_path or os.path.join(out_dir, "train_log.jsonl")
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    dtype = torch.bfloat16 if bf16 else torch.float32
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    fields = dms_fields(window, cr, alpha_scale, alpha_offset, decision_shift)
    dms = dms_config_for(_hf_dict(model), fields)
    torch.manual_seed(seed)
    trained = BorrowedRows(model, dms, rows, init)
    lora = Lora(model, lora_rank, lora_alpha, seed) if lora_rank > 0 else None
    if lora is not None:  # refuse before training, not after: the package ships the delta
        shapes = {n: (b.shape[0], a.shape[1]) for n, (a, b) in lora.factors.items()}
        n_rows = sum(idx.numel() for idx, _ in trained.row_patches().values())
        need = lora_delta_bytes(shapes, lora_rank, n_rows, model.config.hidden_size)
        if need > MAX_LORA_BYTES:
            raise ValueError(f"a rank-{lora_rank} delta with rows={rows!r} needs {need} bytes > "
                             f"{MAX_LORA_BYTES}: lower --lora-rank or use --rows lane")
    named = dict(trained.named_params())
    named.update(lora.named_params() if lora is not None else {})
    names = list(named)
    groups = trained.param_groups(lr, rest_lr_scale)
    if lora is not None:
        lp = list(lora.named_params().values())
        groups.append(dict(params=lp, lr=lora_lr, base_lr=lora_lr))
    # the optimizer's parameter order is `names`' order (the state file maps them by name)
    order = {id(t): k for k, t in enumerate(named.values())}
    for g in groups:
        g["params"].sort(key=lambda t: order[id(t)])
    groups.sort(key=lambda g: order[id(g["params"][0])])
    names = [names[order[id(t)]] for g in groups for t in g["params"]]
    params = [named[n] for n in names]
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.0)
    data_gen = torch.Generator().manual_seed(seed)
    start, wall_before = 0, 0.0
    resumed = saved is not None
    if resumed:  # before the corpus is tokenized
        _check_recipe(state_dir, saved, recipe)
    if stream is None:
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(base_dir)
        stream = token_stream(tokenizer, CORPORA[corpus])
    n_tokens = int(stream.numel())
    if resumed and saved.get("train_tokens", n_tokens) != n_tokens:  # same names, other text
        raise ValueError(f"{state_dir}: saved over {saved['train_tokens']} training tokens, "
                         f"now {n_tokens}: the texts or the tokenizer differ")
    if resumed:
        tensors, info = st_mod.load_state(state_dir)
        with torch.no_grad():
            for n in names:
                named[n].copy_(tensors[n].to(device))
        st_mod.load_optimizer(opt, tensors, info["param_groups"], names, device)
        data_gen.set_state(tensors["rng/data"])
        start, wall_before = info["step"], info["wall_s"]
    warmup = max(1, min(20, steps // 10))
    hold = int(round(ramp_frac * steps))
    log = open(log_path, "a" if resumed else "w")
    _log(log, dict(event="resume" if resumed else "start", at_step=start, recipe=recipe,
                   base_dir=os.path.abspath(base_dir) if base_dir else None, device=device,
                   grad_ckpt=grad_ckpt, train_tokens_available=n_tokens,
                   trainable_params=sum(p.numel() for p in params)))
    rec: dict = {}
    step, last_dt, comp_sum = start, 0.0, None

    def save(next_step: int) -> list[str]:
        if not state_dir:
            return []
        tens = {n: named[n].detach() for n in names}
        opt_t, pg = st_mod.optimizer_tensors(opt, names)
        tens.update(opt_t)
        tens["rng/data"] = data_gen.get_state()
        info = dict(step=next_step, wall_s=round(wall_before + time.time() - t0, 2),
                    recipe=recipe, train_tokens=n_tokens, param_groups=pg)
        return st_mod.save_state(state_dir, tens, info)
    while step < steps:
        if max_minutes is not None and time.time() - t0 + 2 * last_dt > 60 * max_minutes:
            break  # stop while a step and the save still fit the budget
        if run_steps is not None and step - start >= run_steps:
            break
        ts = time.time()
        f = lr_factor(step, steps, warmup, hold, min_lr_frac)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * f
        ids_all = sample_batch(stream, batch, seq_len, data_gen)
        noise_gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)
        noise = logistic_noise((dms.num_layers, batch, seq_len, dms.num_kv_heads), noise_gen,
                               device)
        target = compression_target(step, steps, cr, ramp_frac, window, target_ctx)
        opt.zero_grad(set_to_none=True)
        tot = dict(loss=0.0, kl=0.0, comp=0.0, rate=0.0, noisy=0.0)
        lives = []
        for m0 in range(0, batch, micro):
            ids = ids_all[m0:m0 + micro].to(device)
            with torch.no_grad():
                teacher = model(input_ids=ids, use_cache=False).logits
            qw, qb, other = effective_weights(model, trained, lora, dtype)
            logits, stq, hard = student_forward(model, dms, ids, qw, qb, other=other, tau=tau,
                                                noise=noise[:, m0:m0 + micro],
                                                grad_ckpt=grad_ckpt)
            kd = kd_forward_kl(teacher, logits)
            del teacher, logits
            comp = torch.clamp(target - stq.mean(), min=0.0)
            loss = (kd + comp_weight * comp) * (micro / batch)
            loss.backward()
            w = micro / batch
            for k, v in (("loss", loss.item() / w), ("kl", kd.item()), ("comp", comp.item()),
                         ("rate", hard.float().mean().item()), ("noisy", stq.mean().item())):
                tot[k] += v * w
            lives.append(last_query_live(hard, window, decision_shift).float())
        gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        live = torch.cat(lives, 1)
        comp_sum = live.mean(dim=(1, 2))  # per layer, for the summary
        last_dt = time.time() - ts
        rec = dict(step=step, loss=tot["loss"], kl=tot["kl"], kd=tot["kl"], comp=tot["comp"],
                   target=target, evict_rate=tot["rate"], evict_rate_noisy=tot["noisy"],
                   compression=seq_len / float(live.mean()), grad_norm=float(gnorm),
                   lr=opt.param_groups[0]["lr"], lora_lr=f * lora_lr if lora else None,
                   tokens=(step + 1) * batch * seq_len, step_s=round(last_dt, 3),
                   tokens_per_s=round(batch * seq_len / max(last_dt, 1e-9), 1),
                   elapsed_s=round(time.time() - t0, 2))
        if device.startswith("cuda"):  # sizes the micro-batch for the next GPU
            rec["peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        _log(log, rec)
        step += 1
        if save_every and step % save_every == 0 and step < steps:
            save(step)
    files = save(step)
    summary = _finish(base_dir, out_dir, trained, lora, fields, rec, step, steps, comp_sum,
                      seq_len, t0, wall_before, files, save_delta, save_lora_delta)
    _log(log, {k: v for k, v in summary.items() if k not in ("state", "lora", "rows")})
    log.close()
    return summary


def _saved_recipe(info: dict) -> dict:
    """The recipe a state was saved with; states from before the corpus option trained on small."""
    return {"corpus": "small", **info["recipe"]}


def _check_recipe(state_dir: str, info: dict, recipe: dict) -> None:
    old, now = _saved_recipe(info), json.loads(json.dumps(recipe))
    diff = {k: (old.get(k), now[k]) for k in now if old.get(k) != now[k]}
    if "corpus" in diff:
        diff.pop("texts", None)  # the texts follow from the corpus
    if old != now:
        raise ValueError(f"{state_dir}: saved with another recipe (saved, now): {diff}")


def _finish(base_dir, out_dir, trained, lora, fields, rec, step, steps, live_layers, seq_len, t0,
            wall_before, files, save_delta, save_lora_delta) -> dict:
    """Write the delta (every invocation: a stopped run still leaves a usable one), summarise."""
    delta_path, info = os.path.join(out_dir, DELTA_NAME), None
    if base_dir and lora is None:
        info = save_delta(base_dir, trained.state(), delta_path, fields)
    elif base_dir:
        info = save_lora_delta(base_dir, {n: (a, b) for n, (a, b) in lora.factors.items()},
                               lora.scale, trained.row_patches(), delta_path, fields)
    per_layer = None if live_layers is None else [seq_len / float(x) for x in live_layers]
    summary = dict(event="done" if step >= steps else "paused", steps_run=step,
                   steps_total=steps, done=step >= steps, wall_s=round(time.time() - t0, 1),
                   wall_total_s=round(wall_before + time.time() - t0, 1),
                   final_evict_rate=rec.get("evict_rate"), final_target=rec.get("target"),
                   final_kd=rec.get("kl"), final_compression=rec.get("compression"),
                   final_compression_per_layer=per_layer,
                   delta_path=delta_path if info else None,
                   delta_bytes=None if info is None else info["bytes"],
                   state_files=files, state_max_file_bytes=max(
                       (os.path.getsize(f) for f in files), default=0))
    if lora is None:
        summary["state"] = trained.state()
    else:
        summary.update(lora={n: (a.detach().cpu(), b.detach().cpu())
                             for n, (a, b) in lora.factors.items()},
                       lora_scale=lora.scale, rows=trained.row_patches())
    return summary


def _hf_dict(model) -> dict:
    hf = model.config.to_dict()
    hf["architectures"] = [type(model).__name__]
    return hf


def _log(f, rec: dict) -> None:
    f.write(json.dumps(rec) + "\n")
    f.flush()  # a crashed or killed run still leaves every finished step on disk


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when all steps are done, 3 when a --max-minutes run paused (run it again)."""
    p = argparse.ArgumentParser(prog="python -m vllm_dms.tools.training.train",
                                description="Retrofit DMS onto a base checkpoint (distillation).")
    p.add_argument("--base", default="smollm2", help="base checkpoint dir, or 'smollm2'")
    p.add_argument("--out", required=True, help="output folder (delta + log)")
    p.add_argument("--build", default=None, help="when done, build the DMS checkpoint here")
    p.add_argument("--state", default=None, help="resumable state folder (continue from it)")
    p.add_argument("--chart", default=None, help="write the PNG chart of the log here")
    for name, typ, default in (("cr", float, 8), ("window", int, 256), ("steps", int, 800),
                               ("seq-len", int, 2048), ("batch", int, 8),
                               ("micro-batch", int, None), ("lr", float, 2e-3),
                               ("lora-rank", int, 16), ("lora-alpha", float, None),
                               ("lora-lr", float, 1e-3), ("rest-lr-scale", float, 0.05),
                               ("tau", float, 0.1), ("ramp-frac", float, 0.5),
                               ("comp-weight", float, 1.0), ("seed", int, 0),
                               ("target-ctx", int, 4096), ("min-lr-frac", float, 0.1),
                               ("save-every", int, 200), ("run-steps", int, None),
                               ("max-minutes", float, None), ("threads", int, None)):
        p.add_argument("--" + name, type=typ, default=default)
    p.add_argument("--rows", choices=ROW_MODES, default="lane")
    p.add_argument("--init", choices=("zero", "keep"), default="zero")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", type=int, choices=(0, 1), default=None)
    p.add_argument("--grad-ckpt", action="store_true", help="recompute layers in backward")
    p.add_argument("--corpus", choices=sorted(CORPORA), default=None,
                   help="training texts (alice29 held out in both): large (default for a new "
                   "run, ~2.1M SmolLM2 tokens) or small (3 brotli texts, 265K); a resumed run "
                   "keeps its state's")
    p.add_argument("--log", default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    base = a.base
    if base == "smollm2":
        from vllm_dms.tools.checkpoints import smollm2_base
        base = smollm2_base()
    s = train(base, a.out, cr=a.cr, window=a.window, steps=a.steps, seq_len=a.seq_len,
              batch=a.batch, micro_batch=a.micro_batch, lr=a.lr, lora_rank=a.lora_rank,
              lora_alpha=a.lora_alpha, lora_lr=a.lora_lr, device=a.device, log_path=a.log,
              tau=a.tau, ramp_frac=a.ramp_frac, comp_weight=a.comp_weight, rows=a.rows,
              init=a.init, rest_lr_scale=a.rest_lr_scale, seed=a.seed,
              bf16=None if a.bf16 is None else bool(a.bf16), corpus=a.corpus,
              max_minutes=a.max_minutes,
              state_dir=a.state, run_steps=a.run_steps, save_every=a.save_every,
              target_ctx=a.target_ctx,
              min_lr_frac=a.min_lr_frac, grad_ckpt=a.grad_ckpt)
    for k in ("state", "lora", "rows"):
        s.pop(k, None)
    if a.chart:
        from vllm_dms.tools.training.chart import write_chart
        s["chart"] = write_chart(a.log or os.path.join(a.out, "train_log.jsonl"), a.chart) \
            or a.chart
    if a.build and s["done"]:
        from vllm_dms.tools.training.delta import build_from_delta
        s["checkpoint"] = build_from_delta(s["delta_path"], a.build,
                                           base_dir=None if a.base == "smollm2" else base)
    print(json.dumps(s, indent=2))
    if not math.isfinite(s["final_kd"] if s["final_kd"] is not None else 0.0):
        return 1
    return 0 if s["done"] else 3


if __name__ == "__main__":
    raise SystemExit(main())
