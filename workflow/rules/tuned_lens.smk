# The tuned-lens baseline (hsconv.tuned_lens): translators learned on the frozen base model, read like the logit lens
# (evaluate_layers with variant `tuned_lens`), so that Figs. 5 and 6 show whether self-distillation beats simply
# learning a better lens.
rule train_tuned_lens:
    """One affine translator per layer of the base model, trained on the packed corpus (KL to the model's output)."""
    input:
        model="results/models/{model}/base",
        tokens=model_tokens,
    output:
        lens=directory("results/tuned_lens/{model}/lens"),
        log="results/tuned_lens/{model}/training.parquet",
    params:
        settings=section_settings("tuned_lens"),
        device=model_setting("device"),
        code=code_fingerprint("hsconv.tuned_lens"),
    log: "results/logs/train_tuned_lens/{model}.log"
    benchmark: "results/benchmarks/train_tuned_lens/{model}.tsv"
    threads: RESOURCES["train_tuned_lens"]["threads"]
    resources:
        mem_mb=RESOURCES["train_tuned_lens"]["mem_mb"],
    conda: "../../envs/torch.yaml"
    shell:
        "OMP_NUM_THREADS={threads} hsconv train-tuned-lens --model-dir {input.model} --tokens {input.tokens}"
        " --out {output.lens} --log-out {output.log} --settings {params.settings} --device {params.device}"
        " > {log} 2>&1"
