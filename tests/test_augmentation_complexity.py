"""The masking kernel and kappa^2 (jaxssl/augmentation_complexity.py) against the definition, enumerated view by
view, and the properties the paper's definition implies."""

import itertools

import numpy as np
import pytest

from jaxssl import augmentation_complexity as ac


def kernel_by_definition(tokens, alpha):
    """K(x, x') = sum over views a of p(a | x) p(a | x') / p(a), with a view = the sequence with some positions
    replaced by a mask symbol (-1), p(a | x) = alpha^masked (1 - alpha)^kept if a agrees with x where kept."""
    n, length = tokens.shape
    views = {}
    for i in range(n):
        for masked in itertools.product((False, True), repeat=length):
            view = tuple(-1 if m else int(t) for m, t in zip(masked, tokens[i], strict=True))
            views[view] = np.array(masked)
    kernel = np.zeros((n, n))
    for view, masked in views.items():
        prob = alpha ** masked.sum() * (1 - alpha) ** (~masked).sum()
        given = np.array([prob * all(v == -1 or v == t for v, t in zip(view, x, strict=True)) for x in tokens])
        marginal = given.mean()
        if marginal > 0:
            kernel += np.outer(given, given) / marginal
    return kernel


@pytest.mark.parametrize('alpha', [0.0, 0.3, 0.7, 1.0])
def test_kernel_equals_the_definition(alpha):
    tokens = np.random.default_rng(0).integers(0, 3, size=(7, 4))
    tokens[5] = tokens[2]  # a duplicate
    np.testing.assert_allclose(ac.augmentation_kernel(tokens, alpha), kernel_by_definition(tokens, alpha), atol=1e-12)
    kappa2, per_sample = ac.augmentation_complexity(tokens, alpha)
    np.testing.assert_allclose(per_sample, np.diag(kernel_by_definition(tokens, alpha)), atol=1e-12)
    assert kappa2 == per_sample.max()


def test_properties():
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 2, size=(12, 6))
    tokens[3] = tokens[7] = tokens[9]  # multiplicity 3
    _, none = ac.augmentation_complexity(tokens, 0.0)
    multiplicity = (tokens[:, None] == tokens[None]).all(-1).sum(1)
    np.testing.assert_allclose(none, 12 / multiplicity)  # N / multiplicity without masking
    np.testing.assert_allclose(ac.augmentation_complexity(tokens, 1.0)[1], 1.0)  # every view is the same
    previous = np.inf
    for alpha in np.linspace(0, 1, 11):
        kappa2, _ = ac.augmentation_complexity(tokens, alpha)
        assert 1.0 - 1e-12 <= kappa2 <= 12 + 1e-12
        assert kappa2 <= previous + 1e-12  # stronger masking, smaller kappa
        previous = kappa2
        assert np.isclose(ac.augmentation_kernel(tokens, alpha).mean(), 1.0)  # E_{x, x'} K = 1


def test_monte_carlo_approaches_the_exact_value():
    tokens = np.random.default_rng(2).integers(0, 2, size=(30, 8))
    _, exact = ac.augmentation_complexity(tokens, 0.5)
    _, sampled = ac.augmentation_complexity(tokens, 0.5, samples=4000, seed=0)
    np.testing.assert_allclose(sampled, exact, rtol=0.1)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match='mask_rate'):
        ac.augmentation_complexity(np.zeros((3, 2), int), 1.5)
    with pytest.raises(ValueError, match='samples > 0'):
        ac.augmentation_complexity(np.zeros((3, 20), int), 0.5)
    with pytest.raises(ValueError, match=r'\(N, L\)'):
        ac.augmentation_complexity(np.zeros(3, int), 0.5)


def test_digit_tokens_and_the_command_line(capsys):
    tokens = ac.digit_patch_tokens(20, 7, 2)
    assert tokens.shape == (20, 16) and tokens.min() >= 0 and tokens.max() < 2**49
    assert ac.main(['--images=20', '--patch=7', '--samples=50', '--rates=0,0.9']) == 0
    out = capsys.readouterr().out
    assert 'N = 20 digits, L = 16 tokens' in out and '0.90 |' in out
