"""Infusion (docs/algorithms.md §6): the offsets module, its file format (this pack's safetensors and
the official checkpoints), the concept token's position, and the attn2 technique against the §6.9(b)
figures and called the way ComfyUI calls an attn2 replace. Pure torch (no ComfyUI)."""
import json
import math

import numpy as np
import pytest
import torch

from personalize_pack.attention.infusion import InfusionAttention, concept_positions, infuse_kv
from personalize_pack.attention.kernels import sdpa_attention
from personalize_pack.attention.patch import (ROWS_KEY, STATE_KEY, PersonalizeAttention, PersonalizeState,
                                              RowLayout)
from personalize_pack.references.prompt_tokens import concept_token_index, token_ids
from personalize_pack.training.infusion import (InfusionOffsets, ldm_path, load_offsets, parse_target_key, save_offsets,
                                                target_key)

# The 16 cross-attention layers of SD1.x/SD2.x and their inner widths.
SD15_WIDTHS = {("input", 1, 0): 320, ("input", 2, 0): 320, ("input", 4, 0): 640, ("input", 5, 0): 640,
               ("input", 7, 0): 1280, ("input", 8, 0): 1280, ("middle", 0, 0): 1280,
               ("output", 3, 0): 1280, ("output", 4, 0): 1280, ("output", 5, 0): 1280,
               ("output", 6, 0): 640, ("output", 7, 0): 640, ("output", 8, 0): 640,
               ("output", 9, 0): 320, ("output", 10, 0): 320, ("output", 11, 0): 320}
KEY = ("input", 1, 0)
BOS, EOS = 49406, 49407


def plain(inner_heads):
    return lambda q, k, v, eo: sdpa_attention(q, k, v, inner_heads)


def call(tech, q, k, v, labels, heads=2, key=KEY, layout=None, extra=None, techs=None, inner=None):
    """Through the shared attn2 replace, as ComfyUI calls it."""
    state = PersonalizeState()
    for t in (techs or [tech]):
        state = state.with_technique(t)
    eo = {STATE_KEY: state, "cond_or_uncond": labels, "sigmas": torch.full((q.shape[0],), 5.0),
          "block": key[:2], "block_index": key[2], "n_heads": heads, "dim_head": q.shape[-1] // heads,
          "original_shape": [q.shape[0], 4, 2, 3]}
    if layout is not None:
        eo[ROWS_KEY] = layout
    eo.update(extra or {})
    return PersonalizeAttention("attn2", inner or plain(heads))(q, k, v, eo)


# --------------------------------------------------------------------------- §6.9(b)

def figures_69b():
    rng = np.random.default_rng(3)
    ctx = rng.standard_normal((2, 5, 6))
    wk = rng.standard_normal((4, 6))
    wv = rng.standard_normal((4, 6))
    dk = rng.standard_normal(4)
    dv = rng.standard_normal(4)
    q = rng.standard_normal((2, 3, 4))
    t = lambda a: torch.from_numpy(a)
    return t(ctx @ wk.T), t(ctx @ wv.T), t(dk), t(dv), t(q)


def test_documented_figures_69b():
    """Batch [uncond, cond], concept word index [-1, 2] -> token 3 (BOS offset) of the cond sample."""
    k, v, dk, dv, q = figures_69b()
    # the word index 2 of the official heuristic is token 3 once the tokenizer's start token counts
    assert concept_token_index([BOS, 10, 11, 12, 13], [12]) == 3
    tech = InfusionAttention({KEY: (dk, dv)}, position=3, prompt_length=5)
    out = call(tech, q, k, v, [1, 0])
    base = sdpa_attention(q, k, v, 2)
    assert out.dtype == torch.float64
    assert torch.equal(out[0], base[0])                         # uncond: the unmodified attention
    assert math.isclose(float(out[1].sum()), -7.5235225, abs_tol=1e-6)
    assert math.isclose(float(base[1].sum()), -7.6372237, abs_tol=1e-6)
    torch.testing.assert_close(out[1, 0], torch.tensor([-0.1938681, -1.3824146, -0.8829922, -0.1562313],
                                                       dtype=torch.float64), atol=1e-6, rtol=0)
    # the kernel alone, and the inputs are not modified
    k0, v0 = k.clone(), v.clone()
    k2, v2 = infuse_kv(k, v, [1], [3], dk, dv)
    assert torch.equal(k, k0) and torch.equal(v, v0)
    torch.testing.assert_close(k2[1, 3], k[1, 3] + dk)
    assert torch.equal(k2[0], k[0]) and torch.equal(k2[1, :3], k[1, :3]) and torch.equal(v2[1, 4], v[1, 4])


# --------------------------------------------------------------------------- the technique

def qkv(rows, n_img=6, n_tok=5, c=8, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, n_img, c, generator=g, dtype=dtype), torch.randn(rows, n_tok, c, generator=g, dtype=dtype),
            torch.randn(rows, n_tok, c, generator=g, dtype=dtype))


def offsets(c=8, seed=2, k=True):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(c, generator=g) if k else None), torch.randn(c, generator=g)


def expected(q, k, v, rows, positions, dk, dv, strength=1.0, heads=2):
    k2, v2 = k.clone(), v.clone()
    for r in rows:
        for p in positions:
            if dk is not None:
                k2[r, p] += strength * dk.double()
            v2[r, p] += strength * dv.double()
    return sdpa_attention(q, k2, v2, heads)


@pytest.mark.parametrize("labels", [[1, 0], [0, 1], [0], [1], [1, 0, 1, 0]])
def test_cond_rows_only_by_label(labels):
    q, k, v = qkv(2 * len(labels))
    dk, dv = offsets()
    tech = InfusionAttention({KEY: (dk, dv)}, 2, 5, strength=0.8)
    out = call(tech, q, k, v, labels)
    chunk = 2
    rows = [j * chunk + i for j, lab in enumerate(labels) if lab == 0 for i in range(chunk)]
    torch.testing.assert_close(out, expected(q, k, v, rows, [2], dk, dv, 0.8))
    base = sdpa_attention(q, k, v, 2)
    for r in range(q.shape[0]):
        assert torch.equal(out[r], base[r]) == (r not in rows)


def test_strength_zero_is_inactive_and_v_only_files():
    q, k, v = qkv(2)
    dk, dv = offsets()
    base = sdpa_attention(q, k, v, 2)
    off = InfusionAttention({KEY: (dk, dv)}, 1, 5, strength=0.0)
    assert not off.active(5.0) and not off.active_at(None, {})
    assert torch.equal(call(off, q, k, v, [1, 0]), base)
    v_only = InfusionAttention({KEY: (None, dv)}, 1, 5)
    torch.testing.assert_close(call(v_only, q, k, v, [1, 0]), expected(q, k, v, [1], [1], None, dv))
    # a layer without offsets is not patched
    assert torch.equal(call(v_only, q, k, v, [1, 0], key=("output", 3, 0)), base)


def test_half_precision_rounds_once():
    q, k, v = qkv(2, dtype=torch.float16)
    dk, dv = offsets()
    k2, v2 = infuse_kv(k, v, [1], [2], dk, dv, 0.5)
    assert k2.dtype == torch.float16
    assert torch.equal(k2[1, 2], (k[1, 2].float() + 0.5 * dk).half())


def test_repeated_conditioning_gets_the_offset_on_every_copy():
    """ComfyUI repeats a shorter prompt to the batch's token count: attention over [c, c] with the
    offset on both copies equals attention over c with the offset."""
    q, k, v = qkv(2, n_tok=5)
    dk, dv = offsets()
    tech = InfusionAttention({KEY: (dk, dv)}, 3, 5)
    single = call(tech, q, k, v, [1, 0])
    doubled = call(tech, q, k.repeat(1, 2, 1), v.repeat(1, 2, 1), [1, 0])
    torch.testing.assert_close(doubled, single)
    assert concept_positions(10, 3, 5) == [3, 8]
    with pytest.raises(ValueError, match="conditioning has 7 tokens.*has 5"):
        concept_positions(7, 3, 5)
    with pytest.raises(ValueError, match="outside"):
        InfusionAttention({KEY: (dk, dv)}, 5, 5)


def test_reference_rows_and_freecure_branches_untouched():
    from personalize_pack.attention.fasa import BRANCH_KEY, BranchLayout
    dk, dv = offsets()
    tech = InfusionAttention({KEY: (dk, dv)}, 1, 5)
    q, k, v = qkv(4)
    # MRSA's joint layout: target rows 0..1 ([uncond, cond]), reference rows 2..3 stay plain
    out = call(tech, q, k, v, [1, 0], layout=RowLayout("joint", [1, 0], 2, (2, 3), 5.0))
    torch.testing.assert_close(out, expected(q, k, v, [1], [1], dk, dv))
    # FreeCure: [personal, foundation] per chunk; only the personal cond row; none in its record call
    joint = call(tech, q, k, v, [1, 0], extra={BRANCH_KEY: BranchLayout("joint", [1, 0], 1, 5.0)})
    torch.testing.assert_close(joint, expected(q, k, v, [2], [1], dk, dv))
    rec = call(tech, q, k, v, [1, 0], extra={BRANCH_KEY: BranchLayout("record", [1, 0], 2, 5.0)})
    assert torch.equal(rec, sdpa_attention(q, k, v, 2))


def mip_technique(c=8, ctx=6, seed=0):
    from personalize_pack.attention.patch import SigmaRange
    from personalize_pack.attention.mip import EncodedPrompt, MultiImagePromptAttention
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    prompts = [EncodedPrompt(f"obj{i}", r(2, ctx), r(2, ctx), r(1, ctx), r(1, ctx)) for i in range(2)]
    wk = r(c, ctx)
    return MultiImagePromptAttention(prompts, {KEY: (r(c, ctx), r(c, ctx), r(c))}, lambda key, x: x @ wk.T.to(x.dtype),
                                     SigmaRange(10.0, 0.0), 0.7)


def test_stacks_with_mip_adapter_in_either_order():
    """Both on attn2 of one block: MIP-Adapter's text attention is computed on the infused keys and
    values; the order of installation does not matter."""
    q, k, v = qkv(2)
    dk, dv = offsets()
    inf = InfusionAttention({KEY: (dk, dv)}, 2, 5)
    mip = mip_technique()
    a = call(None, q, k, v, [1, 0], techs=[inf, mip])
    b = call(None, q, k, v, [1, 0], techs=[mip, inf])
    torch.testing.assert_close(a, b)
    k2, v2 = infuse_kv(k, v, [1], [2], dk, dv)
    mip_on_infused = call(mip, q, k2, v2, [1, 0])
    torch.testing.assert_close(a, mip_on_infused)
    torch.testing.assert_close(a[0], call(mip, q, k, v, [1, 0])[0])      # uncond: MIP-Adapter only
    assert (a[1] - call(mip, q, k, v, [1, 0])[1]).abs().max() > 1e-3


# --------------------------------------------------------------------------- the offsets module

def test_offsets_module_zero_init_and_sizes():
    m = InfusionOffsets(SD15_WIDTHS)
    assert m.num_floats() == 24960                       # K+V, §6.2
    assert InfusionOffsets(SD15_WIDTHS, kv="v").num_floats() == 12480
    assert all(float(p.detach().abs().max()) == 0.0 and p.requires_grad for p in m.parameters())
    assert m.layer_keys()[0] == ("input", 1, 0) and m.layer_keys()[6] == ("middle", 0, 0)
    dk, dv = m.delta(("output", 6, 0))
    assert dk.shape == (640,) and dv.shape == (640,)
    sd = m.to_tensors()
    assert len(sd) == 32 and "input_blocks.1.1.transformer_blocks.0.attn2.to_k.target_output" in sd
    assert "middle_block.1.transformer_blocks.0.attn2.to_v.target_output" in sd
    assert "output_blocks.11.1.transformer_blocks.0.attn2.to_v.target_output" in sd
    # trainable: gradients reach the offsets through the kernel
    k = torch.randn(2, 77, 320)
    v = torch.randn(2, 77, 320)
    dk, dv = m.delta(KEY)
    k2, v2 = infuse_kv(k, v, [1], [5], dk, dv)
    (k2.sum() + 2 * v2.sum()).backward()
    assert torch.equal(dk.grad, torch.ones(320)) and torch.equal(dv.grad, torch.full((320,), 2.0))


def test_layer_names():
    for key in SD15_WIDTHS:
        for w in "kv":
            assert parse_target_key(target_key(key, w)) == (key, w)
    assert ldm_path(("output", 3, 0)) == "output_blocks.3.1.transformer_blocks.0.attn2"
    assert parse_target_key("model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_v.target_output") \
        == (("input", 4, 0), "v")
    assert parse_target_key("input_blocks.4.1.transformer_blocks.0.attn1.to_v.target_output") is None
    with pytest.raises(ValueError, match="not entry 1"):
        parse_target_key("input_blocks.4.2.transformer_blocks.0.attn2.to_v.target_output")


def random_offsets(widths=SD15_WIDTHS, kv="kv", seed=0):
    m = InfusionOffsets(widths, kv=kv)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return m


def same(a: InfusionOffsets, b: InfusionOffsets):
    assert a.widths == b.widths and a.kv == b.kv
    for key in a.widths:
        for x, y in zip(a.delta(key), b.delta(key)):
            assert (x is None and y is None) or torch.equal(x, y)


def test_save_and_load_round_trip(tmp_path):
    from safetensors import safe_open
    m = random_offsets()
    path = save_offsets(tmp_path / "cat.safetensors", m, "cat", "SD1.x")
    f = load_offsets(path)
    same(f.offsets, m)
    assert (f.concept_word, f.family, f.source) == ("cat", "SD1.x", "personalize")
    with safe_open(path, framework="pt") as h:
        meta = h.metadata()
        assert sorted(h.keys()) == sorted(m.to_tensors())
    assert meta["personalize_kind"] == "infusion" and meta["offsets"] == "kv"
    assert json.loads(meta["widths"])["input_blocks.7.1.transformer_blocks.0.attn2"] == 1280
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]          # no temp file left
    v = save_offsets(tmp_path / "v.safetensors", random_offsets(kv="v"), "dog")
    f = load_offsets(v)
    assert f.offsets.kv == "v" and f.family is None and f.offsets.delta(KEY)[0] is None


def official_checkpoint(m: InfusionOffsets, prefix=""):
    """The dictionary the official Infusion's on_save_checkpoint writes (§6.2)."""
    return {"global_step": 500, "C_inv": torch.eye(4), "target_input": torch.zeros(1, 77, 4),
            "embedding": {"string_to_token": {"*": torch.tensor(265)}, "string_to_param": {"*": torch.zeros(1, 4)},
                          "initializer_words": ["cat"]},
            "target_output": {prefix + k: v for k, v in m.to_tensors().items()}}


@pytest.mark.parametrize("kv,prefix", [("kv", ""), ("v", ""), ("v", "model.diffusion_model.")])
def test_official_checkpoints(tmp_path, kv, prefix):
    m = random_offsets(kv=kv, seed=3)
    torch.save(official_checkpoint(m, prefix), tmp_path / "cat.ckpt")
    f = load_offsets(tmp_path / "cat.ckpt")
    same(f.offsets, m)
    assert f.source == "official" and f.concept_word is None and f.family is None
    # a plain state dict, nested under "state_dict", and a safetensors conversion
    torch.save({"state_dict": m.to_tensors()}, tmp_path / "nested.pt")
    same(load_offsets(tmp_path / "nested.pt").offsets, m)
    from safetensors.torch import save_file
    save_file({k: t.half() for k, t in m.to_tensors().items()}, str(tmp_path / "conv.safetensors"))
    assert load_offsets(tmp_path / "conv.safetensors").offsets.kv == kv


class NotATensor:
    pass


def test_bad_files(tmp_path):
    from safetensors.torch import save_file
    good = random_offsets().to_tensors()

    def bad(sd, match, name="bad.safetensors"):
        save_file(sd, str(tmp_path / name))
        with pytest.raises(ValueError, match=match):
            load_offsets(tmp_path / name)

    bad({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, "no Infusion offsets.*not an Infusion file")
    k0 = "input_blocks.1.1.transformer_blocks.0.attn2.to_v.target_output"
    bad(dict(good, **{k0: torch.zeros(2, 320)}), r"shape \[2, 320\]")
    bad(dict(good, **{k0: torch.full((320,), float("nan"))}), "NaN")
    bad(dict(good, **{k0: torch.zeros(64)}), "to_k offset of width 320 but a to_v offset of width 64")
    bad({k: t for k, t in good.items() if not k.startswith("output_blocks.3.")
         or not k.endswith("to_k.target_output")}, "to_k offsets on 15 of 16 layers")
    bad({k: t for k, t in good.items() if "to_v" not in k or "middle" not in k}, "key offset but no value offset")
    bad({"input_blocks.1.1.transformer_blocks.0.attn2.to_q.target_output": torch.zeros(3)}, "not an SD1.x/SD2.x")
    save_file(good, str(tmp_path / "lora.safetensors"), metadata={"personalize_kind": "lora"})
    with pytest.raises(ValueError, match="'lora' file, not an Infusion file"):
        load_offsets(tmp_path / "lora.safetensors")
    (tmp_path / "page.ckpt").write_bytes(b"<!DOCTYPE html><html>nope</html>")
    with pytest.raises(ValueError, match="web page"):
        load_offsets(tmp_path / "page.ckpt")
    torch.save({"target_output": good, "x": NotATensor()}, tmp_path / "pickled.ckpt")
    with pytest.raises(ValueError, match="pickled Python objects"):
        load_offsets(tmp_path / "pickled.ckpt")
    with pytest.raises(ValueError, match="does not exist"):
        load_offsets(tmp_path / "missing.safetensors")


def test_width_checks_against_the_model():
    m = random_offsets()
    m.check_widths(SD15_WIDTHS)
    m.check_widths({**SD15_WIDTHS, ("output", 12, 0): 320})       # extra model layers are left alone
    with pytest.raises(ValueError, match="input_blocks.1.1.transformer_blocks.0.attn2 is 640 wide in the model, "
                                         "320 in the file"):
        m.check_widths({**SD15_WIDTHS, KEY: 640})
    with pytest.raises(ValueError, match="1 of which this model lacks"):
        m.check_widths({k: w for k, w in SD15_WIDTHS.items() if k != ("middle", 0, 0)})


# --------------------------------------------------------------------------- concept token

def comfy_tokens(ids_chunks, key="l"):
    """``clip.tokenize`` output: ``{encoder: [chunk of (token, weight)]}``, every chunk 77 long."""
    out = []
    for ids in ids_chunks:
        chunk = [BOS] + ids + [EOS]
        chunk += [EOS] * (77 - len(chunk))
        out.append([(t, 1.0) for t in chunk])
    return {key: out}


def test_concept_token_index():
    special = token_ids(comfy_tokens([[]]))
    prompt = comfy_tokens([[320, 1125, 539, 320, 2368, 525, 518, 2117]])      # "a photo of a cat on the beach"
    assert concept_token_index(prompt, comfy_tokens([[2368]]), special) == 5
    # a word of two tokens: its first token; the first occurrence
    assert concept_token_index(comfy_tokens([[7, 8, 9, 8, 9]]), comfy_tokens([[8, 9]]), special) == 2
    # long prompts: chunk c, index i -> 77 c + i
    long = comfy_tokens([[5] * 75, [6, 2368, 7]])
    assert concept_token_index(long, [2368]) == 77 + 2 and len(token_ids(long)) == 154
    # a textual-inversion embedding (a vector in place of an id) keeps the positions
    emb = {"h": [[(BOS, 1.0), (torch.zeros(4), 1.0), (2368, 1.0), (EOS, 1.0)]]}
    assert token_ids(emb) == [BOS, -1, 2368, EOS]
    assert concept_token_index(emb, [2368]) == 2
    with pytest.raises(ValueError, match="concept_word 'dog'.*not found in the prompt"):
        concept_token_index(prompt, comfy_tokens([[1929]]), special, word="concept_word 'dog'")
    with pytest.raises(ValueError, match="has no tokens"):
        concept_token_index(prompt, comfy_tokens([[]]), special)
    with pytest.raises(ValueError, match="several encoders"):
        token_ids({"g": [], "t5": []})
