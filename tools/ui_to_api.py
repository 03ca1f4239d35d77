"""UI-format ComfyUI workflows (the JSON the frontend saves) to API prompts, by the live node schemas.

Pure Python: ``ui_to_api`` needs only each node's ``INPUT_TYPES()`` dict. The widget rules
(``widget_slots``) say which entries of a node's ``widgets_values`` belong to which input; the workflow
generator (tools/make_workflows.py) lays values out with the same rules, so a generated workflow converts
back to exactly its values.
"""
from __future__ import annotations

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
VIRTUAL_TYPES = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}
MODE_MUTED, MODE_BYPASSED = 2, 4
UPLOAD_FLAGS = ("image_upload", "video_upload", "animated_image_upload", "audio_upload", "mesh_upload")


class WorkflowError(Exception):
    """A workflow that cannot be converted, validated or executed; the message says why."""


def ordered_inputs(schema: dict):
    for section in ("required", "optional"):
        for name, spec in (schema.get(section) or {}).items():
            if isinstance(spec, (list, tuple)) and spec:
                typ = spec[0]
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            else:
                typ, opts = spec, {}
            yield name, typ, opts


def is_widget(typ, opts: dict) -> bool:
    if opts.get("forceInput"):
        return False
    return isinstance(typ, (list, tuple)) or (isinstance(typ, str) and typ in WIDGET_TYPES)


def widget_slots(schema: dict) -> list[tuple[str, str, dict]]:
    """The node's entries of ``widgets_values`` in order, as (input name, kind, options), kind being
    "value", "control" (control_after_generate), "filter" (a combo's control filter list) or
    "upload" (the upload button of a media combo, present in most saved workflows)."""
    slots = []
    for name, typ, opts in ordered_inputs(schema):
        if not is_widget(typ, opts):
            continue
        slots.append((name, "value", opts))
        control = opts.get("control_after_generate")
        if typ == "INT" and control is None:
            control = name in ("seed", "noise_seed")   # the frontend's legacy rule
        if control and typ in ("INT", "FLOAT"):
            slots.append((name, "control", opts))
        elif control:
            slots += [(name, "control", opts), (name, "filter", opts)]
        if any(opts.get(flag) for flag in UPLOAD_FLAGS):
            slots.append((name, "upload", opts))
    return slots


def widget_values(schema: dict, values) -> dict:
    """Map a node's ``widgets_values`` onto its widget inputs by name."""
    if isinstance(values, dict):       # some packs save {widget name: value}
        return {n: values[n] for n, kind, _ in widget_slots(schema) if kind == "value" and n in values}
    values = list(values or [])
    slots = widget_slots(schema)
    if len(values) < len(slots):       # upload buttons are not saved by every frontend version
        slots = [s for s in slots if s[1] != "upload"]
    out, it = {}, iter(values)
    for name, kind, opts in slots:
        try:
            v = next(it)
        except StopIteration:
            if kind == "value" and "default" in opts:
                out[name] = opts["default"]
            continue
        if kind == "value":
            out[name] = v
    return out


def _links_by_id(workflow: dict) -> dict:
    links = {}
    for link in workflow.get("links") or []:
        if isinstance(link, dict):
            links[link["id"]] = (link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                                 link.get("type"))
        else:
            links[link[0]] = tuple(link[1:6])
    return links


def _types_match(a, b) -> bool:
    return a == b or "*" in (a, b) or not a or not b


def ui_to_api(workflow: dict, schemas: dict) -> dict:
    """Convert a UI-format workflow to an API prompt ``{id: {"class_type", "inputs", "_meta"}}``.

    ``schemas`` maps each class_type to its ``INPUT_TYPES()`` dict. Widget inputs take the node's
    ``widgets_values`` in schema order; a linked input (a socket, or a widget converted to an input)
    takes its link. Notes, muted nodes and their outputs are dropped; bypassed nodes pass an input of
    the same type through; Reroute nodes are followed; a PrimitiveNode's value is written into the
    inputs it feeds.
    """
    if "nodes" not in workflow:
        raise WorkflowError("not a UI-format workflow (no 'nodes'); API-format prompts can be queued directly")
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = _links_by_id(workflow)
    subgraphs = {s.get("id") for s in (workflow.get("definitions") or {}).get("subgraphs", [])}

    def active(node):
        return node.get("mode", 0) not in (MODE_MUTED, MODE_BYPASSED) and node["type"] not in VIRTUAL_TYPES

    missing = sorted({n["type"] for n in nodes.values() if active(n) and n["type"] not in schemas})
    if missing:
        if any(t in subgraphs for t in missing):
            raise WorkflowError("the workflow contains subgraphs, which this runner does not support; "
                                "unpack them in the ComfyUI editor first")
        raise WorkflowError(f"unknown node type(s) {', '.join(missing)}: the custom nodes that provide them "
                            "are not installed or failed to import")

    def resolve(link_id, depth=0):
        """("link", [node_id, slot]), ("value", v) or None (nothing arrives through this link)."""
        if link_id is None or link_id not in links or depth > 256:
            return None
        origin_id, origin_slot, _, _, link_type = links[link_id]
        origin = nodes.get(origin_id)
        if origin is None:
            return None
        kind, mode = origin["type"], origin.get("mode", 0)
        if kind == "Reroute":
            ins = origin.get("inputs") or []
            return resolve(ins[0].get("link"), depth + 1) if ins else None
        if kind == "PrimitiveNode":
            vals = origin.get("widgets_values") or []
            return ("value", vals[0]) if vals else None
        if mode == MODE_MUTED or kind in VIRTUAL_TYPES:
            return None
        if mode == MODE_BYPASSED:
            outs = origin.get("outputs") or []
            want = outs[origin_slot].get("type") if origin_slot < len(outs) else link_type
            ins = origin.get("inputs") or []
            order = ([origin_slot] if origin_slot < len(ins) else []) + list(range(len(ins)))
            for i in order:
                if ins[i].get("link") is not None and _types_match(ins[i].get("type"), want):
                    return resolve(ins[i]["link"], depth + 1)
            return None
        return ("link", [str(origin_id), origin_slot])

    prompt = {}
    for node_id in sorted(nodes, key=lambda i: (nodes[i].get("order", 0), str(i))):
        node = nodes[node_id]
        if not active(node):
            continue
        schema = schemas[node["type"]]
        inputs = widget_values(schema, node.get("widgets_values"))
        for slot in node.get("inputs") or []:
            got = resolve(slot.get("link"))
            if got is not None:
                inputs[slot["name"]] = got[1]
        prompt[str(node_id)] = {"class_type": node["type"], "inputs": inputs,
                                "_meta": {"title": node.get("title") or node["type"]}}
    return prompt
