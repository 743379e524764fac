"""G-SimCLR stage 2 (Chakraborty et al., "G-SimCLR: Self-Supervised Contrastive Learning with Guided Projection via
Pseudo Labelling", 2020): SimCLR (configs/simclr.py, same arguments and recipe) whose every global batch holds
images of distinct pseudo labels, read from input.pseudo_labels.

Arguments: those of configs/simclr.py (variant=B, epochs=100, runlocal).
Steps:
  1. python -m jaxssl.main --config=configs/gsimclr_dae.py:runlocal --workdir=runs/dae
  2. python -m jaxssl.pseudo_labels --workdir=runs/dae --clusters=64      (writes runs/dae/pseudo_labels.npy)
  3. python -m jaxssl.main --config=configs/gsimclr.py:runlocal --config.input.pseudo_labels=runs/dae/pseudo_labels.npy
The number of clusters must be at least input.global_batch (the reference: 64 and 64). An epoch is as many batches
of distinct labels as the clusters allow (jaxssl.data.distinct_batches).
Reference recipe: ariG23498/G-SimCLR (*/SimCLR_Pseudo_Labels_Training.ipynb), shared/reference/methods/
simclr_vicreg_dino_poa_uni.md (1b). The reference's own SimCLR stage (ResNet, 3-layer head without BN, SGD, batch-
level colour augmentation without crops) is not copied: this is SimCLR's config, so the two differ only in the batches
(docs/methods.md).
"""

import importlib.util
import os

import ml_collections


def _simclr_config(arg: str | None) -> ml_collections.ConfigDict:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'simclr.py')
    spec = importlib.util.spec_from_file_location('jaxssl_config_simclr', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = _simclr_config(arg)
    c.method = 'gsimclr'
    c.input.pseudo_labels = ''  # the .npy from `python -m jaxssl.pseudo_labels` (one label per training image)
    return c
