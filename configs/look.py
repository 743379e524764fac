"""LOOK (Feng et al., ICLR 2022): supervised pretraining with a leave-one-out weighted kNN loss over the batch and a
FIFO memory of past embeddings, on the shared ViT.

Arguments (comma separated after the file name): those of configs/sla.py but `sd` (variant=B, classes=1000, runlocal).
Examples:
  --config=configs/look.py:variant=B --config.input.data_root=/data/imagenet   (<root>/train/<class>/<image>)
  --config=configs/look.py:runlocal
Reference recipe: none public (shared/reference/methods/mirrorbert_tjepa_sla_look_ssld.md section 4); k, the
temperature, the embedding size and the memory are this library's choices (docs/methods.md).
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
    c.method = 'look'
    c.seed = 0
    _sla_config_module().add_classifier_config(c, arg)
    c.loss = ml_collections.ConfigDict()
    c.loss.embed_dim = 128  # the linear projection of the cls token that the kNN compares (l2-normalised)
    c.loss.k = 50 if arg.runlocal else 200  # neighbours
    c.loss.temperature = 0.1
    c.loss.memory_size = 512 if arg.runlocal else 16384  # past embeddings kept (0: the batch alone)
    return c
