"""SSAST pretraining (Gong et al., AAAI 2022): joint discriminative + generative masked spectrogram patch modelling.

Arguments (comma separated after the file name):
  variant=base     model size: tiny, small, base (all 12 blocks); micro, mini (tests, CPU)
  patch=patch      'patch': 16 x 16 patches with cluster masking (audio); 'frame': 128 x 2 frames, random (speech)
  runlocal         a micro model on the built-in synthetic words, for a CPU
Examples:
  --config=configs/ssast.py:variant=tiny --config.input.data_root=/data/audio   (<root>/train/<class>/<file>.wav)
  --config=configs/ssast.py:runlocal
Reference recipe: YuanGongND/ssast src/pretrain/run_mask_{patch,frame}{,_tiny}.sh and src/traintest_mask.py
(shared/reference/methods/audio_speech_ssast_tera_beats_mert_wav2vec2_unfused.md).
"""

import ml_collections

from jaxssl.config import add_trainer_defaults, parse_arg
from jaxssl.data.audio import add_audio_input_config
from jaxssl.evaluate.frozen import add_probe_config

# The reference's Adam lr is 1e-4 at batch 24 (small / base) and 5e-4 at batch 120 (tiny): the same per example.
REFERENCE_LR, REFERENCE_BATCH = 1e-4, 24


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, variant='base', patch='patch', runlocal=False)

    c = ml_collections.ConfigDict()
    c.method = 'ssast'
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.variant = 'micro' if arg.runlocal else arg.variant
    c.model.patch = arg.patch  # 'patch' (16 x 16) or 'frame' (128 x 2); see jaxssl.models.ssast.PATCHES
    c.model.drop_path_rate = 0.0  # timm's DeiT default, which the reference keeps
    c.model.dtype = 'float32' if arg.runlocal else 'bfloat16'  # compute dtype; parameters stay float32
    c.model.scan_layers = False
    c.model.remat = False
    c.model.attention_impl = ''  # '': cuDNN flash attention on GPUs in bf16, XLA's elsewhere; or 'xla' / 'cudnn'

    c.masking = ml_collections.ConfigDict()
    c.masking.kind = 'frame' if arg.patch == 'frame' else 'cluster'  # the reference: cluster unless patches are frames
    c.masking.num_masked = 400  # of 512 patches (128 mel bins x 1024 frames), every reference script
    c.masking.cluster = 3  # cluster sizes C in {3, ..., cluster + 2}

    c.loss = ml_collections.ConfigDict()
    c.loss.nce_weight = 1.0
    c.loss.mse_weight = 10.0  # traintest_mask.py: loss = nce + 10 * mse

    add_audio_input_config(c, runlocal=arg.runlocal)
    c.input.global_batch = 120 if arg.variant == 'tiny' else REFERENCE_BATCH

    c.optim = ml_collections.ConfigDict()
    c.optim.name = 'adam'  # torch.optim.Adam: the weight decay is an L2 term in the gradient
    c.optim.base_lr = REFERENCE_LR * 256 / REFERENCE_BATCH  # lr = base_lr * global_batch / 256
    # The reference warms up over 1,000 steps, then halves the lr when its held-out pretext accuracy stalls
    # (ReduceLROnPlateau, patience 2 x 4,000 steps); here the lr stays constant after warmup (min_lr = base_lr).
    c.optim.min_lr = c.optim.base_lr
    c.optim.warmup_steps = 1000
    c.optim.warmup_epochs = 0
    c.optim.epochs = 10
    c.optim.b1 = 0.95
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 5e-7  # on every matrix; 1-D parameters are exempt here (negligible at 5e-7)
    c.optim.clip_grad = 0.0
    c.optim.no_decay = ()
    c.optim.lr_rules = ()

    add_trainer_defaults(c, runlocal=arg.runlocal)
    # Frozen-feature probes of the mean patch token (the reference's fine-tuning feature) and the cls tokens.
    add_probe_config(c, label_keys=('label',), runlocal=arg.runlocal)
    if arg.runlocal:
        # 64 mel bins x 96 frames = 4 x 6 patches of 16 x 16; 18 of 24 masked (75%; the reference masks 78%).
        c.masking.num_masked = 18
        c.input.global_batch = 64
        c.optim.base_lr = c.optim.min_lr = 4e-3  # lr 1e-3 at batch 64: 1,500 steps gain 2x what lr 2.5e-4 gains
        c.optim.warmup_steps = 30
        c.train.steps = 300
        c.eval.at_end = True
        c.train.log_every = 20
        c.checkpoint.every = 300
    return c
