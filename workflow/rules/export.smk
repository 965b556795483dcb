# Opt-in, after the study: `snakemake --cores all export`. Not an input of `all`, so the default study is unchanged.
EXPORT_DIR = "results/export"


rule export:
    conda:
        CONDA_ENV
    # Each method's best encoder by mean AUC over tasks (the primary estimator's rows of summary.csv), or with
    # export.all every encoder, as results/export/<method>-<model>-<modality>-n<N>-s<seed>/ (model.safetensors,
    # timm's config.json, a model card). The manifest lists them; each folder is swapped in whole.
    input:
        summary="results/summary.csv",
        points="results/tables/points.csv",  # the card's AUCs with their 95% intervals
        corpus=f"{CORPUS_DIR}/report.json",  # the card's pretraining sources, counts and licenses
    output:
        f"{EXPORT_DIR}/exported.json",
    params:
        select="all" if config["export"]["all"] else "best",
        corpus=lambda w, input: os.path.dirname(input.corpus),
        out_root=lambda w, output: os.path.dirname(output[0]),
    resources:
        **cfg.cluster_resources(config, "export"),  # SLURM only: partition, account, mem_mb, runtime
    log:
        "results/logs/export.log",
    message:
        "Exporting {params.select} encoder(s) for timm into {params.out_root}"
    shell:
        "biovfm export --select {params.select} --results results --corpus {params.corpus:q} "
        "--out-root {params.out_root:q} --manifest {output:q} 2>&1 | tee {log:q}"
