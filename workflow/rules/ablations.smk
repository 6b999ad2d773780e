# Which of the paper's loss choices matter (hsconv.ablations): one distillation per setting, each judged by S_model
# and D_L on held-out text and by its stock LAMBADA accuracy against the reference's.


use rule evaluate_layers as evaluate_ablation with:
    """A model's own LAMBADA accuracy (stock lm-eval, its output) and every passage's outcome, for paired intervals."""
    input:
        model=variant_model_dir,
        texts=f"results/data/eval/{ABLATIONS.get('dataset', 'lambada')}.parquet",
    output:
        table="results/ablations/{model}/{variant}/stock.parquet",
        json="results/ablations/{model}/{variant}/stock_lm_eval.json",
        documents="results/ablations/{model}/{variant}/per_document.parquet",
    params:
        exits="--stock",
        settings=section_settings("evaluation", settings.EvaluationSettings, leave_out=["layers"]),  # one exit
        datasets=evaluation_datasets([ABLATIONS.get("dataset", "lambada")]),
    log: "results/logs/evaluate_ablation/{model}/{variant}.log"
    benchmark: "results/benchmarks/evaluate_ablation/{model}/{variant}.tsv"


rule tabulate_ablations:
    """Per setting: S_model, D_L, stock LAMBADA accuracy and its paired difference from the reference."""
    input:
        convergence=ablation_pieces("results/metrics/{model}/{variant}/{dataset}/convergence.parquet"),
        stock=ablation_pieces("results/ablations/{model}/{variant}/stock.parquet"),
        documents=ablation_pieces("results/ablations/{model}/{variant}/per_document.parquet"),
    output:
        parquet="results/tables/ablations.parquet",
        csv=report("results/tables/ablations.csv", caption="../report/ablations_table.rst", category="Tables"),
        md="results/tables/ablations.md",
    params:
        settings=shell_quoted(json.dumps(ABLATION_SETTINGS, sort_keys=True)),
        variants=shell_quoted(json.dumps(ABLATION_VARIANTS)),
        metrics=section_settings("metrics", settings.MetricsSettings),
        config_hash=CONFIG_HASH,
        code=code_fingerprint("hsconv.ablations"),
    log: "results/logs/tabulate_ablations.log"
    benchmark: "results/benchmarks/tabulate_ablations.tsv"
    conda: "../../envs/torch.yaml"
    shell:
        "hsconv tabulate-ablations --convergence {input.convergence} --stock {input.stock}"
        " --documents {input.documents} --ablation-settings {params.settings} --variants {params.variants}"
        " --out {output.parquet} --settings {params.metrics} --config-hash {params.config_hash} > {log} 2>&1"


rule plot_ablations:
    """S_model, D_L and the LAMBADA accuracy difference per setting, one row per model."""
    input:
        "results/tables/ablations.parquet",
    output:
        pdf=report("results/figures/ablations.pdf", caption="../report/ablations.rst", category="Figures"),
        png="results/figures/ablations.png",
    params:
        models=model_labels(ABLATION_MODELS),
        final_norm=ABLATIONS.get("final_norm", "pre_norm"),
        code=code_fingerprint("hsconv.figures.ablations"),
    log: "results/logs/plot_ablations.log"
    benchmark: "results/benchmarks/plot_ablations.tsv"
    conda: "../../envs/plot.yaml"
    shell:
        "hsconv plot-ablations --table {input} --pdf {output.pdf} --png {output.png} --model {params.models}"
        " --final-norm {params.final_norm} > {log} 2>&1"
