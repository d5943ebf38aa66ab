"""
CelebGen: a rectified-flow diffusion transformer (DiT) that learns to draw CelebA faces, in a file.

Read it top to bottom: part one follows the data's path. An image x1 and Gaussian noise x0 are
blended into x_t = t*x1 + (1-t)*x0; x_t is cut into patch tokens; a DiT (RoPE attention + AdaIN-Zero
time conditioning) looks at them and predicts the clean image; that prediction is turned into a
velocity and compared with the true velocity x1 - x0. Sampling integrates that velocity from pure
noise (t=0) to an image (t=1). Part two is the machinery that runs it: data, devices, checkpoints,
the trainer, the CLI.

Commands (all from this folder):
    # CPU quickstart: procedurally drawn toy faces, no download, 4 minutes of training on a laptop
    # (the learning rate cools down over the last 20% of them), conditioned on the faces' attributes
    python celebgen.py train --exp_name quickstart --dataset toy --max_minutes 4 --attributes all
    python celebgen.py sample --exp_name quickstart --num_samples 64
    python celebgen.py sample --exp_name quickstart --grid --cfg_scale 0 1 3 \\
        --attributes Blond_Hair=1 Eyeglasses=1 Wearing_Hat=1 Smiling=1,Eyeglasses=0
    # CelebA on a CPU: the defaults are the recipe measured best per CPU-minute on 2 cores (README):
    # DiT "tiny" at 32x32. --compile (it needs a C++ compiler) makes the steps up to 1.24x faster
    python celebgen.py train --exp_name celeba32 --data_root ./data --compile --max_minutes 20
    # CelebA 64x64 on 8 GPUs of this machine (one process per GPU, DDP over NCCL; without --nproc
    # every GPU is used, --nproc 1 uses one): DiT-S with DiT's learning rate and EMA decay
    python celebgen.py train --exp_name celeba64 --data_root ./data --nproc 8 --model small \\
        --image_size 64 --batch_size 32 --lr 1e-4 --ema_decay 0.9999
    # several machines: torchrun starts the processes and this file joins their group
    # (experiments/ must be on a filesystem all machines share, for --resume)
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        celebgen.py train --exp_name celeba64 --data_root ./data --model small --image_size 64 \\
        --batch_size 32 --lr 1e-4 --ema_decay 0.9999
    # continue an interrupted run exactly where its last checkpoint left it
    python celebgen.py train --exp_name celeba64 --resume
    # faces on request: condition on CelebA's attribute labels, then ask, with guidance weight 3
    python celebgen.py train --exp_name attr32 --data_root ./data --attributes Smiling,Eyeglasses,Male
    python celebgen.py sample --exp_name attr32 --attributes Smiling=1,Eyeglasses=1 --cfg_scale 3
Every command picks its device (--device auto: CUDA, then Apple MPS, then CPU) and precision
(--precision auto: bf16 where the hardware has it, fp16 with loss scaling on older GPUs, else fp32),
and its first line says which and why.

Part one, the algorithm:
    1. The straight path   noise and image, x_t between them, the times t training draws
    2. Patches             an image as a sequence of tokens
    3. RoPE                where a token is, as a rotation of its query and key
    4. AdaIN-Zero block    attention + MLP, modulated by time (and attributes), identity at init
    5. DiT                 patches -> blocks -> final AdaIN-Zero layer -> patches: predicts x1
    6. Loss                x-prediction -> velocity -> the v-loss; attribute dropout for guidance
    7. Sampler             Euler (and Heun) from noise to image, classifier-free guidance;
                           `generate` from a checkpoint
Part two, running it:
    8. Data                CelebA and its attribute labels in the layouts people have, its
                           download, the decoded-image cache; toy faces
    9. Device, precision   CUDA / MPS / CPU, and bf16 / fp16 / fp32 autocast
    10. Experiments        experiments/{exp_name}/{checkpoints,logs,samples}, atomic checkpoints
    11. Trainer            reproducible examples, DDP, the training step, EMA, bookkeeping, Ctrl-C
    12. CLI                argparse subcommands `train` and `sample`
"""

import argparse
import copy
import difflib
import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.nn.attention import SDPBackend, sdpa_kernel
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
# tensors (B, 3, H, W) in [-1, 1], the scale of the noise.
# Times come from a logit-normal, t = sigmoid(mu + sigma * n) with n ~ N(0, 1): the defaults,
# mu = -0.4 and sigma = 0.8 (JiT uses -0.8 and 0.8), put most of the training effort (69% of the
# times) at t < 0.5, the noisy end, where the coarse structure of a face is decided. Where the
# effort goes matters more than any other setting measured for short CPU runs (README, Measured:
# FID 57 to 168 over eight 10-minute runs at 32x32, mu = -0.6 the best of them; -0.4, tried
# later, 42.3 against -0.6's 46.7 at 2,500 equal steps): with too few times near
# t = 1 (0.01% above 0.8: 4.8 and 6.9 of two runs' 50,000 examples, expected) the faces came out
# blocky, the sampler's last steps left to a network that had hardly trained there; with sigma = 1
# their structure broke. More times near t = 1 by another route did not help either: with 5% of
# the times drawn uniformly from (0, 1), a 10-minute run drew grainy faces (FID 141, against 66 for
# the recipe beside it; README, fifth session).

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
# row-major order; each patch's p*p*3 numbers become one token (a linear layer in section 5 maps
# them to the model's width D). A 32x32 image with p = 4 is an 8 x 8 grid of N = 64 tokens of
# 48 numbers each.

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
# and k's channels by angles p*w_k, p the token's position, with a geometric bank of frequencies
# w_k. Because rotations satisfy R(a)^T R(b) = R(b - a),
#     <R(p*w) q, R(r*w) k> = <q, R((r - p)*w) k>,
# so an attention logit sees only the *difference* of positions. For images we use axial 2D RoPE:
# half of each head's rotation pairs turn with the patch's row, the other half with its column.
#
# Design note, why time is NOT a rotation: rotating every query and key by the same time angle t*w
# is a shift of all positions by the same amount, and the difference (r - p) is unchanged -- the
# logits, and so attention, would not see t at all. Time enters through AdaIN-Zero instead
# (section 4), as features built from the same frequency bank.

def frequency_bank(n, base):
    """w_k = base^(-k/n) for k = 0..n-1, shape (n,): from 1 radian per unit down to almost 1/base."""
    return base ** (-torch.arange(n, dtype=torch.float32) / n)


def rope_angles(rows, cols, head_dim, base=100.0):
    """Axial 2D RoPE angles for tokens at patch coordinates rows, cols (N,) each -> (N, head_dim/2).
    The first head_dim/4 pairs rotate by row*w_k, the last head_dim/4 by col*w_k. With
    base=100 and head width 64 the fastest pair turns 1 radian per patch and the slowest 0.0133;
    across 8, 16 and 32 patches the slowest turns 0.09, 0.20 and 0.41 radians, less than half a
    turn, so it never wraps around and tells near from far on every grid size celebgen uses."""
    w = frequency_bank(head_dim // 4, base)                                     # (head_dim/4,)
    return torch.cat([rows.float()[:, None] * w, cols.float()[:, None] * w], -1)  # (N, head_dim/2)


def apply_rope(x, angles):
    """Rotate the channel pairs (x_2k, x_2k+1) of x (B, H, N, d) by angles (N, d/2), pair k by angle
    a_k. Read as a complex number z_k = x_2k + i x_2k+1, a rotation by a is a product with
    e^(ia) = cos a + i sin a, as LLaMA writes it:
        z_k e^(ia) = (x_2k cos a - x_2k+1 sin a) + i (x_2k sin a + x_2k+1 cos a).
    One product per pair, so the rotation reads and writes x once (written with cos and sin, as the
    line above, it takes four products, two sums and a concatenation, each a pass over x). In fp32,
    as PyTorch has no bf16 complex numbers; the caller casts back."""
    z = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))               # (B, H, N, d/2) complex
    rotation = torch.view_as_complex(torch.stack([angles.cos(), angles.sin()], -1))   # (N, d/2) e^(ia)
    return torch.view_as_real(z * rotation).flatten(-2)                       # (B, H, N, d) fp32


# --------------------------------------------------------------------------------------------------
#                                   4. AdaIN-Zero block (DiT's adaLN-Zero)
# --------------------------------------------------------------------------------------------------
# Each block is attention and an MLP, each wrapped as
#     x <- x + gate * f( LayerNorm(x) * (1 + scale) + shift )
# where (shift, scale, gate) are regressed from the time embedding c. That is how the network knows
# how noisy its input is. The name: adaptive instance normalisation (AdaIN, from style transfer)
# normalises each channel over an image's positions, then re-scales and re-shifts it by gains
# computed from a condition. DiT's adaLN, used here, normalises each token over its channels
# (LayerNorm) instead; the idea is the same -- normalise, then let the condition choose scale and
# shift. "Zero": the layer that produces (shift, scale, gate) starts at zero, so gate = 0 and every
# block is the identity at initialisation -- a deep stack starts as a shallow, well-behaved network
# and grows into its depth. The time embedding c starts from features
# [cos(1000 t w_k), sin(1000 t w_k)] of section 3's frequency bank.
# Faces on request ride the same path: a vector a of CelebA attributes (Smiling, Eyeglasses, ...),
# each -1 (absent), +1 (present) or 0 (unspecified), is embedded linearly and added to c,
#     c = time_mlp(features(t)) + W a,            a (B, K), W (D, K), c (B, D),
# as DiT adds its class embedding. W has no bias, so a = 0 -- nothing asked -- adds nothing: the
# same network is the unconditional model. The zero-initialised modulation keeps every block the
# identity whatever c is.

def time_features(t, dim, base=10_000.0):
    """[cos(1000 t w), sin(1000 t w)] for t in [0, 1]: (B,) -> (B, dim). The factor 1000 makes the
    fastest frequency turn many times over [0, 1], as DiT's embedding of timesteps 0..999 does."""
    angles = 1000.0 * t.float()[:, None] * frequency_bank(dim // 2, base).to(t.device)  # (B, dim/2)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)                              # (B, dim)


def modulate(x, shift, scale):
    """AdaIN: x * (1 + scale) + shift, a per-sample (B, D) shift and scale broadcast over tokens."""
    return x * (1 + scale[:, None]) + shift[:, None]                          # (B, N, D)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        # Per-head LayerNorm on q and k ("QK-norm", as ViT-22B applies it): each becomes a vector of
        # mean 0 and RMS at most 1 times a learned gain per channel, so, RoPE's rotation keeping
        # lengths, |q.k| / sqrt(d) <= sqrt(d) max|gain_q| max|gain_k| however large the activations
        # grow, and attention does not saturate with a large learning rate or in bf16. (SD3 uses
        # RMSNorm, which bounds the logits alike; PyTorch runs LayerNorm as one fused kernel, forward
        # and backward, and RMSNorm on the CPU as separate operations, four of them passes over q.)
        # The kernel computes its mean and variance in fp32 for bf16 inputs too.
        self.q_norm = nn.LayerNorm(dim // heads, eps=1e-6, bias=False)
        self.k_norm = nn.LayerNorm(dim // heads, eps=1e-6, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope):
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.heads, D // self.heads)           # (B, N, 3, H, D/H)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                                  # (B, H, N, D/H) each
        q = apply_rope(self.q_norm(q), rope).to(v.dtype)                      # (B, H, N, D/H)
        k = apply_rope(self.k_norm(k), rope).to(v.dtype)                      # (B, H, N, D/H)
        x = F.scaled_dot_product_attention(q, k, v)  # flash/fused kernels on GPU  (B, H, N, D/H)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))                  # (B, N, D)


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_ratio=4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)  # AdaIN is the affine
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        # A plain GELU MLP, as in DiT. (LLMs and JiT use SwiGLU, often a little better per FLOP; the
        # plain MLP is simpler to read, and no difference has been measured for this project.) The
        # exact GELU, x Phi(x), not DiT's tanh approximation of it, which PyTorch computes more slowly
        # on the CPU (`tests/benchmark_speed.py --version1` times both, README).
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(),
                                 nn.Linear(mlp_ratio * dim, dim))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        # the "Zero" in AdaIN-Zero: gate = 0, so the block is the identity
        nn.init.zeros_(self.modulation[-1].weight)
        nn.init.zeros_(self.modulation[-1].bias)

    def forward(self, x, c, rope):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).chunk(6, -1)  # (B, D) each
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1), rope)  # (B, N, D)
        x = x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))      # (B, N, D)
        return x


# --------------------------------------------------------------------------------------------------
#                                   5. DiT: a transformer on patches that predicts the clean image
# --------------------------------------------------------------------------------------------------
# Patch tokens -> linear embedding to width D -> blocks -> a final AdaIN-Zero layer -> linear back
# to p*p*3 numbers per token -> patches reassembled. The network predicts the *clean image* x1 (not
# the noise, not the velocity): a clean image lies on the low-dimensional manifold of faces, which a
# network of width D can represent, while noise fills all p*p*3 dimensions of a patch (the argument
# of JiT, "Back to Basics: Let Denoising Generative Models Denoise", Li & He 2025). That argument is
# strongest when a patch holds more numbers than a token's width; here a 4x4 patch holds 48 numbers
# against D = 192 (tiny) or 384 (small), so it applies only weakly, and noise- or
# velocity-prediction might do as well at these sizes (not measured in this project). Section 6
# turns the prediction into a velocity.

# named sizes: width, depth and heads (head width 64 throughout); parameters at 4x4 patches
MODELS = {
    "tiny": dict(dim=192, depth=6, heads=3),     # the default, for CPUs (4.2M parameters)
    "small": dict(dim=384, depth=12, heads=6),   # DiT-S: for CelebA 64x64 on GPUs (33M)
    "base": dict(dim=768, depth=12, heads=12),   # DiT-B, for multi-GPU runs (130M)
}
TIME_FEATURES = 256  # width of the [cos, sin] time features fed to the conditioning MLP


class DiT(nn.Module):
    def __init__(self, image_size, patch_size, dim, depth, heads, num_attributes=0, channels=3):
        super().__init__()
        self.patch_size, self.grid = patch_size, image_size // patch_size
        self.patch_embed = nn.Linear(channels * patch_size**2, dim)
        self.time_mlp = nn.Sequential(nn.Linear(TIME_FEATURES, dim), nn.SiLU(), nn.Linear(dim, dim))
        # W a of section 4; absent from unconditional models, so their checkpoints keep their keys
        self.attribute_embed = nn.Linear(num_attributes, dim, bias=False) if num_attributes else None
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.out = nn.Linear(dim, channels * patch_size**2)
        for layer in (self.final_modulation[-1], self.out):  # zero-init: the new model predicts 0
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
#                                   6. Loss: x-prediction -> velocity -> v-loss
# --------------------------------------------------------------------------------------------------
# The network predicts the clean image x_pred (section 5). Since x0 = (x_t - t x1) / (1 - t), the
# velocity can be written without x0 as v = (x1 - x_t) / (1 - t); substituting the prediction for
# x1,
#     v_pred = (x_pred - x_t) / max(1 - t, t_eps),     v_target = (x1 - x_t) / max(1 - t, t_eps),
#     loss = || v_pred - v_target ||^2 = || x_pred - x1 ||^2 / max(1 - t, t_eps)^2:
# an x-loss weighted by 1 / (1 - t)^2, capped at 1 / t_eps^2 near the image end. For 1 - t >= t_eps
# the target is exactly x1 - x0. Beyond (t > 0.8 with the default t_eps = 0.2: 1.28% of the
# training times; t > 0.95 with JiT's t_eps = 0.05 and times: about one in 700,000) the target is
# clamped like the prediction, as in JiT, so the loss is smallest at x_pred = x1 at every t --
# which is what the sampler assumes when, at its last steps (t = 0.82 to 0.98 of a 50-step run), it
# turns x_pred into a velocity without the clamp. The cap also bounds how much the examples near
# t = 1 weigh: at most 1 / 0.2^2 = 25 with the default (JiT's 0.05: 400), which at 32x32 measured
# better after 2,800 steps (FID 62.5 against 65.8 with 0.05, side by side) and the same after 20
# minutes on 2 cores (38.8 against 38.9, measured on another day).
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


# Training for guidance. To be steered by attributes at sampling time (section 7), one network must
# know three things at once: p(x | a), p(x | some of a) and p(x). So each training example hides
# each of its attributes with probability p_each (set to 0, unspecified), and all of them with
# probability p_all -- 0.1 each by default, the rate at which DiT drops its class label. An
# attribute is then unspecified with probability p_all + (1 - p_all) p_each (tested).

def drop_attributes(attributes, p_each, p_all, rng):
    """(K,) attribute values -> the same with each set to 0 with probability p_each and all of them
    with probability p_all, by the numpy generator rng."""
    keep = (rng.random(attributes.shape) >= p_each) & (rng.random() >= p_all)         # (K,)
    return torch.where(torch.from_numpy(keep), attributes, 0.0)                       # (K,)


# --------------------------------------------------------------------------------------------------
#                                   7. Sampler: integrate the velocity from noise to image
# --------------------------------------------------------------------------------------------------
# Generation solves dx/dt = v(x, t) from x(0) = noise to t = 1 on a uniform grid t_i = i/N. Euler
# takes
#     x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i);
# Heun averages that slope with the slope at the Euler guess (second order, two model calls per
# step). On a perfectly straight path (a model that always predicts the same image) the velocity is
# constant and Euler is exact -- rectified flow trains the paths to be as straight as it can. Here t
# <= 1 - 1/N, so 1 - t > 0 and no clamp is needed (t_eps = 0): the last Euler step, from 1 - 1/N to
# 1, lands exactly on the model's clean-image prediction. Heun's last step is Euler because v(x, 1)
# would divide by zero. `generate` draws many samples from a checkpoint (section 10) at a precision
# (section 9), a batch at a time.
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


@torch.no_grad()
def sample(model, noise, num_steps, method="euler", attributes=None, cfg_scale=1.0):
    """noise (B, C, H, W) at t=0 -> images (B, C, H, W) at t=1, in num_steps steps of `method`,
    asking for attributes (B, K) (or None) with guidance weight cfg_scale."""
    ts = torch.linspace(0, 1, num_steps + 1, dtype=torch.float64).tolist()
    x = noise.float()

    def v(x, t):
        t = torch.full((x.shape[0],), t, device=x.device)
        x_pred = guided_prediction(model, x, t, attributes, cfg_scale)       # (B, C, H, W)
        return velocity(x_pred, x, t, t_eps=0.0)                              # (B, C, H, W)

    for i in range(num_steps):
        dt = ts[i + 1] - ts[i]
        v_i = v(x, ts[i])
        if method == "heun" and i < num_steps - 1:
            v_i = 0.5 * (v_i + v(x + dt * v_i, ts[i + 1]))
        x = x + dt * v_i
    return x


def load_model(ckpt, device, use_ema=True):
    """The network of a loaded checkpoint (its EMA weights by default), ready to sample. Weights
    that do not fit fail here, before any work."""
    model = build_model(argparse.Namespace(**ckpt["args"]))
    load_weights(model, ckpt["ema" if use_ema else "model"], ckpt["args"])
    return model.to(device).eval()


def generate(ckpt, num_samples, num_steps, method, seed, batch_size, device, precision,
             use_ema=True, attributes=None, cfg_scale=1.0):
    """num_samples images from a loaded checkpoint, as an iterator over batches (B, C, H, W) in [-1,
    1], printing progress; attributes (num_samples, K) or None, guided with weight cfg_scale. The
    noise is drawn on the CPU, so a seed gives the same noise on every device."""
    model, size = load_model(ckpt, device, use_ema), ckpt["args"]["image_size"]

    def batches():
        generator, start = torch.Generator().manual_seed(seed), time.time()
        for n in range(0, num_samples, batch_size):
            noise = torch.randn((min(batch_size, num_samples - n), 3, size, size), generator=generator)
            asked = None if attributes is None else attributes[n:n + len(noise)].to(device)
            with autocast(device, precision), attention_kernels(device, model.grid**2):
                images = sample(model, noise.to(device), num_steps, method, asked, cfg_scale).cpu()
            done = n + len(noise)
            print(f"sampled {done}/{num_samples} images | {done / (time.time() - start):.2f} img/s",
                  flush=True)
            yield images
    return batches()


def guidance_grid(model, rows, cfg_scales, noise, num_steps, method, device, precision):
    """The effect of a request at a glance: one image (3, H', W') in [0, 1] with a row per attribute
    setting in rows (R, K), a column per guidance weight, each cell the samples of the same noise
    (n, C, H, W) side by side."""
    import torchvision
    cells = []
    for row in rows:
        asked = row.expand(len(noise), -1).to(device)                        # (n, K)
        for cfg_scale in cfg_scales:
            with autocast(device, precision), attention_kernels(device, model.grid**2):
                images = sample(model, noise.to(device), num_steps, method, asked, cfg_scale)
            cells.append(image_grid(images.cpu(), columns=len(noise)))       # (3, h, n*w)
    return torchvision.utils.make_grid(torch.stack(cells), nrow=len(cfg_scales), padding=8,
                                       pad_value=1.0)


# ==================================================================================================
#                                   PART TWO: RUNNING IT
# ==================================================================================================

# --------------------------------------------------------------------------------------------------
#                                   8. Data: CelebA and toy faces, as tensors in [-1, 1]
# --------------------------------------------------------------------------------------------------
# CelebA's aligned images are 178x218. The standard CelebA-64 preprocessing of DDIM, PNDM and U-ViT
# crops a 128x128 box centred at (x=89, y=121) and resizes it; using the same crop makes FIDs
# comparable with published numbers. The split file maps each image to 0 (train), 1 (val) or 2
# (test).

CELEBA_CROP = (89 - 64, 121 - 64, 89 + 64, 121 + 64)  # (left, top, right, bottom) in 178x218
SPLITS = {"train": 0, "val": 1, "test": 2}
# the image files read from a folder: pytorch-fid's list, which fid.py must follow (in lower case)
IMAGE_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")
LAYOUTS_HELP = ("put CelebA under --data_root in one of these layouts: ROOT/celeba/img_align_celeba + "
                "ROOT/celeba/list_eval_partition.txt (torchvision), ROOT/img_align_celeba + "
                "ROOT/list_eval_partition.txt (official), ROOT/img_align_celeba/img_align_celeba + "
                "ROOT/list_eval_partition.csv (Kaggle), or ROOT/*.jpg (a plain folder, no split); "
                "or use --dataset toy")


def find_celeba(root):
    """Return (image folder, split file or None) for the layouts people actually have."""
    root = Path(root)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise UserError(f"--data_root {root} {what}; {LAYOUTS_HELP}")
    for folder, split_file in [
        # torchvision, Kaggle's zip, official
        (root / "celeba" / "img_align_celeba", root / "celeba" / "list_eval_partition.txt"),
        (root / "img_align_celeba" / "img_align_celeba", root / "list_eval_partition.csv"),
        (root / "img_align_celeba", root / "list_eval_partition.txt"),
    ]:
        if folder.is_dir():
            return folder, (split_file if split_file.is_file() else None)
    return root, None  # a plain folder


def read_split_file(path):
    """{file name: 0|1|2} from 'name split' lines (official .txt) or 'image_id,partition' rows
    (Kaggle .csv)."""
    partition = {}
    for line in Path(path).read_text().splitlines():
        fields = line.replace(",", " ").split()
        if len(fields) == 2 and fields[1].isdigit():  # skips the csv header and blank lines
            partition[fields[0]] = int(fields[1])
    return partition


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


def read_attribute_file(path):
    """(attribute names, {file name: its row as text}) from the official .txt (a count line, a line
    of the names, then 'name v1 .. v40' rows of -1/1) or Kaggle's .csv ('image_id,5_o_Clock_Shadow,
    ...' then rows). A header line is recognised by its names, so a missing count line does no
    harm. Every row is checked here; only the rows of images in use are turned into numbers
    (attribute_labels)."""
    names, rows = None, {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        fields = line.replace(",", " ").split()
        if names is None:
            fields = fields[1:] if fields[:1] == ["image_id"] else fields  # Kaggle's header
            if fields and all(f in ATTRIBUTE_NAMES for f in fields):
                names = fields
        elif len(fields) > 1:
            if len(fields) != len(names) + 1 or not ATTRIBUTE_VALUES.issuperset(fields[1:]):
                raise UserError(f"{path} line {number} is not 'image name' and {len(names)} values "
                                f"of -1/1; is it CelebA's attribute file?")
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
            raise UserError(f"no {split} images in {folder} according to {split_file}; "
                            f"check that the split file belongs to these images")
    return [folder / n for n in names]


def image_tensor(img):
    """A PIL image -> (3, H, W) uint8 RGB tensor: how this project turns any picture into numbers."""
    return torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)


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
    return image_tensor(img)


def to_signed(pixels):
    """uint8 pixels in [0, 255] -> floats in [-1, 1], the range the model sees."""
    return pixels.float() / 127.5 - 1


# The image cache. Decoding a JPEG, cropping and resizing it costs the same every epoch, and it
# costs the training threads their cores (in the training process, or in DataLoader workers on the
# same cores). So the training split is decoded once into a file of uint8 pixels, (N, 3, size,
# size) in experiments/image_cache/ (12,288 bytes per image at 64x64: 2.0 GB for CelebA's 162,770
# training images), and memory-mapped: the operating system keeps it in RAM when it fits and reads
# it from disk when it does not. Its name holds a hash of the crop, the size and the file list
# (names, byte sizes, modification times), so changing any of them builds a new cache. The cache
# holds each image as read; flips and noise are drawn per example in the trainer (section 11).
IMAGE_CACHE = Path("experiments") / "image_cache"


def image_cache_path(files, size):
    digest = hashlib.sha1(repr((CELEBA_CROP, size, str(files[0].parent.resolve()))).encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path.name} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return IMAGE_CACHE / f"{len(files)}x{size}px-{digest.hexdigest()[:16]}.u8"


class CelebA(Dataset):
    """CelebA (or any folder of images) at size x size: dataset[i] is image i, dataset.label(i)
    its values of `attributes` (names from ATTRIBUTE_NAMES), read from the attribute file next to
    the split file. cache=True reads the images from the image cache when it has been built
    (build_cache), else from their files. An unreadable file is reported once and replaced by the
    next image (and its label), so one bad JPEG never stops a run in the middle of an epoch."""

    def __init__(self, root, split, size, attributes=(), download=False, cache=False):
        if download:
            download_celeba(root)
        self.files, self.size, self.reported = celeba_files(root, split), size, set()
        self.labels, self.unlabelled = torch.zeros(len(self.files), 0), 0  # (N, K) with K = 0
        if attributes:
            folder, split_file = find_celeba(root)
            found = [split_file.parent / name for name in ATTRIBUTE_FILES
                     if split_file is not None and (split_file.parent / name).is_file()]
            if not found:
                where = f"next to {split_file}" if split_file else f"for the plain folder {folder}"
                raise UserError(f"--attributes needs CelebA's labels, {' or '.join(ATTRIBUTE_FILES)}, "
                                f"{where}; there is none: add it, or train without --attributes")
            self.labels, self.unlabelled = attribute_labels(self.files, attributes, found[0])
        self.cache, self.pixels = self.find_cache() if cache else None, None

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        if not 0 <= i < len(self.files):
            raise IndexError(i)  # ends `for image in dataset`
        for j in range(i, i + len(self.files)):
            path = self.files[j % len(self.files)]
            if path in self.reported:
                continue
            try:
                return to_signed(self.read(j % len(self.files)))
            except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for corrupt files
                self.report(path, e)
        raise UserError(f"none of the {len(self.files)} images under {self.files[0].parent} "
                        f"can be read")

    def read(self, i):
        """(3, size, size) uint8 pixels of image i, from the cache or from its file."""
        if self.cache is None:
            return load_pixels(self.files[i], self.size)
        if self.pixels is None:  # mapped on first use, in each process that reads
            self.pixels = np.memmap(self.cache, np.uint8, "r", shape=(len(self.files), 3, self.size,
                                                                       self.size))
        return torch.from_numpy(self.pixels[i].copy())  # a copy: the map is read-only

    def __getstate__(self):  # a DataLoader worker started by spawn (macOS) maps the cache itself
        return {**self.__dict__, "pixels": None}

    def report(self, path, error):
        if path not in self.reported:
            self.reported.add(path)
            print(f"warning: skipping unreadable image {path} ({error}); "
                  f"{len(self.reported)} skipped so far in this process", file=sys.stderr)

    @functools.cached_property
    def cache_path(self):  # a stat of every file: once per dataset
        return image_cache_path(self.files, self.size)

    def find_cache(self):
        """The path of this dataset's image cache if it has been built, else None (also for a file
        of the wrong size, cut short outside celebgen, which build_cache then replaces); the files
        it found unreadable are reported again."""
        path = self.cache_path
        unreadable_list = path.with_suffix(".unreadable")
        expected_bytes = len(self.files) * 3 * self.size**2
        if not (unreadable_list.is_file() and path.is_file() and path.stat().st_size == expected_bytes):
            return None
        for name in unreadable_list.read_text().splitlines():
            self.report(self.files[0].parent / name, "unreadable when the cache was built")
        return path

    def build_cache(self):
        """Build this dataset's image cache unless it is there, and read from it from now on. If it
        cannot be written (a full disk, a read-only folder), each image is still decoded when it
        is read, as without a cache. The trainer calls it once per run (validate_train_args), so
        its processes never decode every image a second time."""
        self.cache = self.find_cache() or self.write_cache()

    def write_cache(self):
        """Decode every image into a new image cache; its path, or None if it cannot be written."""
        path = self.cache_path
        unreadable_list = path.with_suffix(".unreadable")
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")  # only complete caches get
        start, shown = time.time(), time.time()                         # the cache's name
        print(f"decoding {len(self.files)} images once into {path} "
              f"({len(self.files) * 3 * self.size**2 / 1e9:.2f} GB)", flush=True)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(partial, "wb") as out:
                for i, file in enumerate(self.files):
                    try:
                        pixels = load_pixels(file, self.size)
                    except (OSError, ValueError, SyntaxError) as e:
                        self.report(file, e)
                        pixels = torch.zeros(3, self.size, self.size, dtype=torch.uint8)
                    out.write(pixels.numpy().tobytes())
                    if time.time() - shown > 10:
                        shown, rate = time.time(), (i + 1) / (time.time() - start)
                        print(f"  {i + 1} of {len(self.files)} images, "
                              f"{(len(self.files) - i - 1) / rate / 60:.1f} min left", flush=True)
            unreadable_list.write_text("".join(f"{p.name}\n" for p in sorted(self.reported)))
            os.replace(partial, path)
        except OSError as e:
            print(f"warning: cannot write the image cache {path} ({e}); decoding each image "
                  f"when it is read instead, which is slower", file=sys.stderr, flush=True)
            return None
        finally:
            if partial.exists():  # False too where the cache's folder is a file
                partial.unlink()
        print(f"  done in {time.time() - start:.0f} s; later runs on these images reuse it",
              flush=True)
        others = [p for p in path.parent.glob("*.u8") if p != path]  # nothing deletes an old cache
        if others:
            print(f"  {path.parent} also holds {len(others)} other cache{'s' * (len(others) > 1)} "
                  f"({sum(p.stat().st_size for p in others) / 1e9:.2f} GB) of other image sizes or "
                  f"files; delete those no run reads", flush=True)
        return path

    def label(self, i):
        """(K,) attribute values of image i: -1 absent, +1 present, 0 unspecified. Cheap: no image is
        decoded, and an image already found unreadable gives its replacement's label."""
        while self.files[i] in self.reported and len(self.reported) < len(self.files):
            i = (i + 1) % len(self.files)
        return self.labels[i]


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
           "Anno/list_attr_celeba.txt), unzip the images, put list_attr_celeba.txt next to the split "
           "file, and " + LAYOUTS_HELP)


def download_celeba(root):
    """Unless CelebA is under ROOT in a layout with a split file, fetch its aligned images, split file
    and attribute file into ROOT/celeba/ (files there and intact are kept) and unzip the images; then
    check that all 202,599 images and split rows are there."""
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
        eye_y, eye_r = cy - 0.2 * ry, f["eye_r"]
        for ex in (cx - f["eye_dx"], cx + f["eye_dx"]):
            draw.ellipse([ex - 1.6 * eye_r, eye_y - eye_r, ex + 1.6 * eye_r, eye_y + eye_r],
                         (245, 245, 245))
            draw.ellipse([ex - 0.8 * eye_r, eye_y - 0.8 * eye_r, ex + 0.8 * eye_r, eye_y + 0.8 * eye_r],
                         f["iris"])
            if f["Eyeglasses"]:  # a dark frame round each eye
                draw.ellipse([ex - 2.4 * eye_r, eye_y - 1.8 * eye_r, ex + 2.4 * eye_r,
                              eye_y + 1.8 * eye_r], outline=f["frames"], width=round(0.03 * S))
        if f["Eyeglasses"]:  # and the bridge between them
            draw.line([cx - f["eye_dx"] + 2.4 * eye_r, eye_y, cx + f["eye_dx"] - 2.4 * eye_r, eye_y],
                      f["frames"], width=round(0.03 * S))
        mouth_w, mouth_y, smile = f["mouth_w"], cy + 0.5 * ry, f["smile"]
        draw.chord([cx - mouth_w, mouth_y - abs(smile) - 2, cx + mouth_w, mouth_y + abs(smile) + 2],
                   0 if smile > 0 else 180, 180 if smile > 0 else 360, f["lips"])
        if f["Wearing_Hat"]:  # a crown over the top of the head and a brim above the eyes
            draw.rectangle([cx - 0.8 * rx, cy - 1.45 * ry, cx + 0.8 * rx, cy - 0.7 * ry], f["hat"])
            draw.rectangle([cx - 1.25 * rx, cy - 0.8 * ry, cx + 1.25 * rx, cy - 0.65 * ry], f["hat"])
        img = img.resize((self.size, self.size), Image.LANCZOS)
        return to_signed(image_tensor(img))


def make_dataset(args, split, cache=True):
    """The images of a split; CelebA's training split through the image cache (unless cache=False),
    because it is read every epoch."""
    if args.dataset == "toy":
        offset = {"train": 0, "val": 10**6, "test": 2 * 10**6}[split]  # three disjoint sets
        return ToyFaces(args.image_size, offset=offset, attributes=args.attributes)
    train = split == "train"
    return CelebA(args.data_root, split, args.image_size, args.attributes,
                  download=args.download and train, cache=cache and train)


def to_unit(images):
    return ((images.float().cpu() + 1) / 2).clamp(0, 1)


@contextmanager
def written_whole(path):
    """`with written_whole(path) as tmp:` write tmp (next to path); when the block ends it is
    renamed over path -- atomic: path is the old file or the new one, never half of one -- or
    deleted if the block failed (a full disk, Ctrl-C)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_png(image, path):
    """(C, H, W) in [0, 1] -> an 8-bit PNG (lossless, so FID reads exactly what was generated),
    whole or absent after a full disk or Ctrl-C."""
    array = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    try:
        with written_whole(path) as tmp:
            Image.fromarray(array).save(tmp, format="PNG")
    except OSError as e:  # a full disk, no permission
        raise UserError(f"cannot write {path} ({e.strerror or e}); free some space, then run the "
                        f"command again (a training run: with --resume)") from None


def image_grid(images, columns=None):
    """(B, C, H, W) in [-1, 1] -> one (C, rows*H, columns*W) grid in [0, 1] with 2-pixel gaps."""
    import torchvision
    columns = columns or math.ceil(math.sqrt(len(images)))
    return torchvision.utils.make_grid(to_unit(images), nrow=columns, padding=2, pad_value=1.0)


# --------------------------------------------------------------------------------------------------
#                                   9. Device and precision
# --------------------------------------------------------------------------------------------------
# `--device auto` takes a CUDA GPU, then Apple's MPS, then the CPU. Under
# autocast every matmul (each Linear, attention's products) runs in a 16-bit type. Which other ops
# autocast moves to fp32 depends on the device (on CUDA layer norm and softmax; on the CPU neither),
# so this file computes QK-norm and the loss in fp32 itself. Autocast casts each op's inputs, not
# the model: weights, gradients and AdamW's moments stay fp32. But an op's output keeps the op's
# dtype, so the residual stream itself (every block's output) is 16-bit too.
#   bf16 keeps fp32's 8 exponent bits and drops mantissa bits: a gradient of 1e-10 is still
#        representable, so bf16 needs no loss scaling.
#   fp16 has 5 exponent bits: values below ~6e-8 flush to zero, and small gradients with them.
#        GradScaler multiplies the loss by a large factor before backward and divides the gradients
#        by it before the step, and skips a step whose gradients overflowed (lowering the factor).
# Which is fast depends on the hardware. GPUs of compute capability >= 8.0 (Ampere on) and CPUs with
# AVX512-BF16 or AMX multiply bf16 natively, faster than fp32; older GPUs (T4, V100) have fast fp16
# but not bf16. Elsewhere bf16 is emulated -- converted to fp32 in software, outside the tuned fp32
# kernels -- and runs many times slower than fp32 (tests/benchmark_speed.py prints the ratio on your
# CPU). CPU feature flags do not say reliably what a given PyTorch build does with them, so on the
# CPU `auto` measures.

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # fp32: no autocast
BF16_SPEEDUP_NEEDED = 1.3  # auto picks bf16 on a CPU whose bf16 matmul is this much faster than fp32


def pick_device(name):
    """'auto' -> cuda, then mps, then cpu. A device that is not here is a UserError."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name == "auto":
        name = next(kind for kind in ("cuda", "mps", "cpu") if available[kind])
    if not available[name]:
        raise UserError(f"--device {name}, but PyTorch {torch.__version__} sees no {name.upper()} device "
                        f"here; use --device auto (or cpu)")
    return torch.device(name)


@functools.cache
def cpu_matmul_speedup(precision, n=512):
    """fp32 time / `precision` time of an n x n matmul on this CPU, best of up to 3 within 0.1 s
    each: > 1 where the 16-bit type is native, far below 1 where it is emulated."""
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
        return "fp16", f"CUDA compute capability {version} < 8.0 has no native bf16; fp16 with loss scaling"
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
        print(f"warning: {requested} matmuls run at {cpu_matmul_speedup(requested):.2f}x fp32 on this CPU "
              f"(emulated): expect a slow run; --precision auto picks the fast choice", file=sys.stderr)
    return requested, "as asked"


def device_and_precision(device_name, precision_name, announce=True):
    """Resolve --device and --precision; say what was chosen and why (the first line of a run)."""
    device = pick_device(device_name)
    precision, why = resolve_precision(precision_name, device)
    if announce:
        print(f"device {device.type}, precision {precision_name} -> {precision} ({why})", flush=True)
    return device, precision


def autocast(device, precision):
    """The context that runs a forward pass at `precision` (bf16, fp16 or fp32) on `device`."""
    if precision not in AUTOCAST_DTYPES:
        return nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


def attention_kernels(device, tokens):
    """Which attention kernel runs a model of `tokens` patches. On the CPU, PyTorch's default
    (flash-attention) kernel was measured slower than plain matmul + softmax at 64 tokens (tiny at
    32x32: 1.08-1.24x) and faster at 256 (small at 64x64: 1.02-1.36x; tests/benchmark_speed.py
    --sdpa, README), so up to 64 tokens the CPU uses the plain one. GPUs keep the default."""
    return sdpa_kernel(SDPBackend.MATH) if device.type == "cpu" and tokens <= 64 else nullcontext()


# --------------------------------------------------------------------------------------------------
#                                   10. Experiments and checkpoints
# --------------------------------------------------------------------------------------------------
# experiments/{exp_name}/args.json               the arguments of the run
#                       /checkpoints/last.pt      written every --ckpt_every steps and at the end
#                       /checkpoints/best.pt      the lowest validation loss so far
#                       /logs/                    TensorBoard: tensorboard --logdir experiments
#                       /samples/                 grids during training; `sample` writes here too
# A checkpoint is written to a temporary file, flushed to the disk (fsync), and renamed over the old
# one: the rename is atomic, so a crash or a full disk mid-save leaves the previous checkpoint
# intact. It holds only tensors and plain Python values, so it loads with
# torch.load(weights_only=True), which cannot execute code from a downloaded file.

MODEL_ARGS = ("model", "image_size", "patch_size", "attributes")  # what the weights depend on
# what a resumed run must keep so that it continues exactly: the data order and position in the epoch
# (seed, batch size, processes), the example times, and the validation set and loss that pick best.pt
RESUME_FIXED = ("batch_size", "world_size", "seed", "t_mu", "t_sigma", "t_eps", "val_size")
CHECKPOINT_KEYS = ("model", "ema", "optimizer", "step", "best_val", "args", "rng")
# What the weights mean: the same tensors under another version of the network's arithmetic load
# without an error and draw noise, so a checkpoint records the version it was trained under.
# 1 (before 2026-12-03, written without the key): RMSNorm on q and k, RoPE on channel halves,
# DiT's tanh GELU; 2: LayerNorm on q and k, RoPE on adjacent channel pairs, the exact GELU (sections
# 3 and 4).
ARCHITECTURE = 2


def experiment_paths(exp_name):
    root = Path("experiments") / exp_name
    return {"root": root, "checkpoints": root / "checkpoints", "logs": root / "logs", "samples": root / "samples"}


def checkpoint_path(exp_name, checkpoint):
    """--checkpoint: a path to a file, or a name (last.pt, best.pt) in the experiment's checkpoints/."""
    path = Path(checkpoint)
    return path if path.is_file() else experiment_paths(exp_name)["checkpoints"] / checkpoint


def resume_checkpoint(exp):
    """last.pt, or best.pt for a run killed after its first validation but before its first last.pt
    was written; None for an experiment without a checkpoint."""
    for name in ("last.pt", "best.pt"):
        if (exp["checkpoints"] / name).is_file():
            return exp["checkpoints"] / name
    return None


def save_checkpoint(path, model, ema, optimizer, scaler, step, best_val, elapsed, args):
    state = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
             "scaler": scaler.state_dict(), "step": step, "best_val": best_val, "elapsed": elapsed,
             "args": vars(args), "architecture": ARCHITECTURE,
             "rng": {"torch": torch.get_rng_state(),
                     "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}}
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
    except OSError as e:  # a full disk, a lost mount, no permission
        raise UserError(f"cannot write {path} ({e.strerror or e}); the previous {path.name}, if any, is "
                        f"intact: free some space and resume with --resume") from None


def load_checkpoint(path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; list the experiment's checkpoints/ folder "
                        f"or pass --checkpoint with a path")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, wrong file type: all "unreadable"
        raise UserError(f"checkpoint {path} is unreadable ({type(e).__name__}): it is truncated or corrupt; "
                        f"use another checkpoint such as best.pt") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if not missing:
        saved = ckpt["args"] if isinstance(ckpt["args"], dict) else {}
        saved.setdefault("attributes", [])  # written before conditioning existed: unconditional
        missing = [f"args.{k}" for k in MODEL_ARGS if k not in saved]
    if missing or not isinstance(ckpt["args"]["model"], str) or ckpt["args"]["model"] not in MODELS:
        what = f"no {', '.join(missing)}" if missing else f"unknown model {ckpt['args']['model']!r}"
        raise UserError(f"{path} is not a CelebGen checkpoint ({what}); pass a last.pt or best.pt "
                        f"written by celebgen.py train")
    version = ckpt.get("architecture", 1)  # written without the key: version 1
    if version != ARCHITECTURE:
        raise UserError(f"{path} was trained by a celebgen.py of network version "
                        f"{version}, whose blocks compute differently from this "
                        f"one's (version {ARCHITECTURE}); train it again, or sample it with that "
                        f"celebgen.py (version 1: git checkout 533a38b)")
    return ckpt


def load_weights(model, state, ckpt_args):
    """model.load_state_dict(state), or a UserError if the weights belong to another model."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError):  # other keys or shapes, or not a state dict
        config = ", ".join(f"--{k} {flag_value(ckpt_args[k])}" for k in MODEL_ARGS)
        raise UserError(f"the checkpoint's weights do not fit the model its arguments describe ({config}); "
                        f"was it written by another version of celebgen.py?") from None


def flag_value(value):
    """A saved argument as the command line writes it: a list comma-separated, an empty one (none)."""
    return (",".join(value) or "(none)") if isinstance(value, list) else value


def restore(ckpt, model, ema, optimizer, scaler, device):
    """Put a run back into the state its checkpoint saved. Returns (step, best_val)."""
    load_weights(model, ckpt["model"], ckpt["args"])
    load_weights(ema, ckpt["ema"], ckpt["args"])
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError, TypeError):
        raise UserError("the checkpoint's optimizer state does not fit its model; start a new --exp_name") \
            from None
    if scaler.is_enabled() and ckpt.get("scaler"):  # empty when the checkpoint was not written in fp16
        scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if device.type == "cuda" and ckpt["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
    return ckpt["step"], ckpt["best_val"]


# --------------------------------------------------------------------------------------------------
#                                   11. Trainer: examples, DDP, the training step, EMA, bookkeeping
# --------------------------------------------------------------------------------------------------
# One process per GPU (or per CPU slot with --nproc), started by torch.multiprocessing.spawn, or by
# torchrun for several machines. Each process holds a full copy of the model;
# DistributedDataParallel averages the gradients over processes in backward(), so all copies take
# the same optimizer step. Each process reads its own 1/world_size of every epoch
# (DistributedSampler), so the global batch is world_size x --batch_size.
#
# Reproducibility by construction: every random choice about a training example -- its flip, its
# noise x0, its time t -- is a pure function of (seed, epoch, image index). So 2 processes x batch B
# see exactly the examples 1 process x batch 2B sees, and a run resumed at step k sees exactly what
# the uninterrupted run saw: the data order of an epoch is a function of (seed, epoch), and the
# resume skips the k % epoch batches already done.

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


def validation_set(images, n, seed, t_mu, t_sigma):
    """Fixed images, noise, times and attributes (all shown), so the val loss is comparable across
    steps. The times are the n quantiles of the training distribution,
    t_k = sigmoid(mu + sigma * Phi^-1((k + 1/2) / n))."""
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
    """The learning rate of optimizer step `step` (0-based) taken at `progress` in [0, 1) of the run
    (of its steps, or of its --max_minutes, whichever is further): a linear warm-up over
    --warmup_steps, constant, then a linear cooldown to 0 over the last --cooldown of the run,
        lr(step, p) = lr * min(1, (step + 1) / warmup_steps) * min(1, (1 - p) / cooldown).
    Warm-up lets AdamW's moment estimates settle before the steps get large. The cooldown is the
    "warmup-stable-decay" schedule of recent short-budget LLM and diffusion runs: a run of any
    length, or stopped by a clock, still ends with small steps, settled rather than mid-noise (how
    much that lowers the loss here has not been measured)."""
    cooldown = min(1.0, (1 - progress) / args.cooldown) if args.cooldown else 1.0
    return args.lr * min(1.0, (step + 1) / args.warmup_steps) * max(cooldown, 0.0)


@torch.no_grad()
def update_ema(ema, model, step, decay):
    """ema <- d ema + (1 - d) model, with the warm-up d = min(decay, (1 + step) / (10 + step)).
    Measured as the lag behind a weight that grows by 1 per step (tested), the average spans the
    last (step + 1) / 10 steps while the warm-up rules -- so even a 5-minute run samples from a
    useful EMA -- and d / (1 - d), about 1 / (1 - decay) steps, once d reaches decay. The default
    decay 0.995 averages about 200 steps (DiT's 0.9999, for long GPU runs, 10,000): after 4,075
    steps (what a 10-minute run on 2 cores took in the fifth session) it sampled better (FID 45.9)
    than the warm-up's 400-step average (47.3) and the raw weights (46.3) of the same run (README,
    Measured, sixth session)."""
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - d)


def distributed_setup(rank, world_size, device_type):
    """Join the process group (if any) and set up this process's device: GPU number LOCAL_RANK on
    CUDA."""
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device(device_type)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for whatever runs outside autocast
    elif device.type == "cpu":
        # PyTorch starts with at most a thread per CPU this process may use (fewer under taskset,
        # a container's CPU set or OMP_NUM_THREADS); the processes of one machine share them
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        torch.set_num_threads(max(1, torch.get_num_threads() // local_world))
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank,
                                world_size=world_size, device_id=device if device.type == "cuda" else None)
    return device


def train_worker(rank, world_size, args, device_type):
    """The training loop of one process. Rank 0 alone writes logs, samples and checkpoints."""
    device = distributed_setup(rank, world_size, device_type)
    try:
        if world_size > 1:  # under torchrun each process resolved --precision itself: follow rank 0's
            choice = [args.resolved_precision]
            dist.broadcast_object_list(choice, src=0)
            args.resolved_precision = choice[0]
        tokens = (args.image_size // args.patch_size) ** 2
        with attention_kernels(device, tokens), InterruptRequest(announce=rank == 0) as interrupt:
            if world_size == 1:
                train_loop(rank, world_size, args, device, interrupt)
            else:  # rank 0 says why; spawn sees the exit status, and the parent exits with it
                exit_on_user_error(train_loop, rank, world_size, args, device, interrupt, quiet=rank > 0)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def start_or_resume(args, model, ema, optimizer, scaler, device, announce):
    """(step, best_val, seconds of training) of the run: (0, inf, 0) for a new run; for --resume,
    those of the checkpoint, whose weights, EMA, optimizer moments, loss scale and random state are
    put back into place."""
    if not args.resume:
        return 0, math.inf, 0.0
    path = resume_checkpoint(experiment_paths(args.exp_name))
    ckpt = load_checkpoint(path)
    step, best_val = restore(ckpt, model, ema, optimizer, scaler, device)
    if announce:
        print(f"resuming {args.exp_name} from step {step} ({path.name})", flush=True)
    return step, best_val, ckpt.get("elapsed", 0.0)  # no "elapsed": written before time budgets


def train_loop(rank, world_size, args, device, interrupt):
    torch.manual_seed(args.seed)  # the same initial weights in every process
    model = build_model(args).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    # fused: one kernel updates every weight, instead of several small ops per tensor (on a 2-core
    # CPU, tiny's AdamW step took 2.5-4x less time in four runs of `tests/benchmark_speed.py
    # --unfused`, README)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0,
                                  fused=True)
    # fp16 only: scale the loss up before backward, so small gradients do not flush to zero (section
    # 9)
    scaler = torch.amp.GradScaler(device.type, enabled=args.resolved_precision == "fp16")
    step, best_val, elapsed = start_or_resume(args, model, ema, optimizer, scaler, device, rank == 0)
    budget = 60 * args.max_minutes if args.max_minutes else math.inf  # seconds of training
    ddp_model = model if world_size == 1 else \
        DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if args.compile:  # fused kernels for the elementwise ops between the matmuls, made at step 1
        # Inductor leaves RoPE's complex product (section 3) to PyTorch's own kernel, one pass as in
        # eager, and warns that the model may run slower than eager; measured, it does not (README)
        warnings.filterwarnings("ignore", "Torchinductor does not support code generation for complex")
        ddp_model = torch.compile(ddp_model)

    if world_size > 1:  # under torchrun: wait until validate_train_args has built the image cache
        dist.barrier()
    examples = FlowExamples(make_dataset(args, "train"), args)
    sampler = DistributedSampler(examples, world_size, rank, shuffle=True, seed=args.seed, drop_last=True)
    steps_per_epoch = len(sampler) // args.batch_size
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)
    book = Bookkeeping(args, device, total_steps, budget, model, ema, optimizer, scaler, best_val,
                       elapsed) if rank == 0 else None
    if rank == 0 and step >= total_steps:
        print(f"{args.exp_name} is already at step {step} of {total_steps}; raise --max_steps or "
              f"--epochs to train further", flush=True)
    if rank == 0 and elapsed >= budget:
        print(f"{args.exp_name} has trained {elapsed / 60:.2f} of its {args.max_minutes:g} minutes; "
              f"raise --max_minutes to train further", flush=True)

    # the run's clock continues across resumes; monotonic, so a change of the system time does not
    # move it
    stop, clock = False, time.monotonic() - elapsed
    while step < total_steps and elapsed < budget and not stop:
        # this epoch's order: a permutation fixed by (seed, epoch), this process's 1/world_size of
        # it; a resumed run skips the batches it has already seen
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch)
        examples.epoch = epoch
        order = list(sampler)[done_in_epoch * args.batch_size:]
        loader = DataLoader(examples, args.batch_size, sampler=order, drop_last=True,
                            num_workers=args.workers, pin_memory=device.type == "cuda",
                            worker_init_fn=ignore_interrupts)
        for x1, x0, t, a in loader:
            x1, x0 = x1.to(device, non_blocking=True), x0.to(device, non_blocking=True)  # (B, C, H, W)
            t, a = t.to(device), a.to(device)                                        # (B,), (B, K)
            # set the learning rate, from how far the run is through its steps or its time
            lr = learning_rate(step, max(step / total_steps, elapsed / budget), args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # forward + loss, matmuls in 16 bits under autocast
            with autocast(device, args.resolved_precision):
                loss = flow_loss(ddp_model, x1, x0, t, args.t_eps, a)
            # backward: DDP averages the gradients over processes here (in fp16, of the scaled loss)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            # clip: the true gradients (unscaled in fp16), and their norm before clipping, for the
            # log
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            # divergence: a non-finite loss or gradient stops the run before the step is taken or
            # saved. One host sync for both numbers; the norm is the same on every rank. (In fp16
            # the scaler skips an overflowed step instead, and the check after the step applies.)
            local_loss, grad_norm = torch.stack([loss.detach().float(), grad_norm.float()]).tolist()
            if not scaler.is_enabled() and not (math.isfinite(local_loss) and math.isfinite(grad_norm)):
                raise divergence(local_loss, grad_norm, step + 1, args.lr)
            # the optimizer step (scaler.step skips it in fp16 if a gradient overflowed), then the
            # EMA
            scaler.step(optimizer)
            scaler.update()
            update_ema(ema, model, step, args.ema_decay)
            step += 1
            # the mean loss over processes, whether any process was asked to stop (Ctrl-C), and the
            # run's time, averaged so that every process sets the same learning rate and stops together
            stats = torch.stack([loss.detach().float(), torch.tensor(float(interrupt.requested), device=device),
                                 torch.tensor(time.monotonic() - clock, device=device)])
            if world_size > 1:
                dist.all_reduce(stats, op=dist.ReduceOp.AVG)
            loss, stop, elapsed = stats[0].item(), stats[1].item() > 0, stats[2].item()
            if not math.isfinite(loss):  # fp16, where a non-finite step was skipped, not taken
                raise divergence(loss, grad_norm, step, args.lr)
            # rank 0: log, validate, sample a grid, save checkpoints, each at its interval and at the end
            last = step == total_steps or elapsed >= budget
            if rank == 0:
                book.after_step(step, loss, lr, grad_norm, len(x1) * world_size, elapsed, last)
            if last or stop:
                break
    if rank == 0:
        book.close()
    if stop:  # Ctrl-C: the step in flight has finished; save it, then leave
        if rank == 0 and book.saved_step < step:
            book.save_last(step)
        if world_size > 1:
            dist.barrier()  # every rank waits until rank 0 has saved
        last = experiment_paths(args.exp_name)["checkpoints"] / "last.pt"
        raise Interrupted(f"interrupted at step {step}; {last} holds step {step}; resume with: "
                          f"python celebgen.py train --exp_name {args.exp_name} --resume")


def divergence(loss, grad_norm, step, lr):
    """The error that ends a run whose loss or gradients stopped being finite at `step`."""
    return UserError(f"loss {loss:g}, gradient norm {grad_norm:g} at step {step}: training diverged; "
                     f"lower --lr (now {lr:g}), or resume from a checkpoint before the divergence")


class Bookkeeping:
    """Rank 0's record of the run: progress lines and TensorBoard scalars, the validation loss and
    best.pt (it owns best_val, the lowest validation loss so far), sample grids, and last.pt."""

    def __init__(self, args, device, total_steps, budget, model, ema, optimizer, scaler, best_val,
                 elapsed):
        from torch.utils.tensorboard import SummaryWriter  # imported here: only rank 0 pays for it
        self.args, self.device, self.total_steps, self.budget = args, device, total_steps, budget
        self.model, self.ema, self.optimizer, self.scaler = model, ema, optimizer, scaler
        self.best_val, self.saved_step, self.elapsed = best_val, -1, elapsed
        self.exp = experiment_paths(args.exp_name)
        self.flops_per_image = flops_per_image(model)
        self.writer = SummaryWriter(self.exp["logs"])
        self.val = validation_set(make_dataset(args, "val"), args.val_size, args.seed, args.t_mu,
                                  args.t_sigma)
        self.grid_noise = torch.randn(16, 3, args.image_size, args.image_size,
                                      generator=torch.Generator().manual_seed(args.seed + 1))
        self.clock, self.images_seen = time.time(), 0
        print(f"training {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
              f"params) on {args.dataset} {args.image_size}x{args.image_size}, {total_steps} steps"
              + (f" or {args.max_minutes:g} minutes, whichever ends first" if args.max_minutes else "")
              + f", device {device}, {args.resolved_precision}, experiment {self.exp['root']}", flush=True)

    def after_step(self, step, loss, lr, grad_norm, images, elapsed, last):
        """Whatever is due after optimizer step `step`, `elapsed` seconds into the run: each at its
        --*_every interval and after the `last` step."""
        self.images_seen, self.elapsed = self.images_seen + images, elapsed
        due = lambda every: step % every == 0 or last
        if due(self.args.log_every):
            self.log_progress(step, loss, lr, grad_norm, images)
        if due(self.args.eval_every):
            self.validate(step)
        if due(self.args.sample_every):
            self.sample_grid(step)
        if due(self.args.ckpt_every):
            self.save_last(step)

    def log_progress(self, step, loss, lr, grad_norm, images):
        speed = self.images_seen / (time.time() - self.clock)
        eta = max(0.0, min((self.total_steps - step) * images / speed, self.budget - self.elapsed))
        print(f"step {step}/{self.total_steps} | loss {loss:.4f} | lr {lr:.2e} | grad {grad_norm:.3f} | "
              f"{speed:.1f} img/s | {speed * self.flops_per_image / 1e12:.3f} TFLOP/s | "
              f"ETA {eta / 60:.1f} min", flush=True)
        for name, value in [("loss", loss), ("lr", lr), ("grad_norm", grad_norm),
                            ("images_per_sec", speed)]:
            self.writer.add_scalar(f"train/{name}", value, step)
        self.clock, self.images_seen = time.time(), 0

    def validate(self, step):
        """The EMA's loss on the fixed validation set; a new lowest value is saved as best.pt."""
        val = validation_loss(self.ema, self.val, self.args.t_eps, 4 * self.args.batch_size,
                              self.device, self.args.resolved_precision)
        self.writer.add_scalar("val/loss", val, step)
        new_best = val < self.best_val
        print(f"step {step} | val loss (EMA) {val:.4f}" + (" | new best" if new_best else ""), flush=True)
        if new_best:
            self.best_val = val
            self.save("best.pt", step)

    def sample_grid(self, step):
        """16 samples of the EMA from fixed noise: the same faces, improving, at every interval."""
        with autocast(self.device, self.args.resolved_precision):
            images = sample(self.ema, self.grid_noise.to(self.device), self.args.num_sampling_steps)
        grid = image_grid(images)
        self.writer.add_image("samples", grid, step)
        save_png(grid, self.exp["samples"] / f"step_{step:07d}.png")

    def save(self, name, step):
        save_checkpoint(self.exp["checkpoints"] / name, self.model, self.ema, self.optimizer,
                        self.scaler, step, self.best_val, self.elapsed, self.args)

    def save_last(self, step):
        self.save("last.pt", step)
        self.saved_step = step

    def close(self):
        self.writer.close()


class Interrupted(Exception):
    """Ctrl-C ended the run cleanly; the message says where it stopped. The CLI exits with 130."""


class InterruptRequest:
    """The first Ctrl-C (SIGINT) asks the training loop to stop after the step in flight, so the
    checkpoint it saves is a consistent one; a second Ctrl-C stops at once."""

    def __init__(self, announce=True):
        self.announce = announce

    def __enter__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.announce:
            print("\nCtrl-C: stopping after this step (press again to stop at once)", file=sys.stderr,
                  flush=True)

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


def ignore_interrupts(worker_id):
    """DataLoader workers leave Ctrl-C to the training process, which stops them when it is done."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# --------------------------------------------------------------------------------------------------
#                                   12. CLI: train and sample
# --------------------------------------------------------------------------------------------------

def train_command(args, saved):
    """`train`: check everything, create the experiment, then run one process or spawn several.
    saved: the arguments of the run being resumed (--resume), else None."""
    exp = experiment_paths(args.exp_name)
    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # torchrun started this process
    first = int(os.environ.get("RANK", 0)) == 0  # under torchrun only rank 0 creates the experiment
    if not args.resume and first and resume_checkpoint(exp) is not None:
        raise UserError(f"experiment {exp['root']} already exists; add --resume to continue it, "
                        f"or choose another --exp_name")
    if not args.resume and first and exp["root"].exists():  # a start that failed before its first save
        print(f"experiment {exp['root']} has no checkpoint yet: starting it afresh", flush=True)
    device, args.resolved_precision = device_and_precision(args.device, args.precision, announce=first)
    validate_train_args(args, device, torchrun)
    if args.resume:
        changed = [f"--{k} {flag_value(saved.get(k))} -> {flag_value(getattr(args, k))}"
                   for k in MODEL_ARGS + RESUME_FIXED if saved.get(k, getattr(args, k)) != getattr(args, k)]
        if changed:
            raise UserError(f"--resume cannot change {', '.join(changed)}: they fix the model, the data "
                            f"order or the validation loss of the run; drop those flags, or start a new "
                            f"--exp_name")
    if first:
        for folder in ("checkpoints", "logs", "samples"):
            exp[folder].mkdir(parents=True, exist_ok=True)
        for stale in exp["checkpoints"].glob("*.tmp"):  # a save that a kill cut short
            stale.unlink()
        if not args.resume:
            (exp["root"] / "args.json").write_text(json.dumps(vars(args), indent=2))

    if torchrun:  # join torchrun's group instead of spawning
        train_worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args, device.type)
    elif args.nproc == 1:
        train_worker(0, 1, args, device.type)
    else:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        ctrl_c = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the workers stop on Ctrl-C; wait for them
        # when rank 0 exits with an error, spawn stops the others and logs that it did: expected,
        # not news
        spawn_log = logging.getLogger("torch.multiprocessing.spawn")
        level = spawn_log.level
        spawn_log.setLevel(logging.ERROR)
        try:
            mp.spawn(train_worker, args=(args.nproc, args, device.type), nprocs=args.nproc)
        except mp.ProcessExitedException as e:
            sys.exit(e.exit_code if e.exit_code and e.exit_code > 0 else 1)  # the worker printed why
        finally:
            signal.signal(signal.SIGINT, ctrl_c)
            spawn_log.setLevel(level)


def saved_arguments(exp_name):
    """The arguments saved in the checkpoint that --resume continues from."""
    exp = experiment_paths(exp_name)
    checkpoint = resume_checkpoint(exp)
    if checkpoint is None:
        raise UserError(f"nothing to resume: {exp['checkpoints']} holds no last.pt or best.pt; "
                        f"drop --resume to start experiment {exp_name!r}")
    return load_checkpoint(checkpoint)["args"]


def validate_train_args(args, device, torchrun):
    """Catch bad input before any process starts or any file is written."""
    if args.image_size % args.patch_size:
        nearest = max(args.patch_size, args.image_size // args.patch_size * args.patch_size)
        raise UserError(f"--image_size {args.image_size} is not divisible by --patch_size {args.patch_size}; "
                        f"use e.g. --image_size {nearest}")
    if args.nproc is None:
        args.nproc = torch.cuda.device_count() if device.type == "cuda" else 1
    if args.workers is None:
        # A GPU waits for its examples: workers make them meanwhile. A CPU's cores are its training
        # threads': CelebA's examples, read from the image cache, cost a few percent of a step made
        # in the training process, less than workers taking those cores (decoded from their files,
        # where no cache can be written, 7% of a step at 32x32, and two workers were no faster);
        # toy faces, drawn anew for every example, cost more, and two workers drawing them beside
        # training cost less (README, Measured, 2026-12-03, third and fourth sessions)
        args.workers = 0 if device.type == "cpu" and args.dataset == "celeba" else 2
    if device.type == "mps" and (args.nproc > 1 or torchrun):
        raise UserError("DDP cannot run on MPS (torch.distributed has no MPS backend); use --nproc 1, "
                        "or --device cpu for several processes")
    if device.type == "cuda":
        devices = torch.cuda.device_count()
    elif hasattr(os, "sched_getaffinity"):  # the cores this process may run on (taskset, a CPU set)
        devices = len(os.sched_getaffinity(0))
    else:
        devices = os.cpu_count() or 1
    kind = "GPUs" if device.type == "cuda" else "CPU cores"
    if args.nproc > devices and not torchrun:  # torchrun counts its own processes
        raise UserError(f"--nproc {args.nproc} is more than the {devices} {kind} here; "
                        f"use --nproc {devices} or fewer")
    args.world_size = int(os.environ["WORLD_SIZE"]) if torchrun else args.nproc
    if args.dataset == "toy" and args.attributes:
        if args.attributes == ATTRIBUTE_NAMES:  # `all`
            args.attributes = list(TOY_ATTRIBUTES)
        unknown = [a for a in args.attributes if a not in TOY_ATTRIBUTES]
        if unknown:
            raise UserError(f"toy faces have no {', '.join(unknown)}; their attributes are "
                            f"{','.join(TOY_ATTRIBUTES)}")
    train_images = make_dataset(args, "train", cache=False)
    if args.attributes and train_images.unlabelled and int(os.environ.get("RANK", 0)) == 0:
        print(f"note: {train_images.unlabelled} of {len(train_images)} training images have no row in "
              f"the attribute file: their attributes are unspecified (0), so they train the "
              f"unconditional model only", flush=True)
    images = len(train_images)
    make_dataset(args, "val")  # fails now, not after training, if the val split is missing
    if images < args.batch_size * args.world_size:
        raise UserError(f"only {images} training images for a global batch of "
                        f"{args.batch_size} x {args.world_size} processes; lower --batch_size or --nproc")
    # all is well: build the image cache now, before any process starts (under torchrun by the first
    # process of each machine only; the others wait for it in train_loop)
    if int(os.environ.get("LOCAL_RANK", 0)) == 0 and isinstance(train_images, CelebA):
        train_images.build_cache()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample_command(args):
    device, precision = device_and_precision(args.device, args.precision)
    path = checkpoint_path(args.exp_name, args.checkpoint)
    ckpt = load_checkpoint(path)
    rows = attribute_rows(args.attributes, args.cfg_scale, ckpt["args"]["attributes"])  # (R, K)
    out = experiment_paths(args.exp_name)["samples"]
    out.mkdir(parents=True, exist_ok=True)
    if args.grid:
        noise = torch.randn(args.grid_samples, 3, ckpt["args"]["image_size"], ckpt["args"]["image_size"],
                            generator=torch.Generator().manual_seed(args.seed))
        rows = rows if rows is not None else torch.zeros(1, 0)  # unconditional: one row, no request
        grid = guidance_grid(load_model(ckpt, device, not args.no_ema), rows, args.cfg_scale, noise,
                             args.num_sampling_steps, args.method, device, precision)
        name = out / f"{path.stem}_grid_{args.method}{args.num_sampling_steps}_seed{args.seed}.png"
        save_png(grid, name)
        from torch.utils.tensorboard import SummaryWriter
        with SummaryWriter(experiment_paths(args.exp_name)["logs"]) as writer:
            writer.add_image("attribute_grid", grid, ckpt["step"])
        settings = " | ".join(setting_text(setting) for setting in args.attributes)
        scales = ", ".join(f"{w:g}" for w in args.cfg_scale)
        print(f"wrote {name}: rows {settings}; columns cfg_scale {scales}")
        return
    if len(args.attributes) > 1 or len(args.cfg_scale) > 1:
        raise UserError("several --attributes settings or --cfg_scale values make a grid: add --grid")
    asked = rows[0].expand(args.num_samples, -1) if rows is not None else None   # (num_samples, K)
    batches = generate(ckpt, args.num_samples, args.num_sampling_steps, args.method, args.seed,
                       args.batch_size, device, precision, not args.no_ema, asked, args.cfg_scale[0])
    name = f"{path.stem}_{args.method}{args.num_sampling_steps}_seed{args.seed}"  # e.g. best_euler50_seed0
    if args.attributes[0] or args.cfg_scale[0] != 1:
        name += f"_{setting_text(args.attributes[0])}_cfg{args.cfg_scale[0]:g}"
    # written into {name}.partial/, which replaces {name}/ when complete: the folder never holds a
    # cut-short set, nor mixes these images with those of an earlier run (another checkpoint behind
    # last.pt, more samples)
    out, count, first = out / name, 0, []
    partial, old = out.with_name(name + ".partial"), out.with_name(name + ".old")
    try:
        for folder in (partial, old):  # left by a kill
            shutil.rmtree(folder, ignore_errors=True)
        partial.mkdir()
        for images in batches:  # written as they come: memory does not grow with --num_samples
            for image in to_unit(images):
                save_png(image, partial / f"{count:06d}.png")
                count += 1
            first += list(images[:64 - len(first)])
        if out.is_dir():
            out.rename(old)
        partial.rename(out)  # between these two renames, and only there, there is no {name}/
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted after {count} of {args.num_samples} images; {out}/ is as it was: "
                          f"run the command again to write them") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    save_png(image_grid(torch.stack(first)), out.with_suffix(".png"))
    print(f"wrote {count} images to {out}/ and a grid of the first {len(first)} to {out.with_suffix('.png')}")


def attribute_rows(settings, cfg_scales, trained):
    """sample --attributes settings -> (R, K) vectors over the attributes the checkpoint was trained
    on (`trained`), 0 for those not named; None for an unconditional checkpoint."""
    asked = sorted({name for setting in settings for name in setting})
    if not trained:
        if asked or cfg_scales != [1.0]:
            raise UserError("this checkpoint was trained without --attributes: it draws random faces "
                            "and takes no --attributes or --cfg_scale")
        return None
    unknown = [name for name in asked if name not in trained]
    if unknown:
        raise UserError(f"this checkpoint was not trained on {', '.join(unknown)}; it knows "
                        f"{','.join(trained)}")
    return torch.tensor([[setting.get(name, 0.0) for name in trained] for setting in settings])


def setting_text(setting):
    """{name: +1 | -1} -> 'Smiling=1,Eyeglasses=0' ('none' when empty): how --attributes spells it."""
    return ",".join(f"{name}={int(value > 0)}" for name, value in setting.items()) or "none"


def number(kind, above=None, at_least=None, below=None):
    """An argparse type: a finite int or float, optionally > above, >= at_least and < below."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
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
    return parse


def positive(kind):
    return number(kind, above=0)


def experiment_name(text):
    """--exp_name is a folder under experiments/: a plain name, never a path."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", text) or text in (".", ".."):
        raise argparse.ArgumentTypeError(f"{text!r} is not a plain name: use letters, digits and - _ . "
                                         f"(no slashes, not . or ..); it becomes experiments/NAME")
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
    return [name for name in ATTRIBUTE_NAMES if name in names]


def attribute_setting(text):
    """sample --attributes: 'Smiling=1,Eyeglasses=0' -> {name: +1 | -1}; 'none' -> {}."""
    setting = {}
    for item in text.split(",") if text != "none" else []:
        name, _, value = item.strip().partition("=")
        if value not in ("0", "1"):
            raise argparse.ArgumentTypeError(f"{item.strip()!r}: write NAME=1 (present) or NAME=0 "
                                             f"(absent), e.g. Smiling=1,Eyeglasses=0")
        setting[attribute_name(name)] = 1.0 if value == "1" else -1.0
    return setting


class Parser(argparse.ArgumentParser):
    """argparse, showing each flag's default in --help, and reporting a bad flag as a UserError (one
    line `error: ...`, exit status 2) instead of its usage block."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kwargs)

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


PRECISIONS = ["auto", "bf16", "fp16", "fp32"]
PRECISION_HELP = ("autocast dtype; auto: bf16 where it is native (CUDA >= 8.0, a CPU whose bf16 matmul is "
                  "measured faster), fp16 + loss scaling on older GPUs, else fp32")
DEVICES = ["auto", "cpu", "cuda", "mps"]
DEVICE_HELP = "auto: cuda, then mps, then cpu"


def make_parser():
    """The `train` and `sample` subcommands; returns the parser and its `train` subparser (whose
    defaults --resume replaces with the saved arguments)."""
    parser = Parser(prog="celebgen.py", description="Rectified-flow DiT for CelebA faces.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model (resumable)")
    arg = train.add_argument
    arg("--exp_name", required=True, type=experiment_name,
        help="experiments/{exp_name} holds everything of the run")
    arg("--resume", action="store_true",
        help="continue experiments/{exp_name} exactly from last.pt (or best.pt); the saved flags are the "
             "defaults, and the model, --batch_size, --nproc, --seed, --t_mu, --t_sigma, --t_eps and "
             "--val_size cannot change")
    arg("--dataset", choices=["celeba", "toy"], default="celeba",
        help="celeba: images under --data_root; toy: procedurally drawn faces, no download")
    arg("--data_root", default="./data", help="where CelebA is (see README for the layouts)")
    arg("--download", action="store_true",
        help="fetch CelebA into DATA_ROOT/celeba first (needs: pip install gdown), unless there")
    arg("--image_size", type=positive(int), default=32, help="side of the square training images")
    arg("--attributes", type=attribute_list, default=[],
        help="condition on these CelebA attributes, comma-separated (e.g. Smiling,Eyeglasses), or "
             "all; toy faces have " + ",".join(TOY_ATTRIBUTES) + ". Default: unconditional")
    arg("--attr_dropout", type=number(float, at_least=0, below=1), default=0.1,
        help="hide each attribute of a training example with this probability")
    arg("--attr_dropout_all", type=number(float, at_least=0, below=1), default=0.1,
        help="hide all attributes of a training example with this probability (the unconditional "
             "model of classifier-free guidance)")
    arg("--model", choices=list(MODELS), default="tiny",
        help="named size: " + ", ".join(f"{k} (width {v['dim']}, depth {v['depth']})" for k, v in
                                        MODELS.items()))
    arg("--patch_size", type=positive(int), default=4, help="side of the square patches (tokens)")
    arg("--batch_size", type=positive(int), default=32, help="images per step per process")
    arg("--epochs", type=positive(int), default=100, help="passes over the training images")
    arg("--max_steps", type=positive(int), default=None,
        help="stop after this many optimizer steps (before --epochs ends)")
    arg("--max_minutes", type=positive(float), default=None,
        help="stop after this many minutes of training (counted across resumes), whatever the steps")
    arg("--cooldown", type=number(float, at_least=0, below=1), default=0.2,
        help="the learning rate decays linearly to 0 over this last fraction of the run (of "
             "--max_minutes, or of the steps, whichever is further along); 0: no decay")
    arg("--lr", type=positive(float), default=1.5e-3,
        help="AdamW learning rate after the warm-up (DiT's, for long GPU runs of DiT-S or -B: 1e-4)")
    arg("--warmup_steps", type=positive(int), default=200,
        help="steps of linear learning-rate warm-up from lr/warmup_steps to lr")
    arg("--grad_clip", type=positive(float), default=1.0, help="clip the gradient norm to this")
    arg("--ema_decay", type=number(float, at_least=0, below=1), default=0.995,
        help="EMA decay d in [0, 1): the average spans about 1 / (1 - d) steps (DiT's, for runs of "
             "hundreds of thousands of steps: 0.9999)")
    arg("--t_mu", type=number(float), default=-0.4, help="logit-normal mean of the training times t")
    arg("--t_sigma", type=positive(float), default=0.8, help="logit-normal std of the training times t")
    arg("--t_eps", type=positive(float), default=0.2,
        help="the loss's velocities divide by max(1 - t, t_eps)")
    arg("--num_sampling_steps", type=positive(int), default=50, help="Euler steps of the sample grids")
    arg("--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP)
    arg("--device", choices=DEVICES, default="auto", help=DEVICE_HELP)
    arg("--compile", action="store_true",
        help="torch.compile the model: fused kernels for the work between matmuls; the first step "
             "compiles (up to minutes on a CPU, which needs a C++ compiler), later steps run faster")
    arg("--nproc", type=positive(int), default=None,
        help="processes on this machine (default: one per GPU on CUDA, else 1)")
    arg("--workers", type=number(int, at_least=0), default=None,
        help="DataLoader worker processes per process (0: make the examples in the training process; "
             "default: 0 for CelebA on a CPU, whose cores workers would take from training, else 2)")
    arg("--seed", type=number(int, at_least=0), default=0, help="for weights, data order and noise")
    arg("--val_size", type=positive(int), default=256,
        help="fixed validation images (and noise and times) that choose best.pt")
    arg("--log_every", type=positive(int), default=50, help="steps between progress lines")
    arg("--eval_every", type=positive(int), default=500, help="steps between validation losses")
    arg("--sample_every", type=positive(int), default=1000, help="steps between sample grids")
    arg("--ckpt_every", type=positive(int), default=1000, help="steps between saves of last.pt")

    smp = commands.add_parser("sample", help="sample images from a checkpoint")
    arg = smp.add_argument
    arg("--exp_name", required=True, type=experiment_name, help="the experiment to sample")
    arg("--checkpoint", default="last.pt",
        help="a name in the experiment's checkpoints/ (last.pt, best.pt) or a path")
    arg("--num_samples", type=positive(int), default=64, help="images to write")
    arg("--num_sampling_steps", type=positive(int), default=50, help="steps from noise to image")
    arg("--method", choices=["euler", "heun"], default="euler",
        help="euler: one model call per step; heun: two, second-order accurate")
    arg("--seed", type=number(int, at_least=0), default=0, help="seed of the noise")
    arg("--batch_size", type=positive(int), default=64, help="images sampled at once")
    arg("--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP)
    arg("--device", choices=DEVICES, default="auto", help=DEVICE_HELP)
    arg("--no_ema", action="store_true", help="use the raw weights instead of the EMA")
    arg("--attributes", type=attribute_setting, nargs="+", default=[{}], metavar="NAME=0|1,...",
        help="ask a conditional model for attributes, e.g. Smiling=1,Eyeglasses=0; those not named "
             "are unspecified; 'none' asks for nothing. Several settings with --grid")
    arg("--cfg_scale", type=number(float, at_least=0), nargs="+", default=[1.0],
        help="classifier-free guidance weight: 0 unconditional, 1 conditional, > 1 stronger. "
             "Several with --grid")
    arg("--grid", action="store_true",
        help="one image: a row per --attributes setting, a column per --cfg_scale, each cell "
             "--grid_samples samples from the same noise")
    arg("--grid_samples", type=positive(int), default=4, help="samples per cell of --grid")
    return parser, train


def exit_on_user_error(command, *args, quiet=False):
    """Run a command. Bad input (UserError), an op without an MPS kernel and a --compile that finds no
    working compiler end as one line `error: ...` and exit status 2; Ctrl-C as one line and status
    130 (the shell's code for SIGINT). No traceback. quiet: a DDP rank other than 0, which says
    nothing and leaves with status 0, because spawn stops every process as soon as one fails: rank 0
    must be the one whose status and message the user gets."""
    code = 2
    try:
        return command(*args)
    except UserError as e:
        # from a DataLoader worker the message arrives inside the worker's traceback: its last line
        message = "error: " + re.sub(r"^[\w.]*UserError: ", "", str(e).strip().splitlines()[-1])
    except NotImplementedError as e:
        if "MPS" not in str(e):
            raise
        message = (f"error: {str(e).splitlines()[0]} Set PYTORCH_ENABLE_MPS_FALLBACK=1 to run such ops "
                   f"on the CPU, or use --device cpu")
    except torch._dynamo.exc.BackendCompilerFailed as e:  # --compile without a working compiler
        reason = e.inner_exception
        message = (f"error: --compile failed ({type(reason).__name__}: {str(reason).splitlines()[0]}); "
                   f"train without --compile, which runs the same model")
    except Interrupted as e:
        code, message = 130, str(e)
    except KeyboardInterrupt:
        code, message = 130, ("interrupted (checkpoints, images and FID statistics are only ever written "
                              "whole: those written before are intact)")
    if not quiet:
        print(message, file=sys.stderr, flush=True)
    sys.exit(0 if quiet else code)


def main(argv=None):
    parser, train_parser = make_parser()
    args = exit_on_user_error(parser.parse_args, argv)
    if args.command == "sample":
        exit_on_user_error(sample_command, args)
        return
    saved = None
    if args.resume:  # the saved arguments become the defaults; flags given now override them
        saved = exit_on_user_error(saved_arguments, args.exp_name)
        train_parser.set_defaults(**saved)
        args = exit_on_user_error(parser.parse_args, argv)
    exit_on_user_error(train_command, args, saved)


if __name__ == "__main__":
    main()
