rule prepare_model:
    """Resolve a model source (hub id, local directory, GGUF file, tiny random model) into a model directory."""
    output:
        directory("results/models/{model}/base"),
    params:
        source=model_source_json,
        fold=model_flag("fold_final_norm_gain", "--fold-final-norm-gain"),
        code=code_fingerprint("hsconv.models"),
    log: "results/logs/prepare_model/{model}.log"
    benchmark: "results/benchmarks/prepare_model/{model}.tsv"
    threads: 1
    conda: "../../envs/torch.yaml"
    shell:
        "hsconv prepare-model --name {wildcards.model} --source {params.source:q} --out {output} {params.fold}"
        " > {log} 2>&1"
