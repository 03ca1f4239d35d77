"""The settings of each shipped example workflow (the papers' cases, models, sampler settings) and the
Read-me notes, which are markdown files in ``notes/`` named after the workflow (``<stem>.md``, and
``<stem>.<part>.md`` for a workflow's further notes).

A note file is read as prose: paragraphs are separated by a blank line, the lines of one paragraph are
joined with a space, and the first paragraph's ``# `` (the note's title as a heading) is dropped; the note
node shows the paragraphs separated by a blank line.
"""
from __future__ import annotations

from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = PACK_ROOT / "workflows"
INPUTS = WORKFLOWS / "inputs"
NOTES = Path(__file__).resolve().parent / "notes"


def read_note(name: str) -> str:
    """The text of ``notes/<name>.md`` as a Note node shows it."""
    paragraphs = (NOTES / f"{name}.md").read_text(encoding="utf-8").strip("\n").split("\n\n")
    paragraphs[0] = paragraphs[0].removeprefix("# ")
    return "\n\n".join(" ".join(p.split("\n")) for p in paragraphs)


# FreeCustom's cat_and_dog case (shared/data/cases.json), with FreeCustom's negative prompt, mask weight,
# layers and sampler settings.
FREECUSTOM = dict(
    stem="personalize_freecustom_multi_reference",
    template="FreeCustom MRSA (SD1.5)",
    checkpoint="v1-5-pruned-emaonly.safetensors",
    prompt="a cat and a dog sitting together on a sofa",
    negative="lowres, bad anatomy, text, error, cropped, worst quality, low quality, normal quality, "
             "jpeg artifacts, blurry",
    refs=[("cat", "personalize_cat_04.jpg", "personalize_cat_04_mask.jpg", "a cat"),
          ("dog", "personalize_dog6_02.jpg", "personalize_dog6_02_mask.jpg", "a dog")],
    seed=42, steps=50, cfg=7.5, sampler="ddim", scheduler="ddim_uniform", size=512,
)

# The same cat + dog references and prompt as the SD1.5 FreeCustom example, on FLUX.1 dev with the settings of
# ComfyUI's own FLUX dev example: the split files (diffusion model, CLIP-L + T5-XXL, ae), FluxGuidance 3.5,
# cfg 1 (FLUX dev is guidance-distilled), euler / simple, 20 steps, 1024x1024. MRSA on the single blocks with
# the references side by side (the node's FLUX defaults); the mask weight as FreeCustom's.
FREECUSTOM_FLUX = dict(
    stem="personalize_freecustom_flux",
    template="FreeCustom MRSA (FLUX.1 dev)",
    unet="flux1-dev.safetensors",
    clip_l="clip_l.safetensors",
    t5="t5xxl_fp16.safetensors",
    vae="ae.safetensors",
    prompt=FREECUSTOM["prompt"],
    negative="",
    refs=FREECUSTOM["refs"],
    layers="FLUX dev/schnell: single blocks",
    positions="shifted (side by side)",
    guidance=3.5, seed=42, steps=20, cfg=1.0, sampler="euler", scheduler="simple", size=1024,
)

# FreeMix's dog-with-cat-appearance setting: structure from the dog, appearance from the cat, FreeMix's
# seed (500) and sampler (DDIM 50 steps, cfg 7.5), FreeCustom's negative prompt; the subject masks come
# from SAM Mask nodes (box / points + box prompts fitted to the two shipped 512x512 photos).
FREEMIX = dict(
    stem="personalize_freemix_structure_appearance",
    template="FreeMix DMSA (SD1.5)",
    checkpoint="v1-5-pruned-emaonly.safetensors",
    sam="sam_vit_b_01ec64.pth",
    prompt="a photo of a dog in the grass",
    blend_word="dog",
    negative=FREECUSTOM["negative"],
    # (role, subject, image, caption, SAM mode, points, box); pixels of the 512x512 images
    refs=[("structure", "dog", "personalize_dog6_02.jpg", "a dog", "box", "", "80,0,420,512"),
          ("appearance", "cat", "personalize_cat_04.jpg", "a cat", "points + box", "225,300", "88,28,412,512")],
    seed=500, steps=50, cfg=7.5, sampler="ddim", scheduler="ddim_uniform", size=512,
)

# MIP-Adapter's three demo pairs (shared/data/cases.json) with the official inference settings: SDXL base,
# model_sdxl.bin with its ViT-bigG image encoder, scale 0.75, 30 steps, cfg 5.0 (the SDXL pipeline default
# the official code falls back to), seed 420, 1024x1024, the official negative prompt.
MIP = dict(
    stem="personalize_mip_adapter_multi_object",
    template="MIP-Adapter multi-object (SDXL)",
    checkpoint="sd_xl_base_1.0.safetensors",
    adapter="model_sdxl.bin",
    clip_vision="CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors",
    negative="monochrome, lowres, bad anatomy, worst quality, low quality",
    pairs=[("A wide shot of cat wearing jacket with boston city in background.",
            [("cat", "personalize_mip_1_cat.jpg"), ("jacket", "personalize_mip_1_jacket.jpg")]),
           ("A pet cat playing with dice on a sidewalk.",
            [("cat", "personalize_mip_2_cat.jpg"), ("dice", "personalize_mip_2_dice.jpg")]),
           ("Dog in front of barn in snowy ice.",
            [("barn", "personalize_mip_3_barn.jpg"), ("dog", "personalize_mip_3_dog.jpg")])],
    seed=420, steps=30, cfg=5.0, sampler="euler", scheduler="normal", size=1024, scale=0.75,
)

# FreeCure's two passes with ComfyUI's own PhotoMaker nodes (FreeCure's PhotoMaker settings: SDXL, DDIM 50
# steps, CFG 5, mask weight 1.5, its SDXL blocks); the attributes are ones MediaPipe can mask offline.
FREECURE = dict(
    stem="personalize_freecure_photomaker",
    template="FreeCure with PhotoMaker (SDXL)",
    checkpoint="sd_xl_base_1.0.safetensors",
    photomaker="photomaker-v1.bin",
    id_image="personalize_astronaut.jpg",
    prompt="a photo of a woman photomaker with bright green eyes and red lipstick, portrait",
    foundation="a photo of a woman with bright green eyes and red lipstick, portrait",
    negative="nsfw, lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, "
             "cropped, worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, blurry",
    seed=20, steps=50, cfg=5.0, sampler="ddim", scheduler="ddim_uniform", size=1024, weight=1.5,
)

# MuDI with the same cat + dog: the subjects composed on a white canvas as Seg-Mix does, sampled with core's
# SamplerCustomAdvanced from mean-shifted noise (the node's default gamma), scored with Detect-and-Compare
# (OWLv2 + DreamSim, MuDI's demo threshold 0.4). SDXL at 1024x1024 as MuDI; 30 steps, cfg 5 and euler are
# ordinary SDXL settings (MuDI's inference notebooks are not readable). The prompt is cases.json's cat_and_dog.
MUDI = dict(
    stem="personalize_mudi_compose_and_score",
    template="MuDI compose and score (SDXL)",
    checkpoint="sd_xl_base_1.0.safetensors",
    lora="mudi_segmix_lora_cat_dog.safetensors",
    prompt="a cat and a dog sitting together on a sofa",
    negative="monochrome, lowres, bad anatomy, worst quality, low quality",
    refs=[("cat", "personalize_cat_04.jpg", "personalize_cat_04_mask.jpg"),
          ("dog", "personalize_dog6_02.jpg", "personalize_dog6_02_mask.jpg")],
    compose_seed=20, seed=42, steps=30, cfg=5.0, sampler="euler", scheduler="normal", size=1024, threshold=0.4,
)

# MuDI's Seg-Mix LoRA trained on the same cat + dog, then used through core's Load LoRA. The training settings
# are MuDI's (train_segmix_lora_sdxl.py: rank 32, lr 1e-4, Seg-Mix 0.3 at 0.75-1.0 scale, DCO beta 1000, 1024,
# batch 1 x accumulation 2, seed 42) except the steps: MuDI trains 2010, the example ships a short run. The phrases are MuDI's
# style (a rare word + the class). Sampling as the compose-and-score example: SDXL, euler, 30 steps, cfg 5.
MUDI_TRAIN = dict(
    stem="personalize_mudi_train_segmix_lora",
    template="MuDI train Seg-Mix LoRA (SDXL)",
    checkpoint="sd_xl_base_1.0.safetensors",
    output_name="mudi_cat_dog",
    subjects=[("cat", "olis cat", "personalize_cat_04.jpg", "personalize_cat_04_mask.jpg"),
              ("dog", "hta dog", "personalize_dog6_02.jpg", "personalize_dog6_02_mask.jpg")],
    captions="a photo of {}",
    train=dict(steps=300, rank=32, learning_rate=1e-4, segmix_prob=0.3, scale_min=0.75, scale_max=1.0, loss="dco",
               dco_beta=1000.0, resolution=1024, batch_size=1, gradient_accumulation=2,
               gradient_checkpointing=True, seed=42,
               validation_prompt="a photo of olis cat and hta dog, simple background", validate_every=100,
               checkpoint_every=100, gpus=1),
    mudi_steps=2010,
    prompt="a photo of olis cat and hta dog sitting together on a sofa",
    negative="monochrome, lowres, bad anatomy, worst quality, low quality",
    seed=42, steps=30, cfg=5.0, sampler="euler", scheduler="normal", size=1024,
)


# Native reference control on FLUX.2 klein 4B (ComfyUI's split files): the cat and the dog as the model's own
# references (ImageScaleToTotalPixels 1 MP in steps of 16, VAE Encode, ReferenceLatent, chained on the prompt),
# each with its subject mask, a weight and a target region (the left and the right half). klein is
# step-distilled: 4 steps, cfg 1 (its template's settings), euler / simple, 1024x1024.
NATIVE_FLUX2 = dict(
    stem="personalize_native_flux2_klein",
    template="Native references (FLUX.2 klein)",
    unet="flux-2-klein-4b.safetensors",
    clip="qwen_3_4b.safetensors",
    clip_type="flux2",
    vae="flux2-vae.safetensors",
    prompt="a cat and a dog sitting together on a sofa",
    # (subject, image, mask, weight, region)
    refs=[("cat", "personalize_cat_04.jpg", "personalize_cat_04_mask.jpg", 1.0, "personalize_region_left.png"),
          ("dog", "personalize_dog6_02.jpg", "personalize_dog6_02_mask.jpg", 1.2, "personalize_region_right.png")],
    seed=42, steps=4, cfg=1.0, sampler="euler", scheduler="simple", size=1024,
)

# Native reference control on Qwen-Image-Edit 2509 with two people, each kept to one half of the picture so
# their faces do not blend: TextEncodeQwenImageEditPlus (image1, image2) for the prompt and the negative
# prompt, ModelSamplingAuraFlow shift 3, 20 steps, cfg 2.5, euler / simple (ComfyUI's Qwen-Image-Edit example
# settings without the Lightning LoRA).
NATIVE_QWEN = dict(
    stem="personalize_native_qwen_edit_two_people",
    template="Two people (Qwen-Image-Edit)",
    unet="qwen_image_edit_2509_fp8_e4m3fn.safetensors",
    clip="qwen_2.5_vl_7b_fp8_scaled.safetensors",
    clip_type="qwen_image",
    vae="qwen_image_vae.safetensors",
    prompt="the woman from picture 1 and the man from picture 2 standing side by side in a park, photo",
    negative="",
    # (person, image, weight, region)
    refs=[("woman", "personalize_astronaut.jpg", 1.0, "personalize_region_left.png"),
          ("man", "personalize_cameraman.jpg", 1.0, "personalize_region_right.png")],
    shift=3.0, seed=7, steps=20, cfg=2.5, sampler="euler", scheduler="simple", size=1024,
)

# The world's examples (the package world/): the same techniques on the pack's own tiny model of coloured shapes, which
# tools/world.py builds from the committed weights, so they run with no download. Their references are scenes of the
# world drawn by world/data.py (tools/workflows/world_inputs.py), one subject each: (colour, pattern, shape). The
# prompts name only what the reference must not supply (MRSA: the shapes; DMSA: the structure's shape), except
# MuDI's, which names both subjects fully (its technique places subjects, it does not copy their look). The
# sampler settings are the world's defaults (world/runtime.py): euler / normal, 20 steps, cfg 5, no negative.
WORLD = "World model (no download)"
WORLD_SUBJECTS = {"circle": ("teal", "checkered", "circle"), "square": ("orange", "striped", "square"),
                  "star": ("green", "plain", "star"), "diamond": ("purple", "checkered", "diamond")}


def world_files(subject: str) -> tuple[str, str]:
    """The shipped image and mask of one of the world's subjects."""
    stem = "personalize_world_" + "_".join(WORLD_SUBJECTS[subject])
    return f"{stem}.png", f"{stem}_mask.png"


def world_caption(subject: str) -> str:
    """The subject's full description ("a teal checkered circle"), the reference's caption."""
    colour, pattern, shape = WORLD_SUBJECTS[subject]
    return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {pattern} {shape}"


_WORLD_SAMPLING = dict(checkpoint="personalize_world.safetensors", checkpoint_title=f"Load Checkpoint: {WORLD}",
                       negative="", negative_title="Negative prompt (empty, as the world's default)",
                       seed=42, steps=20, cfg=5.0, sampler="euler", scheduler="normal", size=128)

WORLD_FREECUSTOM = dict(
    _WORLD_SAMPLING,
    stem="personalize_world_freecustom_multi_reference",
    template="World model - FreeCustom MRSA",
    title=f"{WORLD}: FreeCustom MRSA",
    prompt="a circle and a square",
    refs=[(s, *world_files(s), world_caption(s)) for s in ("circle", "square")],
    sampler_title="KSampler (the world's defaults: euler, 20 steps, cfg 5)",
    prefix="personalize_world_freecustom",
)

WORLD_FREEMIX = dict(
    _WORLD_SAMPLING,
    stem="personalize_world_freemix_structure_appearance",
    template="World model - FreeMix DMSA",
    title=f"{WORLD}: FreeMix DMSA",
    prompt="a star",
    blend_word="star",
    # (role, subject, image, caption, mask image): masks from files instead of SAM
    refs=[("structure", "star", world_files("star")[0], world_caption("star"), world_files("star")[1]),
          ("appearance", "diamond", world_files("diamond")[0], world_caption("diamond"), world_files("diamond")[1])],
    sampler_title="KSampler (the world's defaults: euler, 20 steps, cfg 5)",
    prefix="personalize_world_freemix",
)

WORLD_MUDI = dict(
    _WORLD_SAMPLING,
    stem="personalize_world_mudi_compose",
    template="World model - MuDI compose",
    title=f"{WORLD}: MuDI compose",
    prompt=f"{world_caption('circle')} and {world_caption('square')}",
    refs=[(s, *world_files(s)) for s in ("circle", "square")],
    compose_seed=20, margin=8, model_name="world model",
    prefix="personalize_world_mudi",
)

WORLD_ALL = (WORLD_FREECUSTOM, WORLD_FREEMIX, WORLD_MUDI)
ALL = (FREECUSTOM, FREEMIX, MIP, FREECURE, MUDI, MUDI_TRAIN, FREECUSTOM_FLUX, NATIVE_FLUX2, NATIVE_QWEN, *WORLD_ALL)

# The shipped file of each workflow is ``workflows/<template>.json`` (+ ``.jpg``): frontend 1.49.6 titles a
# custom node pack's template card with its file name and reads no other title or description for it, so
# the file name is the human title. ``stem`` stays the workflow's id (notes, tests, Save Image prefixes).
TEMPLATES = {c["stem"]: c["template"] for c in ALL}


def workflow_path(stem: str) -> Path:
    """The shipped JSON of the workflow ``stem`` (its thumbnail: the same path with ``.jpg``)."""
    return WORKFLOWS / f"{TEMPLATES[stem]}.json"


def fall_back_samplers(sampler_names, schedulers) -> None:
    """Use euler / normal in the settings whose sampler or scheduler this ComfyUI lacks (DDIM is missing in
    some versions)."""
    for c in ALL:
        if c["sampler"] not in sampler_names:
            c["sampler"] = "euler"
        if c["scheduler"] not in schedulers:
            c["scheduler"] = "normal"
