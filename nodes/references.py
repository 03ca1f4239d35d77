"""Reference nodes: schema, input checks and wiring only (the work is in ``references/``)."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..references.reference import Reference, check_image, fit_image, prepare_masks
from .checks import check_inputs
from .types import References, conditioning_pooled, conditioning_tensor

def encode_references(image, vae, mask=None, caption=None, weight=3.0, mask_threshold=0.5, soft_mask=False,
                      resolution=512, name="reference") -> list[Reference]:
    check_image(image)
    pixels = fit_image(image[..., :3].float(), int(resolution))
    b, h, w, _ = pixels.shape
    masks = prepare_masks(mask, b, h, w, float(mask_threshold), bool(soft_mask))
    latent = vae.encode(pixels)
    if not isinstance(latent, torch.Tensor) or latent.dim() != 4 or latent.shape[0] != b:
        raise ValueError("vae: this VAE does not produce an image latent [B,C,H,W] (video or audio VAE?); "
                         "use the VAE of your image checkpoint")
    f = h // latent.shape[-2]
    if f < 1 or latent.shape[-2] * f != h or latent.shape[-1] * f != w:
        raise ValueError(f"vae: latent {tuple(latent.shape[-2:])} does not divide the image {h}x{w}")
    cap = conditioning_tensor(caption)
    pooled = conditioning_pooled(caption)
    out = []
    for i in range(b):
        out.append(Reference(latent=latent[i:i + 1].float().cpu(), mask=masks[i].cpu(), weight=float(weight),
                             soft_mask=bool(soft_mask), caption=cap, caption_pooled=pooled, downscale=f,
                             name=name if b == 1 else f"{name} {i + 1}"))
    return out


class ReferenceEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeReferenceEncode",
            display_name="Reference Encode (Personalize)",
            category="personalize/references",
            description=(
                "Encodes a reference subject for the Personalize attention techniques: the image goes "
                "through the VAE (posterior mean), the mask marks the subject, the caption conditions the "
                "reference's own pass. Chain several Reference Encode nodes to give several references; an "
                "image batch gives one reference per image."),
            inputs=[
                io.Image.Input("image", tooltip="The reference image (a batch gives one reference per image)."),
                io.Vae.Input("vae", tooltip="The VAE of the checkpoint you sample with."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Subject mask (hand-drawn, SAM, any MASK; any size, soft or hard). "
                                      "Unconnected: the whole image is the subject."),
                io.Conditioning.Input("caption", optional=True,
                                      tooltip="Caption of the reference, e.g. 'a dog' (CLIP Text Encode with the "
                                              "same CLIP as your prompt). Unconnected: the target's prompt is used."),
                References.Input("references", optional=True,
                                 tooltip="References to chain onto; this node appends its own."),
                io.Float.Input("weight", default=3.0, min=-20.0, max=20.0, step=0.1,
                               tooltip="Logit bias inside the mask (FreeCustom's mask weight; 3.0 is its default). "
                                       "0 removes the reference."),
                io.Float.Input("mask_threshold", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Mask values below this are outside the subject (0: every non-zero value counts)."),
                io.Boolean.Input("soft_mask", advanced=True, default=False,
                                 tooltip="Keep soft mask values as per-token weights instead of making the mask binary."),
                io.Int.Input("resolution", advanced=True, default=512, min=0, max=4096, step=8,
                             tooltip="Longer side in pixels the reference is encoded at (0 keeps its size). "
                                     "Use your target size, e.g. 512 for SD1.5, 1024 for SDXL."),
            ],
            outputs=[References.Output(display_name="references", tooltip="The chain of references so far, this one last.")],
        )

    @classmethod
    def execute(cls, image, vae, mask=None, caption=None, references=None, weight=3.0, mask_threshold=0.5,
                soft_mask=False, resolution=512) -> io.NodeOutput:
        checked = check_inputs(cls, locals())
        image, mask = checked["image"], checked["mask"]
        prev = tuple(references or ())
        new = encode_references(image, vae, mask, caption, weight, mask_threshold, soft_mask, resolution,
                                name=f"reference {len(prev) + 1}")
        return io.NodeOutput(prev + tuple(new))


NODES = [ReferenceEncode]
