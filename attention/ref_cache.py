"""Reference keys/values kept beyond one model call (issue 18). Pure torch; ComfyUI's objects
arrive as arguments.

The reference rows of MRSA and DMSA run plain self-attention, so their keys/values at a block
depend only on what goes into those rows, which ``ref_keys.py`` names exactly (where it cannot,
e.g. weight hooks that change per conditioning, nothing is cached).

* **Across runs** (``ReferencePolicy.across_runs``): each row's keys/values at each sigma are kept;
  a later call whose rows all hit runs no reference rows (``reference_pass`` reads them back).
* **Once per run** (``ReferencePolicy.once_per_run``): the references are noised to one fixed
  level, ``reference_sigma``, in every step, so their keys/values are computed in the first step
  of a run and served from here in every other one (dropped when the next run starts unless
  they are also kept across runs).

Only the tokens a technique can select are kept (``ref_keys.kept_index``; the rest come back as
zeros and are never selected), in CPU memory by default, in one least-recently-used store bounded
in bytes (``STORE``). Rows are tied to the model objects they were computed with by weak
references (when one is freed its rows go), and ``drop_on_detach`` removes a model's rows when
ComfyUI unloads it.
"""
from __future__ import annotations

import hashlib
import logging
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .ref_keys import Uncacheable, kept_index, model_fingerprint, reference_digest

DEFAULT_LIMIT_MB = 2048


@dataclass(frozen=True)
class ReferencePolicy:
    """How reference keys/values are reused. ``reference_sigma``: the noise level of every
    reference in once-per-run mode. ``limit_bytes``: the store's bound. ``device``: ``"cpu"``
    or ``"model"`` (the device of the model call)."""
    across_runs: bool = True
    once_per_run: bool = False
    reference_sigma: float = 0.0
    limit_bytes: int = DEFAULT_LIMIT_MB * 2 ** 20
    device: str = "cpu"

    def __post_init__(self):
        if self.device not in ("cpu", "model"):
            raise ValueError(f"cache_device: unknown '{self.device}'; choose 'cpu' or 'model'")
        if self.limit_bytes < 0:
            raise ValueError(f"cache_mb: must not be negative, got {self.limit_bytes / 2 ** 20:g}")
        if not self.reference_sigma >= 0.0:
            raise ValueError(f"reference noise: sigma must be >= 0, got {self.reference_sigma}")

    def row_sigma(self, sigma: float) -> float:
        """The noise level of the reference rows in a call at ``sigma``."""
        return float(self.reference_sigma) if self.once_per_run else float(sigma)


# --------------------------------------------------------------------------- the store

@dataclass
class RowEntry:
    """One reference row's keys/values: ``layers[key] = (idx, k, v, n)`` with ``k``/``v`` the
    kept tokens ``[M, C]`` and ``idx`` their positions among the layer's ``n`` tokens (None: all)."""
    layers: dict
    model_id: int
    scope: str                 # "runs" (kept across runs) or "run" (dropped when a run starts)
    anchors: tuple = ()
    run: int = 0               # the sampling run that last stored or read it (``ReferenceStore.run``)

    @property
    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for _, k, v, _ in self.layers.values())

    def alive(self) -> bool:
        return all(a() is not None for a in self.anchors)


def _anchor(obj, on_death):
    try:
        return weakref.ref(obj, on_death)
    except TypeError:               # not weakly referable: held (small objects: functions, values)
        return lambda: obj


class ReferenceStore:
    """Least-recently-used store of ``RowEntry`` objects bounded in bytes (``limit``).

    A run reads its rows in the order it stored them, so a run whose rows do not all fit would
    evict its own first rows to store its last ones and the next run would find none. Rows that
    the current run (``run``, counted by ``new_run``) stored or read are therefore never evicted
    for it: what does not fit is not stored, and the next run finds the rows of its first steps."""

    def __init__(self, limit: int = DEFAULT_LIMIT_MB * 2 ** 20):
        self.limit = int(limit)
        self._entries: OrderedDict = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.run = 0
        self._dead = False

    def new_run(self) -> None:
        self.run += 1

    def __len__(self) -> int:
        self._purge_dead()
        return len(self._entries)

    def anchors(self, objects) -> tuple:
        return tuple(_anchor(o, self._on_death) for o in objects)

    def _on_death(self, _ref=None) -> None:
        # Called by the garbage collector at any moment: only mark, purge at the next use.
        self._dead = True

    def get(self, key):
        self._purge_dead()
        entry = self._entries.get(key)
        if entry is not None and not entry.alive():
            self._remove(key)
            entry = None
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        entry.run = self.run
        self.hits += 1
        return entry

    def put(self, key, entry: RowEntry, limit: int | None = None) -> bool:
        """Store ``entry``, dropping the least recently used rows of earlier runs until it fits;
        False (nothing stored) when it does not fit beside the current run's rows."""
        self._purge_dead()
        if limit is not None:
            self.limit = int(limit)
        size = entry.nbytes
        if key in self._entries:
            self._remove(key)
        if not self._shrink(self.limit - size):
            return False
        entry.run = self.run
        self._entries[key] = entry
        self.bytes += size
        return True

    def _shrink(self, room: int) -> bool:
        """Evict rows of earlier runs, least recently used first, until ``bytes <= room`` (and
        at least down to the limit, which may have been lowered)."""
        if room < 0:
            self._shrink(self.limit)
            return False
        for key in [k for k, e in self._entries.items() if e.run != self.run]:
            if self.bytes <= room:
                break
            self._remove(key)
        return self.bytes <= room

    def _remove(self, key) -> None:
        entry = self._entries.pop(key)
        self.bytes -= entry.nbytes

    def _purge_dead(self) -> None:
        if self._dead:
            self._dead = False
            for key in [k for k, e in self._entries.items() if not e.alive()]:
                self._remove(key)

    def drop(self, model_id: int | None = None, scope: str | None = None) -> int:
        """Remove the entries of one model (``id`` of its ``BaseModel``; None: every model) and
        of one scope (None: both); returns how many went."""
        self._purge_dead()
        doomed = [k for k, e in self._entries.items()
                  if (model_id is None or e.model_id == model_id) and (scope is None or e.scope == scope)]
        for key in doomed:
            self._remove(key)
        return len(doomed)


STORE = ReferenceStore()


def drop_on_detach(patcher, unpatch_all=True) -> None:
    """``CallbacksMP.ON_DETACH``: with ``unpatch_all`` ComfyUI unloaded the model (to free memory,
    or to make room for another); without, it only hands the loaded weights to another clone of
    the same model (whose rows are named apart by their patches), so the rows stay."""
    if unpatch_all:
        STORE.drop(id(patcher.model))


def drop_on_new_run(patcher) -> None:
    """``CallbacksMP.ON_PRE_RUN``: a sampling run starts. Once-per-run rows not kept across runs
    belonged to the last one."""
    STORE.new_run()
    STORE.drop(id(patcher.model), scope="run")


# --------------------------------------------------------------------------- rows in and out

def to_store(t: torch.Tensor, device: str) -> torch.Tensor:
    """A copy of ``t`` where the store keeps it: CPU (pinned when it comes from a GPU, so reading
    it back is a fast asynchronous copy) or the model's device."""
    if device == "model":
        return t.detach().clone()
    if t.device.type == "cuda":
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        out.copy_(t.detach())
        return out
    return t.detach().to("cpu", copy=True)


def pack_layer(k: torch.Tensor, v: torch.Tensor, reference, latent_hw: tuple, keep: str, device: str) -> tuple:
    """``(idx, k, v, n)``: the kept tokens of one reference row's keys/values ``[N, C]`` at one layer."""
    idx = kept_index(reference, int(k.shape[0]), latent_hw, keep)
    kr, vr = k, v
    if idx is not None:
        kr, vr = kr.index_select(0, idx.to(kr.device)), vr.index_select(0, idx.to(vr.device))
    ks, vs = to_store(kr, device), to_store(vr, device)
    return None if idx is None else idx.to(ks.device), ks, vs, int(k.shape[0])


def unpack_rows(entries: list, device) -> dict:
    """The bank ``key -> (K, V)`` ``[R, N, C]`` of several rows read back on ``device`` in the
    dtype they were computed in (tokens that were not kept are zeros); only the layers every row
    has."""
    keys = set(entries[0].layers)
    for e in entries[1:]:
        keys &= set(e.layers)
    bank = {}
    for key in keys:
        n = entries[0].layers[key][3]
        c, dtype = entries[0].layers[key][1].shape[-1], entries[0].layers[key][1].dtype
        K = torch.zeros((len(entries), n, c), device=device, dtype=dtype)
        V = torch.zeros_like(K)
        for r, e in enumerate(entries):
            idx, k, v, _ = e.layers[key]
            k = k.to(device, dtype, non_blocking=True)
            v = v.to(device, dtype, non_blocking=True)
            if idx is None:
                K[r], V[r] = k, v
            else:
                idx = idx.to(device)
                K[r].index_copy_(0, idx, k)
                V[r].index_copy_(0, idx, v)
        bank[key] = (K, V)
    return bank


# --------------------------------------------------------------------------- one model call

class CachePlan:
    """The reference rows of one model call as store keys: ``lookup`` reads them all back (or
    nothing), ``capture`` takes a layer's keys/values while they are computed, ``commit`` stores
    the rows after the call."""

    def __init__(self, policy: ReferencePolicy, keys: list, references: list, keeps: list, latent_hw: tuple,
                 model_id: int, anchors: list):
        self.policy = policy
        self.keys = keys
        self.references = references
        self.keeps = keeps
        self.latent_hw = tuple(latent_hw)
        self.model_id = model_id
        self.anchors = anchors
        self.pending = [dict() for _ in keys]

    def lookup(self, device) -> dict | None:
        entries = []
        for key in self.keys:
            entry = STORE.get(key)
            if entry is None:
                return None
            entries.append(entry)
        return unpack_rows(entries, device)

    def capture(self, layer, K: torch.Tensor, V: torch.Tensor, rows=None) -> None:
        """Keys/values ``[R, N, C]`` of reference rows ``rows`` (indices into this call's rows;
        None: all, in order) at block ``layer``."""
        for j, i in enumerate(range(len(self.keys)) if rows is None else rows):
            self.pending[i][layer] = pack_layer(K[j], V[j], self.references[i], self.latent_hw, self.keeps[i],
                                                self.policy.device)

    def commit(self) -> None:
        scope = "runs" if self.policy.across_runs else "run"
        for key, layers in zip(self.keys, self.pending):
            if layers:
                if not isinstance(self.anchors, tuple):
                    self.anchors = STORE.anchors(self.anchors)
                STORE.put(key, RowEntry(layers, self.model_id, scope, self.anchors), self.policy.limit_bytes)
        self.pending = [dict() for _ in self.keys]



_warned: set = set()


def warn_uncacheable(reason) -> None:
    """One log line per reason that made a call run without the cache."""
    if str(reason) not in _warned:
        _warned.add(str(reason))
        logging.warning("Personalize reference cache: %s, so references are computed in every call", reason)


def call_plan(policy: ReferencePolicy, base_model, transformer_options, reqs, row_inputs: list, keeps: list,
              layers, row_sigma: float, latent_hw: tuple, dtype, device, own_types=()) -> CachePlan | None:
    """The plan of one model call's reference rows ``reqs`` (``patch.RefRequest``), or None when
    they cannot be named exactly (the call then runs as without a cache). ``row_inputs[i]``: the
    digest of row ``i``'s other model inputs (``row_input_digests``); ``layers``: the blocks whose
    keys/values the active techniques read."""
    try:
        parts, anchors = model_fingerprint(base_model, transformer_options, own_types)
    except Uncacheable as e:
        warn_uncacheable(e)
        return None
    common = repr((parts, repr(float(row_sigma)), tuple(latent_hw), str(dtype), str(device),
                   sorted(repr(k) for k in layers)))
    keys = []
    for r, keep, inputs in zip(reqs, keeps, row_inputs):
        row = (reference_digest(r.reference), r.label, r.seed, r.index, r.subject, keep, inputs)
        keys.append(hashlib.sha1((common + repr(row)).encode()).hexdigest())
    return CachePlan(policy, keys, [r.reference for r in reqs], keeps, latent_hw, id(base_model), anchors)
