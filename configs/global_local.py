"""Global and local contrastive pretraining for medical image segmentation (Chaitanya et al., NeurIPS 2020): a
UNet's encoder pretrained by a partition-aware global contrastive loss on unlabelled volumes, then its first
decoder blocks by a local contrastive loss with the encoder frozen; evaluated by fine-tuning on a few labelled
volumes against a random init.

Arguments (comma separated after the file name):
  stage=global        'global' (the encoder) or 'local' (decoder blocks, L^R; set --config.pretrained to the global
                      run's workdir)
  variant=gd          the global loss: 'gd' (G^D, 6 volumes a batch), 'gd_minus' (G^{D-}, 3 volumes) or 'gr'
                      (G^R, 12 slices)
  runlocal            small UNet on the built-in cardiac phantoms (48 px), for a CPU
Examples:
  --config=configs/global_local.py --config.input.data_root=/data/acdc_cropped
  --config=configs/global_local.py:stage=local --config.pretrained=runs/global --config.input.data_root=...
  --config=configs/global_local.py:runlocal,stage=local --config.pretrained=runs/global_local_runlocal
Reference: krishnabits001/domain_specific_cl@e5aae80, shared/reference/methods/text_eeg_misc_mcl_e2s2_speecht5_
eegformer_medical_cmim_fst.md section 6 (ACDC: 192 x 192 slices at 1.367 mm, 4 classes).
"""

import ml_collections

from jaxssl.config import add_trainer_defaults, fixed_lr, parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, stage='global', variant='gd', runlocal=False)

    c = ml_collections.ConfigDict()
    c.method = 'global_local'
    c.seed = 0
    c.stage = arg.stage
    c.pretrained = ''  # the local stage: the workdir of the global stage's run, whose encoder it freezes

    c.model = ml_collections.ConfigDict()
    c.model.channels = (16, 32, 64, 128, 128, 128)  # one width per encoder level (no_filters)
    c.model.classes = 4  # the fine-tuning segmentation's classes, background included (ACDC: RV, Myo, LV)
    c.model.global_hidden = 1024  # g1's hidden layer
    c.model.embed_dim = 128  # g1's and the region embedding's output

    c.loss = ml_collections.ConfigDict()
    c.loss.variant = arg.variant  # the global loss: 'gd' (G^D), 'gd_minus' (G^{D-}) or 'gr' (G^R)
    c.loss.partitions = 4  # S: depth partitions per volume, one slice drawn from each
    c.loss.temperature = 0.1
    c.loss.decoder_blocks = 3  # l: decoder blocks the local stage trains (its 3x3 regions lie on their map)

    c.augment = ml_collections.ConfigDict()
    c.augment.brightness = 0.3  # x + U(-0.3, 0.3)
    c.augment.contrast = (0.7, 1.3)  # (x - mean) c + mean
    c.augment.clip = (0.0, 1.5)

    c.input = ml_collections.ConfigDict()
    c.input.dataset = 'cardiac_phantoms' if arg.runlocal else 'folder'  # or 'cardiac_phantoms' (built in)
    c.input.data_root = ''  # 'folder': <data_root>/<split>/*.npz with 'image' (Z, H, W) and optionally 'label'
    c.input.split = 'train'  # the unlabelled pretraining volumes
    c.input.image_size = 48 if arg.runlocal else 192
    # Examples per step: volumes in the global stage (gd: 6 = the reference's 3 blocks of two volumes, 48 images;
    # gd_minus: 3, 36 images), slices for gr (12, 24 images) and the local stage (10, the batch its script runs with).
    batches = {'gd': 6, 'gd_minus': 3, 'gr': 12}
    c.input.global_batch = batches.get(arg.variant, 6) if arg.stage == 'global' else 10
    c.input.num_sample = 1
    c.input.num_workers = 0 if arg.runlocal else 8
    c.input.read_threads = 2 if arg.runlocal else 1

    c.optim = ml_collections.ConfigDict()
    c.optim.name = 'adamw'  # Adam, no weight decay, constant lr 1e-3 (every stage)
    # lr = base_lr x global_batch / 256; the reference's is 1e-3 whatever the batch, so base_lr follows the batch.
    c.optim.base_lr = fixed_lr(c, 1e-3)
    c.optim.min_lr = 0.0  # unused by the constant schedule
    c.optim.schedule = 'constant'
    c.optim.warmup_steps = 0
    c.optim.warmup_epochs = 0
    c.optim.epochs = 1  # unused: train.steps counts the iterations
    c.optim.weight_decay = 0.0
    c.optim.clip_grad = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.no_decay = ()
    c.optim.lr_rules = ()

    add_trainer_defaults(c, runlocal=arg.runlocal)
    c.train.steps = 10_001  # n_iter, each stage

    # Fine-tuning on a few labelled volumes (the paper's 1, 2, 8 or 20 of ACDC): from the pretrained weights and,
    # with `baselines`, from a random init; the mean foreground Dice of the test volumes.
    c.eval.finetune_split = 'val'  # the labelled volumes are its first `labelled_volumes`
    c.eval.labelled_volumes = 2
    c.eval.test_split = 'test'
    c.eval.test_volumes = 20
    c.eval.finetune_steps = 10_001
    c.eval.finetune_batch = 20
    c.eval.finetune_lr = 1e-3
    c.eval.baselines = True
    c.eval.at_end = True
    if arg.runlocal:
        c.model.channels = (8, 16, 32, 32, 32)  # 48 -> 3 px at the bottleneck
        c.model.global_hidden = 256
        c.input.global_batch = 8  # 8 volumes (or slices): one per fake CPU device in the sharding tests
        c.train.steps = 300
        c.train.log_every = 25
        c.checkpoint.every = 100
        c.eval.labelled_volumes = 1
        c.eval.test_volumes = 10
        c.eval.finetune_steps = 300
    return c
