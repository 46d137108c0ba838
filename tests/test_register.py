"""A model the package has never seen, added with `register_model` (docs/adding_a_model.md).

`ToyDiT` is written here, a plain `nn.Module` (not diffusers): adaLN blocks whose `norm1` gives the
modulated input, a timestep embedding, two streams (image and text) chained through the blocks, and its
own forward iterating `self.blocks`. Registering a `ModelFamily` is all TeaCache needs:
- eager, the fused path against the oracle (`reference=True`): error budget zero, as for FLUX
  (tests/test_flux.py): identical schedules, bit-identical outputs;
- compiled (`fullgraph=True`): no graph break, no recompile after the first generation, schedules equal
  to the eager reference's; outputs within tests/test_compile.py's budget (twice what compiling changes
  in the uncached model, plus 1e-6 of the output's scale);
- calibration (derived from the family: no probes written) end to end, then `coefficients_file=`;
- what a user gets wrong, and the errors that say so.
"""

import contextlib
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import teacache_kernels as tk
from teacache_kernels.calibrate import CalibrationSetup, calibrate, find_threshold, load_coefficients_file
from teacache_kernels.calibration import cli
from teacache_kernels.models import FAMILIES
from teacache_kernels.reference import rel_l1

# -- the model: nothing in it knows about TeaCache ------------------------------------------------------------

DIM, HEADS, DEPTH, CHANNELS, TEXT_DIM = 32, 2, 3, 4, 8
TOKENS, TEXT_TOKENS = 16, 6
STEPS = 12


def timestep_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = 1000.0 * t[:, None].float() * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class AdaNorm(nn.Module):
    """LayerNorm modulated by the timestep embedding: (modulated input, gate)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, 3 * dim)

    def forward(self, x, emb):
        shift, scale, gate = self.linear(F.silu(emb))[:, None].chunk(3, dim=-1)
        return self.norm(x) * (1 + scale) + shift, gate


class ToyBlock(nn.Module):
    """Joint attention over text and image tokens, then an MLP on the image tokens."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm1_context = AdaNorm(dim), AdaNorm(dim)
        self.qkv, self.qkv_context = nn.Linear(dim, 3 * dim), nn.Linear(dim, 3 * dim)
        self.proj, self.proj_context = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(approximate="tanh"), nn.Linear(2 * dim, dim))

    def forward(self, hidden_states, encoder_hidden_states, temb):
        h, gate = self.norm1(hidden_states, temb)
        c, gate_context = self.norm1_context(encoder_hidden_states, temb)
        text = c.shape[1]
        qkv = torch.cat([self.qkv_context(c), self.qkv(h)], dim=1)
        q, k, v = qkv.unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        encoder_hidden_states = encoder_hidden_states + gate_context * self.proj_context(attn[:, :text])
        hidden_states = hidden_states + gate * self.proj(attn[:, text:])
        hidden_states = hidden_states + self.mlp(self.norm2(hidden_states))
        return encoder_hidden_states, hidden_states


class ToyDiT(nn.Module):
    def __init__(self, dim=DIM, heads=HEADS, depth=DEPTH, channels=CHANNELS, text_dim=TEXT_DIM):
        super().__init__()
        self.dim = dim
        self.x_embedder = nn.Linear(channels, dim)
        self.context_embedder = nn.Linear(text_dim, dim)
        self.time_embedder = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(ToyBlock(dim, heads) for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(dim, channels)

    @contextlib.contextmanager
    def cache_context(self, name: str):
        """What diffusers' CacheMixin gives its models: TeaCache keeps one state per name (CFG branches)."""
        yield

    def forward(self, hidden_states, encoder_hidden_states, timestep):
        temb = self.time_embedder(timestep_features(timestep, self.dim))
        hidden_states = self.x_embedder(hidden_states)
        encoder_hidden_states = self.context_embedder(encoder_hidden_states)
        for block in self.blocks:
            encoder_hidden_states, hidden_states = block(hidden_states, encoder_hidden_states, temb)
        return self.proj_out(self.norm_out(hidden_states))


# -- what the user writes to add it ---------------------------------------------------------------------------

TOY = tk.ModelFamily(
    name="toy-dit",
    class_names=("ToyDiT",),
    block_lists=("blocks",),
    signals={
        "modulated_input": lambda block, call: block.norm1(call["hidden_states"], call["temb"])[0],
        "timestep_embedding": lambda block, call: call["temb"],
    },
    streams=("hidden_states", "encoder_hidden_states"),
    returns=("encoder_hidden_states", "hidden_states"),
    cached=("hidden_states",),  # after its blocks the forward reads only the image stream
)


@pytest.fixture(scope="module", autouse=True)
def registered():
    """ToyDiT registered for this module's tests; the registry as it was afterwards."""
    saved = dict(FAMILIES)
    tk.register_model(TOY)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models run fastest on one thread
    yield
    torch.set_num_threads(threads)
    FAMILIES.clear()
    FAMILIES.update(saved)


def toy(seed: int = 0) -> ToyDiT:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ToyDiT().eval()


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, TOKENS, CHANNELS, generator=g)
    return latents, torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=g), torch.zeros(1, TEXT_TOKENS, TEXT_DIM)


@torch.no_grad()
def generate(model, seed: int = 1, steps: int = STEPS, cfg_scale: float = 3.0):
    """Euler flow matching from t=1 to 0 with true CFG: each step calls the model in "cond" and "uncond"."""
    x, text, null = inputs(seed)
    ts = torch.linspace(1.0, 0.0, steps + 1)
    for i in range(steps):
        t = ts[i : i + 1]
        with model.cache_context("cond"):
            v = model(x, text, t)
        with model.cache_context("uncond"):
            v_null = model(x, null, t)
        x = x + (ts[i + 1] - ts[i]) * (v_null + cfg_scale * (v - v_null))
    return x


def schedules(model) -> dict[str, str]:
    return {name: c.schedule for name, c in tk.summary(model).contexts.items()}


def assert_clear_of_ties(model, thresh):
    """Every non-forced decision's candidate accumulator is clearly away from the threshold."""
    for ctx in tk.summary(model).contexts.values():
        acc = 0.0
        for s in ctx.steps:
            if not math.isnan(s.y):
                assert abs(acc + s.y - thresh) > 1e-4 * max(thresh, 1e-3), f"{ctx.name} step {s.step}: near tie"
            acc = s.acc


POLY = [1.0, 0.0]  # poly(x) = x: explicit coefficients, as for a model nobody has calibrated yet
THRESHOLDS = (0.1, 0.3, 1.0)


def enable(thresh: float) -> dict:
    return dict(coefficients=POLY, rel_l1_thresh=thresh, num_inference_steps=STEPS)


# -- eager: the fused path against the oracle -----------------------------------------------------------------


@pytest.mark.parametrize("thresh", THRESHOLDS)
def test_fused_matches_reference_over_two_generations(thresh):
    models = {}
    for reference in (False, True):
        model = models[reference] = toy()
        tk.enable_teacache(model, reference=reference, **enable(thresh))
    for generation in range(2):  # the step counter wraps: the second generation starts from a clean state
        fused, ref = generate(models[False]), generate(models[True])
        assert torch.equal(fused, ref), generation
        assert schedules(models[False]) == schedules(models[True])
        sched = "".join(schedules(models[True]).values())
        assert "R" in sched and sched.count("C") >= 4 and sched.startswith("C")  # both outcomes exercised
        assert_clear_of_ties(models[True], thresh)
    assert tk.summary(models[False]).calls == 2 * 2 * STEPS  # two generations, two contexts


def test_threshold_zero_is_the_uncached_model_and_disable_restores_it():
    model = toy()
    plain = generate(model)
    modules, before = [n for n, _ in model.named_modules()], model.state_dict()
    tk.enable_teacache(model, **enable(0.0))
    assert torch.equal(generate(model), plain)
    assert set(schedules(model).values()) == {"C" * STEPS}
    assert [n for n, _ in model.named_modules()] == modules and list(model.state_dict()) == list(before)
    assert len(model.blocks) == DEPTH and len(list(model.blocks)) == 1  # the list yields the span, once
    tk.enable_teacache(model, rel_l1_thresh=0.3)  # enabling again: a new threshold, same coefficients
    assert not torch.equal(generate(model), plain)
    tk.disable_teacache(model)
    assert type(model.blocks) is nn.ModuleList and not hasattr(model, "_teacache")
    assert torch.equal(generate(model), plain)


# -- compiled ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_fullgraph_no_recompiles_matches_eager_reference():
    x, text, _ = inputs()
    t = torch.ones(1)
    model = toy()
    tk.enable_teacache(model, **enable(THRESHOLDS[0]))
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(x, text, t)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    torch._dynamo.reset()

    tk.reset_teacache(model)
    compiled = torch.compile(model, fullgraph=True)
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    generate(compiled)  # warm-up: the first generation compiles, once, both contexts
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before == 1
    results = {}
    with torch._dynamo.config.patch(error_on_recompile=True):
        for thresh in THRESHOLDS:  # a new threshold is written on the device: no recompile
            tk.enable_teacache(model, rel_l1_thresh=thresh)
            results[thresh] = generate(compiled), schedules(model)
        again = generate(compiled)  # a second generation at the last threshold
    assert torch.equal(again, results[THRESHOLDS[-1]][0])

    plain = toy()
    eager_plain = generate(plain)
    compile_error = (generate(torch.compile(plain, fullgraph=True)) - eager_plain).abs().max().item()
    budget = 2 * compile_error + 1e-6 * eager_plain.abs().max().item()
    for thresh in THRESHOLDS:
        reference = toy()
        tk.enable_teacache(reference, reference=True, **enable(thresh))
        ref_out = generate(reference)
        out, sched = results[thresh]
        assert sched == schedules(reference) and "R" in sched["cond"]
        assert (out - ref_out).abs().max().item() <= budget, (thresh, compile_error)


# -- calibration: from the family, no probes written -----------------------------------------------------------


def toy_setup(num_samples: int = 3, num_inference_steps: int = 8) -> CalibrationSetup:
    """What `python -m teacache_kernels calibrate --model tests/test_register.py:toy_setup` runs."""
    model = toy()
    return CalibrationSetup(
        transformer=model,
        run=lambda seed: generate(model, seed=seed, steps=num_inference_steps),
        samples=list(range(num_samples)),
        threshold_samples=list(range(100, 100 + num_samples)),
        model_name="toy-dit",
        num_inference_steps=num_inference_steps,
    )


def test_calibrate_find_threshold_then_enable_from_the_file(tmp_path):
    setup = toy_setup()
    result = calibrate(setup.transformer, setup.run, setup.samples, degree=2, model_name="toy-dit", progress=False)
    assert sorted(c.signal for c in result.candidates) == ["hidden_states", "modulated_input", "timestep_embedding"]
    assert result.runtime_signals == ("modulated_input", "timestep_embedding")
    assert result.contexts == ("cond", "uncond") and result.seq_len == TOKENS
    assert result.recording.num_pairs == 3 * 2 * (8 - 1)
    path = tmp_path / "toy.teacache.json"
    result.save(path)
    thr = find_threshold(
        setup.transformer, setup.run, setup.threshold_samples, min_speedup=1.5, thresholds=[0.05, 0.2, 0.8],
        coefficients_file=path, progress=False,
    )  # fmt: skip
    assert thr.threshold is not None
    thr.save_to(path)
    entry = load_coefficients_file(path)
    assert entry["recommended_thresh"] == thr.threshold and entry["signal"] == result.best.signal

    model = toy()
    tk.enable_teacache(model, coefficients_file=path, num_inference_steps=STEPS)  # threshold from the file
    generate(model)
    summary = tk.summary(model)
    assert summary.rel_l1_thresh == thr.threshold and summary.coefficients == "calibrated for 'toy-dit'"
    assert "R" in summary.contexts["cond"].schedule


def test_recorded_distances_are_the_spans_by_hand():
    """x: block 0's `norm1` output, as the span computes it; y (target "residual"): the image stream's change
    over the blocks."""
    model = toy()
    signals, spans = [], []
    pre = model.blocks[0].register_forward_pre_hook(lambda m, a: spans.append(a[0].clone()))
    norm = model.blocks[0].norm1.register_forward_hook(lambda m, a, o: signals.append(o[0].clone()))
    out = model.blocks[-1].register_forward_hook(lambda m, a, o: spans.append(o[1].double() - spans.pop().double()))
    try:
        generate(model, seed=5, steps=4)  # calls alternate cond, uncond: cond's steps 1 and 2 are calls 2 and 4
    finally:
        pre.remove(), norm.remove(), out.remove()
    run = lambda seed: generate(model, seed=seed, steps=4)  # noqa: E731
    result = calibrate(model, run, [5], target="residual", degree=1, progress=False)
    rec = result.recording
    i = next(k for k in range(rec.num_pairs) if (rec.context[k], rec.step[k]) == ("cond", 2))
    assert rec.x["modulated_input"][i] == pytest.approx(rel_l1(signals[4], signals[2]), rel=1e-12)
    assert rec.y[i] == pytest.approx(rel_l1(spans[4], spans[2]), rel=1e-12)
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, type(m).__name__


def test_cli_calibrate_and_threshold_on_a_registered_model(tmp_path):
    out = tmp_path / "toy.json"
    common = ["--model", f"{__file__}:toy_setup", "--samples", "2", "--steps", "6", "--quiet"]
    assert cli.main(["calibrate", *common, "--degree", "2", "--out", str(out)]) == 0
    assert list(json.loads(out.read_text())["models"]["toy-dit"]) == [str(TOKENS)]
    code = cli.main(["threshold", *common, "--min-speedup", "1.2", "--thresholds", "0.1", "0.5",
                     "--coefficients-file", str(out), "--save"])  # fmt: skip
    assert code == 0 and load_coefficients_file(out)["recommended_thresh"] in (0.1, 0.5)


# -- what a user gets wrong -------------------------------------------------------------------------------------


class UnlistedDiT(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(2, 2)])


def test_register_model_refuses_what_it_cannot_serve():
    with pytest.raises(TypeError, match="register_model takes a teacache_kernels.ModelFamily, got dict"):
        tk.register_model({"class_names": ("ToyDiT",)})
    other = tk.ModelFamily("other", ("ToyDiT",), ("blocks",), TOY.signals)
    with pytest.raises(ValueError, match=r"\{'ToyDiT': 'toy-dit'\} already registered .*replace=True"):
        tk.register_model(other)
    assert tk.register_model(TOY) is TOY  # the same family again: nothing to replace
    try:
        assert tk.register_model(other, replace=True) is other and FAMILIES["ToyDiT"] is other
    finally:
        tk.register_model(TOY, replace=True)
    with pytest.raises(ValueError, match=r"cached names \['text'\], which are not among streams"):
        tk.ModelFamily("bad", ("ToyDiT",), ("blocks",), TOY.signals, streams=("hidden_states",), cached=("text",))
    with pytest.raises(ValueError, match="signals must map names to functions"):
        tk.ModelFamily("bad", ("ToyDiT",), ("blocks",), {"modulated_input": "norm1"})


def test_an_unregistered_class_is_pointed_to_the_guide():
    with pytest.raises(NotImplementedError, match=r"not supported for UnlistedDiT yet.*docs/adding_a_model\.md"):
        tk.enable_teacache(UnlistedDiT(), **enable(0.1))
    with pytest.raises(ValueError, match=r"UnlistedDiT is not a registered model.*docs/adding_a_model\.md"):
        calibrate(UnlistedDiT(), lambda s: None, [0], progress=False)

    class MyToy(ToyDiT):  # a subclass is served by its base class's family
        pass

    model = MyToy()
    tk.enable_teacache(model, **enable(0.1))
    assert model._teacache.family is TOY


def test_errors_of_a_family_that_does_not_fit_its_model():
    model = toy()
    with pytest.raises(ValueError, match="no published coefficients: give coefficients="):
        tk.enable_teacache(model, rel_l1_thresh=0.3, num_inference_steps=STEPS)  # TOY has no default_coefficients
    with pytest.raises(ValueError, match="rel_l1_thresh is required with explicit coefficients"):
        tk.enable_teacache(model, coefficients=POLY, num_inference_steps=STEPS)

    class WrongListDiT(ToyDiT):
        pass

    tk.register_model(tk.ModelFamily("wrong-list", ("WrongListDiT",), ("layers",), TOY.signals))
    with pytest.raises(ValueError, match=r"WrongListDiT\.layers should be the model's nn\.ModuleList of blocks"):
        tk.enable_teacache(WrongListDiT(), **enable(0.3))

    class WrongStreamDiT(ToyDiT):
        pass

    tk.register_model(tk.ModelFamily("wrong-stream", ("WrongStreamDiT",), ("blocks",), TOY.signals, streams=("x",)))
    model = WrongStreamDiT()
    tk.enable_teacache(model, **enable(0.3))
    with pytest.raises(TypeError, match=r"wrong-stream span was called without the stream\(s\) \['x'\]"):
        generate(model)

    class IndexingDiT(ToyDiT):  # indexes its blocks instead of iterating the list: the span never runs
        def forward(self, hidden_states, encoder_hidden_states, timestep):
            temb = self.time_embedder(timestep_features(timestep, self.dim))
            h, c = self.x_embedder(hidden_states), self.context_embedder(encoder_hidden_states)
            for i in range(len(self.blocks)):
                c, h = self.blocks[i](h, c, temb)
            return self.proj_out(self.norm_out(h))

    model = IndexingDiT()
    tk.enable_teacache(model, **enable(0.3))
    generate(model)
    assert tk.summary(model).calls == 0  # what the guide tells users to check


# -- the guide's examples ---------------------------------------------------------------------------------------

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "adding_a_model.md"


@pytest.mark.slow
def test_the_guides_examples_run(tmp_path, monkeypatch):
    """docs/adding_a_model.md's Python blocks, in order (the EasyAnimate one needs a pipeline: tiny_families has none)."""
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), re.S)
    assert len(blocks) == 7, "the guide's Python blocks changed: update this test"
    model, family, enable, setup, from_file, check, _easyanimate = blocks
    monkeypatch.chdir(tmp_path)
    guide: dict = {}
    exec(model + family + enable + setup, guide)
    assert guide["tk"].summary(guide["model"]).calls == 40
    s = guide["setup"](num_samples=2, num_inference_steps=6)  # what `calibrate --model my_dit.py:setup` runs
    path = "my-dit.teacache.json"
    calibrate(s.transformer, s.run, s.samples, degree=2, model_name=s.model_name, progress=False).save(path)
    find_threshold(
        s.transformer, s.run, s.threshold_samples, min_psnr=30, thresholds=[0.05, 0.2], coefficients_file=path,
        progress=False,
    ).save_to()
    exec(from_file + check, guide)


def test_the_guides_unlisted_diffusers_class_is_served_exactly():
    """The guide's EasyAnimate family, registered as written, on a tiny real EasyAnimateTransformer3DModel: threshold 0
    is the plain model bit for bit, and the published set's threshold reuses on a short run."""
    from diffusers import EasyAnimateTransformer3DModel

    block = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), re.S)[-1]
    assert "EasyAnimateTransformer3DModel" in block

    def build():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return EasyAnimateTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                out_channels=4, patch_size=2, sample_width=8, sample_height=8, num_layers=2, mmdit_layers=2,
                time_embed_dim=8, text_embed_dim=16).eval()  # fmt: skip

    guide = {"tk": tk}
    try:
        exec(block.replace("tk.enable_teacache(pipe)", ""), guide)
        plain, model = build(), build()
        tk.enable_teacache(model, num_inference_steps=4, rel_l1_thresh=0.0)
        call = dict(hidden_states=torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(1)),
                    encoder_hidden_states=torch.randn(1, 7, 16, generator=torch.Generator().manual_seed(2)),
                    timestep=torch.tensor([500]), return_dict=False)  # fmt: skip
        with torch.no_grad():
            assert torch.equal(model(**call)[0], plain(**call)[0])
            tk.enable_teacache(model, rel_l1_thresh=None)  # back to the set's own threshold
            for t in (900, 800, 700, 600):
                model(**dict(call, timestep=torch.tensor([t])))
        summary = tk.summary(model)
        assert summary.coefficients == "easyanimate-v5.1-7b" and "R" in summary.contexts["default"].schedule
    finally:
        from teacache_kernels.models import FAMILIES

        FAMILIES.pop("EasyAnimateTransformer3DModel", None)
