"""Memoized model calls for the CPU tests: a segment-anything or SAM 2 model whose image encoder and mask
decoder remember their outputs per input, so that a reference generator and the pipeline under test
share the expensive forwards when they make the same call (MobileSAM's decoder costs ~0.7 s per point
on a loaded 2-core CPU). A key is every tensor argument's shape, strides, dtype and bytes (and the other
arguments): a call that differs in any of them, layout included, runs the module. Outputs are cloned,
so no caller can change another's."""

import hashlib

import torch


def _key(value):
    if isinstance(value, torch.Tensor):
        t = value.detach()
        digest = hashlib.sha1(t.contiguous().cpu().numpy().tobytes()).hexdigest()
        return ("T", tuple(t.shape), t.stride(), str(t.dtype), digest)
    if isinstance(value, (list, tuple)):
        return tuple(_key(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _key(v)) for k, v in value.items()))
    return repr(value)


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


class Memo:
    """memo.wrap(module) replaces module.forward by a remembering one; memo.hits / misses count calls."""

    def __init__(self):
        self.cache, self.hits, self.misses = {}, 0, 0

    def wrap(self, module):
        forward = module.forward

        def remembered(*args, **kwargs):
            key = (id(module), _key(args), _key(kwargs))
            if key in self.cache:
                self.hits += 1
            else:
                self.misses += 1
                self.cache[key] = forward(*args, **kwargs)
            return _clone(self.cache[key])

        module.forward = remembered
        return module


def memoize(model):
    """Remember the image encoder and mask decoder of a segment-anything Sam or a sam2 SAM2Base."""
    memo = Memo()
    if hasattr(model, "sam_mask_decoder"):
        memo.wrap(model.image_encoder)
        memo.wrap(model.sam_mask_decoder)
    else:
        memo.wrap(model.image_encoder)
        memo.wrap(model.mask_decoder)
    return memo
