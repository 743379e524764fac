"""Released wav2vec 2.0 weights -> jaxssl.models.wav2vec2 params, offline.

Reads a transformers `Wav2Vec2ForPreTraining` folder (config.json and model.safetensors or pytorch_model.bin, as
`save_pretrained` writes them and the hub's facebook/wav2vec2-base, wav2vec2-large-xlsr-53, wav2vec2-xls-r-300m
hold them). A fairseq checkpoint converts to that layout with transformers' own script
(convert_wav2vec2_original_pytorch_checkpoint_to_pytorch.py). Fine-tuned CTC checkpoints (Wav2Vec2ForCTC) lack the
quantizer: continued pretraining refuses them, CTC fine-tuning reads them (`quantizer=False`) with their letter head.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxssl.convert import io
from jaxssl.models import bert_weights
from jaxssl.models import wav2vec2 as w2v
from jaxssl.models.bert_weights import dense, norm


def read_config(c: dict[str, Any], directory: str) -> dict[str, Any]:
    """The Wav2Vec2 fields of a transformers config.json `c` (of `directory`, for messages); ValueError for
    architectures jaxssl does not build."""
    kernels_strides = tuple(zip(c['conv_kernel'], c['conv_stride'], strict=True))
    if kernels_strides != w2v.KERNELS_STRIDES or len(set(c['conv_dim'])) != 1:
        raise ValueError(f'{directory}: only the reference feature encoder (7 equal-width convolutions) is supported')
    for key in ('hidden_act', 'feat_extract_activation'):
        if c.get(key, 'gelu') != 'gelu':
            raise ValueError(f"{directory}: {key} '{c[key]}' is not supported (gelu only)")
    if c.get('feat_extract_norm', 'group') not in w2v.EXTRACTOR_MODES:
        raise ValueError(f"{directory}: feat_extract_norm '{c['feat_extract_norm']}' is not supported")
    return dict(
        conv_channels=c['conv_dim'][0],
        extractor_mode=c.get('feat_extract_norm', 'group'),
        conv_bias=c.get('conv_bias', False),
        width=c['hidden_size'],
        depth=c['num_hidden_layers'],
        heads=c['num_attention_heads'],
        mlp=c['intermediate_size'],
        norm_first=c.get('do_stable_layer_norm', False),
        final_dim=c['proj_codevector_dim'],
        codevector_dim=c['codevector_dim'],
        codebooks=c['num_codevector_groups'],
        codebook_entries=c['num_codevectors_per_group'],
        pos_conv_kernel=c['num_conv_pos_embeddings'],
        pos_conv_groups=c['num_conv_pos_embedding_groups'],
        eps=c.get('layer_norm_eps', 1e-5),
    )


def feature_extractor(w: dict[str, Any], prefix: str, mode: str, conv_bias: bool) -> dict[str, Any]:
    """wav2vec2.FeatureEncoder params from transformers' conv_layers under `prefix` ('group' mode: a norm after the
    first convolution only, transformers names it layer_norm too)."""
    extractor: dict[str, Any] = {}
    for i in range(len(w2v.KERNELS_STRIDES)):
        p = f'{prefix}.conv_layers.{i}'
        conv = {'kernel': w[f'{p}.conv.weight'].transpose(2, 1, 0)}  # (out, in, k) -> (k, in, out)
        if conv_bias:
            conv['bias'] = w[f'{p}.conv.bias']
        extractor[f'conv_{i}'] = conv
        if mode == 'layer' or i == 0:
            extractor[f'norm_{i}'] = norm(w, f'{p}.layer_norm')
    return extractor


def positional_conv(w: dict[str, Any], prefix: str) -> dict[str, Any]:
    """wav2vec2.PositionalConv params from transformers' weight-normed pos_conv_embed.conv at `prefix`."""
    # Weight norm: transformers < 4.40 / torch < 2.1 save weight_g / weight_v, later ones a parametrization.
    g = w.get(f'{prefix}.weight_g', w.get(f'{prefix}.parametrizations.weight.original0'))
    v = w.get(f'{prefix}.weight_v', w.get(f'{prefix}.parametrizations.weight.original1'))
    if g is None or v is None:
        raise KeyError(f'{prefix}.weight_g / weight_v (or its parametrizations.weight.original0 / 1)')
    return {'weight_v': v.transpose(2, 1, 0), 'weight_g': g.reshape(-1), 'bias': w[f'{prefix}.bias']}


def encoder_layer(w: dict[str, Any], prefix: str) -> dict[str, Any]:
    """bert.Layer params from transformers' wav2vec 2.0-style encoder layer at `prefix` (SpeechT5's too)."""
    return bert_weights.layer(w, {
        'query': f'{prefix}.attention.q_proj',
        'key': f'{prefix}.attention.k_proj',
        'value': f'{prefix}.attention.v_proj',
        'attention_output': f'{prefix}.attention.out_proj',
        'attention_norm': f'{prefix}.layer_norm',
        'intermediate': f'{prefix}.feed_forward.intermediate_dense',
        'output': f'{prefix}.feed_forward.output_dense',
        'output_norm': f'{prefix}.final_layer_norm',
    })  # fmt: skip


def torch_to_flax(weights: dict[str, Any], fields: dict[str, Any], quantizer: bool = True) -> dict[str, Any]:
    """A Wav2Vec2ForPreTraining (or, without `quantizer`, also a Wav2Vec2ForCTC) state dict -> Wav2Vec2 params
    (numpy): the encoder, and the quantizer and final projection when `quantizer`, the CTC head 'lm_head' when the
    checkpoint has one. KeyError names a missing tensor."""
    w = {k: np.asarray(v, np.float32) for k, v in weights.items()}
    if quantizer and 'quantizer.codevectors' not in w:
        raise KeyError('quantizer.codevectors: not a Wav2Vec2ForPreTraining checkpoint (no quantizer to continue)')
    m = 'wav2vec2.'
    extractor = feature_extractor(w, f'{m}feature_extractor', fields['extractor_mode'], fields['conv_bias'])
    params: dict[str, Any] = {
        'feature_extractor': extractor,
        'feature_norm': norm(w, f'{m}feature_projection.layer_norm'),
        'post_extract_proj': dense(w, f'{m}feature_projection.projection'),
        'mask_emb': w[f'{m}masked_spec_embed'],
        'pos_conv': positional_conv(w, f'{m}encoder.pos_conv_embed.conv'),
        'encoder_norm': norm(w, f'{m}encoder.layer_norm'),
    }
    if quantizer:
        params['quantizer_weight_proj'] = dense(w, 'quantizer.weight_proj')
        params['quantizer_codevectors'] = w['quantizer.codevectors'][0]
        params['project_q'] = dense(w, 'project_q')
        params['final_proj'] = dense(w, 'project_hid')
    if 'lm_head.weight' in w:
        params['lm_head'] = dense(w, 'lm_head')
    for i in range(fields['depth']):
        params[f'layers_{i}'] = encoder_layer(w, f'{m}encoder.layers.{i}')
    return params


def load(directory: str, quantizer: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """(Wav2Vec2 fields, params as numpy) of a transformers Wav2Vec2ForPreTraining folder (with `quantizer`), or of
    a Wav2Vec2ForPreTraining / Wav2Vec2ForCTC folder's encoder and CTC head (without)."""
    config, weights = io.read_transformers_folder(directory, 'Wav2Vec2ForPreTraining')
    fields = read_config(config, directory)
    return fields, torch_to_flax(weights, fields, quantizer)
