"""Combinators: masks built from other, already built masks (union, intersection, a per-head split)."""

from __future__ import annotations

from .grid import MaskMod


def and_masks(*mods: MaskMod) -> MaskMod:
    """Keep a block where every mod keeps it."""

    def and_mask(ctx, b, h, q, k):
        out = mods[0](ctx, b, h, q, k)
        for m in mods[1:]:
            out = out & m(ctx, b, h, q, k)
        return out

    and_mask.__name__ = "and_" + "_".join(m.__name__ for m in mods)
    return and_mask


def or_masks(*mods: MaskMod) -> MaskMod:
    """Keep a block where any mod keeps it."""

    def or_mask(ctx, b, h, q, k):
        out = mods[0](ctx, b, h, q, k)
        for m in mods[1:]:
            out = out | m(ctx, b, h, q, k)
        return out

    or_mask.__name__ = "or_" + "_".join(m.__name__ for m in mods)
    return or_mask


def hybrid(sparse: MaskMod, dense_fraction: float = 0.25) -> MaskMod:
    """The first max(1, round(dense_fraction * num_heads)) heads dense, the others `sparse`."""

    def first_heads_dense(ctx, b, h, q, k):
        n_dense = max(1, round(dense_fraction * h.shape[1]))
        return (h < n_dense) | sparse(ctx, b, h, q, k)

    return first_heads_dense


def only_on_kinds(kinds, mod: MaskMod) -> MaskMod:
    """`mod` on layers whose kind is in `kinds`, every block elsewhere."""
    kinds = tuple(kinds)

    def on_listed_kinds(ctx, b, h, q, k):
        if ctx.layer.kind in kinds:
            return mod(ctx, b, h, q, k)
        return (q >= 0) & (k >= 0)

    return on_listed_kinds
