"""The reproduction's summary: one row per (variant, seed, split, data set, convention) of a finished run.

    python -m studies.reproduction --run . --out docs/findings/reproduction/summary
    python -m studies.reproduction --run . --no-main --studies ablations --out docs/findings/reproduction/validation

A run is a workflow folder after ``snakemake --cores all all paired`` (its ``results/``; with ``seeds``,
``departures`` and ``output`` too where those ran). Every number is read from
the tables and logs the workflow wrote; nothing is recomputed here:

- ``s_base``, ``s_variant``, ``s_low``, ``s_high``: S_model and the variant's bootstrap interval (convergence table);
- ``d_last_*``, ``d_prev_*``: D_L and D_{L-1} of base and variant; ``largest_rise_layer``, ``largest_rise``: where the
  variant's D rises most from one layer to the next, and by how much (a ratio that improves because D_{L-1} grew, or
  a jump that moved, shows here);
- ``accuracy_diff``, ``accuracy_low``, ``accuracy_high``: LAMBADA accuracy at the output exit, variant − base in points
  with its 95% paired interval, on the LAMBADA set of the row's split; ``perplexity_ratio``: WikiText word perplexity
  at the output exit, variant / base, on the WikiText set of the row's split. Read from the output study's table
  (``snakemake output``: the larger sets, every seed) where it has the variant, else from the per-layer evaluation's
  (``paired``: base and the first seed); ``accuracy_documents``, ``perplexity_documents`` say how many passages and
  articles that was;
- ``tokens``, ``job_seconds``: tokens trained on (the training log) and the distill job's wall-clock (Snakemake's
  benchmark file: start-up, checkpoints and saving included);
- ``variant``: ``default`` for the config's distilled model, ``default-seed-<s>`` for its other seeds,
  ``departure-<name>[-seed-<s>]`` for a departure (``departures``, trained from the same seeds); ``loss``:
  ``paper`` where ζ2 is eq. 5 (every step, the relative squared step), else the departure's name; ``settings``: a
  digest of the training settings other than the seed (rows that share it differ only in their seed).

With ``--spread-out STEM``, also the spread over seeds: per (model, loss, settings, split, data set, convention) the
mean, standard deviation and range over its seeds of S_model, D_L, D_{L-1}, the largest rise, the accuracy difference and
the perplexity ratio.

With ``--studies``, the choosing studies' models too (``snakemake ablations`` / ``recipes``): one row per ablation
setting or recipe on the study's validation set (``ablation-<factor>-<value>``, ``recipe-<name>``), its accuracy
paired against the pretrained model on the same passages by the workflow's own ``hsconv.paired`` (the ablation table
pairs against its reference instead); no perplexity (the studies evaluate LAMBADA only).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import pandas as pd

COLUMNS = ["model", "variant", "loss", "seed", "settings", "split", "dataset", "convention", "tokens", "job_seconds",
           "s_base", "s_variant", "s_low", "s_high", "d_last_base", "d_last_variant", "d_prev_base", "d_prev_variant",
           "largest_rise_layer", "largest_rise", "accuracy_diff", "accuracy_low", "accuracy_high", "perplexity_ratio",
           "accuracy_documents", "perplexity_documents"]


def loss_name(distill: dict) -> str:
    """``paper`` for eqs. 3–6 (any weighting, exits or procedure), else what departs: the ζ2 penalty or measure."""
    departures = [f"zeta2 {key.removeprefix('zeta2_')} {distill[key]}" for key, paper in
                  (("zeta2_penalty", "step"), ("zeta2_measure", "relative_step")) if distill.get(key, paper) != paper]
    return "paper" if not departures else "; ".join(departures)


def settings_digest(distill: dict) -> str:
    """A short digest of the training settings other than the seed: rows that share it differ only in their seed."""
    rest = {key: value for key, value in distill.items() if key not in ("seed", "seeds")}
    return hashlib.sha1(json.dumps(rest, sort_keys=True).encode()).hexdigest()[:10]


# what the spread over seeds summarises: each row's variant-side numbers (the base-side ones are the same in every seed)
SPREAD_OF = ["s_variant", "d_last_variant", "d_prev_variant", "largest_rise", "accuracy_diff", "perplexity_ratio"]


def spread_over_seeds(table: pd.DataFrame) -> pd.DataFrame:
    """Mean, standard deviation (ddof 1) and range over the seeds of each setting (hsconv.seeds.spread): one row per
    (model, loss, settings, split, data set, convention), named by its first seed's variant, with the seeds it has and
    base's numbers beside."""
    from hsconv.seeds import spread

    keys = ["model", "loss", "settings", "split", "dataset", "convention"]
    rows = []
    for key, group in table.groupby(keys, sort=False, dropna=False):
        group = group.sort_values("seed")
        if group["seed"].duplicated().any():
            raise ValueError(f"{dict(zip(keys, key))}: two rows with one seed ({group['variant'].tolist()})")
        row = {**dict(zip(keys, key)), "variant": group["variant"].iloc[0], "tokens": group["tokens"].iloc[0],
               "n_seeds": len(group), "seeds": " ".join(map(str, group["seed"])),
               **{column: group[column].iloc[0] for column in ("s_base", "d_last_base", "d_prev_base")}}
        for column in SPREAD_OF:
            row.update(spread(group[column], column))
        rows.append(row)
    return pd.DataFrame(rows)


def output_row(paired: pd.DataFrame, model: str, variant: str, dataset: str, metric: str) -> pd.Series | None:
    """The paired difference at the output exit (the deepest evaluated layer) of one data set, or None."""
    rows = paired[(paired["model"] == model) & (paired["variant"] == variant) & (paired["task"] == dataset)
                  & (paired["metric"] == metric)]
    return None if rows.empty else rows[rows["layer"] == rows["layer"].max()].iloc[0]


def _training_record(results: Path, model: str, variant: str) -> dict:
    """A trained variant's loss, seed, tokens and distill job wall-clock, from its manifest, step log and benchmark."""
    distill = json.loads((results / "models" / model / variant / "hsconv_model.json").read_text())["training"][
        "distill"]
    main_run = variant == "distilled"
    steps = pd.read_parquet(results / "training" / model / ("" if main_run else variant) / "steps.parquet")
    job = (results / "benchmarks" / "distill" / f"{model}.tsv" if main_run
           else results / "benchmarks" / "distill_variant" / model / f"{variant}.tsv")
    return {"variant": variant.replace("distilled", "default"), "loss": loss_name(distill),
            "seed": int(distill.get("seed", 0)), "settings": settings_digest(distill),
            "tokens": int(steps["tokens"].max()),
            "job_seconds": float(pd.read_csv(job, sep="\t")["s"].iloc[0]) if job.is_file() else float("nan")}


def _scores(base: pd.Series, score: pd.Series) -> dict:
    """S_model with the variant's interval, D_L, D_{L-1} of both, and the variant's largest rise."""
    return {"s_base": base["s_model"], "s_variant": score["s_model"], "s_low": score["s_model_ci_low"],
            "s_high": score["s_model_ci_high"], "d_last_base": base["last_layer_movement"],
            "d_last_variant": score["last_layer_movement"], "d_prev_base": base["previous_layer_movement"],
            "d_prev_variant": score["previous_layer_movement"],
            "largest_rise_layer": int(score["largest_rise_layer"]), "largest_rise": score["largest_rise"]}


def _accuracy(difference) -> dict:
    """A paired accuracy difference in points and its passages (NaN where there is none)."""
    nan = float("nan")
    return {"accuracy_diff": nan, "accuracy_low": nan, "accuracy_high": nan, "accuracy_documents": nan} \
        if difference is None else {
            "accuracy_diff": 100 * difference["difference"], "accuracy_low": 100 * difference["lower"],
            "accuracy_high": 100 * difference["upper"], "accuracy_documents": int(difference["n_documents"])}


def _perplexity(difference) -> dict:
    """Word perplexity at the output, variant / base, and its articles (NaN where there is none)."""
    nan = float("nan")
    return {"perplexity_ratio": nan, "perplexity_documents": nan} if difference is None else {
        "perplexity_ratio": difference["variant_value"] / difference["baseline_value"],
        "perplexity_documents": int(difference["n_documents"])}


def reproduction_rows(run: Path) -> pd.DataFrame:
    results = run / "results"
    splits: dict[str, str] = {}

    def split_of(dataset: str) -> str:
        return splits.setdefault(dataset, _split_of(results / "data" / "eval" / f"{dataset}.parquet"))

    convergence = _main_run_scores(results)
    # the output study's larger sets first (every seed), then the per-layer evaluation's (base and the first seed)
    tables = [results / "tables" / name for name in ("output_paired.parquet", "paired_differences.parquet")]
    paired_tables = [pd.read_parquet(path) for path in tables if path.is_file()]

    def at_output(model, variant, kind, split, metric):
        for paired in paired_tables:
            tasks = [task for task in paired.loc[paired["kind"] == kind, "task"].unique() if split_of(task) == split]
            row = next((row for row in (output_row(paired, model, variant, task, metric) for task in tasks)
                        if row is not None), None)
            if row is not None:
                return row
        return None

    rows = []
    for (model, variant), scores in convergence[convergence["variant"] != "base"].groupby(["model", "variant"]):
        training = _training_record(results, model, variant)
        for (dataset, convention), score in scores.groupby(["dataset", "final_norm"]):
            split = split_of(dataset)
            base = convergence[(convergence["model"] == model) & (convergence["variant"] == "base")
                               & (convergence["dataset"] == dataset) & (convergence["final_norm"] == convention)]
            rows.append({"model": model, **training, "split": split, "dataset": dataset, "convention": convention,
                         **_scores(base.iloc[0], score.iloc[0]),
                         **_accuracy(at_output(model, variant, "lambada", split, "acc")),
                         **_perplexity(at_output(model, variant, "wikitext", split, "word_perplexity"))})
    return pd.DataFrame(rows, columns=COLUMNS)


def _main_run_scores(results: Path) -> pd.DataFrame:
    """The convergence table (base and the config's variants) and, from their own metrics, the main run's other seeds
    (``distilled-seed-N``: ``snakemake seeds`` measures them but tabulates only their spread) and the departures from
    the paper's loss (``departure-NAME[-seed-N]``: ``snakemake departures``), on the table's data sets."""
    table = pd.read_parquet(results / "tables" / "convergence.parquet")
    others = [pd.read_parquet(path) for pattern in ("distilled-seed-*", "departure-*")
              for path in sorted(results.glob(f"metrics/*/{pattern}/*/convergence.parquet"))
              if path.parent.name in set(table["dataset"])]
    return pd.concat([table, *others], ignore_index=True)


def study_rows(run: Path, study: str) -> pd.DataFrame:
    """One row per trained model of a choosing study (``ablations`` or ``recipes``) and convention, on its data set."""
    from hsconv.paired import paired_differences

    results = run / "results"
    table = pd.read_parquet(results / "tables" / f"{study}.parquet")
    rows = []
    for model, frame in table.groupby("model", sort=False):
        dataset = frame["dataset"].iloc[0]
        split = _split_of(results / "data" / "eval" / f"{dataset}.parquet")
        variants = [variant for variant in dict.fromkeys(frame["variant"]) if variant != "base"]
        documents = pd.concat([pd.read_parquet(results / "stock" / model / variant / dataset / "per_document.parquet")
                               for variant in ["base", *variants]], ignore_index=True)
        accuracy = paired_differences(documents[documents["acc"].notna()], baseline="base")
        scores = {variant: pd.read_parquet(results / "metrics" / model / variant / dataset / "convergence.parquet")
                  for variant in ["base", *variants]}
        for variant in variants:
            training = _training_record(results, model, variant)
            difference = accuracy[(accuracy["model"] == model) & (accuracy["variant"] == variant)].iloc[0]
            for convention in ("hf", "pre_norm"):
                base, score = (scores[name][scores[name]["final_norm"] == convention].iloc[0]
                               for name in ("base", variant))
                rows.append({"model": model, **training, "split": split, "dataset": dataset,
                             "convention": convention, **_scores(base, score), **_accuracy(difference), **_perplexity(None)})
    return pd.DataFrame(rows, columns=COLUMNS)


def _split_of(texts_path: Path) -> str:
    """The split a prepared data set was written as (its provenance), ``test`` for one written before splits."""
    from hsconv.io import read_provenance

    return (read_provenance(texts_path).get("texts") or {}).get("split", "test")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=".", help="the workflow folder whose results/ to read")
    parser.add_argument("--out", required=True, help="output stem: STEM.csv and STEM.md")
    parser.add_argument("--studies", nargs="*", default=[], choices=("ablations", "recipes"),
                        help="add the rows of these choosing studies (validation text)")
    parser.add_argument("--no-main", dest="main", action="store_false",
                        help="leave out the main run's rows (a folder where only --studies ran)")
    parser.add_argument("--spread-out", help="also write the spread over seeds of each setting: STEM.csv and STEM.md")
    args = parser.parse_args()
    table = pd.concat([*([reproduction_rows(Path(args.run))] if args.main else []),
                       *(study_rows(Path(args.run), study) for study in args.studies)], ignore_index=True)
    _write(table, Path(args.out))
    print(table.to_string(index=False))
    if args.spread_out:
        _write(spread_over_seeds(table), Path(args.spread_out))


def _write(table: pd.DataFrame, stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(stem.with_suffix(".csv"), index=False)
    stem.with_suffix(".md").write_text(table.to_markdown(index=False, floatfmt=".4g") + "\n")


if __name__ == "__main__":
    main()
