"""Released EnCodec 24 kHz weights -> a jaxssl params directory for MERT's acoustic teacher, offline.

    python -m jaxssl.models.encodec_weights IN OUT_DIR

IN is a transformers folder (facebook/encodec_24khz: config.json and model.safetensors or pytorch_model.bin) or the
encodec package's checkpoint (encodec_24khz-d7cc33bc.th, a state dict). Only the encoder and the quantizer's
codebooks are kept (the decoder is not needed for labels); weight norm is folded into the kernels. The params
directory holds {'encoder': ..., 'codebooks': (32, 1024, 128)}, which configs/mert.py reads with
teacher.kind=encodec (teacher.path).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
import numpy as np

from jaxssl.models import encodec

# The 24 kHz model's configuration (transformers' EncodecConfig defaults); other models (48 kHz, stereo) differ.
CONFIG_24KHZ = {
    'sampling_rate': 24000, 'audio_channels': 1, 'num_filters': 32, 'upsampling_ratios': [8, 5, 4, 2],
    'kernel_size': 7, 'last_kernel_size': 7, 'residual_kernel_size': 3, 'num_residual_layers': 1, 'compress': 2,
    'num_lstm_layers': 2, 'hidden_size': 128, 'codebook_size': 1024, 'codebook_dim': 128, 'norm_type': 'weight_norm',
    'use_causal_conv': True, 'pad_mode': 'reflect', 'normalize': False, 'use_conv_shortcut': True,
}  # fmt: skip


def check_config(config: dict[str, Any]) -> None:
    """ValueError naming every field of a transformers EncodecConfig that differs from the 24 kHz model's."""
    bad = {k: config.get(k) for k, want in CONFIG_24KHZ.items() if k in config and config[k] != want}
    if bad:
        raise ValueError(f"not the 24 kHz EnCodec (MERT's teacher): {bad}")


def canonical(key: str) -> str:
    """One naming for both layouts: transformers' (encoder.layers.i..., parametrizations.weight.original0/1) and the
    encodec package's (encoder.model.i.conv.conv..., quantizer.vq.layers.k._codebook...)."""
    key = key.replace('encoder.model.', 'encoder.layers.').replace('.conv.conv.', '.conv.')
    key = key.replace('quantizer.vq.layers.', 'quantizer.layers.').replace('._codebook.', '.codebook.')
    return key.replace('parametrizations.weight.original0', 'weight_g').replace(
        'parametrizations.weight.original1', 'weight_v'
    )


def convert(state: dict[str, Any]) -> dict[str, Any]:
    """{'encoder': flax params, 'codebooks': (K, 1024, 128)} from a state dict of either layout; ValueError when a
    tensor is missing, left over or mis-shaped."""
    weights = {canonical(k): np.asarray(v, np.float32) for k, v in state.items()}
    used: set[str] = set()

    def take(name: str) -> np.ndarray:
        if name not in weights:
            raise ValueError(f'missing tensor {name}')
        used.add(name)
        return weights[name]

    def conv(prefix: str) -> dict[str, np.ndarray]:
        if f'{prefix}.conv.weight_v' in weights:
            v, g = take(f'{prefix}.conv.weight_v'), take(f'{prefix}.conv.weight_g')
            weight = g * v / np.sqrt(np.sum(v.astype(np.float64) ** 2, axis=(1, 2), keepdims=True))
        else:
            weight = take(f'{prefix}.conv.weight')
        return {'conv': {'kernel': weight.transpose(2, 1, 0).astype(np.float32), 'bias': take(f'{prefix}.conv.bias')}}

    shapes = encodec.param_shapes()['encoder']
    params: dict[str, Any] = {}
    for name in shapes:
        prefix = f'encoder.layers.{name.split("_")[1]}'
        if 'conv' in shapes[name]:
            params[name] = conv(prefix)
        elif 'shortcut' in shapes[name]:
            params[name] = {part: conv(f'{prefix}.{part.replace("_", ".")}') for part in ('block_1', 'block_3')}
            params[name]['shortcut'] = conv(f'{prefix}.shortcut')
        else:
            params[name] = {k: take(f'{prefix}.lstm.{k}') for k in shapes[name]}
    count = 0
    while f'quantizer.layers.{count}.codebook.embed' in weights:
        count += 1
    if not count:
        raise ValueError('no quantizer codebooks (quantizer.layers.0.codebook.embed)')
    codebooks = np.stack([take(f'quantizer.layers.{k}.codebook.embed') for k in range(count)])
    got = jax.tree.map(np.shape, params)
    want = jax.tree.map(lambda s: tuple(s.shape), shapes)
    if got != want or codebooks.shape[1:] != (encodec.CODEBOOK_SIZE, encodec.DIMENSION):
        raise ValueError(f'shapes differ from the 24 kHz EnCodec: {got} / codebooks {codebooks.shape}')
    # Tensors of the encoder or quantizer left unread would mean a layout this converter does not know.
    unknown = sorted(
        k for k in weights if k.startswith(('encoder.', 'quantizer.')) and k not in used and not k.endswith(
            ('inited', 'cluster_size', 'embed_avg')
        )
    )  # fmt: skip
    if unknown:
        raise ValueError(f'unexpected tensors: {unknown[:8]}')
    return {'encoder': params, 'codebooks': codebooks}


def read_state(path: str) -> dict[str, Any]:
    """The state dict of a transformers folder or an encodec .th file."""
    if os.path.isdir(path):
        config_path = os.path.join(path, 'config.json')
        if os.path.isfile(config_path):
            with open(config_path) as f:
                check_config(json.load(f))
        safetensors = os.path.join(path, 'model.safetensors')
        if os.path.isfile(safetensors):
            from safetensors.numpy import load_file

            return load_file(safetensors)
        path = os.path.join(path, 'pytorch_model.bin')
    import torch

    state = torch.load(path, map_location='cpu', weights_only=True)
    state = state.get('model', state) if isinstance(state, dict) else state
    return {k: v.float().numpy() for k, v in state.items() if re.match(r'(encoder|quantizer)\.', k)}


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    from jaxssl import params_io

    parser = argparse.ArgumentParser(prog='python -m jaxssl.models.encodec_weights', description=__doc__.split('\n')[0])
    parser.add_argument('checkpoint', help='a transformers EnCodec 24 kHz folder or encodec_24khz-*.th')
    parser.add_argument('out_dir', help='the params directory to write')
    args = parser.parse_args(argv)
    try:
        params = convert(read_state(args.checkpoint))
        metadata = {'kind': 'encodec_24khz', 'source': args.checkpoint, 'codebooks': len(params['codebooks'])}
        params_io.save_params(args.out_dir, params, metadata)
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        print(f'error: {args.checkpoint}: {e}', file=sys.stderr)
        return 2
    print(f'{args.checkpoint} (EnCodec 24 kHz, {metadata["codebooks"]} codebooks) -> {args.out_dir}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
