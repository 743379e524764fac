"""Self-distillation for further pretraining (Lee et al., ICLR 2023) on MAE: step 2 of the recipe, the student
(re-initialised from the pretrained model) trained with the MAE loss plus an MSE to the cls feature of the frozen
further-pretrained teacher (jaxssl/methods/mae_self_distill.py).

Arguments (comma separated after the file name):
  variant=B        model size (student and teacher share it), as configs/mae.py
  runlocal         tiny shapes on the built-in MNIST digits, for a CPU
The recipe, with theta_0 a pretrained MAE (a params directory from python -m jaxssl.convert, or a workdir):
  1. python -m jaxssl.main --config=configs/mae.py:variant=B --config.init_from=THETA0 --workdir=runs/further \
       --config.input.data_root=/data/target  (plus this config's optimiser settings for the reference's recipe)
  2. python -m jaxssl.main --config=configs/mae_self_distill.py:variant=B --config.init_from=THETA0 \
       --config.distill.teacher=runs/further --config.input.data_root=/data/target --workdir=runs/self_distill
  3. probe or fine-tune runs/self_distill's encoder.
Reference recipe (seanie12/self-distillation, run_pretrain.sh / run_selftrain.sh; fact sheet
shared/reference/methods/mmc_further_pretraining_uni4eye_infinite_lr.md): ViT-B/16 MAE, mask 0.75, norm-pix loss,
20k steps of batch 64, AdamW (0.9, 0.95), lr 1.5e-4, wd 0.01 (none on 1-D params), no warmup, linear decay to 0,
no augmentation (resize only), distillation weight 1.
"""

import importlib.util
import os

import ml_collections

from jaxssl.config import parse_arg


def _mae_config(arg: str) -> ml_collections.ConfigDict:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'mae.py')
    spec = importlib.util.spec_from_file_location('jaxssl_config_mae', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, variant='B', runlocal=False)
    c = _mae_config('runlocal' if arg.runlocal else f'variant={arg.variant}')
    c.method = 'mae_self_distill'
    c.distill = ml_collections.ConfigDict()
    c.distill.teacher = ''  # step 1's further-pretrained MAE: a workdir (latest checkpoint) or a params directory
    c.distill.weight = 1.0  # the reference adds the two losses (two backward passes, gradients accumulated)
    # No augmentation: the reference only resizes (HF feature extractor); a square image is taken whole.
    c.input.crop_scale, c.input.crop_ratio, c.input.hflip = (1.0, 1.0), (1.0, 1.0), False
    o = c.optim
    o.schedule = 'linear'  # the HF Trainer default: linear decay to 0
    o.warmup_steps, o.warmup_epochs, o.min_lr = 0, 0, 0.0
    o.weight_decay = 0.01
    if arg.runlocal:
        o.warmup_steps = 5  # a CPU-minute budget (configs/mae.py:runlocal's lr)
    else:
        c.input.global_batch = 64
        o.base_lr = 1.5e-4 * 256 / 64  # lr = base_lr x batch / 256 = the reference's 1.5e-4 at batch 64
        c.train.steps = 20000
    return c
