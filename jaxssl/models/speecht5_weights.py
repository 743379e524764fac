"""transformers' SpeechT5 state dicts -> jaxssl.models.speecht5.SpeechT5 params.

A SpeechT5ForSpeechToText dict carries the speech-encoder pre-net, the encoder, the text-decoder pre-net and the
decoder; a SpeechT5ForTextToSpeech dict the text-encoder pre-net (its token embedding and the alpha of its
sinusoids), the decoder and the speech-decoder pre- and post-nets; a SpeechT5ForSpeechToSpeech dict the speech
pre-net, the decoder and the speech-decoder nets. The token embedding is shared: the first of the text pre-nets'
tables present is used (they are tied). The post-net's BatchNorm statistics come from `batch_stats`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxssl.models import wav2vec2_weights as w2v_weights
from jaxssl.models.bert_weights import decoder_layer, dense, norm


def to_flax(weights: dict[str, Any], encoder_depth: int, decoder_depth: int) -> dict[str, Any]:
    """The parts of SpeechT5 a transformers state dict holds (see the module doc). KeyError names a missing tensor."""
    w = {k.removeprefix('speecht5.'): np.asarray(v, np.float32) for k, v in weights.items()}
    encoder = 'encoder.wrapped_encoder'
    params: dict[str, Any] = {
        'encoder_norm': norm(w, f'{encoder}.layer_norm'),
        'relative_keys': {'embedding': w[f'{encoder}.embed_positions.pe_k.weight']},
    }
    for i in range(encoder_depth):
        params[f'encoder_layer_{i}'] = w2v_weights.encoder_layer(w, f'{encoder}.layers.{i}')
    prenet = 'encoder.prenet'
    if f'{prenet}.feature_encoder.conv_layers.0.conv.weight' in w:  # the speech-encoder pre-net
        extractor = w2v_weights.feature_extractor(w, f'{prenet}.feature_encoder', 'group', False)
        params.update(
            feature_extractor=extractor,
            feature_norm=norm(w, f'{prenet}.feature_projection.layer_norm'),
            post_extract_proj=dense(w, f'{prenet}.feature_projection.projection'),
            mask_emb=w[f'{prenet}.masked_spec_embed'],
            pos_conv=w2v_weights.positional_conv(w, f'{prenet}.pos_conv_embed.conv'),
        )
    if f'{prenet}.encode_positions.alpha' in w:  # the text-encoder pre-net
        params['text_position_scale'] = w[f'{prenet}.encode_positions.alpha'].reshape(())
    for table in (f'{prenet}.embed_tokens.weight', 'decoder.prenet.embed_tokens.weight'):
        if table in w:
            params['shared'] = {'embedding': w[table]}
            break
    speech = 'decoder.prenet'
    if f'{speech}.final_layer.weight' in w:  # the speech-decoder pre-net
        layers = sorted({k.split('.')[3] for k in w if k.startswith(f'{speech}.layers.')}, key=int)
        params.update(
            {f'speech_prenet_layers_{i}': dense(w, f'{speech}.layers.{i}') for i in map(int, layers)},
            speech_prenet_final=dense(w, f'{speech}.final_layer'),
            speech_position_scale=w[f'{speech}.encode_positions.alpha'].reshape(()),
            speaker_projection=dense(w, f'{speech}.speaker_embeds_layer'),
        )
    postnet = 'speech_decoder_postnet'
    if f'{postnet}.feat_out.weight' in w:
        params.update(feat_out=dense(w, f'{postnet}.feat_out'), prob_out=dense(w, f'{postnet}.prob_out'))
        for i in range(postnet_depth(w)):
            p = f'{postnet}.layers.{i}'
            params[f'postnet_convs_{i}'] = {'kernel': w[f'{p}.conv.weight'].transpose(2, 1, 0)}
            params[f'postnet_norms_{i}'] = norm(w, f'{p}.batch_norm')
    for i in range(decoder_depth):
        p = f'decoder.wrapped_decoder.layers.{i}'
        if f'{p}.self_attn.q_proj.weight' in w:
            params[f'decoder_layer_{i}'] = decoder_layer(
                w, p, ('feed_forward.intermediate_dense', 'feed_forward.output_dense')
            )
    return params


def postnet_depth(w: dict[str, Any]) -> int:
    return len({k.split('.')[2] for k in w if k.startswith('speech_decoder_postnet.layers.')})


def batch_stats(weights: dict[str, Any]) -> dict[str, Any]:
    """The speech-decoder post-net's BatchNorm running statistics ('batch_stats'), empty without a post-net."""
    w = {k: np.asarray(v, np.float32) for k, v in weights.items()}
    return {
        f'postnet_norms_{i}': {
            'mean': w[f'speech_decoder_postnet.layers.{i}.batch_norm.running_mean'],
            'var': w[f'speech_decoder_postnet.layers.{i}.batch_norm.running_var'],
        }
        for i in range(postnet_depth(w))
    }
