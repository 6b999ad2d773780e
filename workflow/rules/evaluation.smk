EVALUATION = config["evaluation"]


rule evaluate_layers:
    """Per-layer LAMBADA accuracy and WikiText perplexity for one model and variant: lm-eval's stock tasks, scored at
    every exit through the logit lens, all exits from one forward pass per request batch. Variant `tuned_lens` is the
    base model read through its tuned lens (rules/tuned_lens.smk)."""
    input:
        model=evaluated_model_dir,
        lens=tuned_lens_dir,
        texts=expand("results/data/eval/{dataset}.parquet", dataset=EVALUATED_DATASETS),
    output:
        table="results/evaluation/{model}/{variant}/per_layer.parquet",
        json="results/evaluation/{model}/{variant}/lm_eval.json",
        documents="results/evaluation/{model}/{variant}/per_document.parquet",
    wildcard_constraints:
        variant=regex_alternatives([*VARIANTS, *ABLATION_VARIANTS.values(), "tuned_lens"]),
    params:
        datasets=dataset_args(EVALUATED_DATASETS),
        lens=lambda wildcards, input: f"--tuned-lens {input.lens}" if input.lens else "",
        limits=" ".join(f"{name}={limit}" for name, limit in EVALUATION["limits"].items()),
        layers=" ".join(map(str, EVALUATION["layers"] or [])),
        batch_size=EVALUATION["batch_size"],
        bootstrap_iters=EVALUATION["bootstrap_iters"],
        dtype=model_setting("dtype"),
        device=model_setting("device"),
        code=code_fingerprint("hsconv.evaluation.per_layer"),
    log:
        "results/logs/evaluate_layers/{model}/{variant}.log",
    benchmark:
        "results/benchmarks/evaluate_layers/{model}/{variant}.tsv"
    threads: 8  # scaled down to --cores
    resources:
        mem_mb=16000,
    conda:
        "../../envs/torch.yaml"
    shell:
        "OMP_NUM_THREADS={threads} hsconv evaluate-layers --model-dir {input.model} --dataset {params.datasets}"
        " --limit {params.limits} --layers {params.layers} --out {output.table} --json-out {output.json}"
        " --documents-out {output.documents} {params.lens}"
        " --model {wildcards.model} --variant {wildcards.variant} --batch-size {params.batch_size}"
        " --dtype {params.dtype} --device {params.device} --bootstrap-iters {params.bootstrap_iters} > {log} 2>&1"


rule tabulate_evaluation:
    """All models' and variants' per-layer lm-eval metrics in one tidy table."""
    input:
        expand("results/evaluation/{model}/{variant}/per_layer.parquet", model=MODELS, variant=VARIANTS),
    output:
        parquet="results/tables/per_layer_evaluation.parquet",
        csv="results/tables/per_layer_evaluation.csv",
        md="results/tables/per_layer_evaluation.md",
    params:
        config_hash=CONFIG_HASH,
        code=code_fingerprint("hsconv.tables"),
    log:
        "results/logs/tabulate_evaluation.log",
    benchmark:
        "results/benchmarks/tabulate_evaluation.tsv"
    conda:
        "../../envs/torch.yaml"
    shell:
        "hsconv gather-tables --inputs {input} --out {output.parquet} --config-hash {params.config_hash}"
        " > {log} 2>&1"


use rule tabulate_evaluation as tabulate_tuned_lens_evaluation with:
    input:
        expand("results/evaluation/{model}/{variant}/per_layer.parquet", model=TUNED_LENS_MODELS, variant=VARIANTS),
        expand("results/evaluation/{model}/tuned_lens/per_layer.parquet", model=TUNED_LENS_MODELS),
    output:
        parquet="results/tables/tuned_lens/per_layer_evaluation.parquet",
        csv="results/tables/tuned_lens/per_layer_evaluation.csv",
        md="results/tables/tuned_lens/per_layer_evaluation.md",
    log:
        "results/logs/tabulate_tuned_lens_evaluation.log",
    benchmark:
        "results/benchmarks/tabulate_tuned_lens_evaluation.tsv"


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
    log:
        "results/logs/plot_{figure}.log",
    benchmark:
        "results/benchmarks/plot_{figure}.tsv"
    conda:
        "../../envs/plot.yaml"
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
    log:
        "results/logs/plot_tuned_lens_{figure}.log",
    benchmark:
        "results/benchmarks/plot_tuned_lens_{figure}.tsv"
