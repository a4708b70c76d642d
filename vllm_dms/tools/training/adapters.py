"""What training changes in the frozen base: borrowed q_proj rows and low-rank adapters (LoRA).

Effective weight of linear NAME in layer i (what the student uses, and what the delta builds):
    W_eff = W + scale * B @ A        (LoRA on every linear, when rank > 0; merged in fp32)
    W_eff[rows] = trained rows        (q_proj only: the borrowed heads' rows, full rank)
then cast to the model's dtype. The teacher is the untouched module weights.
"""
from __future__ import annotations

import math

import torch

from vllm_dms.engine.config import DMSConfig
from vllm_dms.tools.reference import borrowed_heads
from vllm_dms.tools.training.soft import ATTN_PROJ, LINEARS

# "heads": all D rows of each borrowed head (decision lane + the rest of the head, which has just
# lost lane D-1 and must attend under eviction); "lane": only the decision row of each head.
ROW_MODES = ("heads", "lane")


def tensor_name(i: int, proj: str) -> str:
    """HF name of layer i's linear `proj`."""
    part = "self_attn" if proj in ATTN_PROJ else "mlp"
    return f"model.layers.{i}.{part}.{proj}.weight"


def _module(layer, proj: str):
    return getattr(layer.self_attn if proj in ATTN_PROJ else layer.mlp, proj)


class BorrowedRows:
    """Trainable fp32 copies of the borrowed heads' q_proj rows, spliced into the q weights.

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

    def named_params(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, (d, r) in enumerate(zip(self.dec, self.rest)):
            for tag, pair in (("dec", d), ("rest", r)):
                for kind, t in zip(("weight", "bias"), pair):
                    if t is not None:
                        out[f"rows.{i}.{tag}.{kind}"] = t
        return out

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

    def weights(self, bases: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """q_proj weights with the rows in place; bases (LoRA-merged) default to the module's."""
        bases = bases or [p.weight for p in self.projs]
        return [self._splice(b, d[0], r[0]) for b, d, r in zip(bases, self.dec, self.rest)]

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

    @torch.no_grad()
    def row_patches(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{HF name: (row indices, fp32 rows)} of every trained row (q_proj weight and bias)."""
        idx = self.dec_idx if self.rest_idx is None else torch.cat([self.dec_idx, self.rest_idx])
        out = {}
        for i, (d, r) in enumerate(zip(self.dec, self.rest)):
            for k, kind in enumerate(("weight", "bias")):
                if d[k] is None:
                    continue
                vals = d[k] if r[k] is None else torch.cat([d[k], r[k]])
                out[f"model.layers.{i}.self_attn.q_proj.{kind}"] = (idx.cpu(), vals.cpu().clone())
        return out


class Lora:
    """Rank-r adapters on every linear of every layer: W + scale * B @ A, B zero-initialised
    (training starts at the base weights), A ~ U(+-1/sqrt(in)) from a seeded generator."""

    def __init__(self, model, rank: int, alpha: float | None = None, seed: int = 0):
        if rank < 1:
            raise ValueError(f"LoRA rank {rank} < 1")
        self.rank = rank
        self.scale = (alpha if alpha is not None else 2.0 * rank) / rank
        gen = torch.Generator().manual_seed(seed + 7919)
        dev = model.lm_head.weight.device
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, layer in enumerate(model.model.layers):
            for proj in LINEARS:
                out_f, in_f = _module(layer, proj).weight.shape
                bound = 1.0 / math.sqrt(in_f)
                a = (torch.rand(rank, in_f, generator=gen) * 2 - 1) * bound
                self.factors[tensor_name(i, proj)] = (a.to(dev).requires_grad_(),
                                                      torch.zeros(out_f, rank, device=dev,
                                                                  requires_grad=True))

    def named_params(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, (a, b) in self.factors.items():
            out[name + "@lora_A"], out[name + "@lora_B"] = a, b
        return out

    def merged(self, name: str, base: torch.Tensor) -> torch.Tensor:
        """base + scale * B @ A in fp32 (differentiable in A and B)."""
        a, b = self.factors[name]
        return base.float() + self.scale * (b @ a)


def effective_weights(model, rows: BorrowedRows, lora: Lora | None, dtype: torch.dtype):
    """-> (q weights per layer, q biases per layer, other linears per layer as dicts), in dtype."""
    layers = model.model.layers
    if lora is None:
        qw = [w.to(dtype) for w in rows.weights()]
        return qw, rows.biases(), None
    q_bases = [lora.merged(tensor_name(i, "q_proj"), layer.self_attn.q_proj.weight)
               for i, layer in enumerate(layers)]
    qw = [w.to(dtype) for w in rows.weights(q_bases)]
    other = [{p: lora.merged(tensor_name(i, p), _module(layer, p).weight).to(dtype)
              for p in LINEARS if p != "q_proj"} for i, layer in enumerate(layers)]
    return qw, rows.biases(), other


def lora_delta_bytes(shapes: dict[str, tuple[int, int]], rank: int, rows: int, row_len: int,
                     elem: int = 2) -> int:
    """Tensor bytes of a delta: bf16 factors of every (out, in) shape plus `rows` rows."""
    return sum(rank * (o + i) * elem for o, i in shapes.values()) + rows * (row_len * elem + 8)
