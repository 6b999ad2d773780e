FIG3 = config["figures"]["fig3"]


rule plot_fig3:
    """Fig. 3: D_l per layer, one panel per model, base solid and distilled dashed."""
    input:
        "results/tables/layer_movement.parquet",
    output:
        pdf=report("results/figures/fig3.pdf", caption="../report/fig3.rst", category="Figures"),
        png="results/figures/fig3.png",
    params:
        models=model_labels(FIG3["models"]),
        dataset=FIG3["dataset"],
        final_norm=FIG3["final_norm"],
        code=code_fingerprint("hsconv.figures.fig3"),
    log:
        "results/logs/plot_fig3.log",
    conda:
        "../../envs/plot.yaml"
    shell:
        "hsconv plot-fig3 --table {input} --pdf {output.pdf} --png {output.png} --model {params.models}"
        " --dataset {params.dataset} --final-norm {params.final_norm} > {log} 2>&1"
