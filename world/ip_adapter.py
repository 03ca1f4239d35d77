"""The world's IP-Adapter: an image encoder ComfyUI's CLIP Vision loader accepts, and an adapter trained
on the world as the IP-Adapter paper trains one, saved in the format MIP-Adapter Loader reads.

* **Image encoder (seeded, not trained).** ComfyUI's CLIP Vision loader recognises a file by its size
  (the smallest it accepts is ViT-L/14: 24 layers, 1024 wide, 304 M parameters), too big to train on two
  cores. Like the world's text encoder, its weights are drawn from a seed (``VISION_SEED``), one
  generator per tensor. A random ViT still tells the world's colours apart: on 24 renders of one object
  (3 per colour, random shape, pattern and place) the nearest neighbour of an image embedding has the same
  colour in 62% of cases (chance 12.5%), the same shape in 17% (chance). So the adapter can carry an
  object's colour; its shape comes from the prompt (``colour_separation``).
* **Adapter (trained).** The paper's recipe at the world's size. The UNet and the image encoder are
  frozen. The image projection (``ImageProjModel``: Linear 768 -> 4 x 768, LayerNorm; trained on
  standardised embeds, the standardisation folded into the Linear when saved) and, in each of
  the 16 cross-attention layers, the decoupled key and value projections ``to_k_ip`` and ``to_v_ip``
  (initialised from the layer's ``to_k``/``to_v``) are trained. The loss is the world's noise loss.
  The image prompt is the training image itself. The image, the caption, or both are dropped 5% of the
  time each. Captions name each object's colour and pattern less often than the UNet's own training did
  (``CAPTION_P``), so the image prompt is what tells them.
  It trains on the 64-channel network (``unet.build_small``) and is placed in the 320-channel layout as
  the UNet is: ``to_k_ip``/``to_v_ip`` rows on the channels ``unet.index_map`` gives.

``python tools/world.py train ipadapter`` trains it into ``world/weights/world_ip_adapter.safetensors``
(the small form); :func:`build` writes the ComfyUI file (``models/ipadapter``) and :func:`build_vision`
the encoder's (``models/clip_vision``).
"""
from __future__ import annotations

import time
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..attention.blocks import cross_attention_modules
from ..attention.image_proj import ImageProjModel
from ..attention.kernels import sdpa_attention
from ..files.atomic import atomic_save_safetensors
from . import checkpoint, data, text, unet, vae

VISION_SEED = 4321
VISION_CONFIG = "clip_vision_config_vitl.json"
ADAPTER_FILE = "world_ip_adapter.safetensors"              # the small form, in world/weights
ADAPTER_NAME = "personalize_world_ip_adapter.safetensors"  # the ComfyUI file, in models/ipadapter
VISION_NAME = "personalize_world_clip_vision.safetensors"  # in models/clip_vision
TOKENS = 4
CONTEXT = 768
EMBED = 768                                                # ViT-L/14's image_embeds
CAPTION_P = (0.3, 0.3)                                     # chance a caption names an object's colour, pattern
SCENES = 320                                               # training scenes (their embeds: ~2 s each on 2 cores)
STEPS = 1000
DROP = 0.05                                                # image, text and both each dropped this often


# ---------------------------------------------------------------------------------------- the encoder

def vision_state_dict(seed: int = VISION_SEED, dtype=torch.float32) -> dict:
    """The seeded ViT-L/14 vision tower under ComfyUI's CLIP vision key names (needs ComfyUI for the
    key list). The class embedding is drawn like the position embeddings, N(0, 0.02^2); the other
    tensors follow ``text.seeded_tensor``."""
    import comfy.clip_vision
    with torch.device("meta"):
        names = {k: tuple(v.shape) for k, v in
                 comfy.clip_vision.ClipVisionModel(_config_path()).model.state_dict().items()}
    out = {}
    for name, shape in names.items():
        if name.endswith("position_ids"):
            out[name] = torch.arange(shape[-1]).expand(shape).clone()
        elif name.endswith("class_embedding"):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            out[name] = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
        else:
            out[name] = text.seeded_tensor(name, shape, seed).to(dtype)
    return out


def _config_path() -> str:
    import comfy.clip_vision
    return str(Path(comfy.clip_vision.__file__).with_name(VISION_CONFIG))


def load_vision(seed: int = VISION_SEED):
    """The encoder as ComfyUI's CLIP Vision loader builds it from a file (``load_clipvision_from_sd``)."""
    import comfy.clip_vision
    enc = comfy.clip_vision.load_clipvision_from_sd(vision_state_dict(seed))
    if enc is None:
        raise RuntimeError("ComfyUI did not recognise the world's seeded ViT-L as a CLIP vision model")
    return enc


def build_vision(path: Path, seed: int = VISION_SEED) -> Path:
    """Write the seeded encoder as a file CLIPVisionLoader loads (fp16, about 0.6 GB); kept if present."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(path, vision_state_dict(seed, torch.float16),
                                metadata={"personalize.world": f"seeded ViT-L/14 vision tower, seed {seed}"})
    return path


@torch.no_grad()
def image_embeds(encoder, images: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """CLIP Vision Encode's ``image_embeds`` ``[N, 768]`` of images ``[N, H, W, 3]`` (centre crop)."""
    return torch.cat([encoder.encode_image(images[i:i + batch])["image_embeds"].float()
                      for i in range(0, len(images), batch)])


def colour_separation(encoder, per_colour: int = 2, seed: int = 0) -> dict:
    """How well the encoder's image embeds tell the world's colours (and shapes) apart: renders of one
    object (``per_colour`` per colour, random shape, pattern and place), leave-one-out nearest
    neighbour by cosine of the centred embeds; the share whose neighbour has the same colour / shape."""
    rng = np.random.default_rng([seed, 11])
    labels, images = [], []
    for colour in data.COLOURS:
        for _ in range(per_colour):
            shape, pattern = str(rng.choice(data.SHAPES)), str(rng.choice(data.PATTERNS))
            images.append(data.to_float(data.render(data.sample_scene(rng, attributes=[(colour, pattern, shape)]))[0]))
            labels.append((colour, shape))
    e = image_embeds(encoder, torch.from_numpy(np.stack(images)))
    e = torch.nn.functional.normalize(e - e.mean(0), dim=-1)
    sim = e @ e.T
    sim.fill_diagonal_(-2.0)
    near = sim.argmax(1).tolist()
    return {what: float(np.mean([labels[i][k] == labels[j][k] for i, j in enumerate(near)]))
            for k, what in enumerate(("colour", "shape"))}


# ---------------------------------------------------------------------------------------- the adapter

class SmallAdapter(nn.Module):
    """The trained parts at the 64-channel network's width: the image projection and, per
    cross-attention layer (IP-Adapter's order: input, output, middle blocks), ``to_k_ip``/``to_v_ip``."""

    def __init__(self, net):
        super().__init__()
        attn2 = cross_attention_modules(net)
        self.keys = sorted(attn2, key=lambda k: ({"input": 0, "output": 1, "middle": 2}[k[0]], k[1], k[2]))
        self.heads = {k: attn2[k].heads for k in self.keys}
        self.image_proj = ImageProjModel(EMBED, TOKENS, CONTEXT)
        # the projection reads standardised embeds (folded into its weights when saved, see
        # ``comfy_state_dict``): the seeded ViT's embeds share one large common vector and differ
        # between images by about a tenth of it, which a plain linear layer learns slowly
        self.register_buffer("embed_mean", torch.zeros(EMBED))
        self.register_buffer("embed_std", torch.ones(EMBED))
        self.to_k_ip = nn.ModuleList()
        self.to_v_ip = nn.ModuleList()
        for k in self.keys:
            for mine, theirs in ((self.to_k_ip, attn2[k].to_k), (self.to_v_ip, attn2[k].to_v)):
                lin = nn.Linear(theirs.weight.shape[1], theirs.weight.shape[0], bias=False)
                lin.weight.data.copy_(theirs.weight.detach().float())
                mine.append(lin)

    def standardise_on(self, embeds: torch.Tensor) -> None:
        """Set the embeds' mean and spread per dimension (of the training set)."""
        self.embed_mean.copy_(embeds.float().mean(0))
        self.embed_std.copy_(embeds.float().std(0).clamp_min(1e-6))

    def tokens(self, embeds: torch.Tensor) -> torch.Tensor:
        """Image-prompt tokens ``[B, TOKENS, 768]`` of raw CLIP image embeds ``[B, 768]``."""
        return self.image_proj((embeds - self.embed_mean) / self.embed_std)

    def replaces(self, tokens: torch.Tensor) -> dict:
        """``patches_replace`` for the small UNet: each layer's text attention plus the image prompt's,
        ``Attn(q, k, v) + Attn(q, K_ip, V_ip)``, with ``tokens`` ``[B, TOKENS, 768]``."""
        table = {}
        for n, key in enumerate(self.keys):
            table[key] = self._layer(n, self.heads[key], tokens)
        return {"attn2": table}

    def _layer(self, n: int, heads: int, tokens: torch.Tensor):
        def attn2(q, k, v, extra_options):
            ik, iv = self.to_k_ip[n](tokens), self.to_v_ip[n](tokens)
            return sdpa_attention(q, k, v, heads) + sdpa_attention(q, ik, iv, heads)
        return attn2

    def comfy_state_dict(self, dtype=torch.float16) -> dict:
        """The IP-Adapter file of the 320-channel model: ``image_proj.*`` and
        ``ip_adapter.{2n+1}.to_k_ip/to_v_ip.weight`` ``[320, 768]`` (rows on ``unet.index_map``'s channels)."""
        proj = self.image_proj.state_dict()
        w = proj["proj.weight"].float() / self.embed_std            # the standardisation folded in
        b = proj["proj.bias"].float() - w @ self.embed_mean
        proj = dict(proj, **{"proj.weight": w, "proj.bias": b})
        out = {f"image_proj.{k}": v.detach().to(dtype) for k, v in proj.items()}
        for n in range(len(self.keys)):
            for name, lin in (("to_k_ip", self.to_k_ip[n]), ("to_v_ip", self.to_v_ip[n])):
                w = lin.weight.detach().float()
                rows, size = unet.index_map("", 0, w.shape[0])
                big = torch.zeros(size, w.shape[1])
                big[rows] = w
                out[f"ip_adapter.{2 * n + 1}.{name}.weight"] = big.to(dtype)
        return out


def load_small(net, folder: Path = checkpoint.WEIGHTS) -> SmallAdapter:
    adapter = SmallAdapter(net)
    adapter.load_state_dict({k: v.float() for k, v in checkpoint.read_part(ADAPTER_FILE, folder).items()})
    return adapter


def small_unet(folder: Path = checkpoint.WEIGHTS):
    """The world's 64-channel UNet with the shipped weights, frozen."""
    net = unet.build_small(0)
    net.load_state_dict({k: v.float() for k, v in checkpoint.read_part(checkpoint.UNET_FILE, folder).items()})
    return net.eval().requires_grad_(False)


def build(path: Path, folder: Path = checkpoint.WEIGHTS) -> Path:
    """Write the ComfyUI IP-Adapter file of the committed small adapter (needs ComfyUI: the small UNet
    gives the layer order)."""
    adapter = load_small(small_unet(folder), folder)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(path, adapter.comfy_state_dict(),
                            metadata={"modelspec.title": "Personalize world IP-Adapter (SD1.x layout, ViT-L "
                                                         f"image embeds, seeded encoder {VISION_SEED})"})
    return path


# ---------------------------------------------------------------------------------------- training

def training_set(seed: int, n: int, encoder, folder: Path = checkpoint.WEIGHTS, log=print) -> dict:
    """``n`` one-object scenes (no held-out combination), their latents, captions (``CAPTION_P``) and
    the image embeddings of the scenes themselves."""
    rng = np.random.default_rng([seed, 7])
    scenes = [data.caption_scene(data.sample_scene(rng, n_things=1), rng, *CAPTION_P) for _ in range(n)]
    images = [data.render(s)[0] for s in scenes]
    tae = vae.load_state(checkpoint.read_part(checkpoint.VAE_FILE, folder))
    latents = torch.cat([vae.encode(tae, vae.images_tensor(images[i:i + 64])) for i in range(0, n, 64)])
    t0 = time.time()
    embeds = []
    for i in range(0, n, 16):
        embeds.append(image_embeds(encoder, torch.from_numpy(np.stack([data.to_float(x) for x in images[i:i + 16]]))))
        log(f"image embeds {i + len(embeds[-1])}/{n} ({time.time() - t0:.0f} s)")
    captions = [""] + [s.caption for s in scenes]
    z = text.encode_captions(text.load_clip(), captions)
    return {"latents": latents, "embeds": torch.cat(embeds), "z": z, "caption": torch.arange(1, n + 1),
            "things": [(t.colour, t.pattern, t.shape) for s in scenes for t in s.things]}


def train(dataset: dict, steps: int = STEPS, batch: int = 16, lr: float = 1e-3, seed: int = 0,
          folder: Path = checkpoint.WEIGHTS, log=print) -> tuple[SmallAdapter, list]:
    """Train the adapter on ``dataset`` (:func:`training_set`): AdamW, constant learning rate after
    50 warm-up steps, Min-SNR noise loss (``unet.diffusion_loss``)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = small_unet(folder)
    adapter = SmallAdapter(net)
    adapter.standardise_on(dataset["embeds"])
    opt = torch.optim.AdamW(adapter.parameters(), lr=lr, weight_decay=0.01)
    acp = unet.alphas_cumprod()
    zero_embed = torch.zeros(1, EMBED)
    hist, t0 = [], time.time()
    lat, emb, z, cap = dataset["latents"], dataset["embeds"], dataset["z"], dataset["caption"]
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 50)
        pick = torch.randint(0, len(lat), (batch,), generator=gen)
        r = torch.rand(batch, generator=gen)
        drop_image = (r < DROP) | (r >= 1 - DROP)            # image alone, or both
        drop_text = (r >= DROP) & (r < 2 * DROP) | (r >= 1 - DROP)
        e = torch.where(drop_image.unsqueeze(1), zero_embed, emb[pick])
        c = cap[pick].clone()
        c[drop_text] = 0
        tokens = adapter.tokens(e)
        opts = {"patches_replace": adapter.replaces(tokens)}
        model = lambda x, t, context: net(x, t, context=context, transformer_options=opts)
        loss = unet.diffusion_loss(model, lat[pick].float(), z[c].float(), gen, acp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(adapter.parameters(), 1.0)
        opt.step()
        hist.append(float(loss.detach()))
        if step % 25 == 0 or step == steps - 1:
            log(f"ip-adapter step {step} loss {np.mean(hist[-25:]):.4f} ({time.time() - t0:.0f} s)")
    return adapter, hist


def save_small(adapter: SmallAdapter, path: Path, meta: dict) -> None:
    atomic_save_safetensors(path, {k: v.detach().float().contiguous() if k.startswith("embed_") else
                                   v.detach().half().contiguous() for k, v in adapter.state_dict().items()},
                            metadata={k: str(v) for k, v in meta.items()})

