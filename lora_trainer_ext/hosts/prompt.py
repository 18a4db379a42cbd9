"""Captions to CLIP conditioning the way the WebUI builds it at inference, for the standalone host.

A LoRA learns against the conditioning it is trained with, so training must see what the WebUI's
prompt path (`sd_hijack_clip.py`) produces: token ids cut into chunks of 75 (a chunk that fills up
shortly after a comma moves the words after that comma to the next chunk), each chunk framed as
BOS + 75 + EOS (77 tokens; after the first EOS the rest is the encoder's pad id), encoded separately,
and the hidden states of all chunks joined along the token axis (150 tokens -> 154 positions). All
captions of a batch get the same number of chunks (empty chunks pad the shorter ones). Emphasis
syntax ("(word:1.2)") is not interpreted; the WebUI's escapes ("\\(") are undone so tags keep their
literal brackets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

CHUNK_LENGTH = 75  # tokens of text per chunk; each chunk is framed by BOS and EOS into 77
COMMA_BACKTRACK = 20  # the WebUI's default `comma_padding_backtrack`

_ESCAPED = re.compile(r"\\([()\[\]\\])")


def unescape(text: str) -> str:
    """Undo the WebUI prompt escapes that captions use for literal brackets: "\\(" -> "("."""
    return _ESCAPED.sub(r"\1", text)


def split_chunks(ids: list[int], comma_id: int | None, backtrack: int = COMMA_BACKTRACK) -> list[list[int]]:
    """Cut one caption's token ids into chunks of at most CHUNK_LENGTH, as the WebUI does: when a chunk
    is full, the next token is not a comma and the chunk's last comma is at most `backtrack` tokens
    back, the tokens after that comma start the next chunk instead. Always at least one chunk."""
    chunks: list[list[int]] = []
    chunk: list[int] = []
    last_comma = -1  # index in `chunk` of its last comma
    for token in ids:
        if len(chunk) == CHUNK_LENGTH:
            moved: list[int] = []
            if token != comma_id and backtrack and last_comma != -1 and len(chunk) - last_comma <= backtrack:
                chunk, moved = chunk[: last_comma + 1], chunk[last_comma + 1 :]
            chunks.append(chunk)
            chunk, last_comma = moved, -1
        if token == comma_id:
            last_comma = len(chunk)
        chunk.append(token)
    if chunk or not chunks:
        chunks.append(chunk)
    return chunks


class ChunkedTokenizer:
    """A CLIP BPE tokenizer (HF `CLIPTokenizer`) that yields the WebUI's 77-token chunks."""

    def __init__(self, tokenizer, backtrack: int = COMMA_BACKTRACK):
        self.tokenizer = tokenizer
        self.backtrack = backtrack
        vocab = tokenizer.get_vocab()
        self.bos = vocab["<|startoftext|>"]
        self.eos = vocab["<|endoftext|>"]
        self.comma = vocab.get(",</w>")

    def chunks(self, captions: list[str]) -> list[list[list[int]]]:
        """Per caption, its chunks of text token ids; every caption gets the batch's chunk count."""
        texts = [unescape(c) for c in captions]
        ids = self.tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]
        per_caption = [split_chunks(one, self.comma, self.backtrack) for one in ids]
        count = max(len(c) for c in per_caption)
        return [c + [[] for _ in range(count - len(c))] for c in per_caption]

    def ids(self, chunks: list[list[list[int]]], pad: int, device=None) -> torch.Tensor:
        """Long tensor [chunk count, batch, 77]: BOS, text, EOS, then `pad` to the end."""
        rows = [
            [[self.bos, *chunk, self.eos] + [pad] * (CHUNK_LENGTH - len(chunk)) for chunk in caption]
            for caption in chunks
        ]
        return torch.tensor(rows, dtype=torch.long, device=device).transpose(0, 1)


@dataclass
class ClipReader:
    """Which output of one HF CLIP text model is the conditioning.

    `layer` indexes `hidden_states` (embeddings first, so -1 is the last layer's output, -2 the
    penultimate); `final_norm` applies the model's final LayerNorm to it (SD1 clip skip, SD2's
    penultimate) or not (SDXL). `pad` is the id after the first EOS (the EOS itself for OpenAI CLIP,
    0 for OpenCLIP). `pooled` also returns the projected last-layer state at the first EOS of the
    first chunk (SDXL's second encoder, a `CLIPTextModelWithProjection`)."""

    model: torch.nn.Module
    layer: int = -1
    final_norm: bool = True
    pad: int | None = None  # None: the EOS id
    pooled: bool = False

    def encode(self, ids: torch.Tensor, eos: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ids [chunks, B, 77] -> (hidden [B, 77*chunks, C], pooled [B, P] or None)."""
        text_model = self.model.text_model
        states, pooled = [], None
        for i, chunk in enumerate(ids):
            out = self.model(input_ids=chunk, output_hidden_states=True, return_dict=True)
            hidden = out.hidden_states[self.layer]
            states.append(text_model.final_layer_norm(hidden) if self.final_norm else hidden)
            if self.pooled and i == 0:
                last = out.last_hidden_state  # already final-normed
                first_eos = (chunk == eos).int().argmax(dim=1)
                pooled = self.model.text_projection(last[torch.arange(len(chunk), device=last.device), first_eos])
        return torch.cat(states, dim=1), pooled

    def pad_id(self, eos: int) -> int:
        return eos if self.pad is None else self.pad
