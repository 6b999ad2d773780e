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
        settings=section_settings("hidden_states"),
        code=code_fingerprint("hsconv.hidden_states"),
    log: "results/logs/dump_hidden_states/{model}/{variant}/{dataset}.log"
    benchmark: "results/benchmarks/dump_hidden_states/{model}/{variant}/{dataset}.tsv"
    threads: RESOURCES["dump_hidden_states"]["threads"]
    resources:
        mem_mb=RESOURCES["dump_hidden_states"]["mem_mb"],
    conda: "../../envs/torch.yaml"
    shell:
        "OMP_NUM_THREADS={threads} hsconv dump-hidden-states --model-dir {input.model} --texts {input.texts}"
        " --out {output} --variant {wildcards.variant} --dataset {wildcards.dataset} --dtype {params.dtype}"
        " --device {params.device} --settings {params.settings} > {log} 2>&1"
