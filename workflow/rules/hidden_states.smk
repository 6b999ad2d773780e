HIDDEN = config["hidden_states"]


rule dump_hidden_states:
    """Per-token movement D_l between adjacent layers, all layers from one forward pass."""
    input:
        model=variant_model_dir,
        texts="results/data/eval/{dataset}.parquet",
    output:
        "results/hidden/{model}/{variant}/{dataset}.parquet",
    params:
        dtype=model_setting("dtype"),
        device=model_setting("device"),
        batch_size=HIDDEN["batch_size"],
        max_tokens=cli_optional(HIDDEN["max_tokens"]),
        overflow=HIDDEN["overflow"],
        special="" if HIDDEN["exclude_special_tokens"] else "--keep-special-tokens",
        code=code_fingerprint("hsconv.hidden_states"),
    log:
        "results/logs/dump_hidden_states/{model}/{variant}/{dataset}.log",
    benchmark:
        "results/benchmarks/dump_hidden_states/{model}/{variant}/{dataset}.tsv"
    threads: 8  # scaled down to --cores; a profile's set-threads overrides it
    resources:
        mem_mb=8000,
    conda:
        "../../envs/torch.yaml"
    shell:
        "OMP_NUM_THREADS={threads} hsconv dump-hidden-states --model-dir {input.model} --texts {input.texts}"
        " --out {output} --variant {wildcards.variant} --dataset {wildcards.dataset} --dtype {params.dtype}"
        " --device {params.device} --batch-size {params.batch_size} --max-tokens {params.max_tokens}"
        " --overflow {params.overflow} {params.special} > {log} 2>&1"
