"""The shipped workflows' thumbnails: honest illustrative cards (no generated image) drawn with PIL from the
example inputs: the references, the nodes they go through and the prompt."""
from __future__ import annotations

from pathlib import Path

from .settings import (FREECURE, FREECUSTOM, FREECUSTOM_FLUX, FREEMIX, INPUTS, MIP, MUDI, MUDI_TRAIN, NATIVE_FLUX2,
                       NATIVE_QWEN, WORLD_FREECUSTOM, WORLD_FREEMIX, WORLD_MUDI)


def _card(title: str):
    """The 400x300 card with its title; returns (image, draw, font)."""
    from PIL import Image, ImageDraw, ImageFont

    card = Image.new("RGB", (400, 300), (30, 32, 38))
    d = ImageDraw.Draw(card)
    font = lambda s: ImageFont.load_default(size=s)
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


def _masked_references(card, d, font, refs, tint: float = 0.45) -> None:
    """The FreeCustom references as tiles: the subject tinted inside its mask (by ``tint``: 0 shows its own
    colours), the rest darkened."""
    from PIL import Image

    tints = [(255, 150, 60), (80, 170, 255)]
    for k, (subject, image, mask, caption) in enumerate(refs):
        im = Image.open(INPUTS / image).convert("RGB").resize((104, 104), Image.LANCZOS)
        m = Image.open(INPUTS / mask).convert("L").resize((104, 104), Image.BILINEAR)
        tinted = Image.blend(im, Image.new("RGB", im.size, tints[k]), tint)
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
    card, d, font = _card("MuDI: compose, sample, score")
    _cut_outs(card, d, font, [(image, mask, f"{name} (cut out)") for name, image, mask in MUDI["refs"]])
    _node_chain(d, font, [("Subject x2 > Composer", f"cut-outs on white, {MUDI['size']}x{MUDI['size']}"),
                          ("Mean-Shifted Noise", "start noise shifted to the collage"),
                          ("Sample > Detect-and-Compare", "SDXL 30 steps; OWLv2 + DreamSim")],
                ['"a cat and a dog sitting', ' together on a sofa"'])
    card.save(path, quality=90)


def thumbnail_mudi_train(path: Path) -> None:
    """An honest illustrative card (no generated image): the two subjects cut out by their masks with
    their phrases, the nodes they go through and the prompt."""
    c = MUDI_TRAIN
    card, d, font = _card("MuDI: train a Seg-Mix LoRA")
    _cut_outs(card, d, font, [(image, mask, f'"{phrase}"') for name, phrase, image, mask in c["subjects"]])
    t = c["train"]
    _node_chain(d, font, [("Seg-Mix Dataset x2", "photo + mask + phrase, chained"),
                          ("Train Seg-Mix LoRA", f"SDXL, {t['steps']} steps (MuDI: {c['mudi_steps']})"),
                          ("Load LoRA > KSampler", "core nodes, the trained file")],
                ['"a photo of olis cat and hta dog', ' sitting together on a sofa"'])
    card.save(path, quality=90)


def _cut_outs(card, d, font, items) -> None:
    """Subject tiles: each (image, mask, caption) cut out by its mask onto white, as the Subject nodes see it."""
    from PIL import Image

    tints = [(255, 150, 60), (80, 170, 255)]
    for k, (image, mask, caption) in enumerate(items):
        im = Image.open(INPUTS / image).convert("RGB").resize((104, 104), Image.LANCZOS)
        m = Image.open(INPUTS / mask).convert("L").resize((104, 104), Image.BILINEAR)
        x, y = 12, 54 + k * 122
        card.paste(Image.composite(im, Image.new("RGB", im.size, (255, 255, 255)),
                                   m.point(lambda v: 255 if v > 127 else 0)), (x, y))
        d.rectangle((x - 1, y - 1, x + 104, y + 104), outline=tints[k])
        _reference_tile(d, font, k, tints[k], caption)


def _world_sampling(c: dict) -> str:
    return f"world model, {c['steps']} steps, cfg {c['cfg']:g}"


def thumbnail_world_freecustom(path: Path) -> None:
    """An honest illustrative card (no generated image): the world's two references with their masks tinted,
    the nodes they go through and the prompt that names only the shapes."""
    c = WORLD_FREECUSTOM
    card, d, font = _card("World: FreeCustom MRSA (no download)")
    _masked_references(card, d, font, c["refs"], tint=0.0)
    _node_chain(d, font, [("Reference Encode", "image + mask + caption, x2"),
                          ("Multi-Reference Attention", "FreeCustom MRSA, output 6-11"),
                          ("KSampler", _world_sampling(c))],
                [f'"{c["prompt"]}"'])
    card.save(path, quality=90)


def thumbnail_world_freemix(path: Path) -> None:
    """An honest illustrative card (no generated image): the world's structure and appearance references with
    their masks tinted, the nodes they go through and the prompt."""
    c = WORLD_FREEMIX
    card, d, font = _card("World: FreeMix DMSA (no download)")
    _masked_references(card, d, font, [(subject, image, mask, f"{role}: {subject}")
                                       for role, subject, image, caption, mask in c["refs"]], tint=0.0)
    _node_chain(d, font, [("Reference Encode", "structure + appearance"),
                          ("Disentangle-Mixing Attention", f'FreeMix DMSA, blend word "{c["blend_word"]}"'),
                          ("KSampler", _world_sampling(c))],
                [f'"{c["prompt"]}"'])
    card.save(path, quality=90)


def thumbnail_world_mudi(path: Path) -> None:
    """An honest illustrative card (no generated image): the world's two subjects cut out by their masks, the
    nodes they go through and the prompt naming both."""
    c = WORLD_MUDI
    card, d, font = _card("World: MuDI compose (no download)")
    _cut_outs(card, d, font, [(image, mask, f"{name} (cut out)") for name, image, mask in c["refs"]])
    first, second = c["prompt"].split(" and ")
    _node_chain(d, font, [("Subject x2 > Composer", f"cut-outs on white, {c['size']}x{c['size']}"),
                          ("Mean-Shifted Noise", "start noise shifted to the collage"),
                          ("SamplerCustomAdvanced", _world_sampling(c))],
                [f'"{first} and', f' {second}"'])
    card.save(path, quality=90)


def thumbnail_native_flux2(path: Path) -> None:
    """An honest illustrative card (no generated image): the two references with their masks tinted, their
    weights and regions, the nodes they go through and the prompt."""
    c = NATIVE_FLUX2
    card, d, font = _card("Native references: FLUX.2 klein")
    sides = ("left", "right")
    _masked_references(card, d, font, [(s, image, mask, f"{s} x{w:g}, {sides[k]} half")
                                       for k, (s, image, mask, w, _) in enumerate(c["refs"])])
    _node_chain(d, font, [("ReferenceLatent x2", "the photos, chained on the prompt"),
                          ("Native Reference x2", "subject mask, weight, region"),
                          ("Native Reference Control", f"FLUX.2 klein, {c['steps']} steps, cfg 1")],
                ['"a cat and a dog sitting', ' together on a sofa"'])
    card.save(path, quality=90)


def thumbnail_native_qwen(path: Path) -> None:
    """An honest illustrative card (no generated image): the two people, the half of the picture each may act
    in, the nodes they go through and the prompt."""
    from PIL import Image

    c = NATIVE_QWEN
    card, d, font = _card("Native references: Qwen-Image-Edit")
    tints = [(255, 150, 60), (80, 170, 255)]
    for k, (person, image, _, _) in enumerate(c["refs"]):
        im = Image.open(INPUTS / image).convert("RGB").resize((104, 104), Image.LANCZOS)
        x, y = 12, 54 + k * 122
        card.paste(im, (x, y))
        d.rectangle((x - 1, y - 1, x + 104, y + 104), outline=tints[k])
        _reference_tile(d, font, k, tints[k], f"picture {k + 1}: {('left', 'right')[k]} half")
    _node_chain(d, font, [("TextEncodeQwenImageEditPlus", "image1 + image2, prompt and negative"),
                          ("Native Reference x2", "weight, target region"),
                          ("Native Reference Control", f"{c['steps']} steps, cfg {c['cfg']:g}")],
                ['"the woman from picture 1 and the man', ' from picture 2 side by side"'])
    card.save(path, quality=90)
