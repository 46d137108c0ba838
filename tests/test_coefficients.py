import math

import pytest

from teacache_kernels.coefficients import MAX_COEFFICIENTS, PUBLISHED, polyval, resolve


@pytest.mark.parametrize(
    "name, expected",
    [
        # Sanity values poly(x) at x = 0.01, 0.05, 0.1, 0.2 from ../shared/reference/coefficients.md
        ("flux", (0.231335, 0.180503, 0.206847, 0.261995)),
        ("hunyuan-video", (0.07099, 0.062038, 0.129196, 0.133731)),
        ("ltx-video", (0.017836, 0.053633, 0.101415, 0.192641)),
    ],
)
def test_published_sanity_values(name, expected):
    got = [polyval(PUBLISHED[name].coefficients, x) for x in (0.01, 0.05, 0.1, 0.2)]
    assert got == pytest.approx(expected, rel=2e-5, abs=2e-6)  # the reference values carry 5-6 digits


def test_polynomials_that_go_negative_past_their_fitted_range():
    assert polyval(PUBLISHED["mochi"].coefficients, 0.2) == pytest.approx(-1.08, abs=0.01)
    assert polyval(PUBLISHED["wan2.1-t2v-1.3b-ret"].coefficients, 0.2) == pytest.approx(-28.1, abs=0.1)


def test_cogvideox15_i2v_linear_term_is_the_original_not_the_ported_typo():
    assert PUBLISHED["cogvideox1.5-5b-i2v"].coefficients[3] == -3.06009921e-01


def test_every_published_set_is_valid_and_documented():
    assert len(PUBLISHED) >= 28
    for name, s in PUBLISHED.items():
        assert s.name == name
        assert resolve(name) == s.coefficients and len(s.coefficients) == 5
        assert s.default_thresh > 0 and s.source and s.model and s.signal


def test_resolve_explicit_sequences():
    assert resolve([1, 2, 3]) == (1.0, 2.0, 3.0)
    assert resolve((0.5,)) == (0.5,)


@pytest.mark.parametrize(
    "bad, message",
    [
        ("fluxx", "unknown coefficient set 'fluxx'"),
        ([], "1 to 8 values"),
        ([1.0] * (MAX_COEFFICIENTS + 1), "got 9"),
        ([1.0, math.nan], "must be finite"),
        ([1.0, "a"], "sequence of numbers"),
        (3.0, "sequence of numbers"),
    ],
)
def test_resolve_names_the_bad_value(bad, message):
    with pytest.raises(ValueError, match=message):
        resolve(bad)
