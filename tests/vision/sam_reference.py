"""Imports ``segment_anything`` (the reference) for tests and benchmarks, without torchvision.

``segment_anything`` imports torchvision for two image helpers (``resize``,
``to_pil_image``) and two box ops (``batched_nms``, ``box_area``). PyPI's torchvision is a
CUDA build that fails to load next to the CPU torch (``/work/shared/ORACLES.md``), so when
torchvision is not importable a stand-in module is registered with those four functions,
written the way torchvision defines them: PIL's bilinear resize of a uint8 image, and greedy
NMS that keeps boxes in descending score order, applied per category by offsetting each
category's boxes apart.
"""

from __future__ import annotations

import importlib
import sys
import types


def _stub_torchvision() -> None:
    import numpy as np
    import torch
    from PIL import Image

    def to_pil_image(pic):
        return Image.fromarray(np.asarray(pic))

    def resize(img, size):
        h, w = size
        return img.resize((w, h), Image.BILINEAR)

    def box_area(boxes):
        return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])

    def nms(boxes, scores, iou_threshold):
        order = torch.argsort(scores, descending=True, stable=True)
        boxes = boxes[order]
        area = box_area(boxes)
        keep, suppressed = [], torch.zeros(len(order), dtype=torch.bool)
        for i in range(len(order)):
            if suppressed[i]:
                continue
            keep.append(int(order[i]))
            lt = torch.maximum(boxes[i, :2], boxes[:, :2])
            rb = torch.minimum(boxes[i, 2:], boxes[:, 2:])
            inter = (rb - lt).clamp(min=0).prod(dim=1)
            iou = inter / (area[i] + area - inter)
            suppressed |= iou > iou_threshold
        return torch.as_tensor(keep, dtype=torch.int64)

    def batched_nms(boxes, scores, idxs, iou_threshold):
        if boxes.numel() == 0:
            return torch.empty((0,), dtype=torch.int64)
        offsets = idxs.to(boxes) * (boxes.max() + 1)
        return nms(boxes + offsets[:, None], scores, iou_threshold)

    tv = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    functional.resize, functional.to_pil_image = resize, to_pil_image
    ops = types.ModuleType("torchvision.ops")
    boxes_mod = types.ModuleType("torchvision.ops.boxes")
    boxes_mod.batched_nms, boxes_mod.box_area, boxes_mod.nms = batched_nms, box_area, nms
    tv.transforms, transforms.functional, tv.ops, ops.boxes = transforms, functional, ops, boxes_mod
    return {
        "torchvision": tv,
        "torchvision.transforms": transforms,
        "torchvision.transforms.functional": functional,
        "torchvision.ops": ops,
        "torchvision.ops.boxes": boxes_mod,
    }


def _drop_torchvision() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def segment_anything():
    """The ``segment_anything`` package (``ImportError`` if it is not installed).

    Without a working torchvision, the stand-in modules are registered only while
    ``segment_anything`` imports (its modules keep the functions they imported) and removed
    afterwards, so other libraries in the same process (transformers checks for torchvision
    with ``find_spec``) still see no torchvision.
    """
    if "segment_anything" in sys.modules:
        return sys.modules["segment_anything"]
    try:
        importlib.import_module("torchvision")
        return importlib.import_module("segment_anything")
    except ImportError as e:
        if "segment_anything" in str(e):
            raise
    except Exception:  # the CUDA build failing to load its operators
        pass
    _drop_torchvision()
    sys.modules.update(_stub_torchvision())
    try:
        return importlib.import_module("segment_anything")
    finally:
        _drop_torchvision()


def build_tiny(seed: int = 0, randomize_all: bool = True, **overrides):
    """A reference ``Sam`` with ``sam-tiny``'s sizes, every parameter drawn at random.

    Random (not the reference's init) so that zero-initialised tables and biases are tested;
    ``randomize_all=False`` keeps torch's init (seeded), whose masks vary across the image.
    """
    from functools import partial

    import torch

    sa = segment_anything()
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    cfg = dict(image_size=64, patch_size=8, window_size=3, dim=32, depth=2, heads=2)
    cfg.update(overrides)
    grid = cfg["image_size"] // cfg["patch_size"]
    torch.manual_seed(seed)
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=cfg["image_size"],
            patch_size=cfg["patch_size"],
            embed_dim=cfg["dim"],
            depth=cfg["depth"],
            num_heads=cfg["heads"],
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=(cfg["depth"] - 1,),
            window_size=cfg["window_size"],
            out_chans=32,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=32,
            image_embedding_size=(grid, grid),
            input_image_size=(cfg["image_size"], cfg["image_size"]),
            mask_in_chans=8,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=32, mlp_dim=64, num_heads=2),
            transformer_dim=32,
            iou_head_depth=3,
            iou_head_hidden_dim=32,
        ),
    )
    del sa
    return randomize(sam, seed) if randomize_all else sam.eval()


def randomize(model, seed: int):
    """Every parameter of a torch model redrawn: norms' scales near 1, the rest N(0, 0.3^2)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight") and p.ndim == 1:
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.3 * noise)
    return model.eval()
