"""LV-MAE pretraining (Naiman et al., ICCV 2025): an MAE over a long video's segment embeddings.

Arguments (comma separated after the file name):
  variant=base     the reference's model (encoder 32 blocks as wide as the 1,024-d embeddings, 16 heads; decoder
                   8 x 512); micro (tests, CPU)
  runlocal         a micro model on the built-in synthetic_hmm sequences (32-d, up to 32 segments), for a CPU
Examples:
  --config=configs/lv_mae.py --config.input.data_root=/data/lvu_langbind   (<root>/train/<class>/<video>.npy)
  --config=configs/lv_mae.py:runlocal
Each .npy holds one video's (segments, 1024) embeddings, in time order (the reference: LanguageBind_Video_Huge_V1.5_FT
on consecutive 5 s segments). Reference recipe: amazon-science/lv-mae README (shared/reference/methods/
video_3d_lvmae_cdfslv_vedit_nerfmae_i2pmae_msm_gasp_profsa_pasta_prelude.md, section 1).
"""

import ml_collections

from jaxssl.config import add_trainer_defaults, parse_arg
from jaxssl.data.embeddings import add_embedding_input_config
from jaxssl.evaluate.frozen import add_probe_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, variant='base', runlocal=False)

    c = ml_collections.ConfigDict()
    c.method = 'lv_mae'
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.variant = 'micro' if arg.runlocal else arg.variant

    c.mask = ml_collections.ConfigDict()
    c.mask.type = 'importance'  # 'importance' (the recommended command) or 'random'
    c.mask.ratio = 0.5  # the recommended command's (the argument default is 0.7)

    c.loss = ml_collections.ConfigDict()
    c.loss.type = 'mse'  # 'mse' or 'cosine' (the reference's --cos_loss)

    add_embedding_input_config(c, runlocal=arg.runlocal)

    c.optim = ml_collections.ConfigDict()
    c.optim.name = 'adamw'
    c.optim.schedule = 'cosine'
    c.optim.base_lr = 1e-3  # blr: lr = 1e-3 x 128 / 256 = 5e-4 at the reference's batch
    c.optim.min_lr = 0.0
    c.optim.warmup_epochs = 40
    c.optim.warmup_steps = 0
    c.optim.epochs = 151
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.05
    c.optim.decay_vectors = False  # timm's add_weight_decay: no decay on biases and 1-D parameters
    c.optim.clip_grad = 0.0
    c.optim.no_decay = ()  # the cls and mask tokens are decayed, as the reference's
    c.optim.lr_rules = ()

    add_trainer_defaults(c, runlocal=arg.runlocal)
    c.train.steps = 0  # 0: optim.epochs over the training set
    add_probe_config(c, label_keys=('label',), runlocal=arg.runlocal)
    c.eval.probes = ('linear', 'knn')
    if arg.runlocal:
        c.optim.base_lr = 1e-3 * 256 / c.input.global_batch
        c.optim.warmup_epochs = 0
        c.optim.warmup_steps = 30
        c.train.steps = 300
        c.eval.at_end = True
        c.train.log_every = 20
        c.checkpoint.every = 300
    return c
