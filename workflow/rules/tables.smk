rule gather_table:
    """Per-model tables gathered into one tidy table: Parquet for the figures, CSV and Markdown for people."""
    input:
        gathered_pieces,
    output:
        parquet="results/tables/{table}.parquet",
        csv=report("results/tables/{table}.csv", caption="../report/gathered_table.rst", category="Tables"),
        md="results/tables/{table}.md",
    wildcard_constraints:
        table=regex_alternatives(GATHERED_TABLES),
    params:
        config_hash=CONFIG_HASH,
        code=code_fingerprint("hsconv.tables"),
    log: "results/logs/gather_table/{table}.log"
    benchmark: "results/benchmarks/gather_table/{table}.tsv"
    conda: "../../envs/torch.yaml"
    shell:
        "hsconv gather-tables --inputs {input} --out {output.parquet} --config-hash {params.config_hash} > {log} 2>&1"
