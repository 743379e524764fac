"""UNI pretraining (Chen et al., Nature Medicine 2024): the DINOv2 recipe (DINO + iBOT + KoLeo) on a ViT-L/16.

Arguments (comma separated after the file name):
  variant=L        ViT encoder size from jaxssl.models.mae's table (micro, tiny, B, L, H; '/patch'); UNI: L/16
  epochs=100       UNI: 125k iterations of batch 3072 = 100 "epochs" of 1250 iterations (ssl_default_config)
  runlocal         tiny shapes on the built-in MNIST digits, for a CPU
Examples:
  --config=configs/uni.py --config.input.data_root=/data/tiles   (<root>/train/<class>/<image>)
  --config=configs/uni.py:runlocal
  --config=configs/uni.py --config.loss.centering=sinkhorn_knopp   (the DINOv2 vitl14 / vitg14 configs)
Reference recipe: facebookresearch/dinov2 configs/ssl_default_config.yaml, train/ssl_meta_arch.py, the UNI paper's
"DINOv2 default configuration" (shared/reference/methods/simclr_vicreg_dino_poa_uni.md section 4). Differences:
docs/methods.md.
"""

import math

import ml_collections

from jaxssl.config import add_trainer_defaults, parse_arg
from jaxssl.data.images import add_image_input_config
from jaxssl.evaluate.frozen import add_probe_config
from jaxssl.models.mae import decode_variant
from jaxssl.optim import layer_decay_rules


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, variant='L', epochs=100, runlocal=False)

    c = ml_collections.ConfigDict()
    c.method = 'uni'
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.variant = 'micro/4' if arg.runlocal else arg.variant
    c.model.head_layers = 3
    c.model.head_hidden = 256 if arg.runlocal else 2048
    c.model.head_bottleneck = 64 if arg.runlocal else 256
    c.model.head_out = 1024 if arg.runlocal else 65536  # prototypes
    c.model.norm_last_layer = False  # DINOv2 trains the weight-norm gain
    c.model.separate_ibot_head = False  # ssl_default_config: iBOT shares the DINO head
    c.model.ibot_out = 1024 if arg.runlocal else 65536  # used with separate_ibot_head
    c.model.ibot_hidden = 256 if arg.runlocal else 2048
    c.model.ibot_bottleneck = 64 if arg.runlocal else 256
    c.model.teacher_momentum = 0.992  # cosine to 1 over the run
    c.model.layer_norm_eps = 1e-6
    c.model.layer_scale_init = 1e-5
    c.model.drop_path_rate = 0.3  # the student's; the teacher runs without
    c.model.dtype = 'float32' if arg.runlocal else 'bfloat16'
    c.model.scan_layers = False
    c.model.remat = not arg.runlocal
    c.model.attention_impl = ''

    c.loss = ml_collections.ConfigDict()
    c.loss.student_temp = 0.1
    c.loss.warmup_teacher_temp = 0.04
    c.loss.teacher_temp = 0.07
    c.loss.warmup_teacher_temp_epochs = 30  # linear per step
    c.loss.center_momentum = 0.9
    c.loss.centering = 'centering'  # or 'sinkhorn_knopp'; which one UNI used is not published
    c.loss.sinkhorn_iterations = 3
    c.loss.koleo_weight = 0.1
    c.loss.ibot_weight = 1.0
    c.loss.mask_probability = 0.5  # share of the global crops masked
    c.loss.mask_ratio = (0.1, 0.5)  # share of a masked crop's patches

    add_image_input_config(c, runlocal=arg.runlocal)
    c.input.num_sample = 1
    c.input.global_crop_scale = (0.32, 1.0)
    # DINOv2's GaussianBlur passes 1 - p to RandomApply: the released recipe blurs g1 never, g2 with 0.9, locals 0.5.
    c.input.global_blur_probs = (0.0, 0.9)
    c.input.global_solarize_probs = (0.0, 0.2)
    c.input.local_crops_number = 4 if arg.runlocal else 8
    c.input.local_crop_size = 16 if arg.runlocal else 96
    c.input.local_crop_scale = (0.05, 0.32)
    c.input.local_blur_prob = 0.5
    c.input.jitter = (0.4, 0.4, 0.2, 0.1)
    c.input.jitter_prob = 0.8
    c.input.grayscale_prob = 0.2
    c.input.interpolation = 'bicubic'
    c.input.global_batch = 64 if arg.runlocal else 3072  # UNI: 32 GPUs x 96

    c.optim = ml_collections.ConfigDict()
    c.optim.name = 'adamw'
    # DINOv2's lr = 0.004 sqrt(B / 1024) (6.9e-3 at B = 3072), written as the trainer's base_lr x B / 256.
    batch = c.input.global_batch
    c.optim.base_lr = 0.004 * math.sqrt(batch / 1024) * 256 / batch
    c.optim.min_lr = 1e-6 * 256 / batch  # absolute 1e-6
    c.optim.warmup_epochs = 10
    c.optim.epochs = arg.epochs
    c.optim.warmup_steps = 0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.04
    c.optim.weight_decay_end = 0.4
    c.optim.clip_grad = 3.0
    c.optim.clip_mode = 'global'  # DINOv2 clips each FSDP module (backbone, heads) by its norm: see docs
    c.optim.freeze_epochs = (('(ibot_)?head/last_layer/.*', 1),)  # both heads' prototypes, the first epoch
    c.optim.no_decay = ()  # 1-D parameters (biases, norms, LayerScale) get no decay
    # Layer-wise lr decay 0.9; the patch embedding a further x 0.2 (utils/param_groups.py).
    depth = decode_variant(c.model.variant)['depth']
    layer0 = 0.9 ** (depth + 1)
    c.optim.lr_rules = (('patch_embed/.*', 0.2 * layer0), ('mask_token', layer0), *layer_decay_rules(depth, 0.9))

    add_trainer_defaults(c, runlocal=arg.runlocal)
    add_probe_config(c, label_keys=('label',), runlocal=arg.runlocal)
    if arg.runlocal:
        c.optim.warmup_steps = 30
        c.loss.warmup_teacher_temp_epochs = 1
        c.train.steps = 60
        c.eval.at_end = True
        c.train.log_every = 10
        c.checkpoint.every = 60
    return c
