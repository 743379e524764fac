"""Where a jitted step spends its device time: a JAX profiler trace summarised by op and by kind of work.

    with profiling.trace(log_dir):
        ...run some steps...
    summary = profiling.summarize(log_dir, steps=n)

The summary reads the Perfetto trace (`*.trace.json.gz`) that `jax.profiler.trace(create_perfetto_trace=True)`
writes. On a GPU it counts the kernels on the device's streams; on a CPU (no device timeline) the XLA executor
threads' events. Ops are grouped into kinds by name (matmul, attention, convolution, elementwise fusion, copy,
reduction, collective, other), so a step that is bound by memory traffic rather than matmuls shows at a glance.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import gzip
import json
import os
import re
from collections.abc import Iterator
from typing import Any

# First match wins; names are XLA's HLO op / fusion names or CUDA kernel names.
KINDS = (
    ('attention', re.compile(r'fmha|sdpa|flash|softmax|attention|attn|cudnn::fusion', re.I)),  # cuDNN's helpers
    ('collective', re.compile(r'nccl|all-reduce|all-gather|reduce-scatter|all-to-all|collective', re.I)),
    ('matmul', re.compile(r'gemm|cublas|cutlass|matmul|dot|wgmma|sm90_xmma|xmma|nvjet', re.I)),
    ('convolution', re.compile(r'conv(?!ert)', re.I)),  # not XLA's 'convert' fusions
    ('copy / transpose', re.compile(r'copy|transpose|memcpy|memset|dynamic-update-slice|slice|concatenate|gather')),
    ('reduction', re.compile(r'reduce|reduction', re.I)),
    ('elementwise fusion', re.compile(r'fusion|loop_|input_|triton', re.I)),
)


@contextlib.contextmanager
def trace(log_dir: str) -> Iterator[None]:
    """jax.profiler.trace with the Perfetto JSON that `summarize` reads."""
    import jax

    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        yield


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if pattern.search(name):
            return kind
    return 'other'


def _events(path: str) -> list[dict[str, Any]]:
    with gzip.open(path, 'rt') as f:
        data = json.load(f)
    return data['traceEvents'] if isinstance(data, dict) else data


def summarize(log_dir: str, steps: int = 1, top: int = 15) -> dict[str, Any]:
    """Device time per step by kind of work and the `top` ops, from the newest trace under `log_dir`.

    Returns {'source', 'busy_ms_per_step', 'kernels_per_step', 'kinds': {kind: ms per step},
    'top': [(op, kind, ms per step)], 'families': [(op family, kind, ms per step, launches per step)]}: a family
    is an op name without its numeric suffixes, so the same fusion in every unrolled layer adds up.
    """
    paths = glob.glob(os.path.join(log_dir, '**', '*.trace.json.gz'), recursive=True)
    if not paths:
        raise FileNotFoundError(f'no *.trace.json.gz under {log_dir}: was the trace taken with create_perfetto_trace?')
    events = _events(max(paths, key=os.path.getmtime))
    processes = {e['pid']: e['args']['name'] for e in events if e.get('ph') == 'M' and e.get('name') == 'process_name'}
    threads = {
        (e['pid'], e['tid']): e['args']['name'] for e in events if e.get('ph') == 'M' and e.get('name') == 'thread_name'
    }
    device_pids = {pid for pid, name in processes.items() if name.startswith('/device:')}
    # A GPU's process has the kernels on its 'Stream #N' lines and derived 'XLA Ops' / 'XLA Modules' lines over the
    # same time: count the streams only.
    streams = {key for key, name in threads.items() if key[0] in device_pids and name.startswith('Stream')}
    if device_pids:
        source = 'device streams' if streams else 'device'
        keep = lambda e: (e['pid'], e['tid']) in streams if streams else e['pid'] in device_pids
    else:  # CPU: XLA runs the program's thunks on its client / Eigen threads, not on the Python thread
        source = 'host XLA threads'
        keep = lambda e: threads.get((e['pid'], e['tid']), '').startswith('tf_XLA')
    per_op: collections.Counter[str] = collections.Counter()
    launches: collections.Counter[str] = collections.Counter()
    for event in events:
        if event.get('ph') != 'X' or not keep(event):
            continue
        name = event['name']
        if name.startswith('end: ') or name.startswith('ThunkExecutor'):
            continue  # markers and the executor's wait, not work
        per_op[name] += float(event.get('dur', 0.0))  # microseconds; kernel names on a GPU, thunks on a CPU
        launches[name] += 1
    scale = 1e-3 / max(steps, 1)
    kinds: collections.Counter[str] = collections.Counter()
    family_time: collections.Counter[str] = collections.Counter()
    family_launches: collections.Counter[str] = collections.Counter()
    for op, micros in per_op.items():
        kinds[kind_of(op)] += micros
        family = family_of(op)
        family_time[family] += micros
        family_launches[family] += launches[op]
    return dict(
        source=source,
        busy_ms_per_step=sum(per_op.values()) * scale,
        kernels_per_step=sum(launches.values()) / max(steps, 1),
        kinds={kind: micros * scale for kind, micros in kinds.most_common()},
        top=[(op[:120], kind_of(op), micros * scale) for op, micros in per_op.most_common(top)],
        families=[
            (family[:120], kind_of(family), micros * scale, family_launches[family] / max(steps, 1))
            for family, micros in family_time.most_common(top)
        ],
    )


def family_of(name: str) -> str:
    """An op name without its numeric suffixes ('loop_add_fusion_12' and 'loop_add_fusion.3' -> 'loop_add_fusion')."""
    return re.sub(r'([._]\d+)+$', '', name)


def format_summary(summary: dict[str, Any]) -> str:
    """A few lines: busy time per step, its split by kind, the top ops."""
    busy = summary['busy_ms_per_step'] or 1e-12
    lines = [
        f'device busy {summary["busy_ms_per_step"]:.2f} ms/step, {summary.get("kernels_per_step", 0):.0f} kernels/step'
        f' ({summary["source"]})'
    ]
    lines += [f'  {kind:20s} {ms:8.2f} ms  {100 * ms / busy:5.1f}%' for kind, ms in summary['kinds'].items()]
    lines.append('  top ops:')
    lines += [f'    {ms:8.3f} ms  {kind:20s} {op}' for op, kind, ms in summary['top']]
    if summary.get('families'):
        lines.append('  top op families (numeric suffixes dropped):')
        lines += [f'    {ms:8.3f} ms  {n:6.0f}x  {kind:20s} {op}' for op, kind, ms, n in summary['families']]
    return '\n'.join(lines)
