"""What the command-line tools print at the end: the run, the export, the comparison.

Example::

    print(training_summary(results))
    # Meta-training: 300 meta-updates in 6.7 s.
    # Initialization exported to runs/quickstart/initialization (...).
    #    meta-learned: loss_auc 0.1102, error_auc 0.0292, test_error 0.04
    #     random init: loss_auc 0.9675, error_auc 0.2602, test_error 0.13
    # The meta-learned initialization's loss_auc is 8.8x lower than a random initialization's.
"""

from __future__ import annotations

__all__ = ["comparison_lines", "training_summary"]

#: The two candidates of every evaluation, by the one name each goes by.
LEARNED, RANDOM = "meta-learned", "random init"


def comparison_lines(evaluation):
    """One line of metrics per candidate, then how the meta-learned one compares."""
    lines = []
    for name, metrics in evaluation.items():
        shown = ", ".join(
            f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float) and not k.endswith("_std")
        )
        lines.append(f"  {name:>13}: {shown}")
    learned, random = evaluation.get(LEARNED), evaluation.get(RANDOM)
    if learned and random:
        metric = next(k for k, v in learned.items() if isinstance(v, float))
        ratio = random[metric] / learned[metric] if learned[metric] else float("inf")
        lines.append(
            f"The meta-learned initialization's {metric} is {ratio:.1f}x lower than a random "
            "initialization's." if ratio >= 1 else
            f"The meta-learned initialization's {metric} is {1 / ratio:.1f}x HIGHER than a random "
            "initialization's."
        )
    return lines


def _training_line(results):
    updates = results["meta_updates"]
    if results.get("complete"):
        return (
            f"Meta-training: {updates} meta-updates, already complete in {results['output_dir']}: "
            "nothing to resume (to train it again or longer, start afresh with --gin_param "
            "train.overwrite=True, or choose another --output_dir)."
        )
    if results.get("resumed_from_step") == results.get("train_steps"):
        return f"Meta-training: {updates} meta-updates, all done before this resume (exported and evaluated now)."
    return f"Meta-training: {updates} meta-updates in {results['meta_training_seconds']:.1f} s."


def training_summary(results):
    """The lines `tools/train.py` ends with, from `tfmeta.cli.job.train`'s results."""
    if results.get("export") is None and "worker" in results:
        return (
            f"Worker {results['worker']}: {results['meta_updates']} meta-updates in "
            f"{results['meta_training_seconds']:.1f} s; the chief wrote the outputs."
        )
    lines = [
        _training_line(results),
        f"Initialization exported to {results['export']} (model.keras + saved_model/; "
        "load it with tfmeta.load_initialization).",
        *comparison_lines(results.get("evaluation", {})),
    ]
    return "\n".join(lines)
