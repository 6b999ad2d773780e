# The tuned-lens baseline (hsconv.tuned_lens): translators learned on the frozen base model, read like the logit lens
# (evaluate_layers with variant `tuned_lens`), so that Figs. 5 and 6 show whether self-distillation beats simply
# learning a better lens.
TUNED_LENS = config["tuned_lens"]


rule train_tuned_lens:
    """One affine translator per layer of the base model, trained on the packed corpus (KL to the model's output)."""
    input:
        model="results/models/{model}/base",
        tokens=model_tokens,
    output:
        lens=directory("results/tuned_lens/{model}/lens"),
        log="results/tuned_lens/{model}/training.parquet",
    params:
        steps=TUNED_LENS["steps"],
        batch_size=TUNED_LENS["batch_size"],
        micro_batch_size=cli_optional(TUNED_LENS["micro_batch_size"]),
        learning_rate=TUNED_LENS["learning_rate"],
        holdout=TUNED_LENS["holdout_sequences"],
        seed=TUNED_LENS["seed"],
        device=model_setting("device"),
        code=code_fingerprint("hsconv.tuned_lens"),
    log:
        "results/logs/train_tuned_lens/{model}.log",
    benchmark:
        "results/benchmarks/train_tuned_lens/{model}.tsv"
    threads: 8  # scaled down to --cores
    resources:
        mem_mb=16000,
    conda:
        "../../envs/torch.yaml"
    shell:
        "OMP_NUM_THREADS={threads} hsconv train-tuned-lens --model-dir {input.model} --tokens {input.tokens}"
        " --out {output.lens} --log-out {output.log} --steps {params.steps} --batch-size {params.batch_size}"
        " --micro-batch-size {params.micro_batch_size} --learning-rate {params.learning_rate} --holdout-sequences {params.holdout} --seed {params.seed}"
        " --device {params.device} > {log} 2>&1"
