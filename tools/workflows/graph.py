"""A small UI-format graph builder (nodes with sockets from the live schemas, links, groups, the
frontend's node order) and the layout pieces several example workflows share."""
from __future__ import annotations

from ui_to_api import is_widget, ordered_inputs, widget_slots

from .models import model_entries, workflow_models


class Graph:
    """A tiny UI-format graph builder: nodes with sockets from the live schema, links, order."""

    def __init__(self, schemas: dict, classes: dict):
        self.schemas, self.classes = schemas, classes
        self.nodes, self.links, self.groups = [], [], []

    def node(self, class_type, pos, size, title=None, **values):
        schema = self.schemas[class_type]
        widget_names = {n for n, kind, _ in widget_slots(schema) if kind == "value"}
        unknown = set(values) - widget_names
        if unknown:
            raise ValueError(f"{class_type}: not widget inputs: {sorted(unknown)}")
        widgets = []
        for name, kind, opts in widget_slots(schema):
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
                       for n, t, o in ordered_inputs(schema) if not is_widget(t, o)],
            # a list return type (a V1 combo: the live file list Train Seg-Mix LoRA gives its lora_name, so that
            # core LoraLoader's list-typed input validates) is a COMBO output in the editor
            "outputs": [{"name": str(n), "localized_name": str(n), "type": t if isinstance(t, str) else "COMBO",
                         "slot_index": i, "links": []}
                        for i, (n, t) in enumerate(zip(names, cls.RETURN_TYPES))],
            "properties": {"Node name for S&R": class_type},
            "widgets_values": widgets,
        }
        models = model_entries(class_type, {n: v for (n, _, _), v in zip(widget_slots(schema), widgets)})
        if models:                  # the model files it loads, for the frontend's missing-models panel
            node["properties"]["models"] = models
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
                "extra": {"ds": {"scale": 0.65, "offset": [40, 40]}}, "models": workflow_models(self.nodes),
                "version": 0.4}


def checkpoint_and_prompts(g, c, note: str, note_height: int, note_title: str, positive: bool = True):
    """Load Checkpoint, the read-me note and the two prompts: (checkpoint, positive, negative); ``c`` may
    retitle the checkpoint and the negative prompt (``checkpoint_title``, ``negative_title``). Without
    ``positive`` (a node of the recipe encodes the prompt) the positive is None and the negative comes first."""
    ckpt = g.node("CheckpointLoaderSimple", (0, 0), (320, 98), c.get("checkpoint_title", "Load Checkpoint (SD1.5)"),
                  ckpt_name=c["checkpoint"])
    g.note(note, (0, 140), (320, note_height), title=note_title)
    pos = g.node("CLIPTextEncode", (380, 0), (400, 160), "Prompt", text=c["prompt"]) if positive else None
    neg = g.node("CLIPTextEncode", (380, 200 if positive else 0), (400, 160),
                 c.get("negative_title", "Negative prompt (FreeCustom)"), text=c["negative"])
    if positive:
        g.link(ckpt, 1, pos, "clip")
    g.link(ckpt, 1, neg, "clip")
    return ckpt, pos, neg


def decode_and_save(g, ckpt, samples, at: tuple, below: int, save_size: tuple, prefix: str, title=None):
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


def sample_and_save(g, c, ckpt, model, pos, neg, x: int, sampler_title: str, prefix: str,
                     latent_at: tuple | None = None) -> None:
    """Empty latent (at ``latent_at``, default column ``x``), KSampler on the patched model, VAE Decode
    and Save Image, from column ``x``. ``pos``: a node (its first output) or a ``(node, slot)`` pair."""
    latent = g.node("EmptyLatentImage", latent_at or (x, 200), (320, 110), None, width=c["size"], height=c["size"],
                    batch_size=1)
    sampler = g.node("KSampler", (x + 400, 0), (320, 270), sampler_title, seed=c["seed"],
                     steps=c["steps"], cfg=c["cfg"], sampler_name=c["sampler"], scheduler=c["scheduler"],
                     denoise=1.0)
    g.link(model, 0, sampler, "model")
    pos = pos if isinstance(pos, tuple) else (pos, 0)
    g.link(pos[0], pos[1], sampler, "positive")
    g.link(neg, 0, sampler, "negative")
    g.link(latent, 0, sampler, "latent_image")
    decode_and_save(g, ckpt, sampler, (x + 760, 0), 100, (520, 560), prefix)


def reference_chain(g, c, clip: tuple, vae: tuple, top: int):
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
