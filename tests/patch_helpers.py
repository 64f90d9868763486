"""Small random SAM models and policies for the patch tests (CPU-sized)."""

import io
from functools import partial

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from sam_sparse.policy import Policy


def pickled(model):
    """model through torch.save and torch.load, whole (a whole-model pickle needs the full unpickler)."""
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def randomize_(model, std=0.5, seed=0):
    """SAM zero-initializes rel_pos_h / rel_pos_w (and pos_embed): randomize them so they matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rel_pos" in name or name.endswith("pos_embed"):
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def small_encoder(img_size=256, depth=4, embed_dim=128, num_heads=4, window_size=7, global_attn_indexes=(1, 3),
                  out_chans=256, seed=0):
    """A SAM ViT at reduced size; window 7 on a 16x16 grid exercises SAM's zero padding (16 -> 21)."""
    torch.manual_seed(seed)
    enc = ImageEncoderViT(
        img_size=img_size, patch_size=16, embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=4.0,
        out_chans=out_chans, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
        window_size=window_size, global_attn_indexes=global_attn_indexes,
    )
    return randomize_(enc.eval(), seed=seed)


def small_sam(seed=0, img_size=256, **encoder_kwargs):
    """A Sam with a small ViT and SAM's real mask decoder (256 dims, 8 heads: head dims 32 and 16)."""
    enc = small_encoder(img_size=img_size, seed=seed, **encoder_kwargs)
    torch.manual_seed(seed + 1)
    grid = img_size // 16
    sam = Sam(
        image_encoder=enc,
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(grid, grid),
                                     input_image_size=(img_size, img_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(
            depth=2, embedding_dim=256, mlp_dim=512, num_heads=8), transformer_dim=256,
            iou_head_depth=3, iou_head_hidden_dim=64),
    )
    return sam.eval()


def small_policy(pattern="local2d", params=None, block_size=16, token_order="tiles", name="small-sparse",
                 match="encoder.global", extra_rules=()):
    """A sparse policy sized for a 16x16 grid (block 16 = a 4x4 tile), dense elsewhere."""
    rule = {"match": match, "pattern": pattern}
    if params:
        rule["params"] = params
    return Policy.from_dict({"name": name, "block_size": block_size, "token_order": token_order,
                             "rules": [rule, *extra_rules, {"match": "*", "pattern": "dense"}]})


def make_image(size=256, seed=0):
    """An HxWx3 uint8 image with some structure (a bright disc on a gradient)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size * 3 // 4), indexing="ij")
    disc = ((yy - size // 2) ** 2 + (xx - size // 3) ** 2) < (size // 5) ** 2
    img = torch.stack([xx * 255 // xx.max(), yy * 255 // yy.max(), disc * 200], -1).float()
    img = img + torch.randn(img.shape, generator=g) * 10
    return img.clamp(0, 255).to(torch.uint8).numpy()
