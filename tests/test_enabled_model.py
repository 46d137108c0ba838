"""An enabled transformer is still the model diffusers built: what works on a plain model works while enabled.

Each test does the same thing to a plain tiny FLUX and to one with TeaCache on, and compares. The enabled
model runs at rel_l1_thresh=0 where outputs are compared (every call computes), which is bit-identical
to the uncached model (tests/test_flux.py), so the error budget here is zero: any difference is the
operation behaving differently because TeaCache is on.
"""

import copy

import pytest
import torch

import teacache_kernels as tk
from teacache_kernels.tiny_models import TinyFluxShape, flow_matching_loop, flux_inputs, tiny_flux_transformer

SHAPE = TinyFluxShape()
STEPS = 6


@pytest.fixture(scope="module")
def inputs():
    latents, cond = flux_inputs(SHAPE)
    return latents, cond


def pair(**enable):
    """(plain, enabled) tiny FLUX transformers with the same weights."""
    plain, enabled = tiny_flux_transformer(SHAPE), tiny_flux_transformer(SHAPE)
    tk.enable_teacache(enabled, num_inference_steps=STEPS, **{"rel_l1_thresh": 0.0, **enable})
    return plain, enabled


def run(model, inputs, steps=STEPS):
    latents, cond = inputs
    return flow_matching_loop(model, latents, cond, steps)


def names(model):
    return [n for n, _ in model.named_modules()], [n for n, _ in model.named_parameters()], list(model.state_dict())


# -- LoRA ---------------------------------------------------------------------------------------------------

peft = pytest.importorskip("peft")
LORA_FILE = "pytorch_lora_weights.safetensors"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_mlp"]


def add_lora(model, name="a", seed=0):
    torch.manual_seed(seed)  # init_lora_weights=False: random A and B, so the adapter changes the output
    model.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights=False), adapter_name=name)


def test_lora_load_save_round_trip_while_enabled(inputs, tmp_path):
    plain, enabled = pair()
    add_lora(plain), add_lora(enabled)  # the README no longer asks for LoRAs before enabling: this is after
    assert names(enabled) == names(plain)
    assert torch.equal(run(enabled, inputs), run(plain, inputs))
    plain.save_lora_adapter(tmp_path / "plain", adapter_name="a")
    enabled.save_lora_adapter(tmp_path / "enabled", adapter_name="a")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "enabled" / LORA_FILE)
    expected = load_file(tmp_path / "plain" / LORA_FILE)
    assert saved and list(saved) == list(expected)  # not empty: every adapter weight, under the model's names
    assert all(torch.equal(saved[k], expected[k]) for k in expected)

    # the file saved while enabled loads into an enabled model and a plain one alike
    fresh_plain, fresh_enabled = pair()
    fresh_plain.load_lora_adapter(tmp_path / "enabled", weight_name=LORA_FILE, adapter_name="b", prefix=None)
    fresh_enabled.load_lora_adapter(tmp_path / "enabled", weight_name=LORA_FILE, adapter_name="b", prefix=None)
    out = run(fresh_enabled, inputs)
    assert torch.equal(out, run(fresh_plain, inputs)) and torch.equal(out, run(plain, inputs))


def test_lora_set_adapters_fuse_unload_while_enabled(inputs):
    plain, enabled = pair()
    base = run(plain, inputs)
    for model in (plain, enabled):
        add_lora(model, "a", seed=0)
        add_lora(model, "b", seed=1)
        model.set_adapters(["a", "b"], weights=[0.5, 0.25])
    mixed = run(plain, inputs)
    assert torch.equal(run(enabled, inputs), mixed) and not torch.equal(mixed, base)
    for model in (plain, enabled):
        model.fuse_lora(lora_scale=1.0)
    assert torch.equal(run(enabled, inputs), run(plain, inputs))
    for model in (plain, enabled):
        model.unfuse_lora()  # subtracts the fused delta again: the base weights up to rounding
        model.unload_lora()
    out = run(enabled, inputs)
    assert torch.equal(out, run(plain, inputs)) and torch.allclose(out, base, rtol=0, atol=1e-4)
    assert names(enabled) == names(tiny_flux_transformer(SHAPE))


def test_lora_hotswap_while_enabled(inputs, tmp_path):
    source = tiny_flux_transformer(SHAPE)
    for name, seed in (("a", 0), ("b", 1)):
        add_lora(source, name, seed)
        source.save_lora_adapter(tmp_path / name, adapter_name=name)
    plain, enabled = pair()
    for model in (plain, enabled):
        model.load_lora_adapter(tmp_path / "a", weight_name=LORA_FILE, adapter_name="x", prefix=None)
        model.load_lora_adapter(tmp_path / "b", weight_name=LORA_FILE, adapter_name="x", prefix=None, hotswap=True)
    out = run(enabled, inputs)
    assert torch.equal(out, run(plain, inputs))
    reference = tiny_flux_transformer(SHAPE)
    reference.load_lora_adapter(tmp_path / "b", weight_name=LORA_FILE, adapter_name="x", prefix=None)
    assert torch.equal(out, run(reference, inputs))  # the swapped-in adapter is the one that runs


# -- attention processors, parameters ------------------------------------------------------------------------


def test_attention_processors_and_parameters_by_their_names(inputs):
    from diffusers.models.attention_processor import AttnProcessor2_0  # noqa: F401  (the module must import)
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    plain, enabled = pair()
    assert list(enabled.attn_processors) == list(plain.attn_processors)
    for model in (plain, enabled):
        procs = {name: FluxAttnProcessor() for name in model.attn_processors}
        model.set_attn_processor(procs)  # keyed by the model's own module names
        assert all(model.attn_processors[name] is p for name, p in procs.items())
        model.set_attention_backend("native")
    assert torch.equal(run(enabled, inputs), run(plain, inputs))
    name = "single_transformer_blocks.0.norm.linear.weight"
    assert torch.equal(enabled.get_parameter(name), plain.get_parameter(name))
    assert enabled.get_submodule("transformer_blocks.1") is enabled.transformer_blocks[1]


def test_ip_adapter_loads_while_enabled_and_its_inputs_are_refused_by_name(inputs):
    inner, text = SHAPE.heads * SHAPE.head_dim, SHAPE.text_dim
    g = torch.Generator().manual_seed(0)
    state_dict = {
        "image_proj": {
            "proj.weight": torch.randn(4 * text, 16, generator=g), "proj.bias": torch.zeros(4 * text),
            "norm.weight": torch.ones(text), "norm.bias": torch.zeros(text),
        },
        "ip_adapter": {
            f"{i}.{kv}.{p}": torch.randn(inner, text, generator=g) if p == "weight" else torch.zeros(inner)
            for i in range(SHAPE.layers) for kv in ("to_k_ip", "to_v_ip") for p in ("weight", "bias")
        },
    }  # fmt: skip
    plain, enabled = pair()
    for model in (plain, enabled):
        model._load_ip_adapter_weights([state_dict], low_cpu_mem_usage=False)
    assert names(enabled) == names(plain)
    assert [type(p).__name__ for p in enabled.attn_processors.values()] == [type(p).__name__ for p in plain.attn_processors.values()]
    latents, cond = inputs
    embeds = [torch.randn(1, 1, 16, generator=g)]
    with pytest.raises(NotImplementedError, match=r"ip_adapter_image_embeds'\] \(IP-Adapter\)"):
        enabled(hidden_states=latents, timestep=torch.ones(1), joint_attention_kwargs={"ip_adapter_image_embeds": embeds}, **cond)
    tk.disable_teacache(enabled)  # the processors stay, as they would on the plain model
    assert torch.equal(
        enabled(hidden_states=latents, timestep=torch.ones(1), joint_attention_kwargs={"ip_adapter_image_embeds": embeds}, **cond)[0],
        plain(hidden_states=latents, timestep=torch.ones(1), joint_attention_kwargs={"ip_adapter_image_embeds": embeds}, **cond)[0],
    )


# -- offloading, casting ---------------------------------------------------------------------------------------


def hooked(model, hook_name):
    return sorted(name for name, m in model.named_modules() if getattr(m, "_diffusers_hook", None) and m._diffusers_hook.get_hook(hook_name))


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offloading_after_enabling_groups_the_blocks(inputs, offload_type):
    cpu = torch.device("cpu")
    plain, enabled = pair()
    for model in (plain, enabled):
        model.enable_group_offload(onload_device=cpu, offload_device=cpu, offload_type=offload_type, num_blocks_per_group=1)
    groups = hooked(enabled, "group_offloading")
    assert groups == hooked(plain, "group_offloading")
    if offload_type == "block_level":  # one group per block, not one of the whole span
        assert {f"transformer_blocks.{i}" for i in range(SHAPE.layers)} <= set(groups)
        assert {f"single_transformer_blocks.{i}" for i in range(SHAPE.single_layers)} <= set(groups)
    assert torch.equal(run(enabled, inputs), run(plain, inputs))


def test_layerwise_casting_while_enabled(inputs):
    plain, enabled = pair()
    for model in (plain, enabled):
        model.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    assert hooked(enabled, "layerwise_casting") == hooked(plain, "layerwise_casting") != []
    assert torch.equal(run(enabled, inputs), run(plain, inputs))


def test_model_cpu_offload_on_a_pipeline():
    pytest.importorskip("accelerate")
    from teacache_kernels.tiny_models import tiny_flux_pipeline, tiny_flux_prompt

    plain, enabled = tiny_flux_pipeline(SHAPE), tiny_flux_pipeline(SHAPE)
    tk.enable_teacache(enabled, rel_l1_thresh=0.0)
    outs = []
    for pipe in (plain, enabled):
        pipe.enable_model_cpu_offload(device="cpu")
        outs.append(pipe(**tiny_flux_prompt(SHAPE), num_inference_steps=4, height=32, width=32, output_type="latent",
                         generator=torch.Generator().manual_seed(0)).images)  # fmt: skip
    assert torch.equal(*outs)
    assert tk.summary(enabled).contexts["cond"].schedule == "CCCC"


# -- a second cache, training, copies -------------------------------------------------------------------------


def test_a_diffusers_cache_enabled_after_teacache_is_refused_naming_both():
    from diffusers import FasterCacheConfig, FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    _, enabled = pair()
    for config in (
        FirstBlockCacheConfig(threshold=0.1),
        TaylorSeerCacheConfig(),
        MagCacheConfig(mag_ratios=[1.0] * STEPS, num_inference_steps=STEPS),
        FasterCacheConfig(spatial_attention_block_skip_range=2),
    ):
        with pytest.raises(RuntimeError, match=f"TeaCache .* is enabled on this FluxTransformer2DModel; diffusers' {type(config).__name__}"):
            enabled.enable_cache(config)
    assert not enabled.is_cache_enabled
    tk.disable_teacache(enabled)
    enabled.enable_cache(FirstBlockCacheConfig(threshold=0.1))  # the model's own method again
    assert enabled.is_cache_enabled


def test_gradients_flow_and_gradient_checkpointing_is_refused(inputs):
    latents, cond = inputs
    plain, enabled = pair(rel_l1_thresh=50.0)  # every call after the first reuses
    grads = []
    for model in (plain, enabled):
        model.train()
        x = latents.clone().requires_grad_(True)
        for step in range(3):
            out = model(hidden_states=x, timestep=torch.full((1,), 1.0 - 0.1 * step), **cond)[0]
        out.square().mean().backward()
        grads.append(x.grad)
    assert tk.summary(enabled).contexts["default"].schedule == "CRR"
    # a reused call is stream + residual: the gradient reaches the input through the stream
    assert grads[1] is not None and torch.isfinite(grads[1]).all() and grads[1].abs().sum() > 0
    enabled.enable_gradient_checkpointing()
    with pytest.raises(RuntimeError, match="gradient checkpointing.*disable_gradient_checkpointing"):
        enabled(hidden_states=latents.requires_grad_(True), timestep=torch.ones(1), **cond)
    with torch.no_grad():  # inference with checkpointing enabled is fine: nothing is recomputed
        enabled(hidden_states=latents, timestep=torch.ones(1), **cond)


def test_deepcopy_gets_its_own_state(inputs):
    _, original = pair(rel_l1_thresh=0.6)
    run(original, inputs)
    copied = copy.deepcopy(original)
    assert copied._teacache.cache is not original._teacache.cache
    assert list(copied.transformer_blocks)[0] is not list(original.transformer_blocks)[0]
    with copied.cache_context("uncond"):  # routed to the copy's cache, not the original's
        copied(hidden_states=inputs[0], timestep=torch.ones(1), **inputs[1])
    assert "uncond" in tk.summary(copied).contexts and "uncond" not in tk.summary(original).contexts
    # both continue identically from the same state
    assert torch.equal(run(copied, inputs), run(original, inputs))
    tk.disable_teacache(copied)
    assert names(copied) == names(original) and type(copied.transformer_blocks) is torch.nn.ModuleList
    assert tk.summary(original).calls == 2 * STEPS


# -- compile --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("dynamic", [None, True], ids=["static", "dynamic"])
def test_compile_once_on_the_first_call_then_never_again(inputs, dynamic):
    """The state is allocated while Dynamo traces the first call: one graph, then no recompile."""
    latents, cond = inputs
    negative = flux_inputs(SHAPE, seed=9)[1]
    _, enabled = pair(rel_l1_thresh=0.6)
    compiled = torch.compile(enabled, fullgraph=True, dynamic=dynamic)
    counters = torch._dynamo.utils.counters["stats"]
    before = counters["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        first = flow_matching_loop(compiled, latents, cond, STEPS, negative=negative, cfg_scale=3.0)
        again = flow_matching_loop(compiled, latents, cond, STEPS, negative=negative, cfg_scale=3.0)
    assert counters["unique_graphs"] - before == 1
    assert torch.equal(first, again)
    reference = tiny_flux_transformer(SHAPE)
    tk.enable_teacache(reference, num_inference_steps=STEPS, rel_l1_thresh=0.6, reference=True)
    expected = flow_matching_loop(reference, latents, cond, STEPS, negative=negative, cfg_scale=3.0)
    assert {n: c.schedule for n, c in tk.summary(enabled).contexts.items()} == {
        n: c.schedule for n, c in tk.summary(reference).contexts.items()
    }
    assert torch.allclose(first, expected, rtol=1e-4, atol=1e-5)


def test_a_cache_applied_by_a_diffusers_hook_function_is_refused_naming_both():
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    model = tiny_flux_transformer(SHAPE)
    apply_first_block_cache(model, FirstBlockCacheConfig(threshold=0.1))  # no enable_cache: no _cache_config
    with pytest.raises(RuntimeError, match="cannot enable TeaCache on this FluxTransformer2DModel: diffusers' cache hook 'fbc_"):
        tk.enable_teacache(model, num_inference_steps=STEPS)
    assert not hasattr(model, "_teacache")


def test_dynamo_settings_are_held_while_enabled_and_restored():
    """specialize_float (dynamic=True and torch.cond) and automatic_dynamic_shapes off (a state per shape) are set
    while any model is enabled, then put back."""
    config = torch._dynamo.config
    before = (config.specialize_float, config.automatic_dynamic_shapes)
    first, second = pair()[1], pair()[1]
    assert (config.specialize_float, config.automatic_dynamic_shapes) == (True, False)
    tk.disable_teacache(first)
    assert (config.specialize_float, config.automatic_dynamic_shapes) == (True, False)  # the second still holds them
    tk.disable_teacache(second)
    assert (config.specialize_float, config.automatic_dynamic_shapes) == before
