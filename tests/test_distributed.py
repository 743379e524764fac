"""Multi-process start-up logic (jaxssl.distributed) without starting a runtime: jax.distributed.initialize is
replaced by a recorder. The real thing runs in test_launch.py (a SLURM job faked on this machine) and test_train.py."""

import jax
import pytest

from jaxssl import distributed

SLURM_STEP = dict(
    SLURM_JOB_ID='77', SLURM_STEP_NODELIST='gpu[01-02]', SLURM_STEP_NUM_NODES='2', SLURM_NTASKS='16',
    SLURM_PROCID='9', SLURM_LOCALID='1',
)  # fmt: skip


@pytest.fixture
def calls(monkeypatch):
    """Clears cluster variables from the environment and records what jax.distributed.initialize gets."""
    for name in [*distributed.SLURM_VARIABLES, 'SLURM_STEP_NUM_NODES', 'SLURM_NNODES', 'SLURM_GPUS_ON_NODE',
                 'CUDA_VISIBLE_DEVICES', 'JAX_LOCAL_DEVICE_IDS', 'JAXSSL_DISTRIBUTED', 'JAXSSL_COORDINATOR_ADDRESS',
                 'JAXSSL_NUM_PROCESSES', 'JAXSSL_PROCESS_ID']:  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    recorded = []

    def initialize(**kwargs):
        recorded.append(kwargs)
        if 'coordinator_address' not in kwargs and 'SLURM_JOB_ID' not in distributed.os.environ:
            raise ValueError('coordinator_address should be defined.')  # what JAX says when it finds no cluster

    monkeypatch.setattr(jax.distributed, 'initialize', initialize)
    return recorded


def test_nothing_requested_means_one_process(calls):
    assert distributed.maybe_initialize() is False
    assert distributed.maybe_initialize('10.0.0.1:1234', 1, 0) is False  # one process needs no runtime
    assert calls == []


def test_explicit_flags(calls):
    assert distributed.maybe_initialize('10.0.0.1:1234', 4, 2) is True
    want = dict(coordinator_address='10.0.0.1:1234', num_processes=4, process_id=2, initialization_timeout=120)
    assert calls == [want]


def test_off_wins_over_environment(calls, monkeypatch):
    monkeypatch.setenv('JAXSSL_COORDINATOR_ADDRESS', '10.0.0.1:1234')
    monkeypatch.setenv('JAXSSL_NUM_PROCESSES', '2')
    assert distributed.maybe_initialize(mode='off') is False
    assert calls == []
    with pytest.raises(distributed.DistributedError, match="'auto' or 'off'"):
        distributed.maybe_initialize(mode='on')


def test_auto_without_a_cluster_fails_clearly(calls):
    with pytest.raises(distributed.DistributedError, match='found no cluster'):
        distributed.maybe_initialize(mode='auto')


def test_auto_on_a_tpu_vm_or_gpu_task_lets_jax_detect_everything(calls, monkeypatch):
    monkeypatch.setenv('JAXSSL_DISTRIBUTED', 'auto')
    for name, value in SLURM_STEP.items():
        monkeypatch.setenv(name, value)
    assert distributed.maybe_initialize() is True
    assert calls == [{}]  # 8 tasks per node seeing all GPUs: JAX's own choice (GPU number SLURM_LOCALID) is right


def test_auto_in_a_batch_script_without_srun_names_what_is_missing(calls, monkeypatch):
    monkeypatch.setenv('SLURM_JOB_ID', '77')
    monkeypatch.setenv('SLURM_NTASKS', '2')
    with pytest.raises(distributed.DistributedError, match=r'SLURM_STEP_NODELIST, SLURM_PROCID, SLURM_LOCALID .*srun'):
        distributed.maybe_initialize(mode='auto')
    assert calls == []


@pytest.mark.parametrize(
    ('env', 'want'),
    [
        (dict(SLURM_STEP_NUM_NODES='2', SLURM_NTASKS='16', CUDA_VISIBLE_DEVICES='0,1,2,3,4,5,6,7'), None),
        (dict(SLURM_STEP_NUM_NODES='2', SLURM_NTASKS='2', CUDA_VISIBLE_DEVICES='0,1,2,3'), [0, 1, 2, 3]),
        (dict(SLURM_STEP_NUM_NODES='2', SLURM_NTASKS='2', SLURM_GPUS_ON_NODE='8'), list(range(8))),
        (dict(SLURM_NNODES='1', SLURM_NTASKS='1', CUDA_VISIBLE_DEVICES='4,5'), [0, 1]),  # ordinals, not GPU ids
        (dict(SLURM_STEP_NUM_NODES='2', SLURM_NTASKS='2'), None),  # unknown count: JAX default (with a warning)
        (dict(SLURM_STEP_NUM_NODES='1', SLURM_NTASKS='8', CUDA_VISIBLE_DEVICES='5'), [0]),  # site binds a GPU per task
        (dict(SLURM_STEP_NUM_NODES='1', SLURM_NTASKS='8', JAX_LOCAL_DEVICE_IDS='2,3'), [2, 3]),
    ],
)
def test_slurm_local_device_ids(env, want):
    assert distributed.slurm_local_device_ids(env) == want


def test_one_task_per_node_gets_all_its_gpus(calls, monkeypatch):
    for name, value in dict(SLURM_STEP, SLURM_NTASKS='2', SLURM_LOCALID='0', SLURM_GPUS_ON_NODE='4').items():
        monkeypatch.setenv(name, value)
    assert distributed.maybe_initialize(mode='auto') is True
    assert calls == [{'local_device_ids': [0, 1, 2, 3]}]
