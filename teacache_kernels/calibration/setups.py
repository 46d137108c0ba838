"""CalibrationSetup: what `teacache_kernels calibrate/threshold --model ...` runs, built in or the user's.

A user fits a new model end to end with a factory `module:function` (or `path/to/file.py:function`)
returning a CalibrationSetup. It is called with the keyword arguments it accepts among
`num_samples` and `num_inference_steps` (the CLI's --samples and --steps).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn


@dataclass
class CalibrationSetup:
    transformer: nn.Module  # uncached; `run` calls it
    run: Callable[[Any], Any]  # run(sample) -> final output: one full generation
    samples: Sequence[Any]  # calibration inputs (prompts, seeds, ...)
    model_name: str  # the key in the coefficients file
    num_inference_steps: int  # transformer calls per generation and CFG context
    threshold_samples: Sequence[Any] | None = None  # held-out inputs for the threshold search (default: samples)
    metrics: Mapping[str, Callable[[Any, Any, Any], float]] = field(default_factory=dict)  # for find_threshold
    default_out: str | Path | None = None  # where the coefficients file goes by default


def digits_setup(num_samples: int | None = None, num_inference_steps: int | None = None) -> CalibrationSetup:
    """The embedded digits model: a sample is a seed; run(seed) generates the ten digits with it (true CFG)."""
    from .. import digits
    from ..digits.quality import digit_accuracy, ssim

    transformer = digits.load_transformer()
    steps = num_inference_steps or digits.NUM_STEPS
    n = num_samples or 8
    labels = list(range(digits.NUM_CLASSES))

    def run(seed):
        return digits.generate(transformer, labels, seed=int(seed), num_steps=steps)

    return CalibrationSetup(
        transformer=transformer,
        run=run,
        samples=list(range(n)),
        threshold_samples=list(range(1000, 1000 + n)),  # held out from the fit
        model_name=digits.MODEL_NAME,
        num_inference_steps=steps,
        metrics={
            "digit_acc": lambda seed, out, ref: digit_accuracy(out, labels),  # classifier recognises the digit
            "ssim": lambda seed, out, ref: float(ssim(out, ref).mean()),  # vs the uncached images
        },
        default_out=digits.COEFFICIENTS_FILE,
    )


def tiny_flux_setup(num_samples: int | None = None, num_inference_steps: int | None = None) -> CalibrationSetup:
    """A random-weight tiny FLUX with true CFG (tests and demos: mechanics, not meaningful numbers)."""
    from ..tiny_models import TinyFluxShape, flow_matching_loop, flux_inputs, tiny_flux_transformer

    shape = TinyFluxShape()
    transformer = tiny_flux_transformer(shape)
    steps = num_inference_steps or 8
    n = num_samples or 3

    def run(seed):
        latents, cond = flux_inputs(shape, seed=int(seed))
        negative = flux_inputs(shape, seed=int(seed) + 10_000)[1]
        return flow_matching_loop(transformer, latents, cond, steps, negative=negative, cfg_scale=3.0)

    return CalibrationSetup(
        transformer=transformer,
        run=run,
        samples=list(range(n)),
        threshold_samples=list(range(100, 100 + n)),
        model_name="tiny-flux",
        num_inference_steps=steps,
    )


BUILTIN = {"digits": digits_setup, "tiny-flux": tiny_flux_setup}


def load_setup(spec: str, num_samples: int | None = None, num_inference_steps: int | None = None) -> CalibrationSetup:
    """A built-in name ("digits", "tiny-flux") or `module:function` / `file.py:function`."""
    if spec in BUILTIN:
        factory = BUILTIN[spec]
    else:
        if ":" not in spec:
            raise ValueError(f"--model must be one of {sorted(BUILTIN)} or module:function, got {spec!r}")
        module_name, _, attr = spec.rpartition(":")
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise FileNotFoundError(f"no file {path} (from --model {spec!r})")
            loaded = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(loaded)
            loaded.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
        factory = getattr(module, attr, None)
        if not callable(factory):
            raise ValueError(f"{module_name} has no function {attr!r} (from --model {spec!r})")
    wanted = {"num_samples": num_samples, "num_inference_steps": num_inference_steps}
    params = inspect.signature(factory).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in wanted.items() if v is not None and (takes_all or k in params)}
    setup = factory(**kwargs)
    if not isinstance(setup, CalibrationSetup):
        raise TypeError(f"{spec} returned {type(setup).__name__}, expected a CalibrationSetup")
    if num_samples is not None and "num_samples" not in kwargs:
        setup.samples = list(setup.samples)[:num_samples]
        if setup.threshold_samples is not None:
            setup.threshold_samples = list(setup.threshold_samples)[:num_samples]
    if num_inference_steps is not None and "num_inference_steps" not in kwargs:
        raise ValueError(f"{spec} does not take num_inference_steps: --steps cannot be applied")
    return setup
