"""Quantization: fake-quant QAT with learned scales, a PTQ baseline, AIMET encodings and an integer runtime.

Fake quantizers (quantize-dequantize with a straight-through estimator, PyTorch's ``fake_quantize_per_*_affine``
arithmetic) sit on the weights of chosen Linear layers and on the inputs / outputs of chosen modules (the KV
cache, the vision projector), per tensor, channel, token or group, symmetric or not, static or dynamic. Static
scales start from observed ranges (min/max, percentile or MSE-optimal clipping) and are then learned with LSQ
(Esser et al. 2020, "Learned Step Size Quantization"). The learned encodings are exported in Qualcomm AIMET's
``.encodings`` JSON with bit-packed integer weights, so the device model uses them directly instead of a
separate PTQ pass; :class:`IntegerRuntime` runs the exported text decoder on integer codes and reproduces the
fake-quant model. :class:`PostTrainingQuantization` is the calibrate-and-round baseline.

References: LSQ (Esser et al., ICLR 2020); PyTorch ``torch.ao.quantization`` fake quantization and observers;
AIMET quantization encodings specification (Qualcomm Innovation Center, ``aimet`` docs, encoding format 0.6.1).
"""

from plugins.quantization.adapters import (
    adapters_disabled,
    attach_from_encodings,
    check_base_matches,
    load_adapter,
    load_quantized_base,
    set_adapter,
)
from plugins.quantization.config import ActivationSite, QuantSpec, check_spec
from plugins.quantization.encodings import export_encodings, load_encodings, weight_codes
from plugins.quantization.lora import QALFT
from plugins.quantization.placement import (
    QuantLinear,
    attach_quantizers,
    integer_exact_eval,
    quantization_disabled,
    quantizers_of,
    remove_quantizers,
    set_integer_exact,
    set_quantizers,
    share_quantizers,
    shared_input_map,
)
from plugins.quantization.ptq import PostTrainingQuantization
from plugins.quantization.qat import QuantizationAwareTraining
from plugins.quantization.quantizer import FakeQuantizer, fake_quantize, qparams_from_range
from plugins.quantization.runtime import IntegerRuntime
from plugins.quantization.sensitivity import (
    JointMeasure,
    load_plan,
    measure_sensitivity,
    plan_bits,
    refine_plan,
    write_plan,
)

__all__ = [
    "ActivationSite",
    "FakeQuantizer",
    "IntegerRuntime",
    "JointMeasure",
    "PostTrainingQuantization",
    "QALFT",
    "QuantLinear",
    "QuantSpec",
    "QuantizationAwareTraining",
    "adapters_disabled",
    "attach_from_encodings",
    "attach_quantizers",
    "check_base_matches",
    "check_spec",
    "export_encodings",
    "fake_quantize",
    "integer_exact_eval",
    "load_adapter",
    "load_encodings",
    "load_plan",
    "load_quantized_base",
    "measure_sensitivity",
    "plan_bits",
    "qparams_from_range",
    "quantization_disabled",
    "quantizers_of",
    "refine_plan",
    "remove_quantizers",
    "set_adapter",
    "set_integer_exact",
    "set_quantizers",
    "share_quantizers",
    "shared_input_map",
    "weight_codes",
    "write_plan",
]
