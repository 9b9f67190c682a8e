"""Tower configs: frozen dataclasses holding a Hugging Face config's architecture fields (by HF's
own names) plus this codebase's run options (dtype, scan, remat, pooling), which HF does not know.

`from_hf(dict)` reads a `config.json` dict (unknown HF keys are ignored), `to_hf()` writes one back.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# The transformer shapes the families' "base" and "large" presets share (BERT, ViT, CLIP vision).
BASE_SHAPE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                  intermediate_size=3072)
LARGE_SHAPE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                   intermediate_size=4096)


@dataclasses.dataclass(frozen=True)
class TowerConfig:
    """Run options shared by every tower; subclasses add the HF architecture fields."""

    model_type: ClassVar[str] = ""
    # Fields that exist only here, never written into an HF config.json.
    RUN_OPTIONS: ClassVar[tuple[str, ...]] = (
        "dtype", "scan_layers", "remat", "attention_impl", "pooling", "add_pooling_layer",
        "adapter_dim", "adapter_init", "deep_layers")

    dtype: str = "float32"        # compute dtype; parameters stay float32
    scan_layers: bool = False     # nn.scan over layers: one layer compiled, weights stacked
    remat: str = "none"           # layers.REMAT_POLICIES
    attention_impl: str = "auto"  # "xla", "cudnn" (the fused GPU kernel), or "auto": cudnn on
                                  # NVIDIA GPUs computing in bf16/fp16, xla elsewhere
    pooling: str = ""             # per family; "" picks the family's default
    # Parameter-efficient additions (LiLT): a Houlsby adapter of this bottleneck width before
    # every LayerNorm of every layer (0: none), initialised N(0, 0.02) or as the identity; and
    # `deep_layers` extra, freshly initialised layers appended on top of the encoder.
    adapter_dim: int = 0
    adapter_init: str = "normal"
    deep_layers: int = 0

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; expected one of {sorted(DTYPES)}")
        if self.attention_impl not in ("auto", "xla", "cudnn"):
            raise ValueError(f"attention_impl={self.attention_impl!r}; expected 'auto', 'xla' "
                             f"or 'cudnn'")
        if self.adapter_init not in ("normal", "identity"):
            raise ValueError(f"adapter_init={self.adapter_init!r}; expected 'normal' or 'identity'")
        allowed = self.POOLINGS
        if self.pooling and self.pooling not in allowed:
            raise ValueError(f"{type(self).__name__}: pooling={self.pooling!r}; expected one of "
                             f"{list(allowed)}")

    POOLINGS: ClassVar[tuple[str, ...]] = ()

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def pooling_mode(self) -> str:
        return self.pooling or self.POOLINGS[0]

    @classmethod
    def from_hf(cls, hf_config: dict[str, Any], **overrides):
        """From an HF config dict; `overrides` set run options or architecture fields
        (e.g. image_size=256 to run a 224-px checkpoint at 256 px)."""
        names = {f.name for f in dataclasses.fields(cls)} - set(cls.RUN_OPTIONS)
        values = {k: v for k, v in hf_config.items() if k in names}
        return cls(**{**values, **overrides})

    def to_hf(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in self.RUN_OPTIONS and not f.name.startswith("_")}
        out["model_type"] = self.model_type
        return out

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)
