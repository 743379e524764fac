"""MERT (Li et al., "MERT: Acoustic Music Understanding Model with Large-Scale Self-supervised Training", ICLR 2024):
a HuBERT-style masked predictor of an acoustic teacher's discrete codes, plus a regression of the musical teacher's
CQT, at the masked frames.

Laid out as the reference's `MERTModel` (yizhilll/MERT, mert_fairseq/models/mert/mert_model.py):
- the encoder is wav2vec 2.0's (jaxssl.models.wav2vec2 without the quantizer: conv feature encoder, LayerNorm,
  post_extract_proj, the U(0, 1) mask embedding at masked frames, positional conv, Transformer blocks);
- `final_proj` (untie_final_proj): one Linear(width -> final_dim x K), its output split into K chunks, one per
  codebook of the teacher;
- `label_embs` (sum of the class counts, final_dim), U(0, 1) (the reference's label_embs_concat); the logits of
  codebook k at a frame are the cosine similarities of its chunk with every embedding of codebook k over
  logit_temp (compute_nce with every class as a candidate; its neg_is_pos removes the target's duplicate, so this is
  a softmax over the codebook). A codebook of V codes has V + 4 classes: fairseq's Dictionary adds 4 special
  symbols, never targets but in every softmax (`SPECIAL_SYMBOLS`);
- `cqt_proj`: Linear(width -> CQT bins), the musical teacher's head (model_cqt_pred's 1-layer version).
Linear layers outside the Transformer blocks have torch's default init; the blocks have fairseq's init_bert_params.
"""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxssl.models import vit
from jaxssl.models import wav2vec2 as w2v

# The reference sizes (MERT_RVQ-VAE_CQT_{95M,330M}.yaml): 95M is the base wav2vec 2.0 / HuBERT encoder with
# final_dim 64; 330M the large one, pre-norm, final_dim 128. micro: tests and `runlocal`, not a reference size.
VARIANTS: dict[str, dict[str, Any]] = {
    'micro': dict(
        conv_channels=128, extractor_mode='group', conv_bias=False, width=64, depth=2, heads=4, mlp=256,
        norm_first=False, final_dim=16,
    ),
    '95M': dict(
        conv_channels=512, extractor_mode='group', conv_bias=False, width=768, depth=12, heads=12, mlp=3072,
        norm_first=False, final_dim=64,
    ),
    '330M': dict(
        conv_channels=512, extractor_mode='group', conv_bias=False, width=1024, depth=24, heads=16, mlp=4096,
        norm_first=True, final_dim=128,
    ),
}  # fmt: skip


SPECIAL_SYMBOLS = 4  # fairseq's Dictionary: <s>, <pad>, </s>, <unk>


def cosine_logits(x: jax.Array, embeddings: jax.Array, temperature: float) -> jax.Array:
    """(..., D) x (V, D) -> (..., V): torch.cosine_similarity (each norm floored at 1e-8) over `temperature`, in
    float32."""
    x, embeddings = x.astype(jnp.float32), embeddings.astype(jnp.float32)
    unit = lambda v: v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-8)
    return jnp.einsum('...d,vd->...v', unit(x), unit(embeddings), precision=jax.lax.Precision.HIGHEST) / temperature


class Mert(nn.Module):
    """Waveforms -> per-codebook logits, CQT predictions and the feature penalty (see `__call__`)."""

    encoder: w2v.Wav2Vec2  # pretraining=False: no quantizer
    final_dim: int
    codebook_sizes: tuple[int, ...]
    cqt_bins: int
    logit_temp: float = 0.1

    def setup(self):
        width, dtype = self.encoder.width, self.encoder.dtype
        self.final_proj = vit.torch_dense(self.final_dim * len(self.codebook_sizes), width, dtype)
        self.label_embs = self.param(
            'label_embs', nn.initializers.uniform(1.0), (sum(self.codebook_sizes), self.final_dim)
        )
        if self.cqt_bins:
            self.cqt_proj = vit.torch_dense(self.cqt_bins, width, dtype)

    def __call__(
        self, waveform: jax.Array, num_samples: jax.Array, time_mask: jax.Array, deterministic: bool = True
    ) -> dict[str, Any]:
        """waveform (B, N), its valid samples (B,), time_mask (B, T) bool (T = frame_counts(N)).

        Returns 'logits': a tuple of (B, T, V_k) float32, one per codebook; 'cqt' (B, T, cqt_bins) float32 (absent
        without a CQT head); 'features_pen' (B,)."""
        hidden, _, features_pen = self.encoder.masked_context(waveform, num_samples, time_mask, deterministic)
        chunks = jnp.split(self.final_proj(hidden), len(self.codebook_sizes), axis=-1)
        starts = [sum(self.codebook_sizes[:k]) for k in range(len(self.codebook_sizes))]
        logits = tuple(
            cosine_logits(chunk, self.label_embs[start : start + size], self.logit_temp)
            for chunk, start, size in zip(chunks, starts, self.codebook_sizes, strict=True)
        )
        out = {'logits': logits, 'features_pen': features_pen}
        if self.cqt_bins:
            out['cqt'] = self.cqt_proj(hidden).astype(jnp.float32)
        chex.assert_shape(logits[0], (*time_mask.shape, self.codebook_sizes[0]))
        return out

    def encode(self, waveform: jax.Array, num_samples: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Unmasked, deterministic hidden states (B, T, width) and each block's: the representation."""
        return self.encoder.encode(waveform, num_samples)


def init_params(model: Mert, rng: jax.Array, waveform: jax.Array) -> Any:
    """model.init, then fairseq's init_bert_params (N(0, 0.02) Linear kernels) on the Transformer blocks."""
    init_rng, bert_rng = jax.random.split(rng)
    b, n = waveform.shape
    mask = jnp.zeros((b, int(w2v.frame_counts(n))), bool)
    params = dict(model.init(init_rng, waveform, jnp.full((b,), n), mask)['params'])
    encoder = dict(params['encoder'])
    for i, key in enumerate(jax.random.split(bert_rng, model.encoder.depth)):
        encoder[f'layers_{i}'] = vit.redraw_kernels(encoder[f'layers_{i}'], key, w2v.bert_init)
    params['encoder'] = encoder
    return params


def make_model(
    variant: str, codebook_sizes: tuple[int, ...], cqt_bins: int, logit_temp: float = 0.1, **encoder_fields: Any
) -> Mert:
    """A MERT of a named size (micro, 95M, 330M) with encoder field overrides (dropouts, layerdrop, dtype, ...)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant '{variant}'; valid: {', '.join(VARIANTS)}")
    fields = {**VARIANTS[variant], **encoder_fields}
    final_dim = fields.pop('final_dim')
    encoder = w2v.Wav2Vec2(**fields, final_dim=0, codevector_dim=0, pretraining=False, parent=None)
    return Mert(encoder, final_dim, tuple(codebook_sizes), cqt_bins, logit_temp)
