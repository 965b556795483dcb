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
        mlflow=ancient(MLFLOW_INIT),
    output:
        checkpoint="results/runs/{method}/{model}/{modality}/n{n}/s{seed}/checkpoint.safetensors",
        run="results/runs/{method}/{model}/{modality}/n{n}/s{seed}/run.json",
    params:
        job=pretrain_job,
        out=subpath(output.run, parent=True),
        corpus=subpath(input.images, parent=True),
    threads: lambda w: max(cfg.train_settings(config, w.method).threads, cfg.train_settings(config, w.method).nproc)
    resources:
        # processes of this job (torchrun + DDP when > 1; 0 = one per visible GPU). In a SLURM job that got GPUs,
        # `biovfm pretrain` runs one process per GPU of the job whatever this says.
        nproc=lambda w: cfg.train_settings(config, w.method).nproc,
        # SLURM only (params' cluster section, by model size): partition, account, memory, time, GPUs
        slurm_partition=pretrain_cluster("slurm_partition"),
        slurm_account=pretrain_cluster("slurm_account"),
        mem_mb=pretrain_cluster("mem_mb"),
        runtime=pretrain_cluster("runtime"),
        gpu=pretrain_cluster("gpu", gpu_only=True),
        gpu_model=pretrain_cluster("gpu_model", gpu_only=True),
        cpus_per_gpu=pretrain_cluster("cpus_per_gpu", gpu_only=True),
    log:
        "results/logs/pretrain/{method}_{model}_{modality}_n{n}_s{seed}.log",
    message:
        "Pretraining {wildcards.method} {wildcards.model} on {wildcards.n} {wildcards.modality} images (seed {wildcards.seed})"
    shell:
        "biovfm pretrain --job {params.job:q} --corpus {params.corpus:q} --threads {threads} --processes {resources.nproc} "
        "--out {params.out:q} 2>&1 | tee {log:q}"
