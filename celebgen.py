"""
CelebGen: a rectified-flow diffusion transformer (DiT) that learns to draw CelebA faces, in a file.

Part one is the algorithm, in the order the data flows; part two trains and samples it; part three
keeps runs safe (checks, Ctrl-C, atomic writes, CelebA's layouts, caches): skip it. A tag such as
`# C` beside a call names the section of part three (A to H) that holds the function called.

    # CPU quickstart: toy faces drawn on the fly, no download; 4 minutes, with attributes
    python celebgen.py train --exp_name quickstart --dataset toy --max_minutes 4 --attributes all
    python celebgen.py sample --exp_name quickstart --num_samples 64
    python celebgen.py sample --exp_name quickstart --grid --cfg_scale 0 1 3 \\
        --attributes Blond_Hair=1 Eyeglasses=1 Wearing_Hat=1 Smiling=1,Eyeglasses=0
    # CelebA 32x32 on a CPU with the defaults (RESULTS.md's recipe); --compile needs a C++ compiler
    python celebgen.py train --exp_name celeba32 --data_root ./data --compile --max_minutes 20
    # CelebA 64x64 on 8 GPUs (DDP over NCCL; several machines: README): DiT-S, DiT's lr and EMA
    python celebgen.py train --exp_name celeba64 --data_root ./data --nproc 8 --model small \\
        --image_size 64 --batch_size 32 --lr 1e-4 --ema_decay 0.9999
    # continue an interrupted run exactly where its last checkpoint left it
    python celebgen.py train --exp_name celeba64 --resume
    # faces on request: condition on CelebA's labels, then ask (guidance weight 2 by default)
    python celebgen.py train --exp_name attr32 --data_root ./data --attributes Smiling,Male
    python celebgen.py sample --exp_name attr32 --attributes Smiling=1,Male=0
Each command says early on which device and precision it chose, and why.
"""

import argparse
import copy
import math
import os
import signal
import time
from collections import namedtuple
from contextlib import nullcontext
from pathlib import Path

if __name__ == "__main__":  # until main(): Ctrl-C while torch loads (seconds) ends it, quietly
    signal.signal(signal.SIGINT, signal.SIG_DFL)
import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from scipy.optimize import linear_sum_assignment
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler


class UserError(Exception):
    """Bad input. The CLI prints it as one line `error: ...` and exits with status 2."""


# ==================================================================================================
#                                   PART ONE: THE ALGORITHM
# ==================================================================================================

# --------------------------------------------------------------------------------------------------
#                                   1. The straight path from noise to image
# --------------------------------------------------------------------------------------------------
# Rectified flow joins noise x0 ~ N(0, I) (at t=0) and an image x1 (at t=1) by a straight line
#     x_t = t x1 + (1 - t) x0,            whose velocity is    v = dx_t/dt = x1 - x0.
# Training shows the network x_t at a random t and asks which image it is heading to (sections 5-6);
# sampling starts from noise and follows the predicted velocity to t = 1 (section 7). Images are
# tensors (B, 3, H, W) in [-1, 1], of the same order as the noise, whose standard deviation is 1.
# Times come from a logit-normal, t = sigmoid(mu + sigma * n) with n ~ N(0, 1): the defaults,
# mu = -0.4 and sigma = 0.8, put 69% of the times at t < 0.5, the noisy end, where the coarse
# structure of a face is decided (chosen by FID, the usual score of generated images: RESULTS.md).

def logit_normal(n, mu, sigma):
    """Map standard normal draws n to times t = sigmoid(mu + sigma * n) in (0, 1)."""
    return torch.sigmoid(mu + sigma * torch.as_tensor(n, dtype=torch.float32))


def interpolate(x1, x0, t):
    """x_t = t x1 + (1 - t) x0 with t (B,) broadcast over (B, C, H, W)."""
    t = t.view(-1, 1, 1, 1)
    return t * x1 + (1 - t) * x0


# --------------------------------------------------------------------------------------------------
#                                   2. Patches: an image as a sequence of tokens
# --------------------------------------------------------------------------------------------------
# A transformer reads a sequence of vectors ("tokens"). The image is cut into p x p patches, read in
# row-major order; each patch's p*p*3 numbers become one token (section 5 maps them linearly to
# the model's width D). A 32x32 image with p = 4 is an 8 x 8 grid of N = 64 tokens of 48 numbers.

def patchify(x, p):
    """(B, C, H, W) -> (B, N, p*p*C) with N = (H/p)(W/p) tokens in row-major order."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)  # (B, H/p, W/p, p, p, C)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(x, p, grid):
    """(B, N, p*p*C) -> (B, C, grid*p, grid*p), the inverse of patchify."""
    B = x.shape[0]
    x = x.reshape(B, grid, grid, p, p, -1).permute(0, 5, 1, 3, 2, 4)  # (B, C, grid, p, grid, p)
    return x.reshape(B, -1, grid * p, grid * p)


# --------------------------------------------------------------------------------------------------
#                                   3. RoPE: where a token is, as a rotation
# --------------------------------------------------------------------------------------------------
# Attention (section 4) lets every token look at every other. Each token emits a query q and a key
# k, and token i takes from token j in proportion to exp(q_i . k_j / sqrt(d)) -- in several
# independent "heads", each working on its own slice of d = 64 channels. Nothing in that formula
# says where a token is. Rotary embeddings (RoPE) say it: before the product, rotate pairs of q's
# and k's channels by angles m*w_k, m the token's position, with a geometric bank of frequencies
# w_k. Because rotations satisfy R(a)^T R(b) = R(b - a),
#     <R(m*w) q, R(n*w) k> = <q, R((n - m)*w) k>,
# so an attention logit sees only the *difference* of positions. For images we use axial 2D RoPE:
# half of each head's rotation pairs turn with the patch's row, the other half with its column.
#
# Design note, why time is NOT a rotation: rotating every query and key by the same time angle t*w
# shifts all positions alike and leaves each difference (n - m) as it was, so the logits, and with
# them attention, would not see t at all. Time enters through AdaIN-Zero (section 4) instead.

def frequency_bank(n, base):
    """w_k = base^(-k/n) for k = 0..n-1, shape (n,): from 1 radian per unit to almost 1/base."""
    return base ** (-torch.arange(n, dtype=torch.float32) / n)


def rope_angles(rows, cols, head_dim, base=100.0):
    """Axial 2D RoPE angles for tokens at patch coordinates rows, cols (N,) each -> (N, head_dim/2).
    The first head_dim/4 pairs rotate by row*w_k, the last head_dim/4 by col*w_k. With
    base=100 and head width 64 the fastest pair turns 1 radian per patch (a full turn every ~6
    patches: fine offsets) and the slowest 0.0133: across grids of 8, 16 and 32 patches (offsets up
    to 7, 15, 31) the slowest turns 0.09, 0.20 and 0.41 radians, never half a turn, so it tells
    near from far up to 32 x 32."""
    w = frequency_bank(head_dim // 4, base)                                     # (head_dim/4,)
    return torch.cat([rows.float()[:, None] * w, cols.float()[:, None] * w], -1)  # (N, head_dim/2)


def apply_rope(x, angles):
    """Rotate the channel pairs (x_2k, x_2k+1) of x (B, h, N, d), h heads, by angles a_k (N, d/2).
    As complex numbers z_k = x_2k + i x_2k+1 (as LLaMA), a rotation by a is a product with e^(ia):
        z_k e^(ia) = (x_2k cos a - x_2k+1 sin a) + i (x_2k sin a + x_2k+1 cos a),
    one complex product per pair, in fp32 (PyTorch has no bf16 complex type; the caller casts)."""
    z = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))        # (B, h, N, d/2) complex
    rotation = torch.view_as_complex(torch.stack([angles.cos(), angles.sin()], -1))  # (N, d/2)
    return torch.view_as_real(z * rotation).flatten(-2)                # (B, h, N, d) fp32


# --------------------------------------------------------------------------------------------------
#                                   4. AdaIN-Zero block (DiT's adaLN-Zero)
# --------------------------------------------------------------------------------------------------
# Each block is attention and an MLP, each wrapped as
#     x <- x + gate * f( LayerNorm(x) * (1 + scale) + shift )
# where (shift, scale, gate) are regressed from the condition c (time; attributes below): so the
# network knows how noisy its input is. The name: adaptive instance normalisation (AdaIN, from
# style transfer) normalises each channel over an image's positions, then lets a condition choose
# its scale and shift; DiT's adaLN, used here, normalises each token over its channels instead.
# "Zero": the layer that produces (shift, scale, gate) starts at zero, so gate = 0 and every
# block is the identity at initialisation -- a deep stack starts as a shallow, well-behaved network
# and grows into its depth. The time embedding c starts from the features
# [cos(1000 t w_k), sin(1000 t w_k)], w_k a frequency bank like RoPE's with base 10,000.
# Faces on request ride the same path: a vector a of CelebA attributes (Smiling, Eyeglasses, ...),
# each -1 (absent), +1 (present) or 0 (unspecified), is embedded linearly and added to c,
#     c = time_mlp(time_features(t)) + W a,       a (K,), W (D, K), c (D,) per sample,
# as DiT adds its class embedding. W has no bias, so a = 0 -- nothing asked -- adds nothing: the
# same network is the unconditional model.

def time_features(t, dim, base=10_000.0):
    """[cos(1000 t w), sin(1000 t w)] for t in [0, 1]: (B,) -> (B, dim). The factor 1000 makes the
    fastest frequency turn many times over [0, 1], as DiT's embedding of timesteps 0..999 does."""
    angles = 1000.0 * t.float()[:, None] * frequency_bank(dim // 2, base).to(t.device)  # (B, dim/2)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)                              # (B, dim)


def modulate(x, shift, scale):
    """The modulation: x * (1 + scale) + shift, a per-sample (B, D) shift and scale over tokens."""
    return x * (1 + scale[:, None]) + shift[:, None]                          # (B, N, D)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        # Per-head LayerNorm on q and k ("QK-norm", as ViT-22B): each becomes a vector of mean 0 and
        # RMS at most 1 times a learned gain (per channel of a head, shared by the heads), so, RoPE
        # keeping lengths, |q.k| / sqrt(d) <= sqrt(d) max|gain_q| max|gain_k|: the logits grow only
        # as the gains do, not with the activations, which bf16 or a high learning rate can blow up.
        self.q_norm = nn.LayerNorm(dim // heads, eps=1e-6, bias=False)
        self.k_norm = nn.LayerNorm(dim // heads, eps=1e-6, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope):
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.heads, D // self.heads)           # (B, N, 3, h, D/h)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                        # (B, h, N, D/h) each, h heads
        q = apply_rope(self.q_norm(q), rope).to(v.dtype)                      # (B, h, N, D/h)
        k = apply_rope(self.k_norm(k), rope).to(v.dtype)                      # (B, h, N, D/h)
        x = F.scaled_dot_product_attention(q, k, v)                           # (B, h, N, D/h)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))                  # (B, N, D)


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_ratio=4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)  # modulate is the affine
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        # DiT's MLP, with the exact GELU x Phi(x) instead of DiT's tanh approximation of it
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(),
                                 nn.Linear(mlp_ratio * dim, dim))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        # the "Zero" in AdaIN-Zero: gate = 0, so the block is the identity
        nn.init.zeros_(self.modulation[-1].weight)
        nn.init.zeros_(self.modulation[-1].bias)

    def forward(self, x, c, rope):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).chunk(6, -1)  # (B, D)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1), rope)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))  # (B, N, D)


# --------------------------------------------------------------------------------------------------
#                                   5. DiT: a transformer on patches that predicts the clean image
# --------------------------------------------------------------------------------------------------
# Patch tokens -> linear embedding to width D -> blocks -> a modulated LayerNorm (no gate) -> linear
# to p*p*3 numbers per token -> patches. The network predicts the *clean image* x1 (not the noise,
# not the velocity): a clean image lies on the low-dimensional manifold of faces, which a network of
# width D can represent, while noise fills all p*p*3 dimensions of a patch (the argument of JiT,
# "Back to Basics: Let Denoising Generative Models Denoise", Li & He 2025), which matters most when
# a patch holds more numbers than a token's width (JiT's 32x32 patches at 512x512: 3,072 for a
# width of 768); here a 4x4 patch's 48 fit in D = 192, and sections 6 and 7 build on x all the same.

# named sizes: width, depth and heads (head width 64 throughout); parameters at 4x4 patches
MODELS = {
    "tiny": dict(dim=192, depth=6, heads=3),     # the default, for CPUs (4.2M parameters)
    "small": dict(dim=384, depth=12, heads=6),   # DiT-S: for CelebA 64x64 on GPUs (33M)
    "base": dict(dim=768, depth=12, heads=12),   # DiT-B, for multi-GPU runs (130M)
}
TIME_FEATURES = 256  # width of the [cos, sin] time features fed to the conditioning MLP


class DiT(nn.Module):
    def __init__(self, image_size, patch_size, dim, depth, heads, num_attributes=0):
        super().__init__()
        self.patch_size, self.grid = patch_size, image_size // patch_size
        self.patch_embed = nn.Linear(3 * patch_size**2, dim)  # a patch: p*p RGB pixels
        self.time_mlp = nn.Sequential(nn.Linear(TIME_FEATURES, dim), nn.SiLU(), nn.Linear(dim, dim))
        # W a of section 4; None in an unconditional model, whose weights then have no such key
        self.attribute_embed = nn.Linear(num_attributes, dim, bias=False) if num_attributes \
            else None
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.out = nn.Linear(dim, 3 * patch_size**2)
        for layer in (self.final_modulation[-1], self.out):  # as DiT: predicts 0 at first
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        rows, cols = torch.meshgrid(torch.arange(self.grid), torch.arange(self.grid), indexing="ij")
        self.register_buffer("rope", rope_angles(rows.flatten(), cols.flatten(), dim // heads),
                             persistent=False)                                 # (N, head_dim/2)

    def forward(self, x_t, t, attributes=None):
        """x_t (B, C, H, W) at times t (B,), attributes (B, K) in {-1, 0, 1} or None (all 0)
        -> predicted clean image (B, C, H, W)."""
        x = self.patch_embed(patchify(x_t, self.patch_size))                 # (B, N, D)
        c = self.time_mlp(time_features(t, TIME_FEATURES))                    # (B, D)
        if self.attribute_embed is not None and attributes is not None:
            c = c + self.attribute_embed(attributes)                          # (B, D)
        for block in self.blocks:
            x = block(x, c, self.rope)                                        # (B, N, D)
        shift, scale = self.final_modulation(c).chunk(2, dim=-1)              # (B, D) each
        x = self.out(modulate(self.final_norm(x), shift, scale))             # (B, N, p*p*C)
        return unpatchify(x, self.patch_size, self.grid)                      # (B, C, H, W)


def build_model(args):
    return DiT(args.image_size, args.patch_size, **MODELS[args.model],
               num_attributes=len(args.attributes))


# --------------------------------------------------------------------------------------------------
#                                   6. Loss: x-prediction -> velocity -> v-loss
# --------------------------------------------------------------------------------------------------
# The network predicts the clean image x_pred (section 5). Since x0 = (x_t - t x1) / (1 - t), the
# velocity is v = (x1 - x_t) / (1 - t) without x0; with the prediction in place of x1,
#     v_pred = (x_pred - x_t) / max(1 - t, t_eps),     v_target = (x1 - x_t) / max(1 - t, t_eps),
#     loss = || v_pred - v_target ||^2 = || x_pred - x1 ||^2 / max(1 - t, t_eps)^2:
# an x-loss weighted by 1 / (1 - t)^2, unbounded as t -> 1, so capped at 1 / t_eps^2: 25 with the
# default t_eps = 0.2, which sampled no worse by FID at 32x32 than JiT's 0.05 (400; RESULTS.md). For
# 1 - t >= t_eps the target is exactly x1 - x0; beyond (t > 0.8: 1.28% of the training times) it
# is clamped like the prediction, as in JiT, so the loss is still smallest at x_pred = x1 -- which
# the sampler assumes when, at its last steps, it turns x_pred into a velocity without the clamp.
# Why not v_pred = x_pred - x0 with the true noise? That is exactly x_pred - x1 + (x1 - x0), so the
# loss collapses to a plain unweighted x-loss -- and at sampling time x0 is unknown anyway.

def velocity(x_pred, x_t, t, t_eps):
    """v = (x_pred - x_t) / max(1 - t, t_eps): the velocity implied by a clean-image prediction."""
    return (x_pred - x_t) / (1 - t).clamp_min(t_eps).view(-1, 1, 1, 1)


def flow_loss(model, x1, x0, t, t_eps, attributes=None):
    x_t = interpolate(x1, x0, t)                                              # (B, C, H, W)
    x_pred = model(x_t, t, attributes).float()  # the loss in fp32, also under autocast
    v_pred = velocity(x_pred, x_t, t, t_eps)                                  # (B, C, H, W)
    v_target = velocity(x1, x_t, t, t_eps)  # = x1 - x0 wherever 1 - t >= t_eps  (B, C, H, W)
    return F.mse_loss(v_pred, v_target)


# Pairing noise with images (immiscible diffusion, Li et al. 2024; minibatch optimal transport).
# Drawn independently, a batch's noise x0 and images x1 are paired at random: an x_t lies on paths
# to many images, and the model learns their blurred average. So each image takes the noise of the
# assignment that minimises the batch's total squared distance (off: --no_pair_noise),
#     min over permutations P of  sum_i || x1_i - x0_P(i) ||^2:
# only the pairs change (the noises are draws of N(0, I), as sampling's); lower FID: RESULTS.md.

def pair_noise(x1, x0, rank, world_size):
    """x0 (B, C, H, W) reassigned to the images so that the sum of ||x1_i - x0_i||^2 over the
    global batch (every process's images: `gathered`, Part three B) is the smallest of any order;
    every process solves the same assignment, so W processes pair as one with W times the batch."""
    x1_all, x0_all = (gathered(x, world_size).flatten(1) for x in (x1, x0))  # (W B, C H W) each
    cost = torch.cdist(x1_all.float(), x0_all.float()).pow(2)                # (W B, W B)
    _, order = linear_sum_assignment(cost.cpu().numpy())  # image i gets noise order[i]
    mine = torch.from_numpy(order[rank * len(x1):(rank + 1) * len(x1)]).to(x0.device)  # (B,)
    return x0_all[mine].view_as(x0)                                           # (B, C, H, W)


# Training for guidance. To be steered by attributes at sampling time (section 7), one network must
# know three things at once: p(x | a), p(x | some of a) and p(x). So each training example hides
# each of its attributes with probability p_each (set to 0, unspecified), and all of them with
# probability p_all -- 0.1 each by default, the rate at which DiT drops its class label. An
# attribute is then unspecified with probability p_all + (1 - p_all) p_each (tested).

def drop_attributes(attributes, p_each, p_all, rng):
    """(K,) attribute values, each set to 0 with probability p_each, all with p_all; rng: numpy."""
    keep = (rng.random(attributes.shape) >= p_each) & (rng.random() >= p_all)         # (K,)
    return torch.where(torch.from_numpy(keep), attributes, 0.0)                       # (K,)


# --------------------------------------------------------------------------------------------------
#                                   7. Sampler: integrate the velocity from noise to image
# --------------------------------------------------------------------------------------------------
# Generation solves dx/dt = v(x, t) from x(0) = noise to t = 1 over times 0 = t_0 < ... < t_S = 1.
# Euler:
#     x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i).
# Heun averages that slope with the slope at the Euler guess (second order, two model calls per
# step); multistep (below) reuses the previous step's prediction (second order, one call). On a
# perfectly straight path (a model that always predicts the same image) the velocity is constant
# and Euler is exact: the straighter the paths the model has learnt, the fewer steps it needs.
# Every step starts at t < 1 (time_grid sees to it), so no clamp is needed (t_eps = 0); Euler's last
# step lands on the model's clean-image prediction. Heun's last step is Euler: v(x, 1) divides by 0.
#
# Classifier-free guidance (CFG) turns a request up. For attributes a the network gives a
# conditional prediction x_c = model(x_t, t, a) and an unconditional one x_u = model(x_t, t, 0)
# (section 6 trained it for both), and CFG follows the velocity
#     v = v_u + w (v_c - v_u):        w = 0 unconditional, w = 1 plainly conditional, and w > 1
# exaggerates whatever tells a apart from "any face". Since v = (x_pred - x_t) / (1 - t) is affine
# in x_pred at fixed (x_t, t), and the weights 1 - w and w sum to 1,
#     v_u + w (v_c - v_u) = ((x_u + w (x_c - x_u)) - x_t) / (1 - t),
# so guiding the velocity is guiding the prediction, which is the one line below (tested). w = 0 and
# w = 1 need one network call; any other w runs both in one batch of 2B.

def guided_prediction(model, x_t, t, attributes, cfg_scale):
    """x_pred (B, C, H, W) at x_t (B, C, H, W), t (B,), for attributes (B, K) or None (none asked),
    guided with weight cfg_scale."""
    if attributes is None:
        return model(x_t, t).float()
    if cfg_scale == 1:
        return model(x_t, t, attributes).float()
    unconditional = torch.zeros_like(attributes)                              # (B, K)
    if cfg_scale == 0:
        return model(x_t, t, unconditional).float()
    x_c, x_u = model(torch.cat([x_t, x_t]), torch.cat([t, t]),
                     torch.cat([attributes, unconditional])).float().chunk(2)  # (B, C, H, W) each
    return x_u + cfg_scale * (x_c - x_u)                                      # (B, C, H, W)


# Autoguidance (Karras et al., 2024) guides a model by a weaker version of itself: the same run
# at GUIDE_AT of its steps or minutes, saved then as guide.pt (section 10), its EMA guiding the
# EMA. It errs where the model does, only more, so   x_pred = x_guide + w (x_model - x_guide)
# with w > 1 steps away from those errors. Sampling uses it (w = 1.5) by default for a model
# without attributes.

GUIDE_AT = 0.25  # of the fractions tried, the one good after both 10 and 20 minutes (RESULTS.md)


class Autoguided(nn.Module):
    """The model guided by a weaker `guide` with `weight`; called as the model is."""
    def __init__(self, model, guide, weight):
        super().__init__()
        self.model, self.guide, self.weight = model, guide, weight
        self.grid, self.patch_size = model.grid, model.patch_size  # the image size, for generate

    def forward(self, x_t, t, attributes=None):
        x_guide = self.guide(x_t, t, attributes).float()                      # (B, C, H, W)
        return x_guide + self.weight * (self.model(x_t, t, attributes).float() - x_guide)


# Where the steps go: t_i = 1 - (1 - i/S)^p, uniform for p = 1, shrinking towards the image for
# p > 1. A last step from low t lands on a blurred prediction; each step from above t = 0.95, where
# section 1's logit-normal draws almost no training times, moves x towards a prediction with its
# contrast raised (RESULTS.md). The default trades the two: the last step starts at t_{S-1} =
# 1 - S^-p = 0.98, p = min(2, log(1 / 0.02) / log S) (1.70 at 10 steps, 1.31 at 20, 1 at 50, and
# below 1 beyond: no step starts above 0.98); fewer than 8 steps keep p = 2, lest the first be huge.

LAST_STEP_FROM = 0.98  # within 1 FID of the best grid tried at 10, 20 and 50 steps (RESULTS.md)


def time_grid(num_steps, power=None):
    """The S + 1 = num_steps + 1 times t_i = 1 - (1 - i/S)^power, from 0 to 1 (floats); power None:
    the one whose last step starts at LAST_STEP_FROM, at most 2 (S = 1: [0, 1] at any power)."""
    if power is None:
        power = min(2.0, math.log(1 / (1 - LAST_STEP_FROM)) / math.log(max(num_steps, 2)))
    u = torch.linspace(0, 1, num_steps + 1, dtype=torch.float64)                   # (S + 1,)
    times = (1 - (1 - u) ** power).tolist()
    if num_steps > 1 and np.float32(times[-2]) == 1:  # the model's t is float32: 1 - t = 0
        raise UserError(f"--time_power {power:g} at {num_steps} steps starts a step at t = 1 in "
                        f"float32: lower --time_power or --num_sampling_steps")
    return times


# Multistep (--method multistep): second order at one model call per step. Written with the
# prediction x_pred(t) along the path, dx/dt = (x_pred - x) / (1 - t), so d/dt [x / (1 - t)] =
# x_pred / (1 - t)^2 and, with r = (1 - t_{i+1}) / (1 - t_i),
#     x_{i+1} = r x_i + (1 - t_{i+1}) * integral over [t_i, t_{i+1}] of x_pred(s) / (1 - s)^2 ds.
# x_pred held at x_pred(t_i) gives r x_i + (1 - r) x_pred(t_i): Euler's step, exactly. x_pred on the
# line in t through the last two predictions, of slope g = (x_pred(t_i) - x_pred(t_{i-1})) /
# (t_i - t_{i-1}), adds (1 - t_i) (1 - r + r ln r) g (r ln r = 0 at r = 0: the last step lands on
# the line at t = 1); the first step is Euler's. DPM-Solver++(2M) (Lu et al. 2022) draws the line
# in lambda = ln(t / (1 - t)) instead: half the log of the signal-to-noise ratio t^2 / (1 - t)^2.

@torch.no_grad()
def sample(model, noise, times, method="euler", attributes=None, cfg_scale=1.0):
    """noise (B, C, H, W) at t = 0 -> images (B, C, H, W) at t = 1, by `method` between the times
    (time_grid), asking for attributes (B, K) (or None) with guidance weight cfg_scale."""
    x, t_before, x_pred_before = noise.float(), None, None  # the previous step's, for multistep

    def predict(x, t):  # (x_pred, v), each (B, C, H, W)
        t = torch.full((x.shape[0],), t, device=x.device)
        x_pred = guided_prediction(model, x, t, attributes, cfg_scale)
        return x_pred, velocity(x_pred, x, t, t_eps=0.0)

    for t, t_next in zip(times[:-1], times[1:]):
        x_pred, v_t = predict(x, t)
        if method == "heun" and t_next < 1:
            v_t = 0.5 * (v_t + predict(x + (t_next - t) * v_t, t_next)[1])
        x_next = x + (t_next - t) * v_t
        if method == "multistep" and t_before is not None:  # the Multistep comment's g term
            r, slope = (1 - t_next) / (1 - t), (x_pred - x_pred_before) / (t - t_before)
            x_next += (1 - t) * (1 - r + (r * math.log(r) if r > 0 else 0.0)) * slope
        x, t_before, x_pred_before = x_next, t, x_pred
    return x


# ==================================================================================================
#                                   PART TWO: TRAINING AND SAMPLING
# ==================================================================================================

# --------------------------------------------------------------------------------------------------
#                                   8. Data: CelebA and toy faces, as tensors in [-1, 1]
# --------------------------------------------------------------------------------------------------
# CelebA's official layout: its 202,599 aligned 178x218 JPEGs in img_align_celeba/, a split file
# list_eval_partition.txt mapping each to 0 (train), 1 (val) or 2 (test), and list_attr_celeba.txt
# with 40 labels of -1/1 per image (Part three, D, reads them, the other layouts, and downloads).
# The CelebA-64 preprocessing of DDIM, PNDM and U-ViT crops a 128x128 box centred at (x=89, y=121)
# and resizes it (load_pixels, D): the same crop makes FIDs comparable with published ones. Toy
# faces (G) are drawn, not read, with four exact labels: the quickstart and tests run anywhere.

CELEBA_CROP = (89 - 64, 121 - 64, 89 + 64, 121 + 64)  # (left, top, right, bottom) in 178x218
SPLITS = {"train": 0, "val": 1, "test": 2}


def to_signed(pixels):
    """uint8 pixels in [0, 255] -> floats in [-1, 1], the range the model sees."""
    return pixels.float() / 127.5 - 1


class CelebA(Dataset):
    """CelebA (or any folder of images) at size x size: dataset[i] is image i, dataset.label(i)
    its values of `attributes` (names: ATTRIBUTE_NAMES, D). cache=True reads the pixels from the
    image cache once it has been built (Part three, E). An unreadable file is reported once and
    replaced by the next image (and its label), so one bad JPEG never stops a run mid-epoch."""

    def __init__(self, root, split, size, attributes=(), download=False, cache=False):
        if download:
            download_celeba(root)                                  # Part three, D
        self.files, self.size, self.reported = celeba_files(root, split), size, set()  # D
        self.labels, self.unlabelled = celeba_labels(root, self.files, attributes)    # D: (N, K)
        self.cache, self.pixels = (find_cache(self) if cache else None), None  # E: memmap, later

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        if not 0 <= i < len(self.files):
            raise IndexError(i)  # ends `for image in dataset`
        return to_signed(read_or_skip(self, i))  # D: an unreadable file gives the next image

    def label(self, i):
        """(K,) attribute values of image i: -1 absent, +1 present, 0 unspecified; no image is
        decoded. An unreadable image gives its replacement's label (D)."""
        return self.labels[readable_index(self, i)]

    def __getstate__(self):  # a DataLoader worker started by spawn (macOS) maps the cache itself
        return {**self.__dict__, "pixels": None}


def make_dataset(args, split, cache=True):
    """A split's images; CelebA's training split, read every epoch, via its cache if cache=True."""
    if args.dataset == "toy":
        offset = {"train": 0, "val": 10**6, "test": 2 * 10**6}[split]  # three disjoint sets
        return ToyFaces(args.image_size, offset=offset, attributes=args.attributes)
    train = split == "train"
    return CelebA(args.data_root, split, args.image_size, args.attributes,
                  download=args.download and train, cache=cache and train)


# --------------------------------------------------------------------------------------------------
#                                   9. Precision: bf16, fp16 or fp32
# --------------------------------------------------------------------------------------------------
# Under autocast every matmul (each Linear, attention's products) runs in a 16-bit type. Autocast
# casts each op's inputs, not the model: weights, gradients and AdamW's moments stay fp32. But an
# op's output keeps the op's dtype, so the residual stream itself (every block's output) is 16-bit
# too; flow_loss computes the loss in fp32.
#   bf16 keeps fp32's 8 exponent bits and drops mantissa bits: a gradient of 1e-10 is still
#        representable, so bf16 needs no loss scaling.
#   fp16 has 5 exponent bits: magnitudes below ~3e-8 round to zero, small gradients with them.
#        GradScaler multiplies the loss by a large factor before backward and divides the gradients
#        by it before the step, and skips a step whose gradients overflowed (lowering the factor).
# GPUs of compute capability >= 8.0 and CPUs with AVX512-BF16 or AMX multiply bf16 natively; on
# other CPUs it is emulated, many times slower than fp32. --precision auto picks (Part three, F).

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # fp32: no autocast


def autocast(device, precision):
    """The context that runs a forward pass at `precision` (bf16, fp16 or fp32) on `device`."""
    if precision not in AUTOCAST_DTYPES:
        return nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


# --------------------------------------------------------------------------------------------------
#                                   10. Checkpoints: what a run leaves behind
# --------------------------------------------------------------------------------------------------
# experiments/{exp_name}/args.json               the arguments of the run
#                       /checkpoints/last.pt      written every --ckpt_every steps and at the end
#                       /checkpoints/best.pt      the lowest validation loss so far
#                       /checkpoints/guide.pt     at GUIDE_AT of the run: the guide (section 7)
#                       /logs/                    TensorBoard: tensorboard --logdir experiments
#                       /samples/                 grids during training; `sample` writes here too
# A checkpoint holds the weights, their EMA, AdamW's moments, the fp16 loss scale, the step, the
# best validation loss, the arguments, the clock and the network's version: all a run needs to go
# on, as every random draw of training follows from the seed and the step (section 11). Plain
# values and tensors: torch.load(weights_only=True) runs no code. Written whole (B), checked (C).

TrainingParts = namedtuple("TrainingParts", "model ema optimizer scaler")  # what is trained


def experiment_paths(exp_name):
    root = Path("experiments") / exp_name
    return {"root": root, **{name: root / name for name in ("checkpoints", "logs", "samples")}}


def checkpoint_state(parts, step, best_val, elapsed, args):
    """Everything a run needs to continue exactly, as a dict of tensors and plain values."""
    state = {name: part.state_dict() for name, part in parts._asdict().items()}
    return {**state, "step": step, "best_val": best_val, "elapsed": elapsed, "args": vars(args),
            "architecture": ARCHITECTURE}  # the network's version (Part three, C)


# --------------------------------------------------------------------------------------------------
#                                   11. Trainer: examples, DDP, the training loop, EMA
# --------------------------------------------------------------------------------------------------
# One process per GPU (or per CPU slot with --nproc), started by torch.multiprocessing.spawn, or by
# torchrun for several machines. Each holds a full copy of the model; DistributedDataParallel
# averages the gradients over processes in backward(), so all copies take the same optimizer step.
# Each reads its 1/world_size of every epoch (DistributedSampler): a global batch of world_size x B.
#
# Reproducibility by construction: every random choice about a training example -- its flip, its
# noise x0, its time t, its hidden attributes -- is a pure function of (seed, epoch, image index),
# and the pairing of section 6 a function of the global batch. So 2 processes x batch B see exactly
# the examples 1 process x batch 2B sees, and a run resumed at step k sees what the uninterrupted
# run saw: each epoch's order is fixed by seed + epoch, and the resume skips its done batches.
# (Under --max_minutes the learning rate follows the clock: exact only if each step takes as long.)

class FlowExamples(Dataset):
    """Training examples (x1, x0, t, a): an image (randomly flipped), its noise, its time, its
    attributes with some hidden (section 6; (0,) for an unconditional run). Set .epoch before
    iterating (the DataLoader workers receive a fresh copy each epoch)."""

    def __init__(self, images, args):
        self.images, self.args, self.epoch = images, args, 0

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        args = self.args
        rng = np.random.default_rng([args.seed, self.epoch, i])
        x1 = self.images[i]                                                   # (C, H, W)
        if rng.random() < 0.5:
            x1 = x1.flip(-1)                                                  # horizontal flip
        x0 = torch.from_numpy(rng.standard_normal(x1.shape, dtype=np.float32))  # (C, H, W)
        t = logit_normal(rng.standard_normal(), args.t_mu, args.t_sigma)      # ()
        a = drop_attributes(self.images.label(i), args.attr_dropout, args.attr_dropout_all, rng)
        return x1, x0, t, a                                                   # a: (K,)


def epoch_batches(examples, sampler, step, steps_per_epoch, args, device):
    """The batches (x1, x0, t, a) left in the epoch of step `step`: this process's share of a
    permutation fixed by (seed, epoch), less the batches a resumed run has already seen."""
    epoch, done_in_epoch = divmod(step, steps_per_epoch)
    sampler.set_epoch(epoch)
    examples.epoch = epoch
    order = list(sampler)[done_in_epoch * args.batch_size:]
    loader = DataLoader(examples, args.batch_size, sampler=order, drop_last=True,
                        num_workers=args.workers, pin_memory=device.type == "cuda",
                        worker_init_fn=ignore_interrupts)                    # Part three, B
    for x1, x0, t, a in started(loader):  # B: its workers start with Ctrl-C held back
        yield (x1.to(device, non_blocking=True), x0.to(device, non_blocking=True),  # (B, C, H, W)
               t.to(device), a.to(device))                                           # (B,), (B, K)


def validation_set(images, n, seed, t_mu, t_sigma):
    """Fixed images, noise (unpaired, as sampling's), all attributes and times (the n quantiles
    t_k = sigmoid(mu + sigma * Phi^-1((k + 1/2) / n)) of training's), so val losses compare."""
    x1 = torch.stack([images[i] for i in range(min(n, len(images)))])      # (n, C, H, W)
    x0 = torch.randn(x1.shape, generator=torch.Generator().manual_seed(seed))
    quantiles = (torch.arange(len(x1)) + 0.5) / len(x1)
    a = torch.stack([images.label(i) for i in range(len(x1))])             # (n, K)
    return x1, x0, logit_normal(torch.special.ndtri(quantiles), t_mu, t_sigma), a


@torch.no_grad()
def validation_loss(model, val, t_eps, batch_size, device, precision):
    total = 0.0
    for start in range(0, len(val[0]), batch_size):
        x1, x0, t, a = (part[start:start + batch_size].to(device) for part in val)
        with autocast(device, precision):
            total += flow_loss(model, x1, x0, t, t_eps, a).item() * len(x1)
    return total / len(val[0])


def learning_rate(step, progress, args):
    """The learning rate of optimizer step `step` (0-based) taken at `progress` p in [0, 1) of the
    run (of its steps or its --max_minutes, whichever is further): warm-up, constant, cooldown,
        lr(step, p) = lr * min(1, (step + 1) / warmup_steps) * min(1, (1 - p) / cooldown)
    (warmup_steps counts steps; cooldown is the last share of p, 0: none). Warm-up lets AdamW's
    moments settle before the steps get large. The cooldown makes this the "warmup-stable-decay"
    (WSD) schedule: a run of any length, or stopped by a clock, ends with small steps, settled."""
    cooldown = min(1.0, (1 - progress) / args.cooldown) if args.cooldown else 1.0
    return args.lr * min(1.0, (step + 1) / args.warmup_steps) * cooldown


def clip_gradients(parts, loss, step, args):
    """Clip the gradients (unscaled first, in fp16) to norm --grad_clip; their norm before. A
    non-finite loss or gradient stops the run before the step is taken or saved (in fp16 the scaler
    skips an overflowed step instead, and the loop checks the loss after it)."""
    parts.scaler.unscale_(parts.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(parts.model.parameters(), args.grad_clip)
    local_loss, grad_norm = torch.stack([loss.detach().float(), grad_norm.float()]).tolist()
    finite = math.isfinite(local_loss) and math.isfinite(grad_norm)
    if not parts.scaler.is_enabled() and not finite:
        raise divergence(local_loss, grad_norm, step + 1, args)              # Part three, A
    return grad_norm


@torch.no_grad()
def update_ema(ema, model, step, decay):
    """ema <- d ema + (1 - d) model, d = min(decay, (1 + step) / (10 + step)): an average of recent
    weights, steadier than the last, which validation and sampling use. Behind a weight growing by
    1 per step it lags (step + 1) / 10 steps in the warm-up (tested), then d / (1 - d): 199 at
    0.995, 9,999 at DiT's 0.9999. 0.995: no window tried sampled better beyond noise (RESULTS.md)"""
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - d)


def training_parts(model, device, args):
    """The model, its EMA copy, AdamW and the fp16 loss scaler (for device.type)."""
    ema = copy.deepcopy(model).requires_grad_(False)
    # no weight decay, as DiT (so AdamW is Adam); beta2 0.95, not DiT's 0.999: ~20 steps' memory
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                                  weight_decay=0.0, fused=True)
    # fp16 only: scale the loss up before backward, so small gradients do not flush to zero
    scaler = torch.amp.GradScaler(device.type, enabled=args.resolved_precision == "fp16")
    return TrainingParts(model, ema, optimizer, scaler)


def for_training(model, world_size, args):
    """`model` as the training step calls it: in DistributedDataParallel across processes, which
    averages the gradients in backward(); with --compile, compiled (Part three, F)."""
    device = next(model.parameters()).device
    if world_size > 1:
        model = DistributedDataParallel(model,
                                        device_ids=[device] if device.type == "cuda" else None)
    return compiled(model) if args.compile else model


def train_step(parts, model, batch, lr, step, args):
    """Optimizer step `step` (0-based) of parts.model, called as `model` (for_training's: in DDP,
    compiled), on batch (x1, x0, t, a) at learning rate lr: train_loop's steps 4-6, below.
    Returns (loss, gradient norm)."""
    x1, x0, t, a = batch
    parts.optimizer.param_groups[0]["lr"] = lr  # one group: every weight
    # 4. forward + loss, under autocast (with bf16 or fp16: the matmuls in 16 bits)
    with autocast(x1.device, args.resolved_precision):
        loss = flow_loss(model, x1, x0, t, args.t_eps, a)
    # 5. backward: DDP averages the gradients over processes here (fp16: the scaled loss)
    parts.optimizer.zero_grad(set_to_none=True)
    parts.scaler.scale(loss).backward()
    grad_norm = clip_gradients(parts, loss, step, args)
    # 6. the optimizer step (in fp16 skipped if a gradient overflowed), then the EMA
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    update_ema(parts.ema, parts.model, step, args.ema_decay)
    return loss, grad_norm


def train_loop(rank, world_size, args, device, interrupt):
    """Process `rank`'s training, started by train_worker (B); interrupt.requested turns True at
    Ctrl-C, and args.resolved_precision is --precision resolved for this machine (F)."""
    # 1. the model, its EMA, AdamW and the loss scaler: new (seeded: equal in every process), or
    # as the checkpoint left them
    torch.manual_seed(args.seed)
    parts = training_parts(build_model(args).to(device), device, args)
    step, best_val, elapsed = start_or_resume(args, parts, announce=rank == 0)  # C
    model = for_training(parts.model, world_size, args)
    # 2. the data, and how long the run is: --epochs, --max_steps or --max_minutes
    if world_size > 1:  # wait for the image cache, which check_train_command builds (A, E)
        dist.barrier()
    examples = FlowExamples(make_dataset(args, "train"), args)
    sampler = DistributedSampler(examples, world_size, rank, seed=args.seed, drop_last=True)
    steps_per_epoch = len(sampler) // args.batch_size
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)
    budget = 60 * args.max_minutes if args.max_minutes else math.inf  # seconds of training
    progress = max(step / total_steps, elapsed / budget)  # through its steps or its time
    if progress >= 1:  # a resume with nothing left to do: rank 0 says why (C); nothing is written
        return say_if_finished(args, step, elapsed, total_steps, budget, announce=rank == 0)
    book = Bookkeeping(args, device, parts, progress, total_steps, budget, best_val) \
        if rank == 0 else None                                                # Part three, H
    stop, clock = False, time.monotonic() - elapsed  # the run's clock, continued across resumes
    while progress < 1 and not stop:
        for x1, x0, t, a in epoch_batches(examples, sampler, step, steps_per_epoch, args, device):
            # 3. the learning rate, from how far the run is; the batch's noise paired (section 6)
            lr = learning_rate(step, progress, args)
            if args.pair_noise:
                x0 = pair_noise(x1, x0, rank, world_size)  # B: all processes' images, gathered
            # 4.-6. forward, backward, AdamW's step and the EMA
            loss, grad_norm = train_step(parts, model, (x1, x0, t, a), lr, step, args)
            step += 1
            # 7. loss, Ctrl-C and clock, averaged over processes: all set one lr, stop together
            stats = torch.tensor([loss.item(), interrupt.requested, time.monotonic() - clock],
                                 device=device)
            if world_size > 1:
                dist.all_reduce(stats, op=dist.ReduceOp.AVG)
            loss, stop, elapsed = stats[0].item(), stats[1].item() > 0, stats[2].item()
            if not math.isfinite(loss):  # fp16, where a non-finite step was skipped, not taken
                raise divergence(loss, grad_norm, step, args)
            # 8. rank 0 (Part three, H): log, validate, sample a grid, save, each at its interval
            # and at the end; guide.pt (section 7) once GUIDE_AT of the run is done
            progress = max(step / total_steps, elapsed / budget)
            if rank == 0:
                book.after_step(step, (loss, lr, grad_norm), elapsed, progress)
            if progress >= 1 or stop:
                break
    if rank == 0:
        book.close(step, stop)
    if stop:  # Ctrl-C: the step in flight has finished and is saved; every rank leaves together
        stopped_by_ctrl_c(args, step, world_size)                             # Part three, B


# --------------------------------------------------------------------------------------------------
#                                   12. Sampling from a checkpoint
# --------------------------------------------------------------------------------------------------

def generate(model, args, device, precision, attributes=None, cfg_scale=1.0):
    """args.num_samples images (batches (B, C, H, W) of args.batch_size, about [-1, 1]) by sample
    with args.method, num_sampling_steps and time_power from the noise of args.seed (drawn on the
    CPU: the same on any device), asking for attributes (num_samples, K) (or None), cfg_scale."""
    size, total = model.grid * model.patch_size, args.num_samples
    generator, start = torch.Generator().manual_seed(args.seed), time.monotonic()
    times = time_grid(args.num_sampling_steps, args.time_power)
    for n in range(0, total, args.batch_size):
        noise = torch.randn((min(args.batch_size, total - n), 3, size, size), generator=generator)
        asked = None if attributes is None else attributes[n:n + len(noise)].to(device)
        with autocast(device, precision), attention_kernels(device, model.grid**2):   # F
            images = sample(model, noise.to(device), times, args.method, asked, cfg_scale).cpu()
        done = n + len(noise)
        print(f"sampled {done}/{total} images | {done / (time.monotonic() - start):.2f} img/s",
              flush=True)
        yield finite(images)  # A: an overflow (NaN, inf) stops here, before it is written


# --------------------------------------------------------------------------------------------------
#                                   13. CLI: train and sample (and subset, in D)
# --------------------------------------------------------------------------------------------------

def train_command(args, saved):
    """`train`: check everything, create the experiment, then run one process or spawn several.
    saved: the arguments of the run being resumed (--resume), else None."""
    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # torchrun started this process
    first = int(os.environ.get("RANK", 0)) == 0  # under torchrun only rank 0 creates the experiment
    with experiment_lock(args, first):  # B: one `train` per experiment at a time
        device = check_train_command(args, saved, torchrun, first)  # A: before any writing
        if first:
            create_experiment(args)                                 # B: its folders
        # each process runs train_worker (B): its device, the process group, Ctrl-C, train_loop
        if torchrun:  # join torchrun's group instead of spawning
            train_worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args, device.type)
        elif args.nproc == 1:
            train_worker(0, 1, args, device.type)
        else:
            with quiet_spawn(args):  # B: an address to meet at, Ctrl-C to the workers, deaths told
                mp.spawn(train_worker, args=(args.nproc, args, device.type), nprocs=args.nproc)


def sample_command(args):
    """`sample`: --num_samples PNGs of a checkpoint into a folder of experiments/{exp_name}/samples/
    and a grid of the first 64 beside it; with --grid, a picture of requests x weights (+ logs)."""
    device, precision = device_and_precision(args.device, args.precision)     # F
    path = checkpoint_path(args.exp_name, args.checkpoint)                     # C
    ckpt = load_checkpoint(path)                                               # C: checked
    rows = sample_requests(args, ckpt["args"]["attributes"])  # A: (R, K) or None; R > 1: --grid
    out = experiment_paths(args.exp_name)["samples"]
    check_folders(out, experiment_paths(args.exp_name)["logs"])  # B: no file in the way
    model = load_model(ckpt, device, use_ema=not args.no_ema)                 # C: built, loaded
    model = with_guide(model, ckpt, path, args.autoguidance, device, not args.no_ema)  # C
    writable_folder(out)  # B: a read-only disk fails now, not after the sampling
    if args.grid:  # A: one picture, a row per --attributes setting, a column per --cfg_scale
        name = out / f"{samples_name(path, args)}.png"                         # A: its name
        return grid_command(args, model, rows, name, ckpt["step"], device, precision)
    asked = rows[0].expand(args.num_samples, -1) if rows is not None else None  # (num_samples, K)
    batches = generate(model, args, device, precision, asked, args.cfg_scale[0])
    name = samples_name(path, args)                         # A: the checkpoint and the flags
    # PNGs go to {name}.PID.partial/, renamed {name}/ when complete; then the grid {name}.png (B)
    count, in_grid, before = write_samples_whole(batches, out / name, args.num_samples)
    print(f"wrote {count} image{'s' * (count != 1)} to {out / name}/{before} and a grid of the "
          f"first {in_grid} to {out / name}.png")


def main(argv=None):
    parser, train_parser = make_parser()                                       # A: the flags
    args = exit_on_user_error(parser.parse_args, argv)                         # A: one-line errors
    if args.command == "sample":
        return exit_on_user_error(sample_command, args)
    if args.command == "subset":                                               # D: a fixed subset
        return exit_on_user_error(subset_command, args)
    saved = None
    if args.resume:  # the saved arguments become the defaults; flags given now override them
        saved = exit_on_user_error(saved_arguments, args.exp_name)                # C
        train_parser.set_defaults(**saved)
        args = exit_on_user_error(parser.parse_args, argv)
    exit_on_user_error(train_command, args, saved)


# ==================================================================================================
#                     PART THREE: KEEPING RUNS SAFE (what a learner may skip)
# ==================================================================================================
# Everything below makes the program trustworthy rather than explaining the method: bad input ends
# in one line naming the problem and the fix; Ctrl-C, a kill or a full disk never leave a half
# file or lose a run; a resume continues exactly or refuses; CelebA is found however it was
# unpacked; the device, precision and attention kernel are chosen for the machine; and rank 0
# keeps the run's record (H).

# the imports that only Part three needs stand here, out of the learner's way
import collections
import ctypes
import difflib
import errno
import functools
import hashlib
import json
import logging
import multiprocessing
import multiprocessing.resource_tracker
import re
import shlex
import shutil
import socket
import stat
import sys
import tempfile
import threading
import warnings
import zipfile
from contextlib import contextmanager

from PIL import ImageDraw
from torch.nn.attention import SDPBackend, sdpa_kernel

# --------------------------------------------------------------------------------------------------
#                                   A. Flags, their ranges, and one-line errors
# --------------------------------------------------------------------------------------------------

def exit_on_user_error(command, *args, quiet=False):
    """Run a command. Bad input (UserError), memory running out, an op without an MPS kernel and a
    --compile that finds no working compiler end as one line `error: ...` and exit status 2;
    Ctrl-C (or SIGTERM) as one line and status 130 (the shell's code for SIGINT). No traceback.
    quiet: a DDP rank other than 0, which says nothing and leaves with status 0, because spawn
    stops every process as soon as one fails: rank 0 must be the one whose status and message the
    user gets."""
    code = 2
    try:
        with sigterm_as_ctrl_c():
            return command(*args)
    except UserError as e:
        # from a DataLoader worker the message arrives inside the worker's traceback: its last line
        message = "error: " + re.sub(r"^[\w.]*UserError: ", "", str(e).strip().splitlines()[-1])
    except Interrupted as e:
        code, message = 130, str(e)
    except KeyboardInterrupt:
        code, message = 130, ("interrupted (checkpoints, images and FID statistics are only ever "
                              "written whole: those written before are intact)")
    except NotImplementedError as e:
        if "MPS" not in str(e):
            raise
        message = (f"error: {str(e).splitlines()[0]} Set PYTORCH_ENABLE_MPS_FALLBACK=1 to run such "
                   f"ops on the CPU, or use --device cpu")
    except (MemoryError, RuntimeError) as e:  # (NotImplementedError, a RuntimeError: above)
        compiled = "torch._dynamo" in sys.modules  # what --compile's errors come from, if imported
        out_of_memory = (MemoryError, torch.OutOfMemoryError)  # Python's, and CUDA's
        if isinstance(e, out_of_memory) or "can't allocate memory" in str(e):  # or the CPU's
            first = (str(e).splitlines() or [""])[0]
            asked = re.search(r"tried to allocate (\d+) bytes", first)  # the CPU's allocator
            why = f"{int(asked[1]) / 2**30:.1f} GiB asked for at once" if asked else first[:160]
            message = (f"error: out of memory ({why}); lower --batch_size (memory grows with it, "
                       f"the image size and the model), then run the command again (train: with "
                       f"--resume if it saved a checkpoint)")
        elif compiled and isinstance(e, torch._dynamo.exc.BackendCompilerFailed):  # no compiler
            reason = e.inner_exception
            message = (f"error: --compile failed ({type(reason).__name__}: "
                       f"{str(reason).splitlines()[0]}); train without --compile, which runs the "
                       f"same model")
        else:
            raise
    if not quiet:
        print(message, file=sys.stderr, flush=True)
    sys.exit(0 if quiet else code)


class DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    """--help ends each flag's help with "(default: X)", except when X is None, a list, or a
    switch's True or False (--no_pair_noise's True is pairing on): they say nothing, or mislead."""

    def _get_help_string(self, action):
        hidden = action.default is None or isinstance(action.default, (bool, list))
        return action.help if hidden else super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse, showing each flag's default in --help, refusing a flag cut short (a typo may be
    the start of another flag), and reporting a bad flag as a UserError (one line `error: ...`,
    exit status 2) instead of its usage block."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=DefaultsShown, allow_abbrev=False, **kwargs)

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")

    def parse_args(self, args=None, namespace=None):
        """argparse's, but a flag it does not know is named against the flags: the subcommand that
        has it, or the subcommand's nearest by spelling; a flag typed with one dash, by its name."""
        args = sys.argv[1:] if args is None else [str(a) for a in args]
        commands = self.commands if hasattr(self, "commands") else {}
        try:
            known, unknown = self.parse_known_args(args, namespace)
        except UserError as e:  # `-exp_name x` is no --exp_name: "required: --exp_name"
            flags = {f for p in (self, *commands.values()) for f in p._option_string_actions}
            one_dash = [a for a in args if a[:1] == "-" and "-" + a.split("=")[0] in flags]
            if not one_dash:
                raise
            raise UserError(f"{e}; {one_dash[0]} has one dash: use -{one_dash[0]}") from None
        if not unknown:
            return known
        parser = commands.get(getattr(known, "command", None), self)
        before_dashes = unknown[:unknown.index("--")] if "--" in unknown else unknown
        flag = next((u.split("=")[0] for u in before_dashes if u.startswith("-")), "")
        close = difflib.get_close_matches(flag, parser._option_string_actions, n=1)
        owners = [name for name, other in commands.items() if flag in other._option_string_actions]
        hint = (f"; it is a flag of {' and '.join(owners)}" if owners and flag else
                f"; did you mean {close[0]}?" if close else "")
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")

    def add_argument(self, *names, **kwargs):  # a number's help ends with its range, as parsed
        if hasattr(kwargs.get("type"), "valid"):
            kwargs["help"] = f"{kwargs['help']} ({kwargs['type'].valid})"
        return super().add_argument(*names, **kwargs)


def number(kind, above=None, at_least=None, below=None):
    """An argparse type: a finite int or float, optionally > above, >= at_least and < below; its
    .valid says so in words, for the flag's help."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            expected = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if above == 0 and value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        for ok, bound in [(above is None or value > above, f"> {above}"),
                          (at_least is None or value >= at_least, f">= {at_least}"),
                          (below is None or value < below, f"< {below}")]:
            if not ok:
                raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value
    bounds = [f"{sign} {x}" for sign, x in ((">", above), (">=", at_least), ("<", below))
              if x is not None]
    parse.valid = (f"{'an integer' if kind is int else 'a finite number'} "
                   f"{' and '.join(bounds)}".strip())
    return parse


def positive(kind):
    return number(kind, above=0)


def experiment_name(text):
    """--exp_name is a folder under experiments/: a plain name, never a path."""
    if not re.fullmatch(r"[A-Za-z0-9_.][A-Za-z0-9_.-]{0,99}", text) or text in (".", ".."):
        raise argparse.ArgumentTypeError(f"{text!r} is not a plain name: use up to 100 letters, "
                                         f"digits and - _ . (no slashes, not . or .., not - "
                                         f"first: a flag); it becomes experiments/NAME")
    if text in ("fid_refs", IMAGE_CACHE.name):  # the caches' folders
        raise argparse.ArgumentTypeError(f"experiments/{text} holds a cache; choose another name")
    return text


def attribute_name(name):
    """A CelebA attribute name, or an argparse error that lists them (and the nearest)."""
    if name not in ATTRIBUTE_NAMES:
        near = difflib.get_close_matches(name, ATTRIBUTE_NAMES, n=1)
        raise argparse.ArgumentTypeError(
            f"unknown attribute {name!r}" + (f" (did you mean {near[0]}?)" if near else "") +
            f"; CelebA's attributes are {','.join(ATTRIBUTE_NAMES)}")
    return name


def attribute_list(text):
    """train --attributes: 'all' or comma-separated names -> names in CelebA's order."""
    if text == "all":
        return list(ATTRIBUTE_NAMES)
    names = {attribute_name(name.strip()) for name in text.split(",") if name.strip()}
    if not names:  # "" or ",": asked for attributes, named none
        raise argparse.ArgumentTypeError(f"{text!r} names no attribute; give names like "
                                         f"Smiling,Male, or all, or leave out --attributes")
    return [name for name in ATTRIBUTE_NAMES if name in names]


def attribute_setting(text):
    """sample --attributes: 'Smiling=1,Eyeglasses=0' -> {name: +1 | -1}; 'none' -> {}."""
    setting = {}
    for item in text.split(",") if text != "none" else []:
        name, _, value = item.strip().partition("=")
        if value not in ("0", "1"):
            raise argparse.ArgumentTypeError(f"{item.strip()!r}: write NAME=1 (present) or NAME=0 "
                                             f"(absent), e.g. Smiling=1,Eyeglasses=0")
        name = attribute_name(name)
        if name in setting:
            raise argparse.ArgumentTypeError(f"{text!r} names {name} twice; keep one of them")
        setting[name] = 1.0 if value == "1" else -1.0
    return setting


def setting_text(setting):
    """{name: +1 | -1} -> 'Smiling=1,Eyeglasses=0' ('none' when empty), as --attributes has it."""
    return ",".join(f"{name}={int(value > 0)}" for name, value in setting.items()) or "none"


# --time_power's range: from 0.1, every time t_i < 1 of any usable step count stays apart from its
# neighbours (near 0, all round to 0, and multistep's slope would divide by t_i - t_(i-1) = 0)
TIME_POWER = number(float, at_least=0.1, below=5)
TIME_POWER_HELP = ("the steps' times t_i = 1 - (1 - i/S)^P: 1 uniform, > 1 steps shrinking "
                   "towards the image (default: the P whose last step starts at t = 0.98, at most "
                   "2; 1 at 50 steps)")


def name_number(x):
    """A flag's number in a file name with every digit it has (2, 1.5, 1.5000001): two values
    never share a name, as they would rounded."""
    return repr(float(x)).removesuffix(".0")


def sampler_text(args):
    """'euler40' for the defaults, 'multistep20_power1_autoguidance1_no_ema' for --method multistep
    --num_sampling_steps 20 --time_power 1 --autoguidance 1 --no_ema: in file names."""
    power = "" if args.time_power is None else f"_power{name_number(args.time_power)}"
    guide = "" if args.autoguidance is None else f"_autoguidance{name_number(args.autoguidance)}"
    weights = "_no_ema" if args.no_ema else ""
    return f"{args.method}{args.num_sampling_steps}{power}{guide}{weights}"


def checkpoint_stem(path, exp_name):
    """A checkpoint's name in sample file names: `last` for last.pt of experiment exp_name, and
    for one from elsewhere the name of its experiment or folder too (`other_last` for
    other/checkpoints/last.pt, `downloads_last` for downloads/last.pt), so that its samples
    neither pass for this experiment's nor replace them."""
    own = experiment_paths(exp_name)["checkpoints"].resolve()
    folder = path.resolve().parent
    where = folder.parent if folder.name == "checkpoints" else folder
    return path.stem if folder == own else f"{where.name}_{path.stem}"


def samples_name(path, args):
    """The name of `sample`'s images of the checkpoint at path: e.g. last_euler40_seed0 (a folder),
    last_euler40_seed0_Smiling=1_cfg3 for a request, last_grid_euler40_seed0_Smiling=1+none_cfg0,3
    for --grid (last_grid8_... for --grid_samples 8); so that other flags or requests never replace
    them. Requests that would make the name long are named by a digest of them instead
    (requests3f2a...)."""
    cells = "" if args.grid_samples == GRID_SAMPLES else args.grid_samples  # samples per cell
    grid = f"_grid{cells}" if args.grid else ""
    name = f"{checkpoint_stem(path, args.exp_name)}{grid}_{sampler_text(args)}_seed{args.seed}"
    if not any(args.attributes) and args.cfg_scale == [1]:
        return name
    weights = ",".join(name_number(w) for w in args.cfg_scale)
    requests = f"{'+'.join(setting_text(setting) for setting in args.attributes)}_cfg{weights}"
    if len(requests) > 100:  # file names end at 255 bytes
        requests = f"requests{hashlib.sha1(requests.encode()).hexdigest()[:10]}"
    return f"{name}_{requests}"


def sample_requests(args, trained):
    """sample's --attributes and --cfg_scale as attribute_rows for a checkpoint trained on the
    attributes `trained`; requests that need --grid, or guidance with nothing asked, refused.
    Without --cfg_scale, a request gets the weight GUIDANCE, and anything else 1. A count for the
    other kind of output (--num_samples with --grid, --grid_samples without) is refused."""
    if args.grid and args.num_samples is not None:
        raise UserError("--grid draws --grid_samples samples per cell, not --num_samples; drop "
                        "--num_samples, or drop --grid for a folder of samples")
    if not args.grid and args.grid_samples is not None:
        raise UserError("--grid_samples counts the samples per cell of --grid; add --grid, or use "
                        "--num_samples for a folder of samples")
    args.num_samples = args.num_samples or NUM_SAMPLES
    args.grid_samples = args.grid_samples or GRID_SAMPLES
    if args.cfg_scale is None:
        args.cfg_scale = [GUIDANCE if trained and any(args.attributes) else 1.0]
    rows = attribute_rows(args.attributes, args.cfg_scale, trained)
    if not args.grid and (len(args.attributes) > 1 or len(args.cfg_scale) > 1):
        names = [name for setting in args.attributes for name in setting]  # a setting: a dict
        one = ",".join(setting_text(setting) for setting in args.attributes)
        joined = (f", or join them with commas for one request: {one}" if len(args.attributes) > 1
                  and all(args.attributes) and len(set(names)) == len(names) else "")
        raise UserError(f"several --attributes settings or --cfg_scale values make a grid: add "
                        f"--grid{joined}")
    if not args.grid and rows is not None and args.cfg_scale[0] not in (0, 1) and \
            not args.attributes[0]:  # nothing asked: every weight draws unconditional samples
        raise UserError(f"--cfg_scale {args.cfg_scale[0]:g} turns up a request, and none was made: "
                        f"add --attributes, e.g. Smiling=1")
    return rows


def attribute_rows(settings, cfg_scales, trained):
    """sample --attributes settings -> (R, K) vectors over the attributes the checkpoint was trained
    on (`trained`), 0 for those not named; None for an unconditional checkpoint."""
    asked = sorted({name for setting in settings for name in setting})
    if not trained:
        if asked or cfg_scales != [1.0]:
            given = [("--attributes", asked), ("--cfg_scale", cfg_scales != [1.0])]
            flags = [flag for flag, present in given if present]
            raise UserError(f"this checkpoint was trained without --attributes: it draws random "
                            f"faces and takes no {' or '.join(flags)}")
        return None
    unknown = [name for name in asked if name not in trained]
    if unknown:
        raise UserError(f"this checkpoint was not trained on {', '.join(unknown)}; it knows "
                        f"{','.join(trained)}")
    return torch.tensor([[setting.get(name, 0.0) for name in trained] for setting in settings])


# The weight a request gets unless --cfg_scale says otherwise: on CelebA it scored FID as good as
# weight 1's and drew the attributes asked for more often; 3 cost more FID (RESULTS.md).
GUIDANCE = 2.0
GUIDANCE_HELP = (f"classifier-free guidance weight: 0 unconditional, 1 conditional, > 1 stronger "
                 f"(default: {GUIDANCE:g} for a model asked for attributes, else 1)")
# The autoguidance weight unless --autoguidance says otherwise: the lowest FID of the weights
# measured on CelebA, unconditional (RESULTS.md). (argparse formats help texts: %% prints %.)
AUTOGUIDANCE = 1.5
AUTOGUIDANCE_HELP = (f"autoguidance weight w: x_guide + w (x_model - x_guide), where the guide is "
                     f"the run at {GUIDE_AT:.0%}% of its steps or minutes, the guide.pt beside "
                     f"the checkpoint (its EMA, or raw weights as the model's); 1: "
                     f"off (default: {AUTOGUIDANCE:g} for a model trained without --attributes "
                     f"that has a guide.pt, else 1)")
SAMPLING_STEPS = 40  # the default of sample and fid.py
SAMPLING_STEPS_HELP = ("steps from noise to image (by FID, autoguided 40 scored 2.0 below 20 at "
                       "twice the time and 6.7 below 10; unguided, 20 scored as 50: RESULTS.md)")
METHODS = ["euler", "heun", "multistep"]
METHOD_HELP = ("the sampler (section 7): euler, one model call per step, first order; heun, two "
               "calls (the last step one), second order; multistep, one call, second order from "
               "the last two predictions (unguided, its 10 steps scored 3.9 FID below euler's "
               "10: RESULTS.md)")
PRECISIONS = ["auto", "bf16", "fp16", "fp32"]
PRECISION_HELP = ("autocast dtype; auto: bf16 where it is native (CUDA >= 8.0, a CPU whose bf16 "
                  "matmul is measured faster), fp16 on older GPUs, else fp32")
DEVICES = ["auto", "cpu", "cuda", "mps"]
DEVICE_HELP = "auto: cuda, then mps, then cpu"
SEED = number(int, at_least=0, below=2**32)  # so that seed + 1, seed + epoch fit in 64 bits


DATA_ROOT = "./data"  # where --data_root looks unless told


def make_parser():
    """The `train`, `sample` and `subset` subcommands; returns the parser and its `train`
    subparser (whose defaults --resume replaces with the saved arguments)."""
    parser = Parser(prog="celebgen.py", description="Rectified-flow DiT for CelebA faces.")
    commands = parser.add_subparsers(dest="command", required=True)
    parser.commands = commands.choices  # {name: its Parser}, for the errors of parse_args
    train = commands.add_parser("train", help="train a model (resumable)")
    add_train_flags(train.add_argument)
    add_recipe_flags(train.add_argument)
    add_sample_flags(commands.add_parser("sample", help="sample images from a checkpoint")
                     .add_argument)
    arg = commands.add_parser("subset", help="copy a listed part of CelebA into a folder")
    arg = arg.add_argument
    arg("--data_root", default=DATA_ROOT, help="where CelebA is (see README for the layouts)")
    arg("--image_list", required=True,
        help="the images to copy, a file name first on each line (e.g. assets/celeba_subset.txt)")
    arg("--out", required=True, help="the folder to create, in CelebA's official layout")
    return parser, train


def add_train_flags(arg):
    """train's flags of the experiment, the data, the model and the run's length."""
    arg("--exp_name", required=True, type=experiment_name,
        help="experiments/{exp_name} holds everything of the run")
    arg("--resume", action="store_true",
        help="continue experiments/{exp_name} exactly from its latest checkpoint (last.pt, "
             "best.pt or guide.pt); the saved flags "
             "are the defaults, and the model, --dataset, --batch_size, --nproc, --seed, --t_mu, "
             "--t_sigma, --t_eps, --no_pair_noise and --val_size cannot change")
    arg("--dataset", choices=["celeba", "toy"], default="celeba",
        help="celeba: images under --data_root; toy: procedurally drawn faces, no download")
    arg("--data_root", default=DATA_ROOT, help="where CelebA is (see README for the layouts)")
    arg("--download", action="store_true",
        help="fetch CelebA into DATA_ROOT/celeba first (needs: pip install gdown), unless there")
    arg("--image_size", type=positive(int), default=32, help="side of the square training images")
    arg("--attributes", type=attribute_list, default=[],
        help="condition on these CelebA attributes, comma-separated (e.g. Smiling,Eyeglasses), or "
             "all; toy faces have " + ",".join(TOY_ATTRIBUTES) + ". Default: unconditional")
    arg("--attr_dropout", type=number(float, at_least=0, below=1), default=0.1,
        help="hide each attribute of a training example with this probability")
    arg("--attr_dropout_all", type=number(float, at_least=0, below=1), default=0.1,
        help="hide all attributes of a training example with this probability (the "
             "unconditional model of classifier-free guidance)")
    arg("--model", choices=list(MODELS), default="tiny",
        help="named size: " + ", ".join(f"{k} (width {v['dim']}, depth {v['depth']})"
                                        for k, v in MODELS.items()))
    arg("--patch_size", type=positive(int), default=4, help="side of the square patches (tokens)")
    arg("--batch_size", type=positive(int), default=32, help="images per step per process")
    arg("--epochs", type=positive(int), default=100, help="passes over the training images")
    arg("--max_steps", type=positive(int), default=None,
        help="stop after this many optimizer steps (before --epochs ends)")
    arg("--max_minutes", type=positive(float), default=None,
        help="stop after this many minutes of training (counted across resumes), whatever the "
             "steps")


def add_recipe_flags(arg):
    """train's flags of the optimisation, the example times, and what happens along the way."""
    arg("--cooldown", type=number(float, at_least=0, below=1), default=0.2,
        help="the learning rate decays linearly to 0 over this last fraction of the run (of "
             "--max_minutes, or of the steps, whichever is further along); 0: no decay")
    arg("--lr", type=positive(float), default=1.5e-3,
        help="AdamW learning rate after the warm-up (DiT's, for long GPU runs of DiT-S or -B: "
             "1e-4)")
    arg("--warmup_steps", type=positive(int), default=200,
        help="steps of linear learning-rate warm-up from lr/warmup_steps to lr")
    arg("--grad_clip", type=positive(float), default=1.0, help="clip the gradient norm to this")
    arg("--ema_decay", type=number(float, at_least=0, below=1), default=0.995,
        help="EMA decay d: the average lags about d / (1 - d) steps behind (DiT's, for runs "
             "of hundreds of thousands of steps: 0.9999)")
    arg("--no_pair_noise", dest="pair_noise", action="store_false",
        help="draw each example's noise independently of its image, instead of pairing a batch's "
             "noise with its images by the assignment of least total squared distance")
    arg("--t_mu", type=number(float), default=-0.4,
        help="logit-normal mean of the training times t")
    arg("--t_sigma", type=positive(float), default=0.8,
        help="logit-normal std of the training times t")
    arg("--t_eps", type=number(float, above=0, below=1), default=0.2,
        help="the loss's velocities divide by max(1 - t, t_eps), a cap on the time axis")
    arg("--num_sampling_steps", type=positive(int), default=20,
        help="Euler steps of the sample grids")
    arg("--precision", choices=PRECISIONS, default="auto",
        help=PRECISION_HELP + "; fp16 trains with loss scaling")
    arg("--device", choices=DEVICES, default="auto", help=DEVICE_HELP)
    arg("--compile", action="store_true",
        help="torch.compile the model: fused kernels for the work between matmuls; the first step "
             "compiles (up to minutes on a CPU, which needs a C++ compiler), later steps run "
             "faster")
    arg("--nproc", type=positive(int), default=None,
        help="processes on this machine (default: one per GPU on CUDA, else 1)")
    arg("--workers", type=number(int, at_least=0), default=None,
        help="DataLoader worker processes per process (0: make the examples in the training "
             "process; default: 0 for CelebA on a CPU, whose cores workers would take from "
             "training, else 2)")
    arg("--seed", type=SEED, default=0, help="for weights, data order and noise")
    arg("--val_size", type=positive(int), default=256,
        help="fixed validation images (and noise and times) that choose best.pt")
    arg("--log_every", type=positive(int), default=50, help="steps between progress lines")
    arg("--eval_every", type=positive(int), default=500, help="steps between validation losses")
    arg("--sample_every", type=positive(int), default=1000, help="steps between sample grids")
    arg("--ckpt_every", type=positive(int), default=1000, help="steps between saves of last.pt")


NUM_SAMPLES, GRID_SAMPLES = 64, 4  # sample's defaults: a folder of images, a cell of a grid


def add_sample_flags(arg):
    """sample's flags."""
    arg("--exp_name", required=True, type=experiment_name, help="the experiment to sample")
    arg("--checkpoint", default="last.pt",
        help="a name in the experiment's checkpoints/ (last.pt, best.pt) or a path; samples of "
             "another experiment's are named after it (other_last_...)")
    arg("--num_samples", type=positive(int),
        help=f"images to write (default: {NUM_SAMPLES}); not with --grid")
    arg("--num_sampling_steps", type=positive(int), default=SAMPLING_STEPS,
        help=SAMPLING_STEPS_HELP)
    arg("--method", choices=METHODS, default="euler", help=METHOD_HELP)
    arg("--time_power", type=TIME_POWER, help=TIME_POWER_HELP)
    arg("--seed", type=SEED, default=0, help="seed of the noise")
    arg("--batch_size", type=positive(int), default=64, help="images sampled at once")
    arg("--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP)
    arg("--device", choices=DEVICES, default="auto", help=DEVICE_HELP)
    arg("--no_ema", action="store_true", help="use the raw weights instead of the EMA")
    arg("--autoguidance", type=number(float, at_least=0), help=AUTOGUIDANCE_HELP)
    arg("--attributes", type=attribute_setting, nargs="+", default=[{}], metavar="NAME=0|1,...",
        help="ask a conditional model for attributes, e.g. Smiling=1,Eyeglasses=0; those not "
             "named are unspecified; 'none' asks for nothing. Several settings with --grid")
    arg("--cfg_scale", type=number(float, at_least=0), nargs="+",
        help=GUIDANCE_HELP + "; several with --grid")
    arg("--grid", action="store_true",
        help="one image: a row per --attributes setting, a column per --cfg_scale, each cell "
             "--grid_samples samples from the same noise")
    arg("--grid_samples", type=number(int, at_least=1, below=65),
        help=f"samples per cell of --grid, side by side, sampled at once (default: "
             f"{GRID_SAMPLES})")


def check_train_command(args, saved, torchrun, first):
    """Everything `train` can refuse, before any process starts or any file is written (the
    experiment's folder: experiment_lock); the device. first: this process announces it."""
    fixed = MODEL_ARGS + RESUME_FIXED if args.resume else ()
    refuse_resume_changes(args, saved, [k for k in fixed if k not in SET_FROM_THE_DATA])
    device, args.resolved_precision = device_and_precision(args.device, args.precision,
                                                           announce=first)
    train_images = validate_train_args(args, device, torchrun)
    refuse_resume_changes(args, saved, [k for k in fixed if k in SET_FROM_THE_DATA])
    if args.resume and first:  # the flags given now that differ from the run's: said, not silent
        changed = changed_flags(args, saved, [k for k in saved if k not in NOT_FLAGS])
        if changed:
            print(f"resuming with changed flags: {', '.join(changed)}", flush=True)
    # all is well: build the image cache now, before any process starts (under torchrun by the
    # first process of each machine only; the others wait for it in train_loop)
    if int(os.environ.get("LOCAL_RANK", 0)) == 0 and isinstance(train_images, CelebA):
        build_cache(train_images)                                             # E
    return device


# saved arguments that no flag sets on a resume (its name: "saved by experiment" says it)
NOT_FLAGS = ("resume", "exp_name", "resolved_precision", "run_id")
# what validate_train_args sets from the images and the machine: compared once it has run; the
# other fixed flags are compared before any image is read
SET_FROM_THE_DATA = ("attributes", "train_images", "val_images", "world_size")


def changed_flags(args, saved, keys):
    """'--flag saved -> now' for each of `keys` whose value now differs from the saved run's."""
    flag = {"pair_noise": "no_pair_noise (pairing)", "world_size": "nproc (processes)",
            "train_images": "data_root (training images)",
            "val_images": "data_root (validation images)"}
    return [f"--{flag.get(k, k)} {flag_value(saved[k])} -> {flag_value(getattr(args, k))}"
            for k in keys if k in saved and hasattr(args, k) and saved[k] != getattr(args, k)]


def refuse_resume_changes(args, saved, keys):
    """Refuse a --resume whose arguments differ from the saved run's in any of `keys`."""
    changed = changed_flags(args, saved, keys)
    image_counts = {"train_images": "training images", "val_images": "validation images"}
    counts = [f"{what} {saved[k]} -> {getattr(args, k)}" for k, what in image_counts.items()
              if k in keys and k in saved and saved[k] != getattr(args, k)]
    if changed and len(counts) == len(changed) and \
            Path(args.data_root) == Path(saved.get("data_root", args.data_root)):  # no flag to drop
        raise UserError(f"--data_root {args.data_root} now holds other images than the run trained "
                        f"on ({', '.join(counts)}); put back the images moved or removed since, or "
                        f"start a new --exp_name")
    if changed:
        images = " (--data_root: point it at the run's own images)" * any(
            c.startswith("--data_root") for c in changed)
        raise UserError(f"--resume cannot change {', '.join(changed)}: they fix the model, the "
                        f"data, their order or the validation loss of the run; drop those "
                        f"flags{images}, or start a new --exp_name")


def validate_train_args(args, device, torchrun):
    """Catch bad input before any process starts or any file is written; fill in the defaults that
    depend on the machine (--nproc, --workers). Returns the training images (not yet cached)."""
    if args.image_size % args.patch_size:
        nearest = max(args.patch_size, args.image_size // args.patch_size * args.patch_size)
        raise UserError(f"--image_size {args.image_size} is not divisible by --patch_size "
                        f"{args.patch_size}; use e.g. --image_size {nearest}")
    if args.nproc is None:
        args.nproc = torch.cuda.device_count() if device.type == "cuda" else 1
    if args.workers is None:
        # A GPU waits for its examples: workers make them meanwhile. A CPU's cores are its training
        # threads': CelebA's examples, read from the image cache, cost a few percent of a step
        # made in the training process, less than workers taking those cores; toy faces, drawn
        # anew for every example, cost more, and two workers beside training cost less
        # (tests/benchmark_speed.py --trainer measures both; RESULTS.md)
        args.workers = 0 if device.type == "cpu" and args.dataset == "celeba" else 2
    check_processes(args, device, torchrun)
    # (not on resume: a run of an older celebgen.py may have saved another --data_root)
    not_read = [f"--data_root {args.data_root}"] if Path(args.data_root) != Path(DATA_ROOT) else []
    not_read += ["--download"] if args.download else []
    if args.dataset == "toy" and not args.resume and not_read:
        raise UserError(f"toy faces are drawn, not read: drop {' and '.join(not_read)}, or drop "
                        f"--dataset toy to train on CelebA")
    if args.dataset == "toy" and args.attributes:
        if args.attributes == ATTRIBUTE_NAMES:  # `all`
            args.attributes = list(TOY_ATTRIBUTES)
        unknown = [a for a in args.attributes if a not in TOY_ATTRIBUTES]
        if unknown:
            raise UserError(f"toy faces have no {', '.join(unknown)}; their attributes are "
                            f"{','.join(TOY_ATTRIBUTES)}")
    try:
        train_images = make_dataset(args, "train", cache=False)
    except UserError as e:  # another dataset is no fix for a resume: its images are
        if not (args.resume and args.dataset == "celeba"):
            raise
        raise UserError(f"{str(e).split('; ')[0]}; a resumed run trains on its own images: point "
                        f"--data_root at where they are now") from None
    first = int(os.environ.get("RANK", 0)) == 0  # the process that speaks for the run
    if args.attributes and train_images.unlabelled and first:
        print(f"note: {train_images.unlabelled} of {len(train_images)} training images have no "
              f"row in the attribute file: their attributes are unspecified (0), so they train the "
              f"unconditional model only", flush=True)
    if args.dataset == "celeba" and find_celeba(args.data_root)[1] is None and first:
        print(f"note: no split file: training and validation both use all {len(train_images)} "
              f"images (for CelebA's split, {LAYOUTS_HELP})", flush=True)
    val_images = make_dataset(args, "val")  # fails now, not after training, if it is missing
    args.train_images, args.val_images = len(train_images), len(val_images)  # a resume keeps them
    if len(train_images) < args.batch_size * args.world_size:
        raise UserError(f"only {len(train_images)} training images for a global batch of "
                        f"{args.batch_size} x {args.world_size} processes; lower --batch_size or "
                        f"--nproc")
    return train_images


def check_processes(args, device, torchrun):
    """--nproc against the GPUs or CPU cores here; args.world_size, the processes of the run."""
    if device.type == "mps" and (args.nproc > 1 or torchrun):
        raise UserError("DDP cannot run on MPS (torch.distributed has no MPS backend); use --nproc "
                        "1, or --device cpu for several processes")
    if device.type == "cuda":
        devices = torch.cuda.device_count()
    elif hasattr(os, "sched_getaffinity"):  # the cores this process may run on (taskset, CPU set)
        devices = len(os.sched_getaffinity(0))
    else:
        devices = os.cpu_count() or 1
    kind = "GPUs" if device.type == "cuda" else "CPU cores"
    if args.nproc > devices and not torchrun:  # torchrun counts its own processes
        raise UserError(f"--nproc {args.nproc} is more than the {devices} {kind} here; "
                        f"use --nproc {devices} or fewer")
    args.world_size = int(os.environ["WORLD_SIZE"]) if torchrun else args.nproc


def finite(images):
    """images, or a UserError if sampling overflowed (NaN or inf) and they would be written
    black."""
    if not torch.isfinite(images).all():
        raise UserError("sampling gave images that are not finite (NaN or inf): a guidance weight "
                        "(--cfg_scale, --autoguidance) this large overflows, or the checkpoint's "
                        "weights are not finite; lower the weight, or sample another checkpoint")
    return images


def guidance_grid(model, rows, cfg_scales, noise, times, method="euler"):
    """The effect of a request at a glance: one image (3, H', W') in [0, 1] with a row per attribute
    setting in rows (R, K), a column per guidance weight, each cell the samples of the same noise
    (n, C, H, W) side by side. Runs at the caller's precision (autocast) and device."""
    import torchvision
    cells = []
    for row in rows:
        asked = row.expand(len(noise), -1).to(noise.device)                  # (n, K)
        for cfg_scale in cfg_scales:
            images = finite(sample(model, noise, times, method, asked, cfg_scale))
            cells.append(image_grid(images.cpu(), columns=len(noise)))       # (3, h, n*w)
    return torchvision.utils.make_grid(torch.stack(cells), nrow=len(cfg_scales), padding=8,
                                       pad_value=1.0)


def grid_command(args, model, rows, name, step, device, precision):
    """`sample --grid`: one PNG at name (samples_name), a row per --attributes setting, a column
    per --cfg_scale."""
    check_no_folder_at(name, "the grid")  # before the grid is sampled
    rows = rows if rows is not None else torch.zeros(1, 0)  # unconditional: one row, no request
    size = model.grid * model.patch_size
    noise = torch.randn(args.grid_samples, 3, size, size,
                        generator=torch.Generator().manual_seed(args.seed))
    with autocast(device, precision), attention_kernels(device, model.grid**2):
        grid = guidance_grid(model, rows, args.cfg_scale, noise.to(device),
                             time_grid(args.num_sampling_steps, args.time_power), args.method)
    save_png(grid, name)                                                      # written whole: B
    logs = TensorBoardLogs(experiment_paths(args.exp_name)["logs"], f"{name} is written")
    logs.add_image("attribute_grid", grid, step)
    logs.close()
    settings = " | ".join(setting_text(setting) for setting in args.attributes)
    scales = ", ".join(f"{w:g}" for w in args.cfg_scale)
    print(f"wrote {name}: rows {settings}; columns cfg_scale {scales}")


def resume_command(exp_name):
    """The command that resumes experiment exp_name, run from the current folder: this file's path
    relative to it if the file is there or below, else absolute (quoted if it has spaces)."""
    try:
        path = os.path.relpath(__file__)
    except ValueError:  # Windows: on another drive
        path = None
    if path is None or path.startswith(".."):
        path = os.path.abspath(__file__)
    return f"python {shlex.quote(path)} train --exp_name {exp_name} --resume"


def divergence(loss, grad_norm, step, args):
    """The error that ends a run whose loss or gradients stopped being finite at `step`; its fix
    goes on from the last checkpoint (saved before that step), if any, at half the --lr."""
    saved = resume_checkpoint(experiment_paths(args.exp_name)["checkpoints"]) is not None
    again = (f"{resume_command(args.exp_name)} --lr {args.lr / 2:g}" if saved else
             f"the same command with --lr {args.lr / 2:g}")
    return UserError(f"loss {loss:g}, gradient norm {grad_norm:g} at step {step}: training "
                     f"diverged; lower the learning rate: {again}")


# --------------------------------------------------------------------------------------------------
#                                   B. Ctrl-C, processes, and files written whole
# --------------------------------------------------------------------------------------------------

class Interrupted(Exception):
    """Ctrl-C (or SIGTERM) ended the run cleanly; the message says where it stopped. The CLI exits
    with 130."""


@contextmanager
def sigterm_as_ctrl_c():
    """While a command runs, an unhandled SIGTERM (kill, timeout, a scheduler) raises
    KeyboardInterrupt, so that it cleans up and ends as Ctrl-C does. Left alone where a handler
    has it already (training's InterruptRequest), in a worker of mp.spawn, which spawn stops with
    SIGTERM, and off the main thread, where no handler can be set."""
    if spawned_worker() or threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def spawned_worker():
    """Whether this process is a worker started by mp.spawn (not by torchrun, not the parent)."""
    return multiprocessing.parent_process() is not None


HANG_UP = (signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ()  # Windows has none
INTERRUPTS = (signal.SIGINT, signal.SIGTERM, *HANG_UP)


def hang_up_as_ctrl_c():
    """A closed terminal (SIGHUP, which reaches every process of the command, as a Ctrl-C's
    SIGINT does) counts as one Ctrl-C from here on: what this process would print to that
    terminal, where writing now fails, is dropped, and SIGINT is raised, so that its Ctrl-C handler
    acts (training saves its step). Left ignored where it is (nohup): the run goes on."""
    for s in HANG_UP:
        if signal.getsignal(s) is not signal.SIG_IGN:
            signal.signal(s, hung_up)
    unblock(HANG_UP)  # one held back while this process started (quiet_spawn) arrives now


def hung_up(signum, frame):
    signal.signal(signum, signal.SIG_IGN)  # the shell passes it on, the kernel sends it too: once
    with open(os.devnull, "wb") as nowhere:
        for fd in (1, 2):  # a terminal is a character device (isatty fails once it is gone)
            if stat.S_ISCHR(os.fstat(fd).st_mode):
                os.dup2(nowhere.fileno(), fd)
    signal.raise_signal(signal.SIGINT)


class InterruptRequest:
    """The first Ctrl-C (SIGINT) or SIGTERM (kill, timeout, a cluster's scheduler) asks the training
    loop to stop after the step in flight, so the checkpoint it saves is a consistent one; a second
    Ctrl-C stops at once (a second SIGTERM does not: a scheduler may send one to every process).
    sigterm=False leaves SIGTERM alone: mp.spawn stops the other workers of a failed one with it."""

    def __init__(self, announce=True, sigterm=True):
        self.announce = announce
        self.signals = (signal.SIGINT, signal.SIGTERM) if sigterm else (signal.SIGINT,)

    def __enter__(self):
        self.requested = False
        self.previous = [signal.signal(s, self.handle) for s in self.signals]
        unblock(self.signals)  # a Ctrl-C held back since spawn (quiet_spawn) arrives now
        return self

    def handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.requested and self.announce:
            how = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
            print(f"\n{how}: stopping after this step (Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)
        self.requested = True

    def __exit__(self, *exc):
        for s, previous in zip(self.signals, self.previous):
            signal.signal(s, previous)


def ignore_interrupts(worker_id):
    """DataLoader workers leave Ctrl-C, SIGTERM and a closed terminal's SIGHUP to the training
    process, which stops them when it is done (they start with these held back: interrupts_held).
    On Linux they also die with it when it is killed (kill -9, out of memory), which torch only
    notices within 5 s, or never if it died while they started."""
    for s in INTERRUPTS:
        signal.signal(s, signal.SIG_IGN)
    unblock(INTERRUPTS)  # ignored now: one held back is dropped
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # 1: PR_SET_PDEATHSIG
        if os.getppid() != multiprocessing.parent_process().pid:  # it died before the prctl
            os._exit(1)


def started(loader):
    """iter(loader), whose worker processes start with Ctrl-C, SIGTERM and SIGHUP held back
    (interrupts_held): one that comes while they start (spawned: seconds of importing torch) waits
    until ignore_interrupts has them ignore it, and stops the training process alone, after its
    step."""
    if loader.num_workers == 0:  # no process to start
        return iter(loader)
    with interrupts_held(*INTERRUPTS):
        return iter(loader)


@contextmanager
def interrupts_held(*signals):
    """Hold back (block) `signals` in this thread while it starts processes: they inherit the
    block, so one that arrives before a child has set its handlers waits, pending, instead of
    killing it (KeyboardInterrupt in its imports) or being lost (ignored); the child unblocks
    them once its handlers are set, as multiprocessing's resource tracker does. No-op where
    there are no signal masks (Windows)."""
    if hasattr(signal, "pthread_sigmask"):
        start_resource_tracker()  # its start would unblock them
        signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        unblock(signals)


def start_resource_tracker():
    """multiprocessing's resource tracker (which removes what killed processes leave behind)
    ignores Ctrl-C and SIGTERM; started with SIGHUP ignored, which a program keeps, it ignores a
    closed terminal too, instead of dying and being restarted by the next process to need it."""
    previous = [signal.signal(s, signal.SIG_IGN) for s in HANG_UP]
    try:
        multiprocessing.resource_tracker.ensure_running()
    finally:
        for s, handler in zip(HANG_UP, previous):
            signal.signal(s, handler)


def unblock(signals):
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)


def stopped_by_ctrl_c(args, step, world_size):
    """After Ctrl-C: every rank waits until rank 0 has saved step `step`, then leaves, saying so."""
    if world_size > 1:
        dist.barrier()
    last = experiment_paths(args.exp_name)["checkpoints"] / "last.pt"
    raise Interrupted(f"interrupted at step {step}; {last} holds step {step}; resume with: "
                      f"{resume_command(args.exp_name)}")


def train_worker(rank, world_size, args, device_type):
    """The training loop of one process. Rank 0 alone writes logs, samples and checkpoints."""
    device = distributed_setup(rank, world_size, device_type)  # F: the process group, the device
    if spawned_worker():  # the command's own process has it from main (B)
        hang_up_as_ctrl_c()
    try:
        if world_size > 1:  # under torchrun each process resolved --precision: follow rank 0's
            choice = [args.resolved_precision]
            dist.broadcast_object_list(choice, src=0)
            args.resolved_precision = choice[0]
        tokens = (args.image_size // args.patch_size) ** 2
        with attention_kernels(device, tokens), \
                InterruptRequest(rank == 0, sigterm=not spawned_worker()) as interrupt:  # F, B
            if world_size == 1:
                train_until_stopped(rank, world_size, args, device, interrupt)
            else:  # rank 0 says why; spawn sees the exit status, and the parent exits with it
                exit_on_user_error(train_until_stopped, rank, world_size, args, device, interrupt,
                                   quiet=rank > 0)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
            # after a collective returns, gloo's threads still drop its tensors, which takes the
            # GIL; a thread asking for it while Python shuts down is ended inside a C++ destructor
            # and the process aborts (SIGABRT). Sleeping releases the GIL so that they finish first
            # (0.1 s: a wide margin over their microseconds, not a guarantee).
            time.sleep(0.1)


def train_until_stopped(rank, world_size, args, device, interrupt):
    """train_loop; a second Ctrl-C stops it mid-step, and its line says what to resume; a Ctrl-C
    or SIGTERM after the last step (while it was validated or saved) hears that the run is done."""
    try:
        train_loop(rank, world_size, args, device, interrupt)
    except KeyboardInterrupt:
        raise Interrupted(f"stopped at once; {where_to_resume(args)}") from None
    if interrupt.requested and rank == 0:
        path = resume_checkpoint(experiment_paths(args.exp_name)["checkpoints"])
        print(f"the stop came after the last step: the run is complete; {path} holds step "
              f"{saved_step(path)}", file=sys.stderr, flush=True)


def check_folders(*folders):
    """Refuse, before any work, a file that stands where one of these folders (or a folder above
    it) will be made."""
    for folder in folders:
        for path in (folder, *folder.parents):
            if path.exists() and not path.is_dir():
                raise UserError(f"{path} is a file, where celebgen keeps a folder; move it away")


def check_no_folder_at(path, what):
    """Refuse, before any work, a folder standing where the file `path` (what) will be written."""
    if path.is_dir():
        raise UserError(f"{path} is a folder, where {what} goes; move it away")


def check_experiment(args, exp):
    """The experiment's folder as `train` needs it: no file where a folder or args.json goes, and
    no run to overwrite (without --resume)."""
    check_folders(exp["checkpoints"], exp["logs"], exp["samples"])
    if (exp["root"] / "args.json").is_dir():
        raise UserError(f"{exp['root'] / 'args.json'} is a folder, where the run's arguments go; "
                        f"move it away, or choose another --exp_name")
    if not args.resume and resume_checkpoint(exp["checkpoints"]) is not None:
        raise UserError(f"experiment {exp['root']} already exists; add --resume to continue it, "
                        f"or choose another --exp_name")
    for name in ("last.pt", "best.pt", "guide.pt"):  # a run would fail at its first save
        check_no_folder_at(exp["checkpoints"] / name, f"the run's {name}")
    if exp["checkpoints"].is_dir():  # a resume: a read-only folder fails now, not at a save
        writable_folder(exp["checkpoints"])


@contextmanager
def experiment_lock(args, first):
    """One writer per experiment: experiments/{exp_name}/train.lock names the process (PID, host
    and the folder it locked) that trains it, from its checks to its end. A second `train` of the
    experiment is refused in one line naming that process; the lock of a process that no longer
    runs (killed), or one copied here with its folder from another folder of this machine, is
    taken over, with a line saying so. The first process alone (rank 0 under torchrun) takes
    it."""
    if not first:
        yield
        return
    exp = experiment_paths(args.exp_name)
    check_experiment(args, exp)
    lock = exp["root"] / "train.lock"
    mine = f"{os.getpid()} {socket.gethostname()} {exp['root'].resolve()}\n"
    made = [p for p in (exp["root"], *exp["root"].parents) if not p.exists()]  # deepest first
    held = False
    try:
        try:
            exp["root"].mkdir(parents=True, exist_ok=True)
            while not take_lock(lock, mine):
                remove_dead_lock(lock)  # or refuse
            held = True
        except OSError as e:  # a read-only or full disk, before any work
            raise UserError(f"cannot write {lock} ({e.strerror or e}); "
                            f"{write_fix(e, existing_folder(exp['root']))}") from None
        if not args.resume and exp["root"] not in made:  # a start that failed before a save
            print(f"experiment {exp['root']} has no checkpoint yet: starting it afresh", flush=True)
        yield
    finally:
        if held and lock.is_file() and lock.read_text() == mine:
            lock.unlink()
        for folder in made:  # a run refused before it wrote anything leaves nothing
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


def take_lock(lock, text):
    """Create `lock` holding text: True, or False if it exists. A lock that cannot be written whole
    (a full disk) is removed, lest it block the next run."""
    try:
        f = open(lock, "x")  # "x": created by this process, or FileExistsError
    except FileExistsError:
        return False
    try:
        with f:
            f.write(text)
    except BaseException:  # a full disk, or Ctrl-C this instant
        lock.unlink()
        raise
    return True


def remove_dead_lock(lock):
    """Delete a lock whose process no longer runs on this host, or that was copied with its folder
    from another folder of this host, saying so; refuse any other."""
    try:
        pid, host, folder = lock.read_text().rstrip("\n").split(" ", 2)
        pid = int(pid)
    except (OSError, ValueError):  # not celebgen's, or being written this instant
        raise UserError(f"{lock} exists and names no process: if no other `train` of this "
                        f"experiment runs, delete it and run again") from None
    here = host == socket.gethostname()
    if here and Path(folder).is_dir() and not os.path.samefile(folder, lock.parent):
        print(f"taking over {lock}: it was copied from {folder}, with its folder", flush=True)
        lock.unlink(missing_ok=True)
        return
    if here and not process_runs(pid):
        print(f"taking over {lock}: process {pid}, which held it, no longer runs (killed?)",
              flush=True)
        lock.unlink(missing_ok=True)
        return
    raise UserError(f"experiment {lock.parent} is being trained by process {pid} on {host}: wait "
                    f"for it to end, or stop it (Ctrl-C), then run again; if that process is "
                    f"gone, delete {lock}")


def process_runs(pid):
    """Whether process pid runs on this machine (a zombie, killed but not yet reaped, does not)."""
    if os.name == "nt":  # os.kill(pid, 0) would end the process on Windows: assume it runs
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[-1].split()[0] == "Z")


@contextmanager
def quiet_spawn(args):
    """Around mp.spawn: the workers' rendezvous (this machine, a free port, unless set), Ctrl-C is
    left to the workers (they stop after their step; the parent waits for them), a SIGTERM to this
    process is passed on to them as Ctrl-C, and a worker that failed ends this process with its
    status. A worker that said why (a UserError) has printed its line; one killed by a signal could
    not, so its death is told here in one line. Either way spawn stops the other workers (by
    SIGTERM), and logs that it does: expected, not news, so that log is silenced. The workers start
    with Ctrl-C and SIGHUP held back (interrupts_held) until their handlers are set."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    # the resource tracker started for spawn takes this process's -W options: its warning, after
    # that line, of a killed worker's semaphores (which it then removes) is not news either
    quiet = "ignore:resource_tracker:UserWarning"
    if quiet not in sys.warnoptions:  # once, though a notebook may start many runs
        sys.warnoptions.append(quiet)
    ctrl_c = signal.signal(signal.SIGINT, signal.SIG_IGN)

    def pass_on(signum, frame):  # SIGTERM to this process (kill, timeout): once, to the workers,
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as Ctrl-C (their SIGTERM is spawn's)
        for worker in multiprocessing.active_children():
            os.kill(worker.pid, signal.SIGINT)
    term = signal.signal(signal.SIGTERM, pass_on)
    spawn_log = logging.getLogger("torch.multiprocessing.spawn")
    level = spawn_log.level
    spawn_log.setLevel(logging.ERROR)
    try:
        with interrupts_held(signal.SIGINT, *HANG_UP):  # ignored here; the workers get them
            yield
    except mp.ProcessExitedException as e:
        if e.exit_code is not None and e.exit_code < 0:
            print(dead_worker(e.error_index, e.signal_name, args), file=sys.stderr, flush=True)
        sys.exit(e.exit_code if e.exit_code and e.exit_code > 0 else 1)
    finally:
        signal.signal(signal.SIGINT, ctrl_c)
        signal.signal(signal.SIGTERM, term)
        spawn_log.setLevel(level)


def dead_worker(rank, signal_name, args):
    """The line that tells of a worker killed by a signal: which, why it may have been, and the
    checkpoint to resume from."""
    why = (" (the kernel sends SIGKILL when memory runs out: lower --batch_size or --nproc, or "
           "free memory)" if signal_name == "SIGKILL" else "")
    return (f"error: process {rank} of {args.nproc} was killed by {signal_name}{why}; the others "
            f"were stopped; {where_to_resume(args)}")


def where_to_resume(args):
    """After a run stopped without saving its step: the checkpoint to resume from, and how."""
    path = resume_checkpoint(experiment_paths(args.exp_name)["checkpoints"])
    if path is None:
        return "no checkpoint was written yet: run the same command again"
    return (f"{path} (step {saved_step(path)}) is intact; resume with: "
            f"{resume_command(args.exp_name)}")


def gathered(x, world_size):
    """(world_size * B, ...): the tensor x (B, ...) of every process, in rank order."""
    if world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def create_experiment(args):
    """experiments/{exp_name}/ and its folders; args.run_id, which names the run for good (a resume
    keeps it) in its checkpoints and args.json, for check_own_run."""
    args.run_id = getattr(args, "run_id", None) or os.urandom(8).hex()
    exp = experiment_paths(args.exp_name)
    for folder in ("checkpoints", "logs", "samples"):
        exp[folder].mkdir(parents=True, exist_ok=True)
    for stale in exp["checkpoints"].glob("*.tmp"):  # a save that a kill cut short
        stale.unlink()


def write_arguments(args, exp):
    """args.json: the arguments of the run as it trains, rewritten (whole) by each resume with the
    flags it changed (--epochs, --max_minutes, ...); a resume with nothing to do leaves it. A record
    for the reader (each checkpoint holds the arguments): a disk that refuses it stops nothing."""
    try:
        with written_whole(exp["root"] / "args.json") as tmp:
            tmp.write_text(json.dumps(vars(args), indent=2))
    except OSError as e:
        print(f"cannot write {exp['root'] / 'args.json'} ({e.strerror or e}); training goes on "
              f"(each checkpoint holds the arguments)", file=sys.stderr, flush=True)


class TensorBoardLogs:
    """A TensorBoard writer (in training, rank 0's). The logs are a record for the reader, as
    args.json is: a write that fails (a full disk) is said in one line and ends the logging, not
    the command (`goes_on` says what does), which stops in one line only if its own output (a
    checkpoint, a PNG, fid.py's result) cannot be written."""

    def __init__(self, folder, goes_on="training goes on without them"):
        from torch.utils.tensorboard import SummaryWriter  # imported here: only rank 0 pays for it
        self.folder, self.goes_on, self.writer = folder, goes_on, None
        threading.excepthook = quiet_log_thread  # its writer thread's error: said once, below
        try:
            self.writer = SummaryWriter(folder)
        except OSError as e:
            self.stop(e)

    def add_scalar(self, tag, value, step):
        self.write("add_scalar", tag, value, step)

    def add_image(self, tag, image, step):
        self.write("add_image", tag, image, step)

    def close(self):
        self.write("close")

    def write(self, method, *args):
        if self.writer is not None:
            try:
                getattr(self.writer, method)(*args)
            except OSError as e:  # its writer thread ends at its first error: so do the logs
                self.stop(e)

    def stop(self, e):
        print(f"cannot write the TensorBoard logs in {self.folder} ({e.strerror or e}); "
              f"{self.goes_on}", file=sys.stderr, flush=True)
        self.writer = None


def quiet_log_thread(hook):
    """threading.excepthook: TensorBoard's writer thread's OSError without its traceback, as the
    next write raises it again, for TensorBoardLogs to say in one line; any other as usual."""
    if not (isinstance(hook.exc_value, OSError) and
            type(hook.thread).__module__.startswith("tensorboard.")):
        threading.__excepthook__(hook)


@contextmanager
def written_whole(path):
    """`with written_whole(path) as tmp:` write tmp (next to path); when the block ends it is
    renamed over path -- atomic: path is the old file or the new one, never half of one -- or
    deleted if the block failed (a full disk, Ctrl-C)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # this process's: not another's
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def to_unit(images):
    return ((images.float().cpu() + 1) / 2).clamp(0, 1)


def image_grid(images, columns=None):
    """(B, C, H, W) in [-1, 1] -> one (C, rows*H, columns*W) grid in [0, 1] with 2-pixel gaps."""
    import torchvision
    columns = columns or math.ceil(math.sqrt(len(images)))
    return torchvision.utils.make_grid(to_unit(images), nrow=columns, padding=2, pad_value=1.0)


def save_png(image, path, then="run the command again"):
    """(C, H, W) in [0, 1] -> an 8-bit PNG (lossless, so FID reads exactly what was generated),
    whole or absent after a full disk or Ctrl-C; a failed write says how to go on: `then`."""
    array = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    try:
        with written_whole(path) as tmp:
            Image.fromarray(array).save(tmp, format="PNG")
    except OSError as e:  # a full disk, no permission, a folder in the way
        # a sample's .partial folder is deleted on failure: name the folder it was to replace into
        folder = path.parent.parent if path.parent.suffix == ".partial" else path.parent
        fix = "move that folder away" if path.is_dir() else write_fix(e, folder)
        raise UserError(f"cannot write {path} ({e.strerror or e}); {fix}, then {then}") from None


def save_step_grid(grid, exp, step):
    """A training run's grid of step `step` in its samples folder; a failed write names how the run
    goes on (how_to_continue)."""
    save_png(grid, exp["samples"] / f"step_{step:07d}.png", how_to_continue(exp["checkpoints"]))


def how_to_continue(checkpoints):
    """How a run whose checkpoints are in that folder goes on after it stopped on an error."""
    return ("run the same command again" if resume_checkpoint(checkpoints) is None else
            "resume with --resume")


def save_checkpoint(path, state):
    """torch.save(state) to a temporary file, flushed to the disk (fsync), renamed over path: the
    rename is atomic, so a crash or a full disk mid-save leaves the previous checkpoint intact."""
    try:
        with written_whole(path) as tmp, open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on the disk before the rename makes them last.pt
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)  # and the rename itself survives a power cut
        finally:
            os.close(folder)
    except (OSError, RuntimeError) as error:  # a full disk, a lost mount, no permission
        e = error if isinstance(error, OSError) else error.__context__
        if isinstance(e, KeyboardInterrupt):  # a second Ctrl-C mid-write, under torch.save's error
            raise KeyboardInterrupt from None
        if not isinstance(e, OSError):  # torch.save raises a RuntimeError over a failed write
            raise
        raise UserError(f"cannot write {path} ({e.strerror or e}); the previous {path.name}, if "
                        f"any, is intact; {write_fix(e, path.parent)}, then "
                        f"{how_to_continue(path.parent)}") from None


def writable_folder(folder):
    """Make folder (and its parents), and create and delete a file in it: a read-only disk or
    folder fails here, in one line, before the work that would fill it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise UserError(f"cannot write in {folder} ({e.strerror or e}); "
                        f"{write_fix(e, existing_folder(folder))}, then run the command again"
                        ) from None


def not_found(path):
    """'does not exist', with the likely cause for a path that starts with ~ (quoted, a shell
    leaves it as it is)."""
    tilde = " (a ~ in quotes is not your home: leave it unquoted, or write the full path)"
    return "does not exist" + (tilde if str(path).startswith("~") else "")


def existing_folder(path):
    """path, or the nearest folder above it that exists: where a write's fix applies."""
    return next(p for p in (path, *path.parents) if p.exists())


def write_fix(e, folder):
    """What to do about the OSError e met writing into folder: get permission, free space, look
    at the folder (gone, or its disk failing), or, for any other error, act on its reason."""
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"make {folder} writable"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free some space"
    if e.errno in (errno.EIO, errno.ENOENT, errno.ESTALE):
        return f"check that {folder} still exists and its disk works"
    return "remove the cause given in brackets"


def remove_leftovers(out):
    """Delete the folders out.PID.partial and out.PID.old that a killed process left beside out
    (or one of this process's number); a running process's are its work in progress."""
    for path in out.parent.glob(f"{out.name}.*.*"):
        pid, end = path.name.split(".")[-2:]
        if end in ("partial", "old") and pid.isdigit() and \
                (int(pid) == os.getpid() or not process_runs(int(pid))):
            shutil.rmtree(path, ignore_errors=True)


def write_samples_whole(batches, out, total):
    """Write the images of `batches` as out/000000.png, ... by way of a folder of this process's
    own, out.PID.partial/, which replaces out/ only when complete: the folder never holds a
    cut-short set, nor mixes these images with those of an earlier run (another checkpoint behind
    last.pt, more samples), nor with those of a `sample` running beside this one. out.png, the grid
    of the images replaced, is deleted before the swap, and the grid of the first 64 new ones is
    written after it. Returns the count, how many the grid shows, and, if it replaced a folder,
    ' (in place of the N images there before)'."""
    count, first, before = 0, [], ""
    partial, old = (out.with_name(f"{out.name}.{os.getpid()}.{end}") for end in ("partial", "old"))
    if out.exists() and not out.is_dir():  # checked before the first image is sampled
        raise UserError(f"{out} is a file, where the samples go; move it away")
    grid = out.with_name(f"{out.name}.png")
    check_no_folder_at(grid, "the samples' grid")
    remove_leftovers(out)
    try:
        partial.mkdir()
    except OSError as e:
        raise UserError(f"cannot write into {out.parent} ({e.strerror or e}); "
                        f"{write_fix(e, out.parent)}") from None
    try:
        for images in batches:  # written as they come: memory does not grow with --num_samples
            for image in to_unit(images):
                save_png(image, partial / f"{count:06d}.png")
                count += 1
            first += list(images[:64 - len(first)])
        grid.unlink(missing_ok=True)  # the grid of the images replaced
        if out.is_dir():
            before = f" (in place of the {len(list(out.glob('*.png')))} images there before)"
            out.rename(old)
        partial.rename(out)  # between these two renames, and only there, there is no out/
        shutil.rmtree(old, ignore_errors=True)
        save_png(image_grid(torch.stack(first)), grid)
    except KeyboardInterrupt:
        if old.is_dir() and not out.exists():  # stopped between the two renames: undo the first
            old.rename(out)
        if not partial.exists():  # stopped after the swap: the new images are all there
            shutil.rmtree(old, ignore_errors=True)
            grid_fate = "" if grid.exists() else f"; {grid.name}, their grid, was not written"
            raise Interrupted(f"interrupted; {out}/ holds all {count} images{grid_fate}") from None
        was = "is as it was" if out.is_dir() else "was not made"
        raise Interrupted(f"interrupted after {count} of {total} images; {out}/ {was}: run the "
                          f"command again to write them") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return count, len(first), before


# --------------------------------------------------------------------------------------------------
#                                   C. Checkpoints that are checked, and resumes that are exact
# --------------------------------------------------------------------------------------------------

MODEL_ARGS = ("model", "image_size", "patch_size", "attributes")  # what the weights depend on
# what a resumed run must keep so that it continues exactly: its images (their kind, and how many
# train and val images there are: the same images moved elsewhere resume, other numbers do not),
# the data order and position in the epoch (seed, batch size, processes), the example times, and
# the validation set and loss that pick best.pt
RESUME_FIXED = ("dataset", "train_images", "val_images", "batch_size", "world_size", "seed",
                "t_mu", "t_sigma", "t_eps", "pair_noise", "val_size")
CHECKPOINT_KEYS = ("model", "ema", "optimizer", "step", "best_val", "args")
# What the weights mean: the same tensors under another version of the network's arithmetic load
# without an error and draw noise, so a checkpoint records the version it was trained under.
# 1 (written without the key): RMSNorm on q and k, RoPE on channel halves, DiT's tanh GELU;
# 2: LayerNorm on q and k, RoPE on adjacent channel pairs, the exact GELU (sections 3 and 4).
ARCHITECTURE = 2


def checkpoint_path(exp_name, checkpoint):
    """--checkpoint: a name (last.pt, best.pt) in the checkpoints/ of an experiment that exists,
    before a file of that name here; or a path with a folder in it, such as ./last.pt, as given
    (load_checkpoint refuses a folder, or a path that does not exist)."""
    exp, bare_name = experiment_paths(exp_name), Path(checkpoint).name == checkpoint
    if bare_name and (exp["checkpoints"] / checkpoint).exists():
        return exp["checkpoints"] / checkpoint
    if not bare_name:  # a path, as given
        return Path(checkpoint)
    if not exp["root"].is_dir():  # a mistyped --exp_name never falls back to a file here
        state = "is a file" if exp["root"].exists() else "does not exist"
        raise UserError(f"there is no experiment {exp_name} ({exp['root']} {state}); "
                        f"{experiments_here() or 'pass as --exp_name a folder of experiments/'}")
    return Path(checkpoint) if Path(checkpoint).exists() else exp["checkpoints"] / checkpoint


def resume_checkpoint(checkpoints):
    """In the folder `checkpoints`: last.pt, or for a run killed before its first last.pt was
    written the later of best.pt and guide.pt (each a whole checkpoint); None without any."""
    if (checkpoints / "last.pt").is_file():
        return checkpoints / "last.pt"
    found = [checkpoints / n for n in ("best.pt", "guide.pt") if (checkpoints / n).is_file()]
    return max(found, key=saved_step, default=None)


def saved_step(path):
    """The step of checkpoint `path`, read without loading its tensors; -1 if it is unreadable
    (load_checkpoint then says why)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"]
    except Exception:
        return -1


def experiments_here():
    """The fix for a command run in a folder without experiments/ (train makes it where it runs),
    else ''."""
    if Path("experiments").is_dir():
        return ""
    return f"there is no experiments/ in {Path.cwd()}: run the command where train ran"


def saved_arguments(exp_name):
    """The arguments saved in the checkpoint that --resume continues from."""
    exp = experiment_paths(exp_name)
    checkpoint = resume_checkpoint(exp["checkpoints"])
    if checkpoint is None:
        fix = experiments_here() or f"drop --resume to start experiment {exp_name!r}"
        raise UserError(f"nothing to resume: {exp['checkpoints']} holds no last.pt, best.pt or "
                        f"guide.pt; {fix}")
    saved = load_checkpoint(checkpoint)["args"]
    check_own_run(exp, checkpoint, saved)
    return saved


def check_own_run(exp, checkpoint, saved):
    """Refuse a checkpoint copied into the folder of another run: the folder's args.json (written
    by each start of its run) names another run (run_id; older runs: other fixed arguments), and a
    resume would overwrite that run's best.pt and mix the two runs' grids and logs. A checkpoint
    copied into a folder without args.json, or a whole experiment copied or renamed, resumes."""
    try:
        own = json.loads((exp["root"] / "args.json").read_text())
    except (OSError, ValueError):  # none, or unreadable: a record for the reader only
        return
    keys = [k for k in ("run_id", *MODEL_ARGS, *RESUME_FIXED)
            if isinstance(own, dict) and k in own and k in saved]
    theirs = json.loads(json.dumps({k: saved[k] for k in keys}))  # tuples as lists, as own's
    differ = [f"{k} {theirs[k]} vs {own[k]}" for k in keys if theirs[k] != own[k]]
    if differ:
        raise UserError(f"{checkpoint} is of another run than {exp['root'] / 'args.json'} "
                        f"({', '.join(differ)}): a resume would overwrite that run's files; copy "
                        f"the checkpoint into experiments/NEW/checkpoints/ and resume NEW, or "
                        f"remove args.json if this folder is the checkpoint's own run")


def load_checkpoint(path):
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else not_found(path)
        raise UserError(f"checkpoint {path} {what}; list the experiment's checkpoints/ folder or "
                        f"pass --checkpoint with a path to a file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError:
        raise UserError(f"checkpoint {path} cannot be read (permission denied); give this user "
                        f"read access to it") from None
    except Exception as e:  # a truncated zip or a bad pickle: "unreadable"; another file: named
        if not torch_archive(path):
            raise UserError(f"{path} is not a PyTorch file, so not a checkpoint; pass a "
                            f"last.pt or best.pt written by celebgen.py train") from None
        other = ("last.pt" if path.name == "best.pt" else
                 "best.pt (to --resume from it: move last.pt away)")
        raise UserError(f"checkpoint {path} is unreadable ({type(e).__name__}): it is truncated or "
                        f"corrupt; use another checkpoint such as {other}") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if not missing:
        saved = ckpt["args"] if isinstance(ckpt["args"], dict) else {}
        saved.setdefault("attributes", [])  # written before conditioning existed: unconditional
        saved.setdefault("pair_noise", False)  # written before pairing existed: unpaired
        missing = [f"args.{k}" for k in MODEL_ARGS if k not in saved]
    what = (f"no {', '.join(missing)}" if missing else
            saved_args_problem(ckpt["args"]) or model_args_problem(ckpt["args"]))
    if what:
        raise UserError(f"{path} is not a CelebGen checkpoint ({what}); pass a last.pt or best.pt "
                        f"written by celebgen.py train")
    version = ckpt.get("architecture", 1)  # written without the key: version 1
    if version != ARCHITECTURE:
        raise UserError(f"{path} was trained by a celebgen.py of network version {version}, whose "
                        f"blocks compute differently from this one's (version {ARCHITECTURE}); "
                        f"train it again, or sample it with that celebgen.py (version 1: git "
                        f"checkout 533a38b)")
    return ckpt


def torch_archive(path):
    """Whether path may be what torch.save writes: a zip archive holding a data.pkl (an .npz is a
    zip without one), or one cut short, which cannot be listed."""
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            return False
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("data.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return True


def saved_args_problem(saved):
    """The first saved argument that `train`'s flag of its name would refuse (an edited file), as
    '--flag value: why', or '' (--attributes, a list: model_args_problem)."""
    for action in make_parser()[1]._actions:
        value = saved.get(action.dest, action.default)
        if (type(value), value) == (type(action.default), action.default) or \
                isinstance(action.default, list):
            continue
        if action.nargs == 0:  # a switch
            why = "" if isinstance(value, bool) else "not true or false"
        elif action.choices is not None:
            why = "" if value in action.choices else f"not one of {', '.join(action.choices)}"
        elif isinstance(value, bool) or not isinstance(value, (str, int, float)):
            why = "not a value of a flag"
        else:
            try:
                why = "" if (action.type or str)(str(value)) == value else "not what the flag reads"
            except argparse.ArgumentTypeError as e:
                why = str(e)
        if why:
            return f"--{action.dest} {value!r}: {why}"
    return ""


def model_args_problem(saved):
    """What in the saved MODEL_ARGS, each a value its flag takes (saved_args_problem), no `train`
    writes all the same, or '': patches that do not tile the image, attributes that are not a list
    of names."""
    size, patch, names = saved["image_size"], saved["patch_size"], saved["attributes"]
    if size % patch:
        return f"image_size {size} with patch_size {patch}"
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return f"attributes {names!r}"
    return ""


def load_model(ckpt, device, use_ema=True):
    """A loaded checkpoint's network (its EMA by default), to sample; unfit weights fail here."""
    model = build_model(argparse.Namespace(**ckpt["args"]))
    load_weights(model, ckpt["ema" if use_ema else "model"], ckpt["args"])
    return model.to(device).eval()


def with_guide(model, ckpt, path, weight, device, use_ema=True):
    """The model of checkpoint `path` (loaded: ckpt) autoguided with `weight` (section 7) by the
    guide.pt beside it, whose EMA (or raw weights: use_ema=False) guides; the model alone for
    weight 1, and when find_guide finds no guide to use."""
    guide_ckpt, weight = find_guide(path, ckpt, weight)
    if guide_ckpt is None:
        return model
    try:
        guide = load_model(guide_ckpt, device, use_ema)
    except UserError as e:  # say which file: the command named another checkpoint
        raise UserError(f"{Path(path).parent / 'guide.pt'}: {e} Or pass --autoguidance 1 to "
                        f"sample without it") from None
    guided = Autoguided(model, guide, weight)
    guided.guide_step = guide_ckpt["step"]  # the run's step in guide.pt: fid.json records it
    return guided


def find_guide(path, ckpt, weight):
    """(guide.pt beside checkpoint `path` (loaded: ckpt), loaded; the weight), or (None, 1.0) for
    weight 1, for none asked (None) for a model trained with --attributes (there it cost
    agreement with the request: RESULTS.md), when there is no guide.pt (a run stopped before
    GUIDE_AT of its length) and when it is not earlier than the checkpoint (guide.pt itself; a run
    of one step). A weight asked for needs a guide earlier than the checkpoint; a guide.pt must be
    readable and of the checkpoint's model."""
    guide = Path(path).parent / "guide.pt"
    if weight == 1 or weight is None and ckpt["args"]["attributes"]:
        return None, 1.0
    if not guide.exists():
        if weight is not None:
            raise UserError(f"--autoguidance {weight:g} needs {guide}, which train writes at "
                            f"{GUIDE_AT:.0%} of a run, and there is none; drop --autoguidance")
        print(f"no {guide}: sampling without autoguidance", flush=True)
        return None, 1.0
    try:
        guide_ckpt = load_checkpoint(guide)
    except UserError as e:  # its advice would be another --checkpoint: not what helps here
        raise UserError(f"{str(e).split(';')[0]}; it guides sampling: pass --autoguidance 1 to "
                        f"sample without it, or delete it") from None
    if any(guide_ckpt["args"][k] != ckpt["args"][k] for k in MODEL_ARGS):
        raise UserError(f"{guide} is not of the model of {path} (other {', '.join(MODEL_ARGS)}): "
                        f"one of them is another run's; pass --autoguidance 1 to sample "
                        f"{Path(path).name} without a guide")
    if guide_ckpt["step"] >= ckpt["step"]:
        why = ("is the checkpoint being sampled (a model cannot guide itself)"
               if guide.resolve() == Path(path).resolve() else
               f"(step {guide_ckpt['step']}) is not earlier than {path} (step {ckpt['step']})")
        if weight is not None:
            raise UserError(f"{guide} {why}, so --autoguidance {weight:g} has no guide; drop "
                            f"--autoguidance")
        print(f"{guide} {why}: sampling without autoguidance", flush=True)
        return None, 1.0
    weight = AUTOGUIDANCE if weight is None else weight
    run = guide_ckpt["args"].get("exp_name")  # a guide copied from another run is named
    other = f" of experiment {run}" if run != ckpt["args"].get("exp_name") else ""
    print(f"autoguidance {weight:g} by {guide} (step {guide_ckpt['step']}{other})", flush=True)
    return guide_ckpt, weight


def load_weights(model, state, ckpt_args):
    """model.load_state_dict(state), or a UserError if the weights belong to another model."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError):  # other keys or shapes, or not a state dict
        config = ", ".join(f"--{k} {flag_value(ckpt_args[k])}" for k in MODEL_ARGS)
        raise UserError(f"the checkpoint's weights do not fit the model its arguments describe "
                        f"({config}); was it written by another version of celebgen.py?") from None


def flag_value(value):
    """A saved argument as the command line writes it: a list comma-separated, an empty one or
    None (none), a switch on or off."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "(none)"
    return (",".join(value) or "(none)") if isinstance(value, list) else value


def restore(ckpt, model, ema, optimizer, scaler):
    """Put a run back into the state its checkpoint saved. Returns (step, best_val)."""
    load_weights(model, ckpt["model"], ckpt["args"])
    load_weights(ema, ckpt["ema"], ckpt["args"])
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError, TypeError):
        raise UserError("the checkpoint's optimizer state does not fit its model; start a new "
                        "--exp_name") from None
    if scaler.is_enabled() and ckpt.get("scaler"):  # empty unless the checkpoint was fp16
        scaler.load_state_dict(ckpt["scaler"])
    return ckpt["step"], ckpt["best_val"]


def start_or_resume(args, parts, announce):
    """(step, best_val, seconds of training) of the run: (0, inf, 0) for a new run; for --resume,
    those of the checkpoint, whose weights, EMA, optimizer moments and loss scale are put back into
    place."""
    if not args.resume:
        return 0, math.inf, 0.0
    path = resume_checkpoint(experiment_paths(args.exp_name)["checkpoints"])
    ckpt = load_checkpoint(path)
    step, best_val = restore(ckpt, *parts)
    if announce:  # a last.pt copied in from another experiment continues as this one: said so
        run = ckpt["args"].get("exp_name", args.exp_name)
        origin = f", saved by experiment {run}" if run != args.exp_name else ""
        print(f"resuming {args.exp_name} from step {step} ({path.name}{origin})", flush=True)
    return step, best_val, ckpt.get("elapsed", 0.0)  # no "elapsed": written before time budgets


def say_if_finished(args, step, elapsed, total_steps, budget, announce):
    """Why a resumed run has nothing left to do, printed if announce."""
    if not announce:
        return
    if step >= total_steps:  # the limit that set total_steps is the one to raise
        limit = "--max_steps" if total_steps == args.max_steps else "--epochs"
        print(f"{args.exp_name} is already at step {step} of {total_steps}; raise {limit} to train "
              f"further", flush=True)
    if elapsed >= budget:
        print(f"{args.exp_name} has trained {elapsed / 60:.2f} of its {args.max_minutes:g} "
              f"minutes; raise --max_minutes to train further", flush=True)


# --------------------------------------------------------------------------------------------------
#                                   D. CelebA as people have it: layouts, labels, the download
# --------------------------------------------------------------------------------------------------

# the image files read from a folder: pytorch-fid's list, which fid.py must follow (in lower case)
IMAGE_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")
SPLIT_LAYOUTS = ("ROOT/celeba/img_align_celeba + ROOT/celeba/list_eval_partition.txt "
                 "(torchvision), ROOT/img_align_celeba + ROOT/list_eval_partition.txt (official), "
                 "ROOT/img_align_celeba/img_align_celeba + ROOT/list_eval_partition.csv (Kaggle)")
LAYOUTS_HELP = (f"put CelebA under --data_root in one of these layouts: {SPLIT_LAYOUTS}, or "
                f"ROOT/*.jpg (a plain folder, no split); or use --dataset toy")


def find_celeba(root):
    """Return (image folder, split file or None) for the layouts people actually have."""
    root = Path(root)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else not_found(root)
        raise UserError(f"--data_root {root} {what}; {LAYOUTS_HELP}")
    for folder, split_file in [
        # torchvision, Kaggle's zip, official
        (root / "celeba" / "img_align_celeba", root / "celeba" / "list_eval_partition.txt"),
        (root / "img_align_celeba" / "img_align_celeba", root / "list_eval_partition.csv"),
        (root / "img_align_celeba", root / "list_eval_partition.txt"),
    ]:
        if folder.is_dir():  # its split file, or one in the other format (.txt, .csv) beside it
            split_files = [f for f in (split_file, split_file.with_suffix(".txt"),
                                       split_file.with_suffix(".csv")) if f.is_file()]
            return folder, (split_files[0] if split_files else None)
    return root, None  # a plain folder


def text_lines(path, what):
    """The lines of a text file (UTF-8, a BOM skipped), or one line naming what is wrong with it."""
    try:
        return Path(path).read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not text ({e.reason} at byte {e.start}); is it CelebA's "
                        f"{what}? Fetch it again") from None
    except OSError as e:  # no permission, a failing disk
        raise UserError(f"cannot read {path} ({e.strerror or e})") from None


def read_split_file(path):
    """{file name: 0|1|2} from 'name split' lines (official .txt) or 'image_id,partition' rows
    (Kaggle .csv)."""
    partition = {}
    for line in text_lines(path, "split file"):
        fields = line.replace(",", " ").split()
        if len(fields) == 2 and fields[1].isdigit():  # skips the csv header and blank lines
            partition[fields[0]] = int(fields[1])
    return partition


# PIL's errors for a truncated or corrupt file, and for one so large (more than twice
# Image.MAX_IMAGE_PIXELS) that decoding it could exhaust memory
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def load_pixels(path, size):
    """An image file -> (3, size, size) uint8 tensor. CelebA's 178x218 images get the standard crop;
    other images a centred square crop."""
    with Image.open(path) as img:
        img = img.convert("RGB")  # reads the file now, inside the `with`
    if img.size == (178, 218):
        img = img.crop(CELEBA_CROP)
    else:
        w, h = img.size
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    img = img.resize((size, size), Image.BILINEAR)  # antialiased shrink, as torchvision's Resize
    return image_tensor(img)                                              # (3, size, size) uint8


def image_tensor(img):
    """A PIL image -> (3, H, W) uint8 RGB tensor: how this project turns a picture into numbers."""
    return torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)


class EmptySplit(UserError):
    """No image of a split in the split file: data of some splits only, for which fid.py can
    name another --ref_split."""


def celeba_files(root, split):
    """Sorted image paths of one split; without a split file (a plain folder), all images."""
    folder, split_file = find_celeba(root)
    names = sorted(n for n in os.listdir(folder) if Path(n).suffix[1:].lower() in IMAGE_EXTENSIONS)
    if not names:
        raise UserError(f"no images in {folder}; {LAYOUTS_HELP}")
    if split_file is not None:
        partition = read_split_file(split_file)
        names = [n for n in names if partition.get(n) == SPLITS[split]]
        if not names:
            raise EmptySplit(f"no {split} images in {folder} according to {split_file}; "
                             f"check that the split file belongs to these images")
    return [folder / n for n in names]


def read_or_skip(images, i):
    """The pixels of CelebA image i, or, if its file cannot be read, of the next readable one: each
    unreadable file is reported once, so one bad JPEG never stops a run mid-epoch."""
    for j in range(i, i + len(images.files)):
        path = images.files[j % len(images.files)]
        if path in images.reported:
            continue
        try:
            return read_pixels(images, j % len(images.files))  # E: from the cache or the file
        except UNREADABLE as e:
            report_unreadable(images, path, e)
    raise UserError(f"none of the {len(images.files)} images under {images.files[0].parent} "
                    f"can be read")


def readable_index(images, i):
    """i, or the index of the image that read_or_skip gives in place of an unreadable image i."""
    while images.files[i] in images.reported and len(images.reported) < len(images.files):
        i = (i + 1) % len(images.files)
    return i


def report_unreadable(images, path, error):
    if path not in images.reported:
        images.reported.add(path)
        print(f"warning: skipping unreadable image {path} ({error}); "
              f"{len(images.reported)} skipped so far in this process", file=sys.stderr)


# CelebA's 40 binary attributes, in the order of its list_attr_celeba.txt
ATTRIBUTE_NAMES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose "
    "Black_Hair Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee "
    "Gray_Hair Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard "
    "Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair "
    "Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
).split()
ATTRIBUTE_FILES = ("list_attr_celeba.txt", "list_attr_celeba.csv")  # official, Kaggle
ATTRIBUTE_VALUES = {"1", "-1", "0", "-0"}  # 1 present; -1 absent (0 in copies written with 0/1)


def celeba_labels(root, files, attributes):
    """((len(files), K) labels of `attributes`, how many images have none) from the attribute file
    next to the split file (without one: in the image folder or --data_root); K = 0 and nothing
    read when no attributes are asked for."""
    if not attributes:
        return torch.zeros(len(files), 0), 0
    folder, split_file = find_celeba(root)
    places = [split_file.parent] if split_file else list(dict.fromkeys([folder, Path(root)]))
    found = [place / name for place in places for name in ATTRIBUTE_FILES
             if (place / name).is_file()]
    if not found:
        where = f"next to {split_file}" if split_file else f"in {' or '.join(map(str, places))}"
        raise UserError(f"--attributes needs CelebA's labels, {' or '.join(ATTRIBUTE_FILES)}, "
                        f"{where}; there is none: add it, or train without --attributes")
    return attribute_labels(files, attributes, found[0])


def read_attribute_file(path):
    """(attribute names, {file name: its row as text}) from the official .txt (a count line, a line
    of the names, then 'name v1 .. v40' rows of -1/1) or Kaggle's .csv ('image_id,5_o_Clock_Shadow,
    ...' then rows). A header line is recognised by its names, so a missing count line does no
    harm. Every row is checked here; only the rows of images in use are turned into numbers
    (attribute_labels)."""
    names, rows = None, {}
    for number, line in enumerate(text_lines(path, "attribute file"), 1):
        fields = line.replace(",", " ").split()
        if names is None:
            fields = fields[1:] if fields[:1] == ["image_id"] else fields  # Kaggle's header
            if fields and all(f in ATTRIBUTE_NAMES for f in fields):
                names = fields
        elif len(fields) > 1:
            if len(fields) != len(names) + 1 or not ATTRIBUTE_VALUES.issuperset(fields[1:]):
                raise UserError(f"{path} line {number} is not 'image name' and {len(names)} "
                                f"values of -1/1; is it CelebA's attribute file?")
            rows[fields[0]] = line
    if names is None:
        raise UserError(f"{path} has no line of attribute names; is it CelebA's attribute file?")
    return names, rows


def attribute_labels(files, attributes, attribute_file):
    """(len(files), K) float tensor of -1 (absent), +1 (present) or 0 (unspecified: the image has
    no row in the attribute file), and how many images have no row."""
    names, rows = read_attribute_file(attribute_file)
    missing = [a for a in attributes if a not in names]
    if missing:
        raise UserError(f"{attribute_file} has no column {', '.join(missing)}; it has "
                        f"{', '.join(names)}")
    columns = [names.index(a) + 1 for a in attributes]  # + 1: a row starts with its image name
    labelled = [i for i, path in enumerate(files) if path.name in rows]
    labels = torch.zeros(len(files), len(attributes))
    if labelled:
        values = (rows[files[i].name].replace(",", " ").split() for i in labelled)  # one at a time
        labels[labelled] = torch.tensor([[1.0 if row[c] == "1" else -1.0 for c in columns]
                                         for row in values])
    return labels, len(files) - len(labelled)


# --download fetches the three files celebgen reads from CelebA's Google Drive (ids and MD5s as
# torchvision lists them) with gdown, an optional package, into torchvision's layout.
CELEBA_DRIVE_FILES = (  # (Google Drive id, MD5, file name)
    ("0B7EVK8r0v71pZjFTYXZWM3FlRnM", "00d2c5bc6d35e252742224ab0c1e8fcb", "img_align_celeba.zip"),
    ("0B7EVK8r0v71pY0NSMzRuSXJEVkk", "d32c9cbf5e040fd4025c592c306e6668", "list_eval_partition.txt"),
    ("0B7EVK8r0v71pblRyaVFSWGxPY0U", "75e246fa4810816ffd6ee81facbd244c", "list_attr_celeba.txt"),
)
CELEBA_IMAGES = 202_599
BY_HAND = ("or fetch the files by hand from https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html "
           "(Google Drive: Img/img_align_celeba.zip, Eval/list_eval_partition.txt, "
           "Anno/list_attr_celeba.txt), unzip the images, put list_attr_celeba.txt next to the "
           "split file, and " + LAYOUTS_HELP)


def download_celeba(root):
    """Unless CelebA is under ROOT in a layout with a split file, fetch its aligned images, split
    file and attribute file into ROOT/celeba/ (files there and intact are kept) and unzip the
    images; then check that all 202,599 images and split rows are there."""
    from torchvision.datasets import utils
    import importlib.util
    folder, split_file = find_celeba(root) if Path(root).is_dir() else (None, None)
    if split_file is None:
        if importlib.util.find_spec("gdown") is None:
            raise UserError(f"--download needs the gdown package: pip install gdown; {BY_HAND}")
        target = Path(root) / "celeba"
        try:
            for drive_id, md5, name in CELEBA_DRIVE_FILES:
                utils.download_file_from_google_drive(drive_id, target, name, md5)
            utils.extract_archive(str(target / "img_align_celeba.zip"))
        except Exception as e:  # network, quota or checksum: all end the same way for the user
            first_line = str(e).splitlines()[0] if str(e) else ""
            raise UserError(f"CelebA download failed ({type(e).__name__}: {first_line}); Google "
                            f"Drive often refuses for a day when too many have downloaded; try "
                            f"again later, {BY_HAND}") from None
        folder, split_file = target / "img_align_celeba", target / "list_eval_partition.txt"
    images, rows = len(os.listdir(folder)), len(read_split_file(split_file))
    if images != CELEBA_IMAGES or rows != CELEBA_IMAGES:
        raise UserError(f"{folder} holds {images} images and {split_file.name} {rows} rows, not "
                        f"{CELEBA_IMAGES:,} of each: a download or unzip stopped part way (delete "
                        f"{folder} and run again with --download; an intact zip is not fetched "
                        f"again), or this is not the whole of CelebA (then drop --download)")


def read_image_list(path):
    """The file names that start the lines of --image_list PATH: some, each once."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # -sig: without a byte-order mark
        names = [line.split()[0] for line in text.splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read --image_list {path} ({e})") from None
    repeated = sorted(n for n, times in collections.Counter(names).items() if times > 1)
    if not names:
        raise UserError(f"--image_list {path} names no image; give a file name, such as "
                        f"000001.jpg, at each line's start")
    if repeated:
        raise UserError(f"--image_list {path} names {repeated[0]} (and {len(repeated) - 1} more) "
                        f"twice; give each image once")
    return names


def subset_command(args):
    """`subset`: copy the images that --image_list names (a file name first on each line) out of
    the CelebA under --data_root into --out, in the official layout, with the split file and the
    attribute file (if any) cut down to them: a fixed set that anyone with CelebA can rebuild."""
    if not Path(args.data_root).is_dir():
        raise UserError(f"--data_root {args.data_root} is not a folder; give the folder CelebA is "
                        f"unpacked in, which subset copies from")
    folder, split_file = find_celeba(args.data_root)
    out = Path(args.out)
    if out.name in ("", ".", ".."):
        raise UserError(f"--out {args.out!r} names no new folder; give one to create, e.g. "
                        f"--out data/celeba_subset")
    partial = out.with_name(f"{out.name}.{os.getpid()}.partial")  # this process's own
    if out.resolve().is_relative_to(Path(args.data_root).resolve()):
        raise UserError(f"--out {out} is inside --data_root {args.data_root}, where it would stand "
                        f"for CelebA itself in later runs; choose a folder outside it")
    if split_file is None:
        raise UserError(f"{folder} has no split file: subset copies from CelebA itself, in one of "
                        f"these layouts: {SPLIT_LAYOUTS}")
    if out.exists():
        raise UserError(f"{out} exists; remove it, or choose another --out")
    check_folders(out.parent)  # B: no file where a folder above --out goes
    names = read_image_list(args.image_list)
    split = read_split_file(split_file)
    missing = [n for n in names if n not in split or not (folder / n).is_file()]
    if missing:
        form = (", and does each line start with a bare file name, like 000001.jpg"
                if len(missing) == len(names) else "")  # none found: the list's format, maybe
        raise UserError(f"{len(missing)} of the {len(names)} images of {args.image_list} are not "
                        f"in {folder} with a row of {split_file.name} (e.g. {missing[:1]}); is "
                        f"--data_root all of CelebA{form}?")
    attributes = [split_file.parent / a for a in ATTRIBUTE_FILES
                  if (split_file.parent / a).is_file()][:1]
    remove_leftovers(out)  # B: of a killed subset
    try:
        (partial / "img_align_celeba").mkdir(parents=True)
        for name in names:  # copied, not linked: the set stays whole if CelebA moves
            shutil.copyfile(folder / name, partial / "img_align_celeba" / name)
        (partial / "list_eval_partition.txt").write_text("".join(f"{n} {split[n]}\n"
                                                                 for n in names))
        for path in attributes:
            columns, rows = read_attribute_file(path)
            kept = [" ".join(rows[n].replace(",", " ").split()) for n in names if n in rows]
            (partial / "list_attr_celeba.txt").write_text(
                "\n".join([str(len(kept)), " ".join(columns), *kept]) + "\n")
        partial.rename(out)  # the folder appears whole, or not at all
    except OSError as e:  # no permission, a full disk; or another subset made out meanwhile
        fix = ("another subset made it meanwhile: use it, or remove it and run this again" if
               out.exists() else f"{write_fix(e, out.parent)}, then run the same command again")
        raise UserError(f"cannot write {out} ({e.strerror or e}); {fix}") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    counts = [sum(split[n] == k for n in names) for k in SPLITS.values()]
    print(f"wrote {out}: {len(names)} images (train {counts[0]}, val {counts[1]}, test "
          f"{counts[2]}){' and their attributes' if attributes else ''}")


# --------------------------------------------------------------------------------------------------
#                                   E. The image cache
# --------------------------------------------------------------------------------------------------
# Decoding a JPEG, cropping and resizing it costs the same every epoch, and it costs the training
# threads their cores. So the training split is decoded once into a file of uint8 pixels, (N, 3,
# size, size) in experiments/image_cache/ (12,288 bytes per image at 64x64: 2.0 GB for CelebA's
# 162,770 training images), and memory-mapped: the operating system keeps it in RAM when it fits
# and reads it from disk when it does not. Its name holds a hash of the crop, the size and the file
# list (names, byte sizes, modification times, readability), so changing any of them builds a new
# cache. The cache holds each image as read; flips and noise are drawn per example (FlowExamples).
IMAGE_CACHE = Path("experiments") / "image_cache"


def read_pixels(images, i):
    """(3, size, size) uint8 pixels of CelebA image i, from the image cache if it has one, else
    from the image's file."""
    if images.cache is None:
        return load_pixels(images.files[i], images.size)
    if images.pixels is None:  # mapped on first use, in each process that reads
        shape = (len(images.files), 3, images.size, images.size)
        images.pixels = np.memmap(images.cache, np.uint8, "r", shape=shape)
    return torch.from_numpy(images.pixels[i].copy())  # a copy: the map is read-only


def build_cache(images):
    """Decode the images of a CelebA dataset once into its image cache, unless it is built, and
    read them from the cache from now on."""
    path = image_cache_path(images.files, images.size)  # a stat of every file: once
    images.cache = find_cache(images, path) or write_cache(images, path)


def image_cache_path(files, size):
    """The cache's name; a file made readable (chmod) or a broken link mended makes a new one."""
    digest = hashlib.sha1(repr((CELEBA_CROP, size, str(files[0].parent.resolve()))).encode())
    for path in files:
        try:
            stat = path.stat()
            key = f"{stat.st_size} {stat.st_mtime_ns} {os.access(path, os.R_OK)}"
        except OSError:  # a broken link: decoded as unreadable, so skipped
            key = "missing"
        digest.update(f"{path.name} {key}\n".encode())
    return IMAGE_CACHE / f"{len(files)}x{size}px-{digest.hexdigest()[:16]}.u8"


def find_cache(images, path=None):
    """The path of a CelebA dataset's image cache if it has been built, else None (also for a file
    of the wrong size, cut short outside celebgen, which build_cache then replaces); the files it
    found unreadable are reported again. path: image_cache_path's, if the caller has it."""
    path = path or image_cache_path(images.files, images.size)  # a stat of every file
    unreadable_list = path.with_suffix(".unreadable")
    expected_bytes = len(images.files) * 3 * images.size**2
    if not (unreadable_list.is_file() and path.is_file() and path.stat().st_size == expected_bytes):
        return None
    for name in unreadable_list.read_text().splitlines():
        report_unreadable(images, images.files[0].parent / name,
                          "unreadable when the cache was built")
    return path


def write_cache(images, path):
    """Decode every image of a CelebA dataset into a new image cache at path; the path, or None if
    it cannot be written (a full disk, a read-only folder: each image is then decoded when read)."""
    files, size = images.files, images.size
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")  # only complete caches get
    start = shown = time.monotonic()                                # the cache's name
    print(f"decoding {len(files)} images once into {path} "
          f"({len(files) * 3 * size**2 / 1e9:.2f} GB)", flush=True)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "wb") as out:
            for i, file in enumerate(files):
                try:
                    pixels = load_pixels(file, size)
                except UNREADABLE as e:
                    report_unreadable(images, file, e)
                    pixels = torch.zeros(3, size, size, dtype=torch.uint8)
                out.write(pixels.numpy().tobytes())
                if time.monotonic() - shown > 10:
                    shown, rate = time.monotonic(), (i + 1) / (time.monotonic() - start)
                    print(f"  {i + 1} of {len(files)} images, "
                          f"{(len(files) - i - 1) / rate / 60:.1f} min left", flush=True)
        unreadable = "".join(f"{p.name}\n" for p in sorted(images.reported))
        path.with_suffix(".unreadable").write_text(unreadable)
        os.replace(partial, path)
    except OSError as e:
        print(f"warning: cannot write the image cache {path} ({e}); decoding each image "
              f"when it is read instead, which is slower", file=sys.stderr, flush=True)
        return None
    finally:
        if partial.exists():  # False too where the cache's folder is a file
            partial.unlink()
    print(f"  done in {time.monotonic() - start:.0f} s; later runs on these images reuse it",
          flush=True)
    # nothing deletes an old cache, or one whose build was killed (kill -9): they are counted
    others = [p for p in path.parent.glob("*.u8") if p != path]
    unfinished = len(list(path.parent.glob("*.partial")))  # killed, or being built right now
    if others or unfinished:
        print(f"  {path.parent} also holds {len(others)} other cache{'s' * (len(others) != 1)} "
              f"({sum(p.stat().st_size for p in others) / 1e9:.2f} GB) of other image sizes or "
              f"files, and {unfinished} unfinished (.partial); delete those no run reads",
              flush=True)
    return path


# --------------------------------------------------------------------------------------------------
#                                   F. Choosing the device, the precision and the kernels
# --------------------------------------------------------------------------------------------------
# CPU feature flags do not say reliably what a given PyTorch build does with them, so on the CPU
# --precision auto measures: bf16 where a bf16 matmul runs faster than fp32.

BF16_SPEEDUP_NEEDED = 1.3  # auto picks bf16 on a CPU whose bf16 matmul is this much faster


def pick_device(name):
    """'auto' -> cuda, then mps, then cpu. A device that is not here is a UserError."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(),
                 "cpu": True}
    if name == "auto":
        name = next(kind for kind in ("cuda", "mps", "cpu") if available[kind])
    if not available[name]:
        raise UserError(f"--device {name}, but PyTorch {torch.__version__} sees no {name.upper()} "
                        f"device here; use --device auto (or cpu)")
    return torch.device(name)


@functools.cache
def cpu_matmul_speedup(precision, n=512):
    """fp32 time / `precision` time of an n x n matmul on this CPU, each the best of up to 3 runs
    that stop once they add up to 0.1 s: > 1 where the 16-bit type is native, far below 1 where it
    is emulated."""
    def best_time(dtype):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        a[:64, :64] @ b[:64, :64]  # warm-up: the first call picks and loads the kernel
        times = []
        while len(times) < 3 and sum(times) < 0.1:
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return min(times)
    return best_time(torch.float32) / best_time(AUTOCAST_DTYPES[precision])


def choose_precision(device_type, cuda_capability=None, cpu_bf16_speedup=None):
    """What --precision auto means on a machine, from what was queried or measured:
    (precision, why)."""
    if device_type == "cuda":
        version = "{}.{}".format(*cuda_capability)
        if cuda_capability >= (8, 0):
            return "bf16", f"CUDA compute capability {version} has native bf16"
        return "fp16", (f"CUDA compute capability {version} < 8.0 has no native bf16; fp16 with "
                        f"loss scaling")
    if device_type == "cpu":
        if cpu_bf16_speedup >= BF16_SPEEDUP_NEEDED:
            return "bf16", f"this CPU has bf16 units: bf16 matmul {cpu_bf16_speedup:.2f}x fp32"
        return "fp32", f"this CPU has no fast bf16 units: bf16 matmul {cpu_bf16_speedup:.2f}x fp32"
    return "fp32", f"autocast on {device_type} is untested by celebgen; fp32 runs everywhere"


def resolve_precision(requested, device):
    """--precision -> (bf16 | fp16 | fp32, why). An explicit choice is kept, with a warning where
    it is slow."""
    if requested == "auto":
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        speedup = cpu_matmul_speedup("bf16") if device.type == "cpu" else None
        return choose_precision(device.type, capability, speedup)
    if requested in AUTOCAST_DTYPES and device.type == "cpu" and cpu_matmul_speedup(requested) < 1:
        print(f"warning: {requested} matmuls run at {cpu_matmul_speedup(requested):.2f}x fp32 on "
              f"this CPU: expect a slower run than in fp32; --precision auto picks the fast "
              f"choice", file=sys.stderr)
    return requested, "as asked"


def device_and_precision(device_name, precision_name, announce=True):
    """Resolve --device and --precision; say what was chosen and why (the first line of a run)."""
    device = pick_device(device_name)
    precision, why = resolve_precision(precision_name, device)
    if announce:
        print(f"device {device.type}, precision {precision_name} -> {precision} ({why})",
              flush=True)
    return device, precision


def distributed_setup(rank, world_size, device_type):
    """Join the process group (if any) and set up this process's device: GPU number LOCAL_RANK on
    CUDA."""
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device(device_type)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for what runs outside autocast
    elif device.type == "cpu":
        # PyTorch starts with at most a thread per CPU this process may use (fewer under taskset,
        # a container's CPU set or OMP_NUM_THREADS); the processes of one machine share them
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        torch.set_num_threads(max(1, torch.get_num_threads() // local_world))
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank,
                                world_size=world_size,
                                device_id=device if device.type == "cuda" else None)
    return device


def attention_kernels(device, tokens):
    """Which attention kernel runs a model of `tokens` patches. On the CPU, PyTorch's default
    (flash-attention) kernel is slower than plain matmul + softmax for few tokens and faster for
    many (tests/benchmark_speed.py --sdpa times both), so up to 64 tokens (tiny at 32x32) the CPU
    uses the plain one. GPUs keep the default."""
    return sdpa_kernel(SDPBackend.MATH) if device.type == "cpu" and tokens <= 64 else nullcontext()


def compiled(model):
    """torch.compile: fused kernels for the work between the matmuls, made at the first step.
    Inductor leaves RoPE's complex product to PyTorch's own kernel and warns that this may be
    slower than eager; it is not the bottleneck, so the warning is hidden."""
    warnings.filterwarnings("ignore", "Torchinductor does not support code generation for complex")
    return torch.compile(model)


def flops_per_image(model):
    """Training FLOPs per image, the accounting of PaLM and nanoGPT: a multiply-add is 2 FLOPs and
    backward costs twice forward, so 6 x (multiply-adds of one forward). Per-token layers run on N
    tokens; the time MLP and the modulations run once per image; attention adds q.k and attn.v,
    2 N^2 D per block."""
    tokens, dim = model.grid**2, model.patch_embed.out_features
    per_image = {model.time_mlp[0], model.time_mlp[2], model.final_modulation[-1]}
    per_image |= {block.modulation[-1] for block in model.blocks} | {model.attribute_embed}
    linear = sum(m.weight.numel() * (1 if m in per_image else tokens)
                 for m in model.modules() if isinstance(m, nn.Linear))
    attention = len(model.blocks) * 2 * tokens**2 * dim
    return 6 * (linear + attention)


# --------------------------------------------------------------------------------------------------
#                                   G. Toy faces, drawn
# --------------------------------------------------------------------------------------------------

TOY_ATTRIBUTES = ("Blond_Hair", "Eyeglasses", "Smiling", "Wearing_Hat")  # exact in toy faces


class ToyFaces(Dataset):
    """Offline faces drawn procedurally: a face ellipse with hair, eyes and a mouth, with colours
    and positions drawn from a generator seeded by the index -- image i is the same image on every
    machine. Lets the quickstart, the notebook and the tests run anywhere. Indices start at
    `offset`, so a disjoint validation set is ToyFaces(size, n, offset=10**6). Four CelebA
    attributes are exact labels here, because the picture is drawn from them: blond hair (30% of
    faces), glasses (30%), a smile (a mouth curved up: 65%) and a hat (25%)."""

    unlabelled = 0  # every toy face has all its attributes

    def __init__(self, size, length=50_000, offset=0, attributes=()):
        self.size, self.length, self.offset, self.attributes = size, length, offset, attributes

    def __len__(self):
        return self.length

    def face(self, i):
        """The random choices that make face i, in pixels of the 4x canvas it is drawn on."""
        rng = np.random.default_rng(self.offset + i)
        S = 4 * self.size  # draw at 4x and shrink: smooth, antialiased edges
        colour = lambda lo, hi: tuple(int(c) for c in rng.integers(lo, hi, size=3))
        skin = np.array([224, 172, 140]) * rng.uniform(0.45, 1.1) + rng.integers(-12, 12, 3)
        f = {"S": S, "skin": tuple(int(c) for c in skin), "background": colour(0, 256)}
        f["cx"], f["cy"] = S * rng.uniform(0.42, 0.58), S * rng.uniform(0.5, 0.6)  # face centre
        f["rx"], f["ry"] = S * rng.uniform(0.24, 0.32), S * rng.uniform(0.32, 0.4)  # face radii
        f["hair"] = colour(0, 120)
        f["hair_bottom"] = f["cy"] + rng.uniform(0.0, 0.9) * f["ry"]
        f["face_top"] = f["cy"] - f["ry"] * rng.uniform(0.8, 0.95)
        f["eye_dx"], f["eye_r"] = f["rx"] * rng.uniform(0.35, 0.5), S * rng.uniform(0.035, 0.055)
        f["iris"] = colour(0, 160)
        f["mouth_w"], f["smile"] = f["rx"] * rng.uniform(0.3, 0.6), rng.uniform(-0.08, 0.15) * S
        f["lips"] = colour((150, 20, 30), (230, 90, 100))
        f["Smiling"] = f["smile"] > 0
        f["Blond_Hair"], f["Eyeglasses"], f["Wearing_Hat"] = rng.random(3) < (0.3, 0.3, 0.25)
        if f["Blond_Hair"]:
            f["hair"] = colour((215, 180, 90), (256, 220, 150))
        f["frames"], f["hat"] = colour(0, 50), colour(0, 256)
        return f

    def label(self, i):
        """(K,) values of self.attributes for face i: -1 absent, +1 present."""
        face = self.face(i)
        return torch.tensor([1.0 if face[name] else -1.0 for name in self.attributes])

    def __getitem__(self, i):
        if not 0 <= i < self.length:
            raise IndexError(i)
        f = self.face(i)
        S, cx, cy, rx, ry = f["S"], f["cx"], f["cy"], f["rx"], f["ry"]
        img = Image.new("RGB", (S, S), f["background"])
        draw = ImageDraw.Draw(img)
        draw.ellipse([cx - 1.1 * rx, cy - 1.15 * ry, cx + 1.1 * rx, f["hair_bottom"]], f["hair"])
        draw.ellipse([cx - rx, f["face_top"], cx + rx, cy + ry], f["skin"])
        eye_y, eye_r, frame = cy - 0.2 * ry, f["eye_r"], round(0.03 * S)
        for ex in (cx - f["eye_dx"], cx + f["eye_dx"]):
            draw.ellipse([ex - 1.6 * eye_r, eye_y - eye_r, ex + 1.6 * eye_r, eye_y + eye_r],
                         (245, 245, 245))
            draw.ellipse([ex - 0.8 * eye_r, eye_y - 0.8 * eye_r, ex + 0.8 * eye_r,
                          eye_y + 0.8 * eye_r], f["iris"])
            if f["Eyeglasses"]:  # a dark frame round each eye
                draw.ellipse([ex - 2.4 * eye_r, eye_y - 1.8 * eye_r, ex + 2.4 * eye_r,
                              eye_y + 1.8 * eye_r], outline=f["frames"], width=frame)
        if f["Eyeglasses"]:  # and the bridge between them
            draw.line([cx - f["eye_dx"] + 2.4 * eye_r, eye_y, cx + f["eye_dx"] - 2.4 * eye_r,
                       eye_y], f["frames"], width=frame)
        mouth_w, mouth_y, smile = f["mouth_w"], cy + 0.5 * ry, f["smile"]
        draw.chord([cx - mouth_w, mouth_y - abs(smile) - 2, cx + mouth_w, mouth_y + abs(smile) + 2],
                   0 if smile > 0 else 180, 180 if smile > 0 else 360, f["lips"])
        if f["Wearing_Hat"]:  # a crown over the top of the head and a brim above the eyes
            draw.rectangle([cx - 0.8 * rx, cy - 1.45 * ry, cx + 0.8 * rx, cy - 0.7 * ry], f["hat"])
            draw.rectangle([cx - 1.25 * rx, cy - 0.8 * ry, cx + 1.25 * rx, cy - 0.65 * ry],
                           f["hat"])
        img = img.resize((self.size, self.size), Image.LANCZOS)
        return to_signed(image_tensor(img))


# --------------------------------------------------------------------------------------------------
#                                   H. The run's record: progress, validation, grids, checkpoints
# --------------------------------------------------------------------------------------------------

class Bookkeeping:
    """Rank 0's record of the run: progress lines and TensorBoard scalars, the validation loss and
    best.pt (the lowest validation loss so far: best_val), sample grids, last.pt and guide.pt."""

    def __init__(self, args, device, parts, progress, total_steps, budget, best_val):
        self.args, self.device, self.parts = args, device, parts
        self.total_steps, self.budget, self.best_val = total_steps, budget, best_val
        self.exp = experiment_paths(args.exp_name)
        # `progress`: the share of the run done when it (re)starts
        self.guide_due = guide_due(self.exp["checkpoints"] / "guide.pt", progress, total_steps,
                                   budget)
        self.flops_per_image = flops_per_image(parts.model)                    # F
        self.writer = TensorBoardLogs(self.exp["logs"])  # B: a failed write stops logs, not the run
        write_arguments(args, self.exp)                      # B: args.json, the flags of this run
        self.val = validation_set(make_dataset(args, "val"), args.val_size, args.seed, args.t_mu,
                                  args.t_sigma)
        self.grid_noise = torch.randn(16, 3, args.image_size, args.image_size,
                                      generator=torch.Generator().manual_seed(args.seed + 1))
        self.clock, self.steps_since_log = time.monotonic(), 0
        self.elapsed, self.saved_step = 0.0, -1
        announce_run(self)                                                    # below: what runs

    def after_step(self, step, numbers, elapsed, progress):
        """After step `step` (numbers: loss, lr, gradient norm; `elapsed` s in; progress: the run's
        share done): guide.pt at the first step at or past GUIDE_AT of the run if due, the rest at
        intervals and the end."""
        self.elapsed = elapsed
        self.steps_since_log += 1
        due = lambda every: step % every == 0 or progress >= 1
        if due(self.args.log_every):
            log_progress(self, step, *numbers)                               # below: the speed
        if self.guide_due and progress >= GUIDE_AT:  # the weaker model of autoguidance (section 7)
            self.save("guide.pt", step)
            self.guide_due = False
        if due(self.args.eval_every):
            self.validate(step)
        if due(self.args.ckpt_every):  # before the grid, so a grid that fails loses no step
            self.save("last.pt", step)
        if due(self.args.sample_every):
            self.sample_grid(step)

    def validate(self, step):
        """The EMA's loss on the fixed validation set; a new lowest value is saved as best.pt."""
        val = validation_loss(self.parts.ema, self.val, self.args.t_eps, 4 * self.args.batch_size,
                              self.device, self.args.resolved_precision)
        self.writer.add_scalar("val/loss", val, step)
        new_best = val < self.best_val
        print(f"step {step} | val loss (EMA) {val:.4f}" + (" | new best" if new_best else ""),
              flush=True)
        if new_best:
            self.best_val = val
            self.save("best.pt", step)

    def sample_grid(self, step):
        """16 EMA samples from fixed noise, unconditional: the same faces, getting better."""
        with autocast(self.device, self.args.resolved_precision):
            images = sample(self.parts.ema, self.grid_noise.to(self.device),
                            time_grid(self.args.num_sampling_steps))
        grid = image_grid(images)                                             # B
        self.writer.add_image("samples", grid, step)
        save_step_grid(grid, self.exp, step)  # B: samples/step_0000100.png, written whole

    def save(self, name, step):
        state = checkpoint_state(self.parts, step, self.best_val, self.elapsed, self.args)
        save_checkpoint(self.exp["checkpoints"] / name, state)  # B: whole, or the old one intact
        if name == "last.pt":
            self.saved_step = step

    def close(self, step, stopped):  # after Ctrl-C, last.pt is saved for the step just finished
        if stopped and self.saved_step < step:
            self.save("last.pt", step)
        self.writer.close()


def guide_due(path, progress, total_steps, budget):
    """Whether guide.pt (`path`) is to be saved at GUIDE_AT of a run (re)started at `progress` of
    total_steps steps or budget seconds: unless the run saved it by then, at GUIDE_AT or later.
    One missing, unreadable or saved later (by a run killed before its next last.pt) is saved
    anew; one saved before GUIDE_AT of this run, by a shorter run that --resume extends, is
    replaced if GUIDE_AT is still ahead, else kept, as no EMA of that moment is left to save."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        share = max(saved["step"] / total_steps, saved["elapsed"] / budget)  # as progress is
    except Exception:
        return True
    if share > progress:
        return True
    if share >= GUIDE_AT:
        return False
    print(f"{path} was saved at {share:.0%} of this run, by a shorter one: "
          + (f"it is saved again at {GUIDE_AT:.0%}" if progress < GUIDE_AT else
             f"{GUIDE_AT:.0%} is past, so it stays the guide"), flush=True)
    return progress < GUIDE_AT


def announce_run(book):
    """Bookkeeping's first line: the model, the data, how long, the device, the precision; and a
    note for a run too short to finish its warm-up."""
    args = book.args
    params = sum(p.numel() for p in book.parts.model.parameters()) / 1e6
    until = f" or {args.max_minutes:g} minutes, whichever ends first" if args.max_minutes else ""
    print(f"training {args.model} ({params:.2f}M params) on {args.dataset} {args.image_size}x"
          f"{args.image_size}, {book.total_steps} steps{until}, device {book.device}, "
          f"{args.resolved_precision}, experiment {book.exp['root']}", flush=True)
    if args.warmup_steps > book.total_steps:  # a short trial run with the default warm-up
        print(f"note: the run's {book.total_steps} steps end within --warmup_steps "
              f"{args.warmup_steps}: the learning rate never reaches --lr {args.lr:g}", flush=True)


def log_progress(book, step, loss, lr, grad_norm):
    """Bookkeeping's progress line and TensorBoard scalars: speed in images/s and in model FLOP/s
    (flops_per_image) since the last line, and the time left by steps or by --max_minutes (at the
    speed since the last line)."""
    seconds_per_step = (time.monotonic() - book.clock) / book.steps_since_log
    speed = book.args.batch_size * book.args.world_size / seconds_per_step  # every batch is full
    eta = max(0.0, min((book.total_steps - step) * seconds_per_step, book.budget - book.elapsed))
    print(f"step {step}/{book.total_steps} | loss {loss:.4f} | lr {lr:.2e} | grad "
          f"{grad_norm:.3f} | {speed:.1f} img/s | {speed * book.flops_per_image / 1e12:.3f} "
          f"TFLOP/s | ETA {eta / 60:.1f} min", flush=True)
    for name, value in [("loss", loss), ("lr", lr), ("grad_norm", grad_norm),
                        ("images_per_sec", speed)]:
        book.writer.add_scalar(f"train/{name}", value, step)
    book.clock, book.steps_since_log = time.monotonic(), 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C: KeyboardInterrupt, handled
    hang_up_as_ctrl_c()  # B: a closed terminal, too
    main()
