"""Putting a technique on a cloned MODEL: its state, the reference-pass wrapper (once) and the
shared replace object on each block it claims (``patch.PersonalizeAttention`` on UNet attention,
``dit_blocks.PersonalizeBlock`` on DiT blocks). ComfyUI is imported inside the functions only.
"""
from __future__ import annotations

from .dit_blocks import install_dit_blocks
from .patch import STATE_KEY, WRAPPER_KEY, PersonalizeAttention, PersonalizeState
from .ref_cache import drop_on_detach, drop_on_new_run
from .reference_pass import reference_pass


def find_replace(model_options, kind: str, key: tuple):
    table = model_options.get("transformer_options", {}).get("patches_replace", {}).get(kind, {})
    return table.get(key, table.get(key[:2]))


def _check_exclusive(state: PersonalizeState) -> None:
    """A technique that owns the batch layout combines with no other such technique and with none
    that adds reference rows."""
    owners = [t for t in state.techniques if t.exclusive]
    if owners and any(t is not owners[0] and (t.exclusive or t.max_reference_rows()) for t in state.techniques):
        others = ", ".join(sorted({t.name for t in state.techniques if t is not owners[0]}))
        raise ValueError(f"model: {owners[0].name} runs a second branch in the batch and cannot be combined with "
                         f"{others} on the same MODEL; apply it to a model without them")


def _check_overrides(state: PersonalizeState) -> None:
    """A technique with its own joint-attention override (native reference control) is the only
    one on a DiT's blocks: another would compute its image queries without the controls."""
    own = [t for t in state.techniques if t.overrides]
    others = [t for t in state.techniques if t.dit is not None and t not in own]
    if len(own) > 1:
        raise ValueError(f"model: it already carries a {own[0].name}; connect the model from before that node, "
                         f"and give every reference its control in one chain")
    if own and others:
        names = ", ".join(sorted({t.name for t in others}))
        raise ValueError(f"model: {own[0].name} and {names} both rewrite the joint attention of this model's blocks "
                         f"and do not combine yet; apply one of them per MODEL")


RUN_CALLBACK_KEY = "personalize.run_state"


def new_run(patcher) -> None:
    """``CallbacksMP.ON_PRE_RUN``: a sampling run starts on ``patcher``; every technique on it
    forgets what an earlier run (another KSampler on the same MODEL, another schedule) left."""
    state = patcher.model_options.get("transformer_options", {}).get(STATE_KEY)
    for tech in state.techniques if state is not None else ():
        tech.new_run()


def install_technique(model, technique):
    """Clone ``model`` and register ``technique``: state, the reference-pass wrapper (once) and
    the shared replace object on each of its blocks. The input MODEL is not touched."""
    from comfy.patcher_extension import CallbacksMP, WrappersMP

    m = model.clone()
    opts = dict(m.model_options.get("transformer_options", {}))
    state = opts.get(STATE_KEY) or PersonalizeState(base_memory_factor=m.get_model_object("memory_usage_factor"))
    state = state.with_technique(technique)
    _check_exclusive(state)
    _check_overrides(state)
    opts[STATE_KEY] = state
    m.model_options["transformer_options"] = opts
    # ComfyUI sizes its batches and frees memory from memory_usage_factor x batch; the reference rows
    # ride in the same call, so raise the factor by the worst case (batch 1 with CFG: 2 rows + refs).
    if state.base_memory_factor is not None:
        m.add_object_patch("memory_usage_factor", state.base_memory_factor * (1 + state.reference_rows() / 2))
    if not m.get_wrappers(WrappersMP.APPLY_MODEL, WRAPPER_KEY):
        m.add_wrapper_with_key(WrappersMP.APPLY_MODEL, WRAPPER_KEY, reference_pass)
    if not m.get_callbacks(CallbacksMP.ON_PRE_RUN, RUN_CALLBACK_KEY):
        m.add_callback_with_key(CallbacksMP.ON_PRE_RUN, RUN_CALLBACK_KEY, new_run)
    if technique.dit is not None:
        install_dit_blocks(m, technique.dit)
        return m
    for kind in ("attn1", "attn2"):
        for key in technique.keys(kind):
            existing = find_replace(m.model_options, kind, key)
            if isinstance(existing, PersonalizeAttention):
                continue
            m.set_model_patch_replace(PersonalizeAttention(kind, existing), kind, key[0], key[1], key[2])
    return m


CACHE_CALLBACK_KEY = "personalize.reference_cache"


def install_policy(model, policy):
    """Clone ``model`` with ``policy`` (``ref_cache.ReferencePolicy``) for the references of every
    technique on it, before or after this, and the callbacks that drop the cached rows when
    ComfyUI unloads the model and, for once-per-run rows, when a new run starts."""
    from comfy.patcher_extension import CallbacksMP

    m = model.clone()
    opts = dict(m.model_options.get("transformer_options", {}))
    state = opts.get(STATE_KEY) or PersonalizeState(base_memory_factor=m.get_model_object("memory_usage_factor"))
    opts[STATE_KEY] = state.with_policy(policy)
    m.model_options["transformer_options"] = opts
    m.add_callback_with_key(CallbacksMP.ON_DETACH, CACHE_CALLBACK_KEY, drop_on_detach)
    m.add_callback_with_key(CallbacksMP.ON_PRE_RUN, CACHE_CALLBACK_KEY, drop_on_new_run)
    return m
