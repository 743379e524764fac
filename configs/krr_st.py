"""KRR-ST (Lee et al., "Self-Supervised Dataset Distillation for Transfer Learning", ICLR 2024): a small set of
learnable images and target representations whose kernel ridge regression head, on the features of a pool of
briefly trained ConvNets, reproduces a frozen SSL teacher's representations of real images.

Arguments (comma separated after the file name):
  data=cifar100    the reference's presets: cifar100 (1,000 images at 32 px, ConvNet 128-256-512), tinyimagenet
                   (2,000 at 64 px, 64-128-256-512), imagenet (1,000 at 64 px) or imagenette (10 at 224 px,
                   32-64-128-256-512)
  runlocal         tiny shapes on the built-in MNIST digits, for a CPU
Examples:
  --config=configs/krr_st.py --config.distill.teacher=runs/simclr_r18 --config.input.data_root=/data/cifar100
  --config=configs/krr_st.py:runlocal --config.distill.teacher=runs/simclr_runlocal_variant-resnet18
Reference: db-Lee/selfsup_dd (train.py, algorithms/distill.py, model_pool.py), shared/reference/methods/
tools_simcore_ctreduction_ssdd_ped_dkvb_advencoder_rkhs.md section 3. The teacher is any jaxssl image run (the
reference's: Barlow Twins ResNet-18, 512-d pooled features); '' gives a frozen random ConvNet (tests only).
"""

import ml_collections

from jaxssl.config import add_trainer_defaults, parse_arg
from jaxssl.data.images import add_image_input_config
from jaxssl.evaluate.frozen import add_probe_config

# data preset -> (distilled images, image size, ConvNet widths, outer lr): train.py's table and the README's lrs.
PRESETS = {
    'cifar100': (1000, 32, (128, 256, 512), 1e-4),
    'tinyimagenet': (2000, 64, (64, 128, 256, 512), 1e-5),
    'imagenet': (1000, 64, (64, 128, 256, 512), 1e-5),
    'imagenette': (10, 224, (32, 64, 128, 256, 512), 1e-3),  # the argparse default lr (the README gives none)
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, data='cifar100', runlocal=False)
    if arg.data not in PRESETS:
        raise ValueError(f"unknown data preset '{arg.data}'; valid: {', '.join(PRESETS)}")
    images, size, channels, lr = PRESETS[arg.data]
    if arg.runlocal:
        images, size, channels = 100, 32, (32, 64, 128)

    c = ml_collections.ConfigDict()
    c.method = 'krr_st'
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.channels = channels  # the pool's and the evaluation's ConvNet: one width per conv block
    c.model.norm = 'batch'  # 'batch' (the reference's _bn), 'instance' or 'none'

    c.distill = ml_collections.ConfigDict()
    c.distill.num_images = images  # m: distilled images, initialised as m random training images
    c.distill.teacher = ''  # a jaxssl image run's workdir (its latest checkpoint); '': a frozen random ConvNet
    c.distill.teacher_representation = ''  # which of the teacher's representations; '': its only one
    c.distill.pool_size = 10  # l: ConvNets in the model pool
    c.distill.pool_steps = 1000  # a pool model is re-initialised after this many updates (online_iteration)
    c.distill.pool_lr = 0.1  # the pool's SGD (online_lr, momentum 0.9, online_wd)
    c.distill.pool_momentum = 0.9
    c.distill.pool_weight_decay = 1e-3
    c.distill.ridge = 1e-6  # lambda = ridge x trace(K_ss)
    c.distill.crop_padding = 4  # the real images' RandomCrop(padding=4) (then the flip, if input.hflip)

    add_image_input_config(c, runlocal=arg.runlocal)
    c.input.image_size = size
    c.input.hflip = not arg.runlocal  # a mirrored digit is another shape
    c.input.eval_crop_pct = 1.0  # evaluation images whole, as the real batches (the reference's tensors)
    c.input.global_batch = 128 if arg.runlocal else 1024  # real images per outer step (outer_batch_size)

    c.optim = ml_collections.ConfigDict()
    c.optim.name = 'adamw'  # AdamW with weight decay 0 on the images and targets (outer_opt)
    c.optim.base_lr = lr * 256 / c.input.global_batch  # lr = base_lr x global_batch / 256
    c.optim.min_lr = c.optim.base_lr * 1e-3  # torch LinearLR from 1 to 1e-3 over the run
    c.optim.schedule = 'linear'
    c.optim.warmup_steps = 0
    c.optim.warmup_epochs = 0
    c.optim.epochs = 1  # unused: train.steps counts outer steps
    c.optim.weight_decay = 0.0
    c.optim.clip_grad = 0.0  # outer_grad_norm 0: off
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.no_decay = ()
    # X_s is stored ImageNet-normalised, where one unit is 1 / std (~4.4) pixel units; the reference's X_s is in
    # [0, 1] pixels. Adam moves each value by ~lr in its own units, so the images' lr is x 1 / mean(std) to move
    # them as far in pixels as the reference's.
    c.optim.lr_rules = (('^images$', 1 / 0.226),)

    add_trainer_defaults(c, runlocal=arg.runlocal)
    c.train.steps = 160_000  # outer_iteration

    # The meta-test: a fresh ConvNet pretrained on the set (MSE to the targets; pre_* of train.py), then frozen
    # probes of its flattened features on real images. With `baselines`, the same for the initial set (m random
    # real images with the teacher's targets: the paper's 'random' baseline) and for a random-init ConvNet.
    add_probe_config(c, label_keys=('label',), runlocal=arg.runlocal)
    c.eval.pretrain_epochs = 1000
    c.eval.pretrain_batch = 256
    c.eval.pretrain_lr = 0.1
    c.eval.pretrain_momentum = 0.9
    c.eval.pretrain_weight_decay = 1e-3
    c.eval.baselines = True
    c.eval.every = 16_000
    c.eval.at_end = True
    if arg.runlocal:
        c.distill.pool_steps = 30
        c.optim.base_lr = 1e-3 * 256 / c.input.global_batch
        c.optim.min_lr = c.optim.base_lr * 1e-3
        c.train.steps = 300
        c.train.log_every = 25
        c.checkpoint.every = 100
        c.eval.every = 0
        c.eval.pretrain_epochs = 300
    return c
