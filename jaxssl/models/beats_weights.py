"""Released BEATs checkpoints -> jaxssl params directories, offline.

    python -m jaxssl.models.beats_weights IN.pt OUT_DIR

The released files (microsoft/unilm beats/README.md) are torch pickles {'cfg': config fields, 'model': state dict}:
- BEATs_iter*.pt: the backbone (patch embedding, LayerNorm, projection, encoder) -> params {'backbone': ...}, which
  `configs/beats_tokenizer.py` reads as a teacher (teacher.path); a fine-tuned checkpoint's AudioSet classifier
  ('predictor.*') is left out.
- Tokenizer_iter*.pt: the tokenizer (backbone and quantize_layer) and its codebook -> params {'tokenizer': ...,
  'codebook': (K, d)}, which `configs/beats.py` reads with tokenizer.kind=trained (tokenizer.path).
The metadata names the size ('variant'); only the sizes of jaxssl.models.beats.VARIANTS convert.
"""

from __future__ import annotations

import re
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxssl.models import beats


def read_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """make_backbone_from_fields' fields from a checkpoint's cfg; ValueError for what jaxssl does not build."""
    for key, want in (('input_patch_size', 16), ('activation_fn', 'gelu'), ('layer_norm_first', False),
                      ('relative_position_embedding', True), ('conv_bias', False)):  # fmt: skip
        if cfg.get(key, want) != want:
            raise ValueError(f'BEATs cfg {key}={cfg[key]!r} is not supported (only {want!r})')
    return dict(
        embed_dim=cfg.get('embed_dim', 512),
        width=cfg.get('encoder_embed_dim', 768),
        depth=cfg.get('encoder_layers', 12),
        heads=cfg.get('encoder_attention_heads', 12),
        mlp=cfg.get('encoder_ffn_embed_dim', 3072),
        pos_conv_kernel=cfg.get('conv_pos', 128),
        pos_conv_groups=cfg.get('conv_pos_groups', 16),
        num_buckets=cfg.get('num_buckets', 320),
        max_distance=cfg.get('max_distance', 1280),
        deep_norm=cfg.get('deep_norm', False),
        gated_relative_position=cfg.get('gru_rel_pos', False),
        layer_grad_decay=cfg.get('layer_wise_gradient_decay_ratio', 1.0),
    )


def make_backbone_from_fields(fields: dict[str, Any], dtype: Any = jnp.float32) -> beats.BEATs:
    encoder = {k: v for k, v in fields.items() if k != 'embed_dim'}
    return beats.BEATs(fields['embed_dim'], beats.Encoder(**encoder, dtype=dtype), dtype=dtype)


class _Reads(dict):
    """A dict that remembers which keys were read, to find the tensors a conversion left out."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)


# Tensors a conversion leaves out on purpose: a fine-tuned model's AudioSet classifier, the tokenizer's quantizer
# (`convert` reads its codebook) and the copies of the shared relative position table under blocks 1 and up.
_LEFT_OUT = re.compile(r'predictor\..*|quantize.*|encoder\.layers\.[1-9][0-9]*\.self_attn\.relative_attention_bias\..*')


def torch_to_flax(weights: dict[str, Any], depth: int) -> dict[str, Any]:
    """A BEATs state dict (numpy or torch tensors) -> BEATs params (numpy). KeyError names a missing tensor,
    ValueError the tensors it would leave out unread (a layout it does not know)."""
    w = _Reads({k: np.asarray(v, np.float32) for k, v in weights.items()})
    dense = lambda p: {'kernel': w[f'{p}.weight'].T, 'bias': w[f'{p}.bias']}
    norm = lambda p: {'scale': w[f'{p}.weight'], 'bias': w[f'{p}.bias']}
    # Weight norm: torch < 2.1 saves weight_g / weight_v (the released files), later ones a parametrization.
    pos = 'encoder.pos_conv.0'
    g = w.get(f'{pos}.weight_g', w.get(f'{pos}.parametrizations.weight.original0'))
    v = w.get(f'{pos}.weight_v', w.get(f'{pos}.parametrizations.weight.original1'))
    if g is None or v is None:
        raise KeyError(f'{pos}.weight_g / weight_v (or its parametrizations.weight.original0 / 1)')
    encoder: dict[str, Any] = {
        'pos_conv': {'weight_v': v.transpose(2, 1, 0), 'weight_g': g.reshape(-1), 'bias': w[f'{pos}.bias']},
        'layer_norm': norm('encoder.layer_norm'),
        # Shared by every block; the state dict repeats it under each layer's name.
        'relative_attention_bias': w['encoder.layers.0.self_attn.relative_attention_bias.weight'],
    }
    for i in range(depth):
        p = f'encoder.layers.{i}'
        attention = {name: dense(f'{p}.self_attn.{name}') for name in ('q_proj', 'k_proj', 'v_proj', 'out_proj')}
        if f'{p}.self_attn.grep_a' in w:
            attention['grep_linear'] = dense(f'{p}.self_attn.grep_linear')
            attention['grep_a'] = w[f'{p}.self_attn.grep_a'].reshape(-1)
        encoder[f'layers_{i}'] = {
            'self_attn': attention,
            'self_attn_layer_norm': norm(f'{p}.self_attn_layer_norm'),
            'fc1': dense(f'{p}.fc1'),
            'fc2': dense(f'{p}.fc2'),
            'final_layer_norm': norm(f'{p}.final_layer_norm'),
        }
    params = {
        'patch_embedding': {'kernel': w['patch_embedding.weight'].transpose(2, 3, 1, 0)},  # (out, 1, t, f) -> HWIO
        'layer_norm': norm('layer_norm'),
        'post_extract_proj': dense('post_extract_proj'),
        'encoder': encoder,
    }
    unread = sorted(k for k in set(w) - w.read if not _LEFT_OUT.fullmatch(k))
    if unread:
        raise ValueError(f'{len(unread)} tensors of an unknown layout would be left out: {", ".join(unread[:8])}')
    return params


def variant_of(fields: dict[str, Any]) -> str:
    """The named size whose fields these are; ValueError otherwise."""
    for name, sizes in beats.VARIANTS.items():
        encoder = beats.make_backbone(name).encoder
        keys = ('num_buckets', 'max_distance', 'deep_norm', 'gated_relative_position')
        named = {**sizes, **{k: getattr(encoder, k) for k in keys}}
        if all(fields[k] == v for k, v in named.items()):
            return name
    raise ValueError(f'the checkpoint is no named BEATs size ({", ".join(beats.VARIANTS)}): {fields}')


def convert(checkpoint: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(params, metadata) of a released checkpoint {'cfg', 'model'}: {'backbone'} for a BEATs model, {'tokenizer',
    'codebook'} for a tokenizer."""
    fields = read_config(checkpoint['cfg'])
    weights = checkpoint['model']
    backbone = torch_to_flax(weights, fields['depth'])
    metadata = {'variant': variant_of(fields), 'layer_grad_decay': fields['layer_grad_decay']}
    if 'quantize_layer.0.weight' not in weights:
        return {'backbone': backbone}, {**metadata, 'kind': 'beats'}
    w = {k: np.asarray(v, np.float32) for k, v in weights.items()}
    dense = lambda p: {'kernel': w[f'{p}.weight'].T, 'bias': w[f'{p}.bias']}
    tokenizer = {'backbone': backbone, 'quantize_layer_0': dense('quantize_layer.0'),
                 'quantize_layer_2': dense('quantize_layer.2')}  # fmt: skip
    codebook = w['quantize.embedding.weight']
    # The codes are looked up by cosine (jaxssl.models.norm_ema_quantizer), which equals the reference's distance
    # argmin only for unit codes, which its EMA keeps.
    norms = np.linalg.norm(codebook, axis=1)
    if not np.allclose(norms, 1.0, atol=1e-3):
        raise ValueError(f'the codebook rows are not unit vectors (norms {norms.min():.4f} to {norms.max():.4f})')
    return {'tokenizer': tokenizer, 'codebook': codebook}, {**metadata, 'kind': 'tokenizer'}


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    import torch

    from jaxssl import params_io

    parser = argparse.ArgumentParser(prog='python -m jaxssl.models.beats_weights', description=__doc__.split('\n')[0])
    parser.add_argument('checkpoint', help='a released BEATs_iter*.pt or Tokenizer_iter*.pt')
    parser.add_argument('out_dir', help='the params directory to write')
    args = parser.parse_args(argv)
    try:
        # The released files hold a dict of plain fields and a state dict: no pickled code runs.
        checkpoint = torch.load(args.checkpoint, map_location='cpu', weights_only=True)
        params, metadata = convert(checkpoint)
        params_io.save_params(args.out_dir, params, {**metadata, 'source': args.checkpoint})
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        print(f'error: {args.checkpoint}: {e}', file=sys.stderr)
        return 2
    print(f'{args.checkpoint} ({metadata["kind"]}, {metadata["variant"]}) -> {args.out_dir}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
