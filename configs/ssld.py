"""SSLD (PaddleClas, arXiv 2103.05959): a student trained only on a frozen teacher's softmax through the symmetric-KL
"JS" loss (PaddleClas DMLLoss), on any images (labels unused), both on the shared ViT.

Arguments (comma separated after the file name): those of configs/sla.py but `sd` (variant=B, classes=1000, runlocal).
Examples:
  --config=configs/ssld.py:variant=S --config.distill.teacher=runs/teacher --config.input.data_root=/data/unlabelled
  --config=configs/ssld.py:runlocal --config.distill.teacher=runs/sla_runlocal   (an SLA+SD run's SD head teaches)
Reference recipe: PaddleClas docs (SSLD): teacher ResNeXt101_32x16d_wsl / ResNet50_vd_ssld, 360 epochs on ~5M
images, SGD with cosine warmup, then an ImageNet-1k fine-tune; this config keeps the ViT recipe of configs/sla.py.
"""

import importlib.util
import os

import ml_collections

from jaxssl.config import parse_arg


def _sla_config_module():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'sla.py')
    spec = importlib.util.spec_from_file_location('jaxssl_config_sla', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, variant='B', classes=1000, runlocal=False)
    c = ml_collections.ConfigDict()
    c.method = 'ssld'
    c.seed = 0
    _sla_config_module().add_classifier_config(c, arg)
    c.distill = ml_collections.ConfigDict()
    c.distill.teacher = ''  # a params directory (python -m jaxssl.convert) or a training workdir on the shared ViT
    c.distill.teacher_variant = ''  # '' reads the teacher's size from its metadata / workdir config.json
    return c
