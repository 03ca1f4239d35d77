"""training/lora.py: the LoRA wrapper against an independent computation, injection into a module
tree named like ComfyUI's UNet (``CrossAttention`` with ``to_q/to_k/to_v/to_out.0`` in ``attn1`` and
``attn2``), enable/disable, and the kohya/ComfyUI file keys. Pure torch (ComfyUI's own loader is
checked in integration/test_training_lora.py)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from personalize_pack.training.lora import (LoRALinear, inject_lora, lora_key, lora_parameters, lora_state_dict,
                                            load_lora_state, remove_lora, set_lora_enabled)

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
D, CTX, HEADS = 16, 12, 2


# ----------------------------------------------------------------------------- a ComfyUI-shaped tree

class OpsLinear(nn.Linear):
    """Like ``comfy.ops.disable_weight_init.Linear``: a subclass of nn.Linear."""


class CrossAttention(nn.Module):
    def __init__(self, context_dim=None):
        super().__init__()
        self.to_q = OpsLinear(D, D, bias=False)
        self.to_k = nn.Linear(context_dim or D, D, bias=False)
        self.to_v = nn.Linear(context_dim or D, D, bias=False)
        self.to_out = nn.Sequential(nn.Linear(D, D), nn.Dropout(0.0))

    def forward(self, x, context=None):
        c = x if context is None else context
        q, k, v = (t.unflatten(-1, (HEADS, -1)).transpose(1, 2) for t in (self.to_q(x), self.to_k(c), self.to_v(c)))
        return self.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn1 = CrossAttention()
        self.ff = FeedForward()
        self.attn2 = CrossAttention(CTX)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(D), nn.LayerNorm(D), nn.LayerNorm(D)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(self, depth=1):
        super().__init__()
        self.proj_in = nn.Linear(D, D)
        self.transformer_blocks = nn.ModuleList(BasicTransformerBlock() for _ in range(depth))
        self.proj_out = nn.Linear(D, D)

    def forward(self, x, context):
        h = self.proj_in(x)
        for blk in self.transformer_blocks:
            h = blk(h, context)
        return x + self.proj_out(h)


class ResBlock(nn.Module):
    """Decoys: a Linear called ``my_to_q`` (no dot boundary) and a Conv called ``to_k``."""

    def __init__(self):
        super().__init__()
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(D, D))
        self.my_to_q = nn.Linear(D, D)
        self.to_k = nn.Conv1d(D, D, 1)

    def forward(self, x, context):
        return x + self.emb_layers(x) + self.my_to_q(x) + self.to_k(x.transpose(1, 2)).transpose(1, 2)


class Seq(nn.ModuleList):
    """ComfyUI's TimestepEmbedSequential (children addressed by index)."""

    def forward(self, x, context):
        for layer in self:
            x = layer(x, context) if isinstance(layer, (ResBlock, SpatialTransformer)) else layer(x)
        return x


class StandinComfyUNet(nn.Module):
    """Module paths like ComfyUI's ``UNetModel``: ``input_blocks.1.1.transformer_blocks.0.attn1.to_q``,
    ``middle_block.1.transformer_blocks.1.attn2.to_out.0``, ``output_blocks.2.1....``."""

    def __init__(self):
        super().__init__()
        self.time_embed = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, D))
        self.input_blocks = nn.ModuleList([Seq([nn.Linear(D, D)]), Seq([ResBlock(), SpatialTransformer()]),
                                           Seq([ResBlock(), SpatialTransformer()]), Seq([ResBlock()])])
        self.middle_block = Seq([ResBlock(), SpatialTransformer(depth=2), ResBlock()])
        self.output_blocks = nn.ModuleList([Seq([ResBlock()]), Seq([ResBlock(), SpatialTransformer()]),
                                            Seq([ResBlock(), SpatialTransformer(), nn.Linear(D, D)])])
        self.out = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, D))

    def forward(self, x, context):
        h = x + self.time_embed(x)
        for blk in [*self.input_blocks, self.middle_block, *self.output_blocks]:
            h = blk(h, context)
        return self.out(h)


def make_unet(seed=0):
    torch.manual_seed(seed)
    net = StandinComfyUNet()
    with torch.no_grad():      # non-trivial norms and biases
        for name, p in net.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return net.eval()


def attention_projections(root):
    """The expected targets, found by class (not by name)."""
    return {f"{p}.{t}" for p, m in root.named_modules() if isinstance(m, CrossAttention) for t in TARGETS}


def inputs(seed=1, b=2, n=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, D, generator=g), torch.randn(b, 7, CTX, generator=g)


def randomize_up(loras, seed=7, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in loras.values():
            m.up.copy_(torch.randn(m.up.shape, generator=g) * std)


# ----------------------------------------------------------------------------- LoRALinear

def test_forward_and_merged_weight_match_an_independent_computation():
    g = torch.Generator().manual_seed(0)
    base = nn.Linear(7, 5)
    with torch.no_grad():
        base.weight.copy_(torch.randn(5, 7, generator=g))
        base.bias.copy_(torch.randn(5, generator=g))
    lora = LoRALinear(base, rank=3, alpha=6.0, generator=g)
    with torch.no_grad():
        lora.up.copy_(torch.randn(5, 3, generator=g))
    x = torch.randn(4, 2, 7, generator=g)
    W, b = base.weight.double(), base.bias.double()
    merged = W + (6.0 / 3) * lora.up.double() @ lora.down.double()
    expected = x.double() @ merged.T + b
    assert lora.scale == 2.0 and lora.rank == 3 and lora.alpha == 6.0
    torch.testing.assert_close(lora(x).double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lora.merged_weight().double(), merged, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lora(x), F.linear(x, lora.merged_weight(), base.bias), atol=1e-5, rtol=1e-5)
    # the LoRA branch alone
    torch.testing.assert_close(lora.delta(x).double(), 2.0 * x.double() @ lora.down.double().T @ lora.up.double().T,
                               atol=1e-5, rtol=1e-5)


def test_init_is_gaussian_down_zero_up_and_leaves_the_output_unchanged():
    base = nn.Linear(1024, 64)
    lora = LoRALinear(base, rank=4, generator=torch.Generator().manual_seed(3))
    assert lora.down.shape == (4, 1024) and lora.up.shape == (64, 4)
    assert lora.down.dtype == torch.float32 and lora.up.dtype == torch.float32
    assert torch.count_nonzero(lora.up) == 0
    # 4096 normal draws with std 1/rank = 0.25: the sample std within 5 % and the mean within 5 sigma
    down = lora.down.detach()
    assert abs(float(down.std()) - 0.25) < 0.0125
    assert abs(float(down.mean())) < 5 * 0.25 / 64
    assert lora.alpha == 4.0 and lora.scale == 1.0                     # alpha defaults to rank
    x = torch.randn(3, 1024)
    assert torch.equal(lora(x), base(x))
    assert torch.equal(lora.merged_weight(), base.weight)


def test_disabled_is_exactly_the_base_and_the_context_manager_restores():
    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    lora = LoRALinear(base, rank=2)
    with torch.no_grad():
        lora.up.normal_()
    x = torch.randn(5, 8)
    on = lora(x)
    assert not torch.equal(on, base(x))
    set_lora_enabled([lora], False)
    assert torch.equal(lora(x), base(x)) and not lora.enabled
    set_lora_enabled([lora], True)
    assert torch.equal(lora(x), on)
    with set_lora_enabled({"a": lora}, False) as ctx:
        assert torch.equal(lora(x), base(x))
        with set_lora_enabled({"a": lora}, True):
            assert torch.equal(lora(x), on)
        assert not lora.enabled
    assert ctx is not None and lora.enabled and torch.equal(lora(x), on)
    # restores also when the body raises
    with pytest.raises(RuntimeError):
        with set_lora_enabled([lora], False):
            raise RuntimeError("boom")
    assert lora.enabled


def test_dtypes_and_gradients():
    torch.manual_seed(0)
    base = nn.Linear(8, 6).to(torch.bfloat16)
    lora = LoRALinear(base, rank=2)
    assert lora.down.dtype == torch.float32 and not base.weight.requires_grad
    with torch.no_grad():
        lora.up.normal_()
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    y = lora(x)
    assert y.dtype == torch.bfloat16
    ref = base(x).float() + (x.float() @ lora.down.T @ lora.up.T) * lora.scale
    torch.testing.assert_close(y.float(), ref, atol=3e-2, rtol=2e-2)
    y.float().sum().backward()
    assert base.weight.grad is None and lora.down.grad is not None and lora.up.grad is not None
    # the gradient of sum(scale * up @ down @ x) with respect to up: scale * sum_b (down x_b)^T
    expect_up = lora.scale * (x.float() @ lora.down.detach().T).sum(0).expand(6, -1)
    torch.testing.assert_close(lora.up.grad, expect_up, atol=1e-4, rtol=1e-4)
    wide = LoRALinear(nn.Linear(8, 6).double(), rank=2, dtype=torch.float64)
    assert wide.down.dtype == torch.float64 and wide(torch.randn(2, 8, dtype=torch.float64)).dtype == torch.float64


def test_bad_arguments():
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALinear(nn.Conv1d(3, 3, 1))
    for r in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="rank"):
            LoRALinear(nn.Linear(3, 3), rank=r)
    for a in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="alpha"):
            LoRALinear(nn.Linear(3, 3), rank=2, alpha=a)


# ----------------------------------------------------------------------------- injection

def test_inject_finds_exactly_the_attention_projections():
    net = make_unet()
    expected = attention_projections(net)
    assert len(expected) == 6 * 2 * 4           # 6 transformer blocks, attn1 + attn2, 4 projections
    loras = inject_lora(net, rank=4)
    assert set(loras) == expected
    assert "input_blocks.1.1.transformer_blocks.0.attn1.to_q" in loras
    assert "middle_block.1.transformer_blocks.1.attn2.to_out.0" in loras
    for path, m in loras.items():
        assert net.get_submodule(path) is m and isinstance(m, LoRALinear)
    # decoys stay: no dot boundary, not a Linear, the Dropout after to_out.0
    assert type(net.get_submodule("input_blocks.1.0.my_to_q")) is nn.Linear
    assert type(net.get_submodule("input_blocks.1.0.to_k")) is nn.Conv1d
    assert type(net.get_submodule("input_blocks.1.1.transformer_blocks.0.attn1.to_out.1")) is nn.Dropout
    # the comfy-ops-like subclass is wrapped, with its own class kept as the base
    assert type(loras["input_blocks.1.1.transformer_blocks.0.attn1.to_q"].base) is OpsLinear
    assert lora_parameters(loras) == [p for m in loras.values() for p in (m.down, m.up)]


def test_inject_keeps_the_output_then_lora_equals_merged_weights_and_remove_restores():
    net = make_unet()
    ref_net = copy.deepcopy(net)
    x, c = inputs()
    before = net(x, c)
    originals = {p: net.get_submodule(p) for p in attention_projections(net)}
    state = {k: v.clone() for k, v in net.state_dict().items()}
    flags = {k: p.requires_grad for k, p in net.named_parameters()}
    loras = inject_lora(net, rank=4, alpha=2.0, seed=5)
    assert torch.equal(net(x, c), before)                         # up = 0: exactly the base model
    randomize_up(loras)
    on = net(x, c)
    assert (on - before).abs().max() > 1e-3
    with set_lora_enabled(loras, False):
        assert torch.equal(net(x, c), before)                     # DCO's reference pass: exactly the base
    # independent: the untouched copy with W + alpha/rank * up @ down in every projection (float64)
    with torch.no_grad():
        for path, m in loras.items():
            lin = ref_net.get_submodule(path)
            lin.weight.copy_((lin.weight.double() + 0.5 * m.up.double() @ m.down.double()).float())
            assert torch.allclose(m.merged_weight(), lin.weight, atol=1e-6)
    torch.testing.assert_close(on, ref_net(x, c), atol=2e-5, rtol=1e-5)
    assert remove_lora(net) == len(loras)
    for p, lin in originals.items():
        assert net.get_submodule(p) is lin
    assert list(net.state_dict()) == list(state) and all(torch.equal(net.state_dict()[k], v) for k, v in state.items())
    assert {k: p.requires_grad for k, p in net.named_parameters()} == flags
    assert torch.equal(net(x, c), before)
    assert remove_lora(net) == 0


def test_injection_is_deterministic_per_seed_and_per_module():
    a = inject_lora(make_unet(), rank=4, seed=11)
    b = inject_lora(make_unet(), rank=4, seed=11)
    c = inject_lora(make_unet(), rank=4, seed=12)
    assert all(torch.equal(a[k].down, b[k].down) for k in a)
    assert all(not torch.equal(a[k].down, c[k].down) for k in a)
    assert not torch.equal(a["input_blocks.1.1.transformer_blocks.0.attn1.to_q"].down,
                           a["input_blocks.1.1.transformer_blocks.0.attn2.to_q"].down)
    # a filter leaves the other modules' initial values alone (each module seeded by its own path)
    only2 = inject_lora(make_unet(), rank=4, seed=11, filter=lambda path, m: ".attn2." in path)
    assert set(only2) == {k for k in a if ".attn2." in k}
    assert all(torch.equal(only2[k].down, a[k].down) for k in only2)


def test_target_names_alpha_and_errors():
    net = make_unet()
    loras = inject_lora(net, target_names="proj_in", rank=2, alpha=1.0)
    assert set(loras) == {p for p, m in make_unet().named_modules() if p.endswith(".proj_in")}
    assert all(m.scale == 0.5 for m in loras.values())
    with pytest.raises(ValueError, match="already has"):
        inject_lora(net)
    remove_lora(net)
    with pytest.raises(ValueError, match="no nn.Linear"):
        inject_lora(net, target_names=("to_nothing",))
    with pytest.raises(ValueError, match="after the filter"):
        inject_lora(net, filter=lambda p, m: False)
    with pytest.raises(ValueError, match="target_names"):
        inject_lora(net, target_names=())


# ----------------------------------------------------------------------------- the file

def test_state_dict_keys_values_and_roundtrip(tmp_path):
    net = make_unet()
    loras = inject_lora(net, rank=4, alpha=3.0)
    randomize_up(loras)
    sd = lora_state_dict(loras)
    expected = set()
    for path in attention_projections(make_unet()):
        name = "lora_unet_" + path.replace(".", "_")
        expected |= {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"}
    assert set(sd) == expected
    name = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    m = loras["input_blocks.1.1.transformer_blocks.0.attn1.to_q"]
    assert torch.equal(sd[f"{name}.lora_down.weight"], m.down) and torch.equal(sd[f"{name}.lora_up.weight"], m.up)
    assert sd[f"{name}.lora_down.weight"].shape == (4, D) and sd[f"{name}.lora_up.weight"].shape == (D, 4)
    assert sd[f"{name}.alpha"].dim() == 0 and sd[f"{name}.alpha"].dtype == torch.float32 and float(sd[f"{name}.alpha"]) == 3.0
    assert "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_out_0.lora_up.weight" in sd
    # copies on the CPU: later training steps do not change a saved dict
    keep = m.down.detach().clone()
    with torch.no_grad():
        m.down.add_(1.0)
    assert not torch.equal(sd[f"{name}.lora_down.weight"], m.down)
    with torch.no_grad():
        m.down.copy_(keep)
    assert lora_state_dict(loras, dtype=torch.float16)[f"{name}.lora_up.weight"].dtype == torch.float16

    path = tmp_path / "lora.safetensors"
    save_file(sd, str(path))
    other = make_unet()
    loaded = inject_lora(other, rank=4, alpha=3.0, seed=99)
    assert load_lora_state(loaded, load_file(str(path))) == len(loras)
    assert all(torch.equal(loaded[k].down, loras[k].down) and torch.equal(loaded[k].up, loras[k].up) for k in loras)
    x, c = inputs()
    assert torch.equal(other(x, c), net(x, c))


def test_keys_relative_to_comfy_base_model_and_custom_prefix():
    assert lora_key("diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_out.0") == \
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_out_0"
    assert lora_key("output_blocks.3.1.transformer_blocks.0.attn1.to_v", "x_") == \
        "x_output_blocks_3_1_transformer_blocks_0_attn1_to_v"

    class Wrapper(nn.Module):                     # like comfy's BaseModel holding diffusion_model
        def __init__(self):
            super().__init__()
            self.diffusion_model = make_unet()
    w = Wrapper()
    loras = inject_lora(w, rank=2)
    assert all(k.startswith("diffusion_model.") for k in loras)
    direct = lora_state_dict(inject_lora(make_unet(), rank=2))
    assert set(lora_state_dict(loras)) == set(direct)


def test_load_lora_state_errors():
    loras = inject_lora(make_unet(), rank=4)
    sd = lora_state_dict(loras)
    name = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    missing = {k: v for k, v in sd.items() if not k.startswith(name + ".")}
    with pytest.raises(ValueError, match="lacks 1 of"):
        load_lora_state(loras, missing)
    assert load_lora_state(loras, missing, strict=False) == len(loras) - 1
    with pytest.raises(ValueError, match="does not use"):
        load_lora_state(loras, dict(sd, **{"lora_unet_somewhere_else.lora_up.weight": torch.zeros(1)}))
    with pytest.raises(ValueError, match="another rank"):
        load_lora_state(loras, lora_state_dict(inject_lora(make_unet(), rank=2)))
    with pytest.raises(ValueError, match="alpha"):
        load_lora_state(loras, dict(sd, **{f"{name}.alpha": torch.tensor(8.0)}))
    with pytest.raises(TypeError):
        lora_state_dict(list(loras.values()))
