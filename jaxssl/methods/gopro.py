"""GOPro (Singha, Jha, Banerjee; "GOPro: Generate and Optimize Prompts in CLIP using Self-Supervised Learning", BMVC
2023; mainaksingha01/GOPro): few-shot prompt learning on a frozen CLIP with self-supervised consistency terms.

CLIP stays frozen (extra state); the prompt learner (jaxssl.models.gopro) learns M context vectors, shifted per image
by a style + content vector from the image tower's hidden states, so every image gets its own class prompts
"[SOT] ctx_1 .. ctx_M <class name> . [EOT]". Each training image comes as three views: the plain view (random resized
crop + flip), MoCo v3's strong view and an AugMix view. With T(x) (B, C, D) the normalised class-prompt embeddings
built from view x and f(x) the frozen, normalised image embedding:

    L = CE(exp(logit_scale) f(x) . T(x), y)                     (logit scale: the frozen CLIP's, 100 for OpenAI's)
      + MSE(T(x), T(x_moco)) + MSE(T(x), T(x_augmix))            (prompt consistency across views)
      + 0.1 NT-Xent_0.1(P f(x), P f(x_moco))                     (P = Linear + BatchNorm1d; SLIP's SimCLR loss)

The contrastive term trains only P: f is frozen and P feeds nothing else, so it cannot move the prompts (as in the
reference, where it is the same). Evaluation is the base-to-new protocol of CoOp / CoCoOp: the classes are split as
Dassl's subsample_classes (base: the first ceil(n / 2) labels, new: the rest), the prompts are learned on
`input.shots` images per base class, and top-1 accuracy is reported on the test images of the base and of the new
classes (each scored against its own class names) with their harmonic mean, next to frozen CLIP's zero-shot
accuracy with the hand-written prompt `model.ctx_init` + " <class>.".

Departures from the reference (docs/methods.md): each view is made from the decoded image and normalised with
OpenAI's statistics (the reference re-augments the normalised tensor for the MoCo and AugMix views, normalises the
MoCo view with ImageNet's, and its AugMix helper returns B views of the batch's first image); fp32 parameters and
bf16 compute by default (the reference computes in fp16 and keeps the context in fp16); BatchNorm statistics over the
global batch; both accuracies from the final prompts (the reference tests new classes with the epoch of best base
test accuracy).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from jaxssl import sharding
from jaxssl.config import ConfigError, check_choice
from jaxssl.data import augmix, captions, views
from jaxssl.data import images as image_data
from jaxssl.evaluate import features
from jaxssl.losses import contrastive
from jaxssl.methods import _image
from jaxssl.methods import clip as clip_method
from jaxssl.methods.videomae import DTYPES, transformer_flops
from jaxssl.models import clip as clip_model
from jaxssl.models import gopro as gopro_model

SUBSAMPLES = ('base', 'new', 'all')  # Dassl's DATASET.SUBSAMPLE_CLASSES
PROMPTS_PER_CALL = 8192  # evaluation: class prompts per text-tower call (images per call = this / classes)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, naming the key (files are read when the method is built)."""
    c, m, o = config.input, config.model, config.loss
    check_choice(config, 'input.subsample_classes', SUBSAMPLES)
    check_choice(config, 'model.dtype', DTYPES)
    if not m.clip:
        check_choice(config, 'model.variant', clip_model.VARIANTS)
    if c.num_sample != 1:
        raise ConfigError(f"bad value {c.num_sample} for 'input.num_sample': GOPro makes its own three views")
    if not isinstance(c.shots, int) or c.shots < 1:
        raise ConfigError(f"bad value {c.shots!r} for 'input.shots': an integer >= 1 (images per class)")
    if not m.ctx_init and (not isinstance(m.n_ctx, int) or m.n_ctx < 1):
        raise ConfigError(f"bad value {m.n_ctx!r} for 'model.n_ctx': an integer >= 1 when model.ctx_init is empty")
    for key in ('consistency_weight', 'contrastive_weight'):
        if o[key] < 0:
            raise ConfigError(f"bad value {o[key]} for 'loss.{key}': must be >= 0")
    if o.temperature <= 0:
        raise ConfigError(f"bad value {o.temperature} for 'loss.temperature': must be > 0")
    if config.train.grad_accum != 1:
        raise ConfigError(
            f"bad value {config.train.grad_accum} for 'train.grad_accum': the projector's BatchNorm and the "
            "contrastive term's negatives are the whole batch"
        )


def subsample_classes(num_classes: int, subsample: str) -> tuple[int, ...]:
    """Dassl's subsample_classes over labels 0..n-1: 'base' the first ceil(n / 2), 'new' the rest, 'all' every one."""
    middle = math.ceil(num_classes / 2)
    return {'base': tuple(range(middle)), 'new': tuple(range(middle, num_classes)), 'all': tuple(range(num_classes))}[
        subsample
    ]


class FewShotSource:
    """`shots` images of each class in `classes` drawn without replacement (every image of a class with fewer, as
    Dassl's generate_fewshot_dataset), seeded; 'label' is the class's position in `classes` (Dassl relabels a
    subsample). Reads every record's label once (no image is decoded)."""

    def __init__(self, source: Any, classes: tuple[int, ...], shots: int, seed: int):
        by_class: dict[int, list[int]] = {k: [] for k in classes}
        for i in range(len(source)):
            label = int(source[i]['label'])
            if label in by_class:
                by_class[label].append(i)
        rng = np.random.default_rng(seed)
        self._items = []
        for position, k in enumerate(classes):
            if not by_class[k]:
                raise ValueError(f'{source!r} has no image of class {k}')
            chosen = rng.choice(by_class[k], min(shots, len(by_class[k])), replace=False)
            self._items += [(int(i), position) for i in sorted(chosen)]
        self.source, self.classes, self.label_keys = source, tuple(classes), ('label',)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        source_index, label = self._items[index]
        return {**self.source[source_index], 'label': label}

    def __repr__(self) -> str:
        return f'FewShotSource({self.source!r}, classes {self.classes}, {len(self)} images)'


def gopro_views(
    image: np.ndarray, rng: np.random.Generator, *, size: int, scale: tuple[float, float], interpolation: str
) -> dict[str, np.ndarray]:
    """The three views of one image, each (size, size, 3) ImageNet-normalised: 'image' Dassl's training view
    (random resized crop with `interpolation`, flip), 'moco' MoCo v3's first view (crop scale (0.08, 1), jitter (0.4,
    0.4, 0.2, 0.1) p 0.8, grayscale p 0.2, blur p 1, flip), 'augmix' AugMix at severity 1 (jaxssl.data.augmix). The
    last two crop bilinearly, torchvision's default, which the reference's own RandomResizedCrops keep."""
    moco = views.CropGroup('moco', size, (0.08, 1.0), (1.0,), (0.0,))
    return {
        'image': image_data.pretrain_view(image, rng, size=size, scale=scale, interpolation=interpolation),
        'moco': views.multi_crop_views(image, rng, groups=(moco,), interpolation='bilinear')['moco'][0],
        'augmix': augmix.augmix_view(image, rng, size=size, scale=scale, interpolation='bilinear'),
    }


def frozen_clip(config: ml_collections.ConfigDict) -> tuple[clip_model.CLIP, captions.CaptionTokenizer, int, Any]:
    """GOPro's frozen CLIP: clip_method.frozen_clip of `model.clip`, sized by the config when it is ''."""
    m = config.model
    own = ml_collections.ConfigDict({
        'model': {'pretrained': '', 'variant': m.variant, 'activation': m.activation, 'dtype': m.dtype,
                  'attention_impl': m.attention_impl},
        'text': {'tokenizer': '', 'context_length': config.text.context_length},
        'input': {'image_size': config.input.image_size},
    })  # fmt: skip
    return clip_method.frozen_clip(m.clip, 'model.clip', own)


class Method(_image.ImageMethod):
    """GOPro prompt learning for the one trainer; extra state {'clip': the frozen CLIP's params}."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        image_data.check_image_input_config(config)  # paths are checked when a run starts, not at config load
        m = config.model
        self.clip, self.tokenizer, self.context_length, self._load_clip = frozen_clip(config)
        if self._load_clip is None:
            logging.warning('model.clip is empty: GOPro runs on a randomly initialised, frozen CLIP (tests only)')
        self.model = self.clip  # ImageMethod reads the patch size from self.model
        if m.ctx_init:
            ids = self.tokenizer([m.ctx_init], self.context_length)[0]
            eot = int(np.argmax(ids == self.tokenizer.eot_id))
            self.ctx_ids, self.prefix = ids[1:eot], m.ctx_init  # between start and end of text
        else:  # placeholder words whose embeddings the context replaces
            self.ctx_ids, self.prefix = None, ' '.join(['X'] * m.n_ctx)
        self.n_ctx = m.n_ctx if self.ctx_ids is None else len(self.ctx_ids)
        self.class_names = self._class_names()
        self.train_classes = subsample_classes(len(self.class_names), config.input.subsample_classes)
        self.head = gopro_model.PromptLearner(
            self.clip.image_depth, self.clip.image_width, self.clip.text_width, self.clip.embed_dim, self.n_ctx
        )
        self._renorm = clip_method.clip_renormalisation()

    def _class_names(self) -> list[str]:
        e, c = self.config.eval, self.config.input
        if e.class_names:
            return list(e.class_names)
        if c.dataset == 'mnist_digits':
            return list(captions.DIGIT_WORDS)
        names = getattr(image_data.make_image_source(self.config, c.split), 'class_names', None)
        if not names:
            raise ConfigError("'eval.class_names' is empty and the training images carry no class names")
        return [name.replace('_', ' ') for name in names]

    def prompt_tokens(self, classes: tuple[int, ...]) -> np.ndarray:
        """(C, L) ids of "<prefix> <class name>." per class; the context vectors replace the prefix's tokens."""
        return self.tokenizer([f'{self.prefix} {self.class_names[k]}.' for k in classes], self.context_length)

    # --- data -------------------------------------------------------------------------------------------------
    def train_source(self) -> FewShotSource:
        return FewShotSource(
            image_data.make_image_source(self.config), self.train_classes, self.config.input.shots, self.config.seed
        )

    def dataset(self, seed: int, process_index: int, process_count: int) -> tuple[Any, int]:
        c = self.config.input
        source = self.train_source()
        view = functools.partial(gopro_views, size=c.image_size, scale=tuple(c.crop_scale),
                                 interpolation=c.interpolation)  # fmt: skip
        dataset = image_data.make_image_pretrain_dataset(
            self.config, seed=seed, process_index=process_index, process_count=process_count, view=view, source=source
        )
        return dataset, len(source)

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        size = self.config.input.image_size
        image = np.zeros((batch_size, size, size, 3), np.float32)
        return {'image': image, 'moco': image, 'augmix': image, 'label': np.zeros((batch_size,), np.int32)}

    # --- model ------------------------------------------------------------------------------------------------
    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        clip_rng, head_rng = jax.random.split(rng)
        images, tokens = batch['image'][:1], jnp.asarray(self.prompt_tokens(self.train_classes[:1]))
        clip_init = lambda: self.clip.init(clip_rng, images, tokens)['params']
        if self._load_clip is None:
            clip = clip_init()
        else:  # a host callback: jit would embed the weights in the program as constants
            shapes = jax.eval_shape(clip_init)
            clip = jax.pure_callback(lambda: self._load_clip(shapes), shapes)
        m = self.clip
        grid = (self.config.input.image_size // m.patch) ** 2
        hidden = jnp.zeros((m.image_depth, 1, 1 + grid, m.image_width))
        params = self.head.init(head_rng, hidden, jnp.zeros((1, m.embed_dim)))['params']
        if self.ctx_ids is not None:  # the prompt's own word embeddings ("a photo of a")
            table = clip['text_model']['token_embedding']['embedding']
            params = {**params, 'ctx': table[jnp.asarray(self.ctx_ids)].astype(jnp.float32)}
        return params, {'clip': clip}

    def encode_images(self, clip: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Frozen CLIP: (normalised image embeddings (B, D), every block's hidden states (L, B, N, W))."""
        scale, shift = self._renorm
        embedded, state = self.clip.apply(
            {'params': clip}, images * jnp.asarray(scale) + jnp.asarray(shift),
            method=self.clip.encode_image, mutable=['intermediates'],
        )  # fmt: skip
        hidden = jnp.stack(state['intermediates']['vision_model']['hidden_states'])
        return jax.lax.stop_gradient(contrastive.l2_normalize(embedded)), jax.lax.stop_gradient(hidden)

    def class_text(self, clip: Any, context: jax.Array, tokens: jax.Array) -> jax.Array:
        """Per-image class prompts through the frozen text tower: context (B, M, T), tokens (C, L) -> normalised
        (B, C, D). Prompt = [the start token's embedding, the image's context vectors, the rest of the tokens']."""
        b, c = context.shape[0], tokens.shape[0]
        embedded = clip['text_model']['token_embedding']['embedding'][tokens]  # (C, L, T)
        full = lambda x: jnp.broadcast_to(x[None], (b, *x.shape))
        prompts = jnp.concatenate([
            full(embedded[:, :1]),
            jnp.broadcast_to(context[:, None], (b, c, *context.shape[1:])).astype(embedded.dtype),
            full(embedded[:, 1 + self.n_ctx :]),
        ], axis=2)  # fmt: skip
        text = self.clip.apply(
            {'params': clip}, jnp.tile(tokens, (b, 1)), prompts.reshape(b * c, *prompts.shape[2:]),
            method=self.clip.encode_text,
        )  # fmt: skip
        return contrastive.l2_normalize(text).reshape(b, c, -1)

    def loss(self, params, extra, batch, rng, step):
        chex.assert_rank([batch['image'], batch['label']], [4, 1])
        clip, b = extra['clip'], batch['label'].shape[0]
        o = self.config.loss
        embedded, hidden = self.encode_images(clip, jnp.concatenate([batch[k] for k in ('image', 'moco', 'augmix')]))
        context = self.head.apply({'params': params}, hidden, method=self.head.context)
        text = self.class_text(clip, context, jnp.asarray(self.prompt_tokens(self.train_classes)))
        plain, moco, mixed = text[:b], text[b : 2 * b], text[2 * b :]
        logits = jnp.exp(clip['logit_scale']) * jnp.einsum('bd,bcd->bc', embedded[:b], plain)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
        consistency = jnp.mean(jnp.square(plain - moco)) + jnp.mean(jnp.square(plain - mixed))
        project = lambda x: self.head.apply({'params': params}, x, method=self.head.project)
        # The reference projects the two views in separate calls: separate BatchNorm statistics.
        con, metrics = contrastive.global_nt_xent(
            project(embedded[:b]), project(embedded[b : 2 * b]), o.temperature, self.mesh, sharding.BATCH_AXES
        )
        loss = ce + o.consistency_weight * consistency + o.contrastive_weight * con
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch['label'])
        metrics = {'loss': loss, 'ce': ce, 'consistency': consistency, 'contrastive': con, 'train_acc': accuracy,
                   **metrics}  # fmt: skip
        return loss, (metrics, extra)

    def represent(self, params, extra, batch):
        """The frozen CLIP's normalised image embedding and the image's prompt shift (evaluation reads both)."""
        embedded, hidden = self.encode_images(extra['clip'], batch['image'])
        return {'embed': embedded, 'shift': self.head.apply({'params': params}, hidden, method=self.head.shift)}

    # --- evaluation -------------------------------------------------------------------------------------------
    def eval_sets(self) -> dict[str, tuple[int, ...]]:
        """The class sets scored: base and new after base-to-new training, else the trained classes."""
        n = len(self.class_names)
        if self.config.input.subsample_classes == 'base':
            return {'base': subsample_classes(n, 'base'), 'new': subsample_classes(n, 'new')}
        return {self.config.input.subsample_classes: self.train_classes}

    @functools.cached_property
    def _score(self) -> Any:
        """Jitted (params, clip, embeddings, shifts, tokens) -> per-image class scores, replicated on every device."""

        def score(params, clip, embedded, shift, tokens):
            text = self.class_text(clip, params['ctx'][None] + shift[:, None], tokens)
            return jnp.einsum('bd,bcd->bc', embedded, text)

        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        return jax.jit(score, out_shardings=replicated)

    @functools.cached_property
    def _zero_shot_text(self) -> Any:
        encode = lambda clip, tokens: contrastive.l2_normalize(
            self.clip.apply({'params': clip}, tokens, method=self.clip.encode_text)
        )
        return jax.jit(encode)

    def evaluate(self, params: Any, extra: Any, mesh: jax.sharding.Mesh) -> dict[str, float]:
        """'gopro/<set>' top-1 accuracy of the learned prompts and 'zero_shot/<set>' of frozen CLIP with the
        hand-written prompt, per class set (base / new, with their harmonic means 'gopro/hm', 'zero_shot/hm')."""
        e = self.config.eval
        source = image_data.make_image_source(self.config, e.split)
        results = {}
        for name, classes in self.eval_sets().items():
            subset = image_data.ClassSubset(source, classes)
            dataset, _ = image_data.make_image_eval_dataset(
                self.config, split=e.split, batch_size=e.batch_size, process_index=jax.process_index(),
                process_count=jax.process_count(), max_examples=e.max_test_clips, source=subset,
            )  # fmt: skip
            out = features.extract(self, params, extra, dataset, mesh)
            keep = out['valid'] > 0
            labels = np.searchsorted(np.asarray(classes), out['label'][keep])
            embedded, shift = out['embed'][keep], out['shift'][keep]
            tokens = jnp.asarray(self.prompt_tokens(classes))
            # Images x classes prompts go through the text tower per call: keep it near PROMPTS_PER_CALL.
            chunk = max(1, min(e.batch_size, PROMPTS_PER_CALL // len(classes)))
            scores = [
                np.asarray(self._score(params, extra['clip'], embedded[i : i + chunk], shift[i : i + chunk], tokens))
                for i in range(0, len(embedded), chunk)
            ]
            results[f'gopro/{name}'] = float(np.mean(np.argmax(np.concatenate(scores), 1) == labels))
            if self.ctx_ids is not None:  # placeholder words make no zero-shot prompt
                classifier = np.asarray(self._zero_shot_text(extra['clip'], tokens))
                results[f'zero_shot/{name}'] = float(np.mean(np.argmax(embedded @ classifier.T, 1) == labels))
        if 'new' in self.eval_sets():
            for kind in ('gopro', 'zero_shot') if self.ctx_ids is not None else ('gopro',):
                base, new = results[f'{kind}/base'], results[f'{kind}/new']
                results[f'{kind}/hm'] = 2 * base * new / max(base + new, 1e-12)
        return results

    def flops_per_example(self) -> float:
        """Three views through the frozen image tower (forward only) and C prompts each through the text tower
        (forward and backward, 3x) per image; embeddings, projections and the prompt learner left out."""
        m = self.clip
        grid = self.config.input.image_size // m.patch
        image = transformer_flops(1 + grid * grid, m.image_width, m.image_depth, 4 * m.image_width)
        text = transformer_flops(self.context_length, m.text_width, m.text_depth, 4 * m.text_width)
        return 3.0 * image + 3.0 * 3.0 * len(self.train_classes) * text
