"""CLIP (Radford et al., ICML 2021; openai/CLIP, trained as mlfoundations/open_clip): contrastive image-text
pretraining. An image tower and a text tower embed N pairs; the symmetric InfoNCE over the N x N cosine matrix,
scaled by a learned exp(logit_scale) (init 1 / 0.07, kept <= 100 by optim.clamp), pulls each image to its own caption.

Batch layout: 'image' (B, S, S, 3) ImageNet-normalised by the shared image pipeline (re-normalised on device to
OpenAI's statistics, which released weights expect), 'tokens' (B, L) int32 caption ids (jaxssl.data.captions). The
loss all-gathers both sides' embeddings over the mesh's batch axes (jaxssl.losses.contrastive.global_clip_loss), so
every image is scored against the captions of the whole global batch, as open_clip's gathered loss.

Evaluation: frozen-feature probes of the image tower (the pooled class token before and after the projection), and
zero-shot classification: each class's prompts (eval.zero_shot_templates x class names) are embedded, normalised,
averaged and re-normalised (openai's zero-shot classifier), and an image takes the class of highest cosine.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from jaxssl import params_io, sharding
from jaxssl.config import ConfigError, check_choice
from jaxssl.data import captions
from jaxssl.data import images as image_data
from jaxssl.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from jaxssl.evaluate import frozen
from jaxssl.losses import contrastive
from jaxssl.methods import _image
from jaxssl.methods.videomae import DTYPES, transformer_flops
from jaxssl.models import clip as clip_model
from jaxssl.models import clip_weights

DATASETS = ('csv', 'mnist_digits')
# OpenAI's image statistics (openai/CLIP clip.py _transform), which every released CLIP model expects.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, naming the key, on values the model, tokenizer or data cannot use (files: when the method is
    built)."""
    m = config.model
    if not m.pretrained:
        check_choice(config, 'model.variant', clip_model.VARIANTS)
        patch = clip_model.VARIANTS[m.variant][1][2]
        if config.input.image_size % patch:
            raise ConfigError(f"bad value {config.input.image_size} for 'input.image_size': not a multiple of {patch}")
    check_choice(config, 'model.dtype', DTYPES)
    check_choice(config, 'model.activation', clip_model.ACTIVATIONS)
    image_data.check_image_input_config(config, DATASETS)
    if config.input.num_sample != 1:
        raise ConfigError(f"bad value {config.input.num_sample} for 'input.num_sample': CLIP takes one view")
    if config.train.grad_accum != 1:
        # The trainer's accumulation scores each micro-batch against its own captions only: fewer negatives, another
        # objective (open_clip's accum_freq caches every micro-batch's features instead). Shard the batch instead.
        raise ConfigError(
            f"bad value {config.train.grad_accum} for 'train.grad_accum': CLIP's negatives are the whole batch; "
            'accumulated micro-batches would each see only their own'
        )
    if not isinstance(config.text.context_length, int) or config.text.context_length < 3:
        raise ConfigError(f"bad value {config.text.context_length!r} for 'text.context_length': an integer >= 3")
    if not config.eval.zero_shot_templates or any('{}' not in t for t in config.eval.zero_shot_templates):
        raise ConfigError("'eval.zero_shot_templates': each prompt needs a '{}' for the class name")


def build_clip(config: ml_collections.ConfigDict) -> tuple[clip_model.CLIP, captions.CaptionTokenizer, Any]:
    """(model, tokenizer, released params or None) of a CLIP config: `model.pretrained` (a transformers CLIPModel
    folder: sizes from its config.json) or `model.variant`, and `text.tokenizer` ('' : the built-in captions' words).
    Raises ConfigError naming the key when files are missing or do not fit each other."""
    m, t = config.model, config.text
    try:
        if t.tokenizer:
            tokenizer = captions.CaptionTokenizer.from_file(t.tokenizer)
        else:
            tokenizer = captions.word_tokenizer(captions.digit_vocabulary())
        fields, pretrained = clip_weights.load(m.pretrained) if m.pretrained else (None, None)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"'model.pretrained' / 'text.tokenizer': {e}") from None
    kwargs = dict(activation=m.activation, dtype=DTYPES[m.dtype], attention_impl=m.attention_impl or None)
    if fields is None:
        model = clip_model.make_model(m.variant, tokenizer.vocab_size, t.context_length, tokenizer.eot_id, **kwargs)
    else:  # sizes and activation from the checkpoint's config.json
        image_size = fields.pop('image_size')
        if config.input.image_size != image_size:
            raise ConfigError(f"'input.image_size' {config.input.image_size}: {m.pretrained} takes {image_size}")
        model = clip_model.CLIP(**{**kwargs, **fields})
    if model.vocab_size < tokenizer.vocab_size or model.eot_id != tokenizer.eot_id:
        raise ConfigError(
            f"'text.tokenizer': its {tokenizer.vocab_size} tokens / end-of-text id {tokenizer.eot_id} do not fit the "
            f'model ({model.vocab_size} tokens, end of text {model.eot_id}); a released model needs its own '
            'tokenizer.json (text.tokenizer = its folder)'
        )
    if t.context_length > model.context_length:
        raise ConfigError(f"'text.context_length' exceeds the model's {model.context_length} positions")
    return model, tokenizer, pretrained


def frozen_clip(
    path: str, key: str, own: ml_collections.ConfigDict, size_key: str = 'input.image_size', text: bool = True
) -> tuple[clip_model.CLIP, captions.CaptionTokenizer | None, int, Any]:
    """(model, tokenizer, context length, host loader of its params or None for a random init) of a frozen CLIP
    read from `path`: a jaxssl CLIP training workdir (its config.json and latest checkpoint), a transformers
    CLIPModel folder (with its tokenizer.json), or '' (a random CLIP of the CLIP config `own`, with the built-in
    captions' words: tests only). `own` also gives the dtype and the image size the CLIP must take; errors name
    `key` (the path's config key) and `size_key`. The loader takes the params' shapes. Without `text` (a method
    that reads only the image tower) a transformers folder needs no tokenizer.json, and the tokenizer is None."""
    if not path:
        model, tokenizer, _ = build_clip(own)
        return model, tokenizer, own.text.context_length, None
    if os.path.isdir(os.path.join(path, 'checkpoints')):
        try:
            with open(os.path.join(path, 'config.json')) as f:
                run = ml_collections.ConfigDict(json.load(f))
        except (OSError, ValueError) as e:
            raise ConfigError(f"'{key}' {path}: cannot read its config.json ({e})") from None
        if run.get('method') != 'clip':
            raise ConfigError(f"'{key}' {path} is a {run.get('method')!r} workdir, not a CLIP run")
        if run.input.image_size != own.input.image_size:
            raise ConfigError(f"'{size_key}' {own.input.image_size}: the CLIP in {path} takes "
                              f'{run.input.image_size}')  # fmt: skip
        run.model.dtype = own.model.dtype
        model, tokenizer, _ = build_clip(run)

        def load(shapes: Any) -> Any:
            try:
                loaded, _, _ = params_io.load_selected(path, shapes)
            except ValueError as e:
                raise ConfigError(f"'{key}' {path}: {e}") from None
            return traverse_util.unflatten_dict(loaded, sep='/')

        return model, tokenizer, run.text.context_length, load
    if not text:
        try:
            fields, released = clip_weights.load(path)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"'{key}' {path} is neither a CLIP training workdir nor a transformers CLIP folder: "
                              f'{e}') from None  # fmt: skip
        image_size = fields.pop('image_size')
        if image_size != own.input.image_size:
            raise ConfigError(f"'{size_key}' {own.input.image_size}: the CLIP in {path} takes {image_size}")
        model = clip_model.CLIP(**fields, dtype=DTYPES[own.model.dtype])
        return model, None, model.context_length, lambda _: released
    own = ml_collections.ConfigDict(own.to_dict())
    own.model.pretrained, own.text.tokenizer = path, path
    try:
        model, tokenizer, released = build_clip(own)
    except ConfigError as e:
        raise ConfigError(f"'{key}' {path} is neither a CLIP training workdir nor a transformers CLIP folder: "
                          f'{e}') from None  # fmt: skip
    return model, tokenizer, own.text.context_length, lambda _: released


def clip_renormalisation() -> tuple[np.ndarray, np.ndarray]:
    """(a, b) per channel with x * a + b turning ImageNet-normalised pixels into OpenAI-normalised ones (exact up to
    rounding): the shared image pipelines normalise with ImageNet's statistics, released CLIPs expect OpenAI's."""
    in_mean, in_std = np.asarray(IMAGENET_MEAN), np.asarray(IMAGENET_STD)
    out_mean, out_std = np.asarray(CLIP_MEAN), np.asarray(CLIP_STD)
    return (in_std / out_std).astype(np.float32), ((in_mean - out_mean) / out_std).astype(np.float32)


class Method(_image.ImageMethod):
    """CLIP pretraining for the one trainer."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        t = config.text
        # Data paths are checked when a run starts, not at config load.
        if config.input.dataset == 'csv':
            if not config.input.captions_csv:
                raise ConfigError("input.captions_csv is empty: pass a CSV of image paths and captions (dataset 'csv')")
            if not t.tokenizer:
                raise ConfigError(
                    'text.tokenizer is empty: captions from a CSV need a tokenizer.json (or a transformers CLIP '
                    'folder holding one, e.g. openai/clip-vit-base-patch32)'
                )
        self.model, self.tokenizer, self._pretrained = build_clip(config)
        self._renorm = clip_renormalisation()

    # --- data -------------------------------------------------------------------------------------------------
    def train_source(self) -> Any:
        c = self.config.input
        if c.dataset == 'mnist_digits':
            return captions.DigitCaptionSource(c.split)
        try:
            return captions.CaptionCsvSource(c.captions_csv, c.csv_image_key, c.csv_caption_key, c.csv_separator)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"'input.captions_csv': {e}") from None

    def dataset(self, seed: int, process_index: int, process_count: int) -> tuple[Any, int]:
        source = self.train_source()
        view = captions.PairView(
            image_data.make_pretrain_view(self.config), self.tokenizer, self.config.text.context_length
        )
        dataset = image_data.make_image_pretrain_dataset(
            self.config,
            seed=seed,
            process_index=process_index,
            process_count=process_count,
            view=view,
            source=source,
            decode=captions.decode_pair,
        )
        return dataset, len(source)

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        size, length = self.config.input.image_size, self.config.text.context_length
        return {
            'image': np.zeros((batch_size, size, size, 3), np.float32),
            'tokens': np.zeros((batch_size, length), np.int32),
        }

    # --- model ------------------------------------------------------------------------------------------------
    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        if self._pretrained is not None:
            return jax.tree.map(jnp.asarray, self._pretrained), {}
        return self.model.init(rng, batch['image'], batch['tokens'])['params'], {}

    def clip_normalise(self, images: jax.Array) -> jax.Array:
        scale, shift = self._renorm
        return images * jnp.asarray(scale) + jnp.asarray(shift)

    def loss(self, params, extra, batch, rng, step):
        images, tokens = batch['image'], batch['tokens']
        chex.assert_rank([images, tokens], [4, 2])
        image, text, logit_scale = self.model.apply({'params': params}, self.clip_normalise(images), tokens)
        loss, metrics = contrastive.global_clip_loss(image, text, logit_scale, self.mesh, sharding.BATCH_AXES)
        return loss, ({'loss': loss, 'logit_scale': jnp.exp(logit_scale), **metrics}, extra)

    def represent(self, params, extra, batch):
        """The image tower's pooled class token before ('cls') and after ('embed') the projection."""
        pooled, embedded = self.model.apply(
            {'params': params}, self.clip_normalise(batch['image']), method=self.model.image_features
        )
        return {'cls': pooled, 'embed': embedded}

    # --- evaluation -------------------------------------------------------------------------------------------
    def eval_source(self, split: str) -> Any:
        """The labelled images probes and zero-shot classification read: the built-in digits, or class folders
        <eval.data_root>/<split>/<class>/<image> (the class names are the zero-shot labels)."""
        if self.config.input.dataset == 'mnist_digits':
            return image_data.DigitsSource(split)
        return image_data.ImageFolderSource(os.path.join(self.config.eval.data_root, split))

    def class_names(self) -> list[str]:
        """eval.class_names, else the digits' words or the class folders' names (underscores as spaces): folders named
        by ids (ImageNet's n01440764, ...) need eval.class_names, in the sorted folder order, for zero-shot."""
        e = self.config.eval
        source = None if self.config.input.dataset == 'mnist_digits' else self.eval_source(e.split)
        if e.class_names:
            count = 10 if source is None else len(source.class_names)
            if len(e.class_names) != count:
                raise ConfigError(f"'eval.class_names' has {len(e.class_names)} names for {count} classes")
            return list(e.class_names)
        if source is None:
            return list(captions.DIGIT_WORDS)
        return [name.replace('_', ' ') for name in source.class_names]

    @functools.cached_property
    def _encode_text(self) -> Any:
        """The jitted text tower (compiled once for every evaluation), its output replicated on every device."""
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        encode = lambda p, t: self.model.apply({'params': p}, t, method=self.model.encode_text)
        return jax.jit(encode, out_shardings=replicated)

    def zero_shot_classifier(self, params: Any, class_names: list[str], chunk: int = 256) -> np.ndarray:
        """(classes, D) unit vectors: each class's prompts embedded, normalised, averaged, re-normalised. Prompts go
        through the text tower `chunk` at a time; the embeddings come back replicated, readable on every process."""
        templates = list(self.config.eval.zero_shot_templates)
        prompts = [t.format(name) for name in class_names for t in templates]
        tokens = self.tokenizer(prompts, self.config.text.context_length)
        encode = self._encode_text
        padded = np.concatenate([tokens, np.zeros((-len(tokens) % chunk, tokens.shape[1]), np.int32)])
        parts = [np.asarray(encode(params, padded[i : i + chunk])) for i in range(0, len(padded), chunk)]
        text = np.concatenate(parts)[: len(prompts)].astype(np.float64)
        text /= np.linalg.norm(text, axis=1, keepdims=True)
        classes = text.reshape(len(class_names), len(templates), -1).mean(axis=1)
        return classes / np.linalg.norm(classes, axis=1, keepdims=True)

    def evaluate(self, params: Any, extra: Any, mesh: jax.sharding.Mesh) -> dict[str, float]:
        """Frozen-feature probes plus 'label/zero_shot' (top-1 of the zero-shot classifier on the test split)."""
        e = self.config.eval
        if self.config.input.dataset == 'csv' and not e.data_root:
            return {}  # no labelled images to evaluate on
        splits = frozen.extract_splits(self, params, extra, mesh, e)
        results = frozen.run_probes(splits['train'], splits['test'], e.label_keys, e.probes, e.knn_k, e.shots, seed=0)
        results['label/zero_shot'] = zero_shot_accuracy(
            splits['test']['embed'], splits['test']['label'], splits['test']['valid'],
            self.zero_shot_classifier(params, self.class_names()),
        )  # fmt: skip
        return results

    def flops_per_example(self) -> float:
        """Both towers' blocks, forward and backward (3x), per pair; embeddings and projections left out."""
        m = self.model
        grid = self.config.input.image_size // m.patch
        image = transformer_flops(1 + grid * grid, m.image_width, m.image_depth, 4 * m.image_width)
        text = transformer_flops(self.config.text.context_length, m.text_width, m.text_depth, 4 * m.text_width)
        return 3.0 * (image + text)


def zero_shot_accuracy(embeddings: np.ndarray, labels: np.ndarray, valid: np.ndarray, classifier: np.ndarray) -> float:
    """Top-1 accuracy of argmax over classes of embedding . classifier (the norm of an embedding cannot change its
    argmax), over the valid rows."""
    keep = np.asarray(valid) > 0
    predictions = np.argmax(np.asarray(embeddings, np.float64)[keep] @ classifier.T, axis=1)
    return float(np.mean(predictions == np.asarray(labels)[keep]))
