"""Regional compilation: each transformer block of a model compiled once, its graph reused by every layer.

Two things in transformers stop a block from compiling as one graph, and this module works around both:

- Output recording (``output_hidden_states``, ``output_attentions``) runs through forward hooks that read a
  ``ContextVar``, which dynamo cannot trace: every hooked module inside a block breaks its graph (LLaVA records the
  vision tower's hidden states on every forward, so its vision blocks always do). Dynamo skips those hooks; the ones
  on a block itself run after its compiled call, with the same arguments, and the ones on modules inside it do not
  run there, so attention weights are not recorded from compiled blocks (SDPA, the default attention, never returns
  them anyway). Eager calls and deep copies record as usual.
- CUDA graphs (``reduce-overhead``, ``max-autotune``) replay into static buffers, and only a training step gives
  them fixed shapes and a clear end. A forward without gradients (validation, generation, calibration) runs the
  block eagerly instead: generation's growing sequence would record a graph per length, and a recorded output
  kept past the next replay (as output recording does) would be overwritten.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

BLOCK_SUFFIXES = ("DecoderLayer", "EncoderLayer", "VisionBlock")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
_RECORDING_HOOK = "output_capturing_hook"  # transformers.utils.output_capturing's hook function


def _install_recording_hooks(model: nn.Module) -> None:
    """Install transformers' output-recording hooks now (it installs them lazily, at the first forward that records)."""
    try:
        from transformers import PreTrainedModel
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:  # a transformers without hook-based recording: nothing to move
        return
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            maybe_install_capturing_hooks(module)


class RecordingHook:
    """One of transformers' output-recording hooks, skipped while dynamo traces (it would break the graph).

    Outside compiled code it runs as before, so eager calls, deep copies (which drop the compiled call) and modules
    outside compiled blocks record as usual; :class:`CompiledBlock` runs a block's own ones after its compiled call.
    """

    def __init__(self, hook: Any) -> None:
        self.hook = hook
        # Whether it ran in the current call: dynamo sometimes runs a block's frame eagerly (seen on a GPU under
        # `vlmc bench`'s FLOP count; also past its recompile limit), and then the hook must not run a second time.
        self.ran = False

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if torch.compiler.is_compiling():
            return None
        self.ran = True
        return self.hook(module, args, output)


def _wrap_recording_hooks(module: nn.Module) -> None:
    for key, hook in module._forward_hooks.items():
        if getattr(hook, "__name__", "") == _RECORDING_HOOK:
            module._forward_hooks[key] = RecordingHook(hook)


class CompiledBlock:
    """A block's ``_compiled_call_impl`` (what ``nn.Module.compile`` sets): the compiled call, then the block's
    output-recording hooks; the eager call instead when CUDA graphs are on and no training step is running."""

    def __init__(self, module: nn.Module, mode: str, dynamic: bool | None = True) -> None:
        self.module = module
        self.compiled = torch.compile(module._call_impl, dynamic=dynamic, mode=mode)
        self.graphs = mode in CUDA_GRAPH_MODES

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self.module
        if self.graphs and not (module.training and torch.is_grad_enabled()):
            return module._call_impl(*args, **kwargs)  # records through its hooks as usual
        hooks = [hook for hook in module._forward_hooks.values() if isinstance(hook, RecordingHook)]
        for hook in hooks:
            hook.ran = False
        output = self.compiled(*args, **kwargs)
        for hook in hooks:
            if not hook.ran:
                result = hook.hook(module, args, output)
                if result is not None:
                    output = result
        return output


def compile_blocks(model: nn.Module, mode: str = "default", dynamic: bool | None = True) -> list[str]:
    """Compile every transformer block of ``model`` in place (see the module docstring); returns their names.

    Dynamic shapes (``dynamic=True``, the default): generation changes the sequence length every step; padded
    training batches keep one shape, so CUDA graphs are recorded once for them. ``dynamic=False`` or ``None``
    (``torch.compile``'s own choices) start from static shapes, which is all a CUDA-graph training step needs. Parameter names do not change, so checkpoints and exports are the same
    as for the eager model.
    """
    _install_recording_hooks(model)
    names = []
    for name, module in model.named_modules():
        if not type(module).__name__.endswith(BLOCK_SUFFIXES) or isinstance(module._compiled_call_impl, CompiledBlock):
            continue
        for inner in module.modules():
            _wrap_recording_hooks(inner)
        module._compiled_call_impl = CompiledBlock(module, mode, dynamic)
        names.append(name)
    return names
