"""Transitive Invariance: the ranking loss against a transcription of the reference's Caffe layer (forward and the
hand-written backward, the fixed denominator, the choice of hard and random negatives and its distribution), the
graph (tracks, inter edges within clusters, the transitive pairs, labels), the pair pipeline, the head's init, the
config (reference recipe, errors naming the key), and a 2-step runlocal run on one device and sharded over 8 fake
CPU devices with equal losses and parameters, its probes and its picture."""

import random
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sharded_runs import assert_sharded_matches_one_device

from jaxssl import optim
from jaxssl.config import ConfigError, load_config
from jaxssl.data import transitive_graph as graph_data
from jaxssl.data.transforms import normalize
from jaxssl.losses import ranking
from jaxssl.methods import transitive_invariance
from jaxssl.models import ranking as ranking_model

CONFIG = 'configs/transitive_invariance.py:runlocal'
# Two classes of digits (800 nodes) and 10 clusters: a graph that builds in a second.
SMALL_GRAPH = ('input.classes=(3, 8)', 'graph.clusters=10', 'input.global_batch=16')


def unit_rows(rng, n, d, nonnegative=True):
    x = rng.normal(size=(n, d))
    x = np.abs(x) if nonnegative else x
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def reference_forward(x, labels, mask, neg_num, margin):
    """RankHardLossLayer::Forward_cpu with a given mask (rows: anchors 0, 2, 4, ...)."""
    num, dis = len(x), -(x @ x.T)
    np.fill_diagonal(dis, 0.0)
    loss = 0.0
    for row, i in enumerate(range(0, num, 2)):
        for j in range(num):
            if mask[row, j]:
                loss += max(0.0, dis[i, i + 1] - dis[i, j] + margin) + max(0.0, dis[i, i + 1] - dis[i + 1, j] + margin)
    return loss / (neg_num * num // 2 * 2)


def reference_backward(x, mask, neg_num, margin):
    """RankHardLossLayer::Backward_cpu: the gradient of the loss with respect to the normalised features."""
    num, dis = len(x), -(x @ x.T)
    grad = np.zeros_like(x, dtype=np.float64)
    for row, i in enumerate(range(0, num, 2)):
        a, p = x[i], x[i + 1]
        for j in range(num):
            if not mask[row, j]:
                continue
            n = x[j]
            if dis[i, i + 1] - dis[i, j] + margin > 0:
                grad[i] += n - p
                grad[i + 1] += -a
                grad[j] += a
            if dis[i, i + 1] - dis[i + 1, j] + margin > 0:
                grad[i] += -p
                grad[i + 1] += n - a
                grad[j] += p
    return grad / (neg_num * num // 2 * 2)


def reference_candidates(x, labels, margin):
    dis = -(x @ x.T)
    return np.array(
        [[labels[j] != labels[i] and dis[i, i + 1] - dis[i, j] + margin > 0 for j in range(len(x))]
         for i in range(0, len(x), 2)]
    )  # fmt: skip


def choose(x, labels, key, **kw):
    return np.asarray(ranking.choose_negatives(-(jnp.asarray(x) @ jnp.asarray(x).T), jnp.asarray(labels), key, **kw))


@pytest.mark.parametrize('seed', range(3))
def test_loss_and_gradient_match_the_caffe_layer(seed):
    rng = np.random.default_rng(seed)
    x = unit_rows(rng, 24, 8)
    labels = np.repeat(rng.integers(0, 5, size=12), 2)  # pairs share a label; several pairs share one too
    kw = dict(neg_num=4, hard_ratio=0.5, rand_ratio=0.5, margin=0.3)
    key = jax.random.key(seed)
    mask = choose(x, labels, key, **kw)
    (loss, metrics), grad = jax.value_and_grad(ranking.rank_hard_loss, has_aux=True)(
        jnp.asarray(x), jnp.asarray(labels), key, **kw
    )
    np.testing.assert_allclose(loss, reference_forward(x, labels, mask, 4, 0.3), rtol=1e-5)
    np.testing.assert_allclose(grad, reference_backward(x, mask, 4, 0.3), rtol=1e-4, atol=1e-7)
    assert 0 < float(metrics['negatives_per_pair']) <= 4


@pytest.mark.parametrize('seed', range(6))
def test_negatives_follow_the_reference_rule(seed):
    rng = np.random.default_rng(seed)
    x = unit_rows(rng, 32, 6, nonnegative=False)
    labels = np.repeat(rng.integers(0, 6, size=16), 2)
    margin = float(rng.choice([0.2, 1.0]))
    candidates = reference_candidates(x, labels, margin)
    dis = -(x @ x.T)
    for hard_ratio, rand_ratio in ((0.5, 0.5), (1.0, 0.0), (0.0, 1.0), (0.25, 0.5)):
        kw = dict(neg_num=4, hard_ratio=hard_ratio, rand_ratio=rand_ratio, margin=margin)
        mask = choose(x, labels, jax.random.key(seed), **kw)
        hard_num, rand_num = int(4 * hard_ratio), int(4 * rand_ratio)
        for row, i in enumerate(range(0, 32, 2)):
            chosen, cand = np.flatnonzero(mask[row]), np.flatnonzero(candidates[row])
            assert set(chosen) <= set(cand)  # other labels, hinge still open
            if len(cand) <= 4:
                np.testing.assert_array_equal(chosen, cand)
                continue
            assert len(chosen) == hard_num + rand_num
            hardest = cand[np.argsort(dis[i, cand], kind='stable')[:4]]
            assert len(set(chosen) & set(hardest)) >= hard_num
            if hard_ratio == 1.0:
                assert set(chosen) == set(hardest)


def test_random_choice_is_uniform_and_hard_choice_stays_in_the_pool():
    """One anchor row with 12 candidates, over 4,000 draws: the hard half is a uniform 2-subset of the 4 hardest; the
    random half is uniform over the other 10 (8 left outside the pool + the pool's 2 not taken)."""
    rng = np.random.default_rng(0)
    x = unit_rows(rng, 14, 5)
    labels = np.array([0, 0, *range(1, 13)])  # one pair, 12 candidates
    kw = dict(neg_num=4, hard_ratio=0.5, rand_ratio=0.5, margin=2.0)  # margin 2: every hinge stays open
    keys = jax.random.split(jax.random.key(1), 4000)
    distances = -(jnp.asarray(x) @ jnp.asarray(x).T)
    masks = np.asarray(
        jax.vmap(lambda k: ranking.choose_negatives(distances, jnp.asarray(labels), k, **kw))(keys)
    )[:, 0]  # fmt: skip
    assert (masks.sum(1) == 4).all() and not masks[:, :2].any()
    hardest = 2 + np.argsort(np.asarray(distances)[0, 2:], kind='stable')[:4]
    assert (masks[:, hardest].sum(1) >= 2).all()
    # Each pool member is chosen with p 1/2 (hard half) + 1/2 x 2/10 (random half) = 0.6; the others with 2/10.
    rate = masks.mean(0)
    np.testing.assert_allclose(rate[hardest], 0.6, atol=0.04)
    others = np.setdiff1d(np.arange(2, 14), hardest)
    np.testing.assert_allclose(rate[others], 0.2, atol=0.03)


def reference_set_mask_row(dis, labels, i, neg_num, hard_ratio, rand_ratio, margin, rng):
    """RankHardLossLayer::set_mask for the anchor i, transcribed (random_shuffle as random.shuffle)."""
    hard_num, rand_num = int(neg_num * hard_ratio), int(neg_num * rand_ratio)
    negpairs = [(dis[i, j], j) for j in range(len(labels))
                if labels[j] != labels[i] and max(0.0, dis[i, i + 1] - dis[i, j] + margin) != 0]  # fmt: skip
    if len(negpairs) <= neg_num:
        return {j for _, j in negpairs}
    negpairs.sort()
    sid1, sid2 = [j for _, j in negpairs[:neg_num]], [j for _, j in negpairs[neg_num:]]
    rng.shuffle(sid1)
    chosen = set(sid1[: min(hard_num, len(sid1))])
    sid2 += sid1[hard_num:]
    rng.shuffle(sid2)
    return chosen | set(sid2[: min(rand_num, len(sid2))])


@pytest.mark.parametrize('hard_ratio, rand_ratio', [(0.5, 0.5), (0.25, 0.5), (0.75, 0.25), (0.0, 1.0)])
def test_choice_frequencies_match_the_caffe_set_mask(hard_ratio, rand_ratio):
    """Per-entry choice frequencies over 3,000 draws equal the transcription's, on rows with exact distance ties (the
    hard pool's edge falls inside a tie: the lower index goes first), a row with exactly neg_num candidates (all
    taken) and a row with closed hinges."""
    e = np.eye(4)
    rows = [e[0], e[0], e[1], e[1], *[(e[0] + e[1]) / np.sqrt(2)] * 3, *[(e[0] + e[2]) / np.sqrt(2)] * 2, e[2], e[3],
            e[3], e[1], e[2]]  # fmt: skip
    x = np.asarray(rows, np.float32)
    labels = np.repeat(np.arange(7), 2)  # pairs (0, 1), (2, 3), ... share a label
    dis = -(x.astype(np.float64) @ x.T.astype(np.float64))
    # A hinge is open when a.x_j > a.p - margin (0.4): anchor 0 has 5 candidates at one distance (4-8: the pool is
    # 4-7), anchor 2 exactly 4 (4, 5, 6, 12), anchors 6 and 8 seven, anchor 10 none, anchor 12 all 12 (2, 3 nearest,
    # then 4-6 tied: 6 is out of the pool).
    kw = dict(neg_num=4, hard_ratio=hard_ratio, rand_ratio=rand_ratio, margin=0.4)
    keys = jax.random.split(jax.random.key(0), 3000)
    masks = np.asarray(jax.vmap(lambda k: ranking.choose_negatives(jnp.asarray(dis, jnp.float32),
                                                                   jnp.asarray(labels), k, **kw))(keys))  # fmt: skip
    rng = random.Random(0)
    for row, i in enumerate(range(0, len(x), 2)):
        want = np.zeros(len(x))
        for _ in range(3000):
            want[list(reference_set_mask_row(dis, labels, i, **kw, rng=rng))] += 1 / 3000
        np.testing.assert_allclose(masks[:, row].mean(0), want, atol=0.04, err_msg=f'anchor {i}')
    assert (masks[:, 1] == np.isin(np.arange(14), [4, 5, 6, 12])).all()  # exactly neg_num candidates: all of them
    assert not masks[:, 5].any()
    if hard_ratio == 0.75:  # 3 of the pool 4-7 every time, so 8 (tied with them, higher index) only by the random one
        assert (masks[:, 0, 4:8].sum(1) >= 3).all()


def test_denominator_is_fixed_whatever_is_chosen():
    """Two pairs of one label each and nothing else: no candidates, loss 0; one pair apart with a single candidate
    each: the loss is still divided by 2 x neg_num x pairs."""
    x = np.eye(4, dtype=np.float32)[[0, 1, 2, 3]]
    labels = np.array([0, 0, 0, 0])
    loss, _ = ranking.rank_hard_loss(jnp.asarray(x), jnp.asarray(labels), jax.random.key(0))
    assert float(loss) == 0.0
    labels = np.array([0, 0, 1, 1])
    loss, metrics = ranking.rank_hard_loss(jnp.asarray(x), jnp.asarray(labels), jax.random.key(0), margin=1.0)
    # Orthogonal units: D = 0 off the diagonal, each anchor has 2 candidates (both open), each term max(0, 1) = 1.
    # Sum = 2 anchors x 2 negatives x 2 terms = 8; denominator 4 x 4 / 2 x 2 = 16.
    np.testing.assert_allclose(loss, 0.5)
    assert float(metrics['negatives_per_pair']) == 2.0


@pytest.mark.parametrize('init', ['xavier', 'gaussian'])
def test_head_is_the_reference_fc_relu_l2(init):
    head = ranking_model.RankingHead(hidden_dim=256, out_dim=64, layers=2, weight_init=init)
    h = jax.random.normal(jax.random.key(0), (5, 512))
    variables = head.init(jax.random.key(1), h)
    params = variables['params']
    assert jax.tree.map(jnp.shape, params) == {
        'fc_0': {'kernel': (512, 256), 'bias': (256,)},
        'fc_1': {'kernel': (256, 64), 'bias': (64,)},
    }
    for name, fan_in in (('fc_0', 512), ('fc_1', 256)):
        kernel = np.asarray(params[name]['kernel'])
        if init == 'xavier':  # Caffe's xavier: U(+-sqrt(3 / fan_in)), std 1 / sqrt(fan_in)
            assert np.abs(kernel).max() <= np.sqrt(3 / fan_in) + 1e-7
            np.testing.assert_allclose(kernel.std(), 1 / np.sqrt(fan_in), rtol=0.05)
        else:  # the AlexNet prototxt's N(0, 0.005)
            np.testing.assert_allclose(kernel.std(), 0.005, rtol=0.05)
        np.testing.assert_array_equal(params[name]['bias'], 1.0)
    z = np.asarray(head.apply(variables, h))
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)
    assert (z >= 0).all()
    want = np.maximum(np.maximum(h @ params['fc_0']['kernel'] + params['fc_0']['bias'], 0) @ params['fc_1']['kernel']
                      + params['fc_1']['bias'], 0)  # fmt: skip
    np.testing.assert_allclose(z, want / (np.linalg.norm(want, axis=1, keepdims=True) + 1e-6), rtol=1e-5)


def test_transitive_pairs_known_answer():
    edges = np.array([[0, 1], [2, 0]])
    pairs = graph_data.transitive_pairs(edges, 3, ('intra', 'inter', 'transitive'))
    intra, inter, transitive = (pairs[pairs[:, 2] == k, :2].tolist() for k in range(3))
    assert intra == [[0, 3], [1, 4], [2, 5]]  # <A_i, A'_i>
    assert inter == [[0, 1], [2, 0]]  # <A_i, A_j>
    # <A, B'>, <A', B>, <A', B'> for every edge (A'_i is view 3 + i).
    assert transitive == [[0, 4], [2, 3], [3, 1], [5, 0], [3, 4], [5, 3]]
    assert graph_data.transitive_pairs(edges, 3, ('intra',)).tolist() == [[0, 3, 0], [1, 4, 0], [2, 5, 0]]


def test_kind_shares_resample_the_pairs():
    edges = np.stack([np.arange(30), (np.arange(30) + 1) % 30], axis=1)
    pairs = graph_data.transitive_pairs(edges, 30, ('intra', 'inter', 'transitive'))  # 30 + 30 + 90
    mixed = graph_data.mix_kinds(pairs, (1, 1, 2), ('intra', 'inter', 'transitive'), seed=0)
    assert np.bincount(mixed[:, 2]).tolist() == [38, 38, 75]  # round(150 x 1/4, 1/4, 1/2)
    rows = {tuple(r) for r in pairs.tolist()}
    assert all(tuple(r) in rows for r in mixed.tolist())  # only graph pairs, drawn again
    np.testing.assert_array_equal(mixed, graph_data.mix_kinds(pairs, (1, 1, 2), ('intra', 'inter', 'transitive'), 0))
    same = graph_data.mix_kinds(pairs, (30, 30, 90), ('intra', 'inter', 'transitive'), seed=0)
    np.testing.assert_array_equal(same, pairs)  # shares equal to the counts keep every pair once


def test_inter_edges_join_nearest_members_of_a_cluster():
    features = np.array([[1, 0], [0.9, 0.1], [0.6, 0.4], [0, 1], [0.1, 0.9]], np.float64)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    clusters = np.array([0, 0, 0, 1, 1])
    edges = graph_data.inter_edges(features, clusters, neighbours=1)
    assert edges.tolist() == [[0, 1], [1, 0], [2, 1], [3, 4], [4, 3]]
    edges = graph_data.inter_edges(features, np.array([0, 0, 0, 1, 2]), neighbours=5)  # clusters of 3, 1 and 1
    assert sorted(map(tuple, edges.tolist())) == [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]


def test_track_end_is_seeded_and_moves_the_object():
    image = np.zeros((28, 28, 3), np.uint8)
    image[8:20, 12:16] = 200  # a bar
    end = graph_data.track_end(image, np.random.default_rng(3), graph_data.TrackConfig())
    again = graph_data.track_end(image, np.random.default_rng(3), graph_data.TrackConfig())
    np.testing.assert_array_equal(end, again)
    assert end.shape == image.shape and end.dtype == np.uint8 and not np.array_equal(end, image)
    assert end.max() > 0 and (end[..., 0] == end[..., 2]).all()  # still there, still grey
    still = graph_data.TrackConfig(rotation=0.0, scale=0.0, shear=0.0, shift=0.0, gain=(1.0, 1.0), stroke_prob=0.0)
    np.testing.assert_array_equal(graph_data.track_end(image, np.random.default_rng(3), still), image)
    # Replaying the generator's draws: a pure shift moves the bar's centroid by the drawn shift (rows, columns), and
    # a pure zoom scales its offset from the centre by the drawn scale.
    rows, cols = np.mgrid[:28, :28]

    def centroid(img):
        w = img[..., 0].astype(np.float64)
        return np.array([(w * rows).sum(), (w * cols).sum()]) / w.sum()

    shift = graph_data.TrackConfig(rotation=0.0, scale=0.0, shear=0.0, shift=0.25, gain=(1.0, 1.0), stroke_prob=0.0)
    replay = np.random.default_rng(5)
    replay.uniform(), replay.uniform(), replay.uniform()  # rotation, scale, shear (all 0 here)
    drawn = replay.uniform(-0.25, 0.25, size=2) * 28
    moved = graph_data.track_end(image, np.random.default_rng(5), shift)
    np.testing.assert_allclose(centroid(moved) - centroid(image), drawn, atol=0.35)  # rounding to uint8
    assert np.abs(drawn).max() > 2  # a real move
    zoom = graph_data.TrackConfig(rotation=0.0, scale=0.4, shear=0.0, shift=0.0, gain=(1.0, 1.0), stroke_prob=0.0)
    replay = np.random.default_rng(7)
    replay.uniform()
    factor = replay.uniform(0.6, 1.4)
    centre = np.array([13.5, 13.5])
    zoomed = graph_data.track_end(image, np.random.default_rng(7), zoom)
    np.testing.assert_allclose(centroid(zoomed) - centre, factor * (centroid(image) - centre), atol=0.35)
    assert abs(factor - 1) > 0.2  # a real zoom


@pytest.fixture(scope='module')
def small_method():
    config = load_config(CONFIG, list(SMALL_GRAPH))
    return transitive_invariance.Method(config)


def test_graph_labels_pairs_and_purity(small_method):
    g, nodes = small_method.graph, small_method._nodes
    n = len(g.labels)
    assert n == len(nodes) == 800 and nodes.view(0).shape == nodes.view(1599).shape == (28, 28, 3)
    assert set(np.unique(g.labels)) == set(range(10))  # labels: the 10 clusters
    # Inter edges stay inside a cluster, so every pair's two views share the loss's label.
    first, second = g.pairs[:, 0] % n, g.pairs[:, 1] % n
    np.testing.assert_array_equal(g.labels[first], g.labels[second])
    kinds = np.bincount(g.pairs[:, 2], minlength=3)
    assert kinds.tolist() == [800, len(g.edges), 3 * len(g.edges)] and len(g.edges) == 800 * 4
    # Pixel clusters of 3s and 8s: most inter edges join one class (measured 0.96; a shuffled graph gives ~0.5).
    assert g.stats['graph_inter_purity'] > 0.85
    # The intra pairs hold a node's start and its track's end, the same end at every read.
    intra = g.pairs[g.pairs[:, 2] == 0]
    np.testing.assert_array_equal(intra[:, 1], intra[:, 0] + n)
    end = nodes.view(n + 5)
    np.testing.assert_array_equal(end, nodes.view(n + 5))
    track = graph_data.TrackConfig(**{**small_method.config.graph.track.to_dict(), 'gain': (0.6, 1.0)})
    np.testing.assert_array_equal(end, graph_data.track_end(nodes.view(5), np.random.default_rng([0, 1, 5]), track))
    # The pipeline's read of a pair (an intra pair decodes its node once) gives the two views.
    source = graph_data.PairSource(g, nodes)
    for index in (0, int(np.flatnonzero(g.pairs[:, 2] == 2)[0])):
        first, second, _ = g.pairs[index]
        np.testing.assert_array_equal(source.load(source[index]), np.stack([nodes.view(first), nodes.view(second)]))


def test_intra_only_graph_labels_each_node(tmp_path):
    config = load_config(CONFIG, [*SMALL_GRAPH, "graph.pair_kinds=('intra',)"])
    g = transitive_invariance.Method(config).graph
    np.testing.assert_array_equal(g.labels, np.arange(800))
    assert len(g.edges) == 0 and (g.pairs[:, 2] == 0).all() and 'graph_inter_purity' not in g.stats


def test_pipeline_batches_pairs(small_method):
    dataset, per_epoch = small_method.dataset(seed=0, process_index=0, process_count=1)
    assert per_epoch == len(small_method.graph.pairs)
    batch = next(iter(dataset))
    assert batch['image'].shape == (16, 2, 32, 32, 3) and batch['image'].dtype == np.float32
    assert batch['pair_label'].shape == (16,) and batch['pair_kind'].shape == (16,)
    assert set(batch['pair_kind']) <= {0, 1, 2} and set(batch['pair_label']) <= set(range(10))


def test_pipeline_rows_are_graph_pairs():
    """With an identity view (no crop, no resize, no flip), every batch row is the two views of one graph pair, with
    that pair's label and kind."""
    config = load_config(CONFIG, [*SMALL_GRAPH, 'input.image_size=28', 'input.crop_scale=(1.0, 1.0)'])
    method = transitive_invariance.Method(config)
    g, nodes, n = method.graph, method._nodes, 800
    batch = next(iter(method.dataset(seed=0, process_index=0, process_count=1)[0]))
    views = normalize(np.stack([nodes.view(v) for v in range(2 * n)]))
    flat = views.reshape(2 * n, -1)
    for row in range(16):
        first = np.flatnonzero(np.abs(flat - batch['image'][row, 0].reshape(1, -1)).max(1) < 1e-5)
        second = np.flatnonzero(np.abs(flat - batch['image'][row, 1].reshape(1, -1)).max(1) < 1e-5)
        matches = [p for p in range(len(g.pairs)) if g.pairs[p, 0] in first and g.pairs[p, 1] in second]
        assert matches, f'row {row} is not a graph pair'
        assert batch['pair_kind'][row] in g.pairs[matches, 2]
        assert batch['pair_label'][row] == g.labels[g.pairs[matches[0], 0] % n]


def test_loss_reads_pairs_adjacent_with_their_labels(small_method, monkeypatch):
    """The method hands the ranking loss the 2B embeddings as (view 0, view 1) of each pair, adjacent, with each
    pair's label on both: two copies of one image embed equally, whatever the other pairs."""
    seen, original = {}, ranking.rank_hard_loss

    def capture(embeddings, labels, rng, **kw):
        seen.update(embeddings=embeddings, labels=labels)
        return original(embeddings, labels, rng, **kw)

    monkeypatch.setattr(ranking, 'rank_hard_loss', capture)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(4, 1, 32, 32, 3)).astype(np.float32)
    batch = {'image': np.repeat(images, 2, axis=1), 'pair_label': np.array([7, 3, 9, 3], np.int32)}
    batch['image'][2, 1] = rng.normal(size=(32, 32, 3))  # pair 2: two different images
    params, extra = small_method.init(jax.random.key(0), small_method.example_batch(4))
    small_method.loss(params, extra, jax.tree.map(jnp.asarray, batch), jax.random.key(1), 0)
    z = np.asarray(seen['embeddings'])
    np.testing.assert_array_equal(seen['labels'], [7, 7, 3, 3, 9, 9, 3, 3])
    for k in (0, 1, 3):
        np.testing.assert_allclose(z[2 * k], z[2 * k + 1], atol=1e-5)
    assert not np.allclose(z[4], z[5], atol=1e-5)


@pytest.mark.parametrize(
    'override, key',
    [
        ("graph.pair_kinds=('intra', 'cousins')", "'graph.pair_kinds'"),
        ('graph.pair_kinds=()', "'graph.pair_kinds'"),
        ('graph.clusters=0', "'graph.clusters'"),
        ('graph.neighbours=0', "'graph.neighbours'"),
        ('loss.neg_num=0', "'loss.neg_num'"),
        ('loss.hard_ratio=0.8', "'loss.hard_ratio'"),
        ('loss.margin=-0.1', "'loss.margin'"),
        ('graph.track.gain=(1.0, 0.5)', "'graph.track.gain'"),
        ('graph.kind_shares=(1.0, 1.0)', "'graph.kind_shares'"),
        ('graph.kind_shares=(0.0, 0.0, 0.0)', "'graph.kind_shares'"),
        ('graph.track.rotation=-1.0', "'graph.track.rotation'"),
        ('input.num_sample=2', "'input.num_sample'"),
        ('model.head_out=0', "'model.head_out'"),
    ],
)
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(CONFIG, [override])


def test_reference_recipe():
    config = load_config('configs/transitive_invariance.py')
    loss = config.loss
    assert (loss.neg_num, loss.hard_ratio, loss.rand_ratio, loss.margin) == (4, 0.5, 0.5, 1.0)
    assert (config.model.head_hidden, config.model.head_out, config.model.head_init_std) == (4096, 1024, 0.005)
    assert config.optim.name == 'sgd' and config.optim.momentum == 0.9 and config.optim.weight_decay == 5e-4
    assert config.input.global_batch == 40 and config.train.steps == 600_000 and config.input.image_size == 224
    np.testing.assert_allclose(config.optim.base_lr * config.input.global_batch / 256, 1e-3)
    assert config.model.head_init == 'xavier' and config.model.head_bias_init == 1.0  # the VGG16 prototxt's
    params = transitive_invariance.Method(config).model.init(jax.random.key(0), jnp.zeros((2, 32, 32, 3)))['params']
    multipliers = optim.lr_multipliers(params, config.optim.lr_rules)
    assert multipliers['head']['fc_0']['bias'] == multipliers['head']['fc_1']['bias'] == 2.0  # Caffe's lr_mult 2
    assert multipliers['head']['fc_0']['kernel'] == 1.0
    assert config.graph.node_size == 227 and config.input.hflip  # resized to 227, 224 crops, mirrored
    np.testing.assert_allclose(config.input.crop_scale, ((224 / 227) ** 2,) * 2)
    load_config('configs/transitive_invariance.py:variant=B')  # a ViT fits the 224 crops
    assert config.graph.pair_kinds == ('intra', 'inter', 'transitive')
    assert load_config('configs/transitive_invariance.py:pairs=intra').graph.pair_kinds == ('intra',)


def test_picture_shows_graph_pairs(small_method):
    picture = small_method.visualize(None, None)['graph_pairs']
    assert picture.shape == (8 * 28, 4 * 28, 3) and picture.dtype == np.uint8
    g, nodes, n = small_method.graph, small_method._nodes, 800
    i, j = g.edges[0]
    np.testing.assert_array_equal(picture[:28, :28], nodes.view(i))
    np.testing.assert_array_equal(picture[:28, 28:56], nodes.view(i + n))
    np.testing.assert_array_equal(picture[:28, 84:], nodes.view(j + n))
    fresh = transitive_invariance.Method(small_method.config)
    assert fresh.visualize(None, None) == {}  # no graph outside a training run: nothing built for a picture


def test_runlocal_sharded_matches_one_device_and_evaluates(tmp_path):
    """Random negatives only: which of two near-equal distances sorts first may differ between meshes in the last
    bit, and the hard pool would then differ; the random choice does not depend on the order."""
    summary, rows = assert_sharded_matches_one_device(
        CONFIG, tmp_path, *SMALL_GRAPH, 'loss.hard_ratio=0.0', 'loss.rand_ratio=1.0', 'model.head_hidden=32',
        'model.head_out=16', 'model.resnet_width=4', keys=('loss', 'positive_similarity'),
    )  # fmt: skip
    assert all(0.0 < r['loss'] < 2.0 and r['negatives_per_pair'] == 4.0 for r in rows)
    assert rows[0]['graph_pairs'] == 800 * 17 and rows[0]['graph_inter_purity'] > 0.85
    for key in ('pool', 'embedding'):
        assert 0.0 <= summary[f'final_eval/label/{key}/knn'] <= 1.0
    # That run's features as the graph's (the paper clusters an earlier self-supervised model's features).
    run = (f'graph.features={tmp_path / "one"}', 'graph.representation=embedding')
    graph = transitive_invariance.Method(load_config(CONFIG, [*SMALL_GRAPH, *run])).graph
    assert len(graph.edges) == 800 * 4 and 0.5 < graph.stats['graph_inter_purity'] <= 1.0
    pixels = transitive_invariance.Method(load_config(CONFIG, list(SMALL_GRAPH))).graph
    assert not np.array_equal(graph.edges, pixels.edges)
    for bad, key in (((*run[:1], 'graph.representation=cls'), "'graph.representation'"),
                     ((f'graph.features={tmp_path}',), 'graph.features')):  # fmt: skip
        with pytest.raises(ConfigError, match=re.escape(key)):
            _ = transitive_invariance.Method(load_config(CONFIG, [*SMALL_GRAPH, *bad])).graph


class _Records:
    """A source of three grey images, the middle one unreadable."""

    label_keys = ('label',)

    def __len__(self):
        return 3

    def __getitem__(self, index):
        image = np.full((6, 6), 40 * (index + 1), np.uint8) if index != 1 else b'not an image'
        return {'name': f'record {index}', 'image': image, 'kind': 'array' if index != 1 else 'bytes', 'label': index}


def test_unreadable_images_are_skipped_and_counted():
    from jaxssl import data

    before = data.skipped_files()
    kept, classes, features = graph_data.scan_nodes(_Records(), node_size=4)
    assert kept.tolist() == [0, 2] and classes.tolist() == [0, 2] and features.shape == (2, 256)
    assert data.skipped_files() == before + 1
    nodes = graph_data.Nodes(_Records(), kept, 4, graph_data.TrackConfig(), seed=0)
    np.testing.assert_array_equal(nodes.view(1), np.full((4, 4, 3), 120, np.uint8))  # node 1 is record 2


def test_vit_backbone_represents_and_embeds():
    config = load_config(CONFIG, [*SMALL_GRAPH, 'model.variant=micro/8', 'model.head_hidden=32', 'model.head_out=16'])
    method = transitive_invariance.Method(config)
    batch = method.example_batch(4)  # four pairs of random images, four labels: 4 negatives for each pair
    params, extra = method.init(jax.random.key(0), batch)
    loss, (metrics, _) = method.loss(params, extra, batch, jax.random.key(1), 0)
    assert np.isfinite(float(loss)) and float(metrics['negatives_per_pair']) == 4.0
    features = method.represent(params, extra, {'image': jnp.asarray(batch['image'][:, 0])})
    width = method.model.width
    assert features['cls'].shape == features['mean_pool'].shape == (4, width) and features['embedding'].shape == (4, 16)
    np.testing.assert_allclose(np.linalg.norm(features['embedding'], axis=1), 1.0, rtol=1e-5)
