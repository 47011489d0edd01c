"""Glyph supervision: a per-patch reading target on the vision tower, so the model learns to read glyph by glyph.

A VLM trained from scratch on rendered cards learns the words it can recognise whole (names, cities from small
vocabularies) but, within a 10-minute budget, never the random digit strings: nothing tells the vision tower to
keep the identity and order of the two to three characters a 16 px patch holds, and nothing tells the language
model where each one is. Dense supervision, as OCR-pretrained document models get it, closes that loop from the
vision side: a linear head on the patch features the projector reads predicts the characters printed in each patch
(``glyph_targets``, built by the processor from the renderer's glyph positions), and its cross-entropy joins the
training loss. The head is training-only: it is removed before export.
"""

from plugins.glyph_supervision.callback import GlyphSupervision

__all__ = ["GlyphSupervision"]
