#!/usr/bin/env python
"""Generate the shipped example workflows (UI format) from the live node schemas, their thumbnails
and, optionally, the example input images.

    COMFYUI_PATH=/path/to/ComfyUI python tools/make_workflows.py [--inputs-from SHARED_DATA_DIR]

``widgets_values`` are laid out with the same schema rules ``tools/run_workflow.py`` reads them with,
so a workflow written here converts back to exactly the values given below.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_workflow as rw  # noqa: E402

PACK_ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = PACK_ROOT / "workflows"
INPUTS = WORKFLOWS / "inputs"

# FreeCustom's cat_and_dog case (shared/data/cases.json), with FreeCustom's negative prompt, mask weight,
# layers and sampler settings.
FREECUSTOM = dict(
    stem="personalize_freecustom_multi_reference",
    checkpoint="v1-5-pruned-emaonly.safetensors",
    prompt="a cat and a dog sitting together on a sofa",
    negative="lowres, bad anatomy, text, error, cropped, worst quality, low quality, normal quality, "
             "jpeg artifacts, blurry",
    refs=[("cat", "personalize_cat_04.jpg", "personalize_cat_04_mask.jpg", "a cat"),
          ("dog", "personalize_dog6_02.jpg", "personalize_dog6_02_mask.jpg", "a dog")],
    seed=42, steps=50, cfg=7.5, sampler="ddim", scheduler="ddim_uniform", size=512,
)

# (source image, source mask, shipped image, shipped mask) relative to the shared data folder
INPUT_SOURCES = [
    ("dreambench/cat/04.jpg", "freecustom_masks/cat_04_mask.jpg", "personalize_cat_04.jpg",
     "personalize_cat_04_mask.jpg"),
    ("dreambench/dog6/02.jpg", "freecustom_masks/dog6_02_mask.jpg", "personalize_dog6_02.jpg",
     "personalize_dog6_02_mask.jpg"),
]
LICENSE_FILES = ["licenses/CC-BY-4.0_google-dreambooth_LICENSE.md",
                 "licenses/BSD-2-Clause_aim-uofa-FreeCustom_LICENSE.txt",
                 "dreambench/references_and_licenses.txt"]

NOTE = "\n\n".join([
    "FreeCustom multi-reference customization (Personalize)",
    'Puts two subjects from reference photos into one image: "a cat and a dog sitting together on a sofa".',
    "How it works: each Reference Encode node VAE-encodes a reference photo, keeps its subject mask and its "
    'caption ("a cat", "a dog"); the two nodes are chained. Multi-Reference Attention patches the model: in the '
    "SD1.5 decoder's self-attention (output blocks 6-11) the image also attends to the masked tokens of every "
    "reference, boosted by the mask weight (3.0). The references are re-noised and run once per step. Sampler "
    "settings follow FreeCustom: DDIM, 50 steps, cfg 7.5.",
    "Models: put an SD1.5 checkpoint in ComfyUI/models/checkpoints/ (v1-5-pruned-emaonly.safetensors, or choose "
    "any SD1.5 fine-tune in Load Checkpoint).",
    "Inputs: the four example images ship in this pack's workflows/inputs/ folder; copy them into ComfyUI/input/ "
    "(tools/run_workflow.py does it for you). For your own subjects: Load Image + a mask (paint it in the mask "
    "editor and use Load Image's MASK output, or a segmentation node) + a short caption. Credits and licenses of "
    "the examples: workflows/inputs/CREDITS.md.",
])

# The same cat + dog references and prompt as the SD1.5 FreeCustom example, on FLUX.1 dev with the settings of
# ComfyUI's own FLUX dev example: the split files (diffusion model, CLIP-L + T5-XXL, ae), FluxGuidance 3.5,
# cfg 1 (FLUX dev is guidance-distilled), euler / simple, 20 steps, 1024x1024. MRSA on the single blocks with
# the references side by side (the node's FLUX defaults); the mask weight as FreeCustom's.
FREECUSTOM_FLUX = dict(
    stem="personalize_freecustom_flux",
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

NOTE_FLUX = "\n\n".join([
    "FreeCustom multi-reference attention on FLUX.1 dev (Personalize)",
    'Puts two subjects from reference photos into one image: "a cat and a dog sitting together on a sofa", the '
    "same references and prompt as the SD1.5 FreeCustom example.",
    "How it works on FLUX: each Reference Encode node VAE-encodes a reference photo with FLUX's VAE (16-channel "
    'latents), keeps its subject mask and its caption ("a cat", "a dog"); the two nodes are chained. '
    "Multi-Reference Attention patches the model: FLUX has no separate self-attention (text and image tokens "
    "attend jointly), so in the chosen blocks the image tokens attend over their own text and image tokens plus "
    "the masked image tokens of every reference, boosted by the mask weight (3.0); text tokens keep plain "
    "attention. The default preset takes the 38 single blocks (the later part of the network); 'double blocks' "
    "and 'all blocks' are the other presets. The references are re-noised to the current step and run once per "
    "step, in the same model call as the image, with their captions as text.",
    "reference_positions: 'shifted (side by side)' places each reference beside the image, as in one wide "
    "picture, so a subject is matched by its content wherever it ends up (closest to FreeCustom on a UNet); "
    "'aligned' lays the reference on the image's own grid, which tends to copy the reference's layout.",
    "Sampling: FluxGuidance 3.5 on the prompt, KSampler cfg 1, euler, simple, 20 steps (ComfyUI's FLUX dev "
    "settings). See the note at the negative prompt for cfg above 1. FLUX.1 schnell works too: load "
    "flux1-schnell.safetensors and use 4 steps.",
    "Models: flux1-dev.safetensors (huggingface.co/black-forest-labs/FLUX.1-dev, gated: accept its license) in "
    "ComfyUI/models/diffusion_models/; clip_l.safetensors and t5xxl_fp16.safetensors "
    "(huggingface.co/comfyanonymous/flux_text_encoders; t5xxl_fp8_e4m3fn.safetensors needs less memory) in "
    "ComfyUI/models/text_encoders/; ae.safetensors (the FLUX VAE, from the FLUX.1 repositories) in "
    "ComfyUI/models/vae/. With less GPU memory set weight_dtype in Load Diffusion Model to fp8_e4m3fn.",
    "Inputs: the four example images ship in this pack's workflows/inputs/ folder; copy them into ComfyUI/input/ "
    "(tools/run_workflow.py does it for you). For your own subjects: Load Image + a mask + a short caption. "
    "Credits and licenses of the examples: workflows/inputs/CREDITS.md.",
])

NOTE_FLUX_NEGATIVE = "\n\n".join([
    "Negative prompt and CFG on FLUX dev",
    "At cfg 1 (FLUX dev's usual setting) ComfyUI runs the prompt only: this negative prompt is ignored, and "
    "FluxGuidance (3.5; lower for more natural pictures, higher for closer prompt following) does the guiding.",
    "True CFG works with cfg above 1 (e.g. 2-4): the negative prompt is then used and each step runs the model "
    "for both prompts (about twice the time); the references still act on the prompt's pass only (style_fidelity "
    "1).",
])


# FreeMix's dog-with-cat-appearance setting: structure from the dog, appearance from the cat, FreeMix's
# seed (500) and sampler (DDIM 50 steps, cfg 7.5), FreeCustom's negative prompt; the subject masks come
# from SAM Mask nodes (box / points + box prompts fitted to the two shipped 512x512 photos).
FREEMIX = dict(
    stem="personalize_freemix_structure_appearance",
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

NOTE_FREEMIX = "\n\n".join([
    "FreeMix structure + appearance (Personalize)",
    'Makes "a photo of a dog in the grass" with the shape and pose of the dog photo and the look (fur, colours) of '
    "the cat photo.",
    "How it works: SAM Mask nodes cut each subject out of its photo (the dog with a box prompt, the cat with a box "
    "and a point; coordinates are pixels of the 512x512 images, edit them for your own photos). Reference Encode "
    'VAE-encodes each photo with its mask and caption ("a dog", "a cat"). Disentangle-Mixing Attention (FreeMix '
    "DMSA) patches the model: early in the schedule the image attends to the structure reference's masked tokens "
    "(decoder blocks 4-11, weight 3.0); from 40% of the schedule, in the region of the blend word \"dog\" (found "
    "from its cross-attention maps), the highest-resolution decoder blocks take their keys and values from the "
    "appearance reference. Sampler settings follow FreeMix: DDIM, 50 steps, cfg 7.5, seed 500.",
    "Models: an SD1.5 checkpoint in ComfyUI/models/checkpoints/ (v1-5-pruned-emaonly.safetensors or any SD1.5 "
    "fine-tune), and the SAM ViT-B checkpoint sam_vit_b_01ec64.pth (from the Segment Anything release, "
    "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth) in ComfyUI/models/sams/. The SAM nodes "
    "need the segment-anything package: pip install segment-anything, in ComfyUI's Python.",
    "Inputs: the two example photos ship in this pack's workflows/inputs/ folder; copy them into ComfyUI/input/ "
    "(tools/run_workflow.py does it for you). Any MASK works instead of SAM (a hand-drawn mask from Load Image, "
    "core SAM3, other SAM packs). Credits and licenses: workflows/inputs/CREDITS.md.",
])


# MIP-Adapter's three demo pairs (shared/data/cases.json) with the official inference settings: SDXL base,
# model_sdxl.bin with its ViT-bigG image encoder, scale 0.75, 30 steps, cfg 5.0 (the SDXL pipeline default
# the official code falls back to), seed 420, 1024x1024, the official negative prompt.
MIP = dict(
    stem="personalize_mip_adapter_multi_object",
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
MIP_SOURCES = [(f"mip_adapter_combinations/combination_{i}/{name}.jpg", f"personalize_mip_{i}_{name}.jpg")
               for i, names in ((1, ("cat", "jacket")), (2, ("cat", "dice")), (3, ("barn", "dog"))) for name in names]

NOTE_MIP = "\n\n".join([
    "MIP-Adapter: several reference objects in one picture (Personalize)",
    "Three examples from the MIP-Adapter paper, one per row: a cat wearing a jacket, a cat playing with dice, a dog "
    "in front of a barn. Each object comes from its own reference photo and keeps its identity; the objects do not "
    "blend into each other.",
    "How it works: each MIP-Adapter Reference node takes one object's photo and the word of the prompt that names "
    "it (its entity word); the two are chained. MIP-Adapter Apply patches the model's cross-attention: every layer "
    "adds each object's IP-Adapter attention, weighted per pixel by where its entity word attends, so each reference "
    "lands on its own object. The prompt text feeds both the CLIP Text Encode and the Apply node (the entity words "
    "must appear in it). Settings follow the paper's code: scale 0.75, 30 steps, cfg 5, seed 420, 1024x1024.",
    "Models: an SDXL checkpoint in ComfyUI/models/checkpoints/ (sd_xl_base_1.0.safetensors or an SDXL fine-tune); "
    "model_sdxl.bin from huggingface.co/hqhQAQ/MIP-Adapter in ComfyUI/models/ipadapter/; its image encoder, "
    "CLIP ViT-bigG (h94/IP-Adapter sdxl_models/image_encoder, saved as "
    "CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors) in ComfyUI/models/clip_vision/. For model_sdxl_plus.bin use "
    "the ViT-H encoder (CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors) and scale 0.65 (or -1: the variant's default). "
    "Plain IP-Adapter files work too (training-free merge).",
    "Inputs: the six photos ship in this pack's workflows/inputs/ folder; copy them into ComfyUI/input/ "
    "(tools/run_workflow.py does it for you). Optional: connect a MASK to a MIP-Adapter Reference to fix where "
    "that object goes. Credits and licenses: workflows/inputs/CREDITS.md.",
])

# FreeCure's two passes with ComfyUI's own PhotoMaker nodes (FreeCure's PhotoMaker settings: SDXL, DDIM 50
# steps, CFG 5, mask weight 1.5, its SDXL blocks); the attributes are ones MediaPipe can mask offline.
FREECURE = dict(
    stem="personalize_freecure_photomaker",
    checkpoint="sd_xl_base_1.0.safetensors",
    photomaker="photomaker-v1.bin",
    id_image="personalize_astronaut.jpg",
    prompt="a photo of a woman photomaker with bright green eyes and red lipstick, portrait",
    foundation="a photo of a woman with bright green eyes and red lipstick, portrait",
    negative="nsfw, lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, "
             "cropped, worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, blurry",
    seed=20, steps=50, cfg=5.0, sampler="ddim", scheduler="ddim_uniform", size=1024, weight=1.5,
)

NOTE_FREECURE = "\n\n".join([
    "FreeCure with PhotoMaker: the prompt's facial attributes back (Personalize)",
    "PhotoMaker keeps the identity of the reference photo but tends to ignore attributes such as eye colour or "
    "lipstick in the prompt. FreeCure fixes that without training, in two passes with the same seed:",
    "Pass 1 (top): the plain model with the foundation prompt (the same text without the trigger word "
    "'photomaker', so no identity) gives the foundation image; Face Attribute Mask (MediaPipe, offline) masks the "
    "attributes the prompt names (here eyes and lips).",
    "Pass 2 (bottom): Foundation-Aware Attention patches the model: the sampler runs the foundation branch beside "
    "the PhotoMaker image from the same noise, and in the late decoder self-attention the PhotoMaker image attends "
    "to the foundation image inside the masks (weight 1.5). Same seed, sampler and steps as pass 1, so the "
    "foundation branch retraces the foundation image and the masks line up; keep a deterministic sampler.",
    "Models: an SDXL checkpoint (sd_xl_base_1.0.safetensors) in ComfyUI/models/checkpoints/; PhotoMaker "
    "photomaker-v1.bin (huggingface.co/TencentARC/PhotoMaker) in ComfyUI/models/photomaker/. Face Attribute Mask "
    "needs the mediapipe package (see the pack's README); hair, hat and glasses need the BiSeNet provider "
    "(Face Parsing Loader).",
    "Inputs: the identity photo (NASA astronaut portrait, public domain, from scikit-image) ships in this pack's "
    "workflows/inputs/ folder; copy it into ComfyUI/input/ or load your own face photo.",
])

# MuDI with the same cat + dog: the subjects composed on a white canvas as Seg-Mix does, sampled with core's
# SamplerCustomAdvanced from mean-shifted noise (the node's default gamma), scored with Detect-and-Compare
# (OWLv2 + DreamSim, MuDI's demo threshold 0.4). SDXL at 1024x1024 as MuDI; 30 steps, cfg 5 and euler are
# ordinary SDXL settings (MuDI's inference notebooks are not readable). The prompt is cases.json's cat_and_dog.
MUDI = dict(
    stem="personalize_mudi_compose_and_score",
    checkpoint="sd_xl_base_1.0.safetensors",
    lora="mudi_segmix_lora_cat_dog.safetensors",
    prompt="a cat and a dog sitting together on a sofa",
    negative="monochrome, lowres, bad anatomy, worst quality, low quality",
    refs=[("cat", "personalize_cat_04.jpg", "personalize_cat_04_mask.jpg"),
          ("dog", "personalize_dog6_02.jpg", "personalize_dog6_02_mask.jpg")],
    compose_seed=20, seed=42, steps=30, cfg=5.0, sampler="euler", scheduler="normal", size=1024, threshold=0.4,
)

NOTE_MUDI = "\n\n".join([
    "MuDI: compose two subjects, sample, score (Personalize)",
    'Puts the cat and the dog of the two photos into one picture, "a cat and a dog sitting together on a sofa", '
    "with MuDI's initialisation, then scores with MuDI's Detect-and-Compare how well each subject was kept.",
    "1. Subjects: each Subject (MuDI) node takes a photo and its subject mask (FreeCustom's masks, red channel); "
    "the two are chained. Subject Composer pastes the cut-out subjects on a white 1024x1024 canvas as MuDI's "
    "Seg-Mix does (random places, never overlapping, 0.75-1.0 of the largest size that fits; its seed picks the "
    "layout). The preview shows the collage.",
    "2. Mean-Shifted Noise (MuDI) VAE-encodes the collage and shifts the starting noise toward it inside the "
    "subject masks, so each subject starts where the collage puts it (gamma 1: full strength; 0: exactly core's "
    "RandomNoise). It is the NOISE of SamplerCustomAdvanced; Empty Latent Image only gives the size, so compose at "
    "the size you generate. MuDI's code for this step is not public: the formula is a reconstruction (README).",
    "3. Sampling with core nodes: SDXL, euler, 30 steps, cfg 5, 1024x1024 (ordinary SDXL settings).",
    "4. Score (right): Detect-and-Compare finds the subjects by name with OWLv2 and compares the crops with the "
    "reference photos with DreamSim; 1 is best, 0 when the number of boxes is not the number of subjects.",
    "Models: an SDXL checkpoint (sd_xl_base_1.0.safetensors or an SDXL fine-tune) in ComfyUI/models/checkpoints/; "
    "optionally a LoRA of your subjects in ComfyUI/models/loras/ (see the LoRA note); the evaluation models in "
    "ComfyUI/models/personalize_eval/ (see the score note).",
    "Inputs: the four example images ship in this pack's workflows/inputs/ folder; copy them into ComfyUI/input/ "
    "(tools/run_workflow.py does it for you). For your own subjects: a photo and a mask each (mask editor, SAM "
    "Mask, any MASK). Credits and licenses: workflows/inputs/CREDITS.md.",
])

NOTE_MUDI_LORA = "\n\n".join([
    "The subjects' LoRA (optional; bypassed)",
    "MuDI's gains come with a LoRA trained with Seg-Mix on both subjects together: train one with the "
    "workflow personalize_mudi_train_segmix_lora.json (Train Seg-Mix LoRA). Any DreamBooth / LoRA of your "
    "subjects works too.",
    "To use one: put it in ComfyUI/models/loras/, pick it in Load LoRA, un-bypass the node (select it, Ctrl+B) and "
    'write its identifiers into the prompt (e.g. "a photo of a olis cat and a hta dog ...").',
    "Without a LoRA the base model does not know your subjects' identity, but the composition still guides the "
    "layout: each subject starts where the collage puts it.",
])

NOTE_MUDI_SCORE = "\n\n".join([
    "The score: Detect-and-Compare (MuDI)",
    "Models, in ComfyUI/models/personalize_eval/ (README: the Model files table and the Detect-and-Compare "
    "Loader (MuDI) section): the folder owlv2-base-patch16-ensemble (every file of "
    "huggingface.co/google/owlv2-base-patch16-ensemble, run through transformers) and the folder dreamsim "
    "(DreamSim's v0.2.0 ensemble checkpoint, unzipped, with DINO's ViT-B/16 dino_vitbase16_pretrain.pth in "
    "dreamsim/checkpoints/).",
    "The subjects' names are the detector's text queries (\"cat\", \"dog\"); their references are the same photos "
    "as the subjects'. Threshold 0.4 as MuDI's demo.",
    "Where the score is: in the caption of the annotated image (D&C 0.xxx, with the boxes drawn), in the report "
    "(shown as text below) and in the matrices output (JSON: boxes, box-vs-subject and ground-truth matrices).",
])

# MuDI's Seg-Mix LoRA trained on the same cat + dog, then used through core's Load LoRA. The training settings
# are MuDI's (train_segmix_lora_sdxl.py: rank 32, lr 1e-4, Seg-Mix 0.3 at 0.75-1.0 scale, DCO beta 1000, 1024,
# batch 1, seed 42) except the steps: MuDI trains 2010, the example ships a short run. The phrases are MuDI's
# style (a rare word + the class). Sampling as the compose-and-score example: SDXL, euler, 30 steps, cfg 5.
MUDI_TRAIN = dict(
    stem="personalize_mudi_train_segmix_lora",
    checkpoint="sd_xl_base_1.0.safetensors",
    output_name="mudi_cat_dog",
    subjects=[("cat", "olis cat", "personalize_cat_04.jpg", "personalize_cat_04_mask.jpg"),
              ("dog", "hta dog", "personalize_dog6_02.jpg", "personalize_dog6_02_mask.jpg")],
    captions="a photo of {}",
    train=dict(steps=300, rank=32, learning_rate=1e-4, segmix_prob=0.3, scale_min=0.75, scale_max=1.0, loss="dco",
               dco_beta=1000.0, resolution=1024, batch_size=1, gradient_checkpointing=True, seed=42,
               validation_prompt="a photo of olis cat and hta dog, simple background", validate_every=100,
               checkpoint_every=100, gpus=1),
    mudi_steps=2010,
    prompt="a photo of olis cat and hta dog sitting together on a sofa",
    negative="monochrome, lowres, bad anatomy, worst quality, low quality",
    seed=42, steps=30, cfg=5.0, sampler="euler", scheduler="normal", size=1024,
)

NOTE_MUDI_TRAIN = "\n\n".join([
    "MuDI: train a Seg-Mix LoRA of two subjects, then use it (Personalize)",
    "Teaches the model the cat and the dog of the two photos as \"olis cat\" and \"hta dog\" with MuDI's Seg-Mix "
    "LoRA training, then generates \"a photo of olis cat and hta dog sitting together on a sofa\" with the trained "
    "file through core's Load LoRA. Everything runs in one queue: the training first, then the picture.",
    "1. Subjects: each Seg-Mix Dataset (MuDI) node takes the subject's photos, their masks (FreeCustom's masks, red "
    "channel), a placeholder phrase (a rare word and the class, as MuDI writes them) and the captions ('{}' is the "
    "phrase: \"a photo of olis cat\"); the identifier is the phrase's first word unless given. The two nodes are "
    "chained. One photo per subject keeps the example small; with your own subjects batch 3-10 photos per node "
    "(and as many masks).",
    "2. Training (see its note): Train Seg-Mix LoRA (MuDI) with MuDI's settings; the LoRA goes to "
    "ComfyUI/models/loras/mudi_cat_dog.safetensors. Its previews show the loss curve, the validation images and "
    "the report.",
    "3. Picture: the training node's lora_name output feeds Load LoRA (strength 1.0 / 1.0), so the sampler waits "
    "for the training and uses the new file; SDXL, euler, 30 steps, cfg 5, 1024x1024. Write the phrases into the "
    "prompt.",
    "Models: an SDXL checkpoint (sd_xl_base_1.0.safetensors or an SDXL fine-tune) in ComfyUI/models/checkpoints/. "
    "Nothing else to download: the LoRA is what this workflow makes.",
    "Inputs: the four example images ship in this pack's workflows/inputs/ folder; copy them into ComfyUI/input/ "
    "(tools/run_workflow.py does it for you). Credits and licenses: workflows/inputs/CREDITS.md.",
])

NOTE_MUDI_TRAIN_RUN = "\n\n".join([
    "The training run (MuDI's settings, a shorter run)",
    "MuDI's recipe: LoRA rank 32 on every attention projection of the UNet, AdamW at a constant 1e-4, Seg-Mix "
    "with probability 0.3 (a step trains on a collage of both cut-out subjects, \"a photo of a olis cat and a hta "
    "dog, simple background.\", the loss inside the subjects; scales 0.75-1.0), the DCO loss (beta 1000) instead "
    "of prior preservation, 1024 px, batch 1, seed 42. The example photos are 512 px and are upscaled to the "
    "training size; for your own subjects use photos of at least that size.",
    "MuDI trains 2010 steps. This example ships 300 so that a first try finishes; set steps to 2010 for MuDI's "
    "full run. Queueing again with the same output name and more steps continues from the last checkpoint "
    "(every 100 steps) instead of starting over.",
    "Time and memory: the training runs in a separate process (ComfyUI stays responsive; Cancel stops it at the "
    "next step). Every step runs SDXL's UNet forward and backward at 1024 px plus one forward without the LoRA "
    "for DCO, so it needs a CUDA GPU; gradient checkpointing (on) keeps the memory low at about 30 % more time. "
    "Count minutes to tens of minutes for 300 steps on a recent GPU and about 7x that for 2010. Out of memory: "
    "lower resolution to 768 or 512. Disk: the job folder ComfyUI/output/personalize_training/mudi_cat_dog/ holds "
    "a copy of the UNet weights (about 5 GB for SDXL), the checkpoints and the previews; delete it when done.",
    "Validation: every 100 steps the model as trained so far draws \"a photo of olis cat and hta dog, simple "
    "background\" (euler, 20 steps, cfg 5, at the training size); they appear in Validation images when the run "
    "ends and on the node while it runs. validate_every 0 turns them off (faster).",
])

NOTE_MUDI_TRAIN_USE = "\n\n".join([
    "Using the trained LoRA",
    "The file stays in ComfyUI/models/loras/ (mudi_cat_dog.safetensors): for later pictures select it in any "
    "Load LoRA and skip the training (delete or bypass the Train node and set Load LoRA's lora_name by hand). "
    "Queueing this workflow again with the same output name continues the same training (more steps) or, when "
    "it is complete, just writes the file again; to train with other settings or photos, give another output "
    "name.",
    "For MuDI's full inference, use the LoRA in the MuDI compose-and-score workflow "
    "(personalize_mudi_compose_and_score.json): its Mean-Shifted Noise adds MuDI's initialisation (each subject "
    "starts where the collage puts it) and Detect-and-Compare scores the result.",
])

class Graph:
    """A tiny UI-format graph builder: nodes with sockets from the live schema, links, order."""

    def __init__(self, schemas: dict, classes: dict):
        self.schemas, self.classes = schemas, classes
        self.nodes, self.links, self.groups = [], [], []

    def node(self, class_type, pos, size, title=None, **values):
        schema = self.schemas[class_type]
        widget_names = {n for n, kind, _ in rw.widget_slots(schema) if kind == "value"}
        unknown = set(values) - widget_names
        if unknown:
            raise ValueError(f"{class_type}: not widget inputs: {sorted(unknown)}")
        widgets = []
        for name, kind, opts in rw.widget_slots(schema):
            if kind == "value":
                if name not in values and "default" not in opts:
                    raise ValueError(f"{class_type}: no value for {name!r}")
                widgets.append(values.get(name, opts.get("default")))
            else:
                widgets.append({"control": "fixed", "filter": "", "upload": "image"}[kind])
        cls = self.classes[class_type]
        names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
        node = {
            "id": len(self.nodes) + 1, "type": class_type, "pos": list(pos), "size": list(size), "flags": {},
            "order": 0, "mode": 0,
            "inputs": [{"name": n, "localized_name": n, "type": str(t), "link": None}
                       for n, t, o in rw.ordered_inputs(schema) if not rw.is_widget(t, o)],
            # a list return type (a V1 combo: the live file list Train Seg-Mix LoRA gives its lora_name, so that
            # core LoraLoader's list-typed input validates) is a COMBO output in the editor
            "outputs": [{"name": str(n), "localized_name": str(n), "type": t if isinstance(t, str) else "COMBO",
                         "slot_index": i, "links": []}
                        for i, (n, t) in enumerate(zip(names, cls.RETURN_TYPES))],
            "properties": {"Node name for S&R": class_type},
            "widgets_values": widgets,
        }
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node

    def note(self, text, pos, size, title="Note"):
        node = {"id": len(self.nodes) + 1, "type": "Note", "pos": list(pos), "size": list(size), "flags": {},
                "order": 0, "mode": 0, "inputs": [], "outputs": [], "title": title, "properties": {},
                "widgets_values": [text], "color": "#432", "bgcolor": "#653"}
        self.nodes.append(node)
        return node

    def group(self, title, bounding, color="#3f789e"):
        """A titled box behind nodes: ``bounding`` is (x, y, width, height), its title bar inside the top."""
        self.groups.append({"id": len(self.groups) + 1, "title": title, "bounding": list(bounding),
                            "color": color, "font_size": 24, "flags": {}})

    def link(self, src, out_slot, dst, input_name):
        slot = next(i for i, inp in enumerate(dst["inputs"]) if inp["name"] == input_name)
        link_id = len(self.links) + 1
        typ = src["outputs"][out_slot]["type"]
        self.links.append([link_id, src["id"], out_slot, dst["id"], slot, typ])
        src["outputs"][out_slot]["links"].append(link_id)
        dst["inputs"][slot]["link"] = link_id

    def link_widget(self, src, out_slot, dst, widget_name):
        """Feed a widget input from a link (a widget converted to an input, as the editor saves it)."""
        typ = src["outputs"][out_slot]["type"]
        dst["inputs"].append({"name": widget_name, "localized_name": widget_name, "type": typ,
                              "widget": {"name": widget_name}, "link": None})
        self.link(src, out_slot, dst, widget_name)

    def to_json(self) -> dict:
        # "order" is a topological order of the nodes, as the frontend stores it
        deps = {n["id"]: {lk[1] for lk in self.links if lk[3] == n["id"]} for n in self.nodes}
        done = []
        while len(done) < len(self.nodes):
            ready = sorted(i for i, d in deps.items() if i not in done and d <= set(done))
            done += ready
        for n in self.nodes:
            n["order"] = done.index(n["id"])
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": self.groups, "config": {},
                "extra": {"ds": {"scale": 0.65, "offset": [40, 40]}}, "version": 0.4}


def _checkpoint_and_prompts(g, c, note: str, note_height: int, note_title: str):
    """Load Checkpoint, the read-me note and the two prompts: (checkpoint, positive, negative)."""
    ckpt = g.node("CheckpointLoaderSimple", (0, 0), (320, 98), "Load Checkpoint (SD1.5)", ckpt_name=c["checkpoint"])
    g.note(note, (0, 140), (320, note_height), title=note_title)
    pos = g.node("CLIPTextEncode", (380, 0), (400, 160), "Prompt", text=c["prompt"])
    neg = g.node("CLIPTextEncode", (380, 200), (400, 160), "Negative prompt (FreeCustom)", text=c["negative"])
    g.link(ckpt, 1, pos, "clip")
    g.link(ckpt, 1, neg, "clip")
    return ckpt, pos, neg


def _decode_and_save(g, ckpt, samples, at: tuple, below: int, save_size: tuple, prefix: str, title=None):
    """VAE Decode of ``samples`` (a node's first output) with the checkpoint's VAE (or, for a ``(node, slot)``
    pair, that output) at ``at``, and Save Image ``below`` px under it; returns the decode node (other nodes
    read the picture from it)."""
    vae = ckpt if isinstance(ckpt, tuple) else (ckpt, 2)
    decode = g.node("VAEDecode", at, (210, 50), None)
    g.link(samples, 0, decode, "samples")
    g.link(vae[0], vae[1], decode, "vae")
    save = g.node("SaveImage", (at[0], at[1] + below), save_size, title, filename_prefix=prefix)
    g.link(decode, 0, save, "images")
    return decode


def _sample_and_save(g, c, ckpt, model, pos, neg, x: int, sampler_title: str, prefix: str,
                     latent_at: tuple | None = None) -> None:
    """Empty latent (at ``latent_at``, default column ``x``), KSampler on the patched model, VAE Decode
    and Save Image, from column ``x``."""
    latent = g.node("EmptyLatentImage", latent_at or (x, 200), (320, 110), None, width=c["size"], height=c["size"],
                    batch_size=1)
    sampler = g.node("KSampler", (x + 400, 0), (320, 270), sampler_title, seed=c["seed"],
                     steps=c["steps"], cfg=c["cfg"], sampler_name=c["sampler"], scheduler=c["scheduler"],
                     denoise=1.0)
    g.link(model, 0, sampler, "model")
    g.link(pos, 0, sampler, "positive")
    g.link(neg, 0, sampler, "negative")
    g.link(latent, 0, sampler, "latent_image")
    _decode_and_save(g, ckpt, sampler, (x + 760, 0), 100, (520, 560), prefix)


def _reference_chain(g, c, clip: tuple, vae: tuple, top: int):
    """Per reference of ``c["refs"]`` (rows of 760 px from ``top``): Load Image, its mask (Load Image, red
    channel), the caption and Reference Encode (FreeCustom's mask weight, encoded at ``c["size"]``), chained.
    ``clip`` and ``vae`` are (node, output slot); returns the last Reference Encode."""
    refs = None
    for k, (subject, image, mask, caption) in enumerate(c["refs"]):
        y = top + k * 760
        img = g.node("LoadImage", (380, y), (300, 330), f"Reference {k + 1}: {subject}", image=image)
        msk = g.node("LoadImage", (380, y + 370), (300, 330), f"Reference {k + 1}: {subject} mask", image=mask)
        to_mask = g.node("ImageToMask", (720, y + 370), (260, 60), f"{subject} mask (red channel)", channel="red")
        cap = g.node("CLIPTextEncode", (720, y), (300, 110), f"Reference {k + 1} caption", text=caption)
        enc = g.node("PersonalizeReferenceEncode", (1060, y), (320, 260), f"Reference Encode: {subject}",
                     weight=3.0, mask_threshold=0.5, soft_mask=False, resolution=c["size"])
        g.link(msk, 0, to_mask, "image")
        g.link(clip[0], clip[1], cap, "clip")
        g.link(img, 0, enc, "image")
        g.link(vae[0], vae[1], enc, "vae")
        g.link(to_mask, 0, enc, "mask")
        g.link(cap, 0, enc, "caption")
        if refs is not None:
            g.link(refs, 0, enc, "references")
        refs = enc
    return refs


def freecustom_workflow(schemas: dict, classes: dict) -> dict:
    c = FREECUSTOM
    g = Graph(schemas, classes)
    ckpt, pos, neg = _checkpoint_and_prompts(g, c, NOTE, 620, "Read me: FreeCustom multi-reference")

    refs = _reference_chain(g, c, (ckpt, 1), (ckpt, 2), 420)
    mra = g.node("PersonalizeMultiReferenceAttention", (1440, 420), (340, 250), None,
                 layers="SD1.5 FreeCustom (output 6-11)", custom_blocks="output:6-11", start_percent=0.0,
                 end_percent=1.0, style_fidelity=1.0, seed=0)
    g.link(ckpt, 0, mra, "model")
    g.link(refs, 0, mra, "references")
    _sample_and_save(g, c, ckpt, mra, pos, neg, 1440, "KSampler (DDIM, as FreeCustom)", "personalize_freecustom")
    return g.to_json()


def freecustom_flux_workflow(schemas: dict, classes: dict) -> dict:
    """The FreeCustom example on FLUX.1 dev: core's split FLUX loaders, FluxGuidance, cfg 1."""
    c = FREECUSTOM_FLUX
    g = Graph(schemas, classes)
    unet = g.node("UNETLoader", (0, 0), (320, 82), "Load Diffusion Model (FLUX.1 dev)", unet_name=c["unet"],
                  weight_dtype="default")
    clip = g.node("DualCLIPLoader", (0, 130), (320, 130), "DualCLIPLoader (CLIP-L + T5-XXL)",
                  clip_name1=c["clip_l"], clip_name2=c["t5"], type="flux", device="default")
    vae = g.node("VAELoader", (0, 310), (320, 60), "Load VAE (FLUX ae)", vae_name=c["vae"])
    g.note(NOTE_FLUX, (0, 420), (320, 1400), title="Read me: MRSA on FLUX")
    pos = g.node("CLIPTextEncode", (380, 0), (400, 160), "Prompt", text=c["prompt"])
    guidance = g.node("FluxGuidance", (820, 0), (320, 60), None, guidance=c["guidance"])
    neg = g.node("CLIPTextEncode", (380, 200), (400, 120), "Negative prompt (ignored at cfg 1)", text=c["negative"])
    g.note(NOTE_FLUX_NEGATIVE, (820, 110), (400, 300), title="Read me: negative prompt and CFG")
    g.link(clip, 0, pos, "clip")
    g.link(pos, 0, guidance, "conditioning")
    g.link(clip, 0, neg, "clip")

    refs = _reference_chain(g, c, (clip, 0), (vae, 0), 560)
    mra = g.node("PersonalizeMultiReferenceAttention", (1440, 560), (340, 280), None, layers=c["layers"],
                 custom_blocks="output:6-11", start_percent=0.0, end_percent=1.0, style_fidelity=1.0, seed=0,
                 reference_positions=c["positions"])
    g.link(unet, 0, mra, "model")
    g.link(refs, 0, mra, "references")
    latent = g.node("EmptySD3LatentImage", (1440, 200), (320, 110), None, width=c["size"], height=c["size"],
                    batch_size=1)
    sampler = g.node("KSampler", (1840, 0), (320, 270), "KSampler (FLUX dev: cfg 1)", seed=c["seed"],
                     steps=c["steps"], cfg=c["cfg"], sampler_name=c["sampler"], scheduler=c["scheduler"],
                     denoise=1.0)
    g.link(mra, 0, sampler, "model")
    g.link(guidance, 0, sampler, "positive")
    g.link(neg, 0, sampler, "negative")
    g.link(latent, 0, sampler, "latent_image")
    _decode_and_save(g, (vae, 0), sampler, (2200, 0), 100, (520, 560), "personalize_freecustom_flux")
    return g.to_json()


def freemix_workflow(schemas: dict, classes: dict) -> dict:
    c = FREEMIX
    g = Graph(schemas, classes)
    ckpt, pos, neg = _checkpoint_and_prompts(g, c, NOTE_FREEMIX, 760, "Read me: FreeMix structure + appearance")
    sam = g.node("PersonalizeSAMModelLoader", (380, 400), (320, 82), "SAM Model Loader (ViT-B)", model_name=c["sam"],
                 device="auto")

    encoded = {}
    for k, (role, subject, image, caption, mode, points, box) in enumerate(c["refs"]):
        y = 540 + k * 560
        img = g.node("LoadImage", (380, y), (300, 330), f"{role.capitalize()} reference: {subject}", image=image)
        seg = g.node("PersonalizeSAMMask", (720, y), (320, 330), f"SAM mask: {subject} ({mode})", mode=mode,
                     points=points, negative_points="", box=box, units="pixels", multimask="auto", threshold=0.0,
                     grid=8, min_confidence=0.88)
        cap = g.node("CLIPTextEncode", (720, y + 370), (320, 110), f"{role.capitalize()} caption", text=caption)
        enc = g.node("PersonalizeReferenceEncode", (1080, y), (320, 260), f"Reference Encode: {role} ({subject})",
                     weight=3.0, mask_threshold=0.5, soft_mask=False, resolution=c["size"])
        g.link(sam, 0, seg, "sam")
        g.link(img, 0, seg, "image")
        g.link(ckpt, 1, cap, "clip")
        g.link(img, 0, enc, "image")
        g.link(ckpt, 2, enc, "vae")
        g.link(seg, 0, enc, "mask")
        g.link(cap, 0, enc, "caption")
        encoded[role] = enc

    dmsa = g.node("PersonalizeDisentangleMixingAttention", (1460, 400), (360, 520), None, prompt=c["prompt"],
                  blend_word=c["blend_word"], preset="SD1.5 FreeMix", structure_start=0.0, structure_end=1.0,
                  appearance_start=0.4, appearance_end=1.0, structure_phase=True, appearance_phase=True,
                  structure_weight=3.0, mask_threshold=0.2, spatial_norm_start=1.0, seed=0)
    g.link(ckpt, 0, dmsa, "model")
    g.link(encoded["structure"], 0, dmsa, "structure")
    g.link(encoded["appearance"], 0, dmsa, "appearance")
    g.link(ckpt, 1, dmsa, "clip")
    _sample_and_save(g, c, ckpt, dmsa, pos, neg, 1460, "KSampler (DDIM, as FreeMix)", "personalize_freemix")
    return g.to_json()


def mip_workflow(schemas: dict, classes: dict) -> dict:
    c = MIP
    g = Graph(schemas, classes)
    ckpt = g.node("CheckpointLoaderSimple", (0, 0), (320, 98), "Load Checkpoint (SDXL)", ckpt_name=c["checkpoint"])
    g.note(NOTE_MIP, (0, 140), (320, 900), title="Read me: MIP-Adapter multi-object")
    adapter = g.node("PersonalizeMIPAdapterLoader", (0, 1080), (320, 110), None, adapter_name=c["adapter"])
    vision = g.node("CLIPVisionLoader", (0, 1230), (320, 60), "Load CLIP Vision (ViT-bigG)", clip_name=c["clip_vision"])
    neg = g.node("CLIPTextEncode", (0, 1340), (320, 150), "Negative prompt (MIP-Adapter)", text=c["negative"])
    g.link(ckpt, 1, neg, "clip")
    for k, (prompt, objects) in enumerate(c["pairs"]):
        y = k * 760
        text = g.node("PrimitiveStringMultiline", (380, y), (400, 120), f"Prompt {k + 1}", value=prompt)
        pos = g.node("CLIPTextEncode", (380, y + 160), (400, 100), f"Prompt {k + 1} (CLIP Text Encode)", text=prompt)
        g.link(ckpt, 1, pos, "clip")
        g.link_widget(text, 0, pos, "text")
        chain = None
        for j, (entity, image) in enumerate(objects):
            img = g.node("LoadImage", (820 + j * 340, y), (300, 330), f"Row {k + 1}: {entity}", image=image)
            ref = g.node("PersonalizeMIPAdapterReference", (820 + j * 340, y + 370), (300, 170),
                         f"MIP-Adapter Reference: {entity}", entity=entity, weight=1.0, crop="center")
            g.link(img, 0, ref, "image")
            if chain is not None:
                g.link(chain, 0, ref, "image_prompts")
            chain = ref
        apply = g.node("PersonalizeMIPAdapterApply", (1520, y), (340, 300), f"MIP-Adapter Apply {k + 1}",
                       prompt=prompt, scale=c["scale"], start_percent=0.0, end_percent=1.0)
        g.link(ckpt, 0, apply, "model")
        g.link(adapter, 0, apply, "adapter")
        g.link(vision, 0, apply, "clip_vision")
        g.link(ckpt, 1, apply, "clip")
        g.link_widget(text, 0, apply, "prompt")
        g.link(chain, 0, apply, "image_prompts")
        latent = g.node("EmptyLatentImage", (1520, y + 360), (340, 110), None, width=c["size"], height=c["size"],
                        batch_size=1)
        sampler = g.node("KSampler", (1900, y), (320, 270), f"KSampler {k + 1} (as MIP-Adapter)", seed=c["seed"],
                         steps=c["steps"], cfg=c["cfg"], sampler_name=c["sampler"], scheduler=c["scheduler"],
                         denoise=1.0)
        g.link(apply, 0, sampler, "model")
        g.link(pos, 0, sampler, "positive")
        g.link(neg, 0, sampler, "negative")
        g.link(latent, 0, sampler, "latent_image")
        _decode_and_save(g, ckpt, sampler, (2260, y), 90, (420, 520), f"personalize_mip_{k + 1}")
    return g.to_json()


def freecure_workflow(schemas: dict, classes: dict) -> dict:
    c = FREECURE
    g = Graph(schemas, classes)
    ckpt = g.node("CheckpointLoaderSimple", (0, 0), (320, 98), "Load Checkpoint (SDXL)", ckpt_name=c["checkpoint"])
    g.note(NOTE_FREECURE, (0, 140), (320, 900), title="Read me: FreeCure with PhotoMaker")
    neg = g.node("CLIPTextEncode", (0, 1080), (320, 180), "Negative prompt", text=c["negative"])
    g.link(ckpt, 1, neg, "clip")
    found_text = g.node("PrimitiveStringMultiline", (380, 0), (400, 110), "Foundation prompt (no trigger word)",
                        value=c["foundation"])
    found = g.node("CLIPTextEncode", (380, 150), (400, 100), "Foundation prompt (CLIP Text Encode)",
                   text=c["foundation"])
    g.link(ckpt, 1, found, "clip")
    g.link_widget(found_text, 0, found, "text")
    latent = g.node("EmptyLatentImage", (380, 300), (400, 110), None, width=c["size"], height=c["size"], batch_size=1)
    # pass 1: the foundation image and its attribute masks
    k1 = g.node("KSampler", (820, 0), (320, 270), "Pass 1: foundation (KSampler)", seed=c["seed"], steps=c["steps"],
                cfg=c["cfg"], sampler_name=c["sampler"], scheduler=c["scheduler"], denoise=1.0)
    g.link(ckpt, 0, k1, "model")
    g.link(found, 0, k1, "positive")
    g.link(neg, 0, k1, "negative")
    g.link(latent, 0, k1, "latent_image")
    d1 = _decode_and_save(g, ckpt, k1, (1180, 0), 90, (360, 420), "personalize_freecure_foundation",
                          "Foundation image")
    mask = g.node("PersonalizeFaceAttributeMask", (1580, 0), (340, 330), None, attributes="from prompt",
                  provider="mediapipe", faces="largest", if_no_face="error", grow=0, prompt=c["foundation"])
    g.link(d1, 0, mask, "image")
    g.link_widget(found_text, 0, mask, "prompt")
    preview = g.node("PreviewImage", (1960, 0), (360, 420), "Attribute mask preview")
    g.link(mask, 1, preview, "images")
    # pass 2: PhotoMaker with FASA
    y = 620
    loader = g.node("PhotoMakerLoader", (380, y), (400, 60), None, photomaker_model_name=c["photomaker"])
    face = g.node("LoadImage", (380, y + 100), (400, 380), "Identity photo", image=c["id_image"])
    enc = g.node("PhotoMakerEncode", (820, y), (400, 200), "PhotoMaker Encode (prompt with trigger word)",
                 text=c["prompt"])
    g.link(loader, 0, enc, "photomaker")
    g.link(face, 0, enc, "image")
    g.link(ckpt, 1, enc, "clip")
    fasa = g.node("PersonalizeFoundationAwareAttention", (1260, y), (360, 330), None,
                  foundation_mode="prompt without identity (PhotoMaker)", weight=c["weight"],
                  layers="SDXL FreeCure (output 1.6-9, 2-5)", custom_blocks="output:6-11", start_percent=0.0,
                  end_percent=1.0, mask_threshold=0.5)
    g.link(ckpt, 0, fasa, "model")
    g.link(mask, 0, fasa, "masks")
    g.link(found, 0, fasa, "foundation")
    k2 = g.node("KSampler", (1660, y), (320, 270), "Pass 2: PhotoMaker + FASA (same seed)", seed=c["seed"],
                steps=c["steps"], cfg=c["cfg"], sampler_name=c["sampler"], scheduler=c["scheduler"], denoise=1.0)
    g.link(fasa, 0, k2, "model")
    g.link(enc, 0, k2, "positive")
    g.link(neg, 0, k2, "negative")
    g.link(latent, 0, k2, "latent_image")
    _decode_and_save(g, ckpt, k2, (2020, y), 90, (420, 520), "personalize_freecure")
    return g.to_json()


def mudi_workflow(schemas: dict, classes: dict) -> dict:
    c = MUDI
    g = Graph(schemas, classes)
    # left: checkpoint, the optional LoRA (bypassed) and the notes
    ckpt = g.node("CheckpointLoaderSimple", (0, 0), (340, 98), "Load Checkpoint (SDXL)", ckpt_name=c["checkpoint"])
    lora = g.node("LoraLoader", (0, 150), (340, 130), "Load LoRA: your subjects' LoRA (bypassed)",
                  lora_name=c["lora"], strength_model=1.0, strength_clip=1.0)
    lora["mode"] = 4                                   # bypassed: MODEL and CLIP pass through unchanged
    g.link(ckpt, 0, lora, "model")
    g.link(ckpt, 1, lora, "clip")
    g.note(NOTE_MUDI_LORA, (0, 330), (340, 330), title="Read me: the subjects' LoRA (optional)")
    g.note(NOTE_MUDI, (0, 710), (340, 1000), title="Read me: MuDI compose and score")

    # 1. the subjects and their collage
    g.group("1. Subjects: photo + mask, composed (MuDI)", (380, -75, 1380, 1075))
    photos, subjects = {}, None
    for k, (name, image, mask) in enumerate(c["refs"]):
        y = k * 520
        img = g.node("LoadImage", (400, y), (300, 330), f"Subject {k + 1}: {name}", image=image)
        msk = g.node("LoadImage", (730, y), (300, 330), f"Subject {k + 1}: {name} mask", image=mask)
        to_mask = g.node("ImageToMask", (730, y + 380), (300, 60), f"{name} mask (red channel)", channel="red")
        subj = g.node("PersonalizeSubject", (1060, y), (300, 100), f"Subject (MuDI): {name}", name=name)
        g.link(msk, 0, to_mask, "image")
        g.link(img, 0, subj, "image")
        g.link(to_mask, 0, subj, "mask")
        if subjects is not None:
            g.link(subjects, 0, subj, "subjects")
        photos[name], subjects = img, subj
    comp = g.node("PersonalizeSubjectComposer", (1400, 0), (340, 330), None, width=c["size"], height=c["size"],
                  placement="random", scale_min=0.75, scale_max=1.0, max_overlap=0.0, background="white",
                  seed=c["compose_seed"], margin=32)
    g.link(subjects, 0, comp, "subjects")
    shown = g.node("PreviewImage", (1400, 380), (340, 400), "Composed subjects (preview)")
    g.link(comp, 0, shown, "images")

    # 2. mean-shifted noise and sampling with core nodes
    g.group("2. Mean-shifted noise + sampling (SDXL, core nodes)", (1800, -75, 1380, 1075))
    pos = g.node("CLIPTextEncode", (1820, 0), (400, 150), "Prompt", text=c["prompt"])
    neg = g.node("CLIPTextEncode", (1820, 200), (400, 150), "Negative prompt", text=c["negative"])
    noise = g.node("PersonalizeMeanShiftedNoise", (1820, 400), (400, 200), None, noise_seed=c["seed"])
    latent = g.node("EmptyLatentImage", (1820, 650), (400, 110), "Empty Latent Image (the size: as the canvas)",
                    width=c["size"], height=c["size"], batch_size=1)
    guider = g.node("CFGGuider", (2260, 0), (320, 100), None, cfg=c["cfg"])
    sampler = g.node("KSamplerSelect", (2260, 150), (320, 60), None, sampler_name=c["sampler"])
    sigmas = g.node("BasicScheduler", (2260, 260), (320, 110), None, scheduler=c["scheduler"], steps=c["steps"],
                    denoise=1.0)
    for clip_user in (pos, neg):
        g.link(lora, 1, clip_user, "clip")
    g.link(lora, 0, noise, "model")
    g.link(comp, 0, noise, "image")
    g.link(ckpt, 2, noise, "vae")
    g.link(comp, 1, noise, "masks")
    g.link(lora, 0, guider, "model")
    g.link(pos, 0, guider, "positive")
    g.link(neg, 0, guider, "negative")
    g.link(lora, 0, sigmas, "model")
    run = g.node("SamplerCustomAdvanced", (2620, 0), (320, 130), None)
    g.link(noise, 0, run, "noise")
    g.link(guider, 0, run, "guider")
    g.link(sampler, 0, run, "sampler")
    g.link(sigmas, 0, run, "sigmas")
    g.link(latent, 0, run, "latent_image")
    decode = _decode_and_save(g, ckpt, run, (2620, 180), 100, (520, 560), "personalize_mudi")

    # 3. the score
    g.group("3. Score: Detect-and-Compare (MuDI)", (3220, -75, 960, 1075))
    models = g.node("PersonalizeDetectCompareLoader", (3240, 0), (360, 82), None)
    chain = None
    for k, (name, _, _) in enumerate(c["refs"]):
        ref = g.node("PersonalizeDetectCompareSubject", (3240, 130 + k * 130), (360, 80), f"D&C Subject: {name}",
                     name=name)
        g.link(photos[name], 0, ref, "reference_images")
        if chain is not None:
            g.link(chain, 0, ref, "subjects")
        chain = ref
    g.note(NOTE_MUDI_SCORE, (3240, 420), (360, 520), title="Read me: the score")
    score = g.node("PersonalizeDetectCompare", (3640, 0), (340, 110), None, threshold=c["threshold"])
    g.link(models, 0, score, "dc_models")
    g.link(decode, 0, score, "images")
    g.link(chain, 0, score, "subjects")
    annotated = g.node("PreviewImage", (3640, 160), (520, 560), "Annotated (score in the caption)")
    g.link(score, 1, annotated, "images")
    report = g.node("PreviewAny", (3640, 770), (520, 200), "D&C report")
    g.link(score, 2, report, "source")
    return g.to_json()


def mudi_train_workflow(schemas: dict, classes: dict) -> dict:
    c = MUDI_TRAIN
    g = Graph(schemas, classes)
    ckpt = g.node("CheckpointLoaderSimple", (0, 0), (340, 98), "Load Checkpoint (SDXL)", ckpt_name=c["checkpoint"])
    g.note(NOTE_MUDI_TRAIN, (0, 140), (340, 1160), title="Read me: MuDI Seg-Mix LoRA training")

    # 1. the subjects: photo + mask + phrase, chained
    g.group("1. Subjects: Seg-Mix Dataset (MuDI)", (380, -75, 1060, 1075))
    dataset = None
    for k, (name, phrase, image, mask) in enumerate(c["subjects"]):
        y = k * 520
        img = g.node("LoadImage", (400, y), (300, 330), f"Subject {k + 1}: {name}", image=image)
        msk = g.node("LoadImage", (730, y), (300, 330), f"Subject {k + 1}: {name} mask", image=mask)
        to_mask = g.node("ImageToMask", (730, y + 380), (300, 60), f"{name} mask (red channel)", channel="red")
        ds = g.node("PersonalizeSegMixDataset", (1060, y), (360, 230), f"Seg-Mix Dataset (MuDI): {phrase}",
                    phrase=phrase, captions=c["captions"])
        g.link(msk, 0, to_mask, "image")
        g.link(img, 0, ds, "images")
        g.link(to_mask, 0, ds, "masks")
        if dataset is not None:
            g.link(dataset, 0, ds, "dataset")
        dataset = ds

    # 2. the training and its previews
    t = c["train"]
    g.group("2. Train the Seg-Mix LoRA (MuDI's settings, a shorter run)", (1480, -75, 900, 1375))
    train = g.node("PersonalizeTrainSegMixLoRA", (1500, 0), (400, 640),
                   f"Train Seg-Mix LoRA (MuDI): {t['steps']} steps (MuDI: {c['mudi_steps']})",
                   output_name=c["output_name"], **t)
    g.link(ckpt, 0, train, "model")
    g.link(ckpt, 1, train, "clip")
    g.link(ckpt, 2, train, "vae")
    g.link(dataset, 0, train, "dataset")
    g.note(NOTE_MUDI_TRAIN_RUN, (1500, 690), (400, 590), title="Read me: the training run")
    curve = g.node("PreviewImage", (1940, 0), (420, 300), "Loss curve")
    g.link(train, 2, curve, "images")
    shown = g.node("PreviewImage", (1940, 340), (420, 460), "Validation images")
    g.link(train, 3, shown, "images")
    report = g.node("PreviewAny", (1940, 840), (420, 200), "Training report")
    g.link(train, 4, report, "source")

    # 3. the picture with the trained file, core nodes only
    g.group("3. Generate with the trained LoRA (core nodes)", (2420, -75, 1360, 1375))
    lora = g.node("LoraLoader", (2440, 0), (400, 130), "Load LoRA: the trained file",
                  lora_name=f"{c['output_name']}.safetensors", strength_model=1.0, strength_clip=1.0)
    g.link(ckpt, 0, lora, "model")
    g.link(ckpt, 1, lora, "clip")
    g.link_widget(train, 0, lora, "lora_name")
    pos = g.node("CLIPTextEncode", (2440, 180), (400, 150), "Prompt", text=c["prompt"])
    neg = g.node("CLIPTextEncode", (2440, 370), (400, 150), "Negative prompt", text=c["negative"])
    g.link(lora, 1, pos, "clip")
    g.link(lora, 1, neg, "clip")
    g.note(NOTE_MUDI_TRAIN_USE, (2440, 720), (400, 380), title="Read me: using the trained LoRA")
    _sample_and_save(g, c, ckpt, lora, pos, neg, 2480, "KSampler (SDXL)", "personalize_mudi_lora",
                     latent_at=(2440, 560))
    return g.to_json()


def prepare_inputs(data_dir: Path) -> None:
    from PIL import Image
    INPUTS.mkdir(parents=True, exist_ok=True)
    for image, mask, out_image, out_mask in INPUT_SOURCES:
        for src, dst, mode in ((image, out_image, "RGB"), (mask, out_mask, "L")):
            im = Image.open(data_dir / src).convert(mode)
            scale = 512 / max(im.size)
            im = im.resize((round(im.width * scale), round(im.height * scale)), Image.LANCZOS)
            im.save(INPUTS / dst, quality=92)
    for src, dst in MIP_SOURCES:
        im = Image.open(data_dir / src).convert("RGB")
        scale = 512 / max(im.size)
        im.resize((round(im.width * scale), round(im.height * scale)), Image.LANCZOS).save(INPUTS / dst, quality=92)
    try:                                  # NASA's public-domain astronaut portrait, shipped in scikit-image
        import skimage.data
        Image.fromarray(skimage.data.astronaut()).save(INPUTS / FREECURE["id_image"], quality=92)
    except ImportError:
        print("scikit-image is not installed: the FreeCure example's identity photo was not written")
    (INPUTS / "licenses").mkdir(exist_ok=True)
    for rel in LICENSE_FILES:
        shutil.copyfile(data_dir / rel, INPUTS / "licenses" / Path(rel).name)


def _card(title: str):
    """The 400x300 card with its title; returns (image, draw, font)."""
    from PIL import Image, ImageDraw, ImageFont

    card = Image.new("RGB", (400, 300), (30, 32, 38))
    d = ImageDraw.Draw(card)
    font = lambda s: ImageFont.load_default(size=s)  # noqa: E731
    d.text((12, 9), title, fill=(240, 240, 240), font=font(18))
    d.text((12, 32), "Personalize node pack - illustrative card", fill=(150, 155, 165), font=font(11))
    return card, d, font


def _reference_tile(d, font, k: int, tint, caption: str):
    """Caption and connector of the k-th reference tile (the tile itself is pasted by the caller)."""
    x, y = 12, 54 + k * 122
    d.text((x + 4, y + 88), caption, fill=(255, 255, 255), font=font(11), stroke_width=2, stroke_fill=(0, 0, 0))
    end = (146, 80 + 12 * k)
    d.line((x + 108, y + 52, *end), fill=tint, width=2)
    d.ellipse((end[0] - 3, end[1] - 3, end[0] + 3, end[1] + 3), fill=tint)


def _node_chain(d, font, boxes, prompt_lines) -> None:
    """Three node boxes joined by arrows, then the prompt."""
    for (title, sub), y in zip(boxes, (66, 126, 186)):
        d.rounded_rectangle((148, y, 388, y + 44), radius=6, fill=(52, 56, 66), outline=(120, 125, 140))
        d.text((156, y + 5), title, fill=(240, 240, 240), font=font(14))
        d.text((156, y + 25), sub, fill=(170, 175, 185), font=font(11))
        if y > 66:
            d.line((268, y - 16, 268, y - 1), fill=(200, 200, 200), width=2)
            d.polygon([(263, y - 7), (273, y - 7), (268, y - 1)], fill=(200, 200, 200))
    d.text((148, 240), "prompt (then VAE Decode, Save Image):", fill=(150, 155, 165), font=font(11))
    for i, line in enumerate(prompt_lines):
        d.text((148, 254 + 17 * i), line, fill=(255, 230, 160), font=font(13))


def thumbnail(path: Path) -> None:
    """An honest illustrative card (no generated image): the references with their masks tinted,
    the nodes they go through and the prompt."""
    card, d, font = _card("FreeCustom multi-reference")
    _masked_references(card, d, font, FREECUSTOM["refs"])
    _node_chain(d, font, [("Reference Encode", "image + mask + caption, x2"),
                          ("Multi-Reference Attention", "FreeCustom MRSA, output 6-11"),
                          ("KSampler", "DDIM 50 steps, cfg 7.5")],
                ['"a cat and a dog sitting', ' together on a sofa"'])
    card.save(path, quality=90)


def _masked_references(card, d, font, refs) -> None:
    """The FreeCustom references as tiles: the subject tinted inside its mask, the rest darkened."""
    from PIL import Image

    tints = [(255, 150, 60), (80, 170, 255)]
    for k, (subject, image, mask, caption) in enumerate(refs):
        im = Image.open(INPUTS / image).convert("RGB").resize((104, 104), Image.LANCZOS)
        m = Image.open(INPUTS / mask).convert("L").resize((104, 104), Image.BILINEAR)
        tinted = Image.blend(im, Image.new("RGB", im.size, tints[k]), 0.45)
        dark = Image.blend(im, Image.new("RGB", im.size, (0, 0, 0)), 0.7)
        x, y = 12, 54 + k * 122
        card.paste(Image.composite(tinted, dark, m.point(lambda v: 255 if v > 127 else 0)), (x, y))
        d.rectangle((x - 1, y - 1, x + 104, y + 104), outline=tints[k])
        _reference_tile(d, font, k, tints[k], caption)


def thumbnail_flux(path: Path) -> None:
    """An honest illustrative card (no generated image): the FreeCustom references with their masks
    tinted, the FLUX nodes they go through and the prompt."""
    c = FREECUSTOM_FLUX
    card, d, font = _card("FreeCustom MRSA on FLUX")
    _masked_references(card, d, font, c["refs"])
    _node_chain(d, font, [("Reference Encode", "image + mask + caption, x2"),
                          ("Multi-Reference Attention", "FLUX single blocks, side by side"),
                          ("KSampler (FLUX.1 dev)", f"{c['steps']} steps, cfg 1, guidance {c['guidance']}")],
                ['"a cat and a dog sitting', ' together on a sofa"'])
    card.save(path, quality=90)


def _parse_nums(text):
    return [float(v) for part in text.split(";") if part.strip() for v in part.split(",")]


def thumbnail_freemix(path: Path) -> None:
    """An honest illustrative card (no generated or segmented image): the two references with the SAM
    prompts the workflow uses drawn on them, the nodes they go through and the prompt."""
    from PIL import Image

    card, d, font = _card("FreeMix structure + appearance")
    tints = [(80, 170, 255), (255, 150, 60)]
    side = 104
    for k, (role, subject, image, caption, mode, points, box) in enumerate(FREEMIX["refs"]):
        im = Image.open(INPUTS / image).convert("RGB")
        s = side / max(im.size)
        im = im.resize((side, side), Image.LANCZOS)
        x, y = 12, 54 + k * 122
        card.paste(im, (x, y))
        x0, y0, x1, y1 = (v * s for v in _parse_nums(box))
        d.rectangle((x + x0, y + y0, x + min(x1, side - 1), y + min(y1, side - 1)), outline=tints[k], width=2)
        pts = _parse_nums(points)
        for px, py in zip(pts[::2], pts[1::2]):
            cx, cy = x + px * s, y + py * s
            d.ellipse((cx - 4, cy - 4, cx + 4, cy + 4), fill=(60, 220, 90), outline=(0, 0, 0))
        _reference_tile(d, font, k, tints[k], f"{role}: {caption}")
    _node_chain(d, font, [("SAM Mask + Reference Encode", "box / points + box prompts, x2"),
                          ("Disentangle-Mixing Attention", "FreeMix DMSA, blend word \"dog\""),
                          ("KSampler", "DDIM 50 steps, cfg 7.5, seed 500")],
                ['"a photo of a dog', ' in the grass"'])
    card.save(path, quality=90)


def thumbnail_mip(path: Path) -> None:
    """An honest illustrative card (no generated image): the three reference pairs with their entity
    words, the nodes they go through and the prompts."""
    from PIL import Image

    card, d, font = _card("MIP-Adapter: several objects")
    tints = [(255, 150, 60), (80, 170, 255)]
    side = 64
    for k, (prompt, objects) in enumerate(MIP["pairs"]):
        y = 52 + k * 74
        for j, (entity, image) in enumerate(objects):
            x = 12 + j * (side + 6)
            im = Image.open(INPUTS / image).convert("RGB").resize((side, side), Image.LANCZOS)
            card.paste(im, (x, y))
            d.rectangle((x - 1, y - 1, x + side, y + side), outline=tints[j])
            d.text((x + 3, y + side - 15), entity, fill=(255, 255, 255), font=font(11), stroke_width=2,
                   stroke_fill=(0, 0, 0))
        words = prompt.rstrip(".").split()
        lines = [" ".join(words[:4]), " ".join(words[4:8]), " ".join(words[8:])]
        for i, line in enumerate(filter(None, lines)):
            d.text((156, y + 6 + 16 * i), line, fill=(255, 230, 160), font=font(12))
    d.text((12, 276), "MIP-Adapter Reference x2  >  MIP-Adapter Apply  >  KSampler (SDXL, 30 steps, cfg 5)",
           fill=(170, 175, 185), font=font(10))
    card.save(path, quality=90)


def thumbnail_freecure(path: Path) -> None:
    """An honest illustrative card (no generated image): the identity photo, the two passes and the prompt."""
    from PIL import Image

    card, d, font = _card("FreeCure + PhotoMaker")
    im = Image.open(INPUTS / FREECURE["id_image"]).convert("RGB").resize((104, 104), Image.LANCZOS)
    card.paste(im, (12, 54))
    d.rectangle((11, 53, 116, 158), outline=(255, 150, 60))
    _reference_tile(d, font, 0, (255, 150, 60), "identity photo")
    d.text((14, 176), "masks are made on", fill=(170, 175, 185), font=font(11))
    d.text((14, 190), "the foundation image", fill=(170, 175, 185), font=font(11))
    _node_chain(d, font, [("Pass 1: foundation", "same seed, no identity"),
                          ("Face Attribute Mask", "eyes, lips (MediaPipe)"),
                          ("Pass 2: Foundation-Aware Attn", "PhotoMaker + FASA, weight 1.5")],
                ['"... with bright green eyes', ' and red lipstick"'])
    card.save(path, quality=90)


def thumbnail_mudi(path: Path) -> None:
    """An honest illustrative card (no generated image): the two subjects cut out by their masks, as the
    Subject nodes see them, the nodes they go through and the prompt."""
    from PIL import Image

    card, d, font = _card("MuDI: compose, sample, score")
    tints = [(255, 150, 60), (80, 170, 255)]
    for k, (name, image, mask) in enumerate(MUDI["refs"]):
        im = Image.open(INPUTS / image).convert("RGB").resize((104, 104), Image.LANCZOS)
        m = Image.open(INPUTS / mask).convert("L").resize((104, 104), Image.BILINEAR)
        x, y = 12, 54 + k * 122
        card.paste(Image.composite(im, Image.new("RGB", im.size, (255, 255, 255)),
                                   m.point(lambda v: 255 if v > 127 else 0)), (x, y))
        d.rectangle((x - 1, y - 1, x + 104, y + 104), outline=tints[k])
        _reference_tile(d, font, k, tints[k], f"{name} (cut out)")
    _node_chain(d, font, [("Subject x2 > Composer", f"cut-outs on white, {MUDI['size']}x{MUDI['size']}"),
                          ("Mean-Shifted Noise", "start noise shifted to the collage"),
                          ("Sample > Detect-and-Compare", "SDXL 30 steps; OWLv2 + DreamSim")],
                ['"a cat and a dog sitting', ' together on a sofa"'])
    card.save(path, quality=90)


def thumbnail_mudi_train(path: Path) -> None:
    """An honest illustrative card (no generated image): the two subjects cut out by their masks with
    their phrases, the nodes they go through and the prompt."""
    from PIL import Image

    c = MUDI_TRAIN
    card, d, font = _card("MuDI: train a Seg-Mix LoRA")
    tints = [(255, 150, 60), (80, 170, 255)]
    for k, (name, phrase, image, mask) in enumerate(c["subjects"]):
        im = Image.open(INPUTS / image).convert("RGB").resize((104, 104), Image.LANCZOS)
        m = Image.open(INPUTS / mask).convert("L").resize((104, 104), Image.BILINEAR)
        x, y = 12, 54 + k * 122
        card.paste(Image.composite(im, Image.new("RGB", im.size, (255, 255, 255)),
                                   m.point(lambda v: 255 if v > 127 else 0)), (x, y))
        d.rectangle((x - 1, y - 1, x + 104, y + 104), outline=tints[k])
        _reference_tile(d, font, k, tints[k], f'"{phrase}"')
    t = c["train"]
    _node_chain(d, font, [("Seg-Mix Dataset x2", "photo + mask + phrase, chained"),
                          ("Train Seg-Mix LoRA", f"SDXL, {t['steps']} steps (MuDI: {c['mudi_steps']})"),
                          ("Load LoRA > KSampler", "core nodes, the trained file")],
                ['"a photo of olis cat and hta dog', ' sitting together on a sofa"'])
    card.save(path, quality=90)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", help="ComfyUI install (default: $COMFYUI_PATH)")
    parser.add_argument("--inputs-from", type=Path,
                        help="shared data folder to (re)make workflows/inputs/ from (dreambench/, freecustom_masks/, "
                             "mip_adapter_combinations/)")
    a = parser.parse_args()
    if a.inputs_from:
        prepare_inputs(a.inputs_from)

    rw.import_comfyui(rw.find_comfyui(a.comfyui))
    asyncio.run(rw.ensure_nodes())
    import nodes
    classes = nodes.NODE_CLASS_MAPPINGS
    types = ["CheckpointLoaderSimple", "CLIPTextEncode", "LoadImage", "ImageToMask", "PersonalizeReferenceEncode",
             "PersonalizeMultiReferenceAttention", "EmptyLatentImage", "KSampler", "VAEDecode", "SaveImage",
             "PersonalizeSAMModelLoader", "PersonalizeSAMMask", "PersonalizeDisentangleMixingAttention",
             "PersonalizeMIPAdapterLoader", "PersonalizeMIPAdapterReference", "PersonalizeMIPAdapterApply",
             "CLIPVisionLoader", "PrimitiveStringMultiline", "PersonalizeFoundationAwareAttention",
             "PersonalizeFaceAttributeMask", "PhotoMakerLoader", "PhotoMakerEncode", "PreviewImage",
             "LoraLoader", "PersonalizeSubject", "PersonalizeSubjectComposer", "PersonalizeMeanShiftedNoise",
             "CFGGuider", "KSamplerSelect", "BasicScheduler", "SamplerCustomAdvanced", "PersonalizeDetectCompareLoader",
             "PersonalizeDetectCompareSubject", "PersonalizeDetectCompare", "PreviewAny",
             "PersonalizeSegMixDataset", "PersonalizeTrainSegMixLoRA", "UNETLoader", "DualCLIPLoader", "VAELoader",
             "FluxGuidance", "EmptySD3LatentImage"]
    schemas = rw.live_schemas(types)
    ks = schemas["KSampler"]["required"]   # fall back to euler/normal where DDIM is missing
    for c in (FREECUSTOM, FREEMIX, MIP, FREECURE, MUDI, MUDI_TRAIN, FREECUSTOM_FLUX):
        if c["sampler"] not in ks["sampler_name"][0]:
            c["sampler"] = "euler"
        if c["scheduler"] not in ks["scheduler"][0]:
            c["scheduler"] = "normal"
    for c, build, card in ((FREECUSTOM, freecustom_workflow, thumbnail), (FREEMIX, freemix_workflow, thumbnail_freemix),
                           (MIP, mip_workflow, thumbnail_mip), (FREECURE, freecure_workflow, thumbnail_freecure),
                           (MUDI, mudi_workflow, thumbnail_mudi),
                           (MUDI_TRAIN, mudi_train_workflow, thumbnail_mudi_train),
                           (FREECUSTOM_FLUX, freecustom_flux_workflow, thumbnail_flux)):
        out = WORKFLOWS / f"{c['stem']}.json"
        out.write_text(json.dumps(build(schemas, classes), indent=2) + "\n", encoding="utf-8")
        card(WORKFLOWS / f"{c['stem']}.jpg")
        print(f"wrote {out} and its thumbnail")
    return 0


if __name__ == "__main__":
    sys.exit(main())
