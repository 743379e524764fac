"""DINO pretraining (Caron et al., ICCV 2021): student and EMA teacher, multi-crop, centring and sharpening, AdamW.

Arguments (comma separated after the file name):
  variant=B        ViT encoder size: micro, tiny, S-like sizes from jaxssl.models.mae's table (B, L, H; '/patch'),
                   or resnet18 / resnet34 / resnet50 / resnet101 with the README's ResNet-50 recipe (SGD lr 0.03, ...)
  epochs=100       100 (the ablations), 300 or 800 (the headline runs); 10 of them warm up
  runlocal         tiny shapes on the built-in MNIST digits, for a CPU (a ResNet variant: width 16, CIFAR stem)
  small_data       the settings of lightly's CIFAR-10 benchmark, which start self-distillation on small datasets
                   where the paper's recipe stays at the uniform collapse (docs/methods.md, DINO section): 2 global
                   crops (0.4, 1) and no local crops, BatchNorm in the head, 2048 prototypes, teacher momentum 0.99,
                   teacher temperature 0.04, SGD lr 0.06 x batch / 128 with weight decay 5e-4, no clipping or freezing
Examples:
  --config=configs/dino.py:variant=B --config.input.data_root=/data/imagenet   (<root>/train/<class>/<image>)
  --config=configs/dino.py:runlocal
  --config=configs/dino.py:runlocal,variant=resnet18
  --config=configs/dino.py:runlocal,variant=resnet18,small_data   (3,000 steps: the probes gain 20+ points)
Reference recipe: facebookresearch/dino (main_dino.py, vision_transformer.py, utils.py; the paper's ViT-B/16 run:
batch 1024, 2 x 224 global + 10 x 96 local crops in the paper / 8 in the code default, teacher temperature 0.04 -> 0.07
over 30 epochs; ResNet-50: the README's command, SGD lr 0.03, weight decay 1e-4, crops (0.14, 1) / (0.05, 0.14), the
code's teacher temperature 0.04, batch 8 x 64), shared/reference/methods/simclr_vicreg_dino_poa_uni.md.
Differences: docs/methods.md.
"""

import ml_collections

from jaxssl.config import add_backbone_config, add_trainer_defaults, parse_arg
from jaxssl.data.images import add_image_input_config
from jaxssl.evaluate.frozen import add_probe_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, variant='B', epochs=100, runlocal=False, small_data=False)

    c = ml_collections.ConfigDict()
    c.method = 'dino'
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    resnet = add_backbone_config(c, arg.variant, arg.runlocal)
    c.model.head_layers = 3
    c.model.head_hidden = 256 if arg.runlocal else 2048
    c.model.head_bottleneck = 64 if arg.runlocal else 256
    c.model.head_out = 1024 if arg.runlocal else 65536  # prototypes (the head's out_dim)
    c.model.norm_last_layer = True  # the code default (README: True for ViT-B, False for ViT-S)
    c.model.head_use_bn = False  # --use_bn_in_head: BatchNorm after the head's hidden Linears (default off)
    c.model.teacher_momentum = 0.996  # cosine to 1 over the run
    c.model.layer_norm_eps = 1e-6
    c.model.drop_path_rate = 0.1  # the student's; the teacher runs without
    c.model.dtype = 'float32' if arg.runlocal else 'bfloat16'  # compute dtype; parameters stay float32
    c.model.scan_layers = False
    c.model.remat = arg.variant.startswith('H')
    c.model.attention_impl = ''  # '' lets XLA choose; 'cudnn' forces cuDNN flash attention on GPUs

    c.loss = ml_collections.ConfigDict()
    c.loss.student_temp = 0.1
    c.loss.warmup_teacher_temp = 0.04
    c.loss.teacher_temp = 0.07  # the paper's ViT-B recipe (the code default: 0.04)
    c.loss.warmup_teacher_temp_epochs = 30  # linear per epoch (the code default: 0)
    c.loss.center_momentum = 0.9

    add_image_input_config(c, runlocal=arg.runlocal)
    c.input.num_sample = 1  # one sample per image whose crops are the groups below
    c.input.global_crop_scale = (0.4, 1.0)  # main_dino.py's default with multi-crop
    c.input.global_blur_probs = (1.0, 0.1)  # one per global crop
    c.input.global_solarize_probs = (0.0, 0.2)  # the second global crop only
    c.input.local_crops_number = 4 if arg.runlocal else 8
    c.input.local_crop_size = 16 if arg.runlocal else 96
    c.input.local_crop_scale = (0.05, 0.4)
    c.input.local_blur_prob = 0.5
    c.input.jitter = (0.4, 0.4, 0.2, 0.1)  # torchvision ColorJitter(brightness, contrast, saturation, hue)
    c.input.jitter_prob = 0.8
    c.input.grayscale_prob = 0.2  # no effect on the grey digits (nor saturation / hue in the jitter)
    c.input.interpolation = 'bicubic'
    c.input.global_batch = 64 if arg.runlocal else 1024

    c.optim = ml_collections.ConfigDict()
    c.optim.name = 'adamw'  # or 'sgd' (the ResNet recipe)
    c.optim.momentum = 0.9  # sgd's
    c.optim.base_lr = 5e-4  # lr = base_lr * global_batch / 256
    c.optim.min_lr = 1e-6  # scaled by global_batch / 256 here (the reference's 1e-6 is absolute)
    c.optim.warmup_epochs = 10
    c.optim.epochs = arg.epochs
    c.optim.warmup_steps = 0  # > 0 overrides warmup_epochs
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.04
    c.optim.weight_decay_end = 0.4  # cosine over the run, per step
    c.optim.clip_grad = 3.0
    c.optim.clip_mode = 'per_tensor'  # utils.clip_gradients: each tensor's gradient norm on its own
    # freeze_last_layer: the prototypes get no update (nor decay, nor Adam moments) in the first epoch.
    c.optim.freeze_epochs = (('head/last_layer/.*', 1),)
    c.optim.no_decay = ()  # 1-D parameters (biases, norms) get no decay, as the reference's param groups
    c.optim.lr_rules = ()

    if resnet:
        # The README's ResNet-50 command (main_dino.py's defaults otherwise: the teacher temperature 0.04 throughout).
        c.optim.name = 'sgd'
        c.optim.base_lr = 0.03
        c.optim.weight_decay = c.optim.weight_decay_end = 1e-4
        c.input.global_crop_scale = (0.14, 1.0)
        c.input.local_crop_scale = (0.05, 0.14)
        c.loss.teacher_temp = 0.04
        c.loss.warmup_teacher_temp_epochs = 0
        c.input.global_batch = 64 if arg.runlocal else 512  # 8 GPUs x 64

    add_trainer_defaults(c, runlocal=arg.runlocal)
    # Frozen-feature probes (linear, kNN) of the teacher backbone's cls token and mean patch token on the eval split.
    add_probe_config(c, label_keys=('label',), runlocal=arg.runlocal)
    if arg.runlocal:
        # A CPU-minute budget: 60 steps of 64 digits (2 x 32 px + 4 x 16 px crops each); an epoch is 62 steps. The
        # reference's lr, momentum and freezing (run b in docs/methods.md); warmup and the temperature ramp shortened.
        c.optim.warmup_steps = 30
        c.loss.warmup_teacher_temp_epochs = 0 if resnet else 1
        c.train.steps = 60
        c.eval.at_end = True
        c.train.log_every = 10
        c.checkpoint.every = 60
    if arg.small_data:
        # lightly-ai/lightly's CIFAR-10 benchmark (docs/.../cifar10_benchmark.py: ResNet-18, DINOProjectionHead with
        # BatchNorm, out_dim 2048, momentum 0.99, DINOLoss's constant 0.04, SGD 0.06 x batch / 128, wd 5e-4).
        c.input.local_crops_number = 0
        c.input.global_crop_scale = (0.4, 1.0)
        c.model.head_use_bn = True
        c.model.head_out = 2048
        c.model.teacher_momentum = 0.99  # still cosine to 1 over the run
        c.loss.teacher_temp = 0.04
        c.loss.warmup_teacher_temp_epochs = 0
        c.optim.name = 'sgd'
        c.optim.base_lr = 0.12  # x batch / 256 = lightly's 0.06 x batch / 128
        c.optim.weight_decay = c.optim.weight_decay_end = 5e-4
        c.optim.clip_grad = 0.0
        c.optim.freeze_epochs = ()
    return c
