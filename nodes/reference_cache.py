"""The reference reuse node: how the references of Multi-Reference and Disentangle-Mixing Attention
are computed across steps and runs (``attention/ref_cache.py``). Schema, input checks and wiring
only."""
from __future__ import annotations

import math

from comfy_api.latest import io

from ..attention.install import install_policy
from ..attention.ref_cache import DEFAULT_LIMIT_MB, ReferencePolicy
from .checks import check_inputs

EVERY_STEP, ONCE = "every step (FreeCustom)", "once per run"
DEVICES = {"cpu": "cpu", "model device": "model"}
MAX_CACHE_MB = 1 << 20


class ReferenceReuseNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeReferenceReuse",
            display_name="Reference Reuse (cache, once per run)",
            category="personalize/attention",
            description=(
                "Makes the references of Multi-Reference and Disentangle-Mixing Attention cheaper. 'keep across "
                "runs' keeps the references' keys and values of every step, so the next run with the same "
                "references, captions, seed, model and LoRAs, latent size and schedule runs no reference rows at "
                "all (a new seed or prompt for the image only is enough; the result is the same as without the "
                "cache). 'once per run' noises the references to one level for every step instead of FreeCustom's "
                "re-noising per step, so they run in the first step only: faster, but a different result. Place it "
                "anywhere on the MODEL path of those nodes."),
            inputs=[
                io.Model.Input("model", tooltip="A model with (or before) Multi-Reference or Disentangle-Mixing "
                                                "Attention; a patched copy is returned."),
                io.Combo.Input("references_run", options=[EVERY_STEP, ONCE], default=EVERY_STEP,
                               tooltip="'every step': the references are re-noised to each step's noise level, as "
                                       "FreeCustom does. 'once per run': they get one noise level "
                                       "(reference_noise) and run in the first step only."),
                io.Boolean.Input("keep_across_runs", default=True,
                                 tooltip="Keep the references' keys and values for later runs. Off with 'every "
                                         "step': no cache (as without this node)."),
                io.Float.Input("reference_noise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="'once per run' only: the point of the schedule whose noise level the "
                                       "references get. 1.0 = clean references (no noise), 0.5 = the noise of the "
                                       "middle step."),
                io.Int.Input("cache_mb", default=DEFAULT_LIMIT_MB, min=0, max=MAX_CACHE_MB, advanced=True,
                             tooltip="Most memory the kept keys and values may use, in MB (all models together; "
                                     "the least recently used go first). Only the tokens inside each "
                                     "reference's mask are kept."),
                io.Combo.Input("cache_device", options=list(DEVICES), default="cpu", advanced=True,
                               tooltip="Where the kept keys and values live: 'cpu' (system memory, copied to the "
                                       "GPU each step) or 'model device' (GPU memory: faster, but it competes "
                                       "with the model)."),
            ],
            outputs=[io.Model.Output(tooltip="A patched copy of the input model with the reuse policy; the input model is unchanged.")],
        )

    @classmethod
    def execute(cls, model, references_run=EVERY_STEP, keep_across_runs=True, reference_noise=1.0,
                cache_mb=DEFAULT_LIMIT_MB, cache_device="cpu") -> io.NodeOutput:
        check_inputs(cls, locals())
        if references_run not in (EVERY_STEP, ONCE):
            raise ValueError(f"references_run: unknown '{references_run}'; choose '{EVERY_STEP}' or '{ONCE}'")
        if cache_device not in DEVICES:
            raise ValueError(f"cache_device: unknown '{cache_device}'; choose one of {list(DEVICES)}")
        noise = float(reference_noise)
        if not math.isfinite(noise) or not 0.0 <= noise <= 1.0:
            raise ValueError(f"reference_noise: must lie in 0..1, got {reference_noise}")
        if not 0 <= int(cache_mb) <= MAX_CACHE_MB:
            raise ValueError(f"cache_mb: must lie in 0..{MAX_CACHE_MB}, got {cache_mb}")
        once = references_run == ONCE
        policy = None
        if once or keep_across_runs:
            sampling = model.get_model_object("model_sampling")
            sigma = min(float(sampling.percent_to_sigma(noise)), float(sampling.sigma_max)) if once else 0.0
            policy = ReferencePolicy(across_runs=bool(keep_across_runs), once_per_run=once, reference_sigma=sigma,
                                     limit_bytes=int(cache_mb) * 2 ** 20, device=DEVICES[cache_device])
        return io.NodeOutput(install_policy(model, policy))


NODES = [ReferenceReuseNode]
