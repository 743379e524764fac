"""FST, learning from future (Du et al., NeurIPS 2022): semi-supervised segmentation of medical slices by a mean
teacher whose pseudo labels come from K virtual student steps ahead; a 2-D UNet trained on a few labelled volumes
and many unlabelled ones, evaluated by the teacher's Dice on test volumes.

Arguments (comma separated after the file name):
  mode=fst            'fst' (K = 3 look-ahead steps), 'mean_teacher' (K = 0) or 'supervised' (the labelled
                      slices alone: no unsupervised loss)
  runlocal            small UNet on the built-in cardiac phantoms (48 px), for a CPU
Examples:
  --config=configs/fst.py --config.input.data_root=/data/acdc_cropped
  --config=configs/fst.py:runlocal,mode=mean_teacher
Reference: usr922/FST@5b44c01 semi_seg (experiments/pascal/662/mt_fst/config.yaml: SGD 0.001, decoder x10,
momentum 0.9, weight decay 1e-4, poly 0.9, 16 + 16 images a step, EMA 0.99, drop_percent 80, K = 3),
shared/reference/methods/text_eeg_misc_mcl_e2s2_speecht5_eegformer_medical_cmim_fst.md section 11.
"""

import ml_collections

from jaxssl.config import ConfigError, add_trainer_defaults, fixed_lr, parse_arg

MODES = ('fst', 'mean_teacher', 'supervised')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, mode='fst', runlocal=False)
    if arg.mode not in MODES:
        raise ConfigError(f"bad value '{arg.mode}' for config argument 'mode'; valid: {', '.join(MODES)}")

    c = ml_collections.ConfigDict()
    c.method = 'fst'
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.channels = (16, 32, 64, 128, 128, 128)  # the global / local method's UNet (one width per level)
    c.model.classes = 4  # background included (ACDC: RV, Myo, LV)

    c.loss = ml_collections.ConfigDict()
    c.loss.unsup_weight = 0.0 if arg.mode == 'supervised' else 1.0  # unsupervised.loss_weight
    c.loss.drop_percent = 80.0  # pixels at or above this percentile of the teacher's entropy carry no pseudo label
    c.loss.ema_decay = 0.99  # the teacher's decay: min(1 - 1/(step + 1), ema_decay)
    c.loss.teacher_warmup_epochs = 1.0  # the teacher is the student in the reference's first epoch

    c.input = ml_collections.ConfigDict()
    c.input.dataset = 'cardiac_phantoms' if arg.runlocal else 'folder'  # or 'cardiac_phantoms' (built in)
    c.input.data_root = ''  # 'folder': <data_root>/<split>/*.npz with 'image' (Z, H, W) and 'label' (Z, H, W)
    c.input.split = 'train'  # the unlabelled volumes (their labels, if any, are not read)
    c.input.labelled_split = 'val'  # the labelled volumes are its first `labelled_volumes`
    c.input.labelled_volumes = 2
    c.input.image_size = 48 if arg.runlocal else 192
    c.input.global_batch = 16  # labelled slices a step, and as many unlabelled ones (the reference's 16 + 16)
    c.input.num_sample = 1
    c.input.num_workers = 0 if arg.runlocal else 8
    c.input.read_threads = 2 if arg.runlocal else 1

    c.optim = ml_collections.ConfigDict()
    c.optim.name = 'sgd'
    c.optim.momentum = 0.9
    # lr = base_lr x global_batch / 256: the reference's 0.001 for the encoder whatever the batch.
    c.optim.base_lr = fixed_lr(c, 1e-3)
    c.optim.min_lr = 0.0  # unused by the poly schedule
    c.optim.schedule = 'poly'
    c.optim.poly_power = 0.9
    c.optim.warmup_steps = 0
    c.optim.warmup_epochs = 0
    c.optim.epochs = 40
    c.optim.weight_decay = 1e-4
    c.optim.decay_vectors = True  # every parameter, BatchNorm and biases too (torch SGD's weight_decay)
    c.optim.clip_grad = 0.0
    c.optim.no_decay = ()
    c.optim.lr_rules = (('(decoder|head)/.*', 10.0),)  # the reference's decoder group: 10 x the lr

    add_trainer_defaults(c, runlocal=arg.runlocal)
    c.train.steps = 0  # optim.epochs x unlabelled volumes / global batch (one random slice per volume visit)
    c.train.lookahead_steps = 3 if arg.mode == 'fst' else 0  # the reference's hard-coded 3

    c.eval.test_split = 'test'
    c.eval.test_volumes = 20
    c.eval.at_end = True
    if arg.runlocal:
        c.model.channels = (8, 16, 32, 32, 32)  # 48 -> 3 px at the bottleneck
        c.input.global_batch = 8  # one labelled and one unlabelled slice per fake CPU device in the sharding tests
        c.optim.base_lr = fixed_lr(c, 5e-2)  # from a random init, not an ImageNet encoder: 50x
        c.train.steps = 1000
        c.train.log_every = 25
        c.checkpoint.every = 100
        c.eval.test_volumes = 10
    return c
