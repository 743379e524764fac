"""KRR-ST (Lee, Lee, Ko, Kawaguchi, Lee, Hwang, "Self-Supervised Dataset Distillation for Transfer Learning",
ICLR 2024): distil a large unlabelled image set into m learnable images X_s and target representations Y_s.

Reference: db-Lee/selfsup_dd (train.py, algorithms/distill.py, model_pool.py, models/convnet.py,
algorithms/pretrain_krr_st.py, algorithms/linear_eval.py), shared/reference/methods/
tools_simcore_ctreduction_ssdd_ped_dkvb_advencoder_rkhs.md section 3. One outer step:
1. A pool model phi (one of l ConvNets, BatchNorm in evaluation mode) embeds X_s and an augmented real batch X_r
   (RandomCrop(padding 4), flip, normalised); a frozen SSL teacher g gives the real targets Y_r = g(X_r).
2. F = [embedding, 1]; K_ss = F_s F_s^T, K_rs = F_r F_s^T (no gradient through F_r); lambda = 1e-6 tr(K_ss),
   detached; the kernel ridge regression head predicts K_rs (K_ss + lambda I)^-1 Y_s.
3. Loss: the element-mean squared error to Y_r, minimised over X_s and Y_s (AdamW, weight decay 0, lr decaying
   linearly to 1e-3 of its peak). The paper's reason: with augmentations or masks in the inner objective, the
   bilevel gradient is biased, so the inner problem is a deterministic regression onto learnable targets.
4. Then phi takes one SGD step (lr 0.1, momentum 0.9, weight decay 1e-3, BatchNorm in training mode) on
   MSE(phi(X_s), Y_s) through its whole network, fc head included; a model that has taken `pool_steps` (1,000)
   updates is re-initialised instead. At the start every pool model has taken U{1, ..., pool_steps - 1} updates.
X_s starts as m random training images and Y_s as the teacher's representations of them.

Where jaxssl differs, each deliberate:
- X_s lives in the networks' input space (normalised). The reference stores raw [0, 1] pixels and feeds them to
  the pool and the evaluation models unnormalised, while real images arrive normalised.
- A re-initialised pool model's update counter restarts. The reference never resets it, so after its first reset a
  pool model is re-initialised at every visit and stays at random initialisation.
- The pool model of a step is drawn from the step index (one draw per step, whatever the gradient accumulation).
- The teacher is any jaxssl image run (`distill.teacher`: its workdir, `represent` output
  `distill.teacher_representation`), not only a Barlow Twins ResNet.

Evaluation (the reference's meta-test): a fresh ConvNet pretrained on (X_s, Y_s) by MSE (SGD lr 0.1, momentum 0.9,
weight decay 1e-3, batch 256, `eval.pretrain_epochs` epochs), then linear and kNN probes of its flattened features
on the real evaluation split; with `eval.baselines` also the initial set (m random images with their teacher
targets: the paper's 'random' baseline) and a random-init ConvNet, side by side.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxssl.config import ConfigError, check_choice
from jaxssl.data import images as image_data
from jaxssl.data import pipeline
from jaxssl.data.decode import DecodeError
from jaxssl.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from jaxssl.methods import _frozen_run, _image, base
from jaxssl.models.convnet import NORMS, ConvNet


def check_config(config: ml_collections.ConfigDict) -> None:
    check_choice(config, 'model.norm', NORMS)
    channels = tuple(config.model.channels)
    if not channels or any(not isinstance(w, int) or w < 1 for w in channels):
        raise ConfigError(f"bad value {channels} for 'model.channels': one positive width per conv block")
    if config.input.image_size % 2 ** len(channels):
        raise ConfigError(
            f"'input.image_size' {config.input.image_size} must be divisible by 2^{len(channels)} (one 2x2 pooling "
            "per block of 'model.channels')"
        )
    d = config.distill
    for key, low in (('num_images', 1), ('pool_size', 1), ('pool_steps', 2), ('crop_padding', 0)):
        if not isinstance(d[key], int) or d[key] < low:
            raise ConfigError(f"bad value {d[key]!r} for 'distill.{key}': must be an integer >= {low}")
    if not d.ridge > 0:
        raise ConfigError(f"bad value {d.ridge} for 'distill.ridge': must be > 0")
    e = config.eval
    for key in ('pretrain_epochs', 'pretrain_batch'):
        if e[key] < 1:
            raise ConfigError(f"bad value {e[key]} for 'eval.{key}': must be >= 1")
    if d.teacher:
        _frozen_run.run_config(d.teacher, 'distill.teacher', config.input.image_size)


def crop_view(image: np.ndarray, rng: np.random.Generator, *, size: int, padding: int, flip: bool) -> np.ndarray:
    """A real image as the reference's loader and augmentation see it: resized to (size, size) (its tensors are
    pre-resized), normalised, then kornia's RandomCrop(size, padding) (zero pixels, i.e. black before the
    normalisation) and a horizontal flip with p 0.5. uint8 (H, W, 3) -> float32 (size, size, 3)."""
    view = image_data.eval_view(image, size=size, crop_pct=1.0)
    if padding:
        black = ((0.0 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)).astype(np.float32)
        padded = np.empty((size + 2 * padding, size + 2 * padding, 3), np.float32)
        padded[:] = black
        padded[padding : padding + size, padding : padding + size] = view
        top, left = rng.integers(0, 2 * padding + 1, size=2)
        view = padded[top : top + size, left : left + size]
    if flip and rng.random() < 0.5:
        view = view[:, ::-1]
    return np.ascontiguousarray(view)


def kernel_ridge_loss(
    syn_features: jax.Array, real_features: jax.Array, syn_targets: jax.Array, real_targets: jax.Array, ridge: float
) -> jax.Array:
    """The outer loss of distill.py: features get a constant 1 column; lambda = ridge x tr(K_ss) (detached);
    mean((K_rs (K_ss + lambda I)^-1 Y_s - Y_r)^2). Gradients reach syn_features and syn_targets only."""
    ones = lambda f: jnp.concatenate([f, jnp.ones((f.shape[0], 1), f.dtype)], axis=1)
    fs, fr = ones(syn_features), jax.lax.stop_gradient(ones(real_features))
    # The solve is ill-conditioned (lambda is 1e-6 of the trace): full float32 matmuls, also inside the LU solve,
    # where TPUs would otherwise use bfloat16 passes.
    with jax.default_matmul_precision('float32'):
        k_ss, k_rs = fs @ fs.T, fr @ fs.T
        lam = jax.lax.stop_gradient(ridge * jnp.trace(k_ss))
        weights = jnp.linalg.solve(k_ss + lam * jnp.eye(k_ss.shape[0], dtype=k_ss.dtype), syn_targets)
        prediction = k_rs @ weights
    return jnp.mean(jnp.square(prediction - jax.lax.stop_gradient(real_targets)))


def load_set(workdir: str) -> tuple[np.ndarray, np.ndarray]:
    """(X_s (m, S, S, 3) ImageNet-normalised, Y_s (m, d)) of a KRR-ST run's latest checkpoint: the distilled set,
    to pretrain any network on by regression."""
    from jaxssl import params_io

    shapes, _ = params_io.stored_shapes(workdir)
    if set(shapes) != {'images', 'targets'}:
        raise ValueError(f'{workdir} does not hold a KRR-ST set: its params are {sorted(shapes)}')
    target = {name: jax.ShapeDtypeStruct(shape, jnp.float32) for name, shape in shapes.items()}
    loaded, _, _ = params_io.load_selected(workdir, target)
    return np.asarray(loaded['images']), np.asarray(loaded['targets'])


class _ConvNetFeatures:
    """The frozen-feature evaluators' view of a ConvNet (its variables passed as `params`, the teacher's state as
    `extra`): its flattened embedding of the method's evaluation images (BatchNorm in evaluation mode), and its
    head's prediction of the teacher's representation beside the teacher's own."""

    input_key = 'image'
    represent_keys = ()

    def __init__(self, method: Method):
        self.method = method

    def represent(self, variables, teacher, batch):
        embedding, prediction = self.method.net.apply(variables, batch['image'])
        return {'embedding': embedding, 'prediction': prediction,
                'teacher': self.method.teacher_features(teacher, batch['image'])}  # fmt: skip

    def eval_dataset(self, *args, **kwargs):
        return self.method.eval_dataset(*args, **kwargs)


def teacher_r2(test: dict[str, np.ndarray]) -> float:
    """1 - SSE / SST of the pretrained network's predictions of the teacher's representations (all dimensions)."""
    keep = test['valid'] > 0
    prediction, target = test['prediction'][keep], test['teacher'][keep]
    return float(1 - np.sum((prediction - target) ** 2) / np.sum((target - target.mean(0)) ** 2))


class Method(_image.ImageMethod):
    """KRR-ST for the trainer: params {'images': X_s (m, S, S, 3), 'targets': Y_s (m, d)}; extra state
    {'teacher': the frozen teacher's state, 'pool': {'variables', 'momentum', 'steps'} of the l pool ConvNets}."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        c = config
        if c.distill.teacher:
            self.teacher = _frozen_run.FrozenImageRun(
                c.distill.teacher, 'distill.teacher', c.input.image_size, c.distill.teacher_representation,
                'distill.teacher_representation',
            )  # fmt: skip
            self.target_dim = self.teacher.dim
        else:  # a frozen random ConvNet's embedding (tests; the fact sheet's CPU demo)
            if c.distill.teacher_representation not in ('', 'embedding'):
                raise ConfigError(
                    f"bad value '{c.distill.teacher_representation}' for 'distill.teacher_representation': the "
                    "random teacher's only representation is 'embedding'"
                )
            self.teacher = ConvNet(tuple(c.model.channels), norm='none')
            size = c.input.image_size // 2 ** len(c.model.channels)
            self.target_dim = size * size * c.model.channels[-1]
        self.net = ConvNet(tuple(c.model.channels), outputs=self.target_dim, norm=c.model.norm)
        self.model = self.net  # ImageMethod reads .model (no patch: no tokens per example)

    # --- data ----------------------------------------------------------------------------------------------------
    def dataset(self, seed, process_index, process_count):
        c = self.config.input
        view = functools.partial(crop_view, size=c.image_size, padding=self.config.distill.crop_padding, flip=c.hflip)
        return self.view_dataset(seed, process_index, process_count, view)

    def initial_images(self) -> np.ndarray:
        """m training images drawn without replacement by `seed` (the reference's first m of a shuffled loader),
        resized and normalised: X_s's initial value. Unreadable files are skipped and counted."""
        m, size = self.config.distill.num_images, self.config.input.image_size
        source = image_data.make_image_source(self.config)
        chosen = []
        for index in np.random.default_rng(self.config.seed).permutation(len(source)):
            record = source[int(index)]
            try:
                chosen.append(image_data.eval_view(image_data.decode_image(record), size=size, crop_pct=1.0))
            except DecodeError as e:
                pipeline._log_failure(record['name'], e)
                pipeline._add_skipped(1)
            if len(chosen) == m:
                return np.stack(chosen).astype(np.float32)
        raise ConfigError(f"'distill.num_images' {m}: the training split has only {len(chosen)} readable images")

    # --- teacher -------------------------------------------------------------------------------------------------
    def teacher_state(self, rng: jax.Array) -> Any:
        if isinstance(self.teacher, ConvNet):
            return self.teacher.init(rng, jnp.zeros((1, *self.example_batch(1)['image'].shape[1:]), jnp.float32))
        return self.teacher.state()

    def teacher_features(self, state: Any, images: jax.Array) -> jax.Array:
        if isinstance(self.teacher, ConvNet):
            features, _ = self.teacher.apply(state, images)
        else:
            features = self.teacher.features(state, images)
        return jax.lax.stop_gradient(features.astype(jnp.float32))

    # --- the model pool ------------------------------------------------------------------------------------------
    def fresh_model(self, rng: jax.Array) -> dict[str, Any]:
        shape = self.example_batch(1)['image'].shape[1:]
        variables = dict(self.net.init(rng, jnp.zeros((1, *shape), jnp.float32)))
        return {'variables': variables, 'momentum': jax.tree.map(jnp.zeros_like, variables['params'])}

    def sgd_step(self, model: dict[str, Any], images: jax.Array, targets: jax.Array, lr: float, momentum: float,
                 weight_decay: float) -> dict[str, Any]:  # fmt: skip
        """One torch SGD step (b = m b + g + wd w; w -= lr b) of MSE(net(images), targets), BatchNorm training."""
        variables = model['variables']

        def mse(params):
            (_, outputs), state = self.net.apply({**variables, 'params': params}, images, train=True,
                                                 mutable=['batch_stats'])  # fmt: skip
            return jnp.mean(jnp.square(outputs - targets)), state

        grads, state = jax.grad(mse, has_aux=True)(variables['params'])
        buffer = jax.tree.map(lambda b, g, w: momentum * b + g + weight_decay * w, model['momentum'], grads,
                              variables['params'])  # fmt: skip
        params = jax.tree.map(lambda w, b: w - lr * b, variables['params'], buffer)
        return {'variables': {**variables, **state, 'params': params}, 'momentum': buffer}

    def pool_step(self, model: dict[str, Any], images: jax.Array, targets: jax.Array) -> dict[str, Any]:
        d = self.config.distill
        return self.sgd_step(model, images, targets, d.pool_lr, d.pool_momentum, d.pool_weight_decay)

    def fresh_pool(self, rng: jax.Array) -> dict[str, Any]:
        """l fresh models (stacked), none of them trained yet."""
        models = jax.vmap(self.fresh_model)(jax.random.split(rng, self.config.distill.pool_size))
        return {**models, 'steps': jnp.zeros((self.config.distill.pool_size,), jnp.int32)}

    def warm_up_pool(self, pool: dict[str, Any], images: jax.Array, targets: jax.Array) -> dict[str, Any]:
        """ModelPool.init: pool model i trained U{1, ..., pool_steps - 1} SGD steps on the initial set, one jitted
        step at a time (see base.Method.prepare)."""
        d = self.config.distill
        key = base.stream(jax.random.key(self.config.seed), 'pool_warm_up')
        counts = np.asarray(jax.random.randint(key, (d.pool_size,), 1, d.pool_steps, jnp.int32))
        step = jax.jit(self.pool_step)
        models = []
        for i, count in enumerate(counts):
            model = jax.tree.map(lambda x, i=i: x[i], {'variables': pool['variables'], 'momentum': pool['momentum']})
            for _ in range(count):
                model = step(model, images, targets)
            models.append(model)
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *models)
        return {**stacked, 'steps': jnp.asarray(counts)}

    def pool_index(self, step: jax.Array) -> jax.Array:
        """The pool model of outer step `step` (np.random.randint(num_models) in distill.py)."""
        key = jax.random.fold_in(base.stream(jax.random.key(self.config.seed), 'pool'), step)
        return jax.random.randint(key, (), 0, self.config.distill.pool_size)

    # --- training ------------------------------------------------------------------------------------------------
    def init(self, rng, batch):
        m, size = self.config.distill.num_images, self.config.input.image_size
        teacher_key, pool_key = jax.random.split(base.stream(rng, 'krr_st'))
        # A host callback, so the real images are read once at initialisation and not embedded in the program.
        images = jax.pure_callback(self.initial_images, jax.ShapeDtypeStruct((m, size, size, 3), jnp.float32))
        teacher = self.teacher_state(teacher_key)
        targets = self.teacher_features(teacher, images)
        return {'images': images, 'targets': targets}, {'teacher': teacher, 'pool': self.fresh_pool(pool_key)}

    def prepare(self, params, extra):
        return {**extra, 'pool': self.warm_up_pool(extra['pool'], params['images'], params['targets'])}

    def loss(self, params, extra, batch, rng, step):
        pool = extra['pool']
        index = self.pool_index(step)
        variables = jax.tree.map(lambda x: x[index], pool['variables'])
        real = batch['image']
        syn_features, _ = self.net.apply(variables, params['images'])
        real_features, _ = self.net.apply(variables, real)
        real_targets = self.teacher_features(extra['teacher'], real)
        loss = kernel_ridge_loss(syn_features, real_features, params['targets'], real_targets,
                                 self.config.distill.ridge)  # fmt: skip
        metrics = {'loss': loss, 'pool_model_steps': pool['steps'][index].astype(jnp.float32)}
        return loss, (metrics, extra)

    def update_extra(self, params, extra, step):
        """ModelPool.update on the step's model with the updated set: one SGD step, or a fresh model once it has
        taken pool_steps updates."""
        pool, index = extra['pool'], self.pool_index(step)
        images, targets = jax.lax.stop_gradient((params['images'], params['targets']))
        model = jax.tree.map(lambda x: x[index], {'variables': pool['variables'], 'momentum': pool['momentum']})
        reset = pool['steps'][index] >= self.config.distill.pool_steps
        fresh_key = jax.random.fold_in(base.stream(jax.random.key(self.config.seed), 'pool_reset'), step)
        # A select, not lax.cond: XLA:CPU runs convolutions' gradients inside conditionals as slowly as in loops.
        model = jax.tree.map(
            lambda fresh, trained: jnp.where(reset, fresh, trained),
            self.fresh_model(fresh_key),
            self.pool_step(model, images, targets),
        )
        models = jax.tree.map(lambda all_, one: all_.at[index].set(one),
                              {'variables': pool['variables'], 'momentum': pool['momentum']}, model)  # fmt: skip
        steps = pool['steps'].at[index].set(jnp.where(reset, 0, pool['steps'][index] + 1))
        return {**extra, 'pool': {**models, 'steps': steps}}

    # --- evaluation ----------------------------------------------------------------------------------------------
    def pretrain(self, images: np.ndarray, targets: np.ndarray, seed: int) -> dict[str, Any]:
        """pretrain_krr_st.py: a fresh ConvNet trained on (images, targets) by MSE for eval.pretrain_epochs epochs
        of shuffled batches of eval.pretrain_batch (the last one smaller), SGD at a constant lr, one jitted step
        at a time (see base.Method.prepare). Returns its variables."""
        e, m = self.config.eval, len(images)
        rng = np.random.default_rng(seed)
        model = self.fresh_model(jax.random.key(seed))
        for _ in range(e.pretrain_epochs):
            order = rng.permutation(m)
            for start in range(0, m, e.pretrain_batch):
                rows = order[start : start + e.pretrain_batch]
                model = self._pretrain_step(model, images[rows], targets[rows])
        return model['variables']

    @functools.partial(jax.jit, static_argnums=0)
    def _pretrain_step(self, model: dict[str, Any], images: jax.Array, targets: jax.Array) -> dict[str, Any]:
        e = self.config.eval
        return self.sgd_step(model, images, targets, e.pretrain_lr, e.pretrain_momentum, e.pretrain_weight_decay)

    def evaluate(self, params, extra, mesh):
        """'<set>/label/embedding/<probe>' accuracies and '<set>/teacher_r2' (how well the network pretrained on the
        set predicts the teacher on the evaluation images) for the distilled set and, with eval.baselines, the
        initial random subset and the untrained network (the starting point of both pretrainings)."""
        from jaxssl.evaluate import frozen

        e, seed = self.config.eval, self.config.seed
        features = _ConvNetFeatures(self)
        networks = {'distilled': (params['images'], params['targets'])}
        if e.baselines:
            initial = jnp.asarray(self.initial_images())
            networks['random_subset'] = (initial, jax.jit(self.teacher_features)(extra['teacher'], initial))
        networks = {name: self.pretrain(np.asarray(jax.device_get(images)), np.asarray(jax.device_get(targets)), seed)
                    for name, (images, targets) in networks.items()}  # fmt: skip
        if e.baselines:
            networks['random_init'] = self.fresh_model(jax.random.key(seed))['variables']
        results = {}
        for name, variables in networks.items():
            splits = frozen.extract_splits(features, variables, extra['teacher'], mesh, e)
            train, test = ({k: v for k, v in split.items() if k not in ('prediction', 'teacher')}
                           for split in (splits['train'], splits['test']))  # fmt: skip
            probes = frozen.run_probes(train, test, e.label_keys, e.probes, e.knn_k, e.shots, seed=0)
            results.update({f'{name}/{key}': value for key, value in probes.items()})
            results[f'{name}/teacher_r2'] = teacher_r2(splits['test'])
        return results

    def visualize(self, params, extra):
        """The first 16 distilled images (4 x 4), un-normalised to uint8."""
        images = np.asarray(jax.device_get(params['images'][:16]))
        pixels = images * np.asarray(IMAGENET_STD) + np.asarray(IMAGENET_MEAN)
        pixels = np.clip(np.round(pixels * 255), 0, 255).astype(np.uint8)
        n, size = len(pixels), pixels.shape[1]
        cols = min(n, 4)
        rows = -(-n // cols)
        grid = np.zeros((rows * size, cols * size, 3), np.uint8)
        for i, image in enumerate(pixels):
            r, c = divmod(i, cols)
            grid[r * size : (r + 1) * size, c * size : (c + 1) * size] = image
        return {'distilled_images': grid}
