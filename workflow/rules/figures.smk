FIGURES = config["figures"]


rule plot_movement_figure:
    """Figs. 3 (main models) and 8 (Qwen): D_l per layer, one panel per model, base solid and distilled dashed."""
    input:
        "results/tables/layer_movement.parquet",
    output:
        pdf=report("results/figures/{figure}.pdf", caption="../report/movement.rst", category="Figures"),
        png="results/figures/{figure}.png",
    wildcard_constraints:
        figure="fig3|fig8",
    params:
        models=figure_models(),
        dataset=figure_setting("dataset"),
        final_norm=figure_setting("final_norm"),
        title=figure_title,
        code=code_fingerprint("hsconv.figures.movement"),
    log: "results/logs/plot_{figure}.log"
    benchmark: "results/benchmarks/plot_{figure}.tsv"
    conda: "../../envs/plot.yaml"
    shell:
        "hsconv plot-movement --table {input} --pdf {output.pdf} --png {output.png} --model {params.models}"
        " --dataset {params.dataset} --final-norm {params.final_norm} --title {params.title:q} > {log} 2>&1"


rule trace_sentence:
    """One sentence through every layer of one model and variant: logit-lens top-1 tokens, D_l, 3-D PCA."""
    input:
        model=variant_model_dir,
    output:
        lens="results/sentence/{model}/{variant}/lens.parquet",
        pca="results/sentence/{model}/{variant}/pca.parquet",
    params:
        settings=section_settings("sentence"),
        model=model_args,
        code=code_fingerprint("hsconv.sentence"),
    log: "results/logs/trace_sentence/{model}/{variant}.log"
    benchmark: "results/benchmarks/trace_sentence/{model}/{variant}.tsv"
    threads: RESOURCES["trace_sentence"]["threads"]
    resources:
        mem_mb=RESOURCES["trace_sentence"]["mem_mb"],
    conda: "../../envs/torch.yaml"
    shell:
        "OMP_NUM_THREADS={threads} hsconv trace-sentence --model-dir {input.model} --settings {params.settings}"
        " --lens-out {output.lens} --pca-out {output.pca} {params.model} > {log} 2>&1"


rule plot_fig4:
    """Fig. 4: the sentence's hidden states at every layer in 3-D (PCA), one panel per model and variant."""
    input:
        "results/tables/sentence_pca.parquet",
    output:
        pdf=report("results/figures/fig4.pdf", caption="../report/fig4.rst", category="Figures"),
        png="results/figures/fig4.png",
    params:
        models=figure_models("fig4"),
        variants=" ".join(VARIANTS),
        final_norm=figure_setting("final_norm", "fig4"),
        code=code_fingerprint("hsconv.figures.trajectory"),
    log: "results/logs/plot_fig4.log"
    benchmark: "results/benchmarks/plot_fig4.tsv"
    conda: "../../envs/plot.yaml"
    shell:
        "hsconv plot-trajectory --table {input} --pdf {output.pdf} --png {output.png} --model {params.models}"
        " --variants {params.variants} --final-norm {params.final_norm} > {log} 2>&1"


rule plot_fig7:
    """Fig. 7: the logit lens's top-1 token per layer at the sentence's last tokens, and D_l there."""
    input:
        "results/tables/sentence_lens.parquet",
    output:
        pdf=report("results/figures/fig7.pdf", caption="../report/fig7.rst", category="Figures"),
        png="results/figures/fig7.png",
    params:
        model=lambda wildcards: figure_config("fig7")["model"],
        label=lambda wildcards: shell_quoted(model_label(figure_config("fig7")["model"])),
        variants=" ".join(VARIANTS),
        final_norm=figure_setting("final_norm", "fig7"),
        code=code_fingerprint("hsconv.figures.lens_heatmap"),
    log: "results/logs/plot_fig7.log"
    benchmark: "results/benchmarks/plot_fig7.tsv"
    conda: "../../envs/plot.yaml"
    shell:
        "hsconv plot-lens-heatmap --table {input} --pdf {output.pdf} --png {output.png} --model {params.model}"
        " --label {params.label} --variants {params.variants} --final-norm {params.final_norm} > {log} 2>&1"
