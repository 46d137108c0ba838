"""The fault matrix: what goes wrong around a TeaCache'd model, and what a user should then get.

Each test provokes one fault on a tiny FLUX (bare transformer or real FluxPipeline) and checks the behaviour a user
expects, against a model that never saw the fault: the next generation is exactly (bit for bit) what a freshly
enabled model produces, the schedules are the reference's, and nothing is left behind (state, hooks, patches).
Covered elsewhere and not repeated here: a new resolution and a shape change mid-generation (tests/test_flux.py),
step counts changing between generations (test_pipeline.py, test_flux.py), model CPU offload and group offloading
(test_enabled_model.py), a compiled model's threshold changing between generations (test_compile.py), and Wan 2.2's
two transformers in one pipeline (test_wan.py).
"""

import pytest
import torch

import teacache_kernels as tk
from teacache_kernels.tiny_models import TinyFluxShape, flow_matching_loop, flux_inputs, tiny_flux_pipeline, tiny_flux_prompt, tiny_flux_transformer

SHAPE = TinyFluxShape()
STEPS = 10
THRESH = 0.6


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def data():
    latents, cond = flux_inputs(SHAPE)
    return latents, cond, flux_inputs(SHAPE, seed=9)[1]


def loop(model, data, steps=STEPS, stop_at=None, batch=1):
    """True-CFG flow matching; raises Interrupt before call `stop_at` (a crash in the user's loop)."""
    latents, cond, negative = data
    if batch > 1:
        latents = latents.repeat(batch, 1, 1)
        cond, negative = ({k: (v.repeat(batch, *([1] * (v.dim() - 1))) if k != "txt_ids" and k != "img_ids" else v)
                           for k, v in c.items()} for c in (cond, negative))  # fmt: skip
    if stop_at is None:
        return flow_matching_loop(model, latents, cond, steps, negative=negative, cfg_scale=3.0)

    class Stop(torch.nn.Module):  # calls through to the model, then fails at the chosen call
        calls = 0

        def cache_context(self, name):
            return model.cache_context(name)

        def forward(self, **kw):
            if Stop.calls == stop_at:
                raise Interrupt
            Stop.calls += 1
            return model(**kw)

    with pytest.raises(Interrupt):
        flow_matching_loop(Stop(), latents, cond, steps, negative=negative, cfg_scale=3.0)


def fresh(**options):
    model = tiny_flux_transformer(SHAPE)
    tk.enable_teacache(model, num_inference_steps=STEPS, rel_l1_thresh=THRESH, **options)
    return model


def schedules(model):
    return {n: c.schedule for n, c in tk.summary(model).contexts.items()}


def test_a_bare_transformer_interrupted_midway_then_reset(data):
    """An exception after 7 of 20 calls; `reset_teacache` (what the README says to call when abandoning a
    generation) and the next generation is a fresh model's, bit for bit."""
    model, expected_model = fresh(), fresh()
    expected = loop(expected_model, data)
    loop(model, data, stop_at=7)
    tk.reset_teacache(model)
    assert torch.equal(loop(model, data), expected) and schedules(model) == schedules(expected_model)
    assert "R" in "".join(schedules(model).values())


def test_a_pipeline_interrupted_midway_starts_over_by_itself():
    """A callback raising at step 4 of a FluxPipeline call; the pipeline's next call (set_timesteps) starts a new
    generation: the output is the uninterrupted pipeline's, with no reset by the user."""
    def generate(pipe, callback=None):
        return pipe(**tiny_flux_prompt(), num_inference_steps=STEPS, height=32, width=32, output_type="latent",
                    generator=torch.Generator().manual_seed(0), callback_on_step_end=callback).images  # fmt: skip

    def crash(pipe, i, t, kw):
        if i == 4:
            raise Interrupt
        return kw

    pipe, clean = tiny_flux_pipeline(), tiny_flux_pipeline()
    for p in (pipe, clean):
        p.set_progress_bar_config(disable=True)
        tk.enable_teacache(p, rel_l1_thresh=THRESH)
    with pytest.raises(Interrupt):
        generate(pipe, crash)
    assert torch.equal(generate(pipe), generate(clean)) and schedules(pipe) == schedules(clean)


def test_the_model_cast_to_another_dtype_after_enabling(data):
    """model.to(bfloat16) after a float32 generation: the next call's signal has another dtype, so its state is
    allocated afresh in bf16, and the generation equals a model cast first and then enabled."""
    latents, cond, negative = data
    bf16 = (latents.bfloat16(), *({k: v.bfloat16() if v.is_floating_point() else v for k, v in c.items()} for c in (cond, negative)))
    model = fresh()
    loop(model, data)
    model.to(torch.bfloat16)
    cast_first = tiny_flux_transformer(SHAPE).to(torch.bfloat16)
    tk.enable_teacache(cast_first, num_inference_steps=STEPS, rel_l1_thresh=THRESH)
    tk.reset_teacache(model)
    out = loop(model, bf16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, loop(cast_first, bf16))
    assert schedules(model) == schedules(cast_first)
    state = model._teacache.cache.contexts["cond"]
    assert state.prev_signal.dtype == state.residual.dtype == torch.bfloat16


def test_batch_size_changing_between_generations(data):
    """Batch 1, then 2, then 1 again: each generation equals a fresh model's at that batch size. Each batch size
    has a state of its own ("cond@2x..." for the second), so the summary also keeps the other size's last one."""
    model = fresh()
    for batch in (1, 2, 1):
        other = fresh()
        out = loop(model, data, batch=batch)
        assert out.shape[0] == batch and torch.equal(out, loop(other, data, batch=batch)), batch
        ours = {n.split("@")[0]: s for n, s in schedules(model).items() if ("@" in n) == (batch != 1)}
        assert ours == schedules(other), batch
    assert {n.split("@")[0] for n in schedules(model)} == {"cond", "uncond"} and len(schedules(model)) == 4


def test_enable_twice_disable_twice_and_disable_mid_generation(data):
    plain = tiny_flux_transformer(SHAPE)
    expected_plain = loop(plain, data)
    model = fresh()
    tk.enable_teacache(model, rel_l1_thresh=THRESH)  # twice: an update in place, same installation
    inst = model._teacache
    tk.enable_teacache(model)
    assert model._teacache is inst
    loop(model, data, stop_at=5)  # mid-generation ...
    tk.disable_teacache(model)  # ... disabled: the plain model at once
    tk.disable_teacache(model)  # twice: a no-op
    assert not hasattr(model, "_teacache") and torch.equal(loop(model, data), expected_plain)
    tk.enable_teacache(model, num_inference_steps=STEPS, rel_l1_thresh=THRESH)  # enabled again: starts fresh
    other = fresh()
    assert torch.equal(loop(model, data), loop(other, data)) and schedules(model) == schedules(other)


def test_two_transformers_in_one_process_keep_separate_state(data):
    """Two enabled transformers called in turn, call by call: each gets exactly the outputs and schedule it gets
    when run alone (different thresholds, so their schedules differ)."""
    a, b = fresh(), tiny_flux_transformer(SHAPE)
    tk.enable_teacache(b, num_inference_steps=STEPS, rel_l1_thresh=1.5)
    alone_a, alone_b = fresh(), tiny_flux_transformer(SHAPE)
    tk.enable_teacache(alone_b, num_inference_steps=STEPS, rel_l1_thresh=1.5)
    expected = (loop(alone_a, data), loop(alone_b, data))
    latents, cond, negative = data
    xs = [latents.clone(), latents.clone()]
    ts = torch.linspace(1.0, 0.0, STEPS + 1)
    with torch.no_grad():
        for i in range(STEPS):  # the two loops interleaved
            for j, m in enumerate((a, b)):
                t = ts[i : i + 1]
                with m.cache_context("cond"):
                    v = m(hidden_states=xs[j], timestep=t, return_dict=False, **cond)[0]
                with m.cache_context("uncond"):
                    v_neg = m(hidden_states=xs[j], timestep=t, return_dict=False, **negative)[0]
                xs[j] = xs[j] + (ts[i + 1] - ts[i]) * (v_neg + 3.0 * (v - v_neg))
    assert torch.equal(xs[0], expected[0]) and torch.equal(xs[1], expected[1])
    assert schedules(a) == schedules(alone_a) and schedules(b) == schedules(alone_b) and schedules(a) != schedules(b)
