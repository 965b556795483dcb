rule aggregate:
    input:
        evals=eval_outputs(),
        mlflow=ancient(MLFLOW_INIT),
    output:
        summary="results/summary.csv",
        metrics="results/summary.json",
        mean_auc=report(
            "results/figures/mean_auc_vs_params.png",
            caption="../report/mean_auc_vs_params.rst",
            category="Scaling",
        ),
        grid=report("results/figures/task_grid.png", caption="../report/task_grid.rst", category="Scaling"),
        data=report(
            "results/figures/auc_vs_data_size.png",
            caption="../report/auc_vs_data_size.rst",
            category="Scaling",
        ),
    params:
        uri=config["tracking"]["uri"],
    log:
        "results/logs/aggregate.log",
    message:
        "Aggregating the evaluations from MLflow into tables and figures"
    shell:
        "biovfm aggregate --evals {input.evals:q} --uri {params.uri:q} --out results 2>&1 | tee {log:q}"
