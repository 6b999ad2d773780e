METRICS = config["metrics"]


rule compute_convergence:
    """D_l per layer (mean, quantiles, bootstrap interval) and S_model for one model, variant and data set."""
    input:
        "results/hidden/{model}/{variant}/{dataset}.parquet",
    output:
        layers="results/metrics/{model}/{variant}/{dataset}/layer_movement.parquet",
        scores="results/metrics/{model}/{variant}/{dataset}/convergence.parquet",
    params:
        quantiles=" ".join(map(str, METRICS["quantiles"])),
        samples=METRICS["bootstrap_samples"],
        confidence=METRICS["confidence"],
        seed=METRICS["seed"],
        code=code_fingerprint("hsconv.metrics"),
    log:
        "results/logs/compute_convergence/{model}/{variant}/{dataset}.log",
    benchmark:
        "results/benchmarks/compute_convergence/{model}/{variant}/{dataset}.tsv"
    threads: 1
    conda:
        "../../envs/torch.yaml"
    shell:
        "hsconv compute-convergence --hidden {input} --layers-out {output.layers} --scores-out {output.scores}"
        " --model {wildcards.model} --variant {wildcards.variant} --dataset {wildcards.dataset}"
        " --quantiles {params.quantiles} --bootstrap-samples {params.samples} --confidence {params.confidence}"
        " --seed {params.seed} > {log} 2>&1"


rule tabulate_layer_movement:
    """All models' per-layer D in one tidy table (Parquet for figures, CSV/Markdown for people)."""
    input:
        measured_combinations("results/metrics/{model}/{variant}/{dataset}/layer_movement.parquet"),
    output:
        parquet="results/tables/layer_movement.parquet",
        csv="results/tables/layer_movement.csv",
        md="results/tables/layer_movement.md",
    params:
        config_hash=CONFIG_HASH,
        code=code_fingerprint("hsconv.tables"),
    log:
        "results/logs/tabulate_layer_movement.log",
    benchmark:
        "results/benchmarks/tabulate_layer_movement.tsv"
    conda:
        "../../envs/torch.yaml"
    shell:
        "hsconv gather-tables --inputs {input} --out {output.parquet} --config-hash {params.config_hash}"
        " > {log} 2>&1"


rule tabulate_convergence:
    """S_model, last-layer D and its ratio to the layer before, per model, variant, data set and convention."""
    input:
        measured_combinations("results/metrics/{model}/{variant}/{dataset}/convergence.parquet"),
    output:
        parquet="results/tables/convergence.parquet",
        csv="results/tables/convergence.csv",
        md="results/tables/convergence.md",
    params:
        config_hash=CONFIG_HASH,
        code=code_fingerprint("hsconv.tables"),
    log:
        "results/logs/tabulate_convergence.log",
    benchmark:
        "results/benchmarks/tabulate_convergence.tsv"
    conda:
        "../../envs/torch.yaml"
    shell:
        "hsconv gather-tables --inputs {input} --out {output.parquet} --config-hash {params.config_hash}"
        " > {log} 2>&1"


rule compare_convergence:
    """Variant − base S_model and last-layer ratio for one model and data set, paired by document."""
    input:
        base="results/hidden/{model}/base/{dataset}.parquet",
        hidden="results/hidden/{model}/{variant}/{dataset}.parquet",
    output:
        "results/metrics/{model}/{variant}/{dataset}/convergence_paired.parquet",
    params:
        samples=METRICS["bootstrap_samples"],
        confidence=METRICS["confidence"],
        seed=METRICS["seed"],
        code=code_fingerprint("hsconv.metrics"),
    log:
        "results/logs/compare_convergence/{model}/{variant}/{dataset}.log",
    benchmark:
        "results/benchmarks/compare_convergence/{model}/{variant}/{dataset}.tsv"
    threads: 1
    conda:
        "../../envs/torch.yaml"
    shell:
        "hsconv compare-convergence --base {input.base} --hidden {input.hidden} --out {output}"
        " --model {wildcards.model} --variant {wildcards.variant} --dataset {wildcards.dataset}"
        " --bootstrap-samples {params.samples} --confidence {params.confidence} --seed {params.seed} > {log} 2>&1"


use rule tabulate_layer_movement as tabulate_convergence_paired with:
    input:
        measured_comparisons("results/metrics/{model}/{variant}/{dataset}/convergence_paired.parquet"),
    output:
        parquet="results/tables/convergence_paired.parquet",
        csv="results/tables/convergence_paired.csv",
        md="results/tables/convergence_paired.md",
    log:
        "results/logs/tabulate_convergence_paired.log",
    benchmark:
        "results/benchmarks/tabulate_convergence_paired.tsv"
