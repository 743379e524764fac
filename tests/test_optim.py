"""Optimiser: the reference's schedule, AdamW parity with torch, weight-decay masks and lr multipliers by rules."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch

from jaxssl import optim


def reference_cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs):
    """A transcription of the reference's utils.cosine_scheduler (start_warmup_value 0)."""
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(0, base_value, warmup_iters) if warmup_epochs > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    cosine = [final_value + 0.5 * (base_value - final_value) * (1 + math.cos(math.pi * i / len(iters))) for i in iters]
    return np.concatenate([warmup, cosine])


def test_schedule_matches_reference():
    want = reference_cosine_scheduler(1.6e-2, 1.6e-4, epochs=5, niter_per_ep=7, warmup_epochs=2)
    schedule = optim.warmup_cosine(1.6e-2, 1.6e-4, total_steps=35, warmup_steps=14)
    got = np.array([schedule(step) for step in range(35)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)


def config_for(**optim_fields):
    fields = dict(base_lr=1e-3, min_lr=1e-5, warmup_epochs=1, warmup_steps=0, epochs=2, b1=0.9, b2=0.95, eps=1e-8,
                  weight_decay=0.05, clip_grad=0.0, no_decay=('.*bias', '.*mask_token'), lr_rules=())  # fmt: skip
    fields.update(optim_fields)
    return ml_collections.ConfigDict(dict(optim=fields, input=dict(global_batch=512), train=dict(steps=0)))


def test_lr_scales_with_global_batch():
    config = config_for()
    assert optim.peak_learning_rate(config) == 1e-3 * 512 / 256
    total, per_epoch = optim.training_steps(config, examples_per_epoch=5120)
    assert (total, per_epoch) == (20, 10)
    schedule = optim.learning_rate_schedule(config, total, per_epoch)
    assert float(schedule(9)) == np.float32(2e-3) and float(schedule(19)) > 2e-5


def test_constant_schedule_warms_up_then_holds_the_peak():
    config = config_for(schedule='constant', warmup_epochs=0, warmup_steps=4)
    optim.add_schedule_defaults(config.optim)
    config.optim.schedule = 'constant'
    schedule = optim.learning_rate_schedule(config, 20, 10)
    got = np.array([float(schedule(step)) for step in range(20)])
    np.testing.assert_allclose(got[:5], 2e-3 * np.arange(5) / 4, rtol=1e-6)  # linear warmup to the peak at step 4
    np.testing.assert_allclose(got[4:], 2e-3, rtol=1e-6)  # then the peak, with no decay to min_lr


def test_decay_mask_by_names_and_rank():
    params = {
        'patch_embed': {'proj': {'kernel': jnp.zeros((2, 4, 4, 3, 8)), 'bias': jnp.zeros(8)}},
        'encoder': {
            'blocks': {'norm1': {'scale': jnp.zeros((3, 8))}, 'mlp': {'fc1': {'kernel': jnp.zeros((3, 8, 16))}}},
            'norm': {'scale': jnp.zeros(8)},
        },
        'mask_token': jnp.zeros((1, 1, 8)),
    }  # fmt: skip
    mask = optim.decay_mask(params, [('.*bias', True), ('.*mask_token', True)])
    assert mask['patch_embed']['proj'] == {'kernel': True, 'bias': False}
    assert mask['encoder']['blocks']['norm1']['scale'] is False  # 1-D per layer in a scanned stack
    assert mask['encoder']['blocks']['mlp']['fc1']['kernel'] is True
    assert mask['encoder']['norm']['scale'] is False and mask['mask_token'] is False
    everything = optim.decay_mask(params, [('.*mask_token', True)], decay_vectors=True)  # fairseq's adam
    assert everything['patch_embed']['proj']['bias'] is True and everything['encoder']['norm']['scale'] is True
    assert everything['mask_token'] is False  # rules still exclude


def test_adamw_matches_torch():
    """Three steps of our optimiser equal torch.optim.AdamW with decay / no-decay groups and a constant lr."""
    rng = np.random.default_rng(0)
    weight, bias = rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    grads = [(rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)) for _ in range(3)]
    config = config_for(clip_grad=0.0)
    params = {'dense': {'kernel': jnp.asarray(weight), 'bias': jnp.asarray(bias)}}
    tx = optim.make_optimizer(config, params, lambda step: 1e-2)
    state = tx.init(params)
    for gw, gb in grads:
        updates, state = tx.update({'dense': {'kernel': jnp.asarray(gw), 'bias': jnp.asarray(gb)}}, state, params)
        params = optax.apply_updates(params, updates)

    tw, tb = torch.tensor(weight, requires_grad=True), torch.tensor(bias, requires_grad=True)
    opt = torch.optim.AdamW(
        [{'params': [tw], 'weight_decay': 0.05}, {'params': [tb], 'weight_decay': 0.0}],
        lr=1e-2,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    for gw, gb in grads:
        tw.grad, tb.grad = torch.tensor(gw), torch.tensor(gb)
        opt.step()
    np.testing.assert_allclose(params['dense']['kernel'], tw.detach().numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(params['dense']['bias'], tb.detach().numpy(), rtol=1e-5, atol=1e-7)


def test_adam_with_l2_matches_torch():
    """`optim.name='adam'` equals torch.optim.Adam(weight_decay=...): the decay enters the moments (coupled L2)."""
    rng = np.random.default_rng(1)
    weight = rng.normal(size=(4, 3)).astype(np.float32)
    grads = [rng.normal(size=(4, 3)).astype(np.float32) for _ in range(3)]
    config = config_for(clip_grad=0.0, weight_decay=0.3)
    config.optim.name = 'adam'
    params = {'dense': {'kernel': jnp.asarray(weight)}}
    tx = optim.make_optimizer(config, params, lambda step: 1e-2)
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update({'dense': {'kernel': jnp.asarray(g)}}, state, params)
        params = optax.apply_updates(params, updates)
    tw = torch.tensor(weight, requires_grad=True)
    opt = torch.optim.Adam([tw], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.3)
    for g in grads:
        tw.grad = torch.tensor(g)
        opt.step()
    np.testing.assert_allclose(params['dense']['kernel'], tw.detach().numpy(), rtol=1e-5, atol=1e-7)


def test_lr_rules_scale_and_freeze():
    config = config_for(lr_rules=(('frozen/.*', 0.0), ('half/.*', 0.5)), weight_decay=0.0)
    params = {'frozen': {'w': jnp.ones((2, 2))}, 'half': {'w': jnp.ones((2, 2))}, 'full': {'w': jnp.ones((2, 2))}}
    tx = optim.make_optimizer(config, params, lambda step: 0.1)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates['frozen']['w'], 0.0)
    np.testing.assert_allclose(updates['half']['w'], 0.5 * np.asarray(updates['full']['w']), rtol=1e-6)


def test_gradients_are_clipped_before_adam():
    config = config_for(clip_grad=0.02, weight_decay=0.0)
    params = {'w': jnp.zeros(4)}
    tx = optim.make_optimizer(config, params, lambda step: 1.0)
    _, state = tx.update({'w': jnp.full(4, 100.0)}, tx.init(params), params)
    adam_state = next(s for s in state if isinstance(s, optax.ScaleByAdamState))
    # Clipped to global norm 0.02 -> 0.01 per element; Adam's first moment after one step is (1 - b1) * g.
    np.testing.assert_allclose(adam_state.mu['w'], 0.1 * 0.01, rtol=1e-5)


def test_lars_matches_hand_computed_reference_rule():
    """Two steps of optim.name='lars' against the reference's rule written out in numpy: decayed, trust-scaled
    (eta ||w|| / ||g + wd w||) and momentum on the lr-scaled update for 2-D weights; plain momentum SGD for 1-D."""
    rng = np.random.default_rng(0)
    weight, bias = rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    grads = [(rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)) for _ in range(2)]
    config = config_for(name='lars', momentum=0.9, trust_coefficient=1e-3, weight_decay=0.01, no_decay=())
    params = {'dense': {'kernel': jnp.asarray(weight), 'bias': jnp.asarray(bias)}}
    tx = optim.make_optimizer(config, params, lambda step: 0.5)
    state = tx.init(params)
    for gw, gb in grads:
        updates, state = tx.update({'dense': {'kernel': jnp.asarray(gw), 'bias': jnp.asarray(gb)}}, state, params)
        params = optax.apply_updates(params, updates)

    w, b = weight.astype(np.float64), bias.astype(np.float64)
    vw, vb = np.zeros_like(w), np.zeros_like(b)
    for gw, gb in grads:
        u = gw + 0.01 * w
        vw = 0.9 * vw + 0.5 * (1e-3 * np.linalg.norm(w) / np.linalg.norm(u)) * u
        vb = 0.9 * vb + 0.5 * gb
        w, b = w - vw, b - vb
    np.testing.assert_allclose(params['dense']['kernel'], w, rtol=1e-5)
    np.testing.assert_allclose(params['dense']['bias'], b, rtol=1e-5)
    assert not np.allclose(w, weight)  # the weights moved


def test_unknown_optimizer_name_is_refused():
    with pytest.raises(ValueError, match=r"unknown optim\.name 'sgdd'"):
        optim.make_optimizer(config_for(name='sgdd'), {'w': jnp.ones((2, 2))}, lambda step: 0.1)


@pytest.mark.parametrize('name', ['adamw', 'sgd'])
def test_dino_recipe_matches_torch(name):
    """DINO's optimiser (main_dino.py): AdamW (ViTs) or SGD with momentum 0.9 (the ResNet recipe) whose weight
    decay follows a cosine, each gradient tensor clipped to norm 0.5 on its own (utils.clip_gradients), and a
    'last' layer whose grad is None for the first 2 steps (freeze_last_layer: no step, no decay, no moments).
    lr(step) grows, so a group that starts late must see the global step's lr."""
    rng = np.random.default_rng(1)
    init = {'w': rng.normal(size=(4, 3)), 'b': rng.normal(size=3), 'last': rng.normal(size=(3, 5))}
    init = {k: v.astype(np.float32) for k, v in init.items()}
    steps, freeze = 5, 2
    grads = [{k: (3 * rng.normal(size=v.shape)).astype(np.float32) for k, v in init.items()} for _ in range(steps)]
    lr = lambda step: 0.01 * (step + 1)
    config = config_for(clip_grad=0.5, clip_mode='per_tensor', weight_decay=0.04, weight_decay_end=0.4, no_decay=(),
                        freeze_epochs=(('last', 1),), name=name, momentum=0.9)  # fmt: skip
    params = jax.tree.map(jnp.asarray, init)
    tx = optim.make_optimizer(config, params, lr, total_steps=steps, steps_per_epoch=freeze)
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, params)
        params = optax.apply_updates(params, updates)

    decay = reference_cosine_scheduler(0.04, 0.4, epochs=1, niter_per_ep=steps, warmup_epochs=0)
    tensors = {k: torch.tensor(v, requires_grad=True) for k, v in init.items()}
    groups = [{'params': [tensors['w'], tensors['last']]}, {'params': [tensors['b']], 'weight_decay': 0.0}]
    if name == 'adamw':
        opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-8)
    else:
        opt = torch.optim.SGD(groups, lr=0, momentum=0.9)
    for step, g in enumerate(grads):
        opt.param_groups[0]['weight_decay'] = decay[step]
        for group in opt.param_groups:
            group['lr'] = lr(step)
        for name, t in tensors.items():
            t.grad = torch.tensor(g[name])
            coef = 0.5 / (t.grad.norm() + 1e-6)
            if coef < 1:
                t.grad.mul_(coef)
        if step < freeze:
            tensors['last'].grad = None
        opt.step()
    for name, t in tensors.items():
        np.testing.assert_allclose(params[name], t.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=name)
    assert not np.allclose(params['last'], init['last'])
