"""Multi-process start-up: `jax.distributed.initialize` when a run spans several processes (hosts or GPUs).

Driven by flags or environment: explicit `--coordinator_address/--num_processes/--process_id` (or the
JAXSSL_COORDINATOR_ADDRESS / JAXSSL_NUM_PROCESSES / JAXSSL_PROCESS_ID variables), or `--distributed=auto`
(JAXSSL_DISTRIBUTED=auto) to let JAX detect a Cloud TPU pod or SLURM allocation by itself.
"""

from __future__ import annotations

import os

import jax


def maybe_initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    mode: str | None = None,
) -> bool:
    """Initialises the JAX distributed runtime if asked to; returns whether it did."""
    coordinator_address = coordinator_address or os.environ.get('JAXSSL_COORDINATOR_ADDRESS')
    if num_processes is None and 'JAXSSL_NUM_PROCESSES' in os.environ:
        num_processes = int(os.environ['JAXSSL_NUM_PROCESSES'])
    if process_id is None and 'JAXSSL_PROCESS_ID' in os.environ:
        process_id = int(os.environ['JAXSSL_PROCESS_ID'])
    mode = mode or os.environ.get('JAXSSL_DISTRIBUTED', '')
    if coordinator_address and num_processes and num_processes > 1:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=120,
        )
        return True
    if mode == 'auto':
        jax.distributed.initialize()  # TPU pod / SLURM / Kubernetes environments are detected by JAX
        return True
    return False
