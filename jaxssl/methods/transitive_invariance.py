"""Transitive Invariance (Wang, He, Gupta, ICCV 2017): a Triplet-Siamese network trained with the 2015 video
triplets' ranking loss on pairs from an object graph: intra-instance (the same object at both ends of a track),
inter-instance (two similar objects) and, by transitivity, the pairs across both (jaxssl.data.transitive_graph).

Batch layout: 'image' float32 (B, 2, S, S, 3), each pair's two views (each its own random crop, and flip if
input.hflip), ImageNet-normalised; 'pair_label' (B,), the graph label the loss keeps apart (a pair's negatives are
the batch's items of other labels); 'pair_kind' (B,), 0 intra, 1 inter, 2 transitive. `graph.pair_kinds` chooses
which pairs the run trains on: ('intra',) is the 2015 method, ('intra', 'inter') the paper's multi-task baseline's
data in one loss, all three the paper's transitive pairs. The loss (jaxssl.losses.ranking) is the reference's
RankHardLoss over the whole global batch: 4 negatives per pair, half among the hardest, half random, margin 1.

The backbone is a ResNet or the shared ViT (the paper's VGG16 is not in the library), with the reference's head:
fc 4096 + ReLU, fc 1024 + ReLU, L2 normalisation. `represent` gives the backbone's features and the embedding.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxssl import data
from jaxssl.config import ConfigError, check_choice, check_range, method_module
from jaxssl.data import images as image_data
from jaxssl.data import transitive_graph as graph_data
from jaxssl.losses import ranking
from jaxssl.methods import _image, base, simclr
from jaxssl.methods.videomae import DTYPES
from jaxssl.models import ranking as ranking_model
from jaxssl.models import resnet
from jaxssl.models import simclr as simclr_model

log = logging.getLogger(__name__)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, naming the key, on values the graph, model or loss cannot use (data paths: at run start)."""
    if resnet.is_resnet(config.model.variant):
        _image.check_resnet_config(config)
    else:
        _image.check_vit_config(config)
    for key in ('model.head_hidden', 'model.head_out', 'model.head_layers', 'graph.clusters', 'graph.neighbours',
                'loss.neg_num'):  # fmt: skip
        group, name = key.split('.')
        if not isinstance(config[group][name], int) or config[group][name] < 1:
            raise ConfigError(f"bad value {config[group][name]!r} for '{key}': must be an integer >= 1")
    check_choice(config, 'model.head_init', tuple(ranking_model.KERNEL_INITS))
    kinds = tuple(config.graph.pair_kinds)
    if not kinds or len(set(kinds)) != len(kinds) or not set(kinds) <= set(graph_data.PAIR_KINDS):
        raise ConfigError(
            f"bad value {kinds!r} for 'graph.pair_kinds': distinct names from {', '.join(graph_data.PAIR_KINDS)}"
        )
    shares = tuple(config.graph.kind_shares)
    if shares and (len(shares) != len(kinds) or min(shares) < 0 or sum(shares) <= 0):
        raise ConfigError(
            f"bad value {shares!r} for 'graph.kind_shares': () or one share >= 0 per graph.pair_kinds entry, not all 0"
        )
    if not isinstance(config.graph.features, str) or not config.graph.features:
        raise ConfigError(f"bad value {config.graph.features!r} for 'graph.features': 'pixels' or a run's workdir")
    node_size = config.graph.node_size
    if not isinstance(node_size, int) or node_size < 0:
        raise ConfigError(f"bad value {node_size!r} for 'graph.node_size': an integer >= 0 (0: as decoded)")
    for key in ('loss.hard_ratio', 'loss.rand_ratio'):
        check_range(config, key, 0.0, 1.000001)
    if config.loss.hard_ratio + config.loss.rand_ratio > 1.000001:
        raise ConfigError(
            "'loss.hard_ratio' + 'loss.rand_ratio' must be <= 1: they split the loss.neg_num negatives of a pair"
        )
    # The embeddings are non-negative unit vectors, so a.p - a.n <= 1: at a margin >= 1 no hinge ever closes.
    check_range(config, 'loss.margin', 0.0, 2.000001)
    track = config.graph.track
    check_range(config, 'graph.track.rotation', 0.0, 180.000001)
    for key in ('scale', 'shear', 'shift'):
        check_range(config, f'graph.track.{key}', 0.0, 1.0)
    check_range(config, 'graph.track.stroke_prob', 0.0, 0.500001)
    gain = tuple(track.gain)
    if len(gain) != 2 or not 0 < gain[0] <= gain[1]:
        raise ConfigError(f"bad value {gain} for 'graph.track.gain': need (low, high) with 0 < low <= high")
    if config.input.num_sample != 1:
        raise ConfigError(f"bad value {config.input.num_sample} for 'input.num_sample': each example is one pair: 1")


def make_model(config: ml_collections.ConfigDict) -> ranking_model.RankingViT | simclr_model.ResNetWithHead:
    m = config.model
    if resnet.is_resnet(m.variant):
        head = ranking_model.RankingHead(
            m.head_hidden, m.head_out, m.head_layers, m.head_init, m.head_init_std, m.head_bias_init
        )
        return simclr_model.ResNetWithHead(simclr.make_resnet_backbone(config, zero_init_residual=False), head)
    return ranking_model.make_vit(
        m.variant,
        head_hidden=m.head_hidden,
        head_out=m.head_out,
        head_layers=m.head_layers,
        head_init=m.head_init,
        head_init_std=m.head_init_std,
        head_bias_init=m.head_bias_init,
        layer_norm_eps=m.layer_norm_eps,
        drop_path_rate=m.drop_path_rate,
        scan_layers=m.scan_layers,
        remat=m.remat,
        dtype=DTYPES[m.dtype],
        attention_impl=m.attention_impl or None,
    )


def pair_view(pair: np.ndarray, rng: np.random.Generator, *, view: image_data.View) -> dict[str, np.ndarray]:
    """Both views of a pair, uint8 (2, H, W, 3), each through the training view: {'image': (2, S, S, 3)}."""
    return {'image': np.stack([view(image, rng) for image in pair])}


class Method(simclr.Method):
    """Transitive Invariance pretraining for the trainer: SimCLR's backbones and BatchNorm state handling, the
    graph's pairs, the ranking head and loss."""

    def __init__(self, config: ml_collections.ConfigDict):
        base.Method.__init__(self, config)  # not SimCLR's __init__: it would build SimCLR's head
        self.model = make_model(config)
        self._graph: graph_data.Graph | None = None
        self._nodes: graph_data.Nodes | None = None

    @property
    def graph(self) -> graph_data.Graph:
        """The object graph over the training images, built on first use (deterministic in config.seed)."""
        if self._graph is None:
            self._graph, self._nodes = self.build_graph()
        return self._graph

    def build_graph(self) -> tuple[graph_data.Graph, graph_data.Nodes]:
        g = self.config.graph
        source = image_data.make_image_source(self.config)
        try:
            kept, classes, features = graph_data.scan_nodes(source, g.node_size)
            if g.features != 'pixels' and ('inter' in g.pair_kinds or 'transitive' in g.pair_kinds):
                features = self.run_features(g.features, g.representation, source)[kept]
            graph = graph_data.build_graph(
                features,
                classes,
                kinds=tuple(g.pair_kinds),
                num_clusters=g.clusters,
                neighbours=g.neighbours,
                seed=self.config.seed,
                kind_shares=tuple(g.kind_shares),
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None
        track = graph_data.TrackConfig(**{**g.track.to_dict(), 'gain': tuple(g.track.gain)})
        return graph, graph_data.Nodes(source, kept, g.node_size, track, self.config.seed)

    @staticmethod
    def run_features(workdir: str, representation: str, source: Any) -> np.ndarray:
        """float64 (len(source), D): the `representation` of an earlier image run (its latest checkpoint, the
        workdir `graph.features` names) of every image of `source`, through that run's evaluation view."""
        from jaxssl import train
        from jaxssl.evaluate import features as features_lib
        from jaxssl.evaluate.__main__ import load_run_config

        if not os.path.isfile(os.path.join(workdir, 'config.json')):
            raise ConfigError(f"graph.features: '{workdir}' is neither 'pixels' nor a training run's workdir")
        config = load_run_config(workdir, ())
        if method_module(config).Method.input_key != 'image':
            raise ConfigError(f"graph.features: '{workdir}' is a {config.method} run, not an image method's")
        method, mesh, restored, _ = train.restore_checkpoint(config, workdir)
        dataset, _ = image_data.make_image_eval_dataset(
            config,
            split=config.input.split,
            batch_size=config.eval.batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            source=source,
        )
        rows = features_lib.extract(method, restored['params'], restored['extra'], dataset, mesh)
        if representation not in rows:
            names = ', '.join(k for k, v in rows.items() if k not in ('index', 'valid') and v.ndim == 2)
            raise ConfigError(f"bad value '{representation}' for 'graph.representation'; that run gives: {names}")
        valid = rows['valid'] > 0  # the last batch's padding; unreadable images (skipped as nodes too)
        out = np.zeros((len(source), rows[representation].shape[1]))
        out[rows['index'][valid]] = rows[representation][valid]
        return out

    def dataset(self, seed: int, process_index: int, process_count: int) -> tuple[Any, int]:
        image_data.check_image_input_config(self.config)  # paths are checked when a run starts, not at config load
        source = graph_data.PairSource(self.graph, self._nodes)
        view = functools.partial(pair_view, view=image_data.make_pretrain_view(self.config))
        dataset = image_data.make_image_pretrain_dataset(
            self.config,
            seed=seed,
            process_index=process_index,
            process_count=process_count,
            view=view,
            source=source,
            decode=source.load,
        )
        return dataset, len(source)

    def example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        size = self.config.input.image_size
        rng = np.random.default_rng(0)
        return {
            'image': rng.normal(size=(batch_size, 2, size, size, 3)).astype(np.float32),
            'pair_label': np.arange(batch_size, dtype=np.int32),
            'pair_kind': np.zeros(batch_size, np.int32),
        }

    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        images = batch['image']
        return super().init(rng, {'image': images.reshape(-1, *images.shape[2:])})

    def loss(self, params, extra, batch, rng, step):
        images, labels = batch['image'], batch['pair_label']
        chex.assert_rank(images, 5)
        chex.assert_shape(labels, images.shape[:1])
        # (B, 2, ...) -> (2B, ...): anchor 2k, positive 2k + 1, the reference's layout.
        views = images.reshape(-1, *images.shape[2:])
        embeddings, extra = self.project(params, extra, views, base.stream(rng, 'drop_path'))
        c = self.config.loss
        loss, metrics = ranking.rank_hard_loss(
            embeddings,
            jnp.repeat(labels, 2),
            base.stream(rng, 'negatives'),
            neg_num=c.neg_num,
            hard_ratio=c.hard_ratio,
            rand_ratio=c.rand_ratio,
            margin=c.margin,
        )
        return loss, ({'loss': loss, **metrics}, extra)

    def represent(self, params, extra, batch):
        """The backbone's features (a ResNet's pool; a ViT's cls token and mean patch token) and the embedding the
        loss is taken on (fc7 after ReLU and L2 normalisation)."""
        images = batch['image']
        if self.resnet:
            variables = {'params': params, 'batch_stats': extra['batch_stats']}
            h = self.model.apply(variables, images, method=self.model.encode)
            return {'pool': h, 'embedding': self.model.apply(variables, h, method=lambda m, h: m.head(h))}
        encoded, _ = self.model.apply({'params': params}, images, method=self.model.encode)
        encoded = encoded.astype(jnp.float32)
        embedding = self.model.apply({'params': params}, encoded[:, 0], method=lambda m, h: m.head(h))
        return {'cls': encoded[:, 0], 'mean_pool': encoded[:, 1:].mean(axis=1), 'embedding': embedding}

    def host_metrics(self) -> dict[str, float]:
        return {'skipped_files': float(data.skipped_files()), **(self._graph.stats if self._graph else {})}

    def visualize(self, params, extra) -> dict[str, np.ndarray]:
        """Pairs of the graph: rows of A, A' (its track's end), B (an inter neighbour) and B' for up to 8 inter
        edges spread over the list; rows of A, A' alone when no inter edges were mined. None outside a training
        run (building the graph on one process could wait on the others' feature extraction)."""
        if self._graph is None:
            return {}
        g, nodes = self._graph, self._nodes
        n = len(nodes)
        if len(g.edges):
            rows = [[i, i + n, j, j + n] for i, j in g.edges[np.linspace(0, len(g.edges) - 1, 8).astype(int)]]
        else:
            rows = [[i, i + n] for i in np.linspace(0, n - 1, 8).astype(int)]
        tiles = np.stack([np.stack([nodes.view(v) for v in row]) for row in rows])  # (rows, columns, H, W, 3)
        r, c, h, w, _ = tiles.shape
        return {'graph_pairs': tiles.transpose(0, 2, 1, 3, 4).reshape(r * h, c * w, 3)}

    def flops_per_example(self) -> float | None:
        return None
