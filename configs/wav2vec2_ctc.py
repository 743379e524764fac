"""wav2vec 2.0 CTC fine-tuning (Baevski et al., NeurIPS 2020): a pretrained encoder + a letter head, CTC loss, greedy
decoding; after continued pretraining, the second step of the Ainu wav2vec 2.0.

Arguments (comma separated after the file name):
  variant=base     base or large (the sizes of configs/wav2vec2.py); micro (tests, CPU)
  hours=100        the labelled-data recipe: 100 (base_100h.yaml: lr 3e-5, 80k updates, layerdrop 0.1) or 10
                   (base_10h.yaml: lr 5e-5, 20k updates, layerdrop 0.05, encoder frozen for the first 10k)
  runlocal         a micro model on the built-in synthetic words (spelled by their sounds), for a CPU
Examples:
  --config=configs/wav2vec2_ctc.py --config.init_from=runs/w2v_base --config.input.manifest_dir=/data/ls100h
  --config=configs/wav2vec2_ctc.py:variant=large --config.model.pretrained=/ckpt/wav2vec2-large-xlsr-53 \\
      --config.input.manifest_dir=/data/ainu --config.input.normalize_waveform=true
  --config=configs/wav2vec2_ctc.py:runlocal --config.init_from=runs/w2v_runlocal
input.manifest_dir holds fairseq's manifest: <split>.tsv, <split>.ltr and dict.ltr.txt (jaxssl/data/transcripts.py).
Reference recipes: fairseq examples/wav2vec/config/finetuning/base_{10h,100h}.yaml and the Wav2Vec2AsrConfig
defaults.
"""

import ml_collections

from jaxssl.config import add_trainer_defaults, parse_arg
from jaxssl.data.audio import add_audio_input_config

# Utterances per update in the reference, roughly: max_tokens 3.2M samples on 8 GPU-equivalents (world size x
# update_freq) hold about 128 LibriSpeech utterances (12.3 s on average).
REFERENCE_BATCH = 128
RECIPES = {  # hours of labels -> (lr, updates, layerdrop, updates with the encoder frozen)
    100: (3e-5, 80_000, 0.1, 0),
    10: (5e-5, 20_000, 0.05, 10_000),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, variant='base', hours=100, runlocal=False)
    if arg.hours not in RECIPES:
        raise ValueError(f'unknown hours={arg.hours}; valid: {", ".join(map(str, RECIPES))}')
    lr, updates, layerdrop, frozen = RECIPES[arg.hours]

    c = ml_collections.ConfigDict()
    c.method = 'wav2vec2_ctc'
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.variant = 'micro' if arg.runlocal else arg.variant
    c.model.pretrained = ''  # a transformers Wav2Vec2ForPreTraining folder instead of init_from
    c.model.dtype = 'float32' if arg.runlocal else 'bfloat16'
    # Wav2Vec2AsrConfig's values (the yaml sets layerdrop and activation_dropout).
    c.model.dropout = 0.0
    c.model.attention_dropout = 0.0
    c.model.activation_dropout = 0.1
    c.model.dropout_input = 0.0
    c.model.final_dropout = 0.0
    c.model.layerdrop = layerdrop
    c.model.freeze_finetune_updates = frozen  # updates in which only the head is trained

    c.mask = ml_collections.ConfigDict()  # time masks: spans of frames replaced by the mask embedding
    c.mask.prob = 0.65
    c.mask.length = 10
    c.mask.min_spans = 2
    c.channel_mask = ml_collections.ConfigDict()  # channel masks: spans of the projected features zeroed
    c.channel_mask.prob = 0.5
    c.channel_mask.length = 6 if arg.runlocal else 64  # micro is 64 wide: spans of 64 would zero it whole

    c.loss = ml_collections.ConfigDict()
    c.loss.max_target_length = 16 if arg.runlocal else 640  # letters per transcript (static shape; longer: an error)
    c.loss.reference_batches = 0  # groups for require_same_masks; 0: one per device

    add_audio_input_config(c, runlocal=arg.runlocal, features='waveform')
    c.input.dataset = 'synthetic_words' if arg.runlocal else 'manifest'  # 'manifest' or 'synthetic_words'
    c.input.manifest_dir = ''
    c.input.split = 'train'
    c.input.max_samples = 16000 if arg.runlocal else 560_000  # 35 s: longer utterances are left out and counted
    c.input.normalize_waveform = arg.variant == 'large' and not arg.runlocal  # as the pretrained model's input
    c.input.min_samples = 0
    c.input.bucket_by_length = not arg.runlocal  # each device's rows of similar length, as fairseq's sorted batches
    c.input.global_batch = 32 if arg.runlocal else REFERENCE_BATCH

    c.optim = ml_collections.ConfigDict()
    c.optim.name = 'adam'  # fairseq's adam, weight decay 0
    c.optim.schedule = 'tri_stage'
    c.optim.base_lr = lr * 256 / REFERENCE_BATCH  # lr = base_lr x global_batch / 256: the yaml's lr at the reference
    c.optim.min_lr = 0.0
    c.optim.warmup_steps = 0  # tri_stage: optim.phase_ratio sets the warmup
    c.optim.warmup_epochs = 0
    c.optim.epochs = 1  # unused: train.steps sets the length
    c.optim.b1 = 0.9
    c.optim.b2 = 0.98
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.0
    c.optim.clip_grad = 0.0
    c.optim.no_decay = ()
    c.optim.lr_rules = ()

    add_trainer_defaults(c, runlocal=arg.runlocal)
    c.init_from = ''  # a wav2vec 2.0 pretraining workdir (or params directory): every parameter but the head
    c.init_from_select = ('(?!lm_head/).*',)
    c.train.steps = updates
    c.eval.split = 'val' if arg.runlocal else 'dev_other'  # fairseq's valid_subset
    c.eval.batch_size = 32 if arg.runlocal else 16
    c.eval.max_test_clips = 0  # 0: the whole split
    c.eval.every = 0 if arg.runlocal else 10_000
    if arg.runlocal:
        c.optim.base_lr = 2e-3 * 256 / c.input.global_batch  # a few hundred CPU steps instead of 80k
        c.train.steps = 300
        c.train.log_every = 20
        c.checkpoint.every = 300
        c.eval.at_end = True
    return c
