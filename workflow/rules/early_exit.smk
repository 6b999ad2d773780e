EARLY_EXIT = config["early_exit"]


rule prune_model:
    """A model cut after its first round(keep_fraction × L) layers, final norm and head kept: early exit for real."""
    input:
        model=variant_model_dir,
    output:
        directory("results/early_exit/{model}/{variant}/model"),
    params:
        keep_fraction=EARLY_EXIT["keep_fraction"],
        code=code_fingerprint("hsconv.early_exit"),
    log: "results/logs/prune_model/{model}/{variant}.log"
    benchmark: "results/benchmarks/prune_model/{model}/{variant}.tsv"
    conda: "../../envs/torch.yaml"
    shell:
        "hsconv prune-model --model-dir {input.model} --keep-fraction {params.keep_fraction} --out {output}"
        " > {log} 2>&1"


use rule evaluate_layers as evaluate_pruned with:
    input:
        model="results/early_exit/{model}/{variant}/model",
        texts=expand("results/data/eval/{dataset}.parquet", dataset=EVALUATED_DATASETS),
    output:
        table="results/early_exit/{model}/{variant}/stock.parquet",
        json="results/early_exit/{model}/{variant}/stock_lm_eval.json",
    params:
        exits="--stock",  # the pruned model under stock lm-eval (HFLM, its own output): what the lens claims there
        settings=section_settings("evaluation", leave_out=["layers"]),  # one exit
    log: "results/logs/evaluate_pruned/{model}/{variant}.log"
    benchmark: "results/benchmarks/evaluate_pruned/{model}/{variant}.tsv"


rule tabulate_early_exit:
    """The shallowest exit within each tolerance of the full model, and the pruned models beside the logit lens."""
    input:
        evaluation="results/tables/per_layer_evaluation.parquet",
        pruned=expand("results/early_exit/{model}/{variant}/stock.parquet", model=MODELS, variant=VARIANTS),
    output:
        exits="results/tables/early_exit.parquet",
        exits_csv=report("results/tables/early_exit.csv", caption="../report/early_exit_table.rst",
                         category="Tables"),
        exits_md="results/tables/early_exit.md",
        pruned="results/tables/pruned_vs_lens.parquet",
        pruned_csv="results/tables/pruned_vs_lens.csv",
        pruned_md="results/tables/pruned_vs_lens.md",
    params:
        settings=section_settings("early_exit"),
        config_hash=CONFIG_HASH,
        code=code_fingerprint("hsconv.early_exit"),
    log: "results/logs/tabulate_early_exit.log"
    benchmark: "results/benchmarks/tabulate_early_exit.tsv"
    conda: "../../envs/torch.yaml"
    shell:
        "hsconv tabulate-early-exit --evaluation {input.evaluation} --pruned {input.pruned}"
        " --exits-out {output.exits} --pruned-out {output.pruned} --settings {params.settings}"
        " --config-hash {params.config_hash} > {log} 2>&1"


rule plot_early_exit:
    """Quality against the fraction of layers kept, base vs distilled, one column per model."""
    input:
        evaluation="results/tables/per_layer_evaluation.parquet",
        exits="results/tables/early_exit.parquet",
    output:
        pdf=report("results/figures/early_exit.pdf", caption="../report/early_exit.rst", category="Figures"),
        png="results/figures/early_exit.png",
    params:
        models=figure_models("early_exit"),
        tolerance=max(EARLY_EXIT["tolerances"]),
        code=code_fingerprint("hsconv.figures.early_exit"),
    log: "results/logs/plot_early_exit.log"
    benchmark: "results/benchmarks/plot_early_exit.tsv"
    conda: "../../envs/plot.yaml"
    shell:
        "hsconv plot-early-exit --evaluation {input.evaluation} --exits {input.exits} --pdf {output.pdf}"
        " --png {output.png} --model {params.models} --tolerance {params.tolerance} > {log} 2>&1"


rule paired_differences:
    """Distilled − base at every exit, with a paired bootstrap interval over the same documents."""
    input:
        expand("results/evaluation/{model}/{variant}/per_document.parquet", model=MODELS, variant=VARIANTS),
    output:
        parquet="results/tables/paired_differences.parquet",
        csv=report("results/tables/paired_differences.csv", caption="../report/paired_table.rst",
                   category="Tables"),
        md="results/tables/paired_differences.md",
    params:
        metrics=section_settings("metrics"),
        config_hash=CONFIG_HASH,
        code=code_fingerprint("hsconv.paired"),
    log: "results/logs/paired_differences.log"
    benchmark: "results/benchmarks/paired_differences.tsv"
    conda: "../../envs/torch.yaml"
    shell:
        "hsconv paired-differences --documents {input} --out {output.parquet} --settings {params.metrics}"
        " --config-hash {params.config_hash} > {log} 2>&1"


use rule paired_differences as paired_tuned_lens_differences with:
    input:
        expand("results/evaluation/{model}/{variant}/per_document.parquet", model=TUNED_LENS_MODELS,
               variant=["base", "tuned_lens"]),
    output:
        parquet="results/tables/tuned_lens/paired_differences.parquet",
        csv=report("results/tables/tuned_lens/paired_differences.csv", caption="../report/paired_table.rst",
                   category="Tuned lens"),
        md="results/tables/tuned_lens/paired_differences.md",
    log: "results/logs/paired_tuned_lens_differences.log"
    benchmark: "results/benchmarks/paired_tuned_lens_differences.tsv"
