"""The data mixture: deterministic batches, task-homogeneous batches, shards, bad configuration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from framework.data.datamodule import MixtureBatchSampler, TaskSources, VLMDataModule
from framework.data.jsonl import JsonlDataset
from framework.data.tasks import make_task


def test_batches_are_a_function_of_seed_and_position() -> None:
    a = MixtureBatchSampler({"caption": 1.0, "autofill": 3.0}, batch_size=4, batches_per_epoch=50, seed=7)
    b = MixtureBatchSampler({"caption": 1.0, "autofill": 3.0}, batch_size=4, batches_per_epoch=50, seed=7)
    batches = list(a)
    assert batches == list(b)
    # Resuming at position 20 yields exactly the tail of the uninterrupted epoch.
    b.start_position = 20
    assert list(b) == batches[20:]
    # Each batch holds one task; the weights shape the mixture.
    assert all(len({key.task for key in batch}) == 1 for batch in batches)
    autofill_share = sum(batch[0].task == "autofill" for batch in batches) / len(batches)
    assert 0.55 < autofill_share < 0.95
    # The next pass is the next epoch: new positions, new samples, same length.
    second = list(a)
    assert len(second) == 50 and second[0][0].position == 50 and second[0] != batches[0]


def test_ranks_read_disjoint_samples() -> None:
    shards = [MixtureBatchSampler({"caption": 1.0}, 4, 10, seed=0, rank=r, world_size=2) for r in range(2)]
    indices = [{key.index for batch in shard for key in batch} for shard in shards]
    assert not indices[0] & indices[1]
    # Every rank picks the same task for the same position, so collective ops see matching shapes.
    assert [b[0].task for b in shards[0]] == [b[0].task for b in shards[1]]


def test_finite_sources_cycle_through_seeded_permutations(tmp_path: Path) -> None:
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"q{i}", "answer": f"a{i}"}) for i in range(5)))
    dataset = JsonlDataset(path, task="mine")
    sources = TaskSources({"mine": dataset}, seed=0)
    from framework.data.datamodule import SampleKey

    first_cycle = [sources[SampleKey("mine", i, 0)].prompt for i in range(5)]
    second_cycle = [sources[SampleKey("mine", i, 0)].prompt for i in range(5, 10)]
    assert sorted(first_cycle) == sorted(second_cycle) == [f"q{i}" for i in range(5)]


def test_validation_sets_are_disjoint_from_training() -> None:
    dm = VLMDataModule(tasks={"autofill": 1.0}, val_samples=8, image_size=64)
    dm.setup("fit")
    val_answers = {s.answer for s in dm.val_sets["autofill"]}
    train = make_task("autofill", seed=0, image_size=64)
    assert not val_answers & {train[i].answer for i in range(200)}


def test_user_jsonl_becomes_a_task(tmp_path: Path) -> None:
    Image.new("RGB", (40, 40), "red").save(tmp_path / "red.png")
    path = tmp_path / "cards.jsonl"
    path.write_text(json.dumps({"image": "red.png", "prompt": "colour?", "answer": "red"}) + "\n")
    dm = VLMDataModule(tasks={"caption": 1.0}, train_files=[str(path)], val_files=[str(path)], val_samples=2)
    assert dm.tasks == {"caption": 1.0, "cards": 1.0}
    dm.setup("fit")
    assert set(dm.val_sets) == {"caption", "cards"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tasks": {"recipes": 1.0}}, "data.tasks: unknown task 'recipes'"),
        ({"tasks": {"caption": 0.0}}, "data.tasks.caption: weight must be a positive number"),
        ({"tasks": {}}, "data.tasks: give at least one task"),
        ({"batch_size": 0}, "data.batch_size: must be an integer >= 1"),
        ({"max_length": 2}, "data.max_length"),
        ({"image_size": 8}, "data.image_size"),
        ({"task_args": {"unknown": {}}}, "data.task_args: 'unknown' is not a built-in task"),
    ],
)
def test_bad_configuration(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        VLMDataModule(**kwargs)


def test_resume_state_rejects_another_seed() -> None:
    dm = VLMDataModule(seed=1)
    with pytest.raises(ValueError, match="data.seed is 1 but the checkpoint was trained with seed 2"):
        dm.load_state_dict({"next_position": 3, "seed": 2})
    dm.load_state_dict({"next_position": 3, "seed": 1})
    assert dm.state_dict()["next_position"] == 3
