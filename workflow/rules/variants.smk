# The studies that choose distillation settings on validation text (hsconv.ablations, hsconv.variants): each setting's
# model (rule distill_variant) judged by S_model and D_L on the study's data set and by its stock LAMBADA accuracy.


use rule evaluate_layers as evaluate_stock with:
    """A model's own LAMBADA accuracy (stock lm-eval, its output) and every passage's outcome, for paired intervals."""
    input:
        model=variant_model_dir,
        texts="results/data/eval/{dataset}.parquet",
    output:
        table="results/stock/{model}/{variant}/{dataset}/stock.parquet",
        json="results/stock/{model}/{variant}/{dataset}/stock_lm_eval.json",
        documents="results/stock/{model}/{variant}/{dataset}/per_document.parquet",
    params:
        exits="--stock",
        settings=section_settings("evaluation", leave_out=["layers"]),  # one exit
        datasets=lambda wildcards, input: evaluation_datasets([wildcards.dataset])(wildcards, input),
    log: "results/logs/evaluate_stock/{model}/{variant}/{dataset}.log"
    benchmark: "results/benchmarks/evaluate_stock/{model}/{variant}/{dataset}.tsv"


rule tabulate_ablations:
    """Per setting: S_model, D_L, stock LAMBADA accuracy and its paired difference from the reference."""
    input:
        convergence=study_pieces("results/metrics/{model}/{variant}/{dataset}/convergence.parquet", "ablations"),
        stock=study_pieces("results/stock/{model}/{variant}/{dataset}/stock.parquet", "ablations"),
        documents=study_pieces("results/stock/{model}/{variant}/{dataset}/per_document.parquet", "ablations"),
    output:
        parquet="results/tables/ablations.parquet",
        csv=report("results/tables/ablations.csv", caption="../report/ablations_table.rst", category="Tables"),
        md="results/tables/ablations.md",
    params:
        study="ablations",
        settings=shell_quoted(json.dumps(TRAINING.ablation_settings, sort_keys=True)),
        variants=shell_quoted(json.dumps(TRAINING.ablations)),
        metrics=section_settings("metrics"),
        config_hash=CONFIG_HASH,
        code=code_fingerprint("hsconv.ablations"),
    log: "results/logs/tabulate_ablations.log"
    benchmark: "results/benchmarks/tabulate_ablations.tsv"
    conda: "../../envs/torch.yaml"
    shell:
        "hsconv tabulate-variants --study {params.study} --convergence {input.convergence} --stock {input.stock}"
        " --documents {input.documents} --variant-settings {params.settings} --variants {params.variants}"
        " --out {output.parquet} --settings {params.metrics} --config-hash {params.config_hash} > {log} 2>&1"


use rule tabulate_ablations as tabulate_recipes with:
    """Per recipe: S_model, D_L, stock LAMBADA accuracy and its paired difference from the pretrained model."""
    input:
        convergence=study_pieces("results/metrics/{model}/{variant}/{dataset}/convergence.parquet", "recipes"),
        stock=study_pieces("results/stock/{model}/{variant}/{dataset}/stock.parquet", "recipes"),
        documents=study_pieces("results/stock/{model}/{variant}/{dataset}/per_document.parquet", "recipes"),
    output:
        parquet="results/tables/recipes.parquet",
        csv=report("results/tables/recipes.csv", caption="../report/recipes_table.rst", category="Tables"),
        md="results/tables/recipes.md",
    params:
        study="recipes",
        settings=shell_quoted(json.dumps(TRAINING.recipe_settings, sort_keys=True)),
        variants=shell_quoted(json.dumps(TRAINING.recipes)),
        metrics=section_settings("metrics"),
        config_hash=CONFIG_HASH,
        code=code_fingerprint("hsconv.ablations"),
    log: "results/logs/tabulate_recipes.log"
    benchmark: "results/benchmarks/tabulate_recipes.tsv"


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
    log: "results/logs/plot_ablations.log"
    benchmark: "results/benchmarks/plot_ablations.tsv"
    conda: "../../envs/plot.yaml"
    shell:
        "hsconv plot-ablations --table {input} --pdf {output.pdf} --png {output.png} --model {params.models}"
        " --final-norm {params.final_norm} > {log} 2>&1"


rule plot_recipes:
    """The recipes' frontier: S_model against the accuracy each costs, one panel per model."""
    input:
        "results/tables/recipes.parquet",
    output:
        pdf=report("results/figures/recipes.pdf", caption="../report/recipes.rst", category="Figures"),
        png="results/figures/recipes.png",
    params:
        models=model_labels(RECIPE_MODELS),
        code=code_fingerprint("hsconv.figures.frontier"),
    log: "results/logs/plot_recipes.log"
    benchmark: "results/benchmarks/plot_recipes.tsv"
    conda: "../../envs/plot.yaml"
    shell:
        "hsconv plot-frontier --table {input} --pdf {output.pdf} --png {output.png} --model {params.models}"
        " > {log} 2>&1"
