"""The real-data optimisation loop: masked losses, EMA, resumable checkpoints, CPU or CUDA.

Deterministic by (seed, step): the batch of step ``t`` is drawn from epoch ``t // steps_per_epoch``'s
seeded permutation of the training records with a per-step seeded augmentation, so a run resumed
from a checkpoint sees exactly the batches an uninterrupted run would. Checkpoints hold tensors
only (safetensors: net, EMA, AdamW moments) plus a JSON of counters and the loss history, written
atomically every ``ckpt_every`` steps and at the end; SIGSTOP/SIGCONT of the process is harmless.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .loop import ema_update

log = logging.getLogger(__name__)

__all__ = ["masked_heatmap_focal_loss", "masked_bce", "fit", "predict_arrays"]


def masked_heatmap_focal_loss(z: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                              alpha: float = 2.0, beta: float = 4.0) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss on heatmap logits ``z`` (B, K, h, w), counted only on
    the maps whose ``mask`` (B, K) is 1; normalised by the number of peak cells (target == 1)."""
    valid = (mask > 0)[..., None, None].expand_as(z)  # (B, K, h, w)
    pos = (target >= 0.999) & valid
    neg = valid & ~pos
    log_p, log_1p = F.logsigmoid(z), F.logsigmoid(-z)
    p = torch.sigmoid(z)
    pos_loss = -(log_p * (1 - p) ** alpha)[pos].sum()
    neg_loss = -(log_1p * p ** alpha * (1 - target) ** beta)[neg].sum()
    return (pos_loss + neg_loss) / pos.sum().clamp(min=1)


def masked_bce(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with (soft) targets, averaged over the entries whose mask is 1."""
    l = F.binary_cross_entropy_with_logits(logits, target, reduction="none")  # noqa: E741
    return (l * mask).sum() / mask.sum().clamp(min=1)


class _Batches(torch.utils.data.Dataset):
    """Item ``t`` is the batch of step ``t`` (deterministic), so DataLoader workers can prefetch it."""

    def __init__(self, samples, train_idx: Sequence[int], batch_size: int, seed: int, start: int, steps: int) -> None:
        self.samples, self.idx = samples, np.asarray(train_idx)
        self.bs, self.seed, self.start, self.steps = int(batch_size), int(seed), int(start), int(steps)
        self.spe = max(1, len(self.idx) // self.bs)

    def __len__(self) -> int:
        return self.steps - self.start

    def __getitem__(self, j: int):
        t = self.start + j
        epoch, pos = divmod(t, self.spe)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.idx)
        rng = np.random.default_rng([self.seed, epoch, pos, 7])
        return tuple(torch.from_numpy(a) for a in self.samples.batch(order[pos * self.bs:(pos + 1) * self.bs], rng))


def _save(path: Path, net, ema, opt, meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    state = {f"net.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    state.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.state_dict().items()})
    for i, p in enumerate(opt.param_groups[0]["params"]):
        st = opt.state.get(p, {})
        for name in ("exp_avg", "exp_avg_sq", "step"):
            if name in st:
                v = st[name]
                state[f"opt.{i}.{name}"] = (v if torch.is_tensor(v) else torch.tensor(float(v))).detach().cpu().contiguous()
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / f".ckpt.{os.getpid()}.tmp"
    save_file(state, str(tmp))
    os.replace(tmp, path / "ckpt.safetensors")
    tmpj = path / f".ckpt.{os.getpid()}.json.tmp"
    tmpj.write_text(json.dumps(meta) + "\n")
    os.replace(tmpj, path / "ckpt.json")


def _load(path: Path, net, ema, opt) -> dict[str, Any]:
    from safetensors.torch import load_file

    state = load_file(str(path / "ckpt.safetensors"))
    net.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")})
    ema.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("ema.")})
    params = opt.param_groups[0]["params"]
    for i, p in enumerate(params):
        if f"opt.{i}.exp_avg" in state:
            opt.state[p] = {"exp_avg": state[f"opt.{i}.exp_avg"].to(p.device),
                            "exp_avg_sq": state[f"opt.{i}.exp_avg_sq"].to(p.device),
                            "step": state[f"opt.{i}.step"].to(torch.float32)}
    return json.loads((path / "ckpt.json").read_text())


def fit(net: torch.nn.Module, samples, train_idx: Sequence[int], *, steps: int, batch_size: int = 16,
        lr: float = 2e-3, weight_decay: float = 1e-4, seed: int = 0, ckpt_dir: "str | Path | None" = None,
        ckpt_every: int = 50, device: str = "cpu", workers: int = 0, ema_decay: float = 0.997, warmup: int = 100,
        image_weight: float = 1.0, log_every: int = 25, max_minutes: float | None = None,
        monitor: Callable[[torch.nn.Module, int], dict[str, Any]] | None = None, monitor_every: int = 0,
        config: dict[str, Any] | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train ``net`` for ``steps`` steps (cosine LR after a linear warm-up), resuming from
    ``ckpt_dir`` when it holds a checkpoint of the same ``config``. Returns the EMA net (eval, CPU)
    and the run summary. ``max_minutes`` stops early (checkpointed) so a run can go in chunks;
    the summary's ``done`` says whether all steps ran."""
    import copy

    dev = torch.device(device)
    net.to(dev).train()
    cl = dev.type == "cpu"  # channels-last: ~1.5-2x faster depthwise convs on CPU (oneDNN)
    if cl:
        net.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(net).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    ck = Path(ckpt_dir) if ckpt_dir is not None else None
    cfg = dict(config or {}, steps=steps, batch_size=batch_size, lr=lr, seed=seed, n_train=len(train_idx))
    start, hist, monitored = 0, [], []
    if ck is not None and (ck / "ckpt.json").is_file():
        meta = json.loads((ck / "ckpt.json").read_text())
        if meta.get("config") == cfg:
            meta = _load(ck, net, ema, opt)
            start, hist, monitored = int(meta["step"]), list(meta["hist"]), list(meta.get("monitor", []))
            log.info("resumed from %s at step %d of %d", ck, start, steps)
        else:
            raise ValueError(f"{ck} holds a checkpoint of another configuration; use a new --ckpt-dir or "
                             f"delete it (have {meta.get('config')}, want {cfg})")
    loader = torch.utils.data.DataLoader(_Batches(samples, train_idx, batch_size, seed, start, steps), batch_size=None,
                                         shuffle=False, num_workers=workers,
                                         persistent_workers=False, prefetch_factor=4 if workers > 0 else None)
    t0 = time.perf_counter()
    step = start
    done = start >= steps

    def meta() -> dict[str, Any]:
        return {"config": cfg, "step": step, "hist": hist, "monitor": monitored}

    for x, heat, hmask, present, pmask in loader:
        frac = step / max(1, steps)
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * frac))
        for g in opt.param_groups:
            g["lr"] = lr * scale
        x = x.to(dev, non_blocking=True)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        heat, hmask, present, pmask = (t.to(dev, non_blocking=True) for t in (heat, hmask, present, pmask))
        logits, z = net(x)  # (B, K), (B, K, h, w)
        l_heat = masked_heatmap_focal_loss(z, heat, hmask)
        l_img = masked_bce(logits, present, pmask)
        loss = l_heat + image_weight * l_img
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        opt.step()
        with torch.no_grad():
            ema_update(ema, net, step, ema_decay)
        step += 1
        hist.append([round(l_heat.item(), 5), round(l_img.item(), 5)])
        if step % log_every == 0:
            h = np.mean(hist[-log_every:], axis=0)
            el = time.perf_counter() - t0
            log.info("step %d/%d  %.0fs  %.2f img/s  lr %.2e  heat %.4f  image %.4f", step, steps, el,
                     (step - start) * batch_size / el, lr * scale, h[0], h[1])
        if monitor is not None and monitor_every and step % monitor_every == 0:
            m = monitor(ema, step)
            monitored.append({"step": step, **m})
            log.info("monitor at step %d: %s", step, m)
        if ck is not None and (step % ckpt_every == 0 or step == steps):
            _save(ck, net, ema, opt, meta())
        if step >= steps:
            done = True
            break
        if max_minutes is not None and time.perf_counter() - t0 > 60 * max_minutes:
            if ck is not None:
                _save(ck, net, ema, opt, meta())
            break
    del loader
    ema = ema.to("cpu").to(memory_format=torch.contiguous_format).eval()
    return ema, {"steps": step, "done": done, "train_seconds_this_chunk": round(time.perf_counter() - t0, 1),
                 "final_heat_loss": float(np.mean([h[0] for h in hist[-100:]])) if hist else None,
                 "final_image_loss": float(np.mean([h[1] for h in hist[-100:]])) if hist else None,
                 "monitor": monitored}


@torch.no_grad()
def predict_arrays(net: torch.nn.Module, xs: np.ndarray, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(N, 1, H, W) -> image probabilities (N, K) and heatmap probabilities (N, K, h, w)."""
    net.eval()
    dev = next(net.parameters()).device
    probs, heats = [], []
    for s in range(0, len(xs), batch_size):
        logits, z = net(torch.from_numpy(np.ascontiguousarray(xs[s:s + batch_size])).to(dev))
        probs.append(torch.sigmoid(logits).float().cpu().numpy())
        heats.append(torch.sigmoid(z).float().cpu().numpy())
    return np.concatenate(probs), np.concatenate(heats)
