"""Small pieces that put a logit cache into the training loops most users already have.

    TeacherDataset(dataset, cache, ids=...)   a map-style dataset with the teacher side of each item
    TeacherCollator(cache, collator)          Hugging Face: adds the teacher side of a batch by sample id
    KDTrainer(..., temperature=4, alpha=0.9)  Hugging Face `Trainer` whose loss is KD from that batch

Every lookup goes through `Cache.targets`, so a sample id that is not in the cache is a one-line
`KDError` naming it, and every read is checked as `kd distill` checks it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from pipeline.cache import Cache
from pipeline.errors import KDError

TEACHER_KEY = "teacher_logits"  # the batch entry the collator adds and KDTrainer takes
ID_KEY = "kd_id"  # the feature naming each example's sample id in the cache


class TeacherDataset(torch.utils.data.Dataset):
    """`dataset[i]` with the teacher side of sample `ids[i]` (default: i): a tuple item gets it
    appended, a dict item gets it under "teacher_logits". Checked on creation: every id is cached."""

    def __init__(self, dataset: Any, cache: Cache, ids: Sequence[int] | torch.Tensor | None = None) -> None:
        self.dataset, self.cache = dataset, _a_cache(cache, "TeacherDataset")
        self.ids = torch.arange(len(dataset)) if ids is None else torch.as_tensor(ids, dtype=torch.int64)
        if len(self.ids) != len(dataset):
            raise KDError(f"TeacherDataset: {len(self.ids)} ids for a dataset of {len(dataset)} items")
        cache.check(ids=self.ids)  # every id cached; the cache is read here, before workers fork
        self.cache.targets(self.ids[:1])

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        teacher = _first(self.cache.targets(self.ids[index : index + 1]))
        if isinstance(item, Mapping):
            return {**item, TEACHER_KEY: teacher}
        if isinstance(item, tuple | list):
            return (*item, teacher)
        return item, teacher


class TeacherCollator:
    """A Hugging Face data collator: takes each feature's sample id (`kd_id`), collates the rest with
    `collator` (default: transformers' default_data_collator), and adds the batch's teacher side under
    "teacher_logits": (B, C) float32 logits, or a SparseTargets for a sparse language-model cache.
    With `teacher=False` it only drops the ids: KDTrainer collates its evaluation batches so (the cache
    holds the training split, where an evaluation row number would name another sample)."""

    def __init__(
        self,
        cache: Cache,
        collator: Callable[[list[dict[str, Any]]], Any] | None = None,
        *,
        teacher: bool = True,
    ) -> None:
        if collator is None:
            from transformers import default_data_collator

            collator = default_data_collator
        self.cache, self.collator, self.teacher = _a_cache(cache, "TeacherCollator"), collator, teacher

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        if self.teacher and any(ID_KEY not in f for f in features):
            raise KDError(
                f"TeacherCollator: each example needs its sample id in a '{ID_KEY}' column "
                f"(dataset.add_column('{ID_KEY}', ids)); with KDTrainer it is kept for the collator"
            )
        batch = dict(self.collator([{k: v for k, v in f.items() if k != ID_KEY} for f in features]))
        if self.teacher:  # the ids as given: a float, bool or list id is refused there, never cut
            batch[TEACHER_KEY] = self.cache.targets([f[ID_KEY] for f in features])
        return batch

    def without_teacher(self) -> TeacherCollator:
        """The same collation, with no teacher side (for evaluation)."""
        return TeacherCollator(self.cache, self.collator, teacher=False)


def _a_cache(cache: Any, who: str) -> Cache:
    if not isinstance(cache, Cache):
        raise KDError(
            f"{who}: expected a Cache, not {type(cache).__name__} {cache!r}: open it first "
            "(cache = pipeline.open_cache(location))"
        )
    return cache


def _first(targets: Any) -> Any:
    """Row 0 of a layout's targets, without its batch axis."""
    if isinstance(targets, torch.Tensor):
        return targets[0]
    return type(targets)(**{k: _row0(v) for k, v in vars(targets).items()})


def _row0(value: Any) -> Any:
    return value[0] if isinstance(value, torch.Tensor) else value


def kd_trainer_class() -> type:
    """KDTrainer, built on first use (transformers is imported only then)."""
    from transformers import Trainer

    from pipeline.distill.losses import IGNORE, check_settings, hinton_kd
    from pipeline.distill.targets import SparseTargets

    class KDTrainer(Trainer):
        """`transformers.Trainer` whose loss is Hinton KD from the cached teacher side that
        TeacherCollator adds: (1 - alpha) * CE + alpha * T^2 * KL, per example for sequence
        classification, per real token for a causal LM from a sparse cache (`sparse_target`:
        topk-tail, topk or sampled). The `kd_id` column is kept for the collator."""

        def __init__(
            self,
            *args: Any,
            temperature: float = 4.0,
            alpha: float = 0.9,
            sparse_target: str = "topk-tail",
            **kwargs: Any,
        ) -> None:
            from pipeline.distill.targets import SPARSE_TARGETS

            check_settings(temperature=temperature, alpha=alpha, loss="KDTrainer")
            if sparse_target not in SPARSE_TARGETS:
                known = ", ".join(SPARSE_TARGETS)
                raise KDError(f"KDTrainer: sparse_target must be one of {known}, not {sparse_target!r}")
            super().__init__(*args, **kwargs)
            self.temperature, self.alpha, self.sparse_target = temperature, alpha, sparse_target

        def get_eval_dataloader(self, eval_dataset: Any = None) -> Any:
            return self._without_teacher(super().get_eval_dataloader, eval_dataset)

        def get_test_dataloader(self, test_dataset: Any) -> Any:
            return self._without_teacher(super().get_test_dataloader, test_dataset)

        def _without_teacher(self, make: Callable[[Any], Any], dataset: Any) -> Any:
            """Evaluation batches carry no teacher side: the cache holds the training split, and a row
            number of the evaluation set would name another sample in it."""
            collator = self.data_collator
            if isinstance(collator, TeacherCollator):
                self.data_collator = collator.without_teacher()
            try:
                return make(dataset)
            finally:
                self.data_collator = collator

        def _set_signature_columns_if_needed(self) -> None:
            super()._set_signature_columns_if_needed()
            if ID_KEY not in self._signature_columns:
                self._signature_columns.append(ID_KEY)

        def compute_loss(
            self,
            model: torch.nn.Module,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            if TEACHER_KEY not in inputs:
                if not model.training:  # evaluation: the model's own loss (CE) on the evaluation set
                    outputs = model(**inputs)
                    return (outputs.loss, outputs) if return_outputs else outputs.loss
                raise KDError(
                    "KDTrainer: the batch has no teacher side: pass data_collator=TeacherCollator(cache)"
                )
            inputs = dict(inputs)
            teacher, labels = inputs.pop(TEACHER_KEY), inputs.pop("labels")
            outputs = model(**inputs)
            logits = outputs.logits
            if isinstance(teacher, SparseTargets):  # a causal LM: position i predicts token i + 1
                next_tokens = labels[:, 1:]
                if "attention_mask" in inputs:
                    next_tokens = next_tokens.masked_fill(inputs["attention_mask"][:, 1:] == 0, IGNORE)
                logits, teacher, labels = logits[:, :-1], _shifted(teacher, logits.device), next_tokens
            else:
                teacher = teacher.to(logits.device)
            settings = {"temperature": self.temperature, "alpha": self.alpha, "target": self.sparse_target}
            loss = hinton_kd(logits, teacher, labels, **settings)
            return (loss, outputs) if return_outputs else loss

    return KDTrainer


def _shifted(teacher: Any, device: torch.device) -> Any:
    """A sequence's cached targets for positions 0..L-2 (those of an HF causal LM's shifted logits)."""
    from pipeline.distill.targets import SparseTargets

    def cut(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[:, :-1].to(device)

    return SparseTargets(
        cut(teacher.values), cut(teacher.ids), cut(teacher.lse), teacher.temperatures, teacher.vocab,
        cut(teacher.sampled_ids), cut(teacher.sampled_logits),
    )  # fmt: skip


def __getattr__(name: str) -> Any:
    if name == "KDTrainer":
        value = kd_trainer_class()
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
