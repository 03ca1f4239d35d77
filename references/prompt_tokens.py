"""Where a word is in a prompt: the one owner of prompt-token positions (DMSA's blend word, MIP's
entity words, Infusion's concept word). Pure python: a ComfyUI CLIP arrives as a duck-typed
argument (``clip.tokenize(text)`` -> ``{encoder: [chunk, ...]}``), nothing here imports ComfyUI.

Positions count as the conditioning lays the tokens out: CLIP chunks of 77 (start/end tokens
included) concatenated, so chunk ``c``, index ``i`` is ``77 c + i``.
"""
from __future__ import annotations

from typing import Mapping, Sequence


def token_ids(tokens, encoder: str | None = None) -> list[int]:
    """Token ids of a tokenizer output as the conditioning lays them out: ComfyUI's
    ``clip.tokenize`` result ``{encoder: [chunk, ...]}`` (chunks of ``(token, weight, ...)``
    concatenated; ``encoder`` picks the entry, default ``"l"``, else ``"h"``, else the only one), a
    list of chunks, or a flat list of ids. A token that is not an id (a textual-inversion embedding
    vector) counts as -1, so positions stay right."""
    if isinstance(tokens, Mapping):
        if not tokens:
            raise ValueError("the tokenizer returned nothing")
        if encoder is None:
            encoder = next((e for e in ("l", "h") if e in tokens), None)
            if encoder is None:
                if len(tokens) != 1:
                    raise ValueError(f"the tokenizer has several encoders ({', '.join(sorted(tokens))}); "
                                     f"say which one conditions the model")
                encoder = next(iter(tokens))
        if encoder not in tokens:
            raise ValueError(f"the tokenizer has no '{encoder}' encoder (it has {', '.join(sorted(tokens))})")
        tokens = tokens[encoder]
    flat = []
    for item in tokens:
        if isinstance(item, (list, tuple)) and item and isinstance(item[0], (list, tuple)):
            flat.extend(item)                   # a chunk of (token, weight) pairs
        else:
            flat.append(item)
    out = []
    for t in flat:
        t = t[0] if isinstance(t, (list, tuple)) else t
        try:
            out.append(int(t))
        except (TypeError, ValueError, RuntimeError):
            out.append(-1)
    return out


def occurrences(prompt_ids: Sequence[int], word_ids: Sequence[int]) -> list[int]:
    """Start positions of every occurrence of the id sequence ``word_ids`` in ``prompt_ids``."""
    p, w = [int(t) for t in prompt_ids], [int(t) for t in word_ids]
    if not w:
        return []
    return [i for i in range(len(p) - len(w) + 1) if p[i:i + len(w)] == w]


def find_token_positions(prompt_ids: Sequence[int], word_ids: Sequence[int], word: str = "blend word") -> list[int]:
    """Positions in the prompt's token sequence (as its conditioning lays them out, chunks
    concatenated, start/end tokens included) of every token of every occurrence of ``word_ids``
    (the word's own tokens, without start/end/padding). A word absent from the prompt is an
    error."""
    if not list(word_ids):
        raise ValueError(f"{word}: the word has no tokens; give a word that appears in the prompt")
    n = len(list(word_ids))
    out = [i + j for i in occurrences(prompt_ids, word_ids) for j in range(n)]
    if not out:
        raise ValueError(f"{word}: not found in the prompt; the word must appear in the positive prompt "
                         f"as a whole word, spelled the same way (e.g. 'dog' in 'a photo of a dog')")
    return sorted(set(out))


def concept_token_index(prompt_tokens, word_tokens, special: Sequence[int] = (), word: str = "concept_word",
                        encoder: str | None = None) -> int:
    """The position, in the prompt's conditioning (start token included, CLIP chunks of 77
    concatenated: chunk ``c``, index ``i`` -> ``77 c + i``), of the first token of the first
    occurrence of the concept word. ``prompt_tokens`` / ``word_tokens``: tokenizer outputs or id
    lists (``token_ids``); ids in ``special`` (start, end, padding: the tokens of the empty
    string) are dropped from the word. The official Infusion code takes the word's index among the
    space-separated words + 1 (docs/algorithms.md §6.6 pitfall 6); the tokenizer gets multi-token
    words and punctuation right, and agrees with it on single-token words."""
    p = token_ids(prompt_tokens, encoder)
    drop = {int(s) for s in special}
    w = [t for t in token_ids(word_tokens, encoder) if t not in drop]
    if not w:
        raise ValueError(f"{word}: has no tokens; give the word of your prompt that names the concept "
                         f"(e.g. 'cat')")
    found = occurrences(p, w)
    if not found:
        raise ValueError(f"{word}: not found in the prompt; the concept word must appear in the prompt as a whole "
                         f"word, spelled the same way (e.g. 'cat' in 'a photo of a cat on the beach')")
    return found[0]


# --------------------------------------------------------------------------- with a ComfyUI CLIP

def prompt_token_ids(clip, text: str, prefer=("l",)) -> list[int]:
    """Token ids of ``text`` as its conditioning lays them out (chunks concatenated), from the first
    tokenizer of ``prefer`` the CLIP has, else its first (FLUX's text tokens are T5's:
    ``("t5xxl", "l")``)."""
    tokens = clip.tokenize(text)
    key = next((k for k in prefer if k in tokens), next(iter(tokens)))
    return token_ids(tokens, key)


def word_token_ids(clip, word: str, prefer=("l",)) -> list[int]:
    """The word's own token ids (start, end and padding tokens dropped)."""
    special = set(prompt_token_ids(clip, "", prefer))
    return [t for t in prompt_token_ids(clip, word, prefer) if t not in special]


def blend_word_tokens(clip, prompt: str, word: str, prefer=("l",)) -> tuple[list[int], int]:
    """Positions of ``word``'s tokens in ``prompt``'s conditioning, and its length."""
    if not word.strip():
        raise ValueError("blend_word: empty; give the word of the prompt whose region takes the appearance")
    prompt_ids = prompt_token_ids(clip, prompt, prefer)
    word_ids = word_token_ids(clip, word.strip(), prefer)
    return find_token_positions(prompt_ids, word_ids, word="blend_word"), len(prompt_ids)
