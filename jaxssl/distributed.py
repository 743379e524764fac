"""Multi-process start-up: `jax.distributed.initialize` when a run spans several processes (hosts or GPUs).

Driven by flags or environment: explicit `--coordinator_address/--num_processes/--process_id` (or the
JAXSSL_COORDINATOR_ADDRESS / JAXSSL_NUM_PROCESSES / JAXSSL_PROCESS_ID variables), or `--distributed=auto`
(JAXSSL_DISTRIBUTED=auto) to let JAX detect the cluster by itself:

- Cloud TPU VMs (one process per host, `gcloud ... ssh --worker=all`): JAX reads the worker list and this worker's
  number from the TPU VM metadata server; nothing to set. Every process sees its host's chips.
- SLURM: JAX needs SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID and SLURM_LOCALID, i.e. each process
  started by `srun` (the batch script alone is not a step). Process 0 is the first node of the step; the port is
  derived from the job id (override with JAX_COORDINATOR_PORT). JAX then gives each process ONE GPU, number
  SLURM_LOCALID; that is right for one task per GPU (`--ntasks-per-node` = `--gpus-per-node`, every task seeing all
  of the node's GPUs). `slurm_local_device_ids` corrects the two other layouts: one task per node (it gets all the
  node's GPUs) and sites that bind one GPU per task (CUDA_VISIBLE_DEVICES has one entry: that is device 0).
  JAX_LOCAL_DEVICE_IDS=0,1,... overrides.
- Open MPI (`mpirun`) and Kubernetes TPU jobs are detected by JAX too.

`--distributed=off` never initialises. With `auto` and no cluster found the run stops with DistributedError rather
than silently starting N independent single-process runs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax

# What JAX's SLURM detection reads (jax/_src/clusters/slurm_cluster.py).
SLURM_VARIABLES = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID', 'SLURM_LOCALID')


class DistributedError(RuntimeError):
    """Multi-process start-up cannot go on; the message says what is missing."""


def _visible_gpus(env: Mapping[str, str]) -> int | None:
    """GPUs this process can see, from CUDA_VISIBLE_DEVICES or SLURM_GPUS_ON_NODE; None when unknown."""
    visible = env.get('CUDA_VISIBLE_DEVICES')
    if visible is not None and visible.strip() and visible.strip() != 'NoDevFiles':
        return len([d for d in visible.split(',') if d.strip()])
    on_node = env.get('SLURM_GPUS_ON_NODE', '')
    return int(on_node) if on_node.isdigit() else None


def _one_task_per_node(env: Mapping[str, str]) -> bool:
    nodes = int(env.get('SLURM_STEP_NUM_NODES') or env.get('SLURM_NNODES') or 1)
    return int(env['SLURM_NTASKS']) <= nodes


def slurm_local_device_ids(env: Mapping[str, str]) -> list[int] | None:
    """The local GPUs a SLURM task should use, or None for JAX's default (one GPU: number SLURM_LOCALID)."""
    if env.get('JAX_LOCAL_DEVICE_IDS'):
        return [int(i) for i in env['JAX_LOCAL_DEVICE_IDS'].split(',')]
    gpus = _visible_gpus(env)
    if _one_task_per_node(env):  # it drives every GPU of its node
        return list(range(gpus)) if gpus else None
    if gpus == 1:  # the site gave each task its own GPU: it is device 0 of the task, whatever SLURM_LOCALID says
        return [0]
    return None


def _auto_kwargs(env: Mapping[str, str]) -> dict:
    """Arguments for jax.distributed.initialize() beyond what JAX detects itself; checks SLURM's variables."""
    if 'SLURM_JOB_ID' not in env:
        return {}
    missing = [name for name in SLURM_VARIABLES if name not in env]
    if missing:
        raise DistributedError(
            f'--distributed=auto in SLURM job {env["SLURM_JOB_ID"]}, but {", ".join(missing)} '
            f'{"is" if len(missing) == 1 else "are"} not set: start every process with srun '
            '(srun python -m jaxssl.main ... --distributed=auto; launch/slurm.sh does this)'
        )
    ids = slurm_local_device_ids(env)
    if ids is None and _one_task_per_node(env):
        print(
            'warning: one SLURM task per node but the GPU count is unknown (no CUDA_VISIBLE_DEVICES or '
            'SLURM_GPUS_ON_NODE); JAX will use one GPU per process. Set JAX_LOCAL_DEVICE_IDS=0,1,... to use more.',
            flush=True,
        )
    return {} if ids is None else {'local_device_ids': ids}


def maybe_initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    mode: str | None = None,
) -> bool:
    """Initialises the JAX distributed runtime if asked to; returns whether it did."""
    mode = mode or os.environ.get('JAXSSL_DISTRIBUTED', '')
    if mode not in ('', 'auto', 'off'):
        raise DistributedError(f"bad distributed mode '{mode}' (JAXSSL_DISTRIBUTED): 'auto' or 'off'")
    if mode == 'off':
        return False
    coordinator_address = coordinator_address or os.environ.get('JAXSSL_COORDINATOR_ADDRESS')
    if num_processes is None and 'JAXSSL_NUM_PROCESSES' in os.environ:
        num_processes = int(os.environ['JAXSSL_NUM_PROCESSES'])
    if process_id is None and 'JAXSSL_PROCESS_ID' in os.environ:
        process_id = int(os.environ['JAXSSL_PROCESS_ID'])
    if coordinator_address and num_processes and num_processes > 1:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=120,
        )
        return True
    if mode == 'auto':
        kwargs = _auto_kwargs(os.environ)
        try:
            jax.distributed.initialize(**kwargs)  # Cloud TPU / SLURM / Open MPI / GKE are detected by JAX
        except ValueError as e:
            if 'coordinator_address' not in str(e):
                raise
            raise DistributedError(
                '--distributed=auto found no cluster (Cloud TPU VM, SLURM step started by srun, Open MPI); run '
                'without it for one process, or give --coordinator_address, --num_processes and --process_id'
            ) from None
        return True
    return False
