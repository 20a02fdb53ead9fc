"""The optimizer a TrainConfig names, built by timm's factory; for Muon, timm's update computed in
a few batched ops (see `Muon`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.optim import Lookahead, create_optimizer_v2, param_groups_weight_decay
from timm.optim import muon as timm_muon
from torch.optim.adamw import adamw as torch_adamw

FUSED_OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")  # timm names of torch optimizers with fused kernels


def newton_schulz_flops(rows: int, columns: int, steps: int = timm_muon.DEFAULT_NS_STEPS) -> int:
    """FLOPs of timm's Newton-Schulz on one (rows, columns) matrix: per step X X^T, A A and B X."""
    r, c = min(rows, columns), max(rows, columns)
    return steps * (4 * r * r * c + 2 * r ** 3)


def partition(shapes: list[tuple[int, int]], buckets: int | None) -> list[list[int]]:
    """The indices of `shapes` ((rows, columns), rows <= columns) in at most `buckets` groups whose
    padding to each group's largest rows and columns costs the fewest Newton-Schulz FLOPs; None: one
    group per shape, no padding. Shapes sorted by size are cut into consecutive runs (exactly, by
    dynamic programming over the distinct shapes)."""
    distinct = sorted(set(shapes))
    members = [[i for i, s in enumerate(shapes) if s == d] for d in distinct]
    if buckets is None or buckets >= len(distinct):
        return members

    def cost(a: int, b: int) -> int:  # distinct[a:b] padded together
        rows, columns = max(r for r, _ in distinct[a:b]), max(c for _, c in distinct[a:b])
        return sum(len(m) for m in members[a:b]) * newton_schulz_flops(rows, columns)

    n = len(distinct)
    best = {(0, 0): (0, [])}  # (shapes covered, groups used) -> (FLOPs, cut points)
    for used in range(1, buckets + 1):
        for end in range(1, n + 1):
            options = [(best[start, used - 1][0] + cost(start, end), best[start, used - 1][1] + [end])
                       for start in range(end) if (start, used - 1) in best]
            if options:
                best[end, used] = min(options)
    cuts = min(best[n, used] for used in range(1, buckets + 1) if (n, used) in best)[1]
    return [[i for m in members[a:b] for i in m] for a, b in zip([0, *cuts], cuts)]


@dataclass
class Bucket:
    """Updates orthogonalised together: each weight's, turned to have no more rows than columns, in
    its own slot of one (weights, rows, columns) float32 tensor whose padding stays zero. Zero rows
    and columns stay zero through Newton-Schulz and leave the rest as they are, so a padded slot
    gives its weight's own orthogonalisation."""
    slots: torch.Tensor
    views: list[torch.Tensor]  # each weight's region of its slot, in the weight's shape
    scales: torch.Tensor       # (weights, 1, 1): timm's learning-rate scale for each weight's shape
    workspace: tuple | None = None  # Newton-Schulz's two iterates (with their transposes) and two products

    def orthogonalise(self, dtype: torch.dtype, coefficients: list[tuple[float, float, float]], eps: float,
                      safety_factor: float) -> None:
        """timm's zeropower_via_newtonschulz of every slot, times its scale, left in the slot. The
        same ops (in float32 exactly so), but in buffers kept from step to step (no allocations, no
        transposes: 20 ops a bucket, timm's takes 29) and normalised in float32 before the cast
        to `dtype`: fp16's range would flush an update of small entries to zero (timm casts first)."""
        if self.workspace is None or self.workspace[0][0].dtype != dtype:
            x, y = torch.empty_like(self.slots, dtype=dtype), torch.empty_like(self.slots, dtype=dtype)
            square = self.slots.new_empty((*self.slots.shape[:2], self.slots.shape[1]), dtype=dtype)
            self.workspace = ((x, x.mT), (y, y.mT), square, torch.empty_like(square))
        (x, x_t), (y, y_t), a, b = self.workspace
        norm = self.slots.norm(dim=(-2, -1), keepdim=True)
        if safety_factor != 1.0:
            norm.mul_(safety_factor)
        self.slots.div_(norm.clamp_min_(eps))
        x.copy_(self.slots)
        for ca, cb, cc in coefficients:
            torch.baddbmm(a, x, x_t, beta=0.0, out=a)            # A = X X^T
            torch.baddbmm(a, a, a, beta=cb, alpha=cc, out=b)     # B = b A + c A A
            torch.baddbmm(x, b, x, beta=ca, out=y)               # X' = a X + B X
            (x, x_t), (y, y_t) = (y, y_t), (x, x_t)
        torch.mul(x, self.scales, out=self.slots)  # in float32, as timm scales


def buckets_for(params: list[torch.Tensor], buckets: int | None, adjust_lr_fn: str | None) -> tuple[list, list[Bucket]]:
    """`params` in bucket order and their buckets (see `partition`)."""
    flat = [(p.shape[0], p[0].numel()) for p in params]
    oriented = [(min(s), max(s)) for s in flat]
    order, made = [], []
    for group in partition(oriented, buckets):
        rows, columns = max(oriented[i][0] for i in group), max(oriented[i][1] for i in group)
        slots = params[group[0]].new_zeros((len(group), rows, columns), dtype=torch.float32)
        views = []
        for slot, i in zip(slots, group):
            (out, inner), (r, c) = flat[i], oriented[i]
            region = slot[:r, :c] if out <= inner else slot[:r, :c].mT  # (out, inner) either way
            views.append(region.unflatten(1, params[i].shape[1:]) if params[i].ndim > 2 else region)
        scales = [timm_muon.get_lr_scale(torch.Size(flat[i]), adjust_lr_fn) if adjust_lr_fn else 1.0 for i in group]
        made.append(Bucket(slots, views, torch.tensor(scales, device=slots.device).view(-1, 1, 1)))
        order += group
    return [params[i] for i in order], made


class Muon(timm_muon.Muon):
    """timm's Muon, its update unchanged, computed in some 70-250 ops a step where timm's loop over
    the weights takes 900 for ResNet18: on a GPU each op is a kernel launch the host issues in turn,
    and 900 of them take about as long as the GPU's work of the step.
    - The updates are orthogonalised in `buckets` zero-padded batches (`partition`; on a GPU few:
      fewer launches for a little more arithmetic), or, with None, one batch per weight shape
      unpadded (on a CPU, where the arithmetic is the cost), each in 20 ops (`Bucket.orthogonalise`).
    - Weight decay, momentum and the scaled update are one foreach op each over all the weights.
    - The AdamW that timm gives BatchNorm weights and biases is torch's fused kernel, the same update
      in one op, its step counters on the device (timm's are read on the host, one by one).
    - Newton-Schulz runs in `newton_schulz_dtype`: timm fixes bf16, which a CPU without bf16
      arithmetic emulates (607 against 29 ms at width 16 on the AVX2 CPU, bench/RESULTS.md).
    AdaMuon, per-position conv updates, scaled eps and Nesterov momentum (none of which a TrainConfig
    sets) are timm's step, as timm computes them."""

    def __init__(self, params, newton_schulz_dtype: torch.dtype = torch.bfloat16, buckets: int | None = None, **kwargs):
        super().__init__(params, **kwargs)
        self.newton_schulz_dtype = newton_schulz_dtype
        self.buckets = buckets
        self._layouts: dict[tuple, tuple[list, list[Bucket]]] = {}

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
        held = []
        for group in self.param_groups:
            if (group.get("algo", "muon") != "muon" or group["conv_mode"] != "flatten" or group["scale_eps"]
                    or group["nesterov"]):
                continue
            params = [p for p in group["params"] if p.grad is not None]
            muon = [p for p in params if self._routed_to_muon(p, group)]
            adamw = [p for p in params if not self._routed_to_muon(p, group)]
            if muon:
                self._orthogonalised_update(muon, group)
            if adamw:
                self._adamw_update(adamw, group)
            held += muon + adamw
        grads = [p.grad for p in held]
        for p in held:  # timm's step skips parameters without a gradient: it updates only the rest
            p.grad = None
        try:
            super().step()
        finally:
            for p, grad in zip(held, grads):
                p.grad = grad
        return loss

    def _orthogonalised_update(self, params: list[torch.Tensor], group: dict) -> None:
        """timm's _single_tensor_muon for `params`, in buckets."""
        key = (tuple(map(id, params)), self.buckets, group["adjust_lr_fn"])
        if key not in self._layouts:
            self._layouts[key] = buckets_for(params, self.buckets, group["adjust_lr_fn"])
        params, buckets = self._layouts[key]
        lr, momentum = group["lr"], group["momentum"]
        grads = [p.grad for p in params]
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        bufs = [self.state[p]["momentum_buffer"] for p in params]
        updates = [view for bucket in buckets for view in bucket.views]
        torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
        torch._foreach_lerp_(bufs, grads, 1 - momentum)
        torch._foreach_copy_(updates, bufs)
        coefficients = timm_muon.resolve_ns_coefficients(group["ns_coefficients"], timm_muon._COEFFICIENTS)
        steps = group["ns_steps"]  # timm's: its coefficients truncated to the steps, or the last repeated
        coefficients = coefficients[:steps] + coefficients[-1:] * (steps - len(coefficients))
        for bucket in buckets:
            bucket.orthogonalise(self.newton_schulz_dtype, coefficients, group["eps"], group["safety_factor"])
        torch._foreach_add_(params, updates, alpha=-lr)

    def _adamw_update(self, params: list[torch.Tensor], group: dict) -> None:
        """timm's AdamW fallback for `params`, as torch's fused AdamW (the same update)."""
        states = [self.state[p] for p in params]
        for p, state in zip(params, states):
            if "step" not in state:
                state["step"] = torch.zeros((), device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif state["step"].device != p.device:  # the fused kernel counts on the device; a checkpoint's come back on the host
                state["step"] = state["step"].to(p.device, torch.float32)
        beta1, beta2 = group["betas"]
        torch_adamw(
            params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
            [s["step"] for s in states], fused=True, amsgrad=False, beta1=beta1, beta2=beta2,
            lr=group["lr"] * group["fallback_lr_scale"], weight_decay=group["weight_decay"], eps=group["eps"],
            maximize=False)


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


def build_optimizer(cfg, model: torch.nn.Module, newton_schulz_dtype: torch.dtype,
                    muon_buckets: int | None = None) -> torch.optim.Optimizer:
    """timm's factory ("sgd" is Nesterov SGD; BatchNorm weights and biases out of the decay). The
    fused kernels take the fp16 loss scaler's inf check on the device; with any other optimizer
    GradScaler.step reads it on the host, one sync per step. Muon is this module's, orthogonalising
    in `muon_buckets` (see `Muon`)."""
    fused = {"fused": True} if cfg.optimizer in FUSED_OPTIMIZERS else {}
    head = {id(p) for p in model.head.parameters()}
    optimizer = create_optimizer_v2(model, cfg.base_optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                    momentum=cfg.momentum, filter_bias_and_bn=not cfg.decay_norm_and_bias,
                                    param_group_fn=head_apart(cfg, head) if cfg.freeze_epochs else None, **fused)
    if type(optimizer) is timm_muon.Muon:  # timm's groups and settings, computed by the subclass
        optimizer = Muon(optimizer.param_groups, newton_schulz_dtype, muon_buckets, **optimizer.defaults)
    # timm's factory's Lookahead, with its defaults (alpha 0.5, k 6)
    return Lookahead(optimizer) if cfg.optimizer != cfg.base_optimizer else optimizer
