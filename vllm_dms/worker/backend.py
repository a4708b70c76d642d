"""DMSCompactAttentionBackend: vLLM's CUSTOM attention backend for ``--kv-cache-dtype dms_fp8``.

Per step the builder turns vLLM's common metadata into ours (decodes first, then prefill
chunks; each request's arena slot is the single block id the scheduler gave it; the slots
freed since the last step were released before the forward), and the impl, per layer, stores
then attends:

* decode rows: ``dms_decode_store`` (decision from the carrier lane, flag, exact expiry by slot
  reuse, FP8 append) then ``dms_decode_attention`` (split-K over the row's live slots);
* prefill rows: ``dms_prefill_attention`` (the exact DMS mask over the prompt) then
  ``dms_prefill_pack`` (survivors to the arena in FP8). Every query, prompt or decode, reads K/V
  on the arena's FP8 grid, so chunking, prefix reuse and preemption leave the values alone;
* when a prefill row continues a prompt (tokens already in the arena): ``dms_chunk_flag_prev``
  (shift 1), ``dms_chunk_attention`` (arena row + chunk) for every prefill row, then
  ``dms_prefill_pack`` for first chunks and ``dms_chunk_pack`` for continuations.

The decision channel is the query itself: the DMS model transform puts the raw pre-RoPE value of
the borrowed lane (head h*G, lane D-1) back into that lane after RoPE, so the decision reaches us
inside the attention op (ordered, graph- and compile-safe). The decode store decides from it in
its kernel; every attention kernel reads the lane as 0 (``carrier=True``), so q is never copied.
The scheduler's orders (releases, forks, snapshots) reach the builder through the engine's
``WorkerLink`` (``vllm_dms.worker.runtime``): releases and forks run before the step's forward
(``vllm_dms.patches.worker``), snapshots are packed by this step's prefill.
A request that takes a prefix entry (``vllm_dms.engine.prefix_cache``), or hits a snapshot whose rows
the worker copies into its slot before the forward (``runtime.fork``), arrives with its slot's rows already
holding its first tokens: it is simply a continuation chunk.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.config import VllmConfig
from vllm.v1.attention.backend import (AttentionBackend, AttentionCGSupport, AttentionImpl,
                                       AttentionMetadataBuilder, AttentionType,
                                       CommonAttentionMetadata, MultipleOf)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills

from vllm_dms.engine.arena import ArenaLayout, spec_page_bytes
from vllm_dms.engine.config import compact_head_size_ok
from vllm_dms.worker.runtime import DMSRuntime, worker_link


class DMSCompactAttentionBackend(AttentionBackend):
    accept_output_buffer: bool = True
    forward_includes_kv_cache_update: bool = True  # the store needs our metadata
    # bf16 only: every kernel wrapper takes bf16 q/k/v (the startup check refuses --dtype else)
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.bfloat16]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["dms_fp8"]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"  # Attention.__init__ maps the name back to the enum member

    @staticmethod
    def get_impl_cls() -> type["DMSCompactAttentionImpl"]:
        return DMSCompactAttentionImpl

    @staticmethod
    def get_builder_cls() -> type["DMSMetadataBuilder"]:
        return DMSMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes() -> list[int | MultipleOf]:
        return [MultipleOf(16)]  # never split a block: block_table[:, 0] must stay the slot id

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                           cache_dtype_str: str = "dms_fp8") -> tuple[int, ...]:
        # Raw bytes: the arena carves state, K/V and meta words itself (see vllm_dms.engine.arena).
        return (num_blocks, spec_page_bytes(num_kv_heads, head_size, block_size))

    @classmethod
    def supports_kv_cache_dtype(cls, kv_cache_dtype: str | None) -> bool:
        return kv_cache_dtype == "dms_fp8"

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return compact_head_size_ok(head_size)  # the rule the startup check applies

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER


@dataclass
class DMSMetadata:
    num_actual_tokens: int
    num_decodes: int
    num_decode_tokens: int
    num_prefills: int
    max_prefill_len: int
    slots: torch.Tensor          # int32 [num_reqs]: arena slot of each request
    decode_pos: torch.Tensor     # int32 [num_decodes]: position of each decode token
    prefill_cu: torch.Tensor     # int32 [num_prefills + 1]: cu_seqlens within the prefill part
    prefill_last: torch.Tensor   # int64 [num_prefills]: index of each prompt's last token
    runtime: DMSRuntime
    # Set iff some prefill row may continue a prompt (prefill_chunk_rows); else all are first.
    prefill_n0: torch.Tensor | None = None           # int32 [num_prefills]: tokens in the arena
    prefill_first_slots: torch.Tensor | None = None  # int32 [num_prefills]: slot if n0 == 0 else 0
    prefill_cont_slots: torch.Tensor | None = None   # int32 [num_prefills]: slot if n0 > 0 else 0
    # Set iff the scheduler ordered prefix snapshots this step (vllm_dms.engine.prefix_cache): one
    # entry per order, pointing into the prefill part (see DMSRuntime.order_snapshots).
    snap_starts: torch.Tensor | None = None  # int32 [k+1]: first token of the order's request
    snap_len: torch.Tensor | None = None     # int32 [k]: tokens to snapshot
    snap_dst: torch.Tensor | None = None     # int32 [k]: cache slot, 0 = skip


def prefill_chunk_rows(slots: torch.Tensor, n0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split prefill rows on the GPU (no sync): (first-chunk, continuation) slots, 0 = skip."""
    cont = torch.where(n0 > 0, slots, torch.zeros_like(slots))
    return slots - cont, cont


def decode_block_ids(ids: torch.Tensor, num_slots: int, slots_out: torch.Tensor,
                     slot_tag: torch.Tensor) -> torch.Tensor:
    """Block id = slot + num_slots * tag (scheduler side: channel.encode_block_id); on the GPU,
    no sync. Writes the slots into slots_out and each slot's owner tag into slot_tag."""
    torch.remainder(ids, num_slots, out=slots_out)  # padded rows hold block 0 -> slot 0 (none)
    slot_tag.index_copy_(0, slots_out.long(), torch.div(ids, num_slots, rounding_mode="floor")
                         .to(slot_tag.dtype))
    return slots_out


class DMSMetadataBuilder(AttentionMetadataBuilder[DMSMetadata]):
    # Decode-only steps replay a full CUDA graph: every tensor the kernels read lives in a
    # persistent buffer below (or in the runtime), and the kernels neither sync nor allocate.
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config: VllmConfig,
                 device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_reorder_batch_threshold(1, supports_spec_as_decode=False)
        self.layer_names = list(layer_names)
        self.vllm_config = vllm_config
        self.runtime: DMSRuntime | None = None  # found or made by the first build()
        self.link = None  # the engine's WorkerLink (vllm_dms.worker.runtime), found with the runtime
        sc, cc = vllm_config.scheduler_config, vllm_config.compilation_config
        self.max_rows = max(sc.max_num_seqs, cc.max_cudagraph_capture_size or 0, 1)
        self._slots = torch.zeros(self.max_rows, dtype=torch.int32, device=device)
        self._pos = torch.zeros(self.max_rows, dtype=torch.int32, device=device)

    def _kv_layers(self) -> list[torch.Tensor]:
        ctx = self.vllm_config.compilation_config.static_forward_context
        return [ctx[name].kv_cache for name in self.layer_names]

    def _ensure_runtime(self) -> DMSRuntime:
        if self.runtime is not None:
            return self.runtime
        kv_layers = self._kv_layers()
        link = self.link = worker_link(self.vllm_config.compilation_config.static_forward_context,
                                       self.layer_names)
        # Another builder of this engine may have made it; one that initialised other KV
        # tensors (a re-allocated cache) is never adopted.
        if link.runtime is not None and link.runtime.serves(kv_layers):
            self.runtime = link.runtime
            return self.runtime
        from vllm_dms.engine.config import dms_config_from_vllm
        spec, vc = self.kv_cache_spec, self.vllm_config
        dms = dms_config_from_vllm(vc)
        page = spec_page_bytes(spec.num_kv_heads, spec.head_size, spec.block_size)
        layout = dataclasses.replace(  # this worker's layers and (per-rank) KV heads
            ArenaLayout.from_config(
                dms, block_size=spec.block_size, max_num_seqs=vc.scheduler_config.max_num_seqs,
                max_model_len=vc.model_config.max_model_len,
                num_blocks=kv_layers[0].numel() // page),
            num_layers=len(kv_layers), num_kv_heads=spec.num_kv_heads)
        layout.validate()
        num_q_heads = vc.model_config.get_num_attention_heads(vc.parallel_config)
        tp = None
        if vc.parallel_config.tensor_parallel_size > 1:
            from vllm.distributed.parallel_state import get_tp_group
            tp = get_tp_group()
        rt = DMSRuntime(dms, layout, self.layer_names, num_q_heads, self.device,
                        max_rows=self.max_rows, tp_group=tp)
        rt.init_arenas(kv_layers)
        self.runtime = link.runtime = rt
        return rt

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> DMSMetadata:
        cam = common_attn_metadata
        rt = self._ensure_runtime()
        rt.check_overflow()  # releases and forks of this step ran already (WorkerLink.receive)
        nd, npf, nd_tok, _ = split_decodes_and_prefills(cam, decode_threshold=1)
        qsl_cpu = cam.query_start_loc_cpu
        n = cam.num_reqs
        slots = decode_block_ids(cam.block_table_tensor[:n, 0], rt.layout.num_slots,
                                 self._slots[:n], rt.slot_tag)
        self._pos[:nd].copy_(cam.seq_lens[:nd] - 1)
        max_pf, has_cont = 0, False
        if npf:
            q_lens = qsl_cpu[nd + 1: cam.num_reqs + 1] - qsl_cpu[nd: cam.num_reqs]
            max_pf = int(q_lens.max())
            seq_cpu = cam.seq_lens_cpu_upper_bound  # exact for prefill rows; None: assume chunks
            has_cont = seq_cpu is None or bool((seq_cpu[nd: cam.num_reqs] != q_lens).any())
        qsl = cam.query_start_loc
        prefill_cu = (qsl[nd: cam.num_reqs + 1] - qsl[nd]).to(torch.int32)
        n0 = first = cont = None
        if has_cont:  # n0 = seq_len - query_len, on the GPU
            n0 = (cam.seq_lens[nd: cam.num_reqs] - (qsl[nd + 1: cam.num_reqs + 1]
                                                    - qsl[nd: cam.num_reqs])).to(torch.int32)
            first, cont = prefill_chunk_rows(slots[nd:], n0)
        rt.slot_ntok.index_copy_(0, slots.long(), cam.seq_lens[: cam.num_reqs].to(torch.int32))
        rt.slot_ntok[0] = 0  # slot 0 is padding
        snap = (None, None, None)
        orders = self.link.take_snapshots()
        if orders and npf:  # only first chunks get orders (the scheduler's rule)
            snap = rt.order_snapshots(orders, slots[nd:], prefill_cu)
        return DMSMetadata(
            num_actual_tokens=cam.num_actual_tokens, num_decodes=nd, num_decode_tokens=nd_tok,
            num_prefills=npf, max_prefill_len=max_pf, slots=slots,
            decode_pos=self._pos[:nd], prefill_cu=prefill_cu,
            prefill_last=(prefill_cu[1:] - 1).long(), runtime=rt, prefill_n0=n0,
            prefill_first_slots=first, prefill_cont_slots=cont, snap_starts=snap[0],
            snap_len=snap[1], snap_dst=snap[2])


class DMSCompactAttentionImpl(AttentionImpl[DMSMetadata]):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes=None, sliding_window=None, kv_cache_dtype: str = "dms_fp8",
                 logits_soft_cap=None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, **kwargs):
        if alibi_slopes is not None or sliding_window is not None or logits_soft_cap:
            raise ValueError("dms_fp8 supports plain causal attention only "
                             "(no ALiBi, sliding window or soft cap)")
        if kv_sharing_target_layer_name is not None:
            raise ValueError("dms_fp8 does not support cross-layer KV sharing")
        self.num_heads, self.head_size, self.scale = num_heads, head_size, scale
        self.num_kv_heads = num_kv_heads or num_heads
        self.group = num_heads // self.num_kv_heads

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: DMSMetadata, output: torch.Tensor | None = None,
                output_scale=None, output_block_scale=None) -> torch.Tensor:
        assert output is not None, "DMS backend writes into vLLM's output buffer"
        if attn_metadata is None:  # profiling / dummy run: no arena traffic
            return output.fill_(0)
        from vllm_dms.worker.kernels.decode import decode_splits, dms_decode_attention, workspace_for
        from vllm_dms.worker.kernels.arena_ops import dms_decode_store
        from vllm_dms.worker.kernels.common import fp8_grid
        from vllm_dms.worker.kernels.pack import dms_prefill_pack
        from vllm_dms.worker.kernels.prefill import dms_prefill_attention, survivor_index
        md, rt = attn_metadata, attn_metadata.runtime
        dms, layout = rt.dms, rt.layout
        li = rt.layer_index[layer.layer_name]
        N, Hq, H, D, G = md.num_actual_tokens, self.num_heads, self.num_kv_heads, self.head_size, self.group
        q = query[:N].view(N, Hq, D)
        k = key[:N].view(N, H, D)
        v = value[:N].view(N, H, D)
        lanes = q[:, ::G, D - 1]  # [N, H]: the carried pre-RoPE decision lanes (a view)
        out = output[:N].view(N, Hq, D)
        kv = kv_cache.view(-1)
        pages = rt.layer_pages[li]
        nd = md.num_decodes
        # No clone/zero pass over q: every attention kernel reads the carrier lane as 0
        # (carrier=True), and the decode store computes the decision from it in-kernel.
        if nd:
            dms_decode_store(kv, layout, k[:nd], v[:nd], lanes[:nd], md.decode_pos,
                             md.slots[:nd], dms.decision_shift, pages, rt.overflow,
                             live=rt.slot_live, alpha=(dms.alpha_scale, dms.alpha_offset))
            acc, m, l_ = workspace_for(rt.ws, nd, decode_splits(nd, layout.num_kv_heads,
                                                                rt.ws.acc.shape[2]))
            dms_decode_attention(q[:nd], kv, layout, md.slots[:nd], self.scale, out[:nd],
                                 acc, m, l_, carrier=True)
        if md.num_prefills:
            dec = dms.decisions_from_lane(lanes[nd:])
            kp, vp = k[nd:], v[nd:]
            if layout.elem_bytes == 1:
                # prompt rows read the K/V the arena holds, as decode rows do (and stock vLLM's
                # fp8 cache): a prompt's output then does not depend on how it was chunked,
                # cached or preempted
                kp, vp = fp8_grid(kp), fp8_grid(vp)
            flags = dec
            if dms.decision_shift == 1:  # the decision at t flags t-1; a chunk's last flag waits
                flags = torch.cat([dec[1:], torch.zeros_like(dec[:1])])
                flags[md.prefill_last] = False
            if md.prefill_cont_slots is None:  # every prefill row is a first chunk
                index = survivor_index(flags)  # shared by attention and pack
                dms_prefill_attention(q[nd:], kp, vp, flags, md.prefill_cu, md.max_prefill_len,
                                      dms.window, self.scale, out[nd:], carrier=True,
                                      index=index)
                dms_prefill_pack(kv, layout, kp, vp, flags, md.prefill_cu, md.slots[nd:],
                                 pages, rt.overflow, live=rt.slot_live,
                                 max_seqlen=md.max_prefill_len, cum=index[1])
                self._snapshots(kv, kp, vp, flags, md, pages, index[1])
            else:
                self._chunked_prefill(q[nd:], kp, vp, dec, flags, kv, md, out[nd:], pages)
        if li == layout.num_layers - 1:
            rt.publish()
        return output

    @staticmethod
    def _snapshots(kv, k, v, flags, md: DMSMetadata, pages, cum=None) -> None:
        # Prefix snapshots: the first L tokens of a first chunk, packed into a cache slot as
        # their state after token L-1 (its flag is final here: the chunk holds token L).
        if md.snap_dst is None:
            return
        from vllm_dms.worker.kernels.pack import dms_prefill_pack
        rt = md.runtime
        dms_prefill_pack(kv, rt.layout, k, v, flags, md.snap_starts, md.snap_dst, pages,
                         rt.overflow, live=rt.slot_live, max_seqlen=md.max_prefill_len,
                         cum=cum, lens=md.snap_len)

    def _chunked_prefill(self, q, k, v, dec, flags, kv, md: DMSMetadata, out, pages) -> None:
        # Continuations first see (and then update) their rows; first chunks (n0 = 0) only see
        # themselves in dms_chunk_attention and are packed by dms_prefill_pack.
        from vllm_dms.worker.kernels.pack import dms_prefill_pack
        from vllm_dms.worker.kernels.chunked import (dms_chunk_attention, dms_chunk_flag_prev,
                                                     dms_chunk_pack)
        from vllm_dms.worker.kernels.prefill import survivor_index
        rt = md.runtime
        index = survivor_index(flags)  # shared by the attention and both first-chunk packs
        dms, layout, n0, cont = rt.dms, rt.layout, md.prefill_n0, md.prefill_cont_slots
        if dms.decision_shift == 1:  # each chunk's first decision flags the arena's last token
            dms_chunk_flag_prev(kv, layout, dec[md.prefill_cu[:-1].long()], n0, cont)
        dms_chunk_attention(q, k, v, flags, md.prefill_cu, n0, cont, kv, layout, dms.window,
                            self.scale, out, max_seqlen=md.max_prefill_len, carrier=True,
                            index=index)
        dms_prefill_pack(kv, layout, k, v, flags, md.prefill_cu, md.prefill_first_slots, pages,
                         rt.overflow, live=rt.slot_live, max_seqlen=md.max_prefill_len,
                         cum=index[1])
        self._snapshots(kv, k, v, flags, md, pages, index[1])
        dms_chunk_pack(kv, layout, k, v, flags, md.prefill_cu, n0, cont, pages, rt.overflow,
                       live=rt.slot_live)
