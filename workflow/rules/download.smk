rule download:
    output:
        tasks=expand(RAW + "/{task}.npz", task=TASKS),
        corpus=RAW + "/corpus.npz",
        manifest=RAW + "/manifest.json",
    params:
        spec=json.dumps(
            dict(
                tasks=TASKS,
                **{k: config["data"]["synthetic"][k] for k in ("n_train", "n_val", "n_test", "size", "corpus_size", "seed")},
            ),
            sort_keys=True,
        ),
    log:
        "results/logs/download.log",
    message:
        "Generating the embedded synthetic benchmark"
    shell:
        "biovfm download --spec {params.spec:q} --out {RAW:q} 2>&1 | tee {log:q}"
