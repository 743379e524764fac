"""MAE continual pretraining over a sequence of tasks with the infinite lr schedule or repeated cosine (Singh et al.,
"Beyond Cosine Decay: On the effectiveness of Infinite Learning Rate Schedule for Continual Pre-training", 2025).

A task is one run of the trainer on one data segment (`input.classes`: class-incremental splits, 10 // tasks
classes each). Task k > 0 starts from task k - 1's weights (`--config.init_from=<task k-1 workdir>`, its last
checkpoint) with fresh optimiser state, and `optim.schedule_offset = k x steps per task` continues the lr schedule:
  infinite: task 0 warms up and cools down to the constant lr; every task ends with an exponential anneal, and a
            later task starts straight at the constant lr (no re-warming);
  cosine:   repeated cosine, one full warmup + cosine cycle per task (the paper's baseline).
Arguments (comma separated after the file name):
  task=0           which task this run trains (0 .. tasks - 1)
  tasks=5          number of tasks (the reference: CIFAR-10 in 5 tasks of 2 classes)
  schedule=infinite  'infinite' or 'cosine' (repeated cosine)
  variant=Ti/2     model size (the reference: ViT dim 192, 12 blocks, 3 heads, patch 2; 4-block decoder)
  runlocal         tiny shapes on the built-in MNIST digits (5 tasks of 2 digits), for a CPU
Examples (one run per task):
  for k in 0 1 2 3 4; do
    python -m jaxssl.main --config=configs/mae_continual.py:runlocal,task=$k --workdir=runs/inf_task$k \
      $([ $k -gt 0 ] && echo --config.init_from=runs/inf_task$((k - 1)))
  done
  --config=configs/mae_continual.py:schedule=cosine,task=0 --config.input.tfds_data_dir=/data/tfds
Reference recipe: Pauljanson002/MAE-1 (config.py, bin/mila/{infinite,cosine}.sh; fact sheet
shared/reference/methods/mmc_further_pretraining_uni4eye_infinite_lr.md): 400 epochs per task, batch 512, AdamW
(0.9, 0.95), wd 0.05, mask 0.75, pixel loss, no augmentation; infinite lr 6.813e-4 x 2, warmup 5%, cooldown (cosine)
to 0.75 x peak by 50%, constant to 80%, exponential anneal to 0.05 x peak; cosine lr 3.765e-4 x 2, 20 warmup epochs,
cosine to 0.05 x peak. Differences: no replay of earlier tasks, fresh Adam moments per task, and the next task
starts from the annealed weights (the reference reloads those taken before the anneal) (docs/training.md).
"""

import importlib.util
import os

import ml_collections

from jaxssl.config import ConfigError, parse_arg

SCHEDULES = ('infinite', 'cosine')
CLASSES = 10  # CIFAR-10 and the MNIST digits


def _mae_config(arg: str) -> ml_collections.ConfigDict:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'mae.py')
    spec = importlib.util.spec_from_file_location('jaxssl_config_mae', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, task=0, tasks=5, schedule='infinite', variant='Ti/2', runlocal=False)
    if arg.schedule not in SCHEDULES:
        raise ConfigError(f"bad value '{arg.schedule}' for config argument 'schedule'; valid: {', '.join(SCHEDULES)}")
    if not 1 <= arg.tasks <= CLASSES or not 0 <= arg.task < arg.tasks:
        raise ConfigError(f"config arguments need 1 <= 'tasks' <= {CLASSES} and 0 <= 'task' < tasks")
    c = _mae_config('runlocal' if arg.runlocal else f'variant={arg.variant}')
    per_task = CLASSES // arg.tasks
    c.input.classes = tuple(range(arg.task * per_task, (arg.task + 1) * per_task))
    c.loss.norm_pix_loss = False  # the reference's loss is on pixels
    c.input.crop_scale, c.input.crop_ratio, c.input.hflip = (1.0, 1.0), (1.0, 1.0), False  # no augmentation
    o = c.optim
    if arg.runlocal:
        steps, o.base_lr = 30, 4e-3 if arg.schedule == 'infinite' else 2e-3
        c.checkpoint.every, c.train.log_every = steps, 5
    else:
        c.input.dataset, c.input.tfds_name, c.input.image_size = 'tfds', 'cifar10', 32
        c.input.global_batch = 512
        c.eval.split = 'test'
        c.input.eval_crop_pct = 1.0  # 32 px images are probed whole
        # 400 epochs of the task's 2 x 5,000 images: 19 steps of 512 each (the last partial batch dropped).
        steps = 400 * (CLASSES // arg.tasks * 5000 // c.input.global_batch)
        o.base_lr = 6.813e-4 if arg.schedule == 'infinite' else 3.765e-4
    o.weight_decay = 0.05
    o.schedule = arg.schedule
    c.train.steps = o.task_steps = steps
    o.schedule_offset = arg.task * steps
    o.warmup_steps = max(int(0.05 * steps), 1)  # both: 5% (= 20 of 400 epochs for cosine)
    o.min_lr = 0.05 * o.base_lr  # cosine: to 0.05 x peak (min_lr is scaled by the batch as base_lr)
    o.cooldown, o.cooldown_ratio, o.constant_ratio = 'cosine', 0.5, 0.8
    o.constant_lr_ratio, o.min_lr_ratio = 0.75, 0.05
    return c
