"""A tiny random OWLv2 detector saved in the Hugging Face folder layout of
``google/owlv2-base-patch16-ensemble`` (config.json, model.safetensors, preprocessor_config.json and the
CLIP tokenizer files), built offline with transformers' own classes. Used by the detector tests."""
from __future__ import annotations

import json
from pathlib import Path

IMAGE_SIZE = 64          # the processor resizes the padded square image to this side
PATCH = 16               # so the detector predicts (64 / 16) ** 2 = 16 boxes
QUERY_LENGTH = 16        # OWL-ViT / OWLv2 text context (max_position_embeddings)
WORDS = ["monster", "toy", "dog", "cat", "can", "robot"]   # a few whole words, so queries stay short


def byte_alphabet() -> list[str]:
    """CLIP's byte-level BPE alphabet: one printable character for each of the 256 bytes (printable
    Latin-1 bytes stand for themselves, the others are shifted to code points from 256 up), in byte
    order of the printable ones first, as CLIP's vocabulary lists them."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = [chr(b) for b in printable]
    extra = 0
    for b in range(256):
        if b not in printable:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def merge_steps(word: str) -> list[tuple[str, str]]:
    """The merges that glue ``word`` letter by letter into one ``word</w>`` token."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    steps = []
    while len(pieces) > 1:
        steps.append((pieces[0], pieces[1]))
        pieces = [pieces[0] + pieces[1]] + pieces[2:]
    return steps


def write_tokenizer_files(folder: Path) -> int:
    """vocab.json and merges.txt of a small CLIP BPE; returns the vocabulary size. The end-of-text token
    has the largest id, as the OWL text model pools at ``input_ids.argmax()``."""
    alphabet = byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges = []
    for word in WORDS:
        for a, b in merge_steps(word):
            if (a, b) not in merges:
                merges.append((a, b))
    for a, b in merges:
        if a + b not in tokens:
            tokens.append(a + b)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(vocab)


def build_tiny_owlv2(folder, seed: int = 0):
    """Save a random OWLv2 (1 text layer, 1 vision layer, width 32, 64x64 input, patch 16) with its
    ``Owlv2Processor`` into ``folder``; returns ``folder``."""
    import torch
    from transformers import (CLIPTokenizer, Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor,
                              Owlv2Processor)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tokenizer_files(folder)
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), pad_token="!", model_max_length=QUERY_LENGTH)
    ids = tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>", "!"])

    config = Owlv2Config(
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=QUERY_LENGTH, bos_token_id=ids[0],
                         eos_token_id=ids[1], pad_token_id=ids[2]),
        vision_config=dict(image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2),
        projection_dim=32,
    )
    torch.manual_seed(seed)
    model = Owlv2ForObjectDetection(config).eval()
    with torch.no_grad():
        # Random heads saturate (scores 0 or 1, boxes collapsed to an edge). Tame them the way a trained
        # detector looks: boxes near their patch's prior box (the box bias), logits spread over a few
        # units so that a threshold separates the boxes.
        model.box_head.dense2.weight.normal_(0.0, 0.002)
        model.box_head.dense2.bias.zero_()
        model.class_head.logit_shift.weight.normal_(0.0, 0.1)
        model.class_head.logit_shift.bias.zero_()
        model.class_head.logit_scale.weight.normal_(0.0, 0.05)
        model.class_head.logit_scale.bias.fill_(3.0)
    model.save_pretrained(str(folder))
    # The Hub folder's layout whatever the transformers version: preprocessor_config.json (transformers 5's
    # Owlv2Processor.save_pretrained would write processor_config.json instead), tokenizer_config.json and
    # tokenizer.json beside vocab.json and merges.txt.
    processor = Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
                               tokenizer=tokenizer)
    processor.image_processor.save_pretrained(str(folder))
    processor.tokenizer.save_pretrained(str(folder))
    return folder
