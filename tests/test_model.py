"""The model, the loss and the sampler: math identities and known answers."""
import math
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

import celebgen as cg


def randomized(model, seed=0):
    """A model whose zero-initialised layers are given random weights, so that its output is not 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def small_dit(image_size=16, patch_size=4):
    torch.manual_seed(0)
    return cg.DiT(image_size, patch_size, dim=64, depth=2, heads=2)


@pytest.mark.parametrize("image_size,patch_size", [(16, 2), (32, 4), (64, 8), (24, 4)])
def test_patchify_round_trip_and_model_shapes(image_size, patch_size):
    x = torch.randn(2, 3, image_size, image_size)
    tokens = cg.patchify(x, patch_size)
    grid = image_size // patch_size
    assert tokens.shape == (2, grid**2, 3 * patch_size**2)
    # token 1 is the patch in row 0, column 1: pixels [0:p, p:2p], channel-last
    assert torch.equal(tokens[0, 1], x[0, :, :patch_size, patch_size:2 * patch_size].permute(1, 2, 0).flatten())
    assert torch.equal(cg.unpatchify(tokens, patch_size, grid), x)
    model = randomized(small_dit(image_size, patch_size))
    assert model(x, torch.rand(2)).shape == x.shape


def test_rope_logits_depend_only_on_relative_position():
    torch.manual_seed(0)
    head_dim, n = 32, 10
    q, k = torch.randn(1, 1, n, head_dim), torch.randn(1, 1, n, head_dim)
    rows, cols = torch.randint(0, 16, (n,)), torch.randint(0, 16, (n,))

    def logits(rows, cols):
        angles = cg.rope_angles(rows, cols, head_dim)
        return cg.apply_rope(q, angles) @ cg.apply_rope(k, angles).transpose(-1, -2)  # (1, 1, n, n)

    shifted = logits(rows + 5, cols - 3)
    assert torch.allclose(logits(rows, cols), shifted, atol=1e-4)
    # ...and the logits do depend on the relative position: swapping two tokens' places changes them
    moved = logits(torch.cat([rows[1:2], rows[:1], rows[2:]]), cols)
    assert (moved - shifted).abs().max() > 0.1
    # a rotation preserves norms
    assert torch.allclose(cg.apply_rope(q, cg.rope_angles(rows, cols, head_dim)).norm(dim=-1), q.norm(dim=-1))


def test_rope_is_the_rotation_of_adjacent_channel_pairs_its_docstring_writes():
    """apply_rope's complex product equals its docstring's real formula: pair (x_2k, x_2k+1) turned by
    angle a_k into (x_2k cos a - x_2k+1 sin a, x_2k sin a + x_2k+1 cos a); in fp32 for bf16 inputs."""
    torch.manual_seed(0)
    x, angles = torch.randn(2, 3, 5, 8), 10 * torch.randn(5, 4)                # (B, H, N, d), (N, d/2)
    even, odd = x[..., 0::2], x[..., 1::2]                                       # (B, H, N, d/2) each
    cos, sin = angles.cos(), angles.sin()
    expected = torch.stack([even * cos - odd * sin, even * sin + odd * cos], -1).flatten(-2)
    assert torch.allclose(cg.apply_rope(x, angles), expected, atol=1e-5)
    rotated = cg.apply_rope(x.bfloat16(), angles)
    assert rotated.dtype == torch.float32 and torch.allclose(rotated, cg.apply_rope(x.bfloat16().float(), angles))


def test_attention_logits_depend_only_on_relative_position(monkeypatch):
    """Inside Attention, RoPE turns the queries and the keys: with the same token at all 16 places of
    a 4x4 grid, the logit of (query at p, key at r) is unchanged when both move by a row or a column,
    and it does change from key to key."""
    torch.manual_seed(0)
    attention = cg.Attention(64, 1)
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    rope = cg.rope_angles(rows.flatten(), cols.flatten(), 64)                 # (16, 32)
    logits = []
    monkeypatch.setattr(cg.F, "scaled_dot_product_attention",
                        lambda q, k, v: logits.append(q @ k.transpose(-1, -2)) or v)
    with torch.no_grad():
        attention(torch.randn(1, 1, 64).expand(1, 16, 64), rope)
    grid = logits[0].view(4, 4, 4, 4)  # [query row, query column, key row, key column]
    assert torch.allclose(grid[:, :-1, :, :-1], grid[:, 1:, :, 1:], atol=1e-4)  # both a column on
    assert torch.allclose(grid[:-1, :, :-1], grid[1:, :, 1:], atol=1e-4)        # both a row down
    assert (logits[0][0, 0, 0] - logits[0][0, 0, 0, 0]).abs().max() > 0.1      # keys differ


def test_attention_is_each_heads_softmax_over_its_values_then_the_heads_side_by_side():
    """Attention written out, head by head (RoPE at angle 0, the identity): each token's output is
    proj of its heads' outputs concatenated, head h being softmax(q_h k_h^T / sqrt(d)) v_h over the
    tokens, with q_h and k_h normalised (QK-norm)."""
    torch.manual_seed(0)
    attention, (B, N, H, d) = cg.Attention(16, 2), (2, 5, 2, 8)
    x = torch.randn(B, N, H * d)
    q, k, v = attention.qkv(x).view(B, N, 3, H, d).unbind(2)                  # (B, N, H, d) each
    q, k = (F.layer_norm(z, (d,), eps=1e-6) for z in (q, k))  # the norms' gains start at 1
    heads = [torch.softmax(q[:, :, h] @ k[:, :, h].transpose(1, 2) / d**0.5, -1) @ v[:, :, h]
             for h in range(H)]                                               # (B, N, d) each
    expected = attention.proj(torch.cat(heads, -1))                           # (B, N, H d)
    assert torch.allclose(attention(x, torch.zeros(N, d // 2)), expected, atol=1e-5)


def test_a_block_is_the_adain_zero_formula_written_out():
    """x <- x + g1 attn(LN(x)(1 + s1) + b1), then x <- x + g2 mlp(LN(x)(1 + s2) + b2), where (b1, s1, g1,
    b2, s2, g2) are the six chunks of the modulation of c, once trained away from zero."""
    torch.manual_seed(0)
    block, x, c, rope = cg.Block(16, 2), torch.randn(2, 5, 16), torch.randn(2, 16), torch.zeros(5, 4)
    torch.nn.init.normal_(block.modulation[-1].weight, std=0.5)
    b1, s1, g1, b2, s2, g2 = block.modulation(c)[:, None].chunk(6, -1)        # (B, 1, D) each
    norm = lambda z: F.layer_norm(z, (16,), eps=1e-6)
    after_attention = x + g1 * block.attn(norm(x) * (1 + s1) + b1, rope)
    expected = after_attention + g2 * block.mlp(norm(after_attention) * (1 + s2) + b2)
    assert torch.allclose(block(x, c, rope), expected, atol=1e-5)


def test_the_dit_is_its_section_5_pipeline_written_out():
    """x_pred = unpatchify(out(LN(h)(1 + scale) + shift)): h the blocks' output from
    patch_embed(patchify(x_t)), and (shift, scale) the two chunks of the final modulation of
    c = time_mlp(time_features(t)) + W a."""
    torch.manual_seed(0)
    model = randomized(cg.DiT(8, 4, dim=16, depth=1, heads=2, num_attributes=2))
    x_t, t, a = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([[1.0, -1.0], [0.0, 1.0]])
    c = model.time_mlp(cg.time_features(t, cg.TIME_FEATURES)) + model.attribute_embed(a)      # (B, D)
    h = model.blocks[0](model.patch_embed(cg.patchify(x_t, 4)), c, model.rope)                # (B, N, D)
    shift, scale = model.final_modulation(c)[:, None].chunk(2, -1)                           # (B, 1, D)
    expected = cg.unpatchify(model.out(F.layer_norm(h, (16,), eps=1e-6) * (1 + scale) + shift), 4, 2)
    assert torch.allclose(model(x_t, t, a), expected, atol=1e-5)


def test_uniform_time_rotation_leaves_attention_unchanged():
    """Rotating all queries and keys by the same time angle t*w cancels in q.k: t would be invisible."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 16, 32).unbind(0)  # (B, H, N, d)
    for t in (0.1, 0.7):
        time_angles = (1000 * t * cg.frequency_bank(16, 10_000.0)).expand(16, 16)  # the same for all N tokens
        rotated = F.scaled_dot_product_attention(cg.apply_rope(q, time_angles), cg.apply_rope(k, time_angles), v)
        assert torch.allclose(rotated, F.scaled_dot_product_attention(q, k, v), atol=1e-5)


def test_pixels_map_to_the_models_range_and_back():
    """uint8 pixels 0..255 -> [-1, 1] (the model's range, 0 -> -1, 255 -> 1) -> [0, 1] for PNGs: p / 255."""
    pixels = torch.arange(256, dtype=torch.uint8)
    signed = cg.to_signed(pixels)
    assert signed[0] == -1 and signed[-1] == 1 and torch.allclose(cg.to_unit(signed), pixels / 255.0, atol=1e-6)


def test_model_output_depends_on_t():
    model = randomized(small_dit())
    x = torch.randn(2, 3, 16, 16)
    a, b = model(x, torch.full((2,), 0.2)), model(x, torch.full((2,), 0.8))
    assert (a - b).abs().mean() > 0.01 * a.abs().mean()
    assert not torch.allclose(cg.time_features(torch.tensor([0.2]), 256), cg.time_features(torch.tensor([0.8]), 256))


def test_adain_zero_blocks_are_the_identity_at_init():
    torch.manual_seed(0)
    block = cg.Block(64, 2)
    x, c = torch.randn(2, 16, 64), torch.randn(2, 64)
    rope = cg.rope_angles(torch.arange(16) // 4, torch.arange(16) % 4, 32)
    assert torch.equal(block(x, c, rope), x)
    model = small_dit()  # and the whole untrained DiT predicts the zero image
    assert torch.equal(model(torch.randn(2, 3, 16, 16), torch.rand(2)), torch.zeros(2, 3, 16, 16))


def test_oracle_x_prediction_gives_the_true_velocity():
    torch.manual_seed(0)
    x1, x0 = torch.randn(2, 8, 3, 8, 8).unbind(0)
    t = torch.linspace(0, 0.95, 8)  # 1 - t >= t_eps = 0.05
    v_pred = cg.velocity(x1, cg.interpolate(x1, x0, t), t, t_eps=0.05)
    assert torch.allclose(v_pred, x1 - x0, atol=1e-5)


def test_v_loss_is_a_weighted_x_loss_capped_near_t_1():
    """The loss comment: ||v_pred - v_target||^2 = ||x_pred - x1||^2 / max(1 - t, t_eps)^2 at every t,
    and the target is x1 - x0 wherever 1 - t >= t_eps."""
    torch.manual_seed(0)
    model = randomized(small_dit())
    x1, x0 = torch.randn(2, 64, 3, 16, 16).unbind(0)
    t, eps = torch.cat([torch.rand(60), torch.tensor([0.96, 0.97, 0.98, 0.99])]), 0.05
    x_pred = model(cg.interpolate(x1, x0, t), t)
    c = (1 - t).clamp_min(eps).view(-1, 1, 1, 1)
    assert torch.allclose(cg.flow_loss(model, x1, x0, t, eps), ((x_pred - x1) ** 2 / c**2).mean(), rtol=1e-4)
    low = t < 1 - eps
    x_t = cg.interpolate(x1, x0, t)
    assert torch.allclose(cg.velocity(x1, x_t, t, eps)[low], (x1 - x0)[low], atol=1e-5)


def share_above(t, mu, sigma):
    """The share of logit-normal times above t: P(mu + sigma n > logit t), n ~ N(0, 1)."""
    return torch.special.ndtr(-(torch.logit(torch.tensor(t, dtype=torch.float64)) - mu) / sigma).item()


def test_near_t_1_the_loss_is_still_minimal_at_x1():
    """Section 6: for 1 - t < t_eps the clamped target keeps the minimiser at x1 (what the sampler
    assumes at its last steps, t = 0.82 to 0.98 of 50 with the default t_eps); this region holds
    1.28% of the default times (t > 0.8) and about one in 700,000 of JiT's (t > 0.95, t_eps 0.05)."""
    x1, x0 = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0)).unbind(0)
    oracle = lambda prediction: (lambda x, t, attributes=None: prediction)
    for t, eps in ((torch.tensor([0.82, 0.9, 0.98, 0.99]), 0.2), (torch.tensor([0.96, 0.97, 0.98, 0.99]), 0.05)):
        assert cg.flow_loss(oracle(x1), x1, x0, t, eps) == 0
        assert cg.flow_loss(oracle(x1 + 0.01), x1, x0, t, eps) > 0
    args = cg.make_parser()[1].parse_args(["--exp_name", "x"])
    assert (args.t_mu, args.t_sigma, args.t_eps) == (-0.4, 0.8, 0.2)  # the defaults the comment names
    assert round(100 * share_above(1 - args.t_eps, args.t_mu, args.t_sigma), 2) == 1.28
    assert 1 / 750_000 < share_above(1 - 0.05, -0.8, 0.8) < 1 / 650_000
    assert round(1 - share_above(0.5, args.t_mu, args.t_sigma), 2) == 0.69  # section 1: "69% of the times"


def test_the_time_distributions_tail_shares_in_section_1():
    """Section 1's comment and RESULTS.md's table of time distributions: the settings that drew
    blocky faces, (mu, sigma) = (-0.8, 0.6) and (-1.6, 0.8), put 0.01% of their times above 0.8, 6.9
    and 4.8 expected of their 10-minute runs' examples (3,193 and 3,167 steps of 16); the former
    default (-0.6, 0.8) 0.65%, JiT's (-0.8, 0.8) 0.31% -- in the closed form and in logit_normal's
    draws."""
    for mu, sigma, steps, expected in ((-0.8, 0.6, 3193, 6.9), (-1.6, 0.8, 3167, 4.8)):
        assert round(share_above(0.8, mu, sigma) * steps * 16, 1) == expected
    table = {(0, 1.0): (8.3, 8.3), (-0.4, 1.0): (3.7, 16.2), (-0.6, 0.8): (0.65, 16.3),
             (-0.8, 0.8): (0.31, 23.2), (-1.2, 0.8): (0.06, 40.8), (-1.6, 0.8): (0.01, 60.5),
             (-0.8, 0.6): (0.01, 16.4)}  # shares of times above 0.8 and below 0.2, in %
    for (mu, sigma), (high, low) in table.items():
        digits = 2 if high < 1 else 1
        assert round(100 * share_above(0.8, mu, sigma), digits) == high
        assert round(100 * (1 - share_above(0.2, mu, sigma)), 1) == low
    n = torch.randn(4_000_000, generator=torch.Generator().manual_seed(0))
    for mu in (-0.6, -0.8):  # the closed form is that of logit_normal's draws
        assert abs((cg.logit_normal(n, mu, 0.8) > 0.8).double().mean().item() - share_above(0.8, mu, 0.8)) < 2e-4


def test_qk_norm_bounds_the_attention_logits_by_the_gains(monkeypatch):
    """The QK-norm comment: |q.k| / sqrt(d) <= sqrt(d) max|gain_q| max|gain_k|, however large x is --
    measured on the q and k that Attention.forward hands to attention."""
    torch.manual_seed(0)
    attn = cg.Attention(128, heads=2)
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 2)
        attn.k_norm.weight.uniform_(0.5, 2)
    seen, sdpa = [], F.scaled_dot_product_attention
    monkeypatch.setattr(cg.F, "scaled_dot_product_attention", lambda q, k, v: seen.append((q, k)) or sdpa(q, k, v))
    attn(1000 * torch.randn(2, 16, 128), cg.rope_angles(torch.arange(16) // 4, torch.arange(16) % 4, 64))
    q, k = seen[0]                                                                  # (B, H, N, d) each
    logits = q @ k.transpose(-1, -2) / 8                                            # (B, H, N, N)
    bound = 8 * attn.q_norm.weight.abs().max() * attn.k_norm.weight.abs().max()
    assert logits.abs().max() <= bound * (1 + 1e-5) and logits.abs().max() > bound / 10


def test_layer_norm_keeps_its_statistics_in_fp32_for_bf16_inputs():
    """The QK-norm comment: LayerNorm of bf16 numbers far from 0 (mean 300, spread 1) equals the fp32
    LayerNorm of the same numbers up to bf16's rounding of the result; statistics summed in bf16 (8 bits)
    would have lost the spread to the mean's rounding."""
    torch.manual_seed(0)
    x = (300 + torch.randn(1000, 64)).bfloat16()
    norm = torch.nn.LayerNorm(64, eps=1e-6, bias=False)
    exact = norm(x.float())
    assert torch.allclose(norm(x).float(), exact, rtol=2**-8, atol=2**-8)
    assert exact.abs().max() > 2  # the numbers normalised are of the spread, not 0


@pytest.mark.parametrize("name,millions", [("tiny", 4.2), ("small", 33), ("base", 130)])
def test_named_model_sizes_have_the_stated_parameter_counts(name, millions):
    """MODELS' comments, at 4x4 patches; no parameter depends on the image size (RoPE has none)."""
    model = cg.DiT(64, 4, **cg.MODELS[name])
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert round(count, 1 if millions < 10 else 0) == millions


def test_rope_slowest_frequency_turns_less_than_half_a_turn_across_each_grid():
    """What rope_angles' docstring states, for head width 64: 1 rad per patch fastest, 0.0133 slowest,
    and 0.09 / 0.20 / 0.41 rad across grids of 8 / 16 / 32 patches (offsets up to 7 / 15 / 31)."""
    for grid, span in [(8, 0.09), (16, 0.20), (32, 0.41)]:
        rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
        angles = cg.rope_angles(rows.flatten(), cols.flatten(), 64)                 # (N, 32)
        per_patch = angles[grid] - angles[0]  # one row down: the row pairs turn by w_k, columns not at all
        assert per_patch[0] == 1 and round(per_patch[15].item(), 4) == 0.0133 and (per_patch[16:] == 0).all()
        assert round((angles[:, 15].max() - angles[:, 15].min()).item(), 2) == span < math.pi


def test_the_dits_rope_turns_the_first_half_of_pairs_with_the_patch_row():
    """The DiT's angles are rope_angles of each token's (row, column), token n at (n // grid,
    n % grid): one row down (token + grid) turns the first half of the pairs, one column right
    (token + 1) the second."""
    model = cg.DiT(16, 4, dim=16, depth=1, heads=2)  # a 4x4 grid; head width 8: 4 pairs
    n = torch.arange(16)
    assert torch.equal(model.rope, cg.rope_angles(n // 4, n % 4, 8))                  # (16, 4)
    down, right = model.rope[4] - model.rope[0], model.rope[1] - model.rope[0]
    assert (down[:2] > 0).all() and (down[2:] == 0).all()
    assert (right[:2] == 0).all() and (right[2:] > 0).all()


def test_logit_normal_times():
    n = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    t = cg.logit_normal(n, -0.8, 0.8)
    assert 0 < t.min() and t.max() < 1
    assert abs(torch.logit(t).mean().item() + 0.8) < 0.01 and abs(torch.logit(t).std().item() - 0.8) < 0.01


def test_time_grid_starts_the_last_step_at_0_98_and_shrinks_the_steps_by_the_power():
    """t_i = 1 - (1 - i/S)^p: uniform for p = 1, steps shrinking linearly for p = 2; by default the p
    with t_{S-1} = 0.98, at most 2 (as section 7 says: 1.70 at 10 steps, 1.31 at 20, uniform at 50,
    2 below 8 steps)."""
    assert cg.time_grid(4, 1.0) == [0.0, 0.25, 0.5, 0.75, 1.0] and cg.time_grid(1) == [0.0, 1.0]
    steps = torch.tensor(cg.time_grid(10, 2.0)).diff()
    assert torch.allclose(steps.diff(), torch.full((9,), -0.02, dtype=steps.dtype))  # linear shrink
    assert cg.time_grid(50) == pytest.approx(cg.time_grid(50, 1.0)) and cg.LAST_STEP_FROM == 0.98
    for num_steps, power in ((10, 1.70), (20, 1.31)):
        assert cg.time_grid(num_steps) == pytest.approx(cg.time_grid(num_steps, power), abs=2e-3)
    for num_steps in (8, 10, 20, 100):
        times = torch.tensor(cg.time_grid(num_steps))
        assert times[0] == 0 and times[-1] == 1 and (times.diff() > 0).all()
        assert times[-2].item() == pytest.approx(0.98)
    assert all(cg.time_grid(n) == cg.time_grid(n, 2.0) for n in (2, 5, 7))  # p at most 2


@pytest.mark.parametrize("power", [1.0, None])
@pytest.mark.parametrize("method", ["euler", "heun", "multistep"])
@pytest.mark.parametrize("steps", [1, 7, 50])
def test_sampler_lands_exactly_on_a_fixed_prediction(method, steps, power):
    """A model that always predicts the same image makes every path straight: every solver is exact."""
    target = torch.rand(1, 3, 8, 8) * 2 - 1
    noise = torch.randn(4, 3, 8, 8)
    out = cg.sample(lambda x, t: target.expand_as(x), noise, cg.time_grid(steps, power), method)
    assert torch.allclose(out, target.expand_as(out), atol=1e-5)


@pytest.mark.parametrize("steps", [2, 5, 20])
def test_multistep_lands_exactly_on_a_prediction_linear_in_t(steps):
    """x_pred(t) = a + b t is its own line through the last two predictions, so from the second step on
    the multistep solver integrates exactly, and at t = 1 it lands on a + b, whatever its first (Euler)
    step did; Euler lands on the last prediction, a + b t_{S-1}."""
    a, b = torch.rand(1, 3, 8, 8) * 2 - 1, torch.rand(1, 3, 8, 8) - 0.5
    model = lambda x, t: a + b * t.view(-1, 1, 1, 1)
    noise, times = torch.randn(4, 3, 8, 8), cg.time_grid(steps)
    assert torch.allclose(cg.sample(model, noise, times, "multistep"), (a + b).expand(4, -1, -1, -1), atol=1e-5)
    assert torch.allclose(cg.sample(model, noise, times), (a + b * times[-2]).expand(4, -1, -1, -1), atol=1e-5)


@pytest.mark.parametrize("power", [1.0, 2.0])
def test_sampler_transports_a_gaussian_with_first_and_second_order_error(power):
    """Data x1 ~ N(m, s^2): the best x-prediction is E[x1 | x_t] = m + t s^2 (x_t - t m) / (t^2 s^2 + (1-t)^2),
    and the flow maps noise x0 to exactly m + s x0. Doubling the steps halves Euler's error (first order)
    and quarters Heun's and the multistep solver's (second order)."""
    m, s = 0.5, 0.3

    def oracle(x, t):
        t = t.view(-1, 1, 1, 1).double()
        return m + t * s**2 * (x.double() - t * m) / (t**2 * s**2 + (1 - t) ** 2)

    noise = torch.randn(16, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    exact = m + s * noise

    def error(steps, method):
        return (cg.sample(oracle, noise, cg.time_grid(steps, power), method) - exact).abs().max().item()

    assert 1.7 < error(20, "euler") / error(40, "euler") < 2.3
    assert error(20, "heun") / error(40, "heun") > 3.5
    assert error(40, "multistep") / error(80, "multistep") > 3.2  # 3.5 uniform, 4.2 at p = 2
    assert error(40, "heun") < 0.005 and error(400, "euler") < 0.01


def test_autoguidance_extrapolates_from_the_guide_through_the_model():
    """x_guide + w (x_model - x_guide): the guide at w = 0, the model at w = 1, beyond it above; both
    asked for the same attributes."""
    torch.manual_seed(0)
    model, guide = (randomized(cg.DiT(8, 4, **cg.MODELS["tiny"], num_attributes=2), seed) for seed in (0, 1))
    x, t, a = torch.randn(3, 3, 8, 8), torch.rand(3), torch.tensor([[1.0, -1], [0, 1], [-1, 0]])
    with torch.no_grad():
        x_model, x_guide = model(x, t, a), guide(x, t, a)
        for w in (0.0, 1.0, 2.5):
            assert torch.allclose(cg.Autoguided(model, guide, w)(x, t, a), x_guide + w * (x_model - x_guide),
                                  atol=1e-5)
        assert not torch.allclose(guide(x, t), x_guide, atol=1e-3)  # the attributes matter to the guide
    assert not torch.allclose(x_model, x_guide)


def test_generate_draws_fresh_noise_per_image_whatever_the_batch_size():
    """Sampling a checkpoint 3 at a time gives the very images of 6 at once (the noise is one stream
    from the seed, and each batch takes its own rows of the requests), and all 6 differ. They are
    sample()'s from torch.randn of a CPU generator seeded with --seed; another seed draws others. (This holds
    for 8x8 images, 192 normals each: the CPU draws normals in blocks of 16, so a batch boundary that
    splits a block would give other numbers.)"""
    torch.manual_seed(0)
    model = randomized(cg.DiT(8, 4, **cg.MODELS["tiny"], num_attributes=2))
    ckpt = {"args": dict(model="tiny", image_size=8, patch_size=4, attributes=["Smiling", "Male"]),
            "ema": model.state_dict()}
    asked = torch.tensor([[1.0, -1], [-1, 1], [1, 1], [-1, -1], [0, 1], [1, 0]])  # (6, 2)
    cpu = torch.device("cpu")
    settings = lambda batch_size, seed: cg.argparse.Namespace(num_samples=6, num_sampling_steps=3, method="euler",
                                                              time_power=None, seed=seed, batch_size=batch_size)
    draw = lambda batch_size, seed=7: torch.cat(list(cg.generate(cg.load_model(ckpt, cpu), settings(batch_size, seed),
                                                                 cpu, "fp32", attributes=asked)))  # (6, 3, 8, 8)
    whole, in_halves = draw(6), draw(3)
    assert torch.allclose(whole, in_halves, atol=1e-5)
    noise = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    by_hand = cg.sample(cg.load_model(ckpt, cpu), noise, cg.time_grid(3), attributes=asked)
    assert torch.allclose(whole, by_hand, atol=1e-5) and not torch.allclose(draw(6, seed=8), whole, atol=1e-3)
    distance = (whole[:, None] - whole[None]).abs().flatten(2).max(-1).values   # (6, 6)
    assert (distance + torch.eye(6)).min() > 1e-3


def test_overfits_a_few_images():
    """A small DiT on 4 toy faces: the loss falls by a large factor and samples land near the data."""
    torch.manual_seed(0)
    faces = cg.ToyFaces(16)
    data = torch.stack([faces[i] for i in range(4)])  # (4, 3, 16, 16)
    model = cg.DiT(16, 4, dim=128, depth=4, heads=4)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95))
    losses = []
    for step in range(600):
        x1 = data.repeat(4, 1, 1, 1)
        x0, t = torch.randn_like(x1), cg.logit_normal(torch.randn(len(x1)), -0.8, 0.8)
        loss = cg.flow_loss(model, x1, x0, t, 0.05)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-20:]) / 20 < sum(losses[:20]) / 20 / 5, (losses[:5], losses[-5:])
    samples = cg.sample(model, torch.randn(8, 3, 16, 16), cg.time_grid(20))
    nearest = ((samples[:, None] - data[None]) ** 2).mean(dim=(2, 3, 4)).min(dim=1).values  # (8,)
    assert nearest.max() < 0.02, nearest  # the untrained model's samples (all 0) are at 0.36


def test_flops_per_image_matches_a_count_of_multiply_adds():
    """6 x forward multiply-adds, counted here by hooking every matmul of one forward pass."""
    model = small_dit()
    macs = 0

    def count(module, inputs, output):
        nonlocal macs
        macs += inputs[0].shape[:-1].numel() * module.weight.numel()

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    model(torch.randn(1, 3, 16, 16), torch.rand(1))
    for h in hooks:
        h.remove()
    tokens, dim = model.grid**2, 64
    macs += len(model.blocks) * 2 * tokens**2 * dim  # q.k and attn.v inside scaled_dot_product_attention
    assert cg.flops_per_image(model) == 6 * macs
    assert math.isclose(cg.flops_per_image(model), 6 * macs)


def test_cpu_attention_is_the_plain_kernel_up_to_64_tokens_and_pytorchs_default_above():
    """attention_kernels' rule: the math kernel is the faster on a CPU at 64 tokens, the default
    (flash) one at 256; GPUs always keep the default."""
    cpu = torch.device("cpu")
    assert not isinstance(cg.attention_kernels(cpu, 64), nullcontext)
    assert isinstance(cg.attention_kernels(cpu, 256), nullcontext)
    assert isinstance(cg.attention_kernels(torch.device("cuda"), 64), nullcontext)
