"""The recipes of the native-reference examples: FLUX.2 klein with two masked, weighted references in two
regions, and Qwen-Image-Edit with two people, each kept to one half of the picture (settings.py)."""
from __future__ import annotations

from .graph import Graph, decode_and_save
from .settings import NATIVE_FLUX2, NATIVE_QWEN, read_note


def _loaders(g, c, family: str):
    """Load Diffusion Model, Load CLIP and Load VAE of a split-file model in the first column."""
    unet = g.node("UNETLoader", (0, 0), (320, 82), f"Load Diffusion Model ({family})", unet_name=c["unet"],
                  weight_dtype="default")
    clip = g.node("CLIPLoader", (0, 130), (320, 106), f"Load CLIP ({family} text encoder)", clip_name=c["clip"],
                  type=c["clip_type"], device="default")
    vae = g.node("VAELoader", (0, 290), (320, 60), f"Load VAE ({family})", vae_name=c["vae"])
    return unet, clip, vae


def _region(g, image: str, at: tuple, title: str):
    """A target region drawn as an image (white = the region), as a MASK."""
    load = g.node("LoadImage", at, (260, 300), title, image=image)
    mask = g.node("ImageToMask", (at[0], at[1] + 340), (260, 60), f"{title} (red channel)", channel="red")
    g.link(load, 0, mask, "image")
    return mask


def _control_and_sample(g, c, model, chain, pos, neg, at: tuple, latent_type: str, x: int, title: str,
                        prefix: str, vae):
    """Native Reference Control on ``model`` with the ``chain`` (at ``at``, the empty latent of
    ``latent_type`` under it), KSampler at column ``x``, VAE Decode and Save Image."""
    control = g.node("PersonalizeNativeReferenceControl", at, (340, 110), None, start_percent=0.0, end_percent=1.0)
    g.link(model, 0, control, "model")
    g.link(chain, 0, control, "native_references")
    latent = g.node(latent_type, (at[0], at[1] + 180), (320, 110), None, width=c["size"], height=c["size"],
                    batch_size=1)
    sampler = g.node("KSampler", (x, 0), (320, 270), title, seed=c["seed"], steps=c["steps"], cfg=c["cfg"],
                     sampler_name=c["sampler"], scheduler=c["scheduler"], denoise=1.0)
    g.link(control, 0, sampler, "model")
    g.link(pos, 0, sampler, "positive")
    g.link(neg, 0, sampler, "negative")
    g.link(latent, 0, sampler, "latent_image")
    decode_and_save(g, (vae, 0), sampler, (x + 360, 0), 100, (520, 560), prefix)


def native_flux2_workflow(schemas: dict, classes: dict, c: dict = NATIVE_FLUX2) -> dict:
    """Two references chained with core's ReferenceLatent; one Native Reference per reference (subject
    mask, weight, target region), in the same order; Native Reference Control on the model."""
    g = Graph(schemas, classes)
    unet, clip, vae = _loaders(g, c, "FLUX.2 klein")
    g.note(read_note(c["stem"]), (0, 400), (320, 1100), title="Read me: native references on FLUX.2")
    pos = g.node("CLIPTextEncode", (380, 0), (400, 160), "Prompt", text=c["prompt"])
    g.link(clip, 0, pos, "clip")
    cond, chain = pos, None
    for k, (subject, image, mask, weight, region) in enumerate(c["refs"]):
        y = 220 + k * 760
        img = g.node("LoadImage", (380, y), (300, 330), f"Reference {k + 1}: {subject}", image=image)
        scale = g.node("ImageScaleToTotalPixels", (720, y), (300, 110), None, upscale_method="lanczos",
                       megapixels=1.0, resolution_steps=16)
        enc = g.node("VAEEncode", (720, y + 150), (210, 50), None)
        ref = g.node("ReferenceLatent", (720, y + 240), (260, 50), f"ReferenceLatent: reference {k + 1}")
        g.link(img, 0, scale, "image")
        g.link(scale, 0, enc, "pixels")
        g.link(vae, 0, enc, "vae")
        g.link(cond, 0, ref, "conditioning")
        g.link(enc, 0, ref, "latent")
        cond = ref
        msk = g.node("LoadImage", (380, y + 370), (300, 330), f"Reference {k + 1}: {subject} mask", image=mask)
        to_mask = g.node("ImageToMask", (720, y + 370), (260, 60), f"{subject} mask (red channel)", channel="red")
        g.link(msk, 0, to_mask, "image")
        area = _region(g, region, (1060, y + 300), f"Target region of the {subject}")
        native = g.node("PersonalizeNativeReference", (1060, y), (320, 130), f"Native Reference {k + 1}: {subject}",
                        weight=weight)
        g.link(to_mask, 0, native, "subject_mask")
        g.link(area, 0, native, "target_region")
        if chain is not None:
            g.link(chain, 0, native, "previous")
        chain = native
    neg = g.node("ConditioningZeroOut", (1060, -120), (260, 30), "Negative (ignored at cfg 1)")
    g.link(cond, 0, neg, "conditioning")
    _control_and_sample(g, c, unet, chain, cond, neg, (1440, 220), "EmptyFlux2LatentImage", 1840,
                        "KSampler (FLUX.2 klein: 4 steps, cfg 1)", "personalize_native_flux2", vae)
    return g.to_json()


def native_qwen_workflow(schemas: dict, classes: dict, c: dict = NATIVE_QWEN) -> dict:
    """Two people through TextEncodeQwenImageEditPlus (image1, image2); one Native Reference per image with
    a weight and a target region; Native Reference Control after ModelSamplingAuraFlow."""
    g = Graph(schemas, classes)
    unet, clip, vae = _loaders(g, c, "Qwen-Image-Edit")
    g.note(read_note(c["stem"]), (0, 400), (320, 1000), title="Read me: two people on Qwen-Image-Edit")
    pos = g.node("TextEncodeQwenImageEditPlus", (760, 0), (400, 200), "Prompt (image1, image2)", prompt=c["prompt"])
    neg = g.node("TextEncodeQwenImageEditPlus", (760, 260), (400, 200), "Negative prompt (same images)",
                 prompt=c["negative"])
    chain = None
    for k, (person, image, weight, region) in enumerate(c["refs"]):
        y = k * 420
        img = g.node("LoadImage", (380, y), (300, 330), f"Picture {k + 1}: the {person}", image=image)
        for enc in (pos, neg):
            g.link(img, 0, enc, f"image{k + 1}")
        area = _region(g, region, (1200, 520 + k * 440), f"Target region of the {person}")
        native = g.node("PersonalizeNativeReference", (1500, 520 + k * 440), (320, 130),
                        f"Native Reference {k + 1}: the {person}", weight=weight)
        g.link(area, 0, native, "target_region")
        if chain is not None:
            g.link(chain, 0, native, "previous")
        chain = native
    for enc in (pos, neg):
        g.link(clip, 0, enc, "clip")
        g.link(vae, 0, enc, "vae")
    shift = g.node("ModelSamplingAuraFlow", (1200, 0), (300, 60), None, shift=c["shift"])
    g.link(unet, 0, shift, "model")
    _control_and_sample(g, c, shift, chain, pos, neg, (1200, 120), "EmptySD3LatentImage", 1900,
                        "KSampler (Qwen-Image-Edit: 20 steps, cfg 2.5)", "personalize_native_qwen_edit", vae)
    return g.to_json()
