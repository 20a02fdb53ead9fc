"""The optimizer a TrainConfig names, built by timm's factory; for Muon, timm's with the
Newton-Schulz dtype the device policy chose, and the updates of weights of one shape orthogonalised
together, as one batched iteration."""

from __future__ import annotations

from collections import defaultdict

import torch
from timm.optim import Lookahead, create_optimizer_v2, param_groups_weight_decay
from timm.optim import muon as timm_muon

FUSED_OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")  # timm names of torch optimizers with fused kernels


class Muon(timm_muon.Muon):
    """timm's Muon, its update unchanged, with two differences in how it is computed:
    - the Newton-Schulz iteration runs in `newton_schulz_dtype`, where timm's fixes bf16 (on a
      device that only emulates bf16 that was most of the step: 607 against 29 ms at width 16 on
      the AVX2 CPU, bench/RESULTS.md);
    - the updates of all weights of one (flattened) shape go through one batched iteration, so
      ResNet18's 21 conv and linear weights take 11 iterations, not 21;
    - in fp16 (a T4's or P100's tensor cores; their bf16 is emulated) each update is normalised in
      its own float32 before timm casts it: timm casts first, and fp16's range would flush an
      update of small entries to zero. The result is timm's wherever the update's norm is above
      its eps (1e-7).
    Weights that timm routes to its AdamW fallback (BatchNorm, biases) are updated by timm's own step."""

    def __init__(self, params, newton_schulz_dtype: torch.dtype = torch.bfloat16, **kwargs):
        super().__init__(params, **kwargs)
        self.newton_schulz_dtype = newton_schulz_dtype

    def _routed_to_muon(self, p: torch.Tensor, group: dict) -> bool:
        """timm's routing, cached in the state as timm caches it."""
        state = self.state[p]
        if "use_muon" not in state:
            if group.get("use_fallback", False):
                state["use_muon"] = False
            elif "use_muon" in group:
                state["use_muon"] = group["use_muon"]
            else:
                state["use_muon"] = timm_muon._is_suitable_for_muon(p)
        return state["use_muon"]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        held = {}
        for group in self.param_groups:
            if group.get("algo", "muon") != "muon" or group["conv_mode"] != "flatten":
                continue  # AdaMuon and per-position conv updates: timm's step below, as timm computes them
            params = [p for p in group["params"] if p.grad is not None and self._routed_to_muon(p, group)]
            if params:
                self._orthogonalised_update(params, group)
                held |= {p: p.grad for p in params}
        for p in held:  # timm's step skips parameters without a gradient: it updates only the rest
            p.grad = None
        try:
            super().step()
        finally:
            for p, grad in held.items():
                p.grad = grad
        return loss

    def _orthogonalised_update(self, params: list[torch.Tensor], group: dict) -> None:
        """timm's _single_tensor_muon for `params`, batched by shape."""
        lr, momentum = group["lr"], group["momentum"]
        grads = [p.grad for p in params]
        bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p, memory_format=torch.preserve_format))
                for p in params]
        torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
        torch._foreach_lerp_(bufs, grads, 1 - momentum)
        updates = torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs
        by_shape = defaultdict(list)
        for p, update in zip(params, updates):
            by_shape[(p.shape[0], p[0].numel())].append((p, update))
        coefficients = timm_muon.resolve_ns_coefficients(group["ns_coefficients"], timm_muon._COEFFICIENTS)
        for shape, members in by_shape.items():
            stacked = torch.stack([update.reshape(shape) for _, update in members])
            if self.newton_schulz_dtype == torch.float16:
                stacked = stacked / stacked.norm(dim=(-2, -1), keepdim=True).clamp_min(group["eps"])
            orthogonal = timm_muon.zeropower_via_newtonschulz(
                stacked, group["ns_steps"], coefficients, eps=group["eps"], safety_factor=group["safety_factor"],
                dtype=self.newton_schulz_dtype, scale_eps=group["scale_eps"])
            scale = timm_muon.get_lr_scale(shape, group["adjust_lr_fn"]) if group["adjust_lr_fn"] else 1.0
            targets = [p for p, _ in members]
            torch._foreach_add_(targets, [o.reshape(p.shape).to(p.dtype) for o, p in zip(orthogonal.unbind(), targets)],
                                alpha=-lr * scale)


def head_apart(cfg, head_ids: set[int]):
    """timm's weight-decay parameter groups, each split into the classifier head and the rest, for a
    run whose head trains alone first: fused SGD starts the momentum of a whole group at once, so
    the weights that join later need groups of their own."""
    def groups(model: torch.nn.Module) -> list[dict]:
        split = []
        for group in param_groups_weight_decay(model, cfg.weight_decay, not cfg.decay_norm_and_bias):
            for part in ([p for p in group["params"] if id(p) in head_ids],
                         [p for p in group["params"] if id(p) not in head_ids]):
                if part:
                    split.append({**group, "params": part})
        return split

    return groups


def build_optimizer(cfg, model: torch.nn.Module, newton_schulz_dtype: torch.dtype) -> torch.optim.Optimizer:
    """timm's factory ("sgd" is Nesterov SGD; BatchNorm weights and biases out of the decay). The
    fused kernels take the fp16 loss scaler's inf check on the device; with any other optimizer
    GradScaler.step reads it on the host, one sync per step. Muon is this module's."""
    fused = {"fused": True} if cfg.optimizer in FUSED_OPTIMIZERS else {}
    head = {id(p) for p in model.head.parameters()}
    optimizer = create_optimizer_v2(model, cfg.base_optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                    momentum=cfg.momentum, filter_bias_and_bn=not cfg.decay_norm_and_bias,
                                    param_group_fn=head_apart(cfg, head) if cfg.freeze_epochs else None, **fused)
    if type(optimizer) is timm_muon.Muon:  # timm's groups and settings, computed by the subclass
        optimizer = Muon(optimizer.param_groups, newton_schulz_dtype=newton_schulz_dtype, **optimizer.defaults)
    # timm's factory's Lookahead, with its defaults (alpha 0.5, k 6)
    return Lookahead(optimizer) if cfg.optimizer != cfg.base_optimizer else optimizer
