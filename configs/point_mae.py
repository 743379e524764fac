"""Point-MAE pretraining (Pang et al., ECCV 2022): reconstruct masked point patches of 3-D point clouds.

Arguments (comma separated after the file name):
  variant=base     the reference's model (12 x 384 encoder, 4-block decoder, 64 patches of 32 points, 1,024 points);
                   micro (tests, CPU)
  runlocal         a micro model on the built-in synthetic shapes (512 points, 32 patches of 16), for a CPU
Examples:
  --config=configs/point_mae.py --config.input.data_root=/data/shapenet55   (<root>/train/<class>/<file>.npy)
  --config=configs/point_mae.py:runlocal
Reference recipe: Pang-Yatian/Point-MAE cfgs/pretrain.yaml (shared/reference/methods/
video_3d_lvmae_cdfslv_vedit_nerfmae_i2pmae_msm_gasp_profsa_pasta_prelude.md, section 5).
"""

import ml_collections

from jaxssl.config import add_trainer_defaults, parse_arg
from jaxssl.data.points import add_points_input_config
from jaxssl.evaluate.frozen import add_probe_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, variant='base', runlocal=False)

    c = ml_collections.ConfigDict()
    c.method = 'point_mae'
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.variant = 'micro' if arg.runlocal else arg.variant
    c.model.num_groups = 32 if arg.runlocal else 64
    c.model.group_size = 16 if arg.runlocal else 32
    c.model.drop_path_rate = 0.1

    c.mask = ml_collections.ConfigDict()
    c.mask.type = 'rand'  # 'rand' (pretrain.yaml) or 'block': the patches nearest a random one
    c.mask.ratio = 0.6  # exactly int(0.6 G) patches per cloud

    add_points_input_config(c, runlocal=arg.runlocal)

    c.optim = ml_collections.ConfigDict()
    c.optim.name = 'adamw'
    c.optim.schedule = 'cosine'  # CosLR: per-epoch warmup 10, cosine over 300 epochs
    c.optim.base_lr = 1e-3 * 256 / 128  # lr 0.001 at the reference's batch 128 (lr = base_lr * batch / 256)
    c.optim.min_lr = 1e-6 * 256 / 128  # timm CosineLRScheduler's lr_min 1e-6 (scaled with the batch like base_lr)
    c.optim.warmup_epochs = 10
    c.optim.warmup_steps = 0
    c.optim.epochs = 300
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.05
    c.optim.decay_vectors = False  # the reference's add_weight_decay skips biases and 1-D parameters
    c.optim.clip_grad = 0.0
    c.optim.no_decay = ()
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
