"""jaxssl.profiling: kinds of work by name, stream selection on a GPU-shaped trace, a real CPU trace."""

import gzip
import json
import os

import jax
import jax.numpy as jnp
import pytest

from jaxssl import profiling


@pytest.mark.parametrize(
    'name, kind',
    [
        ('sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64', 'matmul'),
        ('cutlass_80_wmma_tensorop_bf16_s161616gemm', 'matmul'),
        ('nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT', 'matmul'),  # cuBLAS's kernels on Hopper
        ('loop_convert_multiply_fusion_15', 'elementwise fusion'),
        ('void cudnn::fusion::compute_dot_do_o_specialized<true, 64>(void const*)', 'attention'),
        ('cudnn_generated_fort_native_sdpa_sm90_knob_7_64x128x64', 'attention'),
        ('ncclDevKernel_AllReduce_Sum_bf16_RING_LL', 'collective'),
        ('input_reduce_fusion_3', 'reduction'),
        ('loop_multiply_fusion_12', 'elementwise fusion'),
        ('transpose_copy_fusion', 'copy / transpose'),
        ('convolution.4', 'convolution'),
        ('some_kernel', 'other'),
    ],
)
def test_kind_of_known_names(name, kind):
    assert profiling.kind_of(name) == kind


def _write_trace(folder, events):
    path = os.path.join(folder, 'plugins', 'profile', 'run', 'host.trace.json.gz')
    os.makedirs(os.path.dirname(path))
    with gzip.open(path, 'wt') as f:
        json.dump({'traceEvents': events}, f)


def test_gpu_trace_counts_stream_kernels_once(tmp_path):
    meta = lambda kind, pid, tid, name: dict(ph='M', name=kind, pid=pid, tid=tid, args=dict(name=name))
    span = lambda pid, tid, name, dur: dict(ph='X', pid=pid, tid=tid, name=name, ts=0, dur=dur)
    _write_trace(
        str(tmp_path),
        [
            meta('process_name', 1, 0, '/device:GPU:0'),
            meta('thread_name', 1, 7, 'Stream #7(Compute)'),
            meta('thread_name', 1, 9, 'XLA Ops'),
            meta('process_name', 2, 0, '/host:CPU'),
            meta('thread_name', 2, 3, 'python'),
            span(1, 7, 'sm90_xmma_gemm_bf16', 3000.0),
            span(1, 7, 'loop_add_fusion', 1000.0),
            span(1, 7, 'sm90_xmma_gemm_bf16', 1000.0),
            span(1, 9, 'fusion.3', 5000.0),  # the derived op line: same time again, not counted
            span(2, 3, 'PjitFunction', 9000.0),  # host work, not counted
        ],
    )
    summary = profiling.summarize(str(tmp_path), steps=2)
    assert summary['source'] == 'device streams'
    assert summary['busy_ms_per_step'] == pytest.approx(2.5)
    assert summary['kinds'] == pytest.approx({'matmul': 2.0, 'elementwise fusion': 0.5})
    assert summary['top'][0] == ('sm90_xmma_gemm_bf16', 'matmul', pytest.approx(2.0))
    assert summary['kernels_per_step'] == pytest.approx(1.5)
    assert 'matmul' in profiling.format_summary(summary)


def test_families_add_up_the_unrolled_copies_of_an_op(tmp_path):
    meta = lambda kind, pid, tid, name: dict(ph='M', name=kind, pid=pid, tid=tid, args=dict(name=name))
    span = lambda name, dur: dict(ph='X', pid=1, tid=7, name=name, ts=0, dur=dur)
    _write_trace(
        str(tmp_path),
        [
            meta('process_name', 1, 0, '/device:GPU:0'),
            meta('thread_name', 1, 7, 'Stream #7(Compute)'),
            span('loop_add_fusion_1', 1000.0),
            span('loop_add_fusion_12', 2000.0),
            span('loop_add_fusion.3', 500.0),
            span('sm90_xmma_gemm_bf16', 3000.0),
        ],
    )
    summary = profiling.summarize(str(tmp_path), steps=1)
    assert summary['families'][0] == ('loop_add_fusion', 'elementwise fusion', pytest.approx(3.5), 3)
    assert summary['families'][1] == ('sm90_xmma_gemm_bf16', 'matmul', pytest.approx(3.0), 1)
    assert profiling.family_of('input_reduce_fusion_3.1') == 'input_reduce_fusion'


def test_cpu_trace_of_a_jitted_function(tmp_path):
    f = jax.jit(lambda a: jnp.tanh(a @ a).sum())
    a = jnp.ones((128, 128))
    f(a).block_until_ready()
    with profiling.trace(str(tmp_path)):
        for _ in range(2):
            f(a).block_until_ready()
    summary = profiling.summarize(str(tmp_path), steps=2)
    assert summary['source'] == 'host XLA threads'
    assert summary['busy_ms_per_step'] > 0
    assert sum(summary['kinds'].values()) == pytest.approx(summary['busy_ms_per_step'])
    assert summary['top']


def test_missing_trace_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match='create_perfetto_trace'):
        profiling.summarize(str(tmp_path))
