"""LoRA for the UNet's attention projections (MuDI's Seg-Mix recipe, ``docs/algorithms.md`` §5.2:
rank 32, ``lora_alpha = rank``, Gaussian init, targets ``to_q, to_k, to_v, to_out.0`` of every
attention module) and the kohya/ComfyUI file layout that core's LoraLoader reads. Pure torch.

* :class:`LoRALinear` wraps a frozen ``nn.Linear`` (ComfyUI's ``comfy.ops`` Linear classes are
  subclasses): ``y = base(x) + (alpha / rank) * up(down(x))``; ``down`` is ``rank x in`` drawn from
  N(0, (1/rank)^2) (peft's ``init_lora_weights="gaussian"``, which MuDI uses), ``up`` is ``out x rank``
  zeros, so a fresh LoRA leaves the model unchanged.
* :func:`inject_lora` replaces every matching Linear under a root module (in ComfyUI's UNet: ``attn1``
  and ``attn2`` of every ``CrossAttention``), :func:`remove_lora` puts the original Linears back.
* :func:`set_lora_enabled` switches the LoRA branch off (DCO's reference pass) - a plain call or a
  context manager that restores the previous state.
* :func:`lora_state_dict` / :func:`load_lora_state`: ``lora_unet_<ldm path with '_'>.lora_down.weight``,
  ``.lora_up.weight`` and ``.alpha`` (0-d), which ``comfy.lora.model_lora_keys_unet`` maps onto
  ``diffusion_model.<ldm path>.weight``; ComfyUI then adds ``alpha / rank * up @ down`` to the weight,
  which is :meth:`LoRALinear.merged_weight`.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
DEFAULT_PREFIX = "lora_unet_"
# a module path relative to the ModelPatcher's BaseModel starts with this; the file names ldm paths
_LDM_ROOT = "diffusion_model."


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a low-rank update. ``forward(x) = base(x) + scale * up(down(x))``
    while ``enabled`` (else exactly ``base(x)``), ``scale = alpha / rank``. The LoRA parameters live
    in ``dtype`` (float32 by default) on the base weight's device; the input is cast to ``dtype`` for
    the LoRA branch and its result back to the base output's dtype."""

    def __init__(self, base: nn.Linear, rank: int = 32, alpha: float | None = None,
                 dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if isinstance(rank, bool) or int(rank) != rank or int(rank) < 1:
            raise ValueError(f"rank: must be a positive integer, got {rank!r}")
        rank = int(rank)
        alpha = float(rank if alpha is None else alpha)
        if not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha: must be a positive finite number, got {alpha!r}")
        self.base = base
        self._base_requires_grad = [p.requires_grad for p in base.parameters()]
        base.requires_grad_(False)
        self.rank = rank
        # the file stores alpha as float32; keep the value ComfyUI will read so the scales agree
        self.alpha = float(torch.tensor(alpha, dtype=torch.float32))
        self.scale = self.alpha / self.rank
        self.enabled = True
        device = base.weight.device
        # drawn on the CPU so a seed gives the same values on every device
        down = torch.randn(rank, base.in_features, generator=generator, dtype=torch.float32) / rank
        self.down = nn.Parameter(down.to(device=device, dtype=dtype))
        self.up = nn.Parameter(torch.zeros(base.out_features, rank, device=device, dtype=dtype))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The LoRA branch ``scale * up(down(x))`` in the LoRA dtype."""
        h = x.to(dtype=self.down.dtype)
        return F.linear(F.linear(h, self.down), self.up) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.enabled:
            return out
        return out + self.delta(x).to(out.dtype)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``W + scale * up @ down``, computed in float32 as ComfyUI's LoRA patch does, in the base
        weight's dtype and device."""
        w = self.base.weight
        diff = torch.mm(self.up.detach().float(), self.down.detach().float()).to(w.device)
        return (w.detach().float() + self.scale * diff).to(w.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha:g}, enabled={self.enabled}")


def _matches(path: str, targets) -> bool:
    """Whether a module path ends with one of ``targets`` on a dot boundary (``attn1.to_q`` matches
    ``to_q``, ``my_to_q`` does not)."""
    return any(path == t or path.endswith("." + t) for t in targets)


def _module_seed(seed: int, path: str) -> int:
    """A per-module seed, so a module's initial values depend only on the seed and its own path
    (not on which other modules a filter keeps)."""
    digest = hashlib.sha256(f"{int(seed)}:{path}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFFFFFFFFFFFFFF


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def inject_lora(root: nn.Module, target_names=DEFAULT_TARGETS, rank: int = 32, alpha: float | None = None,
                seed: int = 0, filter=None, dtype: torch.dtype = torch.float32) -> dict[str, LoRALinear]:
    """Wrap every ``nn.Linear`` under ``root`` whose module path ends with one of ``target_names``
    (dot boundary) in a :class:`LoRALinear`, in place. ``filter(path, module) -> bool`` can drop
    candidates. Returns ``{module path relative to root: wrapper}`` in module order. Deterministic:
    each module's ``down`` comes from a generator seeded with ``seed`` and the module's path."""
    if isinstance(target_names, str):
        target_names = (target_names,)
    targets = tuple(str(t) for t in target_names)
    if not targets:
        raise ValueError("target_names: give at least one module name (e.g. 'to_q')")
    existing = [p for p, m in root.named_modules() if isinstance(m, LoRALinear)]
    if existing:
        raise ValueError(f"this model already has {len(existing)} LoRA layers (e.g. {existing[0]}); "
                         f"call remove_lora first")
    found = [(p, m) for p, m in root.named_modules()
             if p and isinstance(m, nn.Linear) and _matches(p, targets) and (filter is None or filter(p, m))]
    if not found:
        raise ValueError(f"no nn.Linear layer under {type(root).__name__} ends with one of "
                         f"{', '.join(targets)}" + (" (after the filter)" if filter is not None else ""))
    loras = {}
    for path, lin in found:
        g = torch.Generator().manual_seed(_module_seed(seed, path))
        wrapper = LoRALinear(lin, rank=rank, alpha=alpha, dtype=dtype, generator=g)
        _set_submodule(root, path, wrapper)
        loras[path] = wrapper
    return loras


def lora_file_bytes(root: nn.Module, rank: int, target_names=DEFAULT_TARGETS, element_size: int = 4) -> int:
    """The size of the LoRA file :func:`inject_lora` + :func:`lora_state_dict` give ``root`` at
    ``rank`` (float32 factors and an alpha per layer), from the layer shapes alone: what a run will
    write, checked against the free space before it starts."""
    targets = (target_names,) if isinstance(target_names, str) else tuple(target_names)
    total = 0
    for path, m in root.named_modules():
        if path and isinstance(m, nn.Linear) and _matches(path, targets):
            total += rank * (m.in_features + m.out_features) * element_size + element_size + 200   # + header entries
    return total


def remove_lora(root: nn.Module) -> int:
    """Put the original Linears back in place of every :class:`LoRALinear` under ``root`` (their
    ``requires_grad`` flags as before the injection). Returns how many were removed."""
    found = [(p, m) for p, m in root.named_modules() if isinstance(m, LoRALinear)]
    for path, wrapper in found:
        for p, flag in zip(wrapper.base.parameters(), wrapper._base_requires_grad):
            p.requires_grad_(flag)
        if path:
            _set_submodule(root, path, wrapper.base)
    return len(found)


def _modules(loras) -> list[LoRALinear]:
    mods = list(loras.values()) if isinstance(loras, Mapping) else list(loras)
    for m in mods:
        if not isinstance(m, LoRALinear):
            raise TypeError(f"expected LoRALinear modules, got {type(m).__name__}")
    return mods


def lora_parameters(loras) -> list[nn.Parameter]:
    """The trainable tensors (``down`` and ``up`` of every wrapper), for the optimizer."""
    return [p for m in _modules(loras) for p in (m.down, m.up)]


class set_lora_enabled:
    """Switch the LoRA branch of ``loras`` (a dict from :func:`inject_lora` or an iterable of
    wrappers) on or off. Takes effect at once; used as a context manager it restores every
    wrapper's previous state on exit::

        with set_lora_enabled(loras, False):   # DCO's reference prediction
            ref = unet(x)
    """

    def __init__(self, loras, flag: bool):
        self._mods = _modules(loras)
        self._prev = [m.enabled for m in self._mods]
        for m in self._mods:
            m.enabled = bool(flag)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for m, prev in zip(self._mods, self._prev):
            m.enabled = prev
        return False


def lora_key(path: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The file's module name for a module path: ``input_blocks.1.1.transformer_blocks.0.attn1.to_q``
    -> ``lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q``. A path relative to ComfyUI's
    BaseModel (``diffusion_model.…``) is taken relative to the UNet."""
    if path.startswith(_LDM_ROOT):
        path = path[len(_LDM_ROOT):]
    return prefix + path.replace(".", "_")


def _keyed(loras, prefix: str) -> dict[str, tuple[str, LoRALinear]]:
    if not isinstance(loras, Mapping):
        raise TypeError("loras: expected the {module path: LoRALinear} dict from inject_lora")
    out = {}
    for path, m in loras.items():
        _modules([m])
        name = lora_key(path, prefix)
        if name in out:
            raise ValueError(f"module paths {out[name][0]!r} and {path!r} both give the key {name!r}")
        out[name] = (path, m)
    return out


@torch.no_grad()
def lora_state_dict(loras, prefix: str = DEFAULT_PREFIX, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The kohya/ComfyUI LoRA tensors of ``loras`` (``{path: LoRALinear}``): for each module
    ``<name>.lora_down.weight`` (rank x in), ``<name>.lora_up.weight`` (out x rank) and
    ``<name>.alpha`` (0-d float32), ``<name> = lora_key(path, prefix)``. CPU tensors, copies, in
    ``dtype`` (default: the LoRA parameters' dtype)."""
    sd = {}
    for name, (_path, m) in sorted(_keyed(loras, prefix).items()):
        sd[f"{name}.lora_down.weight"] = m.down.detach().to("cpu", dtype or m.down.dtype).clone().contiguous()
        sd[f"{name}.lora_up.weight"] = m.up.detach().to("cpu", dtype or m.up.dtype).clone().contiguous()
        sd[f"{name}.alpha"] = torch.tensor(m.alpha, dtype=torch.float32)
    return sd


@torch.no_grad()
def load_lora_state(loras, sd: Mapping, prefix: str = DEFAULT_PREFIX, strict: bool = True) -> int:
    """Copy ``down``/``up`` from a :func:`lora_state_dict`-style dict into ``loras`` (resume).
    Checks shapes and alpha; ``strict``: every wrapper must be present and no other ``prefix`` key
    may be left over. Returns how many wrappers were loaded."""
    keyed = _keyed(loras, prefix)
    used, loaded, missing = set(), 0, []
    for name, (path, m) in keyed.items():
        kd, ku, ka = f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"
        if kd not in sd or ku not in sd:
            missing.append(name)
            continue
        down, up = sd[kd], sd[ku]
        if tuple(down.shape) != tuple(m.down.shape) or tuple(up.shape) != tuple(m.up.shape):
            raise ValueError(f"{name}: the saved LoRA has shapes down {tuple(down.shape)}, up {tuple(up.shape)} but the "
                             f"model needs down {tuple(m.down.shape)}, up {tuple(m.up.shape)} (rank {m.rank}); "
                             f"was it trained with another rank or model?")
        if ka in sd:
            a = float(sd[ka])
            if abs(a - m.alpha) > 1e-6 * max(1.0, abs(m.alpha)):
                raise ValueError(f"{name}: the saved alpha is {a:g} but the model's LoRA uses alpha {m.alpha:g}")
            used.add(ka)
        m.down.copy_(down.to(device=m.down.device, dtype=m.down.dtype))
        m.up.copy_(up.to(device=m.up.device, dtype=m.up.dtype))
        used.update((kd, ku))
        loaded += 1
    if strict:
        if missing:
            raise ValueError(f"the saved LoRA lacks {len(missing)} of the model's {len(keyed)} layers "
                             f"(e.g. {missing[0]})")
        extra = sorted(k for k in sd if k.startswith(prefix) and k not in used)
        if extra:
            raise ValueError(f"the saved LoRA has {len(extra)} keys the model does not use (e.g. {extra[0]})")
    return loaded
