"""SiamMAE: the frame-pair sampler (gap range, one crop and flip for both frames, known answers on synthetic videos
whose pixels encode the frame index), skipped files, mask counts, the loss on the later frame's masked patches, and
config errors."""

import jax
import numpy as np
import pytest

from jaxssl import masks
from jaxssl.config import ConfigError, load_config
from jaxssl.data import frame_pairs, pipeline
from jaxssl.data.decode import DecodeError
from jaxssl.data.encode import write_mp4
from jaxssl.data.images import eval_view
from jaxssl.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from jaxssl.methods import siammae
from jaxssl.models import mae

CONFIG = 'configs/siammae.py'
STEP = 5  # a synthetic video's frame t has red value STEP * t


def synthetic_video(frames: int = 48, height: int = 40, width: int = 48) -> np.ndarray:
    """uint8 (T, H, W, 3): red = STEP * t (the frame index), green = a column ramp, blue = a row ramp."""
    video = np.zeros((frames, height, width, 3), np.uint8)
    video[..., 0] = (STEP * np.arange(frames))[:, None, None]
    video[..., 1] = (4 * np.arange(width))[None, None, :]
    video[..., 2] = (5 * np.arange(height))[None, :, None]
    return video


def pixels(view: np.ndarray) -> np.ndarray:
    return (view * IMAGENET_STD + IMAGENET_MEAN) * 255.0


class ArraySource:
    """In-memory clips ('array' records); a None entry is an unreadable clip."""

    label_keys = ('label',)

    def __init__(self, videos):
        self.videos = videos

    def __len__(self):
        return len(self.videos)

    def __getitem__(self, index):
        video = self.videos[index]
        return {
            'name': f'clip{index}',
            'video': np.zeros((2, 2), np.float32) if video is None else video,  # wrong dtype: a DecodeError
            'kind': 'array',
            'start': 0,
            'total': -1,
            'label': index,
        }


def config(*overrides):
    return load_config(f'{CONFIG}:runlocal', ['model.dropout=0.0', *overrides])


def test_gap_range_follows_the_reference_randint():
    rng = np.random.default_rng(0)
    pairs = frame_pairs.pair_indices(100, (4, 48), 20000, rng)
    gaps = pairs[:, 1] - pairs[:, 0]
    # randint(4, 48): 4 to 47, each value drawn; the second frame always inside the video.
    assert gaps.min() == 4 and gaps.max() == 47 and len(np.unique(gaps)) == 44
    assert pairs[:, 0].min() == 0 and pairs[:, 1].max() == 99 and pairs.min() >= 0
    # Short videos clip both ends: 32 frames -> gaps 4..31; 3 frames -> gap min(4, 2) = 2 only.
    short = frame_pairs.pair_indices(32, (4, 48), 5000, rng)
    assert np.ptp(short, axis=1).min() == 4 and np.ptp(short, axis=1).max() == 31 and short.max() <= 31
    np.testing.assert_array_equal(np.ptp(frame_pairs.pair_indices(3, (4, 48), 50, rng), axis=1), 2)
    with pytest.raises(DecodeError, match='at least 2 frames'):
        frame_pairs.pair_indices(1, (4, 48), 1, rng)


def test_tf_crop_box_clamps_without_retries():
    rng = np.random.default_rng(1)
    boxes = np.array([frame_pairs.tf_crop_box(40, 60, rng, (0.5, 1.0), (3 / 4, 4 / 3)) for _ in range(2000)])
    y, x, h, w = boxes.T
    assert (y >= 0).all() and (x >= 0).all() and (y + h <= 40).all() and (x + w <= 60).all()
    # Area fraction >= 0.5 before clamping; the clamp only ever cuts the height here (sqrt(2400 * 4/3) > 40 ...).
    assert (h * w >= 0.5 * 2400 * 0.74).all() and (h == 40).any() and (h < 40).any()
    # One draw, no retry loop: exactly 4 random numbers per box (area, aspect, y, x), like the reference.
    a, b = np.random.default_rng(7), np.random.default_rng(7)
    frame_pairs.tf_crop_box(40, 60, a, (0.5, 1.0), (3 / 4, 4 / 3))
    b.uniform(), b.uniform(), b.integers(0, 2), b.integers(0, 2)
    assert a.random() == b.random()


def test_pair_view_shares_crop_and_flip_and_keeps_frame_identity():
    video = synthetic_video()
    flipped = 0
    for seed in range(40):
        pair = video[[3, 20]]
        out = frame_pairs.frame_pair_view(pair, np.random.default_rng(seed), size=24)
        assert out.shape == (2, 24, 24, 3) and out.dtype == np.float32
        values = pixels(out)
        # Red is constant per frame: each frame keeps its own index after crop + resize.
        np.testing.assert_allclose(values[0, ..., 0], STEP * 3, atol=0.5)
        np.testing.assert_allclose(values[1, ..., 0], STEP * 20, atol=0.5)
        # Green / blue ramps identical in both frames: the same crop box and the same flip on both.
        np.testing.assert_allclose(values[0, ..., 1:], values[1, ..., 1:], atol=1e-4)
        flipped += values[0, 0, 0, 1] > values[0, 0, -1, 1]  # the column ramp runs right to left
    assert 5 < flipped < 35  # flips happen, about half the time


@pytest.mark.parametrize('kind', ['array', 'file'])
def test_loader_known_answer_frame_index_from_pixels(tmp_path, kind):
    video = synthetic_video(frames=40, height=32, width=32)
    if kind == 'file':  # H.264: frame-accurate decoding of the pair
        path = str(tmp_path / 'clip.mp4')
        write_mp4(path, video)
        source = [{'name': path, 'video': path, 'kind': 'file', 'start': 0, 'total': -1}]
    else:
        source = [{'name': 'v', 'video': video, 'kind': 'array', 'start': 0, 'total': -1}]

    class Source(list):
        label_keys = ()

    c = config().input
    view = frame_pairs.make_pair_view(config())
    loader = frame_pairs.FramePairLoader(
        Source(source), range(1), gap_range=(4, 48), num_sample=3, view=view, input_config=c
    )
    for seed in range(3):
        out = loader(0, np.random.default_rng(seed))
        assert out['image'].shape == (3, 2, 32, 32, 3) and out[pipeline.SKIPPED_KEY] == 0
        index = out['frame_index']
        assert ((index[:, 1] - index[:, 0] >= 4) & (index[:, 1] - index[:, 0] <= 39) & (index[:, 1] <= 39)).all()
        # The red value of each decoded frame is STEP x its index (H.264 keeps flat frames within a few levels).
        red = pixels(out['image'])[..., 0].mean(axis=(-1, -2))
        np.testing.assert_allclose(red / STEP, index, atol=0.5)


def test_unreadable_and_too_short_videos_are_replaced_and_counted():
    good = synthetic_video(frames=12, height=16, width=16)
    source = ArraySource([None, good[:1], good])  # broken, one frame only, fine
    cfg = config('input.global_batch=3', 'input.num_sample=1', 'input.num_workers=0')
    before = pipeline.skipped_files()
    dataset = frame_pairs.make_frame_pair_dataset(cfg, seed=0, source=source)
    batch = next(iter(dataset))
    assert batch['image'].shape == (3, 2, 32, 32, 3)
    np.testing.assert_array_equal(batch['label'], 2)  # every clip replaced by the readable one
    assert pipeline.skipped_files() - before >= 2


@pytest.fixture(scope='module')
def tiny_method():
    """The runlocal method on the tiny moving digits, 4 videos a batch, and its parameters (compiled once)."""
    method = siammae.Method(config('input.moving_digits_size=tiny', 'input.global_batch=4'))
    dataset, examples = method.dataset(0, 0, 1)
    batch = next(iter(dataset))
    params, extra = jax.jit(method.init)(jax.random.key(0), batch)
    return method, examples, batch, params, extra


def test_pipeline_masks_second_frame_only_and_loss_is_on_its_masked_patches(tiny_method):
    method, examples, batch, params, extra = tiny_method
    assert examples == 32
    assert batch['image'].shape == (8, 2, 32, 32, 3)  # 4 videos x 2 pairs (repeated sampling)
    gaps = batch['frame_index'][:, 1] - batch['frame_index'][:, 0]
    assert ((gaps >= 4) & (gaps <= 31)).all()
    # 95% of the later frame's 64 patches masked (3 visible), none of the earlier frame's.
    assert batch['ids_keep'].shape == (8, 3) and masks.num_kept(196, 0.95) == 9
    np.testing.assert_array_equal(masks.removed_mask(batch['ids_restore'], 3).sum(-1), 61)

    @jax.jit
    def forward(params, batch):
        out = method.model.apply({'params': params}, batch['image'], batch['ids_keep'], batch['ids_restore'])
        return out, method.loss(params, extra, batch, jax.random.key(1), 0)

    (prediction, inter), (loss, (metrics, _)) = forward(params, batch)
    assert inter['memory'].shape[1] == 1 + 64 and inter['encoded'].shape[1] == 1 + 3

    def by_hand(frames):
        patches = np.asarray(mae.patchify(frames, 4), np.float64)
        target = (patches - patches.mean(-1, keepdims=True)) / np.sqrt(patches.var(-1, ddof=1, keepdims=True) + 1e-6)
        per_patch = ((np.asarray(prediction, np.float64) - target) ** 2).mean(-1)
        return per_patch[batch['ids_restore'] >= 3].mean()

    assert float(metrics['loss_patches']) == 8 * 61
    np.testing.assert_allclose(float(loss), by_hand(batch['image'][:, 1]), rtol=1e-5)
    assert abs(by_hand(batch['image'][:, 0]) - float(loss)) > 1e-4  # the earlier frame is not the target


def test_eval_reads_one_frame_per_video(tiny_method):
    method, _, _, params, _ = tiny_method
    batch = next(iter(method.eval_dataset('val', 4, 8, 0, 1)))
    assert batch['image'].shape == (4, 1, 32, 32, 3) and batch['valid'].all()
    # Each view is the clip's middle frame (16 of 32) in the test view: the same pixels as decoding it directly.
    record = method_source(method, 'val')[0]
    frame = pipeline.load_clip_frames(record, lambda n: np.array([16]), method.config.input)[0]
    want = eval_view(frame, size=32, crop_pct=1.0, interpolation='bilinear')
    np.testing.assert_allclose(batch['image'][0, 0], want, atol=1e-6)
    features = jax.jit(method.represent)(params, {}, {'image': batch['image'][:, 0]})
    assert features['cls'].shape == (4, 64)


def method_source(method, split):
    from jaxssl.data.sources import make_source

    return make_source(method.config, split)


@pytest.mark.parametrize(
    ('overrides', 'needle'),
    [
        (['input.frame_gap=(4, 4)'], "'input.frame_gap'"),
        (['input.frame_gap=(0, 8)'], "'input.frame_gap'"),
        (['input.crop_scale=(0.5, 1.5)'], "'input.crop_scale'"),
        (['input.interpolation=nearest'], "'input.interpolation'"),
        (['masking.ratio=0.99'], "'masking.ratio'"),
    ],
)
def test_bad_config_values_name_their_key(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(f'{CONFIG}:runlocal', overrides)


def test_recipe():
    c = load_config(CONFIG)
    assert c.model.variant == 'S' and c.input.image_size == 224 and c.masking.ratio == 0.95
    assert tuple(c.input.frame_gap) == (4, 48) and tuple(c.input.crop_scale) == (0.5, 1.0)
    # 2048 pairs per step = 1024 videos x repeated sampling 2; peak lr 1.5e-4 x 2048 / 256.
    assert c.input.global_batch * c.input.num_sample == 2048
    assert c.optim.base_lr * c.input.global_batch / 256 == pytest.approx(1.5e-4 * 2048 / 256)
    assert (c.optim.epochs, c.optim.warmup_epochs, c.optim.b2, c.optim.weight_decay) == (400, 40, 0.95, 0.05)
