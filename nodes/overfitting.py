"""Overfitting Metrics (Infusion): the latent Fisher divergence and the Wasserstein-2 distance of a
customised MODEL against its base MODEL. Schema, input checks and wiring only (the work is in
``metrics/overfitting_comfy.py`` and ``metrics/overfitting.py``)."""
from __future__ import annotations

from comfy_api.latest import io

from ..metrics.overfitting_comfy import DEFAULT_PROMPTS_WITH, DEFAULT_PROMPTS_WITHOUT, overfitting_metrics
from ..metrics.overfitting_report import format_report
from .checks import check_inputs
from .types import EvalModelType


class OverfittingMetrics(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeOverfittingMetrics",
            display_name="Overfitting Metrics (Infusion)",
            category="personalize/metrics",
            description=(
                "Infusion's two overfitting metrics of a customised model (LoRA, Infusion, ...) against its base "
                "model. LFD (concept-agnostic): the base model generates latents from prompts WITHOUT the concept; "
                "they are noised to several noise levels and LFD is the mean squared difference of the two models' "
                "scores, ((eps_custom - eps_base)/sigma)^2 per latent element (0 = other concepts untouched). W2 "
                "(concept-specific): the 2-Wasserstein distance between Gaussians fitted to the image features of "
                "the base model's and the customised model's images of prompts WITH the concept (higher = the "
                "concept strays further from the class's variety). Reconstructions of the paper's definitions "
                "(no official code); see the README."),
            inputs=[
                io.Model.Input("base_model", tooltip="The base model the customisation was made from (the plain "
                                                     "checkpoint)."),
                io.Model.Input("custom_model", tooltip="The customised model: the same checkpoint with a LoRA, an "
                                                       "Infusion patch (Apply Infusion), ... Same family as "
                                                       "base_model."),
                io.Clip.Input("clip", tooltip="The CLIP of the base checkpoint; both models get the same "
                                              "encodings."),
                io.Vae.Input("vae", tooltip="The VAE that decodes the W2 images."),
                io.String.Input("prompts_without", multiline=True, default=DEFAULT_PROMPTS_WITHOUT,
                                tooltip="Prompts WITHOUT the concept, one per line (LFD). The base model generates "
                                        "the latents the two models are compared on."),
                io.String.Input("prompts_with", multiline=True, default=DEFAULT_PROMPTS_WITH,
                                tooltip="Prompts WITH the concept, one per line (W2), written as you prompt the "
                                        "customised model (the class word for Infusion, the identifier phrase for a "
                                        "DreamBooth-style LoRA). Both models generate from the same prompts and "
                                        "seeds. For an Apply Infusion model keep the concept word where it is in "
                                        "Apply Infusion's prompt (its patch acts at that token position)."),
                io.Int.Input("levels", advanced=True, default=8, min=1, max=1000,
                             tooltip="Noise levels for LFD: evenly spaced quantiles of the model's 1000 training "
                                     "timesteps (bin midpoints, from high noise to low)."),
                io.Int.Input("samples", advanced=True, default=4, min=1, max=256,
                             tooltip="Samples per prompt (latents for LFD, images per model for W2)."),
                io.Int.Input("steps", default=20, min=1, max=1000,
                             tooltip="Sampling steps of the generated latents and images (euler, normal)."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1,
                               tooltip="CFG scale of the generations (negative prompt empty)."),
                io.Int.Input("resolution", default=512, min=64, max=4096, step=8,
                             tooltip="Width and height of the generations in pixels."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the generations and of the LFD noise; the same seed gives the same "
                                     "numbers."),
                EvalModelType.Input("eval_model", optional=True,
                                    tooltip="Optional CLIP or DINO model from Evaluation Model Loader for W2. "
                                            "Without it W2 is NaN, the report says so, and no W2 images are "
                                            "generated."),
            ],
            outputs=[io.Float.Output(display_name="lfd", tooltip="Latent Fisher divergence of the custom model from the base (concept-agnostic)."),
                     io.Float.Output(display_name="w2", tooltip="Wasserstein-2 distance of the custom model from the base (concept-specific)."),
                     io.String.Output(display_name="report", tooltip="Both measures with their details, as text.")],
        )

    @classmethod
    def execute(cls, base_model, custom_model, clip, vae, prompts_without, prompts_with, levels=8, samples=4,
                steps=20, cfg=7.5, resolution=512, seed=0, eval_model=None) -> io.NodeOutput:
        check_inputs(cls, locals())
        import comfy.utils
        pbar = None

        def progress(done, total, stage):
            nonlocal pbar
            if pbar is None:
                pbar = comfy.utils.ProgressBar(total)
            pbar.update_absolute(done, total)

        report = overfitting_metrics(base_model, custom_model, clip, vae, eval_model, prompts_without, prompts_with,
                                     levels=levels, samples=samples, steps=steps, seed=seed, size=resolution,
                                     progress=progress, cfg=cfg)
        return io.NodeOutput(report["lfd"], report["w2"], format_report(report))


NODES = [OverfittingMetrics]
