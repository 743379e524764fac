"""Optimiser and schedule: AdamW (default), Adam with L2, LARS or SGD (`optim.name`), with rule-based weight-decay
masks and lr multipliers, global-norm or per-tensor clipping, an optional cosine weight-decay schedule
(`optim.weight_decay_end`), parameters frozen for the first epochs (`optim.freeze_epochs`), parameters clamped into
bounds (`optim.clamp`), and a per-step lr schedule (`optim.schedule`):

- 'cosine' (default): the reference's warmup + cosine decay to `optim.min_lr`;
- 'linear': warmup + linear decay to `optim.min_lr` (the HF Trainer default, e.g. self-distillation's recipe);
- 'infinite': the infinite schedule of Ibrahim et al. 2024 / Singh et al. 2025 (`infinite_schedule`): warmup,
  cooldown to a constant lr, constant, exponential annealing to a minimum lr;
- 'tri_stage': fairseq's wav2vec 2.0 fine-tuning schedule (`tri_stage_schedule`): warmup, hold, exponential decay;
- 'epoch_cosine': Dassl's (CoOp, CoCoOp, MaPLe, GOPro; `epoch_cosine_schedule`): the lr changes once per epoch,
  `optim.warmup_lr` for the warmup epochs, then torch's CosineAnnealingLR over `optim.epochs` epochs;
- 'constant': the linear warmup, if any, then the peak lr throughout (UNFUSED's SGD without a scheduler);
- 'one_cycle': torch's OneCycleLR (NeRF-MAE's): cosine from peak / one_cycle_div up to the peak over one_cycle_pct of
  the steps, then cosine down to peak / one_cycle_div / one_cycle_final_div (its own warmup: no optim.warmup_*).

Continual pretraining over a sequence of tasks: `optim.task_steps` (> 0) makes the schedule restart every
task_steps steps (cosine / linear: one full cycle per task, i.e. repeated cosine; infinite: tasks after the first
skip warmup and cooldown), and `optim.schedule_offset` is added to the step, so a run started with `init_from` the
previous task's workdir continues the schedule where the earlier tasks left it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxssl import rules as rules_lib
from jaxssl.config import ConfigError

OPTIMIZERS = ('adamw', 'adam', 'lars', 'sgd')
SCHEDULES = ('cosine', 'linear', 'infinite', 'tri_stage', 'epoch_cosine', 'constant', 'poly', 'step', 'one_cycle')
COOLDOWNS = ('cosine', 'linear', 'inv_sqrt')  # the infinite schedule's cooldown shapes (the reference's options)
# Schedule keys every config gets (add_schedule_defaults) so any of them can be selected on the command line; the
# infinite schedule's values are the authors' final small-scale MAE runs (Pauljanson002/MAE-1 bin/mila/*.sh).
SCHEDULE_DEFAULTS = dict(
    schedule='cosine',
    task_steps=0,  # > 0: the schedule restarts every task_steps steps (one cycle per task); 0: one cycle per run
    schedule_offset=0,  # steps of earlier tasks / runs already taken (continual pretraining with init_from)
    cooldown='cosine',  # infinite: the cooldown's shape, 'cosine', 'linear' or 'inv_sqrt'
    cooldown_ratio=0.5,  # infinite: the cooldown ends at cooldown_ratio x task steps (absolute cut point)
    constant_ratio=0.8,  # infinite: the constant phase ends (annealing starts) at constant_ratio x task steps
    constant_lr_ratio=0.75,  # infinite: the constant lr, a fraction of the peak lr
    min_lr_ratio=0.05,  # infinite: the annealing's final lr, a fraction of the peak lr
    phase_ratio=(0.1, 0.4, 0.5),  # tri_stage: warmup, hold and decay fractions of the task's steps (fairseq's)
    init_lr_scale=0.01,  # tri_stage: the warmup's first lr, a fraction of the peak lr
    final_lr_scale=0.05,  # tri_stage: the lr after the exponential decay, a fraction of the peak lr
    warmup_lr=1e-5,  # epoch_cosine: the constant lr of the warmup epochs (absolute, Dassl's WARMUP_CONS_LR)
    poly_power=0.9,  # poly: lr = peak (1 - step / steps)^power (DeepLab's, U2PL's and FST's), no warmup
    step_boundaries=(0.5,),  # step: the lr is multiplied by step_factor at each of these fractions of the steps
    step_factor=0.1,  # step: Caffe's 'step' policy gamma, Keras LearningRateScheduler drops (PredNet: 1e-3 -> 1e-4)
    one_cycle_pct=0.3,  # one_cycle: torch OneCycleLR's defaults (pct_start, div_factor, final_div_factor)
    one_cycle_div=25.0,
    one_cycle_final_div=1e4,
    one_cycle_beta1=(0.85, 0.95),  # one_cycle: Adam's beta1 cycled from the high value down and back, opposite the
    # lr (OneCycleLR's cycle_momentum with base / max momentum); () keeps optim.b1 fixed
)
INV_SQRT_ALPHA = 10.0  # the reference's inverse-sqrt cooldown steepness


def peak_learning_rate(config: ml_collections.ConfigDict) -> float:
    """lr = base_lr x global_batch / 256 (the global batch counts clips, not repeated-augmentation views)."""
    return config.optim.base_lr * config.input.global_batch / 256


def warmup_cosine(peak: float, final: float, total_steps: int, warmup_steps: int) -> optax.Schedule:
    """The reference's cosine_scheduler: linspace(0, peak, warmup) (endpoint included), then cosine to `final`."""
    warmup_steps = min(warmup_steps, total_steps)
    decay_steps = max(total_steps - warmup_steps, 1)

    def schedule(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warm = peak * step / max(warmup_steps - 1, 1)
        progress = (step - warmup_steps) / decay_steps
        cosine = final + 0.5 * (peak - final) * (1 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < warmup_steps, warm, cosine)

    return schedule


def warmup_linear(peak: float, final: float, total_steps: int, warmup_steps: int) -> optax.Schedule:
    """Linear warmup from 0 (peak at step warmup_steps), then linear decay to `final` at total_steps."""
    warmup_steps = min(warmup_steps, total_steps)
    decay_steps = max(total_steps - warmup_steps, 1)

    def schedule(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warm = peak * step / max(warmup_steps, 1)
        progress = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
        return jnp.where(step < warmup_steps, warm, peak + (final - peak) * progress)

    return schedule


def infinite_schedule(
    peak: float,
    task_steps: int,
    warmup_steps: int,
    cooldown_end: int,
    constant_end: int,
    constant_lr: float,
    min_lr: float,
    cooldown: str = 'cosine',
) -> optax.Schedule:
    """The infinite lr schedule (Pauljanson002/MAE-1 infinite_scheduler.py), a function of the step counted from the
    start of the first task. Within task k, t = step mod task_steps; the cut points are absolute steps of a task:

      task 0, t <= warmup_steps:          peak * t / warmup_steps
      task 0, warmup < t <= cooldown_end: from peak to constant_lr, p = (t - warmup) / (cooldown_end - warmup):
                                          cosine: c + (peak - c) / 2 (1 + cos(pi p)); linear: peak - (peak - c) p;
                                          inv_sqrt: peak + (c - peak) h(p) / h(1), h(x) = 1 / sqrt(1 + 10 x) - 1
      t <= constant_end (task 0 after the cooldown, every t of later tasks): constant_lr
      t > constant_end:                   constant_lr * (min_lr / constant_lr) ** ((t - constant_end) /
                                          (task_steps - constant_end))   (exponential annealing)
    """
    if not 0 <= warmup_steps < cooldown_end <= constant_end < task_steps:
        raise ValueError(
            f'need 0 <= warmup {warmup_steps} < cooldown end {cooldown_end} <= constant end {constant_end} < task '
            f'steps {task_steps}'
        )
    if cooldown not in COOLDOWNS:
        raise ValueError(f"unknown cooldown '{cooldown}'; valid: {', '.join(COOLDOWNS)}")
    h = lambda x: 1.0 / jnp.sqrt(1.0 + INV_SQRT_ALPHA * x) - 1.0

    def schedule(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        task, t = jnp.floor(step / task_steps), jnp.mod(step, task_steps)
        warm = peak * t / max(warmup_steps, 1)
        p = jnp.clip((t - warmup_steps) / (cooldown_end - warmup_steps), 0.0, 1.0)
        if cooldown == 'cosine':
            cool = constant_lr + 0.5 * (peak - constant_lr) * (1 + jnp.cos(jnp.pi * p))
        elif cooldown == 'linear':
            cool = peak - (peak - constant_lr) * p
        else:
            cool = peak + (constant_lr - peak) * h(p) / h(1.0)
        anneal = constant_lr * (min_lr / constant_lr) ** ((t - constant_end) / (task_steps - constant_end))
        first = jnp.where(t <= warmup_steps, warm, jnp.where(t <= cooldown_end, cool, constant_lr))
        held = jnp.where(task == 0, first, constant_lr)
        return jnp.where(t <= constant_end, held, anneal)

    return schedule


def tri_stage_schedule(
    peak: float, total_steps: int, phase_ratio: tuple[float, float, float], init_scale: float, final_scale: float
) -> optax.Schedule:
    """fairseq's tri_stage schedule (wav2vec 2.0 fine-tuning): linear from init_scale x peak to the peak over the
    first phase_ratio[0] of the steps, the peak for the next phase_ratio[1], an exponential decay to final_scale x peak
    over phase_ratio[2], then final_scale x peak. Phase lengths are int(ratio x total_steps), as fairseq's."""
    warmup, hold, decay = (int(total_steps * r) for r in phase_ratio)
    init, final = init_scale * peak, final_scale * peak
    decay_factor = -math.log(final_scale) / max(decay, 1)

    def schedule(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warming = init + (peak - init) / max(warmup, 1) * step
        decaying = peak * jnp.exp(-decay_factor * (step - warmup - hold))
        return jnp.where(
            step < warmup,
            warming,
            jnp.where(step < warmup + hold, peak, jnp.where(step <= warmup + hold + decay, decaying, final)),
        )

    return schedule


def epoch_cosine_schedule(peak: float, epochs: int, steps_per_epoch: int, warmup_epochs: int, warmup_lr: float):
    """Dassl's ConstantWarmupScheduler around CosineAnnealingLR(T_max = epochs), stepped after every epoch: epoch
    e < warmup_epochs runs at warmup_lr, epoch e >= warmup_epochs at peak (1 + cos(pi (e - warmup_epochs) / epochs)) / 2
    (the cosine starts where the warmup ends and never reaches 0 within the run)."""

    def schedule(step: jax.Array) -> jax.Array:
        epoch = jnp.floor(jnp.asarray(step, jnp.float32) / steps_per_epoch)
        cosine = 0.5 * peak * (1 + jnp.cos(jnp.pi * (epoch - warmup_epochs) / epochs))
        return jnp.where(epoch < warmup_epochs, warmup_lr, cosine)

    return schedule


def step_schedule(peak: float, total_steps: int, warmup_steps: int, boundaries: tuple, factor: float):
    """Linear warmup from 0 to the peak at step `warmup_steps`, then peak x factor^k after k of the boundaries
    (fractions of total_steps, cut at int(fraction x total_steps)): Caffe's 'step' policy and PredNet's epoch-75
    drop."""
    cuts = jnp.asarray([int(b * total_steps) for b in boundaries], jnp.float32)

    def schedule(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        drops = jnp.sum(step >= cuts)
        return jnp.where(step < warmup_steps, peak * step / max(warmup_steps, 1), peak * factor**drops)

    return schedule


def one_cycle_schedule(peak: float, total_steps: int, pct: float, div: float, final_div: float) -> optax.Schedule:
    """torch.optim.lr_scheduler.OneCycleLR (anneal_strategy 'cos', two phases) as a function of the step: from
    peak / div up to the peak at step pct x total - 1, then down to peak / div / final_div at the last step."""
    initial = peak / div
    final = initial / final_div
    up_end = float(pct * total_steps) - 1.0
    down_end = float(total_steps - 1)

    def anneal(start: float, end: float, fraction: jax.Array) -> jax.Array:
        return end + (start - end) / 2.0 * (jnp.cos(jnp.pi * fraction) + 1.0)

    def schedule(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        up = anneal(initial, peak, step / max(up_end, 1e-9))
        down = anneal(peak, final, jnp.minimum((step - up_end) / max(down_end - up_end, 1e-9), 1.0))
        return jnp.where(step <= up_end, up, down)

    return schedule


def beta1_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule | None:
    """OneCycleLR's momentum cycle for Adam's beta1 (`optim.one_cycle_beta1` = (low, high)): high at the start,
    annealed like the lr's phases but the other way (low at the lr's peak, high again at the end); None when the
    schedule is not one_cycle or the pair is empty (optim.b1 then stays fixed)."""
    o = schedule_fields(config.optim)
    if o.schedule != 'one_cycle' or not tuple(o.one_cycle_beta1):
        return None
    low, high = tuple(o.one_cycle_beta1)
    task_steps = o.task_steps or total_steps
    # The lr curve from `high` through `low` and back: a one-cycle schedule over (high - b1) shifted by `high`.
    dip = one_cycle_schedule(high - low, task_steps, o.one_cycle_pct, float('inf'), 1.0)
    return lambda step: high - dip(jnp.mod(jnp.asarray(step) + o.schedule_offset, task_steps))


def add_schedule_defaults(optim_config: ml_collections.ConfigDict) -> None:
    """Adds the schedule keys (SCHEDULE_DEFAULTS) a config's `optim` section lacks; values it sets are kept."""
    for key, value in SCHEDULE_DEFAULTS.items():
        if key not in optim_config:
            optim_config[key] = value


def schedule_fields(optim_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The schedule keys of `optim_config`, SCHEDULE_DEFAULTS for those it lacks (configs built by hand)."""
    return ml_collections.ConfigDict({k: optim_config.get(k, v) for k, v in SCHEDULE_DEFAULTS.items()})


def check_schedule_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, naming the key, on schedule values that cannot make a schedule (step counts are checked when the
    run knows its length)."""
    o = schedule_fields(config.optim)
    for key, choices in (('schedule', SCHEDULES), ('cooldown', COOLDOWNS)):
        value = o[key]
        if value not in choices:
            raise ConfigError(f"bad value '{value}' for 'optim.{key}'; valid: {', '.join(choices)}")
    for key in ('task_steps', 'schedule_offset'):
        value = o[key]
        if not isinstance(value, int) or value < 0:
            raise ConfigError(f"bad value {value!r} for 'optim.{key}': must be an integer >= 0")
    if o.schedule == 'tri_stage':
        ratios = tuple(o.phase_ratio)
        if len(ratios) != 3 or min(ratios) < 0 or abs(sum(ratios) - 1) > 1e-6:
            raise ConfigError(f"bad value {ratios} for 'optim.phase_ratio': three fractions >= 0 that add up to 1")
        if not 0 < o.init_lr_scale <= 1 or not 0 < o.final_lr_scale <= 1:
            raise ConfigError("'optim.init_lr_scale' / 'optim.final_lr_scale' must be in (0, 1]")
        return
    if o.schedule == 'step':
        bounds = tuple(o.step_boundaries)
        if not bounds or any(not 0 < b < 1 for b in bounds) or any(a >= b for a, b in itertools.pairwise(bounds)):
            raise ConfigError(f"bad value {bounds} for 'optim.step_boundaries': increasing fractions in (0, 1)")
        if not 0 < o.step_factor <= 1:
            raise ConfigError(f"bad value {o.step_factor} for 'optim.step_factor': must be in (0, 1]")
        return
    if o.schedule == 'one_cycle':
        if not 0 < o.one_cycle_pct < 1:
            raise ConfigError(f"bad value {o.one_cycle_pct} for 'optim.one_cycle_pct': must be in (0, 1)")
        for key in ('one_cycle_div', 'one_cycle_final_div'):
            if not o[key] >= 1:
                raise ConfigError(f"bad value {o[key]} for 'optim.{key}': must be >= 1")
        beta1 = tuple(o.one_cycle_beta1)
        if beta1 and (len(beta1) != 2 or not 0 <= beta1[0] <= beta1[1] < 1):
            raise ConfigError(f"bad value {beta1} for 'optim.one_cycle_beta1': () or (low, high), 0 <= low <= high < 1")
        return
    if o.schedule != 'infinite':
        return
    cool, const = o.cooldown_ratio, o.constant_ratio
    if not 0 < cool <= const < 1:
        raise ConfigError(
            f"bad values {cool} for 'optim.cooldown_ratio' and {const} for 'optim.constant_ratio': "
            'need 0 < cooldown_ratio <= constant_ratio < 1'
        )
    c_lr, m_lr = o.constant_lr_ratio, o.min_lr_ratio
    if not 0 < c_lr <= 1:
        raise ConfigError(f"bad value {c_lr} for 'optim.constant_lr_ratio': must be in (0, 1]")
    if not 0 < m_lr <= c_lr:
        raise ConfigError(f"bad value {m_lr} for 'optim.min_lr_ratio': must be in (0, optim.constant_lr_ratio]")


def learning_rate_schedule(config: ml_collections.ConfigDict, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
    """The schedule `optim.schedule` names, over tasks of `optim.task_steps` steps (0: this run's total_steps),
    shifted by `optim.schedule_offset` steps. Warmup: `optim.warmup_steps`, else `optim.warmup_epochs`."""
    check_schedule_config(config)
    o, optim_config = schedule_fields(config.optim), config.optim
    scale = config.input.global_batch / 256
    peak = peak_learning_rate(config)
    warmup = optim_config.warmup_steps
    warmup = int(warmup if warmup > 0 else optim_config.warmup_epochs * steps_per_epoch)
    task_steps = o.task_steps or total_steps
    name = o.schedule
    if name == 'infinite':
        cooldown_end, constant_end = int(o.cooldown_ratio * task_steps), int(o.constant_ratio * task_steps)
        if not warmup < cooldown_end <= constant_end < task_steps:
            raise ConfigError(
                f"'optim.schedule' infinite over tasks of {task_steps} steps: need warmup ({warmup} steps) < "
                f"cooldown end ('optim.cooldown_ratio': {cooldown_end} steps) <= annealing start "
                f"('optim.constant_ratio': {constant_end} steps) < {task_steps}"
            )
        per_task = infinite_schedule(
            peak, task_steps, warmup, cooldown_end, constant_end, o.constant_lr_ratio * peak, o.min_lr_ratio * peak,
            o.cooldown,
        )  # fmt: skip
    elif name == 'epoch_cosine':
        epochs = max(round(task_steps / steps_per_epoch), 1)
        cycle = epoch_cosine_schedule(peak, epochs, steps_per_epoch, optim_config.warmup_epochs, o.warmup_lr)
        per_task = lambda step: cycle(jnp.mod(step, task_steps))
    elif name == 'poly':
        if warmup:
            raise ConfigError(
                "'optim.schedule' poly has no warmup: set 'optim.warmup_steps' and 'optim.warmup_epochs' to 0"
            )
        # Clamped at 0: XLA computes step / steps as step x (1 / steps), a hair above 1 at the end, and a negative
        # base to a fractional power is NaN.
        cycle = lambda step: peak * jnp.maximum(1.0 - jnp.minimum(step, task_steps) / task_steps, 0.0) ** o.poly_power
        per_task = lambda step: cycle(jnp.mod(step, task_steps))
    elif name == 'step':
        first_cut = int(o.step_boundaries[0] * task_steps)
        if warmup > first_cut:
            raise ConfigError(
                f"'optim.schedule' step: the warmup ({warmup} steps) runs past the first drop at step {first_cut} "
                "('optim.step_boundaries')"
            )
        cycle = step_schedule(peak, task_steps, warmup, tuple(o.step_boundaries), o.step_factor)
        per_task = lambda step: cycle(jnp.mod(step, task_steps))
    elif name == 'one_cycle':
        if warmup:
            raise ConfigError(
                "'optim.schedule' one_cycle warms up by itself: set 'optim.warmup_steps' and 'optim.warmup_epochs' to 0"
            )
        cycle = one_cycle_schedule(peak, task_steps, o.one_cycle_pct, o.one_cycle_div, o.one_cycle_final_div)
        per_task = lambda step: cycle(jnp.mod(step, task_steps))
    elif name == 'tri_stage':
        cycle = tri_stage_schedule(peak, task_steps, tuple(o.phase_ratio), o.init_lr_scale, o.final_lr_scale)
        per_task = lambda step: cycle(jnp.mod(step, task_steps))
    else:
        make = warmup_cosine if name == 'cosine' else warmup_linear
        # 'constant': the linear warmup (if any) to the peak, then the peak (UNFUSED's plain SGD has no schedule).
        final = peak if name == 'constant' else optim_config.min_lr * scale
        cycle = make(peak, final, task_steps, warmup)
        per_task = lambda step: cycle(jnp.mod(step, task_steps))  # one full cycle per task: repeated cosine
    offset = o.schedule_offset
    if offset == 0 and name != 'infinite' and task_steps == total_steps:
        return cycle  # the default: exactly the schedule every existing config had
    return lambda step: per_task(jnp.asarray(step) + offset)


def decay_mask(params: Any, no_decay_rules: rules_lib.Rules, decay_vectors: bool = False) -> Any:
    """True where weight decay applies: not for rule matches, nor for 1-D parameters (per layer, for scanned stacks)
    unless `decay_vectors` (fairseq's Adam decays every parameter, biases and norms included)."""

    def decays(name: str, leaf: Any) -> bool:
        per_layer_ndim = leaf.ndim - (1 if rules_lib.is_scanned(name) else 0)
        shaped = per_layer_ndim > 1 or decay_vectors
        return shaped and rules_lib.first_match(no_decay_rules, name, default=None) is None

    return rules_lib.map_with_names(decays, params)


def lr_multipliers(params: Any, lr_rules: rules_lib.Rules) -> Any:
    """Per-parameter lr multipliers from rules (default 1); 0 freezes a parameter.

    A rule's value is a number, or (for scanned layer stacks, whose leaves carry a leading layer axis) a sequence
    with one number per layer, returned as an array broadcastable against the leaf: shape (layers, 1, ..., 1).
    """

    def multiplier(name: str, leaf: Any) -> Any:
        value = rules_lib.first_match(lr_rules, name, 1.0)
        if isinstance(value, (int, float)):
            return float(value)
        values = np.asarray(value, np.float32)
        if values.ndim != 1 or not rules_lib.is_scanned(name) or values.shape[0] != leaf.shape[0]:
            raise ValueError(
                f'lr rule for {name} gives {values.shape[0] if values.ndim == 1 else values.shape} values; a '
                f'sequence needs a scanned stack with one entry per layer (leaf shape {tuple(leaf.shape)})'
            )
        return values.reshape((-1,) + (1,) * (len(leaf.shape) - 1))

    return rules_lib.map_with_names(multiplier, params)


def layer_decay_rules(depth: int, decay: float, prefix: str = 'encoder') -> tuple[tuple[str, Any], ...]:
    """lr rules for layer-wise lr decay (BEiT / the VideoMAE V2 fine-tuning recipe) over a ViT of `depth` blocks.

    scale_i = decay ** (depth + 1 - i) with layer 0 = patch embedding and position table, layer k + 1 = block k,
    layer depth + 1 = everything else (fc_norm, head, final norm: scale 1, the rules' default). Blocks are matched
    both unscanned (`<prefix>/block_07/...`: one rule per block) and scanned (`<prefix>/blocks/...`: one rule
    whose value lists the scales per layer). decay >= 1 gives no rules.
    """
    if decay >= 1.0:
        return ()
    scale = lambda layer: float(decay ** (depth + 1 - layer))
    rules = [('patch_embed/.*', scale(0)), ('pos_embed/.*', scale(0)), ('cls_token', scale(0))]
    rules += [(f'{prefix}/block_{k:02d}/.*', scale(k + 1)) for k in range(depth)]
    rules.append((f'{prefix}/blocks/.*', tuple(scale(k + 1) for k in range(depth))))
    return tuple(rules)


def clip_per_tensor(max_norm: float) -> optax.GradientTransformation:
    """DINO's utils.clip_gradients: each parameter tensor's gradient scaled to norm <= max_norm on its own
    (coefficient max_norm / (norm + 1e-6) when below 1), not one global norm."""

    def update(updates, state, params=None):
        del params

        def clip(g):
            norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
            return g * jnp.minimum(1.0, max_norm / (norm + 1e-6)).astype(g.dtype)

        return jax.tree.map(clip, updates), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def frozen_for(inner: optax.GradientTransformation, steps: int) -> optax.GradientTransformation:
    """`inner` with zero updates for the first `steps` updates, during which its state does not advance either: as
    torch parameters whose grad is None (DINO's freeze_last_layer): no step, no weight decay, no moment update, and
    Adam's bias correction starts when they thaw."""

    def init(params):
        return inner.init(params), jnp.zeros((), jnp.int32)

    def update(updates, state, params=None):
        inner_state, count = state
        new_updates, new_state = jax.lax.cond(
            count < steps,
            lambda: (jax.tree.map(jnp.zeros_like, updates), inner_state),
            lambda: inner.update(updates, inner_state, params),
        )
        return new_updates, (new_state, jnp.minimum(count + 1, steps))

    return optax.GradientTransformation(init, update)


def _is_schedule_state(node: Any) -> bool:
    # optax's lr schedule position (public) and its weight-decay schedule position (optax.transforms._adding).
    return isinstance(node, optax.ScaleByScheduleState) or type(node).__name__ == 'WeightDecaySchedule'


def rewind_schedules(state: Any, before: Any) -> Any:
    """`state` with every lr and weight-decay schedule position taken from `before`, the rest (momentum, Adam's
    moments and bias-correction count) kept: the look-ahead's virtual updates move the optimiser's buffers but not
    its schedules, as FST's reference steps its lr scheduler once per real step. (frozen_for's thaw counts are
    plain arrays and advance with every update.)"""
    return jax.tree.map(lambda new, old: old if _is_schedule_state(new) else new, state, before,
                        is_leaf=_is_schedule_state)  # fmt: skip


def clamp_params(rules: Sequence[tuple[str, float, float]]) -> optax.GradientTransformation:
    """Keeps the parameters a rule names inside [low, high] after each update: the update becomes
    clip(p + u, low, high) - p. This is open_clip's in-place `logit_scale.clamp_(0, ln 100)` after the optimiser step,
    which leaves the gradient alone (clipping inside the loss instead would zero the gradient at the bound and could
    hold the parameter there). rules: (name pattern, low, high), first match wins."""
    rules = [(pattern, (float(low), float(high))) for pattern, low, high in rules]

    def update(updates, state, params=None):
        if params is None:
            raise ValueError('clamp_params needs the params')
        bounds = rules_lib.map_with_names(lambda name, _: rules_lib.first_match(rules, name), params)
        clamp = lambda u, p, b: u if b is None else jnp.clip(p + u, *b) - p
        return jax.tree.map(clamp, updates, params, bounds, is_leaf=lambda x: x is None), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def weight_decay_schedule(config: ml_collections.ConfigDict, total_steps: int) -> float | optax.Schedule:
    """optim.weight_decay, or (with optim.weight_decay_end >= 0) DINO's cosine from weight_decay to weight_decay_end
    over the run, one value per step, no warmup."""
    o = config.optim
    end = o.get('weight_decay_end', -1.0)
    if end is None or end < 0:
        return o.weight_decay
    return warmup_cosine(o.weight_decay, end, max(total_steps, 1), 0)


def make_optimizer(
    config: ml_collections.ConfigDict,
    params: Any,
    schedule: optax.Schedule,
    total_steps: int = 1,
    steps_per_epoch: int = 1,
) -> optax.GradientTransformation:
    """clip -> the optimiser's update -> -lr(step) -> per-parameter multipliers.

    'adamw' (the default when `optim.name` is absent): Adam moments -> decoupled weight decay (masked); equal to
    torch AdamW with param groups whose lr is scaled by `lr_scale`: decay is scaled by the lr too.
    'lars' (SimCLR's, google-research/simclr tf2/lars_optimizer.py): g + wd * w, scaled by the trust ratio
    optim.trust_coefficient * ||w|| / ||g + wd * w||, then -lr(step), then heavy-ball momentum optim.momentum on the
    lr-scaled update (the reference's v = m v + lr * update). Parameters the decay mask leaves out (1-D: biases,
    norms; `optim.no_decay` rules) get neither decay nor the trust ratio, as the reference's exclusions.
    'sgd' (torch.optim.SGD with momentum, DINO's ResNet recipe): b = m b + (g + wd * w), w -= lr(step) b.
    'adam' (torch.optim.Adam's coupled L2, SSAST's): Adam moments of g + wd * w (masked), then -lr(step).
    `optim.clamp` rules (name pattern, low, high) keep those parameters inside bounds after the update (CLIP's logit
    scale, see clamp_params).
    """
    o = config.optim
    no_decay = [(pattern, True) for pattern in o.no_decay]
    name = o.get('name', 'adamw')
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optim.name '{name}'; valid: {', '.join(OPTIMIZERS)}")
    parts = []
    if o.clip_grad > 0:
        per_tensor = o.get('clip_mode', 'global') == 'per_tensor'
        parts.append(clip_per_tensor(o.clip_grad) if per_tensor else optax.clip_by_global_norm(o.clip_grad))
    # A function: multi_transform hands each group a partial tree. decay_vectors: absent from most configs.
    mask = lambda p: decay_mask(p, no_decay, o.get('decay_vectors', False))
    decay = weight_decay_schedule(config, total_steps)
    b1_schedule = beta1_schedule(config, total_steps)
    if b1_schedule is not None and name not in ('adamw', 'adam'):
        raise ConfigError(f"'optim.one_cycle_beta1' cycles Adam's beta1: set it to () for optim.name '{name}'")

    def core(shift: int) -> list[optax.GradientTransformation]:
        """The optimiser proper; `shift` offsets the step its schedules see (a group that starts late)."""
        lr = (lambda step: schedule(step + shift)) if shift else schedule
        wd = (lambda step: decay(step + shift)) if shift and callable(decay) else decay
        if name in ('adamw', 'adam') and b1_schedule is None:
            adam = optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps)
        elif name in ('adamw', 'adam'):  # OneCycleLR's momentum cycle; the bias correction uses the current beta1
            b1 = (lambda step: b1_schedule(step + shift)) if shift else b1_schedule
            adam = optax.inject_hyperparams(optax.scale_by_adam)(b1=b1, b2=o.b2, eps=o.eps)
        if name == 'adamw':
            return [
                adam,
                optax.add_decayed_weights(wd, mask=mask),
                optax.scale_by_learning_rate(lr),
            ]
        if name == 'adam':
            return [
                optax.add_decayed_weights(wd, mask=mask),
                adam,
                optax.scale_by_learning_rate(lr),
            ]
        if name == 'sgd':  # the lr scales the momentum buffer, as torch's (LARS's momentum trails the lr)
            return [
                optax.add_decayed_weights(wd, mask=mask),
                optax.trace(decay=o.momentum, nesterov=False),
                optax.scale_by_learning_rate(lr),
            ]
        return [
            optax.add_decayed_weights(wd, mask=mask),
            # Per leaf: a scanned layer stack would share one ratio over its layers (SimCLR's check_config refuses it).
            optax.masked(optax.scale_by_trust_ratio(trust_coefficient=o.trust_coefficient), mask),
            optax.scale_by_learning_rate(lr),
            optax.trace(decay=o.momentum, nesterov=False),
        ]

    freeze = [(pattern, round(epochs * steps_per_epoch)) for pattern, epochs in o.get('freeze_epochs', ())]
    freeze = [(pattern, steps) for pattern, steps in freeze if steps > 0]
    if freeze:
        # One optimiser per frozen group, with its own state, so its moments start when it thaws.
        groups = {'trained': optax.chain(*core(0))}
        for i, (_, steps) in enumerate(freeze):
            groups[f'frozen_{i}'] = frozen_for(optax.chain(*core(steps)), steps)
        rules = [(pattern, f'frozen_{i}') for i, (pattern, _) in enumerate(freeze)]
        labels = rules_lib.map_with_names(lambda n, _: rules_lib.first_match(rules, n, 'trained'), params)
        parts.append(optax.multi_transform(groups, labels))
    else:
        parts += core(0)  # flat, so runs without frozen groups keep their optimiser state layout
    lr_rules = [tuple(rule) for rule in o.lr_rules]
    if lr_rules:
        multipliers = lr_multipliers(params, lr_rules)
        parts.append(optax.GradientTransformation(
            lambda _: optax.EmptyState(),
            lambda updates, state, _=None: (jax.tree.map(lambda u, m: u * m, updates, multipliers), state),
        ))  # fmt: skip
    clamp = [tuple(rule) for rule in o.get('clamp', ())]
    if clamp:
        parts.append(clamp_params(clamp))
    return optax.chain(*parts)


def training_steps(config: ml_collections.ConfigDict, examples_per_epoch: int) -> tuple[int, int]:
    """(total steps, steps per epoch): config.train.steps if set, else epochs x examples // global batch."""
    steps_per_epoch = max(examples_per_epoch // config.input.global_batch, 1)
    if config.train.steps > 0:
        return int(config.train.steps), steps_per_epoch
    return math.ceil(config.optim.epochs * steps_per_epoch), steps_per_epoch


def global_norm(tree: Any) -> jax.Array:
    """The L2 norm of all leaves together, accumulated in float32."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))
