"""Test setup: 8 fake CPU devices for sharding tests (must be set before jax is imported)."""

import os

# The CPU backend's LLVM optimisation level 0: the tests' tiny programs compile about 1.35x faster (tests/test_poa.py:
# 81 s -> 60 s) and their results do not depend on it.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax

jax.config.update('jax_default_matmul_precision', 'highest')


def pytest_collection_modifyitems(config, items):
    """Files with a test marked slow run first. CI runs the suite on 2 xdist workers, one file at a time each
    (--dist loadfile keeps a file's shared compiled fixtures in one process); a long file that starts last would
    leave one worker idle at the end. Within a file, and among the other files, the order is unchanged."""
    slow_files = {item.path for item in items if item.get_closest_marker('slow')}
    items.sort(key=lambda item: item.path not in slow_files)
