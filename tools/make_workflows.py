#!/usr/bin/env python
"""Generate the shipped example workflows (UI format) from the live node schemas, their thumbnails
and the example input images: the world's always (drawn by world/data.py, deterministic), the photos
when a shared data folder is given.

    COMFYUI_PATH=/path/to/ComfyUI python tools/make_workflows.py [--inputs-from SHARED_DATA_DIR]

``widgets_values`` are laid out with the same schema rules ``tools/run_workflow.py`` reads them with,
so a workflow written here converts back to exactly the values of its recipe (tools/workflows/:
settings, Read-me notes as markdown in notes/, graph builder, recipes, thumbnails).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_workflow as rw
from workflows import native_recipes, recipes, thumbnails
from workflows.native_inputs import write_native_inputs
from workflows import settings as st
from workflows.world_inputs import write_world_inputs

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

MIP_SOURCES = [(f"mip_adapter_combinations/combination_{i}/{name}.jpg", f"personalize_mip_{i}_{name}.jpg")
               for i, names in ((1, ("cat", "jacket")), (2, ("cat", "dice")), (3, ("barn", "dog"))) for name in names]


def prepare_inputs(data_dir: Path) -> None:
    from PIL import Image
    st.INPUTS.mkdir(parents=True, exist_ok=True)
    for image, mask, out_image, out_mask in INPUT_SOURCES:
        for src, dst, mode in ((image, out_image, "RGB"), (mask, out_mask, "L")):
            im = Image.open(data_dir / src).convert(mode)
            scale = 512 / max(im.size)
            im = im.resize((round(im.width * scale), round(im.height * scale)), Image.LANCZOS)
            im.save(st.INPUTS / dst, quality=92)
    for src, dst in MIP_SOURCES:
        im = Image.open(data_dir / src).convert("RGB")
        scale = 512 / max(im.size)
        im.resize((round(im.width * scale), round(im.height * scale)), Image.LANCZOS).save(st.INPUTS / dst, quality=92)
    try:                                  # NASA's public-domain astronaut portrait, shipped in scikit-image
        import skimage.data
        Image.fromarray(skimage.data.astronaut()).save(st.INPUTS / st.FREECURE["id_image"], quality=92)
    except ImportError:
        print("scikit-image is not installed: the FreeCure example's identity photo was not written")
    (st.INPUTS / "licenses").mkdir(exist_ok=True)
    for rel in LICENSE_FILES:
        shutil.copyfile(data_dir / rel, st.INPUTS / "licenses" / Path(rel).name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", help="ComfyUI install (default: $COMFYUI_PATH)")
    parser.add_argument("--inputs-from", type=Path,
                        help="shared data folder to (re)make workflows/inputs/ from (dreambench/, freecustom_masks/, "
                             "mip_adapter_combinations/)")
    a = parser.parse_args()
    if a.inputs_from:
        prepare_inputs(a.inputs_from)
    for path in write_world_inputs() + write_native_inputs():
        print(f"wrote {path}")

    rw.import_comfyui(rw.find_comfyui(a.comfyui))
    import folder_paths                   # the pack copies its example images into the input folder when it
    folder_paths.set_input_directory(tempfile.mkdtemp(prefix="personalize_inputs_"))   # loads: not the tree's
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
             "FluxGuidance", "EmptySD3LatentImage", "CLIPLoader", "ImageScaleToTotalPixels", "VAEEncode",
             "ReferenceLatent", "ConditioningZeroOut", "EmptyFlux2LatentImage", "TextEncodeQwenImageEditPlus",
             "ModelSamplingAuraFlow", "PersonalizeNativeReference", "PersonalizeNativeReferenceControl"]
    schemas = rw.live_schemas(types)
    ks = schemas["KSampler"]["required"]   # fall back to euler/normal where DDIM is missing
    st.fall_back_samplers(ks["sampler_name"][0], ks["scheduler"][0])
    for c, build, card in ((st.FREECUSTOM, recipes.freecustom_workflow, thumbnails.thumbnail),
                           (st.FREEMIX, recipes.freemix_workflow, thumbnails.thumbnail_freemix),
                           (st.MIP, recipes.mip_workflow, thumbnails.thumbnail_mip),
                           (st.FREECURE, recipes.freecure_workflow, thumbnails.thumbnail_freecure),
                           (st.MUDI, recipes.mudi_workflow, thumbnails.thumbnail_mudi),
                           (st.MUDI_TRAIN, recipes.mudi_train_workflow, thumbnails.thumbnail_mudi_train),
                           (st.FREECUSTOM_FLUX, recipes.freecustom_flux_workflow, thumbnails.thumbnail_flux),
                           (st.NATIVE_FLUX2, native_recipes.native_flux2_workflow, thumbnails.thumbnail_native_flux2),
                           (st.NATIVE_QWEN, native_recipes.native_qwen_workflow, thumbnails.thumbnail_native_qwen),
                           (st.WORLD_FREECUSTOM, recipes.freecustom_workflow, thumbnails.thumbnail_world_freecustom),
                           (st.WORLD_FREEMIX, recipes.freemix_workflow, thumbnails.thumbnail_world_freemix),
                           (st.WORLD_MUDI, recipes.mudi_workflow, thumbnails.thumbnail_world_mudi)):
        out = st.workflow_path(c["stem"])
        out.write_text(json.dumps(build(schemas, classes, c), indent=2) + "\n", encoding="utf-8")
        card(out.with_suffix(".jpg"))
        print(f"wrote {out} and its thumbnail")
    return 0


if __name__ == "__main__":
    sys.exit(main())
