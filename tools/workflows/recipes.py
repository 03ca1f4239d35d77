"""The recipes of the shipped example workflows: each builds one UI-format workflow from the live node
schemas and its settings (settings.py)."""
from __future__ import annotations

from .graph import Graph, checkpoint_and_prompts, decode_and_save, reference_chain, sample_and_save
from .settings import FREECURE, FREECUSTOM, FREECUSTOM_FLUX, FREEMIX, MIP, MUDI, MUDI_TRAIN, read_note


def _note_title(c: dict, default: str) -> str:
    return f"Read me: {c['title']}" if "title" in c else default


def freecustom_workflow(schemas: dict, classes: dict, c: dict = FREECUSTOM) -> dict:
    """MRSA with the references of ``c`` (FREECUSTOM, or the world's WORLD_FREECUSTOM)."""
    g = Graph(schemas, classes)
    ckpt, pos, neg = checkpoint_and_prompts(g, c, read_note(c["stem"]), 620,
                                          _note_title(c, "Read me: FreeCustom multi-reference"))

    refs = reference_chain(g, c, (ckpt, 1), (ckpt, 2), 420)
    mra = g.node("PersonalizeMultiReferenceAttention", (1440, 420), (340, 250), None,
                 layers="SD1.5 FreeCustom (output 6-11)", custom_blocks="output:6-11", start_percent=0.0,
                 end_percent=1.0, style_fidelity=1.0, seed=0)
    g.link(ckpt, 0, mra, "model")
    g.link(refs, 0, mra, "references")
    sample_and_save(g, c, ckpt, mra, pos, neg, 1440, c.get("sampler_title", "KSampler (DDIM, as FreeCustom)"),
                    c.get("prefix", "personalize_freecustom"))
    return g.to_json()


def freecustom_flux_workflow(schemas: dict, classes: dict, c: dict = FREECUSTOM_FLUX) -> dict:
    """The FreeCustom example on FLUX.1 dev: core's split FLUX loaders, FluxGuidance, cfg 1."""
    g = Graph(schemas, classes)
    unet = g.node("UNETLoader", (0, 0), (320, 82), "Load Diffusion Model (FLUX.1 dev)", unet_name=c["unet"],
                  weight_dtype="default")
    clip = g.node("DualCLIPLoader", (0, 130), (320, 130), "DualCLIPLoader (CLIP-L + T5-XXL)",
                  clip_name1=c["clip_l"], clip_name2=c["t5"], type="flux", device="default")
    vae = g.node("VAELoader", (0, 310), (320, 60), "Load VAE (FLUX ae)", vae_name=c["vae"])
    g.note(read_note(c["stem"]), (0, 420), (320, 1400), title="Read me: MRSA on FLUX")
    pos = g.node("CLIPTextEncode", (380, 0), (400, 160), "Prompt", text=c["prompt"])
    guidance = g.node("FluxGuidance", (820, 0), (320, 60), None, guidance=c["guidance"])
    neg = g.node("CLIPTextEncode", (380, 200), (400, 120), "Negative prompt (ignored at cfg 1)", text=c["negative"])
    g.note(read_note(c["stem"] + ".negative"), (820, 110), (400, 300), title="Read me: negative prompt and CFG")
    g.link(clip, 0, pos, "clip")
    g.link(pos, 0, guidance, "conditioning")
    g.link(clip, 0, neg, "clip")

    refs = reference_chain(g, c, (clip, 0), (vae, 0), 560)
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
    decode_and_save(g, (vae, 0), sampler, (2200, 0), 100, (520, 560), "personalize_freecustom_flux")
    return g.to_json()


def freemix_workflow(schemas: dict, classes: dict, c: dict = FREEMIX) -> dict:
    """DMSA with the structure and appearance references of ``c``: FREEMIX cuts its subjects out with SAM (refs
    ``(role, subject, image, caption, SAM mode, points, box)``), the world's WORLD_FREEMIX loads mask images
    (refs ``(role, subject, image, caption, mask image)``)."""
    g = Graph(schemas, classes)
    ckpt, _, neg = checkpoint_and_prompts(g, c, read_note(c["stem"]), 760,
                                        _note_title(c, "Read me: FreeMix structure + appearance"), positive=False)
    sam = None
    if "sam" in c:
        sam = g.node("PersonalizeSAMModelLoader", (380, 400), (320, 82), "SAM Model Loader (ViT-B)",
                     model_name=c["sam"], device="auto")

    encoded = {}
    for k, (role, subject, image, caption, *masking) in enumerate(c["refs"]):
        y = 540 + k * 560
        img = g.node("LoadImage", (380, y), (300, 330), f"{role.capitalize()} reference: {subject}", image=image)
        if sam is not None:
            mode, points, box = masking
            seg = g.node("PersonalizeSAMMask", (720, y), (320, 330), f"SAM mask: {subject} ({mode})", mode=mode,
                         points=points, negative_points="", box=box, units="pixels", multimask="auto", threshold=0.0,
                         grid=8, min_confidence=0.88)
            g.link(sam, 0, seg, "sam")
            g.link(img, 0, seg, "image")
        else:
            msk = g.node("LoadImage", (720, y), (320, 330), f"{role.capitalize()} reference: {subject} mask",
                         image=masking[0])
            seg = g.node("ImageToMask", (1080, y + 300), (320, 60), f"{subject} mask (red channel)", channel="red")
            g.link(msk, 0, seg, "image")
        cap = g.node("CLIPTextEncode", (720, y + 370), (320, 110), f"{role.capitalize()} caption", text=caption)
        enc = g.node("PersonalizeReferenceEncode", (1080, y), (320, 260), f"Reference Encode: {role} ({subject})",
                     weight=3.0, mask_threshold=0.5, soft_mask=False, resolution=c["size"])
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
    sample_and_save(g, c, ckpt, dmsa, (dmsa, 1), neg, 1460, c.get("sampler_title", "KSampler (DDIM, as FreeMix)"),
                    c.get("prefix", "personalize_freemix"))
    return g.to_json()


def mip_workflow(schemas: dict, classes: dict, c: dict = MIP) -> dict:
    g = Graph(schemas, classes)
    ckpt = g.node("CheckpointLoaderSimple", (0, 0), (320, 98), "Load Checkpoint (SDXL)", ckpt_name=c["checkpoint"])
    g.note(read_note(c["stem"]), (0, 140), (320, 900), title="Read me: MIP-Adapter multi-object")
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
        decode_and_save(g, ckpt, sampler, (2260, y), 90, (420, 520), f"personalize_mip_{k + 1}")
    return g.to_json()


def freecure_workflow(schemas: dict, classes: dict, c: dict = FREECURE) -> dict:
    g = Graph(schemas, classes)
    ckpt = g.node("CheckpointLoaderSimple", (0, 0), (320, 98), "Load Checkpoint (SDXL)", ckpt_name=c["checkpoint"])
    g.note(read_note(c["stem"]), (0, 140), (320, 900), title="Read me: FreeCure with PhotoMaker")
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
    d1 = decode_and_save(g, ckpt, k1, (1180, 0), 90, (360, 420), "personalize_freecure_foundation",
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
    decode_and_save(g, ckpt, k2, (2020, y), 90, (420, 520), "personalize_freecure")
    return g.to_json()


def mudi_workflow(schemas: dict, classes: dict, c: dict = MUDI) -> dict:
    """MuDI's composition, mean-shifted noise and sampling with the subjects of ``c``; with ``c["lora"]`` an optional
    (bypassed) LoRA loader in front, with ``c["threshold"]`` the Detect-and-Compare score behind (MUDI has both, the
    world's WORLD_MUDI neither)."""
    g = Graph(schemas, classes)
    # left: checkpoint, the optional LoRA (bypassed) and the notes
    ckpt = g.node("CheckpointLoaderSimple", (0, 0), (340, 98), c.get("checkpoint_title", "Load Checkpoint (SDXL)"),
                  ckpt_name=c["checkpoint"])
    model = ckpt
    if "lora" in c:
        model = g.node("LoraLoader", (0, 150), (340, 130), "Load LoRA: your subjects' LoRA (bypassed)",
                       lora_name=c["lora"], strength_model=1.0, strength_clip=1.0)
        model["mode"] = 4                              # bypassed: MODEL and CLIP pass through unchanged
        g.link(ckpt, 0, model, "model")
        g.link(ckpt, 1, model, "clip")
        g.note(read_note(c["stem"] + ".lora"), (0, 330), (340, 330), title="Read me: the subjects' LoRA (optional)")
    g.note(read_note(c["stem"]), (0, 710 if "lora" in c else 140), (340, 1000),
           title=_note_title(c, "Read me: MuDI compose and score"))

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
                  seed=c["compose_seed"], margin=c.get("margin", 32))
    g.link(subjects, 0, comp, "subjects")
    shown = g.node("PreviewImage", (1400, 380), (340, 400), "Composed subjects (preview)")
    g.link(comp, 0, shown, "images")

    # 2. mean-shifted noise and sampling with core nodes
    g.group(f"2. Mean-shifted noise + sampling ({c.get('model_name', 'SDXL')}, core nodes)", (1800, -75, 1380, 1075))
    pos = g.node("CLIPTextEncode", (1820, 0), (400, 150), "Prompt", text=c["prompt"])
    neg = g.node("CLIPTextEncode", (1820, 200), (400, 150), c.get("negative_title", "Negative prompt"),
                 text=c["negative"])
    noise = g.node("PersonalizeMeanShiftedNoise", (1820, 400), (400, 200), None, noise_seed=c["seed"])
    latent = g.node("EmptyLatentImage", (1820, 650), (400, 110), "Empty Latent Image (the size: as the canvas)",
                    width=c["size"], height=c["size"], batch_size=1)
    guider = g.node("CFGGuider", (2260, 0), (320, 100), None, cfg=c["cfg"])
    sampler = g.node("KSamplerSelect", (2260, 150), (320, 60), None, sampler_name=c["sampler"])
    sigmas = g.node("BasicScheduler", (2260, 260), (320, 110), None, scheduler=c["scheduler"], steps=c["steps"],
                    denoise=1.0)
    for clip_user in (pos, neg):
        g.link(model, 1, clip_user, "clip")
    g.link(model, 0, noise, "model")
    g.link(comp, 0, noise, "image")
    g.link(ckpt, 2, noise, "vae")
    g.link(comp, 1, noise, "masks")
    g.link(model, 0, guider, "model")
    g.link(pos, 0, guider, "positive")
    g.link(neg, 0, guider, "negative")
    g.link(model, 0, sigmas, "model")
    run = g.node("SamplerCustomAdvanced", (2620, 0), (320, 130), None)
    g.link(noise, 0, run, "noise")
    g.link(guider, 0, run, "guider")
    g.link(sampler, 0, run, "sampler")
    g.link(sigmas, 0, run, "sigmas")
    g.link(latent, 0, run, "latent_image")
    decode = decode_and_save(g, ckpt, run, (2620, 180), 100, (520, 560), c.get("prefix", "personalize_mudi"))
    if "threshold" in c:
        _detect_and_compare(g, c, photos, decode)
    return g.to_json()


def _detect_and_compare(g, c, photos: dict, decode) -> None:
    """3. the score: Detect-and-Compare of the decoded image against each subject's photo."""
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
    g.note(read_note(c["stem"] + ".score"), (3240, 420), (360, 520), title="Read me: the score")
    score = g.node("PersonalizeDetectCompare", (3640, 0), (340, 110), None, threshold=c["threshold"])
    g.link(models, 0, score, "dc_models")
    g.link(decode, 0, score, "images")
    g.link(chain, 0, score, "subjects")
    annotated = g.node("PreviewImage", (3640, 160), (520, 560), "Annotated (score in the caption)")
    g.link(score, 1, annotated, "images")
    report = g.node("PreviewAny", (3640, 770), (520, 200), "D&C report")
    g.link(score, 2, report, "source")


def mudi_train_workflow(schemas: dict, classes: dict, c: dict = MUDI_TRAIN) -> dict:
    g = Graph(schemas, classes)
    ckpt = g.node("CheckpointLoaderSimple", (0, 0), (340, 98), "Load Checkpoint (SDXL)", ckpt_name=c["checkpoint"])
    g.note(read_note(c["stem"]), (0, 140), (340, 1160), title="Read me: MuDI Seg-Mix LoRA training")

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
    g.note(read_note(c["stem"] + ".run"), (1500, 690), (400, 590), title="Read me: the training run")
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
    g.note(read_note(c["stem"] + ".use"), (2440, 720), (400, 380), title="Read me: using the trained LoRA")
    sample_and_save(g, c, ckpt, lora, pos, neg, 2480, "KSampler (SDXL)", "personalize_mudi_lora",
                     latent_at=(2440, 560))
    return g.to_json()
