"""AOTInductor deployment (teacache_kernels/export.py, csrc/aoti_runner): the digits model's TeaCache state as
mutable buffers of the exported program, packaged, and run from C++ with the Python run's schedule and images.

The slow tests share one session fixture that exports and compiles two packages (TeaCache and uncached),
builds the runner and runs it: about 100 s on 2 CPU cores from an empty Inductor cache.
"""

import shutil
import zipfile

import pytest
import torch

import teacache_kernels as tk
from teacache_kernels import digits, export
from teacache_kernels import state as S

needs_toolchain = pytest.mark.skipif(
    shutil.which("cmake") is None or (shutil.which("c++") is None and shutil.which("g++") is None),
    reason="building the C++ runner needs cmake and a C++ compiler",
)


def _enabled(**fields):
    model = digits.load_transformer()
    tk.enable_teacache(
        model, coefficients_file=digits.COEFFICIENTS_FILE, num_inference_steps=digits.NUM_STEPS, **fields
    )
    return model


def _inputs(batch=4):
    shared, per_context, _ = export._digits_inputs(torch.arange(batch), 0, digits.NUM_STEPS, digits.GUIDANCE_SCALE)
    return shared, per_context


@pytest.fixture(scope="module")
def exported():
    """A TeaCache-enabled digits model and its exported CFG step (no AOTInductor compile): (model, program, meta)."""
    shared, per_context = _inputs()
    model = _enabled()
    program, meta = export.export_program(model, per_context, shared=shared)
    return model, program, meta


def test_the_state_of_each_context_is_a_buffer_the_decision_mutates_inside_the_program(exported):
    _, program, meta = exported
    buffers = {spec.arg.name: spec.target for spec in program.graph_signature.input_specs if spec.kind.name == "BUFFER"}
    for ctx in ("cond", "uncond"):
        assert {f"teacache.{ctx}.{f}" for f in ("prev_signal", "scalars", "config", "log", "residual_0")} <= set(
            buffers.values()
        )
    # One decision per context, on that context's buffers (the state it mutates in place), and one torch.cond each.
    decides = [n for n in program.graph.nodes if n.target is torch.ops.teacache.decide.default]
    conds = [n for n in program.graph.nodes if n.target is torch.ops.higher_order.cond]
    assert len(decides) == 2 and len(conds) == 2
    for node, ctx in zip(decides, ("cond", "uncond")):
        prev_signal, scalars = node.args[1], node.args[2]
        assert (buffers[prev_signal.name], buffers[scalars.name]) == (
            f"teacache.{ctx}.prev_signal",
            f"teacache.{ctx}.scalars",
        )
    assert meta["teacache.inputs"].split(",") == [
        "hidden_states", "timestep", "img_ids", "txt_ids", "cond.encoder_hidden_states", "cond.pooled_projections",
        "uncond.encoder_hidden_states", "uncond.pooled_projections",
    ]  # fmt: skip
    assert meta["teacache.cached"] == "1" and meta["teacache.num_inference_steps"] == str(digits.NUM_STEPS)


def test_exporting_leaves_the_model_running_as_before(exported):
    # The trace binds the state to fake buffers for its duration only: eager calls afterwards use the real ones
    # and give the schedule of a model that was never exported.
    runs = []
    for model in (exported[0], _enabled()):
        images = digits.generate(model, torch.arange(4), seed=0)
        runs.append((images, {n: c.schedule for n, c in tk.summary(model).contexts.items()}))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]
    assert "R" in runs[0][1]["cond"]


def test_export_refuses_what_a_package_cannot_hold():
    shared, per_context = _inputs()
    oracle = digits.load_transformer()
    tk.enable_teacache(oracle, coefficients_file=digits.COEFFICIENTS_FILE, num_inference_steps=30, reference=True)
    with pytest.raises(TypeError, match="fused implementation"):
        export.export_program(oracle, per_context, shared=shared)


def test_python_op_calls_names_ops_a_cpp_process_cannot_run(tmp_path):
    # A package whose extern nodes (run by AOTInductor's proxy executor, by name) include a Python-registered op,
    # and one whose code names this package's ops: both are reported; ATen fallbacks are not.
    path = tmp_path / "fake.pt2"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("m/data/aotinductor/model/w.wrapper.json",
                   '{"nodes": [{"node": {"target": "aten::nonzero"}}, {"node": {"target": "mylib::double"}}]}')  # fmt: skip
        z.writestr("m/data/aotinductor/model/w.wrapper_metadata.json", '{"AOTI_DEVICE_KEY": "cpu"}')
        z.writestr("m/data/aotinductor/model/w.wrapper.cpp", "// calls teacache::decide through the dispatcher")
    found = export.python_op_calls(path)
    assert len(found) == 2 and any(f.endswith("mylib::double") for f in found) and any("teacache::" in f for f in found)


@pytest.fixture(scope="session")
def deployed(tmp_path_factory):
    """The digits model exported (TeaCache and uncached), the runner built, run once: (out dir, paths, its stdout)."""
    out = tmp_path_factory.mktemp("aoti_digits")
    paths = export.export_digits(out)
    runner = export.build_runner(tmp_path_factory.mktemp("aoti_runner_build"))
    # One OpenMP thread: on a shared 2-core machine a second spinning thread slows both packages by up to 10x.
    return out, paths, export.run_runner(runner, out, repeats=3, threads=1)


@pytest.mark.slow
@needs_toolchain
def test_the_cpp_runner_reproduces_the_python_run(deployed):
    out, paths, printed = deployed
    check = export.check_digits(out)
    python = torch.load(paths[export.PYTHON_FILE])
    # Same decisions, step for step, in both contexts; and TeaCache did skip.
    assert check["schedule_matches"], (check["schedule"], python["schedule"])
    assert 0 < int(python["schedule"].sum()) < python["schedule"].numel()
    # Images: Inductor's rounding only. Within the compiled-vs-eager budget, and no further from Python's TeaCache
    # run than the uncached package is from Python's uncached run, give or take 4x (skipping replays a stored
    # residual: it adds no error of its own).
    assert check["within_budget"], check
    assert check["max_abs"] <= 4 * check["plain_max_abs"] + 1e-6, check
    # The state wraps at num_inference_steps on its own: every later generation gave the first one's result.
    assert check["repeats_identical"]
    # 3x fewer transformer calls; 2.4-3.1x measured under varying load. 1.2x leaves room for a noisy neighbour.
    assert "speedup" in printed and check["speedup"] > 1.2, printed
    for name in (export.CACHED_PACKAGE, export.PLAIN_PACKAGE):
        assert export.python_op_calls(paths[name]) == []


@pytest.mark.slow
@needs_toolchain
def test_the_cli_checks_a_deployment(deployed, capsys):
    from teacache_kernels.__main__ import main

    out, _, _ = deployed
    assert main(["export", "--check", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "schedule identical to Python's: yes" in printed and "speedup" in printed


def test_every_state_tensor_becomes_a_buffer():
    # CFGStep registers a ContextState's tensors as buffers by name: a tensor added to the state must be added to
    # export._STATE_FIELDS too, or the program would read it as a constant frozen at export time.
    from teacache_kernels.config import ResolvedConfig, TeaCacheConfig

    st = S.ContextState("probe")
    config = ResolvedConfig.resolve(TeaCacheConfig(coefficients="flux", num_inference_steps=4), None)
    st.allocate(torch.zeros(1, 3, 8), torch.zeros(1, 3, 8), config)
    tensors = {name for name, value in vars(st).items() if isinstance(value, torch.Tensor)}
    assert tensors == set(export._STATE_FIELDS)
    assert len(st.residuals) == 1 and isinstance(st.residuals[0], torch.Tensor)
