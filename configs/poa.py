"""POA pretraining (Xu et al., ECCV 2024): DINOv2 self-distillation (configs/uni.py's recipe) with an elastic student;
one ViT-L/16 run yields ViTs of every (width, depth) in its list.

Arguments (comma separated after the file name):
  variant=L        the intact ViT (jaxssl.models.mae's table; '/patch'); POA: L/16 with sub-networks down to 384 x 12
  epochs=346       346 x 800 iterations of batch 1600 (the reference's "effective 1200 epochs")
  runlocal         tiny shapes on the built-in MNIST digits, for a CPU (a 64-wide, 2-deep intact ViT)
Examples:
  --config=configs/poa.py --config.input.data_root=/data/imagenet   (<root>/train/<class>/<image>)
  --config=configs/poa.py:runlocal
Reference recipe: alipay/POA poa/configs/vit_ssl_default_config.yaml and train/vit_ee1200.yaml
(shared/reference/methods/simclr_vicreg_dino_poa_uni.md section 5). Differences: docs/methods.md.
"""

import importlib.util
import math
import os

import ml_collections

from jaxssl.config import parse_arg


def _uni_config(arg: str) -> ml_collections.ConfigDict:
    """configs/uni.py's DINOv2 recipe, which POA's defaults change below."""
    path = os.path.join(os.path.dirname(__file__), 'uni.py')
    spec = importlib.util.spec_from_file_location('jaxssl_config_uni', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, variant='L', epochs=346, runlocal=False)
    c = _uni_config(f'variant={arg.variant},epochs={arg.epochs}' + (',runlocal' if arg.runlocal else ''))
    c.method = 'poa'

    # The elastic student: widths elastic_min_width..width in head-width steps, depths elastic_min_depth..depth.
    c.model.elastic_min_width = 32 if arg.runlocal else 384
    c.model.elastic_min_depth = 1 if arg.runlocal else 12
    c.model.elastic_select_scale = 3.0  # net_select_scale: small networks drawn up to 3 x 3 times as often
    c.model.drop_path_rate = 0.2
    c.model.teacher_momentum = 0.992  # cosine to 1 (the reference ends at 0.9999)

    c.loss.centering = 'sinkhorn_knopp'
    c.loss.lambda_ie = 0.8  # the intact student's share; the elastic one gets 1 - lambda, as does the distillation
    c.loss.ibot_start_epochs = 0 if arg.runlocal else 30  # ibot_activate_epochs

    c.input.global_batch = 64 if arg.runlocal else 1600  # 32 GPUs x 50
    batch = c.input.global_batch
    c.optim.base_lr = 0.004 * math.sqrt(batch / 1024) * 256 / batch  # 0.004 sqrt(B / 1024), as base_lr x B / 256
    c.optim.min_lr = 2e-5 * 256 / batch  # absolute 2e-5
    c.optim.clip_grad = 1.5
    return c
