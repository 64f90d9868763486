"""The sparse forwards of SAM 2's video memory attention (sam2/modeling/memory_attention.py): its
RoPEAttention modules (memory.self and memory.cross) and the MemoryAttention around them.

SparseRoPEAttention: the same projections and rotary encoding as RoPEAttention.forward (sam2's freqs; the
rotation through kernels.rotary_embedding_: on the CPU SAM 2's complex float32 multiplication, so q and k are
bit for bit SAM 2's; on CUDA one Triton pass, equal to float32 rounding), then sam_sparse's kernel instead of
SDPA. Shapes (B rows = objects, one head of dim 256 in SAM 2.1):
- memory.self: q, k, v (B, N, 256), N = H * W frame tokens -> (B, N, 256); the layer's fixed block layout.
- memory.cross: q (B, N, 256); k, v (B, Nk, 64), Nk = frames * N + pointer tokens (num_k_exclude_rope;
  rotary encoding repeats over the frames and skips the pointers, rope_k_repeat). The block layout
  is the policy's for each row's MemoryLayout (patches/memory.py): conditioning frames from the recorded call.
  Packed (a MemoryCall with PackedKeys): k, v (1, sum of the rows' Nk, 64), the rows' memories one after
  the other; the kernel's varlen path attends each row's queries to its own keys.
memory.cross projects its values after the attention instead of before (values_late): with one head, softmax
rows summing to 1 give P (M W_v^T + b_v) = (P M) W_v^T + b_v for the memory M (Nk, 64), so the kernel reads
V of 64 columns instead of 256 (a quarter of the P V product and of V's bytes) and v_proj runs on the Nq queries
instead of the Nk keys. Equal up to float rounding; a query whose every key a sparse policy drops (the kernel
gives it zeros) gets v_proj's bias where SAM 2's order would give zeros (SDPA itself would give NaN there).
SparseMemoryAttention: MemoryAttention.forward, which also accepts such a packed memory (its own forward
asserts equal batch sizes); without a packed call it is MemoryAttention.forward itself.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from sam2.modeling.memory_attention import MemoryAttention
from sam2.modeling.sam.transformer import RoPEAttention

from ..kernels import block_sparse_attn, block_sparse_attn_varlen, rotary_embedding_
from .attention import LayerState
from .memory import MemoryCall, memory_block_layout, memory_geometry, row_layouts


class SparseRoPEAttention(RoPEAttention):
    """sam2's RoPEAttention through block_sparse_attn (memory.self / memory.cross). Same parameters.

    forward(q, k, v, num_k_exclude_rope=0) -> (B, Nq, embedding_dim), as the original. In training mode
    with dropout it runs RoPEAttention.forward: the kernel has no dropout and no backward.
    """

    _sam_sparse: LayerState

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_k_exclude_rope: int = 0) -> torch.Tensor:
        st = self._sam_sparse
        if self.training and self.dropout_p > 0:
            return super().forward(q, k, v, num_k_exclude_rope)
        call: Optional[MemoryCall] = st.context.current if st.context is not None else None
        packed = call.packed if call is not None and st.geometry.kind == "memory.cross" else None
        q = self._separate_heads(self.q_proj(q), self.num_heads)  # (B, nH, Nq, d)
        k = self._separate_heads(self.k_proj(k), self.num_heads)
        late = values_late(self, st)
        # (B, nH, Nk, C_mem) unprojected, or projected (B, nH, Nk, d) as RoPEAttention.forward
        v = v.unsqueeze(1).to(q.dtype) if late else self._separate_heads(self.v_proj(v), self.num_heads)
        # Rotary encoding as RoPEAttention.forward: its freqs (recomputed for a new grid), its rows (q's
        # token n and k's n % Nq: repeated over the memory frames; pointer tokens left out), in one pass per
        # tensor, in place (kernels.rotary_embedding_; SAM 2's complex float32 version on the CPU).
        side = math.sqrt(q.shape[-2])
        self.freqs_cis = self.freqs_cis.to(q.device)
        if self.freqs_cis.shape[0] != q.shape[-2]:
            self.freqs_cis = self.compute_cis(end_x=side, end_y=side).to(q.device)
        cos, sin = rope_table(st, self.freqs_cis)
        rotary_embedding_(q, cos, sin)
        if packed is not None:
            rotary_embedding_(k, cos, sin, packed.rope_rows)  # each row's frame tokens; -1 for pointer tokens
        elif k.shape[-2] - num_k_exclude_rope > 0:  # SAM 2 rotates no key when none is left (dropout, pointers only)
            num_k_rope = k.size(-2) - num_k_exclude_rope
            if num_k_rope != q.shape[-2] and not (self.rope_k_repeat and num_k_rope % q.shape[-2] == 0):
                raise ValueError(f"{st.name}: {num_k_rope} rotary-encoded keys for {q.shape[-2]} queries; expected as "
                                 f"many{', or a multiple (rope_k_repeat)' if self.rope_k_repeat else ' (rope_k_repeat is off)'}")
            rotary_embedding_(k[:, :, :num_k_rope], cos, sin)
        B, nH, Nq, d = q.shape
        scale = d ** -0.5  # SDPA's default, as RoPEAttention calls it (d: q's head dim, not v's)
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, N, nH, d) views
        if st.geometry.kind == "memory.self":
            out = self._self_attention(st, qt, kt, vt, scale)
        elif packed is None:
            out = self._cross_attention(st, call, qt, kt, vt, num_k_exclude_rope, scale)
        else:
            out = self._packed_cross_attention(st, packed, qt, kt, vt, scale)
        out = out.reshape(B, Nq, nH * out.shape[-1])
        return self.out_proj(self.v_proj(out) if late else out)

    def _self_attention(self, st: LayerState, q, k, v, scale: float) -> torch.Tensor:
        geom = st.geometry
        layout = st.encoder_layout(q.device)
        if layout is not None and q.shape[1] != geom.seqlen_q:
            raise ValueError(f"{st.name}: {q.shape[1]} frame tokens, but its block mask was built for the "
                             f"{geom.q_grid} grid; patch the model at the image size it runs at")
        if st.observer is not None:
            st.observer(geom, None, q, k, None, None, None, scale)
        return block_sparse_attn(q, k, v, layout, softmax_scale=scale, block_size=st.block_size)

    def _cross_attention(self, st: LayerState, call, q, k, v, num_ptr: int, scale: float) -> torch.Tensor:
        if st.observer is None and st.policy.keeps_all(st.geometry):
            # Dense whatever the memory: no per-call layouts, whose frame counts a compiled forward (SAM 2's
            # VOS predictor, dynamic shapes) would have to specialize on.
            return block_sparse_attn(q, k, v, None, softmax_scale=scale, block_size=st.block_size)
        B, Nq = q.shape[:2]
        side = math.isqrt(Nq)
        layouts = row_layouts(call, B, Nq, k.shape[1], num_ptr, (side, side))
        if st.observer is not None:
            for b, m in enumerate(layouts if len(set(layouts)) > 1 else layouts[:1]):
                rows = slice(b, b + 1) if len(set(layouts)) > 1 else slice(None)
                st.observer(memory_geometry(st.geometry, m), None, q[rows], k[rows], None, None, None, scale)
        layout = memory_block_layout(st, layouts, False, q.device)
        return block_sparse_attn(q, k, v, layout, softmax_scale=scale, block_size=st.block_size)

    def _packed_cross_attention(self, st: LayerState, packed, q, k, v, scale: float) -> torch.Tensor:
        B, Nq, nH, d = q.shape
        if len(packed.layouts) != B:
            raise ValueError(f"{st.name}: {B} query rows but the packed memory has {len(packed.layouts)}")
        if st.observer is not None:
            cu = packed.cu_seqlens_k.tolist()
            for b, m in enumerate(packed.layouts):
                st.observer(memory_geometry(st.geometry, m), None, q[b:b + 1], k[:, cu[b]:cu[b + 1]], None, None,
                            None, scale)
        layout = memory_block_layout(st, packed.layouts, True, q.device)
        out = block_sparse_attn_varlen(
            q.reshape(B * Nq, nH, d), k.reshape(-1, nH, d), v.reshape(-1, nH, v.shape[-1]), packed.cu_seqlens_q,
            packed.cu_seqlens_k, Nq, packed.max_seqlen_k, layout, softmax_scale=scale, block_size=st.block_size,
        )
        return out.view(B, Nq, nH, -1)


def values_late(attn: RoPEAttention, st: LayerState) -> bool:
    """Whether memory.cross projects its values after the attention (module docstring): one head, whose
    memory features are narrower than its head dim (SAM 2.1: 64 against 256)."""
    return (st.geometry.kind == "memory.cross" and attn.num_heads == 1
            and attn.v_proj.in_features < attn.v_proj.out_features)


def rope_table(st: LayerState, freqs_cis: torch.Tensor):
    """(cos, sin) (T, D/2) float32 contiguous of a RoPE table freqs_cis (T, D/2) complex, made once per table."""
    if torch.compiler.is_compiling():  # traced: no data pointer to key a cache by, and nothing to save
        return freqs_cis.real.contiguous(), freqs_cis.imag.contiguous()
    key = ("rope", freqs_cis.data_ptr(), tuple(freqs_cis.shape), freqs_cis.device)
    table = st.tables.get(key)
    if table is None:  # returned from here, not read back: another thread may replace it meanwhile
        table = (freqs_cis.real.contiguous(), freqs_cis.imag.contiguous())
        if st.tables:  # one table per layer at a time: a new grid replaces the old one
            st.tables.clear()
            st.dropped += 1
        st.tables[key] = table
    return table


class SparseMemoryAttention(MemoryAttention):
    """sam2's MemoryAttention that also takes the memories of several objects packed one after the other.

    forward(curr, memory, curr_pos, memory_pos, num_obj_ptr_tokens): MemoryAttention.forward, unless the
    current MemoryCall (patches/memory.py) is packed: then curr, curr_pos are (N, B, C) for B objects and
    memory, memory_pos (sum of the objects' keys, 1, C_mem); the layers run on them as MemoryAttention's
    do (through their __call__) and each cross-attention reads the packing from the call. Returns (N, B, C).
    """

    def forward(self, curr, memory, curr_pos=None, memory_pos=None, num_obj_ptr_tokens: int = 0):
        ctx = packing_context(self)
        call = ctx.current if ctx is not None else None
        if call is None or call.packed is None:
            return super().forward(curr, memory, curr_pos, memory_pos, num_obj_ptr_tokens)
        if isinstance(curr, list):
            (curr,), (curr_pos,) = curr, curr_pos
        output = curr
        if self.pos_enc_at_input and curr_pos is not None:
            output = output + 0.1 * curr_pos
        # batch first (packable() admits batch_first modules only)
        output, curr_pos = output.transpose(0, 1), curr_pos.transpose(0, 1)
        memory, memory_pos = memory.transpose(0, 1), memory_pos.transpose(0, 1)
        for layer in self.layers:
            output = layer(tgt=output, memory=memory, pos=memory_pos, query_pos=curr_pos)
        return self.norm(output).transpose(0, 1)


def packing_context(memory_attention: MemoryAttention):
    """The MemoryContext of a patched memory attention (its first cross-attention's), or None."""
    if not len(memory_attention.layers):
        return None
    state = getattr(memory_attention.layers[0].cross_attn_image, "_sam_sparse", None)
    return state.context if state is not None else None


def packable(memory_attention) -> bool:
    """Whether `memory_attention` runs a packed call: it is a SparseMemoryAttention whose forward is the
    class's (SAM2VideoPredictorVOS replaces it with a compiled MemoryAttention.forward), batch first, and
    every layer's cross-attention is patched."""
    return (type(memory_attention) is SparseMemoryAttention and "forward" not in vars(memory_attention)
            and memory_attention.batch_first
            and all(hasattr(layer.cross_attn_image, "_sam_sparse") for layer in memory_attention.layers))
