"""Train a teacher with plain cross-entropy, for users who have none yet (and the embedded demo).

    kd train-teacher --preset mnist1d            # = make teacher; skipped when the checkpoint exists

Writes data/teachers/<teacher.name>/{model.safetensors, config.json}; the best validation epoch is kept
(the validation rows are carved from train exactly as in `kd distill`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from rich.console import Console

from pipeline.config import Paths, Preset
from pipeline.data.augment import AugmentSpec, check_augment
from pipeline.data.datasets import Split, load_split, tokenizer_of, validation_rows
from pipeline.data.readers import rows_of
from pipeline.discovery import existing_caches
from pipeline.distill.batches import InMemoryBatches, Views
from pipeline.distill.lm import SequenceBatches
from pipeline.distill.losses import cross_entropy
from pipeline.errors import KDError
from pipeline.models import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    architecture_record,
    build_model,
    check_fits_data,
    check_same_teacher,
    checkpoint_architecture,
    save_checkpoint,
)
from pipeline.training.loop import SEQUENCES, accuracy, fit, pick_device, predict, seed_everything

console = Console(stderr=True, soft_wrap=True)


def run(preset: Preset, paths: Paths, *, force: bool = False, device_name: str = "auto") -> Path:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every process would train and save the same teacher
        raise KDError(
            "kd train-teacher runs in one process: run it without torchrun (make teacher), then "
            "teacher-logits and distill under torchrun (make distill NPROC=N)"
        )
    folder = paths.teachers / preset.teacher.name
    if (folder / WEIGHTS_FILE).is_file() and (folder / CONFIG_FILE).is_file() and not force:
        check_same_teacher(checkpoint_architecture(folder), preset, str(folder))
        console.print(f"teacher checkpoint exists: {folder} (pass --force to retrain)")
        return folder
    generator = seed_everything(preset.teacher.seed)  # before the data, as always: same teacher bytes
    train, test = load_split(preset.dataset, "train"), load_split(preset.dataset, "test")
    if not force:
        found = existing_caches(preset, paths, {"train": train, "test": test})
        if found is not None:
            console.print(
                f"not training teacher '{preset.teacher.name}': complete caches of its logits for this data "
                f"exist ({', '.join(found.values())}); pass --force to train it anyway",
                highlight=False,
            )
            return folder

    cfg, device = preset.teacher, pick_device(device_name)
    if train.task == "sequence":  # token sequences: a causal language model
        return _train_lm(preset, folder, train, test, device, generator)
    check_augment(cfg.train.augment, train.view_source)
    train_rows, val_rows = validation_rows(len(train), preset.dataset.val_size, preset.dataset.seed)
    model = build_model(cfg.model, train.num_classes, train.input_shape)
    check_fits_data(model, train, "teacher", cfg.model.arch)
    fresh = Views(AugmentSpec(cfg.train.augment, cfg.train.augment_pad))  # drawn from the data generator
    batches = InMemoryBatches(train, train_rows, None, cfg.train.batch_size, device, fresh)

    console.print(
        f"training teacher '{cfg.name}' ({cfg.model.arch}) on {train.dataset} for "
        f"{cfg.train.epochs} epochs on {device}"
    )
    if train.reading:
        console.print(train.reading, highlight=False)
    result = fit(
        model,
        cfg.train,
        batches=lambda epoch: batches.epoch(generator),
        loss_at=lambda epoch: cross_entropy,
        val=(rows_of(train.inputs, val_rows), train.labels[val_rows]),
        test=(test.inputs, test.labels),
        device=device,
        desc="teacher",
    )
    train_acc = accuracy(predict(model, rows_of(train.inputs, train_rows), device), train.labels[train_rows])
    info = {
        "name": cfg.name,
        "dataset": {
            "name": train.dataset,
            "train_fingerprint": train.fingerprint,
            "val_size": preset.dataset.val_size,
        },
        "train_accuracy": train_acc,
        "val_accuracy": result.best_val_accuracy,
        "test_accuracy": result.test_accuracy,
        "best_epoch": result.best_epoch,
        "training": preset.to_dict()["teacher"],
    }
    save_checkpoint(folder, model, architecture_record(cfg.model, train.num_classes, train.input_shape), info)
    console.print(
        f"teacher saved to {folder}: train {train_acc:.2%}, val {result.best_val_accuracy:.2%}, "
        f"test {result.test_accuracy:.2%} (best epoch {result.best_epoch}, {result.seconds:.0f}s)"
    )
    return folder


def _train_lm(
    preset: Preset, folder: Path, train: Split, test: Split, device: torch.device, generator: torch.Generator
) -> Path:
    """A causal language model trained on next tokens; its tokenizer is saved beside it (tokenizer.json):
    students share it."""
    cfg = preset.teacher
    train_rows, val_rows = validation_rows(len(train), preset.dataset.val_size, preset.dataset.seed)
    model = build_model(cfg.model, train.num_classes, train.input_shape)
    check_fits_data(model, train, "teacher", cfg.model.arch)
    model.to(device)
    console.print(
        f"training teacher '{cfg.name}' ({cfg.model.arch}, {sum(p.numel() for p in model.parameters()):,} "
        f"parameters) on {train.dataset} ({len(train_rows)} sequences of {train.input_shape[0]} tokens) for "
        f"{cfg.train.epochs} epochs on {device}",
        highlight=False,
    )

    batches = SequenceBatches(train, train_rows, cfg.train.batch_size, device)
    result = fit(
        model, cfg.train, batches=lambda epoch: batches.epoch(generator),
        loss_at=lambda epoch: cross_entropy, val=(rows_of(train.inputs, val_rows), train.labels[val_rows]),
        test=(test.inputs, test.labels), device=device, task=SEQUENCES, desc="teacher",
    )  # fmt: skip
    info = {
        "name": cfg.name,
        "dataset": {
            "name": train.dataset,
            "train_fingerprint": train.fingerprint,
            "val_size": preset.dataset.val_size,
        },
        "val_perplexity": result.best_val_perplexity,
        "test_perplexity": result.test_perplexity,
        "test_token_accuracy": result.test_token_accuracy,
        "best_epoch": result.best_epoch,
        "tokenizer_fingerprint": train.preprocessing.get("tokenizer_fingerprint"),
        "training": preset.to_dict()["teacher"],
    }
    save_checkpoint(folder, model, architecture_record(cfg.model, train.num_classes, train.input_shape), info)
    tokenizer_of(preset.dataset).save(str(folder / "tokenizer.json"))  # students share the teacher's
    console.print(
        f"teacher saved to {folder}: val perplexity {result.best_val_perplexity:.2f}, test perplexity "
        f"{result.test_perplexity:.2f} (token accuracy {result.test_token_accuracy:.2%}, best epoch "
        f"{result.best_epoch}, {result.seconds:.0f}s)",
        highlight=False,
    )
    return folder
