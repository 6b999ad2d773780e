rule prepare_texts:
    """One evaluation data set, parsed, cleaned and subset once, as Parquet."""
    output:
        "results/data/eval/{dataset}.parquet",
    params:
        kind=dataset_setting("kind"),
        path=dataset_setting("path"),
        hub_id=dataset_setting("hub_id"),
        size=subset_setting("size"),
        mode=subset_setting("mode"),
        seed=subset_setting("seed"),
        code=code_fingerprint("hsconv.texts"),
    log:
        "results/logs/prepare_texts/{dataset}.log",
    threads: 1
    conda:
        "../../envs/torch.yaml"
    shell:
        "hsconv prepare-texts --name {wildcards.dataset} --kind {params.kind} --path '{params.path}'"
        " --hub-id '{params.hub_id}' --subset-size {params.size} --subset-mode {params.mode}"
        " --subset-seed {params.seed} --out {output} > {log} 2>&1"
