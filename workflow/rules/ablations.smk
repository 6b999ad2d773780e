# Which of the paper's loss choices matter (hsconv.ablations): one distillation per setting, each judged by S_model
# and D_L on held-out text and by its stock LAMBADA accuracy against the reference's.


def ablation_variants():
    """The pretrained model, then every setting's variant in the order the settings were declared."""
    return ["base", *ABLATION_VARIANTS.values()]


def ablation_dataset_arg(wildcards, input):
    return f"{ABLATIONS['dataset']}=lambada={input.texts}"


def ablation_limit_arg():
    limit = config["evaluation"]["limits"].get(ABLATIONS["dataset"])
    return "" if limit is None else f"--limit {ABLATIONS['dataset']}={limit}"


rule evaluate_ablation:
    """A model's own LAMBADA accuracy (stock lm-eval, its output) and every passage's outcome, for paired intervals."""
    input:
        model=variant_model_dir,
        texts=f"results/data/eval/{ABLATIONS.get('dataset', 'lambada')}.parquet",
    output:
        table="results/ablations/{model}/{variant}/stock.parquet",
        json="results/ablations/{model}/{variant}/stock_lm_eval.json",
        documents="results/ablations/{model}/{variant}/per_document.parquet",
    params:
        dataset=ablation_dataset_arg,
        limit=ablation_limit_arg(),
        batch_size=EVALUATION["batch_size"],
        bootstrap_iters=EVALUATION["bootstrap_iters"],
        dtype=model_setting("dtype"),
        device=model_setting("device"),
        code=code_fingerprint("hsconv.evaluation.per_layer"),
    log:
        "results/logs/evaluate_ablation/{model}/{variant}.log",
    benchmark:
        "results/benchmarks/evaluate_ablation/{model}/{variant}.tsv"
    threads: 8  # scaled down to --cores
    resources:
        mem_mb=16000,
    conda:
        "../../envs/torch.yaml"
    shell:
        "OMP_NUM_THREADS={threads} hsconv evaluate-layers --stock --model-dir {input.model} --dataset {params.dataset}"
        " {params.limit} --out {output.table} --json-out {output.json} --documents-out {output.documents}"
        " --model {wildcards.model} --variant {wildcards.variant} --batch-size {params.batch_size}"
        " --dtype {params.dtype} --device {params.device} --bootstrap-iters {params.bootstrap_iters} > {log} 2>&1"


rule tabulate_ablations:
    """Per setting: S_model, D_L, stock LAMBADA accuracy and its paired difference from the reference."""
    input:
        convergence=expand("results/metrics/{model}/{variant}/{dataset}/convergence.parquet",
                           model=ABLATION_MODELS, variant=ablation_variants(), dataset=ABLATIONS.get("dataset")),
        stock=expand("results/ablations/{model}/{variant}/stock.parquet", model=ABLATION_MODELS,
                     variant=ablation_variants()),
        documents=expand("results/ablations/{model}/{variant}/per_document.parquet", model=ABLATION_MODELS,
                         variant=ablation_variants()),
    output:
        parquet="results/tables/ablations.parquet",
        csv=report("results/tables/ablations.csv", caption="../report/ablations_table.rst", category="Tables"),
        md="results/tables/ablations.md",
    params:
        settings=shell_quoted(json.dumps(ABLATION_SETTINGS, sort_keys=True)),
        variants=shell_quoted(json.dumps(ABLATION_VARIANTS)),
        samples=config["metrics"]["bootstrap_samples"],
        confidence=config["metrics"]["confidence"],
        seed=config["metrics"]["seed"],
        config_hash=CONFIG_HASH,
        code=code_fingerprint("hsconv.ablations"),
    log:
        "results/logs/tabulate_ablations.log",
    benchmark:
        "results/benchmarks/tabulate_ablations.tsv"
    conda:
        "../../envs/torch.yaml"
    shell:
        "hsconv tabulate-ablations --convergence {input.convergence} --stock {input.stock}"
        " --documents {input.documents} --settings {params.settings} --variants {params.variants}"
        " --out {output.parquet} --bootstrap-samples {params.samples} --confidence {params.confidence}"
        " --seed {params.seed} --config-hash {params.config_hash} > {log} 2>&1"


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
    log:
        "results/logs/plot_ablations.log",
    benchmark:
        "results/benchmarks/plot_ablations.tsv"
    conda:
        "../../envs/plot.yaml"
    shell:
        "hsconv plot-ablations --table {input} --pdf {output.pdf} --png {output.png} --model {params.models}"
        " --final-norm {params.final_norm} > {log} 2>&1"
