"""launch/tpu.sh and launch/slurm.sh: dry-run output parsed back into argv, the remote shell snippets run against a
fake gcloud on this machine, and a SLURM job (fake sbatch / srun) that trains with two processes on CPU."""

import os
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(ROOT, 'launch', 'tpu.sh')
SLURM = os.path.join(ROOT, 'launch', 'slurm.sh')
TESTS = os.path.join(ROOT, 'tests')


def launch(script, *args, env=None, cwd=ROOT, timeout=60):
    return subprocess.run(['bash', script, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


def dry_run(script, *args, cwd=ROOT):
    args = list(args)
    args.insert(args.index('--') if '--' in args else len(args), '--dry-run')  # options go before `--`
    result = launch(script, *args, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return result.stdout


def commands(output):
    """The printed commands as argv lists (comments skipped), exactly as a shell would split them."""
    return [shlex.split(line) for line in output.splitlines() if line and not line.startswith('#')]


def option(argv, name):
    values = [a.partition('=')[2] for a in argv if a.startswith(f'{name}=')]
    assert len(values) == 1, (name, argv)
    return values[0]


def contains(sequence, part):
    return any(sequence[i : i + len(part)] == part for i in range(len(sequence) - len(part) + 1))


TPU_BASE = ('--name', 'vmae', '--zone', 'us-central2-b', '--project', 'my-proj')


def test_tpu_help_lists_commands():
    result = launch(TPU, '--help')
    assert result.returncode == 0
    for word in ('create', 'install', 'train', 'logs', 'delete', 'all', '--dry-run', '--accelerator-type', '--queued'):
        assert word in result.stdout


def test_tpu_all_dry_run_creates_installs_trains_on_every_worker_and_streams_logs():
    out = dry_run(
        TPU, 'all', *TPU_BASE, '--accelerator-type', 'v4-32', '--config', 'configs/videomae_v2.py:variant=L',
        '--workdir', 'gs://my-bucket/vmae_l', '--', '--config.input.list_file=/mnt/videos/train list.csv',
    )  # fmt: skip
    create, pack, scp, install, train, logs = commands(out)
    assert create[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create'] and create[5] == 'vmae'
    assert option(create, '--accelerator-type') == 'v4-32'
    assert option(create, '--version') == 'tpu-ubuntu2204-base'
    assert option(create, '--zone') == 'us-central2-b' and option(create, '--project') == 'my-proj'
    assert pack[:2] == ['git', '-C'] and pack[-1].endswith('.tar.gz')
    assert scp[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp'] and scp[5] == pack[-1]
    assert option(scp, '--worker') == 'all'
    for argv in (install, train):
        assert argv[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'vmae']
        assert option(argv, '--worker') == 'all'
    setup = shlex.split(option(install, '--command'))
    assert contains(setup, ['python3', '-m', 'pip', 'install', '-q', 'jax[tpu]', '-e', '.[video,gcs]'])
    remote = shlex.split(option(train, '--command'))
    want = ['python3', '-m', 'jaxssl.main', '--config=configs/videomae_v2.py:variant=L',
            '--workdir=gs://my-bucket/vmae_l', '--distributed=auto',
            '--config.input.list_file=/mnt/videos/train list.csv']  # fmt: skip
    assert contains(remote, want), remote  # quoting survives two shells: the arg with a space is still one arg
    assert 'setsid nohup python3 -m jaxssl.main' in option(train, '--command')  # survives the ssh session
    assert logs[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'vmae'] and option(logs, '--worker') == '0'
    assert 'tail' in option(logs, '--command')


@pytest.mark.parametrize(
    ('accelerator', 'gcloud_type', 'version'),
    [('v5e-16', 'v5litepod-16', 'v2-alpha-tpuv5-lite'), ('v5p-64', 'v5p-64', 'v2-alpha-tpuv5'),
     ('v6e-8', 'v6e-8', 'v2-alpha-tpuv6e')],
)  # fmt: skip
def test_tpu_queued_resource_per_generation(accelerator, gcloud_type, version):
    out = dry_run(TPU, 'create', *TPU_BASE, '--accelerator-type', accelerator, '--queued', '--spot')
    create, describe = commands(out)
    assert create[:6] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'vmae']
    assert option(create, '--node-id') == 'vmae'
    assert option(create, '--accelerator-type') == gcloud_type
    assert option(create, '--runtime-version') == version
    assert '--spot' in create
    assert describe[4] == 'describe' and option(describe, '--format') == 'value(state.state)'


def test_tpu_version_override_git_install_stop_and_delete():
    out = dry_run(TPU, 'create', *TPU_BASE, '--accelerator-type', 'v5p-8', '--version', 'my-runtime')
    assert option(commands(out)[0], '--version') == 'my-runtime'
    out = dry_run(TPU, 'install', *TPU_BASE, '--git', 'https://github.com/me/jaxssl.git', '--ref', 'v0.1')
    (install,) = commands(out)  # no tarball, no scp
    remote = shlex.split(option(install, '--command'))
    assert contains(remote, ['git', 'clone', '--depth', '1', '--branch', 'v0.1', 'https://github.com/me/jaxssl.git'])
    (stop,) = commands(dry_run(TPU, 'stop', *TPU_BASE))
    assert option(stop, '--worker') == 'all' and 'kill -TERM' in option(stop, '--command')
    (delete,) = commands(dry_run(TPU, 'delete', *TPU_BASE))
    assert delete[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'vmae'] and '--quiet' in delete
    (delete,) = commands(dry_run(TPU, 'delete', *TPU_BASE, '--queued'))
    assert delete[3:5] == ['queued-resources', 'delete'] and '--force' in delete


@pytest.mark.parametrize(
    ('args', 'message'),
    [(('train', *TPU_BASE, '--workdir', '/tmp/run'), 'must be a gs:// path'),
     (('train', *TPU_BASE), 'must be a gs:// path'),
     (('create', *TPU_BASE, '--accelerator-type', 'v3-8'), '--accelerator-type must be'),
     (('create', '--zone', 'z'), '--name is required'),
     (('launch', *TPU_BASE), "unknown command 'launch'"),
     (('train', *TPU_BASE, '--workdir', 'gs://b/r', '--bogus'), "unknown option '--bogus'")],
)  # fmt: skip
def test_tpu_refuses_with_one_line(args, message):
    result = launch(TPU, *args, '--dry-run')
    assert result.returncode == 2
    assert message in result.stderr and result.stdout == ''


def write_executable(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


FAKE_GCLOUD = """#!{python}
# A fake gcloud: records its argv; `tpu-vm ssh` runs --command in bash with HOME set to a fake worker's home,
# `tpu-vm scp` copies into that home.
import os, shlex, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ['FAKE_GCLOUD_LOG'], 'a') as f:
    f.write(shlex.join(args) + '\\n')
home = os.environ['FAKE_WORKER_HOME']
if args[:3] == ['compute', 'tpus', 'tpu-vm'] and args[3] == 'ssh':
    command = [a.partition('=')[2] for a in args if a.startswith('--command=')][0]
    sys.exit(subprocess.run(['bash', '-c', command], env=dict(os.environ, HOME=home), cwd=home).returncode)
if args[:3] == ['compute', 'tpus', 'tpu-vm'] and args[3] == 'scp':
    shutil.copy(args[4], os.path.join(home, args[5].partition(':')[2]))
"""

FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for the workers' python: pip does nothing; jaxssl.main waits for SIGTERM like the trainer.
if [ "$1 $2" = "-m pip" ]; then echo "pip $*" >> "$HOME/pip.log"; exit 0; fi
echo "main $*"
trap 'echo "SIGTERM: checkpoint saved"; exit 0' TERM
sleep 60 &
wait
"""


def test_tpu_remote_commands_work_in_a_shell(tmp_path):
    """install copies the working tree and pip-installs it; train starts one background run and refuses a second;
    stop sends SIGTERM. The remote snippets run through a fake gcloud in a fake worker's home."""
    home = tmp_path / 'worker'
    home.mkdir()
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    write_executable(bin_dir / 'gcloud', FAKE_GCLOUD.format(python=sys.executable))
    python = write_executable(tmp_path / 'fake-python', FAKE_PYTHON)
    log = tmp_path / 'gcloud.log'
    env = dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}', FAKE_GCLOUD_LOG=str(log),
               FAKE_WORKER_HOME=str(home), TMPDIR=str(tmp_path))  # fmt: skip
    base = [*TPU_BASE, '--python', python]

    result = launch(TPU, 'install', *base, '--setup', 'touch "$HOME/setup-ran"', env=env)
    assert result.returncode == 0, result.stderr
    tree = home / 'jaxssl'
    assert (tree / 'pyproject.toml').is_file() and (tree / 'jaxssl' / 'main.py').is_file()
    assert (tree / 'launch' / 'tpu.sh').is_file()
    assert not (tree / '.venv').exists() and not (tree / '.git').exists()
    assert '-m pip install -q jax[tpu] -e .[video,gcs]' in (home / 'pip.log').read_text()
    assert (home / 'setup-ran').exists()

    train = [*base, '--workdir', 'gs://bucket/run', '--env', 'XLA_FLAGS=--a --b', '--', '--config.train.steps=5']
    result = launch(TPU, 'train', *train, env=env)
    assert result.returncode == 0, result.stderr
    assert 'started on' in result.stdout
    pid = int((home / 'jaxssl-train.pid').read_text())
    try:
        train_log = home / 'jaxssl-train.log'
        for _ in range(50):
            if train_log.exists() and 'main' in train_log.read_text():
                break
            time.sleep(0.1)
        assert train_log.read_text().split() == [
            'main', '-m', 'jaxssl.main', '--config=configs/videomae_v2.py:variant=B', '--workdir=gs://bucket/run',
            '--distributed=auto', '--config.train.steps=5',
        ]  # fmt: skip
        os.kill(pid, 0)  # still running after the ssh command returned

        again = launch(TPU, 'train', *train, env=env)
        assert again.returncode != 0 and 'already running' in again.stderr

        result = launch(TPU, 'stop', *base, env=env)
        assert result.returncode == 0, result.stderr
        for _ in range(50):
            if 'SIGTERM' in train_log.read_text():
                break
            time.sleep(0.1)
        assert 'SIGTERM: checkpoint saved' in train_log.read_text()
    finally:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    calls = [shlex.split(line) for line in log.read_text().splitlines()]
    assert [c[3] for c in calls] == ['scp', 'ssh', 'ssh', 'ssh', 'ssh']


def test_slurm_help():
    result = launch(SLURM, '--help')
    assert result.returncode == 0
    for word in ('--nodes', '--gpus-per-node', '--per', '--dry-run', 'srun', 'SLURM_PROCID'):
        assert word in result.stdout


def sbatch_script(output):
    lines = output.splitlines()
    start = lines.index('#!/bin/bash')
    end = lines.index('# submit with:')
    return lines[start:end], shlex.split(lines[end + 1])


def directives(script):
    return [line[len('#SBATCH ') :] for line in script if line.startswith('#SBATCH ')]


def test_slurm_one_process_per_gpu(tmp_path):
    out = dry_run(
        SLURM, '--nodes', '4', '--gpus-per-node', '8', '--time', '48:00:00', '--partition', 'gpu', '--account', 'lab',
        '--setup', 'source ~/venv/bin/activate', '--env', 'XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true',
        '--config', 'configs/videomae_v2.py:variant=L', '--workdir', '/shared/runs/vmae_l',
        '--', '--config.input.list_file=/data/k710 train.csv',
        cwd=tmp_path,
    )  # fmt: skip
    script, submit = sbatch_script(out)
    assert directives(script)[:4] == ['--job-name=jaxssl', '--nodes=4', '--ntasks-per-node=8', '--gpus-per-node=8']
    for directive in ('--time=48:00:00', '--partition=gpu', '--account=lab', '--signal=TERM@300',
                      f'--output={tmp_path}/slurm-logs/%x-%j.out'):  # fmt: skip
        assert directive in directives(script)
    assert 'source ~/venv/bin/activate' in script
    assert 'export XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true' in script
    srun = [shlex.split(line) for line in script if line.startswith('srun ')]
    assert srun == [['srun', '--kill-on-bad-exit=1', 'python', '-m', 'jaxssl.main',
                     '--config=configs/videomae_v2.py:variant=L', '--workdir=/shared/runs/vmae_l', '--distributed=auto',
                     '--config.input.list_file=/data/k710 train.csv']]  # fmt: skip
    assert submit == ['sbatch', f'{tmp_path}/slurm-logs/jaxssl.sbatch']
    path = tmp_path / 'job.sbatch'
    path.write_text('\n'.join(script) + '\n')
    assert subprocess.run(['bash', '-n', str(path)]).returncode == 0  # valid shell


def test_slurm_one_process_per_node_relative_workdir(tmp_path):
    out = dry_run(SLURM, '--nodes', '2', '--per', 'node', '--workdir', 'runs/x', '--port', '23456', cwd=tmp_path)
    script, _ = sbatch_script(out)
    assert '--ntasks-per-node=1' in directives(script) and '--gpus-per-node=8' in directives(script)
    assert 'export JAX_COORDINATOR_PORT=23456' in script
    assert f'--workdir={tmp_path}/runs/x' in script[-1]  # made absolute: the job may start elsewhere


@pytest.mark.parametrize(
    ('args', 'message'),
    [((), '--workdir is required'), (('--workdir', 'x', '--per', 'socket'), "--per must be 'gpu' or 'node'"),
     (('--workdir', 'x', '--nodes', '0'), '--nodes must be a positive integer'),
     (('--workdir', 'x', '--env', 'NOEQUALS'), '--env needs KEY=VALUE')],
)  # fmt: skip
def test_slurm_refuses_with_one_line(args, message):
    result = launch(SLURM, *args, '--dry-run')
    assert result.returncode == 2 and message in result.stderr


FAKE_SBATCH = """#!/usr/bin/env bash
# Runs the batch script at once on this machine, with the variables sbatch sets.
script=$1
nodes=$(sed -n 's/^#SBATCH --nodes=//p' "$script")
per_node=$(sed -n 's/^#SBATCH --ntasks-per-node=//p' "$script")
out=$(sed -n 's/^#SBATCH --output=//p' "$script" | sed 's/%x/job/; s/%j/4242/')
SLURM_JOB_ID=4242 SLURM_NNODES=$nodes SLURM_NTASKS=$((nodes * per_node)) SLURM_NODELIST=localhost \
  bash "$script" > "$out" 2>&1
echo "Submitted batch job 4242"
"""

FAKE_SRUN = """#!/usr/bin/env bash
# Starts SLURM_NTASKS copies of the command on this machine with the variables srun gives each task.
while [[ $1 == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_STEP_NODELIST=localhost SLURM_STEP_NUM_NODES=1 SLURM_PROCID=$i SLURM_LOCALID=$i "$@" > "task$i.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
cat task*.log
exit $status
"""


@pytest.mark.slow
def test_slurm_job_trains_with_two_processes(tmp_path):
    """The generated sbatch script, run by a fake sbatch / srun: two JAX processes find each other through SLURM's
    variables alone (--distributed=auto) and train the toy method; only process 0 logs."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    write_executable(bin_dir / 'sbatch', FAKE_SBATCH)
    write_executable(bin_dir / 'srun', FAKE_SRUN)
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}')
    for name in [n for n in env if n.startswith('SLURM_')]:
        del env[name]
    workdir = tmp_path / 'run'
    result = launch(
        SLURM, '--nodes', '1', '--gpus-per-node', '2', '--python', sys.executable, '--port', str(port),
        '--env', f'PYTHONPATH={TESTS}:{ROOT}', '--env', 'JAX_PLATFORMS=cpu',
        '--env', 'XLA_FLAGS=--xla_force_host_platform_device_count=2',
        '--config', os.path.join(TESTS, 'ema_toy_method.py'), '--workdir', str(workdir),
        '--', '--config.train.steps=3', '--config.train.tensorboard=false',
        env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    job_output = (tmp_path / 'slurm-logs' / 'job-4242.out').read_text()
    assert result.returncode == 0 and 'Submitted batch job' in result.stdout, result.stderr + job_output[-3000:]
    assert '2 process(es)' in job_output and 'step 3/3' in job_output, job_output[-3000:]
    assert job_output.count('step 3/3') == 1  # process 1 does not log
    assert (workdir / 'summary.json').is_file() and (workdir / 'checkpoints' / '3').is_dir()


def test_scripts_pass_shellcheck():
    shellcheck = shutil.which('shellcheck')
    assert shellcheck is not None, 'shellcheck is not installed: apt-get install -y shellcheck (.ci/run does)'
    result = subprocess.run([shellcheck, TPU, SLURM], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
