DISTILL = config["distill"]


rule cache_teacher:
    """The frozen model's top-k distribution over the packed corpus, computed once for every distillation of the
    model that sets distill.teacher_top_k (hsconv.distill.teacher)."""
    input:
        model="results/models/{model}/base",
        tokens=model_tokens,
    output:
        directory("results/teacher/{model}/top{top_k}"),
    params:
        device=model_setting("device"),
        dtype=teacher_dtype,
        code=code_fingerprint("hsconv.distill.teacher"),
    log: "results/logs/cache_teacher/{model}/top{top_k}.log",
    benchmark: "results/benchmarks/cache_teacher/{model}/top{top_k}.tsv"
    threads: DISTILL["resources"]["threads"]
    resources:
        **teacher_resources(),
    conda: "../../envs/torch.yaml"
    shell:
        "OMP_NUM_THREADS={threads} hsconv cache-teacher --model-dir {input.model} --tokens {input.tokens}"
        " --out {output} --top-k {wildcards.top_k} --device {params.device} --dtype {params.dtype} > {log} 2>&1"


# Checkpoints go to results/checkpoints/{model}/<settings hash>/ (not an output, so a failed or killed job keeps them):
# rerunning the job resumes from the newest one, while changed settings start afresh.
rule distill:
    """Self-distillation of one model against its frozen pretrained self, under DeepSpeed ZeRO."""
    input:
        model="results/models/{model}/base",
        tokens=model_tokens,
        teacher=teacher_cache_input(DISTILL),
    output:
        model=directory("results/models/{model}/distilled"),
        steps="results/training/{model}/steps.parquet",
        layers="results/training/{model}/layers.parquet",
    params:
        settings=distill_settings_json,
        run=distill_args("results/checkpoints/{model}"),
        launcher=distill_launcher(),
        code=code_fingerprint("hsconv.distill.train", "hsconv.distill.teacher", "hsconv.cluster"),
    log: "results/logs/distill/{model}.log",
    benchmark: "results/benchmarks/distill/{model}.tsv"
    threads: DISTILL["resources"]["threads"]
    resources:
        **distill_resources(),
    conda: "../../envs/torch.yaml"
    shell:
        "OMP_NUM_THREADS={threads} {params.launcher} distill {params.run} --settings {params.settings:q}"
        " --model-dir {input.model} --tokens {input.tokens} --out {output.model} --log-out {output.steps}"
        " --layers-out {output.layers} > {log} 2>&1"


# A seed, an ablation setting or a recipe (hsconv.variants): the main run's job with the variant's settings.
use rule distill as distill_variant with:
    input:
        model="results/models/{model}/base",
        tokens=model_tokens,
        teacher=variant_teacher_cache,
    output:
        model=directory("results/models/{model}/{variant}"),
        steps="results/training/{model}/{variant}/steps.parquet",
        layers="results/training/{model}/{variant}/layers.parquet",
    params:
        settings=variant_settings_json,
        run=distill_args("results/checkpoints/{model}/{variant}"),
    wildcard_constraints:
        variant=regex_alternatives(TRAINING.settings),
    log: "results/logs/distill_variant/{model}/{variant}.log",
    benchmark: "results/benchmarks/distill_variant/{model}/{variant}.tsv"


rule tabulate_seeds:
    """S_model and the last-layer ratio over the main distillation's seeds: mean, standard deviation and range, beside
    the first seed's bootstrap interval."""
    input:
        expand("results/metrics/{model}/{variant}/{dataset}/convergence.parquet", model=MODELS,
               variant=SEED_VARIANTS, dataset=MEASURED_DATASETS),
    output:
        parquet="results/tables/seeds.parquet",
        csv="results/tables/seeds.csv",
        md="results/tables/seeds.md",
    params:
        names="distilled",  # the main run: distilled, distilled-seed-1, ...
        first_seed=DISTILL["seed"],
        seeds=DISTILL["seeds"],
        config_hash=CONFIG_HASH,
        code=code_fingerprint("hsconv.seeds"),
    log: "results/logs/tabulate_seeds.log"
    benchmark: "results/benchmarks/tabulate_seeds.tsv"
    conda: "../../envs/torch.yaml"
    shell:
        "hsconv tabulate-seeds --tables {input} --variants {params.names} --first-seed {params.first_seed}"
        " --seeds {params.seeds} --out {output.parquet} --config-hash {params.config_hash} > {log} 2>&1"


use rule tabulate_seeds as tabulate_departure_seeds with:
    """The same spread over seeds for the main run and each departure from the paper's loss, side by side."""
    input:
        expand("results/metrics/{model}/{variant}/{dataset}/convergence.parquet", model=MODELS,
               variant=[*SEED_VARIANTS, *DEPARTURE_VARIANTS], dataset=MEASURED_DATASETS),
    output:
        parquet="results/tables/departures_seeds.parquet",
        csv="results/tables/departures_seeds.csv",
        md="results/tables/departures_seeds.md",
    params:
        names=SPREAD_NAMES,
        first_seed=DISTILL["seed"],
        seeds=DISTILL["seeds"],
        config_hash=CONFIG_HASH,
        code=code_fingerprint("hsconv.seeds"),
    log: "results/logs/tabulate_departure_seeds.log"
    benchmark: "results/benchmarks/tabulate_departure_seeds.tsv"


rule plot_training:
    """Loss curves of one distillation run: ζ, ζ1, ζ2 per step and the per-layer KL at the first and last step."""
    input:
        steps="results/training/{model}/steps.parquet",
        layers="results/training/{model}/layers.parquet",
    output:
        pdf=report("results/figures/training/{model}.pdf", caption="../report/training.rst", category="Training"),
        png="results/figures/training/{model}.png",
    params:
        title=training_title,
        code=code_fingerprint("hsconv.figures.training"),
    log: "results/logs/plot_training/{model}.log"
    benchmark: "results/benchmarks/plot_training/{model}.tsv"
    conda: "../../envs/plot.yaml"
    shell:
        "hsconv plot-training --log {input.steps} --layers {input.layers} --pdf {output.pdf} --png {output.png}"
        " --title {params.title:q} > {log} 2>&1"
