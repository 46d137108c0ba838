"""Train the embedded model: `python -m teacache_kernels.digits.train` (about 20 minutes on 2 CPU cores).

Flow matching (rectified flow, as FLUX): x_t = (1 - t) x_0 + t noise, the model predicts the velocity
noise - x_0, t drawn from a logit-normal. Class-conditional with 10% of labels dropped to the null
class, so classifier-free guidance works. AdamW with warm-up and cosine decay; the weights saved are an
exponential moving average. Deterministic in `--seed` on a given machine and torch build.

Writes `config.json` and `diffusion_pytorch_model.safetensors` (diffusers' `save_pretrained` layout,
float32) plus `training.json` (the run's settings, loss curve, time, hardware, sample accuracy).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

from .._hardware import describe
from .model import NULL_CLASS, build_transformer, conditioning, pack

WEIGHTS_DIR = Path(__file__).with_name("weights")


def load_dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 8x8 digits scaled to [-1, 1], and their labels (ships with the package: no download)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 8.0 - 1.0
    return images, torch.tensor(digits.target, dtype=torch.long)


def train(
    *,
    steps: int = 3500,
    batch: int = 128,
    lr: float = 1e-3,
    warmup: int = 200,
    ema_decay: float = 0.999,
    p_uncond: float = 0.1,
    seed: int = 0,
    out: Path = WEIGHTS_DIR,
    log_every: int = 100,
    eval_per_class: int = 20,
):
    torch.manual_seed(seed)
    images, labels = load_dataset()
    model = build_transformer(seed).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    g = torch.Generator().manual_seed(seed)
    losses, curve = [], []
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(len(images), (batch,), generator=g)
        x0 = pack(images[idx])
        y = labels[idx].clone()
        y[torch.rand(batch, generator=g) < p_uncond] = NULL_CLASS
        noise = torch.randn(x0.shape, generator=g)
        t = torch.sigmoid(torch.randn(batch, generator=g))  # logit-normal: most weight mid-trajectory
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        v = model(hidden_states=xt, timestep=t, return_dict=False, **conditioning(y))[0]
        loss = torch.nn.functional.mse_loss(v, noise - x0)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - ema_decay)
        losses.append(loss.item())  # host-ok: training log
        if (step + 1) % log_every == 0 or step + 1 == steps:
            elapsed = time.perf_counter() - start
            mean = sum(losses[-log_every:]) / len(losses[-log_every:])
            curve.append((step + 1, mean))
            eta = elapsed / (step + 1) * (steps - step - 1)
            print(f"step {step + 1:5d}/{steps}  loss {mean:.4f}  lr {lr_at(step):.2e}  "
                  f"{elapsed / 60:5.1f} min, {eta / 60:4.1f} min left", flush=True)
    minutes = (time.perf_counter() - start) / 60

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ema.save_pretrained(out, safe_serialization=True)
    report = dict(
        steps=steps, batch=batch, lr=lr, warmup=warmup, ema_decay=ema_decay, p_uncond=p_uncond, seed=seed,
        minutes=round(minutes, 1), loss_curve=curve,
        hardware=describe("cpu"),
        torch=torch.__version__,
    )
    report.update(evaluate(ema, per_class=eval_per_class))
    (out / "training.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "loss_curve"}, indent=1))
    return ema, report


def evaluate(model, per_class: int = 20, seed: int = 1234) -> dict:
    """Classifier accuracy of `per_class` samples per digit at a few guidance scales."""
    from .quality import digit_accuracy
    from .sampling import generate

    labels = torch.arange(10).repeat_interleave(per_class)
    result = {}
    for scale in (1.0, 2.0, 3.0):
        imgs = generate(model, labels, seed=seed, guidance_scale=scale)
        result[f"accuracy_cfg{scale:g}"] = round(digit_accuracy(imgs, labels), 4)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3500)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    args = p.parse_args(argv)
    train(steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed, out=args.out)


if __name__ == "__main__":
    main()
