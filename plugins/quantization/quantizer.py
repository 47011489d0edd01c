"""Pure-torch part: :class:`FakeQuantizer`, quantize-dequantize with a straight-through estimator.

The arithmetic is PyTorch's own (``torch.fake_quantize_per_tensor_affine`` / ``..._per_channel_affine``)::

    q = clamp(round(x * (1 / scale)) + zero_point, quant_min, quant_max)     # round half to even
    x_hat = (q - zero_point) * scale

computed in float32, so per-tensor and per-channel results equal PyTorch's bit for bit. Zero points are integers,
so an integer runtime reproduces ``x_hat`` exactly from the codes ``q``. Ranges become qparams with PyTorch's
observer formulas (``MinMaxObserver``): symmetric ``scale = max(-min, max) / ((quant_max - quant_min) / 2)``,
zero point 0; asymmetric ``scale = (max - min) / (quant_max - quant_min)``, ``zero_point = quant_min -
round(min / scale)``; ranges always include 0 and scales are at least float32 eps.

The backward pass is LSQ (Esser et al. 2020): the gradient passes straight through ``round`` inside the grid and
is zero outside it; the scale gets ``round(x/s) - x/s`` inside and ``quant_min - zero_point`` /
``quant_max - zero_point`` where clipped, multiplied by LSQ's gradient scale ``1 / sqrt(N * quant_max)`` (N:
elements sharing one scale), so a scale learns at the pace of the weights whatever the tensor size.
:class:`LSQFakeQuantize` computes both passes with no host-device synchronisation. PyTorch's fused kernels
(``torch._fake_quantize_learnable_per_channel_affine``, ``torch.fake_quantize_per_channel_affine``) give the same
values (tested) but read their zero points and scales back to the host to check them, several synchronisations
per quantizer and step: on a GPU that stalled the whole QAT step (2.3x a plain step).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from plugins.quantization.config import QuantSpec, check_spec

EPS = torch.finfo(torch.float32).eps
#: torch.quantile's input limit; larger rows are subsampled with a fixed stride for the percentile observer.
_QUANTILE_LIMIT = 1 << 24
_MSE_CLIPS = torch.linspace(0.3, 1.0, 15).tolist()


def qparams_from_range(min_val: torch.Tensor, max_val: torch.Tensor, quant_min: int, quant_max: int,
                       symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and (integer-valued, float32) zero point for observed ranges, with PyTorch's observer formulas."""
    min_neg = torch.minimum(min_val.float(), torch.zeros_like(min_val, dtype=torch.float32))
    max_pos = torch.maximum(max_val.float(), torch.zeros_like(max_val, dtype=torch.float32))
    if symmetric:
        scale = torch.maximum(-min_neg, max_pos) / (float(quant_max - quant_min) / 2)
        scale = torch.clamp(scale, min=EPS)
        zero_point = torch.zeros_like(scale)
    else:
        scale = torch.clamp((max_pos - min_neg) / float(quant_max - quant_min), min=EPS)
        zero_point = torch.clamp(quant_min - torch.round(min_neg / scale), quant_min, quant_max)
    return scale, zero_point


def _grid_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int,
                quant_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``round(x * (1 / scale)) + zero_point`` before and after clamping to the grid (float, integer-valued)."""
    shifted = torch.round(x * (1.0 / scale)) + zero_point
    return shifted, shifted.clamp(quant_min, quant_max)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int,
                  quant_max: int) -> torch.Tensor:
    """``(clamp(round(x / scale) + zero_point) - zero_point) * scale`` (no gradient rules; see
    :meth:`FakeQuantizer.fake_quant`)."""
    _, q = _grid_codes(x, scale, zero_point, quant_min, quant_max)
    return (q - zero_point) * scale


_ENABLED: dict[torch.device, torch.Tensor] = {}


def _enabled_flag(device: torch.device) -> torch.Tensor:
    """The ``fake_quant_enabled`` argument of PyTorch's tensor-qparams kernel, one per device (made once)."""
    if device not in _ENABLED:
        _ENABLED[device] = torch.ones(1, dtype=torch.long, device=device)
    return _ENABLED[device]


def fake_quantize_with_mask(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int,
                            quant_max: int, *, mask: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`fake_quantize` of float32 ``x`` and the mask of the values inside the grid (before clamping).

    One scale on a GPU runs PyTorch's tensor-qparams kernel: both results in one pass, qparams read on the device
    (its CPU kernel reads them back, harmless there, and compiled code takes the elementwise form). Elsewhere the
    mask costs one more operation, skipped with ``mask=False`` (then ``None``).
    """
    if (scale.numel() == 1 and x.is_cuda and x.dtype == scale.dtype == torch.float32
            and not torch.compiler.is_compiling()):
        return torch._fake_quantize_per_tensor_affine_cachemask_tensor_qparams(
            x, scale.reshape(1), zero_point.reshape(1).to(torch.int32), _enabled_flag(x.device), quant_min, quant_max)
    shifted, clamped = _grid_codes(x, scale, zero_point, quant_min, quant_max)
    return (clamped - zero_point) * scale, (shifted == clamped) if mask else None


class LSQFakeQuantize(torch.autograd.Function):
    """:func:`fake_quantize` over rows ``[rows, n]`` with LSQ's gradients for ``x`` and ``scale`` (``[rows, 1]``).

    Arithmetic in float32 whatever ``x``'s dtype; the output and ``x``'s gradient come back in ``x``'s dtype. With
    ``inside`` the in-grid mask, LSQ's local scale gradient ``round(x/s) - x/s`` (inside) or ``clamped code -
    zero_point`` (outside) is ``(x_hat - x * inside) / s`` in both cases. With ``keep_outputs`` (weights: as large
    as the weight) the float output and the mask are kept for backward; otherwise (activations, whose copies would
    cost memory per token) only ``x`` as given (a bf16 activation stays bf16), ``scale`` and ``zero_point`` are,
    and backward recomputes the quantization (one kernel for one scale on a GPU). Nothing is read back to the
    host, so a step of many quantizers stays asynchronous on a GPU, and ``torch.compile`` traces it.
    ``grad_factor`` is LSQ's gradient scale, or, where the size is symbolic under ``torch.compile``, the
    ``N * quant_max`` that backward turns into it on the device.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int,
                quant_max: int, grad_factor: float | torch.SymInt, keep_outputs: bool = False) -> torch.Tensor:
        ctx.quant_range, ctx.grad_factor, ctx.kept = (quant_min, quant_max), grad_factor, keep_outputs
        out, inside = fake_quantize_with_mask(x.float(), scale, zero_point, quant_min, quant_max, mask=keep_outputs)
        ctx.save_for_backward(x, scale, zero_point, *((out, inside) if keep_outputs else ()))
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, scale, zero_point, *kept = ctx.saved_tensors
        out, inside = kept if ctx.kept else fake_quantize_with_mask(x.float(), scale, zero_point, *ctx.quant_range)
        grad = grad.float()
        grad_x = (grad * inside).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_scale = None
        if ctx.needs_input_grad[1]:
            factor = ctx.grad_factor
            if not isinstance(factor, float):
                # LSQ's N * quant_max, symbolic under torch.compile's dynamic shapes: its 1 / sqrt on the device. As a
                # host scalar it became CPU kernels inside the compiled backward, which CUDA graphs cannot hold.
                factor = grad.new_full((), factor, dtype=torch.float32).rsqrt()
            grad_scale = (grad * (out - x.float() * inside)).sum(dim=1, keepdim=True) * (factor / scale)
        return grad_x, grad_scale, None, None, None, None, None


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int,
                   quant_max: int) -> torch.Tensor:
    """The integer codes ``q`` (int64) of :func:`fake_quantize`."""
    return _grid_codes(x.float(), scale, zero_point, quant_min, quant_max)[1].to(torch.int64)


@dataclasses.dataclass(frozen=True)
class IntegerRows:
    """An integer tensor in row form: ``values = codes - zero_point`` (int64, ``[rows, in]``) and its scales
    (float64, ``[rows, in / block]``, or ``[1, 1]`` for one scale), each covering ``block`` consecutive inputs."""

    values: torch.Tensor
    scale: torch.Tensor
    block: int


def integer_rows(codes: torch.Tensor, zero_point: torch.Tensor, scale: torch.Tensor) -> IntegerRows:
    """:class:`IntegerRows` of ``codes`` (any shape ``[..., in]``) whose qparams are in row form ``[scales, 1]``:
    one scale (``[1, 1]``), one per row of ``[-1, in]`` (channel, token) or ``in / block`` per row (group)."""
    width = codes.shape[-1]
    rows = codes.numel() // width
    count = scale.numel()
    per_row = 1 if count in (1, rows) else count // rows
    if count not in (1, rows) and (count % rows or width % per_row):
        raise ValueError(f"{count} scales do not fit a {tuple(codes.shape)} tensor")
    shape = (1, 1) if count == 1 else (rows, per_row)
    block = width // per_row
    flat = codes.reshape(-1, block) - zero_point.reshape(-1, 1).to(torch.int64)
    return IntegerRows(flat.reshape(rows, width), scale.reshape(shape).double(), block)


#: Rows per chunk of :func:`integer_linear`, so the float64 per-block partial sums stay a few hundred MB.
_ROW_CHUNK = 1 << 12


def integer_linear(x: IntegerRows, w: IntegerRows) -> torch.Tensor:
    """``y[r, o] = sum_blocks (sum_i x[r, i] * w[o, i]) * scale_x[r, block] * scale_w[o, block]``, float32.

    The integer products are accumulated exactly, per block of ``gcd(x.block, w.block)`` inputs: in float64 when
    ``max|x| * max|w| * block < 2**53`` (every partial sum is then an integer float64 holds exactly, whatever the
    summation order), in int64 otherwise. Each block's sum is scaled in float64, ``(sum * scale_x) * scale_w``,
    the blocks summed in float64, and the result rounded to float32 once. This is the one implementation of a
    quantized Linear's integer matmul: :class:`~plugins.quantization.runtime.IntegerRuntime` and the integer-exact
    evaluation of :class:`~plugins.quantization.placement.QuantLinear` both call it, so the two cannot drift.

    Args:
        x: activations ``[rows, in]``.
        w: weights ``[out, in]``.

    Returns:
        ``[rows, out]`` float32.
    """
    rows, width = x.values.shape
    out = w.values.shape[0]
    block = math.gcd(x.block, w.block)
    blocks = width // block
    bound = int(x.values.abs().max()) * int(w.values.abs().max()) * block if x.values.numel() else 0
    exact_dtype = torch.float64 if bound < (1 << 53) else torch.int64
    wv = w.values.to(exact_dtype).reshape(out, blocks, block).permute(1, 2, 0)  # [blocks, block, out]
    sw = w.scale.repeat_interleave(w.block // block, dim=1).expand(out, blocks)
    pieces = []
    for start in range(0, rows, _ROW_CHUNK):
        xv = x.values[start:start + _ROW_CHUNK].to(exact_dtype)
        n = xv.shape[0]
        partial = torch.bmm(xv.reshape(n, blocks, block).permute(1, 0, 2), wv)  # [blocks, n, out], exact
        sx = x.scale if x.scale.shape[0] == 1 else x.scale[start:start + _ROW_CHUNK]
        sx = sx.repeat_interleave(x.block // block, dim=1).expand(n, blocks)
        if blocks == 1:
            pieces.append((partial[0].double() * sx * sw.t()).float())
        else:
            scaled = partial.double() * sx.t()[:, :, None] * sw.t()[:, None, :]
            pieces.append(scaled.sum(0).float())
    return torch.cat(pieces) if pieces else x.values.new_zeros((0, out), dtype=torch.float32)


def qparam_shape(spec: QuantSpec, shape: tuple[int, ...] | None) -> tuple[int, ...] | None:
    """Shape of a static quantizer's scale for a tensor of ``shape`` (``None``: computed per input at run time).

    ``tensor``: ``(1,)``; ``channel``: ``(shape[0], 1, ...)``; ``group``: ``(*shape[:-1], shape[-1] / group_size,
    1)``; ``token``: dynamic only.

    Raises:
        ValueError: ``group_size`` does not divide the last dimension.
    """
    if spec.granularity == "tensor":
        return (1,)
    if shape is None or spec.granularity == "token":
        return None
    if spec.granularity == "channel":
        return (shape[0],) + (1,) * (len(shape) - 1)
    if shape[-1] % spec.group_size:
        raise ValueError(f"group_size {spec.group_size} does not divide the last dimension {shape[-1]}")
    return (*shape[:-1], shape[-1] // spec.group_size, 1)


class FakeQuantizer(nn.Module):
    """Quantize-dequantize one tensor (a weight or an activation) on an integer grid.

    Static quantizers hold ``scale`` (a parameter, learned with LSQ unless frozen) and ``zero_point`` (an
    integer-valued buffer) plus the observer's running range (``obs_min``, ``obs_max``, ``obs_count``) and an
    ``initialized`` flag, all checkpointed with the model. Dynamic ones compute both from each input (per tensor,
    token or group) and hold no state; a dynamic weight quantizer still has a ``scale`` so that loaded encodings
    can fix it (:func:`plugins.quantization.encodings.load_encodings`).

    Args:
        spec: bits, granularity, symmetry, mode and observer.
        shape: shape of the quantized tensor when it is fixed (weights); needed for ``channel`` and ``group``.

    Attributes:
        enabled: quantize in :meth:`forward` (else pass through).
        observing: record ranges in :meth:`forward` and pass the input through unchanged (calibration).

    Raises:
        ValueError: an invalid spec, or ``channel`` / ``group`` without a ``shape`` in static mode.

    Example::

        quantizer = FakeQuantizer(QuantSpec(bits=4, granularity="channel"), shape=tuple(linear.weight.shape))
        quantizer.calibrate(linear.weight)       # observe + freeze_observer
        w_hat = quantizer(linear.weight)         # on the 4-bit grid; gradients reach weight and scale
    """

    def __init__(self, spec: QuantSpec, shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        check_spec(spec, None, "FakeQuantizer.spec")
        self.spec = spec
        self.shape = None if shape is None else tuple(int(d) for d in shape)
        self.enabled = True
        self.observing = False
        # Host copy of the `initialized` buffer, which starts False and is re-read when a state dict is loaded.
        # Reading the buffer is a host-device sync, and every forward and every training step asks; inside a
        # compiled block it would also break the graph. The buffer stays what checkpoints save.
        self._initialized: bool | None = False
        # Host copy of `obs_count` (None: read it when asked). The forward never reads it: `observe` counts on the
        # device, so a compiled block traces the observer once, not once per calibration batch.
        self._observed: int | None = 0
        pshape = qparam_shape(spec, self.shape)
        if pshape is None and spec.mode == "static":
            raise ValueError(f"FakeQuantizer: static {spec.granularity} quantization needs the tensor's shape")
        self.scale: nn.Parameter | None = None
        if pshape is not None:
            self.scale = nn.Parameter(torch.ones(pshape), requires_grad=spec.mode == "static")
            self.register_buffer("zero_point", torch.zeros(pshape))
            self.register_buffer("obs_min", torch.zeros(pshape))
            self.register_buffer("obs_max", torch.zeros(pshape))
            self.register_buffer("obs_count", torch.zeros((), dtype=torch.int64))
            self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    # ------------------------------------------------------------------ properties
    @property
    def static(self) -> bool:
        return self.spec.mode == "static"

    @property
    def quant_range(self) -> tuple[int, int]:
        return self.spec.quant_range

    @property
    def is_initialized(self) -> bool:
        if self.scale is None:
            return False
        if self._initialized is None:
            self._initialized = bool(self.initialized)
        return self._initialized

    def _mark_initialized(self) -> None:
        self.initialized.fill_(True)
        self._initialized = True

    @property
    def observed_batches(self) -> int:
        """Batches the observer has folded in (``obs_count``, read from the device once)."""
        if self.scale is None:
            return 0
        if self._observed is None:
            self._observed = int(self.obs_count)
        return self._observed

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        # The loaded buffers decide; read them now, outside any forward (a meta tensor has no value yet).
        initialized = getattr(self, "initialized", None)
        self._initialized = None if initialized is not None and initialized.is_meta else (
            initialized is not None and bool(initialized))
        self._observed = None

    def extra_repr(self) -> str:
        s = self.spec
        group = f", group_size={s.group_size}" if s.granularity == "group" else ""
        return (f"bits={s.bits}, {s.granularity}{group}, {'symmetric' if s.symmetric else 'asymmetric'}, {s.mode}, "
                f"enabled={self.enabled}")

    # ------------------------------------------------------------------ rows: one row per scale
    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as ``[number of scales, elements per scale]`` (row-major order of the scales)."""
        g = self.spec.granularity
        if g == "tensor":
            return x.reshape(1, -1)
        if g == "channel":
            return x.reshape(x.shape[0], -1)
        if g == "group":
            if x.shape[-1] % self.spec.group_size:
                raise ValueError(f"group_size {self.spec.group_size} does not divide the last dimension "
                                 f"{x.shape[-1]} of a {tuple(x.shape)} input")
            return x.reshape(-1, self.spec.group_size)
        return x.reshape(-1, x.shape[-1])  # token

    def _check_shape(self, x: torch.Tensor) -> None:
        if self.shape is not None and tuple(x.shape) != self.shape:
            raise ValueError(f"FakeQuantizer built for shape {self.shape} got a {tuple(x.shape)} tensor")

    def row_ranges(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row ``(min, max)`` estimated by the spec's observer (``[rows]`` float32 each)."""
        rows = rows.detach().float()
        if self.spec.observer == "minmax":
            return rows.amin(dim=1), rows.amax(dim=1)
        if self.spec.observer == "percentile":
            sample = rows
            if sample.numel() > _QUANTILE_LIMIT:
                sample = sample[:, :: math.ceil(sample.numel() / _QUANTILE_LIMIT)]
            p = float(self.spec.percentile) / 100.0
            return torch.quantile(sample, 1.0 - p, dim=1), torch.quantile(sample, p, dim=1)
        return self._mse_ranges(rows)

    def _mse_ranges(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row, the clipping ``c * [min, max]`` (c in 0.3..1) with the least quantisation error."""
        low, high = rows.amin(dim=1), rows.amax(dim=1)
        qmin, qmax = self.quant_range
        best_err = torch.full_like(low, float("inf"))
        best = torch.ones_like(low)
        for clip in _MSE_CLIPS:
            scale, zp = qparams_from_range(low * clip, high * clip, qmin, qmax, self.spec.symmetric)
            err = (fake_quantize(rows, scale[:, None], zp[:, None], qmin, qmax) - rows).pow(2).mean(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, torch.full_like(best, clip), best)
        return low * best, high * best

    # ------------------------------------------------------------------ static: observe and freeze
    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Fold ``x``'s range into the observer (running min/max, or the running mean of per-batch estimates)."""
        if self.scale is None:
            return
        low, high = self.row_ranges(self._rows(x))
        low, high = low.reshape(self.obs_min.shape), high.reshape(self.obs_max.shape)
        # Counted on the device: no read-back, and one traced graph for every calibration batch.
        count = self.obs_count.to(low.dtype)
        first = self.obs_count == 0
        if self.spec.observer == "minmax":
            new_low, new_high = torch.minimum(self.obs_min, low), torch.maximum(self.obs_max, high)
        else:  # running mean of the per-batch estimates
            new_low = self.obs_min * (count / (count + 1)) + low / (count + 1)
            new_high = self.obs_max * (count / (count + 1)) + high / (count + 1)
        self.obs_min.copy_(torch.where(first, low, new_low))
        self.obs_max.copy_(torch.where(first, high, new_high))
        self.obs_count += 1
        self._observed = None

    @torch.no_grad()
    def freeze_observer(self, reduce_max: Callable[[torch.Tensor], torch.Tensor] | None = None,
                        reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Set ``scale`` and ``zero_point`` from the observed range and stop observing.

        Args:
            reduce_max: element-wise maximum across data-parallel ranks (``minmax`` observer); ``None``: one process.
            reduce_mean: mean across ranks (``percentile`` and ``mse`` observers).

        Raises:
            RuntimeError: the quantizer observed nothing.
        """
        if self.scale is None:
            self.observing = False
            return
        if self.observed_batches == 0:
            raise RuntimeError("FakeQuantizer.freeze_observer: nothing was observed; run calibration batches first")
        low, high = self.obs_min, self.obs_max
        if self.spec.observer == "minmax" and reduce_max is not None:
            low, high = -reduce_max(-low), reduce_max(high)
        elif self.spec.observer != "minmax" and reduce_mean is not None:
            low, high = reduce_mean(low), reduce_mean(high)
        scale, zero_point = qparams_from_range(low, high, *self.quant_range, self.spec.symmetric)
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)
        self._mark_initialized()
        self.observing = False

    @torch.no_grad()
    def reset(self) -> None:
        """Forget the observed range and the encoding: a static quantizer is uncalibrated again (observe and
        :meth:`freeze_observer`, or :meth:`calibrate`, before it quantizes)."""
        if self.scale is None:
            return
        self.obs_count.zero_()
        self._observed = 0
        self.initialized.fill_(False)
        self._initialized = False

    def calibrate(self, x: torch.Tensor) -> None:
        """Observe ``x`` alone and freeze (weights: round-to-nearest qparams from the weight itself)."""
        if self.scale is None:
            return
        self.obs_count.zero_()
        self._observed = 0
        self.observe(x)
        self.freeze_observer()

    # ------------------------------------------------------------------ quantization
    def qparams(self, x: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` in row form ``[rows, 1]``: the stored ones (static), or from ``x`` (dynamic).

        Raises:
            RuntimeError: a static quantizer used before it was calibrated or loaded.
        """
        if self.static:
            if not self.is_initialized:
                raise RuntimeError("a static FakeQuantizer was used before calibration (observe + freeze_observer) "
                                   "or load_encodings")
            return self.scale.clamp(min=EPS).reshape(-1, 1), self.zero_point.reshape(-1, 1)
        if x is None:
            raise ValueError("a dynamic quantizer needs the tensor to compute its qparams")
        rows = self._rows(x.detach().float())
        scale, zero_point = qparams_from_range(rows.amin(dim=1), rows.amax(dim=1), *self.quant_range,
                                               self.spec.symmetric)
        return scale[:, None], zero_point[:, None]

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize ``x`` (float32 arithmetic, result in ``x``'s dtype) with LSQ gradients."""
        self._check_shape(x)
        scale, zero_point = self.qparams(x)
        rows = self._rows(x)
        qmin, qmax = self.quant_range
        if not (self.static and self.scale.requires_grad):
            scale = scale.detach()  # fixed or per-input (dynamic): only the input's gradient passes
        # LSQ's gradient scale 1 / sqrt(N * quant_max). Compiled, an activation's N may be symbolic (dynamic shapes;
        # dynamo does not say which), so backward computes the scale from N * quant_max on the device.
        elements = rows.shape[1] * qmax
        grad_factor = elements if self.shape is None and torch.compiler.is_compiling() else 1.0 / math.sqrt(elements)
        out = LSQFakeQuantize.apply(rows, scale, zero_point, qmin, qmax, grad_factor, self.shape is not None)
        return out.reshape(x.shape)

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of ``x`` (int64, shape of ``x``): ``x_hat = scale * (codes - zero_point)``."""
        scale, zero_point = self.qparams(x)
        return quantize_codes(self._rows(x), scale, zero_point, *self.quant_range).reshape(x.shape)

    @torch.no_grad()
    def integer(self, x: torch.Tensor) -> IntegerRows:
        """``x`` (a weight ``[out, in]`` or activations ``[..., in]``) as :class:`IntegerRows` ``[-1, in]``: the
        codes of :meth:`codes` less the zero point, with this quantizer's (static or per-input) scales."""
        scale, zero_point = self.qparams(x)
        codes = quantize_codes(self._rows(x), scale, zero_point, *self.quant_range)
        return integer_rows(codes.reshape(x.shape), zero_point, scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.observe(x)
            return x
        if not self.enabled:
            return x
        return self.fake_quant(x)

    # ------------------------------------------------------------------ fixing the encodings
    @torch.no_grad()
    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor, *, freeze: bool = True) -> None:
        """Make this a static quantizer with the given qparams (any shape with the scale's number of elements).

        Raises:
            ValueError: the number of scales differs, or the quantizer has no fixed shape (dynamic per token).
        """
        if self.scale is None:
            raise ValueError(f"a dynamic {self.spec.granularity} quantizer of an unknown shape holds no qparams")
        if scale.numel() != self.scale.numel() or zero_point.numel() != self.scale.numel():
            raise ValueError(f"{scale.numel()} scales given, the quantizer has {self.scale.numel()}")
        self.scale.copy_(scale.reshape(self.scale.shape).float())
        self.zero_point.copy_(zero_point.reshape(self.zero_point.shape).float())
        self._mark_initialized()
        self.spec = dataclasses.replace(self.spec, mode="static")
        self.scale.requires_grad_(not freeze)
        self.observing = False
        self.enabled = True
