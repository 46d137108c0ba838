import math

import pytest

from teacache_kernels import TeaCacheConfig
from teacache_kernels.config import ResolvedConfig


def test_defaults_follow_the_original():
    c = TeaCacheConfig()
    assert (c.rel_l1_thresh, c.coefficients, c.num_inference_steps, c.warmup_steps, c.cooldown_steps) == (None,) * 5
    flux = ResolvedConfig.resolve(c, "flux")  # None: the set's original forces the first and the last call
    assert (flux.forced_first(), flux.cooldown_steps, flux.signal) == (1, 1, "modulated_input")
    explicit = ResolvedConfig.resolve(TeaCacheConfig(coefficients=[1.0, 0.0], rel_l1_thresh=0.1), None)
    assert (explicit.forced_first(), explicit.cooldown_steps) == (1, 1)


def test_a_coefficient_set_carries_its_signal_and_forced_calls():
    """Wan's `*-ret` sets: the projected timestep embedding, the first 5 calls forced and not the last; the
    default-mode sets: the time embedding before the projection, first and last. Explicit fields win."""
    ret = ResolvedConfig.resolve(TeaCacheConfig(coefficients="wan2.1-t2v-1.3b-ret"), None)
    assert (ret.signal, ret.forced_first(), ret.cooldown_steps) == ("timestep_projection", 5, 0)
    default = ResolvedConfig.resolve(TeaCacheConfig(coefficients="wan2.1-t2v-1.3b"), None)
    assert (default.signal, default.forced_first(), default.cooldown_steps) == ("timestep_embedding", 1, 1)
    mine = ResolvedConfig.resolve(TeaCacheConfig(coefficients="wan2.1-t2v-1.3b-ret", warmup_steps=2, cooldown_steps=1), None)
    assert (mine.forced_first(), mine.cooldown_steps) == (2, 1)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(rel_l1_thresh=-0.1), "rel_l1_thresh must be a finite number >= 0, got -0.1"),
        (dict(rel_l1_thresh=math.inf), "got inf"),
        (dict(rel_l1_thresh="0.4"), "got '0.4'"),
        (dict(rel_l1_thresh=True), "got True"),
        (dict(num_inference_steps=0), "num_inference_steps must be an integer >= 1, got 0"),
        (dict(num_inference_steps=2.5), "got 2.5"),
        (dict(warmup_steps=-1), "warmup_steps must be an integer >= 0, got -1"),
        (dict(cooldown_steps=1.0), "cooldown_steps must be an integer >= 0, got 1.0"),
        (dict(coefficients="nope"), "unknown coefficient set 'nope'"),
        (dict(coefficients=[1, math.nan]), "must be finite"),
    ],
)
def test_bad_values_are_named(fields, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TeaCacheConfig(**fields)


def test_unknown_field_lists_the_known_ones():
    with pytest.raises(TypeError, match=r"unknown TeaCacheConfig field\(s\) \['thresh'\]; known fields: .*rel_l1_thresh"):
        TeaCacheConfig.from_fields(None, {"thresh": 0.4})


def test_fields_override_a_config_and_coefficients_are_frozen():
    base = TeaCacheConfig(rel_l1_thresh=0.3, coefficients=[1.0, 2.0])
    assert base.coefficients == (1.0, 2.0)
    updated = TeaCacheConfig.from_fields(base, {"rel_l1_thresh": 0.5})
    assert updated.rel_l1_thresh == 0.5 and updated.coefficients == (1.0, 2.0)
    assert base.replace(warmup_steps=2).warmup_steps == 2


def test_resolved_config_takes_the_sets_default_threshold():
    r = ResolvedConfig.resolve(TeaCacheConfig(num_inference_steps=28), "flux")
    assert r.rel_l1_thresh == 0.4 and r.coefficient_set == "flux" and r.coefficients[0] == pytest.approx(498.651651)
    r = ResolvedConfig.resolve(TeaCacheConfig(coefficients="flux-kontext"), "flux")
    assert r.coefficient_set == "flux-kontext" and r.rel_l1_thresh == 0.22


def test_explicit_coefficients_need_a_threshold():
    with pytest.raises(ValueError, match="rel_l1_thresh is required with explicit coefficients"):
        ResolvedConfig.resolve(TeaCacheConfig(coefficients=[1.0, 0.0]), "flux")


def test_numpy_scalars_are_accepted_and_stored_as_python_numbers():
    np = pytest.importorskip("numpy")
    c = TeaCacheConfig(rel_l1_thresh=np.float32(0.25), num_inference_steps=np.int64(28), warmup_steps=np.int32(2))
    assert c.rel_l1_thresh == 0.25 and type(c.rel_l1_thresh) is float
    assert c.num_inference_steps == 28 and type(c.num_inference_steps) is int and type(c.warmup_steps) is int
    with pytest.raises(ValueError, match="num_inference_steps must be an integer >= 1, got 28.0"):
        TeaCacheConfig(num_inference_steps=28.0)
