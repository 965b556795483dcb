localrules:
    mlflow_init,


rule mlflow_init:
    conda:
        CONDA_ENV
    # Serial, once, before any job that logs: concurrent first creation of a SQLite store races.
    output:
        MLFLOW_INIT,
    params:
        uri=config["tracking"]["uri"],
        experiment=config["tracking"]["experiment"],
    log:
        "results/logs/mlflow_init.log",
    shell:
        "biovfm mlflow-init --uri {params.uri:q} --experiment {params.experiment:q} --out {output:q} > {log:q} 2>&1"


rule pretrain:
    conda:
        CONDA_ENV
    input:
        images=f"{CORPUS_DIR}/shards.json",  # the sharded store's manifest
        index=f"{CORPUS_DIR}/index.csv",
        mlflow=MLFLOW_STORE,
    output:
        checkpoint="results/runs/{method}/{model}/{modality}/n{n}/s{seed}/checkpoint.safetensors",
        run="results/runs/{method}/{model}/{modality}/n{n}/s{seed}/run.json",
    params:
        job=pretrain_job,
        out=subpath(output.run, parent=True),
        corpus=subpath(input.images, parent=True),
    # a GPU job: cluster.cpus_per_gpu per GPU; a CPU job: its processes' threads
    threads: gpu_job_threads("pretrain", pretrain_cpu_threads)
    resources:
        # processes of a CPU job (torchrun + DDP when > 1). A job with GPUs runs one process per GPU it got.
        nproc=lambda w: cfg.train_settings(config, w.method).nproc,
        # params' cluster.pretrain by model size: GPUs (SLURM and local), partition, account, memory, time (SLURM)
        **gpu_job_resources("pretrain"),
    log:
        "results/logs/pretrain/{method}_{model}_{modality}_n{n}_s{seed}.log",
    message:
        "Pretraining {wildcards.method} {wildcards.model} on {wildcards.n} {wildcards.modality} images (seed {wildcards.seed})"
    shell:
        "biovfm pretrain --job {params.job:q} --corpus {params.corpus:q} --threads {threads} --processes {resources.nproc} "
        "--gpus {resources.gpu} --out {params.out:q} 2>&1 | tee {log:q}"
