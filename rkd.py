#!/usr/bin/env python3
"""rkd.py -- reverse knowledge distillation for retinal image matching, in one file.

Two fundus photographs of the same eye are registered by detecting keypoints (vessel
bifurcations and crossings), describing them, matching the descriptors and fitting a
homography. The file reads top to bottom in the order the data flows:

  1. Configuration ............... every constant named once
  2. Preprocessing ............... SuperRetina, implementation details (green, CLAHE, gamma)
  3. Networks .................... SuperRetina, network architecture; RKD, the LK teacher and
                                   the transformer student
  4. Inference pipeline .......... SuperRetina, keypoint detection / description at test time
                                   and its two-stage "matching trick"
  5. FIRE evaluation ............. FIRE (Hernandez-Matas et al. 2017), protocol as SuperRetina
                                   and RKD report it (AUC over 1..25 px per category, mAUC)
  6. Synthetic fundus generator .. ours: the embedded benchmark and exact keypoint labels
  7. Training data ............... SuperRetina's labelled ("Lab") layout, vessel-map junctions,
                                   unlabelled folders, synthetic images
  8. Losses and PKE .............. SuperRetina, semi-supervised training: Dice detector loss,
                                   progressive keypoint expansion, triplet descriptor loss
  9. Training loops .............. train-cnn (SuperRetina's training), distill (RKD's reverse
                                   distillation; Hajabdollahi et al. 2020 for large-to-small), DDP
 10. Command line

Papers: Liu et al., "Semi-Supervised Keypoint Detector and Descriptor for Retinal Image
Matching" (SuperRetina, ECCV 2022); Nasser et al., "Reverse Knowledge Distillation: Training a
Large Model using a Small One for Retinal Image Matching on Limited Data" (RKD, WACV 2024);
Hajabdollahi et al. 2020 (large-to-small distillation through unlabelled images).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

# =============================================================================================
# 1. Configuration
# =============================================================================================


@dataclass
class Config:
    """Every tunable number in one place; argparse defaults are read from here."""
    # inference (SuperRetina's test settings)
    size: int = 768                 # network input side; images are resized to size x size
    nms_radius: int = 10            # keypoints closer than this (model px) are suppressed
    nms_threshold: float = 0.01     # minimum heatmap value of a keypoint at test time
    border: int = 4                 # keypoints this close to the image edge are dropped
    max_keypoints: int = 2048       # strongest keypoints kept per image
    ratio: float = 0.9              # Lowe ratio for kNN matching of learned descriptors
    sift_ratio: float = 0.8         # ... and of SIFT's, Lowe's own value (tuned on FIRE-dev only)
    method: str = "ransac"          # cv2.findHomography estimator: ransac | lmeds (SuperRetina's). LMEDS
                                    # needs a majority of right matches; on the synthetic benchmark
                                    # RANSAC lifts SIFT 0.66 -> 0.97 and the LK teacher 0.00 -> 0.68
    ransac_px: float = 5.0          # RANSAC reprojection threshold, in model pixels
    trick: bool = True              # SuperRetina's two-stage "matching trick"
    # training (SuperRetina / RKD defaults)
    epochs: int = 150
    batch: int = 4
    lr: float = 1e-4
    grad_clip: float = 1.0          # max gradient norm: a single spike can kill the sigmoid detector
    seed: int = 42
    crop: int = 0                   # 0 = whole image, else random crop side (model px)
    blur_size: int = 13             # Gaussian that turns point labels into heat targets
    blur_sigma: float = 2.0
    pke_start: int = 1              # epochs of plain label Dice before PKE and its consistency term
                                    # (SuperRetina's pke_start_epoch): a featureless map satisfies the
                                    # consistency term, so the detector must first learn to peak
    pke_threshold: float = 0.5      # geometric filter: warped heatmap must reach this
    pke_ratio: float = 0.7          # content filter: descriptor ratio test
    pke_match_px: float = 4.0       # content filter: nearest descriptor must sit this close
    learned_weight: float = 0.5     # label weight of a PKE-learned point (initial labels: 1)
    value_decay: float = 0.5        # value map: points not found again decay by this factor
    value_threshold: float = 1.0    # value map: a point is learned at this value
    margin: float = 0.8             # triplet margin on cosine distance
    gor_weight: float = 1.0         # global orthogonal regulariser weight
    triplet_points: int = 256       # descriptor points per image in a triplet batch
    negative_px: float = 8.0        # points this close to the anchor are never its negatives
    strong_affine: tuple = (15.0, 0.2, 0.9, 1.35)   # PKE warp: degrees, translation, scales
    descriptor_affine: tuple = (10.0, 0.2, 0.95, 1.35)   # descriptor warp (SuperRetina's)


CFG = Config()
FIRE_CATEGORIES = ("S", "P", "A")
FIRE_FULL_COUNTS = {"S": 71, "P": 48, "A": 14}   # 134 pairs less P37
FIRE_EXCLUDED = ("P37",)                          # its ground truth is known to be wrong
AUC_LIMIT = 25                                    # AUC thresholds 1..25 px (original frame)
INACCURATE_MAX, INACCURATE_MEDIAN = 50.0, 20.0
CHECKPOINT_FORMAT = "rkd-checkpoint-v1"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
SHIPPED = {"lk": "lk_teacher.pt", "student": "rkd_student.pt",
           "superretina": "superretina_teacher.pt", "direct": "direct_transformer.pt"}
ATTENTION_WINDOW = 256                            # px: the student's ViT attends within such squares
DEFAULT_ORDER = ("lk", "student", "superretina", "direct")   # best shipped first, by FIRE-dev mAUC (README)


class UserError(Exception):
    """Bad input: reported as one line on stderr with a non-zero exit, never a traceback."""


def progress(iterable, desc, quiet=False, **kw):
    # disable=None: no bars when stderr is not a terminal (logs, pipes, CI)
    return tqdm(iterable, desc=desc, disable=True if quiet else None, leave=False, dynamic_ncols=True, **kw)


def write_atomic(path, data: bytes):
    """Write to a temporary name beside `path`, then rename: a crash never leaves half a file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".")
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException as e:                      # Ctrl-C included: leave no temporary behind
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise UserError(f"cannot write {path}: {e.strerror or e}") from None
        raise


def write_png(path, image):
    write_atomic(path, cv2.imencode(".png", image)[1].tobytes())


def check_writable(path):
    """Fail before the work, not after it, when an output cannot be written."""
    parent = Path(path).parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK) or (Path(path).exists() and not os.access(path, os.W_OK)):
        raise UserError(f"cannot write {path}: permission denied")


# =============================================================================================
# 2. Image input and preprocessing (SuperRetina, implementation details)
# =============================================================================================

def read_image(path) -> np.ndarray:
    """BGR uint8 image; unreadable or truncated files are a UserError (OpenCV would only warn)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    truncated = ((data[:2] == b"\xff\xd8" and b"\xff\xd9" not in data[-4096:]) or
                 (data[:4] == b"\x89PNG" and b"IEND" not in data[-64:]))
    if image is None or truncated:
        raise UserError(f"{path}: not a readable image" + (" (truncated)" if truncated else ""))
    return image


def preprocess(bgr: np.ndarray, size: int) -> np.ndarray:
    """Fundus photograph -> size x size float32 in [0, 1], as SuperRetina feeds its network.

    Green channel (best vessel contrast), z-score then min-max to 0..255, CLAHE (clip 2, 8x8
    tiles), gamma 1.2, then resize. The first steps run at the original resolution so CLAHE's
    tiles see the same anatomy whatever the model size.
    """
    g = bgr[:, :, 1].astype(np.float32)
    g = (g - g.mean()) / (g.std() + 1e-8)
    g = (g - g.min()) / (g.max() - g.min() + 1e-8) * 255.0
    g = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(g.astype(np.uint8))
    gamma_lut = ((np.arange(256) / 255.0) ** (1.0 / 1.2) * 255.0).astype(np.uint8)
    g = cv2.LUT(g, gamma_lut)
    g = cv2.resize(g, (size, size), interpolation=cv2.INTER_AREA if g.shape[0] > size else cv2.INTER_LINEAR)
    return g.astype(np.float32) / 255.0


def model_to_original(shape, size) -> np.ndarray:
    """3x3 matrix taking model-pixel coordinates to original-pixel coordinates (pixel centres)."""
    h, w = shape[:2]
    sx, sy = w / size, h / size
    return np.array([[sx, 0, (sx - 1) / 2], [0, sy, (sy - 1) / 2], [0, 0, 1]], np.float64)


def apply_homography(H, pts) -> np.ndarray:
    pts = np.asarray(pts, np.float64).reshape(-1, 2)
    p = np.c_[pts, np.ones(len(pts))] @ np.asarray(H, np.float64).T
    return p[:, :2] / p[:, 2:3]


# =============================================================================================
# 3. Networks (SuperRetina's architecture; RKD's LK teacher and transformer student)
# =============================================================================================

def double_conv(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(inplace=True))


class LKBlock(nn.Module):
    """LKU-Net block (Jia et al. 2022) as RKD uses it: identity + 1x1 + 3x3 + 5x5, summed, PReLU.

    The parallel kernels widen the receptive field at almost no cost; RKD reports the change
    lifts SuperRetina's FIRE mAUC (0.755 -> 0.761)."""

    def __init__(self, c):
        super().__init__()
        self.k1, self.k3, self.k5 = (nn.Conv2d(c, c, k, padding=k // 2) for k in (1, 3, 5))
        self.act = nn.PReLU(c)

    def forward(self, x):                                    # B x C x H x W -> same
        return self.act(x + self.k1(x) + self.k3(x) + self.k5(x))


def encoder_stage(cin, cout, large_kernel):
    if large_kernel:   # RKD: a 3x3 conv to change width, then the LKU-Net block
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.PReLU(cout), LKBlock(cout))
    return double_conv(cin, cout)


class DetectorDecoder(nn.Module):
    """U-Net decoder: from 1/8 back to full resolution with skips, 1x1 conv, sigmoid heatmap."""

    def __init__(self, c1, c2, c3, c4):
        super().__init__()
        self.up3, self.up2, self.up1 = double_conv(c3 + c4, c3), double_conv(c2 + c3, c2), double_conv(c1 + c2, c1)
        self.head = nn.Conv2d(c1, 1, 1)

    def forward(self, x1, x2, x3, x4):     # x1 B x c1 x H x W ... x4 B x c4 x H/8 x W/8
        def up(a, b):
            return torch.cat([F.interpolate(a, size=b.shape[-2:], mode="bilinear", align_corners=True), b], 1)
        y = self.up3(up(x4, x3))
        y = self.up2(up(y, x2))
        y = self.up1(up(y, x1))
        return torch.sigmoid(self.head(y))                   # B x 1 x H x W


class DescriptorHead(nn.Module):
    """SuperRetina's descriptor: 3x3 conv, 4x4 stride-2 conv, 1x1 conv, L2-normalise, 2x
    transposed conv, L2-normalise. The stride-2/transposed pair widens context while the
    output stays on the 1/8 grid."""

    def __init__(self, cin, dim=256):
        super().__init__()
        self.a = nn.Conv2d(cin, 256, 3, padding=1)
        self.b = nn.Conv2d(256, dim, 4, stride=2, padding=1)
        self.c = nn.Conv2d(dim, dim, 1)
        self.up = nn.ConvTranspose2d(dim, dim, 2, stride=2)

    def forward(self, x):                                    # B x cin x H/8 x W/8
        d = self.c(F.relu(self.b(F.relu(self.a(x)))))       # B x dim x H/16 x W/16
        d = self.up(F.normalize(d, dim=1))
        if d.shape[-2:] != x.shape[-2:]:                     # H/8 odd: stride 2 lost a row
            d = F.interpolate(d, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return F.normalize(d, dim=1)                         # B x dim x H/8 x W/8


class SuperRetina(nn.Module):
    """VGG-style encoder 64-64-128-128 with three 2x max-pools, U-Net detector, descriptor head.

    forward: image B x 1 x H x W in [0, 1] (H, W multiples of 8) ->
             heatmap B x 1 x H x W in (0, 1), descriptors B x 256 x H/8 x W/8 (unit length)."""
    arch = "superretina"

    def __init__(self, widths=(64, 64, 128, 128), large_kernel=False):
        super().__init__()
        c1, c2, c3, c4 = widths
        self.stages = nn.ModuleList([encoder_stage(1, c1, False), encoder_stage(c1, c2, large_kernel),
                                     encoder_stage(c2, c3, large_kernel), encoder_stage(c3, c4, large_kernel)])
        self.detector = DetectorDecoder(c1, c2, c3, c4)
        self.descriptor = DescriptorHead(c4)

    def forward(self, x):
        feats = []
        for i, stage in enumerate(self.stages):
            x = stage(F.max_pool2d(x, 2) if i else x)       # full, 1/2, 1/4, 1/8
            feats.append(x)
        return self.detector(*feats), self.descriptor(feats[-1])


class LKSuperRetina(SuperRetina):
    """RKD's modified teacher: encoder stages 2-4 built from LKU-Net blocks with PReLU."""
    arch = "lk"

    def __init__(self, widths=(64, 64, 128, 128)):
        super().__init__(widths, large_kernel=True)


class SmallCNN(SuperRetina):
    """The conventional (large-to-small) student: SuperRetina's layout at half width."""
    arch = "small_cnn"

    def __init__(self, widths=(32, 32, 64, 64)):
        super().__init__(widths)


class TransformerStudent(nn.Module):
    """RKD's heavier student: a timm Vision Transformer between a CNN stem and the decoders.

    A TransUNet-style hybrid: three conv stages (as the teacher's, full to 1/4 resolution) give
    the detector its high-resolution skips and feed 4x4 patches of their 1/4-scale features to
    a ViT-Small (12 blocks, 384 wide) whose tokens live at 1/16. The ViT has no absolute
    position embedding and attends within 256 px windows (near the crop sizes it trains on), so
    training on random crops transfers to whole images (see windowed_vit). Outputs are exactly
    the teacher's, so inference and evaluation run unchanged.

    forward: B x 1 x H x W -> heatmap B x 1 x H x W, descriptors B x 256 x H/8 x W/8."""
    arch = "vit_student"

    def __init__(self, widths=(64, 64, 128), embed_dim=384, depth=12, heads=6):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer   # timm imports torchvision: load lazily
        c1, c2, c3 = widths
        self.stages = nn.ModuleList([double_conv(1, c1), double_conv(c1, c2), double_conv(c2, c3)])
        self.vit = VisionTransformer(img_size=192, patch_size=4, in_chans=c3, embed_dim=embed_dim, depth=depth,
                                     num_heads=heads, class_token=False, global_pool="", num_classes=0,
                                     pos_embed="none", dynamic_img_size=True, dynamic_img_pad=True)
        self.neck = nn.Sequential(nn.Conv2d(embed_dim, 128, 3, padding=1), nn.ReLU(inplace=True))
        self.detector = DetectorDecoder(c1, c2, c3, 128)
        self.descriptor = nn.Sequential(nn.Conv2d(embed_dim, 256, 3, padding=1), nn.ReLU(inplace=True),
                                        nn.Conv2d(256, 256, 1))

    def forward(self, x):
        h8, w8 = x.shape[-2] // 8, x.shape[-1] // 8
        x1 = self.stages[0](x)                                   # B x c1 x H x W
        x2 = self.stages[1](F.max_pool2d(x1, 2))                 # B x c2 x H/2 x W/2
        x3 = self.stages[2](F.max_pool2d(x2, 2))                 # B x c3 x H/4 x W/4
        tokens = self.windowed_vit(x3)                          # B x E x H/16 x W/16
        t8 = F.interpolate(tokens, scale_factor=2, mode="bilinear", align_corners=False)[..., :h8, :w8]
        heat = self.detector(x1, x2, x3, self.neck(t8))
        desc = F.normalize(self.descriptor(t8), dim=1)           # B x 256 x H/8 x W/8
        return heat, desc

    def windowed_vit(self, x3):
        """ViT tokens of 1/4-scale features, attention limited to ATTENTION_WINDOW px squares.

        Trained on 128 px crops, the ViT has only seen 8 x 8 tokens; on a whole 768 px image
        (48 x 48 tokens) its heatmap vanished (max 0.37 at 256 px inputs, 0.05 at 384, 0 at 768).
        Larger inputs are therefore cut into windows the ViT runs on separately (Swin-style local
        attention); the convolutional stem and decoders still see the whole image."""
        def vit(t):
            return self.vit.forward_intermediates(t, indices=1, norm=True, intermediates_only=True)[0]
        w = ATTENTION_WINDOW // 4                                # window side in 1/4-scale pixels
        b, c, h, wd = x3.shape
        if h <= w and wd <= w:
            return vit(x3)
        padded = F.pad(x3, (0, -wd % w, 0, -h % w))
        nh, nw = padded.shape[-2] // w, padded.shape[-1] // w
        tiles = padded.unfold(2, w, w).unfold(3, w, w).permute(0, 2, 3, 1, 4, 5).reshape(-1, c, w, w)
        t = vit(tiles)                                           # B*nh*nw x E x w/4 x w/4
        e, s = t.shape[1], t.shape[-1]
        t = t.view(b, nh, nw, e, s, s).permute(0, 3, 1, 4, 2, 5).reshape(b, e, nh * s, nw * s)
        return t[..., :math.ceil(h / 4), :math.ceil(wd / 4)]


ARCHS = {cls.arch: cls for cls in (SuperRetina, LKSuperRetina, SmallCNN, TransformerStudent)}


def build_model(arch):
    if arch not in ARCHS:
        raise UserError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}")
    return ARCHS[arch]()


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def count_flops(model, size):
    """Forward FLOPs at size x size from torch's own counter (a multiply-add counts as 2)."""
    from torch.utils.flop_counter import FlopCounterMode
    device = next(model.parameters()).device
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 1, size, size, device=device))
    return counter.get_total_flops()


# ---- checkpoints: self-describing, atomic, loaded with weights_only=True ----------------------

def save_checkpoint(path, model, **extra):
    """{format, arch, weights, ...}. fp16=True in `extra` stores a compact weights-only file."""
    raw = model.module if hasattr(model, "module") else model
    fp16 = extra.pop("fp16", False)
    state = {k: (v.half() if fp16 and v.is_floating_point() else v).detach().cpu() for k, v in raw.state_dict().items()}
    payload = {"format": CHECKPOINT_FORMAT, "arch": raw.arch, "model": state, **extra}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_atomic(path, buffer.getvalue())


def resolve_weights(name):
    """A shipped model's short name (lk, student, ...) or a path -> Path."""
    if name in SHIPPED:
        path = WEIGHTS_DIR / SHIPPED[name]
        if not path.exists():
            raise UserError(f"shipped model {name!r} is not in {WEIGHTS_DIR} (train it, see README)")
        return path
    path = Path(name)
    if not path.exists():
        raise UserError(f"{name}: no such checkpoint (shipped names: {', '.join(SHIPPED)}, or 'sift')")
    return path


def load_checkpoint(path):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # torch raises many types for a file that is not a checkpoint
        raise UserError(f"{path}: not a readable rkd checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or ckpt.get("arch") not in ARCHS:
        raise UserError(f"{path}: not an rkd checkpoint (no '{CHECKPOINT_FORMAT}' header)")
    return ckpt


def load_model(name, device="cpu"):
    """Shipped name, checkpoint path or 'sift' -> model in eval mode (fp16 files load as fp32)."""
    if name == "sift":
        return Sift()
    path = resolve_weights(name)
    ckpt = load_checkpoint(path)
    model = build_model(ckpt["arch"])
    try:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ckpt["model"].items()})
    except RuntimeError:
        raise UserError(f"{path}: weights do not fit architecture {ckpt['arch']!r}") from None
    model.name = name
    return model.to(device).eval()


def default_model_name():
    for name in DEFAULT_ORDER:
        if (WEIGHTS_DIR / SHIPPED[name]).exists():
            return name
    return "sift"


# =============================================================================================
# 4. Inference pipeline: detect -> describe -> match -> homography (SuperRetina at test time)
# =============================================================================================

def nms(heat, radius, threshold, border=0, top_k=None):
    """Local maxima of B x 1 x H x W heatmaps -> list of (N x 2 xy float tensor, N scores).

    A max-pool window of 2r+1 keeps a pixel only where it is the largest within r pixels."""
    peak = (heat == F.max_pool2d(heat, 2 * radius + 1, stride=1, padding=radius)) & (heat > threshold)
    if border:
        peak[..., :border, :] = peak[..., -border:, :] = False
        peak[..., :, :border] = peak[..., :, -border:] = False
    out = []
    for b in range(heat.shape[0]):
        ys, xs = torch.nonzero(peak[b, 0], as_tuple=True)
        scores = heat[b, 0, ys, xs]
        order = torch.argsort(scores, descending=True)[:top_k]
        out.append((torch.stack([xs, ys], 1)[order].float(), scores[order]))
    return out


def sample_descriptors(desc, points, image_hw):
    """Bilinear descriptors at pixel positions, re-normalised.

    desc: B x D x H/8 x W/8; points: list of N_b x 2 (x, y) in image pixels -> list of N_b x D."""
    h, w = image_hw
    out = []
    for b, p in enumerate(points):
        if len(p) == 0:
            out.append(desc.new_zeros(0, desc.shape[1]))
            continue
        # pixel centre x maps to (x + 0.5) / W of the map's extent (align_corners=False)
        grid = torch.stack([(p[:, 0] + 0.5) / w * 2 - 1, (p[:, 1] + 0.5) / h * 2 - 1], 1)
        d = F.grid_sample(desc[b:b + 1], grid.view(1, 1, -1, 2), mode="bilinear", align_corners=False)
        out.append(F.normalize(d[0, :, 0].t(), dim=1))
    return out


class Sift:
    """SIFT baseline behind the same interface as the networks, so that it goes through the
    same matching, homography and scoring code."""
    arch = name = "sift"

    def features(self, images, cfg):
        sift = cv2.SIFT_create(nfeatures=cfg.max_keypoints)
        out = []
        for image in images:
            kps, desc = sift.detectAndCompute((image * 255).astype(np.uint8), None)
            pts = np.array([k.pt for k in kps], np.float32).reshape(-1, 2)
            out.append((pts, desc if desc is not None else np.zeros((0, 128), np.float32)))
        return out


@torch.no_grad()
def extract_features(model, images, cfg):
    """List of preprocessed size x size images -> list of (N x 2 keypoints in model px, N x D
    descriptors), all images in one batch."""
    if isinstance(model, Sift):
        return model.features(images, cfg)
    device = next(model.parameters()).device
    batch = torch.from_numpy(np.stack(images))[:, None].to(device)
    heat, desc = model(batch)
    points = [p for p, _ in nms(heat, cfg.nms_radius, cfg.nms_threshold, cfg.border, cfg.max_keypoints)]
    descs = sample_descriptors(desc, points, batch.shape[-2:])
    return [(p.cpu().numpy(), d.cpu().numpy()) for p, d in zip(points, descs)]


def match_descriptors(dq, dr, ratio):
    """kNN (k=2) brute-force matching with Lowe's ratio test -> M x 2 index pairs (query, refer)."""
    if len(dq) < 2 or len(dr) < 2:
        return np.zeros((0, 2), int)
    knn = cv2.BFMatcher(cv2.NORM_L2).knnMatch(dq.astype(np.float32), dr.astype(np.float32), k=2)
    pairs = [(m.queryIdx, m.trainIdx) for m, n in (k for k in knn if len(k) == 2) if m.distance < ratio * n.distance]
    return np.array(pairs, int).reshape(-1, 2)


def estimate_homography(pq, pr, cfg, px_scale=1.0):
    """Robust homography from matched points (query -> refer) -> (H or None, inlier mask)."""
    if len(pq) < 4:
        return None, np.zeros(len(pq), bool)
    method = cv2.LMEDS if cfg.method == "lmeds" else cv2.RANSAC
    H, mask = cv2.findHomography(pq.astype(np.float64), pr.astype(np.float64), method, cfg.ransac_px * px_scale)
    if H is None or mask is None or not mask.any() or not np.isfinite(H).all():
        return None, np.zeros(len(pq), bool)
    return H, mask.ravel().astype(bool)


@dataclass
class Registration:
    H: np.ndarray | None            # 3x3, query pixels -> reference pixels, original frames
    query_points: np.ndarray        # matched points in the query's original frame (M x 2)
    refer_points: np.ndarray        # their partners in the reference's original frame
    inliers: np.ndarray             # M bools
    keypoints: tuple                # keypoint counts (query, reference)


def register(model, query, refer, cfg) -> Registration:
    """Register a query photograph (BGR) onto a reference: the one pipeline for eval, match
    and validation. Optional second stage (SuperRetina's matching trick): warp the query by the
    first homography, match again against the reference's features (kept, not recomputed), and
    compose the two homographies."""
    S = cfg.size
    q, r = preprocess(query, S), preprocess(refer, S)
    (kq, dq), (kr, dr) = extract_features(model, [q, r], cfg)
    to_q, to_r = model_to_original(query.shape, S), model_to_original(refer.shape, S)
    scale = refer.shape[1] / S
    kr_orig = apply_homography(to_r, kr)
    ratio = cfg.sift_ratio if isinstance(model, Sift) else cfg.ratio
    m = match_descriptors(dq, dr, ratio)
    pq, pr = apply_homography(to_q, kq[m[:, 0]]), kr_orig[m[:, 1]]
    H, inliers = estimate_homography(pq, pr, cfg, scale)
    if cfg.trick and H is not None:
        H_model = np.linalg.inv(to_r) @ H @ to_q                  # model px -> model px
        warped = cv2.warpPerspective(q, H_model, (S, S), flags=cv2.INTER_LINEAR)
        (kw, dw), = extract_features(model, [warped], cfg)
        m2 = match_descriptors(dw, dr, ratio)
        pw = apply_homography(to_r, kw[m2[:, 0]])                 # warped query, in refer's frame
        H2, inliers2 = estimate_homography(pw, kr_orig[m2[:, 1]], cfg, scale)
        if H2 is not None:   # second-stage matches, drawn at their places in the query
            pq, pr, inliers = apply_homography(np.linalg.inv(H), pw), kr_orig[m2[:, 1]], inliers2
            H = H2 @ H
    return Registration(H, pq, pr, inliers, (len(kq), len(kr)))


# =============================================================================================
# 5. FIRE evaluation (Hernandez-Matas et al. 2017; protocol as SuperRetina and RKD report it)
# =============================================================================================

@dataclass
class FirePair:
    name: str                      # e.g. S01
    category: str                  # S, P or A
    query: Path                    # XNN_2.jpg
    refer: Path                    # XNN_1.jpg
    points: np.ndarray             # 10 x 4: x_ref y_ref x_query y_query, original pixels


def read_text(path) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None


def read_control_points(path) -> np.ndarray:
    rows = []
    for i, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            values = [float(v) for v in fields]
        except ValueError:
            raise UserError(f"{path}:{i}: control point row holds a non-number: {line.strip()!r}") from None
        if len(values) != 4:
            raise UserError(f"{path}:{i}: expected 4 columns (x_ref y_ref x_query y_query), found {len(values)}")
        rows.append(values)
    if not rows:
        raise UserError(f"{path}: no control points")
    return np.array(rows, np.float64)


def read_fire(root):
    """FIRE's own layout -> (pairs, note). P37 is excluded; a full FIRE must hold 71/48/14."""
    root = Path(root)
    gt = root / "Ground Truth"
    if not root.is_dir():
        raise UserError(f"{root}: no such FIRE folder")
    if not gt.is_dir() or not (root / "Images").is_dir():
        raise UserError(f"{root}: not in FIRE's layout (needs 'Images/' and 'Ground Truth/')")
    pairs = []
    for f in sorted(gt.glob("control_points_*_1_2.txt")):
        name = f.name[len("control_points_"):-len("_1_2.txt")]
        if name in FIRE_EXCLUDED or name[:1] not in FIRE_CATEGORIES:
            continue
        refer, query = root / "Images" / f"{name}_1.jpg", root / "Images" / f"{name}_2.jpg"
        for img in (refer, query):
            if not img.exists():
                raise UserError(f"{img}: image of pair {name} is missing")
        pairs.append(FirePair(name, name[0], query, refer, read_control_points(f)))
    if not pairs:
        raise UserError(f"{gt}: no control_points_XNN_1_2.txt files")
    counts = {c: sum(p.category == c for p in pairs) for c in FIRE_CATEGORIES}
    if (root / "SYNTHETIC.txt").exists():
        note = "synthetic benchmark (rkd's generator), not FIRE"
    elif counts == FIRE_FULL_COUNTS:
        note = "full FIRE (133 pairs, P37 excluded)"
    elif all(counts[c] <= FIRE_FULL_COUNTS[c] for c in FIRE_CATEGORIES):
        note = f"subset of FIRE: {len(pairs)} of 133 pairs -- not comparable to published numbers"
    else:
        raise UserError(f"{root}: {counts} pairs per category, more than FIRE's {FIRE_FULL_COUNTS}")
    return pairs, note


def pair_errors(H, points) -> np.ndarray:
    """Distances (original px) between reference control points and the query's mapped by H."""
    if H is None:
        return np.full(len(points), np.inf)
    return np.linalg.norm(apply_homography(H, points[:, 2:4]) - points[:, 0:2], axis=1)


def pair_status(errors) -> str:
    if not np.isfinite(errors).all():
        return "failed"
    if errors.max() > INACCURATE_MAX or np.median(errors) > INACCURATE_MEDIAN:
        return "inaccurate"
    return "acceptable"


def fire_auc(mean_errors) -> float:
    """Mean over thresholds t = 1..25 px of the fraction of pairs whose mean error is below t."""
    e = np.asarray(mean_errors, np.float64)
    if len(e) == 0:
        return float("nan")
    return float(np.mean([(e < t).mean() for t in range(1, AUC_LIMIT + 1)]))


def summarise(rows) -> dict:
    """Per-pair rows -> AUC per category, mAUC (mean of S, P, A) and the status counts."""
    out = {}
    for c in FIRE_CATEGORIES:
        out[c] = fire_auc([r["mean_error"] for r in rows if r["category"] == c])
    present = [out[c] for c in FIRE_CATEGORIES if not math.isnan(out[c])]
    out["mAUC"] = float(np.mean(present)) if present else float("nan")
    for s in ("failed", "inaccurate", "acceptable"):
        out[s] = sum(r["status"] == s for r in rows)
    out["pairs"] = len(rows)
    out["seconds_per_pair"] = float(np.mean([r["seconds"] for r in rows])) if rows else 0.0
    return out


def evaluate(model, pairs, cfg, quiet=False, on_pair=None) -> list:
    rows = []
    for pair in progress(pairs, f"eval {getattr(model, 'name', model.arch)}", quiet):
        query, refer = read_image(pair.query), read_image(pair.refer)
        start = time.perf_counter()
        reg = register(model, query, refer, cfg)
        seconds = time.perf_counter() - start
        errors = pair_errors(reg.H, pair.points)
        rows.append({"name": pair.name, "category": pair.category, "mean_error": float(errors.mean()),
                     "max_error": float(errors.max()), "median_error": float(np.median(errors)),
                     "inliers": int(reg.inliers.sum()), "status": pair_status(errors), "seconds": seconds,
                     "homography": None if reg.H is None else (reg.H / reg.H[2, 2]).tolist()})
        if on_pair:
            on_pair(pair, query, refer, reg)
    return rows


def validation_mauc(model, fire_dir, cfg):
    """Score a model during training with the eval code (section 9 keeps the best epoch)."""
    pairs, _ = read_fire(fire_dir)
    was_training = model.training
    model.eval()
    result = summarise(evaluate(model, pairs, cfg, quiet=True))["mAUC"]
    model.train(was_training)
    return result


# =============================================================================================
# 6. Synthetic fundus generator (ours): exact keypoints, FIRE-like pairs, no download
# =============================================================================================
# A retina is drawn in "world" units (1 = radius of a camera's field of view): an optic disc, a
# macula, and two vessel trees (arteries, veins) grown as random walks that branch. Its
# keypoints are the trees' bifurcations plus artery/vein crossings, known exactly. A view is a
# homography from world to image pixels, so every pair's ground truth is an exact homography.

SYNTH_FRAME = 2912        # FIRE's frame, so that the 25 px thresholds mean what they mean on FIRE
SYNTH_PAIRS = {"S": 4, "P": 4, "A": 4}
SYNTH_SEED = 20240101


def grow_vessels(rng, start, angle, width, depth, curl, segments, forks):
    """Random-walk vessel from `start`; forks spawn thinner children (Murray-like width drop)."""
    p, steps = np.array(start, np.float64), 0
    while width > 0.0025 and steps < 140 and np.hypot(*p) < 2.2:
        angle += curl + rng.normal(0, 0.08)
        q = p + 0.02 * np.array([np.cos(angle), np.sin(angle)])
        segments.append((p, q, width))
        p, steps = q, steps + 1
        if depth < 5 and steps > 6 and rng.random() < 0.08:
            side = rng.choice([-1, 1])
            forks.append(p.copy())
            grow_vessels(rng, p, angle + side * rng.uniform(0.5, 1.1), width * 0.7, depth + 1,
                         -side * abs(curl) * 0.5, segments, forks)
            width *= 0.85
            angle -= side * 0.15
        width *= 0.995


def segment_crossings(a, b) -> np.ndarray:
    """Intersection points between two sets of segments (each K x 2 x 2) -> N x 2."""
    p, r = a[:, None, 0], a[:, None, 1] - a[:, None, 0]
    q, s = b[None, :, 0], b[None, :, 1] - b[None, :, 0]
    denom = r[..., 0] * s[..., 1] - r[..., 1] * s[..., 0]
    qp = q - p
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (qp[..., 0] * s[..., 1] - qp[..., 1] * s[..., 0]) / denom
        u = (qp[..., 0] * r[..., 1] - qp[..., 1] * r[..., 0]) / denom
    hit = (np.abs(denom) > 1e-12) & (t >= 0) & (t < 1) & (u >= 0) & (u < 1)
    i, j = np.nonzero(hit)
    return (p[i, 0] + t[i, j, None] * r[i, 0]).reshape(-1, 2)


def synthetic_retina(seed) -> dict:
    rng = np.random.default_rng(seed)
    disc = np.array([rng.uniform(0.25, 0.45), rng.uniform(-0.1, 0.1)])
    trees = {}
    for kind, width, offset in (("artery", 0.011, -0.25), ("vein", 0.015, 0.25)):
        segments, forks = [], []
        for heading, curl in ((np.pi - 0.9, -0.012), (np.pi + 0.9, 0.012), (-0.6, 0.01), (0.6, -0.01)):
            grow_vessels(rng, disc, heading + offset * 0.3 + rng.normal(0, 0.1), width, 0,
                         curl * rng.uniform(0.7, 1.4), segments, forks)
        trees[kind] = (segments, np.array(forks).reshape(-1, 2))
    seg = {k: np.array([[s[0], s[1]] for s in v[0]]) for k, v in trees.items()}
    crossings = segment_crossings(seg["artery"], seg["vein"])
    keypoints = np.concatenate([trees["artery"][1], trees["vein"][1], crossings])
    keypoints = keypoints[np.linalg.norm(keypoints - disc, axis=1) > 0.12]   # not inside the disc
    return {"rng_seed": seed, "disc": disc, "macula": disc - [0.55, 0.0], "trees": trees, "keypoints": keypoints}


def render_view(world, H, size, rng, fov_radius, photometric=1.0, anatomy=0.0) -> np.ndarray:
    """Draw the retina seen through world->pixel homography H as a size x size BGR fundus photo.
    `photometric` > 1 strengthens illumination/contrast changes; `anatomy` > 0 thickens vessels
    and adds lesions (FIRE's category A: images taken years apart)."""
    scale = np.sqrt(abs(np.linalg.det(H[:2, :2])))           # px per world unit, roughly
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c = (size - 1) / 2
    r = np.hypot(xx - c, yy - c) / fov_radius
    shade = rng.uniform(0.75, 1.0) * (1 - 0.35 * photometric * r ** 2)   # vignetting
    tilt = rng.normal(0, 0.08 * photometric, 2)
    shade = shade * (1 + tilt[0] * (xx - c) / size + tilt[1] * (yy - c) / size)
    texture = cv2.resize(rng.normal(0, 1, (size // 64 + 2, size // 64 + 2)).astype(np.float32), (size, size),
                         interpolation=cv2.INTER_CUBIC)
    green = 0.45 * shade * (1 + 0.05 * texture)
    blobs = np.zeros((size, size), np.float32)
    for centre, radius, gain in ((world["disc"], 0.11, 0.9), (world["macula"], 0.2, -0.35)):
        (x, y), = apply_homography(H, [centre])
        blobs += gain * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * (radius * scale) ** 2))
    green = green * (1 + blobs)
    vessels = np.zeros((size, size), np.float32)
    thicken = 1 + 0.25 * anatomy
    for kind, darkness in (("artery", 0.35), ("vein", 0.5)):
        segments = world["trees"][kind][0]
        ends = apply_homography(H, np.array([[a, b] for a, b, _ in segments]).reshape(-1, 2)).reshape(-1, 2, 2)
        for (a, b), (_, _, w) in zip(np.round(ends * 16).astype(np.int64), segments):
            cv2.line(vessels, tuple(a), tuple(b), darkness, max(1, int(round(w * scale * thicken))), cv2.LINE_AA, 4)
    vessels = cv2.GaussianBlur(vessels, (0, 0), max(0.6, size / 2912))
    green = green * (1 - np.clip(vessels, 0, 0.8))
    for _ in range(int(anatomy * rng.integers(4, 12))):        # lesions: dark haemorrhages, bright exudates
        x, y = rng.uniform(0.2, 0.8, 2) * size
        cv2.circle(green, (int(x), int(y)), int(rng.uniform(0.004, 0.015) * size), float(rng.choice([0.1, 0.8])), -1, cv2.LINE_AA)
    green = green * rng.uniform(1 - 0.15 * photometric, 1 + 0.1 * photometric)
    green += rng.normal(0, 0.01, green.shape).astype(np.float32)
    fov = (r <= 1).astype(np.float32)
    green = np.clip(green, 0, 1) * fov
    bgr = np.stack([green * 0.35, green, np.clip(green * 1.6 + 0.15, 0, 1) * fov], -1)
    return (bgr * 255).astype(np.uint8)


def view_homography(centre, radius_px, size, angle=0.0, zoom=1.0, perspective=(0.0, 0.0)) -> np.ndarray:
    """World -> pixel homography: the world point `centre` lands at the image centre."""
    s = radius_px * zoom
    ca, sa = np.cos(angle), np.sin(angle)
    c = (size - 1) / 2
    T = np.array([[s * ca, -s * sa, c], [s * sa, s * ca, c], [perspective[0], perspective[1], 1.0]])
    return T @ np.array([[1, 0, -centre[0]], [0, 1, -centre[1]], [0, 0, 1]])


def synthetic_pair(seed, category):
    """One FIRE-like pair: (refer BGR, query BGR, 10 x 4 control points, true H query->refer)."""
    rng = np.random.default_rng(seed)
    world = synthetic_retina(seed)
    radius = SYNTH_FRAME * 0.47
    Hr = view_homography(rng.normal(0, 0.1, 2), radius, SYNTH_FRAME)
    if category == "P":      # small overlap: the camera moves by about half a field radius
        shift = rng.uniform(0.35, 0.5) * np.array([np.cos(a := rng.uniform(0, 2 * np.pi)), np.sin(a)])
    else:
        shift = rng.normal(0, 0.06, 2)
    centre = np.linalg.solve(Hr, [SYNTH_FRAME / 2, SYNTH_FRAME / 2, 1])
    Hq = view_homography(centre[:2] / centre[2] + shift, radius, SYNTH_FRAME, angle=rng.normal(0, 0.08),
                         zoom=rng.uniform(0.95, 1.05), perspective=rng.normal(0, 2e-6, 2))
    photometric, anatomy = (2.0, 1.0) if category == "A" else (1.0, 0.0)
    refer = render_view(world, Hr, SYNTH_FRAME, rng, radius)
    query = render_view(world, Hq, SYNTH_FRAME, rng, radius, photometric, anatomy)
    H = Hr @ np.linalg.inv(Hq)
    # control points: keypoints seen by both cameras, well inside both fields of view, topped up
    # with points on vessels where the overlap is small (category P)
    c = (SYNTH_FRAME - 1) / 2
    on_vessels = np.array([a for a, _, _ in world["trees"]["vein"][0]])
    chosen = []
    for candidates in (world["keypoints"], on_vessels):
        pr, pq = apply_homography(Hr, candidates), apply_homography(Hq, candidates)
        shared = (np.hypot(*(pr - c).T) < 0.9 * radius) & (np.hypot(*(pq - c).T) < 0.9 * radius)
        chosen += [np.r_[pr[i], pq[i]] for i in rng.permutation(np.flatnonzero(shared))[:10 - len(chosen)]]
    return refer, query, np.array(chosen), H / H[2, 2]


def write_synthetic_fire(root, quiet=False, counts=None):
    """Write the synthetic benchmark in FIRE's layout (+ the true homographies) under `root`."""
    root = Path(root)
    counts = counts or SYNTH_PAIRS
    jobs = [(c, i) for c in FIRE_CATEGORIES for i in range(1, counts.get(c, 0) + 1)]
    for c, i in progress(jobs, "synthetic pairs", quiet):
        refer, query, points, H = synthetic_pair(SYNTH_SEED + 1000 * FIRE_CATEGORIES.index(c) + i, c)
        name = f"{c}{i:02d}"
        write_atomic(root / "Images" / f"{name}_1.jpg", cv2.imencode(".jpg", refer, [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes())
        write_atomic(root / "Images" / f"{name}_2.jpg", cv2.imencode(".jpg", query, [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes())
        write_atomic(root / "Ground Truth" / f"control_points_{name}_1_2.txt",
                     "".join(" ".join(f"{v:.6f}" for v in row) + "\n" for row in points).encode())
        write_atomic(root / "Homographies" / f"{name}.txt", "".join(" ".join(f"{v:.12g}" for v in row) + "\n" for row in H).encode())
    write_atomic(root / "SYNTHETIC.txt", b"rkd synthetic benchmark: procedural fundus pairs, exact ground truth\n")
    return root


def default_benchmark(quiet=False) -> Path:
    """The embedded benchmark, generated once (fixed seed) and cached."""
    root = Path(os.environ.get("RKD_CACHE", Path.home() / ".cache" / "rkd")) / "synthetic-fire-v1"
    if not (root / "SYNTHETIC.txt").exists():
        print(f"generating the synthetic benchmark once into {root}", file=sys.stderr)
        write_synthetic_fire(root, quiet)
    return root


def synthetic_training_image(seed, size):
    """One labelled training view: (BGR size x size, K x 2 keypoints in px) with random pose."""
    rng = np.random.default_rng(seed)
    world = synthetic_retina(seed)
    radius = size * 0.47
    H = view_homography(rng.normal(0, 0.3, 2), radius, size, angle=rng.uniform(-np.pi, np.pi), zoom=rng.uniform(0.8, 1.3))
    category = rng.choice(["S", "A"], p=[0.7, 0.3])
    image = render_view(world, H, size, rng, radius, *((2.0, 1.0) if category == "A" else (1.0, 0.0)))
    points = apply_homography(H, world["keypoints"])
    inside = np.hypot(*(points - (size - 1) / 2).T) < 0.97 * radius
    return image, points[inside]


# =============================================================================================
# 7. Training data: Lab layout, vessel-map junctions, unlabelled folders, synthetic images
# =============================================================================================

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".ppm", ".gif"}


def image_files(folder):
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such image folder")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def field_of_view(bgr, fov_path=None) -> np.ndarray:
    """Field-of-view mask: the dataset's own when given, else the bright disc of the photograph."""
    if fov_path is not None and Path(fov_path).exists():
        return cv2.cvtColor(read_image(fov_path), cv2.COLOR_BGR2GRAY) > 127
    mask = (bgr[:, :, 2] > 25).astype(np.uint8)
    return cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((5, 5), np.uint8)) > 0


def merge_close_points(points, radius) -> np.ndarray:
    """Greedy clustering: points closer than `radius` become their mean (a crossing is seen by
    thinning as two nearby three-way junctions)."""
    points = [np.asarray(p, np.float64) for p in points]
    merged = []
    while points:
        seed = points.pop(0)
        group = [seed] + [p for p in points if np.linalg.norm(p - seed) < radius]
        points = [p for p in points if np.linalg.norm(p - seed) >= radius]
        merged.append(np.mean(group, 0))
    return np.array(merged).reshape(-1, 2)


def vessel_junctions(vessels, fov=None, merge_radius=10.0, fov_margin=10, ring_radius=6) -> np.ndarray:
    """Bifurcations and crossings of a binary vessel map -> K x 2 (x, y) pixel positions.

    Thin the map to a one-pixel skeleton (OpenCV's Zhang-Suen). Skeleton pixels with three or
    more skeleton neighbours are candidates; a candidate is a branching point when a circle of
    `ring_radius` px around it crosses the skeleton three or more times (a straight vessel
    crosses it twice, a Y three times, an X four). Points within `merge_radius` are merged
    (an X thins into two nearby junctions), and points near the FOV edge dropped."""
    binary = (vessels > 127).astype(np.uint8) * 255
    skeleton = cv2.ximgproc.thinning(binary, thinningType=cv2.ximgproc.THINNING_ZHANGSUEN) > 0
    neighbours = cv2.filter2D(skeleton.astype(np.float32), -1, np.ones((3, 3), np.float32), borderType=cv2.BORDER_CONSTANT) - 1
    ys, xs = np.nonzero(skeleton & (neighbours >= 3))
    thick = np.pad(cv2.dilate(skeleton.astype(np.uint8), np.ones((3, 3), np.uint8)), ring_radius)
    angles = np.linspace(0, 2 * np.pi, 16 * ring_radius, endpoint=False)
    dx, dy = np.round(ring_radius * np.cos(angles)).astype(int), np.round(ring_radius * np.sin(angles)).astype(int)
    ring = thick[ys[:, None] + ring_radius + dy, xs[:, None] + ring_radius + dx]      # candidates x samples
    branches = ((ring == 1) & (np.roll(ring, 1, axis=1) == 0)).sum(1)               # runs of vessel on the ring
    points = merge_close_points(np.c_[xs, ys][branches >= 3], merge_radius)
    if fov is not None and len(points):
        inner = cv2.erode(fov.astype(np.uint8), np.ones((2 * fov_margin + 1,) * 2, np.uint8)) > 0
        points = points[inner[points[:, 1].astype(int), points[:, 0].astype(int)]]
    return points


@dataclass
class Sample:
    """One training image. points: K x 2 labels normalised to 0..1, or None when unlabelled."""
    source: str
    path: Path | None = None
    points: np.ndarray | None = None
    synthetic_seed: int | None = None


def lab_samples(root, split="train"):
    """SuperRetina's Lab layout: ImageData/, Annotations/ (x y rows in 0..1), ImageSets/<split>.txt."""
    root = Path(root)
    listing = root / "ImageSets" / f"{split}.txt"
    if not listing.exists():
        raise UserError(f"{root}: not in the Lab layout (missing ImageSets/{split}.txt)")
    samples = []
    for line in read_text(listing).splitlines():
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        image = root / "ImageData" / parts[0]
        points = None
        if len(parts) > 1 and parts[1]:
            rows = [r.split() for r in read_text(root / "Annotations" / parts[1]).splitlines() if r.strip()]
            try:
                points = np.array(rows, np.float64).reshape(-1, 2)
            except ValueError:
                raise UserError(f"{root / 'Annotations' / parts[1]}: rows must be 'x y' in 0..1") from None
        samples.append(Sample("lab", image, points))
    return samples


def vessel_map_samples(root, merge_radius_model_px=CFG.nms_radius, size=CFG.size):
    """An image folder with manual vessel maps (images/, vessels/, optional fov/), labelled by
    vessel_junctions. The merge radius is the NMS radius, measured at the model's scale."""
    root = Path(root)
    if not (root / "vessels").is_dir():
        raise UserError(f"{root}: expected images/ and vessels/ folders (optional fov/)")
    samples = []
    vessel_maps = {p.stem: p for p in image_files(root / "vessels")}
    for image in image_files(root / "images"):
        if image.stem not in vessel_maps:
            continue
        bgr = read_image(image)
        fov_path = next(iter((root / "fov").glob(image.stem + ".*")), None) if (root / "fov").is_dir() else None
        vessels = cv2.cvtColor(read_image(vessel_maps[image.stem]), cv2.COLOR_BGR2GRAY)
        fov = field_of_view(bgr, fov_path)
        if vessels.shape != bgr.shape[:2] or fov.shape != bgr.shape[:2]:
            raise UserError(f"{vessel_maps[image.stem]}: vessel map or FOV mask is not the size of {image.name}")
        radius = merge_radius_model_px * max(bgr.shape[:2]) / size
        points = vessel_junctions(vessels, fov, radius, fov_margin=int(radius))
        samples.append(Sample("vessels", image, (points + 0.5) / [bgr.shape[1], bgr.shape[0]]))
    if not samples:
        raise UserError(f"{root}: no image in images/ has a vessel map of the same name in vessels/")
    return samples


def collect_samples(args):
    samples = []
    for root in args.lab or []:
        samples += lab_samples(root)
    for root in args.vessels or []:
        samples += vessel_map_samples(root)
    for folder in args.unlabelled or []:
        samples += [Sample("unlabelled", p) for p in image_files(folder)]
    samples += [Sample("synthetic", synthetic_seed=args.seed * 100003 + i) for i in range(args.synthetic)]
    if not samples:
        raise UserError("no training data: give --synthetic N, --lab DIR, --vessels DIR or --unlabelled DIR")
    return samples


class TrainingSet:
    """All images preprocessed once at the model size and held in memory as uint8, with their
    labels in model pixels; batches are random crops of them."""

    def __init__(self, samples, size, quiet=False):
        self.size, self.images, self.labels = size, [], []
        for s in progress(samples, "loading training images", quiet):
            if s.synthetic_seed is not None:
                bgr, pts = synthetic_training_image(s.synthetic_seed, size)
                pts = (pts + 0.5) / size          # normalised like the Lab layout: pixel centre + 0.5
            else:
                bgr, pts = read_image(s.path), s.points
            self.images.append((preprocess(bgr, size) * 255).astype(np.uint8))
            self.labels.append(None if pts is None else torch.tensor(pts * size - 0.5, dtype=torch.float32))  # -> pixel indices

    def __len__(self):
        return len(self.images)

    def batch(self, indices, crop, gen):
        """-> images B x 1 x C x C, crop offsets B x 2 (x, y), labels (list of K x 2 or None)."""
        crop = crop or self.size
        images, offsets, labels = [], [], []
        for i in indices:
            x0, y0 = (torch.randint(0, self.size - crop + 1, (2,), generator=gen).tolist())
            images.append(torch.from_numpy(self.images[i][y0:y0 + crop, x0:x0 + crop].astype(np.float32) / 255))
            offsets.append((x0, y0))
            lab = self.labels[i]
            if lab is not None:
                lab = lab - torch.tensor([x0, y0], dtype=torch.float32)
                lab = lab[((lab >= 0) & (lab <= crop - 1)).all(1)]
            labels.append(lab)
        return torch.stack(images)[:, None], offsets, labels


# =============================================================================================
# 8. Losses and PKE (SuperRetina's semi-supervised training)
# =============================================================================================

def random_affine(n, size, affine, gen) -> torch.Tensor:
    """n random 3x3 pixel-space affine maps about the image centre: rotation +/- deg, translation
    +/- trans * size, isotropic scale in [lo, hi]."""
    deg, trans, lo, hi = affine
    u = lambda: torch.rand(n, generator=gen)
    angle = (u() * 2 - 1) * math.radians(deg)
    scale = lo + u() * (hi - lo)
    t = (torch.rand(n, 2, generator=gen) * 2 - 1) * trans * size
    c = (size - 1) / 2
    A = torch.zeros(n, 3, 3)
    A[:, 0, 0], A[:, 0, 1] = scale * torch.cos(angle), -scale * torch.sin(angle)
    A[:, 1, 0], A[:, 1, 1] = scale * torch.sin(angle), scale * torch.cos(angle)
    A[:, :2, 2] = c + t - (A[:, :2, :2] @ torch.tensor([c, c]))
    A[:, 2, 2] = 1
    return A


def warp(images, A):
    """Warp B x C x H x W by pixel-space maps A (source -> target) with F.grid_sample."""
    b, _, h, w = images.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=images.device),
                            torch.arange(w, dtype=torch.float32, device=images.device), indexing="ij")
    target = torch.stack([xs, ys, torch.ones_like(xs)], -1).view(1, -1, 3)
    source = target @ torch.linalg.inv(A.to(images.device)).transpose(1, 2)
    source = source[..., :2] / source[..., 2:]
    grid = torch.stack([(source[..., 0] + 0.5) / w * 2 - 1, (source[..., 1] + 0.5) / h * 2 - 1], -1)
    return F.grid_sample(images, grid.view(b, h, w, 2), mode="bilinear", padding_mode="zeros", align_corners=False)


def transform_points(A, points):
    """Apply a 3x3 map to N x 2 points (torch)."""
    p = torch.cat([points, torch.ones_like(points[:, :1])], 1) @ A.to(points.device).T
    return p[:, :2] / p[:, 2:]


def inside(points, size, margin=0):
    return ((points >= margin) & (points <= size - 1 - margin)).all(1)


def gaussian_kernel(size, sigma):
    """size x size Gaussian as a 1 x 1 x size x size conv weight, peak 1."""
    k = cv2.getGaussianKernel(size, sigma)
    return torch.from_numpy((k @ k.T) / (k @ k.T).max()).float()[None, None]


def gaussian_targets(points, shape, cfg, weights=None):
    """Point labels -> heat targets: a 13 x 13, sigma 2 Gaussian normalised to peak 1, clipped."""
    b, _, h, w = shape
    impulses = torch.zeros(shape)
    for i, p in enumerate(points):
        if p is None or len(p) == 0:
            continue
        xy = p.round().long().clamp(0, w - 1)
        value = torch.ones(len(p)) if weights is None or weights[i] is None else weights[i]
        impulses[i, 0].index_put_((xy[:, 1], xy[:, 0]), value, accumulate=False)
    return F.conv2d(impulses, gaussian_kernel(cfg.blur_size, cfg.blur_sigma), padding=cfg.blur_size // 2).clamp(max=1.0)


def dice_loss(pred, target, mask=None, eps=1e-3):
    """1 - Dice with squared denominators (Milletari et al.), one ratio over the whole batch as
    SuperRetina computes it. Per-image ratios are unstable on small crops: where a crop's maps
    are faint the ratio's gradient grows as 1 / (its energy), and such spikes collapsed the
    detector to an all-zero heatmap within a few epochs."""
    if mask is not None:
        pred, target = pred * mask, target * mask
    inter = (pred * target).sum()
    return 1 - (2 * inter + eps) / ((pred ** 2).sum() + (target ** 2).sum() + eps)


def triplet_loss(anchor, positive, positions, cfg, gen, images=None):
    """Triplet loss on cosine distance with the hardest and a random negative, plus GOR.

    anchor, positive: N x D unit descriptors of the same N places (two views, or teacher and
    student); positions: N x 2, so that spatial neighbours of an anchor are never its negatives;
    images: optional N crop indices, places in different crops are never neighbours.
    GOR (Zhang et al. 2017) spreads non-matching descriptors over the sphere."""
    n, dim = anchor.shape
    if n < 3:
        return anchor.sum() * 0
    dist = 1 - anchor @ positive.T                                   # N x N cosine distances
    d_pos = dist.diagonal()
    near = torch.cdist(positions, positions) < cfg.negative_px        # includes the diagonal
    if images is not None:                                            # places in other crops are never near
        near &= images[:, None] == images[None, :]
    d_hard = dist.masked_fill(near, float("inf")).min(1).values
    rows = torch.arange(n, device=anchor.device)
    rand = (rows + torch.randint(1, n, (n,), generator=gen).to(anchor.device)) % n
    rand = torch.where(near[rows, rand], dist.masked_fill(near, float("inf")).argmin(1), rand)
    d_rand = dist[rows, rand]
    valid = torch.isfinite(d_hard)
    if not valid.any():                                               # all points crowded together
        return anchor.sum() * 0
    loss = (F.relu(cfg.margin + d_pos - d_hard)[valid].mean() + F.relu(cfg.margin + d_pos - d_rand)[valid].mean())
    sim = 1 - d_rand[valid]
    gor = sim.mean() ** 2 + F.relu((sim ** 2).mean() - 1.0 / dim)
    return loss + cfg.gor_weight * gor


def progressive_keypoint_expansion(heat, heat_w, desc, desc_w, A, cfg):
    """PKE's two filters on one image: which predicted keypoints are trustworthy?

    heat, heat_w: 1 x H x W heatmaps of an image and of its affine copy (map A); desc, desc_w
    their 1/8-scale descriptors. A candidate (an NMS peak of `heat`) is kept when
      geometric: the copy's heatmap reaches pke_threshold at the warped position, and
      content: among the copy's peaks, the nearest descriptor to the candidate's sits at the
               warped position (within pke_match_px) and passes the pke_ratio test.
    Returns K x 2 kept points (pixels of `heat`)."""
    size = heat.shape[-1]
    (cand, _), = nms(heat[None], cfg.nms_radius, cfg.pke_threshold, cfg.border)
    if len(cand) == 0:
        return cand
    moved = transform_points(A, cand)
    ok = inside(moved, size, 1)
    cand, moved = cand[ok], moved[ok]
    grid = torch.stack([(moved[:, 0] + 0.5) / size * 2 - 1, (moved[:, 1] + 0.5) / heat_w.shape[-2] * 2 - 1], 1)
    value = F.grid_sample(heat_w[None], grid.view(1, 1, -1, 2), align_corners=False).view(-1)
    cand, moved = cand[value >= cfg.pke_threshold], moved[value >= cfg.pke_threshold]
    (peaks, _), = nms(heat_w[None], cfg.nms_radius, cfg.pke_threshold, cfg.border)
    if len(cand) == 0 or len(peaks) == 0:
        return cand[:0]
    d, dw = sample_descriptors(desc[None], [cand], heat.shape[-2:])[0], sample_descriptors(desc_w[None], [peaks], heat.shape[-2:])[0]
    dist = torch.cdist(d, dw)
    two = dist.topk(min(2, len(peaks)), largest=False)
    nearest = two.indices[:, 0]
    ratio_ok = two.values[:, 0] < cfg.pke_ratio * two.values[:, 1] if len(peaks) > 1 else torch.ones(len(cand), dtype=torch.bool, device=cand.device)
    placed = (peaks[nearest] - moved).norm(dim=1) <= cfg.pke_match_px
    return cand[ratio_ok & placed]


def update_value_map(value, found, offset, crop, cfg):
    """Value map of one image (full training size): points found again gain 1 (within a pixel,
    for jitter), all others in the crop decay. Learned points are its NMS peaks >= threshold."""
    x0, y0 = offset
    window = value[y0:y0 + crop, x0:x0 + crop]
    hit = torch.zeros_like(window)
    if len(found):
        xy = found.round().long().cpu()
        hit[xy[:, 1], xy[:, 0]] = 1
    # the found pixel gains 1, its 8 neighbours 0.5: a point that moves by a pixel still
    # accumulates, and its peak stays unique for the NMS that reads the map
    bump = torch.tensor([[0.5, 0.5, 0.5], [0.5, 1.0, 0.5], [0.5, 0.5, 0.5]])[None, None]
    gain = F.conv2d(hit[None, None], bump, padding=1)[0, 0].clamp(max=1)
    window.copy_(torch.where(gain > 0, window + gain, window * cfg.value_decay))
    window[window < 0.05] = 0


def learned_points(value, labels, cfg):
    """PKE-learned points of one value map (crop) not already among the initial labels."""
    (pts, _), = nms(value[None, None], cfg.nms_radius, cfg.value_threshold - 1e-6)
    if len(pts) and labels is not None and len(labels):
        pts = pts[torch.cdist(pts, labels).min(1).values > cfg.nms_radius]
    return pts


def descriptor_points(heat, labels, crop, n, gen):
    """Places to train descriptors at: the labels, then the strongest predicted peaks not on a
    label, then random places, up to n. SuperRetina uses keypoints only, on whole 768 px images
    with hundreds of them; a 128 px crop holds a dozen, and on our CPU budget training on those
    alone learned markedly slower (nearest-neighbour accuracy on a 3-degree self-warp of FIRE
    images, two epochs on from one checkpoint: 22-42 of ~420 keypoints, 67-120 with the fill)."""
    (peaks, _), = nms(heat[None].detach(), CFG.nms_radius, CFG.nms_threshold, CFG.border, n)
    pts = peaks.cpu()
    if labels is not None and len(labels):
        if len(pts):
            pts = pts[torch.cdist(pts, labels).min(1).values > CFG.nms_radius]
        pts = torch.cat([labels, pts])[:n]
    if len(pts) < n:
        pts = torch.cat([pts, torch.rand(n - len(pts), 2, generator=gen) * (crop - 1)])
    return pts


def batch_triplet_loss(anchors, positives, points, cfg, gen):
    """Triplet loss over the keypoints of a whole batch of crops: one crop holds few keypoints,
    the batch gives each anchor enough negatives. Lists per image of N_i x D descriptors and
    N_i x 2 positions (pixels of that image's crop)."""
    images = torch.cat([torch.full((len(p),), i, device=p.device) for i, p in enumerate(points)])
    return triplet_loss(torch.cat(anchors), torch.cat(positives), torch.cat(points), cfg, gen, images)


def semi_supervised_losses(model, frozen, x, labels, value_maps, offsets, cfg, gen, pke=True):
    """SuperRetina's training objective on a batch of crops x (B x 1 x C x C).

    Detector: Dice against labels grown by PKE (initial labels 1, learned 0.5) for labelled
    images, plus Dice between the prediction and the warped-back prediction of a strong affine
    copy for every image; with pke=False (the warm-up epochs) only Dice against the initial
    labels. Descriptor: triplet loss at keypoints between the image and an affine,
    photometrically jittered copy.
    `frozen` is the same network without DDP, for the no-gradient PKE pass.
    Returns (losses dict, heat, desc, PKE points found per image)."""
    b, _, c, _ = x.shape
    A_copy = random_affine(b, c, cfg.descriptor_affine, gen)
    r = lambda: torch.rand(b, 1, 1, 1, generator=gen).to(x)
    x_copy = warp(x, A_copy)
    mean = x_copy.mean((2, 3), keepdim=True)            # brightness and contrast jitter, as SuperRetina's
    x_copy = (((x_copy - mean) * (0.7 + 0.6 * r()) + mean) * (0.6 + 0.8 * r())).clamp(0, 1)
    heat_all, desc_all = model(torch.cat([x, x_copy]))       # one forward: DDP sees one graph
    heat, desc, desc_copy = heat_all[:b], desc_all[:b], desc_all[b:]
    if pke:
        A_strong = random_affine(b, c, cfg.strong_affine, gen)
        with torch.no_grad():
            heat_s, desc_s = frozen(warp(x, A_strong))
    det, found, targets, has = [], [], [], []
    for i in range(b):
        if labels[i] is None:
            found.append(None)
            targets.append(None)
            continue
        learned = labels[i][:0]
        if pke:
            pts = progressive_keypoint_expansion(heat[i].detach(), heat_s[i], desc[i].detach(), desc_s[i], A_strong[i], cfg)
            update_value_map(value_maps[i], pts, offsets[i], c, cfg)
            x0, y0 = offsets[i]
            learned = learned_points(value_maps[i][y0:y0 + c, x0:x0 + c], labels[i], cfg)
        found.append(pts if pke else None)
        targets.append((torch.cat([labels[i], learned]), torch.cat([torch.ones(len(labels[i])), torch.full((len(learned),), cfg.learned_weight)])))
        has.append(i)
    if has:
        t = gaussian_targets([targets[i][0] for i in has], (len(has), 1, c, c), cfg, [targets[i][1] for i in has]).to(x)
        det.append(dice_loss(heat[has], t))
    if pke:
        back = warp_back(heat_s, A_strong)                    # strong copy's heat in this frame
        det.append(dice_loss(heat, back, valid_mask(A_strong, c).to(x)))
    anchors, positives, places = [], [], []
    for i in range(b):
        pts = descriptor_points(heat[i], targets[i][0] if targets[i] else None, c, cfg.triplet_points, gen)
        moved = transform_points(A_copy[i], pts)
        keep = inside(moved, c, 4)
        places.append(pts[keep].to(x.device))
        anchors.append(sample_descriptors(desc[i:i + 1], [places[-1]], (c, c))[0])
        positives.append(sample_descriptors(desc_copy[i:i + 1], [moved[keep].to(x.device)], (c, c))[0])
    desc_loss = batch_triplet_loss(anchors, positives, places, cfg, gen)
    return {"det": sum(det) if det else heat.sum() * 0, "desc": desc_loss}, heat, desc, found


def warp_back(heat_w, A):
    """Heat of an affine copy resampled into the original frame: target = A^-1 of the copy."""
    return warp(heat_w, torch.linalg.inv(A))


def valid_mask(A, c):
    """1 where a pixel of the original frame lands inside its affine copy."""
    return (warp(torch.ones(len(A), 1, c, c), torch.linalg.inv(A)) > 0.99).float()


def distillation_losses(student_heat, student_desc, teacher, x, labels, kd, cfg, gen):
    """RKD's reverse distillation. output: Dice between the teacher's and the student's heatmaps.
    representation: triplet loss whose anchors are the teacher's descriptors at the teacher's
    keypoints (plus labels) and whose positives are the student's at the same places -- the
    student is fitted in the teacher's descriptor space, not to its final decisions."""
    with torch.no_grad():
        t_heat, t_desc = teacher(x)
    out = {}
    if kd in ("output", "both"):
        out["kd_det"] = dice_loss(student_heat, t_heat)
    if kd in ("representation", "both"):
        c = x.shape[-1]
        places = [descriptor_points(t_heat[i], labels[i], c, cfg.triplet_points, gen).to(x.device) for i in range(len(x))]
        anchors = [sample_descriptors(t_desc[i:i + 1], [p], (c, c))[0] for i, p in enumerate(places)]
        positives = [sample_descriptors(student_desc[i:i + 1], [p], (c, c))[0] for i, p in enumerate(places)]
        out["kd_desc"] = batch_triplet_loss(anchors, positives, places, cfg, gen)
    return out


def photometric_augment(x, gen):
    """As RKD's code: brightness x1.0-1.2; Gaussian blur with p 0.2; contrast 0.75-1.2 with p 0.2."""
    b = len(x)
    r = lambda: torch.rand(b, 1, 1, 1, generator=gen).to(x)
    x = x * (1.0 + 0.2 * r())
    kernel = gaussian_kernel(5, 1.0).to(x)
    blurred = F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), kernel / kernel.sum())
    x = torch.where(r() < 0.2, blurred, x)
    mean = x.mean((2, 3), keepdim=True)
    x = torch.where(r() < 0.2, (x - mean) * (0.75 + 0.45 * r()) + mean, x)
    return x.clamp(0, 1)


# =============================================================================================
# 9. Training loops: train-cnn (SuperRetina) and distill (RKD), one process or DDP
# =============================================================================================

def pick_device(name):
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available (use --device cpu or auto)")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_distributed(device):
    """torchrun sets WORLD_SIZE/RANK: NCCL on CUDA, gloo on CPU. -> (rank, world size)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (torch.distributed.get_rank(), world) if world > 1 else (0, 1)


def sparse_value_maps(maps):
    return {str(i): (v.nonzero().to(torch.int32), v[v != 0].half()) for i, v in maps.items()}


def dense_value_maps(saved, size):
    maps = {}
    for i, (idx, val) in saved.items():
        m = torch.zeros(size, size)
        m[idx[:, 0].long(), idx[:, 1].long()] = val.float()
        maps[int(i)] = m
    return maps


def share_value_maps(maps, touched, world):
    """Each image belongs to one rank per epoch; afterwards every rank gets every update."""
    if world == 1 or not maps:
        return
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, sparse_value_maps({i: maps[i] for i in touched}))
    for part in gathered:
        maps.update(dense_value_maps(part, next(iter(maps.values())).shape[-1]))


def check_ranks_agree(model, world):
    """After DDP training every rank must hold bit-identical parameters."""
    if world == 1:
        return
    digest = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in model.parameters())).hexdigest()
    digests = [None] * world
    torch.distributed.all_gather_object(digests, digest)
    if len(set(digests)) != 1:
        raise RuntimeError(f"DDP ranks disagree on parameters: {digests}")
    return digests[0]


def train(args, distill=False):
    """One loop for both commands. train-cnn: the semi-supervised SuperRetina objective.
    distill: a student against a frozen teacher, with the student's own losses optionally."""
    cfg = dataclasses.replace(CFG, size=args.size, crop=args.crop, lr=args.lr, batch=args.batch, epochs=args.epochs,
                              seed=args.seed, pke_start=args.pke_start)
    device = pick_device(args.device)
    rank, world = init_distributed(device)
    main_rank, quiet = rank == 0, args.quiet or rank != 0
    out = Path(args.out)
    check_writable(out / "last.pt")           # on every rank, so that none waits for a failed one
    if args.val:
        read_fire(args.val)
    torch.manual_seed(cfg.seed)
    arch = args.student if distill else args.arch
    model = build_model(arch).to(device)
    teacher = None
    if distill and args.kd != "none":
        teacher = load_model(args.teacher, device)
        for p in teacher.parameters():
            p.requires_grad_(False)
    data = TrainingSet(collect_samples(args), cfg.size, quiet)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    value_maps = {i: torch.zeros(cfg.size, cfg.size) for i, lab in enumerate(data.labels) if lab is not None}
    start, best = 0, -1.0
    if args.resume:
        ckpt = load_checkpoint(args.resume)
        if ckpt["arch"] != arch or "optimizer" not in ckpt:
            raise UserError(f"{args.resume}: holds {ckpt['arch']!r} weights-only or of another arch, cannot resume {arch!r}")
        if ckpt["config"]["size"] != cfg.size:
            raise UserError(f"{args.resume}: trained at --size {ckpt['config']['size']}, not {cfg.size}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        for group in optimizer.param_groups:    # the loaded state carries the old rate; --lr wins
            group["lr"] = cfg.lr
        value_maps.update(dense_value_maps(ckpt["value_maps"], cfg.size))
        start, best = ckpt["epoch"], ckpt["best"]
    frozen = model
    if world > 1:
        # a student trained on one KD term alone leaves the other head out of the loss
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                    find_unused_parameters=distill and args.self_loss == "off" and args.kd in ("output", "representation"))
    sampler = torch.utils.data.DistributedSampler(range(len(data)), world, rank, shuffle=True, seed=cfg.seed, drop_last=world > 1)
    log = f"{'distill ' + args.kd if distill else 'train-cnn'} {arch}: {len(data)} images " \
          f"({len(value_maps)} labelled), {world} process(es) on {device}"
    if main_rank:
        print(log, file=sys.stderr)
    started = time.perf_counter()
    for epoch in range(start, cfg.epochs):
        sampler.set_epoch(epoch)
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch * world + rank)   # resumable randomness
        order = list(sampler)
        sums, steps, found, peak = {}, 0, 0, 0.0
        model.train()
        bar = progress(range(0, len(order), cfg.batch), f"epoch {epoch + 1}/{cfg.epochs}", quiet)
        for s in bar:
            idx = order[s:s + cfg.batch]
            x, offsets, labels = data.batch(idx, cfg.crop, gen)
            x = photometric_augment(x.to(device), gen)
            maps = [value_maps.get(i) for i in idx]
            losses = {}
            if not distill or args.self_loss == "on" or args.kd == "none":
                losses, heat, desc, pke = semi_supervised_losses(model, frozen, x, labels, maps, offsets, cfg, gen,
                                                                 pke=epoch >= cfg.pke_start)
                found += sum(len(p) for p in pke if p is not None)
            else:
                heat, desc = model(x)
            if distill and args.kd != "none":
                losses.update(distillation_losses(heat, desc, teacher, x, labels, args.kd, cfg, gen))
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.item()
            steps += 1
            peak = max(peak, heat.detach().max().item())
            bar.set_postfix(loss=f"{loss.item():.3f}", grad=f"{norm.item():.2f}")
        share_value_maps(value_maps, [i for i in order if i in value_maps], world)
        learned = sum(len(learned_points(v, data.labels[i], cfg)) for i, v in value_maps.items())
        if main_rank:
            val = validation_mauc(frozen, args.val, dataclasses.replace(cfg, size=args.val_size or cfg.size)) if args.val else None
            improved = val is None or val > best
            best = max(best, val if val is not None else best)
            state = dict(config=dataclasses.asdict(cfg), optimizer=optimizer.state_dict(), epoch=epoch + 1, best=best,
                         value_maps=sparse_value_maps(value_maps), args={k: str(v) for k, v in vars(args).items() if k != "func"})
            save_checkpoint(out / "last.pt", frozen, **state)
            if improved:
                save_checkpoint(out / "best.pt", frozen, **state)
            means = " ".join(f"{k} {v / max(steps, 1):.4f}" for k, v in sums.items())
            print(f"epoch {epoch + 1}/{cfg.epochs}  {means}  heat_max {peak:.3f}  pke_found {found}  pke_learned {learned}"
                  + (f"  val_mAUC {val:.4f}" if val is not None else "")
                  + f"  {(time.perf_counter() - started) / 60:.1f} min", flush=True)
            if peak < 1e-4:   # sigmoid saturated everywhere: Dice has no gradient left to recover with
                print(f"warning: the detector heatmap collapsed to zero (max {peak:.1e}); resume from an earlier "
                      "checkpoint with a lower --lr", file=sys.stderr, flush=True)
        if world > 1:
            torch.distributed.barrier()
    digest = check_ranks_agree(frozen, world)
    if main_rank and digest:
        print(f"distributed: parameters identical on all {world} ranks (sha256 {digest[:16]})", flush=True)
    if world > 1:
        torch.distributed.destroy_process_group()
    return out / "last.pt"


# =============================================================================================
# 10. Command line
# =============================================================================================

def draw_matches(query, refer, reg, max_side=1200):
    """Side-by-side picture of the inlier matches (green) on the two original images."""
    scale = max_side / max(query.shape[0], refer.shape[0], 1)
    q = cv2.resize(query, None, fx=scale, fy=scale)
    r = cv2.resize(refer, None, fx=scale, fy=scale)
    h = max(q.shape[0], r.shape[0])
    canvas = np.zeros((h, q.shape[1] + r.shape[1], 3), np.uint8)
    canvas[:q.shape[0], :q.shape[1]], canvas[:r.shape[0], q.shape[1]:] = q, r
    for a, b in zip(reg.query_points[reg.inliers] * scale, reg.refer_points[reg.inliers] * scale):
        pa, pb = tuple(int(v) for v in a), (int(b[0]) + q.shape[1], int(b[1]))
        cv2.line(canvas, pa, pb, (0, 255, 0), 1, cv2.LINE_AA)
        cv2.circle(canvas, pa, 3, (0, 0, 255), -1)
        cv2.circle(canvas, pb, 3, (0, 0, 255), -1)
    return canvas


def checkerboard(query, refer, H, tiles=8):
    """The query warped onto the reference by H, interleaved with it in a checkerboard."""
    h, w = refer.shape[:2]
    warped = cv2.warpPerspective(query, H, (w, h))
    yy, xx = np.mgrid[0:h, 0:w]
    board = ((yy * tiles // h + xx * tiles // w) % 2 == 0)[..., None]
    return np.where(board, refer, warped)


def plot_success_curves(runs, path, category=None):
    """Fraction of pairs with mean error below t, t = 1..25 px, one curve per model (OpenCV)."""
    W, H, m = 640, 440, 60
    img = np.full((H, W, 3), 255, np.uint8)
    cv2.rectangle(img, (m, 20), (W - 20, H - m), (0, 0, 0), 1)
    to_px = lambda t, f: (int(m + (t - 1) / (AUC_LIMIT - 1) * (W - 20 - m)), int(H - m - f * (H - m - 20)))
    for t in (1, 5, 10, 15, 20, 25):
        cv2.putText(img, str(t), (to_px(t, 0)[0] - 6, H - m + 18), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
    for f in (0, 0.5, 1.0):
        cv2.putText(img, f"{f:.1f}", (20, to_px(1, f)[1] + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
    cv2.putText(img, f"success rate vs error threshold (px), {category or 'all'}", (m, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
    colours = [(200, 60, 0), (0, 140, 0), (0, 0, 200), (160, 0, 160), (0, 160, 200), (90, 90, 90)]
    for k, (name, rows) in enumerate(runs):
        e = np.array([r["mean_error"] for r in rows if category in (None, r["category"])])
        if len(e) == 0:
            continue
        colour = colours[k % len(colours)]
        pts = np.array([to_px(t, (e < t).mean()) for t in range(1, AUC_LIMIT + 1)], np.int32)
        cv2.polylines(img, [pts], False, colour, 2, cv2.LINE_AA)
        cv2.putText(img, f"{name} (AUC {fire_auc(e):.3f})", (m + 10, 40 + 18 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.45, colour, 1)
    write_png(path, img)


def matching_config(args):
    cfg = dataclasses.replace(CFG, size=args.size, trick=not args.no_trick, method=args.method)
    return dataclasses.replace(cfg, ratio=args.ratio, sift_ratio=args.ratio) if args.ratio else cfg


def cmd_eval(args):
    cfg = matching_config(args)
    device = pick_device(args.device)
    fire = Path(args.fire) if args.fire else default_benchmark(args.quiet)
    pairs, note = read_fire(fire)
    names = args.weights or ([args.model] if args.model else [default_model_name()])
    for path in (args.json, args.csv):
        if path:
            check_writable(path)
    if args.plots:
        check_writable(Path(args.plots) / "x.png")
    runs, summaries = [], []
    for name in names:
        model = load_model(name, device)
        on_pair = None
        if args.show_pairs and args.plots:
            on_pair = lambda p, q, r, reg, n=name: write_png(Path(args.plots) / f"{'_'.join(Path(n).with_suffix('').parts[-2:])}_{p.name}.png", draw_matches(q, r, reg))
        rows = evaluate(model, pairs, cfg, args.quiet, on_pair)
        summary = summarise(rows)
        label = str(name)                 # as given: runs/lk/best.pt and runs/sr/best.pt stay apart
        runs.append((label, rows))
        summaries.append({"model": label, "arch": model.arch, "data": str(fire), "note": note, "size": cfg.size,
                          "trick": cfg.trick, "method": cfg.method, "summary": summary, "pairs": rows})
        print(f"model {label} ({model.arch}) on {fire} -- {note}")
        print(f"  S {summary['S']:.4f}  P {summary['P']:.4f}  A {summary['A']:.4f}  mAUC {summary['mAUC']:.4f}")
        print(f"  failed {summary['failed']}  inaccurate {summary['inaccurate']}  acceptable {summary['acceptable']}  "
              f"pairs {summary['pairs']}  seconds/pair {summary['seconds_per_pair']:.2f}")
    if args.markdown:
        print("\n| model | S | P | A | mAUC | failed / inaccurate / acceptable | s / pair |\n|---|---|---|---|---|---|---|")
        for s in summaries:
            m = s["summary"]
            print(f"| {s['model']} | {m['S']:.3f} | {m['P']:.3f} | {m['A']:.3f} | {m['mAUC']:.3f} | "
                  f"{m['failed']} / {m['inaccurate']} / {m['acceptable']} | {m['seconds_per_pair']:.2f} |")
    if args.json:
        doc = summaries[0] if len(summaries) == 1 else {"runs": summaries}
        write_atomic(args.json, json.dumps(doc, indent=1, default=lambda v: None).replace("Infinity", "null").encode())
    if args.csv:
        buf = io.StringIO()
        fields = ["model", "name", "category", "status", "mean_error", "max_error", "median_error", "inliers", "seconds"]
        writer = csv.DictWriter(buf, fields, extrasaction="ignore")
        writer.writeheader()
        for label, rows in runs:
            writer.writerows({"model": label, **r} for r in rows)
        write_atomic(args.csv, buf.getvalue().encode())
    if args.plots:
        for category in (None, *FIRE_CATEGORIES):
            plot_success_curves(runs, Path(args.plots) / f"success_{category or 'all'}.png", category)


def cmd_match(args):
    cfg = matching_config(args)
    out = Path(args.out)
    check_writable(out / "homography.json")
    model = load_model(args.weights or default_model_name(), pick_device(args.device))
    query, refer = read_image(args.query), read_image(args.refer)
    start = time.perf_counter()
    reg = register(model, query, refer, cfg)
    seconds = time.perf_counter() - start
    print(f"model {getattr(model, 'name', model.arch)}: keypoints {reg.keypoints[0]} / {reg.keypoints[1]}, "
          f"matches {len(reg.inliers)}, inliers {int(reg.inliers.sum())}, {seconds:.2f} s")
    doc = {"query": str(args.query), "refer": str(args.refer), "model": getattr(model, "name", model.arch),
           "homography_query_to_refer": None if reg.H is None else (reg.H / reg.H[2, 2]).tolist(),
           "keypoints": list(reg.keypoints), "matches": len(reg.inliers), "inliers": int(reg.inliers.sum())}
    write_png(out / "matches.png", draw_matches(query, refer, reg))
    if reg.H is not None:
        write_png(out / "checkerboard.png", checkerboard(query, refer, reg.H))
    else:
        print("no homography found: the pair could not be registered", file=sys.stderr)
    write_atomic(out / "homography.json", json.dumps(doc, indent=1).encode())
    return 0 if reg.H is not None else 1


def cmd_labels(args):
    """Vessel-map junction labels written in the Lab layout, plus pictures to inspect them."""
    out = Path(args.out)
    check_writable(out / "ImageSets" / "train.txt")
    rows = []
    for root in args.vessels:
        for s in progress(vessel_map_samples(root), f"labels {root}", args.quiet):
            name = f"{Path(root).name}_{s.path.stem}"
            image = read_image(s.path)
            write_png(out / "ImageData" / f"{name}.png", image)
            write_atomic(out / "Annotations" / f"{name}.txt", "".join(f"{x:.6f} {y:.6f}\n" for x, y in s.points).encode())
            for x, y in s.points * [image.shape[1], image.shape[0]]:
                cv2.circle(image, (int(x), int(y)), 5, (0, 255, 255), 2)
            write_png(out / "Pictures" / f"{name}.png", image)
            rows.append(f"{name}.png, {name}.txt")
    write_atomic(out / "ImageSets" / "train.txt", ("\n".join(rows) + "\n").encode())
    print(f"wrote {len(rows)} labelled images to {out}")


def cmd_synth(args):
    counts = {"S": args.pairs, "P": args.pairs, "A": args.pairs}
    write_synthetic_fire(args.out, args.quiet, counts)
    print(f"wrote {3 * args.pairs} synthetic pairs in FIRE's layout to {args.out}")


def cmd_export(args):
    """Strip a training checkpoint down to its weights (fp16 by default) for shipping."""
    ckpt = load_checkpoint(args.checkpoint)
    model = build_model(ckpt["arch"])
    model.load_state_dict({k: v.float() for k, v in ckpt["model"].items()})
    save_checkpoint(args.out, model, fp16=not args.fp32, epoch=ckpt.get("epoch", 0), config=ckpt.get("config", {}))
    data = Path(args.out).read_bytes()
    print(f"{args.out}: {ckpt['arch']}, {len(data) / 1e6:.1f} MB, sha256 {hashlib.sha256(data).hexdigest()}")


def cmd_bench(args):
    """Parameters, FLOPs and forward time of each architecture at --size (the benchmark)."""
    device = pick_device(args.device)
    x = torch.rand(1, 1, args.size, args.size, device=device)
    print(f"| arch | parameters (M) | GFLOPs at {args.size} px | forward s ({device}) |\n|---|---|---|---|")
    for arch in args.archs:
        model = build_model(arch).to(device).eval()
        with torch.no_grad():
            model(x)
            start = time.perf_counter()
            for _ in range(args.repeat):
                model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / args.repeat
        print(f"| {arch} | {count_parameters(model) / 1e6:.2f} | {count_flops(model, args.size) / 1e9:.1f} | {seconds:.3f} |")


def build_parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run (default: auto = cuda if available)")
    common.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: 0 = torch's choice)")
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    matching = argparse.ArgumentParser(add_help=False)
    matching.add_argument("--size", type=int, default=CFG.size, help="network input side in px, a multiple of 8 (default: %(default)s)")
    matching.add_argument("--no-trick", action="store_true", help="skip the second matching stage")
    matching.add_argument("--method", default=CFG.method, choices=["lmeds", "ransac"], help="homography estimator (default: %(default)s)")
    matching.add_argument("--ratio", type=float, help=f"kNN ratio test (default: {CFG.ratio} for networks, {CFG.sift_ratio} for SIFT)")

    p = argparse.ArgumentParser(prog="rkd.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Run 'rkd.py COMMAND --help' for each command's flags.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    e = sub.add_parser("eval", parents=[common, matching], help="score models on FIRE (or the synthetic benchmark)")
    e.add_argument("--fire", help="FIRE folder in its own layout (default: the embedded synthetic benchmark)")
    e.add_argument("--weights", nargs="+", help=f"checkpoint paths or shipped names {sorted(SHIPPED)} or 'sift'; several compare (default: best shipped, else sift)")
    e.add_argument("--model", choices=["sift"], help="score the SIFT baseline (same as --weights sift)")
    e.add_argument("--json", help="write summary and per-pair results (with homographies) here")
    e.add_argument("--csv", help="write per-pair rows here")
    e.add_argument("--plots", help="folder for success-curve PNGs (all models on one figure)")
    e.add_argument("--show-pairs", action="store_true", help="with --plots: also a match picture per pair")
    e.add_argument("--markdown", action="store_true", help="also print a markdown results table")
    e.set_defaults(func=cmd_eval)

    m = sub.add_parser("match", parents=[common, matching], help="register one pair of your own photographs")
    m.add_argument("query", help="image to be mapped (moving)")
    m.add_argument("refer", help="reference image (fixed)")
    m.add_argument("--out", required=True, help="output folder: homography.json, matches.png, checkerboard.png")
    m.add_argument("--weights", help="checkpoint path, shipped name or 'sift' (default: best shipped)")
    m.set_defaults(func=cmd_match)

    def training_flags(t):
        t.add_argument("--synthetic", type=int, default=0, help="number of synthetic labelled images (default: 0)")
        t.add_argument("--lab", nargs="+", help="folders in SuperRetina's Lab layout (labelled)")
        t.add_argument("--vessels", nargs="+", help="folders with images/ and vessels/ (+fov/): junction labels")
        t.add_argument("--unlabelled", nargs="+", help="image folders without labels (descriptor + consistency only)")
        t.add_argument("--size", type=int, default=CFG.size, help="training image side, px (default: %(default)s)")
        t.add_argument("--crop", type=int, default=0, help="random crop side, px; 0 = whole image (default: 0)")
        t.add_argument("--epochs", type=int, default=CFG.epochs, help="(default: %(default)s)")
        t.add_argument("--batch", type=int, default=CFG.batch, help="images per step, per process (default: %(default)s)")
        t.add_argument("--lr", type=float, default=CFG.lr, help="Adam learning rate (default: %(default)s)")
        t.add_argument("--seed", type=int, default=CFG.seed, help="(default: %(default)s)")
        t.add_argument("--pke-start", type=int, default=CFG.pke_start,
                       help="epochs of plain label Dice before PKE and the consistency term start (default: %(default)s)")
        t.add_argument("--out", required=True, help="run folder: last.pt every epoch, best.pt")
        t.add_argument("--resume", help="continue from this checkpoint (last.pt)")
        t.add_argument("--val", help="FIRE-layout folder scored after each epoch, the best epoch kept (use `synth` pairs: FIRE is a test set)")
        t.add_argument("--val-size", type=int, default=0, help="model size for validation (default: --size)")

    t = sub.add_parser("train-cnn", parents=[common], help="train a CNN teacher semi-supervised (SuperRetina)")
    t.add_argument("--arch", default="lk", choices=["lk", "superretina", "small_cnn"], help="(default: %(default)s)")
    training_flags(t)
    t.set_defaults(func=lambda a: train(a, distill=False))

    d = sub.add_parser("distill", parents=[common], help="train a student from a frozen teacher (RKD)")
    d.add_argument("--teacher", help="teacher checkpoint or shipped name (not needed with --kd none)")
    d.add_argument("--student", default="vit_student", choices=["vit_student", "small_cnn", "lk", "superretina"], help="(default: %(default)s)")
    d.add_argument("--kd", default="representation", choices=["representation", "output", "both", "none"],
                   help="representation: descriptor-space fitting (the paper); output: heatmap only; none: no teacher (default: %(default)s)")
    d.add_argument("--self-loss", default="on", choices=["on", "off"], help="also the student's own losses (default: %(default)s)")
    training_flags(d)
    d.set_defaults(func=lambda a: train(a, distill=True))

    lb = sub.add_parser("labels", parents=[common], help="derive keypoint labels from vessel maps (Lab layout + pictures)")
    lb.add_argument("--vessels", nargs="+", required=True, help="folders with images/ and vessels/ (+fov/)")
    lb.add_argument("--out", required=True, help="output folder in the Lab layout")
    lb.set_defaults(func=cmd_labels)

    sy = sub.add_parser("synth", parents=[common], help="write a synthetic benchmark in FIRE's layout")
    sy.add_argument("--out", required=True, help="output folder")
    sy.add_argument("--pairs", type=int, default=4, help="pairs per category (default: %(default)s)")
    sy.set_defaults(func=cmd_synth)

    ex = sub.add_parser("export", parents=[common], help="strip a checkpoint to shippable weights")
    ex.add_argument("checkpoint")
    ex.add_argument("out")
    ex.add_argument("--fp32", action="store_true", help="keep fp32 (default: fp16, loaded back as fp32)")
    ex.set_defaults(func=cmd_export)

    b = sub.add_parser("bench", parents=[common], help="parameters, FLOPs and forward time per architecture")
    b.add_argument("--size", type=int, default=CFG.size, help="(default: %(default)s)")
    b.add_argument("--repeat", type=int, default=3, help="timed forwards (default: %(default)s)")
    b.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    b.set_defaults(func=cmd_bench)
    return p


def check_arguments(args):
    size, crop = getattr(args, "size", 8), getattr(args, "crop", 0)
    if size <= 0 or size % 8 or crop < 0 or crop % 8 or crop > size:
        raise UserError("--size must be a positive multiple of 8, and --crop a multiple of 8 no larger than --size")
    if getattr(args, "val_size", 0) < 0 or getattr(args, "val_size", 0) % 8:
        raise UserError("--val-size must be a multiple of 8")
    if getattr(args, "kd", "none") != "none" and not args.teacher:
        raise UserError(f"distill --kd {args.kd} needs --teacher (a checkpoint or shipped name)")
    if getattr(args, "pke_start", 0) < 0:
        raise UserError("--pke-start must be 0 or more")
    for flag in ("batch", "repeat", "epochs", "pairs"):
        if getattr(args, flag, 1) < 1:
            raise UserError(f"--{flag} must be at least 1")
    if args.threads < 0:
        raise UserError("--threads must be 0 (torch's choice) or more")


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        check_arguments(args)
        if args.threads:
            torch.set_num_threads(args.threads)
        result = args.func(args)
        return result if isinstance(result, int) else 0
    except UserError as e:
        print(f"rkd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rkd: interrupted (the last checkpoint is whole; --resume continues from it)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
