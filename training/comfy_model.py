"""The training child's model side: ComfyUI's own diffusion model and VAE rebuilt from the job folder,
the denoising loss, and the Seg-Mix LoRA job (``training/jobs.py``'s ``Job`` interface). ComfyUI is
imported lazily, inside the child (``comfyui_path`` of job.json), with its CPU / attention settings.

The job folder's format, its writer and its reader are ``training/job_folder.py``.

The loss is the model family's own training target written once for all of them: with ``x_t =
noise_scaling(σ, ε, x_0)`` and the model's denoised estimate ``x̂_0 = apply_model(x_t, σ)``, the
prediction ``(x_t − x̂_0)/σ`` against ``(x_t − x_0)/σ`` is ε-prediction's ``ε̂`` vs ``ε`` for ε models
(MuDI's and Infusion's MSE) and the velocity ``v̂`` vs ``ε − x_0`` for flow models. Timesteps are
uniform over the model's discrete schedule (diffusers' ``randint(0, 1000)``), or uniform in [0, 1]
for continuous schedules.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file
from torch.utils.checkpoint import checkpoint

from ..attention.infusion import concept_positions, infuse_kv
from .infusion import InfusionOffsets, save_offsets
from .job_folder import load_diffusion_model, load_vae, read_data
from .jobs import Job, JobContext
from .lora import inject_lora, lora_parameters, lora_state_dict, set_lora_enabled
from .losses import dco_per_sample, mask_to_latent, masked_mse, soft_mask
from .segmix import SegMixSampler

_COMFY_READY = False


def init_comfy(comfyui_path: str | None, device: torch.device) -> None:
    """Import ComfyUI from ``comfyui_path`` once in this process, on the CPU when the job runs there,
    with PyTorch's SDPA attention (deterministic on the CPU)."""
    global _COMFY_READY
    if _COMFY_READY:
        return
    if comfyui_path:
        root = str(Path(comfyui_path).resolve())
        if root not in sys.path:
            sys.path.insert(0, root)
    try:
        from comfy.cli_args import args
    except ImportError as exc:
        raise RuntimeError(f"the training child cannot import ComfyUI (comfyui_path {comfyui_path!r}): {exc}") from exc
    if "comfy.model_management" not in sys.modules:
        args.cpu = device.type == "cpu"
        args.use_pytorch_cross_attention = True
    import comfy.model_management
    import comfy.sd  # noqa: F401
    _COMFY_READY = True


def conditioning(model, cond: torch.Tensor, pooled: torch.Tensor | None, size: tuple, device) -> dict:
    """The model's inputs for one CLIP encoding (``c_crossattn`` and, for SDXL-like models, ``y``), as
    the sampler builds them (``extra_conds``) for an image of ``size`` (h, w) pixels."""
    h, w = size
    kwargs = {"cross_attn": cond.to(device), "device": device, "width": w, "height": h, "target_width": w,
              "target_height": h, "crop_w": 0, "crop_h": 0}
    if pooled is not None:
        kwargs["pooled_output"] = pooled.to(device)
    out = {}
    for name, c in model.extra_conds(**kwargs).items():
        if name in ("c_crossattn", "y"):
            out[name] = c.cond
    return out


def draw_sigmas(model_sampling, n: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` noise levels: a uniform discrete timestep of the model's schedule (0..T-1), or a uniform
    fraction of a continuous one; drawn from ``generator`` or torch's global generator (saved in
    checkpoints)."""
    sigmas = getattr(model_sampling, "sigmas", None)
    if sigmas is not None and sigmas.numel() > 1:
        idx = torch.randint(0, sigmas.numel(), (n,), generator=generator)
        return sigmas.float().cpu()[idx].to(device)
    u = torch.rand(n, generator=generator)
    return torch.stack([torch.as_tensor(model_sampling.percent_to_sigma(float(p))) for p in u]).float().to(device)


def denoising_prediction(model, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, conds: dict,
                         transformer_options: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prediction, target)`` of the module docstring for clean latents ``x0`` (model space)."""
    ms = model.model_sampling
    s = sigma.view(-1, *([1] * (x0.dim() - 1)))
    xt = ms.noise_scaling(s, noise, x0)
    denoised = model.apply_model(xt, sigma, transformer_options=dict(transformer_options or {}), **conds)
    return (xt - denoised.float()) / s, (xt - x0) / s


class ComfyJob(Job):
    """Shared set-up of the ComfyUI-model jobs: ComfyUI, the diffusion model, the VAE, the data."""

    REQUIRED_KEYS = ("resolution",)
    VOLATILE_KEYS = ("validation_steps", "validation_cfg", "gradient_checkpointing")

    def setup(self, ctx: JobContext) -> None:
        super().setup(ctx)
        c = self.config
        init_comfy(c.get("comfyui_path"), ctx.device)
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
            c.get("training_dtype", "float32")]
        self.mp = load_diffusion_model(self.job_dir, ctx.device, self.dtype, c.get("model_file"))
        self.model = self.mp.model
        self.data, self.meta = read_data(self.job_dir)
        self.size = int(c["resolution"])
        self._conds: dict[int, dict] = {}
        self.vae = load_vae(self.job_dir, ctx.device)
        if c.get("gradient_checkpointing"):
            enable_gradient_checkpointing(self.model.diffusion_model)

    def caption_conds(self, i: int) -> dict:
        if i not in self._conds:
            pooled = self.data.get(f"pooled.{i}")
            self._conds[i] = conditioning(self.model, self.data[f"cond.{i}"], pooled, (self.size, self.size),
                                          self.ctx.device)
        return self._conds[i]

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B, H, W, 3]`` 0..1 → the model's latent space (the VAE's mean, ``process_latent_in``)."""
        with torch.no_grad():
            latent = self.vae.encode(image[..., :3])
        return self.model.process_latent_in(latent.to(self.ctx.device).float())

    def close(self) -> None:
        self.mp = self.model = self.vae = None


def enable_gradient_checkpointing(diffusion_model) -> int:
    """Recompute every transformer block in the backward pass instead of keeping its activations."""
    n = 0
    for module in diffusion_model.modules():
        if type(module).__name__ in ("BasicTransformerBlock",) and not getattr(module, "_personalize_ckpt", False):
            forward = module.forward

            def wrapped(*args, _f=forward, **kwargs):
                if torch.is_grad_enabled():
                    return checkpoint(_f, *args, use_reentrant=False, **kwargs)
                return _f(*args, **kwargs)
            module.forward = wrapped
            module._personalize_ckpt = True
            n += 1
    return n


class LoRAJob(ComfyJob):
    """MuDI's Seg-Mix LoRA (docs/algorithms.md §5.2): LoRA on every attention projection, Seg-Mix
    samples, the masked ε-MSE, and DCO against the model with its LoRA switched off (or plain MSE)."""

    REQUIRED_KEYS = ComfyJob.REQUIRED_KEYS + ("rank",)

    def setup(self, ctx: JobContext) -> None:
        super().setup(ctx)
        c = self.config
        self.rank = int(c["rank"])
        self.loras = inject_lora(self.model.diffusion_model, rank=self.rank, alpha=float(c.get("alpha") or self.rank),
                                 seed=int(c["seed"]))
        for m in self.loras.values():
            m.to(ctx.device)
        self.params = lora_parameters(self.loras)
        subjects: dict = {}
        for k, item in enumerate(self.meta["images"]):
            subjects.setdefault(item["identifier"], []).append(
                (self.data[f"image.{k}"], self.data[f"mask.{k}"], item["caption"]))
        self.sampler = SegMixSampler(subjects, self.meta["phrases"], float(c.get("segmix_prob", 0.3)),
                                     int(c.get("segmix_start_step", 0)), self.size, float(c.get("scale_min", 0.75)),
                                     float(c.get("scale_max", 1.0)))
        self.caption_index = {t: i for i, t in enumerate(self.meta["captions"])}
        self.batch = int(c.get("batch_size", 1))
        self.loss_kind = c.get("loss", "dco")
        self.beta = float(c.get("dco_beta", 1000.0))
        self.soft_alpha = float(c.get("soft_alpha", 1.0))
        self._plain_latents: dict = {}

    def parameters(self) -> list[torch.Tensor]:
        return self.params

    def sample_latents(self, step: int, micro: int = 0):
        """The global batch of micro-batch ``micro`` of step ``step``: latents, latent-size loss masks,
        caption indices. Seg-Mix switches on by the optimizer step (MuDI's ``global_step``)."""
        seed = int(self.config["seed"])
        xs, ms, caps = [], [], []
        for b in range(self.batch):
            d = self.sampler.draw(seed, step, slot=micro * self.batch + b)
            s = d.sample
            if not s.is_segmix and d.anchor in self._plain_latents:
                x = self._plain_latents[d.anchor]
            else:
                x = self.encode(s.image[None])
                if not s.is_segmix:
                    self._plain_latents[d.anchor] = x
            xs.append(x)
            m = mask_to_latent(s.mask.to(self.ctx.device), x.shape[-2], x.shape[-1])
            ms.append(soft_mask(m, self.soft_alpha))
            caps.append(self.caption_index[s.caption])
        return torch.cat(xs), torch.stack([m.reshape(1, *x.shape[-2:]) for m in ms]), caps

    def loss(self, step: int, micro: int = 0) -> torch.Tensor:
        """The batch mean of the per-sample loss: the masked ε-MSE, or DCO taken on each sample's
        own MSE against its own reference MSE (MuDI trains batch 1 x accumulation 2, so each DCO
        term sees one sample; on a batch mean one sample's gain could hide another's loss).
        ``fixed_batch`` (tests, the overfit check): every step sees step 0's images, noise and noise
        levels."""
        fixed = bool(self.config.get("fixed_batch"))
        x0, mask, caps = self.sample_latents(0 if fixed else step, micro)
        g = torch.Generator().manual_seed(int(self.config["seed"]) + micro) if fixed else None
        noise = torch.randn(x0.shape, dtype=torch.float32, generator=g).to(self.ctx.device)
        sigma = draw_sigmas(self.model.model_sampling, x0.shape[0], self.ctx.device, g)
        part = self.ctx.shard(x0.shape[0])
        x0, mask, noise, sigma, caps = x0[part], mask[part], noise[part], sigma[part], caps[part]
        conds = batch_conds([self.caption_conds(i) for i in caps])
        pred, target = denoising_prediction(self.model, x0, noise, sigma, conds)
        if self.loss_kind != "dco":
            return masked_mse(pred.float(), target.float(), mask)
        with torch.no_grad(), set_lora_enabled(self.loras, False):
            ref, _ = denoising_prediction(self.model, x0, noise, sigma, conds)
        return dco_per_sample(pred.float(), ref.float(), target.float(), mask, self.beta)

    def save_final(self, path: Path) -> None:
        meta = {"personalize_kind": "segmix_lora", "rank": str(self.rank), "steps": str(self.config["steps"]),
                "phrases": json.dumps(self.meta["phrases"])}
        save_file(lora_state_dict(self.loras, dtype=torch.float16 if self.config.get("save_fp16") else None),
                  str(path), metadata=meta)

    def preview(self, step: int):
        return sample_preview(self, step)


def batch_conds(conds: list[dict]) -> dict:
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


@torch.no_grad()
def sample_preview(job: ComfyJob, step: int, transformer_options: dict | None = None):
    """A validation image of ``validation`` (data.json) at ``step``: the job's model as it is now,
    ComfyUI's own sampler (euler, ``validation_steps``, CFG ``validation_cfg``), the VAE decode."""
    val = job.meta.get("validation")
    if not val or job.vae is None:
        return None
    import comfy.sample                                 # ComfyUI: imported by init_comfy
    c = job.config
    lat = torch.zeros(1, job.model.latent_format.latent_channels, job.size // 8, job.size // 8)
    pos = [[job.data["val_cond.0"], {"pooled_output": job.data["val_pooled.0"]} if "val_pooled.0" in job.data else {}]]
    neg = [[job.data["val_cond.1"], {"pooled_output": job.data["val_pooled.1"]} if "val_pooled.1" in job.data else {}]]
    seed = int(val.get("seed", c["seed"]))
    state = torch.get_rng_state()
    try:
        noise = comfy.sample.prepare_noise(lat, seed)
        out = comfy.sample.sample(job.mp, noise, int(c.get("validation_steps", 20)), float(c.get("validation_cfg", 5.0)),
                                  "euler", "normal", pos, neg, lat, seed=seed, disable_pbar=True)
        image = job.vae.decode(out)                  # the sampler returns the VAE's latent space
    finally:
        torch.set_rng_state(state)
    arr = (image[0, ..., :3].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    path = job.job_dir / f"preview_{step:06d}.png"
    Image.fromarray(arr).save(path)
    return str(path), f"step {step}: {val['prompt']}"


# ====================================================================================== Infusion

class InfusionTrainPatch:
    """The attn2 replace of one cross-attention layer while Infusion trains: Δk/Δv (the live trainable
    parameters) added at each conditional row's concept token (``infuse_kv``), then the layer's
    ordinary attention. The concept position of every row comes from ``holder["positions"]`` (one
    position for all rows, or one per row) with ``holder["length"]`` the prompt's token count."""

    def __init__(self, offsets, key, holder: dict):
        self.offsets, self.key, self.holder = offsets, key, holder

    def __call__(self, q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention   # ComfyUI: imported by init_comfy
        labels = list(extra_options.get("cond_or_uncond") or [0])
        chunk = q.shape[0] // len(labels)
        rows = [i for j, lab in enumerate(labels) if lab == 0 for i in range(j * chunk, (j + 1) * chunk)]
        pos = self.holder["positions"]
        dk, dv = self.offsets.delta(self.key)
        for r in rows:
            p = pos[r] if isinstance(pos, (list, tuple)) else pos
            k, v = infuse_kv(k, v, [r], concept_positions(k.shape[1], int(p), int(self.holder["length"])), dk, dv)
        return optimized_attention(q, k, v, extra_options["n_heads"])


class InfusionJob(ComfyJob):
    """Infusion (docs/algorithms.md §6.2): zero-initialised Δk, Δv of every cross-attention layer at the
    concept token, trained with the soft-masked ε-MSE (the mask multiplies prediction and target, as
    the official code does: ``mean((m·ε̂ − m·ε)²)``) over captions from templates with the concept
    word; the UNet stays frozen. Data as ``infusion/dataset.py`` prepares it: the photo mirrored with
    probability 0.5 (in pixels, then encoded), the soft mask divided by its maximum
    (``training/dataset.py``), one of the 11 official caption templates (``job_folder.py``)."""

    REQUIRED_KEYS = ComfyJob.REQUIRED_KEYS + ("concept_word",)

    def setup(self, ctx: JobContext) -> None:
        super().setup(ctx)
        c = self.config
        widths = {tuple(k): int(w) for k, w in self.meta["widths"]}
        self.offsets = InfusionOffsets(widths, kv=c.get("kv", "kv"), device=ctx.device)
        self.holder = {"positions": 0, "length": 77}
        for key in self.offsets.layer_keys():
            self.mp.set_model_attn2_replace(InfusionTrainPatch(self.offsets, key, self.holder), key[0], key[1], key[2])
        self.batch = int(c.get("batch_size", 4))
        self.n_images = len(self.meta["images"])
        self._latents: dict = {}

    def parameters(self) -> list[torch.Tensor]:
        return list(self.offsets.parameters())

    def latent(self, i: int, flip: bool = False) -> torch.Tensor:
        """The latent of photo ``i``, mirrored left-right in pixels before encoding when ``flip`` (the
        official dataset flips the photo; a flipped latent is not the latent of the flipped photo)."""
        if (i, flip) not in self._latents:
            image = self.data[f"image.{i}"][None]
            self._latents[(i, flip)] = self.encode(image.flip(2) if flip else image)
        return self._latents[(i, flip)]

    def loss(self, step: int, micro: int = 0) -> torch.Tensor:
        fixed = bool(self.config.get("fixed_batch"))
        g = torch.Generator().manual_seed(int(self.config["seed"]) + micro) if fixed else None
        n = self.batch
        images = torch.randint(self.n_images, (n,), generator=g).tolist()
        captions = torch.randint(len(self.meta["captions"]), (n,), generator=g).tolist()
        flips = (torch.rand(n, generator=g) < 0.5).tolist()
        x0 = torch.cat([self.latent(i, f) for i, f in zip(images, flips)])
        masks = []
        for i, f in zip(images, flips):
            m = self.data[f"mask.{i}"].to(self.ctx.device)
            masks.append(mask_to_latent(m.flip(-1) if f else m, x0.shape[-2], x0.shape[-1])[0])
        mask = torch.stack(masks)
        noise = torch.randn(x0.shape, dtype=torch.float32, generator=g).to(self.ctx.device)
        sigma = draw_sigmas(self.model.model_sampling, n, self.ctx.device, g)
        part = self.ctx.shard(n)
        x0, mask, noise, sigma, caps = x0[part], mask[part], noise[part], sigma[part], captions[part]
        self.holder["positions"] = [self.meta["positions"][i] for i in caps]
        self.holder["length"] = int(self.meta["length"])
        conds = batch_conds([self.caption_conds(i) for i in caps])
        topts = dict(self.mp.model_options["transformer_options"], cond_or_uncond=[0], sigmas=sigma)
        pred, target = denoising_prediction(self.model, x0, noise, sigma, conds, topts)
        return masked_mse(pred.float(), target.float(), mask * mask)

    def save_final(self, path: Path) -> None:
        save_offsets(path, self.offsets, concept_word=self.config["concept_word"], family=self.meta.get("family"))

    def preview(self, step: int):
        val = self.meta.get("validation")
        if not val:
            return None
        self.holder["positions"], self.holder["length"] = int(val["position"]), int(val["length"])
        return sample_preview(self, step)
