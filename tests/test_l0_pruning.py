"""L0 structured pruning: configuration, gate math, a real fit, exact physical removal, export, resume, stacking."""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import FAMILY_SPECS, ROOT
from helpers import StopAt, make_cli, model_state, tiny_config
from torch.utils._python_dispatch import TorchDispatchMode

from framework.data.tasks import make_task
from framework.export import export_model
from framework.models import load_vlm
from framework.module import model_inputs
from framework.plugin import PluginConflictError, check_plugins
from framework.processing import VLMProcessor, family_for
from framework.selection import ModuleSelection
from plugins.channel_ablation import ChannelAblation
from plugins.l0_pruning import (
    L0Pruning,
    grouped_head_mask,
    hard_concrete_keep_prob,
    hard_concrete_sample,
    hard_topk,
    hardtanh_ste,
    pruned_spec,
    soft_topk,
)
from plugins.l0_pruning.gates import KINDS
from plugins.l0_pruning.spec import shape_for_spec
from plugins.l0_pruning.surgery import MASKS_ATTR

ALL_KINDS_SHAPE = {"num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                   "intermediate_size": 24, "hidden_size": 16}


# ----------------------------------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_fraction": 1.0}, r"L0Pruning.target_fraction: must be in \(0, 1\)"),
        ({"target_fraction": 0.0}, r"L0Pruning.target_fraction: must be in \(0, 1\)"),
        ({}, "give exactly one of them"),
        ({"target_fraction": 0.5, "target_shape": {"hidden_size": 16}}, "give exactly one of them"),
        ({"target_fraction": 0.5, "method": "fancy"}, r"L0Pruning.method: must be one of \['plain', 'improved'\]"),
        ({"target_fraction": 0.5, "mask_scale": 0.0}, r"L0Pruning.mask_scale: must be > 0"),
        ({"target_fraction": 0.5, "mask_scale": -1e-3}, r"L0Pruning.mask_scale: must be > 0"),
        ({"target_fraction": 0.5, "hard_from": 1.0}, r"L0Pruning.hard_from: must be in \[0, 1\)"),
        ({"target_fraction": 0.5, "ranking_noise": 1.5}, r"L0Pruning.ranking_noise: must be in \[0, 1\)"),
        ({"target_fraction": 0.5, "alternate_every": -2}, "L0Pruning.alternate_every: must be >= 0"),
        ({"target_fraction": 0.5, "tau": 0.0}, "L0Pruning.tau: must be > 0"),
        ({"target_fraction": 0.5, "target_warmup": 2.0}, r"L0Pruning.target_warmup: must be in \[0, 1\]"),
        ({"target_fraction": 0.5, "method": "plain", "soft_topk": True}, "L0Pruning.soft_topk: only applies to method: improved"),
        ({"target_fraction": 0.5, "prune_heads": False, "prune_mlp": False, "prune_hidden": False,
          "prune_layers": False}, "switch at least one on"),
    ],
)
def test_misconfiguration_fails_in_init(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        L0Pruning(**kwargs)


@pytest.mark.parametrize(
    ("family", "kwargs", "message"),
    [
        ("llava", {"target_shape": {"intermediate_size": 128}}, r"target_shape.intermediate_size: must be an integer in \[1, 64\]"),
        ("llava", {"target_shape": {"num_attention_heads": 3, "num_key_value_heads": 2}}, "not a valid grouped-query shape"),
        ("llava", {"target_shape": {"num_attention_heads": 3}}, "give num_key_value_heads too"),
        ("llava", {"target_shape": {"hidden_size": 16}, "prune_hidden": False}, "needs prune_hidden: true"),
        ("llava", {"target_shape": {"vocab_size": 16}}, "unknown keys"),
        ("llava", {"target_shape": {"hidden_size": 30}}, "hidden_size: must be a multiple of num_attention_heads=4"),
        ("llava", {"target_fraction": 0.5, "targets": ModuleSelection(include="no_such_module")}, "matched no module"),
        ("llava", {"target_fraction": 0.5, "targets": ModuleSelection(include=r"language_model\.layers\.0$",
                                                                      types=["GradientCheckpointingLayer"])},
         "must select every decoder layer"),
        ("qwen2_vl", {"target_fraction": 0.5, "prune_hidden": False}, "heads and hidden dims are pruned together"),
        ("qwen2_vl", {"target_shape": {"num_attention_heads": 2, "num_key_value_heads": 1, "hidden_size": 24}},
         "hidden_size must be num_attention_heads x 8 = 16"),
    ],
)
def test_model_dependent_misconfiguration_fails_in_transform(family: str, kwargs: dict, message: str) -> None:
    model = load_vlm(str(FAMILY_SPECS[family])).model
    with pytest.raises(ValueError, match=message):
        L0Pruning(**kwargs).transform(model)


# ----------------------------------------------------------------------------------------------- gate math
def test_hard_concrete_expected_l0_matches_hand_computation() -> None:
    log_alpha = torch.tensor([0.0, 2.0, -3.0])
    # P(z != 0) = sigmoid(log_alpha - beta * log(-a / b)) with a=-0.1, b=1.1, beta=2/3.
    hand = [1 / (1 + math.exp(-(la - 2 / 3 * math.log(0.1 / 1.1)))) for la in (0.0, 2.0, -3.0)]
    torch.testing.assert_close(hard_concrete_keep_prob(log_alpha), torch.tensor(hand))
    assert hand[0] == pytest.approx(0.8318, abs=1e-4)
    # u = 1/2 gives the stretched sigmoid of log_alpha / beta, clamped: 0.5 * 1.2 - 0.1 = 0.5 at log_alpha 0.
    assert hard_concrete_sample(torch.tensor(0.0), torch.tensor(0.5)).item() == pytest.approx(0.5)
    u = torch.rand(200_000, generator=torch.Generator().manual_seed(0)).clamp(1e-6, 1 - 1e-6)
    z = hard_concrete_sample(torch.full_like(u, 2.0), u)
    assert (z > 0).float().mean().item() == pytest.approx(hand[1], abs=0.005)
    assert ((z > 0) & (z < 1)).any() and (z == 1).any() and (z == 0).any()


def test_soft_topk_anneals_to_exactly_k_ones() -> None:
    scores = torch.randn(5, 40, generator=torch.Generator().manual_seed(1), requires_grad=True)
    for k in (0, 1, 13, 40):
        for tau in (0.0, 1e-7):
            mask = soft_topk(scores, k, tau)
            assert torch.equal(mask.sum(-1), torch.full((5,), float(k)))
            assert set(mask.unique().tolist()) <= {0.0, 1.0}
    soft = soft_topk(scores, 13, 0.5)
    assert ((soft > 0) & (soft < 1)).all()
    soft.sum().backward()
    assert scores.grad.abs().sum() > 0
    tied = torch.ones(2, 6)
    assert torch.equal(hard_topk(tied, 2), torch.tensor([[1.0, 1, 0, 0, 0, 0]] * 2)), "ties go to the lower index"


def test_grouped_head_mask_is_valid_gqa() -> None:
    scores = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    mask = grouped_head_mask(scores, heads=4, kv_heads=2, group=2)  # 4 KV groups of 2 -> keep 2 whole groups
    groups = mask.view(3, 4, 2)
    assert torch.equal(mask.sum(-1), torch.full((3,), 4.0))
    assert torch.equal(groups.sum(-1).sort(-1).values, torch.tensor([[0.0, 0, 2, 2]] * 3))
    mask = grouped_head_mask(scores, heads=4, kv_heads=4, group=2)  # every group keeps its best head
    assert torch.equal(mask.view(3, 4, 2).sum(-1), torch.ones(3, 4))


def test_hardtanh_ste_clips_forward_and_passes_gradient() -> None:
    x = torch.tensor([-0.5, 0.25, 1.5], requires_grad=True)
    y = hardtanh_ste(x)
    assert torch.equal(y, torch.tensor([0.0, 0.25, 1.0]))
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 2.0, 3.0])), "straight through, also where clipped"


# ----------------------------------------------------------------------------------------------- removal and export
def _batch(loaded: object) -> dict:
    processor = VLMProcessor(family_for(loaded.model.config, loaded.tokenizer, loaded.image_processor), 512)
    return processor.encode([make_task("caption", image_size=64)[0], make_task("autofill", image_size=64)[0]])


@pytest.mark.parametrize("family", sorted(FAMILY_SPECS))
def test_physical_removal_is_exact_and_exports(tmp_path: Path, family: str) -> None:
    """Heads, MLP channels, hidden dims and layers pruned: the smaller HF model gives the masked model's logits."""
    from transformers import AutoModelForImageTextToText

    loaded = load_vlm(str(FAMILY_SPECS[family]))
    model = loaded.model.eval()
    plugin = L0Pruning(target_shape=ALL_KINDS_SHAPE, seed=3)
    plugin.transform(model)
    plugin.transform(model)  # idempotent: no second set of masks or hooks
    masks = getattr(model, MASKS_ATTR)
    o_proj = model.model.language_model.layers[0].self_attn.o_proj
    assert len(o_proj._forward_pre_hooks) == 1 and len(o_proj._forward_hooks) == 1
    with torch.no_grad():  # random scores, so the kept units are not simply the first ones
        for kind in plugin.kinds:
            getattr(masks, kind).uniform_(0, masks.config.mask_scale, generator=torch.Generator().manual_seed(4))
    batch = _batch(loaded)
    with torch.no_grad():
        masked = model(**batch).logits
        hard = masks.hard_masks()
        assert masks.expected_params(hard).item() == plugin.summary(model)["text_params_after"]
    out = export_model(model, loaded.tokenizer, loaded.image_processor, tmp_path / "export", [plugin])
    assert hasattr(model, MASKS_ATTR), "export works on a copy"
    exported = AutoModelForImageTextToText.from_pretrained(out).eval()
    text = exported.config.text_config
    assert (text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads, text.intermediate_size,
            text.hidden_size, text.head_dim) == (1, 2, 1, 24, 16, 8)
    assert not any(MASKS_ATTR in k for k in exported.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(exported(**batch).logits, masked, rtol=1e-4, atol=1e-4)
    summary = json.loads((out / "vlmc_export.json").read_text())["plugins"]["l0_pruning"]["summary"]
    assert summary["params_after"] == sum(p.numel() for p in exported.parameters())
    artifact = json.loads((out / "l0_pruning.json").read_text())
    assert artifact["kept_shape"]["hidden_size"] == 16 and artifact["text_params_after"] < artifact["text_params_before"]
    inputs = {k: v for k, v in model_inputs(batch).items() if k != "labels"}
    generated = exported.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == batch["input_ids"].shape[1] + 3, "the cache works with renumbered layers"


def test_pruned_spec_builds_the_pruned_shape() -> None:
    spec = pruned_spec(FAMILY_SPECS["qwen2_vl"], {"num_attention_heads": 2, "num_key_value_heads": 1, "hidden_size": 16})
    assert spec["hf_config"]["text_config"]["hidden_size"] == 16 and spec["hf_config"]["vision_config"]["hidden_size"] == 16
    shipped = json.loads((FAMILY_SPECS["llava"].parent / "llava-base-gpu-l0-50.json").read_text())
    assert shipped["hf_config"]["text_config"]["num_hidden_layers"] < 12


@pytest.mark.parametrize(("spec", "kinds", "trained"), [
    ("llava-base-gpu-l0-50.json", KINDS, "gpu_h200x2_run19/exports/l0_50_improved_3000steps.json"),
    ("llava-base-gpu-l0-50-keep-layers.json", ("heads", "mlp", "hidden"),
     "gpu_h200x2_run19/exports/l0_50_improved_keep_layers.json"),
])
def test_shipped_pruned_specs_are_the_shapes_the_gpu_runs_reached(spec: str, kinds: tuple[str, ...],
                                                                  trained: str) -> None:
    # The from-scratch baselines and the latency tables use these specs: each is the exact target shape of its
    # L0 setting, which is also the shape the GPU run's export has.
    models = FAMILY_SPECS["llava"].parent
    shape = shape_for_spec(models / "llava-base-gpu.json", 0.5, kinds, multiple_of=8)
    text = json.loads((models / spec).read_text())["hf_config"]["text_config"]
    assert {k: text[k] for k in shape} == shape
    kept = json.loads((ROOT / "experiments" / "results" / "sparsity" / trained).read_text())["kept_shape"]
    assert kept == shape


# ----------------------------------------------------------------------------------------------- training
def _l0(**init_args: object) -> dict:
    return {"class_path": "plugins.l0_pruning.L0Pruning", "init_args": init_args}


def test_fit_reaches_the_exact_target(tmp_path: Path) -> None:
    callbacks = [_l0(target_fraction=0.5, method="improved", alternate_every=2, hard_from=0.25, target_warmup=0.4)]
    cli = make_cli(tiny_config(tmp_path, max_steps=12, callbacks=callbacks, limit_val_batches=0))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    plugin = next(c for c in cli.trainer.callbacks if isinstance(c, L0Pruning))
    metrics = cli.trainer.callback_metrics
    summary = plugin.summary(cli.model.model)
    assert metrics["compression/l0_pruning/stage"] == 2.0  # hard stage at the end
    assert metrics["compression/l0_pruning/fractional_gates"] == 0.0
    assert metrics["compression/l0_pruning/expected_params"] == summary["text_params_after"]
    assert metrics["compression/l0_pruning/target_params"] == summary["text_params_after"]
    assert summary["removed_fraction"] == pytest.approx(0.5, abs=0.01)
    masks = getattr(cli.model.model, MASKS_ATTR)
    hard = masks.hard_masks()
    assert hard["mlp"][0].sum() == summary["kept_intermediate_size"] and hard["hidden"].sum() == summary["kept_hidden_size"]
    assert masks.expected_params(hard).item() == summary["text_params_after"]
    assert any(k.startswith(f"model.{MASKS_ATTR}.") for k in torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["state_dict"])


def test_plain_lagrangian_moves_the_expected_size_to_the_target(tmp_path: Path) -> None:
    callbacks = [_l0(target_fraction=0.5, method="plain", lagrangian_lr=0.5, mask_lr=0.2, target_warmup=0.0)]
    cli = make_cli(tiny_config(tmp_path, max_steps=10, callbacks=callbacks, limit_val_batches=0))
    plugin = cli.trainer.callbacks[[isinstance(c, L0Pruning) for c in cli.trainer.callbacks].index(True)]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    masks = getattr(cli.model.model, MASKS_ATTR)
    masks.train()
    target = plugin.summary(cli.model.model)["text_params_after"]
    start = float(masks.param_count({k: hard_concrete_keep_prob(torch.zeros_like(getattr(masks, k)))
                                     for k in plugin.kinds}))
    end = float(cli.trainer.callback_metrics["compression/l0_pruning/expected_params"])
    assert abs(end - target) < 0.5 * abs(start - target)
    assert cli.trainer.callback_metrics["compression/l0_pruning/lambda1"] != 0


def test_fused_adamw_trains_the_multipliers_like_foreach(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """L0's parameter groups (mask learning rate, Lagrange multipliers maximised, no schedule) under the fused
    AdamW that CUDA runs, against the foreach one: the same fit. Forced on here: CPU has a fused AdamW too."""
    from framework.module import VLMModule

    callbacks = [_l0(target_fraction=0.5, method="plain", lagrangian_lr=0.5, mask_lr=0.2, target_warmup=0.0)]
    final = {}
    for fused in (False, True):
        monkeypatch.setattr(VLMModule, "_fused_optimizer", lambda self, fused=fused: fused)
        (tmp_path / str(fused)).mkdir()
        cli = make_cli(tiny_config(tmp_path / str(fused), max_steps=6, callbacks=callbacks, limit_val_batches=0))
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        optimizer = cli.trainer.optimizers[0]
        assert optimizer.defaults["fused"] is fused and any(g.get("maximize") for g in optimizer.param_groups)
        final[fused] = model_state(cli.model)
    assert any("lambda" in k for k in final[True])
    for key, value in final[False].items():
        torch.testing.assert_close(final[True][key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    callbacks = [_l0(target_fraction=0.5, alternate_every=2, hard_from=0.25, target_warmup=0.5, seed=1)]
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    straight_dir.mkdir()
    resumed_dir.mkdir()
    kwargs = {"max_steps": 8, "callbacks": callbacks, "limit_val_batches": 0}
    straight = make_cli(tiny_config(straight_dir, **kwargs))
    straight.trainer.fit(straight.model, datamodule=straight.datamodule)

    interrupted = make_cli(tiny_config(resumed_dir, **kwargs))
    interrupted.trainer.callbacks.append(StopAt(4))
    interrupted.trainer.fit(interrupted.model, datamodule=interrupted.datamodule)
    checkpoint = resumed_dir / "ckpt" / "epoch=0-step=4.ckpt"
    state = torch.load(checkpoint, weights_only=True)["callbacks"]["L0Pruning[l0_pruning]"]
    assert state["step"] == 3 and state["method"] == "improved"

    resumed = make_cli(tiny_config(resumed_dir, **kwargs))
    resumed.trainer.fit(resumed.model, datamodule=resumed.datamodule, ckpt_path=str(checkpoint))
    want, got = model_state(straight.model), model_state(resumed.model)
    assert want.keys() == got.keys() and any(k.startswith(MASKS_ATTR) for k in got)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)
    hard = [getattr(cli.model.model, MASKS_ATTR).hard_masks() for cli in (straight, resumed)]
    assert all(torch.equal(hard[0][k], hard[1][k]) for k in hard[0])


# ----------------------------------------------------------------------------------------------- stacking
def test_stacks_with_disjoint_plugins_and_refuses_overlap() -> None:
    model = load_vlm(str(FAMILY_SPECS["llava"])).model
    l0 = L0Pruning(target_fraction=0.5)
    vision = ChannelAblation(name="vision", targets=ModuleSelection(include="vision_tower"))
    text = ChannelAblation(name="text", targets=ModuleSelection(include=r"language_model.*mlp"))
    for plugin in (l0, vision, text):
        plugin.transform(model)
    check_plugins([l0, vision], model)
    with pytest.raises(PluginConflictError, match="both rewrite .*mlp"):
        check_plugins([l0, text], model)
    with pytest.raises(PluginConflictError, match="one L0Pruning per model"):
        check_plugins([l0, L0Pruning(target_fraction=0.3, name="other")], model)
    # Without hidden-dim pruning the embeddings and the LM head stay free for other plugins.
    heads_only = L0Pruning(target_fraction=0.5, prune_hidden=False, prune_mlp=False, prune_layers=False)
    heads_only.transform(load_vlm(str(FAMILY_SPECS["llava"])).model)
    assert not any("embed_tokens" in n or "lm_head" in n for n in heads_only.claims(model))



@pytest.mark.parametrize("method", ["plain", "improved"])
def test_model_copies_after_a_training_forward(method: str) -> None:
    # Export and half-precision decoding deep-copy the model right after training steps.
    model = load_vlm(str(FAMILY_SPECS["llava"])).model
    L0Pruning(target_fraction=0.5, method=method).transform(model)
    model.train()
    ids = torch.randint(3, 100, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    copied = copy.deepcopy(model).eval()
    assert copied(input_ids=ids).logits.shape == (2, 8, model.config.get_text_config().vocab_size)
    copied = copy.deepcopy(model).eval()  # generate embeds the prompt before the model's own forward runs
    assert copied.generate(input_ids=ids, max_new_tokens=2, do_sample=False).shape == (2, 10)


def test_multipliers_are_vectors_and_old_scalar_checkpoints_load() -> None:
    # FSDP refuses 0-dim parameters; checkpoints from when the multipliers were scalars still load.
    model = load_vlm(str(FAMILY_SPECS["llava"])).model
    L0Pruning(target_fraction=0.5).transform(model)
    masks = getattr(model, MASKS_ATTR)
    assert masks.lambda1.shape == masks.lambda2.shape == (1,)
    old = {**masks.state_dict(), "lambda1": torch.tensor(0.25), "lambda2": torch.tensor(0.25)}
    masks.load_state_dict(old)
    assert masks.lambda1.tolist() == masks.lambda2.tolist() == [0.25]
    loss = masks.lagrangian(torch.tensor(2.0), 1.0, 1.0)
    assert loss.shape == () and float(loss) == 0.25 * 1 + 0.25 * 1


def test_fraction_shapes_keep_hidden_a_multiple_of_heads(tmp_path: Path) -> None:
    from plugins.l0_pruning.spec import main as spec_main

    # 50% of the GPU base at multiple_of 1 once gave hidden 405 with 6 heads, a config transformers refuses.
    out = tmp_path / "pruned.json"
    spec_main(["--base", str(ROOT / "experiments/models/llava-base-gpu.json"), "--fraction", "0.5", "--out", str(out)])
    text = json.loads(out.read_text())["hf_config"]["text_config"]
    assert text["hidden_size"] % text["num_attention_heads"] == 0
    assert load_vlm(str(out)).model.config.text_config.hidden_size == text["hidden_size"]  # builds


def test_model_pre_hook_places_every_layer_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-layer hooks pick their mask row with a tensor index, which the model's (eager) pre-hook keeps on the
    masks' device, so a compiled block never creates one; a deep copy keeps the wiring to its own hooks."""
    from plugins.l0_pruning.surgery import _Refresh

    loaded = load_vlm(str(FAMILY_SPECS["llava"]))
    model = loaded.model.eval()
    L0Pruning(target_shape=ALL_KINDS_SHAPE, seed=3).transform(model)

    def wiring(m: torch.nn.Module) -> tuple[_Refresh, set[int]]:
        refresh = next(h for h in m._forward_pre_hooks.values() if isinstance(h, _Refresh))
        indexed = {id(h) for module in m.modules()
                   for h in (*module._forward_hooks.values(), *module._forward_pre_hooks.values())
                   if getattr(h, "_index", None) is not None}
        return refresh, indexed

    refresh, indexed = wiring(model)
    assert indexed and {id(h) for h in refresh.layer_hooks} == indexed
    layers = model.model.language_model.layers
    assert [int(h._index) for h in refresh.layer_hooks if h.kind == "heads"] == list(range(len(layers)))
    copied = copy.deepcopy(model)
    copied_refresh, copied_indexed = wiring(copied)
    assert {id(h) for h in copied_refresh.layer_hooks} == copied_indexed and not copied_indexed & indexed
    # Every layer hook is placed by the model's pre-hook before the first block reads a mask row.
    from plugins.l0_pruning import surgery

    events = []
    place, row = surgery._Hook.place, surgery._Hook.row
    monkeypatch.setattr(surgery._Hook, "place", lambda self, device: events.append(("place", id(self))) or place(
        self, device))
    monkeypatch.setattr(surgery._Hook, "row", lambda self, mask: events.append(("row", id(self))) or row(self, mask))
    with torch.no_grad():
        model(**_batch(loaded))
    first_row = next(i for i, (what, _) in enumerate(events) if what == "row")
    assert {hook for what, hook in events[:first_row] if what == "place"} == indexed


def _l0_step(model: torch.nn.Module, plugin: L0Pruning, ids: torch.Tensor) -> None:
    """One training forward and backward with the Lagrangian, as a fit runs it."""
    out = model(input_ids=ids, labels=ids, use_cache=False)
    loss = out.loss + sum(plugin.loss_terms(model, {}, out).values())
    loss.backward()


# Operators that wait for the device on a GPU: a value read back (``.item()``, ``if tensor``), or an output whose
# size depends on values (``nonzero``). Some read-backs happen on a GPU only (``torch.prod``'s
# backward checks for zeros there, not on a CPU): the GPU test below counts those.
_READ_BACK_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
                  torch.ops.aten.masked_select.default, torch.ops.aten._unique2.default,
                  torch.ops.aten.unique_consecutive.default, torch.ops.aten.unique_dim.default}


class _ReadBacks(TorchDispatchMode):
    """Counts operators that read a tensor's values back to the host (syncs on a GPU), forward and backward."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in _READ_BACK_OPS
        return func(*args, **(kwargs or {}))


class _ReadsInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad * float(grad.sum())


def test_read_back_count_sees_backward_and_value_dependent_shapes() -> None:
    x = torch.rand(3, 4, requires_grad=True)
    with _ReadBacks() as read_backs:
        _ReadsInBackward.apply(x).sum().backward()
    assert read_backs.count == 1
    with _ReadBacks() as read_backs:
        torch.nonzero(x > 0.5)
    assert read_backs.count >= 1


@pytest.mark.parametrize("method", ["plain", "improved"])
def test_training_step_adds_no_read_back(method: str) -> None:
    """The masks, their noise and the Lagrangian stay on the device: a step reads back what the bare model's does
    (transformers' own checks), nothing more."""
    counts = []
    for plugin in (None, L0Pruning(target_fraction=0.5, method=method)):
        model = load_vlm(str(FAMILY_SPECS["llava"])).model.train()
        if plugin is not None:
            plugin.transform(model)
            masks = getattr(model, MASKS_ATTR)
            masks.step, masks.total_steps = 1, 100
        ids = torch.randint(3, 100, (2, 8))
        for _ in range(2):  # the first call fills cached shape counts; the second one counts
            with _ReadBacks() as read_backs:
                if plugin is not None:
                    _l0_step(model, plugin, ids)
                else:
                    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        counts.append(read_backs.count)
    assert counts[1] == counts[0], counts


def _cuda_syncs(step: Any) -> int:
    """Synchronising CUDA calls made by ``step()``, counted through the sync debug mode's warnings."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["plain", "improved"])
def test_cuda_training_step_adds_no_synchronisation(method: str) -> None:
    """The gates' noise is drawn on the GPU, not copied there: an L0 step synchronises exactly as often as the bare
    model's step (transformers' own mask checks read values back, so the bare count need not be zero)."""
    ids = torch.randint(3, 100, (2, 8), device="cuda")
    bare = load_vlm(str(FAMILY_SPECS["llava"])).model.cuda().train()
    model = load_vlm(str(FAMILY_SPECS["llava"])).model.cuda().train()
    plugin = L0Pruning(target_fraction=0.5, method=method)
    plugin.transform(model)
    masks = getattr(model, MASKS_ATTR)
    masks.step, masks.total_steps = 1, 100

    def bare_step() -> None:
        bare(input_ids=ids, labels=ids, use_cache=False).loss.backward()

    bare_step()
    _l0_step(model, plugin, ids)  # first calls: cached shape counts, lazily built index tensors
    masks.step = 2
    assert _cuda_syncs(lambda: ids.sum().item()) == 1  # the count sees a read-back
    assert _cuda_syncs(lambda: _l0_step(model, plugin, ids)) == _cuda_syncs(bare_step)
