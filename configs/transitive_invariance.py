"""Transitive Invariance (Wang, He, Gupta, ICCV 2017): a Triplet-Siamese network trained with the 2015 video
triplets' ranking loss on intra-instance, inter-instance and transitive pairs of an object graph.

Arguments (comma separated after the file name):
  variant=resnet50   a ResNet (resnet18 / 34 / 50 / 101; the paper's VGG16 is not in the library) or a ViT size
                     from jaxssl.models.mae's table (micro, tiny, B, L, H; '/patch')
  pairs=transitive   which graph pairs to train on: 'transitive' (intra + inter + transitive, the paper's),
                     'multitask' (intra + inter), 'intra' (the 2015 method) or 'inter'
  runlocal           tiny shapes on the built-in MNIST digits, for a CPU
Examples:
  --config=configs/transitive_invariance.py --config.input.data_root=/data/patches   (<root>/train/<class>/<image>)
  --config=configs/transitive_invariance.py:runlocal
  --config=configs/transitive_invariance.py:runlocal,pairs=intra
Reference: xiaolonw/caffe-video_triplet (the 2015 loss, head, data layer and solver the 2017 paper builds on:
c39ea1a's RankHardLoss, c8842be's rank_scripts/rank_vgg; the 2017 code was not released),
shared/reference/methods/text_eeg_misc_mcl_e2s2_speecht5_eegformer_medical_cmim_fst.md section 10.
docs/methods.md lists what is reconstructed.
"""

import ml_collections

from jaxssl.config import add_backbone_config, add_trainer_defaults, fixed_lr, parse_arg
from jaxssl.data.images import add_image_input_config
from jaxssl.evaluate.frozen import add_probe_config

PAIRS = {
    'transitive': ('intra', 'inter', 'transitive'),
    'multitask': ('intra', 'inter'),
    'intra': ('intra',),
    'inter': ('inter',),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, variant='resnet50', pairs='transitive', runlocal=False)
    if arg.pairs not in PAIRS:
        raise ValueError(f"unknown pairs '{arg.pairs}'; valid: {', '.join(PAIRS)}")

    c = ml_collections.ConfigDict()
    c.method = 'transitive_invariance'
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    add_backbone_config(c, 'resnet18' if arg.runlocal else arg.variant, arg.runlocal)
    # The reference's head: fc6 4096 + ReLU, fc7 1024 + ReLU, then L2 normalisation.
    c.model.head_layers = 2
    c.model.head_hidden = 256 if arg.runlocal else 4096
    c.model.head_out = 128 if arg.runlocal else 1024
    # The VGG16 net's init: xavier (U(+-sqrt(3 / fan_in))) weights, biases 1; 'gaussian' with std 0.005 is the
    # AlexNet net's, which suits its 9,216 fc6 inputs only. runlocal: N(0, 0.1) and biases 0.1, because with
    # biases 1 the loss stays at 1.00 for the first 75 of its 100-300 steps (docs/methods.md).
    c.model.head_init = 'gaussian' if arg.runlocal else 'xavier'
    c.model.head_init_std = 0.1 if arg.runlocal else 0.005  # 'gaussian' only
    c.model.head_bias_init = 0.1 if arg.runlocal else 1.0
    c.model.layer_norm_eps = 1e-6  # ViT backbones only
    c.model.drop_path_rate = 0.0
    c.model.dtype = 'float32' if arg.runlocal else 'bfloat16'  # compute dtype; parameters, head and loss float32
    c.model.scan_layers = False
    c.model.remat = arg.variant.startswith('H')
    c.model.attention_impl = ''

    c.graph = ml_collections.ConfigDict()
    c.graph.pair_kinds = PAIRS[arg.pairs]
    # Each kind's share of the pairs drawn, one per pair_kinds entry (e.g. (1, 1, 1)); (): every pair once, so each
    # kind in proportion to its count (transitive: 3 per edge, inter: 1 per edge, intra: 1 per node).
    c.graph.kind_shares = ()
    # Inter edges: k-means of label-free features into `clusters`, then each node's `neighbours` nearest members of
    # its cluster (the 2017 counts are not verified: docs/methods.md).
    c.graph.clusters = 100 if arg.runlocal else 5000
    # The features clustered: 'pixels' (grey 16 x 16, no earlier run needed) or the workdir of an earlier
    # self-supervised run on the same training images (the paper clusters context-prediction features), whose
    # `representation` is read (the 2015 intra-only run of this config: 'pool' or 'embedding').
    c.graph.features = 'pixels'
    c.graph.representation = 'pool'
    c.graph.neighbours = 4
    c.graph.node_size = 0 if arg.runlocal else 227  # objects resized to this square before cropping (0: as decoded)
    # A track's end view: the object under a random rotation, scale, shear and shift, a bolder or finer stroke and a
    # gain (the paper tracks objects through videos; jaxssl.data.transitive_graph).
    c.graph.track = ml_collections.ConfigDict()
    c.graph.track.rotation = 30.0  # degrees, +-
    c.graph.track.scale = 0.2  # 1 +- scale
    c.graph.track.shear = 0.2
    c.graph.track.shift = 0.1  # fraction of the side, +-
    c.graph.track.gain = (0.6, 1.0)
    c.graph.track.stroke_prob = 1 / 3  # each of dilation and erosion

    c.loss = ml_collections.ConfigDict()
    # RankHardLoss as the reference prototxt: 4 negatives per pair, half hard, half random, margin 1.
    c.loss.neg_num = 4
    c.loss.hard_ratio = 0.5
    c.loss.rand_ratio = 0.5
    c.loss.margin = 1.0

    add_image_input_config(c, runlocal=arg.runlocal)
    # The reference's VGG16 data layer: patches resized to 227, random 224 crops (area 0.974, square), mirrored.
    c.input.crop_scale = (0.7, 1.0) if arg.runlocal else ((224 / 227) ** 2,) * 2
    c.input.crop_ratio = (1.0, 1.0)
    c.input.hflip = not arg.runlocal  # a mirrored digit is another shape
    c.input.image_size = 32 if arg.runlocal else 224
    c.input.global_batch = 64 if arg.runlocal else 40  # pairs; the reference's VGG16 solver: 80 patches

    c.optim = ml_collections.ConfigDict()
    c.optim.name = 'sgd'
    c.optim.momentum = 0.9
    c.optim.weight_decay = 5e-4
    c.optim.warmup_steps = 0
    c.optim.warmup_epochs = 0
    c.optim.epochs = 1  # unused: train.steps is set
    c.optim.min_lr = 0.0
    c.optim.clip_grad = 0.0
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8  # AdamW's moments, for optim.name='adamw'
    c.optim.no_decay = ()  # 1-D parameters (biases, BatchNorm) are not decayed (the reference's decay_mult 0)
    # Caffe's lr_mult 2 on biases (the reference nets' every layer): kept for the head's fc biases (the ResNet's
    # convolutions have none; not under runlocal, whose evidence was measured without it).
    c.optim.lr_rules = () if arg.runlocal else (('head/.*/bias', 2.0),)

    add_trainer_defaults(c, runlocal=arg.runlocal)
    c.train.steps = 600_000  # the reference's VGG16 solver: lr 1e-3, x0.1 every 100k steps (Caffe's 'step')
    c.optim.base_lr = fixed_lr(c, 1e-3)
    c.optim.schedule = 'step'
    c.optim.step_boundaries = (1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6)
    c.optim.step_factor = 0.1
    add_probe_config(c, label_keys=('label',), runlocal=arg.runlocal)
    if arg.runlocal:
        # A CPU-minute budget: 300 steps of 64 pairs.
        c.optim.base_lr = fixed_lr(c, 0.5)
        c.optim.schedule = 'cosine'  # what the evidence was measured with
        c.optim.warmup_steps = 10
        c.train.steps = 300
        c.eval.at_end = True
        c.train.log_every = 25
        c.checkpoint.every = 300
    return c
