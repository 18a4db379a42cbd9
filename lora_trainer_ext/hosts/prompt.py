"""Captions to CLIP conditioning the way the WebUI builds it at inference, for the standalone host.

A LoRA learns against the conditioning it is trained with, so training must see what the WebUI's
prompt path (`sd_hijack_clip.py`, emphasis "Original", its default) produces:
- emphasis: "(word)" weighs word by 1.1, "[word]" by 1/1.1, "(word:1.3)" by 1.3, nested brackets
  multiply, an unclosed bracket weighs to the end, "\\(" and the like are literal brackets;
- BREAK (in capitals, outside brackets) ends the current chunk;
- token ids cut into chunks of 75 (a chunk that fills up shortly after a comma moves the words after
  that comma to the next chunk), each chunk framed as BOS + 75 + EOS (77 tokens; after the first EOS
  the rest is the encoder's pad id), encoded separately; each token's hidden state is multiplied by its
  weight and the chunk's states rescaled to their mean before weighting (over the whole batch, as the
  WebUI does), and the chunks joined along the token axis (150 tokens -> 154 positions). All captions of
  a batch get the same number of chunks (empty chunks pad the shorter ones).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

CHUNK_LENGTH = 75  # tokens of text per chunk; each chunk is framed by BOS and EOS into 77
COMMA_BACKTRACK = 20  # the WebUI's default `comma_padding_backtrack`
BREAK = None  # in a caption's (token, weight) list: its BREAK, which ends the chunk
EMPHASIS, DEEMPHASIS = 1.1, 1 / 1.1

_PIECES = re.compile(r"""
    \\[()\[\]\\]?        # an escaped bracket or backslash (literal); a lone backslash (dropped)
  | [(\[]                   # opening brackets
  | :\s*([+-]?[.\d]+)\s*\)  # ":1.3)", the weight of the innermost "("
  | [)\]]                   # closing brackets
  | [^\\()\[\]:]+            # text
  | :                       # a colon that gives no weight
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def parse_weights(caption: str) -> list[tuple[str | None, float]]:
    """`caption` as (text, weight) runs, the WebUI's emphasis syntax applied; a BREAK is (BREAK, -1)."""
    runs: list[list] = []  # [text, weight]
    opened: dict[str, list[int]] = {"(": [], "[": []}  # where each open bracket's runs start

    def weigh(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for match in _PIECES.finditer(caption):
        piece, weight = match.group(0), match.group(1)
        if piece.startswith("\\"):
            runs.append([piece[1:], 1.0])
        elif piece in opened:
            opened[piece].append(len(runs))
        elif weight is not None and opened["("]:
            weigh(opened["("].pop(), float(weight))
        elif piece == ")" and opened["("]:
            weigh(opened["("].pop(), EMPHASIS)
        elif piece == "]" and opened["["]:
            weigh(opened["["].pop(), DEEMPHASIS)
        else:  # text, or a bracket that closes nothing
            for i, part in enumerate(_BREAK.split(piece)):
                if i:
                    runs.append([BREAK, -1.0])
                runs.append([part, 1.0])
    for bracket, factor in (("(", EMPHASIS), ("[", DEEMPHASIS)):
        for start in opened[bracket]:
            weigh(start, factor)
    merged: list[list] = []
    for run in runs or [["", 1.0]]:  # neighbours of one weight become one run (and one tokenization)
        if merged and merged[-1][1] == run[1]:
            merged[-1][0] = _text(merged[-1]) + _text(run)
        else:
            merged.append(run)
    return [(BREAK if run[0] is BREAK and run[1] == -1 else _text(run), run[1]) for run in merged]


def _text(run: list) -> str:
    """A run's text; a BREAK that brackets weighed is the word again (so the WebUI reads it)."""
    return "BREAK" if run[0] is BREAK else run[0]


def split_chunks(tokens: list, comma_id: int | None, backtrack: int = COMMA_BACKTRACK) -> list[list]:
    """Cut one caption's tokens (any items; BREAK ends a chunk) into chunks of at most CHUNK_LENGTH,
    as the WebUI does: when a chunk is full, the next token is not a comma and the chunk's last comma
    is at most `backtrack` tokens back, the tokens after that comma start the next chunk instead.
    Items are compared with `comma_id` by `token_id`. Always at least one chunk."""
    chunks: list[list] = []
    chunk: list = []
    last_comma = -1  # index in `chunk` of its last comma

    def close(rest: list) -> None:
        nonlocal chunk, last_comma
        chunks.append(chunk)
        chunk, last_comma = rest, -1

    for token in tokens:
        if token is BREAK:
            close([])
            continue
        if token_id(token) == comma_id:
            last_comma = len(chunk)
        elif backtrack and len(chunk) == CHUNK_LENGTH and last_comma != -1 and len(chunk) - last_comma <= backtrack:
            chunk, moved = chunk[: last_comma + 1], chunk[last_comma + 1 :]
            close(moved)
        if len(chunk) == CHUNK_LENGTH:
            close([])
        chunk.append(token)
    if chunk or not chunks:
        chunks.append(chunk)
    return chunks


def token_id(token) -> int:
    return token[0] if isinstance(token, tuple) else token


class ChunkedTokenizer:
    """A CLIP BPE tokenizer (HF `CLIPTokenizer`) that yields the WebUI's 77-token chunks."""

    def __init__(self, tokenizer, backtrack: int = COMMA_BACKTRACK):
        self.tokenizer = tokenizer
        self.backtrack = backtrack
        vocab = tokenizer.get_vocab()
        self.bos = vocab["<|startoftext|>"]
        self.eos = vocab["<|endoftext|>"]
        self.comma = vocab.get(",</w>")

    def weighted_tokens(self, caption: str) -> list:
        """(token id, weight) of `caption`, each emphasis run tokenized on its own (as the WebUI does),
        with BREAK where the caption has one."""
        runs = parse_weights(caption)
        texts = ["" if text is BREAK else text for text, _ in runs]
        ids = self.tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]
        out: list = []
        for (text, weight), run_ids in zip(runs, ids):
            out.extend([BREAK] if text is BREAK else [(token, weight) for token in run_ids])
        return out

    def chunks(self, captions: list[str]) -> list[list[list[tuple[int, float]]]]:
        """Per caption, its chunks of (token id, weight); every caption gets the batch's chunk count."""
        per_caption = [split_chunks(self.weighted_tokens(c), self.comma, self.backtrack) for c in captions]
        count = max(len(c) for c in per_caption)
        return [c + [[] for _ in range(count - len(c))] for c in per_caption]

    def ids(self, chunks: list[list[list[tuple[int, float]]]], pad: int, device=None) -> torch.Tensor:
        """Long tensor [chunk count, batch, 77]: BOS, text, EOS, then `pad` to the end."""
        rows = [[[self.bos, *(t for t, _ in chunk), self.eos] + [pad] * (CHUNK_LENGTH - len(chunk))
                 for chunk in caption] for caption in chunks]
        return torch.tensor(rows, dtype=torch.long, device=device).transpose(0, 1)

    @staticmethod
    def weights(chunks: list[list[list[tuple[int, float]]]], device=None) -> torch.Tensor:
        """Float tensor [chunk count, batch, 77]: each position's emphasis (1 for BOS, EOS and padding)."""
        rows = [[[1.0, *(w for _, w in chunk)] + [1.0] * (CHUNK_LENGTH + 1 - len(chunk)) for chunk in caption]
                for caption in chunks]
        return torch.tensor(rows, dtype=torch.float32, device=device).transpose(0, 1)


def emphasized(states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One chunk's hidden states [B, 77, C] weighed per token, then rescaled to the mean they had
    (the WebUI's "Original" emphasis; its mean is over the whole batch). Unweighted states are returned
    as they are, which is what the rescale gives them too, unless their mean is exactly 0 (0/0)."""
    if bool((weights == 1).all()):
        return states
    mean = states.mean()
    weighed = states * weights.reshape(weights.shape + (1,)).expand(states.shape)
    return weighed * (mean / weighed.mean())


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

    def encode(self, ids: torch.Tensor, eos: int, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ids and weights [chunks, B, 77] -> (hidden [B, 77*chunks, C], pooled [B, P] or None); the
        pooled state comes before emphasis, as in the WebUI."""
        text_model = self.model.text_model
        states, pooled = [], None
        for i, (chunk, chunk_weights) in enumerate(zip(ids, weights)):
            out = self.model(input_ids=chunk, output_hidden_states=True, return_dict=True)
            hidden = out.hidden_states[self.layer]
            hidden = text_model.final_layer_norm(hidden) if self.final_norm else hidden
            states.append(emphasized(hidden, chunk_weights))  # float32 weights, as the WebUI's
            if self.pooled and i == 0:
                last = out.last_hidden_state  # already final-normed
                first_eos = (chunk == eos).int().argmax(dim=1)
                pooled = self.model.text_projection(last[torch.arange(len(chunk), device=last.device), first_eos])
        return torch.cat(states, dim=1), pooled

    def pad_id(self, eos: int) -> int:
        return eos if self.pad is None else self.pad
