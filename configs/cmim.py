"""cMIM (Livne, arXiv 2411.10548 / 2509.21511): a Mutual Information Machine (A-MIM) with cMIM's contrastive term on
images, and informative embeddings from the decoder's hidden states.

Arguments (comma separated after the file name):
  epochs=50        training epochs over the images
  runlocal         tiny shapes on the built-in MNIST digits, for a CPU
Examples:
  --config=configs/cmim.py --config.input.data_root=/data/medmnist   (<root>/train/<class>/<image>, val/ likewise)
  --config=configs/cmim.py:runlocal
  --config=configs/cmim.py:runlocal --config.loss.contrastive_weight=0   (plain A-MIM, the baseline cMIM improves on)
Recipe: the cMIM papers' image network and schedule are not public. The objective follows the reference
implementation of Livne's group (temperature 0.1, unit weights, log sigma floored at -6); Adam at 1e-3 and batch 128
follow the MIM repository (the lr scales with the batch, as everywhere here). Sources:
shared/reference/methods/text_eeg_misc_mcl_e2s2_speecht5_eegformer_medical_cmim_fst.md and docs/methods.md.
"""

import ml_collections

from jaxssl.config import add_trainer_defaults, parse_arg
from jaxssl.data.images import add_image_input_config
from jaxssl.evaluate.frozen import add_probe_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, epochs=50, runlocal=False)

    c = ml_collections.ConfigDict()
    c.method = 'cmim'
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.widths = (16, 32) if arg.runlocal else (32, 64, 128)  # one stride-2 conv each
    c.model.hidden = 128 if arg.runlocal else 512
    c.model.latent = 16 if arg.runlocal else 64
    c.model.channels = 1 if arg.runlocal else 3  # 1: grey images (the built-in MNIST digits), RGB averaged

    c.loss = ml_collections.ConfigDict()
    c.loss.contrastive_weight = 1.0  # 0: A-MIM without cMIM's term
    c.loss.temperature = 0.1  # the reference implementation's default
    c.loss.reconstruction_weight = 1.0
    # 'sum': the true log p(x|z), the MIM objective's term; 'mean': the cMIM reference's per-sample mean of the
    # cross entropy (over its tokens; here over pixels), which gave weaker digit features (docs/methods.md).
    c.loss.reconstruction_reduction = 'sum'

    add_image_input_config(c, runlocal=arg.runlocal)
    c.input.image_size = 32  # MNIST-like images, padded / resized to a multiple of 2^len(model.widths)
    c.input.eval_crop_pct = 1.0  # the whole image, resized: cMIM needs no augmentation
    c.input.global_batch = 64 if arg.runlocal else 128

    c.optim = ml_collections.ConfigDict()
    c.optim.name = 'adamw'  # with weight_decay 0: Adam
    c.optim.base_lr = 1e-3 * 256 / c.input.global_batch  # lr = base_lr x batch / 256: 1e-3 at this batch
    c.optim.min_lr = c.optim.base_lr  # constant
    c.optim.warmup_epochs = 0
    c.optim.epochs = arg.epochs
    c.optim.warmup_steps = 0
    c.optim.momentum = 0.9
    c.optim.trust_coefficient = 1e-3
    c.optim.weight_decay = 0.0
    c.optim.clip_grad = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.no_decay = ()
    c.optim.lr_rules = ()

    add_trainer_defaults(c, runlocal=arg.runlocal)
    # Probes of mu(x) and of the informative embedding on the eval split.
    add_probe_config(c, label_keys=('label',), runlocal=arg.runlocal)
    c.eval.pictures = 8  # inputs, reconstructions and prior samples written at each evaluation
    if arg.runlocal:
        c.train.steps = 300
        c.eval.at_end = True
        c.train.log_every = 50
        c.checkpoint.every = 300
    return c
