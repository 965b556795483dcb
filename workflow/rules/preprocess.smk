rule preprocess_tasks:
    input:
        expand(f"{RAW}/{{task}}.npz", task=TASKS),
    output:
        expand(f"{TASK_DIR}/{{task}}_{{size}}.npz", task=TASKS, size=SIZE),
    params:
        size=SIZE,
        tasks=TASKS,
        raw=lambda w, input: os.path.dirname(input[0]),
        out=lambda w, output: os.path.dirname(output[0]),
    log:
        "results/logs/preprocess_tasks.log",
    message:
        "Resizing the evaluation tasks to {params.size}px"
    shell:
        """
        (for task in {params.tasks:q}; do
            biovfm preprocess-task --task "$task" --raw {params.raw:q}/"$task".npz --size {params.size} --out {params.out:q}/"$task"_{params.size}.npz
        done) 2>&1 | tee {log:q}
        """


rule preprocess_corpus:
    input:
        corpus=f"{RAW}/corpus.npz",
        tasks=expand(f"{TASK_DIR}/{{task}}_{{size}}.npz", task=TASKS, size=SIZE),
    output:
        images=f"{CORPUS_DIR}/images.npy",
        index=f"{CORPUS_DIR}/index.csv",
        report=f"{CORPUS_DIR}/report.json",
    params:
        size=SIZE,
        source=config["data"]["source"],
        out=subpath(output.images, parent=True),
    log:
        "results/logs/preprocess_corpus.log",
    message:
        "Building the pretraining store (dedup, index, leakage check)"
    shell:
        "biovfm preprocess-corpus --raw {input.corpus:q} --size {params.size} --source {params.source:q} "
        "--tasks {input.tasks:q} --out {params.out:q} 2>&1 | tee {log:q}"


rule task_examples:
    input:
        expand(f"{TASK_DIR}/{{task}}_{{size}}.npz", task=TASKS, size=SIZE),
    output:
        report("results/figures/task_examples.png", caption="../report/task_examples.rst", category="Data"),
    log:
        "results/logs/task_examples.log",
    message:
        "Drawing example images of every task"
    shell:
        "biovfm show-tasks --tasks {input:q} --out {output:q} > {log:q} 2>&1"
