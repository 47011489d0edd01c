"""Building, loading and encoding for both supported VLM families, and the bad inputs of model loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FAMILY_SPECS, MODELS
from helpers import TINY_DATA, make_cli, tiny_config

from framework.data.sample import Sample
from framework.data.tasks import make_task
from framework.models import load_vlm, resolve_gguf
from framework.processing import IGNORE_INDEX, VLMProcessor, expand_pixel_levels, family_for


def _processor(loaded, max_length: int = 4096) -> VLMProcessor:
    return VLMProcessor(family_for(loaded.model.config, loaded.tokenizer, loaded.image_processor), max_length)


@pytest.mark.parametrize("family", sorted(FAMILY_SPECS))
def test_family_trains_and_generates(family: str) -> None:
    torch.manual_seed(0)
    loaded = load_vlm(str(FAMILY_SPECS[family]))
    assert loaded.model.config.model_type == family
    processor = _processor(loaded)
    samples = [make_task("caption", image_size=64)[0], make_task("autofill", image_size=64)[1],
               make_task("longcall", min_words=320, max_words=400)[2]]
    batch = processor.encode(samples)
    # Labels cover exactly the answer tokens plus EOS of each row, and the prompt before them is the text's own
    # tokens (the batch is tokenized in one call: the same tokens as one call per text).
    for ids, row, sample in zip(batch["input_ids"], batch["labels"], samples):
        answer = processor.tokenizer(sample.answer, add_special_tokens=False)["input_ids"] + [processor.eos_id]
        assert row[row != IGNORE_INDEX].tolist() == answer
        count = processor.family.pixel_inputs([sample.image])[1][0] if sample.image is not None else 0
        text = (processor.family.placeholder(count) if sample.image is not None else "") + sample.prompt + "\n"
        prompt = [processor.bos_id] * (processor.bos_id is not None) + processor.tokenizer(
            text, add_special_tokens=False)["input_ids"]
        assert ids[: len(prompt)].tolist() == prompt and int((row != IGNORE_INDEX).nonzero()[0]) == len(prompt)
    out = loaded.model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in loaded.model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # Generation from left-padded prompts: one output row per sample, prompts untouched.
    prompts = processor.encode(samples, with_answer=False)
    assert (prompts["attention_mask"][:, -1] == 1).all(), "prompts must be left padded"
    generated = loaded.model.generate(**prompts, max_new_tokens=4, do_sample=False, pad_token_id=processor.pad_id)
    assert generated.shape[0] == 3 and torch.equal(generated[:, : prompts["input_ids"].shape[1]], prompts["input_ids"])


@pytest.mark.parametrize("family", sorted(FAMILY_SPECS))
def test_image_placeholders_match_features(family: str) -> None:
    loaded = load_vlm(str(FAMILY_SPECS[family]))
    processor = _processor(loaded)
    batch = processor.encode([make_task("caption", image_size=64)[i] for i in range(2)])
    image_id = loaded.model.config.image_token_index if family == "llava" else loaded.model.config.image_token_id
    n_placeholders = int((batch["input_ids"] == image_id).sum())
    features = loaded.model.get_image_features(**{k: batch[k] for k in batch if k in ("pixel_values", "image_grid_thw")})
    features = features.pooler_output if hasattr(features, "pooler_output") else features
    n_features = sum(f.shape[0] for f in features) if isinstance(features, (list, tuple)) else features.shape[0] * features.shape[1]
    assert n_placeholders == n_features


def test_answer_longer_than_context_names_sample() -> None:
    loaded = load_vlm(str(FAMILY_SPECS["llava"]))
    processor = _processor(loaded, max_length=32)
    sample = Sample(task="t", prompt="hi", answer="word " * 100, image=None, source="data.jsonl:7")
    with pytest.raises(ValueError, match=r"data.jsonl:7.*max_length is 32"):
        processor.encode([sample])


def test_missing_inputs_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tiny model spec .*nope.json does not exist"):
        load_vlm(str(tmp_path / "nope.json"))
    with pytest.raises(FileNotFoundError, match="checkpoint folder .* does not exist"):
        load_vlm(str(tmp_path / "no" / "such" / "folder"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hf_config": {}}))
    with pytest.raises(ValueError, match="'hf_config' and 'image_processor'"):
        load_vlm(str(bad))
    with pytest.raises(ValueError, match="model.dtype"):
        load_vlm(str(FAMILY_SPECS["llava"]), dtype="float8")
    with pytest.raises(FileNotFoundError, match="GGUF file .* does not exist"):
        resolve_gguf(str(tmp_path / "x.gguf"))


def test_unsupported_family_is_named() -> None:
    spec = json.loads((MODELS / "llava-test.json").read_text())
    loaded = load_vlm(str(FAMILY_SPECS["llava"]))
    loaded.model.config.model_type = "paligemma"
    with pytest.raises(ValueError, match="'paligemma' is not supported yet"):
        family_for(loaded.model.config, loaded.tokenizer, loaded.image_processor)
    assert spec["hf_config"]["model_type"] == "llava"


def test_gguf_of_unsupported_architecture(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "rwkv6")
    writer.add_block_count(1)
    writer.add_context_length(16)
    writer.add_embedding_length(8)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"model.text_gguf: .*odd.gguf .*rwkv6"):
        load_vlm(str(FAMILY_SPECS["llava"]), text_gguf=str(path))
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match=r"model.text_gguf: .*garbage.gguf"):
        load_vlm(str(FAMILY_SPECS["llava"]), text_gguf=str(garbage))


def test_remote_code_needed_but_off(tmp_path: Path) -> None:
    folder = tmp_path / "remote"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "my_custom_vlm", "auto_map": {"AutoConfig": "configuration_custom.CustomConfig"},
    }))
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_vlm(str(folder))


def test_pretrained_folder_round_trip(tmp_path: Path) -> None:
    """A saved HF folder loads back through the same code path as a hub checkpoint."""
    loaded = load_vlm(str(FAMILY_SPECS["llava"]))
    loaded.model.save_pretrained(tmp_path / "ckpt")
    loaded.tokenizer.save_pretrained(tmp_path / "ckpt")
    loaded.image_processor.save_pretrained(tmp_path / "ckpt")
    again = load_vlm(str(tmp_path / "ckpt"))
    batch = _processor(loaded).encode([make_task("caption", image_size=64)[0]])
    loaded.model.eval()
    again.model.eval()
    torch.testing.assert_close(again.model(**batch).logits, loaded.model(**batch).logits, rtol=0, atol=0)


@pytest.mark.parametrize("spec", ["llava-test.json", "llava-base-gpu.json"])
def test_pixel_lookup_matches_the_image_processor_bit_for_bit(spec: str) -> None:
    from PIL import Image

    from framework.processing import square_pixels_lookup

    processor = load_vlm(str(MODELS / spec)).image_processor
    side = processor.crop_size["height"]
    images = [make_task(task, seed=3, image_size=side)[i].image for task in ("autofill", "caption") for i in range(4)]
    rng = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (side, side, 3), generator=rng, dtype=torch.uint8).numpy()
    images.append(Image.fromarray(noise))  # every 8-bit level, not only the renderers' palette
    reference = processor(images=images, return_tensors="pt")["pixel_values"]
    fast = square_pixels_lookup(processor, images)
    assert fast is not None and fast.dtype == reference.dtype
    assert torch.equal(fast, reference)  # atol=0: the table is the processor's own arithmetic
    # What the table does not cover goes to the processor: other sizes, other modes, other processors.
    assert square_pixels_lookup(processor, [images[0].resize((side * 2, side * 2))]) is None
    assert square_pixels_lookup(processor, [images[0].convert("L")]) is None
    assert square_pixels_lookup(processor, [images[0].convert("RGBA")]) is None
    assert square_pixels_lookup(object(), images) is None
    # As 8-bit levels and their table (what training workers hand over): expanded, the same tensor bit for bit.
    levels = square_pixels_lookup(processor, images, as_levels=True)
    assert levels["pixel_levels"].dtype == torch.uint8 and levels["pixel_table"].shape == (3, 256)
    batch = expand_pixel_levels({**levels, "input_ids": torch.zeros(1)})
    assert set(batch) == {"pixel_values", "input_ids"} and torch.equal(batch["pixel_values"], reference)
    assert square_pixels_lookup(processor, [images[0].convert("L")], as_levels=True) is None


def test_training_loader_hands_over_pixel_levels_that_train_like_pixel_values(tmp_path: Path) -> None:
    """The training loader's batches carry 8-bit levels (a quarter of the bytes); model_inputs expands them to the
    processor's pixel_values, so the loss is the one of the float batch, and evaluation batches stay float."""
    from framework.data.datamodule import Collator
    from framework.module import model_inputs

    # Images at the processor's own size (32 px), where the lookup stands in for it.
    data = {**TINY_DATA, "init_args": {**TINY_DATA["init_args"], "image_size": 32}}
    cli = make_cli(tiny_config(tmp_path, max_steps=1, data=data))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)  # a fit on levels; the trainer links model and data
    batch = next(iter(cli.datamodule.train_dataloader()))
    assert batch["pixel_levels"].dtype == torch.uint8 and "pixel_values" not in batch
    keys = cli.datamodule.train_dataloader().batch_sampler.batch_at(batch["position"])
    float_batch = Collator(cli.model.processor)([cli.datamodule.train_sources[key] for key in keys])
    inputs = model_inputs(batch)  # a loader iterated directly (calibration): expanded here
    assert torch.equal(inputs["pixel_values"], float_batch["pixel_values"]) and "pixel_levels" not in batch
    # What the trainer hands to hooks and steps is expanded once it is on the device.
    handed = cli.datamodule.on_after_batch_transfer(next(iter(cli.datamodule.train_dataloader())), 0)
    assert "pixel_levels" not in handed and torch.equal(handed["pixel_values"], float_batch["pixel_values"])
    with torch.no_grad():
        torch.testing.assert_close(cli.model.model(**inputs).loss, cli.model.model(**model_inputs(float_batch)).loss,
                                   atol=0, rtol=0)
    assert "pixel_values" in next(iter(cli.datamodule.val_dataloader()[0]))
