"""AdvEncoder (Zhou et al., "Downstream-agnostic Adversarial Examples", ICCV 2023): a generator of one universal
perturbation or patch that moves a frozen SSL encoder's features of any image away from the clean ones.

Arguments (comma separated after the file name):
  form=perturbation   'perturbation' (gan_per_attack.py, L_inf 10/255) or 'patch' (gan_pat_attack.py, 3% of the
                      image)
  runlocal            tiny shapes on the built-in MNIST digits, for a CPU
Examples:
  --config=configs/adv_encoder.py --config.attack.victim=runs/simclr_r18 --config.input.data_root=/data/cifar10
  --config=configs/adv_encoder.py:runlocal --config.attack.victim=runs/simclr_runlocal_variant-resnet18
Reference: CGCL-codes/AdvEncoder@3dd1c4e, shared/reference/methods/tools_simcore_ctreduction_ssdd_ped_dkvb_advencoder_
rkhs.md section 6. The victim is any jaxssl image run (the reference's: solo-learn ResNet-18s).
"""

import ml_collections

from jaxssl.config import add_trainer_defaults, parse_arg
from jaxssl.data.images import add_image_input_config
from jaxssl.evaluate.frozen import add_probe_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, form='perturbation', runlocal=False)

    c = ml_collections.ConfigDict()
    c.method = 'adv_encoder'
    c.seed = 100  # the reference's default seed

    c.attack = ml_collections.ConfigDict()
    c.attack.victim = ''  # the workdir of the jaxssl image run to attack (its latest checkpoint)
    c.attack.victim_representation = ''  # which of its (N, D) representations; '': its only one
    c.attack.form = arg.form
    c.attack.epsilon = 10 / 255  # the perturbation's L_inf bound in [0, 1] pixels (--eps 10)
    c.attack.weight = 5.0  # alpha: the InfoNCE term's weight
    c.attack.temperature = 0.1  # InfoNCE's (the --temperature 0.5 flag is never read)
    c.attack.radius = 8  # the high-pass filter removes a disc of this radius around the spectrum's centre
    c.attack.patch_ratio = 0.03  # the patch's share of the image area (--noise_percentage)
    c.attack.patch_margin = 14  # pixels between the patch and the bottom-right corner

    c.generator = ml_collections.ConfigDict()
    c.generator.noise_dim = 100
    c.generator.filters = (1024, 512, 256, 128)  # 4 x 2^4 = 64 px patterns
    c.generator.noise_batch = 256  # B fixed noise vectors (the reference ties it to the batch size)

    add_image_input_config(c, runlocal=arg.runlocal)
    c.input.image_size = 64  # the reference resizes every dataset to 64 x 64
    c.input.hflip = False  # no augmentation
    c.input.eval_crop_pct = 1.0  # evaluation images whole, as the training ones
    c.input.global_batch = 256

    c.optim = ml_collections.ConfigDict()
    c.optim.name = 'adamw'  # weight decay 0: torch's Adam
    c.optim.base_lr = 2e-4 * 256 / c.input.global_batch  # lr 2e-4
    c.optim.min_lr = 0.0
    c.optim.schedule = 'constant'
    c.optim.warmup_steps = 0
    c.optim.warmup_epochs = 0
    c.optim.epochs = 20
    c.optim.weight_decay = 0.0
    c.optim.clip_grad = 0.0
    c.optim.b1 = 0.5
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.no_decay = ()
    c.optim.lr_rules = ()

    add_trainer_defaults(c, runlocal=arg.runlocal)
    add_probe_config(c, label_keys=('label',), runlocal=arg.runlocal)
    c.eval.at_end = True
    if arg.runlocal:
        c.input.image_size = 32
        c.generator.filters = (256, 128, 64)  # 4 x 2^3 = 32 px
        c.generator.noise_batch = 64
        c.input.global_batch = 64
        c.optim.base_lr = 2e-4 * 256 / c.input.global_batch
        c.train.steps = 300
        c.train.log_every = 25
        c.checkpoint.every = 100
    return c
