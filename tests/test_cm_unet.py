"""The ADM UNet: OpenAI ImageNet-64 key names/shapes, attention layout, basic forward behaviour."""

import math

import pytest
import torch

from cmboost.cm.unet import (IMAGENET64_CONFIG, AttentionBlock, UNetModel, attention_rates, count_parameters,
                             set_attention_impl, timestep_embedding)


def expected_adm_shapes(model_channels=192, channel_mult=(1, 2, 3, 4), num_res_blocks=3, attention_ds=(2, 4, 8),
                        num_classes=1000, in_channels=3, out_channels=3):
    """Names and shapes of an ADM UNet state_dict (scale-shift norm, res-block up/down, 2-D 1x1 qkv convs),
    written from the published architecture rules independently of cmboost.cm.unet."""
    emb = 4 * model_channels
    shapes = {}

    def linear(name, fan_in, fan_out):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (fan_out, fan_in), (fan_out,)

    def conv(name, fan_in, fan_out, k):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (fan_out, fan_in, k, k), (fan_out,)

    def norm(name, ch):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (ch,), (ch,)

    def resblock(name, cin, cout):
        norm(f"{name}.in_layers.0", cin)
        conv(f"{name}.in_layers.2", cin, cout, 3)
        linear(f"{name}.emb_layers.1", emb, 2 * cout)  # scale and shift
        norm(f"{name}.out_layers.0", cout)
        conv(f"{name}.out_layers.3", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.skip_connection", cin, cout, 1)

    def attention(name, ch):
        norm(f"{name}.norm", ch)
        conv(f"{name}.qkv", ch, 3 * ch, 1)
        conv(f"{name}.proj_out", ch, ch, 1)

    linear("time_embed.0", model_channels, emb)
    linear("time_embed.2", emb, emb)
    shapes["label_emb.weight"] = (num_classes, emb)
    conv("input_blocks.0.0", in_channels, model_channels, 3)
    skips, ch, ds, block = [model_channels], model_channels, 1, 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            resblock(f"input_blocks.{block}.0", ch, mult * model_channels)
            ch = mult * model_channels
            if ds in attention_ds:
                attention(f"input_blocks.{block}.1", ch)
            skips.append(ch)
            block += 1
        if level < len(channel_mult) - 1:
            resblock(f"input_blocks.{block}.0", ch, ch)  # down-sampling res block
            skips.append(ch)
            block, ds = block + 1, ds * 2
    resblock("middle_block.0", ch, ch)
    attention("middle_block.1", ch)
    resblock("middle_block.2", ch, ch)
    block = 0
    for level in reversed(range(len(channel_mult))):
        for i in range(num_res_blocks + 1):
            resblock(f"output_blocks.{block}.0", ch + skips.pop(), channel_mult[level] * model_channels)
            ch = channel_mult[level] * model_channels
            position = 1
            if ds in attention_ds:
                attention(f"output_blocks.{block}.1", ch)
                position = 2
            if level > 0 and i == num_res_blocks:
                resblock(f"output_blocks.{block}.{position}", ch, ch)  # up-sampling res block
                ds //= 2
            block += 1
    norm("out.0", ch)
    conv("out.2", model_channels, out_channels, 3)
    return shapes


def test_imagenet64_state_dict_matches_openai_layout():
    with torch.device("meta"):  # no memory, no init cost: only names and shapes
        model = UNetModel(**IMAGENET64_CONFIG)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = expected_adm_shapes()
    assert list(got) == list(expected)
    assert got == expected
    spot = {
        "input_blocks.0.0.weight": (192, 3, 3, 3),
        "label_emb.weight": (1000, 768),
        "time_embed.0.weight": (768, 192),
        "time_embed.2.weight": (768, 768),
        "out.0.weight": (192,),
        "out.2.weight": (3, 192, 3, 3),
        "input_blocks.1.0.emb_layers.1.weight": (384, 768),
        "input_blocks.4.0.in_layers.2.weight": (192, 192, 3, 3),   # down res block, 64 -> 32
        "input_blocks.5.0.skip_connection.weight": (384, 192, 1, 1),
        "input_blocks.5.1.qkv.weight": (1152, 384, 1, 1),           # first attention, at 32x32
        "input_blocks.5.1.proj_out.weight": (384, 384, 1, 1),
        "middle_block.1.qkv.weight": (2304, 768, 1, 1),
        "middle_block.1.qkv.bias": (2304,),
        "output_blocks.0.0.skip_connection.weight": (768, 1536, 1, 1),
        "output_blocks.3.2.in_layers.2.weight": (768, 768, 3, 3),   # up res block after attention
        "output_blocks.15.0.skip_connection.weight": (192, 384, 1, 1),
    }
    for key, shape in spot.items():
        assert got[key] == shape, key
    assert len(got) == 541
    assert 295_000_000 < count_parameters(model) < 297_000_000  # ~295.9M, as the released files


def test_attention_rates_from_resolutions():
    assert attention_rates((32, 16, 8), 64) == (2, 4, 8)
    assert attention_rates((8,), 32) == (4,)


def _hand_attention(block, x):
    """GN, 1x1 conv, then per head softmax(q^T k / sqrt(d)) v with q, k, v the first, second and third
    thirds of the qkv channels and heads consecutive channel groups inside each third."""
    b, c, h, w = x.shape
    heads, d = block.num_heads, c // block.num_heads
    normed = torch.nn.functional.group_norm(x, block.norm.num_groups, block.norm.weight, block.norm.bias, block.norm.eps)
    flat = normed.reshape(b, c, h * w)
    weight = block.qkv.weight.reshape(3 * c, c)
    qkv = torch.einsum("oc,bcl->bol", weight, flat) + block.qkv.bias[None, :, None]
    out = torch.zeros(b, c, h * w, dtype=torch.float64)
    for n in range(b):
        for head in range(heads):
            q = qkv[n, head * d:(head + 1) * d].double()
            k = qkv[n, c + head * d:c + (head + 1) * d].double()
            v = qkv[n, 2 * c + head * d:2 * c + (head + 1) * d].double()
            logits = q.T @ k / math.sqrt(d)                     # [queries, keys]
            attn = torch.softmax(logits, dim=1)
            out[n, head * d:(head + 1) * d] = v @ attn.T
    proj = torch.einsum("oc,bcl->bol", block.proj_out.weight.reshape(c, c).double(), out) \
        + block.proj_out.bias.double()[None, :, None]
    return x.double() + proj.reshape(b, c, h, w)


@pytest.mark.parametrize("impl", ["sdpa", "reference"])
def test_attention_equals_hand_computation(impl):
    torch.manual_seed(0)
    block = AttentionBlock(16, num_head_channels=4, attention_impl=impl)  # 4 heads of 4 channels
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    x = torch.randn(2, 16, 3, 5)
    torch.testing.assert_close(block(x).double(), _hand_attention(block, x), atol=1e-5, rtol=1e-5)


def test_attention_layout_is_three_heads_dim():
    """Swapping two heads' q channels must change the output (the layout matters), and the result must
    not equal the (heads, three, dim) reading of the same weights."""
    torch.manual_seed(1)
    block = AttentionBlock(8, num_head_channels=4)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p))
    x = torch.randn(1, 8, 4, 4)
    c, d = 8, 4
    perm = torch.cat([torch.arange(h * 3 * d + t * d, h * 3 * d + (t + 1) * d) for t in range(3) for h in range(2)])
    # perm maps (three, heads, dim) channel order to where a (heads, three, dim) layout keeps them
    other = AttentionBlock(8, num_head_channels=4)
    other.load_state_dict(block.state_dict())
    with torch.no_grad():
        other.qkv.weight.copy_(block.qkv.weight[perm])
        other.qkv.bias.copy_(block.qkv.bias[perm])
    assert not torch.allclose(block(x), other(x), atol=1e-4)


def test_timestep_embedding_cos_then_sin():
    t = torch.tensor([0.0, 3.0])
    emb = timestep_embedding(t, 6)
    freqs = torch.tensor([1.0, 10000 ** (-1 / 3), 10000 ** (-2 / 3)])
    torch.testing.assert_close(emb[1], torch.cat([torch.cos(3 * freqs), torch.sin(3 * freqs)]))
    assert emb.shape == (2, 6) and timestep_embedding(t, 7).shape == (2, 7)


def _tiny(**overrides):
    cfg = dict(image_size=16, in_channels=1, model_channels=16, out_channels=1, num_res_blocks=1,
               attention_resolutions=(2,), channel_mult=(1, 2), num_classes=5, num_head_channels=8,
               use_scale_shift_norm=True, resblock_updown=True)
    cfg.update(overrides)
    return UNetModel(**cfg)


def test_small_unet_forward_and_impls_agree():
    torch.manual_seed(0)
    net = _tiny().eval()
    with torch.no_grad():
        for p in net.parameters():  # the zero-initialised output convs would hide everything
            p.add_(torch.randn_like(p) * 0.05)
    x, t, y = torch.randn(3, 1, 16, 16), torch.tensor([1.0, 50.0, -300.0]), torch.tensor([0, 4, 2])
    out = net(x, t, y)
    assert out.shape == x.shape
    ref = set_attention_impl(net, "reference")(x, t, y)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(out, net(x, t, torch.tensor([1, 4, 2])))  # labels are used
    with pytest.raises(ValueError):
        net(x, t)  # class-conditional model without labels


def test_zero_init_output_and_plain_resample_variant():
    net = _tiny(resblock_updown=False, use_scale_shift_norm=False)
    assert "input_blocks.2.0.op.weight" in net.state_dict()      # strided conv down
    assert "output_blocks.1.2.conv.weight" in net.state_dict()   # conv after nearest up (after attention)
    out = net(torch.randn(2, 1, 16, 16), torch.zeros(2), torch.tensor([0, 1]))
    assert torch.count_nonzero(out) == 0  # the out conv starts at zero


def test_bf16_autocast_runs_on_cpu():
    net = _tiny().eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.randn(2, 1, 16, 16), torch.ones(2), torch.tensor([0, 1]))
    assert out.shape == (2, 1, 16, 16) and torch.isfinite(out.float()).all()
