"""Transductive transfer: adapt a model trained on a labelled source dataset to an unlabelled target.

Each adaptation method is one run of the fine-tuning loop with an extra loss on a target batch drawn
beside every source batch. The backbone trains (`full`, `partial`) or stays frozen (`linear_probe`: the job's
`backbone: "frozen"`): then every domain's features come once from the feature cache, and a residual
feature adapter and the head train over them, so the alignment losses still have features to move and a
run costs seconds where a full pass of a transformer costs minutes. The target's labels, if the dataset has any, are never loaded for
training: only its inputs are. `source_only` (no extra loss) always runs as the reference; `seeds` repeats
every method, since adversarial training is unstable. The result of a run is its last epoch (the source's
validation accuracy says little about the target).

After each run, label-free diagnostics on the target: the entropy of its predictions, the class balance
of its predictions, and how far apart the domains' features are (a proxy A-distance from a linear domain
classifier, and MMD). With a labelled evaluation dataset from the target domain: accuracy and macro-F1.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from graft.jobspec import AdaptHyperparameters, AdaptSpec
from graft.plan import DataFacts, JobPlan, plan_adaptation
from graft.plan import Upstream as PlanUpstream
from graft.report import stats
from graft.sources import DatasetSource
from ml import alignment as adaptation
from ml.data import batches, draw, label_indices, load_inputs
from ml.metrics import classification_metrics
from ml.runtime import Reporter, to_device
from workers.recipes.finetune import FinetuneConfig, FinetuneRecipe, FinetuneResult
from workers.recipes.study import RunReporter

AdaptationMethod = Literal["source_only", "dann", "coral", "mmd", "mcc", "pseudo_label"]
DIAGNOSTIC_EXAMPLES = 1000


class AdaptConfig(FinetuneConfig):
    adaptation: AdaptationMethod = "source_only"
    target: DatasetSource
    evaluation: DatasetSource | None = None
    adaptation_weight: float = Field(default=1.0, ge=0)
    pseudo_label_threshold: float = Field(default=0.9, gt=0, lt=1)
    mcc_temperature: float = Field(default=2.5, gt=0)


@dataclass
class AdaptResult:
    method: str
    seed: int
    result: FinetuneResult
    diagnostics: dict[str, Any] = field(default_factory=dict)


class AdaptRecipe(FinetuneRecipe):
    config: AdaptConfig
    source_standardised = False

    def extra_parameters(self) -> list[dict[str, Any]]:
        if self.config.adaptation != "dann":
            return []
        self.discriminator = adaptation.DomainDiscriminator(self.model.feature_dim).to(self.device)
        rate = getattr(self.hp, "discriminator_learning_rate", None) or self.hp.learning_rate
        return [{"params": list(self.discriminator.parameters()), "lr": rate}]

    def setup(self) -> None:
        super().setup()
        # Only the target's inputs: its labels, if it has any, are dropped here and never seen again.
        self.target_inputs, _ = load_inputs(self.config.target, self.spec)
        self._target_queue: list[int] = []
        self.evaluation_inputs = self.evaluation_labels = None
        self.target_features = self.evaluation_features = None
        if self.config.evaluation is not None:
            inputs, labels = load_inputs(self.config.evaluation, self.spec)
            assert labels is not None, "the evaluation dataset must be labelled"
            self.evaluation_inputs, self.evaluation_labels = inputs, label_indices(labels, self.classes)
        if self.frozen:
            # A frozen backbone: every domain's features once, through the cache; the adapter and the head
            # train over them.
            self.target_features = self._features(self.target_inputs, self.config.target)
            if self.fresh_adapter and self.config.adaptation != "source_only":
                # Each domain's features standardised with its own statistics (AdaBN at the feature layer):
                # the source's in training, the target's in the model, which serves the target.
                adapter = self.model.adapter
                assert adapter is not None
                self.train_features = adapter.standardise(self.train_features)
                if self.val_features is not None:
                    self.val_features = adapter.standardise(self.val_features)
                self.set_adapter_statistics(self.target_features)
                self.source_standardised = True
            if self.evaluation_inputs is not None and self.config.evaluation is not None:
                self.evaluation_features = self._features(self.evaluation_inputs, self.config.evaluation)
        self.reporter.event(
            f"Adapting with {self.config.adaptation} to {len(self.target_inputs)} unlabelled target examples of "
            f"{self.config.target.id}",
            data={"adaptation": self.config.adaptation},
        )

    @property
    def frozen(self) -> bool:
        return self.config.method == "linear_probe"

    def resume_extras(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors = self.discriminator.state_dict() if self.config.adaptation == "dann" else {}
        return dict(tensors), {"target_queue": self._target_queue}

    def restore_extras(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        if self.config.adaptation == "dann":
            self.discriminator.load_state_dict(tensors)
        self._target_queue = list(meta["target_queue"])

    def _target_batch(self, size: int) -> list[int]:
        taken, self._target_queue = draw(self._target_queue, size, len(self.target_inputs), self.generator)
        return taken

    def _forward(self, indices: list[int], *, train: bool) -> tuple[Tensor, Tensor]:
        """A training batch goes through the backbone together with a target batch of the same size, so
        that batch norm sees both domains in every step exactly as its running statistics will (separate
        passes would normalise each domain by itself in training, and by a mixture in evaluation)."""
        if not train and self.source_standardised:  # the source's validation data, standardised as such
            assert self.model.adapter is not None and self.val_features is not None
            rows = self.val_features[torch.as_tensor(indices, device=self.val_features.device)]
            features = self.model.adapter.transform(rows)
            return features, self.model.classify(features)
        if not train or self.config.adaptation == "source_only":
            return super()._forward(indices, train=train)
        taken = self._target_batch(len(indices))
        if self.frozen:
            assert self.target_features is not None
            source = self.train_features[torch.as_tensor(indices, device=self.train_features.device)]
            target = self.target_features[torch.as_tensor(taken, device=self.target_features.device)]
            adapter = self.model.adapter
            if adapter is not None and self.source_standardised:
                joint = adapter.transform(torch.cat([source, adapter.standardise(target)]))
            else:
                joint = self.model.adapt(torch.cat([source, target]))
        else:
            source = self.train_inputs.batch(indices)
            target = self.target_inputs.batch(taken)
            joint = self.model.features(to_device(join_batches(source, target), self.device))
        features, self._target_features = joint[: len(indices)], joint[len(indices) :]
        return features, self.model.classify(features)

    def extra_loss(self, features: Tensor, progress: float) -> Tensor | None:
        method = self.config.adaptation
        if method == "source_only":
            return None
        target = self._target_features
        # Every alignment term ramps up with the usual schedule 2 / (1 + exp(-10 p)) - 1: at the start the
        # features are not yet worth aligning (from random weights, aligning them first collapses them).
        ramp = adaptation.dann_weight(progress)
        weight = self.config.adaptation_weight * (1.0 if method == "dann" else ramp)
        if method == "dann":  # the ramp is in its gradient reversal
            return weight * adaptation.dann_loss(self.discriminator, features, target, progress)
        if method == "coral":
            return weight * adaptation.coral_loss(features.float(), target.float())
        if method == "mmd":
            return weight * adaptation.mmd(features.float(), target.float())
        logits = self.model.classify(target)
        if method == "mcc":
            return weight * adaptation.mcc_loss(logits.float(), self.config.mcc_temperature)
        return weight * adaptation.pseudo_label_loss(logits, self.config.pseudo_label_threshold)

    @torch.no_grad()
    def _outputs(
        self, inputs: Any, limit: int | None = None, cached: Tensor | None = None, standardised: bool = False
    ) -> tuple[Tensor, Tensor]:
        """(features, logits) of up to `limit` examples, in eval mode (from their cached backbone features
        when the backbone is frozen; `standardised`: those are already standardised)."""
        self.model.eval()
        count = len(inputs) if limit is None else min(limit, len(inputs))
        features, logits = [], []
        for indices in batches(count, 64, shuffle=False):
            with self._autocast():
                if cached is not None:
                    rows = cached[torch.as_tensor(indices, device=cached.device)]
                    adapter = self.model.adapter
                    if standardised and adapter is not None:
                        f = adapter.transform(rows).float()
                    else:
                        f = self.model.adapt(rows).float()
                else:
                    f = self.model.features(to_device(inputs.batch(indices), self.device)).float()
            features.append(f)
            logits.append(self.model.classify(f).float())
        return torch.cat(features), torch.cat(logits)

    def evaluate(self) -> dict[str, float]:
        metrics = super().evaluate()
        if self.evaluation_inputs is not None and self.evaluation_labels is not None:
            _, logits = self._outputs(self.evaluation_inputs, cached=self.evaluation_features)
            metrics["target_accuracy"] = float(
                (logits.argmax(dim=1).cpu() == self.evaluation_labels).float().mean()
            )
        return metrics

    def diagnostics(self) -> dict[str, Any]:
        """Of the final model: on the target, without its labels; on the evaluation data, with theirs."""
        target_features, target_logits = self._outputs(
            self.target_inputs, DIAGNOSTIC_EXAMPLES, cached=self.target_features
        )
        source_features, _ = self._outputs(
            self.train_inputs,
            DIAGNOSTIC_EXAMPLES,
            cached=self.train_features if self.frozen else None,
            standardised=self.source_standardised,
        )
        found: dict[str, Any] = {
            "prediction_entropy": adaptation.prediction_entropy(target_logits),
            "class_balance": adaptation.class_balance(target_logits, self.classes),
            "a_distance": adaptation.a_distance(source_features, target_features, seed=self.config.seed),
            "mmd": float(adaptation.mmd(source_features[:500], target_features[:500])),
        }
        if self.evaluation_inputs is not None and self.evaluation_labels is not None:
            _, logits = self._outputs(self.evaluation_inputs, cached=self.evaluation_features)
            found["target"] = classification_metrics(
                self.evaluation_labels, logits.argmax(dim=1).cpu(), self.classes
            )
        return found

    def run(self) -> FinetuneResult:
        result = super().run()
        self.found = self.diagnostics()
        return result


def join_batches(a: Any, b: Any) -> Any:
    """Two prepared batches as one: tensors stacked; token batches padded to the longer one first."""
    if not isinstance(a, dict):
        return torch.cat([a, b])
    width = max(a["input_ids"].shape[1], b["input_ids"].shape[1])
    return {
        key: torch.cat(
            [F.pad(a[key], (0, width - a[key].shape[1])), F.pad(b[key], (0, width - b[key].shape[1]))]
        )
        for key in a
    }


@dataclass
class AdaptationStudy:
    runs: list[AdaptResult]
    primary: AdaptResult  # the first requested method's first seed: the job's result model
    report: dict[str, Any]


def plan_adaptation_of(config: AdaptConfig, *, methods: list[str], seeds: list[int] | None = None) -> JobPlan:
    """The plan of an adaptation run from a recipe config (benchmarks, tests), made by the planner the API
    uses (graft.plan.plan_adaptation), unpriced."""
    hp = {
        "adaptation_weight": config.adaptation_weight,
        "pseudo_label_threshold": config.pseudo_label_threshold,
        "mcc_temperature": config.mcc_temperature,
        **config.hyperparameters.model_dump(mode="json"),
    }
    spec = AdaptSpec(
        kind="adapt",
        base_model=config.base.id,
        source_dataset=config.train.id,
        target_dataset=config.target.id,
        backbone="frozen" if config.method == "linear_probe" else "full",
        method=config.method,
        methods=methods,  # type: ignore[arg-type]
        seeds=seeds,
        hyperparameters=AdaptHyperparameters.model_validate(hp),
    )
    upstream = PlanUpstream(
        id=config.base.id, learned=config.base.learned, architecture=config.base.spec.architecture
    )
    unknown = DataFacts(examples=0)
    return plan_adaptation(spec, config.seed, upstream=upstream, source=unknown, target=unknown)


def run_adaptation(
    config: AdaptConfig,
    reporter: Reporter,
    plan: JobPlan | None = None,
    *,
    methods: list[str] | None = None,
    seeds: list[int] | None = None,
) -> AdaptationStudy:
    """The job's runs, as its plan has them (graft/plan.py): source_only and each method, for each seed,
    each with the hyperparameters the plan resolved (a dann run's discriminator rate among them). Without
    a plan, the runs of these `methods` and `seeds` are planned here."""
    plan = plan or plan_adaptation_of(config, methods=methods or [], seeds=seeds)
    planned = plan.runs()
    ordered = [arm.name for arm in plan.arms]
    seeds = plan.arms[0].seeds
    runs: list[AdaptResult] = []
    study_primary: AdaptResult | None = None
    for index, run in enumerate(planned):
        assert run.adaptation is not None
        run_config = config.model_copy(
            update={
                "adaptation": run.adaptation,
                "seed": run.seed,
                "hyperparameters": type(config.hyperparameters).model_validate(run.hyperparameters),
                "save_checkpoints": config.save_checkpoints and run.primary,
                "keep_last_epoch": True,
            }
        )
        recipe = AdaptRecipe(
            run_config, RunReporter(reporter, run.name, index, len(planned), primary=run.primary)
        )
        result = recipe.run()
        runs.append(
            AdaptResult(method=run.adaptation, seed=run.seed, result=result, diagnostics=recipe.found)
        )
        if run.primary:
            study_primary = runs[-1]
    assert study_primary is not None
    evaluated = len(recipe.evaluation_inputs) if recipe.evaluation_inputs is not None else 0
    report = adaptation_report(ordered, seeds, runs, evaluation_examples=evaluated)
    reporter.event(report["summary"], data={"best_method": report["best_method"]})
    return AdaptationStudy(runs=runs, primary=study_primary, report=report)


def adaptation_report(
    methods: list[str], seeds: list[int], runs: list[AdaptResult], *, evaluation_examples: int
) -> dict[str, Any]:
    """Per method: the label-free diagnostics and, with evaluation labels, target accuracy. A method helped
    when its gain over source_only exceeds the noise: the spread over seeds, and never less than the
    sampling error of a difference of two accuracies on this many evaluation examples."""
    labelled = evaluation_examples > 0
    by_method: dict[str, list[AdaptResult]] = {m: [r for r in runs if r.method == m] for m in methods}
    summary: dict[str, Any] = {}
    for method, method_runs in by_method.items():
        balance = [r.diagnostics["class_balance"] for r in method_runs]
        entry: dict[str, Any] = {
            "source_val_accuracy": stats(
                [r.result.metrics.get("val_accuracy", float("nan")) for r in method_runs]
            ),
            "prediction_entropy": stats([r.diagnostics["prediction_entropy"] for r in method_runs]),
            "class_balance": {c: statistics.fmean(b[c] for b in balance) for c in balance[0]},
            "a_distance": stats([r.diagnostics["a_distance"] for r in method_runs]),
            "mmd": stats([r.diagnostics["mmd"] for r in method_runs]),
            "target_accuracy": None,
            "target_macro_f1": None,
            "learning_curves": [
                [
                    {
                        k: row[k]
                        for k in ("epoch", "train_loss", "val_accuracy", "target_accuracy")
                        if k in row
                    }
                    for row in r.result.history
                ]
                for r in method_runs
            ],
        }
        if labelled:
            entry["target_accuracy"] = stats([r.diagnostics["target"]["accuracy"] for r in method_runs])
            entry["target_macro_f1"] = stats([r.diagnostics["target"]["macro_f1"] for r in method_runs])
        summary[method] = entry
    reference = summary["source_only"]
    gains: dict[str, Any] = {}
    best = None
    helped: list[str] = []
    if labelled:
        base = reference["target_accuracy"]["values"]
        for method in methods[1:]:
            gains[method] = stats(
                [a - b for a, b in zip(summary[method]["target_accuracy"]["values"], base, strict=True)]
            )
        best = max(methods, key=lambda m: summary[m]["target_accuracy"]["mean"])
        p = min(max(reference["target_accuracy"]["mean"], 0.05), 0.95)
        sampling = math.sqrt(2 * p * (1 - p) / evaluation_examples)
        noise = {m: max(gains[m]["std"], sampling) for m in methods[1:]}
        helped = [m for m in methods[1:] if gains[m]["mean"] > noise[m]]
        text = (
            f"On the target, source_only reached {reference['target_accuracy']['mean']:.3f}; "
            + "; ".join(
                f"{m} {summary[m]['target_accuracy']['mean']:.3f} ({gains[m]['mean'] * 100:+.1f} points)"
                for m in methods[1:]
            )
            + (
                f". Helped beyond the noise (seed spread and sampling error): {', '.join(helped)}."
                if helped
                else ". None helped beyond the noise (seed spread and sampling error)."
            )
        )
    else:
        text = (
            "No target labels: compare the label-free diagnostics. "
            + "; ".join(
                f"{m}: A-distance {summary[m]['a_distance']['mean']:.2f}, prediction entropy {summary[m]['prediction_entropy']['mean']:.3f}"
                for m in methods
            )
            + " (lower A-distance: domains closer; very low entropy with a skewed class balance can mean collapse)."
        )
    return {
        "object": "job.report",
        "kind": "adaptation",
        "seeds": list(seeds),
        "evaluation_labels": labelled,
        "methods": summary,
        "gain_over_source_only": gains or None,
        "best_method": best,
        "evaluation_examples": evaluation_examples,
        "helped": helped if labelled else None,
        "summary": text,
    }
