rule evaluate:
    conda:
        CONDA_ENV
    input:
        checkpoint="results/runs/{method}/{model}/{modality}/n{n}/s{seed}/checkpoint.safetensors",
        run="results/runs/{method}/{model}/{modality}/n{n}/s{seed}/run.json",
        tasks=TASK_FILES,
        mlflow=MLFLOW_STORE,
    output:
        eval="results/runs/{method}/{model}/{modality}/n{n}/s{seed}/eval.json",
        scores="results/runs/{method}/{model}/{modality}/n{n}/s{seed}/scores.npz",  # test scores + labels per task: the bootstrap's input
    params:
        job=lambda w: eval_job(w, "pretrained"),
        tasks=lambda w, input: os.path.dirname(input.tasks[0]),
    threads: gpu_job_threads("evaluate", lambda w: config["evaluate"]["threads"])
    resources:
        **gpu_job_resources("evaluate"),  # params' cluster.evaluate by model size (GPUs also locally)
    log:
        "results/logs/evaluate/{method}_{model}_{modality}_n{n}_s{seed}.log",
    message:
        "Linear probes of {wildcards.method} {wildcards.model} n{wildcards.n} on every task"
    shell:
        "biovfm evaluate --job {params.job:q} --tasks {params.tasks:q} --checkpoint {input.checkpoint:q} "
        "--threads {threads} --gpus {resources.gpu} --out {output.eval:q} 2>&1 | tee {log:q}"


rule evaluate_random_init:
    conda:
        CONDA_ENV
    input:
        tasks=TASK_FILES,
        mlflow=MLFLOW_STORE,
    output:
        eval="results/baselines/random/{model}/s{seed}/eval.json",
        scores="results/baselines/random/{model}/s{seed}/scores.npz",  # test scores + labels per task: the bootstrap's input
    params:
        job=lambda w: eval_job(w, "random_init"),
        tasks=lambda w, input: os.path.dirname(input.tasks[0]),
    threads: gpu_job_threads("evaluate_random_init", lambda w: config["evaluate"]["threads"])
    resources:
        **gpu_job_resources("evaluate_random_init"),  # params' cluster.evaluate by model size (GPUs also locally)
    log:
        "results/logs/evaluate/random_{model}_s{seed}.log",
    message:
        "Linear probes of a random-init {wildcards.model} (seed {wildcards.seed})"
    shell:
        "biovfm evaluate --job {params.job:q} --tasks {params.tasks:q} --threads {threads} --gpus {resources.gpu} "
        "--out {output.eval:q} 2>&1 | tee {log:q}"


rule evaluate_raw_pixels:
    conda:
        CONDA_ENV
    input:
        tasks=TASK_FILES,
        mlflow=MLFLOW_STORE,
    output:
        eval="results/baselines/raw/pixels/eval.json",
        scores="results/baselines/raw/pixels/scores.npz",  # test scores + labels per task: the bootstrap's input
    params:
        job=lambda w: eval_job(w, "raw_pixels"),
        tasks=lambda w, input: os.path.dirname(input.tasks[0]),
    threads: config["evaluate"]["threads"]
    resources:
        **cfg.cluster_resources(config, "evaluate_raw_pixels"),  # SLURM only: partition, account, mem_mb, runtime
    log:
        "results/logs/evaluate/raw_pixels.log",
    message:
        "Linear probes on raw pixels (baseline)"
    shell:
        "biovfm evaluate --job {params.job:q} --tasks {params.tasks:q} --threads {threads} --out {output.eval:q} 2>&1 | tee {log:q}"


rule evaluate_external:
    conda:
        CONDA_ENV
    # An outside timm encoder from local weights (params: evaluate.external), on the same features and estimators.
    input:
        weights=external_weights,
        tasks=TASK_FILES,
        mlflow=MLFLOW_STORE,
    output:
        eval="results/baselines/external/{name}/eval.json",
        scores="results/baselines/external/{name}/scores.npz",  # test scores + labels per task: the bootstrap's input
    wildcard_constraints:
        name="|".join(re.escape(e["name"]) for e in config["evaluate"]["external"]) or "(?!)",  # none: matches nothing
    params:
        job=lambda w: eval_job(w, "external"),
        tasks=lambda w, input: os.path.dirname(input.tasks[0]),
    threads: gpu_job_threads("evaluate_external", lambda w: config["evaluate"]["threads"])
    resources:
        **gpu_job_resources("evaluate_external"),  # params' cluster.evaluate `default` (GPUs also locally)
    log:
        "results/logs/evaluate/external_{name}.log",
    message:
        "Linear probes of the outside encoder {wildcards.name}"
    shell:
        "biovfm evaluate --job {params.job:q} --tasks {params.tasks:q} --threads {threads} --gpus {resources.gpu} "
        "--out {output.eval:q} 2>&1 | tee {log:q}"
