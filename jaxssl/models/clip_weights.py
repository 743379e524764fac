"""Released CLIP weights -> jaxssl.models.clip params, offline.

Reads a transformers `CLIPModel` folder (config.json and model.safetensors or pytorch_model.bin, as `save_pretrained`
writes them and the hub's openai/clip-vit-base-patch32, clip-vit-large-patch14, laion/CLIP-ViT-* hold them); its
tokenizer.json is what jaxssl.data.captions reads. OpenAI's own .pt files convert to that layout with transformers'
convert_clip_original_pytorch_to_hf.py. Only ViT image towers are built (not the ModifiedResNet ones).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxssl.convert import io
from jaxssl.models import clip
from jaxssl.models.bert_weights import dense, norm


def read_config(c: dict[str, Any], directory: str) -> dict[str, Any]:
    """jaxssl.models.clip.CLIP fields from a transformers CLIPModel config.json `c` (of `directory`, for messages);
    ValueError for what is not built."""
    if 'vision_config' not in c or 'text_config' not in c:
        raise ValueError(f'{directory}: not a CLIPModel config (no vision_config / text_config)')
    v, t = c['vision_config'], c['text_config']
    activation = t.get('hidden_act', 'quick_gelu')
    if activation not in clip.ACTIVATIONS or v.get('hidden_act', 'quick_gelu') != activation:
        raise ValueError(f"{directory}: hidden_act '{activation}' (vision '{v.get('hidden_act')}') is not supported")
    for tower, cfg in (('vision', v), ('text', t)):
        if cfg['intermediate_size'] != 4 * cfg['hidden_size']:
            raise ValueError(f'{directory}: {tower} intermediate_size must be 4 x hidden_size')
    # The hub's openai/clip-vit-* configs keep a legacy eos_token_id of 2, for which transformers (like openai's
    # argmax) pools at the largest token id: CLIP's end of text, the last id of its vocabulary.
    eot_id = t.get('eos_token_id', 2)
    if eot_id == 2:
        eot_id = t['vocab_size'] - 1
    return dict(
        embed_dim=c['projection_dim'],
        image_width=v['hidden_size'],
        image_depth=v['num_hidden_layers'],
        image_heads=v['num_attention_heads'],
        patch=v['patch_size'],
        image_size=v['image_size'],
        vocab_size=t['vocab_size'],
        context_length=t['max_position_embeddings'],
        text_width=t['hidden_size'],
        text_depth=t['num_hidden_layers'],
        text_heads=t['num_attention_heads'],
        eot_id=eot_id,
        activation=activation,
    )


def _block(w: dict[str, np.ndarray], prefix: str) -> dict[str, Any]:
    return {
        **{f'{part}_proj': dense(w, f'{prefix}.self_attn.{part}_proj') for part in ('q', 'k', 'v', 'out')},
        'layer_norm1': norm(w, f'{prefix}.layer_norm1'),
        'layer_norm2': norm(w, f'{prefix}.layer_norm2'),
        'fc1': dense(w, f'{prefix}.mlp.fc1'),
        'fc2': dense(w, f'{prefix}.mlp.fc2'),
    }


def torch_to_flax(weights: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """A CLIPModel state dict -> CLIP params (numpy); KeyError names a missing tensor."""
    w = {k: np.asarray(v, np.float32) for k, v in weights.items()}
    patch = w['vision_model.embeddings.patch_embedding.weight']  # (out, in, p, p)
    vision: dict[str, Any] = {
        # (out, c, p, p) -> rows in the (p, q, c) order of the model's patch flattening.
        'patch_embedding': {'kernel': patch.transpose(2, 3, 1, 0).reshape(-1, patch.shape[0])},
        'class_embedding': w['vision_model.embeddings.class_embedding'],
        'position_embedding': w['vision_model.embeddings.position_embedding.weight'],
        'pre_layrnorm': norm(w, 'vision_model.pre_layrnorm'),
        'post_layernorm': norm(w, 'vision_model.post_layernorm'),
    }
    text: dict[str, Any] = {
        'token_embedding': {'embedding': w['text_model.embeddings.token_embedding.weight']},
        'position_embedding': w['text_model.embeddings.position_embedding.weight'],
        'final_layer_norm': norm(w, 'text_model.final_layer_norm'),
    }
    for i in range(fields['image_depth']):
        vision[f'layers_{i}'] = _block(w, f'vision_model.encoder.layers.{i}')
    for i in range(fields['text_depth']):
        text[f'layers_{i}'] = _block(w, f'text_model.encoder.layers.{i}')
    return {
        'vision_model': vision,
        'text_model': text,
        'visual_projection': {'kernel': w['visual_projection.weight'].T},
        'text_projection': {'kernel': w['text_projection.weight'].T},
        'logit_scale': w['logit_scale'].reshape(()),
    }


def load(directory: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(CLIP fields plus 'image_size', params as numpy) of a transformers CLIPModel folder."""
    config, weights = io.read_transformers_folder(directory, 'CLIPModel')
    fields = read_config(config, directory)
    return fields, torch_to_flax(weights, fields)
