"""The calibrated-coefficients JSON file: one entry per model name and sequence length, merged on save.

    {"format": "teacache_kernels/coefficients/1",
     "models": {"<model name>": {"<seq_len>": {"signal": ..., "target": ..., "degree": ...,
         "coefficients": [highest power first], "r2": ..., "pearson": ..., "spearman": ...,
         "x_range": [lo, hi], "num_pairs": ..., "num_inference_steps": ..., "num_samples": ...,
         "recommended_thresh": null or a float, "candidates": [{"signal", "coefficients", "r2", ...}, ...]}}}}

`recommended_thresh` is filled by `find_threshold(...).save_to(...)`, together with
`recommended_criterion` (what it was chosen for: {"min_psnr": dB} or {"min_speedup": x}, with the
sample and step counts) and `recommended_measured` (speedups and PSNR measured at that threshold).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ..coefficients import FILE_FORMAT as FORMAT, nearest_index  # one definition: the runtime reads these files too


def read_coefficients_file(path: str | os.PathLike, *, missing_ok: bool = False) -> dict:
    """The whole file, its format checked. `missing_ok`: an absent file reads as an empty one."""
    path = Path(path)
    if not path.is_file():
        if missing_ok and not path.exists():
            return {"format": FORMAT, "models": {}}
        raise FileNotFoundError(f"no coefficients file at {path} (write one with `teacache_kernels calibrate`)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path} is not a coefficients file: expected format {FORMAT!r}, got {found!r}")
    models = data.get("models")
    if not isinstance(models, dict) or not all(isinstance(v, dict) for v in models.values()):
        raise ValueError(f"{path}: 'models' must map model names to {{seq_len: entry}} objects")
    for name, lengths in models.items():
        for key, entry in lengths.items():
            if not key.isdigit() or not isinstance(entry, dict) or "coefficients" not in entry:
                raise ValueError(
                    f"{path}: models[{name!r}][{key!r}] must be a sequence length holding an entry with 'coefficients'"
                )
    return data


def write_coefficients_file(path: str | os.PathLike, data: dict) -> None:
    """Write atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, allow_nan=False)
            f.write("\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a coefficients file is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def merge_entry(path: str | os.PathLike, model_name: str, seq_len: int, entry: dict) -> dict:
    """Put `entry` at models[model_name][str(seq_len)], keeping every other model and length. Returns the file."""
    data = read_coefficients_file(path, missing_ok=True)
    data["models"].setdefault(model_name, {})[str(int(seq_len))] = entry
    data["models"][model_name] = dict(sorted(data["models"][model_name].items(), key=lambda kv: int(kv[0])))
    write_coefficients_file(path, data)
    return data


def _pick_model(path, models: dict, model_name: str | None) -> str:
    names = sorted(models)
    if model_name is None:
        if len(names) == 1:
            return names[0]
        if not names:
            raise ValueError(f"{path} holds no calibrated model")
        raise ValueError(f"{path} holds several models, name one (model_name=...): {', '.join(names)}")
    if model_name not in models:
        raise ValueError(f"model {model_name!r} is not in {path}; models there: {', '.join(names) or 'none'}")
    return model_name


def nearest_seq_len(lengths, seq_len: int | None, *, where: str = "") -> int:
    """The fitted length nearest to `seq_len` (ties: the larger). None: the only one (an error if several)."""
    lengths = sorted(int(n) for n in lengths)
    if not lengths:
        raise ValueError(f"no sequence lengths fitted{where}")
    if seq_len is None:
        if len(lengths) == 1:
            return lengths[0]
        raise ValueError(f"several sequence lengths fitted{where} ({lengths}): give seq_len (image tokens)")
    return lengths[nearest_index(lengths, seq_len)]  # the runtime's rule, so tool and runtime pick alike


def load_coefficients_file(path: str | os.PathLike, model_name: str | None = None, seq_len: int | None = None) -> dict:
    """The entry of `model_name` for the fitted sequence length nearest `seq_len` (ties: the larger).

    `model_name` may be left out when the file holds one model, `seq_len` when that model has one length.
    Returns a copy of the entry, with "model_name" and "seq_len" (the fitted length chosen) added.
    """
    data = read_coefficients_file(path)
    name = _pick_model(path, data["models"], model_name)
    chosen = nearest_seq_len(data["models"][name], seq_len, where=f" for {name!r} in {path}")
    entry = dict(data["models"][name][str(chosen)])
    entry["model_name"] = name
    entry["seq_len"] = chosen
    return entry


def update_entry(path: str | os.PathLike, model_name: str | None, seq_len: int | None, **fields: Any) -> dict:
    """Set `fields` in an existing entry (exact model name; nearest length). Returns the updated entry."""
    data = read_coefficients_file(path)
    name = _pick_model(path, data["models"], model_name)
    chosen = nearest_seq_len(data["models"][name], seq_len, where=f" for {name!r} in {path}")
    entry = data["models"][name][str(chosen)]
    entry.update(fields)
    write_coefficients_file(path, data)
    return entry
