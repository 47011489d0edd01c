"""The ``vlmc`` command: LightningCLI verbs (fit, validate, test, predict) plus ``export`` and ``bench``.

``vlmc --help`` answers without importing torch; each verb imports what it needs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

LIGHTNING_VERBS = ("fit", "validate", "test", "predict")
PROJECT_VERBS = {
    "export": "write a trained model (and what plugins deploy) as an HF folder with safetensors",
    "bench": "print training throughput (steps/s, tokens/s, MFU on GPU) and generation speed for a config",
}
USAGE = """usage: vlmc [-h] {fit,validate,test,predict,export,bench} ...

Compress vision-language models for on-device use: stack compression plugins in a LightningCLI YAML.

verbs:
  fit        train a model (vlmc fit --config experiments/quickstart.yaml)
  validate   evaluate on the validation tasks
  test       evaluate on the test split
  predict    run the predict loop
  export     %(export)s
  bench      %(bench)s

Run `vlmc VERB --help` for a verb's options. W&B logs offline unless WANDB_MODE=online or an API key is set.
""" % PROJECT_VERBS


def wandb_offline() -> bool:
    """Log offline unless the user configured W&B (an API key, a netrc entry, or WANDB_MODE=online).

    ``WANDB_MODE=disabled`` gives ``False`` too: Lightning's logger would otherwise set the mode to offline and
    write a run folder; left alone, W&B reads ``disabled`` from the environment and writes nothing.
    """
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode == "disabled":
        return False
    if mode in ("offline", "dryrun"):
        return True
    if mode == "online" or os.environ.get("WANDB_API_KEY"):
        return False
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return not (netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"))


def _cli_class() -> Any:
    from framework.lightning_cli import VLMCLI  # imported here so that `vlmc --help` stays fast

    return VLMCLI


def trainer_defaults() -> dict[str, Any]:
    return {
        "logger": {
            "class_path": "lightning.pytorch.loggers.WandbLogger",
            "init_args": {"project": "vlmc", "save_dir": "runs", "offline": wandb_offline()},
        },
        "plugins": [{"class_path": "framework.io.AtomicCheckpointIO"}],
        "use_distributed_sampler": False,
    }


def build(args: list[str], *, run: bool, save_config: bool = True) -> Any:
    """Instantiate the CLI (``run=False`` builds model, data and trainer from a config without running).

    ``save_config=False``: no ``config.yaml`` in the run folder (measurements such as ``vlmc bench`` keep no run).
    """
    from framework.data import VLMDataModule
    from framework.module import VLMModule

    cli_class = _cli_class()
    return cli_class(
        VLMModule,
        VLMDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults=trainer_defaults(),
        save_config_callback=cli_class.config_saver if save_config else None,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "omegaconf"} if _has_omegaconf() else None,
        # LightningCLI warns when given the process's own argv as `args`; let it read sys.argv itself then.
        args=None if args == sys.argv[1:] else args,
        run=run,
        auto_configure_optimizers=False,
    )


def _has_omegaconf() -> bool:
    import importlib.util

    return importlib.util.find_spec("omegaconf") is not None


def _export(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="vlmc export", description=PROJECT_VERBS["export"])
    parser.add_argument("--config", action="append", required=True, help="the run's YAML config(s)")
    parser.add_argument("--ckpt_path", help="Lightning checkpoint to export (default: the untrained model)")
    parser.add_argument("--out", required=True, help="export folder")
    parser.add_argument("--overwrite", type=lambda s: s.lower() in ("1", "true", "yes"), default=False)
    opts, rest = parser.parse_known_args(argv)
    from framework.export import export_model
    from framework.io import load_checkpoint_weights
    from framework.plugin import check_plugins, find_plugins

    cli = build([a for c in opts.config for a in ("--config", c)] + rest, run=False)
    module, plugins = cli.model, find_plugins(cli.trainer)
    for plugin in plugins:
        plugin.transform(module.model)
    check_plugins(plugins, module.model)
    if opts.ckpt_path:
        weights = load_checkpoint_weights(opts.ckpt_path)
        missing, unexpected = module.load_state_dict(weights, strict=False)
        missing = [k for k in missing if not k.startswith(("val_metrics", "val_losses"))]
        if missing or unexpected:
            raise ValueError(
                f"ckpt_path: {opts.ckpt_path} does not match the config's model "
                f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
            )
    if any(plugin.export_needs_data for plugin in plugins):
        needing = ", ".join(type(p).__name__ for p in plugins if p.export_needs_data)
        print(f"export: {needing} finish on data first: running validation", flush=True)
        cli.trainer.validate(module, datamodule=cli.datamodule)
    out = export_model(module.model, module.tokenizer, module.image_processor, opts.out, plugins,
                       overwrite=opts.overwrite, extra={"checkpoint": opts.ckpt_path, "configs": opts.config})
    print(f"exported to {out}")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    verb = argv[0]
    if verb == "export":
        _export(argv[1:])
    elif verb == "bench":
        from framework.bench import main as bench_main

        bench_main(argv[1:])
    elif verb in LIGHTNING_VERBS:
        build(argv, run=True)
    else:
        print(USAGE, file=sys.stderr)
        raise SystemExit(f"vlmc: unknown verb {verb!r}; choose one of {', '.join(LIGHTNING_VERBS + tuple(PROJECT_VERBS))}")


if __name__ == "__main__":
    main()
