"""SAM's mask decoder (segment-anything's, or SAM 2's) for a batch of prompts on one image, with the
image-side work the prompts share done once and the rest moved to the side with fewer rows: the
Mode(decoder="factored") of the mask pipeline.

MaskDecoder repeats the image embedding once per prompt, then runs every projection of its two-way
transformer on each copy: for 1024 points, 1024 copies of a 4096 x 256 image. Here:
  - the first layer's image side (embedding + dense prompt, with positions) is the same for every prompt
    whose dense prompt is the same (no mask input, as in automatic mask generation), so its projections
    run once, and all prompts' tokens attend to it as one (1, heads, B * tokens) attention;
  - image-side projections are folded into the token side, which has a few rows per prompt (7 for SAM 1's
    point prompts, 8 for SAM 2's), not 4096: q . (Wk k + bk) = (Wk^T q) . k + q . bk, where q . bk is the
    same for every key of a row and softmax drops it; sum_i p_i (Wv v_i + bv) = Wv (sum_i p_i v_i) + bv,
    since p sums to 1; likewise for the image-to-token queries and output projection. Each fold multiplies
    the image by heads x tokens (56) columns instead of the projection's 128: about 2.3x fewer
    multiply-adds for SAM 1 (2x for SAM 2), 2.9x over the whole transformer with the shared first layer;
  - the image's attention to the tokens, its residual add, LayerNorm and positional add run as one fused
    kernel on CUDA (kernels.few_key_attention_norm): per prompt, only the image's new state and it plus
    positions are written (4 GiB each for 1024 prompts), not the scores, the attention output or the sum;
  - the output upscaling and the hypernetwork products run as one fused kernel on CUDA
    (kernels.upscale_project), which never writes the 4x upscaled maps, and only for the masks returned;
    SAM 2's high-resolution features, the same for every prompt, are added inside it.
Every product runs in the dtype the model's decoder would use (float32, unless the caller's autocast asks
for bf16); sums run in another order than SAM's, so logits differ by rounding (a mask whose score sits on a
threshold can change): how much is measured, not assumed (tests/test_point_decoder.py, bench_amg's
variants).

Only with dense decoder attention (patches.dense_attention): a sparse decoder policy keeps the model's
own decoder. SAM 2's object-score logits and mask tokens for the object pointer (video) are not returned.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import few_key_attention_norm, upscale_project


def _layer_norm_2d(m: nn.Module) -> bool:
    """segment-anything's or sam2's LayerNorm2d (the same formula: over channels, eps inside the root)."""
    return type(m).__name__ == "LayerNorm2d" and type(m).__module__.split(".")[0] in ("segment_anything", "sam2")


def check_factorable(mask_decoder: nn.Module) -> None:
    """ValueError unless the decoder has segment-anything's (or SAM 2's) MaskDecoder layout: a two-way
    transformer whose first layer skips positions in its self-attention and whose image-side norms are
    affine LayerNorms, and an output upscaling of
    ConvTranspose2d (2x2, stride 2), LayerNorm2d, GELU, ConvTranspose2d (2x2, stride 2), GELU."""
    tf = getattr(mask_decoder, "transformer", None)
    layers = getattr(tf, "layers", None)
    up = getattr(mask_decoder, "output_upscaling", None)
    kinds = (nn.ConvTranspose2d, None, nn.GELU, nn.ConvTranspose2d, nn.GELU)
    ok = (
        layers is not None and len(layers) > 0 and hasattr(tf, "final_attn_token_to_image")
        and [layer.skip_first_layer_pe for layer in layers] == [True] + [False] * (len(layers) - 1)
        and all(type(layer.norm4) is nn.LayerNorm and layer.norm4.weight is not None and layer.norm4.bias is not None
                for layer in layers)
        and isinstance(up, nn.Sequential) and len(up) == 5 and _layer_norm_2d(up[1])
        and all(k is None or isinstance(m, k) for m, k in zip(up, kinds))
        and all(up[i].kernel_size == (2, 2) and up[i].stride == (2, 2) and up[i].padding == (0, 0)
                and up[i].output_padding == (0, 0) and up[i].groups == 1 and up[i].dilation == (1, 1)
                for i in (0, 3))
        and all(up[i].approximate == "none" for i in (2, 4))
    )
    if not ok:
        raise ValueError(f"{type(mask_decoder).__name__}: the factored decoder needs segment-anything's or SAM 2's "
                         "MaskDecoder (a TwoWayTransformer with affine LayerNorms; upscaling ConvTranspose2d 2x2 stride 2, "
                         "LayerNorm2d, GELU, ConvTranspose2d 2x2 stride 2, GELU)")


def _heads(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, N, D) -> (B, n, N, D / n)."""
    B, N, D = x.shape
    return x.view(B, N, n, D // n).transpose(1, 2)


def token_to_image(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """segment-anything's Attention(q, k, v) with tokens attending to the image: q (B, T, C); k, v
    (1, N, C) shared by every prompt, or (B, N, C). Returns (B, T, C)."""
    nh, d = attn.num_heads, attn.internal_dim // attn.num_heads
    B, T, C = q.shape
    qp = attn.q_proj(q)
    if k.shape[0] == 1:  # one image for every prompt: project it once, attend with all B * T rows
        qh = qp.reshape(1, B * T, nh, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(qh, _heads(attn.k_proj(k), nh), _heads(attn.v_proj(v), nh))
        return attn.out_proj(out.transpose(1, 2).reshape(B, T, nh * d))
    qk = torch.einsum("bhtd,hdc->bhtc", _heads(qp, nh), attn.k_proj.weight.view(nh, d, C))
    p = torch.softmax(torch.bmm(qk.reshape(B, nh * T, C), k.transpose(1, 2)) / math.sqrt(d), dim=-1)
    pv = torch.bmm(p, v).view(B, nh, T, C)  # (B, heads, T, C): the softmax-weighted image, per head
    out = torch.einsum("bhtc,hdc->bthd", pv, attn.v_proj.weight.view(nh, d, C)) + attn.v_proj.bias.view(nh, d)
    return attn.out_proj(out.reshape(B, T, nh * d))


def image_to_token_norm(attn: nn.Module, norm: nn.LayerNorm, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        residual: torch.Tensor, pe: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """norm(residual + Attention(q, k, v)) with the image attending to the tokens, and that plus pe: q (1, N,
    C) shared by every prompt, or (B, N, C); k, v (B, T, C); residual (1 | B, N, C); pe (1, N, C). Returns
    two (B, N, C), float32 (float64 for float64 q): kernels.few_key_attention_norm, fused on CUDA."""
    nh, d = attn.num_heads, attn.internal_dim // attn.num_heads
    C = k.shape[2]
    kh = _heads(attn.k_proj(k), nh)  # (B, heads, T, d)
    kq = torch.einsum("bhtd,hdc->bhtc", kh, attn.q_proj.weight.view(nh, d, C))  # the keys in q's channels
    kb = torch.einsum("bhtd,hd->bht", kh, attn.q_proj.bias.view(nh, d))
    u = torch.einsum("bhtd,chd->bhtc", _heads(attn.v_proj(v), nh), attn.out_proj.weight.view(C, nh, d))
    scale = 1 / math.sqrt(d)
    return few_key_attention_norm(q, kq, u, residual, norm.weight, norm.bias, norm.eps, softmax_scale=scale,
                                  k_bias=kb * scale, out_bias=attn.out_proj.bias, pos=pe)


def decode_points(mask_decoder: nn.Module, image_embeddings: torch.Tensor, image_pe: torch.Tensor,
                  sparse: torch.Tensor, dense: torch.Tensor, multimask_output: bool,
                  high_res_features: Optional[Sequence[torch.Tensor]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """MaskDecoder.forward's masks and predicted IoUs for B prompts on one image (check_factorable first).

    image_embeddings, image_pe: (1, C, h, w); sparse: (B, S, C) prompt tokens; dense: (1, C, h, w), the
    one dense prompt of every prompt (no mask input); high_res_features: SAM 2's (1, C/8, 4h, 4w) and
    (1, C/4, 2h, 2w) maps when its decoder uses them. Returns logits (B, M, 4h, 4w) (float32; float64 for
    float64 inputs) and predicted IoUs (B, M): M = 3 with multimask_output (mask tokens 1-3), else 1 (token
    0, or SAM 2's choice by stability where its decoder makes one, in eval mode), as the decoder's forward.
    """
    dec, tf = mask_decoder, mask_decoder.transformer
    B = sparse.shape[0]
    _, C, h, w = image_embeddings.shape
    first = [dec.obj_score_token.weight] if getattr(dec, "pred_obj_scores", False) else []  # SAM 2's extra token
    output_tokens = torch.cat(first + [dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
    tokens = torch.cat([output_tokens.unsqueeze(0).expand(B, -1, -1), sparse], dim=1)
    keys = (image_embeddings + dense).flatten(2).transpose(1, 2)  # (1, hw, C) until the first image update
    pe = image_pe.flatten(2).transpose(1, 2)
    queries, keys_pe = tokens, keys + pe
    for layer in tf.layers:
        if layer.skip_first_layer_pe:
            queries = layer.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + tokens
            queries = queries + layer.self_attn(q=q, k=q, v=queries)
        queries = layer.norm1(queries)
        queries = layer.norm2(queries + token_to_image(layer.cross_attn_token_to_image, queries + tokens, keys_pe, keys))
        queries = layer.norm3(queries + layer.mlp(queries))
        keys, keys_pe = image_to_token_norm(layer.cross_attn_image_to_token, layer.norm4, keys_pe, queries + tokens,
                                            queries, keys, pe)
    queries = tf.norm_final_attn(queries + token_to_image(tf.final_attn_token_to_image, queries + tokens, keys_pe, keys))
    s = len(first)  # the IoU token's row
    by_stability = not multimask_output and getattr(dec, "dynamic_multimask_via_stability", False) and not dec.training
    chosen = range(0, dec.num_mask_tokens) if by_stability else range(1, dec.num_mask_tokens) if multimask_output \
        else range(0, 1)
    hyper = torch.stack([dec.output_hypernetworks_mlps[i](queries[:, s + 1 + i]) for i in chosen], dim=1)
    iou = dec.iou_prediction_head(queries[:, s])[:, chosen.start:chosen.stop]
    up1, norm, _, up2, _ = dec.output_upscaling
    add1 = add2 = None
    if getattr(dec, "use_high_res_features", False):
        add2, add1 = high_res_features  # SAM 2: feat_s1 before the LayerNorm, feat_s0 before the last GELU
    keys = keys.expand(B, -1, -1)  # a decoder with no image update still gives every prompt its masks
    masks = upscale_project(keys, (h, w), up1.weight, up1.bias, norm.weight, norm.bias, norm.eps,
                            up2.weight, up2.bias, hyper, add1, add2)
    if by_stability:  # SAM 2's own rule on all four masks: its decoder's method, as its forward calls it
        return dec._dynamic_multimask_via_stability(masks, iou)  # (sam2 pinned < 1.2 in pyproject.toml)
    return masks, iou
