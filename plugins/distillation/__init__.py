"""Knowledge distillation from a frozen teacher (Hinton et al. 2015) as a plugin of its own.

The training loss gains ``weight * KL(teacher || student)`` on the answer tokens, with temperature-softened
distributions. Stacked with a plugin that compresses the student (a sparsity ramp, L0 pruning, QAT), the student
recovers toward the dense model it came from, not only toward the labels: the usual recovery recipe of sparse and
pruned LLMs (Sheared-LLaMA continues pre-training; SparseGPT-style pipelines distil). The teacher is any model the
framework loads (an exported folder, a hub id, a spec), frozen and never exported.
"""

from plugins.distillation.callback import Distillation

__all__ = ["Distillation"]
