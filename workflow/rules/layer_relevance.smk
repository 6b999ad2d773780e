rule measure_layer_relevance:
    """Every block of one model and variant removed alone, then the greedy prunings, through lm-eval's stock tasks
    against the intact model (one intact pass per batch; a removal reruns only the blocks after it)."""
    input:
        model=variant_model_dir,
        texts=expand("results/data/eval/{dataset}.parquet", dataset=RELEVANCE_DATASETS),
    output:
        documents="results/layer_relevance/{model}/{variant}/documents.parquet",
        layers="results/layer_relevance/{model}/{variant}/layers.parquet",
    params:
        datasets=evaluation_datasets(RELEVANCE_DATASETS, section="layer_relevance"),
        settings=section_settings("layer_relevance"),
        device=model_setting("device"),
        code=code_fingerprint("hsconv.evaluation.layer_skip"),
    log: "results/logs/measure_layer_relevance/{model}/{variant}.log"
    benchmark: "results/benchmarks/measure_layer_relevance/{model}/{variant}.tsv"
    threads: RESOURCES["evaluate"]["threads"]
    resources:
        mem_mb=RESOURCES["evaluate"]["mem_mb"],
    conda: "../../envs/torch.yaml"
    shell:
        "OMP_NUM_THREADS={threads} hsconv layer-relevance --model-dir {input.model} {params.datasets}"
        " --documents-out {output.documents} --layers-out {output.layers} --model {wildcards.model}"
        " --variant {wildcards.variant} --device {params.device} --settings {params.settings} > {log} 2>&1"


rule tabulate_layer_relevance:
    """Per block: movement, norm and the removal effect with intervals; their rank agreement; the greedy prunings."""
    input:
        documents=relevance_measurements("documents"),
        layers=relevance_measurements("layers"),
    output:
        table="results/tables/layer_relevance.parquet",
        csv=report("results/tables/layer_relevance.csv", caption="../report/layer_relevance_table.rst",
                   category="Layer relevance"),
        agreement="results/tables/layer_relevance_agreement.parquet",
        pruning="results/tables/layer_pruning.parquet",
        for_people=["results/tables/layer_relevance.md",
                    *expand("results/tables/{table}.{ext}", table=("layer_relevance_agreement", "layer_pruning"),
                            ext=("csv", "md"))],
    params:
        metrics=section_settings("metrics"),
        config_hash=CONFIG_HASH,
        code=code_fingerprint("hsconv.layer_relevance"),
    log: "results/logs/tabulate_layer_relevance.log"
    benchmark: "results/benchmarks/tabulate_layer_relevance.tsv"
    conda: "../../envs/torch.yaml"
    shell:
        "hsconv tabulate-layer-relevance --documents {input.documents} --layers {input.layers} --out {output.table}"
        " --agreement-out {output.agreement} --pruning-out {output.pruning} --settings {params.metrics}"
        " --config-hash {params.config_hash} > {log} 2>&1"


rule plot_layer_relevance:
    """Per model: D_l beside the removal KL per block, and the greedy prunings, base solid and distilled dashed."""
    input:
        table="results/tables/layer_relevance.parquet",
        pruning="results/tables/layer_pruning.parquet",
    output:
        pdf=report("results/figures/layer_relevance.pdf", caption="../report/layer_relevance.rst",
                   category="Layer relevance"),
        png="results/figures/layer_relevance.png",
    params:
        models=model_labels(RELEVANCE_MODELS),
        code=code_fingerprint("hsconv.figures.layer_relevance"),
    log: "results/logs/plot_layer_relevance.log"
    benchmark: "results/benchmarks/plot_layer_relevance.tsv"
    conda: "../../envs/plot.yaml"
    shell:
        "hsconv plot-layer-relevance --table {input.table} --pruning {input.pruning} --pdf {output.pdf}"
        " --png {output.png} --model {params.models} > {log} 2>&1"
