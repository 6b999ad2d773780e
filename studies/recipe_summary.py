"""One row per (recipe, data set, convention): what a distillation recipe does to convergence and to the output.

    python -m studies.recipe_summary --recipe default=/runs/default --recipe k05-a2=/runs/k05-a2 \
        --out docs/findings/recipe/summary

Each recipe is a finished run of the workflow (its own run folder, `snakemake --directory RUN ...`) with targets
``results/tables/convergence.csv``, ``results/tables/convergence_paired.csv`` and ``results/tables/output_paired.csv``
(``evaluation.output_datasets`` set to the measured LAMBADA and WikiText sets). Every number is read from those
tables and the run's training log; nothing is recomputed here:

- ``s_base``, ``s_distilled``, ``s_distilled_low``: S_model of base and distilled and the distilled model's bootstrap
  lower bound (the convergence table), ``s_difference[_low|_high]`` the paired difference (convergence_paired);
- ``ratio_base``, ``ratio_distilled``: the last layer's D over the layer before's;
- ``accuracy_diff[_low|_high]``: LAMBADA output accuracy, distilled − base in points, paired by passage;
  ``perplexity_ratio``: WikiText output word perplexity, distilled / base (both repeated on each of a recipe's rows,
  as they are the recipe's, not the data set's or convention's);
- ``tokens``, ``train_seconds``: tokens trained on (the training log's running count) and the sum of the logged step
  times (start-up and checkpoint writing excluded); ``job_seconds``: the whole distill job's wall-clock, from
  Snakemake's benchmark file (start-up, checkpoints and saving the model included: the 15-minute budget's measure);
- ``output_kl_training``, ``last_step_training``, ``previous_step_training``: from the training log's per-layer table,
  the output exit's KL and ζ2's steps of the last two layers (s_L, s_{L−1}), each the mean over the last tenth of the
  steps (at least 4): where the loss left the output and the last step (NaN where the run kept no per-layer log).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

COLUMNS = ["recipe", "model", "dataset", "convention", "tokens", "train_seconds", "job_seconds", "s_base", "s_distilled",
           "s_distilled_low", "s_difference", "s_difference_low", "s_difference_high", "ratio_base", "ratio_distilled",
           "accuracy_base", "accuracy_distilled", "accuracy_diff", "accuracy_diff_low", "accuracy_diff_high",
           "perplexity_base", "perplexity_distilled", "perplexity_ratio", "output_kl_training", "last_step_training",
           "previous_step_training"]


def training_tail(layers: pd.DataFrame) -> dict[str, float]:
    """The output exit's KL and the last two layers' steps, means over the last tenth of the steps (at least 4)."""
    steps = sorted(layers["step"].unique())
    tail = layers[layers["step"].isin(steps[-max(4, len(steps) // 10):])]
    last = int(layers["layer"].max())
    by_layer = tail.groupby("layer")[["kl", "hidden_step"]].mean()
    return {"output_kl_training": float(by_layer.loc[last, "kl"]),
            "last_step_training": float(by_layer.loc[last, "hidden_step"]),
            "previous_step_training": float(by_layer.loc[last - 1, "hidden_step"])}


def recipe_rows(recipe: str, run: Path, variant: str = "distilled") -> pd.DataFrame:
    """The summary rows of one finished run."""
    tables = run / "results" / "tables"
    convergence = pd.read_parquet(tables / "convergence.parquet")
    paired = pd.read_parquet(tables / "convergence_paired.parquet")
    output = pd.read_parquet(tables / "output_paired.parquet")
    output = output[output["variant"] == variant]
    accuracy = output[(output["kind"] == "lambada") & (output["metric"] == "acc")]
    perplexity = output[(output["kind"] == "wikitext") & (output["metric"] == "word_perplexity")]
    if len(accuracy) != 1 or len(perplexity) != 1:
        raise ValueError(f"{run}: expected one LAMBADA accuracy and one WikiText word perplexity row of {variant} in "
                         f"output_paired, found {len(accuracy)} and {len(perplexity)}")
    accuracy, perplexity = accuracy.iloc[0], perplexity.iloc[0]
    steps = pd.read_parquet(next((run / "results" / "training").glob("*/steps.parquet")))  # the main run's
    job = pd.read_csv(next((run / "results" / "benchmarks" / "distill").glob("*.tsv")), sep="\t")
    layer_logs = list((run / "results" / "training").glob("*/layers.parquet"))
    tail = training_tail(pd.read_parquet(layer_logs[0])) if layer_logs else {}
    rows = []
    for (model, dataset, convention), scores in convergence.groupby(["model", "dataset", "final_norm"], sort=True):
        base = scores[scores["variant"] == "base"].iloc[0]
        distilled = scores[scores["variant"] == variant].iloc[0]
        difference = paired[(paired["model"] == model) & (paired["variant"] == variant)
                            & (paired["dataset"] == dataset) & (paired["final_norm"] == convention)].iloc[0]
        rows.append({
            "recipe": recipe, "model": model, "dataset": dataset, "convention": convention, "tokens": int(steps["tokens"].max()),
            "train_seconds": float(steps["seconds"].sum()), "job_seconds": float(job["s"].iloc[0]),
            "s_base": base["s_model"],
            "s_distilled": distilled["s_model"], "s_distilled_low": distilled["s_model_ci_low"],
            "s_difference": difference["s_model_difference"], "s_difference_low": difference["s_model_difference_low"],
            "s_difference_high": difference["s_model_difference_high"], "ratio_base": base["last_layer_ratio"],
            "ratio_distilled": distilled["last_layer_ratio"], "accuracy_base": accuracy["baseline_value"],
            "accuracy_distilled": accuracy["variant_value"], "accuracy_diff": 100 * accuracy["difference"],
            "accuracy_diff_low": 100 * accuracy["lower"], "accuracy_diff_high": 100 * accuracy["upper"],
            "perplexity_base": perplexity["baseline_value"], "perplexity_distilled": perplexity["variant_value"],
            "perplexity_ratio": perplexity["variant_value"] / perplexity["baseline_value"], **tail})
    return pd.DataFrame(rows, columns=COLUMNS)


# The targets (docs/findings.md §10): where the frontier figure draws its dashed lines.
TARGET_S, TARGET_ACCURACY_DIFF, TARGET_PERPLEXITY_RATIO = 0.85, -1.0, 1.05


def plot_frontier(table: pd.DataFrame, out: Path, dataset: str = "lambada", convention: str = "pre_norm") -> None:
    """Each recipe's S_model against what it costs at the output (LAMBADA accuracy with its paired interval, WikiText
    perplexity), with the pretrained model and the targets: ``out``.pdf and ``out``.png."""
    from hsconv.figures.style import apply_style, model_colour, plt, save_figure

    apply_style()
    rows = table[(table["dataset"] == dataset) & (table["convention"] == convention)].reset_index(drop=True)
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.4), sharex=True)
    for index, row in rows.iterrows():
        # the palette has 10 colours: past them the marker changes, so that no two recipes look alike
        colour, marker = model_colour(index), "s^Dv"[(index // 10) % 4]
        left.errorbar(row["s_distilled"], row["accuracy_diff"], fmt=marker, color=colour, capsize=3,
                      label=row["recipe"], yerr=[[row["accuracy_diff"] - row["accuracy_diff_low"]],
                                                 [row["accuracy_diff_high"] - row["accuracy_diff"]]])
        right.plot(row["s_distilled"], row["perplexity_ratio"], marker, color=colour)
    base_s = rows["s_base"].iloc[0]
    left.plot(base_s, 0.0, "o", color="black", label="pretrained (base)")
    right.plot(base_s, 1.0, "o", color="black")
    for axis, target in ((left, TARGET_ACCURACY_DIFF), (right, TARGET_PERPLEXITY_RATIO)):
        axis.axhline(target, color="grey", linestyle="--", linewidth=1)
        axis.axvline(TARGET_S, color="grey", linestyle="--", linewidth=1)
        axis.set_xlabel(f"S_model ({convention} h_L, {dataset})")
    left.set_ylabel("LAMBADA output accuracy − base (points, 95% paired)")
    right.set_ylabel("WikiText output word perplexity / base")
    figure.subplots_adjust(right=0.83, wspace=0.25)
    figure.legend(*left.get_legend_handles_labels(), fontsize=7, loc="center left", bbox_to_anchor=(0.84, 0.5))
    model = rows["model"].iloc[0]
    figure.suptitle(f"{model}: self-distillation recipes, convergence against output cost "
                    f"(dashed: targets S ≥ {TARGET_S}, accuracy ≥ {TARGET_ACCURACY_DIFF:+g}, "
                    f"perplexity ≤ {TARGET_PERPLEXITY_RATIO}×)", fontsize=9)
    save_figure(figure, Path(out).with_suffix(".pdf"))


BASE_COLUMNS = ["s_base", "ratio_base", "accuracy_base", "perplexity_base"]


def keep_earlier_rows(table: pd.DataFrame, earlier: pd.DataFrame) -> pd.DataFrame:
    """``table`` after the rows of ``earlier`` (a summary this module wrote before) whose recipes it does not measure
    again: run folders do not outlive a session, the rows do. Only if the pretrained model's numbers agree, as they
    must when both were measured with the same evaluation settings; otherwise the rows are not comparable."""
    key = ["model", "dataset", "convention"]
    now = table.drop_duplicates(key).set_index(key)[BASE_COLUMNS]
    before = earlier.drop_duplicates(key).set_index(key)[BASE_COLUMNS].reindex(now.index)
    mismatch = ~((now - before).abs() <= 1e-5 * now.abs().clip(lower=1)).all(axis=1)
    if before.isna().any(axis=1).any() or mismatch.any():
        raise ValueError("the earlier summary's base-model numbers differ from this run's (or it lacks some of its "
                         f"data sets): {list(now.index[mismatch | before.isna().any(axis=1)])}; not merging")
    kept = earlier[~earlier["recipe"].isin(table["recipe"])].reindex(columns=COLUMNS)  # columns added since: empty
    return pd.concat([kept, table], ignore_index=True)


def write_summary(runs: dict[str, Path], out: Path, keep_earlier: bool = False) -> pd.DataFrame:
    """Every recipe's rows, as ``out``.csv and ``out``.md, and the frontier figure as ``out``_frontier.pdf/.png.
    ``keep_earlier``: the rows already in ``out``.csv of recipes not in ``runs`` stay (:func:`keep_earlier_rows`)."""
    from hsconv.io import markdown_table

    table = pd.concat([recipe_rows(name, Path(run)) for name, run in runs.items()], ignore_index=True)
    out = Path(out)
    if keep_earlier and out.with_suffix(".csv").is_file():
        table = keep_earlier_rows(table, pd.read_csv(out.with_suffix(".csv")))
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out.with_suffix(".csv"), index=False, float_format="%.6g")
    out.with_suffix(".md").write_text(markdown_table(table) + "\n")
    plot_frontier(table, out.with_name(out.name + "_frontier"))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", action="append", required=True, metavar="NAME=RUN_DIR",
                        help="a finished run of the workflow with that recipe (repeat; the chosen one is `default`)")
    parser.add_argument("--out", required=True, help="the table's path without suffix: .csv and .md are written")
    args = parser.parse_args()
    runs = dict(text.split("=", 1) for text in args.recipe)
    from hsconv.io import markdown_table

    print(markdown_table(write_summary({name: Path(run) for name, run in runs.items()}, Path(args.out))))


if __name__ == "__main__":
    main()
