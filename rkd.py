#!/usr/bin/env python3
"""rkd.py -- reverse knowledge distillation for retinal image matching, in one file.

Two fundus photographs of the same eye are registered by detecting keypoints (vessel
bifurcations and crossings), describing them, matching the descriptors and fitting a
homography. The file reads top to bottom: first what the two papers describe, in the order the
data flows, then what this project adds around them, then the command line.

The papers
  1. Configuration ................ every constant named once
  2. Preprocessing ................ SuperRetina, implementation details (green, CLAHE, gamma)
  3. Networks ..................... SuperRetina, network architecture; RKD, the LK teacher
                                    and the transformer student
  4. Inference pipeline ........... SuperRetina, keypoint detection / description at test
                                    time and its two-stage "matching trick"
  5. FIRE evaluation .............. FIRE (Hernandez-Matas et al. 2017), protocol as
                                    SuperRetina and RKD report it (AUC over 1..25 px per
                                    category, mAUC)
  6. Losses and PKE ............... SuperRetina, semi-supervised training: Dice detector loss,
                                    progressive keypoint expansion, triplet descriptor loss;
                                    RKD's knowledge terms
  7. Training loops ............... train-cnn (SuperRetina's training), distill (RKD's reverse
                                    distillation; Hajabdollahi et al. 2020 for large-to-small),
                                    one process or DDP
This project's own (in neither paper)
  8. Synthetic fundus generator ... the embedded benchmark and exact keypoint labels
  9. Training data ................ dataset layouts (SuperRetina's Lab layout, DRIVE, HRF,
                                    CHASE_DB1, unlabelled folders), vessel-junction labels,
                                    the in-memory training set
 10. Self-warp validation ......... held-out photographs registered to known random warps
                                    of themselves
 11. Plausibility bar ............. when match trusts a homography (exit 0)
 12. Checkpoints .................. self-describing files, shipped weights, fp16 -> fp32
 13. Files and errors ............. image reading checks, atomic writes, strict JSON,
                                    one-line errors, progress bars
 14. Pictures ..................... matches, aligned query, checkerboard, success curves
The command line
 15. Command line ................. eval, match, train-cnn, distill, selfwarp, labels, synth,
                                    export, bench

Papers: Liu et al., "Semi-Supervised Keypoint Detector and Descriptor for Retinal Image
Matching" (SuperRetina, ECCV 2022); Nasser et al., "Reverse Knowledge Distillation: Training a
Large Model using a Small One for Retinal Image Matching on Limited Data" (RKD, WACV 2024);
Hajabdollahi et al. 2020 (large-to-small distillation through unlabelled images).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import hashlib
import io
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# PyTorch's own switch: each CPU allocation of 2 MB or more is page-aligned and advised onto
# transparent huge pages (madvise MADV_HUGEPAGE), which matters where the kernel's THP mode is
# `madvise` (under `always` the kernel uses them unasked, under `never` not at all). A 64-channel
# activation at 768 px is 150 MB; with 4 KB pages every fresh one costs ~37,000 page faults, and
# `eval` spent a quarter of its CPU time in the kernel. Torch reads it once, at its first
# allocation, so it is set before torch is imported (a program that imports torch before rkd
# sets it itself); THP_MEM_ALLOC_ENABLE=0 in the environment turns it off. Measured in README,
# "Speed and precision".
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

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
    """Every tunable number in one place; argparse defaults are read from here. Training values
    are SuperRetina's config/train.yaml (its latest version, commit da96bd5) unless a comment
    says otherwise; README's "Deviations" table lists every departure with its evidence."""
    # inference (SuperRetina's config/test.yaml and test_on_FIRE.py)
    size: int = 768                 # network input side; images are resized to size x size
    nms_radius: int = 10            # keypoints closer than this (model px) are suppressed
    nms_threshold: float = 0.01     # minimum heatmap value of a keypoint at test time
    border: int = 4                 # keypoints this close to the image edge are dropped
    max_keypoints: int = 2048       # strongest keypoints kept per image (ours: bounds matching
                                    # cost)
    ratio: float = 0.9              # Lowe ratio for kNN matching of learned descriptors
    sift_ratio: float = 0.8         # ... and of SIFT's, Lowe's own value
    method: str = "ransac"          # cv2.findHomography estimator: ransac | lmeds (SuperRetina's);
                                    # a deviation, see README "Deviations"
    ransac_px: float = 5.0          # RANSAC reprojection threshold, in model pixels
    trick: bool = True              # SuperRetina's two-stage "matching trick"
    precision: str = "fp32"         # autocast for the networks: fp32 | bf16 | fp16 (--precision)
    # training: optimiser (train.py: Adam 1e-4, batch 4, 150 epochs, no clipping)
    epochs: int = 150
    batch: int = 4
    lr: float = 1e-4
    grad_clip: float = 0.0          # max gradient norm; 0 = off, as SuperRetina
    seed: int = 42
    crop: int = 0                   # 0 = whole image, else random crop side (model px)
    # detector targets: get_gaussian_kernel(13, 2) convolved with the label points, clipped at 1
    blur_size: int = 13
    blur_nsig: float = 2.0          # the kernel spans +/- (nsig + a half bin) standard deviations
    # PKE (pke_module.py, record_module.py)
    pke_start: int = 0              # pke_start_epoch: epochs of plain label Dice before PKE
    train_nms_radius: int = 10      # NMS of PKE candidates, descriptor-loss and KD keypoints (RKD's
                                    # train.yaml, SuperRetina's older one, has 20 and 0.5)
    train_nms_threshold: float = 0.1
    train_border: int = 8
    geometric_threshold: float = 0.5   # geometric filter: warped heatmap must reach this
    max_geometric: int = 1024       # at most this many geometric survivors per image
    content_ratio: float = 0.7      # content filter: nearest / second-nearest descriptor distance
    value_area: int = 8             # value map: `area`; the neighbourhood is a value_area/2 square
    value_increase_point: int = 5   # value map: a point found where nothing was recorded
    value_increase_area: int = 1    # value map: a point found beside recorded values
    value_decay: int = 1            # value map: a recorded value not found again loses this
    learned_label: float = 0.5      # PKE-learned point before it is merged with the labels
    # descriptor loss (super_retina.py descriptor_loss, loss/triplet_loss.py)
    margin: float = 0.8             # triplet margin on cosine distance
    max_descriptor_points: int = 1000   # more keypoints in an image: no descriptor loss that step
    # warps (train_util.py affine_images): degrees, translation (fraction of size), scale range
    detector_affine: tuple = (15.0, 0.2, 0.9, 1.35)
    descriptor_affine: tuple = (3.0, 0.1, 0.9, 1.1)
    jitter_probability: float = 0.6  # descriptor copy's colour jitter, once per batch
    jitter_brightness: float = 0.4
    jitter_contrast: float = 0.3


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
ATTENTION_WINDOW = 256                            # px: the student's ViT attends within such
                                                  # squares
LAYER_SCALE = 1e-5                                # the student's ViT blocks start near identity
DEFAULT_ORDER = ("lk", "student", "superretina", "direct")   # best first, by validation
                                                             # (weights/README)


# =============================================================================================
# 2. Preprocessing
# =============================================================================================
# SuperRetina's implementation details: the green channel, CLAHE and gamma; keypoints found in
# the size x size model input mapped back to the photograph.

def preprocess(image: np.ndarray, size: int) -> np.ndarray:
    """Fundus photograph (H x W x 3, any bit depth) -> size x size float32 in [0, 1], as
    SuperRetina feeds its network.

    Green channel (best vessel contrast), z-score then min-max to 0..255 -- so 16-bit data keep
    their full dynamic range --, CLAHE (clip 2, 8x8 tiles), gamma 1.2, at the original
    resolution so CLAHE's tiles see the same anatomy whatever the model size. A non-square
    photograph is then padded with black at the bottom or right to a square (SuperRetina
    stretches it; README "Deviations"), and the square resized to size x size."""
    g = image[:, :, 1].astype(np.float32)
    g = (g - g.mean()) / (g.std() + 1e-8)
    g = (g - g.min()) / (g.max() - g.min() + 1e-8) * 255.0
    g = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(g.astype(np.uint8))
    gamma_lut = ((np.arange(256) / 255.0) ** (1.0 / 1.2) * 255.0).astype(np.uint8)
    g = cv2.LUT(g, gamma_lut)
    side = max(g.shape)
    if g.shape != (side, side):
        g = cv2.copyMakeBorder(g, 0, side - g.shape[0], 0, side - g.shape[1], cv2.BORDER_CONSTANT,
                               value=0)
    shrink = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    g = cv2.resize(g, (size, size), interpolation=shrink)                 # size x size uint8
    return g.astype(np.float32) / 255.0


def model_to_original(shape, size) -> np.ndarray:
    """3x3 matrix taking model-pixel coordinates to original-pixel coordinates: one scale for
    both axes (preprocess pads to a square), pixel index times scale, as SuperRetina's
    predictor maps its keypoints (`i[0] / model_image_width * image_width`)."""
    s = max(shape[:2]) / size
    return np.diag([s, s, 1.0])


def keypoints_to_original(points, shape, size) -> np.ndarray:
    """N x 2 keypoints in model px -> N x 2 in original px, truncated to whole pixels as
    SuperRetina's predictor does (`int(x / 768 * W)`)."""
    return np.floor(apply_homography(model_to_original(shape, size), points))


def apply_homography(H, pts) -> np.ndarray:
    """A 3 x 3 homography applied to N x 2 points (numpy, float64) -> N x 2."""
    pts = np.asarray(pts, np.float64).reshape(-1, 2)
    p = np.c_[pts, np.ones(len(pts))] @ np.asarray(H, np.float64).T
    return p[:, :2] / p[:, 2:3]


# =============================================================================================
# 3. Networks
# =============================================================================================
# SuperRetina's architecture, RKD's LK teacher (LKU-Net blocks) and our transformer student.
# Every network maps B x 1 x H x W images to heatmaps B x 1 x H x W and descriptors
# B x 256 x H/8 x W/8.

def double_conv(cin, cout, act=None):
    """Two 3x3 convolutions, each followed by `act` (default ReLU, SuperRetina's)."""
    act = act or nn.ReLU(inplace=True)
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), act,
                         nn.Conv2d(cout, cout, 3, padding=1), act)


class LKBlock(nn.Module):
    """LKU-Net block (Jia et al. 2022) as RKD's LKUNET model builds one encoder stage:
    act(3x3 conv), then identity + 1x1 + 3x3 + 5x5 convolutions summed, then act again.

    The parallel kernels widen the receptive field at little cost; the RKD paper reports the
    change lifts SuperRetina's FIRE mAUC (0.755 -> 0.761). `act` is the network's one PReLU."""

    def __init__(self, cin, cout, act):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.k1, self.k3, self.k5 = (nn.Conv2d(cout, cout, k, padding=k // 2) for k in (1, 3, 5))
        self.act = act

    def forward(self, x):                                    # B x cin x H x W -> B x cout x H x W
        x = self.act(self.conv(x))
        return self.act(x + self.k1(x) + self.k3(x) + self.k5(x))


class DetectorDecoder(nn.Module):
    """U-Net decoder: from 1/8 back to full resolution with skips, 1x1 conv, sigmoid heatmap."""

    def __init__(self, c1, c2, c3, c4):
        super().__init__()
        self.up3 = double_conv(c3 + c4, c3)
        self.up2 = double_conv(c2 + c3, c2)
        self.up1 = double_conv(c1 + c2, c1)
        self.head = nn.Conv2d(c1, 1, 1)

    def forward(self, x1, x2, x3, x4):     # x1 B x c1 x H x W ... x4 B x c4 x H/8 x W/8
        def up(a, b):                      # a upsampled to b's size, then stacked on b
            a = F.interpolate(a, size=b.shape[-2:], mode="bilinear", align_corners=True)
            return torch.cat([a, b], 1)
        y = self.up3(up(x4, x3))
        y = self.up2(up(y, x2))
        y = self.up1(up(y, x1))
        # the 1x1 head runs in fp32 even under bf16 autocast: bf16 logits (8-bit mantissa) make
        # flat tops of equal scores, and NMS then moves keypoints by whole pixels
        with torch.autocast(y.device.type, enabled=False):
            return torch.sigmoid(self.head(y.float()))      # B x 1 x H x W, fp32


class DescriptorHead(nn.Module):
    """Descriptor head in SuperRetina's layout: 3x3 conv, 4x4 stride-2 conv, 1x1 conv,
    L2-normalise, 2x transposed conv. The stride-2/transposed pair widens context. Two changes
    (README "Deviations"): the 4x4 conv is padded, so the map is exactly 1/8 of the image (96 x 96
    at 768 px, SuperRetina's unpadded one is 94 x 94), and the map is normalised once more."""

    def __init__(self, cin, dim=256, act=None):
        super().__init__()
        self.act = act or nn.ReLU()
        self.a = nn.Conv2d(cin, 256, 3, padding=1)
        self.b = nn.Conv2d(256, dim, 4, stride=2, padding=1)
        self.c = nn.Conv2d(dim, dim, 1)
        self.up = nn.ConvTranspose2d(dim, dim, 2, stride=2)

    def forward(self, x):                                    # B x cin x H/8 x W/8
        d = self.c(self.act(self.b(self.act(self.a(x)))))    # B x dim x H/16 x W/16
        d = self.up(F.normalize(d.float(), dim=1).to(d.dtype))
        if d.shape[-2:] != x.shape[-2:]:                     # H/8 odd: stride 2 lost a row
            d = F.interpolate(d, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return F.normalize(d.float(), dim=1)                 # B x dim x H/8 x W/8, fp32


class SuperRetina(nn.Module):
    """VGG-style encoder 64-64-128-128 with three 2x max-pools, U-Net detector, descriptor head.

    forward: image B x 1 x H x W in [0, 1] (H, W multiples of 8) ->
             heatmap B x 1 x H x W in (0, 1), descriptors B x 256 x H/8 x W/8 (unit length)."""
    arch = "superretina"

    def __init__(self, widths=(64, 64, 128, 128), large_kernel=False):
        super().__init__()
        c1, c2, c3, c4 = widths
        if large_kernel:   # RKD's LKUNET: one PReLU (one slope) shared by encoder and descriptor
            act = nn.PReLU()
            self.stages = nn.ModuleList([double_conv(1, c1, act), LKBlock(c1, c2, act),
                                         LKBlock(c2, c3, act), LKBlock(c3, c4, act)])
        else:
            act = None
            self.stages = nn.ModuleList([double_conv(1, c1), double_conv(c1, c2),
                                         double_conv(c2, c3), double_conv(c3, c4)])
        self.detector = DetectorDecoder(c1, c2, c3, c4)     # decoder: ReLU in both
        self.descriptor = DescriptorHead(c4, act=act)

    def forward(self, x):                                   # B x 1 x H x W
        feats = []
        for i, stage in enumerate(self.stages):
            x = stage(F.max_pool2d(x, 2) if i else x)       # full, 1/2, 1/4, 1/8
            feats.append(x)                                 # B x c_i x H/2^i x W/2^i
        # B x 1 x H x W, B x 256 x H/8 x W/8
        return self.detector(*feats), self.descriptor(feats[-1])


class LKSuperRetina(SuperRetina):
    """RKD's modified teacher (its model/LKUNET): encoder stages 2-4 are LKU-Net blocks, and
    one shared PReLU replaces ReLU in the encoder and the descriptor head."""
    arch = "lk"

    def __init__(self, widths=(64, 64, 128, 128)):
        super().__init__(widths, large_kernel=True)


class SmallCNN(SuperRetina):
    """The conventional (large-to-small) student: SuperRetina's layout at half width."""
    arch = "small_cnn"

    def __init__(self, widths=(32, 32, 64, 64)):
        super().__init__(widths)


class TransformerStudent(nn.Module):
    """Our heavier student (RKD's is a SwinUNETR): a timm Vision Transformer between a CNN stem
    and the teacher's decoders.

    A TransUNet-style hybrid: three conv stages (as the teacher's, full to 1/4 resolution) give
    the detector its high-resolution skips and feed 4x4 patches of their 1/4-scale features to
    a ViT-Small (12 blocks, 384 wide) whose tokens live at 1/16. The ViT has no absolute
    position embedding and attends within 256 px windows (near the crop sizes it trains on),
    laid four times half a window apart and blended, so training on random crops transfers to
    whole images (see windowed_vit). Outputs are exactly the teacher's, so inference and
    evaluation run unchanged.

    Its blocks carry LayerScale (timm's init_values; CaiT, Touvron et al. 2021) starting at
    LAYER_SCALE, so that the ViT starts near the identity and its tokens still differ from place
    to place. Without it, RKD's knowledge descriptor term pinned the student at its collapsed
    solution (one descriptor everywhere, loss = the margin 0.800) within a few steps; with 1e-5
    it leaves it, with 0.1 it does not (README, "The training recipe";
    test_vit_student_leaves_the_collapsed_descriptor_solution).

    forward: B x 1 x H x W -> heatmap B x 1 x H x W, descriptors B x 256 x H/8 x W/8."""
    arch = "vit_student"

    def __init__(self, widths=(64, 64, 128), embed_dim=384, depth=12, heads=6):
        super().__init__()
        # timm imports torchvision: loaded lazily
        from timm.models.vision_transformer import VisionTransformer
        c1, c2, c3 = widths
        self.stages = nn.ModuleList([double_conv(1, c1), double_conv(c1, c2), double_conv(c2, c3)])
        self.vit = VisionTransformer(img_size=192, patch_size=4, in_chans=c3, embed_dim=embed_dim,
                                     depth=depth, num_heads=heads, class_token=False,
                                     global_pool="", num_classes=0, pos_embed="none",
                                     init_values=LAYER_SCALE,
                                     dynamic_img_size=True, dynamic_img_pad=True)
        self.neck = nn.Sequential(nn.Conv2d(embed_dim, 128, 3, padding=1), nn.ReLU(inplace=True))
        self.detector = DetectorDecoder(c1, c2, c3, 128)
        self.descriptor = nn.Sequential(nn.Conv2d(embed_dim, 256, 3, padding=1),
                                        nn.ReLU(inplace=True), nn.Conv2d(256, 256, 1))

    def forward(self, x):
        h8, w8 = x.shape[-2] // 8, x.shape[-1] // 8
        x1 = self.stages[0](x)                                   # B x c1 x H x W
        x2 = self.stages[1](F.max_pool2d(x1, 2))                 # B x c2 x H/2 x W/2
        x3 = self.stages[2](F.max_pool2d(x2, 2))                 # B x c3 x H/4 x W/4
        tokens = self.windowed_vit(x3)                           # B x E x H/16 x W/16
        t8 = F.interpolate(tokens, scale_factor=2, mode="bilinear", align_corners=False)
        t8 = t8[..., :h8, :w8]                                   # B x E x H/8 x W/8
        heat = self.detector(x1, x2, x3, self.neck(t8))          # B x 1 x H x W, fp32
        desc = F.normalize(self.descriptor(t8).float(), dim=1)   # B x 256 x H/8 x W/8, fp32
        return heat, desc

    def windowed_vit(self, x3):
        """ViT tokens of 1/4-scale features, attention limited to ATTENTION_WINDOW px squares.

        Trained on 128 px crops, the ViT had only seen 8 x 8 tokens; on a whole 768 px image
        (48 x 48 tokens) its heatmap vanished (max 0.37 at 256 px inputs, 0.05 at 384, 0 at 768).
        Larger inputs are therefore cut into windows the ViT runs on separately (Swin-style local
        attention); the convolutional stem and decoders still see the whole image.

        One tiling leaves the tokens at a window's border without context on one side. The
        windows are therefore laid four times, shifted by half a window down, right and both,
        and each token is the mean of its four versions weighted by how central it sat in each
        window (a tent, lowest at the window's border): the tokens then follow the image
        under shifts of half a window, and the shipped student's self-warp NN accuracy rose
        0.6605 -> 0.6905 (README, "Deviations"). At 768 px that is 49 windows instead of 9 (the
        shifted tilings are padded), and the forward took 2.0x as long. Training crops up to
        256 px fit one window and are unchanged; larger crops and whole images (--crop 0) pass
        through the four tilings in training too.

        x3: B x C x H x W (1/4 scale) -> B x E x ceil(H/4) x ceil(W/4) tokens."""
        w = ATTENTION_WINDOW // 4                                # window side in 1/4-scale pixels
        h, wd = x3.shape[-2:]
        if h <= w and wd <= w:                                   # a training crop: one window
            return self._tiled_vit(x3)
        th, tw, n = math.ceil(h / 4), math.ceil(wd / 4), w // 4  # tokens; tokens per window side
        half = n // 2 * 4                    # half a window in 1/4-scale px, whole tokens
        out = weight = 0
        for oy in (0, half):
            for ox in (0, half):
                t = self._tiled_vit(F.pad(x3, (ox, 0, oy, 0)))   # windows start oy, ox earlier
                t = t[..., oy // 4:oy // 4 + th, ox // 4:ox // 4 + tw]          # B x E x th x tw
                py = (torch.arange(th, device=t.device) + oy // 4) % n          # place in window
                px = (torch.arange(tw, device=t.device) + ox // 4) % n
                tent = (torch.minimum(py + 0.5, n - py - 0.5)[:, None]
                        * torch.minimum(px + 0.5, n - px - 0.5)[None, :])      # th x tw, fp32
                out, weight = out + t.float() * tent, weight + tent
        return (out / weight).to(t.dtype)

    def _tiled_vit(self, x3):
        """One tiling of ATTENTION_WINDOW px windows from the top-left corner, each run through
        the ViT on its own. x3: B x C x H x W -> B x E x ceil(H/4) x ceil(W/4)."""
        def vit(t):                                         # N x C x h x w -> N x E x h/4 x w/4
            return self.vit.forward_intermediates(t, indices=1, norm=True,
                                                  intermediates_only=True)[0]
        w = ATTENTION_WINDOW // 4                                # window side in 1/4-scale pixels
        b, c, h, wd = x3.shape
        if h <= w and wd <= w:
            return vit(x3)
        padded = F.pad(x3, (0, -wd % w, 0, -h % w))
        nh, nw = padded.shape[-2] // w, padded.shape[-1] // w
        tiles = padded.unfold(2, w, w).unfold(3, w, w)          # B x C x nh x nw x w x w
        tiles = tiles.permute(0, 2, 3, 1, 4, 5).reshape(-1, c, w, w)   # B*nh*nw x C x w x w
        t = vit(tiles)                                           # B*nh*nw x E x w/4 x w/4
        e, s = t.shape[1], t.shape[-1]
        t = t.view(b, nh, nw, e, s, s).permute(0, 3, 1, 4, 2, 5).reshape(b, e, nh * s, nw * s)
        return t[..., :math.ceil(h / 4), :math.ceil(wd / 4)]


ARCHS = {cls.arch: cls for cls in (SuperRetina, LKSuperRetina, SmallCNN, TransformerStudent)}
# the layers that make the heatmap and nothing else (train-cnn/distill --detector-only)
DETECTOR_LAYERS = ("detector.", "neck.")


def build_model(arch):
    """An architecture's name (ARCHS) -> a freshly initialised network."""
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


# =============================================================================================
# 4. Inference pipeline
# =============================================================================================
# SuperRetina at test time: heatmap -> NMS keypoints (Detections) -> descriptors sampled at them
# (Features) -> kNN matches with Lowe's ratio test -> robust homography (Stage); then its
# "matching trick": the query warped by that homography and matched again (Registration).

def simple_nms(scores, radius, rounds=2):
    """simple_nms as in SuperRetina's first release (common_util.py, commit b29c61c, also RKD's
    copy; SuperGlue's): B x 1 x H x W scores -> the same with every non-maximum set to 0.

    A pixel survives where it is the largest within `radius` px (a 2r+1 max-pool). Then, twice,
    the survivors' neighbourhoods are blanked and maxima of what is left are added where no
    survivor is near -- a weaker peak hidden by a stronger one's window comes back. One change
    (README "Deviations"): equal maxima within one window (a plateau, common in reduced
    precision and in label maps) keep only the first in raster order, where that version keeps
    them all. SuperRetina's latest version (da96bd5) has a single pass, no rounds, and keeps
    one maximum per plateau chosen at random."""
    scores = scores.float()
    h, w = scores.shape[-2:]
    first = torch.arange(h * w, 0, -1, device=scores.device, dtype=torch.float32).view(1, 1, h, w)

    def pool(x):   # the (2r+1)^2 window's maximum, as a row then a column pass (same, but O(r))
        x = F.max_pool2d(x, (1, 2 * radius + 1), stride=1, padding=(0, radius))
        return F.max_pool2d(x, (2 * radius + 1, 1), stride=1, padding=(radius, 0))

    def maxima(x):   # local maxima of x, one per plateau
        peak = x == pool(x)
        rank = torch.where(peak, first, 0)
        return peak & (rank == pool(rank))
    keep = maxima(scores)
    for _ in range(rounds):
        blanked = pool(keep.float()) > 0
        keep = keep | (maxima(torch.where(blanked, 0, scores)) & ~blanked)
    return torch.where(keep, scores, 0)


@dataclass
class Detections:
    """One heatmap's keypoints, strongest first (detect_keypoints)."""
    keypoints: torch.Tensor         # N x 2 (x, y) px, float
    keypoint_scores: torch.Tensor   # N heatmap values at the keypoints


def detect_keypoints(heat, radius, threshold, border=0, top_k=None) -> list:
    """Keypoints of B x 1 x H x W heatmaps -> a list of B Detections.

    simple_nms, then heat > threshold, then a `border` px frame dropped, as SuperRetina's
    predictor; strongest first, at most top_k."""
    peak = simple_nms(heat, radius)
    peak = peak > threshold                                  # B x 1 x H x W bools
    if border:
        peak[..., :border, :] = peak[..., -border:, :] = False
        peak[..., :, :border] = peak[..., :, -border:] = False
    out = []
    for b in range(heat.shape[0]):
        ys, xs = torch.nonzero(peak[b, 0], as_tuple=True)
        scores = heat[b, 0, ys, xs].float()
        order = torch.argsort(scores, descending=True)[:top_k]
        out.append(Detections(keypoints=torch.stack([xs, ys], 1)[order].float(),
                              keypoint_scores=scores[order]))
    return out


def pixels_to_grid(points, h, w, align_corners=False):
    """N x 2 pixel positions (x, y) -> N x 2 grid_sample coordinates in [-1, 1] for an H x W
    extent. align_corners=False: pixel x covers [x - 0.5, x + 0.5] (images, warps);
    align_corners=True: pixel 0 and pixel W - 1 are the extent's ends (descriptors, below)."""
    if align_corners:
        return torch.stack([points[:, 0] / (w - 1) * 2 - 1, points[:, 1] / (h - 1) * 2 - 1], -1)
    return torch.stack([(points[:, 0] + 0.5) / w * 2 - 1, (points[:, 1] + 0.5) / h * 2 - 1], -1)


def sample_descriptors(desc, points):
    """Bilinear descriptors at keypoints, re-normalised, as SuperRetina's sample_keypoint_desc:
    a keypoint at image pixel x reads the 1/8 map at x / (8 w - 1) of its width with
    align_corners=True (at 768 px and a 96-cell map, pixel 0 -> cell 0, pixel 767 -> cell 95).

    desc: B x D x h x w (1/8 of the image); points: list of N_b x 2 (x, y) image px
    -> list of N_b x D unit vectors."""
    h8, w8 = desc.shape[-2:]
    out = []
    for b, p in enumerate(points):
        if len(p) == 0:
            out.append(desc.new_zeros(0, desc.shape[1]))
            continue
        grid = pixels_to_grid(p, 8 * h8, 8 * w8, align_corners=True)                 # N x 2
        d = F.grid_sample(desc[b:b + 1].float(), grid.view(1, 1, -1, 2), mode="bilinear",
                          align_corners=True)                                       # 1 x D x 1 x N
        out.append(F.normalize(d[0, :, 0].t(), dim=1))
    return out


@dataclass
class Features:
    """One image's keypoints and descriptors, as matching takes them (numpy)."""
    keypoints: np.ndarray           # N x 2 (x, y), model px of the size x size input
    descriptors: np.ndarray         # N x D: the networks' 256-d unit vectors, or SIFT's 128-d


class Sift:
    """SIFT baseline behind the same interface as the networks, so that it goes through the
    same matching, homography and scoring code."""
    arch = name = "sift"

    def features(self, images, cfg) -> list:
        """size x size float images in [0, 1] -> one Features each (at most cfg.max_keypoints)."""
        sift = cv2.SIFT_create(nfeatures=cfg.max_keypoints)
        out = []
        for image in images:
            kps, desc = sift.detectAndCompute((image * 255).astype(np.uint8), None)
            pts = np.array([k.pt for k in kps], np.float32).reshape(-1, 2)
            out.append(Features(pts, desc if desc is not None else np.zeros((0, 128), np.float32)))
        return out


def autocast(device, precision):
    """torch.autocast for --precision: bf16 or fp16 compute in convolutions and matrix products,
    fp32 elsewhere (sigmoid, normalisation and losses are fp32 by construction)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


@torch.no_grad()
def extract_features(model, images, cfg) -> list:
    """Preprocessed size x size images (float32 in [0, 1]) -> one Features each, all images in
    one batch: keypoints by detect_keypoints with the test-time settings, descriptors by
    sample_descriptors."""
    if isinstance(model, Sift):
        return model.features(images, cfg)
    device = next(model.parameters()).device
    batch = torch.from_numpy(np.stack(images))[:, None].to(device)           # B x 1 x S x S
    with autocast(device, cfg.precision):
        heat, desc = model(batch.contiguous(memory_format=torch.channels_last))
    detections = detect_keypoints(heat, cfg.nms_radius, cfg.nms_threshold, cfg.border,
                                  cfg.max_keypoints)
    points = [d.keypoints for d in detections]                               # B x (N x 2)
    descriptors = sample_descriptors(desc, points)                           # B x (N x 256)
    return [Features(p.cpu().numpy(), d.cpu().numpy()) for p, d in zip(points, descriptors)]


def match_descriptors(dq, dr, ratio):
    """kNN (k=2) brute-force matching with Lowe's ratio test: dq N_q x D, dr N_r x D
    -> M x 2 index pairs (query row, reference row)."""
    if len(dq) < 2 or len(dr) < 2:
        return np.zeros((0, 2), int)
    knn = cv2.BFMatcher(cv2.NORM_L2).knnMatch(dq.astype(np.float32), dr.astype(np.float32), k=2)
    pairs = [(m.queryIdx, m.trainIdx) for m, n in (k for k in knn if len(k) == 2)
             if m.distance < ratio * n.distance]
    return np.array(pairs, int).reshape(-1, 2)


@dataclass
class Stage:
    """One matching stage: its homography and the matches it was fitted to (in register,
    original px)."""
    H: np.ndarray | None            # 3x3, query px -> reference px; None: < 4 matches or no fit
    query_points: np.ndarray        # M x 2 matched points in the query's frame
    refer_points: np.ndarray        # M x 2 their partners in the reference's frame
    inliers: np.ndarray             # M bools


def estimate_homography(pq, pr, cfg, px_scale=1.0) -> Stage:
    """Robust homography from matched points pq -> pr (M x 2 each; cfg.method, threshold
    cfg.ransac_px x px_scale) -> the Stage: H or None, and the M inlier flags."""
    failed = Stage(None, pq, pr, np.zeros(len(pq), bool))
    if len(pq) < 4:
        return failed
    method = cv2.LMEDS if cfg.method == "lmeds" else cv2.RANSAC
    H, mask = cv2.findHomography(pq.astype(np.float64), pr.astype(np.float64), method,
                                 cfg.ransac_px * px_scale)
    if H is None or mask is None or not mask.any() or not np.isfinite(H).all():
        return failed
    return Stage(H, pq, pr, mask.ravel().astype(bool))


@dataclass
class Registration:
    """Both stages of a registration and the features they matched; eval and match each apply
    their own rule to it."""
    first: Stage
    second: Stage | None            # the matching trick's stage, H composed to query -> reference;
                                    # None when the trick is off or the first stage failed
    query_features: Features        # the query's (model px), as matched in the first stage
    refer_features: Features        # the reference's, matched in both stages
    query_shape: tuple = (0, 0)     # the query photograph's (H, W)

    def implausibility(self, stage) -> str:
        return implausibility(stage.H, int(stage.inliers.sum()), self.query_shape)

    @property
    def protocol(self) -> Stage:
        """test_on_FIRE.py's rule: the last stage that ran -- with the trick, a pair whose
        second stage finds no homography is failed, even though the first stage had one."""
        return self.first if self.second is None else self.second

    @property
    def protocol_H(self):
        return self.protocol.H

    @property
    def final(self) -> Stage:
        """match's rule: the second stage where it passes the plausibility bar, else the first
        (which match then reports as failed unless it passes the bar itself)."""
        second = self.second
        if second is not None and second.H is not None and not self.implausibility(second):
            return second
        return self.first


@dataclass
class PreparedImage:
    """An image as the network sees it, with its features: what register's cache keeps."""
    image: np.ndarray               # size x size float32 in [0, 1] (preprocess)
    features: Features


def register(model, query, refer, cfg, cache=None, keys=None) -> Registration:
    """Register a query photograph (H x W x 3) onto a reference: the one pipeline for eval,
    match and validation. With cfg.trick, SuperRetina's second stage follows: warp the query by
    the first homography, match again against the reference's features (kept, not recomputed),
    and compose the two homographies. Without a `cache`, both images' features come from one
    batch; with a `cache` dict, each image's PreparedImage is kept under its key in `keys`
    (query key, reference key) and reused, computed on its own."""
    S = cfg.size
    if cache is None:
        q, r = preprocess(query, S), preprocess(refer, S)
        fq, fr = extract_features(model, [q, r], cfg)
    else:
        for image, key in zip((query, refer), keys):
            if key not in cache:
                pre = preprocess(image, S)
                cache[key] = PreparedImage(pre, extract_features(model, [pre], cfg)[0])
        q, fq, fr = cache[keys[0]].image, cache[keys[0]].features, cache[keys[1]].features
    to_q, to_r = model_to_original(query.shape, S), model_to_original(refer.shape, S)
    scale = max(refer.shape[:2]) / S                             # original px per model px
    kr = keypoints_to_original(fr.keypoints, refer.shape, S)     # N_r x 2, reference px
    ratio = cfg.sift_ratio if isinstance(model, Sift) else cfg.ratio
    m = match_descriptors(fq.descriptors, fr.descriptors, ratio)
    pq = keypoints_to_original(fq.keypoints[m[:, 0]], query.shape, S)
    first = estimate_homography(pq, kr[m[:, 1]], cfg, scale)
    second = None
    if cfg.trick and first.H is not None:
        H_model = np.linalg.inv(to_r) @ first.H @ to_q                  # model px -> model px
        warped = cv2.warpPerspective(q, H_model, (S, S), flags=cv2.INTER_LINEAR)
        # a degenerate first fit sends part of the square to infinity, where a float warp
        # gives NaN or inf; those pixels are outside the photograph, black like the border
        # (SuperRetina warps uint8 images, which cannot hold them)
        warped = np.nan_to_num(warped, nan=0.0, posinf=0.0, neginf=0.0)
        fw, = extract_features(model, [warped], cfg)
        m2 = match_descriptors(fw.descriptors, fr.descriptors, ratio)
        pw = keypoints_to_original(fw.keypoints[m2[:, 0]], refer.shape, S)  # refer's frame
        fit = estimate_homography(pw, kr[m2[:, 1]], cfg, scale)
        # second-stage matches are drawn at their places in the query
        second = Stage(None if fit.H is None else fit.H @ first.H,
                       apply_homography(np.linalg.inv(first.H), pw), fit.refer_points,
                       fit.inliers)
    return Registration(first, second, fq, fr, query.shape[:2])


# =============================================================================================
# 5. FIRE evaluation
# =============================================================================================
# FIRE (Hernandez-Matas et al. 2017): 133 pairs (P37 excluded) in categories S, P and A, scored
# as SuperRetina and RKD report it: per category the AUC of the pairs' mean control-point error
# over thresholds 1..25 px; mAUC, the mean of the three.

@dataclass
class FirePair:
    """One FIRE pair: two photographs of an eye and ten control points marked on both."""
    name: str                      # e.g. S01
    category: str                  # S, P or A
    query: Path                    # XNN_2.jpg
    refer: Path                    # XNN_1.jpg
    points: np.ndarray             # 10 x 4: x_ref y_ref x_query y_query, original pixels


def read_control_points(path) -> np.ndarray:
    """A control_points_XNN_1_2.txt file -> K x 4 rows (x_ref y_ref x_query y_query)."""
    rows = []
    for i, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            values = [float(v) for v in fields]
        except ValueError:
            raise UserError(f"{path}:{i}: control point row holds a non-number: "
                            f"{line.strip()!r}") from None
        if len(values) != 4:
            raise UserError(f"{path}:{i}: expected 4 columns (x_ref y_ref x_query y_query), "
                            f"found {len(values)}")
        rows.append(values)
    if not rows:
        raise UserError(f"{path}: no control points")
    return np.array(rows, np.float64)


@dataclass
class FireBenchmark:
    """A folder in FIRE's layout, as read_fire finds it."""
    pairs: list                    # FirePair, sorted by name
    note: str                      # what it is: full FIRE, a subset of it, or synthetic


def read_fire(root) -> FireBenchmark:
    """FIRE's own layout -> its pairs and a note on what it is. P37 is excluded; a full FIRE
    must hold 71/48/14 pairs in categories S/P/A."""
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
        raise UserError(f"{root}: {counts} pairs per category, more than FIRE's "
                        f"{FIRE_FULL_COUNTS}")
    return FireBenchmark(pairs, note)


def pair_errors(H, points) -> np.ndarray:
    """Distances (original px) between reference control points and the query's mapped by H
    (3 x 3 or None): points K x 4 -> K errors (inf where H is None)."""
    if H is None:
        return np.full(len(points), np.inf)
    return np.linalg.norm(apply_homography(H, points[:, 2:4]) - points[:, 0:2], axis=1)


def pair_status(errors) -> str:
    """K control-point errors (original px; inf where there is no homography) -> failed |
    inaccurate | acceptable, test_on_FIRE.py's rule: inaccurate when the largest error exceeds
    50 px or the median exceeds 20 px."""
    if not np.isfinite(errors).all():
        return "failed"
    if errors.max() > INACCURATE_MAX or np.median(errors) > INACCURATE_MEDIAN:
        return "inaccurate"
    return "acceptable"


def fire_auc(mean_errors) -> float:
    """N per-pair mean control-point errors (original px; inf for a failed pair) -> the AUC of
    one category as test_on_FIRE.py's compute_auc: the mean over thresholds t = 1..25 px of
    the fraction of pairs whose mean error is below t."""
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
    """Register every FIRE pair -> per-pair rows (errors in original px, status by the
    protocol, both stages' inlier counts, match's plausibility verdict, the homography).
    Without a terminal, a progress line goes to stderr every 5 pairs or 30 s."""
    rows, started, said = [], time.perf_counter(), time.perf_counter()
    name = getattr(model, "name", model.arch)
    plain = not quiet and not sys.stderr.isatty()
    for k, pair in enumerate(progress(pairs, f"eval {name}", quiet), 1):
        query, refer = read_image(pair.query), read_image(pair.refer)
        start = time.perf_counter()
        reg = register(model, query, refer, cfg)
        seconds = time.perf_counter() - start
        H = reg.protocol_H
        errors = pair_errors(H, pair.points)
        second = reg.second
        rows.append({"name": pair.name, "category": pair.category,
                     "mean_error": float(errors.mean()), "max_error": float(errors.max()),
                     "median_error": float(np.median(errors)),
                     "inliers": int(reg.protocol.inliers.sum()), "status": pair_status(errors),
                     "seconds": seconds,
                     "first_stage_inliers": int(reg.first.inliers.sum()),
                     "second_stage_inliers": None if second is None else int(second.inliers.sum()),
                     "implausible": reg.implausibility(second or reg.first),
                     "homography": None if H is None else (H / H[2, 2]).tolist()})
        if on_pair:
            on_pair(pair, query, refer, reg)
        now = time.perf_counter()
        if plain and k < len(pairs) and (k % 5 == 0 or now - said > 30):
            said, spent = now, now - started
            print(f"eval {name}: {k}/{len(pairs)} pairs, {spent / 60:.1f} min, about "
                  f"{spent / k * (len(pairs) - k) / 60:.1f} min left", file=sys.stderr, flush=True)
    return rows


def validation_mauc(model, fire_dir, cfg):
    """Score a model during training with the eval code (section 7 keeps the best epoch)."""
    pairs = read_fire(fire_dir).pairs
    was_training = model.training
    model.eval()
    result = summarise(evaluate(model, pairs, cfg, quiet=True))["mAUC"]
    model.train(was_training)
    return result


# =============================================================================================
# 6. Losses and PKE
# =============================================================================================
# SuperRetina's semi-supervised training: warps and photometric changes, the Dice detector loss,
# progressive keypoint expansion (PKE), the triplet descriptor loss; RKD's augmentation and its
# knowledge terms.

def random_affine(n, size, spec, gen) -> torch.Tensor:
    """n random warps as SuperRetina's affine_images draws them -> n x 3 x 3 pixel-space maps
    (image px -> warped px) for a size x size image.

    spec = (degrees, translation, scale low, scale high). As there: angle a ~ U(-deg, deg),
    shifts t ~ round(U(-translation * size, +translation * size)) px, scale s ~ U(low, high), and
    theta = [[cos a / s, -sin a, -tx / size], [sin a, cos a / s, -ty / size]] maps warped to
    original coordinates in grid_sample's normalised frame (align_corners=True). The scale
    divides only the diagonal, so a rotated copy is slightly sheared too, as there."""
    deg, trans, lo, hi = spec
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(deg)                # n
    t = torch.round((torch.rand(n, 2, generator=gen) * 2 - 1) * trans * size) / size   # n x 2
    s = lo + torch.rand(n, generator=gen) * (hi - lo)                                  # n
    theta = torch.zeros(n, 3, 3)                     # warped -> original, normalised frame
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle) / s, -torch.sin(angle)
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle), torch.cos(angle) / s
    theta[:, 0, 2], theta[:, 1, 2], theta[:, 2, 2] = -t[:, 0], -t[:, 1], 1
    # pixel index -> normalised frame, pixels_to_grid(align_corners=True) as a 3 x 3 matrix:
    # pixel 0 -> -1, pixel size - 1 -> +1
    k = 2 / (size - 1)
    to_normalised = torch.tensor([[k, 0, -1.0], [0, k, -1.0], [0, 0, 1.0]])
    warped_to_image = torch.linalg.inv(to_normalised) @ theta @ to_normalised
    return torch.linalg.inv(warped_to_image)


def warp(images, A):
    """Warp B x C x H x W by pixel-space maps A (B x 3 x 3, source px -> target px) with
    F.grid_sample; pixels from outside the source are 0. -> B x C x H x W."""
    b, _, h, w = images.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=images.device),
                            torch.arange(w, dtype=torch.float32, device=images.device),
                            indexing="ij")                                           # H x W each
    target = torch.stack([xs, ys, torch.ones_like(xs)], -1).view(1, -1, 3)           # 1 x HW x 3
    source = target @ torch.linalg.inv(A.to(images.device)).transpose(1, 2)          # B x HW x 3
    grid = pixels_to_grid((source[..., :2] / source[..., 2:]).reshape(-1, 2), h, w)  # BHW x 2
    return F.grid_sample(images, grid.view(b, h, w, 2), mode="bilinear", padding_mode="zeros",
                         align_corners=False)


def transform_points(A, points):
    """Apply a 3x3 map A to N x 2 points (torch) -> N x 2."""
    p = torch.cat([points, torch.ones_like(points[:, :1])], 1) @ A.to(points).T        # N x 3
    return p[:, :2] / p[:, 2:]


def strictly_inside(points, h, w):
    """SuperRetina keeps a warped point when its normalised position is strictly inside (-1, 1):
    N x 2 (x, y) px of an H x W image -> N bools."""
    x, y = points[:, 0], points[:, 1]
    return (x > 0) & (x < w - 1) & (y > 0) & (y < h - 1)


def uniform(gen, lo, hi, n=1):
    """n draws of U(lo, hi) from the generator `gen` -> n (float32)."""
    return lo + torch.rand(n, generator=gen) * (hi - lo)


def scale_intensity(x, factor, centre=0.0):
    """Brightness and contrast changes, one formula: (x - centre) * factor + centre. About 0 it
    is a gain (a brightness change; also imgaug's LinearContrast on a float image, which
    centres at 0); about the image's mean grey it is torchvision's contrast change.
    x: B x C x H x W; factor, centre: numbers or B x 1 x 1 x 1 tensors -> B x C x H x W."""
    return (x - centre) * factor + centre


def color_jitter(x, cfg, gen):
    """The descriptor copy's photometric change, as affine_images(used_for='descriptor'): with
    probability jitter_probability, one draw for the whole batch, torchvision's ColorJitter
    brightness and contrast in random order (its saturation and hue leave grey unchanged).
    x: B x 1 x H x W in [0, 1] -> same, clipped to [0, 1]."""
    if torch.rand(1, generator=gen).item() >= cfg.jitter_probability:
        return x
    fb = uniform(gen, 1 - cfg.jitter_brightness, 1 + cfg.jitter_brightness).item()
    fc = uniform(gen, 1 - cfg.jitter_contrast, 1 + cfg.jitter_contrast).item()

    def brightness(v):
        return scale_intensity(v, fb).clamp(0, 1)

    def contrast(v):                                     # about the image's mean grey
        return scale_intensity(v, fc, v.mean((1, 2, 3), keepdim=True)).clamp(0, 1)
    brightness_first = torch.rand(1, generator=gen).item() < 0.5
    for op in (brightness, contrast) if brightness_first else (contrast, brightness):
        x = op(x)
    return x


def gaussian_blur(x, sigma):
    """1 x C x H x W blurred by a Gaussian of `sigma` px, kernel sized approximately as imgaug's
    GaussianBlur does (side max(3.3 sigma, 5) below sigma 3, then 2.9 / 2.6 sigma; the exact
    switch points are ours, README "Deviations"), mirrored border. -> 1 x C x H x W."""
    if sigma <= 1e-3:
        return x
    side = max(3.3 * sigma, 5) if sigma < 3 else 2.9 * sigma if sigma < 5 else 2.6 * sigma
    radius = min(int(side) // 2, min(x.shape[-2:]) - 1)
    if radius < 1:
        return x
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
    k = torch.exp(-offsets ** 2 / (2 * sigma ** 2))                            # 2 radius + 1
    k = (k / k.sum()).to(x.dtype)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1))


def rkd_augment(x, blur_scale, gen):
    """RKD's training augmentation (its dataset/retina_dataset.py, imgaug, in random order, on
    the float image): brightness x U(1.0, 1.2); with p 0.2 a Gaussian blur of sigma U(0, 6) px of
    the original photograph; with p 0.2 contrast x U(0.75, 1.2) (imgaug's LinearContrast on a
    float image centres at 0, so it is a plain gain). Each image draws its own values, and, as
    there, nothing is clipped: values may pass 1. blur_scale: B model px per original px.
    SuperRetina's code has the same lines commented out. x: B x 1 x H x W -> same."""
    b = len(x)

    def chosen(p):                                       # B bools, each True with probability p
        return (torch.rand(b, generator=gen) < p).tolist()

    def multiply(v):
        return scale_intensity(v, uniform(gen, 1.0, 1.2, b).view(b, 1, 1, 1).to(v))

    def blur(v):
        sigmas = uniform(gen, 0, 6, b) * torch.as_tensor(blur_scale, dtype=torch.float32)
        return torch.cat([gaussian_blur(v[i:i + 1], sigmas[i].item()) if on else v[i:i + 1]
                          for i, on in enumerate(chosen(0.2))])

    def contrast(v):
        on = torch.tensor(chosen(0.2)).view(b, 1, 1, 1).to(v.device)
        factors = uniform(gen, 0.75, 1.2, b).view(b, 1, 1, 1).to(v)
        return torch.where(on, scale_intensity(v, factors), v)
    for k in torch.randperm(3, generator=gen).tolist():
        x = (multiply, blur, contrast)[k](x)
    return x


def gaussian_label_kernel(size, nsig):
    """SuperRetina's get_gaussian_kernel(size, nsig) as a 1 x 1 x size x size conv weight.

    The 1-D kernel is the standard normal's mass in `size` equal bins spanning +/- (nsig + half
    a bin); the 2-D kernel is the square root of its outer product, min-max scaled to peak 1 and
    corners 0. For (13, 2) a bin is 0.337 standard deviations (1-D spread 2.97 px) and the square
    root widens the 2-D blob to about 4.2 px -- not the sigma of 2 the argument's name suggests."""
    interval = (2 * nsig + 1) / size
    edges = np.linspace(-nsig - interval / 2, nsig + interval / 2, size + 1)
    mass = np.diff([0.5 * (1 + math.erf(e / math.sqrt(2))) for e in edges])
    k = np.sqrt(np.outer(mass, mass))
    k = k / k.sum()
    k = (k - k.min()) / (k.max() - k.min())
    return torch.from_numpy(k).float()[None, None]


def label_pixels(points, h, w):
    """K x 2 (x, y) label points -> the pixels (rounded, long) of those inside an H x W map,
    M x 2 with M <= K."""
    xy = points.round().long()
    return xy[(xy[:, 0] >= 0) & (xy[:, 0] < w) & (xy[:, 1] >= 0) & (xy[:, 1] < h)]


def gaussian_targets(points, shape, cfg, device="cpu"):
    """Point labels -> detector targets as SuperRetina builds them: 1 at each point (rounded to
    its pixel), convolved with gaussian_label_kernel, overlapping blobs clipped at 1.
    points: list of B (K_b x 2 px, or None); shape (B, 1, H, W) -> B x 1 x H x W."""
    b, _, h, w = shape
    impulses = torch.zeros(shape, device=device)
    for i, p in enumerate(points):
        if p is not None and len(p):
            xy = label_pixels(p, h, w).to(device)
            impulses[i, 0, xy[:, 1], xy[:, 0]] = 1.0
    kernel = gaussian_label_kernel(cfg.blur_size, cfg.blur_nsig).to(device)
    return F.conv2d(impulses, kernel, padding=cfg.blur_size // 2).clamp(max=1.0)


def dice_loss(pred, target, eps=1e-3):
    """1 - Dice with squared denominators (Milletari et al.), one ratio over the whole batch as
    SuperRetina's DiceLoss flattens it. pred, target: B x 1 x H x W -> a scalar."""
    inter = (pred * target).sum()
    return 1 - (2 * inter + eps) / ((pred ** 2).sum() + (target ** 2).sum() + eps)


def triplet_loss(anchor, positive, groups, cfg, gen):
    """SuperRetina's descriptor loss (triplet_margin_loss_gor) over N places -> a scalar.

    anchor, positive: N x D unit descriptors of the same N places (an image and its warped copy;
    or teacher and student); groups: N image indices -- an anchor's negatives are positives of
    other places of its own image: the hardest (nearest) and one drawn at random (itself when the
    image has one place). With d = 1 - cosine:
        mean(relu(margin + d(a, p) - (d(a, n_hard) + d(a, n_random)) / 2))
        + mean((a . n_hard)^2) + mean((a . n_random)^2)        (GOR, Zhang et al. 2017)."""
    n = len(anchor)
    if n == 0:
        return anchor.sum() * 0
    rows = torch.arange(n, device=anchor.device)
    with torch.no_grad():
        dist = torch.cdist(anchor, positive, compute_mode="donot_use_mm_for_euclid_dist")  # N x N
        other = groups[:, None] != groups[None, :]
        other = other | torch.eye(n, dtype=torch.bool, device=anchor.device)
        dist = dist.masked_fill(other, float("inf"))
        hard = torch.where(torch.isinf(dist.min(1).values), rows, dist.argmin(1))        # N
        # random: another place of the same image, uniformly (groups are contiguous runs)
        _, counts = torch.unique_consecutive(groups, return_counts=True)
        size = torch.repeat_interleave(counts, counts)
        start = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        step = (torch.rand(n, generator=gen).to(anchor.device) * (size - 1)).long()
        rand = start + (rows - start + 1 + step) % size                                  # N
    cos_p = (anchor * positive).sum(1)
    cos_h, cos_r = (anchor * positive[hard]).sum(1), (anchor * positive[rand]).sum(1)
    hinge = F.relu(cfg.margin + (1 - cos_p) - ((1 - cos_h) + (1 - cos_r)) / 2).mean()
    return hinge + (cos_h ** 2).mean() + (cos_r ** 2).mean()


def update_value_map(value_map, points, cfg):
    """SuperRetina's record_module.update_value_map on one image's value map (H x W uint8 numpy,
    changed in place) for points (K x 2 int px) that passed PKE's filters this time:
      a point where a value is recorded, or with nothing recorded in its neighbourhood (a square
      of value_area / 2 px), gains value_increase_point; otherwise the recorded values of its
      neighbourhood gain value_increase_area (the point drifted by a pixel or two);
      every recorded value that gained nothing loses value_decay.
    Values saturate at 255 (SuperRetina's uint8 would wrap around)."""
    v = value_map.astype(np.int32)
    h, w = v.shape
    half = cfg.value_area // 4
    for x, y in points:
        window = v[max(y - half, 0):min(y + half, h), max(x - half, 0):min(x + half, w)]
        if v[y, x] != 0 or window.sum() == 0:
            v[y, x] += cfg.value_increase_point
        else:
            window[window > 0] += cfg.value_increase_area
    unchanged = (v == value_map) & (value_map != 0)
    v[unchanged] -= cfg.value_decay
    value_map[...] = np.clip(v, 0, 255)


def learned_points(value_map, cfg):
    """Points PKE has learned: peaks of the value map (H x W uint8; NMS radius 2 x value_area)
    that hold at least value_increase_point -> K x 2 px."""
    v = torch.from_numpy(value_map).float()[None, None]                          # 1 x 1 x H x W
    return detect_keypoints(v, 2 * cfg.value_area, cfg.value_increase_point - 0.5)[0].keypoints


def merge_labels(learned, labels, hw, cfg):
    """Labels plus learned points, merged as SuperRetina's pke_module does: learned points drawn
    at learned_label, labels at 1, then NMS -- a learned point near a label gives way to it; if
    the merge lost a label pixel (two labels within the NMS radius), the labels alone. Its NMS
    also drops an 8 px border, which on a crop would lose many labels and so nearly always
    fall back; here no border is dropped (README "Deviations").
    learned: L x 2, labels: K x 2 px of an hw = (H, W) image -> M x 2 px."""
    h, w = hw
    canvas = torch.zeros(1, 1, h, w)
    for pts, value in ((learned, cfg.learned_label), (labels, 1.0)):
        xy = label_pixels(pts, h, w)
        canvas[0, 0, xy[:, 1], xy[:, 0]] = value
    merged = detect_keypoints(canvas, cfg.train_nms_radius, cfg.train_nms_threshold)[0].keypoints
    return merged if len(merged) >= int((canvas == 1.0).sum()) else labels


def progressive_keypoint_expansion(heat, heat_aug, desc, desc_aug, A, labels, value_map, cfg):
    """SuperRetina's PKE on one labelled image (its pke_module.pke_learn): which predicted
    keypoints join the labels?

    heat: H x W prediction on the image; heat_aug: H x W prediction on its detector warp A
    (3 x 3, image px -> warped px); desc, desc_aug: their D x H/8 x W/8 descriptors (all without
    gradient); labels: K x 2 initial keypoints (px); value_map: H x W uint8 numpy, in place.
      1. candidates: NMS peaks of heat (train_nms_radius, train_nms_threshold, train_border)
      2. geometric filter: the warp's prediction, read at the warped place (truncated to its
         pixel), reaches geometric_threshold; at most max_geometric survivors
      3. content filter: among the survivors' warped descriptors, the nearest to a candidate's
         own is its warped self, and nearer than content_ratio x the second nearest
      4. the content survivors update the value map; its peaks are the learned points
      5. targets: labels merged with the learned points (merge_labels)
    Returns a dict of point sets (N x 2 px): candidates, geometric, content, learned, targets."""
    h, w = heat.shape
    candidates = detect_keypoints(heat[None, None], cfg.train_nms_radius, cfg.train_nms_threshold,
                                  cfg.train_border)[0].keypoints                    # N x 2
    moved = transform_points(A, candidates)
    keep = strictly_inside(moved, h, w)
    at = moved[keep].long()
    keep[keep.clone()] = heat_aug[at[:, 1], at[:, 0]] >= cfg.geometric_threshold
    geometric, moved = candidates[keep][:cfg.max_geometric], moved[keep][:cfg.max_geometric]
    content = geometric[:0]
    if len(geometric) > 1:
        d = sample_descriptors(desc[None], [geometric])[0]                           # G x D
        d_aug = sample_descriptors(desc_aug[None], [moved])[0]                       # G x D
        distances = torch.cdist(d, d_aug, compute_mode="donot_use_mm_for_euclid_dist")
        near = distances.topk(2, largest=False)                                      # G x 2
        own = near.indices[:, 0] == torch.arange(len(geometric), device=d.device)
        content = geometric[own & (near.values[:, 0] < cfg.content_ratio * near.values[:, 1])]
    update_value_map(value_map, content.long().cpu().numpy(), cfg)
    learned = learned_points(value_map, cfg)
    targets = merge_labels(learned, labels.cpu(), (h, w), cfg)
    return {"candidates": candidates, "geometric": geometric, "content": content,
            "learned": learned, "targets": targets}


def keypoints_with_labels(heat, labels, cfg):
    """Descriptor-loss keypoints as SuperRetina picks them: NMS peaks of `heat` (B x 1 x H x W,
    no gradient) with every label pixel raised to 10 so that labels are always among them.
    labels: B (K_b x 2 px, or None) -> B (N_b x 2 px)."""
    heat = heat.detach().float().clone()
    h, w = heat.shape[-2:]
    for i, lab in enumerate(labels):
        if lab is not None and len(lab):
            xy = label_pixels(lab, h, w).to(heat.device)
            heat[i, 0, xy[:, 1], xy[:, 0]] = 10.0
    detections = detect_keypoints(heat, cfg.train_nms_radius, cfg.train_nms_threshold,
                                  cfg.train_border)
    return [d.keypoints for d in detections]


def pooled_triplet_loss(anchor_desc, positive_desc, anchor_points, positive_points, cfg, gen):
    """triplet_loss over a batch: descriptors of B x D x H/8 x W/8 maps sampled at lists of
    K_b x 2 places (px). As SuperRetina, an image with more than max_descriptor_points places
    turns the loss off for the whole batch. -> a scalar."""
    if any(len(p) > cfg.max_descriptor_points for p in anchor_points):
        return anchor_desc.sum() * 0
    anchors = sample_descriptors(anchor_desc, anchor_points)
    positives = sample_descriptors(positive_desc, positive_points)
    device = anchor_desc.device
    groups = torch.cat([torch.full((len(p),), i, device=device)
                        for i, p in enumerate(anchor_points)])                       # sum K_b
    return triplet_loss(torch.cat(anchors), torch.cat(positives), groups, cfg, gen)


@dataclass
class SuperRetinaOutputs:
    """What superretina_losses computes on a batch of B images of C x C px."""
    losses: dict                    # {"detector", "descriptor"}: scalars with gradient
    heat: torch.Tensor              # B x 1 x C x C, the batch's heatmaps (with gradient)
    descriptors: torch.Tensor       # B x 256 x C/8 x C/8, its descriptor maps
    pke: dict                       # labelled image's index in the batch -> PKE's point sets
                                    # (progressive_keypoint_expansion); {} before PKE starts


def superretina_losses(model, unwrapped, x, labels, value_maps, pke, cfg, gen):
    """SuperRetina's training objective (its super_retina.py forward) on a batch.

    x: B x 1 x C x C in [0, 1]; labels: per image K x 2 keypoints (px) or None (unlabelled);
    value_maps: per labelled image its C x C uint8 value map (numpy view, updated in place).
      detector (labelled images only): Dice against the labels' Gaussian targets; with PKE,
        Dice against the targets PKE grows plus Dice against the prediction on a detector warp
        mapped back (the consistency term; on crops only where the warp overlaps the crop),
        each one ratio over the labelled images;
      descriptor (every image): triplet loss between the image and its descriptor warp at
        keypoints (labels, plus the predicted peaks once PKE runs).
    model may be DDP-wrapped; unwrapped is the same network without it (the no-gradient pass).
    -> SuperRetinaOutputs."""
    b, _, c, _ = x.shape
    device = x.device
    A_desc = random_affine(b, c, cfg.descriptor_affine, gen).to(device)          # B x 3 x 3
    x_desc = color_jitter(warp(x, A_desc), cfg, gen)                             # B x 1 x C x C
    with autocast(device, cfg.precision):                  # one forward: DDP sees one graph
        both = torch.cat([x, x_desc]).contiguous(memory_format=torch.channels_last)
        heat_all, desc_all = model(both)            # 2B x 1 x C x C, 2B x 256 x C/8 x C/8
    heat, desc, desc_warped = heat_all[:b], desc_all[:b], desc_all[b:]
    labelled = [i for i in range(b) if labels[i] is not None]
    targets, found = {i: labels[i] for i in labelled}, {}
    detector = heat.sum() * 0
    if labelled:
        if pke:
            # the detector warp of the L labelled images, and the prediction on it
            A_det = random_affine(len(labelled), c, cfg.detector_affine, gen).to(device)
            with torch.no_grad(), autocast(device, cfg.precision):
                x_det = warp(x[labelled], A_det).contiguous(memory_format=torch.channels_last)
                heat_aug, desc_aug = unwrapped(x_det)       # L x 1 x C x C, L x 256 x C/8 x C/8
            for k, i in enumerate(labelled):
                found[i] = progressive_keypoint_expansion(
                    heat[i, 0].detach(), heat_aug[k, 0], desc[i].detach(), desc_aug[k], A_det[k],
                    labels[i], value_maps[i], cfg)
                targets[i] = found[i]["targets"]
        t = gaussian_targets([targets[i] for i in labelled], (len(labelled), 1, c, c), cfg, device)
        detector = dice_loss(heat[labelled], t)
        if pke:
            # consistency with the warp's prediction mapped back, where the warp saw the image:
            # outside the overlap the mapped-back map is 0 -- on SuperRetina's whole images mostly
            # black background, on a crop vessels, which the unmasked term would push to zero
            back = warp(heat_aug, torch.linalg.inv(A_det))
            seen = (warp(torch.ones_like(heat_aug), torch.linalg.inv(A_det)) > 0.99
                    if cfg.crop else 1.0)
            detector = detector + dice_loss(heat[labelled] * seen, back * seen)
    points = keypoints_with_labels(heat if pke else torch.zeros_like(heat), labels, cfg)
    moved = [transform_points(A_desc[i], p) for i, p in enumerate(points)]
    keep = [strictly_inside(m, c, c) for m in moved]
    descriptor = pooled_triplet_loss(desc, desc_warped, [p[k] for p, k in zip(points, keep)],
                                     [m[k] for m, k in zip(moved, keep)], cfg, gen)
    return SuperRetinaOutputs({"detector": detector, "descriptor": descriptor}, heat, desc, found)


def distillation_losses(student_heat, student_desc, teacher, x, labels, kd, cfg, gen):
    """RKD's knowledge terms (its train_util.py, logged as Knowledge_Loss_detect and
    Knowledge_Loss_descript), each with weight 1 beside the student's own SuperRetina losses.

    kd_detector: Dice between the frozen teacher's heatmap and the student's;
    kd_descriptor: triplet_loss whose anchors are the teacher's descriptors and whose positives
      are the student's at the same places -- the teacher's keypoints, labels forced in, no
      warp -- with negatives among the student's other places: the student is fitted in the
      teacher's descriptor space, not to its final decisions.
    student_heat B x 1 x H x W, student_desc B x 256 x H/8 x W/8 of the batch x (B x 1 x H x W)
    -> dict of the chosen terms ("kd_detector", "kd_descriptor"): scalars."""
    with torch.no_grad(), autocast(x.device, cfg.precision):
        t_heat, t_desc = teacher(x.contiguous(memory_format=torch.channels_last))
    out = {}
    if kd in ("detector", "both"):
        out["kd_detector"] = dice_loss(student_heat, t_heat)
    if kd in ("descriptor", "both"):
        points = keypoints_with_labels(t_heat, labels, cfg)
        out["kd_descriptor"] = pooled_triplet_loss(t_desc, student_desc, points, points, cfg, gen)
    return out


# =============================================================================================
# 7. Training loops
# =============================================================================================
# train-cnn (SuperRetina's training) and distill (RKD's reverse distillation), one process or
# DDP under torchrun: devices and precision, the PKE value maps across ranks, one training step,
# and the nanoGPT-style loop.

def pick_device(name):
    """--device auto | cpu | cuda -> torch.device (under torchrun, this process's GPU)."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available (use --device cpu or auto)")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def cpu_vendor() -> str:
    """The CPU's vendor string from /proc/cpuinfo (Linux), e.g. AuthenticAMD; "" elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def resolve_precision(name, device):
    """--precision -> fp32 | bf16 | fp16. fp16 needs CUDA (it trains with a gradient scaler).
    auto: bf16 where the hardware runs it natively fast, else fp32 -- CUDA with bf16 support; a
    CPU with AMX tiles; an AMD CPU with AVX-512 BF16 (Zen 4: `rkd.py bench`, 2 threads, measured
    channels_last + bf16 3.0x fp32 for the LK teacher's forward and 2.4x for its training step;
    on an AMX Xeon 3.7x and 2.7x). An Intel CPU with AVX-512 BF16 but no AMX stays fp32: on one
    (Xeon) bf16 convolutions ran slower than fp32 (0.89x forward). Ask for bf16 explicitly
    where bench says it pays."""
    if name == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 needs CUDA; on a CPU use fp32 or bf16")
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    amx = cpu_supports("_is_amx_tile_supported")
    avx512_bf16 = cpu_supports("_is_avx512_bf16_supported")
    return "bf16" if amx or (avx512_bf16 and cpu_vendor() == "AuthenticAMD") else "fp32"


def cpu_supports(probe) -> bool:
    """Ask torch.cpu's private capability probe of that name (e.g. _is_amx_tile_supported);
    False where this torch has no such probe."""
    ask = getattr(torch.cpu, probe, None)
    return bool(ask()) if ask is not None else False


def init_distributed(device):
    """torchrun sets WORLD_SIZE/RANK: NCCL on CUDA, gloo on CPU. -> (rank, world size).
    The collective timeout is raised to 6 hours: rank 0 validates and writes checkpoints while
    the others wait at the epoch's barrier, and a CPU validation can take far longer than the
    default 10-30 minutes."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                             timeout=datetime.timedelta(hours=6))
    return (torch.distributed.get_rank(), world) if world > 1 else (0, 1)


def sparse_value_maps(maps):
    """{image index: H x W uint8} -> {str index: (K x 2 int32 positions, K uint8 values)}."""
    out = {}
    for i, v in maps.items():
        ys, xs = np.nonzero(v)
        positions = torch.from_numpy(np.c_[ys, xs].astype(np.int32))          # K x 2 (y, x)
        out[str(i)] = (positions, torch.from_numpy(v[ys, xs].copy()))        # the file's layout
    return out


def dense_value_maps(saved, size):
    """sparse_value_maps' form -> {image index: size x size uint8}."""
    maps = {}
    for i, (idx, val) in saved.items():
        m = np.zeros((size, size), np.uint8)
        m[idx[:, 0].long().numpy(), idx[:, 1].long().numpy()] = val.to(torch.uint8).numpy()
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
    weights = b"".join(p.detach().cpu().numpy().tobytes() for p in model.parameters())
    digest = hashlib.sha256(weights).hexdigest()
    digests = [None] * world
    torch.distributed.all_gather_object(digests, digest)
    if len(set(digests)) != 1:
        raise RuntimeError(f"DDP ranks disagree on parameters: {digests}")
    return digests[0]


@dataclass
class Run:
    """What one training step needs besides the batch."""
    model: nn.Module                # the network, DDP-wrapped when distributed
    unwrapped: nn.Module            # the same network without the DDP wrapper
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler    # active for fp16 only
    cfg: Config
    teacher: nn.Module | None = None
    kd: str = "none"
    self_loss: bool = True
    augment: bool = False


def train_step(run, data, indices, value_maps, pke, gen):
    """One optimisation step on a batch of images -> dict of named losses (device tensors,
    detached) plus "heat_max"; PKE results are summarised as "pke_learned" (points PKE added to
    the batch's targets). Nothing is read back to the host here except what PKE itself needs.
    indices: the batch's images in `data` (a TrainingSet); value_maps: {image index: its
    size x size uint8 PKE value map}, updated in place."""
    cfg, device = run.cfg, next(run.unwrapped.parameters()).device
    batch = data.batch(indices, cfg.crop, gen)
    labels = batch.labels
    x = batch.images.to(device, non_blocking=True)                           # B x 1 x C x C
    if run.augment:
        x = rkd_augment(x, [data.blur_scale[i] for i in indices], gen)
    c = x.shape[-1]
    maps = {k: value_maps[i][y0:y0 + c, x0:x0 + c]      # crop windows of the value maps (views)
            for k, (i, (x0, y0)) in enumerate(zip(indices, batch.offsets)) if i in value_maps}
    losses, found = {}, {}
    if run.self_loss:
        outputs = superretina_losses(run.model, run.unwrapped, x, labels, maps, pke, cfg, gen)
        losses, heat, desc, found = outputs.losses, outputs.heat, outputs.descriptors, outputs.pke
    else:
        with autocast(device, cfg.precision):
            heat, desc = run.model(x.contiguous(memory_format=torch.channels_last))
    if run.teacher is not None:
        losses.update(distillation_losses(heat, desc, run.teacher, x, labels, run.kd, cfg, gen))
    loss = sum(losses.values())
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if cfg.grad_clip:
        run.scaler.unscale_(run.optimizer)
        nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    out = {k: v.detach() for k, v in losses.items()}
    out["heat_max"] = heat.detach().max()
    out["pke_learned"] = sum(len(f["targets"]) - len(labels[k]) for k, f in found.items())
    return out


def train(args, distill=False):
    """One loop for both commands, nanoGPT-style: set-up, then per epoch the steps and the
    epoch's end (log, validate, checkpoint). train-cnn: the SuperRetina objective. distill: a
    student against a frozen teacher, with the student's own SuperRetina losses (RKD)."""
    # ---- set-up ----------------------------------------------------------------------------
    cfg = dataclasses.replace(CFG, size=args.size, crop=args.crop, lr=args.lr, batch=args.batch,
                              epochs=args.epochs, seed=args.seed, pke_start=args.pke_start,
                              grad_clip=args.grad_clip)
    device = pick_device(args.device)
    cfg = dataclasses.replace(cfg, precision=resolve_precision(args.precision, device))
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
        if args.teacher == "sift":
            raise UserError("--teacher sift: the teacher must be a network (a checkpoint or "
                            f"a shipped name: {', '.join(SHIPPED)})")
        teacher = load_model(args.teacher, device)
        for p in teacher.parameters():
            p.requires_grad_(False)
    data = TrainingSet(collect_samples(args, cfg), cfg.size, quiet)
    value_maps = {i: np.zeros((cfg.size, cfg.size), np.uint8)       # PKE's, labelled images only
                  for i, lab in enumerate(data.labels) if lab is not None}
    start, best = 0, -1.0
    if args.init:
        init = resolve_weights(args.init)
        load_weights(model, load_checkpoint(init), init)
    if args.detector_only:
        # Our budget lever, in neither paper: only the detector's own layers learn. The encoder
        # (for the student: its conv stem and ViT) and the descriptor head keep their loaded
        # weights, so the descriptors stay bit-identical and no backward pass runs through the
        # ViT (a stand-in 768 px step of the student: 2.4x less time on a CPU; README, "Training").
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(DETECTOR_LAYERS))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    if args.resume:
        ckpt = load_checkpoint(args.resume)
        if PER_CHANNEL_LK_KEY in ckpt["model"]:   # its Adam state is per-channel: give --init
            raise UserError(f"{args.resume}: an LK checkpoint from before rkd commit bebcb97 "
                            "cannot be resumed; start from its weights with --init")
        load_weights(model, ckpt, args.resume)
        if "optimizer" not in ckpt:
            raise UserError(f"{args.resume}: a weights-only file cannot be resumed (use --init)")
        if ckpt["config"]["size"] != cfg.size:
            raise UserError(f"{args.resume}: trained at --size {ckpt['config']['size']}, "
                            f"not {cfg.size}")
        if ckpt.get("data", data.fingerprint) != data.fingerprint:
            raise UserError(f"{args.resume}: trained on other data (fingerprint "
                            f"{ckpt.get('data')}, now {data.fingerprint}): give the same "
                            "--vessels/--lab/--unlabelled/--synthetic, or --init")
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except ValueError:                        # torch: parameter groups that do not fit
            was = ckpt.get("args", {}).get("detector_only") == "True"
            hint = (f"its run was {'' if was else 'not '}--detector-only; "
                    if was != args.detector_only else "")
            raise UserError(f"{args.resume}: its optimizer state does not fit the model "
                            f"({hint}start from its weights with --init)") from None
        for group in optimizer.param_groups:    # the loaded state carries the old rate; --lr wins
            group["lr"] = cfg.lr
        value_maps.update(dense_value_maps(ckpt["value_maps"], cfg.size))
        start, best = ckpt["epoch"], ckpt["best"]
    model = model.to(memory_format=torch.channels_last)
    unwrapped = model
    if world > 1:
        # a student trained on one KD term alone leaves the other head out of the loss
        one_head = distill and args.self_loss == "off" and args.kd != "both"
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=one_head)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    self_loss = not distill or args.self_loss == "on" or args.kd == "none"
    augment = args.augment == "on" or (args.augment == "auto" and (distill or arch == "lk"))
    run = Run(model, unwrapped, optimizer, scaler, cfg, teacher, args.kd if distill else "none",
              self_loss, augment)
    sampler = torch.utils.data.DistributedSampler(range(len(data)), world, rank, shuffle=True,
                                                  seed=cfg.seed, drop_last=world > 1)
    if main_rank:
        print(f"{'distill ' + args.kd if distill else 'train-cnn'} {arch}: {len(data)} images "
              f"({len(value_maps)} labelled, data {data.fingerprint}), {world} process(es) on "
              f"{device}, {cfg.precision}, augment {'on' if run.augment else 'off'}", flush=True)
    started = time.perf_counter()
    for epoch in range(start, cfg.epochs):
        # ---- the epoch's steps: losses stay on the device until the epoch ends ---------------
        sampler.set_epoch(epoch)
        # resumable randomness: one generator per epoch and rank
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch * world + rank)
        order = list(sampler)
        sums, steps, learned = {}, 0, 0
        model.train()
        pke = epoch >= cfg.pke_start
        starts = range(0, len(order), cfg.batch)
        for s in progress(starts, f"epoch {epoch + 1}/{cfg.epochs}", quiet):
            result = train_step(run, data, order[s:s + cfg.batch], value_maps, pke, gen)
            learned += result.pop("pke_learned")
            heat_max = result.pop("heat_max")
            sums["heat_max"] = torch.maximum(sums.get("heat_max", heat_max), heat_max)
            for k, v in result.items():
                sums[k] = sums.get(k, 0) + v
            steps += 1
        # ---- end of epoch: one read-back, then log, validate, checkpoint -----------------------
        share_value_maps(value_maps, [i for i in order if i in value_maps], world)
        values = {k: float(v) for k, v in sums.items()}
        means = {k: v / max(steps, 1) for k, v in values.items() if k != "heat_max"}
        if not all(math.isfinite(v) for v in means.values()):
            kept = (f"{out / 'last.pt'} keeps the last good epoch: --resume it with a lower --lr"
                    if (out / "last.pt").exists()
                    else "no checkpoint was written: try a lower --lr")
            raise UserError(f"training diverged in epoch {epoch + 1} (a loss is not finite); "
                            f"{kept}")
        if main_rank:
            val = None
            if args.val:
                val_cfg = dataclasses.replace(cfg, size=args.val_size or cfg.size)
                val = validation_mauc(unwrapped, args.val, val_cfg)
            improved = val is not None and val > best
            best = max(best, val) if val is not None else best
            state = dict(config=dataclasses.asdict(cfg), optimizer=optimizer.state_dict(),
                         epoch=epoch + 1, best=best, data=data.fingerprint,
                         value_maps=sparse_value_maps(value_maps),
                         args={k: str(v) for k, v in vars(args).items() if k != "func"})
            save_checkpoint(out / "last.pt", unwrapped, **state)
            if improved:                         # without --val, last.pt is the only checkpoint
                save_checkpoint(out / "best.pt", unwrapped, **state)
            minutes = (time.perf_counter() - started) / 60
            print(f"epoch {epoch + 1}/{cfg.epochs}  "
                  + "  ".join(f"{k} {v:.4f}" for k, v in means.items())
                  + f"  heat_max {values.get('heat_max', 0):.3f}  pke_learned {learned}"
                  + (f"  val_mAUC {val:.4f}" if val is not None else "")
                  + f"  {minutes:.1f} min", flush=True)
            if values.get("heat_max", 1) < 1e-4:   # sigmoid saturated: Dice has no gradient left
                print(f"warning: the detector heatmap collapsed to zero (max "
                      f"{values['heat_max']:.1e}); resume from an earlier checkpoint with a lower "
                      "--lr", file=sys.stderr, flush=True)
        if world > 1:
            torch.distributed.barrier()
        if args.max_minutes and (time.perf_counter() - started) / 60 >= args.max_minutes:
            if main_rank:
                print(f"stopped after epoch {epoch + 1}: --max-minutes {args.max_minutes} reached; "
                      f"--resume {out / 'last.pt'} continues", flush=True)
            break
    digest = check_ranks_agree(unwrapped, world)
    if main_rank and digest:
        print(f"distributed: parameters identical on all {world} ranks (sha256 {digest[:16]})",
              flush=True)
    if world > 1:
        torch.distributed.destroy_process_group()
    return out / "last.pt"


# #############################################################################################
# This project's own, in neither paper: sections 8 to 14
# #############################################################################################


# =============================================================================================
# 8. Synthetic fundus generator
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
    """A random retina in world units: {"rng_seed", "disc" (2), "macula" (2), "trees" ({"artery",
    "vein"}: (segments (start, end, width), forks F x 2)), "keypoints" (K x 2)}."""
    rng = np.random.default_rng(seed)
    disc = np.array([rng.uniform(0.25, 0.45), rng.uniform(-0.1, 0.1)])
    trees = {}
    for kind, width, offset in (("artery", 0.011, -0.25), ("vein", 0.015, 0.25)):
        segments, forks = [], []
        for heading, curl in ((np.pi - 0.9, -0.012), (np.pi + 0.9, 0.012), (-0.6, 0.01),
                              (0.6, -0.01)):
            grow_vessels(rng, disc, heading + offset * 0.3 + rng.normal(0, 0.1), width, 0,
                         curl * rng.uniform(0.7, 1.4), segments, forks)
        trees[kind] = (segments, np.array(forks).reshape(-1, 2))
    seg = {k: np.array([[s[0], s[1]] for s in v[0]]) for k, v in trees.items()}
    crossings = segment_crossings(seg["artery"], seg["vein"])
    keypoints = np.concatenate([trees["artery"][1], trees["vein"][1], crossings])
    keypoints = keypoints[np.linalg.norm(keypoints - disc, axis=1) > 0.12]   # not inside the disc
    return {"rng_seed": seed, "disc": disc, "macula": disc - [0.55, 0.0], "trees": trees,
            "keypoints": keypoints}


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
    coarse = rng.normal(0, 1, (size // 64 + 2, size // 64 + 2)).astype(np.float32)
    texture = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
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
        world_ends = np.array([[a, b] for a, b, _ in segments]).reshape(-1, 2)
        ends = apply_homography(H, world_ends).reshape(-1, 2, 2)            # segments x 2 x 2
        for (a, b), (_, _, w) in zip(np.round(ends * 16).astype(np.int64), segments):
            thickness = max(1, int(round(w * scale * thicken)))
            cv2.line(vessels, tuple(a), tuple(b), darkness, thickness, cv2.LINE_AA, 4)
    vessels = cv2.GaussianBlur(vessels, (0, 0), max(0.6, size / 2912))
    green = green * (1 - np.clip(vessels, 0, 0.8))
    for _ in range(int(anatomy * rng.integers(4, 12))):  # lesions: haemorrhages, exudates
        x, y = rng.uniform(0.2, 0.8, 2) * size
        radius = int(rng.uniform(0.004, 0.015) * size)
        brightness = float(rng.choice([0.1, 0.8]))           # dark or bright
        cv2.circle(green, (int(x), int(y)), radius, brightness, -1, cv2.LINE_AA)
    green = green * rng.uniform(1 - 0.15 * photometric, 1 + 0.1 * photometric)
    green += rng.normal(0, 0.01, green.shape).astype(np.float32)
    fov = (r <= 1).astype(np.float32)
    green = np.clip(green, 0, 1) * fov
    bgr = np.stack([green * 0.35, green, np.clip(green * 1.6 + 0.15, 0, 1) * fov], -1)
    return (bgr * 255).astype(np.uint8)


def view_homography(centre, radius_px, size, angle=0.0, zoom=1.0,
                    perspective=(0.0, 0.0)) -> np.ndarray:
    """World -> pixel homography (3 x 3): the world point `centre` lands at the image centre."""
    s = radius_px * zoom
    ca, sa = np.cos(angle), np.sin(angle)
    c = (size - 1) / 2
    T = np.array([[s * ca, -s * sa, c], [s * sa, s * ca, c], [perspective[0], perspective[1], 1.0]])
    return T @ np.array([[1, 0, -centre[0]], [0, 1, -centre[1]], [0, 0, 1]])


@dataclass
class SyntheticPair:
    """One FIRE-like pair (synthetic_pair), SYNTH_FRAME px square."""
    refer: np.ndarray               # H x W x 3 uint8 BGR, the reference photograph
    query: np.ndarray               # H x W x 3 uint8 BGR, the query
    control_points: np.ndarray      # 10 x 4: x_ref y_ref x_query y_query, as FIRE's files
    H: np.ndarray                   # 3 x 3, the true homography query -> reference (H[2, 2] = 1)


def synthetic_pair(seed, category) -> SyntheticPair:
    """One FIRE-like pair of category S, P or A, drawn from `seed`."""
    rng = np.random.default_rng(seed)
    world = synthetic_retina(seed)
    radius = SYNTH_FRAME * 0.47
    Hr = view_homography(rng.normal(0, 0.1, 2), radius, SYNTH_FRAME)
    if category == "P":      # small overlap: the camera moves by about half a field radius
        distance = rng.uniform(0.35, 0.5)
        a = rng.uniform(0, 2 * np.pi)
        shift = distance * np.array([np.cos(a), np.sin(a)])
    else:
        shift = rng.normal(0, 0.06, 2)
    centre = np.linalg.solve(Hr, [SYNTH_FRAME / 2, SYNTH_FRAME / 2, 1])
    Hq = view_homography(centre[:2] / centre[2] + shift, radius, SYNTH_FRAME,
                         angle=rng.normal(0, 0.08), zoom=rng.uniform(0.95, 1.05),
                         perspective=rng.normal(0, 2e-6, 2))
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
        picked = rng.permutation(np.flatnonzero(shared))[:10 - len(chosen)]
        chosen += [np.r_[pr[i], pq[i]] for i in picked]
    return SyntheticPair(refer, query, np.array(chosen), H / H[2, 2])


def write_synthetic_fire(root, quiet=False, counts=None):
    """Write the synthetic benchmark in FIRE's layout (+ the true homographies) under `root`."""
    root = Path(root)
    counts = counts or SYNTH_PAIRS
    jobs = [(c, i) for c in FIRE_CATEGORIES for i in range(1, counts.get(c, 0) + 1)]
    for c, i in progress(jobs, "synthetic pairs", quiet):
        pair = synthetic_pair(SYNTH_SEED + 1000 * FIRE_CATEGORIES.index(c) + i, c)
        name = f"{c}{i:02d}"
        for k, image in ((1, pair.refer), (2, pair.query)):
            jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes()
            write_atomic(root / "Images" / f"{name}_{k}.jpg", jpeg)
        write_atomic(root / "Ground Truth" / f"control_points_{name}_1_2.txt",
                     table_bytes(pair.control_points, "{:.6f}"))
        write_atomic(root / "Homographies" / f"{name}.txt", table_bytes(pair.H, "{:.12g}"))
    write_atomic(root / "SYNTHETIC.txt",
                 b"rkd synthetic benchmark: procedural fundus pairs, exact ground truth\n")
    return root


def default_benchmark(quiet=False) -> Path:
    """The embedded benchmark, generated once (fixed seed) and cached."""
    root = Path(os.environ.get("RKD_CACHE", Path.home() / ".cache" / "rkd")) / "synthetic-fire-v1"
    if not (root / "SYNTHETIC.txt").exists():
        print(f"generating the synthetic benchmark once into {root}", file=sys.stderr)
        write_synthetic_fire(root, quiet)
    return root


@dataclass
class SyntheticView:
    """One labelled synthetic training image (synthetic_training_image)."""
    image: np.ndarray               # size x size x 3 uint8 BGR
    keypoints: np.ndarray           # K x 2 (x, y) px: the bifurcations and crossings in view


def synthetic_training_image(seed, size) -> SyntheticView:
    """One labelled training view of a random retina, in a random pose."""
    rng = np.random.default_rng(seed)
    world = synthetic_retina(seed)
    radius = size * 0.47
    H = view_homography(rng.normal(0, 0.3, 2), radius, size, angle=rng.uniform(-np.pi, np.pi),
                        zoom=rng.uniform(0.8, 1.3))
    category = rng.choice(["S", "A"], p=[0.7, 0.3])
    photometric, anatomy = (2.0, 1.0) if category == "A" else (1.0, 0.0)
    image = render_view(world, H, size, rng, radius, photometric, anatomy)
    points = apply_homography(H, world["keypoints"])
    inside = np.hypot(*(points - (size - 1) / 2).T) < 0.97 * radius
    return SyntheticView(image, points[inside])


# =============================================================================================
# 9. Training data
# =============================================================================================
# Where training images and their keypoint labels come from: SuperRetina's Lab layout, manual
# vessel maps (DRIVE, HRF, CHASE_DB1, or images/ + vessels/) labelled at their junctions,
# unlabelled folders, synthetic views; TrainingSet holds them in memory as random crops.

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".ppm", ".gif"}


def pixels_to_unit(points, extent) -> np.ndarray:
    """K x 2 pixel positions (x, y) -> K x 2 in 0..1 of an extent (width, height): the
    normalised form of the Lab layout's annotations, pixel x's centre at (x + 0.5) / width."""
    return (np.asarray(points) + 0.5) / extent


def unit_to_pixels(points, extent) -> np.ndarray:
    """K x 2 normalised positions (0..1) -> K x 2 pixel positions in an extent (width, height);
    the inverse of pixels_to_unit."""
    return np.asarray(points) * extent - 0.5


def image_files(folder):
    """The image files of a folder (by suffix, any case), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such image folder")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def field_of_view(bgr, fov_path=None) -> np.ndarray:
    """Field-of-view mask (H x W bools) of a photograph (H x W x 3): the dataset's own when
    given, else the bright disc of the photograph."""
    if fov_path is not None and Path(fov_path).exists():
        mask = cv2.cvtColor(read_image(fov_path), cv2.COLOR_BGR2GRAY)
        return mask > mask.max() / 2
    mask = (to_uint8(bgr)[:, :, 2] > 25).astype(np.uint8)
    return cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((5, 5), np.uint8)) > 0


def merge_close_points(points, radius) -> np.ndarray:
    """Greedy clustering: points closer than `radius` become their mean (a crossing is seen by
    thinning as two nearby three-way junctions). K x 2 -> M x 2, M <= K."""
    points = [np.asarray(p, np.float64) for p in points]
    merged = []
    while points:
        seed = points.pop(0)
        near = [np.linalg.norm(p - seed) < radius for p in points]
        group = [seed] + [p for p, close in zip(points, near) if close]
        points = [p for p, close in zip(points, near) if not close]
        merged.append(np.mean(group, 0))
    return np.array(merged).reshape(-1, 2)


def vessel_junctions(vessels, fov=None, merge_radius=10.0, fov_margin=10,
                     ring_radius=6) -> np.ndarray:
    """Bifurcations and crossings of a binary vessel map (H x W uint8, vessels > 127; fov: an
    H x W bool mask or None) -> K x 2 (x, y) pixel positions.

    Thin the map to a one-pixel skeleton (OpenCV's Zhang-Suen). Skeleton pixels with three or
    more skeleton neighbours are candidates; a candidate is a branching point when a circle of
    `ring_radius` px around it crosses the skeleton three or more times (a straight vessel
    crosses it twice, a Y three times, an X four). Points within `merge_radius` are merged
    (an X thins into two nearby junctions), and points near the FOV edge dropped."""
    binary = (vessels > 127).astype(np.uint8) * 255
    skeleton = cv2.ximgproc.thinning(binary, thinningType=cv2.ximgproc.THINNING_ZHANGSUEN) > 0
    neighbours = cv2.filter2D(skeleton.astype(np.float32), -1, np.ones((3, 3), np.float32),
                              borderType=cv2.BORDER_CONSTANT) - 1                    # H x W
    ys, xs = np.nonzero(skeleton & (neighbours >= 3))
    thick = np.pad(cv2.dilate(skeleton.astype(np.uint8), np.ones((3, 3), np.uint8)), ring_radius)
    angles = np.linspace(0, 2 * np.pi, 16 * ring_radius, endpoint=False)
    dx = np.round(ring_radius * np.cos(angles)).astype(int)
    dy = np.round(ring_radius * np.sin(angles)).astype(int)
    # candidates x ring samples: is the ring around each candidate on the (thickened) skeleton?
    ring = thick[ys[:, None] + ring_radius + dy, xs[:, None] + ring_radius + dx]
    branches = ((ring == 1) & (np.roll(ring, 1, axis=1) == 0)).sum(1)     # vessel runs on the ring
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
    """SuperRetina's Lab layout: ImageData/, Annotations/ (x y rows in 0..1),
    ImageSets/<split>.txt -> list of Sample."""
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
            annotations = root / "Annotations" / parts[1]
            rows = [r.split() for r in read_text(annotations).splitlines() if r.strip()]
            try:
                points = np.array(rows, np.float64).reshape(-1, 2)
            except ValueError:
                raise UserError(f"{annotations}: rows must be 'x y' in 0..1") from None
        samples.append(Sample("lab", image, points))
    return samples


def find_file(folder, stem):
    """The image file in `folder` named `stem` with any image suffix, or None."""
    if not Path(folder).is_dir():
        return None
    return next((p for p in image_files(folder) if p.stem == stem), None)


@dataclass
class VesselMapFiles:
    """One photograph with a manual vessel map (vessel_map_files)."""
    image: Path
    vessels: Path                   # the vessel map, same size as the photograph
    fov: Path | None                # the dataset's field-of-view mask, where it has one


def vessel_map_files(root) -> list:
    """VesselMapFiles of a folder laid out as
      this project's: images/ + vessels/ (+ fov/), same file stems;
      DRIVE as its archive unpacks: training/ and test/, each images/NN_training.tif (or
        NN_test.tif), 1st_manual/NN_manual1.gif, mask/NN_training_mask.gif -- the folder itself,
        or its training/ or test/ part;
      HRF's: images/NN_x.JPG, manual1/NN_x.tif, mask/NN_x_mask.tif;
      CHASE_DB1's: one flat folder of Image_NNX.jpg beside Image_NNX_1stHO.png.
    Raises UserError when the folder matches none of them."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such folder")
    found = []
    if (root / "vessels").is_dir():                                          # this project's layout
        for image in image_files(root / "images"):
            vessels = find_file(root / "vessels", image.stem)
            if vessels:
                found.append(VesselMapFiles(image, vessels, find_file(root / "fov", image.stem)))
    for part in (root, root / "training", root / "test"):                   # DRIVE
        if (part / "1st_manual").is_dir():
            for image in image_files(part / "images"):
                number = image.stem.split("_")[0]
                vessels = find_file(part / "1st_manual", f"{number}_manual1")
                if vessels:
                    fov = find_file(part / "mask", f"{image.stem}_mask")
                    found.append(VesselMapFiles(image, vessels, fov))
    if (root / "manual1").is_dir():                                          # HRF
        for image in image_files(root / "images"):
            vessels = find_file(root / "manual1", image.stem)
            if vessels:
                fov = find_file(root / "mask", f"{image.stem}_mask")
                found.append(VesselMapFiles(image, vessels, fov))
    for image in image_files(root):                                          # CHASE_DB1
        if not image.stem.endswith(("_1stHO", "_2ndHO")):
            vessels = find_file(root, f"{image.stem}_1stHO")
            if vessels:
                found.append(VesselMapFiles(image, vessels, None))
    if not found:
        raise UserError(f"{root}: no vessel maps found; expected images/ + vessels/ (same names), "
                        "DRIVE's training/ or test/ (images/, 1st_manual/, mask/), HRF's images/ "
                        "+ manual1/ + mask/, or CHASE_DB1's Image_NNX.jpg beside "
                        "Image_NNX_1stHO.png")
    return found


def vessel_map_samples(root, cfg):
    """Labelled samples of a folder of photographs with manual vessel maps (vessel_map_files
    names the layouts), labelled by vessel_junctions. The merge radius is cfg.nms_radius model
    px at model size cfg.size. -> list of Sample."""
    samples = []
    for files in vessel_map_files(root):
        bgr = read_image(files.image)
        vessels = to_uint8(cv2.cvtColor(read_image(files.vessels), cv2.COLOR_BGR2GRAY))
        fov = field_of_view(bgr, files.fov)
        if vessels.shape != bgr.shape[:2] or fov.shape != bgr.shape[:2]:
            raise UserError(f"{files.vessels}: vessel map or FOV mask is not the size of "
                            f"{files.image.name}")
        radius = cfg.nms_radius * max(bgr.shape[:2]) / cfg.size
        points = vessel_junctions(vessels, fov, radius, fov_margin=int(radius))
        normalised = pixels_to_unit(points, [bgr.shape[1], bgr.shape[0]])     # K x 2 in 0..1
        samples.append(Sample("vessels", files.image, normalised))
    return samples


def collect_samples(args, cfg):
    """The training command's data flags -> list of Sample, in the order of the flags."""
    samples = []
    for root in args.lab or []:
        samples += lab_samples(root)
    for root in args.vessels or []:
        samples += vessel_map_samples(root, cfg)
    for folder in args.unlabelled or []:
        samples += [Sample("unlabelled", p) for p in image_files(folder)]
    samples += [Sample("synthetic", synthetic_seed=args.seed * 100003 + i)
                for i in range(args.synthetic)]
    if not samples:
        raise UserError("no training data: give --synthetic N, --lab DIR, --vessels DIR or "
                        "--unlabelled DIR")
    return samples


@dataclass
class Batch:
    """A batch of random crops (TrainingSet.batch)."""
    images: torch.Tensor            # B x 1 x C x C float32 in [0, 1], C the crop side
    offsets: list                   # B (x0, y0): each crop's corner in its model-size image
    labels: list                    # B: K x 2 (x, y) labels in crop px, or None (unlabelled)


class TrainingSet:
    """All images preprocessed once at the model size and held in memory as uint8, with their
    labels in model pixels; batches are random crops of them."""

    def __init__(self, samples, size, quiet=False):
        self.size, self.images, self.labels, self.blur_scale = size, [], [], []
        digest = hashlib.sha256()
        for s in progress(samples, "loading training images", quiet):
            if s.synthetic_seed is not None:
                view = synthetic_training_image(s.synthetic_seed, size)
                bgr = view.image
                pts = pixels_to_unit(view.keypoints, size)    # normalised like the Lab layout
                digest.update(f"synthetic {s.synthetic_seed}\n".encode())
            else:
                bgr, pts = read_image(s.path), s.points
                # file name and size, never the absolute path: a run can move to another machine
                digest.update(f"{s.source} {Path(s.path).name} {Path(s.path).stat().st_size} "
                              f"{0 if pts is None else len(pts)}\n".encode())
            self.images.append((preprocess(bgr, size) * 255).astype(np.uint8))    # size x size
            self.blur_scale.append(size / max(bgr.shape[:2]))    # model px per original px
            # normalised label -> model px of the padded square (the photograph spans
            # w * size / side by h * size / side of it)
            h, w = bgr.shape[:2]
            extent = np.array([w, h]) * size / max(h, w)
            self.labels.append(None if pts is None else            # K x 2 model px
                               torch.tensor(unit_to_pixels(pts, extent), dtype=torch.float32))

        self.fingerprint = digest.hexdigest()[:16]    # what a resumed run must find again

    def __len__(self):
        return len(self.images)

    def batch(self, indices, crop, gen) -> Batch:
        """Random crop x crop windows (crop 0: whole images) of the images at `indices`, their
        labels moved into the crop and those outside it dropped."""
        crop = crop or self.size
        images, offsets, labels = [], [], []
        for i in indices:
            x0, y0 = (torch.randint(0, self.size - crop + 1, (2,), generator=gen).tolist())
            window = self.images[i][y0:y0 + crop, x0:x0 + crop]                     # C x C uint8
            images.append(torch.from_numpy(window.astype(np.float32) / 255))
            offsets.append((x0, y0))
            lab = self.labels[i]
            if lab is not None:
                lab = lab - torch.tensor([x0, y0], dtype=torch.float32)
                lab = lab[((lab >= 0) & (lab <= crop - 1)).all(1)]
            labels.append(lab)
        return Batch(torch.stack(images)[:, None], offsets, labels)


# =============================================================================================
# 10. Self-warp validation
# =============================================================================================
# Validation that is not FIRE: held-out photographs registered to copies of themselves under
# known random homographies.

SELF_WARP_SEED = 7


def random_homography(rng, w, h, degrees=10.0, zoom=0.1, shift=0.08,
                      perspective=0.1) -> np.ndarray:
    """A random view change about the image centre, of FIRE category S's size: rotation up to
    `degrees`, zoom 1 +/- `zoom`, shift up to `shift` of the side, and corner perspective up to
    `perspective` (a fraction of the side). -> 3 x 3, query px -> reference px."""
    centre = np.array([[1, 0, -(w - 1) / 2], [0, 1, -(h - 1) / 2], [0, 0, 1.0]])
    a, s = math.radians(rng.uniform(-degrees, degrees)), rng.uniform(1 - zoom, 1 + zoom)
    t = rng.uniform(-shift, shift, 2) * [w, h]
    p = rng.uniform(-perspective, perspective, 2) / (max(w, h) / 2)
    M = np.array([[s * math.cos(a), -s * math.sin(a), t[0]],
                  [s * math.sin(a), s * math.cos(a), t[1]],
                  [p[0], p[1], 1]])
    return np.linalg.inv(centre) @ M @ centre


def self_warp_check(model, paths, cfg, warps=8, seed=SELF_WARP_SEED, quiet=False) -> list:
    """Register each photograph to a copy of itself under `warps` known random homographies.

    Per pair: `nn_accuracy`, the share of the query's keypoints that land inside the reference
    whose nearest reference descriptor sits within 4 model px of their true place; `mean_error`,
    the registration error over a 5 x 5 grid on the central 80 % of the query, in px of a
    2912 px frame (FIRE's scale, so that the 1..25 px AUC means the same); and `status` as on
    FIRE. Uses `register` and its features, the pipeline eval and match use."""
    rng = np.random.default_rng(seed)
    rows = []
    for path in progress(paths, f"self-warp {getattr(model, 'name', model.arch)}", quiet):
        refer = read_image(path)
        h, w = refer.shape[:2]
        gx, gy = np.meshgrid(np.linspace(0.1, 0.9, 5) * (w - 1),
                             np.linspace(0.1, 0.9, 5) * (h - 1))
        grid = np.c_[gx.ravel(), gy.ravel()]                                 # 25 x 2 query px
        for k in range(warps):
            H = random_homography(rng, w, h)
            query = cv2.warpPerspective(refer, np.linalg.inv(H), (w, h), flags=cv2.INTER_LINEAR)
            S = cfg.size
            # with a cache, register extracts each image's features on its own (a batch of one)
            reg = register(model, query, refer, cfg, {}, ("query", "refer"))
            kq, dq = reg.query_features.keypoints, reg.query_features.descriptors
            kr, dr = reg.refer_features.keypoints, reg.refer_features.descriptors
            to_model = np.linalg.inv(model_to_original(refer.shape, S))
            truth = apply_homography(to_model @ H @ np.linalg.inv(to_model), kq)  # N_q x 2
            seen = ((truth >= 0) & (truth <= S - 1)).all(1)
            accuracy = float("nan")
            if seen.any() and len(kr):
                # squared distances, seen query keypoints x reference keypoints
                d = (dq[seen] ** 2).sum(1)[:, None] + (dr ** 2).sum(1)[None] - 2 * dq[seen] @ dr.T
                nearest = kr[d.argmin(1)]
                accuracy = float((np.linalg.norm(nearest - truth[seen], axis=1) <= 4).mean())
            Hp = reg.protocol_H
            if Hp is None:
                distances = np.full(len(grid), np.inf)
            else:
                distances = np.linalg.norm(apply_homography(Hp, grid) - apply_homography(H, grid),
                                           axis=1)
            errors = distances * 2912 / max(w, h)                       # px of FIRE's frame
            rows.append({"name": f"{Path(path).stem}#{k}", "nn_accuracy": accuracy,
                         "mean_error": float(errors.mean()), "status": pair_status(errors),
                         "inliers": int(reg.protocol.inliers.sum())})
    return rows


# =============================================================================================
# 11. Plausibility bar
# =============================================================================================

# A homography a user can trust (match's exit 0) must pass these: two photographs of one eye
# differ by a moderate zoom and rotation and a little perspective, never by a mirror or a fold.
MIN_INLIERS = 10                  # fewer inliers: the fit may be chance (4 points fit anything)
SCALE_RANGE = (0.5, 2.0)          # local scale of the query in the reference, at its corners
MAX_ANISOTROPY = 1.5              # ratio of the local Jacobian's singular values (shear, squash)


def implausibility(H, inliers, query_shape) -> str:
    """Why a registration cannot be trusted, or "" when it can. H: 3x3 query px -> reference
    px; inliers: number of inlier matches; query_shape: (H, W, ...) of the query photograph.
    The local Jacobian of H is checked at the query's corners and centre."""
    if H is None:
        return "no homography (fewer than 4 matches)"
    if inliers < MIN_INLIERS:
        return f"only {inliers} inliers (fewer than {MIN_INLIERS})"
    h, w = query_shape[:2]
    H = H / H[2, 2]
    for x, y in ((0, 0), (w - 1, 0), (0, h - 1), (w - 1, h - 1), ((w - 1) / 2, (h - 1) / 2)):
        d = H[2, 0] * x + H[2, 1] * y + 1
        if d <= 0:
            return "the homography folds the query through infinity (extreme perspective)"
        u, v = (H[0, 0] * x + H[0, 1] * y + H[0, 2]) / d, (H[1, 0] * x + H[1, 1] * y + H[1, 2]) / d
        J = np.array([[H[0, 0] - u * H[2, 0], H[0, 1] - u * H[2, 1]],
                      [H[1, 0] - v * H[2, 0], H[1, 1] - v * H[2, 1]]]) / d      # 2 x 2
        if np.linalg.det(J) <= 0:
            return "the homography mirrors the query"
        s1, s2 = np.linalg.svd(J, compute_uv=False)
        if not SCALE_RANGE[0] <= math.sqrt(s1 * s2) <= SCALE_RANGE[1]:
            return (f"implausible scale change ({math.sqrt(s1 * s2):.2f}x, allowed "
                    f"{SCALE_RANGE[0]}-{SCALE_RANGE[1]}x)")
        if s1 / s2 > MAX_ANISOTROPY:
            return (f"implausible shear or squash (axes differ {s1 / s2:.2f}x, allowed "
                    f"{MAX_ANISOTROPY}x)")
    return ""


# =============================================================================================
# 12. Checkpoints
# =============================================================================================
# A checkpoint is one torch.save'd dict: {"format": CHECKPOINT_FORMAT, "arch", "model" (the
# state dict, fp32, or fp16 in exported files)}, plus, from training, "config", "optimizer",
# "epoch", "best", "data", "value_maps" and "args". Files are written atomically and read with
# weights_only=True.

def save_checkpoint(path, model, **extra):
    """{format, arch, weights, ...}. fp16=True in `extra` stores a compact weights-only file."""
    raw = model.module if hasattr(model, "module") else model
    fp16 = extra.pop("fp16", False)
    state = {k: (v.half() if fp16 and v.is_floating_point() else v).detach().cpu()
             for k, v in raw.state_dict().items()}
    payload = {"format": CHECKPOINT_FORMAT, "arch": raw.arch, "model": state, **extra}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_atomic(path, buffer.getvalue())


def resolve_weights(name):
    """A shipped model's short name (lk, student, ...) or a path -> Path."""
    if name in SHIPPED:
        path = WEIGHTS_DIR / SHIPPED[name]
        if not path.exists():
            raise UserError(f"shipped model {name!r} is not in {WEIGHTS_DIR} "
                            "(train it, see README)")
        return path
    path = Path(name)
    if not path.exists():
        raise UserError(f"{name}: no such checkpoint (shipped names: {', '.join(SHIPPED)})")
    return path


def load_checkpoint(path) -> dict:
    """Read a checkpoint file -> its dict; anything but an rkd checkpoint is a UserError."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # torch raises many types for a file that is not a checkpoint
        raise UserError(f"{path}: not a readable rkd checkpoint ({type(e).__name__})") from None
    if (not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT
            or ckpt.get("arch") not in ARCHS):
        raise UserError(f"{path}: not an rkd checkpoint (no '{CHECKPOINT_FORMAT}' header)")
    return ckpt


PER_CHANNEL_LK_KEY = "stages.1.2.k1.weight"    # a key only LK checkpoints before bebcb97 have


def lk_state_from_per_channel_layout(state) -> dict:
    """An LK state dict in rkd's layout before commit bebcb97 -> RKD's layout (LKUNET).

    That layout (e.g. ../shared/checkpoints/lk_warmup_e28.pt) had per-channel PReLUs in stages
    2-4 (keys stages.i.1.weight, stages.i.2.act.weight), its LKU block nested as stages.i.2, and
    ReLU in stage 1 and the descriptor head. Every convolution is copied unchanged; the one shared
    PReLU slope becomes the mean of the per-channel slopes (0.2364 for that warm start). The
    result is a warm start, not the same function: stage 1 and the descriptor head change from
    ReLU to that PReLU."""
    slopes, out = [], {}
    for key, value in state.items():
        parts = key.split(".")                     # stages, i, module, [k1|k3|k5|act], param
        if parts[0] != "stages" or parts[1] == "0":
            out[key] = value                       # stage 1, decoder, descriptor: same keys
        elif parts[2] == "1" or parts[3] == "act":
            slopes.append(value)                   # per-channel PReLU slopes
        elif parts[2] == "0":
            out[".".join(["stages", parts[1], "conv", parts[3]])] = value
        else:                                      # stages.i.2.kN.param -> stages.i.kN.param
            out[".".join(["stages", parts[1], *parts[3:]])] = value
    slope = torch.cat(slopes).mean().reshape(1)
    shared_prelu = ["stages.0.1.weight", "stages.0.3.weight", "descriptor.act.weight"]
    for key in shared_prelu + [f"stages.{i}.act.weight" for i in (1, 2, 3)]:
        out[key] = slope.clone()
    return out


def load_weights(model, ckpt, path):
    """A read checkpoint's weights into `model`, fp16 ones (exported files) widened to fp32 --
    the one place where a checkpoint's tensors enter a network. `model` must be the
    architecture the checkpoint declares, else a UserError names `path`. LK checkpoints in the
    per-channel layout of rkd before bebcb97 are carried over with a note on stderr
    (lk_state_from_per_channel_layout)."""
    if ckpt["arch"] != model.arch:
        raise UserError(f"{path}: holds {ckpt['arch']!r} weights, not {model.arch!r}")
    state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    if model.arch == "lk" and PER_CHANNEL_LK_KEY in state:
        try:
            state = lk_state_from_per_channel_layout(state)
        except (IndexError, ValueError, RuntimeError):   # keys or slopes of another shape
            raise UserError(f"{path}: weights do not fit architecture 'lk'") from None
        print(f"note: {path}: LK weights in rkd's layout before bebcb97 (per-channel PReLU), "
              "carried over to RKD's: convolutions unchanged, one PReLU slope (their mean)",
              file=sys.stderr)
    try:
        model.load_state_dict(state)
    except RuntimeError:
        hint = ""
        if model.arch == "vit_student" and not any(k.endswith("ls1.gamma") for k in state):
            hint = " (a student saved before LayerScale, rkd commit 9f66e8a or older, runs there)"
        raise UserError(f"{path}: weights do not fit architecture {ckpt['arch']!r}{hint}") from None


def model_from_checkpoint(ckpt, path) -> nn.Module:
    """A read checkpoint -> the network it declares, with its weights (fp32, on the CPU)."""
    model = build_model(ckpt["arch"])
    load_weights(model, ckpt, path)
    return model


def load_model(name, device="cpu"):
    """Shipped name, checkpoint path or 'sift' -> model in eval mode (fp16 files load as fp32)."""
    if name == "sift":
        return Sift()
    path = resolve_weights(name)
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt, path)
    model.trained_size = ckpt.get("config", {}).get("size")
    model.name = name
    return model.to(device).to(memory_format=torch.channels_last).eval()


def warn_size(model, size):
    """A checkpoint trained at one --size and run at another sees vessels at another scale."""
    trained = getattr(model, "trained_size", None)
    if trained and trained != size:
        print(f"warning: {model.name} was trained at --size {trained}, running at {size}: "
              "vessels appear at another scale than it learned", file=sys.stderr)


def default_model_name():
    """The first shipped model in DEFAULT_ORDER, or 'sift' when none is shipped."""
    for name in DEFAULT_ORDER:
        if (WEIGHTS_DIR / SHIPPED[name]).exists():
            return name
    return "sift"


# =============================================================================================
# 13. Files and errors
# =============================================================================================
# Bad input ends in one line on stderr (UserError); images keep their bit depth and a file cut
# short is refused; every output is written atomically; JSON is strict.

class UserError(Exception):
    """Bad input: reported as one line on stderr with a non-zero exit, never a traceback."""


def progress(iterable, desc, quiet=False, **kw):
    """A tqdm progress bar over `iterable`: none with quiet, nor when stderr is not a terminal
    (logs, pipes, CI: tqdm's disable=None)."""
    return tqdm(iterable, desc=desc, disable=True if quiet else None, leave=False,
                dynamic_ncols=True, **kw)


def read_image(path) -> np.ndarray:
    """H x W x 3 image in its own bit depth (8-bit, 16-bit -- 12-bit data stored in 16 bits
    too -- or float), grey images repeated to 3 channels, alpha dropped. A file OpenCV cannot
    decode, or a JPEG or PNG cut short (OpenCV would only warn), is a UserError."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        flags = cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH
        image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error:                               # e.g. larger than OpenCV's pixel limit
        image = None
    # cut short: no end-of-image marker after the last start-of-scan (JPEG), or no IEND (PNG)
    jpeg_cut = data[:2] == b"\xff\xd8" and data.rfind(b"\xff\xd9") <= data.rfind(b"\xff\xda")
    png_cut = data[:4] == b"\x89PNG" and b"IEND" not in data[-64:]
    if jpeg_cut or png_cut:
        raise UserError(f"{path}: not a readable image (truncated)")
    if image is None:
        raise UserError(f"{path}: not a readable image (OpenCV cannot decode it: not an image, or "
                        "a format its build lacks; convert it to PNG or TIFF)")
    return image


def to_uint8(image) -> np.ndarray:
    """An image of any bit depth scaled to 8 bits for pictures (its own maximum -> 255)."""
    if image.dtype == np.uint8:
        return image
    top = float(image.max()) or 1.0
    return np.clip(image.astype(np.float32) * (255.0 / top), 0, 255).astype(np.uint8)


def read_text(path) -> str:
    """A UTF-8 text file's contents; one that cannot be read is a UserError."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")     # a byte-order mark is not data
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None


def current_umask() -> int:
    """The process's umask (reading it means setting it, so it is set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
        os.chmod(tmp, 0o666 & ~current_umask())    # mkstemp makes 0600; give what the umask gives
        os.replace(tmp, path)
    except BaseException as e:                      # Ctrl-C included: leave no temporary behind
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise UserError(f"cannot write {path}: {e.strerror or e}") from None
        raise


def json_bytes(doc) -> bytes:
    """Strict JSON (RFC 8259): NaN and infinities become null, numpy scalars plain numbers;
    strings are written as they are."""
    def clean(v):
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, (np.integer, np.floating)):
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return v
    return json.dumps(clean(doc), indent=1, allow_nan=False).encode()


def table_bytes(rows, fmt) -> bytes:
    """A 2-D array as text: one line per row, its values formatted by `fmt` and spaced."""
    return "".join(" ".join(fmt.format(v) for v in row) + "\n" for row in rows).encode()


def write_png(path, image):
    """An image (H x W or H x W x 3, 8 or 16 bits) as a PNG file, atomically."""
    write_atomic(path, cv2.imencode(".png", image)[1].tobytes())


def check_writable(path):
    """Fail before the work, not after it, when an output cannot be written."""
    parent = Path(path).parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    file_locked = Path(path).exists() and not os.access(path, os.W_OK)
    if not probe.is_dir() or not os.access(probe, os.W_OK) or file_locked:
        raise UserError(f"cannot write {path}: permission denied")


# =============================================================================================
# 14. Pictures
# =============================================================================================
# What match writes beside homography.json, and eval's --plots.

def draw_matches(query, refer, reg, max_side=1200, title="", max_lines=150):
    """Side-by-side picture of the inlier matches (green lines, red ends) on the two original
    images, under a title line; with more than max_lines inliers an even sample is drawn.
    query, refer: H x W x 3 photographs; reg: their Registration -> an 8-bit BGR picture."""
    scale = max_side / max(query.shape[0], refer.shape[0], 1)
    q = cv2.resize(to_uint8(query), None, fx=scale, fy=scale)
    r = cv2.resize(to_uint8(refer), None, fx=scale, fy=scale)
    h, bar = max(q.shape[0], r.shape[0]), 28
    canvas = np.zeros((h + bar, q.shape[1] + r.shape[1], 3), np.uint8)
    canvas[bar:bar + q.shape[0], :q.shape[1]], canvas[bar:bar + r.shape[0], q.shape[1]:] = q, r
    stage = reg.final
    pairs = list(zip(stage.query_points[stage.inliers] * scale,
                     stage.refer_points[stage.inliers] * scale))
    shown = pairs[::max(1, math.ceil(len(pairs) / max_lines))]
    for a, b in shown:
        pa, pb = (int(a[0]), int(a[1]) + bar), (int(b[0]) + q.shape[1], int(b[1]) + bar)
        cv2.line(canvas, pa, pb, (0, 255, 0), 1, cv2.LINE_AA)
        cv2.circle(canvas, pa, 3, (0, 0, 255), -1)
        cv2.circle(canvas, pb, 3, (0, 0, 255), -1)
    text = (f"{title}  query (left) -> reference (right): {len(pairs)} inliers"
            + (f", {len(shown)} drawn" if len(shown) < len(pairs) else ""))
    cv2.putText(canvas, text.strip(), (8, 20), cv2.FONT_HERSHEY_SIMPLEX,
                0.6 * canvas.shape[1] / 1600, (255, 255, 255), 1, cv2.LINE_AA)
    return canvas


def aligned_query(query, refer, H):
    """The query warped into the reference's frame by H, in the query's own bit depth: what a
    user compares visits with."""
    h, w = refer.shape[:2]
    return cv2.warpPerspective(query, H, (w, h), flags=cv2.INTER_LINEAR)


def checkerboard(aligned, refer, tiles=8):
    """The aligned query (aligned_query) interleaved with the reference in a checkerboard."""
    warped, refer = to_uint8(aligned), to_uint8(refer)
    h, w = refer.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    board = ((yy * tiles // h + xx * tiles // w) % 2 == 0)[..., None]
    return np.where(board, refer, warped)


def plot_success_curves(runs, path, category=None):
    """Success curves (OpenCV drawing): for thresholds t = 1..25 px, the fraction of pairs whose
    mean error is below t, one curve per model. The legend gives the numbers eval prints: the
    category's AUC, or for 'all' the mAUC (the mean of S, P and A) -- while the 'all' curve
    itself pools every pair, as the title says."""
    W, H, m = 720, 480, 64
    img = np.full((H, W, 3), 255, np.uint8)
    cv2.rectangle(img, (m, 30), (W - 20, H - m), (0, 0, 0), 1)

    def to_px(t, f):                  # (threshold, share of pairs) -> picture (x, y)
        return int(m + (t - 1) / (AUC_LIMIT - 1) * (W - 20 - m)), int(H - m - f * (H - m - 30))
    font = cv2.FONT_HERSHEY_SIMPLEX
    for t in (1, 5, 10, 15, 20, 25):
        cv2.putText(img, str(t), (to_px(t, 0)[0] - 6, H - m + 18), font, 0.4, (0, 0, 0), 1)
    for f in (0, 0.5, 1.0):
        cv2.putText(img, f"{f:.1f}", (24, to_px(1, f)[1] + 4), font, 0.4, (0, 0, 0), 1)
    cv2.putText(img, "threshold t: mean control-point error, px of the original image",
                (m, H - m + 40), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, "share of pairs with error < t", (4, 22), font, 0.45, (0, 0, 0), 1,
                cv2.LINE_AA)
    title = (f"category {category}" if category
             else "all pairs pooled (legend: mAUC = mean of S, P, A)")
    cv2.putText(img, title, (W // 2 - 60, 22), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    colours = [(200, 60, 0), (0, 140, 0), (0, 0, 200), (160, 0, 160), (0, 160, 200),
               (90, 90, 90)]
    for k, (name, rows) in enumerate(runs):
        e = np.array([r["mean_error"] for r in rows if category in (None, r["category"])])
        if len(e) == 0:
            continue
        colour = colours[k % len(colours)]
        pts = np.array([to_px(t, (e < t).mean()) for t in range(1, AUC_LIMIT + 1)], np.int32)
        cv2.polylines(img, [pts], False, colour, 2, cv2.LINE_AA)
        s = summarise(rows)
        label = f"{name}: AUC {s[category]:.3f}" if category else f"{name}: mAUC {s['mAUC']:.3f}"
        cv2.putText(img, label, (m + 10, 52 + 18 * k), font, 0.45, colour, 1, cv2.LINE_AA)
    write_png(path, img)


# =============================================================================================
# 15. Command line
# =============================================================================================
# One function per command (cmd_*), the parser, main.

def matching_config(args, device):
    """The matching flags (--size, --no-trick, --method, --precision, --ratio) -> a Config."""
    cfg = dataclasses.replace(CFG, size=args.size, trick=not args.no_trick, method=args.method,
                              precision=resolve_precision(args.precision, device))
    return dataclasses.replace(cfg, ratio=args.ratio, sift_ratio=args.ratio) if args.ratio else cfg


def print_verdict(summaries):
    """The main job's answer: two models side by side and which registers better (mAUC; within
    0.01 is a tie)."""
    print("\n| model | mAUC | S | P | A | failed / inaccurate / acceptable | s / pair |"
          "\n|---|---|---|---|---|---|---|")
    for s in summaries:
        m = s["summary"]
        print(f"| {s['model']} | {m['mAUC']:.3f} | {m['S']:.3f} | {m['P']:.3f} | {m['A']:.3f} | "
              f"{m['failed']} / {m['inaccurate']} / {m['acceptable']} | "
              f"{m['seconds_per_pair']:.2f} |")
    (a, ma), (b, mb) = ((s["model"], s["summary"]["mAUC"]) for s in summaries)
    if abs(ma - mb) <= 0.01:
        print(f"verdict: a tie ({a} {ma:.3f}, {b} {mb:.3f}: within 0.01)")
    else:
        (w, mw), (l, ml) = ((b, mb), (a, ma)) if mb > ma else ((a, ma), (b, mb))
        print(f"verdict: {w} registers better here (mAUC {mw:.3f} against {l}'s {ml:.3f})")


def cmd_eval(args):
    device = pick_device(args.device)
    cfg = matching_config(args, device)
    fire = Path(args.fire) if args.fire else default_benchmark(args.quiet)
    benchmark = read_fire(fire)
    pairs, note = benchmark.pairs, benchmark.note
    # the main job: the default model beside SIFT, so that a user sees where it stands
    names = args.weights or list(dict.fromkeys([default_model_name(), "sift"]))
    for path in (args.json, args.csv):
        if path:
            check_writable(path)
    if args.plots:
        check_writable(Path(args.plots) / "x.png")
    runs, summaries = [], []
    for name in names:
        model = load_model(name, device)
        warn_size(model, cfg.size)
        on_pair = None
        if args.show_pairs and args.plots:
            def on_pair(p, q, r, reg, n=name):      # a match picture per pair
                e = pair_errors(reg.protocol_H, p.points)
                title = (f"{n} {p.name} ({p.category}): {pair_status(e)}, "
                         f"mean error {e.mean():.1f} px")
                stem = "_".join(Path(n).with_suffix("").parts[-2:])
                write_png(Path(args.plots) / f"{stem}_{p.name}.png",
                          draw_matches(q, r, reg, title=title))
        rows = evaluate(model, pairs, cfg, args.quiet, on_pair)
        summary = summarise(rows)
        label = str(name)                 # as given: runs/lk/best.pt and runs/sr/best.pt stay apart
        runs.append((label, rows))
        summaries.append({"model": label, "arch": model.arch, "data": str(fire), "note": note,
                          "size": cfg.size, "trick": cfg.trick, "method": cfg.method,
                          "summary": summary, "pairs": rows})
        print(f"model {label} ({model.arch}) on {fire} -- {note}")
        print(f"  S {summary['S']:.4f}  P {summary['P']:.4f}  A {summary['A']:.4f}  "
              f"mAUC {summary['mAUC']:.4f}")
        print(f"  failed {summary['failed']}  inaccurate {summary['inaccurate']}  "
              f"acceptable {summary['acceptable']}  pairs {summary['pairs']}  "
              f"seconds/pair {summary['seconds_per_pair']:.2f}")
    if not args.weights and len(summaries) == 2:
        print_verdict(summaries)
    if args.markdown:
        print("\n| model | S | P | A | mAUC | failed / inaccurate / acceptable | s / pair |"
              "\n|---|---|---|---|---|---|---|")
        for s in summaries:
            m = s["summary"]
            print(f"| {s['model']} | {m['S']:.3f} | {m['P']:.3f} | {m['A']:.3f} | "
                  f"{m['mAUC']:.3f} | {m['failed']} / {m['inaccurate']} / {m['acceptable']} | "
                  f"{m['seconds_per_pair']:.2f} |")
    if args.json:
        doc = summaries[0] if len(summaries) == 1 else {"runs": summaries}
        write_atomic(args.json, json_bytes(doc))
    if args.csv:
        buf = io.StringIO()
        fields = ["model", "name", "category", "status", "mean_error", "max_error",
                  "median_error", "inliers", "first_stage_inliers", "second_stage_inliers",
                  "implausible", "seconds"]
        writer = csv.DictWriter(buf, fields, extrasaction="ignore")
        writer.writeheader()
        for label, rows in runs:
            writer.writerows({"model": label, **r} for r in rows)
        write_atomic(args.csv, buf.getvalue().encode())
    if args.plots:
        for category in (None, *FIRE_CATEGORIES):
            plot_success_curves(runs, Path(args.plots) / f"success_{category or 'all'}.png",
                                category)
    curves = "success curves" + (" and match pictures" if args.show_pairs else "")
    for what, where in (("JSON", args.json), ("CSV", args.csv), (curves, args.plots)):
        if where:
            print(f"wrote {what}: {where}")


def match_pair(model, query_path, refer_path, out, cfg, cache=None, quiet=False):
    """Register one pair and write homography.json, matches.png and, when registered,
    aligned.png and checkerboard.png into `out`. -> the JSON document (its "status" is
    "registered" only for a homography that passes the plausibility bar)."""
    query, refer = read_image(query_path), read_image(refer_path)
    start = time.perf_counter()
    reg = register(model, query, refer, cfg, cache, (str(query_path), str(refer_path)))
    seconds = time.perf_counter() - start
    stage = reg.final
    used = "second" if stage is reg.second else "first"
    why = reg.implausibility(stage)
    keypoints = [len(reg.query_features.keypoints), len(reg.refer_features.keypoints)]
    name = getattr(model, "name", model.arch)
    print(f"model {name}: keypoints {keypoints[0]} / {keypoints[1]}, matches {len(stage.inliers)}, "
          f"inliers {int(stage.inliers.sum())}, {used} stage, {seconds:.2f} s")
    if reg.second is not None and stage is reg.first and not quiet:   # eval would fail such a pair
        print(f"the second matching stage was not used ({reg.implausibility(reg.second)}): the "
              "first stage's homography is kept", file=sys.stderr)
    doc = {"query": str(query_path), "refer": str(refer_path), "model": name,
           "status": "failed" if why else "registered", "reason": why or None,
           "homography_query_to_refer": None if why else (stage.H / stage.H[2, 2]).tolist(),
           "stage": None if why else used,
           "first_stage_inliers": int(reg.first.inliers.sum()),
           "second_stage_inliers": None if reg.second is None else int(reg.second.inliers.sum()),
           "keypoints": keypoints, "matches": len(stage.inliers),
           "inliers": int(stage.inliers.sum())}
    written = [out / "matches.png"]
    title = ("failed: " + why) if why else f"{used} stage"
    write_png(written[0], draw_matches(query, refer, reg, title=title))
    if not why:
        written += [out / "aligned.png", out / "checkerboard.png"]
        aligned = aligned_query(query, refer, stage.H)
        write_png(written[1], aligned)
        write_png(written[2], checkerboard(aligned, refer))
    write_atomic(out / "homography.json", json_bytes(doc))
    print("wrote " + ", ".join(str(p) for p in [out / "homography.json", *written]))
    return doc


@dataclass
class PairRow:
    """One row of a --pairs CSV: two paths, or what is wrong with the row."""
    row: int                        # 1-based row number in the file
    query: Path | None = None
    refer: Path | None = None
    error: str | None = None        # set for a row without two paths


def read_pair_list(path) -> list:
    """--pairs CSV: rows `query,refer` (a header row of those words is allowed), paths relative
    to the CSV's folder -> list of PairRow."""
    rows = []
    for i, row in enumerate(csv.reader(io.StringIO(read_text(path))), 1):
        cells = [c.strip() for c in row]
        if not any(cells) or (i == 1 and [c.lower() for c in cells[:2]] == ["query", "refer"]):
            continue
        if len(cells) < 2 or not cells[0] or not cells[1]:
            rows.append(PairRow(i, error=f"row {i}: expected 'query,refer'"))
        else:
            rows.append(PairRow(i, Path(path).parent / cells[0], Path(path).parent / cells[1]))
    if not rows:
        raise UserError(f"{path}: no 'query,refer' rows")
    return rows


def cmd_match(args):
    device = pick_device(args.device)
    cfg = matching_config(args, device)
    out = Path(args.out)
    if bool(args.pairs) == bool(args.query and args.refer):
        raise UserError("match: give QUERY REFER, or --pairs LIST.csv")
    check_writable(out / "homography.json")
    model = load_model(args.weights or default_model_name(), device)
    warn_size(model, cfg.size)
    if not args.pairs:
        doc = match_pair(model, args.query, args.refer, out, cfg)
        if doc["status"] != "registered":
            print(f"rkd: could not register the pair: {doc['reason']}", file=sys.stderr)
            return 1
        return 0
    # a series of visits: the model loaded once, each image's features computed once
    cache, summary = {}, []
    for row in read_pair_list(args.pairs):
        if row.error:
            print(f"rkd: {args.pairs}: {row.error}", file=sys.stderr)
            summary.append({"row": row.row, "query": "", "refer": "", "status": "error",
                            "reason": row.error})
            continue
        i, query, refer = row.row, row.query, row.refer
        folder = out / f"{i:03d}_{query.stem}__{refer.stem}"
        try:
            doc = match_pair(model, query, refer, folder, cfg, cache, quiet=args.quiet)
        except UserError as e:                 # one bad row: say so, go on with the others
            print(f"rkd: row {i}: {e}", file=sys.stderr)
            doc = {"status": "error", "reason": str(e), "inliers": None}
        summary.append({"row": i, "query": str(query), "refer": str(refer), "status": doc["status"],
                        "reason": doc.get("reason") or "", "inliers": doc.get("inliers"),
                        "folder": str(folder)})
    buf = io.StringIO()
    columns = ["row", "query", "refer", "status", "reason", "inliers", "folder"]
    writer = csv.DictWriter(buf, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(summary)
    write_atomic(out / "summary.csv", buf.getvalue().encode())
    registered = sum(r["status"] == "registered" for r in summary)
    print(f"registered {registered} of {len(summary)} pairs; summary: {out / 'summary.csv'}")
    return 0 if registered == len(summary) else 1


def cmd_labels(args):
    """Vessel-map junction labels written in the Lab layout, plus pictures to inspect them."""
    out = Path(args.out)
    check_writable(out / "ImageSets" / "train.txt")
    rows = []
    for root in args.vessels:
        samples = vessel_map_samples(root, dataclasses.replace(CFG, size=args.size))
        for s in progress(samples, f"labels {root}", args.quiet):
            name = f"{Path(root).name}_{s.path.stem}"
            image = read_image(s.path)
            write_png(out / "ImageData" / f"{name}.png", image)
            write_atomic(out / "Annotations" / f"{name}.txt", table_bytes(s.points, "{:.6f}"))
            image = to_uint8(image).copy()
            for x, y in unit_to_pixels(s.points, [image.shape[1], image.shape[0]]):
                cv2.circle(image, (round(x), round(y)), 5, (0, 255, 255), 2)
            write_png(out / "Pictures" / f"{name}.png", image)
            rows.append(f"{name}.png, {name}.txt")
    write_atomic(out / "ImageSets" / "train.txt", ("\n".join(rows) + "\n").encode())
    print(f"wrote {len(rows)} labelled images to {out}")


def cmd_selfwarp(args):
    device = pick_device(args.device)
    cfg = matching_config(args, device)
    paths = []
    for p in map(Path, args.images):
        paths += image_files(p) if p.is_dir() else [p]
    if not paths:
        raise UserError("selfwarp: no images found in " + " ".join(args.images))
    if args.json:
        check_writable(args.json)
    results = []
    for name in args.weights or [default_model_name()]:
        model = load_model(name, device)
        warn_size(model, cfg.size)
        rows = self_warp_check(model, paths, cfg, args.warps, quiet=args.quiet)
        accuracy = [r["nn_accuracy"] for r in rows if math.isfinite(r["nn_accuracy"])]
        statuses = {s: sum(r["status"] == s for r in rows)
                    for s in ("failed", "inaccurate", "acceptable")}
        summary = {"model": str(name), "arch": model.arch, "pairs": len(rows),
                   "nn_accuracy": float(np.mean(accuracy)) if accuracy else None,
                   "AUC": fire_auc([r["mean_error"] for r in rows]), **statuses}
        results.append({**summary, "rows": rows})
        nn = summary["nn_accuracy"]
        print(f"{name} ({model.arch}): {len(rows)} self-warp pairs of {len(paths)} images  "
              f"NN accuracy {nn if nn is None else round(nn, 4)}  AUC {summary['AUC']:.4f}  "
              f"failed {summary['failed']}  inaccurate {summary['inaccurate']}  "
              f"acceptable {summary['acceptable']}", flush=True)
    if args.json:
        doc = {"size": cfg.size, "warps": args.warps, "seed": SELF_WARP_SEED, "runs": results}
        write_atomic(args.json, json_bytes(doc))


def cmd_synth(args):
    counts = {"S": args.pairs, "P": args.pairs, "A": args.pairs}
    write_synthetic_fire(args.out, args.quiet, counts)
    print(f"wrote {3 * args.pairs} synthetic pairs in FIRE's layout to {args.out}")


def cmd_export(args):
    """Strip a training checkpoint down to its weights (fp16 by default) for shipping.

    Several checkpoints of one architecture export the mean of their weights: stochastic weight
    averaging (Izmailov et al. 2018) over the epochs of one run, or the midpoint of a warm start
    and where it ended (the "weight-space ensemble" of Wortsman et al. 2022). Neither paper's code
    averages, and no shipped file is a mean (README, "The training recipe": the averages tried
    fell short on validation). torch's AveragedModel keeps the running mean, so the checkpoints are
    never all in memory at once; epoch and config are the last file's. Raises UserError for a file
    that is not an rkd checkpoint, weights that do not fit its architecture, mixed architectures,
    or non-finite weights."""
    from torch.optim.swa_utils import AveragedModel
    mean = arch = ckpt = None
    for path in args.checkpoint:
        ckpt = load_checkpoint(path)
        if arch is not None and ckpt["arch"] != arch:
            raise UserError(f"{path}: holds {ckpt['arch']!r} weights, the others {arch!r}; "
                            "only one architecture's checkpoints can be averaged")
        model, arch = model_from_checkpoint(ckpt, path), ckpt["arch"]
        if not all(torch.isfinite(p).all() for p in model.state_dict().values()
                   if p.is_floating_point()):
            raise UserError(f"{path}: holds non-finite weights (a diverged run); not exported")
        if mean is None:
            mean = AveragedModel(model, use_buffers=True)
        mean.update_parameters(model)     # the first call copies, later ones keep the mean
        del model                         # free it before the next file loads
    model = mean.module                   # finite: a mean of finite weights
    extra = {"averaged": [str(p) for p in args.checkpoint]} if len(args.checkpoint) > 1 else {}
    save_checkpoint(args.out, model, fp16=not args.fp32, epoch=ckpt.get("epoch", 0),
                    config=ckpt.get("config", {}), **extra)
    data = Path(args.out).read_bytes()
    what = f"mean of {len(args.checkpoint)} checkpoints, " if extra else ""
    print(f"{args.out}: {arch}, {what}{len(data) / 1e6:.1f} MB, "
          f"sha256 {hashlib.sha256(data).hexdigest()}")


BENCH_VARIANTS = (("fp32", False, "fp32"), ("channels_last", True, "fp32"),
                  ("bf16", False, "bf16"), ("channels_last + bf16", True, "bf16"))


def cmd_bench(args):
    """Size, FLOPs, and in one run on the same threads, the time of a forward at --size and of a
    training step (SuperRetina's objective with PKE on --batch crops of --crop px) for each
    architecture in fp32, channels_last, bf16 and channels_last + bf16, with ratios to fp32."""
    device = pick_device(args.device)
    torch.manual_seed(0)
    x = torch.rand(1, 1, args.size, args.size, device=device)
    samples = [Sample("synthetic", synthetic_seed=i) for i in range(args.batch)]
    data = TrainingSet(samples, args.crop, quiet=True)
    maps = {i: np.zeros((args.crop, args.crop), np.uint8) for i in range(args.batch)}

    def timed(fn):
        fn()                                       # warm-up: allocations, oneDNN kernel choice
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.repeat):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / args.repeat

    print(f"device {device}, {torch.get_num_threads()} thread(s); forward: 1 x {args.size} px; "
          f"step: {args.batch} crops of {args.crop} px, PKE on")
    print("| arch | params (M) | GFLOPs | variant | forward s | ratio | step s | ratio |"
          "\n|---|---|---|---|---|---|---|---|")
    for arch in args.archs:
        base = None
        for label, channels_last, precision in BENCH_VARIANTS:
            if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
                continue
            torch.manual_seed(0)
            model = build_model(arch).to(device)
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
            cfg = dataclasses.replace(CFG, size=args.crop, crop=args.crop, precision=precision)
            model.eval()

            def forward():
                with torch.no_grad(), autocast(device, precision):
                    model(x)
            fwd = timed(forward)
            model.train()
            run = Run(model, model, torch.optim.Adam(model.parameters(), lr=1e-5),
                      torch.amp.GradScaler(device.type, enabled=False), cfg)
            gen = torch.Generator().manual_seed(0)

            def training_step():
                train_step(run, data, list(range(args.batch)), maps, True, gen)["detector"].item()
            step = timed(training_step)
            base = base or (fwd, step)
            print(f"| {arch} | {count_parameters(model) / 1e6:.2f} | "
                  f"{count_flops(model, args.size) / 1e9:.1f} | {label} | {fwd:.3f} | "
                  f"{base[0] / fwd:.2f}x | {step:.3f} | {base[1] / step:.2f}x |", flush=True)


def cmd_train_cnn(args):
    return train(args, distill=False)


def cmd_distill(args):
    return train(args, distill=True)


def build_parser():
    basic = argparse.ArgumentParser(add_help=False)          # every command
    basic.add_argument("--threads", type=int, default=0,
                       help="CPU threads for torch (default: 0 = torch's choice)")
    basic.add_argument("--quiet", action="store_true", help="no progress bars")
    common = argparse.ArgumentParser(add_help=False, parents=[basic])  # commands that run a network
    common.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where to run (default: auto = cuda if available)")
    shipped = [n for n in SHIPPED if (WEIGHTS_DIR / SHIPPED[n]).exists()]
    matching = argparse.ArgumentParser(add_help=False)
    matching.add_argument("--size", type=int, default=CFG.size,
                          help="network input side in px, a multiple of 8 (default: %(default)s)")
    matching.add_argument("--no-trick", action="store_true", help="skip the second matching stage")
    matching.add_argument("--method", default=CFG.method, choices=["lmeds", "ransac"],
                          help="homography estimator (default: %(default)s)")
    matching.add_argument("--ratio", type=float,
                          help=f"kNN ratio test (default: {CFG.ratio} for networks, "
                               f"{CFG.sift_ratio} for SIFT)")
    matching.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                          help="network arithmetic (default: auto = bf16 on CUDA, on CPUs with AMX "
                               "and on AMD CPUs with AVX-512 BF16, else fp32)")

    p = argparse.ArgumentParser(prog="rkd.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Run 'rkd.py COMMAND --help' for each command's flags.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    e = sub.add_parser("eval", parents=[common, matching],
                       help="score models on FIRE (or the synthetic benchmark)")
    e.add_argument("--fire",
                   help="FIRE folder in its own layout (default: the embedded synthetic benchmark)")
    e.add_argument("--weights", nargs="+",
                   help=f"checkpoint paths, shipped names {shipped} or 'sift'; several compare "
                        "(default: the best shipped beside sift)")
    e.add_argument("--json", help="write summary and per-pair results (with homographies) here")
    e.add_argument("--csv", help="write per-pair rows here")
    e.add_argument("--plots", help="folder for success-curve PNGs (all models on one figure)")
    e.add_argument("--show-pairs", action="store_true",
                   help="with --plots: also a match picture per pair")
    e.add_argument("--markdown", action="store_true", help="also print a markdown results table")
    e.set_defaults(func=cmd_eval)

    m = sub.add_parser("match", parents=[common, matching],
                       help="register one pair of your own photographs")
    m.add_argument("query", nargs="?", help="image to be mapped (moving), e.g. a follow-up visit")
    m.add_argument("refer", nargs="?", help="reference image (fixed), e.g. the baseline visit")
    m.add_argument("--pairs", help="CSV of 'query,refer' rows (paths relative to it): register "
                                   "them all, one folder each, plus summary.csv")
    m.add_argument("--out", required=True, help="output folder: homography.json, matches.png, "
                                                "aligned.png (the query in the reference's frame), "
                                                "checkerboard.png")
    m.add_argument("--weights",
                   help="checkpoint path, shipped name or 'sift' (default: best shipped)")
    m.set_defaults(func=cmd_match)

    def training_flags(t):
        t.add_argument("--synthetic", type=int, default=0,
                       help="number of synthetic labelled images (default: 0)")
        t.add_argument("--lab", nargs="+", help="folders in SuperRetina's Lab layout (labelled)")
        t.add_argument("--vessels", nargs="+",
                       help="photographs with manual vessel maps, labelled at their junctions: "
                            "DRIVE, CHASE_DB1 or HRF as their archives unpack, or images/ + "
                            "vessels/ (+ fov/)")
        t.add_argument("--unlabelled", nargs="+",
                       help="image folders without labels (train-cnn: the descriptor loss only; "
                            "distill: also the knowledge terms)")
        t.add_argument("--size", type=int, default=CFG.size,
                       help="training image side, px (default: %(default)s)")
        t.add_argument("--crop", type=int, default=0,
                       help="random crop side, px; 0 = whole image (default: 0)")
        t.add_argument("--epochs", type=int, default=CFG.epochs, help="(default: %(default)s)")
        t.add_argument("--batch", type=int, default=CFG.batch,
                       help="images per step, per process (default: %(default)s)")
        t.add_argument("--lr", type=float, default=CFG.lr,
                       help="Adam learning rate (default: %(default)s)")
        t.add_argument("--seed", type=int, default=CFG.seed, help="(default: %(default)s)")
        t.add_argument("--pke-start", type=int, default=CFG.pke_start,
                       help="epochs of plain label Dice before PKE and the consistency term start "
                            "(default: %(default)s)")
        t.add_argument("--grad-clip", type=float, default=CFG.grad_clip,
                       help="max gradient norm, 0 = off as SuperRetina (default: %(default)s)")
        t.add_argument("--augment", default="auto", choices=["auto", "on", "off"],
                       help="RKD's brightness/blur/contrast augmentation (default: auto = on for "
                            "lk and distill, off for SuperRetina's layout, as each paper's code)")
        t.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                       help="autocast precision; checkpoints stay fp32 (default: auto = bf16 on "
                            "CUDA, AMX CPUs and AMD CPUs with AVX-512 BF16, else fp32)")
        t.add_argument("--out", required=True,
                       help="run folder: last.pt every epoch, best.pt with --val")
        t.add_argument("--resume", help="continue from this checkpoint (last.pt): weights, "
                                        "optimizer, value maps")
        t.add_argument("--init", help="start from these weights (checkpoint or shipped name) with "
                                      "a fresh optimizer")
        t.add_argument("--detector-only", action="store_true",
                       help="train only the detector's decoder (the student's neck too); encoder "
                            "and descriptor head keep the --init/--resume weights")
        t.add_argument("--max-minutes", type=float, default=0,
                       help="stop after the epoch that passes N minutes; --resume continues "
                            "(default: no limit)")
        t.add_argument("--val", help="FIRE-layout folder scored after each epoch, the best epoch "
                                     "kept (use `synth` pairs: FIRE is a test set)")
        t.add_argument("--val-size", type=int, default=0,
                       help="model size for validation (default: --size)")

    t = sub.add_parser("train-cnn", parents=[common],
                       help="train a CNN teacher semi-supervised (SuperRetina)")
    t.add_argument("--arch", default="lk", choices=["lk", "superretina", "small_cnn"],
                   help="(default: %(default)s)")
    training_flags(t)
    t.set_defaults(func=cmd_train_cnn)

    d = sub.add_parser("distill", parents=[common],
                       help="train a student from a frozen teacher (RKD)")
    d.add_argument("--teacher",
                   help="teacher checkpoint or shipped name (not needed with --kd none)")
    d.add_argument("--student", default="vit_student",
                   choices=["vit_student", "small_cnn", "lk", "superretina"],
                   help="(default: %(default)s)")
    d.add_argument("--kd", default="both", choices=["both", "descriptor", "detector", "none"],
                   help="knowledge terms: both (RKD's), descriptor (triplet in the teacher's "
                        "descriptor space), detector (heatmap Dice), none (the transformer "
                        "trained directly) (default: %(default)s)")
    d.add_argument("--self-loss", default="on", choices=["on", "off"],
                   help="also the student's own losses (default: %(default)s)")
    training_flags(d)
    d.set_defaults(func=cmd_distill)

    sw = sub.add_parser("selfwarp", parents=[common, matching],
                        help="validation off FIRE: register held-out photographs to known random "
                             "warps of themselves")
    sw.add_argument("images", nargs="+", help="images or folders the models were not trained on")
    sw.add_argument("--weights", nargs="+", help="as eval's (default: best shipped)")
    sw.add_argument("--warps", type=int, default=8,
                    help="random homographies per image (default: %(default)s)")
    sw.add_argument("--json", help="write per-pair results here")
    sw.set_defaults(func=cmd_selfwarp)

    lb = sub.add_parser("labels", parents=[basic],
                        help="derive keypoint labels from vessel maps (Lab layout + pictures)",
                        description="Writes, under --out: ImageData/ (the photographs), "
                                    "Annotations/ (one 'x y' row per junction, normalised to "
                                    "0..1), ImageSets/train.txt ('image, label' rows) -- "
                                    "SuperRetina's Lab layout, for --lab -- and Pictures/ (the "
                                    "junctions drawn).")
    lb.add_argument("--vessels", nargs="+", required=True,
                    help="DRIVE, CHASE_DB1 or HRF as their archives unpack, or images/ + "
                         "vessels/ (+ fov/)")
    lb.add_argument("--out", required=True, help="output folder: ImageData/, Annotations/, "
                                                 "ImageSets/train.txt, Pictures/")
    lb.add_argument("--size", type=int, default=CFG.size,
                    help="model size whose NMS radius merges junctions (default: %(default)s)")
    lb.set_defaults(func=cmd_labels)

    sy = sub.add_parser("synth", parents=[basic],
                        help="write a synthetic benchmark in FIRE's layout")
    sy.add_argument("--out", required=True, help="output folder")
    sy.add_argument("--pairs", type=int, default=4,
                    help="pairs per category (default: %(default)s)")
    sy.set_defaults(func=cmd_synth)

    ex = sub.add_parser("export", parents=[basic],
                        help="strip a checkpoint to shippable weights (several: their mean)")
    ex.add_argument("checkpoint", nargs="+",
                    help="training checkpoint or weights file; several: the mean of their weights")
    ex.add_argument("out")
    ex.add_argument("--fp32", action="store_true",
                    help="keep fp32 (default: fp16, loaded back as fp32)")
    ex.set_defaults(func=cmd_export)

    b = sub.add_parser("bench", parents=[common],
                       help="forward and training-step time per architecture and precision")
    b.add_argument("--size", type=int, default=CFG.size,
                   help="forward input side, px (default: %(default)s)")
    b.add_argument("--crop", type=int, default=128,
                   help="training-step crop side, px (default: %(default)s)")
    b.add_argument("--batch", type=int, default=4,
                   help="training-step crops (default: %(default)s)")
    b.add_argument("--repeat", type=int, default=3,
                   help="timed repetitions after one warm-up (default: %(default)s)")
    b.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    b.set_defaults(func=cmd_bench)
    return p


def check_arguments(args):
    """Flag values argparse cannot check -> UserError."""
    size, crop = getattr(args, "size", 8), getattr(args, "crop", 0)
    if size <= 0 or size % 8 or crop < 0 or crop % 8 or crop > size:
        raise UserError("--size must be a positive multiple of 8, and --crop a multiple of 8 no "
                        "larger than --size")
    if getattr(args, "val_size", 0) < 0 or getattr(args, "val_size", 0) % 8:
        raise UserError("--val-size must be a multiple of 8")
    if getattr(args, "kd", "none") != "none" and not args.teacher:
        raise UserError(f"distill --kd {args.kd} needs --teacher (a checkpoint or shipped name)")
    if getattr(args, "max_minutes", 0) < 0 or getattr(args, "grad_clip", 0) < 0:
        raise UserError("--max-minutes and --grad-clip must be 0 or more")
    if getattr(args, "init", None) and getattr(args, "resume", None):
        raise UserError("give --init (weights, fresh optimizer) or --resume (the whole run), "
                        "not both")
    if getattr(args, "detector_only", False):
        if not (args.init or args.resume):
            raise UserError("--detector-only fine-tunes a trained network: give --init or "
                            "--resume")
        if getattr(args, "kd", "none") == "descriptor" and args.self_loss == "off":
            raise UserError("--detector-only with --kd descriptor --self-loss off leaves no loss "
                            "on the detector")
    if getattr(args, "pke_start", 0) < 0:
        raise UserError("--pke-start must be 0 or more")
    for flag in ("batch", "repeat", "epochs", "pairs", "warps"):
        value = getattr(args, flag, 1)
        if isinstance(value, int) and value < 1:
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
    except (MemoryError, RuntimeError) as e:   # torch reports a failed allocation as RuntimeError
        text = str(e).lower()
        if not isinstance(e, MemoryError) and "memory" not in text and "alloc" not in text:
            raise
        print("rkd: error: out of memory: try a smaller --size (or --batch / --crop when training)",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rkd: interrupted (the last checkpoint is whole; --resume continues from it)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    code = main()
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        # A torchrun rank that returns from main() leaves without the interpreter's teardown.
        # In torch 2.14.1 a gloo process group that DistributedDataParallel has wrapped stays
        # alive in C++ after destroy_process_group (its two pt_gloo_runloop threads and
        # gloo_tcp_loop remain, seen with gdb; a bare all_reduce leaves none), and in 2 of 106
        # two-rank test runs a rank aborted after the ranks had agreed and the checkpoint was
        # written ("terminate called without an active exception", SIGABRT): most likely in
        # that teardown, though not caught in the act, and reruns at that rate cannot show it
        # gone. Every file is closed by now (write_atomic); only the streams need flushing.
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except OSError:                          # a closed pipe: nothing left to tell
            pass
        os._exit(code)
    sys.exit(code)
