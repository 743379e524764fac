"""Hash-6 slice reduction: dhash against imagehash, the export scaling, the greedy exemplars by hand and against a
transcription of the reference's loop, the threshold's effect on drifting volumes, and the command line."""

import os

import numpy as np
import pytest
from PIL import Image

from jaxssl import slice_reduction


def drifting_volume(rng, slices=40, size=48, speed=0.6):
    """A CT-like volume: two bright blobs drifting slowly across the slices over a noisy background."""
    y, x = np.mgrid[:size, :size]
    start, velocity = rng.uniform(12, 36, size=(2, 2)), rng.normal(size=(2, 2)) * speed
    volume = []
    for s in range(slices):
        centres = start + velocity * s
        blobs = sum(np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / 40.0) for cy, cx in centres)
        volume.append(1000 * blobs - 500 + rng.normal(size=(size, size)) * 5)
    return np.stack(volume).astype(np.float32)


def reference_exemplars(hash_array, border):
    """Hash_LIDC_Volume.py's loop over one volume (names replaced by indices)."""
    names = np.arange(len(hash_array))
    exemplars = []
    while len(names) > 0:
        distance = np.logical_xor(hash_array[0], hash_array).sum(1)
        matches = np.where(distance <= border)[0]
        exemplars.append(int(names[matches[0]]))
        hash_array = np.delete(hash_array, matches, axis=0)
        names = np.delete(names, matches, axis=0)
    return exemplars


def test_dhash_equals_imagehash():
    import imagehash

    rng = np.random.default_rng(0)
    noise = lambda *shape: rng.integers(0, 256, size=shape, dtype=np.uint8)
    images = [noise(37, 53), noise(64, 64, 3), slice_reduction.to_uint8(drifting_volume(rng)[7])]
    for image in images:
        want = imagehash.dhash(Image.fromarray(image), hash_size=8).hash.ravel()
        np.testing.assert_array_equal(slice_reduction.dhash(image), want)


def test_export_scaling_matches_interval_mapping():
    """The reference's interval_mapping to [0, 255] (range + 1e-5), then cv2's rounding to uint8."""
    image = np.array([[-1000.0, -999.6, 0.0], [1.0, 2.5, 3000.0]])
    scaled = (image + 1000.0) / (4000.0 + 0.00001) * 255.0
    np.testing.assert_array_equal(slice_reduction.to_uint8(image), np.rint(scaled).astype(np.uint8))
    assert slice_reduction.to_uint8(image).max() == 255 and slice_reduction.to_uint8(np.full((2, 2), 7.0)).max() == 0


def test_exemplars_by_hand_and_against_the_reference():
    bits = lambda *ones: np.isin(np.arange(64), ones)
    # 0 and 1 differ in 2 bits, 2 in 7 from 0 but 5 from 1, 3 equals 0: exemplar 0 removes 0, 1, 3; then 2 alone.
    hashes = np.stack([bits(), bits(1, 2), bits(3, 4, 5, 6, 7, 8, 9), bits()])
    assert slice_reduction.hash_exemplars(hashes, 6).tolist() == [0, 2]
    assert slice_reduction.hash_exemplars(hashes, 1).tolist() == [0, 1, 2]  # not transitive, order-dependent
    rng = np.random.default_rng(1)
    for _ in range(5):
        hashes = rng.random((60, 64)) < rng.uniform(0.05, 0.5)
        for border in (0, 6, 12, 20):
            assert slice_reduction.hash_exemplars(hashes, border).tolist() == reference_exemplars(hashes, border)


def test_identical_slices_collapse_and_the_threshold_thins_drifting_volumes():
    rng = np.random.default_rng(2)
    volume = drifting_volume(rng)
    slices = [slice_reduction.to_uint8(s) for s in volume]
    assert slice_reduction.select([slices[3]] * 10, 'hash').tolist() == [0]
    kept = [len(slice_reduction.select(slices, 'hash', border)) for border in (0, 3, 6, 12, 24)]
    assert kept == sorted(kept, reverse=True) and kept[0] > kept[2] > kept[-1] >= 1
    assert slice_reduction.select(slices, 'every_n', every=5).tolist() == list(range(0, 40, 5))
    assert len(slice_reduction.select(slices, 'all')) == 40


def test_command_line_writes_class_folders_and_skips_bad_volumes(tmp_path, capsys):
    rng = np.random.default_rng(3)
    volumes = tmp_path / 'volumes'
    volumes.mkdir()
    np.save(volumes / 'patient_a.npy', drifting_volume(rng, slices=20))
    (volumes / 'patient_b').mkdir()  # a folder of slice images, one unreadable
    for i, s in enumerate(drifting_volume(rng, slices=12)):
        Image.fromarray(slice_reduction.to_uint8(s)).save(volumes / 'patient_b' / f'slice_{i:03d}.png')
    (volumes / 'patient_b' / 'slice_999.png').write_bytes(b'not a png')
    np.save(volumes / 'broken.npy', np.zeros((4, 4)))  # 2-D: not a volume
    out = tmp_path / 'out'
    assert slice_reduction.main([f'--volumes={volumes}', f'--out={out}']) == 0
    printed = capsys.readouterr().out
    assert 'skipped 1 unreadable volumes and 1 unreadable slices' in printed
    written = {d: sorted(os.listdir(out / 'train' / d)) for d in os.listdir(out / 'train')}
    assert set(written) == {'patient_a', 'patient_b'} and written['patient_a'][0] == 'patient_a_0000.png'
    assert 1 <= len(written['patient_a']) < 20 and written['patient_b'][0] == 'slice_000.png'
    first = np.asarray(Image.open(out / 'train' / 'patient_a' / 'patient_a_0000.png'))
    np.testing.assert_array_equal(first, slice_reduction.to_uint8(np.load(volumes / 'patient_a.npy')[0]))
    from jaxssl.data import images as image_data

    assert len(image_data.ImageFolderSource(str(out / 'train'))) == sum(map(len, written.values()))
    with pytest.raises(SystemExit):
        slice_reduction.main([f'--volumes={tmp_path / "none"}', f'--out={out}'])
