rule evaluate_layers:
    """lm-eval's stock tasks at every exit of one model and variant (`tuned_lens`: the base through its tuned lens)."""
    input:
        model=evaluated_model_dir,
        lens=tuned_lens_dir,
        texts=expand("results/data/eval/{dataset}.parquet", dataset=EVALUATED_DATASETS),
    output:
        table="results/evaluation/{model}/{variant}/per_layer.parquet",
        json="results/evaluation/{model}/{variant}/lm_eval.json",
        documents="results/evaluation/{model}/{variant}/per_document.parquet",
    params:
        exits="",  # every exit through the lens; the rules reusing this one score a model's output alone
        datasets=evaluation_datasets(EVALUATED_DATASETS),
        settings=section_settings("evaluation"),
        run=evaluation_args,
        code=code_fingerprint("hsconv.evaluation.per_layer"),
    log: "results/logs/evaluate_layers/{model}/{variant}.log",
    benchmark: "results/benchmarks/evaluate_layers/{model}/{variant}.tsv"
    threads: RESOURCES["evaluate"]["threads"]
    resources:
        mem_mb=RESOURCES["evaluate"]["mem_mb"],
    conda: "../../envs/torch.yaml"
    shell:
        "OMP_NUM_THREADS={threads} hsconv evaluate-layers {params.exits} --model-dir {input.model} {params.datasets}"
        " {params.run} --settings {params.settings} > {log} 2>&1"


rule plot_per_layer_figure:
    """Figs. 5 and 9 (LAMBADA accuracy) and 6 and 10 (WikiText word perplexity) at every exit layer."""
    input:
        "results/tables/per_layer_evaluation.parquet",
    output:
        pdf=report("results/figures/{figure}.pdf", caption="../report/per_layer.rst", category="Figures"),
        png="results/figures/{figure}.png",
    wildcard_constraints:
        figure="fig5|fig6|fig9|fig10",
    params:
        models=figure_models(),
        dataset=figure_setting("dataset"),
        metric=per_layer_metric,
        title=figure_title,
        code=code_fingerprint("hsconv.figures.per_layer"),
    log: "results/logs/plot_{figure}.log"
    benchmark: "results/benchmarks/plot_{figure}.tsv"
    conda: "../../envs/plot.yaml"
    shell:
        "hsconv plot-per-layer --table {input} --pdf {output.pdf} --png {output.png} --model {params.models}"
        " --task {params.dataset} --metric {params.metric} --title {params.title:q} > {log} 2>&1"


use rule plot_per_layer_figure as plot_tuned_lens_figure with:
    input:
        "results/tables/tuned_lens/per_layer_evaluation.parquet",
    output:
        pdf=report("results/figures/tuned_lens/{figure}.pdf", caption="../report/per_layer.rst",
                   category="Tuned lens"),
        png="results/figures/tuned_lens/{figure}.png",
    params:
        title=tuned_lens_figure_title,
    log: "results/logs/plot_tuned_lens_{figure}.log"
    benchmark: "results/benchmarks/plot_tuned_lens_{figure}.tsv"
