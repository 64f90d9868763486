"""SAM models: build them, fetch MobileSAM, read and write checkpoints (released and converted).

Model types: vit_b, vit_l, vit_h (Meta's SAM, built by segment-anything's registry), mobile_sam
(MobileSAM: a TinyViT image encoder with SAM's own prompt encoder and mask decoder), and SAM 2.1's
sam2.1_hiera_t / s / b+ / l (built by sam2's build_sam2 from its own configs; needs the sam2 extra).
"""

from ..families import MODEL_TYPES, family_of
from .build import build_model, build_sam, build_video_predictor, load_sparse_sam, load_weights, policy_from_manifest
from .checkpoints import (
    DTYPES,
    FORMAT_NAME,
    FORMAT_VERSION,
    FORMATS,
    MANIFEST_FIELDS,
    CheckpointError,
    infer_model_type,
    load_checkpoint,
    read_sparse_checkpoint,
    write_sparse_checkpoint,
)
from .fetch import (
    MOBILE_SAM_FILE,
    MOBILE_SAM_MEMBER,
    MOBILE_SAM_SHA256,
    MOBILE_SAM_SIZE,
    MOBILE_SAM_WHEEL,
    MOBILE_SAM_WHEEL_FILE,
    FetchError,
    cache_dir,
    fetch_mobile_sam,
    sha256_file,
)
