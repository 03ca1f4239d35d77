"""IP-Adapter / MIP-Adapter checkpoints: formats, variant recognition, projections, layer mapping,
bad files (torch + safetensors only)."""
import math
import pickle
import random
import warnings

import pytest
import torch
from safetensors.torch import save_file

from personalize_pack.attention.ip_adapter import adapter_from_state_dict, load_adapter

# ----------------------------------------------------------------------------- ComfyUI block keys
# Hand-written in IP-Adapter processor order (input blocks, output blocks, middle block).

SD15_BLOCKS = ([("input", i, 0) for i in (1, 2, 4, 5, 7, 8)] + [("output", i, 0) for i in range(3, 12)]
               + [("middle", 0, 0)])
SD15_WIDTHS = [320, 320, 640, 640, 1280, 1280] + [1280] * 3 + [640] * 3 + [320] * 3 + [1280]

SDXL_BLOCKS = ([("input", i, j) for i, d in ((4, 2), (5, 2), (7, 10), (8, 10)) for j in range(d)]
               + [("output", i, j) for i, d in ((0, 10), (1, 10), (2, 10), (3, 2), (4, 2), (5, 2))
                  for j in range(d)]
               + [("middle", 0, j) for j in range(10)])
SDXL_WIDTHS = [640] * 4 + [1280] * 20 + [1280] * 30 + [640] * 6 + [1280] * 10

SMALL_SD15 = [w // 32 for w in SD15_WIDTHS]       # 10 / 20 / 40: the same pattern, small
SMALL_SDXL = [w // 64 for w in SDXL_WIDTHS]       # 10 / 20


def blocks_dict(keys, widths, ctx):
    return {k: (w, ctx) for k, w in zip(keys, widths)}


# ----------------------------------------------------------------------------- state-dict builders

def rnd(g, *shape, scale=None):
    scale = scale if scale is not None else 1.0 / math.sqrt(shape[-1])
    return torch.randn(*shape, generator=g) * scale


def layer_norm_params(g, prefix, dim):
    return {prefix + "weight": 1.0 + 0.1 * torch.randn(dim, generator=g),
            prefix + "bias": 0.1 * torch.randn(dim, generator=g)}


def linear_proj(g, clip, tokens, ctx):
    return {"proj.weight": rnd(g, tokens * ctx, clip), "proj.bias": rnd(g, tokens * ctx, scale=0.1),
            **layer_norm_params(g, "norm.", ctx)}


def mlp_proj(g, clip, ctx):
    return {"proj.0.weight": rnd(g, clip, clip), "proj.0.bias": rnd(g, clip, scale=0.1),
            "proj.2.weight": rnd(g, ctx, clip), "proj.2.bias": rnd(g, ctx, scale=0.1),
            **layer_norm_params(g, "proj.3.", ctx)}


def resampler_proj(g, clip, dim, heads, queries, depth, out, ff_mult=4):
    inner = 64 * heads
    sd = {"latents": rnd(g, 1, queries, dim), "proj_in.weight": rnd(g, dim, clip),
          "proj_in.bias": rnd(g, dim, scale=0.1), "proj_out.weight": rnd(g, out, dim),
          "proj_out.bias": rnd(g, out, scale=0.1), **layer_norm_params(g, "norm_out.", out)}
    for i in range(depth):
        a, f = f"layers.{i}.0.", f"layers.{i}.1."
        sd.update(layer_norm_params(g, a + "norm1.", dim))
        sd.update(layer_norm_params(g, a + "norm2.", dim))
        sd.update({a + "to_q.weight": rnd(g, inner, dim), a + "to_kv.weight": rnd(g, 2 * inner, dim),
                   a + "to_out.weight": rnd(g, dim, inner)})
        sd.update(layer_norm_params(g, f + "0.", dim))
        sd.update({f + "1.weight": rnd(g, ff_mult * dim, dim), f + "3.weight": rnd(g, dim, ff_mult * dim)})
    return sd


def ip_layers(g, widths, ctx, gate=False):
    sd = {}
    for n, c in enumerate(widths):
        sd[f"{2 * n + 1}.to_k_ip.weight"] = rnd(g, c, ctx)
        sd[f"{2 * n + 1}.to_v_ip.weight"] = rnd(g, c, ctx)
        if gate:
            sd[f"{2 * n + 1}.text_to_weight.weight"] = rnd(g, 1, c)
    return sd


def checkpoint(image_proj, ip_adapter, dtype=torch.float32):
    cast = lambda d: {k: v.to(dtype).contiguous() for k, v in d.items()}
    return {"image_proj": cast(image_proj), "ip_adapter": cast(ip_adapter)}


def flat(sd):
    return {f"{part}.{k}": v for part, d in sd.items() for k, v in d.items()}


def save(sd, path):
    """Nested pickle for .bin/.pt/.pth (torch.save), flat prefixed keys for .safetensors."""
    if str(path).endswith(".safetensors"):
        save_file(flat(sd), str(path))
    else:
        torch.save(sd, str(path))
    return path


def g_(seed=0):
    return torch.Generator().manual_seed(seed)


# The official layouts at reduced widths (plus resampler: 2 heads of 64 instead of 12/20).
VARIANTS = {
    # name: (builder, expected (kind, variant, family, tokens, clip_output, clip_width, default_scale))
    "sd15": (lambda g: checkpoint(linear_proj(g, 1024, 4, 768), ip_layers(g, SMALL_SD15, 768)),
             ("IP-Adapter", "sd15", "SD1.5", 4, "image_embeds", 1024, 1.0)),
    "sd15_vit-G": (lambda g: checkpoint(linear_proj(g, 1280, 4, 768), ip_layers(g, SMALL_SD15, 768)),
                   ("IP-Adapter", "sd15_vit-G", "SD1.5", 4, "image_embeds", 1280, 1.0)),
    "sd15_plus": (lambda g: checkpoint(resampler_proj(g, 1280, 128, 2, 16, 2, 768),
                                       ip_layers(g, SMALL_SD15, 768)),
                  ("IP-Adapter", "sd15_plus", "SD1.5", 16, "penultimate_hidden_states", 1280, 1.0)),
    "sd15_full_face": (lambda g: checkpoint(mlp_proj(g, 1280, 768), ip_layers(g, SMALL_SD15, 768)),
                       ("IP-Adapter", "sd15_full_face", "SD1.5", 257, "penultimate_hidden_states", 1280,
                        1.0)),
    "sdxl": (lambda g: checkpoint(linear_proj(g, 1280, 4, 2048), ip_layers(g, SMALL_SDXL, 2048)),
             ("IP-Adapter", "sdxl", "SDXL", 4, "image_embeds", 1280, 1.0)),
    "sdxl_vit-h": (lambda g: checkpoint(linear_proj(g, 1024, 4, 2048), ip_layers(g, SMALL_SDXL, 2048)),
                   ("IP-Adapter", "sdxl_vit-h", "SDXL", 4, "image_embeds", 1024, 1.0)),
    "sdxl_plus_vit-h": (lambda g: checkpoint(resampler_proj(g, 1280, 128, 2, 16, 2, 2048),
                                             ip_layers(g, SMALL_SDXL, 2048)),
                        ("IP-Adapter", "sdxl_plus_vit-h", "SDXL", 16, "penultimate_hidden_states", 1280,
                         1.0)),
    "mip_sdxl": (lambda g: checkpoint(linear_proj(g, 1280, 4, 2048), ip_layers(g, SMALL_SDXL, 2048, True),
                                      torch.float16),
                 ("MIP-Adapter", "mip_sdxl", "SDXL", 4, "image_embeds", 1280, 0.75)),
    "mip_sdxl_plus": (lambda g: checkpoint(resampler_proj(g, 1280, 128, 2, 16, 2, 2048),
                                           ip_layers(g, SMALL_SDXL, 2048, True), torch.float16),
                      ("MIP-Adapter", "mip_sdxl_plus", "SDXL", 16, "penultimate_hidden_states", 1280,
                       0.65)),
}


# ----------------------------------------------------------------------------- formats and variants

@pytest.mark.parametrize("ext", [".bin", ".safetensors"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_variants_are_recognised_from_tensors(tmp_path, name, ext):
    build, expected = VARIANTS[name]
    sd = build(g_(1))
    # a misleading file name: recognition must come from the tensors
    path = save(sd, tmp_path / f"ip-adapter-faceid_sd15_plus{ext}")
    a = load_adapter(path)
    got = (a.kind, a.variant, a.family, a.tokens, a.clip_output, a.clip_width, a.default_scale)
    assert got == expected
    assert a.name == path.name
    assert a.context_dim == {"SD1.5": 768, "SDXL": 2048}[a.family]
    widths = SMALL_SD15 if a.family == "SD1.5" else SMALL_SDXL
    assert [layer.to_k_ip.shape for layer in a.layers] == [(w, a.context_dim) for w in widths]
    gated = a.kind == "MIP-Adapter"
    for n, layer in enumerate(a.layers):
        ref = sd["ip_adapter"][f"{2 * n + 1}.to_v_ip.weight"]
        assert layer.to_k_ip.dtype == layer.to_v_ip.dtype == ref.dtype        # kept in the file's precision
        assert (layer.gate is not None) == gated
        assert torch.equal(layer.to_v_ip, ref)
        if gated:
            assert layer.gate.shape == (widths[n],)
            assert torch.equal(layer.gate, sd["ip_adapter"][f"{2 * n + 1}.text_to_weight.weight"][0])
    p = next(a.image_proj.parameters())
    assert p.dtype == torch.float32 and p.device.type == "cpu" and not p.requires_grad
    assert not a.image_proj.training
    text = a.describe()
    assert text.startswith(a.kind + ", " + a.family)
    assert f"{len(widths)} cross-attention layers" in text
    assert ("learned gate" in text) == gated and ("no gate" in text) == (not gated)
    assert f"width {a.clip_width}" in text


def test_describe_reads_well_for_mip_plus(tmp_path):
    a = load_adapter(save(VARIANTS["mip_sdxl_plus"][0](g_(2)), tmp_path / "model_sdxl_plus.bin"))
    assert a.describe() == ("MIP-Adapter, SDXL plus (Resampler, 16 tokens from ViT-H penultimate states, "
                            "width 1280), 70 cross-attention layers, learned gate")
    b = load_adapter(save(VARIANTS["sd15"][0](g_(2)), tmp_path / "ip-adapter_sd15.safetensors"))
    assert b.describe() == ("IP-Adapter, SD1.5 (linear projection, 4 tokens from ViT-H image embeds, "
                            "width 1024), 16 cross-attention layers, no gate")


@pytest.mark.parametrize("ext", [".pt", ".pth"])
def test_other_pickle_extensions_and_legacy_format(tmp_path, ext):
    sd = VARIANTS["sd15"][0](g_(3))
    path = tmp_path / f"a{ext}"
    torch.save(sd, str(path), _use_new_zipfile_serialization=(ext == ".pt"))
    a = load_adapter(path)
    assert a.variant == "sd15" and torch.equal(a.layers[3].to_k_ip, sd["ip_adapter"]["7.to_k_ip.weight"])


def test_nested_and_flat_dicts_give_the_same_adapter():
    sd = VARIANTS["sd15_plus"][0](g_(4))
    a, b = adapter_from_state_dict(sd, "x"), adapter_from_state_dict(flat(sd), "x")
    assert a.variant == b.variant == "sd15_plus"
    x = torch.randn(2, 257, 1280, generator=g_(5))
    assert torch.equal(a.project(x), b.project(x))
    # the MIP training scripts' module name is accepted for the layer part
    c = adapter_from_state_dict({"image_proj": sd["image_proj"], "adapter_modules": sd["ip_adapter"]})
    assert torch.equal(c.layers[5].to_k_ip, a.layers[5].to_k_ip)


def test_sd15_true_shapes_and_layer_mapping(tmp_path):
    """The SD1.5 layout at its real sizes (fp16 like the released files): 16 layers 320/640/1280
    wide, 4 tokens of 768 from 1024-wide ViT-H image embeds; layer n -> ComfyUI block (§0.2)."""
    g = g_(6)
    sd = checkpoint(linear_proj(g, 1024, 4, 768), ip_layers(g, SD15_WIDTHS, 768), torch.float16)
    a = load_adapter(save(sd, tmp_path / "ip-adapter_sd15.bin"))
    b = load_adapter(save(sd, tmp_path / "ip-adapter_sd15.safetensors"))
    for x in (a, b):
        assert (x.kind, x.variant, x.family, x.tokens, x.clip_width, len(x.layers)) == \
            ("IP-Adapter", "sd15", "SD1.5", 4, 1024, 16)
        assert [layer.width for layer in x.layers] == SD15_WIDTHS
    mapping = a.layer_keys(blocks_dict(SD15_BLOCKS, SD15_WIDTHS, 768))
    assert mapping[("input", 1, 0)] == 0
    assert mapping[("input", 8, 0)] == 5
    assert mapping[("output", 3, 0)] == 6
    assert mapping[("output", 11, 0)] == 14
    assert mapping[("middle", 0, 0)] == 15
    assert list(mapping.values()) == list(range(16))
    for key, n in mapping.items():
        assert torch.equal(b.layers[n].to_k_ip, sd["ip_adapter"][f"{2 * n + 1}.to_k_ip.weight"].float())
        assert torch.equal(b.layers[n].to_v_ip, sd["ip_adapter"][f"{2 * n + 1}.to_v_ip.weight"].float())


def test_sdxl_layer_mapping(tmp_path):
    g = g_(7)
    sd = checkpoint(linear_proj(g, 1280, 4, 2048), ip_layers(g, SMALL_SDXL, 2048, gate=True))
    a = load_adapter(save(sd, tmp_path / "model_sdxl.safetensors"))
    mapping = a.layer_keys(blocks_dict(SDXL_BLOCKS, SMALL_SDXL, 2048))
    assert len(mapping) == 70
    inverse = {n: k for k, n in mapping.items()}
    assert inverse[0] == ("input", 4, 0)
    assert inverse[3] == ("input", 5, 1)
    assert inverse[23] == ("input", 8, 9)
    assert inverse[24] == ("output", 0, 0)
    assert inverse[53] == ("output", 2, 9)
    assert inverse[59] == ("output", 5, 1)
    assert inverse[60] == ("middle", 0, 0)
    assert inverse[69] == ("middle", 0, 9)
    for n in (0, 24, 59, 60, 69):
        layer = a.layers[n]
        assert torch.equal(layer.to_k_ip, sd["ip_adapter"][f"{2 * n + 1}.to_k_ip.weight"])
        assert torch.equal(layer.gate, sd["ip_adapter"][f"{2 * n + 1}.text_to_weight.weight"][0])


def test_layer_mapping_does_not_depend_on_the_dict_order():
    a = adapter_from_state_dict(VARIANTS["sdxl"][0](g_(8)))
    items = list(blocks_dict(SDXL_BLOCKS, SMALL_SDXL, 2048).items())
    random.Random(0).shuffle(items)
    mapping = a.layer_keys(dict(items))
    assert mapping == {k: n for n, k in enumerate(SDXL_BLOCKS)}


def test_layer_keys_of_a_tiny_model():
    """A tiny UNet with other block counts: any count works when the adapter was made for it."""
    keys = [("input", 1, 0), ("input", 2, 0), ("output", 0, 0), ("output", 1, 0), ("output", 1, 1),
            ("middle", 0, 0)]
    widths = [8, 8, 16, 16, 16, 32]
    g = g_(9)
    a = adapter_from_state_dict(checkpoint(linear_proj(g, 32, 2, 768), ip_layers(g, widths, 768)))
    assert a.layer_keys(blocks_dict(keys, widths, 768)) == {k: n for n, k in enumerate(keys)}


# ----------------------------------------------------------------------------- projections

def ln(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def test_linear_projection_matches_formula():
    g = g_(10)
    sd = checkpoint(linear_proj(g, 48, 3, 768), ip_layers(g, [8, 8], 768))
    a = adapter_from_state_dict(sd)
    x = torch.randn(2, 48, generator=g)
    p = {k: v.double() for k, v in sd["image_proj"].items()}
    want = ln((x.double() @ p["proj.weight"].T + p["proj.bias"]).reshape(2, 3, 768), p["norm.weight"],
              p["norm.bias"])
    out = a.project(x)
    assert out.shape == (2, 3, 768) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


def test_full_face_projection_matches_formula():
    g = g_(11)
    sd = checkpoint(mlp_proj(g, 40, 768), ip_layers(g, [8], 768))
    a = adapter_from_state_dict(sd)
    x = torch.randn(2, 257, 40, generator=g)
    p = {k: v.double() for k, v in sd["image_proj"].items()}
    h = x.double() @ p["proj.0.weight"].T + p["proj.0.bias"]
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    want = ln(h @ p["proj.2.weight"].T + p["proj.2.bias"], p["proj.3.weight"], p["proj.3.bias"])
    out = a.project(x)
    assert out.shape == (2, 257, 768)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


def resampler_reference(p, x, depth, heads):
    """Plain float64 re-computation of the IP-Adapter Plus Resampler, one head at a time."""
    p = {k: v.double() for k, v in p.items()}
    x = x.double() @ p["proj_in.weight"].T + p["proj_in.bias"]
    out = []
    for b in range(x.shape[0]):
        lat = p["latents"][0].clone()
        feats = x[b]
        for i in range(depth):
            a = f"layers.{i}.0."
            xn = ln(feats, p[a + "norm1.weight"], p[a + "norm1.bias"])
            ln_lat = ln(lat, p[a + "norm2.weight"], p[a + "norm2.bias"])
            q = ln_lat @ p[a + "to_q.weight"].T
            kv = torch.cat([xn, ln_lat], 0) @ p[a + "to_kv.weight"].T
            inner = q.shape[1]
            k, v = kv[:, :inner], kv[:, inner:]
            d = inner // heads
            heads_out = []
            for h in range(heads):
                s = slice(h * d, (h + 1) * d)
                logits = q[:, s] @ k[:, s].T / math.sqrt(d)
                heads_out.append(torch.softmax(logits, -1) @ v[:, s])
            lat = torch.cat(heads_out, 1) @ p[a + "to_out.weight"].T + lat
            f = f"layers.{i}.1."
            h1 = ln(lat, p[f + "0.weight"], p[f + "0.bias"]) @ p[f + "1.weight"].T
            h1 = 0.5 * h1 * (1 + torch.erf(h1 / math.sqrt(2)))
            lat = h1 @ p[f + "3.weight"].T + lat
        y = lat @ p["proj_out.weight"].T + p["proj_out.bias"]
        out.append(ln(y, p["norm_out.weight"], p["norm_out.bias"]))
    return torch.stack(out)


def test_resampler_matches_plain_recomputation():
    g = g_(12)
    proj = resampler_proj(g, clip=48, dim=96, heads=3, queries=5, depth=3, out=768, ff_mult=2)
    a = adapter_from_state_dict(checkpoint(proj, ip_layers(g, [8, 8], 768)))
    assert (a.variant, a.tokens, a.clip_width) == ("sd15_plus_clip48", 5, 48)   # no known CLIP is 48 wide
    x = torch.randn(2, 11, 48, generator=g)
    out = a.project(x)
    assert out.shape == (2, 5, 768) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), resampler_reference(proj, x, 3, 3), atol=2e-5, rtol=1e-5)


def test_projection_of_half_precision_input_is_float32():
    a = adapter_from_state_dict(VARIANTS["mip_sdxl"][0](g_(13)))
    x = torch.randn(3, 1280, generator=g_(14))
    out = a.project(x.half())
    assert out.dtype == torch.float32 and out.shape == (3, 4, 2048)
    torch.testing.assert_close(out, a.project(x.half().float()))


# ----------------------------------------------------------------------------- bad input

class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):           # unpickling this would create the marker file
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch.save", "torch.save legacy", "pickle.dump"])
def test_pickle_with_code_payload_is_refused(tmp_path, writer):
    marker = tmp_path / "payload_ran"
    sd = VARIANTS["sd15"][0](g_(15))
    sd["ip_adapter"]["extra"] = Payload(marker)
    path = tmp_path / "evil.bin"
    if writer == "pickle.dump":          # a plain pickle (protocol 5), not a torch file at all
        with open(path, "wb") as f:
            pickle.dump(sd, f, protocol=5)
    else:
        torch.save(sd, str(path), _use_new_zipfile_serialization=(writer == "torch.save"))
    with warnings.catch_warnings():     # torch warns about the protocol of a plain pickle
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"evil\.bin holds pickled Python objects "
                                             r"\(it asks to import io\.open\).*refused.*\.safetensors"):
            load_adapter(path)
    assert not marker.exists()
    # the payload is real: an unrestricted load would have run it
    with open(path, "rb") as f:
        pickle.load(f) if writer == "pickle.dump" else torch.load(f, map_location="cpu", weights_only=False)
    assert marker.exists()


def test_truncated_safetensors(tmp_path):
    path = save(VARIANTS["sd15"][0](g_(16)), tmp_path / "cut.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.safetensors.*truncated"):
        load_adapter(path)
    path.write_bytes(data[:200])         # inside the JSON header
    with pytest.raises(ValueError, match=r"cut\.safetensors.*truncated"):
        load_adapter(path)


@pytest.mark.parametrize("zip_format", [True, False])
def test_truncated_bin(tmp_path, zip_format):
    path = tmp_path / "cut.bin"
    torch.save(VARIANTS["sd15"][0](g_(17)), str(path), _use_new_zipfile_serialization=zip_format)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.bin.*truncated"):
        load_adapter(path)


def test_random_bytes_and_empty_files(tmp_path):
    path = tmp_path / "noise.bin"
    data = bytearray(random.Random(1).randbytes(4096))
    data[0] = 0x13                      # neither a pickle nor a zip archive
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"noise\.bin.*not an IP-Adapter checkpoint"):
        load_adapter(path)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.safetensors.*empty"):
        load_adapter(empty)
    with pytest.raises(ValueError, match="does not exist"):
        load_adapter(tmp_path / "missing.safetensors")


def test_tensors_of_another_model_are_not_an_adapter(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.weight": torch.zeros(4, 4)}, str(path))
    with pytest.raises(ValueError, match=r"lora\.safetensors.*not an IP-Adapter checkpoint.*lora_unet_down"):
        load_adapter(path)


def test_missing_layer_weight_is_listed(tmp_path):
    sd = VARIANTS["sd15"][0](g_(18))
    del sd["ip_adapter"]["7.to_v_ip.weight"]
    path = save(sd, tmp_path / "broken.safetensors")
    with pytest.raises(ValueError, match=r"broken\.safetensors.*missing: 7\.to_v_ip\.weight \(layer 3\)"):
        load_adapter(path)


def test_missing_layer_and_missing_gate():
    sd = VARIANTS["mip_sdxl"][0](g_(19))
    del sd["ip_adapter"]["5.to_k_ip.weight"], sd["ip_adapter"]["5.to_v_ip.weight"]
    del sd["ip_adapter"]["5.text_to_weight.weight"], sd["ip_adapter"]["9.text_to_weight.weight"]
    with pytest.raises(ValueError, match=r"5\.to_k_ip\.weight \(layer 2\).*9\.text_to_weight\.weight"):
        adapter_from_state_dict(sd, "mip.bin")


def test_missing_parts():
    sd = VARIANTS["sd15"][0](g_(20))
    with pytest.raises(ValueError, match=r"x\.bin.*no image_proj"):
        adapter_from_state_dict({"ip_adapter": sd["ip_adapter"]}, "x.bin")
    with pytest.raises(ValueError, match=r"no ip_adapter"):
        adapter_from_state_dict({"image_proj.proj.weight": sd["image_proj"]["proj.weight"]}, "x.bin")


def test_incomplete_resampler_is_listed():
    sd = VARIANTS["sd15_plus"][0](g_(21))
    del sd["image_proj"]["layers.1.1.3.weight"]
    with pytest.raises(ValueError, match=r"Resampler.*missing layers\.1\.1\.3\.weight"):
        adapter_from_state_dict(sd, "plus.bin")


@pytest.mark.parametrize("kind", ["faceid", "faceid_plus", "portrait"])
def test_faceid_is_recognised_and_refused(kind):
    g = g_(22)
    layers = ip_layers(g, SMALL_SD15, 768)
    proj = {"proj.0.weight": rnd(g, 1024, 512), "proj.0.bias": rnd(g, 1024),
            "proj.2.weight": rnd(g, 4 * 768, 1024), "proj.2.bias": rnd(g, 4 * 768),
            **layer_norm_params(g, "norm.", 768)}
    if kind != "portrait":
        layers["0.to_q_lora.down.weight"] = rnd(g, 128, 320)
        layers["0.to_q_lora.up.weight"] = rnd(g, 320, 128)
    if kind == "faceid_plus":
        proj["perceiver_resampler.proj_in.weight"] = rnd(g, 768, 1280)
    want = {"faceid": "FaceID checkpoint", "faceid_plus": "FaceID Plus", "portrait": "FaceID"}[kind]
    with pytest.raises(ValueError, match=rf"face\.bin.*{want}.*insightface.*not supported"):
        adapter_from_state_dict(checkpoint(proj, layers), "face.bin")


def test_unknown_projection_layout():
    g = g_(23)
    with pytest.raises(ValueError, match=r"unknown layout.*foo\.weight"):
        adapter_from_state_dict(checkpoint({"foo.weight": rnd(g, 4, 4)}, ip_layers(g, [8], 768)), "x")


def test_model_family_mismatch_both_ways():
    sd15 = adapter_from_state_dict(VARIANTS["sd15"][0](g_(24)), "ip-adapter_sd15.safetensors")
    sdxl = adapter_from_state_dict(VARIANTS["sdxl"][0](g_(25)), "ip-adapter_sdxl.safetensors")
    with pytest.raises(ValueError, match=r"an SD1\.5 adapter \(768-wide text conditioning\) on a model "
                                         r"with 2048-wide \(SDXL\) conditioning; load the adapter for "
                                         r"your model family"):
        sd15.layer_keys(blocks_dict(SDXL_BLOCKS, SMALL_SDXL, 2048))
    with pytest.raises(ValueError, match=r"an SDXL adapter \(2048-wide text conditioning\) on a model with "
                                         r"768-wide \(SD1\.5\) conditioning"):
        sdxl.layer_keys(blocks_dict(SD15_BLOCKS, SMALL_SD15, 768))


def test_layer_count_and_width_mismatch():
    a = adapter_from_state_dict(VARIANTS["sd15"][0](g_(26)), "ip.bin")
    fewer = blocks_dict(SD15_BLOCKS[:-1], SMALL_SD15, 768)
    with pytest.raises(ValueError, match=r"16 cross-attention layers, but the model has 15 "
                                         r"\(6 input, 9 output\)"):
        a.layer_keys(fewer)
    widths = list(SMALL_SD15)
    widths[6] = 99
    with pytest.raises(ValueError, match=r"\('output', 3, 0\) is 99 wide, layer 6 \(13\.to_k_ip\) 40"):
        a.layer_keys(blocks_dict(SD15_BLOCKS, widths, 768))
    with pytest.raises(ValueError, match="no cross-attention blocks"):
        a.layer_keys({})


def test_clip_width_mismatch_names_the_model_to_load():
    plus = adapter_from_state_dict(VARIANTS["sdxl_plus_vit-h"][0](g_(27)), "ip-adapter-plus_sdxl_vit-h.bin")
    with pytest.raises(ValueError, match=r"clip_vision:.*1280 wide \(ViT-H\).*gives 1664 \(ViT-bigG\).*"
                                         r"Load the ViT-H CLIP vision model"):
        plus.project(torch.zeros(1, 257, 1664))
    base = adapter_from_state_dict(VARIANTS["sdxl"][0](g_(28)), "ip-adapter_sdxl.bin")
    with pytest.raises(ValueError, match=r"clip_vision:.*1280 wide \(ViT-bigG\).*gives 1024 \(ViT-H\).*"
                                         r"ViT-bigG"):
        base.project(torch.zeros(1, 1024))
    with pytest.raises(ValueError, match=r"clip_vision:.*image_embeds.*\(1, 257, 1280\)"):
        base.project(torch.zeros(1, 257, 1280))      # ViT-H penultimate states are 1280 wide too


def test_inconsistent_projection_and_layers():
    g = g_(29)
    with pytest.raises(ValueError, match=r"768-wide tokens but its layers read 2048-wide"):
        adapter_from_state_dict(checkpoint(linear_proj(g, 64, 4, 768), ip_layers(g, [8], 2048)), "x")


def test_unknown_context_width():
    g = g_(30)
    with pytest.raises(ValueError, match=r"4096-wide context.*SD1\.5 \(768\)"):
        adapter_from_state_dict(checkpoint(linear_proj(g, 64, 4, 4096), ip_layers(g, [8], 4096)), "x")


def test_does_not_import_comfyui():
    import personalize_pack.attention.ip_adapter as mod
    source = open(mod.__file__).read()
    assert "import comfy" not in source and "from comfy" not in source
