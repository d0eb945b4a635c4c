"""The trainer of mukv-tiny: hyper-parameters, the optimiser, the loss of a batch (answer
losses of every regime plus the training-only auxiliary losses) and the optimiser step
(gradients averaged over data-parallel ranks). Checkpoints: :mod:`mukv.train.checkpoint`."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..config import MukvConfig
from .checkpoint import load_checkpoint, save_checkpoint
from .data import AUX_CLASSES, QUERY_CLASSES
from .forward import MidCapture, encode
from .memory import resolve_levels
from .regimes import REGIMES, RegimeOptions, encode_questions, loss_from_logits, memory_logits


@dataclass
class TrainConfig:
    """Hyper-parameters of a run (saved with every checkpoint)."""

    shape: str = "mukv-tiny"
    seed: int = 0
    steps: int = 3000
    batch: int = 64
    frames: int = 8
    max_questions: int = 3
    single: float = 0.3
    plain: float = 0.0
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup: int = 150
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    weights: dict[str, float] = field(default_factory=lambda: {"full": 1.0, "frames": 1.0, "mukv": 1.0})
    aux: float = 0.0
    aux_lm: float = 0.0
    vis_rms: float = 1.0
    attn_sup: float = 0.0
    attn_layers: tuple[int, ...] = (3, 4)
    attn_heads: int = 2
    aux_mid: float = 0.0
    query_aux: float = 0.0
    mid_layer: int = 2
    freeze_vision: bool = False
    retrieval: float = 0.0
    retrieval_tau: float = 0.1
    schedule_start: int = 0
    offset_prob: float = 0.5
    max_offset: int = 16384
    bf16: bool = True
    workers: int = 8

    def lr_at(self, step: int) -> float:
        """Linear warmup then cosine to ``min_lr_ratio * lr`` at ``steps``; both start at
        ``schedule_start`` (a resumed run may restart its schedule there)."""
        step, steps = step - self.schedule_start, self.steps - self.schedule_start
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        t = min(1.0, (step - self.warmup) / max(1, steps - self.warmup))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA); no weight decay on norms, biases and embeddings."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "embed" in n or "norm" in n or "position" in n else decay).append(p)
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas,
                             fused=fused)


class Trainer:
    """Runs training steps on a model adapter.

    Args:
        adapter: a :class:`LlavaOnevisionAdapter` (float32 weights).
        cfg: hyper-parameters.
        config: the mukv configuration whose levels regime (c) builds (default: mukv's).
    """

    def __init__(self, adapter, cfg: TrainConfig, config: MukvConfig | None = None):
        self.adapter = adapter
        self.cfg = cfg
        self.config = config or MukvConfig.build()
        self.levels = resolve_levels(adapter, self.config)
        self.device = adapter.device
        e = adapter.language_model.config.hidden_size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 1)
            #: training-only head: per-token perception targets from the visual tokens (not shipped)
            self.aux_head = torch.nn.Linear(e, sum(AUX_CLASSES)).to(self.device)
            #: the same targets read from the language model's final hidden states at the visual positions
            self.aux_head_lm = torch.nn.Linear(e, sum(AUX_CLASSES)).to(self.device)
            #: the same targets read from the residual stream entering layer ``cfg.mid_layer``
            self.aux_head_mid = torch.nn.Linear(e, sum(AUX_CLASSES)).to(self.device)
            #: what the question asks to look for (query_targets), read at the answer position entering that layer
            self.query_head = torch.nn.Linear(e, sum(QUERY_CLASSES)).to(self.device)
        self.heads = {"aux_head": (self.aux_head, cfg.aux), "aux_head_lm": (self.aux_head_lm, cfg.aux_lm),
                      "aux_head_mid": (self.aux_head_mid, cfg.aux_mid), "query_head": (self.query_head, cfg.query_aux)}
        self.opt = make_optimizer(adapter.model, cfg)
        for head, weight in self.heads.values():
            if weight > 0:
                self.opt.add_param_group({"params": list(head.parameters()), "weight_decay": 0.0})
        self.step = 0
        self.samples = 0  # clips consumed by all ranks (the data position of a resumed run)
        dist = torch.distributed
        #: data-parallel ranks (torchrun): gradients are averaged over them before every optimiser step
        self.world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.history: list[dict[str, float]] = []

    def batch_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        adapter, cfg = self.adapter, self.cfg
        frames = batch["frames"].to(self.device, non_blocking=True)
        clip = batch["clip"].to(self.device)
        qb = encode_questions(adapter, batch["questions"], batch["answers"], self.device)
        opts = RegimeOptions(tuple(r for r in REGIMES if cfg.weights.get(r, 0) > 0), cfg.offset_prob, cfg.max_offset)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step)
        use_amp = cfg.bf16 and self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_amp):
            # a frozen vision tower + projector runs without gradients (its backward is most of a step's cost)
            with torch.no_grad() if cfg.freeze_vision else contextlib.nullcontext():
                visual = encode(adapter, frames)
            hidden: dict[str, torch.Tensor] | None = {} if cfg.aux_lm > 0 and "labels" in batch else None
            sup = cfg.attn_sup > 0 and "evidence" in batch
            masses: dict[str, torch.Tensor] = {}
            evidence = batch["evidence"].reshape(clip.shape[0], -1).to(self.device) if sup else None
            want_mid = "full" in opts.regimes and ((cfg.aux_mid > 0 and "labels" in batch)
                                                   or (cfg.query_aux > 0 and "query_labels" in batch))
            ret = ({"spans": batch["spans"], "tau": cfg.retrieval_tau}
                   if cfg.retrieval > 0 and "mukv" in opts.regimes and "spans" in batch else None)
            with contextlib.ExitStack() as stack:
                mid = stack.enter_context(MidCapture(adapter, cfg.mid_layer)) if want_mid else None
                logits = memory_logits(adapter, self.levels, self.config, frames, clip, qb, opts, gen, visual,
                                       hidden, evidence, (tuple(cfg.attn_layers), cfg.attn_heads) if sup else None,
                                       masses, mid, ret)
            aux_logits = self.aux_head(visual) if cfg.aux > 0 and "labels" in batch else None
            lm_logits = {k: self.aux_head_lm(h) for k, h in hidden.items()} if hidden else {}
            if mid is not None and cfg.aux_mid > 0 and "labels" in batch:
                lm_logits["mid"] = self.aux_head_mid(mid.store["visual"])
            query_logits = (self.query_head(mid.store["answer"])
                            if mid is not None and cfg.query_aux > 0 and "query_labels" in batch else None)
        total = 0.0
        stats: dict[str, float] = {}
        # keep the visual tokens at the scale of the text embeddings (log-ratio of RMS, squared)
        rms_v = visual.float().pow(2).mean().sqrt()
        rms_t = adapter.language_model.embed_tokens.weight.float().pow(2).mean().sqrt().detach()
        ratio = torch.log(rms_v / rms_t)
        stats["rms_ratio"] = float(ratio.detach().exp())
        if cfg.vis_rms > 0:
            total = total + cfg.vis_rms * ratio.square()
        if aux_logits is not None or lm_logits:
            labels = batch["labels"].to(self.device)  # [B, F, 3, g, g]
            b, f = labels.shape[:2]
            labels = labels.reshape(b, f, 3, -1).permute(0, 1, 3, 2)  # [B, F, T, 3]

            def aux_loss(lg: torch.Tensor) -> torch.Tensor:
                parts = lg.float().reshape(b, f, -1, lg.shape[-1]).split(AUX_CLASSES, dim=-1)
                return sum(F.cross_entropy(pl.reshape(-1, pl.shape[-1]), labels[..., i].reshape(-1))
                           for i, pl in enumerate(parts)) / len(parts)

            if aux_logits is not None:
                aux = aux_loss(aux_logits)
                total = total + cfg.aux * aux
                stats["loss_aux"] = float(aux.detach())
            for k, lg in lm_logits.items():
                aux = aux_loss(lg)
                if k == "mid":
                    total = total + cfg.aux_mid * aux
                else:
                    total = total + cfg.aux_lm * aux / len([n for n in lm_logits if n != "mid"])
                stats[f"loss_aux_lm_{k}"] = float(aux.detach())
        if query_logits is not None:
            ql = batch["query_labels"].to(self.device)  # [Q, 3]
            parts = query_logits.float().split(QUERY_CLASSES, dim=-1)
            losses = [F.cross_entropy(pl, ql[:, i], ignore_index=-100) for i, pl in enumerate(parts)
                      if bool((ql[:, i] >= 0).any())]
            if losses:
                qloss = sum(losses) / len(losses)
                total = total + cfg.query_aux * qloss
                stats["loss_query"] = float(qloss.detach())
        if ret is not None and "loss" in ret:
            total = total + cfg.retrieval * ret["loss"]
            stats["loss_retrieval"] = float(ret["loss"].detach())
            stats.update(ret["stats"])
        for name, m in masses.items():
            # the designated heads must find the evidence: -log of the attention mass on it
            sup_loss = -torch.log(m.float() + 1e-4).mean()
            total = total + cfg.attn_sup * sup_loss / len(masses)
            stats[f"loss_attn_{name}"] = float(sup_loss.detach())
            stats[f"attn_mass_{name}"] = float(m.detach().float().mean())
        for name, lg in logits.items():
            loss, correct = loss_from_logits(lg, qb.targets)
            total = total + cfg.weights[name] * loss
            stats[f"loss_{name}"] = float(loss.detach())
            stats[f"acc_{name}"] = float(correct.float().mean())
        stats["questions"] = float(clip.shape[0])
        return total, stats

    def train_step(self, batch: dict[str, Any], lr: float | None = None) -> dict[str, float]:
        """One optimiser step; ``lr`` overrides the schedule's rate for this step."""
        cfg = self.cfg
        lr = cfg.lr_at(self.step) if lr is None else lr
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.adapter.model.train()
        loss, stats = self.batch_loss(batch)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.world > 1:
            self._average_gradients()
        gn = torch.nn.utils.clip_grad_norm_(self.adapter.model.parameters(), cfg.grad_clip)
        self.opt.step()
        stats.update(loss=float(loss.detach()), lr=lr, grad_norm=float(gn), step=self.step)
        self.step += 1
        self.samples += int(batch["frames"].shape[0]) * self.world
        return stats

    def _average_gradients(self) -> None:
        """Mean of every trainable parameter's gradient over the data-parallel ranks, in one
        flat all-reduce (a parameter without a gradient on this rank contributes zeros)."""
        params = [p for g in self.opt.param_groups for p in g["params"]]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world
        for p, chunk in zip(params, flat.split([g.numel() for g in grads])):
            p.grad = chunk.view_as(p).to(p.dtype)

    # -- checkpoints ------------------------------------------------------------------
    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Resumable checkpoint (:func:`~mukv.train.checkpoint.save_checkpoint`)."""
        return save_checkpoint(self, path, extra)

    def load(self, path: str | Path) -> dict[str, Any]:
        """Restore weights, Adam moments, step and RNG state from :meth:`save`
        (:func:`~mukv.train.checkpoint.load_checkpoint`)."""
        return load_checkpoint(self, path)
