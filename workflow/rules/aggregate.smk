FIGURES = ["mean_auc_vs_params", "task_grid", "task_slopes", "data_comparison", "auc_vs_data_size",
           "factor_correlations", "compute_frontier", "extrapolation", "label_efficiency"]
TABLES = ["points", "task_slopes", "correlations", "data_comparison", "compute_frontier", "recommendations",
          "paper_comparison", "paper_slopes", "probe_fidelity", "probe_fidelity_summary", "below_majority",
          "label_efficiency"]


rule task_stats:
    conda:
        CONDA_ENV
    # Model-independent task characteristics (samples, class separability, compressibility, ...) for Figure F, and
    # each task's val/test images equal to one of its train images (for the report).
    input:
        tasks=TASK_FILES,
    output:
        "results/tables/task_stats.csv",
    params:
        custom=json.dumps([dataclasses.asdict(t) for t in CUSTOM_TASKS.values()]),
        code=CODE_ANALYSIS,
    resources:
        **cfg.cluster_resources(config, "task_stats"),  # SLURM only: partition, account, mem_mb, runtime
    log:
        "results/logs/task_stats.log",
    message:
        "Task characteristics of the evaluation tasks"
    shell:
        "biovfm task-stats --tasks {input.tasks:q} --custom-tasks {params.custom:q} --out {output:q} 2>&1 | tee {log:q}"


rule aggregate:
    conda:
        CONDA_ENV
    input:
        evals=eval_outputs(),
        stats="results/tables/task_stats.csv",
        corpus=f"{CORPUS_DIR}/report.json",  # what the corpus left out (copies of val/test images), for the report
        mlflow=MLFLOW_STORE,
    output:
        summary="results/summary.csv",
        metrics="results/summary.json",
        fits="results/fits.csv",
        report="results/report.html",
        tables=expand("results/tables/{table}.csv", table=TABLES),
        svgs=expand("results/figures/{fig}.svg", fig=FIGURES),
        figures=[report(f"results/figures/{fig}.png", caption=f"../report/{fig}.rst", category="Scaling") for fig in FIGURES],
    params:
        uri=config["tracking"]["uri"],
        experiment=config["tracking"]["experiment"],
        study=json.dumps({"source": SOURCE, "image_size": SIZE, "modalities": config["modalities"]}),
        code=CODE_ANALYSIS,  # an edited estimator, fit or figure leaves no stale table or figure
    threads: 2  # the bootstrap, a task per process; a cluster job asks for these CPUs (a small node has 2)
    resources:
        **cfg.cluster_resources(config, "aggregate"),  # SLURM only: partition, account, mem_mb, runtime
    log:
        "results/logs/aggregate.log",
    message:
        "Analysis: bootstrap intervals, scaling fits, figures and report from the MLflow runs"
    shell:
        "biovfm aggregate --evals {input.evals:q} --uri {params.uri:q} --experiment {params.experiment:q} --study {params.study:q} "
        "--task-stats {input.stats:q} --corpus-report {input.corpus:q} --threads {threads} --out results 2>&1 | tee {log:q}"
