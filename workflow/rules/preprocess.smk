from biovfm.data import sources as corpus_sources


rule preprocess_task:
    conda:
        CONDA_ENV
    # One job per evaluation task (MedMNIST flag or custom task): validated, then resized to the study's size a chunk
    # at a time into an uncompressed npz (memory-mapped by the evaluation).
    input:
        lambda w: raw_task(w.task),
    output:
        f"{TASK_DIR}/{{task}}_{SIZE}.npz",
    wildcard_constraints:
        task="|".join(BENCHMARK),
    params:
        size=SIZE,
        info=lambda w: json.dumps(dataclasses.asdict(CUSTOM_TASKS[w.task])) if w.task in CUSTOM_TASKS else "",  # "": a flag
        code=CODE_TASKS,
    resources:
        **cfg.cluster_resources(config, "preprocess_task"),  # SLURM only: partition, account, mem_mb, runtime
    log:
        "results/logs/preprocess/{task}.log",
    message:
        "Validating {wildcards.task} and resizing it to {params.size}px"
    shell:
        "biovfm preprocess-task --task {wildcards.task:q} --info={params.info:q} --raw {input:q} "
        "--size {params.size} --out {output:q} 2>&1 | tee {log:q}"


# The corpus section as the job sees it (threads only schedule it: changing them reruns nothing).
CORPUS_SPEC = json.dumps({k: v for k, v in config["corpus"].items() if k != "threads"}, sort_keys=True)
CORPUS_INPUTS = [
    f for d in config["corpus"]["sources"] for f in corpus_sources.source_inputs(corpus_sources.source_from_dict(d, config["data"]))
]


rule preprocess_corpus:
    conda:
        CONDA_ENV
    # Streams every source into shards; fails on too many unreadable files or on copies of val/test images in a
    # source whose on_leak is fail (the medmnist kind drops its own and lists them); then the report is left at
    # data/processed/corpus.failed-report.json. Changes inside a user's folder are not tracked:
    # snakemake --forcerun preprocess_corpus after adding files.
    input:
        sources=CORPUS_INPUTS,
        tasks=TASK_FILES,
        mlflow=MLFLOW_STORE,  # the store exists before the report is logged (never created here)
    output:
        index=f"{CORPUS_DIR}/index.csv",
        manifest=f"{CORPUS_DIR}/shards.json",
        shards=directory(f"{CORPUS_DIR}/shards"),
        report=f"{CORPUS_DIR}/report.json",
    params:
        spec=CORPUS_SPEC,
        size=SIZE,
        out=subpath(output.index, parent=True),
        uri=config["tracking"]["uri"],
        experiment=config["tracking"]["experiment"],
        code=CODE_CORPUS,
    threads: config["corpus"]["threads"]
    resources:
        **cfg.cluster_resources(config, "preprocess_corpus"),  # SLURM only: partition, account, mem_mb, runtime
    log:
        "results/logs/preprocess_corpus.log",
    message:
        f"Building the pretraining store from {len(config['corpus']['sources'])} source(s) (dedup, leakage check, "
        "report) with {threads} worker(s)"
    shell:
        "biovfm preprocess-corpus --spec {params.spec:q} --size {params.size} --tasks {input.tasks:q} "
        "--workers {threads} --tracking-uri {params.uri:q} --experiment {params.experiment:q} "
        "--out {params.out:q} 2>&1 | tee {log:q}"


rule task_examples:
    conda:
        CONDA_ENV
    input:
        TASK_FILES,
    params:
        code=CODE_ANALYSIS,
    resources:
        **cfg.cluster_resources(config, "task_examples"),  # SLURM only: partition, account, mem_mb, runtime
    output:
        report("results/figures/task_examples.png", caption="../report/task_examples.rst", category="Data"),
    log:
        "results/logs/task_examples.log",
    message:
        "Drawing example images of every task"
    shell:
        "biovfm show-tasks --tasks {input:q} --out {output:q} > {log:q} 2>&1"
