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
        skip=subset_setting("skip"),
        split=dataset_setting("split"),
        code=code_fingerprint("hsconv.texts"),
    log: "results/logs/prepare_texts/{dataset}.log"
    benchmark: "results/benchmarks/prepare_texts/{dataset}.tsv"
    threads: 1
    conda: "../../envs/torch.yaml"
    shell:
        "hsconv prepare-texts --name {wildcards.dataset} --kind {params.kind} --path {params.path:q}"
        " --hub-id {params.hub_id:q} --subset-size {params.size} --subset-mode {params.mode}"
        " --subset-seed {params.seed} --subset-skip {params.skip} --split {params.split} --out {output} > {log} 2>&1"


rule sample_corpus:
    """Training documents drawn with a seed (streamed from the hub or read from local files), as Parquet shards."""
    output:
        directory("results/data/corpus"),
    params:
        source=json.dumps(config["corpus"]["source"], sort_keys=True),
        settings=section_settings("corpus"),
        code=code_fingerprint("hsconv.corpus"),
    log: "results/logs/sample_corpus.log"
    benchmark: "results/benchmarks/sample_corpus.tsv"
    threads: 1
    conda: "../../envs/torch.yaml"
    shell:
        "hsconv sample-corpus --source {params.source:q} --out {output} --settings {params.settings} > {log} 2>&1"


rule pack_tokens:
    """The corpus tokenised once per tokenizer and packed into fixed-length sequences with EOS between documents."""
    input:
        corpus="results/data/corpus",
        model=tokenizer_model_dir,
    output:
        "results/data/tokens/{tokenizer}.parquet",
    params:
        settings=section_settings("packing"),
        code=code_fingerprint("hsconv.corpus"),
    log: "results/logs/pack_tokens/{tokenizer}.log"
    benchmark: "results/benchmarks/pack_tokens/{tokenizer}.tsv"
    threads: 1
    conda: "../../envs/torch.yaml"
    shell:
        "hsconv pack-tokens --corpus {input.corpus} --model-dir {input.model} --out {output}"
        " --settings {params.settings} > {log} 2>&1"
