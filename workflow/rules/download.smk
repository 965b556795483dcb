rule download:
    output:
        tasks=expand(f"{RAW}/{{task}}.npz", task=TASKS),
        corpus=f"{RAW}/corpus.npz",
        manifest=f"{RAW}/manifest.json",
    params:
        spec=json.dumps(
            dict(
                tasks=TASKS,
                **{k: config["data"]["synthetic"][k] for k in ("n_train", "n_val", "n_test", "size", "corpus_size", "seed")},
            ),
            sort_keys=True,
        ),
        out=subpath(output.manifest, parent=True),
    log:
        "results/logs/download.log",
    message:
        "Generating the embedded synthetic benchmark"
    shell:
        "biovfm download --spec {params.spec:q} --out {params.out:q} 2>&1 | tee {log:q}"
