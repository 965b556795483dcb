rule preprocess_tasks:
    input:
        expand(RAW + "/{task}.npz", task=TASKS),
    output:
        expand(TASK_DIR + "/{task}_{size}.npz", task=TASKS, size=SIZE),
    params:
        size=SIZE,
    log:
        "results/logs/preprocess_tasks.log",
    message:
        "Resizing the evaluation tasks to {params.size}px"
    shell:
        """
        (for task in {TASKS}; do
            biovfm preprocess-task --task "$task" --raw {RAW:q}/"$task".npz --size {params.size} --out {TASK_DIR:q}/"$task"_{params.size}.npz
        done) 2>&1 | tee {log:q}
        """


rule preprocess_corpus:
    input:
        corpus=RAW + "/corpus.npz",
        tasks=expand(TASK_DIR + "/{task}_{size}.npz", task=TASKS, size=SIZE),
    output:
        images=CORPUS_DIR + "/images.npy",
        index=CORPUS_DIR + "/index.csv",
        report=CORPUS_DIR + "/report.json",
    params:
        size=SIZE,
        source=config["data"]["source"],
    log:
        "results/logs/preprocess_corpus.log",
    message:
        "Building the pretraining store (dedup, index, leakage check)"
    shell:
        "biovfm preprocess-corpus --raw {input.corpus:q} --size {params.size} --source {params.source:q} "
        "--tasks {input.tasks:q} --out {CORPUS_DIR:q} 2>&1 | tee {log:q}"
