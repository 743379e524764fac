"""TERA pretraining (Liu, Li, Lee, TASLP 2021): reconstruct log-mel frames altered in time, frequency and magnitude.

Arguments (comma separated after the file name):
  variant=base     model size: base (3 x 768, logMelBase), slim (12 x 384, logMelSlim); micro (tests, CPU)
  runlocal         a micro model on the built-in synthetic words, for a CPU
Examples:
  --config=configs/tera.py --config.input.data_root=/data/librispeech_wav   (<root>/train/<class>/<file>.wav)
  --config=configs/tera.py:runlocal
Reference recipe: s3prl pretrain/tera/exp_model_config/logMelBase-T-F-M.yaml with config_model.yaml's dropout 0.1
(the released *_drop1 models) and pretrain/tera/config_runner.yaml
(shared/reference/methods/audio_speech_ssast_tera_beats_mert_wav2vec2_unfused.md).
"""

import ml_collections

from jaxssl.config import add_trainer_defaults, parse_arg
from jaxssl.data.audio import add_audio_input_config
from jaxssl.evaluate.frozen import add_probe_config

REFERENCE_LR, REFERENCE_BATCH = 2e-4, 32  # batch 8 x 4 accumulation steps


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, variant='base', runlocal=False)

    c = ml_collections.ConfigDict()
    c.method = 'tera'
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.variant = 'micro' if arg.runlocal else arg.variant
    c.model.dropout = 0.1  # hidden and attention dropout; 0.3 in the T-F-M experiment yaml, 0.1 in the releases
    c.model.dtype = 'float32' if arg.runlocal else 'bfloat16'  # compute dtype; parameters stay float32

    c.alteration = ml_collections.ConfigDict()
    c.alteration.time_proportion = 0.15  # mask_proportion
    c.alteration.span_min = 7  # mask_consecutive_min / max
    c.alteration.span_max = 7
    c.alteration.max_freq_proportion = 0.2  # mask_frequency
    c.alteration.noise_probability = 0.15  # noise_proportion, per batch
    c.alteration.noise_std = 0.2

    add_audio_input_config(c, runlocal=arg.runlocal, features='log_mel_cmvn')
    c.input.num_mel_bins = 80
    c.input.target_length = 100 if arg.runlocal else 1500  # sequence_length: longer utterances are cut
    c.input.global_batch = 64 if arg.runlocal else REFERENCE_BATCH

    c.optim = ml_collections.ConfigDict()
    c.optim.name = 'adamw'  # s3prl's AdamW_with_schedule (Lamb with adam=True: no trust ratio)
    c.optim.schedule = 'linear'  # warmup, then linear decay to 0
    c.optim.base_lr = REFERENCE_LR * 256 / REFERENCE_BATCH  # lr = base_lr * global_batch / 256
    c.optim.min_lr = 0.0
    c.optim.warmup_steps = 70_000  # warmup_proportion 0.07 of 1M steps
    c.optim.warmup_epochs = 0
    c.optim.epochs = 1  # unused: train.steps sets the length
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8  # s3prl's Lamb default (its eps is added before the bias correction: a negligible difference)
    c.optim.weight_decay = 0.01  # not on biases and LayerNorms (1-D parameters never decay)
    c.optim.clip_grad = 5.0  # gradient_clipping, global norm
    c.optim.no_decay = ()
    c.optim.lr_rules = ()

    add_trainer_defaults(c, runlocal=arg.runlocal)
    c.train.steps = 1_000_000
    add_probe_config(c, label_keys=('label',), runlocal=arg.runlocal)
    c.eval.probes = ('linear', 'knn')
    if arg.runlocal:
        c.optim.base_lr = 4e-3  # lr 1e-3 at batch 64
        c.optim.warmup_steps = 30
        c.train.steps = 300
        c.eval.at_end = True
        c.train.log_every = 20
        c.checkpoint.every = 300
    return c
