"""The world's UNet: SD1.5's layout at SD1.5's width on the outside, a 64-channel network inside.

ComfyUI detects an SD1.x checkpoint by its widths (320 channels, 768-wide context), and the pack's
block ids are SD1.5's (input 1,2,4,5,7,8 / middle 0 / output 3-11), so the world's checkpoint has
exactly that shape. Training that width on two cores is too slow, so a network of the same layout at
64 channels is trained and then embedded in the 320-channel one with zeros around it: small channel
``c`` sits at ``10 * (c // 2) + c % 2``, two channels in each of the 32 normalisation groups of ten.
The embedding is exact because the small network is trained as it will run inside the big one:

* group and layer norms divide by the big layer's channel count (the zero channels count in the mean
  and variance), so ``PaddedOps`` replaces ComfyUI's norms during training;
* the 8 attention heads are 8 wide instead of 40; the query weights are scaled by sqrt(40 / 8) at
  embedding so the softmax sees the same logits;
* the timestep's sinusoid of width 64 uses every fifth frequency of the width-320 one.

``embed`` does the placement; ``tests`` check that the big network's output equals the small one's.
"""
from __future__ import annotations

import math

import torch

from .init_weights import init_weights

SD15_LAYOUT = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
                   channel_mult=[1, 1, 1, 1], num_heads=8, num_head_channels=-1, use_spatial_transformer=True,
                   legacy=False, context_dim=768, use_linear_in_transformer=False, adm_in_channels=None,
                   transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                   transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1)
FULL = 320
SMALL = 64
RATIO = FULL // SMALL                       # 5: every group/layer norm is 5x wider in the big network
SMALL_LAYOUT = dict(SD15_LAYOUT, model_channels=SMALL)
PREFIX = "model.diffusion_model."           # the UNet's keys in an SD1.x checkpoint


def padded_group_norm(x, groups: int, weight, bias, eps: float, ratio: int = RATIO):
    """GroupNorm of ``x`` as if each group had ``ratio`` times its channels, the extra ones zero."""
    b, c = x.shape[:2]
    xg = x.reshape(b, groups, -1).float()
    n = xg.shape[-1] * ratio
    mean = xg.sum(-1, keepdim=True) / n
    var = xg.square().sum(-1, keepdim=True) / n - mean.square()
    y = ((xg - mean) * torch.rsqrt(var.clamp_min(0) + eps)).reshape(x.shape).to(x.dtype)
    shape = (1, c) + (1,) * (x.dim() - 2)
    return y * weight.reshape(shape) + bias.reshape(shape)


def padded_layer_norm(x, weight, bias, eps: float, ratio: int = RATIO):
    """LayerNorm over the last axis as if it were ``ratio`` times wider, the extra entries zero."""
    n = x.shape[-1] * ratio
    mean = x.sum(-1, keepdim=True) / n
    var = x.square().sum(-1, keepdim=True) / n - mean.square()
    return (x - mean) * torch.rsqrt(var.clamp_min(0) + eps) * weight + bias


def padded_ops():
    """ComfyUI's uninitialised layer classes with the two norms replaced (imports ComfyUI)."""
    import comfy.ops

    class PaddedOps(comfy.ops.disable_weight_init):
        class GroupNorm(comfy.ops.disable_weight_init.GroupNorm):
            def forward(self, x):
                return padded_group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

        class LayerNorm(comfy.ops.disable_weight_init.LayerNorm):
            def forward(self, x):
                return padded_layer_norm(x, self.weight, self.bias, self.eps)

    return PaddedOps


def build_small(seed: int):
    """The 64-channel training network (ComfyUI's UNetModel with padded norms), initialised from
    ``seed``: PyTorch's default scale for weights, zero for each residual branch's last layer and for
    the output convolution (so the untrained network is the identity on its skip paths)."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    unet = UNetModel(**SMALL_LAYOUT, operations=padded_ops())
    init_weights(unet, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if name.startswith("out.2.") or ".out_layers.3." in name or ".proj_out." in name:
                p.zero_()
    return unet


def _channel(c: torch.Tensor) -> torch.Tensor:
    return 10 * (c // 2) + c % 2


def _sinusoid(c: torch.Tensor) -> torch.Tensor:
    half = SMALL // 2
    return torch.where(c < half, RATIO * c, FULL // 2 + RATIO * (c - half))


def index_map(name: str, dim: int, size: int) -> tuple[torch.Tensor, int]:
    """Where the small tensor's entries along ``dim`` go in the big one, and the big size."""
    c = torch.arange(size)
    if name == "time_embed.0.weight" and dim == 1:
        return _sinusoid(c), FULL
    if size == SMALL:
        return _channel(c), FULL
    if size == 2 * SMALL:                               # an output block's input: [h, skip]
        return FULL * (c // SMALL) + _channel(c % SMALL), 2 * FULL
    if size == 4 * SMALL:                               # the time embedding, a feed-forward's inner width
        return c, 4 * FULL
    if size == 8 * SMALL:                               # GEGLU's [value, gate]
        return 4 * FULL * (c // (4 * SMALL)) + c % (4 * SMALL), 8 * FULL
    return c, size


def embed(small_sd: dict, dtype=torch.float16) -> dict:
    """The small network's state dict placed in SD1.5's 320-channel UNet (keys without a prefix)."""
    out = {}
    for name, t in small_sd.items():
        t = t.float()
        maps = [index_map(name, d, n) for d, n in enumerate(t.shape)]
        big = torch.zeros([m[1] for m in maps])
        idx = torch.meshgrid(*[m[0] for m in maps], indexing="ij") if t.dim() else ()
        if t.dim():
            big[idx] = t
        else:
            big = t.clone()
        if name.endswith(".to_q.weight"):
            big = big * math.sqrt(RATIO)
        out[name] = big.to(dtype)
    return out


# ---------------------------------------------------------------------------------------- training
def alphas_cumprod(steps: int = 1000, start: float = 0.00085, end: float = 0.012) -> torch.Tensor:
    """SD1.x's scaled-linear schedule (what ComfyUI's EPS model sampling uses for SD15)."""
    betas = torch.linspace(start ** 0.5, end ** 0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def diffusion_loss(unet, x0: torch.Tensor, context: torch.Tensor, gen: torch.Generator,
                   acp: torch.Tensor, snr_gamma: float = 5.0, low_freq: float = 0.0) -> torch.Tensor:
    """Noise-prediction loss at uniform timesteps, weighted by min(SNR, gamma) / SNR (Min-SNR), plus
    ``low_freq`` times the squared error of the implied clean latent averaged over 4x4 cells.

    The second term is there because the eps loss barely sees the image's low frequencies at high
    noise: at SD1.x's last timestep an error ``d`` in the predicted noise is an error ``14.6 d`` in the
    clean image, so a network that fits the noise well can still start every sample from the wrong
    background colour (the first world run did: a bias of -0.5 on latent channel 0 at t = 999, worse
    than predicting the data's mean). Both terms have the same minimiser (the posterior mean), so the
    extra weight changes what is learnt first, not what is learnt."""
    b = x0.shape[0]
    t = torch.randint(0, len(acp), (b,), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    a = acp[t].view(b, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    pred = unet(xt, t.float(), context=context)
    snr = a.view(b) / (1 - a.view(b))
    w = snr.clamp(max=snr_gamma) / snr
    loss = (w * (pred - eps).square().mean(dim=(1, 2, 3))).mean()
    if low_freq:
        err = torch.nn.functional.avg_pool2d((pred - eps) * ((1 - a) / a).sqrt(), x0.shape[-1] // 4)
        loss = loss + low_freq * err.square().mean()
    return loss
