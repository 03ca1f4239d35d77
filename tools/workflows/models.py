"""The model files the shipped workflows load, as the frontend's missing-models panel reads them: each
loader node carries ``properties.models`` (``name``, ``url``, ``directory``) for the files its widgets
name, and the workflow a top-level ``models`` list of them all (frontend 1.49.6 reads both; the node's
entries count only while the node is active and its widget holds the name).

``directory`` is the ComfyUI model folder the loader lists (``LOADER_FOLDERS``); ``url`` a Hugging Face
``resolve`` link to the public file (the repositories the README's model table names). The frontend offers
a download only for ``.safetensors``/``.sft``/``.ckpt``/``.pth``/``.pt`` files: for the ``.bin`` files
(MIP-Adapter, PhotoMaker) it names the file and its folder but shows no button. Files the user makes
(the world checkpoint from ``tools/world.py build``, a trained LoRA) have no ``url``."""
from __future__ import annotations

HF = "https://huggingface.co/"

# node type -> {widget name: ComfyUI model folder}
LOADER_FOLDERS = {
    "CheckpointLoaderSimple": {"ckpt_name": "checkpoints"},
    "UNETLoader": {"unet_name": "diffusion_models"},
    "DualCLIPLoader": {"clip_name1": "text_encoders", "clip_name2": "text_encoders"},
    "CLIPLoader": {"clip_name": "text_encoders"},
    "VAELoader": {"vae_name": "vae"},
    "CLIPVisionLoader": {"clip_name": "clip_vision"},
    "PhotoMakerLoader": {"photomaker_model_name": "photomaker"},
    "LoraLoader": {"lora_name": "loras"},
    "PersonalizeSAMModelLoader": {"model_name": "sams"},
    "PersonalizeMIPAdapterLoader": {"adapter_name": "ipadapter"},
}

# file name -> public URL (None: a file the user makes)
MODEL_URLS = {
    "v1-5-pruned-emaonly.safetensors":
        HF + "Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/v1-5-pruned-emaonly.safetensors",
    "sd_xl_base_1.0.safetensors": HF + "stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors",
    "flux1-dev.safetensors": HF + "Comfy-Org/flux1-dev/resolve/main/flux1-dev.safetensors",
    "clip_l.safetensors": HF + "comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors",
    "t5xxl_fp16.safetensors": HF + "comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors",
    "ae.safetensors": HF + "Comfy-Org/Lumina_Image_2.0_Repackaged/resolve/main/split_files/vae/ae.safetensors",
    "flux-2-klein-4b.safetensors":
        HF + "Comfy-Org/flux2-klein/resolve/main/split_files/diffusion_models/flux-2-klein-4b.safetensors",
    "qwen_3_4b.safetensors": HF + "Comfy-Org/flux2-klein/resolve/main/split_files/text_encoders/qwen_3_4b.safetensors",
    "flux2-vae.safetensors": HF + "Comfy-Org/flux2-dev/resolve/main/split_files/vae/flux2-vae.safetensors",
    "qwen_image_edit_2509_fp8_e4m3fn.safetensors":
        HF + "Comfy-Org/Qwen-Image-Edit_ComfyUI/resolve/main/split_files/diffusion_models/"
             "qwen_image_edit_2509_fp8_e4m3fn.safetensors",
    "qwen_2.5_vl_7b_fp8_scaled.safetensors":
        HF + "Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors",
    "qwen_image_vae.safetensors": HF + "Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/vae/qwen_image_vae.safetensors",
    "model_sdxl.bin": HF + "hqhQAQ/MIP-Adapter/resolve/main/model_sdxl.bin",
    # h94/IP-Adapter's SDXL image encoder (ViT-bigG), saved under the name IP-Adapter users give it
    "CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors": HF + "h94/IP-Adapter/resolve/main/sdxl_models/image_encoder/"
                                                           "model.safetensors",
    "photomaker-v1.bin": HF + "TencentARC/PhotoMaker/resolve/main/photomaker-v1.bin",
    "sam_vit_b_01ec64.pth": HF + "ybelkada/segment-anything/resolve/main/checkpoints/sam_vit_b_01ec64.pth",
    # made by the user: the world checkpoint (tools/world.py build) and the subjects' LoRAs (Train Seg-Mix LoRA)
    "personalize_world.safetensors": None,
    "mudi_segmix_lora_cat_dog.safetensors": None,
    "mudi_cat_dog.safetensors": None,
}


def model_entries(class_type: str, values: dict) -> list[dict]:
    """The ``properties.models`` entries of a ``class_type`` node with widget ``values`` (empty for a
    node that loads no model file). A file missing from ``MODEL_URLS`` is an error: every shipped model
    is described."""
    entries = []
    for widget, folder in LOADER_FOLDERS.get(class_type, {}).items():
        name = values[widget]
        if name not in MODEL_URLS:
            raise KeyError(f"{class_type}.{widget} = {name!r}: add it to MODEL_URLS (tools/workflows/models.py)")
        entry = {"name": name, "directory": folder}
        if MODEL_URLS[name]:
            entry["url"] = MODEL_URLS[name]
        entries.append(entry)
    return entries


def workflow_models(nodes: list[dict]) -> list[dict]:
    """The workflow's top-level ``models``: every node's entries once, in node order."""
    seen, out = set(), []
    for node in nodes:
        for entry in node.get("properties", {}).get("models", []):
            key = (entry["name"], entry["directory"])
            if key not in seen:
                seen.add(key)
                out.append(entry)
    return out
