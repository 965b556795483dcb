rule evaluate:
    input:
        checkpoint="results/runs/{method}/{model}/{modality}/n{n}/s{seed}/checkpoint.safetensors",
        run="results/runs/{method}/{model}/{modality}/n{n}/s{seed}/run.json",
        tasks=TASK_FILES,
        mlflow=ancient(MLFLOW_INIT),
    output:
        "results/runs/{method}/{model}/{modality}/n{n}/s{seed}/eval.json",
    params:
        job=lambda w: eval_job(w, "pretrained"),
        tasks=lambda w, input: os.path.dirname(input.tasks[0]),
    threads: config["evaluate"]["threads"]
    log:
        "results/logs/evaluate/{method}_{model}_{modality}_n{n}_s{seed}.log",
    message:
        "Linear probes of {wildcards.method} {wildcards.model} n{wildcards.n} on every task"
    shell:
        "biovfm evaluate --job {params.job:q} --tasks {params.tasks:q} --checkpoint {input.checkpoint:q} "
        "--threads {threads} --out {output:q} 2>&1 | tee {log:q}"


rule evaluate_random_init:
    input:
        tasks=TASK_FILES,
        mlflow=ancient(MLFLOW_INIT),
    output:
        "results/baselines/random/{model}/s{seed}/eval.json",
    params:
        job=lambda w: eval_job(w, "random_init"),
        tasks=lambda w, input: os.path.dirname(input.tasks[0]),
    threads: config["evaluate"]["threads"]
    log:
        "results/logs/evaluate/random_{model}_s{seed}.log",
    message:
        "Linear probes of a random-init {wildcards.model} (seed {wildcards.seed})"
    shell:
        "biovfm evaluate --job {params.job:q} --tasks {params.tasks:q} --threads {threads} --out {output:q} 2>&1 | tee {log:q}"


rule evaluate_raw_pixels:
    input:
        tasks=TASK_FILES,
        mlflow=ancient(MLFLOW_INIT),
    output:
        "results/baselines/raw/pixels/eval.json",
    params:
        job=lambda w: eval_job(w, "raw_pixels"),
        tasks=lambda w, input: os.path.dirname(input.tasks[0]),
    threads: config["evaluate"]["threads"]
    log:
        "results/logs/evaluate/raw_pixels.log",
    message:
        "Linear probes on raw pixels (baseline)"
    shell:
        "biovfm evaluate --job {params.job:q} --tasks {params.tasks:q} --threads {threads} --out {output:q} 2>&1 | tee {log:q}"
