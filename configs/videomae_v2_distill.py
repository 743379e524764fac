"""VideoMAE V2 distillation: a frozen fine-tuned teacher (ViT-g in the paper) teaches a smaller student classifier.

The fine-tuning recipe (configs/videomae_v2_finetune.py, same arguments) for the student, plus the `distill`
section. The reference releases distilled ViT-S / ViT-B (K710, teacher vit_g_hybrid_pt_1200e_k710_ft, students
initialised from their post-pre-trained models) but no distillation code: the loss and its weights are assumptions
(docs/methods.md, "VideoMAE V2 distillation").

Arguments (comma separated after the file name): those of configs/videomae_v2_finetune.py (default recipe=k710).
Examples:
  --config=configs/videomae_v2_distill.py:variant=B --config.distill.teacher=params/vit_g_k710_ft
      --config.init_from=params/vit_b_k710_ft --config.init_from_select="'.*'"
  --config=configs/videomae_v2_distill.py:runlocal --config.distill.teacher=runs/videomae_v2_finetune_runlocal
"""

import importlib.util
import os

import ml_collections

from jaxssl.config import parse_arg


def _finetune_config(arg: str | None) -> ml_collections.ConfigDict:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'videomae_v2_finetune.py')
    spec = importlib.util.spec_from_file_location('jaxssl_config_videomae_v2_finetune', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    parsed = parse_arg(arg, variant='B', recipe='k710', layer_decay=0.0, runlocal=False)
    items = [f'variant={parsed.variant}', f'recipe={parsed.recipe}', f'layer_decay={parsed.layer_decay}']
    c = _finetune_config(','.join(items + (['runlocal'] if parsed.runlocal else [])))
    c.method = 'videomae_distill'
    c.distill = ml_collections.ConfigDict()
    c.distill.teacher = ''  # a fine-tuned classifier: params directory (python -m jaxssl.convert) or workdir
    c.distill.teacher_variant = ''  # '' reads the teacher's size from its metadata / config.json
    c.distill.alpha = 0.5  # weight of the distillation term; 1 - alpha weighs the label cross-entropy
    c.distill.temperature = 1.0  # softens both distributions; the KL term is scaled by T^2
    c.distill.feature_weight = 0.0  # > 0 adds MSE(projected student pooled features, teacher pooled features)
    return c
