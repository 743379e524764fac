"""MERT pretraining (Li et al., ICLR 2024): predict an acoustic teacher's codes and the CQT of masked frames of music
at 24 kHz, with in-batch noise mixed into the clips.

Arguments (comma separated after the file name):
  variant=95M      95M (12 x 768, post-norm, MERT_RVQ-VAE_CQT_95M.yaml), 330M (24 x 1024, pre-norm,
                   MERT_RVQ-VAE_CQT_330M.yaml); micro (tests, CPU)
  runlocal         a micro model on the built-in synthetic words (at 24 kHz) with the MFCC k-means teacher, for a CPU
Examples:
  python -m jaxssl.models.encodec_weights /ckpt/encodec_24khz /ckpt/encodec_jaxssl   (a transformers folder or .th)
  --config=configs/mert.py --config.teacher.path=/ckpt/encodec_jaxssl --config.input.data_root=/data/music_wav
  --config=configs/mert.py:variant=330M --config.teacher.path=... --config.input.data_root=...
  --config=configs/mert.py:runlocal
Reference recipes: yizhilll/MERT mert_fairseq/config/pretrain/*.yaml (shared/reference/methods/
audio_speech_ssast_tera_beats_mert_wav2vec2_unfused.md, section 4).
"""

import ml_collections

from jaxssl.config import add_trainer_defaults, parse_arg
from jaxssl.data.audio import add_audio_input_config
from jaxssl.evaluate.frozen import add_probe_config

# Clips per update in the reference when every crop has the full length: fairseq's max_tokens batches hold
# floor(max_tokens / crop) clips per GPU, 95M 2M / 120,000 = 16 x 64 GPUs; 330M 900k / 122,880 = 7 x 64 GPUs x
# update_freq 8. Shorter files (down to 3 s) make bigger batches. The lr follows the batch linearly from these.
REFERENCE_BATCH = {'95M': 1024, '330M': 3584}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, variant='95M', runlocal=False)
    large = arg.variant == '330M'

    c = ml_collections.ConfigDict()
    c.method = 'mert'
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.variant = 'micro' if arg.runlocal else arg.variant
    c.model.dtype = 'float32' if arg.runlocal else 'bfloat16'  # compute dtype; parameters stay float32
    c.model.dropout = 0.0 if large else 0.1
    c.model.attention_dropout = 0.0 if large else 0.1
    c.model.dropout_input = 0.0 if large else 0.1
    c.model.dropout_features = 0.0 if large else 0.1  # kept for the layout; HuBERT's loss does not read the latents
    c.model.layerdrop = 0.0 if large else 0.05
    c.model.feature_grad_mult = 1.0 if large else 0.1
    c.model.logit_temp = 0.1

    c.mask = ml_collections.ConfigDict()
    c.mask.prob = 0.8  # span starts per frame before overlaps
    c.mask.length = 5  # frames (67 ms at 75 Hz)
    c.mask.min_spans = 2

    c.teacher = ml_collections.ConfigDict()
    # 'encodec' (the paper's: the released EnCodec 24 kHz, converted into teacher.path) or 'mfcc_kmeans' (HuBERT's
    # first iteration; runlocal, as no codec weights are built in)
    c.teacher.kind = 'mfcc_kmeans' if arg.runlocal else 'encodec'
    c.teacher.path = ''  # encodec: python -m jaxssl.models.encodec_weights IN OUT_DIR writes it
    c.teacher.bandwidth = 6.0  # kbps: 8 codebooks of 1,024
    c.teacher.clusters = 100  # mfcc_kmeans: HuBERT's first iteration
    c.teacher.fit_clips = 200 if arg.runlocal else 2000  # clips whose MFCC frames the k-means is fitted on
    c.teacher.centroids = ''  # a (clusters, 39) .npy to use instead of fitting

    c.cqt = ml_collections.ConfigDict()
    c.cqt.weight = 1.0  # the criterion's loss_weights[1]; 0 drops the musical teacher
    c.cqt.fmin = 32.7  # Hz (C1)
    c.cqt.bins = 336  # 7 octaves
    c.cqt.bins_per_octave = 48
    if arg.runlocal:  # 6 octaves from C2 at 12 a octave: 8k-sample kernels instead of 64k for a CPU
        c.cqt.fmin, c.cqt.bins, c.cqt.bins_per_octave = 65.4, 72, 12

    c.mixture = ml_collections.ConfigDict()
    c.mixture.prob = 0.5  # the chance that a clip is mixed (the reference's mixture_prob is its complement)
    c.mixture.lengths = (12_000, 36_000 if large else 24_000)  # samples per segment (0.5-1 s / 1.5 s)
    c.mixture.counts = (1, 3)  # segments per mixed clip
    c.mixture.volume = 1.0
    if arg.runlocal:  # 1 s clips: the reference's 0.1-0.3 of a clip
        c.mixture.lengths = (2_400, 8_000)

    c.loss = ml_collections.ConfigDict()
    c.loss.feature_penalty_weight = 10.0  # the criterion's loss_weights[0]
    c.loss.reference_batches = 0  # groups for the per-GPU terms, crops and mixtures; 0: one per device

    add_audio_input_config(c, runlocal=arg.runlocal, features='waveform')
    c.input.sample_rate = 24_000
    c.input.max_samples = 24_000 if arg.runlocal else (122_880 if large else 120_000)  # 5 s / 5.12 s crops
    c.input.min_samples = 0 if arg.runlocal else 72_000  # min_sample_size: shorter files are skipped (3 s)
    c.input.bucket_by_length = not arg.runlocal
    c.input.global_batch = 16 if arg.runlocal else 64

    c.optim = ml_collections.ConfigDict()
    c.optim.name = 'adamw'  # fairseq's adam: decoupled weight decay on every parameter
    c.optim.schedule = 'linear'  # polynomial_decay (power 1): linear warmup, then linear decay to 0
    # lr = base_lr * global_batch / 256: the yaml's lr at the reference batch (5e-4 95M, 1.5e-3 330M).
    c.optim.base_lr = (1.5e-3 if large else 5e-4) * 256 / REFERENCE_BATCH['330M' if large else '95M']
    c.optim.min_lr = 0.0
    c.optim.warmup_steps = 32_000
    c.optim.warmup_epochs = 0
    c.optim.epochs = 1  # unused: train.steps sets the length
    c.optim.b1 = 0.9
    c.optim.b2 = 0.98
    c.optim.eps = 1e-6
    c.optim.weight_decay = 0.01
    c.optim.decay_vectors = True  # biases and norms decay too, as fairseq's adam
    c.optim.clip_grad = 1.0 if large else 10.0
    c.optim.no_decay = ()
    c.optim.lr_rules = ()

    add_trainer_defaults(c, runlocal=arg.runlocal)
    c.train.steps = 400_000
    add_probe_config(c, label_keys=('label',), runlocal=arg.runlocal)
    c.eval.probes = ('linear', 'knn')
    if arg.runlocal:
        c.optim.base_lr = 2e-3 * 256 / c.input.global_batch
        c.optim.warmup_steps = 30
        c.train.steps = 300
        c.eval.at_end = True
        c.train.log_every = 20
        c.checkpoint.every = 300
    return c
