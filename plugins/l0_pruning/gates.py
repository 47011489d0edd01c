"""Pure-torch gate and mask code: hard-concrete gates, the straight-through hardtanh, soft/hard top-k, and the
:class:`L0Masks` module holding one score per prunable unit. No Lightning here; a notebook can use it directly.

Unit kinds and score shapes (``L`` layers, ``H`` query heads, ``I`` MLP channels, ``D`` hidden dims):

=========  ===========  =================================================================
kind       score shape  what a gate of 0 removes
=========  ===========  =================================================================
heads      ``[L, H]``   one query head (its q rows and o columns; a KV group goes with its
                        last query head)
mlp        ``[L, I]``   one intermediate channel (gate/up rows, down column)
hidden     ``[D]``      one residual dimension in every layer, the embeddings and lm_head
layers     ``[L, 2]``   the attention block / the MLP block of a layer (a layer is removed
                        when its two blocks are; the hard mask ties them)
=========  ===========  =================================================================
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn as nn

# Hard-concrete constants of Louizos et al. (2018), as used by CoFi and Sheared-LLaMA.
LIMIT_A, LIMIT_B, TEMPERATURE = -0.1, 1.1, 2.0 / 3.0
EPS = 1e-6
KINDS = ("heads", "mlp", "hidden", "layers")
STAGES = ("rank", "prune", "hard")


# ----------------------------------------------------------------------------------------------- gate functions
def hard_concrete_sample(log_alpha: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """A hard-concrete gate from uniform noise ``u`` in (0, 1): stretch a binary-concrete sample to
    (limit_a, limit_b) and clamp to [0, 1] (Louizos et al. 2018, eq. 10)."""
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / TEMPERATURE)
    return (s * (LIMIT_B - LIMIT_A) + LIMIT_A).clamp(0.0, 1.0)


def hard_concrete_keep_prob(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(gate != 0), the expected L0 norm of one gate: sigmoid(log_alpha - T log(-a/b))."""
    return torch.sigmoid(log_alpha - TEMPERATURE * math.log(-LIMIT_A / LIMIT_B))


def stretch_clamp(x: torch.Tensor) -> torch.Tensor:
    """Deterministic hard-concrete stretch-and-clamp of a score in [0, 1] (zero gradient where clamped)."""
    return (x * (LIMIT_B - LIMIT_A) + LIMIT_A).clamp(0.0, 1.0)


class _HardtanhSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.clamp(0.0, 1.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


def hardtanh_ste(x: torch.Tensor) -> torch.Tensor:
    """hardtanh onto [0, 1] in the forward; identity gradient (straight through, also where clipped)."""
    return _HardtanhSTE.apply(x)


def hard_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 mask with exactly ``k`` ones per row (last dim), the largest scores; ties go to the lower index."""
    n = scores.shape[-1]
    if not 0 <= k <= n:
        raise ValueError(f"k={k} outside [0, {n}]")
    order = torch.sort(scores.detach(), dim=-1, descending=True, stable=True).indices
    mask = torch.zeros_like(scores, dtype=torch.float32)
    return mask.scatter(-1, order[..., :k], 1.0)


def soft_topk(scores: torch.Tensor, k: int, tau: float) -> torch.Tensor:
    """sigmoid((score - threshold_k) / tau) per row, the threshold half-way between the k-th and (k+1)-th largest
    score (detached). ``tau == 0`` returns :func:`hard_topk` (exactly ``k`` ones); ``k == n`` returns ones."""
    n = scores.shape[-1]
    if tau <= 0 or k in (0, n):
        return hard_topk(scores, k) + 0.0 * scores  # keeps the graph, no gradient
    top = torch.topk(scores.detach(), k + 1, dim=-1).values
    threshold = 0.5 * (top[..., k - 1] + top[..., k])
    return torch.sigmoid((scores - threshold.unsqueeze(-1)) / tau)


def grouped_head_mask(scores: torch.Tensor, heads: int, kv_heads: int, group: int, tau: float = 0.0) -> torch.Tensor:
    """Head mask ``[L, H]`` that is a valid grouped-query shape: ``kv_heads`` KV groups kept per layer (ranked by the
    sum of their best ``heads // kv_heads`` head scores) and, inside each kept group, the best ``heads // kv_heads``
    query heads. ``tau > 0`` gives the soft version (product of a group and a within-group soft top-k)."""
    layers, total = scores.shape
    per_group = heads // kv_heads
    grouped = scores.view(layers, total // group, group)
    within = soft_topk(grouped, per_group, tau)
    # A group's score is the sum of its best heads' scores (with their gradient, so the soft choice trains too).
    group_scores = (grouped * hard_topk(grouped, per_group)).sum(-1)
    groups = soft_topk(group_scores, kv_heads, tau)
    return (within * groups.unsqueeze(-1)).view(layers, total)


def linear_warmup(step: int, total: int, fraction: float) -> float:
    """0 -> 1 over the first ``fraction`` of ``total`` steps."""
    if fraction <= 0:
        return 1.0
    return min(1.0, step / max(1.0, fraction * total))


# ----------------------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class MaskShape:
    """Unit counts of the text tower: the full model's and the target's (per layer where it applies)."""

    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    hidden: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


@dataclass
class MaskConfig:
    """How the masks are trained; built by :class:`plugins.l0_pruning.L0Pruning` from its YAML keys."""

    kinds: tuple[str, ...] = KINDS
    method: str = "improved"
    mask_scale: float = 1.0
    hardtanh_ste: bool = True
    ranking_noise: float = 0.0
    soft_topk: bool = True
    tau: float = 0.05
    alternate_every: int = 0
    hard_from: float = 0.1
    target_warmup: float = 0.5
    droprate_init: float = 0.5
    seed: int = 0


# ----------------------------------------------------------------------------------------------- the module
class L0Masks(nn.Module):
    """Scores of every prunable unit, the Lagrange multipliers, and the masks they give.

    ``refresh()`` computes the masks of one forward pass into :attr:`current` (training: per the method and stage;
    eval: the exact hard masks of the target shape); the forward hooks of :mod:`plugins.l0_pruning.surgery` read
    them. The schedule position (``step``, ``total_steps``) is set from outside each training step.

    Args:
        full: the dense model's shape.
        target: the shape the hard masks keep.
        config: method and switches.
    """

    def __init__(self, full: MaskShape, target: MaskShape, config: MaskConfig, param_count: callable) -> None:
        super().__init__()
        self.full, self.target, self.config = full, target, config
        self.param_count = param_count
        sizes = {"heads": (full.layers, full.heads), "mlp": (full.layers, full.intermediate),
                 "hidden": (full.hidden,), "layers": (full.layers, 2)}
        generator = torch.Generator().manual_seed(config.seed)
        for kind in config.kinds:
            if config.method == "plain":
                mean = math.log(1 - config.droprate_init) - math.log(config.droprate_init)
                init = (mean + 0.01 * torch.randn(sizes[kind], generator=generator, device="cpu")) * config.mask_scale
            else:  # every unit starts fully kept: the forward is the dense model's
                init = torch.full(sizes[kind], config.mask_scale)
            self.register_parameter(kind, nn.Parameter(init))
        # One-element vectors, not scalars: FSDP refuses to shard 0-dim parameters.
        self.lambda1 = nn.Parameter(torch.zeros(1))
        self.lambda2 = nn.Parameter(torch.zeros(1))
        self.step, self.total_steps = 0, 1
        self.current: dict[str, torch.Tensor] = {}
        self._shape_params: tuple[torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------------ schedule
    @property
    def warm(self) -> float:
        return linear_warmup(self.step, self.total_steps, self.config.target_warmup)

    @property
    def stage(self) -> str:
        """``rank`` (scores learn through the loss), ``prune`` (soft top-k tightens toward the target) or ``hard``
        (exact 0/1 masks of the target shape; the weights recover)."""
        cfg = self.config
        if cfg.method == "plain":
            return "hard" if self.step >= (1 - cfg.hard_from) * self.total_steps else "rank"
        if self.step >= (1 - cfg.hard_from) * self.total_steps:
            return "hard"
        if cfg.alternate_every > 0:
            return STAGES[(self.step // cfg.alternate_every) % 2]
        return "rank" if self.warm < 1.0 else "prune"

    @property
    def tau(self) -> float:
        """Soft top-k temperature, annealed linearly to 0 at the start of the hard stage."""
        end = max(1.0, (1 - self.config.hard_from) * self.total_steps)
        return self.config.tau * max(0.0, 1.0 - self.step / end)

    def counts(self, warm: float) -> MaskShape:
        """Unit counts on the way from the full shape to the target (``warm`` in [0, 1])."""
        f, t = self.full, self.target

        def lerp(a: int, b: int) -> int:
            return int(round(a - (a - b) * warm))

        kv = lerp(f.kv_heads, t.kv_heads)
        group = lerp(f.group, t.group)
        return MaskShape(lerp(f.layers, t.layers), kv * group, kv, lerp(f.intermediate, t.intermediate),
                         lerp(f.hidden, t.hidden), f.head_dim)

    # ------------------------------------------------------------------ scores and masks
    def score(self, kind: str) -> torch.Tensor:
        """The learnable score of each unit (log_alpha for ``plain``; a value in [0, 1] for ``improved``)."""
        return getattr(self, kind) / self.config.mask_scale

    def _noise(self, kind: str, like: torch.Tensor) -> torch.Tensor:
        # Seeded by (seed, step, kind): the same on every rank and after a resume. Drawn on the gates' device: noise
        # drawn on the host and copied over would make every step wait for the GPU (a pageable copy synchronises).
        seed = (self.config.seed * 1_000_003 + self.step * 7919 + zlib.crc32(kind.encode())) % (2**63)
        generator = torch.Generator(device=like.device).manual_seed(seed)
        return torch.rand(like.shape, generator=generator, device=like.device)

    def hard_masks(self, shape: MaskShape | None = None) -> dict[str, torch.Tensor]:
        """Exact 0/1 masks of ``shape`` (default: the target) ranked by score."""
        shape = shape or self.target
        return {kind: self._topk(kind, self.score(kind).detach(), shape, 0.0) for kind in self.config.kinds}

    def _topk(self, kind: str, scores: torch.Tensor, shape: MaskShape, tau: float) -> torch.Tensor:
        if kind == "heads":
            return grouped_head_mask(scores, shape.heads, shape.kv_heads, self.full.group, tau)
        if kind == "mlp":
            return soft_topk(scores, shape.intermediate, tau)
        if kind == "hidden":
            return soft_topk(scores, shape.hidden, tau)
        layer = soft_topk(scores.mean(-1), shape.layers, tau)
        return layer.unsqueeze(-1).expand(-1, 2)

    def train_masks(self) -> dict[str, torch.Tensor]:
        """Masks of one training forward, per the method and the stage."""
        cfg, stage = self.config, self.stage
        if stage == "hard":
            return self.hard_masks()
        masks = {}
        for kind in cfg.kinds:
            score = self.score(kind)
            if cfg.method == "plain":
                u = self._noise(kind, score).clamp(EPS, 1 - EPS)
                masks[kind] = hard_concrete_sample(score, u)
                continue
            if cfg.ranking_noise > 0:  # bounded, mean-zero: perturbs the ranking, never samples a binary gate
                score = score + cfg.ranking_noise * (2 * self._noise(kind, score) - 1)
            gate = hardtanh_ste(score) if cfg.hardtanh_ste else stretch_clamp(score)
            if stage == "prune" and cfg.soft_topk:
                gate = gate * self._topk(kind, score, self.counts(self.warm), self.tau)
            masks[kind] = gate
        return masks

    def keep_probs(self) -> dict[str, torch.Tensor]:
        """Differentiable probability that each unit is kept (its expected L0 contribution)."""
        cfg, stage = self.config, self.stage
        if stage == "hard" or not self.training:
            return self.hard_masks()
        probs = {}
        for kind in cfg.kinds:
            score = self.score(kind)
            if cfg.method == "plain":
                probs[kind] = hard_concrete_keep_prob(score)
                continue
            gate = hardtanh_ste(score) if cfg.hardtanh_ste else stretch_clamp(score)
            if stage == "prune" and cfg.soft_topk:
                gate = gate * self._topk(kind, score, self.counts(self.warm), self.tau)
            probs[kind] = gate
        return probs

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object, **kwargs: object) -> None:
        for name in ("lambda1", "lambda2"):  # checkpoints from when the multipliers were 0-dim
            key = prefix + name
            if key in state_dict and state_dict[key].dim() == 0:
                state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __getstate__(self) -> dict:
        # The masks of the last forward are graph tensors; copies (export, half-precision decode) recompute them.
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {**state, "current": {}}

    def refresh(self) -> dict[str, torch.Tensor]:
        """Compute the masks of the next forward pass into :attr:`current`."""
        self.current = self.train_masks() if self.training else self.hard_masks()
        return self.current

    # ------------------------------------------------------------------ size and penalty
    def expected_params(self, probs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Expected parameter count of the text tower under ``probs`` (default :meth:`keep_probs`)."""
        return self.param_count(self.keep_probs() if probs is None else probs)

    def shape_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The dense and the target shape's parameter counts (0-dim tensors on the gates' device). Exact masks of
        the target shape count the same whichever units they keep, so both are computed once, not every step."""
        device = self.lambda1.device
        if self._shape_params is None or self._shape_params[0].device != device:
            with torch.no_grad():
                self._shape_params = (self.param_count(self.ones()), self.param_count(self.hard_masks()))
        return self._shape_params

    def target_params(self) -> torch.Tensor:
        """The Lagrangian's target: the dense count moved linearly to the target shape's over the warm-up (a
        0-dim tensor on the gates' device: computing it needs no host-device sync)."""
        full, final = self.shape_params()
        return full - self.warm * (full - final)

    def ones(self) -> dict[str, torch.Tensor]:
        return {kind: torch.ones_like(getattr(self, kind)) for kind in self.config.kinds}

    def lagrangian(self, expected: torch.Tensor, target: float, scale: float) -> torch.Tensor:
        """lambda1 (E - T) + lambda2 (E - T)^2 on sizes relative to ``scale``; minimised by the masks, maximised
        by the multipliers (Sheared-LLaMA, eq. 2)."""
        gap = (expected - target) / scale
        return (self.lambda1 * gap + self.lambda2 * gap * gap).reshape(())
