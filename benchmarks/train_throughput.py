"""Training-step throughput and MFU of jaxssl's VideoMAE V2, side by side with transformers' PyTorch VideoMAE.

Measures jaxssl's FULL train step: the trainer's own `jaxssl.train.make_train_step` with the real optimiser
(`jaxssl.optim`), jitted with donation, state sharded on the ('data', 'fsdp') mesh of `jaxssl.sharding`, on one
fixed batch (the input pipeline is not part of it: benchmarks/input_throughput.py measures that). Per run:
steps/s, clips/s (clips = examples = views), analytic model FLOPs per step (Method.flops_per_example x global batch:
encoder on visible tokens, decoder on its tokens, x3 for forward + backward), MFU against the device's dense bf16
peak (jaxssl.metrics.peak_flops) and against a large matmul measured in the same run, peak device memory, compile
time and time to first step. Times are medians of N steps after warm-up, each step ended by block_until_ready.

The PyTorch baseline is transformers' VideoMAEForPreTraining (VideoMAE v1: decoder on every masked token), random
init at the variant's sizes, AdamW step included, SDPA attention, bf16 autocast when the compute dtype is bf16,
torch.compile with --torch-compile. It gets the same clips and the same tube masks as jaxssl in v1 mode
(decoder_ratio 0); jaxssl then runs in V2 mode (running-cell decoder masking). Ratios compare clips/s per device.

Usage:
  python benchmarks/train_throughput.py                          # S, B, L at 16x224x224 (a GPU)
  python benchmarks/train_throughput.py --variants B,L --torch --torch-compile --out results.json
  python benchmarks/train_throughput.py --variants g --batch 6    # H and g default to remat
  python benchmarks/train_throughput.py --tiny --torch            # CPU: micro/8, 8 frames x 32 px
  python benchmarks/train_throughput.py --tiny --levers --cpu-devices 2   # one-table lever sweep
Runs are isolated in subprocesses (--isolate, default on when an NVIDIA GPU is present) so that each run's peak
memory is its own and an out-of-memory run is recorded instead of ending the benchmark.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

CONFIG_FILE = os.path.join(REPO, 'configs', 'videomae_v2.py')
# Per-device batch (clips) by size when --batch is not given.
DEFAULT_BATCH = {'micro': 4, 'tiny': 8, 'S': 64, 'B': 64, 'L': 32, 'H': 16, 'g': 6}
TINY = dict(variants='micro/8', frames=8, image_size=32)
RESULT_TAG = '@@RESULT '
GiB = 2**30


# --------------------------------------------------------------------------------------------------------------
# Run specifications
# --------------------------------------------------------------------------------------------------------------


def size_of(variant: str) -> str:
    return variant.partition('/')[0]


def base_spec(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    """The settings one jaxssl or torch run takes, from the command line."""
    return dict(
        variant=variant,
        frames=args.frames,
        image_size=args.image_size,
        batch_per_device=args.batch or DEFAULT_BATCH.get(size_of(variant), 8),
        encoder_ratio=args.encoder_ratio,
        decoder_ratio=args.decoder_ratio,
        dtype=args.dtype,
        attention=args.attention,
        patch_embed=args.patch_embed,
        split_qkv=args.split_qkv,
        approximate_gelu=args.approximate_gelu,
        recompute_gelu=args.recompute_gelu,
        remat=args.remat,
        scan=args.scan,
        mesh=args.mesh,
        devices=args.devices,
        donate=args.donate,
        steps=args.steps,
        warmup=args.warmup,
        xla_flags='',
        cpu_threads=args.cpu_threads,
        profile=args.profile,
        profile_dir=args.profile_dir,
    )


def resolve_dtype(dtype: str, accelerator: bool) -> str:
    if dtype != 'auto':
        return dtype
    return 'bfloat16' if accelerator else 'float32'


def jaxssl_config(spec: dict[str, Any], device_count: int):
    """The locked jaxssl config of a run: configs/videomae_v2.py with the run's shapes, masks and levers."""
    from configs.videomae_v2 import RECIPES
    from jaxssl.config import load_config

    devices = spec['devices'] or device_count
    data, fsdp = (devices, 1) if spec['mesh'] == 'dp' else (1, devices)
    overrides = {
        'model.variant': spec['variant'],
        'input.frames': spec['frames'],
        'input.image_size': spec['image_size'],
        'input.num_sample': 1,  # the benchmark's examples are clips
        'input.global_batch': spec['batch_per_device'] * devices,
        'input.dataset': 'moving_digits',  # never read: the benchmark feeds one fixed batch
        'input.num_workers': 0,
        'masking.encoder_ratio': spec['encoder_ratio'],
        'masking.decoder_ratio': spec['decoder_ratio'],
        'model.dtype': spec['dtype'],
        'mesh.data': data,
        'mesh.fsdp': fsdp,
        'optim.warmup_steps': 10,
        'train.steps': 1000,
    }
    if spec['remat'] != 'auto':
        overrides['model.remat'] = spec['remat'] == 'on'
    else:
        overrides['model.remat'] = RECIPES.get(size_of(spec['variant']), RECIPES['B'])['remat']
    if spec['scan'] != 'auto':
        overrides['model.scan_layers'] = spec['scan'] in ('on', 'unrolled')
        overrides['model.scan_unroll'] = 0 if spec['scan'] == 'unrolled' else 1
    if spec['attention'] != 'auto':
        overrides['model.attention_impl'] = spec['attention']
    if spec.get('patch_embed', 'auto') != 'auto':
        overrides['model.patch_embed_impl'] = spec['patch_embed']
    for key in ('split_qkv', 'approximate_gelu', 'recompute_gelu'):
        overrides[f'model.{key}'] = bool(spec.get(key, False))
    text = [f'{k}={str(v).lower() if isinstance(v, bool) else v}' for k, v in overrides.items()]
    return load_config(f'{CONFIG_FILE}:variant={spec["variant"]}', text)


# --------------------------------------------------------------------------------------------------------------
# Measurements (each runs in this process or in a child process)
# --------------------------------------------------------------------------------------------------------------


def _timings(times: list[float]) -> dict[str, Any]:
    return dict(step_time_median_s=statistics.median(times), step_time_min_s=min(times), step_times_s=times)


def measure_matmul(size: int, dtype: str, repeats: int = 10) -> dict[str, Any]:
    """Peak FLOP/s of one large square matmul on device 0 (the achievable peak to compare MFU against)."""
    import jax
    import jax.numpy as jnp

    accelerator = jax.default_backend() != 'cpu'
    dtype = resolve_dtype(dtype, accelerator)
    size = size or (8192 if accelerator else 1024)
    device = jax.devices()[0]
    keys = jax.random.split(jax.random.key(0), 2)
    a, b = (jax.device_put(jax.random.normal(k, (size, size), dtype=getattr(jnp, dtype)), device) for k in keys)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return dict(size=size, dtype=dtype, seconds=seconds, flops_per_s=2 * size**3 / seconds, **device_info())


def device_info() -> dict[str, Any]:
    import jax

    from jaxssl import metrics

    device = jax.devices()[0]
    return dict(
        platform=device.platform,
        device_kind=device.device_kind,
        device_count=jax.device_count(),
        jax_version=jax.__version__,
        spec_peak_flops=metrics.peak_flops(device.device_kind),
    )


def _memory_stats_peak(devices) -> int | None:
    peaks = []
    for device in devices:
        try:
            stats = device.memory_stats()
        except Exception:  # some backends raise instead of returning None
            stats = None
        if stats and 'peak_bytes_in_use' in stats:
            peaks.append(int(stats['peak_bytes_in_use']))
    return max(peaks) if peaks else None


class JaxRun:
    """jaxssl's real train step (trainer step function + optimiser, state on the mesh): built, compiled, warmed up.

    `time_steps(n)` times n more steps; `result()` gives the record. Several runs can be timed in interleaved rounds.
    """

    def __init__(self, spec: dict[str, Any]):
        import jax

        from jaxssl import optim, sharding, train
        from jaxssl.config import method_module

        self.spec = spec = dict(spec, dtype=resolve_dtype(spec['dtype'], jax.default_backend() != 'cpu'))
        config = self.config = jaxssl_config(spec, jax.device_count())
        method = self.method = method_module(config).Method(config)
        mesh = self.mesh = sharding.make_mesh(config)
        train.check_batch(config, mesh)
        schedule = optim.learning_rate_schedule(config, config.train.steps, 100)
        init_key = jax.random.key(config.seed)
        optimizer, init_state, _, shardings = train.state_layout(config, method, mesh, schedule)
        start = time.perf_counter()
        self.state = jax.block_until_ready(jax.jit(init_state, out_shardings=shardings)(init_key))
        self.init_s = time.perf_counter() - start
        self.batch = sharding.global_batch(method.example_batch(config.input.global_batch), mesh)

        step_fn = jax.jit(
            train.make_train_step(method, optimizer, schedule, config.train.grad_accum),
            donate_argnums=(0,) if spec['donate'] else (),
            out_shardings=(shardings, None),
        )
        start = time.perf_counter()
        self.compiled = step_fn.lower(self.state, self.batch).compile()
        self.compile_s = time.perf_counter() - start
        self.first_loss = float(self._step()['loss'])  # blocks
        self.first_step_s = time.perf_counter() - start
        for _ in range(spec['warmup']):
            self._step()
        jax.block_until_ready(self.state)
        self.times: list[float] = []

    def _step(self):
        self.state, self.metrics = self.compiled(self.state, self.batch)
        return self.metrics

    def time_steps(self, count: int) -> None:
        import jax

        for _ in range(count):
            start = time.perf_counter()
            jax.block_until_ready(self._step())
            self.times.append(time.perf_counter() - start)

    def _profile(self, steps: int) -> dict[str, Any] | None:
        """Device time by kind of work over `steps` more steps, from a JAX profiler trace (jaxssl.profiling)."""
        import jax

        from jaxssl import profiling

        if steps <= 0:
            return None
        with tempfile.TemporaryDirectory() as log_dir:
            with profiling.trace(log_dir):
                for _ in range(steps):
                    self._step()
                jax.block_until_ready((self.state, self.metrics))
            if self.spec.get('profile_dir'):  # keep the raw trace for offline reading (Perfetto, profiling.py)
                os.makedirs(self.spec['profile_dir'], exist_ok=True)
                trace = max(glob.glob(os.path.join(log_dir, '**', '*.trace.json.gz'), recursive=True))
                name = re.sub(r'[^A-Za-z0-9._-]+', '_', self.spec.get('label', 'run'))
                shutil.copy(trace, os.path.join(self.spec['profile_dir'], f'{name}.trace.json.gz'))
            return profiling.summarize(log_dir, steps)

    def result(self) -> dict[str, Any]:
        import jax

        steps = self.spec['steps']
        start = time.perf_counter()  # steps dispatched back to back, as the trainer runs them
        for _ in range(steps):
            self._step()
        jax.block_until_ready((self.state, self.metrics))
        pipelined_s = (time.perf_counter() - start) / steps
        profile = self._profile(self.spec.get('profile', 0))
        memory = self.compiled.memory_analysis()
        compiled_bytes = None
        if memory is not None:
            parts = ('argument_size_in_bytes', 'output_size_in_bytes', 'temp_size_in_bytes')
            compiled_bytes = sum(int(getattr(memory, p)) for p in parts) - int(memory.alias_size_in_bytes)
        config, spec = self.config, self.spec
        flops_per_example = self.method.flops_per_example()
        global_batch = config.input.global_batch
        return dict(
            spec,
            framework='jaxssl',
            mode='v1' if spec['decoder_ratio'] == 0 else 'v2',
            devices=int(self.mesh.devices.size),
            mesh_shape=dict(self.mesh.shape),
            remat=bool(config.model.remat),
            scan=bool(config.model.scan_layers),
            attention=config.model.attention_impl or 'auto',
            global_batch=global_batch,
            params=sum(int(x.size) for x in jax.tree.leaves(self.state['params'])),
            flops_per_example=flops_per_example,
            flops_per_step=flops_per_example * global_batch,
            init_s=self.init_s,
            compile_s=self.compile_s,
            first_step_s=self.first_step_s,
            step_time_pipelined_s=pipelined_s,
            **_timings(self.times),
            peak_memory_bytes=_memory_stats_peak(self.mesh.devices.flat),
            compiled_memory_bytes=compiled_bytes,
            profile=profile,
            loss_first=self.first_loss,
            loss_last=float(self.metrics['loss']),
            nonfinite_steps=int(self.metrics['nonfinite']),
            **device_info(),
        )


def _torch_config(spec: dict[str, Any]):
    import transformers

    from jaxssl.models.videomae import decode_variant

    size = decode_variant(spec['variant'])
    return transformers.VideoMAEConfig(
        image_size=spec['image_size'],
        patch_size=size['patch'],
        num_frames=spec['frames'],
        tubelet_size=2,
        hidden_size=size['width'],
        num_hidden_layers=size['depth'],
        num_attention_heads=size['heads'],
        intermediate_size=size['mlp_hidden'],
        decoder_hidden_size=size['dec_width'],
        decoder_num_hidden_layers=size['dec_depth'],
        decoder_num_attention_heads=size['dec_heads'],
        decoder_intermediate_size=size['dec_mlp_hidden'],
        layer_norm_eps=1e-6,
        use_mean_pooling=False,
        norm_pix_loss=True,
        attn_implementation=spec.get('torch_attention', 'sdpa'),
    )


class TorchRun:
    """transformers' VideoMAEForPreTraining (v1) train step with AdamW, on the clips and masks of jaxssl's v1 run."""

    def __init__(self, spec: dict[str, Any]):
        import numpy as np
        import torch
        import transformers

        from jaxssl.config import method_module

        self.cuda = cuda = torch.cuda.is_available()
        self.threads = torch.get_num_threads()
        if spec.get('cpu_threads') and not cuda:
            torch.set_num_threads(spec['cpu_threads'])  # restored by result()
        device = torch.device('cuda' if cuda else 'cpu')
        # patch_embed 'conv' makes the FLOP count the reference's: transformers embeds every token, jaxssl (matmul)
        # only the visible ones.
        spec = dict(spec, decoder_ratio=0.0, devices=1, mesh='dp', dtype=resolve_dtype(spec['dtype'], cuda))
        spec['patch_embed'] = 'conv'
        self.spec = spec
        config = jaxssl_config(spec, 1)
        self.method = method_module(config).Method(config)  # no device work: for the batch and the FLOP count
        self.global_batch = global_batch = config.input.global_batch
        batch = self.method.example_batch(global_batch)  # the same clips and masks as jaxssl's v1 run
        encoder_mask = np.ones((global_batch, int(np.prod(self.method.grid))), bool)
        np.put_along_axis(encoder_mask, batch['visible_idx'], False, axis=1)  # True = hidden from the encoder

        torch.manual_seed(0)
        model = self.model = transformers.VideoMAEForPreTraining(_torch_config(spec)).to(device).train()
        self.remat = bool(config.model.remat)
        if self.remat:
            model.gradient_checkpointing_enable()
        decays = {n: p.ndim > 1 and 'mask_token' not in n for n, p in model.named_parameters()}
        groups = [
            dict(params=[p for n, p in model.named_parameters() if decays[n]], weight_decay=0.05),
            dict(params=[p for n, p in model.named_parameters() if not decays[n]], weight_decay=0.0),
        ]
        lr = config.optim.base_lr * global_batch / 256
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=cuda)
        mode = spec.get('torch_compile_mode') or None
        self.forward = torch.compile(model, mode=mode) if spec.get('torch_compile') else model
        self.pixel_values = torch.from_numpy(batch['video']).permute(0, 1, 4, 2, 3).contiguous().to(device)
        self.mask = torch.from_numpy(encoder_mask).to(device)
        self.autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=spec['dtype'] == 'bfloat16')
        self.sync = torch.cuda.synchronize if cuda else (lambda: None)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        self.sync()
        start = time.perf_counter()
        self.first_loss = float(self._step())
        self.sync()
        self.first_step_s = time.perf_counter() - start
        for _ in range(spec['warmup']):
            self._step()
        self.sync()
        self.times: list[float] = []

    def _step(self):
        import torch

        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(**self.autocast):
            loss = self.forward(self.pixel_values, bool_masked_pos=self.mask).loss
        loss.backward()
        self.optimizer.step()
        self.loss = loss.detach()
        return self.loss

    def time_steps(self, count: int) -> None:
        for _ in range(count):
            start = time.perf_counter()
            self._step()
            self.sync()
            self.times.append(time.perf_counter() - start)

    def result(self) -> dict[str, Any]:
        import torch
        import transformers

        flops_per_example = self.method.flops_per_example()
        threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        return dict(
            self.spec,
            framework='torch',
            mode='v1',
            remat=self.remat,
            scan=False,
            attention=self.model.config._attn_implementation,
            global_batch=self.global_batch,
            params=sum(p.numel() for p in self.model.parameters()),
            flops_per_example=flops_per_example,
            flops_per_step=flops_per_example * self.global_batch,
            compile_s=None,
            first_step_s=self.first_step_s,
            **_timings(self.times),
            peak_memory_bytes=int(torch.cuda.max_memory_allocated()) if self.cuda else None,
            loss_first=self.first_loss,
            loss_last=float(self.loss),
            torch_version=torch.__version__,
            transformers_version=transformers.__version__,
            torch_device=torch.cuda.get_device_name() if self.cuda else 'cpu',
            torch_threads=threads,
        )


RUNNERS = {'jaxssl': JaxRun, 'torch': TorchRun}


def _error(kind: str, spec: dict[str, Any], message: str) -> dict[str, Any]:
    return dict(spec, framework=kind, error=message.strip().splitlines()[0][:300] if message.strip() else 'failed')


def measure(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement in this process: the matmul peak, or a run built, timed for spec['steps'] steps."""
    if kind == 'matmul':
        return measure_matmul(spec['size'], spec['dtype'])
    run = RUNNERS[kind](spec)
    run.time_steps(spec['steps'])
    return run.result()


def measure_group(todo: list[tuple[str, dict[str, Any]]], isolate: bool, rounds: int, timeout: float) -> list:
    """Measures (kind, spec) runs: each in a child process (isolate), or all in this process, timed in `rounds`
    interleaved rounds (run A's steps, B's, C's, then A's again ...) so a changing machine load hits all alike."""
    if isolate:
        return [run_isolated(kind, spec, timeout) for kind, spec in todo]
    built: list[Any] = []
    for kind, spec in todo:
        print(f'... {kind} {spec.get("label", "")}', file=sys.stderr, flush=True)
        if spec.get('xla_flags'):
            built.append(_error(kind, spec, 'XLA flags need a fresh process: use --isolate on'))
            continue
        try:
            built.append(RUNNERS[kind](spec))
        except Exception as e:  # an unsupported lever or an out-of-memory run is a result, not the end
            traceback.print_exc()
            built.append(_error(kind, spec, f'{type(e).__name__}: {e}'))
    for round_index in range(rounds):
        for run in built:
            if not isinstance(run, dict):
                steps = run.spec['steps']
                run.time_steps(steps // rounds + (1 if round_index < steps % rounds else 0))
    results = []
    for run in built:
        results.append(run if isinstance(run, dict) else run.result())
        del run
    return results


def run_isolated(kind: str, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One measurement in a fresh child process; a failure (e.g. out of memory) is returned as {'error': ...}."""
    print(f'... {kind} {spec.get("label", "")} (child process)', file=sys.stderr, flush=True)
    env = dict(os.environ)
    if kind == 'torch':
        env['JAX_PLATFORMS'] = 'cpu'  # jaxssl builds the batch there: keep JAX off the GPU PyTorch measures
    if spec.get('xla_flags'):
        env['XLA_FLAGS'] = f'{env.get("XLA_FLAGS", "")} {spec["xla_flags"]}'.strip()
    command = [sys.executable, os.path.abspath(__file__), '--_child', json.dumps(dict(spec, kind=kind))]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return _error(kind, spec, f'timed out after {timeout:.0f}s')
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            run = json.loads(line[len(RESULT_TAG) :])
            if 'step_time_median_s' in run:  # shown at once: a long sweep cut off by a time limit keeps its rows
                print(
                    f'    step {1e3 * run["step_time_median_s"]:.1f} ms, compile {run.get("compile_s") or 0:.1f} s, '
                    f'peak {(run.get("peak_memory_bytes") or 0) / GiB:.3g} GiB',
                    file=sys.stderr,
                    flush=True,
                )
            return run
    tail = (done.stderr or done.stdout).strip().splitlines()[-12:]
    print('\n'.join(tail), file=sys.stderr)
    error = next((line for line in reversed(tail) if 'Error' in line), tail[-1] if tail else '')
    return _error(kind, spec, f'exit {done.returncode}: {error.strip()}')


def _child(payload: str) -> None:
    spec = json.loads(payload)
    kind = spec.pop('kind')
    print(RESULT_TAG + json.dumps(measure(kind, spec)), flush=True)


# --------------------------------------------------------------------------------------------------------------
# Derived figures, table, sweep
# --------------------------------------------------------------------------------------------------------------


def add_rates(run: dict[str, Any], spec_peak: float | None, matmul_peak: float | None) -> dict[str, Any]:
    if 'error' in run:
        return run
    seconds = run['step_time_median_s']
    devices = run.get('devices', 1)
    run['steps_per_s'] = 1.0 / seconds
    run['clips_per_s'] = run['global_batch'] / seconds
    run['clips_per_s_per_device'] = run['clips_per_s'] / devices
    run['model_flops_per_s'] = run['flops_per_step'] / seconds
    run['mfu_spec'] = run['model_flops_per_s'] / (spec_peak * devices) if spec_peak else None
    run['mfu_measured_peak'] = run['model_flops_per_s'] / (matmul_peak * devices) if matmul_peak else None
    return run


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return '-'
    if kind == 'pct':
        return f'{100 * value:.1f}%'
    if kind == 'gib':
        return f'{value / GiB:.3g}'
    if kind == 'ms':
        return f'{1e3 * value:.1f}'
    if kind == 's':
        return f'{value:.2f}'
    if kind == 'g':
        return f'{value / 1e9:.3g}'
    if isinstance(value, float):
        return f'{value:.0f}' if abs(value) >= 1000 else f'{value:.3g}'
    return str(value)


COLUMNS = (
    ('run', 'label', 'str'),
    ('batch/dev', 'batch_per_device', 'str'),
    ('dtype', 'dtype', 'str'),
    ('step ms', 'step_time_median_s', 'ms'),
    ('steps/s', 'steps_per_s', 'num'),
    ('clips/s', 'clips_per_s', 'num'),
    ('GFLOP/step', 'flops_per_step', 'g'),
    ('MFU spec', 'mfu_spec', 'pct'),
    ('MFU matmul', 'mfu_measured_peak', 'pct'),
    ('compile s', 'compile_s', 's'),
    ('1st step s', 'first_step_s', 's'),
    ('peak GiB', 'peak_memory_bytes', 'gib'),
    ('XLA est GiB', 'compiled_memory_bytes', 'gib'),
)


def table(runs: list[dict[str, Any]], extra: tuple = ()) -> str:
    columns = COLUMNS + tuple(extra)
    rows = [[name for name, _, _ in columns]]
    for run in runs:
        if 'error' in run:
            rows.append([run.get('label', '?'), *(['-'] * (len(columns) - 2)), 'ERROR ' + run['error'][:80]])
            continue
        rows.append([_fmt(run.get(key), kind) for _, key, kind in columns])
    width = max(len(r) for r in rows)
    rows = [r + [''] * (width - len(r)) for r in rows]
    sizes = [max(len(r[i]) for r in rows) for i in range(width)]
    lines = [' | '.join(c.ljust(s) for c, s in zip(r, sizes, strict=True)).rstrip() for r in rows]
    lines.insert(1, '-+-'.join('-' * s for s in sizes))
    return '\n'.join(lines)


def ratios(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant: jaxssl v1 / torch and V2 / v1 (and V2 / torch), on clips/s per device."""
    out = []
    for variant in dict.fromkeys(r['variant'] for r in runs):
        rate = {}
        for r in runs:
            if r['variant'] == variant and 'error' not in r and r.get('role'):
                rate[r['role']] = r['clips_per_s_per_device']
        row = dict(variant=variant)
        for name, (num, den) in {
            'jaxssl_v1/torch': ('jaxssl_v1', 'torch'),
            'jaxssl_v2/jaxssl_v1': ('jaxssl_v2', 'jaxssl_v1'),
            'jaxssl_v2/torch': ('jaxssl_v2', 'torch'),
        }.items():
            if num in rate and den in rate:
                row[name] = rate[num] / rate[den]
        out.append(row)
    return out


def lever_specs(args: argparse.Namespace, base: dict[str, Any], platform_name: str, device_count: int) -> list:
    """The sweep: (name, spec) pairs, each changing one lever of the V2-mode run `base`."""
    flip = lambda value: 'off' if value == 'on' else 'on'
    default_remat = 'on' if size_of(base['variant']) in ('H', 'g') else 'off'
    remat = base['remat'] if base['remat'] != 'auto' else default_remat
    scan = base['scan'] if base['scan'] != 'auto' else 'unrolled'  # the config's default
    gpu = platform_name == 'gpu'
    flip_embed = {'auto': 'conv', 'conv': 'matmul', 'matmul': 'conv'}  # the config's default is matmul
    levers = [
        ('baseline', {}),
        ('attention=xla', dict(attention='xla')),
        ('attention=cudnn', dict(attention='cudnn')) if gpu else ('attention=cudnn', None),
        ('patch_embed=' + flip_embed[base['patch_embed']], dict(patch_embed=flip_embed[base['patch_embed']])),
        ('qkv=' + ('fused' if base['split_qkv'] else 'split'), dict(split_qkv=not base['split_qkv'])),
        (
            'gelu=' + ('erf' if base['approximate_gelu'] else 'tanh'),
            dict(approximate_gelu=not base['approximate_gelu']),
        ),
        (
            'gelu=' + ('stored' if base['recompute_gelu'] else 'recompute'),
            dict(recompute_gelu=not base['recompute_gelu']),
        ),
        (f'remat={flip(remat)}', dict(remat=flip(remat))),
        *[(f'scan_layers={other}', dict(scan=other)) for other in ('off', 'on', 'unrolled') if other != scan],
        ('donate=off', dict(donate=False)) if base['donate'] else ('donate=on', dict(donate=True)),
    ]
    dtype = resolve_dtype(base['dtype'], platform_name != 'cpu')
    other = 'float32' if dtype == 'bfloat16' else 'bfloat16'
    levers.append((f'dtype={other}', dict(dtype=other)))
    if device_count >= 2:
        for mesh in ('dp', 'fsdp'):
            levers.append((f'mesh={mesh} x{device_count}', dict(mesh=mesh, devices=device_count)))
    else:
        levers.append(('mesh=fsdp', None))
    flag_rows = [
        (f'XLA_FLAGS {flags}', dict(xla_flags=flags))
        for flags in args.lever_xla_flags or (['--xla_gpu_enable_triton_gemm=false'] if gpu else [])
    ]
    if args.lever_names:
        # A subset, the baseline always kept for the side-by-side ratios; 'a+b' is one row with both changes.
        # Flags given with --lever-xla-flags are asked for by name already, so they are kept too.
        known = dict(levers)
        picked = [('baseline', {})]
        for name in args.lever_names.split(','):
            parts = name.split('+')
            unknown = [part for part in parts if part not in known]
            if unknown:
                raise SystemExit(f'--lever-names: unknown lever {unknown[0]!r}; this sweep has {sorted(known)}')
            changes = [known[part] for part in parts]
            picked.append((name, None if None in changes else {k: v for c in changes for k, v in c.items()}))
        levers = picked + (flag_rows if args.lever_xla_flags else [])
    else:
        levers += flag_rows
    return [(name, None if change is None else dict(base, **change, label=name)) for name, change in levers]


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------


def _has_nvidia_gpu() -> bool:
    return shutil.which('nvidia-smi') is not None or os.path.exists('/dev/nvidiactl')


def _cpu_model() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--variants', help="comma-separated sizes (default S,B,L; 'g' = g/14; '/patch' overrides)")
    p.add_argument('--frames', type=int, help='frames per clip (default 16)')
    p.add_argument('--image-size', type=int, help='pixels (default 224)')
    p.add_argument('--tiny', action='store_true', help='CPU defaults: micro/8, 8 frames x 32 px')
    p.add_argument('--batch', type=int, default=0, help=f'per-device clips (default by size: {DEFAULT_BATCH})')
    p.add_argument('--encoder-ratio', type=float, default=0.9, help='tube mask ratio')
    p.add_argument('--decoder-ratio', type=float, default=0.5, help='running-cell ratio of V2 mode (0: v1 only)')
    p.add_argument('--modes', default='v1,v2', help='jaxssl modes: v1 (decoder_ratio 0) and/or v2')
    p.add_argument('--dtype', default='auto', choices=('auto', 'bfloat16', 'float32'), help='auto: bf16 on GPU/TPU')
    p.add_argument(
        '--attention', default='auto', choices=('auto', 'xla', 'cudnn'), help='auto: cuDNN on GPU in bf16, else XLA'
    )
    p.add_argument(
        '--patch-embed', default='auto', choices=('auto', 'conv', 'matmul'), help="tubelet embedding (auto: config's)"
    )
    p.add_argument('--split-qkv', action='store_true', help='q, k, v as three matmuls (model.split_qkv)')
    p.add_argument('--approximate-gelu', action='store_true', help='tanh GELU (model.approximate_gelu)')
    p.add_argument('--recompute-gelu', action='store_true', help='GELU recomputed in backward (model.recompute_gelu)')
    p.add_argument('--remat', default='auto', choices=('auto', 'on', 'off'), help='auto: the recipe (H, g on)')
    p.add_argument(
        '--scan',
        default='auto',
        choices=('auto', 'on', 'off', 'unrolled'),
        help="auto: the config's (unrolled: the scanned parameter layout, the loop fully unrolled)",
    )
    p.add_argument('--mesh', default='dp', choices=('dp', 'fsdp'), help='devices on the data or the fsdp axis')
    p.add_argument('--devices', type=int, default=1, help='devices in the mesh (0: all)')
    p.add_argument('--no-donate', dest='donate', action='store_false', help='do not donate the train state')
    p.add_argument('--steps', type=int, default=10, help='timed steps (median)')
    p.add_argument('--warmup', type=int, default=3, help='steps after the first, not timed')
    p.add_argument('--torch', action='store_true', help="transformers' VideoMAEForPreTraining baseline (v1)")
    p.add_argument('--torch-variants', default='', help='limit the baseline to these variants (default: all)')
    p.add_argument('--torch-compile', action='store_true', help='torch.compile the PyTorch model')
    p.add_argument('--torch-compile-mode', default='', help="e.g. 'max-autotune' (default: torch's default)")
    p.add_argument('--torch-attention', default='sdpa', choices=('sdpa', 'eager'))
    p.add_argument('--matmul-size', type=int, default=0, help='measured-peak matmul size (0: 8192 GPU, 1024 CPU)')
    p.add_argument('--no-matmul', dest='matmul', action='store_false', help='skip the measured matmul peak')
    p.add_argument('--profile', type=int, default=0, help='jaxssl runs: profile N more steps, print time by op kind')
    p.add_argument('--profile-dir', default='', help="keep each profiled run's trace here (<label>.trace.json.gz)")
    p.add_argument('--levers', action='store_true', help='sweep the levers on the first variant (V2 mode)')
    p.add_argument('--lever-names', default='', help="only these levers, e.g. 'attention=xla,remat=on'")
    p.add_argument('--lever-xla-flags', action='append', help='XLA_FLAGS to try as a lever (repeatable; isolated)')
    p.add_argument('--cpu-devices', type=int, default=0, help='fake CPU devices (correctness of meshes, not speed)')
    p.add_argument('--isolate', default='auto', choices=('auto', 'on', 'off'), help='one child process per run')
    p.add_argument('--rounds', type=int, default=0, help='in-process: time runs in R interleaved rounds (0: 5)')
    p.add_argument('--cpu-threads', type=int, default=0, help='CPU: threads per framework (1: steady on a busy host)')
    p.add_argument('--child-timeout', type=float, default=900.0)
    p.add_argument('--out', default='', help='write the results as JSON here')
    p.add_argument('--_child', default='', help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    defaults = TINY if args.tiny else dict(variants='S,B,L', frames=16, image_size=224)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark as the command line `argv` asks; returns (and with --out writes) the record."""
    args = parse_args(argv)
    # XLA and PyTorch read these when they initialise: in this process if it has not imported jax yet (run as a
    # script), and in every child process. Restored on return, so an in-process caller (a test) is left as it was.
    flags = []
    if args.cpu_devices:
        flags.append(f'--xla_force_host_platform_device_count={args.cpu_devices}')
    if args.cpu_threads == 1:
        flags.append('--xla_cpu_multi_thread_eigen=false')
    env = {}
    if flags:
        env['XLA_FLAGS'] = ' '.join([os.environ.get('XLA_FLAGS', ''), *flags]).strip()
    if args.cpu_threads:
        env['OMP_NUM_THREADS'] = str(args.cpu_threads)  # TorchRun also sets torch's intra-op threads
    isolate = args.isolate == 'on' or (args.isolate == 'auto' and _has_nvidia_gpu())
    if not isolate and args.torch and 'XLA_PYTHON_CLIENT_PREALLOCATE' not in os.environ:
        env['XLA_PYTHON_CLIENT_PREALLOCATE'] = 'false'  # JAX's default 75% would starve PyTorch of GPU memory
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        if args._child:
            _child(args._child)
            return {}
        return _benchmark(args, argv, isolate)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _benchmark(args: argparse.Namespace, argv: list[str] | None, isolate: bool) -> dict[str, Any]:
    timeout = args.child_timeout
    rounds = max(1, min(args.rounds or (1 if isolate else 5), args.steps))
    started = time.time()
    load_start = os.getloadavg()
    variants = [v for v in args.variants.split(',') if v]
    modes = [m for m in args.modes.split(',') if m]
    if args.decoder_ratio == 0:
        modes = [m for m in modes if m != 'v2']

    matmul = dict(size=args.matmul_size, dtype=args.dtype, label='matmul peak')
    info = run_isolated('matmul', matmul, timeout) if isolate else measure('matmul', matmul)
    if 'error' in info:
        raise SystemExit(f'cannot measure the device: {info["error"]}')
    if not args.matmul:
        info['flops_per_s'] = None
    spec_peak, matmul_peak = info['spec_peak_flops'], info['flops_per_s']
    print(
        f'{info["device_kind"]} ({info["platform"]}, {info["device_count"]} device(s), jax {info["jax_version"]}); '
        f'spec bf16 peak {_fmt(spec_peak, "g")} GFLOP/s; measured {info["dtype"]} {info["size"]}^3 matmul '
        f'{_fmt(matmul_peak, "g")} GFLOP/s',
        flush=True,
    )

    runs: list[dict[str, Any]] = []
    if args.levers:
        base = dict(base_spec(args, variants[0]), decoder_ratio=args.decoder_ratio or 0.0)
        todo, skipped = [], {}
        for name, spec in lever_specs(args, base, info['platform'], info['device_count']):
            if spec is None:
                needs = 'a GPU' if 'cudnn' in name else '2+ devices (--cpu-devices N on CPU)'
                skipped[name] = dict(
                    label=name, variant=base['variant'], framework='jaxssl', error=f'skipped: needs {needs}'
                )
            else:
                todo.append(('jaxssl', spec))
        measured = measure_group(todo, isolate, rounds, timeout)
        runs = [add_rates(run, spec_peak, matmul_peak) for run in measured] + list(skipped.values())
        base_rate = runs[0].get('clips_per_s_per_device')
        for run in runs:
            if base_rate and 'clips_per_s_per_device' in run:
                run['speedup_vs_baseline'] = run['clips_per_s_per_device'] / base_rate
            run.setdefault('label', run.get('label'))
        title = f'Levers: jaxssl {variants[0]} V2 mode ({args.frames}x{args.image_size}x{args.image_size})'
        text = table(runs, (('vs baseline', 'speedup_vs_baseline', 'num'),))
        print(f'\n{title}\n{text}')
    else:
        for variant in variants:
            base = base_spec(args, variant)
            todo = []
            if args.torch and (not args.torch_variants or variant in args.torch_variants.split(',')):
                torch_spec = dict(
                    base,
                    torch_compile=args.torch_compile,
                    torch_compile_mode=args.torch_compile_mode,
                    torch_attention=args.torch_attention,
                )
                label = f'{variant} torch v1 ({args.torch_attention}{", compiled" if args.torch_compile else ""})'
                todo.append(('torch', 'torch', dict(torch_spec, label=label)))
            if 'v1' in modes:
                todo.append(('jaxssl', 'jaxssl_v1', dict(base, decoder_ratio=0.0, label=f'{variant} jaxssl v1')))
            if 'v2' in modes:
                todo.append(('jaxssl', 'jaxssl_v2', dict(base, label=f'{variant} jaxssl V2')))
            measured = measure_group([(kind, spec) for kind, _, spec in todo], isolate, rounds, timeout)
            for (_, role, spec), run in zip(todo, measured, strict=True):
                run = add_rates(run, spec_peak, matmul_peak)
                run['role'], run['label'] = role, spec['label']
                runs.append(run)
        print(f'\nTrain step, {args.frames}x{args.image_size}x{args.image_size}, tube {args.encoder_ratio}')
        print(table(runs))

    for run in runs:
        if run.get('profile'):
            from jaxssl import profiling

            print(f'\nprofile of {run["label"]} (step {1e3 * run["step_time_median_s"]:.1f} ms):')
            print(profiling.format_summary(run['profile']))
    result_ratios = [] if args.levers else ratios(runs)
    for row in result_ratios:
        shown = ', '.join(f'{k} {v:.2f}x' for k, v in row.items() if k != 'variant')
        if shown:
            print(f'ratios (clips/s per device) {row["variant"]}: {shown}')
    result = dict(
        command=' '.join(['python', 'benchmarks/train_throughput.py', *(argv if argv is not None else sys.argv[1:])]),
        date=time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started)),
        seconds=time.time() - started,
        host=dict(
            cpu_model=_cpu_model(),
            cpu_count=os.cpu_count(),
            load_average_start=list(load_start),
            load_average_end=list(os.getloadavg()),
            python=platform.python_version(),
        ),
        device=info,
        spec_peak_flops=spec_peak,
        measured_peak_flops=matmul_peak,
        isolated=isolate,
        xla_flags=os.environ.get('XLA_FLAGS', ''),
        settings={k: v for k, v in vars(args).items() if not k.startswith('_')},
        runs=runs,
        ratios=result_ratios,
    )
    if args.out:
        folder = os.path.dirname(os.path.abspath(args.out))
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile('w', dir=folder, delete=False, suffix='.tmp') as f:
            json.dump(result, f, indent=2)
        os.replace(f.name, args.out)
        print(f'wrote {args.out}')
    return result


if __name__ == '__main__':
    main()
