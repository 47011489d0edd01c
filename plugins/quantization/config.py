"""The typed quantizer spec a config is made of, and the checks that name the YAML key.

A :class:`QuantSpec` says how one kind of tensor is quantized (bits, granularity, symmetry, static or dynamic,
observer). The callbacks check it with :func:`check_spec` for its role (weights or activations), so a bad value
fails at start-up with the key and the allowed range in the message.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from framework.selection import ModuleSelection

GRANULARITIES = ("tensor", "channel", "token", "group")
MODES = ("static", "dynamic")
OBSERVERS = ("minmax", "percentile", "mse")
POINTS = ("input", "output")
RUNTIMES = ("generic", "qnn")
BITS = {"weights": (2, 8), "activations": (4, 16)}
#: Granularities each role may use: a weight has output channels and input groups, an activation has tokens.
ROLE_GRANULARITIES = {"weights": ("tensor", "channel", "group"), "activations": ("tensor", "token", "group")}


@dataclass
class QuantSpec:
    """How one kind of tensor is quantized.

    Args:
        bits: integer width; weights 2-8, activations 4-16.
        granularity: ``tensor`` (one scale), ``channel`` (one per output channel of a weight), ``token`` (one per
            row of an activation, dynamic only) or ``group`` (one per ``group_size`` consecutive inputs of a
            weight row, or of an activation row when dynamic).
        group_size: size of a group (``granularity: group`` only); must divide the dimension it splits.
        symmetric: signed grid ``[-2^(b-1), 2^(b-1) - 1]`` with zero point 0; else an unsigned grid
            ``[0, 2^b - 1]`` with an integer zero point.
        mode: ``static`` (scale and zero point calibrated from observed ranges, then the scale is learned with
            LSQ) or ``dynamic`` (computed from each tensor, or each token / group, at run time).
        observer: how a static range is estimated: ``minmax``, ``percentile`` (``percentile`` of the values,
            averaged over batches) or ``mse`` (the clipping of the min/max range that minimises the
            quantisation error, averaged over batches).
        percentile: upper percentile for ``observer: percentile``, in (50, 100].

    Example::

        weights: {bits: 4, granularity: group, group_size: 32, symmetric: true}
        activations: {bits: 8, granularity: tensor, symmetric: false, observer: percentile}
    """

    bits: int = 8
    granularity: str = "channel"
    group_size: int | None = None
    symmetric: bool = True
    mode: str = "static"
    observer: str = "minmax"
    percentile: float = 99.99

    def __post_init__(self) -> None:
        check_spec(self, None, "QuantSpec")

    @property
    def quant_range(self) -> tuple[int, int]:
        """``(quant_min, quant_max)`` of the integer grid."""
        if self.symmetric:
            return -(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1
        return 0, (1 << self.bits) - 1

    def to_dict(self) -> dict:
        return asdict(self)


def _choice(value: object, allowed: tuple[str, ...], key: str) -> None:
    if value not in allowed:
        raise ValueError(f"{key}: must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")


def check_spec(spec: QuantSpec, role: str | None, key: str) -> QuantSpec:
    """Check ``spec`` for ``role`` (``weights``, ``activations`` or ``None`` for role-free checks only).

    Raises:
        ValueError: naming ``key.<field>`` and the allowed values.
    """
    if not isinstance(spec.bits, int) or isinstance(spec.bits, bool):
        raise ValueError(f"{key}.bits: must be an integer, got {spec.bits!r}")
    low, high = BITS[role] if role else (2, 16)
    if not low <= spec.bits <= high:
        raise ValueError(f"{key}.bits: must be in [{low}, {high}]{f' for {role}' if role else ''}, got {spec.bits}")
    _choice(spec.granularity, GRANULARITIES, f"{key}.granularity")
    _choice(spec.mode, MODES, f"{key}.mode")
    _choice(spec.observer, OBSERVERS, f"{key}.observer")
    if not isinstance(spec.symmetric, bool):
        raise ValueError(f"{key}.symmetric: must be true or false, got {spec.symmetric!r}")
    if spec.granularity == "group":
        if not isinstance(spec.group_size, int) or spec.group_size < 1:
            raise ValueError(f"{key}.group_size: granularity 'group' needs an integer group_size >= 1, "
                             f"got {spec.group_size!r}")
    elif spec.group_size is not None:
        raise ValueError(f"{key}.group_size: only used with granularity 'group' (granularity is "
                         f"{spec.granularity!r}); leave it unset")
    if not 50.0 < float(spec.percentile) <= 100.0:
        raise ValueError(f"{key}.percentile: must be in (50, 100], got {spec.percentile!r}")
    if spec.granularity == "token" and spec.mode != "dynamic":
        raise ValueError(f"{key}.granularity: 'token' scales are computed from each token at run time; "
                         "set mode: dynamic")
    if role is None:
        return spec
    if spec.granularity not in ROLE_GRANULARITIES[role]:
        raise ValueError(f"{key}.granularity: {role} may use {', '.join(repr(g) for g in ROLE_GRANULARITIES[role])}, "
                         f"got {spec.granularity!r}")
    if role == "activations" and spec.mode == "static" and spec.granularity != "tensor":
        raise ValueError(f"{key}.granularity: static activation encodings are per tensor (one scale and offset, "
                         f"as device runtimes take them), got {spec.granularity!r}; use 'tensor', or mode: dynamic")
    return spec


def check_runtime(spec: QuantSpec | None, role: str, runtime: str, key: str) -> None:
    """Restrictions of the deployment runtime.

    ``qnn`` (Qualcomm's runtime, fed by AIMET encodings) takes symmetric weight encodings (per-channel and
    per-block weights must be symmetric there) and static encodings only (its graph is compiled with fixed
    scales). ``generic`` (the integer reference runtime of this package) takes everything.

    Raises:
        ValueError: naming ``key`` and the restriction.
    """
    _choice(runtime, RUNTIMES, "runtime")
    if spec is None or runtime == "generic":
        return
    if role == "weights" and not spec.symmetric:
        raise ValueError(f"{key}.symmetric: runtime 'qnn' takes symmetric weight encodings only; "
                         "set symmetric: true or runtime: generic")
    if spec.mode != "static":
        raise ValueError(f"{key}.mode: runtime 'qnn' compiles fixed encodings; set mode: static or runtime: generic")


@dataclass
class ActivationSite:
    """Extra activation quantizers: the ``points`` of the modules ``targets`` selects, e.g. the KV cache.

    Args:
        targets: modules whose inputs / outputs are quantized (the framework's selection rule; ``types:
            [Module]`` for any module, e.g. the vision projector).
        points: ``input`` and/or ``output``.
        spec: the quantizer; default: the plugin's ``activations`` spec.

    Example::

        activation_sites:
          - targets: {include: "language_model.*(k_proj|v_proj)$"}   # the KV cache
            points: [output]
            spec: {bits: 8, granularity: token, mode: dynamic, symmetric: false}
          - targets: {include: "multi_modal_projector$", types: [Module]}
            points: [output]
    """

    targets: ModuleSelection
    points: list[str] = field(default_factory=lambda: ["output"])
    spec: QuantSpec | None = None


def check_points(points: list[str], key: str) -> list[str]:
    """Raises: ValueError naming ``key`` unless ``points`` is a non-empty list of ``input`` / ``output``."""
    if not points or any(p not in POINTS for p in points):
        raise ValueError(f"{key}: must be a non-empty list of 'input' / 'output', got {points!r}")
    return list(dict.fromkeys(points))
