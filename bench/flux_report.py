"""The report of bench_flux.py: the FLUX presets, positions and reference-token options it measures, its
target, and the ``step``, ``floor``, ``overhead`` and ``subject`` lines of one CFG mode built from the
measured step and section times."""
from __future__ import annotations

from harness import emit, median, rnd

TARGET_STEP_RATIO = 1.8          # mrsa ÷ plain, median step, R=2, default preset (see bench/README.md)
TARGET_PRESET = "single"         # the node's default FLUX preset
PRESETS = {"single": "FLUX dev/schnell: single blocks",
           "double": "FLUX dev/schnell: double blocks",
           "all": "FLUX dev/schnell: all blocks"}
POSITIONS = {"shifted": "shifted (side by side)", "aligned": "aligned"}
TOKENS = {"whole": "whole image", "subject": "subject only (faster)"}     # the node's reference_tokens


def patched_variants(opts) -> list:
    """``[(variant name, preset, tokens)]``: ``mrsa_<preset>`` with whole-image references, then
    ``mrsa_<preset>_subject`` with subject-only references, as ``--tokens`` asks."""
    return [(f"mrsa_{p}" if tok == "whole" else f"mrsa_{p}_{tok}", p, tok) for tok in opts.tokens
            for p in opts.presets]


def mode_cfg(mode: str, opts) -> float:
    return 1.0 if mode == "cfg1" else float(opts.cfg)


SECTIONS = ("total", "pre", "double", "single")
CALL_SPLIT = ("record", "target")        # references-only calls; the calls with the target rows


def section_medians(secs, names=SECTIONS) -> dict:
    out = {}
    for name in names:
        vals = [s[name] for s in secs if s[name] is not None]
        out[f"{name}_s"] = rnd(median(vals)) if vals else None
    return out


def mode_rows(mode, opts, times, per_round, batches, calls_per_step, sections, loads, redone, finals,
              subj_tokens, n_image) -> list:
    """The ``step``, ``floor``, ``overhead`` and ``subject`` lines of one CFG mode."""
    R = opts.refs
    n = 1 if mode == "cfg1" else 2
    plain = (mode, "plain")
    p_med, p_min = median(times[plain]), min(times[plain])
    p_sec = section_medians(sections[plain])
    rows = []

    def step_row(key, variant, tokens=None):
        # Whole image: one call per step of n target + R reference rows. Subject only: R
        # references-only calls of batch 1 (each on its subject's tokens), then the target's call
        # of batch n: R + 1 calls per step. BatchProbe records x's batch, which is 1 for a
        # references call whatever tokens it keeps.
        if tokens == "subject":
            expected_batch, expected_calls, expected_records = sorted({1, n}), R + 1, R
        else:
            expected_batch, expected_calls, expected_records = (n if tokens is None else n + R), 1, 0
        records = sorted({s["record_calls"] for s in sections[key]})
        consistent = (sorted(batches[key]) == (expected_batch if tokens == "subject" else [expected_batch])
                      and sorted(calls_per_step[key]) == [expected_calls] and records == [expected_records])
        med = median(times[key])
        row = {"kind": "step", "mode": mode, "cfg": mode_cfg(mode, opts), "variant": variant,
               "refs": 0 if variant == "plain" else R, "model_batch": sorted(batches[key]),
               "expected_model_batch": expected_batch, "calls_per_step": sorted(calls_per_step[key]),
               "expected_calls_per_step": expected_calls, "layout_consistent": consistent,
               "median_step_s": rnd(med), "min_step_s": rnd(min(times[key])),
               "round_medians_s": [rnd(x) for x in per_round[key]],
               "sections_median_s": section_medians(sections[key]),
               "others_cores_runs": [rnd(x, 2) for x in loads[key]], "runs_redone": redone[key]}
        if tokens is not None:
            row.update(reference_tokens=TOKENS[tokens], mask=opts.mask)
        if tokens == "subject":
            row.update(record_calls_per_step=records, subject_image_tokens=subj_tokens, image_tokens=n_image,
                       calls_median_s=section_medians(sections[key], CALL_SPLIT))
        if variant != "plain":
            # The patch must act: round 1's sample against plain's (same noise, prompt and CFG).
            diff = float((finals[key] - finals[plain]).abs().max())
            row.update(max_abs_diff_vs_plain=rnd(diff), changes_sample=diff > 1e-3)
            whole = (mode, variant[:-len("_subject")])
            if tokens == "subject" and whole in finals:
                # Informational: with all-ones masks the two layouts do the same work (only the
                # float summation order differs); with partial masks the references' features differ.
                row.update(max_abs_diff_vs_whole=rnd(float((finals[key] - finals[whole]).abs().max())))
            row.update(plain_median_step_s=rnd(p_med), ratio_vs_plain=rnd(med / p_med),
                       round_ratios=[rnd(a / b) for a, b in zip(per_round[key], per_round[plain])],
                       ratio_of_min_steps=rnd(min(times[key]) / p_min))
        if variant == f"mrsa_{TARGET_PRESET}":
            row.update(target_max=TARGET_STEP_RATIO, meets_target=med / p_med <= TARGET_STEP_RATIO)
        row.update(steps_measured=len(times[key]), step_s=[rnd(x, 3) for x in times[key]])
        return row

    plain_row = step_row(plain, "plain")
    rows.append(plain_row)
    for name, _, tok in patched_variants(opts):
        rows.append(step_row((mode, name), name, tok))

    fkey = (mode, "floor")
    f_med, f_min = median(times[fkey]), min(times[fkey])
    f_sec = section_medians(sections[fkey])
    floor_row = {"kind": "floor", "mode": mode, "plain_model_batch": n, "floor_model_batch": sorted(batches[fkey]),
                 "expected_model_batch": n + R, "latent_batch": n + R, "cfg": 1.0,
                 "layout_consistent": sorted(batches[fkey]) == [n + R],
                 "plain_median_step_s": rnd(p_med), "floor_median_step_s": rnd(f_med),
                 "floor_ratio": rnd(f_med / p_med),
                 "round_ratios": [rnd(a / b) for a, b in zip(per_round[fkey], per_round[plain])],
                 "ratio_of_min_steps": rnd(f_min / p_min), "sections_median_s": f_sec,
                 "others_cores_runs": [rnd(x, 2) for x in loads[fkey]], "runs_redone": redone[fkey],
                 "steps_measured": len(times[fkey]), "step_s": [rnd(x, 3) for x in times[fkey]]}
    emit(plain_row)
    for row in rows[1:]:
        emit(row)
    emit(floor_row)
    rows.append(floor_row)

    floor_ratio = f_med / p_med
    for p in (opts.presets if "whole" in opts.tokens else []):
        key = (mode, f"mrsa_{p}")
        med = median(times[key])
        ratio = med / p_med
        m_sec = section_medians(sections[key])
        over = {"kind": "overhead", "mode": mode, "preset": PRESETS[p], "refs": R,
                "ratio_vs_plain": rnd(ratio), "floor_ratio": rnd(floor_ratio), "above_floor": rnd(ratio / floor_ratio),
                "above_floor_min_steps": rnd((min(times[key]) / p_min) / (f_min / p_min)),
                "extra_step_s": rnd(med - p_med), "extra_rows_step_s": rnd(f_med - p_med),
                "attention_extra_step_s": rnd(med - f_med)}
        # Section by section against the floor: the double and single sections of the patched
        # model over those of the floor (same rows) show where the patch's own work is.
        for name in ("double", "single"):
            a, b = m_sec[f"{name}_s"], f_sec[f"{name}_s"]
            over[f"{name}_section_vs_floor"] = rnd(a / b) if a and b else None
            over[f"{name}_section_extra_s"] = rnd(a - b) if a is not None and b is not None else None
        if p == "double":
            # The reference rows skip the single blocks after the last patched block, so the
            # right floor for this preset is the floor step with its single section at the plain
            # model's rows: floor step - floor single section + plain single section.
            if f_sec["single_s"] is not None and p_sec["single_s"] is not None:
                est = f_med - f_sec["single_s"] + p_sec["single_s"]
                over.update(rows_floor_est_ratio=rnd(est / p_med), above_rows_floor_est=rnd(med / est))
        emit(over)
        rows.append(over)

    # Subject-only references against whole-image ones and where their step goes: the R
    # references-only calls (batch 1, the subject's image tokens, stopped after the last patched
    # block) and the target's call (batch n, plain's rows plus the attention over the bank).
    p_call = p_sec["total_s"]
    for p in (opts.presets if "subject" in opts.tokens else []):
        key, wkey = (mode, f"mrsa_{p}_subject"), (mode, f"mrsa_{p}")
        med = median(times[key])
        calls = section_medians(sections[key], CALL_SPLIT)
        line = {"kind": "subject", "mode": mode, "preset": PRESETS[p], "refs": R, "mask": opts.mask,
                "subject_image_tokens": subj_tokens, "image_tokens": n_image,
                "ratio_vs_plain": rnd(med / p_med),
                "record_calls_step_s": calls["record_s"], "target_call_step_s": calls["target_s"],
                "plain_call_step_s": p_call,
                "target_call_vs_plain": rnd(calls["target_s"] / p_call) if calls["target_s"] and p_call else None,
                "record_calls_vs_plain": rnd(calls["record_s"] / p_call) if calls["record_s"] and p_call else None}
        if wkey in times:
            w_med = median(times[wkey])
            line.update(whole_ratio_vs_plain=rnd(w_med / p_med), subject_vs_whole=rnd(med / w_med),
                        subject_vs_whole_min_steps=rnd(min(times[key]) / min(times[wkey])),
                        round_ratios_vs_whole=[rnd(a / b) for a, b in zip(per_round[key], per_round[wkey])],
                        saved_step_s=rnd(w_med - med))
        emit(line)
        rows.append(line)
    return rows
