"""The job folder: the one owner of its format, writer and reader together.

The training nodes write it in ComfyUI's process (``write_*``: from the node's MODEL, VAE and CLIP);
the training child reads it back (``read_*``, ``load_*``) and rebuilds ComfyUI's own models there.

* ``job.json``: the run's settings (``write_config``, ``load_config``). The keys the training loop
  reads: ``kind``, ``output`` (the final file), ``state_dir`` (checkpoints of this output name),
  ``steps``, ``seed`` (required); ``checkpoint_every`` (100; 0 = only at the end), ``validate_every``
  (0 = no previews), ``device`` ("cpu" | "cuda"), ``resume`` (true; false deletes the old checkpoint
  and starts over), ``max_grad_norm`` (1.0; 0 = no clipping), ``gradient_accumulation`` (1: the
  micro-batches of ``batch_size`` whose gradients make one optimizer step), ``threads`` (torch CPU threads; unset =
  torch's default), ``comfyui_path`` (for kinds that load ComfyUI). The rest belong to the job kind
  (its ``REQUIRED_KEYS``, checked by the loop).
* the model: when the MODEL is exactly the diffusion model of a file ComfyUI loaded (Load
  Checkpoint, Load Diffusion Model; no LoRA or other weight patch on it), job.json's ``model_file``
  records that file (:func:`model_file_record`: path, loader, size, modification time and a digest
  of its first and last MiB) and the child loads it itself (SDXL: no 5 GB copy per run; a file
  changed since is refused). Otherwise ``model.safetensors``: the MODEL's diffusion model weights as
  the node's ModelPatcher had them (patches, e.g. LoRAs applied before the node, included), with the
  ComfyUI ``diffusion_model.`` key layout; rebuilt with ``comfy.sd.load_diffusion_model_state_dict``
  (the family is detected from the tensors, as UNETLoader does). Either way its fingerprint goes
  into job.json (``model_fingerprint``).
* ``vae.safetensors``: the VAE's weights (``comfy.sd.VAE(sd=...)``), for the jobs that encode images.
* ``data.safetensors`` + ``data.json``: the training data. Tensors ``image.<k>`` (``[H, W, 3]``,
  0..1) and ``mask.<k>`` (``[H, W]``), the captions' CLIP encodings ``cond.<i>`` / ``pooled.<i>``
  (pooled only for models that use it) and, with a validation prompt, ``val_cond.<j>`` /
  ``val_pooled.<j>`` (j = 0 the prompt, 1 the empty negative). data.json: ``images`` (one entry per
  ``k``), ``captions`` (the texts of ``cond.<i>``), ``validation`` (``prompt``, ``seed``) and the
  kind's own keys: Seg-Mix ``phrases`` (identifier → phrase) with ``images[k]`` = ``{identifier,
  caption}``; Infusion ``positions`` (the concept token of every caption), ``length`` (their token
  count), ``widths`` (``[[layer key], attn2 width]``), ``family`` and ``validation.position`` /
  ``validation.length``.

ComfyUI is imported inside the functions that need it (the writer runs in ComfyUI's process, the
reader in the child after ``training/comfy_model.init_comfy``): nothing here imports it at module
level.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ..attention.infusion import concept_position, cross_attention_widths
from ..files.atomic import atomic_save_safetensors, atomic_write_text
from ..files.checkpoints import read_checkpoint

REQUIRED_KEYS = ("kind", "output", "state_dir", "steps", "seed")
DEFAULTS = {"checkpoint_every": 100, "validate_every": 0, "device": "cpu", "comfyui_path": None, "resume": True,
            "max_grad_norm": 1.0, "gradient_accumulation": 1}

CONFIG_FILE = "job.json"
MODEL_FILE = "model.safetensors"
VAE_FILE = "vae.safetensors"
DATA_FILE = "data.safetensors"
DATA_META_FILE = "data.json"

# Infusion's 11 caption templates with the concept's super-class word (``infusion/dataset.py``'s
# PROMPT_TEMPLATE, docs/algorithms.md §6.2; the word is the ordinary class word, e.g. "cat"), in the
# official order and spelling (the trailing space of one of them included: CLIP's tokenizer drops it).
INFUSION_TEMPLATES = ("a photo of a {}", "a good photo of a {}", "the photo of a {}", "a good photo of the {}",
                      "image of a {}", "image of the {}", "A photograph of {}", "A {} shown in a photo ",
                      "A photo of {}", "A {}", "{}")


# ====================================================================================== writer

def model_fingerprint(sd: dict) -> str:
    """A cheap digest of the weights (names, shapes and a few sums), so a resume with another model is
    refused without hashing gigabytes."""
    h = hashlib.sha256()
    keys = sorted(sd)
    for k in keys:
        h.update(f"{k}:{tuple(sd[k].shape)};".encode())
    for k in keys[:: max(1, len(keys) // 16)]:
        h.update(f"{float(sd[k].double().sum()):.6e}".encode())
    return h.hexdigest()[:16]


_FILE_LOADERS = {"load_checkpoint_guess_config": "checkpoint", "load_diffusion_model": "diffusion_model"}
_EDGE = 1 << 20


def file_digest_edges(path, size: int) -> str:
    """sha256 of a file's first and last MiB and its size: a cheap identity (the header of a
    safetensors file, and its end) that does not read gigabytes."""
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        h.update(fh.read(_EDGE))
        if size > 2 * _EDGE:
            fh.seek(size - _EDGE)
        h.update(fh.read(_EDGE))                         # the end (a smaller file: all the rest)
    return h.hexdigest()


def model_file_record(model) -> dict | None:
    """The file a ComfyUI MODEL (ModelPatcher) was loaded from, when the MODEL is exactly that file's
    diffusion model: loaded by ``comfy.sd.load_checkpoint_guess_config`` (Load Checkpoint) or
    ``comfy.sd.load_diffusion_model`` (Load Diffusion Model), with no weight patch, object patch or
    hook on it. ``{"path", "loader", "size", "mtime_ns", "digest", "fingerprint"}``, or None (a
    model patched or merged in the graph, or from another loader: its weights are copied)."""
    init = getattr(model, "cached_patcher_init", None)
    if not isinstance(init, tuple) or len(init) < 2:
        return None
    fn, args = init[0], init[1]
    loader = _FILE_LOADERS.get(getattr(fn, "__name__", ""))
    if loader is None or getattr(fn, "__module__", "") != "comfy.sd" or not args:
        return None
    if loader == "checkpoint" and (len(init) < 3 or init[2] != 0):
        return None
    if any(getattr(model, name, None) for name in ("patches", "object_patches", "weight_wrapper_patches",
                                                    "hook_patches")):
        return None
    path = args[0]
    if not isinstance(path, str) or not os.path.isfile(path):
        return None
    st = os.stat(path)
    digest = file_digest_edges(path, st.st_size)
    return {"path": os.path.abspath(path), "loader": loader, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "digest": digest, "fingerprint": "file:" + digest[:16]}


def check_model_file(record: dict) -> None:
    """The child's check that the recorded model file is still the one the node saw (size and the
    digest of its edges); a :class:`ConfigError` naming the file otherwise."""
    path = record.get("path")
    try:
        size = os.path.getsize(path)
        same = size == record.get("size") and file_digest_edges(path, size) == record.get("digest")
    except (OSError, TypeError) as exc:
        raise ConfigError(f"the model file {path} of this run cannot be read ({exc}); Queue the training node "
                          f"again") from None
    if not same:
        raise ConfigError(f"the model file {path} changed after the training node queued this run; Queue the "
                          f"training node again")


def model_weights(model) -> dict:
    """The MODEL's (a ComfyUI ModelPatcher) diffusion model weights, patches (LoRAs applied before
    the node) included, on the CPU."""
    import comfy.model_management as mm                 # ComfyUI: the writer runs in its process
    mm.load_models_gpu([model], force_patch_weights=True)
    return {k: v.detach().to("cpu").contiguous() for k, v in model.model.diffusion_model.state_dict().items()}


def write_weights(sd: dict, job_dir: str) -> None:
    atomic_save_safetensors(os.path.join(job_dir, MODEL_FILE), sd)


def write_model(model, job_dir: str) -> str:
    """The MODEL's (a ComfyUI ModelPatcher) diffusion model weights, patches (LoRAs applied before the
    node) included; returns their :func:`model_fingerprint`."""
    sd = model_weights(model)
    write_weights(sd, job_dir)
    return model_fingerprint(sd)


def write_vae(vae, job_dir: str) -> None:
    """The weights of a ComfyUI VAE."""
    sd = {k: v.detach().to("cpu").contiguous() for k, v in vae.first_stage_model.state_dict().items()}
    atomic_save_safetensors(os.path.join(job_dir, VAE_FILE), sd)


def write_config(job_dir: str, config: dict) -> None:
    atomic_write_text(os.path.join(job_dir, CONFIG_FILE), json.dumps(config, indent=1))


def encode_text(clip, text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A ComfyUI CLIP's encoding of ``text``: ``(cond, pooled or None)``, float32 on the CPU."""
    cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return cond.detach().float().cpu().contiguous(), (None if pooled is None else pooled.detach().float().cpu().contiguous())


def _put_encoding(tensors: dict, prefix: str, index: int, clip, text: str) -> None:
    cond, pooled = encode_text(clip, text)
    tensors[f"{prefix}cond.{index}"] = cond
    if pooled is not None:
        tensors[f"{prefix}pooled.{index}"] = pooled


def _put_validation(tensors: dict, meta: dict, clip, prompt: str, seed: int) -> None:
    for j, text in enumerate((prompt, "")):
        _put_encoding(tensors, "val_", j, clip, text)
    meta["validation"] = {"prompt": prompt, "seed": int(seed)}


def _write_data(job_dir: str, tensors: dict, meta: dict) -> None:
    atomic_save_safetensors(os.path.join(job_dir, DATA_FILE), tensors)
    atomic_write_text(os.path.join(job_dir, DATA_META_FILE), json.dumps(meta, indent=1))


def write_segmix_data(dataset, clip, job_dir: str, template: str, validation_prompt: str, seed: int) -> None:
    """A Seg-Mix data set (``training/dataset.py``'s subjects): every image and mask, the captions of
    the images and of every ordered pair of subjects (``template`` with their phrases), encoded."""
    tensors, images = {}, []
    phrases = {s.identifier: s.phrase for s in dataset}
    captions: list[str] = []
    k = 0
    for s in dataset:
        for i in range(s.images.shape[0]):
            tensors[f"image.{k}"] = s.images[i].contiguous()
            tensors[f"mask.{k}"] = s.masks[i].contiguous()
            images.append({"identifier": s.identifier, "caption": s.captions[i]})
            if s.captions[i] not in captions:
                captions.append(s.captions[i])
            k += 1
    for a in phrases:
        for b in phrases:
            if a != b:
                text = template.format(phrases[a], phrases[b])
                if text not in captions:
                    captions.append(text)
    for i, text in enumerate(captions):
        _put_encoding(tensors, "", i, clip, text)
    meta = {"images": images, "phrases": phrases, "captions": captions}
    if validation_prompt.strip():
        _put_validation(tensors, meta, clip, validation_prompt.strip(), seed)
    _write_data(job_dir, tensors, meta)


def write_infusion_data(model, clip, images, masks, word: str, job_dir: str, validation_prompt: str, seed: int):
    """Infusion's data: the images and masks, the :data:`INFUSION_TEMPLATES` captions with ``word``
    encoded, the concept token of each and the model's cross-attention widths; returns the family."""
    widths, family = cross_attention_widths(model)
    tensors, meta_images = {}, []
    for i in range(images.shape[0]):
        tensors[f"image.{i}"] = images[i, ..., :3].float().contiguous()
        tensors[f"mask.{i}"] = masks[i].float().contiguous()
        meta_images.append({"index": i})
    captions = [t.format(word) for t in INFUSION_TEMPLATES]
    positions, length = [], None
    for i, text in enumerate(captions):
        pos, n = concept_position(clip, text, word, family)
        positions.append(pos)
        if length is not None and n != length:
            raise ValueError(f"concept_word: the captions tokenize to {length} and {n} tokens; use a shorter word")
        length = n
        _put_encoding(tensors, "", i, clip, text)
    meta = {"images": meta_images, "captions": captions, "positions": positions, "length": length,
            "widths": [[list(k), w] for k, w in widths.items()], "family": family}
    if validation_prompt.strip():
        pos, n = concept_position(clip, validation_prompt.strip(), word, family)
        _put_validation(tensors, meta, clip, validation_prompt.strip(), seed)
        meta["validation"].update(position=pos, length=n)
    _write_data(job_dir, tensors, meta)
    return family


# ====================================================================================== reader

class ConfigError(ValueError):
    """A job.json the loop cannot run."""


def load_config(job_dir: Path) -> dict:
    """job.json with the loop's defaults filled in; :class:`ConfigError` when it cannot be run."""
    path = job_dir / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"no job.json in {job_dir}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    if not isinstance(config, dict):
        raise ConfigError(f"{path} must hold a JSON object, not {type(config).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise ConfigError(f"job.json is missing required keys: {', '.join(missing)}")
    for k, v in DEFAULTS.items():
        config.setdefault(k, v)
    for key, low in (("steps", 1), ("seed", 0), ("checkpoint_every", 0), ("validate_every", 0),
                     ("gradient_accumulation", 1)):
        v = config[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ConfigError(f"job.json: {key} must be an integer >= {low}, not {v!r}")
    if not isinstance(config["resume"], bool):
        raise ConfigError(f"job.json: resume must be true or false, not {config['resume']!r}")
    for key in ("output", "state_dir"):
        if not isinstance(config[key], str) or not config[key]:
            raise ConfigError(f"job.json: {key} must be a non-empty path")
    if config["device"] not in ("cpu", "cuda") and not str(config["device"]).startswith("cuda:"):
        raise ConfigError(f"job.json: device must be 'cpu' or 'cuda', not {config['device']!r}")
    return config


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file of the job folder, through the pack's one safe reader."""
    if not path.is_file():
        raise FileNotFoundError(f"the job folder lacks {path.name} ({path})")
    return read_checkpoint(path, error=ConfigError, redo="Queue the training node again to rewrite the job folder.")


def read_data(job_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """``(data.safetensors's tensors, data.json)``."""
    return read_tensors(job_dir / DATA_FILE), json.loads((job_dir / DATA_META_FILE).read_text(encoding="utf-8"))


def load_diffusion_model(job_dir: Path, device: torch.device, dtype: torch.dtype, model_file: dict | None = None):
    """ComfyUI's ModelPatcher for the job's model, its weights frozen on ``device``: the recorded
    ``model_file`` (job.json; checked first) or the job folder's ``model.safetensors``."""
    import comfy.sd                                     # ComfyUI: imported by the child's init_comfy
    if model_file:
        check_model_file(model_file)
        if model_file.get("loader") == "checkpoint":
            mp = comfy.sd.load_checkpoint_guess_config(model_file["path"], output_vae=False, output_clip=False,
                                                       model_options={"dtype": dtype})[0]
        else:
            mp = comfy.sd.load_diffusion_model(model_file["path"], model_options={"dtype": dtype})
    else:
        sd = read_tensors(job_dir / MODEL_FILE)
        mp = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": dtype})
    if mp is None:
        raise RuntimeError(f"ComfyUI does not recognise the diffusion model in {model_file or MODEL_FILE}")
    model = mp.model
    model.to(device=device)
    model.diffusion_model.to(dtype=dtype)
    model.requires_grad_(False)
    model.eval()
    return mp


def load_vae(job_dir: Path, device: torch.device):
    """ComfyUI's VAE of the job's ``vae.safetensors`` (frozen), or None when the job has none."""
    if not (job_dir / VAE_FILE).is_file():
        return None
    import comfy.sd                                     # ComfyUI: imported by the child's init_comfy
    vae = comfy.sd.VAE(sd=read_tensors(job_dir / VAE_FILE), device=device)
    vae.first_stage_model.requires_grad_(False)
    return vae
