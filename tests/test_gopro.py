"""GOPro: the prompt learner's shift against a torch transcription of the reference's projectors, prompt assembly
against the hand-written prompt, SLIP's SimCLR loss against NT-Xent, which parameters each loss term moves, Dassl's
schedule and class split, the few-shot source, AugMix's mixing, config errors, and a 2-step runlocal run from a
CLIP training workdir on one and on 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from sharded_runs import run

from jaxssl import optim, train
from jaxssl.config import ConfigError, load_config
from jaxssl.data import augmix
from jaxssl.data import images as image_data
from jaxssl.data.transforms import normalize
from jaxssl.losses import contrastive
from jaxssl.methods import gopro
from jaxssl.models import gopro as gopro_model

CONFIG = 'configs/gopro.py:runlocal'
SMALL = ('model.variant=micro', 'input.global_batch=8', 'input.shots=4')


@pytest.fixture(scope='module')
def method():
    """A runlocal GOPro on a random micro CLIP, with its initial (params, extra)."""
    m = gopro.Method(load_config(CONFIG, list(SMALL)))
    params, extra = jax.jit(m.init)(jax.random.key(0), m.example_batch(8))
    return m, params, extra


def test_prompt_shift_matches_a_transcription_of_the_reference():
    """style_projector / content_projector / frg / rho of trainers/gopro.py, transcribed in torch with the same
    weights: AdaIN mean and std over tokens, AdaptiveAvgPool2d over (mu, sigma) and over (style, content)."""
    layers, b, n, w, t = 3, 2, 5, 8, 6
    head = gopro_model.PromptLearner(layers, w, t, 4, 2)
    hidden = np.random.default_rng(0).normal(size=(layers, b, n, w)).astype(np.float32)
    params = head.init(jax.random.key(1), jnp.asarray(hidden), jnp.zeros((b, 4)))['params']
    got = head.apply({'params': params}, jnp.asarray(hidden), method=head.shift)

    linear = lambda p: lambda x: x @ torch.tensor(np.asarray(p['kernel'])) + torch.tensor(np.asarray(p['bias']))
    data = torch.tensor(hidden)
    pool = torch.nn.AdaptiveAvgPool2d((1, w))
    style, content = [], []
    for i in range(layers):
        x = data[i]  # (B, N, W)
        mu = torch.sum(x, 1) / x.shape[1]
        sigma = torch.sqrt((torch.sum((x.permute(1, 0, 2) - mu).permute(1, 0, 2) ** 2, 1) + 0.000000023) / x.shape[1])
        cat = pool(torch.cat((mu.unsqueeze(1), sigma.unsqueeze(1)), 1)).squeeze(1)
        style.append(linear(params[f'style_{i}'])(cat))
        content.append(linear(params[f'content_{i}'])(pool(x).squeeze(1)))
    mixed = torch.cat((torch.stack(style, 1).unsqueeze(2), torch.stack(content, 1).unsqueeze(2)), 2)
    frg = torch.nn.AdaptiveAvgPool2d((1, t))(mixed).squeeze(2).permute(0, 2, 1)  # (B, T, L)
    want = linear(params['rho'])(frg).permute(0, 2, 1).squeeze(1)
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-5)


def test_unshifted_context_gives_the_handwritten_prompt(method):
    """The initial context is the embedding of "a photo of a": with no shift, the assembled prompts equal the text
    tower on the tokens of "a photo of a <class>."."""
    m, params, extra = method
    assert m.n_ctx == 4
    classes = (0, 3, 7)
    tokens = jnp.asarray(m.prompt_tokens(classes))
    text = m.class_text(extra['clip'], jnp.broadcast_to(params['ctx'], (2, *params['ctx'].shape)), tokens)
    want = contrastive.l2_normalize(m.clip.apply({'params': extra['clip']}, tokens, method=m.clip.encode_text))
    np.testing.assert_allclose(np.asarray(text), np.broadcast_to(np.asarray(want), text.shape), atol=1e-5)
    np.testing.assert_array_equal(tokens[1], m.tokenizer(['a photo of a three.'], m.context_length)[0])


def test_slip_simclr_loss_equals_nt_xent():
    """GOPro's SIMCLRLoss (SLIP's): CE over [a.b / tau, a.a / tau - 1e9 I] from both sides, averaged."""
    rng = np.random.default_rng(0)
    z1, z2 = rng.normal(size=(6, 5)).astype(np.float32), rng.normal(size=(6, 5)).astype(np.float32)
    a, b = (torch.nn.functional.normalize(torch.tensor(z), dim=-1) for z in (z1, z2))
    labels, masks = torch.arange(6), torch.eye(6) * 1e9
    loss_a = torch.nn.functional.cross_entropy(torch.cat([a @ b.T / 0.1, a @ a.T / 0.1 - masks], 1), labels)
    loss_b = torch.nn.functional.cross_entropy(torch.cat([b @ a.T / 0.1, b @ b.T / 0.1 - masks], 1), labels)
    got, _ = contrastive.nt_xent(jnp.asarray(z1), jnp.asarray(z2), 0.1)
    np.testing.assert_allclose(float(got), float((loss_a + loss_b) / 2), rtol=1e-5)


def test_loss_terms_move_the_parts_they_should(method):
    """Only the prompt learner and the projector are parameters (CLIP is extra state); the classification and
    consistency terms reach the context, the contrastive term only the projector (its input is frozen)."""
    m, params, extra = method
    rng = np.random.default_rng(0)
    batch = {k: jnp.asarray(rng.normal(size=(8, 32, 32, 3)), jnp.float32) for k in ('image', 'moco', 'augmix')}
    batch['label'] = jnp.asarray(rng.integers(0, 5, 8), jnp.int32)
    assert set(extra) == {'clip'} and 'ctx' in params and 'text_model' not in params

    def grads(consistency, contrastive_weight):
        m.config.unlock()
        m.config.loss.consistency_weight, m.config.loss.contrastive_weight = consistency, contrastive_weight
        # Jitted (a fresh function per weight setting, traced with it): op-by-op gradients take ~16 s each.
        g = jax.jit(jax.grad(lambda p: m.loss(p, extra, batch, jax.random.key(0), 0)[0]))(params)
        return {k: float(optim.global_norm(v)) for k, v in g.items()}

    full, only_contrastive = grads(1.0, 0.1), grads(0.0, 1.0)
    assert full['ctx'] > 0 and full['rho'] > 0 and full['sim_dense'] > 0
    moved = {k for k, v in only_contrastive.items() if v > 0}
    # The CE term is still there (weight 1): subtract it by comparing with a run without the contrastive term.
    without = grads(0.0, 0.0)
    assert {k for k in moved if abs(only_contrastive[k] - without[k]) > 1e-7} == {
        'sim_dense', 'sim_bn_scale', 'sim_bn_bias'
    }  # fmt: skip
    assert without['sim_dense'] == 0.0


def test_epoch_cosine_equals_dassls_constant_warmup_cosine():
    """A transcription of Dassl's ConstantWarmupScheduler around torch's CosineAnnealingLR, stepped per epoch."""
    epochs, per_epoch, warmup, cons_lr, lr = 6, 3, 2, 1e-5, 0.002
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    successor = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    last_epoch, want = 0, []
    for _ in range(epochs):
        current = cons_lr if last_epoch < warmup else successor.get_last_lr()[0]
        want += [current] * per_epoch
        if last_epoch >= warmup:
            opt.step()  # (no gradients: nothing moves) keeps torch from warning about the call order
            successor.step()
        else:
            last_epoch += 1
    schedule = optim.epoch_cosine_schedule(lr, epochs, per_epoch, warmup, cons_lr)
    np.testing.assert_allclose([float(schedule(s)) for s in range(epochs * per_epoch)], want, rtol=1e-6)


def test_class_split_and_few_shot_source():
    assert gopro.subsample_classes(10, 'base') == (0, 1, 2, 3, 4)
    assert gopro.subsample_classes(5, 'base') == (0, 1, 2) and gopro.subsample_classes(5, 'new') == (3, 4)
    digits = image_data.DigitsSource('train')
    source = gopro.FewShotSource(digits, (5, 6, 7), shots=4, seed=1)
    records = [source[i] for i in range(len(source))]
    assert len(source) == 12 and [r['label'] for r in records] == [0] * 4 + [1] * 4 + [2] * 4
    picked = [int(r['name'].split('[')[1][:-1]) for r in records]
    assert [int(digits[i]['label']) for i in picked] == [5] * 4 + [6] * 4 + [7] * 4 and len(set(picked)) == 12
    again = gopro.FewShotSource(digits, (5, 6, 7), shots=4, seed=1)
    other = gopro.FewShotSource(digits, (5, 6, 7), shots=4, seed=2)
    assert again._items == source._items != other._items
    assert len(gopro.FewShotSource(digits, (0,), shots=10_000, seed=0)) == 400  # every image of a short class


def test_augmix_mixes_convexly_at_severity_one(monkeypatch):
    image = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    # Severity 1 keeps ops mild: posterize keeps 4 bits, shifts stay within a thirtieth of the side.
    rng = np.random.default_rng(0)
    big = np.random.default_rng(1).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    from PIL import Image, ImageOps

    posterized = augmix.apply_op(big, 'posterize', 1.0, rng)
    np.testing.assert_array_equal(posterized, np.asarray(ImageOps.posterize(Image.fromarray(big), 4)))
    for _ in range(20):
        shifted = augmix.apply_op(big, 'translate_x', 1.0, rng)
        assert any(np.array_equal(shifted[:, 8:-8], np.roll(big, s, axis=1)[:, 8:-8]) for s in range(-7, 8))
    # With every op the identity, the mix is the plain normalised crop: weights sum to one.
    monkeypatch.setattr(augmix, 'apply_op', lambda x, *_: x)
    view = augmix.augmix_view(image, np.random.default_rng(3), size=24)
    rng = np.random.default_rng(3)
    crop = image_data.random_resized_crop(image, 24, rng, (0.08, 1.0))
    crop = crop[:, ::-1] if rng.random() < 0.5 else crop
    np.testing.assert_allclose(view, normalize(crop), atol=1e-5)


@pytest.mark.parametrize(
    ('overrides', 'needle'),
    [
        (['input.subsample_classes=old'], "'input.subsample_classes'"),
        (['input.shots=0'], "'input.shots'"),
        (['model.ctx_init=', 'model.n_ctx=0'], "'model.n_ctx'"),
        (['loss.temperature=0.0'], "'loss.temperature'"),
        (['train.grad_accum=2'], "'train.grad_accum'"),
        (['model.variant=XL'], "'model.variant'"),
    ],
)
def test_config_errors_name_the_key(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(CONFIG, overrides)


@pytest.mark.slow
def test_runlocal_from_a_clip_workdir_sharded_matches_one_device(tmp_path):
    clip_config = load_config(
        'configs/clip.py:runlocal',
        ['model.variant=micro', 'input.global_batch=16', 'train.steps=1', 'eval.at_end=false',
         'train.tensorboard=false'],
    )  # fmt: skip
    _, clip_state = train.train(clip_config, str(tmp_path / 'clip'))
    with pytest.raises(ConfigError, match=r"'model\.clip'"):
        gopro.Method(load_config(CONFIG, [f'model.clip={tmp_path}']))  # not a workdir or a CLIP folder
    common = (f'model.clip={tmp_path / "clip"}', 'input.global_batch=8', 'input.shots=4', 'eval.max_test_clips=16',
              'eval.batch_size=8')  # fmt: skip
    _, one, want_rows = run(CONFIG, tmp_path / 'one', 'mesh.data=1', 'eval.at_end=false', *common)
    summary, sharded, rows = run(CONFIG, tmp_path / 'sharded', 'mesh.data=8', *common)
    assert summary['final_step'] == 2 and summary['nonfinite_steps'] == 0
    for key in ('loss', 'ce', 'consistency', 'contrastive'):
        np.testing.assert_allclose([r[key] for r in rows], [r[key] for r in want_rows], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), sharded['params'],
                 one['params'])  # fmt: skip
    for key in ('gopro/base', 'gopro/new', 'gopro/hm', 'zero_shot/base', 'zero_shot/new'):
        assert 0.0 <= summary[f'final_eval/{key}'] <= 1.0
    assert rows[0]['loss'] == pytest.approx(rows[0]['ce'] + rows[0]['consistency'] + 0.1 * rows[0]['contrastive'])
    # The frozen CLIP is the workdir's, unchanged by training.
    jax.tree.map(np.testing.assert_array_equal, sharded['extra']['clip'], jax.device_get(clip_state['params']))
