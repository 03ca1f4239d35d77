"""Shared by the training tests inside ComfyUI (tests/integration/test_training*.py,
test_faults_training.py): temporary loras / model_patches / output folders, the two shipped subjects
as a Seg-Mix data set, and the Train nodes called with tiny settings (64 px, rank 4, a few steps)."""
from __future__ import annotations

import contextlib

from comfy_sampling import load_image, load_mask
from pack_paths import PACK_ROOT

INPUTS = PACK_ROOT / "workflows" / "inputs"


@contextlib.contextmanager
def training_folders(tmp_path_factory):
    """ComfyUI's default loras and model_patches folders and its output folder moved to new temporary
    folders for the block; yields ``(loras, model_patches, output)``."""
    import folder_paths
    loras = tmp_path_factory.mktemp("loras")
    patches = tmp_path_factory.mktemp("model_patches")
    out = tmp_path_factory.mktemp("output")
    folder_paths.add_model_folder_path("loras", str(loras), is_default=True)
    folder_paths.add_model_folder_path("model_patches", str(patches), is_default=True)
    old = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(out))
    try:
        yield loras, patches, out
    finally:
        folder_paths.set_output_directory(old)


def node(name):
    import nodes
    return nodes.NODE_CLASS_MAPPINGS[name]


def dataset(size=64):
    ds = node("PersonalizeSegMixDataset")
    d = ds.execute(load_image(INPUTS / "personalize_cat_04.jpg", size), load_mask(INPUTS / "personalize_cat_04_mask.jpg", size),
                   "olis cat", "a photo of {}", "", None).result[0]
    return ds.execute(load_image(INPUTS / "personalize_dog6_02.jpg", size),
                      load_mask(INPUTS / "personalize_dog6_02_mask.jpg", size), "hta dog", "a photo of {}", "", d).result[0]


def train(model, clip, vae, data, name, **kw):
    """Train Seg-Mix LoRA (MuDI) with tiny settings; ``kw`` overrides them. Returns the node's outputs."""
    args = dict(output_name=name, steps=4, rank=4, learning_rate=1e-3, segmix_prob=0.5, scale_min=0.75,
                scale_max=1.0, loss="dco", dco_beta=1000.0, resolution=64, batch_size=1, gradient_checkpointing=False,
                seed=1, validation_prompt="", validate_every=0, checkpoint_every=2, gpus=1)
    args.update(kw)
    return node("PersonalizeTrainSegMixLoRA").execute(model, clip, vae, data, **args).result


def infusion_images():
    import torch
    imgs = torch.cat([load_image(INPUTS / "personalize_cat_04.jpg"), load_image(INPUTS / "personalize_mip_1_cat.jpg")])
    masks = torch.cat([load_mask(INPUTS / "personalize_cat_04_mask.jpg"), torch.ones(1, 64, 64)])
    return imgs, masks


def train_infusion(model, clip, vae, name, images=None, masks=None, **kw):
    """Train Infusion with tiny settings on two shipped cat photos; ``kw`` overrides them."""
    imgs, msks = infusion_images()
    args = dict(output_name=name, steps=2, learning_rate=0.05, batch_size=2, gradient_accumulation=1, resolution=64,
                offsets="kv", seed=1, validation_prompt="", validate_every=0, checkpoint_every=2, gpus=1)
    args.update(kw)
    return node("PersonalizeTrainInfusion").execute(model, clip, vae, imgs if images is None else images, "cat",
                                                    msks if masks is None else masks, **args).result
