"""Frozen OpenCLIP text tower, as SD2 conditions on it: penultimate block output after ``ln_final``.

The model and the tokenizer are OpenCLIP's own, so tokenisation and weights are exactly those of the
reference's ``FrozenOpenCLIPEmbedder(layer="penultimate")``. The module keeps the CLIP model as ``.model``
(visual tower deleted), so its state_dict names are the checkpoint's ``cond_stage_model.*`` names minus
``cond_stage_model.``. Importing this module registers sdcore's own OpenCLIP configs (the tiny demo arch
``sdcore-tiny-clip``) so that OpenCLIP resolves those names offline like its built-ins.
"""

from pathlib import Path

import open_clip
import torch
from torch import nn

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)

SKIPPED_LAST_BLOCKS = 1  # "penultimate": the reference's layer_idx = 1


class FrozenOpenCLIPText(nn.Module):
    """Tokens (B, max_length) -> context (B, max_length, width); never trained, always in eval mode."""

    def __init__(self, arch: str, max_length: int = 77):
        # The default device lets callers build the full-size model under ``torch.device("meta")``.
        clip = open_clip.create_model(arch, pretrained=None, device=torch.get_default_device())
        tokenizer = open_clip.get_tokenizer(arch, context_length=max_length)
        super().__init__()
        self._adopt(clip, tokenizer, max_length)

    @classmethod
    def from_clip_config(cls, cfg: dict, max_length: int = 77) -> "FrozenOpenCLIPText":
        """Build from an ``open_clip.CLIP(**cfg)`` config dict (the golden data's form) with the default tokenizer."""
        encoder = cls.__new__(cls)
        nn.Module.__init__(encoder)
        encoder._adopt(open_clip.CLIP(**cfg), open_clip.SimpleTokenizer(context_length=max_length), max_length)
        return encoder

    def _adopt(self, clip: nn.Module, tokenizer, max_length: int) -> None:
        if clip.positional_embedding.shape[0] != max_length:
            raise ValueError(f"max_length {max_length} != the model's context length "
                             f"{clip.positional_embedding.shape[0]}")
        del clip.visual
        clip.requires_grad_(False)
        self.model = clip
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.eval()

    def train(self, mode: bool = True) -> "FrozenOpenCLIPText":
        """Stay in eval mode whatever a parent module asks: the encoder is frozen."""
        return super().train(False)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        clip = self.model
        x = clip.token_embedding(tokens) + clip.positional_embedding
        batch_first = clip.transformer.batch_first
        if not batch_first:
            x = x.transpose(0, 1)
        for block in clip.transformer.resblocks[:len(clip.transformer.resblocks) - SKIPPED_LAST_BLOCKS]:
            x = block(x, attn_mask=clip.attn_mask)
        if not batch_first:
            x = x.transpose(0, 1)
        return clip.ln_final(x)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """Prompts -> context on the encoder's device."""
        return self(self.tokenize(texts).to(self.model.token_embedding.weight.device))
