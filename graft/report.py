"""The transfer report: did transfer help, and by how much, against the same architecture trained from
scratch on the same data with the same budget.

Noise is taken seriously: the gain is reported with its spread over seeds, and the spread is never
taken smaller than the sampling error of an accuracy measured on the validation set. Negative transfer
is flagged only when the transferred model is worse than scratch by more than that spread.
"""

from __future__ import annotations

import io
import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any

CURVE_KEYS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy")


def stats(values: Sequence[float]) -> dict[str, Any]:
    return {
        "mean": statistics.fmean(values) if values else None,
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": list(values),
    }


def summarise(runs: Sequence[Any]) -> dict[str, Any]:
    """One arm (transferred or scratch) over seeds; each run is a FinetuneResult."""
    return {
        "val_accuracy": stats([r.metrics["val_accuracy"] for r in runs]),
        "val_macro_f1": stats([r.metrics.get("val_macro_f1", 0.0) for r in runs]),
        "val_loss": stats([r.metrics["val_loss"] for r in runs]),
        "train_accuracy": stats([r.metrics["train_accuracy"] for r in runs]),
        "train_val_gap": stats([r.metrics["train_accuracy"] - r.metrics["val_accuracy"] for r in runs]),
        "best_epoch": [r.best_epoch for r in runs],
        "epochs_run": [len(r.history) for r in runs],
    }


def _epochs_to_reach(history: Sequence[dict[str, float]], target: float) -> int | None:
    for row in history:
        if row.get("val_accuracy", -1.0) >= target - 1e-12:
            return int(row["epoch"])
    return None


def _summed_confusion(runs: Sequence[Any]) -> list[list[int]]:
    matrices = [r.evaluation["confusion_matrix"]["matrix"] for r in runs]
    return [
        [sum(m[i][j] for m in matrices) for j in range(len(matrices[0]))] for i in range(len(matrices[0]))
    ]


def _recalls(matrix: list[list[int]], labels: Sequence[str]) -> dict[str, float | None]:
    return {
        label: (row[i] / sum(row) if sum(row) else None)
        for i, (label, row) in enumerate(zip(labels, matrix, strict=True))
    }


# Two-sided 95% normal quantile.
Z95 = 1.959964


def paired_comparison(
    transferred: Sequence[Sequence[int]], scratch: Sequence[Sequence[int]]
) -> dict[str, Any]:
    """The gain of one arm over another measured on the same held-out examples: per example, whether each
    arm got it right (one row per seed, every row over the same examples). The difference per example is
    averaged over seeds, then over examples; its 95% interval is the normal one of that mean (the paired
    test: the examples both arms get right or wrong add no noise). Fewer than 2 examples: no interval."""
    n = len(transferred[0])
    if n == 0 or any(len(row) != n for row in [*transferred, *scratch]):
        raise ValueError("both arms must be measured on the same examples")
    per_example = [
        statistics.fmean(t[i] for t in transferred) - statistics.fmean(s[i] for s in scratch)
        for i in range(n)
    ]
    gain = statistics.fmean(per_example)
    error = statistics.stdev(per_example) / math.sqrt(n) if n > 1 else math.inf
    low, high = gain - Z95 * error, gain + Z95 * error
    return {
        "examples": n,
        "transferred_accuracy": statistics.fmean(statistics.fmean(row) for row in transferred),
        "scratch_accuracy": statistics.fmean(statistics.fmean(row) for row in scratch),
        "gain": gain,
        "standard_error": error if math.isfinite(error) else None,
        "interval_95": [low, high] if math.isfinite(error) else None,
        "conclusive": math.isfinite(error) and (low > 0 or high < 0),
    }


def held_out_verdict(
    comparison: dict[str, Any], measured_on: dict[str, Any], against: str
) -> tuple[str, bool]:
    """The summary of a paired comparison and whether it shows negative transfer."""
    gain, interval = comparison["gain"], comparison["interval_95"]
    where = describe_measurement(measured_on)
    if interval is None:
        return f"Too few examples to tell: {gain * 100:+.1f} points against {against} {where}.", False
    low, high = interval
    negative = high < 0
    outcome = (
        "Negative transfer"
        if negative
        else "Transfer helped"
        if low > 0
        else "Too few examples to tell whether transfer helped"
    )
    return (
        f"{outcome}: {gain * 100:+.1f} points of accuracy against {against} (95% interval {low * 100:+.1f} to "
        f"{high * 100:+.1f}) {where}.",
        negative,
    )


def describe_measurement(measured_on: dict[str, Any]) -> str:
    examples = measured_on["examples"]
    if measured_on["kind"] == "evaluation_dataset":
        return f"on {examples} held-out examples of {measured_on['dataset']}"
    if measured_on["kind"] == "cross_validation":
        return (
            f"on all {examples} labelled examples, each predicted by models that never trained on it "
            f"({measured_on['folds']}-fold cross-validation)"
        )
    return f"on {examples} validation examples"


def build_report(
    seeds: Sequence[int],
    transferred: Sequence[Any],
    scratch: Sequence[Any],
    budget: dict[str, Any],
    *,
    held_out: tuple[dict[str, Any], list[list[int]], list[list[int]]] | None = None,
    arms: dict[str, tuple[str, str, list[list[int]]]] | None = None,
    transferred_correct: list[list[int]] | None = None,
) -> dict[str, Any]:
    """`held_out`: (what it was measured on, per seed the transferred arm's per-example correctness, the
    scratch arm's) when the comparison is made on held-out examples (an evaluation dataset, or the folds
    of a cross-validation); the gain, its interval, the negative-transfer flag and the summary then come
    from it. Otherwise they come from the validation metrics."""
    gains = [
        t.metrics["val_accuracy"] - s.metrics["val_accuracy"]
        for t, s in zip(transferred, scratch, strict=True)
    ]
    f1_gains = [
        t.metrics.get("val_macro_f1", 0.0) - s.metrics.get("val_macro_f1", 0.0)
        for t, s in zip(transferred, scratch, strict=True)
    ]
    loss_gains = [
        s.metrics["val_loss"] - t.metrics["val_loss"] for t, s in zip(transferred, scratch, strict=True)
    ]
    n_val = transferred[0].evaluation["num_examples"]
    p_t = statistics.fmean(t.metrics["val_accuracy"] for t in transferred)
    p_s = statistics.fmean(s.metrics["val_accuracy"] for s in scratch)
    # Standard error of the difference of two accuracies, each on n_val examples and averaged over seeds.
    sampling_error = math.sqrt((p_t * (1 - p_t) + p_s * (1 - p_s)) / max(n_val, 1) / len(seeds))
    seed_spread = statistics.stdev(gains) if len(gains) > 1 else 0.0
    spread = max(seed_spread, sampling_error, 1.0 / max(n_val, 1))
    mean_gain = statistics.fmean(gains)
    negative = mean_gain < -spread

    convergence = []
    for t, s in zip(transferred, scratch, strict=True):
        scratch_best = max(row["val_accuracy"] for row in s.history)
        scratch_epoch = _epochs_to_reach(s.history, scratch_best)
        reach = _epochs_to_reach(t.history, scratch_best)
        convergence.append(
            {
                "scratch_best_val_accuracy": scratch_best,
                "scratch_epochs_to_best": scratch_epoch,
                "transferred_epochs_to_reach_it": reach,
                "speedup": (scratch_epoch / reach) if reach and scratch_epoch else None,
            }
        )
    speedups = [c["speedup"] for c in convergence if c["speedup"] is not None]

    labels = transferred[0].evaluation["confusion_matrix"]["labels"]
    confusion_t, confusion_s = _summed_confusion(transferred), _summed_confusion(scratch)
    recall_t, recall_s = _recalls(confusion_t, labels), _recalls(confusion_s, labels)

    outcome = (
        "Negative transfer"
        if negative
        else ("Transfer helped" if mean_gain > spread else "No clear difference")
    )
    verdict = (
        f"{outcome}: {mean_gain * 100:+.1f} points of validation accuracy against training from scratch "
        f"(spread {spread * 100:.1f} over {len(seeds)} seed{'s' if len(seeds) > 1 else ''})."
    )
    measured_on: dict[str, Any] = {"kind": "validation", "examples": n_val}
    comparison = None
    if held_out is not None:
        measured_on, transferred_correct, scratch_correct = held_out
        comparison = paired_comparison(transferred_correct, scratch_correct)
        verdict, negative = held_out_verdict(comparison, measured_on, "training from scratch")
    else:
        verdict += f" Measured {describe_measurement(measured_on)}."
    if speedups:
        verdict += f" It reached the scratch model's best {statistics.fmean(speedups):.1f}x sooner."
    compared_arms = None
    if arms:
        assert transferred_correct is not None
        compared_arms = arm_comparisons(arms, transferred_correct, measured_on)
        verdict += "".join(f" Against {name}: {entry['summary']}" for name, entry in compared_arms.items())
    return {
        "object": "job.report",
        "metric": "val_accuracy",
        "seeds": list(seeds),
        "validation_examples": n_val,
        "measured_on": measured_on,
        "held_out": comparison,
        "arms": compared_arms,
        "budget": budget,
        "transferred": summarise(transferred),
        "scratch": summarise(scratch),
        "gain": {
            "val_accuracy": stats(gains),
            "val_macro_f1": stats(f1_gains),
            "val_loss": stats(loss_gains),
        },
        "spread": spread,
        "negative_transfer": negative,
        "convergence": {"per_seed": convergence, "speedup": statistics.fmean(speedups) if speedups else None},
        "per_class": {
            label: {"transferred": recall_t[label], "scratch": recall_s[label]} for label in labels
        },
        "confusion_matrix": {"labels": labels, "transferred": confusion_t, "scratch": confusion_s},
        "learning_curves": {
            "transferred": [
                [{k: row[k] for k in CURVE_KEYS if k in row} for row in r.history] for r in transferred
            ],
            "scratch": [[{k: row[k] for k in CURVE_KEYS if k in row} for row in r.history] for r in scratch],
        },
        "summary": verdict,
    }


ARM_NAMES = {"parent": "the parent model fine-tuned the same way", "as_is": "the upstream as it is"}


def arm_comparisons(
    arms: dict[str, tuple[str, str, list[list[int]]]],
    transferred_correct: list[list[int]],
    measured_on: dict[str, Any],
) -> dict[str, Any]:
    """Each named arm against the transferred model, paired on the same examples, with its own
    negative-transfer flag (the arm better than the transferred model: the whole interval below zero)."""
    found = {}
    for name, (kind, base_model, correct) in arms.items():
        comparison = paired_comparison(transferred_correct, correct)
        against = ARM_NAMES.get(kind, f"{base_model} fine-tuned the same way")
        summary, negative = held_out_verdict(comparison, measured_on, against)
        found[name] = {
            "kind": kind,
            "base_model": base_model,
            "accuracy": comparison["scratch_accuracy"],
            "transferred_accuracy": comparison["transferred_accuracy"],
            "held_out": comparison,
            "negative_transfer": negative,
            "summary": summary,
        }
    return found


# The per-class panel draws at most this many classes (those where the arms differ most): a thousand bars
# and labels took half a minute to draw and showed nothing anyone can read.
MAX_DRAWN_CLASSES = 20


def render_png(report: dict[str, Any], on_batch: Callable[[], None] | None = None) -> bytes:
    """The report drawn headless, by its kind. `on_batch` is called between the parts of the drawing (it
    may raise to stop: its client went away)."""
    step = on_batch or (lambda: None)
    kind = report.get("kind", "transfer")
    if kind == "adaptation":
        return _render_adaptation(report, step)
    if kind == "distillation":
        return _render_distillation(report, step)
    return _render_transfer(report, step)


def drawn_classes(per_class: dict[str, dict[str, float | None]]) -> list[str]:
    """The classes the per-class panel shows, in the report's order: all of them up to MAX_DRAWN_CLASSES,
    else those whose recall differs most between the arms."""
    labels = list(per_class)
    if len(labels) <= MAX_DRAWN_CLASSES:
        return labels

    def difference(label: str) -> float:
        entry = per_class[label]
        return abs((entry["transferred"] or 0.0) - (entry["scratch"] or 0.0))

    chosen = set(sorted(labels, key=lambda label: (-difference(label), label))[:MAX_DRAWN_CLASSES])
    return [label for label in labels if label in chosen]


def _png(figure: Any) -> bytes:
    from matplotlib import pyplot as plt

    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="png")
    plt.close(figure)
    return out.getvalue()


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def _render_adaptation(report: dict[str, Any], step: Callable[[], None]) -> bytes:
    """Target accuracy (with evaluation labels) and the domain discrepancy per method, with seed spread."""
    plt = _pyplot()
    methods = list(report["methods"])
    panels: list[tuple[str, str, tuple[float, float] | None]] = [
        ("a_distance", "A-distance between domains (lower: closer)", (0, 2.05))
    ]
    if report["evaluation_labels"]:
        panels.insert(0, ("target_accuracy", "Target accuracy", (0, 1.05)))
    panels.append(("prediction_entropy", "Entropy of target predictions", None))
    figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.6), dpi=100)
    colours = ["#7f7f7f", "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b"]
    for axis, (key, title, limits) in zip(axes, panels, strict=True):
        step()
        means = [report["methods"][m][key]["mean"] for m in methods]
        spread = [report["methods"][m][key]["std"] for m in methods]
        axis.bar(range(len(methods)), means, yerr=spread, capsize=4, color=colours[: len(methods)])
        axis.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
        axis.set(title=title)
        if limits is not None:
            axis.set_ylim(*limits)
    figure.suptitle(report["summary"][:140] + ("…" if len(report["summary"]) > 140 else ""), fontsize=9)
    step()
    return _png(figure)


def _render_distillation(report: dict[str, Any], step: Callable[[], None]) -> bytes:
    """Accuracy, parameters and latency of teacher, scratch student and distilled student."""
    plt = _pyplot()
    arms = [a for a in ("teacher", "scratch_student", "distilled_student") if report.get(a)]
    colours = {"teacher": "#1f77b4", "scratch_student": "#d62728", "distilled_student": "#2ca02c"}
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.4), dpi=100)
    for axis, (key, title) in zip(
        axes,
        (
            ("accuracy", "Accuracy"),
            ("num_parameters", "Parameters"),
            ("cpu_latency_ms", "CPU latency (ms/batch)"),
        ),
        strict=True,
    ):
        step()
        axis.bar(range(len(arms)), [report[a][key] or 0.0 for a in arms], color=[colours[a] for a in arms])
        axis.set_xticks(range(len(arms)), [a.replace("_", " ") for a in arms])
        axis.set(title=title)
    recovered = report.get("gap_recovered")
    figure.suptitle(
        "Distillation"
        + (f": {recovered * 100:.0f}% of the teacher-student gap recovered" if recovered is not None else "")
    )
    step()
    return _png(figure)


def _render_transfer(report: dict[str, Any], step: Callable[[], None]) -> bytes:
    """Learning curves of both arms and the per-class comparison."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    colours = {"transferred": "#1f77b4", "scratch": "#d62728"}
    figure, (accuracy_ax, loss_ax, class_ax) = plt.subplots(1, 3, figsize=(16, 4.8), dpi=100)
    for arm, colour in colours.items():
        for seed_index, curve in enumerate(report["learning_curves"][arm]):
            step()
            epochs = [row["epoch"] for row in curve]
            label = arm if seed_index == 0 else None
            accuracy_ax.plot(
                epochs,
                [row["val_accuracy"] for row in curve],
                color=colour,
                marker="o",
                ms=3,
                label=label,
                alpha=0.9,
            )
            loss_ax.plot(
                epochs,
                [row["val_loss"] for row in curve],
                color=colour,
                label=f"{arm} validation" if label else None,
            )
            loss_ax.plot(
                epochs,
                [row["train_loss"] for row in curve],
                color=colour,
                ls="--",
                alpha=0.6,
                label=f"{arm} training" if label else None,
            )
    accuracy_ax.set(title="Validation accuracy", xlabel="epoch", ylim=(0, 1.02))
    loss_ax.set(title="Loss", xlabel="epoch")
    for axis in (accuracy_ax, loss_ax):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    accuracy_ax.legend()
    loss_ax.legend(fontsize=8)
    step()
    labels = drawn_classes(report["per_class"])
    width = 0.4
    for offset, arm in ((-width / 2, "transferred"), (width / 2, "scratch")):
        values = [report["per_class"][label][arm] or 0.0 for label in labels]
        class_ax.bar([i + offset for i in range(len(labels))], values, width, color=colours[arm], label=arm)
    class_ax.set_xticks(
        range(len(labels)),
        labels,
        rotation=45 if len(labels) > 6 else 0,
        ha="right" if len(labels) > 6 else "center",
    )
    total = len(report["per_class"])
    class_ax.set(
        title="Per-class accuracy (recall)"
        + (
            f": the {len(labels)} of {total} classes where the arms differ most"
            if len(labels) < total
            else ""
        ),
        ylim=(0, 1.05),
    )
    class_ax.legend()
    gain = report["gain"]["val_accuracy"]["mean"]
    figure.suptitle(
        f"Transfer gain {gain * 100:+.1f} points (spread {report['spread'] * 100:.1f})"
        + ("  — NEGATIVE TRANSFER" if report["negative_transfer"] else "")
    )
    step()
    return _png(figure)
