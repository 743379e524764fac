"""I2P-MAE pretraining (Zhang et al., CVPR 2023): a hierarchical point-cloud MAE whose masks and second target come
from a frozen CLIP looking at the cloud's three axis projections.

Arguments (comma separated after the file name):
  variant=base     the reference's model (encoder [96, 192, 384] x [5, 5, 5], scales 512 x 16, 256 x 8, 64 x 8 of
                   2,048 points); micro (tests, CPU)
  runlocal         a micro model on the built-in synthetic shapes (512 points, scales 128 x 16, 64 x 8, 16 x 8),
                   guided by a random, frozen micro CLIP at 64 px, for a CPU
Examples:
  --config=configs/i2p_mae.py --config.input.data_root=/data/shapenet55
      --config.teacher.path=/models/clip-vit-base-patch16   (a transformers CLIPModel folder)
  --config=configs/i2p_mae.py:runlocal
Reference recipe: ZrrSkywalker/I2P-MAE cfgs/pre-training/i2p-mae.yaml (shared/reference/methods/
video_3d_lvmae_cdfslv_vedit_nerfmae_i2pmae_msm_gasp_profsa_pasta_prelude.md, section 5).
"""

import ml_collections

from jaxssl.config import add_trainer_defaults, parse_arg
from jaxssl.data.points import add_points_input_config
from jaxssl.evaluate.frozen import add_probe_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, variant='base', runlocal=False)

    c = ml_collections.ConfigDict()
    c.method = 'i2p_mae'
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.variant = 'micro' if arg.runlocal else arg.variant
    c.model.num_groups = (128, 64, 16) if arg.runlocal else (512, 256, 64)
    c.model.group_sizes = (16, 8, 8)
    c.model.drop_path_rate = 0.1

    c.mask = ml_collections.ConfigDict()
    c.mask.type = 'guided'  # 'guided' (the paper's 2-D-guided masks) or 'rand' (uniform, the reference's rand_mask)
    c.mask.ratio = 0.8  # of the coarsest groups; finer groups follow

    c.teacher = ml_collections.ConfigDict()
    c.teacher.kind = 'random_clip' if arg.runlocal else 'clip'  # 'clip': teacher.path; 'random_clip': tests
    c.teacher.path = ''  # a transformers CLIPModel folder (openai/clip-vit-base-patch16) or a jaxssl CLIP workdir
    c.teacher.variant = 'micro' if arg.runlocal else 'B/16'  # random_clip's size (jaxssl.models.clip.VARIANTS)
    c.teacher.image_size = 64 if arg.runlocal else 224
    c.teacher.dtype = 'float32'  # the reference runs CLIP in fp16 on GPUs

    c.loss = ml_collections.ConfigDict()
    c.loss.weight_2d = 1.0  # loss = Chamfer-L2 + weight_2d x feature MSE (the reference's 1 : 1)

    add_points_input_config(c, runlocal=arg.runlocal)
    c.input.num_points = 512 if arg.runlocal else 2048
    c.input.global_batch = 32 if arg.runlocal else 64

    c.optim = ml_collections.ConfigDict()
    c.optim.name = 'adamw'
    c.optim.schedule = 'cosine'  # per-step warmup and cosine (the reference's CosLR: docs/methods.md)
    c.optim.base_lr = 1e-3 * 256 / 64  # lr 0.001 at the reference's batch 64 (lr = base_lr * batch / 256)
    c.optim.min_lr = 1e-6 * 256 / 64  # timm CosineLRScheduler's lr_min 1e-6 (scaled with the batch like base_lr)
    c.optim.warmup_epochs = 10
    c.optim.warmup_steps = 0
    c.optim.epochs = 300
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.05
    c.optim.decay_vectors = False  # the reference's add_weight_decay skips biases and 1-D parameters
    c.optim.clip_grad = 0.0
    c.optim.no_decay = ('.*token.*',)  # ... and every parameter whose name holds 'token' (tokenizers, mask token)
    c.optim.lr_rules = ()

    add_trainer_defaults(c, runlocal=arg.runlocal)
    c.train.steps = 0  # 0: optim.epochs over the training set
    add_probe_config(c, label_keys=('label',), runlocal=arg.runlocal)
    c.eval.probes = ('linear', 'knn')
    if arg.runlocal:
        c.optim.base_lr = 2e-3 * 256 / c.input.global_batch
        c.optim.warmup_epochs = 0
        c.optim.warmup_steps = 30
        c.train.steps = 300
        c.eval.at_end = True
        c.train.log_every = 20
        c.checkpoint.every = 300
    return c
