"""The one trainer: sharded initialisation, a pure jitted update step, checkpoints with exact resume, logging.

It knows nothing method-specific: the method module (jaxssl/methods/<name>.py, class Method) supplies data,
init, loss, extra-state update and representations (see jaxssl/methods/base.py).
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from jaxssl import checkpoint as checkpoint_lib
from jaxssl import metrics as metrics_lib
from jaxssl import optim, paths, sharding
from jaxssl.config import ConfigError, method_module
from jaxssl.methods import base


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. non-finite loss); the message says why and what was kept."""


def examples_per_step(config: ml_collections.ConfigDict) -> int:
    """Examples in one global step: clips x repeated-augmentation views."""
    return config.input.global_batch * config.input.get('num_sample', 1)


def check_batch(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
    """Fails before compiling when the global batch cannot be split over processes, devices and micro-batches."""
    examples, accum = examples_per_step(config), config.train.grad_accum
    devices = mesh.shape['data'] * mesh.shape['fsdp']
    if accum < 1 or examples % accum:
        raise ConfigError(
            f"'train.grad_accum' {accum} must divide the {examples} examples per step ('input.global_batch')"
        )
    if (examples // accum) % devices:
        raise ConfigError(
            f"'input.global_batch': {examples} examples per step / {accum} micro-batches is not divisible by "
            f'{devices} devices on the batch axes'
        )
    lookahead = config.train.get('lookahead_steps', 0)
    if not isinstance(lookahead, int) or lookahead < 0:
        raise ConfigError(f"bad value {lookahead!r} for 'train.lookahead_steps': must be an integer >= 0")
    if examples % jax.process_count():
        raise ConfigError(f"'input.global_batch' {examples} is not divisible by {jax.process_count()} processes")


def make_train_step(
    method: base.Method,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    accum: int,
    lookahead: int = 0,
):
    """The pure update: (state, batch) -> (state, metrics). A non-finite loss or gradient leaves the state as it
    was (the step counter still advances) and is counted, so a NaN never reaches the parameters or a checkpoint.

    `lookahead` K > 0 (FST, Du et al. 2022, usr922/FST semi_seg/train_semi.py): before the real update, K virtual
    updates on the same batch, each preceded by method.update_extra (an EMA teacher absorbs the virtual student),
    and one more update_extra after them; then the params are restored and the real update is taken with the
    teacher that has seen the student's future. As the reference, only the params and the lr / weight-decay
    schedules' positions are restored: the optimiser's buffers (momentum, Adam's moments and count) and the extra
    state (BatchNorm averages, the teacher) keep what the virtual updates did to them."""

    def grads_of(params, extra, batch, rng, step):
        (loss, (metrics, extra)), grads = jax.value_and_grad(method.loss, has_aux=True)(params, extra, batch, rng, step)
        return loss, metrics, extra, grads

    def gradients(params, extra, batch, rng, step):
        if accum == 1:
            return grads_of(params, extra, batch, rng, step)
        # Micro-batch j takes rows j, j + accum, ...: each device keeps its rows, no resharding.
        micro = jax.tree.map(lambda x: jnp.moveaxis(x.reshape(-1, accum, *x.shape[1:]), 1, 0), batch)

        def body(carry, inputs):
            mb, index = inputs
            loss, metrics, new_extra, grads = grads_of(params, carry[3], mb, jax.random.fold_in(rng, index), step)
            sums = jax.tree.map(jnp.add, carry[:3], (loss, metrics, grads))
            return (*sums, new_extra), None

        zeros = jax.eval_shape(lambda: grads_of(params, extra, jax.tree.map(lambda x: x[0], micro), rng, step))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (zeros[0], zeros[1], zeros[3]))
        (loss, metrics, grads, new_extra), _ = jax.lax.scan(body, (*zeros, extra), (micro, jnp.arange(accum)))
        loss, metrics, grads = jax.tree.map(lambda x: x / accum, (loss, metrics, grads))
        return loss, metrics, new_extra, grads

    def step_fn(state, batch):
        step, params, extra = state['step'], state['params'], state['extra']
        rng = jax.random.fold_in(jax.random.wrap_key_data(state['rng']), step)
        opt_state, virtual, virtual_finite = state['opt'], params, jnp.bool_(True)
        for k in range(lookahead):  # unrolled: K is small, and XLA:CPU runs convolution gradients slowly in loops
            extra = method.update_extra(virtual, extra, step)
            loss, _, extra, grads = gradients(virtual, extra, batch, jax.random.fold_in(rng, k + 1), step)
            # A virtual NaN would reach the teacher even when the real loss stays finite: it fails the step too.
            virtual_finite &= jnp.isfinite(loss) & jnp.isfinite(optim.global_norm(grads))
            updates, opt_state = optimizer.update(grads, opt_state, virtual)
            opt_state = optim.rewind_schedules(opt_state, state['opt'])  # every pass at this step's lr
            virtual = optax.apply_updates(virtual, updates)
        if lookahead:
            virtual_finite &= jnp.isfinite(optim.global_norm(virtual))
            extra = method.update_extra(virtual, extra, step)
        loss, metrics, new_extra, grads = gradients(params, extra, batch, rng, step)
        grad_norm = optim.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & virtual_finite
        updates, new_opt = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        new_extra = method.update_extra(new_params, new_extra, step)

        def keep_if_finite(new, old):
            return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

        new_state = dict(
            state,
            step=step + 1,
            params=keep_if_finite(new_params, params),
            opt=keep_if_finite(new_opt, state['opt']),
            extra=keep_if_finite(new_extra, state['extra']),
            nonfinite=state['nonfinite'] + (~finite).astype(jnp.int32),
            first_nonfinite=jnp.where((~finite) & (state['first_nonfinite'] < 0), step + 1, state['first_nonfinite']),
        )
        metrics = dict(
            metrics,
            loss=loss,
            grad_norm=grad_norm,
            param_norm=optim.global_norm(new_state['params']),
            lr=schedule(step),
            nonfinite=new_state['nonfinite'],
            first_nonfinite=new_state['first_nonfinite'],
        )
        return new_state, metrics

    return step_fn


class _StopSignal:
    """Records SIGTERM / SIGINT so the loop can finish its step, checkpoint and exit cleanly."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _agree(flag: bool) -> bool:
    """True on every process if it is true on any (so all processes stop at the same step)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


def state_layout(
    config: ml_collections.ConfigDict,
    method: base.Method,
    mesh: jax.sharding.Mesh,
    schedule: optax.Schedule,
    total_steps: int = 1,
    steps_per_epoch: int = 1,
) -> tuple[optax.GradientTransformation, Any, Any, Any]:
    """(optimiser, init_state(key), abstract state, shardings): the train state every run (and benchmark) uses.
    The run's length feeds the optimiser's step-indexed schedules (weight decay, parameters frozen for epochs)."""
    example = jax.tree.map(jnp.asarray, method.example_batch(1))
    abstract_params = jax.eval_shape(lambda k: method.init(k, example)[0], jax.random.key(0))
    optimizer = optim.make_optimizer(config, abstract_params, schedule, total_steps, steps_per_epoch)

    def init_state(key):
        params, extra = method.init(key, example)
        return dict(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt=optimizer.init(params),
            extra=extra,
            rng=jax.random.key_data(jax.random.fold_in(key, 1)),
            nonfinite=jnp.zeros((), jnp.int32),
            first_nonfinite=-jnp.ones((), jnp.int32),
        )

    rules = [tuple(rule) for rule in config.sharding.rules]
    abstract_state = jax.eval_shape(init_state, jax.random.key(config.seed))
    shardings = sharding.state_shardings(abstract_state, mesh, rules, config.sharding.min_size)
    return optimizer, init_state, abstract_state, shardings


def default_workdir(config_spec: str) -> str:
    stem = os.path.splitext(os.path.basename(config_spec.partition(':')[0]))[0]
    arg = config_spec.partition(':')[2].replace(',', '_').replace('=', '-').replace('/', '-')
    return os.path.join('runs', stem + (f'_{arg}' if arg else ''))


def train(config: ml_collections.ConfigDict, workdir: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Trains until config.train.steps (or epochs), resuming from workdir's latest checkpoint.

    Returns (summary, final train state). Steps are counted from 1: step N is the state after N updates.
    """
    is_main = jax.process_index() == 0
    writer = metrics_lib.MetricWriter(workdir, active=is_main, tensorboard=config.train.tensorboard)
    method = method_module(config).Method(config)
    mesh = sharding.make_mesh(config)
    method.use_mesh(mesh)
    check_batch(config, mesh)

    dataset, examples_per_epoch = method.dataset(config.seed, jax.process_index(), jax.process_count())
    data_iterator = iter(dataset)
    total_steps, steps_per_epoch = optim.training_steps(config, examples_per_epoch)
    schedule = optim.learning_rate_schedule(config, total_steps, steps_per_epoch)

    init_key = jax.random.key(config.seed)
    optimizer, init_state, abstract_state, shardings = state_layout(
        config, method, mesh, schedule, total_steps, steps_per_epoch
    )
    checkpointer = checkpoint_lib.Checkpointer(workdir, config.checkpoint.keep, config.checkpoint.async_save)
    latest = checkpointer.latest_step()
    if latest is not None:
        state = checkpointer.restore(
            latest, checkpoint_lib.abstract_with_shardings(abstract_state, shardings), data_iterator
        )
        writer.print(f'resumed from {checkpointer.directory} at step {latest}')
    else:
        state = jax.jit(init_state, out_shardings=shardings)(init_key)
        if config.init_from:
            state = _load_initial_params(config.init_from, state, shardings, writer, config.get('init_from_select'))
        state['extra'] = jax.device_put(method.prepare(state['params'], state['extra']), shardings['extra'])

    if is_main:
        metrics_lib.write_text(workdir, 'config.json', config.to_json_best_effort(indent=2))
    writer.print(f'resolved config (saved as {paths.join(workdir, "config.json")}):\n{config}')
    start_step = int(jax.device_get(state['step']))
    n_params = sum(int(x.size) for x in jax.tree.leaves(state['params']))
    writer.print(
        f'{config.method}: {n_params / 1e6:.2f}M params | mesh {dict(mesh.shape)} on {jax.device_count()} '
        f'{jax.devices()[0].platform} devices, {jax.process_count()} process(es) | {total_steps} steps of '
        f'{examples_per_step(config)} examples | workdir {workdir}'
    )

    step_fn = jax.jit(
        make_train_step(method, optimizer, schedule, config.train.grad_accum, config.train.get('lookahead_steps', 0)),
        donate_argnums=(0,),
        out_shardings=(shardings, None),
    )
    flops = method.flops_per_example()
    peak = metrics_lib.peak_flops(jax.devices()[0].device_kind)
    examples = examples_per_step(config)
    pending: list[Any] = []
    last_metrics: dict[str, float] = {}
    last_eval: dict[str, float] = {}
    step, stopped_by, compile_seconds = start_step, None, None
    run_start = last_log_time = time.perf_counter()
    last_log_step = step

    with _StopSignal() as stop:
        while step < total_steps:
            batch = sharding.global_batch(next(data_iterator), mesh)
            state, metrics = step_fn(state, batch)
            step += 1
            pending.append(metrics)
            if compile_seconds is None:
                jax.block_until_ready(metrics)
                compile_seconds = time.perf_counter() - run_start
                last_log_time, last_log_step = time.perf_counter(), step
            if step == config.debug.sigterm_at_step:
                os.kill(os.getpid(), signal.SIGTERM)

            log_now = step % config.train.log_every == 0 or step == total_steps
            save_now = step % config.checkpoint.every == 0 or step == total_steps
            check_stop = jax.process_count() == 1 or step % config.train.preemption_check_every == 0
            stop_now = check_stop and _agree(stop.received is not None)
            if log_now or save_now or stop_now:
                fetched = jax.device_get(pending)
                pending = []
                last = fetched[-1]
                bad = int(last['nonfinite'])
                if bad and config.train.nonfinite == 'stop':
                    kept = checkpointer.latest_step()
                    raise TrainingError(
                        f'non-finite loss or gradient at step {int(last["first_nonfinite"])} ({bad} step(s) so far); '
                        f'the update was not applied and no checkpoint was written after it; last good checkpoint: '
                        f'{"step " + str(kept) if kept is not None else "none"}. Lower optim.base_lr, set '
                        f"optim.clip_grad, or set train.nonfinite='skip' to skip such steps."
                    )
                if log_now:
                    now = time.perf_counter()
                    # The first step's time is mostly compilation: it is reported apart, not as throughput.
                    seconds_per_step = (now - last_log_time) / (step - last_log_step) if step > last_log_step else None
                    last_log_time, last_log_step = now, step
                    last_metrics = _log(
                        writer, fetched, step, total_steps, seconds_per_step, examples, flops, peak, method
                    )
            if save_now or stop_now:  # before evaluating, so a failing evaluation never costs the checkpoint
                checkpointer.save(step, state, data_iterator, force=True)
            eval_every = config.eval.every
            if (eval_every and step % eval_every == 0) or (step == total_steps and config.eval.at_end):
                last_eval = _evaluate(method, state, mesh, writer, step, workdir)
            if step == config.debug.sigkill_at_step:
                checkpointer.wait()
                os.kill(os.getpid(), signal.SIGKILL)
            if stop_now:
                stopped_by = signal.Signals(stop.received).name if stop.received else 'another process'
                writer.print(f'stopping at step {step} on {stopped_by}: checkpoint saved')
                break

    checkpointer.close()
    elapsed = time.perf_counter() - run_start
    summary = dict(
        steps_done=step - start_step,
        final_step=step,
        total_steps=total_steps,
        seconds=elapsed,
        compile_seconds=compile_seconds or 0.0,
        stopped_by=stopped_by,
        nonfinite_steps=int(jax.device_get(state['nonfinite'])),
        checkpoint_dir=checkpointer.directory,
        **{f'final_{k}': v for k, v in last_metrics.items()},
        **{f'final_eval/{k}': v for k, v in last_eval.items()},
    )
    if is_main:
        metrics_lib.write_text(workdir, 'summary.json', json.dumps(summary, indent=2))
    if start_step >= total_steps:
        writer.print(f'already trained to step {start_step} of {total_steps}: nothing to do (use a new --workdir)')
    writer.print(
        f'done: {summary["steps_done"]} steps in {metrics_lib.format_duration(elapsed)} '
        f'(first step incl. compile {summary["compile_seconds"]:.1f}s); final loss '
        f'{last_metrics.get("loss", float("nan")):.4f}; non-finite steps {summary["nonfinite_steps"]}; '
        f'checkpoints in {checkpointer.directory}'
    )
    writer.close()
    return summary, state


def _log(writer, fetched, step, total_steps, seconds_per_step, examples, flops, peak, method) -> dict[str, float]:
    means = {
        k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1] if k not in ('nonfinite', 'first_nonfinite')
    }
    means['lr'] = float(fetched[-1]['lr'])
    means['nonfinite_steps'] = float(fetched[-1]['nonfinite'])
    speed = ''
    if seconds_per_step:
        means['seconds_per_step'] = seconds_per_step
        means['examples_per_second'] = examples / seconds_per_step
        tokens = method.tokens_per_example()
        if tokens:
            means['tokens_per_second'] = tokens * means['examples_per_second']
        if flops and peak:
            means['mfu'] = flops * means['examples_per_second'] / (peak * jax.device_count())
        eta = metrics_lib.format_duration(seconds_per_step * (total_steps - step))
        mfu = f' | MFU {means["mfu"]:.1%}' if 'mfu' in means else ''
        speed = f' | {means["examples_per_second"]:.1f} ex/s | {seconds_per_step:.3f} s/step{mfu} | ETA {eta}'
    means.update(method.host_metrics())
    writer.write(step, means)
    writer.print(
        f'step {step}/{total_steps} | loss {means["loss"]:.4f} | lr {means["lr"]:.2e} | '
        f'grad {means["grad_norm"]:.3f}{speed}'
    )
    return means


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, step: int | None = None) -> dict[str, float]:
    """Restores a run's params (latest or `step`) onto this machine's mesh and runs its evaluation and pictures."""
    method, mesh, restored, step = restore_checkpoint(config, workdir, step)
    writer = metrics_lib.MetricWriter(workdir, active=jax.process_index() == 0, tensorboard=config.train.tensorboard)
    results = _evaluate(method, restored, mesh, writer, step, workdir)
    writer.close()
    if jax.process_index() == 0:
        metrics_lib.write_text(workdir, f'eval_{step}.json', json.dumps(results, indent=2, sort_keys=True))
    return results


def restore_checkpoint(
    config: ml_collections.ConfigDict, workdir: str, step: int | None = None
) -> tuple[base.Method, jax.sharding.Mesh, dict[str, Any], int]:
    """(method, mesh, {'params', 'extra'} of a run's checkpoint (latest or `step`) on this machine's mesh, step):
    for evaluation and for tools that read a trained model (jaxssl.pseudo_labels)."""
    method = method_module(config).Method(config)
    mesh = sharding.make_mesh(config)
    method.use_mesh(mesh)
    checkpointer = checkpoint_lib.Checkpointer(workdir, config.checkpoint.keep, async_save=False)
    step = checkpointer.latest_step() if step is None else step
    if step is None:
        raise ConfigError(f"no checkpoint in '{checkpointer.directory}'")
    example = jax.tree.map(jnp.asarray, method.example_batch(1))
    abstract = jax.eval_shape(
        lambda k: dict(zip(('params', 'extra'), method.init(k, example), strict=True)), jax.random.key(0)
    )
    shardings = sharding.state_shardings(
        abstract, mesh, [tuple(r) for r in config.sharding.rules], config.sharding.min_size
    )
    restored = checkpointer.restore_subset(step, checkpoint_lib.abstract_with_shardings(abstract, shardings))
    checkpointer.close()
    return method, mesh, restored, step


def _evaluate(
    method: base.Method, state: dict, mesh: jax.sharding.Mesh, writer: metrics_lib.MetricWriter, step: int, workdir: str
) -> dict[str, float]:
    """Runs the method's evaluation (all processes) and writes its metrics and pictures (process 0)."""
    start = time.perf_counter()
    results = method.evaluate(state['params'], state['extra'], mesh)
    if results:
        writer.write(step, {f'eval/{k}': v for k, v in results.items()})
        shown = ', '.join(f'{k} {v:.3f}' for k, v in sorted(results.items()))
        writer.print(f'eval at step {step} ({time.perf_counter() - start:.1f}s): {shown}')
    if jax.process_index() == 0:
        pictures = method.visualize(state['params'], state['extra'])
        if pictures:
            from jaxssl.evaluate import reconstruction

            folder = paths.join(workdir, 'pictures')
            paths.resolve(folder).mkdir(parents=True, exist_ok=True)
            for name, image in pictures.items():
                if image.ndim == 4:
                    reconstruction.save_gif(image, paths.join(folder, f'{name}_{step:07d}.gif'))
                else:
                    reconstruction.save_png(image, paths.join(folder, f'{name}_{step:07d}.png'))
                    writer.write_image(step, name, image)
            writer.print(f'pictures at step {step} in {folder}')
    return results


def _load_initial_params(
    path: str, state: dict, shardings: dict, writer: metrics_lib.MetricWriter, select: tuple[str, ...] | None = None
) -> dict:
    """Starts from converted or pretrained params (`init_from`: a params directory or a training workdir, whose
    latest checkpoint's params are taken), keeping the optimiser's fresh state. Only the params whose names match an
    `init_from_select` regex are taken (default '.*': all, and the stored params must fit exactly); the others keep
    their fresh initialisation."""
    from flax import traverse_util

    from jaxssl import params_io

    select = tuple(select or ('.*',))
    target = checkpoint_lib.abstract_with_shardings(jax.eval_shape(lambda: state['params']), shardings['params'])
    try:
        loaded, metadata, notes = params_io.load_selected(path, target, select)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"'init_from' {path}: {e}".replace('\n', ' ')) from None
    flat = traverse_util.flatten_dict(state['params'], sep='/')
    fresh = sorted(name for name in flat if name not in loaded)
    flat.update(loaded)
    fresh_text = ', '.join(fresh[:6]) + (f', ... ({len(fresh) - 6} more)' if len(fresh) > 6 else '')
    writer.print(
        f'initialised {len(loaded)} of {len(flat)} params from {path} ({metadata.get("source", "jaxssl params")})'
        + (f'; fresh: {fresh_text}' if fresh else '')
        + ''.join(f'; {note}' for note in notes)
    )
    return dict(state, params=traverse_util.unflatten_dict(flat, sep='/'))
