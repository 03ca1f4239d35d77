"""FreeCure's FASA (docs/algorithms.md §4): the kernel figures of §4.10, the technique called the way
ComfyUI calls an attn1 replace in each branch layout, and the two wrappers with stand-in executors."""
import numpy as np
import pytest
import torch

from personalize_pack.attention.blocks import SD15_FREECURE, SDXL_FREECURE, fasa_layer_keys
from personalize_pack.attention.fasa import (BATCH_KEY, BRANCH_KEY, BranchLayout, FoundationAwareAttention, double_batch,
                                             foundation_branch, strip_foreign_attention)
from personalize_pack.attention.kernels import mrsa_attention, sdpa_attention, select_reference_keys
from personalize_pack.attention.patch import STATE_KEY, PersonalizeAttention, PersonalizeState, SigmaRange

from attention_reference import reference_mrsa, run_ours, to_bnc

HEADS, DIM = 2, 4
KEY = ("output", 6, 0)


def doc_inputs():
    rng = np.random.default_rng(0)
    q, k, v, k1, v1 = (rng.standard_normal((2, 16, 4)) for _ in range(5))
    m1 = np.array([[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]], dtype=np.float64)
    return q, k, v, k1, v1, m1


def test_documented_figures_410():
    q, k, v, k1, v1, m1 = doc_inputs()
    want, _ = reference_mrsa(q, k, v, [k1], [v1], [m1], [1.5])
    assert want.sum() == pytest.approx(-22.5848083, abs=1e-6)
    np.testing.assert_allclose(want[5, :4], [-0.1661473, 0.5166418, -0.0615421, -0.307159], atol=1e-6)
    np.testing.assert_allclose(run_ours(q, k, v, [k1], [v1], [m1], [1.5], 2), want, atol=1e-10)


def test_identical_branches_with_full_mask_are_plain_attention():
    q, k, v, *_ = doc_inputs()
    refs = select_reference_keys(to_bnc(k), to_bnc(v), [torch.ones(16, dtype=torch.float64)], [1.5])
    torch.testing.assert_close(mrsa_attention(to_bnc(q), to_bnc(k), to_bnc(v), refs, 2),
                               sdpa_attention(to_bnc(q), to_bnc(k), to_bnc(v), 2))


# --------------------------------------------------------------------------- technique

def technique(masks=None, weight=1.5, sigma_range=(10.0, 0.0), foundation=None, strip=False):
    if masks is None:
        masks = torch.zeros(1, 32, 32)
        masks[:, 8:24, 8:24] = 1             # tokens (1..2, 1..2) of a 4x4 grid
    f = torch.randn(1, 5, 8, generator=torch.Generator().manual_seed(3)) if foundation is None else foundation
    return FoundationAwareAttention(f, masks, weight, [KEY], SigmaRange(*sigma_range), strip_patches=strip)


def qkv(rows, n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(rows, n, HEADS * DIM, generator=g, dtype=torch.float64) for _ in range(3))


def call(tech, q, k, v, layout, labels, hw=(4, 4)):
    eo = {STATE_KEY: PersonalizeState().with_technique(tech), "cond_or_uncond": labels, BRANCH_KEY: layout,
          "block": KEY[:2], "block_index": KEY[2], "n_heads": HEADS, "dim_head": DIM,
          "original_shape": [q.shape[0], 4, *hw]}
    return PersonalizeAttention("attn1")(q, k, v, eo)


def expected(q, k, v, r, f, mask_tokens, weight):
    h = lambda x: x.reshape(x.shape[0], HEADS, DIM).permute(1, 0, 2).numpy()
    out, _ = reference_mrsa(h(q[r]), h(k[r]), h(v[r]), [h(k[f])], [h(v[f])], [mask_tokens], [weight])
    return torch.from_numpy(out)


def token_mask():
    m = np.zeros((4, 4))
    m[1:3, 1:3] = 1
    return m.reshape(-1)


@pytest.mark.parametrize("labels", [[1, 0], [0, 1], [0]])
@pytest.mark.parametrize("batch", [1, 2])
def test_joint_layout(labels, batch):
    tech = technique()
    rows = 2 * batch * len(labels)
    q, k, v = qkv(rows)
    layout = BranchLayout("joint", labels, batch, 5.0)
    out = call(tech, q, k, v, layout, labels)
    plain = sdpa_attention(q, k, v, HEADS)
    chunk = 2 * batch
    cond = [j * chunk + i for j, lab in enumerate(labels) if lab == 0 for i in range(batch)]
    for r in range(rows):
        if r in cond:
            torch.testing.assert_close(out[r], expected(q, k, v, r, r + batch, token_mask(), 1.5))
        else:
            torch.testing.assert_close(out[r], plain[r])


def test_record_then_read_equals_joint():
    tech = technique()
    labels, batch = [1, 0], 2
    q, k, v = qkv(8)
    joint = call(tech, q, k, v, BranchLayout("joint", labels, batch, 5.0), labels)
    found = [2, 3, 6, 7]
    pers = [0, 1, 4, 5]
    bank = {}
    rec = call(tech, q[found], k[found], v[found], BranchLayout("record", labels, batch, 5.0, bank), labels)
    assert KEY in bank
    read = call(tech, q[pers], k[pers], v[pers], BranchLayout("read", labels, batch, 5.0, bank), labels)
    torch.testing.assert_close(read, joint[pers])
    torch.testing.assert_close(rec, joint[found])


def test_weight_zero_empty_masks_and_sigma_gate_are_plain():
    q, k, v = qkv(4)
    plain = sdpa_attention(q, k, v, HEADS)
    layout = BranchLayout("joint", [1, 0], 1, 5.0)
    for tech in (technique(weight=0.0), technique(masks=torch.zeros(1, 32, 32)), technique(sigma_range=(3.0, 1.0))):
        torch.testing.assert_close(call(tech, q, k, v, layout, [1, 0]), plain)


def test_per_image_masks_and_mask_errors():
    m = torch.zeros(2, 32, 32)
    m[0, :16] = 1
    m[1, 16:] = 1
    tech = technique(masks=m)
    q, k, v = qkv(4)
    out = call(tech, q, k, v, BranchLayout("joint", [0], 2, 5.0), [0])
    top = np.zeros(16)
    top[:8] = 1
    torch.testing.assert_close(out[0], expected(q, k, v, 0, 2, top, 1.5))
    torch.testing.assert_close(out[1], expected(q, k, v, 1, 3, 1 - top, 1.5))
    with pytest.raises(ValueError, match="2 attribute masks for 3 images"):
        call(tech, *qkv(6), BranchLayout("joint", [0], 3, 5.0), [0])
    with pytest.raises(ValueError, match="aspect ratio"):
        call(technique(masks=torch.ones(1, 32, 64)), q, k, v, BranchLayout("joint", [0], 2, 5.0), [0])
    with pytest.raises(ValueError, match="foundation"):
        FoundationAwareAttention(None, m, 1.5, [KEY], SigmaRange(10, 0), strip_patches=False)


def test_layer_presets():
    sdxl = {("input", 4): 2, ("input", 5): 2, ("input", 7): 10, ("input", 8): 10, ("middle", 0): 10,
            **{("output", i): 10 for i in range(3)}, **{("output", i): 2 for i in range(3, 6)}}
    keys = fasa_layer_keys(SDXL_FREECURE, "", sdxl)
    assert len(keys) == 20                          # execution indices 50..69
    assert keys[:4] == tuple(("output", 1, j) for j in range(6, 10)) and ("output", 5, 1) in keys
    sd15 = {**{("input", i): 1 for i in (1, 2, 4, 5, 7, 8)}, ("middle", 0): 1, **{("output", i): 1 for i in range(3, 12)}}
    assert fasa_layer_keys(SD15_FREECURE, "", sd15) == tuple(("output", i, 0) for i in range(6, 12))
    with pytest.raises(ValueError, match="SDXL's decoder"):
        fasa_layer_keys(SDXL_FREECURE, "", sd15)


# --------------------------------------------------------------------------- wrappers

class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        self.calls.append(dict(x=x, t=t, c=c_crossattn, control=control, opts=transformer_options, kw=kwargs))
        return x * 2 + 1


def test_foundation_branch_joint_swaps_only_the_cond_foundation_rows():
    f = torch.full((1, 3, 8), 7.0)
    tech = technique(foundation=f)
    ex = Recorder()
    x = torch.randn(8, 4, 4, 4)
    ctx = torch.randn(8, 6, 8)
    opts = {STATE_KEY: PersonalizeState().with_technique(tech), BATCH_KEY: 2, "cond_or_uncond": [1, 0]}
    out = foundation_branch(ex, x, torch.full((8,), 5.0), None, ctx, None, opts, y=torch.randn(8, 3))
    torch.testing.assert_close(out, x * 2 + 1)
    c = ex.calls[0]["c"]
    assert c.shape == (8, 6, 8)                                  # lcm(6, 3) tokens
    torch.testing.assert_close(c[[0, 1, 2, 3, 4, 5]], ctx[[0, 1, 2, 3, 4, 5]])   # uncond chunk, cond personalised
    assert torch.all(c[6:] == 7.0)                               # cond chunk, foundation rows
    layout = ex.calls[0]["opts"][BRANCH_KEY]
    assert layout.mode == "joint" and layout.batch == 2 and layout.personal_rows(0) == [4, 5]
    # not doubled by our sampler wrapper: untouched
    ex2 = Recorder()
    small = ctx[:4]
    foundation_branch(ex2, x[:4], torch.full((4,), 5.0), None, small, None,
                      {STATE_KEY: PersonalizeState().with_technique(tech), "cond_or_uncond": [1, 0]})
    assert ex2.calls[0]["c"] is small and BRANCH_KEY not in ex2.calls[0]["opts"]


def test_foundation_branch_strip_runs_the_foundation_rows_first_without_foreign_cross_attention():
    tech = technique(strip=True)
    ex = Recorder()
    x = torch.randn(4, 4, 4, 4)
    foreign = lambda q, k, v, eo: q
    ours = PersonalizeAttention("attn2", foreign)
    opts = {STATE_KEY: PersonalizeState().with_technique(tech), BATCH_KEY: 1, "cond_or_uncond": [1, 0],
            "sigmas": torch.full((4,), 5.0),
            "patches_replace": {"attn2": {("input", 1, 0): foreign, ("input", 2, 0): ours},
                                "attn1": {KEY: PersonalizeAttention("attn1")}},
            "patches": {"attn2_patch": [foreign], "attn1_patch": [foreign]}}
    control = {"output": [torch.arange(4.0).view(4, 1, 1, 1)], "middle": [None]}
    out = foundation_branch(ex, x, torch.full((4,), 5.0), None, torch.randn(4, 5, 8), control, opts,
                            y=torch.arange(4.0))
    torch.testing.assert_close(out, x * 2 + 1)
    rec, read = ex.calls
    assert rec["opts"][BRANCH_KEY].mode == "record" and read["opts"][BRANCH_KEY].mode == "read"
    torch.testing.assert_close(rec["x"], x[[1, 3]])
    torch.testing.assert_close(read["x"], x[[0, 2]])
    torch.testing.assert_close(rec["kw"]["y"], torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(rec["control"]["output"][0].flatten(), torch.tensor([1.0, 3.0]))
    table = rec["opts"]["patches_replace"]["attn2"]
    assert ("input", 1, 0) not in table and table[("input", 2, 0)].inner is None
    assert "attn2_patch" not in rec["opts"]["patches"] and rec["opts"]["patches"]["attn1_patch"] == [foreign]
    assert read["opts"]["patches_replace"]["attn2"][("input", 1, 0)] is foreign     # the identity stays on
    assert rec["opts"]["sigmas"].shape == (2,)
    assert opts["patches_replace"]["attn2"][("input", 1, 0)] is foreign           # the caller's options untouched
    s = strip_foreign_attention(opts)
    assert s is not opts and opts["patches"]["attn2_patch"] == [foreign]


class HookedPatcher:
    """ComfyUI's ModelPatcher as far as hooks go: the hooks whose weights are on, and apply_hooks."""

    def __init__(self, hooks):
        self.current_hooks, self.applied = hooks, []

    def apply_hooks(self, hooks, transformer_options=None, force_apply=False):
        self.applied.append(hooks)
        self.current_hooks = hooks


class HookRecorder(Recorder):
    def __init__(self, patcher):
        super().__init__()
        self.class_obj = type("BaseModel", (), {"current_patcher": patcher})()

    def __call__(self, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        out = super().__call__(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        self.calls[-1]["hooks"] = self.class_obj.current_patcher.current_hooks
        return out


def test_foundation_branch_lora_hooks_mode_runs_the_foundation_rows_without_the_hooks():
    masks = torch.ones(1, 32, 32)
    tech = FoundationAwareAttention(None, masks, 1.5, [KEY], SigmaRange(10.0, 0.0), strip_hooks=True)
    patcher = HookedPatcher("identity lora")
    ex = HookRecorder(patcher)
    x, ctx = torch.randn(4, 4, 4, 4), torch.randn(4, 5, 8)
    foreign = lambda q, k, v, eo: q
    opts = {STATE_KEY: PersonalizeState().with_technique(tech), BATCH_KEY: 1, "cond_or_uncond": [1, 0],
            "patches_replace": {"attn2": {("input", 1, 0): foreign}}}
    out = foundation_branch(ex, x, torch.full((4,), 5.0), None, ctx, None, opts)
    torch.testing.assert_close(out, x * 2 + 1)
    rec, read = ex.calls
    assert (rec["hooks"], read["hooks"]) == (None, "identity lora")      # the base model, then the LoRA again
    assert patcher.applied == [None, "identity lora"] and patcher.current_hooks == "identity lora"
    assert rec["opts"][BRANCH_KEY].mode == "record" and read["opts"][BRANCH_KEY].mode == "read"
    torch.testing.assert_close(rec["c"], ctx[[1, 3]])                      # no foundation prompt: the same prompt
    assert rec["opts"]["patches_replace"]["attn2"][("input", 1, 0)] is foreign   # attention patches stay on

    # no hooks on a cond chunk: the foundation would be the personalised model itself
    with pytest.raises(ValueError, match="LoRA-hook mode.*carries none"):
        foundation_branch(HookRecorder(HookedPatcher(None)), x, torch.full((4,), 5.0), None, ctx, None, opts)
    # an uncond chunk without hooks (the LoRA set on the positive prompt only) runs as it is
    alone = dict(opts, cond_or_uncond=[1])
    ex = HookRecorder(HookedPatcher(None))
    foundation_branch(ex, x[:2], torch.full((2,), 5.0), None, ctx[:2], None, alone)
    assert [c["hooks"] for c in ex.calls] == [None, None] and ex.class_obj.current_patcher.applied == []


class FakeGuider:
    def __init__(self, tech):
        self.model_options = {"transformer_options": {STATE_KEY: PersonalizeState().with_technique(tech)}}


class OuterExecutor:
    def __init__(self, guider):
        self.class_obj = guider
        self.seen = None

    def __call__(self, noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed,
                 latent_shapes=None):
        self.seen = dict(noise=noise, latent=latent_image, mask=denoise_mask, shapes=latent_shapes,
                         batch=self.class_obj.model_options["transformer_options"].get(BATCH_KEY))
        return torch.cat([noise[:noise.shape[0] // 2] + 100, noise[noise.shape[0] // 2:] - 100])


def test_double_batch_same_noise_personalised_half_returned():
    guider = FakeGuider(technique())
    ex = OuterExecutor(guider)
    noise = torch.randn(2, 4, 4, 4)
    latent = torch.randn(2, 4, 4, 4)
    mask = torch.rand(2, 4, 4, 4)
    out = double_batch(ex, noise, latent, None, None, mask, None, True, 5, latent_shapes=[(2, 4, 4, 4)])
    torch.testing.assert_close(ex.seen["noise"], torch.cat([noise, noise]))
    torch.testing.assert_close(ex.seen["latent"], torch.cat([latent, latent]))
    torch.testing.assert_close(ex.seen["mask"], torch.cat([mask, mask]))
    assert ex.seen["shapes"] == [(4, 4, 4, 4)] and ex.seen["batch"] == 2
    torch.testing.assert_close(out, noise + 100)
    assert BATCH_KEY not in guider.model_options["transformer_options"]
