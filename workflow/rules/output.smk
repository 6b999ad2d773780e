# The output alone (lm-eval's stock tasks, one exit) on larger sets than the per-layer evaluation can afford: the
# whole LAMBADA test set and 20 WikiText articles. Every variant and every seed of the main distillation is paired
# against base on the same documents; the spread over seeds says how much of a difference another run would keep.


use rule evaluate_layers as evaluate_output with:
    input:
        model=variant_model_dir,
        texts=expand("results/data/eval/{dataset}.parquet", dataset=OUTPUT_DATASETS),
    output:
        table="results/output/{model}/{variant}/output.parquet",
        json="results/output/{model}/{variant}/lm_eval.json",
        documents="results/output/{model}/{variant}/per_document.parquet",
    params:
        # Through the lens at the output exit alone: stock lm-eval's numbers (tested request by request), without
        # stock HFLM's batch × window × vocabulary logits, which long WikiText articles cannot fit in memory.
        exits="--output-only",
        settings=section_settings("evaluation", leave_out=["layers"]),  # one exit
        datasets=evaluation_datasets(OUTPUT_DATASETS, limited=False),  # the larger sets are evaluated whole
    log: "results/logs/evaluate_output/{model}/{variant}.log"
    benchmark: "results/benchmarks/evaluate_output/{model}/{variant}.tsv"


use rule paired_differences as output_paired_differences with:
    input:
        expand("results/output/{model}/{variant}/per_document.parquet", model=MODELS, variant=OUTPUT_VARIANTS),
    output:
        parquet="results/tables/output_paired.parquet",
        csv=report("results/tables/output_paired.csv", caption="../report/paired_table.rst", category="Tables"),
        md="results/tables/output_paired.md",
    log: "results/logs/output_paired_differences.log"
    benchmark: "results/benchmarks/output_paired_differences.tsv"


rule tabulate_output_seeds:
    """The output's paired difference from base over the seeds of the main distillation and of each departure: mean,
    standard deviation and range, beside the first seed's paired bootstrap interval."""
    input:
        "results/tables/output_paired.parquet",
    output:
        parquet="results/tables/output_seeds.parquet",
        csv="results/tables/output_seeds.csv",
        md="results/tables/output_seeds.md",
    params:
        names=SPREAD_NAMES,
        first_seed=DISTILL["seed"],
        seeds=DISTILL["seeds"],
        config_hash=CONFIG_HASH,
        code=code_fingerprint("hsconv.seeds"),
    log: "results/logs/tabulate_output_seeds.log"
    benchmark: "results/benchmarks/tabulate_output_seeds.tsv"
    conda: "../../envs/torch.yaml"
    shell:
        "hsconv tabulate-seeds --tables {input} --paired --variants {params.names} --first-seed {params.first_seed}"
        " --seeds {params.seeds} --out {output.parquet} --config-hash {params.config_hash} > {log} 2>&1"
