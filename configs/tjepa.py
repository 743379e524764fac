"""T-JEPA pretraining on a table (Thimonier et al., arXiv 2410.05016), with frozen-feature probes against raw features.

Arguments (comma separated after the file name):
  table=fair     a built-in table (fair, anes96, breast_cancer, wine) or a CSV path (then set --config.input.target)
  variant=jannis model size: jannis (the reference's tuned defaults), small, tiny
  runlocal       the tiny model for a short CPU run on the built-in table
Examples:
  --config=configs/tjepa.py
  --config=configs/tjepa.py:runlocal
  --config=configs/tjepa.py:table=/data/adult.csv --config.input.target=income --config.input.drop_columns=id
Reference values: shared/reference/methods/mirrorbert_tjepa_sla_look_ssld.md section 2 (scripts/launch_tjepa.sh).
"""

import ml_collections

from jaxssl.config import add_trainer_defaults, parse_arg
from jaxssl.data.tabular import add_input_config
from jaxssl.evaluate.frozen import add_probe_config

REFERENCE_BATCH, REFERENCE_LR = 512, 0.0003658682841082736


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, table='fair', variant='jannis', runlocal=False)
    c = ml_collections.ConfigDict()
    c.method = 'tjepa'
    c.seed = 0

    add_input_config(c, table=arg.table, global_batch=128 if arg.runlocal else REFERENCE_BATCH)

    c.model = ml_collections.ConfigDict()
    c.model.variant = 'tiny' if arg.runlocal else arg.variant  # sizes: jaxssl.models.tjepa.VARIANTS
    c.model.reg_tokens = 1  # [REG] tokens (the reference's n_cls_tokens)
    c.model.dropout = 0.0018542257314766695
    c.model.predictor_dropout = 0.0019307456645321797
    c.model.layer_norm_eps = 1e-5
    c.model.ema = (0.996, 1.0)  # target-encoder momentum, linear over all steps

    c.masking = ml_collections.ConfigDict()
    c.masking.context_share = (0.13628349247854785, 0.36819012681604135)  # (min, max) share of the D features
    c.masking.target_share = (0.1556321308543076, 0.6222278244105446)
    c.masking.num_targets = 4  # target sets per row (the reference's mask_num_preds)

    c.loss = ml_collections.ConfigDict()
    # 'none': the reference (targets are the target encoder's tokens); 'batch': each target position standardised
    # over the batch, a deviation to test (docs/methods.md, T-JEPA section).
    c.loss.target_norm = 'none'

    c.optim = ml_collections.ConfigDict()
    # lr = base_lr * global_batch / 256: the reference's 3.66e-4 at its batch of 512.
    c.optim.base_lr = REFERENCE_LR * 256 / REFERENCE_BATCH
    c.optim.min_lr = 0.0
    c.optim.warmup_epochs = 1 if arg.runlocal else 10
    c.optim.epochs = 10 if arg.runlocal else 300
    c.optim.warmup_steps = 0  # > 0 overrides warmup_epochs
    c.optim.b1 = 0.9  # torch AdamW defaults
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.0
    c.optim.clip_grad = 0.0  # global-norm clipping (the reference has none)
    # The reference clamps each context-encoder gradient element to +-1 (exp_gradient_clipping); tjepa's loss does it.
    c.optim.encoder_grad_clamp = 1.0  # 0 disables
    c.optim.no_decay = ('.*bias',)  # and every 1-D parameter, as the reference's param groups
    c.optim.lr_rules = ()

    add_trainer_defaults(c, runlocal=arg.runlocal)
    add_probe_config(c, label_keys=('label',), runlocal=arg.runlocal)
    c.eval.encoder = 'target'  # 'target' (the EMA encoder, as the reference's online probe) or 'context'
    c.eval.batch_size = 256  # rows per host batch
    c.eval.max_train_clips = 0  # all rows: tables are small
    c.eval.max_test_clips = 0
    c.eval.at_end = True
    if arg.runlocal:
        c.train.log_every = 50
        c.checkpoint.every = 500
    return c
