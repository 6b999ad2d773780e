rule compute_convergence:
    """D_l per layer (mean, quantiles, bootstrap interval) and S_model for one model, variant and data set."""
    input:
        "results/hidden/{model}/{variant}/{dataset}.parquet",
    output:
        layers="results/metrics/{model}/{variant}/{dataset}/layer_movement.parquet",
        scores="results/metrics/{model}/{variant}/{dataset}/convergence.parquet",
    params:
        metrics=section_settings("metrics"),
        code=code_fingerprint("hsconv.metrics"),
    log: "results/logs/compute_convergence/{model}/{variant}/{dataset}.log"
    benchmark: "results/benchmarks/compute_convergence/{model}/{variant}/{dataset}.tsv"
    threads: 1
    conda: "../../envs/torch.yaml"
    shell:
        "hsconv compute-convergence --hidden {input} --layers-out {output.layers} --scores-out {output.scores}"
        " --model {wildcards.model} --variant {wildcards.variant} --dataset {wildcards.dataset}"
        " --settings {params.metrics} > {log} 2>&1"


rule compare_convergence:
    """Variant − base S_model and last-layer ratio for one model and data set, paired by document."""
    input:
        base="results/hidden/{model}/base/{dataset}.parquet",
        hidden="results/hidden/{model}/{variant}/{dataset}.parquet",
    output:
        "results/metrics/{model}/{variant}/{dataset}/convergence_paired.parquet",
    params:
        metrics=section_settings("metrics"),
        code=code_fingerprint("hsconv.metrics"),
    log: "results/logs/compare_convergence/{model}/{variant}/{dataset}.log"
    benchmark: "results/benchmarks/compare_convergence/{model}/{variant}/{dataset}.tsv"
    threads: 1
    conda: "../../envs/torch.yaml"
    shell:
        "hsconv compare-convergence --base {input.base} --hidden {input.hidden} --out {output}"
        " --model {wildcards.model} --variant {wildcards.variant} --dataset {wildcards.dataset}"
        " --settings {params.metrics} > {log} 2>&1"


