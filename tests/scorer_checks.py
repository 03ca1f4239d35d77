"""Checks that a scoring node runs its network the ComfyUI way: loaded by ComfyUI's model management
(listed in ``current_loaded_models``, freed by ``unload_all_models``), with a progress bar over the
images and Cancel honoured between them. Shared by the integration tests of the scorer nodes."""
from __future__ import annotations

import pytest


def loaded_patchers():
    import comfy.model_management as mm
    return [lm.model for lm in mm.current_loaded_models if lm.model is not None]


def score_with_hook(run, hook):
    """``run()`` with ComfyUI's progress bar hook set to ``hook(value, total)``."""
    import comfy.utils
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, *a, **k: hook(value, total))
    try:
        return run()
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)


def check_model_management(model, patcher_of, run):
    """The scorer is loaded by ComfyUI's model management (listed in current_loaded_models, once even
    after a second run), reports progress per image, and is freed by unload_all_models."""
    import comfy.model_management as mm
    mm.unload_all_models()
    calls = []
    first = score_with_hook(run, lambda v, t: calls.append((v, t)))
    patcher = patcher_of(model)
    assert patcher in loaded_patchers(), "the scorer is not in comfy.model_management.current_loaded_models"
    assert patcher.model.scorer is not None and patcher.model_size() > 0
    total = calls[-1][1]
    values = [v for v, _ in calls]                 # ComfyUI throttles the steps between the first and the last
    assert values[0] == 1 and values[-1] == total and values == sorted(set(values))
    assert run() == first and loaded_patchers().count(patcher) == 1       # reused, not loaded twice
    mm.unload_all_models()
    assert patcher not in loaded_patchers(), "unload_all_models did not free the scorer"
    assert run() == first                                                 # loads again after being freed
    return total


def check_cancel_mid_scoring(run):
    """Cancel pressed while the first image is scored stops the node before the second image."""
    import comfy.model_management as mm
    seen = []

    def press_cancel(value, total):
        seen.append(value)
        mm.interrupt_current_processing(True)

    try:
        with pytest.raises(mm.InterruptProcessingException):
            score_with_hook(run, press_cancel)
    finally:
        mm.interrupt_current_processing(False)
    assert seen == [1], f"scoring went on after Cancel: progress {seen}"
